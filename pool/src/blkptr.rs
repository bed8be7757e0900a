//! Block pointers and DVAs: how a parent names and verifies a child block.
//!
//! A block pointer (128 bytes, little-endian) carries up to 3 DVAs (data virtual addresses: top-level
//! vdev, offset and allocated size), the birth txg, logical and physical size, the block's kind and
//! level, and the 256-bit blake3 checksum of the child's bytes. A block pointer with birth txg 0 is a
//! hole: nothing allocated, reads as zeros. Byte table: docs/on-disk-format.md.
//!
//! Invariants: `decode` validates every field that later arithmetic depends on (sizes, alignment,
//! counts); the vdev id of a DVA is checked against the tree at read time.

use crate::error::{PoolError, Result};
use cairn_vdev::codec::{get_u32, get_u64, put_u32, put_u64};
use cairn_vdev::{Txg, SECTOR};

pub const BP_SIZE: usize = 128;
pub const MAX_DVAS: usize = 3;
/// Largest block the pool writes.
pub const MAX_BLOCK: u32 = 128 * 1024;
pub const CKSUM_BLAKE3: u8 = 1;

/// Where one copy of a block lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Dva {
    /// Top-level vdev id.
    pub vdev: u32,
    /// Allocated size in sectors; 0 means "no DVA".
    pub asize_sectors: u32,
    /// Byte offset in the top-level vdev's address space (a multiple of SECTOR).
    pub offset: u64,
}

impl Dva {
    pub fn is_empty(&self) -> bool {
        self.asize_sectors == 0
    }
    pub fn asize(&self) -> u64 {
        self.asize_sectors as u64 * SECTOR
    }
}

/// What a block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockKind {
    Hole = 0,
    Data = 1,
    Indirect = 2,
    Dnodes = 3,
    Objset = 4,
}

