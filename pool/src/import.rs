//! Finding pools on devices: read the labels of candidate files and block devices and group them by
//! pool GUID, keeping the newest configuration of each pool.
//!
//! Scanning only reads (no locks, no writes); opening a found pool is [`crate::Pool::open`]'s job.

use crate::devmatch::Claim;
use crate::pool::{leaf_name, top_name, VdevStatus};
use cairn_vdev::config::{PoolConfig, PoolState, TopKind};
use cairn_vdev::file::{FileLeaf, OpenOptions};
use cairn_vdev::label;
use cairn_vdev::{Guid, Txg};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A device that carries a label of a pool.
#[derive(Clone, Debug)]
pub struct FoundLeaf {
    pub path: PathBuf,
    pub leaf_guid: Guid,
    pub valid_labels: usize,
    /// The newest txg whose uberblock it holds (the last it took part in).
    pub txg: Txg,
}

/// A device that carries the label of a leaf another device also carries, and lost to it
/// ([`crate::devmatch`]): it is not used.
#[derive(Clone, Debug)]
pub struct Duplicate {
    pub path: PathBuf,
    pub leaf_guid: Guid,
    /// The device used for the leaf.
    pub used: PathBuf,
    /// Why this one is not: `older copy`, `copy, not the recorded device`, ...
    pub why: &'static str,
}

impl Duplicate {
    /// `c: duplicate of leaf d (older copy), not used`.
    pub fn describe(&self, config: &PoolConfig) -> String {
        let leaf = config
            .find_leaf(self.leaf_guid)
            .map(|(t, c)| config.tops[t].children[c].identity.path.clone())
            .unwrap_or_else(|| self.used.display().to_string());
        format!(
            "{}: duplicate of leaf {} ({}), not used",
            leaf_name(&self.path.display().to_string()),
            leaf_name(&leaf),
            self.why
        )
    }
}

/// A pool seen on the scanned devices.
#[derive(Clone, Debug)]
pub struct ImportCandidate {
    /// The newest configuration found on any of its devices.
    pub config: PoolConfig,
    /// One device per leaf found (the paths import opens).
    pub leaves: Vec<FoundLeaf>,
    /// Further devices that carry the label of a leaf in `leaves` (copies): never opened.
    pub duplicates: Vec<Duplicate>,
    /// The newest uberblock txg seen (0 if none).
    pub best_txg: Txg,
}

impl ImportCandidate {
    pub fn name(&self) -> &str {
        &self.config.name
    }
    pub fn guid(&self) -> Guid {
        self.config.pool_guid
    }
    pub fn state(&self) -> PoolState {
        self.config.state
    }
    pub fn paths(&self) -> Vec<PathBuf> {
        self.leaves.iter().map(|l| l.path.clone()).collect()
    }

    /// Why a leaf of the config was not found: its path may hold another leaf's copy.
    fn missing_reason(&self, lc: &cairn_vdev::config::LeafConfig) -> String {
        let at = Path::new(&lc.identity.path);
        if let Some(d) = self.duplicates.iter().find(|d| d.path == at) {
            return format!("corrupted data: the device is {}", self.duplicate_of(d));
        }
        if let Some(f) = self.leaves.iter().find(|f| f.path == at) {
            if f.leaf_guid != lc.guid {
                return "corrupted data: the device holds another leaf's label".into();
            }
        }
        crate::pool::missing_leaf_reason(&lc.identity.path, self.guid(), lc.guid)
    }

    fn duplicate_of(&self, d: &Duplicate) -> String {
        let leaf = self
            .config
            .find_leaf(d.leaf_guid)
            .map(|(t, c)| self.config.tops[t].children[c].identity.path.clone())
            .unwrap_or_default();
        format!("a copy of leaf {}", leaf_name(&leaf))
    }

    fn found(&self, g: Guid) -> Option<&FoundLeaf> {
        self.leaves.iter().find(|l| l.leaf_guid == g)
    }

