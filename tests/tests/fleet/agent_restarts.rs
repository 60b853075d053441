//! Work asked of an agent while it is being restarted (its process gone, its service still up) waits for it
//! and goes on as soon as it registers again, instead of failing because nothing answered: a volume create on
//! its storage agent (also one that the agent's death cut short), a backup whose backup or storage agent died
//! while making it, and restores whose backup agent refuses the connection or dies while restoring, or whose
//! storage agent dies while they write to it. The coordinator's reconcile passes are an hour apart, so it is the
//! agent's registration that resumes the work.

use ember_fleet_tests::backups::{OneSite, fill, repository_toml, sha256};
use ember_fleet_tests::volumes::{new_snapshot, new_volume, wait_backend, wait_volume};
use ember_fleet_tests::{Daemon, Fleet, wait_for};
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::time::Duration;
use tonic::transport::Channel;

/// A fleet whose services stay up for a minute without heartbeats, and whose reconcile passes are an hour apart.
fn patient_fleet() -> Fleet {
    let mut fleet = Fleet::new();
    fleet.reconcile_interval_seconds = 3600;
    fleet.service_down_seconds = 60;
    fleet.start_coordinator();
    fleet
}

/// A 1 GiB volume of `site` holding 5 MiB of data to back up, its file, and clients for volumes and backups.
async fn source_volume(
    site: &OneSite,
) -> (VolumeServiceClient<Channel>, BackupServiceClient<Channel>, Volume, std::path::PathBuf) {
    let volumes = VolumeServiceClient::new(site.fleet.admin());
    let backups = BackupServiceClient::new(site.fleet.admin());
    let source = new_volume(&volumes, 1).await;
    let source_file = site.dir.join(format!("volume-{}", source.id));
    fill(&source_file, 2 << 20, 41, 5 << 20);
    (volumes, backups, source, source_file)
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

/// A clone of a snapshot can only be made where the snapshot is, so it has no other pool to go to. Its storage
/// agent dying in the middle of the call (the connection cut, not refused) leaves the clone waiting for the agent,
/// not in error; the restarted agent makes it, whole.
#[tokio::test]
async fn a_clone_whose_storage_agent_dies_mid_call_waits_for_it_and_is_whole() {
    let fleet = patient_fleet();
    let (backend, dir) = fleet.file_backend("file1", "");
    let mut storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let source = new_volume(&volumes, 1).await;
    let source_file = dir.join(format!("volume-{}", source.id));
    fill(&source_file, 1 << 20, 17, 3 << 20);
    let snapshot = new_snapshot(&SnapshotServiceClient::new(fleet.admin()), &source.id).await;
    fill(&source_file, 1 << 20, 18, 3 << 20); // the volume moves on; the clone is of the snapshot

    let mut dying = storage1_dying_at(&fleet, &backend, &mut storage, "storage.abort_in_create_volume").await;
    let clone = CreateVolumeRequest { size_gb: 1, snapshot_id: snapshot.id.clone(), ..Default::default() };
    let v = volumes.clone().create_volume(clone).await.unwrap().into_inner();
    assert!(!dying.wait_exit(Duration::from_secs(60)).success(), "the agent died in the create");
    fleet.wait_operation_paused("the clone to wait for its storage agent").await;
    let waiting = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!(waiting.status, "creating", "{waiting:?}");
    assert!(waiting.status_reason.contains("waiting for storage1@file1"), "{waiting:?}");

    let _storage = fleet.start_agent("storage", "storage1", &backend);
    let built = wait_volume(&volumes, &v.id, "available").await;
    assert_eq!(built.status_reason, "", "{built:?}");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
    let snapshot_sha = sha256(&dir.join(format!("snapshot-{}", snapshot.id)));
    assert_eq!(sha256(&dir.join(format!("volume-{}", v.id))), snapshot_sha, "the clone holds the snapshot's data");
}

/// A backup whose agent is killed mid-backup (the call cut short) waits for the agent while its service is up,
/// and the restarted agent makes it from the start: it verifies, and restores whole.
#[tokio::test]
async fn a_backup_whose_agent_dies_mid_backup_is_made_once_the_agent_is_back() {
    let site = OneSite::start_on(patient_fleet(), &[("EMBER_FAILPOINTS", "backup.stage_chunk")]).await;
    let (volumes, backups, source, source_file) = source_volume(&site).await;
    let OneSite { fleet, dir, repo, storage: _storage, backup1: mut dying, .. } = site;
    let create = CreateBackupRequest { volume_id: source.id.clone(), ..Default::default() };
    let b = backups.clone().create_backup(create).await.unwrap().into_inner();
    assert!(!dying.wait_exit(Duration::from_secs(60)).success(), "the agent died staging a chunk");
    fleet.wait_operation_paused("the backup to wait for its agent").await;
    let get = GetBackupRequest { id: b.id.clone() };
    assert_eq!(backups.clone().get_backup(get.clone()).await.unwrap().into_inner().status, "creating");

    let _backup1 = fleet.start_agent("backup", "backup1", &repository_toml(&repo));
    let made = ember_fleet_tests::backups::wait_backup_settled(&backups, &b.id).await;
    assert_eq!((made.status.as_str(), made.status_reason.as_str()), ("available", ""), "{made:?}");
    let verified = backups.clone().verify_backup(VerifyBackupRequest { id: b.id.clone() }).await.unwrap().into_inner();
    let whole = verified.missing_chunks.is_empty() && verified.corrupt_chunks.is_empty();
    assert!(whole && verified.chunks_checked > 0, "{verified:?}");
    let restore = RestoreBackupRequest { backup_id: b.id.clone(), ..Default::default() };
    let restored = backups.clone().restore_backup(restore).await.unwrap().into_inner();
    wait_volume(&volumes, &restored.volume_id, "available").await;
    let v = volumes.clone().get_volume(GetVolumeRequest { id: source.id.clone() }).await.unwrap().into_inner();
    assert_eq!(v.status, "available", "the volume is free again: {v:?}");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
    assert_eq!(sha256(&dir.join(format!("volume-{}", restored.volume_id))), sha256(&source_file), "not whole");
}

/// A backup whose storage agent dies while the backup agent reads the volume from it (that stream cut short)
/// waits for the storage agent while its service is up, and is made from the start once it is back.
#[tokio::test]
async fn a_backup_whose_storage_agent_dies_mid_backup_is_made_once_the_storage_agent_is_back() {
    let site = OneSite::start_on(patient_fleet(), &[]).await;
    let (volumes, backups, source, source_file) = source_volume(&site).await;
    let OneSite { fleet, backend, dir, storage: mut storage1, backup1: _backup1, .. } = site;
    // The storage agent aborts as it sends a volume's first data.
    let mut dying = storage1_dying_at(&fleet, &backend, &mut storage1, "storage.abort_in_read_volume").await;
    let create = CreateBackupRequest { volume_id: source.id.clone(), ..Default::default() };
    let b = backups.clone().create_backup(create).await.unwrap().into_inner();
    assert!(!dying.wait_exit(Duration::from_secs(60)).success(), "the storage agent died sending data");
    fleet.wait_operation_paused("the backup to wait for its storage agent").await;
    let log = fleet.coordinator.as_ref().unwrap().log_text();
    assert!(log.contains("the storage agent at https://") && log.contains("went away mid-backup"), "{log}");
    let get = GetBackupRequest { id: b.id.clone() };
    assert_eq!(backups.clone().get_backup(get.clone()).await.unwrap().into_inner().status, "creating");

    let _storage1 = fleet.start_agent("storage", "storage1", &backend);
    let made = ember_fleet_tests::backups::wait_backup_settled(&backups, &b.id).await;
    assert_eq!((made.status.as_str(), made.status_reason.as_str()), ("available", ""), "{made:?}");
    let restore = RestoreBackupRequest { backup_id: b.id.clone(), ..Default::default() };
    let restored = backups.clone().restore_backup(restore).await.unwrap().into_inner();
    wait_volume(&volumes, &restored.volume_id, "available").await;
    let v = volumes.clone().get_volume(GetVolumeRequest { id: source.id.clone() }).await.unwrap().into_inner();
    assert_eq!(v.status, "available", "the volume is free again: {v:?}");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
    assert_eq!(sha256(&dir.join(format!("volume-{}", restored.volume_id))), sha256(&source_file), "not whole");
}

/// Volume `id` once its status reason says it waits for the backup agent `backup1`.
async fn waiting_for_backup1(volumes: &VolumeServiceClient<Channel>, id: String) -> Volume {
    waiting(volumes, id, "waiting for backup1").await
}

/// Volume `id` once its status reason contains `reason`.
async fn waiting(volumes: &VolumeServiceClient<Channel>, id: String, reason: &str) -> Volume {
    wait_for(&format!("the restore to say {reason:?}"), Duration::from_secs(60), || {
        let mut volumes = volumes.clone();
        let id = id.clone();
        async move {
            let v = volumes.get_volume(GetVolumeRequest { id }).await.ok()?.into_inner();
            v.status_reason.contains(reason).then_some(v)
        }
    })
    .await
}

/// Restores whose backup agent is down when they start, onto an existing volume and into a new one, wait with
/// the reason shown and finish, whole, once the agent is back.
#[tokio::test]
async fn restores_wait_for_their_backup_agent_to_restart_while_its_service_is_up() {
    let site = OneSite::start_on(patient_fleet(), &[]).await;
    let (volumes, backups, source, source_file) = source_volume(&site).await;
    let OneSite { fleet, dir, repo, storage: _storage, mut backup1, .. } = site;
    let b = ember_fleet_tests::backups::new_backup(&backups, &source.id).await;
    let waiting = |id: String| waiting_for_backup1(&volumes, id);

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
    // A new connection: hashing a GiB above blocks this test's runtime for seconds (more under load), and the
    // coordinator may have closed the old one for pings it did not answer meanwhile.
    let new = BackupServiceClient::new(fleet.admin()).restore_backup(restore).await.unwrap().into_inner();
    assert_eq!(waiting(new.volume_id.clone()).await.status, "creating");
    let _backup1 = fleet.start_agent("backup", "backup1", &repository_toml(&repo));
    let done = wait_volume(&volumes, &new.volume_id, "available").await;
    assert_eq!(done.status_reason, "", "{done:?}");
    assert_eq!(sha256(&dir.join(format!("volume-{}", new.volume_id))), sha256(&source_file), "not whole");
    let b = ember_fleet_tests::backups::wait_backup_settled(&backups, &b.id).await;
    assert_eq!(b.status, "available", "the backup is still held: {b:?}");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// Restores whose backup agent dies while writing them (the call cut short), onto an existing volume and into a
/// new one, wait for the agent while its service is up; the restarted agent writes the whole backup again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_whose_backup_agent_dies_mid_restore_finish_whole_once_the_agent_is_back() {
    // The agent aborts as it reads a restore's second chunk.
    let dies_restoring = [("EMBER_FAILPOINTS", "backup.restore_chunk")];
    let site = OneSite::start_on(patient_fleet(), &dies_restoring).await;
    let (volumes, backups, source, source_file) = source_volume(&site).await;
    fill(&source_file, 9 << 20, 42, 1 << 20); // a third chunk, past a gap
    let OneSite { fleet, dir, repo, storage: _storage, backup1: mut dying, .. } = site;
    let b = ember_fleet_tests::backups::new_backup(&backups, &source.id).await;

    let existing = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", existing.id)), 0, 7, 12 << 20); // what the restore must overwrite
    let onto = RestoreBackupRequest { backup_id: b.id.clone(), volume_id: existing.id.clone(), ..Default::default() };
    backups.clone().restore_backup(onto).await.unwrap();
    assert!(!dying.wait_exit(Duration::from_secs(60)).success(), "the agent died restoring");
    assert_eq!(waiting_for_backup1(&volumes, existing.id.clone()).await.status, "restoring-backup");
    let mut backup1 = fleet.start_agent("backup", "backup1", &repository_toml(&repo));
    let done = wait_volume(&volumes, &existing.id, "available").await;
    assert_eq!(done.status_reason, "", "{done:?}");

    backup1.kill();
    let mut dying = fleet.start_agent_with("backup", "backup1", &repository_toml(&repo), &dies_restoring);
    dying.wait_registered().await;
    let restore = RestoreBackupRequest { backup_id: b.id.clone(), ..Default::default() };
    let new = backups.clone().restore_backup(restore).await.unwrap().into_inner();
    assert!(!dying.wait_exit(Duration::from_secs(60)).success(), "the agent died restoring");
    assert_eq!(waiting_for_backup1(&volumes, new.volume_id.clone()).await.status, "creating");
    let _backup1 = fleet.start_agent("backup", "backup1", &repository_toml(&repo));
    let done = wait_volume(&volumes, &new.volume_id, "available").await;
    assert_eq!(done.status_reason, "", "{done:?}");

    restored_whole(&fleet, &backups, &b.id, &source_file, &dir, [&existing.id, &new.volume_id]).await;
}

/// Restores whose storage agent dies while they write to it (the backup agent's stream to it cut short), onto an
/// existing volume and into a new one, wait for it, saying so, while its service is up; once it is back the backup
/// agent writes the whole backup again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_whose_storage_agent_dies_mid_restore_finish_whole_once_it_is_back() {
    let site = OneSite::start_on(patient_fleet(), &[]).await;
    let (volumes, backups, source, source_file) = source_volume(&site).await;
    fill(&source_file, 9 << 20, 42, 1 << 20); // a third chunk, past a gap
    let OneSite { fleet, backend, dir, storage: mut storage1, backup1: _backup1, .. } = site;
    let b = ember_fleet_tests::backups::new_backup(&backups, &source.id).await;
    let existing = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", existing.id)), 0, 7, 12 << 20); // what the restore must overwrite
    // The storage agent aborts as it receives a restore's first data.
    let dies_writing = "storage.abort_in_write_volume";
    let gone = "went away mid-restore";

    let mut dying = storage1_dying_at(&fleet, &backend, &mut storage1, dies_writing).await;
    let onto = RestoreBackupRequest { backup_id: b.id.clone(), volume_id: existing.id.clone(), ..Default::default() };
    backups.clone().restore_backup(onto).await.unwrap();
    assert!(!dying.wait_exit(Duration::from_secs(60)).success(), "the storage agent died in the restore");
    let held = waiting(&volumes, existing.id.clone(), gone).await;
    assert_eq!(held.status, "restoring-backup", "{held:?}");
    assert!(held.status_reason.contains("waiting for backup1: the storage agent at https://"), "{held:?}");
    let mut storage1 = fleet.start_agent("storage", "storage1", &backend);
    let done = wait_volume(&volumes, &existing.id, "available").await;
    assert_eq!(done.status_reason, "", "{done:?}");

    let mut dying = storage1_dying_at(&fleet, &backend, &mut storage1, dies_writing).await;
    let restore = RestoreBackupRequest { backup_id: b.id.clone(), ..Default::default() };
    let new = backups.clone().restore_backup(restore).await.unwrap().into_inner();
    assert!(!dying.wait_exit(Duration::from_secs(60)).success(), "the storage agent died in the restore");
    assert_eq!(waiting(&volumes, new.volume_id.clone(), gone).await.status, "creating");
    let _storage1 = fleet.start_agent("storage", "storage1", &backend);
    let done = wait_volume(&volumes, &new.volume_id, "available").await;
    assert_eq!(done.status_reason, "", "{done:?}");

    restored_whole(&fleet, &backups, &b.id, &source_file, &dir, [&existing.id, &new.volume_id]).await;
}

