//! Scheduler hints (Cinder's `same_host` / `different_host`) through the real fleet: storage node storage1 with
//! two pools and storage2 with one. Hosts, not pools, are compared, so "apart from a volume on storage1" can only
//! mean storage2. Bad hints are refused naming the field, and create nothing.

use ember_fleet_tests::volumes::{db_state, wait_backend, wait_settled};
use ember_fleet_tests::{Daemon, Fleet};
use ember_proto::v1::fleet_service_client::FleetServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use tonic::Code;

fn storage_host(v: &Volume) -> &str {
    v.host.split_once('@').map(|(host, _)| host).unwrap_or_default()
}

/// Creates a 1 GiB volume through the CLI with `hints` (e.g. `--different-host ID`), and returns it settled.
async fn create_with(fleet: &Fleet, hints: &[&str]) -> Volume {
    let mut args = vec!["--json", "volume", "create", "--size", "1"];
    args.extend_from_slice(hints);
    let (ok, out, err) = fleet.cli(&args);
    assert!(ok, "{out}\n{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = created[0]["id"].as_str().unwrap().to_string();
    wait_settled(&VolumeServiceClient::new(fleet.admin()), &id).await
}

#[tokio::test]
async fn volumes_go_together_or_apart_by_storage_host() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (pool_a, _) = fleet.file_backend("a", "");
    let (pool_b, _) = fleet.file_backend("b", "");
    let (pool_c, _) = fleet.file_backend("c", "");
    let _agents: [Daemon; 2] = [
        fleet.start_agent("storage", "storage1", &format!("{pool_a}{pool_b}")),
        fleet.start_agent("storage", "storage2", &pool_c),
    ];
    for pool in ["storage1@a", "storage1@b", "storage2@c"] {
        wait_backend(&fleet, pool).await;
    }
    let mut services = FleetServiceClient::new(fleet.admin());
    let disable = DisableServiceRequest { name: "storage2@c".into(), reason: "test".into() };
    services.disable_service(disable).await.unwrap();
    let first = create_with(&fleet, &[]).await;
    services.enable_service(EnableServiceRequest { name: "storage2@c".into() }).await.unwrap();
    assert_eq!(storage_host(&first), "storage1");

    // Apart from a volume on storage1: the other pool of storage1 does not count as apart.
    let apart = create_with(&fleet, &["--different-host", &first.id]).await;
    assert_eq!((apart.status.as_str(), apart.host.as_str()), ("available", "storage2@c"), "{apart:?}");
    let together = create_with(&fleet, &["--same-host", &apart.id]).await;
    assert_eq!((together.status.as_str(), together.host.as_str()), ("available", "storage2@c"));
    let back = create_with(&fleet, &["--different-host", &apart.id, "--same-host", &first.id]).await;
    assert_eq!((back.status.as_str(), storage_host(&back)), ("available", "storage1"));

    // Apart from both hosts: no pool is left, and the reason says which rule refused each.
    let nowhere = create_with(&fleet, &["--different-host", &first.id, "--different-host", &apart.id]).await;
    assert_eq!(nowhere.status, "error");
    for pool in ["storage1@a", "storage1@b", "storage2@c"] {
        assert!(nowhere.status_reason.contains(&format!("{pool}: DifferentHostFilter")), "{}", nowhere.status_reason);
    }

    // Bad hints are refused naming the field, and leave nothing behind.
    let (before, volumes_used, _) = db_state(&fleet, "admin").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let with = |same_host: &[&str], different_host: &[&str]| CreateVolumeRequest {
        size_gb: 1,
        scheduler_hints: Some(SchedulerHints {
            same_host: same_host.iter().map(|s| s.to_string()).collect(),
            different_host: different_host.iter().map(|s| s.to_string()).collect(),
        }),
        ..Default::default()
    };
    let bad = volumes.clone().create_volume(with(&["not-a-volume-id"], &[])).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("scheduler_hints.same_host"), "{}", bad.message());
    let unknown = "00000000-0000-4000-8000-000000000009";
    let missing = volumes.clone().create_volume(with(&[], &[unknown])).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("scheduler_hints.different_host"), "{}", missing.message());
    // Another project's volume is as unknown as a missing one.
    let outsider = VolumeServiceClient::new(fleet.member("mallory", "p9"));
    let hidden = outsider.clone().create_volume(with(&[], &[&first.id])).await.unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound, "{hidden:?}");
    let too_many: Vec<String> = (0..33).map(|_| first.id.clone()).collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let crowded = volumes.clone().create_volume(with(&[], &too_many)).await.unwrap_err();
    assert_eq!(crowded.code(), Code::InvalidArgument, "{crowded:?}");
    let (after, volumes_used_after, _) = db_state(&fleet, "admin").await;
    assert_eq!((before, volumes_used), (after, volumes_used_after), "nothing was created or counted");
}
