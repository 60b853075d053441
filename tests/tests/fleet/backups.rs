//! Backups end to end through the real fleet: bit-identical round trips along a chain of incrementals,
//! sparse volumes, dedup, verification of damaged chunks, deletion rules and garbage collection.

use ember_fleet_tests::backups::{backup_usage, sha256, wait_backup_settled};
use ember_fleet_tests::volumes::{new_snapshot, new_volume, wait_backend, wait_settled, wait_volume};
use ember_fleet_tests::{Fleet, iscsi, wait_for};
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

struct Env {
    fleet: Fleet,
    dir: PathBuf,
    repo: PathBuf,
    volumes: VolumeServiceClient<Channel>,
    backups: BackupServiceClient<Channel>,
    _agents: Vec<ember_fleet_tests::Daemon>,
}

async fn env() -> Env {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let repo = fleet.subdir("repo1");
    let storage = fleet.start_agent("storage", "storage1", &backend);
    let backup = fleet.start_agent(
        "backup",
        "backup1",
        &format!("gc_grace_seconds = 0\n[[repositories]]\nname = \"repo1\"\ndirectory = \"{}\"\n", repo.display()),
    );
    wait_backend(&fleet, "storage1@file1").await;
    wait_backend(&fleet, "backup1").await;
    ember_proto::v1::quota_service_client::QuotaServiceClient::new(fleet.admin())
        .set_quota(SetQuotaRequest {
            project: "p1".into(),
            limits: [
                ("gigabytes".to_string(), -1),
                ("volumes".to_string(), -1),
                ("backup_gigabytes".to_string(), -1),
                ("backups".to_string(), -1),
            ]
            .into(),
        })
        .await
        .unwrap();
    let channel = fleet.member("alice", "p1");
    Env {
        volumes: VolumeServiceClient::new(channel.clone()),
        backups: BackupServiceClient::new(channel),
        fleet,
        dir,
        repo,
        _agents: vec![storage, backup],
    }
}

impl Env {
    async fn volume(&self, size_gb: u64) -> String {
        new_volume(&self.volumes, size_gb).await.id
    }

