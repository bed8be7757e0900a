//! Pool core tests on in-memory and crash-simulating leaves: round trips through commit and reopen,
//! crash consistency at every write of a workload, label damage, space accounting and a full pool.

use cairn_pool::object::ObjType;
use cairn_pool::{HostInfo, OpenOptions, Pool, PoolError, TopKind};
use cairn_vdev::label;
use cairn_vdev::testleaf::{CrashLeaf, CrashMode, Fault, FaultIo, FaultKind, MemLeaf};
use cairn_vdev::Leaf;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;

fn host() -> HostInfo {
    HostInfo {
        host_id: 1,
        hostname: "test".into(),
    }
}

fn rnd(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len).map(|_| rnd(&mut s) as u8).collect()
}

fn reopen(devs: &[Arc<dyn Leaf>], guid: cairn_pool::Guid) -> Pool {
    let list = devs
        .iter()
        .map(|d| (PathBuf::from(d.path()), d.clone()))
        .collect();
    Pool::open_on(list, guid, &OpenOptions::default()).expect("reopen")
}

fn mem_leaves(n: usize, size: u64) -> Vec<Arc<dyn Leaf>> {
    (0..n)
        .map(|i| Arc::new(MemLeaf::new(size, &format!("/mem/l{i}"))) as Arc<dyn Leaf>)
        .collect()
}

#[test]
fn raid10_roundtrip_through_reopen() {
    let devs = mem_leaves(4, 128 * MIB);
    let pool = Pool::create_on(
        "tank",
        vec![
            (TopKind::Mirror, devs[0..2].to_vec()),
            (TopKind::Mirror, devs[2..4].to_vec()),
        ],
        &host(),
    )
    .unwrap();
    let guid = pool.guid();
    let obj = pool.create_object(ObjType::Volume, 14, 1).unwrap();
    let mut model = vec![0u8; 40 * MIB as usize];
    let mut seed = 99u64;
    for i in 0..200 {
        let off = rnd(&mut seed) % (model.len() as u64 - 70000);
        let len = 1 + (rnd(&mut seed) % 65536) as usize;
        let data = fill(i, len);
        pool.write_object(obj, off, &data).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
        if i % 50 == 49 {
            pool.sync().unwrap();
        }
    }
    // A big sequential write spread over both mirrors.
    let big = fill(7, 8 * MIB as usize);
    pool.write_object(obj, 30 * MIB, &big).unwrap();
    model[30 * MIB as usize..38 * MIB as usize].copy_from_slice(&big);
    pool.sync().unwrap();
    let st = pool.status();
    assert_eq!(st.state, "ONLINE");
    assert!(st.allocated > 8 * MIB, "allocated {}", st.allocated);
    drop(pool);
    let pool = reopen(&devs, guid);
    let mut back = vec![0u8; model.len()];
    pool.read_object(obj, 0, &mut back).unwrap();
    assert!(back == model, "data differs after reopen");
    // Both mirrors got data (dynamic striping).
    for d in [&devs[0], &devs[2]] {
        let mut b = vec![0u8; 4 * MIB as usize];
        d.read_at(&mut b, label::DATA_START + 2 * MIB).unwrap();
        assert!(b.iter().any(|&x| x != 0), "{} holds no data", d.path());
    }
}

#[test]
fn mirror_survives_garbage_on_one_side() {
    let devs = mem_leaves(2, 96 * MIB);
    let pool = Pool::create_on("m", vec![(TopKind::Mirror, devs.clone())], &host()).unwrap();
    let guid = pool.guid();
    let obj = pool.create_object(ObjType::Volume, 14, 1).unwrap();
    let data = fill(3, 16 * MIB as usize);
    pool.write_object(obj, 0, &data).unwrap();
    drop(pool);
    // Garbage over the whole data area of leaf 0.
    let end = label::data_end(devs[0].size());
    let junk = fill(5, (end - label::DATA_START) as usize);
    devs[0].write_at(&junk, label::DATA_START).unwrap();
    let pool = reopen(&devs, guid);
    let mut back = vec![0u8; data.len()];
    pool.read_object(obj, 0, &mut back).unwrap();
    assert!(back == data);
    let st = pool.status();
    let leaf0 = &st.root.children[0].children[0];
    assert!(leaf0.checksum_errors > 0);
    assert_eq!(st.root.children[0].children[1].checksum_errors, 0);
}

