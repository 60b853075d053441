//! What the three agents share: their common settings and command-line flags, and the loop that registers
//! with the coordinator and then heartbeats.

use crate::config::{ConfigError, required};
use crate::tls::{ConnectionTerms, TlsError, TlsFiles};
use ember_proto::agent::v1::{HeartbeatRequest, RegisterRequest, registration_client::RegistrationClient};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

/// Settings every agent has (the `[agent]`-level keys of its TOML file).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AgentSettings {
    /// Node name; must match the name in the agent's certificate.
    pub name: Option<String>,
    /// Address to listen on, e.g. `127.0.0.1:7001` (port 0 picks one).
    pub listen: Option<String>,
    /// URL the coordinator should call back; default `https://<bound address>`.
    pub advertise: Option<String>,
    /// The coordinator's URL, e.g. `https://127.0.0.1:7000`.
    pub coordinator: Option<String>,
    /// Availability zone; default `nova` as in Cinder.
    pub availability_zone: Option<String>,
    /// Seconds a peer (the coordinator, another agent) may stay silent before its connection is given up
    /// and the calls on it fail; default 20.
    pub peer_timeout_seconds: Option<u64>,
    /// TLS material.
    pub tls: Option<TlsFiles>,
}

/// Flags every agent accepts; each overrides the config file.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// TOML config file.
    #[arg(long, short = 'c', env = "EMBER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Node name (must match the certificate).
    #[arg(long)]
    pub name: Option<String>,
    /// Listen address.
    #[arg(long)]
    pub listen: Option<String>,
    /// Callback URL announced to the coordinator.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Coordinator URL.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Availability zone.
    #[arg(long)]
    pub availability_zone: Option<String>,
    /// Seconds a silent peer is given before its connection is dropped.
    #[arg(long, env = "EMBER_PEER_TIMEOUT")]
    pub peer_timeout: Option<u64>,
    /// TLS material.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Log one JSON object per line instead of text.
    #[arg(long)]
    pub log_json: bool,
}

/// Resolved agent settings.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    /// Node name.
    pub name: String,
    /// Listen address.
    pub listen: String,
    /// Callback URL, when configured (otherwise derived from the bound address).
    pub advertise: Option<String>,
    /// Coordinator URL.
    pub coordinator: String,
    /// Availability zone.
    pub availability_zone: String,
    /// How long a silent peer is given (see [`TlsFiles::channel_with`]).
    pub peer_timeout: Duration,
    /// TLS material.
    pub tls: TlsFiles,
}

impl AgentArgs {
    /// Applies the flags over the file's settings.
    pub fn resolve(&self, file: AgentSettings) -> Result<AgentIdentity, ConfigError> {
        let tls = self
            .tls
            .over(file.tls)
            .ok_or_else(|| ConfigError::Missing("tls (--ca, --cert and --key) is required".into()))?;
        Ok(AgentIdentity {
            name: required(self.name.clone().or(file.name), "name")?,
            listen: self.listen.clone().or(file.listen).unwrap_or_else(|| "127.0.0.1:0".into()),
            advertise: self.advertise.clone().or(file.advertise),
            coordinator: required(self.coordinator.clone().or(file.coordinator), "coordinator")?,
            availability_zone: self
                .availability_zone
                .clone()
                .or(file.availability_zone)
                .unwrap_or_else(|| "nova".into()),
            peer_timeout: self
                .peer_timeout
                .or(file.peer_timeout_seconds)
                .map_or(crate::tls::PEER_TIMEOUT, Duration::from_secs),
            tls,
        })
    }
}

/// How long a heartbeat waits for a fresh report before it sends the last one.
const REPORT_PATIENCE: Duration = Duration::from_secs(1);

/// Builds registration reports off the async threads. A report reads the filesystems behind backends and
/// repositories (statvfs, directory listings), and on an NFS mount whose server has gone each read blocks for
/// the soft mount's whole timeout, a minute or more. A heartbeat must not wait that long, or the agent looks
/// dead while it still serves (and a runtime thread is lost meanwhile). So a heartbeat waits at most
/// `patience` for a fresh report and otherwise sends the last one; and only one report is built at a time, so
/// a stuck filesystem holds one blocking thread, not one per heartbeat.
struct Reports<F> {
    build: std::sync::Arc<F>,
    patience: Duration,
    pending: Option<tokio::task::JoinHandle<RegisterRequest>>,
    last: Option<RegisterRequest>,
}

