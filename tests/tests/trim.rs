//! End-to-end tests of TRIM (issue 16): freed space goes back to the leaf files. With `autotrim=on`
//! (the default) the holes are punched once the txgs that freed the blocks have left the deferral
//! window; with it off, `cairn pool trim` punches every free range of the leaves, with its state in
//! `pool status -t`. Every test reads the data back afterwards: a trim must never punch a live block.
//!
//! How much of a leaf file is on disk is `st_blocks * 512` (what `du` shows). Leaves are sparse files
//! that `pool create --size` makes; data goes in with qemu-io (Debian package qemu-utils) over NBD.

use cairn_tests::{random_bytes, Env, MIB};
use std::os::unix::fs::MetadataExt;

const VOL: &str = "tank/vol";

/// Bytes of leaf `name` on disk.
fn on_disk(env: &Env, name: &str) -> u64 {
    std::fs::metadata(env.path(name))
        .expect("leaf exists")
        .blocks()
        * 512
}

/// `mirror a b` of 512 MiB files, a 256 MiB volume, a daemon; 256 MiB of random data written
/// through NBD and flushed. Returns the data.
fn setup(env: &Env, props: &[&str]) -> (cairn_tests::Daemon, Vec<u8>) {
    let mut create = vec!["pool", "create", "--size", "512M"];
    for p in props {
        create.push("-o");
        create.push(p);
    }
    let (a, b) = (env.p("a"), env.p("b"));
    create.extend(["tank", "mirror", &a, &b]);
    env.ok(&create);
    env.ok(&["dataset", "create", "-V", "256M", VOL]);
    let d = env.serve();
    let data = random_bytes((256 * MIB) as usize, 0x7417);
    let mut c = env.nbd_connect(VOL).expect("connect");
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        c.write(i as u64 * MIB, chunk).expect("write");
    }
    c.flush().expect("flush");
    c.disconnect().expect("disconnect");
    (d, data)
}

/// Frees 200 MiB at the start of the volume (NBD TRIM through qemu-io), then writes zeros over
/// the next 40 MiB (which become holes), and flushes.
fn free_most(env: &Env, data: &mut [u8]) {
    let uri = env.nbd_uri(VOL);
    env.qemu_io_ok(&[], &uri, &["discard 0 200M", "write -z 200M 40M", "flush"]);
    data[..(240 * MIB) as usize].fill(0);
}

/// Txgs a free waits before its blocks may be reused or trimmed (also after a reopen).
const DEFER: usize = cairn_pool::alloc::HISTORY_TXGS as usize;

/// A few more txgs (a 4 KiB write and a flush each, in the last MiB, whose data `data` follows):
/// the frees leave the deferral window as they commit.
fn more_txgs(env: &Env, data: &mut [u8], n: usize) {
    let mut c = env.nbd_connect(VOL).expect("connect");
    for i in 0..n {
        let off = 255 * MIB + i as u64 * 4096;
        let block = vec![i as u8 + 1; 4096];
        c.write(off, &block).expect("write");
        c.flush().expect("flush");
        data[off as usize..off as usize + 4096].copy_from_slice(&block);
    }
    c.disconnect().expect("disconnect");
}

fn assert_volume(env: &Env, data: &[u8]) {
    let mut c = env.nbd_connect(VOL).expect("connect");
    for (i, want) in data.chunks(MIB as usize).enumerate() {
        let got = c.read(i as u64 * MIB, MIB as u32).expect("read");
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            panic!("volume MiB {i} differs at byte {at}");
        }
    }
    c.disconnect().expect("disconnect");
}

#[test]
fn autotrim_gives_freed_space_back_to_the_leaf_files() {
    let env = Env::new();
    let (mut d, mut data) = setup(&env, &[]);
    assert_eq!(
        env.ok(&["pool", "get", "-H", "-o", "value", "autotrim", "tank"])
            .trim(),
        "on"
    );
    let full = on_disk(&env, "a");
    assert!(full >= 256 * MIB, "a holds the volume: {full}");
    free_most(&env, &mut data);
    // The punch follows the commits that take the frees out of the deferral window; by count of
    // txgs, not by time.
    let mut last = full;
    for _ in 0..10 {
        more_txgs(&env, &mut data, 2);
        last = on_disk(&env, "a").min(on_disk(&env, "b"));
        if last < 100 * MIB {
            break;
        }
    }
    for leaf in ["a", "b"] {
        let n = on_disk(&env, leaf);
        assert!(
            n < 100 * MIB,
            "{leaf} gave the 240 MiB freed back (from {full} to {n} bytes on disk)"
        );
    }
    assert!(last < full);
    assert_volume(&env, &data);
    // And after a restart the pool is whole.
    d.stop();
    let mut d = env.serve();
    assert_volume(&env, &data);
    env.ok(&["pool", "scrub", "-w", "tank"]);
    let st = env.status_json("tank");
    assert_eq!(st["scan_stats"]["errors"], "0", "{st:#}");
    d.assert_alive();
}

