//! The dataset registry: names and records of volumes and their snapshots, a bincode blob in the
//! pool directory ("datasets").
//!
//! Format 2 (snapshots) starts with the 8 magic bytes `CAIRNDS2`; a blob without them is format 1
//! (volumes only, as written before snapshots existed) and is read as a registry without
//! snapshots. It is always written as format 2. Byte layout: docs/on-disk-format.md.
//!
//! Every change loads, edits and saves the registry under the pool's registry lock and in one
//! `Pool::atomically` with the objects and snapshot links it changes, so they commit together and
//! nobody sees one without the other. Readers that look at the objects a registry names (space
//! figures, reservations) read both through one `Pool::consistently` view.

use crate::{DatasetError, Result};
use bincode::Options;
use cairn_pool::snapshot::Tx;
use cairn_pool::{Pool, PoolError, View};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;

pub(crate) const REGISTRY: &str = "datasets";
const MAGIC: &[u8; 8] = b"CAIRNDS2";

/// What the registry keeps for a volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VolumeRecord {
    pub guid: u64,
    pub object: u64,
    pub volsize: u64,
    pub volblocksize: u64,
    /// Bytes reserved for the volume; 0 for a sparse volume.
    pub refreservation: u64,
    pub readonly: bool,
    pub copies: u8,
    pub creation: u64,
    /// User properties (`module:property` names).
    pub user: BTreeMap<String, String>,
    /// Snapshots by name (after `@`).
    pub snapshots: BTreeMap<String, SnapRecord>,
}

/// What the registry keeps for a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SnapRecord {
    pub guid: u64,
    /// The MOS object (type Snapshot).
    pub object: u64,
    /// The txg whose committed state it holds (zfs's `createtxg`).
    pub txg: u64,
    pub creation: u64,
    /// The volume's size when it was taken.
    pub volsize: u64,
    /// Hold tags (`dataset hold`) and when they were placed; a held snapshot cannot be destroyed.
    pub holds: BTreeMap<String, u64>,
    pub user: BTreeMap<String, String>,
}

/// A volume record as format 1 stored it.
#[derive(Deserialize)]
struct VolumeRecordV1 {
    guid: u64,
    object: u64,
    volsize: u64,
    volblocksize: u64,
    refreservation: u64,
    readonly: bool,
    copies: u8,
    creation: u64,
    user: BTreeMap<String, String>,
}

pub(crate) type Registry = BTreeMap<String, VolumeRecord>;

/// Serializes the changes of a pool's registry (load, change, save): without it, two volumes created
/// at once through the daemon each saved a registry without the other (one volume lost, its object
/// leaked). A [`Pool::extension`]; taken before any volume's live-state lock.
#[derive(Default)]
pub(crate) struct RegistryLock(pub(crate) Mutex<()>);

fn opts() -> impl bincode::Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(16 << 20)
}

fn corrupt(e: impl std::fmt::Display) -> DatasetError {
    DatasetError::Pool(PoolError::corrupt("dataset registry", e.to_string()))
}

pub(crate) fn decode(b: &[u8]) -> Result<Registry> {
    if b.is_empty() {
        return Ok(Registry::new());
    }
    if let Some(rest) = b.strip_prefix(MAGIC.as_slice()) {
        return opts().deserialize(rest).map_err(corrupt);
    }
    let old: BTreeMap<String, VolumeRecordV1> = opts().deserialize(b).map_err(corrupt)?;
    Ok(old
        .into_iter()
        .map(|(n, r)| {
            (
                n,
                VolumeRecord {
                    guid: r.guid,
                    object: r.object,
                    volsize: r.volsize,
                    volblocksize: r.volblocksize,
                    refreservation: r.refreservation,
                    readonly: r.readonly,
                    copies: r.copies,
                    creation: r.creation,
                    user: r.user,
                    snapshots: BTreeMap::new(),
                },
            )
        })
        .collect())
}

pub(crate) fn encode(reg: &Registry) -> Result<Vec<u8>> {
    let mut b = MAGIC.to_vec();
    b.extend(
        opts()
            .serialize(reg)
            .map_err(|e| DatasetError::Invalid(e.to_string()))?,
    );
    Ok(b)
}

/// The registry alone (one read: consistent by itself, but see [`load_view`] for anything that
/// also reads the objects it names).
pub(crate) fn load(pool: &Pool) -> Result<Registry> {
    pool.consistently(load_view)
}

/// The registry as a [`View`] sees it: read the objects it names through the same view, so they
/// are of the same state (a volume destroyed in between cannot be half seen).
pub(crate) fn load_view(v: &mut View) -> Result<Registry> {
    match v.read_named_blob(REGISTRY)? {
        None => Ok(Registry::new()),
        Some(b) => decode(&b),
    }
}

pub(crate) fn load_tx(tx: &mut Tx) -> Result<Registry> {
    load_view(&mut tx.view())
}

pub(crate) fn save_tx(tx: &mut Tx, reg: &Registry) -> Result<()> {
    tx.write_named_blob(REGISTRY, &encode(reg)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_1_registries_are_read() {
        #[derive(Serialize)]
        struct V1 {
            guid: u64,
            object: u64,
            volsize: u64,
            volblocksize: u64,
            refreservation: u64,
            readonly: bool,
            copies: u8,
            creation: u64,
            user: BTreeMap<String, String>,
        }
        let mut m = BTreeMap::new();
        m.insert(
            "vol".to_string(),
            V1 {
                guid: 7,
                object: 9,
                volsize: 1 << 20,
                volblocksize: 16384,
                refreservation: 0,
                readonly: false,
                copies: 1,
                creation: 5,
                user: BTreeMap::new(),
            },
        );
        let b = opts().serialize(&m).unwrap();
        let r = decode(&b).unwrap();
        assert_eq!(r["vol"].object, 9);
        assert!(r["vol"].snapshots.is_empty());
        let again = decode(&encode(&r).unwrap()).unwrap();
        assert_eq!(again, r);
        assert!(decode(b"CAIRNDS2garbage").is_err());
    }
}
