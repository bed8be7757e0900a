//! Leaves for tests and fault injection: in-memory ([`MemLeaf`]), crash-simulating ([`CrashLeaf`]) and
//! fault-injecting ([`FaultLeaf`], driven by a shared [`FaultSet`]; SPEC section 7).
//!
//! Invariants shared by all three: they implement [`Leaf`] exactly like a real leaf does for in-range I/O
//! (whole buffer or error), a read past the end fails with `UnexpectedEof` and a write past the end with
//! `InvalidInput`, never a panic; all are `Send + Sync` (interior locks or atomics).
//!
//! [`CrashLeaf`]: `live` is what reads see; `durable` is what survives a crash, and changes only in
//! `flush`, which moves every pending (completed but unflushed) write into it in issue order. A crash image
//! is `durable` plus, in [`CrashMode::Random`], a seeded subset of the pending writes, each applied fully,
//! not at all, or torn to a 512-byte-aligned prefix, always in issue order (a write never lands over a
//! later one, which matches a page cache in front of a disk). Once the leaf is dead
//! ([`CrashLeaf::set_fail_after_flushes`]), nothing more becomes durable.
//!
//! [`FaultLeaf`]: faults are drawn deterministically (xorshift seeded from the fault id and a per-fault
//! counter of matching I/Os), so a test that issues the same I/O sequence sees the same faults. The
//! wrapped leaf is never changed by read-side faults.

use crate::leaf::Leaf;
use crate::units::lock;
use serde::{Deserialize, Serialize};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Torn writes land in units of this many bytes.
const TEAR_UNIT: usize = 512;

/// Checks that `[offset, offset + len)` lies inside `size` and returns the range as `usize`s.
fn range_in(offset: u64, len: usize, size: u64, kind: io::ErrorKind) -> io::Result<(usize, usize)> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok((offset as usize, end as usize)),
        _ => Err(io::Error::new(
            kind,
            format!("range {offset}+{len} is past the end of the leaf ({size} bytes)"),
        )),
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// splitmix64: spreads a seed so that nearby seeds give unrelated streams.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small xorshift64* generator seeded through splitmix64 (no external rand crate; quality is ample
/// for test schedules). Shared with the end-to-end stress test.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        let s = splitmix64(seed);
        XorShift(if s == 0 { 0x2545_f491_4f6c_dd1d } else { s })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, n)`; `n` must be non-zero.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[0, 100)`.
    fn percent(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 100.0
    }
}

// ---------------------------------------------------------------------------------------------------------
// MemLeaf

/// An in-memory leaf. Discard zeroes the range. Flush does nothing (memory is "durable" for its life).
#[derive(Debug)]
pub struct MemLeaf {
    data: RwLock<Vec<u8>>,
    size: u64,
    name: String,
}

impl MemLeaf {
    /// A zero-filled leaf of `size` bytes, named `name` (its `path()`).
    pub fn new(size: u64, name: &str) -> MemLeaf {
        MemLeaf::from_image(vec![0u8; size as usize], name)
    }

    /// A leaf whose contents are `image`.
    pub fn from_image(image: Vec<u8>, name: &str) -> MemLeaf {
        MemLeaf {
            size: image.len() as u64,
            data: RwLock::new(image),
            name: name.to_string(),
        }
    }

    /// A copy of the whole contents.
    pub fn image(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Leaf for MemLeaf {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (s, e) = range_in(offset, buf.len(), self.size, io::ErrorKind::UnexpectedEof)?;
        let data = self.data.read().unwrap_or_else(|p| p.into_inner());
        buf.copy_from_slice(&data[s..e]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (s, e) = range_in(offset, buf.len(), self.size, io::ErrorKind::InvalidInput)?;
        let mut data = self.data.write().unwrap_or_else(|p| p.into_inner());
        data[s..e].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset >= self.size {
            return Ok(());
        }
        let len = len.min(self.size - offset) as usize;
        let mut data = self.data.write().unwrap_or_else(|p| p.into_inner());
        data[offset as usize..offset as usize + len].fill(0);
        Ok(())
    }

    fn path(&self) -> &str {
        &self.name
    }
}

// ---------------------------------------------------------------------------------------------------------
// CrashLeaf

/// How [`CrashLeaf::crash_image`] treats the writes that were not flushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Only what was flushed survives.
    DropUnflushed,
    /// Each pending write survives fully, not at all, or torn (a 512-byte-aligned prefix), drawn from the
    /// seed; the same seed on the same history gives the same image.
    Random(u64),
}

#[derive(Debug)]
struct CrashState {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Completed, unflushed writes in issue order.
    pending: Vec<(usize, Vec<u8>)>,
    flushes: u64,
    /// Successful flushes left before the leaf dies; `None` = never dies.
    flushes_left: Option<u64>,
}

impl CrashState {
    fn dead(&self) -> bool {
        self.flushes_left == Some(0)
    }
}

/// An in-memory leaf that remembers what is durable, to build the image a crash would leave.
#[derive(Debug)]
pub struct CrashLeaf {
    state: Mutex<CrashState>,
    size: u64,
    name: String,
}

impl CrashLeaf {
    /// A zero-filled leaf of `size` bytes (all of it durable).
    pub fn new(size: u64, name: &str) -> CrashLeaf {
        CrashLeaf::from_image(vec![0u8; size as usize], name)
    }

