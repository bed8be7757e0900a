//! End-to-end tests of snapshots, clones, rollback, destroy (ranges, lists, dry runs), holds and their
//! space figures, with the real binary and real clients: qemu-io, nbdcopy, nbdinfo, and the fixture's
//! raw NBD client where qemu will not go (writes to a read-only export).
//!
//! Every test runs in its own temporary directory with its own state directory and, unless it says
//! otherwise, its own daemon (see `cairn_tests::Env::serve`). The pool is `tank`, a mirror of two sparse
//! 256 MiB leaves, and the volumes are 8 MiB with the default 16 KiB blocks, so every test stays small.
//!
//! The clients come from the Debian packages qemu-utils and libnbd-bin; a test whose client is missing
//! fails and says which package to install (CI installs them all).

use cairn_tests::{nbd_proto, random_bytes, Daemon, Env, NbdClient, NbdError, MIB};

/// Size of every volume the tests create.
const VOL_SIZE: u64 = 8 * MIB;
/// NBD's EPERM.
const EPERM: u32 = 1;

// ---------------------------------------------------------------------------------------------------
// Setup and helpers
// ---------------------------------------------------------------------------------------------------

/// Creates the pool `tank`: a mirror of two sparse 256 MiB files.
fn make_pool(env: &Env) {
    let l = env.leaves(&["a", "b"]);
    env.ok(&[
        "pool", "create", "--size", "256M", "tank", "mirror", &l[0], &l[1],
    ]);
}

/// `dataset create -V 8M [EXTRA...] NAME`.
fn volume(env: &Env, name: &str, extra: &[&str]) {
    let size = VOL_SIZE.to_string();
    let mut a = vec!["dataset", "create", "-V", &size];
    a.extend_from_slice(extra);
    a.push(name);
    env.ok(&a);
}

/// The pool `tank` with 8 MiB volumes `vols`, and a daemon serving them.
fn setup(vols: &[&str]) -> (Env, Daemon) {
    let env = Env::new();
    make_pool(&env);
    for v in vols {
        volume(&env, v, &[]);
    }
    let d = env.serve();
    (env, d)
}

/// qemu-io commands on `export`, opened read-write; all must succeed.
fn qio(env: &Env, export: &str, cmds: &[&str]) -> String {
    env.qemu_io_ok(&[], &env.nbd_uri(export), cmds)
}

/// qemu-io commands on `export`, opened read-only (`-r`); all must succeed.
fn qio_ro(env: &Env, export: &str, cmds: &[&str]) -> String {
    env.qemu_io_ok(&["-r"], &env.nbd_uri(export), cmds)
}

/// The whole of `export`, copied out with nbdcopy into a file of the temporary directory.
fn copy_out(env: &Env, export: &str) -> Vec<u8> {
    let file = format!("out-{}.raw", export.replace(['/', '@'], "_"));
    let path = env.path(&file);
    let _ = std::fs::remove_file(&path);
    env.tool_ok("nbdcopy", &[&env.nbd_uri(export), &env.p(&file)]);
    std::fs::read(&path).expect("read nbdcopy's output")
}

