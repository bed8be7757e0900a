//! `cairn inject`: faults on the leaves of pools served by the daemon, in the spirit of zinject.
//!
//! Faults live in the daemon's memory (they act on its open leaves through the fault-injecting leaf
//! wrapper every leaf has) and vanish when it stops. Each fault gets a daemon-wide id.

use crate::ctx::Ctx;
use crate::size::parse_size;
use crate::{outln, CmdError, InjectArgs};
use cairn_vdev::testleaf::{Fault, FaultIo, FaultKind, FaultSet};
use cairn_vdev::units::lock;
use std::sync::{Arc, Mutex};

/// One injected fault as the daemon keeps it.
pub struct Injected {
    pub id: u64,
    pub pool: String,
    pub leaf: String,
    pub set: Arc<FaultSet>,
    pub local: u64,
    pub fault: Fault,
}

#[derive(Default)]
pub struct Injections {
    next: Mutex<u64>,
    list: Mutex<Vec<Injected>>,
}

impl Injections {
    fn add(&self, pool: &str, leaf: &str, set: Arc<FaultSet>, fault: Fault) -> u64 {
        let local = set.add(fault.clone());
        let mut n = lock(&self.next);
        *n += 1;
        let id = *n;
        lock(&self.list).push(Injected {
            id,
            pool: pool.to_string(),
            leaf: leaf.to_string(),
            set,
            local,
            fault,
        });
        id
    }

    /// Forget the faults of a pool that was exported or destroyed.
    pub fn drop_pool(&self, pool: &str) {
        lock(&self.list).retain(|i| i.pool != pool);
    }
}

type CmdResult = Result<(), Vec<CmdError>>;

fn one(e: CmdError) -> Vec<CmdError> {
    vec![e]
}

fn parse_io(s: Option<&str>) -> Result<FaultIo, String> {
    match s.unwrap_or("all") {
        "read" => Ok(FaultIo::Read),
        "write" => Ok(FaultIo::Write),
        "all" => Ok(FaultIo::All),
        x => Err(format!("bad I/O type '{x}': read, write or all")),
    }
}

fn describe(f: &Fault) -> (String, String) {
    let kind = match f.kind {
        FaultKind::Io => "io".to_string(),
        FaultKind::Nxio => "nxio".to_string(),
        FaultKind::CorruptRead => "corrupt(read)".to_string(),
        FaultKind::CorruptWrite => "corrupt(write)".to_string(),
        FaultKind::Latency { ms } => format!("latency {ms}ms"),
        FaultKind::Drop => "drop".to_string(),
        FaultKind::Torn => "torn".to_string(),
    };
    let io = match f.io {
        FaultIo::Read => "read",
        FaultIo::Write => "write",
        FaultIo::All => "all",
    };
    (kind, io.to_string())
}

