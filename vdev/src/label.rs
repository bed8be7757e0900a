//! Labels and uberblocks: the only structures at fixed places on a leaf.
//!
//! A leaf of size S carries four labels of 256 KiB. With P = S rounded down to 256 KiB:
//! L0 at 0, L1 at 256 KiB, L2 at P - 512 KiB, L3 at P - 256 KiB. The data area is
//! [`DATA_START`, P - 512 KiB): 3.5 MiB of reserved gap follow L1, as in OpenZFS.
//!
//! A label is: a 4 KiB header (magic, version, its own index as verifier, pool/top/leaf GUIDs, config txg,
//! config length and blake3 of the config, crc32 of the header), the bincode-encoded [`PoolConfig`]
//! (up to [`CONFIG_MAX`] bytes) and a ring of [`UB_SLOTS`] uberblock slots of 4 KiB, slot = txg % UB_SLOTS.
//! Byte tables: docs/on-disk-format.md.
//!
//! Invariants: every field is validated before use; a label that fails any check is reported as corrupt,
//! never trusted and never a panic. Writers update labels in the order of [`crate::tree`]'s
//! `sync_labels` (even labels, flush, uberblocks, flush, odd labels, flush) so that a torn update never
//! leaves a leaf without a valid label.

use crate::codec::{get_u32, get_u64, put_u32, put_u64};
use crate::config::{PoolConfig, CONFIG_VERSION};
use crate::error::{Result, VdevError};
use crate::leaf::Leaf;
use crate::units::{Guid, Txg, SECTOR};
use bincode::Options;

pub const LABEL_SIZE: u64 = 256 * 1024;
pub const LABEL_HEADER_SIZE: usize = 4096;
pub const CONFIG_OFFSET: u64 = 4096;
pub const RING_OFFSET: u64 = 128 * 1024;
pub const CONFIG_MAX: usize = (RING_OFFSET - CONFIG_OFFSET) as usize;
pub const UB_SLOT_SIZE: u64 = 4096;
pub const UB_SLOTS: u64 = (LABEL_SIZE - RING_OFFSET) / UB_SLOT_SIZE;
/// Where the data area of every leaf begins.
pub const DATA_START: u64 = 4 * 1024 * 1024;
/// Smallest leaf Cairn accepts.
pub const MIN_LEAF_SIZE: u64 = 64 * 1024 * 1024;

pub const LABEL_MAGIC: u64 = u64::from_le_bytes(*b"CAIRNLBL");
pub const LABEL_VERSION: u32 = 1;
pub const UB_MAGIC: u64 = u64::from_le_bytes(*b"CAIRNUB\0");
pub const UB_VERSION: u32 = 1;
/// Size of the encoded uberblock inside its slot (the rest of the slot is zero).
pub const UB_SIZE: usize = 256;
/// Size of an encoded root block pointer carried opaquely by the uberblock.
pub const ROOT_BP_SIZE: usize = 128;

/// Offsets of the four labels of a leaf of `size` bytes.
pub fn label_offsets(size: u64) -> [u64; 4] {
    let p = size / LABEL_SIZE * LABEL_SIZE;
    [
        0,
        LABEL_SIZE,
        p.saturating_sub(2 * LABEL_SIZE),
        p.saturating_sub(LABEL_SIZE),
    ]
}

/// End of the data area (exclusive) of a leaf of `size` bytes, rounded down to a sector.
pub fn data_end(size: u64) -> u64 {
    let p = size / LABEL_SIZE * LABEL_SIZE;
    p.saturating_sub(2 * LABEL_SIZE) / SECTOR * SECTOR
}

/// Usable data bytes of a leaf of `size` bytes.
pub fn data_size(size: u64) -> u64 {
    data_end(size).saturating_sub(DATA_START)
}

/// The fixed header of one label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelHeader {
    pub index: u32,
    pub pool_guid: Guid,
    pub top_guid: Guid,
    pub leaf_guid: Guid,
    pub config_txg: Txg,
    pub config_len: u32,
    pub config_sum: [u8; 32],
}

