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
use crate::dispatch::{IoQueue, Pending, DEFAULT_SLOW_MS};
use crate::error::{Result, VdevError};
use crate::label::{self, DATA_START};
use crate::leaf::Leaf;
use crate::testleaf::{FaultLeaf, FaultSet};
use crate::units::{lock, now_secs};
use crate::units::{Guid, Txg};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Device states, computed bottom-up as zpool does.
/// Whether a read may leave its data in the leaves' cache (the page cache for file leaves).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadHow {
    /// An application read: the data may well be read again, keep it (see `Leaf::read_at`).
    Cached,
    /// The data is read once: the old contents of a block about to be rewritten (copy-on-write moves
    /// it, so a cached copy would only push out useful pages, and the kernel's readahead around
    /// such scattered reads read three times the bytes asked for), or a scan.
    Uncached,
}

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

/// Per-leaf counters, shown by `status` and `iostat`, and the figures read selection uses.
#[derive(Debug, Default)]
pub struct LeafStats {
    pub read_errors: AtomicU64,
    pub write_errors: AtomicU64,
    pub cksum_errors: AtomicU64,
    pub repaired_bytes: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Reads issued and not yet completed.
    pub pending: AtomicU64,
    /// End offset of the last read (locality).
    last_end: AtomicU64,
    /// Moving average of read latency, in nanoseconds (0 = no sample yet).
    pub lat_ewma_ns: AtomicU64,
    /// When the last latency sample was taken (ms since the tree was built).
    last_sample_ms: AtomicU64,
    /// Reads that passed this child over as slow since its last probe.
    passed_over: AtomicU64,
    /// Moving average of write latency, in nanoseconds (0 = no sample yet).
    pub wlat_ewma_ns: AtomicU64,
    /// Reads and writes that took longer than [`SLOW_IO`] (`status -s`).
    pub slow_ios: AtomicU64,
}

/// An I/O slower than this counts as slow (`status -s`), as zfs's `zio_slow_io_ms` (30 s).
pub const SLOW_IO: std::time::Duration = std::time::Duration::from_secs(30);

impl LeafStats {
    /// (read, write, checksum errors, repaired bytes): what is kept across export/import.
    pub fn persistent(&self) -> [u64; 4] {
        [
            self.read_errors.load(Ordering::Relaxed),
            self.write_errors.load(Ordering::Relaxed),
            self.cksum_errors.load(Ordering::Relaxed),
            self.repaired_bytes.load(Ordering::Relaxed),
        ]
    }

    pub fn restore(&self, v: [u64; 4]) {
        self.read_errors.store(v[0], Ordering::Relaxed);
        self.write_errors.store(v[1], Ordering::Relaxed);
        self.cksum_errors.store(v[2], Ordering::Relaxed);
        self.repaired_bytes.store(v[3], Ordering::Relaxed);
    }
}

/// I/O errors within this window count toward faulting a leaf.
const ERROR_WINDOW: Duration = Duration::from_secs(60);
/// I/O errors within the window that fault a leaf (when it is not the last replica).
const ERROR_LIMIT: usize = 10;

/// A leaf in the running tree. Its device is always wrapped in a [`FaultLeaf`] obeying `faults`, so
/// faults can be injected into a running pool. `dev` is `None` when the leaf is not open.
pub struct LeafVdev {
    pub guid: Guid,
    pub config: Mutex<LeafConfig>,
    dev: Mutex<Option<Arc<dyn Leaf>>>,
    /// Why the leaf is not usable, for status ("cannot open", ...).
    pub reason: Mutex<Option<String>>,
    pub stats: LeafStats,
    pub faults: Arc<FaultSet>,
    /// `pool offline -t`: offline until the pool is closed (not recorded in the labels).
    pub temp_offline: AtomicBool,
    /// Txg ranges (inclusive) whose writes this leaf lacks: the dirty time log.
    pub dtl: Mutex<Vec<(Txg, Txg)>>,
    /// A write to this leaf was skipped or failed in the txg being written.
    pub missed: AtomicBool,
    /// Blocks born before this txg should be on the leaf but are unproven (a leaf attached again
    /// after a detach, or brought online after its file changed): they are in the dirty time log
    /// too, so the leaf is no full copy and reads avoid it, but a resilver reads and verifies them
    /// instead of copying, and rewrites only the bad ones. 0: none.
    pub verify_below: AtomicU64,
    /// The leaf file's modification time when it was taken offline (to notice other writers).
    pub offline_mtime: Mutex<Option<std::time::SystemTime>>,
    /// The leaf's own I/O workers (`dispatch.rs`): mirror writes, flushes and label writes.
    pub queue: IoQueue,
    recent_errors: Mutex<VecDeque<Instant>>,
    events: Arc<EventLog>,
    epoch: Instant,
}

