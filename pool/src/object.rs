//! The object layer: objects as copy-on-write trees of block pointers, grouped in an object set.
//!
//! An object is described by a 256-byte dnode: its type, block size (4 KiB to 128 KiB), number of
//! levels, logical size, allocated bytes and the root block pointer. Level-0 blocks hold data; level-L
//! blocks (16 KiB, 128 block pointers) point at level L-1. Block `b` at level L sits in slot
//! `b % 128` of block `b / 128` at level L+1; the root is the single block at level `nlevels - 1`.
//! An object set keeps its dnodes as the data of object 0 (the meta object); its own dnode lives in the
//! objset block that the uberblock points at.
//!
//! Changes are made in memory (dirty level-0 blocks, pending frees) and written by [`ObjSet::sync`]:
//! new level-0 blocks, then each level of indirect blocks bottom-up, then the dnodes, then the meta object.
//! Nothing written before is ever overwritten in place: every changed block goes to newly allocated
//! space and the old one is freed (deferred by the allocator). Every block read is verified against the
//! checksum in its parent pointer; on a mismatch the next copy (DVA) is tried.

use crate::alloc::Allocator;
use crate::blkptr::{checksum, BlockKind, BlockPtr, Dva, BP_SIZE, CKSUM_BLAKE3, MAX_DVAS};
use crate::error::{PoolError, Result};
use cairn_vdev::codec::{get_u32, get_u64, put_u32, put_u64};
use cairn_vdev::tree::{ReadHow, TopVdev};
use cairn_vdev::{Txg, SECTOR};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub const IND_SHIFT: u32 = 14;
pub const IND_SIZE: usize = 1 << IND_SHIFT;
pub const BPS_SHIFT: u32 = IND_SHIFT - 7;
pub const BPS_PER_IND: u64 = 1 << BPS_SHIFT;
pub const MAX_LEVELS: usize = 8;
pub const DNODE_SIZE: usize = 256;
pub const META_SHIFT: u8 = 14;
pub const DNODES_PER_BLOCK: u64 = (1 << META_SHIFT) / DNODE_SIZE as u64;
pub const MIN_DATA_SHIFT: u8 = 12;
pub const MAX_DATA_SHIFT: u8 = 17;
pub const BONUS_SIZE: usize = 64;
/// Clean indirect blocks cached per object before the cache is trimmed.
const MAX_CACHED_IND: usize = 4096;

/// What an object holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ObjType {
    Free = 0,
    Directory = 1,
    Props = 2,
    History = 3,
    Volume = 4,
    Bytes = 5,
    /// A volume's snapshot: a frozen copy of its dnode sharing the block tree (never written).
    Snapshot = 6,
    /// One bucket of a deadlist: 128-byte block pointers appended in order (`pool/src/deadlist.rs`).
    Deadlist = 7,
}

impl ObjType {
    fn from_u8(v: u8) -> Option<ObjType> {
        Some(match v {
            0 => ObjType::Free,
            1 => ObjType::Directory,
            2 => ObjType::Props,
            3 => ObjType::History,
            4 => ObjType::Volume,
            5 => ObjType::Bytes,
            6 => ObjType::Snapshot,
            7 => ObjType::Deadlist,
            _ => return None,
        })
    }
}

/// The on-disk description of an object (256 bytes; byte table in docs/on-disk-format.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dnode {
    pub otype: ObjType,
    pub nlevels: u8,
    pub data_shift: u8,
    /// Copies of each data block (1..=3); metadata gets one more, up to 3.
    pub copies: u8,
    /// How new whole data blocks are compressed (`crate::compress::Compression::to_byte`).
    pub compression: u8,
    /// Logical size in bytes (a volume's volsize, a byte object's length).
    pub size: u64,
    /// Allocated bytes of all blocks of the object.
    pub used: u64,
    pub root: BlockPtr,
    pub bonus: [u8; BONUS_SIZE],
}

impl Dnode {
    pub const FREE: Dnode = Dnode {
        otype: ObjType::Free,
        nlevels: 0,
        data_shift: 0,
        copies: 0,
        compression: 0,
        size: 0,
        used: 0,
        root: BlockPtr::HOLE,
        bonus: [0; BONUS_SIZE],
    };

    pub fn new(otype: ObjType, data_shift: u8, copies: u8) -> Dnode {
        Dnode {
            otype,
            nlevels: 1,
            data_shift,
            copies,
            compression: 0,
            size: 0,
            used: 0,
            root: BlockPtr::HOLE,
            bonus: [0; BONUS_SIZE],
        }
    }

    pub fn block_size(&self) -> usize {
        1 << self.data_shift
    }

    /// Volumes, clones and snapshots: the txg of the previous snapshot in the lineage (a clone's:
    /// its origin's). Blocks born at or before it are shared with that snapshot: the volume never
    /// frees them itself (they go on its deadlist), and a scan leaves them to the snapshot. Bonus
    /// bytes 0..8; 0 when there is none. Other objects: 0.
    pub fn prev_snap_txg(&self) -> Txg {
        match self.otype {
            ObjType::Volume | ObjType::Snapshot => Txg(get_u64(&self.bonus, 0)),
            _ => Txg(0),
        }
    }

    pub fn set_prev_snap_txg(&mut self, t: Txg) {
        put_u64(&mut self.bonus, 0, t.0);
    }

    /// Deadlist buckets: the allocated bytes (every copy) of the pointers stored (bonus bytes 0..8).
    pub fn dead_bytes(&self) -> u64 {
        get_u64(&self.bonus, 0)
    }

    pub fn set_dead_bytes(&mut self, b: u64) {
        put_u64(&mut self.bonus, 0, b);
    }

    pub fn encode_into(&self, b: &mut [u8]) {
        b[..DNODE_SIZE].fill(0);
        if self.otype == ObjType::Free {
            return;
        }
        b[0] = self.otype as u8;
        b[1] = self.nlevels;
        b[2] = self.data_shift;
        b[3] = self.copies;
        b[4] = self.compression;
        put_u64(b, 8, self.size);
        put_u64(b, 24, self.used);
        self.root.encode_into(&mut b[64..64 + BP_SIZE]);
        b[192..256].copy_from_slice(&self.bonus);
    }

    pub fn decode(b: &[u8]) -> Result<Dnode> {
        let bad = |d: String| Err(PoolError::corrupt("dnode", d));
        if b.len() < DNODE_SIZE {
            return bad("short".into());
        }
        let Some(otype) = ObjType::from_u8(b[0]) else {
            return bad(format!("type {}", b[0]));
        };
        if otype == ObjType::Free {
            return Ok(Dnode::FREE);
        }
        let nlevels = b[1];
        let data_shift = b[2];
        let copies = b[3];
        if nlevels == 0 || nlevels as usize > MAX_LEVELS {
            return bad(format!("nlevels {nlevels}"));
        }
        if !(MIN_DATA_SHIFT..=MAX_DATA_SHIFT).contains(&data_shift) {
            return bad(format!("block shift {data_shift}"));
        }
        if !(1..=3).contains(&copies) {
            return bad(format!("copies {copies}"));
        }
        if crate::compress::Compression::from_byte(b[4]).is_none() {
            return bad(format!(
                "unknown compression setting {} (written by a newer Cairn?)",
                b[4]
            ));
        }
        let root = BlockPtr::decode(&b[64..64 + BP_SIZE])?;
        if !root.is_hole() && root.level as u32 + 1 != nlevels as u32 {
            return bad(format!("root level {} with {} levels", root.level, nlevels));
        }
        let mut bonus = [0u8; BONUS_SIZE];
        bonus.copy_from_slice(&b[192..256]);
        Ok(Dnode {
            otype,
            nlevels,
            data_shift,
            copies,
            compression: b[4],
            size: get_u64(b, 8),
            used: get_u64(b, 24),
            root,
            bonus,
        })
    }

