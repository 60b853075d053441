//! Serving a daemon's gRPC API: bind, mTLS, server reflection (v1 and v1alpha), `grpc.health.v1`, the access
//! log, and a graceful stop on SIGTERM or SIGINT.

use crate::tls::{TlsError, TlsFiles};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::Server;

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// TLS material was missing or wrong.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The server stopped with an error.
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The certificate revocation list cannot be trusted.
    #[error("{0}")]
    Crl(#[from] crate::revocation::CrlError),
    /// Reflection could not load the descriptors.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Binds the listen address. Port 0 picks a free port; the bound address is then printed on stdout as
/// `EMBER_LISTENING <addr>` so tests and scripts learn it without guessing.
pub async fn bind(listen: &str) -> Result<(TcpListener, SocketAddr), ServeError> {
    let bind_err = |source| ServeError::Bind { addr: listen.to_string(), source };
    let listener = TcpListener::bind(listen).await.map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    println!("EMBER_LISTENING {addr}");
    Ok((listener, addr))
}

/// A future that resolves when the process receives SIGTERM or SIGINT. The handlers are installed when this is
/// called (not when the future is first polled), so call it before announcing the listen address: a signal that
/// arrives during start-up then stops the daemon gracefully instead of killing it.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, stopping"),
            _ = int.recv() => tracing::info!("SIGINT received, stopping"),
        }
    }
}

/// Adds reflection and health to `services` and serves them on `listener` with mTLS until `shutdown`
/// resolves; in-flight calls finish first. `health_names` are the fully qualified service names reported
/// SERVING. A client that stays silent for `peer_timeout` (it answers neither the TLS handshake nor an HTTP/2
/// ping) has its connection closed, which cancels its calls: a stream from a frozen peer does not hold a
/// volume, or a request thread, forever. Calls from a certificate that `tls.crl` revokes are refused, and the
/// list is followed as it changes ([`crate::revocation::watch`]): calls still running when their caller is
/// revoked end then ([`crate::revoked_calls`]).
pub async fn serve(
    listener: TcpListener,
    tls: &TlsFiles,
    mut services: RoutesBuilder,
    health_names: &[&str],
    shutdown: impl std::future::Future<Output = ()>,
    peer_timeout: Duration,
) -> Result<(), ServeError> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ember_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ember_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in health_names {
        health.set_service_status(*name, tonic_health::ServingStatus::Serving).await;
    }
    services.add_service(reflection_v1).add_service(reflection_v1alpha).add_service(health_service);
    let routes: Routes = services.routes();
    // Before the first call can arrive: a revoked certificate is refused from the start.
    crate::revocation::watch(tls)?;
    let tls_config = tls.server_config()?;
    let (ping_every, ping_patience) = crate::tls::ping_schedule(peer_timeout);
    Server::builder()
        .http2_keepalive_interval(Some(ping_every))
        .http2_keepalive_timeout(Some(ping_patience))
        // Large HTTP/2 windows: volume data streams at hundreds of MB/s, which 64 KiB windows throttle.
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .layer(crate::access_log::AccessLogLayer)
        // Inside the access log, which so records a call cut short by a revocation as UNAUTHENTICATED.
        .layer(crate::revoked_calls::EndOnRevocationLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(crate::tls_incoming::accept(listener, tls_config, peer_timeout), shutdown)
        .await?;
    Ok(())
}
