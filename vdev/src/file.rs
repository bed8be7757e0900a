//! The file and block-device leaf: the [`Leaf`] that real pools are built on.
//!
//! A [`FileLeaf`] is one open file descriptor on a regular file or a block device, used only with
//! positional I/O (`pread`/`pwrite`), so one leaf is shared by many threads without a seek position.
//!
//! Invariants:
//! - only regular files and block devices are ever opened (anything else is [`VdevError::Invalid`]),
//!   checked before opening (so a FIFO or a directory is never opened) and again on the open descriptor;
//! - the size is taken once, at open, and every read or write must lie entirely inside it: a read past the
//!   end fails with `UnexpectedEof`, a write past the end with `InvalidInput` (a leaf never grows);
//! - with [`OpenOptions::lock`], the leaf holds an exclusive `flock` for as long as it lives (dropping the
//!   `FileLeaf` closes the descriptor and releases the lock); a second locked open, from this process or
//!   another, gets [`VdevError::Busy`];
//! - `flush` is `fdatasync`; `discard` punches a hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`, which the kernel
//!   also implements for block devices) and is advisory: "unsupported" is success.
//! - Transfers whose offset and length are multiples of [`DIRECT_ALIGN`] may bypass the page cache
//!   through a second descriptor opened `O_DIRECT` on the same open file (via `/proc/self/fd`): all
//!   such writes, scan reads (`read_at_uncached`), and application reads of 256 KiB or more. Smaller
//!   application reads use the page cache, which keeps serving re-reads. A caller's unaligned buffer
//!   goes through a per-thread aligned bounce buffer. Everything else (labels' odd sizes, small unaligned pieces) uses the ordinary
//!   descriptor; the kernel keeps the two coherent (a direct read writes back dirty cached pages of its
//!   range first, a direct write drops them). Where the file system refuses `O_DIRECT` (tmpfs) or
//!   `CAIRN_DIRECT_IO=0` is set, only the ordinary descriptor is used.

use crate::error::VdevError;
use crate::leaf::Leaf;
use std::fs::{File, Metadata, TryLockError};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Offset, length and buffer alignment of a transfer that goes through the `O_DIRECT` descriptor.
pub const DIRECT_ALIGN: usize = 4096;
/// Application reads of at least this size bypass the page cache (see `read_at`).
const LARGE_READ: usize = 256 << 10;
/// Largest piece moved through the bounce buffer at once (bounds its memory per thread).
const BOUNCE_MAX: usize = 1 << 20;

thread_local! {
    static BOUNCE: std::cell::RefCell<AlignedBuf> =
        const { std::cell::RefCell::new(AlignedBuf { v: Vec::new(), skip: 0 }) };
}

/// The smallest bounce buffer a thread keeps.
const BOUNCE_MIN: usize = 64 << 10;

/// Runs `f` on an aligned scratch slice of `len` bytes (`len <= BOUNCE_MAX`) owned by this thread.
/// The buffer grows to the largest transfer the thread has made (in powers of two), so the many
/// threads that only move single blocks keep small ones: at 1 MiB each, the daemon's blocking
/// threads doing 16 KiB read-modify-writes held over 100 MiB.
fn with_bounce<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < len {
            *b = AlignedBuf::zeroed(len.next_power_of_two().clamp(BOUNCE_MIN, BOUNCE_MAX));
        }
        f(&mut b.as_mut_slice()[..len])
    })
}

fn aligned(offset: u64, len: usize) -> bool {
    len > 0 && offset.is_multiple_of(DIRECT_ALIGN as u64) && len.is_multiple_of(DIRECT_ALIGN)
}

/// Bytes of buffers kept on the free list of [`AlignedBuf::take`] (none larger than 1/8 of it).
pub const FREE_KEEP_BYTES: usize = 64 << 20;

/// The free list: (bytes kept, buffers).
static FREE: std::sync::Mutex<(usize, Vec<AlignedBuf>)> = std::sync::Mutex::new((0, Vec::new()));

/// A byte buffer whose contents start on a [`DIRECT_ALIGN`] boundary, so a [`FileLeaf`] moves it
/// without the bounce copy. Made from a plain `Vec` by skipping its first bytes (no `unsafe`).
#[derive(Debug, Default)]
pub struct AlignedBuf {
    v: Vec<u8>,
    skip: usize,
}

