-- ember coordinator schema, version 1. Times are Unix milliseconds (UTC). JSON columns hold small documents
-- the coordinator alone reads and writes.

-- Agents, one row per (host, role, backend); backend is '' for compute and backup agents.
CREATE TABLE services (
    host              TEXT    NOT NULL,
    role              TEXT    NOT NULL CHECK (role IN ('storage', 'compute', 'backup')),
    backend           TEXT    NOT NULL DEFAULT '',
    availability_zone TEXT    NOT NULL,
    endpoint          TEXT    NOT NULL,
    instance_id       TEXT    NOT NULL,
    version           TEXT    NOT NULL,
    api_version       TEXT    NOT NULL,
    enabled           INTEGER NOT NULL DEFAULT 1,
    disabled_reason   TEXT    NOT NULL DEFAULT '',
    -- Pools (storage), connector (compute) or repositories (backup), as reported.
    report            TEXT    NOT NULL DEFAULT '{}',
    created_at        INTEGER NOT NULL,
    last_heartbeat    INTEGER NOT NULL,
    PRIMARY KEY (host, role, backend)
);

CREATE TABLE volume_types (
    id          TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    description TEXT    NOT NULL DEFAULT '',
    is_default  INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);
-- At most one default type.
CREATE UNIQUE INDEX volume_types_one_default ON volume_types (is_default) WHERE is_default = 1;

CREATE TABLE volume_type_extra_specs (
    type_id TEXT NOT NULL REFERENCES volume_types (id) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (type_id, key)
);

CREATE TABLE volumes (
    id                 TEXT    PRIMARY KEY,
    project            TEXT    NOT NULL,
    name               TEXT    NOT NULL DEFAULT '',
    description        TEXT    NOT NULL DEFAULT '',
    size_gb            INTEGER NOT NULL,
    status             TEXT    NOT NULL,
    status_reason      TEXT    NOT NULL DEFAULT '',
    volume_type_id     TEXT    NOT NULL REFERENCES volume_types (id),
    availability_zone  TEXT    NOT NULL DEFAULT '',
    -- host and backend the scheduler placed it on; '' until scheduled.
    host               TEXT    NOT NULL DEFAULT '',
    backend            TEXT    NOT NULL DEFAULT '',
    metadata           TEXT    NOT NULL DEFAULT '{}',
    bootable           INTEGER NOT NULL DEFAULT 0,
    multiattach        INTEGER NOT NULL DEFAULT 0,
    source_snapshot_id TEXT    NOT NULL DEFAULT '',
    source_volume_id   TEXT    NOT NULL DEFAULT '',
    source_backup_id   TEXT    NOT NULL DEFAULT '',
    image              TEXT    NOT NULL DEFAULT '',
    idempotency_key    TEXT,
    -- Hash of the create parameters, to tell a repeat from a conflicting reuse of the key.
    request_digest     TEXT    NOT NULL DEFAULT '',
    chap_username      TEXT    NOT NULL DEFAULT '',
    chap_password      TEXT    NOT NULL DEFAULT '',
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    UNIQUE (project, idempotency_key)
);
CREATE INDEX volumes_by_project ON volumes (project, created_at);
CREATE INDEX volumes_by_type ON volumes (volume_type_id);

CREATE TABLE snapshots (
    id              TEXT    PRIMARY KEY,
    project         TEXT    NOT NULL,
    volume_id       TEXT    NOT NULL REFERENCES volumes (id),
    name            TEXT    NOT NULL DEFAULT '',
    description     TEXT    NOT NULL DEFAULT '',
    size_gb         INTEGER NOT NULL,
    status          TEXT    NOT NULL,
    status_reason   TEXT    NOT NULL DEFAULT '',
    idempotency_key TEXT,
    request_digest  TEXT    NOT NULL DEFAULT '',
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (project, idempotency_key)
);
CREATE INDEX snapshots_by_volume ON snapshots (volume_id);

CREATE TABLE backups (
    id              TEXT    PRIMARY KEY,
    project         TEXT    NOT NULL,
    volume_id       TEXT    NOT NULL,
    name            TEXT    NOT NULL DEFAULT '',
    description     TEXT    NOT NULL DEFAULT '',
    status          TEXT    NOT NULL,
    status_reason   TEXT    NOT NULL DEFAULT '',
    size_gb         INTEGER NOT NULL,
    incremental     INTEGER NOT NULL DEFAULT 0,
    parent_id       TEXT    NOT NULL DEFAULT '',
    host            TEXT    NOT NULL DEFAULT '',
    repository      TEXT    NOT NULL DEFAULT '',
    stored_bytes    INTEGER NOT NULL DEFAULT 0,
    new_bytes       INTEGER NOT NULL DEFAULT 0,
    logical_bytes   INTEGER NOT NULL DEFAULT 0,
    progress        INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    request_digest  TEXT    NOT NULL DEFAULT '',
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (project, idempotency_key)
);
CREATE INDEX backups_by_volume ON backups (volume_id);

CREATE TABLE attachments (
    id            TEXT    PRIMARY KEY,
    volume_id     TEXT    NOT NULL REFERENCES volumes (id),
    instance      TEXT    NOT NULL,
    host          TEXT    NOT NULL,
    status        TEXT    NOT NULL,
    status_reason TEXT    NOT NULL DEFAULT '',
    device        TEXT    NOT NULL DEFAULT '',
    mode          TEXT    NOT NULL DEFAULT 'rw',
    connector     TEXT    NOT NULL DEFAULT '{}',
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX attachments_by_volume ON attachments (volume_id);

-- Limits set by admins; resources without a row use the configured defaults.
CREATE TABLE quota_limits (
    project    TEXT    NOT NULL,
    resource   TEXT    NOT NULL,
    hard_limit INTEGER NOT NULL,
    PRIMARY KEY (project, resource)
);

-- Committed use and in-flight reservations per project and resource.
CREATE TABLE quota_usages (
    project  TEXT    NOT NULL,
    resource TEXT    NOT NULL,
    in_use   INTEGER NOT NULL DEFAULT 0 CHECK (in_use >= 0),
    reserved INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    PRIMARY KEY (project, resource)
);

-- Durable operations: written before the first agent call, advanced after each step, resumed or reverted by
-- the reconciler after a crash.
CREATE TABLE operations (
    id            TEXT    PRIMARY KEY,
    kind          TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    resource_id   TEXT    NOT NULL,
    step          TEXT    NOT NULL,
    attempt       INTEGER NOT NULL DEFAULT 0,
    payload       TEXT    NOT NULL DEFAULT '{}',
    state         TEXT    NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done', 'failed')),
    error         TEXT    NOT NULL DEFAULT '',
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX operations_running ON operations (state) WHERE state = 'running';
