//! Backup helpers shared by the fleet tests.

use crate::volumes::{wait_backend, wait_settled};
use crate::{Daemon, Fleet, iscsi, wait_for};
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

/// Waits until backup `id` is neither being made nor read by a restore, and returns it.
pub async fn wait_backup_settled(client: &BackupServiceClient<Channel>, id: &str) -> Backup {
    wait_for(&format!("backup {id}"), Duration::from_secs(120), || {
        let mut c = client.clone();
        let id = id.to_string();
        async move {
            let b = c.get_backup(GetBackupRequest { id }).await.ok()?.into_inner();
            (b.status != "creating" && b.status != "restoring").then_some(b)
        }
    })
    .await
}

/// Makes a full backup of volume `volume_id` and returns it once available (panics if it fails).
pub async fn new_backup(backups: &BackupServiceClient<Channel>, volume_id: &str) -> Backup {
    let b = backups
        .clone()
        .create_backup(CreateBackupRequest { volume_id: volume_id.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let b = wait_backup_settled(backups, &b.id).await;
    assert_eq!(b.status, "available", "{b:?}");
    b
}

/// Restores `backup` into a new volume and returns that volume once it has settled (available or error).
pub async fn restore_new(
    backups: &BackupServiceClient<Channel>,
    volumes: &VolumeServiceClient<Channel>,
    backup: &str,
) -> Volume {
    let r = backups
        .clone()
        .restore_backup(RestoreBackupRequest { backup_id: backup.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    wait_settled(volumes, &r.volume_id).await
}

/// Waits until the backup agent's log says a pause failpoint (`backup.pause_stage_chunk`) holds it (`what`
/// names the moment).
pub async fn wait_paused(agent: &Daemon, what: &str) {
    wait_for(what, Duration::from_secs(60), || async { agent.log_text().contains("failpoint pause").then_some(()) })
        .await;
}

/// Project `project`'s (backups, backup_gigabytes) in use.
pub async fn backup_usage(fleet: &Fleet, project: &str) -> (i64, i64) {
    let quota = ember_proto::v1::quota_service_client::QuotaServiceClient::new(fleet.admin())
        .get_quota(GetQuotaRequest { project: project.into() })
        .await
        .unwrap()
        .into_inner();
    let in_use = |name: &str| quota.items.iter().find(|i| i.resource == name).map(|i| i.in_use).unwrap();
    (in_use("backups"), in_use("backup_gigabytes"))
}

/// sha256 of a whole file, with the system tool (fast, and not ours).
pub fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// Waits until the coordinator shows service `name` down.
pub async fn wait_down(fleet: &Fleet, name: &str) {
    let client = ember_proto::v1::fleet_service_client::FleetServiceClient::new(fleet.admin());
    wait_for(&format!("{name} to be down"), Duration::from_secs(30), || {
        let mut c = client.clone();
        async move {
            let list = c.list_services(ListServicesRequest::default()).await.ok()?.into_inner().services;
            list.iter().any(|s| s.name == name && !s.up).then_some(())
        }
    })
    .await;
}

/// Writes `len` bytes of test pattern `seed` at `offset` of `file` (a file-backend volume), durably.
pub fn fill(file: &Path, offset: u64, seed: u8, len: usize) {
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(&iscsi::pattern(seed, len), offset).unwrap();
    f.sync_all().unwrap();
}

/// A backup agent's config with one repository, `repo1` in `repo`, and no garbage-collection grace.
pub fn repository_toml(repo: &Path) -> String {
    format!("gc_grace_seconds = 0\n[[repositories]]\nname = \"repo1\"\ndirectory = \"{}\"\n", repo.display())
}

/// A coordinator, storage agent `storage1` (file backend `file1` in `dir`) and backup agent `backup1`
/// (repository `repo1` in `repo`), both registered.
pub struct OneSite {
    /// The fleet.
    pub fleet: Fleet,
    /// The storage agent's backend section, to start it again.
    pub backend: String,
    /// The file backend's directory.
    pub dir: PathBuf,
    /// The repository's directory.
    pub repo: PathBuf,
    /// Storage agent `storage1`.
    pub storage: Daemon,
    /// Backup agent `backup1`.
    pub backup1: Daemon,
}

/// What holds a backup agent's first staged chunk (failpoint `backup.pause_stage_chunk`) until
/// [`Held::release`]: a test acts while that backup runs, without racing a timed pause.
pub struct Held {
    _dir: tempfile::TempDir,
    file: PathBuf,
}

impl Held {
    /// Lets the held backup go on.
    pub fn release(&self) {
        std::fs::write(&self.file, b"").unwrap();
    }
}

impl OneSite {
    /// [`OneSite::start`] with the backup agent's first backup held mid-way (once it logs "failpoint pause",
    /// see [`wait_paused`]) until released.
    pub async fn start_held() -> (OneSite, Held) {
        Self::start_held_at("backup.pause_stage_chunk").await
    }

    /// [`OneSite::start_held`] at another pause point of the backup agent (`backup.pause_import`, …).
    pub async fn start_held_at(point: &str) -> (OneSite, Held) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("release");
        let env = [("EMBER_FAILPOINTS", point), ("EMBER_FAILPOINT_RELEASE", file.to_str().unwrap())];
        let site = Self::start_with(&env).await;
        (site, Held { _dir: dir, file })
    }

    /// Starts it all and waits until both agents are registered.
    pub async fn start() -> OneSite {
        Self::start_with(&[]).await
    }

    /// [`OneSite::start`] with `backup_env` in the backup agent's environment (e.g. `EMBER_FAILPOINTS`).
    pub async fn start_with(backup_env: &[(&str, &str)]) -> OneSite {
        let mut fleet = Fleet::new();
        fleet.start_coordinator();
        Self::start_on(fleet, backup_env).await
    }

    /// [`OneSite::start_with`] on `fleet`, whose coordinator runs already (started with settings of its own).
    pub async fn start_on(fleet: Fleet, backup_env: &[(&str, &str)]) -> OneSite {
        let (backend, dir) = fleet.file_backend("file1", "");
        let storage = fleet.start_agent("storage", "storage1", &backend);
        let repo = fleet.subdir("repo1");
        let backup1 = fleet.start_agent_with("backup", "backup1", &repository_toml(&repo), backup_env);
        wait_backend(&fleet, "storage1@file1").await;
        wait_backend(&fleet, "backup1").await;
        OneSite { fleet, backend, dir, repo, storage, backup1 }
    }
}
