//! Crash safety: the coordinator is killed (it aborts at a named failpoint, like a SIGKILL) at each step of
//! create and delete; after a restart every volume converges, quota is exact and no backend holds an orphan.
//! The orphan sweeper removes only what this coordinator made: a lost database destroys no volume.

use ember_fleet_tests::volumes::{
    db_state, files_in, new_snapshot, new_volume, read_at, usage, wait_backend, wait_gone, wait_left_alone,
    wait_settled, wait_snapshot_gone, wait_volume,
};
use ember_fleet_tests::{Fleet, wait_for};
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;
use tonic::Code;

#[tokio::test]
async fn create_and_delete_converge_after_a_crash_at_every_step() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;

    for point in ["create_volume.accepted", "create_volume.scheduled", "create_volume.created"] {
        fleet.start_coordinator_with(&[("EMBER_FAILPOINTS", point)]);
        let mut client = VolumeServiceClient::new(fleet.admin());
        let accepted = client
            .create_volume(CreateVolumeRequest {
                size_gb: 1,
                name: point.into(),
                project: "crash".into(),
                ..Default::default()
            })
            .await;
        let status = fleet.coordinator.as_mut().unwrap().wait_exit(Duration::from_secs(30));
        assert!(!status.success(), "{point}: the coordinator should have crashed");
        // At `accepted` the crash comes before the reply; at later points the reply was sent.
        let id = match accepted {
            Ok(v) => v.into_inner().id,
            Err(_) => {
                let (rows, _, _) = db_state(&fleet, "crash").await;
                rows.iter().find(|r| r.1 == "creating").expect("the accepted volume row").0.clone()
            }
        };
        fleet.start_coordinator();
        let client = VolumeServiceClient::new(fleet.admin());
        let v = wait_settled(&client, &id).await;
        assert_eq!(v.status, "available", "{point}: {v:?}");
        let (rows, volumes, gigabytes) = db_state(&fleet, "crash").await;
        assert_eq!(volumes, rows.len() as i64, "{point}: quota counts what exists");
        assert_eq!(gigabytes, rows.iter().map(|r| r.2).sum::<i64>(), "{point}");
        let ids: std::collections::BTreeSet<_> = rows.iter().map(|r| r.0.clone()).collect();
        assert_eq!(files_in(&dir), ids, "{point}: files equal records");
    }

    let ids: Vec<String> = db_state(&fleet, "crash").await.0.into_iter().map(|r| r.0).collect();
    for (point, id) in ["delete_volume.accepted", "delete_volume.deleted"].into_iter().zip(&ids) {
        fleet.start_coordinator_with(&[("EMBER_FAILPOINTS", point)]);
        let mut client = VolumeServiceClient::new(fleet.admin());
        let _ = client.delete_volume(DeleteVolumeRequest { id: id.clone(), ..Default::default() }).await;
        let status = fleet.coordinator.as_mut().unwrap().wait_exit(Duration::from_secs(30));
        assert!(!status.success(), "{point}: the coordinator should have crashed");
        fleet.start_coordinator();
        let client = VolumeServiceClient::new(fleet.admin());
        wait_gone(&client, id).await;
        let (rows, volumes, gigabytes) = db_state(&fleet, "crash").await;
        assert_eq!(volumes, rows.len() as i64, "{point}");
        assert_eq!(gigabytes, rows.iter().map(|r| r.2).sum::<i64>(), "{point}");
        assert!(!files_in(&dir).contains(id), "{point}: the file is gone");
    }
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

#[tokio::test]
async fn the_sweeper_removes_only_files_this_coordinator_made_and_no_longer_places() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let client = VolumeServiceClient::new(fleet.admin());
    // A volume this coordinator made and deleted, back on the backend (say, the agent's disk restored from an
    // old copy): an orphan it knows, removed.
    let gone = new_volume(&client, 1).await;
    client.clone().delete_volume(DeleteVolumeRequest { id: gone.id.clone(), ..Default::default() }).await.unwrap();
    wait_gone(&client, &gone.id).await;
    let known = dir.join(format!("volume-{}", gone.id));
    std::fs::write(&known, b"brought back").unwrap();
    // A file it never made (another coordinator's, or made before its database was replaced): left alone.
    let stranger = "0a0a0a0a-1b1b-4c2c-8d3d-4e4e4e4e4e4e";
    std::fs::write(dir.join(format!("volume-{stranger}")), b"someone's data").unwrap();
    wait_for("the orphan sweep", Duration::from_secs(30), || async { (!known.exists()).then_some(()) }).await;
    wait_left_alone(&fleet, stranger).await;
    assert_eq!(std::fs::read(dir.join(format!("volume-{stranger}"))).unwrap(), b"someone's data");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

