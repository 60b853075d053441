-- A backup may read a snapshot of its volume instead of the volume itself. `data_timestamp` is the moment
-- its data is from: the snapshot's creation for such a backup, the backup's own start otherwise; an
-- incremental builds on the newest backup whose data is not newer than its own (Cinder's rule).
ALTER TABLE backups ADD COLUMN snapshot_id TEXT NOT NULL DEFAULT '';
ALTER TABLE backups ADD COLUMN data_timestamp INTEGER NOT NULL DEFAULT 0;
UPDATE backups SET data_timestamp = created_at;