impl AlignedBuf {
    /// An empty buffer with room for `cap` bytes (appending up to that keeps the alignment).
    pub fn with_capacity(cap: usize) -> AlignedBuf {
        let mut v: Vec<u8> = Vec::with_capacity(cap + DIRECT_ALIGN);
        let skip = v.as_ptr().align_offset(DIRECT_ALIGN);
        v.resize(skip, 0);
        AlignedBuf { v, skip }
    }

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let mut b = AlignedBuf::with_capacity(len);
        b.v.resize(b.skip + len, 0);
        b
    }

    /// Make the buffer `len` bytes long, reusing its memory when it has room. The contents are
    /// unspecified (old bytes, zeros past the old length): for a caller that overwrites them all.
    pub fn reuse(&mut self, len: usize) {
        if self.skip + len > self.v.capacity() || self.v.capacity() == 0 {
            *self = AlignedBuf::zeroed(len);
        } else {
            self.v.resize(self.skip + len, 0);
        }
    }

    /// A buffer of `len` bytes from the process-wide free list (or a new one): no zeroing and no fresh
    /// pages when one is there. The contents are unspecified, as with [`AlignedBuf::reuse`].
    pub fn take(len: usize) -> AlignedBuf {
        let mut b = {
            let mut f = crate::units::lock(&FREE);
            match f.1.pop() {
                Some(b) => {
                    f.0 -= b.capacity();
                    b
                }
                None => AlignedBuf::default(),
            }
        };
        b.reuse(len);
        b
    }

    /// Give a buffer back to the free list (kept while the list holds under [`FREE_KEEP_BYTES`]).
    pub fn give(self) {
        let cap = self.capacity();
        if cap == 0 || cap > FREE_KEEP_BYTES / 8 {
            return;
        }
        let mut f = crate::units::lock(&FREE);
        if f.0 + cap <= FREE_KEEP_BYTES {
            f.0 += cap;
            f.1.push(self);
        }
    }

    /// Append bytes (past the capacity the buffer grows and may lose its alignment, not its contents).
    pub fn extend_from_slice(&mut self, b: &[u8]) {
        self.v.extend_from_slice(b);
    }

    pub fn len(&self) -> usize {
        self.v.len() - self.skip
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes it can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.v.capacity().saturating_sub(self.skip)
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.v[self.skip..]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.v[self.skip..]
    }
}

/// Is this error the kernel refusing a direct transfer (so the ordinary path should be used)?
fn direct_refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Which aligned transfers always bypass the page cache: (reads, writes). By default writes and
/// uncached (scan) reads do; application reads use the page cache, which serves re-reads as a cache
/// the size of free memory, except large reads (see `read_at`).
/// `CAIRN_DIRECT_IO=0` turns direct I/O off; `all`, `writes`, `reads` and `scan` choose (`scan`:
/// only uncached reads are direct).
fn direct_mode() -> (bool, bool) {
    match std::env::var("CAIRN_DIRECT_IO").as_deref() {
        Ok("all") => (true, true),
        Ok("writes") => (false, true),
        Ok("reads") => (true, false),
        Ok("scan") => (false, false),
        _ => (false, true),
    }
}

/// Opens the same open file again with `O_DIRECT`, or `None` if the file system refuses it.
fn open_direct(file: &File, read_only: bool) -> Option<File> {
    use std::os::fd::AsRawFd;
    if std::env::var("CAIRN_DIRECT_IO").is_ok_and(|v| v == "0") {
        return None;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

const NOT_A_LEAF: &str = "not a regular file or block device";

/// How to open a [`FileLeaf`].
#[derive(Default, Clone, Copy, Debug)]
pub struct OpenOptions {
    /// Open `O_RDONLY` instead of `O_RDWR`; writes and discards then fail.
    pub read_only: bool,
    /// Take an exclusive, non-blocking lock for the life of the leaf ([`VdevError::Busy`] if held).
    pub lock: bool,
}

/// A leaf backed by a regular file or a block device.
#[derive(Debug)]
pub struct FileLeaf {
    file: File,
    /// The same file opened `O_DIRECT`, while the kernel accepts direct transfers on it.
    direct: Option<File>,
    direct_ok: AtomicBool,
    /// Which aligned transfers use `direct` (see [`direct_mode`]); uncached reads always do.
    direct_reads: bool,
    direct_writes: bool,
    path: String,
    size: u64,
    block: bool,
    read_only: bool,
}

/// Which kind of leaf a file type is, or `None` if it cannot be a leaf.
fn leaf_kind(meta: &Metadata) -> Option<bool> {
    let ft = meta.file_type();
    if ft.is_file() {
        Some(false)
    } else if ft.is_block_device() {
        Some(true)
    } else {
        None
    }
}

/// Checks that `[offset, offset + len)` lies inside `size`; `kind` is the error kind otherwise.
fn check_range(offset: u64, len: usize, size: u64, kind: io::ErrorKind) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            kind,
            format!("range {offset}+{len} is past the end of the leaf ({size} bytes)"),
        )),
    }
}