    /// Level-0 blocks addressable with the current number of levels.
    fn capacity(&self) -> u64 {
        1u64.checked_shl(BPS_SHIFT * (self.nlevels as u32 - 1))
            .unwrap_or(u64::MAX)
    }
}

/// The I/O context of a txg: the vdevs, which take writes, the allocator and the txg numbers.
pub struct TxgCtx<'a> {
    pub vdevs: &'a [Arc<TopVdev>],
    pub usable: Vec<bool>,
    pub alloc: &'a mut Allocator,
    /// The txg being written.
    pub txg: Txg,
    /// The last committed txg.
    pub committed: Txg,
}

/// Read and verify a block: every DVA in turn until one verifies.
pub fn read_bp(vdevs: &[Arc<TopVdev>], bp: &BlockPtr) -> Result<Vec<u8>> {
    read_bp_how(vdevs, bp, ReadHow::Cached)
}

/// [`read_bp`], choosing whether the leaves may cache the data (`Uncached` for the old contents of
/// a block about to be rewritten).
pub fn read_bp_how(vdevs: &[Arc<TopVdev>], bp: &BlockPtr, how: ReadHow) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; bp.psize as usize];
    let mut last: Option<PoolError> = None;
    let mut failed: Vec<&Dva> = Vec::new();
    let mut dvas: Vec<&Dva> = bp.dvas.iter().filter(|d| !d.is_empty()).collect();
    if dvas.len() > 1 {
        // Copies on vdevs known to lack the block's txg (their devices' dirty time logs) go last,
        // so a good copy is found first and nothing is "healed" onto a device that is behind.
        dvas.sort_by_key(|d| {
            !vdevs
                .get(d.vdev as usize)
                .is_some_and(|v| v.holds(bp.birth))
        });
    }
    for d in dvas {
        let Some(v) = vdevs.get(d.vdev as usize) else {
            last = Some(PoolError::corrupt(
                "block pointer",
                format!("DVA names vdev {} of {}", d.vdev, vdevs.len()),
            ));
            continue;
        };
        let want = bp.checksum;
        match v.read_how(
            d.offset,
            &mut buf,
            bp.birth,
            &|b: &[u8]| checksum(b) == want,
            how,
        ) {
            Ok(()) => {
                // Self-heal: copies that returned bad data or an I/O error are rewritten from
                // this one (a copy on a vdev that cannot be written to stays as it is).
                for f in failed {
                    if let Some(fv) = vdevs.get(f.vdev as usize) {
                        if fv.state().usable() {
                            let _ = fv.heal(f.offset, &buf);
                        }
                    }
                }
                // Verified: only now may a decompressor see the bytes.
                if bp.compression != crate::compress::ALG_NONE {
                    return crate::compress::decompress(bp.compression, &buf, bp.lsize as usize);
                }
                return Ok(buf);
            }
            Err(e) => {
                failed.push(d);
                last = Some(e.into());
            }
        }
    }
    Err(last.unwrap_or_else(|| PoolError::corrupt("block", "no DVA")))
}

/// A block to be written by [`write_blocks`].
pub struct NewBlock {
    pub data: Vec<u8>,
    pub kind: BlockKind,
    pub level: u8,
    pub copies: u8,
    pub fill: u64,
}

/// Allocate and write blocks (in parallel), returning their block pointers in order.
pub fn write_blocks(ctx: &mut TxgCtx, blocks: &[NewBlock]) -> Result<Vec<BlockPtr>> {
    let mut bps = blocks
        .iter()
        .map(|b| alloc_bp(ctx, b.data.len() as u64, b.kind, b.level, b.copies, b.fill))
        .collect::<Result<Vec<_>>>()?;
    write_allocated(ctx.vdevs, &mut bps, blocks)?;
    Ok(bps)
}

/// Allocate the DVAs of a new block (checksum still empty): each copy on a different top-level vdev
/// where there is one.
pub fn alloc_bp(
    ctx: &mut TxgCtx,
    size: u64,
    kind: BlockKind,
    level: u8,
    copies: u8,
    fill: u64,
) -> Result<BlockPtr> {
    debug_assert!(size.is_multiple_of(SECTOR));
    let mut dvas = [Dva::default(); MAX_DVAS];
    let mut avoid: Vec<u32> = Vec::new();
    for k in 0..copies.clamp(1, 3) as usize {
        let got = match ctx
            .alloc
            .alloc(ctx.vdevs, &ctx.usable, size, &avoid, ctx.committed)?
        {
            Some(x) => Some(x),
            // Fewer top-level vdevs than copies: put the extra copy on one already used, far from
            // the copy there (the one with the fewest copies so far, the first of equals).
            None => {
                let mut got = None;
                let mut used: Vec<(usize, u32, u64)> = Vec::new();
                for d in &dvas[..k] {
                    match used.iter_mut().find(|u| u.1 == d.vdev) {
                        Some(u) => (u.0, u.2) = (u.0 + 1, d.offset),
                        None => used.push((1, d.vdev, d.offset)),
                    }
                }
                used.sort_by_key(|u| u.0);
                for &(_, vdev, near) in &used {
                    if let Some(off) = ctx.alloc.alloc_apart(
                        ctx.vdevs,
                        &ctx.usable,
                        size,
                        vdev,
                        near,
                        ctx.committed,
                    )? {
                        got = Some((vdev, off));
                        break;
                    }
                }
                match got {
                    Some(x) => Some(x),
                    None => ctx
                        .alloc
                        .alloc(ctx.vdevs, &ctx.usable, size, &[], ctx.committed)?,
                }
            }
        };
        let Some((vdev, offset)) = got else {
            if !ctx.usable.iter().any(|&u| u) {
                // Not a full pool: nothing can take a write at all.
                return Err(PoolError::Vdev(cairn_vdev::VdevError::Invalid {
                    path: "pool".into(),
                    reason: "cannot write: no top-level vdev can take writes (their devices are \
                             missing, removed or faulted)"
                        .into(),
                }));
            }
            return Err(PoolError::NoSpace);
        };
        avoid.push(vdev);
        dvas[k] = Dva {
            vdev,
            asize_sectors: (size / SECTOR) as u32,
            offset,
        };
    }
    Ok(BlockPtr {
        dvas,
        birth: ctx.txg,
        lsize: size as u32,
        psize: size as u32,
        kind,
        level,
        checksum_type: CKSUM_BLAKE3,
        compression: 0,
        comp_level: 0,
        fill,
        checksum: [0; 32],
    })
}

/// Write blocks whose DVAs are allocated, filling in their checksums.
pub fn write_allocated(
    vdevs: &[Arc<TopVdev>],
    bps: &mut [BlockPtr],
    blocks: &[NewBlock],
) -> Result<()> {
    // Checksums on all cores.
    bps.par_iter_mut()
        .zip(blocks.par_iter())
        .for_each(|(bp, b)| bp.checksum = checksum(&b.data));
    let data: Vec<&[u8]> = blocks.iter().map(|b| b.data.as_slice()).collect();
    write_copies(vdevs, bps, &data)
}

