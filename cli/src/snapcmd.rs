//! The snapshot commands of `cairn dataset`: snapshot, rollback, clone, rename, hold, release,
//! holds. The rules are the dataset crate's; this file parses, prints and records history.

use crate::ctx::Ctx;
use crate::datasetcmd::{dataset_pool, pool_of, reason, split_assignment};
use crate::names::validate_snapshot_name;
use crate::output::Table;
use crate::{outln, CmdError, DatasetCmd};
use cairn_dataset::{self as ds, DestroyOpts};
use cairn_pool::Pool;
use std::sync::Arc;

type CmdResult = Result<(), Vec<CmdError>>;

fn one(e: CmdError) -> Vec<CmdError> {
    vec![e]
}

/// The pool of a snapshot name, checked.
fn snap_pool(ctx: &mut Ctx, name: &str, verb: &str) -> Result<Arc<Pool>, Vec<CmdError>> {
    let (p, _, _) = validate_snapshot_name(name).map_err(|r| {
        one(CmdError::new(
            verb,
            name,
            format!("invalid snapshot name: {r}"),
        ))
    })?;
    dataset_pool(ctx, &p, name, verb)
}

fn log(ctx: &Ctx, pool: &Pool, cmdline: &str, verb: &str, name: &str) -> CmdResult {
    pool.log_history(cmdline, &ctx.sd.hostname())
        .and_then(|()| pool.sync())
        .map_err(|e| one(CmdError::new(verb, name, e.to_string())))
}

pub fn run(ctx: &mut Ctx, cmd: DatasetCmd, cmdline: &str) -> CmdResult {
    match cmd {
        DatasetCmd::Snapshot { names, .. } => snapshot(ctx, &names, cmdline),
        DatasetCmd::Rollback {
            recursive,
            clones,
            name,
        } => {
            let pool = snap_pool(ctx, &name, "rollback")?;
            // Snapshots that -r would destroy must not be served.
            let vol = name.split('@').next().unwrap_or("");
            let snaps = ds::list_all(&pool, false, true, Some(vol)).unwrap_or_default();
            let txg_of = |d: &ds::DatasetInfo| match d {
                ds::DatasetInfo::Snapshot(s) => s.record.txg,
                _ => 0,
            };
            let target = snaps.iter().find(|d| d.name() == name).map(txg_of);
            if let Some(t) = target {
                let busy: Vec<&str> = snaps
                    .iter()
                    .filter(|d| txg_of(d) > t && ctx.pools.in_use(d.name()))
                    .map(|d| d.name())
                    .collect();
                if !busy.is_empty() && recursive {
                    return Err(one(CmdError::new(
                        "rollback to",
                        &name,
                        format!(
                            "dataset is busy: an NBD client is connected to {}",
                            busy.join(", ")
                        ),
                    )));
                }
            }
            let gone = ds::rollback(
                &pool,
                &name,
                DestroyOpts {
                    recursive: recursive || clones,
                    clones,
                    dry_run: false,
                },
            )
            .map_err(|e| one(CmdError::new("rollback to", &name, reason(e))))?;
            for g in gone {
                outln!(ctx, "destroyed {g}");
            }
            log(ctx, &pool, cmdline, "rollback to", &name)
        }
        DatasetCmd::Clone {
            props,
            origin,
            target,
        } => {
            let err = |r: String| one(CmdError::new("create", &target, r));
            let mut pv = Vec::new();
            for p in &props {
                pv.push(split_assignment(p).map_err(err)?);
            }
            pool_of(&target, "create")?;
            let pool = snap_pool(ctx, &origin, "clone")?;
            ds::clone(&pool, &origin, &target, &pv).map_err(|e| err(reason(e)))?;
            log(ctx, &pool, cmdline, "create", &target)
        }
        DatasetCmd::Promote { name } => {
            let err = |r: String| one(CmdError::new("promote", &name, r));
            let p = pool_of(&name, "promote")?;
            if name.contains('@') {
                return Err(err("a snapshot cannot be promoted: name the clone".into()));
            }
            let pool = dataset_pool(ctx, &p, &name, "promote")?;
            ds::promote(&pool, &name).map_err(|e| err(reason(e)))?;
            log(ctx, &pool, cmdline, "promote", &name)
        }
        DatasetCmd::Rename { from, to } => {
            let err = |r: String| one(CmdError::new("rename", &from, r));
            let p = pool_of(&from, "rename")?;
            if to.contains('@') {
                validate_snapshot_name(&to)
                    .map_err(|r| err(format!("invalid name '{to}': {r}")))?;
            } else {
                pool_of(&to, "rename")?;
            }
            let pool = dataset_pool(ctx, &p, &from, "rename")?;
            if ctx.pools.in_use(&from) {
                return Err(err(
                    "dataset is busy: an NBD client is connected to it".into()
                ));
            }
            ds::rename(&pool, &from, &to).map_err(|e| err(reason(e)))?;
            log(ctx, &pool, cmdline, "rename", &from)
        }
        DatasetCmd::Hold { tag, names } => hold(ctx, &tag, &names, true, cmdline),
        DatasetCmd::Release { tag, names } => hold(ctx, &tag, &names, false, cmdline),
        DatasetCmd::Holds { scripted, names } => holds(ctx, scripted, &names),
        DatasetCmd::Diff {
            json,
            scripted,
            from,
            to,
        } => diff(ctx, &from, to.as_deref(), json, scripted),
        _ => unreachable!("dataset commands are dispatched by datasetcmd::run"),
    }
}

