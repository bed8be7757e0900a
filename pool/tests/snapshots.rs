//! Snapshot mechanics at the pool level, on in-memory leaves: the birth-txg rule, deadlists,
//! clones, rollback and background frees, checked against a model and against a walk of every tree
//! (nothing leaked, nothing freed twice), through reopens.

use cairn_pool::object::ObjType;
use cairn_pool::{HostInfo, OpenOptions, Pool, PoolError, TopKind};
use cairn_vdev::testleaf::MemLeaf;
use cairn_vdev::Leaf;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const VOL: u64 = 2 * MIB;

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

fn mem_pool() -> (Vec<Arc<dyn Leaf>>, Pool) {
    let devs: Vec<Arc<dyn Leaf>> = (0..4)
        .map(|i| Arc::new(MemLeaf::new(128 * MIB, &format!("/mem/s{i}"))) as Arc<dyn Leaf>)
        .collect();
    let pool = Pool::create_on(
        "snap",
        vec![
            (TopKind::Mirror, devs[0..2].to_vec()),
            (TopKind::Mirror, devs[2..4].to_vec()),
        ],
        &host(),
    )
    .unwrap();
    (devs, pool)
}

fn reopen(devs: &[Arc<dyn Leaf>], guid: cairn_pool::Guid) -> Pool {
    let list = devs
        .iter()
        .map(|d| (PathBuf::from(d.path()), d.clone()))
        .collect();
    Pool::open_on(list, guid, &OpenOptions::default()).expect("reopen")
}

fn read_all(pool: &Pool, id: u64) -> Vec<u8> {
    let mut b = vec![0u8; VOL as usize];
    pool.read_object(id, 0, &mut b).unwrap();
    b
}

fn audit(pool: &Pool, why: &str) {
    let a = pool.audit_space().unwrap();
    assert_eq!(
        a.referenced, a.allocated,
        "{why}: referenced vs allocated: {a:?}"
    );
    assert_eq!(
        a.visited, a.referenced,
        "{why}: each block visited once: {a:?}"
    );
}

fn new_volume(pool: &Pool) -> u64 {
    let id = pool.create_object(ObjType::Volume, 12, 1).unwrap();
    pool.set_object_size(id, VOL).unwrap();
    id
}

#[test]
fn snapshot_keeps_old_bytes_and_destroy_frees_exactly_its_blocks() {
    let (_devs, pool) = mem_pool();
    let v = new_volume(&pool);
    pool.write_object(v, 0, &vec![1u8; MIB as usize]).unwrap();
    pool.sync().unwrap();
    let (s, _) = pool.atomically(|tx| tx.snapshot(&[v])).unwrap();
    let s = s[0];
    let before = pool.allocated();
    // Overwrite half: the old blocks stay for the snapshot.
    pool.write_object(v, 0, &vec![2u8; (MIB / 2) as usize])
        .unwrap();
    pool.sync().unwrap();
    assert!(pool.allocated() >= before + MIB / 2);
    let snap = read_all(&pool, s);
    assert!(snap[..MIB as usize].iter().all(|&b| b == 1));
    assert!(snap[MIB as usize..].iter().all(|&b| b == 0));
    let vol = read_all(&pool, v);
    assert!(vol[..(MIB / 2) as usize].iter().all(|&b| b == 2));
    assert!(vol[(MIB / 2) as usize..MIB as usize]
        .iter()
        .all(|&b| b == 1));
    audit(&pool, "after overwrite");
    // The snapshot's unique space: what the volume's deadlist holds.
    let sp = pool.ds_space(&[]).unwrap();
    let unique: u64 = sp[&v].dead.values().sum();
    // Half a MiB of data blocks only the snapshot has, and the indirect blocks above them (16 KiB,
    // two copies, per level).
    assert!(
        (MIB / 2..=MIB / 2 + 64 * 1024).contains(&unique),
        "unique {unique}"
    );
    assert!(pool
        .write_object(s, 0, b"x")
        .is_err_and(|e| e.to_string().contains("read-only")));
    let alloc = pool.allocated();
    pool.atomically(|tx| tx.destroy_snapshot(s)).unwrap();
    pool.sync().unwrap();
    pool.sync().unwrap();
    assert_eq!(pool.freeing().unwrap(), 0);
    let freed = alloc - pool.allocated();
    // The deadlist's own blocks go too.
    assert!(
        (MIB / 2..MIB / 2 + 256 * 1024).contains(&freed),
        "freed {freed}"
    );
    audit(&pool, "after destroy");
}

