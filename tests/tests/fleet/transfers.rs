//! Handing a volume to another project (Cinder's volume transfers): the owner offers it and gets a one-time
//! key, and whoever is given the transfer's id and key accepts it into their own project. The volume keeps its
//! id, its data and its snapshots; the quota usage moves with it; a wrong key, a quota the receiver lacks or a
//! withdrawn offer change nothing.

use ember_common::identity::Role;
use ember_fleet_tests::backups::{OneSite, backup_usage, fill, wait_backup_settled};
use ember_fleet_tests::volumes::{new_snapshot, new_volume, read_at, usage, wait_backend};
use ember_fleet_tests::{Fleet, iscsi, wait_for};
use ember_proto::v1::backup_service_client::BackupServiceClient;
use ember_proto::v1::quota_service_client::QuotaServiceClient;
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::transfer_service_client::TransferServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::os::unix::fs::FileExt;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

/// The value of `key` in `ember transfer create`'s output (`transfer_id …`, `auth_key …`).
fn field(out: &str, key: &str) -> String {
    out.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string()).unwrap_or_default()
}

/// `project`'s use of the quota resources a volume and its snapshots count.
async fn counted(fleet: &Fleet, project: &str) -> [i64; 3] {
    [
        usage(fleet, project, "volumes").await,
        usage(fleet, project, "snapshots").await,
        usage(fleet, project, "gigabytes").await,
    ]
}

async fn set_quota(fleet: &Fleet, project: &str, resource: &str, limit: i64) {
    let req = SetQuotaRequest { project: project.into(), limits: [(resource.to_string(), limit)].into() };
    QuotaServiceClient::new(fleet.admin()).set_quota(req).await.unwrap();
}

#[tokio::test]
async fn a_volume_and_its_snapshot_move_to_the_project_that_accepts_the_transfer() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let alice_tls = fleet.issue(Role::Member, "alice", Some("p1"));
    let bob_tls = fleet.issue(Role::Member, "bob", Some("p2"));
    let alice = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let bob = VolumeServiceClient::new(fleet.member("bob", "p2"));
    let v = new_volume(&alice, 1).await;
    let file = dir.join(format!("volume-{}", v.id));
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().write_all_at(b"precious", 4096).unwrap();
    let snap = new_snapshot(&SnapshotServiceClient::new(fleet.member("alice", "p1")), &v.id).await;
    assert_eq!(counted(&fleet, "p1").await, [1, 1, 2]);

    let (ok, out, err) = fleet.cli_as(&alice_tls, &["transfer", "create", &v.id, "--name", "to-bob"]);
    assert!(ok, "{out}\n{err}");
    let (id, key) = (field(&out, "transfer_id"), field(&out, "auth_key"));
    assert_eq!((id.len(), key.len()), (36, 16), "{out}");
    let offered = alice.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!(offered.status, "awaiting-transfer");
    let extend = ExtendVolumeRequest { id: v.id.clone(), new_size_gb: 2 };
    let err = alice.clone().extend_volume(extend).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "nothing else is done with an offered volume: {err:?}");
    let transfers = TransferServiceClient::new(fleet.member("alice", "p1"));
    let listed = transfers.clone().list_transfers(ListTransfersRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.transfers.len(), 1);
    assert_eq!((listed.transfers[0].name.as_str(), listed.transfers[0].auth_key.as_str()), ("to-bob", ""));

    // Refusals change nothing: a wrong key, the offering project itself, a quota the receiver lacks.
    let bobs = TransferServiceClient::new(fleet.member("bob", "p2"));
    let err = bobs.clone().get_transfer(GetTransferRequest { id: id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "the offer is the offering project's to see: {err:?}");
    let wrong = AcceptTransferRequest { id: id.clone(), auth_key: "not-the-key-1234".into(), ..Default::default() };
    let err = bobs.clone().accept_transfer(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("auth_key"), "{err:?}");
    let own = AcceptTransferRequest { id: id.clone(), auth_key: key.clone(), ..Default::default() };
    let err = transfers.clone().accept_transfer(own).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    set_quota(&fleet, "p2", "snapshots", 0).await;
    let err = bobs
        .clone()
        .accept_transfer(AcceptTransferRequest { id: id.clone(), auth_key: key.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("snapshots"), "{err:?}");
    assert_eq!(counted(&fleet, "p1").await, [1, 1, 2]);
    assert_eq!(counted(&fleet, "p2").await, [0, 0, 0]);
    let still = alice.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!((still.project.as_str(), still.status.as_str()), ("p1", "awaiting-transfer"));

    set_quota(&fleet, "p2", "snapshots", -1).await;
    let (ok, out, err) = fleet.cli_as(&bob_tls, &["transfer", "accept", &id, &key]);
    assert!(ok && out.contains("transferred to project p2"), "{out}\n{err}");
    let moved = bob.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!((moved.project.as_str(), moved.status.as_str(), moved.size_gb), ("p2", "available", 1));
    let err = alice.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let bob_snaps = SnapshotServiceClient::new(fleet.member("bob", "p2"));
    let s = bob_snaps.clone().get_snapshot(GetSnapshotRequest { id: snap.id.clone() }).await.unwrap().into_inner();
    assert_eq!(s.project, "p2");
    assert_eq!(counted(&fleet, "p1").await, [0, 0, 0]);
    assert_eq!(counted(&fleet, "p2").await, [1, 1, 2]);
    assert_eq!(&read_at(&file, 4096), b"precious", "the data stayed where it was");
    let again = AcceptTransferRequest { id: id.clone(), auth_key: key, ..Default::default() };
    let err = bobs.clone().accept_transfer(again).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "a key works once: {err:?}");

    // The volume is now bob's to use and to delete.
    bob_snaps.clone().delete_snapshot(DeleteSnapshotRequest { id: snap.id.clone() }).await.unwrap();
    ember_fleet_tests::volumes::wait_snapshot_gone(&bob_snaps, &snap.id).await;
    bob.clone().delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() }).await.unwrap();
    ember_fleet_tests::volumes::wait_gone(&bob, &v.id).await;
    assert_eq!(counted(&fleet, "p2").await, [0, 0, 0]);
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

