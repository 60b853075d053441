//! Public services whose capability a later piece of work delivers. Each call answers UNIMPLEMENTED with a
//! message saying so — never a fake success — while the API contract is already complete and documented.

use ember_proto::v1::*;

/// Stand-in for the services not delivered yet.
pub struct Pending;

#[tonic::async_trait]
impl backup_service_server::BackupService for Pending {
    ember_common::not_yet!(create_backup, CreateBackupRequest, Backup, "creating backups");
    ember_common::not_yet!(get_backup, GetBackupRequest, Backup, "reading backups");
    ember_common::not_yet!(list_backups, ListBackupsRequest, ListBackupsResponse, "listing backups");
    ember_common::not_yet!(delete_backup, DeleteBackupRequest, DeleteBackupResponse, "deleting backups");
    ember_common::not_yet!(restore_backup, RestoreBackupRequest, RestoreBackupResponse, "restoring backups");
    ember_common::not_yet!(verify_backup, VerifyBackupRequest, VerifyBackupResponse, "verifying backups");
    ember_common::not_yet!(collect_garbage, CollectGarbageRequest, CollectGarbageResponse, "backup garbage collection");
    ember_common::not_yet!(import_cinder_backup, ImportCinderBackupRequest, Backup, "importing Cinder backups");
}

#[tonic::async_trait]
impl instance_service_server::InstanceService for Pending {
    ember_common::not_yet!(create_instance, CreateInstanceRequest, Instance, "creating instances");
    ember_common::not_yet!(get_instance, GetInstanceRequest, Instance, "reading instances");
    ember_common::not_yet!(list_instances, ListInstancesRequest, ListInstancesResponse, "listing instances");
    ember_common::not_yet!(get_console_log, GetInstanceRequest, ConsoleLog, "console logs");
    ember_common::not_yet!(delete_instance, DeleteInstanceRequest, DeleteInstanceResponse, "deleting instances");
}
