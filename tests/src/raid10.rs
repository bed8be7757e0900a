//! The RAID1+0 fixture of the scrub and resilver tests: the pool `tank` (`mirror a b mirror c d` of
//! sparse 256 MiB leaves) with one 128 MiB volume `tank/vol`, a daemon serving it, an in-memory model
//! of the volume's contents, and readers of the pool's status and scan statistics.
//!
//! Data goes in through NBD (`qemu-img convert` at offset 0, the harness's client elsewhere) and is
//! checked by reading the whole volume back and comparing it with the model. Leaves are damaged by
//! overwriting their files with seeded pseudo-random bytes, as `dd conv=notrunc` would.

use crate::{json_leaves, random_bytes, scribble, Daemon, Env, NbdError, MIB};
use serde_json::Value;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
/// The volume every test uses.
pub const VOL: &str = "tank/vol";
/// Its size.
pub const VOL_SIZE: u64 = 128 * MIB;
/// Its block size (the default volblocksize).
pub const VOL_BLOCK: u64 = 16 * 1024;

// ---------------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------------

/// Creates the pool `tank` (`mirror a b mirror c d` of sparse 256 MiB files) and the 128 MiB volume.
pub fn raid10(env: &Env) {
    let l = env.leaves(&["a", "b", "c", "d"]);
    env.ok(&[
        "pool", "create", "--size", "256M", "tank", "mirror", &l[0], &l[1], "mirror", &l[2], &l[3],
    ]);
    env.ok(&["dataset", "create", "-V", "128M", VOL]);
}

/// The RAID1+0 pool with its volume and a daemon serving it; the model of the volume (zeros).
pub fn setup() -> (Env, Daemon, Vec<u8>) {
    let env = Env::new();
    raid10(&env);
    let d = env.serve();
    (env, d, vec![0; VOL_SIZE as usize])
}

/// [`setup`], then `len` pseudo-random bytes (seed `seed`) written at offset 0 of the volume.
pub fn setup_with_data(len: u64, seed: u64) -> (Env, Daemon, Vec<u8>) {
    let (env, d, mut model) = setup();
    write_random(&env, &mut model, 0, len, seed);
    (env, d, model)
}

