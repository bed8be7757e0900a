//! Snapshots, clones, rollback and background frees: the mechanism (names and rules live in the
//! dataset crate).
//!
//! A snapshot is a MOS object of type Snapshot whose dnode is a copy of its volume's dnode at a
//! committed txg: it shares the whole block tree, so taking one costs a dnode whatever the volume's
//! size. A clone is a new Volume object whose dnode is a copy of a snapshot's. The birth-txg rule
//! keeps shared blocks alive: a volume's dnode records the txg of its previous snapshot (its
//! origin's, for a clone) and hands blocks born at or before it to its deadlist instead of freeing
//! them (`object::Obj::kill`, `deadlist`).
//!
//! The links between them (previous and next snapshot, clones, deadlists) and the queue of
//! background frees are the [`SnapTable`], a bincode blob in the pool directory ("snapshots"),
//! loaded on first use and rewritten in the txg that changes it.
//!
//! Lineage: a volume's snapshots form a chain `prev` from the volume (the head) back to the oldest;
//! `next` points forward (the newest snapshot's next is the head). A clone's head, or its oldest
//! snapshot, has its origin as `prev`; the origin's `next` stays in its own lineage. So `prev` is in
//! the same lineage exactly when its `next` points back.
//!
//! Destroying a volume or rolling one back detaches the old tree and queues it as a [`FreeTask`]:
//! each txg frees up to `FREE_BUDGET` blocks of it (born after the shared txg), so a large destroy
//! goes on in the background across txgs and restarts (the pool's `freeing` property). Indirect
//! blocks are freed only once the walk has passed everything below them.
//!
//! Invariants: a block is freed exactly when no tree references it any more; every change to the
//! table, the dnodes and the free queue happens under the pool lock and commits in one txg.

use crate::blkptr::BlockPtr;
use crate::deadlist::{self, Deadlist};
use crate::error::{PoolError, Result};
use crate::object::{self, Dnode, Obj, ObjSet, ObjType, TxgCtx, BPS_SHIFT, DNODE_SIZE};
use crate::pool::{blob_opts, read_blob, write_blob_in, Inner, Pool, MOS_COPIES};
use bincode::Options;
use cairn_vdev::tree::TopVdev;
use cairn_vdev::Txg;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Name of the table's blob in the pool directory.
const BLOB: &str = "snapshots";
/// Blocks a txg frees from the background queue at most.
pub const FREE_BUDGET: usize = 131_072;

/// The links of a volume (head) or snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DsLinks {
    pub snapshot: bool,
    /// Snapshots: the txg whose committed state they hold.
    pub txg: u64,
    /// The previous snapshot (a clone's head or oldest snapshot: its origin); 0 if none.
    pub prev: u64,
    /// Snapshots: the next snapshot of the lineage, or the head.
    pub next: u64,
    /// Snapshots: the heads of the clones made from it.
    pub clones: Vec<u64>,
    pub deadlist: Deadlist,
}

/// Work of the background free queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FreeTask {
    /// Free every entry of these deadlist objects (from entry `next` of the first), then the
    /// objects themselves.
    Entries {
        objects: Vec<u64>,
        next: u64,
        bytes_left: u64,
    },
    /// Free the blocks born after `min_birth` of a detached tree (its encoded dnode), from level-0
    /// block `next` on; `held` are indirect blocks (encoded pointer, first level-0 block) already
    /// walked whose subtrees are not done yet.
    Tree {
        dnode: Vec<u8>,
        min_birth: u64,
        next: u64,
        held: Vec<(Vec<u8>, u64)>,
        bytes_left: u64,
    },
}

impl FreeTask {
    fn bytes_left(&self) -> u64 {
        match self {
            FreeTask::Entries { bytes_left, .. } | FreeTask::Tree { bytes_left, .. } => *bytes_left,
        }
    }
}

/// Every link and the background free queue.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapTable {
    pub ds: BTreeMap<u64, DsLinks>,
    pub freeing: Vec<FreeTask>,
}

impl SnapTable {
    /// Is `prev` the previous snapshot of `cur` in the same lineage (not an origin)?
    pub fn same_lineage(&self, prev: u64, cur: u64) -> bool {
        prev != 0 && self.ds.get(&prev).is_some_and(|p| p.next == cur)
    }

    /// The snapshots of a head's own lineage, newest first.
    pub fn snapshots_of(&self, head: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut cur = head;
        while let Some(l) = self.ds.get(&cur) {
            if !self.same_lineage(l.prev, cur) || out.len() > self.ds.len() {
                break;
            }
            out.push(l.prev);
            cur = l.prev;
        }
        out
    }

