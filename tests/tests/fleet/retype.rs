//! Changing a volume's type where it lies (Cinder's retype with migration policy `never`): allowed when the pool
//! the volume is on satisfies the new type, refused naming what does not match otherwise, with the volume's and
//! its snapshot's per-type quota usage following the type. (A retype that moves the volume: migrate.rs.)

use ember_fleet_tests::volumes::{new_snapshot, new_volume, usage, wait_backend, wait_gone, wait_snapshot_gone};
use ember_fleet_tests::{Fleet, SERVICE_DOWN_SECONDS, wait_for};
use ember_proto::v1::fleet_service_client::FleetServiceClient;
use ember_proto::v1::quota_service_client::QuotaServiceClient;
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::volume_type_service_client::VolumeTypeServiceClient;
use ember_proto::v1::*;
use std::time::Duration;
use tonic::Code;

async fn new_type(fleet: &Fleet, name: &str, key: &str, value: &str) {
    let req = CreateVolumeTypeRequest {
        name: name.into(),
        extra_specs: [(key.to_string(), value.to_string())].into(),
        ..Default::default()
    };
    VolumeTypeServiceClient::new(fleet.admin()).create_volume_type(req).await.unwrap();
}

/// p1's per-type usage of type `t`: [volumes_t, snapshots_t, gigabytes_t].
async fn typed(fleet: &Fleet, t: &str) -> [i64; 3] {
    [
        usage(fleet, "p1", &format!("volumes_{t}")).await,
        usage(fleet, "p1", &format!("snapshots_{t}")).await,
        usage(fleet, "p1", &format!("gigabytes_{t}")).await,
    ]
}

#[tokio::test]
async fn a_volume_takes_a_type_its_pool_satisfies_and_its_quota_follows() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let mut storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    new_type(&fleet, "gold", "volume_backend_name", "file1").await;
    new_type(&fleet, "elsewhere", "volume_backend_name", "file9").await;
    new_type(&fleet, "preallocated", "provisioning:type", "thick").await;
    let alice = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let alice_snaps = SnapshotServiceClient::new(fleet.member("alice", "p1"));
    let v = new_volume(&alice, 1).await;
    let snap = new_snapshot(&alice_snaps, &v.id).await;
    let old = v.volume_type_name.clone();
    assert_eq!(typed(&fleet, &old).await, [1, 1, 2]);
    let retype = |volume_type: &str| {
        let mut c = alice.clone();
        let req = RetypeVolumeRequest { id: v.id.clone(), volume_type: volume_type.into(), ..Default::default() };
        async move { c.retype_volume(req).await }
    };

    // Refused, naming why, and nothing changes.
    let err = retype("elsewhere").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("volume_backend_name=file1"), "{err:?}");
    assert!(err.message().contains("on-demand"), "the refusal says what would move it: {err:?}");
    let err = retype("preallocated").await.unwrap_err();
    assert!(err.message().contains("thick provisioning"), "{err:?}");
    let err = retype(&old).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = retype("no-such-type").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("volume_type"), "{err:?}");
    let limit = |n: i64| SetQuotaRequest { project: "p1".into(), limits: [("volumes_gold".to_string(), n)].into() };
    QuotaServiceClient::new(fleet.admin()).set_quota(limit(0)).await.unwrap();
    let err = retype("gold").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("volumes_gold"), "{err:?}");
    let same = alice.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!(same.volume_type_name, old);
    assert_eq!((typed(&fleet, &old).await, typed(&fleet, "gold").await), ([1, 1, 2], [0, 0, 0]));

    QuotaServiceClient::new(fleet.admin()).set_quota(limit(-1)).await.unwrap();
    let tls = fleet.issue(ember_common::identity::Role::Member, "alice", Some("p1"));
    let (ok, out, err) = fleet.cli_as(&tls, &["--json", "volume", "retype", &v.id, "gold"]);
    assert!(ok && out.contains("\"gold\""), "{out}\n{err}");
    let gold = alice.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!((gold.volume_type_name.as_str(), gold.status.as_str()), ("gold", "available"));
    assert_eq!((typed(&fleet, &old).await, typed(&fleet, "gold").await), ([0, 0, 0], [1, 1, 2]));
    assert_eq!((usage(&fleet, "p1", "volumes").await, usage(&fleet, "p1", "gigabytes").await), (1, 2), "totals stay");

    // Deleting them gives the usage back under the new type.
    alice_snaps.clone().delete_snapshot(DeleteSnapshotRequest { id: snap.id.clone() }).await.unwrap();
    wait_snapshot_gone(&alice_snaps, &snap.id).await;
    alice.clone().delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() }).await.unwrap();
    wait_gone(&alice, &v.id).await;
    assert_eq!(typed(&fleet, "gold").await, [0, 0, 0]);

    // A pool that is down cannot be checked against a type.
    let w = new_volume(&alice, 1).await;
    storage.kill();
    wait_for("the pool to be down", Duration::from_secs(u64::from(SERVICE_DOWN_SECONDS) + 5), || async {
        let list = FleetServiceClient::new(fleet.admin()).list_services(ListServicesRequest::default()).await;
        list.ok()?.into_inner().services.iter().any(|s| s.name == "storage1@file1" && !s.up).then_some(())
    })
    .await;
    let req = RetypeVolumeRequest { id: w.id.clone(), volume_type: "gold".into(), ..Default::default() };
    let err = alice.clone().retype_volume(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("is down"), "{err:?}");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}