impl FileLeaf {
    /// Opens `path` as a leaf. See [`OpenOptions`].
    ///
    /// Errors: a missing or unreadable path is [`VdevError::Open`] carrying the io error; anything but a
    /// regular file or a block device is [`VdevError::Invalid`]; a lock held elsewhere is
    /// [`VdevError::Busy`].
    pub fn open(path: &Path, opts: OpenOptions) -> Result<FileLeaf, VdevError> {
        let name = path.display().to_string();
        let open_err = |source: io::Error| VdevError::Open {
            path: name.clone(),
            source,
        };
        let invalid = || VdevError::Invalid {
            path: name.clone(),
            reason: NOT_A_LEAF.to_string(),
        };

        // Check the type before opening: opening a FIFO could block and a directory cannot be opened
        // for writing, and both deserve the same clear "wrong type" answer.
        let meta = std::fs::metadata(path).map_err(open_err)?;
        if leaf_kind(&meta).is_none() {
            return Err(invalid());
        }

        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EISDIR) {
                    invalid()
                } else {
                    open_err(e)
                }
            })?;

        // The path may have been replaced between the stat and the open: check the descriptor itself.
        let meta = file.metadata().map_err(open_err)?;
        let block = leaf_kind(&meta).ok_or_else(invalid)?;

        if opts.lock {
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(VdevError::Busy { path: name }),
                Err(TryLockError::Error(e)) => return Err(open_err(e)),
            }
        }

        let size = if block {
            (&file).seek(SeekFrom::End(0)).map_err(open_err)?
        } else {
            meta.len()
        };

        tracing::debug!(path = %name, size, block, read_only = opts.read_only, lock = opts.lock, "opened leaf");
        let direct = open_direct(&file, opts.read_only);
        let (direct_reads, direct_writes) = direct_mode();
        Ok(FileLeaf {
            direct_reads,
            direct_writes,
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
            file,
            path: name,
            size,
            block,
            read_only: opts.read_only,
        })
    }

    /// True if the leaf is a block device (false for a regular file).
    pub fn is_block_device(&self) -> bool {
        self.block
    }

    /// True while aligned transfers bypass the page cache (see the module docs).
    pub fn is_direct(&self) -> bool {
        self.direct_ok.load(Ordering::Relaxed)
    }

    /// The `O_DIRECT` descriptor, if aligned transfers of `len` bytes at `offset` should use it.
    fn direct_for(&self, offset: u64, len: usize) -> Option<&File> {
        if aligned(offset, len) && self.direct_ok.load(Ordering::Relaxed) {
            self.direct.as_ref()
        } else {
            None
        }
    }

    /// A direct transfer was refused: use the ordinary descriptor from now on.
    fn direct_refused(&self, e: &io::Error) {
        tracing::debug!(path = %self.path, "O_DIRECT transfer refused ({e}); using the page cache");
        self.direct_ok.store(false, Ordering::Relaxed);
    }

    fn read_direct(d: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
            return d.read_exact_at(buf, offset);
        }
        for (i, chunk) in buf.chunks_mut(BOUNCE_MAX).enumerate() {
            let at = offset + (i * BOUNCE_MAX) as u64;
            with_bounce(chunk.len(), |b| {
                d.read_exact_at(b, at)?;
                chunk.copy_from_slice(b);
                Ok::<(), io::Error>(())
            })?;
        }
        Ok(())
    }

    fn write_direct(d: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
            return d.write_all_at(buf, offset);
        }
        for (i, chunk) in buf.chunks(BOUNCE_MAX).enumerate() {
            let at = offset + (i * BOUNCE_MAX) as u64;
            with_bounce(chunk.len(), |b| {
                b.copy_from_slice(chunk);
                d.write_all_at(b, at)
            })?;
        }
        Ok(())
    }

    /// True if the leaf was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Creates a new sparse regular file of `size` bytes at `path`. Fails if `path` already exists.
    pub fn create_sparse(path: &Path, size: u64) -> Result<(), VdevError> {
        let open_err = |source: io::Error| VdevError::Open {
            path: path.display().to_string(),
            source,
        };
        // 0600 whatever the umask: a leaf holds every volume's data.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(open_err)?;
        // A file we created and could not size is removed: a failed create leaves nothing behind.
        if let Err(e) = file.set_len(size) {
            drop(file);
            let _ = std::fs::remove_file(path);
            let why = if e.raw_os_error() == Some(libc::EFBIG) {
                "the file system does not allow a file that large".to_string()
            } else {
                e.to_string()
            };
            return Err(open_err(io::Error::new(
                e.kind(),
                format!("cannot create a sparse file of {size} bytes: {why}"),
            )));
        }
        Ok(())
    }

    /// Opens `path` read-only, without locking, and returns its size in bytes (checks a leaf before a pool
    /// is created on it). Same type rules and errors as [`FileLeaf::open`].
    pub fn probe_size(path: &Path) -> Result<u64, VdevError> {
        let leaf = FileLeaf::open(
            path,
            OpenOptions {
                read_only: true,
                lock: false,
            },
        )?;
        Ok(leaf.size)
    }
}

