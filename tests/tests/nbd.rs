//! End-to-end tests of the daemon (`cairn serve`) and its NBD server with real clients: qemu-io, qemu-img,
//! nbdinfo, nbdcopy and fio's nbd engine, plus a raw client (below) that misbehaves on purpose.
//!
//! Every test runs the real binary in its own temporary directory with its own state directory and its
//! own daemon (see `cairn_tests::Env::serve`). Unless a test says otherwise the pool is `tank`, a RAID1+0
//! of four sparse 256 MiB leaves (`mirror a b mirror c d`), and the volumes are small.
//!
//! The clients come from the Debian packages qemu-utils, libnbd-bin and fio; a test whose client is
//! missing fails and says which package to install (CI installs them all).

// NBD is a big-endian wire protocol: the raw client below has to speak it.
#![allow(clippy::big_endian_bytes)]

use cairn_tests::{random_bytes, Daemon, Env, Out, MIB};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------------
// Setup and client helpers
// ---------------------------------------------------------------------------------------------------

/// Creates the pool `tank`: `mirror a b mirror c d` of sparse 256 MiB files.
fn raid10(env: &Env) {
    let l = env.leaves(&["a", "b", "c", "d"]);
    env.ok(&[
        "pool", "create", "--size", "256M", "tank", "mirror", &l[0], &l[1], "mirror", &l[2], &l[3],
    ]);
}

/// `dataset create -V SIZE [EXTRA...] NAME`.
fn volume(env: &Env, name: &str, size: &str, extra: &[&str]) {
    let mut a = vec!["dataset", "create", "-V", size];
    a.extend_from_slice(extra);
    a.push(name);
    env.ok(&a);
}

/// The RAID1+0 pool with the given volumes (`(name, size)`, default options), and a daemon serving them.
fn setup(vols: &[(&str, &str)]) -> (Env, Daemon) {
    let env = Env::new();
    raid10(&env);
    for (name, size) in vols {
        volume(&env, name, size, &[]);
    }
    let d = env.serve();
    (env, d)
}

/// `qemu-io -f raw -c CMD... URI`.
fn qemu_io(env: &Env, uri: &str, cmds: &[&str]) -> Out {
    env.qemu_io(&[], uri, cmds)
}

/// qemu-io commands that must all succeed (exit 0, no failed command, every `read -P` verified).
fn qio_ok(env: &Env, uri: &str, cmds: &[&str]) -> String {
    env.qemu_io_ok(&[], uri, cmds)
}

/// qemu-io commands of which one must fail; returns stdout + stderr.
fn qio_fails(env: &Env, uri: &str, cmds: &[&str]) -> String {
    let o = qemu_io(env, uri, cmds);
    let all = format!("{}{}", o.stdout, o.stderr);
    assert!(
        o.code != 0
            || all.contains("verification failed")
            || all.contains(" failed:")
            || all.contains("can't open"),
        "qemu-io {cmds:?} on {uri} should have failed:\nstdout:\n{}\nstderr:\n{}",
        o.stdout,
        o.stderr
    );
    all
}

/// An in-memory image of what a volume should hold: `write -P` patterns over zeros.
struct Model(Vec<u8>);

impl Model {
    fn new(size: u64) -> Model {
        Model(vec![0; size as usize])
    }

    /// Records `write -P byte off len` and returns that qemu-io command.
    fn write(&mut self, off: u64, len: u64, byte: u8) -> String {
        self.0[off as usize..(off + len) as usize].fill(byte);
        format!("write -P {byte:#04x} {off} {len}")
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

/// `pool list -Hp -o alloc POOL`.
fn pool_alloc(env: &Env, pool: &str) -> u64 {
    let s = env.ok(&["pool", "list", "-Hp", "-o", "alloc", pool]);
    s.trim()
        .parse()
        .unwrap_or_else(|e| panic!("bad alloc {s:?}: {e}"))
}

/// The value of one dataset property (`dataset get -Hp PROP NAME`, third field).
fn ds_prop(env: &Env, name: &str, prop: &str) -> String {
    let s = env.ok(&["dataset", "get", "-Hp", prop, name]);
    let line = s.lines().next().unwrap_or_default();
    let f: Vec<&str> = line.split('\t').collect();
    assert!(
        f.len() >= 3 && f[0] == name && f[1] == prop,
        "`dataset get -Hp {prop} {name}` printed {s:?}"
    );
    f[2].to_string()
}

/// `dataset get -Hp -o value PROP NAME` as a number.
fn ds_value(env: &Env, name: &str, prop: &str) -> u64 {
    let s = env.ok(&["dataset", "get", "-Hp", "-o", "value", prop, name]);
    s.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{name} {prop} = {s:?} is not a number: {e}"))
}

fn ds_num(env: &Env, name: &str, prop: &str) -> u64 {
    let v = ds_prop(env, name, prop);
    v.parse()
        .unwrap_or_else(|e| panic!("{name} {prop} = {v:?} is not a number: {e}"))
}

/// The export names of `nbdinfo --list` on the daemon's socket.
fn nbd_exports(env: &Env) -> Vec<String> {
    let out = env.tool_ok("nbdinfo", &["--list", &env.nbd_uri("")]);
    out.lines()
        .filter_map(|l| l.strip_prefix("export=\"")?.strip_suffix("\":"))
        .map(str::to_string)
        .collect()
}

/// `nbdinfo --map URI` as merged (offset, length, description) extents.
fn nbd_map(env: &Env, uri: &str) -> Vec<(u64, u64, String)> {
    let out = env.tool_ok("nbdinfo", &["--map", uri]);
    let mut v: Vec<(u64, u64, String)> = Vec::new();
    for l in out.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert!(f.len() >= 4, "bad nbdinfo --map line {l:?}:\n{out}");
        let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        let desc = f[3..].join(" ");
        match v.last_mut() {
            Some(last) if last.2 == desc && last.0 + last.1 == off => last.1 += len,
            _ => v.push((off, len, desc)),
        }
    }
    v
}

fn extents(items: &[(u64, u64, &str)]) -> Vec<(u64, u64, String)> {
    items
        .iter()
        .map(|&(o, l, d)| (o, l, d.to_string()))
        .collect()
}

/// The daemon is alive and a real client can read `len` bytes of `byte` at 0 of `export`.
fn assert_serving(env: &Env, d: &mut Daemon, export: &str, byte: u8, len: u64) {
    d.assert_alive();
    qio_ok(
        env,
        &env.nbd_uri(export),
        &[&format!("read -P {byte:#04x} 0 {len}")],
    );
    d.assert_alive();
}

/// The resident memory of a process in bytes (VmRSS of /proc/PID/status).
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

// ---------------------------------------------------------------------------------------------------
// A raw NBD client (big-endian wire format, NetworkBlockDevice/nbd doc/proto.md)
// ---------------------------------------------------------------------------------------------------

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const CFLAG_FIXED_NEWSTYLE: u32 = 1;
const CFLAG_NO_ZEROES: u32 = 2;

const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;

const CMDF_FUA: u16 = 1;

const TF_READ_ONLY: u16 = 2;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// How long the raw client waits for the server.
const RAW_TIMEOUT: Duration = Duration::from_secs(20);

struct Nbd {
    s: UnixStream,
}

impl Nbd {
    /// Connects to the daemon's NBD socket.
    fn connect(env: &Env) -> Nbd {
        let s = UnixStream::connect(env.nbd_socket()).expect("connect to the NBD socket");
        s.set_read_timeout(Some(RAW_TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(RAW_TIMEOUT)).expect("timeout");
        Nbd { s }
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to the NBD server");
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("reading {n} bytes from the NBD server: {e}"));
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.recv(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.recv(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.recv(8).try_into().unwrap())
    }

    /// Reads the server's greeting and returns its handshake flags.
    fn greeting(&mut self) -> u16 {
        assert_eq!(self.u64(), NBDMAGIC, "greeting: NBDMAGIC");
        assert_eq!(self.u64(), IHAVEOPT, "greeting: IHAVEOPT (newstyle)");
        let flags = self.u16();
        assert!(flags & 1 != 0, "the server must offer FIXED_NEWSTYLE");
        flags
    }

    /// Greeting, then the client flags FIXED_NEWSTYLE | NO_ZEROES.
    fn hello(env: &Env) -> Nbd {
        let mut c = Nbd::connect(env);
        let f = c.greeting();
        assert!(f & 2 != 0, "the server should offer NO_ZEROES");
        c.send(&(CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES).to_be_bytes());
        c
    }

    /// Sends an option header (IHAVEOPT, opt, len) and `data` (which may be shorter than `len`).
    fn option_with_len(&mut self, opt: u32, len: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        self.option_with_len(opt, data.len() as u32, data);
    }

    /// One option reply: (opt, type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC, "option reply magic");
        let opt = self.u32();
        let typ = self.u32();
        let len = self.u32();
        assert!(len < (1 << 20), "option reply of {len} bytes");
        let data = self.recv(len as usize);
        (opt, typ, data)
    }

