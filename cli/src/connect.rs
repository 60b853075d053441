//! Finding the coordinator and our certificate, and turning gRPC statuses into one-line errors.

use ember_common::access_log::{REQUEST_ID_HEADER, code_name};
use ember_common::tls::TlsFiles;
use serde::Deserialize;
use std::path::PathBuf;
use tonic::transport::Channel;

/// How to reach the coordinator; flags beat environment variables beat the config file.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Coordinator URL, e.g. https://127.0.0.1:7000.
    #[arg(long, global = true, env = "EMBER_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Fleet CA certificate.
    #[arg(long, global = true, env = "EMBER_CA")]
    pub ca: Option<PathBuf>,
    /// Your certificate.
    #[arg(long, global = true, env = "EMBER_CERT")]
    pub cert: Option<PathBuf>,
    /// Your key.
    #[arg(long, global = true, env = "EMBER_KEY")]
    pub key: Option<PathBuf>,
    /// CLI config file (TOML with coordinator, ca, cert, key).
    #[arg(long, global = true, env = "EMBER_CLI_CONFIG")]
    pub cli_config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    coordinator: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// A CLI failure, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The coordinator answered with an error status; the request id it gave the call ends the line, for
    /// the operator to find the call in its log.
    #[error("{}: {}{}", code_name(.0.code()), .0.message(), request_id(.0))]
    Status(#[from] tonic::Status),
    /// Anything else, already worded for the user.
    #[error("{0}")]
    Other(String),
}

/// ` (request req-…)` when the coordinator named the call, else nothing.
fn request_id(status: &tonic::Status) -> String {
    match status.metadata().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()) {
        Some(id) => format!(" (request {id})"),
        None => String::new(),
    }
}

impl From<String> for CliError {
    fn from(s: String) -> Self {
        CliError::Other(s)
    }
}

impl ConnectArgs {
    /// A channel to the coordinator with our certificate.
    pub fn channel(&self) -> Result<Channel, CliError> {
        let path = self
            .cli_config
            .clone()
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/ember/cli.toml")));
        let file: FileConfig = match path {
            Some(p) if p.exists() => ember_common::config::load(Some(&p)).map_err(|e| e.to_string())?,
            _ => FileConfig::default(),
        };
        let missing = |what: &str, flag: &str, env: &str| {
            CliError::Other(format!("no {what}: pass --{flag}, set {env}, or put `{flag}` in the CLI config file"))
        };
        let coordinator = self
            .coordinator
            .clone()
            .or(file.coordinator)
            .ok_or_else(|| missing("coordinator", "coordinator", "EMBER_COORDINATOR"))?;
        let tls = TlsFiles {
            ca: self.ca.clone().or(file.ca).ok_or_else(|| missing("CA certificate", "ca", "EMBER_CA"))?,
            cert: self.cert.clone().or(file.cert).ok_or_else(|| missing("certificate", "cert", "EMBER_CERT"))?,
            key: self.key.clone().or(file.key).ok_or_else(|| missing("key", "key", "EMBER_KEY"))?,
            // Revocation is the servers' check; a client trusts only the fleet CA.
            crl: None,
        };
        tls.channel(&coordinator).map_err(|e| CliError::Other(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in deploy/ names all four settings, with no key the CLI would not read.
    #[test]
    fn the_deployment_example_is_a_valid_config() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/cli.toml");
        let cfg: FileConfig = ember_common::config::load(Some(std::path::Path::new(example))).unwrap();
        assert_eq!(cfg.coordinator.as_deref(), Some("https://coordinator.example.net:7000"));
        assert!(cfg.ca.is_some() && cfg.cert.is_some() && cfg.key.is_some());
    }
}