#[test]
fn two_copies_on_one_leaf_survive_any_damaged_window() {
    // A single leaf: metadata (2-3 copies) and a copies=2 object keep their copies an eighth of the
    // leaf apart, so wiping any 2 MiB window leaves one good copy of everything.
    let data = fill(11, 8 * MIB as usize);
    let map = cairn_pool::alloc::TopAlloc::map_bytes(192 * MIB, cairn_pool::alloc::MAP_SLOTS);
    for k in 0..8u64 {
        let devs = mem_leaves(1, 256 * MIB);
        let pool = Pool::create_on("d", vec![(TopKind::Single, devs.clone())], &host()).unwrap();
        let guid = pool.guid();
        let obj = pool.create_object(ObjType::Volume, 14, 2).unwrap();
        pool.write_object(obj, 0, &data).unwrap();
        pool.sync().unwrap();
        pool.write_object(obj, 4 * MIB, &data[..MIB as usize])
            .unwrap();
        drop(pool);
        let at = label::DATA_START + map + k * 2 * MIB;
        devs[0].write_at(&vec![0xa5; 2 * MIB as usize], at).unwrap();
        let pool = reopen(&devs, guid);
        let mut back = vec![0u8; data.len()];
        pool.read_object(obj, 0, &mut back)
            .unwrap_or_else(|e| panic!("window {k} at {at}: {e}"));
        let mut want = data.clone();
        want[4 * MIB as usize..5 * MIB as usize].copy_from_slice(&data[..MIB as usize]);
        assert!(back == want, "window {k} at {at}: wrong data");
    }
}

#[test]
fn a_read_heals_a_bad_copy_from_another_dva() {
    // copies=2 on a single leaf: wiping the first copies, reading, then wiping the second copies
    // loses nothing, because the read rewrote the first copies.
    let data = fill(12, 4 * MIB as usize);
    let devs = mem_leaves(1, 256 * MIB);
    let pool = Pool::create_on("h", vec![(TopKind::Single, devs.clone())], &host()).unwrap();
    let guid = pool.guid();
    let asize = pool.status().size;
    let obj = pool.create_object(ObjType::Volume, 14, 2).unwrap();
    pool.write_object(obj, 0, &data).unwrap();
    drop(pool);
    let map = cairn_pool::alloc::TopAlloc::map_bytes(asize, cairn_pool::alloc::MAP_SLOTS);
    let first = label::DATA_START + map;
    let second = first + (asize - map) / 8;
    let wipe = |at: u64| devs[0].write_at(&vec![0x3c; 5 * MIB as usize], at).unwrap();
    wipe(first);
    let pool = reopen(&devs, guid);
    let mut back = vec![0u8; data.len()];
    pool.read_object(obj, 0, &mut back).unwrap();
    assert!(back == data, "read with the first copies wiped");
    fn cksum(v: &cairn_pool::pool::VdevStatus) -> u64 {
        v.checksum_errors + v.children.iter().map(cksum).sum::<u64>()
    }
    assert!(
        cksum(&pool.status().root) > 0,
        "the bad copies were counted"
    );
    drop(pool);
    wipe(second);
    let pool = reopen(&devs, guid);
    pool.read_object(obj, 0, &mut back).unwrap();
    assert!(
        back == data,
        "read with the second copies wiped after the heal"
    );
}

#[test]
fn three_of_four_labels_destroyed_on_every_leaf() {
    let devs = mem_leaves(2, 64 * MIB);
    let pool = Pool::create_on("l", vec![(TopKind::Mirror, devs.clone())], &host()).unwrap();
    let guid = pool.guid();
    let obj = pool.create_object(ObjType::Volume, 12, 1).unwrap();
    pool.write_object(obj, 4096, b"hello").unwrap();
    drop(pool);
    for (i, d) in devs.iter().enumerate() {
        let offs = label::label_offsets(d.size());
        for (j, off) in offs.iter().enumerate() {
            if j != i + 1 {
                d.write_at(&vec![0x5a; label::LABEL_SIZE as usize], *off)
                    .unwrap();
            }
        }
    }
    let pool = reopen(&devs, guid);
    let mut b = [0u8; 5];
    pool.read_object(obj, 4096, &mut b).unwrap();
    assert_eq!(&b, b"hello");
}