    /// A leaf whose live and durable contents are `image` (e.g. a [`CrashLeaf::crash_image`], "rebooted").
    pub fn from_image(image: Vec<u8>, name: &str) -> CrashLeaf {
        CrashLeaf {
            size: image.len() as u64,
            state: Mutex::new(CrashState {
                durable: image.clone(),
                live: image,
                pending: Vec::new(),
                flushes: 0,
                flushes_left: None,
            }),
            name: name.to_string(),
        }
    }

    /// The image a crash at this instant would leave. See [`CrashMode`].
    pub fn crash_image(&self, mode: CrashMode) -> Vec<u8> {
        let st = lock(&self.state);
        let mut img = st.durable.clone();
        if let CrashMode::Random(seed) = mode {
            let mut rng = XorShift::new(seed);
            for (off, data) in &st.pending {
                let keep = match rng.below(3) {
                    0 => 0,
                    1 => data.len(),
                    _ => {
                        // A strict prefix in whole 512-byte units (possibly empty).
                        let units = data.len().div_ceil(TEAR_UNIT) as u64;
                        (rng.below(units.max(1)) as usize * TEAR_UNIT).min(data.len())
                    }
                };
                img[*off..*off + keep].copy_from_slice(&data[..keep]);
            }
        }
        img
    }

    /// What reads see now.
    pub fn live_image(&self) -> Vec<u8> {
        lock(&self.state).live.clone()
    }

    /// What has been made durable by flushes.
    pub fn durable_image(&self) -> Vec<u8> {
        lock(&self.state).durable.clone()
    }

    /// Number of successful flushes so far.
    pub fn flush_count(&self) -> u64 {
        lock(&self.state).flushes
    }

    /// Number of completed writes not yet flushed.
    pub fn pending_writes(&self) -> usize {
        lock(&self.state).pending.len()
    }

    /// After `n` more successful flushes the machine "dies": every later write and flush fails with EIO and
    /// nothing more becomes durable (reads keep working). `n == 0` kills it now.
    pub fn set_fail_after_flushes(&self, n: u64) {
        lock(&self.state).flushes_left = Some(n);
    }

    /// Undo [`CrashLeaf::set_fail_after_flushes`]: the leaf works again (pending writes are kept).
    pub fn clear_fail(&self) {
        lock(&self.state).flushes_left = None;
    }

    /// True once the leaf has died.
    pub fn is_dead(&self) -> bool {
        lock(&self.state).dead()
    }

    fn record(&self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        let (s, e) = range_in(offset, data.len(), self.size, io::ErrorKind::InvalidInput)?;
        let mut st = lock(&self.state);
        if st.dead() {
            return Err(eio());
        }
        st.live[s..e].copy_from_slice(&data);
        st.pending.push((s, data));
        Ok(())
    }
}

impl Leaf for CrashLeaf {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (s, e) = range_in(offset, buf.len(), self.size, io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&lock(&self.state).live[s..e]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.record(offset, buf.to_vec())
    }

    fn flush(&self) -> io::Result<()> {
        let mut st = lock(&self.state);
        if st.dead() {
            return Err(eio());
        }
        let pending = std::mem::take(&mut st.pending);
        for (off, data) in pending {
            st.durable[off..off + data.len()].copy_from_slice(&data);
        }
        st.flushes += 1;
        if let Some(n) = st.flushes_left.as_mut() {
            *n -= 1;
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }

    /// Discard is modelled as a pending write of zeros.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset >= self.size {
            return Ok(());
        }
        let len = len.min(self.size - offset);
        if len == 0 {
            return Ok(());
        }
        self.record(offset, vec![0u8; len as usize])
    }

    fn path(&self) -> &str {
        &self.name
    }
}

