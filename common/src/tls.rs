//! mTLS configuration for servers and clients from a CA, a certificate and a key on disk.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

/// Where a daemon's or client's TLS material lives.
#[derive(Debug, Clone, Deserialize)]
pub struct TlsFiles {
    /// The fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// This party's certificate (PEM).
    pub cert: PathBuf,
    /// This party's private key (PEM).
    pub key: PathBuf,
    /// The fleet CA's certificate revocation list (PEM, from `ember certs revoke`), for a daemon: calls
    /// from the certificates it lists are refused, and so are servers presenting one when the daemon calls
    /// them. It need not exist until something is revoked.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// Why TLS set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// This daemon's certificate cannot be read.
    #[error("the certificate {path}: {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA certificate is not one rustls can trust.
    #[error("the CA certificate {path}: {reason}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// tonic refused the configuration or the endpoint.
    #[error("{0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The TLS flags every daemon accepts; each overrides the config file's `[tls]` entry of the same name.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Fleet CA certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// This daemon's certificate.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// This daemon's key.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The fleet CA's certificate revocation list (`ember certs revoke`); it may not exist yet.
    #[arg(long)]
    pub crl: Option<PathBuf>,
}

impl TlsArgs {
    /// The flags over the config file's `[tls]` section: `None` when neither gives all of ca, cert and key.
    pub fn over(&self, file: Option<TlsFiles>) -> Option<TlsFiles> {
        let (ca, cert, key, crl) = match file {
            Some(t) => (Some(t.ca), Some(t.cert), Some(t.key), t.crl),
            None => (None, None, None, None),
        };
        Some(TlsFiles {
            ca: self.ca.clone().or(ca)?,
            cert: self.cert.clone().or(cert)?,
            key: self.key.clone().or(key)?,
            crl: self.crl.clone().or(crl),
        })
    }
}

pub(crate) fn read(path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.clone(), source })
}

impl TlsFiles {
    /// A server config that demands a client certificate signed by the fleet CA, and presents this daemon's
    /// certificate as it is when each connection is made ([`crate::own_certificate`]). Starts following the
    /// certificate's files.
    pub fn server_config(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
        let ca_invalid = |reason: String| TlsError::Ca { path: self.ca.clone(), reason };
        let roots = crate::revocation::fleet_roots(&read(&self.ca)?).map_err(ca_invalid)?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .map_err(|e| ca_invalid(e.to_string()))?;
        let presenter = crate::own_certificate::Presenter(crate::own_certificate::watch(self)?);
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ca_invalid(e.to_string()))?
            .with_client_cert_verifier(clients)
            .with_cert_resolver(std::sync::Arc::new(presenter));
        // gRPC is HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(std::sync::Arc::new(config))
    }

    /// A client config presenting our certificate: the one in force when this process follows it
    /// ([`crate::own_certificate::watched`]), else the files as they are. The server is checked by
    /// [`TlsFiles::server_verifier`].
    fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        let identity = match crate::own_certificate::watched(self) {
            Some(own) => TlsIdentity::from_pem(&own.cert_pem, &own.key_pem),
            None => TlsIdentity::from_pem(read(&self.cert)?, read(&self.key)?),
        };
        Ok(ClientTlsConfig::new().identity(identity))
    }

    /// What a connection made now is made under: see [`ConnectionTerms`].
    pub fn connection_terms(&self) -> ConnectionTerms {
        ConnectionTerms { revoked: crate::revocation::current(), own: crate::own_certificate::watched(self) }
    }

    /// The check of a server's certificate: signed by the fleet CA, naming the host called, and not revoked
    /// by the list this process has in force (none for the CLI).
    fn server_verifier(&self) -> Result<std::sync::Arc<crate::revocation::ServerVerifier>, TlsError> {
        let verifier = crate::revocation::ServerVerifier::new(&read(&self.ca)?)
            .map_err(|reason| TlsError::Ca { path: self.ca.clone(), reason })?;
        Ok(std::sync::Arc::new(verifier))
    }

    /// A lazily connecting channel to `url` (e.g. `https://127.0.0.1:7000`) that gives up on a silent peer
    /// after [`PEER_TIMEOUT`]. Reuse it: a new TLS connection costs about a millisecond.
    pub fn channel(&self, url: &str) -> Result<Channel, TlsError> {
        self.channel_with(url, PEER_TIMEOUT)
    }

    /// [`TlsFiles::channel`] giving up on a silent peer after `peer_timeout`: a connection whose peer answers
    /// neither the TLS handshake nor an HTTP/2 ping within it is closed, and every call on it fails with
    /// `UNAVAILABLE`. Without this, a peer that stopped without closing its sockets (a frozen process, a
    /// host gone from the network) would hold each call to it, and the operation behind the call, forever.
    /// Long calls are not limited: a peer that answers pings may take hours over a copy.
    pub fn channel_with(&self, url: &str, peer_timeout: Duration) -> Result<Channel, TlsError> {
        Ok(self.channel_noting_server(url, peer_timeout)?.0)
    }

    /// [`TlsFiles::channel_with`], and where the serial number of the server certificate it accepts is noted,
    /// for a client that keeps sending to that server to check it against lists that come into force later
    /// ([`crate::revocation::revokes`]).
    pub fn channel_noting_server(
        &self,
        url: &str,
        peer_timeout: Duration,
    ) -> Result<(Channel, crate::revocation::AcceptedServer), TlsError> {
        let (ping_every, ping_patience) = ping_schedule(peer_timeout);
        let verifier = self.server_verifier()?;
        let accepted = verifier.accepted();
        let endpoint = Endpoint::from_shared(url.to_string())?
            .tls_config_with_verifier(self.client_config()?.timeout(peer_timeout), verifier)?
            .connect_timeout(peer_timeout.min(Duration::from_secs(5)))
            .http2_keep_alive_interval(ping_every)
            .keep_alive_timeout(ping_patience)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .tcp_nodelay(true);
        Ok((endpoint.connect_lazy(), accepted))
    }
}

