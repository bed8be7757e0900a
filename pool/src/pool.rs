//! The pool: configuration, the vdev tree, the allocator and the MOS (meta object set), and the txg
//! commit that ties them together.
//!
//! Txg commit ([`Pool::sync`]): write every dirty object (data, indirect blocks, dnodes), allocate and
//! write the objset block, write the changed allocation pages, flush every leaf, then write the
//! uberblock into every label's ring (with a new configuration first in the even and afterwards in the odd
//! labels, when it changed) and flush again. Only then is the txg committed; until then the previous
//! uberblock describes a complete, consistent pool because nothing it references was overwritten.
//!
//! Concurrency: one mutex guards the pool state; a sync thread (see [`Pool::start_sync_thread`]) commits
//! on a timer, and callers commit on demand. A failed commit suspends the pool (every later change is
//! refused) so that no state that could not be made durable is ever acknowledged.

use crate::alloc::{Allocator, TopAlloc};
use crate::blkptr::{BlockKind, BlockPtr, BP_SIZE};
use crate::error::{PoolError, Result};
use crate::object::{
    self, alloc_bp, write_allocated, NewBlock, ObjSet, ObjType, ObjsetPhys, TxgCtx, OBJSET_SIZE,
};
use crate::props;
use bincode::Options;
use cairn_vdev::config::{
    LeafConfig, LeafFlags, PoolConfig, PoolState, TopConfig, TopKind, CONFIG_VERSION,
};
use cairn_vdev::file::{FileLeaf, OpenOptions as LeafOpen};
use cairn_vdev::identity::identify;
use cairn_vdev::label::{self, LabelRead, Uberblock, MIN_LEAF_SIZE};
use cairn_vdev::tree::{LeafVdev, ReadHow, TopVdev, VdevState, VdevTree};
use cairn_vdev::units::{lock, now_secs};
use cairn_vdev::{Guid, Leaf, Txg, VdevError};
use serde::{Deserialize, Serialize};
use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// Default stripe chunk (dm-stripe's usual 64 KiB would split our 128 KiB blocks; 128 KiB keeps them whole).
pub const DEFAULT_STRIPE_CHUNK: u64 = 128 * 1024;
/// Dirty data held in memory before a writer forces a commit.
pub const DIRTY_MAX: u64 = 256 << 20;
/// A txg is committed once this much data has been written in it (blocks written before the commit
/// take no memory, but a longer txg means more to redo after a crash and later space reuse).
pub const TXG_MAX: u64 = 1 << 30;
/// MOS object ids.
const DIR_OBJ: u64 = 1;
pub(crate) const MOS_COPIES: u8 = 2;
const OBJSET_COPIES: u8 = 3;

/// Who is importing: the state directory's host id and name.
#[derive(Clone, Debug, Default)]
pub struct HostInfo {
    pub host_id: u64,
    pub hostname: String,
}

/// A top-level vdev to build.
#[derive(Clone, Debug)]
pub struct TopSpec {
    pub kind: TopKind,
    pub leaves: Vec<PathBuf>,
}

#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Use leaves that carry another (not open) pool's labels.
    pub force: bool,
    /// Create missing leaf files of this size (sparse).
    pub create_size: Option<u64>,
    pub props: Vec<(String, String)>,
    pub host: HostInfo,
}

#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Import: mark the pool active for this host, refresh leaf identities, optionally rename.
    pub import: bool,
    pub new_name: Option<String>,
    pub host: HostInfo,
    /// Which uberblock to open (`import -F`, `-T`).
    pub rewind: crate::rewind::Rewind,
    /// Only look (`import -F -n`): the pool opened writes nothing, even when dropped.
    pub dry_run: bool,
}

/// One entry of `pool history`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HistoryRecord {
    pub time: u64,
    pub host: String,
    pub command: String,
}

/// What `status` shows of one vdev.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VdevStatus {
    pub name: String,
    pub vdev_type: String,
    pub guid: u64,
    pub path: Option<String>,
    pub phys_path: Option<String>,
    pub devid: Option<String>,
    pub state: String,
    pub read_errors: u64,
    pub write_errors: u64,
    pub checksum_errors: u64,
    pub repaired_bytes: u64,
    pub reason: Option<String>,
    /// I/O through this vdev since the pool was opened (iostat).
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Moving average of read latency in microseconds (leaves; 0 if not measured).
    pub read_latency_us: u64,
    /// The same of writes.
    pub write_latency_us: u64,
    /// I/Os slower than `cairn_vdev::tree::SLOW_IO` since the pool was opened (summed above leaves).
    pub slow_ios: u64,
    /// Top-level vdevs: (allocated, size) of their space (`iostat`'s alloc and free).
    pub space: Option<(u64, u64)>,
    /// Txg ranges this leaf lacks (its dirty time log), awaiting resilver.
    pub dtl: Vec<(u64, u64)>,
    pub children: Vec<VdevStatus>,
}

