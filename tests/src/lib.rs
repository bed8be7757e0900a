//! A small harness for Cairn's end-to-end tests: it runs the real `cairn` binary.
//!
//! Every test builds an [`Env`]: a private temporary directory that holds the test's leaves, and inside it a
//! private state directory that is passed as `--state-dir` on every command, so that a test never touches
//! the user's state and tests can run in parallel. Commands run with the temporary directory as their
//! working directory, so relative leaf names resolve inside it.
//!
//! The binary is found through the `CAIRN_BIN` environment variable when it is set, else as
//! `target/<profile>/cairn` next to the test executable (which lives in `target/<profile>/deps/`). Build it
//! first with `cargo build -p cairn-cli` (the README's `cargo build --workspace && cargo test --workspace`
//! does that).
//!
//! [`Env::serve`] starts the daemon (`cairn serve`) as a child process and returns a [`Daemon`] that kills
//! it when dropped; [`Env::tool`] runs an NBD client (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) and fails
//! with the package to install when the client is missing.
//!
//! ```no_run
//! let env = cairn_tests::Env::new();
//! env.ok(&["pool", "create", "--size", "128M", "tank", "mirror", "a", "b"]);
//! assert_eq!(env.pool_names(), ["tank"]);
//! ```

pub mod raid10;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One MiB.
pub const MIB: u64 = 1024 * 1024;

/// How long one `cairn` command may run before the harness kills it and fails the test.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The `cairn` binary: `$CAIRN_BIN`, else `target/<profile>/cairn` derived from the test executable.
///
/// Panics with a hint to build it when it does not exist.
pub fn cairn_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CAIRN_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "CAIRN_BIN={} does not name a file; build the binary with `cargo build -p cairn-cli`",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("cannot find the test executable");
    // target/<profile>/deps/<test>-<hash>: the binary is target/<profile>/cairn.
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("cairn");
    assert!(
        bin.is_file(),
        "the cairn binary was not found at {}: run `cargo build -p cairn-cli` first \
         (or `cargo build --workspace && cargo test --workspace`), or set CAIRN_BIN",
        bin.display()
    );
    bin
}

/// How long the daemon may take to answer on its control socket after it is started.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the daemon may take to exit after SIGTERM.
pub const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one run of an NBD client (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) may take.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// The control socket of the daemon, in the state directory.
pub const CONTROL_SOCKET: &str = "cairn.sock";

/// The daemon's default NBD socket, in the state directory.
pub const NBD_SOCKET: &str = "nbd.sock";

