//! End-to-end tests of scrub, resilver, attach/detach/replace and scrub schedules (SPEC section 6).
//!
//! Every test runs the real binary in its own temporary directory with its own state directory and, most
//! of the time, its own daemon (see `cairn_tests::Env::serve`). Unless a test says otherwise the pool is
//! `tank`, a RAID1+0 of four sparse 256 MiB leaves (`mirror a b mirror c d`) with one 128 MiB volume
//! `tank/vol`, filled through NBD by `qemu-img convert` of a file of pseudo-random bytes (then flushed).
//! Leaves are damaged by overwriting their files, as `dd if=/dev/urandom of=a bs=1M seek=4 count=25
//! conv=notrunc` would (with a seeded generator, so that failures reproduce).
//!
//! Data is checked by reading the whole volume back through NBD and comparing it with an in-memory
//! model; "served by one leaf only" is checked by taking the other children of its mirror offline first.
//!
//! The clients come from the Debian packages qemu-utils (qemu-img); a test whose client is missing
//! fails and says which package to install.

use cairn_tests::raid10::*;
use cairn_tests::{Env, MIB};
use serde_json::Value;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------------
// 1. Scrub repairs a damaged leaf
// ---------------------------------------------------------------------------------------------------

#[test]
fn scrub_repairs_every_damaged_block_of_one_leaf() {
    let (env, mut d, model) = setup_with_data(100 * MIB, 0x5c1);
    assert_eq!(scan_text(&env).trim(), "scan: none requested");
    // dd if=/dev/urandom of=a bs=1M seek=4 count=25 conv=notrunc
    corrupt(&env, "a", 4 * MIB, 25 * MIB, 1);

    env.ok(&["pool", "scrub", "-w", "tank"]);
    let s = scan(&env);
    assert_eq!(s["function"], "SCRUB", "{s:#}");
    assert_eq!(s["state"], "FINISHED", "{s:#}");
    let repaired = num(&s["processed"]);
    // a holds about half of the 100 MiB: most of the 25 MiB damaged are its blocks.
    assert!(
        (12 * MIB..=25 * MIB).contains(&repaired),
        "the scrub should repair the damaged blocks of a (up to 25M), repaired {repaired}: {s:#}"
    );
    assert_eq!(num(&s["errors"]), 0, "{s:#}");
    assert!(num(&s["examined"]) >= 100 * MIB, "{s:#}");
    let t = scan_text(&env);
    assert!(
        t.starts_with("  scan: scrub repaired ") && t.contains(" with 0 errors on "),
        "{t}"
    );
    assert!(!t.contains("repaired 0B"), "{t}");
    // Checksum errors on a only, and a's repaired bytes include the scrub's (the daemon's own reads of
    // damaged metadata may have repaired some before).
    let (r, w, ck) = errors_of(&env, "a");
    assert!(
        r == 0 && w == 0 && ck > 0,
        "a: read {r} write {w} cksum {ck}"
    );
    let on_a = num(&leaf(&env, "a")["repaired_bytes"]);
    assert!(
        on_a >= repaired && on_a <= repaired + MIB,
        "a's repaired_bytes {on_a}, the scrub's {repaired}"
    );
    for other in ["b", "c", "d"] {
        assert_eq!(errors_of(&env, other), (0, 0, 0), "leaf {other}");
    }
    let st = status(&env, false);
    assert!(st.contains("errors: No known data errors"), "{st}");

    // Nothing left to repair.
    assert_clean_scrub(&env);
    // The data reads back right, from a alone too.
    assert_volume(&env, &model);
    env.ok(&["pool", "offline", "tank", "b"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

#[test]
fn foreground_scrub_and_resilver_without_a_daemon() {
    let (env, mut d, mut model) = setup_with_data(48 * MIB, 0xf0);
    d.stop();
    corrupt(&env, "c", 4 * MIB, 16 * MIB, 2);
    let o = env.run(&["pool", "scrub", "tank"]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let line = o.stderr.trim();
    assert!(
        line.starts_with("scrub of 'tank' finished: ")
            && line.ends_with(" repaired, 0 errors")
            && !line.contains(" 0B repaired"),
        "foreground scrub message: {line:?}"
    );
    assert!(scan_num(&env, "processed") > 0);
    assert!(errors_of(&env, "c").2 > 0);
    assert_clean_scrub(&env);

    // offline, write (through a daemon), online without a daemon: the resilver runs in the foreground.
    env.ok(&["pool", "offline", "tank", "d"]);
    let mut d = env.serve();
    write_random(&env, &mut model, 0, 8 * MIB, 0xf1);
    d.stop();
    env.ok(&["pool", "online", "tank", "d"]);
    let s = scan(&env);
    assert_eq!(
        (s["function"].as_str(), s["state"].as_str()),
        (Some("RESILVER"), Some("FINISHED")),
        "`online` without a daemon should resilver before it returns: {s:#}"
    );
    assert!(num(&s["processed"]) > 0, "{s:#}");
    assert!(!status(&env, false).contains("(resilver needed)"));
    let _d = env.serve();
    env.ok(&["pool", "offline", "tank", "c"]);
    assert_volume(&env, &model);
}

// ---------------------------------------------------------------------------------------------------
// 2. A block damaged on both sides of its mirror
// ---------------------------------------------------------------------------------------------------

#[test]
fn a_block_damaged_on_both_sides_is_listed_and_the_rest_repaired() {
    let (env, mut d, mut model) = setup_with_data(100 * MIB, 0xb0);
    let bad = 40 * MIB;
    let (holders, leaf_off) = find_block(&env, &model, bad);
    // The rest of a mirror child damaged as in test 1, then the block on both children.
    corrupt(&env, holders[0], 4 * MIB, 25 * MIB, 3);
    corrupt(&env, holders[0], leaf_off, VOL_BLOCK, 4);
    corrupt(&env, holders[1], leaf_off, VOL_BLOCK, 5);

    env.ok(&["pool", "scrub", "-w", "tank"]);
    let s = scan(&env);
    assert_eq!(s["state"], "FINISHED", "{s:#}");
    assert_eq!(
        num(&s["errors"]),
        1,
        "exactly one block has no good copy: {s:#}"
    );
    assert!(
        num(&s["processed"]) >= 8 * MIB,
        "the other damaged blocks are repaired: {s:#}"
    );
    let t = scan_text(&env);
    assert!(t.contains(" with 1 errors on "), "{t}");
    let st = status(&env, true);
    let entry = format!("tank/vol: offset {bad} ");
    assert!(
        st.contains(&entry),
        "status -v should list {entry:?}:\n{st}"
    );
    assert_eq!(
        st.matches("tank/vol: offset").count(),
        1,
        "only that block is lost:\n{st}"
    );
    assert!(
        status(&env, false).contains("errors: 1 data errors, use '-v' for a list"),
        "{}",
        status(&env, false)
    );
    let errlist = env.status_json("tank")["errlist"].clone();
    assert_eq!(errlist.as_array().map(Vec::len), Some(1), "{errlist:#}");
    assert!(errors_of(&env, holders[1]).2 >= 1);

    // The lost block gives EIO, every other block reads right.
    assert_volume_except(&env, &model, Some(bad));

    // Rewriting the block gives it back and clears the error (as the status's action says).
    let block: Vec<u8> = vec![0x42; VOL_BLOCK as usize];
    let mut c = env.nbd_connect(VOL).expect("connect");
    c.write(bad, &block).expect("rewrite the lost block");
    c.flush().expect("flush");
    c.disconnect().expect("disconnect");
    model[bad as usize..(bad + VOL_BLOCK) as usize].copy_from_slice(&block);
    assert_volume(&env, &model);
    let st = status(&env, true);
    assert!(st.contains("errors: No known data errors"), "{st}");
    assert_clean_scrub(&env);
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 3. Pause, SIGKILL, resume
// ---------------------------------------------------------------------------------------------------

/// Copies a (sparse) leaf file, keeping its holes where it has them (zero blocks stay holes).
fn copy_sparse(from: &std::path::Path, to: &std::path::Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut src = std::fs::File::open(from).expect("open the leaf");
    let len = src.metadata().expect("stat").len();
    let mut dst = std::fs::File::create(to).expect("create the copy");
    dst.set_len(len).expect("size the copy");
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        src.read_exact(&mut buf[..n]).expect("read the leaf");
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(off)).expect("seek");
            dst.write_all(&buf[..n]).expect("write the copy");
        }
        off += n as u64;
    }
}

#[test]
fn a_paused_scrub_survives_sigkill_and_resumes_where_it_was() {
    let (env, mut d, model) = setup_with_data(100 * MIB, 0x3a);
    d.stop();
    // Damage spread over all of a's volume data (before and after the pause point): every third of its
    // data blocks. Metadata is spared, since the daemon's own commits move metadata and would make the
    // count of blocks to repair depend on timing; data does not move.
    let on_a = volume_blocks_on(&env, "a", &model);
    assert!(
        on_a.len() as u64 * VOL_BLOCK >= 40 * MIB,
        "a should hold about half of the data, found {} blocks",
        on_a.len()
    );
    let damaged: Vec<u64> = on_a.iter().step_by(3).map(|&(l, _)| l).collect();
    for (i, &l) in damaged.iter().enumerate() {
        corrupt(&env, "a", l, VOL_BLOCK, 100 + i as u64);
    }
    let expected = damaged.len() as u64 * VOL_BLOCK;

    // An identical twin of the damaged pool (a copy of its leaves, imported by a second state
    // directory) gets a straight scrub: the paused and resumed one must find exactly the same.
    let twin = env.mkdir("twin");
    for n in ["a", "b", "c", "d"] {
        copy_sparse(&env.path(n), &twin.join(n));
    }
    let twin_state = env.mkdir("twin-state");
    let t = twin.to_str().expect("utf-8");
    let o = env.run_with_state(&twin_state, &["pool", "import", "-f", "-d", t, "tank"]);
    assert_eq!(o.code, 0, "twin import: {}{}", o.stdout, o.stderr);
    let o = env.run_with_state(&twin_state, &["pool", "scrub", "tank"]);
    assert_eq!(o.code, 0, "twin scrub: {}{}", o.stdout, o.stderr);
    let o = env.run_with_state(&twin_state, &["pool", "status", "-j", "tank"]);
    let tj: Value = serde_json::from_str(&o.stdout).expect("twin status -j");
    let straight = tj["pools"]["tank"]["scan_stats"].clone();
    assert_eq!(straight["state"], "FINISHED", "{straight:#}");
    let straight_repaired = num(&straight["processed"]);
    assert_eq!(
        straight_repaired,
        expected,
        "a straight scrub repairs exactly the {} damaged blocks: {straight:#}",
        damaged.len()
    );

    // Slow scrub: 16 MiB batches read from two copies at 16 MiB/s, about 2 s each.
    let mut d = env.serve();
    env.ok(&["pool", "set", "scrub_rate_limit=16M", "tank"]);
    env.ok(&["pool", "scrub", "tank"]);
    wait_for(
        &env,
        "the scrub has examined 40 MiB",
        Duration::from_secs(20),
        || scan_num(&env, "examined") >= 40 * MIB,
    );
    // The rate shown is what the limit lets through (the waits count as scanning time), not the
    // speed of the bursts between them.
    let t = scan_text(&env);
    let rate = issued_rate(&t);
    assert!(
        (4 * MIB..=32 * MIB).contains(&rate),
        "issued at {rate} B/s under a 16M/s limit:\n{t}"
    );
    env.ok(&["pool", "scrub", "-p", "tank"]);
    let s = scan(&env);
    assert_eq!(
        s["state"], "PAUSED",
        "`scrub -p` should have paused it: {s:#}"
    );
    let at_pause = num(&s["examined"]);
    let total = num(&s["to_examine"]);
    assert!(
        at_pause < total * 3 / 4,
        "paused too late to tell ({at_pause} of {total})"
    );
    let t = scan_text(&env);
    assert!(
        t.contains("scrub paused since ") && t.contains("scrub started on "),
        "{t}"
    );
    // Nothing runs: no rate, no time to go (as zpool).
    assert!(t.contains(" scanned, ") && t.contains("% done"), "{t}");
    assert!(
        !t.contains("/s") && !t.contains("to go") && !t.contains("estimated"),
        "{t}"
    );
    // Paused means paused.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(scan_num(&env, "examined"), at_pause);

    d.kill();
    let _d = env.serve();
    let s = scan(&env);
    assert_eq!(s["state"], "PAUSED", "still paused after SIGKILL: {s:#}");
    assert!(
        num(&s["examined"]) >= at_pause && num(&s["examined"]) > 0,
        "examined went back from {at_pause} to {}",
        num(&s["examined"])
    );
    let read_before = pool_read_bytes(&env);
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    env.ok(&["pool", "scrub", "-w", "tank"]);
    let s = scan(&env);
    assert_eq!(
        (s["function"].as_str(), s["state"].as_str()),
        (Some("SCRUB"), Some("FINISHED")),
        "{s:#}"
    );
    // It went on from the bookmark: what it read after the restart is the rest, not everything.
    let read = pool_read_bytes(&env) - read_before;
    let rest = 2 * (num(&s["examined"]) - at_pause);
    assert!(
        read <= rest + 8 * MIB,
        "after the restart the scrub read {read} bytes, the rest was {rest}: it started over"
    );
    assert_eq!(
        num(&s["processed"]),
        straight_repaired,
        "the paused+resumed scrub should repair what a straight scrub repairs"
    );
    assert_eq!(num(&s["errors"]), 0);
    assert_clean_scrub(&env);
}

#[test]
fn a_scrub_killed_midway_resumes_after_a_restart() {
    let (env, mut d, model) = setup_with_data(100 * MIB, 0x3b);
    env.ok(&["pool", "set", "scrub_rate_limit=16M", "tank"]);
    env.ok(&["pool", "scrub", "tank"]);
    wait_for(
        &env,
        "the scrub has examined 48 MiB",
        Duration::from_secs(20),
        || scan_num(&env, "examined") >= 48 * MIB,
    );
    let before_kill = scan_num(&env, "examined");
    d.kill();
    let _d = env.serve();
    let s = scan(&env);
    // At most a few seconds of work lost (40 MiB is 5 s at this rate).
    assert!(
        num(&s["examined"]) + 40 * MIB >= before_kill,
        "the restart lost more than a few seconds of work: examined {} after, {before_kill} before: {s:#}",
        num(&s["examined"])
    );
    assert!(
        s["state"] == "SCANNING" || s["state"] == "FINISHED",
        "the daemon should resume the interrupted scrub: {s:#}"
    );
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    let s = wait_scan_end(&env, Duration::from_secs(20));
    assert_eq!(
        (s["function"].as_str(), s["state"].as_str()),
        (Some("SCRUB"), Some("FINISHED")),
        "{s:#}"
    );
    assert_volume(&env, &model);
}

#[test]
fn an_export_during_a_scrub_and_the_import_resume_it() {
    let (env, mut d, _model) = setup_with_data(100 * MIB, 0x3d);
    env.ok(&["pool", "set", "scrub_rate_limit=16M", "tank"]);
    env.ok(&["pool", "scrub", "tank"]);
    wait_for(
        &env,
        "the scrub has examined data",
        Duration::from_secs(10),
        || scan_num(&env, "examined") > 0,
    );
    env.ok(&["pool", "export", "tank"]);
    assert!(env.pool_names().is_empty());
    let dir = env.p("");
    env.ok(&["pool", "import", "-d", &dir, "tank"]);
    let s = scan(&env);
    assert_eq!(
        (s["function"].as_str(), s["state"].as_str()),
        (Some("SCRUB"), Some("SCANNING")),
        "the import should resume the scrub: {s:#}"
    );
    let at_import = num(&s["examined"]);
    assert!(at_import > 0, "the scrub started over: {s:#}");
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    let s = wait_scan_end(&env, Duration::from_secs(20));
    assert_eq!(s["state"], "FINISHED", "{s:#}");
    assert!(num(&s["examined"]) >= 100 * MIB, "{s:#}");
    d.assert_alive();
}

#[test]
fn a_canceled_scrub_is_reported_and_the_next_one_starts_over() {
    let (env, mut d, _model) = setup_with_data(100 * MIB, 0x3e);
    env.ok(&["pool", "set", "scrub_rate_limit=16M", "tank"]);
    env.ok(&["pool", "scrub", "tank"]);
    wait_for(
        &env,
        "the scrub has examined data",
        Duration::from_secs(10),
        || scan_num(&env, "examined") > 0,
    );
    let t = scan_text(&env);
    assert!(
        t.contains("scrub in progress since ")
            && t.contains(" scanned at ")
            && t.contains("% done"),
        "{t}"
    );
    env.ok(&["pool", "scrub", "-s", "tank"]);
    assert_eq!(scan_fs(&env), ("SCRUB".into(), "CANCELED".into()));
    let t = scan_text(&env);
    assert!(t.starts_with("  scan: scrub canceled on "), "{t}");
    let e = env.fail(&["pool", "scrub", "-p", "tank"]);
    assert!(e.starts_with("cannot scrub 'tank': "), "{e}");
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    env.ok(&["pool", "scrub", "-w", "tank"]);
    let s = scan(&env);
    assert_eq!(s["state"], "FINISHED", "{s:#}");
    // A new scrub: its counters are its own, not added to the canceled one's.
    let examined = num(&s["examined"]);
    assert!(
        examined >= 100 * MIB && examined <= num(&s["to_examine"]),
        "{s:#}"
    );
    d.assert_alive();
}

#[test]
fn pause_takes_effect_at_once_under_a_low_rate_limit() {
    let (env, mut d, _model) = setup_with_data(100 * MIB, 0x3c);
    env.ok(&["pool", "set", "scrub_rate_limit=1M", "tank"]);
    env.ok(&["pool", "scrub", "tank"]);
    wait_for(
        &env,
        "the scrub has examined data",
        Duration::from_secs(10),
        || scan_num(&env, "examined") > 0,
    );
    let t0 = Instant::now();
    env.ok(&["pool", "scrub", "-p", "tank"]);
    let took = t0.elapsed();
    let s = scan(&env);
    assert_eq!(
        s["state"], "PAUSED",
        "`scrub -p` returned (after {took:?}) but the scrub is not paused: {s:#}"
    );
    // Pausing it again says so and changes nothing.
    let o = env.run(&["pool", "scrub", "-p", "tank"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("already paused"), "{}", o.stderr);
    assert_eq!(scan(&env)["state"], "PAUSED");
    // A crash right after the pause keeps it paused.
    d.kill();
    let _d = env.serve();
    assert_eq!(scan_fs(&env).1, "PAUSED");
    env.ok(&["pool", "scrub", "tank"]);
    let t0 = Instant::now();
    env.ok(&["pool", "scrub", "-s", "tank"]);
    let s = scan(&env);
    assert_eq!(
        s["state"],
        "CANCELED",
        "`scrub -s` returned (after {:?}) but the scrub still runs: {s:#}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------------
// 4. Resilver after offline/online copies only what was missed
// ---------------------------------------------------------------------------------------------------

#[test]
fn online_resilvers_only_the_missed_writes() {
    let (env, mut d, mut model) = setup_with_data(100 * MIB, 0x40);
    let alloc = pool_alloc(&env);
    assert!(alloc >= 100 * MIB, "alloc {alloc}");
    env.ok(&["pool", "offline", "tank", "b"]);
    assert_eq!(leaf(&env, "b")["state"], "OFFLINE");
    write_random(&env, &mut model, 32 * MIB, 16 * MIB, 0x41);
    env.ok(&["pool", "online", "tank", "b"]);
    let s = wait_resilvered(&env, Duration::from_secs(20));
    let resilvered = num(&s["processed"]);
    // About half of the 16 MiB lands on b's mirror (the rest on mirror-1), plus some metadata; a full
    // copy would be about half the pool's allocation (50M+).
    assert!(
        (6 * MIB..=20 * MIB).contains(&resilvered),
        "the resilver should copy only the data b missed (~8M), it copied {resilvered} of a pool \
         holding {alloc}: {s:#}"
    );
    assert_eq!(num(&s["errors"]), 0);
    let t = scan_text(&env);
    assert!(
        t.starts_with("  scan: resilvered ") && t.contains(" with 0 errors on "),
        "{t}"
    );
    assert_eq!(leaf(&env, "b")["state"], "ONLINE");
    assert_eq!(
        errors_of(&env, "b"),
        (0, 0, 0),
        "stale copies are not checksum errors"
    );
    assert_clean_scrub(&env);
    // b holds everything: read with a offline.
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 8. Schedules
// ---------------------------------------------------------------------------------------------------

#[test]
fn a_scrub_schedule_makes_the_daemon_scrub_on_its_own() {
    let (env, mut d, _model) = setup_with_data(16 * MIB, 0x80);
    assert_eq!(last_scrub(&env), 0);
    env.ok(&["pool", "set", "scrub_schedule=3s", "tank"]);
    let mut seen: Vec<u64> = Vec::new();
    wait_for(
        &env,
        "the daemon has started two scrubs",
        Duration::from_secs(10),
        || {
            let l = last_scrub(&env);
            if l != 0 && seen.last() != Some(&l) {
                seen.push(l);
            }
            seen.len() >= 2
        },
    );
    assert!(
        seen[1] >= seen[0] + 3,
        "two scheduled scrubs should be at least 3 s apart: {seen:?}"
    );
    let st = status(&env, false);
    assert!(
        st.contains("\n schedule: scrub 3s, last ") && st.contains(", next "),
        "status should show the schedule:\n{st}"
    );
    let j = env.status_json("tank");
    assert_eq!(j["scrub_schedule"], "3s");

    // off: no more scrubs.
    env.ok(&["pool", "set", "scrub_schedule=off", "tank"]);
    wait_scan_end(&env, Duration::from_secs(10));
    let l = last_scrub(&env);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(last_scrub(&env), l, "scrub_schedule=off still scrubs");
    assert!(!status(&env, false).contains(" schedule:"));
    d.assert_alive();
}

#[test]
fn a_scheduled_scrub_missed_while_the_daemon_was_down_runs_when_it_starts() {
    let (env, mut d, _model) = setup_with_data(16 * MIB, 0x81);
    env.ok(&["pool", "scrub", "-w", "tank"]);
    let first = last_scrub(&env);
    assert!(first > 0);
    d.stop();
    env.ok(&["pool", "set", "scrub_schedule=2s", "tank"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(last_scrub(&env), first, "no daemon, no scrub");
    let started = now();
    let _d = env.serve();
    wait_for(
        &env,
        "the missed scrub has started",
        Duration::from_secs(3),
        || last_scrub(&env) >= started,
    );
    let s = wait_scan_end(&env, Duration::from_secs(10));
    assert_eq!(s["function"], "SCRUB", "{s:#}");
    assert_eq!(s["state"], "FINISHED", "{s:#}");
}

// ---------------------------------------------------------------------------------------------------
// 9. Bad input
// ---------------------------------------------------------------------------------------------------

/// The pool's topology as `status -j` shows it (names, paths, kinds, guids).
fn topology(env: &Env) -> Value {
    fn strip(v: &Value) -> Value {
        let mut o = serde_json::Map::new();
        for k in ["name", "vdev_type", "guid", "path"] {
            if let Some(x) = v.get(k) {
                o.insert(k.into(), x.clone());
            }
        }
        if let Some(c) = v["vdevs"].as_object() {
            let kids: serde_json::Map<String, Value> =
                c.iter().map(|(k, v)| (k.clone(), strip(v))).collect();
            o.insert("vdevs".into(), Value::Object(kids));
        }
        Value::Object(o)
    }
    strip(&env.status_json("tank")["vdevs"]["tank"])
}

#[test]
fn scrub_pause_or_stop_with_nothing_running_fails() {
    let env = Env::new();
    raid10(&env);
    // Without and with a daemon.
    for daemon in [false, true] {
        let _d = daemon.then(|| env.serve());
        for flag in ["-p", "-s"] {
            let e = env.fail(&["pool", "scrub", flag, "tank"]);
            assert!(
                e.starts_with("cannot scrub 'tank': "),
                "scrub {flag} (daemon: {daemon}): {e}"
            );
        }
        let e = env.fail(&["pool", "scrub", "nosuch"]);
        assert!(e.starts_with("cannot scrub 'nosuch': "), "{e}");
        assert_eq!(scan_text(&env).trim(), "scan: none requested");
    }
    // After a finished scrub there is nothing to pause either.
    let _d = env.serve();
    env.ok(&["pool", "scrub", "-w", "tank"]);
    let e = env.fail(&["pool", "scrub", "-p", "tank"]);
    assert!(
        e.starts_with("cannot scrub 'tank': there is no active scrub or resilver to pause"),
        "{e}"
    );
    assert_eq!(scan_fs(&env), ("SCRUB".into(), "FINISHED".into()));
}

#[test]
fn detach_of_the_last_complete_child_fails() {
    let (env, mut d, mut model) = setup_with_data(16 * MIB, 0x90);
    env.ok(&["pool", "offline", "tank", "b"]);
    write_random(&env, &mut model, 0, 4 * MIB, 0x91);
    let before = topology(&env);
    let e = env.fail(&["pool", "detach", "tank", "a"]);
    assert!(e.starts_with("cannot detach 'a': "), "{e}");
    assert_eq!(topology(&env), before, "a refused detach changes nothing");
    // b (offline, stale) may go; then a is a lone leaf, which cannot be detached.
    env.ok(&["pool", "detach", "tank", "b"]);
    assert_eq!(leaf_names(&env), ["a", "c", "d"]);
    let before = topology(&env);
    let e = env.fail(&["pool", "detach", "tank", "a"]);
    assert!(e.starts_with("cannot detach 'a': "), "{e}");
    let e = env.fail(&["pool", "detach", "tank", "nosuch"]);
    assert!(e.starts_with("cannot detach 'nosuch': "), "{e}");
    assert_eq!(topology(&env), before);
    assert_volume(&env, &model);
    d.assert_alive();
}

#[test]
fn attach_of_a_small_missing_or_used_file_fails_and_changes_nothing() {
    let (env, mut d, _model) = setup_with_data(16 * MIB, 0x92);
    let before = topology(&env);
    env.sparse("small", 100 * MIB);
    let small = env.p("small");
    let e = env.fail(&["pool", "attach", "tank", "a", &small]);
    assert!(
        e.starts_with(&format!("cannot attach '{small}': ")) && e.contains("too small"),
        "{e}"
    );
    let content = std::fs::read(env.path("small")).expect("read small");
    assert!(
        content.iter().all(|&b| b == 0),
        "a refused attach wrote on the file"
    );
    let missing = env.p("missing");
    let e = env.fail(&["pool", "attach", "tank", "a", &missing]);
    assert!(
        e.starts_with(&format!("cannot attach '{missing}': ")),
        "{e}"
    );
    assert!(!env.path("missing").exists(), "attach created the file");
    env.sparse("e", 256 * MIB);
    let e = env.fail(&["pool", "attach", "tank", "nosuch", &env.p("e")]);
    assert!(e.starts_with("cannot attach "), "{e}");
    let e = env.fail(&["pool", "attach", "tank", "a", &env.p("c")]);
    assert!(e.starts_with("cannot attach "), "{e}");
    let e = env.fail(&["pool", "replace", "tank", "b", &small]);
    assert!(e.starts_with("cannot replace 'b': "), "{e}");
    // In place, while b's file is still the device it was.
    let e = env.fail(&["pool", "replace", "tank", "b"]);
    assert!(e.starts_with("cannot replace 'b': "), "{e}");
    assert_eq!(topology(&env), before, "refused attaches change nothing");
    assert_eq!(env.pool_health("tank"), "ONLINE");
    assert!(!status(&env, false).contains("being replaced"));
    d.assert_alive();
}

#[test]
fn bad_scrub_schedules_and_rate_limits_are_refused() {
    let env = Env::new();
    raid10(&env);
    let get = |p: &str| {
        env.ok(&["pool", "get", "-H", "-o", "value", p, "tank"])
            .trim()
            .to_string()
    };
    assert_eq!(get("scrub_schedule"), "off");
    for good in [
        "daily",
        "weekly",
        "monthly",
        "12h",
        "7d",
        "90s",
        "0 3 * * sun",
        "*/15 * * * mon-fri",
        "off",
    ] {
        env.ok(&["pool", "set", &format!("scrub_schedule={good}"), "tank"]);
        assert_eq!(get("scrub_schedule"), good);
    }
    env.ok(&["pool", "set", "scrub_schedule=weekly", "tank"]);
    for bad in [
        "",
        "0s",
        "5x",
        "-3h",
        "1.5h",
        "abc",
        "61 * * * *",
        "* * * *",
        "* * * * * *",
        "0 25 * * *",
        "0 0 32 * *",
        "0 0 * 13 *",
        "0 0 * * funday",
        "*/0 * * * *",
    ] {
        let e = env.fail(&["pool", "set", &format!("scrub_schedule={bad}"), "tank"]);
        assert!(e.starts_with("cannot set 'tank': "), "{bad:?}: {e}");
        assert_eq!(
            get("scrub_schedule"),
            "weekly",
            "{bad:?} changed the schedule"
        );
    }
    env.ok(&["pool", "set", "scrub_rate_limit=1M", "tank"]);
    for bad in ["abc", "-1", "1Q"] {
        let e = env.fail(&["pool", "set", &format!("scrub_rate_limit={bad}"), "tank"]);
        assert!(e.starts_with("cannot set 'tank': "), "{bad:?}: {e}");
    }
    assert_eq!(get("scrub_rate_limit"), "1M");
}
