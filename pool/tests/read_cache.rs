//! Which reads may stay in the leaves' cache: an application read may (it is likely to be read
//! again), the old contents of a block read to merge a partial write into it may not (the commit
//! writes the block elsewhere, so the cached copy is never used again, and on file leaves the
//! kernel's readahead around such scattered reads read three times the bytes asked for).

use cairn_pool::object::ObjType;
use cairn_pool::{HostInfo, Pool, TopKind};
use cairn_vdev::testleaf::MemLeaf;
use cairn_vdev::Leaf;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const BS: u64 = 16 * 1024;

/// A leaf counting the bytes read through each path.
struct CountingLeaf {
    inner: MemLeaf,
    cached: AtomicU64,
    uncached: AtomicU64,
}

impl Leaf for CountingLeaf {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.cached.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn read_at_uncached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.uncached.fetch_add(buf.len() as u64, Ordering::Relaxed);
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
}

impl CountingLeaf {
    fn take(&self) -> (u64, u64) {
        (
            self.cached.swap(0, Ordering::Relaxed),
            self.uncached.swap(0, Ordering::Relaxed),
        )
    }
}

#[test]
fn partial_writes_read_old_blocks_uncached_and_application_reads_cached() {
    let leaves: Vec<Arc<CountingLeaf>> = (0..2)
        .map(|i| {
            Arc::new(CountingLeaf {
                inner: MemLeaf::new(128 * MIB, &format!("/mem/count{i}")),
                cached: AtomicU64::new(0),
                uncached: AtomicU64::new(0),
            })
        })
        .collect();
    let host = HostInfo {
        host_id: 1,
        hostname: "test".into(),
    };
    let dyn_leaves = leaves.iter().map(|l| l.clone() as Arc<dyn Leaf>).collect();
    let pool = Pool::create_on("rc", vec![(TopKind::Mirror, dyn_leaves)], &host).unwrap();
    let obj = pool.create_object(ObjType::Volume, 14, 1).unwrap();
    pool.set_object_size(obj, 4 * MIB).unwrap();
    let full: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 | 1).collect();
    pool.write_object(obj, 0, &full).unwrap();
    pool.sync().unwrap();
    // Warm the object's tree (indirect blocks) so that only data blocks are read below.
    let mut one = vec![0u8; 512];
    pool.read_object(obj, 0, &mut one).unwrap();
    let count = |leaves: &[Arc<CountingLeaf>]| {
        leaves.iter().fold((0, 0), |(c, u), l| {
            let (a, b) = l.take();
            (c + a, u + b)
        })
    };
    count(&leaves);

    // 4 KiB into each of 8 committed 16 KiB blocks: each block's old contents are read once,
    // around the cache.
    for b in 0..8u64 {
        pool.write_object(obj, b * BS + 4096, &[0xabu8; 4096])
            .unwrap();
    }
    let (cached, uncached) = count(&leaves);
    assert_eq!(
        uncached,
        8 * BS,
        "old contents of partial blocks read uncached"
    );
    assert_eq!(cached, 0, "nothing read through the cache for the merges");

    // What the merges produced reads back, and application reads go through the cache.
    pool.sync().unwrap();
    count(&leaves);
    let mut back = vec![0u8; (8 * BS) as usize];
    pool.read_object(obj, 0, &mut back).unwrap();
    let mut want = full[..(8 * BS) as usize].to_vec();
    for b in 0..8usize {
        let at = b * BS as usize + 4096;
        want[at..at + 4096].fill(0xab);
    }
    assert!(back == want, "merged blocks read back wrong");
    let (cached, uncached) = count(&leaves);
    assert_eq!(uncached, 0, "application reads stay cacheable");
    assert!(cached >= 8 * BS, "application reads read the blocks");
}