/// Copies `data` into `export` with nbdcopy (`--flush`: durable when it returns).
fn copy_in(env: &Env, export: &str, data: &[u8], file: &str) {
    std::fs::write(env.path(file), data).expect("write the input image");
    env.tool_ok("nbdcopy", &["--flush", &env.p(file), &env.nbd_uri(export)]);
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

/// What a volume or snapshot should hold: `write -P` patterns and discards over zeros.
#[derive(Clone)]
struct Image(Vec<u8>);

impl Image {
    fn new() -> Image {
        Image(vec![0; VOL_SIZE as usize])
    }

    /// Records `write -P byte off len` and returns that qemu-io command.
    fn write(&mut self, off: u64, len: u64, byte: u8) -> String {
        self.0[off as usize..(off + len) as usize].fill(byte);
        format!("write -P {byte:#04x} {off} {len}")
    }

    /// Records a discard (which reads back as zeros) and returns that qemu-io command.
    fn discard(&mut self, off: u64, len: u64) -> String {
        self.0[off as usize..(off + len) as usize].fill(0);
        format!("discard {off} {len}")
    }

    /// `read -P` commands that check every byte of the image: one per run of equal bytes.
    fn reads(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < self.0.len() {
            let b = self.0[start];
            let end = self.0[start..]
                .iter()
                .position(|&x| x != b)
                .map_or(self.0.len(), |n| start + n);
            out.push(format!("read -P {b:#04x} {start} {}", end - start));
            start = end;
        }
        out
    }
}

/// Writes `cmds` (qemu-io write/discard commands from an [`Image`]) to `export`.
fn apply(env: &Env, export: &str, cmds: &[String]) {
    let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qio(env, export, &c);
}

/// `export` holds exactly `img`: checked with `qemu-io -r` (`read -P` of every run) and with an
/// nbdcopy of the whole export.
fn check(env: &Env, export: &str, img: &Image) {
    let reads = img.reads();
    let c: Vec<&str> = reads.iter().map(String::as_str).collect();
    qio_ro(env, export, &c);
    assert_same(
        &format!("nbdcopy of {export}"),
        &copy_out(env, export),
        &img.0,
    );
}

/// `dataset get -Hp -o value PROP NAME`.
fn prop(env: &Env, name: &str, prop: &str) -> String {
    env.ok(&["dataset", "get", "-Hp", "-o", "value", prop, name])
        .trim_end_matches('\n')
        .to_string()
}

/// A numeric property (`dataset get -Hp`).
fn num(env: &Env, name: &str, p: &str) -> u64 {
    let v = prop(env, name, p);
    v.parse()
        .unwrap_or_else(|e| panic!("{name} {p} = {v:?} is not a number: {e}"))
}

/// The snapshots of volume `vol`, oldest first (`dataset list -t snapshot -H -o name VOL`).
fn snaps(env: &Env, vol: &str) -> Vec<String> {
    lines(&env.ok(&["dataset", "list", "-t", "snapshot", "-H", "-o", "name", vol]))
}

/// Every volume and snapshot (`dataset list -t all -H -o name`).
fn names(env: &Env) -> Vec<String> {
    lines(&env.ok(&["dataset", "list", "-t", "all", "-H", "-o", "name"]))
}

fn lines(s: &str) -> Vec<String> {
    s.lines()
        .filter(|l| !l.is_empty() && *l != "no datasets available")
        .map(str::to_string)
        .collect()
}

/// What a command that fails must leave as it was: every volume and snapshot with its figures and
/// links.
fn listing(env: &Env) -> String {
    env.ok(&[
        "dataset",
        "list",
        "-t",
        "all",
        "-Hp",
        "-o",
        "name,guid,used,referenced,written,volsize,createtxg,userrefs,origin,clones",
    ])
}

/// The pool's allocated bytes (`pool list -Hp -o alloc tank`).
fn alloc(env: &Env) -> u64 {
    let s = env.ok(&["pool", "list", "-Hp", "-o", "alloc", "tank"]);
    s.trim()
        .parse()
        .unwrap_or_else(|e| panic!("bad alloc {s:?}: {e}"))
}

/// The export names of `nbdinfo --list`, sorted, with whether each is read-only.
fn exports(env: &Env) -> Vec<(String, bool)> {
    let out = env.tool_ok("nbdinfo", &["--list", &env.nbd_uri("")]);
    let mut v: Vec<(String, bool)> = Vec::new();
    for l in out.lines() {
        if let Some(n) = l
            .strip_prefix("export=\"")
            .and_then(|r| r.strip_suffix("\":"))
        {
            v.push((n.to_string(), false));
        } else if l.trim() == "is_read_only: true" {
            v.last_mut()
                .unwrap_or_else(|| panic!("is_read_only before any export:\n{out}"))
                .1 = true;
        }
    }
    v.sort();
    v
}

/// The export names of `nbdinfo --list`, sorted.
fn export_names(env: &Env) -> Vec<String> {
    exports(env).into_iter().map(|(n, _)| n).collect()
}

/// A command that must fail with exit 1 and `cannot VERB 'NAME': REASON`; returns the reason.
fn refused(env: &Env, args: &[&str], verb: &str, name: &str) -> String {
    let o = env.run(args);
    let prefix = format!("cannot {verb} '{name}': ");
    assert!(
        o.code == 1 && o.stderr.starts_with(&prefix),
        "`cairn {}` should fail with exit 1 and {prefix:?}...; it exited {}:\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        o.code,
        o.stdout,
        o.stderr
    );
    o.stderr[prefix.len()..].trim_end().to_string()
}

/// Asserts that `reason` contains every one of `parts`.
fn says(reason: &str, parts: &[&str]) {
    for p in parts {
        assert!(
            reason.contains(p),
            "the reason should mention {p:?}; it is:\n{reason}"
        );
    }
}

/// The tags of a snapshot's holds (`dataset holds -H`: name, tag, time), checking that every line
/// names the snapshot.
fn hold_tags(env: &Env, snap: &str) -> Vec<String> {
    let out = env.ok(&["dataset", "holds", "-H", snap]);
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert!(f.len() == 3 && f[0] == snap, "bad `holds -H` line {l:?}");
            f[1].to_string()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// Snapshot exports
// ---------------------------------------------------------------------------------------------------

/// A snapshot's export reads the bytes the volume held when it was taken, whatever the volume does
/// afterwards (overwrites, discards, writes past the old data), with qemu-io and nbdcopy alike.
#[test]
fn snapshot_export_reads_the_old_bytes() {
    let (env, mut d) = setup(&["tank/vol"]);
    let mut img = Image::new();
    let w = [
        img.write(0, 4 * MIB, 0xa1),
        img.write(4 * MIB, 2 * MIB, 0xa2),
        img.write(100_000, 5_000, 0xa3), // a partial block
    ];
    apply(&env, "tank/vol", &w);
    let out = env.ok(&["dataset", "snapshot", "tank/vol@before"]);
    assert_eq!(out, "", "snapshot prints nothing");
    let old = img.clone();

    let w = [
        img.write(MIB, 2 * MIB, 0xb1),
        img.discard(4 * MIB, MIB),
        img.write(7 * MIB, MIB, 0xb2),
        img.write(100_500, 100, 0xb3),
    ];
    apply(&env, "tank/vol", &w);

    check(&env, "tank/vol@before", &old);
    check(&env, "tank/vol", &img);

    // The export is the snapshot's size and flagged read-only.
    let c = env.nbd_connect("tank/vol@before").expect("connect");
    assert_eq!(c.size(), VOL_SIZE);
    assert!(c.transmission_flags() & nbd_proto::TF_READ_ONLY != 0);
    c.disconnect().expect("disconnect");

    // A second snapshot holds the second state; the first still the first.
    env.ok(&["dataset", "snapshot", "tank/vol@after"]);
    let after = img.clone();
    let w = [img.write(0, VOL_SIZE, 0xc1)];
    apply(&env, "tank/vol", &w);
    check(&env, "tank/vol@before", &old);
    check(&env, "tank/vol@after", &after);
    check(&env, "tank/vol", &img);
    d.assert_alive();
}

/// Writes, trims and write-zeroes to a snapshot's export answer EPERM; reads keep working on the same
/// connection, the snapshot is unchanged, and qemu refuses to open it read-write.
#[test]
fn writes_to_a_snapshot_export_answer_eperm_and_it_stays_usable() {
    let (env, mut d) = setup(&["tank/vol"]);
    qio(&env, "tank/vol", &["write -P 0x5a 0 1M"]);
    env.ok(&["dataset", "snapshot", "tank/vol@s"]);

    // qemu sees the read-only flag and will not open it for writing.
    let o = env.qemu_io(&[], &env.nbd_uri("tank/vol@s"), &["write -P 0x01 0 4k"]);
    let all = format!("{}{}", o.stdout, o.stderr);
    assert!(
        o.code != 0 || all.contains("failed") || all.contains("can't open"),
        "qemu-io wrote to a snapshot:\n{all}"
    );

    let mut c = env.nbd_connect("tank/vol@s").expect("connect");
    assert!(c.transmission_flags() & nbd_proto::TF_READ_ONLY != 0);
    let eperm = |r: Result<(), NbdError>, what: &str| match r {
        Err(NbdError::Server(e)) => assert_eq!(e, EPERM, "{what}: want EPERM"),
        other => panic!("{what} on a snapshot: want EPERM, got {other:?}"),
    };
    eperm(c.write(0, &[1u8; 4096]), "WRITE");
    assert_eq!(c.read(0, 4096).expect("read after WRITE"), vec![0x5a; 4096]);
    eperm(c.write_fua(8192, &[2u8; 8192]), "WRITE+FUA");
    eperm(c.trim(0, 65536), "TRIM");
    eperm(c.write_zeroes(0, 65536), "WRITE_ZEROES");
    assert_eq!(
        c.read(0, 65536).expect("read after TRIM"),
        vec![0x5a; 65536]
    );
    c.flush().expect("FLUSH of a read-only export");
    eperm(c.write(MIB, &[3u8; 512]), "WRITE past the data");
    assert_eq!(c.read(MIB, 512).expect("read"), vec![0; 512]);
    c.disconnect().expect("the connection is still in step");

    d.assert_alive();
    qio_ro(
        &env,
        "tank/vol@s",
        &["read -P 0x5a 0 1M", "read -P 0 1M 7M"],
    );
    // The volume itself is still writable.
    qio(
        &env,
        "tank/vol",
        &["write -P 0x5b 0 4k", "read -P 0x5b 0 4k"],
    );
    qio_ro(&env, "tank/vol@s", &["read -P 0x5a 0 4k"]);
}

/// `nbdinfo --list` shows every snapshot as a read-only export next to the volumes; a destroyed or
/// renamed snapshot's export goes (or follows the new name).
#[test]
fn nbdinfo_lists_snapshot_exports() {
    let (env, _d) = setup(&["tank/vol", "tank/v2"]);
    qio(&env, "tank/vol", &["write -P 0x21 0 64k"]);
    env.ok(&["dataset", "snapshot", "tank/vol@a", "tank/v2@a"]);
    env.ok(&["dataset", "snapshot", "tank/vol@b"]);
    assert_eq!(
        exports(&env),
        [
            ("tank/v2".to_string(), false),
            ("tank/v2@a".to_string(), true),
            ("tank/vol".to_string(), false),
            ("tank/vol@a".to_string(), true),
            ("tank/vol@b".to_string(), true),
        ]
    );

    env.ok(&["dataset", "destroy", "tank/vol@a"]);
    env.ok(&["dataset", "rename", "tank/vol@b", "tank/vol@c"]);
    assert_eq!(
        export_names(&env),
        ["tank/v2", "tank/v2@a", "tank/vol", "tank/vol@c"]
    );
    qio_ro(&env, "tank/vol@c", &["read -P 0x21 0 64k"]);
    let e = NbdClient::connect(&env.nbd_socket(), "tank/vol@b");
    assert!(
        e.is_err(),
        "the old name of a renamed snapshot is no export"
    );
}

// ---------------------------------------------------------------------------------------------------
// Clones
// ---------------------------------------------------------------------------------------------------

/// A clone starts as its origin snapshot's image; afterwards neither the clone's writes show in the
/// origin (volume or snapshot) nor the origin's in the clone, down a clone of a clone too. `origin`
/// and `clones` name each other; `-o` sets properties of the new clone.
#[test]
fn clone_and_origin_never_see_each_others_writes() {
    let (env, mut d) = setup(&["tank/vol"]);
    let mut base = Image::new();
    apply(
        &env,
        "tank/vol",
        &[base.write(0, 4 * MIB, 0x10), base.write(6 * MIB, MIB, 0x11)],
    );
    env.ok(&["dataset", "snapshot", "tank/vol@base"]);
    env.ok(&[
        "dataset",
        "clone",
        "-o",
        "test:role=clone",
        "tank/vol@base",
        "tank/clone",
    ]);
    check(&env, "tank/clone", &base);

    let mut clone = base.clone();
    let mut origin = base.clone();
    apply(
        &env,
        "tank/clone",
        &[clone.write(0, MIB, 0xc1), clone.discard(6 * MIB, MIB)],
    );
    apply(
        &env,
        "tank/vol",
        &[
            origin.write(2 * MIB, MIB, 0x0a),
            origin.write(7 * MIB, MIB, 0x0b),
        ],
    );
    check(&env, "tank/vol", &origin);
    check(&env, "tank/vol@base", &base);
    check(&env, "tank/clone", &clone);

    // The links, both ways.
    assert_eq!(prop(&env, "tank/clone", "origin"), "tank/vol@base");
    assert_eq!(prop(&env, "tank/vol", "origin"), "-");
    assert_eq!(prop(&env, "tank/vol@base", "clones"), "tank/clone");
    assert_eq!(prop(&env, "tank/clone", "test:role"), "clone");
    assert_eq!(num(&env, "tank/clone", "volsize"), VOL_SIZE);

    // A clone of a clone, and a second clone of the same snapshot.
    env.ok(&["dataset", "snapshot", "tank/clone@s"]);
    env.ok(&["dataset", "clone", "tank/clone@s", "tank/grand"]);
    env.ok(&["dataset", "clone", "tank/vol@base", "tank/clone2"]);
    assert_eq!(prop(&env, "tank/grand", "origin"), "tank/clone@s");
    assert_eq!(
        prop(&env, "tank/vol@base", "clones"),
        "tank/clone,tank/clone2"
    );
    assert_eq!(prop(&env, "tank/clone@s", "clones"), "tank/grand");
    let mut grand = clone.clone();
    apply(&env, "tank/grand", &[grand.write(3 * MIB, 2 * MIB, 0x9a)]);
    apply(&env, "tank/clone", &[clone.write(4 * MIB, MIB, 0xc2)]);
    check(&env, "tank/grand", &grand);
    check(&env, "tank/clone", &clone);
    check(&env, "tank/clone2", &base);
    check(&env, "tank/vol", &origin);
    assert!(export_names(&env).contains(&"tank/grand".to_string()));

    // A clone without snapshots is destroyed on its own; the origin forgets it.
    env.ok(&["dataset", "destroy", "tank/clone2"]);
    assert_eq!(prop(&env, "tank/vol@base", "clones"), "tank/clone");
    check(&env, "tank/vol@base", &base);
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// Rollback
// ---------------------------------------------------------------------------------------------------

/// Rollback makes the volume the snapshot's image byte for byte: random data written with nbdcopy,
/// snapshot, overwrites, discards and a partial-block write, rollback, and an nbdcopy of the volume
/// equals the input file. Rolling back again later works the same, and the snapshot stays.
#[test]
fn rollback_returns_the_image_byte_for_byte() {
    let (env, _d) = setup(&["tank/vol"]);
    let data = random_bytes(VOL_SIZE as usize, 0x5eed);
    copy_in(&env, "tank/vol", &data, "in.raw");
    env.ok(&["dataset", "snapshot", "tank/vol@s"]);
    qio(
        &env,
        "tank/vol",
        &[
            "write -P 0xee 1M 3M",
            "discard 5M 1M",
            "write -P 0xef 7340000 5000",
        ],
    );
    assert_ne!(copy_out(&env, "tank/vol"), data, "the overwrites took");

    env.ok(&["dataset", "rollback", "tank/vol@s"]);
    let got = copy_out(&env, "tank/vol");
    let input = std::fs::read(env.path("in.raw")).expect("read in.raw");
    assert_same("the volume after rollback vs in.raw", &got, &input);
    assert_eq!(snaps(&env, "tank/vol"), ["tank/vol@s"]);
    assert_eq!(num(&env, "tank/vol", "written"), 0);

    // Again: writes, then back.
    qio(&env, "tank/vol", &["write -P 0x44 0 8M"]);
    env.ok(&["dataset", "rollback", "tank/vol@s"]);
    assert_same(
        "the volume after the second rollback",
        &copy_out(&env, "tank/vol"),
        &input,
    );
    assert_same("the snapshot", &copy_out(&env, "tank/vol@s"), &input);
}

/// Rollback to a snapshot that is not the newest is refused without `-r`, naming the later snapshots,
/// and changes nothing; `-r` destroys them; a later snapshot's clone needs `-R`, which destroys it too.
#[test]
fn rollback_to_an_older_snapshot_needs_r() {
    let (env, _d) = setup(&["tank/vol"]);
    for (i, s) in ["a", "b", "c"].iter().enumerate() {
        qio(&env, "tank/vol", &[&format!("write -P {} 0 1M", i + 1)]);
        env.ok(&["dataset", "snapshot", &format!("tank/vol@{s}")]);
    }
    qio(&env, "tank/vol", &["write -P 4 0 1M"]);
    env.ok(&["dataset", "clone", "tank/vol@c", "tank/cc"]);
    let before = listing(&env);

    let r = refused(
        &env,
        &["dataset", "rollback", "tank/vol@a"],
        "rollback to",
        "tank/vol@a",
    );
    says(
        &r,
        &["more recent snapshots", "-r", "tank/vol@b", "tank/vol@c"],
    );
    assert_eq!(listing(&env), before);
    qio_ro(&env, "tank/vol", &["read -P 4 0 1M"]);

    // -r: the later snapshots would go, but one has a clone: -R is needed, and the clone named.
    let r = refused(
        &env,
        &["dataset", "rollback", "-r", "tank/vol@a"],
        "rollback to",
        "tank/vol@a",
    );
    says(&r, &["tank/cc", "-R"]);
    assert_eq!(listing(&env), before);

    // Rolling back to b with -r destroys c (after -R its clone); then to a with -r destroys b.
    let out = env.ok(&["dataset", "rollback", "-R", "tank/vol@b"]);
    says(&out, &["tank/vol@c", "tank/cc"]);
    assert_eq!(names(&env), ["tank/vol", "tank/vol@a", "tank/vol@b"]);
    qio_ro(&env, "tank/vol", &["read -P 2 0 1M", "read -P 0 1M 7M"]);

    let out = env.ok(&["dataset", "rollback", "-r", "tank/vol@a"]);
    says(&out, &["tank/vol@b"]);
    assert_eq!(names(&env), ["tank/vol", "tank/vol@a"]);
    qio_ro(&env, "tank/vol", &["read -P 1 0 1M", "read -P 0 1M 7M"]);
    assert_eq!(export_names(&env), ["tank/vol", "tank/vol@a"]);
}

/// A client connected to the volume during a rollback sees the snapshot's contents at its next
/// request (acknowledged writes since the snapshot are gone, flushed or not), and can go on writing.
#[test]
fn a_connected_client_sees_the_rollback_at_its_next_request() {
    let (env, mut d) = setup(&["tank/vol"]);
    qio(&env, "tank/vol", &["write -P 0x31 0 2M"]);
    env.ok(&["dataset", "snapshot", "tank/vol@s"]);

    let mut c = env.nbd_connect("tank/vol").expect("connect");
    c.write(0, &[0x32; 65536]).expect("write");
    c.flush().expect("flush");
    c.write(3 * MIB, &[0x33; 4096]).expect("write, not flushed");
    assert_eq!(c.read(0, 65536).expect("read"), vec![0x32; 65536]);

    env.ok(&["dataset", "rollback", "tank/vol@s"]);
    assert_eq!(
        c.read(0, 65536).expect("read after the rollback"),
        vec![0x31; 65536]
    );
    assert_eq!(c.read(3 * MIB, 4096).expect("read"), vec![0; 4096]);
    assert_eq!(c.size(), VOL_SIZE);

    c.write(0, &[0x34; 4096]).expect("write after the rollback");
    c.flush().expect("flush");
    assert_eq!(c.read(0, 4096).expect("read"), vec![0x34; 4096]);
    c.disconnect().expect("disconnect");
    d.assert_alive();

    qio_ro(
        &env,
        "tank/vol",
        &[
            "read -P 0x34 0 4k",
            "read -P 0x31 4k 2044k",
            "read -P 0 2M 6M",
        ],
    );
    qio_ro(
        &env,
        "tank/vol@s",
        &["read -P 0x31 0 2M", "read -P 0 2M 6M"],
    );
}

// ---------------------------------------------------------------------------------------------------
// Destroy and space
// ---------------------------------------------------------------------------------------------------

/// Destroying a middle snapshot frees what its `used` said, measured by the pool's `alloc`.
///
/// The history: 4 MiB written, s1; 1 MiB of it overwritten, s2; 2 MiB overwritten, s3. s2 alone holds
/// the 1 MiB written between s1 and s2 (s1 and s3 do not), and shares the rest with s1 or s3, so its
/// `used` is that 1 MiB plus the indirect blocks over it that only s2 has.
///
/// Destroying it frees exactly those blocks, and in the same command the deadlist object that listed
/// them (fewer than 128 entries of 128 bytes: one 16 KiB MOS block in its two copies, 32 KiB). The other
/// metadata the command changes (the registry and the snapshot table, rewritten a little smaller, the
/// history, which gains a record but stays inside its first 16 KiB block in this test, the MOS dnode
/// blocks) is rewritten copy-on-write at the same allocated size. So alloc falls by `used` + 32 KiB;
/// the test allows `used` to `used` + 64 KiB (one more MOS block in both copies either way).
#[test]
fn destroying_a_middle_snapshot_frees_exactly_its_used() {
    let (env, mut d) = setup(&["tank/vol"]);
    let mut img = Image::new();
    apply(&env, "tank/vol", &[img.write(0, 4 * MIB, 0x01)]);
    env.ok(&["dataset", "snapshot", "tank/vol@s1"]);
    let s1 = img.clone();
    apply(&env, "tank/vol", &[img.write(0, MIB, 0x02)]);
    env.ok(&["dataset", "snapshot", "tank/vol@s2"]);
    let s2 = img.clone();
    apply(&env, "tank/vol", &[img.write(0, 2 * MIB, 0x03)]);
    env.ok(&["dataset", "snapshot", "tank/vol@s3"]);
    let s3 = img.clone();
    apply(&env, "tank/vol", &[img.write(3 * MIB, MIB, 0x04)]);

    let used = num(&env, "tank/vol@s2", "used");
    assert!(
        (MIB..MIB + 256 * 1024).contains(&used),
        "s2 alone holds 1 MiB of data (and the indirect blocks above it): used = {used}"
    );
    let s1_used = num(&env, "tank/vol@s1", "used");

    // A dry run says what would go and frees nothing.
    let before = alloc(&env);
    let list = listing(&env);
    let out = env.ok(&["dataset", "destroy", "-n", "-v", "tank/vol@s2"]);
    let out: Vec<&str> = out.lines().collect();
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[0], "would destroy tank/vol@s2");
    assert!(out[1].starts_with("would reclaim "), "{out:?}");
    assert_eq!(alloc(&env), before, "destroy -n changed the pool's alloc");
    assert_eq!(listing(&env), list);

    env.ok(&["dataset", "destroy", "tank/vol@s2"]);
    let after = alloc(&env);
    let freed = before.saturating_sub(after);
    assert!(
        (used..=used + 64 * 1024).contains(&freed),
        "destroying tank/vol@s2 (used {used}) freed {freed} bytes (alloc {before} -> {after}); \
         expected used + 32 KiB for its deadlist block"
    );

    // s1 now alone holds what it shared with s2 only: the first 1 MiB it had.
    let s1_after = num(&env, "tank/vol@s1", "used");
    assert!(
        s1_after >= s1_used + MIB,
        "s1's used should grow by the 1 MiB it shared with s2 only: {s1_used} -> {s1_after}"
    );
    assert_eq!(snaps(&env, "tank/vol"), ["tank/vol@s1", "tank/vol@s3"]);
    check(&env, "tank/vol@s1", &s1);
    check(&env, "tank/vol@s3", &s3);
    check(&env, "tank/vol", &img);
    let _ = s2;

    // Destroying the newest snapshot frees what its used said too.
    let used3 = num(&env, "tank/vol@s3", "used");
    let before = alloc(&env);
    env.ok(&["dataset", "destroy", "tank/vol@s3"]);
    let freed = before.saturating_sub(alloc(&env));
    assert!(
        (used3..=used3 + 64 * 1024).contains(&freed),
        "destroying tank/vol@s3 (used {used3}) freed {freed} bytes"
    );
    check(&env, "tank/vol@s1", &s1);
    check(&env, "tank/vol", &img);
    d.assert_alive();
}

/// Everything destroyed gives the pool back its space: after `destroy -r` of a volume with snapshots
/// and a clone's worth of writes, `alloc` is back to what it was before anything was written (plus at
/// most one MOS block in two copies for the history's growth).
#[test]
fn destroying_everything_gives_the_space_back() {
    let env = Env::new();
    make_pool(&env);
    volume(&env, "tank/vol", &["-s"]);
    let _d = env.serve();
    let empty = alloc(&env);
    qio(&env, "tank/vol", &["write -P 1 0 4M"]);
    env.ok(&["dataset", "snapshot", "tank/vol@a"]);
    qio(&env, "tank/vol", &["write -P 2 1M 2M"]);
    env.ok(&["dataset", "snapshot", "tank/vol@b"]);
    env.ok(&["dataset", "clone", "tank/vol@a", "tank/c"]);
    qio(&env, "tank/c", &["write -P 3 2M 4M"]);
    qio(&env, "tank/vol", &["write -P 4 0 8M"]);
    assert!(alloc(&env) > empty + 8 * MIB);

    env.ok(&["dataset", "destroy", "tank/c"]);
    env.ok(&["dataset", "destroy", "-r", "tank/vol"]);
    assert!(names(&env).is_empty(), "{:?}", names(&env));
    let end = alloc(&env);
    assert!(
        end <= empty + 32 * 1024,
        "alloc {empty} before the writes, {end} after destroying everything: leaked {}",
        end.saturating_sub(empty)
    );
}

/// `destroy -n -v` of ranges (`a%c`, open ends) and comma lists prints what would go and changes
/// nothing; the real destroys take exactly those snapshots; a list naming a missing snapshot destroys
/// none of it.
#[test]
fn destroy_dry_runs_ranges_and_lists() {
    let (env, _d) = setup(&["tank/vol"]);
    let mut img = Image::new();
    let mut at = Vec::new();
    for (i, s) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        let i = i as u64;
        apply(&env, "tank/vol", &[img.write(i * MIB, MIB, 0x40 + i as u8)]);
        env.ok(&["dataset", "snapshot", &format!("tank/vol@{s}")]);
        at.push(img.clone());
    }
    let before = listing(&env);
    let space = alloc(&env);

    let dry = |spec: &str, flags: &[&str]| -> Vec<String> {
        let name = format!("tank/vol{spec}");
        let mut a = vec!["dataset", "destroy", "-n", "-v"];
        a.extend_from_slice(flags);
        a.push(&name);
        let out = env.ok(&a);
        let mut l = lines(&out);
        let last = l.pop().unwrap_or_default();
        assert!(last.starts_with("would reclaim "), "{out}");
        l
    };
    let would = |names: &[&str]| -> Vec<String> {
        names
            .iter()
            .map(|n| format!("would destroy tank/vol{n}"))
            .collect()
    };
    assert_eq!(dry("@b%d", &[]), would(&["@b", "@c", "@d"]));
    assert_eq!(dry("@a,e", &[]), would(&["@a", "@e"]));
    assert_eq!(dry("@%b", &[]), would(&["@a", "@b"]));
    assert_eq!(dry("@d%", &[]), would(&["@d", "@e"]));
    assert_eq!(dry("@a%b,e", &[]), would(&["@a", "@b", "@e"]));
    assert_eq!(dry("", &["-r"]), would(&["@a", "@b", "@c", "@d", "@e", ""]));
    // Without -v a dry run prints nothing.
    assert_eq!(env.ok(&["dataset", "destroy", "-n", "tank/vol@a%e"]), "");
    assert_eq!(listing(&env), before, "a dry run changed something");
    assert_eq!(alloc(&env), space, "a dry run changed the pool's alloc");

    // Bad specs: nothing goes.
    refused(
        &env,
        &["dataset", "destroy", "tank/vol@a,zz"],
        "destroy",
        "tank/vol@a,zz",
    );
    refused(
        &env,
        &["dataset", "destroy", "tank/vol@d%b"],
        "destroy",
        "tank/vol@d%b",
    );
    refused(
        &env,
        &["dataset", "destroy", "tank/vol@a%zz"],
        "destroy",
        "tank/vol@a%zz",
    );
    assert_eq!(listing(&env), before);

    // The real thing: a range, then a list.
    let out = env.ok(&["dataset", "destroy", "-v", "tank/vol@b%d"]);
    says(
        &out,
        &[
            "will destroy tank/vol@b",
            "will destroy tank/vol@c",
            "will destroy tank/vol@d",
        ],
    );
    assert_eq!(snaps(&env, "tank/vol"), ["tank/vol@a", "tank/vol@e"]);
    check(&env, "tank/vol@a", &at[0]);
    check(&env, "tank/vol@e", &at[4]);
    env.ok(&["dataset", "destroy", "tank/vol@a,e"]);
    assert!(snaps(&env, "tank/vol").is_empty());
    // Without snapshots the volume goes without -r.
    env.ok(&["dataset", "destroy", "tank/vol"]);
    assert!(names(&env).is_empty());
}

/// Holds: a held snapshot cannot be destroyed (by name, range or -r), `holds` lists the tags and
/// `userrefs` counts them; once released it can.
#[test]
fn holds_keep_a_snapshot() {
    let (env, _d) = setup(&["tank/vol"]);
    qio(&env, "tank/vol", &["write -P 7 0 1M"]);
    env.ok(&["dataset", "snapshot", "tank/vol@s"]);
    env.ok(&["dataset", "snapshot", "tank/vol@t"]);
    env.ok(&["dataset", "hold", "keep", "tank/vol@s"]);
    env.ok(&["dataset", "hold", "backup", "tank/vol@s"]);
    assert_eq!(num(&env, "tank/vol@s", "userrefs"), 2);
    assert_eq!(num(&env, "tank/vol@t", "userrefs"), 0);
    assert_eq!(hold_tags(&env, "tank/vol@s"), ["backup", "keep"]);

    let before = listing(&env);
    for spec in ["tank/vol@s", "tank/vol@s%t", "tank/vol@s,t"] {
        let r = refused(&env, &["dataset", "destroy", spec], "destroy", spec);
        says(&r, &["held"]);
    }
    let r = refused(
        &env,
        &["dataset", "destroy", "-r", "tank/vol"],
        "destroy",
        "tank/vol",
    );
    says(&r, &["held"]);
    assert_eq!(listing(&env), before, "a refused destroy changed something");

    env.ok(&["dataset", "release", "keep", "tank/vol@s"]);
    refused(
        &env,
        &["dataset", "destroy", "tank/vol@s"],
        "destroy",
        "tank/vol@s",
    );
    env.ok(&["dataset", "release", "backup", "tank/vol@s"]);
    assert_eq!(num(&env, "tank/vol@s", "userrefs"), 0);
    env.ok(&["dataset", "destroy", "tank/vol@s"]);
    assert_eq!(snaps(&env, "tank/vol"), ["tank/vol@t"]);
}

// ---------------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------------

/// Every refusal of the issue's list: `cannot <verb> '<name>': <reason>`, exit 1, and nothing changed
/// (the datasets, their figures and links, the pool's alloc, the snapshot's contents).
#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let (env, mut d) = setup(&["tank/vol"]);
    env.sparse("o", 256 * MIB);
    env.ok(&["pool", "create", "--size", "256M", "other", &env.p("o")]);
    volume(&env, "other/ov", &[]);
    qio(&env, "tank/vol", &["write -P 0x44 0 1M"]);
    env.ok(&["dataset", "snapshot", "tank/vol@s"]);
    env.ok(&["dataset", "clone", "tank/vol@s", "tank/c"]);
    env.ok(&["dataset", "snapshot", "tank/vol@held"]);
    env.ok(&["dataset", "hold", "keep", "tank/vol@held"]);
    let before = listing(&env);
    let space = alloc(&env);

    let long = format!("tank/vol@{}", "x".repeat(256 - "tank/vol@".len()));
    assert_eq!(long.len(), 256);
    // (arguments, verb, name, what the reason says)
    let cases: Vec<(Vec<&str>, &str, &str, Vec<&str>)> = vec![
        (
            vec!["dataset", "snapshot", "tank/missing@s"],
            "create snapshot",
            "tank/missing@s",
            vec!["does not exist"],
        ),
        (
            vec!["dataset", "snapshot", "nopool/vol@s"],
            "create snapshot",
            "nopool/vol@s",
            vec!["no such pool"],
        ),
        (
            vec!["dataset", "snapshot", "tank/vol@s"],
            "create snapshot",
            "tank/vol@s",
            vec!["already exists"],
        ),
        (
            vec!["dataset", "snapshot", "tank/vol@a@b"],
            "create snapshot",
            "tank/vol@a@b",
            vec!["'@'"],
        ),
        (
            vec!["dataset", "snapshot", "tank/vol@bad!name"],
            "create snapshot",
            "tank/vol@bad!name",
            vec!["invalid character '!'"],
        ),
        (
            vec!["dataset", "snapshot", "tank/vol@a b"],
            "create snapshot",
            "tank/vol@a b",
            vec!["invalid character ' '"],
        ),
        (
            vec!["dataset", "snapshot", "tank/vol@x/y"],
            "create snapshot",
            "tank/vol@x/y",
            vec!["invalid character '/'"],
        ),
        (
            vec!["dataset", "snapshot", "tank/vol@"],
            "create snapshot",
            "tank/vol@",
            vec!["empty"],
        ),
        (
            vec!["dataset", "snapshot", &long],
            "create snapshot",
            &long,
            vec!["too long"],
        ),
        (
            vec!["dataset", "destroy", "tank/vol@held"],
            "destroy",
            "tank/vol@held",
            vec!["held", "keep"],
        ),
        (
            vec!["dataset", "destroy", "tank/vol@s"],
            "destroy",
            "tank/vol@s",
            vec!["clones", "-R", "tank/c"],
        ),
        (
            vec!["dataset", "destroy", "tank/vol"],
            "destroy",
            "tank/vol",
            vec!["-r", "tank/vol@s", "tank/vol@held"],
        ),
        (
            vec!["dataset", "destroy", "tank/vol@missing"],
            "destroy",
            "tank/vol@missing",
            vec!["does not exist"],
        ),
        (
            vec!["dataset", "clone", "tank/vol@s", "other/c2"],
            "create",
            "other/c2",
            vec!["pools differ"],
        ),
        (
            vec!["dataset", "clone", "tank/vol@s", "tank/c"],
            "create",
            "tank/c",
            vec!["already exists"],
        ),
        (
            vec!["dataset", "clone", "tank/vol@missing", "tank/c3"],
            "create",
            "tank/c3",
            vec!["does not exist"],
        ),
        (
            vec!["dataset", "rollback", "tank/vol@s"],
            "rollback to",
            "tank/vol@s",
            vec!["more recent snapshots", "tank/vol@held"],
        ),
        (
            vec!["dataset", "rollback", "tank/vol@missing"],
            "rollback to",
            "tank/vol@missing",
            vec!["does not exist"],
        ),
        (
            vec!["dataset", "hold", "keep", "tank/vol@held"],
            "hold",
            "tank/vol@held",
            vec!["already exists", "keep"],
        ),
        (
            vec!["dataset", "release", "nosuch", "tank/vol@held"],
            "release",
            "tank/vol@held",
            vec!["no such tag"],
        ),
        (
            vec!["dataset", "rename", "tank/vol@s", "tank/vol@held"],
            "rename",
            "tank/vol@s",
            vec!["already exists"],
        ),
        (
            vec!["dataset", "snapshot", "tank/vol@x", "other/ov@x"],
            "create snapshot",
            "other/ov@x",
            vec!["one pool"],
        ),
    ];
    let mut cases = cases;
    // `set` of native properties that zfs keeps read-only on a snapshot.
    let sets: Vec<String> = [
        "volsize=4M",
        "readonly=off",
        "refreservation=1M",
        "copies=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in &sets {
        cases.push((
            vec!["dataset", "set", s, "tank/vol@s"],
            "set property for",
            "tank/vol@s",
            vec!["snapshot"],
        ));
    }
    for (args, verb, name, parts) in &cases {
        let r = refused(&env, args, verb, name);
        says(&r, parts);
        assert_eq!(
            listing(&env),
            before,
            "`cairn {}` failed but changed something",
            args.join(" ")
        );
    }
    assert_eq!(
        alloc(&env),
        space,
        "the refused commands changed the pool's alloc"
    );
    assert_eq!(hold_tags(&env, "tank/vol@held"), ["keep"]);
    d.assert_alive();
    qio_ro(
        &env,
        "tank/vol@s",
        &["read -P 0x44 0 1M", "read -P 0 1M 7M"],
    );
    qio_ro(&env, "tank/c", &["read -P 0x44 0 1M"]);

    // The longest allowed name (255 bytes) is accepted, and a user property can be set on a snapshot.
    let max = &long[..255];
    env.ok(&["dataset", "snapshot", max]);
    assert!(snaps(&env, "tank/vol").contains(&max.to_string()));
    env.ok(&["dataset", "set", "test:note=kept", "tank/vol@s"]);
    assert_eq!(prop(&env, "tank/vol@s", "test:note"), "kept");
}

