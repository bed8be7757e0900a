//! cairn: the command-line front end (zpool/zfs-style command families).
//!
//! Without a daemon, every command opens the pools it needs itself (an exclusive lock on the leaves keeps
//! two processes apart) and records imported pools in the state directory's cache, like zpool.cache.
//! Errors print as `cannot <verb> '<name>': <reason>` and exit 1; usage errors exit 2.

mod client;
mod ctx;
mod daemon;
mod datasetcmd;
mod fgserve;
mod injectcmd;
mod interrupt;
mod iostatcmd;
mod maintcmd;
mod names;
mod nbd;
mod nbd_limits;
mod output;
mod poolcmd;
mod scrubcmd;
mod size;
mod snapcmd;
mod sockets;
mod statedir;
mod statuscmd;
mod trimcmd;
mod vdevspec;
mod waitcmd;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Cairn: a pooled volume manager with checksums, mirrors and NBD"
)]
pub struct Cli {
    /// State directory (imported pools, sockets); default $CAIRN_STATE_DIR, else a per-user directory.
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Top,
}

#[derive(Subcommand)]
pub enum Top {
    /// Pool commands (like zpool).
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Dataset (volume) commands (like zfs).
    #[command(subcommand)]
    Dataset(DatasetCmd),
    /// Fault injection (through the daemon).
    Inject(InjectArgs),
    /// Run the daemon: hold the pools open, serve volumes over NBD, answer the CLI.
    Serve {
        /// Unix socket for NBD clients (default: nbd.sock in the state directory). Only a stale
        /// socket there is replaced; anything else is refused.
        #[arg(long, value_name = "PATH")]
        nbd_socket: Option<PathBuf>,
        /// Mode of the NBD socket, in octal (default 600: only this user may connect; 660 lets
        /// the socket's group in too).
        #[arg(long, value_name = "MODE", value_parser = sockets::parse_mode)]
        nbd_socket_mode: Option<u32>,
        /// Also listen for NBD clients on TCP (HOST:PORT, or :PORT for loopback).
        #[arg(long, value_name = "HOST:PORT")]
        nbd_listen: Option<String>,
        /// Most NBD connections served at once; more are refused (lowered to keep a reserve of
        /// the open-file limit).
        #[arg(long, value_name = "N", default_value_t = nbd_limits::DEFAULT_MAX_CONNECTIONS,
              value_parser = clap::value_parser!(u64).range(1..))]
        max_connections: u64,
        /// Seconds a client has to finish the NBD handshake (or to send a control request).
        #[arg(long, value_name = "SECS", default_value_t = nbd_limits::DEFAULT_HANDSHAKE_TIMEOUT,
              value_parser = clap::value_parser!(u64).range(1..))]
        handshake_timeout: u64,
        /// Seconds a connection's socket may take no byte of its replies before it is closed.
        #[arg(long, value_name = "SECS", default_value_t = nbd_limits::DEFAULT_REPLY_TIMEOUT,
              value_parser = clap::value_parser!(u64).range(1..))]
        reply_timeout: u64,
    },
}

