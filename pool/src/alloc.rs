//! Space allocation: one bitmap per top-level vdev, kept in rotating page copies at fixed places.
//!
//! Each top-level vdev's address space is cut into sectors (4 KiB). Its allocation bitmap is split into
//! pages of 4 KiB (a 48-byte header and 32384 bits, covering 126.5 MiB). Every page has `S` slots at the
//! start of the vdev (page p, slot s at byte `(S·p + s) * 4096`; `S` = [`MAP_SLOTS`] in a pool of objset
//! version 2, [`LEGACY_SLOTS`] in version 1); that map region is itself marked allocated. A txg that
//! changes a page writes it over the slot with the oldest copy (never the one holding the last
//! committed version), stamped with the txg, before the uberblock of that txg is written. On open, a
//! page is the valid copy (crc) with the highest txg not newer than the committed uberblock, looked for
//! across all slots and every mirror child, so a torn or uncommitted page write and a stale child never
//! win, and each of the last `S - 1` txgs finds its own copy.
//!
//! Frees: a block freed in txg T is written as free in T's pages (the committed state at T no longer
//! references it) but stays unallocatable (and untrimmed) until txg T + [`defer_txgs`] has committed,
//! so the previous uberblocks stay fully readable; in version 2 a page loaded after a reopen defers
//! again what its older copies still show allocated.
//!
//! Memory: pages are loaded on demand and clean ones evicted; per page only a 4-byte free count is kept,
//! so memory does not grow with the pool's size.

use crate::error::{PoolError, Result};
use cairn_vdev::codec::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};
use cairn_vdev::tree::TopVdev;
use cairn_vdev::{Guid, Txg, VdevError, SECTOR};
use std::collections::{BTreeSet, HashMap};

pub const PAGE_SIZE: usize = 4096;
pub const PAGE_HDR: usize = 48;
pub const BITS_PER_PAGE: u64 = ((PAGE_SIZE - PAGE_HDR) * 8) as u64;
const WORDS: usize = (PAGE_SIZE - PAGE_HDR) / 8;
pub const PAGE_MAGIC: u32 = u32::from_le_bytes(*b"CMAP");
pub const PAGE_VERSION: u16 = 1;
/// Slots per map page of a pool of objset version 2 (on-disk-format.md §7): the last
/// `MAP_SLOTS` versions of every page are kept, so each of the last [`HISTORY_TXGS`] committed txgs
/// finds its own copy of every page even while the next commit overwrites the oldest one.
pub const MAP_SLOTS: u64 = 10;
/// Slots per map page of a pool of objset version 1 (A and B).
pub const LEGACY_SLOTS: u64 = 2;
/// The committed txgs whose state stays openable (rewind) in a version-2 pool: map pages keep a
/// copy of each, and frees are deferred this long, in memory and, after a reopen, rebuilt from the
/// page history.
pub const HISTORY_TXGS: u64 = MAP_SLOTS - 1;
/// Txgs a freed block waits before it can be allocated again in a version-1 pool.
pub const DEFER_TXGS: u64 = 2;

/// Txgs a freed block waits before it can be allocated again, for a map of `slots` slots per page.
pub fn defer_txgs(slots: u64) -> u64 {
    if slots >= MAP_SLOTS {
        HISTORY_TXGS
    } else {
        DEFER_TXGS
    }
}
/// Bytes allocated on one top-level vdev before the rotor moves to the next (dynamic striping).
const ROTOR_CHUNK: u64 = 1 << 20;
/// Clean pages kept in memory per top-level vdev before eviction.
const MAX_CACHED_PAGES: usize = 1024;
const UNKNOWN: u32 = u32::MAX;

struct Page {
    /// Allocation view: a set bit is allocated, or freed but still deferred.
    bits: Vec<u64>,
    /// Zero bits in `bits`.
    free: u64,
    /// Slot holding the last committed version, if any.
    cur_slot: Option<u8>,
    /// The txg of the copy in each slot (0: empty, invalid or newer than the committed txg), to
    /// overwrite the oldest.
    slot_txgs: Vec<Txg>,
    /// Blocks of this page freed in txgs not yet released: (txg, first bit, count).
    deferred: Vec<(Txg, u64, u64)>,
}

impl Page {
    fn get(&self, bit: u64) -> bool {
        self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }
    fn set_range(&mut self, start: u64, n: u64, v: bool) {
        for b in start..start + n {
            let w = &mut self.bits[(b / 64) as usize];
            let m = 1u64 << (b % 64);
            if v {
                *w |= m;
            } else {
                *w &= !m;
            }
        }
    }
    fn count_free(bits: &[u64]) -> u64 {
        bits.iter().map(|w| w.count_zeros() as u64).sum()
    }
    /// First run of `n` zero bits in [from, BITS_PER_PAGE).
    fn find_run(&self, from: u64, n: u64) -> Option<u64> {
        let mut b = from;
        let mut run_start = from;
        let mut run = 0;
        while b < BITS_PER_PAGE {
            let wi = (b / 64) as usize;
            if b.is_multiple_of(64) && self.bits[wi] == u64::MAX {
                run = 0;
                b += 64;
                run_start = b;
                continue;
            }
            if self.get(b) {
                run = 0;
                run_start = b + 1;
            } else {
                run += 1;
                if run == n {
                    return Some(run_start);
                }
            }
            b += 1;
        }
        None
    }

    fn encode(&self, top_guid: Guid, index: u64, txg: Txg) -> Vec<u8> {
        let mut image = self.bits.clone();
        // Deferred frees are already free in the committed state.
        for &(_, start, n) in &self.deferred {
            for b in start..start + n {
                image[(b / 64) as usize] &= !(1 << (b % 64));
            }
        }
        let mut out = vec![0u8; PAGE_SIZE];
        put_u32(&mut out, 0, PAGE_MAGIC);
        put_u16(&mut out, 4, PAGE_VERSION);
        put_u64(&mut out, 8, top_guid.0);
        put_u32(&mut out, 16, index as u32);
        put_u32(&mut out, 20, Page::count_free(&image) as u32);
        put_u64(&mut out, 24, txg.0);
        for (i, &w) in image.iter().enumerate() {
            put_u64(&mut out, PAGE_HDR + i * 8, w);
        }
        let crc = page_crc(&out);
        put_u32(&mut out, 32, crc);
        out
    }
}

