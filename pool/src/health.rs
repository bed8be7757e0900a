//! Device health: per-leaf error counters kept across export/import, dirty time logs, events,
//! permanent data errors, device checks, and the administrative operations (offline, online, clear).
//!
//! All of it lives in one "health" blob of the pool directory (bincode), rewritten in a txg only when it
//! changed. Before every commit the pool checks that each leaf's device is still there (a deleted or
//! shrunken file makes it UNAVAIL), records in the dirty time log of every mirror child the txgs it
//! misses (unusable now, or a write that failed in the previous txg), and copies state changes the
//! tree made on its own (a leaf faulted after too many errors) into the configuration.

use crate::error::{PoolError, Result};
use crate::object::ObjType;
use crate::pool::{blob_opts, read_blob, write_blob, Behind, Inner, Pool, MOS_COPIES};
use bincode::Options;
use cairn_vdev::config::TopKind;
use cairn_vdev::label;
use cairn_vdev::testleaf::FaultSet;
use cairn_vdev::tree::{Event, LeafVdev, TopVdev};
use cairn_vdev::units::{lock, now_secs as now};
use cairn_vdev::{Guid, Leaf, Txg};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const HEALTH: &str = "health";
/// Leaf guid -> `verify_below` of leaves whose older copies a resilver verifies (a blob of its
/// own, so that pools without it read as before).
const UNPROVEN: &str = "unproven";

#[derive(Serialize, Deserialize, Default, PartialEq)]
struct Health {
    /// Leaf guid -> [read, write, checksum errors, repaired bytes].
    stats: BTreeMap<u64, [u64; 4]>,
    /// Leaf guid -> txg ranges it lacks.
    dtl: BTreeMap<u64, Vec<(u64, u64)>>,
    events: Vec<Event>,
    /// (object, block id) no copy could serve.
    errlog: BTreeSet<(u64, u64)>,
}

impl Inner {
    fn health(&self) -> Health {
        let mut h = Health::default();
        for (_, lv) in self.tree.leaves() {
            h.stats.insert(lv.guid.0, lv.stats.persistent());
            let d: Vec<(u64, u64)> = lock(&lv.dtl).iter().map(|&(a, b)| (a.0, b.0)).collect();
            if !d.is_empty() {
                h.dtl.insert(lv.guid.0, d);
            }
        }
        h.events = self.tree.events.all();
        h.errlog = lock(&self.errlog).clone();
        h
    }

    /// Restore counters, dirty time logs, events and the error log at open.
    ///
    /// Every leaf's dirty time log becomes the recorded one (empty if none is recorded); whatever
    /// was set before only steered the reads of the record.
    pub(crate) fn load_health(&mut self) -> Result<()> {
        let Some(&id) = self.dir.get(HEALTH) else {
            for (_, lv) in self.tree.leaves() {
                lock(&lv.dtl).clear();
            }
            return Ok(());
        };
        let vdevs = self.tree.tops.clone();
        let b = read_blob(&mut self.mos, &vdevs, id)?;
        let h: Health = blob_opts()
            .deserialize(&b)
            .map_err(|e| PoolError::corrupt("pool health record", e.to_string()))?;
        for (_, lv) in self.tree.leaves() {
            if let Some(s) = h.stats.get(&lv.guid.0) {
                lv.stats.restore(*s);
            }
            *lock(&lv.dtl) = h
                .dtl
                .get(&lv.guid.0)
                .map(|d| d.iter().map(|&(a, b)| (Txg(a), Txg(b))).collect())
                .unwrap_or_default();
        }
        self.tree.events.restore(h.events);
        *lock(&self.errlog) = h.errlog;
        self.health_written = b;
        let b = self.read_named_blob(UNPROVEN)?.unwrap_or_default();
        let u: BTreeMap<u64, u64> = if b.is_empty() {
            BTreeMap::new()
        } else {
            blob_opts()
                .deserialize(&b)
                .map_err(|e| PoolError::corrupt("pool unproven-copies record", e.to_string()))?
        };
        for (_, lv) in self.tree.leaves() {
            let v = u.get(&lv.guid.0).copied().unwrap_or(0);
            lv.verify_below.store(v, Ordering::Relaxed);
            lv.dtl_settled();
        }
        self.unproven_written = b;
        Ok(())
    }

