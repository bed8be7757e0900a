//! Block compression: lz4 and zstd per data block, kept only when it pays.
//!
//! A compressed block is stored as a 4-byte little-endian length of the compressed stream, the stream,
//! and zeros up to the next 4096-byte sector (`psize`, what the checksum covers and what scrub and
//! resilver read and copy without decompressing). The block pointer's `compression` byte names the
//! algorithm ([`Compression::code`]); byte 68 keeps the zstd level, for reporting only.
//!
//! Rules:
//! - The compressed form is kept only if it saves at least 1/8 of the block after rounding up to
//!   the sector (OpenZFS's rule); otherwise the block is stored plain (`compression` 0).
//! - lz4 gives up early on incompressible data: a sample of the block is tried first
//!   ([`EARLY_ABORT_SAMPLE`]), so random data costs little more than `off`.
//! - Decompression only ever sees bytes whose checksum verified, into a buffer of exactly the
//!   pointer's `lsize` (at most 128 KiB), and any inconsistency (a length past `psize`, a stream
//!   that does not fill `lsize` exactly, an unknown algorithm) is corruption, never a panic.

use crate::error::{PoolError, Result};
use cairn_vdev::SECTOR;

/// Bytes of the header before the compressed stream.
const HDR: usize = 4;
/// How much of a block lz4 tries first to see whether it compresses at all.
pub const EARLY_ABORT_SAMPLE: usize = 8192;

/// A volume's `compression` property, as stored and as written to block pointers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    Off,
    Lz4,
    /// zstd at a level: 1..=19, or negative for the fast levels.
    Zstd(i8),
}

/// `compression` byte values of a block pointer.
pub const ALG_NONE: u8 = 0;
pub const ALG_LZ4: u8 = 1;
pub const ALG_ZSTD: u8 = 2;

impl Compression {
    /// Parse a property value: off, on (= lz4), lz4, zstd (= zstd-3), zstd-1 .. zstd-19,
    /// zstd-fast (= zstd-fast-1), zstd-fast-1 .. zstd-fast-10.
    pub fn parse(v: &str) -> Option<Compression> {
        Some(match v {
            "off" => Compression::Off,
            "on" | "lz4" => Compression::Lz4,
            "zstd" => Compression::Zstd(3),
            "zstd-fast" => Compression::Zstd(-1),
            _ => {
                if let Some(n) = v.strip_prefix("zstd-fast-") {
                    let n: i8 = n.parse().ok().filter(|n| (1..=10).contains(n))?;
                    Compression::Zstd(-n)
                } else {
                    let n: i8 = v
                        .strip_prefix("zstd-")?
                        .parse()
                        .ok()
                        .filter(|n| (1..=19).contains(n))?;
                    Compression::Zstd(n)
                }
            }
        })
    }

    /// The canonical property value.
    pub fn name(self) -> String {
        match self {
            Compression::Off => "off".into(),
            Compression::Lz4 => "lz4".into(),
            Compression::Zstd(n) if n < 0 => format!("zstd-fast-{}", -n),
            Compression::Zstd(n) => format!("zstd-{n}"),
        }
    }

    /// The block pointer's `compression` byte.
    pub fn code(self) -> u8 {
        match self {
            Compression::Off => ALG_NONE,
            Compression::Lz4 => ALG_LZ4,
            Compression::Zstd(_) => ALG_ZSTD,
        }
    }

    /// Stored in a dnode byte: 0 off, 1 lz4, 2 + (level + 20) for zstd (levels -10..=19).
    pub fn to_byte(self) -> u8 {
        match self {
            Compression::Off => 0,
            Compression::Lz4 => 1,
            Compression::Zstd(n) => (22 + n as i16) as u8,
        }
    }

    /// The inverse of [`Compression::to_byte`]; None for a value no Cairn writes.
    pub fn from_byte(b: u8) -> Option<Compression> {
        match b {
            0 => Some(Compression::Off),
            1 => Some(Compression::Lz4),
            12..=41 => {
                let n = b as i16 - 22;
                (n != 0).then_some(Compression::Zstd(n as i8))
            }
            _ => None,
        }
    }

    /// Compress one block. `Some(stored)` (a multiple of the sector, at most 7/8 of the block) when
    /// the compressed form is to be kept; None to store the block plain.
    pub fn compress(self, data: &[u8]) -> Option<Vec<u8>> {
        if self == Compression::Off || data.len() < 2 * SECTOR as usize {
            return None;
        }
        // At most this many stored bytes (sector-rounded) are worth it.
        let limit = round_down(data.len() - data.len() / 8);
        if limit < SECTOR as usize {
            return None;
        }
        let stream = match self {
            Compression::Off => return None,
            Compression::Lz4 => {
                if data.len() >= 2 * EARLY_ABORT_SAMPLE {
                    let s = &data[..EARLY_ABORT_SAMPLE];
                    let c = lz4_flex::block::compress(s);
                    if c.len() > EARLY_ABORT_SAMPLE - EARLY_ABORT_SAMPLE / 8 {
                        return None;
                    }
                }
                lz4_flex::block::compress(data)
            }
            Compression::Zstd(level) => zstd::bulk::compress(data, level as i32).ok()?,
        };
        let stored = (HDR + stream.len()).div_ceil(SECTOR as usize) * SECTOR as usize;
        if stored > limit {
            return None;
        }
        let mut out = Vec::with_capacity(stored);
        out.extend_from_slice(&(stream.len() as u32).to_le_bytes());
        out.extend_from_slice(&stream);
        out.resize(stored, 0);
        Some(out)
    }
}

