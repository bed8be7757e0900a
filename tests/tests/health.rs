//! End-to-end tests of device health: self-healing reads, error counters, faulted, removed, slow and
//! offline leaves, data errors, events and iostat, driven through the daemon and real NBD clients.
//!
//! Unless a test says otherwise the pool is `tank`, a RAID1+0 of four sparse 256 MiB leaves
//! (`mirror a b mirror c d`), with one volume `tank/vol` that is filled with pseudo-random data by
//! `qemu-img convert` and flushed. Reads of the whole volume go through `nbdcopy --connections=1
//! --requests=1` (one request at a time, in order) to a file that is compared with what was written.
//!
//! The clients come from the Debian packages qemu-utils and libnbd-bin; a test whose client is missing
//! fails and says which package to install.

use cairn_tests::{json_leaves, random_bytes, scribble, Daemon, Env, Out, MIB};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where a leaf's data area starts (after the two front labels).
const DATA_START: u64 = 4 * MIB;

/// The volume block size (the default).
const BLOCK: u64 = 16 * 1024;

// ---------------------------------------------------------------------------------------------------
// Setup and helpers
// ---------------------------------------------------------------------------------------------------

/// The RAID1+0 pool `tank` with a volume `tank/vol` of `mib` MiB, a daemon serving it, and the volume
/// filled with pseudo-random data (qemu-img convert, then an NBD flush). Returns what the volume holds.
fn setup(mib: u64, seed: u64) -> (Env, Daemon, Vec<u8>) {
    let env = Env::new();
    let l = env.leaves(&["a", "b", "c", "d"]);
    env.ok(&[
        "pool", "create", "--size", "256M", "tank", "mirror", &l[0], &l[1], "mirror", &l[2], &l[3],
    ]);
    env.ok(&["dataset", "create", "-V", &format!("{mib}M"), "tank/vol"]);
    let d = env.serve();
    let data = random_bytes((mib * MIB) as usize, seed);
    std::fs::write(env.path("in.raw"), &data).expect("write the input image");
    let uri = vol(&env);
    env.tool_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            &env.p("in.raw"),
            &uri,
        ],
    );
    qio_ok(&env, &["flush"]);
    (env, d, data)
}

/// The NBD URI of `tank/vol`.
fn vol(env: &Env) -> String {
    env.nbd_uri("tank/vol")
}

/// `qemu-io -f raw -c CMD... tank/vol`.
fn qemu_io(env: &Env, cmds: &[&str]) -> Out {
    env.qemu_io(&[], &vol(env), cmds)
}

/// qemu-io commands on `tank/vol` that must all succeed (and every `read -P` verify).
fn qio_ok(env: &Env, cmds: &[&str]) -> String {
    env.qemu_io_ok(&[], &vol(env), cmds)
}

/// Reads the whole of `tank/vol` with `nbdcopy --connections=1 --requests=1` into a file and returns it.
fn read_all(env: &Env) -> Vec<u8> {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!("out-{}.raw", N.fetch_add(1, Ordering::Relaxed));
    let out = env.p(&name);
    env.tool_ok(
        "nbdcopy",
        &["--connections=1", "--requests=1", &vol(env), &out],
    );
    let got = std::fs::read(&out).expect("read nbdcopy's output");
    let _ = std::fs::remove_file(&out);
    got
}

/// Asserts that two images are equal, naming the first differing offset.
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at offset {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// Reads the whole volume and checks every byte against `want`.
fn assert_reads_back(env: &Env, want: &[u8], what: &str) {
    let got = read_all(env);
    assert_same(what, &got, want);
}

/// A counter of a vdev object of `status -j` (the JSON gives them as strings).
fn num(v: &Value, key: &str) -> u64 {
    let s = v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} should be a string in {v}"));
    s.parse()
        .unwrap_or_else(|e| panic!("{key} = {s:?} is not a number: {e}"))
}

/// The counters of one leaf: (read, write, checksum errors, repaired bytes).
type Counters = (u64, u64, u64, u64);

/// `pool status -j tank`: every leaf's counters by name.
fn counters(env: &Env) -> BTreeMap<String, Counters> {
    let j = env.status_json("tank");
    let leaves = json_leaves(&j);
    assert_eq!(leaves.len(), 4, "tank has four leaves: {j}");
    leaves
        .into_iter()
        .map(|(n, v)| {
            let c = (
                num(&v, "read_errors"),
                num(&v, "write_errors"),
                num(&v, "checksum_errors"),
                num(&v, "repaired_bytes"),
            );
            (n, c)
        })
        .collect()
}

/// The vdev object named `name` (pool, mirror-N or leaf) in a `status -j` pool object.
fn vdev(pool: &Value, name: &str) -> Value {
    fn walk(v: &Value, name: &str) -> Option<Value> {
        if v["name"] == name {
            return Some(v.clone());
        }
        v["vdevs"]
            .as_object()
            .and_then(|c| c.values().find_map(|x| walk(x, name)))
    }
    pool["vdevs"]
        .as_object()
        .and_then(|r| r.values().find_map(|x| walk(x, name)))
        .unwrap_or_else(|| panic!("no vdev {name} in {pool}"))
}