    /// The origin snapshot of a head (or snapshot) whose lineage began as a clone.
    pub fn origin_of(&self, id: u64) -> Option<u64> {
        let mut cur = id;
        for _ in 0..=self.ds.len() {
            let l = self.ds.get(&cur)?;
            if l.prev == 0 {
                return None;
            }
            if !self.same_lineage(l.prev, cur) {
                return Some(l.prev);
            }
            cur = l.prev;
        }
        None
    }

    /// The txg boundaries of a head's deadlist buckets: its lineage's snapshot txgs and the
    /// origin's, ascending.
    fn boundaries(&self, head: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut cur = head;
        for _ in 0..=self.ds.len() {
            let Some(l) = self.ds.get(&cur) else { break };
            let Some(p) = self.ds.get(&l.prev) else {
                break;
            };
            out.push(p.txg);
            if p.next != cur {
                break;
            }
            cur = l.prev;
        }
        out.reverse();
        out
    }

    /// Bytes the background queue has still to free.
    pub fn freeing(&self) -> u64 {
        self.freeing.iter().map(FreeTask::bytes_left).sum()
    }
}

/// Space figures of one volume or snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DsSpace {
    /// Allocated bytes (every copy) of the blocks its tree references.
    pub referenced: u64,
    /// Bytes of its deadlist, per bucket key.
    pub dead: BTreeMap<u64, u64>,
}

impl Inner {
    /// The table (loaded on first use).
    pub(crate) fn snaps(&mut self) -> Result<&mut SnapTable> {
        if self.snaps.is_none() {
            let t = match self.dir.get(BLOB) {
                None => SnapTable::default(),
                Some(&id) => {
                    let vdevs = self.tree.tops.clone();
                    let b = read_blob(&mut self.mos, &vdevs, id)?;
                    if b.is_empty() {
                        SnapTable::default()
                    } else {
                        blob_opts()
                            .deserialize(&b)
                            .map_err(|e| PoolError::corrupt("snapshot table", e.to_string()))?
                    }
                }
            };
            self.snaps = Some(t);
        }
        Ok(self.snaps.as_mut().expect("loaded"))
    }

    /// The table, to change it: its blob is rewritten by the next commit.
    fn snaps_mut(&mut self) -> Result<&mut SnapTable> {
        if !self.dir.contains_key(BLOB) {
            let vdevs = self.tree.tops.clone();
            let id = self
                .mos
                .create_object(&vdevs, ObjType::Bytes, 14, MOS_COPIES)?;
            self.dir.insert(BLOB.to_string(), id);
            self.dir_dirty = true;
        }
        self.snaps()?;
        self.snaps_dirty = true;
        Ok(self.snaps.as_mut().expect("loaded"))
    }

    fn head_dnode(&mut self, id: u64) -> Result<Dnode> {
        let vdevs = self.tree.tops.clone();
        let dn = self.mos.obj(&vdevs, id)?.dnode;
        if dn.otype != ObjType::Volume {
            return Err(PoolError::Invalid(format!("object {id} is not a volume")));
        }
        Ok(dn)
    }

    fn snap_dnode(&mut self, id: u64) -> Result<Dnode> {
        let vdevs = self.tree.tops.clone();
        let dn = self.mos.obj(&vdevs, id)?.dnode;
        if dn.otype != ObjType::Snapshot {
            return Err(PoolError::Invalid(format!("object {id} is not a snapshot")));
        }
        Ok(dn)
    }

    /// Snapshot the volumes `heads` in one txg: commits the open txg first, then every snapshot
    /// holds the volume as of that commit. Returns the snapshot objects and their txg.
    pub(crate) fn snapshot(&mut self, heads: &[u64]) -> Result<(Vec<u64>, Txg)> {
        for &h in heads {
            self.head_dnode(h)?;
        }
        let mut seen = heads.to_vec();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != heads.len() {
            return Err(PoolError::Invalid(
                "a volume can have only one snapshot per command".into(),
            ));
        }
        self.snaps_mut()?;
        // Every snapshot gets a txg of its own: commit (even with nothing dirty).
        self.commit(false)?;
        let txg = self.committed;
        let vdevs = self.tree.tops.clone();
        let mut out = Vec::new();
        for &h in heads {
            let hd = self.head_dnode(h)?;
            let mut sd = hd;
            sd.otype = ObjType::Snapshot;
            let s = self.mos.create_with_dnode(&vdevs, sd)?;
            let o = self.mos.obj(&vdevs, h)?;
            o.dnode.set_prev_snap_txg(txg);
            o.mark_dnode_dirty();
            let t = self.snaps_mut()?;
            let hl = t.ds.entry(h).or_default();
            let link = DsLinks {
                snapshot: true,
                txg: txg.0,
                prev: hl.prev,
                next: h,
                clones: Vec::new(),
                deadlist: std::mem::take(&mut hl.deadlist),
            };
            let prev = hl.prev;
            hl.prev = s;
            if t.same_lineage(prev, h) {
                t.ds.get_mut(&prev).expect("checked").next = s;
            }
            t.ds.insert(s, link);
            out.push(s);
        }
        Ok((out, txg))
    }

