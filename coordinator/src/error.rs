//! The coordinator's one error type, mapped once to a gRPC status.

use tonic::Status;

/// Everything a coordinator call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is wrong; `field` names it.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The named resource does not exist (or the caller may not see it).
    #[error("{kind} {id} not found")]
    NotFound {
        /// Resource kind, e.g. `volume type`.
        kind: &'static str,
        /// The id or name asked for.
        id: String,
    },
    /// The resource is not in a state that allows the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A name or idempotency key is already taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller's role or project does not allow the call.
    #[error("{0}")]
    PermissionDenied(String),
    /// Quota or capacity exhausted.
    #[error("{0}")]
    ResourceExhausted(String),
    /// An agent the call needs could not be reached (it is down or restarting); the same call may succeed later.
    #[error("{0}")]
    Unavailable(String),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored document could not be decoded.
    #[error("stored data: {0}")]
    Json(#[from] serde_json::Error),
    /// A volume key could not be made or opened.
    #[error("volume keys: {0}")]
    Keys(String),
}

/// Shorthand for a handler result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An INVALID_ARGUMENT naming `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument { field, message: message.into() }
    }

    /// A NOT_FOUND for a resource of `kind`.
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        Error::NotFound { kind, id: id.into() }
    }

    /// What a request answers when an agent it called directly failed with `status`, `what` saying what was
    /// asked of which agent: UNAVAILABLE when the agent could not be reached, so that automation knows to try
    /// again, else FAILED_PRECONDITION with the agent's reason.
    pub fn from_agent(what: &str, status: &Status) -> Self {
        let message = format!("{what}: {}", status.message());
        if crate::agents::transient(status) && !refused_in_handshake(status) {
            Error::Unavailable(message)
        } else {
            Error::FailedPrecondition(message)
        }
    }
}

/// Whether the connection behind `status` failed in its TLS handshake (the agent's certificate is revoked, say):
/// trying again would not help.
fn refused_in_handshake(status: &Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        // An I/O error carries the TLS error it wraps as its payload, not as its source.
        let inner = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).map(|i| i as &dyn std::error::Error);
        if e.is::<rustls::Error>() || inner.is_some_and(|i| i.is::<rustls::Error>()) {
            return true;
        }
        cause = inner.or_else(|| e.source());
    }
    false
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = e.to_string();
        match e {
            Error::InvalidArgument { .. } => Status::invalid_argument(message),
            Error::NotFound { .. } => Status::not_found(message),
            Error::FailedPrecondition(_) => Status::failed_precondition(message),
            Error::AlreadyExists(_) => Status::already_exists(message),
            Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::ResourceExhausted(_) => Status::resource_exhausted(message),
            Error::Unavailable(_) => Status::unavailable(message),
            Error::Db(ref inner) => {
                tracing::error!(error = %inner, "database error");
                Status::internal(message)
            }
            Error::Json(_) => Status::internal(message),
            Error::Keys(_) => {
                tracing::error!(%message, "volume key error");
                Status::internal(message)
            }
        }
    }
}