#[test]
fn rollback_and_clone_share_blocks() {
    let (devs, pool) = mem_pool();
    let guid = pool.guid();
    let v = new_volume(&pool);
    pool.write_object(v, 0, &vec![7u8; VOL as usize]).unwrap();
    let (s, _) = pool.atomically(|tx| tx.snapshot(&[v])).unwrap();
    let s = s[0];
    let c = pool.atomically(|tx| tx.clone_snapshot(s, 1)).unwrap();
    pool.write_object(c, 4096, &vec![9u8; 8192]).unwrap();
    pool.write_object(v, 0, &vec![3u8; 65536]).unwrap();
    pool.sync().unwrap();
    audit(&pool, "clone written");
    assert!(read_all(&pool, s).iter().all(|&b| b == 7));
    let cv = read_all(&pool, c);
    assert!(cv[4096..12288].iter().all(|&b| b == 9) && cv[..4096].iter().all(|&b| b == 7));
    // A snapshot with a clone cannot go.
    assert!(matches!(
        pool.atomically(|tx| tx.destroy_snapshot(s)),
        Err(PoolError::InUse(_))
    ));
    pool.atomically(|tx| tx.rollback(v)).unwrap();
    assert!(read_all(&pool, v).iter().all(|&b| b == 7));
    drop(pool);
    let pool = reopen(&devs, guid);
    assert!(read_all(&pool, v).iter().all(|&b| b == 7));
    audit(&pool, "after rollback and reopen");
    pool.atomically(|tx| tx.destroy_volume(c)).unwrap();
    pool.atomically(|tx| tx.destroy_snapshot(s)).unwrap();
    pool.sync().unwrap();
    audit(&pool, "clone and snapshot gone");
    assert!(read_all(&pool, v).iter().all(|&b| b == 7));
}

/// What a volume or snapshot should read.
struct Model {
    heads: BTreeMap<u64, Vec<u8>>,
    /// Snapshot -> (its head, contents).
    snaps: BTreeMap<u64, (u64, Vec<u8>)>,
}