// Header byte offsets.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_INDEX: usize = 12;
const H_POOL: usize = 16;
const H_TOP: usize = 24;
const H_LEAF: usize = 32;
const H_CTXG: usize = 40;
const H_CLEN: usize = 48;
const H_CSUM: usize = 56;
const H_CRC: usize = LABEL_HEADER_SIZE - 4;

impl LabelHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; LABEL_HEADER_SIZE];
        put_u64(&mut b, H_MAGIC, LABEL_MAGIC);
        put_u32(&mut b, H_VERSION, LABEL_VERSION);
        put_u32(&mut b, H_INDEX, self.index);
        put_u64(&mut b, H_POOL, self.pool_guid.0);
        put_u64(&mut b, H_TOP, self.top_guid.0);
        put_u64(&mut b, H_LEAF, self.leaf_guid.0);
        put_u64(&mut b, H_CTXG, self.config_txg.0);
        put_u32(&mut b, H_CLEN, self.config_len);
        b[H_CSUM..H_CSUM + 32].copy_from_slice(&self.config_sum);
        let crc = crc32fast::hash(&b[..H_CRC]);
        put_u32(&mut b, H_CRC, crc);
        b
    }

    /// Decode and validate. `Ok(None)`: no label here (no magic). `Err(reason)`: ours but damaged.
    pub fn decode(b: &[u8], expect_index: u32) -> std::result::Result<Option<LabelHeader>, String> {
        if b.len() < LABEL_HEADER_SIZE {
            return Err("short header".into());
        }
        if get_u64(b, H_MAGIC) != LABEL_MAGIC {
            return Ok(None);
        }
        let crc = crc32fast::hash(&b[..H_CRC]);
        if crc != get_u32(b, H_CRC) {
            return Err("header checksum mismatch".into());
        }
        let version = get_u32(b, H_VERSION);
        if version != LABEL_VERSION {
            return Err(format!("unsupported label version {version}"));
        }
        let index = get_u32(b, H_INDEX);
        if index != expect_index {
            return Err(format!("label {expect_index} claims to be label {index}"));
        }
        let config_len = get_u32(b, H_CLEN);
        if config_len == 0 || config_len as usize > CONFIG_MAX {
            return Err(format!("config length {config_len} out of range"));
        }
        let mut config_sum = [0u8; 32];
        config_sum.copy_from_slice(&b[H_CSUM..H_CSUM + 32]);
        Ok(Some(LabelHeader {
            index,
            pool_guid: Guid(get_u64(b, H_POOL)),
            top_guid: Guid(get_u64(b, H_TOP)),
            leaf_guid: Guid(get_u64(b, H_LEAF)),
            config_txg: Txg(get_u64(b, H_CTXG)),
            config_len,
            config_sum,
        }))
    }
}

fn bincode_opts() -> impl bincode::Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(CONFIG_MAX as u64)
}

/// Encode a configuration for a label; fails if it does not fit.
pub fn encode_config(config: &PoolConfig) -> std::result::Result<Vec<u8>, String> {
    let v = bincode_opts()
        .serialize(config)
        .map_err(|e| format!("cannot encode pool config: {e}"))?;
    if v.len() > CONFIG_MAX {
        return Err(format!(
            "pool config is {} bytes, labels hold {}",
            v.len(),
            CONFIG_MAX
        ));
    }
    Ok(v)
}

pub fn decode_config(b: &[u8]) -> std::result::Result<PoolConfig, String> {
    let c: PoolConfig = bincode_opts()
        .deserialize(b)
        .map_err(|e| format!("cannot decode pool config: {e}"))?;
    if c.version != CONFIG_VERSION {
        return Err(format!("unsupported config version {}", c.version));
    }
    c.validate()?;
    Ok(c)
}

/// A label that passed every check.
#[derive(Clone, Debug)]
pub struct Label {
    pub header: LabelHeader,
    pub config: PoolConfig,
}