#[tokio::test]
async fn an_offer_outlives_a_coordinator_restart_and_a_withdrawn_one_frees_the_volume() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let alice = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let transfers = TransferServiceClient::new(fleet.member("alice", "p1"));
    let (kept, withdrawn) = (new_volume(&alice, 1).await, new_volume(&alice, 1).await);
    let offer = |volume_id: &str| {
        let mut t = transfers.clone();
        let req = CreateTransferRequest { volume_id: volume_id.into(), name: String::new() };
        async move { t.create_transfer(req).await.map(|r| r.into_inner()) }
    };
    let (first, second) = (offer(&kept.id).await.unwrap(), offer(&withdrawn.id).await.unwrap());
    let err = offer(&kept.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "one offer per volume: {err:?}");
    assert!(err.message().contains("awaiting-transfer"), "{err:?}");

    let (ok, out, err) =
        fleet.cli_as(&fleet.issue(Role::Member, "alice", Some("p1")), &["transfer", "delete", &second.id]);
    assert!(ok, "{out}\n{err}");
    let freed = alice.clone().get_volume(GetVolumeRequest { id: withdrawn.id.clone() }).await.unwrap().into_inner();
    assert_eq!(freed.status, "available");
    let bobs = TransferServiceClient::new(fleet.member("bob", "p2"));
    let late = AcceptTransferRequest { id: second.id.clone(), auth_key: second.auth_key.clone(), ..Default::default() };
    assert_eq!(bobs.clone().accept_transfer(late).await.unwrap_err().code(), Code::NotFound);

    fleet.coordinator.as_mut().unwrap().terminate();
    fleet.start_coordinator();
    let bobs = TransferServiceClient::new(fleet.member("bob", "p2"));
    let accept = AcceptTransferRequest { id: first.id.clone(), auth_key: first.auth_key.clone(), ..Default::default() };
    let accepted = bobs.clone().accept_transfer(accept).await.unwrap().into_inner();
    assert_eq!((accepted.volume_id.as_str(), accepted.project.as_str()), (kept.id.as_str(), "p2"));
    assert!(accepted.accepted_at.is_some());
    let bob = VolumeServiceClient::new(fleet.member("bob", "p2"));
    let v = bob.clone().get_volume(GetVolumeRequest { id: kept.id.clone() }).await.unwrap().into_inner();
    assert_eq!((v.project.as_str(), v.status.as_str()), ("p2", "available"));
    assert_eq!(usage(&fleet, "p1", "volumes").await, 1, "the withdrawn one stayed");
    assert_eq!(usage(&fleet, "p2", "volumes").await, 1);
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// A transferred volume's backups stay with the project that made them (as in Cinder), so the new owner's
/// first incremental has no parent of its own and is refused; once it makes a full one, its incrementals
/// build on that, and the old owner's chain is never tied to theirs: the old owner can still delete its full.
#[tokio::test]
async fn after_a_transfer_incrementals_build_only_on_the_new_projects_backups() {
    let site = OneSite::start().await;
    let fleet = &site.fleet;
    let alice = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let alice_backups = BackupServiceClient::new(fleet.member("alice", "p1"));
    let v = new_volume(&alice, 1).await;
    fill(&site.dir.join(format!("volume-{}", v.id)), 0, 7, 1 << 20);
    let make = |client: &BackupServiceClient<Channel>, incremental: bool| {
        let mut c = client.clone();
        let req = CreateBackupRequest { volume_id: v.id.clone(), incremental, ..Default::default() };
        async move { c.create_backup(req).await.map(|r| r.into_inner()) }
    };
    let alices_full = make(&alice_backups, false).await.unwrap();
    assert_eq!(wait_backup_settled(&alice_backups, &alices_full.id).await.status, "available");

    let transfers = TransferServiceClient::new(fleet.member("alice", "p1"));
    let req = CreateTransferRequest { volume_id: v.id.clone(), name: String::new() };
    let offer = transfers.clone().create_transfer(req).await.unwrap().into_inner();
    let accept = AcceptTransferRequest { id: offer.id, auth_key: offer.auth_key, ..Default::default() };
    TransferServiceClient::new(fleet.member("bob", "p2")).accept_transfer(accept).await.unwrap();

    let bob_backups = BackupServiceClient::new(fleet.member("bob", "p2"));
    let err = make(&bob_backups, true).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "alice's backup is no parent for bob's: {err:?}");
    assert!(err.message().contains("in project p2"), "{err:?}");
    assert_eq!(backup_usage(fleet, "p2").await, (0, 0), "a refusal takes no quota");
    let listed = bob_backups.clone().list_backups(ListBackupsRequest::default()).await.unwrap().into_inner();
    assert!(listed.backups.is_empty(), "nothing was recorded: {listed:?}");

    let bobs_full = make(&bob_backups, false).await.unwrap();
    assert_eq!(bobs_full.parent_id, "");
    assert_eq!(wait_backup_settled(&bob_backups, &bobs_full.id).await.status, "available");
    let bobs_incremental = make(&bob_backups, true).await.unwrap();
    assert_eq!(bobs_incremental.parent_id, bobs_full.id, "bob's incremental builds on bob's full");
    assert_eq!(wait_backup_settled(&bob_backups, &bobs_incremental.id).await.status, "available");

    let delete = DeleteBackupRequest { id: alices_full.id.clone(), ..Default::default() };
    alice_backups.clone().delete_backup(delete).await.expect("no other project's backup depends on alice's");
    wait_for("alice's full backup gone", Duration::from_secs(60), || {
        let mut c = alice_backups.clone();
        let id = alices_full.id.clone();
        async move { (c.get_backup(GetBackupRequest { id }).await.err()?.code() == Code::NotFound).then_some(()) }
    })
    .await;
    assert_eq!(backup_usage(fleet, "p1").await, (0, 0));
    assert_eq!(backup_usage(fleet, "p2").await, (2, 2));
    ember_fleet_tests::volumes::assert_usage_exact(fleet).await;
}

