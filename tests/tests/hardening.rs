//! End-to-end tests of the attacks of issue 15, against the real daemon.
//!
//! Resource exhaustion (items 1 and 2): a raw client that sends large READs and never reads its
//! replies, more idle connections than the daemon has descriptors, and connections beyond
//! `serve --max-connections`. The memory bounds asserted here are bounds, not figures: the figures
//! (peak RSS with hostile readers) are in `scripts/bench-hostile`.

// NBD is a big-endian wire protocol: the raw requests below have to speak it.
#![allow(clippy::big_endian_bytes)]

use cairn_tests::{Daemon, Env, NbdClient, MIB};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// How long a condition the daemon must reach may take (generous: a loaded machine is slow).
const BOUND: Duration = Duration::from_secs(60);

/// Polls `cond` every 20 ms until it holds; panics with `what` after [`BOUND`].
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < BOUND, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pool `tank` (one sparse 256 MiB leaf) with a sparse volume `tank/vol` of `size`.
fn pool_with_volume(env: &Env, size: &str) {
    let l = env.leaves(&["a"]);
    env.ok(&["pool", "create", "--size", "256M", "tank", &l[0]]);
    env.ok(&["dataset", "create", "-s", "-V", size, "tank/vol"]);
}

/// A raw NBD request header.
fn request(typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// `count` READs of `len` bytes, spread over the first `span` bytes of the export.
fn reads(count: u64, len: u32, span: u64) -> Vec<u8> {
    let slots = span / len as u64;
    (0..count)
        .flat_map(|i| request(0, i + 1, (i % slots) * len as u64, len))
        .collect()
}

fn rss_mib(d: &Daemon) -> u64 {
    d.status_kib("VmRSS").unwrap_or(0) / 1024
}

/// A client that writes, reads back and disconnects: the daemon serves others.
fn well_behaved_client(env: &Env) {
    let mut c = env
        .nbd_connect("tank/vol")
        .expect("another client connects");
    let data = cairn_tests::random_bytes(64 << 10, 7);
    c.write(0, &data).expect("another client writes");
    assert_eq!(
        c.read(0, data.len() as u32).expect("another client reads"),
        data
    );
    c.disconnect().expect("another client disconnects");
}

/// Item 1: 200 READs of 32 MiB (6.4 GB of replies) from a client that never reads them. The daemon
/// must stop reading its requests once the connection's payload budget is spent: its RSS stays
/// under 512 MiB (it reached 6.2 GiB), `pool list` and another client are served meanwhile, and the
/// memory goes back once the client leaves.
#[test]
fn client_that_never_reads_its_replies_is_bounded() {
    let env = Env::new();
    pool_with_volume(&env, "64M");
    let d = env.serve();
    let base = rss_mib(&d);
    let mut hostile = env.nbd_connect("tank/vol").expect("connect");
    hostile
        .send_raw(&reads(200, 32 << 20, 64 * MIB))
        .expect("send the requests");
    // The daemon answers until the socket is full, then stalls on this client.
    let bound = 512;
    let mut peak = 0;
    let mut sample = || {
        peak = peak.max(rss_mib(&d));
        assert!(
            peak < bound,
            "daemon RSS {peak} MiB (base {base} MiB) with a client that does not read its replies"
        );
    };
    for _ in 0..50 {
        sample();
        std::thread::sleep(Duration::from_millis(20));
    }
    env.ok(&["pool", "list", "tank"]);
    sample();
    well_behaved_client(&env);
    sample();
    let hwm = d.status_kib("VmHWM").unwrap_or(0) / 1024;
    assert!(hwm < bound, "daemon peak RSS {hwm} MiB (base {base} MiB)");
    drop(hostile);
    // Freed buffers go back to the system once the client left (the free list of small buffers
    // may keep up to 64 MiB).
    wait_for("the daemon's RSS to come back near its base", || {
        rss_mib(&d) < base + 96
    });
}

/// Item 2: with an open-file limit of 64, 200 idle connections (more than the daemon has
/// descriptors). The accept loops must not spin or flood the log, `pool list` must answer, the
/// connections that never send a handshake are dropped after `--handshake-timeout`, and then a new
/// client is served.
#[test]
fn idle_connections_beyond_the_descriptor_limit() {
    let env = Env::new();
    pool_with_volume(&env, "16M");
    let mut d = env.serve_with_nofile(64, &["--handshake-timeout", "1"]);
    let idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(env.nbd_socket()).expect("connect"))
        .collect();
    env.ok(&["pool", "list", "tank"]);
    d.assert_alive();
    // Every idle connection is closed by the daemon: at once (over the limit), after a refusal, or
    // at the handshake deadline. What the daemon sent first (a greeting) is read and dropped.
    for mut s in idle {
        s.set_read_timeout(Some(BOUND)).expect("timeout");
        let mut sink = Vec::new();
        match s.read_to_end(&mut sink) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("an idle connection was not closed by the daemon: {e}"),
        }
    }
    wait_for("a new client to be served", || {
        env.nbd_connect("tank/vol").is_ok()
    });
    well_behaved_client(&env);
    env.ok(&["pool", "list", "tank"]);
    let log = d.log();
    assert!(
        log.len() < 8 << 10,
        "the daemon log is flooded ({} bytes):\n{}",
        log.len(),
        &log[..log.len().min(4096)]
    );
    d.stop();
}

/// Item 1: `--max-connections 2`: a third client is refused with a reason it can show, and served
/// once one of the two leaves.
#[test]
fn connections_beyond_the_limit_are_refused() {
    let env = Env::new();
    pool_with_volume(&env, "16M");
    let mut d = env.serve_with(&["--max-connections", "2"]);
    let a = env.nbd_connect("tank/vol").expect("first client");
    let _b = env.nbd_connect("tank/vol").expect("second client");
    let err = match NbdClient::connect(&env.nbd_socket(), "tank/vol") {
        Ok(_) => panic!("a third client was served with --max-connections 2"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("too many connections"),
        "the refusal should say why: {err}"
    );
    a.disconnect().expect("disconnect");
    wait_for("a client to be served after one left", || {
        env.nbd_connect("tank/vol").is_ok()
    });
    wait_for("the refusal in the log", || {
        d.log().contains("refused 1 connection(s)")
    });
    d.stop();
}

/// Item 1: a client that stops reading its replies is closed after `--reply-timeout`, which frees
/// the payload its requests hold.
#[test]
fn client_stalled_on_its_replies_is_closed() {
    let env = Env::new();
    pool_with_volume(&env, "64M");
    let d = env.serve_with(&["--reply-timeout", "1"]);
    let mut hostile = env.nbd_connect("tank/vol").expect("connect");
    hostile
        .send_raw(&reads(16, 32 << 20, 64 * MIB))
        .expect("send the requests");
    wait_for("the stalled client to be closed", || {
        d.log().contains("took no reply bytes")
    });
    well_behaved_client(&env);
    drop(hostile);
}
