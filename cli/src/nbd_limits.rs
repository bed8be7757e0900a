//! What NBD clients can make the daemon hold, bounded: bytes of read and write payload in flight (per
//! connection and for the whole daemon), connections, the time a handshake may take, and file
//! descriptors (the soft limit is raised, a reserve is kept for the control socket and the pools, and
//! a listener out of descriptors backs off instead of spinning). Log lines about hostile or excess
//! clients are rate-limited ([`RateLog`]), so no client can flood the log.
//!
//! Invariants:
//! - a request's payload is charged to its connection's [`Budget`] before the payload is read from
//!   the socket (a WRITE) or allocated (a READ), and the charge is released only after its reply was
//!   written to the socket: a client that does not read its replies stops having its requests read,
//!   and holds at most [`CONN_BYTES`]; all connections together hold at most [`DAEMON_BYTES`];
//! - a connection holds a slot of [`Limits`] from accept to close; beyond the limit a connection is
//!   refused with an NBD error that says why (or closed at once when too many refusals are under way);
//! - the NBD connection limit leaves [`fd_reserve`] descriptors of the open-file limit unused by NBD.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of read and write payload one connection may have in flight (requests read, replies not yet
/// written). At least [`crate::nbd::MAX_PAYLOAD`], so any one request fits.
pub const CONN_BYTES: usize = 64 << 20;
/// Bytes of payload in flight for all connections together.
pub const DAEMON_BYTES: usize = 256 << 20;
/// Default of `serve --max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 256;
/// Default of `serve --handshake-timeout` (seconds).
pub const DEFAULT_HANDSHAKE_TIMEOUT: u64 = 10;
/// Default of `serve --reply-timeout` (seconds): a connection whose socket takes no byte of its
/// replies for this long is closed (the client is stopped or hostile; what it holds is freed).
pub const DEFAULT_REPLY_TIMEOUT: u64 = 60;
/// How long an accept loop sleeps after a failed accept (out of descriptors, ...).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A rate-limited message is logged at most once per this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Refusals (a short handshake that answers every option with the reason) under way at once; more
/// excess connections are closed at once.
const MAX_REFUSING: usize = 4;
/// Control connections served at once; more wait in the listen backlog (they are not dropped: a CLI
/// whose connection is dropped would run its command itself, beside the daemon).
pub const MAX_CONTROL: usize = 64;

/// Logs a recurring event at most once per [`LOG_INTERVAL`], with the count of those not logged.
#[derive(Default)]
pub struct RateLog {
    /// (when last logged, events since then)
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLog {
    /// Counts one event; `Some(n)` when it should be logged now, `n` being the events since the last
    /// message (this one included).
    pub fn hit(&self) -> Option<u64> {
        let mut s = cairn_vdev::units::lock(&self.state);
        s.1 += 1;
        let due = s.0.is_none_or(|t| t.elapsed() >= LOG_INTERVAL);
        if due {
            let n = s.1;
            *s = (Some(Instant::now()), 0);
            Some(n)
        } else {
            None
        }
    }
}

/// The daemon-wide limits, shared by every listener and connection.
pub struct Limits {
    /// A client must finish its handshake within this time.
    pub handshake_timeout: Duration,
    /// A reply that makes no progress for this long closes its connection.
    pub reply_timeout: Duration,
    /// NBD connections served at once (after [`fd_reserve`]).
    pub max_connections: usize,
    conns: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    daemon_bytes: Arc<Semaphore>,
    pub refused_log: RateLog,
    pub handshake_log: RateLog,
    pub stall_log: RateLog,
}

/// What to do with a connection just accepted.
pub enum Admission {
    /// Serve it; the slot is held for as long as the connection lives.
    Serve(OwnedSemaphorePermit),
    /// Over the limit: tell the client so (holding a refusal slot), then close.
    Refuse(OwnedSemaphorePermit),
    /// Over the limit with refusals under way: close at once.
    Close,
}

impl Limits {
    pub fn new(
        max_connections: usize,
        handshake_timeout: Duration,
        reply_timeout: Duration,
    ) -> Limits {
        Limits {
            handshake_timeout,
            reply_timeout,
            max_connections,
            conns: Arc::new(Semaphore::new(max_connections)),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            daemon_bytes: Arc::new(Semaphore::new(DAEMON_BYTES)),
            refused_log: RateLog::default(),
            handshake_log: RateLog::default(),
            stall_log: RateLog::default(),
        }
    }

    pub fn admit(&self) -> Admission {
        if let Ok(p) = self.conns.clone().try_acquire_owned() {
            return Admission::Serve(p);
        }
        if let Some(n) = self.refused_log.hit() {
            tracing::warn!(
                "nbd: refused {n} connection(s): at the limit of {} connections \
                 (serve --max-connections)",
                self.max_connections
            );
        }
        match self.refusing.clone().try_acquire_owned() {
            Ok(p) => Admission::Refuse(p),
            Err(_) => Admission::Close,
        }
    }

    /// The payload budget of a new connection.
    pub fn budget(&self) -> Budget {
        Budget {
            conn: Arc::new(Semaphore::new(CONN_BYTES)),
            daemon: self.daemon_bytes.clone(),
        }
    }

