//! Volumes: create, properties (get, set, list) and the reservation rules.

use crate::io::{forget_live, live, write_live, LiveState};
use crate::registry::{load, load_tx, load_view, save_tx, Registry, RegistryLock, VolumeRecord};
use crate::space::{Figures, SpaceCtx};
use crate::{DatasetError, Result, MAX_BLOCKSIZE, MIN_BLOCKSIZE};
use cairn_pool::compress::Compression;
use cairn_pool::lock;
use cairn_pool::object::ObjType;
use cairn_pool::snapshot::Tx;
use cairn_pool::{Pool, View};
use serde::Serialize;
use std::collections::BTreeMap;

/// The reservation a non-sparse volume takes: its data once per copy, plus its indirect blocks
/// (a 128-byte pointer per block, plus 1% for the levels above, at one more copy, up to 3).
pub fn reservation_for(volsize: u64, copies: u8, volblocksize: u64) -> u64 {
    let data = volsize * copies as u64;
    let pointers = volsize / volblocksize.max(1) * 128;
    let meta_copies = (copies as u64 + 1).min(3);
    data + (pointers + pointers / 100) * meta_copies
}

/// The short name (after `POOL/`) of a full dataset name, checking it belongs to `pool`.
pub(crate) fn short(pool: &Pool, full: &str) -> Result<String> {
    match full.split_once('/') {
        Some((p, rest)) if p == pool.name() && !rest.is_empty() && !rest.contains('/') => {
            Ok(rest.to_string())
        }
        Some((p, rest)) if p == pool.name() && rest.contains('/') => Err(DatasetError::Invalid(
            "parent does not exist (Cairn datasets are POOL/NAME)".into(),
        )),
        _ => Err(DatasetError::Invalid(format!(
            "'{full}' is not a dataset of pool '{}'",
            pool.name()
        ))),
    }
}

/// Options of `dataset create -V`.
#[derive(Clone, Debug)]
pub struct CreateVolume {
    pub volsize: u64,
    pub volblocksize: u64,
    pub sparse: bool,
    /// Other `-o PROP=VAL` settings (readonly, copies, checksum, refreservation, user props).
    pub props: Vec<(String, String)>,
}

/// Unused reservations of every volume except `except`. `reg` must be what `pool` reads
/// ([`load_view`] through the same view): the objects it names exist.
pub(crate) fn reserved_by_others(
    pool: &mut View,
    reg: &Registry,
    except: Option<&str>,
) -> Result<u64> {
    let mut r = 0;
    for (n, v) in reg {
        if Some(n.as_str()) == except || v.refreservation == 0 {
            continue;
        }
        // Blocks a snapshot also holds do not count against the reservation: overwriting them
        // needs new space.
        let used = pool.unique_bytes(v.object)?;
        r += v.refreservation.saturating_sub(used);
    }
    Ok(r)
}

/// Bytes a dataset could still write (zfs's `available`); `reg` as for [`reserved_by_others`].
pub(crate) fn available(pool: &mut View, reg: &Registry, name: Option<&str>) -> Result<u64> {
    let (size, alloc, slop) = pool.space();
    let others = reserved_by_others(pool, reg, name)?;
    let own = match name.and_then(|n| reg.get(n)) {
        Some(v) => {
            let used = pool.unique_bytes(v.object)?;
            v.refreservation.saturating_sub(used)
        }
        None => 0,
    };
    Ok(size
        .saturating_sub(alloc)
        .saturating_sub(slop)
        .saturating_sub(others)
        .max(own))
}

pub(crate) fn parse_bool(prop: &str, v: &str) -> Result<bool> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(DatasetError::Invalid(format!(
            "bad value '{v}' for {prop}: must be 'on' or 'off'"
        ))),
    }
}

