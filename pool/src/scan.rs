//! What the scan engine (scrub, resilver; crate cairn-scrub) needs from the pool: batches of block
//! pointers in a resumable order, where every copy of a block lives, repair writes, and the persistent
//! scan state.
//!
//! Order: the objset block, then object 0 (the dnodes), then objects 1, 2, ... each depth-first in
//! level-0 order; a [`Bookmark`] (object, level-0 block) says where to resume. A batch is collected
//! under the pool lock from the committed tree and comes with a reader guard: until the guard is
//! dropped, no block freed after that state is reused, so reading and repairing the batch's blocks
//! outside the lock can never touch someone else's data.

use crate::blkptr::BlockPtr;
use crate::error::{PoolError, Result};
use crate::pool::{blob_opts, Pool, ReaderGuard};
use bincode::Options;
use cairn_vdev::config::TopKind;
use cairn_vdev::tree::{LeafVdev, TopVdev};
use cairn_vdev::units::lock;
use cairn_vdev::Txg;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Where a scan resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Bookmark {
    /// 0: the objset block and the dnodes; then object ids.
    pub object: u64,
    pub blkid: u64,
    /// True until the objset block itself has been handed out.
    pub before_root: bool,
}

impl Bookmark {
    pub const START: Bookmark = Bookmark {
        object: 0,
        blkid: 0,
        before_root: true,
    };
}

/// A block to scan.
#[derive(Clone, Debug)]
pub struct ScanBlock {
    pub bp: BlockPtr,
    pub object: u64,
    /// First level-0 block under this pointer (the block itself for data).
    pub blkid: u64,
}

/// A batch of blocks; hold it (its guard) while reading and repairing them.
pub struct ScanBatch {
    pub blocks: Vec<ScanBlock>,
    /// Where the next batch starts; `None` when the pool has been walked completely.
    pub next: Option<Bookmark>,
    pub vdevs: Vec<Arc<TopVdev>>,
    _guard: ReaderGuard,
}

/// One piece of one copy of a block on a leaf.
#[derive(Clone)]
pub struct Piece {
    pub leaf: Arc<LeafVdev>,
    pub leaf_off: u64,
    /// Offset of the piece within the block.
    pub buf_off: usize,
    pub len: usize,
}

/// One full copy of a block: a DVA on one mirror child, or a DVA of a single/stripe vdev (whose
/// pieces may lie on several leaves).
#[derive(Clone)]
pub struct Copy {
    pub dva: usize,
    pub pieces: Vec<Piece>,
}

/// Every copy of a block, in DVA then child order. Copies on unusable leaves are left out.
pub fn copies(vdevs: &[Arc<TopVdev>], bp: &BlockPtr) -> Vec<Copy> {
    let mut out = Vec::new();
    for (i, d) in bp.dvas.iter().enumerate().filter(|(_, d)| !d.is_empty()) {
        let Some(t) = vdevs.get(d.vdev as usize) else {
            continue;
        };
        if d.offset
            .checked_add(bp.psize as u64)
            .is_none_or(|e| e > t.asize)
        {
            continue;
        }
        let segs = t.segments(d.offset, bp.psize as usize);
        match t.kind {
            TopKind::Mirror => {
                for c in &t.children {
                    if !c.state().usable() {
                        continue;
                    }
                    out.push(Copy {
                        dva: i,
                        pieces: segs
                            .iter()
                            .map(|s| Piece {
                                leaf: c.clone(),
                                leaf_off: s.leaf_off,
                                buf_off: s.buf_off,
                                len: s.len,
                            })
                            .collect(),
                    });
                }
            }
            _ => {
                if segs.iter().any(|s| !t.children[s.child].state().usable()) {
                    continue;
                }
                out.push(Copy {
                    dva: i,
                    pieces: segs
                        .iter()
                        .map(|s| Piece {
                            leaf: t.children[s.child].clone(),
                            leaf_off: s.leaf_off,
                            buf_off: s.buf_off,
                            len: s.len,
                        })
                        .collect(),
                });
            }
        }
    }
    out
}

