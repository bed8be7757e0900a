//! Crash sweep of the snapshot operations: a workload of writes, snapshots, a clone, a promote, a
//! rollback, a volume destroy freed in the background and a snapshot destroy, with the leaves' state
//! captured (unflushed writes dropped or torn at random) at a sweep of points among its leaf writes.
//! Every captured state must import with the last acknowledged step or the one after it, read
//! exactly as that step left every volume and snapshot, and have allocation maps that equal a walk of
//! every tree; and the pool must keep working after it.

use cairn_pool::object::ObjType;
use cairn_pool::{HostInfo, OpenOptions, Pool, TopKind};
use cairn_vdev::testleaf::{CrashLeaf, CrashMode, MemLeaf};
use cairn_vdev::Leaf;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;
const VOL: usize = 2 * MIB as usize;

fn host() -> HostInfo {
    HostInfo {
        host_id: 1,
        hostname: "test".into(),
    }
}

/// Counts leaf writes and captures every leaf's crash image at write number `trigger`.
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
    captured: Mutex<Option<(u64, Vec<Vec<u8>>)>>,
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
            *self.shared.captured.lock().unwrap() =
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

/// What an acknowledged step left: contents by object, and the snapshot objects.
#[derive(Clone, Default)]
struct State {
    objects: BTreeMap<u64, Vec<u8>>,
    snapshots: BTreeSet<u64>,
}

struct Run {
    states: Vec<State>,
    captured: Option<(u64, Vec<Vec<u8>>)>,
    guid: cairn_pool::Guid,
    writes: u64,
}

fn pattern(b: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| b.wrapping_add((i / 4096) as u8)).collect()
}

