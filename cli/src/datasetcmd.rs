//! The `cairn dataset` commands: create, list, get, set, destroy (the snapshot commands are in
//! `snapcmd.rs`).

use crate::ctx::Ctx;
use crate::names::{validate_any_name, validate_pool_name};
use crate::output::{render_get, select_columns, Table};
use crate::size::{format_compact, parse_size};
use crate::{out, outln, CmdError, DatasetCmd, ListFlags};
use cairn_dataset::{self as ds, CreateVolume, DatasetError, DatasetInfo, DestroyOpts};
use cairn_pool::Pool;
use serde_json::{json, Map, Value};
use std::sync::Arc;

type CmdResult = Result<(), Vec<CmdError>>;

fn one(e: CmdError) -> Vec<CmdError> {
    vec![e]
}

pub fn run(ctx: &mut Ctx, cmd: DatasetCmd) -> CmdResult {
    let cmdline = ctx.cmdline.clone();
    match cmd {
        DatasetCmd::Create {
            volsize,
            sparse,
            blocksize,
            props,
            name,
        } => create(
            ctx,
            &volsize,
            sparse,
            blocksize.as_deref(),
            &props,
            &name,
            &cmdline,
        ),
        DatasetCmd::List {
            types,
            recursive,
            depth,
            sort,
            sort_desc,
            flags,
            cols,
            names,
        } => list(
            ctx,
            &ListReq {
                types: types.as_deref(),
                recursive: recursive || depth.is_some_and(|d| d > 0),
                sort: &sort,
                sort_desc: &sort_desc,
            },
            &flags,
            cols.as_deref(),
            &names,
        ),
        DatasetCmd::Get {
            flags,
            fields,
            props,
            names,
        } => get(ctx, &flags, fields.as_deref(), &props, &names),
        DatasetCmd::Set { assignment, name } => set(ctx, &assignment, &name, &cmdline),
        DatasetCmd::Destroy {
            recursive,
            clones,
            dry_run,
            verbose,
            name,
        } => destroy(
            ctx,
            &name,
            DestroyOpts {
                recursive,
                clones,
                dry_run,
            },
            verbose,
            &cmdline,
        ),
        other => crate::snapcmd::run(ctx, other, &cmdline),
    }
}

pub(crate) const SIZE_PROPS: &[&str] = &[
    "used",
    "available",
    "referenced",
    "volsize",
    "volblocksize",
    "refreservation",
    "usedbydataset",
    "usedbysnapshots",
    "usedbyrefreservation",
    "usedbychildren",
    "written",
    "logicalreferenced",
];

pub(crate) fn reason(e: DatasetError) -> String {
    match e {
        DatasetError::Pool(p) => p.to_string(),
        DatasetError::TooBig { needed, available } => format!(
            "size is greater than available space ({} needed, {} available)",
            format_compact(needed),
            format_compact(available)
        ),
        DatasetError::SnapshotNoSpace { needed, available } => format!(
            "out of space: keeping the refreservation after the snapshot needs {} outside \
             reservations, {} available",
            format_compact(needed),
            format_compact(available)
        ),
        e => e.to_string(),
    }
}

/// Turn a user value into what the dataset layer stores (sizes in bytes).
fn normalise(prop: &str, v: &str) -> Result<String, String> {
    match prop {
        "volsize" => Ok(parse_size(v)?.to_string()),
        "refreservation" if v != "none" && v != "auto" => Ok(parse_size(v)?.to_string()),
        _ => Ok(v.to_string()),
    }
}

pub(crate) fn split_assignment(a: &str) -> Result<(String, String), String> {
    let (k, v) = a
        .split_once('=')
        .ok_or_else(|| format!("bad property assignment '{a}': expected PROP=VALUE"))?;
    Ok((k.to_string(), normalise(k, v)?))
}

