//! The runtime vdev tree: root -> top-level vdevs -> leaves, and the routing of block I/O through it.
//!
//! A top-level vdev exposes a flat address space [0, asize). Single and mirror vdevs map offset `o` to
//! `DATA_START + o` on each leaf; a stripe maps chunk `c = o / chunk` to child `c % n` at
//! `DATA_START + (c / n) * chunk + o % chunk`.
//!
//! Writes to a mirror go to every usable child and succeed when at least one child took them. Reads go to
//! one child, chosen by [`TopVdev::read_order`]; every read is verified by the caller's closure (the block
//! checksum from the parent pointer), and on an error or a mismatch the next child is tried. Once a good
//! copy is found, children that returned an error or bad data are rewritten with it (self-heal); a child
//! that returned good data is never rewritten.
//!
//! Invariants: nothing here interprets block contents; bounds are checked before any leaf I/O; per-leaf
//! error counters only grow until `clear`.

use crate::config::{LeafConfig, PoolConfig, TopKind};
use crate::error::{Result, VdevError};
use crate::label::{self, Uberblock, DATA_START};
use crate::leaf::Leaf;
use crate::units::Guid;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Device states, computed bottom-up as zpool does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VdevState {
    Online,
    Degraded,
    Faulted,
    Offline,
    Unavail,
    Removed,
}

impl VdevState {
    pub fn as_str(self) -> &'static str {
        match self {
            VdevState::Online => "ONLINE",
            VdevState::Degraded => "DEGRADED",
            VdevState::Faulted => "FAULTED",
            VdevState::Offline => "OFFLINE",
            VdevState::Unavail => "UNAVAIL",
            VdevState::Removed => "REMOVED",
        }
    }

    /// Can I/O be sent to a vdev in this state?
    pub fn usable(self) -> bool {
        matches!(self, VdevState::Online | VdevState::Degraded)
    }
}

/// Per-leaf counters, shown by `status`.
#[derive(Debug, Default)]
pub struct LeafStats {
    pub read_errors: AtomicU64,
    pub write_errors: AtomicU64,
    pub cksum_errors: AtomicU64,
    pub repaired_bytes: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
}

/// A leaf in the running tree. `dev` is `None` when the leaf could not be opened at import.
pub struct LeafVdev {
    pub guid: Guid,
    pub config: Mutex<LeafConfig>,
    dev: Mutex<Option<Arc<dyn Leaf>>>,
    /// Why the leaf is not usable, for status ("cannot open", ...).
    pub reason: Mutex<Option<String>>,
    pub stats: LeafStats,
}

impl LeafVdev {
    pub fn new(config: LeafConfig, dev: Option<Arc<dyn Leaf>>, reason: Option<String>) -> LeafVdev {
        LeafVdev {
            guid: config.guid,
            config: Mutex::new(config),
            dev: Mutex::new(dev),
            reason: Mutex::new(reason),
            stats: LeafStats::default(),
        }
    }

    /// The open device, if any.
    pub fn dev(&self) -> Option<Arc<dyn Leaf>> {
        lock(&self.dev).clone()
    }

    /// Replace the device (None closes it, e.g. when it vanished).
    pub fn set_dev(&self, dev: Option<Arc<dyn Leaf>>, reason: Option<String>) {
        *lock(&self.dev) = dev;
        *lock(&self.reason) = reason;
    }

    pub fn state(&self) -> VdevState {
        let c = lock(&self.config);
        if c.flags.offline {
            VdevState::Offline
        } else if c.flags.faulted {
            VdevState::Faulted
        } else if lock(&self.dev).is_none() {
            VdevState::Unavail
        } else {
            VdevState::Online
        }
    }

    /// The device, if the leaf is in a state that takes I/O.
    fn usable_dev(&self) -> Option<Arc<dyn Leaf>> {
        if self.state().usable() {
            self.dev()
        } else {
            None
        }
    }

