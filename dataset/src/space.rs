//! Space figures of volumes and snapshots, as `zfs list -o space` shows them, computed from the
//! pool's snapshot links and deadlist sizes without walking any tree.
//!
//! For a volume H whose previous snapshot is P (a clone's: its origin) and whose deadlist is D(H):
//! - `usedbydataset` (= `written`) = referenced(H) - (referenced(P) - D(H)): what H wrote since P;
//! - `usedbysnapshots` = the deadlists of H and of its own snapshots, births after the origin (the
//!   blocks some snapshot of H holds and H no longer does; each is on exactly one such list);
//! - `usedbyrefreservation` = refreservation - usedbydataset (at least 0);
//! - `used` = the sum of the three (volumes have no children).
//!
//! For a snapshot S (previous P, next N): `used` = the buckets of D(N) born after P and at or
//! before S (exactly what destroying S alone frees), `written` = referenced(S) - (referenced(P) -
//! D(S)). Sizes count every copy, as the pool's `alloc` does.

use crate::registry::{load_view, Registry};
use crate::Result;
use cairn_pool::snapshot::{DsSpace, SnapTable};
use cairn_pool::{Pool, View};
use serde::Serialize;
use std::collections::BTreeMap;

/// The space properties of a volume or snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Figures {
    pub used: u64,
    pub referenced: u64,
    pub usedbydataset: u64,
    pub usedbysnapshots: u64,
    pub usedbyrefreservation: u64,
    pub written: u64,
    /// Data bytes referenced, once, without copies or metadata.
    pub logicalreferenced: u64,
}

/// The pool's links and deadlist sizes, read once per command through the view that read the
/// registry (one state: every object the registry names is there).
pub(crate) struct SpaceCtx {
    pub(crate) links: SnapTable,
    space: BTreeMap<u64, DsSpace>,
    /// Level-0 blocks holding data, per object (for `logicalreferenced`).
    filled: BTreeMap<u64, u64>,
}

impl SpaceCtx {
    pub(crate) fn load(pool: &mut View, reg: &Registry) -> Result<SpaceCtx> {
        let mut extra: Vec<u64> = reg.values().map(|r| r.object).collect();
        for r in reg.values() {
            extra.extend(r.snapshots.values().map(|s| s.object));
        }
        let links = pool.links()?;
        let space = pool.ds_space(&extra)?;
        let filled = pool.objects_filled(&extra)?;
        Ok(SpaceCtx {
            links,
            space,
            filled,
        })
    }

    fn referenced(&self, id: u64) -> u64 {
        self.space.get(&id).map_or(0, |s| s.referenced)
    }

    fn dead(&self, id: u64, range: impl std::ops::RangeBounds<u64>) -> u64 {
        self.space
            .get(&id)
            .map_or(0, |s| s.dead.range(range).map(|(_, b)| b).sum())
    }

    /// Deadlist bytes of `id` born after `from`.
    pub(crate) fn dead_from(&self, id: u64, from: u64) -> u64 {
        self.dead(id, from..)
    }

    fn txg(&self, id: u64) -> u64 {
        self.links.ds.get(&id).map_or(0, |l| l.txg)
    }

    /// Bytes `id` references that its previous snapshot did not (born after it).
    fn written(&self, id: u64) -> u64 {
        let refd = self.referenced(id);
        match self.links.ds.get(&id).map(|l| l.prev) {
            Some(p) if p != 0 => {
                refd.saturating_sub(self.referenced(p).saturating_sub(self.dead(id, ..)))
            }
            _ => refd,
        }
    }

    pub(crate) fn volume(&self, head: u64, refreservation: u64, blocksize: u64) -> Figures {
        let origin_txg = self.links.origin_of(head).map_or(0, |o| self.txg(o));
        let mut snaps = self.dead(head, origin_txg..);
        for s in self.links.snapshots_of(head) {
            snaps += self.dead(s, origin_txg..);
        }
        let mine = self.written(head);
        let byref = refreservation.saturating_sub(mine);
        Figures {
            used: mine + snaps + byref,
            referenced: self.referenced(head),
            usedbydataset: mine,
            usedbysnapshots: snaps,
            usedbyrefreservation: byref,
            written: mine,
            logicalreferenced: self.filled.get(&head).copied().unwrap_or(0) * blocksize,
        }
    }

    pub(crate) fn snapshot(&self, snap: u64, blocksize: u64) -> Figures {
        let (prev, next) = self
            .links
            .ds
            .get(&snap)
            .map_or((0, 0), |l| (l.prev, l.next));
        let unique = self.dead(next, self.txg(prev)..self.txg(snap));
        Figures {
            used: unique,
            referenced: self.referenced(snap),
            usedbydataset: unique,
            written: self.written(snap),
            logicalreferenced: self.filled.get(&snap).copied().unwrap_or(0) * blocksize,
            ..Default::default()
        }
    }

    /// `written@SNAP` of a volume: what it references that snapshot `snap` of its lineage did not.
    pub(crate) fn written_since(&self, head: u64, snap: u64) -> u64 {
        let x = self.txg(snap);
        // The blocks of `snap` that later members of the lineage dropped.
        let mut gone = 0;
        let mut cur = head;
        for _ in 0..=self.links.ds.len() {
            if cur == snap {
                break;
            }
            gone += self.dead(cur, ..x);
            match self.links.ds.get(&cur) {
                Some(l) if self.links.same_lineage(l.prev, cur) => cur = l.prev,
                _ => break,
            }
        }
        self.referenced(head)
            .saturating_sub(self.referenced(snap).saturating_sub(gone))
    }

    /// `POOL/VOL@SNAP` of a clone's origin.
    pub(crate) fn origin_name(&self, pn: &str, reg: &Registry, head: u64) -> Option<String> {
        let o = self.links.origin_of(head)?;
        snapshot_name(pn, reg, o)
    }

    /// The clones of a snapshot, by name.
    pub(crate) fn clone_names(&self, pn: &str, reg: &Registry, snap: u64) -> Vec<String> {
        let Some(l) = self.links.ds.get(&snap) else {
            return Vec::new();
        };
        let mut out: Vec<String> = l
            .clones
            .iter()
            .filter_map(|c| {
                reg.iter()
                    .find(|(_, r)| r.object == *c)
                    .map(|(n, _)| format!("{pn}/{n}"))
            })
            .collect();
        out.sort();
        out
    }
}

/// The registry and the space context of its datasets, of one state of the pool.
pub(crate) fn read_state(pool: &Pool) -> Result<(Registry, SpaceCtx)> {
    pool.consistently(|v| {
        let reg = load_view(v)?;
        let sp = SpaceCtx::load(v, &reg)?;
        Ok((reg, sp))
    })
}

/// The full name of the snapshot whose object is `obj` (in pool `pn`).
pub(crate) fn snapshot_name(pn: &str, reg: &Registry, obj: u64) -> Option<String> {
    reg.iter().find_map(|(v, r)| {
        r.snapshots
            .iter()
            .find(|(_, s)| s.object == obj)
            .map(|(s, _)| format!("{pn}/{v}@{s}"))
    })
}
