//! The storage agent's TOML config: the common agent keys, `state_dir`, `[tgt]` and `[[backends]]`.

use ember_common::agent::AgentSettings;
use ember_common::config::ConfigError;
use ember_common::identity::valid_name;
use serde::Deserialize;
use std::path::PathBuf;

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StorageConfig {
    /// Keys every agent has.
    #[serde(flatten)]
    pub agent: AgentSettings,
    /// Where the agent keeps what it must remember across restarts (its exports).
    pub state_dir: Option<PathBuf>,
    /// The iSCSI target.
    #[serde(default)]
    pub tgt: TgtConfig,
    /// The kernel target (used by backends with `target = "lio"`).
    #[serde(default)]
    pub lio: LioConfig,
    /// The node's backends.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// The most MiB per second a migration's copy may write on this node (Cinder's `volume_copy_bps_limit`), so
    /// that moving volumes does not starve the guests using the others; 0 (the default) for no limit.
    #[serde(default)]
    pub copy_bandwidth_mib: u64,
    /// Directories whose files volumes may be filled from (`image` on create, by path). A path is followed
    /// through symlinks first and must end at a regular file inside one of them: without this, anyone who may
    /// create a volume could copy any file or device of this node (a key, another volume's LV) into it. Empty
    /// (the default): no local images.
    #[serde(default)]
    pub image_dirs: Vec<PathBuf>,
}

/// How to reach (or run) tgtd.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TgtConfig {
    /// Start and own a tgtd (restarting it if it dies) rather than use one already running.
    pub manage: bool,
    /// tgtd's management port (`tgtd -C` / `tgtadm -C`); lets several tgtds share a host.
    pub control_port: u16,
    /// The iSCSI portal `ip:port` initiators connect to.
    pub portal: String,
    /// Target names are `<iqn_prefix>:volume-<id>`.
    pub iqn_prefix: String,
}

impl Default for TgtConfig {
    fn default() -> Self {
        TgtConfig {
            manage: true,
            control_port: 0,
            portal: "127.0.0.1:3260".into(),
            iqn_prefix: "iqn.2010-10.org.ember".into(),
        }
    }
}

/// The kernel LIO target.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LioConfig {
    /// The iSCSI portal `ip:port` LIO targets listen on (must differ from tgt's when both run).
    pub portal: String,
}

impl Default for LioConfig {
    fn default() -> Self {
        LioConfig { portal: "127.0.0.1:3260".into() }
    }
}

/// How a deleted volume's data is destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Wipe {
    /// Overwrite the data extents with zeros before removing the file.
    #[default]
    Zero,
    /// Just remove the file.
    None,
}

/// One backend (Cinder's `[backend]` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `volume_backend_name`: how volume types route to it.
    pub name: String,
    /// `file` (sparse files in a directory) or `lvm` (LVs in a volume group).
    pub driver: String,
    /// `file`: where the volume files live.
    #[serde(default)]
    pub directory: PathBuf,
    /// `lvm`: the volume group (one per backend; the agent never creates or removes it).
    pub volume_group: Option<String>,
    /// `lvm`: thick LVs, thin LVs in the pool `<vg>-pool`, or auto (thin when the pool exists or the VG is
    /// empty, creating the pool; thick otherwise).
    #[serde(default)]
    pub lvm_type: LvmType,
    /// `lvm`: MiB zeroed when a thick LV is deleted (`wipe = "zero"`); 0 zeroes all of it.
    #[serde(default)]
    pub wipe_size_mb: u64,
    /// `lvm`: the deadline of one LVM command, in seconds.
    #[serde(default = "default_command_timeout")]
    pub command_timeout_secs: u64,
    /// The iSCSI target exporting this backend's volumes: `tgt` or `lio` (kernel target, through configfs).
    #[serde(default)]
    pub target: TargetKind,
    /// Availability zone, default the agent's.
    pub availability_zone: Option<String>,
    /// Percent of capacity kept free.
    #[serde(default)]
    pub reserved_percentage: u32,
    /// Thin over-subscription ratio.
    #[serde(default = "default_ratio")]
    pub max_over_subscription_ratio: f64,
    /// Sparse (thin) volumes; false preallocates (thick).
    #[serde(default = "default_true")]
    pub thin: bool,
    /// How deleted volumes are destroyed.
    #[serde(default)]
    pub wipe: Wipe,
    /// An NFS share (`server:/path`) the agent mounts on `directory` itself; absent for a local directory.
    pub nfs_share: Option<String>,
    /// Mount options for `nfs_share` (default: NFS 4.2, soft, bounded retries).
    pub nfs_mount_options: Option<String>,
}

