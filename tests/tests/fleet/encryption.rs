//! Encrypted volumes (Cinder's LUKS encryption types, front end): a real guest writes through QEMU's LUKS layer
//! while the storage node's file holds only ciphertext, and sees its disk grow when the volume is extended; a
//! clone opens with its copied key and grows with its volume; a backup keeps the key and restores to a volume
//! the guest opens, also after a database loss (the manifest records the key, sealed); the key is a libvirt
//! secret only while attached; what cannot be done safely is refused, naming why.

use ember_fleet_tests::backups::{repository_toml, wait_backup_settled};
use ember_fleet_tests::libvirt::{ComputeFleet, Domain, attach_request, secrets};
use ember_fleet_tests::volumes::wait_volume;
use ember_fleet_tests::{Fleet, wait_for};
use ember_proto::v1::attachment_service_client::AttachmentServiceClient;
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::volume_type_service_client::VolumeTypeServiceClient;
use ember_proto::v1::*;
use std::io::Read;
use std::path::Path;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(60);
/// Bytes of the LUKS header of the default key size (256 bits, AES-128-XTS): guests see the rest.
const HEADER: u64 = 4096 + 8 * 131072;

/// Whether `needle` occurs anywhere in the file (GNU grep reads the 1 GiB file in a fraction of a second; a
/// byte loop in a debug build would hold the test's runtime long enough for its gRPC connections to time out).
fn file_contains(path: &Path, needle: &str) -> bool {
    let status = std::process::Command::new("grep").args(["-q", "-a", "-F", needle]).arg(path).status().unwrap();
    assert!(status.code().is_some_and(|c| c < 2), "grep failed on {}", path.display());
    status.success()
}

async fn secret_uuid(fleet: &Fleet, volume_id: &str) -> Option<String> {
    let db = fleet.db().await;
    sqlx::query_scalar("SELECT secret_uuid FROM volume_keys WHERE owner_id = ?")
        .bind(volume_id)
        .fetch_optional(&db)
        .await
        .unwrap()
}

async fn create(volumes: &VolumeServiceClient<Channel>, req: CreateVolumeRequest) -> Volume {
    let v = volumes.clone().create_volume(req).await.unwrap().into_inner();
    wait_volume(volumes, &v.id, "available").await
}