/// What one label slot of a leaf holds.
#[derive(Clone, Debug)]
pub enum LabelRead {
    /// No label magic: never part of a pool (or wiped).
    Blank,
    Valid(Box<Label>),
    /// Ours but damaged, with the reason.
    Corrupt(String),
}

/// Read and validate label `idx` (0..4) of `leaf`. I/O errors are returned as `Err`; damage is a
/// `LabelRead::Corrupt`.
pub fn read_label(leaf: &dyn Leaf, idx: usize) -> Result<LabelRead> {
    let size = leaf.size();
    if size < MIN_LEAF_SIZE {
        return Ok(LabelRead::Blank);
    }
    let off = label_offsets(size)[idx];
    let mut hb = vec![0u8; LABEL_HEADER_SIZE];
    leaf.read_at(&mut hb, off)
        .map_err(|e| VdevError::io(leaf.path(), "read label", off, e))?;
    let header = match LabelHeader::decode(&hb, idx as u32) {
        Ok(None) => return Ok(LabelRead::Blank),
        Ok(Some(h)) => h,
        Err(e) => return Ok(LabelRead::Corrupt(e)),
    };
    let mut cb = vec![0u8; header.config_len as usize];
    leaf.read_at(&mut cb, off + CONFIG_OFFSET)
        .map_err(|e| VdevError::io(leaf.path(), "read label config", off + CONFIG_OFFSET, e))?;
    if *blake3::hash(&cb).as_bytes() != header.config_sum {
        return Ok(LabelRead::Corrupt("config checksum mismatch".into()));
    }
    let config = match decode_config(&cb) {
        Ok(c) => c,
        Err(e) => return Ok(LabelRead::Corrupt(e)),
    };
    if config.pool_guid != header.pool_guid || config.config_txg != header.config_txg {
        return Ok(LabelRead::Corrupt("header and config disagree".into()));
    }
    match config.find_leaf(header.leaf_guid) {
        Some((ti, _)) if config.tops[ti].guid == header.top_guid => {}
        _ => return Ok(LabelRead::Corrupt("leaf guid not in its own config".into())),
    }
    Ok(LabelRead::Valid(Box::new(Label { header, config })))
}

/// Write the header and config of label `idx`. The caller flushes.
pub fn write_label(
    leaf: &dyn Leaf,
    idx: usize,
    config: &PoolConfig,
    encoded: &[u8],
    leaf_guid: Guid,
    top_guid: Guid,
) -> Result<()> {
    let off = label_offsets(leaf.size())[idx];
    let header = LabelHeader {
        index: idx as u32,
        pool_guid: config.pool_guid,
        top_guid,
        leaf_guid,
        config_txg: config.config_txg,
        config_len: encoded.len() as u32,
        config_sum: *blake3::hash(encoded).as_bytes(),
    };
    // Header and config go out as one write so a label is torn at worst at a sector boundary, which the
    // header crc / config checksum then catch.
    let mut buf = header.encode();
    buf.extend_from_slice(encoded);
    leaf.write_at(&buf, off)
        .map_err(|e| VdevError::io(leaf.path(), "write label", off, e))
}

/// Wipe all four labels (header sector only, enough to make them Blank).
pub fn wipe_labels(leaf: &dyn Leaf) -> Result<()> {
    let zero = vec![0u8; LABEL_HEADER_SIZE];
    for off in label_offsets(leaf.size()) {
        leaf.write_at(&zero, off)
            .map_err(|e| VdevError::io(leaf.path(), "wipe label", off, e))?;
    }
    leaf.flush()
        .map_err(|e| VdevError::io(leaf.path(), "flush", 0, e))
}