    /// NBD_OPT_GO for `export`; returns (size, transmission flags). Panics on an error reply.
    fn go(&mut self, export: &str) -> (u64, u16) {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        let mut export_info = None;
        loop {
            let (opt, typ, data) = self.option_reply();
            assert_eq!(opt, OPT_GO, "reply to GO names GO");
            match typ {
                REP_INFO => {
                    let kind = u16::from_be_bytes([data[0], data[1]]);
                    if kind == 0 {
                        assert_eq!(data.len(), 12, "NBD_INFO_EXPORT is 12 bytes");
                        let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([data[10], data[11]]);
                        export_info = Some((size, flags));
                    }
                }
                REP_ACK => break,
                t => panic!(
                    "GO {export} failed: reply type {t:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
        export_info.expect("GO must send NBD_INFO_EXPORT before ACK")
    }

    /// A connection in transmission phase on `export` (simple replies): (client, size, flags).
    fn open(env: &Env, export: &str) -> (Nbd, u64, u16) {
        let mut c = Nbd::hello(env);
        let (size, flags) = c.go(export);
        (c, size, flags)
    }

    fn request_bytes(flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    /// A simple reply: (error, cookie), then `data_len` bytes of data when the error is 0.
    fn reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC, "simple reply magic");
        let err = self.u32();
        let cookie = self.u64();
        let data = if err == 0 {
            self.recv(data_len)
        } else {
            Vec::new()
        };
        (err, cookie, data)
    }

    /// READ: the data or the NBD error.
    fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(&Nbd::request_bytes(0, CMD_READ, cookie, offset, len));
        let (err, c, data) = self.reply(len as usize);
        assert_eq!(c, cookie, "the reply carries the request's cookie");
        if err == 0 {
            Ok(data)
        } else {
            Err(err)
        }
    }

    /// WRITE: the NBD error (0 = success).
    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.write_flags(0, cookie, offset, data)
    }

    /// WRITE with command flags (FUA): the NBD error (0 = success).
    fn write_flags(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        let mut b = Nbd::request_bytes(flags, CMD_WRITE, cookie, offset, data.len() as u32);
        b.extend_from_slice(data);
        self.send(&b);
        let (err, c, _) = self.reply(0);
        assert_eq!(c, cookie, "the reply carries the request's cookie");
        err
    }

    /// FLUSH: the NBD error (0 = success).
    fn flush(&mut self, cookie: u64) -> u32 {
        self.send(&Nbd::request_bytes(0, CMD_FLUSH, cookie, 0, 0));
        let (err, c, _) = self.reply(0);
        assert_eq!(c, cookie, "the reply carries the request's cookie");
        err
    }

    /// Asserts that the server closes the connection (EOF or reset) within [`RAW_TIMEOUT`], whatever it
    /// sends before.
    fn expect_closed(&mut self, what: &str) {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return
                }
                Err(e) => panic!(
                    "{what}: the server should have closed the connection, but after {:?}: {e}",
                    start.elapsed()
                ),
            }
        }
    }
}

/// The raw-client tests' world: `tank/vol` (16 MiB) whose first MiB holds 0x77, and a daemon.
fn raw_setup() -> (Env, Daemon) {
    let (env, d) = setup(&[("tank/vol", "16M")]);
    qio_ok(
        &env,
        &env.nbd_uri("tank/vol"),
        &["write -P 0x77 0 1M", "flush"],
    );
    (env, d)
}

// ---------------------------------------------------------------------------------------------------
// 1-5: real clients
// ---------------------------------------------------------------------------------------------------

#[test]
fn qemu_io_patterns_read_back_in_a_second_process() {
    let (env, mut d) = setup(&[("tank/vol", "64M")]);
    let uri = env.nbd_uri("tank/vol");
    let mut m = Model::new(64 * MIB);
    let writes = [
        m.write(0, 64 * 1024, 0x11),
        // Unaligned, inside the first block: a read-modify-write.
        m.write(12345, 1000, 0x22),
        m.write(MIB, 4096, 0x33),
        // Unaligned and across several blocks.
        m.write(5 * MIB + 7, 100_000, 0x44),
        // The last sector of the volume.
        m.write(64 * MIB - 512, 512, 0x55),
        // Several MiB at once.
        m.write(32 * MIB, 3 * MIB, 0x66),
        // One byte, overwriting part of an earlier write.
        m.write(32 * MIB + 1, 1, 0x67),
    ];
    let w: Vec<&str> = writes.iter().map(String::as_str).collect();
    let out = qio_ok(&env, &uri, &w);
    assert_eq!(out.matches("wrote ").count(), w.len(), "{out}");

    // A second process reads everything back, the unwritten areas as zeros.
    let reads = m.reads();
    assert!(
        reads
            .iter()
            .filter(|r| r.starts_with("read -P 0x00"))
            .count()
            >= 4,
        "{reads:?}"
    );
    let r: Vec<&str> = reads.iter().map(String::as_str).collect();
    let out = qio_ok(&env, &uri, &r);
    assert_eq!(out.matches("read ").count(), r.len(), "{out}");

    // The verification does fail on a wrong pattern (the test can see a bad read).
    qio_fails(&env, &uri, &["read -P 0x99 12345 1000"]);
    qio_fails(&env, &uri, &["read -P 0x00 5242887 100000"]);
    d.assert_alive();
}