/// Write every copy of blocks whose pointers are complete (DVAs and checksums).
pub fn write_copies(vdevs: &[Arc<TopVdev>], bps: &[BlockPtr], data: &[&[u8]]) -> Result<()> {
    // Every copy of every block: (vdev, offset, block index). Copies that lie one after the other
    // on a vdev (the allocator hands out space in order) go out as one write of up to 1 MiB.
    let mut copies: Vec<(u32, u64, usize)> = Vec::new();
    for (i, bp) in bps.iter().enumerate() {
        for d in bp.dvas.iter().filter(|d| !d.is_empty()) {
            copies.push((d.vdev, d.offset, i));
        }
    }
    copies.sort_unstable();
    // (vdev, start offset, length, blocks)
    let mut runs: Vec<(u32, u64, u64, Vec<usize>)> = Vec::new();
    for (vdev, off, i) in copies {
        let len = data[i].len() as u64;
        match runs.last_mut() {
            Some((v, start, rlen, members))
                if *v == vdev && *start + *rlen == off && *rlen + len <= 1 << 20 =>
            {
                *rlen += len;
                members.push(i);
            }
            _ => runs.push((vdev, off, len, vec![i])),
        }
    }
    runs.par_iter()
        .try_for_each(|(vdev, off, len, members)| -> Result<()> {
            let Some(t) = vdevs.get(*vdev as usize) else {
                return Err(PoolError::corrupt("write", format!("no vdev {vdev}")));
            };
            // Every copy must land: a block with a lost ditto copy would silently lose redundancy.
            // (A mirror already counts a write as done when one child took it.)
            if let [one] = members.as_slice() {
                return t.write(*off, data[*one]).map_err(Into::into);
            }
            // Gathered into a page-aligned buffer, which leaves take without another copy.
            let mut buf = cairn_vdev::file::AlignedBuf::with_capacity(*len as usize);
            for &m in members {
                buf.extend_from_slice(data[m]);
            }
            t.write(*off, buf.as_slice()).map_err(Into::into)
        })
}

/// Free every DVA of a block (deferred by the allocator).
pub fn free_bp(ctx: &mut TxgCtx, bp: &BlockPtr) {
    if bp.is_hole() {
        return;
    }
    for d in bp.dvas.iter().filter(|d| !d.is_empty()) {
        if let Err(e) = ctx.alloc.free(
            ctx.vdevs,
            d.vdev,
            d.offset,
            d.asize(),
            ctx.txg,
            ctx.committed,
        ) {
            // A bad free is a symptom of earlier damage; leaking the space is the safe reaction.
            tracing::error!("{e}");
        }
    }
}

struct Ind {
    bps: Vec<BlockPtr>,
    dirty: bool,
}

/// The byte range `[off, off + len)` of an object with `bs`-byte blocks, cut at block boundaries:
/// (block id, offset in the block, offset in the range, length) per piece, in order.
pub fn block_pieces(
    off: u64,
    len: usize,
    bs: u64,
) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= len {
            return None;
        }
        let o = off + pos as u64;
        let within = (o % bs) as usize;
        let take = (bs as usize - within).min(len - pos);
        let piece = (o / bs, within, pos, take);
        pos += take;
        Some(piece)
    })
}

/// A level-0 block changed in the open txg.
#[derive(Clone)]
pub enum Dirty {
    /// New contents, written at the next sync.
    Data(Vec<u8>),
    /// Becomes a hole at the next sync.
    Hole,
    /// Already allocated and written (or being written) in the open txg, outside the pool lock: the
    /// next sync only links `bp` into the tree. `data` is kept until the write is known to have
    /// landed, so reads meanwhile are served from memory (see [`Obj::put_written`]).
    Written {
        bp: BlockPtr,
        data: Option<Arc<Vec<u8>>>,
    },
}

impl Dirty {
    /// Whether the block holds data after the next sync (an all-zero block becomes a hole).
    pub fn holds_data(&self) -> bool {
        match self {
            Dirty::Data(b) => b.iter().any(|&x| x != 0),
            Dirty::Hole => false,
            Dirty::Written { .. } => true,
        }
    }
}

/// An object loaded in memory.
pub struct Obj {
    pub id: u64,
    pub dnode: Dnode,
    /// Level-0 blocks changed in the open txg.
    dirty: BTreeMap<u64, Dirty>,
    /// How many of them are `Dirty::Written` (kept so the space check costs O(1) per write).
    written: usize,
    /// Blocks written in the open txg and replaced before it committed: freed at the next sync.
    orphans: Vec<BlockPtr>,
    /// Ranges of level-0 block ids freed in the open txg, [start, end).
    frees: Vec<(u64, u64)>,
    ind: HashMap<(u8, u64), Ind>,
    dnode_dirty: bool,
    /// Blocks the last sync took out of the tree that a snapshot still references (born at or
    /// before [`Dnode::prev_snap_txg`]): not freed, but handed to the volume's deadlist.
    dead: Vec<BlockPtr>,
}

impl Obj {
    pub(crate) fn new(id: u64, dnode: Dnode) -> Obj {
        Obj {
            id,
            dnode,
            dirty: BTreeMap::new(),
            written: 0,
            orphans: Vec::new(),
            frees: Vec::new(),
            ind: HashMap::new(),
            dnode_dirty: false,
            dead: Vec::new(),
        }
    }

    /// The block pointer at (level, index) of the tree (a hole above the root or past it).
    pub(crate) fn bp_at(
        &mut self,
        vdevs: &[Arc<TopVdev>],
        level: u8,
        index: u64,
    ) -> Result<BlockPtr> {
        self.get_bp(vdevs, level, index)
    }

    /// Take a block out of the tree: free it, unless a snapshot still references it (the birth-txg
    /// rule), in which case it goes on the deadlist. Its space leaves the object's `used` either way.
    fn kill(&mut self, ctx: &mut TxgCtx, bp: &BlockPtr) {
        if bp.is_hole() {
            return;
        }
        self.dnode.used = self.dnode.used.saturating_sub(bp.asize());
        if bp.birth <= self.dnode.prev_snap_txg() {
            self.dead.push(*bp);
        } else {
            free_bp(ctx, bp);
        }
    }

    /// The blocks the last sync put aside for the deadlist.
    pub fn take_dead(&mut self) -> Vec<BlockPtr> {
        std::mem::take(&mut self.dead)
    }

    /// Every block of the committed tree born after `min_birth` (indirect blocks included), for a
    /// rollback: the object must have nothing changed in the open txg.
    pub fn blocks_born_after(
        &mut self,
        vdevs: &[Arc<TopVdev>],
        min_birth: Txg,
    ) -> Result<Vec<BlockPtr>> {
        let mut out = Vec::new();
        self.walk(vdevs, 0, min_birth, &mut |bp, _| {
            out.push(*bp);
            true
        })?;
        Ok(out)
    }

    /// Replace the object's tree by another one (a rollback): what is in memory is dropped, the new
    /// dnode is written at the next sync. The caller frees what the old tree alone held.
    pub fn reset_to(&mut self, dnode: Dnode) {
        debug_assert!(!self.is_dirty() || self.dirty.is_empty());
        self.dnode = dnode;
        self.dirty.clear();
        self.written = 0;
        self.frees.clear();
        self.ind.clear();
        self.dnode_dirty = true;
    }

    pub fn is_dirty(&self) -> bool {
        self.dnode_dirty
            || !self.dirty.is_empty()
            || !self.frees.is_empty()
            || !self.orphans.is_empty()
    }

