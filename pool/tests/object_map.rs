//! The allocation map of an object (what NBD block status answers), checked against a model of
//! the object's contents through writes, zero writes, trims and commits, with the answer cut short
//! at every block budget; and its cost on a sparse object of a petabyte.

use cairn_pool::object::ObjType;
use cairn_pool::{HostInfo, Pool, TopKind};
use cairn_vdev::testleaf::MemLeaf;
use cairn_vdev::Leaf;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const BS: u64 = 4096;

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

fn pool() -> Pool {
    let leaf = Arc::new(MemLeaf::new(256 * MIB, "/mem/map")) as Arc<dyn Leaf>;
    Pool::create_on("m", vec![(TopKind::Single, vec![leaf])], &host()).expect("create")
}

/// Check one answer of `object_map(off, len, max)` against the model (a block holds data iff any of
/// its bytes is non-zero).
fn check(model: &[u8], map: &[(u64, u64, bool)], off: u64, len: u64, max: usize) {
    let what = format!("object_map({off}, {len}, {max}) = {map:?}");
    assert!(!map.is_empty(), "{what}: empty answer");
    let mut at = off;
    let mut blocks = 0usize;
    let mut last_block = None;
    for (i, &(o, l, a)) in map.iter().enumerate() {
        assert_eq!(
            o, at,
            "{what}: extent {i} does not start where the last ended"
        );
        assert!(l > 0, "{what}: empty extent {i}");
        if i > 0 {
            assert_ne!(
                a,
                map[i - 1].2,
                "{what}: extents {i} and {} not merged",
                i - 1
            );
        }
        let mut p = o;
        while p < o + l {
            let b = p / BS;
            let bytes = &model[(b * BS) as usize..((b + 1) * BS) as usize];
            let holds = bytes.iter().any(|&x| x != 0);
            assert_eq!(
                a, holds,
                "{what}: block {b} says allocated={a}, holds data={holds}"
            );
            if a && last_block != Some(b) {
                blocks += 1;
                last_block = Some(b);
            }
            p = (b + 1) * BS;
        }
        at = o + l;
    }
    assert!(at <= off + len, "{what}: answer goes past the range");
    assert!(
        blocks <= max,
        "{what}: {blocks} allocated blocks, over the budget"
    );
    if at < off + len {
        // Cut short only at a block boundary, and only when the range holds more blocks than the
        // budget (the budget counts the blocks the tree holds, some of which the open txg may free).
        assert_eq!(at % BS, 0, "{what}: cut inside a block");
        let range_blocks = (off + len).div_ceil(BS) - off / BS;
        assert!(
            (max as u64) < range_blocks,
            "{what}: cut short with a budget of every block of the range"
        );
    }
}

#[test]
fn the_map_follows_writes_zero_writes_trims_and_commits_at_every_budget() {
    let pool = pool();
    let size = 8 * MIB;
    let obj = pool.create_object(ObjType::Volume, 12, 1).unwrap();
    pool.set_object_size(obj, size).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..300 {
        let off = rnd(&mut seed) % size;
        let len = (rnd(&mut seed) % (256 * 1024)).clamp(1, size - off);
        match rnd(&mut seed) % 5 {
            0 | 1 => {
                let data: Vec<u8> = (0..len).map(|i| (i as u8) | 1).collect();
                pool.write_object(obj, off, &data).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            2 => {
                pool.write_object(obj, off, &vec![0u8; len as usize])
                    .unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            3 => {
                pool.free_object_range(obj, off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => pool.sync().unwrap(),
        }
        // Query uncommitted and committed states alike, with budgets from 1 block to all of them.
        for _ in 0..3 {
            let qoff = rnd(&mut seed) % size;
            let qlen = (rnd(&mut seed) % size).clamp(1, size - qoff);
            let max = match rnd(&mut seed) % 3 {
                0 => 1,
                1 => 1 + (rnd(&mut seed) % 40) as usize,
                _ => 1 << 20,
            };
            let map = pool.object_map(obj, qoff, qlen, max).unwrap();
            check(&model, &map, qoff, qlen, max);
        }
        if round % 50 == 49 {
            let map = pool.object_map(obj, 0, size, usize::MAX).unwrap();
            check(&model, &map, 0, size, usize::MAX);
        }
    }
}

#[test]
fn a_sparse_petabyte_object_maps_at_the_cost_of_its_few_blocks() {
    let pool = pool();
    let pib = 1u64 << 50;
    let obj = pool.create_object(ObjType::Volume, 14, 1).unwrap();
    pool.set_object_size(obj, pib).unwrap();
    let bs = 16 * 1024;
    let at = [0, pib / 3 / bs * bs, pib - bs];
    for (i, &o) in at.iter().enumerate() {
        pool.write_object(obj, o, &vec![i as u8 + 1; bs as usize])
            .unwrap();
    }
    let want = vec![
        (0, bs, true),
        (bs, at[1] - bs, false),
        (at[1], bs, true),
        (at[1] + bs, at[2] - at[1] - bs, false),
        (at[2], bs, true),
    ];
    // 2^36 blocks: a walk over them would not finish; skipping holes answers at once, before and
    // after the commit.
    assert_eq!(pool.object_map(obj, 0, pib, 4096).unwrap(), want);
    pool.sync().unwrap();
    assert_eq!(pool.object_map(obj, 0, pib, 4096).unwrap(), want);
    // With a budget of 2 blocks the answer ends right before the third one.
    assert_eq!(pool.object_map(obj, 0, pib, 2).unwrap(), want[..4].to_vec());
    // A range inside a hole is one hole.
    assert_eq!(
        pool.object_map(obj, bs, 1 << 40, 4096).unwrap(),
        vec![(bs, 1 << 40, false)]
    );
}