/// The result of one command.
#[derive(Debug, Clone)]
pub struct Out {
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// A test's private world: a temporary directory with the leaves and a private state directory.
pub struct Env {
    dir: tempfile::TempDir,
    state: PathBuf,
    /// How many daemons this environment has started (for their log files).
    daemons: AtomicU32,
}

impl Default for Env {
    fn default() -> Self {
        Env::new()
    }
}

impl Env {
    /// A new temporary directory with an empty state directory `state/` inside it.
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("cairn-test-")
            .tempdir()
            .expect("cannot create a temporary directory");
        let state = dir.path().join("state");
        // Private, as cairn makes one (cairn refuses a state directory group or others may write,
        // which a umask of 002 would give).
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&state)
            .expect("cannot create the state directory");
        Env {
            dir,
            state,
            daemons: AtomicU32::new(0),
        }
    }

    /// The temporary directory (the working directory of every command).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The state directory passed as `--state-dir`.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// The path of `name` inside the temporary directory (`name` may hold subdirectories).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// [`Env::path`] as a string, for command lines.
    pub fn p(&self, name: &str) -> String {
        self.path(name)
            .to_str()
            .expect("non-UTF-8 temp path")
            .to_string()
    }

    /// Absolute paths of several leaves, as strings.
    pub fn leaves(&self, names: &[&str]) -> Vec<String> {
        names.iter().map(|n| self.p(n)).collect()
    }

    /// Creates (or resizes) a sparse file `name` of `size` bytes inside the temporary directory.
    pub fn sparse(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .expect("create sparse file");
        f.set_len(size).expect("set_len");
        p
    }

    /// Creates a subdirectory of the temporary directory (mode 0755 whatever the umask: it may
    /// serve as a state directory, which cairn refuses when group or others may write it) and
    /// returns its path.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    /// Runs `cairn --state-dir STATE ARGS...` in the temporary directory.
    pub fn run(&self, args: &[&str]) -> Out {
        self.run_with_state(&self.state, args)
    }

    /// Runs `cairn --state-dir STATE ARGS...` with another state directory (a second "system").
    pub fn run_with_state(&self, state: &Path, args: &[&str]) -> Out {
        self.run_full(self.dir.path(), state, args)
    }

    /// Runs `cairn --state-dir STATE ARGS...` with this environment's state directory, from another
    /// working directory.
    pub fn run_in(&self, cwd: &Path, args: &[&str]) -> Out {
        self.run_full(cwd, &self.state, args)
    }

    /// Runs `cairn --state-dir STATE ARGS...` in `cwd`.
    ///
    /// Every command is checked never to panic, and killed if it runs longer than [`COMMAND_TIMEOUT`].
    pub fn run_full(&self, cwd: &Path, state: &Path, args: &[&str]) -> Out {
        let mut cmd = Command::new(cairn_bin());
        cmd.arg("--state-dir")
            .arg(state)
            .args(args)
            .current_dir(cwd)
            .env_remove("CAIRN_STATE_DIR")
            .env_remove("CAIRN_LOG")
            .env("RUST_BACKTRACE", "1");
        let what = format!("cairn {}", args.join(" "));
        let (out, status) = run_with_timeout(&mut cmd, &what, COMMAND_TIMEOUT);
        assert!(
            !out.stderr.contains("panicked") && status.code().is_some(),
            "`cairn {}` crashed (status {status}):\n{}",
            args.join(" "),
            out.stderr
        );
        out
    }

    /// Runs a command that must succeed (exit 0) and returns its standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(
            o.code,
            0,
            "`cairn {}` failed:\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            o.stdout,
            o.stderr
        );
        o.stdout
    }

    /// Runs a command that must fail with exit code 1 and returns its standard error.
    pub fn fail(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(
            o.code,
            1,
            "`cairn {}` should have failed with exit 1:\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            o.stdout,
            o.stderr
        );
        o.stderr
    }

    /// Runs a command that must succeed and parses its standard output as JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let s = self.ok(args);
        serde_json::from_str(&s).unwrap_or_else(|e| {
            panic!(
                "`cairn {}` printed invalid JSON ({e}):\n{s}",
                args.join(" ")
            )
        })
    }

    /// `pool status -j POOL`: the pool's object (`pools.POOL`).
    pub fn status_json(&self, pool: &str) -> Value {
        let v = self.json(&["pool", "status", "-j", pool]);
        v["pools"][pool].clone()
    }

    /// `pool list -j -p`: the whole document.
    pub fn list_json(&self) -> Value {
        self.json(&["pool", "list", "-j", "-p"])
    }

    /// The names of the imported pools (`pool list -H -o name`).
    pub fn pool_names(&self) -> Vec<String> {
        let s = self.ok(&["pool", "list", "-H", "-o", "name"]);
        if s.trim() == "no pools available" {
            return Vec::new();
        }
        s.lines().map(str::to_string).collect()
    }

    /// A pool's exact size in bytes (`pool list -H -p -o size POOL`).
    pub fn pool_size(&self, pool: &str) -> u64 {
        let s = self.ok(&["pool", "list", "-H", "-p", "-o", "size", pool]);
        s.trim()
            .parse()
            .unwrap_or_else(|e| panic!("bad size {s:?}: {e}"))
    }

    /// A pool's health (`pool list -H -o health POOL`).
    pub fn pool_health(&self, pool: &str) -> String {
        self.ok(&["pool", "list", "-H", "-o", "health", pool])
            .trim()
            .to_string()
    }

    /// The output of `pool import -d DIR...` (the list of importable pools).
    pub fn importable(&self, dirs: &[&Path]) -> String {
        let mut args = vec!["pool".to_string(), "import".to_string()];
        for d in dirs {
            args.push("-d".into());
            args.push(d.to_str().expect("utf-8").into());
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&a)
    }

    /// The names of the pools `pool import -d DIR...` offers.
    pub fn importable_names(&self, dirs: &[&Path]) -> Vec<String> {
        self.importable(dirs)
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("pool: "))
            .map(str::to_string)
            .collect()
    }
}

