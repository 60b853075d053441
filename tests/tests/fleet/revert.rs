//! Reverting a volume to one of its snapshots, in place (Cinder's revert to snapshot): the volume reads as the
//! snapshot again, zeros where the snapshot had none of the data written since and past its size; a coordinator
//! crash resumes the revert; a revert the agent fails leaves the volume `error` with the reason, and a new revert
//! puts it right.

use ember_fleet_tests::Fleet;
use ember_fleet_tests::volumes::{new_snapshot, new_volume, read_at, wait_backend, wait_volume};
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;
use tonic::Code;

const MIB: u64 = 1 << 20;

fn write_at(file: &Path, offset: u64, data: &[u8; 8]) {
    std::fs::OpenOptions::new().write(true).open(file).unwrap().write_all_at(data, offset).unwrap();
}

async fn statuses(fleet: &Fleet, volume: &str, snapshot: &str) -> (String, String) {
    let db = fleet.db().await;
    let v = sqlx::query_scalar("SELECT status FROM volumes WHERE id = ?").bind(volume).fetch_one(&db).await.unwrap();
    let s =
        sqlx::query_scalar("SELECT status FROM snapshots WHERE id = ?").bind(snapshot).fetch_one(&db).await.unwrap();
    (v, s)
}

#[tokio::test]
async fn a_volume_reverts_to_its_snapshot_across_a_crash_and_after_a_failure() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let snapshots = SnapshotServiceClient::new(fleet.member("alice", "p1"));
    let v = new_volume(&volumes, 1).await;
    let file = dir.join(format!("volume-{}", v.id));
    write_at(&file, 4096, b"before-1");
    write_at(&file, 512 * MIB, b"before-2");
    let snap = new_snapshot(&snapshots, &v.id).await;
    let other = new_volume(&volumes, 1).await;
    let others_snap = new_snapshot(&snapshots, &other.id).await;

    // Written since: over the snapshot's data, where it had none, and past its size after an extend.
    write_at(&file, 4096, b"after--1");
    write_at(&file, 700 * MIB, b"after--2");
    let extend = ExtendVolumeRequest { id: v.id.clone(), new_size_gb: 2 };
    volumes.clone().extend_volume(extend).await.unwrap();
    wait_volume(&volumes, &v.id, "available").await;
    write_at(&file, 1536 * MIB, b"after--3");

    let wrong = RevertVolumeRequest { id: v.id.clone(), snapshot_id: others_snap.id.clone() };
    let err = volumes.clone().revert_volume(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("snapshot_id"), "{err:?}");

    // The coordinator dies once the revert is recorded, before the agent is asked; its restart does it.
    fleet.start_coordinator_with(&[("EMBER_FAILPOINTS", "revert_volume.recorded")]);
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let req = RevertVolumeRequest { id: v.id.clone(), snapshot_id: snap.id.clone() };
    // Its answer can be lost: the process may abort before it is sent. The database says what was recorded.
    if let Ok(reverting) = volumes.clone().revert_volume(req.clone()).await {
        assert_eq!(reverting.into_inner().status, "reverting");
    }
    let crashed = fleet.coordinator.as_mut().unwrap().wait_exit(Duration::from_secs(60));
    assert!(!crashed.success(), "the coordinator aborted at the failpoint");
    assert_eq!(statuses(&fleet, &v.id, &snap.id).await, ("reverting".into(), "restoring".into()));
    assert_eq!(&read_at(&file, 4096), b"after--1", "nothing was reverted before the crash");
    fleet.start_coordinator();
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let reverted = wait_volume(&volumes, &v.id, "available").await;
    assert_eq!(reverted.size_gb, 2, "the volume keeps its size");
    assert_eq!(statuses(&fleet, &v.id, &snap.id).await, ("available".into(), "available".into()));
    assert_eq!(&read_at(&file, 4096), b"before-1");
    assert_eq!(&read_at(&file, 512 * MIB), b"before-2");
    assert_eq!(read_at(&file, 700 * MIB), [0; 8], "data written since, where the snapshot had none, is gone");
    assert_eq!(read_at(&file, 1536 * MIB), [0; 8], "past the snapshot's size the volume reads as zeros");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 << 30);

    // The agent cannot read the snapshot: the revert fails, the volume is `error` with the reason, and once
    // the snapshot is readable again a new revert puts the volume right.
    write_at(&file, 4096, b"after--4");
    let snap_file = dir.join(format!("snapshot-{}", snap.id));
    let aside = dir.join("aside");
    std::fs::rename(&snap_file, &aside).unwrap();
    std::fs::create_dir(&snap_file).unwrap();
    volumes.clone().revert_volume(req.clone()).await.unwrap();
    let failed = wait_volume(&volumes, &v.id, "error").await;
    assert!(failed.status_reason.contains("revert again"), "{failed:?}");
    assert_eq!(statuses(&fleet, &v.id, &snap.id).await, ("error".into(), "available".into()));
    std::fs::remove_dir(&snap_file).unwrap();
    std::fs::rename(&aside, &snap_file).unwrap();
    let (ok, out, err) = fleet.cli_as(
        &fleet.issue(ember_common::identity::Role::Member, "alice", Some("p1")),
        &["volume", "revert", &v.id, &snap.id, "--wait"],
    );
    assert!(ok, "{out}\n{err}");
    let fixed = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!((fixed.status.as_str(), fixed.status_reason.as_str()), ("available", ""));
    assert_eq!(&read_at(&file, 4096), b"before-1");
    assert_eq!(statuses(&fleet, &v.id, &snap.id).await, ("available".into(), "available".into()));
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}
