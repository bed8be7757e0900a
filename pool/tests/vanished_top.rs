//! A whole top-level vdev goes away (both files of a mirror renamed) while blocks written to it in
//! the open txg are not yet in its allocation map. Committing that txg would write a tree pointing at
//! blocks whose space the vdev's own map still calls free: after a restart the next writes there
//! overwrite them (seen as 5 of 4096 blocks lost after a flush that had been acknowledged). The
//! commit must fail instead (the pool suspends, a FLUSH gets an error), and the last committed state
//! must stay whole.

use cairn_pool::object::ObjType;
use cairn_pool::{HostInfo, OpenOptions, Pool, TopKind};
use cairn_vdev::testleaf::MemLeaf;
use cairn_vdev::Leaf;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

/// A leaf whose path can stop naming it (as after `mv`): `check` says so; its I/O still works, as
/// through an open descriptor of a renamed file.
struct MovableLeaf {
    inner: MemLeaf,
    moved: AtomicBool,
}

impl Leaf for MovableLeaf {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn path(&self) -> &str {
        self.inner.path()
    }
    fn check(&self) -> Option<String> {
        self.moved
            .load(Ordering::Relaxed)
            .then(|| "the device was removed".to_string())
    }
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn a_txg_with_blocks_on_a_vanished_top_does_not_commit_and_the_pool_stays_whole() {
    let leaves: Vec<Arc<MovableLeaf>> = (0..4)
        .map(|i| {
            Arc::new(MovableLeaf {
                inner: MemLeaf::new(64 * MIB, &format!("/mem/vt{i}")),
                moved: AtomicBool::new(false),
            })
        })
        .collect();
    let dyns: Vec<Arc<dyn Leaf>> = leaves.iter().map(|l| l.clone() as Arc<dyn Leaf>).collect();
    let host = HostInfo {
        host_id: 1,
        hostname: "test".into(),
    };
    let pool = Pool::create_on(
        "vt",
        vec![
            (TopKind::Mirror, dyns[..2].to_vec()),
            (TopKind::Mirror, dyns[2..].to_vec()),
        ],
        &host,
    )
    .unwrap();
    let guid = pool.guid();
    let obj = pool.create_object(ObjType::Volume, 14, 1).unwrap();
    pool.set_object_size(obj, 32 * MIB).unwrap();
    let first = pattern(4 * MIB, 1);
    pool.write_object(obj, 0, &first).unwrap();
    pool.sync().unwrap();

    // New whole blocks go out at once, to both top-level vdevs; then the second one goes away.
    pool.write_object(obj, 0, &pattern(4 * MIB, 2)).unwrap();
    leaves[2].moved.store(true, Ordering::Relaxed);
    leaves[3].moved.store(true, Ordering::Relaxed);
    let r = pool.sync();
    assert!(
        r.is_err(),
        "a txg linking blocks that the vanished vdev's map does not record committed"
    );

    // A crash; the files come back; the pool opens at the last committed txg, with all of it.
    drop(pool);
    for l in &leaves {
        l.moved.store(false, Ordering::Relaxed);
    }
    let list = dyns
        .iter()
        .map(|d| (PathBuf::from(d.path()), d.clone()))
        .collect();
    let pool = Pool::open_on(list, guid, &OpenOptions::default()).unwrap();
    let mut back = vec![0u8; (4 * MIB) as usize];
    pool.read_object(obj, 0, &mut back).unwrap();
    assert!(back == first, "the last committed data reads back");
    // New data fills more of both vdevs without touching what is there.
    let more = pattern(16 * MIB, 3);
    pool.write_object(obj, 4 * MIB, &more).unwrap();
    pool.sync().unwrap();
    pool.read_object(obj, 0, &mut back).unwrap();
    assert!(back == first, "committed data survives later allocations");
    let mut back2 = vec![0u8; (16 * MIB) as usize];
    pool.read_object(obj, 4 * MIB, &mut back2).unwrap();
    assert!(back2 == more);
}
