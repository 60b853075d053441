-- How far a migration's copy (or an attached volume's mirror) has got, in percent; 0 when none runs.
ALTER TABLE volumes ADD COLUMN migrate_progress INTEGER NOT NULL DEFAULT 0;