#[test]
fn qemu_img_convert_and_compare() {
    let (env, mut d) = setup(&[("tank/vol", "64M")]);
    let uri = env.nbd_uri("tank/vol");
    let img = env.path("img.raw");
    let data = random_bytes(64 * MIB as usize, 0x5eed);
    std::fs::write(&img, &data).unwrap();
    let imgs = env.p("img.raw");
    env.tool_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &imgs, &uri],
    );
    let o = env.tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &imgs, &uri],
    );
    assert_eq!(
        o.code, 0,
        "qemu-img compare should find the images identical:\n{}{}",
        o.stdout, o.stderr
    );
    assert!(o.stdout.contains("identical"), "{}", o.stdout);

    // A one-byte difference is seen (compare exits 1).
    cairn_tests::scribble(
        &img,
        40 * MIB + 3,
        1,
        Some(data[(40 * MIB + 3) as usize] ^ 0xff),
        0,
    );
    let o = env.tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &imgs, &uri],
    );
    assert_eq!(
        o.code, 1,
        "qemu-img compare should see the changed byte:\n{}{}",
        o.stdout, o.stderr
    );
    assert!(o.stdout.contains("Content mismatch"), "{}", o.stdout);
    d.assert_alive();
}

#[test]
fn nbdinfo_lists_every_volume_and_maps_data_and_holes() {
    let env = Env::new();
    raid10(&env);
    volume(&env, "tank/alpha", "16M", &["-b", "16K"]);
    volume(&env, "tank/beta", "8M", &["-s"]);
    let mut d = env.serve();

    let mut ex = nbd_exports(&env);
    ex.sort();
    assert_eq!(ex, ["tank/alpha", "tank/beta"]);
    let list = env.tool_ok("nbdinfo", &["--list", &env.nbd_uri("")]);
    assert!(list.contains("export-size: 16777216"), "{list}");
    assert!(list.contains("export-size: 8388608"), "{list}");

    let a = env.nbd_uri("tank/alpha");
    qio_ok(
        &env,
        &a,
        &["write -P 0x77 0 1M", "write -P 0x78 8M 1048581", "flush"],
    );
    // Allocation is per 16K block: the second write ends inside the block at 9M.
    let end = 9 * MIB + 16 * 1024;
    assert_eq!(
        nbd_map(&env, &a),
        extents(&[
            (0, MIB, "data"),
            (MIB, 7 * MIB, "hole,zero"),
            (8 * MIB, end - 8 * MIB, "data"),
            (end, 16 * MIB - end, "hole,zero"),
        ]),
        "nbdinfo --map of tank/alpha"
    );
    assert_eq!(
        nbd_map(&env, &env.nbd_uri("tank/beta")),
        extents(&[(0, 8 * MIB, "hole,zero")]),
        "a volume never written is one hole"
    );
    assert_eq!(env.tool_ok("nbdinfo", &["--size", &a]).trim(), "16777216");
    d.assert_alive();
}

#[test]
fn nbdcopy_copies_a_volume_out_as_written() {
    let (env, mut d) = setup(&[("tank/vol", "16M")]);
    let uri = env.nbd_uri("tank/vol");
    // Random data in with nbdcopy, then patterns and a discard over it with qemu-io.
    let mut want = random_bytes(16 * MIB as usize, 42);
    std::fs::write(env.path("in.raw"), &want).unwrap();
    env.tool_ok("nbdcopy", &[&env.p("in.raw"), &uri]);
    qio_ok(
        &env,
        &uri,
        &[
            "write -P 0xaa 0 1M",
            "write -P 0x55 5243003 4000",
            "discard 8M 1M",
            "flush",
        ],
    );
    want[..MIB as usize].fill(0xaa);
    want[5_243_003..5_247_003].fill(0x55);
    want[8 * MIB as usize..9 * MIB as usize].fill(0);

    env.tool_ok("nbdcopy", &[&uri, &env.p("out.raw")]);
    let got = std::fs::read(env.path("out.raw")).unwrap();
    assert_same("nbdcopy of tank/vol", &got, &want);
    d.assert_alive();
}