/// Writes `len` pseudo-random bytes at `offset` of the volume, then FLUSHes them. At offset 0 a file of
/// them is copied in with `qemu-img convert -n` through the daemon's NBD socket; elsewhere (qemu-img
/// always writes from 0) they are written in 1 MiB requests by the harness's NBD client. The model
/// records the write.
pub fn write_random(env: &Env, model: &mut [u8], offset: u64, len: u64, seed: u64) {
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
pub fn flush(env: &Env) {
    let mut c = env.nbd_connect(VOL).expect("connect to tank/vol");
    c.flush().expect("NBD flush");
    c.disconnect().expect("NBD disconnect");
}

/// Reads the whole volume through NBD and asserts that it equals `model`, naming the first difference.
pub fn assert_volume(env: &Env, model: &[u8]) {
    assert_volume_except(env, model, None);
}

/// [`assert_volume`], except that the volume block at `bad` (if any) must fail with EIO.
pub fn assert_volume_except(env: &Env, model: &[u8], bad: Option<u64>) {
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
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
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
pub fn corrupt(env: &Env, leaf: &str, offset: u64, len: u64, seed: u64) {
    scribble(&env.path(leaf), offset, len, None, seed);
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Polls `f` every 100 ms until it returns true; panics with `what` (and the pool's status) after
/// `timeout`.
pub fn wait_for(env: &Env, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
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
pub fn num(v: &Value) -> u64 {
    match v {
        Value::String(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("{s:?} is not a number: {e}")),
        Value::Number(n) => n.as_u64().expect("an unsigned number"),
        v => panic!("{v} is not a number"),
    }
}

/// `scan_stats` of `status -j tank`.
pub fn scan(env: &Env) -> Value {
    env.status_json("tank")["scan_stats"].clone()
}

/// A number of `scan_stats`.
pub fn scan_num(env: &Env, key: &str) -> u64 {
    num(&scan(env)[key])
}

/// (function, state) of `scan_stats`, e.g. ("SCRUB", "FINISHED").
pub fn scan_fs(env: &Env) -> (String, String) {
    let s = scan(env);
    (
        s["function"].as_str().unwrap_or_default().to_string(),
        s["state"].as_str().unwrap_or_default().to_string(),
    )
}

/// `last_scrub` of `status -j tank`.
pub fn last_scrub(env: &Env) -> u64 {
    num(&env.status_json("tank")["last_scrub"])
}

/// The text of `pool status [-v] tank`.
pub fn status(env: &Env, verbose: bool) -> String {
    if verbose {
        env.ok(&["pool", "status", "-v", "tank"])
    } else {
        env.ok(&["pool", "status", "tank"])
    }
}

/// The issued rate of a running scan's text (`... issued (every copy) at 15.9M/s`), in bytes/s.
pub fn issued_rate(text: &str) -> u64 {
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

/// The `scan:` part of `pool status tank` (from `  scan:` up to `config:`).
pub fn scan_text(env: &Env) -> String {
    let s = status(env, false);
    let start = s
        .find("  scan: ")
        .unwrap_or_else(|| panic!("no scan line in:\n{s}"));
    let end = s[start..].find("config:").map_or(s.len(), |e| start + e);
    s[start..end].to_string()
}

/// The leaves of tank's status, depth first: (name, status object).
pub fn leaves(env: &Env) -> Vec<(String, Value)> {
    json_leaves(&env.status_json("tank"))
}

/// The names of tank's leaves, depth first.
pub fn leaf_names(env: &Env) -> Vec<String> {
    leaves(env).into_iter().map(|(n, _)| n).collect()
}

/// The names of the children of tank's top-level vdev `top` (e.g. `mirror-0`).
pub fn children(env: &Env, top: &str) -> Vec<String> {
    let p = env.status_json("tank");
    let t = &p["vdevs"]["tank"]["vdevs"][top];
    assert!(t.is_object(), "no vdev {top} in:\n{p:#}");
    t["vdevs"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// One leaf's status object.
pub fn leaf(env: &Env, name: &str) -> Value {
    leaves(env)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no leaf {name} in tank"))
}

/// A leaf's (read, write, checksum) error counts.
pub fn errors_of(env: &Env, name: &str) -> (u64, u64, u64) {
    let l = leaf(env, name);
    (
        num(&l["read_errors"]),
        num(&l["write_errors"]),
        num(&l["checksum_errors"]),
    )
}

/// Bytes read from the pool's leaves since the pool was opened (`pool iostat -j -p tank`).
pub fn pool_read_bytes(env: &Env) -> u64 {
    let v = env.json(&["pool", "iostat", "-j", "-p", "tank"]);
    v["vdevs"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "tank"))
        .map(|r| num(&r["read_bytes"]))
        .unwrap_or_else(|| panic!("no tank row in iostat -j:\n{v:#}"))
}

/// `pool list -Hp -o alloc tank`.
pub fn pool_alloc(env: &Env) -> u64 {
    let s = env.ok(&["pool", "list", "-Hp", "-o", "alloc", "tank"]);
    s.trim()
        .parse()
        .unwrap_or_else(|e| panic!("bad alloc {s:?}: {e}"))
}

/// Waits until the scan is no longer SCANNING; returns its scan_stats.
pub fn wait_scan_end(env: &Env, timeout: Duration) -> Value {
    let mut last = Value::Null;
    wait_for(env, "the scan has ended", timeout, || {
        last = scan(env);
        last["state"] != "SCANNING"
    });
    last
}

/// Waits until a resilver has finished and no leaf still needs one; returns its scan_stats.
pub fn wait_resilvered(env: &Env, timeout: Duration) -> Value {
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
pub fn assert_clean_scrub(env: &Env) {
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
pub fn find_block(env: &Env, model: &[u8], vol_off: u64) -> (Vec<&'static str>, u64) {
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
pub fn volume_blocks_on(env: &Env, name: &str, model: &[u8]) -> Vec<(u64, u64)> {
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
