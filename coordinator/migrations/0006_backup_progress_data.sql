-- Bytes of data the running backup or restore has moved, for an honest rate (holes are passed, not moved).
ALTER TABLE backups ADD COLUMN progress_data_bytes INTEGER NOT NULL DEFAULT 0;
