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
//! ```no_run
//! let env = cairn_tests::Env::new();
//! env.ok(&["pool", "create", "--size", "128M", "tank", "mirror", "a", "b"]);
//! assert_eq!(env.pool_names(), ["tank"]);
//! ```

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
        std::fs::create_dir(&state).expect("cannot create the state directory");
        Env { dir, state }
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

    /// Creates a subdirectory of the temporary directory and returns its path.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::create_dir_all(&p).expect("mkdir");
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
        let mut child = Command::new(cairn_bin())
            .arg("--state-dir")
            .arg(state)
            .args(args)
            .current_dir(cwd)
            .env_remove("CAIRN_STATE_DIR")
            .env_remove("CAIRN_LOG")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run the cairn binary");
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
            if let Some(st) = child.try_wait().expect("wait for cairn") {
                break st;
            }
            if start.elapsed() > COMMAND_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`cairn {}` did not finish in {COMMAND_TIMEOUT:?}",
                    args.join(" ")
                );
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
