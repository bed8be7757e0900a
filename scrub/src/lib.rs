//! cairn-scrub: the scan engine. A scrub reads every copy of every allocated block (every mirror child,
//! every DVA), verifies it against the checksum in its parent pointer, rewrites bad copies from a good
//! one and lists blocks no copy can serve. A resilver is the same walk restricted to blocks born in the
//! txgs some leaves missed (their dirty time logs); when it completes, those logs are cleared.
//!
//! How it runs: the pool hands out batches of block pointers in a resumable order (see
//! `cairn_pool::scan`); each batch's reads are grouped per leaf, sorted by offset and merged into large
//! sequential reads issued on all leaves in parallel; checksums are computed on all cores (rayon).
//! Memory is bounded by the batch size, whatever the pool's size. After every batch the progress
//! (bookmark and counters) is saved in the pool and goes out with the next txg, so a restart, an
//! export/import or a kill -9 resumes where it was, losing seconds of work at most.
//!
//! Invariants: a copy is rewritten only with data that verified against the block's checksum, and only
//! while the batch's reader guard keeps the block from being reused; a copy that verified is never
//! rewritten.

pub use cairn_pool::schedule;

use cairn_pool::scan::{copies, Bookmark, Copy, ScanBatch, ScanState};
use cairn_pool::{Pool, PoolError, Txg};
use cairn_vdev::file::AlignedBuf;
use cairn_vdev::leaf::Leaf;
use cairn_vdev::tree::LeafVdev;
use cairn_vdev::units::lock;
use cairn_vdev::units::now_secs as now;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Blocks per batch, and block bytes per batch (memory is about this times the number of copies).
const BATCH_BLOCKS: usize = 4096;
const BATCH_BYTES: u64 = 16 << 20;
/// Largest merged read.
const MAX_READ: usize = 1 << 20;
/// Reads in flight per leaf, and resilver writes in flight per target leaf.
const READERS_PER_LEAF: usize = 4;
const WRITERS_PER_LEAF: usize = 4;

pub const RUN: u8 = 0;
pub const PAUSE: u8 = 1;
pub const STOP: u8 = 2;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScrubError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = ScrubError> = std::result::Result<T, E>;

/// The state of a scan of `function` starting now from the beginning of the pool.
fn fresh_scan(pool: &Pool, function: &str, last_scrub: u64) -> ScanState {
    ScanState {
        function: function.into(),
        state: "scanning".into(),
        start_time: now(),
        start_txg: pool.committed_txg().0,
        bookmark: Bookmark::START,
        to_examine: pool.allocated(),
        last_scrub,
        ..ScanState::default()
    }
}

/// The pool's `scrub_rate_limit` in bytes per second (0: none).
fn rate_limit(pool: &Pool) -> u64 {
    pool.get_props(&["scrub_rate_limit".to_string()])
        .ok()
        .and_then(|v| v.first().and_then(|x| x.1.parse::<u64>().ok()))
        .unwrap_or(0)
}

/// Begin a scrub, or resume a paused scan. Refuses while another scan runs (a resilver queues instead,
/// see [`request_resilver`]).
pub fn start_scrub(pool: &Pool) -> Result<ScanState> {
    let mut s = pool.scan_state()?;
    if s.state == "paused" {
        s.state = "scanning".into();
        s.paused_at = 0;
        pool.set_scan_state(&s)?;
        return Ok(s);
    }
    if s.state == "scanning" {
        return Err(ScrubError::Invalid(format!(
            "a {} is already in progress",
            s.function
        )));
    }
    let queued = s.queued.clone();
    let last_scrub = now();
    s = ScanState {
        queued,
        ..fresh_scan(pool, "scrub", last_scrub)
    };
    pool.set_scan_state(&s)?;
    pool.sync()?;
    Ok(s)
}

/// Start a resilver of every leaf whose dirty time log is not empty, or queue it behind a running scan
/// (it never restarts a running resilver: no restart loops). Returns false if nothing needs it.
pub fn request_resilver(pool: &Pool) -> Result<bool> {
    let need = pool.leaves_needing_resilver();
    if need.is_empty() {
        return Ok(false);
    }
    let mut s = pool.scan_state()?;
    if s.state == "scanning" || s.state == "paused" {
        for (g, _) in &need {
            if !s.targets.contains(g) && !s.queued.contains(g) {
                s.queued.push(*g);
            }
        }
        pool.set_scan_state(&s)?;
        return Ok(true);
    }
    let min = need.iter().map(|(_, t)| t.0).min().unwrap_or(1);
    s = ScanState {
        min_birth: min.saturating_sub(1),
        targets: need.iter().map(|(g, _)| *g).collect(),
        ..fresh_scan(pool, "resilver", s.last_scrub)
    };
    pool.set_scan_state(&s)?;
    pool.sync()?;
    Ok(true)
}

