//! Rewind (issue 15, item 5): an uberblock whose checksum fails is no candidate, so a plain import
//! opens the newest intact one; damaged metadata of the newest txg makes a plain import refuse and name
//! `-F`; `import -F -n` only reports, `-F` opens the newest txg that opens, `-T TXG` opens that txg; an
//! exported pool that lost its newest uberblock imports.
//!
//! Uberblock places (docs/on-disk-format.md §5): slot `txg % 32` of the ring at label offset + 128 KiB,
//! labels at 0, 256 KiB, P - 512 KiB and P - 256 KiB (P = size rounded down to 256 KiB). The root block
//! pointer is at uberblock byte 56, its DVAs 16 bytes each (vdev u32, sectors u32, offset u64); on a
//! single leaf a vdev offset is at leaf offset 4 MiB + offset (§6).

use cairn_tests::{scribble, Env, MIB};
use std::os::unix::fs::FileExt;
use std::path::Path;

const KIB: u64 = 1024;

fn label_offsets(size: u64) -> [u64; 4] {
    let p = size / (256 * KIB) * (256 * KIB);
    [0, 256 * KIB, p - 512 * KIB, p - 256 * KIB]
}

/// Every intact uberblock of the leaf: (txg, leaf offset of the slot).
fn uberblocks(path: &Path) -> Vec<(u64, u64)> {
    let f = std::fs::File::open(path).expect("open leaf");
    let size = f.metadata().expect("stat").len();
    let mut out = Vec::new();
    for l in label_offsets(size) {
        for s in 0..32 {
            let off = l + 128 * KIB + s * 4 * KIB;
            let mut b = vec![0u8; 256];
            f.read_exact_at(&mut b, off).expect("read slot");
            if &b[..8] != b"CAIRNUB\0" {
                continue;
            }
            let crc = u32::from_le_bytes(b[252..256].try_into().unwrap());
            if crc32(&b[..252]) != crc {
                continue;
            }
            out.push((u64::from_le_bytes(b[16..24].try_into().unwrap()), off));
        }
    }
    out
}

