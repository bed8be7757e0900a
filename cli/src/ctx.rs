//! The context a command runs in: the state directory, where pools come from, the caller's working
//! directory and the captured output.
//!
//! The same command code runs in two places: in the `cairn` process itself (pools are opened for the
//! duration of the command, [`LocalPools`]) and inside `cairn serve` on behalf of a client (pools are the
//! daemon's open pools). Output is captured so the daemon can send it back to the client. A third
//! place is a foreground scrub, resilver or trim of the CLI, which answers other commands about
//! the pool it holds (`crate::fgserve::Held`).

use crate::statedir::StateDir;
use crate::CmdError;
use cairn_pool::{Guid, OpenOptions, Pool, PoolError, PoolState};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a command gets its pools.
pub trait Pools: Send + Sync {
    /// An imported pool by name.
    fn get(&self, sd: &StateDir, name: &str, verb: &str) -> Result<Arc<Pool>, CmdError>;
    /// A pool was created or imported: keep it (the daemon) or let it close (the CLI).
    fn added(&self, pool: Arc<Pool>);
    /// A pool is about to be exported or destroyed: stop using it. `force` disconnects its clients.
    fn take(
        &self,
        sd: &StateDir,
        name: &str,
        verb: &str,
        force: bool,
    ) -> Result<Arc<Pool>, CmdError>;
    /// A pool was exported or destroyed (or an unavailable one forgotten): stop remembering it.
    fn forget(&self, _name: &str) {}
    /// An export or destroy of a pool taken with [`Pools::take`] failed: the pool stays imported, so
    /// the daemon serves it again (or, if it could not be kept open, opens it again on next use).
    fn give_back(&self, _pool: Arc<Pool>, _why: &str) {}
    /// True inside the daemon.
    fn is_daemon(&self) -> bool {
        false
    }
    /// Does someone run the pools' long work (scans, trims) while this command looks: the daemon,
    /// or the foreground command holding the pool? (Not a command that opened the pool itself.)
    fn runs_work(&self) -> bool {
        self.is_daemon()
    }
    /// The daemon's fault registry (`cairn inject`); None outside the daemon.
    fn injections(&self) -> Option<&crate::injectcmd::Injections> {
        None
    }
    /// The daemon's background scans; None outside the daemon (scans then run in the foreground).
    fn scans(&self) -> Option<&Arc<cairn_scrub::ScanManager>> {
        None
    }
    /// Is an NBD client connected to this dataset?
    fn in_use(&self, _dataset: &str) -> bool {
        false
    }
}

pub struct Ctx<'a> {
    pub sd: &'a StateDir,
    pub pools: &'a dyn Pools,
    pub cwd: PathBuf,
    pub cmdline: String,
    pub out: String,
    pub err: String,
    /// The exit code of a command that succeeded but ends otherwise than 0 (a foreground scrub
    /// or trim stopped by a signal: 128 + the signal).
    pub exit: u8,
}

impl<'a> Ctx<'a> {
    pub fn new(sd: &'a StateDir, pools: &'a dyn Pools, cwd: PathBuf, cmdline: String) -> Ctx<'a> {
        Ctx {
            sd,
            pools,
            cwd,
            cmdline,
            out: String::new(),
            err: String::new(),
            exit: 0,
        }
    }
}

impl Ctx<'_> {
    /// Print `{"output_version": ..., key: body}` as `-j` output does.
    pub fn print_json(&mut self, command: &str, key: &str, body: serde_json::Value) {
        let v = crate::output::json_envelope(command, key, body);
        self.out
            .push_str(&serde_json::to_string_pretty(&v).unwrap_or_default());
        self.out.push('\n');
    }

    /// A path argument as the caller meant it (relative to the caller's working directory).
    pub fn abs(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.cwd.join(p)
        }
    }
}

#[macro_export]
macro_rules! outln {
    ($ctx:expr) => { $ctx.out.push('\n') };
    ($ctx:expr, $($a:tt)*) => {{ use std::fmt::Write as _; let _ = writeln!($ctx.out, $($a)*); }};
}

#[macro_export]
macro_rules! out {
    ($ctx:expr, $($a:tt)*) => {{ use std::fmt::Write as _; let _ = write!($ctx.out, $($a)*); }};
}