impl LeafVdev {
    pub fn new(config: LeafConfig, dev: Option<Arc<dyn Leaf>>, reason: Option<String>) -> LeafVdev {
        LeafVdev::with_events(config, dev, reason, Arc::new(EventLog::default()))
    }

    fn with_events(
        config: LeafConfig,
        dev: Option<Arc<dyn Leaf>>,
        reason: Option<String>,
        events: Arc<EventLog>,
    ) -> LeafVdev {
        let faults = Arc::new(FaultSet::new());
        let dev = dev.map(|d| Arc::new(FaultLeaf::new(d, faults.clone())) as Arc<dyn Leaf>);
        let reason = match reason {
            None if config.flags.faulted => Some("too many errors".to_string()),
            r => r,
        };
        LeafVdev {
            guid: config.guid,
            config: Mutex::new(config),
            dev: Mutex::new(dev),
            reason: Mutex::new(reason),
            stats: LeafStats::default(),
            faults,
            temp_offline: AtomicBool::new(false),
            dtl: Mutex::new(Vec::new()),
            missed: AtomicBool::new(false),
            verify_below: AtomicU64::new(0),
            offline_mtime: Mutex::new(None),
            queue: IoQueue::default(),
            recent_errors: Mutex::new(VecDeque::new()),
            events,
            epoch: Instant::now(),
        }
    }

    /// The open device (fault wrapper included), if any.
    pub fn dev(&self) -> Option<Arc<dyn Leaf>> {
        lock(&self.dev).clone()
    }

    /// Replace the device (None closes it, e.g. when it vanished). A new device is wrapped so it
    /// obeys this leaf's faults.
    pub fn set_dev(&self, dev: Option<Arc<dyn Leaf>>, reason: Option<String>) {
        let dev = dev.map(|d| Arc::new(FaultLeaf::new(d, self.faults.clone())) as Arc<dyn Leaf>);
        *lock(&self.dev) = dev;
        *lock(&self.reason) = reason;
    }

    pub fn state(&self) -> VdevState {
        let c = lock(&self.config);
        if c.flags.offline || self.temp_offline.load(Ordering::Relaxed) {
            VdevState::Offline
        } else if c.flags.faulted {
            VdevState::Faulted
        } else if lock(&self.dev).is_none() {
            match lock(&self.reason).as_deref() {
                Some(r) if r.contains("removed") => VdevState::Removed,
                _ => VdevState::Unavail,
            }
        } else {
            VdevState::Online
        }
    }

    /// The device, if the leaf is in a state that takes I/O.
    pub fn usable_dev(&self) -> Option<Arc<dyn Leaf>> {
        if self.state().usable() {
            self.dev()
        } else {
            None
        }
    }

    pub fn path(&self) -> String {
        lock(&self.config).identity.path.clone()
    }

    /// Does this leaf lack the writes of `txg`?
    pub fn dtl_contains(&self, txg: Txg) -> bool {
        lock(&self.dtl).iter().any(|&(a, b)| a <= txg && txg <= b)
    }

    /// Is this leaf's copy of a block born in `birth` to be verified rather than copied by a
    /// resilver (see [`LeafVdev::verify_below`])?
    pub fn verifying(&self, birth: Txg) -> bool {
        birth.0 < self.verify_below.load(Ordering::Relaxed) && self.dtl_contains(birth)
    }

    /// The dirty time log lost ranges (a resilver or scrub completed): what no longer lies in it
    /// needs no verifying either.
    pub fn dtl_settled(&self) {
        let first = lock(&self.dtl).first().map(|r| r.0 .0);
        let v = self.verify_below.load(Ordering::Relaxed);
        if first.is_none_or(|f| f >= v) {
            self.verify_below.store(0, Ordering::Relaxed);
        }
    }

    /// Does this leaf hold every txg (no dirty time log)?
    pub fn dtl_is_empty(&self) -> bool {
        lock(&self.dtl).is_empty()
    }

    /// Record that this leaf lacks `txg`.
    pub fn dtl_add(&self, txg: Txg) {
        self.dtl_add_range(txg, txg);
    }

