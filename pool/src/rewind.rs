//! Which uberblock an open uses, and rewinding to an older one (zpool's `import -F [-n]` and `-T`).
//!
//! Candidates are the intact uberblocks of the pool on the devices (a slot whose checksum fails is no
//! candidate), newest first, one per (txg, timestamp). A plain open uses the newest. When it cannot be
//! opened because its metadata is damaged (the objset, the directory, the health record, or an
//! allocation map page with no valid copy for that txg), the open refuses, and if an older txg opens
//! cleanly the error says so and names `-F`. `-F` (`Rewind::Back`) opens the newest txg that opens
//! cleanly, `-T TXG` (`Rewind::Exact`) exactly that txg; both report how many txgs and seconds of writes
//! they discard ([`RewindReport`]).
//!
//! A session that opened an older txg than the newest intact one must not let the discarded txgs come
//! back: before its first commit writes anything (`Inner::sync_inner`), every uberblock newer than the
//! opened txg is zeroed in every label of every usable leaf (`discard_newer_uberblocks`), and the map
//! page copies stamped with those txgs are zeroed as after a crash (`Allocator::invalidate_newer`). Txg
//! numbers are then reused, as after a crash.
//!
//! Limits: in a version-2 pool map pages keep 10 versions and frees are deferred `HISTORY_TXGS` (9)
//! txgs, rebuilt from the page history after a reopen (`alloc.rs`), so each of the last 9 txgs opens
//! with its own state; in a version-1 pool (two slots, `DEFER_TXGS` = 2, in memory only) about one.
//! A txg further back may have lost blocks or pages to later txgs. The checks of a clean open find lost
//! metadata (checksums, map pages); data blocks reused later read as I/O errors, never as wrong data.
//! A txg written under a configuration with other leaves (before an attach, detach or add) is refused:
//! the labels keep only the newest configuration.

use crate::error::{PoolError, Result};
use cairn_vdev::label::{self, Uberblock, UB_SLOTS, UB_SLOT_SIZE};
use cairn_vdev::tree::VdevTree;
use cairn_vdev::{Guid, Txg, VdevError};

/// How an open chooses its uberblock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rewind {
    /// The newest intact uberblock (a plain import or open).
    #[default]
    Newest,
    /// The newest txg that opens cleanly (`import -F`).
    Back,
    /// Exactly this txg (`import -T`).
    Exact(Txg),
}

/// What a rewind discards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RewindReport {
    /// The txg opened.
    pub txg: Txg,
    /// The newest intact txg on the devices.
    pub newest: Txg,
    /// Txgs discarded (`newest - txg`).
    pub txgs: u64,
    /// Seconds of writes discarded (between the two uberblocks' timestamps).
    pub seconds: u64,
}

impl RewindReport {
    pub fn new(opened: &Uberblock, newest: &Uberblock) -> RewindReport {
        RewindReport {
            txg: opened.txg,
            newest: newest.txg,
            txgs: newest.txg.0.saturating_sub(opened.txg.0),
            seconds: newest.timestamp.saturating_sub(opened.timestamp),
        }
    }

    /// `txg 41 (discarding the last 3 txgs, 12 seconds of writes)`.
    pub fn describe(&self) -> String {
        format!(
            "txg {} (discarding the last {} txg{}, {} second{} of writes)",
            self.txg.0,
            self.txgs,
            if self.txgs == 1 { "" } else { "s" },
            self.seconds,
            if self.seconds == 1 { "" } else { "s" }
        )
    }
}

/// The intact uberblocks of pool `guid`, newest first, one per (txg, timestamp).
pub(crate) fn candidates<'a>(
    ubs: impl Iterator<Item = &'a Uberblock>,
    guid: Guid,
) -> Vec<Uberblock> {
    let mut v: Vec<Uberblock> = ubs.filter(|u| u.pool_guid == guid).cloned().collect();
    v.sort_by_key(|u| std::cmp::Reverse((u.txg, u.timestamp)));
    v.dedup_by(|a, b| (a.txg, a.timestamp) == (b.txg, b.timestamp));
    v
}

