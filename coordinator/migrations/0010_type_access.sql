-- Private volume types (Cinder's is_public and type access): a private type is seen and used only by admins and
-- the projects granted it.
ALTER TABLE volume_types ADD COLUMN is_public INTEGER NOT NULL DEFAULT 1;
CREATE TABLE volume_type_access (
    type_id  TEXT NOT NULL REFERENCES volume_types (id) ON DELETE CASCADE,
    project  TEXT NOT NULL,
    PRIMARY KEY (type_id, project)
);
