//! Letting go of a volume and its snapshot (Cinder's unmanage and snapshot-unmanage): ember forgets them and
//! gives their quota back, removes the volume's export, and leaves the data on the backend, where the orphan
//! sweeper does not touch it. Managing them again moves them into another project. And forgetting a volume
//! whose storage node is lost for good, without that node.

use ember_fleet_tests::Fleet;
use ember_fleet_tests::volumes::{
    new_snapshot, new_volume, read_at, usage, wait_backend, wait_gone, wait_left_alone, wait_snapshot,
    wait_snapshot_gone, wait_volume,
};
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::os::unix::fs::FileExt;
use std::time::Duration;
use tonic::Code;

#[tokio::test]
async fn an_unmanaged_volume_keeps_its_data_and_moves_to_another_project_when_managed_again() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let (alice, alice_snaps) = (
        VolumeServiceClient::new(fleet.member("alice", "p1")),
        SnapshotServiceClient::new(fleet.member("alice", "p1")),
    );
    let (admin, admin_snaps) = (VolumeServiceClient::new(fleet.admin()), SnapshotServiceClient::new(fleet.admin()));
    let v = new_volume(&alice, 1).await;
    let file = dir.join(format!("volume-{}", v.id));
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().write_all_at(b"precious", 4096).unwrap();
    let snap = new_snapshot(&alice_snaps, &v.id).await;
    let snap_file = dir.join(format!("snapshot-{}", snap.id));
    let connector = Connector { initiator: "iqn.2026-11.test:host1".into(), ..Default::default() };
    let req = InitializeConnectionRequest { volume_id: v.id.clone(), connector: Some(connector) };
    let iqn = alice.clone().initialize_connection(req).await.unwrap().into_inner().target_iqn;
    assert!(fleet.tgt_show("storage1").contains(&iqn), "exported");

    // Refusals name the problem and change nothing.
    let unmanage = |id: &str| UnmanageVolumeRequest { id: id.into() };
    let err = alice.clone().unmanage_volume(unmanage(&v.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = admin.clone().unmanage_volume(unmanage(&v.id)).await.unwrap_err();
    assert!(err.code() == Code::FailedPrecondition && err.message().contains("snapshot"), "{err:?}");
    let err = admin.clone().unmanage_volume(unmanage("not-a-uuid")).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().starts_with("id: "), "{err:?}");
    let err = alice_snaps.clone().unmanage_snapshot(UnmanageSnapshotRequest { id: snap.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(wait_volume(&alice, &v.id, "available").await.status, "available");
    assert_eq!(wait_snapshot(&alice_snaps, &snap.id, "available").await.status, "available");

    // The snapshot, then the volume, are let go of: gone from ember and its quotas, data in place.
    let (ok, out, err) = fleet.cli(&["snapshot", "unmanage", &snap.id]);
    assert!(ok && out.contains("unmanaged"), "{out}\n{err}");
    let (ok, out, err) = fleet.cli(&["volume", "unmanage", &v.id, "--wait"]);
    assert!(ok && out.contains("unmanaged"), "{out}\n{err}");
    let err = alice.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = alice_snaps.clone().get_snapshot(GetSnapshotRequest { id: snap.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    for resource in ["volumes", "snapshots", "gigabytes"] {
        assert_eq!(usage(&fleet, "p1", resource).await, 0, "{resource} given back");
    }
    assert!(!fleet.tgt_show("storage1").contains(&iqn), "the export went with it");
    // A sweep passes over both files and leaves them: ember made them, but has let go of them.
    wait_left_alone(&fleet, &v.id).await;
    wait_left_alone(&fleet, &snap.id).await;
    assert_eq!(&read_at(&file, 4096), b"precious");
    assert_eq!(&read_at(&snap_file, 4096), b"precious");

    // Managed again, into project p2: p2's now, p1 no longer sees it. Through the CLI, with --foreign (taking
    // what ember did not make; a file has no owner, so here it changes nothing): first refused by p2's quota,
    // which leaves no record, then adopted.
    let (ok, out, err) = fleet.cli(&["quota", "set", "p2", "volumes=0"]);
    assert!(ok, "{out}\n{err}");
    let manage = ["volume", "manage", "storage1@file1", &v.id, "--project", "p2", "--foreign"];
    let (ok, out, err) = fleet.cli(&manage);
    assert!(!ok && err.contains("quota exceeded for volumes"), "{out}\n{err}");
    let err = admin.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "a refused manage records nothing");
    assert_eq!(usage(&fleet, "p2", "volumes").await, 0);
    let (ok, out, err) = fleet.cli(&["quota", "set", "p2", "volumes=10"]);
    assert!(ok, "{out}\n{err}");
    let (ok, out, err) = fleet.cli(&manage);
    assert!(ok && out.contains("available"), "{out}\n{err}");
    let req = ManageSnapshotRequest { volume_id: v.id.clone(), id: snap.id.clone(), ..Default::default() };
    let adopted = admin_snaps.clone().manage_snapshot(req).await.unwrap().into_inner();
    assert_eq!(adopted.project, "p2");
    let err = alice.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let (bob, bob_snaps) =
        (VolumeServiceClient::new(fleet.member("bob", "p2")), SnapshotServiceClient::new(fleet.member("bob", "p2")));
    assert_eq!(wait_volume(&bob, &v.id, "available").await.project, "p2");
    assert_eq!((usage(&fleet, "p2", "volumes").await, usage(&fleet, "p2", "snapshots").await), (1, 1));

    // Let go of once more, the snapshot is reported once more (each time a file becomes unknown), and comes back.
    admin_snaps.clone().unmanage_snapshot(UnmanageSnapshotRequest { id: snap.id.clone() }).await.unwrap();
    let coordinator = fleet.coordinator.as_ref().unwrap();
    ember_fleet_tests::wait_for("the second report", Duration::from_secs(30), || {
        let reports =
            coordinator.log_text().lines().filter(|l| l.contains(&snap.id) && l.contains("is left alone")).count();
        async move { (reports == 2).then_some(()) }
    })
    .await;
    let req = ManageSnapshotRequest { volume_id: v.id.clone(), id: snap.id.clone(), ..Default::default() };
    admin_snaps.clone().manage_snapshot(req).await.unwrap();
    bob_snaps.clone().delete_snapshot(DeleteSnapshotRequest { id: snap.id.clone() }).await.unwrap();
    wait_snapshot_gone(&bob_snaps, &snap.id).await;
    bob.clone().delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() }).await.unwrap();
    wait_gone(&bob, &v.id).await;
    assert!(!file.exists() && !snap_file.exists(), "deleted in p2, the files go");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// A storage node lost for good: a delete of its snapshot waits for it for ever. An admin forgets the volume,
/// which takes its snapshot's record and all the quota with it, without the node. Should the node come back,
/// its files are left alone, and manage adopts the volume again.
#[tokio::test]
async fn a_volume_on_a_storage_node_lost_for_good_is_forgotten_and_its_files_are_left_alone() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let mut storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let (alice, alice_snaps) = (
        VolumeServiceClient::new(fleet.member("alice", "p1")),
        SnapshotServiceClient::new(fleet.member("alice", "p1")),
    );
    let v = new_volume(&alice, 1).await;
    let file = dir.join(format!("volume-{}", v.id));
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().write_all_at(b"precious", 4096).unwrap();
    let snap = new_snapshot(&alice_snaps, &v.id).await;
    let forget = DeleteVolumeRequest { id: v.id.clone(), forget: true, ..Default::default() };
    let admin = VolumeServiceClient::new(fleet.admin());
    let err = admin.clone().delete_volume(forget.clone()).await.unwrap_err();
    assert!(err.code() == Code::FailedPrecondition && err.message().contains("which is up"), "{err:?}");

    storage.kill();
    ember_fleet_tests::backups::wait_down(&fleet, "storage1@file1").await;
    alice_snaps.clone().delete_snapshot(DeleteSnapshotRequest { id: snap.id.clone() }).await.unwrap();
    assert_eq!(wait_snapshot(&alice_snaps, &snap.id, "deleting").await.status, "deleting", "waits for the node");
    // An extend waits for the node too, holding a reservation of 1 GiB more.
    alice.clone().extend_volume(ExtendVolumeRequest { id: v.id.clone(), new_size_gb: 2 }).await.unwrap();
    assert_eq!(usage(&fleet, "p1", "gigabytes").await, 3, "1 + 1 in use, 1 reserved");
    let err = alice.clone().delete_volume(forget.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let (ok, out, err) = fleet.cli(&["volume", "delete", &v.id, "--forget"]);
    assert!(ok && out.contains("forgotten"), "{out}\n{err}");
    assert_eq!(
        alice.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap_err().code(),
        Code::NotFound
    );
    let err = alice_snaps.clone().get_snapshot(GetSnapshotRequest { id: snap.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    for resource in ["volumes", "snapshots", "gigabytes"] {
        assert_eq!(usage(&fleet, "p1", resource).await, 0, "{resource} given back");
    }

    // The node comes back: a sweep leaves both files alone, data intact; the volume can be adopted again.
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_left_alone(&fleet, &v.id).await;
    wait_left_alone(&fleet, &snap.id).await;
    assert_eq!(&read_at(&file, 4096), b"precious");
    assert!(dir.join(format!("snapshot-{}", snap.id)).exists());
    let manage = ManageVolumeRequest { pool: "storage1@file1".into(), id: v.id.clone(), ..Default::default() };
    assert_eq!(admin.clone().manage_volume(manage).await.unwrap().into_inner().status, "available");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}
