//! cairn-pool: the storage pool: block pointers, space allocation, the object layer, transaction groups
//! and the pool lifecycle (create, open/import, export, destroy, add).
//!
//! Layers, bottom-up: [`alloc`] (per-vdev allocation bitmaps in double-buffered pages), [`blkptr`]
//! (block pointers with DVAs and blake3 checksums), [`object`] (copy-on-write object trees, the object
//! set), [`pool`] (the pool: txg commit, configuration, properties, history), [`import`] (finding pools on
//! devices), [`view`] (reads of one consistent state, under one hold of the pool lock).
//!
//! Invariants: a txg commits by writing all new blocks, the changed allocation pages and the objset block,
//! flushing, then writing the uberblock (and labels when the configuration changed) and flushing again;
//! nothing reachable from a committed uberblock is ever overwritten; every block read is verified against
//! the checksum in its parent pointer.

pub mod alloc;
pub mod blkptr;
pub mod compress;
pub mod deadlist;
pub mod devmatch;
pub mod diff;
pub mod error;
pub mod health;
pub mod import;
pub mod object;
pub mod pool;
pub mod props;
pub mod rewind;
pub mod scan;
pub mod schedule;
pub mod slowio;
pub mod snapshot;
pub mod topology;
pub mod trim;
pub mod view;

pub use cairn_vdev::config::{PoolConfig, PoolState, TopKind};
pub use cairn_vdev::units::{lock, now_secs};
pub use cairn_vdev::{Guid, Txg};
pub use error::{PoolError, Result};
pub use pool::{CreateOptions, HostInfo, OpenOptions, Pool, SpaceRule, TopSpec};
pub use view::View;