/// The commit record of a txg; the newest valid one across all leaves is the pool's current state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uberblock {
    pub txg: Txg,
    /// Seconds since the Unix epoch.
    pub timestamp: u64,
    pub pool_guid: Guid,
    pub guid_sum: u64,
    /// The configuration (by its config_txg) this txg was written under.
    pub config_txg: Txg,
    /// The pool's root block pointer, encoded by the pool crate.
    pub root: [u8; ROOT_BP_SIZE],
    /// `UB_FLAG_CLEAN`: the last commit of a session that closed the pool cleanly.
    pub flags: u32,
}

/// Uberblock flag: written by a clean close (no uncommitted writes of a later txg can exist).
pub const UB_FLAG_CLEAN: u32 = 1;

const U_MAGIC: usize = 0;
const U_VERSION: usize = 8;
const U_FLAGS: usize = 12;
const U_TXG: usize = 16;
const U_TIME: usize = 24;
const U_POOL: usize = 32;
const U_GSUM: usize = 40;
const U_CTXG: usize = 48;
const U_ROOT: usize = 56;
const U_CRC: usize = UB_SIZE - 4;

impl Uberblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; UB_SLOT_SIZE as usize];
        put_u64(&mut b, U_MAGIC, UB_MAGIC);
        put_u32(&mut b, U_VERSION, UB_VERSION);
        put_u32(&mut b, U_FLAGS, self.flags);
        put_u64(&mut b, U_TXG, self.txg.0);
        put_u64(&mut b, U_TIME, self.timestamp);
        put_u64(&mut b, U_POOL, self.pool_guid.0);
        put_u64(&mut b, U_GSUM, self.guid_sum);
        put_u64(&mut b, U_CTXG, self.config_txg.0);
        b[U_ROOT..U_ROOT + ROOT_BP_SIZE].copy_from_slice(&self.root);
        let crc = crc32fast::hash(&b[..U_CRC]);
        put_u32(&mut b, U_CRC, crc);
        b
    }

    /// Decode a slot. `None` for an empty or damaged slot; the ring is redundant by design.
    pub fn decode(b: &[u8]) -> Option<Uberblock> {
        if b.len() < UB_SIZE || get_u64(b, U_MAGIC) != UB_MAGIC {
            return None;
        }
        if crc32fast::hash(&b[..U_CRC]) != get_u32(b, U_CRC) {
            return None;
        }
        if get_u32(b, U_VERSION) != UB_VERSION {
            return None;
        }
        let txg = Txg(get_u64(b, U_TXG));
        if txg.0 == 0 {
            return None;
        }
        let mut root = [0u8; ROOT_BP_SIZE];
        root.copy_from_slice(&b[U_ROOT..U_ROOT + ROOT_BP_SIZE]);
        Some(Uberblock {
            txg,
            timestamp: get_u64(b, U_TIME),
            pool_guid: Guid(get_u64(b, U_POOL)),
            guid_sum: get_u64(b, U_GSUM),
            config_txg: Txg(get_u64(b, U_CTXG)),
            root,
            flags: get_u32(b, U_FLAGS),
        })
    }

    /// The better of two uberblocks: higher txg, then later timestamp.
    pub fn is_newer_than(&self, other: &Uberblock) -> bool {
        (self.txg, self.timestamp) > (other.txg, other.timestamp)
    }
}

/// Write `ub` into its ring slot of label `idx`. The caller flushes.
pub fn write_uberblock(leaf: &dyn Leaf, idx: usize, ub: &Uberblock) -> Result<()> {
    let off = label_offsets(leaf.size())[idx] + RING_OFFSET + (ub.txg.0 % UB_SLOTS) * UB_SLOT_SIZE;
    leaf.write_at(&ub.encode(), off)
        .map_err(|e| VdevError::io(leaf.path(), "write uberblock", off, e))
}

/// Every valid uberblock in the ring of label `idx`.
pub fn read_uberblocks(leaf: &dyn Leaf, idx: usize) -> Result<Vec<Uberblock>> {
    let off = label_offsets(leaf.size())[idx] + RING_OFFSET;
    let mut ring = vec![0u8; (LABEL_SIZE - RING_OFFSET) as usize];
    leaf.read_at(&mut ring, off)
        .map_err(|e| VdevError::io(leaf.path(), "read uberblock ring", off, e))?;
    Ok(ring
        .chunks(UB_SLOT_SIZE as usize)
        .filter_map(Uberblock::decode)
        .collect())
}

