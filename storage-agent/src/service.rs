//! The storage agent's gRPC service. Volume operations arrive with the volume-lifecycle work; until then each
//! call answers UNIMPLEMENTED.

use ember_common::not_yet;
use ember_proto::agent::v1::storage_agent_server::StorageAgent;
use ember_proto::agent::v1::*;
use std::pin::Pin;
use tokio_stream::Stream;

/// The service.
pub struct Storage;

#[tonic::async_trait]
impl StorageAgent for Storage {
    type ReadVolumeStream = Pin<Box<dyn Stream<Item = Result<VolumeChunk, tonic::Status>> + Send>>;
    not_yet!(create_volume, CreateVolumeRequest, VolumeResult, "creating volumes");
    not_yet!(delete_volume, DeleteVolumeRequest, DeleteVolumeResponse, "deleting volumes");
    not_yet!(extend_volume, ExtendVolumeRequest, VolumeResult, "extending volumes");
    not_yet!(create_snapshot, CreateSnapshotRequest, SnapshotResult, "creating snapshots");
    not_yet!(delete_snapshot, DeleteSnapshotRequest, DeleteSnapshotResponse, "deleting snapshots");
    not_yet!(export_volume, ExportVolumeRequest, ExportVolumeResponse, "exporting volumes");
    not_yet!(unexport_volume, UnexportVolumeRequest, UnexportVolumeResponse, "unexporting volumes");
    not_yet!(list_resources, ListResourcesRequest, ListResourcesResponse, "listing resources");
    not_yet!(read_volume, ReadVolumeRequest, Self::ReadVolumeStream, "reading volume data");
    not_yet!(write_volume, tonic::Streaming<VolumeChunk>, WriteVolumeResponse, "writing volume data");
}
