//! Deleting a volume with its snapshots in one call (Cinder's cascade delete): everything goes, files and quota;
//! a coordinator crash part-way goes on from the snapshots left; a snapshot the agent will not remove stops the
//! cascade with the reason, and deleting again finishes it.

use ember_fleet_tests::volumes::{new_snapshot, new_volume, usage, wait_backend, wait_gone, wait_volume};
use ember_fleet_tests::{Daemon, Fleet};
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;

/// A volume with two snapshots on a fresh fleet, as member alice of p1.
async fn volume_with_snapshots(env: &[(&str, &str)]) -> (Fleet, PathBuf, Daemon, Volume, Vec<Snapshot>) {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let storage = fleet.start_agent_with("storage", "storage1", &backend, env);
    wait_backend(&fleet, "storage1@file1").await;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let snapshots = SnapshotServiceClient::new(fleet.member("alice", "p1"));
    let v = new_volume(&volumes, 1).await;
    let snaps = vec![new_snapshot(&snapshots, &v.id).await, new_snapshot(&snapshots, &v.id).await];
    assert_eq!(files(&dir).len(), 3);
    (fleet, dir, storage, v, snaps)
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

async fn snapshot_statuses(fleet: &Fleet, volume: &str) -> Vec<String> {
    let db = fleet.db().await;
    let rows = sqlx::query_scalar("SELECT status FROM snapshots WHERE volume_id = ? ORDER BY created_at")
        .bind(volume)
        .fetch_all(&db)
        .await
        .unwrap();
    db.close().await;
    rows
}

async fn nothing_left(fleet: &Fleet, dir: &Path, v: &Volume) {
    wait_gone(&VolumeServiceClient::new(fleet.admin()), &v.id).await;
    assert!(snapshot_statuses(fleet, &v.id).await.is_empty(), "no snapshot record is left");
    assert!(files(dir).is_empty(), "files left: {:?}", files(dir));
    for resource in ["volumes", "snapshots", "gigabytes"] {
        assert_eq!(usage(fleet, "p1", resource).await, 0, "{resource}");
    }
}

#[tokio::test]
async fn a_volume_is_deleted_with_its_snapshots_in_one_call() {
    let (fleet, dir, _storage, v, _snaps) = volume_with_snapshots(&[]).await;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let plain = DeleteVolumeRequest { id: v.id.clone(), ..Default::default() };
    let err = volumes.clone().delete_volume(plain).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("cascade"), "the refusal says how: {err:?}");
    assert_eq!(snapshot_statuses(&fleet, &v.id).await, ["available", "available"], "nothing changed");

    let tls = fleet.issue(ember_common::identity::Role::Member, "alice", Some("p1"));
    let (ok, out, err) = fleet.cli_as(&tls, &["volume", "delete", &v.id, "--cascade", "--wait"]);
    assert!(ok, "{out}\n{err}");
    nothing_left(&fleet, &dir, &v).await;
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

#[tokio::test]
async fn a_cascade_delete_resumes_after_a_crash_and_after_a_refused_snapshot() {
    let failing = [("EMBER_FAILPOINTS", "storage.delete_snapshot")];
    let (mut fleet, dir, mut storage, v, snaps) = volume_with_snapshots(&failing).await;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let cascade = DeleteVolumeRequest { id: v.id.clone(), cascade: true, ..Default::default() };

    // The agent refuses the first snapshot: the cascade stops there, naming it; nothing is removed.
    volumes.clone().delete_volume(cascade.clone()).await.unwrap();
    let stopped = wait_volume(&volumes, &v.id, "error_deleting").await;
    assert!(stopped.status_reason.contains(&format!("snapshot {}", snaps[1].id)), "newest first: {stopped:?}");
    assert!(stopped.status_reason.contains("injected failure"), "{stopped:?}");
    assert_eq!(snapshot_statuses(&fleet, &v.id).await, ["error_deleting", "error_deleting"]);
    assert_eq!(files(&dir).len(), 3);
    assert_eq!(usage(&fleet, "p1", "snapshots").await, 2);

    // Again with a working agent; the coordinator dies once the first snapshot is removed and recorded.
    storage.kill();
    let (backend, _) = fleet.file_backend("file1", "");
    storage = fleet.start_agent("storage", "storage1", &backend);
    storage.wait_registered().await;
    fleet.start_coordinator_with(&[("EMBER_FAILPOINTS", "delete_volume.snapshot_deleted")]);
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    // Its answer can be lost: the process may abort before it is sent. The database says what was recorded.
    if let Err(lost) = volumes.clone().delete_volume(cascade).await {
        assert!(matches!(lost.code(), Code::Unavailable | Code::Unknown), "refused: {lost:?}");
    }
    let crashed = fleet.coordinator.as_mut().unwrap().wait_exit(Duration::from_secs(60));
    assert!(!crashed.success(), "the coordinator aborted at the failpoint");
    assert_eq!(snapshot_statuses(&fleet, &v.id).await, ["deleting"], "one snapshot removed, one left");
    assert_eq!(usage(&fleet, "p1", "snapshots").await, 1, "the removed one's quota is back");
    assert_eq!(files(&dir).len(), 2);

    fleet.start_coordinator();
    nothing_left(&fleet, &dir, &v).await;
    drop(storage);
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}
