//! Attach and detach through the public API to a real libvirt domain (QEMU under TCG) over QEMU's own iSCSI
//! initiator against the storage agent's tgtd: the guest sees the disk by its serial and writes to it, the
//! data is on the storage side, and a detach leaves nothing behind (live XML, libvirt secrets, tgt targets,
//! the coordinator's records). Failed attaches change nothing.

use ember_fleet_tests::libvirt::{ComputeFleet, Domain, attach_request, boot_config, secrets, virsh};
use ember_fleet_tests::volumes::{db_state, new_bootable_volume, new_volume, wait_backend, wait_volume};
use ember_fleet_tests::{Fleet, wait_for};
use ember_proto::v1::attachment_service_client::AttachmentServiceClient;
use ember_proto::v1::instance_service_client::InstanceServiceClient;
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::volume_type_service_client::VolumeTypeServiceClient;
use ember_proto::v1::*;
use std::io::Read;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn head(path: &std::path::Path, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    std::fs::File::open(path).unwrap().read_exact(&mut buf).unwrap();
    buf
}

async fn attachment_rows(fleet: &Fleet, volume_id: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM attachments WHERE volume_id = ?")
        .bind(volume_id)
        .fetch_one(&fleet.db().await)
        .await
        .unwrap()
}

/// Nothing of the volume's attachment is left anywhere: no tgt target, no libvirt secret, no attachment row.
async fn assert_released(fleet: &Fleet, volume_id: &str) {
    assert_released_from_storage(fleet, volume_id).await;
    assert!(!secrets().contains(&volume_id.to_string()), "a libvirt secret was left behind");
}

/// Waits until an attach that must fail has been undone: the volume is available again with the reason.
async fn wait_failed_attach(volumes: &VolumeServiceClient<tonic::transport::Channel>, id: &str) -> Volume {
    wait_for(&format!("the failed attach of {id} to be undone"), WAIT, || async {
        let v = volumes.clone().get_volume(GetVolumeRequest { id: id.into() }).await.ok()?.into_inner();
        (v.status == "available" && !v.status_reason.is_empty()).then_some(v)
    })
    .await
}

#[tokio::test]
async fn a_volume_hot_attaches_to_a_running_guest_and_detaches_cleanly() {
    let ComputeFleet { fleet, dir, storage: _storage, compute: _compute } = ComputeFleet::start("").await;
    let domain = Domain::boot("ember-attach").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let mut attachments = AttachmentServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    let serial20 = &v.id[..20];

    let a = attachments.attach(attach_request(&v.id, &domain.name)).await.unwrap().into_inner();
    let in_use = wait_volume(&volumes, &v.id, "in-use").await;
    assert_eq!(in_use.attachments.len(), 1);
    assert_eq!(
        in_use.attachments[0].device, "vda",
        "the first free device name (the instance boots from its initramfs)"
    );
    assert!(domain.xml(false).contains(&format!("<serial>{}</serial>", v.id)), "the disk is in the live XML");
    assert!(domain.xml(true).contains(&format!("<serial>{}</serial>", v.id)), "and in the persistent XML");
    assert!(secrets().contains(&v.id), "the CHAP secret is a libvirt secret");
    // The guest found the disk by its serial (/dev/disk/by-id/virtio-<serial>) and wrote through it.
    domain.wait_console(&format!("DISK-WRITTEN serial={serial20}"), WAIT).await;
    let written = head(&dir.join(format!("volume-{}", v.id)), 64);
    assert!(
        written.starts_with(format!("EMBER-GUEST-WROTE {serial20}").as_bytes()),
        "{:?}",
        String::from_utf8_lossy(&written)
    );
    let iqn = format!("volume-{}", v.id);
    assert!(fleet.tgt_show("storage1").contains(&iqn), "the target exists while attached");

    attachments.detach(DetachRequest { attachment_id: a.id.clone(), ..Default::default() }).await.unwrap();
    let after = wait_volume(&volumes, &v.id, "available").await;
    assert!(after.attachments.is_empty());
    domain.wait_console(&format!("DISK-GONE serial={serial20}"), WAIT).await;
    assert!(!domain.xml(false).contains(&v.id), "gone from the live XML");
    assert!(!domain.xml(true).contains(&v.id), "gone from the persistent XML");
    assert_released(&fleet, &v.id).await;

    // A domain libvirt does not know: the attach fails, and is undone on both agents.
    attachments.attach(attach_request(&v.id, "no-such-domain")).await.unwrap();
    let failed = wait_failed_attach(&volumes, &v.id).await;
    assert!(failed.status_reason.contains("no such libvirt domain"), "{}", failed.status_reason);
    assert_released(&fleet, &v.id).await;

    // A stopped domain: refused the same way, nothing left.
    domain.stop();
    attachments.attach(attach_request(&v.id, &domain.name)).await.unwrap();
    let failed = wait_failed_attach(&volumes, &v.id).await;
    assert!(failed.status_reason.contains("shut off"), "{}", failed.status_reason);
    assert!(!domain.xml(true).contains(&v.id), "the persistent XML is unchanged");
    assert_released(&fleet, &v.id).await;
}

