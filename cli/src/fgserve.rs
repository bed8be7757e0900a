//! A pool held by a long foreground command (a scrub, resilver or trim run without the daemon)
//! answers other commands, as the daemon would, for as long as it runs.
//!
//! Without a daemon a command opens its pool itself, with an exclusive lock on the leaves, so a
//! second command from another terminal used to fail with "pool is in use by another process". Now
//! the foreground command listens on `fg/POOL.sock` in the state directory (0600, bound as the
//! daemon's sockets are, `crate::sockets`). A command that finds the pool locked
//! ([`crate::ctx::LocalPools`]) and that socket there sends its command line there instead, in the
//! daemon's protocol (`crate::daemon::forward_at`), and the foreground process runs it with the
//! same command code against the pool it holds: live figures (the scan's progress as it stands,
//! the I/O counters of `iostat`), and `scrub -p`/`-s` or `trim -s`/`-c` reach the running work the
//! way they reach the daemon's (the scan's control flag; the trim's leaf states).
//!
//! Only commands that read, or that pause or stop the running work, are answered
//! ([`allowed`]); anything else is refused, naming the process. Other pools a forwarded command
//! names are opened in the foreground process for the command, as the CLI would.

use crate::ctx::{open_from_cache, Ctx, Pools};
use crate::daemon::{ControlReply, ControlRequest};
use crate::statedir::StateDir;
use crate::{CmdError, PoolCmd, Top};
use cairn_pool::Pool;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The directory of the foreground sockets, in the state directory.
pub const FG_DIR: &str = "fg";
const MAX_REQUEST: u64 = 1 << 20;

/// Where the foreground command holding pool `name` listens.
pub fn socket_path(root: &Path, name: &str) -> PathBuf {
    root.join(FG_DIR).join(format!("{name}.sock"))
}

/// What a forwarded command may do to the pool a foreground command holds.
pub fn allowed(cmd: &Top) -> bool {
    match cmd {
        Top::Pool(c) => {
            matches!(
                c,
                PoolCmd::Status { .. }
                    | PoolCmd::List { .. }
                    | PoolCmd::Get { .. }
                    | PoolCmd::Iostat { .. }
                    | PoolCmd::Events { .. }
                    | PoolCmd::History { .. }
                    | PoolCmd::Wait { .. }
                    | PoolCmd::Sync { .. }
            ) || matches!(c, PoolCmd::Scrub { pause, stop, .. } if *pause || *stop)
                || matches!(c, PoolCmd::Trim { suspend, cancel, .. } if *suspend || *cancel)
        }
        _ => false,
    }
}

/// The pool held by the foreground command, and its other pools as the CLI opens them.
struct Held {
    name: String,
    what: String,
    pool: Arc<Pool>,
    scans: Option<Arc<cairn_scrub::ScanManager>>,
}

impl Held {
    fn busy(&self, verb: &str) -> CmdError {
        CmdError::new(
            verb,
            &self.name,
            format!(
                "pool is busy: a foreground {} holds it (process {}); only status, list, get, \
                 iostat, events, history, wait, sync and a pause or stop reach it until it ends",
                self.what,
                std::process::id()
            ),
        )
    }
}

impl Pools for Held {
    fn get(&self, sd: &StateDir, name: &str, verb: &str) -> Result<Arc<Pool>, CmdError> {
        if name == self.name {
            return Ok(self.pool.clone());
        }
        open_from_cache(sd, name, verb).map(Arc::new)
    }
    fn added(&self, _pool: Arc<Pool>) {}
    fn take(
        &self,
        sd: &StateDir,
        name: &str,
        verb: &str,
        _force: bool,
    ) -> Result<Arc<Pool>, CmdError> {
        if name == self.name {
            return Err(self.busy(verb));
        }
        self.get(sd, name, verb)
    }
    fn scans(&self) -> Option<&Arc<cairn_scrub::ScanManager>> {
        self.scans.as_ref()
    }
    fn runs_work(&self) -> bool {
        true
    }
}

/// The listening socket of a foreground command; dropping it stops answering (after the requests
/// in flight, for at most a few seconds) and removes the socket.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Listen for commands about pool `name` (held by this process, which runs a `what`). `scans`:
    /// the manager the foreground scan runs under, if it is a scan. None if the socket cannot be
    /// made (the command runs anyway, unreachable as before).
    pub fn start(
        sd: &StateDir,
        name: &str,
        what: &str,
        pool: Arc<Pool>,
        scans: Option<Arc<cairn_scrub::ScanManager>>,
    ) -> Option<Server> {
        let dir = sd.path(FG_DIR);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                tracing::warn!("cannot make {}: {e}", dir.display());
                return None;
            }
        }
        let path = socket_path(sd.root(), name);
        let listener = match crate::sockets::bind(&path, crate::sockets::PRIVATE) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("{e}: other commands cannot reach this {what}");
                return None;
            }
        };
        if listener.set_nonblocking(true).is_err() {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let held = Arc::new(Held {
            name: name.to_string(),
            what: what.to_string(),
            pool,
            scans,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let root = sd.root().to_path_buf();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cairn-fg-control".into())
            .spawn(move || accept_loop(listener, held, root, stop2))
            .ok()?;
        Some(Server {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // No new connection finds the socket; the ones in flight get their answers.
        let _ = std::fs::remove_file(&self.path);
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: UnixListener, held: Arc<Held>, root: PathBuf, stop: Arc<AtomicBool>) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, _)) => {
                let (held, root, n) = (held.clone(), root.clone(), in_flight.clone());
                n.fetch_add(1, Ordering::SeqCst);
                let spawned = std::thread::Builder::new()
                    .name("cairn-fg-request".into())
                    .spawn(move || {
                        answer(s, &held, &root);
                        n.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    // The requests in flight (a `scrub -p` waiting for the scan to stop) get their answers.
    let start = Instant::now();
    while in_flight.load(Ordering::SeqCst) > 0 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn answer(s: UnixStream, held: &Held, root: &Path) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let Ok(r) = s.try_clone() else { return };
    if BufReader::new(r.take(MAX_REQUEST))
        .read_line(&mut line)
        .is_err()
    {
        return;
    }
    let reply = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(req) => run(req, held, root),
        Err(e) => ControlReply {
            code: 2,
            out: String::new(),
            err: format!("bad control request: {e}\n"),
        },
    };
    let mut b = serde_json::to_vec(&reply).unwrap_or_default();
    b.push(b'\n');
    let mut s = s;
    let _ = s.write_all(&b);
}

fn run(req: ControlRequest, held: &Held, root: &Path) -> ControlReply {
    use clap::Parser;
    let fail = |code: u8, err: String| ControlReply {
        code,
        out: String::new(),
        err,
    };
    let cli = match crate::Cli::try_parse_from(&req.argv) {
        Ok(c) => c,
        Err(e) => return fail(2, e.render().to_string()),
    };
    if !allowed(&cli.cmd) {
        let verb = req
            .argv
            .iter()
            .skip_while(|a| *a != "pool")
            .nth(1)
            .map(String::as_str)
            .unwrap_or("run");
        let e = held.busy(verb);
        return fail(1, format!("cannot {verb} '{}': {}\n", e.name, e.reason));
    }
    let sd = match StateDir::open(root) {
        Ok(sd) => sd,
        Err(e) => return fail(1, format!("cannot open state directory: {e}\n")),
    };
    let mut ctx = Ctx::new(&sd, held, PathBuf::from(req.cwd), crate::cmdline(&req.argv));
    let code = crate::execute(&mut ctx, cli.cmd);
    ControlReply {
        code,
        out: ctx.out,
        err: ctx.err,
    }
}