/// The closing checks of a test whose restores into `volume_ids` (of the file backend in `dir`) were cut short and
/// redone: each volume holds the data of `source_file`, the backup is free again, and quota usage is exact.
async fn restored_whole(
    fleet: &Fleet,
    backups: &BackupServiceClient<Channel>,
    backup_id: &str,
    source_file: &std::path::Path,
    dir: &std::path::Path,
    volume_ids: [&str; 2],
) {
    let b = ember_fleet_tests::backups::wait_backup_settled(backups, backup_id).await;
    assert_eq!(b.status, "available", "the backup is still held: {b:?}");
    ember_fleet_tests::volumes::assert_usage_exact(fleet).await;
    let whole = sha256(source_file);
    for id in volume_ids {
        assert_eq!(sha256(&dir.join(format!("volume-{id}"))), whole, "volume {id} is not whole");
    }
}

/// Replaces storage agent `storage1` (the process `running`) with one that aborts at failpoint `point`, once it
/// has registered.
async fn storage1_dying_at(fleet: &Fleet, backend: &str, running: &mut Daemon, point: &str) -> Daemon {
    running.kill();
    let dying = fleet.start_agent_with("storage", "storage1", backend, &[("EMBER_FAILPOINTS", point)]);
    dying.wait_registered().await;
    dying
}