fn snapshot(ctx: &mut Ctx, names: &[String], cmdline: &str) -> CmdResult {
    let mut pool_name: Option<String> = None;
    for n in names {
        let (p, _, _) = validate_snapshot_name(n).map_err(|r| {
            one(CmdError::new(
                "create snapshot",
                n,
                format!("invalid snapshot name: {r}"),
            ))
        })?;
        match &pool_name {
            Some(q) if *q != p => {
                return Err(one(CmdError::new(
                    "create snapshot",
                    n,
                    "snapshots taken together must be in one pool",
                )))
            }
            _ => pool_name = Some(p),
        }
    }
    let first = names.first().cloned().unwrap_or_default();
    let p = pool_name.unwrap_or_default();
    let pool = dataset_pool(ctx, &p, &first, "create snapshot")?;
    ds::snapshot(&pool, names).map_err(|e| {
        let r = reason(e);
        // Name the snapshot that is wrong when one is.
        let bad = names
            .iter()
            .find(|n| {
                ds::get_any(&pool, n).is_ok()
                    || ds::get_any(&pool, n.split('@').next().unwrap_or("")).is_err()
            })
            .cloned()
            .unwrap_or(first.clone());
        one(CmdError::new("create snapshot", &bad, r))
    })?;
    log(ctx, &pool, cmdline, "create snapshot", &first)
}

fn hold(ctx: &mut Ctx, tag: &str, names: &[String], add: bool, cmdline: &str) -> CmdResult {
    let verb = if add { "hold" } else { "release" };
    let first = names.first().cloned().unwrap_or_default();
    let pool = snap_pool(ctx, &first, verb)?;
    for n in names {
        validate_snapshot_name(n).map_err(|r| {
            one(CmdError::new(
                verb,
                n,
                format!("invalid snapshot name: {r}"),
            ))
        })?;
    }
    ds::hold(&pool, tag, names, add).map_err(|e| {
        let r = match e {
            ds::DatasetError::Exists => format!("tag already exists on this dataset: '{tag}'"),
            e => reason(e),
        };
        one(CmdError::new(verb, &first, r))
    })?;
    log(ctx, &pool, cmdline, verb, &first)
}

fn holds(ctx: &mut Ctx, scripted: bool, names: &[String]) -> CmdResult {
    let mut t = Table::new(
        vec![
            "NAME".to_string(),
            "TAG".to_string(),
            "TIMESTAMP".to_string(),
        ],
        vec![false, false, false],
    );
    let mut errs = Vec::new();
    for n in names {
        let pool = match snap_pool(ctx, n, "get holds for") {
            Ok(p) => p,
            Err(mut e) => {
                errs.append(&mut e);
                continue;
            }
        };
        match ds::holds(&pool, n) {
            Ok(h) => {
                for (tag, at) in h {
                    t.push([n.clone(), tag, crate::poolcmd::format_time(at)]);
                }
            }
            Err(e) => errs.push(CmdError::new("get holds for", n, reason(e))),
        }
    }
    crate::out!(ctx, "{}", t.render(scripted));
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

fn diff(ctx: &mut Ctx, from: &str, to: Option<&str>, json: bool, scripted: bool) -> CmdResult {
    let err = |r: String| one(CmdError::new("diff", from, r));
    let pool = snap_pool(ctx, from, "diff")?;
    if let Some(t) = to {
        let tp = crate::datasetcmd::pool_of(t, "diff")?;
        if tp != pool.name() {
            return Err(err(format!("'{t}' is in another pool")));
        }
    }
    let ranges = ds::diff(&pool, from, to).map_err(|e| err(reason(e)))?;
    if json {
        let v: Vec<serde_json::Value> = ranges
            .iter()
            .map(|(o, l)| serde_json::json!({"offset": o, "length": l}))
            .collect();
        ctx.print_json("cairn dataset diff", "ranges", serde_json::Value::Array(v));
        return Ok(());
    }
    let mut t = Table::new(
        vec!["OFFSET".to_string(), "LENGTH".to_string()],
        vec![true, true],
    );
    for (o, l) in ranges {
        t.push([o.to_string(), l.to_string()]);
    }
    crate::out!(ctx, "{}", t.render(scripted));
    Ok(())
}