#[tokio::test]
async fn an_encrypted_volume_holds_only_ciphertext_while_its_guest_reads_and_writes_it() {
    let ComputeFleet { fleet, dir, storage: _storage, compute: _compute } = ComputeFleet::start("").await;
    let domain = Domain::boot("ember-luks").await;
    let mut types = VolumeTypeServiceClient::new(fleet.admin());
    let spec = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let bad = CreateVolumeTypeRequest {
        name: "bad".into(),
        extra_specs: spec(&[("encryption:provider", "luks"), ("encryption:key_size", "128")]),
        ..Default::default()
    };
    let refused = types.create_volume_type(bad).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("extra_specs") && refused.message().contains("key_size"), "{refused:?}");
    let secret = CreateVolumeTypeRequest {
        name: "secret".into(),
        extra_specs: spec(&[("encryption:provider", "luks")]),
        ..Default::default()
    };
    types.create_volume_type(secret).await.unwrap();

    let volumes = VolumeServiceClient::new(fleet.admin());
    let v =
        create(&volumes, CreateVolumeRequest { size_gb: 1, volume_type: "secret".into(), ..Default::default() }).await;
    assert!(v.encrypted);
    let file = dir.join(format!("volume-{}", v.id));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1 << 30, "the container fills the volume exactly");
    let mut magic = [0u8; 6];
    std::fs::File::open(&file).unwrap().read_exact(&mut magic).unwrap();
    assert_eq!(&magic, b"LUKS\xba\xbe");

    // Attached: QEMU opens the container with the key the compute host holds as a libvirt secret while
    // attached; the guest sees the payload and writes its marker, which the storage node holds only encrypted.
    let attachments = AttachmentServiceClient::new(fleet.admin());
    let a = attachments.clone().attach(attach_request(&v.id, &domain.name)).await.unwrap().into_inner();
    wait_volume(&volumes, &v.id, "in-use").await;
    let serial20 = &v.id[..20];
    domain.wait_console(&format!("DISK-SIZE serial={serial20} sectors={}", ((1 << 30) - HEADER) / 512), WAIT).await;
    domain.wait_console(&format!("DISK-WRITTEN serial={serial20}"), WAIT).await;
    let luks_secret = secret_uuid(&fleet, &v.id).await.expect("the volume has a key");
    assert!(secrets().contains(&luks_secret), "the passphrase is a libvirt secret while attached");
    assert!(domain.xml(true).contains(&format!("<secret type='passphrase' uuid='{luks_secret}'/>")));
    assert!(!file_contains(&file, &format!("EMBER-GUEST-WROTE {serial20}")), "only ciphertext is stored");

    // Extended while attached: QEMU grows the LUKS payload under the guest, which sees the new size less the header.
    let (ok, out, err) = fleet.cli(&["volume", "extend", &v.id, "2", "--wait"]);
    assert!(ok, "{out}\n{err}");
    let grown = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!((grown.status.as_str(), grown.size_gb, grown.status_reason.as_str()), ("in-use", 2, ""), "{grown:?}");
    domain.wait_console(&format!("DISK-SIZE serial={serial20} sectors={}", ((2 << 30) - HEADER) / 512), WAIT).await;

    // What would need the key elsewhere, or plain data, is refused naming why.
    let export = InitializeConnectionRequest {
        volume_id: v.id.clone(),
        connector: Some(Connector {
            host: "h".into(),
            ip: "127.0.0.1".into(),
            initiator: "iqn.2026-11.x:h".into(),
            read_only: false,
        }),
    };
    let exported = volumes.clone().initialize_connection(export).await.unwrap_err();
    assert_eq!(exported.code(), Code::FailedPrecondition, "{exported:?}");
    let retype = RetypeVolumeRequest { id: v.id.clone(), volume_type: "__DEFAULT__".into(), ..Default::default() };
    let plain = volumes.clone().retype_volume(retype).await.unwrap_err();
    assert!(plain.code() == Code::InvalidArgument && plain.message().contains("encryption"), "{plain:?}");
    let change =
        SetExtraSpecsRequest { id_or_name: "secret".into(), extra_specs: spec(&[("encryption:key_size", "512")]) };
    assert_eq!(types.set_extra_specs(change).await.unwrap_err().code(), Code::FailedPrecondition);
    let into_plain = CreateVolumeRequest { source_volume_id: v.id.clone(), ..Default::default() };
    let noise = volumes.clone().create_volume(into_plain).await.unwrap_err();
    assert!(noise.code() == Code::InvalidArgument && noise.message().contains("volume_type"), "{noise:?}");

    attachments.clone().detach(DetachRequest { attachment_id: a.id, ..Default::default() }).await.unwrap();
    wait_volume(&volumes, &v.id, "available").await;
    domain.wait_console(&format!("DISK-GONE serial={serial20}"), WAIT).await;
    assert!(!secrets().contains(&luks_secret), "the passphrase leaves the compute host with the disk");

    // A backup holds the ciphertext and keeps the key; a restore makes a bit-identical volume of an encrypted
    // type, which the guest opens.
    let _backup_agent = fleet.start_agent("backup", "backup1", &repository_toml(&fleet.subdir("repo1")));
    ember_fleet_tests::volumes::wait_backend(&fleet, "backup1").await;
    let backups = BackupServiceClient::new(fleet.admin());
    let b = CreateBackupRequest { volume_id: v.id.clone(), ..Default::default() };
    let b = backups.clone().create_backup(b).await.unwrap().into_inner();
    let b = wait_backup_settled(&backups, &b.id).await;
    assert_eq!(b.status, "available", "{b:?}");
    assert!(secret_uuid(&fleet, &b.id).await.is_some(), "the backup keeps the volume's key");
    let untyped = RestoreBackupRequest { backup_id: b.id.clone(), ..Default::default() };
    let untyped = backups.clone().restore_backup(untyped).await.unwrap_err();
    assert!(untyped.code() == Code::InvalidArgument && untyped.message().contains("volume_type"), "{untyped:?}");
    let restore = RestoreBackupRequest { backup_id: b.id.clone(), volume_type: "secret".into(), ..Default::default() };
    let restored = backups.clone().restore_backup(restore).await.unwrap().into_inner().volume_id;
    let restored = wait_volume(&volumes, &restored, "available").await;
    assert!(restored.encrypted);
    let restored_file = dir.join(format!("volume-{}", restored.id));
    let same = std::process::Command::new("cmp").arg("-s").arg(&file).arg(&restored_file).status().unwrap();
    assert!(same.success(), "the same ciphertext, byte for byte");
    attachments.clone().attach(attach_request(&restored.id, &domain.name)).await.unwrap();
    wait_volume(&volumes, &restored.id, "in-use").await;
    domain.wait_console(&format!("DISK-WRITTEN serial={}", &restored.id[..20]), WAIT).await;
    let (ok, out, err) = fleet.cli(&["backup", "delete", &b.id, "--wait"]);
    assert!(ok, "{out}\n{err}");
    wait_for("the key to go with its backup", WAIT, || async {
        secret_uuid(&fleet, &b.id).await.is_none().then_some(())
    })
    .await;

    // A clone copies the ciphertext and takes the key (under its own secret); extended while detached, its
    // payload grows with it, and a guest opens it.
    let clone =
        CreateVolumeRequest { source_volume_id: v.id.clone(), volume_type: "secret".into(), ..Default::default() };
    let clone = create(&volumes, clone).await;
    assert!(clone.encrypted);
    assert_ne!(secret_uuid(&fleet, &clone.id).await.unwrap(), luks_secret);
    let (ok, out, err) = fleet.cli(&["volume", "extend", &clone.id, "3", "--wait"]);
    assert!(ok, "{out}\n{err}");
    attachments.clone().attach(attach_request(&clone.id, &domain.name)).await.unwrap();
    wait_volume(&volumes, &clone.id, "in-use").await;
    let clone20 = &clone.id[..20];
    domain.wait_console(&format!("DISK-SIZE serial={clone20} sectors={}", ((3 << 30) - HEADER) / 512), WAIT).await;
    domain.wait_console(&format!("DISK-WRITTEN serial={clone20}"), WAIT).await;

    // Deleting a volume forgets its key.
    let (ok, out, err) = fleet.cli(&["volume", "delete", &v.id, "--wait"]);
    assert!(ok, "{out}\n{err}");
    wait_for("the key to go with its volume", WAIT, || async {
        secret_uuid(&fleet, &v.id).await.is_none().then_some(())
    })
    .await;
    assert!(secret_uuid(&fleet, &clone.id).await.is_some(), "the clone keeps its own");
    let master = fleet.database().with_file_name("master.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&master).unwrap().permissions().mode() & 0o777, 0o600, "{}", master.display());
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// Creates the encrypted volume type `secret` (LUKS, default key size).
async fn secret_type(fleet: &Fleet) {
    let secret = CreateVolumeTypeRequest {
        name: "secret".into(),
        extra_specs: [("encryption:provider".to_string(), "luks".to_string())].into(),
        ..Default::default()
    };
    VolumeTypeServiceClient::new(fleet.admin()).create_volume_type(secret).await.unwrap();
}

/// The coordinator's database is lost: it stops, its files go, and it starts on an empty one (with whatever
/// master key file is beside it); the agents register again.
async fn lose_the_database(fleet: &mut Fleet) {
    fleet.coordinator.as_mut().unwrap().kill();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", fleet.database().display()));
    }
    fleet.start_coordinator();
    for service in ["storage1@file1", "compute1", "backup1"] {
        ember_fleet_tests::volumes::wait_backend(fleet, service).await;
    }
    secret_type(fleet).await;
}