#[test]
fn trim_and_zero_writes_free_space_and_holes_read_zero() {
    let devs = mem_leaves(1, 128 * MIB);
    let pool = Pool::create_on("t", vec![(TopKind::Single, devs.clone())], &host()).unwrap();
    let obj = pool.create_object(ObjType::Volume, 14, 1).unwrap();
    let base = pool.status().allocated;
    pool.write_object(obj, 0, &fill(1, 32 * MIB as usize))
        .unwrap();
    pool.sync().unwrap();
    let full = pool.status().allocated;
    assert!(full >= base + 32 * MIB);
    pool.free_object_range(obj, 0, 16 * MIB).unwrap();
    pool.write_object(obj, 16 * MIB, &vec![0u8; 8 * MIB as usize])
        .unwrap();
    pool.sync().unwrap();
    let after = pool.status().allocated;
    assert!(after + 23 * MIB < full, "alloc {after} vs {full}");
    let mut b = vec![1u8; 24 * MIB as usize];
    pool.read_object(obj, 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    let (_, _, used, _) = pool.object_info(obj).unwrap();
    assert!((8 * MIB..9 * MIB).contains(&used), "used {used}");
    // Freed space is reused after the defer window.
    for _ in 0..4 {
        pool.write_object(obj, 40 * MIB, &fill(2, 4096)).unwrap();
        pool.sync().unwrap();
    }
    pool.write_object(obj, 0, &fill(9, 60 * MIB as usize))
        .unwrap();
    pool.sync().unwrap();
}

#[test]
fn full_pool_says_enospc_and_stays_consistent() {
    let devs = mem_leaves(1, 80 * MIB);
    let pool = Pool::create_on("f", vec![(TopKind::Single, devs.clone())], &host()).unwrap();
    let guid = pool.guid();
    let obj = pool.create_object(ObjType::Volume, 17, 1).unwrap();
    let chunk = fill(4, MIB as usize);
    let mut written = 0u64;
    let err = loop {
        match pool.write_object(obj, written, &chunk) {
            Ok(()) => written += MIB,
            Err(e) => break e,
        }
        if written > 200 * MIB {
            panic!("no ENOSPC");
        }
    };
    assert!(matches!(err, PoolError::NoSpace), "{err}");
    pool.sync().unwrap();
    drop(pool);
    let pool = reopen(&devs, guid);
    let mut b = vec![0u8; MIB as usize];
    pool.read_object(obj, written - MIB, &mut b).unwrap();
    assert!(b == chunk);
}

/// A leaf that counts writes across a set of leaves and, at the chosen write, snapshots every leaf's
/// crash image: the machine "dies" at that instant, with unflushed writes randomly lost or torn.
struct Tap {
    inner: Arc<CrashLeaf>,
    shared: Arc<Shared>,
}

struct Shared {
    writes: AtomicU64,
    trigger: u64,
    seed: u64,
    leaves: Mutex<Vec<Arc<CrashLeaf>>>,
    acked: AtomicU64,
    snapshot: Mutex<Option<(u64, Vec<Vec<u8>>)>>,
}

impl Leaf for Tap {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        let n = self.shared.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.shared.trigger {
            let leaves = self.shared.leaves.lock().unwrap();
            let imgs = leaves
                .iter()
                .enumerate()
                .map(|(i, l)| l.crash_image(CrashMode::Random(self.shared.seed + i as u64)))
                .collect();
            *self.shared.snapshot.lock().unwrap() =
                Some((self.shared.acked.load(Ordering::SeqCst), imgs));
        }
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn discard(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(off, len)
    }
    fn path(&self) -> &str {
        self.inner.path()
    }
}

/// The workload: 4 rounds of writes, each followed by an acknowledged sync. Returns the model after
/// each acknowledged round (index 0 = empty) and the total number of leaf writes.
type Snapshot = Option<(u64, Vec<Vec<u8>>)>;
type Workload = (Vec<Vec<u8>>, Snapshot, cairn_pool::Guid, u64, u64);

fn crash_workload(trigger: u64, seed: u64) -> Workload {
    let crash: Vec<Arc<CrashLeaf>> = (0..2)
        .map(|i| Arc::new(CrashLeaf::new(64 * MIB, &format!("/crash/l{i}"))))
        .collect();
    let shared = Arc::new(Shared {
        writes: AtomicU64::new(0),
        trigger,
        seed,
        leaves: Mutex::new(crash.clone()),
        acked: AtomicU64::new(0),
        snapshot: Mutex::new(None),
    });
    let devs: Vec<Arc<dyn Leaf>> = crash
        .iter()
        .map(|c| {
            Arc::new(Tap {
                inner: c.clone(),
                shared: shared.clone(),
            }) as Arc<dyn Leaf>
        })
        .collect();
    let pool = Pool::create_on("c", vec![(TopKind::Mirror, devs)], &host()).unwrap();
    let guid = pool.guid();
    let obj = pool.create_object(ObjType::Volume, 12, 1).unwrap();
    pool.sync().unwrap();
    shared.acked.store(1, Ordering::SeqCst);
    let size = 2 * MIB as usize;
    let mut model = vec![0u8; size];
    let mut models = vec![vec![0u8; size], model.clone()];
    let mut s = 1234u64;
    for round in 0..4u64 {
        for k in 0..12 {
            let off = (rnd(&mut s) % (size as u64 - 20000)) as usize;
            let len = 1 + (rnd(&mut s) % 20000) as usize;
            let d = fill(round * 100 + k, len);
            pool.write_object(obj, off as u64, &d).unwrap();
            model[off..off + len].copy_from_slice(&d);
        }
        if round == 2 {
            pool.free_object_range(obj, 4096 * 10, 4096 * 50).unwrap();
            model[4096 * 10..4096 * 60].fill(0);
        }
        pool.sync().unwrap();
        models.push(model.clone());
        shared.acked.store(round + 2, Ordering::SeqCst);
    }
    let total = shared.writes.load(Ordering::SeqCst);
    std::mem::forget(pool); // no final commit: the run ends at the last acknowledged sync
    let snap = shared.snapshot.lock().unwrap().take();
    (models, snap, guid, total, obj)
}

#[test]
fn crash_at_every_write_keeps_acknowledged_data() {
    let (_, _, _, total, _) = crash_workload(u64::MAX, 0);
    assert!(total > 20, "workload too small: {total} writes");
    let step = (total / 60).max(1);
    let mut checked = 0;
    let mut trigger = 1;
    while trigger <= total {
        let (models, snap, guid, _, obj) = crash_workload(trigger, trigger * 31);
        let (acked, imgs) = snap.expect("trigger fired");
        if acked == 0 {
            // Crashed while creating the pool: nothing was acknowledged; any outcome is fine.
            trigger += step;
            continue;
        }
        let devs: Vec<Arc<dyn Leaf>> = imgs
            .into_iter()
            .enumerate()
            .map(|(i, img)| {
                Arc::new(MemLeaf::from_image(img, &format!("/crash/l{i}"))) as Arc<dyn Leaf>
            })
            .collect();
        let pool = reopen(&devs, guid);
        let mut back = vec![0u8; models[1].len()];
        pool.read_object(obj, 0, &mut back)
            .unwrap_or_else(|e| panic!("trigger {trigger}: read failed: {e}"));
        let a = acked as usize;
        let ok = back == models[a] || (a + 1 < models.len() && back == models[a + 1]);
        assert!(
            ok,
            "trigger {trigger}: data matches neither acknowledged round {a} nor the next"
        );
        // The reopened pool keeps working, across more sessions: new allocations must never land on
        // blocks the committed state still uses (leftovers of the interrupted commit must not count).
        let mut expect = back.clone();
        pool.write_object(obj, 0, b"again").unwrap();
        expect[..5].copy_from_slice(b"again");
        pool.sync().unwrap();
        drop(pool);
        let pool = reopen(&devs, guid);
        let fresh = fill(trigger, 3 * MIB as usize);
        let obj2 = pool.create_object(ObjType::Volume, 12, 1).unwrap();
        pool.write_object(obj2, 0, &fresh).unwrap();
        pool.write_object(obj, 8192, b"third").unwrap();
        expect[8192..8197].copy_from_slice(b"third");
        pool.sync().unwrap();
        drop(pool);
        let pool = reopen(&devs, guid);
        let mut back = vec![0u8; expect.len()];
        pool.read_object(obj, 0, &mut back)
            .unwrap_or_else(|e| panic!("trigger {trigger}: read after two more sessions: {e}"));
        assert!(
            back == expect,
            "trigger {trigger}: data changed in later sessions"
        );
        let mut b2 = vec![0u8; fresh.len()];
        pool.read_object(obj2, 0, &mut b2).unwrap();
        assert!(b2 == fresh);
        checked += 1;
        trigger += step;
    }
    assert!(checked >= 20, "only {checked} crash points checked");
}

#[test]
fn sync_thread_commits_on_a_timer() {
    let devs = mem_leaves(1, 64 * MIB);
    let pool =
        Arc::new(Pool::create_on("s", vec![(TopKind::Single, devs.clone())], &host()).unwrap());
    let guid = pool.guid();
    let obj = pool.create_object(ObjType::Volume, 12, 1).unwrap();
    pool.start_sync_thread(std::time::Duration::from_millis(50));
    let before = pool.committed_txg();
    pool.write_object(obj, 0, b"timer").unwrap();
    let t0 = std::time::Instant::now();
    while pool.committed_txg() == before {
        assert!(t0.elapsed().as_secs() < 10, "no commit within 10 s");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // What the timer committed is on disk: a second open (without the first's final commit) sees it.
    let copy: Vec<Arc<dyn Leaf>> = devs
        .iter()
        .map(|d| {
            let mut img = vec![0u8; d.size() as usize];
            d.read_at(&mut img, 0).unwrap();
            Arc::new(MemLeaf::from_image(img, d.path())) as Arc<dyn Leaf>
        })
        .collect();
    let p2 = reopen(&copy, guid);
    let mut b = [0u8; 5];
    p2.read_object(obj, 0, &mut b).unwrap();
    assert_eq!(&b, b"timer");
}

#[test]
fn out_of_range_requests_are_refused_not_panics() {
    let devs = mem_leaves(1, 64 * MIB);
    let pool = Pool::create_on("r", vec![(TopKind::Single, devs)], &host()).unwrap();
    let obj = pool.create_object(ObjType::Volume, 12, 1).unwrap();
    assert!(pool.write_object(obj, u64::MAX - 2, b"abc").is_err());
    assert!(pool.read_object(obj, u64::MAX, &mut [0u8; 4]).is_err());
    assert!(pool.free_object_range(obj, 1, u64::MAX).is_err());
    assert!(pool.read_object(999, 0, &mut [0u8; 4]).is_err());
    // Far but legal offsets work and read back.
    pool.write_object(obj, 1 << 45, b"far").unwrap();
    pool.sync().unwrap();
    let mut b = [0u8; 3];
    pool.read_object(obj, 1 << 45, &mut b).unwrap();
    assert_eq!(&b, b"far");
}

/// Readers run without the pool lock while writers, trims and commits go on: every read must return
/// a whole, valid version of each block (never an error, never a reused block's contents).
#[test]
fn concurrent_reads_writes_and_commits_stay_consistent() {
    let devs = mem_leaves(4, 96 * MIB);
    let pool = Arc::new(
        Pool::create_on(
            "c",
            vec![
                (TopKind::Mirror, devs[0..2].to_vec()),
                (TopKind::Mirror, devs[2..4].to_vec()),
            ],
            &host(),
        )
        .unwrap(),
    );
    let obj = pool.create_object(ObjType::Volume, 14, 1).unwrap();
    const BS: usize = 16384;
    const NBLK: u64 = 512;
    let pattern = |blk: u64, ver: u64| -> Vec<u8> {
        let mut v = Vec::with_capacity(BS);
        while v.len() < BS {
            v.extend_from_slice(&blk.to_le_bytes());
            v.extend_from_slice(&ver.to_le_bytes());
        }
        v
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut handles = Vec::new();
    for w in 0..2u64 {
        let (pool, stop) = (pool.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut s = 17 + w;
            let mut ver = 1;
            while !stop.load(Ordering::Relaxed) {
                let blk = rnd(&mut s) % NBLK;
                if rnd(&mut s).is_multiple_of(8) {
                    pool.free_object_range(obj, blk * BS as u64, BS as u64)
                        .unwrap();
                } else {
                    pool.write_object(obj, blk * BS as u64, &pattern(blk, ver))
                        .unwrap();
                }
                ver += 1;
            }
        }));
    }
    {
        let (pool, stop) = (pool.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                pool.sync().unwrap();
            }
        }));
    }
    let reader = {
        let (pool, stop) = (pool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut s = 99u64;
            let mut reads = 0u64;
            let mut buf = vec![0u8; BS * 4];
            while !stop.load(Ordering::Relaxed) {
                let blk = rnd(&mut s) % (NBLK - 4);
                pool.read_object(obj, blk * BS as u64, &mut buf).unwrap();
                for (i, chunk) in buf.chunks(BS).enumerate() {
                    let b = u64::from_le_bytes(chunk[0..8].try_into().unwrap());
                    let v = u64::from_le_bytes(chunk[8..16].try_into().unwrap());
                    if b == 0 && v == 0 {
                        assert!(chunk.iter().all(|&x| x == 0), "torn hole");
                        continue;
                    }
                    assert_eq!(
                        b,
                        blk + i as u64,
                        "block {} holds block {b}'s data",
                        blk + i as u64
                    );
                    assert!(chunk == pattern(b, v).as_slice(), "torn or mixed block {b}");
                }
                reads += 1;
            }
            reads
        })
    };
    std::thread::sleep(std::time::Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let reads = reader.join().unwrap();
    assert!(reads > 100, "only {reads} reads");
    assert!(
        pool.committed_txg().0 > 20,
        "only {} commits",
        pool.committed_txg()
    );
}

