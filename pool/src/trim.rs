//! TRIM: handing free space back to the leaves (punched holes in leaf files, discards on devices).
//!
//! Two ways, as in OpenZFS:
//! - **autotrim** (pool property, `on` by default): after every commit, the ranges whose deferred
//!   frees were just released (`Allocator::txg_done`: no committed txg within the deferral window
//!   and no reader can still reference them) are discarded on every usable child, if at least
//!   [`AUTOTRIM_MIN`] long (smaller ones are left for a manual trim, as zfs leaves extents under
//!   32 KiB). It runs under the pool lock, before anything can allocate the ranges again.
//! - **manual trim** (`cairn pool trim`): per leaf, a pass over its top-level vdev's space in chunks
//!   of [`TRIM_CHUNK`]; each chunk's free ranges are found and discarded on that leaf while the pool
//!   lock is held, so no allocation can land in them meanwhile. Progress (`LeafTrim`) is kept per leaf
//!   in the `trim` blob (committed with the next txg), so a pass resumes after a restart; suspend and
//!   cancel act between chunks.
//!
//! Invariant: nothing is discarded that is allocated, or freed within the deferral window, at the
//! moment of the discard (the lock is held from finding the range to discarding it).

use crate::error::{PoolError, Result};
use crate::pool::{blob_opts, Inner, Pool};
use bincode::Options;
use cairn_vdev::units::now_secs;
use cairn_vdev::Txg;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The blob holding every leaf's manual trim progress.
const BLOB: &str = "trim";
/// Autotrim leaves released ranges shorter than this (a manual trim takes them).
pub const AUTOTRIM_MIN: u64 = 32 * 1024;
/// Bytes of a vdev's space one manual trim step covers (with the pool lock held).
pub const TRIM_CHUNK: u64 = 64 << 20;

/// Where a leaf's manual trim stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrimState {
    Active,
    Suspended,
    Complete,
}

/// One leaf's manual trim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LeafTrim {
    pub state: TrimState,
    /// Next byte offset of the top-level vdev's space to look at.
    pub next: u64,
    /// The vdev's space (what 100 % means).
    pub total: u64,
    /// Bytes handed to the device so far.
    pub trimmed: u64,
    pub start_time: u64,
    /// When it was suspended or completed (0: neither).
    pub end_time: u64,
}

impl LeafTrim {
    /// Percent of the vdev's space looked at.
    pub fn percent(&self) -> u64 {
        if self.state == TrimState::Complete {
            100
        } else {
            (self.next * 100)
                .checked_div(self.total)
                .unwrap_or(0)
                .min(99)
        }
    }
}

/// The pool's trim state in memory.
#[derive(Default)]
pub(crate) struct TrimInner {
    pub(crate) autotrim: bool,
    leaves: BTreeMap<u64, LeafTrim>,
    /// The blob as last written (to rewrite it only on change).
    written: Vec<u8>,
}

/// Whether a background trim thread runs for the pool (`Pool::start_trim_thread`). Suspend and
/// cancel change the leaves' states, which the worker reads before every step.
#[derive(Default)]
pub struct TrimControl {
    running: AtomicBool,
}

/// What `Pool::trim` does to the leaves it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrimAction {
    Start,
    Suspend,
    Cancel,
}

impl TrimInner {
    /// A new pool's: nothing trimmed, autotrim as the property says.
    pub(crate) fn new_pool(autotrim: bool) -> TrimInner {
        TrimInner {
            autotrim,
            ..Default::default()
        }
    }
}

impl Inner {
    /// At open: the trim progress and the autotrim property.
    pub(crate) fn load_trim(&mut self) -> Result<()> {
        let props = self.user_props()?;
        self.trim.autotrim = props.get("autotrim").is_none_or(|v| v == "on");
        let b = self.read_named_blob(BLOB)?.unwrap_or_default();
        self.trim.leaves = if b.is_empty() {
            BTreeMap::new()
        } else {
            blob_opts()
                .deserialize(&b)
                .map_err(|e| PoolError::corrupt("pool trim record", e.to_string()))?
        };
        // Only leaves of this pool, and offsets within their vdev.
        let known: BTreeMap<u64, u64> = self
            .tree
            .tops
            .iter()
            .flat_map(|t| t.children.iter().map(|c| (c.guid.0, t.asize)))
            .collect();
        self.trim.leaves.retain(|g, t| {
            known.get(g).is_some_and(|&asize| {
                t.total = asize;
                t.next = t.next.min(asize);
                true
            })
        });
        self.trim.written = b;
        Ok(())
    }