#[test]
fn with_autotrim_off_a_manual_trim_punches_the_free_space() {
    let env = Env::new();
    let (mut d, mut data) = setup(&env, &["autotrim=off"]);
    free_most(&env, &mut data);
    // Past the deferral window (frees wait HISTORY_TXGS txgs before they may be reused or trimmed).
    more_txgs(&env, &mut data, DEFER + 1);
    let before = on_disk(&env, "a");
    assert!(
        before >= 240 * MIB,
        "autotrim=off: nothing is punched ({before} bytes on disk)"
    );
    let st = env.ok(&["pool", "status", "-t", "tank"]);
    assert!(st.contains("(untrimmed)"), "{st}");
    env.ok(&["pool", "trim", "-w", "tank"]);
    for leaf in ["a", "b"] {
        let n = on_disk(&env, leaf);
        assert!(n < 100 * MIB, "{leaf}: from {before} to {n} bytes on disk");
    }
    let st = env.ok(&["pool", "status", "-t", "tank"]);
    let lines: Vec<&str> = st
        .lines()
        .filter(|l| l.contains("trimmed, completed at"))
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "both leaves show their completed trim:\n{st}"
    );
    assert!(lines.iter().all(|l| l.contains("(100% trimmed")), "{st}");
    let j = env.status_json("tank");
    let a = &j["vdevs"]["tank"]["vdevs"]["mirror-0"]["vdevs"]["a"];
    assert_eq!(a["trim_state"], "COMPLETE", "{j:#}");
    assert_volume(&env, &data);
    // The state survives a restart; a new trim of one leaf starts over.
    d.stop();
    let mut d = env.serve();
    let st = env.ok(&["pool", "status", "-t", "tank"]);
    assert_eq!(st.matches("(100% trimmed").count(), 2, "{st}");
    env.ok(&["pool", "trim", "-w", "tank", "a"]);
    assert_volume(&env, &data);
    d.assert_alive();
}

#[test]
fn a_foreground_trim_runs_without_the_daemon() {
    let env = Env::new();
    let (mut d, mut data) = setup(&env, &["autotrim=off"]);
    free_most(&env, &mut data);
    more_txgs(&env, &mut data, DEFER + 1);
    d.stop();
    let before = on_disk(&env, "b");
    let out = env.run(&["pool", "trim", "tank", "b"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("trim of 'tank' finished"),
        "{}",
        out.stderr
    );
    let after = on_disk(&env, "b");
    assert!(after < 100 * MIB, "b: from {before} to {after}");
    assert!(on_disk(&env, "a") >= 240 * MIB, "a was not named");
    let mut d = env.serve();
    assert_volume(&env, &data);
    d.assert_alive();
}

#[test]
fn trim_refuses_what_it_cannot_do_and_changes_nothing() {
    let env = Env::new();
    let (a, b) = (env.p("a"), env.p("b"));
    env.ok(&["pool", "create", "--size", "128M", "tank", "mirror", &a, &b]);
    let e = env.fail(&["pool", "trim", "-d", "tank"]);
    assert!(
        e.contains("cannot trim 'tank'") && e.contains("secure trim"),
        "{e}"
    );
    let e = env.fail(&["pool", "trim", "tank", "nosuch"]);
    assert!(
        e.contains("cannot trim 'nosuch'") && e.contains("no such device"),
        "{e}"
    );
    let e = env.fail(&["pool", "trim", "-s", "tank"]);
    assert!(e.contains("no trim in progress"), "{e}");
    let e = env.fail(&["pool", "trim", "-c", "tank", "a"]);
    assert!(e.contains("no trim in progress"), "{e}");
    let e = env.fail(&["pool", "trim", "nopool"]);
    assert!(e.contains("cannot trim 'nopool'"), "{e}");
    env.ok(&["pool", "offline", "tank", "b"]);
    let e = env.fail(&["pool", "trim", "tank", "b"]);
    assert!(e.contains("offline"), "{e}");
    let e = env.fail(&["pool", "set", "autotrim=maybe", "tank"]);
    assert!(e.contains("autotrim"), "{e}");
    let st = env.ok(&["pool", "status", "-t", "tank"]);
    assert_eq!(st.matches("(untrimmed)").count(), 2, "{st}");
}