/// `destroy -r` of a volume whose snapshot has a clone is refused naming the clone by its full name,
/// as zfs does (`use '-R' to destroy the following datasets: tank/c`).
#[test]
fn destroy_r_of_a_volume_with_a_cloned_snapshot_names_the_clone() {
    let (env, _d) = setup(&["tank/vol"]);
    env.ok(&["dataset", "snapshot", "tank/vol@s"]);
    env.ok(&["dataset", "clone", "tank/vol@s", "tank/c"]);
    let before = listing(&env);
    let r = refused(
        &env,
        &["dataset", "destroy", "-r", "tank/vol"],
        "destroy",
        "tank/vol",
    );
    says(&r, &["-R", "tank/c"]);
    assert_eq!(listing(&env), before);
}

/// `destroy -R VOL` destroys the volume, its snapshots and their clones: as in zfs, -R implies -r.
#[test]
fn destroy_capital_r_of_a_volume_takes_its_snapshots_and_clones() {
    let (env, _d) = setup(&["tank/vol", "tank/other"]);
    env.ok(&["dataset", "snapshot", "tank/vol@s"]);
    env.ok(&["dataset", "clone", "tank/vol@s", "tank/c"]);
    let out = env.ok(&["dataset", "destroy", "-n", "-v", "-R", "tank/vol"]);
    says(
        &out,
        &[
            "would destroy tank/vol@s",
            "would destroy tank/c",
            "would destroy tank/vol",
        ],
    );
    env.ok(&["dataset", "destroy", "-R", "tank/vol"]);
    assert_eq!(names(&env), ["tank/other"]);
}

