//! The leaf I/O trait: the one small synchronous interface every block access goes through.
//!
//! Invariants: offsets and lengths are in bytes; `read_at`/`write_at` transfer the whole buffer or fail;
//! `flush` returns only once every write that returned before it is durable (fdatasync); `discard` is
//! advisory (the range may read back as zeros or as the old data). Implementations are `Send + Sync` and
//! take `&self`, so one leaf is shared by many threads with positional I/O.

use std::io;

pub trait Leaf: Send + Sync {
    /// Read exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Read like `read_at`, bypassing any cache where the leaf can (a scan reads data once; caching
    /// it would only push out what applications read again).
    fn read_at_uncached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset)
    }
    /// Write all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Size in bytes, as of open.
    fn size(&self) -> u64;
    /// Release the range (hole punch / discard). Advisory.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The path the leaf was opened by, for messages.
    fn path(&self) -> &str;
    /// Is the device still the one that was opened? `Some(reason)` when it vanished (the path no
    /// longer names the same file or device) or shrank below its size at open.
    fn check(&self) -> Option<String> {
        None
    }
}