    /// Bytes of level-0 blocks changed in the open txg (including those already written).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty.len() as u64 * self.dnode.block_size() as u64
    }

    /// Bytes of changed blocks whose space is not allocated yet (written at the next sync).
    pub fn unallocated_bytes(&self) -> u64 {
        (self.dirty.len() - self.written) as u64 * self.dnode.block_size() as u64
    }

    /// Forget the change to `blkid` in the open txg; a block already written becomes an orphan.
    fn take_dirty(&mut self, blkid: u64) -> Option<Dirty> {
        let d = self.dirty.remove(&blkid);
        if let Some(Dirty::Written { bp, .. }) = &d {
            self.orphans.push(*bp);
            self.written -= 1;
        }
        d
    }

    /// Record level-0 block `blkid` as written at `bp` in the open txg (the caller allocated `bp`,
    /// filled in its checksum, and writes `data` there after releasing the pool lock). Reads are
    /// served from `data` until [`Obj::written_done`] drops it.
    pub fn put_written(&mut self, blkid: u64, bp: BlockPtr, data: Arc<Vec<u8>>) -> Result<()> {
        self.grow(blkid)?;
        self.take_dirty(blkid);
        self.dirty.insert(
            blkid,
            Dirty::Written {
                bp,
                data: Some(data),
            },
        );
        self.written += 1;
        Ok(())
    }

    /// The write of `bp` landed: drop the in-memory copy if the block still points there.
    pub fn written_done(&mut self, blkid: u64, bp: &BlockPtr) {
        if let Some(Dirty::Written { bp: b, data }) = self.dirty.get_mut(&blkid) {
            if b == bp {
                *data = None;
            }
        }
    }

    /// The write of `bp` failed on every copy: keep the data for the next sync to write elsewhere.
    pub fn written_failed(&mut self, blkid: u64, bp: &BlockPtr) {
        if let Some(Dirty::Written { bp: b, data }) = self.dirty.get(&blkid) {
            if b == bp {
                let data = data.clone();
                self.take_dirty(blkid);
                match data {
                    Some(d) => {
                        let d = Arc::try_unwrap(d).unwrap_or_else(|d| (*d).clone());
                        self.dirty.insert(blkid, Dirty::Data(d));
                    }
                    None => tracing::error!(
                        "object {} block {blkid}: failed write reported after its data was dropped",
                        self.id
                    ),
                }
            }
        }
    }

    /// The block pointer at (level, index) in the current tree (the open txg's view of indirects).
    fn get_bp(&mut self, vdevs: &[Arc<TopVdev>], level: u8, index: u64) -> Result<BlockPtr> {
        let top = self.dnode.nlevels - 1;
        if level > top {
            return Ok(BlockPtr::HOLE);
        }
        if level == top {
            return Ok(if index == 0 {
                self.dnode.root
            } else {
                BlockPtr::HOLE
            });
        }
        let parent = index >> BPS_SHIFT;
        self.load_ind(vdevs, level + 1, parent)?;
        Ok(self.ind[&(level + 1, parent)].bps[(index & (BPS_PER_IND - 1)) as usize])
    }

    fn load_ind(&mut self, vdevs: &[Arc<TopVdev>], level: u8, index: u64) -> Result<()> {
        if self.ind.contains_key(&(level, index)) {
            return Ok(());
        }
        let bp = self.get_bp(vdevs, level, index)?;
        let bps = if bp.is_hole() {
            vec![BlockPtr::HOLE; BPS_PER_IND as usize]
        } else {
            if bp.kind != BlockKind::Indirect || bp.level != level || bp.psize as usize != IND_SIZE
            {
                return Err(PoolError::corrupt(
                    format!("object {} indirect block L{level}/{index}", self.id),
                    format!(
                        "pointer says kind {:?} level {} size {}",
                        bp.kind, bp.level, bp.psize
                    ),
                ));
            }
            let data = read_bp(vdevs, &bp)?;
            let mut v = Vec::with_capacity(BPS_PER_IND as usize);
            for c in data.chunks(BP_SIZE) {
                let child = BlockPtr::decode(c)?;
                if !child.is_hole() && child.level + 1 != level {
                    return Err(PoolError::corrupt(
                        format!("object {} indirect block L{level}/{index}", self.id),
                        format!("child at level {}", child.level),
                    ));
                }
                v.push(child);
            }
            v
        };
        if self.ind.len() >= MAX_CACHED_IND {
            // Bounded memory whatever the object's size: forget clean indirect blocks (they are
            // read again when needed); dirty ones must stay until the next sync.
            self.ind.retain(|_, ind| ind.dirty);
        }
        self.ind.insert((level, index), Ind { bps, dirty: false });
        Ok(())
    }

    fn set_bp(
        &mut self,
        vdevs: &[Arc<TopVdev>],
        level: u8,
        index: u64,
        bp: BlockPtr,
    ) -> Result<()> {
        let top = self.dnode.nlevels - 1;
        self.dnode_dirty = true;
        if level == top {
            debug_assert_eq!(index, 0);
            self.dnode.root = bp;
            return Ok(());
        }
        let parent = index >> BPS_SHIFT;
        self.load_ind(vdevs, level + 1, parent)?;
        let ind = self.ind.get_mut(&(level + 1, parent)).expect("loaded");
        ind.bps[(index & (BPS_PER_IND - 1)) as usize] = bp;
        ind.dirty = true;
        Ok(())
    }

    /// Make room for level-0 block `blkid` by adding levels on top.
    fn grow(&mut self, blkid: u64) -> Result<()> {
        while self.dnode.capacity() <= blkid {
            if self.dnode.nlevels as usize >= MAX_LEVELS {
                return Err(PoolError::Invalid(format!(
                    "object {} cannot grow to block {blkid}",
                    self.id
                )));
            }
            let mut bps = vec![BlockPtr::HOLE; BPS_PER_IND as usize];
            bps[0] = self.dnode.root;
            self.ind
                .insert((self.dnode.nlevels, 0), Ind { bps, dirty: true });
            self.dnode.root = BlockPtr::HOLE;
            self.dnode.nlevels += 1;
            self.dnode_dirty = true;
        }
        Ok(())
    }

    /// Does level-0 block `blkid` read as zeros unless changed in the open txg (freed in it, or past the
    /// tree), whatever pointer the tree still holds for it?
    fn freed_or_past_end(&self, blkid: u64) -> bool {
        blkid >= self.dnode.capacity() || self.frees.iter().any(|&(a, b)| a <= blkid && blkid < b)
    }

    /// The current contents of level-0 block `blkid` (zeros for a hole).
    pub fn read_block(&mut self, vdevs: &[Arc<TopVdev>], blkid: u64) -> Result<Vec<u8>> {
        let bs = self.dnode.block_size();
        let bp = match self.dirty.get(&blkid) {
            Some(Dirty::Data(d)) => return Ok(d.clone()),
            Some(Dirty::Hole) => return Ok(vec![0u8; bs]),
            Some(Dirty::Written { data: Some(d), .. }) => return Ok(d.to_vec()),
            Some(Dirty::Written { bp, data: None }) => *bp,
            None if self.freed_or_past_end(blkid) => return Ok(vec![0u8; bs]),
            None => self.get_bp(vdevs, 0, blkid)?,
        };
        if bp.is_hole() {
            return Ok(vec![0u8; bs]);
        }
        if bp.kind != BlockKind::Data && bp.kind != BlockKind::Dnodes || bp.lsize as usize != bs {
            return Err(PoolError::corrupt(
                format!("object {} block {blkid}", self.id),
                format!("pointer says kind {:?} size {}", bp.kind, bp.lsize),
            ));
        }
        read_bp(vdevs, &bp)
    }

    /// The level-0 blocks in `[from, to)` that hold data, in order, at most `max` of them, and the
    /// block up to which that list is complete: `to`, or less when `max` was reached. A block changed
    /// in the open txg holds data as [`Dirty::holds_data`] says; any other, if the tree points at it
    /// and the open txg did not free it. Hole subtrees are skipped at every level, so the cost
    /// follows what is allocated, not the size of the range (a 1 PiB volume with a few blocks
    /// answers at once).
    pub fn allocated_blocks(
        &mut self,
        vdevs: &[Arc<TopVdev>],
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<(Vec<u64>, u64)> {
        let to = to.max(from);
        // What the tree holds, up to `max` blocks (the open txg's changes are laid over it below).
        let mut disk = Vec::new();
        let mut disk_end = to;
        let max = max.max(1);
        if from < to {
            let stop = self.walk(vdevs, from, Txg(0), &mut |bp, start| {
                if start >= to {
                    return false;
                }
                if bp.level == 0 {
                    if disk.len() >= max {
                        return false;
                    }
                    disk.push(start);
                }
                true
            })?;
            if let Some(s) = stop {
                disk_end = s.clamp(from, to);
            }
        }
        let mut out: Vec<u64> = Vec::with_capacity(disk.len().min(max));
        let mut changed = self.dirty.range(from..disk_end).peekable();
        let mut on_disk = disk.into_iter().peekable();
        loop {
            let next_changed = changed.peek().map(|(&b, _)| b);
            let next_disk = on_disk.peek().copied();
            let take_changed = match (next_changed, next_disk) {
                (None, None) => break,
                (Some(c), Some(d)) => c <= d,
                (Some(_), None) => true,
                (None, Some(_)) => false,
            };
            let (b, allocated) = if take_changed {
                let Some((&c, state)) = changed.next() else {
                    break;
                };
                if next_disk == Some(c) {
                    on_disk.next();
                }
                (c, state.holds_data())
            } else {
                let Some(d) = on_disk.next() else {
                    break;
                };
                (d, !self.freed_or_past_end(d))
            };
            if !allocated {
                continue;
            }
            if out.len() >= max {
                return Ok((out, b));
            }
            out.push(b);
        }
        Ok((out, disk_end))
    }

    /// The block pointer of level-0 block `blkid` in the current tree (a hole if unwritten).
    pub fn block_pointer(&mut self, vdevs: &[Arc<TopVdev>], blkid: u64) -> Result<BlockPtr> {
        if blkid >= self.dnode.capacity() {
            return Ok(BlockPtr::HOLE);
        }
        self.get_bp(vdevs, 0, blkid)
    }

    /// Depth-first walk of the block tree in level-0 order, from level-0 block `from` on, calling
    /// `emit(bp, first level-0 block under it)` for every non-hole pointer born after `min_birth` (a
    /// parent is emitted before its children; a subtree born at or before `min_birth` is skipped whole,
    /// since copy-on-write makes a parent at least as new as its children). Returns the level-0 block
    /// to resume from when `emit` asks to stop (returns false), or `None` once the tree is done.
    pub fn walk(
        &mut self,
        vdevs: &[Arc<TopVdev>],
        from: u64,
        min_birth: Txg,
        emit: &mut dyn FnMut(&BlockPtr, u64) -> bool,
    ) -> Result<Option<u64>> {
        let top = self.dnode.nlevels - 1;
        self.walk_at(vdevs, top, 0, from, min_birth, emit)
    }

    fn walk_at(
        &mut self,
        vdevs: &[Arc<TopVdev>],
        level: u8,
        index: u64,
        from: u64,
        min_birth: Txg,
        emit: &mut dyn FnMut(&BlockPtr, u64) -> bool,
    ) -> Result<Option<u64>> {
        let bp = self.get_bp(vdevs, level, index)?;
        if bp.is_hole() || bp.birth <= min_birth {
            return Ok(None);
        }
        let shift = BPS_SHIFT * level as u32;
        let start = index.checked_shl(shift).unwrap_or(u64::MAX);
        let end = (index + 1).checked_shl(shift).unwrap_or(u64::MAX);
        if end <= from {
            return Ok(None);
        }
        if start >= from && !emit(&bp, start) {
            return Ok(Some(start));
        }
        if level == 0 {
            return Ok(None);
        }
        self.load_ind(vdevs, level, index)?;
        let child_span = 1u64 << (BPS_SHIFT * (level as u32 - 1));
        let first = if from > start {
            (from - start) / child_span
        } else {
            0
        };
        for i in first..BPS_PER_IND {
            let c = (index << BPS_SHIFT) + i;
            if let Some(next) = self.walk_at(vdevs, level - 1, c, from, min_birth, emit)? {
                return Ok(Some(next));
            }
        }
        Ok(None)
    }

    pub fn mark_dnode_dirty(&mut self) {
        self.dnode_dirty = true;
    }

    /// Fill what can be filled from memory (dirty blocks, holes) and return the blocks that must be
    /// read from disk: `(block pointer, offset within the block, offset in buf, length)`.
    pub fn plan_read(
        &mut self,
        vdevs: &[Arc<TopVdev>],
        off: u64,
        buf: &mut [u8],
    ) -> Result<Vec<(BlockPtr, usize, usize, usize)>> {
        let bs = self.dnode.block_size() as u64;
        let mut todo = Vec::new();
        for (blkid, within, pos, take) in block_pieces(off, buf.len(), bs) {
            let dst = &mut buf[pos..pos + take];
            match self.dirty.get(&blkid) {
                Some(Dirty::Data(d)) => dst.copy_from_slice(&d[within..within + take]),
                Some(Dirty::Written { data: Some(d), .. }) => {
                    dst.copy_from_slice(&d[within..within + take])
                }
                Some(Dirty::Written { bp, data: None }) => todo.push((*bp, within, pos, take)),
                Some(Dirty::Hole) => dst.fill(0),
                None if self.freed_or_past_end(blkid) => dst.fill(0),
                None => {
                    let bp = self.get_bp(vdevs, 0, blkid)?;
                    if bp.is_hole() {
                        dst.fill(0);
                    } else if (bp.kind != BlockKind::Data && bp.kind != BlockKind::Dnodes)
                        || bp.lsize as u64 != bs
                    {
                        return Err(PoolError::corrupt(
                            format!("object {} block {blkid}", self.id),
                            format!("pointer says kind {:?} size {}", bp.kind, bp.lsize),
                        ));
                    } else {
                        todo.push((bp, within, pos, take));
                    }
                }
            }
        }
        Ok(todo)
    }

    /// Read `buf.len()` bytes at `off`.
    pub fn read(&mut self, vdevs: &[Arc<TopVdev>], off: u64, buf: &mut [u8]) -> Result<()> {
        let bs = self.dnode.block_size() as u64;
        for (blkid, within, pos, take) in block_pieces(off, buf.len(), bs) {
            let block = self.read_block(vdevs, blkid)?;
            buf[pos..pos + take].copy_from_slice(&block[within..within + take]);
        }
        Ok(())
    }

    /// The on-disk pointers of the partial blocks a write of `len` bytes at `off` would have to read
    /// first (blocks neither changed in the open txg, nor freed, nor holes), so that a caller can read
    /// them without the pool lock and hand them to [`Obj::write_preread`].
    pub fn partial_reads(
        &mut self,
        vdevs: &[Arc<TopVdev>],
        off: u64,
        len: u64,
    ) -> Result<Vec<(u64, BlockPtr)>> {
        let bs = self.dnode.block_size() as u64;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = off + len;
        let mut ends = vec![off / bs];
        if (end - 1) / bs != off / bs {
            ends.push((end - 1) / bs);
        }
        let mut out = Vec::new();
        for blkid in ends {
            let whole = blkid * bs >= off && (blkid + 1) * bs <= end;
            if whole || self.dirty.contains_key(&blkid) || self.freed_or_past_end(blkid) {
                continue;
            }
            let bp = self.get_bp(vdevs, 0, blkid)?;
            if !bp.is_hole() {
                out.push((blkid, bp));
            }
        }
        Ok(out)
    }

    /// [`Obj::write`], taking the old contents of partial blocks from `preread` (block id, the
    /// pointer they were read by, data) when the block still has that pointer and is unchanged.
    pub fn write_preread(
        &mut self,
        vdevs: &[Arc<TopVdev>],
        off: u64,
        data: &[u8],
        preread: &mut Vec<(u64, BlockPtr, Vec<u8>)>,
    ) -> Result<()> {
        let bs = self.dnode.block_size();
        let mut pos = off;
        let end = off + data.len() as u64;
        let inside = |b: u64| b * (bs as u64) < end && (b + 1) * (bs as u64) > off;
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(preread)
            .into_iter()
            .partition(|p| inside(p.0));
        *preread = rest;
        for (blkid, bp, mut block) in mine {
            let (b0, b1) = (blkid * bs as u64, (blkid + 1) * bs as u64);
            if block.len() != bs {
                continue;
            }
            let current = !self.dirty.contains_key(&blkid)
                && !self.freed_or_past_end(blkid)
                && self.get_bp(vdevs, 0, blkid)? == bp;
            if !current {
                continue;
            }
            // Write what comes before this block the ordinary way, then this block from `block`.
            if pos < b0 {
                self.write(vdevs, pos, &data[(pos - off) as usize..(b0 - off) as usize])?;
            }
            let (from, to) = (pos.max(b0), end.min(b1));
            block[(from - b0) as usize..(to - b0) as usize]
                .copy_from_slice(&data[(from - off) as usize..(to - off) as usize]);
            self.take_dirty(blkid);
            self.dirty.insert(blkid, Dirty::Data(block));
            pos = to;
        }
        if pos < end {
            self.write(vdevs, pos, &data[(pos - off) as usize..])?;
        }
        Ok(())
    }

    /// Write `data` at `off` (in memory until the next sync).
    pub fn write(&mut self, vdevs: &[Arc<TopVdev>], off: u64, data: &[u8]) -> Result<()> {
        let bs = self.dnode.block_size() as u64;
        if data.is_empty() {
            return Ok(());
        }
        let last = (off + data.len() as u64 - 1) / bs;
        self.grow(last)?;
        for (blkid, within, pos, take) in block_pieces(off, data.len(), bs) {
            let block = if take == bs as usize {
                self.take_dirty(blkid);
                data[pos..pos + take].to_vec()
            } else {
                let mut block = match self.dirty.get(&blkid) {
                    Some(Dirty::Data(_)) => match self.take_dirty(blkid) {
                        Some(Dirty::Data(d)) => d,
                        _ => unreachable!("just matched"),
                    },
                    _ => {
                        let b = self.read_block(vdevs, blkid)?;
                        self.take_dirty(blkid);
                        b
                    }
                };
                block[within..within + take].copy_from_slice(&data[pos..pos + take]);
                block
            };
            self.dirty.insert(blkid, Dirty::Data(block));
        }
        Ok(())
    }

    /// Free whole blocks in [off, off+len) and zero the partial ends.
    pub fn free_range(&mut self, vdevs: &[Arc<TopVdev>], off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let bs = self.dnode.block_size() as u64;
        let end = off.saturating_add(len);
        let first_full = off.div_ceil(bs);
        let last_full = end / bs; // exclusive
        if first_full > last_full {
            // Inside one block.
            return self.write(vdevs, off, &vec![0u8; (end - off) as usize]);
        }
        if off < first_full * bs {
            self.write(vdevs, off, &vec![0u8; (first_full * bs - off) as usize])?;
        }
        if last_full * bs < end {
            self.write(
                vdevs,
                last_full * bs,
                &vec![0u8; (end - last_full * bs) as usize],
            )?;
        }
        if first_full < last_full {
            let keys: Vec<u64> = self
                .dirty
                .range(first_full..last_full)
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                self.take_dirty(k);
            }
            let b = last_full.min(self.dnode.capacity());
            if first_full < b {
                self.frees.push((first_full, b));
            }
        }
        Ok(())
    }

    /// Free the blocks under (level, index) that fall in [a, b).
    fn free_walk(&mut self, ctx: &mut TxgCtx, level: u8, index: u64, a: u64, b: u64) -> Result<()> {
        let bp = self.get_bp(ctx.vdevs, level, index)?;
        if bp.is_hole() {
            return Ok(());
        }
        if level == 0 {
            if a <= index && index < b {
                self.kill(ctx, &bp);
                self.set_bp(ctx.vdevs, 0, index, BlockPtr::HOLE)?;
            }
            return Ok(());
        }
        let span = 1u64 << (BPS_SHIFT * level as u32);
        let first_child = index << BPS_SHIFT;
        let child_span = span >> BPS_SHIFT;
        for i in 0..BPS_PER_IND {
            let c = first_child + i;
            let lo = c * child_span;
            let hi = lo + child_span;
            if hi <= a || lo >= b {
                continue;
            }
            self.free_walk(ctx, level - 1, c, a, b)?;
        }
        Ok(())
    }

    /// Write everything dirty in this object; updates the dnode.
    pub fn sync(&mut self, ctx: &mut TxgCtx, data_kind: BlockKind) -> Result<()> {
        let top = self.dnode.nlevels - 1;
        for bp in std::mem::take(&mut self.orphans) {
            free_bp(ctx, &bp);
        }
        for (a, b) in std::mem::take(&mut self.frees) {
            self.free_walk(ctx, top, 0, a, b)?;
        }
        // Level 0.
        let dirty = std::mem::take(&mut self.dirty);
        debug_assert_eq!(
            self.written,
            dirty
                .values()
                .filter(|d| matches!(d, Dirty::Written { .. }))
                .count(),
            "count of early-written blocks"
        );
        self.written = 0;
        let mut writes: Vec<(u64, NewBlock)> = Vec::new();
        for (blkid, d) in dirty {
            match d {
                Dirty::Written { bp, .. } => self.replace_bp(ctx, 0, blkid, bp)?,
                Dirty::Data(data) if data.iter().any(|&x| x != 0) => writes.push((
                    blkid,
                    NewBlock {
                        data,
                        kind: data_kind,
                        level: 0,
                        copies: self.dnode.copies,
                        fill: 1,
                    },
                )),
                _ => {
                    let old = self.get_bp(ctx.vdevs, 0, blkid)?;
                    if !old.is_hole() {
                        self.kill(ctx, &old);
                        self.set_bp(ctx.vdevs, 0, blkid, BlockPtr::HOLE)?;
                    }
                }
            }
        }
        let (ids, mut blocks): (Vec<u64>, Vec<NewBlock>) = writes.into_iter().unzip();
        // Data blocks of a volume that compresses are stored compressed when it pays (as the
        // whole-block writes of `Pool::write_object` are), on all cores.
        let comp = match data_kind {
            BlockKind::Data => {
                crate::compress::Compression::from_byte(self.dnode.compression).unwrap_or_default()
            }
            _ => crate::compress::Compression::Off,
        };
        let compressed: Vec<bool> = if comp == crate::compress::Compression::Off {
            vec![false; blocks.len()]
        } else {
            blocks
                .par_iter_mut()
                .map(|b| match comp.compress(&b.data) {
                    Some(stored) => {
                        b.data = stored;
                        true
                    }
                    None => false,
                })
                .collect()
        };
        let bps = write_blocks(ctx, &blocks)?;
        drop(blocks);
        let bs = self.dnode.block_size() as u32;
        for ((blkid, mut bp), c) in ids.into_iter().zip(bps).zip(compressed) {
            if c {
                bp.lsize = bs;
                bp.compression = comp.code();
                bp.comp_level = match comp {
                    crate::compress::Compression::Zstd(n) => n,
                    _ => 0,
                };
            }
            self.replace_bp(ctx, 0, blkid, bp)?;
        }
        // Indirect levels, bottom-up.
        let meta_copies = (self.dnode.copies + 1).min(3);
        for level in 1..=top {
            let mut keys: Vec<u64> = self
                .ind
                .iter()
                .filter(|((l, _), ind)| *l == level && ind.dirty)
                .map(|((_, i), _)| *i)
                .collect();
            keys.sort_unstable();
            let mut blocks = Vec::new();
            let mut holes = Vec::new();
            for &i in &keys {
                let ind = self.ind.get_mut(&(level, i)).expect("listed");
                ind.dirty = false;
                let fill: u64 = ind.bps.iter().map(|b| b.fill).sum();
                if ind.bps.iter().all(|b| b.is_hole()) {
                    holes.push(i);
                    continue;
                }
                let mut data = vec![0u8; IND_SIZE];
                for (j, b) in ind.bps.iter().enumerate() {
                    b.encode_into(&mut data[j * BP_SIZE..(j + 1) * BP_SIZE]);
                }
                blocks.push((
                    i,
                    NewBlock {
                        data,
                        kind: BlockKind::Indirect,
                        level,
                        copies: meta_copies,
                        fill,
                    },
                ));
            }
            let (ids, nb): (Vec<u64>, Vec<NewBlock>) = blocks.into_iter().unzip();
            let bps = write_blocks(ctx, &nb)?;
            for (i, bp) in ids.into_iter().zip(bps) {
                self.replace_bp(ctx, level, i, bp)?;
            }
            for i in holes {
                self.replace_bp(ctx, level, i, BlockPtr::HOLE)?;
                self.ind.remove(&(level, i));
            }
        }
        if self.ind.len() > MAX_CACHED_IND {
            self.ind.retain(|_, ind| ind.dirty);
        }
        Ok(())
    }

    fn replace_bp(&mut self, ctx: &mut TxgCtx, level: u8, index: u64, bp: BlockPtr) -> Result<()> {
        let old = self.get_bp(ctx.vdevs, level, index)?;
        self.kill(ctx, &old);
        self.dnode.used += bp.asize();
        self.set_bp(ctx.vdevs, level, index, bp)
    }
}

