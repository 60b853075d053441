//! A backup node dies and another backup agent takes over its repository (an NFS share survives the node
//! that mounted it): the backups move to the new agent and are restored, extended and deleted through it. And
//! a backup node lost with its disks: an admin forgets its backups, which can be adopted again if it returns.

use ember_fleet_tests::backups::{OneSite, fill, repository_toml, restore_new, sha256, wait_backup_settled, wait_down};
use ember_fleet_tests::volumes::{new_volume, wait_backend};
use ember_fleet_tests::{Fleet, wait_for};
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::quota_service_client::QuotaServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::time::Duration;
use tonic::Code;

/// Backups the coordinator has, as (id, status, host).
async fn locations(backups: &BackupServiceClient<tonic::transport::Channel>) -> Vec<(String, String, String)> {
    let mut all = backups.clone().list_backups(ListBackupsRequest::default()).await.unwrap().into_inner().backups;
    all.sort_by_key(|b| b.created_at.map(|t| (t.seconds, t.nanos)));
    all.into_iter().map(|b| (b.id, b.status, b.host)).collect()
}

/// Ids of the backups listed with filters `status` and `host`, oldest first.
async fn listed(backups: &BackupServiceClient<tonic::transport::Channel>, status: &str, host: &str) -> Vec<String> {
    let req = ListBackupsRequest { status: status.into(), host: host.into(), ..Default::default() };
    let all = backups.clone().list_backups(req).await.unwrap().into_inner().backups;
    all.into_iter().map(|b| b.id).collect()
}