    /// After [`Inner::load_health`], at open: devices whose labels stop before the pool's newest txg
    /// (`behind`: the leaf and the txgs `[from, to]` it has no uberblock of) either missed those
    /// txgs while the pool knew it (the recorded dirty time log covers them: nothing to do) or are
    /// older copies of the device (a backup, a disk image restored) that the pool never knew as
    /// missing. A mirror child of that kind lacks those txgs: they go into its dirty time log, so
    /// reads avoid it and a resilver brings it up to date. A mirror whose every usable device is
    /// such a copy, or a single leaf or stripe with one, cannot be used at all (its allocation map
    /// is as old as its data, and new writes would land on blocks the pool still uses): the open
    /// is refused.
    pub(crate) fn check_behind(&mut self, behind: &[Behind], pool_txg: Txg) -> Result<()> {
        let stale: Vec<&Behind> = behind
            .iter()
            .filter(|b| !covers(&lock(&b.leaf.dtl), b.from, b.to))
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        let is_stale = |g: Guid| stale.iter().any(|b| b.leaf.guid == g);
        for t in &self.tree.tops {
            let usable: Vec<&Arc<LeafVdev>> =
                t.children.iter().filter(|c| c.state().usable()).collect();
            // A mirror is whole while one child is current; a stripe needs every child.
            let unusable = match t.kind {
                TopKind::Mirror => !usable.is_empty() && usable.iter().all(|c| is_stale(c.guid)),
                _ => usable.iter().any(|c| is_stale(c.guid)),
            };
            if unusable {
                let what: Vec<String> = stale
                    .iter()
                    .filter(|b| usable.iter().any(|c| c.guid == b.leaf.guid))
                    .map(|b| format!("{} (txg {})", b.path, b.from.0 - 1))
                    .collect();
                let name = crate::pool::top_name(t.kind, t.id, &t.children[0].path());
                return Err(PoolError::Unavailable(format!(
                    "{name} has only older copies of its devices: {} were last written before \
                     the pool's txg {}, and the pool does not record them as missing; give \
                     import the current devices",
                    what.join(", "),
                    pool_txg.0
                )));
            }
        }
        for b in stale {
            b.leaf.dtl_add_range(b.from, b.to);
            b.leaf.note(
                "stale",
                None,
                format!(
                    "{} is an older copy: last written in txg {}, the pool is at txg {}; \
                     resilver needed",
                    b.path,
                    b.from.0 - 1,
                    pool_txg.0
                ),
            );
        }
        Ok(())
    }

    /// Drop error-log entries of blocks that are being rewritten or freed.
    pub(crate) fn forget_errors(&self, obj: u64, off: u64, len: u64) {
        let mut e = lock(&self.errlog);
        if e.is_empty() {
            return;
        }
        let Ok(o) = self.mos_block_size(obj) else {
            return;
        };
        let first = off / o;
        let last = (off + len).div_ceil(o);
        let partial_head = !off.is_multiple_of(o);
        let partial_tail = !(off + len).is_multiple_of(o);
        e.retain(|&(ob, b)| {
            ob != obj
                || b < first
                || b >= last
                || (b == first && partial_head)
                || (b + 1 == last && partial_tail)
        });
    }

    fn mos_block_size(&self, obj: u64) -> Result<u64> {
        self.mos
            .loaded_block_size(obj)
            .ok_or_else(|| PoolError::NotFound(format!("object {obj}")))
    }