/// The old owner loses every way in: an export it made before the offer (target and CHAP secret) is closed at
/// the accept, and the volume gets new CHAP credentials at its next export, so the old secret opens nothing.
/// An accept the storage node cannot serve is refused and changes nothing.
#[tokio::test]
async fn the_offering_project_keeps_no_export_of_a_transferred_volume() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let mut storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let alice = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let v = new_volume(&alice, 1).await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(format!("volume-{}", v.id)))
        .unwrap()
        .write_all_at(&iscsi::pattern(3, 1 << 20), 0)
        .unwrap();
    let export = |initiator: &str| InitializeConnectionRequest {
        volume_id: v.id.clone(),
        connector: Some(Connector {
            host: "h".into(),
            ip: "127.0.0.1".into(),
            initiator: initiator.into(),
            read_only: false,
        }),
    };
    let alices = alice.clone().initialize_connection(export("iqn.2026-11.test:alice")).await.unwrap().into_inner();
    let scratch = fleet.dir.path().join("scratch.img");
    let before = iscsi::read(&iscsi::url(&alices, &alices.auth_password), 1, &scratch).unwrap();
    assert_eq!(before, iscsi::pattern(3, 1 << 20), "alice reads her volume over her export");

    let transfers = TransferServiceClient::new(fleet.member("alice", "p1"));
    let req = CreateTransferRequest { volume_id: v.id.clone(), name: String::new() };
    let offer = transfers.clone().create_transfer(req).await.unwrap().into_inner();
    let accept = AcceptTransferRequest { id: offer.id.clone(), auth_key: offer.auth_key.clone(), ..Default::default() };
    let bobs_transfers = TransferServiceClient::new(fleet.member("bob", "p2"));
    let mut watch = alice.clone().watch_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, "awaiting-transfer");

    // The storage node is down: the exports cannot be closed, so the volume does not change hands (UNAVAILABLE:
    // the same accept may succeed later).
    storage.terminate();
    let err = bobs_transfers.clone().accept_transfer(accept.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("exports must be closed"), "{err:?}");
    assert_eq!(counted(&fleet, "p1").await, [1, 0, 1]);
    assert_eq!(counted(&fleet, "p2").await, [0, 0, 0]);
    let still = alice.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!(still.status, "awaiting-transfer");

    // Registered anew (with its new address): the service may still show `up` from before it stopped.
    let storage = fleet.start_agent("storage", "storage1", &backend);
    storage.wait_registered().await;
    bobs_transfers.clone().accept_transfer(accept).await.expect("accepted once the node serves");
    let last = watch.message().await.unwrap();
    assert!(last.is_none(), "alice's watch ends; it shows nothing of bob's volume: {last:?}");
    assert!(!fleet.tgt_show("storage1").contains(&alices.target_iqn), "alice's target is gone");
    let err = iscsi::read(&iscsi::url(&alices, &alices.auth_password), 1, &scratch).unwrap_err();
    assert!(!err.is_empty());

    // Bob's export has credentials of its own; alice's secret does not open it.
    let bob = VolumeServiceClient::new(fleet.member("bob", "p2"));
    let bobs = bob.clone().initialize_connection(export("iqn.2026-11.test:bob")).await.unwrap().into_inner();
    assert_eq!(bobs.target_iqn, alices.target_iqn, "the same volume, the same target name");
    assert_ne!((&bobs.auth_username, &bobs.auth_password), (&alices.auth_username, &alices.auth_password));
    let shown = fleet.tgt_show("storage1");
    assert!(shown.contains(&bobs.auth_username) && !shown.contains(&alices.auth_username), "{shown}");
    let read = iscsi::read(&iscsi::url(&bobs, &bobs.auth_password), 1, &scratch).unwrap();
    assert_eq!(read, iscsi::pattern(3, 1 << 20), "bob reads the data");
    let old_secret = ConnectionInfo { auth_username: alices.auth_username.clone(), ..bobs.clone() };
    let err = iscsi::read(&iscsi::url(&old_secret, &alices.auth_password), 1, &scratch).unwrap_err();
    assert!(!err.is_empty(), "alice's secret no longer opens it");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}