#[derive(Subcommand)]
pub enum DatasetCmd {
    /// Create a volume: cairn dataset create -V SIZE [-s] [-b BLOCKSIZE] [-o PROP=VAL]... POOL/NAME
    Create {
        /// Volume size.
        #[arg(short = 'V', value_name = "SIZE", required = true)]
        volsize: String,
        /// Sparse: reserve no space.
        #[arg(short = 's')]
        sparse: bool,
        /// Block size (power of 2, 4K to 128K; default 16K).
        #[arg(short = 'b', value_name = "BLOCKSIZE")]
        blocksize: Option<String>,
        #[arg(short = 'o', value_name = "PROP=VAL")]
        props: Vec<String>,
        name: String,
    },
    /// List datasets.
    List {
        /// Types: volume, snapshot or all.
        #[arg(short = 't', value_name = "TYPE")]
        types: Option<String>,
        /// Also the snapshots of the volumes named.
        #[arg(short = 'r')]
        recursive: bool,
        /// Depth below the names (1: a volume's snapshots); implies -r.
        #[arg(short = 'd', value_name = "DEPTH")]
        depth: Option<u32>,
        /// Sort by a property, ascending (repeatable).
        #[arg(short = 's', value_name = "PROP")]
        sort: Vec<String>,
        /// Sort by a property, descending (repeatable).
        #[arg(short = 'S', value_name = "PROP")]
        sort_desc: Vec<String>,
        #[command(flatten)]
        flags: ListFlags,
        /// Columns: name,used,avail,refer,mountpoint,volsize,volblocksize,refreservation,...
        #[arg(short = 'o', value_name = "COLS")]
        cols: Option<String>,
        names: Vec<String>,
    },
    /// Show dataset properties: cairn dataset get PROP[,PROP...]|all NAME...
    Get {
        #[command(flatten)]
        flags: ListFlags,
        /// Fields to show: name,property,value,source.
        #[arg(short = 'o', value_name = "FIELDS")]
        fields: Option<String>,
        props: String,
        names: Vec<String>,
    },
    /// Set a dataset property: cairn dataset set PROP=VAL NAME
    Set { assignment: String, name: String },
    /// Destroy a volume, or snapshots: NAME | NAME@SNAP[%SNAP][,SNAP...]
    Destroy {
        /// Destroy a volume's snapshots too.
        #[arg(short = 'r')]
        recursive: bool,
        /// Destroy clones of what goes too (recursively).
        #[arg(short = 'R')]
        clones: bool,
        /// Dry run: change nothing (with -v: say what would go and the space it frees).
        #[arg(short = 'n')]
        dry_run: bool,
        /// Print what is destroyed and the space reclaimed.
        #[arg(short = 'v')]
        verbose: bool,
        name: String,
    },
    /// Snapshot volumes (several names: one txg): cairn dataset snapshot POOL/VOL@SNAP...
    Snapshot {
        /// Accepted for zfs compatibility (volumes have no descendants).
        #[arg(short = 'r')]
        recursive: bool,
        #[arg(required = true, num_args = 1..)]
        names: Vec<String>,
    },
    /// Roll a volume back to a snapshot: cairn dataset rollback [-r] [-R] POOL/VOL@SNAP
    Rollback {
        /// Destroy later snapshots.
        #[arg(short = 'r')]
        recursive: bool,
        /// Destroy later snapshots and their clones.
        #[arg(short = 'R')]
        clones: bool,
        name: String,
    },
    /// Clone a snapshot into a new volume: cairn dataset clone [-o PROP=VAL]... POOL/VOL@SNAP POOL/NEW
    Clone {
        #[arg(short = 'o', value_name = "PROP=VAL")]
        props: Vec<String>,
        origin: String,
        target: String,
    },
    /// Promote a clone: it takes over its origin's snapshots up to the origin, and the old
    /// origin becomes its clone (so the old origin can be destroyed).
    Promote { name: String },
    /// Rename a volume or a snapshot: NAME NEWNAME | NAME@SNAP NAME@NEWSNAP
    Rename { from: String, to: String },
    /// Place a hold on snapshots (a held snapshot cannot be destroyed).
    Hold {
        tag: String,
        #[arg(required = true, num_args = 1..)]
        names: Vec<String>,
    },
    /// Release a hold.
    Release {
        tag: String,
        #[arg(required = true, num_args = 1..)]
        names: Vec<String>,
    },
    /// Changed byte ranges since a snapshot: cairn dataset diff [-j] POOL/VOL@SNAP [POOL/VOL@SNAP2|POOL/VOL]
    Diff {
        /// JSON output.
        #[arg(short = 'j')]
        json: bool,
        /// Scripted mode: no header, tab-separated fields.
        #[arg(short = 'H')]
        scripted: bool,
        from: String,
        to: Option<String>,
    },
    /// List the holds of snapshots.
    Holds {
        /// Scripted mode: no header, tab-separated fields.
        #[arg(short = 'H')]
        scripted: bool,
        #[arg(required = true, num_args = 1..)]
        names: Vec<String>,
    },
}

#[derive(Args, Clone, Default)]
pub struct ListFlags {
    /// Scripted mode: no header, tab-separated fields.
    #[arg(short = 'H')]
    pub scripted: bool,
    /// Exact (parsable) numbers.
    #[arg(short = 'p')]
    pub parsable: bool,
    /// JSON output.
    #[arg(short = 'j')]
    pub json: bool,
}

