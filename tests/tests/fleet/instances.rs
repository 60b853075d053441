//! Boot from volume, the seed's path: a bootable volume made from an image (the test's ext4 root filesystem,
//! converted to qcow2), an instance booted from it on a real libvirt (QEMU/TCG) through QEMU's iSCSI
//! initiator, a second volume hot-attached and detached while it runs, and the instance deleted with its boot
//! volume — leaving no domain, secret, target or record. Booting from a snapshot makes the volume first.

use ember_fleet_tests::libvirt::{ComputeFleet, attach_request, boot_config, domain_exists, qcow2_root_image, secrets};
use ember_fleet_tests::volumes::{new_bootable_volume, new_volume, wait_gone, wait_volume};
use ember_fleet_tests::wait_for;
use ember_proto::v1::attachment_service_client::AttachmentServiceClient;
use ember_proto::v1::instance_service_client::InstanceServiceClient;
use ember_proto::v1::snapshot_service_client::SnapshotServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::volume_type_service_client::VolumeTypeServiceClient;
use ember_proto::v1::*;
use std::io::Read;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(120);

async fn wait_instance(client: &InstanceServiceClient<Channel>, id: &str, status: &str) -> Instance {
    wait_for(&format!("instance {id} to be {status}"), WAIT, || async {
        let i = client.clone().get_instance(GetInstanceRequest { id: id.into() }).await.ok()?.into_inner();
        assert_ne!(i.status, "error", "{i:?}");
        (i.status == status).then_some(i)
    })
    .await
}

/// Waits until instance `id` is gone (its GetInstance answers NOT_FOUND).
async fn wait_instance_gone(client: &InstanceServiceClient<Channel>, id: &str) {
    wait_for(&format!("instance {id} to go"), WAIT, || async {
        let got = client.clone().get_instance(GetInstanceRequest { id: id.into() }).await;
        matches!(got, Err(s) if s.code() == tonic::Code::NotFound).then_some(())
    })
    .await
}

async fn wait_console(client: &InstanceServiceClient<Channel>, id: &str, marker: &str) {
    wait_for(&format!("{marker:?} on instance {id}'s console"), WAIT, || async {
        let log = client.clone().get_console_log(GetInstanceRequest { id: id.into() }).await.ok()?.into_inner().text;
        log.contains(marker).then_some(())
    })
    .await
}

