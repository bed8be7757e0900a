//! The vdev crate's error: I/O failure, corruption and misuse are separate variants, each carrying the
//! leaf (path) and, where it applies, the offset and operation.

use std::io;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VdevError {
    /// The device failed an operation (EIO, ENXIO, short file, ...).
    #[error("{path}: {op} failed at offset {offset}: {source}")]
    Io {
        path: String,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// Opening or inspecting the leaf failed.
    #[error("{path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    /// Something read from the device is not what we wrote: bad magic, checksum, or an out-of-range field.
    #[error("{path}: corrupt {what} at offset {offset}: {detail}")]
    Corrupt {
        path: String,
        what: &'static str,
        offset: u64,
        detail: String,
    },
    /// A structure written by a newer Cairn.
    #[error("{path}: unsupported {what} version {version}")]
    Unsupported {
        path: String,
        what: &'static str,
        version: u32,
    },
    /// Another process holds the leaf open (exclusive lock).
    #[error("{path}: in use by another process")]
    Busy { path: String },
    /// The request cannot be honoured (too small, wrong type, bad argument).
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

impl VdevError {
    pub fn io(path: &str, op: &'static str, offset: u64, source: io::Error) -> Self {
        VdevError::Io {
            path: path.to_string(),
            op,
            offset,
            source,
        }
    }

    pub fn corrupt(path: &str, what: &'static str, offset: u64, detail: impl Into<String>) -> Self {
        VdevError::Corrupt {
            path: path.to_string(),
            what,
            offset,
            detail: detail.into(),
        }
    }

    /// True for errors that say the data on the device is bad (as opposed to the device failing).
    pub fn is_corruption(&self) -> bool {
        matches!(self, VdevError::Corrupt { .. })
    }
}

pub type Result<T, E = VdevError> = std::result::Result<T, E>;