impl<F: Fn() -> RegisterRequest + Send + Sync + 'static> Reports<F> {
    fn new(build: F, patience: Duration) -> Self {
        Reports { build: std::sync::Arc::new(build), patience, pending: None, last: None }
    }

    /// A fresh report, or the last one when the fresh one is not ready within the patience. The first report
    /// is always waited for: there is nothing to send instead.
    async fn next(&mut self) -> RegisterRequest {
        let build = self.build.clone();
        let pending = self.pending.get_or_insert_with(|| tokio::task::spawn_blocking(move || build()));
        let fresh = match self.last {
            None => Some(pending.await),
            Some(_) => tokio::time::timeout(self.patience, pending).await.ok(),
        };
        match fresh {
            Some(built) => {
                self.pending = None;
                match built {
                    Ok(report) => self.last = Some(report),
                    Err(e) => tracing::error!("building the capacity report failed: {e}"),
                }
            }
            None => tracing::warn!(
                "the capacity report is taking longer than {:?} (a filesystem not answering?); sending the last one",
                self.patience
            ),
        }
        self.last.clone().unwrap_or_default()
    }
}

/// Registers with the coordinator (retrying until it answers), then heartbeats at the interval it asks for,
/// registering again whenever it says it does not know us. `report` builds a fresh registration (with current
/// capacity) each time, on a blocking thread (see [`Reports`]). Runs until the task is dropped.
pub async fn registration_loop(
    coordinator_url: &str,
    tls: &TlsFiles,
    peer_timeout: Duration,
    report: impl Fn() -> RegisterRequest + Send + Sync + 'static,
) -> Result<(), TlsError> {
    let connect = || tls.channel_with(coordinator_url, peer_timeout).map(RegistrationClient::new);
    let (mut client, mut terms) = (connect()?, tls.connection_terms());
    let mut backoff = Duration::from_millis(200);
    let mut reports = Reports::new(report, REPORT_PATIENCE);
    loop {
        reconnect_when_terms_change(&mut client, &mut terms, tls, &connect)?;
        let mut request = reports.next().await;
        request.crl_number = crate::revocation::current().number;
        let interval = match client.register(request.clone()).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                adopt_revocations(tls, &resp.crl);
                let secs = resp.heartbeat_interval_seconds.max(1);
                tracing::info!(name = %request.name, instance_id = %request.instance_id, "registered with the coordinator");
                backoff = Duration::from_millis(200);
                Duration::from_secs(secs as u64)
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "registration failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            reconnect_when_terms_change(&mut client, &mut terms, tls, &connect)?;
            let r = reports.next().await;
            let hb = HeartbeatRequest {
                name: r.name,
                role: r.role,
                instance_id: r.instance_id,
                backends: r.backends,
                repositories: r.repositories,
                crl_number: crate::revocation::current().number,
            };
            match client.heartbeat(hb).await {
                Ok(resp) => adopt_revocations(tls, &resp.into_inner().crl),
                Err(s) if s.code() == Code::NotFound => {
                    tracing::warn!("coordinator does not know this instance; registering again");
                    break;
                }
                Err(s) => tracing::warn!(code = ?s.code(), message = s.message(), "heartbeat failed"),
            }
        }
    }
}

/// Puts in force the revocation list the coordinator handed on at registration or with a heartbeat (`crl`, empty
/// when it has nothing newer), once the fleet CA's signature on it checks out.
fn adopt_revocations(tls: &TlsFiles, crl: &[u8]) {
    if crl.is_empty() {
        return;
    }
    match crate::revocation::adopt(tls, crl) {
        Ok(Some(number)) => tracing::info!(number, "new certificate revocation list in force, from the coordinator"),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "certificate revocation list from the coordinator refused"),
    }
}

/// Replaces `client` when a revocation list came into force, or this agent's certificate was renewed, since
/// it was made (under `made_under`): the coordinator's certificate is checked when a connection is made, so an
/// agent stops reporting to a coordinator revoked since it connected; and a new connection presents the
/// renewed certificate, so the old one can be revoked.
fn reconnect_when_terms_change(
    client: &mut RegistrationClient<Channel>,
    made_under: &mut ConnectionTerms,
    tls: &TlsFiles,
    connect: &impl Fn() -> Result<RegistrationClient<Channel>, TlsError>,
) -> Result<(), TlsError> {
    if made_under.outdated(tls) {
        *made_under = tls.connection_terms();
        *client = connect()?;
    }
    Ok(())
}