#[test]
fn fio_nbd_engine_randwrite_with_verify() {
    let (env, mut d) = setup(&[("tank/vol", "64M")]);
    let uri = format!("--uri={}", env.nbd_uri("tank/vol"));
    let o = env.tool(
        "fio",
        &[
            "--name=t",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
    );
    assert!(
        o.code == 0 && o.stdout.contains("err= 0") && !o.stdout.contains("verify:"),
        "fio failed (exit {}):\nstdout:\n{}\nstderr:\n{}",
        o.code,
        o.stdout,
        o.stderr
    );
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 6, 11: durability, crashes and clean shutdown
// ---------------------------------------------------------------------------------------------------

#[test]
fn flushed_writes_survive_sigkill() {
    let (env, mut d) = setup(&[("tank/vol", "16M")]);
    let uri = env.nbd_uri("tank/vol");
    qio_ok(
        &env,
        &uri,
        &[
            "write -P 0x5a 4096 64k",
            "write -P 0xa5 10485763 5000",
            "flush",
        ],
    );
    // A raw client writes and flushes, and is still connected when the daemon dies.
    let (mut c, _, _) = Nbd::open(&env, "tank/vol");
    assert_eq!(c.write(1, 2 * MIB, &[0x3c; 65536]), 0);
    assert_eq!(c.flush(2), 0);
    // A FUA write is durable on its own.
    assert_eq!(c.write_flags(CMDF_FUA, 3, 3 * MIB, &[0x4b; 65536]), 0);
    d.kill();
    drop(c);

    // Without a daemon the pool opens (the stale sockets do not get in the way).
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(st.contains("state: ONLINE"), "{st}");

    let mut d = env.serve();
    qio_ok(
        &env,
        &uri,
        &[
            "read -P 0 0 4096",
            "read -P 0x5a 4096 64k",
            "read -P 0 69632 2027520",
            "read -P 0x3c 2M 64k",
            "read -P 0x4b 3M 64k",
            "read -P 0xa5 10485763 5000",
        ],
    );
    d.stop();
}

/// A daemon whose state directory was moved away (or removed) while it ran, and a second daemon
/// started in a new directory at the same path: stopping the first leaves the second's sockets.
#[test]
fn stopping_a_daemon_leaves_the_sockets_of_another_at_the_same_path() {
    let env = Env::new();
    env.ok(&["pool", "list"]);
    let mut first = env.serve();
    let old = env.dir().join("state.old");
    std::fs::rename(env.state_dir(), &old).expect("move the state directory away");
    std::fs::create_dir(env.state_dir()).expect("a new state directory");
    let mut second = env.serve();
    assert!(first.terminate().success());
    for s in ["cairn.sock", "nbd.sock"] {
        assert!(
            env.state_dir().join(s).exists(),
            "{s} of the second daemon was removed by the first one's shutdown"
        );
    }
    // The second daemon still answers on its control socket.
    assert_eq!(env.ok(&["pool", "list"]).trim(), "no pools available");
    second.assert_alive();
    assert!(second.terminate().success());
    for s in ["cairn.sock", "nbd.sock"] {
        assert!(!env.state_dir().join(s).exists(), "{s} left behind");
    }
}

#[test]
fn sigkill_without_flush_leaves_a_pool_that_opens() {
    let (env, mut d) = setup(&[("tank/vol", "16M")]);
    let (mut c, _, _) = Nbd::open(&env, "tank/vol");
    // Acknowledged but never flushed writes, then a crash.
    for i in 0..16u64 {
        assert_eq!(c.write(i, i * 65536, &[0xc3; 65536]), 0);
    }
    d.kill();
    drop(c);

    let st = env.ok(&["pool", "status", "tank"]);
    assert!(
        st.contains("pool: tank") && st.contains("state: ONLINE"),
        "{st}"
    );
    assert_eq!(env.pool_names(), ["tank"]);
    assert_eq!(env.pool_health("tank"), "ONLINE");
    let list = env.ok(&["dataset", "list", "-H", "-o", "name"]);
    assert_eq!(list.trim(), "tank/vol");

    // The daemon starts again and the data is either the old (zeros) or the new, block by block.
    let mut d = env.serve();
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(st.contains("state: ONLINE"), "{st}");
    let (mut c, _, _) = Nbd::open(&env, "tank/vol");
    let data = c.read(1, 0, MIB as u32).expect("read after the crash");
    for (i, blk) in data.chunks(16 * 1024).enumerate() {
        assert!(
            blk.iter().all(|&b| b == 0) || blk.iter().all(|&b| b == 0xc3),
            "block {i} holds neither the old nor the new data"
        );
    }
    assert!(
        data[MIB as usize..].iter().all(|&b| b == 0),
        "nothing was written past 1M"
    );
    drop(c);
    d.stop();
}

#[test]
fn sigterm_exits_0_removes_sockets_and_commits() {
    let (env, mut d) = setup(&[("tank/vol", "16M")]);
    let uri = env.nbd_uri("tank/vol");
    qio_ok(&env, &uri, &["write -P 0x61 0 64k", "flush"]);
    // Written and acknowledged, not flushed; the client stays connected.
    let (mut c, _, _) = Nbd::open(&env, "tank/vol");
    assert_eq!(c.write(1, MIB, &[0x62; 65536]), 0);
    // And a client that stopped in the middle of its handshake.
    let mut idle = Nbd::connect(&env);
    idle.greeting();

    let start = Instant::now();
    d.stop();
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "shutdown took {:?} (idle clients must not hold it up)",
        start.elapsed()
    );
    c.expect_closed("a connected client at shutdown");
    for s in ["cairn.sock", "nbd.sock"] {
        assert!(
            !env.state_dir().join(s).exists(),
            "{s} should be removed at shutdown"
        );
    }
    // Without the daemon the CLI works on its own again.
    assert_eq!(env.pool_health("tank"), "ONLINE");

    let mut d = env.serve();
    qio_ok(
        &env,
        &uri,
        &[
            "read -P 0x61 0 64k",
            "read -P 0 64k 983040",
            "read -P 0x62 1M 64k",
        ],
    );
    d.stop();
}

#[test]
fn custom_socket_tcp_listener_and_a_single_daemon() {
    let env = Env::new();
    raid10(&env);
    volume(&env, "tank/vol", "16M", &[]);
    // A free loopback port (a tiny race with other programs is acceptable here).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sock = env.p("my-nbd.sock");
    let listen = format!(":{port}");
    let mut d = env.serve_with(&["--nbd-socket", &sock, "--nbd-listen", &listen]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        d.assert_alive();
        std::thread::sleep(Duration::from_millis(20));
    }
    let unix = format!("nbd+unix:///tank/vol?socket={sock}");
    let tcp = format!("nbd://127.0.0.1:{port}/tank/vol");
    qio_ok(&env, &unix, &["write -P 0x19 0 1M", "flush"]);
    qio_ok(&env, &tcp, &["read -P 0x19 0 1M", "write -P 0x1a 1M 1M"]);
    qio_ok(&env, &unix, &["read -P 0x1a 1M 1M"]);
    assert!(
        !env.nbd_socket().exists(),
        "with --nbd-socket the default socket is not created"
    );

    // A second daemon for the same state directory is refused; the first goes on.
    let e = env.fail(&["serve"]);
    assert!(e.contains("already running"), "{e}");
    d.assert_alive();
    qio_ok(&env, &tcp, &["read -P 0x19 0 1M"]);
    d.stop();
    assert!(
        !std::path::Path::new(&sock).exists(),
        "the custom socket is removed at shutdown"
    );
}

// ---------------------------------------------------------------------------------------------------
// 7: TRIM
// ---------------------------------------------------------------------------------------------------

#[test]
fn trim_and_write_zeroes_lower_the_pool_alloc() {
    let (env, mut d) = setup(&[("tank/vol", "64M")]);
    let uri = env.nbd_uri("tank/vol");
    let base = pool_alloc(&env, "tank");
    qio_ok(&env, &uri, &["write -P 0x33 0 32M", "flush"]);
    let full = pool_alloc(&env, "tank");
    let ref_full = ds_value(&env, "tank/vol", "referenced");
    assert!(
        full >= base + 32 * MIB,
        "writing 32M should allocate 32M: {base} -> {full}"
    );
    assert!(ref_full >= 32 * MIB, "referenced {ref_full}");

    qio_ok(&env, &uri, &["discard 0 32M", "flush"]);
    let trimmed = pool_alloc(&env, "tank");
    let ref_trimmed = ds_value(&env, "tank/vol", "referenced");
    assert!(
        trimmed + 28 * MIB <= full,
        "discard of 32M should free about 32M: alloc {full} -> {trimmed}"
    );
    assert!(
        ref_trimmed + 28 * MIB <= ref_full,
        "discard of 32M should lower referenced: {ref_full} -> {ref_trimmed}"
    );
    qio_ok(&env, &uri, &["read -P 0 0 64M"]);

    // WRITE_ZEROES that may unmap frees too.
    qio_ok(&env, &uri, &["write -P 0x34 0 16M", "flush"]);
    let again = pool_alloc(&env, "tank");
    assert!(again >= trimmed + 16 * MIB, "{trimmed} -> {again}");
    qio_ok(&env, &uri, &["write -z -u 0 16M", "flush"]);
    let zeroed = pool_alloc(&env, "tank");
    assert!(
        zeroed + 14 * MIB <= again,
        "write -z -u of 16M should free about 16M: alloc {again} -> {zeroed}"
    );
    qio_ok(&env, &uri, &["read -P 0 0 64M"]);
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 8: misbehaving clients
// ---------------------------------------------------------------------------------------------------

#[test]
fn raw_garbage_instead_of_client_flags() {
    let (env, mut d) = raw_setup();
    let mut c = Nbd::connect(&env);
    c.greeting();
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    c.expect_closed("garbage client flags");
    assert_serving(&env, &mut d, "tank/vol", 0x77, MIB);

    // Unknown client flag bits: the server must close too.
    let mut c = Nbd::connect(&env);
    c.greeting();
    c.send(&0x8000_0001u32.to_be_bytes());
    c.expect_closed("unknown client flags");
    // Clients that leave at once, or in the middle of the flags.
    drop(Nbd::connect(&env));
    let mut c = Nbd::connect(&env);
    c.greeting();
    c.send(&[0, 0]);
    drop(c);
    assert_serving(&env, &mut d, "tank/vol", 0x77, MIB);
}

#[test]
fn raw_bad_request_magic_closes_only_that_connection() {
    let (env, mut d) = raw_setup();
    let (mut c, size, _) = Nbd::open(&env, "tank/vol");
    assert_eq!(size, 16 * MIB);
    assert_eq!(
        c.read(1, 0, 4096).expect("a good read first"),
        vec![0x77; 4096]
    );
    let mut bad = Nbd::request_bytes(0, CMD_READ, 2, 0, 4096);
    bad[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    c.send(&bad);
    c.expect_closed("a request with a bad magic");
    assert_serving(&env, &mut d, "tank/vol", 0x77, MIB);
}

#[test]
fn raw_unknown_option_is_unsupported_and_the_connection_goes_on() {
    let (env, mut d) = raw_setup();
    let mut c = Nbd::hello(&env);
    for (opt, data) in [(0x4242u32, &b"hello"[..]), (0x7fff_fff0, &[][..])] {
        c.option(opt, data);
        let (o, typ, _) = c.option_reply();
        assert_eq!(o, opt, "the reply names the option");
        assert_eq!(
            typ, REP_ERR_UNSUP,
            "unknown option {opt:#x}: NBD_REP_ERR_UNSUP"
        );
    }
    // The connection is still usable: LIST works, then ABORT is acknowledged.
    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (o, typ, data) = c.option_reply();
        assert_eq!(o, OPT_LIST);
        match typ {
            REP_SERVER => {
                let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8_lossy(&data[4..4 + n]).into_owned());
            }
            REP_ACK => break,
            t => panic!("unexpected reply {t:#x} to LIST"),
        }
    }
    assert_eq!(names, ["tank/vol"]);
    c.option(OPT_ABORT, &[]);
    let (o, typ, _) = c.option_reply();
    assert_eq!((o, typ), (OPT_ABORT, REP_ACK), "ABORT is acknowledged");
    c.expect_closed("after ABORT");
    assert_serving(&env, &mut d, "tank/vol", 0x77, MIB);
}

#[test]
fn raw_requests_beyond_the_end_get_errors_and_the_connection_goes_on() {
    let (env, mut d) = raw_setup();
    let (mut c, size, _) = Nbd::open(&env, "tank/vol");
    assert_eq!(size, 16 * MIB);
    assert_eq!(
        c.read(1, size - 512, 4096),
        Err(EINVAL),
        "read across the end"
    );
    assert_eq!(c.read(2, size, 1), Err(EINVAL), "read at the end");
    assert_eq!(
        c.read(3, u64::MAX - 100, 4096),
        Err(EINVAL),
        "offset overflow"
    );
    let e = c.write(4, size - 100, &[0xee; 4096]);
    assert!(
        e == ENOSPC || e == EINVAL,
        "a write beyond the end gets ENOSPC or EINVAL, got {e}"
    );
    // The connection is still in step (the write's payload was consumed).
    assert_eq!(c.read(5, 0, 4096).expect("a good read"), vec![0x77; 4096]);
    assert_eq!(
        c.read(6, size - 4096, 4096).expect("the last block"),
        vec![0; 4096]
    );
    drop(c);
    assert_serving(&env, &mut d, "tank/vol", 0x77, MIB);
    // The failed write changed nothing.
    qio_ok(&env, &env.nbd_uri("tank/vol"), &["read -P 0 15M 1M"]);
}

#[test]
fn raw_write_cut_short_by_a_disconnect_changes_nothing() {
    let (env, mut d) = raw_setup();
    let (mut c, _, _) = Nbd::open(&env, "tank/vol");
    let mut b = Nbd::request_bytes(0, CMD_WRITE, 1, 0, MIB as u32);
    b.extend_from_slice(&[0xee; 1000]);
    c.send(&b);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    c.expect_closed("a write cut short");
    drop(c);
    // A request header cut short.
    let (mut c, _, _) = Nbd::open(&env, "tank/vol");
    c.send(&Nbd::request_bytes(0, CMD_WRITE, 1, 0, 4096)[..10]);
    drop(c);
    assert_serving(&env, &mut d, "tank/vol", 0x77, MIB);
    qio_ok(&env, &env.nbd_uri("tank/vol"), &["read -P 0 1M 1M"]);
}

/// A client that sent a write's header and part of its payload, then stalls while connected, does
/// not hold up SIGTERM: the daemon stops promptly (it used to wait for the rest of the payload until
/// its 30 s limit for connections), and what was flushed before is intact.
#[test]
fn sigterm_does_not_wait_for_a_client_stalled_mid_payload() {
    let (env, mut d) = raw_setup();
    let (mut c, _, _) = Nbd::open(&env, "tank/vol");
    let mut b = Nbd::request_bytes(0, CMD_WRITE, 1, 0, MIB as u32);
    b.extend_from_slice(&[0xee; 1000]);
    c.send(&b);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let st = d.terminate();
    let took = t.elapsed();
    assert_eq!(st.code(), Some(0), "{st}; log:\n{}", d.log());
    assert!(
        took < Duration::from_secs(15),
        "the daemon took {took:?} to stop with a client stalled mid-payload"
    );
    drop(c);
    let mut d = env.serve();
    assert_serving(&env, &mut d, "tank/vol", 0x77, MIB);
    qio_ok(&env, &env.nbd_uri("tank/vol"), &["read -P 0 1M 1M"]);
}

#[test]
fn raw_option_of_length_0xffffffff_does_not_hurt() {
    let (env, mut d) = raw_setup();
    // The header claims 4 GiB, some of it follows, and the client stays connected.
    let mut c = Nbd::hello(&env);
    c.option_with_len(OPT_GO, u32::MAX, &[0x41; 65536]);
    // Another claims 4 GiB of an unknown option and leaves at once.
    let mut c2 = Nbd::hello(&env);
    c2.option_with_len(0x4242, u32::MAX, b"xyz");
    drop(c2);
    std::thread::sleep(Duration::from_millis(200));
    assert_serving(&env, &mut d, "tank/vol", 0x77, MIB);
    let r = rss(d.pid());
    assert!(
        r < 512 * MIB,
        "the daemon should not allocate what a client claims: RSS {r}"
    );
    // An oversized (1 MiB) option that is sent in full gets an error and the connection goes on.
    let mut c3 = Nbd::hello(&env);
    c3.option(0x4242, &vec![0u8; MIB as usize]);
    let (o, typ, _) = c3.option_reply();
    assert_eq!(o, 0x4242);
    assert!(typ & 0x8000_0000 != 0, "an error reply, got {typ:#x}");
    let (size, _) = c3.go("tank/vol");
    assert_eq!(size, 16 * MIB);
    assert_eq!(c3.read(1, 0, 4096).expect("read"), vec![0x77; 4096]);
    drop(c3);
    drop(c);
    assert_serving(&env, &mut d, "tank/vol", 0x77, MIB);
}

// ---------------------------------------------------------------------------------------------------
// 9: commands through the daemon
// ---------------------------------------------------------------------------------------------------

#[test]
fn datasets_created_and_changed_at_once_through_the_daemon_are_all_kept() {
    let env = Env::new();
    raid10(&env);
    let mut d = env.serve();
    let n = 12;
    // Twelve `dataset create` at once: each one's registry change must survive the others'.
    std::thread::scope(|s| {
        for i in 0..n {
            let env = &env;
            s.spawn(move || {
                let name = format!("tank/v{i:02}");
                let o = env.run(&["dataset", "create", "-s", "-V", "16M", &name]);
                assert_eq!(o.code, 0, "create {name}: {}", o.stderr);
            });
        }
    });
    let names = env.ok(&["dataset", "list", "-H", "-o", "name"]);
    let want: Vec<String> = (0..n).map(|i| format!("tank/v{i:02}")).collect();
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        want,
        "every volume created at once is there"
    );
    // Two properties of each volume set at once, all kept.
    std::thread::scope(|s| {
        for i in 0..n {
            let env = &env;
            s.spawn(move || {
                let name = format!("tank/v{i:02}");
                env.ok(&["dataset", "set", "volsize=32M", &name]);
            });
            s.spawn(move || {
                let name = format!("tank/v{i:02}");
                env.ok(&["dataset", "set", &format!("org:tag=t{i}"), &name]);
            });
        }
    });
    let table = env.ok(&["dataset", "list", "-Hp", "-o", "name,volsize,org:tag"]);
    let want: Vec<String> = (0..n)
        .map(|i| format!("tank/v{i:02}\t{}\tt{i}", 32 * MIB))
        .collect();
    assert_eq!(table.lines().collect::<Vec<_>>(), want);
    assert_eq!(
        env.ok(&["dataset", "list", "-H", "-o", "org:tag", "tank/v03"]),
        "t3\n",
        "a user property alone as the column"
    );
    // Volumes destroyed at once are all gone; the rest stay.
    std::thread::scope(|s| {
        for i in (0..n).step_by(2) {
            let env = &env;
            s.spawn(move || env.ok(&["dataset", "destroy", &format!("tank/v{i:02}")]));
        }
    });
    let left = env.ok(&["dataset", "list", "-H", "-o", "name"]);
    let want: Vec<String> = (1..n).step_by(2).map(|i| format!("tank/v{i:02}")).collect();
    assert_eq!(left.lines().collect::<Vec<_>>(), want);
    d.assert_alive();
}

