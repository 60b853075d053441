//! Deleting a backup while it is being made (Cinder's `backup-delete --force`): it stops where it is, nothing of
//! it is kept, its volume is usable again and its quota is released.

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
