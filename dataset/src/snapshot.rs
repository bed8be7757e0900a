//! Snapshots and clones: the rules of `snapshot`, `clone`, `rollback`, `destroy`, `rename`,
//! `hold`/`release`, and what `list`/`get` show of snapshots. The mechanism (shared trees,
//! deadlists, background frees) is the pool's (`cairn_pool::snapshot`).
//!
//! Every command validates everything first, then changes the registry and the pool's snapshot
//! links in one `Pool::atomically` (one txg): a crash leaves all of a command or none of it.

use crate::io::{forget_live, live, write_live};
use crate::registry::{load, load_tx, load_view, save_tx, RegistryLock, SnapRecord, VolumeRecord};
use crate::space::{read_state, snapshot_name, Figures, SpaceCtx};
use crate::volume::{
    check_name_part, info, is_user_prop, parse_bool, parse_copies, parse_refreservation, short,
    VolumeInfo,
};
use crate::{DatasetError, Result};
use cairn_pool::lock;
use cairn_pool::snapshot::Tx;
use cairn_pool::Pool;
use serde::Serialize;
use std::collections::BTreeMap;

/// What `list` and `get` show of a snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub record: SnapRecord,
    pub volblocksize: u64,
    pub space: Figures,
    pub clones: Vec<String>,
}

impl SnapshotInfo {
    /// (property, value, source).
    pub fn props(&self) -> Vec<(String, String, String)> {
        let r = &self.record;
        let f = &self.space;
        let p = |k: &str, v: String| (k.to_string(), v, "-".to_string());
        let mut v = vec![
            p("type", "snapshot".into()),
            p("creation", r.creation.to_string()),
            p("used", f.used.to_string()),
            p("available", "-".into()),
            p("referenced", f.referenced.to_string()),
            p("volsize", r.volsize.to_string()),
            p("volblocksize", self.volblocksize.to_string()),
            p("refreservation", "-".into()),
            p("readonly", "on".into()),
            p("checksum", "blake3".into()),
            p("copies", "-".into()),
            p("guid", r.guid.to_string()),
            p("createtxg", r.txg.to_string()),
            p("written", f.written.to_string()),
            p("logicalreferenced", f.logicalreferenced.to_string()),
            p("userrefs", r.holds.len().to_string()),
            p("defer_destroy", "off".into()),
            p(
                "clones",
                if self.clones.is_empty() {
                    "-".into()
                } else {
                    self.clones.join(",")
                },
            ),
        ];
        for (k, val) in &r.user {
            v.push((k.clone(), val.clone(), "local".into()));
        }
        v
    }
}

/// A volume or a snapshot, for `list` and `get`.
#[derive(Clone, Debug, Serialize)]
pub enum DatasetInfo {
    Volume(VolumeInfo),
    Snapshot(SnapshotInfo),
}

impl DatasetInfo {
    pub fn name(&self) -> &str {
        match self {
            DatasetInfo::Volume(v) => &v.name,
            DatasetInfo::Snapshot(s) => &s.name,
        }
    }
    pub fn is_snapshot(&self) -> bool {
        matches!(self, DatasetInfo::Snapshot(_))
    }
    pub fn props(&self) -> Vec<(String, String, String)> {
        match self {
            DatasetInfo::Volume(v) => v.props(),
            DatasetInfo::Snapshot(s) => s.props(),
        }
    }
}

/// Split `POOL/VOL@SNAP` into the volume's full name and the snapshot's.
pub fn split_snapshot(full: &str) -> Result<(&str, &str)> {
    match full.split_once('@') {
        Some((v, s)) if !s.contains('@') => Ok((v, s)),
        Some(_) => Err(DatasetError::Invalid(
            "a snapshot name has exactly one '@'".into(),
        )),
        None => Err(DatasetError::Invalid(format!(
            "'{full}' is not a snapshot name (VOLUME@SNAPSHOT)"
        ))),
    }
}

fn snapshot_info(
    pn: &str,
    vol: &str,
    rec: &VolumeRecord,
    snap: &str,
    sr: &SnapRecord,
    sp: &SpaceCtx,
    reg: &crate::registry::Registry,
) -> SnapshotInfo {
    SnapshotInfo {
        name: format!("{pn}/{vol}@{snap}"),
        record: sr.clone(),
        volblocksize: rec.volblocksize,
        space: sp.snapshot(sr.object, rec.volblocksize),
        clones: sp.clone_names(pn, reg, sr.object),
    }
}

