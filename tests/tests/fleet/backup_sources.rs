//! Backups of snapshots: a backup may read an available snapshot of its volume instead of the volume (as
//! Cinder's `backup-create --snapshot-id`). The snapshot is held `backing-up` meanwhile, the volume is not held,
//! and an incremental builds on the backup with the newest data not newer than what it backs up.

use ember_fleet_tests::backups::{sha256, wait_backup_settled};
use ember_fleet_tests::volumes::{new_snapshot, new_volume, wait_backend, wait_snapshot, wait_volume};
use ember_fleet_tests::{Fleet, iscsi, wait_for};
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

struct Env {
    fleet: Fleet,
    dir: PathBuf,
    volumes: VolumeServiceClient<Channel>,
    snapshots: SnapshotServiceClient<Channel>,
    backups: BackupServiceClient<Channel>,
    backup_agent: ember_fleet_tests::Daemon,
    _storage: ember_fleet_tests::Daemon,
}

/// A fleet whose backup agent holds its first backup for a moment (`backup.pause_stage_chunk`).
async fn env() -> Env {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let repo = fleet.subdir("repo1");
    let storage = fleet.start_agent("storage", "storage1", &backend);
    let backup_agent = fleet.start_agent_with(
        "backup",
        "backup1",
        &format!("[[repositories]]\nname = \"repo1\"\ndirectory = \"{}\"\n", repo.display()),
        &[("EMBER_FAILPOINTS", "backup.pause_stage_chunk")],
    );
    wait_backend(&fleet, "storage1@file1").await;
    wait_backend(&fleet, "backup1").await;
    let channel = fleet.admin();
    Env {
        volumes: VolumeServiceClient::new(channel.clone()),
        snapshots: SnapshotServiceClient::new(channel.clone()),
        backups: BackupServiceClient::new(channel),
        fleet,
        dir,
        backup_agent,
        _storage: storage,
    }
}

impl Env {
    fn file(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("volume-{volume}"))
    }

    fn write(&self, volume: &str, seed: u8) {
        let f = std::fs::OpenOptions::new().write(true).open(self.file(volume)).unwrap();
        f.write_all_at(&iscsi::pattern(seed, 3 << 20), 0).unwrap();
        f.sync_all().unwrap();
    }

    async fn snapshot(&self, volume: &str) -> Snapshot {
        new_snapshot(&self.snapshots, volume).await
    }

    async fn wait_snapshot(&self, id: &str, status: &str) -> Snapshot {
        wait_snapshot(&self.snapshots, id, status).await
    }

    async fn start(&self, req: CreateBackupRequest) -> Backup {
        self.backups.clone().create_backup(req).await.unwrap().into_inner()
    }

    async fn wait_backup(&self, id: &str) -> Backup {
        wait_backup_settled(&self.backups, id).await
    }

    /// Restores `backup` into a new volume and returns the sha256 of what it holds.
    async fn restored_hash(&self, backup: &str) -> String {
        let v = ember_fleet_tests::backups::restore_new(&self.backups, &self.volumes, backup).await;
        assert_eq!(v.status, "available", "{v:?}");
        self.wait_backup(backup).await;
        sha256(&self.file(&v.id))
    }
}