impl Env {
    /// The daemon's default NBD socket (`STATE/nbd.sock`).
    pub fn nbd_socket(&self) -> PathBuf {
        self.state.join(NBD_SOCKET)
    }

    /// The NBD URI of an export (`POOL/VOL`, or "" for the default export) on the default socket.
    pub fn nbd_uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.nbd_socket().to_str().expect("non-UTF-8 temp path")
        )
    }

    /// Starts `cairn --state-dir STATE serve` and waits until it answers (see [`Daemon`]).
    pub fn serve(&self) -> Daemon {
        self.serve_with(&[])
    }

    /// Starts `cairn --state-dir STATE serve ARGS...` with stderr appended to `serve-N.log` in the
    /// temporary directory, and waits until its control socket (and its NBD socket, unless
    /// `--nbd-socket` is given) accepts connections. Panics with the daemon's log when it exits or does
    /// not answer within [`DAEMON_START_TIMEOUT`].
    pub fn serve_with(&self, args: &[&str]) -> Daemon {
        self.serve_logging_to(args, None)
    }

    /// [`Env::serve_with`] with the daemon's stderr opened on `stderr` (say `/dev/full`, where every
    /// write fails) instead of a log file; the returned daemon has no log to show.
    pub fn serve_logging_to(&self, args: &[&str], stderr: Option<&Path>) -> Daemon {
        self.spawn_daemon(args, stderr, None, None)
    }

    /// [`Env::serve_with`] with the daemon started under `umask` (through `sh -c 'umask U; exec
    /// cairn ...'`), to check what it makes does not follow a permissive umask.
    pub fn serve_with_umask(&self, umask: u32, args: &[&str]) -> Daemon {
        self.spawn_daemon(args, None, Some(umask), None)
    }

    /// [`Env::serve_with`] with the daemon's open-file limit (soft and hard) set to `nofile`, as
    /// `prlimit --nofile=N:N` would.
    pub fn serve_with_nofile(&self, nofile: u64, args: &[&str]) -> Daemon {
        self.spawn_daemon(args, None, None, Some(nofile))
    }

    fn spawn_daemon(
        &self,
        args: &[&str],
        stderr: Option<&Path>,
        umask: Option<u32>,
        nofile: Option<u64>,
    ) -> Daemon {
        let n = self.daemons.fetch_add(1, Ordering::Relaxed) + 1;
        let log = self.dir.path().join(format!("serve-{n}.log"));
        let logf = match stderr {
            None => File::create(&log).expect("cannot create the daemon log"),
            Some(p) => std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap_or_else(|e| panic!("cannot open {}: {e}", p.display())),
        };
        let mut cmd = match umask {
            None => Command::new(cairn_bin()),
            Some(u) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("umask {u:03o}; exec \"$@\""))
                    .arg("sh")
                    .arg(cairn_bin());
                c
            }
        };
        cmd.arg("--state-dir")
            .arg(&self.state)
            .arg("serve")
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("CAIRN_STATE_DIR")
            .env_remove("CAIRN_LOG")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(logf));
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            // SAFETY: the closure runs in the child between fork and exec and only calls setrlimit,
            // which is async-signal-safe, on a struct it owns; it allocates nothing
            // (`last_os_error` builds an error from errno without allocating).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("cannot run `cairn serve`");
        let mut d = Daemon {
            child,
            log,
            status: None,
        };
        let mut sockets = vec![self.state.join(CONTROL_SOCKET)];
        if !args
            .iter()
            .any(|a| *a == "--nbd-socket" || a.starts_with("--nbd-socket="))
        {
            sockets.push(self.nbd_socket());
        }
        let start = Instant::now();
        for sock in sockets {
            loop {
                if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                    break;
                }
                if let Some(st) = d.try_status() {
                    panic!(
                        "`cairn serve` exited ({st}) before it listened on {}; its log:\n{}",
                        sock.display(),
                        d.log()
                    );
                }
                if start.elapsed() > DAEMON_START_TIMEOUT {
                    d.kill();
                    panic!(
                        "`cairn serve` did not listen on {} within {DAEMON_START_TIMEOUT:?}; its log:\n{}",
                        sock.display(),
                        d.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        d
    }

    /// Runs an external program (an NBD client) in the temporary directory, with a timeout of
    /// [`TOOL_TIMEOUT`]. Panics with a hint to install its package when it is not installed.
    pub fn tool(&self, program: &str, args: &[&str]) -> Out {
        let path = find_program(program).unwrap_or_else(|| {
            panic!(
                "`{program}` was not found in PATH: install the {} package (apt-get install \
                 qemu-utils libnbd-bin fio; CI installs them) to run the NBD end-to-end tests",
                package_of(program)
            )
        });
        let mut cmd = Command::new(path);
        cmd.args(args).current_dir(self.dir.path());
        let what = format!("{program} {}", args.join(" "));
        run_with_timeout(&mut cmd, &what, TOOL_TIMEOUT).0
    }

    /// [`Env::tool`] that must exit 0; returns its standard output.
    pub fn tool_ok(&self, program: &str, args: &[&str]) -> String {
        let o = self.tool(program, args);
        assert_eq!(
            o.code,
            0,
            "`{program} {}` failed:\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            o.stdout,
            o.stderr
        );
        o.stdout
    }

    /// `qemu-io -f raw OPTS... -c CMD... URI` (`-r` in `opts` opens read-only).
    pub fn qemu_io(&self, opts: &[&str], uri: &str, cmds: &[&str]) -> Out {
        let mut a = vec!["-f", "raw"];
        a.extend_from_slice(opts);
        for c in cmds {
            a.push("-c");
            a.push(c);
        }
        a.push(uri);
        self.tool("qemu-io", &a)
    }

    /// qemu-io commands that must all succeed (exit 0, no failed command, every `read -P` verified);
    /// returns its standard output.
    pub fn qemu_io_ok(&self, opts: &[&str], uri: &str, cmds: &[&str]) -> String {
        let o = self.qemu_io(opts, uri, cmds);
        let all = format!("{}{}", o.stdout, o.stderr);
        assert!(
            o.code == 0
                && !all.contains("verification failed")
                && !all.contains(" failed:")
                && !all.contains("can't open"),
            "qemu-io {cmds:?} on {uri} failed (exit {}):\nstdout:\n{}\nstderr:\n{}",
            o.code,
            o.stdout,
            o.stderr
        );
        o.stdout
    }
}

/// The Debian package that provides an NBD client program.
pub fn package_of(program: &str) -> &'static str {
    match program {
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" | "nbdsh" => "libnbd-bin",
        "fio" => "fio",
        _ => "matching",
    }
}

