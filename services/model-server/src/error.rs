//! The one mapping from what went wrong to a gRPC status (and, for REST, an HTTP status).
//! Messages are lowercase and name the model, version, signature, input and expectation.

use savedmodel::PredictError;
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("model {model:?} is not being served (serving: {})", list(served))]
    ModelNotFound { model: String, served: Vec<String> },

    #[error("model {model:?} has no available version yet")]
    NoVersionAvailable { model: String },

    #[error("version {version} of model {model:?} is not available (available: {})", list_versions(available))]
    VersionNotFound { model: String, version: i64, available: Vec<i64> },

    #[error("model {model:?} has no version labelled {label:?} (labels: {})", list(labels))]
    LabelNotFound { model: String, label: String, labels: Vec<String> },

    #[error("model {model:?} version {version} has no signature {signature:?} (signatures: {})", list(available))]
    SignatureNotFound { model: String, version: i64, signature: String, available: Vec<String> },

    #[error("model {model:?} version {version} signature {signature:?} cannot be served: {reason}")]
    SignatureUnavailable { model: String, version: i64, signature: String, reason: String },

    #[error("{0}")]
    InvalidArgument(String),

    #[error("model {model:?} version {version} signature {signature:?}: {source}")]
    Predict { model: String, version: i64, signature: String, source: Box<PredictError> },

    #[error("{0}")]
    Overloaded(String),

    #[error("{0}")]
    DeadlineExceeded(String),

    #[error("{0}")]
    FailedPrecondition(String),

    #[error("{0}")]
    Unimplemented(String),

    #[error("{0}")]
    Internal(String),
}

fn list(items: &[String]) -> String {
    if items.is_empty() { "none".into() } else { items.join(", ") }
}

fn list_versions(items: &[i64]) -> String {
    if items.is_empty() { "none".into() } else { items.iter().map(i64::to_string).collect::<Vec<_>>().join(", ") }
}

impl ServeError {
    pub fn code(&self) -> Code {
        match self {
            ServeError::ModelNotFound { .. }
            | ServeError::NoVersionAvailable { .. }
            | ServeError::VersionNotFound { .. }
            | ServeError::LabelNotFound { .. } => Code::NotFound,
            ServeError::SignatureNotFound { .. } | ServeError::InvalidArgument(_) => Code::InvalidArgument,
            ServeError::SignatureUnavailable { .. } | ServeError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServeError::Predict { source, .. } => match **source {
                PredictError::Engine(_) => Code::Internal,
                _ => Code::InvalidArgument,
            },
            ServeError::Overloaded(_) => Code::ResourceExhausted,
            ServeError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ServeError::Unimplemented(_) => Code::Unimplemented,
            ServeError::Internal(_) => Code::Internal,
        }
    }

    /// A failure of the server or the model rather than of the caller's request: what a
    /// canary's error rate counts.
    pub fn is_server_side(&self) -> bool {
        matches!(self.code(), Code::Internal | Code::ResourceExhausted | Code::FailedPrecondition | Code::Unavailable)
    }

    /// The HTTP status TF Serving's REST API uses for the same gRPC code.
    pub fn http_status(&self) -> u16 {
        match self.code() {
            Code::NotFound => 404,
            Code::InvalidArgument | Code::FailedPrecondition => 400,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::DeadlineExceeded => 504,
            _ => 500,
        }
    }
}

impl From<ServeError> for tonic::Status {
    fn from(error: ServeError) -> Self {
        tonic::Status::new(error.code(), error.to_string())
    }
}
