//! A randomized stress test in the spirit of OpenZFS's ztest (SPEC sections 3, 5, 6 and 7).
//!
//! One RAID1+0 pool (`mirror a b mirror c d`), one sparse volume `tank/vol` (96 MiB, 16 KiB blocks), the
//! daemon, and a seeded random sequence of operations checked against an in-memory model of the volume:
//!
//! - NBD writes of random length and offset (block-aligned, unaligned, tiny, at the end of the volume;
//!   random, zero or constant content; some FUA), trims (the model turns them into zeros), reads
//!   compared with the model byte for byte, FLUSH;
//! - faults on one leaf of each mirror at a time (its "victim"), as ztest damages only one side of a
//!   mirror: `pool offline`/`online`, and with `cairn inject` and a percentage EIO or corruption on
//!   reads, and EIO, corruption, dropped or torn writes (write faults stay in the data area: mangled
//!   labels could make the leaf unopenable, which is right but would end the run); cleared later
//!   (`inject -c all`, `pool clear`);
//! - scrubs, in the background or waited for: a scrub must find a good copy of every block;
//! - moving a mirror's faults to its other leaf: clear, `pool online` (which resilvers what the victim
//!   missed), `pool scrub -w` (which repairs what was mangled), check that the victim lacks nothing,
//!   then the old victim must never show an error again;
//! - `pool export` and `pool import -d DIR` (the client disconnected first, or `-f` while connected);
//! - kill -9 of the daemon (sometimes with writes and a FLUSH in flight, sometimes after the txg timer)
//!   and restart: everything written before the last FLUSH must be there; a block changed since then
//!   may hold any of the states it went through since the flush (the model keeps a hash of each), and
//!   what is read back is adopted by the model;
//! - SIGTERM and restart (a clean stop commits everything: the model stays exact);
//! - snapshots (at most 3 kept): `dataset snapshot` (the model's copy), a snapshot's NBD export read
//!   whole and compared with its copy (and a write to it refused with EPERM), `dataset diff -j`
//!   covering every block that differs, `dataset rollback` (with `-r` to an older one), `destroy`, and
//!   `used` = usedbydataset + usedbysnapshots + usedbyrefreservation; snapshots survive kills, restarts
//!   and export/import with their contents;
//! - `pool status -j`: never a permanent error, the leaves that are not victims never have an error,
//!   the pool is ONLINE unless a victim is offline or may have been faulted.
//!
//! At the end: faults cleared, the victims brought back, the whole volume compared, a scrub with no
//! error, no leaf lacking writes, a clean stop and restart, the whole volume compared twice, and the pool
//! ONLINE with every leaf ONLINE and no permanent error.
//!
//! A failure names the seed and the operation number (and the offset for data mismatches), prints the
//! recent operations and the daemon's log, writes every operation to `$TMPDIR/cairn-stress-SEED.log`,
//! and says how to replay it: `CAIRN_STRESS_SEED=SEED CAIRN_STRESS_OPS=N cargo test -p cairn-tests
//! --test stress -- --ignored stress_long` runs the same operations up to N (to reduce a failure, lower
//! N). `CAIRN_STRESS_SEED` also adds that seed to the short run, and `CAIRN_STRESS_KEEP=1` keeps a failed
//! run's directory (leaves, state, daemon logs).
//!
//! The operations depend only on the seed, never on timing; what timing changes (which txg a crash
//! lands in, which mirror child serves a read, how far a scan got) is what the model allows for.

use cairn_tests::{json_leaves, Daemon, Env, NbdClient, MIB};
use cairn_vdev::testleaf::XorShift;
use serde_json::Value;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

const POOL: &str = "tank";
const VOL: &str = "tank/vol";
const LEAF_SIZE: &str = "192M";
const VOL_SIZE: u64 = 96 * MIB;
/// The volume's block size (`-b 16K`): the unit of crash atomicity in the model.
const BS: u64 = 16 * 1024;
/// Most operations land in this first part of the volume, so blocks are overwritten often.
const HOT: u64 = 4 * MIB;
/// Largest read issued when comparing whole regions.
const READ_CHUNK: u64 = 4 * MIB;
/// The seed every default test run uses.
const FIXED_SEED: u64 = 0x00c0_ffee_5eed_0001;
/// Operations of one seed in the short run.
const SHORT_OPS: u64 = 1200;
/// How long `pool export` is retried while the daemon still counts a client that just disconnected.
const BUSY_RETRY: Duration = Duration::from_secs(10);
/// How long a scrub or resilver may take.
const SCAN_TIMEOUT: Duration = Duration::from_secs(120);
/// A little longer than the daemon's txg timer (5 s).
const SYNC_WAIT: Duration = Duration::from_millis(5500);
/// Operations shown in a failure message.
const LOG_TAIL: usize = 60;

// ---------------------------------------------------------------------------------------------------
// Randomness and hashing
// ---------------------------------------------------------------------------------------------------

/// The test leaves' xorshift64* generator, with what the schedule needs on top.
struct Rng(XorShift);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(XorShift::new(seed))
    }

    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `pct` percent.
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
    }
}

