//! Per-leaf I/O queues, and waiting for the children of a top-level vdev with a deadline.
//!
//! Every leaf has an [`IoQueue`]: a few worker threads of its own (started on demand, at most
//! [`MAX_WORKERS`]) that run the writes and flushes the tree hands it. The caller submits one job per
//! child and waits for the answers, so the children of a mirror are written in parallel, and the label
//! and uberblock writes and flushes of all leaves of a commit too (`labelsync.rs`).
//!
//! A job is `'static` (it owns its data and its device handle), so a caller need not wait for it: a
//! mirror child whose job has not answered within the pool's slow-I/O deadline, while a sibling that
//! holds every txg has answered it, is faulted "too slow" ([`LeafVdev::too_slow`]) and left behind.
//! The job still runs (a write cannot be taken back), but the leaf takes no more I/O, its missed
//! writes go into its dirty time log (the `missed` flag), and jobs queued behind it find the leaf no
//! longer usable and do nothing. [`IoQueue::inflight`] counts what has not finished, so `clear` can
//! wait until no old write can land on top of a resilver's.
//!
//! Invariants: the last copy is never left behind (a single leaf, a stripe child, or a mirror child
//! whose siblings lack a txg or did not take this I/O is waited for however long it takes); a
//! deadline of 0 waits for everything.

use crate::config::TopKind;
use crate::tree::{LeafVdev, TopVdev};
use crate::units::lock;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Worker threads per leaf at most (more jobs wait in its queue).
pub const MAX_WORKERS: usize = 4;

/// The default slow-I/O deadline in milliseconds (the pool property `slow_io_deadline`).
pub const DEFAULT_SLOW_MS: u64 = 10_000;

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    workers: usize,
    idle: usize,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<QueueState>,
    cv: Condvar,
    /// Jobs submitted and not finished.
    inflight: AtomicUsize,
}

/// A leaf's I/O queue (see the module doc).
#[derive(Default)]
pub struct IoQueue {
    shared: Arc<Shared>,
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.cv.notify_all();
    }
}

/// The answer of a submitted job, to wait for. A job that panicked makes the waiter panic with the
/// same payload (as if it had run on the waiter's thread); its worker goes on.
pub struct Pending<T> {
    rx: mpsc::Receiver<std::thread::Result<T>>,
    started: Instant,
}