    /// A new volume sharing every block of snapshot `snap`; returns its object.
    pub(crate) fn clone_snapshot(&mut self, snap: u64, copies: u8) -> Result<u64> {
        let sd = self.snap_dnode(snap)?;
        let txg =
            self.snaps()?.ds.get(&snap).map(|l| l.txg).ok_or_else(|| {
                PoolError::corrupt("snapshot table", format!("no links of {snap}"))
            })?;
        let vdevs = self.tree.tops.clone();
        let mut cd = sd;
        cd.otype = ObjType::Volume;
        cd.copies = copies.clamp(1, 3);
        cd.set_prev_snap_txg(Txg(txg));
        let c = self.mos.create_with_dnode(&vdevs, cd)?;
        let t = self.snaps_mut()?;
        t.ds.insert(
            c,
            DsLinks {
                prev: snap,
                ..Default::default()
            },
        );
        t.ds.get_mut(&snap).expect("checked").clones.push(c);
        Ok(c)
    }

    /// Destroy snapshot `snap` (it must have no clones): the blocks only it referenced are queued
    /// for freeing, its deadlist moves to the next snapshot (or the head). Returns the bytes freed.
    pub(crate) fn destroy_snapshot(&mut self, snap: u64) -> Result<u64> {
        self.snap_dnode(snap)?;
        let vdevs = self.tree.tops.clone();
        let t = self.snaps()?;
        let s =
            t.ds.get(&snap).cloned().ok_or_else(|| {
                PoolError::corrupt("snapshot table", format!("no links of {snap}"))
            })?;
        if !s.clones.is_empty() {
            return Err(PoolError::InUse(format!(
                "snapshot has {} dependent clone(s)",
                s.clones.len()
            )));
        }
        let p_txg = t.ds.get(&s.prev).map(|p| p.txg).unwrap_or(0);
        let same = t.same_lineage(s.prev, snap);
        let mut next =
            t.ds.get(&s.next).cloned().ok_or_else(|| {
                PoolError::corrupt("snapshot table", format!("no next of {snap}"))
            })?;
        // The blocks only this snapshot referenced: the next one's buckets born after the previous.
        let keys: Vec<u64> = next.deadlist.range(p_txg..s.txg).map(|(&k, _)| k).collect();
        let mut objects = Vec::new();
        for k in keys {
            objects.extend(next.deadlist.remove(&k).unwrap_or_default());
        }
        let mut bytes = 0;
        for &id in &objects {
            bytes += deadlist::object_size(&mut self.mos, &vdevs, id)?.1;
        }
        deadlist::merge(&mut next.deadlist, s.deadlist.clone());
        next.prev = s.prev;
        // The next one now shares only what the previous snapshot holds.
        let o = self.mos.obj(&vdevs, s.next)?;
        o.dnode.set_prev_snap_txg(Txg(p_txg));
        o.mark_dnode_dirty();
        self.mos.detach_object(&vdevs, snap)?;
        let t = self.snaps_mut()?;
        t.ds.insert(s.next, next);
        if same {
            if let Some(p) = t.ds.get_mut(&s.prev) {
                p.next = s.next;
            }
        }
        t.ds.remove(&snap);
        if !objects.is_empty() {
            t.freeing.push(FreeTask::Entries {
                objects,
                next: 0,
                bytes_left: bytes,
            });
        }
        Ok(bytes)
    }

