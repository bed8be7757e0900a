//! End-to-end tests of monitoring as zpool users do it (issue 16): a foreground scrub (no daemon)
//! that Ctrl-C pauses, other terminals watching and pausing it, `status`'s options and interval,
//! `pool wait`, `pool iostat` in zpool's shape.
//!
//! The pool is the RAID1+0 fixture (`cairn_tests::raid10`); a foreground scrub is held back by a
//! low `scrub_rate_limit` so that it is still running while the test looks at it. Nothing here
//! depends on timing: every wait polls a condition with a generous bound.

use cairn_tests::raid10::{num, scan, setup_with_data};
use cairn_tests::{cairn_bin, Env, MIB};
use serde_json::Value;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A command started in the background (`cairn --state-dir STATE ARGS...`), its output in files.
struct Bg {
    child: Child,
    out: std::path::PathBuf,
    err: std::path::PathBuf,
}

impl Bg {
    fn start(env: &Env, name: &str, args: &[&str]) -> Bg {
        let out = env.path(&format!("{name}.out"));
        let err = env.path(&format!("{name}.err"));
        let child = Command::new(cairn_bin())
            .arg("--state-dir")
            .arg(env.state_dir())
            .args(args)
            .current_dir(env.dir())
            .env_remove("CAIRN_STATE_DIR")
            .env_remove("CAIRN_LOG")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("create the output file"))
            .stderr(std::fs::File::create(&err).expect("create the error file"))
            .spawn()
            .expect("start cairn");
        Bg { child, out, err }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) takes no pointers; `pid` is our own child, not reaped yet.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits (at most `timeout`) for the command to exit; its status and stderr.
    fn wait(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return (st, std::fs::read_to_string(&self.err).unwrap_or_default());
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the background command did not exit within {timeout:?}; stderr:\n{}",
                    std::fs::read_to_string(&self.err).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` every 100 ms until it is true; panics naming `what` after `timeout`.
fn poll(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The RAID1+0 pool with `mib` MiB of data, no daemon, and a scrub rate limit of 2 MiB/s.
fn slow_pool(mib: u64, seed: u64) -> Env {
    let (env, mut d, _model) = setup_with_data(mib * MIB, seed);
    d.stop();
    env.ok(&["pool", "set", "scrub_rate_limit=2M", "tank"]);
    env
}

/// Starts `pool scrub -w tank` in the foreground of another process and waits until other
/// commands see it running (status reaches the pool through that process) with some progress.
fn foreground_scrub(env: &Env, name: &str, args: &[&str]) -> Bg {
    let mut fg = Bg::start(env, name, args);
    poll(
        "the foreground scrub shows progress",
        Duration::from_secs(60),
        || {
            assert!(
                fg.running(),
                "the foreground scrub ended early: {}",
                std::fs::read_to_string(&fg.err).unwrap_or_default()
            );
            let o = env.run(&["pool", "status", "-j", "tank"]);
            if o.code != 0 {
                return false;
            }
            let v: Value = serde_json::from_str(&o.stdout).expect("status -j");
            let s = &v["pools"]["tank"]["scan_stats"];
            s["state"] == "SCANNING" && num(&s["examined"]) > 0
        },
    );
    fg
}

#[test]
fn ctrl_c_on_a_foreground_scrub_leaves_it_paused_and_resumable() {
    let env = slow_pool(48, 0x51);
    let mut fg = foreground_scrub(&env, "scrub", &["pool", "scrub", "-w", "tank"]);

    // While it runs, the read-only commands reach the pool through the scrubbing process.
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(st.contains("scrub in progress since"), "{st}");
    let l = env.ok(&["pool", "list", "-H", "-o", "name,health"]);
    assert_eq!(l.trim(), "tank\tONLINE");
    env.ok(&["pool", "get", "size", "tank"]);
    env.ok(&["pool", "events", "tank"]);
    env.ok(&["pool", "history", "tank"]);
    env.ok(&["pool", "iostat", "tank"]);
    // Anything else is refused, naming why.
    let e = env.fail(&["pool", "set", "comment=x", "tank"]);
    assert!(
        e.contains("cannot set 'tank': pool is busy: a foreground scrub holds it"),
        "{e}"
    );

    let before = scan(&env);
    fg.signal(libc::SIGINT);
    let (st, err) = fg.wait(Duration::from_secs(60));
    assert_eq!(st.code(), Some(130), "exit after SIGINT: {st}; {err}");
    assert!(err.contains("scrub of 'tank' paused"), "{err}");
    let s = scan(&env);
    assert_eq!(s["state"], "PAUSED", "{s:#}");
    assert!(num(&s["examined"]) >= num(&before["examined"]), "{s:#}");
    let text = env.ok(&["pool", "status", "tank"]);
    assert!(text.contains("scrub paused since"), "{text}");

    // A later scrub resumes it (same start) and finishes.
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    let o = env.run(&["pool", "scrub", "tank"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let done = scan(&env);
    assert_eq!(done["state"], "FINISHED", "{done:#}");
    assert_eq!(
        done["start_time"], s["start_time"],
        "resumed, not started over"
    );
    assert_eq!(num(&done["errors"]), 0);
}

#[test]
fn pause_stop_and_sigterm_reach_a_foreground_scrub_from_another_terminal() {
    let env = slow_pool(32, 0x52);
    let mut fg = foreground_scrub(&env, "scrub1", &["pool", "scrub", "-w", "tank"]);
    env.ok(&["pool", "scrub", "-p", "tank"]);
    let (st, err) = fg.wait(Duration::from_secs(60));
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(err.contains("scrub of 'tank' paused"), "{err}");
    assert_eq!(scan(&env)["state"], "PAUSED");

    // Resumed in the foreground, then stopped from outside.
    let mut fg = foreground_scrub(&env, "scrub2", &["pool", "scrub", "tank"]);
    env.ok(&["pool", "scrub", "-s", "tank"]);
    let (st, err) = fg.wait(Duration::from_secs(60));
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(err.contains("scrub of 'tank' canceled"), "{err}");
    assert_eq!(scan(&env)["state"], "CANCELED");

    // SIGTERM pauses too (exit 128 + 15).
    let mut fg = foreground_scrub(&env, "scrub3", &["pool", "scrub", "-w", "tank"]);
    fg.signal(libc::SIGTERM);
    let (st, err) = fg.wait(Duration::from_secs(60));
    assert_eq!(st.code(), Some(143), "{err}");
    assert_eq!(scan(&env)["state"], "PAUSED");
    assert!(fg.stdout().is_empty());
    // Nothing holds the pool any more: commands open it themselves again.
    assert!(!env.state_dir().join("fg/tank.sock").exists());
    env.ok(&["pool", "set", "comment=done", "tank"]);
}

/// `mirror a b` of 128 MiB sparse files, no daemon.
fn small_mirror() -> Env {
    let env = Env::new();
    let (a, b) = (env.p("a"), env.p("b"));
    env.ok(&["pool", "create", "--size", "128M", "tank", "mirror", &a, &b]);
    env
}

/// The names in the first column of a status table.
fn table_names(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.trim_start().starts_with("NAME"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn status_options_as_zpool_has_them() {
    let env = small_mirror();
    // -x: only unhealthy pools.
    assert_eq!(env.ok(&["pool", "status", "-x"]), "all pools are healthy\n");
    assert_eq!(
        env.ok(&["pool", "status", "-x", "tank"]),
        "pool 'tank' is healthy\n"
    );
    // -g: GUIDs (the pool row keeps the name); they are those of -j.
    let j = env.status_json("tank");
    let g = env.ok(&["pool", "status", "-g", "tank"]);
    let names = table_names(&g);
    assert_eq!(names[0], "tank", "{g}");
    let mirror_guid = j["vdevs"]["tank"]["vdevs"]["mirror-0"]["guid"]
        .as_str()
        .expect("guid")
        .to_string();
    assert_eq!(names[1], mirror_guid, "{g}");
    assert!(names[2..].iter().all(|n| n.parse::<u64>().is_ok()), "{g}");
    // -P full paths.
    let p = env.ok(&["pool", "status", "-P", "tank"]);
    assert!(table_names(&p).contains(&env.p("a")), "{p}");
    // -s: the SLOW column; -i: initialization notes; -D: no DDT.
    let s = env.ok(&["pool", "status", "-s", "-i", "-D", "tank"]);
    assert!(s.contains("READ WRITE CKSUM  SLOW"), "{s}");
    assert!(s.contains("(uninitialized)"), "{s}");
    assert!(s.contains("dedup: no DDT entries"), "{s}");
    // -e: only the unhealthy vdevs (and those above them).
    let e = env.ok(&["pool", "status", "-e", "tank"]);
    assert_eq!(table_names(&e), ["tank"], "{e}");
    env.ok(&["pool", "offline", "tank", "b"]);
    let e = env.ok(&["pool", "status", "-e", "tank"]);
    assert_eq!(table_names(&e), ["tank", "mirror-0", "b"], "{e}");
    let x = env.ok(&["pool", "status", "-x"]);
    assert!(x.contains("  pool: tank") && x.contains("DEGRADED"), "{x}");
    // -p: exact counters (same table here: no counts above 999).
    env.ok(&["pool", "status", "-p", "tank"]);
    // Trailing numbers: interval and count.
    let twice = env.ok(&["pool", "status", "tank", "1", "2"]);
    assert_eq!(twice.matches("  pool: tank").count(), 2, "{twice}");
    let o = env.run(&["pool", "status", "tank", "0"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("interval must be a positive number"));
}

#[test]
fn pool_wait_blocks_until_the_activities_end_under_the_daemon() {
    let (env, _d, _model) = setup_with_data(32 * MIB, 0x53);
    // Nothing in progress: at once.
    env.ok(&["pool", "wait", "tank"]);
    env.ok(&["pool", "wait", "-t", "trim,free,replace", "tank"]);
    env.ok(&["pool", "set", "scrub_rate_limit=16M", "tank"]);
    env.ok(&["pool", "scrub", "tank"]);
    assert_eq!(scan(&env)["state"], "SCANNING");
    let out = env.ok(&["pool", "wait", "-t", "scrub", "tank", "1"]);
    // It returned because the scrub ended, and said what it waited for meanwhile.
    assert_eq!(scan(&env)["state"], "FINISHED");
    assert!(out.contains("scrub") && out.contains("% done"), "{out}");
    // Bad activities and intervals are usage errors.
    for args in [
        &["pool", "wait", "-t", "bogus", "tank"][..],
        &["pool", "wait", "tank", "0"][..],
    ] {
        let o = env.run(args);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
    }
    let e = env.fail(&["pool", "wait", "nosuch"]);
    assert!(e.contains("cannot wait for 'nosuch': no such pool"), "{e}");
}

#[test]
fn pool_wait_without_a_daemon_reaches_the_foreground_scrub() {
    let env = slow_pool(32, 0x54);
    let mut fg = foreground_scrub(&env, "scrub", &["pool", "scrub", "tank"]);
    let mut w = Bg::start(&env, "wait", &["pool", "wait", "-t", "scrub", "tank"]);
    // A paused scrub is not in progress (as zpool): the wait ends.
    env.ok(&["pool", "scrub", "-p", "tank"]);
    let (st, err) = w.wait(Duration::from_secs(60));
    assert_eq!(st.code(), Some(0), "{err}");
    let (st, err) = fg.wait(Duration::from_secs(60));
    assert_eq!(st.code(), Some(0), "{err}");
    // A scrub left scanning by a killed foreground command, with nobody to run it: an error,
    // not an endless wait. (A fresh scrub commits its start at once.)
    env.ok(&["pool", "scrub", "-s", "tank"]);
    let mut fg = foreground_scrub(&env, "scrub2", &["pool", "scrub", "tank"]);
    fg.child.kill().expect("kill");
    let _ = fg.child.wait();
    assert_eq!(scan(&env)["state"], "SCANNING");
    let e = env.fail(&["pool", "wait", "tank"]);
    assert!(
        e.contains("cannot wait for 'tank': the scrub is not running"),
        "{e}"
    );
}

/// The rows of `iostat -v -j -p tank` by vdev name.
fn iostat_rows(env: &Env) -> std::collections::BTreeMap<String, Value> {
    let j = env.json(&["pool", "iostat", "-v", "-j", "-p", "tank"]);
    j["vdevs"]
        .as_array()
        .expect("vdevs")
        .iter()
        .map(|r| (r["name"].as_str().expect("name").to_string(), r.clone()))
        .collect()
}

#[test]
fn iostat_in_zpool_shape_streams_through_the_daemon() {
    let (env, _d, _model) = setup_with_data(16 * MIB, 0x55);
    let t = env.ok(&["pool", "iostat", "-v", "-l", "tank"]);
    let lines: Vec<&str> = t.lines().collect();
    assert!(
        lines[0].contains("capacity")
            && lines[0].contains("operations")
            && lines[0].contains("bandwidth")
            && lines[0].contains("total_wait"),
        "{t}"
    );
    assert!(
        lines[1].starts_with("pool ") && lines[1].contains("alloc"),
        "{t}"
    );
    assert!(lines[2].starts_with("----------  -----"), "{t}");
    assert!(lines.last().unwrap().starts_with("----------"), "{t}");
    // alloc and free on the pool and its top-level vdevs, dashes on the leaves.
    let row = |name: &str| -> Vec<String> {
        lines
            .iter()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .find(|f| f.first().is_some_and(|n| n == name))
            .unwrap_or_else(|| panic!("no row {name} in:\n{t}"))
    };
    assert_ne!(row("mirror-0")[1], "-", "{t}");
    assert_eq!(row("a")[1..3], ["-", "-"], "{t}");
    // COUNT reports through the daemon; -y leaves out the one since the pool was opened.
    let three = env.ok(&["pool", "iostat", "-H", "tank", "1", "3"]);
    assert_eq!(three.lines().count(), 3, "{three}");
    let two = env.ok(&["pool", "iostat", "-y", "-H", "-p", "tank", "1", "2"]);
    assert_eq!(two.lines().count(), 2, "{two}");
    assert!(
        two.lines()
            .all(|l| l.split('\t').skip(1).all(|c| c.parse::<u64>().is_ok())),
        "{two}"
    );
    // Without a count it goes on (streaming its reports) until interrupted.
    let mut bg = Bg::start(&env, "iostat", &["pool", "iostat", "-H", "tank", "1"]);
    poll(
        "iostat has printed three reports",
        Duration::from_secs(60),
        || bg.stdout().lines().count() >= 3,
    );
    assert!(bg.running());
    bg.signal(libc::SIGINT);
    bg.wait(Duration::from_secs(30));
}

#[test]
fn resilver_writes_count_in_iostat() {
    let (env, _d, mut model) = setup_with_data(8 * MIB, 0x56);
    env.ok(&["pool", "offline", "tank", "b"]);
    cairn_tests::raid10::write_random(&env, &mut model, 16 * MIB, 24 * MIB, 0x57);
    let before = iostat_rows(&env)["b"]["write_bytes"].as_u64().expect("b");
    env.ok(&["pool", "online", "tank", "b"]);
    let s = cairn_tests::raid10::wait_resilvered(&env, Duration::from_secs(120));
    let resilvered = num(&s["processed"]);
    // b's mirror holds about half of the 24 MiB written while it was offline.
    assert!(resilvered >= 8 * MIB, "{s:#}");
    let written = iostat_rows(&env)["b"]["write_bytes"].as_u64().expect("b") - before;
    assert!(
        written >= resilvered,
        "the resilver wrote {resilvered} bytes to b, iostat shows {written}"
    );
}

#[test]
fn a_daemon_scrub_w_on_a_terminal_shows_the_progress_bar_with_its_eta() {
    let (env, _d, _model) = setup_with_data(32 * MIB, 0x58);
    env.ok(&["pool", "set", "scrub_rate_limit=8M", "tank"]);
    // `script` (util-linux) gives the command a terminal.
    let cmd = format!(
        "{} --state-dir {} pool scrub -w tank",
        cairn_bin().display(),
        env.state_dir().display()
    );
    let o = env.tool("script", &["-qefc", &cmd, "/dev/null"]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let shown = format!("{}{}", o.stdout, o.stderr);
    assert!(shown.contains("scrub tank ["), "no progress bar:\n{shown}");
    assert!(shown.contains("% eta "), "no labelled ETA:\n{shown}");
    assert!(shown.contains("scrub of 'tank' finished"), "{shown}");
    assert_eq!(scan(&env)["state"], "FINISHED");
}

#[test]
fn pool_resilver_restarts_a_paused_resilver_from_the_start() {
    let (env, mut d, mut model) = setup_with_data(8 * MIB, 0x59);
    env.ok(&["pool", "offline", "tank", "b"]);
    cairn_tests::raid10::write_random(&env, &mut model, 16 * MIB, 24 * MIB, 0x5a);
    d.stop();
    env.ok(&["pool", "set", "scrub_rate_limit=1M", "tank"]);
    // online runs the resilver in the foreground; Ctrl-C pauses it.
    let mut fg = Bg::start(&env, "online", &["pool", "online", "tank", "b"]);
    poll(
        "the resilver shows progress",
        Duration::from_secs(60),
        || {
            let s = scan(&env);
            s["function"] == "RESILVER" && s["state"] == "SCANNING" && num(&s["examined"]) > 0
        },
    );
    fg.signal(libc::SIGINT);
    let (st, err) = fg.wait(Duration::from_secs(60));
    assert_eq!(st.code(), Some(130), "{err}");
    let paused = scan(&env);
    assert_eq!(paused["state"], "PAUSED", "{paused:#}");
    // The restarted one starts later than the paused one did (clock seconds).
    let started = num(&paused["start_time"]);
    poll(
        "the clock passes the start",
        Duration::from_secs(10),
        || cairn_tests::raid10::now() > started,
    );
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    let o = env.run(&["pool", "resilver", "tank"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("resilver of 'tank' finished"),
        "{}",
        o.stderr
    );
    let s = scan(&env);
    assert_eq!(
        (s["function"].as_str(), s["state"].as_str()),
        (Some("RESILVER"), Some("FINISHED"))
    );
    assert!(
        num(&s["start_time"]) > started,
        "restarted, not resumed: {s:#}"
    );
    assert!(!env
        .ok(&["pool", "status", "tank"])
        .contains("(resilver needed)"));
    let e = env.fail(&["pool", "resilver", "tank"]);
    assert!(
        e.contains("cannot resilver 'tank': no leaf lacks any txg"),
        "{e}"
    );
    // The events, field by field.
    let ev = env.ok(&["pool", "events", "-v", "tank"]);
    assert!(ev.starts_with("TIME"), "{ev}");
    assert!(
        ev.contains("        class = \"") && ev.contains("        pool = \"tank\""),
        "{ev}"
    );
}

#[test]
fn labelclear_refuses_an_imported_leaf_and_needs_f_for_an_exported_one() {
    let env = small_mirror();
    env.ok(&["pool", "sync"]);
    env.ok(&["pool", "sync", "tank"]);
    let e = env.fail(&["pool", "sync", "nosuch"]);
    assert!(e.contains("cannot sync 'nosuch': no such pool"), "{e}");
    let a = env.p("a");
    for args in [
        &["pool", "labelclear", &a][..],
        &["pool", "labelclear", "-f", &a][..],
    ] {
        let e = env.fail(args);
        assert!(
            e.contains("is a member (ACTIVE) of pool 'tank', imported here"),
            "{e}"
        );
    }
    env.ok(&["pool", "export", "tank"]);
    let e = env.fail(&["pool", "labelclear", &a]);
    assert!(e.contains("exported pool 'tank'; use '-f'"), "{e}");
    env.ok(&["pool", "labelclear", "-f", &a]);
    // No label left: clearing again needs nothing, and import finds the pool on b alone.
    env.ok(&["pool", "labelclear", &a]);
    let dir = env.dir().to_str().expect("utf-8").to_string();
    let list = env.ok(&["pool", "import", "-d", &dir]);
    assert!(list.contains("state: DEGRADED"), "{list}");
    let row = list
        .lines()
        .find(|l| l.split_whitespace().next() == Some("a"))
        .unwrap_or_else(|| panic!("no row for a:\n{list}"));
    assert!(
        row.contains("UNAVAIL") && row.contains("missing or invalid label"),
        "{list}"
    );
}

#[test]
fn status_l_resolves_symbolic_links_of_leaves() {
    let env = Env::new();
    env.sparse("real-a", 128 * MIB);
    std::os::unix::fs::symlink(env.path("real-a"), env.path("link-a")).expect("symlink");
    let (a, b) = (env.p("link-a"), env.p("b"));
    env.ok(&["pool", "create", "--size", "128M", "tank", "mirror", &a, &b]);
    let plain = table_names(&env.ok(&["pool", "status", "tank"]));
    assert!(plain.contains(&"link-a".to_string()), "{plain:?}");
    let l = table_names(&env.ok(&["pool", "status", "-L", "tank"]));
    assert!(l.contains(&"real-a".to_string()), "{l:?}");
    let lp = table_names(&env.ok(&["pool", "status", "-L", "-P", "tank"]));
    let real = std::fs::canonicalize(env.path("real-a")).expect("canonicalize");
    assert!(lp.contains(&real.display().to_string()), "{lp:?}");
}
