//! cairn-dataset: thin-provisioned volumes (datasets) built on the pool's object layer.
//!
//! A volume is one object of the pool (type Volume) whose block size is the volume's `volblocksize`;
//! its logical size is `volsize`. Unwritten blocks are holes: they read as zeros and take no space;
//! trims and all-zero writes turn blocks back into holes. The registry of datasets (name -> record with
//! the object id and properties) is a bincode map kept in the pool's directory under "datasets".
//!
//! Space: a volume created without `-s` has a refreservation (its size plus indirect-block overhead);
//! the pool keeps that space for it: other writers get ENOSPC before they can take it.
//! Sparse volumes reserve nothing. A write that does not fit gets `NoSpace` and changes nothing.
//!
//! Live properties: every open [`Volume`] of a pool shares one `LiveState` per volume (kept with the
//! open pool), so `set volsize` and `set readonly` apply to connected clients at their next request.
//! I/O holds the state's read lock from its bounds check until the pool has the data; a change takes
//! the write lock, so a shrink waits for writes in flight and then frees the tail: nothing is left past
//! the new end.
//!
//! Files: `registry` (records and their encoding), `volume` (create, set, properties), `io` (open
//! volumes and snapshots), `snapshot` (snapshot, clone, rollback, promote, destroy, rename, holds),
//! `space` (used, usedbysnapshots, written and the rest).
//!
//! Invariants: every request is bounds-checked against the live `volsize` before it reaches the pool;
//! names are `POOL/NAME` (one level; Cairn has no filesystems to nest under).

mod io;
mod registry;
mod snapshot;
mod space;
mod volume;

pub use io::{Extent, Volume};
pub use registry::{SnapRecord, VolumeRecord};
pub use snapshot::*;
pub use volume::*;

use cairn_pool::PoolError;

pub const DEFAULT_BLOCKSIZE: u64 = 16 * 1024;
pub const MIN_BLOCKSIZE: u64 = 4 * 1024;
pub const MAX_BLOCKSIZE: u64 = 128 * 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{0}")]
    Invalid(String),
    #[error("dataset does not exist")]
    NotFound,
    /// The dataset is held, has dependents (snapshots, clones) or is in use; the text says which.
    #[error("{0}")]
    Busy(String),
    #[error("dataset already exists")]
    Exists,
    #[error("dataset is read-only")]
    ReadOnly,
    #[error("out of space")]
    NoSpace,
    /// A reservation (refreservation, or volsize of a thick volume) larger than the pool can keep.
    #[error("size is greater than available space ({needed} bytes needed, {available} available)")]
    TooBig { needed: u64, available: u64 },
    /// A snapshot of a volume with a refreservation, which would then need new room to overwrite it.
    #[error(
        "out of space: keeping the refreservation after the snapshot needs {needed} bytes, \
         {available} available outside reservations"
    )]
    SnapshotNoSpace { needed: u64, available: u64 },
    #[error("request beyond the end of the volume ({end} > {size})")]
    OutOfRange { end: u64, size: u64 },
}

impl DatasetError {
    fn from_pool(e: PoolError) -> DatasetError {
        match e {
            PoolError::NoSpace => DatasetError::NoSpace,
            e => DatasetError::Pool(e),
        }
    }
}

pub type Result<T, E = DatasetError> = std::result::Result<T, E>;
