//! A peer that stops answering without closing its sockets (a frozen process, a host gone from the network):
//! the calls to it fail within the configured peer timeout instead of holding their operation forever, and the
//! fleet recovers when the peer comes back.

use ember_fleet_tests::backups::{OneSite, fill, wait_backup_settled, wait_paused};
use ember_fleet_tests::volumes::{files_in, new_volume, wait_backend, wait_volume};
use ember_fleet_tests::{Fleet, wait_for};
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::time::Duration;

/// Peer timeout for these tests, in seconds (`EMBER_PEER_TIMEOUT`); the default is 20.
const PEER_TIMEOUT: &str = "2";

#[tokio::test]
async fn a_create_on_a_storage_agent_that_freezes_mid_call_ends_in_error_and_leaves_nothing() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator_with(&[("EMBER_PEER_TIMEOUT", PEER_TIMEOUT)]);
    let (backend, dir) = fleet.file_backend("file1", "");
    let storage = fleet.start_agent_with(
        "storage",
        "storage1",
        &backend,
        &[("EMBER_FAILPOINTS", "storage.freeze_in_create_volume")],
    );
    wait_backend(&fleet, "storage1@file1").await;
    let volumes = VolumeServiceClient::new(fleet.admin());

    // The agent stops itself inside the create, after the coordinator's call reached it.
    let frozen = volumes
        .clone()
        .create_volume(CreateVolumeRequest { size_gb: 1, name: "frozen".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    wait_for("the storage agent to freeze", Duration::from_secs(30), || async { storage.is_stopped().then_some(()) })
        .await;
    let failed = wait_volume(&volumes, &frozen.id, "error").await;
    assert!(
        failed.status_reason.contains("after 1 failed attempt(s): storage1@file1"),
        "the create reached the agent and failed there: {failed:?}"
    );
    assert!(storage.is_stopped(), "the agent was still frozen when the coordinator gave up");

    // The agent wakes up and finishes the create nobody waits for any more: the orphan sweeper removes
    // what it made, and the fleet serves again.
    storage.signal("CONT");
    wait_backend(&fleet, "storage1@file1").await;
    let fresh = new_volume(&volumes, 1).await;
    wait_for("the frozen create's file to be swept", Duration::from_secs(60), || async {
        (files_in(&dir) == [fresh.id.clone()].into()).then_some(())
    })
    .await;
    volumes.clone().delete_volume(DeleteVolumeRequest { id: frozen.id.clone(), ..Default::default() }).await.unwrap();
}

#[tokio::test]
async fn a_backup_whose_storage_agent_freezes_mid_stream_ends_in_error_and_the_volume_is_usable() {
    let OneSite { fleet, backend: _, dir, repo, storage, backup1: agent } =
        OneSite::start_with(&[("EMBER_FAILPOINTS", "backup.pause_stage_chunk"), ("EMBER_PEER_TIMEOUT", PEER_TIMEOUT)])
            .await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    // More than the stream's 16 MiB flow-control window and the agent's queue hold: the backup needs data
    // the frozen agent never sends.
    fill(&dir.join(format!("volume-{}", v.id)), 0, 21, 64 << 20);
    let backups = BackupServiceClient::new(fleet.admin());
    let b = backups
        .clone()
        .create_backup(CreateBackupRequest { volume_id: v.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    wait_paused(&agent, "the backup to be mid-way").await;
    storage.signal("STOP");
    let b = wait_backup_settled(&backups, &b.id).await;
    assert_eq!(b.status, "error", "{b:?}");
    assert!(b.status_reason.starts_with("backup failed"), "{b:?}");
    assert!(!repo.join("backups").join(&b.id).exists(), "nothing half-written is published");
    assert!(storage.is_stopped(), "the storage agent was still frozen when the backup agent gave up");
    let v = wait_volume(&volumes, &v.id, "available").await;
    assert!(v.status_reason.is_empty(), "{v:?}");

    // Back again, the same volume backs up.
    storage.signal("CONT");
    wait_backend(&fleet, "storage1@file1").await;
    let again = backups
        .clone()
        .create_backup(CreateBackupRequest { volume_id: v.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let again = wait_backup_settled(&backups, &again.id).await;
    assert_eq!(again.status, "available", "{again:?}");
    let report =
        backups.clone().verify_backup(VerifyBackupRequest { id: again.id.clone() }).await.unwrap().into_inner();
    assert!(
        report.chunks_checked == 64 && report.missing_chunks.is_empty() && report.corrupt_chunks.is_empty(),
        "all 64 MiB of data are in it, intact: {report:?}"
    );
}