/// A new random instance id, made at each agent start.
pub fn new_instance_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The `https://` URL for a bound address.
pub fn url_for(addr: std::net::SocketAddr) -> String {
    format!("https://{addr}")
}

/// Serves an agent: binds, registers with the coordinator and heartbeats in the background, and serves
/// `services` (plus reflection and health) until SIGTERM/SIGINT. `report(endpoint, instance_id)` builds the
/// registration with fresh capacity each time it is called.
pub async fn serve_agent<F>(
    id: AgentIdentity,
    services: tonic::service::RoutesBuilder,
    health_names: &[&str],
    report: F,
) -> Result<(), Box<dyn std::error::Error>>
where
    F: Fn(&str, &str) -> RegisterRequest + Send + Sync + 'static,
{
    let shutdown = crate::server::shutdown_signal();
    // Before the first call to the coordinator: a revoked certificate is refused from the start, and the
    // certificate presented follows renewals.
    crate::revocation::watch(&id.tls)?;
    crate::own_certificate::watch(&id.tls)?;
    let (listener, addr) = crate::server::bind(&id.listen).await?;
    let endpoint = id.advertise.clone().unwrap_or_else(|| url_for(addr));
    let instance_id = new_instance_id();
    tracing::info!(name = %id.name, %addr, %endpoint, %instance_id, "agent serving");
    let (coordinator, tls, peer_timeout) = (id.coordinator.clone(), id.tls.clone(), id.peer_timeout);
    let registration = tokio::spawn(async move {
        let report = move || report(&endpoint, &instance_id);
        if let Err(e) = registration_loop(&coordinator, &tls, peer_timeout, report).await {
            tracing::error!("registration stopped: {e}");
        }
    });
    let served = crate::server::serve(listener, &id.tls, services, health_names, shutdown, id.peer_timeout).await;
    registration.abort();
    served?;
    tracing::info!("agent stopped");
    Ok(())
}

/// Sets up process-wide state every agent needs, parses nothing: installs the crypto provider and logging.
pub fn start_process(log_json: bool) {
    crate::install_crypto_provider();
    crate::logging::init(log_json);
}

/// Total and free (available to unprivileged writers) bytes of the filesystem holding `path`.
pub fn filesystem_space(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    let frag = st.fragment_size() as u64;
    Ok((st.blocks() as u64 * frag, st.blocks_available() as u64 * frag))
}

/// Whether the call behind `status` lost its connection mid-call (its peer killed while it worked, or the link
/// broken): tonic makes such a status on the caller's side, as UNKNOWN ("transport error", "h2 protocol error"),
/// with the transport's error as its source. An UNKNOWN the peer answered (one it passed on from its own peer,
/// say) has no source.
pub fn cut_short(status: &tonic::Status) -> bool {
    status.code() == Code::Unknown && std::error::Error::source(status).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn a_report_stuck_on_its_filesystem_does_not_hold_up_the_heartbeat() {
        // The second build blocks until released, as a statvfs on a dead NFS server does.
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let stuck = Mutex::new(stuck);
        let builds = Arc::new(AtomicU32::new(0));
        let counted = builds.clone();
        let build = move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            if n == 1 {
                stuck.lock().unwrap().recv().unwrap();
            }
            RegisterRequest { name: format!("report {n}"), ..Default::default() }
        };
        let mut reports = Reports::new(build, Duration::from_millis(50));
        assert_eq!(reports.next().await.name, "report 0");
        for _ in 0..3 {
            assert_eq!(reports.next().await.name, "report 0", "the last report goes out meanwhile");
        }
        assert_eq!(builds.load(Ordering::SeqCst), 2, "one build at a time: the stuck one is not repeated");

        release.send(()).unwrap();
        let mut name = String::new();
        for _ in 0..200 {
            name = reports.next().await.name;
            if name != "report 0" {
                break;
            }
        }
        assert_eq!(name, "report 1", "once the stuck build returns, its report is sent");
        assert_eq!(reports.next().await.name, "report 2", "and fresh ones follow");
    }
}