/// The options of `cairn pool status`.
#[derive(Args, Clone, Default)]
pub struct StatusOpts {
    /// Verbose: list data errors.
    #[arg(short = 'v')]
    pub verbose: bool,
    /// Full paths of leaves.
    #[arg(short = 'P')]
    pub full_paths: bool,
    /// Resolve symbolic links in leaf paths (with -P: the whole resolved path).
    #[arg(short = 'L')]
    pub resolve: bool,
    /// GUIDs instead of vdev names.
    #[arg(short = 'g')]
    pub guids: bool,
    /// Exact (parsable) numbers.
    #[arg(short = 'p')]
    pub parsable: bool,
    /// Only pools that are not healthy ("all pools are healthy" if none).
    #[arg(short = 'x')]
    pub unhealthy: bool,
    /// Only vdevs that are not healthy (not ONLINE, or with errors), and the vdevs above them.
    #[arg(short = 'e')]
    pub errors_only: bool,
    /// A SLOW column: I/Os of each vdev that took longer than 30 s since the pool was opened.
    #[arg(short = 's')]
    pub slow: bool,
    /// Every leaf's initialization state (Cairn has no initialize: "(uninitialized)").
    #[arg(short = 'i')]
    pub initialize: bool,
    /// Every leaf's trim state (untrimmed, percent trimmed, suspended, completed).
    #[arg(short = 't')]
    pub trim: bool,
    /// Deduplication statistics (Cairn does not deduplicate: "no DDT entries").
    #[arg(short = 'D')]
    pub dedup: bool,
    /// JSON output.
    #[arg(short = 'j')]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum PoolCmd {
    /// Create a pool: cairn pool create [-f] [-o PROP=VAL]... [--size SIZE] POOL VDEV_SPEC...
    Create {
        /// Use leaves that belong to another (exported or not open) pool.
        #[arg(short = 'f')]
        force: bool,
        #[arg(short = 'o', value_name = "PROP=VAL")]
        props: Vec<String>,
        /// Create missing leaf files as sparse files of this size.
        #[arg(long, value_name = "SIZE")]
        size: Option<String>,
        pool: String,
        /// mirror LEAF LEAF... | stripe LEAF... | LEAF, repeated.
        #[arg(required = true, num_args = 1..)]
        vdevs: Vec<String>,
    },
    /// List pools with their size and health.
    List {
        #[command(flatten)]
        flags: ListFlags,
        /// Columns: name,size,alloc,free,ckpoint,expandsz,frag,cap,dedup,health,altroot,guid.
        #[arg(short = 'o', value_name = "COLS")]
        cols: Option<String>,
        pools: Vec<String>,
    },
    /// Show the health and configuration of pools.
    Status {
        #[command(flatten)]
        opts: StatusOpts,
        /// POOL..., then INTERVAL (seconds between reports) and COUNT (how many; default: until
        /// interrupted).
        #[arg(value_name = "POOL")]
        pools: Vec<String>,
    },
    /// List importable pools, or import one by name or GUID (optionally under a new name).
    Import {
        /// Directory to search for leaves (repeatable); default /dev.
        #[arg(short = 'd', value_name = "DIR")]
        dirs: Vec<PathBuf>,
        /// Import a pool that was not cleanly exported or is marked in use by another system.
        #[arg(short = 'f')]
        force: bool,
        /// Rewind: if the newest txg cannot be opened, go back to the newest one that opens,
        /// discarding the txgs after it (zpool's -F).
        #[arg(short = 'F', conflicts_with = "txg")]
        rewind: bool,
        /// With -F: only say what the rewind would discard; change nothing.
        #[arg(short = 'n', requires = "rewind")]
        dry_run: bool,
        /// Open exactly this txg (one of the intact uberblocks), discarding the txgs after it.
        #[arg(short = 'T', value_name = "TXG")]
        txg: Option<u64>,
        pool: Option<String>,
        newname: Option<String>,
    },
    /// Commit and release a pool so it can be moved or imported elsewhere.
    Export {
        #[arg(short = 'f')]
        force: bool,
        pool: String,
    },
    /// Destroy a pool (its leaves become free for reuse).
    Destroy {
        #[arg(short = 'f')]
        force: bool,
        pool: String,
    },
    /// Add top-level vdevs to a pool.
    Add {
        /// Allow a replication level that differs from the pool's.
        #[arg(short = 'f')]
        force: bool,
        pool: String,
        #[arg(required = true, num_args = 1..)]
        vdevs: Vec<String>,
    },
    /// Show pool properties: cairn pool get PROP[,PROP...]|all POOL...
    Get {
        #[command(flatten)]
        flags: ListFlags,
        /// Fields to show: name,property,value,source.
        #[arg(short = 'o', value_name = "FIELDS")]
        fields: Option<String>,
        props: String,
        pools: Vec<String>,
    },
    /// Set a pool property: cairn pool set PROP=VAL POOL
    Set { assignment: String, pool: String },
    /// Show the command history of pools.
    History { pools: Vec<String> },
    /// Scrub pools: read and verify every copy of every block, repair what a good copy allows.
    Scrub {
        /// Pause the scrub (resume with another 'scrub').
        #[arg(short = 'p', conflicts_with = "stop")]
        pause: bool,
        /// Stop (cancel) the scrub.
        #[arg(short = 's')]
        stop: bool,
        /// Wait until the scrub has finished.
        #[arg(short = 'w')]
        wait: bool,
        #[arg(required = true)]
        pools: Vec<String>,
    },
    /// Hand free space back to the leaves: punch holes over it in leaf files, discard it on
    /// devices. Every leaf of POOL, or the LEAFs given; runs in the background under the daemon.
    Trim {
        /// Wait until the trim has finished.
        #[arg(short = 'w')]
        wait: bool,
        /// Suspend the trim (resume with another 'trim').
        #[arg(short = 's', conflicts_with = "cancel")]
        suspend: bool,
        /// Cancel the trim (the next one starts over).
        #[arg(short = 'c')]
        cancel: bool,
        /// Secure trim (not supported: refused).
        #[arg(short = 'd')]
        secure: bool,
        pool: String,
        leaves: Vec<String>,
    },
    /// Attach NEW_LEAF as a mirror of EXISTING_LEAF (a single leaf becomes a mirror).
    Attach {
        #[arg(short = 'f')]
        force: bool,
        /// Sequential rebuild: copy allocated ranges in offset order, then scrub.
        #[arg(short = 's')]
        sequential: bool,
        pool: String,
        existing: String,
        new: PathBuf,
    },
    /// Detach a leaf from its mirror.
    Detach { pool: String, leaf: String },
    /// Replace OLD_LEAF with NEW_LEAF (or with a new device at OLD_LEAF's path).
    Replace {
        #[arg(short = 'f')]
        force: bool,
        /// Sequential rebuild: copy allocated ranges in offset order, then scrub.
        #[arg(short = 's')]
        sequential: bool,
        pool: String,
        old: String,
        new: Option<PathBuf>,
    },
    /// Take a leaf offline (-t: until the pool is closed).
    Offline {
        #[arg(short = 't')]
        temporary: bool,
        pool: String,
        leaf: String,
    },
    /// Bring a leaf back online (reopening its device).
    Online { pool: String, leaf: String },
    /// Reset error counters (of one leaf or all) and bring back faulted leaves.
    Clear { pool: String, leaf: Option<String> },
    /// Show recent events (errors, state changes, repairs).
    Events {
        /// Every field of each event, one per line.
        #[arg(short = 'v')]
        verbose: bool,
        #[command(flatten)]
        flags: ListFlags,
        pool: Option<String>,
    },
    /// Commit the open transaction group of pools (default: every imported pool) now.
    Sync { pools: Vec<String> },
    /// Remove Cairn's labels from a leaf that is in no imported pool (-f: also one of an
    /// exported pool, or of a pool another system may have imported).
    Labelclear {
        #[arg(short = 'f')]
        force: bool,
        leaf: PathBuf,
    },
    /// Start a resilver of the leaves that lack txgs, or restart the running one from the start.
    Resilver {
        #[arg(required = true)]
        pools: Vec<String>,
    },
    /// Wait until activities on a pool end (default: all of them).
    Wait {
        /// Activities to wait for: free, replace, resilver, scrub, trim (comma-separated).
        #[arg(short = 't', value_name = "ACTIVITY[,ACTIVITY...]")]
        activities: Option<String>,
        /// Only say what is in progress, once (the client's loop asks this).
        #[arg(long, hide = true)]
        check: bool,
        pool: String,
        /// Print what is in progress every INTERVAL seconds.
        interval: Option<String>,
    },
    /// I/O statistics per pool (-v: per vdev): since the pool was opened, then per INTERVAL.
    Iostat {
        /// Every vdev, not only the pools.
        #[arg(short = 'v')]
        verbose: bool,
        /// Latency columns (total_wait: the leaves' read and write latency averages).
        #[arg(short = 'l')]
        latency: bool,
        /// Omit the first report (the figures since the pool was opened).
        #[arg(short = 'y')]
        skip_first: bool,
        #[command(flatten)]
        flags: ListFlags,
        /// Print the raw counters as JSON (what the client samples per interval).
        #[arg(long, hide = true)]
        sample: bool,
        /// POOL..., then INTERVAL (seconds) and COUNT (default: until interrupted).
        #[arg(value_name = "POOL")]
        args: Vec<String>,
    },
}

