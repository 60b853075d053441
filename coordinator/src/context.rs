//! What every operation needs: the database, the agents, quotas, and the coordinator's scheduling settings.

use crate::agents::Agents;
use crate::quota::QuotaEngine;
use sqlx::SqlitePool;

/// Shared by the API handlers and the operation workers.
pub struct Ctx {
    /// The state.
    pub db: SqlitePool,
    /// Clients to agents.
    pub agents: Agents,
    /// Quota accounting.
    pub quota: QuotaEngine,
    /// Serialises scheduling decisions so concurrent creates see each other's reservations.
    pub schedule_lock: tokio::sync::Mutex<()>,
    /// Create attempts before a volume goes to `error` (Cinder's `scheduler_max_attempts`).
    pub max_attempts: u32,
    /// Capacity weigher multiplier (1 spreads, -1 stacks).
    pub capacity_weight_multiplier: f64,
    /// A service silent for longer is down and not scheduled.
    pub service_down_ms: i64,
    /// The operations with a worker running in this process.
    pub workers: crate::operations::Workers,
    /// Ids of resources whose state an operation just committed; watchers wake on them.
    pub changes: tokio::sync::broadcast::Sender<String>,
    /// Seals the keys of encrypted volumes.
    pub master_key: crate::encryption::MasterKey,
    /// The coordinator's own certificate as it presents it now (it follows renewals), for the metrics.
    pub own_certificate: tokio::sync::watch::Receiver<std::sync::Arc<ember_common::own_certificate::OwnCertificate>>,
}

impl Ctx {
    /// Tells watchers that `id` changed (call after the commit).
    pub fn changed(&self, id: &str) {
        let _ = self.changes.send(id.to_string());
    }
}
