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

use cairn_tests::{json_leaves, random_bytes, scribble, Daemon, Env, NbdError, MIB};
use serde_json::Value;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The volume every test uses.
const VOL: &str = "tank/vol";
/// Its size.
const VOL_SIZE: u64 = 128 * MIB;
/// Its block size (the default volblocksize).
const VOL_BLOCK: u64 = 16 * 1024;

// ---------------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------------

/// Creates the pool `tank` (`mirror a b mirror c d` of sparse 256 MiB files) and the 128 MiB volume.
fn raid10(env: &Env) {
    let l = env.leaves(&["a", "b", "c", "d"]);
    env.ok(&[
        "pool", "create", "--size", "256M", "tank", "mirror", &l[0], &l[1], "mirror", &l[2], &l[3],
    ]);
    env.ok(&["dataset", "create", "-V", "128M", VOL]);
}

/// The RAID1+0 pool with its volume and a daemon serving it; the model of the volume (zeros).
fn setup() -> (Env, Daemon, Vec<u8>) {
    let env = Env::new();
    raid10(&env);
    let d = env.serve();
    (env, d, vec![0; VOL_SIZE as usize])
}

/// [`setup`], then `len` pseudo-random bytes (seed `seed`) written at offset 0 of the volume.
fn setup_with_data(len: u64, seed: u64) -> (Env, Daemon, Vec<u8>) {
    let (env, d, mut model) = setup();
    write_random(&env, &mut model, 0, len, seed);
    (env, d, model)
}

/// Writes `len` pseudo-random bytes at `offset` of the volume, then FLUSHes them. At offset 0 a file of
/// them is copied in with `qemu-img convert -n` through the daemon's NBD socket; elsewhere (qemu-img
/// always writes from 0) they are written in 1 MiB requests by the harness's NBD client. The model
/// records the write.
fn write_random(env: &Env, model: &mut [u8], offset: u64, len: u64, seed: u64) {
    let data = random_bytes(len as usize, seed);
    if offset == 0 {
        let name = format!("img-{seed:x}.raw");
        std::fs::write(env.path(&name), &data).expect("write the image file");
        let src = env.p(&name);
        let uri = env.nbd_uri(VOL);
        env.tool_ok(
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", "raw", &src, &uri],
        );
        std::fs::remove_file(env.path(&name)).expect("remove the image file");
    } else {
        let mut c = env.nbd_connect(VOL).expect("connect to tank/vol");
        for (i, chunk) in data.chunks(MIB as usize).enumerate() {
            let o = offset + i as u64 * MIB;
            c.write(o, chunk)
                .unwrap_or_else(|e| panic!("NBD write at {o}: {e}"));
        }
        c.disconnect().expect("NBD disconnect");
    }
    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
    flush(env);
}

/// An NBD FLUSH on the volume: every write acknowledged before it is durable.
fn flush(env: &Env) {
    let mut c = env.nbd_connect(VOL).expect("connect to tank/vol");
    c.flush().expect("NBD flush");
    c.disconnect().expect("NBD disconnect");
}

/// Reads the whole volume through NBD and asserts that it equals `model`, naming the first difference.
fn assert_volume(env: &Env, model: &[u8]) {
    assert_volume_except(env, model, None);
}

/// [`assert_volume`], except that the volume block at `bad` (if any) must fail with EIO.
fn assert_volume_except(env: &Env, model: &[u8], bad: Option<u64>) {
    let mut c = env.nbd_connect(VOL).expect("connect to tank/vol");
    assert_eq!(c.size(), model.len() as u64, "volume size");
    let chunk = MIB;
    let mut off = 0;
    while off < model.len() as u64 {
        let want = &model[off as usize..(off + chunk) as usize];
        if bad.is_some_and(|b| b >= off && b < off + chunk) {
            // Block by block: only the bad block fails.
            let mut o = off;
            while o < off + chunk {
                let r = c.read(o, VOL_BLOCK as u32);
                let w = &model[o as usize..(o + VOL_BLOCK) as usize];
                if Some(o) == bad {
                    match r {
                        Err(NbdError::Server(5)) => {}
                        Err(e) => panic!("reading the lost block at {o} gave {e}, not EIO"),
                        Ok(_) => panic!("the lost block at {o} read without an error"),
                    }
                } else {
                    let got = r.unwrap_or_else(|e| panic!("read at {o}: {e}"));
                    assert_same(&format!("volume block at {o}"), &got, w);
                }
                o += VOL_BLOCK;
            }
        } else {
            let got = c
                .read(off, chunk as u32)
                .unwrap_or_else(|e| panic!("read of 1 MiB at {off}: {e}"));
            assert_same(&format!("volume MiB at {off}"), &got, want);
        }
        off += chunk;
    }
    c.disconnect().expect("NBD disconnect");
}