/// The persistent state of the pool's scan (scrub or resilver), saved with every txg.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScanState {
    /// "scrub", "resilver" or "rebuild" (sequential resilver); empty if none ever ran.
    pub function: String,
    /// "scanning", "paused", "finished", "canceled".
    pub state: String,
    pub start_time: u64,
    pub end_time: u64,
    /// Paused since (0 if not paused).
    pub paused_at: u64,
    /// Txg the scan started in (a resilver clears the dirty time logs up to it when it completes).
    pub start_txg: u64,
    /// Resilver: only blocks born after this txg (the oldest missed txg minus one).
    pub min_birth: u64,
    pub bookmark: Bookmark,
    /// Allocated bytes when the scan started (what there is to examine).
    pub to_examine: u64,
    pub examined: u64,
    pub issued: u64,
    pub repaired: u64,
    pub errors: u64,
    /// Milliseconds spent scanning (not paused), for the rate.
    pub active_ms: u64,
    /// Resilver: the leaves it rebuilds (guids).
    pub targets: Vec<u64>,
    /// A resilver queued behind the running scan (leaf guids).
    pub queued: Vec<u64>,
    /// When the last scrub started (for `scrub_schedule`); 0 if never.
    pub last_scrub: u64,
}

const SCAN: &str = "scan";