/// Cinder's `lvm_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LvmType {
    /// Thin when possible (see [`BackendConfig::lvm_type`]).
    #[default]
    Auto,
    /// Fully allocated LVs.
    Thick,
    /// Thin LVs in a thin pool.
    Thin,
}

/// Which iSCSI target serves a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// The userspace tgtd.
    #[default]
    Tgt,
    /// The kernel's LIO target.
    Lio,
}

fn default_command_timeout() -> u64 {
    120
}

fn default_ratio() -> f64 {
    20.0
}

fn default_true() -> bool {
    true
}

impl StorageConfig {
    /// The backends, checked: valid unique names, a known driver, an existing directory.
    pub fn checked_backends(&self) -> Result<Vec<BackendConfig>, ConfigError> {
        if self.tgt.control_port > 32767 {
            return Err(ConfigError::Missing("tgt.control_port must be at most 32767 (tgtadm's limit)".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for b in &self.backends {
            if !valid_name(&b.name) || !seen.insert(b.name.clone()) {
                return Err(ConfigError::Missing(format!("backend name {:?} is invalid or repeated", b.name)));
            }
            if b.max_over_subscription_ratio < 1.0 {
                return Err(ConfigError::Missing(format!(
                    "backend {}: max_over_subscription_ratio must be >= 1",
                    b.name
                )));
            }
            if b.target == TargetKind::Lio && b.driver != "lvm" {
                return Err(ConfigError::Missing(format!(
                    "backend {}: target = \"lio\" exports block devices; it needs driver = \"lvm\"",
                    b.name
                )));
            }
            let vg_ok =
                |vg: &str| !vg.is_empty() && vg.chars().all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c));
            match (b.driver.as_str(), &b.volume_group) {
                ("file", _) => {}
                ("lvm", Some(vg)) if vg_ok(vg) && !vg.starts_with('-') => continue,
                ("lvm", _) => {
                    return Err(ConfigError::Missing(format!("backend {}: lvm needs a valid volume_group", b.name)));
                }
                (other, _) => {
                    return Err(ConfigError::Missing(format!(
                        "backend {}: unknown driver {other:?} (known: file, lvm)",
                        b.name
                    )));
                }
            }
            if b.nfs_share.is_none() && !b.directory.is_dir() {
                return Err(ConfigError::Missing(format!(
                    "backend {}: {} is not a directory",
                    b.name,
                    b.directory.display()
                )));
            }
        }
        Ok(self.backends.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example a deployment starts from (docs/deploy.md) says what it means to say.
    #[test]
    fn the_deployment_example_is_a_valid_config() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/storage-agent.toml");
        let cfg: StorageConfig = ember_common::config::load(Some(std::path::Path::new(example))).unwrap();
        assert_eq!(cfg.agent.name.as_deref(), Some("storage1"));
        assert!(cfg.agent.advertise.is_some() && cfg.agent.coordinator.is_some() && cfg.agent.tls.is_some());
        assert!(cfg.state_dir.is_some());
        assert!(!cfg.tgt.manage, "the system's tgtd keeps exports through agent restarts");
        assert_eq!(cfg.copy_bandwidth_mib, 200);
        let backends = cfg.checked_backends().unwrap();
        assert_eq!(backends.len(), 2);
        assert_eq!((backends[0].driver.as_str(), backends[0].lvm_type), ("lvm", LvmType::Thin));
        assert_eq!(backends[0].volume_group.as_deref(), Some("ember-vg"));
        assert_eq!((backends[0].reserved_percentage, backends[0].max_over_subscription_ratio), (5, 20.0));
        assert_eq!(backends[1].nfs_share.as_deref(), Some("nfs.example.net:/export/ember-volumes"));
    }
}
