//! Deadlists: the blocks a volume took out of its tree while a snapshot still referenced them.
//!
//! The birth-txg rule (as OpenZFS): when a volume (or clone) overwrites, trims or destroys a block
//! born after its previous snapshot, nothing else references it and it is freed at once; a block
//! born at or before that snapshot goes on the volume's deadlist instead. Taking a snapshot hands
//! the volume's deadlist to the new snapshot, and the volume starts an empty one. So the deadlist of
//! snapshot S holds the blocks the previous snapshot referenced and S does not.
//!
//! A deadlist is split into buckets by birth txg: the bucket with key `k` holds blocks born after
//! `k` (and at or before the next key). Keys are the txgs of the lineage's snapshots (and a clone's
//! origin) at the time a block died. Destroying snapshot S (previous P, next N) frees the buckets
//! of N's deadlist with keys in `[P.txg, S.txg)` (the blocks only S referenced) and moves S's
//! buckets to N: the cost follows the blocks freed, never the volume's size.
//!
//! A bucket is a list of MOS objects of type Deadlist, each an array of 128-byte block pointers
//! (the encoding of `blkptr`), with the allocated bytes of its entries in the dnode's bonus. Merging
//! buckets concatenates object lists; nothing is copied.
//!
//! Invariants: every pointer read back is decoded and validated; an object whose size is not a
//! whole number of entries is corrupt.

use crate::blkptr::{BlockPtr, BP_SIZE};
use crate::error::{PoolError, Result};
use crate::object::{ObjSet, ObjType};
use crate::pool::MOS_COPIES;
use cairn_vdev::tree::TopVdev;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Bytes of one entry.
pub const ENTRY: u64 = BP_SIZE as u64;
/// Block shift of deadlist objects (128 entries a block).
const SHIFT: u8 = 14;

/// A deadlist: bucket key (births after it) -> the bucket's objects, oldest first.
pub type Deadlist = BTreeMap<u64, Vec<u64>>;

/// Append `bps` to bucket `key` of `dl` (a new object if the bucket has none). Returns whether
/// `dl` itself changed (a new object), i.e. whether the table holding it must be rewritten.
pub fn append(
    mos: &mut ObjSet,
    vdevs: &[Arc<TopVdev>],
    dl: &mut Deadlist,
    key: u64,
    bps: &[BlockPtr],
) -> Result<bool> {
    if bps.is_empty() {
        return Ok(false);
    }
    let (id, created) = match dl.get(&key).and_then(|v| v.last()) {
        Some(&id) => (id, false),
        None => {
            let id = mos.create_object(vdevs, ObjType::Deadlist, SHIFT, MOS_COPIES)?;
            dl.entry(key).or_default().push(id);
            (id, true)
        }
    };
    let mut buf = vec![0u8; bps.len() * BP_SIZE];
    let mut bytes = 0u64;
    for (i, bp) in bps.iter().enumerate() {
        bp.encode_into(&mut buf[i * BP_SIZE..(i + 1) * BP_SIZE]);
        bytes += bp.asize();
    }
    let o = mos.obj(vdevs, id)?;
    let at = o.dnode.size;
    o.write(vdevs, at, &buf)?;
    o.dnode.size = at + buf.len() as u64;
    let b = o.dnode.dead_bytes() + bytes;
    o.dnode.set_dead_bytes(b);
    o.mark_dnode_dirty();
    Ok(created)
}

/// (entries, allocated bytes) of one deadlist object.
pub fn object_size(mos: &mut ObjSet, vdevs: &[Arc<TopVdev>], id: u64) -> Result<(u64, u64)> {
    let o = mos.obj(vdevs, id)?;
    if o.dnode.otype != ObjType::Deadlist || !o.dnode.size.is_multiple_of(ENTRY) {
        return Err(PoolError::corrupt(
            format!("deadlist object {id}"),
            format!("type {:?}, size {}", o.dnode.otype, o.dnode.size),
        ));
    }
    Ok((o.dnode.size / ENTRY, o.dnode.dead_bytes()))
}