#[tokio::test]
async fn a_snapshot_is_backed_up_as_it_was_taken_and_held_while_it_is_read() {
    let e = env().await;
    let v = new_volume(&e.volumes, 1).await.id;
    e.write(&v, 1);
    let then = sha256(&e.file(&v));
    let s1 = e.snapshot(&v).await;
    e.write(&v, 2);
    let now = sha256(&e.file(&v));
    assert_ne!(then, now);

    // The snapshot's backup runs (held by the failpoint): the snapshot cannot be deleted, the volume is free,
    // and a backup of the volume itself runs beside it.
    let b1 =
        e.start(CreateBackupRequest { volume_id: v.clone(), snapshot_id: s1.id.clone(), ..Default::default() }).await;
    assert_eq!((b1.status.as_str(), b1.snapshot_id.as_str()), ("creating", s1.id.as_str()));
    wait_for("the snapshot's backup to be mid-way", Duration::from_secs(60), || async {
        e.backup_agent.log_text().contains("failpoint pause").then_some(())
    })
    .await;
    assert_eq!(e.wait_snapshot(&s1.id, "backing-up").await.status, "backing-up");
    let err = e.snapshots.clone().delete_snapshot(DeleteSnapshotRequest { id: s1.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("backing-up"), "{}", err.message());
    let volume = e.volumes.clone().get_volume(GetVolumeRequest { id: v.clone() }).await.unwrap().into_inner();
    assert_eq!(volume.status, "available", "a snapshot's backup does not hold the volume");
    let b2 = e.start(CreateBackupRequest { volume_id: v.clone(), ..Default::default() }).await;

    let b1 = e.wait_backup(&b1.id).await;
    let b2 = e.wait_backup(&b2.id).await;
    assert_eq!((b1.status.as_str(), b2.status.as_str()), ("available", "available"), "{b1:?} {b2:?}");
    assert_eq!(b1.data_timestamp, s1.created_at, "the snapshot's data is from when it was taken");
    let seconds = |b: &Backup| b.data_timestamp.map(|t| (t.seconds, t.nanos)).unwrap();
    assert!(seconds(&b2) > seconds(&b1), "{b2:?}");
    assert_eq!(e.wait_snapshot(&s1.id, "available").await.status, "available", "the snapshot is given back");
    wait_volume(&e.volumes, &v, "available").await;
    assert_eq!(e.restored_hash(&b1.id).await, then, "the snapshot's backup holds the data as the snapshot took it");
    assert_eq!(e.restored_hash(&b2.id).await, now);

    // An incremental of the snapshot builds on the backup of the same moment, not on the newer b2 (through
    // the CLI); an incremental of the volume builds on the newest data, b2, though b3 was made later.
    let (ok, out, err) =
        e.fleet.cli(&["--json", "backup", "create", &v, "--snapshot", &s1.id, "--incremental", "--wait"]);
    assert!(ok, "{err}");
    let b3: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((b3[0]["parent_id"].as_str(), b3[0]["status"].as_str()), (Some(b1.id.as_str()), Some("available")));
    assert_eq!(b3[0]["snapshot_id"], s1.id.as_str());
    let b4 = e.start(CreateBackupRequest { volume_id: v.clone(), incremental: true, ..Default::default() }).await;
    assert_eq!(b4.parent_id, b2.id);
    assert_eq!(e.wait_backup(&b4.id).await.status, "available");
    assert_eq!(e.restored_hash(b3[0]["id"].as_str().unwrap()).await, then);

    // Refusals name the problem and change nothing.
    let w = new_volume(&e.volumes, 1).await.id;
    let t1 = e.snapshot(&w).await;
    let err = e
        .backups
        .clone()
        .create_backup(CreateBackupRequest { volume_id: v.clone(), snapshot_id: t1.id.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("snapshot_id") && err.message().contains(&w), "{}", err.message());
    let err = e
        .backups
        .clone()
        .create_backup(CreateBackupRequest { volume_id: v.clone(), snapshot_id: uuid_like(7), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let full = e.start(CreateBackupRequest { volume_id: w.clone(), ..Default::default() }).await;
    assert_eq!(e.wait_backup(&full.id).await.status, "available");
    let err = e
        .backups
        .clone()
        .create_backup(CreateBackupRequest {
            volume_id: w.clone(),
            snapshot_id: t1.id.clone(),
            incremental: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("older than the snapshot"), "{}", err.message());
    assert_eq!(e.wait_snapshot(&t1.id, "available").await.status, "available", "the refused backup held nothing");
    let all = e.backups.clone().list_backups(ListBackupsRequest::default()).await.unwrap().into_inner().backups;
    assert_eq!(all.len(), 5, "b1–b4 and w's full backup, nothing from the refusals: {all:?}");
}

/// A well-formed id that names nothing.
fn uuid_like(n: u8) -> String {
    format!("00000000-0000-4000-8000-{:012}", n)
}
