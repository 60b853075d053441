-- Volume migration between pools (Cinder's migrate): while a volume is `migrating`, the pool it is moving to.
-- The scheduler counts the volume against that pool too, and the orphan sweeper leaves the copy there alone.
ALTER TABLE volumes ADD COLUMN migrate_host TEXT NOT NULL DEFAULT '';
ALTER TABLE volumes ADD COLUMN migrate_backend TEXT NOT NULL DEFAULT '';