/// A refreservation value: bytes, `none` (0), or `auto` (what a non-sparse volume of this size,
/// copies and block size reserves, as zfs's `refreservation=auto`).
pub(crate) fn parse_refreservation(
    v: &str,
    volsize: u64,
    copies: u8,
    volblocksize: u64,
) -> Result<u64> {
    match v {
        "none" => Ok(0),
        "auto" => Ok(reservation_for(volsize, copies, volblocksize)),
        _ => v.parse().map_err(|_| {
            DatasetError::Invalid(format!(
                "bad value '{v}' for refreservation: a size, 'none' or 'auto'"
            ))
        }),
    }
}

pub(crate) fn parse_copies(v: &str) -> Result<u8> {
    match v {
        "1" => Ok(1),
        "2" => Ok(2),
        "3" => Ok(3),
        _ => Err(DatasetError::Invalid(format!(
            "bad value '{v}' for copies: must be 1, 2 or 3"
        ))),
    }
}

pub(crate) fn check_checksum(v: &str) -> Result<()> {
    match v {
        "on" | "blake3" => Ok(()),
        "off" => Err(DatasetError::Invalid(
            "checksum cannot be turned off: Cairn verifies every block (blake3)".into(),
        )),
        _ => Err(DatasetError::Invalid(format!(
            "bad value '{v}' for checksum: Cairn supports 'on' (= blake3) and 'blake3'"
        ))),
    }
}

pub(crate) fn check_blocksize(bs: u64) -> Result<()> {
    if !bs.is_power_of_two() || !(MIN_BLOCKSIZE..=MAX_BLOCKSIZE).contains(&bs) {
        return Err(DatasetError::Invalid(format!(
            "volblocksize must be a power of 2 from 4K to 128K, not {bs}"
        )));
    }
    Ok(())
}

pub(crate) fn check_volsize(volsize: u64, bs: u64) -> Result<()> {
    if volsize == 0 {
        return Err(DatasetError::Invalid("volsize cannot be zero".into()));
    }
    if !volsize.is_multiple_of(bs) {
        return Err(DatasetError::Invalid(format!(
            "volsize must be a multiple of volblocksize ({bs})"
        )));
    }
    if volsize > 1 << 56 {
        return Err(DatasetError::Invalid("volsize is too large".into()));
    }
    Ok(())
}

pub(crate) fn is_user_prop(name: &str) -> bool {
    name.contains(':') && name.len() <= 256
}

/// Create a volume.
pub fn create_volume(pool: &Pool, full: &str, c: &CreateVolume) -> Result<()> {
    let name = short(pool, full)?;
    check_name_part(&name, "volume")?;
    check_blocksize(c.volblocksize)?;
    check_volsize(c.volsize, c.volblocksize)?;
    let mut rec = VolumeRecord {
        guid: cairn_pool::Guid::random().0,
        object: 0,
        volsize: c.volsize,
        volblocksize: c.volblocksize,
        refreservation: 0,
        readonly: false,
        copies: 1,
        creation: cairn_pool::now_secs(),
        user: BTreeMap::new(),
        snapshots: BTreeMap::new(),
    };
    let mut refres: Option<String> = None;
    let mut comp = Compression::Off;
    for (k, v) in &c.props {
        match k.as_str() {
            "compression" => comp = parse_compression(v)?,
            "readonly" => rec.readonly = parse_bool(k, v)?,
            "copies" => rec.copies = parse_copies(v)?,
            "checksum" => check_checksum(v)?,
            "refreservation" => refres = Some(v.clone()),
            "volsize" | "volblocksize" => {
                return Err(DatasetError::Invalid(format!(
                    "use -V/-b to set {k} at creation"
                )))
            }
            k if is_user_prop(k) => {
                rec.user.insert(k.to_string(), v.clone());
            }
            k => return Err(DatasetError::Invalid(format!("invalid property '{k}'"))),
        }
    }
    rec.refreservation = match refres {
        Some(r) => parse_refreservation(&r, c.volsize, rec.copies, c.volblocksize)?,
        None if c.sparse => 0,
        None => reservation_for(c.volsize, rec.copies, c.volblocksize),
    };
    let rl = pool.extension::<RegistryLock>();
    let _changing = lock(&rl.0);
    // The object and the registry entry commit in the same txg.
    let obj = pool.atomically(|tx| -> Result<u64> {
        let mut reg = load_tx(tx)?;
        if reg.contains_key(&name) {
            return Err(DatasetError::Exists);
        }
        if rec.refreservation > 0 {
            let avail = available(&mut tx.view(), &reg, None)?;
            if rec.refreservation > avail {
                return Err(DatasetError::Invalid(format!(
                    "out of space: the volume reserves {} bytes and {} are available (use -s for \
                     a sparse volume)",
                    rec.refreservation, avail
                )));
            }
        }
        let shift = c.volblocksize.trailing_zeros() as u8;
        let obj = tx.create_object(ObjType::Volume, shift, rec.copies)?;
        tx.set_object_size(obj, c.volsize)?;
        tx.set_object_compression(obj, comp)?;
        rec.object = obj;
        reg.insert(name.clone(), rec.clone());
        save_tx(tx, &reg)?;
        Ok(obj)
    })?;
    forget_live(pool, obj);
    Ok(())
}

