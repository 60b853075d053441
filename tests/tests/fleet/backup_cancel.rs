//! Deleting a backup while it is being made (Cinder's `backup-delete --force`): it stops where it is, nothing of
//! it is kept, its volume is usable again and its quota is released. And Cinder imports while they run: one
//! whose caller goes away still ends, and garbage collection meanwhile keeps the chunks it has not yet referenced.

use ember_fleet_tests::backups::{OneSite, backup_usage, fill, wait_backup_settled, wait_paused};
use ember_fleet_tests::volumes::{new_volume, wait_volume};
use ember_fleet_tests::wait_for;
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::time::Duration;
use tonic::Code;

#[tokio::test]
async fn a_backup_deleted_with_force_while_it_runs_stops_and_leaves_nothing() {
    let (OneSite { fleet, dir, repo, storage: _storage, backup1: agent, .. }, held) = OneSite::start_held().await;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let backups = BackupServiceClient::new(fleet.member("alice", "p1"));
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 41, 8 << 20);
    let req = CreateBackupRequest { volume_id: v.id.clone(), ..Default::default() };
    let b = backups.clone().create_backup(req.clone()).await.unwrap().into_inner();
    wait_paused(&agent, "the backup to be mid-way").await;
    let show = |id: String| {
        let mut c = backups.clone();
        async move { c.get_backup(GetBackupRequest { id }).await }
    };

    // Without force, the delete is refused, naming it, and changes nothing.
    let plain = DeleteBackupRequest { id: b.id.clone(), ..Default::default() };
    let err = backups.clone().delete_backup(plain).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("is creating") && err.message().contains("pass force"), "{}", err.message());
    assert_eq!(show(b.id.clone()).await.unwrap().into_inner().status, "creating");

    // With force (through the CLI), the backup stops where it is, and the delete removes what it had made.
    let (ok, out, err) = fleet.cli(&["backup", "delete", &b.id, "--force"]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(show(b.id.clone()).await.unwrap().into_inner().status, "deleting");
    held.release();
    wait_for("the backup to be gone", Duration::from_secs(60), || async {
        matches!(show(b.id.clone()).await, Err(s) if s.code() == Code::NotFound).then_some(())
    })
    .await;
    assert!(agent.log_text().contains("stopped: the backup was deleted while it was being made"));
    let v = wait_volume(&volumes, &v.id, "available").await;
    assert!(v.status_reason.is_empty(), "{v:?}");
    assert!(!repo.join("backups").join(&b.id).exists(), "nothing of it is published");
    let staged: Vec<_> = std::fs::read_dir(repo.join("tmp")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(staged.is_empty(), "its staged chunks are removed: {staged:?}");
    assert_eq!(backup_usage(&fleet, "p1").await, (0, 0), "its quota is released");

    // The volume backs up again, whole.
    let again = backups.clone().create_backup(req).await.unwrap().into_inner();
    let again = wait_backup_settled(&backups, &again.id).await;
    assert_eq!((again.status.as_str(), again.progress_data_bytes), ("available", 8 << 20), "{again:?}");
    assert_eq!(backup_usage(&fleet, "p1").await, (1, 1));
}

/// The coordinator's call to make a backup can still be on its way (its temporary snapshot being made, a slow
/// network) while a forced delete of that backup runs to its end. Arriving after, it must not make the backup:
/// the repository would hold one that no coordinator knows, and whose chunks no collection removes.
#[tokio::test]
async fn a_backup_call_that_arrives_after_its_forced_delete_makes_nothing() {
    let (OneSite { fleet, dir, repo, storage: _storage, backup1: agent, .. }, held) =
        OneSite::start_held_at("backup.pause_create_arrived").await;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let backups = BackupServiceClient::new(fleet.member("alice", "p1"));
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 43, 4 << 20);
    let req = CreateBackupRequest { volume_id: v.id.clone(), ..Default::default() };
    let b = backups.clone().create_backup(req).await.unwrap().into_inner();
    wait_paused(&agent, "the call to make the backup to reach the agent").await;

    let (ok, out, err) = fleet.cli(&["backup", "delete", &b.id, "--force"]);
    assert!(ok, "{out}\n{err}");
    wait_for("the backup to be gone", Duration::from_secs(60), || {
        let mut c = backups.clone();
        let id = b.id.clone();
        async move {
            matches!(c.get_backup(GetBackupRequest { id }).await, Err(s) if s.code() == Code::NotFound).then_some(())
        }
    })
    .await;
    held.release();
    let v = wait_volume(&volumes, &v.id, "available").await;
    assert!(v.status_reason.is_empty(), "{v:?}");
    let published: Vec<_> = std::fs::read_dir(repo.join("backups")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(published.is_empty(), "nothing of it is published: {published:?}");
    assert_eq!(std::fs::read_dir(repo.join("chunks")).unwrap().count(), 0, "no chunk of it is stored");
    assert!(repo.join("deleted").join(&b.id).exists(), "its tombstone is what refused it");
    assert!(agent.log_text().contains("the backup was deleted before this call to make it arrived"));
    assert_eq!(backup_usage(&fleet, "p1").await, (0, 0), "its quota is released");
}

/// A Cinder import runs inside its caller's request. A caller that goes away mid-import (Ctrl-C on the CLI) does
/// not leave the backup `creating` for ever: the import goes on and ends, counted in the quota.
#[tokio::test]
async fn a_cinder_import_whose_caller_goes_away_still_ends() {
    let (OneSite { fleet, storage: _storage, backup1: agent, .. }, held) =
        OneSite::start_held_at("backup.pause_import").await;
    let mut cli = import_cinder_full(&fleet, &[], std::process::Stdio::null);
    wait_paused(&agent, "the import to be under way").await;
    let id: String = sqlx::query_scalar("SELECT id FROM backups WHERE status = 'creating'")
        .fetch_one(&fleet.db().await)
        .await
        .unwrap();
    cli.kill().unwrap();
    cli.wait().unwrap();
    held.release();
    let backups = BackupServiceClient::new(fleet.admin());
    let imported = wait_for("the import to end", Duration::from_secs(60), || {
        let mut c = backups.clone();
        let id = id.clone();
        async move {
            let b = c.get_backup(GetBackupRequest { id }).await.ok()?.into_inner();
            (b.status != "creating").then_some(b)
        }
    })
    .await;
    assert_eq!(imported.status, "available", "{imported:?}");
    assert_eq!(backup_usage(&fleet, "p1").await, (1, imported.size_gb as i64));
}

/// A Cinder import is stopped like a backup (Cinder has no such import, but an operator who started the wrong
/// one, or a huge one, must not wait for it): a forced delete stops it between blocks, nothing of it is
/// published or left staged, and its caller is told. Without force the delete is refused.
#[tokio::test]
async fn a_cinder_import_deleted_with_force_stops_and_leaves_nothing() {
    let (OneSite { fleet, repo, storage: _storage, backup1: agent, .. }, held) =
        OneSite::start_held_at("backup.pause_import").await;
    let cli = import_cinder_full(&fleet, &[], std::process::Stdio::piped);
    wait_paused(&agent, "the import to be under way").await;
    let id: String = sqlx::query_scalar("SELECT id FROM backups WHERE status = 'creating'")
        .fetch_one(&fleet.db().await)
        .await
        .unwrap();
    let backups = BackupServiceClient::new(fleet.admin());
    let err =
        backups.clone().delete_backup(DeleteBackupRequest { id: id.clone(), ..Default::default() }).await.unwrap_err();
    assert!(err.code() == Code::FailedPrecondition && err.message().contains("pass force"), "{err:?}");

    let (ok, out, err) = fleet.cli(&["backup", "delete", &id, "--force"]);
    assert!(ok, "{out}\n{err}");
    held.release();
    let out = cli.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("the import was stopped"), "{said}");
    wait_for("the import's backup to be gone", Duration::from_secs(60), || {
        let mut c = backups.clone();
        let id = id.clone();
        async move {
            matches!(c.get_backup(GetBackupRequest { id }).await, Err(s) if s.code() == Code::NotFound).then_some(())
        }
    })
    .await;
    assert!(agent.log_text().contains("stopped: the backup was deleted while it was being imported"));
    assert!(!repo.join("backups").join(&id).exists(), "nothing of it is published");
    let staged: Vec<_> = std::fs::read_dir(repo.join("tmp")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(staged.is_empty(), "neither its image nor staged chunks are left: {staged:?}");
    assert_eq!(backup_usage(&fleet, "p1").await, (0, 0), "its quota is released");
}

/// An import publishes its chunks before it writes the index that references them, as a backup does. Garbage
/// collection in between must keep them: the import counts as running from its start, so chunks written since
/// are newer than the collection's cutoff.
#[tokio::test]
async fn garbage_collection_during_a_cinder_import_keeps_the_chunks_it_has_not_yet_referenced() {
    let (OneSite { fleet, repo, storage: _storage, backup1: agent, .. }, held) =
        OneSite::start_held_at("backup.pause_import_commit").await;
    let cli = import_cinder_full(&fleet, &["--json"], std::process::Stdio::piped);
    wait_paused(&agent, "the import's chunks to be published").await;
    let published = chunk_files(&repo.join("chunks"));
    assert!(published > 0, "the import published its chunks before pausing");

    let gc = BackupServiceClient::new(fleet.admin())
        .collect_garbage(CollectGarbageRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gc.chunks_removed, 0, "the running import's chunks are kept: {gc:?}");
    assert_eq!(chunk_files(&repo.join("chunks")), published);
    held.release();
    let out = cli.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let imported: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(imported[0]["status"], "available", "{imported}");
    let report = BackupServiceClient::new(fleet.admin())
        .verify_backup(VerifyBackupRequest { id: imported[0]["id"].as_str().unwrap().into() })
        .await
        .unwrap()
        .into_inner();
    assert!(report.missing_chunks.is_empty() && report.corrupt_chunks.is_empty(), "{report:?}");
    assert_eq!(report.chunks_checked as usize, published, "{report:?}");
}

/// How many chunk files lie under `dir` (its fan-out directories).
fn chunk_files(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            n += chunk_files(&entry.path());
        } else {
            n += 1;
        }
    }
    n
}

/// Starts `ember [global] backup import-cinder` of the full backup in ../shared/testdata/cinder-backup-example
/// into project p1, its output going to `output`.
fn import_cinder_full(
    fleet: &ember_fleet_tests::Fleet,
    global: &[&str],
    output: fn() -> std::process::Stdio,
) -> std::process::Child {
    let example =
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/testdata/cinder-backup-example"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(example.join("manifest.json")).unwrap()).unwrap();
    let dir = example.join("backups").canonicalize().unwrap();
    let full = manifest["full"]["backup_id"].as_str().unwrap();
    let mut args = global.to_vec();
    args.extend(["backup", "import-cinder", dir.to_str().unwrap(), full, "--project", "p1"]);
    fleet.cli_command(&args).stdout(output()).stderr(output()).spawn().unwrap()
}