/// crc32 of a page with its crc field (bytes 32..36) taken as zero.
fn page_crc(b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..32]);
    h.update(&[0u8; 4]);
    h.update(&b[36..PAGE_SIZE]);
    h.finalize()
}

/// Decode one page copy: (txg, bits) if it is a valid page `index` of top `top_guid`.
fn decode_page(b: &[u8], top_guid: Guid, index: u64) -> Option<(Txg, Vec<u64>)> {
    if b.len() != PAGE_SIZE {
        return None;
    }
    if get_u32(b, 0) != PAGE_MAGIC || get_u16(b, 4) != PAGE_VERSION {
        return None;
    }
    if page_crc(b) != get_u32(b, 32) {
        return None;
    }
    if get_u64(b, 8) != top_guid.0 || get_u32(b, 16) as u64 != index {
        return None;
    }
    let bits = (0..WORDS).map(|i| get_u64(b, PAGE_HDR + i * 8)).collect();
    Some((Txg(get_u64(b, 24)), bits))
}

/// The allocator of one top-level vdev.
pub struct TopAlloc {
    pub id: u32,
    pub guid: Guid,
    nblocks: u64,
    npages: u64,
    /// Slots per page: [`LEGACY_SLOTS`] or [`MAP_SLOTS`].
    slots: u64,
    pages: HashMap<u64, Page>,
    /// Free blocks per page as last seen (UNKNOWN if never loaded).
    page_free: Vec<u32>,
    cursor: u64,
    /// Allocated bytes in the committed-state sense (deferred frees count as free).
    pub alloc_bytes: u64,
    /// Bytes freed but not yet allocatable (deferred).
    deferred_bytes: u64,
    dirty: BTreeSet<u64>,
    /// Blocks were allocated since the pages were last written: the map on the vdev does not record
    /// them yet.
    unsynced_allocs: bool,
}

impl TopAlloc {
    pub fn npages_for(asize: u64) -> u64 {
        (asize / SECTOR).div_ceil(BITS_PER_PAGE)
    }

    /// Bytes at the start of the vdev taken by the map pages of `slots` slots each.
    pub fn map_bytes(asize: u64, slots: u64) -> u64 {
        TopAlloc::npages_for(asize) * slots * PAGE_SIZE as u64
    }

    /// Slots per page.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Sectors of the map region (the first ones of the vdev).
    fn map_blocks(&self) -> u64 {
        self.slots * self.npages
    }

    /// Vdev byte offset of slot `slot` of page `p`.
    fn slot_off(&self, p: u64, slot: u64) -> u64 {
        (self.slots * p + slot) * PAGE_SIZE as u64
    }

    fn new(id: u32, guid: Guid, asize: u64, alloc_bytes: u64, slots: u64) -> TopAlloc {
        let nblocks = asize / SECTOR;
        let npages = TopAlloc::npages_for(asize);
        TopAlloc {
            id,
            guid,
            nblocks,
            npages,
            slots,
            pages: HashMap::new(),
            page_free: vec![UNKNOWN; npages as usize],
            cursor: slots * npages,
            alloc_bytes,
            deferred_bytes: 0,
            dirty: BTreeSet::new(),
            unsynced_allocs: false,
        }
    }

    pub fn asize(&self) -> u64 {
        self.nblocks * SECTOR
    }

    pub fn free_bytes(&self) -> u64 {
        self.asize().saturating_sub(self.alloc_bytes)
    }

    /// The pristine bitmap of page `p`: map region and the blocks past the end allocated, the rest free.
    fn fresh_page(&self, p: u64) -> Page {
        let mut page = Page {
            bits: vec![0u64; WORDS],
            free: 0,
            cur_slot: None,
            slot_txgs: vec![Txg(0); self.slots as usize],
            deferred: Vec::new(),
        };
        let first = p * BITS_PER_PAGE;
        let map_blocks = self.map_blocks();
        for bit in 0..BITS_PER_PAGE {
            let blk = first + bit;
            if blk < map_blocks || blk >= self.nblocks {
                page.bits[(bit / 64) as usize] |= 1 << (bit % 64);
            }
        }
        page.free = Page::count_free(&page.bits);
        page
    }

    /// A new top-level vdev with `slots` slots per page: every page starts fresh and dirty; written
    /// at the next sync.
    pub fn format(id: u32, guid: Guid, asize: u64, slots: u64) -> TopAlloc {
        let mut t = TopAlloc::new(id, guid, asize, TopAlloc::map_bytes(asize, slots), slots);
        for p in 0..t.npages {
            let page = t.fresh_page(p);
            t.page_free[p as usize] = page.free as u32;
            t.pages.insert(p, page);
            t.dirty.insert(p);
        }
        t
    }

    /// An existing top-level vdev, with the allocated bytes recorded in the committed objset.
    pub fn open(id: u32, guid: Guid, asize: u64, alloc_bytes: u64, slots: u64) -> TopAlloc {
        TopAlloc::new(id, guid, asize, alloc_bytes, slots)
    }