/// Is this error damage of what a txg references (so an older txg may open)?
pub(crate) fn is_damage(e: &PoolError) -> bool {
    match e {
        PoolError::Corrupt { .. } => true,
        PoolError::Vdev(v) => v.is_corruption() || matches!(v, VdevError::Io { .. }),
        _ => false,
    }
}

/// How [`open_with`] asks for one uberblock to be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// Only check that the txg opens cleanly, every map page included (nothing written).
    Probe,
    /// Open it, checking every map page first.
    Open,
    /// Open it even if a map page has no valid copy (its space is then not used): the newest txg
    /// when no older one opens either.
    Tolerant,
}

/// Opens by the rule of `how`. `open_at(ub, attempt)` opens at one uberblock. Returns the pool and,
/// when an older txg than the newest was opened, what that discarded.
pub(crate) fn open_with<P>(
    cands: &[Uberblock],
    how: Rewind,
    name: &str,
    mut open_at: impl FnMut(&Uberblock, Attempt) -> Result<P>,
) -> Result<(P, Option<RewindReport>)> {
    let Some(newest) = cands.first() else {
        return Err(PoolError::corrupt(
            "pool",
            "no valid uberblock on any device",
        ));
    };
    let report = |u: &Uberblock| (u.txg != newest.txg).then(|| RewindReport::new(u, newest));
    match how {
        Rewind::Newest => match open_at(newest, Attempt::Open) {
            Ok(p) => Ok((p, None)),
            Err(e) if is_damage(&e) => {
                for u in &cands[1..] {
                    if open_at(u, Attempt::Probe).is_ok() {
                        let r = RewindReport::new(u, newest);
                        return Err(PoolError::Corrupt {
                            what: format!("txg {}", newest.txg.0),
                            detail: format!(
                                "{e}; the pool can be rewound to {}: import it with \
                                 'cairn pool import -F {name}' (add -n to only see what it would \
                                 discard)",
                                r.describe()
                            ),
                        });
                    }
                }
                // Nothing older opens either: a damaged map page costs only its space.
                match open_at(newest, Attempt::Tolerant) {
                    Ok(p) => Ok((p, None)),
                    Err(_) => Err(e),
                }
            }
            Err(e) => Err(e),
        },
        Rewind::Back => {
            let mut first_err = None;
            for u in cands {
                match open_at(u, Attempt::Probe) {
                    Ok(probe) => {
                        drop(probe);
                        let p = open_at(u, Attempt::Open)?;
                        return Ok((p, report(u)));
                    }
                    Err(e) if is_damage(&e) => {
                        tracing::info!("txg {} does not open: {e}", u.txg.0);
                        first_err.get_or_insert(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            let e = first_err.expect("at least one candidate");
            Err(PoolError::Corrupt {
                what: "pool".into(),
                detail: format!(
                    "no txg in the uberblock ring opens ({} tried, txgs {}..{}): {e}",
                    cands.len(),
                    cands.last().map(|u| u.txg.0).unwrap_or(0),
                    newest.txg.0
                ),
            })
        }
        Rewind::Exact(t) => {
            let Some(u) = cands.iter().find(|u| u.txg == t) else {
                let have: Vec<String> = cands.iter().map(|u| u.txg.0.to_string()).collect();
                return Err(PoolError::NotFound(format!(
                    "no intact uberblock of txg {} (intact: {})",
                    t.0,
                    have.join(", ")
                )));
            };
            let p = open_at(u, Attempt::Open)?;
            Ok((p, report(u)))
        }
    }
}

/// Zeroes every uberblock of pool `pool` newer than `txg` in every label of every usable leaf, with a
/// flush after each label (as `mark_dirty` writes), so discarded txgs cannot come back at the next
/// import. Returns the number of slots zeroed. Fails only if no leaf took all its writes.
pub(crate) fn discard_newer_uberblocks(tree: &VdevTree, pool: Guid, txg: Txg) -> Result<u64> {
    let zero = vec![0u8; UB_SLOT_SIZE as usize];
    let mut zeroed = 0;
    let mut ok = 0;
    let mut leaves = 0;
    for (_, lv) in tree.leaves() {
        let Some(d) = lv.usable_dev() else { continue };
        leaves += 1;
        let mut leaf_ok = true;
        let offs = label::label_offsets(d.size());
        for off in offs {
            let ring = off + label::RING_OFFSET;
            let mut buf = vec![0u8; (UB_SLOTS * UB_SLOT_SIZE) as usize];
            if let Err(e) = d.read_at(&mut buf, ring) {
                tracing::warn!("{}: cannot read an uberblock ring: {e}", d.path());
                leaf_ok = false;
                continue;
            }
            let mut wrote = false;
            for (i, slot) in buf.chunks(UB_SLOT_SIZE as usize).enumerate() {
                let Some(u) = Uberblock::decode(slot) else {
                    continue;
                };
                if u.pool_guid != pool || u.txg <= txg {
                    continue;
                }
                let at = ring + i as u64 * UB_SLOT_SIZE;
                match d.write_at(&zero, at) {
                    Ok(()) => {
                        zeroed += 1;
                        wrote = true;
                    }
                    Err(e) => {
                        tracing::warn!("{}: cannot zero uberblock at {at}: {e}", d.path());
                        leaf_ok = false;
                    }
                }
            }
            if wrote {
                if let Err(e) = d.flush() {
                    tracing::warn!("{}: flush: {e}", d.path());
                    leaf_ok = false;
                }
            }
        }
        if leaf_ok {
            ok += 1;
        }
    }
    if ok == 0 && leaves > 0 {
        return Err(PoolError::Unavailable(
            "the uberblocks of the discarded txgs could not be removed from any leaf".into(),
        ));
    }
    Ok(zeroed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ub(txg: u64, ts: u64) -> Uberblock {
        Uberblock {
            txg: Txg(txg),
            timestamp: ts,
            pool_guid: Guid(7),
            guid_sum: 0,
            config_txg: Txg(1),
            root: [0; 128],
            flags: 0,
        }
    }

    #[test]
    fn candidates_are_newest_first_and_unique() {
        let all = [ub(3, 30), ub(5, 50), ub(5, 50), ub(4, 40)];
        let c = candidates(all.iter(), Guid(7));
        assert_eq!(c.iter().map(|u| u.txg.0).collect::<Vec<_>>(), vec![5, 4, 3]);
        assert!(candidates(all.iter(), Guid(8)).is_empty());
    }

    #[test]
    fn plain_open_names_f_when_an_older_txg_opens() {
        let c = [ub(5, 50), ub(4, 44), ub(3, 30)];
        let bad = || PoolError::corrupt("objset block", "checksum mismatch");
        let r = open_with(&c, Rewind::Newest, "tank", |u, a| {
            if u.txg.0 >= 5 && a != Attempt::Tolerant {
                Err(bad())
            } else {
                Ok(u.txg.0)
            }
        });
        let e = r.expect_err("refused").to_string();
        assert!(e.contains("-F tank") && e.contains("txg 4"), "{e}");
        assert!(e.contains("1 txg,") && e.contains("6 seconds"), "{e}");
        let (p, rep) = open_with(&c, Rewind::Back, "tank", |u, _| {
            if u.txg.0 >= 4 {
                Err(bad())
            } else {
                Ok(u.txg.0)
            }
        })
        .expect("rewinds");
        assert_eq!(p, 3);
        let rep = rep.expect("report");
        assert_eq!((rep.txgs, rep.seconds), (2, 20));
        let (p, rep) = open_with(&c, Rewind::Exact(Txg(4)), "tank", |u, _| Ok(u.txg.0)).unwrap();
        assert_eq!((p, rep.map(|r| r.txg)), (4, Some(Txg(4))));
        assert!(open_with(&c, Rewind::Exact(Txg(9)), "tank", |u, _| Ok(u.txg.0)).is_err());
        // Not damage (a device in use): no rewind offered.
        let r = open_with(&c, Rewind::Newest, "tank", |_, _| -> Result<u64> {
            Err(PoolError::InUse("busy".into()))
        });
        assert!(matches!(r, Err(PoolError::InUse(_))));
    }
}
