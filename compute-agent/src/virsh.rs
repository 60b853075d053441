//! One libvirt, driven through `virsh` (every call through the project's command runner, with a deadline).
//! Domains are addressed by UUID only: a user-supplied name is matched against `virsh list`, never passed on.

use crate::error::{ComputeError, Result};
use ember_common::runner::{self, CommandError};
use std::path::Path;
use std::time::Duration;

/// A handle on one libvirt connection URI.
#[derive(Debug, Clone)]
pub struct Virsh {
    /// e.g. `qemu:///system`.
    pub uri: String,
    /// Deadline of one virsh call.
    pub timeout: Duration,
}

/// A domain's run state, as `virsh domstate` words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainState {
    /// `running`.
    Running,
    /// Anything else (`shut off`, `paused`, …).
    Other(String),
}

impl DomainState {
    /// True while QEMU runs the domain (running, paused, …), false when it is off or crashed.
    pub fn is_active(&self) -> bool {
        match self {
            DomainState::Running => true,
            DomainState::Other(s) => s != "shut off" && s != "crashed",
        }
    }
}

/// virsh detach-disk's flag for a disk in the running domain (`live`) and/or its persistent definition (`config`).
fn detach_scope(live: bool, config: bool) -> &'static str {
    match (live, config) {
        (true, true) => "--persistent",
        (true, false) => "--live",
        _ => "--config",
    }
}

/// Parses `virsh list --all --uuid --name`: one `UUID NAME` pair per line.
pub fn parse_domain_list(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

/// The `Capacity:` line of `virsh domblkinfo`, in bytes.
pub fn parse_capacity(text: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix("Capacity:")).and_then(|v| v.trim().parse().ok())
}

/// Progress of a disk's block job, from `virsh blockjob --info --raw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockJob {
    /// Bytes done.
    pub cur: u64,
    /// Bytes to do (grows while the guest writes during a copy).
    pub end: u64,
}

/// Parses `virsh blockjob DOMAIN DISK --info --raw`: ` key=value` lines, or an empty line when the disk has no job.
pub fn parse_block_job(text: &str) -> Option<BlockJob> {
    let value = |key: &str| {
        text.lines().find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('=')?.trim().parse::<u64>().ok())
    };
    Some(BlockJob { cur: value("cur")?, end: value("end")? })
}

impl Virsh {
    async fn run(&self, args: &[&str]) -> Result<String> {
        let mut argv = vec!["-c", &self.uri];
        argv.extend_from_slice(args);
        Ok(runner::run("virsh", &argv, self.timeout).await?.stdout)
    }

    /// True when libvirt answers.
    pub async fn alive(&self) -> bool {
        self.run(&["version"]).await.is_ok()
    }

    /// The UUID of the domain whose name or UUID is `instance`.
    pub async fn resolve(&self, instance: &str) -> Result<String> {
        let list = parse_domain_list(&self.run(&["list", "--all", "--uuid", "--name"]).await?);
        list.into_iter()
            .find(|(uuid, name)| uuid == instance || name == instance)
            .map(|(uuid, _)| uuid)
            .ok_or_else(|| ComputeError::NotFound(format!("instance {instance:?} (no such libvirt domain)")))
    }

    /// The domain's run state.
    pub async fn state(&self, uuid: &str) -> Result<DomainState> {
        let out = self.run(&["domstate", uuid]).await?;
        Ok(match out.trim() {
            "running" => DomainState::Running,
            other => DomainState::Other(other.to_string()),
        })
    }

    /// The domain's XML: live (`inactive` false) or persistent.
    pub async fn dumpxml(&self, uuid: &str, inactive: bool) -> Result<String> {
        if inactive { self.run(&["dumpxml", "--inactive", uuid]).await } else { self.run(&["dumpxml", uuid]).await }
    }

    /// The disks of the domain's live (`inactive` false) or persistent XML.
    pub async fn disks(&self, uuid: &str, inactive: bool) -> Result<Vec<crate::domain_xml::DomainDisk>> {
        crate::domain_xml::disks(&self.dumpxml(uuid, inactive).await?).map_err(|e| ComputeError::Io {
            context: format!("reading domain {uuid}"),
            source: std::io::Error::other(e),
        })
    }

    /// Hot-plugs the device in `xml_file` into the running domain and its persistent definition.
    pub async fn attach_device(&self, uuid: &str, xml_file: &Path) -> Result<()> {
        self.run(&["attach-device", uuid, &xml_file.to_string_lossy(), "--persistent"]).await.map(drop)
    }

    /// Asks the guest to release disk `target` (`live`) and drops it from the persistent definition (`config`).
    /// libvirt may report success while the guest still holds the disk: callers confirm with the live XML. A
    /// repeated request names only where the disk still is: libvirt refuses one naming a definition that no
    /// longer has it.
    pub async fn detach_disk(&self, uuid: &str, target: &str, live: bool, config: bool) -> Result<()> {
        self.run(&["detach-disk", uuid, target, detach_scope(live, config)]).await.map(drop)
    }

    /// Resizes disk `target` of a running domain to `bytes` (QEMU's block_resize; the guest is told). A size QEMU
    /// cannot reach (a device that has not grown) is an error.
    pub async fn blockresize(&self, uuid: &str, target: &str, bytes: u64) -> Result<()> {
        self.run(&["blockresize", uuid, target, &format!("{bytes}B")]).await.map(drop)
    }