    /// Destroy a volume (head) that has no snapshots of its own: its tree is detached and the
    /// blocks it alone references are freed in the background.
    pub(crate) fn destroy_volume(&mut self, head: u64) -> Result<()> {
        let hd = self.head_dnode(head)?;
        let t = self.snaps()?;
        let links = t.ds.get(&head).cloned().unwrap_or_default();
        if t.same_lineage(links.prev, head) {
            return Err(PoolError::InUse("the volume has snapshots".into()));
        }
        let origin = (links.prev != 0).then_some(links.prev);
        // What only this volume references: for a clone, what it wrote since its origin.
        let unique = match origin {
            None => hd.used,
            Some(o) => {
                let vdevs = self.tree.tops.clone();
                let od = self.mos.obj(&vdevs, o)?.dnode;
                let mut dead = 0;
                for objs in links.deadlist.values() {
                    for &id in objs {
                        dead += deadlist::object_size(&mut self.mos, &vdevs, id)?.1;
                    }
                }
                hd.used.saturating_sub(od.used.saturating_sub(dead))
            }
        };
        // Its changes in the open txg are committed before its tree is let go.
        if self.mos.obj(&self.tree.tops.clone(), head)?.is_dirty() {
            self.commit(false)?;
        }
        let vdevs = self.tree.tops.clone();
        let dn = self.mos.detach_object(&vdevs, head)?;
        // Its deadlist holds only blocks of the origin: drop the lists, keep the blocks.
        for objs in links.deadlist.values() {
            for &id in objs {
                self.mos.destroy_object(&vdevs, id)?;
            }
        }
        let has_links = self.snaps()?.ds.contains_key(&head);
        let needs_table = has_links || !dn.root.is_hole();
        if needs_table {
            let t = self.snaps_mut()?;
            t.ds.remove(&head);
            if let Some(o) = origin.and_then(|o| t.ds.get_mut(&o)) {
                o.clones.retain(|&c| c != head);
            }
            if !dn.root.is_hole() {
                let mut b = vec![0u8; DNODE_SIZE];
                dn.encode_into(&mut b);
                t.freeing.push(FreeTask::Tree {
                    dnode: b,
                    min_birth: dn.prev_snap_txg().0,
                    next: 0,
                    held: Vec::new(),
                    bytes_left: unique,
                });
            }
        }
        Ok(())
    }

    /// Roll a volume back to its newest snapshot: what it wrote since is queued for freeing and
    /// its tree becomes the snapshot's. Returns the snapshot's logical size.
    pub(crate) fn rollback(&mut self, head: u64) -> Result<u64> {
        self.head_dnode(head)?;
        let t = self.snaps()?;
        let links = t.ds.get(&head).cloned().unwrap_or_default();
        if !t.same_lineage(links.prev, head) {
            return Err(PoolError::Invalid("the volume has no snapshot".into()));
        }
        let snap = links.prev;
        let stxg = t.ds[&snap].txg;
        let sd = self.snap_dnode(snap)?;
        // The volume's changes must be committed before its tree is let go.
        if self.mos.obj(&self.tree.tops.clone(), head)?.is_dirty() {
            self.commit(false)?;
        }
        let vdevs = self.tree.tops.clone();
        let o = self.mos.obj(&vdevs, head)?;
        let old = o.dnode;
        let mut nd = sd;
        nd.otype = ObjType::Volume;
        nd.copies = old.copies;
        nd.set_prev_snap_txg(Txg(stxg));
        // What the volume wrote since the snapshot: referenced minus what it still shares.
        let mut dead = 0;
        for objs in links.deadlist.values() {
            for &id in objs {
                dead += deadlist::object_size(&mut self.mos, &vdevs, id)?.1;
            }
        }
        let written = old.used.saturating_sub(sd.used.saturating_sub(dead));
        let o = self.mos.obj(&vdevs, head)?;
        o.reset_to(nd);
        // The deadlist's blocks are the snapshot's, referenced by the volume again.
        for objs in links.deadlist.values() {
            for &id in objs {
                self.mos.destroy_object(&vdevs, id)?;
            }
        }
        let t = self.snaps_mut()?;
        if let Some(l) = t.ds.get_mut(&head) {
            l.deadlist.clear();
        }
        if !old.root.is_hole() {
            let mut b = vec![0u8; DNODE_SIZE];
            old.encode_into(&mut b);
            t.freeing.push(FreeTask::Tree {
                dnode: b,
                min_birth: stxg,
                next: 0,
                held: Vec::new(),
                bytes_left: written,
            });
        }
        Ok(sd.size)
    }

