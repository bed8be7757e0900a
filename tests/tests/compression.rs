//! End-to-end tests of compression (issue 18): the volume property `compression` (off, on/lz4,
//! zstd, zstd-N, zstd-fast), set at create or later (old blocks stay readable), data read back byte
//! for byte over NBD, the space it saves (`pool list alloc`, `compressratio`), random data stored
//! plain, and scrub repairing a damaged compressed block from its mirror (the checksum covers what
//! is stored, so no decompression is involved).

use cairn_tests::{random_bytes, scribble, Env, MIB};

/// Half compressible: in every 1 KiB, 512 pseudo-random bytes then 512 zeros (what fio's
/// `buffer_compress_percentage=50` writes, roughly).
fn half_compressible(len: usize, seed: u64) -> Vec<u8> {
    let mut d = random_bytes(len, seed);
    for chunk in d.chunks_mut(1024) {
        let n = chunk.len();
        chunk[n / 2..].fill(0);
    }
    d
}

fn pool(env: &Env) {
    let (a, b) = (env.p("a"), env.p("b"));
    env.ok(&["pool", "create", "--size", "512M", "tank", "mirror", &a, &b]);
}

fn write(env: &Env, vol: &str, off: u64, data: &[u8]) {
    let mut c = env.nbd_connect(vol).expect("connect");
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        c.write(off + i as u64 * MIB, chunk).expect("write");
    }
    c.flush().expect("flush");
    c.disconnect().expect("disconnect");
}

fn assert_reads(env: &Env, vol: &str, off: u64, want: &[u8]) {
    let mut c = env.nbd_connect(vol).expect("connect");
    for (i, w) in want.chunks(MIB as usize).enumerate() {
        let o = off + i as u64 * MIB;
        let got = c.read(o, w.len() as u32).expect("read");
        if got != w {
            let at = got.iter().zip(w).position(|(a, b)| a != b).unwrap_or(0);
            panic!("{vol}: byte {} differs", o + at as u64);
        }
    }
    c.disconnect().expect("disconnect");
}

fn alloc(env: &Env) -> u64 {
    env.ok(&["pool", "list", "-Hp", "-o", "alloc", "tank"])
        .trim()
        .parse()
        .unwrap()
}

fn get(env: &Env, prop: &str, ds: &str) -> String {
    env.ok(&["dataset", "get", "-H", "-p", "-o", "value", prop, ds])
        .trim()
        .to_string()
}

/// A sparse 64 MiB volume `vol` with `compression=setting`.
fn create(env: &Env, vol: &str, setting: &str) {
    env.ok(&[
        "dataset",
        "create",
        "-s",
        "-V",
        "64M",
        "-o",
        &format!("compression={setting}"),
        vol,
    ]);
}

fn ratio(s: &str) -> f64 {
    s.trim_end_matches('x')
        .parse()
        .unwrap_or_else(|_| panic!("ratio {s:?}"))
}

#[test]
fn every_setting_reads_back_and_saves_space_on_compressible_data() {
    let env = Env::new();
    pool(&env);
    let mut d = env.serve();
    let data = half_compressible((32 * MIB) as usize, 0xc0);
    let mut allocs = Vec::new();
    for (i, setting) in ["off", "lz4", "on", "zstd", "zstd-1", "zstd-fast"]
        .iter()
        .enumerate()
    {
        let vol = format!("tank/v{i}");
        let before = alloc(&env);
        create(&env, &vol, setting);
        write(&env, &vol, 0, &data);
        assert_reads(&env, &vol, 0, &data);
        let grown = alloc(&env) - before;
        let r = ratio(&get(&env, "compressratio", &vol));
        allocs.push((setting, grown, r));
        let shown = get(&env, "compression", &vol);
        let want = match *setting {
            "on" => "lz4",
            "zstd" => "zstd-3",
            "zstd-fast" => "zstd-fast-1",
            s => s,
        };
        assert_eq!(shown, want);
    }
    let off = allocs[0].1;
    assert_eq!(allocs[0].2, 1.0, "{allocs:?}");
    for &(s, grown, r) in &allocs[1..] {
        assert!(
            grown * 10 < off * 8,
            "{s}: half-compressible data takes clearly less room than off: {allocs:?}"
        );
        assert!(r >= 1.3, "{s}: compressratio {r}: {allocs:?}");
        // The ratio says what alloc shows (within 5 %).
        let seen = off as f64 / grown as f64;
        assert!(
            (seen / r - 1.0).abs() < 0.05,
            "{s}: compressratio {r} vs alloc ratio {seen:.2}: {allocs:?}"
        );
    }
    // After a restart every volume still reads back.
    d.stop();
    let mut d = env.serve();
    for i in 0..allocs.len() {
        assert_reads(&env, &format!("tank/v{i}"), 0, &data);
    }
    d.assert_alive();
}

#[test]
fn random_data_is_stored_plain_at_the_same_cost_as_off() {
    let env = Env::new();
    pool(&env);
    let mut d = env.serve();
    let data = random_bytes((32 * MIB) as usize, 0xc1);
    let mut grown = Vec::new();
    for (i, setting) in ["off", "lz4", "zstd"].iter().enumerate() {
        let vol = format!("tank/r{i}");
        let before = alloc(&env);
        create(&env, &vol, setting);
        write(&env, &vol, 0, &data);
        assert_reads(&env, &vol, 0, &data);
        grown.push(alloc(&env) - before);
        assert_eq!(get(&env, "compressratio", &vol), "1.00x", "{setting}");
    }
    for g in &grown[1..] {
        assert!(
            g.abs_diff(grown[0]) * 100 <= grown[0],
            "random data costs what it costs with compression off: {grown:?}"
        );
    }
    d.assert_alive();
}