#[test]
fn commands_go_through_the_daemon() {
    let (env, mut d) = setup(&[("tank/vol", "16M")]);
    let uri = env.nbd_uri("tank/vol");
    // The daemon holds the pool open (and locked): these only work if it answers them.
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(
        st.contains("pool: tank") && st.contains("state: ONLINE"),
        "{st}"
    );
    let before = pool_alloc(&env, "tank");
    qio_ok(&env, &uri, &["write -P 0x71 0 4M", "flush"]);
    let after = pool_alloc(&env, "tank");
    assert!(after >= before + 4 * MIB, "live alloc: {before} -> {after}");

    // A new volume is an export at once.
    env.ok(&["dataset", "create", "-V", "8M", "tank/second"]);
    let mut ex = nbd_exports(&env);
    ex.sort();
    assert_eq!(ex, ["tank/second", "tank/vol"]);
    qio_ok(
        &env,
        &env.nbd_uri("tank/second"),
        &["write -P 0x72 0 1M", "flush"],
    );

    // A connected client keeps the pool from being exported (and its volume from being destroyed).
    let (mut c, _, _) = Nbd::open(&env, "tank/vol");
    let e = env.fail(&["pool", "export", "tank"]);
    assert!(
        e.starts_with("cannot export 'tank': ") && e.contains("busy"),
        "{e}"
    );
    let e = env.fail(&["dataset", "destroy", "tank/vol"]);
    assert!(e.starts_with("cannot destroy 'tank/vol': "), "{e}");
    assert_eq!(env.pool_names(), ["tank"]);
    assert_eq!(
        c.read(1, 0, 4096).expect("the held client still works"),
        vec![0x71; 4096]
    );

    // -f disconnects it.
    env.ok(&["pool", "export", "-f", "tank"]);
    c.expect_closed("export -f");
    d.assert_alive();
    assert!(env.pool_names().is_empty());
    assert!(
        !env.tool("nbdinfo", &["--list", &env.nbd_uri("")])
            .stdout
            .contains("tank/"),
        "an exported pool's volumes are no longer exports"
    );

    // Import it again through the daemon: the volumes and their data are there.
    env.ok(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_eq!(env.pool_names(), ["tank"]);
    let list = env.ok(&["dataset", "list", "-H", "-o", "name"]);
    assert_eq!(
        list.lines().collect::<Vec<_>>(),
        ["tank/second", "tank/vol"]
    );
    let mut ex = nbd_exports(&env);
    ex.sort();
    assert_eq!(ex, ["tank/second", "tank/vol"]);
    qio_ok(&env, &uri, &["read -P 0x71 0 4M", "read -P 0 4M 12M"]);
    qio_ok(&env, &env.nbd_uri("tank/second"), &["read -P 0x72 0 1M"]);
    d.stop();
}

// ---------------------------------------------------------------------------------------------------
// 10: volume semantics
// ---------------------------------------------------------------------------------------------------

#[test]
fn sparse_volumes_reserve_nothing_and_normal_ones_their_size() {
    let env = Env::new();
    raid10(&env);
    volume(&env, "tank/thin", "1G", &["-s"]);
    volume(&env, "tank/thick", "64M", &[]);
    let mut d = env.serve();
    assert_eq!(ds_prop(&env, "tank/thin", "refreservation"), "none");
    let r = ds_num(&env, "tank/thick", "refreservation");
    assert!(
        (64 * MIB..=70 * MIB).contains(&r),
        "a 64M volume should reserve about 64M, not {r}"
    );
    assert_eq!(ds_num(&env, "tank/thin", "volsize"), 1024 * MIB);
    // A reservation larger than the pool is refused; a sparse volume of that size is not.
    let e = env.fail(&["dataset", "create", "-V", "1G", "tank/big"]);
    assert!(e.starts_with("cannot create 'tank/big': "), "{e}");
    env.ok(&["dataset", "create", "-s", "-V", "1G", "tank/big"]);
    d.assert_alive();
}

#[test]
fn volsize_grows_a_volume() {
    let (env, mut d) = setup(&[("tank/vol", "16M")]);
    let uri = env.nbd_uri("tank/vol");
    qio_ok(&env, &uri, &["write -P 0x21 16773120 4096", "flush"]);
    env.ok(&["dataset", "set", "volsize=32M", "tank/vol"]);
    assert_eq!(ds_num(&env, "tank/vol", "volsize"), 32 * MIB);
    assert_eq!(env.tool_ok("nbdinfo", &["--size", &uri]).trim(), "33554432");
    qio_ok(
        &env,
        &uri,
        &[
            "read -P 0x21 16773120 4096",
            "read -P 0 16M 16M",
            "write -P 0x22 33550336 4096",
            "read -P 0x22 33550336 4096",
        ],
    );
    qio_fails(&env, &uri, &["write -P 0x23 32M 4096"]);
    d.assert_alive();
}

#[test]
fn volblocksize_must_be_a_power_of_two_from_4k_to_128k() {
    let env = Env::new();
    raid10(&env);
    for bs in ["2K", "3K", "12K", "48K", "256K", "1M", "0", "4097"] {
        let name = format!("tank/b{bs}");
        let e = env.fail(&["dataset", "create", "-V", "16M", "-b", bs, &name]);
        assert!(e.starts_with(&format!("cannot create '{name}': ")), "{e}");
    }
    for (bs, n) in [("4K", 4096u64), ("8K", 8192), ("128K", 131072)] {
        let name = format!("tank/b{bs}");
        env.ok(&["dataset", "create", "-V", "16M", "-b", bs, &name]);
        assert_eq!(ds_num(&env, &name, "volblocksize"), n);
    }
    let list = env.ok(&["dataset", "list", "-H", "-o", "name"]);
    assert_eq!(
        list.lines().collect::<Vec<_>>(),
        ["tank/b128K", "tank/b4K", "tank/b8K"],
        "the refused ones were not created"
    );
}

#[test]
fn readonly_volumes_refuse_writes() {
    let env = Env::new();
    raid10(&env);
    volume(&env, "tank/ro", "16M", &["-o", "readonly=on"]);
    volume(&env, "tank/rw", "16M", &[]);
    let mut d = env.serve();
    let ro = env.nbd_uri("tank/ro");
    let out = qio_fails(&env, &ro, &["write -P 0x01 0 4k"]);
    assert!(out.contains("Permission denied"), "{out}");
    env.qemu_io_ok(&["-r"], &ro, &["read -P 0 0 1M"]);

    // The server refuses a write itself, with EPERM, and stays in step.
    let (mut c, _, flags) = Nbd::open(&env, "tank/ro");
    assert!(flags & TF_READ_ONLY != 0, "the export is flagged read-only");
    // No writing commands are offered (FUA 8, TRIM 32, WRITE_ZEROES 64, FAST_ZERO 2048).
    assert_eq!(flags & (8 | 32 | 64 | 2048), 0, "flags {flags:#x}");
    assert_eq!(c.write(1, 0, &[1; 4096]), EPERM);
    assert_eq!(c.read(2, 0, 4096).expect("read"), vec![0; 4096]);
    drop(c);

    // readonly set on a live volume applies to new connections and to connected clients at their
    // next request, and can be unset.
    let rw = env.nbd_uri("tank/rw");
    let (mut live, _, flags) = Nbd::open(&env, "tank/rw");
    assert_eq!(flags & TF_READ_ONLY, 0);
    assert_eq!(flags & (8 | 32 | 64), 8 | 32 | 64, "flags {flags:#x}");
    assert_eq!(live.write(1, 4096, &[7; 4096]), 0);
    qio_ok(&env, &rw, &["write -P 0x02 0 4k", "flush"]);
    env.ok(&["dataset", "set", "readonly=on", "tank/rw"]);
    let out = qio_fails(&env, &rw, &["write -P 0x03 0 4k"]);
    assert!(out.contains("Permission denied"), "{out}");
    assert_eq!(
        live.write(2, 4096, &[8; 4096]),
        EPERM,
        "a client connected before readonly=on is refused too"
    );
    assert_eq!(live.read(3, 4096, 4096).expect("read"), vec![7; 4096]);
    env.ok(&["dataset", "set", "readonly=off", "tank/rw"]);
    assert_eq!(live.write(4, 4096, &[9; 4096]), 0);
    qio_ok(
        &env,
        &rw,
        &[
            "write -P 0x04 0 4k",
            "read -P 0x04 0 4k",
            "read -P 0x09 4k 4k",
        ],
    );
    d.assert_alive();
}

#[test]
fn volsize_shrink_applies_to_connected_clients_and_frees_the_tail() {
    let (env, mut d) = setup(&[("tank/vol", "32M")]);
    let (mut c, size, _) = Nbd::open(&env, "tank/vol");
    assert_eq!(size, 32 * MIB);
    assert_eq!(c.write(1, 0, &vec![0x11; MIB as usize]), 0);
    assert_eq!(c.write(2, 24 * MIB, &vec![0x22; 4 * MIB as usize]), 0);
    assert_eq!(c.flush(3), 0);
    let before = pool_alloc(&env, "tank");

    env.ok(&["dataset", "set", "volsize=16M", "tank/vol"]);
    // The connected client sees the new end at once: past it, a write gets ENOSPC and a read EINVAL,
    // as for any request beyond the end; below it everything is as it was.
    assert_eq!(c.write(4, 24 * MIB, &[0x33; 4096]), ENOSPC);
    assert_eq!(c.read(5, 24 * MIB, 4096), Err(EINVAL));
    assert_eq!(c.read(6, 16 * MIB - 4096, 8192), Err(EINVAL));
    assert_eq!(c.read(7, 0, 4096).expect("read"), vec![0x11; 4096]);
    assert_eq!(c.flush(8), 0);
    let after = pool_alloc(&env, "tank");
    assert!(
        after + 3 * MIB < before,
        "the 4M written past the new end are freed: alloc {before} -> {after}"
    );
    // Grown again, the old tail reads as zeros: nothing of it survived the shrink.
    env.ok(&["dataset", "set", "volsize=32M", "tank/vol"]);
    assert_eq!(
        c.read(9, 24 * MIB, 4096).expect("read"),
        vec![0; 4096],
        "the tail freed by the shrink reads as zeros"
    );
    drop(c);
    qio_ok(
        &env,
        &env.nbd_uri("tank/vol"),
        &["read -P 0x11 0 1M", "read -P 0 1M 31M"],
    );
    d.assert_alive();
}

#[test]
fn volsize_shrink_during_writes_in_flight_leaves_nothing_past_the_end() {
    let (env, mut d) = setup(&[("tank/vol", "64M")]);
    let (mut c, _, _) = Nbd::open(&env, "tank/vol");
    // 48 pipelined 1M writes over [16M, 64M) while the volume shrinks to 16M: each one lands before
    // the shrink (and is freed by it) or is refused after it; none leaves data past the new end.
    let n = 48u64;
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend_from_slice(&Nbd::request_bytes(
            0,
            CMD_WRITE,
            100 + i,
            (16 + i) * MIB,
            MIB as u32,
        ));
        batch.extend_from_slice(&vec![0x5a; MIB as usize]);
    }
    let sender = {
        let mut s = c.s.try_clone().expect("clone the socket");
        std::thread::spawn(move || s.write_all(&batch).expect("send the writes"))
    };
    std::thread::sleep(Duration::from_millis(50));
    env.ok(&["dataset", "set", "volsize=16M", "tank/vol"]);
    sender.join().expect("sender");
    let mut refused = 0;
    for _ in 0..n {
        let (err, cookie, _) = c.reply(0);
        assert!((100..100 + n).contains(&cookie), "cookie {cookie}");
        match err {
            0 => {}
            ENOSPC => refused += 1,
            e => panic!("write {cookie}: error {e}, want 0 or ENOSPC"),
        }
    }
    assert_eq!(c.flush(1), 0);
    env.ok(&["dataset", "set", "volsize=64M", "tank/vol"]);
    assert_eq!(
        c.read(2, 16 * MIB, MIB as u32).expect("read"),
        vec![0; MIB as usize]
    );
    drop(c);
    qio_ok(&env, &env.nbd_uri("tank/vol"), &["read -P 0 0 64M"]);
    let map = nbd_map(&env, &env.nbd_uri("tank/vol"));
    assert_eq!(
        map,
        extents(&[(0, 64 * MIB, "hole,zero")]),
        "{refused} writes refused"
    );
    d.assert_alive();
}