#[test]
fn randomized_snapshots_clones_rollbacks_and_destroys_match_the_model() {
    let (devs, mut pool) = mem_pool();
    let guid = pool.guid();
    let mut m = Model {
        heads: BTreeMap::new(),
        snaps: BTreeMap::new(),
    };
    // Destroys and rollbacks spread over several txgs, with reopens and audits in between.
    pool.set_free_budget(97);
    let v = new_volume(&pool);
    m.heads.insert(v, vec![0u8; VOL as usize]);
    // CAIRN_SNAP_SEED and CAIRN_SNAP_STEPS run other and longer sequences.
    let mut seed = std::env::var("CAIRN_SNAP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    let steps = std::env::var("CAIRN_SNAP_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let mut promotes = 0;
    for step in 0..steps {
        let heads: Vec<u64> = m.heads.keys().copied().collect();
        let h = heads[(rnd(&mut seed) % heads.len() as u64) as usize];
        let op = rnd(&mut seed) % 12;
        match op {
            0..=3 => {
                let off = rnd(&mut seed) % (VOL - 1);
                let len = (1 + rnd(&mut seed) % 40_000).min(VOL - off);
                let byte = (step % 250 + 1) as u8;
                let data = vec![byte; len as usize];
                pool.write_object(h, off, &data).unwrap();
                m.heads.get_mut(&h).unwrap()[off as usize..(off + len) as usize].fill(byte);
            }
            4 => {
                let off = rnd(&mut seed) % (VOL - 1);
                let len = (1 + rnd(&mut seed) % 100_000).min(VOL - off);
                pool.free_object_range(h, off, len).unwrap();
                m.heads.get_mut(&h).unwrap()[off as usize..(off + len) as usize].fill(0);
            }
            5 | 6 => {
                let (s, _) = pool.atomically(|tx| tx.snapshot(&[h])).unwrap();
                m.snaps.insert(s[0], (h, m.heads[&h].clone()));
            }
            7 if !m.snaps.is_empty() && m.heads.len() < 6 => {
                let snaps: Vec<u64> = m.snaps.keys().copied().collect();
                let s = snaps[(rnd(&mut seed) % snaps.len() as u64) as usize];
                let c = pool.atomically(|tx| tx.clone_snapshot(s, 1)).unwrap();
                m.heads.insert(c, m.snaps[&s].1.clone());
            }
            8 if !m.snaps.is_empty() => {
                let snaps: Vec<u64> = m.snaps.keys().copied().collect();
                let s = snaps[(rnd(&mut seed) % snaps.len() as u64) as usize];
                let links = pool.snapshot_links().unwrap();
                if std::env::var("CAIRN_SNAP_TRACE").is_ok() {
                    let l = &links.ds[&s];
                    eprintln!(
                        "destroy {s}: {l:?}; next {:?}; prev {:?}",
                        links.ds.get(&l.next),
                        links.ds.get(&l.prev)
                    );
                }
                let r = pool.atomically(|tx| tx.destroy_snapshot(s));
                if links.ds[&s].clones.is_empty() {
                    r.unwrap();
                    m.snaps.remove(&s);
                } else {
                    assert!(matches!(r, Err(PoolError::InUse(_))), "{r:?}");
                }
            }
            9 => {
                let links = pool.snapshot_links().unwrap();
                let own = links.snapshots_of(h);
                if let Some(&newest) = own.first() {
                    pool.atomically(|tx| tx.rollback(h)).unwrap();
                    let d = m.snaps[&newest].1.clone();
                    m.heads.insert(h, d);
                } else if m.heads.len() > 1 {
                    pool.atomically(|tx| tx.destroy_volume(h)).unwrap();
                    m.heads.remove(&h);
                }
            }
            10 => {
                let links = pool.snapshot_links().unwrap();
                if links.origin_of(h).is_some() {
                    let (moved, old) = pool.atomically(|tx| tx.promote(h)).unwrap();
                    promotes += 1;
                    for sid in moved {
                        m.snaps.get_mut(&sid).unwrap().0 = h;
                    }
                    assert!(m.heads.contains_key(&old));
                } else {
                    pool.sync().unwrap();
                }
            }
            _ => {
                if step % 5 == 0 {
                    drop(pool);
                    pool = reopen(&devs, guid);
                    pool.set_free_budget(97);
                }
            }
        }
        let every: u64 = std::env::var("CAIRN_SNAP_CHECK_EVERY")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        if std::env::var("CAIRN_SNAP_TRACE").is_ok() {
            let l = pool.snapshot_links().unwrap();
            let f: Vec<String> = l
                .freeing
                .iter()
                .map(|t| match t {
                    cairn_pool::snapshot::FreeTask::Tree { next, held, .. } => {
                        format!("tree next {next} held {}", held.len())
                    }
                    cairn_pool::snapshot::FreeTask::Entries { objects, next, .. } => {
                        format!("entries {objects:?} next {next}")
                    }
                })
                .collect();
            eprintln!("step {step}: op {op} head {h} freeing {f:?}");
        }
        let from: u64 = std::env::var("CAIRN_SNAP_CHECK_FROM")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(u64::MAX);
        if step % every == every - 1 || step >= from {
            for (&id, d) in &m.heads {
                assert!(
                    read_all(&pool, id) == *d,
                    "step {step}: volume {id} differs"
                );
            }
            for (&id, (_, d)) in &m.snaps {
                assert!(
                    read_all(&pool, id) == *d,
                    "step {step}: snapshot {id} differs"
                );
            }
            audit(&pool, &format!("step {step}"));
        }
    }
    eprintln!("{promotes} promotes");
}

#[test]
fn changed_blocks_are_exactly_the_blocks_written_trimmed_or_grown_since() {
    let (_devs, pool) = mem_pool();
    let v = new_volume(&pool);
    pool.write_object(v, 0, &vec![5u8; VOL as usize / 2])
        .unwrap();
    let (s, _) = pool.atomically(|tx| tx.snapshot(&[v])).unwrap();
    let s = s[0];
    // Same bytes rewritten still count (the block was written); a trim; a block past the end of
    // the old tree (the tree grows a level).
    pool.write_object(v, 4096 * 3, &vec![5u8; 4096]).unwrap();
    pool.free_object_range(v, 4096 * 100, 4096 * 2).unwrap();
    pool.write_object(v, 4096 * 400 + 10, b"x").unwrap();
    let (changed, done) = pool.changed_blocks(s, v, 0, 1 << 20, 1000).unwrap();
    assert_eq!(changed, vec![3, 100, 101, 400]);
    assert_eq!(done, 1 << 20);
    // A bounded answer resumes where it stopped.
    let (first, next) = pool.changed_blocks(s, v, 0, 1 << 20, 2).unwrap();
    assert_eq!((first, next), (vec![3, 100], 101));
    assert_eq!(
        pool.changed_blocks(s, s, 0, 1 << 20, 10).unwrap().0,
        Vec::<u64>::new()
    );
}