/// The snapshots of a record, oldest first.
fn by_txg(rec: &VolumeRecord) -> Vec<(&String, &SnapRecord)> {
    let mut v: Vec<_> = rec.snapshots.iter().collect();
    v.sort_by_key(|(_, s)| s.txg);
    v
}

/// Volumes and/or snapshots of a pool: each volume followed by its snapshots, oldest first.
/// `only` limits it to one volume (`POOL/VOL`).
pub fn list_all(
    pool: &Pool,
    volumes: bool,
    snapshots: bool,
    only: Option<&str>,
) -> Result<Vec<DatasetInfo>> {
    let only = only.map(|o| short(pool, o)).transpose()?;
    let pn = pool.name();
    pool.consistently(|v| {
        let reg = load_view(v)?;
        if let Some(o) = &only {
            if !reg.contains_key(o) {
                return Err(DatasetError::NotFound);
            }
        }
        let sp = SpaceCtx::load(v, &reg)?;
        let mut out = Vec::new();
        for (n, r) in &reg {
            if only.as_ref().is_some_and(|o| o != n) {
                continue;
            }
            if volumes {
                out.push(DatasetInfo::Volume(info(v, &pn, &reg, &sp, n, r)?));
            }
            if snapshots {
                for (s, sr) in by_txg(r) {
                    out.push(DatasetInfo::Snapshot(snapshot_info(
                        &pn, n, r, s, sr, &sp, &reg,
                    )));
                }
            }
        }
        Ok(out)
    })
}

/// One volume or snapshot by name.
pub fn get_any(pool: &Pool, full: &str) -> Result<DatasetInfo> {
    let Some((vol, snap)) = full.split_once('@') else {
        return crate::get(pool, full).map(DatasetInfo::Volume);
    };
    let name = short(pool, vol)?;
    let pn = pool.name();
    pool.consistently(|v| {
        let reg = load_view(v)?;
        let rec = reg.get(&name).ok_or(DatasetError::NotFound)?;
        let sr = rec.snapshots.get(snap).ok_or(DatasetError::NotFound)?;
        let sp = SpaceCtx::load(v, &reg)?;
        Ok(DatasetInfo::Snapshot(snapshot_info(
            &pn, &name, rec, snap, sr, &sp, &reg,
        )))
    })
}

/// `written@SNAP` of a volume.
pub fn written_since(pool: &Pool, vol: &str, snap: &str) -> Result<u64> {
    let name = short(pool, vol)?;
    pool.consistently(|v| {
        let reg = load_view(v)?;
        let rec = reg.get(&name).ok_or(DatasetError::NotFound)?;
        let sr = rec.snapshots.get(snap).ok_or(DatasetError::NotFound)?;
        let sp = SpaceCtx::load(v, &reg)?;
        Ok(sp.written_since(rec.object, sr.object))
    })
}

/// Every NBD export name of the pool: volumes and their snapshots.
pub fn export_names(pool: &Pool) -> Result<Vec<String>> {
    let reg = load(pool)?;
    let mut out = Vec::new();
    for (n, r) in &reg {
        out.push(format!("{}/{n}", pool.name()));
        for s in r.snapshots.keys() {
            out.push(format!("{}/{n}@{s}", pool.name()));
        }
    }
    Ok(out)
}

/// The name of every volume and snapshot by object id (for `status -v`).
pub fn object_names(pool: &Pool) -> Result<BTreeMap<u64, String>> {
    let reg = load(pool)?;
    let mut out = BTreeMap::new();
    for (n, r) in &reg {
        out.insert(r.object, format!("{}/{n}", pool.name()));
        for (s, sr) in &r.snapshots {
            out.insert(sr.object, format!("{}/{n}@{s}", pool.name()));
        }
    }
    Ok(out)
}

