//! The access log: one line for every gRPC call a daemon serves, saying who called what and how it ended, and a
//! request id that ties the line, every log line written while the call ran, and the caller's error together.
//!
//! Why: the coordinator serves many projects, and "who deleted this volume, and when" must have an answer that
//! does not depend on what each handler chose to log. The line is written by a layer in front of every service
//! (public API, agent APIs, registration, reflection, health), so no call escapes it, refused ones included.
//!
//! - The request id (`req-<uuid>`) is new for each call. It goes back to the caller as the `x-request-id`
//!   response header (gRPC metadata): `ember` prints it with every error, for the operator to search for.
//! - The caller is read from the verified client certificate (name, role, project). Authorization stays with the
//!   services' interceptors; this only reports.
//! - The outcome is the gRPC status the caller received: read from the response headers when the call failed
//!   before answering, else from the trailers that end the response stream. A call whose caller went away
//!   before it ended (before the answer, or in the middle of a stream) is logged as `CANCELLED`.
//! - Calls are also counted per method and code, with their time, for `ember metrics` ([`call_counts`]).
//! - Daemons pass the request id on: a call the coordinator makes to an agent while it serves a call, or while
//!   it runs the operation that call recorded (also after a restart: operations keep it), carries the id in an
//!   `x-request-id` request header, and the agent serves it under that id ([`Traced`], [`with_request_id`]).
//!   Only fleet daemons' ids are adopted; a person's or a program's header is ignored. So one id finds the
//!   whole story of a request in every daemon's log.
//! - Routine calls that succeed (heartbeats, the sweeper's listings, progress polls, health checks and
//!   reflection) are logged at `debug`, everything else at `info`.

use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

/// The response header that carries a call's request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

tokio::task_local! {
    /// The request id of the call being served, or of the operation a worker runs for it.
    static REQUEST_ID: String;
}

/// The request id of the call (or operation) the current task works for, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok().filter(|id| !id.is_empty())
}

/// Runs `work` on behalf of request `id`: calls it makes through [`Traced`] clients carry the id. Work spawned
/// onto another task does not inherit it, so a spawner passes it on with this.
pub async fn with_request_id<F: Future>(id: String, work: F) -> F::Output {
    REQUEST_ID.scope(id, work).await
}

/// A client interceptor that sends the current request id (if any) with every call.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassRequestId;

impl tonic::service::Interceptor for PassRequestId {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = current_request_id().and_then(|id| id.parse().ok()) {
            req.metadata_mut().insert(REQUEST_ID_HEADER, value);
        }
        Ok(req)
    }
}

/// A channel whose calls carry the request id they are made for.
pub type Traced = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, PassRequestId>;

/// Wraps `channel` so that its calls carry the current request id.
pub fn traced(channel: tonic::transport::Channel) -> Traced {
    tonic::service::interceptor::InterceptedService::new(channel, PassRequestId)
}

/// The request id a fleet daemon sent with its call, when it is well formed (`req-` and at most 64 letters,
/// digits and dashes): the id the call is then served under.
fn passed_request_id(headers: &HeaderMap) -> Option<String> {
    let id = headers.get(REQUEST_ID_HEADER)?.to_str().ok()?;
    let well_formed =
        id.starts_with("req-") && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    well_formed.then(|| id.to_string())
}

/// The canonical upper-case name of a gRPC status code (`NOT_FOUND`, `INVALID_ARGUMENT`, ...), as people
/// search for it.
pub fn code_name(code: tonic::Code) -> String {
    let words = format!("{code:?}");
    let mut out = String::new();
    for (i, ch) in words.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

/// Calls made every few seconds whatever people do: agents' heartbeats, the coordinator's look at what each
/// storage node holds (the orphan sweeper) and its polls of a running backup's progress.
const ROUTINE: &[&str] = &["/Heartbeat", "/ListResources", "/GetProgress"];

/// Adds the access log to a server (`Server::builder().layer(AccessLogLayer)`).
#[derive(Debug, Clone, Copy, Default)]
pub struct AccessLogLayer;

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog { inner }
    }
}

