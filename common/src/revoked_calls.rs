//! Calls in progress end when their caller's certificate is revoked.
//!
//! Every call is checked against the revocation list when it starts ([`crate::identity::Identity::of_peer`]),
//! but a stream can run for hours: a volume read by a backup agent, a restore written into one, a person's
//! `WatchVolume`. Without this, a certificate revoked because its key leaked would go on reading a tenant's
//! volume to the end. [`EndOnRevocationLayer`] follows the list in force ([`crate::revocation::subscribe`])
//! for the length of each call from a certificate holder, and when a new list names the caller:
//!
//! - the response stream ends at once with `UNAUTHENTICATED` (its trailers say so; the access log records
//!   it), which also drops the handler's sender, so a producer stops at its next send;
//! - the request stream fails with the same status at the handler's next read, so a half-written restore is
//!   never taken for a whole one.
//!
//! Nothing is checked per message: the layer only wakes when a new list comes into force.

use crate::revocation::RevokedSerials;
use http::HeaderMap;
use http_body::{Body, Frame};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::codegen::Bytes;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower_layer::Layer;
use tower_service::Service;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Resolves when a list naming the certificate comes into force; never otherwise.
type Revoked = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A future that resolves once a list revoking `serial` is put in force after `lists` was subscribed.
fn revoked(serial: Vec<u8>, mut lists: tokio::sync::watch::Receiver<Arc<RevokedSerials>>) -> Revoked {
    Box::pin(async move {
        // The sender is a static that lives as long as the process: `changed` does not fail.
        while lists.changed().await.is_ok() {
            if lists.borrow_and_update().contains_serial(&serial) {
                return;
            }
        }
        std::future::pending().await
    })
}

/// The serial number and the name of the certificate the caller of `req` presented, if any.
fn caller_certificate<B>(req: &http::Request<B>) -> Option<(Vec<u8>, String)> {
    let certs = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?.peer_certs()?;
    let (_, cert) = X509Certificate::from_der(certs.first()?.as_ref()).ok()?;
    let who = crate::identity::Identity::from_cert(&cert).map(|i| format!("{} {}", i.role, i.name)).ok()?;
    Some((cert.tbs_certificate.serial.to_bytes_be(), who))
}

/// Ends calls whose caller's certificate is revoked while they run (`Server::builder().layer(...)`).
#[derive(Debug, Clone, Copy, Default)]
pub struct EndOnRevocationLayer;

impl<S> Layer<S> for EndOnRevocationLayer {
    type Service = EndOnRevocation<S>;

    fn layer(&self, inner: S) -> EndOnRevocation<S> {
        EndOnRevocation { inner }
    }
}

/// The service [`EndOnRevocationLayer`] wraps around a server's routes.
#[derive(Debug, Clone)]
pub struct EndOnRevocation<S> {
    inner: S,
}

impl<S, ResBody> Service<http::Request<tonic::body::Body>> for EndOnRevocation<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = http::Response<ResponseUntilRevoked<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        // Subscribed before the handler's own check of the list, so no list can slip in between.
        let cuts = caller_certificate(&req).map(|(serial, who)| {
            let lists = crate::revocation::subscribe();
            let method = req.uri().path().to_string();
            let cut = |revoked| Cut { revoked, who: who.clone(), method: method.clone() };
            (cut(revoked(serial.clone(), lists.clone())), cut(revoked(serial, lists)))
        });
        let (req, response_cut) = match cuts {
            Some((for_request, for_response)) => {
                let req = req
                    .map(|inner| tonic::body::Body::new(RequestUntilRevoked { inner, cut: for_request, ended: false }));
                (req, Some(for_response))
            }
            None => (req, None),
        };
        let answer = self.inner.call(req);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|inner| ResponseUntilRevoked { inner, cut: response_cut, ended: false }))
        })
    }
}

/// What a watched body waits for: the caller's revocation.
struct Cut {
    revoked: Revoked,
    /// The caller (role and name) and the method it called, for the log and the status.
    who: String,
    method: String,
}

impl Cut {
    /// The status that ends the call, once the caller's certificate is revoked.
    fn poll(&mut self, cx: &mut Context<'_>) -> Option<tonic::Status> {
        if self.revoked.as_mut().poll(cx).is_pending() {
            return None;
        }
        tracing::warn!(caller = %self.who, method = %self.method, "the caller's certificate was revoked: ending its call");
        Some(tonic::Status::unauthenticated(format!("the certificate of {} was revoked during the call", self.who)))
    }
}

/// A request body that fails with `UNAUTHENTICATED` once its caller's certificate is revoked: the handler
/// reading the stream gets that status.
struct RequestUntilRevoked<B> {
    inner: B,
    cut: Cut,
    ended: bool,
}

impl<B: Body<Data = Bytes> + Unpin> Body for RequestUntilRevoked<B>
where
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(status) = self.cut.poll(cx) {
            self.ended = true;
            return Poll::Ready(Some(Err(Box::new(status))));
        }
        Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that ends with `UNAUTHENTICATED` trailers once its caller's certificate is revoked (or
/// runs as it is, for a caller without a certificate).
pub struct ResponseUntilRevoked<B> {
    inner: B,
    cut: Option<Cut>,
    ended: bool,
}

impl<B: Body + Unpin> Body for ResponseUntilRevoked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(status) = self.cut.as_mut().and_then(|cut| cut.poll(cx)) {
            self.ended = true;
            let mut trailers = HeaderMap::new();
            // A status made here always encodes.
            let _ = status.add_header(&mut trailers);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> std::fmt::Debug for ResponseUntilRevoked<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseUntilRevoked")
            .field("watched", &self.cut.is_some())
            .field("ended", &self.ended)
            .finish()
    }
}