fn unwound<T>(r: std::thread::Result<T>) -> T {
    r.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

impl<T> Pending<T> {
    /// Waits until the job answers or `until` passes: `Err(Timeout)` at the deadline,
    /// `Err(Disconnected)` if the job was lost.
    fn wait_until(&self, until: Instant) -> Result<T, RecvTimeoutError> {
        let left = until.saturating_duration_since(Instant::now());
        self.rx.recv_timeout(left).map(unwound)
    }

    fn try_take(&self) -> Result<T, TryRecvError> {
        self.rx.try_recv().map(unwound)
    }

    /// Waits for the answer, however long it takes. `None` only if the job was lost.
    pub fn wait(self) -> Option<T> {
        self.rx.recv().ok().map(unwound)
    }
}

/// Counts a job as finished when dropped, even if it unwinds.
struct Finished(Arc<Shared>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl IoQueue {
    /// Jobs submitted and not finished (a write in progress on a slow device included).
    pub fn inflight(&self) -> usize {
        self.shared.inflight.load(Ordering::Acquire)
    }

    /// Runs `f` on one of the leaf's workers.
    pub fn submit<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Pending<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let shared = self.shared.clone();
        shared.inflight.fetch_add(1, Ordering::AcqRel);
        let done = Finished(shared.clone());
        let job: Job = Box::new(move || {
            let _done = done;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        });
        let started = Instant::now();
        let mut st = lock(&shared.state);
        st.jobs.push_back(job);
        if st.idle == 0 && st.workers < MAX_WORKERS {
            let w = shared.clone();
            let spawned = std::thread::Builder::new()
                .name("cairn-leaf-io".into())
                .spawn(move || worker(w));
            if spawned.is_ok() {
                st.workers += 1;
            } else if st.workers == 0 {
                // No worker and none can be started: run it here.
                let job = st.jobs.pop_back();
                drop(st);
                if let Some(job) = job {
                    job();
                }
                return Pending { rx, started };
            }
        }
        drop(st);
        shared.cv.notify_one();
        Pending { rx, started }
    }
}

fn worker(shared: Arc<Shared>) {
    loop {
        let job = {
            let mut st = lock(&shared.state);
            loop {
                if let Some(j) = st.jobs.pop_front() {
                    break Some(j);
                }
                if st.closed {
                    break None;
                }
                st.idle += 1;
                st = shared.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                st.idle -= 1;
            }
        };
        match job {
            Some(j) => j(),
            None => {
                lock(&shared.state).workers -= 1;
                return;
            }
        }
    }
}

/// How often a wait past the deadline looks again whether a sibling has answered.
const RECHECK: Duration = Duration::from_millis(50);

impl TopVdev {
    /// Waits for one job per child (`None`: nothing was submitted to that child) and returns the
    /// answers (`None`: not submitted, or left behind). `ok` says whether an answer means the child
    /// took the I/O. A mirror child still working after the deadline is left behind (faulted "too
    /// slow") when a sibling holding every txg took this I/O; otherwise it is waited for.
    pub fn gather<T>(
        &self,
        pend: Vec<Option<Pending<T>>>,
        ok: impl Fn(&T) -> bool,
        what: &str,
    ) -> Vec<Option<T>> {
        let deadline_ms = self.slow_ms.load(Ordering::Relaxed);
        let mut out: Vec<Option<T>> = Vec::with_capacity(pend.len());
        let mut waiting: Vec<Option<Pending<T>>> = Vec::with_capacity(pend.len());
        // First pass: every answer that comes within the deadline.
        for p in pend {
            match p {
                None => {
                    out.push(None);
                    waiting.push(None);
                }
                Some(p) => {
                    let got = if deadline_ms == 0 || !matches!(self.kind, TopKind::Mirror) {
                        p.rx.recv()
                            .map(unwound)
                            .map_err(|_| RecvTimeoutError::Disconnected)
                    } else {
                        p.wait_until(p.started + Duration::from_millis(deadline_ms))
                    };
                    match got {
                        Ok(v) => {
                            out.push(Some(v));
                            waiting.push(None);
                        }
                        Err(RecvTimeoutError::Disconnected) => {
                            out.push(None);
                            waiting.push(None);
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            out.push(None);
                            waiting.push(Some(p));
                        }
                    }
                }
            }
        }
        // The late ones: leave them behind when allowed, else keep waiting.
        while waiting.iter().any(Option::is_some) {
            let mut progressed = false;
            for ci in 0..waiting.len() {
                let Some(p) = waiting[ci].as_ref() else {
                    continue;
                };
                match p.try_take() {
                    Ok(v) => {
                        out[ci] = Some(v);
                        waiting[ci] = None;
                        progressed = true;
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => {
                        waiting[ci] = None;
                        progressed = true;
                        continue;
                    }
                    Err(TryRecvError::Empty) => {}
                }
                let c = &self.children[ci];
                if !c.state().usable() {
                    // Faulted meanwhile (by another I/O of the same commit, most likely).
                    c.missed.store(true, Ordering::Relaxed);
                    waiting[ci] = None;
                    progressed = true;
                    continue;
                }
                if self.sibling_holds_all(ci, &out, &ok) {
                    c.missed.store(true, Ordering::Relaxed);
                    c.too_slow(what, deadline_ms);
                    waiting[ci] = None;
                    progressed = true;
                }
            }
            if !progressed {
                if let Some(ci) = waiting.iter().position(Option::is_some) {
                    let got = waiting[ci]
                        .as_ref()
                        .map(|p| p.wait_until(Instant::now() + RECHECK));
                    match got {
                        Some(Ok(v)) => {
                            out[ci] = Some(v);
                            waiting[ci] = None;
                        }
                        Some(Err(RecvTimeoutError::Disconnected)) => waiting[ci] = None,
                        _ => {}
                    }
                }
            }
        }
        out
    }

    /// Does a usable child other than `ci`, holding every txg (no dirty time log, no missed write in
    /// this txg), have an answer in `out` that took the I/O?
    fn sibling_holds_all<T>(&self, ci: usize, out: &[Option<T>], ok: &impl Fn(&T) -> bool) -> bool {
        matches!(self.kind, TopKind::Mirror)
            && self.children.iter().enumerate().any(|(j, s)| {
                j != ci
                    && out.get(j).and_then(Option::as_ref).is_some_and(ok)
                    && s.holds_everything()
            })
    }
}

impl LeafVdev {
    /// Is this leaf a full copy: usable, no dirty time log, nothing to verify, no missed write in the
    /// txg being written?
    pub fn holds_everything(&self) -> bool {
        self.state().usable()
            && self.dtl_is_empty()
            && self.verify_below.load(Ordering::Relaxed) == 0
            && !self.missed.load(Ordering::Relaxed)
    }

    /// Fault this leaf because an I/O of `what` did not finish within `ms` milliseconds. Returns
    /// false if it was faulted already.
    pub fn too_slow(&self, what: &str, ms: u64) -> bool {
        {
            let mut c = lock(&self.config);
            if c.flags.faulted {
                return false;
            }
            c.flags.faulted = true;
        }
        let why = format!("too slow: a {what} took more than {}", fmt_ms(ms));
        *lock(&self.reason) = Some(why.clone());
        tracing::warn!("{}: {why}; faulted", self.path());
        self.note("slow_io", None, why.clone());
        self.note("state_change", None, format!("FAULTED: {why}"));
        true
    }
}

fn fmt_ms(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}

#[cfg(test)]
mod tests {
    use crate::config::TopKind;
    use crate::testleaf::{Fault, FaultIo, FaultKind};
    use crate::tree::tests::top;
    use crate::tree::VdevState;
    use crate::Leaf;
    use std::sync::atomic::Ordering;

    /// Polls `f` until it holds (no duration is asserted; the loop is bounded generously).
    fn eventually(mut f: impl FnMut() -> bool) {
        for _ in 0..6000 {
            if f() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("condition never held");
    }

    #[test]
    fn a_mirror_child_past_the_deadline_is_left_behind_and_faulted() {
        let (t, mems) = top(TopKind::Mirror, 2);
        t.slow_ms.store(50, Ordering::Relaxed);
        // An hour per write: the write below returning at all shows child 1 was left behind.
        let id = t.children[1].faults.add(Fault::new(
            FaultKind::Latency { ms: 3_600_000 },
            FaultIo::Write,
        ));
        t.write(0, &[7u8; 4096]).unwrap();
        assert_eq!(t.children[0].state(), VdevState::Online);
        assert_eq!(t.children[1].state(), VdevState::Faulted);
        assert!(t.children[1].missed.load(Ordering::Relaxed));
        let why = crate::units::lock(&t.children[1].reason).clone().unwrap();
        assert!(why.contains("too slow"), "{why}");
        let mut b = [0u8; 4096];
        mems[0].read_at(&mut b, crate::label::DATA_START).unwrap();
        assert_eq!(b, [7u8; 4096]);
        // Later writes skip it; its write in flight ends when the fault goes.
        t.write(4096, &[8u8; 4096]).unwrap();
        assert_eq!(t.children[1].queue.inflight(), 1);
        t.children[1].faults.clear(id);
        eventually(|| t.children[1].queue.inflight() == 0);
    }

    #[test]
    fn the_only_complete_copy_is_waited_for() {
        let (t, _) = top(TopKind::Mirror, 2);
        t.slow_ms.store(1, Ordering::Relaxed);
        // Child 0 lacks a txg: child 1 is the only complete copy, however slow.
        t.children[0].dtl_add(crate::Txg(3));
        t.children[1]
            .faults
            .add(Fault::new(FaultKind::Latency { ms: 100 }, FaultIo::Write));
        t.write(0, &[1u8; 4096]).unwrap();
        t.flush().unwrap();
        assert_eq!(t.children[1].state(), VdevState::Online);
        assert!(!t.children[1].missed.load(Ordering::Relaxed));
        // A single leaf is never left behind either.
        let (s, _) = top(TopKind::Single, 1);
        s.slow_ms.store(1, Ordering::Relaxed);
        s.children[0]
            .faults
            .add(Fault::new(FaultKind::Latency { ms: 100 }, FaultIo::Write));
        s.write(0, &[1u8; 4096]).unwrap();
        s.flush().unwrap();
        assert_eq!(s.children[0].state(), VdevState::Online);
    }
}
