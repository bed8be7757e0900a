//! Open volumes and snapshots: the I/O interface the NBD server uses, and the live state every
//! handle of a volume shares.

use crate::registry::{load, load_view, SnapRecord, VolumeRecord};
use crate::volume::{reserved_by_others, short};
use crate::{DatasetError, Result};
use cairn_pool::lock;
use cairn_pool::{Pool, PoolError, SpaceRule};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// The properties of a volume that its I/O checks, shared by every open handle of it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LiveState {
    pub(crate) volsize: u64,
    pub(crate) readonly: bool,
    pub(crate) reserved: bool,
}

impl LiveState {
    /// A snapshot never changes: read-only at its size.
    pub(crate) fn of_snapshot(s: &SnapRecord) -> LiveState {
        LiveState {
            volsize: s.volsize,
            readonly: true,
            reserved: false,
        }
    }

    pub(crate) fn of(rec: &VolumeRecord) -> LiveState {
        LiveState {
            volsize: rec.volsize,
            readonly: rec.readonly,
            reserved: rec.refreservation > 0,
        }
    }
}

/// The live states of a pool's volumes, by object id (a [`Pool::extension`]).
#[derive(Default)]
struct LiveVolumes(Mutex<HashMap<u64, Arc<RwLock<LiveState>>>>);

/// The live state of a volume, made from its record on first use.
pub(crate) fn live(pool: &Pool, rec: &VolumeRecord) -> Arc<RwLock<LiveState>> {
    live_of(pool, rec.object, || LiveState::of(rec))
}

/// The live state of object `object`, made by `make` on first use.
pub(crate) fn live_of(
    pool: &Pool,
    object: u64,
    make: impl FnOnce() -> LiveState,
) -> Arc<RwLock<LiveState>> {
    let all = pool.extension::<LiveVolumes>();
    let mut m = lock(&all.0);
    m.entry(object)
        .or_insert_with(|| Arc::new(RwLock::new(make())))
        .clone()
}

/// Forget the live state of an object (the volume is gone, its id may be reused).
pub(crate) fn forget_live(pool: &Pool, object: u64) {
    lock(&pool.extension::<LiveVolumes>().0).remove(&object);
}

pub(crate) fn read_live(l: &RwLock<LiveState>) -> RwLockReadGuard<'_, LiveState> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn write_live(l: &RwLock<LiveState>) -> RwLockWriteGuard<'_, LiveState> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// The piece size in which a volume with a reservation rewrites its space on a full pool.
const RESERVED_PIECE: u64 = 1 << 20;

/// An open volume: the I/O interface the NBD server uses.
pub struct Volume {
    pool: Arc<Pool>,
    name: String,
    object: u64,
    volblocksize: u64,
    /// Size and read-only flag, shared with every other handle of this volume and with `set`.
    live: Arc<RwLock<LiveState>>,
    /// Space other volumes' reservations hold, refreshed at most every second (writes are hot).
    headroom: Mutex<(Instant, u64)>,
}

/// Allocation state of a range, for NBD block status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub allocated: bool,
}

impl Volume {
    /// Open a volume (`POOL/VOL`) or, read-only, a snapshot (`POOL/VOL@SNAP`).
    pub fn open(pool: Arc<Pool>, full: &str) -> Result<Volume> {
        let (vol, snap) = match full.split_once('@') {
            Some((v, s)) => (v, Some(s)),
            None => (full, None),
        };
        let name = short(&pool, vol)?;
        // The record and the other volumes' reservations of one state: a volume created or
        // destroyed meanwhile is wholly there or wholly gone.
        let (rec, headroom) = pool.consistently(|v| -> Result<(VolumeRecord, u64)> {
            let reg = load_view(v)?;
            let rec = reg.get(&name).cloned().ok_or(DatasetError::NotFound)?;
            let h = match snap {
                Some(_) => 0,
                None => reserved_by_others(v, &reg, Some(&name))?,
            };
            Ok((rec, h))
        })?;
        if let Some(s) = snap {
            let sr = rec
                .snapshots
                .get(s)
                .cloned()
                .ok_or(DatasetError::NotFound)?;
            let live = live_of(&pool, sr.object, || LiveState::of_snapshot(&sr));
            return Ok(Volume {
                pool,
                name: format!("{name}@{s}"),
                object: sr.object,
                volblocksize: rec.volblocksize,
                live,
                headroom: Mutex::new((Instant::now(), 0)),
            });
        }
        let live = live(&pool, &rec);
        Ok(Volume {
            pool,
            name,
            object: rec.object,
            volblocksize: rec.volblocksize,
            live,
            headroom: Mutex::new((Instant::now(), headroom)),
        })
    }