/// Start a sequential rebuild of the leaves that lack data: copy the allocated ranges of their
/// top-level vdevs in offset order from a complete child, without checksums, then scrub (as
/// OpenZFS's `attach -s`). Refused while another scan runs.
pub fn start_rebuild(pool: &Pool) -> Result<bool> {
    let need = pool.leaves_needing_resilver();
    if need.is_empty() {
        return Ok(false);
    }
    let s = pool.scan_state()?;
    if s.state == "scanning" || s.state == "paused" {
        return Err(ScrubError::Invalid(format!(
            "a {} is in progress; a sequential rebuild cannot be queued",
            s.function
        )));
    }
    let s = ScanState {
        // A rebuild walks top-level vdevs (object) and byte offsets (blkid), not the block tree.
        bookmark: Bookmark {
            object: 0,
            blkid: 0,
            before_root: false,
        },
        targets: need.iter().map(|(g, _)| *g).collect(),
        ..fresh_scan(pool, "rebuild", s.last_scrub)
    };
    pool.set_scan_state(&s)?;
    pool.sync()?;
    Ok(true)
}

/// Copy up to ~64 MiB of allocated ranges for a sequential rebuild, from the bookmark (object = top-level
/// vdev index, blkid = byte offset). Returns (bytes examined, bytes copied, next bookmark or None).
fn rebuild_step(pool: &Pool, s: &ScanState) -> Result<(u64, u64, Option<Bookmark>)> {
    use cairn_vdev::label::DATA_START;
    let vdevs = pool.top_vdevs();
    let mut bm = s.bookmark;
    let mut examined = 0u64;
    let mut copied = 0u64;
    while (bm.object as usize) < vdevs.len() {
        let t = &vdevs[bm.object as usize];
        let targets: Vec<_> = t
            .children
            .iter()
            .filter(|c| s.targets.contains(&c.guid.0) && c.state().usable())
            .cloned()
            .collect();
        let source = t
            .children
            .iter()
            .find(|c| !s.targets.contains(&c.guid.0) && c.state().usable() && c.dtl_is_empty())
            .cloned();
        let (Some(source), false) = (source, targets.is_empty()) else {
            bm = Bookmark {
                object: bm.object + 1,
                blkid: 0,
                before_root: false,
            };
            continue;
        };
        let ranges = pool.allocated_ranges(bm.object as usize, bm.blkid, 256)?;
        if ranges.is_empty() {
            bm = Bookmark {
                object: bm.object + 1,
                blkid: 0,
                before_root: false,
            };
            continue;
        }
        let src = source
            .dev()
            .ok_or_else(|| ScrubError::Invalid("the source leaf went away".into()))?;
        for (off, len) in ranges {
            let mut pos = off;
            while pos < off + len {
                let n = (off + len - pos).min(MAX_READ as u64) as usize;
                let mut buf = vec![0u8; n];
                src.read_at(&mut buf, DATA_START + pos)
                    .map_err(|e| ScrubError::Invalid(format!("reading {}: {e}", source.path())))?;
                for t in &targets {
                    if let Some(d) = t.dev() {
                        if d.write_at(&buf, DATA_START + pos).is_ok() {
                            t.stats
                                .repaired_bytes
                                .fetch_add(n as u64, Ordering::Relaxed);
                            copied += n as u64;
                        } else {
                            t.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                examined += n as u64;
                pos += n as u64;
            }
            bm.blkid = off + len;
            if examined >= 64 << 20 {
                return Ok((examined, copied, Some(bm)));
            }
        }
    }
    Ok((examined, copied, None))
}

/// Pause (`PAUSE`) or cancel (`STOP`) the pool's scan in its persistent state.
pub fn set_control(pool: &Pool, what: u8) -> Result<ScanState> {
    let mut s = pool.scan_state()?;
    match (what, s.state.as_str()) {
        (PAUSE, "scanning") => {
            s.state = "paused".into();
            s.paused_at = now();
        }
        (PAUSE, "paused") => {}
        (STOP, "scanning") | (STOP, "paused") => {
            s.state = "canceled".into();
            s.end_time = now();
        }
        _ => {
            // zpool: "cannot pause scrubbing tank: there is no active scrub".
            return Err(ScrubError::Invalid(format!(
                "there is no active scrub or resilver to {}",
                if what == PAUSE { "pause" } else { "stop" }
            )));
        }
    }
    pool.set_scan_state(&s)?;
    pool.sync()?;
    Ok(s)
}

/// Pieces of block `b`, copy `c` on one leaf.
struct Want {
    leaf_off: u64,
    len: usize,
    block: usize,
    copy: usize,
    buf_off: usize,
}

/// Read every copy of every block of the batch: per leaf, sorted and merged, all leaves in parallel.
/// Returns per block, per copy, the data (or None if a read failed). Each byte is copied once, from
/// the merged read's buffer into the block's buffer (or not at all when a read is exactly one block).
/// The bytes of one copy of a block: a range of a shared read buffer (a merged read is never copied
/// apart), or a buffer of its own.
#[derive(Clone)]
struct Data {
    buf: Arc<AlignedBuf>,
    off: usize,
    len: usize,
}

impl Data {
    fn own(b: AlignedBuf) -> Data {
        let len = b.len();
        Data {
            buf: Arc::new(b),
            off: 0,
            len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.buf.as_slice()[self.off..self.off + self.len]
    }

    fn sub(&self, off: usize, len: usize) -> Data {
        Data {
            buf: self.buf.clone(),
            off: self.off + off,
            len,
        }
    }

    /// Does `next` continue this range in the same buffer?
    fn continued_by(&self, next: &Data) -> bool {
        Arc::ptr_eq(&self.buf, &next.buf) && self.off + self.len == next.off
    }

    /// Return the buffer to the free list if this was its last user.
    fn recycle(self) {
        if let Ok(b) = Arc::try_unwrap(self.buf) {
            b.give();
        }
    }
}

fn read_batch(batch: &ScanBatch, all: &[Vec<Copy>]) -> Vec<Vec<Option<Data>>> {
    let sizes: Vec<usize> = batch.blocks.iter().map(|b| b.bp.psize as usize).collect();
    let mut per_leaf: HashMap<u64, (Arc<cairn_vdev::tree::LeafVdev>, Vec<Want>)> = HashMap::new();
    for (bi, cs) in all.iter().enumerate() {
        for (ci, c) in cs.iter().enumerate() {
            for p in &c.pieces {
                per_leaf
                    .entry(p.leaf.guid.0)
                    .or_insert_with(|| (p.leaf.clone(), Vec::new()))
                    .1
                    .push(Want {
                        leaf_off: p.leaf_off,
                        len: p.len,
                        block: bi,
                        copy: ci,
                        buf_off: p.buf_off,
                    });
            }
        }
    }
    /// A merged read: its buffer (None if it failed) and the pieces in it (offset in the run).
    type Run = (Option<AlignedBuf>, Vec<(usize, usize, usize, usize, usize)>);
    let runs: Vec<Vec<Run>> = std::thread::scope(|sc| {
        // READERS_PER_LEAF readers per leaf (consecutive parts of its sorted list) keep that many
        // requests in flight: direct reads need a queue to reach the device's speed.
        let mut jobs: Vec<(Arc<cairn_vdev::tree::LeafVdev>, Vec<Want>)> = Vec::new();
        for (leaf, mut wants) in per_leaf.into_values() {
            wants.sort_by_key(|w| w.leaf_off);
            let part = wants.len().div_ceil(READERS_PER_LEAF).max(1);
            while !wants.is_empty() {
                let rest = wants.split_off(part.min(wants.len()));
                jobs.push((leaf.clone(), std::mem::replace(&mut wants, rest)));
            }
        }
        let hs: Vec<_> = jobs
            .into_iter()
            .map(|(leaf, wants)| {
                sc.spawn(move || {
                    let mut out: Vec<Run> = Vec::new();
                    let dev = leaf.dev();
                    let mut i = 0;
                    while i < wants.len() {
                        let start = wants[i].leaf_off;
                        let mut end = start + wants[i].len as u64;
                        let mut j = i + 1;
                        while j < wants.len()
                            && wants[j].leaf_off == end
                            && (end - start) as usize + wants[j].len <= MAX_READ
                        {
                            end += wants[j].len as u64;
                            j += 1;
                        }
                        let pieces = |ws: &[Want]| {
                            ws.iter()
                                .map(|w| {
                                    (
                                        w.block,
                                        w.copy,
                                        w.buf_off,
                                        (w.leaf_off - start) as usize,
                                        w.len,
                                    )
                                })
                                .collect::<Vec<_>>()
                        };
                        let mut buf = AlignedBuf::take((end - start) as usize);
                        leaf.stats.reads.fetch_add(1, Ordering::Relaxed);
                        leaf.stats
                            .read_bytes
                            .fetch_add(buf.len() as u64, Ordering::Relaxed);
                        let ok = dev
                            .as_ref()
                            .is_some_and(|d| d.read_at_uncached(buf.as_mut_slice(), start).is_ok());
                        if ok {
                            out.push((Some(buf), pieces(&wants[i..j])));
                        } else {
                            buf.give();
                            // Retry piece by piece so one bad sector fails only its block.
                            for w in &wants[i..j] {
                                let mut b = AlignedBuf::take(w.len);
                                let ok =
                                    read_piece(&leaf, dev.as_deref(), b.as_mut_slice(), w.leaf_off);
                                out.push((
                                    ok.then_some(b),
                                    vec![(w.block, w.copy, w.buf_off, 0, w.len)],
                                ));
                            }
                        }
                        i = j;
                    }
                    out
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut bufs: Vec<Vec<Option<Data>>> = all.iter().map(|cs| vec![None; cs.len()]).collect();
    // Copies made of several pieces (a block split across stripe chunks) are gathered here.
    let mut gathered: HashMap<(usize, usize), AlignedBuf> = HashMap::new();
    // Pieces that failed to read poison their copy.
    let mut failed: Vec<Vec<bool>> = all.iter().map(|cs| vec![false; cs.len()]).collect();
    for (buf, pieces) in runs.into_iter().flatten() {
        match buf {
            None => {
                for (bi, ci, ..) in pieces {
                    failed[bi][ci] = true;
                }
            }
            Some(buf) => {
                let run = Data::own(buf);
                for (bi, ci, off, roff, len) in pieces {
                    if off == 0 && len == sizes[bi] {
                        // The whole copy lies in this read: refer to it.
                        bufs[bi][ci] = Some(run.sub(roff, len));
                    } else {
                        let dst = gathered
                            .entry((bi, ci))
                            .or_insert_with(|| AlignedBuf::zeroed(sizes[bi]));
                        dst.as_mut_slice()[off..off + len]
                            .copy_from_slice(&run.as_slice()[roff..roff + len]);
                    }
                }
            }
        }
    }
    for ((bi, ci), b) in gathered {
        bufs[bi][ci] = Some(Data::own(b));
    }
    for (bi, f) in failed.iter().enumerate() {
        for (ci, &bad) in f.iter().enumerate() {
            if bad {
                bufs[bi][ci] = None;
            }
        }
    }
    bufs
}

/// Counters of one batch.
#[derive(Default)]
struct BatchResult {
    examined: u64,
    issued: u64,
    repaired: u64,
    errors: u64,
}

/// Read `buf.len()` bytes at `off` from a leaf around the cache. A failure (or a closed device) is
/// counted as the leaf's read error and noted in its events.
fn read_piece(leaf: &LeafVdev, dev: Option<&dyn Leaf>, buf: &mut [u8], off: u64) -> bool {
    leaf.stats.reads.fetch_add(1, Ordering::Relaxed);
    leaf.stats
        .read_bytes
        .fetch_add(buf.len() as u64, Ordering::Relaxed);
    let r = match dev {
        Some(d) => d.read_at_uncached(buf, off),
        None => Err(std::io::Error::other("device closed")),
    };
    if let Err(e) = &r {
        leaf.stats.read_errors.fetch_add(1, Ordering::Relaxed);
        leaf.note("read_error", Some(off), e.to_string());
    }
    r.is_ok()
}

/// Write repaired or resilvered bytes to a leaf: counted in its writes (`iostat`) and as repaired
/// bytes, or as a write error (noted in its events). Returns the bytes written.
fn write_piece(leaf: &LeafVdev, dev: &dyn Leaf, buf: &[u8], off: u64) -> u64 {
    match leaf.counted_write(dev, buf, off) {
        Ok(()) => {
            leaf.stats
                .repaired_bytes
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            buf.len() as u64
        }
        Err(e) => {
            leaf.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            leaf.note("write_error", Some(off), e.to_string());
            0
        }
    }
}

/// Read one copy now (the rare fallback when a resilver's first source copy is bad).
fn read_copy(c: &Copy, psize: usize) -> Option<Data> {
    let mut buf = AlignedBuf::zeroed(psize);
    for p in &c.pieces {
        let dst = &mut buf.as_mut_slice()[p.buf_off..p.buf_off + p.len];
        if !read_piece(&p.leaf, p.leaf.dev().as_deref(), dst, p.leaf_off) {
            return None;
        }
    }
    Some(Data::own(buf))
}

/// Write verified data over a copy. Returns the bytes written.
fn write_copy(c: &Copy, data: &[u8]) -> u64 {
    c.pieces
        .iter()
        .filter_map(|p| {
            let dev = p.leaf.dev()?;
            Some(write_piece(
                &p.leaf,
                dev.as_ref(),
                &data[p.buf_off..p.buf_off + p.len],
                p.leaf_off,
            ))
        })
        .sum()
}

/// Write pieces to leaves, merging neighbours into writes of up to 1 MiB, all leaves in parallel.
/// Neighbours that also lie one after the other in the same read buffer are written from it without a
/// copy. Returns the bytes written.
fn write_merged(mut pieces: Vec<(Arc<LeafVdev>, u64, Data)>) -> u64 {
    pieces.sort_by_key(|(l, off, _)| (l.guid.0, *off));
    type Runs = Vec<(u64, usize, Vec<Data>)>;
    let mut per_leaf: Vec<(Arc<LeafVdev>, Runs)> = Vec::new();
    for (leaf, off, data) in pieces {
        match per_leaf.last_mut() {
            Some((l, runs)) if l.guid == leaf.guid => match runs.last_mut() {
                Some((start, len, parts)) if *start + *len as u64 == off && *len < MAX_READ => {
                    *len += data.len;
                    parts.push(data);
                }
                _ => runs.push((off, data.len, vec![data])),
            },
            _ => per_leaf.push((leaf, vec![(off, data.len, vec![data])])),
        }
    }
    // Each leaf's runs are split into WRITERS_PER_LEAF consecutive parts written in parallel.
    let mut jobs: Vec<(Arc<LeafVdev>, Runs)> = Vec::new();
    for (leaf, mut runs) in per_leaf {
        let part = runs.len().div_ceil(WRITERS_PER_LEAF).max(1);
        while !runs.is_empty() {
            let rest = runs.split_off(part.min(runs.len()));
            jobs.push((leaf.clone(), std::mem::replace(&mut runs, rest)));
        }
    }
    std::thread::scope(|sc| {
        let hs: Vec<_> = jobs
            .into_iter()
            .map(|(leaf, runs)| {
                sc.spawn(move || {
                    let Some(dev) = leaf.dev() else { return 0 };
                    let mut n = 0u64;
                    for (off, len, parts) in runs {
                        let whole = parts.windows(2).all(|w| w[0].continued_by(&w[1]));
                        let gathered;
                        let buf: &[u8] = if whole {
                            let first = &parts[0];
                            &first.buf.as_slice()[first.off..first.off + len]
                        } else {
                            let mut b = AlignedBuf::with_capacity(len);
                            for p in &parts {
                                b.extend_from_slice(p.as_slice());
                            }
                            gathered = b;
                            gathered.as_slice()
                        };
                        n += write_piece(&leaf, dev.as_ref(), buf, off);
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    })
}

/// Does this copy lie on a leaf that missed the block's txg (its dirty time log says so)? Such a copy
/// is expected to be stale: it is rewritten, never counted as a checksum error.
fn is_stale(c: &Copy, birth: Txg) -> bool {
    c.pieces.iter().any(|p| p.leaf.dtl_contains(birth))
}

/// Is this copy on a leaf that should hold the block but has not proven it (see
/// `LeafVdev::verify_below`)? A resilver verifies such copies instead of copying over them, and
/// counts the bad ones as checksum errors.
fn is_unproven(c: &Copy, birth: Txg) -> bool {
    !c.pieces.is_empty() && c.pieces.iter().all(|p| p.leaf.verifying(birth))
}

/// A batch whose reads are done, waiting to be verified and repaired.
struct Fetched {
    batch: ScanBatch,
    resilver: bool,
    missing: Vec<Vec<Copy>>,
    sources: Vec<Vec<Copy>>,
    all: Vec<Vec<Copy>>,
    bufs: Vec<Vec<Option<Data>>>,
}

impl Fetched {
    /// Return the batch's read buffers to the free list.
    fn recycle(self) {
        for d in self.bufs.into_iter().flatten().flatten() {
            d.recycle();
        }
    }
}

/// Plan and issue a batch's reads (no pool lock needed: the batch holds its vdevs and reader guard).
/// A scrub reads every copy. A resilver (non-empty `resilver_targets`) touches only blocks with a
/// copy on a target leaf that lacks them: it reads one good copy, to be written over those copies.
fn fetch(batch: ScanBatch, resilver_targets: &[u64]) -> Fetched {
    let resilver = !resilver_targets.is_empty();
    let mut missing: Vec<Vec<Copy>> = Vec::with_capacity(batch.blocks.len());
    let mut sources: Vec<Vec<Copy>> = Vec::with_capacity(batch.blocks.len());
    let mut verify: Vec<Vec<Copy>> = Vec::with_capacity(batch.blocks.len());
    for b in &batch.blocks {
        let cs = copies(&batch.vdevs, &b.bp);
        if resilver {
            let (m, s): (Vec<Copy>, Vec<Copy>) = cs.into_iter().partition(|c| {
                c.pieces
                    .iter()
                    .any(|p| resilver_targets.contains(&p.leaf.guid.0))
                    && is_stale(c, b.bp.birth)
            });
            // Copies that should be there but are unproven (a leaf attached again): read and
            // verified with the source, rewritten only if bad; the rest are copied.
            let (v, m): (Vec<Copy>, Vec<Copy>) =
                m.into_iter().partition(|c| is_unproven(c, b.bp.birth));
            // Every copy is on a leaf whose dirty time log covers the block: the log is
            // conservative (a write may have landed though it was counted as missed), so try them;
            // one that verifies is the source, and only if none does is the block lost.
            let mut s = if s.is_empty() { m.clone() } else { s };
            // Take turns between the sources by 2 MiB region (as application reads do), so every
            // good child serves a share of the copying.
            if let Some(first) = s.first().and_then(|c| c.pieces.first()) {
                let k = (first.leaf_off >> 21) as usize % s.len();
                s.rotate_left(k);
            }
            missing.push(m);
            sources.push(s);
            verify.push(v);
        } else {
            missing.push(Vec::new());
            sources.push(cs);
            verify.push(Vec::new());
        }
    }
    // What to read now: every copy (scrub), or the first source of blocks that need copying.
    let all: Vec<Vec<Copy>> = (0..batch.blocks.len())
        .map(|i| {
            if !resilver {
                sources[i].clone()
            } else if missing[i].is_empty() && verify[i].is_empty() {
                Vec::new()
            } else {
                // The first source, and the unproven copies (a source that turns out bad is
                // followed by the next one in `finish`).
                let mut v: Vec<Copy> = sources[i].iter().take(1).cloned().collect();
                v.extend(verify[i].iter().cloned());
                v
            }
        })
        .collect();
    let bufs = read_batch(&batch, &all);
    Fetched {
        batch,
        resilver,
        missing,
        sources,
        all,
        bufs,
    }
}

/// Verify a fetched batch on all cores and repair it.
fn finish(pool: &Pool, f: &Fetched) -> BatchResult {
    let (batch, resilver, missing, sources, all, bufs) = (
        &f.batch, f.resilver, &f.missing, &f.sources, &f.all, &f.bufs,
    );
    // Verify on all cores.
    let ok: Vec<Vec<bool>> = bufs
        .par_iter()
        .zip(batch.blocks.par_iter())
        .map(|(cs, b)| {
            cs.iter()
                .map(|d| {
                    d.as_ref()
                        .is_some_and(|d| *blake3::hash(d.as_slice()).as_bytes() == b.bp.checksum)
                })
                .collect()
        })
        .collect();
    let mut r = BatchResult::default();
    let mut pending: Vec<(Arc<LeafVdev>, u64, Data)> = Vec::new();
    let had_errors = pool.has_data_errors();
    for (bi, b) in batch.blocks.iter().enumerate() {
        r.examined += b.bp.psize as u64;
        if resilver && all[bi].is_empty() {
            continue;
        }
        r.issued += b.bp.psize as u64 * all[bi].len() as u64;
        let psize = b.bp.psize as usize;
        // The good data: a copy read in the batch, or (resilver) the next source that verifies.
        let mut good: Option<Data> = ok[bi]
            .iter()
            .position(|&v| v)
            .and_then(|g| bufs[bi][g].clone());
        // Copies that failed, and whether they were read (a failed read is a read error, already
        // counted, not a checksum error).
        let mut bad: Vec<(&Copy, bool)> = all[bi]
            .iter()
            .enumerate()
            .filter(|(ci, _)| !ok[bi][*ci])
            .map(|(ci, c)| (c, bufs[bi][ci].is_some()))
            .collect();
        if good.is_none() && resilver {
            for c in sources[bi].iter().skip(1) {
                r.issued += psize as u64;
                match read_copy(c, psize) {
                    Some(d) if *blake3::hash(d.as_slice()).as_bytes() == b.bp.checksum => {
                        good = Some(d);
                        break;
                    }
                    Some(_) => bad.push((c, true)),
                    None => bad.push((c, false)),
                }
            }
        }
        let Some(data) = good else {
            r.errors += 1;
            pool.record_data_error(b.object, b.blkid);
            for (c, read) in &bad {
                if !read {
                    continue;
                }
                for p in &c.pieces {
                    p.leaf.stats.cksum_errors.fetch_add(1, Ordering::Relaxed);
                    p.leaf
                        .note("checksum", Some(p.leaf_off), "no good copy".into());
                }
            }
            continue;
        };
        if had_errors {
            pool.clear_data_error(b.object, b.blkid);
        }
        // Copies that were read and failed: count (unless expected stale) and rewrite.
        for (c, read) in bad {
            if read && (!is_stale(c, b.bp.birth) || is_unproven(c, b.bp.birth)) {
                for p in &c.pieces {
                    p.leaf.stats.cksum_errors.fetch_add(1, Ordering::Relaxed);
                    p.leaf
                        .note("checksum", Some(p.leaf_off), "checksum mismatch".into());
                }
            }
            let n = write_copy(c, data.as_slice());
            if n > 0 {
                r.repaired += n;
                if let Some(p) = c.pieces.first() {
                    p.leaf
                        .note("repair", Some(p.leaf_off), format!("{n} bytes rewritten"));
                }
            }
        }
        // Resilver: the copies the targets lack (gathered, then written merged below).
        for c in &missing[bi] {
            for p in &c.pieces {
                pending.push((p.leaf.clone(), p.leaf_off, data.sub(p.buf_off, p.len)));
            }
        }
    }
    r.repaired += write_merged(pending);
    r
}

/// Run the pool's scan (if its state says scanning) until it finishes, is paused or stopped through
/// `control`, or fails. `progress` sees the state after every batch. The pool's `scrub_rate_limit`
/// caps the bytes read per second. Returns the final state.
pub fn run(
    pool: &Pool,
    control: &AtomicU8,
    progress: &mut dyn FnMut(&ScanState),
) -> Result<ScanState> {
    let mut s = pool.scan_state()?;
    if s.state != "scanning" {
        return Ok(s);
    }
    let mut last_commit = Instant::now();
    let mut prefetched: Option<Fetched> = None;
    let mut window_start = Instant::now();
    let mut window_bytes = 0u64;
    // Scanning time for the rate, counted from here: batches and the waits of the rate limit alike
    // (a scan held to its limit runs at the limit), carrying the sub-millisecond rest over.
    // A wait of the rate limit is counted when the batch before it is recorded (so the rate shown
    // is the limited one, not the burst of the batch), and not again when it has passed.
    let mut tick = Instant::now();
    let mut prepaid = 0u64;
    let mut active_ms = move |prepay: u64| {
        let ms = tick.elapsed().as_millis() as u64;
        tick += Duration::from_millis(ms);
        let paid = ms.min(prepaid);
        prepaid = prepaid - paid + prepay;
        ms - paid + prepay
    };
    loop {
        match control.load(Ordering::Relaxed) {
            PAUSE => {
                s = set_control(pool, PAUSE)?;
                return Ok(s);
            }
            STOP => {
                s = set_control(pool, STOP)?;
                return Ok(s);
            }
            _ => {}
        }
        // Someone else (a command) may have paused or stopped it in the pool.
        let cur = pool.scan_state()?;
        if cur.state != "scanning" {
            return Ok(cur);
        }
        if s.function == "rebuild" {
            let (examined, copied, next) = rebuild_step(pool, &s)?;
            s = pool.scan_state()?;
            s.examined += examined;
            s.issued += examined;
            s.repaired += copied;
            s.active_ms += active_ms(0);
            match next {
                Some(b) => s.bookmark = b,
                None => {
                    // Copied: the targets hold everything up to the start; a scrub verifies it.
                    pool.resilver_done(&s.targets, Txg(s.start_txg));
                    if let Err(e) = pool.finish_replacements() {
                        tracing::error!("cannot detach replaced leaves: {e}");
                    }
                    s.state = "finished".into();
                    s.end_time = now();
                    pool.set_scan_state(&s)?;
                    pool.sync()?;
                    progress(&s);
                    s = start_scrub(pool)?;
                    continue;
                }
            }
            pool.set_scan_state(&s)?;
            if last_commit.elapsed() > Duration::from_secs(2) {
                pool.sync()?;
                last_commit = Instant::now();
            }
            progress(&s);
            continue;
        }
        let targets: Vec<u64> = if s.function == "resilver" {
            s.targets.clone()
        } else {
            Vec::new()
        };
        let cur = match prefetched.take() {
            Some(f) => f,
            None => fetch(
                pool.scan_batch(s.bookmark, Txg(s.min_birth), BATCH_BLOCKS, BATCH_BYTES)?,
                &targets,
            ),
        };
        // Application reads go first: while any leaf has one outstanding, wait a little.
        for _ in 0..20 {
            let busy = cur.batch.vdevs.iter().any(|t| {
                t.children
                    .iter()
                    .any(|c| c.stats.pending.load(Ordering::Relaxed) > 0)
            });
            if !busy {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Read the next batch while this one is verified and repaired (not under a rate limit,
        // where reading ahead would only overshoot it).
        let next = cur.batch.next;
        let limit = rate_limit(pool);
        let ahead = match next {
            Some(bm) if limit == 0 => {
                Some(pool.scan_batch(bm, Txg(s.min_birth), BATCH_BLOCKS, BATCH_BYTES)?)
            }
            _ => None,
        };
        let (r, fetched_next) = std::thread::scope(|sc| {
            let h = ahead.map(|b| {
                let t = targets.clone();
                sc.spawn(move || fetch(b, &t))
            });
            let r = finish(pool, &cur);
            (r, h.and_then(|h| h.join().ok()))
        });
        prefetched = fetched_next;
        cur.recycle();
        s = pool.scan_state()?;
        s.examined += r.examined;
        s.issued += r.issued;
        s.repaired += r.repaired;
        s.errors += r.errors;
        // When scrub_rate_limit lets the next batch start (waited for below), and how long that is.
        let should = if limit > 0 {
            window_bytes += r.issued;
            Duration::from_secs_f64(window_bytes as f64 / limit as f64)
        } else {
            Duration::ZERO
        };
        let wait = should.saturating_sub(window_start.elapsed());
        s.active_ms += active_ms(wait.as_millis() as u64);
        match next {
            Some(b) => s.bookmark = b,
            None => {
                s.state = "finished".into();
                s.end_time = now();
                if s.to_examine < s.examined {
                    s.to_examine = s.examined;
                }
            }
        }
        pool.set_scan_state(&s)?;
        if s.state == "finished" {
            if s.function == "resilver" {
                pool.resilver_done(&s.targets, Txg(s.start_txg));
                if let Err(e) = pool.finish_replacements() {
                    tracing::error!("cannot detach replaced leaves: {e}");
                }
            } else {
                pool.scrub_done(Txg(s.start_txg));
            }
            pool.sync()?;
            progress(&s);
            // A resilver queued behind this scan starts now. Whether one was queued is asked of
            // the leaves, not of `s.queued`: a request that came while this worker held its own
            // copy of the state was written over by the worker's next save.
            let _ = request_resilver(pool);
            return Ok(s);
        }
        // Commit progress at least every few seconds even without a daemon's timer.
        if last_commit.elapsed() > Duration::from_secs(2) {
            pool.sync()?;
            last_commit = Instant::now();
        }
        progress(&s);
        if limit > 0 {
            // Sleep in small steps so pause and stop take effect at once.
            while window_start.elapsed() < should {
                if control.load(Ordering::Relaxed) != RUN {
                    break;
                }
                if pool.scan_state().is_ok_and(|c| c.state != "scanning") {
                    break;
                }
                std::thread::sleep(
                    Duration::from_millis(50).min(should - window_start.elapsed().min(should)),
                );
            }
            if window_start.elapsed() > Duration::from_secs(10) {
                window_start = Instant::now();
                window_bytes = 0;
            }
        }
    }
}

/// Scans running in the daemon, one per pool.
#[derive(Default)]
pub struct ScanManager {
    running: Mutex<HashMap<String, Arc<AtomicU8>>>,
}

impl ScanManager {
    /// Run the pool's scan in a background thread if its state says scanning and none runs yet.
    pub fn ensure_running(self: &Arc<Self>, name: &str, pool: Arc<Pool>) {
        let mut r = lock(&self.running);
        if r.contains_key(name) {
            return;
        }
        let Ok(s) = pool.scan_state() else { return };
        if s.state != "scanning" {
            return;
        }
        let control = Arc::new(AtomicU8::new(RUN));
        r.insert(name.to_string(), control.clone());
        let me = self.clone();
        let key = name.to_string();
        let name = name.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("cairn-scan-{name}"))
            .spawn(move || {
                loop {
                    match run(&pool, &control, &mut |_| {}) {
                        Ok(s) if s.state == "finished" => {
                            // A queued resilver may have been started: keep going if so.
                            if pool.scan_state().is_ok_and(|n| n.state == "scanning")
                                && control.load(Ordering::Relaxed) == RUN
                            {
                                continue;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::error!("scan of '{name}' stopped: {e}"),
                    }
                    break;
                }
                lock(&me.running).remove(&name);
            });
        if spawned.is_err() {
            r.remove(&key);
        }
    }

    /// Ask a running scan to pause or stop; false if none runs for this pool.
    pub fn signal(&self, name: &str, what: u8) -> bool {
        match lock(&self.running).get(name) {
            Some(c) => {
                c.store(what, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Start the scrubs that are due by their pool's `scrub_schedule` (the daemon calls this every
    /// second). The last run is kept in the pool (`ScanState::last_scrub`).
    pub fn run_schedules(self: &Arc<Self>, pools: &[(String, Arc<Pool>)]) {
        for (name, pool) in pools {
            if self.is_running(name) {
                continue;
            }
            let Ok(props) = pool.get_props(&["scrub_schedule".to_string()]) else {
                continue;
            };
            let Some(sched) = props.first().map(|p| p.1.clone()) else {
                continue;
            };
            let Ok(s) = pool.scan_state() else { continue };
            if s.state == "scanning" || s.state == "paused" {
                continue;
            }
            let last = (s.last_scrub > 0).then_some(s.last_scrub);
            match schedule::next_due(&sched, last) {
                Some(due) if due <= now() => {
                    tracing::info!("scheduled scrub of '{name}' ({sched})");
                    if start_scrub(pool).is_ok() {
                        self.ensure_running(name, pool.clone());
                    }
                }
                _ => {}
            }
        }
    }

    pub fn is_running(&self, name: &str) -> bool {
        lock(&self.running).contains_key(name)
    }

    /// Run the pool's scan in the calling thread (a foreground command), registered as running
    /// under `name` meanwhile, so that [`ScanManager::signal`] and [`ScanManager::is_running`]
    /// reach it as they reach a background scan.
    pub fn run_here(
        &self,
        name: &str,
        pool: &Pool,
        control: Arc<AtomicU8>,
        progress: &mut dyn FnMut(&ScanState),
    ) -> Result<ScanState> {
        lock(&self.running).insert(name.to_string(), control.clone());
        let r = run(pool, &control, progress);
        lock(&self.running).remove(name);
        r
    }
}