/// The coordinator dies after the export, after the compute agent added the disk, and after the compute
/// agent removed it: each time a restart finishes the work, and the end state is exact on every side.
#[tokio::test]
async fn attach_and_detach_converge_after_the_coordinator_crashes() {
    let ComputeFleet { mut fleet, dir, storage: _storage, compute: _compute } = ComputeFleet::start("").await;
    let domain = Domain::boot("ember-crash").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    let iqn = format!("volume-{}", v.id);

    let crash_at = |fleet: &mut Fleet, point: &str| {
        fleet.start_coordinator_with(&[("EMBER_FAILPOINTS", point)]);
    };
    let wait_crash = |fleet: &mut Fleet| {
        let status = fleet.coordinator.as_mut().unwrap().wait_exit(Duration::from_secs(60));
        assert!(!status.success(), "the coordinator aborted at the failpoint");
    };
    crash_at(&mut fleet, "attach.exported");
    let a = AttachmentServiceClient::new(fleet.admin())
        .attach(attach_request(&v.id, &domain.name))
        .await
        .unwrap()
        .into_inner();
    wait_crash(&mut fleet);
    assert!(!domain.xml(false).contains(&v.id), "crashed before the compute agent was called");
    crash_at(&mut fleet, "attach.attached");
    wait_crash(&mut fleet);
    assert!(domain.xml(false).contains(&v.id), "the disk was added before the second crash");
    fleet.start_coordinator();
    let volumes = VolumeServiceClient::new(fleet.admin());
    let in_use = wait_volume(&volumes, &v.id, "in-use").await;
    assert_eq!(in_use.attachments.len(), 1);
    assert_eq!(in_use.attachments[0].id, a.id);
    assert_eq!(in_use.attachments[0].device, "vda", "the repeat found the disk rather than adding another");
    assert_eq!(domain.xml(false).matches(&format!("<serial>{}</serial>", v.id)).count(), 1);
    domain.wait_console(&format!("DISK-WRITTEN serial={}", &v.id[..20]), WAIT).await;
    assert!(head(&dir.join(format!("volume-{}", v.id)), 18).starts_with(b"EMBER-GUEST-WROTE "));

    crash_at(&mut fleet, "detach.detached");
    AttachmentServiceClient::new(fleet.admin())
        .detach(DetachRequest { attachment_id: a.id.clone(), ..Default::default() })
        .await
        .unwrap();
    wait_crash(&mut fleet);
    assert!(!domain.xml(false).contains(&v.id), "the disk left the guest before the crash");
    assert!(fleet.tgt_show("storage1").contains(&iqn), "the export was still there at the crash");
    fleet.start_coordinator();
    let volumes = VolumeServiceClient::new(fleet.admin());
    let after = wait_volume(&volumes, &v.id, "available").await;
    assert!(after.attachments.is_empty());
    assert_released(&fleet, &v.id).await;
}

/// A guest that does not release the disk (paused): libvirt reports success after about 5 s while the disk is
/// still attached, so the detach must fail with the reason, the volume stay in-use and the export stay up. Once
/// the guest runs again, a second detach finishes.
#[tokio::test]
async fn a_detach_the_guest_never_acknowledges_fails_clearly_and_a_retry_finishes_it() {
    let ComputeFleet { fleet, dir: _, storage: _storage, compute: _compute } = ComputeFleet::start("").await;
    let domain = Domain::boot("ember-paused").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let mut attachments = AttachmentServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    let a = attachments.attach(attach_request(&v.id, &domain.name)).await.unwrap().into_inner();
    wait_volume(&volumes, &v.id, "in-use").await;
    domain.wait_console(&format!("DISK-WRITTEN serial={}", &v.id[..20]), WAIT).await;

    domain.suspend();
    // Through the CLI, which waits and then says the detach did not complete, and why.
    let (ok, out, err) = fleet.cli_off_runtime(&["volume", "detach", &v.id, "--wait"]).await;
    assert!(!ok && err.contains("detach did not complete") && err.contains("did not release"), "{out}\n{err}");
    let refused = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!(refused.status, "in-use", "{refused:?}");
    assert_eq!(refused.attachments.len(), 1, "still attached: {refused:?}");
    assert!(domain.xml(false).contains(&format!("<serial>{}</serial>", v.id)), "the guest still has the disk");
    assert!(fleet.tgt_show("storage1").contains(&format!("volume-{}", v.id)), "so the export stays");
    assert!(secrets().contains(&v.id), "and so does the secret");

    domain.resume();
    attachments.detach(DetachRequest { attachment_id: a.id.clone(), ..Default::default() }).await.unwrap();
    wait_volume(&volumes, &v.id, "available").await;
    assert!(!domain.xml(false).contains(&v.id));
    assert_released(&fleet, &v.id).await;
}