pub fn run(ctx: &mut Ctx, a: InjectArgs) -> CmdResult {
    let name = a.pool.clone().unwrap_or_default();
    let err = |r: String| one(CmdError::new("inject", &name, r));
    let Some(inj) = ctx.pools.injections() else {
        return Err(err(
            "faults are injected into a running pool: start 'cairn serve' first".into(),
        ));
    };
    if a.list {
        let list = lock(&inj.list);
        let mut t = crate::output::Table::new(
            ["ID", "POOL", "LEAF", "TYPE", "IO", "PERCENT", "RANGE"],
            vec![true, false, false, false, false, true, false],
        );
        for i in list
            .iter()
            .filter(|i| a.pool.as_deref().is_none_or(|p| p == i.pool))
        {
            let (k, io) = describe(&i.fault);
            t.push([
                i.id.to_string(),
                i.pool.clone(),
                i.leaf.clone(),
                k,
                io,
                format!("{}", i.fault.percent),
                i.fault
                    .range
                    .map(|(o, l)| format!("{o}:{l}"))
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        crate::out!(ctx, "{}", t.render(false));
        return Ok(());
    }
    if let Some(c) = &a.clear {
        let mut list = lock(&inj.list);
        let before = list.len();
        list.retain(|i| {
            let hit = (c == "all" && a.pool.as_deref().is_none_or(|p| p == i.pool))
                || i.id.to_string() == *c;
            if hit {
                i.set.clear(i.local);
            }
            !hit
        });
        if list.len() == before && c != "all" {
            return Err(one(CmdError::new("clear", c, "no such fault")));
        }
        return Ok(());
    }
    let Some(pool_name) = a.pool.clone() else {
        return Err(err("missing pool name".into()));
    };
    let pool = ctx.pools.get(ctx.sd, &pool_name, "inject").map_err(one)?;
    let kind = a
        .kind
        .clone()
        .ok_or_else(|| err("missing -e TYPE".into()))?;
    let percent = a.percent.unwrap_or(100.0);
    if !(0.0..=100.0).contains(&percent) {
        return Err(err(format!("bad percentage {percent}")));
    }
    if let Some(ds) = &a.dataset {
        // One block of a volume.
        let offset = parse_size(
            a.offset
                .as_deref()
                .ok_or_else(|| err("-t needs --offset".into()))?,
        )
        .map_err(err)?;
        let (object, volsize) =
            cairn_dataset::object_and_size(&pool, ds).map_err(|e| err(format!("{ds}: {e}")))?;
        if offset >= volsize {
            return Err(err(format!(
                "offset {offset} is past the end of {ds} ({volsize} bytes)"
            )));
        }
        let copies = pool.block_copies(object, offset).map_err(|e| match e {
            cairn_pool::PoolError::NotFound(_) => err(format!(
                "offset {offset} of {ds} holds no data yet (an unwritten block has no copies \
                     to damage): write it first"
            )),
            e => err(e.to_string()),
        })?;
        let fk = match kind.as_str() {
            "checksum" => FaultKind::CorruptRead,
            "io" => FaultKind::Io,
            x => return Err(err(format!("bad block fault '{x}': checksum or io"))),
        };
        let mut ids = Vec::new();
        for (i, c) in copies.iter().enumerate() {
            if a.copy.is_some_and(|want| want != i) {
                continue;
            }
            let (leaf, set) = pool.leaf_faults(&c.leaf).map_err(|e| err(e.to_string()))?;
            let f = Fault::new(fk, FaultIo::Read)
                .with_percent(percent)
                .with_range(c.offset, c.len);
            ids.push(inj.add(&pool_name, &leaf, set, f));
        }
        if ids.is_empty() {
            return Err(err(format!(
                "the block has {} copies (0..{})",
                copies.len(),
                copies.len().saturating_sub(1)
            )));
        }
        for id in ids {
            outln!(ctx, "{id}");
        }
        return Ok(());
    }
    let leaf_arg = a
        .leaf
        .clone()
        .ok_or_else(|| err("missing -d LEAF or -t DATASET".into()))?;
    let io = parse_io(a.io.as_deref()).map_err(err)?;
    let fk = match kind.as_str() {
        "io" => FaultKind::Io,
        "nxio" => FaultKind::Nxio,
        "corrupt" if io == FaultIo::Write => FaultKind::CorruptWrite,
        "corrupt" => FaultKind::CorruptRead,
        "latency" => FaultKind::Latency {
            ms: a
                .delay
                .ok_or_else(|| err("latency needs --delay MS".into()))?,
        },
        "drop" => FaultKind::Drop,
        "torn" => FaultKind::Torn,
        x => {
            return Err(err(format!(
                "bad fault type '{x}': io, nxio, corrupt, latency, drop or torn"
            )))
        }
    };
    let mut f = Fault::new(fk, io).with_percent(percent);
    if let Some(r) = &a.range {
        let (o, l) = r
            .split_once(':')
            .ok_or_else(|| err(format!("bad range '{r}': OFFSET:LENGTH")))?;
        f = f.with_range(parse_size(o).map_err(err)?, parse_size(l).map_err(err)?);
    }
    let (leaf, set) = pool
        .leaf_faults(&leaf_arg)
        .map_err(|e| err(e.to_string()))?;
    let id = inj.add(&pool_name, &leaf, set, f);
    outln!(ctx, "{id}");
    Ok(())
}