#[macro_export]
macro_rules! errln {
    ($ctx:expr, $($a:tt)*) => {{ use std::fmt::Write as _; let _ = writeln!($ctx.err, $($a)*); }};
}

/// Open a pool recorded in the state directory's cache, checking it is still imported by us.
pub fn open_from_cache(sd: &StateDir, name: &str, verb: &str) -> Result<Pool, CmdError> {
    let err = |r: String| CmdError::new(verb, name, r);
    let cache = sd.load_cache().map_err(|e| err(e.to_string()))?;
    let Some(entry) = cache.iter().find(|e| e.name == name) else {
        return Err(err("no such pool".into()));
    };
    let paths: Vec<PathBuf> = entry.leaves.iter().map(PathBuf::from).collect();
    let pool =
        Pool::open(&paths, Guid(entry.guid), &OpenOptions::default()).map_err(|e| match e {
            PoolError::NotFound(_) => CmdError::unavailable(
                verb,
                name,
                format!(
                    "no device of the pool was found at its recorded paths ({}); if the leaves \
                     moved, import the pool again with 'cairn pool import -d DIR {name}'",
                    entry.leaves.join(", ")
                ),
            ),
            // Another process has it open: busy, not unavailable.
            e @ PoolError::InUse(_) => CmdError {
                busy: true,
                ..err(e.to_string())
            },
            e => CmdError::unavailable(verb, name, e),
        })?;
    let cfg = pool.config();
    let me = sd.host_id().unwrap_or(0);
    if cfg.state != PoolState::Active || cfg.host_id != me {
        // Unavailable here: `pool list` shows it so, and `pool export` forgets it, after which
        // it can be imported again (a state directory could not get rid of such a pool).
        return Err(CmdError::unavailable(
            verb,
            name,
            format!(
                "the pool is not imported here any more (it was {} by host '{}'); forget it with \
                 'cairn pool export {name}', then import it again",
                if cfg.state == PoolState::Active {
                    "imported"
                } else {
                    "exported or destroyed"
                },
                cfg.hostname
            ),
        ));
    }
    Ok(pool)
}

/// How long a command waits for a pool another command holds (one that does not answer on a
/// foreground socket) before it says the pool is in use.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Pools opened by the command itself and closed when it ends.
///
/// A pool another process holds is "in use"; if that process is a foreground command that answers
/// on its socket (`crate::fgserve`), the socket is remembered ([`LocalPools::held_elsewhere`]) so
/// that the command can be sent there instead.
#[derive(Default)]
pub struct LocalPools {
    opened: std::sync::atomic::AtomicUsize,
    elsewhere: std::sync::Mutex<Option<(PathBuf, usize)>>,
}

impl LocalPools {
    /// The socket of the foreground command holding the first pool this command found in use, and
    /// how many pools the command had opened before it (0: it changed nothing yet).
    pub fn held_elsewhere(&self) -> Option<(PathBuf, usize)> {
        cairn_vdev::units::lock(&self.elsewhere).clone()
    }
}

impl Pools for LocalPools {
    fn get(&self, sd: &StateDir, name: &str, verb: &str) -> Result<Arc<Pool>, CmdError> {
        use std::sync::atomic::Ordering;
        let start = std::time::Instant::now();
        loop {
            match open_from_cache(sd, name, verb) {
                Ok(p) => {
                    self.opened.fetch_add(1, Ordering::SeqCst);
                    return Ok(Arc::new(p));
                }
                Err(e) if e.busy => {
                    let sock = crate::fgserve::socket_path(sd.root(), name);
                    if sock.exists() {
                        let mut g = cairn_vdev::units::lock(&self.elsewhere);
                        if g.is_none() {
                            *g = Some((sock, self.opened.load(Ordering::SeqCst)));
                        }
                        return Err(e);
                    }
                    // Another short command (a status) holds it for a moment: wait for it a
                    // little, rather than fail a command for a race with a watcher.
                    if start.elapsed() > BUSY_WAIT {
                        return Err(e);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
    }
    fn added(&self, _pool: Arc<Pool>) {}
    fn take(
        &self,
        sd: &StateDir,
        name: &str,
        verb: &str,
        _force: bool,
    ) -> Result<Arc<Pool>, CmdError> {
        self.get(sd, name, verb)
    }
}
