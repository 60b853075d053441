//! Where backups go: to the repository with the most free space, as the backup agents report it with every
//! heartbeat, and never to a full one. The repositories are small tmpfs mounts, so their free space is known
//! and nothing else in the machine changes it. And to the availability zone a create asks for. And a restore
//! into a new volume that no pool can take releases its backup.

use ember_fleet_tests::backups::{restore_new, sha256, wait_backup_settled, wait_down};
use ember_fleet_tests::volumes::{new_volume, wait_backend};
use ember_fleet_tests::{Fleet, iscsi, wait_for};
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tonic::Code;

/// A tmpfs of `size_mib` mounted on a directory, unmounted (lazily: agents may still hold files) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf, size_mib: u64) -> Tmpfs {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs on {}", dir.display());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `mib` MiB (or until the filesystem is full, when `mib` is `None`) into a new file in `dir`.
fn ballast(dir: &Path, name: &str, mib: Option<u64>) {
    let mut f = std::fs::File::create(dir.join(name)).unwrap();
    let block = vec![0x5a_u8; 1 << 20];
    for _ in 0..mib.unwrap_or(u64::MAX) {
        if f.write_all(&block).is_err() {
            assert!(mib.is_none(), "the ballast did not fit");
            return;
        }
    }
}

/// The free bytes backup agent `host` last reported for its one repository.
async fn reported_free(fleet: &Fleet, host: &str) -> u64 {
    let report: String = sqlx::query_scalar("SELECT report FROM services WHERE role = 'backup' AND host = ?")
        .bind(host)
        .fetch_one(&fleet.db().await)
        .await
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    report["repositories"][0]["free_bytes"].as_u64().unwrap()
}

#[tokio::test]
async fn backups_go_where_there_is_most_room_and_never_to_a_full_repository() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let small = Tmpfs::mount(fleet.subdir("small"), 32);
    let big = Tmpfs::mount(fleet.subdir("big"), 128);
    let repo =
        |name: &str, dir: &Path| format!("[[repositories]]\nname = \"{name}\"\ndirectory = \"{}\"\n", dir.display());
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    let _backup1 = fleet.start_agent("backup", "backup1", &repo("small", &small.0));
    let _backup2 = fleet.start_agent("backup", "backup2", &repo("big", &big.0));
    for name in ["storage1@file1", "backup1", "backup2"] {
        wait_backend(&fleet, name).await;
    }
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await.id;
    let f = std::fs::OpenOptions::new().write(true).open(dir.join(format!("volume-{v}"))).unwrap();
    f.write_all_at(&iscsi::pattern(31, 1 << 20), 0).unwrap();
    let backups = BackupServiceClient::new(fleet.admin());
    let backup = || {
        let mut c = backups.clone();
        let v = v.clone();
        async move { c.create_backup(CreateBackupRequest { volume_id: v, ..Default::default() }).await }
    };

    let first = backup().await.unwrap().into_inner();
    assert_eq!(first.host, "backup2@big", "the bigger repository has more room");
    assert_eq!(wait_backup_settled(&backups, &first.id).await.status, "available");

    // The big one fills up; its agent's next heartbeat says so, and the next backup goes to the small one.
    ballast(&big.0, "ballast", Some(112));
    wait_for("backup2's heartbeat to report less room than backup1's", Duration::from_secs(30), || async {
        (reported_free(&fleet, "backup2").await < reported_free(&fleet, "backup1").await).then_some(())
    })
    .await;
    let second = backup().await.unwrap().into_inner();
    assert_eq!(second.host, "backup1@small");
    assert_eq!(wait_backup_settled(&backups, &second.id).await.status, "available");

    // Both full: refused, naming them; nothing is made and the volume is untouched.
    ballast(&big.0, "more", None);
    ballast(&small.0, "ballast", None);
    wait_for("both agents to report full repositories", Duration::from_secs(30), || async {
        (reported_free(&fleet, "backup1").await == 0 && reported_free(&fleet, "backup2").await == 0).then_some(())
    })
    .await;
    let err = backup().await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("backup1@small") && err.message().contains("backup2@big"), "{}", err.message());
    let all = backups.clone().list_backups(ListBackupsRequest::default()).await.unwrap().into_inner().backups;
    assert_eq!(all.len(), 2, "{all:?}");
    let now = volumes.clone().get_volume(GetVolumeRequest { id: v.clone() }).await.unwrap().into_inner();
    assert_eq!(now.status, "available");
}

