//! Changed blocks between two block trees (a snapshot and a later snapshot, a clone or the live
//! volume): the level-0 blocks whose pointers differ, found by walking both trees together and
//! skipping every subtree whose pointer is the same in both. Copy-on-write makes an unchanged
//! subtree keep its pointer, so the cost follows what changed, not the volume's size. (Cairn's
//! `dataset diff` and NBD's `qemu:dirty-bitmap:SNAP`; OpenZFS has nothing like it for volumes.)
//!
//! A block counts as changed when it was written (even with the same bytes), trimmed or zeroed.

use crate::error::{PoolError, Result};
use crate::object::{Obj, ObjType, BPS_PER_IND, BPS_SHIFT};
use crate::pool::Pool;
use cairn_vdev::tree::TopVdev;
use std::sync::Arc;

/// Blocks that differ under (level, index), from level-0 block `from` and before `to`, at most
/// `max` of them. Returns the block to resume from when `max` was reached.
#[allow(clippy::too_many_arguments)]
fn diff_at(
    a: &mut Obj,
    b: &mut Obj,
    vdevs: &[Arc<TopVdev>],
    level: u8,
    index: u64,
    from: u64,
    to: u64,
    max: usize,
    out: &mut Vec<u64>,
) -> Result<Option<u64>> {
    let shift = BPS_SHIFT * level as u32;
    let start = index.checked_shl(shift).unwrap_or(u64::MAX);
    let end = (index + 1).checked_shl(shift).unwrap_or(u64::MAX);
    if end <= from || start >= to {
        return Ok(None);
    }
    let (pa, pb) = (a.bp_at(vdevs, level, index)?, b.bp_at(vdevs, level, index)?);
    if pa == pb {
        return Ok(None);
    }
    if level == 0 {
        if out.len() >= max {
            return Ok(Some(index));
        }
        out.push(index);
        return Ok(None);
    }
    for i in 0..BPS_PER_IND {
        let c = (index << BPS_SHIFT) + i;
        if let Some(r) = diff_at(a, b, vdevs, level - 1, c, from, to, max, out)? {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

impl Pool {
    /// The level-0 blocks in `[from, to)` that differ between objects `old` and `new` (volumes
    /// or snapshots), in order, at most `max`; and the block up to which the answer is complete
    /// (`to`, or less when `max` was reached). Uncommitted changes of `new` are committed first.
    pub fn changed_blocks(
        &self,
        old: u64,
        new: u64,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<(Vec<u64>, u64)> {
        let mut g = self.lock();
        let vdevs = g.tree.tops.clone();
        if g.mos.obj(&vdevs, new)?.is_dirty() {
            g.sync_txg()?;
        }
        let inner = &mut *g;
        let da = inner.mos.obj(&vdevs, old)?.dnode;
        let db = inner.mos.obj(&vdevs, new)?.dnode;
        for d in [&da, &db] {
            if !matches!(d.otype, ObjType::Volume | ObjType::Snapshot) {
                return Err(PoolError::Invalid("not a volume or snapshot".into()));
            }
        }
        if da.data_shift != db.data_shift {
            return Err(PoolError::Invalid(
                "the two have different block sizes".into(),
            ));
        }
        let mut a = Obj::new(old, da);
        let mut b = Obj::new(new, db);
        let top = da.nlevels.max(db.nlevels) - 1;
        let mut out = Vec::new();
        let r = diff_at(
            &mut a,
            &mut b,
            &vdevs,
            top,
            0,
            from,
            to,
            max.max(1),
            &mut out,
        )?;
        Ok((out, r.unwrap_or(to)))
    }
}
