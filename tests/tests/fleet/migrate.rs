//! Moving a volume to another pool (Cinder's migrate, and its retype with migration policy `on-demand`): the destination's storage agent copies the data from the
//! source's over mTLS, the volume ends on the new pool reading exactly as before and as sparse, served there,
//! and the old copy is gone. Refusals change nothing; a copy that fails leaves the volume where it was; a
//! coordinator crash between the copy and its record resumes, and the copy made again clears what the
//! destination held where the source has holes.

use ember_fleet_tests::volumes::{files_in, new_snapshot, new_volume, usage, wait_backend, wait_volume};
use ember_fleet_tests::{Daemon, Fleet, iscsi};
use ember_proto::v1::fleet_service_client::FleetServiceClient;
use ember_proto::v1::quota_service_client::QuotaServiceClient;
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::volume_type_service_client::VolumeTypeServiceClient;
use ember_proto::v1::*;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tonic::Code;

const MIB: u64 = 1 << 20;

/// A fleet with two storage agents, each with one file pool; the first takes the volumes made (the second is
/// disabled while they are).
struct TwoPools {
    fleet: Fleet,
    dir1: PathBuf,
    dir2: PathBuf,
    backend2: String,
    storage2: Daemon,
    backend1: String,
    storage1: Daemon,
}

async fn two_pools(storage2_env: &[(&str, &str)]) -> TwoPools {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend1, dir1) = fleet.file_backend("file1", "");
    let (backend2, dir2) = fleet.file_backend("file2", "");
    let storage1 = fleet.start_agent("storage", "storage1", &backend1);
    let storage2 = fleet.start_agent_with("storage", "storage2", &backend2, storage2_env);
    wait_backend(&fleet, "storage1@file1").await;
    wait_backend(&fleet, "storage2@file2").await;
    TwoPools { fleet, dir1, dir2, backend1, backend2, storage2, storage1 }
}

async fn set_enabled(fleet: &Fleet, name: &str, enabled: bool) {
    let mut services = FleetServiceClient::new(fleet.admin());
    if enabled {
        services.enable_service(EnableServiceRequest { name: name.into() }).await.unwrap();
    } else {
        let req = DisableServiceRequest { name: name.into(), reason: "test".into() };
        services.disable_service(req).await.unwrap();
    }
}

/// A 1 GiB volume on storage1@file1 with data in a few places and holes between, and a sparse copy of its file
/// to compare the migrated volume with.
async fn volume_with_data(
    pools: &TwoPools,
    volumes: &VolumeServiceClient<tonic::transport::Channel>,
) -> (Volume, PathBuf) {
    set_enabled(&pools.fleet, "storage2@file2", false).await;
    let v = new_volume(volumes, 1).await;
    set_enabled(&pools.fleet, "storage2@file2", true).await;
    assert_eq!(v.host, "storage1@file1");
    let file = pools.dir1.join(format!("volume-{}", v.id));
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(&iscsi::pattern(1, MIB as usize), 0).unwrap();
    // Across a chunk boundary of the copy (4 MiB), and at the very end.
    f.write_all_at(&iscsi::pattern(2, 3 * MIB as usize), 7 * MIB - 12345).unwrap();
    f.write_all_at(b"last8byt", (1 << 30) - 8).unwrap();
    f.sync_all().unwrap();
    let reference = pools.fleet.dir.path().join("reference.img");
    let copied = Command::new("cp").arg("--sparse=always").arg(&file).arg(&reference).status().unwrap();
    assert!(copied.success());
    (v, reference)
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    Command::new("cmp").arg("--silent").arg(a).arg(b).status().unwrap().success()
}