    /// The vdev tree as import would see it: found leaves ONLINE, the rest UNAVAIL.
    pub fn vdev_status(&self) -> VdevStatus {
        let mut tops = Vec::new();
        let mut pool_state = "ONLINE";
        for t in &self.config.tops {
            let children: Vec<VdevStatus> = t
                .children
                .iter()
                .map(|lc| {
                    let f = self.found(lc.guid);
                    let path = f
                        .map(|f| f.path.display().to_string())
                        .unwrap_or_else(|| lc.identity.path.clone());
                    VdevStatus {
                        name: leaf_name(&path),
                        vdev_type: "leaf".into(),
                        guid: lc.guid.0,
                        path: Some(path),
                        phys_path: Some(lc.identity.phys_path.clone()),
                        devid: Some(lc.identity.devid.clone()),
                        state: if f.is_some() { "ONLINE" } else { "UNAVAIL" }.into(),
                        reason: match f {
                            None => Some(self.missing_reason(lc)),
                            // Behind the pool: it missed txgs (the import resilvers it) or is an
                            // older copy (the import refuses a vdev of nothing but those).
                            Some(f) if f.txg.0 + 1 < self.best_txg.0 => Some(format!(
                                "(behind: last written in txg {}, the pool is at txg {})",
                                f.txg.0, self.best_txg.0
                            )),
                            Some(_) => None,
                        },
                        ..VdevStatus::default()
                    }
                })
                .collect();
            let ok = children.iter().filter(|c| c.state == "ONLINE").count();
            let state = match t.kind {
                TopKind::Mirror if ok == 0 => "UNAVAIL",
                TopKind::Mirror if ok < children.len() => "DEGRADED",
                _ if ok < children.len() => "UNAVAIL",
                _ => "ONLINE",
            };
            match state {
                "UNAVAIL" => pool_state = "UNAVAIL",
                "DEGRADED" if pool_state == "ONLINE" => pool_state = "DEGRADED",
                _ => {}
            }
            if t.kind == TopKind::Single {
                tops.extend(children);
            } else {
                let first = t
                    .children
                    .first()
                    .map(|c| c.identity.path.clone())
                    .unwrap_or_default();
                tops.push(VdevStatus::interior(
                    top_name(t.kind, t.id, &first),
                    match t.kind {
                        TopKind::Mirror => "mirror",
                        _ => "stripe",
                    },
                    t.guid.0,
                    state,
                    (state == "UNAVAIL").then(|| "insufficient replicas".into()),
                    children,
                ));
            }
        }
        VdevStatus::interior(
            self.config.name.clone(),
            "root",
            self.config.pool_guid.0,
            pool_state,
            None,
            tops,
        )
    }
}

/// Regular files and block devices directly in `dir`, sorted. Unreadable entries are skipped.
pub fn list_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let Ok(e) = e else { continue };
        let p = e.path();
        let Ok(md) = std::fs::metadata(&p) else {
            continue;
        };
        let ft = md.file_type();
        if ft.is_file() || ft.is_block_device() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Read the labels of every path and group them into pools.
pub fn scan(paths: &[PathBuf]) -> Vec<ImportCandidate> {
    let mut pools: BTreeMap<u64, (ImportCandidate, Vec<FoundLeaf>)> = BTreeMap::new();
    for p in paths {
        let Ok(dev) = FileLeaf::open(
            p,
            OpenOptions {
                read_only: true,
                lock: false,
            },
        ) else {
            continue;
        };
        let s = label::scan_leaf(&dev);
        let Some(best) = s.best_label() else { continue };
        let ub_txg = s.best_uberblock().map(|u| u.txg).unwrap_or(Txg(0));
        let found = FoundLeaf {
            path: p.clone(),
            leaf_guid: best.header.leaf_guid,
            valid_labels: s.valid_count(),
            txg: s.newest_txg(best.header.pool_guid),
        };
        let (e, all) = pools.entry(best.header.pool_guid.0).or_insert_with(|| {
            (
                ImportCandidate {
                    config: best.config.clone(),
                    leaves: Vec::new(),
                    duplicates: Vec::new(),
                    best_txg: Txg(0),
                },
                Vec::new(),
            )
        });
        if best.config.config_txg > e.config.config_txg {
            e.config = best.config.clone();
        }
        e.best_txg = e.best_txg.max(ub_txg);
        // The same path given twice is one device.
        if !all.iter().any(|f| f.path == found.path) {
            all.push(found);
        }
    }
    pools
        .into_values()
        .map(|(mut c, all)| {
            // Leaves that the newest configuration no longer lists (detached, or from an aborted add)
            // are not part of the pool. Two devices with one leaf GUID: one is used, by the rule that
            // `Pool::open` follows (`devmatch`), the other is listed as a duplicate.
            let mut best: Vec<(FoundLeaf, Claim)> = Vec::new();
            for f in all {
                let Some((ti, ci)) = c.config.find_leaf(f.leaf_guid) else {
                    continue;
                };
                let recorded = &c.config.tops[ti].children[ci].identity;
                let claim = Claim::of(&f.path, recorded, f.txg, f.valid_labels);
                match best.iter_mut().find(|(b, _)| b.leaf_guid == f.leaf_guid) {
                    Some((b, bc)) if claim > *bc => {
                        c.duplicates.push(Duplicate {
                            path: b.path.clone(),
                            leaf_guid: b.leaf_guid,
                            used: f.path.clone(),
                            why: bc.why_not(&claim),
                        });
                        *b = f;
                        *bc = claim;
                    }
                    Some((b, bc)) => c.duplicates.push(Duplicate {
                        path: f.path.clone(),
                        leaf_guid: f.leaf_guid,
                        used: b.path.clone(),
                        why: claim.why_not(bc),
                    }),
                    None => best.push((f, claim)),
                }
            }
            // A duplicate that lost early names the device it lost to then; name the final one.
            for d in &mut c.duplicates {
                if let Some((b, _)) = best.iter().find(|(b, _)| b.leaf_guid == d.leaf_guid) {
                    d.used = b.path.clone();
                }
            }
            c.leaves = best.into_iter().map(|(f, _)| f).collect();
            c
        })
        .filter(|c| !c.leaves.is_empty())
        .collect()
}
