//! Changing a top-level vdev's leaves: attach (a single leaf becomes a mirror, or a mirror widens),
//! detach, and replace (attach the new leaf, detach the old one once the resilver completes).
//!
//! A new child lacks every txg up to now; its dirty time log says so and a resilver fills it. A leaf
//! detached earlier from the same top-level vdev keeps a label saying when it left (state Destroyed,
//! config txg = the detach txg): attached again, it lacks only the txgs since, so only those are
//! copied (OpenZFS copies everything again).

use crate::error::{PoolError, Result};
use crate::pool::{absolute, open_leaf_for_pool, wipe_label_areas, Inner, Pool};
use cairn_vdev::config::{LeafConfig, LeafFlags, PoolState, TopKind};
use cairn_vdev::identity::identify;
use cairn_vdev::label;
use cairn_vdev::tree::{Event, LeafVdev, TopVdev};
use cairn_vdev::units::{lock, now_secs as now};
use cairn_vdev::{Guid, Leaf, Txg, VdevError};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Pool {
    fn top_of(&self, g: &Inner, name: &str) -> Result<(usize, Arc<TopVdev>, Arc<LeafVdev>)> {
        let abs = absolute(Path::new(name)).to_string_lossy().into_owned();
        let mut found = None;
        for (ti, t) in g.tree.tops.iter().enumerate() {
            for c in &t.children {
                let p = c.path();
                if p == name
                    || p == abs
                    || crate::pool::leaf_name(&p) == name
                    || c.guid.0.to_string() == name
                {
                    if found.is_some() {
                        return Err(PoolError::Invalid(format!(
                            "'{name}' matches more than one leaf; give the full path"
                        )));
                    }
                    found = Some((ti, t.clone(), c.clone()));
                }
            }
        }
        found.ok_or_else(|| PoolError::NotFound(format!("no such device in pool: '{name}'")))
    }

    /// Replace top-level vdev `ti` with one of `kind` over `children` (config and tree).
    fn rebuild_top(&self, g: &mut Inner, ti: usize, kind: TopKind, children: Vec<Arc<LeafVdev>>) {
        let old = g.tree.tops[ti].clone();
        let t = Arc::new(TopVdev {
            id: old.id,
            guid: old.guid,
            kind,
            asize: old.asize,
            children: children.clone(),
            slow_ms: std::sync::atomic::AtomicU64::new(
                old.slow_ms.load(std::sync::atomic::Ordering::Relaxed),
            ),
        });
        g.tree.tops[ti] = t;
        g.config.tops[ti].kind = kind;
        g.config.tops[ti].children = children.iter().map(|c| lock(&c.config).clone()).collect();
        g.config_dirty = true;
    }

    /// Attach `new` as a mirror child next to `existing` (the last child). Returns the txgs the new
    /// leaf lacks.
    pub fn attach(&self, existing: &str, new: &Path, force: bool) -> Result<(Txg, Txg)> {
        self.attach_after(existing, new, force, None)
    }

    /// [`Pool::attach`], placing the new child right after the leaf `after` (a replacement goes where
    /// the leaf it replaces is) instead of last.
    fn attach_after(
        &self,
        existing: &str,
        new: &Path,
        force: bool,
        after: Option<Guid>,
    ) -> Result<(Txg, Txg)> {
        let mut g = self.lock();
        g.check_writable()?;
        let (ti, t, _) = self.top_of(&g, existing)?;
        if matches!(t.kind, TopKind::Stripe { .. }) {
            return Err(PoolError::Invalid(
                "cannot attach to a leaf of a stripe: attach works on single leaves and mirrors"
                    .into(),
            ));
        }
        if t.children.len() >= 8 {
            return Err(PoolError::Invalid("a mirror holds at most 8 leaves".into()));
        }
        let abs = absolute(new);
        let shown = new.display().to_string();
        if !abs.exists() {
            return Err(PoolError::NotFound(format!(
                "cannot open '{shown}': no such file or directory"
            )));
        }
        let canon = std::fs::canonicalize(&abs).unwrap_or_else(|_| abs.clone());
        for (_, c) in g.tree.leaves() {
            let cp = std::fs::canonicalize(c.path()).unwrap_or_else(|_| c.path().into());
            if cp == canon {
                return Err(PoolError::InUse(format!(
                    "{shown} is already part of this pool"
                )));
            }
        }
        let dev = open_leaf_for_pool(&abs, &shown)?;
        if label::data_size(dev.size()) < t.asize {
            return Err(PoolError::Invalid(format!(
                "{shown} is too small: it needs {} bytes of data area, it has {}",
                t.asize,
                label::data_size(dev.size())
            )));
        }
        // What is on it: a leaf detached from this very vdev keeps what it had then.
        let scan = label::scan_leaf(&dev);
        let mut lacks_from = Txg(1);
        if let Some(l) = scan.best_label() {
            let ours = l.header.pool_guid == g.config.pool_guid
                && l.header.top_guid == t.guid
                && l.config.state == PoolState::Destroyed;
            if ours {
                lacks_from = l.header.config_txg.next();
            } else if l.config.state != PoolState::Destroyed && !force {
                return Err(PoolError::InUse(format!(
                    "{shown} is part of {} pool '{}' (use -f to override)",
                    if l.config.state == PoolState::Active {
                        "active"
                    } else {
                        "exported"
                    },
                    l.config.name
                )));
            }
        }
        if lacks_from == Txg(1) {
            wipe_label_areas(&dev)?;
        }
        let identity = identify(&abs).map_err(|e| {
            PoolError::Vdev(VdevError::Open {
                path: abs.display().to_string(),
                source: e,
            })
        })?;
        let txg = g.committed.next();
        let lc = LeafConfig {
            guid: Guid::random(),
            identity,
            size: dev.size(),
            create_txg: txg,
            flags: LeafFlags::default(),
        };
        let lv = Arc::new(LeafVdev::new(
            lc,
            Some(Arc::new(dev) as Arc<dyn Leaf>),
            None,
        ));
        // It lacks the open txg too: blocks written since the last commit went to the other children
        // only, and this attach commits them.
        let upto = txg;
        // A leaf detached from this vdev should still hold what it had then, but anyone may have
        // written to it since: it is no full copy until a resilver has read and verified that
        // part (rewriting only bad blocks) and copied the rest.
        lock(&lv.dtl).push((Txg(1), upto));
        if lacks_from > Txg(1) {
            lv.verify_below.store(lacks_from.0, Ordering::Relaxed);
        }
        let mut children = t.children.clone();
        match after.and_then(|a| children.iter().position(|c| c.guid == a)) {
            Some(i) => children.insert(i + 1, lv.clone()),
            None => children.push(lv.clone()),
        }
        self.rebuild_top(&mut g, ti, TopKind::Mirror, children);
        g.tree.events.push(Event {
            time: now(),
            class: "config".into(),
            vdev: lv.path(),
            offset: None,
            detail: if lacks_from > Txg(1) {
                format!(
                    "attached; verifies txgs 1..{}, lacks txgs {lacks_from}..{upto}",
                    lacks_from.0 - 1
                )
            } else {
                format!("attached; lacks txgs {lacks_from}..{upto}")
            },
        });
        g.commit(false)?;
        Ok((lacks_from, upto))
    }

    /// Detach a mirror child. Refused when no other child holds everything.
    ///
    /// Detaching a replacement (the leaf right after one being replaced) cancels the replacement,
    /// as zpool's: the leaf it was replacing stays.
    pub fn detach(&self, name: &str) -> Result<()> {
        let mut g = self.lock();
        g.check_writable()?;
        let cancels = {
            let (_, t, lv) = self.top_of(&g, name)?;
            let i = t.children.iter().position(|c| c.guid == lv.guid);
            i.and_then(|i| i.checked_sub(1))
                .and_then(|p| t.children.get(p))
                .filter(|prev| lock(&prev.config).flags.replacing)
                .cloned()
        };
        // Changed before the detach rebuilds the vdev's configuration from its children.
        let saved = cancels.as_ref().map(|prev| {
            let mut pc = lock(&prev.config);
            let saved = pc.clone();
            pc.flags.replacing = false;
            if let Some(path) = pc.identity.path.strip_suffix(" (old)") {
                pc.identity.path = path.to_string();
            }
            saved
        });
        if let Err(e) = self.detach_locked(&mut g, name) {
            if let (Some(prev), Some(saved)) = (cancels, saved) {
                *lock(&prev.config) = saved;
            }
            return Err(e);
        }
        g.commit(false)
    }

    fn detach_locked(&self, g: &mut Inner, name: &str) -> Result<()> {
        let (ti, t, lv) = self.top_of(g, name)?;
        if t.kind != TopKind::Mirror {
            return Err(PoolError::Invalid(format!(
                "only mirror children can be detached ({} is not in a mirror)",
                lv.path()
            )));
        }
        let complete = t
            .children
            .iter()
            .any(|c| c.guid != lv.guid && c.state().usable() && lock(&c.dtl).is_empty());
        if !complete {
            return Err(PoolError::Invalid(format!(
                "no valid replicas (no child but {} holds all the data)",
                lv.path()
            )));
        }
        let children: Vec<Arc<LeafVdev>> = t
            .children
            .iter()
            .filter(|c| c.guid != lv.guid)
            .cloned()
            .collect();
        let kind = if children.len() == 1 {
            TopKind::Single
        } else {
            TopKind::Mirror
        };
        // Leave a label saying up to which txg it holds everything, so attaching it again copies
        // only what changed: when it left, or, if it still lacked txgs then (a resilver onto it had
        // not finished), the txg before the first it lacked.
        if let Some(dev) = lv.dev() {
            let mut c = g.config.clone();
            c.state = PoolState::Destroyed;
            c.config_txg = match lock(&lv.dtl).iter().map(|r| r.0).min() {
                Some(first) => Txg(first.0.saturating_sub(1)).min(g.committed),
                None => g.committed,
            };
            if let Ok(enc) = label::encode_config(&c) {
                for i in 0..4 {
                    let _ = label::write_label(dev.as_ref(), i, &c, &enc, lv.guid, t.guid);
                }
                let _ = dev.flush();
            }
        }
        self.rebuild_top(g, ti, kind, children);
        lv.set_dev(None, Some("detached".into()));
        g.tree.events.push(Event {
            time: now(),
            class: "config".into(),
            vdev: lv.path(),
            offset: None,
            detail: "detached".into(),
        });
        Ok(())
    }

    /// Replace `old` with `new` (or with a new device at `old`'s path): attach it, mark `old` as being
    /// replaced; the resilver's completion detaches `old`.
    pub fn replace(&self, old: &str, new: Option<&Path>, force: bool) -> Result<()> {
        let (old_path, same_path) = {
            let g = self.lock();
            let (_, _, lv) = self.top_of(&g, old)?;
            (lv.path(), new.is_none())
        };
        if same_path {
            // A new device where the old one was: the old leaf must not be open on it.
            let g = self.lock();
            let (_, t, lv) = self.top_of(&g, old)?;
            if lv.dev().is_some() && !lv.check_device() {
                return Err(PoolError::Invalid(format!(
                    "{old_path} is still the same device; give the new device to replace it with"
                )));
            }
            if t.kind == TopKind::Single {
                return Err(PoolError::Invalid(format!(
                    "cannot replace {old_path} in place: it has no replica to copy from"
                )));
            }
        }
        let target = new
            .map(Path::to_path_buf)
            .unwrap_or_else(|| Path::new(&old_path).to_path_buf());
        {
            // Free the path for the new leaf (same path) and remember what to detach.
            let g = self.lock();
            let (_, _, lv) = self.top_of(&g, old)?;
            lock(&lv.config).flags.replacing = true;
            if same_path {
                lv.set_dev(None, Some("being replaced".into()));
                lock(&lv.config).identity.path = format!("{old_path} (old)");
            }
        }
        let r = self.attach_for_replace(&target, force, &old_path, same_path);
        if r.is_err() {
            let g = self.lock();
            if let Ok((_, _, lv)) = self
                .top_of(&g, old)
                .or_else(|_| self.top_of(&g, &format!("{old_path} (old)")))
            {
                let mut c = lock(&lv.config);
                c.flags.replacing = false;
                if same_path {
                    c.identity.path = old_path.clone();
                }
            }
        }
        r
    }

    fn attach_for_replace(
        &self,
        target: &Path,
        force: bool,
        old_path: &str,
        same_path: bool,
    ) -> Result<()> {
        let (sibling, old_guid) = if same_path {
            // Attach next to any other child of the old leaf's vdev.
            let g = self.lock();
            let (_, t, lv) = self.top_of(&g, &format!("{old_path} (old)"))?;
            let sibling = t
                .children
                .iter()
                .find(|c| c.guid != lv.guid)
                .map(|c| c.path())
                .ok_or_else(|| PoolError::Invalid("no sibling to attach to".into()))?;
            (sibling, lv.guid)
        } else {
            let g = self.lock();
            let (_, _, lv) = self.top_of(&g, old_path)?;
            (old_path.to_string(), lv.guid)
        };
        self.attach_after(&sibling, target, force, Some(old_guid))?;
        Ok(())
    }

    /// After a resilver: detach leaves marked as being replaced whose replacement is complete.
    ///
    /// A leaf's replacement is the child right after it (`replace` puts it there). Only that one
    /// counts: another child that completed its own resilver (an `attach` running at the same time)
    /// does not make the old leaf redundant, and detaching it then would leave the mirror with one
    /// complete copy while the new leaf still copies (OpenZFS keeps the old device until the new one
    /// is complete, too). A replacement that is itself being replaced hands this on: the old leaf
    /// waits for the last in the chain.
    pub fn finish_replacements(&self) -> Result<()> {
        let mut g = self.lock();
        let mut changed = false;
        loop {
            let mut done = None;
            'tops: for t in &g.tree.tops {
                for (i, c) in t.children.iter().enumerate() {
                    if !lock(&c.config).flags.replacing {
                        continue;
                    }
                    let Some(new) = t.children.get(i + 1) else {
                        continue;
                    };
                    if !lock(&new.config).flags.replacing
                        && new.state().usable()
                        && lock(&new.dtl).is_empty()
                    {
                        done = Some(c.guid.0.to_string());
                        break 'tops;
                    }
                }
            }
            let Some(name) = done else { break };
            self.detach_locked(&mut g, &name)?;
            changed = true;
        }
        if changed {
            g.commit(false)?;
        }
        Ok(())
    }

    /// Is any leaf of this pool waiting for a resilver to finish a replacement?
    pub fn replacing(&self) -> bool {
        let g = self.lock();
        let r = g
            .tree
            .leaves()
            .any(|(_, c)| lock(&c.config).flags.replacing);
        r
    }
}
