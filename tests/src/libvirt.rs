//! Real libvirt instances for compute tests: a small domain (the guest tier's Debian kernel and a busybox
//! initramfs, see tests/realkernel/instance-image.sh) booted under QEMU/TCG through the local libvirtd,
//! destroyed and undefined when dropped. `scripts/test.sh` runs libvirtd for the suite
//! (`scripts/libvirtd.sh start`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// The libvirt the tests and their compute agents use.
pub const URI: &str = "qemu:///system";

/// Runs `virsh -c URI args…`; returns (success, stdout, stderr).
pub fn virsh(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("virsh").arg("-c").arg(URI).args(args).env("LC_ALL", "C").output().expect("virsh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// The instance kernel and initrd (built once per test process).
pub fn instance_image() -> &'static (PathBuf, PathBuf) {
    static IMAGE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let script = workspace().join("tests/realkernel/instance-image.sh");
        let status = Command::new("bash").arg(&script).status().expect("instance-image.sh");
        assert!(status.success(), "building the instance image failed");
        let dir = workspace().join("target/realkernel/instance");
        (dir.join("vmlinuz"), dir.join("initrd.img"))
    })
}

/// The ext4 root filesystem image bootable volumes are made from (see instance-image.sh).
pub fn root_image() -> PathBuf {
    instance_image().0.with_file_name("root.raw")
}

/// The root filesystem image converted to qcow2 at `dest` (what an image volume is made from): returns `dest`.
pub fn qcow2_root_image(dest: PathBuf) -> PathBuf {
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(root_image())
        .arg(&dest)
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dest
}

/// Compute-agent config making instances boot the test kernel with the volume as root.
pub fn boot_config() -> String {
    let (kernel, initrd) = instance_image();
    format!(
        "[boot]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 root=/dev/vda rw quiet panic=-1\"\n",
        kernel.display(),
        initrd.display()
    )
}

/// True when libvirt knows a domain with this UUID.
pub fn domain_exists(uuid: &str) -> bool {
    virsh(&["list", "--all", "--uuid"]).1.lines().any(|l| l.trim() == uuid)
}

/// A running test domain.
pub struct Domain {
    /// Its libvirt name (what attach calls use as the instance).
    pub name: String,
    /// Its libvirt UUID.
    pub uuid: String,
    /// Its serial console, written by QEMU.
    pub console: PathBuf,
    _dir: tempfile::TempDir,
}

impl Domain {
    /// Defines and starts a domain and waits until its init reports on the console.
    pub async fn boot(prefix: &str) -> Domain {
        let (ok, _, err) = virsh(&["version"]);
        assert!(ok, "libvirtd does not answer on {URI} (scripts/libvirtd.sh start runs one): {err}");
        let (kernel, initrd) = instance_image();
        let dir = tempfile::Builder::new().prefix("ember-domain-").tempdir().expect("tempdir");
        // QEMU runs as libvirt-qemu and must reach the console file.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let uuid = uuid::Uuid::new_v4().to_string();
        let name = format!("{prefix}-{}", &uuid[..8]);
        let console = dir.path().join("console.log");
        let xml = format!(
            "<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n  <memory unit='MiB'>256</memory>\n  \
             <vcpu>1</vcpu>\n  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n    <kernel>{}</kernel>\n    \
             <initrd>{}</initrd>\n    <cmdline>console=ttyS0 quiet panic=-1</cmdline>\n  </os>\n  \
             <features><acpi/><apic/></features>\n  <clock offset='utc'/>\n  <on_poweroff>destroy</on_poweroff>\n  \
             <on_reboot>destroy</on_reboot>\n  <on_crash>destroy</on_crash>\n  <devices>\n    \
             <emulator>/usr/bin/qemu-system-x86_64</emulator>\n    \
             <serial type='file'><source path='{c}' append='off'/><target port='0'/></serial>\n    \
             <console type='file'><source path='{c}' append='off'/><target type='serial' port='0'/></console>\n    \
             <video><model type='none'/></video>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n",
            kernel.display(),
            initrd.display(),
            c = console.display()
        );
        let xml_path = dir.path().join("domain.xml");
        std::fs::write(&xml_path, xml).unwrap();
        let (ok, _, err) = virsh(&["define", &xml_path.to_string_lossy()]);
        assert!(ok, "virsh define: {err}");
        let domain = Domain { name, uuid, console, _dir: dir };
        let (ok, _, err) = virsh(&["start", &domain.uuid]);
        assert!(ok, "virsh start: {err}");
        domain.wait_console("EMBER-INSTANCE-BOOTED", Duration::from_secs(120)).await;
        domain
    }