/// The pool of dataset `name`; an error names the dataset, as zfs's ("cannot create 'nopool/v':
/// no such pool 'nopool'").
pub(crate) fn dataset_pool(
    ctx: &mut Ctx,
    pool_name: &str,
    name: &str,
    verb: &str,
) -> Result<Arc<Pool>, Vec<CmdError>> {
    ctx.pools.get(ctx.sd, pool_name, verb).map_err(|mut e| {
        if e.reason == "no such pool" {
            e.reason = format!("no such pool '{pool_name}'");
            e.name = name.to_string();
        }
        one(e)
    })
}

/// Validate a dataset (volume or snapshot) name and return its pool.
pub(crate) fn pool_of(name: &str, verb: &str) -> Result<String, Vec<CmdError>> {
    validate_any_name(name).map_err(|r| {
        one(CmdError::new(
            verb,
            name,
            format!("invalid dataset name: {r}"),
        ))
    })
}

fn create(
    ctx: &mut Ctx,
    volsize: &str,
    sparse: bool,
    blocksize: Option<&str>,
    props: &[String],
    name: &str,
    cmdline: &str,
) -> CmdResult {
    let err = |r: String| one(CmdError::new("create", name, r));
    let pool_name = pool_of(name, "create")?;
    let volsize = parse_size(volsize).map_err(|r| err(format!("bad volume size: {r}")))?;
    let volblocksize = match blocksize {
        Some(b) => parse_size(b).map_err(|r| err(format!("bad volblocksize: {r}")))?,
        None => ds::DEFAULT_BLOCKSIZE,
    };
    let mut pv = Vec::new();
    for p in props {
        let (k, v) = split_assignment(p).map_err(err)?;
        if k == "volblocksize" {
            return Err(err("use -b to set volblocksize".into()));
        }
        pv.push((k, v));
    }
    let pool = dataset_pool(ctx, &pool_name, name, "create")?;
    ds::create_volume(
        &pool,
        name,
        &CreateVolume {
            volsize,
            volblocksize,
            sparse,
            props: pv,
        },
    )
    .map_err(|e| err(reason(e)))?;
    pool.log_history(cmdline, &ctx.sd.hostname())
        .and_then(|()| pool.sync())
        .map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn prop_value(v: &DatasetInfo, prop: &str, parsable: bool) -> Option<(String, String)> {
    if prop == "name" {
        return Some((v.name().to_string(), "-".into()));
    }
    if prop == "mountpoint" {
        return Some(("-".into(), "-".into()));
    }
    let (_, val, src) = v.props().into_iter().find(|(k, _, _)| k == prop)?;
    let sized = SIZE_PROPS.contains(&prop) || prop.starts_with("written@");
    let shown = if !parsable && sized {
        val.parse::<u64>().map(format_compact).unwrap_or(val)
    } else if !parsable && prop == "creation" {
        val.parse::<u64>()
            .map(crate::poolcmd::format_time)
            .unwrap_or(val)
    } else {
        val
    };
    Some((shown, src))
}

/// Datasets named (or all of all pools), and the errors of those that could not be read.
type Collected = (Vec<DatasetInfo>, Vec<CmdError>);

/// Datasets named (or every one of every pool): volumes and/or snapshots as `want` says; a
/// volume named with `recursive` brings its snapshots.
fn collect(
    ctx: &mut Ctx,
    names: &[String],
    verb: &str,
    want: (bool, bool),
    recursive: bool,
) -> Result<Collected, Vec<CmdError>> {
    let (vols, snaps) = want;
    let mut out = Vec::new();
    let mut errs = Vec::new();
    if names.is_empty() {
        let pools = ctx
            .sd
            .load_cache()
            .map_err(|e| one(CmdError::new(verb, "", e.to_string())))?;
        for p in pools {
            match ctx.pools.get(ctx.sd, &p.name, verb) {
                Ok(pool) => match ds::list_all(&pool, vols, snaps, None) {
                    Ok(v) => out.extend(v),
                    Err(e) => errs.push(CmdError::new(verb, &p.name, reason(e))),
                },
                Err(e) => errs.push(e),
            }
        }
    } else {
        for n in names {
            // A pool name is the root of its datasets: list shows its volumes.
            if verb == "list" && !n.contains('/') && validate_pool_name(n).is_ok() {
                match ctx.pools.get(ctx.sd, n, verb) {
                    Ok(pool) => match ds::list_all(&pool, vols, snaps && recursive, None) {
                        Ok(v) => out.extend(v),
                        Err(e) => errs.push(CmdError::new(verb, n, reason(e))),
                    },
                    Err(e) => errs.push(CmdError::new(verb, n, e.reason)),
                }
                continue;
            }
            let pool_name = match pool_of(n, verb) {
                Ok(p) => p,
                Err(mut e) => {
                    errs.append(&mut e);
                    continue;
                }
            };
            let got = match ctx.pools.get(ctx.sd, &pool_name, verb) {
                Ok(pool) if verb == "list" && !n.contains('@') && (recursive || !vols) => {
                    // A volume named: itself (if volumes are listed) and, with -r or
                    // -t snapshot, its snapshots.
                    ds::list_all(&pool, vols, snaps, Some(n))
                }
                Ok(pool) => ds::get_any(&pool, n).map(|v| vec![v]),
                Err(e) => {
                    errs.push(CmdError::new(verb, n, e.reason));
                    continue;
                }
            };
            match got {
                Ok(v) => out.extend(v),
                Err(e) => errs.push(CmdError::new(verb, n, reason(e))),
            }
        }
    }
    Ok((out, errs))
}

/// What was printed succeeded; any dataset or pool that could not be read makes the exit code 1.
fn done(errs: Vec<CmdError>) -> CmdResult {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

const LIST_COLS: &[&str] = &[
    "name",
    "used",
    "available",
    "referenced",
    "mountpoint",
    "volsize",
    "volblocksize",
    "refreservation",
    "readonly",
    "checksum",
    "copies",
    "creation",
    "type",
    "guid",
    "usedbydataset",
    "usedbysnapshots",
    "usedbyrefreservation",
    "usedbychildren",
    "written",
    "logicalreferenced",
    "origin",
    "clones",
    "createtxg",
    "userrefs",
    "snapshot_count",
];

/// What `list` is asked for besides columns.
struct ListReq<'a> {
    types: Option<&'a str>,
    recursive: bool,
    sort: &'a [String],
    sort_desc: &'a [String],
}

fn list(
    ctx: &mut Ctx,
    req: &ListReq,
    flags: &ListFlags,
    cols: Option<&str>,
    names: &[String],
) -> CmdResult {
    // zfs's default: volumes only, unless snapshots are asked for.
    let (mut want_volumes, mut want_snaps) = (req.types.is_none(), false);
    if let Some(t) = req.types {
        for x in t.split(',') {
            match x {
                "volume" => want_volumes = true,
                "snapshot" | "snap" => want_snaps = true,
                "all" => (want_volumes, want_snaps) = (true, true),
                "filesystem" => {}
                other => {
                    return Err(one(CmdError::usage(
                        "list",
                        format!("invalid type '{other}' for -t (volume, snapshot or all)"),
                    )))
                }
            }
        }
    }
    if req.types.is_none() && req.recursive && !names.is_empty() {
        want_snaps = true;
    }
    // zfs's aliases for columns.
    let cols = cols.map(|c| {
        c.split(',')
            .map(|x| match x {
                "avail" => "available",
                "refer" => "referenced",
                "volblock" => "volblocksize",
                "refreserv" => "refreservation",
                "rdonly" => "readonly",
                "usedsnap" => "usedbysnapshots",
                "usedds" => "usedbydataset",
                "usedrefreserv" => "usedbyrefreservation",
                "usedchild" => "usedbychildren",
                "lrefer" => "logicalreferenced",
                "space" => "name,available,used,usedbysnapshots,usedbydataset,usedbyrefreservation,usedbychildren",
                x => x,
            })
            .collect::<Vec<_>>()
            .join(",")
    });
    // Columns: the native properties, and user properties (`module:property`), as zfs list -o.
    let requested = cols
        .as_deref()
        .unwrap_or("name,used,available,referenced,mountpoint");
    // Native names are checked, and empty ones refused; user properties are whatever volumes hold.
    let usage = |r: String| one(CmdError::usage("list", r));
    if requested.split(',').any(str::is_empty) {
        select_columns(LIST_COLS, Some(requested)).map_err(usage)?;
    }
    let native: Vec<&str> = requested.split(',').filter(|c| !c.contains(':')).collect();
    if !native.is_empty() {
        select_columns(LIST_COLS, Some(&native.join(","))).map_err(usage)?;
    }
    let sel: Vec<String> = requested
        .split(',')
        .map(|c| {
            LIST_COLS
                .iter()
                .find(|n| n.eq_ignore_ascii_case(c))
                .map_or_else(|| c.to_string(), |n| n.to_string())
        })
        .collect();
    let (mut vols, errs) = collect(
        ctx,
        names,
        "list",
        (want_volumes, want_snaps),
        req.recursive,
    )?;
    sort_datasets(&mut vols, req.sort, req.sort_desc).map_err(usage)?;
    if flags.json {
        let mut m = Map::new();
        for v in &vols {
            let mut props = Map::new();
            for c in &sel {
                if let Some((val, src)) = prop_value(v, c, flags.parsable) {
                    props.insert(
                        c.clone(),
                        json!({"value": val, "source": {"type": src.to_uppercase(), "data": "-"}}),
                    );
                }
            }
            let kind = if v.is_snapshot() {
                "SNAPSHOT"
            } else {
                "VOLUME"
            };
            m.insert(
                v.name().to_string(),
                json!({"name": v.name(), "type": kind, "pool": v.name().split('/').next(),
                       "properties": props}),
            );
        }
        ctx.print_json("cairn dataset list", "datasets", Value::Object(m));
        return done(errs);
    }
    if vols.is_empty() {
        if !flags.scripted && errs.is_empty() {
            outln!(ctx, "no datasets available");
        }
        return done(errs);
    }
    let headers: Vec<String> = sel
        .iter()
        .map(|c| match c.as_str() {
            "available" => "AVAIL".to_string(),
            "referenced" => "REFER".to_string(),
            "usedbysnapshots" => "USEDSNAP".to_string(),
            "usedbydataset" => "USEDDS".to_string(),
            "usedbyrefreservation" => "USEDREFRESERV".to_string(),
            "usedbychildren" => "USEDCHILD".to_string(),
            "logicalreferenced" => "LREFER".to_string(),
            // zfs shows user properties' names as they are.
            c if c.contains(':') => c.to_string(),
            c => c.to_uppercase(),
        })
        .collect();
    let right: Vec<bool> = sel
        .iter()
        .map(|c| SIZE_PROPS.contains(&c.as_str()) || c == "copies")
        .collect();
    let mut t = Table::new(headers, right);
    for v in &vols {
        t.push(sel.iter().map(|c| {
            prop_value(v, c, flags.parsable)
                .map(|x| x.0)
                .unwrap_or_else(|| "-".into())
        }));
    }
    out!(ctx, "{}", t.render(flags.scripted));
    done(errs)
}

fn get(
    ctx: &mut Ctx,
    flags: &ListFlags,
    fields: Option<&str>,
    props: &str,
    names: &[String],
) -> CmdResult {
    if names.is_empty() {
        return Err(one(CmdError::new("get", props, "missing dataset name")));
    }
    let (vols, errs) = collect(ctx, names, "get", (true, true), false)?;
    if vols.is_empty() && !errs.is_empty() {
        return Err(errs);
    }
    let wanted: Vec<String> = props.split(',').map(|s| s.trim().to_string()).collect();
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut jm = Map::new();
    for v in &vols {
        let list: Vec<String> = if wanted.iter().any(|w| w == "all") {
            v.props().into_iter().map(|(k, _, _)| k).collect()
        } else {
            wanted.clone()
        };
        let mut pj = Map::new();
        for p in list {
            let got = match p.strip_prefix("written@") {
                Some(snap) => written_at(ctx, v, snap, flags.parsable),
                None => prop_value(v, &p, flags.parsable),
            };
            // A property of the other dataset type (`origin` of a snapshot, `clones` of a
            // volume) and an unset user property read `-`, as in zfs; an unknown one is an error.
            let known = || {
                LIST_COLS.contains(&p.as_str())
                    || p.contains(':')
                    || vols
                        .iter()
                        .any(|o| o.props().iter().any(|(k, _, _)| *k == p))
            };
            let (val, src) = match got {
                Some(g) => g,
                None if known() => ("-".to_string(), "-".to_string()),
                None => {
                    return Err(one(CmdError::new(
                        "get",
                        v.name(),
                        format!("invalid property '{p}'"),
                    )))
                }
            };
            pj.insert(
                p.clone(),
                json!({"value": val, "source": {"type": src.to_uppercase(), "data": "-"}}),
            );
            rows.push([v.name().to_string(), p, val, src]);
        }
        jm.insert(
            v.name().to_string(),
            json!({"name": v.name(), "properties": pj}),
        );
    }
    if flags.json {
        ctx.print_json("cairn dataset get", "datasets", Value::Object(jm));
    } else {
        let text = render_get(&rows, fields, flags.scripted)
            .map_err(|r| one(CmdError::usage("get", r)))?;
        out!(ctx, "{}", text);
    }
    done(errs)
}

fn set(ctx: &mut Ctx, assignment: &str, name: &str, cmdline: &str) -> CmdResult {
    // zfs's wording: "cannot set property for 'tank/vol': ...".
    let err = |r: String| one(CmdError::new("set property for", name, r));
    if !assignment.contains('=') {
        // As zfs: a usage error, exit 2.
        return Err(one(CmdError::usage(
            "set",
            format!("missing '=' for property=value argument '{assignment}'"),
        )));
    }
    let (k, v) = split_assignment(assignment).map_err(err)?;
    let pool_name = pool_of(name, "set property for")?;
    let pool = dataset_pool(ctx, &pool_name, name, "set property for")?;
    ds::set(&pool, name, &k, &v).map_err(|e| err(reason(e)))?;
    pool.log_history(cmdline, &ctx.sd.hostname())
        .and_then(|()| pool.sync())
        .map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn destroy(ctx: &mut Ctx, name: &str, o: DestroyOpts, verbose: bool, cmdline: &str) -> CmdResult {
    let err = |r: String| one(CmdError::new("destroy", name, r));
    if !name.contains('/') && validate_pool_name(name).is_ok() {
        return destroy_children(ctx, name, o.recursive, cmdline);
    }
    // Snapshot specs (`VOL@a%b,c`) are checked by the dataset layer; the volume part here.
    let vol = name.split('@').next().unwrap_or(name);
    let pool_name = pool_of(vol, "destroy")?;
    let pool = dataset_pool(ctx, &pool_name, name, "destroy")?;
    let plan =
        ds::destroy(&pool, name, DestroyOpts { dry_run: true, ..o }).map_err(|e| err(reason(e)))?;
    let busy: Vec<&String> = plan.items.iter().filter(|n| ctx.pools.in_use(n)).collect();
    if !busy.is_empty() && !o.dry_run {
        return Err(err(format!(
            "dataset is busy: an NBD client is connected to {}",
            busy.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let plan = if o.dry_run {
        plan
    } else {
        ds::destroy(&pool, name, o).map_err(|e| err(reason(e)))?
    };
    if verbose || o.dry_run {
        let verb = if o.dry_run {
            "would destroy"
        } else {
            "will destroy"
        };
        if verbose {
            for i in &plan.items {
                outln!(ctx, "{verb} {i}");
            }
            let r = if o.dry_run {
                "would reclaim"
            } else {
                "will reclaim"
            };
            outln!(ctx, "{r} {}", format_compact(plan.reclaim));
        }
    }
    if o.dry_run {
        return Ok(());
    }
    pool.log_history(cmdline, &ctx.sd.hostname())
        .and_then(|()| pool.sync())
        .map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// `written@SNAP` of a volume (`-` for a snapshot).
fn written_at(
    ctx: &mut Ctx,
    v: &DatasetInfo,
    snap: &str,
    parsable: bool,
) -> Option<(String, String)> {
    let DatasetInfo::Volume(vol) = v else {
        return Some(("-".into(), "-".into()));
    };
    let pool_name = vol.name.split('/').next()?.to_string();
    let pool = ctx.pools.get(ctx.sd, &pool_name, "get").ok()?;
    let b = ds::written_since(&pool, &vol.name, snap).ok()?;
    let shown = if parsable {
        b.to_string()
    } else {
        format_compact(b)
    };
    Some((shown, "-".into()))
}

/// `list -s PROP` / `-S PROP`: sort by properties (numbers as numbers), stable.
fn sort_datasets(v: &mut [DatasetInfo], asc: &[String], desc: &[String]) -> Result<(), String> {
    if asc.is_empty() && desc.is_empty() {
        return Ok(());
    }
    let keys: Vec<(String, bool)> = asc
        .iter()
        .map(|k| (k.clone(), false))
        .chain(desc.iter().map(|k| (k.clone(), true)))
        .collect();
    for (k, _) in &keys {
        if k != "name" && !LIST_COLS.contains(&k.as_str()) && !k.contains(':') {
            return Err(format!("invalid property '{k}' for sorting"));
        }
    }
    let val = |d: &DatasetInfo, k: &str| -> String {
        if k == "name" {
            return d.name().to_string();
        }
        d.props()
            .into_iter()
            .find(|(n, _, _)| n == k)
            .map(|x| x.1)
            .unwrap_or_default()
    };
    v.sort_by(|a, b| {
        for (k, rev) in &keys {
            let (x, y) = (val(a, k), val(b, k));
            let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                (Ok(p), Ok(q)) => p.cmp(&q),
                _ => x.cmp(&y),
            };
            let o = if *rev { o.reverse() } else { o };
            if o != std::cmp::Ordering::Equal {
                return o;
            }
        }
        std::cmp::Ordering::Equal
    });
    Ok(())
}

/// `destroy -r POOL`: every volume of the pool (the pool itself is `pool destroy`'s), none if one is
/// busy.
fn destroy_children(ctx: &mut Ctx, name: &str, recursive: bool, cmdline: &str) -> CmdResult {
    let err = |r: String| one(CmdError::new("destroy", name, r));
    if !recursive {
        return Err(err(format!(
            "a pool's root dataset cannot be destroyed: use 'cairn dataset destroy -r {name}' to \
             destroy its volumes, or 'cairn pool destroy {name}' to destroy the pool"
        )));
    }
    let pool = ctx.pools.get(ctx.sd, name, "destroy").map_err(one)?;
    let vols = ds::list(&pool).map_err(|e| err(reason(e)))?;
    let exports = ds::export_names(&pool).map_err(|e| err(reason(e)))?;
    let busy: Vec<&str> = exports
        .iter()
        .map(|n| n.as_str())
        .filter(|n| ctx.pools.in_use(n))
        .collect();
    if !busy.is_empty() {
        return Err(err(format!(
            "dataset is busy: an NBD client is connected to {}",
            busy.join(", ")
        )));
    }
    let mut errs = Vec::new();
    let all = DestroyOpts {
        recursive: true,
        clones: true,
        dry_run: false,
    };
    for v in &vols {
        // A clone destroyed with its origin's volume is gone already.
        if ds::get(&pool, &v.name).is_err() {
            continue;
        }
        if let Err(e) = ds::destroy(&pool, &v.name, all) {
            errs.push(CmdError::new("destroy", &v.name, reason(e)));
        }
    }
    pool.log_history(cmdline, &ctx.sd.hostname())
        .and_then(|()| pool.sync())
        .map_err(|e| err(e.to_string()))?;
    done(errs)
}