    /// Write the trim blob if it changed (committed with the next txg).
    fn save_trim(&mut self) -> Result<()> {
        let b = blob_opts()
            .serialize(&self.trim.leaves)
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        if b != self.trim.written && (!self.trim.leaves.is_empty() || self.dir.contains_key(BLOB)) {
            self.write_named_blob(BLOB, &b)?;
            self.trim.written = b;
        }
        Ok(())
    }

    /// Autotrim: discard the ranges a commit just released (see the module docs). Called with the
    /// pool held, right after `Allocator::txg_done`.
    pub(crate) fn autotrim_released(&mut self, released: &[(usize, u64, u64)]) {
        if !self.trim.autotrim {
            return;
        }
        for &(top, off, len) in released {
            if len < AUTOTRIM_MIN {
                continue;
            }
            if let Some(t) = self.tree.tops.get(top) {
                t.discard(off, len);
            }
        }
    }

    /// One step of the manual trim of every active leaf: the next chunk of each. True while some
    /// leaf is still active.
    fn trim_step(&mut self) -> Result<bool> {
        self.check_writable()?;
        let vdevs = self.tree.tops.clone();
        let committed: Txg = self.committed;
        let active: Vec<u64> = self
            .trim
            .leaves
            .iter()
            .filter(|(_, t)| t.state == TrimState::Active)
            .map(|(g, _)| *g)
            .collect();
        for guid in active {
            let Some((ti, ci)) = vdevs.iter().enumerate().find_map(|(ti, t)| {
                t.children
                    .iter()
                    .position(|c| c.guid.0 == guid)
                    .map(|ci| (ti, ci))
            }) else {
                self.trim.leaves.remove(&guid);
                continue;
            };
            let t = self.trim.leaves.get(&guid).cloned().expect("listed above");
            let to = t.next.saturating_add(TRIM_CHUNK).min(t.total);
            let mut done = 0;
            // A leaf that is not usable now waits (its pass goes on when it is back).
            if vdevs[ti].children[ci].usable_dev().is_none() {
                continue;
            }
            for (off, len) in self.alloc.free_ranges(&vdevs, ti, t.next, to, committed)? {
                done += vdevs[ti].discard_child(ci, off, len).map_err(|source| {
                    PoolError::Vdev(cairn_vdev::VdevError::Io {
                        path: vdevs[ti].children[ci].path(),
                        op: "trim",
                        offset: off,
                        source,
                    })
                })?;
            }
            let e = self.trim.leaves.get_mut(&guid).expect("listed above");
            e.next = to;
            e.trimmed += done;
            if to >= e.total {
                e.state = TrimState::Complete;
                e.end_time = now_secs();
                vdevs[ti].children[ci].note("trim_finish", None, format!("{} trimmed", e.trimmed));
            }
        }
        self.save_trim()?;
        Ok(self
            .trim
            .leaves
            .values()
            .any(|t| t.state == TrimState::Active))
    }
}

impl Pool {
    /// Every leaf's manual trim state, by leaf guid (leaves never trimmed, or whose trim was
    /// canceled, have none).
    pub fn trim_status(&self) -> BTreeMap<u64, LeafTrim> {
        self.lock().trim.leaves.clone()
    }

    /// Is autotrim on?
    pub fn autotrim(&self) -> bool {
        self.lock().trim.autotrim
    }