impl BlockKind {
    fn from_u8(v: u8) -> Option<BlockKind> {
        Some(match v {
            0 => BlockKind::Hole,
            1 => BlockKind::Data,
            2 => BlockKind::Indirect,
            3 => BlockKind::Dnodes,
            4 => BlockKind::Objset,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockPtr {
    pub dvas: [Dva; MAX_DVAS],
    pub birth: Txg,
    pub lsize: u32,
    pub psize: u32,
    pub kind: BlockKind,
    pub level: u8,
    pub checksum_type: u8,
    pub compression: u8,
    /// The zstd level the block was compressed with (reporting only; 0 otherwise).
    pub comp_level: i8,
    /// Number of non-hole level-0 blocks at or below this pointer.
    pub fill: u64,
    pub checksum: [u8; 32],
}

impl Default for BlockPtr {
    fn default() -> Self {
        BlockPtr::HOLE
    }
}

impl BlockPtr {
    pub const HOLE: BlockPtr = BlockPtr {
        dvas: [Dva {
            vdev: 0,
            asize_sectors: 0,
            offset: 0,
        }; MAX_DVAS],
        birth: Txg(0),
        lsize: 0,
        psize: 0,
        kind: BlockKind::Hole,
        level: 0,
        checksum_type: 0,
        compression: 0,
        comp_level: 0,
        fill: 0,
        checksum: [0; 32],
    };

    pub fn is_hole(&self) -> bool {
        self.birth.0 == 0
    }

    pub fn ndvas(&self) -> usize {
        self.dvas.iter().filter(|d| !d.is_empty()).count()
    }

    /// Total allocated bytes of all copies.
    pub fn asize(&self) -> u64 {
        self.dvas.iter().map(|d| d.asize()).sum()
    }

    pub fn encode_into(&self, b: &mut [u8]) {
        b[..BP_SIZE].fill(0);
        for (i, d) in self.dvas.iter().enumerate() {
            let o = i * 16;
            put_u32(b, o, d.vdev);
            put_u32(b, o + 4, d.asize_sectors);
            put_u64(b, o + 8, d.offset);
        }
        put_u64(b, 48, self.birth.0);
        put_u32(b, 56, self.lsize);
        put_u32(b, 60, self.psize);
        b[64] = self.kind as u8;
        b[65] = self.level;
        b[66] = self.checksum_type;
        b[67] = self.compression;
        b[68] = self.comp_level as u8;
        put_u64(b, 72, self.fill);
        b[80..112].copy_from_slice(&self.checksum);
    }

    pub fn encode(&self) -> [u8; BP_SIZE] {
        let mut b = [0u8; BP_SIZE];
        self.encode_into(&mut b);
        b
    }

    /// Decode and validate. A hole must be all zeros; anything else must be self-consistent.
    pub fn decode(b: &[u8]) -> Result<BlockPtr> {
        if b.len() < BP_SIZE {
            return Err(PoolError::corrupt("block pointer", "short"));
        }
        let birth = Txg(get_u64(b, 48));
        if birth.0 == 0 {
            if b[..BP_SIZE].iter().any(|&x| x != 0) {
                return Err(PoolError::corrupt(
                    "block pointer",
                    "hole with nonzero fields",
                ));
            }
            return Ok(BlockPtr::HOLE);
        }
        let mut dvas = [Dva::default(); MAX_DVAS];
        for (i, d) in dvas.iter_mut().enumerate() {
            let o = i * 16;
            *d = Dva {
                vdev: get_u32(b, o),
                asize_sectors: get_u32(b, o + 4),
                offset: get_u64(b, o + 8),
            };
        }
        let bp = BlockPtr {
            dvas,
            birth,
            lsize: get_u32(b, 56),
            psize: get_u32(b, 60),
            kind: BlockKind::from_u8(b[64])
                .ok_or_else(|| PoolError::corrupt("block pointer", format!("kind {}", b[64])))?,
            level: b[65],
            checksum_type: b[66],
            compression: b[67],
            comp_level: b[68] as i8,
            fill: get_u64(b, 72),
            checksum: {
                let mut c = [0u8; 32];
                c.copy_from_slice(&b[80..112]);
                c
            },
        };
        bp.validate()?;
        Ok(bp)
    }

    fn validate(&self) -> Result<()> {
        let bad = |d: String| Err(PoolError::corrupt("block pointer", d));
        if self.kind == BlockKind::Hole {
            return bad("non-hole pointer of kind hole".into());
        }
        if self.checksum_type != CKSUM_BLAKE3 {
            return bad(format!("unknown checksum type {}", self.checksum_type));
        }
        match self.compression {
            crate::compress::ALG_NONE => {}
            crate::compress::ALG_LZ4 | crate::compress::ALG_ZSTD => {
                // Only data blocks are compressed, stored in whole sectors, smaller than they are.
                if self.kind != BlockKind::Data
                    || self.level != 0
                    || !(self.psize as u64).is_multiple_of(SECTOR)
                    || self.psize >= self.lsize
                {
                    return bad(format!(
                        "compressed {:?} block at level {} with lsize={} psize={}",
                        self.kind, self.level, self.lsize, self.psize
                    ));
                }
            }
            other => {
                return bad(format!(
                    "unknown compression algorithm {other} (a block written by a newer Cairn?)"
                ))
            }
        }
        if self.lsize == 0 || self.lsize > MAX_BLOCK || self.psize == 0 || self.psize > self.lsize {
            return bad(format!("sizes lsize={} psize={}", self.lsize, self.psize));
        }
        if self.level as usize >= crate::object::MAX_LEVELS {
            return bad(format!("level {}", self.level));
        }
        if self.dvas[0].is_empty() {
            return bad("no DVA".into());
        }
        for d in self.dvas.iter().filter(|d| !d.is_empty()) {
            if d.offset % SECTOR != 0
                || d.asize() < self.psize as u64
                || d.asize() > 2 * MAX_BLOCK as u64
            {
                return bad(format!("DVA {}:{}:{}", d.vdev, d.offset, d.asize()));
            }
        }
        Ok(())
    }
}

/// The checksum Cairn stores for a block's bytes.
pub fn checksum(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BlockPtr {
        BlockPtr {
            dvas: [
                Dva {
                    vdev: 1,
                    asize_sectors: 4,
                    offset: 8192,
                },
                Dva::default(),
                Dva::default(),
            ],
            comp_level: 0,
            birth: Txg(9),
            lsize: 16384,
            psize: 16384,
            kind: BlockKind::Data,
            level: 0,
            checksum_type: CKSUM_BLAKE3,
            compression: 0,
            fill: 1,
            checksum: checksum(b"x"),
        }
    }

    #[test]
    fn roundtrip() {
        let bp = sample();
        assert_eq!(BlockPtr::decode(&bp.encode()).unwrap(), bp);
        assert!(BlockPtr::decode(&[0u8; BP_SIZE]).unwrap().is_hole());
    }

    #[test]
    fn bad_fields_rejected() {
        let mut b = sample().encode();
        b[4] = 0; // asize 0 on first DVA -> no DVA
        b[5] = 0;
        assert!(BlockPtr::decode(&b).is_err());
        let mut b = sample().encode();
        b[8] = 1; // unaligned offset
        assert!(BlockPtr::decode(&b).is_err());
        let mut b = sample().encode();
        b[66] = 9;
        assert!(BlockPtr::decode(&b).is_err());
        let mut b = sample().encode();
        b[58] = 0x10; // lsize huge
        assert!(BlockPtr::decode(&b).is_err());
    }
}
