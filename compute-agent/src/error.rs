//! The compute agent's one error type, mapped once to a gRPC status.

use ember_common::runner::CommandError;
use tonic::Status;

/// Everything a compute-agent call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// A request field is wrong.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No such domain.
    #[error("{0} not found")]
    NotFound(String),
    /// The domain is not in a state that allows the call (stopped, for instance).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The guest did not do its part in time (a detach it never acknowledged).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// An external command failed.
    #[error("{0}")]
    Command(#[from] CommandError),
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Shorthand.
pub type Result<T, E = ComputeError> = std::result::Result<T, E>;

/// Checks a request id is a canonical UUID (ids, never names, reach libvirt and the host).
pub fn checked_id(field: &'static str, id: &str) -> Result<()> {
    match ember_common::identity::canonical_uuid(id) {
        Some(_) => Ok(()),
        None => Err(ComputeError::InvalidArgument { field, message: format!("{id:?} is not a lowercase UUID") }),
    }
}

/// Checks a disk's front-end QoS limits (names from `ember_common::qos::LIMITS`, values above zero).
pub fn checked_iotune(
    limits: std::collections::HashMap<String, u64>,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let limits = limits.into_iter().collect();
    ember_common::qos::check(&limits).map_err(|message| ComputeError::InvalidArgument { field: "iotune", message })?;
    Ok(limits)
}

impl ComputeError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ComputeError {
        let context = context.into();
        move |source| ComputeError::Io { context, source }
    }
}

impl From<ComputeError> for Status {
    fn from(e: ComputeError) -> Status {
        let message = e.to_string();
        match e {
            ComputeError::InvalidArgument { .. } => Status::invalid_argument(message),
            ComputeError::NotFound(_) => Status::not_found(message),
            ComputeError::FailedPrecondition(_) => Status::failed_precondition(message),
            ComputeError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            ComputeError::Command(_) | ComputeError::Io { .. } => {
                tracing::error!(%message, "compute operation failed");
                Status::internal(message)
            }
        }
    }
}