/// The service [`AccessLogLayer`] wraps around a server's routes.
#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AccessLog<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = http::Response<Watched<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let call = Call::begin(&req);
        let span =
            tracing::info_span!("call", request_id = %call.request_id, method = %call.method, caller = %call.caller);
        let request_id = HeaderValue::from_str(&call.request_id).ok();
        let scope = call.request_id.clone();
        // Logged however the call ends, also when the caller goes away before the answer (the handler is then
        // dropped where it stands, possibly after it changed something).
        let mut pending = Pending(Some(call));
        let answer = with_request_id(scope, self.inner.call(req).instrument(span));
        Box::pin(async move {
            let mut response = answer.await?;
            if let Some(id) = request_id {
                response.headers_mut().insert(REQUEST_ID_HEADER, id);
            }
            // A call that failed before answering carries its status in the headers ("trailers-only").
            if let Some(outcome) = Outcome::of(response.headers()) {
                pending.end(outcome);
            }
            Ok(response.map(|inner| Watched { inner, pending }))
        })
    }
}

/// A response body that logs its call when the trailers with the final status pass (or, through `Pending`,
/// when it is dropped first).
#[derive(Debug)]
pub struct Watched<B> {
    inner: B,
    pending: Pending,
}

impl<B: Body + Unpin> Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let outcome = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().and_then(Outcome::of),
            Poll::Ready(Some(Err(_))) => Some(Outcome::broken("the response stream failed")),
            Poll::Ready(None) => Some(Outcome::broken("the response ended without a status")),
            Poll::Pending => None,
        };
        if let Some(outcome) = outcome {
            self.pending.end(outcome);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A call not logged yet; dropped so, it is logged as `CANCELLED`.
#[derive(Debug)]
struct Pending(Option<Call>);

impl Pending {
    /// Logs the call with `outcome`, unless it was logged already.
    fn end(&mut self, outcome: Outcome) {
        if let Some(call) = self.0.take() {
            call.end(outcome);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.end(Outcome {
            code: tonic::Code::Cancelled,
            message: "the caller went away before the call ended".into(),
        });
    }
}

/// How a call ended.
#[derive(Debug)]
struct Outcome {
    code: tonic::Code,
    message: String,
}

impl Outcome {
    /// The gRPC status in `headers` (response headers or trailers), if they carry one.
    fn of(headers: &HeaderMap) -> Option<Outcome> {
        let code = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
        let message = headers
            .get("grpc-message")
            .map(|m| percent_encoding::percent_decode(m.as_bytes()).decode_utf8_lossy().into_owned())
            .unwrap_or_default();
        Some(Outcome { code: tonic::Code::from(code), message })
    }

    fn broken(why: &str) -> Outcome {
        Outcome { code: tonic::Code::Unknown, message: why.into() }
    }
}

/// One call being served.
#[derive(Debug)]
struct Call {
    request_id: String,
    method: String,
    caller: String,
    role: String,
    project: String,
    peer: String,
    started: Instant,
    /// Routine traffic (heartbeats, health, reflection), logged at debug.
    routine: bool,
}

impl Call {
    fn begin<B>(req: &http::Request<B>) -> Call {
        let method = req.uri().path().trim_start_matches('/').to_string();
        let tls = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
        let peer = tls.and_then(|t| t.get_ref().remote_addr()).as_ref().map(SocketAddr::to_string).unwrap_or_default();
        let identity = tls
            .and_then(|t| t.peer_certs())
            .and_then(|certs| certs.first().map(|leaf| crate::identity::Identity::from_der(leaf.as_ref())));
        use crate::identity::Role;
        let (caller, role, project, daemon) = match identity {
            Some(Ok(who)) => {
                let daemon = !matches!(who.role, Role::Admin | Role::Member);
                (who.name, who.role.to_string(), who.project.unwrap_or_default(), daemon)
            }
            Some(Err(_)) => ("?".into(), "unreadable certificate".into(), String::new(), false),
            None => ("?".into(), "no certificate".into(), String::new(), false),
        };
        // A fleet daemon working for a request names it; anyone else's header is not trusted.
        let passed = if daemon { passed_request_id(req.headers()) } else { None };
        let routine = ROUTINE.iter().any(|r| method.ends_with(r))
            || method.starts_with("grpc.health.")
            || method.starts_with("grpc.reflection.");
        Call {
            request_id: passed.unwrap_or_else(|| format!("req-{}", uuid::Uuid::new_v4())),
            method,
            caller,
            role,
            project,
            peer,
            started: Instant::now(),
            routine,
        }
    }

    fn end(self, outcome: Outcome) {
        let code = code_name(outcome.code);
        let ms = self.started.elapsed().as_millis() as u64;
        count(&self.method, &code, ms);
        let Call { request_id, method, caller, role, project, peer, routine, .. } = self;
        let error = outcome.message;
        match outcome.code {
            tonic::Code::Ok if routine => {
                tracing::debug!(%request_id, %method, %caller, %role, %project, %peer, %code, ms, "call")
            }
            tonic::Code::Ok => tracing::info!(%request_id, %method, %caller, %role, %project, %peer, %code, ms, "call"),
            _ => tracing::info!(%request_id, %method, %caller, %role, %project, %peer, %code, ms, %error, "call"),
        }
    }
}

/// Calls served per `(method, code)`: how many, and their milliseconds summed.
static CALLS: std::sync::Mutex<std::collections::BTreeMap<(String, String), (u64, u64)>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The most `(method, code)` pairs counted apart; calls to methods beyond them (made-up method names, which any
/// certificate holder can send) are counted as `other`, so the table stays small.
const COUNTED_PAIRS: usize = 2000;

fn count(method: &str, code: &str, ms: u64) {
    let mut calls = CALLS.lock().expect("call counter lock");
    let known = method.starts_with("ember.") || method.starts_with("grpc.");
    let mut key = (method.to_string(), code.to_string());
    if !known || (calls.len() >= COUNTED_PAIRS && !calls.contains_key(&key)) {
        key = ("other".to_string(), code.to_string());
    }
    let entry = calls.entry(key).or_default();
    entry.0 += 1;
    entry.1 += ms;
}

/// The calls this process has served since it started, per method and code: `(method, code, calls, total ms)`.
pub fn call_counts() -> Vec<(String, String, u64, u64)> {
    let calls = CALLS.lock().expect("call counter lock");
    calls.iter().map(|((m, c), (n, ms))| (m.clone(), c.clone(), *n, *ms)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names() {
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::Ok), "OK");
    }

    #[test]
    fn only_well_formed_request_ids_are_adopted() {
        let with = |id: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(REQUEST_ID_HEADER, HeaderValue::from_static(id));
            passed_request_id(&h)
        };
        assert_eq!(with("req-0b5e-77").as_deref(), Some("req-0b5e-77"));
        assert_eq!(with("0b5e-77"), None, "no req- prefix");
        assert_eq!(with("req-a b"), None, "a space");
        assert_eq!(with("req-a\"b"), None, "a quote");
        assert_eq!(with("req-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"), None, "65 characters");
        assert_eq!(passed_request_id(&HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn the_request_id_is_passed_on_by_calls_made_for_it() {
        use tonic::service::Interceptor;
        let sent = |_: ()| PassRequestId.call(tonic::Request::new(())).unwrap();
        assert!(sent(()).metadata().get(REQUEST_ID_HEADER).is_none(), "no request, no header");
        let req = with_request_id("req-1".into(), async { sent(()) }).await;
        assert_eq!(req.metadata().get(REQUEST_ID_HEADER).unwrap(), "req-1");
        assert_eq!(with_request_id(String::new(), async { current_request_id() }).await, None);
    }

    #[test]
    fn the_status_is_read_from_headers_or_trailers() {
        let mut h = HeaderMap::new();
        assert!(Outcome::of(&h).is_none());
        h.insert("grpc-status", HeaderValue::from_static("5"));
        h.insert("grpc-message", HeaderValue::from_static("volume%20x%20not%20found"));
        let o = Outcome::of(&h).unwrap();
        assert_eq!((o.code, o.message.as_str()), (tonic::Code::NotFound, "volume x not found"));
    }
}
