//! cairn-vdev: leaves, labels and the vdev tree.
//!
//! This crate is the bottom of Cairn. It owns:
//! - the [`Leaf`] trait, the one synchronous interface all block I/O goes through, with the file and
//!   block-device leaf ([`file`]) and the test leaves that wrap it ([`testleaf`]: in-memory, crash-simulating
//!   and fault-injecting);
//! - leaf identities (path, phys_path, devid; [`identity`]);
//! - the label format ([`label`]): four labels per leaf, each a checksummed header, the pool configuration
//!   and a ring of uberblocks;
//! - the pool configuration that labels carry ([`config`]);
//! - fixed-offset little-endian field access for on-disk structures ([`codec`]), used here and by the pool;
//! - the runtime vdev tree ([`tree`]): routing of reads and writes to mirror, stripe and single-leaf
//!   top-level vdevs, with per-copy verification; per-leaf I/O workers with a slow-I/O deadline
//!   ([`dispatch`]) and the commit's parallel label writes ([`labelsync`]).
//!
//! Invariants: nothing read from a device is trusted before its checksum and every integer in it are
//! validated; all multi-byte integers on disk are little-endian.

pub mod codec;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod file;
pub mod identity;
pub mod label;
pub mod labelsync;
pub mod leaf;
pub mod testleaf;
pub mod tree;
pub mod units;

pub use error::{Result, VdevError};
pub use leaf::Leaf;
pub use units::{Guid, Txg, SECTOR};