/// Take snapshots (`POOL/VOL@SNAP` each, one per volume) in one txg.
pub fn snapshot(pool: &Pool, names: &[String]) -> Result<()> {
    let mut want: Vec<(String, String)> = Vec::new();
    for full in names {
        let (vol, snap) = split_snapshot(full)?;
        check_name_part(snap, "snapshot")?;
        if full.len() > 255 {
            return Err(DatasetError::Invalid("name is too long".into()));
        }
        let v = short(pool, vol)?;
        if want.iter().any(|(w, _)| *w == v) {
            return Err(DatasetError::Invalid(format!(
                "'{vol}' is named twice: one snapshot per volume and command"
            )));
        }
        want.push((v, snap.to_string()));
    }
    let rl = pool.extension::<RegistryLock>();
    let _changing = lock(&rl.0);
    pool.atomically(|tx| -> Result<()> {
        let mut reg = load_tx(tx)?;
        let mut objs = Vec::new();
        for (v, s) in &want {
            let rec = reg.get(v).ok_or(DatasetError::NotFound)?;
            if rec.snapshots.contains_key(s) {
                return Err(DatasetError::Exists);
            }
            objs.push(rec.object);
        }
        // A volume with a reservation must still be able to overwrite all of it after the
        // snapshot (which then holds its blocks): the pool needs room, outside every reservation,
        // for the part of the reservation its data had consumed (as zfs refuses such snapshots).
        let mut needed = 0;
        for (v, _) in &want {
            let rec = &reg[v];
            if rec.refreservation > 0 {
                needed += rec.refreservation.min(tx.unique_bytes(rec.object)?);
            }
        }
        if needed > 0 {
            let avail = crate::volume::available(&mut tx.view(), &reg, None)?;
            if needed > avail {
                return Err(DatasetError::SnapshotNoSpace {
                    needed,
                    available: avail,
                });
            }
        }
        let (ids, txg) = tx.snapshot(&objs)?;
        let now = cairn_pool::now_secs();
        for ((v, s), id) in want.iter().zip(ids) {
            let rec = reg.get_mut(v).expect("checked");
            rec.snapshots.insert(
                s.clone(),
                SnapRecord {
                    guid: cairn_pool::Guid::random().0,
                    object: id,
                    txg: txg.0,
                    creation: now,
                    volsize: rec.volsize,
                    holds: BTreeMap::new(),
                    user: BTreeMap::new(),
                },
            );
        }
        save_tx(tx, &reg)
    })
}

/// `clone [-o PROP=VAL] POOL/VOL@SNAP POOL/NEW`.
pub fn clone(pool: &Pool, origin: &str, target: &str, props: &[(String, String)]) -> Result<()> {
    let (vol, snap) = split_snapshot(origin)?;
    let vname = short(pool, vol)?;
    let tpool = target.split('/').next().unwrap_or("");
    if tpool != pool.name() {
        return Err(DatasetError::Invalid(
            "source and target pools differ (a clone lives in its origin's pool)".into(),
        ));
    }
    let tname = short(pool, target)?;
    check_name_part(&tname, "volume")?;
    let rl = pool.extension::<RegistryLock>();
    let _changing = lock(&rl.0);
    let obj = pool.atomically(|tx| -> Result<u64> {
        let mut reg = load_tx(tx)?;
        let rec = reg.get(&vname).ok_or(DatasetError::NotFound)?.clone();
        let sr = rec
            .snapshots
            .get(snap)
            .ok_or(DatasetError::NotFound)?
            .clone();
        if reg.contains_key(&tname) {
            return Err(DatasetError::Exists);
        }
        let mut new = VolumeRecord {
            guid: cairn_pool::Guid::random().0,
            object: 0,
            volsize: sr.volsize,
            volblocksize: rec.volblocksize,
            refreservation: 0,
            readonly: false,
            copies: rec.copies,
            creation: cairn_pool::now_secs(),
            user: BTreeMap::new(),
            snapshots: BTreeMap::new(),
        };
        let mut refres = None;
        for (k, v) in props {
            match k.as_str() {
                "readonly" => new.readonly = parse_bool(k, v)?,
                "copies" => new.copies = parse_copies(v)?,
                "refreservation" => refres = Some(v.clone()),
                "checksum" if v == "on" || v == "blake3" => {}
                k if is_user_prop(k) => {
                    new.user.insert(k.to_string(), v.clone());
                }
                k => {
                    return Err(DatasetError::Invalid(format!(
                        "property '{k}' cannot be set on a clone"
                    )))
                }
            }
        }
        if let Some(r) = refres {
            new.refreservation =
                parse_refreservation(&r, new.volsize, new.copies, new.volblocksize)?;
            let avail = crate::volume::available(&mut tx.view(), &reg, None)?;
            if new.refreservation > avail {
                return Err(DatasetError::TooBig {
                    needed: new.refreservation,
                    available: avail,
                });
            }
        }
        let c = tx.clone_snapshot(sr.object, new.copies)?;
        new.object = c;
        reg.insert(tname.clone(), new);
        save_tx(tx, &reg)?;
        Ok(c)
    })?;
    forget_live(pool, obj);
    Ok(())
}

/// Options of `destroy`.
#[derive(Clone, Copy, Debug, Default)]
pub struct DestroyOpts {
    /// `-r`: a volume's snapshots too (and, for `rollback -r`, the later snapshots).
    pub recursive: bool,
    /// `-R`: clones of what goes, too.
    pub clones: bool,
    /// `-n`: only say what would go.
    pub dry_run: bool,
}