#[test]
fn block_status_of_a_huge_sparse_volume_costs_what_is_allocated() {
    let env = Env::new();
    raid10(&env);
    volume(&env, "tank/huge", "16T", &["-s", "-b", "16K"]);
    let mut d = env.serve();
    let uri = env.nbd_uri("tank/huge");
    let t = 1u64 << 40;
    let bs = 16 * 1024;
    let cmds = [
        "write -P 0x61 0 16k".to_string(),
        format!("write -P 0x62 {} 16k", 8 * t),
        format!("write -P 0x63 {} 16k", 16 * t - bs),
    ];
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qio_ok(&env, &uri, &cmds);
    // 2^30 blocks: looking at each one for every request would take hours; the map follows the
    // tree and skips its holes (nbdinfo asks in requests of at most 4 GiB, 4096 of them here).
    assert_eq!(
        nbd_map(&env, &uri),
        extents(&[
            (0, bs, "data"),
            (bs, 8 * t - bs, "hole,zero"),
            (8 * t, bs, "data"),
            (8 * t + bs, 8 * t - 2 * bs, "hole,zero"),
            (16 * t - bs, bs, "data"),
        ])
    );
    d.assert_alive();
}

#[test]
fn a_full_pool_gives_enospc_and_stays_healthy() {
    let env = Env::new();
    let l = env.leaves(&["s1", "s2"]);
    env.ok(&[
        "pool", "create", "--size", "256M", "small", "mirror", &l[0], &l[1],
    ]);
    volume(&env, "small/big", "1G", &["-s"]);
    let mut d = env.serve();
    let uri = env.nbd_uri("small/big");
    qio_ok(&env, &uri, &["write -P 0x42 0 1M", "flush"]);
    let out = qio_fails(&env, &uri, &["write -P 0x43 1M 400M"]);
    assert!(
        out.contains("No space left on device") || out.contains("Input/output error"),
        "{out}"
    );
    d.assert_alive();
    assert_eq!(env.pool_health("small"), "ONLINE");
    qio_ok(&env, &uri, &["read -P 0x42 0 1M"]);

    d.stop();
    let mut d = env.serve();
    assert_eq!(env.pool_health("small"), "ONLINE");
    let st = env.ok(&["pool", "status", "small"]);
    assert!(st.contains("errors: No known data errors"), "{st}");
    qio_ok(&env, &uri, &["read -P 0x42 0 1M"]);
    d.stop();
}