/// A volume or snapshot name part: zfs's characters (letters, digits, `_-.:`), at most 255
/// bytes for the whole name.
pub fn check_name_part(part: &str, what: &str) -> Result<()> {
    if part.is_empty() {
        return Err(DatasetError::Invalid(format!("empty {what} name")));
    }
    if part.len() > 255 {
        return Err(DatasetError::Invalid(format!("{what} name is too long")));
    }
    if let Some(c) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_-.:".contains(*c)))
    {
        return Err(DatasetError::Invalid(format!(
            "invalid character '{c}' in {what} name"
        )));
    }
    Ok(())
}

/// Every property of a volume: (name, value in bytes or text, source).
#[derive(Clone, Debug, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub record: VolumeRecord,
    /// zfs's `used`: usedbydataset + usedbysnapshots + usedbyrefreservation.
    pub used: u64,
    pub referenced: u64,
    pub available: u64,
    pub space: Figures,
    /// `POOL/VOL@SNAP` of a clone.
    pub origin: Option<String>,
    /// How new blocks are compressed (the property value).
    pub compression: String,
}

impl VolumeInfo {
    /// (property, value, source). Sizes are exact bytes; the CLI formats them.
    pub fn props(&self) -> Vec<(String, String, String)> {
        let r = &self.record;
        let onoff = |b: bool| if b { "on" } else { "off" }.to_string();
        let f = &self.space;
        let n = |x: u64| x.to_string();
        let mut v: Vec<(String, String, String)> = vec![
            ("type".into(), "volume".into(), "-".into()),
            ("creation".into(), r.creation.to_string(), "-".into()),
            ("used".into(), self.used.to_string(), "-".into()),
            ("available".into(), self.available.to_string(), "-".into()),
            ("referenced".into(), self.referenced.to_string(), "-".into()),
            ("volsize".into(), r.volsize.to_string(), "local".into()),
            (
                "volblocksize".into(),
                r.volblocksize.to_string(),
                "-".into(),
            ),
            (
                "refreservation".into(),
                if r.refreservation == 0 {
                    "none".into()
                } else {
                    r.refreservation.to_string()
                },
                "local".into(),
            ),
            ("readonly".into(), onoff(r.readonly), "local".into()),
            ("checksum".into(), "blake3".into(), "default".into()),
            ("copies".into(), r.copies.to_string(), "local".into()),
            (
                "compression".into(),
                self.compression.clone(),
                if self.compression == "off" {
                    "default".into()
                } else {
                    "local".into()
                },
            ),
            (
                "compressratio".into(),
                ratio(
                    f.logicalreferenced,
                    self.referenced / r.copies.max(1) as u64,
                ),
                "-".into(),
            ),
            (
                "refcompressratio".into(),
                ratio(
                    f.logicalreferenced,
                    self.referenced / r.copies.max(1) as u64,
                ),
                "-".into(),
            ),
            ("guid".into(), r.guid.to_string(), "-".into()),
            ("usedbydataset".into(), n(f.usedbydataset), "-".into()),
            ("usedbysnapshots".into(), n(f.usedbysnapshots), "-".into()),
            (
                "usedbyrefreservation".into(),
                n(f.usedbyrefreservation),
                "-".into(),
            ),
            ("usedbychildren".into(), "0".into(), "-".into()),
            ("written".into(), n(f.written), "-".into()),
            (
                "logicalreferenced".into(),
                n(f.logicalreferenced),
                "-".into(),
            ),
            (
                "origin".into(),
                self.origin.clone().unwrap_or_else(|| "-".into()),
                "-".into(),
            ),
            (
                "snapshot_count".into(),
                r.snapshots.len().to_string(),
                "-".into(),
            ),
        ];
        for (k, val) in &r.user {
            v.push((k.clone(), val.clone(), "local".into()));
        }
        v
    }
}