/// A compute host that is down: its detach waits for it, for ever. An admin forces it (Cinder's
/// os-force_detach): the host is not asked, the volume's export is removed on the storage side so the host
/// cannot reach it again, and the volume is free. When the host is back, it releases the disk its guest kept;
/// an attach of the volume to that host waits for that release, so it neither reaches the old disk through a
/// new export nor loses its own disk to the release.
#[tokio::test]
async fn a_detach_waiting_for_a_dead_compute_host_is_forced_by_an_admin() {
    let ComputeFleet { fleet, dir: _, storage: _storage, mut compute } = ComputeFleet::start("").await;
    let domain = Domain::boot("ember-force").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let attachments = AttachmentServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    // Through the CLI: with --wait it shows the attachment as it ended, with the guest's device.
    let (ok, out, err) =
        fleet.cli(&["--json", "volume", "attach", &v.id, "--instance", &domain.name, "--host", "compute1", "--wait"]);
    assert!(ok, "{out}\n{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((shown[0]["status"].as_str(), shown[0]["device"].as_str()), (Some("attached"), Some("vda")), "{out}");
    let id = shown[0]["id"].as_str().unwrap().to_string();
    let a = attachments.clone().get_attachment(GetAttachmentRequest { id }).await.unwrap().into_inner();
    assert_eq!(
        volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner().status,
        "in-use"
    );
    assert!(fleet.tgt_show("storage1").contains(&format!("volume-{}", v.id)), "exported while attached");
    // The guest's writes are done (writes hanging on the removed export would hold the disk in the guest).
    domain.wait_console(&format!("DISK-WRITTEN serial={}", &v.id[..20]), WAIT).await;

    compute.kill();
    let detach = DetachRequest { attachment_id: a.id.clone(), force: false };
    attachments.clone().detach(detach).await.unwrap();
    fleet.wait_operation_paused("the detach to wait for the host").await;
    let waiting = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!(waiting.status, "detaching");

    force_detach(&fleet, &volumes, &a.id, &v.id).await;
    // The host was not asked: its guest still has the disk (and gets I/O errors on it) until the host is back.
    let serial = format!("<serial>{}</serial>", v.id);
    assert!(domain.xml(false).contains(&serial), "the dead host was not touched");
    assert_eq!(release_state(&fleet, &a.id).await.as_deref(), Some("running"));

    let again = attachments.clone().attach(attach_request(&v.id, &domain.name)).await.unwrap().into_inner();
    let get = GetAttachmentRequest { id: again.id.clone() };
    let waiting = wait_for("the new attach to wait for the release", WAIT, || async {
        let a = attachments.clone().get_attachment(get.clone()).await.ok()?.into_inner();
        a.status_reason.contains("waiting for compute1 to release the disk").then_some(a)
    })
    .await;
    assert_eq!(waiting.status, "attaching", "{waiting:?}");
    assert!(!fleet.tgt_show("storage1").contains(&format!("volume-{}", v.id)), "exported again before the release");

    let compute = fleet.start_agent("compute", "compute1", "");
    let attached = wait_for("the new attach to end", WAIT, || async {
        let a = attachments.clone().get_attachment(get.clone()).await.ok()?.into_inner();
        (a.status == "attached").then_some(a)
    })
    .await;
    assert_eq!(attached.status_reason, "", "{attached:?}");
    assert_eq!(release_state(&fleet, &a.id).await.as_deref(), Some("done"));
    let log = compute.log_text();
    let (released, reattached) = (log.find("volume detached"), log.rfind("volume attached"));
    assert!(released.is_some() && released < reattached, "the old disk went before the new one came: {log}");
    assert_eq!(domain.xml(false).matches(&serial).count(), 1, "the guest has the new disk");
    attachments.clone().detach(DetachRequest { attachment_id: again.id, force: false }).await.unwrap();
    wait_volume(&volumes, &v.id, "available").await;
    assert_released(&fleet, &v.id).await;
}

/// A guest that keeps the disk a forced detach left (here: paused) makes its host refuse the release, which is
/// retried. Meanwhile an instance booting from that volume on that host waits before its export, saying why,
/// and boots once the guest has let the disk go.
#[tokio::test]
async fn a_boot_from_a_volume_waits_until_the_disk_a_forced_detach_left_is_released() {
    let ComputeFleet { fleet, dir: _, storage: _storage, compute: _compute } =
        ComputeFleet::start(&boot_config()).await;
    let domain = Domain::boot("ember-keep").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let attachments = AttachmentServiceClient::new(fleet.admin());
    let v = new_bootable_volume(&volumes).await;
    let a = attachments.clone().attach(attach_request(&v.id, &domain.name)).await.unwrap().into_inner();
    wait_volume(&volumes, &v.id, "in-use").await;
    domain.wait_console(&format!("DISK-WRITTEN serial={}", &v.id[..20]), WAIT).await;

    domain.suspend();
    attachments.clone().detach(DetachRequest { attachment_id: a.id.clone(), force: true }).await.unwrap();
    wait_volume(&volumes, &v.id, "available").await;
    let instances = InstanceServiceClient::new(fleet.admin());
    let create = CreateInstanceRequest {
        name: "after-leftover".into(),
        boot_volume_id: v.id.clone(),
        host: "compute1".into(),
        ..Default::default()
    };
    let vm = instances.clone().create_instance(create).await.unwrap().into_inner();
    let get = GetInstanceRequest { id: vm.id.clone() };
    let waiting = wait_for("the boot to wait for the release the guest refuses", WAIT, || async {
        let i = instances.clone().get_instance(get.clone()).await.ok()?.into_inner();
        i.status_reason.contains("waiting for compute1 to release the disk").then_some(i)
    })
    .await;
    assert_ne!(waiting.status, "active", "{waiting:?}");
    let refused = wait_for("the release to be refused", WAIT, || async {
        let i = instances.clone().get_instance(get.clone()).await.ok()?.into_inner();
        i.status_reason.contains("did not release").then_some(i)
    })
    .await;
    assert_ne!(refused.status, "active", "{refused:?}");
    assert_eq!(release_state(&fleet, &a.id).await.as_deref(), Some("running"));

    domain.resume();
    let active = wait_for("the instance to boot", WAIT, || async {
        let i = instances.clone().get_instance(get.clone()).await.ok()?.into_inner();
        (i.status == "active").then_some(i)
    })
    .await;
    assert_eq!(active.status_reason, "", "{active:?}");
    assert_eq!(release_state(&fleet, &a.id).await.as_deref(), Some("done"));
    assert!(!domain.xml(false).contains(&format!("<serial>{}</serial>", v.id)), "the guest let the disk go");
    instances.clone().delete_instance(DeleteInstanceRequest { id: vm.id.clone(), force: false }).await.unwrap();
    wait_for("the instance to go", WAIT, || async {
        let got = instances.clone().get_instance(GetInstanceRequest { id: vm.id.clone() }).await;
        matches!(got, Err(s) if s.code() == tonic::Code::NotFound).then_some(())
    })
    .await;
}

/// The state of the release of the disk that attachment `attachment_id`, forced away, left on its host.
async fn release_state(fleet: &Fleet, attachment_id: &str) -> Option<String> {
    fleet.operation("release_disk", attachment_id).await.map(|(state, _)| state)
}

/// A compute host that dies before an attach reaches it: the attach waits for it, with the volume exported to
/// it and `attaching`. An admin's forced detach ends that attach: the export goes, the host is not asked, and the
/// volume is free, with the reason. The release of whatever the host got waits for it, until an admin removes the
/// host from the fleet as gone for good.
#[tokio::test]
async fn an_attach_waiting_for_a_dead_compute_host_is_ended_by_a_forced_detach() {
    let ComputeFleet { fleet, dir: _, storage: _storage, mut compute } = ComputeFleet::start("").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let attachments = AttachmentServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    compute.kill();
    let a = attachments.clone().attach(attach_request(&v.id, "ember-gone")).await.unwrap().into_inner();
    fleet.wait_operation_paused("the attach to wait for the host").await;
    assert!(fleet.tgt_show("storage1").contains(&format!("volume-{}", v.id)), "exported before the host is asked");
    let waiting = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!(waiting.status, "attaching");

    let plain = DetachRequest { attachment_id: a.id.clone(), force: false };
    let err = attachments.clone().detach(plain).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("an admin may force it"), "{err:?}");
    let free = force_detach(&fleet, &volumes, &a.id, &v.id).await;
    assert!(free.status_reason.contains("attach abandoned"), "{free:?}");
    let (state, error) = fleet.operation("attach", &a.id).await.unwrap();
    assert_eq!(state, "failed");
    assert!(error.contains("was not asked"), "{error}");

    assert_eq!(release_state(&fleet, &a.id).await.as_deref(), Some("running"));
    let removed = wait_for("compute1 to be removed once down", WAIT, || async {
        let (ok, out, _) = fleet.cli_off_runtime(&["service", "delete", "compute1"]).await;
        ok.then_some(out)
    })
    .await;
    assert!(removed.contains("compute1"), "{removed}");
    let (state, error) = fleet.operation("release_disk", &a.id).await.unwrap();
    assert_eq!(state, "failed");
    assert!(error.contains("compute1 was removed from the fleet"), "{error}");
}