    /// The capacity in bytes of disk `target` as the running domain sees it.
    pub async fn block_capacity(&self, uuid: &str, target: &str) -> Result<u64> {
        let out = self.run(&["domblkinfo", uuid, target]).await?;
        parse_capacity(&out).ok_or_else(|| ComputeError::Io {
            context: format!("reading the capacity of {target} in domain {uuid}"),
            source: std::io::Error::other(format!("no Capacity line in {out:?}")),
        })
    }

    /// Starts copying disk `target` of a running domain onto the `<source>` of the disk element in `xml_file`,
    /// which must exist and be as large (QEMU's drive-mirror; libvirt records the new source in the persistent
    /// definition at the pivot), at most `bandwidth_mib` MiB/s (0: no limit). The job lives as long as the
    /// domain, not across libvirtd restarts.
    pub async fn blockcopy(&self, uuid: &str, target: &str, xml_file: &Path, bandwidth_mib: u64) -> Result<()> {
        let (xml, bandwidth) = (xml_file.to_string_lossy(), bandwidth_mib.to_string());
        let mut args = vec!["blockcopy", uuid, target, "--xml", &xml, "--reuse-external", "--transient-job"];
        if bandwidth_mib > 0 {
            args.extend(["--bandwidth", &bandwidth]);
        }
        self.run(&args).await.map(drop)
    }

    /// The block job running on disk `target`, if any.
    pub async fn block_job(&self, uuid: &str, target: &str) -> Result<Option<BlockJob>> {
        Ok(parse_block_job(&self.run(&["blockjob", uuid, target, "--info", "--raw"]).await?))
    }

    /// Switches disk `target` to its copy's destination, once the copy job is ready (mirroring).
    pub async fn pivot(&self, uuid: &str, target: &str) -> Result<()> {
        self.run(&["blockjob", uuid, target, "--pivot"]).await.map(drop)
    }

    /// Cancels the block job on disk `target`; the disk stays on its source.
    pub async fn abort_block_job(&self, uuid: &str, target: &str) -> Result<()> {
        self.run(&["blockjob", uuid, target, "--abort"]).await.map(drop)
    }

    /// Defines a domain from an XML file.
    pub async fn define(&self, xml_file: &Path) -> Result<()> {
        self.run(&["define", &xml_file.to_string_lossy()]).await.map(drop)
    }

    /// Starts a defined domain.
    pub async fn start(&self, uuid: &str) -> Result<()> {
        self.run(&["start", uuid]).await.map(drop)
    }

    /// Stops a domain at once (like pulling the power).
    pub async fn destroy(&self, uuid: &str) -> Result<()> {
        self.run(&["destroy", uuid]).await.map(drop)
    }

    /// Removes a stopped domain's definition.
    pub async fn undefine(&self, uuid: &str) -> Result<()> {
        self.run(&["undefine", uuid]).await.map(drop)
    }

    /// Defines (or redefines) a secret from an XML file.
    pub async fn define_secret(&self, xml_file: &Path) -> Result<()> {
        self.run(&["secret-define", &xml_file.to_string_lossy()]).await.map(drop)
    }

    /// Sets a secret's value from a file holding the raw bytes (never on the command line).
    pub async fn set_secret_value(&self, uuid: &str, value_file: &Path) -> Result<()> {
        self.run(&["secret-set-value", uuid, "--file", &value_file.to_string_lossy(), "--plain"]).await.map(drop)
    }

    /// Removes a secret; one that is gone is fine.
    pub async fn undefine_secret(&self, uuid: &str) -> Result<()> {
        match self.run(&["secret-undefine", uuid]).await {
            Err(ComputeError::Command(CommandError::Failed { stderr, .. }))
                if stderr.contains("Secret not found") || stderr.contains("no secret with matching") =>
            {
                Ok(())
            }
            other => other.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    /// A repeated unplug (the definition already without the disk) names only the running domain, which libvirt
    /// accepts; naming the definition too would be refused.
    #[test]
    fn a_detach_names_only_where_the_disk_still_is() {
        assert_eq!(super::detach_scope(true, true), "--persistent");
        assert_eq!(super::detach_scope(true, false), "--live");
        assert_eq!(super::detach_scope(false, true), "--config");
    }

    #[test]
    fn parses_the_domain_list() {
        let text = "7c0d1e9a-0000-4000-8000-000000000001 vm-one\n7c0d1e9a-0000-4000-8000-000000000002 vm-two\n\n";
        let list = super::parse_domain_list(text);
        assert_eq!(list.len(), 2);
        assert_eq!(list[1], ("7c0d1e9a-0000-4000-8000-000000000002".into(), "vm-two".into()));
    }

    #[test]
    fn parses_block_job_progress() {
        let text = include_str!("../testdata/virsh-blockjob-info-raw.txt");
        assert_eq!(super::parse_block_job(text), Some(super::BlockJob { cur: 22020096, end: 67108864 }));
        assert_eq!(super::parse_block_job("\n"), None, "a disk without a job");
    }

    #[test]
    fn parses_the_block_capacity() {
        let text = include_str!("../testdata/virsh-domblkinfo.txt");
        assert_eq!(super::parse_capacity(text), Some(2147483648));
        assert_eq!(super::parse_capacity("error: no such disk\n"), None);
    }
}