/// Everything import needs to know about one leaf.
#[derive(Clone, Debug, Default)]
pub struct LeafScan {
    /// Per label: Blank / Valid / Corrupt, or the I/O error text.
    pub labels: Vec<std::result::Result<LabelRead, String>>,
    /// Valid uberblocks from every readable ring, for this leaf's pool.
    pub uberblocks: Vec<Uberblock>,
}

impl LeafScan {
    pub fn valid_labels(&self) -> impl Iterator<Item = &Label> {
        self.labels.iter().filter_map(|l| match l {
            Ok(LabelRead::Valid(l)) => Some(&**l),
            _ => None,
        })
    }

    /// The valid label with the newest configuration.
    pub fn best_label(&self) -> Option<&Label> {
        self.valid_labels().max_by_key(|l| l.header.config_txg)
    }

    pub fn valid_count(&self) -> usize {
        self.valid_labels().count()
    }

    /// True if some label carries our magic (valid or damaged).
    pub fn has_any_label(&self) -> bool {
        self.labels
            .iter()
            .any(|l| matches!(l, Ok(LabelRead::Valid(_)) | Ok(LabelRead::Corrupt(_))))
    }

    /// The newest uberblock on this leaf.
    /// The newest txg of pool `pool` whose uberblock this leaf holds (0 if none): the last txg it
    /// took part in.
    pub fn newest_txg(&self, pool: Guid) -> Txg {
        self.uberblocks
            .iter()
            .filter(|u| u.pool_guid == pool)
            .map(|u| u.txg)
            .max()
            .unwrap_or(Txg(0))
    }

    pub fn best_uberblock(&self) -> Option<&Uberblock> {
        let mut best: Option<&Uberblock> = None;
        for u in &self.uberblocks {
            if best.is_none_or(|b| u.is_newer_than(b)) {
                best = Some(u);
            }
        }
        best
    }
}