/// A 64-bit hash of a block's content. Two contents that differ in one 8-byte word never collide (each
/// step is a bijection of the state for a given word); other collisions have odds of about 2^-64.
fn hash(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ b.len() as u64;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(a)).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    for &x in words.remainder() {
        h = (h.rotate_left(5) ^ u64::from(x)).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The data area of a leaf as `OFFSET:LENGTH` for `inject --range`: everything but the labels and the
/// reserved gap after them.
fn data_area() -> String {
    let size = 192 * MIB;
    assert_eq!(LEAF_SIZE, "192M");
    let start = cairn_vdev::label::DATA_START;
    format!("{start}:{}", cairn_vdev::label::data_end(size) - start)
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")))
}

// ---------------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------------

/// When a run stops.
#[derive(Clone, Copy, Debug)]
enum Limit {
    Ops(u64),
    Time(Duration),
}

/// The one leaf of a mirror that faults are allowed on.
struct Victim {
    /// The leaf's absolute path.
    leaf: String,
    /// `pool offline` was run on it (and not `pool online` since).
    offline: bool,
    /// Faults injected on it since the daemon last started or the pool was last imported.
    faults: Vec<String>,
    /// It may have been faulted by too many errors since the last `pool clear` or `pool online`.
    may_fault: bool,
}

struct Stress<'e> {
    env: &'e Env,
    seed: u64,
    rng: Rng,
    /// The current operation's number (1-based; 0 while setting up, the last + 1 for the final checks).
    op: u64,
    daemon: Option<Daemon>,
    client: Option<NbdClient>,
    /// What the volume holds (exact while the daemon lives).
    model: Vec<u8>,
    /// Blocks changed since the last durable point -> hashes of the states they went through, starting
    /// with the durable one. After a crash each of them may hold any of these states.
    pending: BTreeMap<u64, Vec<u64>>,
    /// The directory holding the leaves (for `pool import -d`).
    disks: String,
    leaves: Vec<String>,
    victims: Vec<Victim>,
    /// One line per operation.
    log: Vec<String>,
    counts: BTreeMap<&'static str, u64>,
    /// Long runs may wait for the txg timer before a kill.
    patient: bool,
    /// Snapshots of the volume, oldest first: (name, what it holds).
    snaps: Vec<(String, Vec<u8>)>,
    /// Names given so far (for new ones).
    snap_serial: u64,
}

/// Runs one seed in its own environment; panics with the seed, the operation number and the recent
/// operations on any failure.
fn run_seed(seed: u64, limit: Limit, patient: bool) {
    let env = Env::new();
    eprintln!(
        "stress: seed {seed} ({seed:#x}), limit {limit:?}, in {}",
        env.dir().display()
    );
    let started = Instant::now();
    let mut st = Stress::new(&env, seed);
    st.patient = patient;
    let result = catch_unwind(AssertUnwindSafe(|| {
        st.setup();
        st.run(limit);
        st.finish();
    }));
    match result {
        Ok(()) => {
            eprintln!(
                "stress: seed {seed} passed: {} operations in {:.1} s: {:?}",
                st.op.saturating_sub(1),
                started.elapsed().as_secs_f64(),
                st.counts
            );
        }
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(no message)".into());
            let report = st.report(&msg);
            drop(st);
            let kept = if std::env::var_os("CAIRN_STRESS_KEEP").is_some() {
                format!("\nthe run's directory is kept: {}", env.keep().display())
            } else {
                "\n(set CAIRN_STRESS_KEEP=1 to keep the run's directory)".to_string()
            };
            panic!("{report}{kept}");
        }
    }
}

