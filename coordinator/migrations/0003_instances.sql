-- Instances booted from volumes (a libvirt domain on a compute host; UUID = id).
CREATE TABLE instances (
    id                  TEXT    PRIMARY KEY,
    project             TEXT    NOT NULL,
    name                TEXT    NOT NULL,
    host                TEXT    NOT NULL,
    status              TEXT    NOT NULL,
    status_reason       TEXT    NOT NULL DEFAULT '',
    boot_volume_id      TEXT    NOT NULL,
    vcpus               INTEGER NOT NULL,
    memory_mb           INTEGER NOT NULL,
    delete_on_terminate INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
);