    /// Device checks, dirty time logs, state changes and the health blob, before txg `txg` is written.
    pub(crate) fn health_before_commit(&mut self, txg: Txg) -> Result<()> {
        let tops = self.tree.tops.clone();
        for t in &tops {
            for c in &t.children {
                c.check_device();
                // A missed write belongs to the txg committed last (written during its commit)
                // or to this one (its data blocks are written before the commit). Leaves of any
                // kind of vdev keep the log: only a mirror child can be resilvered from it, but an
                // open compares every device that is behind with it (`check_behind`).
                if c.missed.swap(false, Ordering::Relaxed) {
                    if txg.0 > 1 {
                        c.dtl_add(Txg(txg.0 - 1));
                    }
                    c.dtl_add(txg);
                }
                if !c.state().usable() {
                    c.dtl_add(txg);
                }
            }
        }
        // State changes made by the tree (faulted leaves) belong in the configuration.
        for (_, lv) in self.tree.leaves() {
            let lc = lock(&lv.config).clone();
            if let Some((ti, ci)) = self.config.find_leaf(lv.guid) {
                if self.config.tops[ti].children[ci].flags != lc.flags {
                    self.config.tops[ti].children[ci].flags = lc.flags;
                    self.config_dirty = true;
                }
            }
        }
        self.tree.events.take_new();
        let h = self.health();
        let b = blob_opts()
            .serialize(&h)
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        if b != self.health_written {
            let id = match self.dir.get(HEALTH) {
                Some(&id) => id,
                None => {
                    let vdevs = self.tree.tops.clone();
                    let id = self
                        .mos
                        .create_object(&vdevs, ObjType::Bytes, 14, MOS_COPIES)?;
                    self.dir.insert(HEALTH.to_string(), id);
                    self.dir_dirty = true;
                    id
                }
            };
            write_blob(self, id, &b)?;
            self.health_written = b;
        }
        let u: BTreeMap<u64, u64> = self
            .tree
            .leaves()
            .map(|(_, lv)| (lv.guid.0, lv.verify_below.load(Ordering::Relaxed)))
            .filter(|&(_, v)| v > 0)
            .collect();
        let b = blob_opts()
            .serialize(&u)
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        // Written once there is something to say, and on every change after.
        if b != self.unproven_written && (!u.is_empty() || self.dir.contains_key(UNPROVEN)) {
            self.write_named_blob(UNPROVEN, &b)?;
            self.unproven_written = b;
        }
        Ok(())
    }
}

/// A location of one copy of a block on a leaf (for targeted fault injection).
#[derive(Clone, Debug)]
pub struct BlockCopy {
    /// Which DVA of the block (0..3).
    pub dva: usize,
    pub leaf: String,
    pub offset: u64,
    pub len: u64,
}

impl Pool {
    /// The leaf named `name`: its full path, its last path component (as status shows it) or its guid.
    pub(crate) fn find_leaf(
        &self,
        inner: &Inner,
        name: &str,
    ) -> Result<(Arc<TopVdev>, Arc<LeafVdev>)> {
        let mut found = None;
        for (t, lv) in inner.tree.leaves() {
            let path = lv.path();
            let base = crate::pool::leaf_name(&path);
            let abs = std::path::absolute(Path::new(name))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            if path == name || base == name || lv.guid.0.to_string() == name || path == abs {
                if found.is_some() {
                    return Err(PoolError::Invalid(format!(
                        "'{name}' matches more than one leaf; give the full path"
                    )));
                }
                found = Some((t.clone(), lv.clone()));
            }
        }
        found.ok_or_else(|| PoolError::NotFound(format!("no such device in pool: '{name}'")))
    }

    /// Take a leaf offline: persistently, or until the pool is closed (`temporary`).
    pub fn offline(&self, name: &str, temporary: bool) -> Result<()> {
        let mut g = self.lock();
        g.check_writable()?;
        let (t, lv) = self.find_leaf(&g, name)?;
        // Another child must hold everything (a usable one with nothing in its dirty time log), as
        // for detach: a sibling still being resilvered does not.
        let others = t
            .children
            .iter()
            .any(|c| c.guid != lv.guid && c.state().usable() && lock(&c.dtl).is_empty());
        if t.kind != TopKind::Mirror || !others {
            let resilvering = t
                .children
                .iter()
                .any(|c| c.guid != lv.guid && c.state().usable());
            return Err(PoolError::Invalid(if resilvering {
                "no valid replicas (the other devices do not hold all its data yet: wait for the \
                 resilver)"
                    .into()
            } else {
                "no valid replicas (it holds the only usable copy of its data)".into()
            }));
        }
        // Remember the file's modification time: an online that finds it changed verifies it.
        *lock(&lv.offline_mtime) = std::fs::metadata(lv.path()).and_then(|m| m.modified()).ok();
        if temporary {
            lv.temp_offline.store(true, Ordering::Relaxed);
        } else {
            lock(&lv.config).flags.offline = true;
        }
        g.tree.events.push(Event {
            time: now(),
            class: "state_change".into(),
            vdev: lv.path(),
            offset: None,
            detail: format!("OFFLINE{}", if temporary { " (temporary)" } else { "" }),
        });
        g.commit(false)
    }