/// `cairn inject`: add, list and clear faults on the leaves of a pool served by the daemon.
#[derive(Args)]
pub struct InjectArgs {
    /// Leaf to fault (path, name as status shows it, or guid).
    #[arg(short = 'd', value_name = "LEAF")]
    pub leaf: Option<String>,
    /// Fault: io, nxio, corrupt, latency, drop, torn (leaf); checksum or io (-t block).
    #[arg(short = 'e', value_name = "TYPE")]
    pub kind: Option<String>,
    /// I/O type: read, write or all.
    #[arg(short = 'T', value_name = "IO")]
    pub io: Option<String>,
    /// Percentage of matching I/Os that fail.
    #[arg(short = 'f', value_name = "PERCENT")]
    pub percent: Option<f64>,
    /// Only I/O overlapping OFFSET:LENGTH (sizes as 1M etc.).
    #[arg(long, value_name = "OFFSET:LENGTH")]
    pub range: Option<String>,
    /// Latency in milliseconds.
    #[arg(long, value_name = "MS")]
    pub delay: Option<u64>,
    /// Dataset whose block to fault.
    #[arg(short = 't', value_name = "DATASET")]
    pub dataset: Option<String>,
    /// Byte offset in the dataset of the block to fault.
    #[arg(long, value_name = "OFFSET")]
    pub offset: Option<String>,
    /// Which copy of the block (0-based: DVAs in order, and within a DVA the mirror children in
    /// order); default all.
    #[arg(short = 'C', value_name = "COPY")]
    pub copy: Option<usize>,
    /// List faults.
    #[arg(short = 'l')]
    pub list: bool,
    /// Clear fault ID, or all.
    #[arg(short = 'c', value_name = "ID")]
    pub clear: Option<String>,
    pub pool: Option<String>,
}