/// The full path of `program` found in `PATH`, if it is there and executable.
pub fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Runs `cmd` with stdin closed and stdout/stderr captured; kills it and panics if it runs longer than
/// `timeout`. `what` names the command in messages.
pub fn run_with_timeout(cmd: &mut Command, what: &str, timeout: Duration) -> (Out, ExitStatus) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{what}`: {e}"));
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = so.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = se.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for a child") {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{what}` did not finish in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().expect("stdout reader")).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().expect("stderr reader")).into_owned();
    let out = Out {
        code: status.code().unwrap_or(-1),
        stdout,
        stderr,
    };
    (out, status)
}

/// A running `cairn serve` started by [`Env::serve`]. Dropping it kills the daemon (SIGKILL) unless it
/// has already stopped; [`Daemon::stop`] shuts it down cleanly with SIGTERM.
pub struct Daemon {
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Daemon {
    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A figure in KiB from `/proc/PID/status` (`VmRSS`, `VmHWM`...), or `None` once the daemon is gone.
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        let st = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        st.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// What the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status if the daemon has exited (without blocking).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("wait for the daemon");
        }
        self.status
    }

    /// Whether the daemon process is still running.
    pub fn is_alive(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Panics with the daemon's log unless it is still running.
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.try_status() {
            panic!("the daemon died ({st}); its log:\n{}", self.log());
        }
    }

    /// Kills the daemon with SIGKILL (as a crash would) and reaps it.
    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            self.status = Some(self.child.wait().expect("wait for the daemon"));
        }
    }

    /// Sends SIGTERM and waits up to [`DAEMON_STOP_TIMEOUT`] for the daemon to exit; returns its status.
    /// Panics (after a SIGKILL) when it does not exit in time.
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(st) = self.try_status() {
            return st;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) takes no pointers; `pid` is our own child, which has not been reaped yet
        // (try_status above saw it running), so the pid cannot have been reused.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            rc,
            0,
            "kill(SIGTERM) failed: {}",
            std::io::Error::last_os_error()
        );
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_status() {
                return st;
            }
            if start.elapsed() > DAEMON_STOP_TIMEOUT {
                self.kill();
                panic!(
                    "the daemon did not exit within {DAEMON_STOP_TIMEOUT:?} of SIGTERM; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Shuts the daemon down with SIGTERM and asserts that it exits 0.
    pub fn stop(&mut self) {
        let st = self.terminate();
        assert_eq!(
            st.code(),
            Some(0),
            "the daemon should exit 0 after SIGTERM, got {st}; its log:\n{}",
            self.log()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The leaves (`vdev_type` "leaf") of a `status -j` pool object, depth first: (name, leaf object).
pub fn json_leaves(pool: &Value) -> Vec<(String, Value)> {
    fn walk(v: &Value, out: &mut Vec<(String, Value)>) {
        if v["vdev_type"] == "leaf" {
            out.push((
                v["name"].as_str().unwrap_or_default().to_string(),
                v.clone(),
            ));
        }
        if let Some(children) = v["vdevs"].as_object() {
            for c in children.values() {
                walk(c, out);
            }
        }
    }
    let mut out = Vec::new();
    if let Some(roots) = pool["vdevs"].as_object() {
        for r in roots.values() {
            walk(r, &mut out);
        }
    }
    out
}

/// Overwrites `len` bytes at `offset` of a file with `byte`, or with pseudo-random bytes when `byte` is
/// `None` (a fixed xorshift sequence seeded by `seed`, so failures reproduce).
pub fn scribble(path: &Path, offset: u64, len: u64, byte: Option<u8>, seed: u64) {
    use std::os::unix::fs::FileExt;
    let mut x = seed | 1;
    let buf: Vec<u8> = (0..len)
        .map(|_| match byte {
            Some(b) => b,
            None => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            }
        })
        .collect();
    let f = File::options()
        .write(true)
        .open(path)
        .expect("open for scribble");
    f.write_all_at(&buf, offset).expect("scribble");
}

// ---------------------------------------------------------------------------------------------------
// A small synchronous NBD client
// ---------------------------------------------------------------------------------------------------

/// NBD wire constants (NetworkBlockDevice/nbd, doc/proto.md) that [`NbdClient`] uses.
pub mod nbd_proto {
    /// The first magic of the server's greeting ("NBDMAGIC").
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    /// The newstyle magic ("IHAVEOPT"), also the prefix of every option.
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    /// The magic of option replies.
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    /// The magic of transmission requests.
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    /// The magic of simple replies.
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    /// Handshake flag: fixed newstyle.
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
    /// Handshake flag: no zeroes after EXPORT_NAME.
    pub const FLAG_NO_ZEROES: u16 = 2;
    /// Client flag: fixed newstyle.
    pub const CFLAG_FIXED_NEWSTYLE: u32 = 1;
    /// Client flag: no zeroes.
    pub const CFLAG_NO_ZEROES: u32 = 2;
    /// Option: NBD_OPT_GO.
    pub const OPT_GO: u32 = 7;
    /// Option reply: ACK.
    pub const REP_ACK: u32 = 1;
    /// Option reply: INFO.
    pub const REP_INFO: u32 = 3;
    /// Option replies with this bit set are errors.
    pub const REP_FLAG_ERROR: u32 = 0x8000_0000;
    /// Info type: NBD_INFO_EXPORT (size and transmission flags).
    pub const INFO_EXPORT: u16 = 0;
    /// Command: READ.
    pub const CMD_READ: u16 = 0;
    /// Command: WRITE.
    pub const CMD_WRITE: u16 = 1;
    /// Command: DISC.
    pub const CMD_DISC: u16 = 2;
    /// Command: FLUSH.
    pub const CMD_FLUSH: u16 = 3;
    /// Command: TRIM.
    pub const CMD_TRIM: u16 = 4;
    /// Command: WRITE_ZEROES.
    pub const CMD_WRITE_ZEROES: u16 = 6;
    /// Command flag: FUA (force unit access).
    pub const CMDF_FUA: u16 = 1;
    /// Transmission flag: the export is read-only.
    pub const TF_READ_ONLY: u16 = 2;
}

/// What went wrong with an NBD request.
#[derive(Debug)]
pub enum NbdError {
    /// The connection failed (the server went away, a timeout, ...).
    Io(std::io::Error),
    /// The server answered the request with this NBD error (an errno value: 5 = EIO, 22 = EINVAL...).
    Server(u32),
    /// The server broke the protocol (bad magic, wrong cookie, an option refused...).
    Protocol(String),
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdError::Io(e) => write!(f, "NBD connection error: {e}"),
            NbdError::Server(e) => write!(
                f,
                "NBD error {e} ({})",
                std::io::Error::from_raw_os_error(*e as i32)
            ),
            NbdError::Protocol(m) => write!(f, "NBD protocol error: {m}"),
        }
    }
}

impl std::error::Error for NbdError {}

impl From<std::io::Error> for NbdError {
    fn from(e: std::io::Error) -> NbdError {
        NbdError::Io(e)
    }
}

/// A small, correct, synchronous NBD client for tests: fixed newstyle handshake with NO_ZEROES,
/// `NBD_OPT_GO` for one export, then one request at a time with simple replies (READ, WRITE with or
/// without FUA, TRIM, WRITE_ZEROES, FLUSH, DISC); [`NbdClient::send_write`] and
/// [`NbdClient::send_flush`] leave requests in flight, e.g. to kill the server under them. Every
/// socket read and write has a timeout ([`NbdClient::TIMEOUT`]), so a hung server fails the test
/// instead of hanging it.
///
/// ```no_run
/// let env = cairn_tests::Env::new();
/// // ... create tank/vol, start the daemon ...
/// let mut c = cairn_tests::NbdClient::connect(&env.nbd_socket(), "tank/vol").unwrap();
/// c.write(0, &[7u8; 4096]).unwrap();
/// c.flush().unwrap();
/// assert_eq!(c.read(0, 4096).unwrap(), vec![7u8; 4096]);
/// c.disconnect().unwrap();
/// ```
pub struct NbdClient {
    sock: std::os::unix::net::UnixStream,
    size: u64,
    flags: u16,
    cookie: u64,
    /// Cookies of requests sent by [`NbdClient::send_write`] or [`NbdClient::send_flush`] whose replies
    /// have not been read yet.
    unanswered: Vec<u64>,
}

// NBD is a big-endian wire protocol, so the client has to speak it (an inner `#![allow]` would have to
// go at the top of this file; the allowance is kept to this impl).
#[allow(clippy::big_endian_bytes)]
impl NbdClient {
    /// How long one socket read or write may block.
    pub const TIMEOUT: Duration = Duration::from_secs(120);

    /// Connects to the unix socket `socket` and negotiates the export `export` (e.g. `tank/vol`).
    pub fn connect(socket: &Path, export: &str) -> Result<NbdClient, NbdError> {
        use nbd_proto::*;
        use std::io::Write;
        let sock = std::os::unix::net::UnixStream::connect(socket)?;
        sock.set_read_timeout(Some(Self::TIMEOUT))?;
        sock.set_write_timeout(Some(Self::TIMEOUT))?;
        let mut c = NbdClient {
            sock,
            size: 0,
            flags: 0,
            cookie: 0,
            unanswered: Vec::new(),
        };
        if c.recv_u64()? != NBDMAGIC {
            return Err(NbdError::Protocol("greeting: no NBDMAGIC".into()));
        }
        if c.recv_u64()? != IHAVEOPT {
            return Err(NbdError::Protocol("greeting: not a newstyle server".into()));
        }
        let hflags = c.recv_u16()?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 || hflags & FLAG_NO_ZEROES == 0 {
            return Err(NbdError::Protocol(format!(
                "greeting: handshake flags {hflags:#x} lack FIXED_NEWSTYLE or NO_ZEROES"
            )));
        }
        let mut msg = (CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        // NBD_OPT_GO: name length, name, no information requests.
        let name = export.as_bytes();
        let opt_len = u32::try_from(4 + name.len() + 2)
            .map_err(|_| NbdError::Protocol("export name too long".into()))?;
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_GO.to_be_bytes());
        msg.extend_from_slice(&opt_len.to_be_bytes());
        msg.extend_from_slice(&(name.len() as u32).to_be_bytes());
        msg.extend_from_slice(name);
        msg.extend_from_slice(&0u16.to_be_bytes());
        c.sock.write_all(&msg)?;
        let mut info = None;
        loop {
            if c.recv_u64()? != OPT_REPLY_MAGIC {
                return Err(NbdError::Protocol("option reply: bad magic".into()));
            }
            let opt = c.recv_u32()?;
            let typ = c.recv_u32()?;
            let len = c.recv_u32()?;
            if len > (1 << 20) {
                return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
            }
            let data = c.recv(len as usize)?;
            if opt != OPT_GO {
                return Err(NbdError::Protocol(format!(
                    "reply to GO names option {opt}"
                )));
            }
            if typ & REP_FLAG_ERROR != 0 {
                return Err(NbdError::Protocol(format!(
                    "GO '{export}' refused ({typ:#x}): {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            match typ {
                REP_ACK => break,
                REP_INFO if data.len() >= 2 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                    if data.len() != 12 {
                        return Err(NbdError::Protocol(format!(
                            "NBD_INFO_EXPORT of {} bytes",
                            data.len()
                        )));
                    }
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&data[2..10]);
                    info = Some((
                        u64::from_be_bytes(s),
                        u16::from_be_bytes([data[10], data[11]]),
                    ));
                }
                // Other information (name, block sizes) and unknown replies are ignored.
                _ => {}
            }
        }
        let (size, flags) =
            info.ok_or_else(|| NbdError::Protocol("GO sent no NBD_INFO_EXPORT".into()))?;
        c.size = size;
        c.flags = flags;
        Ok(c)
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The export's transmission flags.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// READ `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        self.request(nbd_proto::CMD_READ, 0, offset, len, &[])?;
        self.recv(len as usize).map_err(NbdError::Io)
    }

    /// WRITE `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.write_flags(offset, data, 0)
    }

    /// WRITE with FUA: durable when it returns.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.write_flags(offset, data, nbd_proto::CMDF_FUA)
    }

    fn write_flags(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<(), NbdError> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::Protocol("write larger than 4 GiB".into()))?;
        self.request(nbd_proto::CMD_WRITE, flags, offset, len, data)
    }

    /// Sends a WRITE of `data` at `offset` without waiting for its reply (e.g. to kill the server with
    /// writes in flight). The next request, or [`NbdClient::wait_sent`], first reads the replies of
    /// such requests, in whatever order the server sends them.
    pub fn send_write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        use std::io::Write;
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::Protocol("write larger than 4 GiB".into()))?;
        self.cookie += 1;
        let mut b = self.header(nbd_proto::CMD_WRITE, 0, offset, len);
        b.extend_from_slice(data);
        self.sock.write_all(&b)?;
        self.unanswered.push(self.cookie);
        Ok(())
    }

    /// Sends raw bytes, whatever they are (a misbehaving client).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), NbdError> {
        use std::io::Write;
        self.sock.write_all(bytes)?;
        Ok(())
    }

    /// Sends a FLUSH without waiting for its reply (see [`NbdClient::send_write`]).
    pub fn send_flush(&mut self) -> Result<(), NbdError> {
        use std::io::Write;
        self.cookie += 1;
        let b = self.header(nbd_proto::CMD_FLUSH, 0, 0, 0);
        self.sock.write_all(&b)?;
        self.unanswered.push(self.cookie);
        Ok(())
    }

    /// Reads the replies of the requests sent by [`NbdClient::send_write`] and
    /// [`NbdClient::send_flush`]; the first error wins.
    pub fn wait_sent(&mut self) -> Result<(), NbdError> {
        let mut first_err = None;
        while !self.unanswered.is_empty() {
            let (err, cookie) = self.reply_header()?;
            let Some(i) = self.unanswered.iter().position(|&c| c == cookie) else {
                return Err(NbdError::Protocol(format!(
                    "reply with cookie {cookie}, which no unanswered request has"
                )));
            };
            self.unanswered.swap_remove(i);
            if err != 0 && first_err.is_none() {
                first_err = Some(NbdError::Server(err));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// TRIM `len` bytes at `offset`.
    pub fn trim(&mut self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.request(nbd_proto::CMD_TRIM, 0, offset, len, &[])
    }

    /// WRITE_ZEROES of `len` bytes at `offset`.
    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.request(nbd_proto::CMD_WRITE_ZEROES, 0, offset, len, &[])
    }

    /// FLUSH: every write acknowledged before it is durable when it returns.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.request(nbd_proto::CMD_FLUSH, 0, 0, 0, &[])
    }

    /// Sends NBD_CMD_DISC and waits until the server closes the connection.
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        use std::io::Write;
        self.wait_sent()?;
        self.cookie += 1;
        let hdr = self.header(nbd_proto::CMD_DISC, 0, 0, 0);
        self.sock.write_all(&hdr)?;
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        let mut buf = [0u8; 512];
        loop {
            match self.sock.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    return Err(NbdError::Protocol(format!(
                        "{n} unexpected bytes after DISC"
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(NbdError::Io(e)),
            }
        }
    }

    fn header(&self, typ: u16, flags: u16, offset: u64, len: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&nbd_proto::REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    /// Sends one request (with `payload` for a write) and reads its simple reply header. On success the
    /// caller reads the data of a READ.
    fn request(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<(), NbdError> {
        use std::io::Write;
        self.wait_sent()?;
        self.cookie += 1;
        let mut b = self.header(typ, flags, offset, len);
        b.extend_from_slice(payload);
        self.sock.write_all(&b)?;
        let (err, cookie) = self.reply_header()?;
        if cookie != self.cookie {
            return Err(NbdError::Protocol(format!(
                "reply cookie {cookie} to request {}",
                self.cookie
            )));
        }
        // A simple reply to a failed READ carries no data (the server sends none).
        if err != 0 {
            return Err(NbdError::Server(err));
        }
        Ok(())
    }

    /// A simple reply's header: (error, cookie).
    fn reply_header(&mut self) -> Result<(u32, u64), NbdError> {
        if self.recv_u32()? != nbd_proto::SIMPLE_REPLY_MAGIC {
            return Err(NbdError::Protocol("reply: bad magic".into()));
        }
        let err = self.recv_u32()?;
        let cookie = self.recv_u64()?;
        Ok((err, cookie))
    }

    fn recv(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.sock.read_exact(&mut b)?;
        Ok(b)
    }

    fn recv_u16(&mut self) -> std::io::Result<u16> {
        let mut b = [0u8; 2];
        self.sock.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn recv_u32(&mut self) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.sock.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn recv_u64(&mut self) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        self.sock.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
}

impl Env {
    /// An [`NbdClient`] connected to `export` (`POOL/VOL`) on the daemon's default socket.
    pub fn nbd_connect(&self, export: &str) -> Result<NbdClient, NbdError> {
        NbdClient::connect(&self.nbd_socket(), export)
    }
}

impl Env {
    /// Keeps the temporary directory (leaves, state, daemon logs) after the test, for a post-mortem;
    /// returns its path.
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
    }
}

/// Deterministic pseudo-random bytes (xorshift64, seeded).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