/// Read all four labels and rings of a leaf. Never fails: damage and I/O errors are recorded per label.
pub fn scan_leaf(leaf: &dyn Leaf) -> LeafScan {
    let mut scan = LeafScan::default();
    if leaf.size() < MIN_LEAF_SIZE {
        scan.labels = (0..4).map(|_| Ok(LabelRead::Blank)).collect();
        return scan;
    }
    for idx in 0..4 {
        let r = read_label(leaf, idx).map_err(|e| e.to_string());
        let pool = match &r {
            Ok(LabelRead::Valid(l)) => Some(l.header.pool_guid),
            _ => None,
        };
        scan.labels.push(r);
        if let Some(pool) = pool {
            if let Ok(ubs) = read_uberblocks(leaf, idx) {
                scan.uberblocks
                    .extend(ubs.into_iter().filter(|u| u.pool_guid == pool));
            }
        }
    }
    scan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;
    use crate::identity::LeafIdentity;
    use crate::testleaf::MemLeaf;

    fn config() -> PoolConfig {
        PoolConfig {
            version: CONFIG_VERSION,
            name: "tank".into(),
            pool_guid: Guid(7),
            state: PoolState::Active,
            config_txg: Txg(3),
            host_id: 1,
            hostname: "h".into(),
            tops: vec![TopConfig {
                id: 0,
                guid: Guid(11),
                kind: TopKind::Single,
                asize: 60 << 20,
                create_txg: Txg(1),
                children: vec![LeafConfig {
                    guid: Guid(12),
                    identity: LeafIdentity::default(),
                    size: 64 << 20,
                    create_txg: Txg(1),
                    flags: LeafFlags::default(),
                }],
            }],
        }
    }

    #[test]
    fn offsets_follow_openzfs_layout() {
        let s = 100 * 1024 * 1024 + 12345;
        let o = label_offsets(s);
        let p = s / LABEL_SIZE * LABEL_SIZE;
        assert_eq!(o, [0, LABEL_SIZE, p - 2 * LABEL_SIZE, p - LABEL_SIZE]);
        assert_eq!(data_end(s), p - 2 * LABEL_SIZE);
    }

    #[test]
    fn label_roundtrip_and_three_of_four_destroyed() {
        let leaf = MemLeaf::new(64 << 20, "m");
        let c = config();
        let enc = encode_config(&c).unwrap();
        for i in 0..4 {
            write_label(&leaf, i, &c, &enc, Guid(12), Guid(11)).unwrap();
        }
        let ub = Uberblock {
            txg: Txg(3),
            timestamp: 9,
            pool_guid: Guid(7),
            guid_sum: c.guid_sum(),
            config_txg: Txg(3),
            root: [5u8; ROOT_BP_SIZE],
            flags: UB_FLAG_CLEAN,
        };
        for i in 0..4 {
            write_uberblock(&leaf, i, &ub).unwrap();
        }
        let s = scan_leaf(&leaf);
        assert_eq!(s.valid_count(), 4);
        assert_eq!(s.best_uberblock(), Some(&ub));
        // Destroy three labels with garbage.
        let offs = label_offsets(leaf.size());
        for &off in &offs[..3] {
            leaf.write_at(&vec![0xa5u8; LABEL_SIZE as usize], off)
                .unwrap();
        }
        let s = scan_leaf(&leaf);
        assert_eq!(s.valid_count(), 1);
        assert_eq!(s.best_label().unwrap().config, c);
        assert_eq!(s.best_uberblock(), Some(&ub));
    }

    #[test]
    fn every_header_byte_flip_is_caught() {
        let leaf = MemLeaf::new(64 << 20, "m");
        let c = config();
        let enc = encode_config(&c).unwrap();
        write_label(&leaf, 0, &c, &enc, Guid(12), Guid(11)).unwrap();
        for byte in (0..LABEL_HEADER_SIZE + enc.len()).step_by(7) {
            let mut b = [0u8; 1];
            leaf.read_at(&mut b, byte as u64).unwrap();
            leaf.write_at(&[b[0] ^ 0x40], byte as u64).unwrap();
            match read_label(&leaf, 0).unwrap() {
                LabelRead::Valid(_) => panic!("flip at {byte} not detected"),
                LabelRead::Blank | LabelRead::Corrupt(_) => {}
            }
            leaf.write_at(&b, byte as u64).unwrap();
        }
        assert!(matches!(read_label(&leaf, 0).unwrap(), LabelRead::Valid(_)));
    }

    #[test]
    fn garbage_never_panics() {
        let leaf = MemLeaf::new(64 << 20, "m");
        let mut x: u64 = 0x1234_5678;
        let mut buf = vec![0u8; LABEL_SIZE as usize];
        for round in 0..50 {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            // Keep our magic sometimes so decoding goes deeper.
            if round % 2 == 0 {
                buf[..8].copy_from_slice(&LABEL_MAGIC.to_le_bytes());
            }
            leaf.write_at(&buf, 0).unwrap();
            let _ = scan_leaf(&leaf);
        }
    }

    #[test]
    fn wrong_slot_label_is_rejected() {
        let leaf = MemLeaf::new(64 << 20, "m");
        let c = config();
        let enc = encode_config(&c).unwrap();
        write_label(&leaf, 0, &c, &enc, Guid(12), Guid(11)).unwrap();
        // Copy label 0 into label 1's place: the index verifier must reject it.
        let mut b = vec![0u8; LABEL_SIZE as usize];
        leaf.read_at(&mut b, 0).unwrap();
        leaf.write_at(&b, LABEL_SIZE).unwrap();
        assert!(matches!(
            read_label(&leaf, 1).unwrap(),
            LabelRead::Corrupt(_)
        ));
    }
}
