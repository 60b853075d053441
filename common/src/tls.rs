//! mTLS configuration for servers and clients from a CA, a certificate and a key on disk.

use serde::Deserialize;
use std::path::PathBuf;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity, ServerTlsConfig};

/// Where a daemon's or client's TLS material lives.
#[derive(Debug, Clone, Deserialize)]
pub struct TlsFiles {
    /// The fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// This party's certificate (PEM).
    pub cert: PathBuf,
    /// This party's private key (PEM).
    pub key: PathBuf,
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
    /// tonic refused the configuration or the endpoint.
    #[error("{0}")]
    Transport(#[from] tonic::transport::Error),
}

fn read(path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.clone(), source })
}

impl TlsFiles {
    /// A server config that demands a client certificate signed by the fleet CA.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        Ok(ServerTlsConfig::new()
            .identity(TlsIdentity::from_pem(read(&self.cert)?, read(&self.key)?))
            .client_ca_root(Certificate::from_pem(read(&self.ca)?)))
    }

    /// A client config presenting our certificate and trusting only the fleet CA.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(TlsIdentity::from_pem(read(&self.cert)?, read(&self.key)?)))
    }

    /// A lazily connecting channel to `url` (e.g. `https://127.0.0.1:7000`). Reuse it: a new TLS connection
    /// costs about a millisecond.
    pub fn channel(&self, url: &str) -> Result<Channel, TlsError> {
        let endpoint = Endpoint::from_shared(url.to_string())?
            .tls_config(self.client_config()?)?
            .connect_timeout(std::time::Duration::from_secs(5))
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .tcp_nodelay(true);
        Ok(endpoint.connect_lazy())
    }
}
