//! Backups under faults: the backup agent killed mid-backup, garbage collection racing a running backup, and
//! an in-use volume backed up through a temporary snapshot.

use ember_fleet_tests::backups::{OneSite, fill, repository_toml, sha256, wait_down, wait_paused};
use ember_fleet_tests::libvirt::{Domain, attach_request};
use ember_fleet_tests::volumes::{new_volume, wait_backend, wait_gone, wait_volume};
use ember_fleet_tests::{Daemon, Fleet, iscsi, wait_for};
use ember_proto::v1::attachment_service_client::AttachmentServiceClient;
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::path::Path;
use std::time::Duration;
use tonic::Code;

async fn wait_backup(client: &BackupServiceClient<tonic::transport::Channel>, id: &str) -> Backup {
    wait_for(&format!("backup {id}"), Duration::from_secs(120), || {
        let mut c = client.clone();
        let id = id.to_string();
        async move {
            let b = c.get_backup(GetBackupRequest { id }).await.ok()?.into_inner();
            (b.status != "creating").then_some(b)
        }
    })
    .await
}

/// Asks for a full backup of `volume_id` and returns it as accepted (`creating`).
async fn start_backup(backups: &BackupServiceClient<tonic::transport::Channel>, volume_id: &str) -> Backup {
    backups
        .clone()
        .create_backup(CreateBackupRequest { volume_id: volume_id.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
}

/// Asks for `req` until the coordinator accepts it (e.g. once a restarted agent is up again).
async fn accepted(backups: &BackupServiceClient<tonic::transport::Channel>, req: CreateBackupRequest) -> Backup {
    wait_for("a backup to be accepted", Duration::from_secs(30), || {
        let mut c = backups.clone();
        let req = req.clone();
        async move { c.create_backup(req).await.ok().map(|r| r.into_inner()) }
    })
    .await
}

/// The backup agent killed mid-backup and not brought back: once its service is down the backup ends in error,
/// naming why (agent_restarts.rs shows one that comes back finishing the backup).
#[tokio::test]
async fn a_backup_agent_killed_mid_backup_ends_the_backup_in_error_and_leaves_nothing_half_done() {
    let OneSite { fleet, backend: _, dir, repo, storage: _storage, backup1: mut agent } =
        OneSite::start_with(&[("EMBER_FAILPOINTS", "backup.stage_chunk")]).await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 5, 8 << 20);
    let backups = BackupServiceClient::new(fleet.admin());
    let b = start_backup(&backups, &v.id.clone()).await;
    let status = agent.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "the backup agent died at the failpoint");
    let failed = wait_backup(&backups, &b.id).await;
    assert_eq!(failed.status, "error", "never available with partial data: {failed:?}");
    assert!(failed.status_reason.starts_with("backup failed: backup agent backup1 is down"), "{failed:?}");
    assert!(!repo.join("backups").join(&b.id).join("manifest.json").exists(), "no manifest for the failed backup");

    // The restarted agent clears what the dead one was writing; a new backup then completes and verifies.
    let _agent = fleet.start_agent("backup", "backup1", &repository_toml(&repo));
    assert_eq!(std::fs::read_dir(repo.join("tmp")).unwrap().count(), 0, "temporary files were cleaned");
    wait_for("the volume back to available", Duration::from_secs(30), || {
        let mut c = volumes.clone();
        let id = v.id.clone();
        async move { (c.get_volume(GetVolumeRequest { id }).await.ok()?.into_inner().status == "available").then_some(()) }
    })
    .await;
    let b = accepted(&backups, CreateBackupRequest { volume_id: v.id.clone(), ..Default::default() }).await;
    let done = wait_backup(&backups, &b.id).await;
    assert_eq!(done.status, "available", "{done:?}");
    let report = backups.clone().verify_backup(VerifyBackupRequest { id: b.id.clone() }).await.unwrap().into_inner();
    assert_eq!((report.chunks_checked, report.missing_chunks.len(), report.corrupt_chunks.len()), (8, 0, 0));
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

#[tokio::test]
async fn a_second_backup_agent_on_the_same_repository_refuses_to_start_and_disturbs_nothing() {
    let OneSite { fleet, backend: _, dir, repo, storage: _storage, backup1: _agent } = OneSite::start().await;
    // Stands for a chunk the running agent is writing: a second agent that opened the repository would clear it.
    let in_flight = repo.join("tmp").join("in-flight");
    std::fs::write(&in_flight, b"staged").unwrap();

    let (status, log) =
        fleet.agent_refusing_to_start("backup", "backup2", &repository_toml(&repo), Duration::from_secs(30));
    assert!(!status.success(), "{log}");
    assert!(log.contains("repository repo1 at") && log.contains("in use by another process"), "{log}");
    assert!(log.contains("backup agent backup1 on host"), "the refusal names the holder: {log}");
    assert!(in_flight.exists(), "the refused agent cleared the holder's tmp/");
    let services = ember_proto::v1::fleet_service_client::FleetServiceClient::new(fleet.admin())
        .list_services(ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .services;
    assert!(services.iter().all(|s| s.name != "backup2"), "{services:?}");

    // The holder goes on serving backups from its repository.
    let volumes = VolumeServiceClient::new(fleet.admin());
    let backups = BackupServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 9, 2 << 20);
    let b = start_backup(&backups, &v.id).await;
    let done = wait_backup(&backups, &b.id).await;
    assert_eq!(done.status, "available", "{done:?}");
    let report = backups.clone().verify_backup(VerifyBackupRequest { id: b.id.clone() }).await.unwrap().into_inner();
    assert_eq!((report.chunks_checked, report.missing_chunks.len(), report.corrupt_chunks.len()), (2, 0, 0));
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

#[tokio::test]
async fn garbage_collection_during_a_running_backup_loses_nothing() {
    let OneSite { fleet, backend: _, dir, repo, storage: _storage, backup1: agent } =
        OneSite::start_with(&[("EMBER_FAILPOINTS", "backup.pause_stage_chunk")]).await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let backups = BackupServiceClient::new(fleet.admin());
    let mut ids = Vec::new();
    for _ in 0..2 {
        let v = new_volume(&volumes, 1).await;
        fill(&dir.join(format!("volume-{}", v.id)), 0, 6, 6 << 20);
        ids.push(v.id);
    }
    // The second volume has one chunk of its own, at its end: a backup of it reuses six chunks, then stages
    // (and pauses at) the new one.
    fill(&dir.join(format!("volume-{}", ids[1])), 1000 << 20, 7, 1 << 20);
    // Back up the first volume while nothing is armed yet... the pause is armed for the agent's first staged
    // chunk, which belongs to this backup: wait it out.
    let first = start_backup(&backups, &ids[0].clone()).await;
    let first = wait_backup(&backups, &first.id).await;
    assert_eq!(first.status, "available");
    // Delete it: its chunks are unreferenced, but still there.
    backups.clone().delete_backup(DeleteBackupRequest { id: first.id.clone(), ..Default::default() }).await.unwrap();
    wait_for("first backup gone", Duration::from_secs(30), || {
        let mut c = backups.clone();
        let id = first.id.clone();
        async move {
            matches!(c.get_backup(GetBackupRequest { id }).await, Err(s) if s.code() == Code::NotFound).then_some(())
        }
    })
    .await;
    let before = agent.log_text().matches("failpoint pause").count();
    assert_eq!(before, 1, "the first backup paused once");
    // Restart nothing; arm a second pause by using a fresh agent process for the racing backup.
    drop(agent);
    let agent = fleet.start_agent_with(
        "backup",
        "backup1",
        &repository_toml(&repo),
        &[("EMBER_FAILPOINTS", "backup.pause_stage_chunk")],
    );
    wait_for("backup agent re-registered", Duration::from_secs(20), || async {
        let mut c = ember_proto::v1::fleet_service_client::FleetServiceClient::new(fleet.admin());
        let list = c.list_services(ListServicesRequest::default()).await.ok()?.into_inner().services;
        list.iter()
            .any(|s| s.name == "backup1" && s.up && s.endpoint.ends_with(&agent.addr.port().to_string()))
            .then_some(())
    })
    .await;
    let second = start_backup(&backups, &ids[1].clone()).await;
    wait_paused(&agent, "the second backup to pause mid-way").await;
    let gc = BackupServiceClient::new(fleet.admin())
        .collect_garbage(CollectGarbageRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gc.chunks_removed, 0, "the running backup had touched the chunks it reuses: {gc:?}");
    let second = wait_backup(&backups, &second.id).await;
    assert_eq!(second.status, "available", "{second:?}");
    let report =
        backups.clone().verify_backup(VerifyBackupRequest { id: second.id.clone() }).await.unwrap().into_inner();
    assert!(
        report.missing_chunks.is_empty() && report.corrupt_chunks.is_empty() && report.chunks_checked == 7,
        "{report:?}"
    );
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

#[tokio::test]
async fn an_in_use_volume_needs_force_and_is_read_through_a_temporary_snapshot() {
    let (OneSite { fleet, dir, storage: _storage, backup1: backup_agent, .. }, held) = OneSite::start_held().await;
    let _compute = fleet.start_agent("compute", "compute1", "");
    wait_backend(&fleet, "compute1").await;
    let vm1 = Domain::boot("ember-backup").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 8, 2 << 20);
    let attachments = AttachmentServiceClient::new(fleet.admin());
    let a = attachments.clone().attach(attach_request(&v.id, &vm1.name)).await.unwrap().into_inner();
    wait_volume(&volumes, &v.id, "in-use").await;
    let backups = BackupServiceClient::new(fleet.admin());
    let err = backups
        .clone()
        .create_backup(CreateBackupRequest { volume_id: v.id.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("force"), "{}", err.message());
    let b = backups
        .clone()
        .create_backup(CreateBackupRequest { volume_id: v.id.clone(), force: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    wait_paused(&backup_agent, "the forced backup to be mid-way").await;
    let snapshots = || -> Vec<String> {
        let names = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string());
        names.filter(|n| n.starts_with("snapshot-")).collect()
    };
    assert_eq!(snapshots().len(), 1, "the backup reads a temporary snapshot");
    let now = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!(now.status, "in-use", "the volume stays attached while it is backed up");

    // Detached mid-way, the volume is not the backup's to lose: it cannot be deleted until the backup ends.
    attachments.clone().detach(DetachRequest { attachment_id: a.id.clone(), ..Default::default() }).await.unwrap();
    wait_volume(&volumes, &v.id, "available").await;
    let err = volumes
        .clone()
        .delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(&format!("being backed up (backup {})", b.id)), "{}", err.message());
    let now = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!(now.status, "available", "the refused delete changed nothing");

    held.release();
    let b = wait_backup(&backups, &b.id).await;
    assert_eq!(b.status, "available", "{b:?}");
    assert_eq!(b.stored_bytes, (2 << 20) + 16, "two raw 1 MiB chunks of random data");
    assert!(snapshots().is_empty(), "the temporary snapshot was removed: {:?}", snapshots());
    volumes.clone().delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() }).await.unwrap();
    wait_gone(&volumes, &v.id).await;
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// The coordinator dies as it hands a backup to the agent, and again mid-way through a restore into a new
/// volume: after a restart both converge (the backup completes; the restored volume is whole).
#[tokio::test]
async fn backups_and_restores_converge_after_the_coordinator_crashes() {
    let OneSite { mut fleet, backend: _, dir, repo: _, storage: _storage, backup1: _backup } = OneSite::start().await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    let source = dir.join(format!("volume-{}", v.id));
    fill(&source, 3 << 20, 9, 3 << 20);

    fleet.start_coordinator_with(&[("EMBER_FAILPOINTS", "create_backup.calling")]);
    let _ = BackupServiceClient::new(fleet.admin())
        .create_backup(CreateBackupRequest { volume_id: v.id.clone(), ..Default::default() })
        .await;
    assert!(!fleet.coordinator.as_mut().unwrap().wait_exit(Duration::from_secs(30)).success());
    fleet.start_coordinator();
    let backups = BackupServiceClient::new(fleet.admin());
    let id =
        backups.clone().list_backups(ListBackupsRequest::default()).await.unwrap().into_inner().backups[0].id.clone();
    let b = wait_backup(&backups, &id).await;
    assert_eq!(b.status, "available", "{b:?}");

    fleet.start_coordinator_with(&[("EMBER_FAILPOINTS", "create_volume.created")]);
    let _ = BackupServiceClient::new(fleet.admin())
        .restore_backup(RestoreBackupRequest { backup_id: id.clone(), ..Default::default() })
        .await;
    assert!(!fleet.coordinator.as_mut().unwrap().wait_exit(Duration::from_secs(30)).success());
    fleet.start_coordinator();
    let volumes = VolumeServiceClient::new(fleet.admin());
    let restored = volumes.clone().list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().volumes;
    let target = restored.iter().find(|x| x.source_backup_id == id).expect("the restore's volume row").id.clone();
    let target = wait_volume(&volumes, &target, "available").await;
    assert_eq!(
        std::fs::read(dir.join(format!("volume-{}", target.id))).unwrap(),
        std::fs::read(&source).unwrap(),
        "whole and identical"
    );
    let b = BackupServiceClient::new(fleet.admin()).get_backup(GetBackupRequest { id }).await.unwrap().into_inner();
    assert_eq!(b.status, "available", "the backup is released after the restore");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// The storage agent dies, or the repository disappears, while a backup runs: the backup ends in error with
/// a reason, and the volume is usable again.
#[tokio::test]
async fn a_backup_fails_cleanly_when_its_source_or_repository_goes_away() {
    let OneSite { fleet, backend, dir, repo, mut storage, backup1: agent } =
        OneSite::start_with(&[("EMBER_FAILPOINTS", "backup.pause_stage_chunk")]).await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 11, 32 << 20);
    let backups = BackupServiceClient::new(fleet.admin());
    let b = start_backup(&backups, &v.id.clone()).await;
    wait_paused(&agent, "the backup to be mid-way").await;
    storage.kill();
    let b = wait_backup(&backups, &b.id).await;
    assert_eq!(b.status, "error", "{b:?}");
    assert!(b.status_reason.starts_with("backup failed"), "{b:?}");
    assert!(!repo.join("backups").join(&b.id).exists(), "nothing half-written is published");
    drop(agent);

    // Now the repository vanishes mid-backup.
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    let agent = fleet.start_agent_with(
        "backup",
        "backup1",
        &repository_toml(&repo),
        &[("EMBER_FAILPOINTS", "backup.pause_stage_chunk")],
    );
    wait_for("both agents back", Duration::from_secs(30), || async {
        let mut c = ember_proto::v1::fleet_service_client::FleetServiceClient::new(fleet.admin());
        let list = c.list_services(ListServicesRequest::default()).await.ok()?.into_inner().services;
        let fresh =
            list.iter().any(|s| s.name == "backup1" && s.up && s.endpoint.ends_with(&agent.addr.port().to_string()));
        (fresh && list.iter().all(|s| s.up)).then_some(())
    })
    .await;
    wait_volume(&volumes, &v.id, "available").await;
    let b = start_backup(&backups, &v.id.clone()).await;
    wait_paused(&agent, "the second backup to be mid-way").await;
    std::fs::remove_dir_all(&repo).unwrap();
    let b = wait_backup(&backups, &b.id).await;
    assert_eq!(b.status, "error", "{b:?}");
    assert!(b.status_reason.contains("backup failed"), "{b:?}");
    let v = wait_volume(&volumes, &v.id, "available").await;
    assert!(v.status_reason.is_empty());
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// A chunk the parent backup references is gone from the repository (lost, or collected after a delete): an
/// incremental, which the storage agent sends that chunk to without its data, fails naming it, and publishes
/// nothing that would reference it.
#[tokio::test]
async fn an_incremental_whose_known_chunk_is_gone_fails_naming_it() {
    let OneSite { fleet, backend: _, dir, repo, storage: _storage, backup1: _agent } = OneSite::start().await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 14, 4 << 20);
    let backups = BackupServiceClient::new(fleet.admin());
    let full = start_backup(&backups, &v.id).await;
    assert_eq!(wait_backup(&backups, &full.id).await.status, "available");
    let chunk = walkdir(&repo.join("chunks")).into_iter().next().expect("a stored chunk");
    std::fs::remove_file(&chunk).unwrap();
    let name = chunk.file_name().unwrap().to_string_lossy().to_string();

    let incremental = backups
        .clone()
        .create_backup(CreateBackupRequest { volume_id: v.id.clone(), incremental: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let b = wait_backup(&backups, &incremental.id).await;
    assert_eq!(b.status, "error", "{b:?}");
    assert!(b.status_reason.contains(&name) && b.status_reason.contains("neither sent nor in the repository"), "{b:?}");
    assert!(!repo.join("backups").join(&b.id).exists(), "nothing is published that references the lost chunk");
    wait_volume(&volumes, &v.id, "available").await;
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// Every file under `dir`, at any depth.
fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { files.extend(walkdir(&path)) } else { files.push(path) }
    }
    files
}

/// The backup agent dies mid-restore and stays dead: once its service is down, the restore fails, and the target
/// never becomes available with partial data. (One restarted in time finishes the restore: agent_restarts.rs.)
#[tokio::test]
async fn a_backup_agent_killed_mid_restore_leaves_the_target_in_error() {
    let OneSite { fleet, backend: _, dir, repo, storage: _storage, backup1: mut agent } =
        OneSite::start_with(&[("EMBER_FAILPOINTS", "backup.restore_chunk")]).await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    let file = dir.join(format!("volume-{}", v.id));
    fill(&file, 0, 12, 8 << 20);
    let backups = BackupServiceClient::new(fleet.admin());
    let b = start_backup(&backups, &v.id.clone()).await;
    assert_eq!(wait_backup(&backups, &b.id).await.status, "available");
    let backed_up = sha256(&file);
    fill(&file, 0, 13, 8 << 20); // the volume moves on; restoring puts it back

    // Onto the existing volume: it goes error_restoring. (The agent dies at its second chunk read.)
    let restore = RestoreBackupRequest { backup_id: b.id.clone(), volume_id: v.id.clone(), ..Default::default() };
    backups.clone().restore_backup(restore.clone()).await.unwrap();
    assert!(!agent.wait_exit(Duration::from_secs(60)).success(), "the agent died at the failpoint");
    let target = ember_fleet_tests::volumes::wait_settled(&volumes, &v.id).await;
    assert_eq!(target.status, "error_restoring", "{target:?}");
    assert!(target.status_reason.contains("restore of backup"), "{target:?}");
    let after = backups.clone().get_backup(GetBackupRequest { id: b.id.clone() }).await.unwrap().into_inner();
    assert_eq!(after.status, "available", "the backup itself is intact and usable again");

    // Restoring onto it again is how it is put right.
    let mut agent = fleet.start_agent("backup", "backup1", &repository_toml(&repo));
    agent.wait_registered().await;
    backups.clone().restore_backup(restore.clone()).await.unwrap();
    let target = wait_volume(&volumes, &v.id, "available").await;
    assert_eq!((target.status_reason.as_str(), sha256(&file)), ("", backed_up), "restored bit-identically");

    // A volume left error_restoring can be deleted, as one whose create failed can.
    agent.kill();
    let failing = fleet.start_agent_with(
        "backup",
        "backup1",
        &repository_toml(&repo),
        &[("EMBER_FAILPOINTS", "backup.restore_chunk")],
    );
    failing.wait_registered().await;
    backups.clone().restore_backup(restore).await.unwrap();
    assert_eq!(ember_fleet_tests::volumes::wait_settled(&volumes, &v.id).await.status, "error_restoring");
    volumes.clone().delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() }).await.unwrap();
    wait_gone(&volumes, &v.id).await;
    assert!(!file.exists(), "its file went with it");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// `--wait` draws a progress bar with MB/s for a backup and for restores onto an existing volume and into a new
/// one; while a restore runs, its backup is `restoring` and reports how far the restore has come. A delete
/// shows its status and time alone.
#[tokio::test]
async fn backups_and_restores_report_progress_and_the_cli_draws_it() {
    let OneSite { fleet, backend: _, dir, repo: _, storage: _storage, backup1: agent } =
        OneSite::start_with(&[("EMBER_FAILPOINTS", "backup.pause_restore_chunk")]).await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    // Data only in the second half: a restore paused at its first data chunk has done half the volume.
    fill(&dir.join(format!("volume-{}", v.id)), 512 << 20, 31, 4 << 20);
    let (ok, out, err) = fleet.cli(&["--json", "backup", "create", &v.id, "--wait"]);
    assert!(ok, "{out}\n{err}");
    assert!(err.contains(&format!("[{}] 100%", "=".repeat(30))) && err.contains("MB/s"), "{err}");
    let created = serde_json::from_str::<serde_json::Value>(&out).unwrap();
    let id = created[0]["id"].as_str().unwrap().to_string();
    assert_eq!(created[0]["progress_data_bytes"].as_u64(), Some(4 << 20), "{out}");
    assert_rate_of(&err, 4 << 20);

    let target = new_volume(&volumes, 1).await;
    let restore = fleet
        .cli_command(&["backup", "restore", &id, "--volume", &target.id, "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_paused(&agent, "the restore to pause at its first data chunk").await;
    let backups = BackupServiceClient::new(fleet.admin());
    // The coordinator copies the agent's progress every 200 ms, so an earlier copy, taken while the restore
    // was still passing the empty first half, may show less; it reaches the half and stays there.
    let midway = wait_for("the restore's progress on its backup to reach half", Duration::from_secs(4), || {
        let mut c = backups.clone();
        let id = id.clone();
        async move {
            let b = c.get_backup(GetBackupRequest { id }).await.ok()?.into_inner();
            (b.status == "restoring" && b.progress_percent >= 45).then_some(b)
        }
    })
    .await;
    assert!(midway.progress_percent <= 50, "no further than the paused first data chunk: {midway:?}");
    assert_eq!(midway.progress_data_bytes, 0, "half the volume passed, but no data written yet: {midway:?}");
    let out = restore.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&target.id) && err.contains("available") && err.contains("] 100%"), "{err}");
    assert!(err.contains("restoring-backup ["), "the bar was drawn while restoring: {err}");
    assert_rate_of(&err, 4 << 20);
    let b = backups.clone().get_backup(GetBackupRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!((b.status.as_str(), b.progress_percent), ("available", 100), "{b:?}");
    let restored = std::fs::read(dir.join(format!("volume-{}", target.id))).unwrap();
    assert_eq!(&restored[512 << 20..(512 << 20) + (4 << 20)], &iscsi::pattern(31, 4 << 20)[..]);

    let (ok, out, err) = fleet.cli(&["--json", "backup", "restore", &id, "--wait"]);
    assert!(ok && err.contains("] 100%"), "{out}\n{err}");
    let new_id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["volume_id"].as_str().unwrap().to_string();
    let restored = std::fs::read(dir.join(format!("volume-{new_id}"))).unwrap();
    assert_eq!(&restored[512 << 20..(512 << 20) + (4 << 20)], &iscsi::pattern(31, 4 << 20)[..]);

    // A delete moves no data: its line has the status and the time, no bar and no rate.
    let (ok, out, err) = fleet.cli(&["backup", "delete", &id, "--wait"]);
    assert!(ok && err.contains(&format!("{id} deleting")), "{out}\n{err}");
    assert!(!err.contains("MB/s") && !err.contains('['), "{err}");
    assert!(backups.clone().get_backup(GetBackupRequest { id }).await.is_err(), "the backup is gone");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// Checks the rate on the last progress line the CLI drew in `stderr`: `data_bytes` over the time it shows, not
/// the volume's size over it (the volume here is 1 GiB). The line rounds the time to a tenth of a second and the
/// rate to a whole MB/s, so the rate is checked against the range of times the shown one stands for.
fn assert_rate_of(stderr: &str, data_bytes: u64) {
    let last = stderr.trim_end().rsplit('\r').next().unwrap();
    let fields: Vec<&str> = last.split_whitespace().collect();
    let secs: f64 = fields[fields.len() - 3].trim_end_matches('s').parse().unwrap();
    let rate: f64 = fields[fields.len() - 2].parse().unwrap();
    let (data_mb, volume_mb) = (data_bytes as f64 / 1e6, (1u64 << 30) as f64 / 1e6);
    let slowest = data_mb / (secs + 0.05) - 1.0;
    let fastest = if secs > 0.05 { data_mb / (secs - 0.05) + 1.0 } else { f64::INFINITY };
    let why = format!("{rate} MB/s in {secs} s for {data_bytes} bytes: {last}");
    assert!((slowest..=fastest).contains(&rate), "{why}");
    assert!(rate * (secs + 0.05) < volume_mb / 4.0, "a rate of the volume's size, not of its data: {why}");
}

/// The storage agent dies while a restore writes into a new volume, and is not back before its service is down:
/// the volume ends in `error` (having waited for it meanwhile, see `agent_restarts.rs`), never `available` with
/// partial data, and the backup is usable again; a second restore after the agent's restart produces the whole
/// volume.
#[tokio::test]
async fn a_storage_agent_killed_mid_restore_leaves_the_target_in_error() {
    let OneSite { fleet, backend, dir, repo: _, mut storage, backup1: agent } =
        OneSite::start_with(&[("EMBER_FAILPOINTS", "backup.pause_restore_chunk")]).await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 13, 8 << 20);
    let source = std::fs::read(dir.join(format!("volume-{}", v.id))).unwrap();
    let backups = BackupServiceClient::new(fleet.admin());
    let b = start_backup(&backups, &v.id.clone()).await;
    assert_eq!(wait_backup(&backups, &b.id).await.status, "available");

    let r = backups
        .clone()
        .restore_backup(RestoreBackupRequest { backup_id: b.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    wait_paused(&agent, "the restore to be writing").await;
    storage.kill();
    let target = ember_fleet_tests::volumes::wait_settled(&volumes, &r.volume_id).await;
    assert_eq!(target.status, "error", "never available with partial data: {target:?}");
    let after = wait_for("the backup released", Duration::from_secs(30), || {
        let mut c = backups.clone();
        let id = b.id.clone();
        async move {
            let b = c.get_backup(GetBackupRequest { id }).await.ok()?.into_inner();
            (b.status == "available").then_some(b)
        }
    })
    .await;
    assert_eq!(after.progress_percent, 100, "{after:?}");

    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let again = wait_for("a second restore accepted", Duration::from_secs(30), || {
        let mut c = backups.clone();
        let id = b.id.clone();
        async move {
            c.restore_backup(RestoreBackupRequest { backup_id: id, ..Default::default() })
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    })
    .await;
    let restored = wait_volume(&volumes, &again.volume_id, "available").await;
    assert_eq!(std::fs::read(dir.join(format!("volume-{}", restored.id))).unwrap(), source, "whole and identical");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// While a backup agent is down, work that needs it is refused at once and holds nothing: an incremental on
/// its backup (which would hold the volume `backing-up` until the agent came back), restores of its backups
/// (which would fail and leave a volume in error that nothing touched) and a verify (which said only "tcp
/// connect error"). Once it is back, the same calls work.
#[tokio::test]
async fn work_for_a_backup_agent_that_is_down_is_refused_and_holds_nothing() {
    let OneSite { fleet, backend: _, dir, repo, storage: _storage, backup1: mut agent } = OneSite::start().await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    let target = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 21, 2 << 20);
    let backups = BackupServiceClient::new(fleet.admin());
    let full = start_backup(&backups, &v.id).await;
    assert_eq!(wait_backup(&backups, &full.id).await.status, "available");

    agent.kill();
    wait_down(&fleet, "backup1").await;
    let refused = |err: tonic::Status| {
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("backup agent backup1") && err.message().contains("is down"), "{err:?}");
    };
    let incremental = CreateBackupRequest { volume_id: v.id.clone(), incremental: true, ..Default::default() };
    refused(backups.clone().create_backup(incremental.clone()).await.unwrap_err());
    let onto = RestoreBackupRequest { backup_id: full.id.clone(), volume_id: target.id.clone(), ..Default::default() };
    refused(backups.clone().restore_backup(onto.clone()).await.unwrap_err());
    let new = RestoreBackupRequest { backup_id: full.id.clone(), ..Default::default() };
    refused(backups.clone().restore_backup(new).await.unwrap_err());
    let from_backup = CreateVolumeRequest { backup_id: full.id.clone(), ..Default::default() };
    refused(volumes.clone().create_volume(from_backup).await.unwrap_err());
    refused(backups.clone().verify_backup(VerifyBackupRequest { id: full.id.clone() }).await.unwrap_err());
    for id in [&v.id, &target.id] {
        let now = volumes.clone().get_volume(GetVolumeRequest { id: id.clone() }).await.unwrap().into_inner();
        assert_eq!(now.status, "available", "{now:?}");
    }
    let listed = volumes.clone().list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().volumes;
    assert_eq!(listed.len(), 2, "no volume was made for a refused restore: {listed:?}");
    let b = backups.clone().get_backup(GetBackupRequest { id: full.id.clone() }).await.unwrap().into_inner();
    assert_eq!(b.status, "available");
    let all = backups.clone().list_backups(ListBackupsRequest::default()).await.unwrap().into_inner().backups;
    assert_eq!(all.len(), 1, "{all:?}");

    let _agent = fleet.start_agent("backup", "backup1", &repository_toml(&repo));
    let b = accepted(&backups, incremental).await;
    assert_eq!(b.parent_id, full.id);
    assert_eq!(wait_backup(&backups, &b.id).await.status, "available");
    backups.clone().restore_backup(onto).await.unwrap();
    wait_volume(&volumes, &target.id, "available").await;
    let restored = std::fs::read(dir.join(format!("volume-{}", target.id))).unwrap();
    assert_eq!(&restored[..2 << 20], &iscsi::pattern(21, 2 << 20)[..], "the restore ran once the agent was back");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// Garbage collection over every repository goes on past a backup agent that is down and lists it as
/// skipped; asking for that agent alone fails with the reason, and a name that matches nothing is refused.
#[tokio::test]
async fn garbage_collection_skips_a_backup_agent_that_is_down_and_names_it() {
    let OneSite { fleet, backend: _, dir, repo, storage: _storage, backup1: _backup } = OneSite::start().await;
    // An unreferenced chunk in repo1: a backup, then its delete. Made before backup2 starts, since a new backup
    // goes to the repository that reported the most free space, and both are on this test's one filesystem.
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 23, 1 << 20);
    let backups = BackupServiceClient::new(fleet.admin());
    let b = start_backup(&backups, &v.id).await;
    let b = wait_backup(&backups, &b.id).await;
    assert_eq!((b.status.as_str(), b.host.as_str()), ("available", "backup1@repo1"), "{b:?}");
    backups.clone().delete_backup(DeleteBackupRequest { id: b.id.clone(), ..Default::default() }).await.unwrap();
    wait_for("the backup deleted", Duration::from_secs(30), || {
        let mut c = backups.clone();
        let id = b.id.clone();
        async move {
            matches!(c.get_backup(GetBackupRequest { id }).await, Err(s) if s.code() == Code::NotFound).then_some(())
        }
    })
    .await;

    let repo2 = fleet.subdir("repo2");
    let mut backup2 = fleet.start_agent(
        "backup",
        "backup2",
        &format!("gc_grace_seconds = 0\n[[repositories]]\nname = \"repo2\"\ndirectory = \"{}\"\n", repo2.display()),
    );
    wait_backend(&fleet, "backup2").await;
    backup2.kill();
    wait_down(&fleet, "backup2").await;
    let gc = |host: &str| {
        let mut c = backups.clone();
        let host = host.to_string();
        async move { c.collect_garbage(CollectGarbageRequest { host }).await }
    };
    let all = gc("").await.unwrap().into_inner();
    assert_eq!(all.collected, ["backup1@repo1"], "{all:?}");
    assert_eq!(all.skipped, ["backup2@repo2: its backup agent is down"], "{all:?}");
    assert_eq!(all.chunks_removed, 1, "repo1 was collected past the down agent: {all:?}");
    assert!(walkdir(&repo.join("chunks")).is_empty());
    let err = gc("backup2").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("backup2@repo2: its backup agent is down"), "{}", err.message());
    let err = gc("backup9@repo1").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("host"), "{}", err.message());
    let (ok, out, err) = fleet.cli(&["backup", "gc"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("on backup1@repo1") && out.contains("skipped backup2@repo2: its backup agent is down"),
        "{out}"
    );
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// The coordinator dies as it hands a backup to the agent, and the backup agent dies too. The restarted
/// coordinator does not wait for that agent for ever: once it is down the backup ends in error and its volume
/// is free again, to be backed up once the agent is back.
#[tokio::test]
async fn a_backup_whose_agent_is_gone_when_it_resumes_ends_in_error_and_frees_the_volume() {
    let OneSite { mut fleet, backend: _, dir, repo, storage: _storage, backup1: mut agent } = OneSite::start().await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 25, 1 << 20);
    fleet.start_coordinator_with(&[("EMBER_FAILPOINTS", "create_backup.calling")]);
    let _ = BackupServiceClient::new(fleet.admin())
        .create_backup(CreateBackupRequest { volume_id: v.id.clone(), ..Default::default() })
        .await;
    assert!(!fleet.coordinator.as_mut().unwrap().wait_exit(Duration::from_secs(30)).success());
    agent.kill();
    fleet.start_coordinator();

    let backups = BackupServiceClient::new(fleet.admin());
    let listed = backups.clone().list_backups(ListBackupsRequest::default()).await.unwrap().into_inner().backups;
    let b = wait_backup(&backups, &listed[0].id).await;
    assert_eq!(b.status, "error", "{b:?}");
    assert!(b.status_reason.contains("backup agent backup1 is down"), "{b:?}");
    let v = wait_volume(&volumes, &v.id, "available").await;
    assert!(v.status_reason.is_empty(), "{v:?}");
    assert!(!repo.join("backups").join(&b.id).exists());

    // With the agent back, the volume backs up again.
    let _agent = fleet.start_agent("backup", "backup1", &repository_toml(&repo));
    let again = accepted(&backups, CreateBackupRequest { volume_id: v.id.clone(), ..Default::default() }).await;
    assert_eq!(wait_backup(&backups, &again.id).await.status, "available");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// Revokes storage1's certificate, and waits until the backup agent `agent` has put the new list in force.
async fn revoke_storage1(fleet: &Fleet, agent: &Daemon) {
    let ca_dir = fleet.ca_dir();
    let (ok, out, err) = fleet.cli(&["certs", "revoke", "--dir", ca_dir.to_str().unwrap(), "--name", "storage1"]);
    assert!(ok && out.contains("storage-agent storage1"), "{out}\n{err}");
    wait_for("the backup agent to put the new list in force", Duration::from_secs(30), || async {
        agent.log_text().contains("new certificate revocation list in force").then_some(())
    })
    .await;
}

/// A restore checks the storage node it writes to when a new revocation list comes into force, not only when it
/// connected: once that node's certificate is revoked, the restore sends it no more of the volume and fails,
/// and the new volume ends `error`.
#[tokio::test]
async fn a_restore_stops_sending_to_a_storage_node_revoked_while_it_runs() {
    let (OneSite { fleet, backend: _, dir, repo: _, storage: _storage, backup1: agent }, held) =
        OneSite::start_held_at("backup.pause_restore_chunk").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 5, 4 << 20);
    let backups = BackupServiceClient::new(fleet.admin());
    let b = start_backup(&backups, &v.id).await;
    assert_eq!(wait_backup(&backups, &b.id).await.status, "available");
    let restore = RestoreBackupRequest { backup_id: b.id.clone(), ..Default::default() };
    let target = backups.clone().restore_backup(restore).await.unwrap().into_inner().volume_id;
    wait_paused(&agent, "the restore to be under way").await;

    revoke_storage1(&fleet, &agent).await;
    held.release();
    let failed = wait_volume(&volumes, &target, "error").await;
    assert!(failed.status_reason.contains("revoked during the restore"), "{failed:?}");
    // The data is in the volume's first 4 MiB: none of it reached the node.
    let mut head = Vec::new();
    if let Ok(file) = std::fs::File::open(dir.join(format!("volume-{target}"))) {
        std::io::Read::read_to_end(&mut std::io::Read::take(file, 4 << 20), &mut head).unwrap();
    }
    assert!(head.iter().all(|&b| b == 0), "the revoked node got none of the volume's data");
}

/// A backup checks the storage node it reads from when a new revocation list comes into force, as a restore
/// does: once that node's certificate is revoked, the backup takes no more from it, keeps nothing it sent, and
/// ends `error`.
#[tokio::test]
async fn a_backup_keeps_nothing_from_a_storage_node_revoked_while_it_runs() {
    let (OneSite { fleet, backend: _, dir, repo, storage: _storage, backup1: agent }, held) =
        OneSite::start_held_at("backup.pause_stage_chunk").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 5, 16 << 20);
    let backups = BackupServiceClient::new(fleet.admin());
    let b = start_backup(&backups, &v.id).await;
    wait_paused(&agent, "the backup to be under way").await;

    revoke_storage1(&fleet, &agent).await;
    held.release();
    let failed = wait_backup(&backups, &b.id).await;
    assert_eq!(failed.status, "error", "{failed:?}");
    assert!(failed.status_reason.contains("revoked during the backup"), "{failed:?}");
    assert!(walkdir(&repo.join("chunks")).is_empty(), "nothing from the revoked node is kept");
    assert!(walkdir(&repo.join("tmp")).is_empty(), "nor left staged");
    assert!(!repo.join("backups").join(&b.id).join("manifest.json").exists());
}