#[tokio::test]
async fn an_instance_boots_from_a_volume_made_from_an_image_and_takes_a_hot_attached_volume() {
    let ComputeFleet { fleet, dir, storage: _storage, compute: _compute } = ComputeFleet::start(&boot_config()).await;
    let image = qcow2_root_image(fleet.subdir("images").join("root.qcow2"));

    // The boot volume's type sets front-end QoS, which the instance's boot disk gets.
    let capped = CreateVolumeTypeRequest {
        name: "capped".into(),
        extra_specs: [("qos:read_iops_sec".to_string(), "2000".to_string())].into(),
        ..Default::default()
    };
    VolumeTypeServiceClient::new(fleet.admin()).create_volume_type(capped).await.unwrap();
    let volumes = VolumeServiceClient::new(fleet.admin());
    let image_volume = CreateVolumeRequest {
        size_gb: 1,
        image: image.to_string_lossy().into(),
        volume_type: "capped".into(),
        ..Default::default()
    };
    // A member's instance, from a member's volume (the image is a published one, in the node's image_dirs).
    let alice_volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let boot = alice_volumes.clone().create_volume(image_volume).await.unwrap().into_inner();
    let boot = wait_volume(&volumes, &boot.id, "available").await;
    assert!(boot.bootable);

    let instances = InstanceServiceClient::new(fleet.admin());
    let started = Instant::now();
    let vm = InstanceServiceClient::new(fleet.member("alice", "p1"))
        .create_instance(CreateInstanceRequest {
            name: "vm1".into(),
            boot_volume_id: boot.id.clone(),
            memory_mb: 256,
            delete_on_terminate: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.status, "building");
    let vm = wait_instance(&instances, &vm.id, "active").await;
    println!("create to active: {:?}", started.elapsed());
    assert_eq!(vm.host, "compute1");
    wait_console(&instances, &vm.id, "EMBER-INSTANCE-BOOTED root=/dev/vda").await;
    println!("boot to marker: {:?} (create call to the guest's init on the volume's root)", started.elapsed());
    let log = instances.clone().get_console_log(GetInstanceRequest { id: vm.id.clone() }).await.unwrap().into_inner();
    println!("console: {}", log.text);
    let boot = wait_volume(&volumes, &boot.id, "in-use").await;
    assert_eq!(boot.attachments.len(), 1);
    assert_eq!((boot.attachments[0].instance.as_str(), boot.attachments[0].device.as_str()), (vm.id.as_str(), "vda"));
    assert!(domain_exists(&vm.id), "the libvirt domain's UUID is the instance id");
    let (_, xml, _) = ember_fleet_tests::libvirt::virsh(&["dumpxml", &vm.id]);
    assert!(xml.contains("<read_iops_sec>2000</read_iops_sec>"), "the boot disk has its type's QoS: {xml}");

    // Another project's member may not put a disk into alice's guest; the refusal changes nothing.
    let bobs = new_volume(&VolumeServiceClient::new(fleet.member("bob", "p2")), 1).await;
    let err = AttachmentServiceClient::new(fleet.member("bob", "p2"))
        .attach(attach_request(&bobs.id, &vm.id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not one of your project's instances"), "{err:?}");
    assert_eq!(wait_volume(&volumes, &bobs.id, "available").await.attachments.len(), 0);

    // A second volume of alice's, hot-attached by her to her running instance by its id (the host is the
    // instance's, so she need not name it), written by the guest, detached.
    let data = new_volume(&alice_volumes, 1).await;
    let mut attachments = AttachmentServiceClient::new(fleet.member("alice", "p1"));
    let to_her_instance = AttachRequest { host: String::new(), ..attach_request(&data.id, &vm.id) };
    let a = attachments.attach(to_her_instance).await.unwrap().into_inner();
    assert_eq!(a.host, "compute1");
    let attached = wait_volume(&volumes, &data.id, "in-use").await;
    assert_eq!(attached.attachments[0].device, "vdb");
    wait_console(&instances, &vm.id, &format!("DISK-WRITTEN serial={}", &data.id[..20])).await;
    let mut head = vec![0u8; 18];
    std::fs::File::open(dir.join(format!("volume-{}", data.id))).unwrap().read_exact(&mut head).unwrap();
    assert_eq!(&head, b"EMBER-GUEST-WROTE ");
    attachments.detach(DetachRequest { attachment_id: a.id, ..Default::default() }).await.unwrap();
    wait_volume(&volumes, &data.id, "available").await;
    wait_console(&instances, &vm.id, &format!("DISK-GONE serial={}", &data.id[..20])).await;

    // Delete: the domain, its secret, the export and the boot volume (delete on terminate) all go.
    instances.clone().delete_instance(DeleteInstanceRequest { id: vm.id.clone(), force: false }).await.unwrap();
    wait_for("the instance record to go", WAIT, || async {
        let gone = instances.clone().get_instance(GetInstanceRequest { id: vm.id.clone() }).await;
        matches!(gone, Err(s) if s.code() == tonic::Code::NotFound).then_some(())
    })
    .await;
    wait_gone(&volumes, &boot.id).await;
    assert!(!domain_exists(&vm.id));
    assert!(!secrets().contains(&boot.id));
    assert!(!fleet.tgt_show("storage1").contains(&boot.id), "no target left");
    assert!(!dir.join(format!("volume-{}", boot.id)).exists());

    // Booting from a snapshot of the data volume creates a volume from it first (it is not bootable, but a
    // domain still starts: this checks the flow, not the guest).
    let snap = SnapshotServiceClient::new(fleet.admin())
        .create_snapshot(CreateSnapshotRequest { volume_id: data.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    wait_for("the snapshot", WAIT, || async {
        let s = SnapshotServiceClient::new(fleet.admin())
            .get_snapshot(GetSnapshotRequest { id: snap.id.clone() })
            .await
            .ok()?;
        (s.get_ref().status == "available").then_some(())
    })
    .await;
    let vm2 = instances
        .clone()
        .create_instance(CreateInstanceRequest {
            name: "vm2".into(),
            boot_snapshot_id: snap.id.clone(),
            memory_mb: 128,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(vm2.boot_volume_id, data.id);
    let vm2 = wait_instance(&instances, &vm2.id, "active").await;
    let made = wait_volume(&volumes, &vm2.boot_volume_id, "in-use").await;
    assert_eq!(made.source_snapshot_id, snap.id);
    instances.clone().delete_instance(DeleteInstanceRequest { id: vm2.id.clone(), force: false }).await.unwrap();
    wait_volume(&volumes, &made.id, "available").await;
    assert!(!domain_exists(&vm2.id), "the domain went; the boot volume stays (no delete on terminate)");
}

/// Instances count against their project's quota, as Nova's do: `instances`, `cores` and `ram` (MiB). A create
/// over a limit is refused, naming it, and makes nothing (no boot volume from a snapshot either); a delete gives
/// the quota back.
#[tokio::test]
async fn instances_count_against_their_projects_quota() {
    use ember_fleet_tests::volumes::{new_snapshot, usage};
    use ember_proto::v1::quota_service_client::QuotaServiceClient;
    let ComputeFleet { fleet, dir: _dir, storage: _storage, compute: _compute } =
        ComputeFleet::start(&boot_config()).await;
    let limits = [("instances", 1), ("cores", 2), ("ram", 1024)].map(|(k, v)| (k.to_string(), v)).into();
    QuotaServiceClient::new(fleet.admin()).set_quota(SetQuotaRequest { project: "p1".into(), limits }).await.unwrap();
    let volumes = VolumeServiceClient::new(fleet.member("alice", "p1"));
    let instances = InstanceServiceClient::new(fleet.member("alice", "p1"));
    let boot = new_volume(&volumes, 1).await;
    let snapshot = new_snapshot(&SnapshotServiceClient::new(fleet.member("alice", "p1")), &boot.id).await;
    let request = |vcpus: u32, memory_mb: u32| CreateInstanceRequest {
        name: "counted".into(),
        boot_volume_id: boot.id.clone(),
        vcpus,
        memory_mb,
        ..Default::default()
    };
    let used = || async {
        (usage(&fleet, "p1", "instances").await, usage(&fleet, "p1", "cores").await, usage(&fleet, "p1", "ram").await)
    };

    for (req, over) in [(request(4, 256), "cores"), (request(1, 2048), "ram")] {
        let err = instances.clone().create_instance(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains(over), "{over}: {err:?}");
    }
    let listed = instances.clone().list_instances(ListInstancesRequest::default()).await.unwrap().into_inner();
    assert!(listed.instances.is_empty(), "{listed:?}");
    assert_eq!(used().await, (0, 0, 0));

    let first = instances.clone().create_instance(request(2, 256)).await.unwrap().into_inner();
    wait_instance(&instances, &first.id, "active").await;
    assert_eq!(used().await, (1, 2, 256));
    let volumes_before = usage(&fleet, "p1", "volumes").await;
    let from_snapshot = CreateInstanceRequest {
        name: "second".into(),
        boot_snapshot_id: snapshot.id.clone(),
        memory_mb: 64,
        ..Default::default()
    };
    let err = instances.clone().create_instance(from_snapshot).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("instances"), "{err:?}");
    assert_eq!(usage(&fleet, "p1", "volumes").await, volumes_before, "no boot volume was made");

    instances.clone().delete_instance(DeleteInstanceRequest { id: first.id.clone(), force: false }).await.unwrap();
    wait_instance_gone(&instances, &first.id).await;
    assert_eq!(used().await, (0, 0, 0));

    // Creates from the snapshot racing for the one instance the quota allows: one wins, the others are refused,
    // and none of them leaves a boot volume behind.
    let racers: Vec<_> = (0..3)
        .map(|n| {
            let mut instances = instances.clone();
            let req = CreateInstanceRequest {
                name: format!("racer{n}"),
                boot_snapshot_id: snapshot.id.clone(),
                memory_mb: 64,
                delete_on_terminate: true,
                ..Default::default()
            };
            tokio::spawn(async move { instances.create_instance(req).await.map(tonic::Response::into_inner) })
        })
        .collect();
    let mut outcomes = Vec::new();
    for racer in racers {
        outcomes.push(racer.await.unwrap());
    }
    let won: Vec<&Instance> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
    assert_eq!(won.len(), 1, "{outcomes:?}");
    for lost in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert_eq!(lost.code(), tonic::Code::ResourceExhausted, "{lost:?}");
    }
    let listed = volumes.clone().list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().volumes;
    let boot_volumes: Vec<&str> =
        listed.iter().filter(|v| v.name.starts_with("racer")).map(|v| v.name.as_str()).collect();
    assert_eq!(boot_volumes, [format!("{}-boot", won[0].name)], "only the winner's boot volume");
    assert_eq!(usage(&fleet, "p1", "volumes").await, volumes_before + 1);
    wait_instance(&instances, &won[0].id, "active").await;
    instances.clone().delete_instance(DeleteInstanceRequest { id: won[0].id.clone(), force: false }).await.unwrap();
    wait_instance_gone(&instances, &won[0].id).await;
    ember_fleet_tests::volumes::wait_gone(&volumes, &won[0].boot_volume_id).await;
    assert_eq!(used().await, (0, 0, 0));
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// An instance created without a host goes to the up, enabled compute host that runs the fewest instances: not
/// to one that stopped heartbeating, and not every one to the same host.
#[tokio::test]
async fn an_instance_without_a_host_goes_to_the_least_busy_compute_host_that_is_up() {
    use ember_fleet_tests::backups::wait_down;
    use ember_fleet_tests::volumes::wait_backend;
    use ember_proto::v1::fleet_service_client::FleetServiceClient;
    let ComputeFleet { fleet, dir: _dir, storage: _storage, compute: _compute } =
        ComputeFleet::start(&boot_config()).await;
    let mut second = fleet.start_agent("compute", "compute2", &boot_config());
    wait_backend(&fleet, "compute2").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let instances = InstanceServiceClient::new(fleet.admin());
    let create = |volume: &str| CreateInstanceRequest {
        name: "placed".into(),
        boot_volume_id: volume.into(),
        memory_mb: 64,
        ..Default::default()
    };
    let mut made = vec![];
    for _ in 0..2 {
        let v = new_volume(&volumes, 1).await;
        let i = instances.clone().create_instance(create(&v.id)).await.unwrap().into_inner();
        wait_instance(&instances, &i.id, "active").await;
        made.push(i);
    }
    let mut hosts: Vec<&str> = made.iter().map(|i| i.host.as_str()).collect();
    hosts.sort();
    assert_eq!(hosts, ["compute1", "compute2"], "one each");

    // compute2 stops heartbeating: the next goes to compute1, busy as it is.
    second.kill();
    wait_down(&fleet, "compute2").await;
    let v = new_volume(&volumes, 1).await;
    let third = instances.clone().create_instance(create(&v.id)).await.unwrap().into_inner();
    assert_eq!(third.host, "compute1");
    wait_instance(&instances, &third.id, "active").await;
    made.push(third);

    // None up and enabled: refused, saying so, and nothing is made.
    let disable = DisableServiceRequest { name: "compute1".into(), reason: "test".into() };
    FleetServiceClient::new(fleet.admin()).disable_service(disable).await.unwrap();
    let v = new_volume(&volumes, 1).await;
    let err = instances.clone().create_instance(create(&v.id)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("no compute host is up and enabled"), "{err:?}");
    let listed = instances.clone().list_instances(ListInstancesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.instances.len(), 3);

    // compute2 back, every instance deleted: no guest is left running.
    let second = fleet.start_agent("compute", "compute2", &boot_config());
    second.wait_registered().await;
    for i in &made {
        instances.clone().delete_instance(DeleteInstanceRequest { id: i.id.clone(), force: false }).await.unwrap();
    }
    for i in &made {
        wait_instance_gone(&instances, &i.id).await;
        assert!(!domain_exists(&i.id), "instance {}'s domain is gone", i.id);
    }
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// A compute host takes an instance only while it has room: the vCPUs and memory its agent offers (the host's
/// totals under Nova's allocation ratios, less the memory kept for the host) less what its instances have.
#[tokio::test]
async fn instances_go_only_where_the_compute_host_has_room_for_them() {
    use ember_fleet_tests::volumes::wait_backend;
    // compute1 offers 2 vCPUs (ratio 1) and 1024 MiB (1536 less 512 reserved); compute2 offers 16 and 4096.
    let small = "[capacity]\nvcpus = 2\ncpu_allocation_ratio = 1.0\nmemory_mb = 1536\nreserved_host_memory_mb = 512\n";
    let ComputeFleet { fleet, dir: _dir, storage: _storage, compute: _compute } =
        ComputeFleet::start(&format!("{small}{}", boot_config())).await;
    let _second = fleet.start_agent(
        "compute",
        "compute2",
        &format!("[capacity]\nvcpus = 4\nmemory_mb = 4608\n{}", boot_config()),
    );
    wait_backend(&fleet, "compute2").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let instances = InstanceServiceClient::new(fleet.admin());
    let hypervisors = || {
        let (ok, out, err) = fleet.cli(&["service", "hypervisors"]);
        assert!(ok, "{out}\n{err}");
        out
    };
    let row = |out: &str, host: &str| {
        out.lines()
            .find(|l| l.contains(host))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let shown = hypervisors();
    assert_eq!(row(&shown, "compute1"), "compute1 up enabled 0 0/2 0/1024", "{shown}");
    assert_eq!(row(&shown, "compute2"), "compute2 up enabled 0 0/16 0/4096", "{shown}");

    let create = |volume: &str, host: &str, vcpus: u32, memory_mb: u32| CreateInstanceRequest {
        name: "sized".into(),
        boot_volume_id: volume.into(),
        host: host.into(),
        vcpus,
        memory_mb,
        ..Default::default()
    };
    // Too big for the host named: refused naming the host and what it lacks, and nothing is made.
    let v = new_volume(&volumes, 1).await;
    let err = instances.clone().create_instance(create(&v.id, "compute1", 4, 64)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("compute host compute1 has no room: 2 of 2 vCPUs free, 4 needed"), "{err:?}");
    let err = instances.clone().create_instance(create(&v.id, "compute1", 1, 2048)).await.unwrap_err();
    assert!(err.message().contains("1024 of 1024 MiB of memory free, 2048 needed"), "{err:?}");
    assert!(
        instances
            .clone()
            .list_instances(ListInstancesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .instances
            .is_empty()
    );

    // One instance on each host; compute1's fills it.
    let mut made = vec![];
    for (host, vcpus) in [("compute2", 1), ("compute1", 2)] {
        let v = if made.is_empty() { v.clone() } else { new_volume(&volumes, 1).await };
        let i = instances.clone().create_instance(create(&v.id, host, vcpus, 64)).await.unwrap().into_inner();
        assert_eq!(i.host, host);
        made.push(i);
    }
    let shown = hypervisors();
    assert_eq!(row(&shown, "compute1"), "compute1 up enabled 1 2/2 64/1024", "{shown}");
    let (ok, metrics, err) = fleet.cli(&["metrics"]);
    assert!(ok, "{err}");
    for sample in [
        "ember_compute_instances{host=\"compute1\"} 1",
        "ember_compute_vcpus{host=\"compute1\"} 2",
        "ember_compute_vcpus_used{host=\"compute1\"} 2",
        "ember_compute_memory_mb{host=\"compute1\"} 1024",
        "ember_compute_memory_mb_used{host=\"compute1\"} 64",
        "ember_compute_vcpus{host=\"compute2\"} 16",
    ] {
        assert!(metrics.lines().any(|l| l == sample), "{sample} missing:\n{metrics}");
    }
    // Unnamed, it would go to compute1 (as busy as compute2, and first by name), which has no room left.
    let v = new_volume(&volumes, 1).await;
    let third = instances.clone().create_instance(create(&v.id, "", 1, 64)).await.unwrap().into_inner();
    assert_eq!(third.host, "compute2");
    made.push(third);
    // More than any host has left.
    let v = new_volume(&volumes, 1).await;
    let err = instances.clone().create_instance(create(&v.id, "", 1, 4000)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("no compute host has room for 1 vCPUs and 4000 MiB"), "{err:?}");
    assert!(err.message().contains("compute2: 3968 of 4096 MiB of memory free"), "{err:?}");

    // Deleted, they give their room back.
    for i in &made {
        wait_instance(&instances, &i.id, "active").await;
        instances.clone().delete_instance(DeleteInstanceRequest { id: i.id.clone(), force: false }).await.unwrap();
    }
    for i in &made {
        wait_instance_gone(&instances, &i.id).await;
    }
    let shown = hypervisors();
    assert_eq!(row(&shown, "compute1"), "compute1 up enabled 0 0/2 0/1024", "{shown}");
    assert_eq!(row(&shown, "compute2"), "compute2 up enabled 0 0/16 0/4096", "{shown}");
    ember_fleet_tests::volumes::assert_usage_exact(&fleet).await;
}

/// A compute host that is down holds back the delete of its instances, for ever. An admin forces it (Nova's
/// local delete): the host is not asked, the instance's volumes are unexported and free, and the instance is gone.
/// When the host is back, it destroys the domain that was left running there and lets its disk go.
#[tokio::test]
async fn an_instance_on_a_compute_host_that_is_down_is_deleted_by_an_admin() {
    let ComputeFleet { fleet, dir: _, storage: _storage, mut compute } = ComputeFleet::start(&boot_config()).await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_bootable_volume(&volumes).await;
    let instances = InstanceServiceClient::new(fleet.admin());
    let create = CreateInstanceRequest { name: "stranded".into(), boot_volume_id: v.id.clone(), ..Default::default() };
    let vm = instances.clone().create_instance(create).await.unwrap().into_inner();
    wait_instance(&instances, &vm.id, "active").await;
    assert!(domain_exists(&vm.id));

    compute.kill();
    instances.clone().delete_instance(DeleteInstanceRequest { id: vm.id.clone(), force: false }).await.unwrap();
    fleet.wait_operation_paused("the delete to wait for the host").await;
    let get = GetInstanceRequest { id: vm.id.clone() };
    assert_eq!(instances.clone().get_instance(get).await.unwrap().into_inner().status, "deleting");
    assert_no_attach_to(&fleet, &volumes, &vm.id, "deleting").await;

    let forced = DeleteInstanceRequest { id: vm.id.clone(), force: true };
    let err = InstanceServiceClient::new(fleet.member("alice", "p1")).delete_instance(forced).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let (ok, out, err) = fleet.cli_off_runtime(&["instance", "delete", &vm.id, "--force", "--wait"]).await;
    assert!(ok && out.contains("deleted"), "{out}\n{err}");
    wait_instance_gone(&instances, &vm.id).await;
    let free = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!((free.status.as_str(), free.attachments.len()), ("available", 0), "{free:?}");
    assert!(!fleet.tgt_show("storage1").contains(&format!("volume-{}", v.id)), "the export was left");
    assert!(domain_exists(&vm.id), "the host was not asked");
    assert_eq!(leftover_state(&fleet, "destroy_domain", &vm.id).await.as_deref(), Some("running"));

    let _compute = fleet.start_agent("compute", "compute1", &boot_config());
    wait_for("the host to destroy the domain left there", WAIT, || async {
        let done = leftover_state(&fleet, "destroy_domain", &vm.id).await.as_deref() == Some("done");
        (done && !domain_exists(&vm.id)).then_some(())
    })
    .await;
    wait_for("the host to let the boot disk go", WAIT, || async {
        let states: Vec<String> = sqlx::query_scalar("SELECT state FROM operations WHERE kind = 'release_disk'")
            .fetch_all(&fleet.db().await)
            .await
            .unwrap();
        (states == ["done"]).then_some(())
    })
    .await;
}

/// A host that dies as an instance is placed on it leaves the boot waiting for it, `building`. A plain delete is
/// refused; an admin's forced delete ends the boot and frees its volume.
#[tokio::test]
async fn an_instance_whose_boot_waits_for_a_host_that_is_down_is_deleted_by_an_admin() {
    let ComputeFleet { fleet, dir: _, storage: _storage, mut compute } = ComputeFleet::start(&boot_config()).await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_bootable_volume(&volumes).await;
    // Killed just before the create: it is still `up` (its last heartbeat is recent), so the instance goes there.
    compute.kill();
    let instances = InstanceServiceClient::new(fleet.admin());
    let create = CreateInstanceRequest { name: "unborn".into(), boot_volume_id: v.id.clone(), ..Default::default() };
    let vm = instances.clone().create_instance(create).await.unwrap().into_inner();
    fleet.wait_operation_paused("the boot to wait for the host").await;
    let get = GetInstanceRequest { id: vm.id.clone() };
    assert_eq!(instances.clone().get_instance(get).await.unwrap().into_inner().status, "building");
    assert_no_attach_to(&fleet, &volumes, &vm.id, "building").await;

    let plain = DeleteInstanceRequest { id: vm.id.clone(), force: false };
    let err = instances.clone().delete_instance(plain).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("an admin may force it"), "{err:?}");
    let (ok, out, err) = fleet.cli_off_runtime(&["instance", "delete", &vm.id, "--force", "--wait"]).await;
    assert!(ok && out.contains("deleted"), "{out}\n{err}");
    let free = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!((free.status.as_str(), free.attachments.len()), ("available", 0), "{free:?}");
    assert!(!fleet.tgt_show("storage1").contains(&format!("volume-{}", v.id)), "the export was left");
    let (state, error) = fleet.operation("boot_instance", &vm.id).await.unwrap();
    assert_eq!((state.as_str(), error.as_str()), ("failed", "boot abandoned: the instance was deleted by force"));
    assert_eq!(leftover_state(&fleet, "destroy_domain", &vm.id).await.as_deref(), Some("running"));
}

/// An attach to instance `id`, which is `status` (not active), is refused naming why, and its volume stays
/// available with no attachment, as Nova refuses one to a server being built or deleted.
async fn assert_no_attach_to(
    fleet: &ember_fleet_tests::Fleet,
    volumes: &VolumeServiceClient<Channel>,
    id: &str,
    status: &str,
) {
    let data = new_volume(volumes, 1).await;
    let attachments = AttachmentServiceClient::new(fleet.admin());
    let err = attachments.clone().attach(attach_request(&data.id, id)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(&format!("instance {id} is {status}; attach needs active")), "{err:?}");
    let after = volumes.clone().get_volume(GetVolumeRequest { id: data.id.clone() }).await.unwrap().into_inner();
    assert_eq!((after.status.as_str(), after.attachments.len()), ("available", 0), "{after:?}");
}

/// The state of the operation of `kind` that lets go of what `resource_id` left on its host.
async fn leftover_state(fleet: &ember_fleet_tests::Fleet, kind: &str, resource_id: &str) -> Option<String> {
    fleet.operation(kind, resource_id).await.map(|(state, _)| state)
}
