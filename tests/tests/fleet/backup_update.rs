//! Renaming a backup and changing its description (Cinder's backup-update), by its owner or an admin; the
//! repository's own record of them (the manifest, which a coordinator that adopts the repository reads) follows.

use ember_fleet_tests::backups::{OneSite, fill, wait_backup_settled, wait_paused};
use ember_fleet_tests::volumes::new_volume;
use ember_fleet_tests::wait_for;
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::path::Path;
use std::time::Duration;
use tonic::Code;

/// Waits until backup `id`'s manifest in `repo` records `name` and `description`.
async fn wait_manifest(repo: &Path, id: &str, name: &str, description: &str) {
    let path = repo.join("backups").join(id).join("manifest.json");
    wait_for(&format!("the manifest to say {name:?}, {description:?}"), Duration::from_secs(30), || async {
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
        // An empty description is left out of the manifest.
        let text = |field: &str| m[field].as_str().unwrap_or_default().to_string();
        (text("name") == name && text("description") == description).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_backup_is_renamed_and_redescribed_by_its_owner_or_an_admin_and_bad_updates_change_nothing() {
    let OneSite { fleet, repo, storage: _storage, backup1: _backup1, .. } = OneSite::start().await;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let alice = BackupServiceClient::new(fleet.member("alice", "p1"));
    let v = new_volume(&volumes, 1).await;
    let req = CreateBackupRequest {
        volume_id: v.id.clone(),
        name: "nightly".into(),
        description: "before the upgrade".into(),
        ..Default::default()
    };
    let b = alice.clone().create_backup(req).await.unwrap().into_inner();
    assert_eq!(wait_backup_settled(&alice, &b.id).await.status, "available");
    let show = |id: String| {
        let mut c = alice.clone();
        async move { c.get_backup(GetBackupRequest { id }).await.unwrap().into_inner() }
    };

    // The owner renames it; the description, unset in the request, stays.
    let update = |name: Option<&str>, description: Option<&str>| UpdateBackupRequest {
        id: b.id.clone(),
        name: name.map(String::from),
        description: description.map(String::from),
    };
    let renamed = alice.clone().update_backup(update(Some("weekly"), None)).await.unwrap().into_inner();
    assert_eq!((renamed.name.as_str(), renamed.description.as_str()), ("weekly", "before the upgrade"));
    let now = show(b.id.clone()).await;
    assert_eq!((now.name.as_str(), now.status.as_str()), ("weekly", "available"));
    wait_manifest(&repo, &b.id, "weekly", "before the upgrade").await;

    // An admin, through the CLI, changes the description only.
    let (ok, out, err) = fleet.cli(&["--json", "backup", "update", &b.id, "--description", "kept offsite"]);
    assert!(ok, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((shown[0]["name"].as_str(), shown[0]["description"].as_str()), (Some("weekly"), Some("kept offsite")));
    wait_manifest(&repo, &b.id, "weekly", "kept offsite").await;

    // Refused, naming the field, changing nothing: another project's member, a malformed id, a long name.
    let bob = BackupServiceClient::new(fleet.member("bob", "p2"));
    assert_eq!(bob.clone().update_backup(update(Some("mine"), None)).await.unwrap_err().code(), Code::NotFound);
    let bad_id = UpdateBackupRequest { id: "B1".into(), name: Some("x".into()), description: None };
    let err = alice.clone().update_backup(bad_id).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().starts_with("id: "), "{err:?}");
    let long = "n".repeat(256);
    let err = alice.clone().update_backup(update(Some(&long), Some("lost"))).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().starts_with("name: "), "{err:?}");
    let now = show(b.id.clone()).await;
    assert_eq!((now.name.as_str(), now.description.as_str()), ("weekly", "kept offsite"));
}

#[tokio::test]
async fn a_backup_renamed_while_it_is_being_made_is_complete_under_its_new_name() {
    let (OneSite { fleet, dir, repo, storage: _storage, backup1: agent, .. }, held) = OneSite::start_held().await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let backups = BackupServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 51, 2 << 20);
    let req = CreateBackupRequest { volume_id: v.id.clone(), name: "first".into(), ..Default::default() };
    let b = backups.clone().create_backup(req).await.unwrap().into_inner();
    wait_paused(&agent, "the backup to be mid-way").await;
    let rename = UpdateBackupRequest { id: b.id.clone(), name: Some("second".into()), description: None };
    let renamed = backups.clone().update_backup(rename).await.unwrap().into_inner();
    assert_eq!((renamed.name.as_str(), renamed.status.as_str()), ("second", "creating"));
    held.release();
    assert_eq!(wait_backup_settled(&backups, &b.id).await.status, "available");
    // The agent wrote the manifest with the name the backup started with; the rename follows it there.
    wait_manifest(&repo, &b.id, "second", "").await;
    let log = fleet.coordinator.as_ref().unwrap().log_text();
    assert!(!log.contains("operation paused"), "waiting for the backup is no fault to warn of:\n{log}");
}