/// An encrypted volume's backup comes back from its repository after a database loss with its key: the manifest
/// records the key sealed under the master key, and a coordinator holding that master key adopts it, so the
/// restore opens in a guest. Under another master key the backup is adopted locked: its restores are refused,
/// naming the key, rather than making a volume of ciphertext nothing can open.
#[tokio::test]
async fn an_encrypted_backup_adopted_after_a_database_loss_keeps_its_key() {
    let ComputeFleet { mut fleet, dir, storage: _storage, compute: _compute } = ComputeFleet::start("").await;
    let domain = Domain::boot("ember-luks-adopt").await;
    let _backup_agent = fleet.start_agent("backup", "backup1", &repository_toml(&fleet.subdir("repo1")));
    ember_fleet_tests::volumes::wait_backend(&fleet, "backup1").await;
    secret_type(&fleet).await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v =
        create(&volumes, CreateVolumeRequest { size_gb: 1, volume_type: "secret".into(), ..Default::default() }).await;
    let backups = BackupServiceClient::new(fleet.admin());
    let b = CreateBackupRequest { volume_id: v.id.clone(), ..Default::default() };
    let b = backups.clone().create_backup(b).await.unwrap().into_inner();
    assert_eq!(wait_backup_settled(&backups, &b.id).await.status, "available");
    let manifest = fleet.subdir("repo1").join("backups").join(&b.id).join("manifest.json");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    let sealed = manifest["key"]["wrapped"].as_str().unwrap_or_default();
    assert!(sealed.len() > 64 && manifest["key"]["header_bytes"] == HEADER, "{manifest}");
    let import = |fleet: &Fleet| {
        let (ok, out, err) = fleet.cli(&["--json", "backup", "import-repository", "backup1@repo1"]);
        assert!(ok, "{out}\n{err}");
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(r["imported"][0]["id"].as_str(), Some(b.id.as_str()), "{r}");
        r["locked"].as_array().unwrap().iter().map(|id| id.as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    let restore = RestoreBackupRequest { backup_id: b.id.clone(), volume_type: "secret".into(), ..Default::default() };

    // Under another master key (the one that sealed the key is kept aside).
    let master = fleet.database().with_file_name("master.key");
    let kept = master.with_extension("kept");
    std::fs::rename(&master, &kept).unwrap();
    lose_the_database(&mut fleet).await;
    assert_eq!(import(&fleet), vec![b.id.clone()], "adopted, locked");
    let backups = BackupServiceClient::new(fleet.admin());
    let locked = backups.clone().restore_backup(restore.clone()).await.unwrap_err();
    assert_eq!(locked.code(), Code::FailedPrecondition, "{locked:?}");
    assert!(locked.message().contains(&b.id) && locked.message().contains("master key"), "{locked:?}");
    let volumes = VolumeServiceClient::new(fleet.admin());
    let none = volumes.clone().list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().volumes;
    assert!(none.is_empty(), "a refused restore makes no volume: {none:?}");

    // With the master key that sealed it: the key comes back with the backup, and the guest opens the restore.
    std::fs::rename(&kept, &master).unwrap();
    lose_the_database(&mut fleet).await;
    assert!(import(&fleet).is_empty(), "the key opens");
    let backups = BackupServiceClient::new(fleet.admin());
    let volumes = VolumeServiceClient::new(fleet.admin());
    let restored = backups.clone().restore_backup(restore).await.unwrap().into_inner().volume_id;
    let restored = wait_volume(&volumes, &restored, "available").await;
    assert!(restored.encrypted);
    let (original, copy) = (dir.join(format!("volume-{}", v.id)), dir.join(format!("volume-{}", restored.id)));
    let same = std::process::Command::new("cmp").arg("-s").arg(&original).arg(&copy).status().unwrap();
    assert!(same.success(), "the same ciphertext, byte for byte");
    let attachments = AttachmentServiceClient::new(fleet.admin());
    attachments.clone().attach(attach_request(&restored.id, &domain.name)).await.unwrap();
    wait_volume(&volumes, &restored.id, "in-use").await;
    let serial20 = &restored.id[..20];
    domain.wait_console(&format!("DISK-SIZE serial={serial20} sectors={}", ((1 << 30) - HEADER) / 512), WAIT).await;
    domain.wait_console(&format!("DISK-WRITTEN serial={serial20}"), WAIT).await;
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}
