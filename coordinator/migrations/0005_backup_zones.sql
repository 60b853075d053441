-- The availability zone of the repository a backup is in, recorded when the backup is placed (a create may ask
-- for a zone, e.g. another site than the volume's). Backups recorded before this keep an empty zone.
ALTER TABLE backups ADD COLUMN availability_zone TEXT NOT NULL DEFAULT '';
