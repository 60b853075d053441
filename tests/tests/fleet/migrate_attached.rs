//! Migration of an attached volume to another storage host while its guest runs (Cinder's migration of an
//! `in-use` volume, with Nova's swap done by the compute agent): a real libvirt domain keeps its disk while QEMU
//! mirrors it from one storage agent's tgtd to the other's and switches over. Proven by outcomes: the guest's
//! data on the new pool, the domain's live and persistent XML naming the new portal, the old copy and target
//! gone, and the guest seeing a later extend that only the new pool's agent performs.

use ember_fleet_tests::libvirt::{Domain, attach_request, boot_config, domain_exists, qcow2_root_image, virsh};
use ember_fleet_tests::volumes::{db_state, new_volume, usage, wait_backend, wait_settled, wait_volume};
use ember_fleet_tests::{Daemon, Fleet, wait_for};
use ember_proto::v1::attachment_service_client::AttachmentServiceClient;
use ember_proto::v1::fleet_service_client::FleetServiceClient;
use ember_proto::v1::instance_service_client::InstanceServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::volume_type_service_client::VolumeTypeServiceClient;
use ember_proto::v1::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

/// Two storage hosts (one file pool each, each with its own tgtd) and a compute host.
struct TwoHosts {
    fleet: Fleet,
    dir1: PathBuf,
    dir2: PathBuf,
    compute: Daemon,
    _storage: [Daemon; 2],
}

async fn two_hosts(compute_toml: &str, compute_env: &[(&str, &str)]) -> TwoHosts {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend1, dir1) = fleet.file_backend("file1", "");
    let (backend2, dir2) = fleet.file_backend("file2", "");
    let storage =
        [fleet.start_agent("storage", "storage1", &backend1), fleet.start_agent("storage", "storage2", &backend2)];
    let compute = fleet.start_agent_with("compute", "compute1", compute_toml, compute_env);
    for name in ["storage1@file1", "storage2@file2", "compute1"] {
        wait_backend(&fleet, name).await;
    }
    TwoHosts { fleet, dir1, dir2, compute, _storage: storage }
}

/// A 1 GiB volume on storage1, attached to a freshly booted domain whose guest has written its marker to it.
async fn attached_on_storage1(hosts: &TwoHosts, prefix: &str) -> (Domain, Volume) {
    let domain = Domain::boot(prefix).await;
    let mut services = FleetServiceClient::new(hosts.fleet.admin());
    let disable = DisableServiceRequest { name: "storage2@file2".into(), reason: "test".into() };
    services.disable_service(disable).await.unwrap();
    let volumes = VolumeServiceClient::new(hosts.fleet.admin());
    let v = new_volume(&volumes, 1).await;
    services.enable_service(EnableServiceRequest { name: "storage2@file2".into() }).await.unwrap();
    assert_eq!(v.host, "storage1@file1");
    AttachmentServiceClient::new(hosts.fleet.admin()).attach(attach_request(&v.id, &domain.name)).await.unwrap();
    let v = wait_volume(&volumes, &v.id, "in-use").await;
    domain.wait_console(&format!("DISK-WRITTEN serial={}", &v.id[..20]), WAIT).await;
    (domain, v)
}