    /// Bring a leaf back: clear offline and faulted state and reopen its device if it was closed.
    /// Returns a note for the user (e.g. that the leaf lacks writes until it is resilvered).
    pub fn online(&self, name: &str) -> Result<Option<String>> {
        let mut g = self.lock();
        g.check_writable()?;
        let (t, lv) = self.find_leaf(&g, name)?;
        let was_usable = lv.state().usable();
        crate::slowio::drain(&lv)?;
        self.reopen_leaf(&g, &lv)?;
        // While the leaf was out, the pool wrote nothing to it, and its dirty time log holds what
        // it missed; but someone else may have written to its file. Unless the file is provably
        // unchanged since the offline (same modification time; a regular file), every block on it
        // is verified by the resilver before it counts as a full copy.
        if !was_usable && t.kind == TopKind::Mirror {
            let then = lock(&lv.offline_mtime).take();
            let meta = std::fs::metadata(lv.path()).ok();
            let unchanged = meta.as_ref().is_some_and(|m| {
                m.file_type().is_file() && then.is_some() && m.modified().ok() == then
            });
            if !unchanged {
                let first = lock(&lv.dtl).first().map_or(g.committed.next(), |r| r.0);
                lv.dtl_add_range(Txg(1), g.committed.next());
                lv.verify_below.store(first.0, Ordering::Relaxed);
                g.tree.events.push(Event {
                    time: now(),
                    class: "config".into(),
                    vdev: lv.path(),
                    offset: None,
                    detail: format!(
                        "changed while out of the pool (or not known unchanged): verifies txgs \
                         1..{}",
                        first.0.saturating_sub(1)
                    ),
                });
            }
        }
        lv.temp_offline.store(false, Ordering::Relaxed);
        {
            let mut c = lock(&lv.config);
            c.flags.offline = false;
            c.flags.faulted = false;
        }
        *lock(&lv.reason) = None;
        g.tree.events.push(Event {
            time: now(),
            class: "state_change".into(),
            vdev: lv.path(),
            offset: None,
            detail: "ONLINE".into(),
        });
        g.commit(false)?;
        let dtl = lock(&lv.dtl).clone();
        Ok((!dtl.is_empty()).then(|| {
            format!(
                "{} lacks the writes of {} txg(s); reads avoid it for those blocks until it is \
                 resilvered",
                lv.path(),
                dtl.iter().map(|(a, b)| b.0 - a.0 + 1).sum::<u64>()
            )
        }))
    }

    /// Reopen a leaf whose device is closed, checking it carries this pool's label for this leaf.
    fn reopen_leaf(&self, g: &Inner, lv: &LeafVdev) -> Result<()> {
        if lv.dev().is_some() {
            return Ok(());
        }
        let path = lv.path();
        let dev = crate::pool::open_leaf_for_pool(Path::new(&path), &path)?;
        let scan = label::scan_leaf(&dev);
        let ok = scan.best_label().is_some_and(|l| {
            l.header.pool_guid == g.config.pool_guid && l.header.leaf_guid == lv.guid
        });
        if !ok {
            return Err(PoolError::Invalid(format!(
                "{path} does not carry this leaf's label (use 'cairn pool replace')"
            )));
        }
        let size = lock(&lv.config).size;
        if dev.size() < size {
            return Err(PoolError::Invalid(format!(
                "{path} is smaller than when it joined the pool"
            )));
        }
        lv.set_dev(Some(Arc::new(dev) as Arc<dyn Leaf>), None);
        Ok(())
    }