#[test]
fn a_thick_volume_can_be_rewritten_after_a_sparse_one_filled_the_pool() {
    // The reservation guarantees the thick volume's space: rewriting it (copy-on-write, so each new
    // block exists before the old one is freed) must work on a pool that a sparse volume has filled.
    let env = Env::new();
    let l = env.leaves(&["s1", "s2"]);
    env.ok(&[
        "pool", "create", "--size", "256M", "small", "mirror", &l[0], &l[1],
    ]);
    volume(&env, "small/thick", "64M", &[]);
    volume(&env, "small/thin", "1G", &["-s"]);
    let mut d = env.serve();
    let thick = env.nbd_uri("small/thick");
    let thin = env.nbd_uri("small/thin");
    qio_ok(&env, &thick, &["write -P 0x51 0 64M", "flush"]);
    let out = qio_fails(&env, &thin, &["write -P 0x52 0 400M"]);
    assert!(out.contains("No space left on device"), "{out}");
    qio_ok(&env, &thin, &["flush"]);
    for pat in [0x53, 0x54] {
        let w = format!("write -P {pat:#x} 0 64M");
        let r = format!("read -P {pat:#x} 0 64M");
        qio_ok(&env, &thick, &[&w, "flush", &r]);
    }
    // The sparse volume still cannot take more.
    qio_fails(&env, &thin, &["write -P 0x55 400M 32M"]);
    d.stop();
    let mut d = env.serve();
    qio_ok(&env, &thick, &["read -P 0x54 0 64M"]);
    assert_eq!(env.pool_health("small"), "ONLINE");
    d.assert_alive();
}