/// A detach forced while the compute host is in the middle of the attach (frozen there, then thawed): the host
/// finishes attaching, but the forced detach holds. The attach ends and the export goes without the host; then,
/// as after any forced detach, the host releases the disk its guest got.
#[tokio::test]
async fn a_detach_forced_while_the_host_attaches_ends_the_attach() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let _storage = fleet.start_agent("storage", "storage1", &backend);
    let freeze = [("EMBER_FAILPOINTS", "compute.freeze_in_attach_volume")];
    let compute = fleet.start_agent_with("compute", "compute1", "", &freeze);
    wait_backend(&fleet, "storage1@file1").await;
    wait_backend(&fleet, "compute1").await;
    let domain = Domain::boot("ember-race").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let attachments = AttachmentServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    let a = attachments.clone().attach(attach_request(&v.id, &domain.name)).await.unwrap().into_inner();
    wait_for("the compute agent to freeze in the attach", WAIT, || async { compute.is_stopped().then_some(()) }).await;

    let (ok, out, err) = fleet.cli(&["volume", "detach", &v.id, "--force"]);
    assert!(ok && out.contains("detaching"), "{out}\n{err}");
    let get = GetAttachmentRequest { id: a.id.clone() };
    let taken = attachments.clone().get_attachment(get).await.unwrap().into_inner();
    assert_eq!(taken.status, "detaching", "{taken:?}");
    compute.signal("CONT");

    let free = wait_failed_attach(&volumes, &v.id).await;
    // The guest may be reading the disk it just got: its export goes all the same.
    assert!(free.status_reason.contains("attach abandoned") && free.status_reason.contains("not asked"), "{free:?}");
    assert!(free.attachments.is_empty(), "{free:?}");
    assert_released_from_storage(&fleet, &v.id).await;
    assert!(compute.log_text().contains("volume attached"), "the host finished its attach");
    // The release is recorded with the attach's end. It finishes once the guest lets the disk go, which takes
    // minutes here: the guest's first writes to the disk hang on its removed export until they time out. The
    // release itself is tested with a host that comes back, above.
    let release = release_state(&fleet, &a.id).await;
    assert!(matches!(release.as_deref(), Some("running" | "done")), "{release:?}");
}

