//! The backup agent's gRPC service. Backups arrive with the backup-agent work; until then each call answers
//! UNIMPLEMENTED.

use ember_common::not_yet;
use ember_proto::agent::v1::backup_agent_server::BackupAgent;
use ember_proto::agent::v1::*;

/// The service.
pub struct Backups;

#[tonic::async_trait]
impl BackupAgent for Backups {
    not_yet!(create_backup, CreateBackupRequest, CreateBackupResponse, "creating backups");
    not_yet!(restore_backup, RestoreBackupRequest, RestoreBackupResponse, "restoring backups");
    not_yet!(delete_backup, DeleteBackupRequest, DeleteBackupResponse, "deleting backups");
    not_yet!(verify_backup, VerifyBackupRequest, VerifyBackupResponse, "verifying backups");
    not_yet!(collect_garbage, CollectGarbageRequest, CollectGarbageResponse, "garbage collection");
}