impl Leaf for FileLeaf {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size, io::ErrorKind::UnexpectedEof)?;
        if self.direct_reads {
            return self.read_at_uncached(buf, offset);
        }
        // A large read goes around the page cache, at device speed and without pushing out what
        // small reads cached. (Probing the cache first with RWF_NOWAIT is no good: the probe starts
        // buffered readahead of the very range the direct read then reads again.)
        if buf.len() >= LARGE_READ {
            return self.read_at_uncached(buf, offset);
        }
        self.file.read_exact_at(buf, offset)
    }

    fn read_at_uncached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size, io::ErrorKind::UnexpectedEof)?;
        if let Some(d) = self.direct_for(offset, buf.len()) {
            match Self::read_direct(d, buf, offset) {
                Err(e) if direct_refused(&e) => self.direct_refused(&e),
                r => return r,
            }
        }
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size, io::ErrorKind::InvalidInput)?;
        if let Some(d) = self
            .direct_for(offset, buf.len())
            .filter(|_| self.direct_writes)
        {
            match Self::write_direct(d, buf, offset) {
                Err(e) if direct_refused(&e) => self.direct_refused(&e),
                r => return r,
            }
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // Only the part inside the leaf; discard is advisory, so clipping is not an error.
        if offset >= self.size {
            return Ok(());
        }
        let len = len.min(self.size - offset);
        if len == 0 {
            return Ok(());
        }
        let mode = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
                tracing::trace!(path = %self.path, "discard not supported, ignored");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn path(&self) -> &str {
        &self.path
    }

    fn check(&self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let mine = match self.file.metadata() {
            Ok(m) => m,
            Err(e) => return Some(format!("cannot stat the open device: {e}")),
        };
        let now = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Some("the device was removed".into())
            }
            Err(e) => return Some(format!("cannot stat: {e}")),
        };
        if self.block {
            if now.rdev() != mine.rdev() {
                return Some("the path now names another device".into());
            }
        } else {
            if now.dev() != mine.dev() || now.ino() != mine.ino() {
                return Some("the file was removed or replaced".into());
            }
            if mine.len() < self.size {
                return Some(format!(
                    "the file shrank from {} to {} bytes",
                    self.size,
                    mine.len()
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: OpenOptions = OpenOptions {
        read_only: false,
        lock: false,
    };
    const LOCKED: OpenOptions = OpenOptions {
        read_only: false,
        lock: true,
    };

    #[test]
    fn create_open_roundtrip_flush() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("leaf");
        FileLeaf::create_sparse(&p, 1 << 20).unwrap();
        assert_eq!(FileLeaf::probe_size(&p).unwrap(), 1 << 20);

        let leaf = FileLeaf::open(&p, RW).unwrap();
        assert_eq!(leaf.size(), 1 << 20);
        assert!(!leaf.is_block_device());
        assert_eq!(leaf.path(), p.display().to_string());

        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        leaf.write_at(&data, 4096).unwrap();
        leaf.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        leaf.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);

        // The sparse part reads back as zeros.
        let mut zeros = vec![0xffu8; 4096];
        leaf.read_at(&mut zeros, 0).unwrap();
        assert!(zeros.iter().all(|&b| b == 0));

        // A reopen sees the data.
        drop(leaf);
        let leaf = FileLeaf::open(&p, RW).unwrap();
        let mut back = vec![0u8; data.len()];
        leaf.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn direct_and_buffered_transfers_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leaf");
        FileLeaf::create_sparse(&path, 8 << 20).unwrap();
        let leaf = FileLeaf::open(&path, RW).unwrap();
        // An unaligned buffer (bounced), an aligned one (straight through), a piece larger than the
        // bounce buffer, and an unaligned offset (page cache), all read back alike by both paths.
        let data: Vec<u8> = (0..3 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        leaf.write_at(&data[1..=8192], 4096).unwrap();
        leaf.write_at(&data[..(2 << 20) + 4096], 1 << 20).unwrap();
        leaf.write_at(&data[5..105], 7 << 20).unwrap();
        let plain = std::fs::read(&path).unwrap();
        assert_eq!(&plain[4096..4096 + 8192], &data[1..=8192]);
        assert_eq!(&plain[1 << 20..(3 << 20) + 4096], &data[..(2 << 20) + 4096]);
        assert_eq!(&plain[7 << 20..(7 << 20) + 100], &data[5..105]);
        let mut back = vec![0u8; (2 << 20) + 4096 + 1];
        leaf.read_at(&mut back[1..], 1 << 20).unwrap();
        assert_eq!(&back[1..], &data[..(2 << 20) + 4096]);
        // A buffered write over a range (as `dd` would do) is seen by the next direct read.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[0xEE; 4096], 8192)
            .unwrap();
        let mut page = vec![0u8; 4096];
        leaf.read_at(&mut page, 8192).unwrap();
        assert_eq!(page, vec![0xEE; 4096]);
        leaf.flush().unwrap();
    }

    #[test]
    fn a_thread_bouncing_single_blocks_keeps_a_small_bounce_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leaf");
        FileLeaf::create_sparse(&path, 8 << 20).unwrap();
        let leaf = FileLeaf::open(&path, RW).unwrap();
        let bounce_len = || BOUNCE.with(|b| b.borrow().len());
        std::thread::scope(|s| {
            s.spawn(|| {
                let data = vec![0x5au8; 16385];
                leaf.write_at(&data[1..], 4 << 20).unwrap();
                let mut back = vec![0u8; 16385];
                leaf.read_at_uncached(&mut back[1..], 4 << 20).unwrap();
                assert_eq!(back[1..], data[1..]);
                if leaf.is_direct() {
                    assert_eq!(bounce_len(), BOUNCE_MIN, "16 KiB transfers keep 64 KiB");
                    // A larger transfer grows it, to at most BOUNCE_MAX.
                    let big = vec![0x33u8; (3 << 20) + 1];
                    leaf.write_at(&big[1..], 0).unwrap();
                    assert_eq!(bounce_len(), BOUNCE_MAX);
                }
            });
        });
    }

    #[test]
    fn aligned_buf_is_aligned_and_reusable() {
        let mut b = AlignedBuf::zeroed(10000);
        assert_eq!(b.len(), 10000);
        assert_eq!(b.as_slice().as_ptr().align_offset(DIRECT_ALIGN), 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[0] = 7;
        b.reuse(4096);
        assert_eq!((b.len(), b.as_slice()[0]), (4096, 7));
        b.reuse(1 << 20);
        assert_eq!(b.len(), 1 << 20);
        assert_eq!(b.as_slice().as_ptr().align_offset(DIRECT_ALIGN), 0);
        let mut c = AlignedBuf::with_capacity(8192);
        c.extend_from_slice(&[1; 5000]);
        c.extend_from_slice(&[2; 3192]);
        assert_eq!(c.len(), 8192);
        assert_eq!(c.as_slice().as_ptr().align_offset(DIRECT_ALIGN), 0);
        assert_eq!((c.as_slice()[4999], c.as_slice()[5000]), (1, 2));
        c.give();
        let d = AlignedBuf::take(4096);
        assert_eq!(d.len(), 4096);
        assert_eq!(d.as_slice().as_ptr().align_offset(DIRECT_ALIGN), 0);
    }

    #[test]
    fn create_sparse_refuses_existing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("leaf");
        FileLeaf::create_sparse(&p, 4096).unwrap();
        let err = FileLeaf::create_sparse(&p, 4096).unwrap_err();
        match err {
            VdevError::Open { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::AlreadyExists)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn read_or_write_past_end_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("leaf");
        FileLeaf::create_sparse(&p, 8192).unwrap();
        let leaf = FileLeaf::open(&p, RW).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = leaf.read_at(&mut buf, 8192 - 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = leaf.read_at(&mut buf, u64::MAX - 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(leaf.write_at(&buf, 8192).is_err());
        // The file did not grow.
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 8192);
        // The last full block is fine.
        leaf.read_at(&mut buf, 4096).unwrap();
    }

    #[test]
    fn second_locked_open_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("leaf");
        FileLeaf::create_sparse(&p, 4096).unwrap();
        let first = FileLeaf::open(&p, LOCKED).unwrap();
        match FileLeaf::open(&p, LOCKED) {
            Err(VdevError::Busy { path }) => assert_eq!(path, p.display().to_string()),
            other => panic!("expected Busy, got {other:?}"),
        }
        // An unlocked open (probe) still works.
        assert_eq!(FileLeaf::probe_size(&p).unwrap(), 4096);
        drop(first);
        let _again = FileLeaf::open(&p, LOCKED).unwrap();
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("leaf");
        FileLeaf::create_sparse(&p, 4096).unwrap();
        let leaf = FileLeaf::open(
            &p,
            OpenOptions {
                read_only: true,
                lock: true,
            },
        )
        .unwrap();
        assert!(leaf.is_read_only());
        assert!(leaf.write_at(&[1u8; 512], 0).is_err());
        let mut buf = [0u8; 512];
        leaf.read_at(&mut buf, 0).unwrap();
    }

    #[test]
    fn discard_reads_back_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("leaf");
        FileLeaf::create_sparse(&p, 1 << 20).unwrap();
        let leaf = FileLeaf::open(&p, RW).unwrap();
        let data = vec![0xa5u8; 64 * 1024];
        leaf.write_at(&data, 0).unwrap();
        leaf.flush().unwrap();
        leaf.discard(16384, 32768).unwrap();
        // Discarding past the end is clipped, not an error.
        leaf.discard(1 << 20, 4096).unwrap();
        leaf.discard((1 << 20) - 4096, 1 << 30).unwrap();

        let mut back = vec![0u8; data.len()];
        leaf.read_at(&mut back, 0).unwrap();
        assert!(back[..16384].iter().all(|&b| b == 0xa5));
        assert!(back[49152..].iter().all(|&b| b == 0xa5));
        let punched = &back[16384..49152];
        if punched.iter().all(|&b| b == 0) {
            // Punching is supported here (ext4, tmpfs, xfs, btrfs).
        } else {
            // Discard is advisory: the old data is also allowed.
            assert!(punched.iter().all(|&b| b == 0xa5));
            eprintln!("hole punching not supported on this file system; assertion skipped");
        }
        // The size is unchanged.
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    }

    #[test]
    fn directory_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        for opts in [RW, LOCKED, OpenOptions::default()] {
            match FileLeaf::open(dir.path(), opts) {
                Err(VdevError::Invalid { reason, .. }) => assert_eq!(reason, NOT_A_LEAF),
                other => panic!("expected Invalid, got {other:?}"),
            }
        }
        assert!(matches!(
            FileLeaf::probe_size(dir.path()),
            Err(VdevError::Invalid { .. })
        ));
    }

    #[test]
    fn missing_file_is_open_not_found() {
        let dir = tempfile::tempdir().unwrap();
        match FileLeaf::open(&dir.path().join("nope"), RW) {
            Err(VdevError::Open { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound)
            }
            other => panic!("expected Open(NotFound), got {other:?}"),
        }
    }

    #[test]
    fn fifo_is_invalid_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        if r != 0 {
            eprintln!("mkfifo failed; test skipped");
            return;
        }
        let ro = OpenOptions {
            read_only: true,
            lock: false,
        };
        assert!(matches!(
            FileLeaf::open(&p, ro),
            Err(VdevError::Invalid { .. })
        ));
    }

    #[test]
    fn block_device_if_available() {
        // /dev/loop* or similar may be readable in some environments; only probe, never write.
        for cand in ["/dev/loop0", "/dev/vda", "/dev/sda", "/dev/nvme0n1"] {
            let p = Path::new(cand);
            let ro = OpenOptions {
                read_only: true,
                lock: false,
            };
            if let Ok(leaf) = FileLeaf::open(p, ro) {
                assert!(leaf.is_block_device());
                if leaf.size() >= 512 {
                    let mut buf = [0u8; 512];
                    leaf.read_at(&mut buf, 0).unwrap();
                }
                let mut buf = [0u8; 512];
                assert!(leaf.read_at(&mut buf, leaf.size()).is_err());
                return;
            }
        }
    }
}
