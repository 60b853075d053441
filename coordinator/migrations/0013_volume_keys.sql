-- Keys of encrypted volumes (and of the backups of their data): each passphrase sealed with the coordinator's
-- master key, bound to its owner's id. `secret_uuid` names the libvirt secret compute hosts file it under;
-- `header_bytes` is the size of the LUKS header at the start of the data (guests see the rest).
CREATE TABLE volume_keys (
    owner_id TEXT PRIMARY KEY,
    secret_uuid TEXT NOT NULL,
    wrapped BLOB NOT NULL,
    header_bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