    /// Record that this leaf lacks every txg of `[from, to]`.
    pub fn dtl_add_range(&self, from: Txg, to: Txg) {
        if from > to {
            return;
        }
        let mut d = lock(&self.dtl);
        d.push((from, to));
        d.sort_unstable();
        let mut merged: Vec<(Txg, Txg)> = Vec::with_capacity(d.len());
        for &(a, b) in d.iter() {
            match merged.last_mut() {
                Some(last) if a.0 <= last.1 .0.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        *d = merged;
    }

    /// Record an event about this leaf (`pool events`).
    pub fn note(&self, class: &str, offset: Option<u64>, detail: String) {
        self.event(class, offset, detail)
    }

    fn event(&self, class: &str, offset: Option<u64>, detail: String) {
        self.events.push(Event {
            time: now_secs(),
            class: class.to_string(),
            vdev: self.path(),
            offset,
            detail,
        });
    }

    /// Account an I/O error. ENXIO closes the device; repeated errors fault the leaf unless
    /// `last_replica`. Returns true if the leaf's state changed.
    fn io_error(&self, op: &'static str, off: u64, e: &io::Error, last_replica: bool) -> bool {
        let counter = if op == "write" || op == "flush" {
            &self.stats.write_errors
        } else {
            &self.stats.read_errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.event(&format!("{op}_error"), Some(off), e.to_string());
        if e.raw_os_error() == Some(libc::ENXIO) {
            self.set_dev(None, Some("device is gone (ENXIO)".into()));
            self.event("state_change", None, "UNAVAIL: device is gone".into());
            return true;
        }
        let mut recent = lock(&self.recent_errors);
        let now = Instant::now();
        recent.push_back(now);
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > ERROR_WINDOW)
        {
            recent.pop_front();
        }
        if recent.len() >= ERROR_LIMIT && !last_replica {
            recent.clear();
            drop(recent);
            lock(&self.config).flags.faulted = true;
            *lock(&self.reason) = Some("too many errors".into());
            self.event("state_change", None, "FAULTED: too many errors".into());
            return true;
        }
        false
    }

    /// Check that the device is still there; close it with the reason if not. True if it changed.
    pub fn check_device(&self) -> bool {
        let Some(d) = self.dev() else { return false };
        match d.check() {
            Some(reason) => {
                self.set_dev(None, Some(reason.clone()));
                self.event("state_change", None, format!("UNAVAIL: {reason}"));
                true
            }
            None => false,
        }
    }

    fn record_latency(&self, ns: u64) {
        let old = self.stats.lat_ewma_ns.load(Ordering::Relaxed);
        let new = if old == 0 { ns } else { (old * 7 + ns) / 8 };
        self.stats.lat_ewma_ns.store(new.max(1), Ordering::Relaxed);
        self.stats
            .last_sample_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// One read from the device, with the accounting read selection needs.
    fn timed_read(&self, dev: &dyn Leaf, buf: &mut [u8], off: u64, how: ReadHow) -> io::Result<()> {
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        let t = Instant::now();
        let r = match how {
            ReadHow::Cached => dev.read_at(buf, off),
            ReadHow::Uncached => dev.read_at_uncached(buf, off),
        };
        let took = t.elapsed();
        self.record_latency(took.as_nanos() as u64);
        if took > SLOW_IO {
            self.stats.slow_ios.fetch_add(1, Ordering::Relaxed);
        }
        self.stats
            .last_end
            .store(off + buf.len() as u64, Ordering::Relaxed);
        self.stats.pending.fetch_sub(1, Ordering::Relaxed);
        r
    }

    /// A write to this leaf's device, counted in its writes, bytes and write latency (`iostat`).
    pub fn counted_write(&self, dev: &dyn Leaf, data: &[u8], off: u64) -> io::Result<()> {
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .write_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let t = Instant::now();
        let r = dev.write_at(data, off);
        self.note_write_latency(t.elapsed());
        r
    }

    /// How long ago this leaf's counters started (the pool was opened or the leaf attached).
    pub fn counting_for(&self) -> std::time::Duration {
        self.epoch.elapsed()
    }

    /// A write's time: the write latency average and the slow I/O count.
    pub fn note_write_latency(&self, took: std::time::Duration) {
        let ns = took.as_nanos() as u64;
        let old = self.stats.wlat_ewma_ns.load(Ordering::Relaxed);
        let new = if old == 0 { ns } else { (old * 7 + ns) / 8 };
        self.stats.wlat_ewma_ns.store(new.max(1), Ordering::Relaxed);
        if took > SLOW_IO {
            self.stats.slow_ios.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How attractive this child is for a read (lower is better), before latency: its outstanding
    /// reads, in steps of 4 (a child is passed over only when it is clearly busier, so equal children
    /// keep serving their own regions even while reads wait on the device). (No seek penalty: leaves
    /// are files or SSDs, where a fixed child per 2 MiB region spreads sequential streams over both
    /// children and keeps each block read from the same child, so a read after a repair finds the
    /// copy it healed.)
    fn read_score(&self) -> u64 {
        self.stats.pending.load(Ordering::Relaxed) / 4 + 1
    }

    /// Is this child, judged slow, due a probe read: no read of it in flight, and no latency sample
    /// for 2 s or [`PROBE_EVERY`] reads passed it over since its last probe? A child passed over as
    /// slow gets one such read now and then, so that a recovered child is noticed (by time on an
    /// idle pool, by count under load, so that one outlier on a busy host cannot keep a child out
    /// of a long run of reads); only one at a time, so a probe costs one slow read however many
    /// reads wait. Counts the passing over when it is not due.
    fn probe_due(&self) -> bool {
        if self.stats.pending.load(Ordering::Relaxed) != 0 {
            return false;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.stats.last_sample_ms.load(Ordering::Relaxed);
        let by_time = last != 0 && now.saturating_sub(last) > 2000;
        let by_count = self.stats.passed_over.fetch_add(1, Ordering::Relaxed) + 1 >= PROBE_EVERY;
        if by_time || by_count {
            self.stats.passed_over.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Observed read latency (ns), with a 4 ms floor: page-cache hits and fast SSDs all look alike, so
    /// a busy CPU's outliers (a direct read of 1 MiB takes about a millisecond) never make a healthy
    /// child look slow; a slow disk or an injected delay (tens of milliseconds) still stands out.
    fn latency(&self) -> u64 {
        self.stats
            .lat_ewma_ns
            .load(Ordering::Relaxed)
            .max(4_000_000)
    }
}

/// A child judged slow gets a probe read after this many reads passed it over (see
/// `LeafVdev::probe_due`).
const PROBE_EVERY: u64 = 32;

/// Something that happened to a vdev (`pool events`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub time: u64,
    pub class: String,
    pub vdev: String,
    pub offset: Option<u64>,
    pub detail: String,
}

/// A bounded log of recent events, shared by the leaves of a tree.
#[derive(Debug, Default)]
pub struct EventLog {
    ring: Mutex<VecDeque<Event>>,
    /// Events added since the last `take_new`.
    fresh: AtomicBool,
}

/// Events kept per pool.
pub const EVENTS_KEPT: usize = 1000;

impl EventLog {
    pub fn push(&self, e: Event) {
        let mut r = lock(&self.ring);
        if r.len() >= EVENTS_KEPT {
            r.pop_front();
        }
        r.push_back(e);
        self.fresh.store(true, Ordering::Relaxed);
    }
    pub fn all(&self) -> Vec<Event> {
        lock(&self.ring).iter().cloned().collect()
    }
    pub fn restore(&self, v: Vec<Event>) {
        let mut r = lock(&self.ring);
        r.clear();
        r.extend(v.into_iter().rev().take(EVENTS_KEPT).rev());
    }
    /// Have events arrived since the last `take_new`?
    pub fn has_new(&self) -> bool {
        self.fresh.load(Ordering::Relaxed)
    }

    /// True once after new events arrived (the pool then persists the log).
    pub fn take_new(&self) -> bool {
        self.fresh.swap(false, Ordering::Relaxed)
    }
}

/// A top-level vdev.
pub struct TopVdev {
    pub id: u32,
    pub guid: Guid,
    pub kind: TopKind,
    pub asize: u64,
    pub children: Vec<Arc<LeafVdev>>,
    /// The slow-I/O deadline in milliseconds (0: none; the pool sets it on every top-level vdev
    /// from its `slow_io_deadline` property; see `dispatch.rs`).
    pub slow_ms: AtomicU64,
}

/// What a leaf's worker answers for one write or flush: `Err(None)` when the leaf was no longer
/// usable by the time its turn came (nothing was done).
pub type JobResult = std::result::Result<(), Option<io::Error>>;

/// One piece of a top-level I/O on one child.
pub struct Segment {
    pub child: usize,
    pub leaf_off: u64,
    pub buf_off: usize,
    pub len: usize,
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

    /// Where the bytes [off, off+len) of this vdev live: one segment per child piece (for a mirror,
    /// the piece is on every child; `child` is 0).
    pub fn segments(&self, off: u64, len: usize) -> Vec<Segment> {
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

    /// Is child `ci` the only usable child that can serve this vdev's data?
    fn last_replica(&self, ci: usize) -> bool {
        match self.kind {
            TopKind::Mirror => !self
                .children
                .iter()
                .enumerate()
                .any(|(i, c)| i != ci && c.state().usable()),
            _ => true,
        }
    }

    /// Rewrite a copy of a block that failed to read with the verified data from another copy (another
    /// DVA of the block): like [`TopVdev::write`], and counted as repaired bytes with a repair event on
    /// the leaves written.
    pub fn heal(&self, off: u64, data: &[u8]) -> Result<()> {
        self.write(off, data)?;
        let written: Vec<(usize, u64, usize)> = match self.kind {
            TopKind::Mirror => (0..self.children.len())
                .filter(|&ci| self.children[ci].usable_dev().is_some())
                .map(|ci| (ci, DATA_START + off, data.len()))
                .collect(),
            _ => self
                .segments(off, data.len())
                .iter()
                .map(|s| (s.child, s.leaf_off, s.len))
                .collect(),
        };
        for (ci, leaf_off, len) in written {
            let c = &self.children[ci];
            c.stats
                .repaired_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
            c.event(
                "repair",
                Some(leaf_off),
                format!("{len} bytes rewritten from another copy"),
            );
        }
        Ok(())
    }

    /// Write `data` at `off`. A mirror succeeds if at least one child took the write; children that
    /// were skipped or failed are marked as having missed this txg.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        self.check_bounds(off, data.len())?;
        match self.kind {
            TopKind::Mirror => self.write_mirror(off, data),
            TopKind::Single | TopKind::Stripe { .. } => {
                for s in self.segments(off, data.len()) {
                    let c = &self.children[s.child];
                    let dev = c.usable_dev().ok_or_else(|| self.no_replicas("write"))?;
                    c.counted_write(
                        dev.as_ref(),
                        &data[s.buf_off..s.buf_off + s.len],
                        s.leaf_off,
                    )
                    .map_err(|e| {
                        c.io_error("write", s.leaf_off, &e, true);
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

    /// The order in which mirror children are tried for a read at `off` of a block born in `birth`:
    /// usable children that hold the txg, best score first (ties rotate by 2 MiB region, which
    /// spreads reads and keeps locality), then children whose dirty time log says they lack it.
    pub fn read_order(&self, off: u64, birth: Txg) -> Vec<usize> {
        let n = self.children.len();
        let start = ((off >> 21) % n as u64) as usize;
        let mut fresh: Vec<(u64, usize, usize)> = Vec::new();
        let mut stale: Vec<usize> = Vec::new();
        let mut cands: Vec<(usize, usize, u64, u64)> = Vec::new();
        for i in 0..n {
            let ci = (start + i) % n;
            let c = &self.children[ci];
            if !c.state().usable() {
                continue;
            }
            if birth.0 != 0 && c.dtl_contains(birth) {
                stale.push(ci);
            } else {
                cands.push((i, ci, c.read_score(), c.latency()));
            }
        }
        // Latency counts only when a child is clearly slower (4x) than the fastest: equal devices
        // are then chosen by load and region alone, which keeps reads deterministic and spread. A
        // slow child due a probe goes first, once.
        let fastest = cands.iter().map(|c| c.3).min().unwrap_or(1).max(1);
        for (i, ci, score, lat) in cands {
            let key = if lat <= 4 * fastest {
                score
            } else if self.children[ci].probe_due() {
                0
            } else {
                score * (lat / fastest)
            };
            fresh.push((key, i, ci));
        }
        fresh.sort_unstable();
        fresh
            .into_iter()
            .map(|(_, _, ci)| ci)
            .chain(stale)
            .collect()
    }

    /// Does some usable child hold the writes of `txg` (not in its dirty time log)?
    pub fn holds(&self, txg: Txg) -> bool {
        self.children
            .iter()
            .any(|c| c.state().usable() && (txg.0 == 0 || !c.dtl_contains(txg)))
    }

    /// Read `buf.len()` bytes at `off` of a block born in txg `birth` (0 if unknown), accepting only
    /// data for which `verify` returns true.
    pub fn read(
        &self,
        off: u64,
        buf: &mut [u8],
        birth: Txg,
        verify: &dyn Fn(&[u8]) -> bool,
    ) -> Result<()> {
        self.read_how(off, buf, birth, verify, ReadHow::Cached)
    }

    /// [`TopVdev::read`], choosing whether the leaves may keep the data in a cache (see [`ReadHow`]).
    pub fn read_how(
        &self,
        off: u64,
        buf: &mut [u8],
        birth: Txg,
        verify: &dyn Fn(&[u8]) -> bool,
        how: ReadHow,
    ) -> Result<()> {
        self.check_bounds(off, buf.len())?;
        match self.kind {
            TopKind::Mirror => self.read_mirror(off, buf, birth, verify, how),
            TopKind::Single | TopKind::Stripe { .. } => {
                for s in self.segments(off, buf.len()) {
                    let c = &self.children[s.child];
                    let dev = c.usable_dev().ok_or_else(|| self.no_replicas("read"))?;
                    c.timed_read(
                        dev.as_ref(),
                        &mut buf[s.buf_off..s.buf_off + s.len],
                        s.leaf_off,
                        how,
                    )
                    .map_err(|e| {
                        c.io_error("read", s.leaf_off, &e, true);
                        VdevError::io(dev.path(), "read", s.leaf_off, e)
                    })?;
                }
                if verify(buf) {
                    Ok(())
                } else {
                    // Without redundancy the error belongs to every child the block touched.
                    let segs = self.segments(off, buf.len());
                    for s in &segs {
                        let c = &self.children[s.child];
                        c.stats.cksum_errors.fetch_add(1, Ordering::Relaxed);
                        c.event("checksum", Some(s.leaf_off), "checksum mismatch".into());
                    }
                    Err(VdevError::corrupt(
                        &self.children[segs[0].child].path(),
                        "block",
                        segs[0].leaf_off,
                        "checksum mismatch",
                    ))
                }
            }
        }
    }

    fn read_mirror(
        &self,
        off: u64,
        buf: &mut [u8],
        birth: Txg,
        verify: &dyn Fn(&[u8]) -> bool,
        how: ReadHow,
    ) -> Result<()> {
        let leaf_off = DATA_START + off;
        let mut bad: Vec<usize> = Vec::new();
        let mut last_err: Option<VdevError> = None;
        let mut good = false;
        for ci in self.read_order(off, birth) {
            let c = &self.children[ci];
            let Some(dev) = c.usable_dev() else { continue };
            match c.timed_read(dev.as_ref(), buf, leaf_off, how) {
                Err(e) => {
                    c.io_error("read", leaf_off, &e, self.last_replica(ci));
                    last_err = Some(VdevError::io(dev.path(), "read", leaf_off, e));
                    bad.push(ci);
                }
                Ok(()) if verify(buf) => {
                    good = true;
                    break;
                }
                Ok(()) => {
                    c.stats.cksum_errors.fetch_add(1, Ordering::Relaxed);
                    c.event("checksum", Some(leaf_off), "checksum mismatch".into());
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
        // Self-heal: rewrite the copies that failed, with the verified data. A child that returned
        // good data is never rewritten.
        for ci in bad {
            let c = &self.children[ci];
            if let Some(dev) = c.usable_dev() {
                match c.counted_write(dev.as_ref(), buf, leaf_off) {
                    Ok(()) => {
                        c.stats
                            .repaired_bytes
                            .fetch_add(buf.len() as u64, Ordering::Relaxed);
                        c.event(
                            "repair",
                            Some(leaf_off),
                            format!("{} bytes rewritten", buf.len()),
                        );
                    }
                    Err(e) => {
                        c.io_error("write", leaf_off, &e, self.last_replica(ci));
                    }
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
                .enumerate()
                .filter_map(|(ci, c)| {
                    let dev = c.usable_dev()?;
                    let mut b = vec![0u8; len];
                    match c.timed_read(dev.as_ref(), &mut b, DATA_START + off, ReadHow::Cached) {
                        Ok(()) => Some(b),
                        Err(e) => {
                            c.io_error("read", DATA_START + off, &e, self.last_replica(ci));
                            None
                        }
                    }
                })
                .collect(),
            _ => {
                let mut b = vec![0u8; len];
                match self.read(off, &mut b, Txg(0), &|_| true) {
                    Ok(()) => vec![b],
                    Err(_) => Vec::new(),
                }
            }
        }
    }

    /// Flush every usable child, in parallel. A mirror needs one child to succeed; others need all.
    pub fn flush(&self) -> Result<()> {
        let pend = self.submit_flush();
        self.finish_flush(pend)
    }

    /// Hand a flush to every usable child's worker.
    pub fn submit_flush(&self) -> Vec<Option<Pending<JobResult>>> {
        self.children
            .iter()
            .map(|c| {
                let dev = c.usable_dev()?;
                let lv = c.clone();
                Some(c.queue.submit(move || {
                    if !lv.state().usable() {
                        return Err(None);
                    }
                    dev.flush().map_err(Some)
                }))
            })
            .collect()
    }

    /// Wait for the flushes of [`TopVdev::submit_flush`] (a slow mirror child may be left behind,
    /// see `dispatch.rs`).
    pub fn finish_flush(&self, pend: Vec<Option<Pending<JobResult>>>) -> Result<()> {
        let submitted: Vec<bool> = pend.iter().map(Option::is_some).collect();
        let res = self.gather(pend, |r| r.is_ok(), "flush");
        let mut ok = 0;
        let mut err = None;
        for (ci, r) in res.into_iter().enumerate() {
            let c = &self.children[ci];
            match r {
                Some(Ok(())) => ok += 1,
                Some(Err(Some(e))) => {
                    c.missed.store(true, Ordering::Relaxed);
                    c.io_error("flush", 0, &e, self.last_replica(ci));
                    err = Some(VdevError::io(&c.path(), "flush", 0, e));
                }
                Some(Err(None)) => c.missed.store(true, Ordering::Relaxed),
                None if submitted[ci] => c.missed.store(true, Ordering::Relaxed),
                None => {}
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

    /// A mirror write: every usable child's worker writes it, in parallel; succeeds if at least one
    /// child took it. Children that were skipped, failed or were left behind as too slow are marked
    /// as having missed this txg.
    fn write_mirror(&self, off: u64, data: &[u8]) -> Result<()> {
        let leaf_off = DATA_START + off;
        let usable: Vec<usize> = (0..self.children.len())
            .filter(|&ci| {
                let c = &self.children[ci];
                let u = c.usable_dev().is_some();
                if !u {
                    c.missed.store(true, Ordering::Relaxed);
                }
                u
            })
            .collect();
        let mut ok = 0;
        let mut last_err = None;
        let mut account = |ci: usize, r: Option<JobResult>, ok: &mut usize| {
            let c = &self.children[ci];
            match r {
                Some(Ok(())) => *ok += 1,
                Some(Err(Some(e))) => {
                    c.missed.store(true, Ordering::Relaxed);
                    c.io_error("write", leaf_off, &e, self.last_replica(ci));
                    last_err = Some(VdevError::io(&c.path(), "write", leaf_off, e));
                }
                Some(Err(None)) | None => c.missed.store(true, Ordering::Relaxed),
            }
        };
        if let [ci] = usable[..] {
            // One copy: nothing to wait for in parallel, and it is never left behind.
            let c = &self.children[ci];
            let r = match c.usable_dev() {
                Some(dev) => c.counted_write(dev.as_ref(), data, leaf_off).map_err(Some),
                None => Err(None),
            };
            account(ci, Some(r), &mut ok);
        } else if !usable.is_empty() {
            let buf: Arc<[u8]> = Arc::from(data);
            let pend: Vec<Option<Pending<JobResult>>> = self
                .children
                .iter()
                .enumerate()
                .map(|(ci, c)| {
                    if !usable.contains(&ci) {
                        return None;
                    }
                    let dev = c.usable_dev()?;
                    let lv = c.clone();
                    let buf = buf.clone();
                    Some(c.queue.submit(move || {
                        if !lv.state().usable() {
                            return Err(None);
                        }
                        lv.counted_write(dev.as_ref(), &buf, leaf_off).map_err(Some)
                    }))
                })
                .collect();
            let submitted: Vec<bool> = pend.iter().map(Option::is_some).collect();
            let res = self.gather(pend, |r| r.is_ok(), "write");
            for (ci, r) in res.into_iter().enumerate() {
                if submitted[ci] {
                    account(ci, r, &mut ok);
                }
            }
        }
        if ok > 0 {
            Ok(())
        } else {
            Err(last_err.unwrap_or_else(|| self.no_replicas("write")))
        }
    }

    /// Release range `[off, off + len)` of this vdev's space on child `child` only (a manual trim of
    /// one leaf). Returns the bytes handed to the device, or the device's error; 0 if the child is not
    /// usable or the range is outside the vdev.
    pub fn discard_child(&self, child: usize, off: u64, len: u64) -> io::Result<u64> {
        if self
            .check_bounds(off, len.min(usize::MAX as u64) as usize)
            .is_err()
        {
            return Ok(0);
        }
        let Some(c) = self.children.get(child) else {
            return Ok(0);
        };
        let Some(dev) = c.usable_dev() else {
            return Ok(0);
        };
        match self.kind {
            TopKind::Single | TopKind::Mirror => {
                dev.discard(DATA_START + off, len)?;
                Ok(len)
            }
            TopKind::Stripe { .. } => {
                let mut n = 0;
                for s in self.segments(off, len as usize) {
                    if s.child == child {
                        dev.discard(s.leaf_off, s.len as u64)?;
                        n += s.len as u64;
                    }
                }
                Ok(n)
            }
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
    pub events: Arc<EventLog>,
}

impl VdevTree {
    /// Build the runtime tree from a configuration and the devices found for each leaf GUID.
    pub fn build(
        config: &PoolConfig,
        mut open: impl FnMut(&LeafConfig) -> (Option<Arc<dyn Leaf>>, Option<String>),
    ) -> VdevTree {
        let events = Arc::new(EventLog::default());
        let tops = config
            .tops
            .iter()
            .map(|t| {
                let children = t
                    .children
                    .iter()
                    .map(|lc| {
                        let (dev, reason) = open(lc);
                        Arc::new(LeafVdev::with_events(
                            lc.clone(),
                            dev,
                            reason,
                            events.clone(),
                        ))
                    })
                    .collect();
                Arc::new(TopVdev {
                    id: t.id,
                    guid: t.guid,
                    kind: t.kind,
                    asize: t.asize,
                    children,
                    slow_ms: AtomicU64::new(DEFAULT_SLOW_MS),
                })
            })
            .collect();
        VdevTree { tops, events }
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

    /// Set the slow-I/O deadline (milliseconds, 0 = none) of every top-level vdev.
    pub fn set_slow_ms(&self, ms: u64) {
        for t in &self.tops {
            t.slow_ms.store(ms, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::LeafFlags;
    use crate::identity::LeafIdentity;
    use crate::testleaf::MemLeaf;

    pub(crate) fn leafcfg(g: u64) -> LeafConfig {
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

    pub(crate) fn top(kind: TopKind, n: usize) -> (TopVdev, Vec<Arc<MemLeaf>>) {
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
                slow_ms: AtomicU64::new(DEFAULT_SLOW_MS),
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
        t.read(0, &mut r, Txg(0), &|_| true).unwrap();
        assert_eq!(r, data);
    }

    #[test]
    fn mirror_falls_back_and_heals() {
        let (t, mems) = top(TopKind::Mirror, 2);
        let data = vec![7u8; 4096];
        t.write(4096 * 600, &data).unwrap();
        // Corrupt the copy the read order tries first.
        let first = t.read_order(4096 * 600, Txg(0))[0];
        mems[first]
            .write_at(&[0u8; 4096], DATA_START + 4096 * 600)
            .unwrap();
        let want = data.clone();
        let verify = move |b: &[u8]| b == &want[..];
        let mut r = vec![0u8; 4096];
        t.read(4096 * 600, &mut r, Txg(0), &verify).unwrap();
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

    /// A child judged slow from one outlier is passed over, but gets one probe every
    /// `PROBE_EVERY` reads however fast they come (not only after 2 s without a sample).
    #[test]
    fn a_child_judged_slow_is_probed_by_count() {
        let (t, _) = top(TopKind::Mirror, 2);
        t.children[0]
            .stats
            .lat_ewma_ns
            .store(1_000_000, Ordering::Relaxed);
        t.children[1].record_latency(500_000_000);
        let firsts: Vec<usize> = (0..PROBE_EVERY * 4)
            .map(|i| t.read_order(i << 21, Txg(0))[0])
            .collect();
        let probes = firsts.iter().filter(|&&c| c == 1).count() as u64;
        assert_eq!(probes, 4, "one probe per {PROBE_EVERY} reads: {firsts:?}");
        // Never while a read of it is in flight.
        t.children[1].stats.pending.store(1, Ordering::Relaxed);
        assert!((0..PROBE_EVERY * 2).all(|i| t.read_order(i << 21, Txg(0))[0] == 0));
    }

    #[test]
    fn out_of_bounds_is_an_error() {
        let (t, _) = top(TopKind::Single, 1);
        assert!(t.write(t.asize, &[0u8; 4096]).is_err());
        assert!(t
            .read(u64::MAX - 10, &mut [0u8; 4096], Txg(0), &|_| true)
            .is_err());
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