/// A session that opened from a clean uberblock marks the pool in use before its first commit, so a
/// crash anywhere in that commit is seen as an unclean close by the next open (which then cleans up
/// leftovers of the interrupted commit).
#[test]
fn clean_flag_is_cleared_before_the_first_commit() {
    let devs = mem_leaves(2, 64 * MIB);
    let pool = Pool::create_on("k", vec![(TopKind::Mirror, devs.clone())], &host()).unwrap();
    let guid = pool.guid();
    let obj = pool.create_object(ObjType::Volume, 12, 1).unwrap();
    pool.write_object(obj, 0, b"one").unwrap();
    drop(pool); // clean close
    let pool = reopen(&devs, guid);
    assert!(pool.opened_clean());
    drop(pool); // nothing committed: still clean
    let pool = reopen(&devs, guid);
    assert!(
        pool.opened_clean(),
        "a session that wrote nothing changed the pool"
    );
    pool.write_object(obj, 0, b"two").unwrap();
    pool.sync().unwrap();
    std::mem::forget(pool); // crash after the first commit
    let pool = reopen(&devs, guid);
    assert!(!pool.opened_clean(), "a crashed session looked clean");
    let mut b = [0u8; 3];
    pool.read_object(obj, 0, &mut b).unwrap();
    assert_eq!(&b, b"two");
    pool.write_object(obj, 8, b"x").unwrap();
    drop(pool); // this session committed, so its close is clean
                // Now the case that matters: the first commit after a clean open dies before its uberblock.
    let pool = reopen(&devs, guid);
    assert!(pool.opened_clean());
    for d in &devs {
        let (_, faults) = pool.leaf_faults(d.path()).unwrap();
        let end = label::data_end(d.size());
        faults.add(
            Fault::new(FaultKind::Io, FaultIo::Write)
                .with_range(label::DATA_START, end - label::DATA_START),
        );
    }
    pool.write_object(obj, 0, b"three").unwrap();
    assert!(pool.sync().is_err(), "the commit should have failed");
    std::mem::forget(pool);
    let pool = reopen(&devs, guid);
    assert!(
        !pool.opened_clean(),
        "a session that died in its first commit looked clean"
    );
    pool.read_object(obj, 0, &mut b).unwrap();
    assert_eq!(&b, b"two");
}

