//! Scheduling, rescheduling, quotas and the rules that refuse bad requests, through the real fleet.

use ember_fleet_tests::libvirt::{Domain, attach_request};
use ember_fleet_tests::volumes::{db_state, files_in, wait_backend, wait_settled, wait_volume};
use ember_fleet_tests::{Fleet, wait_for};
use ember_proto::v1::attachment_service_client::AttachmentServiceClient;
use ember_proto::v1::quota_service_client::QuotaServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::volume_type_service_client::VolumeTypeServiceClient;
use ember_proto::v1::*;
use std::time::Duration;
use tonic::Code;

#[tokio::test]
async fn a_failed_create_reschedules_to_another_backend_and_never_retries_one() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (bad_backend, bad_dir) = fleet.file_backend("bad", "");
    let (good_backend, good_dir) = fleet.file_backend("good", "");
    let _bad =
        fleet.start_agent_with("storage", "node-bad", &bad_backend, &[("EMBER_FAILPOINTS", "storage.create_volume")]);
    wait_backend(&fleet, "node-bad@bad").await;
    // Alone, the failing backend is tried once, then "no valid backend" names why.
    let client = VolumeServiceClient::new(fleet.admin());
    let v = client
        .clone()
        .create_volume(CreateVolumeRequest { size_gb: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let v = wait_settled(&client, &v.id).await;
    assert_eq!(v.status, "error");
    assert!(v.status_reason.contains("No valid backend"), "{}", v.status_reason);
    assert!(v.status_reason.contains("node-bad@bad: IgnoreAttemptedHostsFilter"), "{}", v.status_reason);
    assert!(v.status_reason.contains("injected failure"), "the agent's error reaches the user: {}", v.status_reason);

    let _good = fleet.start_agent("storage", "node-good", &good_backend);
    wait_backend(&fleet, "node-good@good").await;
    // Both pools weigh the same, so the failing one (listed first) is tried first, then never again.
    for _ in 0..4 {
        let v = client
            .clone()
            .create_volume(CreateVolumeRequest { size_gb: 1, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        let v = wait_settled(&client, &v.id).await;
        assert_eq!(v.status, "available", "{v:?}");
        assert_eq!(v.host, "node-good@good");
    }
    assert!(files_in(&bad_dir).is_empty(), "nothing left on the failing backend");
    assert_eq!(files_in(&good_dir).len(), 4);
    let pool = fleet.db().await;
    let attempts: Vec<(String, i64)> =
        sqlx::query_as("SELECT step, attempt FROM operations WHERE kind = 'create_volume' AND state = 'done'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(attempts.iter().all(|(_, a)| *a <= 2), "at most one retry each: {attempts:?}");
    assert!(attempts.iter().any(|(_, a)| *a == 2), "some create was rescheduled: {attempts:?}");
}

#[tokio::test]
async fn concurrent_creates_never_oversubscribe_a_pool() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    // A thick pool whose reserve leaves room for only a few 1 GiB volumes.
    let (backend, dir) = fleet.file_backend("tight", "thin = false\nreserved_percentage = 99\n");
    let _storage = fleet.start_agent("storage", "node1", &backend);
    wait_backend(&fleet, "node1@tight").await;
    let pool = fleet.db().await;
    let report: String =
        sqlx::query_scalar("SELECT report FROM services WHERE backend = 'tight'").fetch_one(&pool).await.unwrap();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let total = report["pools"][0]["total_capacity_gb"].as_f64().unwrap();
    let free = report["pools"][0]["free_capacity_gb"].as_f64().unwrap();
    let room = (total - (total * 0.99).floor()).min(free).floor() as usize;
    assert!((1..10).contains(&room), "test premise: room for a few volumes, got {room}");

    let client = VolumeServiceClient::new(fleet.admin());
    let creates: Vec<_> = (0..room + 3)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move {
                c.create_volume(CreateVolumeRequest { size_gb: 1, name: format!("c{i}"), ..Default::default() })
                    .await
                    .unwrap()
                    .into_inner()
            })
        })
        .collect();
    let mut created = Vec::new();
    for c in creates {
        created.push(c.await.unwrap());
    }
    let mut available = 0;
    for v in &created {
        let v = wait_settled(&client, &v.id).await;
        match v.status.as_str() {
            "available" => available += 1,
            "error" => assert!(v.status_reason.contains("CapacityFilter"), "{}", v.status_reason),
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(available, room, "exactly the room there was");
    assert_eq!(files_in(&dir).len(), room);
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_problem_and_change_nothing() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    let _compute = fleet.start_agent("compute", "compute1", "");
    wait_backend(&fleet, "storage1@file1").await;
    wait_backend(&fleet, "compute1").await;
    let vm1 = Domain::boot("ember-rules").await;
    let mut client = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let v = client.create_volume(CreateVolumeRequest { size_gb: 1, ..Default::default() }).await.unwrap().into_inner();
    let v = wait_volume(&client, &v.id, "available").await;
    let before = db_state(&fleet, "p1").await;

    let long = "n".repeat(256);
    let cases: Vec<(CreateVolumeRequest, Code, &str)> = vec![
        (CreateVolumeRequest { size_gb: 0, ..Default::default() }, Code::InvalidArgument, "size_gb:"),
        (CreateVolumeRequest { size_gb: 1 << 40, ..Default::default() }, Code::InvalidArgument, "size_gb:"),
        (
            CreateVolumeRequest { size_gb: 1, volume_type: "nope".into(), ..Default::default() },
            Code::NotFound,
            "volume_type",
        ),
        (
            CreateVolumeRequest { size_gb: 1, availability_zone: "mars".into(), ..Default::default() },
            Code::InvalidArgument,
            "availability_zone:",
        ),
        (CreateVolumeRequest { size_gb: 1, name: long.clone(), ..Default::default() }, Code::InvalidArgument, "name:"),
        (
            CreateVolumeRequest { size_gb: 1, snapshot_id: "not-a-uuid".into(), ..Default::default() },
            Code::InvalidArgument,
            "snapshot_id:",
        ),
        (
            CreateVolumeRequest {
                size_gb: 1,
                source_volume_id: "0a0a0a0a-1b1b-4c2c-8d3d-4e4e4e4e4e4e".into(),
                ..Default::default()
            },
            Code::NotFound,
            "volume",
        ),
        (
            CreateVolumeRequest { size_gb: 1, project: "other".into(), ..Default::default() },
            Code::PermissionDenied,
            "project other",
        ),
        (
            CreateVolumeRequest {
                size_gb: 1,
                metadata: [("bad key".to_string(), "v".to_string())].into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "metadata:",
        ),
    ];
    for (req, code, needle) in cases {
        let err = client.create_volume(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().contains(needle), "{req:?}: {}", err.message());
    }
    for id in ["", "xyz", "0A0A0A0A-1B1B-4C2C-8D3D-4E4E4E4E4E4E"] {
        let err = client.get_volume(GetVolumeRequest { id: id.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}");
        assert!(err.message().starts_with("id:"), "{}", err.message());
    }
    let err = client.extend_volume(ExtendVolumeRequest { id: v.id.clone(), new_size_gb: 1 }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("new_size_gb:"), "{}", err.message());

    // Another project's volume does not exist for this member.
    let mut bob = VolumeServiceClient::new(fleet.member("bob", "p2"));
    let err = bob.get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = bob.delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(bob.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().volumes.is_empty());

    // While attaching or attached: no delete (an attached volume may be extended: see attach.rs).
    // A member attaches only to their project's instances; vm1 is a domain ember did not make: an admin's.
    let mut attachments = AttachmentServiceClient::new(fleet.member("alice", "p1"));
    let err = attachments.attach(attach_request(&v.id, &vm1.name)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut admin_attachments = AttachmentServiceClient::new(fleet.admin());
    let a = admin_attachments.attach(attach_request(&v.id, &vm1.name)).await.unwrap().into_inner();
    let err = client.delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let in_use = wait_volume(&client, &v.id, "in-use").await;
    assert_eq!(in_use.attachments.len(), 1);
    assert_eq!(in_use.attachments[0].instance, vm1.name);
    let err = admin_attachments.attach(attach_request(&v.id, &vm1.name)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "twice to the same instance");
    let err = admin_attachments.attach(attach_request(&v.id, "vm2")).await.unwrap_err();
    assert!(err.message().contains("multiattach"), "{}", err.message());
    let err = admin_attachments
        .attach(AttachRequest {
            volume_id: v.id.clone(),
            instance: "vm2".into(),
            host: "nowhere".into(),
            read_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The export for compute1's initiator exists while attached, and goes on detach.
    let iqn = format!("volume-{}", v.id);
    assert!(fleet.tgt_show("storage1").contains(&iqn));
    attachments.detach(DetachRequest { attachment_id: a.id.clone(), ..Default::default() }).await.unwrap();
    let v = wait_volume(&client, &v.id, "available").await;
    assert!(v.attachments.is_empty());
    assert!(!fleet.tgt_show("storage1").contains(&iqn), "target gone after detach");
    let err =
        attachments.detach(DetachRequest { attachment_id: a.id.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "detach of what is not attached");

    assert_eq!(db_state(&fleet, "p1").await, before, "refused requests changed nothing");
}

#[tokio::test]
async fn quotas_bound_creates_and_usage_equals_what_exists() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    VolumeTypeServiceClient::new(fleet.admin())
        .create_volume_type(CreateVolumeTypeRequest { name: "gold".into(), ..Default::default() })
        .await
        .unwrap();
    QuotaServiceClient::new(fleet.admin())
        .set_quota(SetQuotaRequest {
            project: "p1".into(),
            limits: [("volumes".to_string(), 2), ("gigabytes".to_string(), 5), ("volumes_gold".to_string(), 1)].into(),
        })
        .await
        .unwrap();
    let mut client = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let err = client.create_volume(CreateVolumeRequest { size_gb: 6, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("gigabytes"), "{}", err.message());
    let gold = client
        .create_volume(CreateVolumeRequest { size_gb: 1, volume_type: "gold".into(), ..Default::default() })
        .await
        .unwrap();
    let err = client
        .create_volume(CreateVolumeRequest { size_gb: 1, volume_type: "gold".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert!(err.message().contains("volumes_gold"), "{}", err.message());
    let plain =
        client.create_volume(CreateVolumeRequest { size_gb: 2, ..Default::default() }).await.unwrap().into_inner();
    let err = client.create_volume(CreateVolumeRequest { size_gb: 1, ..Default::default() }).await.unwrap_err();
    assert!(err.message().contains("quota exceeded for volumes"), "{}", err.message());
    wait_volume(&client, &gold.get_ref().id, "available").await;
    wait_volume(&client, &plain.id, "available").await;
    // Extend holds its reservation; over quota it is refused with nothing changed.
    let err = client.extend_volume(ExtendVolumeRequest { id: plain.id.clone(), new_size_gb: 5 }).await.unwrap_err();
    assert!(err.message().contains("gigabytes"), "{}", err.message());
    let v = client.get_volume(GetVolumeRequest { id: plain.id.clone() }).await.unwrap().into_inner();
    assert_eq!((v.status.as_str(), v.size_gb), ("available", 2));
    client.extend_volume(ExtendVolumeRequest { id: plain.id.clone(), new_size_gb: 4 }).await.unwrap();
    wait_volume(&client, &plain.id, "available").await;
    let (rows, volumes, gigabytes) = db_state(&fleet, "p1").await;
    assert_eq!((volumes, gigabytes), (rows.len() as i64, rows.iter().map(|r| r.2).sum::<i64>()));
    assert_eq!((volumes, gigabytes), (2, 5));

    // Idempotent creates: the same key and parameters give the same volume; different parameters conflict.
    client.delete_volume(DeleteVolumeRequest { id: plain.id.clone(), ..Default::default() }).await.unwrap();
    ember_fleet_tests::volumes::wait_gone(&client, &plain.id).await;
    let req = CreateVolumeRequest { size_gb: 1, idempotency_key: "job-42".into(), ..Default::default() };
    let first = client.create_volume(req.clone()).await.unwrap().into_inner();
    let again = client.create_volume(req.clone()).await.unwrap().into_inner();
    assert_eq!(first.id, again.id);
    let err = client.create_volume(CreateVolumeRequest { size_gb: 2, ..req }).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().starts_with("idempotency_key:"), "{}", err.message());
    let (_, volumes, _) = db_state(&fleet, "p1").await;
    assert_eq!(volumes, 2, "the repeat consumed nothing");
}

/// An extend the backend has no room for fails before anything is allocated: the volume keeps its size and
/// data, its quota is given back, and asking again with a size that fits puts it right.
/// Sizes are bounded, as in Cinder, by the volume type (`provisioning:min_vol_size` / `max_vol_size`) and by the
/// project's `per_volume_gigabytes` quota, on create, extend and retype; refusals name the field and change
/// nothing.
#[tokio::test]
async fn volume_sizes_are_bounded_by_the_type_and_by_the_project() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let mut types = VolumeTypeServiceClient::new(fleet.admin());
    let bounds = [("provisioning:min_vol_size", "2"), ("provisioning:max_vol_size", "4")];
    let sized = CreateVolumeTypeRequest {
        name: "sized".into(),
        extra_specs: bounds.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    types.create_volume_type(sized).await.unwrap();
    for (key, value) in [("provisioning:min_vol_size", "5"), ("provisioning:max_vol_size", "big")] {
        let req = SetExtraSpecsRequest { id_or_name: "sized".into(), extra_specs: [(key.into(), value.into())].into() };
        let err = types.set_extra_specs(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{key}={value}: {err:?}");
        assert!(err.message().contains("extra_specs"), "{err:?}");
    }

    let client = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let small = client
        .clone()
        .create_volume(CreateVolumeRequest { size_gb: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    wait_volume(&client, &small.id, "available").await;
    let create = |size_gb: u64, volume_type: &str| {
        let mut c = client.clone();
        let req = CreateVolumeRequest { size_gb, volume_type: volume_type.into(), ..Default::default() };
        async move { c.create_volume(req).await }
    };
    for size in [1, 5] {
        let err = create(size, "sized").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{size} GiB: {err:?}");
        assert!(err.message().contains("size_gb") && err.message().contains("allows 2 to 4 GiB"), "{err:?}");
    }
    let v = create(2, "sized").await.unwrap().into_inner();
    wait_volume(&client, &v.id, "available").await;
    let extend = |id: &str, new_size_gb: u64| {
        let mut c = client.clone();
        let req = ExtendVolumeRequest { id: id.into(), new_size_gb };
        async move { c.extend_volume(req).await }
    };
    let err = extend(&v.id, 5).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().contains("new_size_gb"), "{err:?}");
    let retype = RetypeVolumeRequest { id: small.id.clone(), volume_type: "sized".into(), ..Default::default() };
    let err = client.clone().retype_volume(retype).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().contains("allows 2 to 4"), "{err:?}");

    let limit = SetQuotaRequest { project: "p1".into(), limits: [("per_volume_gigabytes".to_string(), 3)].into() };
    let quota = QuotaServiceClient::new(fleet.admin()).set_quota(limit).await.unwrap().into_inner();
    assert!(quota.items.iter().any(|i| i.resource == "per_volume_gigabytes" && i.limit == 3), "{quota:?}");
    let before = db_state(&fleet, "p1").await;
    let err = extend(&v.id, 4).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("per_volume_gigabytes"), "{err:?}");
    let err = create(4, "").await.unwrap_err();
    assert!(err.code() == Code::ResourceExhausted && err.message().contains("size_gb"), "{err:?}");
    assert_eq!(db_state(&fleet, "p1").await, before, "refusals changed nothing");
    extend(&v.id, 3).await.unwrap();
    assert_eq!(wait_volume(&client, &v.id, "available").await.size_gb, 3);
}

#[tokio::test]
async fn a_failed_extend_leaves_the_volume_as_it_was_and_can_be_tried_again() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, dir) = fleet.file_backend("thick", "thin = false\n");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@thick").await;
    let limits = [("gigabytes".to_string(), 65536)].into();
    QuotaServiceClient::new(fleet.admin()).set_quota(SetQuotaRequest { project: "p1".into(), limits }).await.unwrap();
    let mut client = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let v = client.create_volume(CreateVolumeRequest { size_gb: 1, ..Default::default() }).await.unwrap().into_inner();
    wait_volume(&client, &v.id, "available").await;
    let file = dir.join(format!("volume-{}", v.id));

    // Twice the filesystem's free space (other tests freeing space meanwhile cannot make it fit).
    let free = ember_common::agent::filesystem_space(&dir).unwrap().1 >> 30;
    client.extend_volume(ExtendVolumeRequest { id: v.id.clone(), new_size_gb: free * 2 + 64 }).await.unwrap();
    let failed = wait_settled(&client, &v.id).await;
    assert_eq!((failed.status.as_str(), failed.size_gb), ("error_extending", 1), "{failed:?}");
    assert!(failed.status_reason.contains("free on the backend"), "{failed:?}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1 << 30, "the file kept its size");
    assert_eq!(db_state(&fleet, "p1").await.2, 1, "the reservation was given back");

    client.extend_volume(ExtendVolumeRequest { id: v.id.clone(), new_size_gb: 2 }).await.unwrap();
    let grown = wait_volume(&client, &v.id, "available").await;
    assert_eq!((grown.size_gb, grown.status_reason.as_str()), (2, ""));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 << 30);
    assert_eq!(db_state(&fleet, "p1").await.2, 2);
}

#[tokio::test]
async fn exports_survive_a_tgtd_restart_and_a_storage_agent_restart() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let mut storage = fleet.start_agent("storage", "storage1", &backend);
    wait_backend(&fleet, "storage1@file1").await;
    let mut client = VolumeServiceClient::new(fleet.admin());
    let v = client.create_volume(CreateVolumeRequest { size_gb: 1, ..Default::default() }).await.unwrap().into_inner();
    wait_volume(&client, &v.id, "available").await;
    let info = client
        .initialize_connection(InitializeConnectionRequest {
            volume_id: v.id.clone(),
            connector: Some(Connector { initiator: "iqn.2026-11.test:h".into(), ..Default::default() }),
        })
        .await
        .unwrap()
        .into_inner();
    let url = ember_fleet_tests::iscsi::url(&info, &info.auth_password);
    let scratch = fleet.dir.path().join("scratch");
    let pattern = fleet.dir.path().join("p");
    std::fs::write(&pattern, ember_fleet_tests::iscsi::pattern(7, 1 << 20)).unwrap();
    ember_fleet_tests::iscsi::write(&url, &pattern).unwrap();

    let (control, _) = fleet.tgt_ports("storage1");
    let killed =
        std::process::Command::new("pkill").args(["-9", "-f", &format!("^tgtd -f -C {control} ")]).status().unwrap();
    assert!(killed.success());
    wait_for("the export to come back after tgtd died", Duration::from_secs(30), || async {
        ember_fleet_tests::iscsi::read(&url, 1, &scratch).ok()
    })
    .await;
    assert_eq!(ember_fleet_tests::iscsi::read(&url, 1, &scratch).unwrap(), std::fs::read(&pattern).unwrap());

    // The agent dies outright and tgtd with it; the restarted agent brings back the same export.
    storage.kill();
    let _ = std::process::Command::new("pkill").args(["-9", "-f", &format!("^tgtd -f -C {control} ")]).status();
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    assert!(fleet.tgt_show("storage1").contains(&info.target_iqn), "re-created before the agent serves");
    // The target is there; libiscsi's first login to a tgtd that has just started can still be turned away
    // ("Can not reconnect right now"), so the read is retried for a bounded time, then the data compared.
    let data = wait_for("the restarted export to serve reads", Duration::from_secs(30), || async {
        ember_fleet_tests::iscsi::read(&url, 1, &scratch).ok()
    })
    .await;
    assert_eq!(data, std::fs::read(&pattern).unwrap());
}