// ---------------------------------------------------------------------------------------------------------
// FaultLeaf

/// What a fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultKind {
    /// The I/O fails with EIO.
    Io,
    /// The I/O fails with ENXIO (device gone).
    Nxio,
    /// A read succeeds but returns flipped bits (the device itself is intact). Reads only.
    CorruptRead,
    /// A write stores flipped bits and reports success. Writes only.
    CorruptWrite,
    /// The I/O is delayed by `ms` milliseconds, then done normally.
    Latency { ms: u64 },
    /// A write is silently not done but reported as done. Writes only.
    Drop,
    /// Only the first half of a write (rounded down to 512 bytes) lands; reported as done. Writes only.
    Torn,
}

/// Which I/Os a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultIo {
    Read,
    Write,
    All,
}

/// One injected fault.
///
/// It matches an I/O when the I/O's type is covered by both `io` and `kind` (the read-only and write-only
/// kinds above never match the other type), the I/O overlaps `range` (if any), and a deterministic random
/// draw falls below `percent`. Flushes are failed by `Io`/`Nxio` faults whose `io` is `Write` or `All` and
/// that have no `range` (a ranged fault targets blocks, not the whole device). Discards are failed by the
/// same `Io`/`Nxio` write faults when their range overlaps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    pub kind: FaultKind,
    pub io: FaultIo,
    /// Probability in percent, 0-100; 100 = always, 0 = never.
    pub percent: f64,
    /// `(offset, length)` in bytes; `None` = the whole leaf.
    pub range: Option<(u64, u64)>,
}

impl Fault {
    /// A fault that always fires on the whole leaf.
    pub fn new(kind: FaultKind, io: FaultIo) -> Fault {
        Fault {
            kind,
            io,
            percent: 100.0,
            range: None,
        }
    }

    /// The same fault restricted to `len` bytes at `offset`.
    pub fn with_range(mut self, offset: u64, len: u64) -> Fault {
        self.range = Some((offset, len));
        self
    }

    /// The same fault firing with probability `percent` (0-100).
    pub fn with_percent(mut self, percent: f64) -> Fault {
        self.percent = percent;
        self
    }

    fn covers(&self, op: Op) -> bool {
        let io_ok = matches!(
            (self.io, op),
            (FaultIo::All, _)
                | (FaultIo::Read, Op::Read)
                | (FaultIo::Write, Op::Write | Op::Flush | Op::Discard)
        );
        let kind_ok = matches!(
            (self.kind, op),
            (FaultKind::Io | FaultKind::Nxio, _)
                | (FaultKind::Latency { .. }, Op::Read | Op::Write)
                | (FaultKind::CorruptRead, Op::Read)
                | (
                    FaultKind::CorruptWrite | FaultKind::Drop | FaultKind::Torn,
                    Op::Write
                )
        );
        // A flush has no extent: only whole-leaf faults apply to it. Other ops check overlap separately.
        let range_ok = op != Op::Flush || self.range.is_none();
        io_ok && kind_ok && range_ok
    }

    /// The part of `[offset, offset + len)` inside the fault's range, relative to `offset`.
    fn overlap(&self, offset: u64, len: u64) -> Option<(usize, usize)> {
        let end = offset.saturating_add(len);
        let (ro, rl) = self.range.unwrap_or((0, u64::MAX));
        let rend = ro.saturating_add(rl);
        let s = offset.max(ro);
        let e = end.min(rend);
        (s < e).then(|| ((s - offset) as usize, (e - offset) as usize))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
    Discard,
}

#[derive(Debug)]
struct FaultEntry {
    id: u64,
    fault: Fault,
    /// Matching I/Os seen so far (the draw stream position).
    draws: u64,
}

#[derive(Debug, Default)]
struct FaultSetInner {
    next_id: u64,
    faults: Vec<FaultEntry>,
}

/// A shared, mutable list of faults, each with an id (ids start at 1 and are never reused by a set).
#[derive(Debug, Default)]
pub struct FaultSet {
    inner: Mutex<FaultSetInner>,
    /// Number of faults, read without the lock on every I/O.
    active: AtomicU64,
}

/// A fault that fired on one I/O, with the draw stream for its effect and the overlap it applies to.
struct Fired {
    id: u64,
    kind: FaultKind,
    seed: u64,
    overlap: (usize, usize),
}

impl FaultSet {
    pub fn new() -> FaultSet {
        FaultSet::default()
    }

