-- Read-only volumes (Cinder's readonly flag): every attachment and export of such a volume is read-only.
ALTER TABLE volumes ADD COLUMN read_only INTEGER NOT NULL DEFAULT 0;
