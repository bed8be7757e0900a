//! The commit's label and uberblock writes, and the flushes of the whole tree, issued to all leaves in
//! parallel (each leaf's own workers, `dispatch.rs`).
//!
//! The order between label copies is kept (on-disk-format.md §12.2): every phase (even labels, the
//! uberblocks, the odd labels) is handed to every leaf at once, and the next phase starts only after
//! every leaf flushed (or was left behind). A mirror child that is slower than the pool's slow-I/O
//! deadline while a sibling holding every txg answered is faulted "too slow" and takes no part in the
//! later phases; its missed txg goes into its dirty time log.

use crate::config::PoolConfig;
use crate::dispatch::Pending;
use crate::error::{Result, VdevError};
use crate::label::{self, Uberblock};
use crate::leaf::Leaf;
use crate::tree::{LeafVdev, TopVdev, VdevTree};
use crate::units::Guid;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// One leaf's part of a commit: its top-level vdev (index in `tops`), child index, guids and device.
#[derive(Clone)]
struct Target {
    top: usize,
    child: usize,
    top_guid: Guid,
    leaf_guid: Guid,
    dev: Arc<dyn Leaf>,
    lv: Arc<LeafVdev>,
}

impl VdevTree {
    /// Flush every top-level vdev that takes I/O (an unavailable one has nothing of this txg), all
    /// leaves in parallel.
    pub fn flush_all(&self) -> Result<()> {
        let usable: Vec<&Arc<TopVdev>> = self.tops.iter().filter(|t| t.state().usable()).collect();
        let pend: Vec<_> = usable.iter().map(|t| t.submit_flush()).collect();
        let mut first_err = None;
        for (t, p) in usable.iter().zip(pend) {
            if let Err(e) = t.finish_flush(p) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn targets(&self) -> Vec<Target> {
        self.tops
            .iter()
            .enumerate()
            .flat_map(|(ti, t)| {
                t.children.iter().enumerate().filter_map(move |(ci, c)| {
                    c.usable_dev().map(|dev| Target {
                        top: ti,
                        child: ci,
                        top_guid: t.guid,
                        leaf_guid: c.guid,
                        dev,
                        lv: c.clone(),
                    })
                })
            })
            .collect()
    }

    /// Hand `job` to every target's worker (a target no longer usable is skipped), wait for all (per
    /// top-level vdev, so a slow mirror child may be left behind), and return each target's answer
    /// (`None`: skipped or left behind).
    fn run_phase(
        &self,
        targets: &[Target],
        what: &str,
        job: impl Fn(&Target) -> bool + Send + Sync + 'static,
    ) -> Vec<Option<bool>> {
        let job = Arc::new(job);
        let pend: Vec<Option<Pending<bool>>> = targets
            .iter()
            .map(|t| {
                if !t.lv.state().usable() {
                    return None;
                }
                let job = job.clone();
                let t2 = t.clone();
                Some(t.lv.queue.submit(move || {
                    if !t2.lv.state().usable() {
                        return false;
                    }
                    job(&t2)
                }))
            })
            .collect();
        let mut slots: Vec<Option<Pending<bool>>> = pend;
        let mut out: Vec<Option<bool>> = vec![None; targets.len()];
        for (ti, top) in self.tops.iter().enumerate() {
            let idx: Vec<usize> = (0..targets.len())
                .filter(|&i| targets[i].top == ti)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let mut per_child: Vec<Option<Pending<bool>>> =
                (0..top.children.len()).map(|_| None).collect();
            for &i in &idx {
                if let Some(slot) = per_child.get_mut(targets[i].child) {
                    *slot = slots[i].take();
                }
            }
            let res = top.gather(per_child, |b| *b, what);
            for &i in &idx {
                out[i] = res.get(targets[i].child).copied().flatten();
            }
        }
        out
    }

    /// Flush every target in parallel; true where the flush succeeded.
    fn flush_phase(&self, targets: &[Target], after: &'static str) -> Vec<bool> {
        self.run_phase(targets, "flush", move |t| match t.dev.flush() {
            Ok(()) => true,
            Err(e) => {
                t.lv.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("{}: flush after {after} failed: {e}", t.dev.path());
                false
            }
        })
        .into_iter()
        .map(|r| r == Some(true))
        .collect()
    }

    /// Rewrite the uberblock the pool was opened from with its clean flag cleared, one label at a
    /// time with a flush after each (so a crash can tear at most one copy per leaf), all leaves in
    /// parallel, before a session that opened from a clean uberblock commits anything: a crash in
    /// that first commit must be seen by the next open as an unclean close.
    pub fn mark_dirty(&self, ub: &Uberblock) -> Result<()> {
        let targets = self.targets();
        let ub = ub.clone();
        let res = self.run_phase(&targets, "label write", move |t| {
            let mut leaf_ok = true;
            for i in 0..4 {
                let r = label::write_uberblock(t.dev.as_ref(), i, &ub).and_then(|()| {
                    t.dev
                        .flush()
                        .map_err(|e| VdevError::io(t.dev.path(), "flush", 0, e))
                });
                if let Err(e) = r {
                    t.lv.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("{e}");
                    leaf_ok = false;
                }
            }
            leaf_ok
        });
        if !res.contains(&Some(true)) {
            return Err(VdevError::Invalid {
                path: "pool".into(),
                reason: "the pool could not be marked in use on any leaf".into(),
            });
        }
        Ok(())
    }

    /// Commit a txg's labels: with a new configuration, even labels, flush, uberblocks, flush, odd
    /// labels, flush; otherwise just the uberblocks and a flush. Each step goes to all leaves in
    /// parallel. Succeeds if at least one leaf both took the uberblock and flushed it (import takes
    /// the newest uberblock found on any leaf).
    pub fn sync_labels(&self, config: Option<&PoolConfig>, ub: &Uberblock) -> Result<()> {
        let encoded = match config {
            Some(c) => Some(Arc::new(label::encode_config(c).map_err(|reason| {
                VdevError::Invalid {
                    path: "pool config".into(),
                    reason,
                }
            })?)),
            None => None,
        };
        let config = config.map(|c| Arc::new(c.clone()));
        let targets = self.targets();
        let write_labels = |idxs: [usize; 2], what: &'static str| {
            if let (Some(c), Some(enc)) = (config.clone(), encoded.clone()) {
                self.run_phase(&targets, "label write", move |t| {
                    let mut ok = true;
                    for i in idxs {
                        let r = label::write_label(
                            t.dev.as_ref(),
                            i,
                            &c,
                            &enc,
                            t.leaf_guid,
                            t.top_guid,
                        );
                        if let Err(e) = r {
                            t.lv.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("{e}");
                            ok = false;
                        }
                    }
                    ok
                });
                self.flush_phase(&targets, what);
            }
        };
        write_labels([0, 2], "even labels");
        let ub2 = ub.clone();
        let wrote: Vec<bool> = self
            .run_phase(&targets, "uberblock write", move |t| {
                let mut any = false;
                for i in 0..4 {
                    match label::write_uberblock(t.dev.as_ref(), i, &ub2) {
                        Ok(()) => any = true,
                        Err(e) => {
                            t.lv.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("{e}");
                        }
                    }
                }
                any
            })
            .into_iter()
            .map(|r| r == Some(true))
            .collect();
        let flushed = self.flush_phase(&targets, "uberblocks");
        for ((t, w), f) in targets.iter().zip(&wrote).zip(&flushed) {
            // A leaf that took none of this txg's uberblocks (or did not flush them) is behind
            // from now on: its dirty time log must say so, or the next open takes it for an
            // older copy.
            if !w || !f {
                t.lv.missed.store(true, Ordering::Relaxed);
            }
        }
        if !wrote.iter().zip(&flushed).any(|(w, f)| *w && *f) {
            return Err(VdevError::Invalid {
                path: "pool".into(),
                reason: format!("txg {} could not be written to any leaf", ub.txg),
            });
        }
        write_labels([1, 3], "odd labels");
        Ok(())
    }
}