fn round_down(n: usize) -> usize {
    n / SECTOR as usize * SECTOR as usize
}

/// The logical contents of a block stored with algorithm `alg` (a block pointer's `compression`),
/// from `stored` (its `psize` bytes, checksum verified) into exactly `lsize` bytes.
pub fn decompress(alg: u8, stored: &[u8], lsize: usize) -> Result<Vec<u8>> {
    let bad = |d: String| PoolError::corrupt("compressed block", d);
    if alg == ALG_NONE {
        return Ok(stored.to_vec());
    }
    if stored.len() < HDR {
        return Err(bad(format!(
            "{} bytes, shorter than its header",
            stored.len()
        )));
    }
    let n = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]) as usize;
    if n > stored.len() - HDR {
        return Err(bad(format!(
            "stream of {n} bytes in a block of {}",
            stored.len()
        )));
    }
    let src = &stored[HDR..HDR + n];
    let mut out = vec![0u8; lsize];
    let got = match alg {
        ALG_LZ4 => {
            lz4_flex::block::decompress_into(src, &mut out).map_err(|e| bad(format!("lz4: {e}")))?
        }
        ALG_ZSTD => zstd::bulk::decompress_to_buffer(src, &mut out[..])
            .map_err(|e| bad(format!("zstd: {e}")))?,
        other => {
            return Err(bad(format!(
                "unknown compression algorithm {other} (a block written by a newer Cairn?)"
            )))
        }
    };
    if got != lsize {
        return Err(bad(format!("decompressed to {got} bytes, not {lsize}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressible(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i / 64 % 7) as u8 + b'a').collect()
    }

    fn random(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn names_round_trip() {
        for v in [
            "off",
            "lz4",
            "zstd-1",
            "zstd-19",
            "zstd-fast-1",
            "zstd-fast-10",
        ] {
            let c = Compression::parse(v).unwrap();
            assert_eq!(c.name(), v);
            assert_eq!(Compression::from_byte(c.to_byte()), Some(c));
        }
        assert_eq!(Compression::parse("on"), Some(Compression::Lz4));
        assert_eq!(Compression::parse("zstd"), Some(Compression::Zstd(3)));
        for v in [
            "",
            "gzip",
            "zstd-0",
            "zstd-20",
            "zstd-fast-0",
            "zstd-fast-11",
            "lz4 ",
        ] {
            assert_eq!(Compression::parse(v), None, "{v:?}");
        }
        assert_eq!(Compression::from_byte(200), None);
    }

    #[test]
    fn every_algorithm_round_trips_and_random_data_stays_plain() {
        let data = compressible(128 * 1024);
        for c in [
            Compression::Lz4,
            Compression::Zstd(1),
            Compression::Zstd(19),
            Compression::Zstd(-5),
        ] {
            let s = c.compress(&data).expect("compressible data compresses");
            assert_eq!(s.len() % SECTOR as usize, 0);
            assert!(s.len() <= data.len() * 7 / 8);
            assert_eq!(decompress(c.code(), &s, data.len()).unwrap(), data);
            assert_eq!(c.compress(&random(128 * 1024)), None, "{c:?}");
        }
        assert_eq!(Compression::Off.compress(&data), None);
    }

    /// Known answer: the stored form of a fixed block (so a change of format is noticed).
    #[test]
    fn known_answer_lz4() {
        let data = vec![7u8; 16384];
        let s = Compression::Lz4.compress(&data).unwrap();
        assert_eq!(s.len(), 4096);
        let n = u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize;
        assert!(n < 100, "a run of one byte compresses to a few bytes: {n}");
        assert!(s[4 + n..].iter().all(|&b| b == 0), "zero padding");
        assert_eq!(decompress(ALG_LZ4, &s, 16384).unwrap(), data);
    }

    /// Any damaged byte of a stored block (as if its checksum had not caught it) is an error or
    /// other bytes, never a panic or an allocation past lsize.
    #[test]
    fn damaged_streams_never_panic() {
        let data = compressible(32 * 1024);
        for c in [Compression::Lz4, Compression::Zstd(3)] {
            let s = c.compress(&data).unwrap();
            for i in 0..s.len().min(600) {
                for v in [0u8, 0xff, s[i] ^ 0x55] {
                    let mut d = s.clone();
                    d[i] = v;
                    if let Ok(out) = decompress(c.code(), &d, data.len()) {
                        assert_eq!(out.len(), data.len());
                    }
                }
            }
        }
        assert!(decompress(9, &[0u8; 4096], 16384).is_err());
        assert!(decompress(ALG_LZ4, &[0xff; 4096], 16384).is_err());
    }
}
