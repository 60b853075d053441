//! The storage agent's one error type, mapped once to a gRPC status.

use ember_common::runner::CommandError;
use tonic::Status;

/// Everything a storage-agent call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A request field is wrong.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No such volume, snapshot or backend.
    #[error("{0} not found")]
    NotFound(String),
    /// The request conflicts with what exists (a different size, snapshots still present).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The backend is out of space.
    #[error("{0}")]
    NoSpace(String),
    /// An external command failed.
    #[error("{0}")]
    Command(#[from] CommandError),
    /// Another storage agent (a migration's source) answered with an error, or could not be reached; its code
    /// is passed on, so an unreachable source stays a reason to try again.
    #[error("source storage agent: {}", .0.message())]
    Peer(Status),
    /// A filesystem call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Shorthand.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl AgentError {
    /// Wraps an I/O error with what was being done; ENOSPC becomes [`AgentError::NoSpace`].
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| {
            if source.raw_os_error() == Some(nix::libc::ENOSPC) {
                AgentError::NoSpace(format!("{context}: no space left on the backend"))
            } else {
                AgentError::Io { context, source }
            }
        }
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        let message = e.to_string();
        match e {
            AgentError::InvalidArgument { .. } => Status::invalid_argument(message),
            AgentError::NotFound(_) => Status::not_found(message),
            AgentError::FailedPrecondition(_) => Status::failed_precondition(message),
            AgentError::NoSpace(_) => Status::resource_exhausted(message),
            AgentError::Peer(status) => Status::new(status.code(), message),
            AgentError::Command(_) | AgentError::Io { .. } => {
                tracing::error!(%message, "storage operation failed");
                Status::internal(message)
            }
        }
    }
}
