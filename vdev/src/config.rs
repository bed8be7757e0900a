//! The pool configuration every label carries: the whole vdev tree with the identities of every leaf.
//!
//! The configuration is a variable-sized blob, serialized with bincode 1.3 (fixint encoding, a size limit)
//! inside the label's checksummed envelope (see [`crate::label`]). Each label carries the configuration of
//! the whole pool, so any one surviving leaf tells import the complete topology. `config_txg` orders
//! configurations: import uses the newest one found on any leaf of the pool.

use crate::identity::LeafIdentity;
use crate::units::{Guid, Txg};
use serde::{Deserialize, Serialize};

/// Most top-level vdevs a pool can have (the objset block records usage for each).
pub const MAX_TOPS: usize = 256;

/// Current version of the configuration blob layout.
pub const CONFIG_VERSION: u32 = 1;
/// The largest encoded configuration a label can hold (see `label::CONFIG_MAX`).
pub use crate::label::CONFIG_MAX;

/// What the pool's owner last did with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolState {
    /// Imported (open, or listed in some state directory's cache).
    Active,
    /// Cleanly exported: importable anywhere without -f.
    Exported,
    /// Destroyed: the leaves are free for reuse.
    Destroyed,
}

impl PoolState {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolState::Active => "ACTIVE",
            PoolState::Exported => "EXPORTED",
            PoolState::Destroyed => "DESTROYED",
        }
    }
}

/// The kind of a top-level vdev.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TopKind {
    /// One leaf.
    Single,
    /// Every child holds every block.
    Mirror,
    /// Fixed chunk interleave over the children (dm-stripe); `chunk` bytes per child in turn.
    Stripe { chunk: u64 },
}

/// Persistent per-leaf flags.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafFlags {
    /// Administratively offline (`pool offline` without -t).
    pub offline: bool,
    /// Faulted by the pool (too many errors).
    pub faulted: bool,
    /// Being replaced: detached once the resilver of its replacement completes.
    pub replacing: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafConfig {
    pub guid: Guid,
    pub identity: LeafIdentity,
    /// The leaf's size in bytes when it joined the pool.
    pub size: u64,
    pub create_txg: Txg,
    pub flags: LeafFlags,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopConfig {
    /// Index in the root's children; block pointers name top-level vdevs by it.
    pub id: u32,
    pub guid: Guid,
    pub kind: TopKind,
    /// Allocatable bytes of the top-level vdev (a multiple of `SECTOR`).
    pub asize: u64,
    pub create_txg: Txg,
    pub children: Vec<LeafConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    pub version: u32,
    pub name: String,
    pub pool_guid: Guid,
    pub state: PoolState,
    /// The txg in which this configuration was written; newer wins at import.
    pub config_txg: Txg,
    /// Host id and name of the state directory that last imported the pool.
    pub host_id: u64,
    pub hostname: String,
    pub tops: Vec<TopConfig>,
}

impl PoolConfig {
    /// Sum of all leaf GUIDs (wrapping); uberblocks record it so import notices a leaf set mismatch.
    pub fn guid_sum(&self) -> u64 {
        self.tops
            .iter()
            .flat_map(|t| t.children.iter())
            .fold(self.pool_guid.0, |a, l| a.wrapping_add(l.guid.0))
    }

    /// Find a leaf by GUID: (top index, child index).
    pub fn find_leaf(&self, guid: Guid) -> Option<(usize, usize)> {
        for (ti, t) in self.tops.iter().enumerate() {
            for (ci, c) in t.children.iter().enumerate() {
                if c.guid == guid {
                    return Some((ti, ci));
                }
            }
        }
        None
    }

    pub fn leaves(&self) -> impl Iterator<Item = &LeafConfig> {
        self.tops.iter().flat_map(|t| t.children.iter())
    }

    /// Structural validation of a decoded configuration (never trust what was read from disk).
    pub fn validate(&self) -> Result<(), String> {
        if self.version != CONFIG_VERSION {
            return Err(format!("unsupported config version {}", self.version));
        }
        if self.name.is_empty() || self.name.len() > 255 {
            return Err("bad pool name length".into());
        }
        if self.pool_guid.0 == 0 {
            return Err("pool guid is zero".into());
        }
        if self.tops.is_empty() || self.tops.len() > MAX_TOPS {
            return Err(format!("bad top-level vdev count {}", self.tops.len()));
        }
        for (i, t) in self.tops.iter().enumerate() {
            if t.id as usize != i {
                return Err(format!("top-level vdev {} has id {}", i, t.id));
            }
            if t.children.is_empty() || t.children.len() > 64 {
                return Err(format!(
                    "top-level vdev {} has {} children",
                    i,
                    t.children.len()
                ));
            }
            if t.asize == 0 || t.asize % crate::SECTOR != 0 {
                return Err(format!("top-level vdev {} has bad asize {}", i, t.asize));
            }
            match t.kind {
                TopKind::Single if t.children.len() != 1 => {
                    return Err(format!(
                        "single vdev {} has {} children",
                        i,
                        t.children.len()
                    ))
                }
                TopKind::Mirror if t.children.len() < 2 => {
                    return Err(format!(
                        "mirror vdev {} has {} children",
                        i,
                        t.children.len()
                    ))
                }
                TopKind::Stripe { chunk }
                    if chunk == 0 || chunk % crate::SECTOR != 0 || chunk > (1 << 30) =>
                {
                    return Err(format!("stripe vdev {} has bad chunk {}", i, chunk))
                }
                _ => {}
            }
        }
        Ok(())
    }
}