#[tokio::test]
async fn a_backup_goes_to_the_zone_asked_for_and_an_incremental_stays_with_its_parent() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let repo = |name: &str, zone: &str| {
        let dir = fleet.subdir(name);
        format!(
            "[[repositories]]\nname = \"{name}\"\ndirectory = \"{}\"\navailability_zone = \"{zone}\"\n",
            dir.display()
        )
    };
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    let _backup1 = fleet.start_agent("backup", "backup1", &repo("local", "nova"));
    let mut backup2 = fleet.start_agent("backup", "backup2", &repo("offsite", "dr"));
    for name in ["storage1@file1", "backup1", "backup2"] {
        wait_backend(&fleet, name).await;
    }
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    assert_eq!(v.availability_zone, "nova");
    let file = dir.join(format!("volume-{}", v.id));
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().write_all_at(&iscsi::pattern(33, 3 << 20), 0).unwrap();
    let backups = BackupServiceClient::new(fleet.admin());
    let create = |incremental: bool, zone: &str| {
        let mut c = backups.clone();
        let req = CreateBackupRequest {
            volume_id: v.id.clone(),
            incremental,
            availability_zone: zone.into(),
            ..Default::default()
        };
        async move { c.create_backup(req).await.map(|r| r.into_inner()) }
    };

    // No zone asked for: the volume's.
    let local = create(false, "").await.unwrap();
    assert_eq!((local.host.as_str(), local.availability_zone.as_str()), ("backup1@local", "nova"));
    assert_eq!(wait_backup_settled(&backups, &local.id).await.status, "available");
    // Another site, through the CLI; it restores bit-identically from there.
    let (ok, out, err) = fleet.cli(&["--json", "backup", "create", &v.id, "--availability-zone", "dr", "--wait"]);
    assert!(ok, "{err}");
    let offsite: serde_json::Value = serde_json::from_str(&out).unwrap();
    let offsite = &offsite[0];
    assert_eq!(
        (offsite["host"].as_str(), offsite["availability_zone"].as_str()),
        (Some("backup2@offsite"), Some("dr"))
    );
    let offsite_id = offsite["id"].as_str().unwrap().to_string();
    let restored = restore_new(&backups, &volumes, &offsite_id).await;
    assert_eq!(restored.status, "available", "{restored:?}");
    assert_eq!(sha256(&dir.join(format!("volume-{}", restored.id))), sha256(&file));
    // The next incremental builds on that newest backup, in its repository.
    let incremental = create(true, "dr").await.unwrap();
    assert_eq!((incremental.parent_id.as_str(), incremental.host.as_str()), (offsite_id.as_str(), "backup2@offsite"));
    assert_eq!(wait_backup_settled(&backups, &incremental.id).await.status, "available");

    // Refused, naming the field and the reason, making nothing.
    let err = create(true, "nova").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("availability_zone: an incremental is made in its parent's repository"),
        "{err:?}"
    );
    assert!(err.message().contains("backup2@offsite"), "{err:?}");
    let err = create(false, "mars").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(err.message(), "availability_zone: \"mars\" is not a zone with a backup repository");
    let err = create(false, "not a zone!").await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().starts_with("availability_zone: "), "{err:?}");
    // The zone's only agent is down: no other zone stands in for it.
    backup2.kill();
    wait_down(&fleet, "backup2").await;
    let err = create(false, "dr").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(err.message(), "no backup repository in zone dr is up and enabled");
    let all = backups.clone().list_backups(ListBackupsRequest::default()).await.unwrap().into_inner().backups;
    assert_eq!(all.len(), 3, "{all:?}");
    let now = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!(now.status, "available");
}

/// A restore into a new volume that no pool can take (its one storage node is down) ends with that volume in
/// error, naming why, and the backup released: not held `restoring`, and so undeletable, for ever.
#[tokio::test]
async fn a_restore_whose_new_volume_finds_no_pool_releases_the_backup() {
    let ember_fleet_tests::backups::OneSite { fleet, backend, dir, repo: _, mut storage, backup1: _backup1 } =
        ember_fleet_tests::backups::OneSite::start().await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    ember_fleet_tests::backups::fill(&dir.join(format!("volume-{}", v.id)), 4 << 20, 21, 1 << 20);
    let backups = BackupServiceClient::new(fleet.admin());
    let b = ember_fleet_tests::backups::new_backup(&backups, &v.id).await;

    storage.kill();
    wait_down(&fleet, "storage1@file1").await;
    let target = restore_new(&backups, &volumes, &b.id).await;
    assert_eq!(target.status, "error", "{target:?}");
    assert!(target.status_reason.contains("No valid backend"), "{target:?}");
    let released = wait_backup_settled(&backups, &b.id).await;
    assert_eq!(released.status, "available", "the backup is still held by the failed restore: {released:?}");

    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let restored = restore_new(&backups, &volumes, &b.id).await;
    assert_eq!(restored.status, "available", "{restored:?}");
    assert_eq!(
        sha256(&dir.join(format!("volume-{}", restored.id))),
        sha256(&dir.join(format!("volume-{}", v.id))),
        "the second restore is not the volume backed up"
    );
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// A backup held `restoring` by no restore (what a create that failed before its restore began left, before
/// that was fixed) is released by the coordinator's next reconcile pass, and can then be deleted.
#[tokio::test]
async fn a_backup_held_by_no_restore_is_released() {
    let site = ember_fleet_tests::backups::OneSite::start().await;
    let volumes = VolumeServiceClient::new(site.fleet.admin());
    let v = new_volume(&volumes, 1).await;
    let backups = BackupServiceClient::new(site.fleet.admin());
    let b = ember_fleet_tests::backups::new_backup(&backups, &v.id).await;

    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", site.fleet.database().display())).await.unwrap();
    let held = sqlx::query("UPDATE backups SET status = 'restoring' WHERE id = ?").bind(&b.id).execute(&db).await;
    assert_eq!(held.unwrap().rows_affected(), 1);
    wait_for("the backup to be released", Duration::from_secs(30), || {
        let mut backups = backups.clone();
        let id = b.id.clone();
        async move {
            (backups.get_backup(GetBackupRequest { id }).await.ok()?.into_inner().status == "available").then_some(())
        }
    })
    .await;
    backups.clone().delete_backup(DeleteBackupRequest { id: b.id.clone(), ..Default::default() }).await.unwrap();
    wait_for("the backup to be deleted", Duration::from_secs(30), || {
        let mut backups = backups.clone();
        let id = b.id.clone();
        async move { (backups.get_backup(GetBackupRequest { id }).await.err()?.code() == Code::NotFound).then_some(()) }
    })
    .await;
}
