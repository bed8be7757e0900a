//! cairn-dataset: thin-provisioned volumes (datasets) built on the pool's object layer.
//!
//! A volume is one object of the pool (type Volume) whose block size is the volume's `volblocksize`;
//! its logical size is `volsize`. Unwritten blocks are holes: they read as zeros and take no space;
//! trims and all-zero writes turn blocks back into holes. The registry of datasets (name -> record with
//! the object id and properties) is a bincode map kept in the pool's directory under "datasets".
//!
//! Space: a volume created without `-s` has a refreservation (its size plus indirect-block overhead);
//! the pool keeps that space for it: other writers get ENOSPC before they can take it.
//! Sparse volumes reserve nothing. A write that does not fit gets `NoSpace` and changes nothing.
//!
//! Live properties: every open [`Volume`] of a pool shares one `LiveState` per volume (kept with the
//! open pool), so `set volsize` and `set readonly` apply to connected clients at their next request.
//! I/O holds the state's read lock from its bounds check until the pool has the data; a change takes
//! the write lock, so a shrink waits for writes in flight and then frees the tail: nothing is left past
//! the new end.
//!
//! Invariants: every request is bounds-checked against the live `volsize` before it reaches the pool;
//! names are `POOL/NAME` (one level; Cairn has no filesystems to nest under).

use bincode::Options;
use cairn_pool::lock;
use cairn_pool::object::ObjType;
use cairn_pool::{Pool, PoolError, SpaceRule};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

const REGISTRY: &str = "datasets";
pub const DEFAULT_BLOCKSIZE: u64 = 16 * 1024;
pub const MIN_BLOCKSIZE: u64 = 4 * 1024;
pub const MAX_BLOCKSIZE: u64 = 128 * 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{0}")]
    Invalid(String),
    #[error("dataset does not exist")]
    NotFound,
    #[error("dataset already exists")]
    Exists,
    #[error("dataset is read-only")]
    ReadOnly,
    #[error("out of space")]
    NoSpace,
    /// A reservation (refreservation, or volsize of a thick volume) larger than the pool can keep.
    #[error("size is greater than available space ({needed} bytes needed, {available} available)")]
    TooBig { needed: u64, available: u64 },
    #[error("request beyond the end of the volume ({end} > {size})")]
    OutOfRange { end: u64, size: u64 },
}

impl DatasetError {
    fn from_pool(e: PoolError) -> DatasetError {
        match e {
            PoolError::NoSpace => DatasetError::NoSpace,
            e => DatasetError::Pool(e),
        }
    }
}

pub type Result<T, E = DatasetError> = std::result::Result<T, E>;

/// What the registry keeps for a volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VolumeRecord {
    pub guid: u64,
    pub object: u64,
    pub volsize: u64,
    pub volblocksize: u64,
    /// Bytes reserved for the volume; 0 for a sparse volume.
    pub refreservation: u64,
    pub readonly: bool,
    pub copies: u8,
    pub creation: u64,
    /// User properties (`module:property` names).
    pub user: BTreeMap<String, String>,
}

type Registry = BTreeMap<String, VolumeRecord>;

/// The properties of a volume that its I/O checks, shared by every open handle of it.
#[derive(Clone, Copy, Debug)]
struct LiveState {
    volsize: u64,
    readonly: bool,
    reserved: bool,
}

impl LiveState {
    fn of(rec: &VolumeRecord) -> LiveState {
        LiveState {
            volsize: rec.volsize,
            readonly: rec.readonly,
            reserved: rec.refreservation > 0,
        }
    }
}

/// Serializes the changes of a pool's registry (load, change, save): without it, two volumes created
/// at once through the daemon each saved a registry without the other (one volume lost, its object
/// leaked). A [`Pool::extension`]; taken before any volume's live-state lock.
#[derive(Default)]
struct RegistryLock(Mutex<()>);

/// The live states of a pool's volumes, by object id (a [`Pool::extension`]).
#[derive(Default)]
struct LiveVolumes(Mutex<HashMap<u64, Arc<RwLock<LiveState>>>>);

/// The live state of a volume, made from its record on first use.
fn live(pool: &Pool, rec: &VolumeRecord) -> Arc<RwLock<LiveState>> {
    let all = pool.extension::<LiveVolumes>();
    let mut m = lock(&all.0);
    m.entry(rec.object)
        .or_insert_with(|| Arc::new(RwLock::new(LiveState::of(rec))))
        .clone()
}

/// Forget the live state of an object (the volume is gone, its id may be reused).
fn forget_live(pool: &Pool, object: u64) {
    lock(&pool.extension::<LiveVolumes>().0).remove(&object);
}

