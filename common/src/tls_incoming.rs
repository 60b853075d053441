//! The connections a daemon serves: accepted on its listener, each TLS handshake run on its own task (a slow
//! or silent client holds up no one else) and given up after a timeout. Done here rather than by tonic so
//! that the certificate presented can change while the daemon runs ([`crate::own_certificate`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Connections whose handshake completed, waiting for the server to take them.
const READY_QUEUE: usize = 64;

/// Accepts on `listener` until the returned stream is dropped, yielding each connection whose TLS handshake
/// under `config` completes within `handshake_timeout`. The stream never yields an error: a failed
/// handshake (a client without a fleet certificate, say) concerns that client only, and is logged.
pub fn accept(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (ready, taken) = tokio::sync::mpsc::channel(READY_QUEUE);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = ready.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(connection) => connection,
                Err(e) => {
                    // Out of file descriptors, most likely: the daemon serves on once some are freed.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
            }
            tokio::spawn(handshake(acceptor.clone(), tcp, peer, handshake_timeout, ready.clone()));
        }
    });
    ReceiverStream::new(taken)
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
    ready: tokio::sync::mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
) {
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(connection)) => {
            // Fails only when the server has stopped, and the connection then closes.
            let _ = ready.send(Ok(connection)).await;
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, ?timeout, "TLS handshake timed out"),
    }
}
