//! `cairn serve`: the daemon. It holds the imported pools open, serves every volume over NBD, answers
//! the CLI on a control socket in the state directory, commits txgs on a timer and on FLUSH, and shuts
//! down cleanly on SIGTERM/SIGINT (stops taking requests, commits, closes the pools).
//!
//! Control protocol: the client sends one JSON line `{"argv": [...], "cwd": "..."}`; the daemon runs the
//! same command code as the CLI (against its open pools) and answers one JSON line
//! `{"code": N, "out": "...", "err": "..."}`.
//!
//! Threads: a small tokio runtime for the sockets; pool work runs on tokio's blocking pool and the
//! pools' own txg sync threads.

use crate::ctx::{open_from_cache, Ctx, Pools};
use crate::nbd::{self, Exports};
use crate::nbd_limits::{self, Admission, Limits, RateLog, SpareFd};
use crate::statedir::StateDir;
use crate::CmdError;
use cairn_dataset::{DatasetError, Volume};
use cairn_pool::Pool;
use cairn_vdev::units::lock;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};

pub const CONTROL_SOCKET: &str = "cairn.sock";
pub const NBD_SOCKET: &str = "nbd.sock";
const LOCK_FILE: &str = "daemon.lock";
/// Txgs commit at least this often.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(5);
const MAX_CONTROL_REQUEST: u64 = 1 << 20;

#[derive(Serialize, Deserialize)]
pub struct ControlRequest {
    pub argv: Vec<String>,
    pub cwd: String,
}

#[derive(Serialize, Deserialize)]
pub struct ControlReply {
    pub code: u8,
    pub out: String,
    pub err: String,
}

pub struct Daemon {
    root: PathBuf,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    /// Pools of the cache that could not be opened at start, with the reason.
    failed: Mutex<HashMap<String, (String, bool)>>,
    /// NBD connections: id -> (export, stop signal).
    conns: Mutex<HashMap<u64, (String, watch::Sender<bool>)>>,
    next_conn: AtomicU64,
    injections: crate::injectcmd::Injections,
    scans: Arc<cairn_scrub::ScanManager>,
}

impl Daemon {
    fn keep(&self, pool: Arc<Pool>) {
        pool.start_sync_thread(SYNC_INTERVAL);
        lock(&self.failed).remove(&pool.name());
        lock(&self.pools).insert(pool.name(), pool.clone());
        // Resume an interrupted scan, and resilver leaves that missed writes.
        if pool
            .scan_state()
            .is_ok_and(|s| s.state != "scanning" && s.state != "paused")
        {
            let _ = cairn_scrub::request_resilver(&pool);
        }
        self.scans.ensure_running(&pool.name(), pool.clone());
        // And a manual trim that was running when the pool was last open.
        pool.start_trim_thread();
    }

    fn clients_of(&self, pred: impl Fn(&str) -> bool) -> Vec<u64> {
        lock(&self.conns)
            .iter()
            .filter(|(_, (e, _))| pred(e))
            .map(|(id, _)| *id)
            .collect()
    }
}

impl Pools for Daemon {
    fn get(&self, sd: &StateDir, name: &str, verb: &str) -> Result<Arc<Pool>, CmdError> {
        if let Some(p) = lock(&self.pools).get(name) {
            return Ok(p.clone());
        }
        let failed = lock(&self.failed).get(name).cloned();
        if let Some((r, unavailable)) = failed {
            // Perhaps the devices are back: try again.
            match open_from_cache(sd, name, verb) {
                Ok(p) => {
                    let p = Arc::new(p);
                    self.keep(p.clone());
                    return Ok(p);
                }
                Err(_) => {
                    let mut e = CmdError::new(verb, name, r);
                    e.unavailable = unavailable;
                    return Err(e);
                }
            }
        }
        Err(CmdError::new(verb, name, "no such pool"))
    }

    fn added(&self, pool: Arc<Pool>) {
        self.keep(pool);
    }