/// A failed command: printed as `cannot <verb> '<name>': <reason>`.
#[derive(Debug)]
pub struct CmdError {
    pub verb: String,
    pub name: String,
    pub reason: String,
    /// An imported pool that cannot be opened (its devices are gone or unreadable): `pool list`
    /// shows it as UNAVAIL and `pool export`/`pool destroy -f` forget it.
    pub unavailable: bool,
    /// A bad command line (a column, an interval): printed as a usage error, exit 2.
    pub usage: bool,
    /// The pool is held open by another process (its leaves are locked).
    pub busy: bool,
}

impl CmdError {
    pub fn new(verb: &str, name: &str, reason: impl std::fmt::Display) -> CmdError {
        CmdError {
            verb: verb.to_string(),
            name: name.to_string(),
            reason: reason.to_string(),
            unavailable: false,
            usage: false,
            busy: false,
        }
    }

    /// A usage error of `cairn <family> <verb>`: `error: <reason>`, exit 2.
    pub fn usage(verb: &str, reason: impl std::fmt::Display) -> CmdError {
        CmdError {
            usage: true,
            ..CmdError::new(verb, "", reason)
        }
    }

    /// A pool of the cache that cannot be opened.
    pub fn unavailable(verb: &str, name: &str, reason: impl std::fmt::Display) -> CmdError {
        CmdError {
            unavailable: true,
            ..CmdError::new(verb, name, reason)
        }
    }
}

