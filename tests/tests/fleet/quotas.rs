//! Checking recorded quota usage against what exists (`ember quota check`, Cinder's `cinder-manage quota
//! check|sync`): a record made wrong by hand is found, named, and corrected with `--fix`; members may not.

use ember_fleet_tests::Fleet;
use ember_fleet_tests::volumes::{new_snapshot, new_volume, usage, wait_backend};
use ember_proto::v1::quota_service_client::QuotaServiceClient;
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use tonic::Code;

#[tokio::test]
async fn a_usage_record_that_differs_from_what_exists_is_found_and_corrected() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let v = new_volume(&volumes, 2).await;
    new_snapshot(&SnapshotServiceClient::new(fleet.member("alice", "p1")), &v.id).await;
    new_volume(&VolumeServiceClient::new(fleet.member("bob", "p2")), 1).await;

    let (ok, out, err) = fleet.cli(&["quota", "check"]);
    assert!(ok && out.contains("usage matches what exists (2 project(s) checked)"), "{out}\n{err}");

    // Records made wrong behind the coordinator's back (as a bug, or a hand edit, would).
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(fleet.database());
    let db = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::query("UPDATE quota_usages SET in_use = 7 WHERE project = 'p1' AND resource = 'gigabytes'")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("DELETE FROM quota_usages WHERE project = 'p2' AND resource = 'volumes'").execute(&db).await.unwrap();
    db.close().await;
    let (ok, out, err) = fleet.cli(&["--json", "quota", "check"]);
    assert!(ok, "{err}");
    let found: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        found["drifts"],
        serde_json::json!([
            {"project": "p1", "resource": "gigabytes", "recorded": 7, "counted": 4},
            {"project": "p2", "resource": "volumes", "recorded": 0, "counted": 1},
        ]),
        "{found}"
    );
    assert_eq!(found["fixed"], false);
    assert_eq!(usage(&fleet, "p1", "gigabytes").await, 7, "a check alone changes nothing");

    // Members may not look; one project at a time; then corrected.
    let err = QuotaServiceClient::new(fleet.member("alice", "p1"))
        .check_quota_usage(CheckQuotaUsageRequest { project: "p1".into(), fix: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(usage(&fleet, "p1", "gigabytes").await, 7);
    let (ok, out, err) = fleet.cli(&["quota", "check", "p2", "--fix"]);
    assert!(ok && out.contains("volumes") && out.contains("corrected"), "{out}\n{err}");
    assert!(!out.contains("gigabytes"), "only p2: {out}");
    assert_eq!(usage(&fleet, "p2", "volumes").await, 1);
    assert_eq!(usage(&fleet, "p1", "gigabytes").await, 7, "p1 was not asked for");
    let (ok, out, err) = fleet.cli(&["quota", "check", "--fix"]);
    assert!(ok && out.contains("corrected"), "{out}\n{err}");
    assert_eq!(usage(&fleet, "p1", "gigabytes").await, 4, "2 GiB volume + its 2 GiB snapshot");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;

    // The corrected record is what the next change builds on.
    let err =
        volumes.clone().create_volume(CreateVolumeRequest { size_gb: 997, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "4 + 997 is over the default 1000: {err:?}");
    volumes.clone().create_volume(CreateVolumeRequest { size_gb: 996, ..Default::default() }).await.unwrap();
}