/// The properties of volume `name` (of pool `pn`), from a registry and space context read through
/// `v` (the same state).
pub(crate) fn info(
    v: &mut View,
    pn: &str,
    reg: &Registry,
    sp: &SpaceCtx,
    name: &str,
    rec: &VolumeRecord,
) -> Result<VolumeInfo> {
    let f = sp.volume(rec.object, rec.refreservation, rec.volblocksize);
    Ok(VolumeInfo {
        name: format!("{pn}/{name}"),
        record: rec.clone(),
        used: f.used,
        referenced: f.referenced,
        available: available(v, reg, Some(name))?,
        space: f,
        origin: sp.origin_name(pn, reg, rec.object),
        compression: v.object_compression(rec.object)?.name(),
    })
}

/// A `compression` value: off, on, lz4, zstd, zstd-1..19, zstd-fast, zstd-fast-1..10.
pub(crate) fn parse_compression(v: &str) -> Result<Compression> {
    Compression::parse(v).ok_or_else(|| {
        DatasetError::Invalid(format!(
            "bad value '{v}' for compression: must be off, on, lz4, zstd, zstd-1 .. zstd-19 or \
             zstd-fast (zstd-fast-1 .. zstd-fast-10)"
        ))
    })
}

/// zfs's compression ratio of `logical` bytes stored in `physical` (per copy), as "1.52x".
pub fn ratio(logical: u64, physical: u64) -> String {
    if physical == 0 || logical <= physical {
        return "1.00x".into();
    }
    format!("{:.2}x", logical as f64 / physical as f64)
}

/// All volumes of a pool, by name.
pub fn list(pool: &Pool) -> Result<Vec<VolumeInfo>> {
    let pn = pool.name();
    pool.consistently(|v| {
        let reg = load_view(v)?;
        let sp = SpaceCtx::load(v, &reg)?;
        reg.iter()
            .map(|(n, r)| info(v, &pn, &reg, &sp, n, r))
            .collect()
    })
}

pub fn get(pool: &Pool, full: &str) -> Result<VolumeInfo> {
    let name = short(pool, full)?;
    let pn = pool.name();
    pool.consistently(|v| {
        let reg = load_view(v)?;
        let rec = reg.get(&name).ok_or(DatasetError::NotFound)?;
        let sp = SpaceCtx::load(v, &reg)?;
        info(v, &pn, &reg, &sp, &name, rec)
    })
}