/// The objset block the uberblock points at: the meta dnode and per-vdev allocated bytes.
pub const OBJSET_SIZE: usize = 4096;
pub const OBJSET_MAGIC: u64 = u64::from_le_bytes(*b"CAIRNOS\0");
/// The objset version new pools are written with: 2 = map pages of `MAP_SLOTS` slots (and frees
/// deferred `HISTORY_TXGS` txgs); 1 = two slots (A/B), as before. A pool keeps its version.
pub const OBJSET_VERSION: u32 = 2;
/// The oldest objset version still read.
pub const OBJSET_VERSION_MIN: u32 = 1;
pub const MAX_TOPS: usize = cairn_vdev::config::MAX_TOPS;

pub struct ObjsetPhys {
    /// 1 or 2 (see [`OBJSET_VERSION`]).
    pub version: u32,
    pub meta: Dnode,
    pub alloc_bytes: Vec<u64>,
}

impl ObjsetPhys {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; OBJSET_SIZE];
        put_u64(&mut b, 0, OBJSET_MAGIC);
        put_u32(&mut b, 8, self.version);
        put_u32(&mut b, 12, self.alloc_bytes.len() as u32);
        self.meta.encode_into(&mut b[16..16 + DNODE_SIZE]);
        for (i, &a) in self.alloc_bytes.iter().enumerate() {
            put_u64(&mut b, 272 + i * 8, a);
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<ObjsetPhys> {
        let bad = |d: String| Err(PoolError::corrupt("objset block", d));
        if b.len() != OBJSET_SIZE {
            return bad(format!("size {}", b.len()));
        }
        if get_u64(b, 0) != OBJSET_MAGIC {
            return bad("bad magic".into());
        }
        let version = get_u32(b, 8);
        if !(OBJSET_VERSION_MIN..=OBJSET_VERSION).contains(&version) {
            return bad(format!(
                "version {version} (this version of Cairn reads versions \
                 {OBJSET_VERSION_MIN} to {OBJSET_VERSION})"
            ));
        }
        let n = get_u32(b, 12) as usize;
        if n > MAX_TOPS {
            return bad(format!("{n} vdevs"));
        }
        let meta = Dnode::decode(&b[16..16 + DNODE_SIZE])?;
        if meta.otype != ObjType::Bytes || meta.data_shift != META_SHIFT {
            return bad("meta dnode has the wrong type or block size".into());
        }
        let alloc_bytes = (0..n).map(|i| get_u64(b, 272 + i * 8)).collect();
        Ok(ObjsetPhys {
            version,
            meta,
            alloc_bytes,
        })
    }
}