// ---------------------------------------------------------------------------------------------------
// Several snapshots at once
// ---------------------------------------------------------------------------------------------------

/// Several names in one `snapshot` command are taken together (one txg: the same createtxg) or not at
/// all: one missing volume, taken name or bad name and none is created. A snapshot holds every write
/// acknowledged before the command, flushed or not.
#[test]
fn several_snapshots_in_one_command_are_atomic() {
    let (env, _d) = setup(&["tank/a", "tank/b", "tank/c"]);
    for (i, v) in ["tank/a", "tank/b", "tank/c"].iter().enumerate() {
        qio(&env, v, &[&format!("write -P {} 0 1M", 0x61 + i)]);
    }
    env.ok(&["dataset", "snapshot", "tank/a@s", "tank/b@s", "tank/c@s"]);
    let txg = num(&env, "tank/a@s", "createtxg");
    assert_eq!(num(&env, "tank/b@s", "createtxg"), txg);
    assert_eq!(num(&env, "tank/c@s", "createtxg"), txg);
    let before = listing(&env);

    for (args, bad) in [
        (
            vec!["tank/a@t", "tank/b@t", "tank/missing@t"],
            "tank/missing@t",
        ),
        (vec!["tank/a@t", "tank/b@s", "tank/c@t"], "tank/b@s"),
        (vec!["tank/a@t", "tank/b@t!", "tank/c@t"], "tank/b@t!"),
        (vec!["tank/a@t", "tank/b@a@t"], "tank/b@a@t"),
    ] {
        let mut a = vec!["dataset", "snapshot"];
        a.extend_from_slice(&args);
        refused(&env, &a, "create snapshot", bad);
        assert_eq!(
            listing(&env),
            before,
            "`snapshot {}` failed but created some",
            args.join(" ")
        );
    }

    // Acknowledged, unflushed writes to two volumes are in the snapshots taken together.
    let mut ca = env.nbd_connect("tank/a").expect("connect a");
    let mut cb = env.nbd_connect("tank/b").expect("connect b");
    ca.write(2 * MIB, &[0x71; 65536]).expect("write a");
    cb.write(3 * MIB, &[0x72; 65536]).expect("write b");
    env.ok(&["dataset", "snapshot", "tank/a@w", "tank/b@w"]);
    let w = num(&env, "tank/a@w", "createtxg");
    assert_eq!(num(&env, "tank/b@w", "createtxg"), w);
    assert!(w > txg);
    ca.write(2 * MIB, &[0x73; 65536]).expect("write a again");
    cb.write(3 * MIB, &[0x74; 65536]).expect("write b again");
    ca.disconnect().expect("disconnect");
    cb.disconnect().expect("disconnect");
    qio_ro(
        &env,
        "tank/a@w",
        &[
            "read -P 0x61 0 1M",
            "read -P 0x71 2M 64k",
            "read -P 0 1M 1M",
        ],
    );
    qio_ro(
        &env,
        "tank/b@w",
        &["read -P 0x62 0 1M", "read -P 0x72 3M 64k"],
    );
    qio_ro(&env, "tank/a@s", &["read -P 0x61 0 1M", "read -P 0 1M 7M"]);
    qio_ro(&env, "tank/a", &["read -P 0x73 2M 64k"]);
    assert_eq!(
        names(&env),
        [
            "tank/a", "tank/a@s", "tank/a@w", "tank/b", "tank/b@s", "tank/b@w", "tank/c",
            "tank/c@s"
        ]
    );
}