/// Whole blocks are written to the leaves before their txg commits, outside the pool lock. When such
/// a write fails on every copy, the data is kept and the commit writes it; nothing is lost or wrong.
#[test]
fn early_block_writes_failing_on_every_copy_are_written_by_the_commit() {
    let devs = mem_leaves(2, 96 * MIB);
    let pool = Pool::create_on("w", vec![(TopKind::Mirror, devs.clone())], &host()).unwrap();
    let guid = pool.guid();
    let obj = pool.create_object(ObjType::Volume, 14, 1).unwrap();
    let before = fill(11, 4 * MIB as usize);
    pool.write_object(obj, 0, &before).unwrap();
    pool.sync().unwrap();
    // Every write fails on both children (flushes too, so nothing can commit meanwhile).
    let faults = pool.all_leaf_faults();
    let ids: Vec<u64> = faults
        .iter()
        .map(|(_, f)| f.add(Fault::new(FaultKind::Io, FaultIo::Write)))
        .collect();
    let data = fill(12, 2 * MIB as usize);
    pool.write_object(obj, MIB, &data).unwrap();
    let mut expect = before.clone();
    expect[MIB as usize..3 * MIB as usize].copy_from_slice(&data);
    let mut back = vec![0u8; expect.len()];
    pool.read_object(obj, 0, &mut back).unwrap();
    assert!(back == expect, "reads before the commit see the new data");
    for ((_, f), id) in faults.iter().zip(ids) {
        assert!(f.clear(id));
    }
    pool.sync().unwrap();
    drop(pool);
    let pool = reopen(&devs, guid);
    pool.read_object(obj, 0, &mut back).unwrap();
    assert!(back == expect, "the committed data is the new data");
}