/// An object set: the meta object (dnodes) and the objects loaded from it.
pub struct ObjSet {
    meta: Obj,
    objs: HashMap<u64, Obj>,
}

impl ObjSet {
    /// A new, empty object set.
    pub fn create() -> ObjSet {
        let mut meta = Obj::new(0, Dnode::new(ObjType::Bytes, META_SHIFT, 2));
        meta.dnode_dirty = true;
        ObjSet {
            meta,
            objs: HashMap::new(),
        }
    }

    pub fn open(meta: Dnode) -> ObjSet {
        ObjSet {
            meta: Obj::new(0, meta),
            objs: HashMap::new(),
        }
    }

    pub fn meta_dnode(&self) -> Dnode {
        self.meta.dnode
    }

    /// The meta object (object 0: the dnodes).
    pub fn meta_obj(&mut self) -> &mut Obj {
        &mut self.meta
    }

    /// One past the highest object id.
    pub fn max_objects(&self) -> u64 {
        self.meta.dnode.size / DNODE_SIZE as u64
    }

    /// The loaded object `id`, reading its dnode if needed.
    pub fn obj(&mut self, vdevs: &[Arc<TopVdev>], id: u64) -> Result<&mut Obj> {
        if !self.objs.contains_key(&id) {
            if id == 0 || id >= self.max_objects() {
                return Err(PoolError::NotFound(format!("object {id} does not exist")));
            }
            let mut b = vec![0u8; DNODE_SIZE];
            self.meta.read(vdevs, id * DNODE_SIZE as u64, &mut b)?;
            let dn = Dnode::decode(&b)?;
            if dn.otype == ObjType::Free {
                return Err(PoolError::NotFound(format!("object {id} does not exist")));
            }
            self.objs.insert(id, Obj::new(id, dn));
        }
        Ok(self.objs.get_mut(&id).expect("inserted"))
    }