// ---------------------------------------------------------------------------------------------------
// Space figures
// ---------------------------------------------------------------------------------------------------

/// The space columns of every volume (`list -Hp -o space`): (name, used, usedbysnapshots,
/// usedbydataset, usedbyrefreservation, usedbychildren).
fn space_rows(env: &Env) -> Vec<(String, [u64; 5])> {
    let out = env.ok(&["dataset", "list", "-Hp", "-o", "space"]);
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 7, "bad `list -o space` line {l:?}");
            let n = |i: usize| -> u64 {
                f[i].parse()
                    .unwrap_or_else(|e| panic!("column {i} of {l:?}: {e}"))
            };
            (f[0].to_string(), [n(2), n(3), n(4), n(5), n(6)])
        })
        .collect()
}

/// For every volume: used = usedbydataset + usedbysnapshots + usedbyrefreservation (usedbychildren is
/// 0), as `list -o space` and `get` show them; usedbydataset is `written`; usedbyrefreservation is what
/// the refreservation holds beyond usedbydataset; the snapshots' own `used` add up to at most
/// usedbysnapshots (blocks two snapshots share count in usedbysnapshots only).
fn assert_space_adds_up(env: &Env, when: &str) {
    for (name, [used, snap, ds, refres, child]) in space_rows(env) {
        assert_eq!(child, 0, "{when}: {name} usedbychildren");
        assert_eq!(
            used,
            ds + snap + refres,
            "{when}: {name} used {used} != usedbydataset {ds} + usedbysnapshots {snap} + \
             usedbyrefreservation {refres}"
        );
        assert_eq!(num(env, &name, "used"), used, "{when}: {name} get used");
        assert_eq!(num(env, &name, "usedbydataset"), ds);
        assert_eq!(num(env, &name, "usedbysnapshots"), snap);
        assert_eq!(num(env, &name, "usedbyrefreservation"), refres);
        assert_eq!(num(env, &name, "written"), ds, "{when}: {name} written");
        let refreservation: u64 = prop(env, &name, "refreservation").parse().unwrap_or(0);
        assert_eq!(
            refres,
            refreservation.saturating_sub(ds),
            "{when}: {name} usedbyrefreservation with refreservation {refreservation}"
        );
        let own: u64 = snaps(env, &name).iter().map(|s| num(env, s, "used")).sum();
        assert!(
            own <= snap,
            "{when}: {name}'s snapshots' used add up to {own} > usedbysnapshots {snap}"
        );
    }
}