/// What a kept connection was made under: the revocation list in force and the certificate this process
/// presented. A client that keeps connections makes new ones when either changes: the peer's certificate is
/// checked against the list when a connection is made, and a renewed certificate of ours is presented only on
/// new connections (after which the old one can be revoked).
#[derive(Debug, Clone)]
pub struct ConnectionTerms {
    revoked: std::sync::Arc<crate::revocation::RevokedSerials>,
    own: Option<std::sync::Arc<crate::own_certificate::OwnCertificate>>,
}

impl ConnectionTerms {
    /// Whether a connection made under these terms should be replaced by one made under `tls`'s terms now.
    pub fn outdated(&self, tls: &TlsFiles) -> bool {
        let now = tls.connection_terms();
        let same_own = match (&self.own, &now.own) {
            (Some(was), Some(is)) => std::sync::Arc::ptr_eq(was, is),
            (None, None) => true,
            _ => false,
        };
        !std::sync::Arc::ptr_eq(&self.revoked, &now.revoked) || !same_own
    }
}

/// How long a peer may stay silent before its connection is given up, unless configured otherwise
/// (`peer_timeout_seconds`).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(20);

/// When to ping a peer and how long to wait for its answer, so that a silent peer is noticed within
/// `peer_timeout`: half of it between pings, half waiting (at least 100 ms each).
pub fn ping_schedule(peer_timeout: Duration) -> (Duration, Duration) {
    let half = (peer_timeout / 2).max(Duration::from_millis(100));
    (half, half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_peer_is_noticed_within_the_timeout() {
        let (every, patience) = ping_schedule(Duration::from_secs(20));
        assert_eq!((every, patience), (Duration::from_secs(10), Duration::from_secs(10)));
        let (every, patience) = ping_schedule(Duration::ZERO);
        assert_eq!((every, patience), (Duration::from_millis(100), Duration::from_millis(100)));
    }
}
