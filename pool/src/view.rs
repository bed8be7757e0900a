//! Consistent reads: [`Pool::consistently`] runs a closure under one hold of the pool lock, and
//! everything it reads through the [`View`] (named blobs such as the dataset registry, object
//! info, space figures, snapshot links and deadlist sizes) belongs to one state of the pool.
//!
//! Every change that must be seen whole (a volume's object and its registry record, a snapshot and
//! its links) is made under the same lock in one [`Pool::atomically`], so a reader sees it before
//! or after, never between. Reading a blob under one acquisition and then the objects it names
//! under others is what let `dataset list` fail with `object N does not exist` while another
//! volume was destroyed (issue 15, item 3).
//!
//! A view never changes anything and needs no writable pool (a read-only import reads through it).
//! Do not call [`Pool`] methods from inside the closure: they take the same lock (deadlock).

use crate::error::Result;
use crate::object::ObjType;
use crate::pool::{Inner, Pool};
use crate::snapshot::{DsSpace, SnapTable, Tx};
use std::collections::BTreeMap;

/// Read access to one state of the pool (see the module documentation).
pub struct View<'a> {
    pub(crate) inner: &'a mut Inner,
}

impl View<'_> {
    /// The contents of a named blob of the pool directory (None if never written).
    pub fn read_named_blob(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        self.inner.read_named_blob(name)
    }

    /// (type, logical size, allocated bytes, block size) of an object.
    pub fn object_info(&mut self, id: u64) -> Result<(ObjType, u64, u64, usize)> {
        let vdevs = self.inner.tree.tops.clone();
        let d = self.inner.mos.obj(&vdevs, id)?.dnode;
        Ok((d.otype, d.size, d.used, d.block_size()))
    }

    /// The compression new whole data blocks of object `id` get.
    pub fn object_compression(&mut self, id: u64) -> Result<crate::compress::Compression> {
        let vdevs = self.inner.tree.tops.clone();
        let b = self.inner.mos.obj(&vdevs, id)?.dnode.compression;
        Ok(crate::compress::Compression::from_byte(b).unwrap_or_default())
    }

    /// See [`Pool::space`].
    pub fn space(&self) -> (u64, u64, u64) {
        self.inner.space()
    }

    /// See [`Pool::snapshot_links`].
    pub fn links(&mut self) -> Result<SnapTable> {
        Ok(self.inner.snaps()?.clone())
    }

    /// See [`Pool::ds_space`].
    pub fn ds_space(&mut self, extra: &[u64]) -> Result<BTreeMap<u64, DsSpace>> {
        self.inner.ds_space(extra)
    }

    /// See [`Pool::unique_bytes`].
    pub fn unique_bytes(&mut self, id: u64) -> Result<u64> {
        self.inner.unique_bytes(id)
    }

    /// See [`Pool::objects_filled`].
    pub fn objects_filled(&mut self, ids: &[u64]) -> Result<BTreeMap<u64, u64>> {
        let vdevs = self.inner.tree.tops.clone();
        let mut out = BTreeMap::new();
        for &id in ids {
            let o = self.inner.mos.obj(&vdevs, id)?;
            out.insert(id, o.dnode.root.fill);
        }
        Ok(out)
    }
}

impl Pool {
    /// Run `f` under the pool lock with read access to one state of the pool: no change made under
    /// the lock ([`Pool::atomically`], every object and blob update) lands while it runs.
    pub fn consistently<T>(&self, f: impl FnOnce(&mut View) -> T) -> T {
        let mut g = self.lock();
        f(&mut View { inner: &mut g })
    }
}

impl Tx<'_> {
    /// The same reads inside a transaction (they see its changes so far).
    pub fn view(&mut self) -> View<'_> {
        View { inner: self.inner }
    }
}