/// Allocated bytes of the buckets of `dl` whose keys lie in `range`.
pub fn bytes_in(
    mos: &mut ObjSet,
    vdevs: &[Arc<TopVdev>],
    dl: &Deadlist,
    range: impl std::ops::RangeBounds<u64>,
) -> Result<u64> {
    let mut total = 0;
    for objs in dl.range(range).map(|(_, v)| v) {
        for &id in objs {
            total += object_size(mos, vdevs, id)?.1;
        }
    }
    Ok(total)
}

/// Up to `max` entries of deadlist object `id` from entry `from`.
pub fn read_entries(
    mos: &mut ObjSet,
    vdevs: &[Arc<TopVdev>],
    id: u64,
    from: u64,
    max: u64,
) -> Result<Vec<BlockPtr>> {
    let (n, _) = object_size(mos, vdevs, id)?;
    let take = n.saturating_sub(from).min(max);
    if take == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; (take * ENTRY) as usize];
    mos.obj(vdevs, id)?.read(vdevs, from * ENTRY, &mut buf)?;
    buf.chunks(BP_SIZE).map(BlockPtr::decode).collect()
}

/// Split the buckets of `dl` with keys below `below` along `boundaries` (new boundaries appeared
/// under them: a promote gives a clone's lineage the origin's older snapshots). Reads and rewrites
/// those buckets' entries; their old objects are destroyed.
pub fn rebucket(
    mos: &mut ObjSet,
    vdevs: &[Arc<TopVdev>],
    dl: &mut Deadlist,
    boundaries: &[u64],
    below: u64,
) -> Result<()> {
    let keys: Vec<u64> = dl.range(..below).map(|(&k, _)| k).collect();
    let mut moved: BTreeMap<u64, Vec<BlockPtr>> = BTreeMap::new();
    let mut old = Vec::new();
    for k in keys {
        for id in dl.remove(&k).unwrap_or_default() {
            for bp in read_entries(mos, vdevs, id, 0, u64::MAX)? {
                moved
                    .entry(bucket_for(boundaries, bp.birth.0))
                    .or_default()
                    .push(bp);
            }
            old.push(id);
        }
    }
    for id in old {
        mos.destroy_object(vdevs, id)?;
    }
    for (k, v) in moved {
        append(mos, vdevs, dl, k, &v)?;
    }
    Ok(())
}

/// Move every bucket of `from` into `to` (object lists are concatenated).
pub fn merge(to: &mut Deadlist, from: Deadlist) {
    for (k, objs) in from {
        to.entry(k).or_default().extend(objs);
    }
}

/// The bucket a block born at `birth` belongs in, given the lineage's sorted boundaries (snapshot
/// txgs, a clone's origin txg): the largest boundary below `birth`, else 0.
pub fn bucket_for(boundaries: &[u64], birth: u64) -> u64 {
    match boundaries.partition_point(|&b| b < birth) {
        0 => 0,
        i => boundaries[i - 1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_the_largest_boundary_below_the_birth() {
        let b = [10, 20, 30];
        assert_eq!(bucket_for(&b, 5), 0);
        assert_eq!(bucket_for(&b, 10), 0);
        assert_eq!(bucket_for(&b, 11), 10);
        assert_eq!(bucket_for(&b, 20), 10);
        assert_eq!(bucket_for(&b, 31), 30);
        assert_eq!(bucket_for(&[], 31), 0);
    }

    #[test]
    fn merge_concatenates_objects() {
        let mut a: Deadlist = [(0, vec![1]), (10, vec![2])].into_iter().collect();
        let b: Deadlist = [(0, vec![3]), (5, vec![4])].into_iter().collect();
        merge(&mut a, b);
        assert_eq!(a[&0], vec![1, 3]);
        assert_eq!(a[&5], vec![4]);
        assert_eq!(a[&10], vec![2]);
    }
}