/// An attached volume grows under its running guest (Cinder's extend of an in-use volume): the storage agent grows
/// the file and has tgt report the new capacity, the compute agent has QEMU resize the disk, and the guest's kernel
/// sees the new size. A compute host that cannot be told does not hold the extend: the volume grows, and the
/// reason names the instance.
#[tokio::test]
async fn an_attached_volume_grows_and_its_guest_sees_the_new_size() {
    let ComputeFleet { mut fleet, dir, storage: _storage, mut compute } = ComputeFleet::start("").await;
    let domain = Domain::boot("ember-grow").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let attachments = AttachmentServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    attachments.clone().attach(attach_request(&v.id, &domain.name)).await.unwrap();
    let device = wait_volume(&volumes, &v.id, "in-use").await.attachments[0].device.clone();
    let serial20 = &v.id[..20];
    domain.wait_console(&format!("DISK-SIZE serial={serial20} sectors=2097152"), WAIT).await;

    // The coordinator crashes once the storage agent has grown the volume, before any guest is told; its restart
    // goes on from there.
    fleet.start_coordinator_with(&[("EMBER_FAILPOINTS", "extend_volume.extended")]);
    let extend = ExtendVolumeRequest { id: v.id.clone(), new_size_gb: 2 };
    // Its answer can be lost: the process may abort before it is sent. What is recorded shows below.
    if let Err(lost) = VolumeServiceClient::new(fleet.admin()).extend_volume(extend).await {
        assert!(matches!(lost.code(), tonic::Code::Unavailable | tonic::Code::Unknown), "refused: {lost:?}");
    }
    let crashed = fleet.coordinator.as_mut().unwrap().wait_exit(Duration::from_secs(60));
    assert!(!crashed.success(), "the coordinator aborted at the failpoint");
    assert!(!compute.log_text().contains("resized in the domain"), "no guest was told before the crash");
    fleet.start_coordinator();
    let volumes = VolumeServiceClient::new(fleet.admin());
    let grown = wait_volume(&volumes, &v.id, "in-use").await;
    assert_eq!((grown.status.as_str(), grown.size_gb, grown.status_reason.as_str()), ("in-use", 2, ""), "{grown:?}");
    assert_eq!(std::fs::metadata(dir.join(format!("volume-{}", v.id))).unwrap().len(), 2 << 30);
    assert!(fleet.tgt_show("storage1").contains("Size: 2147 MB"), "tgt reports the new capacity");
    let (_, info, _) = virsh(&["domblkinfo", &domain.uuid, &device]);
    assert!(info.contains("Capacity:       2147483648"), "{info}");
    domain.wait_console(&format!("DISK-SIZE serial={serial20} sectors=4194304"), WAIT).await;
    let (_, _, gigabytes_in_use) = db_state(&fleet, "admin").await;
    assert_eq!(gigabytes_in_use, 2);

    // A file the storage agent cannot grow (immutable): the extend fails, the volume stays attached and as it
    // was, with the reason, and `extend --wait` says so.
    let file = dir.join(format!("volume-{}", v.id));
    let chattr = |flag: &str| assert!(Command::new("chattr").arg(flag).arg(&file).status().unwrap().success());
    chattr("+i");
    let (ok, out, err) = fleet.cli_off_runtime(&["volume", "extend", &v.id, "3", "--wait"]).await;
    chattr("-i");
    assert!(!ok && err.contains("extend failed"), "{out}\n{err}");
    let kept = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!((kept.status.as_str(), kept.size_gb), ("in-use", 2), "{kept:?}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 << 30);

    compute.kill();
    let (ok, out, err) = fleet.cli(&["volume", "extend", &v.id, "3", "--wait"]);
    assert!(ok, "{out}\n{err}");
    let untold = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!((untold.status.as_str(), untold.size_gb), ("in-use", 3), "{untold:?}");
    assert!(untold.status_reason.contains(&format!("instance {} on compute1 was not told", domain.name)), "{untold:?}");
    assert_eq!(std::fs::metadata(dir.join(format!("volume-{}", v.id))).unwrap().len(), 3 << 30);
}

/// While an attached volume is being extended, its detach is refused, so the guests the extend tells are the
/// ones that keep it; once the extend ends, the detach goes through.
#[tokio::test]
async fn a_detach_waits_for_the_extend_of_its_volume() {
    let mut fleet = Fleet::new();
    fleet.start_coordinator();
    let (backend, _dir) = fleet.file_backend("file1", "");
    let freeze = [("EMBER_FAILPOINTS", "storage.freeze_in_extend_volume")];
    let storage = fleet.start_agent_with("storage", "storage1", &backend, &freeze);
    let _compute = fleet.start_agent("compute", "compute1", "");
    wait_backend(&fleet, "storage1@file1").await;
    wait_backend(&fleet, "compute1").await;
    let domain = Domain::boot("ember-wait").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let attachments = AttachmentServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    let a = attachments.clone().attach(attach_request(&v.id, &domain.name)).await.unwrap().into_inner();
    wait_volume(&volumes, &v.id, "in-use").await;
    volumes.clone().extend_volume(ExtendVolumeRequest { id: v.id.clone(), new_size_gb: 2 }).await.unwrap();
    wait_for("the storage agent to freeze in the extend", WAIT, || async { storage.is_stopped().then_some(()) }).await;

    let detach = DetachRequest { attachment_id: a.id.clone(), ..Default::default() };
    let err = attachments.clone().detach(detach.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("extending"), "{err:?}");
    let still = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!((still.status.as_str(), still.attachments.len()), ("extending", 1), "{still:?}");

    storage.signal("CONT");
    let grown = wait_volume(&volumes, &v.id, "in-use").await;
    assert_eq!(grown.size_gb, 2);
    attachments.clone().detach(detach).await.unwrap();
    let free = wait_volume(&volumes, &v.id, "available").await;
    assert!(free.attachments.is_empty(), "{free:?}");
}

/// A volume type's front-end QoS (`qos:` extra specs, as Cinder's front-end QoS specs that Nova applies) limits
/// the guest's disk: the compute agent writes it as libvirt `<iotune>`, and QEMU enforces it. Bad limits are
/// refused when set, naming them; an attached volume keeps its limits, so a retype that would change them waits
/// for the detach.
#[tokio::test]
async fn a_types_front_end_qos_limits_the_attached_disk() {
    let ComputeFleet { fleet, dir: _, storage: _storage, compute: _compute } = ComputeFleet::start("").await;
    let domain = Domain::boot("ember-qos").await;
    let mut types = VolumeTypeServiceClient::new(fleet.admin());
    let limits = [("qos:total_iops_sec", "500"), ("qos:read_bytes_sec", "10485760")];
    let create = CreateVolumeTypeRequest {
        name: "limited".into(),
        extra_specs: limits.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    types.create_volume_type(create).await.unwrap();
    for (key, value, why) in [
        ("qos:write_bytes_sec", "fast", "whole number"),
        ("qos:total_bytes_sec", "1", "cannot be set together"),
        ("qos:iops", "5", "not a QoS limit"),
    ] {
        let req =
            SetExtraSpecsRequest { id_or_name: "limited".into(), extra_specs: [(key.into(), value.into())].into() };
        let err = types.set_extra_specs(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{key}: {err:?}");
        assert!(err.message().contains("extra_specs") && err.message().contains(why), "{key}: {err:?}");
    }
    let kept = types.get_volume_type(GetVolumeTypeRequest { id_or_name: "limited".into() }).await.unwrap().into_inner();
    assert_eq!(kept.extra_specs.len(), 2, "refused specs changed nothing: {kept:?}");

    let volumes = VolumeServiceClient::new(fleet.admin());
    let req = CreateVolumeRequest { size_gb: 1, volume_type: "limited".into(), ..Default::default() };
    let v = volumes.clone().create_volume(req).await.unwrap().into_inner();
    wait_volume(&volumes, &v.id, "available").await;
    let attachments = AttachmentServiceClient::new(fleet.admin());
    let a = attachments.clone().attach(attach_request(&v.id, &domain.name)).await.unwrap().into_inner();
    let device = wait_volume(&volumes, &v.id, "in-use").await.attachments[0].device.clone();
    assert!(domain.xml(false).contains("<total_iops_sec>500</total_iops_sec>"), "{}", domain.xml(false));
    let (ok, tune, err) = virsh(&["blkdeviotune", &domain.uuid, &device]);
    assert!(ok, "{err}");
    let applied = |name: &str| {
        tune.lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_string()))
    };
    assert_eq!(applied("total_iops_sec").as_deref(), Some("500"), "{tune}");
    assert_eq!(applied("read_bytes_sec").as_deref(), Some("10485760"), "{tune}");

    let retype = RetypeVolumeRequest { id: v.id.clone(), volume_type: "__DEFAULT__".into(), ..Default::default() };
    let err = volumes.clone().retype_volume(retype).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("front-end QoS"), "{err:?}");
    attachments.clone().detach(DetachRequest { attachment_id: a.id, ..Default::default() }).await.unwrap();
    wait_volume(&volumes, &v.id, "available").await;
}

