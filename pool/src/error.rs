//! The pool crate's error. Device failures (`Vdev`), damaged metadata (`Corrupt`) and refusals of a
//! request (`Invalid`, `InUse`, `NoSpace`, ...) are separate variants, so callers can tell a failing disk
//! from bad input. Messages are written to complete `cannot <verb> '<pool>': <message>`.

use cairn_vdev::VdevError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// A device operation failed or a device structure was damaged.
    #[error(transparent)]
    Vdev(#[from] VdevError),
    /// A block or structure of the pool failed verification on every copy.
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
    /// The request itself is wrong (bad spec, bad property, missing leaf, ...).
    #[error("{0}")]
    Invalid(String),
    /// A leaf or the pool is used by something else.
    #[error("{0}")]
    InUse(String),
    /// No such pool, object or leaf.
    #[error("{0}")]
    NotFound(String),
    /// Out of space.
    #[error("out of space")]
    NoSpace,
    /// Not enough devices to do this (e.g. a whole top-level vdev missing).
    #[error("{0}")]
    Unavailable(String),
    /// An earlier write failure left the pool unable to commit; export and re-import.
    #[error("pool I/O is suspended after a failed commit: {0}")]
    Suspended(String),
}

impl PoolError {
    pub fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        PoolError::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

pub type Result<T, E = PoolError> = std::result::Result<T, E>;
