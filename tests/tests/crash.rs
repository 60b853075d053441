//! Crash safety: the coordinator is killed (it aborts at a named failpoint, like a SIGKILL) at each step of
//! create and delete; after a restart every volume converges, quota is exact and no backend holds an orphan.

use ember_fleet_tests::volumes::{db_state, files_in, wait_backend, wait_gone, wait_settled};
use ember_fleet_tests::{Fleet, wait_for};
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::time::Duration;

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
        let _ = client.delete_volume(DeleteVolumeRequest { id: id.clone() }).await;
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
}

#[tokio::test]
async fn the_sweeper_removes_a_file_the_coordinator_does_not_place() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    // A file left by a create whose record says it lives elsewhere (or nowhere).
    let stray = dir.join("volume-0a0a0a0a-1b1b-4c2c-8d3d-4e4e4e4e4e4e");
    std::fs::write(&stray, b"left behind").unwrap();
    wait_for("the orphan sweep", Duration::from_secs(30), || async { (!stray.exists()).then_some(()) }).await;
}