#[tokio::test]
async fn a_volume_moves_to_another_pool_with_its_data_and_its_holes() {
    let mut pools = two_pools(&[]).await;
    let volumes = VolumeServiceClient::new(pools.fleet.member("alice", "p1"));
    let (v, reference) = volume_with_data(&pools, &volumes).await;

    // Not while a clone of it is being made where it lies (the agent is held inside that create).
    pools.storage1.kill();
    let freeze = [("EMBER_FAILPOINTS", "storage.freeze_in_create_volume")];
    pools.storage1 = pools.fleet.start_agent_with("storage", "storage1", &pools.backend1, &freeze);
    pools.storage1.wait_registered().await;
    let clone = CreateVolumeRequest { source_volume_id: v.id.clone(), ..Default::default() };
    let clone = volumes.clone().create_volume(clone).await.unwrap().into_inner();
    let frozen = &pools.storage1;
    ember_fleet_tests::wait_for("the agent to freeze in the clone", Duration::from_secs(60), || async {
        frozen.is_stopped().then_some(())
    })
    .await;
    let admin = VolumeServiceClient::new(pools.fleet.admin());
    let err = admin.clone().migrate_volume(MigrateVolumeRequest { id: v.id.clone(), pool: String::new() }).await;
    let err = err.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("source of a volume being created"), "{err:?}");
    pools.storage1.signal("CONT");
    wait_volume(&volumes, &clone.id, "available").await;
    let delete = DeleteVolumeRequest { id: clone.id.clone(), ..Default::default() };
    volumes.clone().delete_volume(delete).await.unwrap();
    ember_fleet_tests::volumes::wait_gone(&volumes, &clone.id).await;
    let fleet = &pools.fleet;

    // Refused, naming why, and nothing changes.
    let err = volumes.clone().migrate_volume(MigrateVolumeRequest { id: v.id.clone(), pool: String::new() }).await;
    assert_eq!(err.unwrap_err().code(), Code::PermissionDenied);
    for (pool, field) in [("storage1@file1", "already on"), ("storage9@file9", "not an up"), ("nohost", "host@backend")]
    {
        let req = MigrateVolumeRequest { id: v.id.clone(), pool: pool.into() };
        let err = admin.clone().migrate_volume(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{pool}: {err:?}");
        assert!(err.message().contains("pool") && err.message().contains(field), "{pool}: {err:?}");
    }
    let snapshots = SnapshotServiceClient::new(fleet.member("alice", "p1"));
    let snap = new_snapshot(&snapshots, &v.id).await;
    let err = admin.clone().migrate_volume(MigrateVolumeRequest { id: v.id.clone(), pool: String::new() }).await;
    let err = err.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("snapshot"), "{err:?}");
    snapshots.clone().delete_snapshot(DeleteSnapshotRequest { id: snap.id.clone() }).await.unwrap();
    ember_fleet_tests::volumes::wait_snapshot_gone(&snapshots, &snap.id).await;
    let still = wait_volume(&volumes, &v.id, "available").await;
    assert_eq!((still.host.as_str(), still.migrating_to.as_str()), ("storage1@file1", ""));

    // Without a pool named, the scheduler picks the only other one.
    let (ok, out, err) = fleet.cli(&["volume", "migrate", &v.id, "--wait"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("storage2@file2"), "{out}");
    let moved = wait_volume(&volumes, &v.id, "available").await;
    assert_eq!(
        (moved.host.as_str(), moved.status_reason.as_str(), moved.migrating_to.as_str(), moved.size_gb),
        ("storage2@file2", "", "", 1),
        "{moved:?}"
    );
    let file = pools.dir2.join(format!("volume-{}", v.id));
    assert!(same_bytes(&file, &reference), "the moved volume reads as before");
    let allocated = std::fs::metadata(&file).unwrap().blocks() * 512;
    assert!(allocated <= 16 * MIB, "the holes stayed holes: {allocated} bytes allocated");
    assert!(files_in(&pools.dir1).is_empty(), "the old copy is gone: {:?}", files_in(&pools.dir1));
    assert_eq!(usage(fleet, "p1", "gigabytes").await, 1, "the quota is as it was");

    // Listed by pool, as an admin drains one.
    let on = |pool: &str| ListVolumesRequest { pool: pool.into(), ..Default::default() };
    let listed = |r: ListVolumesResponse| r.volumes.into_iter().map(|v| v.id).collect::<Vec<_>>();
    let on_new = listed(admin.clone().list_volumes(on("storage2@file2")).await.unwrap().into_inner());
    assert_eq!(on_new, std::slice::from_ref(&v.id));
    assert!(listed(admin.clone().list_volumes(on("storage1@file1")).await.unwrap().into_inner()).is_empty());
    let err = volumes.clone().list_volumes(on("storage2@file2")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = admin.clone().list_volumes(on("storage2")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let (ok, out, err) = fleet.cli(&["volume", "list", "--pool", "storage2@file2"]);
    assert!(ok && out.contains(&v.id), "{out}\n{err}");

    // It is served from its new pool.
    let connect = InitializeConnectionRequest {
        volume_id: v.id.clone(),
        connector: Some(Connector {
            host: "h".into(),
            ip: "127.0.0.1".into(),
            initiator: "iqn.2026-11.test:h".into(),
            read_only: false,
        }),
    };
    let info = volumes.clone().initialize_connection(connect).await.unwrap().into_inner();
    assert!(fleet.tgt_show("storage2").contains(&info.target_iqn), "storage2 exports it");
    let scratch = fleet.dir.path().join("scratch.img");
    let first = iscsi::read(&iscsi::url(&info, &info.auth_password), 1, &scratch).unwrap();
    assert_eq!(first, iscsi::pattern(1, MIB as usize), "read over iSCSI from the new pool");
    ember_fleet_tests::volumes::assert_usage_exact(fleet).await;
}

async fn new_type(fleet: &Fleet, name: &str, backend: &str) {
    let req = CreateVolumeTypeRequest {
        name: name.into(),
        extra_specs: [("volume_backend_name".to_string(), backend.to_string())].into(),
        ..Default::default()
    };
    VolumeTypeServiceClient::new(fleet.admin()).create_volume_type(req).await.unwrap();
}

fn on_demand(id: &str, volume_type: &str) -> RetypeVolumeRequest {
    RetypeVolumeRequest { id: id.into(), volume_type: volume_type.into(), migration_policy: "on-demand".into() }
}

/// Cinder's retype with migration policy `on-demand`: a volume whose pool does not satisfy its new type moves to
/// one that does and takes the type there, its per-type quota moving with it.
#[tokio::test]
async fn a_retype_moves_the_volume_to_a_pool_that_satisfies_the_new_type() {
    let pools = two_pools(&[]).await;
    let fleet = &pools.fleet;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let (v, reference) = volume_with_data(&pools, &volumes).await;
    let old = v.volume_type_name.clone();
    new_type(fleet, "on2", "file2").await;
    new_type(fleet, "on9", "file9").await;

    // Refused, naming why, and nothing changes: in place only; no pool fits; the new type's quota; a bad policy.
    let in_place = RetypeVolumeRequest { migration_policy: String::new(), ..on_demand(&v.id, "on2") };
    let err = volumes.clone().retype_volume(in_place).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("on-demand"), "{err:?}");
    let err = volumes.clone().retype_volume(on_demand(&v.id, "on9")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("no other pool"), "{err:?}");
    let limit = |n: i64| SetQuotaRequest { project: "p1".into(), limits: [("gigabytes_on2".to_string(), n)].into() };
    QuotaServiceClient::new(fleet.admin()).set_quota(limit(0)).await.unwrap();
    let err = volumes.clone().retype_volume(on_demand(&v.id, "on2")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("gigabytes_on2"), "{err:?}");
    let req = RetypeVolumeRequest { migration_policy: "sometimes".into(), ..on_demand(&v.id, "on2") };
    let err = volumes.clone().retype_volume(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("migration_policy"), "{err:?}");
    let same = wait_volume(&volumes, &v.id, "available").await;
    assert_eq!((same.volume_type_name.as_str(), same.host.as_str()), (old.as_str(), "storage1@file1"));
    assert_eq!(usage(fleet, "p1", "gigabytes_on2").await, 0);

    QuotaServiceClient::new(fleet.admin()).set_quota(limit(-1)).await.unwrap();
    let tls = fleet.issue(ember_common::identity::Role::Member, "alice", Some("p1"));
    let args = ["volume", "retype", &v.id, "on2", "--migration-policy", "on-demand", "--wait"];
    let (ok, out, err) = fleet.cli_as(&tls, &args);
    assert!(ok, "{out}\n{err}");
    let moved = wait_volume(&volumes, &v.id, "available").await;
    assert_eq!(
        (moved.volume_type_name.as_str(), moved.host.as_str(), moved.status_reason.as_str()),
        ("on2", "storage2@file2", ""),
        "{moved:?}"
    );
    assert!(same_bytes(&pools.dir2.join(format!("volume-{}", v.id)), &reference));
    assert!(files_in(&pools.dir1).is_empty(), "the old copy is gone");
    let typed = |t: String| async move {
        (usage(fleet, "p1", &format!("volumes_{t}")).await, usage(fleet, "p1", &format!("gigabytes_{t}")).await)
    };
    assert_eq!((typed(old).await, typed("on2".into()).await), ((0, 0), (1, 1)), "the per-type quota moved");
    assert_eq!(usage(fleet, "p1", "gigabytes").await, 1, "the total stays");
    ember_fleet_tests::volumes::assert_usage_exact(fleet).await;
}

#[tokio::test]
async fn a_failed_copy_leaves_the_volume_where_it_was_and_a_crash_after_the_copy_resumes() {
    let mut pools = two_pools(&[("EMBER_FAILPOINTS", "storage.copy_volume_from")]).await;
    let volumes = VolumeServiceClient::new(pools.fleet.member("alice", "p1"));
    let (v, reference) = volume_with_data(&pools, &volumes).await;
    let admin = VolumeServiceClient::new(pools.fleet.admin());
    let to2 = MigrateVolumeRequest { id: v.id.clone(), pool: "storage2@file2".into() };

    // The destination fails the copy: its partial copy goes, and the volume stays, with the reason.
    let started = admin.clone().migrate_volume(to2.clone()).await.unwrap().into_inner();
    assert_eq!((started.status.as_str(), started.migrating_to.as_str()), ("migrating", "storage2@file2"));
    let stayed = wait_volume(&admin, &v.id, "available").await;
    assert_eq!((stayed.host.as_str(), stayed.migrating_to.as_str()), ("storage1@file1", ""), "{stayed:?}");
    assert!(stayed.status_reason.contains("migration to storage2@file2 failed"), "{stayed:?}");
    assert!(stayed.status_reason.contains("injected failure"), "{stayed:?}");
    assert!(files_in(&pools.dir2).is_empty(), "no partial copy is left");
    assert!(same_bytes(&pools.dir1.join(format!("volume-{}", v.id)), &reference));

    // So does a retype that would have moved it, which gives back the new type's quota it reserved.
    new_type(&pools.fleet, "on2", "file2").await;
    let started = volumes.clone().retype_volume(on_demand(&v.id, "on2")).await.unwrap().into_inner();
    assert_eq!((started.status.as_str(), started.migrating_to.as_str()), ("retyping", "storage2@file2"));
    let stayed = wait_volume(&admin, &v.id, "available").await;
    assert_eq!(
        (stayed.volume_type_name.as_str(), stayed.host.as_str()),
        (v.volume_type_name.as_str(), "storage1@file1")
    );
    assert!(stayed.status_reason.contains("retype by migration to storage2@file2 failed"), "{stayed:?}");
    assert_eq!(usage(&pools.fleet, "p1", "gigabytes_on2").await, 0, "the reservation is given back");
    assert!(files_in(&pools.dir2).is_empty(), "no partial copy is left");

    // Again with a working destination; the coordinator dies right after the copy, before recording it.
    pools.storage2.kill();
    pools.storage2 = pools.fleet.start_agent("storage", "storage2", &pools.backend2);
    pools.storage2.wait_registered().await;
    pools.fleet.start_coordinator_with(&[("EMBER_FAILPOINTS", "migrate_volume.copied")]);
    let admin = VolumeServiceClient::new(pools.fleet.admin());
    // Its answer can be lost: the process may abort before it is sent. The database says what was recorded.
    if let Err(lost) = admin.clone().migrate_volume(to2).await {
        assert!(matches!(lost.code(), Code::Unavailable | Code::Unknown), "refused: {lost:?}");
    }
    let crashed = pools.fleet.coordinator.as_mut().unwrap().wait_exit(Duration::from_secs(60));
    assert!(!crashed.success(), "the coordinator aborted at the failpoint");
    let db = pools.fleet.db().await;
    let row: (String, String, String) = sqlx::query_as("SELECT status, host, migrate_host FROM volumes WHERE id = ?")
        .bind(&v.id)
        .fetch_one(&db)
        .await
        .unwrap();
    db.close().await;
    assert_eq!(row, ("migrating".into(), "storage1".into(), "storage2".into()), "the copy is not yet recorded");
    assert_eq!(files_in(&pools.dir2), [v.id.clone()].into(), "the copy is there");
    // The copy is made again on resume, over whatever the destination holds: where the source has a hole, the
    // copy must read as zeros too.
    let copy = std::fs::OpenOptions::new().write(true).open(pools.dir2.join(format!("volume-{}", v.id))).unwrap();
    copy.write_all_at(b"stale!!!", 512 * MIB).unwrap();

    pools.fleet.start_coordinator();
    let volumes = VolumeServiceClient::new(pools.fleet.member("alice", "p1"));
    let moved = wait_volume(&volumes, &v.id, "available").await;
    assert_eq!((moved.host.as_str(), moved.status_reason.as_str()), ("storage2@file2", ""), "{moved:?}");
    assert!(same_bytes(&pools.dir2.join(format!("volume-{}", v.id)), &reference));
    assert!(!pools.dir2.join(format!(".incomplete-volume-{}", v.id)).exists(), "a whole copy is not marked partial");
    assert!(files_in(&pools.dir1).is_empty(), "the old copy is gone");
    assert_eq!(usage(&pools.fleet, "p1", "gigabytes").await, 1);
    ember_fleet_tests::volumes::assert_usage_exact(&pools.fleet).await;
}

/// The destination's `copy_bandwidth_mib` (Cinder's volume_copy_bps_limit) holds a copy of 48 MiB of data to
/// 16 MiB/s, so it takes seconds; meanwhile the volume shows how far its copy has got, and the CLI lists it.
#[tokio::test]
async fn a_throttled_copy_shows_its_progress() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend1, dir1) = fleet.file_backend("file1", "");
    let (backend2, dir2) = fleet.file_backend("file2", "");
    let _storage1 = fleet.start_agent("storage", "storage1", &backend1);
    let _storage2 = fleet.start_agent("storage", "storage2", &format!("copy_bandwidth_mib = 16\n{backend2}"));
    wait_backend(&fleet, "storage1@file1").await;
    wait_backend(&fleet, "storage2@file2").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    set_enabled(&fleet, "storage2@file2", false).await;
    let v = new_volume(&volumes, 1).await;
    set_enabled(&fleet, "storage2@file2", true).await;
    let data = iscsi::pattern(7, 48 * MIB as usize);
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir1.join(format!("volume-{}", v.id)))
        .unwrap()
        .write_all_at(&data, 0)
        .unwrap();

    let req = MigrateVolumeRequest { id: v.id.clone(), pool: "storage2@file2".into() };
    volumes.clone().migrate_volume(req).await.unwrap();
    let midway = ember_fleet_tests::wait_for("the copy to report progress", Duration::from_secs(60), || async {
        let now = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.ok()?.into_inner();
        assert_eq!(now.status, "migrating", "the copy ended before any progress was seen: {now:?}");
        (now.migration_progress > 0).then_some(now)
    })
    .await;
    assert!(midway.migration_progress < 100, "{midway:?}");
    let (ok, out, _) = fleet.cli(&["volume", "show", &v.id]);
    assert!(ok && out.contains("storage1@file1 → storage2@file2 ("), "{out}");

    let moved = wait_volume(&volumes, &v.id, "available").await;
    assert_eq!((moved.host.as_str(), moved.migration_progress, moved.migrating_to.as_str()), ("storage2@file2", 0, ""));
    let mut copied = vec![0u8; data.len()];
    std::fs::File::open(dir2.join(format!("volume-{}", v.id))).unwrap().read_exact_at(&mut copied, 0).unwrap();
    assert!(copied == data, "the data arrived");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// An initiator given a volume with `ember volume export` is shown on the volume, and keeps it from moving (the
