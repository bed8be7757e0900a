//! Fixed-offset little-endian field access for on-disk structures.
//!
//! Every on-disk structure of Cairn (label headers, uberblocks, block pointers, dnodes, the objset block,
//! allocation map pages) is a byte buffer with integer fields at fixed offsets, all little-endian. These
//! functions are the one place that reads and writes such fields.
//!
//! Contract: the field `b[at..at + size]` must lie inside `b`. Callers check the buffer's length first
//! (decoders reject a short buffer as damaged before reading any field), so these functions index
//! directly and panic if that contract is broken. They convert bytes only: validating the values read is
//! the caller's job.

/// Bytes `at..at + N` of `b` as an array. Panics if they are not all inside `b`.
#[inline]
fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..][..N]);
    a
}

/// The little-endian `u16` at `b[at..at + 2]`.
#[inline]
pub fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(field(b, at))
}

/// The little-endian `u32` at `b[at..at + 4]`.
#[inline]
pub fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(field(b, at))
}

/// The little-endian `u64` at `b[at..at + 8]`.
#[inline]
pub fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(field(b, at))
}

/// Store `v` little-endian at `b[at..at + 2]`.
#[inline]
pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..][..2].copy_from_slice(&v.to_le_bytes());
}

/// Store `v` little-endian at `b[at..at + 4]`.
#[inline]
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..][..4].copy_from_slice(&v.to_le_bytes());
}

/// Store `v` little-endian at `b[at..at + 8]`.
#[inline]
pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..][..8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_order_is_little_endian() {
        let mut b = [0u8; 16];
        put_u16(&mut b, 1, 0x0102);
        assert_eq!(b[..4], [0x00, 0x02, 0x01, 0x00]);
        put_u32(&mut b, 3, 0x0304_0506);
        assert_eq!(b[..8], [0x00, 0x02, 0x01, 0x06, 0x05, 0x04, 0x03, 0x00]);
        let mut b = [0u8; 16];
        put_u64(&mut b, 5, 0x0102_0304_0506_0708);
        assert_eq!(b, [0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0]);
        let b = [0x11u8, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99];
        assert_eq!(get_u16(&b, 0), 0x2211);
        assert_eq!(get_u32(&b, 1), 0x5544_3322);
        assert_eq!(get_u64(&b, 1), 0x9988_7766_5544_3322);
        // The magic constants are defined the same way.
        assert_eq!(get_u64(b"CAIRNLBL", 0), crate::label::LABEL_MAGIC);
    }

    #[test]
    fn round_trip_at_every_offset() {
        for at in 0..=24 {
            let mut b = [0xa5u8; 32];
            put_u64(&mut b, at, 0xdead_beef_0bad_f00d);
            assert_eq!(get_u64(&b, at), 0xdead_beef_0bad_f00d);
            // Neighbouring bytes are untouched.
            assert!(b[..at].iter().chain(&b[at + 8..]).all(|&x| x == 0xa5));
            put_u32(&mut b, at, 0x8000_0001);
            assert_eq!(get_u32(&b, at), 0x8000_0001);
            put_u16(&mut b, at, 0xfffe);
            assert_eq!(get_u16(&b, at), 0xfffe);
        }
        let mut b = [0u8; 8];
        for v in [0, 1, u64::MAX, 1 << 63] {
            put_u64(&mut b, 0, v);
            assert_eq!(get_u64(&b, 0), v);
        }
    }

    #[test]
    fn fields_at_the_very_end_fit() {
        let mut b = [0u8; 12];
        put_u64(&mut b, 4, u64::MAX - 1);
        assert_eq!(get_u64(&b, 4), u64::MAX - 1);
        put_u32(&mut b, 8, 7);
        assert_eq!(get_u32(&b, 8), 7);
        put_u16(&mut b, 10, 9);
        assert_eq!(get_u16(&b, 10), 9);
        assert_eq!(b, [0, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff, 7, 0, 9, 0]);
    }

    #[test]
    #[should_panic]
    fn out_of_range_panics() {
        let b = [0u8; 7];
        let _ = get_u64(&b, 0);
    }
}