    /// Create an object; returns its id.
    pub fn create_object(
        &mut self,
        vdevs: &[Arc<TopVdev>],
        otype: ObjType,
        data_shift: u8,
        copies: u8,
    ) -> Result<u64> {
        if !(MIN_DATA_SHIFT..=MAX_DATA_SHIFT).contains(&data_shift) || !(1..=3).contains(&copies) {
            return Err(PoolError::Invalid(format!(
                "bad object parameters: block shift {data_shift}, copies {copies}"
            )));
        }
        // First free dnode slot, else a new one at the end.
        let mut id = self.max_objects().max(1);
        for cand in 1..self.max_objects() {
            if self.objs.contains_key(&cand) {
                continue;
            }
            let mut b = vec![0u8; DNODE_SIZE];
            self.meta.read(vdevs, cand * DNODE_SIZE as u64, &mut b)?;
            if b[0] == ObjType::Free as u8 {
                id = cand;
                break;
            }
        }
        let mut o = Obj::new(id, Dnode::new(otype, data_shift, copies));
        o.dnode_dirty = true;
        self.objs.insert(id, o);
        let end = (id + 1) * DNODE_SIZE as u64;
        if end > self.meta.dnode.size {
            self.meta.dnode.size = end;
            self.meta.dnode_dirty = true;
        }
        Ok(id)
    }