impl<'e> Stress<'e> {
    fn new(env: &'e Env, seed: u64) -> Stress<'e> {
        let mut rng = Rng::new(seed);
        env.mkdir("disks");
        let leaves = env.leaves(&["disks/a", "disks/b", "disks/c", "disks/d"]);
        let victims = (0..2)
            .map(|m| Victim {
                leaf: leaves[2 * m + rng.below(2) as usize].clone(),
                offline: false,
                faults: Vec::new(),
                may_fault: false,
            })
            .collect();
        Stress {
            env,
            seed,
            rng,
            op: 0,
            daemon: None,
            client: None,
            model: vec![0; VOL_SIZE as usize],
            pending: BTreeMap::new(),
            disks: env.p("disks"),
            leaves,
            victims,
            log: Vec::new(),
            counts: BTreeMap::new(),
            patient: false,
            snaps: Vec::new(),
            snap_serial: 0,
        }
    }

    /// The failure message: seed, operation, what failed, the recent operations and the daemon's log.
    fn report(&self, msg: &str) -> String {
        let mut s = format!(
            "STRESS FAILURE: seed {} ({:#x}), operation {}:\n{msg}\n\nreplay (the same operations; \
             what depends on timing may take a few tries): CAIRN_STRESS_SEED={} CAIRN_STRESS_OPS={} \
             cargo test -p cairn-tests --test stress -- --ignored --nocapture stress_long\n\
             victims: {}\n\nlast operations:\n",
            self.seed,
            self.seed,
            self.op,
            self.seed,
            self.op,
            self.victims
                .iter()
                .map(|v| v.leaf.rsplit('/').next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join(", "),
        );
        let from = self.log.len().saturating_sub(LOG_TAIL);
        for l in &self.log[from..] {
            s.push_str("  ");
            s.push_str(l);
            s.push('\n');
        }
        let path = std::env::temp_dir().join(format!("cairn-stress-{}.log", self.seed));
        if std::fs::write(&path, self.log.join("\n") + "\n").is_ok() {
            s.push_str(&format!("(all operations: {})\n", path.display()));
        }
        if let Some(d) = &self.daemon {
            let log = d.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(40);
            s.push_str("\nthe daemon's log (tail):\n");
            for l in &lines[from..] {
                s.push_str("  ");
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    fn note(&mut self, what: String) {
        self.log.push(format!("{:>6} {what}", self.op));
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_insert(0) += 1;
    }

    /// Fails the run (the message gets the seed and the operation number from [`run_seed`]).
    fn fail(&self, msg: String) -> ! {
        panic!("{msg}")
    }

    /// Runs a `cairn` command that must succeed; returns its stdout.
    fn cairn(&mut self, args: &[&str]) -> String {
        self.note(format!("cairn {}", args.join(" ")));
        let o = self.env.run(args);
        if o.code != 0 {
            self.fail(format!(
                "`cairn {}` failed (exit {}):\nstdout:\n{}\nstderr:\n{}",
                args.join(" "),
                o.code,
                o.stdout,
                o.stderr
            ));
        }
        o.stdout
    }

    fn client(&mut self) -> &mut NbdClient {
        if self.client.is_none() {
            self.connect();
        }
        self.client.as_mut().expect("connected")
    }

    fn connect(&mut self) {
        // The daemon listens once it has opened the pools; a refused GO right after a start or an
        // import would be a bug, so there is no retry.
        match self.env.nbd_connect(VOL) {
            Ok(c) => {
                if c.size() != VOL_SIZE {
                    self.fail(format!(
                        "the export {VOL} has size {}, want {VOL_SIZE}",
                        c.size()
                    ));
                }
                self.client = Some(c);
            }
            Err(e) => self.fail(format!("cannot connect to {VOL}: {e}")),
        }
    }

    fn daemon_alive(&mut self) {
        if let Some(d) = &mut self.daemon {
            if let Some(st) = d.try_status() {
                self.fail(format!("the daemon died ({st})"));
            }
        }
    }

    fn start_daemon(&mut self) {
        self.daemon = Some(self.env.serve());
    }

    // --- setup and end ---------------------------------------------------------------------------

    fn setup(&mut self) {
        let l = self.leaves.clone();
        self.cairn(&[
            "pool", "create", "--size", LEAF_SIZE, POOL, "mirror", &l[0], &l[1], "mirror", &l[2],
            &l[3],
        ]);
        // Compression by seed (the fixed seed gets lz4): constant-byte writes are stored
        // compressed, random ones plain, so both kinds of blocks go through every operation.
        let comp =
            ["compression=lz4", "compression=zstd", "compression=off"][(self.seed % 3) as usize];
        self.cairn(&[
            "dataset", "create", "-s", "-V", "96M", "-b", "16K", "-o", comp, VOL,
        ]);
        self.start_daemon();
        self.connect();
        self.op = 1;
    }

    fn run(&mut self, limit: Limit) {
        let start = Instant::now();
        let mut last_report = Instant::now();
        loop {
            match limit {
                Limit::Ops(n) if self.op > n => break,
                Limit::Time(d) if start.elapsed() >= d => break,
                _ => {}
            }
            if let Some(n) = env_u64("CAIRN_STRESS_OPS") {
                if self.op > n {
                    break;
                }
            }
            self.step();
            self.op += 1;
            if matches!(limit, Limit::Time(_)) && last_report.elapsed() >= Duration::from_secs(30) {
                last_report = Instant::now();
                eprintln!(
                    "stress: seed {} at operation {} after {:.0} s: {:?}",
                    self.seed,
                    self.op,
                    start.elapsed().as_secs_f64(),
                    self.counts
                );
            }
        }
    }

    /// One random operation.
    fn step(&mut self) {
        let r = self.rng.below(1000);
        match r {
            0..=274 => self.op_write(),
            275..=289 => self.op_snapshot(),
            290..=479 => self.op_read(),
            480..=559 => self.op_trim(),
            560..=659 => self.op_flush(),
            660..=709 => self.op_offline_online(),
            710..=779 => self.op_inject(),
            780..=814 => self.op_clear(),
            815..=834 => self.op_status(),
            835..=844 => self.op_map(),
            845..=864 => self.op_export_import(),
            865..=909 => self.op_kill(),
            910..=929 => self.op_restart(),
            930..=944 => self.op_verify_all(),
            945..=959 => self.op_scrub(),
            960..=969 => self.op_rotate(),
            _ => self.op_write_burst(),
        }
        self.daemon_alive();
    }

    fn finish(&mut self) {
        self.note("final checks".into());
        self.clear_faults();
        // Bring every victim back, offline or not: `online` resilvers what a leaf missed. (`pool clear`
        // of a faulted leaf does not start a resilver, unlike zpool clear, so a victim that was faulted
        // by write errors would otherwise keep lacking those writes.)
        for m in 0..self.victims.len() {
            let leaf = self.victims[m].leaf.clone();
            self.cairn(&["pool", "online", POOL, &leaf]);
            self.victims[m].offline = false;
        }
        self.flush();
        self.verify_all("after the victims came back");
        // As ztest ends: a scrub must find every block with a good copy, and once the resilvers are
        // done no leaf lacks anything.
        self.scrub_wait();
        for m in 0..self.victims.len() {
            self.no_resilver_needed(m, "at the end, after the resilvers and a scrub");
        }
        self.note("daemon stop (SIGTERM)".into());
        self.disconnect();
        self.stop_daemon();
        self.pending.clear();
        self.start_daemon();
        self.verify_all("after a clean stop and restart");
        self.verify_all("a second time after the restart");
        for i in 0..self.snaps.len() {
            self.check_snapshot(i);
        }
        self.check_space();
        self.disconnect();
        self.cairn(&["inject", "-c", "all", POOL]);
        self.cairn(&["pool", "clear", POOL]);
        let st = self.status();
        let state = st["state"].as_str().unwrap_or_default().to_string();
        if state != "ONLINE" || st["error_count"] != "0" {
            self.fail(format!(
                "at the end, after `pool clear`, the pool should be ONLINE without errors: state {state}, \
                 error_count {}:\n{}",
                st["error_count"],
                serde_json::to_string_pretty(&st).unwrap_or_default()
            ));
        }
        for (name, leaf) in json_leaves(&st) {
            if leaf["state"] != "ONLINE" {
                self.fail(format!(
                    "at the end, leaf {name} is {} instead of ONLINE:\n{}",
                    leaf["state"],
                    serde_json::to_string_pretty(&st).unwrap_or_default()
                ));
            }
        }
        self.stop_daemon();
    }

    fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let st = d.terminate();
            if st.code() != Some(0) {
                let log = d.log();
                self.fail(format!(
                    "the daemon should exit 0 after SIGTERM, got {st}; its log:\n{log}"
                ));
            }
        }
    }

    fn disconnect(&mut self) {
        if let Some(c) = self.client.take() {
            if let Err(e) = c.disconnect() {
                self.fail(format!("NBD disconnect failed: {e}"));
            }
        }
    }

    // --- ranges and content ----------------------------------------------------------------------

    /// A random extent of at most `max` bytes: block-aligned, unaligned, tiny or at the end of the
    /// volume; mostly in the hot region.
    fn extent(&mut self, max: u64) -> (u64, u64) {
        let region = if self.rng.chance(60) { HOT } else { VOL_SIZE };
        let max = max.min(region);
        match self.rng.below(100) {
            0..=34 => {
                let blocks = self.rng.range(1, (max / BS).max(1));
                let len = blocks * BS;
                let off = self.rng.below((region - len) / BS + 1) * BS;
                (off, len)
            }
            35..=79 => {
                let len = self.rng.range(1, max);
                let off = self.rng.below(region - len + 1);
                (off, len)
            }
            80..=89 => {
                let len = self.rng.range(1, 512);
                let off = self.rng.below(region - len + 1);
                (off, len)
            }
            _ => {
                let len = self.rng.range(1, max);
                let off = VOL_SIZE - len - self.rng.below(BS.min(VOL_SIZE - len) + 1);
                (off, len)
            }
        }
    }

    /// Content for a write: random (mostly), zeros or one repeated byte.
    fn content(&mut self, len: u64) -> (Vec<u8>, &'static str) {
        let mut data = vec![0u8; len as usize];
        let kind = match self.rng.below(10) {
            0 => "zeros",
            1 => {
                data.fill(self.rng.range(1, 255) as u8);
                "constant"
            }
            _ => {
                let mut r = Rng::new(self.seed ^ self.op.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                r.fill(&mut data);
                "random"
            }
        };
        (data, kind)
    }

    /// Records a change of `[off, off + len)` to `data` (None: zeros) in the model, and the states the
    /// touched blocks go through since the last durable point.
    fn apply(&mut self, off: u64, len: u64, data: Option<&[u8]>) {
        let first = off / BS;
        let last = (off + len - 1) / BS;
        for b in first..=last {
            if !self.pending.contains_key(&b) {
                let h = hash(self.block(b));
                self.pending.insert(b, vec![h]);
            }
        }
        let range = off as usize..(off + len) as usize;
        match data {
            Some(d) => self.model[range].copy_from_slice(d),
            None => self.model[range].fill(0),
        }
        for b in first..=last {
            let h = hash(self.block(b));
            let states = self.pending.get_mut(&b).expect("pending block");
            if states.last() != Some(&h) {
                states.push(h);
            }
        }
    }

    fn block(&self, b: u64) -> &[u8] {
        &self.model[(b * BS) as usize..((b + 1) * BS) as usize]
    }

    // --- data operations -------------------------------------------------------------------------

    fn op_write(&mut self) {
        let max = if self.rng.chance(5) {
            2 * MIB
        } else {
            256 * 1024
        };
        let (off, len) = self.extent(max);
        let (data, kind) = self.content(len);
        let fua = self.rng.chance(5);
        self.note(format!(
            "write{} {off} +{len} ({kind})",
            if fua { " FUA" } else { "" }
        ));
        self.count("write");
        let r = if fua {
            self.client().write_fua(off, &data)
        } else {
            self.client().write(off, &data)
        };
        if let Err(e) = r {
            self.fail(format!("WRITE of {len} bytes at offset {off} failed: {e}"));
        }
        self.apply(off, len, Some(&data));
        if fua {
            // A FUA write is durable on return: the blocks it wrote (a block is written whole, so with
            // whatever else changed in it) are exact now. The NBD contract promises nothing more,
            // although Cairn commits the whole txg.
            for b in off / BS..=(off + len - 1) / BS {
                self.pending.remove(&b);
            }
        }
    }

    /// Several block-aligned writes in a row to the same few blocks: many versions per block for the
    /// crash checks.
    fn op_write_burst(&mut self) {
        let base = self.rng.below(HOT / BS - 8);
        let n = self.rng.range(2, 12);
        self.note(format!(
            "burst of {n} writes in blocks {base}..{}",
            base + 8
        ));
        self.count("burst");
        for _ in 0..n {
            let b = base + self.rng.below(8);
            let blocks = self.rng.range(1, 8 - (b - base));
            let (off, len) = (b * BS, blocks * BS);
            let (data, _) = self.content(len);
            if let Err(e) = self.client().write(off, &data) {
                self.fail(format!("WRITE of {len} bytes at offset {off} failed: {e}"));
            }
            self.apply(off, len, Some(&data));
        }
    }

    fn op_trim(&mut self) {
        let max = if self.rng.chance(10) {
            8 * MIB
        } else {
            256 * 1024
        };
        let (off, len) = self.extent(max);
        self.note(format!("trim {off} +{len}"));
        self.count("trim");
        if let Err(e) = self.client().trim(off, len as u32) {
            self.fail(format!("TRIM of {len} bytes at offset {off} failed: {e}"));
        }
        self.apply(off, len, None);
    }

    fn op_read(&mut self) {
        let max = if self.rng.chance(5) {
            4 * MIB
        } else {
            256 * 1024
        };
        let (off, len) = self.extent(max);
        self.note(format!("read {off} +{len}"));
        self.count("read");
        self.check_range(off, len, "read");
    }

    fn flush(&mut self) {
        if let Err(e) = self.client().flush() {
            self.fail(format!("FLUSH failed: {e}"));
        }
        self.pending.clear();
    }

    fn op_flush(&mut self) {
        self.note("flush".into());
        self.count("flush");
        self.flush();
    }

    /// Reads `[off, off + len)` and compares it with the model.
    fn check_range(&mut self, off: u64, len: u64, what: &str) {
        let mut at = off;
        while at < off + len {
            let n = (off + len - at).min(READ_CHUNK);
            let got = match self.client().read(at, n as u32) {
                Ok(d) => d,
                Err(e) => self.fail(format!(
                    "{what}: READ of {n} bytes at offset {at} failed: {e}"
                )),
            };
            let want = &self.model[at as usize..(at + n) as usize];
            if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
                let bad = at + i as u64;
                let b = bad / BS;
                let bs = (b * BS).max(at) - at;
                let be = ((b + 1) * BS).min(at + n) - at;
                let differ = got[bs as usize..be as usize]
                    .iter()
                    .zip(&want[bs as usize..be as usize])
                    .filter(|(x, y)| x != y)
                    .count();
                let zeros = got[bs as usize..be as usize].iter().all(|&x| x == 0);
                self.fail(format!(
                    "{what}: data mismatch at volume offset {bad} (block {b}, read of {n} bytes at \
                     {at}): got {:#04x}, want {:#04x}; {differ} of the {} bytes read in that block \
                     differ{}",
                    got[i],
                    want[i],
                    be - bs,
                    if zeros { "; the block read back as zeros" } else { "" }
                ));
            }
            at += n;
        }
    }

    fn verify_all(&mut self, why: &str) {
        self.note(format!("verify the whole volume ({why})"));
        self.check_range(0, VOL_SIZE, &format!("whole-volume check {why}"));
    }

    fn op_verify_all(&mut self) {
        self.count("verify");
        self.verify_all("random check");
    }

    // --- faults ----------------------------------------------------------------------------------

    fn op_offline_online(&mut self) {
        let m = self.rng.below(2) as usize;
        let leaf = self.victims[m].leaf.clone();
        if self.victims[m].offline {
            self.count("online");
            self.cairn(&["pool", "online", POOL, &leaf]);
            self.victims[m].offline = false;
            self.victims[m].may_fault = !self.victims[m].faults.is_empty();
        } else {
            self.count("offline");
            self.cairn(&["pool", "offline", POOL, &leaf]);
            self.victims[m].offline = true;
        }
    }

    fn op_inject(&mut self) {
        let m = self.rng.below(2) as usize;
        let leaf = self.victims[m].leaf.clone();
        let pct = [1, 5, 10, 25, 50, 100][self.rng.below(6) as usize].to_string();
        let (kind, io) = match self.rng.below(8) {
            0 | 1 => ("io", "read"),
            2 | 3 => ("corrupt", "read"),
            4 => ("io", "write"),
            5 => ("drop", "write"),
            6 => ("torn", "write"),
            _ => ("corrupt", "write"),
        };
        self.count("inject");
        let mut args = vec!["inject", "-d", &leaf, "-e", kind, "-T", io, "-f", &pct];
        // Corrupted writes stay on the disk: keep them off the labels (as ztest does), or a leaf whose
        // four labels all got mangled could not be opened again, which is right but ends the run.
        let range = data_area();
        if io == "write" {
            args.extend(["--range", &range]);
        }
        args.push(POOL);
        let out = self.cairn(&args);
        if out.trim().parse::<u64>().is_err() {
            self.fail(format!(
                "`cairn inject` printed {out:?} instead of a fault id"
            ));
        }
        let v = &mut self.victims[m];
        v.faults.push(format!("{kind}/{io}/{pct}%"));
        v.may_fault = true;
    }

    fn clear_faults(&mut self) {
        self.cairn(&["inject", "-c", "all", POOL]);
        self.cairn(&["pool", "clear", POOL]);
        for v in &mut self.victims {
            v.faults.clear();
            v.may_fault = false;
        }
    }

    fn op_clear(&mut self) {
        self.count("clear");
        self.clear_faults();
    }

    fn status(&mut self) -> Value {
        let s = self.cairn(&["pool", "status", "-j", POOL]);
        self.parse_status(&s)
    }

    fn parse_status(&self, s: &str) -> Value {
        let v: Value = serde_json::from_str(s).unwrap_or_else(|e| {
            self.fail(format!("`pool status -j` printed invalid JSON ({e}):\n{s}"))
        });
        v["pools"][POOL].clone()
    }

    /// Waits until no scrub or resilver runs (polling `pool status -j`, not logged); returns the last
    /// status.
    fn wait_scan(&mut self) -> Value {
        let start = Instant::now();
        loop {
            let o = self.env.run(&["pool", "status", "-j", POOL]);
            if o.code != 0 {
                self.fail(format!(
                    "`cairn pool status -j {POOL}` failed (exit {}):\n{}",
                    o.code, o.stderr
                ));
            }
            let st = self.parse_status(&o.stdout);
            if st["scan_stats"]["state"] != "SCANNING" {
                return st;
            }
            if start.elapsed() > SCAN_TIMEOUT {
                self.fail(format!(
                    "a {} did not finish within {SCAN_TIMEOUT:?}:\n{}",
                    st["scan_stats"]["function"],
                    serde_json::to_string_pretty(&st["scan_stats"]).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `pool scrub -w` (after any running scan), then waits for what it queued. A scrub must find a
    /// good copy of every block: faults were only ever on one side of a mirror.
    fn scrub_wait(&mut self) {
        self.count("scrub_wait");
        let mut tries = 0;
        loop {
            self.wait_scan();
            self.note(format!("cairn pool scrub -w {POOL}"));
            let o = self.env.run(&["pool", "scrub", "-w", POOL]);
            if o.code == 0 {
                break;
            }
            // A resilver may start between the wait and the scrub (a leaf came back).
            tries += 1;
            if !o.stderr.contains("already in progress") || tries > 5 {
                self.fail(format!(
                    "`cairn pool scrub -w {POOL}` failed (exit {}):\n{}",
                    o.code, o.stderr
                ));
            }
        }
        let st = self.wait_scan();
        let scan = &st["scan_stats"];
        if scan["errors"] != "0" || st["error_count"] != "0" {
            self.fail(format!(
                "a scrub found blocks without a good copy although only one side of each mirror was \
                 ever disturbed:\n{}",
                serde_json::to_string_pretty(&st).unwrap_or_default()
            ));
        }
    }

    /// Asserts that mirror `m`'s victim lacks no txgs (`pool status -P` shows no "resilver needed").
    fn no_resilver_needed(&mut self, m: usize, when: &str) {
        let leaf = self.victims[m].leaf.clone();
        let text = self.cairn(&["pool", "status", "-P", POOL]);
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(leaf.as_str()))
            .unwrap_or_else(|| {
                self.fail(format!("`pool status -P` does not list {leaf}:\n{text}"))
            });
        if line.contains("resilver needed") || line.contains("(resilvering") {
            self.fail(format!(
                "{when}, leaf {leaf} still lacks writes (\"resilver needed\"):\n{text}"
            ));
        }
    }

    /// A scrub, in the background or waited for (faults may be active on the victims).
    fn op_scrub(&mut self) {
        if self.rng.chance(50) {
            self.scrub_wait();
        } else {
            self.count("scrub");
            self.note(format!("cairn pool scrub {POOL}"));
            let o = self.env.run(&["pool", "scrub", POOL]);
            if o.code != 0 && !o.stderr.contains("already in progress") {
                self.fail(format!(
                    "`cairn pool scrub {POOL}` failed (exit {}):\n{}",
                    o.code, o.stderr
                ));
            }
        }
    }

    /// Moves mirror `m`'s faults to its other leaf: clear the faults, bring the victim back (which
    /// resilvers what it missed), scrub (which repairs what was corrupted), check that it lacks
    /// nothing, reset the counters; from then on the old victim must never show an error.
    fn op_rotate(&mut self) {
        let m = self.rng.below(2) as usize;
        self.count("rotate");
        self.clear_faults();
        let leaf = self.victims[m].leaf.clone();
        // `online` also starts a resilver of what the leaf missed (while offline or faulted).
        self.cairn(&["pool", "online", POOL, &leaf]);
        self.victims[m].offline = false;
        self.scrub_wait();
        self.no_resilver_needed(m, "after online, resilver and scrub");
        self.cairn(&["pool", "clear", POOL]);
        let other = if self.leaves[2 * m] == leaf {
            self.leaves[2 * m + 1].clone()
        } else {
            self.leaves[2 * m].clone()
        };
        self.note(format!("mirror {m}: faults go to {other} from now on"));
        self.victims[m] = Victim {
            leaf: other,
            offline: false,
            faults: Vec::new(),
            may_fault: false,
        };
    }

    /// `pool status -j`: no permanent error ever, no error on the leaves that are never disturbed, the
    /// victims' states as the run left them.
    /// `nbdinfo --map` of the volume (NBD block status): a block is data exactly when the model holds
    /// non-zero bytes in it (zero writes and trims make holes), committed or not, whatever faults,
    /// restarts and resilvers happened. Blocks whose content is uncertain after a kill are skipped.
    fn op_map(&mut self) {
        self.note("map".into());
        self.count("map");
        let uri = self.env.nbd_uri(VOL);
        let out = self.env.tool("nbdinfo", &["--map", &uri]);
        if out.code != 0 {
            self.fail(format!("nbdinfo --map failed: {}", out.stderr));
        }
        let mut at = 0u64;
        for line in out.stdout.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let parsed = (f.len() >= 4)
                .then(|| Some((f[0].parse::<u64>().ok()?, f[1].parse::<u64>().ok()?)))
                .flatten();
            let Some((off, len)) = parsed else {
                self.fail(format!("bad nbdinfo --map line {line:?}"));
            };
            let data = f[3..].join(" ") == "data";
            if off != at || off % BS != 0 || len % BS != 0 {
                self.fail(format!(
                    "map extent {off} +{len} is not block-aligned or leaves a gap after {at}"
                ));
            }
            for b in off / BS..(off + len) / BS {
                if self.pending.contains_key(&b) {
                    continue;
                }
                let holds = self.block(b).iter().any(|&x| x != 0);
                if holds != data {
                    self.fail(format!(
                        "block status says block {b} is {} but it holds {}",
                        if data { "data" } else { "a hole" },
                        if holds { "data" } else { "only zeros" }
                    ));
                }
            }
            at = off + len;
        }
        if at != VOL_SIZE {
            self.fail(format!("block status covers {at} of {VOL_SIZE} bytes"));
        }
    }

    fn op_status(&mut self) {
        self.count("status");
        let st = self.status();
        let dump = || serde_json::to_string_pretty(&st).unwrap_or_default();
        if st["error_count"] != "0" {
            self.fail(format!(
                "the pool has permanent errors although only one side of each mirror was ever \
                 disturbed:\n{}",
                dump()
            ));
        }
        let quiet = self.victims.iter().all(|v| !v.offline && !v.may_fault);
        let state = st["state"].as_str().unwrap_or_default();
        if !(state == "ONLINE" || (!quiet && state == "DEGRADED")) {
            self.fail(format!(
                "the pool is {state} (victims offline: {:?}, may be faulted: {:?}):\n{}",
                self.victims.iter().map(|v| v.offline).collect::<Vec<_>>(),
                self.victims.iter().map(|v| v.may_fault).collect::<Vec<_>>(),
                dump()
            ));
        }
        // Errors the victims show (so a run shows that its faults bite).
        let mut seen_errors = 0;
        for (name, leaf) in json_leaves(&st) {
            let path = leaf["path"].as_str().unwrap_or(&name).to_string();
            let victim = self.victims.iter().find(|v| v.leaf == path);
            let lstate = leaf["state"].as_str().unwrap_or_default();
            match victim {
                None => {
                    let errs = ["read_errors", "write_errors", "checksum_errors"]
                        .map(|k| leaf[k].as_str().unwrap_or("?").to_string());
                    if lstate != "ONLINE" || errs.iter().any(|e| e != "0") {
                        self.fail(format!(
                            "leaf {path}, which is never disturbed, is {lstate} with read/write/\
                             checksum errors {errs:?}:\n{}",
                            dump()
                        ));
                    }
                }
                Some(v) => {
                    let errors: u64 = ["read_errors", "write_errors", "checksum_errors"]
                        .iter()
                        .filter_map(|k| leaf[*k].as_str()?.parse::<u64>().ok())
                        .sum();
                    seen_errors += errors;
                    let want_ok = if v.offline {
                        lstate == "OFFLINE"
                    } else if v.may_fault {
                        lstate == "ONLINE" || lstate == "FAULTED"
                    } else {
                        lstate == "ONLINE"
                    };
                    if !want_ok {
                        self.fail(format!(
                            "victim leaf {path} is {lstate} (offline: {}, faults since the last \
                             clear: {:?}):\n{}",
                            v.offline,
                            v.faults,
                            dump()
                        ));
                    }
                }
            }
        }
        *self.counts.entry("victim_errors_seen").or_insert(0) += seen_errors;
    }

    // --- export/import, crashes, restarts ----------------------------------------------------------

    // --- snapshots -------------------------------------------------------------------------------

    /// One of: take a snapshot, check one's export, check `diff`, roll back, destroy one; and the
    /// space figures.
    fn op_snapshot(&mut self) {
        let r = self.rng.below(100);
        if self.snaps.is_empty() || (r < 30 && self.snaps.len() < 3) {
            self.count("snapshot");
            self.snap_serial += 1;
            let name = format!("s{}", self.snap_serial);
            // The command commits the open txg: the snapshot holds exactly what was written.
            self.cairn(&["dataset", "snapshot", &format!("{VOL}@{name}")]);
            self.pending.clear();
            self.snaps.push((name, self.model.clone()));
        } else if r < 50 {
            self.count("snapshot-read");
            let i = self.rng.below(self.snaps.len() as u64) as usize;
            self.check_snapshot(i);
        } else if r < 65 {
            self.count("snapshot-diff");
            let i = self.rng.below(self.snaps.len() as u64) as usize;
            let name = format!("{VOL}@{}", self.snaps[i].0);
            let out = self.cairn(&["dataset", "diff", "-j", &name]);
            let v: Value = serde_json::from_str(&out)
                .unwrap_or_else(|e| self.fail(format!("diff -j is not JSON: {e}: {out}")));
            let ranges: Vec<(u64, u64)> = v["ranges"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
                        .collect()
                })
                .unwrap_or_else(|| self.fail(format!("diff -j has no ranges: {out}")));
            for b in 0..VOL_SIZE / BS {
                let r = (b * BS) as usize..((b + 1) * BS) as usize;
                if self.snaps[i].1[r.clone()] != self.model[r] {
                    let off = b * BS;
                    if !ranges.iter().any(|&(o, l)| o <= off && off < o + l) {
                        self.fail(format!(
                            "diff of {name}: block {b} differs but is not listed"
                        ));
                    }
                }
            }
        } else if r < 80 {
            self.count("rollback");
            // Mostly the newest; sometimes an older one with -r (later ones are destroyed).
            let i = if self.rng.chance(70) {
                self.snaps.len() - 1
            } else {
                self.rng.below(self.snaps.len() as u64) as usize
            };
            let name = format!("{VOL}@{}", self.snaps[i].0);
            if i + 1 < self.snaps.len() {
                let o = self.env.run(&["dataset", "rollback", &name]);
                if o.code == 0 || !o.stderr.contains("more recent snapshots") {
                    self.fail(format!(
                        "rollback to an older snapshot without -r: exit {}: {}",
                        o.code, o.stderr
                    ));
                }
                self.cairn(&["dataset", "rollback", "-r", &name]);
            } else {
                self.cairn(&["dataset", "rollback", &name]);
            }
            self.snaps.truncate(i + 1);
            self.model = self.snaps[i].1.clone();
            self.pending.clear();
            // The connected client sees the rolled-back contents at its next request.
            let (off, len) = self.extent(256 * 1024);
            self.check_range(off, len, "read after a rollback");
        } else {
            self.count("snapshot-destroy");
            let i = self.rng.below(self.snaps.len() as u64) as usize;
            let name = format!("{VOL}@{}", self.snaps[i].0);
            self.cairn(&["dataset", "destroy", &name]);
            self.snaps.remove(i);
        }
        self.check_space();
    }

    /// Read a snapshot's export whole and compare it with the model's copy; a write is refused.
    fn check_snapshot(&mut self, i: usize) {
        let export = format!("{VOL}@{}", self.snaps[i].0);
        self.note(format!("read {export} over NBD"));
        let mut c = match self.env.nbd_connect(&export) {
            Ok(c) => c,
            Err(e) => self.fail(format!("connecting to {export}: {e}")),
        };
        let mut at = 0;
        while at < VOL_SIZE {
            let n = READ_CHUNK.min(VOL_SIZE - at);
            let got = c
                .read(at, n as u32)
                .unwrap_or_else(|e| self.fail(format!("{export}: READ at {at}: {e}")));
            if got[..] != self.snaps[i].1[at as usize..(at + n) as usize] {
                self.fail(format!("{export}: data differs in the {n} bytes at {at}"));
            }
            at += n;
        }
        match c.write(0, &[1u8; 4096]) {
            Err(cairn_tests::NbdError::Server(1)) => {}
            other => self.fail(format!("a write to {export} gave {other:?}, not EPERM")),
        }
        if let Err(e) = c.disconnect() {
            self.fail(format!("disconnecting from {export}: {e}"));
        }
    }

    /// The volume's space figures add up.
    fn check_space(&mut self) {
        let out = self.cairn(&[
            "dataset",
            "get",
            "-H",
            "-p",
            "-o",
            "value",
            "used,usedbydataset,usedbysnapshots,usedbyrefreservation",
            VOL,
        ]);
        let v: Vec<u64> = out.lines().map(|l| l.trim().parse().unwrap_or(0)).collect();
        if v.len() != 4 || v[0] != v[1] + v[2] + v[3] {
            self.fail(format!("space does not add up: {v:?}"));
        }
    }

    fn op_export_import(&mut self) {
        self.count("export");
        let force = self.rng.chance(30);
        if force {
            // The daemon disconnects the client; nothing may be in flight.
            self.client();
            self.cairn(&["pool", "export", "-f", POOL]);
            self.client = None;
        } else {
            self.disconnect();
            self.note(format!("cairn pool export {POOL}"));
            // The daemon forgets a connection just after it closes it: retry while it says busy.
            let start = Instant::now();
            loop {
                let o = self.env.run(&["pool", "export", POOL]);
                if o.code == 0 {
                    break;
                }
                if !o.stderr.contains("busy") || start.elapsed() > BUSY_RETRY {
                    self.fail(format!(
                        "`cairn pool export {POOL}` after the client disconnected failed (exit {}, \
                         after {:?}):\n{}",
                        o.code,
                        start.elapsed(),
                        o.stderr
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // An export commits everything; faults live in the daemon and go with the pool.
        self.pending.clear();
        for v in &mut self.victims {
            v.faults.clear();
        }
        let disks = self.disks.clone();
        self.cairn(&["pool", "import", "-d", &disks, POOL]);
        self.connect();
    }

    fn op_kill(&mut self) {
        self.count("kill");
        let inflight = if self.rng.chance(50) {
            self.rng.range(1, 6)
        } else {
            0
        };
        // Writes sent but not acknowledged when the daemon dies may land or not: the model treats them
        // like writes since the last flush.
        for _ in 0..inflight {
            let b = self.rng.below(HOT / BS);
            let blocks = self.rng.range(1, 4).min(VOL_SIZE / BS - b);
            let (off, len) = (b * BS, blocks * BS);
            let (data, _) = self.content(len);
            self.note(format!("write {off} +{len} (not waiting for the reply)"));
            if let Err(e) = self.client().send_write(off, &data) {
                self.fail(format!("sending a WRITE at offset {off} failed: {e}"));
            }
            self.apply(off, len, Some(&data));
        }
        // A FLUSH in flight: the kill may land in the middle of its commit.
        if self.rng.chance(30) {
            self.note("flush (not waiting for the reply)".into());
            if let Err(e) = self.client().send_flush() {
                self.fail(format!("sending a FLUSH failed: {e}"));
            }
        }
        let delay = match self.rng.below(10) {
            0..=3 => Duration::ZERO,
            4..=8 => Duration::from_micros(self.rng.below(20_000)),
            // Long runs sometimes let the txg timer commit first, so that writes since the last FLUSH
            // are on disk when the daemon dies.
            _ if self.patient => SYNC_WAIT,
            _ => Duration::ZERO,
        };
        std::thread::sleep(delay);
        self.note(format!(
            "kill -9 the daemon after {delay:?} ({} blocks changed since the last flush)",
            self.pending.len()
        ));
        if let Some(d) = &mut self.daemon {
            d.kill();
        }
        self.daemon = None;
        self.client = None;
        for v in &mut self.victims {
            v.faults.clear();
        }
        self.note("restart the daemon".into());
        self.start_daemon();
        self.resolve_pending();
        if self.rng.chance(25) {
            self.verify_all("after kill -9");
        }
    }

    /// After a crash: each block changed since the last flush must hold one of the states it went
    /// through; the model adopts it.
    fn resolve_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let blocks: Vec<u64> = pending.keys().copied().collect();
        let (mut kept, mut old, mut newest) = (0u64, 0u64, 0u64);
        let mut i = 0;
        while i < blocks.len() {
            // A run of consecutive blocks, read at once.
            let mut j = i + 1;
            while j < blocks.len()
                && blocks[j] == blocks[j - 1] + 1
                && (blocks[j] - blocks[i] + 1) * BS <= READ_CHUNK
            {
                j += 1;
            }
            let (off, len) = (blocks[i] * BS, (blocks[j - 1] - blocks[i] + 1) * BS);
            let got = match self.client().read(off, len as u32) {
                Ok(d) => d,
                Err(e) => self.fail(format!(
                    "after kill -9: READ of {len} bytes at offset {off} failed: {e}"
                )),
            };
            for (k, &b) in blocks[i..j].iter().enumerate() {
                let data = &got[k * BS as usize..(k + 1) * BS as usize];
                let h = hash(data);
                let states = &pending[&b];
                match states.iter().position(|&s| s == h) {
                    Some(p) => {
                        if p == 0 {
                            old += 1;
                        } else if p + 1 == states.len() {
                            newest += 1;
                        }
                        kept += 1;
                        self.model[(b * BS) as usize..((b + 1) * BS) as usize]
                            .copy_from_slice(data);
                    }
                    None => {
                        let want = self.block(b);
                        let differ = data.iter().zip(want).filter(|(x, y)| x != y).count();
                        let first = data.iter().zip(want).position(|(x, y)| x != y).unwrap_or(0);
                        self.fail(format!(
                            "after kill -9: block {b} (volume offset {}) holds none of the {} \
                             states it went through since the last flush; it differs from the \
                             newest in {differ} bytes, first at offset {}{}",
                            b * BS,
                            states.len(),
                            b * BS + first as u64,
                            if data.iter().all(|&x| x == 0) {
                                " (it reads as zeros)"
                            } else {
                                ""
                            }
                        ));
                    }
                }
            }
            i = j;
        }
        self.note(format!(
            "after the crash: {kept} changed blocks checked: {old} as of the last flush, {newest} \
             with their last write, {} in between",
            kept - old - newest
        ));
        *self.counts.entry("crash_block_old").or_insert(0) += old;
        *self.counts.entry("crash_block_newest").or_insert(0) += newest;
        *self.counts.entry("crash_block_between").or_insert(0) += kept - old - newest;
    }

    fn op_restart(&mut self) {
        self.count("restart");
        if self.rng.chance(50) {
            self.disconnect();
        }
        self.note("daemon stop (SIGTERM), then start".into());
        // A clean stop commits every acknowledged write.
        self.stop_daemon();
        self.client = None;
        self.pending.clear();
        for v in &mut self.victims {
            v.faults.clear();
        }
        self.start_daemon();
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------

/// The default run: a fixed seed, plus `CAIRN_STRESS_SEED` when it is set.
#[test]
fn stress_short() {
    run_seed(FIXED_SEED, Limit::Ops(SHORT_OPS), false);
    if let Some(seed) = env_u64("CAIRN_STRESS_SEED") {
        if seed != FIXED_SEED {
            run_seed(seed, Limit::Ops(SHORT_OPS), false);
        }
    }
}

/// The long run (`scripts/stress [SECONDS] [SEED]`): `CAIRN_STRESS_SECS` seconds (default 300) with
/// seed `CAIRN_STRESS_SEED` (default: from the clock, printed).
#[test]
#[ignore = "long: run with scripts/stress"]
fn stress_long() {
    let secs = env_u64("CAIRN_STRESS_SECS").unwrap_or(300);
    let seed = env_u64("CAIRN_STRESS_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        t.as_secs() ^ (u64::from(t.subsec_nanos()) << 20) ^ u64::from(std::process::id())
    });
    eprintln!("stress_long: seed {seed} for {secs} s (replay: scripts/stress {secs} {seed})");
    // CAIRN_STRESS_OPS (a replay) wins over the duration.
    let limit = match env_u64("CAIRN_STRESS_OPS") {
        Some(n) => Limit::Ops(n),
        None => Limit::Time(Duration::from_secs(secs)),
    };
    run_seed(seed, limit, true);
}