    /// Start (or resume), suspend or cancel the manual trim of `leaves` (every leaf if empty).
    /// Returns the leaves' paths. Start refuses a leaf already being trimmed or not usable; suspend
    /// and cancel refuse a leaf with no trim in progress (suspended counts for cancel).
    pub fn trim(&self, leaves: &[String], action: TrimAction) -> Result<Vec<String>> {
        let mut g = self.lock();
        g.check_writable()?;
        let targets: Vec<_> = if leaves.is_empty() {
            g.tree
                .tops
                .iter()
                .flat_map(|t| t.children.iter().map(move |c| (t.clone(), c.clone())))
                .collect()
        } else {
            leaves
                .iter()
                .map(|n| self.find_leaf(&g, n))
                .collect::<Result<_>>()?
        };
        let explicit = !leaves.is_empty();
        // An active trim with no worker in this process (a foreground trim interrupted, a pool
        // imported again) is picked up again rather than refused.
        let worker = self.trim_control.running.load(Ordering::Acquire);
        let mut chosen = Vec::new();
        for (t, lv) in &targets {
            let cur = g.trim.leaves.get(&lv.guid.0).map(|x| x.state);
            let path = lv.path();
            match action {
                TrimAction::Start => {
                    if cur == Some(TrimState::Active) && worker {
                        if explicit {
                            return Err(PoolError::Invalid(format!(
                                "'{path}' is currently being trimmed"
                            )));
                        }
                        continue;
                    }
                    if lv.usable_dev().is_none() {
                        if explicit {
                            return Err(PoolError::Invalid(format!(
                                "'{path}' cannot be trimmed: it is {}",
                                lv.state().as_str().to_lowercase()
                            )));
                        }
                        continue;
                    }
                    chosen.push((lv.guid.0, t.asize, path, cur));
                }
                TrimAction::Suspend | TrimAction::Cancel => {
                    let ok = match action {
                        TrimAction::Suspend => cur == Some(TrimState::Active),
                        _ => matches!(cur, Some(TrimState::Active | TrimState::Suspended)),
                    };
                    if ok {
                        chosen.push((lv.guid.0, t.asize, path, cur));
                    } else if explicit {
                        return Err(PoolError::Invalid(format!(
                            "'{path}' has no trim in progress"
                        )));
                    }
                }
            }
        }
        if chosen.is_empty() {
            return Err(PoolError::Invalid(match action {
                TrimAction::Start => "every usable leaf is already being trimmed".into(),
                _ => "there is no trim in progress".into(),
            }));
        }
        let now = now_secs();
        for (guid, total, _, cur) in &chosen {
            match action {
                TrimAction::Start => {
                    let resume = matches!(cur, Some(TrimState::Suspended | TrimState::Active))
                        .then(|| g.trim.leaves.get(guid).cloned())
                        .flatten();
                    let e = resume.unwrap_or(LeafTrim {
                        state: TrimState::Active,
                        next: 0,
                        total: *total,
                        trimmed: 0,
                        start_time: now,
                        end_time: 0,
                    });
                    g.trim.leaves.insert(
                        *guid,
                        LeafTrim {
                            state: TrimState::Active,
                            end_time: 0,
                            ..e
                        },
                    );
                }
                TrimAction::Suspend => {
                    if let Some(e) = g.trim.leaves.get_mut(guid) {
                        e.state = TrimState::Suspended;
                        e.end_time = now;
                    }
                }
                TrimAction::Cancel => {
                    g.trim.leaves.remove(guid);
                }
            }
        }
        g.save_trim()?;
        g.sync_txg()?;
        Ok(chosen.into_iter().map(|c| c.2).collect())
    }

    /// Is some leaf's manual trim active?
    pub fn trim_active(&self) -> bool {
        self.lock()
            .trim
            .leaves
            .values()
            .any(|t| t.state == TrimState::Active)
    }

    /// Run the manual trims until no leaf is active, the pool closes or fails (the error), or
    /// `stop` returns true (checked between steps; the state stays active, to be resumed).
    /// `progress` runs after every step. Commits at the end.
    pub fn run_trim(&self, stop: &dyn Fn() -> bool, progress: &mut dyn FnMut()) -> Result<()> {
        loop {
            if stop() {
                break;
            }
            let more = self.lock().trim_step()?;
            progress();
            if !more {
                break;
            }
        }
        self.lock().sync_txg()
    }

    /// Run the manual trims in a background thread (the daemon), unless one runs already.
    pub fn start_trim_thread(self: &Arc<Self>) {
        if !self.trim_active() {
            return;
        }
        if self.trim_control.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.clone();
        let spawned = std::thread::Builder::new()
            .name("cairn-trim".into())
            .spawn(move || {
                // Suspend and cancel change the leaves' states directly; the thread ends when no
                // leaf is left active.
                let r = pool.run_trim(&|| false, &mut || {});
                if let Err(e) = r {
                    tracing::warn!(pool = %pool.name(), error = %e, "trim stopped");
                }
                pool.trim_control.running.store(false, Ordering::Release);
                // A trim started between the last step and here.
                if pool.trim_active() && pool.lock().check_writable().is_ok() {
                    pool.start_trim_thread();
                }
            });
        if spawned.is_err() {
            self.trim_control.running.store(false, Ordering::Release);
        }
    }

    /// Wait until no leaf's manual trim is active (or the pool is closed).
    pub fn wait_trim(&self) {
        while self.trim_active() && self.lock().check_writable().is_ok() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}