#[tokio::test]
async fn a_coordinator_started_on_an_empty_database_destroys_no_volume_it_finds_and_an_admin_adopts_them() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let v = new_volume(&VolumeServiceClient::new(fleet.admin()), 1).await;
    let file = dir.join(format!("volume-{}", v.id));
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().write_all_at(b"precious", 4096).unwrap();
    let snap = new_snapshot(&SnapshotServiceClient::new(fleet.admin()), &v.id).await;
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().write_all_at(b"later...", 4096).unwrap();

    // The database is lost, and the coordinator starts again on an empty one; the agent registers with it.
    fleet.coordinator.as_mut().unwrap().kill();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", fleet.database().display()));
    }
    fleet.start_coordinator();
    wait_backend(&fleet, "storage1@file1").await;
    wait_left_alone(&fleet, &v.id).await;
    wait_left_alone(&fleet, &snap.id).await;
    assert_eq!(&read_at(&file, 4096), b"later...", "the volume the new database does not know is intact");
    let snap_file = dir.join(format!("snapshot-{}", snap.id));
    assert_eq!(&read_at(&snap_file, 4096), b"precious", "and so is its snapshot");

    // What the pool holds that the coordinator does not know, as Cinder's manageable-list shows it.
    let (ok, out, err) = fleet.cli(&["--json", "volume", "manageable", "storage1@file1"]);
    assert!(ok, "{out}\n{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let expect = |id: &str| serde_json::json!([{"id": id, "size_gb": 1, "safe_to_manage": true, "reason_not_safe": "", "volume_id": "", "foreign": false}]);
    assert_eq!((&listed["volumes"], &listed["snapshots"]), (&expect(&v.id), &expect(&snap.id)), "{listed}");
    let err = VolumeServiceClient::new(fleet.member("alice", "p1"))
        .list_manageable(ListManageableRequest { pool: "storage1@file1".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // An admin adopts it back (Cinder's manage); bad requests are refused, naming the problem, changing nothing.
    let manage = |pool: &str, id: &str| ManageVolumeRequest {
        pool: pool.into(),
        id: id.into(),
        project: "p1".into(),
        ..Default::default()
    };
    let member = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let err = member.clone().manage_volume(manage("storage1@file1", &v.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let admin = VolumeServiceClient::new(fleet.admin());
    let err = admin.clone().manage_volume(manage("storage1", &v.id)).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().starts_with("pool: "), "{err:?}");
    let nowhere = "0b0b0b0b-1c1c-4d2d-8e3e-4f4f4f4f4f4f";
    let err = admin.clone().manage_volume(manage("storage1@file1", nowhere)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(db_state(&fleet, "p1").await, (vec![], 0, 0), "nothing was recorded");
    let (ok, out, err) =
        fleet.cli(&["--json", "volume", "manage", "storage1@file1", &v.id, "--project", "p1", "--name", "back"]);
    assert!(ok, "{out}\n{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((shown[0]["id"].as_str(), shown[0]["status"].as_str()), (Some(v.id.as_str()), Some("available")));
    let adopted = member.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!((adopted.size_gb, adopted.name.as_str(), adopted.project.as_str()), (1, "back", "p1"), "{adopted:?}");
    assert_eq!(db_state(&fleet, "p1").await, (vec![(v.id.clone(), "available".into(), 1)], 1, 1), "counted once");
    let err = admin.clone().manage_volume(manage("storage1@file1", &v.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let listed = VolumeServiceClient::new(fleet.admin())
        .list_manageable(ListManageableRequest { pool: "storage1@file1".into() })
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<_> = listed.volumes.iter().chain(&listed.snapshots).map(|m| m.id.as_str()).collect();
    assert_eq!(listed, [snap.id.as_str()], "the adopted volume is no longer listed");
    adopt_the_snapshot(&fleet, &v.id, &snap.id, &snap_file).await;

    // It is the project's volume like any other: its owner deletes it, and the file goes.
    member.clone().delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() }).await.unwrap();
    wait_gone(&member, &v.id).await;
    assert!(!file.exists(), "the adopted volume's file is removed by its delete");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// With its volume adopted, an admin adopts the snapshot the new database did not know (Cinder's
/// snapshot-manage): it joins the volume's project and quotas, and is a snapshot like any other.
async fn adopt_the_snapshot(fleet: &Fleet, volume: &str, snap: &str, snap_file: &Path) {
    let manage = |volume: &str, id: &str| ManageSnapshotRequest {
        volume_id: volume.into(),
        id: id.into(),
        ..Default::default()
    };
    let member = SnapshotServiceClient::new(fleet.member("alice", "p1"));
    let err = member.clone().manage_snapshot(manage(volume, snap)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let admin = SnapshotServiceClient::new(fleet.admin());
    let err = admin.clone().manage_snapshot(manage(volume, "not-a-uuid")).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().starts_with("id: "), "{err:?}");
    let unknown = "0c0c0c0c-1d1d-4e2e-8f3f-4a4a4a4a4a4a";
    let err = admin.clone().manage_snapshot(manage(unknown, snap)).await.unwrap_err();
    assert!(err.code() == Code::NotFound && err.message().contains(unknown), "an unknown volume: {err:?}");
    let err = admin.clone().manage_snapshot(manage(volume, unknown)).await.unwrap_err();
    assert!(err.code() == Code::NotFound && err.message().contains("storage1@file1"), "not on its pool: {err:?}");
    assert_eq!(snapshot_usage(fleet, "p1").await, (0, 1), "nothing was recorded");

    let (ok, out, err) = fleet.cli(&["--json", "snapshot", "manage", volume, snap, "--name", "back"]);
    assert!(ok, "{out}\n{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((shown[0]["id"].as_str(), shown[0]["status"].as_str()), (Some(snap), Some("available")), "{shown}");
    let adopted = member.clone().get_snapshot(GetSnapshotRequest { id: snap.into() }).await.unwrap().into_inner();
    let facts = (adopted.volume_id.as_str(), adopted.project.as_str(), adopted.size_gb, adopted.name.as_str());
    assert_eq!(facts, (volume, "p1", 1, "back"), "{adopted:?}");
    assert_eq!(snapshot_usage(fleet, "p1").await, (1, 2), "counted once, as a snapshot and its gigabytes");
    let err = admin.clone().manage_snapshot(manage(volume, snap)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let err = volumes
        .clone()
        .delete_volume(DeleteVolumeRequest { id: volume.into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "its volume now keeps it: {err:?}");

    // A volume made from it holds its data; deleting it removes its file.
    let req = CreateVolumeRequest { size_gb: 1, snapshot_id: snap.into(), ..Default::default() };
    let copy = volumes.clone().create_volume(req).await.unwrap().into_inner();
    let copy = wait_volume(&volumes, &copy.id, "available").await;
    let copy_file = snap_file.with_file_name(format!("volume-{}", copy.id));
    assert_eq!(&read_at(&copy_file, 4096), b"precious", "the volume from the adopted snapshot");
    volumes.clone().delete_volume(DeleteVolumeRequest { id: copy.id.clone(), ..Default::default() }).await.unwrap();
    wait_gone(&volumes, &copy.id).await;
    member.clone().delete_snapshot(DeleteSnapshotRequest { id: snap.into() }).await.unwrap();
    wait_snapshot_gone(&member, snap).await;
    assert!(!snap_file.exists(), "the adopted snapshot's file is removed by its delete");
    assert_eq!(snapshot_usage(fleet, "p1").await, (0, 1), "its quota is given back");
}

/// `(snapshots, gigabytes)` in use by `project`: gigabytes count volumes and snapshots both.
async fn snapshot_usage(fleet: &Fleet, project: &str) -> (i64, i64) {
    (usage(fleet, project, "snapshots").await, usage(fleet, project, "gigabytes").await)
}

#[tokio::test]
async fn a_record_whose_data_the_backend_no_longer_holds_is_reported_and_left_as_it_is() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let (v, kept) = (new_volume(&volumes, 1).await, new_volume(&volumes, 1).await);
    let snap = new_snapshot(&SnapshotServiceClient::new(fleet.admin()), &v.id).await;
    // As a database restored from an older copy sees it: the data went, the records stayed.
    std::fs::remove_file(dir.join(format!("volume-{}", v.id))).unwrap();
    std::fs::remove_file(dir.join(format!("snapshot-{}", snap.id))).unwrap();
    let coordinator = fleet.coordinator.as_ref().unwrap();
    let reported = |id: &str| {
        let id = id.to_string();
        move || {
            let log = coordinator.log_text();
            let found = log.lines().any(|l| l.contains(&id) && l.contains("the backend does not hold it"));
            async move { found.then_some(()) }
        }
    };
    wait_for("the volume reported", Duration::from_secs(30), reported(&v.id)).await;
    wait_for("the snapshot reported", Duration::from_secs(30), reported(&snap.id)).await;
    let log = coordinator.log_text();
    assert!(!log.contains(&format!("{} is recorded", kept.id)), "a volume whose file is there is not reported");
    assert_eq!(log.matches(&format!("volume {} is recorded", v.id)).count(), 1, "reported once:\n{log}");
    let after = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!(after.status, "available", "the record is left for an operator to decide on");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}
