//! Loading a daemon's TOML config file. Each daemon defines its own `serde` struct; command-line flags
//! override what the file says.

use serde::de::DeserializeOwned;
use std::path::Path;

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this daemon.
    #[error("config {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The cause.
        source: toml::de::Error,
    },
    /// A required setting is missing after flags are applied.
    #[error("config: {0}")]
    Missing(String),
}

/// Reads `path` as TOML into `T`; no path gives `T::default()`.
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else { return Ok(T::default()) };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse { path: shown, source })
}

/// Fails with the setting's name when it is unset.
pub fn required<T>(value: Option<T>, name: &str) -> Result<T, ConfigError> {
    value.ok_or_else(|| ConfigError::Missing(format!("{name} is required (config file or flag)")))
}