/// Whole blocks overwritten again, partly overwritten and trimmed while their first writes are still
/// uncommitted: the last version wins, and the replaced copies are freed, not leaked.
#[test]
fn uncommitted_whole_blocks_rewritten_partly_rewritten_and_trimmed() {
    let devs = mem_leaves(4, 96 * MIB);
    let pool = Pool::create_on(
        "r",
        vec![
            (TopKind::Mirror, devs[..2].to_vec()),
            (TopKind::Mirror, devs[2..].to_vec()),
        ],
        &host(),
    )
    .unwrap();
    let guid = pool.guid();
    let obj = pool.create_object(ObjType::Volume, 14, 1).unwrap();
    pool.sync().unwrap();
    let (_, alloc0, _) = pool.space();
    let len = 8 * MIB as usize;
    let mut expect = fill(21, len);
    pool.write_object(obj, 0, &expect).unwrap();
    let again = fill(22, len);
    pool.write_object(obj, 0, &again).unwrap();
    expect.copy_from_slice(&again);
    // Part of one block (read-modify-write of a block only written, not committed).
    pool.write_object(obj, 5000, &[0xAB; 3000]).unwrap();
    expect[5000..8000].fill(0xAB);
    // Trim 1 MiB of whole blocks, and zero one more block by writing zeros.
    pool.free_object_range(obj, 2 * MIB, MIB).unwrap();
    expect[2 * MIB as usize..3 * MIB as usize].fill(0);
    pool.write_object(obj, 4 * MIB, &[0u8; 16384]).unwrap();
    expect[4 * MIB as usize..4 * MIB as usize + 16384].fill(0);
    let mut back = vec![0u8; len];
    pool.read_object(obj, 0, &mut back).unwrap();
    assert!(back == expect, "before the commit");
    pool.sync().unwrap();
    // Frees are deferred a few txgs; after that only the live blocks count.
    for _ in 0..4 {
        pool.sync().unwrap();
    }
    drop(pool);
    let pool = reopen(&devs, guid);
    pool.read_object(obj, 0, &mut back).unwrap();
    assert!(back == expect, "after reopening");
    let live = len as u64 - MIB - 16384; // pool space counts a mirrored block once
    let (_, alloc, _) = pool.space();
    assert!(
        alloc - alloc0 >= live && alloc - alloc0 < live + 2 * MIB,
        "allocated {} bytes for {live} bytes of live data",
        alloc - alloc0
    );
}

