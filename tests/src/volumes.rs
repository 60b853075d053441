//! Volume helpers shared by the fleet tests: waiting for states and comparing the coordinator's records with
//! what the storage backends hold.

use crate::{Fleet, wait_for};
use ember_proto::v1::fleet_service_client::FleetServiceClient;
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use tonic::transport::Channel;

/// How long a volume operation may take in a test before it counts as stuck.
pub const WAIT: Duration = Duration::from_secs(60);

/// Waits until volume `id` has `status` (failing early if it lands in an error state instead).
pub async fn wait_volume(client: &VolumeServiceClient<Channel>, id: &str, status: &str) -> Volume {
    wait_for(&format!("volume {id} to be {status}"), WAIT, || {
        let mut c = client.clone();
        let id = id.to_string();
        async move {
            let v = c.get_volume(GetVolumeRequest { id }).await.ok()?.into_inner();
            assert!(!v.status.starts_with("error") || status.starts_with("error"), "volume failed: {v:?}");
            (v.status == status).then_some(v)
        }
    })
    .await
}

/// Creates a blank volume of `size_gb` GiB and waits until it is available.
pub async fn new_volume(client: &VolumeServiceClient<Channel>, size_gb: u64) -> Volume {
    let v = client
        .clone()
        .create_volume(CreateVolumeRequest { size_gb, ..Default::default() })
        .await
        .expect("create volume")
        .into_inner();
    wait_volume(client, &v.id, "available").await
}

/// A new, blank 1 GiB volume marked bootable: an instance's domain starts from it (its kernel finds no root).
pub async fn new_bootable_volume(client: &VolumeServiceClient<Channel>) -> Volume {
    let v = new_volume(client, 1).await;
    let bootable = UpdateVolumeRequest { id: v.id.clone(), bootable: Some(true), ..Default::default() };
    client.clone().update_volume(bootable).await.expect("mark bootable").into_inner()
}

/// Waits until snapshot `id` has `status` and returns it.
pub async fn wait_snapshot(client: &SnapshotServiceClient<Channel>, id: &str, status: &str) -> Snapshot {
    wait_for(&format!("snapshot {id} to be {status}"), WAIT, || {
        let mut c = client.clone();
        let id = id.to_string();
        async move {
            let s = c.get_snapshot(GetSnapshotRequest { id }).await.ok()?.into_inner();
            (s.status == status).then_some(s)
        }
    })
    .await
}

/// Waits until snapshot `id` no longer exists.
pub async fn wait_snapshot_gone(client: &SnapshotServiceClient<Channel>, id: &str) {
    wait_for(&format!("snapshot {id} to be gone"), WAIT, || {
        let mut c = client.clone();
        let id = id.to_string();
        async move { c.get_snapshot(GetSnapshotRequest { id }).await.is_err().then_some(()) }
    })
    .await
}

/// Snapshots volume `volume_id` (which must not be in use) and waits until the snapshot is available.
pub async fn new_snapshot(client: &SnapshotServiceClient<Channel>, volume_id: &str) -> Snapshot {
    let req = CreateSnapshotRequest { volume_id: volume_id.into(), ..Default::default() };
    let s = client.clone().create_snapshot(req).await.expect("create snapshot").into_inner();
    wait_snapshot(client, &s.id, "available").await
}

/// Waits until volume `id` is in a final state and returns it.
pub async fn wait_settled(client: &VolumeServiceClient<Channel>, id: &str) -> Volume {
    wait_for(&format!("volume {id} to settle"), WAIT, || {
        let mut c = client.clone();
        let id = id.to_string();
        async move {
            let v = c.get_volume(GetVolumeRequest { id }).await.ok()?.into_inner();
            (!matches!(
                v.status.as_str(),
                "creating"
                    | "deleting"
                    | "extending"
                    | "attaching"
                    | "detaching"
                    | "restoring-backup"
                    | "backing-up"
                    | "migrating"
                    | "retyping"
            ))
            .then_some(v)
        }
    })
    .await
}

/// Waits until volume `id` no longer exists.
pub async fn wait_gone(client: &VolumeServiceClient<Channel>, id: &str) {
    wait_for(&format!("volume {id} to be gone"), WAIT, || {
        let mut c = client.clone();
        let id = id.to_string();
        async move {
            match c.get_volume(GetVolumeRequest { id }).await {
                Err(s) if s.code() == tonic::Code::NotFound => Some(()),
                Ok(v) => {
                    assert_ne!(v.get_ref().status, "error_deleting", "{:?}", v.get_ref());
                    None
                }
                Err(_) => None,
            }
        }
    })
    .await
}

/// Waits until storage backend `name` (`host@backend`) is registered and up.
pub async fn wait_backend(fleet: &Fleet, name: &str) {
    wait_for(&format!("backend {name} up"), WAIT, || async {
        let mut c = FleetServiceClient::new(fleet.admin());
        let list = c.list_services(ListServicesRequest::default()).await.ok()?.into_inner().services;
        list.iter().any(|s| s.name == name && s.up).then_some(())
    })
    .await
}

/// Volume ids whose files a file backend directory holds.
pub fn files_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("volume-").map(String::from))
        .collect()
}

/// The 8 bytes at `offset` of a volume or snapshot file: where tests leave a marker to find again.
pub fn read_at(file: &Path, offset: u64) -> [u8; 8] {
    use std::os::unix::fs::FileExt;
    let mut data = [0u8; 8];
    std::fs::File::open(file).unwrap().read_exact_at(&mut data, offset).unwrap();
    data
}

/// What `project` uses of quota `resource` (in use plus reserved).
pub async fn usage(fleet: &Fleet, project: &str, resource: &str) -> i64 {
    let pool = fleet.db().await;
    let used = sqlx::query_scalar("SELECT in_use + reserved FROM quota_usages WHERE project = ? AND resource = ?")
        .bind(project)
        .bind(resource)
        .fetch_optional(&pool)
        .await
        .unwrap()
        .unwrap_or(0);
    pool.close().await;
    used
}

/// Every volume row's (id, status) and the committed quota use, read straight from the database.
pub async fn db_state(fleet: &Fleet, project: &str) -> (Vec<(String, String, i64)>, i64, i64) {
    let pool = fleet.db().await;
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT id, status, size_gb FROM volumes ORDER BY id").fetch_all(&pool).await.unwrap();
    pool.close().await;
    (rows, usage(fleet, project, "volumes").await, usage(fleet, project, "gigabytes").await)
}

/// Asserts that every project's recorded quota usage equals what exists (`CheckQuotaUsage`): the invariant
/// every change keeps by counting in its own transaction.
pub async fn assert_usage_exact(fleet: &Fleet) {
    use ember_proto::v1::quota_service_client::QuotaServiceClient;
    let check = CheckQuotaUsageRequest { project: String::new(), fix: false };
    let r = QuotaServiceClient::new(fleet.admin()).check_quota_usage(check).await.unwrap().into_inner();
    assert!(r.drifts.is_empty(), "recorded quota usage differs from what exists: {:?}", r.drifts);
}

/// Waits until the coordinator reports that it leaves the file of `id`, which it has no record of, alone: proof
/// that a sweep passed over the file without removing it.
pub async fn wait_left_alone(fleet: &Fleet, id: &str) {
    let coordinator = fleet.coordinator.as_ref().unwrap();
    wait_for(&format!("{id} reported and left alone"), Duration::from_secs(30), || async {
        coordinator.log_text().lines().any(|l| l.contains(id) && l.contains("is left alone")).then_some(())
    })
    .await;
}
