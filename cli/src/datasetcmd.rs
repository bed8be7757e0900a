//! The `cairn dataset` commands: create, list, get, set, destroy (volumes).

use crate::ctx::Ctx;
use crate::names::{validate_dataset_name, validate_pool_name};
use crate::output::{render_get, select_columns, Table};
use crate::size::{format_compact, parse_size};
use crate::{out, outln, CmdError, DatasetCmd, ListFlags};
use cairn_dataset::{self as ds, CreateVolume, DatasetError, VolumeInfo};
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
            recursive: _,
            flags,
            cols,
            names,
        } => list(ctx, types.as_deref(), &flags, cols.as_deref(), &names),
        DatasetCmd::Get {
            flags,
            fields,
            props,
            names,
        } => get(ctx, &flags, fields.as_deref(), &props, &names),
        DatasetCmd::Set { assignment, name } => set(ctx, &assignment, &name, &cmdline),
        DatasetCmd::Destroy { recursive, name } => destroy(ctx, &name, recursive, &cmdline),
    }
}

const SIZE_PROPS: &[&str] = &[
    "used",
    "available",
    "referenced",
    "volsize",
    "volblocksize",
    "refreservation",
];

fn reason(e: DatasetError) -> String {
    match e {
        DatasetError::Pool(p) => p.to_string(),
        DatasetError::TooBig { needed, available } => format!(
            "size is greater than available space ({} needed, {} available)",
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

fn split_assignment(a: &str) -> Result<(String, String), String> {
    let (k, v) = a
        .split_once('=')
        .ok_or_else(|| format!("bad property assignment '{a}': expected PROP=VALUE"))?;
    Ok((k.to_string(), normalise(k, v)?))
}

/// The pool of dataset `name`; an error names the dataset, as zfs's ("cannot create 'nopool/v':
/// no such pool 'nopool'").
fn dataset_pool(
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

/// Validate a dataset name and return its pool.
fn pool_of(name: &str, verb: &str) -> Result<String, Vec<CmdError>> {
    validate_dataset_name(name).map(|(p, _)| p).map_err(|r| {
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

fn prop_value(v: &VolumeInfo, prop: &str, parsable: bool) -> Option<(String, String)> {
    if prop == "name" {
        return Some((v.name.clone(), "-".into()));
    }
    if prop == "mountpoint" {
        return Some(("-".into(), "-".into()));
    }
    let (_, val, src) = v.props().into_iter().find(|(k, _, _)| k == prop)?;
    let shown = if !parsable && SIZE_PROPS.contains(&prop) {
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

/// Volumes named (or all volumes of all pools), and the errors of those that could not be read.
type Collected = (Vec<VolumeInfo>, Vec<CmdError>);

/// Volumes named (or all volumes of all pools).
fn collect(ctx: &mut Ctx, names: &[String], verb: &str) -> Result<Collected, Vec<CmdError>> {
    let mut out = Vec::new();
    let mut errs = Vec::new();
    if names.is_empty() {
        let pools = ctx
            .sd
            .load_cache()
            .map_err(|e| one(CmdError::new(verb, "", e.to_string())))?;
        for p in pools {
            match ctx.pools.get(ctx.sd, &p.name, verb) {
                Ok(pool) => match ds::list(&pool) {
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
                    Ok(pool) => match ds::list(&pool) {
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
            match ctx.pools.get(ctx.sd, &pool_name, verb) {
                Ok(pool) => match ds::get(&pool, n) {
                    Ok(v) => out.push(v),
                    Err(e) => errs.push(CmdError::new(verb, n, reason(e))),
                },
                Err(e) => errs.push(CmdError::new(verb, n, e.reason)),
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
];

fn list(
    ctx: &mut Ctx,
    types: Option<&str>,
    flags: &ListFlags,
    cols: Option<&str>,
    names: &[String],
) -> CmdResult {
    let want_volumes = match types {
        None => true,
        Some(t) => {
            let mut v = false;
            for x in t.split(',') {
                match x {
                    "volume" | "all" => v = true,
                    "snapshot" | "snap" | "filesystem" => {}
                    other => {
                        return Err(one(CmdError::usage(
                            "list",
                            format!("invalid type '{other}' for -t (volume, snapshot or all)"),
                        )))
                    }
                }
            }
            v
        }
    };
    // zfs's aliases for columns.
    let cols = cols.map(|c| {
        c.split(',')
            .map(|x| match x {
                "avail" => "available",
                "refer" => "referenced",
                "volblock" => "volblocksize",
                "refreserv" => "refreservation",
                "rdonly" => "readonly",
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
    let (vols, errs) = if want_volumes {
        collect(ctx, names, "list")?
    } else {
        (Vec::new(), Vec::new())
    };
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
            m.insert(
                v.name.clone(),
                json!({"name": v.name, "type": "VOLUME", "pool": v.name.split('/').next(),
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
    let (vols, errs) = collect(ctx, names, "get")?;
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
            let Some((val, src)) = prop_value(v, &p, flags.parsable) else {
                return Err(one(CmdError::new(
                    "get",
                    &v.name,
                    format!("invalid property '{p}'"),
                )));
            };
            pj.insert(
                p.clone(),
                json!({"value": val, "source": {"type": src.to_uppercase(), "data": "-"}}),
            );
            rows.push([v.name.clone(), p, val, src]);
        }
        jm.insert(v.name.clone(), json!({"name": v.name, "properties": pj}));
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

fn destroy(ctx: &mut Ctx, name: &str, recursive: bool, cmdline: &str) -> CmdResult {
    let err = |r: String| one(CmdError::new("destroy", name, r));
    if !name.contains('/') && validate_pool_name(name).is_ok() {
        return destroy_children(ctx, name, recursive, cmdline);
    }
    let pool_name = pool_of(name, "destroy")?;
    let pool = dataset_pool(ctx, &pool_name, name, "destroy")?;
    if ctx.pools.in_use(name) {
        return Err(err(
            "dataset is busy: an NBD client is connected to it".into()
        ));
    }
    ds::destroy(&pool, name).map_err(|e| err(reason(e)))?;
    pool.log_history(cmdline, &ctx.sd.hostname())
        .and_then(|()| pool.sync())
        .map_err(|e| err(e.to_string()))?;
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
    let busy: Vec<&str> = vols
        .iter()
        .map(|v| v.name.as_str())
        .filter(|n| ctx.pools.in_use(n))
        .collect();
    if !busy.is_empty() {
        return Err(err(format!(
            "dataset is busy: an NBD client is connected to {}",
            busy.join(", ")
        )));
    }
    let mut errs = Vec::new();
    for v in &vols {
        if let Err(e) = ds::destroy(&pool, &v.name) {
            errs.push(CmdError::new("destroy", &v.name, reason(e)));
        }
    }
    pool.log_history(cmdline, &ctx.sd.hostname())
        .and_then(|()| pool.sync())
        .map_err(|e| err(e.to_string()))?;
    done(errs)
}
