//! The volume lifecycle end to end on the file backend, with data written and read back over real iSCSI
//! (tgtd + libiscsi's initiator in qemu-img).

use ember_fleet_tests::{Fleet, iscsi, wait_for};
use ember_proto::v1::quota_service_client::QuotaServiceClient;
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::time::Duration;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(60);

async fn wait_volume(client: &mut VolumeServiceClient<Channel>, id: &str, status: &str) -> Volume {
    let mut c = client.clone();
    wait_for(&format!("volume {id} to be {status}"), WAIT, || {
        let mut c = c.clone();
        let id = id.to_string();
        async move {
            let v = c.get_volume(GetVolumeRequest { id }).await.ok()?.into_inner();
            assert!(!v.status.starts_with("error") || status.starts_with("error"), "volume failed: {v:?}");
            (v.status == status).then_some(v)
        }
    })
    .await;
    c.get_volume(GetVolumeRequest { id: id.into() }).await.unwrap().into_inner()
}

async fn wait_snapshot(client: &mut SnapshotServiceClient<Channel>, id: &str, status: &str) {
    let c = client.clone();
    wait_for(&format!("snapshot {id} to be {status}"), WAIT, || {
        let mut c = c.clone();
        let id = id.to_string();
        async move {
            match c.get_snapshot(GetSnapshotRequest { id }).await {
                Ok(s) => (s.get_ref().status == status).then_some(()),
                Err(s) if s.code() == tonic::Code::NotFound && status == "gone" => Some(()),
                Err(_) => None,
            }
        }
    })
    .await;
}

fn connector(initiator: &str) -> Option<Connector> {
    Some(Connector { host: "test-host".into(), ip: "127.0.0.1".into(), initiator: initiator.into(), read_only: false })
}

async fn fleet_with_storage() -> (Fleet, ember_fleet_tests::Daemon, std::path::PathBuf) {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("file1", "");
    let storage = fleet.start_agent("storage", "storage1", &backend);
    wait_for("the backend to register", WAIT, || async {
        let mut c = ember_proto::v1::fleet_service_client::FleetServiceClient::new(fleet.admin());
        let list = c.list_services(ListServicesRequest::default()).await.ok()?.into_inner().services;
        list.iter().any(|s| s.name == "storage1@file1" && s.up).then_some(())
    })
    .await;
    (fleet, storage, dir)
}