/// initiator would lose it) and from reverting (its data would change beneath the initiator) until it is
/// unexported. An export the storage node could not make is not recorded, and a delete takes the records along.
#[tokio::test]
async fn an_exported_volume_shows_its_initiators_and_neither_moves_nor_reverts_until_unexported() {
    let mut pools = two_pools(&[]).await;
    let fleet = &pools.fleet;
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let admin = VolumeServiceClient::new(fleet.admin());
    let (v, _) = volume_with_data(&pools, &volumes).await;
    let initiator = "iqn.2026-11.test:outside";
    let connector = || Some(Connector { initiator: initiator.into(), ..Default::default() });
    let export = InitializeConnectionRequest { volume_id: v.id.clone(), connector: connector() };
    let info = volumes.clone().initialize_connection(export.clone()).await.unwrap().into_inner();
    assert!(fleet.tgt_show("storage1").contains(&info.target_iqn), "storage1 exports it");
    let shown = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    let exports: Vec<_> =
        shown.exports.iter().map(|e| (e.initiator.as_str(), e.read_only, e.exported_by.as_str())).collect();
    assert_eq!(exports, [(initiator, false, "alice")]);
    let (ok, out, err) = fleet.cli(&["volume", "show", &v.id]);
    assert!(ok && out.contains(&format!("{initiator} (export)")), "{out}\n{err}");

    // Refused while exported, naming the initiator; nothing changes.
    let snapshots = SnapshotServiceClient::new(fleet.member("alice", "p1"));
    let snap = new_snapshot(&snapshots, &v.id).await;
    let revert = RevertVolumeRequest { id: v.id.clone(), snapshot_id: snap.id.clone() };
    let err = volumes.clone().revert_volume(revert).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(initiator) && err.message().contains("unexport"), "{err:?}");
    let snapshot = snapshots.clone().get_snapshot(GetSnapshotRequest { id: snap.id.clone() }).await.unwrap();
    assert_eq!(snapshot.into_inner().status, "available");
    snapshots.clone().delete_snapshot(DeleteSnapshotRequest { id: snap.id.clone() }).await.unwrap();
    ember_fleet_tests::volumes::wait_snapshot_gone(&snapshots, &snap.id).await;
    let migrate = MigrateVolumeRequest { id: v.id.clone(), pool: "storage2@file2".into() };
    let err = admin.clone().migrate_volume(migrate.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(initiator), "{err:?}");
    let still = wait_volume(&volumes, &v.id, "available").await;
    assert_eq!(still.host, "storage1@file1");
    assert!(fleet.tgt_show("storage1").contains(&info.target_iqn), "the export is untouched");

    // Unexported: the record goes with the target, and the volume moves.
    let unexport = TerminateConnectionRequest { volume_id: v.id.clone(), connector: connector() };
    volumes.clone().terminate_connection(unexport).await.unwrap();
    let shown = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert!(shown.exports.is_empty(), "{shown:?}");
    assert!(!fleet.tgt_show("storage1").contains(&info.target_iqn));
    admin.clone().migrate_volume(migrate).await.unwrap();
    let moved = wait_volume(&volumes, &v.id, "available").await;
    assert_eq!(moved.host, "storage2@file2", "{moved:?}");

    // An export its storage node could not make is not recorded (and UNAVAILABLE says to try again).
    pools.storage2.kill();
    let err = volumes.clone().initialize_connection(export.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let shown = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert!(shown.exports.is_empty(), "{shown:?}");

    // A delete removes the records with the volume.
    pools.storage2 = pools.fleet.start_agent("storage", "storage2", &pools.backend2);
    pools.storage2.wait_registered().await;
    let fleet = &pools.fleet;
    let info = volumes.clone().initialize_connection(export).await.unwrap().into_inner();
    assert!(fleet.tgt_show("storage2").contains(&info.target_iqn));
    volumes.clone().delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() }).await.unwrap();
    ember_fleet_tests::volumes::wait_gone(&volumes, &v.id).await;
    let db = fleet.db().await;
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM exports").fetch_one(&db).await.unwrap();
    assert_eq!(left, 0);
    assert!(!fleet.tgt_show("storage2").contains(&info.target_iqn));
    ember_fleet_tests::volumes::assert_usage_exact(fleet).await;
}