#[test]
fn a_full_pool_recovers_after_a_discard() {
    let env = Env::new();
    let l = env.leaves(&["s1", "s2"]);
    env.ok(&[
        "pool", "create", "--size", "256M", "small", "mirror", &l[0], &l[1],
    ]);
    volume(&env, "small/big", "1G", &["-s"]);
    let mut d = env.serve();
    let uri = env.nbd_uri("small/big");
    qio_fails(&env, &uri, &["write -P 0x43 0 400M"]);
    // Freeing space on a full pool works, and the space can be used again.
    qio_ok(&env, &uri, &["discard 0 400M", "flush"]);
    assert!(pool_alloc(&env, "small") < 16 * MIB);
    qio_ok(
        &env,
        &uri,
        &["write -P 0x44 0 64M", "flush", "read -P 0x44 0 64M"],
    );
    d.stop();
}

/// zfs get's `-o value` selects the columns to print.
#[test]
fn dataset_get_o_value() {
    let env = Env::new();
    raid10(&env);
    volume(&env, "tank/vol", "16M", &[]);
    let v = env.ok(&[
        "dataset", "get", "-Hp", "-o", "value", "volsize", "tank/vol",
    ]);
    assert_eq!(v, "16777216\n");
    let v = env.ok(&[
        "dataset",
        "get",
        "-H",
        "-o",
        "name,value",
        "volsize",
        "tank/vol",
    ]);
    assert_eq!(v, "tank/vol\t16M\n");
}