    /// Bytes of payload held by all connections now.
    #[cfg(test)]
    fn daemon_bytes_held(&self) -> usize {
        DAEMON_BYTES - self.daemon_bytes.available_permits()
    }
}

/// One connection's payload budget (see the module invariants).
pub struct Budget {
    conn: Arc<Semaphore>,
    daemon: Arc<Semaphore>,
}

/// Bytes charged to a connection and to the daemon; released when dropped.
#[derive(Default)]
pub struct Charge {
    _conn: Option<OwnedSemaphorePermit>,
    _daemon: Option<OwnedSemaphorePermit>,
}

impl Budget {
    /// Waits until `bytes` (at most [`CONN_BYTES`] are counted) can be charged to this connection and
    /// then to the daemon. Connections wait for the daemon's bytes in turn (tokio's semaphore is fair).
    pub async fn charge(&self, bytes: usize) -> Charge {
        let n = u32::try_from(bytes.min(CONN_BYTES)).unwrap_or(u32::MAX);
        if n == 0 {
            return Charge::default();
        }
        // Neither semaphore is ever closed; a failure would only mean no charge.
        let conn = self.conn.clone().acquire_many_owned(n).await.ok();
        let daemon = self.daemon.clone().acquire_many_owned(n).await.ok();
        Charge {
            _conn: conn,
            _daemon: daemon,
        }
    }
}

/// Raises the soft limit of open files to the hard limit; returns the soft limit in force after.
pub fn raise_nofile() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass, which is a valid, exclusive `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return None;
    }
    if r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            r.rlim_cur = r.rlim_max;
        }
    }
    Some(r.rlim_cur)
}

/// Descriptors this process has open now.
pub fn open_fds() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count())
}

/// Descriptors kept free of NBD connections, for control connections, the commands they run (a pool
/// import opens two per leaf) and refusals.
pub fn fd_reserve(nofile: u64) -> u64 {
    (nofile / 4).clamp(32, 1024)
}

/// The NBD connection limit that leaves [`fd_reserve`] descriptors free, given the open-file limit
/// and the descriptors open now (at least 1).
pub fn connection_cap(asked: usize, nofile: Option<u64>, open: usize) -> usize {
    let Some(nofile) = nofile else { return asked };
    let room = nofile
        .saturating_sub(open as u64 + fd_reserve(nofile))
        .max(1);
    asked.min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// Is this accept error the process or the system out of descriptors (or memory)?
pub fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// One descriptor held in reserve by an accept loop: when accept fails for want of descriptors, it is
/// closed to accept the waiting connection and close it (the client sees a close rather than a hang),
/// then opened again.
pub struct SpareFd(Option<std::fs::File>);

impl SpareFd {
    pub fn new() -> SpareFd {
        SpareFd(std::fs::File::open("/dev/null").ok())
    }

    /// Frees the descriptor; true if there was one.
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    pub fn restore(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }
}

/// Gives memory the allocator keeps free back to the system (after a connection that moved payload
/// closed). glibc keeps freed payload buffers in its arenas once its mmap threshold has grown to their
/// size (it grows to the largest block freed, up to 32 MiB): 8 MiB reads left gigabytes resident after
/// their clients left. A fixed threshold (`mallopt(M_MMAP_THRESHOLD, 1 MiB or 4 MiB)`) returned them
/// too, but cost 15-25% of 1 MiB write throughput (every large buffer of the write path became a fresh
/// mapping); trimming when a connection closes costs nothing on the I/O path.
pub fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes an integer and only releases free memory of the allocator.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_log_counts_what_it_does_not_log() {
        let l = RateLog::default();
        assert_eq!(l.hit(), Some(1));
        assert_eq!(l.hit(), None);
        assert_eq!(l.hit(), None);
        cairn_vdev::units::lock(&l.state).0 = Instant::now().checked_sub(LOG_INTERVAL);
        assert_eq!(l.hit(), Some(3));
    }

    #[test]
    fn connection_cap_keeps_the_reserve() {
        assert_eq!(connection_cap(256, None, 10), 256);
        assert_eq!(connection_cap(256, Some(1 << 20), 10), 256);
        // 64 descriptors, 20 open, 32 reserved: 12 connections.
        assert_eq!(connection_cap(256, Some(64), 20), 12);
        assert_eq!(connection_cap(256, Some(40), 20), 1);
        assert_eq!(connection_cap(2, Some(64), 20), 2);
    }

    #[test]
    fn admission_beyond_the_limit() {
        let l = Limits::new(1, Duration::from_secs(1), Duration::from_secs(1));
        let a = l.admit();
        assert!(matches!(a, Admission::Serve(_)));
        let mut refusals = Vec::new();
        for _ in 0..MAX_REFUSING {
            refusals.push(l.admit());
        }
        assert!(refusals.iter().all(|r| matches!(r, Admission::Refuse(_))));
        assert!(matches!(l.admit(), Admission::Close));
        drop(a);
        assert!(matches!(l.admit(), Admission::Serve(_)));
    }

    #[test]
    fn budget_waits_for_its_bytes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = Limits::new(4, Duration::from_secs(1), Duration::from_secs(1));
            let b = l.budget();
            let c1 = b.charge(CONN_BYTES / 2).await;
            let c2 = b.charge(CONN_BYTES / 2).await;
            assert_eq!(l.daemon_bytes_held(), CONN_BYTES);
            // The connection's budget is spent: a third charge waits until one is released.
            let mut third = Box::pin(b.charge(1));
            assert!(futures_poll_once(&mut third).await.is_none());
            drop(c1);
            let c3 = third.await;
            assert_eq!(l.daemon_bytes_held(), CONN_BYTES / 2 + 1);
            drop((c2, c3));
            assert_eq!(l.daemon_bytes_held(), 0);
            // Oversized charges count as the connection's whole budget, zero as nothing.
            let big = b.charge(usize::MAX).await;
            assert_eq!(l.daemon_bytes_held(), CONN_BYTES);
            drop(big);
            let _none = b.charge(0).await;
            assert_eq!(l.daemon_bytes_held(), 0);
        });
    }

    /// Polls a future once: `Some` if it completed.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        tokio::select! {
            biased;
            v = f => Some(v),
            _ = std::future::ready(()) => None,
        }
    }
}