    fn take(
        &self,
        sd: &StateDir,
        name: &str,
        verb: &str,
        force: bool,
    ) -> Result<Arc<Pool>, CmdError> {
        let pool = self.get(sd, name, verb)?;
        let prefix = format!("{name}/");
        let busy = self.clients_of(|e| e.starts_with(&prefix));
        if !busy.is_empty() {
            if !force {
                return Err(CmdError::new(
                    verb,
                    name,
                    format!(
                        "pool is busy: {} NBD client(s) connected to its volumes (use -f to \
                         disconnect them)",
                        busy.len()
                    ),
                ));
            }
            for id in busy {
                if let Some((_, stop)) = lock(&self.conns).get(&id) {
                    let _ = stop.send(true);
                }
            }
        }
        lock(&self.pools).remove(name);
        // A running scan pauses; it resumes when the pool is imported again.
        if self.scans.signal(name, cairn_scrub::PAUSE) {
            for _ in 0..100 {
                if !self.scans.is_running(name) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(mut s) = pool.scan_state() {
                if s.state == "paused" {
                    s.state = "scanning".into();
                    s.paused_at = 0;
                    let _ = pool.set_scan_state(&s);
                }
            }
        }
        Ok(pool)
    }

    fn is_daemon(&self) -> bool {
        true
    }

    fn forget(&self, name: &str) {
        lock(&self.failed).remove(name);
        self.injections.drop_pool(name);
    }

    fn give_back(&self, pool: Arc<Pool>, why: &str) {
        if pool.resume_use() {
            self.keep(pool);
        } else {
            // Closed by its failed last commit: opened again from the cache on next use.
            lock(&self.failed).insert(pool.name(), (why.to_string(), false));
        }
    }

    fn scans(&self) -> Option<&Arc<cairn_scrub::ScanManager>> {
        Some(&self.scans)
    }

    fn injections(&self) -> Option<&crate::injectcmd::Injections> {
        Some(&self.injections)
    }

    fn in_use(&self, dataset: &str) -> bool {
        !self.clients_of(|e| e == dataset).is_empty()
    }
}

impl Exports for Daemon {
    fn list(&self) -> Vec<String> {
        let pools: Vec<Arc<Pool>> = lock(&self.pools).values().cloned().collect();
        let mut out: Vec<String> = pools
            .iter()
            .flat_map(|p| cairn_dataset::export_names(p).unwrap_or_default())
            .collect();
        out.sort();
        out
    }

    fn open(&self, name: &str) -> Result<Arc<Volume>, String> {
        let pool_name = name.split('/').next().unwrap_or("");
        let pool = lock(&self.pools)
            .get(pool_name)
            .cloned()
            .ok_or_else(|| "no such export".to_string())?;
        // Only a name that is not there is "no such export"; anything else says what went wrong.
        Volume::open(pool, name).map(Arc::new).map_err(|e| match e {
            DatasetError::NotFound | DatasetError::Invalid(_) => "no such export".to_string(),
            e => format!("cannot open: {e}"),
        })
    }

    fn attach(&self, name: &str, conn: u64, stop: watch::Sender<bool>) {
        lock(&self.conns).insert(conn, (name.to_string(), stop));
    }

    fn detach(&self, conn: u64) {
        lock(&self.conns).remove(&conn);
    }
}

/// Run one control request (blocking).
fn control(d: &Arc<Daemon>, req: ControlRequest) -> ControlReply {
    use clap::Parser;
    let cli = match crate::Cli::try_parse_from(&req.argv) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let text = e.render().to_string();
            return if e.use_stderr() {
                ControlReply {
                    code,
                    out: String::new(),
                    err: text,
                }
            } else {
                ControlReply {
                    code,
                    out: text,
                    err: String::new(),
                }
            };
        }
    };
    if matches!(cli.cmd, crate::Top::Serve { .. }) {
        return ControlReply {
            code: 1,
            out: String::new(),
            err: "cannot serve: a daemon is already running for this state directory\n".into(),
        };
    }
    let sd = match StateDir::open(&d.root) {
        Ok(sd) => sd,
        Err(e) => {
            return ControlReply {
                code: 1,
                out: String::new(),
                err: format!("cannot open state directory: {e}\n"),
            }
        }
    };
    let mut ctx = Ctx::new(
        &sd,
        d.as_ref(),
        PathBuf::from(req.cwd),
        crate::cmdline(&req.argv),
    );
    let code = crate::execute(&mut ctx, cli.cmd);
    ControlReply {
        code,
        out: ctx.out,
        err: ctx.err,
    }
}