/// After a series of writes, discards, snapshots, a clone and a destroy, the space figures of a thick
/// volume, a sparse one and a clone add up every step; a new snapshot references what its volume did
/// and leaves `written` at 0; `logicalreferenced` counts data blocks exactly.
#[test]
fn space_adds_up_after_writes_and_snapshots() {
    let env = Env::new();
    make_pool(&env);
    volume(&env, "tank/thick", &[]);
    volume(&env, "tank/sparse", &["-s"]);
    let _d = env.serve();
    assert_space_adds_up(&env, "empty");
    let steps: [(&str, &[&str]); 4] = [
        ("first", &["write -P 1 0 3M"]),
        ("second", &["write -P 2 1M 1M", "write -P 3 5M 512k"]),
        ("third", &["discard 0 1M", "write -P 4 2M 2M"]),
        ("fourth", &["write -P 5 0 8M"]),
    ];
    for (i, (step, cmds)) in steps.iter().enumerate() {
        for vol in ["tank/thick", "tank/sparse"] {
            qio(&env, vol, cmds);
        }
        assert_space_adds_up(&env, &format!("after the {step} writes"));
        let names = [format!("tank/thick@s{i}"), format!("tank/sparse@s{i}")];
        env.ok(&["dataset", "snapshot", &names[0], &names[1]]);
        assert_space_adds_up(&env, &format!("after snapshot s{i}"));
        for (vol, snap) in ["tank/thick", "tank/sparse"].iter().zip(&names) {
            assert_eq!(num(&env, vol, "written"), 0, "{vol} just after {snap}");
            assert_eq!(
                num(&env, snap, "referenced"),
                num(&env, vol, "referenced"),
                "{snap} references what {vol} did"
            );
            assert_eq!(
                num(&env, snap, "logicalreferenced"),
                num(&env, vol, "logicalreferenced")
            );
        }
    }
    // s0 holds 3 MiB of data exactly; s3 (after the fourth, full write) 8 MiB.
    assert_eq!(num(&env, "tank/thick@s0", "logicalreferenced"), 3 * MIB);
    assert_eq!(num(&env, "tank/sparse@s3", "logicalreferenced"), VOL_SIZE);
    assert_eq!(num(&env, "tank/sparse", "usedbyrefreservation"), 0);
    // written@s0 of the volume: everything written since s0 still referenced (all of it, after the
    // full write), at least the volume's own written.
    let since = num(&env, "tank/sparse", "written@s0");
    assert!(since >= VOL_SIZE, "written@s0 = {since}");
    assert!(since >= num(&env, "tank/sparse", "written"));

    // A clone and its writes, and a destroyed middle snapshot.
    env.ok(&["dataset", "clone", "tank/sparse@s1", "tank/clone"]);
    assert_space_adds_up(&env, "after the clone");
    qio(&env, "tank/clone", &["write -P 6 0 1M"]);
    env.ok(&["dataset", "snapshot", "tank/clone@c0"]);
    qio(&env, "tank/clone", &["write -P 7 512k 1M"]);
    assert_space_adds_up(&env, "after the clone's writes");
    let w = num(&env, "tank/clone", "written");
    assert!(
        (512 * 1024..2 * MIB).contains(&w),
        "the clone wrote 1 MiB since its snapshot: written = {w}"
    );
    env.ok(&["dataset", "destroy", "tank/thick@s2"]);
    env.ok(&["dataset", "destroy", "tank/sparse@s2"]);
    assert_space_adds_up(&env, "after destroying s2");
    qio(&env, "tank/thick", &["write -P 8 0 2M", "discard 4M 4M"]);
    qio(&env, "tank/sparse", &["write -P 8 0 2M", "discard 4M 4M"]);
    assert_space_adds_up(&env, "after writes and discards over the snapshots");
}

/// `list -t snapshot|all`, `-r`, and `-s`/`-S` sorting by numbers.
#[test]
fn list_shows_snapshots_and_sorts() {
    let (env, _d) = setup(&["tank/vol", "tank/v2"]);
    // a holds 3 MiB alone after the overwrite, b 1 MiB, c nothing.
    qio(&env, "tank/vol", &["write -P 1 0 4M"]);
    env.ok(&["dataset", "snapshot", "tank/vol@a", "tank/v2@x"]);
    qio(&env, "tank/vol", &["write -P 2 0 3M"]);
    env.ok(&["dataset", "snapshot", "tank/vol@b"]);
    qio(&env, "tank/vol", &["write -P 3 0 1M"]);
    env.ok(&["dataset", "snapshot", "tank/vol@c"]);

    let l = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["dataset", "list"];
        a.extend_from_slice(args);
        lines(&env.ok(&a))
    };
    assert_eq!(l(&["-H", "-o", "name"]), ["tank/v2", "tank/vol"]);
    assert_eq!(
        l(&["-t", "snapshot", "-H", "-o", "name"]),
        ["tank/v2@x", "tank/vol@a", "tank/vol@b", "tank/vol@c"]
    );
    assert_eq!(
        l(&["-t", "all", "-H", "-o", "name"]),
        [
            "tank/v2",
            "tank/v2@x",
            "tank/vol",
            "tank/vol@a",
            "tank/vol@b",
            "tank/vol@c"
        ]
    );
    assert_eq!(
        l(&["-r", "-H", "-o", "name", "tank/vol"]),
        ["tank/vol", "tank/vol@a", "tank/vol@b", "tank/vol@c"]
    );
    assert_eq!(
        l(&[
            "-t",
            "snapshot",
            "-S",
            "createtxg",
            "-H",
            "-o",
            "name",
            "tank/vol"
        ]),
        ["tank/vol@c", "tank/vol@b", "tank/vol@a"]
    );
    assert_eq!(
        l(&["-t", "snapshot", "-s", "used", "-H", "-o", "name", "tank/vol"]),
        ["tank/vol@c", "tank/vol@b", "tank/vol@a"]
    );
    let used: Vec<u64> = ["tank/vol@c", "tank/vol@b", "tank/vol@a"]
        .iter()
        .map(|s| num(&env, s, "used"))
        .collect();
    assert!(
        used[0] < used[1] && used[1] < used[2],
        "used of c, b, a: {used:?}"
    );
    let header = env.ok(&["dataset", "list", "-o", "space"]);
    let first: Vec<&str> = header
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        first,
        [
            "NAME",
            "AVAIL",
            "USED",
            "USEDSNAP",
            "USEDDS",
            "USEDREFRESERV",
            "USEDCHILD"
        ]
    );
}