/// Set a property. Sizes arrive as bytes.
pub fn set(pool: &Pool, full: &str, prop: &str, value: &str) -> Result<()> {
    if full.contains('@') {
        return crate::snapshot::set_snapshot_prop(pool, full, prop, value);
    }
    let name = short(pool, full)?;
    let rl = pool.extension::<RegistryLock>();
    let _changing = lock(&rl.0);
    // The registry cannot change while the registry lock is held.
    let reg = load(pool)?;
    let before = reg.get(&name).ok_or(DatasetError::NotFound)?;
    let object = before.object;
    // Open handles wait here: writes in flight finish before a shrink frees the tail, and no request
    // is checked against the old values once the new ones are saved.
    let live = live(pool, before);
    let mut state = write_live(&live);
    // The object and the record change in one txg, under one hold of the pool lock: no reader sees
    // one without the other.
    let now = pool.atomically(|tx| -> Result<LiveState> {
        let mut reg = load_tx(tx)?;
        let others = reserved_by_others(&mut tx.view(), &reg, Some(&name))?;
        let rec = reg.get_mut(&name).ok_or(DatasetError::NotFound)?;
        if rec.object != object {
            return Err(DatasetError::NotFound);
        }
        set_prop(tx, rec, others, prop, value)?;
        let now = LiveState::of(rec);
        save_tx(tx, &reg)?;
        Ok(now)
    })?;
    *state = now;
    Ok(())
}

/// Change property `prop` of a volume's record (and its object) inside a transaction; `others` is
/// what the other volumes' reservations hold.
fn set_prop(
    tx: &mut Tx,
    rec: &mut VolumeRecord,
    others: u64,
    prop: &str,
    value: &str,
) -> Result<()> {
    match prop {
        "volsize" => {
            let n: u64 = value
                .parse()
                .map_err(|_| DatasetError::Invalid(format!("bad volsize '{value}'")))?;
            check_volsize(n, rec.volblocksize)?;
            if rec.refreservation > 0 {
                let newres = reservation_for(n, rec.copies, rec.volblocksize);
                let (size, alloc, slop) = tx.space();
                let (_, _, used, _) = tx.object_info(rec.object)?;
                let free_now = size.saturating_sub(alloc + slop + others);
                if newres > rec.refreservation && newres.saturating_sub(used) > free_now {
                    return Err(DatasetError::TooBig {
                        needed: newres.saturating_sub(used),
                        available: free_now,
                    });
                }
                rec.refreservation = newres;
            }
            tx.set_object_size(rec.object, n)?;
            rec.volsize = n;
        }
        "volblocksize" => {
            return Err(DatasetError::Invalid(
                "volblocksize is fixed when the volume is created".into(),
            ))
        }
        "readonly" => rec.readonly = parse_bool(prop, value)?,
        "copies" => {
            rec.copies = parse_copies(value)?;
            tx.set_object_copies(rec.object, rec.copies)?;
        }
        "checksum" => check_checksum(value)?,
        "compression" => tx.set_object_compression(rec.object, parse_compression(value)?)?,
        "refreservation" => {
            let r = parse_refreservation(value, rec.volsize, rec.copies, rec.volblocksize)?;
            // Growing the reservation needs its unused part free beside the others' (as zfs).
            if r > rec.refreservation {
                let (size, alloc, slop) = tx.space();
                let (_, _, used, _) = tx.object_info(rec.object)?;
                let free_now = size.saturating_sub(alloc + slop + others);
                if r.saturating_sub(used) > free_now {
                    return Err(DatasetError::TooBig {
                        needed: r.saturating_sub(used),
                        available: free_now,
                    });
                }
            }
            rec.refreservation = r;
        }
        "type"
        | "creation"
        | "used"
        | "available"
        | "referenced"
        | "guid"
        | "usedbydataset"
        | "usedbysnapshots"
        | "usedbyrefreservation"
        | "usedbychildren"
        | "written"
        | "logicalreferenced"
        | "compressratio"
        | "refcompressratio"
        | "origin"
        | "snapshot_count" => {
            return Err(DatasetError::Invalid(format!(
                "property '{prop}' is readonly"
            )))
        }
        p if is_user_prop(p) => {
            rec.user.insert(p.to_string(), value.to_string());
        }
        p => return Err(DatasetError::Invalid(format!("invalid property '{p}'"))),
    }
    Ok(())
}