    /// Promote clone `head`: it takes over its origin's lineage up to and including the origin
    /// snapshot, and the old origin volume becomes a clone of that snapshot (as zfs promote). Only
    /// links change: every block stays where it is, owned by the same trees. Returns the snapshots
    /// that changed hands, oldest first, and the old origin's head.
    pub(crate) fn promote(&mut self, head: u64) -> Result<(Vec<u64>, u64)> {
        self.head_dnode(head)?;
        let t = self.snaps()?;
        let Some(origin) = t.origin_of(head) else {
            return Err(PoolError::Invalid("not a cloned volume".into()));
        };
        // The first member of the clone's own lineage (its oldest snapshot, or itself).
        let mut first = head;
        for _ in 0..=t.ds.len() {
            let l = &t.ds[&first];
            if l.prev == origin {
                break;
            }
            first = l.prev;
        }
        // The old origin's head: follow `next` from the origin snapshot.
        let mut old = t.ds[&origin].next;
        for _ in 0..=t.ds.len() {
            match t.ds.get(&old) {
                Some(l) if l.snapshot => old = l.next,
                _ => break,
            }
        }
        if t.ds.get(&old).is_none_or(|l| l.snapshot) {
            return Err(PoolError::corrupt(
                "snapshot table",
                format!("no head after snapshot {origin}"),
            ));
        }
        // What changes hands: the origin and every older snapshot of its lineage.
        let mut moved = vec![origin];
        let mut cur = origin;
        for _ in 0..=t.ds.len() {
            let p = t.ds[&cur].prev;
            if !t.same_lineage(p, cur) {
                break;
            }
            moved.push(p);
            cur = p;
        }
        moved.reverse();
        let grand = t.origin_of(old);
        let t = self.snaps_mut()?;
        let o = t.ds.get_mut(&origin).expect("checked");
        o.next = first;
        o.clones.retain(|&c| c != head);
        o.clones.push(old);
        if let Some(z) = grand.and_then(|z| t.ds.get_mut(&z)) {
            for c in z.clones.iter_mut() {
                if *c == old {
                    *c = head;
                }
            }
        }
        // The clone's lineage gained boundaries below the origin's txg: the buckets its members
        // filled with the origin's blocks (keys below it) are split along them, so destroying one
        // of the moved snapshots later finds exactly the blocks only it held.
        let otxg = t.ds[&origin].txg;
        let bounds = t.boundaries(head);
        let mut members = vec![head];
        let mut cur = head;
        while cur != first {
            cur = t.ds[&cur].prev;
            members.push(cur);
        }
        let vdevs = self.tree.tops.clone();
        for m in members {
            let mut dl =
                std::mem::take(&mut self.snaps_mut()?.ds.get_mut(&m).expect("member").deadlist);
            let r = deadlist::rebucket(&mut self.mos, &vdevs, &mut dl, &bounds, otxg);
            self.snaps_mut()?.ds.get_mut(&m).expect("member").deadlist = dl;
            r?;
        }
        Ok((moved, old))
    }

    /// Space figures of every volume and snapshot in the table, and of `extra` objects.
    pub(crate) fn ds_space(&mut self, extra: &[u64]) -> Result<BTreeMap<u64, DsSpace>> {
        let vdevs = self.tree.tops.clone();
        let mut ids: Vec<u64> = self.snaps()?.ds.keys().copied().collect();
        ids.extend_from_slice(extra);
        let mut out = BTreeMap::new();
        for id in ids {
            if out.contains_key(&id) {
                continue;
            }
            let referenced = self.mos.obj(&vdevs, id)?.dnode.used;
            let mut dead = BTreeMap::new();
            if let Some(l) = self.snaps()?.ds.get(&id).cloned() {
                for (k, objs) in &l.deadlist {
                    let mut b = 0;
                    for &o in objs {
                        b += deadlist::object_size(&mut self.mos, &vdevs, o)?.1;
                    }
                    dead.insert(*k, b);
                }
            }
            out.insert(id, DsSpace { referenced, dead });
        }
        Ok(out)
    }

    /// Bytes of `id`'s tree born after its previous snapshot (a clone's: its origin), every copy
    /// counted: what it alone references, and so how much of a reservation it has consumed (zfs's
    /// `usedbydataset`). Without a previous snapshot, everything it references.
    pub(crate) fn unique_bytes(&mut self, id: u64) -> Result<u64> {
        let vdevs = self.tree.tops.clone();
        let used = self.mos.obj(&vdevs, id)?.dnode.used;
        let Some(l) = self.snaps()?.ds.get(&id).cloned() else {
            return Ok(used);
        };
        if l.prev == 0 {
            return Ok(used);
        }
        let prev = self.mos.obj(&vdevs, l.prev)?.dnode.used;
        let mut dead = 0;
        for objs in l.deadlist.values() {
            for &o in objs {
                dead += deadlist::object_size(&mut self.mos, &vdevs, o)?.1;
            }
        }
        Ok(used.saturating_sub(prev.saturating_sub(dead)))
    }

    /// True while the background queue has work (so the sync thread keeps committing).
    pub(crate) fn freeing_pending(&self) -> bool {
        self.snaps.as_ref().is_some_and(|t| !t.freeing.is_empty())
    }
}

