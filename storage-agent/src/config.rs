//! The storage agent's TOML config: the common agent keys plus `[[backends]]`.

use ember_common::agent::{AgentSettings, filesystem_space};
use ember_common::config::ConfigError;
use ember_common::identity::valid_name;
use ember_proto::agent::v1::{Backend, Pool};
use serde::Deserialize;
use std::path::PathBuf;

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StorageConfig {
    /// Keys every agent has.
    #[serde(flatten)]
    pub agent: AgentSettings,
    /// The node's backends.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
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
}

fn default_ratio() -> f64 {
    20.0
}

fn default_true() -> bool {
    true
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

impl StorageConfig {
    /// The backends, checked: valid unique names, a known driver, an existing directory.
    pub fn checked_backends(&self) -> Result<Vec<BackendConfig>, ConfigError> {
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
            if !b.directory.is_dir() {
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

impl BackendConfig {
    /// The backend's stats as reported to the coordinator.
    pub fn report(&self, agent_az: &str) -> Backend {
        let (total, free) = filesystem_space(&self.directory).unwrap_or((0, 0));
        Backend {
            name: self.name.clone(),
            driver: self.driver.clone(),
            availability_zone: self.availability_zone.clone().unwrap_or_else(|| agent_az.to_string()),
            storage_protocol: "iSCSI".into(),
            vendor_name: "ember".into(),
            driver_version: ember_common::VERSION.into(),
            pools: vec![Pool {
                name: self.name.clone(),
                total_capacity_gb: total as f64 / GIB,
                free_capacity_gb: free as f64 / GIB,
                provisioned_capacity_gb: 0.0,
                allocated_capacity_gb: 0.0,
                thin_provisioning_support: self.thin,
                thick_provisioning_support: !self.thin,
                reserved_percentage: self.reserved_percentage,
                max_over_subscription_ratio: self.max_over_subscription_ratio,
                multiattach: true,
                capabilities: [("volume_backend_name".to_string(), self.name.clone())].into(),
            }],
        }
    }
}