async fn control_conn(d: Arc<Daemon>, s: tokio::net::UnixStream, deadline: Duration) {
    let (rd, mut wr) = s.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(rd.take(MAX_CONTROL_REQUEST));
    // A client that connects and sends nothing is not waited for forever.
    if !matches!(
        tokio::time::timeout(deadline, rd.read_line(&mut line)).await,
        Ok(Ok(_))
    ) {
        return;
    }
    let reply = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(req) => {
            let d2 = d.clone();
            tokio::task::spawn_blocking(move || control(&d2, req))
                .await
                .unwrap_or_else(|_| ControlReply {
                    code: 1,
                    out: String::new(),
                    err: "internal error\n".into(),
                })
        }
        Err(e) => ControlReply {
            code: 2,
            out: String::new(),
            err: format!("bad control request: {e}\n"),
        },
    };
    let mut b = serde_json::to_vec(&reply).unwrap_or_default();
    b.push(b'\n');
    let _ = wr.write_all(&b).await;
}

/// Send a command to a running daemon; `None` if none answers on the socket.
pub fn forward(sd_root: &Path, argv: Vec<String>) -> Option<ControlReply> {
    forward_at(&sd_root.join(CONTROL_SOCKET), argv)
}

/// Send a command to whoever answers on control socket `sock` (the daemon, or a foreground
/// command holding a pool, `crate::fgserve`); `None` if nobody answers.
pub fn forward_at(sock: &Path, argv: Vec<String>) -> Option<ControlReply> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    let req = ControlRequest {
        argv,
        cwd: std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .to_string_lossy()
            .into_owned(),
    };
    let mut b = serde_json::to_vec(&req).ok()?;
    b.push(b'\n');
    s.write_all(&b).ok()?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

/// Small requests should not wait for Nagle on TCP (a no-op for other sockets).
trait NoDelay {
    fn no_delay(&self);
}
impl NoDelay for tokio::net::TcpStream {
    fn no_delay(&self) {
        let _ = self.set_nodelay(true);
    }
}
impl NoDelay for tokio::net::UnixStream {
    fn no_delay(&self) {}
}

/// A listener bound by [`crate::sockets::bind`], for tokio (inside the runtime).
fn tokio_listener(
    l: std::os::unix::net::UnixListener,
    path: &Path,
) -> Result<UnixListener, String> {
    l.set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(l))
        .map_err(|e| format!("cannot listen on '{}': {e}", path.display()))
}

/// The sockets this daemon made, removed when it stops (however it stops).
#[derive(Default)]
struct OwnSockets(Vec<(PathBuf, Option<FileId>)>);

impl OwnSockets {
    /// Bind a unix socket at `path` with `mode` (only a stale socket there is replaced).
    fn bind(&mut self, path: &Path, mode: u32) -> Result<std::os::unix::net::UnixListener, String> {
        let l = crate::sockets::bind(path, mode)?;
        self.0.push((path.to_path_buf(), file_id(path)));
        Ok(l)
    }
}

impl Drop for OwnSockets {
    fn drop(&mut self) {
        for (path, id) in self.0.drain(..) {
            remove_own(&path, id);
        }
    }
}

/// A file's device and inode.
type FileId = (u64, u64);

/// The file a path names now (device and inode), to remove at shutdown only the sockets this daemon
/// made: if its state directory was removed and another daemon started in a new one at the same
/// path, the new daemon's sockets stay.
fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn remove_own(path: &Path, id: Option<FileId>) {
    if id.is_some() && file_id(path) == id {
        let _ = std::fs::remove_file(path);
    }
}

/// Where NBD clients connect on this host.
pub struct NbdSocket {
    /// The socket's path; None for nbd.sock in the state directory.
    pub path: Option<PathBuf>,
    /// Its permissions (`--nbd-socket-mode`; the control socket is always 0600).
    pub mode: u32,
}

/// The limits `serve` is given on its command line.
pub struct ServeLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub reply_timeout: Duration,
}

