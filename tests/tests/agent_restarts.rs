//! Work asked of an agent while it is being restarted (its process gone, its service still up) waits for it
//! and goes on as soon as it registers again, instead of failing because nothing answered: a volume create on
//! its storage agent, and restores whose backup agent refuses the connection. The coordinator's reconcile
//! passes are an hour apart, so it is the agent's registration that resumes the work.

use ember_fleet_tests::backups::{fill, repository_toml, sha256};
use ember_fleet_tests::volumes::{new_volume, wait_backend, wait_volume};
use ember_fleet_tests::{Fleet, wait_for};
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::time::Duration;

/// A fleet whose services stay up for a minute without heartbeats, and whose reconcile passes are an hour apart.
fn patient_fleet() -> Fleet {
    let mut fleet = Fleet::new();
    fleet.reconcile_interval_seconds = 3600;
    fleet.service_down_seconds = 60;
    fleet.start_coordinator();
    fleet
}

/// A create whose storage agent is restarting (its service still up) waits for it, rather than failing when no
/// other pool can take the volume: the agent builds the volume as soon as it registers again.
#[tokio::test]
async fn a_create_waits_for_its_storage_agent_to_restart_while_its_service_is_up() {
    let fleet = patient_fleet();
    let (backend, dir) = fleet.file_backend("file1", "");
    let mut storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;

    storage.kill();
    let volumes = VolumeServiceClient::new(fleet.admin());
    let create = CreateVolumeRequest { size_gb: 1, ..Default::default() };
    let v = volumes.clone().create_volume(create).await.unwrap().into_inner();
    fleet.wait_operation_paused("the create to wait for its storage agent").await;
    let waiting = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!(waiting.status, "creating", "{waiting:?}");
    assert_eq!(waiting.host, "storage1@file1", "{waiting:?}");
    assert!(waiting.status_reason.contains("waiting for storage1@file1"), "{waiting:?}");

    let _storage = fleet.start_agent("storage", "storage1", &backend);
    let built = wait_volume(&volumes, &v.id, "available").await;
    assert_eq!((built.host.as_str(), built.status_reason.as_str()), ("storage1@file1", ""));
    let file = std::fs::metadata(dir.join(format!("volume-{}", v.id))).expect("the volume's file");
    assert_eq!(file.len(), 1 << 30);
    assert_eq!(fleet.operation("create_volume", &v.id).await.map(|o| o.0).as_deref(), Some("done"));
}

/// Restores whose backup agent is down when they start, onto an existing volume and into a new one, wait with
/// the reason shown and finish, whole, once the agent is back.
#[tokio::test]
async fn restores_wait_for_their_backup_agent_to_restart_while_its_service_is_up() {
    let fleet = patient_fleet();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    let repo = fleet.subdir("repo1");
    let mut backup1 = fleet.start_agent("backup", "backup1", &repository_toml(&repo));
    wait_backend(&fleet, "storage1@file1").await;
    wait_backend(&fleet, "backup1").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let backups = BackupServiceClient::new(fleet.admin());
    let source = new_volume(&volumes, 1).await;
    let source_file = dir.join(format!("volume-{}", source.id));
    fill(&source_file, 3 << 20, 31, 2 << 20);
    let b = ember_fleet_tests::backups::new_backup(&backups, &source.id).await;
    let waiting = |id: String| {
        let volumes = volumes.clone();
        async move {
            wait_for("the restore to wait for backup1", Duration::from_secs(30), || {
                let mut volumes = volumes.clone();
                let id = id.clone();
                async move {
                    let v = volumes.get_volume(GetVolumeRequest { id }).await.ok()?.into_inner();
                    v.status_reason.contains("waiting for backup1").then_some(v)
                }
            })
            .await
        }
    };

    let existing = new_volume(&volumes, 1).await;
    backup1.kill();
    let onto = RestoreBackupRequest { backup_id: b.id.clone(), volume_id: existing.id.clone(), ..Default::default() };
    backups.clone().restore_backup(onto).await.unwrap();
    assert_eq!(waiting(existing.id.clone()).await.status, "restoring-backup");
    let backup1 = fleet.start_agent("backup", "backup1", &repository_toml(&repo));
    let done = wait_volume(&volumes, &existing.id, "available").await;
    assert_eq!(done.status_reason, "", "{done:?}");
    assert_eq!(sha256(&dir.join(format!("volume-{}", existing.id))), sha256(&source_file), "not whole");

    let mut backup1 = backup1;
    backup1.kill();
    let restore = RestoreBackupRequest { backup_id: b.id.clone(), ..Default::default() };
    let new = backups.clone().restore_backup(restore).await.unwrap().into_inner();
    assert_eq!(waiting(new.volume_id.clone()).await.status, "creating");
    let _backup1 = fleet.start_agent("backup", "backup1", &repository_toml(&repo));
    let done = wait_volume(&volumes, &new.volume_id, "available").await;
    assert_eq!(done.status_reason, "", "{done:?}");
    assert_eq!(sha256(&dir.join(format!("volume-{}", new.volume_id))), sha256(&source_file), "not whole");
    let b = ember_fleet_tests::backups::wait_backup_settled(&backups, &b.id).await;
    assert_eq!(b.status, "available", "the backup is still held: {b:?}");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}