/// The state of a vdev as `status -j` shows it.
fn state(env: &Env, name: &str) -> String {
    let j = env.status_json("tank");
    vdev(&j, name)["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The row of the `pool status` table for vdev `name`: its whitespace-separated fields
/// (NAME STATE READ WRITE CKSUM [reason...]).
fn row(status: &str, name: &str) -> Vec<String> {
    status
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|f| f.first().is_some_and(|n| n == name))
        .unwrap_or_else(|| panic!("no row for {name} in:\n{status}"))
}

/// `pool iostat -v -j tank`: the reads of every vdev by name.
fn iostat_reads(env: &Env) -> BTreeMap<String, u64> {
    let j = env.json(&["pool", "iostat", "-v", "-j", "tank"]);
    let rows = j["vdevs"]
        .as_array()
        .unwrap_or_else(|| panic!("iostat -j has no vdevs array: {j}"));
    rows.iter()
        .map(|r| {
            let n = r["name"].as_str().expect("iostat name").to_string();
            let reads = r["reads"]
                .as_u64()
                .unwrap_or_else(|| panic!("iostat reads of {n}: {r}"));
            (n, reads)
        })
        .collect()
}

/// `pool events -j tank`: (class, vdev, offset, detail) of every event.
fn events(env: &Env) -> Vec<(String, String, Option<u64>, String)> {
    let j = env.json(&["pool", "events", "-j", "tank"]);
    j["events"]
        .as_array()
        .unwrap_or_else(|| panic!("events -j has no events array: {j}"))
        .iter()
        .map(|e| {
            (
                e["class"].as_str().unwrap_or_default().to_string(),
                e["vdev"].as_str().unwrap_or_default().to_string(),
                e["offset"].as_u64(),
                e["detail"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// 1. Silent corruption of one leaf is healed
// ---------------------------------------------------------------------------------------------------

/// Overwrites a tenth of leaf a's data area (25 MiB from 4 MiB) with garbage, as `dd` would.
fn garble_a(env: &Env) {
    scribble(&env.path("a"), DATA_START, 25 * MIB, None, 0xbad5eed);
}

#[test]
fn corruption_of_one_leaf_is_healed_and_counted_on_it_only() {
    let (env, mut d, data) = setup(64, 1);
    garble_a(&env);

    assert_reads_back(&env, &data, "first read after garbling leaf a");
    let c1 = counters(&env);
    let (ra, wa, ka, repaired) = c1["a"];
    assert!(
        ka > 0,
        "leaf a should count checksum errors: {c1:?}\n{}",
        env.ok(&["pool", "status", "tank"])
    );
    assert!(repaired > 0, "leaf a should have repaired bytes: {c1:?}");
    assert_eq!((ra, wa), (0, 0), "no read or write errors on a: {c1:?}");
    for l in ["b", "c", "d"] {
        assert_eq!(c1[l], (0, 0, 0, 0), "leaf {l} saw no error: {c1:?}");
    }

    // The human table shows the same counters.
    let st = env.ok(&["pool", "status", "tank"]);
    let ra = row(&st, "a");
    assert!(
        ra[1..4] == ["ONLINE", "0", "0"] && shows(&ra[4], ka),
        "a's row should show {ka} checksum errors:\n{st}"
    );
    for l in ["b", "c", "d"] {
        assert_eq!(row(&st, l)[1..5], ["ONLINE", "0", "0", "0"], "{st}");
    }
    assert!(st.contains("state: ONLINE"), "{st}");
    assert!(st.contains("errors: No known data errors"), "{st}");
    assert_eq!(env.status_json("tank")["error_count"], "0");

    // A second read is right too, and still finds nothing wrong outside a.
    assert_reads_back(&env, &data, "second read after garbling leaf a");
    let c2 = counters(&env);
    assert!(c2["a"].2 >= ka && c2["a"].3 >= repaired, "{c1:?} -> {c2:?}");
    for l in ["b", "c", "d"] {
        assert_eq!(c2[l], (0, 0, 0, 0), "leaf {l} saw no error: {c2:?}");
    }

    // On disk, every copy that a repair event names now equals its mirror twin on b (the children of a
    // mirror hold a block at the same offset). Stop the daemon first so that every write has landed.
    d.stop();
    let repairs: Vec<_> = events(&env)
        .into_iter()
        .filter(|e| e.0 == "repair" && e.1 == env.p("a"))
        .collect();
    assert!(!repairs.is_empty(), "repair events expected on a");
    let (fa, fb) = (
        std::fs::read(env.path("a")).unwrap(),
        std::fs::read(env.path("b")).unwrap(),
    );
    for e in &repairs {
        let off = e.2.expect("a repair event has an offset") as usize;
        let len =
            e.3.split_whitespace()
                .next()
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(BLOCK as usize);
        assert!(
            fa[off..off + len] == fb[off..off + len],
            "the copy on a at {off} (+{len}) was reported repaired but differs from b's: {e:?}"
        );
    }
}

/// The same scenario: the copies found bad were rewritten, so no block is ever found bad twice,
/// however often the same data is read again on a busy host. (Which child serves a read may change
/// with load, so a later read can find copies on a that the first read never looked at; those are new
/// finds, healed in turn. What must not happen is a healed copy failing again.)
#[test]
fn a_repaired_copy_is_never_found_bad_again_on_a_busy_host() {
    let (env, mut d, data) = setup(64, 1);
    garble_a(&env);
    // A busy host: the reads compete with other work for the CPUs.
    let _load = CpuLoad::start(8);
    let a = env.p("a");
    let mut seen = std::collections::BTreeSet::new();
    let mut last = 0;
    for i in 1..=4 {
        assert_reads_back(&env, &data, &format!("read {i} after garbling leaf a"));
        let ev = events(&env);
        let fresh = &ev[last..];
        last = ev.len();
        let cks: Vec<_> = fresh.iter().filter(|e| e.0 == "checksum").collect();
        if i == 1 {
            assert!(
                !cks.is_empty(),
                "leaf a should count checksum errors: {ev:?}"
            );
        }
        for e in &cks {
            assert_eq!(e.1, a, "only leaf a has bad copies: {e:?}");
            let off = e.2.expect("a checksum event has an offset");
            assert!(
                seen.insert(off),
                "read {i} found the copy at {off} bad again after it was repaired: {e:?}"
            );
            assert!(
                ev.iter()
                    .any(|r| r.0 == "repair" && r.1 == a && r.2 == Some(off)),
                "read {i}: the bad copy at {off} was repaired: {ev:?}"
            );
        }
    }
    let c = counters(&env);
    assert_eq!(
        c["a"].2,
        seen.len() as u64,
        "a's checksum errors count every bad copy found, once: {c:?}"
    );
    for l in ["b", "c", "d"] {
        assert_eq!(c[l], (0, 0, 0, 0), "leaf {l} saw no error: {c:?}");
    }
    d.assert_alive();
}

/// Threads that keep the CPUs busy until dropped.
struct CpuLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuLoad {
    fn start(n: usize) -> CpuLoad {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 1u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x = std::hint::black_box(
                                x.wrapping_mul(6364136223846793005).wrapping_add(1),
                            );
                        }
                    }
                })
            })
            .collect();
        CpuLoad { stop, threads }
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Whether a READ/WRITE/CKSUM cell of `pool status` shows the counter `v` (exactly below 1000, where
/// zpool starts to abbreviate).
fn shows(cell: &str, v: u64) -> bool {
    if v < 1000 {
        cell == v.to_string()
    } else {
        cell != "0" && !cell.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------------
// 2. A leaf that fails every read is faulted, and clear brings it back
// ---------------------------------------------------------------------------------------------------

#[test]
fn a_leaf_failing_every_read_is_faulted_and_clear_brings_it_back() {
    let (env, mut d, data) = setup(32, 2);
    let id = env.ok(&["inject", "-d", "b", "-e", "io", "-T", "read", "tank"]);
    assert!(
        id.trim().parse::<u64>().is_ok(),
        "inject should print the fault id, got {id:?}"
    );

    assert_reads_back(&env, &data, "read with every read of b failing");
    let c = counters(&env);
    assert!(
        c["b"].0 >= 10,
        "b should count its read errors (10 within 60 s fault it): {c:?}"
    );
    assert_eq!(c["b"].2, 0, "EIO is not a checksum error: {c:?}");
    for l in ["a", "c", "d"] {
        assert_eq!(c[l].0 + c[l].1 + c[l].2, 0, "leaf {l} saw no error: {c:?}");
    }
    let st = env.ok(&["pool", "status", "tank"]);
    let b = row(&st, "b");
    assert_eq!(
        b[1], "FAULTED",
        "b should be FAULTED after its errors:\n{st}"
    );
    assert!(
        shows(&b[2], c["b"].0),
        "b's READ should be {}:\n{st}",
        c["b"].0
    );
    assert!(
        b[5..].join(" ").contains("too many errors"),
        "b's row should say why:\n{st}"
    );
    assert_eq!(row(&st, "mirror-0")[1], "DEGRADED", "{st}");
    assert_eq!(row(&st, "mirror-1")[1], "ONLINE", "{st}");
    assert_eq!(row(&st, "a")[1], "ONLINE", "{st}");
    assert!(st.contains("state: DEGRADED"), "{st}");
    assert!(st.contains("errors: No known data errors"), "{st}");
    assert_eq!(env.pool_health("tank"), "DEGRADED");

    // A faulted leaf is not read from any more: the data still reads back right.
    assert_reads_back(&env, &data, "read with b faulted");

    // The fault is kept across a restart (until clear), as zpool keeps it.
    d.stop();
    let mut d = env.serve();
    assert_eq!(state(&env, "b"), "FAULTED");
    assert_eq!(env.pool_health("tank"), "DEGRADED");

    env.ok(&["inject", "-c", "all", "tank"]);
    let l = env.ok(&["inject", "-l", "tank"]);
    assert!(
        !l.contains("io"),
        "inject -c all should leave no fault:\n{l}"
    );
    env.ok(&["pool", "clear", "tank"]);
    let st = env.ok(&["pool", "status", "tank"]);
    for v in ["tank", "mirror-0", "mirror-1", "a", "b", "c", "d"] {
        assert_eq!(
            row(&st, v)[1..5],
            ["ONLINE", "0", "0", "0"],
            "after clear every vdev is ONLINE with zero counters:\n{st}"
        );
    }
    assert!(!st.contains("too many errors"), "{st}");
    assert_eq!(env.pool_health("tank"), "ONLINE");

    // b is in use again.
    let before = iostat_reads(&env);
    assert_reads_back(&env, &data, "read after clear");
    let after = iostat_reads(&env);
    assert!(
        after["b"] > before["b"],
        "b should serve reads again after clear: before {before:?}, after {after:?}"
    );
    assert_eq!(counters(&env)["b"], (0, 0, 0, 0));
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 3. A leaf whose file is deleted under the daemon
// ---------------------------------------------------------------------------------------------------

#[test]
fn a_deleted_leaf_file_shows_removed_and_stays_missing_after_a_restart() {
    let (env, mut d, mut data) = setup(16, 3);
    std::fs::remove_file(env.path("c")).expect("delete leaf c");

    assert_reads_back(&env, &data, "read after deleting leaf c");
    qio_ok(&env, &["write -P 0x5a 6M 1M", "flush"]);
    data[6 * MIB as usize..7 * MIB as usize].fill(0x5a);

    let st = env.ok(&["pool", "status", "tank"]);
    let c = row(&st, "c");
    assert!(
        c[1] == "REMOVED" || c[1] == "UNAVAIL",
        "after a flush the deleted leaf c should be REMOVED or UNAVAIL:\n{st}"
    );
    assert!(c.len() > 5, "c's row should give a reason:\n{st}");
    let j = env.status_json("tank");
    assert!(
        vdev(&j, "c")["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "status -j should give c a reason: {}",
        vdev(&j, "c")
    );
    assert_eq!(row(&st, "mirror-1")[1], "DEGRADED", "{st}");
    assert_eq!(row(&st, "mirror-0")[1], "ONLINE", "{st}");
    assert_eq!(row(&st, "d")[1], "ONLINE", "{st}");
    assert!(st.contains("state: DEGRADED"), "{st}");

    // Writes go on, and everything reads back right.
    assert_reads_back(&env, &data, "read after the write with c gone");

    d.stop();
    let mut d = env.serve();
    let st = env.ok(&["pool", "status", "tank"]);
    let c = row(&st, "c");
    assert!(
        c[1] == "REMOVED" || c[1] == "UNAVAIL",
        "after a restart c is still missing:\n{st}"
    );
    assert!(c.len() > 5, "c's row should give a reason:\n{st}");
    assert_eq!(row(&st, "mirror-1")[1], "DEGRADED", "{st}");
    assert!(st.contains("state: DEGRADED"), "{st}");
    assert_reads_back(&env, &data, "read after the restart with c gone");
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 4. A slow leaf gets fewer reads
// ---------------------------------------------------------------------------------------------------

/// Read selection passes over a mirror child that is clearly (4x) slower than the fastest, comparing
/// latencies floored at 4 ms. The injected delay is 1 s, so c stays the slow child unless d's reads
/// average over 250 ms, which no busy machine comes near (with 20 ms, d's reads on a loaded 2-core
/// machine came within 4x and c got a quarter of the reads). c gets the first read of its regions (it
/// has no latency sample yet), then only a probe read after 2 s without one: a read or two, against
/// d's sixty or so, however loaded the machine is. No timing figure is checked.
#[test]
fn a_slow_leaf_gets_clearly_fewer_reads() {
    let (env, mut d, data) = setup(32, 4);
    env.ok(&[
        "inject", "-d", "c", "-e", "latency", "--delay", "1000", "-T", "read", "tank",
    ]);
    let before = iostat_reads(&env);
    assert_reads_back(&env, &data, "read with leaf c slow");
    let after = iostat_reads(&env);
    let delta = |n: &str| after[n] - before[n];
    let (c, dd) = (delta("c"), delta("d"));
    // Contiguous blocks are read with one request each, so count requests, not blocks.
    assert!(
        dd >= 20,
        "d should serve most reads of mirror-1 (c {c}, d {dd}); iostat before {before:?}, after {after:?}"
    );
    assert!(
        c * 4 < dd,
        "the slow leaf c should get clearly fewer reads than d: c {c}, d {dd}"
    );
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 5. A block bad on every copy: an I/O error for that block only, listed by status -v
// ---------------------------------------------------------------------------------------------------

#[test]
fn a_block_bad_on_both_copies_fails_alone_and_is_listed_until_rewritten() {
    let (env, mut d, data) = setup(8, 5);
    let x = MIB;
    let xs = x.to_string();

    // Where are the copies of the block at X? inject -t lists them; the faults themselves are cleared
    // before any read, and the copies are damaged on disk instead.
    let ids = env.ok(&[
        "inject", "-t", "tank/vol", "--offset", &xs, "-e", "checksum", "tank",
    ]);
    assert_eq!(
        ids.lines().count(),
        2,
        "a block of a mirror has two copies: {ids:?}"
    );
    let list = env.ok(&["inject", "-l", "tank"]);
    let mut copies = Vec::new();
    for l in list.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(f.len(), 7, "bad inject -l line {l:?}:\n{list}");
        let (o, n) = f[6].split_once(':').expect("RANGE is OFFSET:LENGTH");
        let (o, n): (u64, u64) = (o.parse().unwrap(), n.parse().unwrap());
        copies.push((f[2].to_string(), o, n));
    }
    assert_eq!(copies.len(), 2, "{list}");
    env.ok(&["inject", "-c", "all", "tank"]);
    let names: Vec<String> = copies
        .iter()
        .map(|(p, _, _)| p.rsplit('/').next().unwrap().to_string())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert!(
        sorted == ["a", "b"] || sorted == ["c", "d"],
        "the two copies are on the two children of one mirror: {copies:?}"
    );
    for (i, (path, off, len)) in copies.iter().enumerate() {
        assert_eq!(*len, BLOCK, "{copies:?}");
        assert!(*off >= DATA_START, "{copies:?}");
        scribble(std::path::Path::new(path), *off, *len, None, 77 + i as u64);
    }

    let o = qemu_io(&env, &[&format!("read {x} 16k")]);
    let all = format!("{}{}", o.stdout, o.stderr);
    assert!(
        all.contains("Input/output error") && !all.contains("read 16384/16384"),
        "reading the block bad on both copies should fail with EIO:\n{all}"
    );
    // Every other block reads back right: the volume before and after the bad block.
    let part = |name: &str, extra: &[&str]| -> Vec<u8> {
        let mut a = vec!["dd", "-f", "raw", "-O", "raw", "bs=16k"];
        a.extend_from_slice(extra);
        let i = format!("if={}", vol(&env));
        let of = format!("of={}", env.p(name));
        a.push(&i);
        a.push(&of);
        env.tool_ok("qemu-img", &a);
        std::fs::read(env.path(name)).unwrap()
    };
    let bi = (x / BLOCK).to_string();
    let got = part("head.raw", &[&format!("count={bi}")]);
    assert_same("the volume before the bad block", &got, &data[..x as usize]);
    let after = format!("skip={}", x / BLOCK + 1);
    let got = part("tail.raw", &[&after]);
    assert_same(
        "the volume after the bad block",
        &got,
        &data[(x + BLOCK) as usize..],
    );

    let st = env.ok(&["pool", "status", "tank"]);
    assert!(
        st.contains("errors: 1 data errors, use '-v' for a list"),
        "{st}"
    );
    let stv = env.ok(&["pool", "status", "-v", "tank"]);
    assert!(
        stv.contains("errors: Permanent errors have been detected in the following datasets:"),
        "{stv}"
    );
    // -v was given: no hint to use it.
    assert!(!stv.contains("'-v'"), "{stv}");
    assert!(
        !st.contains("Use '-v'"),
        "the hint is on the errors: line only:\n{st}"
    );
    let entry = format!("tank/vol: offset {x} (16K block)");
    assert!(
        stv.lines().any(|l| l.trim() == entry),
        "status -v should list {entry:?}:\n{stv}"
    );
    let j = env.status_json("tank");
    assert_eq!(j["error_count"], "1", "{j}");
    assert_eq!(j["errlist"], serde_json::json!([entry]), "{j}");
    // Both copies were found bad, and nothing else was touched.
    let c = counters(&env);
    for n in &names {
        assert!(
            c[n.as_str()].2 >= 1,
            "{n} should count a checksum error: {c:?}"
        );
    }
    for n in ["a", "b", "c", "d"] {
        if !names.iter().any(|x| x == n) {
            assert_eq!(c[n], (0, 0, 0, 0), "leaf {n} saw no error: {c:?}");
        }
    }
    // The error no replica could serve counts up the tree (as zpool's): on its mirror and on the
    // pool, not on the other mirror.
    let (bad, good) = if sorted == ["a", "b"] {
        ("mirror-0", "mirror-1")
    } else {
        ("mirror-1", "mirror-0")
    };
    let st = env.ok(&["pool", "status", "tank"]);
    assert_eq!(row(&st, "tank")[4], "1", "{st}");
    assert_eq!(row(&st, bad)[4], "1", "{st}");
    assert_eq!(row(&st, good)[4], "0", "{st}");
    let j = env.status_json("tank");
    assert_eq!(j["vdevs"]["tank"]["checksum_errors"], "1", "{j}");
    assert_eq!(
        j["vdevs"]["tank"]["vdevs"][bad]["checksum_errors"], "1",
        "{j}"
    );

    // The error list is kept in the pool: it survives a restart, and an export and import.
    d.stop();
    let dir = env.p("");
    env.ok(&["pool", "export", "tank"]);
    env.ok(&["pool", "import", "-d", &dir, "tank"]);
    let mut d = env.serve();
    let stv = env.ok(&["pool", "status", "-v", "tank"]);
    assert!(
        stv.lines().any(|l| l.trim() == entry),
        "status -v should still list {entry:?} after export/import:\n{stv}"
    );
    assert_eq!(
        env.status_json("tank")["errlist"],
        serde_json::json!([entry])
    );

    // Rewriting the block clears the entry, and the new data reads back.
    qio_ok(&env, &[&format!("write -P 0x3e {x} 16k"), "flush"]);
    qio_ok(&env, &[&format!("read -P 0x3e {x} 16k")]);
    let stv = env.ok(&["pool", "status", "-v", "tank"]);
    assert!(stv.contains("errors: No known data errors"), "{stv}");
    assert!(!stv.contains("tank/vol: offset"), "{stv}");
    assert_eq!(env.status_json("tank")["error_count"], "0");
    let mut want = data.clone();
    want[x as usize..(x + BLOCK) as usize].fill(0x3e);
    assert_reads_back(&env, &want, "read after rewriting the bad block");
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 6. Counters survive export/import; clear resets them
// ---------------------------------------------------------------------------------------------------

#[test]
fn counters_survive_export_and_import_and_clear_resets_them() {
    let (env, mut d, data) = setup(32, 6);
    garble_a(&env);
    env.ok(&["inject", "-d", "d", "-e", "io", "-T", "read", "tank"]);
    assert_reads_back(&env, &data, "read with a garbled and d failing");
    let before = counters(&env);
    assert!(
        before["a"].2 > 0 && before["a"].3 > 0,
        "a has checksum errors and repairs: {before:?}"
    );
    assert!(before["d"].0 > 0, "d has read errors: {before:?}");

    d.stop();
    let dir = env.p("");
    env.ok(&["pool", "export", "tank"]);
    assert!(env.pool_names().is_empty());
    env.ok(&["pool", "import", "-d", &dir, "tank"]);
    let after = counters(&env);
    assert_eq!(
        after, before,
        "error counters should survive export/import (leaf: read, write, cksum, repaired)"
    );
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(shows(&row(&st, "a")[4], before["a"].2), "{st}");
    assert!(shows(&row(&st, "d")[2], before["d"].0), "{st}");

    env.ok(&["pool", "clear", "tank"]);
    let c = counters(&env);
    for l in ["a", "b", "c", "d"] {
        assert_eq!(c[l], (0, 0, 0, 0), "clear resets every counter: {c:?}");
    }
    let j = env.status_json("tank");
    for v in ["tank", "mirror-0", "mirror-1"] {
        let x = vdev(&j, v);
        for k in ["read_errors", "write_errors", "checksum_errors"] {
            assert_eq!(num(&x, k), 0, "{v} {k} after clear: {x}");
        }
    }
    // And the zeros are what the pool keeps.
    env.ok(&["pool", "export", "tank"]);
    env.ok(&["pool", "import", "-d", &dir, "tank"]);
    let c = counters(&env);
    for l in ["a", "b", "c", "d"] {
        assert_eq!(
            c[l],
            (0, 0, 0, 0),
            "cleared counters after a re-import: {c:?}"
        );
    }
    let mut d = env.serve();
    assert_reads_back(&env, &data, "read after the re-import");
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 7. offline / online
// ---------------------------------------------------------------------------------------------------

#[test]
fn offline_and_online_a_leaf() {
    let (env, mut d, mut data) = setup(16, 7);
    env.ok(&["pool", "offline", "tank", "b"]);
    let st = env.ok(&["pool", "status", "tank"]);
    assert_eq!(row(&st, "b")[1], "OFFLINE", "{st}");
    assert_eq!(row(&st, "mirror-0")[1], "DEGRADED", "{st}");
    assert_eq!(row(&st, "mirror-1")[1], "ONLINE", "{st}");
    assert!(st.contains("state: DEGRADED"), "{st}");

    // Writes go on with b offline.
    qio_ok(
        &env,
        &["write -P 0x33 2M 1M", "write -P 0x44 9M 512k", "flush"],
    );
    data[2 * MIB as usize..3 * MIB as usize].fill(0x33);
    data[9 * MIB as usize..(9 * MIB + 512 * 1024) as usize].fill(0x44);
    assert_reads_back(&env, &data, "read with b offline");

    // a is now the only copy of mirror-0.
    let e = env.fail(&["pool", "offline", "tank", "a"]);
    assert!(e.contains("no valid replicas"), "{e}");
    assert_eq!(state(&env, "a"), "ONLINE");

    env.ok(&["pool", "online", "tank", "b"]);
    let st = env.ok(&["pool", "status", "tank"]);
    for v in ["mirror-0", "a", "b"] {
        assert_eq!(row(&st, v)[1], "ONLINE", "{st}");
    }
    assert!(st.contains("state: ONLINE"), "{st}");
    // b missed the writes above; reads must not return its stale copies.
    assert_reads_back(&env, &data, "read after b came back online");
    assert_reads_back(&env, &data, "second read after b came back online");
    let c = counters(&env);
    for l in ["a", "c", "d"] {
        assert_eq!(c[l], (0, 0, 0, 0), "leaf {l} saw no error: {c:?}");
    }

    // `offline -t` lasts until the pool is closed, plain offline survives a daemon restart.
    env.ok(&["pool", "offline", "-t", "tank", "b"]);
    env.ok(&["pool", "offline", "tank", "d"]);
    assert_eq!(state(&env, "b"), "OFFLINE");
    assert_eq!(state(&env, "d"), "OFFLINE");
    d.stop();
    let mut d = env.serve();
    let st = env.ok(&["pool", "status", "tank"]);
    assert_eq!(
        row(&st, "b")[1],
        "ONLINE",
        "a temporary offline does not survive a restart:\n{st}"
    );
    assert_eq!(
        row(&st, "d")[1],
        "OFFLINE",
        "a plain offline survives a restart:\n{st}"
    );
    assert_eq!(row(&st, "mirror-0")[1], "ONLINE", "{st}");
    assert_eq!(row(&st, "mirror-1")[1], "DEGRADED", "{st}");
    assert_reads_back(&env, &data, "read after the restart");
    env.ok(&["pool", "online", "tank", "d"]);
    assert_eq!(state(&env, "d"), "ONLINE");
    assert_eq!(env.pool_health("tank"), "ONLINE");
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 8. Events
// ---------------------------------------------------------------------------------------------------

#[test]
fn events_record_checksum_errors_repairs_and_state_changes() {
    let (env, mut d, data) = setup(32, 8);
    let ev = events(&env);
    assert!(
        !ev.iter()
            .any(|e| matches!(e.0.as_str(), "checksum" | "repair" | "state_change")),
        "a new pool has no error events: {ev:?}"
    );
    garble_a(&env);
    assert_reads_back(&env, &data, "read after garbling leaf a");

    let ev = events(&env);
    let a = env.p("a");
    let in_garbled =
        |o: Option<u64>| o.is_some_and(|o| (DATA_START..DATA_START + 25 * MIB).contains(&o));
    let cks: Vec<_> = ev.iter().filter(|e| e.0 == "checksum").collect();
    let rep: Vec<_> = ev.iter().filter(|e| e.0 == "repair").collect();
    assert!(!cks.is_empty(), "checksum events expected: {ev:?}");
    assert!(!rep.is_empty(), "repair events expected: {ev:?}");
    for e in cks.iter().chain(&rep) {
        assert_eq!(e.1, a, "checksum and repair events name leaf a: {e:?}");
        assert!(
            in_garbled(e.2),
            "the event's offset lies in the garbled range: {e:?}"
        );
    }
    assert!(
        cks.iter().all(|c| rep.iter().any(|r| r.2 == c.2)),
        "every checksum error on a was repaired"
    );

    // The human form: one tab-separated line per event with -H.
    let h = env.ok(&["pool", "events", "-H", "tank"]);
    let lines: Vec<Vec<&str>> = h.lines().map(|l| l.split('\t').collect()).collect();
    assert!(
        lines.iter().all(|f| f.len() == 6),
        "events -H has 6 fields:\n{h}"
    );
    assert!(
        lines.iter().any(|f| f[1] == "checksum" && f[2] == "tank"),
        "{h}"
    );
    assert!(lines.iter().any(|f| f[1] == "repair" && f[3] == a), "{h}");
    let plain = env.ok(&["pool", "events"]);
    assert!(
        plain.lines().next().is_some_and(|l| l.contains("CLASS")),
        "events without a pool lists every pool's events with a header:\n{plain}"
    );

    env.ok(&["pool", "offline", "tank", "b"]);
    env.ok(&["pool", "online", "tank", "b"]);
    let b = env.p("b");
    let sc: Vec<_> = events(&env)
        .into_iter()
        .filter(|e| e.0 == "state_change")
        .collect();
    assert!(
        sc.iter().any(|e| e.1 == b && e.3.contains("OFFLINE")),
        "offline should record a state_change to OFFLINE for b: {sc:?}"
    );
    assert!(
        sc.iter().any(|e| e.1 == b && e.3.contains("ONLINE")),
        "online should record a state_change to ONLINE for b: {sc:?}"
    );
    let h = env.ok(&["pool", "events", "-H", "tank"]);
    assert!(h.lines().any(|l| l.contains("state_change")), "{h}");
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 9. A suspended pool resumes with `pool clear` once its devices work again
// ---------------------------------------------------------------------------------------------------

#[test]
fn a_suspended_pool_resumes_with_clear_and_keeps_every_flushed_byte() {
    let (env, mut d, mut data) = setup(16, 9);
    // Both sides of mirror-0 refuse writes: the next commit fails and the pool suspends.
    env.ok(&["inject", "-d", "a", "-e", "io", "-T", "write", "tank"]);
    env.ok(&["inject", "-d", "b", "-e", "io", "-T", "write", "tank"]);
    let out = qemu_io(&env, &["write -P 0x5e 0 8M", "flush"]);
    assert!(
        out.code != 0 || out.stdout.contains("failed"),
        "the flush cannot succeed with mirror-0 refusing writes:\n{}{}",
        out.stdout,
        out.stderr
    );
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(
        st.contains("suspended") && st.contains("state: SUSPENDED"),
        "the pool says it is suspended:\n{st}"
    );
    assert_eq!(env.pool_health("tank"), "SUSPENDED");
    // Clearing while the devices still fail does not resume it.
    env.fail(&["pool", "clear", "tank"]);
    env.ok(&["inject", "-c", "all", "tank"]);
    env.ok(&["pool", "clear", "tank"]);
    assert_eq!(env.pool_health("tank"), "ONLINE");
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(!st.contains("suspended"), "{st}");
    // Everything flushed before the suspension is there; the pool takes writes again.
    assert_reads_back(&env, &data, "read after the resume");
    qio_ok(&env, &["write -P 0x5f 1M 2M", "flush"]);
    data[MIB as usize..3 * MIB as usize].fill(0x5f);
    assert_reads_back(&env, &data, "read after a write following the resume");
    d.stop();
    let mut d = env.serve();
    assert_reads_back(&env, &data, "read after a restart");
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(st.contains("errors: No known data errors"), "{st}");
    d.assert_alive();
}

/// A pool `tank` of one mirror of two 128M leaves `a` and `b`, with a 16M volume `tank/vol`.
fn mirror_with_a_volume() -> Env {
    let env = Env::new();
    let l = env.leaves(&["a", "b"]);
    env.ok(&[
        "pool", "create", "--size", "128M", "tank", "mirror", &l[0], &l[1],
    ]);
    env.ok(&["dataset", "create", "-V", "16M", "tank/vol"]);
    env
}

/// The daemon's stderr fails every write (a full disk under its log, here /dev/full) while the writes
/// of every copy fail too: the warnings it cannot log must not take it down, nor leave a write
/// counted in flight forever (a panic from logging did, and every later commit waited for it with
/// the pool lock held). It starts, fails the write with an error, resumes after `clear`, serves
/// again, and stops cleanly.
#[test]
fn a_daemon_whose_log_cannot_be_written_keeps_serving_through_write_errors() {
    let env = mirror_with_a_volume();
    let mut d = env.serve_logging_to(&[], Some(std::path::Path::new("/dev/full")));
    qio_ok(&env, &["write -P 0x11 0 1M", "flush"]);
    for leaf in ["a", "b"] {
        env.ok(&["inject", "-d", leaf, "-e", "io", "-T", "write", "tank"]);
    }
    let o = qemu_io(&env, &["write -P 0x22 1M 1M", "flush"]);
    assert!(
        o.stdout.contains("error") || o.stderr.contains("error") || o.code != 0,
        "the write (or its flush) should fail while every copy fails: {o:?}"
    );
    env.ok(&["inject", "-c", "all", "tank"]);
    // The daemon answers (a wedged commit held the pool lock: status would hang here).
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(st.contains("pool: tank"), "{st}");
    env.ok(&["pool", "clear", "tank"]);
    qio_ok(
        &env,
        &[
            "write -P 0x33 2M 1M",
            "flush",
            "read -P 0x11 0 1M",
            "read -P 0x33 2M 1M",
        ],
    );
    d.assert_alive();
    assert!(d.terminate().success(), "SIGTERM: a clean exit");
}

/// An export that fails (every write fails, so its last commit cannot be made) leaves the pool
/// imported and served by the daemon, as zpool leaves a pool it could not export: status and the
/// injected faults are still there, `clear` resumes it, and a later export and import keep the data.
/// (The daemon dropped the pool: everything said "no such pool" until it was restarted.)
#[test]
fn a_failed_export_leaves_the_pool_imported_and_served() {
    let env = mirror_with_a_volume();
    let mut d = env.serve();
    qio_ok(&env, &["write -P 0x11 0 1M", "flush"]);
    for leaf in ["a", "b"] {
        env.ok(&["inject", "-d", leaf, "-e", "io", "-T", "write", "tank"]);
    }
    let e = env.fail(&["pool", "export", "tank"]);
    assert!(e.starts_with("cannot export 'tank': "), "{e}");
    assert_eq!(env.pool_names(), ["tank"], "still imported");
    // Its final commit failed: the pool is suspended until `clear`, and says so.
    assert_eq!(env.pool_health("tank"), "SUSPENDED");
    let faults = env.ok(&["inject", "-l", "tank"]);
    assert_eq!(
        faults.lines().count(),
        3,
        "both faults still listed:\n{faults}"
    );
    env.ok(&["inject", "-c", "all", "tank"]);
    env.ok(&["pool", "clear", "tank"]);
    qio_ok(&env, &["read -P 0x11 0 1M", "write -P 0x22 1M 1M", "flush"]);
    env.ok(&["pool", "export", "tank"]);
    assert!(env.pool_names().is_empty());
    d.assert_alive();
    env.ok(&["pool", "import", "-d", &env.p(""), "tank"]);
    qio_ok(&env, &["read -P 0x11 0 1M", "read -P 0x22 1M 1M"]);
    d.assert_alive();
}

/// Waits up to 20 s for `f` to hold.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "timed out waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Older copies of leaves (a backup copied aside) given to import next to the current ones, or
/// instead of them. Import took whichever copy it found first: with a stale mirror-0 the pool came
/// up ONLINE and every read failed, and writing to it then broke the current copies too. Now the copy
/// that took part in the newest txg wins; a mirror with only older copies is refused, naming them,
/// and the copies are left as they were; a single older copy next to a current one joins as a
/// device that missed those txgs, and is resilvered.
#[test]
fn import_takes_the_current_copy_of_a_leaf_and_refuses_a_vdev_of_older_copies() {
    let env = Env::new();
    for dir in ["cur", "old", "aside"] {
        env.mkdir(dir);
    }
    let p = |n: &str| env.p(n);
    env.ok(&[
        "pool",
        "create",
        "--size",
        "128M",
        "tank",
        "mirror",
        &p("cur/a"),
        &p("cur/b"),
        "mirror",
        &p("cur/c"),
        &p("cur/d"),
    ]);
    env.ok(&["dataset", "create", "-V", "16M", "tank/vol"]);
    let mut d = env.serve();
    qio_ok(&env, &["write -P 0x11 0 16M", "flush"]);
    d.stop();
    env.ok(&["pool", "export", "tank"]);
    for n in ["a", "b"] {
        std::fs::copy(env.path(&format!("cur/{n}")), env.path(&format!("old/{n}"))).unwrap();
    }
    env.ok(&["pool", "import", "-d", &p("cur"), "tank"]);
    let mut d = env.serve();
    qio_ok(&env, &["write -P 0x22 0 16M", "flush"]);
    d.stop();
    env.ok(&["pool", "export", "tank"]);
    let old_image = |n: &str| std::fs::read(env.path(&format!("old/{n}"))).unwrap();
    let (old_a, old_b) = (old_image("a"), old_image("b"));

    // Both copies visible, the old ones first: the current ones are taken.
    env.ok(&["pool", "import", "-d", &p("old"), "-d", &p("cur"), "tank"]);
    let st = env.ok(&["pool", "status", "-P", "tank"]);
    assert!(
        st.contains(&p("cur/a")) && st.contains(&p("cur/b")) && !st.contains(&p("old/")),
        "{st}"
    );
    let mut d = env.serve();
    qio_ok(&env, &["read -P 0x22 0 16M"]);
    d.stop();
    env.ok(&["pool", "export", "tank"]);

    // Only the old copies of mirror-0: refused, naming them; they are left as they were.
    for n in ["a", "b"] {
        std::fs::rename(
            env.path(&format!("cur/{n}")),
            env.path(&format!("aside/{n}")),
        )
        .unwrap();
    }
    // The listing shows them behind the pool; the import refuses them.
    let listing = env.ok(&["pool", "import", "-d", &p("old"), "-d", &p("cur")]);
    assert!(
        listing
            .lines()
            .any(|l| l.trim_start().starts_with("a ") && l.contains("(behind: last written in txg")),
        "{listing}"
    );
    let e = env.fail(&["pool", "import", "-d", &p("old"), "-d", &p("cur"), "tank"]);
    assert!(
        e.contains("cannot import 'tank'") && e.contains("older copies") && e.contains(&p("old/a")),
        "{e}"
    );
    assert!(old_image("a") == old_a && old_image("b") == old_b);
    assert!(env.pool_names().is_empty());

    // One old copy next to a current one: imported; the old copy is resilvered.
    std::fs::rename(env.path("aside/a"), env.path("cur/a")).unwrap();
    env.ok(&["pool", "import", "-d", &p("old"), "-d", &p("cur"), "tank"]);
    let mut d = env.serve();
    eventually("the older copy is resilvered", || {
        let st = env.ok(&["pool", "status", "tank"]);
        st.contains("resilvered") && !st.contains("(resilver")
    });
    assert!(
        events(&env)
            .iter()
            .any(|e| e.0 == "stale" && e.3.contains(&p("old/b"))),
        "{:?}",
        events(&env)
    );
    env.ok(&["pool", "offline", "tank", &p("cur/a")]);
    qio_ok(&env, &["read -P 0x22 0 16M"]);
    d.stop();
}
