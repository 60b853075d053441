-- Exports made with InitializeConnection (`ember volume export`): initiators that may reach a volume outside
-- ember's attachments. A row is written before the storage agent is asked to export, and removed once it has
-- unexported, so the list may name an initiator the agent never got to, never the other way round.
CREATE TABLE exports (
    volume_id TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
    initiator TEXT NOT NULL,
    read_only INTEGER NOT NULL,
    exported_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (volume_id, initiator)
);
