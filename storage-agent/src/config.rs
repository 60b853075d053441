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
    /// The node's backends.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
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
    /// `file` (sparse files in a directory).
    pub driver: String,
    /// Where the volume files live.
    pub directory: PathBuf,
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
            if b.driver != "file" {
                return Err(ConfigError::Missing(format!(
                    "backend {}: unknown driver {:?} (known: file)",
                    b.name, b.driver
                )));
            }
            if b.nfs_share.is_none() && !b.directory.is_dir() {
                return Err(ConfigError::Missing(format!(
                    "backend {}: {} is not a directory",
                    b.name,
                    b.directory.display()
                )));
            }
            if b.max_over_subscription_ratio < 1.0 {
                return Err(ConfigError::Missing(format!(
                    "backend {}: max_over_subscription_ratio must be >= 1",
                    b.name
                )));
            }
        }
        Ok(self.backends.clone())
    }
}