#[test]
fn changing_compression_keeps_both_kinds_of_blocks_readable() {
    let env = Env::new();
    pool(&env);
    let mut d = env.serve();
    env.ok(&["dataset", "create", "-V", "64M", "tank/vol"]);
    assert_eq!(get(&env, "compression", "tank/vol"), "off");
    let first = half_compressible((16 * MIB) as usize, 0xc2);
    write(&env, "tank/vol", 0, &first);
    env.ok(&["dataset", "set", "compression=zstd-9", "tank/vol"]);
    let second = half_compressible((16 * MIB) as usize, 0xc3);
    write(&env, "tank/vol", 16 * MIB, &second);
    env.ok(&["dataset", "set", "compression=lz4", "tank/vol"]);
    // Overwrite part of the first half (a mix of old plain and new lz4 blocks).
    let third = half_compressible((4 * MIB) as usize, 0xc4);
    write(&env, "tank/vol", 2 * MIB, &third);
    let mut model = first.clone();
    model.extend_from_slice(&second);
    model[(2 * MIB) as usize..(6 * MIB) as usize].copy_from_slice(&third);
    assert_reads(&env, "tank/vol", 0, &model);
    // A snapshot and a clone read the same; the clone inherits the setting.
    env.ok(&["dataset", "snapshot", "tank/vol@s"]);
    env.ok(&["dataset", "clone", "tank/vol@s", "tank/c"]);
    assert_eq!(get(&env, "compression", "tank/c"), "lz4");
    assert_reads(&env, "tank/c", 0, &model);
    d.stop();
    let mut d = env.serve();
    assert_reads(&env, "tank/vol", 0, &model);
    assert_reads(&env, "tank/vol@s", 0, &model);
    d.assert_alive();
}

#[test]
fn scrub_repairs_a_damaged_compressed_block_from_its_mirror() {
    let env = Env::new();
    pool(&env);
    let mut d = env.serve();
    env.ok(&[
        "dataset",
        "create",
        "-V",
        "64M",
        "-o",
        "compression=lz4",
        "tank/vol",
    ]);
    let data = half_compressible((48 * MIB) as usize, 0xc5);
    write(&env, "tank/vol", 0, &data);
    d.stop();
    // Garbage over a region of a's data area.
    scribble(&env.path("a"), 8 * MIB, 8 * MIB, None, 0xc6);
    let mut d = env.serve();
    env.ok(&["pool", "scrub", "-w", "tank"]);
    let st = env.status_json("tank");
    let scan = &st["scan_stats"];
    assert_eq!(scan["errors"], "0", "{st:#}");
    let repaired: u64 = scan["processed"].as_str().unwrap().parse().unwrap();
    assert!(repaired > 0, "the damage is repaired: {st:#}");
    env.ok(&["pool", "offline", "tank", "b"]);
    assert_reads(&env, "tank/vol", 0, &data);
    d.assert_alive();
}

#[test]
fn bad_compression_values_are_refused() {
    let env = Env::new();
    pool(&env);
    for bad in ["gzip", "zstd-0", "zstd-20", "zstd-fast-11", "LZ4", ""] {
        let e = env.fail(&[
            "dataset",
            "create",
            "-V",
            "8M",
            "-o",
            &format!("compression={bad}"),
            "tank/x",
        ]);
        assert!(e.contains("compression"), "{bad}: {e}");
    }
    let names = env.ok(&["dataset", "list", "-H", "-o", "name"]);
    assert!(!names.contains("tank/x"), "nothing was created: {names}");
    env.ok(&["dataset", "create", "-V", "8M", "tank/v"]);
    let e = env.fail(&["dataset", "set", "compression=brotli", "tank/v"]);
    assert!(e.contains("compression"), "{e}");
    assert_eq!(get(&env, "compression", "tank/v"), "off");
    let e = env.fail(&["dataset", "set", "compressratio=2", "tank/v"]);
    assert!(e.contains("readonly"), "{e}");
}

/// Small writes (4 KiB into 16 KiB blocks) become blocks the commit writes: those are compressed
/// too, and read back.
#[test]
fn blocks_written_by_small_writes_are_compressed_too() {
    let env = Env::new();
    pool(&env);
    let mut d = env.serve();
    create(&env, "tank/small", "zstd");
    let data = half_compressible((8 * MIB) as usize, 0xc7);
    let mut c = env.nbd_connect("tank/small").expect("connect");
    for (i, chunk) in data.chunks(4096).enumerate() {
        c.write(i as u64 * 4096, chunk).expect("write");
    }
    c.flush().expect("flush");
    c.disconnect().expect("disconnect");
    assert_reads(&env, "tank/small", 0, &data);
    let r = ratio(&get(&env, "compressratio", "tank/small"));
    assert!(r >= 1.3, "compressratio {r}");
    d.stop();
    let mut d = env.serve();
    assert_reads(&env, "tank/small", 0, &data);
    d.assert_alive();
}