    pub fn path(&self) -> String {
        lock(&self.config).identity.path.clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A top-level vdev.
pub struct TopVdev {
    pub id: u32,
    pub guid: Guid,
    pub kind: TopKind,
    pub asize: u64,
    pub children: Vec<Arc<LeafVdev>>,
}

/// One piece of a top-level I/O on one child.
struct Segment {
    child: usize,
    leaf_off: u64,
    buf_off: usize,
    len: usize,
}

impl TopVdev {
    /// The allocatable size of a top-level vdev of this kind over leaves of these sizes.
    pub fn compute_asize(kind: TopKind, leaf_sizes: &[u64]) -> u64 {
        let min = leaf_sizes
            .iter()
            .map(|&s| label::data_size(s))
            .min()
            .unwrap_or(0);
        match kind {
            TopKind::Single | TopKind::Mirror => min / crate::SECTOR * crate::SECTOR,
            TopKind::Stripe { chunk } => min / chunk * chunk * leaf_sizes.len() as u64,
        }
    }

    pub fn state(&self) -> VdevState {
        let states: Vec<VdevState> = self.children.iter().map(|c| c.state()).collect();
        let usable = states.iter().filter(|s| s.usable()).count();
        match self.kind {
            TopKind::Single => states[0],
            TopKind::Mirror => {
                if usable == 0 {
                    VdevState::Unavail
                } else if usable < states.len() || states.iter().any(|s| *s != VdevState::Online) {
                    VdevState::Degraded
                } else {
                    VdevState::Online
                }
            }
            TopKind::Stripe { .. } => {
                if usable < states.len() {
                    VdevState::Unavail
                } else {
                    VdevState::Online
                }
            }
        }
    }

    fn check_bounds(&self, off: u64, len: usize) -> Result<()> {
        if len == 0 || off.checked_add(len as u64).is_none_or(|e| e > self.asize) {
            return Err(VdevError::Invalid {
                path: format!("vdev {}", self.id),
                reason: format!(
                    "I/O of {len} bytes at offset {off} is outside the vdev (asize {})",
                    self.asize
                ),
            });
        }
        Ok(())
    }

    fn segments(&self, off: u64, len: usize) -> Vec<Segment> {
        match self.kind {
            TopKind::Single | TopKind::Mirror => vec![Segment {
                child: 0,
                leaf_off: DATA_START + off,
                buf_off: 0,
                len,
            }],
            TopKind::Stripe { chunk } => {
                let n = self.children.len() as u64;
                let mut v = Vec::new();
                let mut pos = 0usize;
                while pos < len {
                    let o = off + pos as u64;
                    let c = o / chunk;
                    let within = o % chunk;
                    let take = ((chunk - within) as usize).min(len - pos);
                    v.push(Segment {
                        child: (c % n) as usize,
                        leaf_off: DATA_START + (c / n) * chunk + within,
                        buf_off: pos,
                        len: take,
                    });
                    pos += take;
                }
                v
            }
        }
    }

    /// Write `data` at `off`. A mirror succeeds if at least one child took the write.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        self.check_bounds(off, data.len())?;
        match self.kind {
            TopKind::Mirror => {
                let mut ok = 0;
                let mut last_err = None;
                for c in &self.children {
                    let Some(dev) = c.usable_dev() else { continue };
                    c.stats.writes.fetch_add(1, Ordering::Relaxed);
                    match dev.write_at(data, DATA_START + off) {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            c.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                            last_err =
                                Some(VdevError::io(dev.path(), "write", DATA_START + off, e));
                        }
                    }
                }
                if ok > 0 {
                    Ok(())
                } else {
                    Err(last_err.unwrap_or_else(|| self.no_replicas("write")))
                }
            }
            TopKind::Single | TopKind::Stripe { .. } => {
                for s in self.segments(off, data.len()) {
                    let c = &self.children[s.child];
                    let dev = c.usable_dev().ok_or_else(|| self.no_replicas("write"))?;
                    c.stats.writes.fetch_add(1, Ordering::Relaxed);
                    dev.write_at(&data[s.buf_off..s.buf_off + s.len], s.leaf_off)
                        .map_err(|e| {
                            c.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                            VdevError::io(dev.path(), "write", s.leaf_off, e)
                        })?;
                }
                Ok(())
            }
        }
    }

    fn no_replicas(&self, op: &str) -> VdevError {
        VdevError::Invalid {
            path: format!("vdev {}", self.id),
            reason: format!("cannot {op}: insufficient replicas"),
        }
    }

    /// The order in which mirror children are tried for a read at `off`: usable children first,
    /// rotating by 2 MiB region so that reads spread over the children with locality kept.
    pub fn read_order(&self, off: u64) -> Vec<usize> {
        let n = self.children.len();
        let start = ((off >> 21) % n as u64) as usize;
        (0..n).map(|i| (start + i) % n).collect()
    }