/// What a destroy removes (or would remove), in order, and the space it frees.
#[derive(Clone, Debug, Default)]
pub struct DestroyPlan {
    pub items: Vec<String>,
    pub reclaim: u64,
}

/// The snapshots that `VOL@spec` names: `a`, `a%c` ranges (either end may be empty), comma lists.
fn parse_snap_spec(rec: &VolumeRecord, spec: &str) -> Result<Vec<String>> {
    let order: Vec<&String> = by_txg(rec).into_iter().map(|(n, _)| n).collect();
    let mut out: Vec<String> = Vec::new();
    for part in spec.split(',') {
        if let Some((a, c)) = part.split_once('%') {
            let pos = |n: &str| -> Result<usize> {
                order
                    .iter()
                    .position(|x| x.as_str() == n)
                    .ok_or_else(|| DatasetError::Invalid(format!("snapshot '{n}' does not exist")))
            };
            let i = if a.is_empty() { 0 } else { pos(a)? };
            let j = if c.is_empty() {
                order.len().saturating_sub(1)
            } else {
                pos(c)?
            };
            if order.is_empty() || i > j {
                return Err(DatasetError::Invalid(format!(
                    "'{part}': the range's first snapshot must be older than its last"
                )));
            }
            out.extend(order[i..=j].iter().map(|s| s.to_string()));
        } else if rec.snapshots.contains_key(part) {
            out.push(part.to_string());
        } else {
            return Err(DatasetError::Invalid(format!(
                "snapshot '{part}' does not exist"
            )));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// What goes when volume `v` is destroyed with its snapshots (and, with `clones`, their clones,
/// deepest first): (volumes, snapshots as (volume, name)).
type Doomed = (Vec<String>, Vec<(String, String)>);

fn volume_tree(
    pn: &str,
    reg: &crate::registry::Registry,
    sp: &SpaceCtx,
    v: &str,
    clones: bool,
    out: &mut Doomed,
) -> Result<()> {
    let rec = reg.get(v).ok_or(DatasetError::NotFound)?;
    for (s, sr) in by_txg(rec) {
        let cl = &sp
            .links
            .ds
            .get(&sr.object)
            .map(|l| l.clones.clone())
            .unwrap_or_default();
        for c in cl {
            let Some((cn, _)) = reg.iter().find(|(_, r)| r.object == *c) else {
                continue;
            };
            if !clones {
                return Err(DatasetError::Busy(format!(
                    "snapshot {pn}/{v}@{s} has dependent clones\nuse '-R' to destroy the \
                     following datasets:\n{pn}/{cn}"
                )));
            }
            if !out.0.contains(cn) {
                volume_tree(pn, reg, sp, cn, clones, out)?;
            }
        }
        out.1.push((v.to_string(), s.clone()));
    }
    out.0.push(v.to_string());
    Ok(())
}

/// Bytes destroying `snaps` (snapshot objects of one lineage, none with clones) frees.
fn reclaim_of_snapshots(sp: &SpaceCtx, rec: &VolumeRecord, snaps: &[u64]) -> u64 {
    // Walk the lineage oldest first; each run of doomed snapshots frees, from the deadlists of
    // the run's later members and of the one after it, the blocks born after the run's previous.
    let order: Vec<u64> = by_txg(rec).into_iter().map(|(_, s)| s.object).collect();
    let mut total = 0;
    let mut i = 0;
    while i < order.len() {
        if !snaps.contains(&order[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < order.len() && snaps.contains(&order[i]) {
            i += 1;
        }
        let prev = sp.links.ds.get(&order[start]).map_or(0, |l| l.prev);
        let p = sp.links.ds.get(&prev).map_or(0, |l| l.txg);
        let next = if i < order.len() {
            order[i]
        } else {
            rec.object
        };
        for &x in order[start + 1..i].iter().chain(std::iter::once(&next)) {
            total += sp.dead_from(x, p);
        }
    }
    total
}

/// `destroy [-r] [-R] [-n] NAME`: a volume, or snapshots (`VOL@a`, `VOL@a%c`, `VOL@a,b`).
pub fn destroy(pool: &Pool, full: &str, o: DestroyOpts) -> Result<DestroyPlan> {
    let rl = pool.extension::<RegistryLock>();
    let _changing = lock(&rl.0);
    let (reg, sp) = read_state(pool)?;
    let pn = pool.name();
    let (vols, snaps): Doomed = match full.split_once('@') {
        Some((vol, spec)) => {
            let v = short(pool, vol)?;
            let rec = reg.get(&v).ok_or(DatasetError::NotFound)?;
            let mut d: Doomed = (Vec::new(), Vec::new());
            for s in parse_snap_spec(rec, spec)? {
                let sr = &rec.snapshots[&s];
                let cl = sp.clone_names(&pn, &reg, sr.object);
                if !cl.is_empty() {
                    if !o.clones {
                        return Err(DatasetError::Busy(format!(
                            "snapshot has dependent clones\nuse '-R' to destroy the following \
                             datasets:\n{}",
                            cl.join("\n")
                        )));
                    }
                    for c in cl {
                        let cs = short(pool, &c)?;
                        if !d.0.contains(&cs) {
                            volume_tree(&pn, &reg, &sp, &cs, true, &mut d)?;
                        }
                    }
                }
                d.1.push((v.clone(), s));
            }
            d
        }
        None => {
            let v = short(pool, full)?;
            let rec = reg.get(&v).ok_or(DatasetError::NotFound)?;
            // -R implies -r, as in zfs.
            if !rec.snapshots.is_empty() && !o.recursive && !o.clones {
                let names: Vec<String> = by_txg(rec)
                    .into_iter()
                    .map(|(s, _)| format!("{pn}/{v}@{s}"))
                    .collect();
                return Err(DatasetError::Busy(format!(
                    "volume has children\nuse '-r' to destroy the following datasets:\n{}",
                    names.join("\n")
                )));
            }
            let mut d: Doomed = (Vec::new(), Vec::new());
            volume_tree(&pn, &reg, &sp, &v, o.clones, &mut d)?;
            d
        }
    };
    // Held snapshots stay, whatever the flags (as zfs).
    for (v, s) in &snaps {
        let sr = &reg[v].snapshots[s];
        if !sr.holds.is_empty() {
            let tags: Vec<&str> = sr.holds.keys().map(|t| t.as_str()).collect();
            return Err(DatasetError::Busy(format!(
                "snapshot {pn}/{v}@{s} is held (tags: {}): release it first",
                tags.join(", ")
            )));
        }
    }
    let mut plan = DestroyPlan::default();
    for (v, s) in &snaps {
        plan.items.push(format!("{pn}/{v}@{s}"));
    }
    for v in &vols {
        plan.items.push(format!("{pn}/{v}"));
    }
    // Space: whole volumes free what they and their snapshots use; snapshots of volumes that stay
    // free their runs' blocks.
    for v in &vols {
        let r = &reg[v];
        let f = sp.volume(r.object, r.refreservation, r.volblocksize);
        plan.reclaim += f.usedbydataset + f.usedbysnapshots;
    }
    let mut per_vol: BTreeMap<&String, Vec<u64>> = BTreeMap::new();
    for (v, s) in &snaps {
        if !vols.contains(v) {
            per_vol
                .entry(v)
                .or_default()
                .push(reg[v].snapshots[s].object);
        }
    }
    for (v, objs) in per_vol {
        plan.reclaim += reclaim_of_snapshots(&sp, &reg[v], &objs);
    }
    if o.dry_run {
        return Ok(plan);
    }
    let gone: Vec<u64> = vols.iter().map(|v| reg[v].object).collect();
    pool.atomically(|tx| -> Result<()> {
        tx.commit()?;
        let mut reg = load_tx(tx)?;
        run_destroy(tx, &mut reg, &vols, &snaps)?;
        save_tx(tx, &reg)
    })?;
    for g in gone {
        forget_live(pool, g);
    }
    Ok(plan)
}

/// Destroy, in dependency order: a volume's snapshots after the clones made from them (which
/// `vols` lists first), and each volume after its snapshots.
fn run_destroy(
    tx: &mut Tx,
    reg: &mut crate::registry::Registry,
    vols: &[String],
    snaps: &[(String, String)],
) -> Result<()> {
    let mut left: Vec<(String, String)> = snaps.to_vec();
    let mut vols_left: Vec<String> = vols.to_vec();
    // Each pass removes what nothing depends on any more.
    while !left.is_empty() || !vols_left.is_empty() {
        let links = tx.links()?;
        let mut progressed = false;
        let mut i = 0;
        while i < left.len() {
            let (v, s) = &left[i];
            let obj = reg[v].snapshots[s].object;
            if links.ds.get(&obj).is_some_and(|l| l.clones.is_empty()) {
                tx.destroy_snapshot(obj)?;
                reg.get_mut(v).expect("listed").snapshots.remove(s);
                left.remove(i);
                progressed = true;
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < vols_left.len() {
            let v = &vols_left[i];
            if reg[v].snapshots.is_empty() {
                tx.destroy_volume(reg[v].object)?;
                reg.remove(v);
                vols_left.remove(i);
                progressed = true;
            } else {
                i += 1;
            }
        }
        if !progressed {
            return Err(DatasetError::Busy(
                "a dataset to destroy still has dependents".into(),
            ));
        }
    }
    Ok(())
}

/// `rollback [-r] [-R] POOL/VOL@SNAP`: the volume's contents become the snapshot's. Returns what
/// was destroyed on the way (later snapshots with `-r`, their clones with `-R`).
pub fn rollback(pool: &Pool, full: &str, o: DestroyOpts) -> Result<Vec<String>> {
    let (vol, snap) = split_snapshot(full)?;
    let v = short(pool, vol)?;
    let rl = pool.extension::<RegistryLock>();
    let _changing = lock(&rl.0);
    let (reg, sp) = read_state(pool)?;
    let rec = reg.get(&v).ok_or(DatasetError::NotFound)?.clone();
    let target = rec
        .snapshots
        .get(snap)
        .ok_or(DatasetError::NotFound)?
        .clone();
    let later: Vec<String> = by_txg(&rec)
        .into_iter()
        .filter(|(_, s)| s.txg > target.txg)
        .map(|(n, _)| n.clone())
        .collect();
    let pn = pool.name();
    if !later.is_empty() && !o.recursive {
        return Err(DatasetError::Busy(format!(
            "more recent snapshots exist\nuse '-r' to force deletion of the following \
             snapshots:\n{}",
            later
                .iter()
                .map(|s| format!("{pn}/{v}@{s}"))
                .collect::<Vec<_>>()
                .join("\n")
        )));
    }
    let mut doomed: Doomed = (Vec::new(), Vec::new());
    for s in &later {
        let sr = &rec.snapshots[s];
        for c in sp.clone_names(&pn, &reg, sr.object) {
            if !o.clones {
                return Err(DatasetError::Busy(format!(
                    "more recent snapshots have dependent clones\nuse '-R' to destroy the \
                     following datasets:\n{c}"
                )));
            }
            let cs = short(pool, &c)?;
            if !doomed.0.contains(&cs) {
                volume_tree(&pn, &reg, &sp, &cs, true, &mut doomed)?;
            }
        }
        if !sr.holds.is_empty() {
            return Err(DatasetError::Busy(format!(
                "snapshot {pn}/{v}@{s} is held: release it first"
            )));
        }
        doomed.1.push((v.clone(), s.clone()));
    }
    let mut items: Vec<String> = doomed
        .1
        .iter()
        .map(|(a, b)| format!("{pn}/{a}@{b}"))
        .collect();
    items.extend(doomed.0.iter().map(|a| format!("{pn}/{a}")));
    // Clients of the volume wait here, and see the snapshot's contents at their next request.
    let lv = live(pool, &rec);
    let mut state = write_live(&lv);
    let gone: Vec<u64> = doomed.0.iter().map(|c| reg[c].object).collect();
    pool.atomically(|tx| -> Result<()> {
        tx.commit()?;
        let mut reg = load_tx(tx)?;
        run_destroy(tx, &mut reg, &doomed.0, &doomed.1)?;
        let size = tx.rollback(rec.object)?;
        let r = reg.get_mut(&v).ok_or(DatasetError::NotFound)?;
        r.volsize = size;
        save_tx(tx, &reg)
    })?;
    state.volsize = target.volsize;
    drop(state);
    for g in gone {
        forget_live(pool, g);
    }
    Ok(items)
}

/// `rename POOL/VOL POOL/NEW` or `POOL/VOL@A POOL/VOL@B`.
pub fn rename(pool: &Pool, from: &str, to: &str) -> Result<()> {
    let rl = pool.extension::<RegistryLock>();
    let _changing = lock(&rl.0);
    pool.atomically(|tx| -> Result<()> {
        let mut reg = load_tx(tx)?;
        match (from.split_once('@'), to.split_once('@')) {
            (Some((fv, fs)), Some((tv, ts))) => {
                if fv != tv {
                    return Err(DatasetError::Invalid(
                        "a snapshot is renamed within its volume (VOL@OLD VOL@NEW)".into(),
                    ));
                }
                check_name_part(ts, "snapshot")?;
                let v = short_in(tx, fv, &reg)?;
                let rec = reg.get_mut(&v).ok_or(DatasetError::NotFound)?;
                if rec.snapshots.contains_key(ts) {
                    return Err(DatasetError::Exists);
                }
                let sr = rec.snapshots.remove(fs).ok_or(DatasetError::NotFound)?;
                rec.snapshots.insert(ts.to_string(), sr);
            }
            (None, None) => {
                let (fp, f) = from.split_once('/').ok_or(DatasetError::NotFound)?;
                let (tp, t) = to
                    .split_once('/')
                    .ok_or_else(|| DatasetError::Invalid("the new name is POOL/NAME".into()))?;
                if fp != tp {
                    return Err(DatasetError::Invalid(
                        "cannot rename to a different pool".into(),
                    ));
                }
                if t.contains('/') {
                    return Err(DatasetError::Invalid(
                        "parent does not exist (Cairn datasets are POOL/NAME)".into(),
                    ));
                }
                check_name_part(t, "volume")?;
                if reg.contains_key(t) {
                    return Err(DatasetError::Exists);
                }
                let rec = reg.remove(f).ok_or(DatasetError::NotFound)?;
                reg.insert(t.to_string(), rec);
            }
            _ => {
                return Err(DatasetError::Invalid(
                    "a snapshot is renamed to a snapshot, a volume to a volume".into(),
                ))
            }
        }
        save_tx(tx, &reg)
    })
}

fn short_in(_tx: &mut Tx, full: &str, reg: &crate::registry::Registry) -> Result<String> {
    let (_, v) = full.split_once('/').ok_or(DatasetError::NotFound)?;
    if !reg.contains_key(v) {
        return Err(DatasetError::NotFound);
    }
    Ok(v.to_string())
}

/// Change the holds of snapshots: add tag `tag` (`hold`) or remove it (`release`).
pub fn hold(pool: &Pool, tag: &str, snaps: &[String], add: bool) -> Result<()> {
    if tag.is_empty() || tag.len() > 255 {
        return Err(DatasetError::Invalid("a hold tag is 1 to 255 bytes".into()));
    }
    let mut want = Vec::new();
    for full in snaps {
        let (vol, s) = split_snapshot(full)?;
        want.push((short(pool, vol)?, s.to_string()));
    }
    let rl = pool.extension::<RegistryLock>();
    let _changing = lock(&rl.0);
    pool.atomically(|tx| -> Result<()> {
        let mut reg = load_tx(tx)?;
        for (v, s) in &want {
            let sr = reg
                .get_mut(v)
                .and_then(|r| r.snapshots.get_mut(s))
                .ok_or(DatasetError::NotFound)?;
            if add {
                if sr.holds.contains_key(tag) {
                    return Err(DatasetError::Exists);
                }
                sr.holds.insert(tag.to_string(), cairn_pool::now_secs());
            } else if sr.holds.remove(tag).is_none() {
                return Err(DatasetError::Invalid(format!(
                    "no such tag on this dataset: '{tag}'"
                )));
            }
        }
        save_tx(tx, &reg)
    })
}

/// The holds of a snapshot: (tag, time placed).
pub fn holds(pool: &Pool, full: &str) -> Result<Vec<(String, u64)>> {
    let (vol, s) = split_snapshot(full)?;
    let v = short(pool, vol)?;
    let reg = load(pool)?;
    let sr = reg
        .get(&v)
        .and_then(|r| r.snapshots.get(s))
        .ok_or(DatasetError::NotFound)?;
    Ok(sr.holds.iter().map(|(t, at)| (t.clone(), *at)).collect())
}

/// `set` on a snapshot: only user properties; the rest are fixed (as zfs).
pub(crate) fn set_snapshot_prop(pool: &Pool, full: &str, prop: &str, value: &str) -> Result<()> {
    let (vol, s) = split_snapshot(full)?;
    let v = short(pool, vol)?;
    if !is_user_prop(prop) {
        return Err(DatasetError::Invalid(format!(
            "property '{prop}' cannot be set on a snapshot (snapshots are read-only)"
        )));
    }
    let rl = pool.extension::<RegistryLock>();
    let _changing = lock(&rl.0);
    pool.atomically(|tx| -> Result<()> {
        let mut reg = load_tx(tx)?;
        let sr = reg
            .get_mut(&v)
            .and_then(|r| r.snapshots.get_mut(s))
            .ok_or(DatasetError::NotFound)?;
        sr.user.insert(prop.to_string(), value.to_string());
        save_tx(tx, &reg)
    })
}

/// The name of a snapshot object, if it is one (for messages).
pub fn name_of_snapshot(pool: &Pool, obj: u64) -> Option<String> {
    let reg = load(pool).ok()?;
    snapshot_name(&pool.name(), &reg, obj)
}

/// Object and block size of a volume (`POOL/VOL`) or snapshot (`POOL/VOL@SNAP`).
fn object_of(pool: &Pool, reg: &crate::registry::Registry, full: &str) -> Result<(u64, u64)> {
    let (vol, snap) = match full.split_once('@') {
        Some((v, s)) => (v, Some(s)),
        None => (full, None),
    };
    let rec = reg.get(&short(pool, vol)?).ok_or(DatasetError::NotFound)?;
    match snap {
        None => Ok((rec.object, rec.volblocksize)),
        Some(s) => Ok((
            rec.snapshots.get(s).ok_or(DatasetError::NotFound)?.object,
            rec.volblocksize,
        )),
    }
}

/// Changed byte ranges `(offset, length)` between snapshot `from` and `to` (a later snapshot, a
/// clone, or by default the live volume of `from`), merged.
pub fn diff(pool: &Pool, from: &str, to: Option<&str>) -> Result<Vec<(u64, u64)>> {
    let (vol, _) = split_snapshot(from)?;
    let reg = load(pool)?;
    let (a, bs) = object_of(pool, &reg, from)?;
    let (b, bs2) = object_of(pool, &reg, to.unwrap_or(vol))?;
    if bs != bs2 {
        return Err(DatasetError::Invalid(
            "the two have different block sizes".into(),
        ));
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    let end = (1u64 << 60) / bs;
    while at < end {
        let (blocks, done) = pool.changed_blocks(a, b, at, end, 65536)?;
        for blk in blocks {
            match out.last_mut() {
                Some((o, l)) if *o + *l == blk * bs => *l += bs,
                _ => out.push((blk * bs, bs)),
            }
        }
        if done >= end {
            break;
        }
        at = done;
    }
    Ok(out)
}

/// `promote POOL/CLONE`: the clone takes over its origin's snapshots up to and including the
/// origin, and the old origin volume becomes a clone of that snapshot. Refused when snapshot
/// names would collide (as zfs).
pub fn promote(pool: &Pool, full: &str) -> Result<()> {
    let name = short(pool, full)?;
    let rl = pool.extension::<RegistryLock>();
    let _changing = lock(&rl.0);
    pool.atomically(|tx| -> Result<()> {
        let mut reg = load_tx(tx)?;
        let rec = reg.get(&name).ok_or(DatasetError::NotFound)?.clone();
        let links = tx.links()?;
        let Some(origin) = links.origin_of(rec.object) else {
            return Err(DatasetError::Invalid("not a cloned volume".into()));
        };
        let Some((oname, orec)) = reg
            .iter()
            .find(|(_, r)| r.snapshots.values().any(|s| s.object == origin))
            .map(|(n, r)| (n.clone(), r.clone()))
        else {
            return Err(DatasetError::Pool(cairn_pool::PoolError::corrupt(
                "dataset registry",
                format!("no snapshot record for object {origin}"),
            )));
        };
        let otxg = orec
            .snapshots
            .values()
            .find(|s| s.object == origin)
            .map_or(0, |s| s.txg);
        let moving: Vec<String> = orec
            .snapshots
            .iter()
            .filter(|(_, s)| s.txg <= otxg)
            .map(|(n, _)| n.clone())
            .collect();
        let clash: Vec<&String> = moving
            .iter()
            .filter(|n| rec.snapshots.contains_key(*n))
            .collect();
        if !clash.is_empty() {
            return Err(DatasetError::Busy(format!(
                "snapshot name collision: rename {} first",
                clash
                    .iter()
                    .map(|n| format!("{}/{name}@{n}", pool.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        tx.promote(rec.object)?;
        for n in moving {
            let sr = reg
                .get_mut(&oname)
                .and_then(|r| r.snapshots.remove(&n))
                .expect("listed");
            reg.get_mut(&name).expect("checked").snapshots.insert(n, sr);
        }
        save_tx(tx, &reg)
    })
}

/// The object and size of a volume or snapshot (for `cairn inject -t`).
pub fn object_and_size(pool: &Pool, full: &str) -> Result<(u64, u64)> {
    match get_any(pool, full)? {
        DatasetInfo::Volume(v) => Ok((v.record.object, v.record.volsize)),
        DatasetInfo::Snapshot(s) => Ok((s.record.object, s.record.volsize)),
    }
}
