//! Verifying a whole repository: each chunk is read once however many backups share it, and the damage is
//! reported per backup: corrupt and missing chunks by name, and backups the coordinator records there that
//! the repository no longer holds.

use ember_fleet_tests::backups::{OneSite, fill, sha256, wait_backup_settled};
use ember_fleet_tests::iscsi;
use ember_fleet_tests::volumes::new_volume;
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::collections::BTreeMap;
use std::path::Path;
use tonic::Code;

/// The name of the 1 MiB chunk holding test pattern `seed`: the sha256 of its plaintext (written to `scratch`).
fn chunk_name(scratch: &Path, seed: u8) -> String {
    let plain = scratch.join(format!("pattern-{seed}"));
    std::fs::write(&plain, iscsi::pattern(seed, 1 << 20)).unwrap();
    sha256(&plain)
}

/// Where the repository in `repo` keeps chunk `name`.
fn chunk_file(repo: &Path, name: &str) -> std::path::PathBuf {
    repo.join("chunks").join(&name[..2]).join(&name[2..4]).join(name)
}

#[tokio::test]
async fn a_repository_is_verified_chunk_by_chunk_once_and_its_damage_named_per_backup() {
    let OneSite { fleet, dir, repo, storage: _storage, backup1: _backup1, .. } = OneSite::start().await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let backups = BackupServiceClient::new(fleet.admin());
    let backup = |volume: &str, incremental: bool| {
        let mut c = backups.clone();
        let req = CreateBackupRequest { volume_id: volume.into(), incremental, ..Default::default() };
        async move {
            let b = c.create_backup(req).await.unwrap().into_inner();
            let b = wait_backup_settled(&c, &b.id).await;
            assert_eq!(b.status, "available", "{b:?}");
            b.id
        }
    };
    // Two volumes sharing their first MiB; the first changes its second MiB before an incremental.
    let (v1, v2) = (new_volume(&volumes, 1).await.id, new_volume(&volumes, 1).await.id);
    let file = |v: &str| dir.join(format!("volume-{v}"));
    for (v, seeds) in [(&v1, [61, 62]), (&v2, [61, 63])] {
        for (mib, seed) in seeds.into_iter().enumerate() {
            fill(&file(v), (mib as u64) << 20, seed, 1 << 20);
        }
    }
    let full1 = backup(&v1, false).await;
    let full2 = backup(&v2, false).await;
    fill(&file(&v1), 1 << 20, 64, 1 << 20);
    let incremental1 = backup(&v1, true).await;
    let lost = backup(&v2, false).await;

    let verify = |host: &str| {
        let mut c = backups.clone();
        let host = host.to_string();
        async move { c.verify_repository(VerifyRepositoryRequest { host }).await.map(|r| r.into_inner()) }
    };
    let clean = verify("backup1@repo1").await.unwrap();
    assert_eq!((clean.backups_checked, clean.chunks_checked), (4, 4), "8 references, 4 distinct chunks: {clean:?}");
    assert!(clean.damaged.is_empty() && clean.unreadable.is_empty() && clean.absent.is_empty(), "{clean:?}");

    // Refused, naming the problem.
    let member = BackupServiceClient::new(fleet.member("alice", "p1"));
    let req = VerifyRepositoryRequest { host: "backup1@repo1".into() };
    assert_eq!(member.clone().verify_repository(req).await.unwrap_err().code(), Code::PermissionDenied);
    let err = verify("backup1").await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().starts_with("host: "), "{err:?}");
    assert_eq!(verify("backup1@nope").await.unwrap_err().code(), Code::NotFound);

    // The shared chunk is corrupted, the incremental's own chunk lost, one backup's directory removed.
    let (shared, own) = (chunk_name(fleet.dir.path(), 61), chunk_name(fleet.dir.path(), 64));
    let mut bytes = std::fs::read(chunk_file(&repo, &shared)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(chunk_file(&repo, &shared), bytes).unwrap();
    std::fs::remove_file(chunk_file(&repo, &own)).unwrap();
    std::fs::remove_dir_all(repo.join("backups").join(&lost)).unwrap();

    let (ok, out, err) = fleet.cli(&["--json", "backup", "verify-repository", "backup1@repo1"]);
    assert!(!ok, "damage makes the command fail: {out}");
    assert!(err.contains("3 damaged, 0 unreadable, 1 absent backup(s)"), "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (r["ok"].as_bool(), r["backups_checked"].as_u64(), r["chunks_checked"].as_u64()),
        (Some(false), Some(3), Some(4))
    );
    let names = |v: &serde_json::Value| {
        v.as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    let damaged: BTreeMap<String, (Vec<String>, Vec<String>)> = r["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["id"].as_str().unwrap().to_string(), (names(&d["missing_chunks"]), names(&d["corrupt_chunks"]))))
        .collect();
    let expected: BTreeMap<String, (Vec<String>, Vec<String>)> = [
        (full1.clone(), (vec![], vec![shared.clone()])),
        (full2.clone(), (vec![], vec![shared.clone()])),
        (incremental1.clone(), (vec![own.clone()], vec![shared.clone()])),
    ]
    .into_iter()
    .collect();
    assert_eq!(damaged, expected, "{r}");
    assert_eq!(names(&r["absent"]), [lost], "{r}");
    // A per-backup verify agrees.
    let one = backups.clone().verify_backup(VerifyBackupRequest { id: incremental1 }).await.unwrap().into_inner();
    assert_eq!((one.missing_chunks, one.corrupt_chunks), (vec![own], vec![shared]));
}