    /// The volume's size now (`set volsize` changes it for every handle).
    pub fn size(&self) -> u64 {
        read_live(&self.live).volsize
    }
    pub fn block_size(&self) -> u64 {
        self.volblocksize
    }
    /// Whether the volume refuses writes now (`set readonly` changes it for every handle).
    pub fn readonly(&self) -> bool {
        read_live(&self.live).readonly
    }
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The live state, checked: `[off, off+len)` lies inside the volume (and it takes writes, for a
    /// change). The guard is held until the request is done with the pool.
    fn check(&self, off: u64, len: u64, change: bool) -> Result<RwLockReadGuard<'_, LiveState>> {
        let st = read_live(&self.live);
        match off.checked_add(len) {
            Some(end) if end <= st.volsize => {}
            _ => {
                return Err(DatasetError::OutOfRange {
                    end: off.saturating_add(len),
                    size: st.volsize,
                })
            }
        }
        if change && st.readonly {
            return Err(DatasetError::ReadOnly);
        }
        Ok(st)
    }

    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let _st = self.check(off, buf.len() as u64, false)?;
        self.pool.read_object(self.object, off, buf)?;
        Ok(())
    }

    fn headroom(&self) -> Result<u64> {
        let mut h = lock(&self.headroom);
        if h.0.elapsed() > Duration::from_secs(1) && !self.name.contains('@') {
            // The registry and the objects it names of one state (a volume destroyed meanwhile
            // is not half seen: this must never fail a write).
            let others = self.pool.consistently(|v| {
                let reg = load_view(v)?;
                reserved_by_others(v, &reg, Some(&self.name))
            })?;
            *h = (Instant::now(), others);
        }
        Ok(h.1)
    }

    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        let st = self.check(off, data.len() as u64, true)?;
        // Other volumes' unused reservations must stay free; our own covers us.
        let rule = SpaceRule {
            headroom: self.headroom()?,
            reserved: st.reserved,
        };
        match self
            .pool
            .write_object_reserved(self.object, off, data, rule)
        {
            // A volume rewriting its reserved space on a full pool: the new blocks need room before
            // the old ones are freed, so go in pieces, each freeing what the last one replaced.
            Err(PoolError::NoSpace) if rule.reserved && data.len() as u64 > RESERVED_PIECE => {
                let mut at = 0u64;
                for piece in data.chunks(RESERVED_PIECE as usize) {
                    self.pool
                        .write_object_reserved(self.object, off + at, piece, rule)
                        .map_err(DatasetError::from_pool)?;
                    at += piece.len() as u64;
                }
                Ok(())
            }
            r => r.map_err(DatasetError::from_pool),
        }
    }

    /// Free the range (TRIM); partial blocks are zeroed.
    pub fn trim(&self, off: u64, len: u64) -> Result<()> {
        let _st = self.check(off, len, true)?;
        self.pool.free_object_range(self.object, off, len)?;
        Ok(())
    }

    /// Zero the range: whole blocks become holes.
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.trim(off, len)
    }

    /// Make everything written so far durable (commits the pool's open txg).
    pub fn flush(&self) -> Result<()> {
        self.pool.sync()?;
        Ok(())
    }

    /// The snapshots of this volume (for NBD's `qemu:dirty-bitmap:SNAP` contexts).
    pub fn snapshot_names(&self) -> Vec<String> {
        if self.name.contains('@') {
            return Vec::new();
        }
        let Ok(reg) = load(&self.pool) else {
            return Vec::new();
        };
        reg.get(&self.name)
            .map(|r| r.snapshots.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Blocks of `[off, off+len)` written, trimmed or zeroed since snapshot `snap` of this volume,
    /// as extents in order from `off` (`allocated` = changed); a prefix of the range after
    /// `max_blocks` changed blocks, never less than one extent.
    pub fn dirty_map(
        &self,
        snap: &str,
        off: u64,
        len: u64,
        max_blocks: usize,
    ) -> Result<Vec<Extent>> {
        let _st = self.check(off, len, false)?;
        let reg = load(&self.pool)?;
        let sobj = reg
            .get(&self.name)
            .and_then(|r| r.snapshots.get(snap))
            .map(|s| s.object)
            .ok_or(DatasetError::NotFound)?;
        let bs = self.volblocksize;
        let end = off + len;
        let (blocks, done) =
            self.pool
                .changed_blocks(sobj, self.object, off / bs, end.div_ceil(bs), max_blocks)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |at: u64, n: u64, a: bool| match out.last_mut() {
            Some(l) if l.allocated == a => l.length += n,
            _ => out.push(Extent {
                offset: at,
                length: n,
                allocated: a,
            }),
        };
        let mut cursor = off;
        for b in blocks {
            let start = (b * bs).max(off);
            let stop = ((b + 1) * bs).min(end);
            if start > cursor {
                push(cursor, start - cursor, false);
            }
            push(start, stop - start, true);
            cursor = stop;
        }
        let limit = done.saturating_mul(bs).min(end);
        if limit > cursor {
            push(cursor, limit - cursor, false);
        }
        Ok(out)
    }

    /// Allocation of `[off, off+len)`, in order from `off`; it may cover only a prefix of the range
    /// (it stops after `max_blocks` allocated blocks), never less than one extent.
    pub fn map(&self, off: u64, len: u64, max_blocks: usize) -> Result<Vec<Extent>> {
        let _st = self.check(off, len, false)?;
        Ok(self
            .pool
            .object_map(self.object, off, len, max_blocks)?
            .into_iter()
            .map(|(offset, length, allocated)| Extent {
                offset,
                length,
                allocated,
            })
            .collect())
    }
}