    /// Adds a fault; returns its id.
    pub fn add(&self, fault: Fault) -> u64 {
        let mut inner = lock(&self.inner);
        inner.next_id += 1;
        let id = inner.next_id;
        inner.faults.push(FaultEntry {
            id,
            fault,
            draws: 0,
        });
        self.active
            .store(inner.faults.len() as u64, Ordering::Relaxed);
        id
    }

    /// Removes fault `id`; false if there was none.
    pub fn clear(&self, id: u64) -> bool {
        let mut inner = lock(&self.inner);
        let before = inner.faults.len();
        inner.faults.retain(|e| e.id != id);
        self.active
            .store(inner.faults.len() as u64, Ordering::Relaxed);
        inner.faults.len() != before
    }

    /// Is fault `id` still there?
    pub fn has(&self, id: u64) -> bool {
        lock(&self.inner).faults.iter().any(|e| e.id == id)
    }

    /// Removes every fault.
    pub fn clear_all(&self) {
        lock(&self.inner).faults.clear();
        self.active.store(0, Ordering::Relaxed);
    }

    /// The faults, in the order they were added.
    pub fn list(&self) -> Vec<(u64, Fault)> {
        lock(&self.inner)
            .faults
            .iter()
            .map(|e| (e.id, e.fault.clone()))
            .collect()
    }

    /// The faults that fire on this I/O, in the order they were added.
    fn fire(&self, op: Op, offset: u64, len: u64) -> Vec<Fired> {
        if self.active.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let mut inner = lock(&self.inner);
        let mut fired = Vec::new();
        for e in inner.faults.iter_mut() {
            if !e.fault.covers(op) {
                continue;
            }
            let overlap = if op == Op::Flush {
                (0, 0)
            } else {
                match e.fault.overlap(offset, len) {
                    Some(o) => o,
                    None => continue,
                }
            };
            let mut rng = XorShift::new(e.id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ e.draws);
            e.draws += 1;
            if rng.percent() < e.fault.percent {
                fired.push(Fired {
                    id: e.id,
                    kind: e.fault.kind,
                    seed: rng.next_u64(),
                    overlap,
                });
            }
        }
        fired
    }
}

/// Flips bits in `buf[s..e]`: one byte in every 512-byte unit, at a random position, with a non-zero mask,
/// so the data always changes.
fn corrupt(buf: &mut [u8], (s, e): (usize, usize), seed: u64) {
    let mut rng = XorShift::new(seed);
    let mut at = s;
    while at < e {
        let end = (at + TEAR_UNIT).min(e);
        let pos = at + rng.below((end - at) as u64) as usize;
        let mask = (rng.below(255) + 1) as u8;
        buf[pos] ^= mask;
        at = end;
    }
}

/// A leaf that injects the faults of a shared [`FaultSet`] into the I/O of the leaf it wraps, and counts
/// the reads and writes issued through it.
pub struct FaultLeaf {
    inner: Arc<dyn Leaf>,
    faults: Arc<FaultSet>,
    reads: AtomicU64,
    writes: AtomicU64,
}

impl std::fmt::Debug for FaultLeaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultLeaf")
            .field("path", &self.inner.path())
            .field("faults", &self.faults)
            .field("reads", &self.reads())
            .field("writes", &self.writes())
            .finish()
    }
}

impl FaultLeaf {
    pub fn new(inner: Arc<dyn Leaf>, faults: Arc<FaultSet>) -> FaultLeaf {
        FaultLeaf {
            inner,
            faults,
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        }
    }

    /// The wrapped leaf (to check what really landed).
    pub fn inner(&self) -> &Arc<dyn Leaf> {
        &self.inner
    }

    /// The fault set this leaf obeys.
    pub fn faults(&self) -> &Arc<FaultSet> {
        &self.faults
    }

    /// Reads issued through this leaf (including failed ones).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Writes issued through this leaf (including failed and dropped ones).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Resets both counters to zero.
    pub fn reset_counters(&self) {
        self.reads.store(0, Ordering::Relaxed);
        self.writes.store(0, Ordering::Relaxed);
    }

    /// Fails with the first error fault that fired, after sleeping for every latency fault. A latency
    /// fault that is cleared meanwhile (`inject -c`) ends its wait.
    fn errors_and_latency(&self, fired: &[Fired]) -> io::Result<()> {
        for f in fired {
            let FaultKind::Latency { ms } = f.kind else {
                continue;
            };
            let until = std::time::Instant::now() + Duration::from_millis(ms);
            loop {
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() || !self.faults.has(f.id) {
                    break;
                }
                std::thread::sleep(left.min(Duration::from_millis(20)));
            }
        }
        for f in fired {
            match f.kind {
                FaultKind::Io => return Err(io::Error::from_raw_os_error(libc::EIO)),
                FaultKind::Nxio => return Err(io::Error::from_raw_os_error(libc::ENXIO)),
                _ => {}
            }
        }
        Ok(())
    }
}