fn workload(trigger: u64, seed: u64) -> Run {
    let crash: Vec<Arc<CrashLeaf>> = (0..2)
        .map(|i| Arc::new(CrashLeaf::new(64 * MIB, &format!("/crash/s{i}"))))
        .collect();
    let shared = Arc::new(Shared {
        writes: AtomicU64::new(0),
        trigger,
        seed,
        leaves: Mutex::new(crash.clone()),
        acked: AtomicU64::new(0),
        captured: Mutex::new(None),
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
    // Destroys and rollbacks are freed over many txgs: crashes fall between them too.
    pool.set_free_budget(100);
    let guid = pool.guid();
    let mut st = State::default();
    let mut states = vec![State::default()];
    let ack = |states: &mut Vec<State>, st: &State| {
        states.push(st.clone());
        shared
            .acked
            .store(states.len() as u64 - 1, Ordering::SeqCst);
    };
    // 1: a volume with data.
    let v = pool.create_object(ObjType::Volume, 12, 1).unwrap();
    pool.set_object_size(v, VOL as u64).unwrap();
    let mut vd = pattern(1, VOL);
    pool.write_object(v, 0, &vd).unwrap();
    pool.sync().unwrap();
    st.objects.insert(v, vd.clone());
    ack(&mut states, &st);
    // 2: snapshot, then overwrite half.
    let s1 = pool.atomically(|tx| tx.snapshot(&[v])).unwrap().0[0];
    pool.sync().unwrap();
    st.objects.insert(s1, vd.clone());
    st.snapshots.insert(s1);
    ack(&mut states, &st);
    vd[..VOL / 2].copy_from_slice(&pattern(50, VOL / 2));
    pool.write_object(v, 0, &vd[..VOL / 2]).unwrap();
    pool.sync().unwrap();
    st.objects.insert(v, vd.clone());
    ack(&mut states, &st);
    // 3: a clone of it, written.
    let c = pool.atomically(|tx| tx.clone_snapshot(s1, 1)).unwrap();
    let mut cd = st.objects[&s1].clone();
    cd[VOL / 4..VOL / 2].copy_from_slice(&pattern(90, VOL / 4));
    pool.write_object(c, (VOL / 4) as u64, &cd[VOL / 4..VOL / 2])
        .unwrap();
    pool.sync().unwrap();
    st.objects.insert(c, cd.clone());
    ack(&mut states, &st);
    // 4: a second snapshot of the volume, more writes, a rollback to it.
    let s2 = pool.atomically(|tx| tx.snapshot(&[v])).unwrap().0[0];
    pool.write_object(v, 4096 * 7, &pattern(120, 4096 * 30))
        .unwrap();
    pool.sync().unwrap();
    st.objects.insert(s2, vd.clone());
    st.snapshots.insert(s2);
    let mut v_later = vd.clone();
    v_later[4096 * 7..4096 * 37].copy_from_slice(&pattern(120, 4096 * 30));
    st.objects.insert(v, v_later);
    ack(&mut states, &st);
    pool.atomically(|tx| tx.rollback(v)).unwrap();
    pool.sync().unwrap();
    st.objects.insert(v, vd.clone());
    ack(&mut states, &st);
    // 5: promote the clone (s1 changes hands), then destroy the old origin's later snapshot and
    // the old origin itself (freed in the background), then s1's neighbour.
    pool.atomically(|tx| tx.promote(c)).unwrap();
    pool.sync().unwrap();
    ack(&mut states, &st);
    pool.atomically(|tx| tx.destroy_snapshot(s2)).unwrap();
    pool.sync().unwrap();
    st.objects.remove(&s2);
    st.snapshots.remove(&s2);
    ack(&mut states, &st);
    pool.atomically(|tx| tx.destroy_volume(v)).unwrap();
    let mut rounds = 0;
    while pool.freeing().unwrap() > 0 {
        pool.sync().unwrap();
        rounds += 1;
    }
    assert!(rounds > 2, "the destroy was freed in {rounds} txgs");
    st.objects.remove(&v);
    ack(&mut states, &st);
    pool.atomically(|tx| tx.destroy_snapshot(s1)).unwrap();
    pool.sync().unwrap();
    pool.sync().unwrap();
    st.objects.remove(&s1);
    st.snapshots.remove(&s1);
    ack(&mut states, &st);
    let writes = shared.writes.load(Ordering::SeqCst);
    std::mem::forget(pool); // no final commit: the run ends at the last acknowledged step
    let captured = shared.captured.lock().unwrap().take();
    Run {
        states,
        captured,
        guid,
        writes,
    }
}

fn matches(pool: &Pool, st: &State) -> Result<(), String> {
    for (&id, want) in &st.objects {
        let mut b = vec![0u8; VOL];
        pool.read_object(id, 0, &mut b)
            .map_err(|e| format!("object {id}: {e}"))?;
        if b != *want {
            return Err(format!("object {id} differs"));
        }
    }
    let links = pool.snapshot_links().map_err(|e| e.to_string())?;
    let snaps: BTreeSet<u64> = links
        .ds
        .iter()
        .filter(|(_, l)| l.snapshot)
        .map(|(&id, _)| id)
        .collect();
    if snaps != st.snapshots {
        return Err(format!("snapshots {snaps:?}, expected {:?}", st.snapshots));
    }
    Ok(())
}

#[test]
fn a_crash_anywhere_in_snapshot_clone_promote_rollback_and_destroy_loses_nothing() {
    let total = workload(u64::MAX, 0).writes;
    assert!(total > 50, "workload too small: {total} writes");
    let step = (total / 70).max(1);
    let mut checked = 0;
    let mut trigger = 1;
    while trigger <= total {
        let run = workload(trigger, trigger * 17);
        let (acked, imgs) = run.captured.expect("trigger fired");
        if acked == 0 {
            trigger += step;
            continue;
        }
        let devs: Vec<Arc<dyn Leaf>> = imgs
            .into_iter()
            .enumerate()
            .map(|(i, img)| {
                Arc::new(MemLeaf::from_image(img, &format!("/crash/s{i}"))) as Arc<dyn Leaf>
            })
            .collect();
        let list = devs
            .iter()
            .map(|d| (PathBuf::from(d.path()), d.clone()))
            .collect();
        let pool = Pool::open_on(list, run.guid, &OpenOptions::default())
            .unwrap_or_else(|e| panic!("trigger {trigger}: import failed: {e}"));
        let a = acked as usize;
        let now = matches(&pool, &run.states[a]);
        let next = run.states.get(a + 1).map(|s| matches(&pool, s));
        assert!(
            now.is_ok() || next.as_ref().is_some_and(|r| r.is_ok()),
            "trigger {trigger}: neither step {a} ({now:?}) nor the next ({next:?})"
        );
        // Background frees left half done go on; the maps equal a walk of every tree.
        pool.set_free_budget(100);
        let au = pool.audit_space().unwrap();
        assert_eq!(
            au.referenced, au.allocated,
            "trigger {trigger}, at import: {au:?}"
        );
        for _ in 0..100 {
            if pool.freeing().unwrap() == 0 {
                break;
            }
            pool.sync().unwrap();
        }
        let au = pool.audit_space().unwrap();
        assert_eq!(au.referenced, au.allocated, "trigger {trigger}: {au:?}");
        assert_eq!(pool.freeing().unwrap(), 0, "trigger {trigger}");
        // And the pool keeps working: a new volume, a snapshot of it, its destroy.
        let n = pool.create_object(ObjType::Volume, 12, 1).unwrap();
        pool.set_object_size(n, VOL as u64).unwrap();
        pool.write_object(n, 0, &pattern(200, VOL)).unwrap();
        let s = pool.atomically(|tx| tx.snapshot(&[n])).unwrap().0[0];
        pool.write_object(n, 0, &pattern(201, VOL / 2)).unwrap();
        pool.atomically(|tx| tx.destroy_snapshot(s)).unwrap();
        pool.sync().unwrap();
        let au = pool.audit_space().unwrap();
        assert_eq!(
            au.referenced, au.allocated,
            "trigger {trigger}, later: {au:?}"
        );
        checked += 1;
        trigger += step;
    }
    assert!(checked >= 30, "only {checked} crash points checked");
}