/// The commit's step between writing the volumes and writing everything else: the blocks the
/// volumes handed over go on their deadlists, the background queue frees its share, and the table
/// is written if it changed.
/// The table must have been loaded (`Inner::snaps`) if the pool has one.
pub(crate) fn sync_snapshots(
    mos: &mut ObjSet,
    snaps: &mut Option<SnapTable>,
    snaps_dirty: &mut bool,
    dir: &BTreeMap<String, u64>,
    ctx: &mut TxgCtx,
    budget: usize,
) -> Result<()> {
    let dead = mos.take_dead();
    let Some(t) = snaps.as_mut() else {
        if !dead.is_empty() {
            // Only a damaged dnode says it shares blocks when no snapshot exists: keep them.
            tracing::error!("blocks handed to a deadlist, but the pool has no snapshots");
        }
        return Ok(());
    };
    if dead.is_empty() && !*snaps_dirty && t.freeing.is_empty() {
        return Ok(());
    }
    let vdevs: Vec<Arc<TopVdev>> = ctx.vdevs.to_vec();
    for (obj, bps) in dead {
        let bounds = t.boundaries(obj);
        let mut groups: BTreeMap<u64, Vec<BlockPtr>> = BTreeMap::new();
        for bp in bps {
            groups
                .entry(deadlist::bucket_for(&bounds, bp.birth.0))
                .or_default()
                .push(bp);
        }
        if !t.ds.contains_key(&obj) {
            *snaps_dirty = true;
        }
        let dl = &mut t.ds.entry(obj).or_default().deadlist;
        for (k, v) in groups {
            // The table changes only when a bucket gets a new object; the entries and their sizes
            // live in the deadlist objects.
            if deadlist::append(mos, &vdevs, dl, k, &v)? {
                *snaps_dirty = true;
            }
        }
    }
    if !t.freeing.is_empty() {
        free_step(mos, &vdevs, t, ctx, budget.max(1))?;
        *snaps_dirty = true;
    }
    if *snaps_dirty {
        let Some(&id) = dir.get(BLOB) else {
            return Err(PoolError::corrupt(
                "snapshot table",
                "changed but has no directory entry",
            ));
        };
        let b = blob_opts()
            .serialize(&*t)
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        write_blob_in(mos, &vdevs, id, &b)?;
        *snaps_dirty = false;
    }
    Ok(())
}

/// Free up to `budget` blocks from the background queue.
fn free_step(
    mos: &mut ObjSet,
    vdevs: &[Arc<TopVdev>],
    t: &mut SnapTable,
    ctx: &mut TxgCtx,
    mut budget: usize,
) -> Result<()> {
    while budget > 0 && !t.freeing.is_empty() {
        let done = match &mut t.freeing[0] {
            FreeTask::Entries {
                objects,
                next,
                bytes_left,
            } => {
                let Some(&id) = objects.first() else {
                    t.freeing.remove(0);
                    continue;
                };
                match deadlist::read_entries(mos, vdevs, id, *next, budget as u64) {
                    Ok(bps) if !bps.is_empty() => {
                        for bp in &bps {
                            object::free_bp(ctx, bp);
                            *bytes_left = bytes_left.saturating_sub(bp.asize());
                        }
                        *next += bps.len() as u64;
                        budget -= bps.len();
                    }
                    r => {
                        if let Err(e) = r {
                            // Its blocks stay allocated (a leak is the safe answer to damage).
                            tracing::error!("freeing deadlist object {id}: {e}");
                        }
                        if let Err(e) = mos.destroy_object(vdevs, id) {
                            tracing::error!("destroying deadlist object {id}: {e}");
                        }
                        objects.remove(0);
                        *next = 0;
                    }
                }
                objects.is_empty()
            }
            FreeTask::Tree {
                dnode,
                min_birth,
                next,
                held,
                bytes_left,
            } => match tree_step(vdevs, dnode, *min_birth, next, held, budget) {
                Ok((bps, finished)) => {
                    for bp in &bps {
                        object::free_bp(ctx, bp);
                        *bytes_left = bytes_left.saturating_sub(bp.asize());
                    }
                    budget = budget.saturating_sub(bps.len().max(1));
                    finished
                }
                Err(e) => {
                    tracing::error!("freeing a destroyed tree: {e}; its blocks stay allocated");
                    true
                }
            },
        };
        if done {
            t.freeing.remove(0);
        }
    }
    Ok(())
}

/// One step of freeing a detached tree: the blocks to free now, and whether the tree is done.
fn tree_step(
    vdevs: &[Arc<TopVdev>],
    dnode: &[u8],
    min_birth: u64,
    next: &mut u64,
    held: &mut Vec<(Vec<u8>, u64)>,
    budget: usize,
) -> Result<(Vec<BlockPtr>, bool)> {
    let dn = Dnode::decode(dnode)?;
    let mut o = Obj::new(u64::MAX, dn);
    let mut waiting: Vec<(BlockPtr, u64)> = held
        .iter()
        .map(|(b, s)| BlockPtr::decode(b).map(|bp| (bp, *s)))
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    let r = o.walk(vdevs, *next, Txg(min_birth), &mut |bp, start| {
        if out.len() >= budget {
            return false;
        }
        if bp.level == 0 {
            out.push(*bp);
        } else {
            waiting.push((*bp, start));
        }
        true
    })?;
    let finished = r.is_none();
    if let Some(resume) = r {
        *next = resume;
    }
    // An indirect block goes once everything under it is done (later steps read it again).
    let mut keep = Vec::new();
    for (bp, start) in waiting {
        let span = 1u64
            .checked_shl(BPS_SHIFT * bp.level as u32)
            .unwrap_or(u64::MAX);
        if finished || start.saturating_add(span) <= *next {
            out.push(bp);
        } else {
            keep.push((bp.encode().to_vec(), start));
        }
    }
    *held = keep;
    Ok((out, finished))
}