/// Read-modify-writes read their partial blocks before taking the pool lock. Writers that share blocks
/// (each owns one 4 KiB quarter of every 16 KiB block) while commits run must never undo each other's
/// updates: a block that changed after it was read is read again.
#[test]
fn concurrent_partial_writes_to_shared_blocks_lose_nothing() {
    let devs = mem_leaves(2, 96 * MIB);
    let pool =
        Arc::new(Pool::create_on("p", vec![(TopKind::Mirror, devs.clone())], &host()).unwrap());
    let guid = pool.guid();
    let obj = pool.create_object(ObjType::Volume, 14, 1).unwrap();
    const BS: u64 = 16384;
    const PART: u64 = 4096;
    const NBLK: u64 = 48;
    let piece = |t: u64, blk: u64, ver: u64| -> Vec<u8> {
        let mut v = Vec::with_capacity(PART as usize);
        while v.len() < PART as usize {
            v.extend_from_slice(&(t << 56 | blk << 32 | ver).to_le_bytes());
        }
        v
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let committer = {
        let (pool, stop) = (pool.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                pool.sync().unwrap();
            }
        })
    };
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let mut last = vec![0u64; NBLK as usize];
                let mut s = 1000 + t;
                for ver in 1..=6000u64 {
                    let blk = rnd(&mut s) % NBLK;
                    pool.write_object(obj, blk * BS + t * PART, &piece(t, blk, ver))
                        .unwrap();
                    last[blk as usize] = ver;
                }
                last
            })
        })
        .collect();
    let lasts: Vec<Vec<u64>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    committer.join().unwrap();
    let check = |pool: &Pool, when: &str| {
        let mut buf = vec![0u8; (NBLK * BS) as usize];
        pool.read_object(obj, 0, &mut buf).unwrap();
        for (t, last) in lasts.iter().enumerate() {
            for blk in 0..NBLK {
                let at = (blk * BS + t as u64 * PART) as usize;
                let got = &buf[at..at + PART as usize];
                let want = if last[blk as usize] == 0 {
                    vec![0u8; PART as usize]
                } else {
                    piece(t as u64, blk, last[blk as usize])
                };
                assert!(
                    got == want,
                    "{when}: writer {t}'s part of block {blk} was lost"
                );
            }
        }
    };
    check(&pool, "before the last commit");
    pool.sync().unwrap();
    drop(pool);
    let pool = reopen(&devs, guid);
    check(&pool, "after reopening");
}