impl VdevStatus {
    /// A vdev made of other vdevs (the root, a mirror, a stripe): no error counters of its own (errors
    /// it could not mask are counted at the pool level), I/O figures summed over its children.
    pub fn interior(
        name: String,
        vdev_type: &str,
        guid: u64,
        state: &str,
        reason: Option<String>,
        children: Vec<VdevStatus>,
    ) -> VdevStatus {
        VdevStatus {
            name,
            vdev_type: vdev_type.into(),
            guid,
            state: state.into(),
            reason,
            reads: children.iter().map(|c| c.reads).sum(),
            writes: children.iter().map(|c| c.writes).sum(),
            read_bytes: children.iter().map(|c| c.read_bytes).sum(),
            write_bytes: children.iter().map(|c| c.write_bytes).sum(),
            slow_ios: children.iter().map(|c| c.slow_ios).sum(),
            children,
            ..VdevStatus::default()
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PoolStatus {
    pub name: String,
    pub pool_guid: u64,
    pub state: String,
    pub txg: u64,
    pub size: u64,
    pub allocated: u64,
    pub free: u64,
    /// Human explanation when not healthy (zpool's `status:` and `action:` lines).
    pub status: Option<String>,
    pub action: Option<String>,
    pub error_count: u64,
    pub root: VdevStatus,
    /// Milliseconds the I/O counters have been counting (since the pool was opened).
    pub counting_ms: u64,
}

pub(crate) struct Inner {
    pub(crate) config: PoolConfig,
    pub(crate) config_dirty: bool,
    pub(crate) tree: VdevTree,
    pub(crate) alloc: Allocator,
    pub(crate) mos: ObjSet,
    pub(crate) root_bp: BlockPtr,
    pub(crate) committed: Txg,
    pub(crate) suspended: Option<String>,
    pub(crate) dir: BTreeMap<String, u64>,
    pub(crate) dir_dirty: bool,
    /// Set by export/destroy/close: the pool takes no more requests.
    pub(crate) closed: Option<&'static str>,
    /// The uberblock the pool was opened from was written by a clean close.
    pub(crate) opened_clean: bool,
    /// Leftover page copies of an interrupted commit have been zeroed (see `Allocator::invalidate_newer`).
    pub(crate) invalidated: bool,
    /// Opened at an older txg than the newest intact one (a rewind): the uberblocks after it are
    /// zeroed before the first commit (`rewind.rs`).
    pub(crate) discard_after: Option<Txg>,
    /// What the rewind of this open discarded.
    pub(crate) rewound: Option<crate::rewind::RewindReport>,
    /// Txgs committed by this session.
    pub(crate) session_commits: u64,
    pub(crate) readers: Readers,
    /// Blocks being written outside the pool lock for the open txg (see `Pool::write_object_reserved`).
    pub(crate) inflight: Arc<InFlight>,
    /// Blocks no copy could serve: (object, block id). Shared with unlocked readers.
    pub(crate) errlog: Arc<Mutex<std::collections::BTreeSet<(u64, u64)>>>,
    /// The uberblock the session opened from, and whether its clean flag has been cleared on disk.
    pub(crate) opened_ub: Option<Uberblock>,
    pub(crate) marked_in_use: bool,
    /// The health blob last written (to write it only when it changed).
    pub(crate) health_written: Vec<u8>,
    /// The unproven-copies blob last written (`health.rs`: leaves a resilver verifies).
    pub(crate) unproven_written: Vec<u8>,
    /// Manual trim progress and the autotrim property (`trim.rs`).
    pub(crate) trim: crate::trim::TrimInner,
    /// Snapshot links and the background free queue (`snapshot.rs`), loaded on first use.
    pub(crate) snaps: Option<crate::snapshot::SnapTable>,
    /// The table changed in the open txg.
    pub(crate) snaps_dirty: bool,
    /// Blocks a commit frees from the background queue at most (`snapshot::FREE_BUDGET`).
    pub(crate) free_budget: usize,
}

/// A write of the open txg that failed on every copy: (object, block id, pointer).
type FailedWrite = (u64, u64, BlockPtr);

/// Level-0 blocks allocated in the open txg whose writes run outside the pool lock. A commit waits
/// until none is in flight (so every block it links in has landed), then takes back the data of writes
/// that failed on every copy, to write them itself. Writers never take the pool lock while counted
/// here, so a commit waiting under the lock cannot deadlock with them.
#[derive(Default)]
pub(crate) struct InFlight {
    /// (writes in flight, failed writes).
    state: Mutex<(usize, Vec<FailedWrite>)>,
    idle: std::sync::Condvar,
}

/// One early write counted in flight until it reports, or until it is dropped: a write whose thread
/// unwinds before reporting (a panic below it) counts as failed on every copy, so the commit writes
/// its blocks itself instead of waiting for it forever with the pool lock held.
pub(crate) struct InFlightWrite {
    inflight: Arc<InFlight>,
    /// The blocks being written, reported failed unless the write says it landed.
    blocks: Vec<FailedWrite>,
    reported: bool,
}

impl InFlightWrite {
    /// The write is over: `landed` (every block on at least one copy) or failed (the commit rewrites).
    fn finish(mut self, landed: bool) {
        let failed = std::mem::take(&mut self.blocks);
        self.inflight
            .finish(if landed { Vec::new() } else { failed });
        self.reported = true;
    }
}

impl Drop for InFlightWrite {
    fn drop(&mut self) {
        if !self.reported {
            tracing::error!(
                "an early write of {} block(s) ended without reporting; the commit writes them",
                self.blocks.len()
            );
            self.inflight.finish(std::mem::take(&mut self.blocks));
        }
    }
}

impl InFlight {
    /// Count a write of `blocks` in flight (see [`InFlightWrite`]).
    fn begin(self: &Arc<Self>, blocks: Vec<FailedWrite>) -> InFlightWrite {
        lock(&self.state).0 += 1;
        InFlightWrite {
            inflight: self.clone(),
            blocks,
            reported: false,
        }
    }

    fn finish(&self, failed: Vec<FailedWrite>) {
        let mut st = lock(&self.state);
        st.0 -= 1;
        st.1.extend(failed);
        if st.0 == 0 {
            self.idle.notify_all();
        }
    }

    /// Wait until no write is in flight.
    fn wait_idle(&self) {
        let mut st = lock(&self.state);
        while st.0 > 0 {
            st = self.idle.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Unlocked readers by the committed txg whose block pointers they follow.
pub(crate) type Readers = Arc<Mutex<BTreeMap<Txg, usize>>>;

/// Registers a reader for its lifetime.
pub(crate) struct ReaderGuard {
    readers: Readers,
    txg: Txg,
}

impl ReaderGuard {
    pub(crate) fn new(readers: &Readers, txg: Txg) -> ReaderGuard {
        *lock(readers).entry(txg).or_insert(0) += 1;
        ReaderGuard {
            readers: readers.clone(),
            txg,
        }
    }
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        let mut r = lock(&self.readers);
        if let Some(n) = r.get_mut(&self.txg) {
            *n -= 1;
            if *n == 0 {
                r.remove(&self.txg);
            }
        }
    }
}

/// An open pool.
pub struct Pool {
    pub(crate) inner: Mutex<Inner>,
    stop_sync: Mutex<bool>,
    /// In-memory state upper layers keep per open pool (see [`Pool::extension`]).
    extensions: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
    /// Which sync thread is the current one: an older one still asleep exits when it wakes.
    sync_gen: std::sync::atomic::AtomicU64,
    /// The background manual trim (`trim.rs`).
    pub(crate) trim_control: crate::trim::TrimControl,
}

pub(crate) fn blob_opts() -> impl bincode::Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(64 << 20)
}

pub(crate) fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Display name of a leaf path (zpool shows the last component).
pub fn leaf_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

/// The display name of a top-level vdev.
pub fn top_name(kind: TopKind, id: u32, first_leaf: &str) -> String {
    match kind {
        TopKind::Single => leaf_name(first_leaf),
        TopKind::Mirror => format!("mirror-{id}"),
        TopKind::Stripe { .. } => format!("stripe-{id}"),
    }
}

/// Open and check the leaves of new top-level vdevs for create/add. Returns the opened leaves per top
/// and warnings.
type Prepared = (Vec<(TopConfig, Vec<Arc<dyn Leaf>>)>, Vec<String>);

fn prepare_tops(
    specs: &[TopSpec],
    first_id: u32,
    existing: &HashSet<String>,
    opts: &CreateOptions,
    txg: Txg,
) -> Result<Prepared> {
    if specs.is_empty() {
        return Err(PoolError::Invalid("missing vdev specification".into()));
    }
    let mut warnings = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    // First pass: everything that can be checked without touching anything.
    for s in specs {
        match s.kind {
            TopKind::Mirror if s.leaves.len() < 2 => {
                return Err(PoolError::Invalid(
                    "mirror requires at least 2 devices".into(),
                ))
            }
            TopKind::Single if s.leaves.len() != 1 => {
                return Err(PoolError::Invalid(
                    "a single vdev has exactly one device".into(),
                ))
            }
            TopKind::Stripe { .. } if s.leaves.is_empty() => {
                return Err(PoolError::Invalid(
                    "stripe requires at least 1 device".into(),
                ))
            }
            _ => {}
        }
        for l in &s.leaves {
            let abs = absolute(l);
            // The same file under two names (symlink, hard link) is the same leaf.
            let key = match std::fs::metadata(&abs) {
                Ok(md) => {
                    use std::os::unix::fs::MetadataExt;
                    if md.file_type().is_file() || md.rdev() == 0 {
                        format!("inode:{}:{}", md.dev(), md.ino())
                    } else {
                        format!("rdev:{}", md.rdev())
                    }
                }
                Err(_) => abs.to_string_lossy().into_owned(),
            };
            let shown = l.display().to_string();
            let canon = std::fs::canonicalize(&abs)
                .unwrap_or_else(|_| abs.clone())
                .to_string_lossy()
                .into_owned();
            if existing.contains(&canon) || existing.contains(&abs.to_string_lossy().into_owned()) {
                return Err(PoolError::InUse(format!(
                    "{shown} is already part of this pool"
                )));
            }
            if let Some(prev) = seen.insert(key, shown.clone()) {
                return Err(PoolError::Invalid(format!(
                    "{shown} is specified more than once (also as {prev})"
                )));
            }
            if !abs.exists() && opts.create_size.is_none() {
                return Err(PoolError::NotFound(format!(
                    "cannot open '{shown}': no such file or directory"
                )));
            }
        }
    }
    if let Some(sz) = opts.create_size {
        if sz < MIN_LEAF_SIZE {
            return Err(PoolError::Invalid(format!(
                "--size {sz} is smaller than the minimum leaf size (64M)"
            )));
        }
    }
    // Second pass: sizes and labels of existing leaves (nothing is created or written yet).
    for s in specs {
        for l in &s.leaves {
            let abs = absolute(l);
            if !abs.exists() {
                continue;
            }
            let shown = l.display().to_string();
            let size = FileLeaf::probe_size(&abs).map_err(|e| match e {
                VdevError::Invalid { reason, .. } => {
                    PoolError::Invalid(format!("cannot use '{shown}': {reason}"))
                }
                e => PoolError::Vdev(e),
            })?;
            if size < MIN_LEAF_SIZE {
                return Err(PoolError::Invalid(format!(
                    "{shown} is too small ({} bytes); the minimum leaf size is 64M",
                    size
                )));
            }
            let dev = FileLeaf::open(
                &abs,
                LeafOpen {
                    read_only: true,
                    lock: false,
                },
            )?;
            let scan = label::scan_leaf(&dev);
            if let Some(lbl) = scan.best_label() {
                let c = &lbl.config;
                if c.state != PoolState::Destroyed && !opts.force {
                    let what = match c.state {
                        PoolState::Active => "active",
                        _ => "exported",
                    };
                    return Err(PoolError::InUse(format!(
                        "{shown} is part of {what} pool '{}' (use -f to override)",
                        c.name
                    )));
                }
            }
        }
    }
    // Create missing files now that every check passed.
    let mut created: Vec<PathBuf> = Vec::new();
    let result = (|| {
        let mut out = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let mut devs: Vec<Arc<dyn Leaf>> = Vec::new();
            let mut children = Vec::new();
            for l in &s.leaves {
                let abs = absolute(l);
                if !abs.exists() {
                    if let Some(sz) = opts.create_size {
                        FileLeaf::create_sparse(&abs, sz)?;
                        created.push(abs.clone());
                    }
                }
                let dev = open_leaf_for_pool(&abs, &l.display().to_string())?;
                let identity = identify(&abs).map_err(|e| {
                    PoolError::Vdev(VdevError::Open {
                        path: abs.display().to_string(),
                        source: e,
                    })
                })?;
                children.push(LeafConfig {
                    guid: Guid::random(),
                    identity,
                    size: dev.size(),
                    create_txg: txg,
                    flags: LeafFlags::default(),
                });
                devs.push(Arc::new(dev) as Arc<dyn Leaf>);
            }
            let sizes: Vec<u64> = devs.iter().map(|d| d.size()).collect();
            let (min, max) = (
                *sizes.iter().min().unwrap_or(&0),
                *sizes.iter().max().unwrap_or(&0),
            );
            if min != max && s.kind == TopKind::Mirror {
                warnings.push(format!(
                    "mirror-{} has leaves of different sizes; it is sized to the smallest ({} bytes)",
                    first_id as usize + i,
                    label::data_size(min)
                ));
            }
            let asize = TopVdev::compute_asize(s.kind, &sizes);
            if asize < (16 << 20) {
                return Err(PoolError::Invalid("vdev is too small".into()));
            }
            out.push((
                TopConfig {
                    id: first_id + i as u32,
                    guid: Guid::random(),
                    kind: s.kind,
                    asize,
                    create_txg: txg,
                    children,
                },
                devs,
            ));
        }
        Ok(out)
    })();
    match result {
        Ok(out) => Ok((out, warnings)),
        Err(e) => {
            for p in created {
                let _ = std::fs::remove_file(p);
            }
            Err(e)
        }
    }
}

/// Open a leaf for a pool: read-write, exclusively locked; a lock held elsewhere means another
/// process has its pool open.
pub(crate) fn open_leaf_for_pool(path: &Path, shown: &str) -> Result<FileLeaf> {
    FileLeaf::open(
        path,
        LeafOpen {
            read_only: false,
            lock: true,
        },
    )
    .map_err(|e| match e {
        VdevError::Busy { .. } => PoolError::InUse(format!(
            "{shown} is in use by another process (its pool is open)"
        )),
        e => PoolError::Vdev(e),
    })
}

/// `pool labelclear`: what the best label of the leaf at `path` says (pool name, pool guid,
/// state), if it has one. Reads only.
pub fn leaf_label(path: &Path) -> Result<Option<(String, Guid, PoolState)>> {
    let dev = FileLeaf::open(
        path,
        LeafOpen {
            read_only: true,
            lock: false,
        },
    )?;
    let scan = label::scan_leaf(&dev);
    Ok(scan
        .best_label()
        .map(|l| (l.config.name.clone(), l.header.pool_guid, l.config.state)))
}

/// `pool labelclear`: zero the four label areas (and their uberblock rings) of the leaf at `path`,
/// and flush. Refused (`InUse`) while a process has its pool open.
pub fn clear_labels(path: &Path) -> Result<()> {
    let dev = open_leaf_for_pool(path, &path.display().to_string())?;
    wipe_label_areas(&dev)?;
    dev.flush()
        .map_err(|e| VdevError::io(dev.path(), "flush", 0, e))?;
    Ok(())
}

/// Zero all four label areas so no stale uberblock of an earlier pool survives.
pub(crate) fn wipe_label_areas(dev: &dyn Leaf) -> Result<()> {
    let zero = vec![0u8; label::LABEL_SIZE as usize];
    for off in label::label_offsets(dev.size()) {
        dev.write_at(&zero, off)
            .map_err(|e| VdevError::io(dev.path(), "wipe label", off, e))?;
    }
    Ok(())
}

impl Pool {
    /// Create a pool. Checks every leaf before changing anything.
    pub fn create(
        name: &str,
        specs: &[TopSpec],
        opts: &CreateOptions,
    ) -> Result<(Pool, Vec<String>)> {
        let mut user_props = BTreeMap::new();
        for (k, v) in &opts.props {
            user_props.insert(k.clone(), props::validate(k, v)?);
        }
        let txg = Txg(1);
        let (tops, warnings) = prepare_tops(specs, 0, &HashSet::new(), opts, txg)?;
        let pool = Pool::create_from(name, tops, user_props, &opts.host)?;
        Ok((pool, warnings))
    }

    /// Create a pool on already-open leaves (for tests and tools: in-memory, crash-simulating or
    /// fault-injecting leaves). No in-use checks are made.
    pub fn create_on(
        name: &str,
        tops: Vec<(TopKind, Vec<Arc<dyn Leaf>>)>,
        host: &HostInfo,
    ) -> Result<Pool> {
        let txg = Txg(1);
        let prepared = tops
            .into_iter()
            .enumerate()
            .map(|(i, (kind, devs))| {
                let sizes: Vec<u64> = devs.iter().map(|d| d.size()).collect();
                let children = devs
                    .iter()
                    .map(|d| LeafConfig {
                        guid: Guid::random(),
                        identity: cairn_vdev::identity::LeafIdentity {
                            path: d.path().to_string(),
                            phys_path: d.path().to_string(),
                            devid: String::new(),
                        },
                        size: d.size(),
                        create_txg: txg,
                        flags: LeafFlags::default(),
                    })
                    .collect();
                (
                    TopConfig {
                        id: i as u32,
                        guid: Guid::random(),
                        kind,
                        asize: TopVdev::compute_asize(kind, &sizes),
                        create_txg: txg,
                        children,
                    },
                    devs,
                )
            })
            .collect();
        Pool::create_from(name, prepared, BTreeMap::new(), host)
    }

    fn create_from(
        name: &str,
        tops: Vec<(TopConfig, Vec<Arc<dyn Leaf>>)>,
        user_props: BTreeMap<String, String>,
        host: &HostInfo,
    ) -> Result<Pool> {
        let txg = Txg(1);
        let config = PoolConfig {
            version: CONFIG_VERSION,
            name: name.to_string(),
            pool_guid: Guid::random(),
            state: PoolState::Active,
            config_txg: txg,
            host_id: host.host_id,
            hostname: host.hostname.clone(),
            tops: tops.iter().map(|(t, _)| t.clone()).collect(),
        };
        config.validate().map_err(PoolError::Invalid)?;
        let mut devmap: HashMap<Guid, Arc<dyn Leaf>> = HashMap::new();
        for (t, devs) in &tops {
            for (lc, d) in t.children.iter().zip(devs) {
                wipe_label_areas(d.as_ref())?;
                devmap.insert(lc.guid, d.clone());
            }
        }
        let tree = VdevTree::build(&config, |lc| (devmap.get(&lc.guid).cloned(), None));
        let alloc = Allocator::new(
            config
                .tops
                .iter()
                .map(|t| TopAlloc::format(t.id, t.guid, t.asize, crate::alloc::MAP_SLOTS))
                .collect(),
            crate::alloc::MAP_SLOTS,
        );
        let pool = Pool {
            inner: Mutex::new(Inner {
                config,
                config_dirty: true,
                tree,
                alloc,
                mos: ObjSet::create(),
                root_bp: BlockPtr::HOLE,
                committed: Txg(0),
                suspended: None,
                dir: BTreeMap::new(),
                dir_dirty: false,
                closed: None,
                opened_clean: true,
                invalidated: false,
                discard_after: None,
                rewound: None,
                session_commits: 0,
                readers: Readers::default(),
                inflight: Arc::default(),
                errlog: Default::default(),
                health_written: Vec::new(),
                unproven_written: Vec::new(),
                trim: crate::trim::TrimInner::new_pool(
                    user_props.get("autotrim").is_none_or(|v| v == "on"),
                ),
                opened_ub: None,
                marked_in_use: false,
                snaps: None,
                snaps_dirty: false,
                free_budget: crate::snapshot::FREE_BUDGET,
            }),
            stop_sync: Mutex::new(false),
            extensions: Mutex::new(HashMap::new()),
            sync_gen: Default::default(),
            trim_control: Default::default(),
        };
        {
            let mut g = pool.lock();
            let inner = &mut *g;
            let vdevs = inner.tree.tops.clone();
            let dir = inner
                .mos
                .create_object(&vdevs, ObjType::Directory, 14, MOS_COPIES)?;
            debug_assert_eq!(dir, DIR_OBJ);
            let p = inner
                .mos
                .create_object(&vdevs, ObjType::Props, 14, MOS_COPIES)?;
            let h = inner
                .mos
                .create_object(&vdevs, ObjType::History, 14, MOS_COPIES)?;
            inner.dir.insert("props".into(), p);
            inner.dir.insert("history".into(), h);
            inner.dir_dirty = true;
            let blob = blob_opts()
                .serialize(&user_props)
                .map_err(|e| PoolError::Invalid(e.to_string()))?;
            write_blob(inner, p, &blob)?;
            inner.apply_slow_io()?;
            inner.sync_txg()?;
        }
        Ok(pool)
    }

    /// Open a pool from the devices at `paths` (those of other pools are ignored).
    pub fn open(paths: &[PathBuf], guid: Guid, opts: &OpenOptions) -> Result<Pool> {
        let mut devs: Vec<(PathBuf, Arc<dyn Leaf>)> = Vec::new();
        let mut busy: Option<String> = None;
        // The same file named twice (a path given twice, or through a symlink) is one device.
        let mut seen: HashSet<PathBuf> = HashSet::new();
        for p in paths {
            if !seen.insert(std::fs::canonicalize(p).unwrap_or_else(|_| absolute(p))) {
                continue;
            }
            let Ok(probe) = FileLeaf::open(
                p,
                LeafOpen {
                    read_only: true,
                    lock: false,
                },
            ) else {
                continue;
            };
            let scan = label::scan_leaf(&probe);
            let Some(best) = scan.best_label() else {
                continue;
            };
            if best.header.pool_guid != guid {
                continue;
            }
            drop(probe);
            match FileLeaf::open(
                p,
                LeafOpen {
                    read_only: false,
                    lock: true,
                },
            ) {
                Ok(dev) => devs.push((p.clone(), Arc::new(dev))),
                Err(VdevError::Busy { path }) => busy = Some(path),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        if let Some(path) = busy {
            return Err(PoolError::InUse(format!(
                "pool is in use by another process ('{path}' is held open)"
            )));
        }
        Pool::open_on(devs, guid, opts)
    }

    /// What opening with `rewind` would discard (`import -F -n`): `None` if it opens the newest
    /// txg. Reads only; nothing is written.
    pub fn rewind_plan(
        paths: &[PathBuf],
        guid: Guid,
        rewind: crate::rewind::Rewind,
    ) -> Result<Option<crate::rewind::RewindReport>> {
        let opts = OpenOptions {
            rewind,
            dry_run: true,
            ..OpenOptions::default()
        };
        let pool = Pool::open(paths, guid, &opts)?;
        let r = pool.rewound();
        Ok(r)
    }

    /// Open a pool from already-open devices (those of other pools are ignored).
    pub fn open_on(
        devs: Vec<(PathBuf, Arc<dyn Leaf>)>,
        guid: Guid,
        opts: &OpenOptions,
    ) -> Result<Pool> {
        let mut found: Vec<Found> = Vec::new();
        for (path, dev) in devs {
            let scan = label::scan_leaf(dev.as_ref());
            let Some(best) = scan.best_label() else {
                continue;
            };
            if best.header.pool_guid != guid {
                continue;
            }
            let leaf_guid = best.header.leaf_guid;
            let txg = scan.newest_txg(guid);
            found.push(Found {
                path,
                dev,
                scan,
                leaf_guid,
                txg,
            });
        }
        if found.is_empty() {
            return Err(PoolError::NotFound(
                "no devices of the pool were found".into(),
            ));
        }
        // The intact uberblocks, newest first: a plain open uses the newest, a rewind an older one
        // (`rewind.rs`).
        let cands =
            crate::rewind::candidates(found.iter().flat_map(|f| f.scan.uberblocks.iter()), guid);
        let name = found
            .iter()
            .find_map(|f| f.scan.best_label().map(|l| l.config.name.clone()))
            .unwrap_or_default();
        let (pool, report) = crate::rewind::open_with(&cands, opts.rewind, &name, |ub, how| {
            Pool::open_at(&found, guid, ub, &cands[0], opts, how)
        })?;
        pool.lock().rewound = report;
        // Only the devices used stay open (a duplicate's lock is let go with `found`).
        drop(found);
        Ok(pool)
    }

    /// Opens the pool at uberblock `ub` from the devices `found` (`newest`: the newest intact one).
    /// A probe only checks that this txg opens cleanly and writes nothing.
    fn open_at(
        found: &[Found],
        guid: Guid,
        ub: &Uberblock,
        newest: &Uberblock,
        opts: &OpenOptions,
        how: crate::rewind::Attempt,
    ) -> Result<Pool> {
        use crate::rewind::Attempt;
        let probe = how == Attempt::Probe || opts.dry_run;
        let ub = ub.clone();
        let labels: Vec<&label::Label> = found.iter().flat_map(|f| f.scan.valid_labels()).collect();
        // The configuration the uberblock was written under; failing that the newest one not newer
        // than the txg; failing that (an export's closing config after a lost uberblock) the newest
        // one with the same set of leaves (the uberblock's guid_sum).
        let config = labels
            .iter()
            .filter(|l| l.header.config_txg == ub.config_txg)
            .map(|l| l.config.clone())
            .next()
            .or_else(|| {
                labels
                    .iter()
                    .filter(|l| l.header.config_txg <= ub.txg)
                    .max_by_key(|l| l.header.config_txg)
                    .map(|l| l.config.clone())
            })
            .or_else(|| {
                labels
                    .iter()
                    .filter(|l| l.config.guid_sum() == ub.guid_sum)
                    .max_by_key(|l| l.header.config_txg)
                    .map(|l| l.config.clone())
            })
            .ok_or_else(|| {
                PoolError::corrupt(
                    "pool",
                    format!(
                        "no configuration matches the uberblock of txg {} (written under the \
                         configuration of txg {})",
                        ub.txg.0, ub.config_txg.0
                    ),
                )
            })?;
        // Match devices to leaves by GUID. Two devices with the same GUID are copies of one leaf
        // (a backup next to the live file): the one that took part in the newest txg wins, then the
        // one at the stored path, then the one with more valid labels.
        // (`devmatch`: the import listing chooses by the same rule.) The other is not used.
        let mut devmap: HashMap<Guid, (Arc<dyn Leaf>, PathBuf)> = HashMap::new();
        let mut scores: HashMap<Guid, crate::devmatch::Claim> = HashMap::new();
        for f in found {
            let Some((ti, ci)) = config.find_leaf(f.leaf_guid) else {
                continue;
            };
            let lc = &config.tops[ti].children[ci];
            let score =
                crate::devmatch::Claim::of(&f.path, &lc.identity, f.txg, f.scan.valid_count());
            if scores.get(&f.leaf_guid).is_none_or(|s| score > *s) {
                if let Some((_, old)) = devmap.get(&f.leaf_guid) {
                    tracing::info!(
                        "{} and {} carry the same leaf of pool '{}': using {}",
                        old.display(),
                        f.path.display(),
                        config.name,
                        f.path.display()
                    );
                }
                scores.insert(f.leaf_guid, score);
                devmap.insert(f.leaf_guid, (f.dev.clone(), f.path.clone()));
            } else if let Some((_, used)) = devmap.get(&f.leaf_guid) {
                tracing::info!(
                    "{} and {} carry the same leaf of pool '{}': using {}",
                    used.display(),
                    f.path.display(),
                    config.name,
                    used.display()
                );
            }
        }

        let mut reasons: HashMap<Guid, String> = HashMap::new();
        for t in &config.tops {
            for lc in &t.children {
                if let Some((d, _)) = devmap.get(&lc.guid) {
                    let need = match t.kind {
                        TopKind::Stripe { chunk } => {
                            t.asize / t.children.len() as u64 / chunk * chunk
                        }
                        _ => t.asize,
                    };
                    if label::data_size(d.size()) < need {
                        reasons.insert(lc.guid, "device is too small".into());
                        devmap.remove(&lc.guid);
                    }
                }
            }
        }
        let tree = VdevTree::build(&config, |lc| match devmap.get(&lc.guid) {
            Some((d, _)) => (Some(d.clone()), None),
            None => (
                None,
                Some(
                    reasons
                        .get(&lc.guid)
                        .cloned()
                        .unwrap_or_else(|| missing_leaf_reason(&lc.identity.path, guid, lc.guid)),
                ),
            ),
        });
        for t in &tree.tops {
            if !t.state().usable() {
                let missing: Vec<String> = t
                    .children
                    .iter()
                    .filter(|c| !c.state().usable())
                    .map(|c| c.path())
                    .collect();
                let name = top_name(t.kind, t.id, &t.children[0].path());
                return Err(PoolError::Unavailable(format!(
                    "one or more devices are missing: top-level vdev {name} has no usable device \
                     ({} not found)",
                    missing.join(", ")
                )));
            }
        }
        // Devices whose labels stop more than one txg before the pool's newest (a crash can leave
        // the last uberblock on some devices only): they missed those txgs, or are older copies.
        // Until the pool's own record says which (below), reads prefer the other copies.
        let behind: Vec<Behind> = tree
            .leaves()
            .filter_map(|(_, lv)| {
                let t = scores.get(&lv.guid)?.txg;
                let (_, path) = devmap.get(&lv.guid)?;
                (t.0 + 1 < ub.txg.0).then(|| Behind {
                    leaf: lv.clone(),
                    from: Txg(t.0 + 1),
                    to: Txg(ub.txg.0 - 1),
                    path: path.display().to_string(),
                })
            })
            .collect();
        // (It lacks the newest txg too: the one txg of slack is for the decision below only.)
        for b in &behind {
            *lock(&b.leaf.dtl) = vec![(b.from, ub.txg)];
        }
        // The object set.
        let root = BlockPtr::decode(&ub.root)?;
        if root.is_hole() || root.kind != BlockKind::Objset || root.psize as usize != OBJSET_SIZE {
            return Err(PoolError::corrupt(
                "uberblock",
                "root pointer is not an objset block",
            ));
        }
        let (os, alloc) = load_objset(&tree, &config, &root)?;
        let rewinding = ub.txg != newest.txg;
        let mut inner = Inner {
            config,
            config_dirty: false,
            tree,
            alloc,
            mos: ObjSet::open(os.meta),
            root_bp: root,
            committed: ub.txg,
            suspended: None,
            dir: BTreeMap::new(),
            dir_dirty: false,
            closed: None,
            // A rewind zeroes what the discarded txgs left before its first commit.
            opened_clean: ub.flags & label::UB_FLAG_CLEAN != 0 && !rewinding,
            invalidated: false,
            discard_after: rewinding.then_some(ub.txg),
            rewound: None,
            session_commits: 0,
            readers: Readers::default(),
            inflight: Arc::default(),
            errlog: Default::default(),
            health_written: Vec::new(),
            unproven_written: Vec::new(),
            trim: Default::default(),
            opened_ub: Some(ub.clone()),
            marked_in_use: false,
            snaps: None,
            snaps_dirty: false,
            free_budget: crate::snapshot::FREE_BUDGET,
        };
        let vdevs = inner.tree.tops.clone();
        let dirblob = read_blob(&mut inner.mos, &vdevs, DIR_OBJ)?;
        inner.dir = blob_opts()
            .deserialize(&dirblob)
            .map_err(|e| PoolError::corrupt("pool directory", e.to_string()))?;
        inner.load_health()?;
        // Every map page must have a copy of this txg (or older), or allocation would fail; but
        // reading them all at open led to blocks allocated twice after a leaf's map copies were
        // damaged and one child was offline (scrub.rs foreground_scrub_and_resilver_without_a_daemon):
        // only a rewind (an older txg than the newest) checks them, until that is understood.
        if how != Attempt::Tolerant && ub.txg != newest.txg {
            inner.alloc.verify_pages(&vdevs, ub.txg)?;
        }
        inner.check_behind(&behind, ub.txg)?;
        // After check_behind: reading more blocks from a device that is an older copy would heal
        // it, writing to a device the open then refuses.
        inner.load_trim()?;
        inner.apply_slow_io()?;
        if probe {
            // Only looked at: dropping it must write nothing.
            inner.closed = Some("probed");
        }
        if opts.import && !probe {
            inner.config.state = PoolState::Active;
            inner.config.host_id = opts.host.host_id;
            inner.config.hostname = opts.host.hostname.clone();
            if let Some(n) = &opts.new_name {
                inner.config.name = n.clone();
            }
            // Refresh identities from where the leaves are now.
            for t in &mut inner.config.tops {
                for lc in &mut t.children {
                    if let Some((_, p)) = devmap.get(&lc.guid) {
                        if let Ok(id) = identify(p) {
                            lc.identity = id;
                        }
                    }
                }
            }
            // Never record one path for two leaves: refuse the import, nothing written yet.
            crate::devmatch::check_distinct_paths(&inner.config).map_err(|r| {
                PoolError::Invalid(format!(
                    "{r}; a leaf that is not found may have been replaced by another file at its \
                     path: move that file away, or attach the missing device, and import again"
                ))
            })?;
            for (_, lv) in inner.tree.leaves() {
                let (ti, ci) = inner
                    .config
                    .find_leaf(lv.guid)
                    .expect("leaf of this config");
                *lock(&lv.config) = inner.config.tops[ti].children[ci].clone();
            }
            inner.config_dirty = true;
            inner.sync_txg()?;
        }
        Ok(Pool {
            inner: Mutex::new(inner),
            stop_sync: Mutex::new(false),
            extensions: Mutex::new(HashMap::new()),
            sync_gen: Default::default(),
            trim_control: Default::default(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    pub fn name(&self) -> String {
        self.lock().config.name.clone()
    }

    pub fn guid(&self) -> Guid {
        self.lock().config.pool_guid
    }

    /// What the rewind of this open discarded (`import -F`, `-T`), if it opened an older txg.
    pub fn rewound(&self) -> Option<crate::rewind::RewindReport> {
        self.lock().rewound.clone()
    }

    /// Was the pool closed cleanly before this open (its uberblock carried the clean flag)?
    pub fn opened_clean(&self) -> bool {
        self.lock().opened_clean
    }

    /// The last committed txg.
    pub fn committed_txg(&self) -> Txg {
        self.lock().committed
    }

    pub fn config(&self) -> PoolConfig {
        self.lock().config.clone()
    }

    /// The current paths of every leaf (for the state directory's cache).
    pub fn leaf_paths(&self) -> Vec<String> {
        self.lock()
            .config
            .leaves()
            .map(|l| l.identity.path.clone())
            .collect()
    }

    /// Commit the open txg now (a no-op when nothing changed).
    pub fn sync(&self) -> Result<()> {
        self.lock().sync_txg()
    }

    /// Start a thread that commits every `interval` while the pool is open.
    pub fn start_sync_thread(self: &Arc<Self>, interval: Duration) {
        use std::sync::atomic::Ordering;
        let weak: Weak<Pool> = Arc::downgrade(self);
        let me = self.sync_gen.fetch_add(1, Ordering::SeqCst) + 1;
        std::thread::Builder::new()
            .name("cairn-txg-sync".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                let Some(p) = weak.upgrade() else { return };
                if *lock(&p.stop_sync) || p.sync_gen.load(Ordering::SeqCst) != me {
                    return;
                }
                if let Err(e) = p.sync() {
                    tracing::error!("txg sync failed: {e}");
                }
            })
            .ok();
    }

    /// After an export or destroy that failed before the pool was closed: take it back into use (the
    /// timed commits stopped by the attempt may be started again). False if the pool is closed.
    pub fn resume_use(&self) -> bool {
        let g = self.lock();
        if g.closed.is_some() {
            return false;
        }
        *lock(&self.stop_sync) = false;
        true
    }

    /// Commit and mark the pool exported. The pool takes no more requests; its leaves are released
    /// when the last reference is dropped.
    pub fn export(&self) -> Result<()> {
        self.set_state(PoolState::Exported, "exported")
    }

    /// Mark the pool destroyed (its leaves become free for reuse).
    pub fn destroy(&self) -> Result<()> {
        self.set_state(PoolState::Destroyed, "destroyed")
    }

    /// Commit everything and close the pool cleanly (the daemon's shutdown). Idempotent.
    pub fn close(&self) -> Result<()> {
        *lock(&self.stop_sync) = true;
        let mut g = self.lock();
        if g.closed.is_some() {
            return Ok(());
        }
        let r = g.close_clean();
        g.closed = Some("closed");
        r
    }

    fn set_state(&self, st: PoolState, what: &'static str) -> Result<()> {
        *lock(&self.stop_sync) = true;
        let mut g = self.lock();
        if g.suspended.is_some() && g.closed.is_none() {
            // What could not be committed is lost either way; the committed state is exported.
            g.resume()?;
        }
        g.check_writable()?;
        g.sync_txg()?;
        g.config.state = st;
        g.config_dirty = true;
        let r = g.commit(true);
        g.closed = Some(what);
        r
    }

    /// Add top-level vdevs. Refuses a mix of redundant and non-redundant vdevs unless `force`.
    pub fn add(&self, specs: &[TopSpec], opts: &CreateOptions) -> Result<Vec<String>> {
        let mut g = self.lock();
        let inner = &mut *g;
        if let Some(s) = &inner.suspended {
            return Err(PoolError::Suspended(s.clone()));
        }
        let redundant = |k: TopKind| k == TopKind::Mirror;
        let pool_redundant = inner.config.tops.iter().all(|t| redundant(t.kind));
        if !opts.force && specs.iter().any(|s| redundant(s.kind) != pool_redundant) {
            return Err(PoolError::Invalid(format!(
                "mismatched replication level: pool uses {} vdevs and the new vdev is {} \
                 (use -f to override)",
                if pool_redundant {
                    "mirror"
                } else {
                    "non-redundant"
                },
                if pool_redundant {
                    "not redundant"
                } else {
                    "a mirror"
                }
            )));
        }
        if inner.config.tops.len() + specs.len() > object::MAX_TOPS {
            return Err(PoolError::Invalid(format!(
                "a pool holds at most {} top-level vdevs",
                object::MAX_TOPS
            )));
        }
        let existing: HashSet<String> = inner
            .config
            .leaves()
            .flat_map(|l| [l.identity.path.clone(), l.identity.phys_path.clone()])
            .collect();
        let txg = inner.committed.next();
        let (tops, warnings) =
            prepare_tops(specs, inner.config.tops.len() as u32, &existing, opts, txg)?;
        for (_, devs) in &tops {
            for d in devs {
                wipe_label_areas(d.as_ref())?;
            }
        }
        let mut config = inner.config.clone();
        for (t, _) in &tops {
            config.tops.push(t.clone());
        }
        config.validate().map_err(PoolError::Invalid)?;
        let mut devmap: HashMap<Guid, Arc<dyn Leaf>> = HashMap::new();
        for (t, devs) in &tops {
            for (lc, d) in t.children.iter().zip(devs) {
                devmap.insert(lc.guid, d.clone());
            }
        }
        let new_tree = VdevTree::build(
            &PoolConfig {
                tops: tops.iter().map(|(t, _)| t.clone()).collect(),
                ..config.clone()
            },
            |lc| (devmap.get(&lc.guid).cloned(), None),
        );
        for t in new_tree.tops {
            inner.tree.tops.push(t);
        }
        inner.apply_slow_io()?;
        let slots = inner.alloc.slots();
        for (t, _) in &tops {
            inner
                .alloc
                .tops
                .push(TopAlloc::format(t.id, t.guid, t.asize, slots));
        }
        inner.config = config;
        inner.config_dirty = true;
        inner.sync_txg()?;
        Ok(warnings)
    }

    pub fn status(&self) -> PoolStatus {
        // Leaves a running resilver is copying to say so, as zpool's "(resilvering)".
        let copying: Vec<u64> = self
            .scan_state()
            .ok()
            .filter(|s| s.function == "resilver" && s.state == "scanning")
            .map(|s| s.targets)
            .unwrap_or_default();
        let mut g = self.lock();
        // A device deleted or replaced since the last commit shows now, not at the next write.
        for (_, lv) in g.tree.leaves() {
            lv.check_device();
        }
        let mut st = g.status();
        // Errors no replica could serve count up the tree, as zpool's: on the mirror or stripe
        // holding the block (a single leaf counted it itself) and on the pool.
        let per_top = g.unrecoverable_per_top();
        for (t, row) in g.tree.tops.iter().zip(st.root.children.iter_mut()) {
            if t.kind != TopKind::Single {
                row.checksum_errors += per_top.get(&t.id).copied().unwrap_or(0);
            }
        }
        st.root.checksum_errors += st.error_count;
        // A leaf whose unchanged part is being proven says so: "(resilvering: verifying)".
        let verifying: Vec<u64> = g
            .tree
            .leaves()
            .filter(|(_, l)| l.verify_below.load(std::sync::atomic::Ordering::Relaxed) > 0)
            .map(|(_, l)| l.guid.0)
            .collect();
        fn mark(v: &mut VdevStatus, copying: &[u64], verifying: &[u64]) {
            if v.reason.as_deref() == Some("(resilver needed)") && copying.contains(&v.guid) {
                v.reason = Some(if verifying.contains(&v.guid) {
                    "(resilvering: verifying)".into()
                } else {
                    "(resilvering)".into()
                });
            }
            for c in &mut v.children {
                mark(c, copying, verifying);
            }
        }
        mark(&mut st.root, &copying, &verifying);
        st
    }

    pub fn state(&self) -> VdevState {
        self.lock().tree.state()
    }

    /// (name, value, source) of every property, or just `names`.
    pub fn get_props(&self, names: &[String]) -> Result<Vec<(String, String, String)>> {
        let mut g = self.lock();
        let user = g.user_props()?;
        let st = g.status();
        let list: Vec<&str> = if names.is_empty() || names.iter().any(|n| n == "all") {
            props::PROPS.iter().map(|p| p.name).collect()
        } else {
            names.iter().map(|s| s.as_str()).collect()
        };
        let mut out = Vec::new();
        for n in list {
            let Some(def) = props::find(n) else {
                return Err(PoolError::Invalid(format!("invalid property '{n}'")));
            };
            let (v, src) = match n {
                "name" => (st.name.clone(), "-"),
                "size" => (st.size.to_string(), "-"),
                "allocated" => (st.allocated.to_string(), "-"),
                "free" => (st.free.to_string(), "-"),
                "capacity" => (
                    format!("{}", (st.allocated * 100).checked_div(st.size).unwrap_or(0)),
                    "-",
                ),
                "health" => (st.state.clone(), "-"),
                "guid" => (st.pool_guid.to_string(), "-"),
                "txg" => (st.txg.to_string(), "-"),
                "freeing" => (g.snaps()?.freeing().to_string(), "-"),
                _ => match user.get(n) {
                    Some(v) => (v.clone(), "local"),
                    None => (
                        def.default.to_string(),
                        if def.settable { "default" } else { "-" },
                    ),
                },
            };
            out.push((n.to_string(), v, src.to_string()));
        }
        Ok(out)
    }

    pub fn set_prop(&self, name: &str, value: &str) -> Result<()> {
        let v = props::validate(name, value)?;
        let mut g = self.lock();
        let mut user = g.user_props()?;
        user.insert(name.to_string(), v);
        let blob = blob_opts()
            .serialize(&user)
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        let id = g.dir_obj("props")?;
        write_blob(&mut g, id, &blob)?;
        if name == "autotrim" {
            g.trim.autotrim = value == "on";
        }
        if name == crate::slowio::PROP {
            g.apply_slow_io()?;
        }
        g.sync_txg()
    }

    /// Append a command to the pool's history (committed with the next txg).
    pub fn log_history(&self, command: &str, host: &str) -> Result<()> {
        let rec = HistoryRecord {
            time: now_secs(),
            host: host.to_string(),
            command: command.to_string(),
        };
        let body = blob_opts()
            .serialize(&rec)
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        let mut g = self.lock();
        let inner = &mut *g;
        inner.check_writable()?;
        let id = inner.dir_obj("history")?;
        let vdevs = inner.tree.tops.clone();
        let o = inner.mos.obj(&vdevs, id)?;
        let off = o.dnode.size;
        let mut rec_bytes = (body.len() as u32).to_le_bytes().to_vec();
        rec_bytes.extend_from_slice(&body);
        o.write(&vdevs, off, &rec_bytes)?;
        o.dnode.size = off + rec_bytes.len() as u64;
        o.mark_dnode_dirty();
        Ok(())
    }

    pub fn history(&self) -> Result<Vec<HistoryRecord>> {
        let mut g = self.lock();
        let inner = &mut *g;
        let id = inner.dir_obj("history")?;
        let vdevs = inner.tree.tops.clone();
        let data = read_blob(&mut inner.mos, &vdevs, id)?;
        let mut out = Vec::new();
        let mut pos = 0usize;
        while pos + 4 <= data.len() {
            let len = u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]])
                as usize;
            pos += 4;
            if len > data.len() - pos {
                return Err(PoolError::corrupt(
                    "history",
                    format!("record length {len} at {pos}"),
                ));
            }
            let rec: HistoryRecord = blob_opts()
                .deserialize(&data[pos..pos + len])
                .map_err(|e| PoolError::corrupt("history", e.to_string()))?;
            out.push(rec);
            pos += len;
        }
        Ok(out)
    }

    // ---- The object interface used by datasets. ----

    /// Create an object in the MOS; committed with the next txg.
    pub fn create_object(&self, otype: ObjType, data_shift: u8, copies: u8) -> Result<u64> {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.check_writable()?;
        let vdevs = inner.tree.tops.clone();
        inner.mos.create_object(&vdevs, otype, data_shift, copies)
    }

    pub fn destroy_object(&self, id: u64) -> Result<()> {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.check_writable()?;
        let vdevs = inner.tree.tops.clone();
        inner.mos.destroy_object(&vdevs, id)
    }

    /// Read from an object. Block pointers are looked up under the pool lock; the blocks themselves are
    /// read and verified outside it, so reads run in parallel with each other. While such a read is in
    /// flight the allocator keeps every block freed after the state it looked at (see `Readers`).
    pub fn read_object(&self, id: u64, off: u64, buf: &mut [u8]) -> Result<()> {
        check_range(off, buf.len() as u64)?;
        let (todo, vdevs, _guard, errlog, bs, events) = {
            let mut g = self.lock();
            let inner = &mut *g;
            let vdevs = inner.tree.tops.clone();
            let o = inner.mos.obj(&vdevs, id)?;
            let bs = o.dnode.block_size() as u64;
            let todo = o.plan_read(&vdevs, off, buf)?;
            let guard = ReaderGuard::new(&inner.readers, inner.committed);
            (
                todo,
                vdevs,
                guard,
                inner.errlog.clone(),
                bs,
                inner.tree.events.clone(),
            )
        };
        // Whole blocks that lie one after the other on the same top-level vdev are read with one
        // request and verified block by block (any failure falls back to block-at-a-time reads).
        let mut i = 0;
        let mut single: Vec<(BlockPtr, usize, usize, usize)> = Vec::new();
        while i < todo.len() {
            let whole = |k: usize| {
                let (bp, within, _, len): &(BlockPtr, usize, usize, usize) = &todo[k];
                // A compressed block is read (and decompressed) on its own.
                *within == 0 && *len == bp.psize as usize && bp.compression == 0
            };
            let mut j = i + 1;
            if whole(i) {
                while j < todo.len()
                    && whole(j)
                    && j - i < 64
                    && todo[j].2 == todo[j - 1].2 + todo[j - 1].3
                    && todo[j].0.dvas[0].vdev == todo[i].0.dvas[0].vdev
                    && todo[j].0.dvas[0].offset
                        == todo[j - 1].0.dvas[0].offset + todo[j - 1].0.psize as u64
                {
                    j += 1;
                }
            }
            if j - i >= 2 {
                let run = &todo[i..j];
                let start = run[0].2;
                let total: usize = run.iter().map(|r| r.3).sum();
                let d0 = run[0].0.dvas[0];
                let birth = run.iter().map(|r| r.0.birth).max().unwrap_or_default();
                let sums: Vec<(usize, usize, [u8; 32])> = run
                    .iter()
                    .map(|r| (r.2 - start, r.3, r.0.checksum))
                    .collect();
                // In this thread: concurrent requests already keep the cores busy, and handing
                // 1 MiB to the rayon pool costs more in wake-ups than it saves.
                let verify = |b: &[u8]| {
                    sums.iter()
                        .all(|(o, l, c)| crate::blkptr::checksum(&b[*o..*o + *l]) == *c)
                };
                let ok = vdevs.get(d0.vdev as usize).is_some_and(|t| {
                    t.read(d0.offset, &mut buf[start..start + total], birth, &verify)
                        .is_ok()
                });
                if !ok {
                    single.extend_from_slice(run);
                }
            } else {
                single.push(todo[i]);
            }
            i = j;
        }
        for (bp, within, at, len) in single {
            match object::read_bp(&vdevs, &bp) {
                Ok(data) => buf[at..at + len].copy_from_slice(&data[within..within + len]),
                Err(e) => {
                    // No copy could serve the block: a permanent error until it is rewritten.
                    let blkid = (off + at as u64) / bs;
                    lock(&errlog).insert((id, blkid));
                    events.push(cairn_vdev::tree::Event {
                        time: now_secs(),
                        class: "data_error".into(),
                        vdev: format!("object {id}"),
                        offset: Some(blkid * bs),
                        detail: e.to_string(),
                    });
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Write into an object. Refuses with `NoSpace` when the pool could not hold the change.
    pub fn write_object(&self, id: u64, off: u64, data: &[u8]) -> Result<()> {
        self.write_object_reserved(id, off, data, SpaceRule::default())
    }

    /// Write into an object under `rule` (space kept for other datasets' reservations, and whether
    /// the writer holds a reservation of its own).
    ///
    /// Whole blocks with data are checksummed before the pool lock is taken, allocated under it, and
    /// written to the leaves after it is released, so writers run in parallel and a commit only links
    /// them into the tree (see `InFlight`). Partial blocks (read-modify-write) and zero blocks (which
    /// become holes) stay in memory until the commit.
    pub fn write_object_reserved(
        &self,
        id: u64,
        off: u64,
        data: &[u8],
        rule: SpaceRule,
    ) -> Result<()> {
        check_range(off, data.len() as u64)?;
        // Partial blocks must be read first: read them now, without the lock (their pointers are
        // checked again under it; a block that changed meanwhile is read again there).
        let (bs, comp, mut preread) = {
            let (bs, comp, partial, vdevs, _guard) = {
                let mut g = self.lock();
                let inner = &mut *g;
                let vdevs = inner.tree.tops.clone();
                let o = inner.mos.obj(&vdevs, id)?;
                let bs = o.dnode.block_size() as u64;
                let comp = crate::compress::Compression::from_byte(o.dnode.compression)
                    .unwrap_or_default();
                let partial = o.partial_reads(&vdevs, off, data.len() as u64)?;
                let guard = ReaderGuard::new(&inner.readers, inner.committed);
                (bs, comp, partial, vdevs, guard)
            };
            let preread: Vec<(u64, BlockPtr, Vec<u8>)> = partial
                .into_iter()
                .filter_map(|(b, bp)| {
                    object::read_bp_how(&vdevs, &bp, ReadHow::Uncached)
                        .ok()
                        .map(|d| (b, bp, d))
                })
                .collect();
            (bs, comp, preread)
        };
        let end = off + data.len() as u64;
        let (first_full, last_full) = (off.div_ceil(bs), end / bs);
        // Whole blocks with data: (block id, contents, the compressed form if it is kept, the
        // checksum of what is stored), compressed and checksummed on all cores.
        type Whole = (u64, Arc<Vec<u8>>, Option<Vec<u8>>, [u8; 32]);
        let whole: Vec<Whole> = if first_full < last_full {
            use rayon::prelude::*;
            (first_full..last_full)
                .into_par_iter()
                .filter_map(|b| {
                    let at = (b * bs - off) as usize;
                    let d = &data[at..at + bs as usize];
                    d.iter().any(|&x| x != 0).then(|| {
                        let stored = comp.compress(d);
                        let sum = crate::blkptr::checksum(stored.as_deref().unwrap_or(d));
                        (b, Arc::new(d.to_vec()), stored, sum)
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut g = self.lock();
        let inner = &mut *g;
        inner.check_writable()?;
        let vdevs = inner.tree.tops.clone();
        let (copies, cur_bs) = {
            let o = inner.mos.obj(&vdevs, id)?;
            if o.dnode.otype == ObjType::Snapshot {
                return Err(snapshot_read_only(id));
            }
            (o.dnode.copies, o.dnode.block_size() as u64)
        };
        if cur_bs != bs {
            return Err(PoolError::Invalid(format!(
                "object {id} changed block size during a write"
            )));
        }
        inner.make_space(data.len() as u64, copies, rule)?;
        inner.forget_errors(id, off, data.len() as u64);
        // Everything but the whole blocks goes through the object's in-memory path.
        let mut pos = off;
        for &(b, _, _, _) in &whole {
            if pos < b * bs {
                let at = (pos - off) as usize;
                let to = (b * bs - off) as usize;
                inner.mos.obj(&vdevs, id)?.write_preread(
                    &vdevs,
                    pos,
                    &data[at..to],
                    &mut preread,
                )?;
            }
            pos = (b + 1) * bs;
        }
        if pos < end {
            let at = (pos - off) as usize;
            inner
                .mos
                .obj(&vdevs, id)?
                .write_preread(&vdevs, pos, &data[at..], &mut preread)?;
        }
        if whole.is_empty() {
            return inner.sync_if_full();
        }
        let sizes: Vec<u64> = whole
            .iter()
            .map(|(_, _, c, _)| c.as_ref().map_or(bs, |c| c.len() as u64))
            .collect();
        let mut bps = inner.alloc_open(&vdevs, &sizes, copies)?;
        for (bp, (_, _, stored, sum)) in bps.iter_mut().zip(&whole) {
            bp.checksum = *sum;
            if stored.is_some() {
                bp.lsize = bs as u32;
                bp.compression = comp.code();
                bp.comp_level = match comp {
                    crate::compress::Compression::Zstd(n) => n,
                    _ => 0,
                };
            }
        }
        let o = inner.mos.obj(&vdevs, id)?;
        for ((b, d, _, _), bp) in whole.iter().zip(&bps) {
            o.put_written(*b, *bp, d.clone())?;
        }
        let write = inner.inflight.begin(
            whole
                .iter()
                .zip(&bps)
                .map(|((b, _, _, _), bp)| (id, *b, *bp))
                .collect(),
        );
        drop(g);
        let datas: Vec<&[u8]> = whole
            .iter()
            .map(|(_, d, c, _)| c.as_deref().unwrap_or(d.as_slice()))
            .collect();
        let ok = match object::write_copies(&vdevs, &bps, &datas) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("writing object {id} at {off}: {e}; the commit retries");
                false
            }
        };
        write.finish(ok);
        let mut g = self.lock();
        let inner = &mut *g;
        inner.absorb_failed_writes();
        if ok {
            if let Ok(o) = inner.mos.obj(&vdevs, id) {
                for ((b, _, _, _), bp) in whole.iter().zip(&bps) {
                    o.written_done(*b, bp);
                }
            }
        }
        inner.sync_if_full()
    }

    pub fn free_object_range(&self, id: u64, off: u64, len: u64) -> Result<()> {
        check_range(off, len)?;
        let mut g = self.lock();
        let inner = &mut *g;
        inner.check_writable()?;
        let vdevs = inner.tree.tops.clone();
        if inner.mos.obj(&vdevs, id)?.dnode.otype == ObjType::Snapshot {
            return Err(snapshot_read_only(id));
        }
        inner.forget_errors(id, off, len);
        inner.mos.obj(&vdevs, id)?.free_range(&vdevs, off, len)
    }

    /// (type, logical size, allocated bytes, block size) of an object.
    pub fn object_info(&self, id: u64) -> Result<(ObjType, u64, u64, usize)> {
        self.consistently(|v| v.object_info(id))
    }

    pub fn set_object_size(&self, id: u64, size: u64) -> Result<()> {
        self.lock().set_object_size(id, size)
    }

    /// Set the number of copies new blocks of an object get (1..=3).
    pub fn set_object_copies(&self, id: u64, copies: u8) -> Result<()> {
        self.atomically(|tx| tx.set_object_copies(id, copies))
    }

    /// The one value of type `T` kept with this open pool, made with `Default` on first use. Upper
    /// layers keep in-memory state here that must be shared by every user of the pool in this
    /// process (the dataset layer keeps each volume's live size and read-only flag) and that goes
    /// away with the pool.
    pub fn extension<T: Any + Send + Sync + Default>(&self) -> Arc<T> {
        let mut m = lock(&self.extensions);
        let e = m
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(T::default()));
        match Arc::clone(e).downcast::<T>() {
            Ok(t) => t,
            // Cannot happen (entries are keyed by their type); start afresh rather than panic.
            Err(_) => {
                let t = Arc::new(T::default());
                *e = t.clone();
                t
            }
        }
    }

    /// Allocation map of `[off, off+len)` of an object: `(offset, length, allocated)` extents at block
    /// granularity, merged, in order from `off`. The answer stops early (it covers a prefix of the
    /// range) once `max_blocks` allocated blocks are in it, so its cost is bounded whatever the range;
    /// hole subtrees are skipped at every level of the tree.
    pub fn object_map(
        &self,
        id: u64,
        off: u64,
        len: u64,
        max_blocks: usize,
    ) -> Result<Vec<(u64, u64, bool)>> {
        check_range(off, len)?;
        let mut g = self.lock();
        let inner = &mut *g;
        let vdevs = inner.tree.tops.clone();
        let o = inner.mos.obj(&vdevs, id)?;
        let bs = o.dnode.block_size() as u64;
        let end = off + len;
        let (blocks, done) = o.allocated_blocks(&vdevs, off / bs, end.div_ceil(bs), max_blocks)?;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let push = |out: &mut Vec<(u64, u64, bool)>, at: u64, n: u64, a: bool| match out.last_mut()
        {
            Some(last) if last.2 == a => last.1 += n,
            _ => out.push((at, n, a)),
        };
        let mut cursor = off;
        for b in blocks {
            let start = (b * bs).max(off);
            let stop = ((b + 1) * bs).min(end);
            if start > cursor {
                push(&mut out, cursor, start - cursor, false);
            }
            push(&mut out, start, stop - start, true);
            cursor = stop;
        }
        let limit = done.saturating_mul(bs).min(end);
        if limit > cursor {
            push(&mut out, cursor, limit - cursor, false);
        }
        Ok(out)
    }

    /// The contents of a small named blob kept in the pool directory (None if never written).
    pub fn read_named_blob(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.lock().read_named_blob(name)
    }

    /// Replace a named blob in the pool directory (created on first use); committed with the next txg.
    pub fn write_named_blob(&self, name: &str, data: &[u8]) -> Result<()> {
        let mut g = self.lock();
        g.check_writable()?;
        g.write_named_blob(name, data)
    }

    /// Space figures for datasets: (pool size, allocated, slop reserved for metadata).
    pub fn space(&self) -> (u64, u64, u64) {
        self.lock().space()
    }

    /// Look up a name in the pool directory.
    pub fn dir_lookup(&self, name: &str) -> Option<u64> {
        self.lock().dir.get(name).copied()
    }

    pub fn dir_set(&self, name: &str, id: Option<u64>) {
        let mut g = self.lock();
        match id {
            Some(i) => g.dir.insert(name.to_string(), i),
            None => g.dir.remove(name),
        };
        g.dir_dirty = true;
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        *lock(&self.stop_sync) = true;
        let mut g = self.lock();
        if g.closed.is_none() && g.suspended.is_none() {
            if let Err(e) = g.close_clean() {
                tracing::error!("final txg sync failed: {e}");
            }
        }
    }
}

/// How much of the pool a write may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpaceRule {
    /// Bytes to leave free for other datasets' unused reservations.
    pub headroom: u64,
    /// The writer holds a reservation (a thick volume): it may use half of the slop space, so that
    /// rewriting its blocks works on a pool that others have filled (copy-on-write needs the new
    /// block before the old one is freed, and frees are deferred).
    pub reserved: bool,
}

/// Read the objset block `root` points at, and set up the allocator it records.
/// A device of the pool found at open.
struct Found {
    path: PathBuf,
    dev: Arc<dyn Leaf>,
    scan: label::LeafScan,
    leaf_guid: Guid,
    /// The newest txg whose uberblock this device holds (the last it took part in).
    txg: Txg,
}

fn load_objset(
    tree: &VdevTree,
    config: &PoolConfig,
    root: &BlockPtr,
) -> Result<(ObjsetPhys, Allocator)> {
    let osb = object::read_bp(&tree.tops, root)?;
    let os = ObjsetPhys::decode(&osb)?;
    if os.alloc_bytes.len() > config.tops.len() {
        return Err(PoolError::corrupt(
            "objset block",
            format!(
                "{} vdevs recorded, config has {}",
                os.alloc_bytes.len(),
                config.tops.len()
            ),
        ));
    }
    let slots = Allocator::slots_of_version(os.version)
        .ok_or_else(|| PoolError::corrupt("objset block", format!("version {}", os.version)))?;
    let alloc = Allocator::new(
        config
            .tops
            .iter()
            .map(|t| match os.alloc_bytes.get(t.id as usize) {
                Some(&a) => TopAlloc::open(t.id, t.guid, t.asize, a, slots),
                // Added in a configuration newer than this txg's objset: still empty on disk,
                // but its map pages were never committed, so format it again.
                None => TopAlloc::format(t.id, t.guid, t.asize, slots),
            })
            .collect(),
        slots,
    );
    Ok((os, alloc))
}

/// A device found at open whose labels stop before the pool's newest txg: it has no uberblock of the
/// txgs `[from, to]` (see `Inner::check_behind`).
pub(crate) struct Behind {
    pub leaf: Arc<LeafVdev>,
    pub from: Txg,
    pub to: Txg,
    /// The device's path as found (the configuration may still name another).
    pub path: String,
}

/// Space kept back for metadata so commits never run out: 1/32 of the pool, at least 4 MiB and at most
/// 128 MiB (never more than half), as OpenZFS's slop space.
fn slop_for(size: u64) -> u64 {
    (size / 32).clamp(4 << 20, 128 << 20).min(size / 2)
}

/// Objects address at most 2^60 bytes; anything beyond is refused before any arithmetic on it.
fn check_range(off: u64, len: u64) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= 1 << 60 => Ok(()),
        _ => Err(PoolError::Invalid(format!(
            "byte range {off}+{len} is beyond the largest object"
        ))),
    }
}

fn snapshot_read_only(id: u64) -> PoolError {
    PoolError::Invalid(format!(
        "object {id} is a snapshot: snapshots are read-only"
    ))
}

/// Replace the whole contents of a byte object.
pub(crate) fn write_blob(inner: &mut Inner, id: u64, blob: &[u8]) -> Result<()> {
    let vdevs = inner.tree.tops.clone();
    write_blob_in(&mut inner.mos, &vdevs, id, blob)
}

/// [`write_blob`] on an object set.
pub(crate) fn write_blob_in(
    mos: &mut ObjSet,
    vdevs: &[Arc<TopVdev>],
    id: u64,
    blob: &[u8],
) -> Result<()> {
    let vdevs = vdevs.to_vec();
    let o = mos.obj(&vdevs, id)?;
    let old = o.dnode.size;
    o.write(&vdevs, 0, blob)?;
    if old > blob.len() as u64 {
        o.free_range(&vdevs, blob.len() as u64, old - blob.len() as u64)?;
    }
    o.dnode.size = blob.len() as u64;
    o.mark_dnode_dirty();
    Ok(())
}

pub(crate) fn read_blob(mos: &mut ObjSet, vdevs: &[Arc<TopVdev>], id: u64) -> Result<Vec<u8>> {
    let o = mos.obj(vdevs, id)?;
    let size = o.dnode.size;
    if size > 64 << 20 {
        return Err(PoolError::corrupt(
            format!("object {id}"),
            format!("size {size}"),
        ));
    }
    let mut b = vec![0u8; size as usize];
    o.read(vdevs, 0, &mut b)?;
    Ok(b)
}

impl Inner {
    pub(crate) fn read_named_blob(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        let Some(&id) = self.dir.get(name) else {
            return Ok(None);
        };
        let vdevs = self.tree.tops.clone();
        read_blob(&mut self.mos, &vdevs, id).map(Some)
    }

    pub(crate) fn write_named_blob(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let id = match self.dir.get(name) {
            Some(&id) => id,
            None => {
                let vdevs = self.tree.tops.clone();
                let id = self
                    .mos
                    .create_object(&vdevs, ObjType::Bytes, 14, MOS_COPIES)?;
                self.dir.insert(name.to_string(), id);
                self.dir_dirty = true;
                id
            }
        };
        write_blob(self, id, data)
    }

    pub(crate) fn set_object_size(&mut self, id: u64, size: u64) -> Result<()> {
        self.check_writable()?;
        let vdevs = self.tree.tops.clone();
        check_range(size, 0)?;
        let o = self.mos.obj(&vdevs, id)?;
        if o.dnode.otype == ObjType::Snapshot {
            return Err(snapshot_read_only(id));
        }
        o.dnode.size = size;
        o.mark_dnode_dirty();
        o.free_range(&vdevs, size, (1 << 60) - size)?;
        Ok(())
    }

    pub(crate) fn space(&self) -> (u64, u64, u64) {
        let size = self.alloc.size();
        (
            size,
            self.alloc.alloc_bytes() + self.mos.dirty_space(),
            slop_for(size),
        )
    }

    /// Leave the suspended state (`pool clear`): drop what the failed commit and the open txg held in
    /// memory and load the pool as of its newest committed uberblock on the leaves, as an import after a
    /// crash would, keeping the device tree, its counters, events, dirty time logs and error log (the
    /// in-memory ones hold at least what was committed). Writes acknowledged since the last commit and
    /// never flushed are lost, as in a crash; everything flushed is in the committed state.
    pub(crate) fn resume(&mut self) -> Result<()> {
        self.inflight.wait_idle();
        std::mem::take(&mut lock(&self.inflight.state).1);
        let guid = self.config.pool_guid;
        let mut best: Option<Uberblock> = None;
        let mut labels: Vec<label::Label> = Vec::new();
        for (_, lv) in self.tree.leaves() {
            let Some(dev) = lv.dev().filter(|_| lv.state().usable()) else {
                continue;
            };
            let scan = label::scan_leaf(dev.as_ref());
            for u in scan.uberblocks.iter().filter(|u| u.pool_guid == guid) {
                if best.as_ref().is_none_or(|b| u.is_newer_than(b)) {
                    best = Some(u.clone());
                }
            }
            labels.extend(scan.valid_labels().cloned());
        }
        let ub = best.ok_or_else(|| {
            PoolError::Unavailable("no valid uberblock on any usable device".into())
        })?;
        let config = labels
            .iter()
            .filter(|l| l.header.pool_guid == guid && l.header.config_txg <= ub.txg)
            .max_by_key(|l| l.header.config_txg)
            .map(|l| l.config.clone())
            .ok_or_else(|| {
                PoolError::Unavailable("no configuration matches the newest uberblock".into())
            })?;
        let shape = |c: &PoolConfig| -> Vec<(Guid, Vec<Guid>)> {
            c.tops
                .iter()
                .map(|t| (t.guid, t.children.iter().map(|l| l.guid).collect()))
                .collect()
        };
        if shape(&config) != shape(&self.config) {
            return Err(PoolError::Unavailable(
                "the failed commit changed the pool's devices; export and import the pool".into(),
            ));
        }
        let root = BlockPtr::decode(&ub.root)?;
        let (os, alloc) = load_objset(&self.tree, &config, &root)?;
        let mut mos = ObjSet::open(os.meta);
        let vdevs = self.tree.tops.clone();
        let dirblob = read_blob(&mut mos, &vdevs, DIR_OBJ)?;
        let dir = blob_opts()
            .deserialize(&dirblob)
            .map_err(|e| PoolError::corrupt("pool directory", e.to_string()))?;
        // Txgs after the committed one never happened: nobody lacks them (their numbers are reused).
        for (_, lv) in self.tree.leaves() {
            let mut d = lock(&lv.dtl);
            d.retain(|&(a, _)| a <= ub.txg);
            for r in d.iter_mut() {
                r.1 = r.1.min(ub.txg);
            }
        }
        // The leaves' flags are the tree's; the next commit writes them into the labels.
        let state = self.config.state;
        self.config = config;
        self.config.state = state;
        self.config_dirty = true;
        self.alloc = alloc;
        self.mos = mos;
        self.root_bp = root;
        self.committed = ub.txg;
        self.dir = dir;
        self.dir_dirty = false;
        // Page copies the failed commit left must be zeroed before the txg number is reused.
        self.opened_clean = ub.flags & label::UB_FLAG_CLEAN != 0;
        self.invalidated = false;
        self.opened_ub = Some(ub);
        self.marked_in_use = false;
        self.health_written = Vec::new();
        self.unproven_written = Vec::new();
        self.snaps = None;
        self.snaps_dirty = false;
        self.suspended = None;
        tracing::info!(
            "pool {} resumed at txg {}",
            self.config.name,
            self.committed
        );
        Ok(())
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if let Some(what) = self.closed {
            return Err(PoolError::Unavailable(format!("the pool has been {what}")));
        }
        if let Some(s) = &self.suspended {
            return Err(PoolError::Suspended(s.clone()));
        }
        Ok(())
    }

    /// The last commit of a session: everything, marked clean so the next open needs no cleanup.
    /// A session that committed nothing leaves the pool untouched.
    fn close_clean(&mut self) -> Result<()> {
        if self.session_commits == 0 && !self.is_dirty() {
            return Ok(());
        }
        self.commit(true)
    }

    fn is_dirty(&self) -> bool {
        self.mos.is_dirty()
            || self.config_dirty
            || self.dir_dirty
            || self.tree.events.has_new()
            || self.snaps_dirty
            || self.freeing_pending()
    }

    /// Refuse a write that could leave the pool unable to commit. Keeps 1/32 of the pool (at least
    /// 4 MiB, at most 128 MiB) for metadata, as OpenZFS's slop space does; a writer holding a
    /// reservation may use half of it (its overwrites need new blocks before the old ones are freed).
    fn check_space(&self, len: u64, copies: u8, rule: SpaceRule) -> Result<()> {
        let size = self.alloc.size();
        let slop = if rule.reserved {
            slop_for(size) / 2
        } else {
            slop_for(size)
        };
        let headroom = rule.headroom;
        // Dirty data lands once per copy, plus a generous 1/32 for indirect blocks and metadata.
        let data = self.mos.dirty_space() + len * copies as u64;
        let pending = data + data / 32;
        // Recently freed space is not allocatable until its deferral ends.
        let used = self.alloc.alloc_bytes() + self.alloc.deferred_bytes();
        if used + pending + slop + headroom > size {
            return Err(PoolError::NoSpace);
        }
        Ok(())
    }

    /// `check_space`, and if the open txg's frees or deferred frees may stand in the way, commit txgs
    /// until they are released (an overwrite frees its old blocks only once committed and deferred).
    fn make_space(&mut self, len: u64, copies: u8, rule: SpaceRule) -> Result<()> {
        let mut tries = 0;
        loop {
            match self.check_space(len, copies, rule) {
                Err(PoolError::NoSpace)
                    if (self.alloc.deferred_bytes() > 0 || self.mos.is_dirty())
                        && tries <= self.alloc.defer_txgs() =>
                {
                    self.commit(false)?;
                    tries += 1;
                }
                r => return r,
            }
        }
    }

    fn dir_obj(&self, name: &str) -> Result<u64> {
        self.dir
            .get(name)
            .copied()
            .ok_or_else(|| PoolError::corrupt("pool directory", format!("no '{name}' entry")))
    }

    pub(crate) fn user_props(&mut self) -> Result<BTreeMap<String, String>> {
        let id = self.dir_obj("props")?;
        let vdevs = self.tree.tops.clone();
        let blob = read_blob(&mut self.mos, &vdevs, id)?;
        blob_opts()
            .deserialize(&blob)
            .map_err(|e| PoolError::corrupt("pool properties", e.to_string()))
    }

    /// Allocate `n` blocks of `size` bytes for the open txg (checksums still empty). All or nothing.
    fn alloc_open(
        &mut self,
        vdevs: &[Arc<TopVdev>],
        sizes: &[u64],
        copies: u8,
    ) -> Result<Vec<BlockPtr>> {
        let mut ctx = TxgCtx {
            vdevs,
            usable: vdevs.iter().map(|t| t.state().usable()).collect(),
            alloc: &mut self.alloc,
            txg: self.committed.next(),
            committed: self.committed,
        };
        let mut bps = Vec::with_capacity(sizes.len());
        for &size in sizes {
            match alloc_bp(&mut ctx, size, BlockKind::Data, 0, copies, 1) {
                Ok(bp) => bps.push(bp),
                Err(e) => {
                    for bp in &bps {
                        object::free_bp(&mut ctx, bp);
                    }
                    return Err(e);
                }
            }
        }
        Ok(bps)
    }

    /// Take back the data of open-txg writes that failed on every copy (the commit writes it).
    pub(crate) fn absorb_failed_writes(&mut self) {
        let failed = std::mem::take(&mut lock(&self.inflight.state).1);
        let vdevs = self.tree.tops.clone();
        for (id, blkid, bp) in failed {
            if let Ok(o) = self.mos.obj(&vdevs, id) {
                o.written_failed(blkid, &bp);
            }
        }
    }

    /// Commit when the open txg has grown past its limits (memory held, or data linked).
    fn sync_if_full(&mut self) -> Result<()> {
        if self.mos.dirty_space() > DIRTY_MAX || self.mos.dirty_bytes() > TXG_MAX {
            self.sync_txg()?;
        }
        Ok(())
    }

    pub(crate) fn sync_txg(&mut self) -> Result<()> {
        if let Some(what) = self.closed {
            // Nothing can be made durable any more: say so (an NBD FLUSH must not be acknowledged).
            return Err(PoolError::Unavailable(format!("the pool has been {what}")));
        }
        if !self.is_dirty() {
            if let Some(s) = &self.suspended {
                return Err(PoolError::Suspended(s.clone()));
            }
            return Ok(());
        }
        self.commit(false)
    }

    /// Commit a txg (even an empty one), optionally marked as the clean end of the session.
    pub(crate) fn commit(&mut self, clean: bool) -> Result<()> {
        if let Some(s) = &self.suspended {
            return Err(PoolError::Suspended(s.clone()));
        }
        // Every block the commit links in must have landed.
        self.inflight.wait_idle();
        self.absorb_failed_writes();
        let r = self.sync_inner(clean);
        if let Err(e) = &r {
            tracing::error!("txg {} failed to commit: {e}", self.committed.next());
            self.suspended = Some(e.to_string());
        }
        r
    }

    fn sync_inner(&mut self, clean: bool) -> Result<()> {
        let txg = self.committed.next();
        let vdevs = self.tree.tops.clone();
        // A configuration that records one path for two leaves is never written (opening that path
        // would open one device as two leaves): the commit fails before it writes anything.
        if self.config_dirty {
            crate::devmatch::check_distinct_paths(&self.config)
                .map_err(|r| PoolError::Invalid(format!("bad pool configuration: {r}")))?;
        }
        if self.opened_clean && !self.marked_in_use {
            if let Some(ub) = &self.opened_ub {
                let mut u = ub.clone();
                u.flags &= !label::UB_FLAG_CLEAN;
                self.tree.mark_dirty(&u)?;
            }
            self.marked_in_use = true;
        }
        if let Some(t) = self.discard_after.take() {
            let n = crate::rewind::discard_newer_uberblocks(&self.tree, self.config.pool_guid, t)?;
            tracing::info!(
                "rewound to txg {}: zeroed {n} uberblocks of later txgs",
                t.0
            );
        }
        if !self.opened_clean && !self.invalidated {
            let n = self.alloc.invalidate_newer(&vdevs, self.committed)?;
            if n > 0 {
                tracing::info!("zeroed {n} allocation page copies left by an interrupted commit");
                self.tree.flush_all()?;
            }
            self.invalidated = true;
        }
        self.health_before_commit(txg)?;
        if self.dir_dirty {
            let blob = blob_opts()
                .serialize(&self.dir)
                .map_err(|e| PoolError::Invalid(e.to_string()))?;
            write_blob(self, DIR_OBJ, &blob)?;
            self.dir_dirty = false;
        }
        if self.dir.contains_key("snapshots") {
            self.snaps()?;
        }
        let usable: Vec<bool> = vdevs.iter().map(|t| t.state().usable()).collect();
        let mut ctx = TxgCtx {
            vdevs: &vdevs,
            usable,
            alloc: &mut self.alloc,
            txg,
            committed: self.committed,
        };
        // Volumes first: the blocks they hand to deadlists are appended before those are written.
        self.mos
            .sync_objects(&mut ctx, &|d| d.otype == ObjType::Volume)?;
        crate::snapshot::sync_snapshots(
            &mut self.mos,
            &mut self.snaps,
            &mut self.snaps_dirty,
            &self.dir,
            &mut ctx,
            self.free_budget,
        )?;
        let meta = self.mos.sync(&mut ctx)?;
        // The objset block: allocate first so the recorded per-vdev usage includes it.
        object::free_bp(&mut ctx, &self.root_bp);
        let mut bp = alloc_bp(
            &mut ctx,
            OBJSET_SIZE as u64,
            BlockKind::Objset,
            0,
            OBJSET_COPIES.min(vdevs.len() as u8).max(MOS_COPIES),
            1,
        )?;
        let phys = ObjsetPhys {
            version: ctx.alloc.objset_version(),
            meta,
            alloc_bytes: ctx.alloc.tops.iter().map(|t| t.alloc_bytes).collect(),
        };
        let block = NewBlock {
            data: phys.encode(),
            kind: BlockKind::Objset,
            level: 0,
            copies: 0,
            fill: 1,
        };
        write_allocated(
            &vdevs,
            std::slice::from_mut(&mut bp),
            std::slice::from_ref(&block),
        )?;
        self.alloc.sync(&vdevs, txg)?;
        self.tree.flush_all()?;
        if self.config_dirty {
            self.config.config_txg = txg;
        }
        let mut root = [0u8; BP_SIZE];
        bp.encode_into(&mut root);
        let ub = Uberblock {
            txg,
            timestamp: now_secs(),
            pool_guid: self.config.pool_guid,
            guid_sum: self.config.guid_sum(),
            config_txg: self.config.config_txg,
            root,
            flags: if clean { label::UB_FLAG_CLEAN } else { 0 },
        };
        self.tree
            .sync_labels(self.config_dirty.then_some(&self.config), &ub)?;
        self.root_bp = bp;
        self.committed = txg;
        self.session_commits += 1;
        self.config_dirty = false;
        let oldest_reader = lock(&self.readers).keys().next().copied();
        let released = self.alloc.txg_done(txg, oldest_reader);
        self.autotrim_released(&released);
        Ok(())
    }

    /// Permanent errors per top-level vdev id: the blocks of the error log with a copy on it
    /// (blocks whose pointer cannot be read any more count on no vdev).
    fn unrecoverable_per_top(&mut self) -> HashMap<u32, u64> {
        let mut per_top: HashMap<u32, u64> = HashMap::new();
        let list: Vec<(u64, u64)> = lock(&self.errlog).iter().copied().collect();
        if list.is_empty() {
            return per_top;
        }
        let vdevs = self.tree.tops.clone();
        for (obj, blkid) in list {
            let Ok(o) = self.mos.obj(&vdevs, obj) else {
                continue;
            };
            let Ok(bp) = o.block_pointer(&vdevs, blkid) else {
                continue;
            };
            let mut tops: Vec<u32> = bp
                .dvas
                .iter()
                .filter(|d| !d.is_empty())
                .map(|d| d.vdev)
                .collect();
            tops.sort_unstable();
            tops.dedup();
            for t in tops {
                *per_top.entry(t).or_default() += 1;
            }
        }
        per_top
    }

    fn status(&self) -> PoolStatus {
        let mut tops = Vec::new();
        for t in &self.tree.tops {
            let mut children = Vec::new();
            for c in &t.children {
                let lc = lock(&c.config).clone();
                let st = c.state();
                // Only a mirror child can be resilvered; a single leaf that missed txgs shows it
                // through errors.
                let has_dtl = t.kind == TopKind::Mirror && !lock(&c.dtl).is_empty();
                let reason = match st {
                    VdevState::Online if has_dtl => Some("(resilver needed)".to_string()),
                    VdevState::Online => None,
                    VdevState::Offline => None,
                    _ => lock(&c.reason).clone(),
                };
                let n =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                children.push(VdevStatus {
                    name: leaf_name(&lc.identity.path),
                    vdev_type: "leaf".into(),
                    guid: lc.guid.0,
                    path: Some(lc.identity.path.clone()),
                    phys_path: Some(lc.identity.phys_path.clone()),
                    devid: Some(lc.identity.devid.clone()),
                    state: st.as_str().into(),
                    read_errors: n(&c.stats.read_errors),
                    write_errors: n(&c.stats.write_errors),
                    checksum_errors: n(&c.stats.cksum_errors),
                    repaired_bytes: n(&c.stats.repaired_bytes),
                    reason,
                    reads: n(&c.stats.reads),
                    writes: n(&c.stats.writes),
                    read_bytes: n(&c.stats.read_bytes),
                    write_bytes: n(&c.stats.write_bytes),
                    read_latency_us: n(&c.stats.lat_ewma_ns) / 1000,
                    write_latency_us: n(&c.stats.wlat_ewma_ns) / 1000,
                    slow_ios: n(&c.stats.slow_ios),
                    space: None,
                    dtl: lock(&c.dtl).iter().map(|&(a, b)| (a.0, b.0)).collect(),
                    children: Vec::new(),
                });
            }
            let st = t.state();
            let reason = match (t.kind, st) {
                (_, VdevState::Unavail) => Some("insufficient replicas".to_string()),
                _ => None,
            };
            let space = self
                .alloc
                .tops
                .iter()
                .find(|a| a.id == t.id)
                .map(|a| (a.alloc_bytes, a.asize()));
            if t.kind == TopKind::Single {
                let mut leaf = children.remove(0);
                leaf.space = space;
                tops.push(leaf);
            } else {
                let (name, vtype) = match t.kind {
                    TopKind::Mirror => (format!("mirror-{}", t.id), "mirror"),
                    _ => (format!("stripe-{}", t.id), "stripe"),
                };
                let mut top =
                    VdevStatus::interior(name, vtype, t.guid.0, st.as_str(), reason, children);
                top.space = space;
                tops.push(top);
            }
        }
        let st = self.tree.state();
        let error_count = lock(&self.errlog).len() as u64;
        let leaf_errors = self.tree.leaves().any(|(_, l)| {
            let v = l.stats.persistent();
            v[0] + v[1] + v[2] > 0
        });
        let any_offline = self
            .tree
            .leaves()
            .any(|(_, l)| l.state() == VdevState::Offline);
        let any_faulted = self
            .tree
            .leaves()
            .any(|(_, l)| l.state() == VdevState::Faulted);
        let bad_label = self.tree.leaves().any(|(_, l)| {
            lock(&l.reason)
                .as_deref()
                .is_some_and(|r| r.starts_with("corrupted data"))
        });
        let s = |x: &str| Some(x.to_string());
        let (status, action) = if error_count > 0 {
            (
                s("One or more devices has experienced an error resulting in data corruption. \
                   Applications may be affected."),
                s("Restore the data in question if possible (rewriting a block clears its error), \
                   or restore the pool from backup."),
            )
        } else {
            match st {
                VdevState::Online if leaf_errors => (
                    s("One or more devices has experienced an unrecoverable error. An attempt was \
                       made to correct the error. Applications are unaffected."),
                    s("Determine if the device needs to be replaced, and clear the errors using \
                       'cairn pool clear' or replace the device with 'cairn pool replace'."),
                ),
                VdevState::Online => (None, None),
                VdevState::Degraded if any_faulted => (
                    s("One or more devices are faulted in response to persistent errors. \
                       Sufficient replicas exist for the pool to continue functioning in a \
                       degraded state."),
                    s("Replace the faulted device with 'cairn pool replace', or use \
                       'cairn pool clear' to mark the device repaired."),
                ),
                VdevState::Degraded if any_offline => (
                    s("One or more devices has been taken offline by the administrator. \
                       Sufficient replicas exist for the pool to continue functioning in a \
                       degraded state."),
                    s("Online the device using 'cairn pool online' or replace the device with \
                       'cairn pool replace'."),
                ),
                VdevState::Degraded if bad_label => (
                    s("One or more devices could not be used because the label is missing or \
                       invalid. Sufficient replicas exist for the pool to continue functioning in \
                       a degraded state."),
                    s("Replace the device using 'cairn pool replace'."),
                ),
                VdevState::Degraded => (
                    s("One or more devices could not be opened or are not healthy. Sufficient \
                       replicas exist for the pool to continue functioning in a degraded state."),
                    s("Attach the missing device and online it using 'cairn pool online', or \
                       replace it with 'cairn pool replace'."),
                ),
                _ => (
                    s("One or more devices could not be used; there are insufficient replicas for \
                       some data: reads of it fail with an I/O error."),
                    s("Attach the missing devices and online them, or re-import the pool."),
                ),
            }
        };
        let size = self.alloc.size();
        let allocated = self.alloc.alloc_bytes();
        // A suspended pool says so where zpool does: the state line and the health column.
        let (state, action) = match &self.suspended {
            Some(_) => (
                "SUSPENDED",
                s(
                    "Make sure the affected devices are connected and work, then run \
                   'cairn pool clear'.",
                ),
            ),
            None => (st.as_str(), action),
        };
        let counting_ms = self
            .tree
            .leaves()
            .map(|(_, l)| l.counting_for().as_millis() as u64)
            .max()
            .unwrap_or(0);
        PoolStatus {
            counting_ms,
            name: self.config.name.clone(),
            pool_guid: self.config.pool_guid.0,
            state: state.into(),
            txg: self.committed.0,
            size,
            allocated,
            free: size.saturating_sub(allocated),
            status: if self.suspended.is_some() {
                Some(format!(
                    "The pool is suspended: {}",
                    self.suspended.clone().unwrap_or_default()
                ))
            } else {
                status
            },
            action,
            error_count,
            root: VdevStatus::interior(
                self.config.name.clone(),
                "root",
                self.config.pool_guid.0,
                st.as_str(),
                None,
                tops,
            ),
        }
    }
}

/// Why a leaf of pool `pool` was not found at `path`: the file is missing ("cannot open"), or it is
/// there without a label of this pool (zeroed, damaged or overwritten: "corrupted data").
pub fn missing_leaf_reason(path: &str, pool: Guid, leaf: Guid) -> String {
    let p = Path::new(path);
    if std::fs::metadata(p).is_err() {
        return "cannot open".into();
    }
    match read_leaf_label(p) {
        None => "corrupted data: missing or invalid label".into(),
        Some(l) if l.header.pool_guid != pool => format!(
            "corrupted data: the device now carries a label of pool '{}'",
            l.config.name
        ),
        Some(l) if l.header.leaf_guid != leaf => match l.config.find_leaf(l.header.leaf_guid) {
            // A copy of another leaf of the pool written over this one's file.
            Some((t, c)) => format!(
                "corrupted data: the device holds a copy of leaf {}",
                leaf_name(&l.config.tops[t].children[c].identity.path)
            ),
            None => "corrupted data: the label is not this leaf's".into(),
        },
        // Its label is fine: it was only not among the devices searched or given.
        Some(_) => "cannot open".into(),
    }
}

/// Read only the labels of a leaf path: `None` when it holds no Cairn label.
pub fn read_leaf_label(path: &Path) -> Option<label::Label> {
    let dev = FileLeaf::open(
        path,
        LeafOpen {
            read_only: true,
            lock: false,
        },
    )
    .ok()?;
    let scan = label::scan_leaf(&dev);
    scan.best_label().cloned()
}

/// Whether a label read is valid (for callers that inspect raw label results).
pub fn label_is_valid(r: &LabelRead) -> bool {
    matches!(r, LabelRead::Valid(_))
}