#[tokio::test]
async fn data_survives_snapshot_clone_and_extend_over_iscsi_and_delete_leaves_nothing() {
    let (fleet, _storage, dir) = fleet_with_storage().await;
    let channel = fleet.member("alice", "proj-a");
    let mut volumes = VolumeServiceClient::new(channel.clone());
    let mut snapshots = SnapshotServiceClient::new(channel.clone());
    let scratch = fleet.dir.path().join("scratch.img");
    let (pat_a, pat_b) = (fleet.dir.path().join("a.bin"), fleet.dir.path().join("b.bin"));
    std::fs::write(&pat_a, iscsi::pattern(1, 1 << 20)).unwrap();
    std::fs::write(&pat_b, iscsi::pattern(2, 1 << 20)).unwrap();

    let v = volumes
        .create_volume(CreateVolumeRequest { size_gb: 1, name: "data".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.status, "creating");
    let v = wait_volume(&mut volumes, &v.id, "available").await;
    assert_eq!(v.host, "storage1@file1");
    let file = dir.join(format!("volume-{}", v.id));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1 << 30);

    // Export and write pattern A through iSCSI with the returned CHAP credentials.
    let info = volumes
        .initialize_connection(InitializeConnectionRequest {
            volume_id: v.id.clone(),
            connector: connector("iqn.2026-11.test:host1"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.driver_volume_type.as_str(), info.target_lun, info.auth_method.as_str()), ("iscsi", 1, "CHAP"));
    assert_eq!(info.target_iqn, format!("iqn.2010-10.org.ember:volume-{}", v.id));
    assert_eq!(info.auth_username.len(), 20);
    assert_eq!(info.auth_password.len(), 16);
    let shown = fleet.tgt_show("storage1");
    assert!(shown.contains(&info.target_iqn) && shown.contains(&file.display().to_string()), "{shown}");
    let url = iscsi::url(&info, &info.auth_password);
    iscsi::write(&url, &pat_a).unwrap();
    assert_eq!(
        std::fs::read(&file).unwrap()[..1 << 20],
        std::fs::read(&pat_a).unwrap()[..],
        "data reached the volume file"
    );

    // A wrong CHAP secret is refused.
    let err = iscsi::read(&iscsi::url(&info, "wrong-secret-123"), 1, &scratch).unwrap_err();
    assert!(err.contains("Authentication failure"), "{err}");

    // Snapshot, overwrite with B, then a larger volume from the snapshot holds A.
    let snap = snapshots
        .create_snapshot(CreateSnapshotRequest {
            volume_id: v.id.clone(),
            name: "before-b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    wait_snapshot(&mut snapshots, &snap.id, "available").await;
    iscsi::write(&url, &pat_b).unwrap();
    let from_snap = volumes
        .create_volume(CreateVolumeRequest { size_gb: 2, snapshot_id: snap.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let from_snap = wait_volume(&mut volumes, &from_snap.id, "available").await;
    assert_eq!(from_snap.size_gb, 2);
    let info2 = volumes
        .initialize_connection(InitializeConnectionRequest {
            volume_id: from_snap.id.clone(),
            connector: connector("iqn.2026-11.test:host1"),
        })
        .await
        .unwrap()
        .into_inner();
    let url2 = iscsi::url(&info2, &info2.auth_password);
    assert_eq!(iscsi::read(&url2, 1, &scratch).unwrap(), std::fs::read(&pat_a).unwrap(), "snapshot kept pattern A");
    assert_eq!(iscsi::size(&url2).unwrap(), 2 << 30, "volume from snapshot was extended");
    assert_eq!(iscsi::read(&url, 1, &scratch).unwrap(), std::fs::read(&pat_b).unwrap(), "the original now holds B");

    // A clone holds B.
    let clone = volumes
        .create_volume(CreateVolumeRequest { source_volume_id: v.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let clone = wait_volume(&mut volumes, &clone.id, "available").await;
    assert_eq!(
        std::fs::read(dir.join(format!("volume-{}", clone.id))).unwrap()[..1 << 20],
        std::fs::read(&pat_b).unwrap()[..]
    );

    // Extend: the initiator sees the new capacity.
    volumes.extend_volume(ExtendVolumeRequest { id: v.id.clone(), new_size_gb: 3 }).await.unwrap();
    let v = wait_volume(&mut volumes, &v.id, "available").await;
    assert_eq!(v.size_gb, 3);
    assert_eq!(iscsi::size(&url).unwrap(), 3 << 30);
    assert_eq!(iscsi::read(&url, 1, &scratch).unwrap(), std::fs::read(&pat_b).unwrap(), "extend kept the data");

    // Quota usage equals what exists: 3 volumes (1+... GiB) and 1 snapshot.
    let q = QuotaServiceClient::new(channel.clone()).get_quota(GetQuotaRequest::default()).await.unwrap().into_inner();
    let used = |r: &str| q.items.iter().find(|i| i.resource == r).map(|i| (i.in_use, i.reserved)).unwrap();
    assert_eq!(used("volumes"), (3, 0));
    assert_eq!(used("gigabytes"), (3 + 2 + 1 + 1, 0), "3 + 2 + 1 volume GiB and the 1 GiB snapshot");
    assert_eq!(used("snapshots"), (1, 0));

    // The volume with a snapshot cannot be deleted yet.
    let err = volumes.delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("snapshot"), "{}", err.message());

    // Terminate one connection of two on the from-snapshot volume? One initiator each here: terminate → target gone.
    volumes
        .terminate_connection(TerminateConnectionRequest {
            volume_id: from_snap.id.clone(),
            connector: connector("iqn.2026-11.test:host1"),
        })
        .await
        .unwrap();
    assert!(!fleet.tgt_show("storage1").contains(&info2.target_iqn), "target removed with its last connection");

    // Delete everything: no file, no target, no usage.
    snapshots.delete_snapshot(DeleteSnapshotRequest { id: snap.id.clone() }).await.unwrap();
    wait_snapshot(&mut snapshots, &snap.id, "gone").await;
    for id in [&v.id, &from_snap.id, &clone.id] {
        volumes.delete_volume(DeleteVolumeRequest { id: id.clone(), ..Default::default() }).await.unwrap();
    }
    for id in [&v.id, &from_snap.id, &clone.id] {
        ember_fleet_tests::volumes::wait_gone(&volumes, id).await;
    }
    volumes
        .delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() })
        .await
        .expect("deleting what is gone succeeds");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "files left: {left:?}");
    let shown = fleet.tgt_show("storage1");
    assert!(!shown.contains("Target "), "targets left: {shown}");
    let q = QuotaServiceClient::new(channel).get_quota(GetQuotaRequest::default()).await.unwrap().into_inner();
    assert!(q.items.iter().all(|i| i.in_use == 0 && i.reserved == 0), "{q:?}");
}

/// Initiator processes killed when dropped, so a failing test leaves none running.
struct Readers(Vec<std::process::Child>);

impl Drop for Readers {
    fn drop(&mut self) {
        for reader in &mut self.0 {
            let _ = reader.kill();
            let _ = reader.wait();
        }
    }
}

/// An exported volume grows while initiators read it. tgtd re-makes the LUN so they see the new capacity, and
/// refuses to while their commands are in flight ("this logical unit is still active"), which busy initiators
/// keep it from ever being: the agent takes the target offline so the LUN drains. tgtd drops the commands that
/// reach an offline target unanswered, so the agent then closes the initiators' connections: they log in again
/// and re-send them. Every reader finishes every read (QEMU's initiator has no command timeout: a dropped read
/// would hang its reader for good).
#[tokio::test]
async fn an_exported_volume_grows_while_initiators_read_it() {
    let (fleet, storage, dir) = fleet_with_storage().await;
    let mut volumes = VolumeServiceClient::new(fleet.admin());
    let (v, info) = exported_volume(&mut volumes).await;
    let url = iscsi::url(&info, &info.auth_password);

    // Three initiators, each with 32 reads in flight at all times, for some seconds.
    let mut readers = busy_readers(&fleet, &url).await;

    volumes.extend_volume(ExtendVolumeRequest { id: v.id.clone(), new_size_gb: 2 }).await.unwrap();
    let grown = wait_volume(&mut volumes, &v.id, "available").await;
    assert!(storage.log_text().contains("initiator connection closed"), "the refresh closed their connections");
    for (i, reader) in readers.0.iter_mut().enumerate() {
        let status =
            wait_for("a reader to finish its reads", WAIT, || std::future::ready(reader.try_wait().unwrap())).await;
        assert!(status.success(), "reader {i} failed a read: {status}");
    }
    assert_eq!((grown.size_gb, grown.status_reason.as_str()), (2, ""), "{grown:?}");
    assert_eq!(std::fs::metadata(dir.join(format!("volume-{}", v.id))).unwrap().len(), 2 << 30);
    assert_eq!(iscsi::size(&url).unwrap(), 2 << 30, "the initiator sees the new capacity");
    assert!(fleet.tgt_show("storage1").contains("State: ready"), "the target serves again");
}

/// Busy initiators' access ends (TerminateConnection) while they read: tgtd refuses to remove a target whose LUN
/// has commands in flight, even when forced ("this logical unit is still active"), so the agent takes the target
/// offline for the LUN to drain before removing it. Access ends at once, for good: the target is gone.
#[tokio::test]
async fn a_connection_ends_while_its_initiators_read() {
    let (fleet, _storage, _dir) = fleet_with_storage().await;
    let mut volumes = VolumeServiceClient::new(fleet.admin());
    let (v, info) = exported_volume(&mut volumes).await;
    let _readers = busy_readers(&fleet, &iscsi::url(&info, &info.auth_password)).await;

    let end = TerminateConnectionRequest { volume_id: v.id.clone(), connector: connector("iqn.2026-11.test:h") };
    volumes.terminate_connection(end).await.unwrap();
    let shown = fleet.tgt_show("storage1");
    assert!(!shown.contains(&info.target_iqn), "the target outlived the end of its connection:\n{shown}");
    assert!(iscsi::size(&iscsi::url(&info, &info.auth_password)).is_err(), "the volume is still reachable");
}

/// A new 1 GiB volume, available and exported to initiator `iqn.2026-11.test:h`, with its connection.
async fn exported_volume(volumes: &mut VolumeServiceClient<Channel>) -> (Volume, ConnectionInfo) {
    let create = CreateVolumeRequest { size_gb: 1, name: "busy".into(), ..Default::default() };
    let v = volumes.create_volume(create).await.unwrap().into_inner();
    wait_volume(volumes, &v.id, "available").await;
    let connect = InitializeConnectionRequest { volume_id: v.id.clone(), connector: connector("iqn.2026-11.test:h") };
    (v, volumes.initialize_connection(connect).await.unwrap().into_inner())
}

/// Three initiators reading volume `url` with 32 reads in flight each, once all three are logged in.
async fn busy_readers(fleet: &Fleet, url: &str) -> Readers {
    let readers = Readers(
        (0..3)
            .map(|_| {
                std::process::Command::new("qemu-img")
                    .args(["bench", "-f", "raw", "-c", "100000", "-d", "32", url])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("qemu-img bench")
            })
            .collect(),
    );
    wait_for("the three initiators to log in", WAIT, || async {
        (fleet.tgt_show("storage1").matches("I_T nexus: ").count() == 3).then_some(())
    })
    .await;
    readers
}

/// A storage agent that stops while its target is offline for a LUN refresh: tgtd (which outlives it) keeps the
/// target offline, and the agent's next start makes it whole and ready again; the coordinator's extend, retried,
/// then finishes.
#[tokio::test]
async fn a_lun_refresh_cut_short_by_a_crash_leaves_no_target_offline() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let crash = [("EMBER_FAILPOINTS", "storage.abort_in_lun_refresh")];
    let mut storage = fleet.start_agent_with("storage", "storage1", &backend, &crash);
    storage.wait_registered().await;
    let mut volumes = VolumeServiceClient::new(fleet.admin());
    let create = CreateVolumeRequest { size_gb: 1, ..Default::default() };
    let v = volumes.create_volume(create).await.unwrap().into_inner();
    wait_volume(&mut volumes, &v.id, "available").await;
    let connect = InitializeConnectionRequest { volume_id: v.id.clone(), connector: connector("iqn.2026-11.test:h") };
    let info = volumes.initialize_connection(connect).await.unwrap().into_inner();

    volumes.extend_volume(ExtendVolumeRequest { id: v.id.clone(), new_size_gb: 2 }).await.unwrap();
    assert!(!storage.wait_exit(WAIT).success(), "the agent aborted inside the refresh");
    let shown = fleet.tgt_show("storage1");
    assert!(shown.contains(&info.target_iqn) && shown.contains("State: offline"), "{shown}");

    // The coordinator, which would retry the extend (and so the refresh), is away while the agent starts again:
    // the agent itself repairs the target.
    fleet.coordinator.as_mut().unwrap().kill();
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_for("the agent to make its target ready again", WAIT, || async {
        let shown = fleet.tgt_show("storage1");
        (shown.contains("State: ready") && !shown.contains("State: offline")).then_some(())
    })
    .await;
    fleet.start_coordinator();
    let mut volumes = VolumeServiceClient::new(fleet.admin());
    let grown = wait_volume(&mut volumes, &v.id, "available").await;
    assert_eq!((grown.size_gb, grown.status_reason.as_str()), (2, ""), "{grown:?}");
    let url = iscsi::url(&info, &info.auth_password);
    assert_eq!(iscsi::size(&url).unwrap(), 2 << 30, "served again, at the new size");
}

/// InitializeConnection and TerminateConnection ask the volume's storage node while the caller waits. While that
/// node is down they answer UNAVAILABLE, naming it, so that automation knows to try again; the refused call
/// changes no record. Once the node is back, the same calls succeed.
#[tokio::test]
async fn connections_asked_of_a_storage_node_that_is_down_are_unavailable_until_it_is_back() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let mut storage = fleet.start_agent("storage", "storage1", &backend);
    storage.wait_registered().await;
    let mut volumes = VolumeServiceClient::new(fleet.admin());
    let (v, info) = exported_volume(&mut volumes).await;
    let exports = |v: Volume| v.exports.iter().map(|e| e.initiator.clone()).collect::<Vec<_>>();

    storage.kill();
    let end = TerminateConnectionRequest { volume_id: v.id.clone(), connector: connector("iqn.2026-11.test:h") };
    let err = volumes.terminate_connection(end.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("unexporting on storage1"), "{err:?}");
    let other = InitializeConnectionRequest { volume_id: v.id.clone(), connector: connector("iqn.2026-11.test:g") };
    let err = volumes.initialize_connection(other.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("exporting on storage1"), "{err:?}");
    let unchanged = wait_volume(&mut volumes, &v.id, "available").await;
    assert_eq!(exports(unchanged), ["iqn.2026-11.test:h"], "a refused call changed the records");

    let storage = fleet.start_agent("storage", "storage1", &backend);
    storage.wait_registered().await;
    volumes.initialize_connection(other).await.unwrap();
    volumes.terminate_connection(end).await.unwrap();
    let now = wait_volume(&mut volumes, &v.id, "available").await;
    assert_eq!(exports(now), ["iqn.2026-11.test:g"]);
    assert!(iscsi::size(&iscsi::url(&info, &info.auth_password)).is_ok(), "the other initiator's export went too");
}