    fn load(&mut self, vdev: &TopVdev, p: u64, committed: Txg) -> Result<()> {
        if self.pages.contains_key(&p) {
            return Ok(());
        }
        let mut best: Option<(Txg, u8, Vec<u64>)> = None;
        let mut slot_txgs = vec![Txg(0); self.slots as usize];
        // Valid copies of this page's history (txg ≤ committed), for the deferred frees.
        let mut older: Vec<(Txg, Vec<u64>)> = Vec::new();
        for slot in 0..self.slots {
            let off = self.slot_off(p, slot);
            for copy in vdev.read_copies(off, PAGE_SIZE) {
                if let Some((txg, bits)) = decode_page(&copy, self.guid, p) {
                    if txg > committed {
                        continue;
                    }
                    slot_txgs[slot as usize] = slot_txgs[slot as usize].max(txg);
                    if best.as_ref().is_none_or(|(t, _, _)| txg > *t) {
                        if let Some((bt, _, bb)) = best.take() {
                            older.push((bt, bb));
                        }
                        best = Some((txg, slot as u8, bits));
                    } else {
                        older.push((txg, bits));
                    }
                }
            }
        }
        let Some((best_txg, slot, mut bits)) = best else {
            return Err(PoolError::corrupt(
                format!("allocation map page {p} of vdev {}", self.id),
                "no valid copy",
            ));
        };
        // Blocks free in the newest copy but allocated in the page as one of the states still
        // openable saw it (txgs `committed - defer ..= committed`: the copies of those txgs, and
        // the newest copy older than them) may still be referenced: they stay deferred, as if freed
        // in the newest copy's txg (at or after their real free, so released no earlier).
        let defer = defer_txgs(self.slots);
        let window = Txg(committed.0.saturating_sub(defer));
        older.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
        let before = older.iter().position(|(t, _)| *t < window);
        let mut held = vec![0u64; WORDS];
        for (i, (t, ob)) in older.iter().enumerate() {
            if *t >= best_txg || before.is_some_and(|b| i > b) {
                continue;
            }
            for (h, (o, b)) in held.iter_mut().zip(ob.iter().zip(bits.iter())) {
                *h |= o & !b;
            }
        }
        let mut deferred = Vec::new();
        let mut bit = 0u64;
        while bit < BITS_PER_PAGE {
            let w = held[(bit / 64) as usize];
            if w == 0 && bit.is_multiple_of(64) {
                bit += 64;
                continue;
            }
            if w & (1 << (bit % 64)) == 0 {
                bit += 1;
                continue;
            }
            let start = bit;
            while bit < BITS_PER_PAGE && held[(bit / 64) as usize] & (1 << (bit % 64)) != 0 {
                bit += 1;
            }
            deferred.push((best_txg, start, bit - start));
        }
        for &(_, start, n) in &deferred {
            for b in start..start + n {
                bits[(b / 64) as usize] |= 1 << (b % 64);
            }
            self.deferred_bytes += n * SECTOR;
        }
        let free = Page::count_free(&bits);
        self.page_free[p as usize] = free as u32;
        self.pages.insert(
            p,
            Page {
                bits,
                free,
                cur_slot: Some(slot),
                slot_txgs,
                deferred,
            },
        );
        Ok(())
    }

    fn evict(&mut self) {
        if self.pages.len() <= MAX_CACHED_PAGES {
            return;
        }
        let dirty = &self.dirty;
        self.pages
            .retain(|p, page| dirty.contains(p) || !page.deferred.is_empty());
    }

    /// Allocate `n` contiguous sectors, searching from the cursor (which then moves past the run), or
    /// from sector `from` (the cursor stays); `None` if no run fits.
    fn alloc(
        &mut self,
        vdev: &TopVdev,
        n: u64,
        committed: Txg,
        from: Option<u64>,
    ) -> Result<Option<u64>> {
        if n == 0 || n > BITS_PER_PAGE {
            return Ok(None);
        }
        self.evict();
        let cursor = from.unwrap_or(self.cursor);
        let start_page = (cursor / BITS_PER_PAGE).min(self.npages.saturating_sub(1));
        for i in 0..=self.npages {
            let p = (start_page + i) % self.npages;
            if self.page_free[p as usize] != UNKNOWN && (self.page_free[p as usize] as u64) < n {
                continue;
            }
            if let Err(e) = self.load(vdev, p, committed) {
                tracing::error!("{e}; the page's space is not used");
                self.page_free[p as usize] = 0;
                continue;
            }
            // The first visit starts at the cursor; the last (the same page again) covers all of it.
            let start = if i == 0 && cursor / BITS_PER_PAGE == p {
                cursor % BITS_PER_PAGE
            } else {
                0
            };
            let page = self.pages.get_mut(&p).expect("loaded");
            let found = page.find_run(start, n);
            if let Some(bit) = found {
                page.set_range(bit, n, true);
                page.free -= n;
                self.page_free[p as usize] = page.free as u32;
                self.dirty.insert(p);
                self.unsynced_allocs = true;
                self.alloc_bytes += n * SECTOR;
                let blk = p * BITS_PER_PAGE + bit;
                if from.is_none() {
                    self.cursor = blk + n;
                }
                return Ok(Some(blk));
            }
        }
        Ok(None)
    }

    fn free(&mut self, vdev: &TopVdev, blk: u64, n: u64, txg: Txg, committed: Txg) -> Result<()> {
        if n == 0 || blk.checked_add(n).is_none_or(|e| e > self.nblocks) || blk < self.map_blocks()
        {
            return Err(PoolError::corrupt(
                format!("free on vdev {}", self.id),
                format!("range {blk}+{n} outside the allocatable space"),
            ));
        }
        let p = blk / BITS_PER_PAGE;
        let bit = blk % BITS_PER_PAGE;
        if bit + n > BITS_PER_PAGE {
            return Err(PoolError::corrupt(
                format!("free on vdev {}", self.id),
                format!("range {blk}+{n} crosses a map page"),
            ));
        }
        self.load(vdev, p, committed)?;
        let page = self.pages.get_mut(&p).expect("loaded");
        if (bit..bit + n).any(|b| !page.get(b))
            || page
                .deferred
                .iter()
                .any(|&(_, s, m)| s < bit + n && bit < s + m)
        {
            return Err(PoolError::corrupt(
                format!("free on vdev {}", self.id),
                format!("double free of {blk}+{n}"),
            ));
        }
        page.deferred.push((txg, bit, n));
        self.dirty.insert(p);
        self.alloc_bytes = self.alloc_bytes.saturating_sub(n * SECTOR);
        self.deferred_bytes += n * SECTOR;
        Ok(())
    }