    /// The serial console so far.
    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the console shows `marker`.
    pub async fn wait_console(&self, marker: &str, timeout: Duration) {
        crate::wait_for(&format!("{marker:?} on {}'s console", self.name), timeout, || async {
            self.console_text().contains(marker).then_some(())
        })
        .await
    }

    /// The live (or, with `inactive`, persistent) domain XML.
    pub fn xml(&self, inactive: bool) -> String {
        let args: &[&str] = if inactive { &["dumpxml", "--inactive", &self.uuid] } else { &["dumpxml", &self.uuid] };
        virsh(args).1
    }

    /// Pauses the domain's vCPUs (QEMU keeps running; the guest answers nothing).
    pub fn suspend(&self) {
        assert!(virsh(&["suspend", &self.uuid]).0, "virsh suspend");
    }

    /// Resumes a paused domain.
    pub fn resume(&self) {
        assert!(virsh(&["resume", &self.uuid]).0, "virsh resume");
    }

    /// Stops the domain (it stays defined).
    pub fn stop(&self) {
        virsh(&["destroy", &self.uuid]);
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        virsh(&["destroy", &self.uuid]);
        virsh(&["undefine", &self.uuid]);
    }
}

/// UUIDs of the libvirt secrets defined now.
pub fn secrets() -> Vec<String> {
    virsh(&["secret-list"]).1.lines().skip(2).filter_map(|l| l.split_whitespace().next().map(String::from)).collect()
}

/// How long the compute agent may take to confirm a detach in the tests (guests here release a disk in well
/// under a second; the paused-guest test waits this out).
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

/// A fleet with a coordinator, a storage agent (`storage1`, file backend `file1`) and a compute agent
/// (`compute1`, with `compute_toml` appended to its config), both registered.
pub struct ComputeFleet {
    /// The storage agent (dropped, so killed, before the fleet's directory goes).
    pub storage: crate::Daemon,
    /// The compute agent.
    pub compute: crate::Daemon,
    /// The file backend's directory.
    pub dir: PathBuf,
    /// The fleet.
    pub fleet: crate::Fleet,
}

impl ComputeFleet {
    /// Starts it and waits until both agents are up.
    pub async fn start(compute_toml: &str) -> ComputeFleet {
        let mut fleet = crate::Fleet::new();
        fleet.start_coordinator();
        let (backend, dir) = fleet.file_backend("file1", "");
        let storage = fleet.start_agent("storage", "storage1", &backend);
        let compute = fleet.start_agent("compute", "compute1", compute_toml);
        crate::volumes::wait_backend(&fleet, "storage1@file1").await;
        crate::volumes::wait_backend(&fleet, "compute1").await;
        ComputeFleet { storage, compute, dir, fleet }
    }
}

/// A read-write attach of `volume_id` to `instance` on the test fleets' compute host `compute1`.
pub fn attach_request(volume_id: &str, instance: &str) -> ember_proto::v1::AttachRequest {
    ember_proto::v1::AttachRequest {
        volume_id: volume_id.into(),
        instance: instance.into(),
        host: "compute1".into(),
        read_only: false,
    }
}