/// A leaf whose writes panic while armed (a bug below the pool, simulated).
struct PanicLeaf {
    inner: MemLeaf,
    armed: std::sync::atomic::AtomicBool,
}

impl Leaf for PanicLeaf {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.armed.load(Ordering::SeqCst) {
            panic!("simulated bug in a leaf write at {offset}");
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn path(&self) -> &str {
        self.inner.path()
    }
}

/// A write whose thread unwinds (a panic below the pool) between counting its blocks in flight and
/// reporting them must not leave every later commit waiting for it with the pool lock held (a daemon
/// hung that way): it counts as failed, the commit writes its blocks, and the pool goes on.
#[test]
fn a_write_that_panics_in_flight_does_not_wedge_the_commit() {
    let leaves: Vec<Arc<PanicLeaf>> = (0..2)
        .map(|i| {
            Arc::new(PanicLeaf {
                inner: MemLeaf::new(96 * MIB, &format!("/mem/p{i}")),
                armed: false.into(),
            })
        })
        .collect();
    let devs: Vec<Arc<dyn Leaf>> = leaves.iter().map(|l| l.clone() as Arc<dyn Leaf>).collect();
    let pool =
        Arc::new(Pool::create_on("p", vec![(TopKind::Mirror, devs.clone())], &host()).unwrap());
    let guid = pool.guid();
    let obj = pool.create_object(ObjType::Volume, 14, 1).unwrap();
    let old = fill(21, 2 * MIB as usize);
    pool.write_object(obj, 0, &old).unwrap();
    pool.sync().unwrap();

    for l in &leaves {
        l.armed.store(true, Ordering::SeqCst);
    }
    let new = fill(22, 2 * MIB as usize);
    let p2 = pool.clone();
    let n2 = new.clone();
    let r = std::thread::spawn(move || {
        std::panic::catch_unwind(AssertUnwindSafe(|| p2.write_object(obj, 0, &n2)))
    })
    .join()
    .unwrap();
    assert!(r.is_err(), "the write should have panicked");
    for l in &leaves {
        l.armed.store(false, Ordering::SeqCst);
    }
    // The commit must finish (before: it waited forever for the write that never reported).
    let (tx, rx) = std::sync::mpsc::channel();
    let p3 = pool.clone();
    std::thread::spawn(move || tx.send(p3.sync().map_err(|e| e.to_string())));
    let done = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the commit hung on a write that panicked in flight");
    done.expect("commit");
    // The unacknowledged write may or may not have landed, block by block; nothing else changed,
    // and the pool works on.
    let mut back = vec![0u8; old.len()];
    pool.read_object(obj, 0, &mut back).unwrap();
    for (i, (b, (o, n))) in back
        .chunks(16384)
        .zip(old.chunks(16384).zip(new.chunks(16384)))
        .enumerate()
    {
        assert!(
            b == o || b == n,
            "block {i} is neither the old nor the new data"
        );
    }
    let later = fill(23, MIB as usize);
    pool.write_object(obj, 4 * MIB, &later).unwrap();
    pool.sync().unwrap();
    let expect = back.clone();
    drop(pool);
    let pool = reopen(&devs, guid);
    pool.read_object(obj, 0, &mut back).unwrap();
    assert!(back == expect);
    let mut l = vec![0u8; MIB as usize];
    pool.read_object(obj, 4 * MIB, &mut l).unwrap();
    assert!(l == later);
}