    /// Free an object and all its blocks at the next sync.
    pub fn destroy_object(&mut self, vdevs: &[Arc<TopVdev>], id: u64) -> Result<()> {
        let o = self.obj(vdevs, id)?;
        let cap = o.dnode.capacity();
        for k in o.dirty.keys().copied().collect::<Vec<_>>() {
            o.take_dirty(k);
        }
        o.frees.push((0, cap));
        o.dnode.size = 0;
        o.dnode.otype = ObjType::Free;
        o.dnode_dirty = true;
        Ok(())
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.objs.values().map(|o| o.dirty_bytes()).sum::<u64>() + self.meta.dirty_bytes()
    }

    /// The block size of a loaded object.
    pub fn loaded_block_size(&self, id: u64) -> Option<u64> {
        self.objs.get(&id).map(|o| o.dnode.block_size() as u64)
    }

    /// Space the dirty data will take once written (every copy).
    pub fn dirty_space(&self) -> u64 {
        self.objs
            .values()
            .chain(std::iter::once(&self.meta))
            .map(|o| o.unallocated_bytes() * o.dnode.copies.max(1) as u64)
            .sum()
    }

    pub fn is_dirty(&self) -> bool {
        self.meta.is_dirty() || self.objs.values().any(|o| o.is_dirty())
    }

    /// Write everything dirty; returns the new meta dnode.
    pub fn sync(&mut self, ctx: &mut TxgCtx) -> Result<Dnode> {
        self.sync_objects(ctx, &|_| true)?;
        self.meta.sync(ctx, BlockKind::Dnodes)?;
        self.meta.dnode_dirty = false;
        Ok(self.meta.dnode)
    }

    /// Write the dirty objects whose dnode `which` selects (their dnodes go into the meta object,
    /// which is written by [`ObjSet::sync`]). Volumes are written first, so the blocks they hand to
    /// deadlists can be appended to the deadlist objects before those are written.
    pub fn sync_objects(&mut self, ctx: &mut TxgCtx, which: &dyn Fn(&Dnode) -> bool) -> Result<()> {
        let mut ids: Vec<u64> = self
            .objs
            .iter()
            .filter(|(_, o)| o.is_dirty() && which(&o.dnode))
            .map(|(i, _)| *i)
            .collect();
        ids.sort_unstable();
        for id in ids {
            let o = self.objs.get_mut(&id).expect("listed");
            let kind = BlockKind::Data;
            o.sync(ctx, kind)?;
            // A freed object ends with an empty tree; its dnode slot becomes free.
            let dn = if o.dnode.otype == ObjType::Free {
                Dnode::FREE
            } else {
                o.dnode
            };
            o.dnode_dirty = false;
            let mut b = vec![0u8; DNODE_SIZE];
            dn.encode_into(&mut b);
            self.meta.write(ctx.vdevs, id * DNODE_SIZE as u64, &b)?;
            if dn.otype == ObjType::Free {
                self.objs.remove(&id);
            }
        }
        Ok(())
    }

    /// The blocks every loaded object put aside for its deadlist in the last sync, by object.
    pub fn take_dead(&mut self) -> Vec<(u64, Vec<BlockPtr>)> {
        let mut out: Vec<(u64, Vec<BlockPtr>)> = self
            .objs
            .iter_mut()
            .filter(|(_, o)| !o.dead.is_empty())
            .map(|(&id, o)| (id, o.take_dead()))
            .collect();
        out.sort_unstable_by_key(|(id, _)| *id);
        out
    }

    /// Create an object with a given dnode (a snapshot or a clone: a copy of another object's
    /// dnode, sharing its tree). Written at the next sync.
    pub fn create_with_dnode(&mut self, vdevs: &[Arc<TopVdev>], dnode: Dnode) -> Result<u64> {
        let id = self.create_object(vdevs, dnode.otype, dnode.data_shift, dnode.copies)?;
        let o = self.objs.get_mut(&id).expect("created");
        o.dnode = dnode;
        o.dnode_dirty = true;
        Ok(id)
    }

    /// Free an object's dnode slot at the next sync without touching its tree (which is shared, or
    /// freed by the caller): returns its dnode. The object must have nothing changed in the open
    /// txg (commit first).
    pub fn detach_object(&mut self, vdevs: &[Arc<TopVdev>], id: u64) -> Result<Dnode> {
        let o = self.obj(vdevs, id)?;
        if !o.dirty.is_empty() || !o.frees.is_empty() || !o.orphans.is_empty() {
            return Err(PoolError::Invalid(format!(
                "object {id} has uncommitted changes"
            )));
        }
        let dn = o.dnode;
        o.dnode.otype = ObjType::Free;
        o.dnode.root = BlockPtr::HOLE;
        o.dnode.nlevels = 1;
        o.dnode.size = 0;
        o.ind.clear();
        o.dnode_dirty = true;
        Ok(dn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnode_roundtrip_and_validation() {
        let mut d = Dnode::new(ObjType::Volume, 14, 2);
        d.size = 12345;
        let mut b = vec![0u8; DNODE_SIZE];
        d.encode_into(&mut b);
        assert_eq!(Dnode::decode(&b).unwrap(), d);
        b[2] = 40;
        assert!(Dnode::decode(&b).is_err());
        b[2] = 14;
        b[1] = 99;
        assert!(Dnode::decode(&b).is_err());
        assert_eq!(Dnode::decode(&[0u8; DNODE_SIZE]).unwrap(), Dnode::FREE);
    }

    #[test]
    fn capacity_grows_by_128() {
        let mut d = Dnode::new(ObjType::Bytes, 12, 1);
        assert_eq!(d.capacity(), 1);
        d.nlevels = 2;
        assert_eq!(d.capacity(), 128);
        d.nlevels = 3;
        assert_eq!(d.capacity(), 128 * 128);
    }
}
