//! Unit newtypes shared by every layer: GUIDs, transaction group numbers.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A 64-bit globally unique id of a pool, a top-level vdev or a leaf. Never 0 for a real object.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Guid(pub u64);

impl Guid {
    /// A fresh random GUID (never 0).
    pub fn random() -> Guid {
        loop {
            let mut b = [0u8; 8];
            getrandom(&mut b);
            let v = u64::from_le_bytes(b);
            if v != 0 {
                return Guid(v);
            }
        }
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A transaction group number. Txg 0 means "never"; the first committed txg of a pool is 1.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Txg(pub u64);

impl Txg {
    pub fn next(self) -> Txg {
        Txg(self.0 + 1)
    }
}

impl fmt::Display for Txg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Fill `buf` with random bytes from the kernel (getrandom(2)); falls back to time and pid mixing
/// through blake3 if the syscall is unavailable.
pub fn getrandom(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which is valid for writes.
        let r =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if r <= 0 {
            break;
        }
        filled += r as usize;
    }
    if filled < buf.len() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut h = blake3::Hasher::new();
        h.update(&t.to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        let mut out = h.finalize_xof();
        out.fill(&mut buf[filled..]);
    }
}

/// Size of the allocation unit (the "sector" of Cairn): every on-disk offset and size of a block is a
/// multiple of it.
pub const SECTOR: u64 = 4096;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Lock a mutex, taking the data even if a thread panicked while holding it: the state behind Cairn's
/// mutexes stays consistent across a panic (counters, caches, lists), so one panic must not poison the
/// rest of the process.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