    /// Read `buf.len()` bytes at `off`, accepting only data for which `verify` returns true.
    pub fn read(&self, off: u64, buf: &mut [u8], verify: &dyn Fn(&[u8]) -> bool) -> Result<()> {
        self.check_bounds(off, buf.len())?;
        match self.kind {
            TopKind::Mirror => self.read_mirror(off, buf, verify),
            TopKind::Single | TopKind::Stripe { .. } => {
                for s in self.segments(off, buf.len()) {
                    let c = &self.children[s.child];
                    let dev = c.usable_dev().ok_or_else(|| self.no_replicas("read"))?;
                    c.stats.reads.fetch_add(1, Ordering::Relaxed);
                    dev.read_at(&mut buf[s.buf_off..s.buf_off + s.len], s.leaf_off)
                        .map_err(|e| {
                            c.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                            VdevError::io(dev.path(), "read", s.leaf_off, e)
                        })?;
                }
                if verify(buf) {
                    Ok(())
                } else {
                    // Without redundancy the error belongs to the leaf (for a stripe, to every child
                    // the block touched).
                    for s in self.segments(off, buf.len()) {
                        self.children[s.child]
                            .stats
                            .cksum_errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Err(VdevError::corrupt(
                        &self.children[0].path(),
                        "block",
                        DATA_START + off,
                        "checksum mismatch",
                    ))
                }
            }
        }
    }

    fn read_mirror(&self, off: u64, buf: &mut [u8], verify: &dyn Fn(&[u8]) -> bool) -> Result<()> {
        let leaf_off = DATA_START + off;
        let mut bad: Vec<usize> = Vec::new();
        let mut last_err: Option<VdevError> = None;
        let mut good = false;
        for ci in self.read_order(off) {
            let c = &self.children[ci];
            let Some(dev) = c.usable_dev() else { continue };
            c.stats.reads.fetch_add(1, Ordering::Relaxed);
            match dev.read_at(buf, leaf_off) {
                Err(e) => {
                    c.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    last_err = Some(VdevError::io(dev.path(), "read", leaf_off, e));
                    bad.push(ci);
                }
                Ok(()) if verify(buf) => {
                    good = true;
                    break;
                }
                Ok(()) => {
                    c.stats.cksum_errors.fetch_add(1, Ordering::Relaxed);
                    last_err = Some(VdevError::corrupt(
                        dev.path(),
                        "block",
                        leaf_off,
                        "checksum mismatch",
                    ));
                    bad.push(ci);
                }
            }
        }
        if !good {
            return Err(last_err.unwrap_or_else(|| self.no_replicas("read")));
        }
        // Self-heal: rewrite the copies that failed, with the verified data.
        for ci in bad {
            let c = &self.children[ci];
            if let Some(dev) = c.usable_dev() {
                if dev.write_at(buf, leaf_off).is_ok() {
                    c.stats
                        .repaired_bytes
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                } else {
                    c.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Read the range from every usable mirror child (or once, for other kinds) without verification:
    /// for self-describing structures whose newest copy wins (allocation map pages), where a stale child
    /// must not be mistaken for the truth.
    pub fn read_copies(&self, off: u64, len: usize) -> Vec<Vec<u8>> {
        if self.check_bounds(off, len).is_err() {
            return Vec::new();
        }
        match self.kind {
            TopKind::Mirror => self
                .children
                .iter()
                .filter_map(|c| {
                    let dev = c.usable_dev()?;
                    let mut b = vec![0u8; len];
                    c.stats.reads.fetch_add(1, Ordering::Relaxed);
                    match dev.read_at(&mut b, DATA_START + off) {
                        Ok(()) => Some(b),
                        Err(_) => {
                            c.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                            None
                        }
                    }
                })
                .collect(),
            _ => {
                let mut b = vec![0u8; len];
                match self.read(off, &mut b, &|_| true) {
                    Ok(()) => vec![b],
                    Err(_) => Vec::new(),
                }
            }
        }
    }

    /// Flush every usable child. A mirror needs one child to succeed; others need all.
    pub fn flush(&self) -> Result<()> {
        let mut ok = 0;
        let mut err = None;
        for c in &self.children {
            let Some(dev) = c.usable_dev() else { continue };
            match dev.flush() {
                Ok(()) => ok += 1,
                Err(e) => {
                    c.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    err = Some(VdevError::io(dev.path(), "flush", 0, e));
                }
            }
        }
        let need = match self.kind {
            TopKind::Mirror => 1,
            _ => self.children.len(),
        };
        if ok >= need {
            Ok(())
        } else {
            Err(err.unwrap_or_else(|| self.no_replicas("flush")))
        }
    }

    /// Release a range (advisory; errors are ignored).
    pub fn discard(&self, off: u64, len: u64) {
        if self
            .check_bounds(off, len.min(usize::MAX as u64) as usize)
            .is_err()
        {
            return;
        }
        match self.kind {
            TopKind::Single | TopKind::Mirror => {
                for c in &self.children {
                    if let Some(dev) = c.usable_dev() {
                        let _ = dev.discard(DATA_START + off, len);
                    }
                }
            }
            TopKind::Stripe { .. } => {
                for s in self.segments(off, len as usize) {
                    if let Some(dev) = self.children[s.child].usable_dev() {
                        let _ = dev.discard(s.leaf_off, s.len as u64);
                    }
                }
            }
        }
    }
}

/// The root of the tree.
pub struct VdevTree {
    pub tops: Vec<Arc<TopVdev>>,
}

impl VdevTree {
    /// Build the runtime tree from a configuration and the devices found for each leaf GUID.
    pub fn build(
        config: &PoolConfig,
        mut open: impl FnMut(&LeafConfig) -> (Option<Arc<dyn Leaf>>, Option<String>),
    ) -> VdevTree {
        let tops = config
            .tops
            .iter()
            .map(|t| {
                let children = t
                    .children
                    .iter()
                    .map(|lc| {
                        let (dev, reason) = open(lc);
                        Arc::new(LeafVdev::new(lc.clone(), dev, reason))
                    })
                    .collect();
                Arc::new(TopVdev {
                    id: t.id,
                    guid: t.guid,
                    kind: t.kind,
                    asize: t.asize,
                    children,
                })
            })
            .collect();
        VdevTree { tops }
    }

    pub fn leaves(&self) -> impl Iterator<Item = (&Arc<TopVdev>, &Arc<LeafVdev>)> {
        self.tops
            .iter()
            .flat_map(|t| t.children.iter().map(move |c| (t, c)))
    }

    pub fn state(&self) -> VdevState {
        let mut st = VdevState::Online;
        for t in &self.tops {
            match t.state() {
                VdevState::Online => {}
                VdevState::Degraded => st = VdevState::Degraded,
                _ => return VdevState::Unavail,
            }
        }
        st
    }

    pub fn flush_all(&self) -> Result<()> {
        for t in &self.tops {
            t.flush()?;
        }
        Ok(())
    }

    /// Commit a txg's labels: with a new configuration, even labels, flush, uberblocks, flush, odd
    /// labels, flush; otherwise just the uberblocks and a flush. Succeeds if at least one leaf both took
    /// the uberblock and flushed it (import takes the newest uberblock found on any leaf).
    pub fn sync_labels(&self, config: Option<&PoolConfig>, ub: &Uberblock) -> Result<()> {
        let encoded = match config {
            Some(c) => Some(
                label::encode_config(c).map_err(|reason| VdevError::Invalid {
                    path: "pool config".into(),
                    reason,
                })?,
            ),
            None => None,
        };
        type Target = (Guid, Guid, Arc<dyn Leaf>, Arc<LeafVdev>);
        let leaves: Vec<Target> = self
            .leaves()
            .filter_map(|(t, c)| c.usable_dev().map(|d| (t.guid, c.guid, d, c.clone())))
            .collect();
        // Flush every leaf; returns which ones succeeded.
        let flush_all = |what: &'static str| -> Vec<bool> {
            leaves
                .iter()
                .map(|(_, _, d, lv)| match d.flush() {
                    Ok(()) => true,
                    Err(e) => {
                        lv.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("{}: flush after {what} failed: {e}", d.path());
                        false
                    }
                })
                .collect()
        };
        let write_labels = |idxs: [usize; 2]| {
            if let (Some(c), Some(enc)) = (config, encoded.as_ref()) {
                for (top, guid, d, lv) in &leaves {
                    for i in idxs {
                        if let Err(e) = label::write_label(d.as_ref(), i, c, enc, *guid, *top) {
                            lv.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("{e}");
                        }
                    }
                }
            }
        };
        if config.is_some() {
            write_labels([0, 2]);
            flush_all("even labels");
        }
        let wrote: Vec<bool> = leaves
            .iter()
            .map(|(_, _, d, lv)| {
                let mut any = false;
                for i in 0..4 {
                    match label::write_uberblock(d.as_ref(), i, ub) {
                        Ok(()) => any = true,
                        Err(e) => {
                            lv.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("{e}");
                        }
                    }
                }
                any
            })
            .collect();
        let flushed = flush_all("uberblocks");
        if !wrote.iter().zip(&flushed).any(|(w, f)| *w && *f) {
            return Err(VdevError::Invalid {
                path: "pool".into(),
                reason: format!("txg {} could not be written to any leaf", ub.txg),
            });
        }
        if config.is_some() {
            write_labels([1, 3]);
            flush_all("odd labels");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LeafFlags;
    use crate::identity::LeafIdentity;
    use crate::testleaf::MemLeaf;
    use crate::units::Txg;

    fn leafcfg(g: u64) -> LeafConfig {
        LeafConfig {
            guid: Guid(g),
            identity: LeafIdentity {
                path: format!("/l{g}"),
                ..Default::default()
            },
            size: 64 << 20,
            create_txg: Txg(1),
            flags: LeafFlags::default(),
        }
    }

    fn top(kind: TopKind, n: usize) -> (TopVdev, Vec<Arc<MemLeaf>>) {
        let mems: Vec<Arc<MemLeaf>> = (0..n)
            .map(|i| Arc::new(MemLeaf::new(64 << 20, &format!("/l{i}"))))
            .collect();
        let children = mems
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Arc::new(LeafVdev::new(
                    leafcfg(i as u64 + 1),
                    Some(m.clone() as Arc<dyn Leaf>),
                    None,
                ))
            })
            .collect();
        let asize = TopVdev::compute_asize(kind, &vec![64 << 20; n]);
        (
            TopVdev {
                id: 0,
                guid: Guid(100),
                kind,
                asize,
                children,
            },
            mems,
        )
    }

    #[test]
    fn stripe_interleaves_chunks() {
        let (t, mems) = top(TopKind::Stripe { chunk: 8192 }, 2);
        let data: Vec<u8> = (0..32768u32).map(|i| (i / 8192) as u8 + 1).collect();
        t.write(0, &data).unwrap();
        let mut b = vec![0u8; 8192];
        mems[0].read_at(&mut b, DATA_START).unwrap();
        assert!(b.iter().all(|&x| x == 1));
        mems[1].read_at(&mut b, DATA_START).unwrap();
        assert!(b.iter().all(|&x| x == 2));
        mems[0].read_at(&mut b, DATA_START + 8192).unwrap();
        assert!(b.iter().all(|&x| x == 3));
        let mut r = vec![0u8; 32768];
        t.read(0, &mut r, &|_| true).unwrap();
        assert_eq!(r, data);
    }

    #[test]
    fn mirror_falls_back_and_heals() {
        let (t, mems) = top(TopKind::Mirror, 2);
        let data = vec![7u8; 4096];
        t.write(4096 * 600, &data).unwrap();
        // Corrupt the copy the read order tries first.
        let first = t.read_order(4096 * 600)[0];
        mems[first]
            .write_at(&[0u8; 4096], DATA_START + 4096 * 600)
            .unwrap();
        let want = data.clone();
        let verify = move |b: &[u8]| b == &want[..];
        let mut r = vec![0u8; 4096];
        t.read(4096 * 600, &mut r, &verify).unwrap();
        assert_eq!(r, data);
        assert_eq!(
            t.children[first].stats.cksum_errors.load(Ordering::Relaxed),
            1
        );
        // Healed: the first child now has the good data.
        let mut b = vec![0u8; 4096];
        mems[first]
            .read_at(&mut b, DATA_START + 4096 * 600)
            .unwrap();
        assert_eq!(b, data);
    }

    #[test]
    fn out_of_bounds_is_an_error() {
        let (t, _) = top(TopKind::Single, 1);
        assert!(t.write(t.asize, &[0u8; 4096]).is_err());
        assert!(t.read(u64::MAX - 10, &mut [0u8; 4096], &|_| true).is_err());
    }

    #[test]
    fn mirror_with_one_missing_child_is_degraded() {
        let (t, _) = top(TopKind::Mirror, 2);
        t.children[1].set_dev(None, Some("cannot open".into()));
        assert_eq!(t.state(), VdevState::Degraded);
        t.write(0, &[1u8; 4096]).unwrap();
        t.children[0].set_dev(None, None);
        assert_eq!(t.state(), VdevState::Unavail);
        assert!(t.write(0, &[1u8; 4096]).is_err());
    }
}
