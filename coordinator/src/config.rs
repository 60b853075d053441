//! The coordinator's settings: a TOML file, overridden by flags.

use ember_common::tls::TlsFiles;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The coordinator's TOML config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address to listen on; port 0 picks one.
    pub listen: String,
    /// SQLite database file, created if missing.
    pub database: PathBuf,
    /// TLS material.
    pub tls: Option<TlsFiles>,
    /// Seconds between agent heartbeats (told to agents at registration).
    pub heartbeat_interval_seconds: u32,
    /// A service whose last heartbeat is older than this is `down` (Cinder's `service_down_time`).
    pub service_down_seconds: u32,
    /// Create attempts before a volume goes to `error` (Cinder's `scheduler_max_attempts`).
    pub max_attempts: u32,
    /// Capacity weigher multiplier: 1 spreads volumes over pools, -1 stacks them.
    pub capacity_weight_multiplier: f64,
    /// Seconds between reconciler passes (resuming operations, sweeping orphans).
    pub reconcile_interval_seconds: u32,
    /// Seconds an agent may stay silent (answering neither a TLS handshake nor an HTTP/2 ping) before its
    /// connection is given up and the calls on it fail, so a frozen agent or a vanished host cannot hold an
    /// operation forever. Calls that run long on an agent that answers are not limited.
    pub peer_timeout_seconds: u32,
    /// Default quota limits per project; -1 is unlimited. Missing resources use the built-in defaults.
    pub default_quotas: BTreeMap<String, i64>,
    /// The master key sealing encrypted volumes' keys (32 bytes, created 0600 if missing). Default: `master.key`
    /// beside the database. Without it, encrypted volumes cannot be opened: back it up with the database.
    pub key_file: Option<PathBuf>,
    /// Days a finished operation is kept, as the history the orphan sweeper reads, before it is purged; 0 keeps
    /// them all. A file whose every operation was purged is no longer removed as an orphan, only reported.
    pub operations_retention_days: u32,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: "127.0.0.1:7000".into(),
            database: PathBuf::from("ember.db"),
            tls: None,
            heartbeat_interval_seconds: 10,
            service_down_seconds: 60,
            max_attempts: 3,
            capacity_weight_multiplier: 1.0,
            reconcile_interval_seconds: 10,
            peer_timeout_seconds: 20,
            default_quotas: BTreeMap::new(),
            key_file: None,
            operations_retention_days: 90,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example a deployment starts from (docs/deploy.md) is read as it means: unknown keys are refused, and
    /// every quota it sets is one the coordinator has.
    #[test]
    fn the_deployment_example_is_a_valid_config() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/coordinator.toml");
        let cfg: CoordinatorConfig = ember_common::config::load(Some(std::path::Path::new(example))).unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:7000");
        assert_eq!(cfg.database, PathBuf::from("/var/lib/ember/ember.db"));
        assert_eq!(cfg.key_file, Some(PathBuf::from("/var/lib/ember/master.key")));
        assert!(cfg.tls.as_ref().is_some_and(|t| t.crl.is_some()));
        assert_eq!((cfg.operations_retention_days, cfg.peer_timeout_seconds), (90, 20));
        let known: Vec<&str> = crate::quotas::BASE_RESOURCES.iter().map(|(name, _)| *name).collect();
        assert!(!cfg.default_quotas.is_empty());
        for name in cfg.default_quotas.keys() {
            assert!(known.contains(&name.as_str()), "unknown quota {name}");
        }
    }
}