fn head(path: &Path) -> String {
    let mut buf = vec![0; 64];
    std::fs::File::open(path).unwrap().read_exact(&mut buf).unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

/// `port='N'` of storage agent `name`'s iSCSI portal, as a domain's disk XML names it.
fn portal_attr(fleet: &Fleet, name: &str) -> String {
    format!("port='{}'", fleet.tgt_ports(name).1)
}

/// The volume is on storage2 and the guest uses it there: checked on every side.
async fn assert_moved_to_storage2(hosts: &TwoHosts, domain: &Domain, before: &Volume) -> Volume {
    let volumes = VolumeServiceClient::new(hosts.fleet.admin());
    let v = wait_settled(&volumes, &before.id).await;
    assert_eq!((v.status.as_str(), v.host.as_str(), v.status_reason.as_str()), ("in-use", "storage2@file2", ""));
    assert_eq!(v.migrating_to, "");
    assert_eq!(v.attachments.len(), 1);
    assert_eq!(v.attachments[0].device, before.attachments[0].device, "the guest keeps its device");
    let file2 = hosts.dir2.join(format!("volume-{}", v.id));
    assert!(head(&file2).starts_with(&format!("EMBER-GUEST-WROTE {}", &v.id[..20])), "{}", head(&file2));
    assert!(!hosts.dir1.join(format!("volume-{}", v.id)).exists(), "the old copy is removed");
    let iqn = format!("volume-{}", v.id);
    assert!(!hosts.fleet.tgt_show("storage1").contains(&iqn), "the old target is gone");
    assert!(hosts.fleet.tgt_show("storage2").contains(&iqn), "the new target serves the guest");
    for inactive in [false, true] {
        let xml = domain.xml(inactive);
        assert!(xml.contains(&portal_attr(&hosts.fleet, "storage2")), "inactive={inactive}: {xml}");
        assert!(!xml.contains(&portal_attr(&hosts.fleet, "storage1")), "inactive={inactive}: {xml}");
    }
    v
}

#[tokio::test]
async fn an_attached_volume_moves_to_another_storage_host_under_its_running_guest() {
    // QEMU's mirror held to 256 MiB/s, so that copying the 1 GiB disk takes seconds and shows its progress.
    let hosts = two_hosts("swap_bandwidth_mib = 256\n", &[]).await;
    let (domain, v) = attached_on_storage1(&hosts, "ember-swap").await;
    let volumes = VolumeServiceClient::new(hosts.fleet.admin());
    let req = MigrateVolumeRequest { id: v.id.clone(), pool: "storage2@file2".into() };
    volumes.clone().migrate_volume(req).await.unwrap();
    let midway = wait_for("the mirror to report progress", WAIT, || async {
        let now = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.ok()?.into_inner();
        assert_eq!(now.status, "migrating", "the swap ended before any progress was seen: {now:?}");
        (now.migration_progress > 0).then_some(now)
    })
    .await;
    assert!(midway.migration_progress < 100, "{midway:?}");
    let moved = assert_moved_to_storage2(&hosts, &domain, &v).await;
    let (_, _, gigabytes) = db_state(&hosts.fleet, "admin").await;
    assert_eq!(gigabytes, 1, "quota is unchanged");

    // Only the new pool's agent can grow the volume, and the guest sees it grow: its disk is the new copy.
    let (ok, out, err) = hosts.fleet.cli(&["volume", "extend", &v.id, "2", "--wait"]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(std::fs::metadata(hosts.dir2.join(format!("volume-{}", v.id))).unwrap().len(), 2 << 30);
    domain.wait_console(&format!("DISK-SIZE serial={} sectors=4194304", &v.id[..20]), WAIT).await;

    // A detach goes through the new export, and leaves nothing behind.
    let attachments = AttachmentServiceClient::new(hosts.fleet.admin());
    let detach = DetachRequest { attachment_id: moved.attachments[0].id.clone(), ..Default::default() };
    attachments.clone().detach(detach).await.unwrap();
    let volumes = VolumeServiceClient::new(hosts.fleet.admin());
    wait_volume(&volumes, &v.id, "available").await;
    domain.wait_console(&format!("DISK-GONE serial={}", &v.id[..20]), WAIT).await;
    assert!(!hosts.fleet.tgt_show("storage2").contains(&format!("volume-{}", v.id)));
}

/// The compute agent dies with the copy running in QEMU, and the coordinator dies once the domain has switched:
/// each restart goes on from where things are, and the end state is the same as without crashes.
#[tokio::test]
async fn an_attached_migration_survives_the_compute_agent_and_the_coordinator_dying() {
    let mut hosts = two_hosts("", &[("EMBER_FAILPOINTS", "compute.abort_in_swap")]).await;
    let (domain, v) = attached_on_storage1(&hosts, "ember-swap-crash").await;
    hosts.fleet.start_coordinator_with(&[("EMBER_FAILPOINTS", "migrate_volume.swapped")]);
    let volumes = VolumeServiceClient::new(hosts.fleet.admin());
    let req = MigrateVolumeRequest { id: v.id.clone(), pool: "storage2@file2".into() };
    let started = volumes.clone().migrate_volume(req).await.unwrap().into_inner();
    assert_eq!((started.status.as_str(), started.migrating_to.as_str()), ("migrating", "storage2@file2"));
    let detach = DetachRequest { attachment_id: v.attachments[0].id.clone(), ..Default::default() };
    let refused = AttachmentServiceClient::new(hosts.fleet.admin()).detach(detach).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "no detach while the disk is being swapped");

    assert!(!hosts.compute.wait_exit(WAIT).success(), "the compute agent aborted with the copy running");
    assert!(domain.xml(false).contains(&portal_attr(&hosts.fleet, "storage1")), "the guest is still on storage1");
    hosts.compute = hosts.fleet.start_agent("compute", "compute1", "");
    let crashed = hosts.fleet.coordinator.as_mut().unwrap().wait_exit(WAIT);
    assert!(!crashed.success(), "the coordinator aborted once the domain had switched");
    let db = hosts.fleet.db().await;
    let host: String =
        sqlx::query_scalar("SELECT host FROM volumes WHERE id = ?").bind(&v.id).fetch_one(&db).await.unwrap();
    assert_eq!(host, "storage1", "the crash came before the move was recorded");
    assert!(domain.xml(false).contains(&portal_attr(&hosts.fleet, "storage2")), "but the domain had switched");

    hosts.fleet.start_coordinator();
    assert_moved_to_storage2(&hosts, &domain, &v).await;
    let log = hosts.compute.log_text();
    assert!(!log.contains("copy started"), "the restarted agent finished the copy QEMU was running: {log}");
    assert_eq!(log.matches("volume swapped").count(), 2, "once by the pivot, once by the coordinator's repeat");
    let (_, _, gigabytes) = db_state(&hosts.fleet, "admin").await;
    assert_eq!(gigabytes, 1);
}

/// A copy that fails is cancelled: the guest keeps its disk on storage1, and nothing is left on storage2.
#[tokio::test]
async fn a_failed_swap_leaves_the_guest_on_its_old_copy() {
    let hosts = two_hosts("", &[("EMBER_FAILPOINTS", "compute.refuse_swap")]).await;
    let (domain, v) = attached_on_storage1(&hosts, "ember-swap-fail").await;
    let (ok, out, err) = hosts.fleet.cli(&["volume", "migrate", &v.id, "--pool", "storage2@file2", "--wait"]);
    assert!(!ok, "{out}\n{err}");
    assert!(err.contains("stayed on storage1@file1"), "{err}");
    let volumes = VolumeServiceClient::new(hosts.fleet.admin());
    let stayed = wait_settled(&volumes, &v.id).await;
    assert_eq!((stayed.status.as_str(), stayed.host.as_str()), ("in-use", "storage1@file1"));
    assert!(stayed.status_reason.contains("failpoint compute.refuse_swap"), "{}", stayed.status_reason);
    let iqn = format!("volume-{}", v.id);
    wait_for("the new copy and its target to go", WAIT, || async {
        let gone =
            !hosts.dir2.join(format!("volume-{}", v.id)).exists() && !hosts.fleet.tgt_show("storage2").contains(&iqn);
        gone.then_some(())
    })
    .await;
    assert!(hosts.fleet.tgt_show("storage1").contains(&iqn));
    for inactive in [false, true] {
        assert!(domain.xml(inactive).contains(&portal_attr(&hosts.fleet, "storage1")), "inactive={inactive}");
    }
    let (ok, out, err) = hosts.fleet.cli(&["volume", "extend", &v.id, "2", "--wait"]);
    assert!(ok, "{out}\n{err}");
    domain.wait_console(&format!("DISK-SIZE serial={} sectors=4194304", &v.id[..20]), WAIT).await;
}

/// A retype that moves an attached volume (migration policy `on-demand`) waits for a compute host that cannot be
/// reached. When the host is gone for good, an admin's forced detach ends it: the retype gives up, the volume
/// stays on its pool with its old type, the new type's reserved quota is given back, and neither copy keeps an
/// export.
#[tokio::test]
async fn a_forced_detach_ends_an_attached_retype_whose_compute_host_is_gone() {
    let mut hosts = two_hosts("", &[]).await;
    let (_domain, v) = attached_on_storage1(&hosts, "ember-swap-gone").await;
    let on2 = CreateVolumeTypeRequest {
        name: "on2".into(),
        extra_specs: [("volume_backend_name".to_string(), "file2".to_string())].into(),
        ..Default::default()
    };
    VolumeTypeServiceClient::new(hosts.fleet.admin()).create_volume_type(on2).await.unwrap();
    hosts.compute.kill();
    let volumes = VolumeServiceClient::new(hosts.fleet.admin());
    let retype =
        RetypeVolumeRequest { id: v.id.clone(), volume_type: "on2".into(), migration_policy: "on-demand".into() };
    let started = volumes.clone().retype_volume(retype).await.unwrap().into_inner();
    assert_eq!((started.status.as_str(), started.migrating_to.as_str()), ("retyping", "storage2@file2"));
    assert_eq!(usage(&hosts.fleet, "admin", "gigabytes_on2").await, 1, "the new type's quota is reserved");
    hosts.fleet.wait_operation_paused("the swap to wait for the compute host").await;

    let force = DetachRequest { attachment_id: v.attachments[0].id.clone(), force: true };
    AttachmentServiceClient::new(hosts.fleet.admin()).detach(force).await.unwrap();
    let ended = wait_for("the retype to give up and the detach to end", WAIT, || async {
        let v = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.ok()?.into_inner();
        (v.status == "available" && v.attachments.is_empty()).then_some(v)
    })
    .await;
    assert_eq!((ended.host.as_str(), ended.volume_type_name.as_str()), ("storage1@file1", v.volume_type_name.as_str()));
    assert!(ended.status_reason.contains("forced detach"), "{}", ended.status_reason);
    assert_eq!(usage(&hosts.fleet, "admin", "gigabytes_on2").await, 0, "the reservation is given back");
    let iqn = format!("volume-{}", v.id);
    wait_for("the new copy to go", WAIT, || async {
        (!hosts.dir2.join(format!("volume-{}", v.id)).exists()).then_some(())
    })
    .await;
    assert!(!hosts.fleet.tgt_show("storage2").contains(&iqn), "no export of the new copy is left");
    assert!(!hosts.fleet.tgt_show("storage1").contains(&iqn), "the dead host can no longer reach the volume");
    assert!(hosts.dir1.join(format!("volume-{}", v.id)).exists(), "the volume stays where it was");
}

/// An instance's boot volume moves while the instance runs from it: QEMU mirrors the root disk (`vda`) to
/// storage2 and switches over; the guest goes on (it takes and writes a hot-attached disk afterwards), and
/// deleting the instance removes its boot volume from its new pool.
#[tokio::test]
async fn a_running_instance_s_boot_volume_moves_to_another_storage_host() {
    let hosts = two_hosts(&boot_config(), &[]).await;
    let image = qcow2_root_image(hosts.fleet.subdir("images").join("root.qcow2"));
    let mut services = FleetServiceClient::new(hosts.fleet.admin());
    let disable = DisableServiceRequest { name: "storage2@file2".into(), reason: "test".into() };
    services.disable_service(disable).await.unwrap();
    let volumes = VolumeServiceClient::new(hosts.fleet.admin());
    let boot = CreateVolumeRequest { size_gb: 1, image: image.to_string_lossy().into(), ..Default::default() };
    let boot = volumes.clone().create_volume(boot).await.unwrap().into_inner();
    let boot = wait_volume(&volumes, &boot.id, "available").await;
    let data = new_volume(&volumes, 1).await;
    services.enable_service(EnableServiceRequest { name: "storage2@file2".into() }).await.unwrap();
    assert_eq!((boot.host.as_str(), data.host.as_str()), ("storage1@file1", "storage1@file1"));
    let instances = InstanceServiceClient::new(hosts.fleet.admin());
    let create = CreateInstanceRequest {
        name: "vm1".into(),
        boot_volume_id: boot.id.clone(),
        memory_mb: 256,
        delete_on_terminate: true,
        ..Default::default()
    };
    let vm = instances.clone().create_instance(create).await.unwrap().into_inner();
    let console = |marker: String| {
        let instances = instances.clone();
        let id = vm.id.clone();
        async move {
            wait_for(&format!("{marker:?} on the console"), WAIT, || async {
                let log = instances.clone().get_console_log(GetInstanceRequest { id: id.clone() }).await.ok()?;
                log.into_inner().text.contains(&marker).then_some(())
            })
            .await
        }
    };
    console("EMBER-INSTANCE-BOOTED root=/dev/vda".into()).await;
    wait_volume(&volumes, &boot.id, "in-use").await;

    let (ok, out, err) = hosts.fleet.cli(&["volume", "migrate", &boot.id, "--pool", "storage2@file2", "--wait"]);
    assert!(ok, "{out}\n{err}");
    let moved = wait_settled(&volumes, &boot.id).await;
    assert_eq!((moved.status.as_str(), moved.host.as_str()), ("in-use", "storage2@file2"));
    assert_eq!(moved.attachments[0].device, "vda");
    let (_, xml, _) = virsh(&["dumpxml", &vm.id]);
    assert!(xml.contains(&portal_attr(&hosts.fleet, "storage2")), "{xml}");
    let (_, persistent, _) = virsh(&["dumpxml", "--inactive", &vm.id]);
    assert!(persistent.contains(&portal_attr(&hosts.fleet, "storage2")), "the next boot uses it too: {persistent}");
    assert!(!hosts.dir1.join(format!("volume-{}", boot.id)).exists());
    // The root filesystem arrived: ext4's magic number (0xEF53) at offset 1080 of the new copy.
    let mut magic = [0u8; 2];
    let file2 = std::fs::File::open(hosts.dir2.join(format!("volume-{}", boot.id))).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&file2, &mut magic, 1080).unwrap();
    assert_eq!(magic, [0x53, 0xef]);

    // The guest runs on: it sees and writes a disk attached after the swap.
    AttachmentServiceClient::new(hosts.fleet.admin()).attach(attach_request(&data.id, &vm.id)).await.unwrap();
    wait_volume(&volumes, &data.id, "in-use").await;
    console(format!("DISK-WRITTEN serial={}", &data.id[..20])).await;

    instances.clone().delete_instance(DeleteInstanceRequest { id: vm.id.clone(), force: false }).await.unwrap();
    ember_fleet_tests::volumes::wait_gone(&volumes, &boot.id).await;
    assert!(!domain_exists(&vm.id));
    assert!(!hosts.dir2.join(format!("volume-{}", boot.id)).exists(), "the boot volume went from its new pool");
    assert!(!hosts.fleet.tgt_show("storage2").contains(&boot.id), "no target left");
}
