//! Channels from the coordinator to its agents, one per endpoint and reused (a new TLS connection costs about
//! a millisecond), and lookups of where a backend or host lives. Calls carry the request id they are made for.

use crate::error::{Error, Result};
use ember_common::access_log::{Traced, traced};
use ember_common::tls::{ConnectionTerms, TlsFiles};
use ember_proto::agent::v1::backup_agent_client::BackupAgentClient;
use ember_proto::agent::v1::compute_agent_client::ComputeAgentClient;
use ember_proto::agent::v1::storage_agent_client::StorageAgentClient;
use sqlx::SqlitePool;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::Channel;

/// The coordinator's clients to agents.
pub struct Agents {
    tls: TlsFiles,
    /// How long a silent agent is given before the calls to it fail.
    peer_timeout: Duration,
    /// Each endpoint's channel, with the terms it was made under.
    channels: Mutex<HashMap<String, (Channel, ConnectionTerms)>>,
    db: SqlitePool,
}

impl Agents {
    /// Clients authenticated with the coordinator's certificate.
    pub fn new(tls: TlsFiles, db: SqlitePool, peer_timeout: Duration) -> Self {
        Agents { tls, peer_timeout, channels: Mutex::new(HashMap::new()), db }
    }

    /// The channel to `endpoint`. One made before the revocation list in force, or before the coordinator's
    /// certificate was renewed, is replaced: an agent's certificate is checked against the list when a
    /// connection is made, so calls made after a revocation (carrying CHAP secrets or LUKS passphrases, say) go
    /// through a new connection, which a revoked agent cannot complete; and a new connection presents the
    /// renewed certificate, so the old one can be revoked. Calls still running on the old one finish there.
    fn channel(&self, endpoint: &str) -> Result<Channel> {
        let mut channels = self.channels.lock().expect("channel cache");
        if let Some((c, made_under)) = channels.get(endpoint)
            && !made_under.outdated(&self.tls)
        {
            return Ok(c.clone());
        }
        let terms = self.tls.connection_terms();
        let c = self
            .tls
            .channel_with(endpoint, self.peer_timeout)
            .map_err(|e| Error::FailedPrecondition(format!("agent endpoint {endpoint}: {e}")))?;
        channels.insert(endpoint.to_string(), (c.clone(), terms));
        Ok(c)
    }

    /// The endpoint of the `role` agent on `host`.
    pub async fn endpoint(&self, host: &str, role: &str) -> Result<String> {
        let endpoint: Option<String> =
            sqlx::query_scalar("SELECT endpoint FROM services WHERE host = ? AND role = ? LIMIT 1")
                .bind(host)
                .bind(role)
                .fetch_optional(&self.db)
                .await?;
        endpoint.ok_or_else(|| Error::FailedPrecondition(format!("{role} host {host} is not registered")))
    }

    /// The compute agent of `host`.
    pub async fn compute(&self, host: &str) -> Result<ComputeAgentClient<Traced>> {
        let endpoint = self.endpoint(host, "compute").await?;
        Ok(ComputeAgentClient::new(traced(self.channel(&endpoint)?)))
    }

    /// The backup agent serving `host`.
    pub async fn backup(&self, host: &str) -> Result<BackupAgentClient<Traced>> {
        let endpoint = self.endpoint(host, "backup").await?;
        Ok(BackupAgentClient::new(traced(self.channel(&endpoint)?)))
    }

    /// The storage agent serving `host`.
    pub async fn storage(&self, host: &str) -> Result<StorageAgentClient<Traced>> {
        let endpoint: Option<String> =
            sqlx::query_scalar("SELECT endpoint FROM services WHERE host = ? AND role = 'storage' LIMIT 1")
                .bind(host)
                .fetch_optional(&self.db)
                .await?;
        let endpoint =
            endpoint.ok_or_else(|| Error::FailedPrecondition(format!("storage host {host} is not registered")))?;
        Ok(StorageAgentClient::new(traced(self.channel(&endpoint)?)).max_decoding_message_size(64 << 20))
    }
}

/// A storage or backup agent's error that means "try again later" (it could not be reached, or the call was cut
/// short) rather than "this failed"; the operation that made the call pauses and retries it.
pub fn transient(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown)
}

/// [`transient`] for the compute agent, whose own refusals are final and whose guest-release deadline is
/// DEADLINE_EXCEEDED, which must surface rather than loop: only a lost connection is worth a retry.
pub fn compute_transient(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(status.code(), Code::Unavailable | Code::Cancelled | Code::Unknown)
}

/// Whether an agent's error says the call did not get an answer (the agent could not be reached, stopped
/// answering, or the connection was cut), as opposed to an answer that refused or failed.
pub fn unreachable(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled) || ask_again(status)
}

/// Whether work whose call to its agent ended in `status` can be asked of that agent again, from the start, once
/// it is up: the call got no answer (UNAVAILABLE: the connection refused, as while the agent restarts), was cut
/// short (the agent died while it worked), or the agent asked for that itself (UNAVAILABLE: it still ends an
/// earlier run of the same work, or the peer it worked with went away mid-way). Backups and restores use it; the
/// agents make a repeated one whole.
pub fn ask_again(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable || ember_common::agent::cut_short(status)
}