/// A failed accept: logged at most once per interval, then the loop sleeps a little (an accept that
/// fails for want of descriptors would otherwise fail again at once, in a loop).
async fn accept_failed(what: &str, e: &std::io::Error, log: &RateLog) {
    if let Some(n) = log.hit() {
        tracing::warn!("{what} accept failed {n} time(s): {e}; retrying");
    }
    tokio::time::sleep(nbd_limits::ACCEPT_BACKOFF).await;
}

/// Run the daemon until SIGTERM/SIGINT.
pub fn serve(
    sd: &StateDir,
    nbd: NbdSocket,
    nbd_listen: Option<String>,
    limits: ServeLimits,
) -> Result<(), String> {
    let nofile = nbd_limits::raise_nofile();
    let lockf = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(sd.path(LOCK_FILE))
        .map_err(|e| format!("cannot open {}: {e}", sd.path(LOCK_FILE).display()))?;
    if lockf.try_lock().is_err() {
        return Err("a daemon is already running for this state directory".into());
    }
    // The sockets first: a path that holds anything but a stale socket is refused before any pool
    // is opened.
    let ctl_path = sd.path(CONTROL_SOCKET);
    let nbd_path = nbd.path.unwrap_or_else(|| sd.path(NBD_SOCKET));
    // The control socket last: once it answers, NBD clients can connect too.
    // The runtime and the signal handlers before the sockets: a SIGTERM that comes as soon as the
    // sockets exist (while the pools are being opened) shuts the daemon down cleanly instead of
    // killing it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let (mut term, mut int) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _rt = rt.enter();
        (
            signal(SignalKind::terminate()).map_err(|e| e.to_string())?,
            signal(SignalKind::interrupt()).map_err(|e| e.to_string())?,
        )
    };
    let mut sockets = OwnSockets::default();
    let nbd_unix = sockets.bind(&nbd_path, nbd.mode)?;
    let ctl = sockets.bind(&ctl_path, crate::sockets::PRIVATE)?;
    let d = Arc::new(Daemon {
        root: sd.root().to_path_buf(),
        pools: Mutex::new(HashMap::new()),
        failed: Mutex::new(HashMap::new()),
        conns: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        injections: Default::default(),
        scans: Default::default(),
    });
    let cache = sd.load_cache().map_err(|e| e.to_string())?;
    for e in cache {
        match open_from_cache(sd, &e.name, "open") {
            Ok(p) => d.keep(Arc::new(p)),
            Err(err) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "cairn: cannot open '{}': {}",
                    err.name,
                    err.reason
                );
                lock(&d.failed).insert(e.name.clone(), (err.reason, err.unavailable));
            }
        }
    }
    let result = rt.block_on(async {
        let ctl = tokio_listener(ctl, &ctl_path)?;
        let nbd_unix = tokio_listener(nbd_unix, &nbd_path)?;
        let tcp = match &nbd_listen {
            Some(addr) => {
                let addr = if addr.starts_with(':') {
                    format!("127.0.0.1{addr}")
                } else {
                    addr.clone()
                };
                Some(
                    TcpListener::bind(&addr)
                        .await
                        .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
                )
            }
            None => None,
        };
        // NBD connections leave a reserve of descriptors for the control socket and the pools.
        let max_connections = nbd_limits::connection_cap(
            limits.max_connections,
            nofile,
            nbd_limits::open_fds().unwrap_or(0),
        );
        if max_connections < limits.max_connections {
            let _ = writeln!(
                std::io::stderr(),
                "cairn: at most {max_connections} NBD connections (not {}): the open-file limit is {}",
                limits.max_connections,
                nofile.unwrap_or(0)
            );
        }
        let limits = Arc::new(Limits::new(
            max_connections,
            limits.handshake_timeout,
            limits.reply_timeout,
        ));
        let (shut_tx, shut_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        {
            let d = d.clone();
            let mut shut = shut_rx.clone();
            let deadline = limits.handshake_timeout;
            tasks.spawn(async move {
                // Commands served at once are bounded; more wait in the backlog (not dropped: a CLI
                // whose connection is dropped runs its command itself).
                let slots = Arc::new(Semaphore::new(nbd_limits::MAX_CONTROL));
                let log = RateLog::default();
                loop {
                    let slot = tokio::select! {
                        p = slots.clone().acquire_owned() => p,
                        _ = shut.changed() => break,
                    };
                    let Ok(slot) = slot else { break };
                    tokio::select! {
                        a = ctl.accept() => match a {
                            Ok((s, _)) => {
                                let d = d.clone();
                                tokio::spawn(async move {
                                    control_conn(d, s, deadline).await;
                                    drop(slot);
                                });
                            }
                            Err(e) => accept_failed("control", &e, &log).await,
                        },
                        _ = shut.changed() => break,
                    }
                }
            });
        }
        // NBD clients on the unix socket and, if asked, on TCP: the same loop for both listeners.
        // Connections over the limit are refused; out of descriptors, the loop sleeps a little and
        // closes one waiting connection with its spare descriptor (the client sees a close, not a hang).
        macro_rules! nbd_accept_loop {
            ($listener:expr) => {{
                let listener = $listener;
                let d = d.clone();
                let limits = limits.clone();
                let mut shut = shut_rx.clone();
                let conn_shut = shut_rx.clone();
                tasks.spawn(async move {
                    let mut conns = tokio::task::JoinSet::new();
                    let mut spare = SpareFd::new();
                    let log = RateLog::default();
                    loop {
                        tokio::select! {
                            a = listener.accept() => match a {
                                Ok((s, _)) => {
                                    let (l, sh) = (limits.clone(), conn_shut.clone());
                                    match limits.admit() {
                                        Admission::Serve(slot) => {
                                            s.no_delay();
                                            let id = d.next_conn.fetch_add(1, Ordering::Relaxed);
                                            let ex: Arc<dyn Exports> = d.clone();
                                            conns.spawn(async move {
                                                nbd::serve_conn(s, ex, id, sh, l).await;
                                                drop(slot);
                                            });
                                        }
                                        Admission::Refuse(slot) => {
                                            conns.spawn(async move {
                                                nbd::refuse_conn(s, l, sh).await;
                                                drop(slot);
                                            });
                                        }
                                        Admission::Close => drop(s),
                                    }
                                }
                                Err(e) => {
                                    if nbd_limits::out_of_descriptors(&e) && spare.release() {
                                        tokio::select! {
                                            biased;
                                            a = listener.accept() => drop(a),
                                            _ = std::future::ready(()) => {}
                                        }
                                        spare.restore();
                                    }
                                    accept_failed("nbd", &e, &log).await;
                                }
                            },
                            // Finished connections are reaped as they end.
                            Some(_) = conns.join_next(), if !conns.is_empty() => {}
                            _ = shut.changed() => break,
                        }
                    }
                    while conns.join_next().await.is_some() {}
                });
            }};
        }
        nbd_accept_loop!(nbd_unix);
        if let Some(tcp) = tcp {
            nbd_accept_loop!(tcp);
        }
        {
            // Scheduled scrubs: check every second (catching up on ones missed while down).
            let d = d.clone();
            let mut shut = shut_rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            let d2 = d.clone();
                            let _ = tokio::task::spawn_blocking(move || {
                                let pools: Vec<(String, Arc<Pool>)> = lock(&d2.pools)
                                    .iter()
                                    .map(|(n, p)| (n.clone(), p.clone()))
                                    .collect();
                                d2.scans.run_schedules(&pools);
                            })
                            .await;
                        }
                        _ = shut.changed() => break,
                    }
                }
            });
        }
        let _ = writeln!(
            std::io::stderr(),
            "cairn: serving {} pool(s); NBD on {}{}; control on {}",
            lock(&d.pools).len(),
            nbd_path.display(),
            nbd_listen
                .as_ref()
                .map(|a| format!(" and tcp {a}"))
                .unwrap_or_default(),
            ctl_path.display()
        );
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        let _ = writeln!(std::io::stderr(), "cairn: shutting down");
        let _ = shut_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        Ok::<(), String>(())
    });
    drop(sockets);
    let pools: Vec<Arc<Pool>> = lock(&d.pools).drain().map(|(_, p)| p).collect();
    let mut err = None;
    for p in pools {
        if let Err(e) = p.close() {
            err = Some(format!("cannot close '{}': {e}", p.name()));
        }
    }
    rt.shutdown_timeout(Duration::from_secs(5));
    drop(lockf);
    result?;
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
