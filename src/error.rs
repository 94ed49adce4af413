//! The crate's one error type.

use std::path::PathBuf;

/// Every fallible ferrovit call returns this error. Messages name the offending
/// value (tensor, shape, file, field) so a user can act on them without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shape mismatch in {op}: expected {expected}, got {actual}")]
    Shape {
        op: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{op} needs dtype {expected}, got {actual}")]
    DType {
        op: &'static str,
        expected: &'static str,
        actual: &'static str,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("unknown parameter `{0}`")]
    UnknownParam(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("training stopped: the loss is {value} at step {step} (diverged; try a lower learning rate)")]
    NonFinite { step: u64, value: f32 },
    #[error("autograd: {0}")]
    Graph(String),
    #[error("{0}")]
    Device(String),
    #[error("communication: {0}")]
    Comm(String),
    /// An error already formatted with its file (kept by a cache that outlives it).
    #[error("{0}")]
    Message(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn shape(op: &'static str, expected: impl ToString, actual: impl ToString) -> Self {
        Error::Shape {
            op,
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