fn crc32(b: &[u8]) -> u32 {
    // IEEE crc32, bitwise (the tests do not depend on crc32fast).
    let mut c = !0u32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn newest(path: &Path) -> u64 {
    uberblocks(path)
        .iter()
        .map(|u| u.0)
        .max()
        .expect("an uberblock")
}

/// Damages the uberblock of `txg` in every label.
fn damage_uberblock(path: &Path, txg: u64) {
    for (t, off) in uberblocks(path) {
        if t == txg {
            scribble(path, off + 60, 16, Some(0xff), 1);
        }
    }
    assert!(uberblocks(path).iter().all(|u| u.0 != txg));
}

/// Damages every copy of the objset block the uberblock of `txg` points at (a single-leaf pool).
fn damage_objset(path: &Path, txg: u64) {
    let f = std::fs::File::open(path).expect("open leaf");
    let (_, off) = *uberblocks(path)
        .iter()
        .find(|u| u.0 == txg)
        .expect("that uberblock");
    let mut b = vec![0u8; 256];
    f.read_exact_at(&mut b, off).expect("read");
    for i in 0..3 {
        let d = 56 + i * 16;
        let sectors = u32::from_le_bytes(b[d + 4..d + 8].try_into().unwrap());
        if sectors == 0 {
            continue;
        }
        let vo = u64::from_le_bytes(b[d + 8..d + 16].try_into().unwrap());
        scribble(path, 4 * MIB + vo, 4096, None, 7 + i as u64);
    }
}

/// A single-leaf pool with a volume: 1 MiB of 0xa1 at 0 committed, then 1 MiB of 0xb2 at 1 MiB
/// committed in a later txg, then the daemon is killed (a crash). Returns the txg after A's flush.
fn crashed_pool(env: &Env) -> u64 {
    env.mkdir("l");
    env.ok(&["pool", "create", "--size", "128M", "tank", "l/a"]);
    env.ok(&["dataset", "create", "-V", "16M", "tank/vol"]);
    let mut d = env.serve();
    let mut c = env.nbd_connect("tank/vol").expect("connect");
    c.write(0, &vec![0xa1; MIB as usize]).expect("write A");
    c.flush().expect("flush A");
    let after_a = newest(&env.path("l/a"));
    c.write(MIB, &vec![0xb2; MIB as usize]).expect("write B");
    c.flush().expect("flush B");
    d.kill();
    // Forget the pool here, as if the machine had died and the pool moved.
    std::fs::remove_file(env.state_dir().join("pools.json")).expect("rm pools.json");
    after_a
}

/// Reads `len` bytes at `off` of tank/vol through a daemon.
fn read_vol(env: &Env, off: u64, len: u32) -> Vec<u8> {
    let mut d = env.serve();
    let mut c = env.nbd_connect("tank/vol").expect("connect");
    let b = c.read(off, len).expect("read");
    drop(c);
    d.stop();
    b
}

#[test]
fn damaged_newest_uberblock_imports_the_newest_intact_one() {
    let env = Env::new();
    let after_a = crashed_pool(&env);
    let leaf = env.path("l/a");
    let n = newest(&leaf);
    assert!(n > after_a, "B's flush committed a later txg");
    damage_uberblock(&leaf, n);
    env.ok(&["pool", "import", "-d", &env.p("l"), "tank"]);
    assert_eq!(read_vol(&env, 0, MIB as u32), vec![0xa1; MIB as usize]);
}

#[test]
fn damaged_metadata_of_the_newest_txg_needs_f() {
    let env = Env::new();
    let after_a = crashed_pool(&env);
    let leaf = env.path("l/a");
    let n = newest(&leaf);
    assert!(n > after_a);
    damage_objset(&leaf, n);
    let before = std::fs::read(&leaf).expect("read leaf");

    let e = env.fail(&["pool", "import", "-d", &env.p("l"), "tank"]);
    assert!(e.starts_with("cannot import 'tank': "), "{e}");
    assert!(e.contains("-F"), "the error names -F: {e}");
    assert_eq!(
        std::fs::read(&leaf).unwrap(),
        before,
        "a refused import writes nothing"
    );

    let o = env.ok(&["pool", "import", "-d", &env.p("l"), "-F", "-n", "tank"]);
    assert!(
        o.contains("would rewind pool 'tank' to txg") && o.contains("discarding the last"),
        "{o}"
    );
    assert_eq!(std::fs::read(&leaf).unwrap(), before, "-n changes nothing");
    assert!(env.pool_names().is_empty());

    let o = env.ok(&["pool", "import", "-d", &env.p("l"), "-F", "tank"]);
    assert!(
        o.contains("rewound to txg") && o.contains(" of writes"),
        "{o}"
    );
    assert_eq!(env.pool_health("tank"), "ONLINE");
    assert_eq!(read_vol(&env, 0, MIB as u32), vec![0xa1; MIB as usize]);
    // The discarded txg does not come back at the next import.
    env.ok(&["pool", "export", "tank"]);
    env.ok(&["pool", "import", "-d", &env.p("l"), "tank"]);
    assert_eq!(read_vol(&env, 0, MIB as u32), vec![0xa1; MIB as usize]);
}

#[test]
fn import_t_opens_the_chosen_txg() {
    let env = Env::new();
    let after_a = crashed_pool(&env);
    let leaf = env.path("l/a");
    let n = newest(&leaf);
    let e = env.fail(&[
        "pool",
        "import",
        "-d",
        &env.p("l"),
        "-T",
        &(n + 1000).to_string(),
        "tank",
    ]);
    assert!(e.contains("no intact uberblock of txg"), "{e}");
    let o = env.ok(&[
        "pool",
        "import",
        "-d",
        &env.p("l"),
        "-T",
        &after_a.to_string(),
        "tank",
    ]);
    assert!(o.contains(&format!("rewound to txg {after_a}")), "{o}");
    // The import's own commits reuse the numbers after it (at most 3 of them); every uberblock of
    // the discarded txgs is gone.
    let left: Vec<u64> = uberblocks(&leaf).iter().map(|u| u.0).collect();
    assert!(
        left.iter().all(|&t| t <= after_a + 3),
        "{left:?} (was at {n})"
    );
    let b = read_vol(&env, 0, 2 * MIB as u32);
    assert_eq!(&b[..MIB as usize], &vec![0xa1; MIB as usize][..]);
}

#[test]
fn exported_pool_missing_its_newest_uberblock_imports() {
    let env = Env::new();
    env.mkdir("l");
    env.ok(&["pool", "create", "--size", "128M", "tank", "l/a"]);
    env.ok(&["dataset", "create", "-V", "8M", "tank/vol"]);
    env.ok(&["pool", "export", "tank"]);
    let leaf = env.path("l/a");
    damage_uberblock(&leaf, newest(&leaf));
    env.ok(&["pool", "import", "-d", &env.p("l"), "tank"]);
    let l = env.ok(&["dataset", "list", "-H", "-o", "name"]);
    assert!(l.contains("tank/vol"), "{l}");
}

/// Every intact uberblock txg of the leaf, newest first.
fn txgs(path: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = uberblocks(path).iter().map(|u| u.0).collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v.dedup();
    v
}

/// A single-leaf pool whose volume's first MiB is overwritten with `states.len()` patterns, one
/// flushed txg each (every overwrite frees the blocks of the one before), then the daemon is killed.
/// Returns the newest txg after each flush.
fn overwritten_pool(env: &Env, states: &[u8]) -> Vec<u64> {
    env.mkdir("l");
    env.ok(&["pool", "create", "--size", "128M", "tank", "l/a"]);
    env.ok(&["dataset", "create", "-V", "16M", "tank/vol"]);
    let mut d = env.serve();
    let mut c = env.nbd_connect("tank/vol").expect("connect");
    let mut after = Vec::new();
    for &s in states {
        c.write(0, &vec![s; MIB as usize]).expect("write");
        c.flush().expect("flush");
        after.push(newest(&env.path("l/a")));
    }
    d.kill();
    std::fs::remove_file(env.state_dir().join("pools.json")).expect("rm pools.json");
    after
}

/// The newest 2, then 3 uberblocks bad in every label of a crashed pool: a plain import opens the
/// newest intact txg with its own map pages and blocks (before, page 0 had no copy that old, and the
/// blocks that txg used had been handed out again).
#[test]
fn damaged_newest_two_or_three_uberblocks_import_the_intact_txg_with_its_data() {
    for lost in [2usize, 3] {
        let env = Env::new();
        let states = [0x11u8, 0x22, 0x33, 0x44, 0x55, 0x66];
        let after = overwritten_pool(&env, &states);
        let leaf = env.path("l/a");
        let keep = states.len() - 1 - lost;
        let bad: Vec<u64> = txgs(&leaf)
            .into_iter()
            .filter(|&t| t > after[keep])
            .collect();
        assert!(bad.len() >= lost, "{bad:?} after {after:?}");
        for t in &bad {
            damage_uberblock(&leaf, *t);
        }
        assert_eq!(newest(&leaf), after[keep]);
        env.ok(&["pool", "import", "-d", &env.p("l"), "tank"]);
        assert_eq!(env.pool_health("tank"), "ONLINE");
        assert_eq!(
            read_vol(&env, 0, MIB as u32),
            vec![states[keep]; MIB as usize],
            "{lost} lost: the data of txg {} (after {after:?})",
            after[keep]
        );
        // The pool works on: a write and a read back.
        let mut d = env.serve();
        let mut c = env.nbd_connect("tank/vol").expect("connect");
        c.write(2 * MIB, &vec![0x77; MIB as usize]).expect("write");
        c.flush().expect("flush");
        assert_eq!(
            c.read(2 * MIB, MIB as u32).unwrap(),
            vec![0x77; MIB as usize]
        );
        assert_eq!(
            c.read(0, MIB as u32).unwrap(),
            vec![states[keep]; MIB as usize]
        );
        drop(c);
        d.stop();
    }
}

/// `-T` of a txg 6 or more back, after overwrites, a TRIM (frees), a crash right after it, a reopen
/// and new writes (which took freed space at once when frees were not deferred across a reopen):
/// that txg's data is intact.
#[test]
fn import_t_six_txgs_back_after_frees_and_a_reopen_reads_its_data() {
    let env = Env::new();
    let states = [0xa1u8, 0xb2, 0xc3, 0xc4];
    let after = overwritten_pool(&env, &states);
    let target = after[1];
    // Free the first MiB (TRIM), then crash right after.
    let mut d = env.serve();
    env.ok(&["pool", "import", "-d", &env.p("l"), "tank"]);
    let mut c = env.nbd_connect("tank/vol").expect("connect");
    c.trim(0, MIB as u32).expect("trim");
    c.flush().expect("flush");
    drop(c);
    d.kill();
    // Reopen and write elsewhere: new blocks must not take the freed ones.
    let mut d = env.serve();
    let mut c = env.nbd_connect("tank/vol").expect("connect");
    c.write(4 * MIB, &vec![0xd4; 2 * MIB as usize])
        .expect("write");
    c.flush().expect("flush");
    drop(c);
    d.kill();
    std::fs::remove_file(env.state_dir().join("pools.json")).expect("rm pools.json");
    let leaf = env.path("l/a");
    let n = newest(&leaf);
    assert!(
        n - target >= 6 && n - target <= cairn_pool::alloc::HISTORY_TXGS,
        "txg {target} is {} back (newest {n})",
        n - target
    );
    let o = env.ok(&[
        "pool",
        "import",
        "-d",
        &env.p("l"),
        "-T",
        &target.to_string(),
        "tank",
    ]);
    assert!(o.contains(&format!("rewound to txg {target}")), "{o}");
    let b = read_vol(&env, 0, 8 * MIB as u32);
    assert_eq!(&b[..MIB as usize], &vec![0xb2; MIB as usize][..]);
    assert!(
        b[MIB as usize..].iter().all(|&x| x == 0),
        "nothing else was written then"
    );
}