    fn file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("volume-{id}"))
    }

    fn write(&self, id: &str, offset: u64, seed: u8, len: usize) {
        let f = std::fs::OpenOptions::new().write(true).open(self.file(id)).unwrap();
        f.write_all_at(&iscsi::pattern(seed, len), offset).unwrap();
        f.sync_all().unwrap();
    }

    async fn backup(&self, volume: &str, incremental: bool) -> Backup {
        let b = self
            .backups
            .clone()
            .create_backup(CreateBackupRequest { volume_id: volume.into(), incremental, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        self.wait_backup(&b.id).await
    }

    async fn wait_backup(&self, id: &str) -> Backup {
        wait_backup_settled(&self.backups, id).await
    }

    async fn restore_new(&self, backup: &str) -> Volume {
        ember_fleet_tests::backups::restore_new(&self.backups, &self.volumes, backup).await
    }
}

#[tokio::test]
async fn a_chain_of_incrementals_restores_bit_identically_and_moves_only_changes() {
    let e = env().await;
    let v = e.volume(1).await;
    e.write(&v, 0, 1, 3 << 20);
    e.write(&v, 500 << 20, 2, (2 << 20) + 12345);
    let mut chain = vec![(e.backup(&v, false).await, sha256(&e.file(&v)))];
    assert_eq!(chain[0].0.status, "available", "{:?}", chain[0].0);
    assert!(!chain[0].0.incremental);
    for (i, offset) in [100u64 << 20, 1, 900 << 20].into_iter().enumerate() {
        e.write(&v, offset, 10 + i as u8, 1 << 20);
        let b = e.backup(&v, true).await;
        assert_eq!(b.status, "available", "{b:?}");
        assert!(b.incremental);
        assert_eq!(b.parent_id, chain.last().unwrap().0.id);
        // A 1 MiB write touches at most two 1 MiB chunks (each stored with an 8-byte header).
        assert!(b.new_bytes <= (2 << 20) + 16, "an incremental stores only the changed chunks: {b:?}");
        chain.push((b, sha256(&e.file(&v))));
    }
    assert!(chain[0].0.stored_bytes >= 5 << 20, "random data is stored about raw: {:?}", chain[0].0);
    for (b, hash) in &chain {
        let restored = e.restore_new(&b.id).await;
        assert_eq!(restored.status, "available", "{restored:?}");
        assert_eq!(restored.source_backup_id, b.id);
        assert_eq!(&sha256(&e.file(&restored.id)), hash, "restore of {} is bit-identical", b.id);
        let after = e.backups.clone().get_backup(GetBackupRequest { id: b.id.clone() }).await.unwrap().into_inner();
        assert_eq!(after.status, "available", "the backup is available again after the restore");
    }

    // Deleting a backup with incrementals on it is refused; newest first works, then GC frees the chunks.
    let err = e
        .backups
        .clone()
        .delete_backup(DeleteBackupRequest { id: chain[0].0.id.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("incremental"), "{}", err.message());
    for (b, _) in chain.iter().rev() {
        e.backups.clone().delete_backup(DeleteBackupRequest { id: b.id.clone(), ..Default::default() }).await.unwrap();
        wait_for("backup gone", Duration::from_secs(30), || {
            let mut c = e.backups.clone();
            let id = b.id.clone();
            async move {
                matches!(c.get_backup(GetBackupRequest { id }).await, Err(s) if s.code() == Code::NotFound)
                    .then_some(())
            }
        })
        .await;
    }
    let gc = BackupServiceClient::new(e.fleet.admin())
        .collect_garbage(CollectGarbageRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(gc.chunks_removed >= 8, "{gc:?}");
    let left = walk(&e.repo.join("chunks"));
    assert_eq!(left, 0, "no chunk outlives every backup");
    ember_fleet_tests::volumes::assert_usage_exact(&e.fleet).await;
}

fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|it| it.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
        .unwrap_or(0)
}

#[tokio::test]
async fn sparse_volumes_dedup_larger_targets_and_damaged_chunks() {
    let e = env().await;
    // A 1 TiB sparse volume holding 10 MiB backs up quickly and stores about 10 MiB.
    let big = {
        let v = e
            .volumes
            .clone()
            .create_volume(CreateVolumeRequest { size_gb: 1024, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        wait_volume(&e.volumes, &v.id, "available").await.id
    };
    e.write(&big, 700 << 30, 3, 10 << 20);
    let b = e.backup(&big, false).await;
    assert_eq!(b.status, "available", "{b:?}");
    assert!(b.stored_bytes >= 10 << 20 && b.stored_bytes < 11 << 20, "{b:?}");

    // Two volumes holding the same data store it once.
    let a = e.volume(1).await;
    let twin = e.volume(1).await;
    for v in [&a, &twin] {
        e.write(v, 64 << 20, 4, 4 << 20);
    }
    let ba = e.backup(&a, false).await;
    let bt = e.backup(&twin, false).await;
    assert!(ba.new_bytes >= 4 << 20, "{ba:?}");
    assert_eq!(bt.new_bytes, 0, "the twin's chunks were already stored: {bt:?}");
    assert!(bt.dedup_ratio > 0.9, "{bt:?}");

    // Restore onto a larger existing volume: the data, then zeros.
    let larger = e.volume(2).await;
    e.write(&larger, 1500 << 20, 9, 1 << 20); // old data beyond the backup's size is left alone
    e.write(&larger, 64 << 20, 8, 1 << 20); // old data inside it is replaced
    e.backups
        .clone()
        .restore_backup(RestoreBackupRequest {
            backup_id: ba.id.clone(),
            volume_id: larger.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let restored = wait_settled(&e.volumes, &larger).await;
    assert_eq!(restored.status, "available", "{restored:?}");
    let (src, dst) = (std::fs::read(e.file(&a)).unwrap(), std::fs::File::open(e.file(&larger)).unwrap());
    let mut head = vec![0u8; src.len()];
    dst.read_exact_at(&mut head, 0).unwrap();
    assert!(head == src, "the first GiB equals the backed-up volume");

    // Restoring onto an in-use volume, an unknown backup, an incremental with no full: refused.
    let err = e
        .backups
        .clone()
        .restore_backup(RestoreBackupRequest {
            backup_id: "0a0a0a0a-1b1b-4c2c-8d3d-4e4e4e4e4e4e".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let fresh = e.volume(1).await;
    let err = e
        .backups
        .clone()
        .create_backup(CreateBackupRequest { volume_id: fresh.clone(), incremental: true, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("full"), "{}", err.message());
    let small = e
        .backups
        .clone()
        .restore_backup(RestoreBackupRequest {
            backup_id: b.id.clone(),
            volume_id: fresh.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(small.code(), Code::InvalidArgument, "a 1 TiB backup does not fit a 1 GiB volume");

    // Flip one byte of a stored chunk: verify names it; a restore fails naming it and the target is error.
    let clean = e.backups.clone().verify_backup(VerifyBackupRequest { id: ba.id.clone() }).await.unwrap().into_inner();
    assert!(
        clean.missing_chunks.is_empty() && clean.corrupt_chunks.is_empty() && clean.chunks_checked == 4,
        "{clean:?}"
    );
    let victim = first_chunk(&e.repo.join("chunks"));
    let bytes = std::fs::read(&victim).unwrap();
    let mut damaged = bytes.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x40;
    std::fs::write(&victim, damaged).unwrap();
    let name = victim.file_name().unwrap().to_string_lossy().to_string();
    let backups_holding = [&ba.id, &bt.id];
    let mut named = false;
    for id in backups_holding {
        let r = e.backups.clone().verify_backup(VerifyBackupRequest { id: id.clone() }).await.unwrap().into_inner();
        named |= r.corrupt_chunks.contains(&name);
    }
    let big_report =
        e.backups.clone().verify_backup(VerifyBackupRequest { id: b.id.clone() }).await.unwrap().into_inner();
    named |= big_report.corrupt_chunks.contains(&name);
    assert!(named, "verify names the damaged chunk {name}");
    let owner = if e
        .backups
        .clone()
        .verify_backup(VerifyBackupRequest { id: ba.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .corrupt_chunks
        .contains(&name)
    {
        ba.id.clone()
    } else {
        b.id.clone()
    };
    let r = e.restore_new(&owner).await;
    assert_eq!(r.status, "error", "{r:?}");
    assert!(r.status_reason.contains(&name), "the restore names the chunk: {}", r.status_reason);
    ember_fleet_tests::volumes::assert_usage_exact(&e.fleet).await;
}

fn first_chunk(dir: &Path) -> PathBuf {
    find_file(dir).unwrap_or_else(|| panic!("no chunk under {}", dir.display()))
}

fn find_file(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find_map(|e| if e.path().is_dir() { find_file(&e.path()) } else { Some(e.path()) })
}

/// Operators moving from Cinder keep their backups: a real Cinder 29 full + incremental, imported through the
/// CLI and restored bit-identically.
#[tokio::test]
async fn cinder_backups_import_and_restore_bit_identically() {
    let e = env().await;
    let example = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/testdata/cinder-backup-example"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(example.join("manifest.json")).unwrap()).unwrap();
    let size = manifest["volume_size"].as_u64().unwrap();
    let dir = example.join("backups").canonicalize().unwrap();
    for (which, image) in [("full", "vol0"), ("incremental", "vol1")] {
        let id = manifest[which]["backup_id"].as_str().unwrap();
        let (ok, out, err) =
            e.fleet.cli(&["--json", "backup", "import-cinder", dir.to_str().unwrap(), id, "--project", "p1"]);
        assert!(ok, "{which}: {err}");
        let imported: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(imported[0]["status"], "available");
        assert_eq!(imported[0]["volume_id"], manifest[which]["volume_id"]);
        let restored = e.restore_new(imported[0]["id"].as_str().unwrap()).await;
        assert_eq!(restored.status, "available", "{restored:?}");
        let data = std::fs::read(e.file(&restored.id)).unwrap();
        let head = &data[..size as usize];
        let digest = sha2_hex(head);
        assert_eq!(digest, manifest[image]["sha256"].as_str().unwrap(), "{which} restores {image}");
        assert!(data[size as usize..].iter().all(|b| *b == 0), "the rest of the volume is zero");
    }
    // A damaged Cinder backup is refused, naming the block that does not match.
    let copy = e.fleet.subdir("cinder-copy");
    let status = std::process::Command::new("cp").arg("-a").arg(&dir).arg(&copy).status().unwrap();
    assert!(status.success());
    let full = manifest["full"]["backup_id"].as_str().unwrap();
    let container = copy.join("backups").join(manifest["full"]["container"].as_str().unwrap());
    let object = container.join(format!("{}-00001", manifest["full"]["object_prefix"].as_str().unwrap()));
    let mut bytes = std::fs::read(&object).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&object, bytes).unwrap();
    let (ok, _, err) =
        e.fleet.cli(&["backup", "import-cinder", copy.join("backups").to_str().unwrap(), full, "--project", "p1"]);
    assert!(!ok, "a damaged backup must not import");
    assert!(err.contains("import failed"), "{err}");
    ember_fleet_tests::volumes::assert_usage_exact(&e.fleet).await;
}

fn sha2_hex(data: &[u8]) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// Whether the first `len` bytes of two files are equal, read 8 MiB at a time.
fn same_prefix(a: &Path, b: &Path, len: u64) -> bool {
    let (a, b) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    let (mut x, mut y) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    (0..len).step_by(8 << 20).all(|off| {
        let n = (len - off).min(8 << 20) as usize;
        a.read_exact_at(&mut x[..n], off).unwrap();
        b.read_exact_at(&mut y[..n], off).unwrap();
        x[..n] == y[..n]
    })
}

#[tokio::test]
async fn a_restore_into_a_new_volume_takes_a_size_type_and_zone_and_refuses_a_smaller_size() {
    let e = env().await;
    let admin_volumes = VolumeServiceClient::new(e.fleet.admin());
    let (ok, _, err) = e.fleet.cli(&["type", "create", "silver"]);
    assert!(ok, "{err}");
    let v = e.volume(2).await;
    e.write(&v, 64 << 20, 5, 3 << 20);
    e.write(&v, 1900 << 20, 6, 1 << 20);
    let b = e.backup(&v, false).await;
    assert_eq!(b.status, "available", "{b:?}");

    // Through the CLI, as a person would: 3 GiB, type silver, zone nova. The backup's 2 GiB, then zeros.
    let (ok, out, err) = e.fleet.cli(&[
        "--json",
        "backup",
        "restore",
        &b.id,
        "--size",
        "3",
        "--type",
        "silver",
        "--availability-zone",
        "nova",
        "--name",
        "bigger",
        "--wait",
    ]);
    assert!(ok, "{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["volume_id"].as_str().unwrap().to_string();
    let got = admin_volumes.clone().get_volume(GetVolumeRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(
        (
            got.status.as_str(),
            got.size_gb,
            got.volume_type_name.as_str(),
            got.availability_zone.as_str(),
            got.name.as_str()
        ),
        ("available", 3, "silver", "nova", "bigger"),
        "{got:?}"
    );
    assert_eq!((got.source_backup_id.as_str(), got.project.as_str()), (b.id.as_str(), "p1"), "{got:?}");
    let file = e.file(&id);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 3 << 30);
    assert!(same_prefix(&e.file(&v), &file, 2 << 30), "the first 2 GiB are the backup's");
    let mut tail = vec![1u8; 8 << 20];
    std::fs::File::open(&file).unwrap().read_exact_at(&mut tail, 2 << 30).unwrap();
    assert!(tail.iter().all(|&x| x == 0), "past the backup's size the new volume reads zeros");

    // `ember volume create --backup` is the same restore, through the volume API.
    let (ok, out, err) =
        e.fleet.cli(&["--json", "volume", "create", "--backup", &b.id, "--size", "4", "--name", "viacreate", "--wait"]);
    assert!(ok, "{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let created = if created.is_array() { created[0].clone() } else { created };
    assert_eq!((created["status"].as_str(), created["size_gb"].as_u64()), (Some("available"), Some(4)), "{created}");
    assert_eq!(created["source_backup_id"].as_str(), Some(b.id.as_str()), "{created}");
    assert!(same_prefix(&e.file(&v), &e.file(created["id"].as_str().unwrap()), 2 << 30));

    // Refused, naming the field, and nothing changes: no new volume, the backup stays available.
    let before = admin_volumes.clone().list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().volumes;
    let refuse = |req: RestoreBackupRequest| {
        let mut c = e.backups.clone();
        async move { c.restore_backup(req).await.unwrap_err() }
    };
    let base = RestoreBackupRequest { backup_id: b.id.clone(), ..Default::default() };
    let smaller = refuse(RestoreBackupRequest { size_gb: 1, ..base.clone() }).await;
    assert_eq!(smaller.code(), Code::InvalidArgument);
    assert!(smaller.message().starts_with("size_gb: must be at least the source's 2 GiB"), "{}", smaller.message());
    let unknown = refuse(RestoreBackupRequest { volume_type: "no-such-type".into(), ..base.clone() }).await;
    assert_eq!(unknown.code(), Code::NotFound, "{}", unknown.message());
    assert!(unknown.message().contains("volume_type"), "{}", unknown.message());
    let onto = RestoreBackupRequest { volume_id: v.clone(), ..base.clone() };
    let sized = refuse(RestoreBackupRequest { size_gb: 3, ..onto.clone() }).await;
    assert_eq!(sized.code(), Code::InvalidArgument);
    assert!(sized.message().starts_with("size_gb: is for a new volume"), "{}", sized.message());
    let zoned = refuse(RestoreBackupRequest { availability_zone: "nova".into(), ..onto }).await;
    assert!(zoned.message().starts_with("availability_zone: is for a new volume"), "{}", zoned.message());
    let after = admin_volumes.clone().list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().volumes;
    assert_eq!(after.len(), before.len(), "a refused restore creates no volume");
    let still = e.backups.clone().get_backup(GetBackupRequest { id: b.id.clone() }).await.unwrap().into_inner();
    assert_eq!(still.status, "available", "{still:?}");
    let source = e.volumes.clone().get_volume(GetVolumeRequest { id: v.clone() }).await.unwrap().into_inner();
    assert_eq!(source.status, "available", "{source:?}");
    ember_fleet_tests::volumes::assert_usage_exact(&e.fleet).await;
}

#[tokio::test]
async fn a_coordinator_that_lost_its_database_adopts_the_repositorys_backups() {
    let mut e = env().await;
    let v = e.volume(1).await;
    e.write(&v, 0, 3, 2 << 20);
    let full = e
        .backups
        .clone()
        .create_backup(CreateBackupRequest { volume_id: v.clone(), name: "nightly".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let full = e.wait_backup(&full.id).await;
    e.write(&v, 512 << 20, 4, 1 << 20);
    // The incremental reads a snapshot, which its manifest records with the snapshot's time.
    let snapshots = ember_proto::v1::snapshot_service_client::SnapshotServiceClient::new(e.fleet.member("alice", "p1"));
    let snap = new_snapshot(&snapshots, &v).await;
    let incr = e
        .backups
        .clone()
        .create_backup(CreateBackupRequest {
            volume_id: v.clone(),
            incremental: true,
            snapshot_id: snap.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let incr = e.wait_backup(&incr.id).await;
    assert_eq!((full.status.as_str(), incr.status.as_str()), ("available", "available"));
    let source_sha = sha256(&e.file(&v));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(e.repo.join("backups").join(&full.id).join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!((manifest["project"].as_str(), manifest["name"].as_str()), (Some("p1"), Some("nightly")), "{manifest}");
    // A backup directory whose manifest is damaged: reported, not adopted.
    let damaged = e.repo.join("backups").join("0a0a0a0a-1b1b-4c2c-8d3d-4e4e4e4e4e4e");
    std::fs::create_dir_all(&damaged).unwrap();
    std::fs::write(damaged.join("manifest.json"), b"{ not json").unwrap();
    // A copy of a backup's directory under another id: its manifest names the original, so it is not adopted.
    let copy = e.repo.join("backups").join("1b1b1b1b-1b1b-4c2c-8d3d-4e4e4e4e4e4e");
    std::fs::create_dir_all(&copy).unwrap();
    for file in ["index", "manifest.json"] {
        std::fs::copy(e.repo.join("backups").join(&full.id).join(file), copy.join(file)).unwrap();
    }
    // An encrypted backup's directory whose sealed key is damaged: adopted, it would restore as ciphertext
    // that nothing opens, so it is named rather than adopted as plain data.
    let keyless = e.repo.join("backups").join("2c2c2c2c-1b1b-4c2c-8d3d-4e4e4e4e4e4e");
    std::fs::create_dir_all(&keyless).unwrap();
    std::fs::copy(e.repo.join("backups").join(&full.id).join("index"), keyless.join("index")).unwrap();
    let mut damaged_key = manifest.clone();
    damaged_key["backup_id"] = "2c2c2c2c-1b1b-4c2c-8d3d-4e4e4e4e4e4e".into();
    damaged_key["key"] = serde_json::json!({"wrapped": "not hex", "secret_uuid": "u", "header_bytes": 1052672});
    std::fs::write(keyless.join("manifest.json"), serde_json::to_vec(&damaged_key).unwrap()).unwrap();

    // The database is lost: a new, empty one under a restarted coordinator. The agents register again.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", e.fleet.database().display()));
    }
    e.fleet.start_coordinator();
    wait_backend(&e.fleet, "storage1@file1").await;
    wait_backend(&e.fleet, "backup1").await;
    let admin = BackupServiceClient::new(e.fleet.admin());
    let listed = admin.clone().list_backups(ListBackupsRequest::default()).await.unwrap().into_inner().backups;
    assert!(listed.is_empty(), "a new database knows no backups: {listed:?}");

    // Refused, naming the problem, changing nothing.
    let err = e
        .backups
        .clone()
        .import_repository_backups(ImportRepositoryBackupsRequest {
            host: "backup1@repo1".into(),
            project: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "members may not: {err:?}");
    let ask = |host: &str| {
        let mut c = admin.clone();
        let host = host.to_string();
        async move { c.import_repository_backups(ImportRepositoryBackupsRequest { host, project: String::new() }).await }
    };
    let err = ask("backup1").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("host: "), "{}", err.message());
    assert_eq!(ask("backup1@no-such-repo").await.unwrap_err().code(), Code::NotFound);
    assert!(admin.clone().list_backups(ListBackupsRequest::default()).await.unwrap().into_inner().backups.is_empty());

    // Through the CLI: both backups come back, to their project, parent first; the damaged manifest, the
    // copied directory and the damaged key are named.
    let (ok, out, err) = e.fleet.cli(&["--json", "backup", "import-repository", "backup1@repo1"]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let imported = r["imported"].as_array().unwrap();
    let ids: Vec<&str> = imported.iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [full.id.as_str(), incr.id.as_str()], "{r}");
    assert_eq!(r["already_known"].as_u64(), Some(0), "{r}");
    let skipped: Vec<&str> = r["skipped"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    assert_eq!(skipped.len(), 3, "{r}");
    let keyless = "2c2c2c2c-1b1b-4c2c-8d3d-4e4e4e4e4e4e: its manifest's sealed key is damaged (not hex)";
    assert!(skipped.contains(&keyless), "the damaged key: {r}");
    assert!(skipped.iter().any(|x| x.starts_with("0a0a0a0a-")), "the damaged manifest: {r}");
    let named = format!("1b1b1b1b-1b1b-4c2c-8d3d-4e4e4e4e4e4e: its manifest names backup \"{}\"", full.id);
    assert!(skipped.contains(&named.as_str()), "the copied directory: {r}");
    let mine = e.backups.clone().list_backups(ListBackupsRequest::default()).await.unwrap().into_inner().backups;
    let back = |id: &str| mine.iter().find(|b| b.id == id).cloned().unwrap_or_else(|| panic!("{id} in {mine:?}"));
    let (f, i) = (back(&full.id), back(&incr.id));
    assert_eq!(
        (f.status.as_str(), f.name.as_str(), f.project.as_str(), f.volume_id.as_str()),
        ("available", "nightly", "p1", v.as_str())
    );
    assert_eq!((f.stored_bytes, f.new_bytes, f.size_gb), (full.stored_bytes, full.new_bytes, 1));
    assert_eq!((i.incremental, i.parent_id.as_str(), i.host.as_str()), (true, full.id.as_str(), "backup1@repo1"));
    assert_eq!((f.snapshot_id.as_str(), f.data_timestamp), ("", full.data_timestamp), "the full read the volume");
    assert_eq!((i.snapshot_id.as_str(), i.data_timestamp), (snap.id.as_str(), snap.created_at), "{i:?}");

    // The adopted incremental restores bit-identically; asking again adopts nothing twice.
    let restored = e.restore_new(&incr.id).await;
    assert_eq!(restored.status, "available", "{restored:?}");
    assert_eq!(sha256(&e.file(&restored.id)), source_sha);
    let again = ask("backup1@repo1").await.unwrap().into_inner();
    assert_eq!((again.imported.len(), again.already_known), (0, 2), "{again:?}");
    ember_fleet_tests::volumes::assert_usage_exact(&e.fleet).await;
}

/// The storage agent marks a volume before a restore's first write and clears the mark only once a whole stream
/// is flushed. A restore the backup agent stops (a damaged chunk) ends its stream as a whole one would, without
/// the final message: after a database loss, manage adopts the whole restore's volume and refuses the partial
/// one, and manageable says why.
#[tokio::test]
async fn after_a_database_loss_manage_refuses_the_volume_of_a_restore_cut_short() {
    let mut e = env().await;
    let v = e.volume(1).await;
    e.write(&v, 0, 5, 3 << 20);
    let b = e.backup(&v, false).await;
    assert_eq!(b.status, "available", "{b:?}");
    let mark = |dir: &Path, id: &str| dir.join(format!(".incomplete-volume-{id}"));
    let whole = e.restore_new(&b.id).await;
    assert_eq!(whole.status, "available", "{whole:?}");
    assert!(!mark(&e.dir, &whole.id).exists(), "a whole restore leaves no mark");
    let victim = first_chunk(&e.repo.join("chunks"));
    let bytes = std::fs::read(&victim).unwrap();
    let mut damaged = bytes.clone();
    *damaged.last_mut().unwrap() ^= 0x40;
    std::fs::write(&victim, damaged).unwrap();
    let partial = e.restore_new(&b.id).await;
    assert_eq!(partial.status, "error", "{partial:?}");
    assert!(mark(&e.dir, &partial.id).exists(), "the cut-short restore's volume keeps its mark");
    std::fs::write(&victim, bytes).unwrap();

    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", e.fleet.database().display()));
    }
    e.fleet.start_coordinator();
    wait_backend(&e.fleet, "storage1@file1").await;
    let admin = VolumeServiceClient::new(e.fleet.admin());
    let listed = admin
        .clone()
        .list_manageable(ListManageableRequest { pool: "storage1@file1".into() })
        .await
        .unwrap()
        .into_inner()
        .volumes;
    let entry = |id: &str| listed.iter().find(|m| m.id == id).unwrap_or_else(|| panic!("{id} in {listed:?}"));
    assert!(entry(&whole.id).safe_to_manage, "{listed:?}");
    let p = entry(&partial.id);
    assert!(!p.safe_to_manage && p.reason_not_safe.contains("never finished"), "{p:?}");
    let manage = |id: &str| ManageVolumeRequest {
        pool: "storage1@file1".into(),
        id: id.into(),
        project: "p1".into(),
        ..Default::default()
    };
    let err = admin.clone().manage_volume(manage(&partial.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("never finished"), "{}", err.message());
    let adopted = admin.clone().manage_volume(manage(&whole.id)).await.unwrap().into_inner();
    assert_eq!(adopted.status, "available", "{adopted:?}");
    assert_eq!(sha256(&e.file(&whole.id)), sha256(&e.file(&v)), "the adopted volume holds the whole restore");
    ember_fleet_tests::volumes::assert_usage_exact(&e.fleet).await;
}

/// The ids a paged list returns, two at a time, checking each page's size and token; and that a malformed
/// token is refused naming it.
async fn two_at_a_time<F, Fut>(what: &str, mut list: F) -> Vec<String>
where
    F: FnMut(PageRequest) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<String>, String), tonic::Status>>,
{
    let err = list(PageRequest { page_size: 2, page_token: "garbage".into() }).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "page.page_token: malformed"), "{what}");
    let (first, token) = list(PageRequest { page_size: 2, page_token: String::new() }).await.unwrap();
    assert!(first.len() == 2 && !token.is_empty(), "{what}: {first:?} {token:?}");
    let (rest, end) = list(PageRequest { page_size: 2, page_token: token }).await.unwrap();
    assert!(rest.len() == 1 && end.is_empty(), "{what}: {rest:?} {end:?}");
    first.into_iter().chain(rest).collect()
}

#[tokio::test]
async fn volumes_snapshots_and_backups_list_page_by_page() {
    use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
    let e = env().await;
    let snapshots = SnapshotServiceClient::new(e.fleet.member("alice", "p1"));
    let mut volumes = Vec::new();
    for _ in 0..3 {
        volumes.push(e.volume(1).await);
    }
    let (mut snaps, mut backups) = (Vec::new(), Vec::new());
    for i in 0..3 {
        let s = new_snapshot(&snapshots, &volumes[0]).await;
        snaps.push(s.id);
        backups.push(e.backup(&volumes[1], i > 0).await.id);
    }

    let listed = two_at_a_time("volumes", |page| {
        let mut c = e.volumes.clone();
        async move {
            let r = c.list_volumes(ListVolumesRequest { page: Some(page), ..Default::default() }).await?.into_inner();
            Ok((r.volumes.into_iter().map(|v| v.id).collect(), r.page.unwrap_or_default().next_page_token))
        }
    })
    .await;
    assert_eq!(listed, volumes, "oldest first, each once");
    let listed = two_at_a_time("snapshots", |page| {
        let mut c = snapshots.clone();
        async move {
            let r =
                c.list_snapshots(ListSnapshotsRequest { page: Some(page), ..Default::default() }).await?.into_inner();
            Ok((r.snapshots.into_iter().map(|s| s.id).collect(), r.page.unwrap_or_default().next_page_token))
        }
    })
    .await;
    assert_eq!(listed, snaps);
    let listed = two_at_a_time("backups", |page| {
        let mut c = e.backups.clone();
        async move {
            let r = c.list_backups(ListBackupsRequest { page: Some(page), ..Default::default() }).await?.into_inner();
            Ok((r.backups.into_iter().map(|b| b.id).collect(), r.page.unwrap_or_default().next_page_token))
        }
    })
    .await;
    assert_eq!(listed, backups);

    // The CLI follows the pages itself.
    let (ok, out, err) = e.fleet.cli(&["--json", "backup", "list"]);
    assert!(ok, "{err}");
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(all.iter().map(|b| b["id"].as_str().unwrap()).collect::<Vec<_>>(), backups);
    ember_fleet_tests::volumes::assert_usage_exact(&e.fleet).await;
}

/// A delete the repository fails (here the manifest's path is a directory, standing in for an I/O error or a
/// dead NFS server) leaves the backup `error_deleting` with the reason, still counted against the quota. Once
/// the cause is gone, deleting again finishes: the backup, its files and its quota use are gone.
#[tokio::test]
async fn a_backup_whose_delete_failed_can_be_deleted_again() {
    let e = env().await;
    let v = e.volume(1).await;
    e.write(&v, 0, 41, 1 << 20);
    let b = e.backup(&v, false).await;
    assert_eq!(b.status, "available", "{b:?}");
    let dir = e.repo.join("backups").join(&b.id);
    let manifest = dir.join("manifest.json");
    std::fs::remove_file(&manifest).unwrap();
    std::fs::create_dir_all(manifest.join("in-the-way")).unwrap();

    e.backups.clone().delete_backup(DeleteBackupRequest { id: b.id.clone(), ..Default::default() }).await.unwrap();
    let failed = wait_for("the delete to fail", Duration::from_secs(60), || {
        let mut c = e.backups.clone();
        let id = b.id.clone();
        async move {
            let b = c.get_backup(GetBackupRequest { id }).await.ok()?.into_inner();
            (b.status == "error_deleting").then_some(b)
        }
    })
    .await;
    assert!(failed.status_reason.contains("deleting"), "{failed:?}");
    assert_eq!(backup_usage(&e.fleet, "p1").await, (1, 1), "a backup that is still there still counts");

    std::fs::remove_dir_all(manifest).unwrap();
    e.backups.clone().delete_backup(DeleteBackupRequest { id: b.id.clone(), ..Default::default() }).await.unwrap();
    wait_for("backup gone", Duration::from_secs(60), || {
        let mut c = e.backups.clone();
        let id = b.id.clone();
        async move {
            matches!(c.get_backup(GetBackupRequest { id }).await, Err(s) if s.code() == Code::NotFound).then_some(())
        }
    })
    .await;
    assert!(!dir.exists(), "the backup's directory is removed");
    assert_eq!(backup_usage(&e.fleet, "p1").await, (0, 0), "its quota use is released");
    ember_fleet_tests::volumes::assert_usage_exact(&e.fleet).await;
}