fn read_live(l: &RwLock<LiveState>) -> RwLockReadGuard<'_, LiveState> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write_live(l: &RwLock<LiveState>) -> RwLockWriteGuard<'_, LiveState> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn opts() -> impl bincode::Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(16 << 20)
}

fn load(pool: &Pool) -> Result<Registry> {
    match pool.read_named_blob(REGISTRY)? {
        None => Ok(Registry::new()),
        Some(b) if b.is_empty() => Ok(Registry::new()),
        Some(b) => opts()
            .deserialize(&b)
            .map_err(|e| DatasetError::Pool(PoolError::corrupt("dataset registry", e.to_string()))),
    }
}

fn save(pool: &Pool, reg: &Registry) -> Result<()> {
    let b = opts()
        .serialize(reg)
        .map_err(|e| DatasetError::Invalid(e.to_string()))?;
    pool.write_named_blob(REGISTRY, &b)?;
    Ok(())
}

/// The reservation a non-sparse volume takes: its data once per copy, plus its indirect blocks
/// (a 128-byte pointer per block, plus 1% for the levels above, at one more copy, up to 3).
pub fn reservation_for(volsize: u64, copies: u8, volblocksize: u64) -> u64 {
    let data = volsize * copies as u64;
    let pointers = volsize / volblocksize.max(1) * 128;
    let meta_copies = (copies as u64 + 1).min(3);
    data + (pointers + pointers / 100) * meta_copies
}

