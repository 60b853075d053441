//! Idempotent creates of snapshots and backups (volumes: volume_rules.rs). A client that lost an answer
//! repeats its create with the same key and gets the same resource, even after the first create moved on;
//! the same key with other parameters is refused; neither repeat makes or charges anything.

use ember_fleet_tests::volumes::{new_volume, wait_backend, wait_volume};
use ember_fleet_tests::{Fleet, wait_for};
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::quota_service_client::QuotaServiceClient;
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::time::Duration;
use tonic::Code;

/// The project's quota use of `resource`.
async fn in_use(fleet: &Fleet, resource: &str) -> i64 {
    let quota = QuotaServiceClient::new(fleet.admin())
        .get_quota(GetQuotaRequest { project: "p1".into() })
        .await
        .unwrap()
        .into_inner();
    quota.items.iter().find(|i| i.resource == resource).map(|i| i.in_use + i.reserved).unwrap()
}

fn assert_conflict(err: tonic::Status) {
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().starts_with("idempotency_key:"), "{}", err.message());
}

#[tokio::test]
async fn a_snapshot_or_backup_create_repeated_with_its_key_makes_one() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let repo = fleet.subdir("repo1");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    let _backup = fleet.start_agent(
        "backup",
        "backup1",
        &format!("[[repositories]]\nname = \"repo1\"\ndirectory = \"{}\"\n", repo.display()),
    );
    wait_backend(&fleet, "storage1@file1").await;
    wait_backend(&fleet, "backup1").await;
    let channel = fleet.member("alice", "p1");
    let volumes = VolumeServiceClient::new(channel.clone());
    let v = new_volume(&volumes, 1).await;

    let snapshots = SnapshotServiceClient::new(channel.clone());
    let req = CreateSnapshotRequest {
        volume_id: v.id.clone(),
        name: "before-upgrade".into(),
        idempotency_key: "snap-job-7".into(),
        ..Default::default()
    };
    let first = snapshots.clone().create_snapshot(req.clone()).await.unwrap().into_inner();
    let again = snapshots.clone().create_snapshot(req.clone()).await.unwrap().into_inner();
    assert_eq!(first.id, again.id);
    wait_for("the snapshot", Duration::from_secs(60), || {
        let mut c = snapshots.clone();
        let id = first.id.clone();
        async move {
            (c.get_snapshot(GetSnapshotRequest { id }).await.ok()?.into_inner().status == "available").then_some(())
        }
    })
    .await;
    let later = snapshots.clone().create_snapshot(req.clone()).await.unwrap().into_inner();
    assert_eq!((later.id.as_str(), later.status.as_str()), (first.id.as_str(), "available"));
    assert_conflict(
        snapshots.clone().create_snapshot(CreateSnapshotRequest { name: "other".into(), ..req }).await.unwrap_err(),
    );
    let listed = snapshots.clone().list_snapshots(ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.snapshots.len(), 1, "{listed:?}");
    assert_eq!(in_use(&fleet, "snapshots").await, 1, "the repeats charged nothing");

    // A backup: the repeat comes while the first has the volume `backing-up`, which would refuse a new one.
    let backups = BackupServiceClient::new(channel);
    let req = CreateBackupRequest {
        volume_id: v.id.clone(),
        idempotency_key: "nightly-2026-11-26".into(),
        ..Default::default()
    };
    let first = backups.clone().create_backup(req.clone()).await.unwrap().into_inner();
    let again = backups.clone().create_backup(req.clone()).await.unwrap().into_inner();
    assert_eq!(first.id, again.id);
    wait_for("the backup", Duration::from_secs(60), || {
        let mut c = backups.clone();
        let id = first.id.clone();
        async move { (c.get_backup(GetBackupRequest { id }).await.ok()?.into_inner().status == "available").then_some(()) }
    })
    .await;
    let later = backups.clone().create_backup(req.clone()).await.unwrap().into_inner();
    assert_eq!((later.id.as_str(), later.status.as_str()), (first.id.as_str(), "available"));
    assert_eq!((later.stored_bytes, later.dedup_ratio), (0, 1.0), "an all-zero volume stores nothing: {later:?}");
    assert_conflict(
        backups.clone().create_backup(CreateBackupRequest { incremental: true, ..req.clone() }).await.unwrap_err(),
    );
    let err = backups
        .clone()
        .create_backup(CreateBackupRequest { idempotency_key: "k".repeat(256), ..req })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("idempotency_key"), "{}", err.message());
    // The CLI passes the key too; an admin repeating the project's create gets the project's backup.
    let (ok, out, err) = fleet.cli(&["--json", "backup", "create", &v.id, "--idempotency-key", "nightly-2026-11-26"]);
    assert!(ok, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown[0]["id"], first.id.as_str(), "{out}");
    // A volume restored from the backup: the repeat comes while the first holds the backup `restoring`.
    let req =
        CreateVolumeRequest { backup_id: first.id.clone(), idempotency_key: "restore-1".into(), ..Default::default() };
    let restored = volumes.clone().create_volume(req.clone()).await.unwrap().into_inner();
    let again = volumes.clone().create_volume(req).await.unwrap().into_inner();
    assert_eq!(restored.id, again.id);
    wait_volume(&volumes, &restored.id, "available").await;
    let listed = backups.clone().list_backups(ListBackupsRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.backups.len(), 1, "{listed:?}");
    assert_eq!((in_use(&fleet, "backups").await, in_use(&fleet, "backup_gigabytes").await), (1, 1));
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}