/// An admin forces the detach of attachment `attachment_id` of `volume_id` (after checking a member may not),
/// through the CLI; returns the volume, checked free: available, no attachment, no export left.
async fn force_detach(
    fleet: &Fleet,
    volumes: &VolumeServiceClient<tonic::transport::Channel>,
    attachment_id: &str,
    volume_id: &str,
) -> Volume {
    let forced = DetachRequest { attachment_id: attachment_id.into(), force: true };
    let err = AttachmentServiceClient::new(fleet.member("alice", "p1")).detach(forced).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let (ok, out, err) = fleet.cli(&["volume", "detach", volume_id, "--force", "--wait"]);
    assert!(ok && out.contains("detached"), "{out}\n{err}");
    let free = volumes.clone().get_volume(GetVolumeRequest { id: volume_id.into() }).await.unwrap().into_inner();
    assert_eq!((free.status.as_str(), free.attachments.len()), ("available", 0), "{free:?}");
    assert_released_from_storage(fleet, volume_id).await;
    free
}

/// Nothing of the volume's attachment is left on the storage side or in the coordinator's records.
async fn assert_released_from_storage(fleet: &Fleet, volume_id: &str) {
    assert!(!fleet.tgt_show("storage1").contains(&format!("volume-{volume_id}")), "a target was left behind");
    assert_eq!(attachment_rows(fleet, volume_id).await, 0, "an attachment record was left behind");
}