impl FaultLeaf {
    fn faulted_read(
        &self,
        buf: &mut [u8],
        offset: u64,
        read: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let fired = self.faults.fire(Op::Read, offset, buf.len() as u64);
        self.errors_and_latency(&fired)?;
        read(buf)?;
        for f in &fired {
            if f.kind == FaultKind::CorruptRead {
                corrupt(buf, f.overlap, f.seed);
            }
        }
        Ok(())
    }
}

impl Leaf for FaultLeaf {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.faulted_read(buf, offset, |b| self.inner.read_at(b, offset))
    }

    fn read_at_uncached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.faulted_read(buf, offset, |b| self.inner.read_at_uncached(b, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        // Out-of-range writes fail even when a fault would have dropped or torn them.
        range_in(
            offset,
            buf.len(),
            self.inner.size(),
            io::ErrorKind::InvalidInput,
        )?;
        let fired = self.faults.fire(Op::Write, offset, buf.len() as u64);
        self.errors_and_latency(&fired)?;
        if fired.iter().any(|f| f.kind == FaultKind::Drop) {
            return Ok(());
        }
        let mut data = std::borrow::Cow::Borrowed(buf);
        for f in &fired {
            if f.kind == FaultKind::CorruptWrite {
                corrupt(data.to_mut(), f.overlap, f.seed);
            }
        }
        if fired.iter().any(|f| f.kind == FaultKind::Torn) {
            let len = (buf.len() / 2) / TEAR_UNIT * TEAR_UNIT;
            if len == 0 {
                return Ok(());
            }
            return self.inner.write_at(&data[..len], offset);
        }
        self.inner.write_at(&data, offset)
    }

    fn flush(&self) -> io::Result<()> {
        let fired = self.faults.fire(Op::Flush, 0, 0);
        self.errors_and_latency(&fired)?;
        self.inner.flush()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let fired = self.faults.fire(Op::Discard, offset, len);
        self.errors_and_latency(&fired)?;
        self.inner.discard(offset, len)
    }

    fn path(&self) -> &str {
        self.inner.path()
    }

    fn check(&self) -> Option<String> {
        self.inner.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    fn read(leaf: &dyn Leaf, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        leaf.read_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn leaves_are_send_sync() {
        assert_send_sync::<MemLeaf>();
        assert_send_sync::<CrashLeaf>();
        assert_send_sync::<FaultLeaf>();
        assert_send_sync::<FaultSet>();
    }

    // ----- MemLeaf

    #[test]
    fn mem_roundtrip_bounds_discard() {
        let leaf = MemLeaf::new(8192, "mem0");
        assert_eq!(leaf.size(), 8192);
        assert_eq!(leaf.path(), "mem0");
        let data = pattern(4096, 7);
        leaf.write_at(&data, 1024).unwrap();
        leaf.flush().unwrap();
        assert_eq!(read(&leaf, 1024, 4096).unwrap(), data);

        let e = read(&leaf, 8000, 512).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(read(&leaf, u64::MAX, 1).is_err());
        assert!(leaf.write_at(&data, 8000).is_err());

        leaf.discard(2048, 1024).unwrap();
        let back = read(&leaf, 1024, 4096).unwrap();
        assert_eq!(&back[..1024], &data[..1024]);
        assert!(back[1024..2048].iter().all(|&b| b == 0));
        assert_eq!(&back[2048..], &data[2048..]);
        leaf.discard(8000, 1 << 20).unwrap();
        leaf.discard(1 << 20, 1).unwrap();
        assert_eq!(leaf.image().len(), 8192);
    }

    // ----- CrashLeaf

    #[test]
    fn crash_drop_unflushed_keeps_only_flushed() {
        let leaf = CrashLeaf::new(16384, "crash");
        let a = pattern(4096, 1);
        let b = pattern(4096, 2);
        leaf.write_at(&a, 0).unwrap();
        leaf.flush().unwrap();
        assert_eq!(leaf.flush_count(), 1);
        leaf.write_at(&b, 4096).unwrap();
        leaf.write_at(&b, 0).unwrap(); // overwrite of flushed data, unflushed
        assert_eq!(leaf.pending_writes(), 2);

        // Reads see everything.
        assert_eq!(read(&leaf, 0, 4096).unwrap(), b);
        assert_eq!(read(&leaf, 4096, 4096).unwrap(), b);

        let img = leaf.crash_image(CrashMode::DropUnflushed);
        assert_eq!(&img[..4096], &a[..]);
        assert!(img[4096..].iter().all(|&x| x == 0));
        assert_eq!(img, leaf.durable_image());

        // Reopen the image: it is what the leaf now holds.
        let again = CrashLeaf::from_image(img.clone(), "crash");
        assert_eq!(read(&again, 0, 4096).unwrap(), a);
        assert_eq!(again.crash_image(CrashMode::DropUnflushed), img);
        assert_eq!(again.crash_image(CrashMode::Random(5)), img);

        // After a flush everything is durable.
        leaf.flush().unwrap();
        assert_eq!(
            leaf.crash_image(CrashMode::DropUnflushed),
            leaf.live_image()
        );
        assert_eq!(leaf.pending_writes(), 0);
    }

    #[test]
    fn crash_random_is_reproducible_and_plausible() {
        let leaf = CrashLeaf::new(64 * 1024, "crash");
        let base = pattern(64 * 1024, 9);
        leaf.write_at(&base, 0).unwrap();
        leaf.flush().unwrap();
        let mut writes = Vec::new();
        for i in 0..12u64 {
            let w = vec![(0x10 + i) as u8; 4096];
            leaf.write_at(&w, i * 4096).unwrap();
            writes.push((i * 4096, w));
        }
        let mut distinct = std::collections::BTreeSet::new();
        let mut saw_torn = false;
        for seed in 0..64 {
            let x = leaf.crash_image(CrashMode::Random(seed));
            assert_eq!(x, leaf.crash_image(CrashMode::Random(seed)));
            // Each write region is old data, new data, or a 512-aligned prefix of new then old.
            for (off, w) in &writes {
                let region = &x[*off as usize..*off as usize + w.len()];
                let old = &base[*off as usize..*off as usize + w.len()];
                let k = region.iter().zip(w).take_while(|(a, b)| a == b).count();
                let k = k / TEAR_UNIT * TEAR_UNIT;
                assert_eq!(&region[k..], &old[k..], "seed {seed} off {off}");
                if k != 0 && k != w.len() {
                    saw_torn = true;
                }
            }
            // Untouched tail stays as flushed.
            assert_eq!(&x[48 * 1024..], &base[48 * 1024..]);
            distinct.insert(x);
        }
        assert!(
            distinct.len() > 10,
            "only {} distinct images",
            distinct.len()
        );
        assert!(saw_torn);
    }

    #[test]
    fn crash_fail_after_flushes_stops_durability() {
        let leaf = CrashLeaf::new(8192, "crash");
        leaf.set_fail_after_flushes(1);
        assert!(!leaf.is_dead());
        let a = pattern(4096, 3);
        leaf.write_at(&a, 0).unwrap();
        leaf.flush().unwrap(); // the last successful flush
        assert!(leaf.is_dead());
        let b = pattern(4096, 4);
        let e = leaf.write_at(&b, 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!(leaf.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(leaf.flush_count(), 1);
        // Reads still work; nothing after the death is durable or live.
        assert_eq!(read(&leaf, 0, 4096).unwrap(), a);
        let img = leaf.crash_image(CrashMode::Random(1));
        assert_eq!(&img[..4096], &a[..]);
        assert!(img[4096..].iter().all(|&x| x == 0));

        // Written before death but not flushed: lost when the machine dies at the next flush.
        let leaf = CrashLeaf::new(8192, "crash2");
        leaf.set_fail_after_flushes(0);
        assert!(leaf.write_at(&a, 0).is_err());
        let leaf = CrashLeaf::new(8192, "crash3");
        leaf.write_at(&a, 0).unwrap();
        leaf.set_fail_after_flushes(0);
        assert!(leaf.flush().is_err());
        assert!(leaf
            .crash_image(CrashMode::DropUnflushed)
            .iter()
            .all(|&x| x == 0));
        leaf.clear_fail();
        leaf.flush().unwrap();
        assert_eq!(&leaf.durable_image()[..4096], &a[..]);
    }

    #[test]
    fn crash_bounds_and_discard() {
        let leaf = CrashLeaf::new(4096, "crash");
        assert!(leaf.write_at(&[1u8; 512], 4000).is_err());
        let mut buf = [0u8; 512];
        assert_eq!(
            leaf.read_at(&mut buf, 3800).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        leaf.write_at(&[7u8; 4096], 0).unwrap();
        leaf.flush().unwrap();
        leaf.discard(1024, 1 << 20).unwrap();
        assert!(read(&leaf, 1024, 3072).unwrap().iter().all(|&b| b == 0));
        assert!(leaf.crash_image(CrashMode::DropUnflushed)[1024..]
            .iter()
            .all(|&b| b == 7));
    }

    // ----- FaultLeaf

    fn faulty(size: u64) -> (Arc<MemLeaf>, Arc<FaultSet>, FaultLeaf) {
        let mem = Arc::new(MemLeaf::new(size, "mem"));
        let set = Arc::new(FaultSet::new());
        let leaf = FaultLeaf::new(mem.clone(), set.clone());
        (mem, set, leaf)
    }

    #[test]
    fn fault_io_on_reads_only_fails_reads() {
        let (_mem, set, leaf) = faulty(8192);
        let id = set.add(Fault::new(FaultKind::Io, FaultIo::Read));
        assert_eq!(id, 1);
        let e = read(&leaf, 0, 512).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        leaf.write_at(&[1u8; 512], 0).unwrap();
        leaf.flush().unwrap();
        leaf.discard(0, 512).unwrap();
        assert_eq!(leaf.reads(), 1);
        assert_eq!(leaf.writes(), 1);
        assert_eq!(leaf.path(), "mem");
        assert_eq!(leaf.size(), 8192);
    }

    #[test]
    fn fault_nxio_on_writes_fails_writes_and_flush() {
        let (mem, set, leaf) = faulty(8192);
        set.add(Fault::new(FaultKind::Nxio, FaultIo::Write));
        let e = leaf.write_at(&[1u8; 512], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENXIO));
        assert_eq!(leaf.flush().unwrap_err().raw_os_error(), Some(libc::ENXIO));
        read(&leaf, 0, 512).unwrap();
        assert!(read(&*mem, 0, 512).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn fault_range_filter() {
        let (_mem, set, leaf) = faulty(64 * 1024);
        set.add(Fault::new(FaultKind::Io, FaultIo::All).with_range(8192, 4096));
        read(&leaf, 0, 8192).unwrap(); // ends right at the range
        read(&leaf, 12288, 4096).unwrap(); // starts right after it
        assert!(read(&leaf, 8192, 512).is_err());
        assert!(read(&leaf, 4096, 8192).is_err()); // overlaps the start
        assert!(read(&leaf, 12000, 4096).is_err()); // overlaps the end
        assert!(leaf.write_at(&[0u8; 512], 9000).is_err());
        leaf.write_at(&[0u8; 512], 0).unwrap();
        // A ranged fault does not fail whole-device flushes.
        leaf.flush().unwrap();
        assert!(leaf.discard(8192, 4096).is_err());
        leaf.discard(0, 4096).unwrap();
    }

    #[test]
    fn fault_percent_zero_never_hundred_always() {
        let (_mem, set, leaf) = faulty(8192);
        let never = set.add(Fault::new(FaultKind::Io, FaultIo::All).with_percent(0.0));
        for _ in 0..1000 {
            read(&leaf, 0, 512).unwrap();
            leaf.write_at(&[0u8; 512], 0).unwrap();
        }
        leaf.flush().unwrap();
        set.clear(never);
        set.add(Fault::new(FaultKind::Io, FaultIo::All).with_percent(100.0));
        for _ in 0..1000 {
            assert!(read(&leaf, 0, 512).is_err());
            assert!(leaf.write_at(&[0u8; 512], 0).is_err());
        }
        assert!(leaf.flush().is_err());
        assert_eq!(leaf.reads(), 2000);
        assert_eq!(leaf.writes(), 2000);
        leaf.reset_counters();
        assert_eq!((leaf.reads(), leaf.writes()), (0, 0));
    }

    #[test]
    fn fault_percent_half_is_about_half_and_deterministic() {
        let run = || {
            let (_mem, set, leaf) = faulty(8192);
            set.add(Fault::new(FaultKind::Io, FaultIo::Read).with_percent(50.0));
            (0..2000)
                .map(|_| read(&leaf, 0, 512).is_err())
                .collect::<Vec<bool>>()
        };
        let a = run();
        assert_eq!(a, run());
        let fails = a.iter().filter(|&&f| f).count();
        assert!((800..1200).contains(&fails), "{fails} of 2000");
    }

    #[test]
    fn fault_corrupt_read_changes_data_not_device() {
        let (mem, set, leaf) = faulty(16384);
        let data = pattern(8192, 5);
        leaf.write_at(&data, 0).unwrap();
        let id = set.add(Fault::new(FaultKind::CorruptRead, FaultIo::Read).with_range(4096, 1024));
        let got = read(&leaf, 0, 8192).unwrap();
        assert_ne!(got, data);
        // Only inside the range.
        assert_eq!(&got[..4096], &data[..4096]);
        assert_eq!(&got[5120..], &data[5120..]);
        assert_ne!(&got[4096..5120], &data[4096..5120]);
        // The device is intact.
        assert_eq!(read(&*mem, 0, 8192).unwrap(), data);
        assert_eq!(read(&**leaf.inner(), 0, 8192).unwrap(), data);
        // Clear removes it.
        assert!(set.clear(id));
        assert!(!set.clear(id));
        assert!(set.list().is_empty());
        assert_eq!(read(&leaf, 0, 8192).unwrap(), data);
    }

    #[test]
    fn fault_corrupt_write_drop_torn() {
        let (mem, set, leaf) = faulty(16384);
        let data = pattern(4096, 6);

        let id = set.add(Fault::new(FaultKind::CorruptWrite, FaultIo::Write));
        leaf.write_at(&data, 0).unwrap();
        set.clear(id);
        let stored = read(&*mem, 0, 4096).unwrap();
        assert_ne!(stored, data);
        assert_eq!(read(&leaf, 0, 4096).unwrap(), stored);

        let id = set.add(Fault::new(FaultKind::Drop, FaultIo::All));
        leaf.write_at(&data, 4096).unwrap();
        set.clear(id);
        assert!(read(&*mem, 4096, 4096).unwrap().iter().all(|&b| b == 0));

        let id = set.add(Fault::new(FaultKind::Torn, FaultIo::Write));
        leaf.write_at(&data, 8192).unwrap();
        let stored = read(&*mem, 8192, 4096).unwrap();
        assert_eq!(&stored[..2048], &data[..2048]);
        assert!(stored[2048..].iter().all(|&b| b == 0));
        // Write-only kinds never touch reads.
        assert_eq!(read(&leaf, 8192, 4096).unwrap(), stored);
        // Out-of-range writes still fail.
        assert!(leaf.write_at(&data, 16000).is_err());
        set.clear(id);
    }

    #[test]
    fn fault_latency_delays() {
        let (_mem, set, leaf) = faulty(4096);
        set.add(Fault::new(FaultKind::Latency { ms: 30 }, FaultIo::Read));
        let t = std::time::Instant::now();
        read(&leaf, 0, 512).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(30));
        let t = std::time::Instant::now();
        leaf.write_at(&[0u8; 512], 0).unwrap();
        assert!(t.elapsed() < Duration::from_millis(30));
    }

    #[test]
    fn fault_set_ids_list_clear_all_shared() {
        let set = Arc::new(FaultSet::new());
        let a = Arc::new(MemLeaf::new(4096, "a"));
        let b = Arc::new(MemLeaf::new(4096, "b"));
        let la = FaultLeaf::new(a, set.clone());
        let lb = FaultLeaf::new(b, set.clone());
        let f1 = Fault::new(FaultKind::Io, FaultIo::Read);
        let f2 = Fault::new(FaultKind::Latency { ms: 1 }, FaultIo::All).with_range(0, 512);
        let i1 = set.add(f1.clone());
        let i2 = set.add(f2.clone());
        assert_ne!(i1, i2);
        assert_eq!(set.list(), vec![(i1, f1.clone()), (i2, f2)]);
        assert!(read(&la, 0, 512).is_err());
        assert!(read(&lb, 0, 512).is_err());
        set.clear_all();
        assert!(set.list().is_empty());
        read(&la, 0, 512).unwrap();
        // Ids are not reused.
        assert!(set.add(f1) > i2);
        // Faults serialise (for the CLI and daemon).
        let bytes = bincode::serialize(&set.list()).unwrap();
        let back: Vec<(u64, Fault)> = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, set.list());
    }

    #[test]
    fn fault_leaf_over_crash_leaf() {
        let crash = Arc::new(CrashLeaf::new(8192, "c"));
        let set = Arc::new(FaultSet::new());
        let leaf = FaultLeaf::new(crash.clone(), set.clone());
        leaf.write_at(&[3u8; 4096], 0).unwrap();
        set.add(Fault::new(FaultKind::Io, FaultIo::Write));
        assert!(leaf.flush().is_err());
        assert!(crash
            .crash_image(CrashMode::DropUnflushed)
            .iter()
            .all(|&b| b == 0));
        set.clear_all();
        leaf.flush().unwrap();
        assert_eq!(crash.flush_count(), 1);
    }
}
