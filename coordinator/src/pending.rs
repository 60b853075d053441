//! Public services whose capability a later piece of work delivers. Each call answers UNIMPLEMENTED with a
//! message saying so — never a fake success — while the API contract is already complete and documented.

use ember_proto::v1::*;
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::Status;

/// Stand-in for the services not delivered yet.
pub struct Pending;

type VolumeStream = Pin<Box<dyn Stream<Item = Result<Volume, Status>> + Send>>;

#[tonic::async_trait]
impl volume_service_server::VolumeService for Pending {
    type WatchVolumeStream = VolumeStream;
    ember_common::not_yet!(create_volume, CreateVolumeRequest, Volume, "creating volumes");
    ember_common::not_yet!(get_volume, GetVolumeRequest, Volume, "reading volumes");
    ember_common::not_yet!(list_volumes, ListVolumesRequest, ListVolumesResponse, "listing volumes");
    ember_common::not_yet!(update_volume, UpdateVolumeRequest, Volume, "updating volumes");
    ember_common::not_yet!(extend_volume, ExtendVolumeRequest, Volume, "extending volumes");
    ember_common::not_yet!(delete_volume, DeleteVolumeRequest, DeleteVolumeResponse, "deleting volumes");
    ember_common::not_yet!(watch_volume, GetVolumeRequest, Self::WatchVolumeStream, "watching volumes");
    ember_common::not_yet!(initialize_connection, InitializeConnectionRequest, ConnectionInfo, "exporting volumes");
    ember_common::not_yet!(
        terminate_connection,
        TerminateConnectionRequest,
        TerminateConnectionResponse,
        "unexporting volumes"
    );
}

#[tonic::async_trait]
impl snapshot_service_server::SnapshotService for Pending {
    ember_common::not_yet!(create_snapshot, CreateSnapshotRequest, Snapshot, "creating snapshots");
    ember_common::not_yet!(get_snapshot, GetSnapshotRequest, Snapshot, "reading snapshots");
    ember_common::not_yet!(list_snapshots, ListSnapshotsRequest, ListSnapshotsResponse, "listing snapshots");
    ember_common::not_yet!(delete_snapshot, DeleteSnapshotRequest, DeleteSnapshotResponse, "deleting snapshots");
}

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
impl attachment_service_server::AttachmentService for Pending {
    ember_common::not_yet!(attach, AttachRequest, Attachment, "attaching volumes");
    ember_common::not_yet!(detach, DetachRequest, DetachResponse, "detaching volumes");
    ember_common::not_yet!(get_attachment, GetAttachmentRequest, Attachment, "reading attachments");
    ember_common::not_yet!(list_attachments, ListAttachmentsRequest, ListAttachmentsResponse, "listing attachments");
}

#[tonic::async_trait]
impl instance_service_server::InstanceService for Pending {
    ember_common::not_yet!(create_instance, CreateInstanceRequest, Instance, "creating instances");
    ember_common::not_yet!(get_instance, GetInstanceRequest, Instance, "reading instances");
    ember_common::not_yet!(list_instances, ListInstancesRequest, ListInstancesResponse, "listing instances");
    ember_common::not_yet!(get_console_log, GetInstanceRequest, ConsoleLog, "console logs");
    ember_common::not_yet!(delete_instance, DeleteInstanceRequest, DeleteInstanceResponse, "deleting instances");
}