impl Pool {
    /// The next batch of at most `max_blocks` blocks (or about `max_bytes` of block data) from `from`,
    /// skipping blocks born at or before `min_birth`.
    pub fn scan_batch(
        &self,
        from: Bookmark,
        min_birth: Txg,
        max_blocks: usize,
        max_bytes: u64,
    ) -> Result<ScanBatch> {
        let mut g = self.lock();
        let inner = &mut *g;
        let vdevs = inner.tree.tops.clone();
        let guard = ReaderGuard::new(&inner.readers, inner.committed);
        let mut blocks: Vec<ScanBlock> = Vec::new();
        let mut bytes = 0u64;
        let mut bm = from;
        if bm.before_root {
            if inner.root_bp.birth > min_birth {
                blocks.push(ScanBlock {
                    bp: inner.root_bp,
                    object: 0,
                    blkid: 0,
                });
            }
            bm.before_root = false;
        }
        let mut next = None;
        'objects: loop {
            let max = inner.mos.max_objects();
            if bm.object >= max.max(1) {
                break;
            }
            let mut full = |bp: &BlockPtr, blkid: u64, object: u64| -> bool {
                if blocks.len() >= max_blocks || bytes >= max_bytes {
                    return false;
                }
                bytes += bp.psize as u64;
                blocks.push(ScanBlock {
                    bp: *bp,
                    object,
                    blkid,
                });
                true
            };
            let object = bm.object;
            let r = if object == 0 {
                inner
                    .mos
                    .meta_obj()
                    .walk(&vdevs, bm.blkid, min_birth, &mut |bp, b| full(bp, b, 0))
            } else {
                match inner.mos.obj(&vdevs, object) {
                    // Blocks a volume or snapshot shares with its previous snapshot are that
                    // snapshot's to visit: every block is scanned once.
                    Ok(o) => {
                        let mb = min_birth.max(o.dnode.prev_snap_txg());
                        o.walk(&vdevs, bm.blkid, mb, &mut |bp, b| full(bp, b, object))
                    }
                    Err(PoolError::NotFound(_)) => Ok(None),
                    Err(e) => Err(e),
                }
            };
            match r {
                Ok(Some(b)) => {
                    next = Some(Bookmark {
                        object,
                        blkid: b,
                        before_root: false,
                    });
                    break 'objects;
                }
                Ok(None) => {}
                Err(e) => {
                    // An unreadable indirect block: count it and move on to the next object.
                    tracing::error!("scan: object {object}: {e}");
                    lock(&inner.errlog).insert((object, bm.blkid));
                }
            }
            bm = Bookmark {
                object: object + 1,
                blkid: 0,
                before_root: false,
            };
        }
        Ok(ScanBatch {
            blocks,
            next,
            vdevs,
            _guard: guard,
        })
    }

    /// Allocated byte ranges of top-level vdev `top` from offset `from` (sequential rebuild).
    pub fn allocated_ranges(&self, top: usize, from: u64, max: usize) -> Result<Vec<(u64, u64)>> {
        let mut g = self.lock();
        let inner = &mut *g;
        let vdevs = inner.tree.tops.clone();
        let committed = inner.committed;
        inner
            .alloc
            .allocated_ranges(&vdevs, top, from, max, committed)
    }

    /// The top-level vdevs (for I/O outside the pool lock).
    pub fn top_vdevs(&self) -> Vec<Arc<TopVdev>> {
        self.lock().tree.tops.clone()
    }

    /// Record a block no copy of which could be read correctly.
    pub fn record_data_error(&self, object: u64, blkid: u64) {
        let g = self.lock();
        lock(&g.errlog).insert((object, blkid));
    }

    /// Are there permanent errors at all (cheap check before clearing entries)?
    pub fn has_data_errors(&self) -> bool {
        let g = self.lock();
        let empty = lock(&g.errlog).is_empty();
        !empty
    }

    /// A block that is fine again (a scrub found a good copy): drop it from the error list.
    pub fn clear_data_error(&self, object: u64, blkid: u64) {
        let g = self.lock();
        lock(&g.errlog).remove(&(object, blkid));
    }

    /// The scan state (default if no scan ever ran).
    pub fn scan_state(&self) -> Result<ScanState> {
        match self.read_named_blob(SCAN)? {
            None => Ok(ScanState::default()),
            Some(b) if b.is_empty() => Ok(ScanState::default()),
            Some(b) => blob_opts()
                .deserialize(&b)
                .map_err(|e| PoolError::corrupt("scan state", e.to_string())),
        }
    }

    /// Save the scan state (committed with the next txg).
    pub fn set_scan_state(&self, s: &ScanState) -> Result<()> {
        let b = blob_opts()
            .serialize(s)
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        self.write_named_blob(SCAN, &b)
    }

    /// Allocated bytes of the pool now.
    pub fn allocated(&self) -> u64 {
        self.space().1
    }

    /// The leaves whose dirty time logs are not empty, with their oldest missed txg.
    pub fn leaves_needing_resilver(&self) -> Vec<(u64, Txg)> {
        let g = self.lock();
        g.tree
            .leaves()
            .filter(|(t, l)| t.kind == TopKind::Mirror && l.state().usable())
            .filter_map(|(_, l)| {
                let d = lock(&l.dtl);
                d.first().map(|r| (l.guid.0, r.0))
            })
            .collect()
    }

    /// After a scrub that started at `start_txg` completed: it read every copy of every block and
    /// rewrote the missing ones, so a leaf that lacked only txgs up to the start (and missed nothing
    /// while the scrub ran: it was usable throughout) lacks nothing any more.
    pub fn scrub_done(&self, start_txg: Txg) {
        let g = self.lock();
        for (_, l) in g.tree.leaves() {
            let mut d = lock(&l.dtl);
            if !d.is_empty() && d.iter().all(|&(_, b)| b <= start_txg) && l.state().usable() {
                d.clear();
                drop(d);
                l.dtl_settled();
                l.note(
                    "resilver_done",
                    None,
                    "scrub rewrote every missing copy".into(),
                );
            }
        }
    }

    /// After a resilver that started at `start_txg` completed: the listed leaves hold every txg up to
    /// it, so drop those ranges from their dirty time logs.
    pub fn resilver_done(&self, targets: &[u64], start_txg: Txg) {
        let g = self.lock();
        for (_, l) in g.tree.leaves() {
            if !targets.contains(&l.guid.0) {
                continue;
            }
            let mut d = lock(&l.dtl);
            // A target that is unavailable now, or that missed txgs after the resilver started
            // (it was unavailable for a while, or writes to it failed), may not have taken the
            // resilver's copies either: it keeps everything it lacked, and needs another resilver.
            if !l.state().usable() || d.iter().any(|&(_, b)| b > start_txg) {
                l.note(
                    "resilver_incomplete",
                    None,
                    format!(
                        "was unavailable or missed writes during the resilver through txg \
                         {start_txg}: it still lacks txgs"
                    ),
                );
                continue;
            }
            let mut kept = Vec::new();
            for &(a, b) in d.iter() {
                if b <= start_txg {
                    continue;
                }
                kept.push((a.max(Txg(start_txg.0 + 1)), b));
            }
            *d = kept;
            drop(d);
            l.dtl_settled();
        }
        g.tree.events.push(cairn_vdev::tree::Event {
            time: cairn_vdev::units::now_secs(),
            class: "resilver_done".into(),
            vdev: String::new(),
            offset: None,
            detail: format!("resilvered through txg {start_txg}"),
        });
    }
}