/// A read-only volume (Cinder's readonly flag) reaches its guest read-only whatever the attach asks; the flag
/// changes only while the volume is available, and no instance boots from such a volume.
#[tokio::test]
async fn a_read_only_volume_is_attached_read_only() {
    let ComputeFleet { fleet, dir: _, storage: _storage, compute: _compute } = ComputeFleet::start("").await;
    let domain = Domain::boot("ember-ro").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let attachments = AttachmentServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    let (ok, out, err) = fleet.cli(&["--json", "volume", "update", &v.id, "--read-only", "true"]);
    assert!(ok, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown[0]["read_only"], true, "{out}");

    let boot = CreateInstanceRequest { name: "vm-ro".into(), boot_volume_id: v.id.clone(), ..Default::default() };
    let err = ember_proto::v1::instance_service_client::InstanceServiceClient::new(fleet.admin())
        .create_instance(boot)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("read-only"), "{err:?}");

    let a = attachments.clone().attach(attach_request(&v.id, &domain.name)).await.unwrap().into_inner();
    assert_eq!(a.mode, "ro", "the attach asked for rw: {a:?}");
    wait_volume(&volumes, &v.id, "in-use").await;
    let xml = domain.xml(false);
    let disk = xml.split("</disk>").find(|d| d.contains(&format!("<serial>{}</serial>", v.id))).expect("the disk");
    assert!(disk.contains("<readonly/>"), "{disk}");

    let writable = UpdateVolumeRequest { id: v.id.clone(), read_only: Some(false), ..Default::default() };
    let err = volumes.clone().update_volume(writable).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("read-only"), "{err:?}");
    let still = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert!(still.read_only, "nothing changed");
}