/// Asserts that two buffers are equal, naming the first differing offset.
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// Overwrites `len` bytes of leaf `leaf` at `offset` with seeded pseudo-random bytes (like dd from
/// /dev/urandom with conv=notrunc).
fn corrupt(env: &Env, leaf: &str, offset: u64, len: u64, seed: u64) {
    scribble(&env.path(leaf), offset, len, None, seed);
}

/// Seconds since the epoch.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Polls `f` every 100 ms until it returns true; panics with `what` (and the pool's status) after
/// `timeout`.
fn wait_for(env: &Env, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            let st = env.run(&["pool", "status", "tank"]);
            panic!(
                "timed out after {timeout:?} waiting until {what}; status:\n{}{}",
                st.stdout, st.stderr
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------------
// Reading the status
// ---------------------------------------------------------------------------------------------------

/// A `status -j` number (they are strings).
fn num(v: &Value) -> u64 {
    match v {
        Value::String(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("{s:?} is not a number: {e}")),
        Value::Number(n) => n.as_u64().expect("an unsigned number"),
        v => panic!("{v} is not a number"),
    }
}

/// `scan_stats` of `status -j tank`.
fn scan(env: &Env) -> Value {
    env.status_json("tank")["scan_stats"].clone()
}

/// A number of `scan_stats`.
fn scan_num(env: &Env, key: &str) -> u64 {
    num(&scan(env)[key])
}

/// (function, state) of `scan_stats`, e.g. ("SCRUB", "FINISHED").
fn scan_fs(env: &Env) -> (String, String) {
    let s = scan(env);
    (
        s["function"].as_str().unwrap_or_default().to_string(),
        s["state"].as_str().unwrap_or_default().to_string(),
    )
}

/// `last_scrub` of `status -j tank`.
fn last_scrub(env: &Env) -> u64 {
    num(&env.status_json("tank")["last_scrub"])
}

/// The text of `pool status [-v] tank`.
fn status(env: &Env, verbose: bool) -> String {
    if verbose {
        env.ok(&["pool", "status", "-v", "tank"])
    } else {
        env.ok(&["pool", "status", "tank"])
    }
}

/// The `scan:` part of `pool status tank` (from `  scan:` up to `config:`).
/// The issued rate of a running scan's text (`... issued (every copy) at 15.9M/s`), in bytes/s.
fn issued_rate(text: &str) -> u64 {
    let r = text
        .split(" issued (every copy) at ")
        .nth(1)
        .and_then(|t| t.split("/s").next())
        .unwrap_or_else(|| panic!("no issued rate in:\n{text}"));
    let (num, mult) = match r.chars().last() {
        Some(c @ ('K' | 'M' | 'G' | 'T')) => (
            &r[..r.len() - 1],
            1u64 << (10 * (1 + "KMGT".find(c).unwrap() as u32)),
        ),
        _ => (r, 1),
    };
    let v: f64 = num
        .parse()
        .unwrap_or_else(|_| panic!("bad rate {r:?}:\n{text}"));
    (v * mult as f64) as u64
}

fn scan_text(env: &Env) -> String {
    let s = status(env, false);
    let start = s
        .find("  scan: ")
        .unwrap_or_else(|| panic!("no scan line in:\n{s}"));
    let end = s[start..].find("config:").map_or(s.len(), |e| start + e);
    s[start..end].to_string()
}

/// The leaves of tank's status, depth first: (name, status object).
fn leaves(env: &Env) -> Vec<(String, Value)> {
    json_leaves(&env.status_json("tank"))
}

/// The names of tank's leaves, depth first.
fn leaf_names(env: &Env) -> Vec<String> {
    leaves(env).into_iter().map(|(n, _)| n).collect()
}

/// The names of the children of tank's top-level vdev `top` (e.g. `mirror-0`).
fn children(env: &Env, top: &str) -> Vec<String> {
    let p = env.status_json("tank");
    let t = &p["vdevs"]["tank"]["vdevs"][top];
    assert!(t.is_object(), "no vdev {top} in:\n{p:#}");
    t["vdevs"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// One leaf's status object.
fn leaf(env: &Env, name: &str) -> Value {
    leaves(env)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no leaf {name} in tank"))
}

/// A leaf's (read, write, checksum) error counts.
fn errors_of(env: &Env, name: &str) -> (u64, u64, u64) {
    let l = leaf(env, name);
    (
        num(&l["read_errors"]),
        num(&l["write_errors"]),
        num(&l["checksum_errors"]),
    )
}

/// Bytes read from the pool's leaves since the pool was opened (`pool iostat -j -p tank`).
fn pool_read_bytes(env: &Env) -> u64 {
    let v = env.json(&["pool", "iostat", "-j", "-p", "tank"]);
    v["vdevs"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "tank"))
        .map(|r| num(&r["read_bytes"]))
        .unwrap_or_else(|| panic!("no tank row in iostat -j:\n{v:#}"))
}

/// `pool list -Hp -o alloc tank`.
fn pool_alloc(env: &Env) -> u64 {
    let s = env.ok(&["pool", "list", "-Hp", "-o", "alloc", "tank"]);
    s.trim()
        .parse()
        .unwrap_or_else(|e| panic!("bad alloc {s:?}: {e}"))
}

/// Waits until the scan is no longer SCANNING; returns its scan_stats.
fn wait_scan_end(env: &Env, timeout: Duration) -> Value {
    let mut last = Value::Null;
    wait_for(env, "the scan has ended", timeout, || {
        last = scan(env);
        last["state"] != "SCANNING"
    });
    last
}

/// Waits until a resilver has finished and no leaf still needs one; returns its scan_stats.
fn wait_resilvered(env: &Env, timeout: Duration) -> Value {
    let mut last = Value::Null;
    wait_for(env, "the resilver has finished", timeout, || {
        last = scan(env);
        last["function"] == "RESILVER"
            && last["state"] == "FINISHED"
            && !status(env, false).contains("(resilver needed)")
    });
    last
}

/// `pool scrub -w tank`, then asserts the finished scrub repaired nothing and found no errors.
fn assert_clean_scrub(env: &Env) {
    env.ok(&["pool", "scrub", "-w", "tank"]);
    let s = scan(env);
    assert_eq!(
        (s["function"].as_str(), s["state"].as_str()),
        (Some("SCRUB"), Some("FINISHED")),
        "{s:#}"
    );
    assert_eq!(
        num(&s["processed"]),
        0,
        "a clean scrub repairs 0 bytes: {s:#}"
    );
    assert_eq!(num(&s["errors"]), 0, "a clean scrub finds no errors: {s:#}");
    let t = scan_text(env);
    assert!(
        t.contains("scrub repaired 0B in ") && t.contains(" with 0 errors on "),
        "{t}"
    );
}

/// Searches the leaves for the volume block at `vol_off` (its bytes in `model`); returns the leaves that
/// hold a copy and the leaf offset (the same on every child of a mirror).
fn find_block(env: &Env, model: &[u8], vol_off: u64) -> (Vec<&'static str>, u64) {
    let want = &model[vol_off as usize..(vol_off + VOL_BLOCK) as usize];
    let mut found: Vec<(&'static str, u64)> = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let data = std::fs::read(env.path(name)).expect("read a leaf");
        let mut off = 0usize;
        while off + want.len() <= data.len() {
            if data[off..off + 64] == want[..64] && data[off..off + want.len()] == *want {
                found.push((name, off as u64));
            }
            off += 512;
        }
    }
    assert!(
        found.len() == 2 && found[0].1 == found[1].1,
        "the block at volume offset {vol_off} should be found once on each child of one mirror, \
         at the same offset; found {found:?}"
    );
    (found.iter().map(|f| f.0).collect(), found[0].1)
}

/// The volume blocks that have a copy on leaf `name`: (leaf offset, volume offset), by leaf offset. Only
/// blocks of pseudo-random data in `model` are found (zero blocks would be ambiguous).
fn volume_blocks_on(env: &Env, name: &str, model: &[u8]) -> Vec<(u64, u64)> {
    let bs = VOL_BLOCK as usize;
    let mut by_head: std::collections::HashMap<&[u8], u64> = std::collections::HashMap::new();
    for (i, b) in model.chunks(bs).enumerate() {
        if b.iter().any(|&x| x != 0) {
            by_head.insert(&b[..32], (i * bs) as u64);
        }
    }
    let data = std::fs::read(env.path(name)).expect("read a leaf");
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + bs <= data.len() {
        if let Some(&v) = by_head.get(&data[off..off + 32]) {
            if data[off..off + bs] == model[v as usize..v as usize + bs] {
                out.push((off as u64, v));
                off += bs;
                continue;
            }
        }
        off += 512;
    }
    out
}

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
// 5. Replace
// ---------------------------------------------------------------------------------------------------

#[test]
fn replace_with_a_new_file_then_the_old_leaf_goes() {
    let (env, mut d, model) = setup_with_data(100 * MIB, 0x50);
    env.sparse("e", 256 * MIB);
    // Slow enough to see both leaves while it resilvers.
    env.ok(&["pool", "set", "scrub_rate_limit=64M", "tank"]);
    env.ok(&["pool", "replace", "tank", "b", &env.p("e")]);
    // Both are there while it resilvers (about 5 s at this rate).
    assert_eq!(children(&env, "mirror-0"), ["a", "b", "e"]);
    assert_eq!(scan_fs(&env), ("RESILVER".into(), "SCANNING".into()));
    wait_resilvered(&env, Duration::from_secs(25));
    wait_for(&env, "b is detached", Duration::from_secs(5), || {
        !leaf_names(&env).contains(&"b".to_string())
    });
    assert_eq!(children(&env, "mirror-0"), ["a", "e"]);
    assert_eq!(leaf(&env, "e")["state"], "ONLINE");
    assert_eq!(env.pool_health("tank"), "ONLINE");
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    assert_clean_scrub(&env);
    // e holds everything.
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    env.ok(&["pool", "online", "tank", "a"]);
    // The old leaf is free again: it can be attached (as a new leaf).
    d.assert_alive();
}

#[test]
fn a_replace_right_after_unflushed_writes_copies_them_too() {
    // The writes are acknowledged but not flushed: they sit in the open txg when the replace starts,
    // and were written to a and b only. The new leaf must get them before b leaves.
    let (env, mut d, mut model) = setup_with_data(8 * MIB, 0x53);
    env.sparse("e", 256 * MIB);
    let data = random_bytes(24 * MIB as usize, 0x54);
    let mut c = env.nbd_connect(VOL).expect("connect to tank/vol");
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        let o = 8 * MIB + i as u64 * MIB;
        c.write(o, chunk)
            .unwrap_or_else(|e| panic!("NBD write at {o}: {e}"));
    }
    model[8 * MIB as usize..32 * MIB as usize].copy_from_slice(&data);
    env.ok(&["pool", "replace", "tank", "b", &env.p("e")]);
    c.disconnect().expect("NBD disconnect");
    wait_resilvered(&env, Duration::from_secs(20));
    wait_for(&env, "b is detached", Duration::from_secs(5), || {
        children(&env, "mirror-0") == ["a", "e"]
    });
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    env.ok(&["pool", "online", "tank", "a"]);
    // a lacks the txgs it was offline for; once it has them, a scrub finds nothing wrong.
    wait_resilvered(&env, Duration::from_secs(20));
    assert_clean_scrub(&env);
    d.assert_alive();
}

#[test]
fn a_replacement_takes_the_place_of_the_leaf_it_replaces() {
    let (env, mut d, model) = setup_with_data(16 * MIB, 0x55);
    env.sparse("e", 256 * MIB);
    env.ok(&["pool", "replace", "tank", "a", &env.p("e")]);
    wait_resilvered(&env, Duration::from_secs(20));
    // In the order status shows them (the JSON's objects are keyed by name).
    let order = |env: &Env| -> Vec<String> {
        let st = status(env, false);
        st.lines()
            .skip_while(|l| l.split_whitespace().next() != Some("mirror-0"))
            .skip(1)
            .take_while(|l| l.starts_with("\t    "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    };
    wait_for(&env, "a is detached", Duration::from_secs(5), || {
        order(&env) == ["e", "b"]
    });
    env.ok(&["pool", "offline", "tank", "b"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

#[test]
fn replace_in_place_after_the_file_was_deleted() {
    let (env, mut d, model) = setup_with_data(100 * MIB, 0x51);
    std::fs::remove_file(env.path("b")).expect("rm b");
    env.sparse("b", 256 * MIB);
    env.ok(&["pool", "replace", "tank", "b"]);
    wait_resilvered(&env, Duration::from_secs(20));
    wait_for(
        &env,
        "the old b is detached",
        Duration::from_secs(5),
        || leaf_names(&env) == ["a", "b", "c", "d"],
    );
    assert_eq!(children(&env, "mirror-0"), ["a", "b"]);
    let b = leaf(&env, "b");
    assert_eq!(b["state"], "ONLINE", "{b:#}");
    assert_eq!(b["path"], env.p("b"), "{b:#}");
    assert_eq!(env.pool_health("tank"), "ONLINE");
    assert!(
        num(&scan(&env)["processed"]) >= 40 * MIB,
        "a new empty leaf gets everything"
    );
    assert_clean_scrub(&env);
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

#[test]
fn a_replace_whose_resilver_is_canceled_keeps_the_old_leaf_until_one_completes() {
    let (env, mut d, model) = setup_with_data(100 * MIB, 0x52);
    env.sparse("e", 256 * MIB);
    env.ok(&["pool", "set", "scrub_rate_limit=16M", "tank"]);
    env.ok(&["pool", "replace", "tank", "b", &env.p("e")]);
    let st = status(&env, false);
    assert!(
        st.lines()
            .any(|l| l.trim_start().starts_with("e ") && l.ends_with("(resilvering)")),
        "the new leaf shows it is being resilvered:\n{st}"
    );
    env.ok(&["pool", "scrub", "-s", "tank"]);
    assert_eq!(scan_fs(&env), ("RESILVER".into(), "CANCELED".into()));
    // The old leaf stays (it is the only complete copy besides a).
    assert_eq!(children(&env, "mirror-0"), ["a", "b", "e"]);
    assert_volume(&env, &model);
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    d.stop();
    let mut d = env.serve();
    wait_resilvered(&env, Duration::from_secs(20));
    wait_for(&env, "b is detached", Duration::from_secs(5), || {
        children(&env, "mirror-0") == ["a", "e"]
    });
    assert_clean_scrub(&env);
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

/// A replace issued while another leaf's attach resilver runs: when that first resilver completes,
/// the old leaf must stay (the other leaf's completion does not make it redundant); it leaves once
/// its own replacement has been resilvered. Detaching it early left the mirror with one complete
/// copy while the replacement still copied.
#[test]
fn a_replaced_leaf_waits_for_its_own_replacement_not_for_another_attach() {
    let (env, mut d, model) = setup_with_data(32 * MIB, 0x56);
    env.sparse("x", 256 * MIB);
    env.sparse("e", 256 * MIB);
    env.ok(&["pool", "set", "scrub_rate_limit=4M", "tank"]);
    env.ok(&["pool", "attach", "tank", "a", &env.p("x")]);
    env.ok(&["pool", "replace", "tank", "b", &env.p("e")]);
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    wait_resilvered(&env, Duration::from_secs(30));
    wait_for(&env, "b is detached", Duration::from_secs(5), || {
        children(&env, "mirror-0") == ["a", "e", "x"]
    });
    let j = env.json(&["pool", "events", "-j", "tank"]);
    let ev: Vec<(String, String, String)> = j["events"]
        .as_array()
        .expect("events array")
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (s("class"), s("vdev"), s("detail"))
        })
        .collect();
    let done: Vec<usize> = (0..ev.len())
        .filter(|&i| ev[i].0 == "resilver_done")
        .collect();
    let b_left = ev
        .iter()
        .position(|e| e.1 == env.p("b") && e.2 == "detached")
        .unwrap_or_else(|| panic!("no detach event for b: {ev:?}"));
    assert!(
        done.len() >= 2 && done.iter().all(|&i| i < b_left),
        "b left before the last resilver (its replacement's) completed: {ev:?}"
    );
    assert_clean_scrub(&env);
    env.ok(&["pool", "offline", "tank", "a"]);
    env.ok(&["pool", "offline", "tank", "x"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

/// The new leaf of a replace goes missing during its resilver: the resilver that then completes has
/// not copied onto it, so it keeps what it lacks (it had been cleared, the old leaf detached at the
/// next small resilver, and the mirror left with one real copy). Back and online, it gets
/// everything, and only then does the old leaf leave.
#[test]
fn a_resilver_target_missing_during_the_resilver_keeps_what_it_lacks() {
    let (env, mut d, model) = setup_with_data(64 * MIB, 0x58);
    env.sparse("g", 256 * MIB);
    env.ok(&["pool", "set", "scrub_rate_limit=2M", "tank"]);
    env.ok(&["pool", "replace", "tank", "b", &env.p("g")]);
    std::thread::sleep(Duration::from_millis(500));
    std::fs::rename(env.path("g"), env.path("g.away")).unwrap();
    wait_for(&env, "g is seen missing", Duration::from_secs(10), || {
        leaf(&env, "g")["state"] != "ONLINE"
    });
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    wait_scan_end(&env, Duration::from_secs(30));
    // Nothing was copied onto g: b stays.
    assert_eq!(children(&env, "mirror-0"), ["a", "b", "g"]);
    std::fs::rename(env.path("g.away"), env.path("g")).unwrap();
    env.ok(&["pool", "online", "tank", "g"]);
    let s = wait_resilvered(&env, Duration::from_secs(30));
    assert!(
        num(&s["processed"]) >= 16 * MIB,
        "g gets all of mirror-0's data: {s:#}"
    );
    wait_for(&env, "b is detached", Duration::from_secs(5), || {
        children(&env, "mirror-0") == ["a", "g"]
    });
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

/// A leaf detached before its resilver finished, attached again: it must get everything it lacked,
/// not only what changed since it left (its departure label claimed it held all up to then).
#[test]
fn a_leaf_detached_mid_resilver_and_attached_again_gets_everything() {
    let (env, mut d, mut model) = setup_with_data(64 * MIB, 0x59);
    env.sparse("g", 256 * MIB);
    env.ok(&["pool", "set", "scrub_rate_limit=1M", "tank"]);
    env.ok(&["pool", "attach", "tank", "a", &env.p("g")]);
    std::thread::sleep(Duration::from_millis(500));
    env.ok(&["pool", "detach", "tank", "g"]);
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    write_random(&env, &mut model, 100 * MIB, MIB, 0x5a);
    env.ok(&["pool", "attach", "tank", "a", &env.p("g")]);
    let s = wait_resilvered(&env, Duration::from_secs(30));
    assert!(
        num(&s["processed"]) >= 16 * MIB,
        "g gets all of mirror-0's data: {s:#}"
    );
    env.ok(&["pool", "offline", "tank", "a"]);
    env.ok(&["pool", "offline", "tank", "b"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

/// While the only other child of a mirror is still being resilvered, the complete one cannot be
/// taken offline (as detach): it would leave the data on no device.
#[test]
fn offline_of_the_only_complete_child_is_refused_while_its_sibling_resilvers() {
    let (env, mut d, model) = setup_with_data(64 * MIB, 0x5b);
    env.ok(&["pool", "offline", "tank", "b"]);
    env.sparse("g", 256 * MIB);
    env.ok(&["pool", "set", "scrub_rate_limit=1M", "tank"]);
    env.ok(&["pool", "attach", "tank", "a", &env.p("g")]);
    let e = env.fail(&["pool", "offline", "tank", "a"]);
    assert!(e.contains("no valid replicas"), "{e}");
    assert_eq!(leaf(&env, "a")["state"], "ONLINE");
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    wait_resilvered(&env, Duration::from_secs(30));
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

/// Detaching the new leaf of a replacement cancels it (as zpool): the old leaf stays, and is no
/// longer marked as being replaced, so a later resilver does not take it away.
#[test]
fn detaching_a_replacement_cancels_the_replace() {
    let (env, mut d, model) = setup_with_data(16 * MIB, 0x57);
    env.sparse("e", 256 * MIB);
    env.sparse("f", 256 * MIB);
    env.ok(&["pool", "set", "scrub_rate_limit=1M", "tank"]);
    env.ok(&["pool", "replace", "tank", "b", &env.p("e")]);
    env.ok(&["pool", "detach", "tank", "e"]);
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    assert_eq!(children(&env, "mirror-0"), ["a", "b"]);
    env.ok(&["pool", "attach", "tank", "a", &env.p("f")]);
    wait_resilvered(&env, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(children(&env, "mirror-0"), ["a", "b", "f"]);
    env.ok(&["pool", "offline", "tank", "a"]);
    env.ok(&["pool", "offline", "tank", "f"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 6. Attach, detach, attach again
// ---------------------------------------------------------------------------------------------------

#[test]
fn attach_detach_and_attach_again_copies_only_the_changes() {
    let (env, mut d, mut model) = setup_with_data(100 * MIB, 0x60);
    env.sparse("e", 256 * MIB);
    env.ok(&["pool", "attach", "tank", "a", &env.p("e")]);
    assert_eq!(children(&env, "mirror-0"), ["a", "b", "e"]);
    let first = num(&wait_resilvered(&env, Duration::from_secs(20))["processed"]);
    assert!(
        first >= 40 * MIB,
        "a new leaf gets all of mirror-0's data (~50M), got {first}"
    );
    env.ok(&["pool", "detach", "tank", "e"]);
    assert_eq!(children(&env, "mirror-0"), ["a", "b"]);
    assert!(!leaf_names(&env).contains(&"e".to_string()));

    write_random(&env, &mut model, 8 * MIB, 2 * MIB, 0x61);
    env.ok(&["pool", "attach", "tank", "a", &env.p("e")]);
    assert_eq!(children(&env, "mirror-0"), ["a", "b", "e"]);
    let s = wait_resilvered(&env, Duration::from_secs(20));
    let second = num(&s["processed"]);
    assert!(
        second > 0 && second * 10 <= first,
        "attached again, e should get only what changed since it left: first resilver {first}, \
         second {second}"
    );
    assert_clean_scrub(&env);
    // e holds everything, the new data too.
    env.ok(&["pool", "offline", "tank", "a"]);
    env.ok(&["pool", "offline", "tank", "b"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

#[test]
fn a_leaf_detached_from_one_mirror_and_attached_to_another_gets_everything() {
    let (env, mut d, model) = setup_with_data(100 * MIB, 0x62);
    env.sparse("e", 256 * MIB);
    env.ok(&["pool", "attach", "tank", "a", &env.p("e")]);
    wait_resilvered(&env, Duration::from_secs(20));
    env.ok(&["pool", "detach", "tank", "e"]);
    // Its label says it left mirror-0: for mirror-1 it holds nothing.
    env.ok(&["pool", "attach", "tank", "c", &env.p("e")]);
    assert_eq!(children(&env, "mirror-1"), ["c", "d", "e"]);
    let s = wait_resilvered(&env, Duration::from_secs(20));
    assert!(
        num(&s["processed"]) >= 40 * MIB,
        "e joins another mirror: it needs all of its data (~50M): {s:#}"
    );
    assert_clean_scrub(&env);
    env.ok(&["pool", "offline", "tank", "c"]);
    env.ok(&["pool", "offline", "tank", "d"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 7. Pause and cancel a resilver
// ---------------------------------------------------------------------------------------------------

#[test]
fn a_resilver_can_be_paused_resumed_and_canceled() {
    let (env, mut d, mut model) = setup_with_data(100 * MIB, 0x70);
    // 16 MiB batches of two copies at 12 MiB/s: a batch every 2.7 s.
    env.ok(&["pool", "set", "scrub_rate_limit=12M", "tank"]);
    env.ok(&["pool", "offline", "tank", "b"]);
    write_random(&env, &mut model, 0, 64 * MIB, 0x71);
    env.ok(&["pool", "online", "tank", "b"]);
    wait_for(
        &env,
        "the resilver has begun",
        Duration::from_secs(10),
        || {
            let s = scan(&env);
            s["function"] == "RESILVER" && num(&s["examined"]) > 0
        },
    );
    assert_eq!(scan_fs(&env).1, "SCANNING", "{:#}", scan(&env));
    let t = scan_text(&env);
    assert!(t.contains("resilver in progress since "), "{t}");

    env.ok(&["pool", "scrub", "-p", "tank"]);
    assert_eq!(scan_fs(&env), ("RESILVER".into(), "PAUSED".into()));
    let t = scan_text(&env);
    assert!(
        t.contains("resilver paused since ") && t.contains("resilver started on "),
        "{t}"
    );
    let examined = scan_num(&env, "examined");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(scan_num(&env, "examined"), examined, "paused means paused");

    env.ok(&["pool", "scrub", "tank"]);
    assert_eq!(
        scan_fs(&env),
        ("RESILVER".into(), "SCANNING".into()),
        "`scrub` resumes the paused resilver (it does not start a scrub)"
    );
    assert!(scan_num(&env, "examined") >= examined);

    env.ok(&["pool", "scrub", "-s", "tank"]);
    assert_eq!(scan_fs(&env), ("RESILVER".into(), "CANCELED".into()));
    let t = scan_text(&env);
    assert!(t.starts_with("  scan: resilver canceled on "), "{t}");
    assert!(
        status(&env, false).contains("(resilver needed)"),
        "b still lacks data"
    );

    // Reads avoid b's stale copies (no checksum errors on b).
    assert_volume(&env, &model);
    assert_eq!(
        errors_of(&env, "b"),
        (0, 0, 0),
        "reads went to b's stale copies"
    );

    // A new daemon resilvers b again, to the end.
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    d.stop();
    let mut d = env.serve();
    let s = wait_resilvered(&env, Duration::from_secs(20));
    assert_eq!(num(&s["errors"]), 0, "{s:#}");
    assert_clean_scrub(&env);
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

#[test]
fn a_resilver_requested_during_a_scrub_runs_after_it_without_checksum_errors() {
    let (env, mut d, mut model) = setup_with_data(100 * MIB, 0x72);
    env.ok(&["pool", "set", "scrub_rate_limit=16M", "tank"]);
    env.ok(&["pool", "scrub", "tank"]);
    wait_for(
        &env,
        "the scrub has examined data",
        Duration::from_secs(10),
        || scan_num(&env, "examined") > 0,
    );
    // b misses 32 MiB of writes, partly behind the scrub's position and partly ahead of it.
    env.ok(&["pool", "offline", "tank", "b"]);
    write_random(&env, &mut model, 0, 32 * MIB, 0x73);
    env.ok(&["pool", "online", "tank", "b"]);
    assert_eq!(
        scan_fs(&env),
        ("SCRUB".into(), "SCANNING".into()),
        "the resilver waits for the scrub"
    );
    assert!(status(&env, false).contains("(resilver needed)"));
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    wait_resilvered(&env, Duration::from_secs(20));
    // b was only offline: what it missed is not a checksum error.
    assert_eq!(
        errors_of(&env, "b"),
        (0, 0, 0),
        "b's stale copies were counted as errors:\n{}",
        status(&env, false)
    );
    assert!(!status(&env, false).contains("unrecoverable error"));
    assert_clean_scrub(&env);
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

#[test]
fn scrub_rate_limit_caps_the_scrub_bandwidth() {
    let (env, mut d, _model) = setup_with_data(100 * MIB, 0x74);
    let t0 = Instant::now();
    env.ok(&["pool", "scrub", "-w", "tank"]);
    let free = t0.elapsed();
    let issued = scan_num(&env, "issued");
    assert!(issued >= 200 * MIB, "two copies of 100M: issued {issued}");
    env.ok(&["pool", "set", "scrub_rate_limit=32M", "tank"]);
    assert_eq!(
        env.ok(&[
            "pool",
            "get",
            "-Hp",
            "-o",
            "value",
            "scrub_rate_limit",
            "tank"
        ])
        .trim(),
        (32 * MIB).to_string()
    );
    let t0 = Instant::now();
    env.ok(&["pool", "scrub", "-w", "tank"]);
    let limited = t0.elapsed();
    // ~200 MiB at 32 MiB/s, less the first 16 MiB batch (two copies) that goes at once: over 5 s.
    assert!(
        limited >= Duration::from_secs(4) && limited > free * 2,
        "a scrub of {issued} bytes at 32M/s took {limited:?} (unlimited: {free:?})"
    );
    assert_eq!(scan_fs(&env), ("SCRUB".into(), "FINISHED".into()));
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