/// Renaming a snapshot keeps its data and holds; renaming a volume takes its snapshots along, and a
/// clone's `origin` follows.
#[test]
fn rename_keeps_data_and_links() {
    let (env, _d) = setup(&["tank/vol"]);
    qio(&env, "tank/vol", &["write -P 0x52 0 1M"]);
    env.ok(&["dataset", "snapshot", "tank/vol@a"]);
    env.ok(&["dataset", "hold", "keep", "tank/vol@a"]);
    env.ok(&["dataset", "clone", "tank/vol@a", "tank/c"]);
    env.ok(&["dataset", "rename", "tank/vol@a", "tank/vol@b"]);
    assert_eq!(snaps(&env, "tank/vol"), ["tank/vol@b"]);
    assert_eq!(num(&env, "tank/vol@b", "userrefs"), 1);
    assert_eq!(prop(&env, "tank/c", "origin"), "tank/vol@b");
    env.ok(&["dataset", "rename", "tank/vol", "tank/renamed"]);
    assert_eq!(names(&env), ["tank/c", "tank/renamed", "tank/renamed@b"]);
    assert_eq!(prop(&env, "tank/c", "origin"), "tank/renamed@b");
    assert_eq!(prop(&env, "tank/renamed@b", "clones"), "tank/c");
    qio_ro(&env, "tank/renamed@b", &["read -P 0x52 0 1M"]);
    qio_ro(&env, "tank/renamed", &["read -P 0x52 0 1M"]);
}

// ---------------------------------------------------------------------------------------------------
// Restarts, export/import, crashes
// ---------------------------------------------------------------------------------------------------

/// Snapshots, clones, holds and a snapshot's user property survive a clean daemon restart and a
/// `pool export` / `pool import`: the same listing (names, guids, figures, links), the same pool
/// `alloc`, the same contents.
#[test]
fn everything_survives_restart_and_export_import() {
    let (env, mut d) = setup(&["tank/vol"]);
    let mut img = Image::new();
    apply(&env, "tank/vol", &[img.write(0, 3 * MIB, 0x61)]);
    env.ok(&["dataset", "snapshot", "tank/vol@s1"]);
    let s1 = img.clone();
    apply(&env, "tank/vol", &[img.write(MIB, MIB, 0x62)]);
    env.ok(&["dataset", "snapshot", "tank/vol@s2"]);
    let s2 = img.clone();
    apply(&env, "tank/vol", &[img.write(5 * MIB, MIB, 0x63)]);
    env.ok(&["dataset", "hold", "keep", "tank/vol@s1"]);
    env.ok(&["dataset", "set", "test:note=second", "tank/vol@s2"]);
    env.ok(&["dataset", "clone", "tank/vol@s1", "tank/c"]);
    let mut c = s1.clone();
    apply(&env, "tank/c", &[c.write(0, 512 * 1024, 0x64)]);
    env.ok(&["dataset", "snapshot", "tank/c@cs"]);
    let cs = c.clone();
    apply(&env, "tank/c", &[c.write(2 * MIB, MIB, 0x65)]);

    let list = listing(&env);
    let exp = export_names(&env);
    let space = alloc(&env);
    let verify = |when: &str| {
        assert_eq!(listing(&env), list, "{when}: the listing changed");
        // Nothing was written since: not a block leaked or freed by the restart or the import.
        assert_eq!(alloc(&env), space, "{when}: the pool's alloc changed");
        assert_eq!(export_names(&env), exp, "{when}: the exports changed");
        assert_eq!(hold_tags(&env, "tank/vol@s1"), ["keep"], "{when}: holds");
        assert_eq!(prop(&env, "tank/vol@s2", "test:note"), "second", "{when}");
        assert_eq!(prop(&env, "tank/c", "origin"), "tank/vol@s1", "{when}");
        check(&env, "tank/vol@s1", &s1);
        check(&env, "tank/vol@s2", &s2);
        check(&env, "tank/vol", &img);
        check(&env, "tank/c@cs", &cs);
        check(&env, "tank/c", &c);
        refused(
            &env,
            &["dataset", "destroy", "tank/vol@s1"],
            "destroy",
            "tank/vol@s1",
        );
    };
    verify("before");

    d.stop();
    let mut d = env.serve();
    verify("after a restart");

    env.ok(&["pool", "export", "tank"]);
    assert!(env.pool_names().is_empty());
    env.ok(&["pool", "import", "-d", &env.p(""), "tank"]);
    verify("after export and import");

    // And with no daemon: the commands open the pool themselves.
    d.stop();
    env.ok(&["pool", "export", "tank"]);
    env.ok(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_eq!(listing(&env), list, "export/import without the daemon");
    let _d = env.serve();
    verify("after export and import without the daemon");
}

/// kill -9 of the daemon right after a snapshot command returned: after the restart the snapshot is
/// there and reads right (with the acknowledged write it was taken over); the same for a clone and a
/// hold, and for a destroy.
#[test]
fn a_snapshot_survives_kill_9_right_after_the_command() {
    let (env, mut d) = setup(&["tank/vol"]);
    qio(&env, "tank/vol", &["write -P 0x71 0 2M"]);
    let mut c = env.nbd_connect("tank/vol").expect("connect");
    c.write(2 * MIB, &[0x72; 65536])
        .expect("write, not flushed");
    env.ok(&["dataset", "snapshot", "tank/vol@s"]);
    c.write(0, &[0x73; 65536])
        .expect("write after the snapshot");
    d.kill();
    drop(c);

    let mut d = env.serve();
    assert_eq!(snaps(&env, "tank/vol"), ["tank/vol@s"]);
    let snap_reads = [
        "read -P 0x71 0 2M",
        "read -P 0x72 2M 64k",
        "read -P 0 2112k 6080k",
    ];
    qio_ro(&env, "tank/vol@s", &snap_reads);
    // The volume: the acknowledged write before the snapshot is there for sure.
    qio_ro(
        &env,
        "tank/vol",
        &["read -P 0x72 2M 64k", "read -P 0x71 64k 1984k"],
    );

    env.ok(&["dataset", "clone", "tank/vol@s", "tank/c"]);
    env.ok(&["dataset", "hold", "keep", "tank/vol@s"]);
    d.kill();
    let mut d = env.serve();
    assert_eq!(prop(&env, "tank/c", "origin"), "tank/vol@s");
    assert_eq!(num(&env, "tank/vol@s", "userrefs"), 1);
    qio_ro(&env, "tank/c", &snap_reads);

    qio(&env, "tank/vol", &["write -P 0x74 4M 1M"]);
    env.ok(&["dataset", "snapshot", "tank/vol@t"]);
    env.ok(&["dataset", "destroy", "tank/vol@t"]);
    d.kill();
    let _d = env.serve();
    assert_eq!(snaps(&env, "tank/vol"), ["tank/vol@s"]);
    assert_eq!(
        names(&env),
        ["tank/c", "tank/vol", "tank/vol@s"],
        "after a kill -9 right after destroy"
    );
    qio_ro(&env, "tank/vol@s", &snap_reads);
    qio_ro(&env, "tank/vol", &["read -P 0x74 4M 1M"]);
    assert_space_adds_up(&env, "after the kill -9 restarts");
}

/// A snapshot whose export has a client connected is busy: destroy (by name, range, or `rollback -r`
/// of an older one), rename and `pool export` are refused and leave it served; once the client is
/// gone they work.
#[test]
fn a_snapshot_in_use_is_busy() {
    let (env, _d) = setup(&["tank/vol"]);
    qio(&env, "tank/vol", &["write -P 0x2b 0 1M"]);
    env.ok(&["dataset", "snapshot", "tank/vol@a"]);
    env.ok(&["dataset", "snapshot", "tank/vol@b"]);
    let mut c = env.nbd_connect("tank/vol@b").expect("connect");
    let before = listing(&env);
    for (args, verb, name) in [
        (
            vec!["dataset", "destroy", "tank/vol@b"],
            "destroy",
            "tank/vol@b",
        ),
        (
            vec!["dataset", "destroy", "tank/vol@a%b"],
            "destroy",
            "tank/vol@a%b",
        ),
        (
            vec!["dataset", "destroy", "-r", "tank/vol"],
            "destroy",
            "tank/vol",
        ),
        (
            vec!["dataset", "rollback", "-r", "tank/vol@a"],
            "rollback to",
            "tank/vol@a",
        ),
        (
            vec!["dataset", "rename", "tank/vol@b", "tank/vol@c"],
            "rename",
            "tank/vol@b",
        ),
        (vec!["pool", "export", "tank"], "export", "tank"),
    ] {
        let r = refused(&env, &args, verb, name);
        says(&r, &["busy"]);
        assert_eq!(
            listing(&env),
            before,
            "`{}` changed something",
            args.join(" ")
        );
        assert_eq!(
            c.read(0, 4096).expect("the client still reads"),
            vec![0x2b; 4096]
        );
    }
    c.disconnect().expect("disconnect");
    env.ok(&["dataset", "rollback", "-r", "tank/vol@a"]);
    assert_eq!(snaps(&env, "tank/vol"), ["tank/vol@a"]);
}

/// A clone's own snapshots work as a volume's: rollback of the clone to its snapshot leaves the origin
/// alone, and destroying a middle snapshot of the clone frees what its `used` said.
#[test]
fn a_clone_has_snapshots_of_its_own() {
    let (env, _d) = setup(&["tank/vol"]);
    let mut base = Image::new();
    apply(&env, "tank/vol", &[base.write(0, 4 * MIB, 0x01)]);
    env.ok(&["dataset", "snapshot", "tank/vol@base"]);
    env.ok(&["dataset", "clone", "tank/vol@base", "tank/c"]);
    let mut c = base.clone();
    apply(&env, "tank/c", &[c.write(0, 2 * MIB, 0x02)]);
    env.ok(&["dataset", "snapshot", "tank/c@c1"]);
    let c1 = c.clone();
    apply(&env, "tank/c", &[c.write(0, MIB, 0x03)]);
    env.ok(&["dataset", "snapshot", "tank/c@c2"]);
    apply(&env, "tank/c", &[c.write(0, 3 * MIB, 0x04)]);
    env.ok(&["dataset", "snapshot", "tank/c@c3"]);
    let c3 = c.clone();
    apply(&env, "tank/c", &[c.write(5 * MIB, MIB, 0x05)]);
    assert_space_adds_up(&env, "the clone's snapshots");

    // c2 alone holds the 1 MiB written between c1 and c2.
    let used = num(&env, "tank/c@c2", "used");
    assert!((MIB..MIB + 256 * 1024).contains(&used), "used = {used}");
    let before = alloc(&env);
    env.ok(&["dataset", "destroy", "tank/c@c2"]);
    let freed = before.saturating_sub(alloc(&env));
    assert!(
        (used..=used + 64 * 1024).contains(&freed),
        "destroying tank/c@c2 (used {used}) freed {freed} bytes"
    );
    assert_space_adds_up(&env, "after destroying c2");

    // Rollback of the clone, to its newest snapshot, then (-r) to its oldest.
    env.ok(&["dataset", "rollback", "tank/c@c3"]);
    check(&env, "tank/c", &c3);
    env.ok(&["dataset", "rollback", "-r", "tank/c@c1"]);
    check(&env, "tank/c", &c1);
    assert_eq!(snaps(&env, "tank/c"), ["tank/c@c1"]);
    check(&env, "tank/vol", &base);
    check(&env, "tank/vol@base", &base);
    assert_eq!(prop(&env, "tank/c", "origin"), "tank/vol@base");
    assert_space_adds_up(&env, "after the clone's rollbacks");

    // The origin volume rolls back to the snapshot its clone came from; the clone is left alone.
    qio(&env, "tank/vol", &["write -P 0x06 0 8M"]);
    env.ok(&["dataset", "rollback", "tank/vol@base"]);
    check(&env, "tank/vol", &base);
    check(&env, "tank/c", &c1);
    assert_space_adds_up(&env, "after the origin's rollback");
}

/// A snapshot of a volume with a refreservation must leave room for it: after the snapshot, the
/// volume's blocks are the snapshot's, and the refreservation promises that the whole volume can still
/// be overwritten. zfs refuses such a snapshot when the pool cannot hold both (`out of space`); here an
/// 80 MiB thick volume, fully written, in a 128 MiB pool. If the snapshot is taken, the overwrite the
/// refreservation promises must succeed.
#[test]
fn a_snapshot_keeps_the_refreservation_promise() {
    let env = Env::new();
    let l = env.leaves(&["a", "b"]);
    env.ok(&[
        "pool", "create", "--size", "128M", "tank", "mirror", &l[0], &l[1],
    ]);
    env.ok(&["dataset", "create", "-V", "80M", "tank/vol"]);
    let _d = env.serve();
    qio(&env, "tank/vol", &["write -P 0x11 0 80M"]);
    let before = listing(&env);
    let o = env.run(&["dataset", "snapshot", "tank/vol@s"]);
    if o.code == 0 {
        // Taken: then the refreservation must still hold.
        qio(&env, "tank/vol", &["write -P 0x22 0 80M", "flush"]);
        qio_ro(&env, "tank/vol@s", &["read -P 0x11 0 80M"]);
    } else {
        let r = refused(
            &env,
            &["dataset", "snapshot", "tank/vol@s"],
            "create snapshot",
            "tank/vol@s",
        );
        says(&r, &["space"]);
        assert_eq!(listing(&env), before);
    }
}

/// `freeing`, the pool property for background destroys (as zfs's): the bytes still to free, 0 once
/// a destroy is done.
#[test]
fn the_pool_says_what_it_is_still_freeing() {
    let (env, _d) = setup(&["tank/vol"]);
    qio(&env, "tank/vol", &["write -P 1 0 4M"]);
    env.ok(&["dataset", "snapshot", "tank/vol@s"]);
    qio(&env, "tank/vol", &["write -P 2 0 4M"]);
    env.ok(&["dataset", "destroy", "tank/vol@s"]);
    let v = env.ok(&["pool", "get", "-Hp", "-o", "value", "freeing", "tank"]);
    let n: u64 = v
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("freeing = {v:?}: {e}"));
    // 4 MiB is far below what one txg frees: the destroy's own commit freed it all.
    assert_eq!(n, 0, "freeing after a small destroy returned");
}

