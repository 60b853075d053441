-- Volume transfers between projects (Cinder's volume transfers): at most one open offer per volume, which is
-- `awaiting-transfer` while it lasts. The key is kept only as a salted sha256.
CREATE TABLE transfers (
    id          TEXT    PRIMARY KEY,
    volume_id   TEXT    NOT NULL UNIQUE REFERENCES volumes (id),
    project     TEXT    NOT NULL,
    name        TEXT    NOT NULL DEFAULT '',
    salt        TEXT    NOT NULL,
    key_sha256  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX transfers_by_project ON transfers (project, created_at);