/// The snapshot operations, run under the pool lock with whatever else the caller changes in the
/// same txg (the dataset registry): see [`Pool::atomically`].
pub struct Tx<'a> {
    pub(crate) inner: &'a mut Inner,
}

impl Tx<'_> {
    pub fn read_named_blob(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        self.view().read_named_blob(name)
    }
    pub fn write_named_blob(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.inner.write_named_blob(name, data)
    }
    /// (type, logical size, allocated bytes, block size) of an object.
    pub fn object_info(&mut self, id: u64) -> Result<(ObjType, u64, u64, usize)> {
        self.view().object_info(id)
    }
    /// See [`Pool::space`].
    pub fn space(&self) -> (u64, u64, u64) {
        self.inner.space()
    }
    pub fn snapshot(&mut self, heads: &[u64]) -> Result<(Vec<u64>, Txg)> {
        self.inner.snapshot(heads)
    }
    pub fn clone_snapshot(&mut self, snap: u64, copies: u8) -> Result<u64> {
        self.inner.clone_snapshot(snap, copies)
    }
    pub fn destroy_snapshot(&mut self, snap: u64) -> Result<u64> {
        self.inner.destroy_snapshot(snap)
    }
    pub fn destroy_volume(&mut self, head: u64) -> Result<()> {
        self.inner.destroy_volume(head)
    }
    pub fn rollback(&mut self, head: u64) -> Result<u64> {
        self.inner.rollback(head)
    }
    pub fn promote(&mut self, head: u64) -> Result<(Vec<u64>, u64)> {
        self.inner.promote(head)
    }
    pub fn links(&mut self) -> Result<SnapTable> {
        self.view().links()
    }
    pub fn ds_space(&mut self, extra: &[u64]) -> Result<BTreeMap<u64, DsSpace>> {
        self.view().ds_space(extra)
    }
    /// See [`Pool::unique_bytes`].
    pub fn unique_bytes(&mut self, id: u64) -> Result<u64> {
        self.view().unique_bytes(id)
    }
    /// Create an object (committed with the txg).
    pub fn create_object(&mut self, otype: ObjType, data_shift: u8, copies: u8) -> Result<u64> {
        let vdevs = self.inner.tree.tops.clone();
        self.inner
            .mos
            .create_object(&vdevs, otype, data_shift, copies)
    }
    /// Set an object's logical size (freeing what lies past it).
    pub fn set_object_size(&mut self, id: u64, size: u64) -> Result<()> {
        self.inner.set_object_size(id, size)
    }
    /// Set the number of copies new blocks of an object get (1..=3).
    pub fn set_object_copies(&mut self, id: u64, copies: u8) -> Result<()> {
        if !(1..=3).contains(&copies) {
            return Err(PoolError::Invalid(format!(
                "copies must be 1, 2 or 3, not {copies}"
            )));
        }
        let vdevs = self.inner.tree.tops.clone();
        let o = self.inner.mos.obj(&vdevs, id)?;
        o.dnode.copies = copies;
        o.mark_dnode_dirty();
        Ok(())
    }
    /// Set how new whole data blocks of an object are compressed (old blocks stay as they are).
    pub fn set_object_compression(
        &mut self,
        id: u64,
        c: crate::compress::Compression,
    ) -> Result<()> {
        let vdevs = self.inner.tree.tops.clone();
        let o = self.inner.mos.obj(&vdevs, id)?;
        o.dnode.compression = c.to_byte();
        o.mark_dnode_dirty();
        Ok(())
    }
    /// Commit the open txg now.
    pub fn commit(&mut self) -> Result<()> {
        self.inner.sync_txg()
    }
}

impl Pool {
    /// Run `f` under the pool lock: nothing commits in between, so everything it changes (snapshot
    /// links, dnodes, named blobs) lands in one txg.
    pub fn atomically<T, E: From<PoolError>>(
        &self,
        f: impl FnOnce(&mut Tx) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let mut g = self.lock();
        g.check_writable()?;
        let mut tx = Tx { inner: &mut g };
        f(&mut tx)
    }

    /// The links of every snapshot and clone.
    pub fn snapshot_links(&self) -> Result<SnapTable> {
        Ok(self.lock().snaps()?.clone())
    }

    /// Bytes of `id`'s tree born after its previous snapshot or origin (every copy): the part of a
    /// reservation it has consumed.
    pub fn unique_bytes(&self, id: u64) -> Result<u64> {
        self.lock().unique_bytes(id)
    }

