//! The `cairn pool` commands: create, list, import, export, destroy, add, get, set, history, events
//! and the device commands; status, iostat and scrub have files of their own (statuscmd.rs,
//! iostatcmd.rs, scrubcmd.rs).

use crate::ctx::Ctx;
use crate::names::validate_pool_name;
use crate::output::{render_get, select_columns, Table};
use crate::size::{format_compact, parse_size};
use crate::statedir::CacheEntry;
use crate::vdevspec::{parse_vdev_spec, SpecKind};
use crate::{errln, out, outln};
use crate::{CmdError, ListFlags, PoolCmd};
use cairn_pool::import::{self, ImportCandidate};
use cairn_pool::pool::{PoolStatus, DEFAULT_STRIPE_CHUNK};
use cairn_pool::rewind::Rewind;
use cairn_pool::{
    CreateOptions, HostInfo, OpenOptions, Pool, PoolError, PoolState, TopKind, TopSpec,
};
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

type CmdResult = Result<ExitCode, Vec<CmdError>>;

fn one(e: CmdError) -> Vec<CmdError> {
    vec![e]
}

pub fn run(ctx: &mut Ctx, cmd: PoolCmd) -> CmdResult {
    let cmdline = ctx.cmdline.clone();
    let cmdline = cmdline.as_str();
    match cmd {
        PoolCmd::Create {
            force,
            props,
            size,
            pool,
            vdevs,
        } => create(ctx, force, &props, size.as_deref(), &pool, &vdevs, cmdline),
        PoolCmd::List { flags, cols, pools } => list(ctx, &flags, cols.as_deref(), &pools),
        PoolCmd::Status { opts, pools } => crate::statuscmd::status(ctx, &opts, &pools),
        PoolCmd::Import {
            dirs,
            force,
            rewind,
            dry_run,
            txg,
            pool,
            newname,
        } => import_cmd(
            ctx,
            &dirs,
            force,
            RewindArgs {
                rewind,
                dry_run,
                txg,
            },
            pool.as_deref(),
            newname.as_deref(),
            cmdline,
        ),
        PoolCmd::Export { force, pool } => export(ctx, &pool, cmdline, false, force),
        PoolCmd::Destroy { force, pool } => export(ctx, &pool, cmdline, true, force),
        PoolCmd::Add { force, pool, vdevs } => add(ctx, force, &pool, &vdevs, cmdline),
        PoolCmd::Get {
            flags,
            fields,
            props,
            pools,
        } => get(ctx, &flags, fields.as_deref(), &props, &pools),
        PoolCmd::Set { assignment, pool } => set(ctx, &assignment, &pool, cmdline),
        PoolCmd::History { pools } => history(ctx, &pools),
        PoolCmd::Offline {
            temporary,
            pool,
            leaf,
        } => {
            let p = ctx.pools.get(ctx.sd, &pool, "offline").map_err(one)?;
            p.offline(&leaf, temporary)
                .map_err(|e| one(CmdError::new("offline", &leaf, e)))?;
            log(ctx, &p, cmdline);
            Ok(ExitCode::SUCCESS)
        }
        PoolCmd::Online { pool, leaf } => {
            let p = ctx.pools.get(ctx.sd, &pool, "online").map_err(one)?;
            p.online(&leaf)
                .map_err(|e| one(CmdError::new("online", &leaf, e)))?;
            log(ctx, &p, cmdline);
            // The leaf lacks the txgs it missed: resilver them (in the background in the daemon).
            crate::scrubcmd::resilver_if_needed(ctx, &pool, &p, false)?;
            Ok(ExitCode::SUCCESS)
        }
        PoolCmd::Attach {
            force,
            sequential,
            pool,
            existing,
            new,
        } => {
            let p = ctx.pools.get(ctx.sd, &pool, "attach").map_err(one)?;
            let new = ctx.abs(&new);
            refuse_active_leaves(
                ctx,
                "attach",
                &new.display().to_string(),
                std::slice::from_ref(&new),
                Some(p.guid().0),
            )?;
            p.attach(&existing, &new, force)
                .map_err(|e| one(CmdError::new("attach", &new.display().to_string(), e)))?;
            log(ctx, &p, cmdline);
            save_entry(ctx, cache_entry(&p)).map_err(|e| one(CmdError::new("attach", &pool, e)))?;
            crate::scrubcmd::resilver_if_needed(ctx, &pool, &p, sequential)?;
            Ok(ExitCode::SUCCESS)
        }
        PoolCmd::Detach { pool, leaf } => {
            let p = ctx.pools.get(ctx.sd, &pool, "detach").map_err(one)?;
            p.detach(&leaf)
                .map_err(|e| one(CmdError::new("detach", &leaf, e)))?;
            log(ctx, &p, cmdline);
            save_entry(ctx, cache_entry(&p)).map_err(|e| one(CmdError::new("detach", &pool, e)))?;
            Ok(ExitCode::SUCCESS)
        }
        PoolCmd::Replace {
            force,
            sequential,
            pool,
            old,
            new,
        } => {
            let p = ctx.pools.get(ctx.sd, &pool, "replace").map_err(one)?;
            let new = new.map(|n| ctx.abs(&n));
            if let Some(n) = &new {
                refuse_active_leaves(
                    ctx,
                    "replace",
                    &old,
                    std::slice::from_ref(n),
                    Some(p.guid().0),
                )?;
            }
            p.replace(&old, new.as_deref(), force)
                .map_err(|e| one(CmdError::new("replace", &old, e)))?;
            log(ctx, &p, cmdline);
            crate::scrubcmd::resilver_if_needed(ctx, &pool, &p, sequential)?;
            save_entry(ctx, cache_entry(&p))
                .map_err(|e| one(CmdError::new("replace", &pool, e)))?;
            Ok(ExitCode::SUCCESS)
        }
        PoolCmd::Scrub {
            pause,
            stop,
            wait,
            pools,
        } => {
            for name in &pools {
                crate::scrubcmd::scrub(ctx, name, pause, stop, wait)?;
                if ctx.exit != 0 {
                    // Interrupted: the other pools are not started.
                    break;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PoolCmd::Trim {
            wait,
            suspend,
            cancel,
            secure,
            pool,
            leaves,
        } => crate::trimcmd::trim(ctx, &pool, &leaves, wait, suspend, cancel, secure),
        PoolCmd::Clear { pool, leaf } => {
            let p = ctx.pools.get(ctx.sd, &pool, "clear").map_err(one)?;
            p.clear(leaf.as_deref())
                .map_err(|e| one(CmdError::new("clear", leaf.as_deref().unwrap_or(&pool), e)))?;
            log(ctx, &p, cmdline);
            // A leaf brought back lacks what it missed while faulted: resilver it, as online does.
            crate::scrubcmd::resilver_if_needed(ctx, &pool, &p, false)?;
            Ok(ExitCode::SUCCESS)
        }
        PoolCmd::Events {
            verbose,
            flags,
            pool,
        } => events(ctx, verbose, &flags, pool.as_deref()),
        PoolCmd::Sync { pools } => crate::maintcmd::sync(ctx, &pools),
        PoolCmd::Labelclear { force, leaf } => crate::maintcmd::labelclear(ctx, &leaf, force),
        PoolCmd::Resilver { pools } => crate::maintcmd::resilver(ctx, &pools),
        PoolCmd::Wait {
            activities,
            check,
            pool,
            interval,
        } => {
            crate::waitcmd::parse_interval(interval.as_deref()).map_err(one)?;
            crate::waitcmd::wait(ctx, &pool, activities.as_deref(), check)
        }
        PoolCmd::Iostat {
            verbose,
            latency,
            skip_first,
            flags,
            sample,
            args,
        } => {
            let o = crate::iostatcmd::Opts::new(verbose, latency, skip_first, &flags);
            crate::iostatcmd::iostat(ctx, &o, sample, &args)
        }
    }
}

/// Record a command in the pool's history (best effort: the command itself already succeeded).
fn log(ctx: &Ctx, pool: &Pool, cmdline: &str) {
    if let Err(e) = pool
        .log_history(cmdline, &ctx.sd.hostname())
        .and_then(|()| pool.sync())
    {
        tracing::warn!("cannot record history: {e}");
    }
}

fn events(ctx: &mut Ctx, verbose: bool, flags: &ListFlags, pool: Option<&str>) -> CmdResult {
    let names = match pool {
        Some(p) => vec![p.to_string()],
        None => targets(ctx, &[], "events")?,
    };
    let mut t = Table::new(
        ["TIME", "CLASS", "POOL", "VDEV", "OFFSET", "DETAIL"],
        vec![false, false, false, false, true, false],
    );
    let mut all = Vec::new();
    for n in &names {
        let p = ctx.pools.get(ctx.sd, n, "events").map_err(one)?;
        for e in p.events() {
            all.push((n.clone(), e));
        }
    }
    all.sort_by_key(|(_, e)| e.time);
    if flags.json {
        let v: Vec<Value> = all
            .iter()
            .map(|(p, e)| {
                json!({"time": e.time, "class": e.class, "pool": p, "vdev": e.vdev,
                       "offset": e.offset, "detail": e.detail})
            })
            .collect();
        ctx.print_json("cairn pool events", "events", Value::Array(v));
        return Ok(ExitCode::SUCCESS);
    }
    if verbose && !flags.json {
        // As zpool events -v: each event, then its fields one per line.
        if !flags.scripted {
            outln!(ctx, "{:<24} CLASS", "TIME");
        }
        for (p, e) in all {
            outln!(ctx, "{:<24} {}", format_time(e.time), e.class);
            outln!(ctx, "        class = \"{}\"", e.class);
            outln!(ctx, "        pool = \"{p}\"");
            if !e.vdev.is_empty() {
                outln!(ctx, "        vdev = \"{}\"", e.vdev);
            }
            if let Some(o) = e.offset {
                outln!(ctx, "        offset = {o:#x}");
            }
            if !e.detail.is_empty() {
                outln!(ctx, "        detail = \"{}\"", e.detail);
            }
            outln!(ctx, "        time = {}", e.time);
            outln!(ctx);
        }
        return Ok(ExitCode::SUCCESS);
    }
    for (p, e) in all {
        t.push([
            if flags.parsable {
                e.time.to_string()
            } else {
                format_time(e.time)
            },
            e.class,
            p,
            e.vdev,
            e.offset
                .map(|o| o.to_string())
                .unwrap_or_else(|| "-".into()),
            e.detail,
        ]);
    }
    out!(ctx, "{}", t.render(flags.scripted));
    Ok(ExitCode::SUCCESS)
}

fn host(ctx: &mut Ctx) -> HostInfo {
    HostInfo {
        host_id: ctx.sd.host_id().unwrap_or(0),
        hostname: ctx.sd.hostname(),
    }
}

fn specs(ctx: &Ctx, words: &[String]) -> Result<Vec<TopSpec>, String> {
    Ok(parse_vdev_spec(words)?
        .into_iter()
        .map(|t| TopSpec {
            kind: match t.kind {
                SpecKind::Single => TopKind::Single,
                SpecKind::Mirror => TopKind::Mirror,
                SpecKind::Stripe => TopKind::Stripe {
                    chunk: DEFAULT_STRIPE_CHUNK,
                },
            },
            leaves: t.leaves.iter().map(|l| ctx.abs(l)).collect(),
        })
        .collect())
}

/// `-o k=v` and `set k=v`: split and turn sizes into bytes.
fn parse_assignment(a: &str) -> Result<(String, String), String> {
    let Some((k, v)) = a.split_once('=') else {
        return Err(format!(
            "bad property assignment '{a}': expected PROP=VALUE"
        ));
    };
    let k = k.trim().to_string();
    let v = if k == "scrub_rate_limit" {
        parse_size(v)?.to_string()
    } else {
        v.to_string()
    };
    Ok((k, v))
}

fn cache_entry(pool: &Pool) -> CacheEntry {
    CacheEntry {
        name: pool.name(),
        guid: pool.guid().0,
        leaves: pool.leaf_paths(),
    }
}

fn save_entry(ctx: &mut Ctx, e: CacheEntry) -> std::io::Result<()> {
    ctx.sd.update_cache(|v| {
        v.retain(|x| x.guid != e.guid && x.name != e.name);
        v.push(e);
        v.sort_by(|a, b| a.name.cmp(&b.name));
    })
}

fn remove_entry(ctx: &mut Ctx, guid: u64) -> std::io::Result<()> {
    ctx.sd.update_cache(|v| v.retain(|x| x.guid != guid))
}

/// Refuse leaves that belong to a pool imported here (in this state directory's cache), whose label
/// says it is active and whose recorded leaves include the very file: `-f` overrides the label of an
/// exported, destroyed or foreign pool, never a leaf in use, as zpool refuses "part of active pool".
/// `own` is the pool being changed (its own leaves get the pool layer's more precise message).
fn refuse_active_leaves(
    ctx: &Ctx,
    verb: &str,
    name: &str,
    leaves: &[PathBuf],
    own: Option<u64>,
) -> Result<(), Vec<CmdError>> {
    use std::os::unix::fs::MetadataExt;
    let err = |r: String| one(CmdError::new(verb, name, r));
    let cache = ctx.sd.load_cache().map_err(|e| err(e.to_string()))?;
    let ident = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    for leaf in leaves {
        let abs = ctx.abs(leaf);
        let Some(id) = ident(&abs) else { continue };
        let Some(lbl) = cairn_pool::pool::read_leaf_label(&abs) else {
            continue;
        };
        if lbl.config.state != PoolState::Active || Some(lbl.header.pool_guid.0) == own {
            continue;
        }
        let Some(entry) = cache.iter().find(|e| e.guid == lbl.header.pool_guid.0) else {
            continue;
        };
        if entry
            .leaves
            .iter()
            .any(|l| ident(std::path::Path::new(l)) == Some(id))
        {
            return Err(err(format!(
                "{} is part of active pool '{}'",
                leaf.display(),
                entry.name
            )));
        }
    }
    Ok(())
}

fn create(
    ctx: &mut Ctx,
    force: bool,
    props: &[String],
    size: Option<&str>,
    name: &str,
    vdevs: &[String],
    cmdline: &str,
) -> CmdResult {
    let err = |r: String| one(CmdError::new("create", name, r));
    validate_pool_name(name).map_err(|r| err(format!("invalid pool name: {r}")))?;
    let specs = specs(ctx, vdevs).map_err(err)?;
    let all: Vec<PathBuf> = specs.iter().flat_map(|s| s.leaves.clone()).collect();
    refuse_active_leaves(ctx, "create", name, &all, None)?;
    let create_size = size
        .map(parse_size)
        .transpose()
        .map_err(|r| err(format!("invalid --size: {r}")))?;
    // A file's length is a signed 64-bit number: 8E and more cannot be a file's size.
    if let (Some(sz), Some(text)) = (create_size, size) {
        if sz > i64::MAX as u64 {
            return Err(err(format!(
                "invalid --size '{text}': larger than the largest possible file (8E minus 1 byte)"
            )));
        }
    }
    let props = props
        .iter()
        .map(|p| parse_assignment(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    let _lock = ctx.sd.lock_cache().map_err(|e| err(e.to_string()))?;
    let cache = ctx.sd.load_cache().map_err(|e| err(e.to_string()))?;
    if cache.iter().any(|e| e.name == name) {
        return Err(err("a pool with that name is already imported".into()));
    }
    let opts = CreateOptions {
        force,
        create_size,
        props,
        host: host(ctx),
    };
    let (pool, warnings) = Pool::create(name, &specs, &opts).map_err(|e| match e {
        PoolError::NotFound(m) => err(format!("{m} (use --size to create it)")),
        e => err(e.to_string()),
    })?;
    for w in warnings {
        errln!(ctx, "warning: {w}");
    }
    warn_open_modes(ctx, &pool);
    pool.log_history(cmdline, &ctx.sd.hostname())
        .and_then(|()| pool.sync())
        .map_err(|e| err(e.to_string()))?;
    let mut cache = cache;
    cache.push(cache_entry(&pool));
    cache.sort_by(|a, b| a.name.cmp(&b.name));
    ctx.sd.save_cache(&cache).map_err(|e| err(e.to_string()))?;
    ctx.pools.added(Arc::new(pool));
    Ok(ExitCode::SUCCESS)
}

/// Pools named on the command line, or every imported pool.
pub(crate) fn targets(
    ctx: &mut Ctx,
    pools: &[String],
    verb: &str,
) -> Result<Vec<String>, Vec<CmdError>> {
    if !pools.is_empty() {
        return Ok(pools.to_vec());
    }
    let cache = ctx
        .sd
        .load_cache()
        .map_err(|e| one(CmdError::new(verb, "", e.to_string())))?;
    Ok(cache.into_iter().map(|e| e.name).collect())
}

const LIST_COLS: &[&str] = &[
    "name", "size", "alloc", "free", "ckpoint", "expandsz", "frag", "cap", "dedup", "health",
    "altroot", "guid",
];
const LIST_DEFAULT: &str = "name,size,alloc,free,ckpoint,expandsz,frag,cap,dedup,health,altroot";

fn list(ctx: &mut Ctx, flags: &ListFlags, cols: Option<&str>, pools: &[String]) -> CmdResult {
    let sel = select_columns(LIST_COLS, Some(cols.unwrap_or(LIST_DEFAULT)))
        .map_err(|r| one(CmdError::usage("list", r)))?;
    let names = targets(ctx, pools, "list")?;
    let mut errs = Vec::new();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut json_pools = Map::new();
    let cache = ctx.sd.load_cache().unwrap_or_default();
    for n in &names {
        let st = match ctx.pools.get(ctx.sd, n, "open") {
            Ok(p) => p.status(),
            // Imported but its devices cannot be opened: listed as UNAVAIL, as zpool does.
            Err(e) if e.unavailable => {
                let mut st = PoolStatus {
                    name: n.clone(),
                    state: "UNAVAIL".into(),
                    ..PoolStatus::default()
                };
                if let Some(c) = cache.iter().find(|c| &c.name == n) {
                    st.pool_guid = c.guid;
                }
                st
            }
            Err(e) => {
                errs.push(e);
                continue;
            }
        };
        let unavail = st.size == 0 && st.state == "UNAVAIL";
        let num = |v: u64| {
            if unavail {
                "-".to_string()
            } else if flags.parsable {
                v.to_string()
            } else {
                format_compact(v)
            }
        };
        let cap = (st.allocated * 100).checked_div(st.size).unwrap_or(0);
        let all = vec![
            st.name.clone(),
            num(st.size),
            num(st.allocated),
            num(st.free),
            "-".into(),
            "-".into(),
            "-".into(),
            if unavail {
                "-".to_string()
            } else if flags.parsable {
                cap.to_string()
            } else {
                format!("{cap}%")
            },
            if unavail {
                "-"
            } else if flags.parsable {
                "1.00"
            } else {
                "1.00x"
            }
            .into(),
            st.state.clone(),
            "-".into(),
            st.pool_guid.to_string(),
        ];
        let mut props = Map::new();
        for &i in &sel {
            props.insert(
                LIST_COLS[i].to_string(),
                json!({"value": all[i], "source": {"type": "NONE", "data": "-"}}),
            );
        }
        json_pools.insert(
            st.name.clone(),
            json!({"name": st.name, "type": "POOL", "state": st.state,
                   "pool_guid": st.pool_guid.to_string(), "txg": st.txg.to_string(),
                   "properties": props}),
        );
        rows.push(sel.iter().map(|&i| all[i].clone()).collect());
    }
    if flags.json {
        ctx.print_json("cairn pool list", "pools", Value::Object(json_pools));
    } else if names.is_empty() {
        outln!(ctx, "no pools available");
    } else if !rows.is_empty() {
        let headers: Vec<String> = sel.iter().map(|&i| LIST_COLS[i].to_uppercase()).collect();
        let right: Vec<bool> = sel
            .iter()
            .map(|&i| matches!(LIST_COLS[i], "size" | "alloc" | "free" | "cap" | "dedup"))
            .collect();
        let mut t = Table::new(headers, right);
        for r in rows {
            t.push(r);
        }
        out!(ctx, "{}", t.render(flags.scripted));
    }
    if errs.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(errs)
    }
}

fn scan_dirs(dirs: &[PathBuf]) -> Result<Vec<ImportCandidate>, Vec<CmdError>> {
    let dirs: Vec<PathBuf> = if dirs.is_empty() {
        vec![PathBuf::from("/dev")]
    } else {
        dirs.to_vec()
    };
    let mut paths = Vec::new();
    for d in &dirs {
        match import::list_dir(d) {
            Ok(p) => paths.extend(p),
            Err(e) => {
                return Err(one(CmdError::new(
                    "import",
                    &d.display().to_string(),
                    format!("cannot search directory: {e}"),
                )))
            }
        }
    }
    Ok(import::scan(&paths)
        .into_iter()
        .filter(|c| c.state() != PoolState::Destroyed)
        .collect())
}

fn describe_candidate(c: &ImportCandidate, me: u64) -> String {
    let root = c.vdev_status();
    let mut s = format!(
        "   pool: {}\n     id: {}\n  state: {}\n",
        c.name(),
        c.guid(),
        root.state
    );
    let elsewhere = c.state() == PoolState::Active && c.config.host_id != me;
    if root.state == "UNAVAIL" {
        s.push_str(" status: One or more devices are missing from the system.\n");
        s.push_str(
            " action: The pool cannot be imported. Attach the missing devices and try again.\n",
        );
    } else if elsewhere {
        s.push_str(&format!(
            " status: The pool was last accessed by another system (host '{}').\n",
            c.config.hostname
        ));
        s.push_str(
            " action: The pool can be imported using its name or numeric identifier and the '-f' flag.\n",
        );
    } else if root.state == "DEGRADED" {
        s.push_str(" status: One or more devices are missing from the system.\n");
        s.push_str(
            " action: The pool can be imported despite missing or damaged devices. The fault \
             tolerance of the pool may be compromised if imported.\n",
        );
    } else {
        s.push_str(" action: The pool can be imported using its name or numeric identifier.\n");
    }
    s.push_str(" config:\n\n");
    s.push_str(&crate::statuscmd::render_config(
        &root,
        &crate::statuscmd::Show::default(),
        false,
        &Default::default(),
    ));
    // Copies of a leaf next to the real one: listed, never opened.
    if !c.duplicates.is_empty() {
        s.push_str("\n duplicates:\n");
        for d in &c.duplicates {
            s.push_str(&format!("\t{}\n", d.describe(&c.config)));
        }
    }
    s
}

/// `import -F [-n]` and `-T TXG`.
struct RewindArgs {
    rewind: bool,
    dry_run: bool,
    txg: Option<u64>,
}

fn import_cmd(
    ctx: &mut Ctx,
    dirs: &[PathBuf],
    force: bool,
    rw: RewindArgs,
    which: Option<&str>,
    newname: Option<&str>,
    cmdline: &str,
) -> CmdResult {
    let dirs: Vec<PathBuf> = dirs.iter().map(|d| ctx.abs(d)).collect();
    let cands = scan_dirs(&dirs)?;
    let me = ctx.sd.host_id().unwrap_or(0);
    let cache = ctx
        .sd
        .load_cache()
        .map_err(|e| one(CmdError::new("import", "", e.to_string())))?;
    let Some(which) = which else {
        if rw.rewind || rw.txg.is_some() {
            return Err(one(CmdError::new(
                "import",
                "",
                "-F and -T need the name or numeric identifier of a pool",
            )));
        }
        let listed: Vec<String> = cands
            .iter()
            .filter(|c| !cache.iter().any(|e| e.guid == c.guid().0))
            .map(|c| describe_candidate(c, me))
            .collect();
        if listed.is_empty() {
            outln!(ctx, "no pools available to import");
        } else {
            out!(ctx, "{}", listed.join("\n"));
        }
        return Ok(ExitCode::SUCCESS);
    };
    let err = |r: String| one(CmdError::new("import", which, r));
    let matches: Vec<&ImportCandidate> = cands
        .iter()
        .filter(|c| c.name() == which || c.guid().0.to_string() == which)
        .collect();
    let c = match matches.as_slice() {
        [] => return Err(err("no such pool available".into())),
        [c] => *c,
        _ => {
            return Err(err(format!(
                "more than one pool has that name ({}); import it by numeric identifier",
                matches
                    .iter()
                    .map(|c| c.guid().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    // A pool already in this state directory's cache is re-imported only if it cannot be opened from
    // its recorded paths (its leaves moved); that refreshes the record.
    let cached = cache.iter().find(|e| e.guid == c.guid().0);
    if let Some(e) = cached {
        let paths: Vec<PathBuf> = e.leaves.iter().map(PathBuf::from).collect();
        let reachable = import::scan(&paths).iter().any(|x| x.guid() == c.guid());
        if reachable {
            return Err(err(format!("the pool is already imported as '{}'", e.name)));
        }
    }
    let target = newname
        .or(cached.map(|e| e.name.as_str()))
        .unwrap_or(c.name())
        .to_string();
    if let Some(n) = newname {
        validate_pool_name(n).map_err(|r| err(format!("invalid new name '{n}': {r}")))?;
    }
    if cache
        .iter()
        .any(|e| e.name == target && e.guid != c.guid().0)
    {
        return Err(err(format!(
            "a pool named '{target}' is already imported; import it under a new name"
        )));
    }
    let new_name = (target != c.name()).then(|| target.clone());
    if c.state() == PoolState::Active && c.config.host_id != me && !force {
        return Err(err(format!(
            "the pool may be in use from another system: it was last accessed by host '{}' \
             (hostid {:x}) and was not exported; use '-f' to import it anyway",
            c.config.hostname, c.config.host_id
        )));
    }
    let rewind = match (rw.rewind, rw.txg) {
        (_, Some(t)) => Rewind::Exact(cairn_pool::Txg(t)),
        (true, None) => Rewind::Back,
        (false, None) => Rewind::Newest,
    };
    if rw.dry_run {
        // Only say what a rewind would discard: open read-only, write nothing.
        let plan =
            Pool::rewind_plan(&c.paths(), c.guid(), rewind).map_err(|e| err(e.to_string()))?;
        match plan {
            Some(r) => outln!(
                ctx,
                "would rewind pool '{}' to {}; nothing was changed",
                c.name(),
                r.describe()
            ),
            None => outln!(
                ctx,
                "pool '{}' opens at its newest txg; no rewind needed",
                c.name()
            ),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let opts = OpenOptions {
        import: true,
        new_name,
        host: host(ctx),
        rewind,
        dry_run: false,
    };
    let pool = Pool::open(&c.paths(), c.guid(), &opts).map_err(|e| err(e.to_string()))?;
    if let Some(r) = pool.rewound() {
        outln!(ctx, "pool '{}' rewound to {}", pool.name(), r.describe());
    }
    warn_open_modes(ctx, &pool);
    pool.log_history(cmdline, &ctx.sd.hostname())
        .and_then(|()| pool.sync())
        .map_err(|e| err(e.to_string()))?;
    save_entry(ctx, cache_entry(&pool)).map_err(|e| err(e.to_string()))?;
    ctx.pools.added(Arc::new(pool));
    Ok(ExitCode::SUCCESS)
}

/// Warns about leaf files that users other than the owner may read or write: they hold every
/// volume's data. (Cairn creates its files 0600; a file made by someone else keeps its mode.)
fn warn_open_modes(ctx: &mut Ctx, pool: &Pool) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    for p in pool.leaf_paths() {
        let Ok(m) = std::fs::metadata(&p) else {
            continue;
        };
        // Block devices are guarded by their group (disk) as the system sets them up.
        if m.file_type().is_block_device() {
            continue;
        }
        let mode = m.mode() & 0o777;
        if mode & 0o066 != 0 {
            errln!(
                ctx,
                "warning: leaf {p} can be read or written by other users (mode {mode:04o}): \
                 'chmod 600 {p}' keeps the pool's data private"
            );
        }
    }
}

/// No leaf at the recorded paths carries the pool's label any more (deleted, or overwritten).
fn devices_gone(guid: u64, leaves: &[String]) -> bool {
    let paths: Vec<PathBuf> = leaves.iter().map(PathBuf::from).collect();
    !import::scan(&paths).iter().any(|c| c.guid().0 == guid)
}

/// Export or destroy -f of a pool whose devices are gone: nothing can be written, so the pool is
/// only forgotten (taken from the daemon if it holds it, removed from the state directory).
fn forget_unavailable(ctx: &mut Ctx, name: &str, verb: &str, guid: Option<u64>) -> CmdResult {
    let err = |r: String| one(CmdError::new(verb, name, r));
    let _ = ctx.pools.take(ctx.sd, name, verb, true);
    if let Some(g) = guid {
        remove_entry(ctx, g).map_err(|e| err(e.to_string()))?;
    }
    ctx.pools.forget(name);
    if verb == "destroy" {
        errln!(
            ctx,
            "warning: '{name}' is unavailable: it was removed from this system, but its devices \
             (if they come back) were not marked destroyed"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn export(ctx: &mut Ctx, name: &str, cmdline: &str, destroy: bool, force: bool) -> CmdResult {
    let verb = if destroy { "destroy" } else { "export" };
    let err = |r: String| one(CmdError::new(verb, name, r));
    let unavailable_hint = |reason: &str| {
        format!(
            "{reason}; the pool is unavailable: use 'cairn pool destroy -f {name}' or 'cairn pool \
             export {name}' to remove it from this system"
        )
    };
    let entry = ctx
        .sd
        .load_cache()
        .map_err(|e| err(e.to_string()))?
        .into_iter()
        .find(|x| x.name == name);
    // Devices deleted (with or without a daemon holding the pool open): export forgets the pool,
    // destroy needs -f since it cannot mark the labels destroyed.
    if let Some(e) = entry.as_ref().filter(|e| devices_gone(e.guid, &e.leaves)) {
        if destroy && !force {
            return Err(err(unavailable_hint(&format!(
                "no device of the pool was found at its recorded paths ({})",
                e.leaves.join(", ")
            ))));
        }
        return forget_unavailable(ctx, name, verb, Some(e.guid));
    }
    let pool = match ctx.pools.take(ctx.sd, name, verb, force) {
        Ok(p) => p,
        // Devices there but the pool cannot be opened (a whole top-level vdev missing, damage).
        Err(e) if e.unavailable && (!destroy || force) => {
            return forget_unavailable(ctx, name, verb, entry.map(|e| e.guid));
        }
        Err(mut e) => {
            if e.unavailable {
                e.reason = unavailable_hint(&e.reason);
            }
            return Err(one(e));
        }
    };
    let guid = pool.guid().0;
    let r = if destroy {
        pool.destroy()
    } else {
        pool.log_history(cmdline, &ctx.sd.hostname())
            .and_then(|()| pool.export())
    };
    if let Err(e) = r {
        // Still imported: the daemon goes on serving it (as zpool leaves a pool it failed to export).
        let why = e.to_string();
        ctx.pools.give_back(pool, &why);
        return Err(err(why));
    }
    ctx.pools.forget(name);
    remove_entry(ctx, guid).map_err(|e| err(e.to_string()))?;
    Ok(ExitCode::SUCCESS)
}

fn add(ctx: &mut Ctx, force: bool, name: &str, vdevs: &[String], cmdline: &str) -> CmdResult {
    let err = |r: String| one(CmdError::new("add", name, r));
    let specs = specs(ctx, vdevs).map_err(err)?;
    let pool = ctx.pools.get(ctx.sd, name, "add").map_err(one)?;
    let all: Vec<PathBuf> = specs.iter().flat_map(|s| s.leaves.clone()).collect();
    refuse_active_leaves(ctx, "add", name, &all, Some(pool.guid().0))?;
    let opts = CreateOptions {
        force,
        create_size: None,
        props: Vec::new(),
        host: host(ctx),
    };
    let warnings = pool.add(&specs, &opts).map_err(|e| err(e.to_string()))?;
    for w in warnings {
        errln!(ctx, "warning: {w}");
    }
    warn_open_modes(ctx, &pool);
    pool.log_history(cmdline, &ctx.sd.hostname())
        .and_then(|()| pool.sync())
        .map_err(|e| err(e.to_string()))?;
    save_entry(ctx, cache_entry(&pool)).map_err(|e| err(e.to_string()))?;
    Ok(ExitCode::SUCCESS)
}

const SIZE_PROPS: &[&str] = &["size", "allocated", "free", "freeing", "scrub_rate_limit"];

fn get(
    ctx: &mut Ctx,
    flags: &ListFlags,
    fields: Option<&str>,
    props: &str,
    pools: &[String],
) -> CmdResult {
    let names = targets(ctx, pools, "get")?;
    let wanted: Vec<String> = props.split(',').map(|s| s.trim().to_string()).collect();
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut jp = Map::new();
    let mut errs = Vec::new();
    for n in &names {
        let pool = match ctx.pools.get(ctx.sd, n, "get") {
            Ok(p) => p,
            Err(e) => {
                errs.push(e);
                continue;
            }
        };
        let vals = match pool.get_props(&wanted) {
            Ok(v) => v,
            Err(e) => {
                errs.push(CmdError::new("get", n, e));
                continue;
            }
        };
        let mut pj = Map::new();
        for (k, v, src) in vals {
            let shown = if !flags.parsable && SIZE_PROPS.contains(&k.as_str()) {
                v.parse::<u64>().map(format_compact).unwrap_or(v.clone())
            } else if !flags.parsable && k == "capacity" {
                format!("{v}%")
            } else {
                v.clone()
            };
            pj.insert(
                k.clone(),
                json!({"value": shown, "source": {"type": src.to_uppercase(), "data": "-"}}),
            );
            rows.push([n.clone(), k, shown, src]);
        }
        jp.insert(n.clone(), json!({"name": n, "properties": pj}));
    }
    if flags.json {
        ctx.print_json("cairn pool get", "pools", Value::Object(jp));
    } else if !rows.is_empty() {
        let text = render_get(&rows, fields, flags.scripted)
            .map_err(|r| one(CmdError::usage("get", r)))?;
        out!(ctx, "{}", text);
    }
    if errs.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(errs)
    }
}

fn set(ctx: &mut Ctx, assignment: &str, name: &str, cmdline: &str) -> CmdResult {
    let err = |r: String| one(CmdError::new("set", name, r));
    let (k, v) = parse_assignment(assignment).map_err(err)?;
    let pool = ctx.pools.get(ctx.sd, name, "set").map_err(one)?;
    pool.set_prop(&k, &v).map_err(|e| err(e.to_string()))?;
    pool.log_history(cmdline, &ctx.sd.hostname())
        .and_then(|()| pool.sync())
        .map_err(|e| err(e.to_string()))?;
    Ok(ExitCode::SUCCESS)
}

pub fn format_time(secs: u64) -> String {
    // SAFETY: localtime_r writes only into `tm`, which is a valid, exclusively borrowed struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let t = secs as libc::time_t;
    // SAFETY: both pointers are valid for the duration of the call.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02}.{:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

fn history(ctx: &mut Ctx, pools: &[String]) -> CmdResult {
    let names = targets(ctx, pools, "history")?;
    let mut errs = Vec::new();
    let mut first = true;
    for n in &names {
        let recs = ctx.pools.get(ctx.sd, n, "history").and_then(|p| {
            p.history()
                .map_err(|e| CmdError::new("history", n, e.to_string()))
        });
        match recs {
            Ok(recs) => {
                if !first {
                    outln!(ctx);
                }
                first = false;
                outln!(ctx, "History for '{n}':");
                for r in recs {
                    outln!(ctx, "{} {}", format_time(r.time), r.command);
                }
            }
            Err(e) => errs.push(e),
        }
    }
    if names.is_empty() {
        outln!(ctx, "no pools available");
    }
    if errs.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(errs)
    }
}