/// The short name (after `POOL/`) of a full dataset name, checking it belongs to `pool`.
fn short(pool: &Pool, full: &str) -> Result<String> {
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

/// The piece size in which a volume with a reservation rewrites its space on a full pool.
const RESERVED_PIECE: u64 = 1 << 20;

/// Unused reservations of every volume except `except`.
fn reserved_by_others(pool: &Pool, reg: &Registry, except: Option<&str>) -> Result<u64> {
    let mut r = 0;
    for (n, v) in reg {
        if Some(n.as_str()) == except || v.refreservation == 0 {
            continue;
        }
        let (_, _, used, _) = pool.object_info(v.object)?;
        r += v.refreservation.saturating_sub(used);
    }
    Ok(r)
}

/// Bytes a dataset could still write (zfs's `available`).
fn available(pool: &Pool, reg: &Registry, name: Option<&str>) -> Result<u64> {
    let (size, alloc, slop) = pool.space();
    let others = reserved_by_others(pool, reg, name)?;
    let own = match name.and_then(|n| reg.get(n)) {
        Some(v) => {
            let (_, _, used, _) = pool.object_info(v.object)?;
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

fn parse_bool(prop: &str, v: &str) -> Result<bool> {
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
fn parse_refreservation(v: &str, volsize: u64, copies: u8, volblocksize: u64) -> Result<u64> {
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

fn parse_copies(v: &str) -> Result<u8> {
    match v {
        "1" => Ok(1),
        "2" => Ok(2),
        "3" => Ok(3),
        _ => Err(DatasetError::Invalid(format!(
            "bad value '{v}' for copies: must be 1, 2 or 3"
        ))),
    }
}

fn check_checksum(v: &str) -> Result<()> {
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

fn check_blocksize(bs: u64) -> Result<()> {
    if !bs.is_power_of_two() || !(MIN_BLOCKSIZE..=MAX_BLOCKSIZE).contains(&bs) {
        return Err(DatasetError::Invalid(format!(
            "volblocksize must be a power of 2 from 4K to 128K, not {bs}"
        )));
    }
    Ok(())
}

fn check_volsize(volsize: u64, bs: u64) -> Result<()> {
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

fn is_user_prop(name: &str) -> bool {
    name.contains(':') && name.len() <= 256
}

/// Create a volume.
pub fn create_volume(pool: &Pool, full: &str, c: &CreateVolume) -> Result<()> {
    let name = short(pool, full)?;
    check_blocksize(c.volblocksize)?;
    check_volsize(c.volsize, c.volblocksize)?;
    let rl = pool.extension::<RegistryLock>();
    let _changing = lock(&rl.0);
    let mut reg = load(pool)?;
    if reg.contains_key(&name) {
        return Err(DatasetError::Exists);
    }
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
    };
    let mut refres: Option<String> = None;
    for (k, v) in &c.props {
        match k.as_str() {
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
    if rec.refreservation > 0 {
        let avail = available(pool, &reg, None)?;
        if rec.refreservation > avail {
            return Err(DatasetError::Invalid(format!(
                "out of space: the volume reserves {} bytes and {} are available (use -s for a \
                 sparse volume)",
                rec.refreservation, avail
            )));
        }
    }
    let shift = c.volblocksize.trailing_zeros() as u8;
    let obj = pool.create_object(ObjType::Volume, shift, rec.copies)?;
    pool.set_object_size(obj, c.volsize)?;
    forget_live(pool, obj);
    rec.object = obj;
    reg.insert(name, rec);
    save(pool, &reg)?;
    Ok(())
}

/// Destroy a volume and free its blocks.
pub fn destroy(pool: &Pool, full: &str) -> Result<()> {
    let name = short(pool, full)?;
    let rl = pool.extension::<RegistryLock>();
    let _changing = lock(&rl.0);
    let mut reg = load(pool)?;
    let rec = reg.remove(&name).ok_or(DatasetError::NotFound)?;
    pool.destroy_object(rec.object)?;
    save(pool, &reg)?;
    forget_live(pool, rec.object);
    Ok(())
}

/// Every property of a volume: (name, value in bytes or text, source).
#[derive(Clone, Debug, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub record: VolumeRecord,
    /// Allocated bytes (all copies), or the reservation if larger, as zfs's `used`.
    pub used: u64,
    pub referenced: u64,
    pub available: u64,
}

impl VolumeInfo {
    /// (property, value, source). Sizes are exact bytes; the CLI formats them.
    pub fn props(&self) -> Vec<(String, String, String)> {
        let r = &self.record;
        let onoff = |b: bool| if b { "on" } else { "off" }.to_string();
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
            ("guid".into(), r.guid.to_string(), "-".into()),
        ];
        for (k, val) in &r.user {
            v.push((k.clone(), val.clone(), "local".into()));
        }
        v
    }
}

fn info(pool: &Pool, reg: &Registry, name: &str, rec: &VolumeRecord) -> Result<VolumeInfo> {
    let (_, _, alloc, _) = pool.object_info(rec.object)?;
    Ok(VolumeInfo {
        name: format!("{}/{}", pool.name(), name),
        record: rec.clone(),
        used: alloc.max(rec.refreservation),
        referenced: alloc,
        available: available(pool, reg, Some(name))?,
    })
}

/// All volumes of a pool, by name.
pub fn list(pool: &Pool) -> Result<Vec<VolumeInfo>> {
    let reg = load(pool)?;
    reg.iter().map(|(n, r)| info(pool, &reg, n, r)).collect()
}

pub fn get(pool: &Pool, full: &str) -> Result<VolumeInfo> {
    let name = short(pool, full)?;
    let reg = load(pool)?;
    let rec = reg.get(&name).ok_or(DatasetError::NotFound)?;
    info(pool, &reg, &name, rec)
}

/// Set a property. Sizes arrive as bytes.
pub fn set(pool: &Pool, full: &str, prop: &str, value: &str) -> Result<()> {
    let name = short(pool, full)?;
    let rl = pool.extension::<RegistryLock>();
    let _changing = lock(&rl.0);
    let mut reg = load(pool)?;
    let others = reserved_by_others(pool, &reg, Some(&name))?;
    let rec = reg.get_mut(&name).ok_or(DatasetError::NotFound)?;
    // Open handles wait here: writes in flight finish before a shrink frees the tail, and no request
    // is checked against the old values once the new ones are saved.
    let live = live(pool, rec);
    let mut state = write_live(&live);
    match prop {
        "volsize" => {
            let n: u64 = value
                .parse()
                .map_err(|_| DatasetError::Invalid(format!("bad volsize '{value}'")))?;
            check_volsize(n, rec.volblocksize)?;
            if rec.refreservation > 0 {
                let newres = reservation_for(n, rec.copies, rec.volblocksize);
                let (size, alloc, slop) = pool.space();
                let (_, _, used, _) = pool.object_info(rec.object)?;
                let free_now = size.saturating_sub(alloc + slop + others);
                if newres > rec.refreservation && newres.saturating_sub(used) > free_now {
                    return Err(DatasetError::TooBig {
                        needed: newres.saturating_sub(used),
                        available: free_now,
                    });
                }
                rec.refreservation = newres;
            }
            pool.set_object_size(rec.object, n)?;
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
            pool.set_object_copies(rec.object, rec.copies)?;
        }
        "checksum" => check_checksum(value)?,
        "refreservation" => {
            let r = parse_refreservation(value, rec.volsize, rec.copies, rec.volblocksize)?;
            // Growing the reservation needs its unused part free beside the others' (as zfs).
            if r > rec.refreservation {
                let (size, alloc, slop) = pool.space();
                let (_, _, used, _) = pool.object_info(rec.object)?;
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
        "type" | "creation" | "used" | "available" | "referenced" | "guid" => {
            return Err(DatasetError::Invalid(format!(
                "property '{prop}' is readonly"
            )))
        }
        p if is_user_prop(p) => {
            rec.user.insert(p.to_string(), value.to_string());
        }
        p => return Err(DatasetError::Invalid(format!("invalid property '{p}'"))),
    }
    let now = LiveState::of(rec);
    save(pool, &reg)?;
    *state = now;
    Ok(())
}

/// An open volume: the I/O interface the NBD server uses.
pub struct Volume {
    pool: Arc<Pool>,
    name: String,
    object: u64,
    volblocksize: u64,
    /// Size and read-only flag, shared with every other handle of this volume and with `set`.
    live: Arc<RwLock<LiveState>>,
    /// Space other volumes' reservations hold, refreshed at most every second (writes are hot).
    headroom: Mutex<(Instant, u64)>,
}

/// Allocation state of a range, for NBD block status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub allocated: bool,
}

impl Volume {
    pub fn open(pool: Arc<Pool>, full: &str) -> Result<Volume> {
        let name = short(&pool, full)?;
        let reg = load(&pool)?;
        let rec = reg.get(&name).cloned().ok_or(DatasetError::NotFound)?;
        let h = reserved_by_others(&pool, &reg, Some(&name))?;
        let live = live(&pool, &rec);
        Ok(Volume {
            pool,
            name,
            object: rec.object,
            volblocksize: rec.volblocksize,
            live,
            headroom: Mutex::new((Instant::now(), h)),
        })
    }

    /// The volume's size now (`set volsize` changes it for every handle).
    pub fn size(&self) -> u64 {
        read_live(&self.live).volsize
    }
    pub fn block_size(&self) -> u64 {
        self.volblocksize
    }
    /// Whether the volume refuses writes now (`set readonly` changes it for every handle).
    pub fn readonly(&self) -> bool {
        read_live(&self.live).readonly
    }
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The live state, checked: `[off, off+len)` lies inside the volume (and it takes writes, for a
    /// change). The guard is held until the request is done with the pool.
    fn check(&self, off: u64, len: u64, change: bool) -> Result<RwLockReadGuard<'_, LiveState>> {
        let st = read_live(&self.live);
        match off.checked_add(len) {
            Some(end) if end <= st.volsize => {}
            _ => {
                return Err(DatasetError::OutOfRange {
                    end: off.saturating_add(len),
                    size: st.volsize,
                })
            }
        }
        if change && st.readonly {
            return Err(DatasetError::ReadOnly);
        }
        Ok(st)
    }

    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let _st = self.check(off, buf.len() as u64, false)?;
        self.pool.read_object(self.object, off, buf)?;
        Ok(())
    }

    fn headroom(&self) -> Result<u64> {
        let mut h = lock(&self.headroom);
        if h.0.elapsed() > Duration::from_secs(1) {
            let reg = load(&self.pool)?;
            *h = (
                Instant::now(),
                reserved_by_others(&self.pool, &reg, Some(&self.name))?,
            );
        }
        Ok(h.1)
    }

    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        let st = self.check(off, data.len() as u64, true)?;
        // Other volumes' unused reservations must stay free; our own covers us.
        let rule = SpaceRule {
            headroom: self.headroom()?,
            reserved: st.reserved,
        };
        match self
            .pool
            .write_object_reserved(self.object, off, data, rule)
        {
            // A volume rewriting its reserved space on a full pool: the new blocks need room before
            // the old ones are freed, so go in pieces, each freeing what the last one replaced.
            Err(PoolError::NoSpace) if rule.reserved && data.len() as u64 > RESERVED_PIECE => {
                let mut at = 0u64;
                for piece in data.chunks(RESERVED_PIECE as usize) {
                    self.pool
                        .write_object_reserved(self.object, off + at, piece, rule)
                        .map_err(DatasetError::from_pool)?;
                    at += piece.len() as u64;
                }
                Ok(())
            }
            r => r.map_err(DatasetError::from_pool),
        }
    }

    /// Free the range (TRIM); partial blocks are zeroed.
    pub fn trim(&self, off: u64, len: u64) -> Result<()> {
        let _st = self.check(off, len, true)?;
        self.pool.free_object_range(self.object, off, len)?;
        Ok(())
    }

    /// Zero the range: whole blocks become holes.
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.trim(off, len)
    }

    /// Make everything written so far durable (commits the pool's open txg).
    pub fn flush(&self) -> Result<()> {
        self.pool.sync()?;
        Ok(())
    }

    /// Allocation of `[off, off+len)`, in order from `off`; it may cover only a prefix of the range
    /// (it stops after `max_blocks` allocated blocks), never less than one extent.
    pub fn map(&self, off: u64, len: u64, max_blocks: usize) -> Result<Vec<Extent>> {
        let _st = self.check(off, len, false)?;
        Ok(self
            .pool
            .object_map(self.object, off, len, max_blocks)?
            .into_iter()
            .map(|(offset, length, allocated)| Extent {
                offset,
                length,
                allocated,
            })
            .collect())
    }
}