    /// Reset error counters (of one leaf or all), bring back faulted leaves whose device works, and
    /// resume a suspended pool (see `Inner::resume`).
    pub fn clear(&self, name: Option<&str>) -> Result<()> {
        let mut g = self.lock();
        if let Some(what) = g.closed {
            return Err(PoolError::Unavailable(format!("the pool has been {what}")));
        }
        let targets: Vec<Arc<LeafVdev>> = match name {
            Some(n) => vec![self.find_leaf(&g, n)?.1],
            None => g.tree.leaves().map(|(_, l)| l.clone()).collect(),
        };
        for lv in targets {
            lv.stats.restore([0; 4]);
            let faulted = lock(&lv.config).flags.faulted;
            if faulted {
                // A leaf faulted as too slow may still have writes in flight.
                crate::slowio::drain(&lv)?;
            }
            if (faulted || lv.dev().is_none()) && self.reopen_leaf(&g, &lv).is_ok() {
                lock(&lv.config).flags.faulted = false;
                *lock(&lv.reason) = None;
            }
        }
        // A suspended pool resumes from its last committed txg, now that its devices are back.
        if g.suspended.is_some() {
            g.resume()?;
        }
        g.commit(false)
    }

    /// Recent events, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.lock().tree.events.all()
    }

    /// Permanent errors: (object, byte offset of the block, block size).
    pub fn data_errors(&self) -> Vec<(u64, u64, u64)> {
        let g = self.lock();
        let list: Vec<(u64, u64)> = lock(&g.errlog).iter().copied().collect();
        list.into_iter()
            .map(|(o, b)| {
                let bs = g.mos_block_size(o).unwrap_or(0);
                (o, b * bs, bs)
            })
            .collect()
    }

    /// The fault set of a leaf (`cairn inject`), with the leaf's path.
    pub fn leaf_faults(&self, name: &str) -> Result<(String, Arc<FaultSet>)> {
        let g = self.lock();
        let (_, lv) = self.find_leaf(&g, name)?;
        Ok((lv.path(), lv.faults.clone()))
    }

    /// Every leaf's path and fault set.
    pub fn all_leaf_faults(&self) -> Vec<(String, Arc<FaultSet>)> {
        self.lock()
            .tree
            .leaves()
            .map(|(_, l)| (l.path(), l.faults.clone()))
            .collect()
    }

    /// Where the copies of the block holding byte `offset` of object `obj` live on the leaves.
    pub fn block_copies(&self, obj: u64, offset: u64) -> Result<Vec<BlockCopy>> {
        let mut g = self.lock();
        let inner = &mut *g;
        let vdevs = inner.tree.tops.clone();
        let o = inner.mos.obj(&vdevs, obj)?;
        let bs = o.dnode.block_size() as u64;
        let bp = o.block_pointer(&vdevs, offset / bs)?;
        if bp.is_hole() {
            return Err(PoolError::NotFound(format!(
                "offset {offset} of object {obj} is not allocated (write it first)"
            )));
        }
        let mut out = Vec::new();
        for (i, d) in bp.dvas.iter().enumerate().filter(|(_, d)| !d.is_empty()) {
            let Some(t) = vdevs.get(d.vdev as usize) else {
                continue;
            };
            for seg in t.segments(d.offset, bp.psize as usize) {
                let children: Vec<&Arc<LeafVdev>> = match t.kind {
                    TopKind::Mirror => t.children.iter().collect(),
                    _ => vec![&t.children[seg.child]],
                };
                for c in children {
                    out.push(BlockCopy {
                        dva: i,
                        leaf: c.path(),
                        offset: seg.leaf_off,
                        len: seg.len as u64,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// Does the dirty time log `dtl` (inclusive ranges, in any order) hold every txg of `[from, to]`?
fn covers(dtl: &[(Txg, Txg)], from: Txg, to: Txg) -> bool {
    let mut t = from.0;
    while t <= to.0 {
        match dtl.iter().find(|(a, b)| a.0 <= t && t <= b.0) {
            Some((_, b)) => t = b.0 + 1,
            None => return false,
        }
    }
    true
}