/// The compute host's initiator is also given the volume with InitializeConnection (an operator's `ember volume
/// export` from that host): the storage node knows initiators, not who asked, so neither the unexport nor the
/// detach may take away access the other still needs.
#[tokio::test]
async fn an_export_to_an_attached_hosts_initiator_and_the_attachment_keep_each_others_access() {
    let ComputeFleet { fleet, dir: _dir, storage: _storage, compute: _compute } = ComputeFleet::start("").await;
    let domain = Domain::boot("ember-shared-initiator").await;
    let volumes = VolumeServiceClient::new(fleet.admin());
    let mut attachments = AttachmentServiceClient::new(fleet.admin());
    let v = new_volume(&volumes, 1).await;
    let iqn = format!("volume-{}", v.id);
    let a = attachments.attach(attach_request(&v.id, &domain.name)).await.unwrap().into_inner();
    wait_volume(&volumes, &v.id, "in-use").await;
    domain.wait_console(&format!("DISK-WRITTEN serial={}", &v.id[..20]), WAIT).await;
    let initiator: String =
        sqlx::query_scalar("SELECT json_extract(connector, '$.initiator') FROM attachments WHERE id = ?")
            .bind(&a.id)
            .fetch_one(&fleet.db().await)
            .await
            .unwrap();
    let connector = || Some(Connector { initiator: initiator.clone(), ..Default::default() });
    let export = InitializeConnectionRequest { volume_id: v.id.clone(), connector: connector() };
    let unexport = TerminateConnectionRequest { volume_id: v.id.clone(), connector: connector() };
    let exports = |v: &Volume| v.exports.iter().map(|e| e.initiator.clone()).collect::<Vec<_>>();

    // Unexported while attached: the record goes, the attachment's target stays.
    volumes.clone().initialize_connection(export.clone()).await.unwrap();
    volumes.clone().terminate_connection(unexport.clone()).await.unwrap();
    let shown = volumes.clone().get_volume(GetVolumeRequest { id: v.id.clone() }).await.unwrap().into_inner();
    assert_eq!((shown.status.as_str(), exports(&shown)), ("in-use", vec![]), "{shown:?}");
    assert!(fleet.tgt_show("storage1").contains(&iqn), "the attached guest keeps its target");
    assert!(domain.xml(false).contains(&v.id), "and its disk");

    // Detached while exported: the attachment goes, the export's target stays until it is unexported.
    volumes.clone().initialize_connection(export).await.unwrap();
    attachments.detach(DetachRequest { attachment_id: a.id, ..Default::default() }).await.unwrap();
    let detached = wait_volume(&volumes, &v.id, "available").await;
    assert_eq!(exports(&detached), std::slice::from_ref(&initiator), "{detached:?}");
    assert_eq!(attachment_rows(&fleet, &v.id).await, 0);
    assert!(fleet.tgt_show("storage1").contains(&iqn), "the export keeps its target after the detach");
    volumes.clone().terminate_connection(unexport).await.unwrap();
    assert_released(&fleet, &v.id).await;
}
