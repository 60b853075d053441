//! Instances booted from volumes: the compute agent defines and starts a libvirt domain (UUID = instance id)
//! whose first disk (`vda`, serial = volume id) is the boot volume, with the serial console in a file the
//! coordinator can read back. Direct kernel boot when the host is configured with a kernel (and initrd and
//! command line) for instances, BIOS boot from the volume otherwise.

use crate::domain_xml::{DiskSpec, disk_xml, escape};
use crate::error::{ComputeError, Result, checked_id, checked_iotune};
use crate::service::Compute;
use crate::virsh::DomainState;
use ember_proto::agent::v1::{StartInstanceRequest, StartInstanceResponse};
use std::path::PathBuf;

/// How instances boot on this host.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// A kernel for direct boot; absent boots the volume through the BIOS.
    pub kernel: Option<PathBuf>,
    /// Its initrd.
    pub initrd: Option<PathBuf>,
    /// Its command line (default `console=ttyS0 root=/dev/vda rw`).
    pub cmdline: Option<String>,
}

/// The domain XML of an instance.
pub fn domain_xml(
    id: &str,
    name: &str,
    vcpus: u32,
    memory_mb: u32,
    boot: &BootConfig,
    console: &str,
    disk: &str,
) -> String {
    let os = match &boot.kernel {
        Some(kernel) => {
            let initrd = boot
                .initrd
                .as_ref()
                .map(|i| format!("\n    <initrd>{}</initrd>", escape(&i.to_string_lossy())))
                .unwrap_or_default();
            let cmdline = boot.cmdline.clone().unwrap_or_else(|| "console=ttyS0 root=/dev/vda rw".into());
            format!(
                "<kernel>{}</kernel>{initrd}\n    <cmdline>{}</cmdline>",
                escape(&kernel.to_string_lossy()),
                escape(&cmdline)
            )
        }
        None => "<boot dev='hd'/>".to_string(),
    };
    format!(
        "<domain type='qemu'>\n  <name>{}</name>\n  <uuid>{}</uuid>\n  <memory unit='MiB'>{memory_mb}</memory>\n  \
         <vcpu>{vcpus}</vcpu>\n  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n    {os}\n  </os>\n  \
         <features><acpi/><apic/></features>\n  <clock offset='utc'/>\n  <on_poweroff>destroy</on_poweroff>\n  \
         <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n  <devices>\n    {disk}    \
         <serial type='file'><source path='{c}'/><target port='0'/></serial>\n    \
         <console type='file'><source path='{c}'/><target type='serial' port='0'/></console>\n    \
         <video><model type='none'/></video>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n",
        escape(name),
        escape(id),
        c = escape(console)
    )
}

impl Compute {
    fn instance_dir(&self, id: &str) -> PathBuf {
        self.connectors.state_dir.join("instances").join(id)
    }

    /// Defines and starts the instance's domain. Idempotent: a defined domain is started if it is not running.
    pub async fn start_instance(&self, r: StartInstanceRequest) -> Result<StartInstanceResponse> {
        checked_id("instance_id", &r.instance_id)?;
        let _guard = self.lock.lock().await;
        let exists = self.virsh.resolve(&r.instance_id).await.is_ok();
        if !exists {
            let conn = r.connection.unwrap_or_default();
            let source = self.connectors.connect(&r.boot_volume_id, &conn).await?;
            let disk = disk_xml(&DiskSpec {
                source,
                target: "vda".into(),
                serial: r.boot_volume_id.clone(),
                read_only: false,
                iotune: checked_iotune(r.iotune.clone())?,
                luks_secret: conn.luks_secret_uuid.clone(),
            });
            let dir = self.instance_dir(&r.instance_id);
            std::fs::create_dir_all(&dir).map_err(ComputeError::io(format!("creating {}", dir.display())))?;
            // QEMU runs as its own user and writes the console here.
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .map_err(ComputeError::io("opening the instance directory to QEMU"))?;
            let console = dir.join("console.log").to_string_lossy().into_owned();
            let name = format!("ember-{}", r.instance_id);
            let xml =
                domain_xml(&r.instance_id, &name, r.vcpus.max(1), r.memory_mb.max(128), &self.boot, &console, &disk);
            let file = dir.join("domain.xml");
            std::fs::write(&file, xml).map_err(ComputeError::io("writing the domain XML"))?;
            self.virsh.define(&file).await?;
        }
        if self.virsh.state(&r.instance_id).await? != DomainState::Running {
            self.virsh.start(&r.instance_id).await?;
        }
        tracing::info!(instance_id = %r.instance_id, "instance running");
        Ok(StartInstanceResponse {})
    }

    /// Stops and undefines the instance's domain; one that is gone is fine. Volumes are disconnected by the
    /// detaches the coordinator sends next.
    pub async fn destroy_instance(&self, id: &str) -> Result<()> {
        checked_id("instance_id", id)?;
        let _guard = self.lock.lock().await;
        if self.virsh.resolve(id).await.is_ok() {
            if self.virsh.state(id).await? == DomainState::Running {
                self.virsh.destroy(id).await?;
            }
            self.virsh.undefine(id).await?;
        }
        let _ = std::fs::remove_dir_all(self.instance_dir(id));
        tracing::info!(instance_id = %id, "instance destroyed");
        Ok(())
    }

    /// The last 64 KiB of the instance's serial console.
    pub fn console_log(&self, id: &str) -> Result<String> {
        checked_id("instance_id", id)?;
        let path = self.instance_dir(id).join("console.log");
        let bytes = std::fs::read(&path).map_err(|_| ComputeError::NotFound(format!("console of instance {id}")))?;
        let tail = &bytes[bytes.len().saturating_sub(64 << 10)..];
        Ok(String::from_utf8_lossy(tail).into_owned())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn domain_xml_parses_and_boots_the_volume() {
        let disk = "<disk type='file' device='disk'><source file='/v'/><target dev='vda' bus='virtio'/></disk>\n";
        let direct = super::BootConfig { kernel: Some("/k".into()), initrd: Some("/i".into()), cmdline: None };
        let xml = super::domain_xml("0b0b0b0b-0000-4000-8000-000000000001", "ember-x", 1, 256, &direct, "/c.log", disk);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let text = |t: &str| doc.descendants().find(|n| n.has_tag_name(t)).and_then(|n| n.text()).unwrap_or_default();
        assert_eq!(text("kernel"), "/k");
        assert_eq!(text("cmdline"), "console=ttyS0 root=/dev/vda rw");
        assert_eq!(text("uuid"), "0b0b0b0b-0000-4000-8000-000000000001");
        let bios = super::domain_xml("id", "n", 1, 256, &super::BootConfig::default(), "/c.log", disk);
        assert!(roxmltree::Document::parse(&bios).unwrap().descendants().any(|n| n.has_tag_name("boot")));
    }
}