#[tokio::test]
async fn a_repository_whose_agent_died_is_taken_over_by_another_agent_and_its_backups_work_there() {
    let OneSite { fleet, dir, repo, storage: _storage, mut backup1, .. } = OneSite::start().await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let backups = BackupServiceClient::new(fleet.admin());

    // A full backup and two incrementals, each of different data.
    let v = new_volume(&volumes, 1).await;
    let file = dir.join(format!("volume-{}", v.id));
    let mut chain = Vec::new();
    let mut shas = Vec::new();
    for (i, seed) in [41u8, 42, 43].into_iter().enumerate() {
        fill(&file, (i as u64) << 22, seed, 2 << 20);
        let req = CreateBackupRequest { volume_id: v.id.clone(), incremental: i > 0, ..Default::default() };
        let b = backups.clone().create_backup(req).await.unwrap().into_inner();
        let b = wait_backup_settled(&backups, &b.id).await;
        assert_eq!((b.status.as_str(), b.host.as_str()), ("available", "backup1@repo1"), "{b:?}");
        chain.push(b.id);
        shas.push(sha256(&file));
    }

    // A copy of the repository, served by a second agent while the first still serves the original: nothing
    // moves, and each backup is named with the reason.
    let copy = fleet.subdir("repo1-copy");
    let cp = std::process::Command::new("cp").arg("-a").arg(repo.join(".")).arg(&copy).status().unwrap();
    assert!(cp.success());
    let _backup2 = fleet.start_agent("backup", "backup2", &repository_toml(&copy));
    wait_backend(&fleet, "backup2").await;
    let take_over = || {
        let mut c = backups.clone();
        async move {
            let req = ImportRepositoryBackupsRequest { host: "backup2@repo1".into(), project: String::new() };
            c.import_repository_backups(req).await.unwrap().into_inner()
        }
    };
    let refused = take_over().await;
    assert_eq!((refused.imported.len(), refused.moved.len(), refused.already_known), (0, 0, 0), "{refused:?}");
    assert_eq!(refused.skipped.len(), 3, "{refused:?}");
    for id in &chain {
        let why = format!("{id}: recorded at backup1@repo1, which is still served");
        assert!(refused.skipped.iter().any(|s| s.starts_with(&why)), "{why} in {refused:?}");
    }
    assert!(
        locations(&backups).await.iter().all(|(_, s, h)| (s.as_str(), h.as_str()) == ("available", "backup1@repo1"))
    );

    // The first backup node dies. Work on its backups is refused, pointing at the way out; a delete is accepted
    // and waits for an agent.
    backup1.kill();
    wait_down(&fleet, "backup1").await;
    let restore = RestoreBackupRequest { backup_id: chain[1].clone(), ..Default::default() };
    let err = backups.clone().restore_backup(restore).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("backup agent backup1") && err.message().contains("import-repository"), "{err:?}");
    backups.clone().delete_backup(DeleteBackupRequest { id: chain[2].clone(), ..Default::default() }).await.unwrap();
    let deleting = backups.clone().get_backup(GetBackupRequest { id: chain[2].clone() }).await.unwrap().into_inner();
    assert_eq!(deleting.status, "deleting");
    // What the dead node holds, and what waits for it, as an operator lists them.
    assert_eq!(listed(&backups, "", "backup1").await, chain);
    assert_eq!(listed(&backups, "deleting", "backup1@repo1").await, [chain[2].clone()]);
    let err = backups
        .clone()
        .list_backups(ListBackupsRequest { status: "avaliable".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().starts_with("status: "), "{err:?}");

    // The operator takes the repository over through the CLI: all three move, parents first.
    let (ok, out, err) = fleet.cli(&["--json", "backup", "import-repository", "backup2@repo1"]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let moved: Vec<&str> = r["moved"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(moved, chain.iter().map(String::as_str).collect::<Vec<_>>(), "{r}");
    assert!(r["moved"].as_array().unwrap().iter().all(|b| b["host"] == "backup2@repo1"), "{r}");
    assert_eq!((r["imported"].as_array().unwrap().len(), r["skipped"].as_array().unwrap().len()), (0, 0), "{r}");

    // The pending delete completes through the new agent, in its repository; the dead node's copy is untouched.
    let gone = chain[2].clone();
    wait_for("the delete to complete at backup2", Duration::from_secs(60), || {
        let mut c = backups.clone();
        let id = gone.clone();
        async move { (c.get_backup(GetBackupRequest { id }).await.err()?.code() == Code::NotFound).then_some(()) }
    })
    .await;
    assert!(!copy.join("backups").join(&gone).exists(), "deleted from the repository backup2 serves");
    assert!(repo.join("backups").join(&gone).exists(), "the dead agent's directory is not backup2's to touch");
    let (ok, out, err) = fleet.cli(&["--json", "backup", "list", "--host", "backup2@repo1"]);
    assert!(ok, "{err}");
    let now_there: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(now_there, chain[..2]);
    assert!(listed(&backups, "", "backup1").await.is_empty());

    // The moved incremental restores bit-identically through the new agent; the next incremental builds on it
    // there; a second take-over finds everything in place.
    let restored = restore_new(&backups, &volumes, &chain[1]).await;
    assert_eq!(restored.status, "available", "{restored:?}");
    assert_eq!(sha256(&dir.join(format!("volume-{}", restored.id))), shas[1]);
    let req = CreateBackupRequest { volume_id: v.id.clone(), incremental: true, ..Default::default() };
    let next = backups.clone().create_backup(req).await.unwrap().into_inner();
    let next = wait_backup_settled(&backups, &next.id).await;
    assert_eq!(
        (next.status.as_str(), next.parent_id.as_str(), next.host.as_str()),
        ("available", chain[1].as_str(), "backup2@repo1"),
        "{next:?}"
    );
    let again = take_over().await;
    assert_eq!((again.moved.len(), again.already_known, again.skipped.len()), (0, 3, 0), "{again:?}");
    let hosts: Vec<String> = locations(&backups).await.into_iter().map(|(_, _, h)| h).collect();
    assert_eq!(hosts, ["backup2@repo1"; 3], "full, first incremental, the new incremental");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// Backup quota use of project `project`: (backups, backup_gigabytes).
async fn backup_quota(fleet: &Fleet, project: &str) -> (i64, i64) {
    let quota = QuotaServiceClient::new(fleet.admin())
        .get_quota(GetQuotaRequest { project: project.into() })
        .await
        .unwrap()
        .into_inner();
    let used = |r: &str| quota.items.iter().find(|i| i.resource == r).map_or(0, |i| i.in_use + i.reserved);
    (used("backups"), used("backup_gigabytes"))
}

#[tokio::test]
async fn backups_whose_repository_is_lost_for_good_are_forgotten_by_an_admin_and_can_be_adopted_again() {
    let OneSite { fleet, dir, repo, storage: _storage, mut backup1, .. } = OneSite::start().await;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let mine = BackupServiceClient::new(fleet.member("alice", "p1"));
    let admin = BackupServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    fill(&dir.join(format!("volume-{}", v.id)), 0, 51, 2 << 20);
    let mut chain = Vec::new();
    for incremental in [false, true] {
        let req = CreateBackupRequest { volume_id: v.id.clone(), incremental, ..Default::default() };
        let b = mine.clone().create_backup(req).await.unwrap().into_inner();
        assert_eq!(wait_backup_settled(&mine, &b.id).await.status, "available");
        chain.push(b.id);
    }
    assert_eq!(backup_quota(&fleet, "p1").await, (2, 2));
    let forget = |id: &str| DeleteBackupRequest { id: id.into(), forget: true, ..Default::default() };

    // Refused, naming the reason, changing nothing: a member; a repository still served; a parent.
    let err = mine.clone().delete_backup(forget(&chain[1])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("forget"), "{err:?}");
    let err = admin.clone().delete_backup(forget(&chain[1])).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("repository backup1@repo1, which is served"), "{err:?}");
    backup1.kill();
    wait_down(&fleet, "backup1").await;
    let err = admin.clone().delete_backup(forget(&chain[0])).await.unwrap_err();
    assert!(err.message().contains("incremental backup(s) built on it"), "{err:?}");
    assert_eq!(locations(&admin).await.len(), 2);
    assert_eq!(backup_quota(&fleet, "p1").await, (2, 2));

    // The node is lost. A delete waits for it; the admin forgets both, the incremental through the CLI.
    mine.clone().delete_backup(DeleteBackupRequest { id: chain[1].clone(), ..Default::default() }).await.unwrap();
    let (ok, out, err) = fleet.cli(&["backup", "delete", &chain[1], "--forget"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("backup {} forgotten", chain[1]));
    admin.clone().delete_backup(forget(&chain[0])).await.unwrap();
    assert!(locations(&admin).await.is_empty());
    assert_eq!(backup_quota(&fleet, "p1").await, (0, 0), "their quota is released");
    // The delete that waited for the agent ends, with nothing left to do.
    let pool = fleet.db().await;
    wait_for("the waiting delete to end", Duration::from_secs(30), || {
        let pool = pool.clone();
        let id = chain[1].clone();
        async move {
            let state: String =
                sqlx::query_scalar("SELECT state FROM operations WHERE resource_id = ? AND kind = 'delete_backup'")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .ok()?;
            (state == "done").then_some(())
        }
    })
    .await;
    for id in &chain {
        assert!(repo.join("backups").join(id).join("manifest.json").exists(), "the repository was not touched");
    }

    // The disks turn up after all: the repository's backups are adopted again, to their project.
    let _backup1 = fleet.start_agent("backup", "backup1", &repository_toml(&repo));
    let again = wait_for("the repository to be adopted again", Duration::from_secs(30), || {
        let mut c = admin.clone();
        async move {
            let req = ImportRepositoryBackupsRequest { host: "backup1@repo1".into(), project: String::new() };
            c.import_repository_backups(req).await.ok().map(|r| r.into_inner())
        }
    })
    .await;
    let ids: Vec<&str> = again.imported.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, [chain[0].as_str(), chain[1].as_str()], "{again:?}");
    assert!(again.imported.iter().all(|b| b.project == "p1" && b.status == "available"), "{again:?}");
    assert_eq!(backup_quota(&fleet, "p1").await, (2, 2));
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}