    /// Space figures of every volume and snapshot with links, and of `extra` objects.
    pub fn ds_space(&self, extra: &[u64]) -> Result<BTreeMap<u64, DsSpace>> {
        self.lock().ds_space(extra)
    }

    /// The number of level-0 blocks holding data of each object (its root pointer's fill).
    pub fn objects_filled(&self, ids: &[u64]) -> Result<BTreeMap<u64, u64>> {
        self.consistently(|v| v.objects_filled(ids))
    }

    /// Free at most `blocks` blocks per commit from the background queue (tests use small budgets
    /// to spread a destroy over many txgs).
    #[doc(hidden)]
    pub fn set_free_budget(&self, blocks: usize) {
        self.lock().free_budget = blocks.max(1);
    }

    /// Bytes the background free queue has still to free (the `freeing` property).
    pub fn freeing(&self) -> Result<u64> {
        Ok(self.lock().snaps()?.freeing())
    }
}

/// What [`Pool::audit_space`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpaceAudit {
    /// Bytes (every copy) of the distinct blocks any tree references or the free queue still
    /// holds, plus the objset block.
    pub referenced: u64,
    /// The same, counting each volume and snapshot only from its previous snapshot's txg on (as a
    /// scan visits them): equal to `referenced` when the birth-txg rule holds.
    pub visited: u64,
    /// Bytes the allocation maps hold.
    pub allocated: u64,
}

impl Pool {
    /// Commit, then walk every tree of the pool and compare with the allocation maps: nothing
    /// leaked (allocated but unreferenced) and nothing freed that is still referenced. A check for
    /// tests and for the curious; it reads every indirect block.
    pub fn audit_space(&self) -> Result<SpaceAudit> {
        let mut g = self.lock();
        g.sync_txg()?;
        let inner = &mut *g;
        let vdevs = inner.tree.tops.clone();
        let mut seen: std::collections::HashSet<(u32, u64)> = Default::default();
        let mut a = SpaceAudit::default();
        let count = |bp: &BlockPtr, seen: &mut std::collections::HashSet<(u32, u64)>| {
            let mut n = 0;
            for d in bp.dvas.iter().filter(|d| !d.is_empty()) {
                if seen.insert((d.vdev, d.offset)) {
                    n += d.asize();
                }
            }
            n
        };
        a.referenced += count(&inner.root_bp, &mut seen);
        a.visited += inner.root_bp.asize();
        let mut refd = 0;
        let mut vis = 0;
        inner.mos.meta_obj().walk(&vdevs, 0, Txg(0), &mut |bp, _| {
            refd += count(bp, &mut seen);
            vis += bp.asize();
            true
        })?;
        for id in 1..inner.mos.max_objects() {
            let o = match inner.mos.obj(&vdevs, id) {
                Ok(o) => o,
                Err(PoolError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            let shared = o.dnode.prev_snap_txg();
            o.walk(&vdevs, 0, Txg(0), &mut |bp, _| {
                refd += count(bp, &mut seen);
                if bp.birth > shared {
                    vis += bp.asize();
                }
                true
            })?;
        }
        inner.snaps()?;
        let tasks = inner
            .snaps
            .as_ref()
            .map(|t| t.freeing.clone())
            .unwrap_or_default();
        for task in tasks {
            match task {
                FreeTask::Entries { objects, next, .. } => {
                    for (i, id) in objects.iter().enumerate() {
                        let from = if i == 0 { next } else { 0 };
                        for bp in
                            deadlist::read_entries(&mut inner.mos, &vdevs, *id, from, u64::MAX)?
                        {
                            refd += count(&bp, &mut seen);
                            vis += bp.asize();
                        }
                    }
                }
                FreeTask::Tree {
                    dnode,
                    min_birth,
                    next,
                    held,
                    ..
                } => {
                    for (b, _) in &held {
                        let bp = BlockPtr::decode(b)?;
                        refd += count(&bp, &mut seen);
                        vis += bp.asize();
                    }
                    let mut o = Obj::new(u64::MAX, Dnode::decode(&dnode)?);
                    o.walk(&vdevs, next, Txg(min_birth), &mut |bp, _| {
                        refd += count(bp, &mut seen);
                        vis += bp.asize();
                        true
                    })?;
                }
            }
        }
        // The allocation map pages at the start of every top-level vdev count as allocated.
        let maps: u64 = inner
            .alloc
            .tops
            .iter()
            .map(|t| crate::alloc::TopAlloc::map_bytes(t.asize(), t.slots()))
            .sum();
        a.referenced += refd + maps;
        a.visited += vis + maps;
        a.allocated = inner.alloc.alloc_bytes();
        Ok(a)
    }
}