fn main() -> ExitCode {
    use std::io::Write;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .without_time()
        .with_target(false)
        // Colour only on a terminal: a log file or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (stderr on a full disk, a closed pipe) is dropped: the
        // default reports it with eprintln!, which panics when stderr fails, in whatever thread was
        // logging (a write in flight, wedging every later commit).
        .log_internal_errors(false)
        .init();
    let cli = Cli::parse();
    let state_dir = statedir::resolve_state_dir(cli.state_dir.as_deref());
    // Checked first, also for commands a daemon runs: a state directory others may write is no
    // place to trust a control socket in.
    let sd = match statedir::StateDir::open(&state_dir) {
        Ok(sd) => sd,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "cannot open state directory '{}': {e}",
                state_dir.display()
            );
            return ExitCode::from(1);
        }
    };
    if let Top::Serve {
        nbd_socket,
        nbd_socket_mode,
        nbd_listen,
        max_connections,
        handshake_timeout,
        reply_timeout,
    } = cli.cmd
    {
        let nbd = daemon::NbdSocket {
            path: nbd_socket,
            mode: nbd_socket_mode.unwrap_or(sockets::PRIVATE),
        };
        let limits = daemon::ServeLimits {
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
            handshake_timeout: std::time::Duration::from_secs(handshake_timeout),
            reply_timeout: std::time::Duration::from_secs(reply_timeout),
        };
        return match daemon::serve(&sd, nbd, nbd_listen, limits) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "cannot serve: {e}");
                ExitCode::from(1)
            }
        };
    }
    let argv: Vec<String> = std::env::args().collect();
    // Commands that repeat on the client's side (an interval, a wait), asking the daemon (or
    // the pool's holder) once per round, so that they stream and stop with Ctrl-C.
    if let Some(code) = client::repeat(&sd, &cli.cmd, &argv) {
        return ExitCode::from(code);
    }
    let r = run_once(&sd, &argv);
    emit(&r);
    ExitCode::from(r.code)
}

/// Print a command's output.
pub fn emit(r: &daemon::ControlReply) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(r.out.as_bytes());
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(r.err.as_bytes());
}

/// The command line as history records it (`cairn` for the program's path).
pub fn cmdline(argv: &[String]) -> String {
    argv.iter()
        .enumerate()
        .map(|(i, a)| if i == 0 { "cairn" } else { a.as_str() })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run one command line: through the daemon if one answers; else in this process, or, when a
/// pool it needs is held by a foreground command of another process (`fgserve`), there.
pub fn run_once(sd: &statedir::StateDir, argv: &[String]) -> daemon::ControlReply {
    if let Some(r) = daemon::forward(sd.root(), argv.to_vec()) {
        return r;
    }
    run_here(sd, argv, true)
}

fn run_here(sd: &statedir::StateDir, argv: &[String], may_forward: bool) -> daemon::ControlReply {
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let text = e.render().to_string();
            let (out, err) = if e.use_stderr() {
                (String::new(), text)
            } else {
                (text, String::new())
            };
            return daemon::ControlReply {
                code: if e.use_stderr() { 2 } else { 0 },
                out,
                err,
            };
        }
    };
    // A command the holder answers may run there even after this one read other pools; any
    // other only if it had opened nothing yet (it changed nothing).
    let repeatable = fgserve::allowed(&cli.cmd);
    let pools = ctx::LocalPools::default();
    let mut ctx = ctx::Ctx::new(
        sd,
        &pools,
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
        cmdline(argv),
    );
    let code = execute(&mut ctx, cli.cmd);
    if let Some((sock, before)) = pools.held_elsewhere().filter(|_| may_forward) {
        if before == 0 || repeatable {
            return match daemon::forward_at(&sock, argv.to_vec()) {
                Some(r) => r,
                // It ended meanwhile: the pool is free now.
                None => run_here(sd, argv, false),
            };
        }
    }
    daemon::ControlReply {
        code,
        out: ctx.out,
        err: ctx.err,
    }
}

/// Run a parsed command; output goes to `ctx`, the exit code is returned.
pub fn execute(ctx: &mut ctx::Ctx, cmd: Top) -> u8 {
    let result = match cmd {
        Top::Pool(cmd) => poolcmd::run(ctx, cmd).map(|_| ()),
        Top::Dataset(cmd) => datasetcmd::run(ctx, cmd),
        Top::Inject(args) => injectcmd::run(ctx, args),
        Top::Serve { .. } => Err(vec![CmdError::new("serve", "", "not from here")]),
    };
    match result {
        Ok(_) => ctx.exit,
        Err(errs) => {
            let mut code = 1;
            for e in errs {
                if e.usage {
                    errln!(
                        ctx,
                        "error: {}\n\nFor more information, try '--help'.",
                        e.reason
                    );
                    code = 2;
                } else if e.name.is_empty() {
                    // Nothing to name (an empty argument): say so rather than print ''.
                    errln!(
                        ctx,
                        "cannot {}: {} (the name given is empty)",
                        e.verb,
                        e.reason
                    );
                } else {
                    errln!(ctx, "cannot {} '{}': {}", e.verb, e.name, e.reason);
                }
            }
            code
        }
    }
}