    /// Zero every page copy stamped with a txg newer than `committed`: leftovers of a commit that never
    /// completed. Must run before a session's first commit after an unclean close, or such a copy could
    /// later pass for the newest committed version of its page once the txg number is reused.
    fn invalidate_newer(&mut self, vdev: &TopVdev, committed: Txg) -> Result<u64> {
        let zero = vec![0u8; PAGE_SIZE];
        let mut n = 0;
        for p in 0..self.npages {
            for slot in 0..self.slots {
                let off = self.slot_off(p, slot);
                let stale = vdev
                    .read_copies(off, PAGE_SIZE)
                    .iter()
                    .any(|c| decode_page(c, self.guid, p).is_some_and(|(txg, _)| txg > committed));
                if stale {
                    vdev.write(off, &zero)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Write every page changed in `txg`.
    fn sync(&mut self, vdev: &TopVdev, txg: Txg) -> Result<()> {
        let dirty: Vec<u64> = std::mem::take(&mut self.dirty).into_iter().collect();
        for p in dirty {
            let Some(page) = self.pages.get_mut(&p) else {
                continue;
            };
            // Over the oldest copy (an empty slot first), never the current one.
            let slot = (0..self.slots as usize)
                .filter(|&s| page.cur_slot != Some(s as u8))
                .min_by_key(|&s| (page.slot_txgs[s], s))
                .unwrap_or(0);
            let image = page.encode(self.guid, p, txg);
            let off = (self.slots * p + slot as u64) * PAGE_SIZE as u64;
            vdev.write(off, &image)?;
            page.cur_slot = Some(slot as u8);
            page.slot_txgs[slot] = txg;
        }
        self.unsynced_allocs = false;
        Ok(())
    }

    /// Release frees of txgs up to `upto` for allocation; pushes the released byte ranges (offsets
    /// in the vdev's space, adjacent ones merged) onto `out`.
    fn release(&mut self, upto: Txg, out: &mut Vec<(u64, u64)>) {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (&p, page) in self.pages.iter_mut() {
            let mut released = Vec::new();
            page.deferred.retain(|&(t, s, n)| {
                if t <= upto {
                    released.push((s, n));
                    false
                } else {
                    true
                }
            });
            for (s, n) in released {
                page.set_range(s, n, false);
                page.free += n;
                self.deferred_bytes = self.deferred_bytes.saturating_sub(n * SECTOR);
                ranges.push(((p * BITS_PER_PAGE + s) * SECTOR, n * SECTOR));
            }
            self.page_free[p as usize] = page.free as u32;
        }
        ranges.sort_unstable();
        for (off, len) in ranges {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ => out.push((off, len)),
            }
        }
    }

    /// Free byte ranges within `[from, to)` of the vdev's space (allocated and deferred blocks, and
    /// the map region, excluded), merged.
    fn free_ranges(
        &mut self,
        vdev: &TopVdev,
        from: u64,
        to: u64,
        committed: Txg,
    ) -> Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut blk = (from / SECTOR).max(self.map_blocks());
        let end_blk = (to / SECTOR).min(self.nblocks);
        while blk < end_blk {
            let p = blk / BITS_PER_PAGE;
            self.load(vdev, p, committed)?;
            let page = &self.pages[&p];
            let end = ((p + 1) * BITS_PER_PAGE).min(end_blk);
            while blk < end {
                if !page.get(blk % BITS_PER_PAGE) {
                    let off = blk * SECTOR;
                    match out.last_mut() {
                        Some(last) if last.0 + last.1 == off => last.1 += SECTOR,
                        _ => out.push((off, SECTOR)),
                    }
                }
                blk += 1;
            }
        }
        self.evict();
        Ok(out)
    }
}

/// The pool-wide allocator: one [`TopAlloc`] per top-level vdev and the rotor that spreads blocks.
pub struct Allocator {
    pub tops: Vec<TopAlloc>,
    /// Slots per map page of this pool (every top-level vdev, added ones included).
    slots: u64,
    rotor: usize,
    rotor_bytes: u64,
}

impl Allocator {
    pub fn new(tops: Vec<TopAlloc>, slots: u64) -> Allocator {
        Allocator {
            tops,
            slots,
            rotor: 0,
            rotor_bytes: 0,
        }
    }

    /// Slots per map page ([`LEGACY_SLOTS`] for a version-1 pool, [`MAP_SLOTS`] for version 2).
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Txgs a free waits before its blocks can be allocated (and trimmed) again.
    pub fn defer_txgs(&self) -> u64 {
        defer_txgs(self.slots)
    }

    /// The objset version that records this map layout.
    pub fn objset_version(&self) -> u32 {
        if self.slots >= MAP_SLOTS {
            2
        } else {
            1
        }
    }

    /// The map layout of an objset version; `None` for a version this code does not know.
    pub fn slots_of_version(version: u32) -> Option<u64> {
        match version {
            1 => Some(LEGACY_SLOTS),
            2 => Some(MAP_SLOTS),
            _ => None,
        }
    }

    pub fn alloc_bytes(&self) -> u64 {
        self.tops.iter().map(|t| t.alloc_bytes).sum()
    }

    /// Bytes freed recently that cannot be allocated yet.
    pub fn deferred_bytes(&self) -> u64 {
        self.tops.iter().map(|t| t.deferred_bytes).sum()
    }

    pub fn size(&self) -> u64 {
        self.tops.iter().map(|t| t.asize()).sum()
    }

    /// Allocate `size` bytes on one top-level vdev not in `avoid`, chosen by the rotor and biased toward
    /// emptier vdevs. `usable[i]` says whether vdev i takes writes. Returns (vdev id, byte offset).
    pub fn alloc(
        &mut self,
        vdevs: &[std::sync::Arc<TopVdev>],
        usable: &[bool],
        size: u64,
        avoid: &[u32],
        committed: Txg,
    ) -> Result<Option<(u32, u64)>> {
        let n = size.div_ceil(SECTOR);
        let ntops = self.tops.len();
        let best_frac = self
            .tops
            .iter()
            .enumerate()
            .filter(|(i, _)| usable[*i])
            .map(|(_, t)| t.free_bytes() as f64 / t.asize().max(1) as f64)
            .fold(0.0, f64::max);
        if self.rotor_bytes >= ROTOR_CHUNK {
            self.rotor = (self.rotor + 1) % ntops;
            self.rotor_bytes = 0;
        }
        // Two passes: first honouring the bias, then anything with room.
        for pass in 0..2 {
            for i in 0..ntops {
                let ti = (self.rotor + i) % ntops;
                let t = &self.tops[ti];
                if !usable[ti] || avoid.contains(&t.id) || t.free_bytes() < n * SECTOR {
                    continue;
                }
                let frac = t.free_bytes() as f64 / t.asize().max(1) as f64;
                if pass == 0 && frac < best_frac * 0.5 {
                    continue;
                }
                if let Some(blk) = self.tops[ti].alloc(&vdevs[ti], n, committed, None)? {
                    if ti != self.rotor {
                        self.rotor = ti;
                        self.rotor_bytes = 0;
                    }
                    self.rotor_bytes += n * SECTOR;
                    return Ok(Some((ti as u32, blk * SECTOR)));
                }
            }
        }
        Ok(None)
    }

    /// Allocate `size` bytes on vdev `id` away from a copy already at byte `near`: the search starts an
    /// eighth of the vdev further on (wrapping), so that damage to one region (a few MiB of a disk)
    /// rarely takes two copies of a block. `None` if the vdev does not take writes or is full.
    pub fn alloc_apart(
        &mut self,
        vdevs: &[std::sync::Arc<TopVdev>],
        usable: &[bool],
        size: u64,
        id: u32,
        near: u64,
        committed: Txg,
    ) -> Result<Option<u64>> {
        let n = size.div_ceil(SECTOR);
        let ti = id as usize;
        let Some(t) = self.tops.get_mut(ti) else {
            return Ok(None);
        };
        if !usable.get(ti).copied().unwrap_or(false) || t.free_bytes() < n * SECTOR {
            return Ok(None);
        }
        let first = t.map_blocks();
        let span = t.nblocks.saturating_sub(first).max(1);
        let from = first + ((near / SECTOR).saturating_sub(first) + span / 8) % span;
        Ok(t.alloc(&vdevs[ti], n, committed, Some(from))?
            .map(|blk| blk * SECTOR))
    }

    /// Free `size` bytes at `offset` of vdev `id`, deferred.
    pub fn free(
        &mut self,
        vdevs: &[std::sync::Arc<TopVdev>],
        id: u32,
        offset: u64,
        size: u64,
        txg: Txg,
        committed: Txg,
    ) -> Result<()> {
        let Some(t) = self.tops.get_mut(id as usize) else {
            return Err(PoolError::corrupt("free", format!("no vdev {id}")));
        };
        t.free(
            &vdevs[id as usize],
            offset / SECTOR,
            size.div_ceil(SECTOR),
            txg,
            committed,
        )
    }

    /// Write the changed pages of every top-level vdev that takes I/O. Pages of an unavailable vdev
    /// that only record frees stay dirty in memory until it is back (space freed there stays in use
    /// on disk meanwhile: a leak at worst). But blocks allocated there before it became unavailable
    /// (writes already under way when its devices went) are recorded only in memory: a txg linking
    /// them must not commit, or after a restart the vdev's map would hand their space out again
    /// and the next writes there would overwrite them. The commit fails and the pool suspends
    /// (`pool clear` resumes it from the last txg once the devices are back).
    pub fn sync(&mut self, vdevs: &[std::sync::Arc<TopVdev>], txg: Txg) -> Result<()> {
        for (i, t) in self.tops.iter_mut().enumerate() {
            if vdevs[i].state().usable() {
                t.sync(&vdevs[i], txg)?;
            } else if t.unsynced_allocs {
                return Err(PoolError::Vdev(VdevError::Invalid {
                    path: format!("vdev {}", t.id),
                    reason: format!(
                        "cannot commit txg {txg}: blocks were written to top-level vdev {} \
                         before it became unavailable, and its allocation map cannot be \
                         updated",
                        t.id
                    ),
                }));
            }
        }
        Ok(())
    }

    /// See [`TopAlloc::invalidate_newer`]; returns how many page copies were zeroed.
    pub fn invalidate_newer(
        &mut self,
        vdevs: &[std::sync::Arc<TopVdev>],
        committed: Txg,
    ) -> Result<u64> {
        let mut n = 0;
        for (i, t) in self.tops.iter_mut().enumerate() {
            n += t.invalidate_newer(&vdevs[i], committed)?;
        }
        Ok(n)
    }

    /// Allocated byte ranges of top-level vdev `top` from byte offset `from`, at most `max` ranges
    /// (the map region itself excluded). Freed-but-deferred blocks count as allocated.
    pub fn allocated_ranges(
        &mut self,
        vdevs: &[std::sync::Arc<TopVdev>],
        top: usize,
        from: u64,
        max: usize,
        committed: Txg,
    ) -> Result<Vec<(u64, u64)>> {
        let Some(t) = self.tops.get_mut(top) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        let first_blk = (from / SECTOR).max(t.map_blocks());
        let mut blk = first_blk;
        while blk < t.nblocks && out.len() < max {
            let p = blk / BITS_PER_PAGE;
            t.load(&vdevs[top], p, committed)?;
            let page = &t.pages[&p];
            let end = ((p + 1) * BITS_PER_PAGE).min(t.nblocks);
            while blk < end {
                if page.get(blk % BITS_PER_PAGE) {
                    let off = blk * SECTOR;
                    match out.last_mut() {
                        Some(last) if last.0 + last.1 == off => last.1 += SECTOR,
                        _ => {
                            if out.len() >= max {
                                break;
                            }
                            out.push((off, SECTOR));
                        }
                    }
                }
                blk += 1;
            }
        }
        Ok(out)
    }

    /// Loads every map page of every top-level vdev as of `committed`: fails (Corrupt, naming the
    /// page) if one has no valid copy of that txg or older. An open at an older txg (a rewind) checks
    /// this, since each txg rewrites some pages and only two versions are kept.
    pub fn verify_pages(
        &mut self,
        vdevs: &[std::sync::Arc<TopVdev>],
        committed: Txg,
    ) -> Result<()> {
        for (i, t) in self.tops.iter_mut().enumerate() {
            let Some(v) = vdevs.get(i) else { continue };
            for p in 0..t.npages {
                t.load(v, p, committed)?;
                t.evict();
            }
        }
        Ok(())
    }

    /// Called once `txg` has committed: frees older than DEFER_TXGS become allocatable, but none made
    /// after `oldest_reader` (the committed txg whose block pointers an unlocked reader may still be
    /// following).
    ///
    /// Returns the byte ranges released, per top-level vdev index (what autotrim may punch: no
    /// committed state within the deferral window, nor any reader, references them).
    pub fn txg_done(&mut self, txg: Txg, oldest_reader: Option<Txg>) -> Vec<(usize, u64, u64)> {
        let mut out = Vec::new();
        let defer = self.defer_txgs();
        if txg.0 > defer {
            let mut upto = Txg(txg.0 - defer);
            if let Some(r) = oldest_reader {
                upto = upto.min(r);
            }
            for (i, t) in self.tops.iter_mut().enumerate() {
                let mut r = Vec::new();
                t.release(upto, &mut r);
                out.extend(r.into_iter().map(|(o, l)| (i, o, l)));
            }
        }
        out
    }

    /// Free byte ranges of top-level vdev `top` within `[from, to)` (see `TopAlloc::free_ranges`):
    /// what a manual trim may punch while the caller holds the pool, so nothing allocates them
    /// meanwhile.
    pub fn free_ranges(
        &mut self,
        vdevs: &[std::sync::Arc<TopVdev>],
        top: usize,
        from: u64,
        to: u64,
        committed: Txg,
    ) -> Result<Vec<(u64, u64)>> {
        match self.tops.get_mut(top) {
            Some(t) => t.free_ranges(&vdevs[top], from, to, committed),
            None => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_vdev::config::{LeafConfig, LeafFlags, TopKind};
    use cairn_vdev::identity::LeafIdentity;
    use cairn_vdev::testleaf::MemLeaf;
    use cairn_vdev::tree::LeafVdev;
    use cairn_vdev::Leaf;
    use std::sync::Arc;

    fn vdev(size: u64) -> Arc<TopVdev> {
        let leaf: Arc<dyn Leaf> = Arc::new(MemLeaf::new(size, "m"));
        let lc = LeafConfig {
            guid: Guid(2),
            identity: LeafIdentity::default(),
            size,
            create_txg: Txg(1),
            flags: LeafFlags::default(),
        };
        Arc::new(TopVdev {
            id: 0,
            guid: Guid(1),
            kind: TopKind::Single,
            asize: TopVdev::compute_asize(TopKind::Single, &[size]),
            children: vec![Arc::new(LeafVdev::new(lc, Some(leaf), None))],
            slow_ms: Default::default(),
        })
    }

    // The tests below up to `frees_wait_for_readers_of_older_states` use the version-1 layout (two
    // slots, frees deferred 2 txgs), which old pools keep; the version-2 ones follow them.

    #[test]
    fn copies_on_one_vdev_are_an_eighth_of_it_apart() {
        let v = vdev(600 << 20);
        let vs = vec![v.clone()];
        let mut a = Allocator::new(
            vec![TopAlloc::format(0, Guid(1), v.asize, LEGACY_SLOTS)],
            LEGACY_SLOTS,
        );
        let (_, o1) = a.alloc(&vs, &[true], 16384, &[], Txg(1)).unwrap().unwrap();
        let o2 = a
            .alloc_apart(&vs, &[true], 16384, 0, o1, Txg(1))
            .unwrap()
            .unwrap();
        let o3 = a
            .alloc_apart(&vs, &[true], 16384, 0, o2, Txg(1))
            .unwrap()
            .unwrap();
        let eighth = (v.asize - TopAlloc::map_bytes(v.asize, LEGACY_SLOTS)) / 8;
        assert!(
            o2 >= o1 + eighth - SECTOR && o3 >= o2 + eighth - SECTOR,
            "{o1} {o2} {o3}"
        );
        // The cursor did not follow: the next block goes right after the first.
        let (_, o4) = a.alloc(&vs, &[true], 16384, &[], Txg(1)).unwrap().unwrap();
        assert_eq!(o4, o1 + 16384);
        // Near the end it wraps around to the start of the data area.
        let end = v.asize - 16384;
        let w = a
            .alloc_apart(&vs, &[true], 16384, 0, end, Txg(1))
            .unwrap()
            .unwrap();
        assert!(
            w < end && w >= TopAlloc::map_bytes(v.asize, LEGACY_SLOTS),
            "{w}"
        );
        assert_eq!(
            a.alloc_apart(&vs, &[false], 16384, 0, o1, Txg(1)).unwrap(),
            None
        );
    }

    #[test]
    fn alloc_free_defer_and_reload() {
        let v = vdev(600 << 20);
        let vs = vec![v.clone()];
        let mut a = Allocator::new(
            vec![TopAlloc::format(0, Guid(1), v.asize, LEGACY_SLOTS)],
            LEGACY_SLOTS,
        );
        let base = a.alloc_bytes();
        assert_eq!(base, TopAlloc::map_bytes(v.asize, LEGACY_SLOTS));
        let (_, o1) = a.alloc(&vs, &[true], 16384, &[], Txg(1)).unwrap().unwrap();
        let (_, o2) = a.alloc(&vs, &[true], 16384, &[], Txg(1)).unwrap().unwrap();
        assert_ne!(o1, o2);
        assert!(o1 >= TopAlloc::map_bytes(v.asize, LEGACY_SLOTS));
        a.sync(&vs, Txg(1)).unwrap();
        a.txg_done(Txg(1), None);
        a.free(&vs, 0, o1, 16384, Txg(2), Txg(1)).unwrap();
        assert!(
            a.free(&vs, 0, o1, 16384, Txg(2), Txg(1)).is_err(),
            "double free"
        );
        a.sync(&vs, Txg(2)).unwrap();
        a.txg_done(Txg(2), None);
        // Not reusable before txg 2 + DEFER has committed.
        a.tops[0].cursor = 0;
        let (_, o3) = a.alloc(&vs, &[true], 16384, &[], Txg(2)).unwrap().unwrap();
        assert_ne!(o3, o1);
        a.sync(&vs, Txg(3)).unwrap();
        a.txg_done(Txg(3), None);
        a.sync(&vs, Txg(4)).unwrap();
        a.txg_done(Txg(4), None);
        a.tops[0].cursor = 0;
        let (_, o4) = a.alloc(&vs, &[true], 16384, &[], Txg(4)).unwrap().unwrap();
        assert_eq!(o4, o1);
        // Reload from disk as of txg 3: o1 free (freed at 2), o2 and o3 allocated.
        let alloc3 = a.alloc_bytes() - 16384;
        let mut b = Allocator::new(
            vec![TopAlloc::open(0, Guid(1), v.asize, alloc3, LEGACY_SLOTS)],
            LEGACY_SLOTS,
        );
        b.tops[0].cursor = 0;
        let (_, r) = b.alloc(&vs, &[true], 16384, &[], Txg(3)).unwrap().unwrap();
        assert_eq!(r, o1);
        let (_, r2) = b.alloc(&vs, &[true], 16384, &[], Txg(3)).unwrap().unwrap();
        assert!(r2 != o2 && r2 != o3);
    }

    #[test]
    fn uncommitted_page_write_is_ignored() {
        let v = vdev(200 << 20);
        let vs = vec![v.clone()];
        let mut a = Allocator::new(
            vec![TopAlloc::format(0, Guid(1), v.asize, LEGACY_SLOTS)],
            LEGACY_SLOTS,
        );
        a.sync(&vs, Txg(1)).unwrap();
        let (_, o) = a.alloc(&vs, &[true], 4096, &[], Txg(1)).unwrap().unwrap();
        a.sync(&vs, Txg(2)).unwrap(); // txg 2 never commits
        let mut b = Allocator::new(
            vec![TopAlloc::open(0, Guid(1), v.asize, 0, LEGACY_SLOTS)],
            LEGACY_SLOTS,
        );
        let (_, r) = b.alloc(&vs, &[true], 4096, &[], Txg(1)).unwrap().unwrap();
        assert_eq!(r, o, "the block allocated in the lost txg is free again");
    }

    #[test]
    fn full_vdev_returns_none() {
        let v = vdev(70 << 20);
        let vs = vec![v.clone()];
        let mut a = Allocator::new(
            vec![TopAlloc::format(0, Guid(1), v.asize, LEGACY_SLOTS)],
            LEGACY_SLOTS,
        );
        let mut n = 0u64;
        while a
            .alloc(&vs, &[true], 131072, &[], Txg(1))
            .unwrap()
            .is_some()
        {
            n += 1;
        }
        assert!(n * 131072 > v.asize - (2 << 20));
        assert!(a.alloc_bytes() <= v.asize);
    }

    /// A commit interrupted after writing a page, then a new session that reuses the txg number
    /// without touching that page: the leftover copy must not win at the next open.
    #[test]
    fn leftover_page_of_interrupted_commit_never_wins() {
        let v = vdev(400 << 20);
        let vs = vec![v.clone()];
        let mut a = Allocator::new(
            vec![TopAlloc::format(0, Guid(1), v.asize, LEGACY_SLOTS)],
            LEGACY_SLOTS,
        );
        assert!(a.tops[0].npages >= 3);
        a.tops[0].cursor = 2 * BITS_PER_PAGE;
        let (_, x) = a.alloc(&vs, &[true], 4096, &[], Txg(0)).unwrap().unwrap();
        assert_eq!(x / SECTOR / BITS_PER_PAGE, 2);
        a.sync(&vs, Txg(1)).unwrap();
        a.txg_done(Txg(1), None);
        let committed_alloc = a.alloc_bytes();
        // Txg 2 frees x and writes page 2, but never commits.
        a.free(&vs, 0, x, 4096, Txg(2), Txg(1)).unwrap();
        a.sync(&vs, Txg(2)).unwrap();
        // New session from txg 1: clean up, then commit its own txg 2 touching only page 0.
        let mut b = Allocator::new(
            vec![TopAlloc::open(
                0,
                Guid(1),
                v.asize,
                committed_alloc,
                LEGACY_SLOTS,
            )],
            LEGACY_SLOTS,
        );
        assert_eq!(b.invalidate_newer(&vs, Txg(1)).unwrap(), 1);
        b.tops[0].cursor = 0;
        let (_, y) = b.alloc(&vs, &[true], 4096, &[], Txg(1)).unwrap().unwrap();
        assert_eq!(y / SECTOR / BITS_PER_PAGE, 0);
        b.sync(&vs, Txg(2)).unwrap();
        // Next session from txg 2: x is still in use.
        let mut c = Allocator::new(
            vec![TopAlloc::open(
                0,
                Guid(1),
                v.asize,
                committed_alloc,
                LEGACY_SLOTS,
            )],
            LEGACY_SLOTS,
        );
        c.tops[0].cursor = 2 * BITS_PER_PAGE;
        let (_, z) = c.alloc(&vs, &[true], 4096, &[], Txg(2)).unwrap().unwrap();
        assert_ne!(z, x, "a block of the committed state was handed out again");
    }

    /// A reader following block pointers of committed txg 4 keeps every block freed later.
    #[test]
    fn frees_wait_for_readers_of_older_states() {
        let v = vdev(200 << 20);
        let vs = vec![v.clone()];
        let mut a = Allocator::new(
            vec![TopAlloc::format(0, Guid(1), v.asize, LEGACY_SLOTS)],
            LEGACY_SLOTS,
        );
        let (_, x) = a.alloc(&vs, &[true], 4096, &[], Txg(0)).unwrap().unwrap();
        a.sync(&vs, Txg(4)).unwrap();
        a.free(&vs, 0, x, 4096, Txg(5), Txg(4)).unwrap();
        a.txg_done(Txg(10), Some(Txg(4)));
        a.tops[0].cursor = 0;
        let (_, y) = a.alloc(&vs, &[true], 4096, &[], Txg(10)).unwrap().unwrap();
        assert_ne!(y, x, "reused under a reader");
        a.txg_done(Txg(11), None);
        a.tops[0].cursor = 0;
        let (_, z) = a.alloc(&vs, &[true], 4096, &[], Txg(11)).unwrap().unwrap();
        assert_eq!(z, x);
    }

    /// A version-2 allocator on `v` (opened as of `committed`, or formatted).
    fn v2(v: &TopVdev, alloc: Option<u64>) -> Allocator {
        let t = match alloc {
            Some(a) => TopAlloc::open(0, Guid(1), v.asize, a, MAP_SLOTS),
            None => TopAlloc::format(0, Guid(1), v.asize, MAP_SLOTS),
        };
        Allocator::new(vec![t], MAP_SLOTS)
    }

    #[test]
    fn every_one_of_the_last_txgs_finds_its_own_copy_of_a_page() {
        let v = vdev(200 << 20);
        let mut a = v2(&v, None);
        let vs = [v.clone()];
        // Txg t allocates one block; page 0 is written in every txg.
        let mut blocks = Vec::new();
        for t in 1..=30u64 {
            let b = a.tops[0].alloc(&v, 1, Txg(t - 1), None).unwrap().unwrap();
            blocks.push(b);
            a.sync(&vs, Txg(t)).unwrap();
            a.txg_done(Txg(t), None);
        }
        let alloc_now = a.tops[0].alloc_bytes;
        for back in 0..HISTORY_TXGS {
            let t = 30 - back;
            let mut b = v2(&v, Some(alloc_now));
            b.tops[0].load(&v, 0, Txg(t)).unwrap();
            let page = &b.tops[0].pages[&0];
            // The copy of txg t: the blocks of txgs ≤ t allocated, the later ones free.
            for (i, &blk) in blocks.iter().enumerate() {
                assert_eq!(
                    page.get(blk),
                    (i as u64) < t,
                    "txg {t}, block of txg {}",
                    i + 1
                );
            }
        }
        // Nothing this old is kept.
        let mut b = v2(&v, Some(alloc_now));
        assert!(b.tops[0].load(&v, 0, Txg(30 - MAP_SLOTS)).is_err());
    }

    #[test]
    fn frees_stay_deferred_across_a_reopen() {
        let v = vdev(200 << 20);
        let vs = [v.clone()];
        let mut a = v2(&v, None);
        let x = a.tops[0].alloc(&v, 4, Txg(0), None).unwrap().unwrap();
        a.sync(&vs, Txg(1)).unwrap();
        a.txg_done(Txg(1), None);
        // Txg 2 frees x; txgs 3.. change page 0 (other blocks) without touching x.
        a.free(&vs, 0, x * SECTOR, 4 * SECTOR, Txg(2), Txg(1))
            .unwrap();
        a.sync(&vs, Txg(2)).unwrap();
        a.txg_done(Txg(2), None);
        for t in 3..=5u64 {
            a.tops[0].alloc(&v, 1, Txg(t - 1), None).unwrap().unwrap();
            a.sync(&vs, Txg(t)).unwrap();
            a.txg_done(Txg(t), None);
        }
        // Reopened at txg 5 (a crash right after the free): x is still held for txg 1's state.
        let alloc5 = a.tops[0].alloc_bytes;
        let mut b = v2(&v, Some(alloc5));
        b.tops[0].load(&v, 0, Txg(5)).unwrap();
        assert!(
            b.tops[0].pages[&0].get(x),
            "x must stay deferred after the reopen"
        );
        assert_eq!(b.deferred_bytes(), 4 * SECTOR);
        b.tops[0].cursor = 0;
        let got = b.tops[0].alloc(&v, 4, Txg(5), None).unwrap().unwrap();
        assert_ne!(got, x);
        // Released once txg 1's state is out of the window, and handed to autotrim then.
        let mut released = Vec::new();
        for t in 6..=(5 + HISTORY_TXGS) {
            b.sync(&vs, Txg(t)).unwrap();
            released.extend(b.txg_done(Txg(t), None));
        }
        assert!(
            released
                .iter()
                .any(|&(_, o, l)| o <= x * SECTOR && x * SECTOR < o + l),
            "{released:?}"
        );
        assert_eq!(b.deferred_bytes(), 0);
    }
}
