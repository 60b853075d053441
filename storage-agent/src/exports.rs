//! The exports this agent must keep: written to a small state file before tgtd is touched, so that after a
//! restart of the agent or of tgtd every export can be re-created exactly (same IQN, same CHAP secret).

use crate::error::{AgentError, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;

/// One exported volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    /// Backend holding the volume.
    pub backend: String,
    /// Target IQN.
    pub iqn: String,
    /// CHAP user.
    pub username: String,
    /// CHAP secret.
    pub password: String,
    /// Initiators given access; the target goes when the last one does.
    pub initiators: BTreeSet<String>,
}

/// The state file `<state_dir>/exports.json`.
#[derive(Debug)]
pub struct ExportStore {
    path: PathBuf,
    /// volume id → export.
    pub exports: BTreeMap<String, ExportRecord>,
}

impl ExportStore {
    /// Loads the store (empty when the file does not exist yet).
    pub fn load(state_dir: &std::path::Path) -> Result<ExportStore> {
        std::fs::create_dir_all(state_dir).map_err(AgentError::io(format!("creating {}", state_dir.display())))?;
        let path = state_dir.join("exports.json");
        let exports = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AgentError::Io {
                context: format!("reading {}", path.display()),
                source: std::io::Error::other(e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(AgentError::io(format!("reading {}", path.display()))(e)),
        };
        Ok(ExportStore { path, exports })
    }

    /// Writes the store atomically (temporary file, fsync, rename).
    pub fn save(&self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let ctx = || format!("writing {}", self.path.display());
        let mut f = std::fs::File::create(&tmp).map_err(AgentError::io(ctx()))?;
        f.write_all(&serde_json::to_vec_pretty(&self.exports).unwrap_or_default()).map_err(AgentError::io(ctx()))?;
        f.sync_all().map_err(AgentError::io(ctx()))?;
        std::fs::rename(&tmp, &self.path).map_err(AgentError::io(ctx()))
    }
}