/// `get` of a property that does not apply to one of the datasets named (`origin` of a snapshot,
/// `clones` of a volume) prints `-` for it, as zfs does, so `get -H -o value origin` works on any mix.
#[test]
fn get_of_a_property_that_does_not_apply_prints_a_dash() {
    let (env, _d) = setup(&["tank/vol"]);
    env.ok(&["dataset", "snapshot", "tank/vol@s"]);
    env.ok(&["dataset", "clone", "tank/vol@s", "tank/c"]);
    let out = env.ok(&[
        "dataset",
        "get",
        "-H",
        "-o",
        "name,property,value",
        "origin,clones",
        "tank/vol",
        "tank/vol@s",
        "tank/c",
    ]);
    assert_eq!(
        lines(&out),
        [
            "tank/vol\torigin\t-",
            "tank/vol\tclones\t-",
            "tank/vol@s\torigin\t-",
            "tank/vol@s\tclones\ttank/c",
            "tank/c\torigin\ttank/vol@s",
            "tank/c\tclones\t-",
        ]
    );
}

/// After a snapshot of a thick volume, the snapshot holds its blocks, so its reservation is unused
/// again: other volumes filling the pool must leave room for the whole volume to be overwritten.
#[test]
fn other_volumes_leave_room_for_a_snapshotted_reservation() {
    let env = Env::new();
    let l = env.leaves(&["a", "b"]);
    env.ok(&[
        "pool", "create", "--size", "256M", "tank", "mirror", &l[0], &l[1],
    ]);
    env.ok(&["dataset", "create", "-V", "40M", "tank/vol"]);
    env.ok(&["dataset", "create", "-s", "-V", "400M", "tank/fill"]);
    let _d = env.serve();
    qio(&env, "tank/vol", &["write -P 0x11 0 40M", "flush"]);
    env.ok(&["dataset", "snapshot", "tank/vol@s"]);
    // Fill the pool from the sparse volume until it refuses.
    let uri = env.nbd_uri("tank/fill");
    let mut full = false;
    for i in 0..50u64 {
        let cmd = format!("write -P 0x33 {}M 8M", i * 8);
        let o = env.tool("qemu-io", &["-f", "raw", "-c", &cmd, "-c", "flush", &uri]);
        let text = format!("{}{}", o.stdout, o.stderr);
        if o.code != 0 || text.contains("failed") {
            assert!(
                text.contains("No space"),
                "the filler stops on ENOSPC: {text}"
            );
            full = true;
            break;
        }
    }
    assert!(full, "a 400M sparse volume cannot fit in a 256M pool");
    // The reservation's promise: the whole volume can be overwritten, and the snapshot still reads
    // the old bytes.
    qio(&env, "tank/vol", &["write -P 0x22 0 40M", "flush"]);
    qio(&env, "tank/vol", &["read -P 0x22 0 40M"]);
    qio_ro(&env, "tank/vol@s", &["read -P 0x11 0 40M"]);
}
