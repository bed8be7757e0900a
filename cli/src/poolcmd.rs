//! The `cairn pool` commands: create, list, status, import, export, destroy, add, get, set, history.

use crate::ctx::Ctx;
use crate::names::validate_pool_name;
use crate::output::{render_get, select_columns, Table};
use crate::size::{format_bytes_b, format_compact, parse_size};
use crate::statedir::CacheEntry;
use crate::vdevspec::{parse_vdev_spec, SpecKind};
use crate::{errln, out, outln};
use crate::{CmdError, ListFlags, PoolCmd};
use cairn_pool::import::{self, ImportCandidate};
use cairn_pool::pool::{PoolStatus, VdevStatus, DEFAULT_STRIPE_CHUNK};
use cairn_pool::rewind::Rewind;
use cairn_pool::trim::{LeafTrim, TrimState};
use cairn_pool::{
    CreateOptions, HostInfo, OpenOptions, Pool, PoolError, PoolState, TopKind, TopSpec,
};
use cairn_vdev::units::now_secs;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
        PoolCmd::Status {
            verbose,
            full_paths,
            trim,
            json,
            pools,
        } => status(ctx, verbose, full_paths, trim, json, &pools),
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
            resilver_if_needed(ctx, &pool, &p, false)?;
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
            resilver_if_needed(ctx, &pool, &p, sequential)?;
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
            resilver_if_needed(ctx, &pool, &p, sequential)?;
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
                scrub(ctx, name, pause, stop, wait)?;
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
            resilver_if_needed(ctx, &pool, &p, false)?;
            Ok(ExitCode::SUCCESS)
        }
        PoolCmd::Events { flags, pool } => events(ctx, &flags, pool.as_deref()),
        PoolCmd::Iostat {
            verbose,
            flags,
            args,
        } => iostat(ctx, verbose, &flags, &args),
    }
}

/// Start (or queue) a resilver if some leaf lacks txgs; without a daemon it runs now.
fn resilver_if_needed(
    ctx: &mut Ctx,
    name: &str,
    p: &Arc<Pool>,
    sequential: bool,
) -> Result<(), Vec<CmdError>> {
    let err = |e: String| one(CmdError::new("resilver", name, e));
    let started = if sequential {
        cairn_scrub::start_rebuild(p)
    } else {
        cairn_scrub::request_resilver(p)
    }
    .map_err(|e| err(e.to_string()))?;
    if !started {
        return Ok(());
    }
    match ctx.pools.scans() {
        Some(m) => m.ensure_running(name, p.clone()),
        None => run_foreground(ctx, name, p)?,
    }
    Ok(())
}

/// Run the pool's scan in this process, with a progress bar on a terminal.
fn run_foreground(ctx: &mut Ctx, name: &str, p: &Arc<Pool>) -> Result<(), Vec<CmdError>> {
    use std::io::IsTerminal;
    let control = std::sync::atomic::AtomicU8::new(cairn_scrub::RUN);
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(100);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {percent}% {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let s = cairn_scrub::run(p, &control, &mut |s| {
        if let Some(b) = &bar {
            b.set_message(format!("{} {name}", s.function));
            let pct = (s.examined * 100)
                .checked_div(s.to_examine.max(1))
                .unwrap_or(0);
            b.set_position(pct.min(100));
        }
    })
    .map_err(|e| one(CmdError::new("scrub", name, e.to_string())))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if s.state == "finished" {
        errln!(
            ctx,
            "{} of '{name}' finished: {} repaired, {} errors",
            s.function,
            format_bytes_b(s.repaired),
            s.errors
        );
    }
    Ok(())
}

fn scrub(
    ctx: &mut Ctx,
    name: &str,
    pause: bool,
    stop: bool,
    wait: bool,
) -> Result<(), Vec<CmdError>> {
    let err = |e: String| one(CmdError::new("scrub", name, e));
    let p = ctx.pools.get(ctx.sd, name, "scrub").map_err(one)?;
    let what = if pause {
        Some(cairn_scrub::PAUSE)
    } else if stop {
        Some(cairn_scrub::STOP)
    } else {
        None
    };
    if let Some(w) = what {
        let signalled = ctx.pools.scans().is_some_and(|m| m.signal(name, w));
        if signalled {
            // The worker records the pause/stop itself; wait until it has.
            for _ in 0..1200 {
                if !ctx.pools.scans().is_some_and(|m| m.is_running(name)) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
        } else {
            cairn_scrub::set_control(&p, w).map_err(|e| err(e.to_string()))?;
        }
        return Ok(());
    }
    let st = p.scan_state().map_err(|e| err(e.to_string()))?;
    if st.state != "scanning" || ctx.pools.scans().is_some_and(|m| m.is_running(name)) {
        cairn_scrub::start_scrub(&p).map_err(|e| err(e.to_string()))?;
    }
    match ctx.pools.scans() {
        Some(m) => {
            m.ensure_running(name, p.clone());
            if wait {
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    let s = p.scan_state().map_err(|e| err(e.to_string()))?;
                    if s.state != "scanning" {
                        break;
                    }
                }
            }
        }
        None => run_foreground(ctx, name, &p)?,
    }
    let _ = p.log_history(&ctx.cmdline.clone(), &ctx.sd.hostname());
    Ok(())
}

/// Durations as zpool prints them: HH:MM:SS, or "N days HH:MM:SS".
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d} days {h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

/// The `scan:` lines of status.
pub fn scan_text(s: &cairn_pool::scan::ScanState) -> String {
    let f = if s.function.is_empty() {
        "scrub"
    } else {
        s.function.as_str()
    };
    let done_word = if f == "resilver" {
        "resilvered"
    } else {
        "repaired"
    };
    match s.state.as_str() {
        "" => "none requested".into(),
        "finished" => format!(
            "{}{} {} in {} with {} errors on {}",
            if f.starts_with("resilver") {
                if s.function == "rebuild" {
                    "sequential "
                } else {
                    ""
                }
            } else {
                "scrub "
            },
            done_word,
            format_bytes_b(s.repaired),
            duration(s.end_time.saturating_sub(s.start_time)),
            s.errors,
            format_time(s.end_time)
        ),
        "canceled" => format!("{f} canceled on {}", format_time(s.end_time)),
        st => {
            // Bytes per second of scanning time (pauses excluded, rate-limit waits included).
            let per_sec = |v: u64| (v as u128 * 1000 / s.active_ms.max(1) as u128) as u64;
            let rate = per_sec(s.examined);
            let pct = if s.to_examine > 0 {
                (s.examined as f64 * 100.0 / s.to_examine as f64).min(100.0)
            } else {
                0.0
            };
            let left = s.to_examine.saturating_sub(s.examined);
            if st == "paused" {
                // As zpool: no rate and no time to go while nothing runs.
                return format!(
                    "{f} paused since {}\n\t{f} started on {}\n\t{} / {} scanned, {} issued \
                     (every copy)\n\t{} {}, {:.2}% done",
                    format_time(s.paused_at),
                    format_time(s.start_time),
                    format_compact(s.examined),
                    format_compact(s.to_examine),
                    format_compact(s.issued),
                    format_bytes_b(s.repaired),
                    done_word,
                    pct
                );
            }
            let eta = if s.active_ms >= 1000 && rate > 0 {
                format!("{} to go", duration(left / rate))
            } else {
                "no estimated completion time".to_string()
            };
            format!(
                "{f} in progress since {}\n\t{} / {} scanned at {}/s, {} issued (every copy) at {}/s\n\t{} {}, {:.2}% done, {}",
                format_time(s.start_time),
                format_compact(s.examined),
                format_compact(s.to_examine),
                format_compact(rate),
                format_compact(s.issued),
                format_compact(per_sec(s.issued)),
                format_bytes_b(s.repaired),
                done_word,
                pct,
                eta
            )
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

fn events(ctx: &mut Ctx, flags: &ListFlags, pool: Option<&str>) -> CmdResult {
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

fn iostat_rows(
    v: &VdevStatus,
    depth: usize,
    verbose: bool,
    rows: &mut Vec<(String, [u64; 4], u64)>,
) {
    rows.push((
        format!("{}{}", "  ".repeat(depth), v.name),
        [v.reads, v.writes, v.read_bytes, v.write_bytes],
        v.read_latency_us,
    ));
    if verbose {
        for c in &v.children {
            iostat_rows(c, depth + 1, verbose, rows);
        }
    }
}

fn iostat(ctx: &mut Ctx, verbose: bool, flags: &ListFlags, args: &[String]) -> CmdResult {
    let bad = |m: String| {
        one(CmdError::usage(
            "iostat",
            format!("{m}\nusage: cairn pool iostat [-v] [POOL...] [INTERVAL [COUNT]]"),
        ))
    };
    let mut pools: Vec<String> = Vec::new();
    let mut nums: Vec<u64> = Vec::new();
    for a in args {
        // Numbers (or what looks like one: "-1", "0.5") end the pool names.
        let numeric = a.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.');
        match a.parse::<u64>() {
            Ok(n) => nums.push(n),
            Err(_) if nums.is_empty() && !numeric => pools.push(a.clone()),
            Err(_) if nums.is_empty() => {
                return Err(bad(format!(
                    "invalid interval '{a}': interval must be a positive number of seconds"
                )))
            }
            Err(_) => {
                return Err(bad(format!(
                    "invalid count '{a}': count must be a positive number"
                )))
            }
        }
    }
    let interval = nums.first().copied();
    let count = nums.get(1).copied();
    if interval == Some(0) {
        return Err(bad(
            "invalid interval '0': interval must be a positive number".into(),
        ));
    }
    if count == Some(0) {
        return Err(bad(
            "invalid count '0': count must be a positive number".into()
        ));
    }
    if nums.len() > 2 {
        return Err(bad(format!("too many arguments: '{}'", nums[2])));
    }
    let names = targets(ctx, &pools, "iostat")?;
    let mut opened = Vec::new();
    for n in &names {
        opened.push(ctx.pools.get(ctx.sd, n, "iostat").map_err(one)?);
    }
    let snapshot = |opened: &[Arc<Pool>]| -> Vec<(String, [u64; 4], u64, u64, u64)> {
        let mut out = Vec::new();
        for p in opened {
            let st = p.status();
            let mut rows = Vec::new();
            iostat_rows(&st.root, 0, verbose, &mut rows);
            for (i, (name, v, lat)) in rows.into_iter().enumerate() {
                let (alloc, free) = if i == 0 {
                    (st.allocated, st.free)
                } else {
                    (u64::MAX, u64::MAX)
                };
                out.push((name, v, alloc, free, lat));
            }
        }
        out
    };
    let num = |v: u64| {
        if v == u64::MAX {
            "-".to_string()
        } else if flags.parsable {
            v.to_string()
        } else {
            format_compact(v)
        }
    };
    let mut prev = snapshot(&opened);
    let mut round = 0u64;
    loop {
        let (cur, secs) = if let Some(iv) = interval.filter(|_| round > 0) {
            std::thread::sleep(std::time::Duration::from_secs(iv));
            (snapshot(&opened), iv)
        } else {
            (prev.clone(), 1)
        };
        let mut t = Table::new(
            [
                "NAME",
                "ALLOC",
                "FREE",
                "READ_OPS",
                "WRITE_OPS",
                "READ_BW",
                "WRITE_BW",
                "READ_LAT",
            ],
            vec![false, true, true, true, true, true, true, true],
        );
        for (i, (name, v, alloc, free, lat)) in cur.iter().enumerate() {
            let d: [u64; 4] = if round > 0 {
                let p = prev.get(i).map(|x| x.1).unwrap_or([0; 4]);
                [0, 1, 2, 3].map(|k| v[k].saturating_sub(p[k]) / secs)
            } else {
                *v
            };
            let lat = if *lat == 0 {
                "-".to_string()
            } else if flags.parsable {
                lat.to_string()
            } else {
                format!("{lat}us")
            };
            t.push([
                name.clone(),
                num(*alloc),
                num(*free),
                num(d[0]),
                num(d[1]),
                num(d[2]),
                num(d[3]),
                lat,
            ]);
        }
        if flags.json {
            let rows: Vec<Value> = cur
                .iter()
                .map(|(n, v, _, _, lat)| {
                    json!({"name": n.trim(), "reads": v[0], "writes": v[1], "read_bytes": v[2],
                           "write_bytes": v[3], "read_latency_us": lat})
                })
                .collect();
            ctx.print_json("cairn pool iostat", "vdevs", Value::Array(rows));
        } else {
            out!(ctx, "{}", t.render(flags.scripted));
        }
        prev = cur;
        round += 1;
        let done = match (interval, count) {
            (None, _) => true,
            (Some(_), Some(c)) => round >= c.max(1),
            (Some(_), None) => false,
        };
        if done {
            return Ok(ExitCode::SUCCESS);
        }
        if ctx.pools.is_daemon() {
            // The daemon answers once: an endless iostat belongs on the client side.
            if count.is_none() {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
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
fn targets(ctx: &mut Ctx, pools: &[String], verb: &str) -> Result<Vec<String>, Vec<CmdError>> {
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

/// zpool's compact counter: 0..999 as is, then 1.2K...
fn count(v: u64, exact: bool) -> String {
    if exact || v < 1000 {
        v.to_string()
    } else {
        format_compact(v)
    }
}

fn vdev_rows<'a>(
    v: &'a VdevStatus,
    depth: usize,
    full: bool,
    out: &mut Vec<(String, &'a VdevStatus)>,
) {
    let name = if full {
        v.path.clone().unwrap_or_else(|| v.name.clone())
    } else {
        v.name.clone()
    };
    out.push((format!("{}{}", "  ".repeat(depth), name), v));
    for c in &v.children {
        vdev_rows(c, depth + 1, full, out);
    }
}

/// What status adds after a leaf's state and reason, by leaf guid (its trim, `-t`).
type LeafNotes = BTreeMap<u64, String>;

fn render_config(root: &VdevStatus, full: bool, counters: bool, notes: &LeafNotes) -> String {
    let mut rows = Vec::new();
    vdev_rows(root, 0, full, &mut rows);
    let w = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0).max(10);
    let mut s = String::new();
    if counters {
        s.push_str(&format!(
            "\t{:<w$}  {:<8} {:>5} {:>5} {:>5}\n",
            "NAME", "STATE", "READ", "WRITE", "CKSUM"
        ));
    }
    for (n, v) in rows {
        let mut line = format!("\t{:<w$}  {:<8}", n, v.state);
        if counters {
            line.push_str(&format!(
                " {:>5} {:>5} {:>5}",
                count(v.read_errors, false),
                count(v.write_errors, false),
                count(v.checksum_errors, false)
            ));
        }
        if let Some(r) = &v.reason {
            line.push_str("  ");
            line.push_str(r);
        }
        if let Some(n) = notes.get(&v.guid).filter(|_| v.children.is_empty()) {
            line.push_str("  ");
            line.push_str(n);
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

fn vdev_json(v: &VdevStatus, trims: &BTreeMap<u64, LeafTrim>) -> Value {
    let mut children = Map::new();
    for c in &v.children {
        children.insert(c.name.clone(), vdev_json(c, trims));
    }
    let mut o = json!({
        "name": v.name, "vdev_type": v.vdev_type, "guid": v.guid.to_string(),
        "state": v.state, "read_errors": v.read_errors.to_string(),
        "write_errors": v.write_errors.to_string(),
        "checksum_errors": v.checksum_errors.to_string(),
        "repaired_bytes": v.repaired_bytes.to_string(),
    });
    if let Some(p) = &v.path {
        o["path"] = json!(p);
    }
    if let Some(p) = &v.phys_path {
        o["phys_path"] = json!(p);
    }
    if let Some(p) = &v.devid {
        o["devid"] = json!(p);
    }
    if let Some(r) = &v.reason {
        o["reason"] = json!(r);
    }
    if let Some(t) = trims.get(&v.guid).filter(|_| v.children.is_empty()) {
        o["trim_state"] = json!(trim_state_name(t.state));
        o["trim_percent"] = json!(t.percent().to_string());
        o["trimmed_bytes"] = json!(t.trimmed.to_string());
        o["trim_start_time"] = json!(t.start_time.to_string());
        o["trim_end_time"] = json!(t.end_time.to_string());
    } else if v.children.is_empty() {
        o["trim_state"] = json!("UNTRIMMED");
    }
    if !v.children.is_empty() {
        o["vdevs"] = Value::Object(children);
    }
    o
}

/// zpool's names of the trim states.
fn trim_state_name(s: TrimState) -> &'static str {
    match s {
        TrimState::Active => "ACTIVE",
        TrimState::Suspended => "SUSPENDED",
        TrimState::Complete => "COMPLETE",
    }
}

/// The trim notes of status: `(trimming)` on leaves being trimmed; with `-t` (`details`) every
/// leaf's state as zpool prints it.
fn trim_notes(root: &VdevStatus, trims: &BTreeMap<u64, LeafTrim>, details: bool) -> LeafNotes {
    fn walk(v: &VdevStatus, out: &mut Vec<u64>) {
        if v.children.is_empty() {
            out.push(v.guid);
        }
        for c in &v.children {
            walk(c, out);
        }
    }
    let mut leaves = Vec::new();
    for c in &root.children {
        walk(c, &mut leaves);
    }
    let mut notes = LeafNotes::new();
    for g in leaves {
        let t = trims.get(&g);
        let note = match (t, details) {
            (Some(t), false) if t.state == TrimState::Active => "(trimming)".to_string(),
            (_, false) => continue,
            (None, true) => "(untrimmed)".to_string(),
            (Some(t), true) => match t.state {
                TrimState::Active => format!(
                    "({}% trimmed, started at {})",
                    t.percent(),
                    format_time(t.start_time)
                ),
                TrimState::Suspended => format!(
                    "({}% trimmed, suspended at {})",
                    t.percent(),
                    format_time(t.end_time)
                ),
                TrimState::Complete => {
                    format!("(100% trimmed, completed at {})", format_time(t.end_time))
                }
            },
        };
        notes.insert(g, note);
    }
    notes
}

fn status_text(
    st: &PoolStatus,
    full: bool,
    verbose: bool,
    errors: &[String],
    scan: &str,
    notes: &LeafNotes,
) -> String {
    let mut s = format!("  pool: {}\n state: {}\n", st.name, st.state);
    if let Some(x) = &st.status {
        s.push_str(&format!("status: {x}\n"));
    }
    if let Some(x) = &st.action {
        s.push_str(&format!("action: {x}\n"));
    }
    s.push_str(&format!("  scan: {scan}\nconfig:\n\n"));
    s.push_str(&render_config(&st.root, full, true, notes));
    s.push('\n');
    if st.error_count == 0 {
        s.push_str("errors: No known data errors\n");
    } else if verbose {
        s.push_str("errors: Permanent errors have been detected in the following datasets:\n\n");
        for e in errors {
            s.push_str(&format!("        {e}\n"));
        }
    } else {
        s.push_str(&format!(
            "errors: {} data errors, use '-v' for a list\n",
            st.error_count
        ));
    }
    s
}

/// The permanent errors of a pool as `DATASET: offset N (SIZE block)` lines.
fn data_error_list(p: &Pool) -> Vec<String> {
    let names = cairn_dataset::object_names(p).unwrap_or_default();
    p.data_errors()
        .into_iter()
        .map(|(obj, off, bs)| match names.get(&obj) {
            Some(v) => format!("{}: offset {} ({} block)", v, off, format_compact(bs)),
            None => format!("<metadata>:<{obj:#x}> offset {off}"),
        })
        .collect()
}

/// The status of an imported pool that cannot be opened: its leaves (from the state dir's record,
/// placed in their mirrors by the labels still on them), and why the pool could not be opened as
/// the action.
fn unavailable_status(name: &str, entry: Option<&CacheEntry>, why: &str) -> PoolStatus {
    let leaves = entry.map(|e| e.leaves.clone()).unwrap_or_default();
    // The vdev tree as the labels still on the recorded devices describe it: leaves that carry the
    // pool's label are there (ONLINE), the others are missing, each with why.
    let paths: Vec<PathBuf> = leaves.iter().map(PathBuf::from).collect();
    let found = entry.and_then(|e| {
        import::scan(&paths)
            .into_iter()
            .find(|c| c.guid().0 == e.guid)
    });
    let children = match found {
        Some(c) => c.vdev_status().children,
        None => flat_unavailable(&leaves),
    };
    PoolStatus {
        name: name.to_string(),
        pool_guid: entry.map(|e| e.guid).unwrap_or(0),
        state: "UNAVAIL".into(),
        status: Some(
            "One or more devices could not be opened. There are insufficient replicas for the \
             pool to continue functioning."
                .into(),
        ),
        action: Some({
            let mut c = why.chars();
            let why: String = c
                .next()
                .map(|f| f.to_uppercase().chain(c).collect())
                .unwrap_or_default();
            format!("{why}. Or forget the pool with 'cairn pool export {name}'.")
        }),
        root: VdevStatus {
            name: name.to_string(),
            vdev_type: "root".into(),
            guid: entry.map(|e| e.guid).unwrap_or(0),
            state: "UNAVAIL".into(),
            reason: Some("insufficient replicas".into()),
            children,
            ..VdevStatus::default()
        },
        ..PoolStatus::default()
    }
}

/// Every recorded leaf UNAVAIL: when none of them carries the pool's label any more.
fn flat_unavailable(leaves: &[String]) -> Vec<VdevStatus> {
    leaves
        .iter()
        .map(|l| VdevStatus {
            name: cairn_pool::pool::leaf_name(l),
            vdev_type: "file".into(),
            path: Some(l.clone()),
            state: "UNAVAIL".into(),
            reason: Some(if Path::new(l).exists() {
                "corrupted data: missing or invalid label".into()
            } else {
                "cannot open".into()
            }),
            ..VdevStatus::default()
        })
        .collect()
}

fn status(
    ctx: &mut Ctx,
    verbose: bool,
    full: bool,
    trim_details: bool,
    json_out: bool,
    pools: &[String],
) -> CmdResult {
    let names = targets(ctx, pools, "status")?;
    let mut errs = Vec::new();
    let mut texts = Vec::new();
    let mut jp = Map::new();
    for n in &names {
        match ctx.pools.get(ctx.sd, n, "open") {
            Ok(p) => {
                let st = p.status();
                let errors = data_error_list(&p);
                let scan = p.scan_state().unwrap_or_default();
                let sched = p
                    .get_props(&["scrub_schedule".to_string()])
                    .ok()
                    .and_then(|v| v.first().map(|x| x.1.clone()))
                    .unwrap_or_else(|| "off".into());
                let mut scan_lines = scan_text(&scan);
                let last = (scan.last_scrub > 0).then_some(scan.last_scrub);
                if sched != "off" {
                    let next = cairn_scrub::schedule::next_due(&sched, last)
                        .map(|t| format_time(t.max(now_secs())))
                        .unwrap_or_else(|| "-".into());
                    scan_lines.push_str(&format!(
                        "\n schedule: scrub {sched}, last {}, next {next}",
                        last.map(format_time).unwrap_or_else(|| "never".into())
                    ));
                }
                let trims = p.trim_status();
                let notes = trim_notes(&st.root, &trims, trim_details);
                texts.push(status_text(
                    &st,
                    full,
                    verbose,
                    &errors,
                    &scan_lines,
                    &notes,
                ));
                let mut vdevs = Map::new();
                vdevs.insert(st.name.clone(), vdev_json(&st.root, &trims));
                jp.insert(
                    st.name.clone(),
                    json!({"name": st.name, "state": st.state,
                           "pool_guid": st.pool_guid.to_string(), "txg": st.txg.to_string(),
                           "status": st.status, "action": st.action,
                           "scrub_schedule": sched,
                           "last_scrub": scan.last_scrub.to_string(),
                           "scan_stats": json!({
                               "function": scan.function.to_uppercase(),
                               "state": scan.state.to_uppercase(),
                               "start_time": scan.start_time.to_string(),
                               "end_time": scan.end_time.to_string(),
                               "to_examine": scan.to_examine.to_string(),
                               "examined": scan.examined.to_string(),
                               "issued": scan.issued.to_string(),
                               "processed": scan.repaired.to_string(),
                               "errors": scan.errors.to_string(),
                               "bookmark": format!("{}:{}", scan.bookmark.object, scan.bookmark.blkid),
                           }),
                           "vdevs": vdevs, "error_count": st.error_count.to_string(),
                           "errlist": errors,
                           "size": st.size.to_string(), "allocated": st.allocated.to_string(),
                           "free": st.free.to_string()}),
                );
            }
            // Imported but its devices cannot be opened: shown UNAVAIL with its leaves (from the
            // state dir's cache; the tree's shape is in the labels, which cannot be read), exit 0,
            // as zpool.
            Err(e) if e.unavailable => {
                let cache = ctx.sd.load_cache().unwrap_or_default();
                let entry = cache.iter().find(|c| &c.name == n);
                let st = unavailable_status(n, entry, &e.reason);
                texts.push(status_text(
                    &st,
                    full,
                    verbose,
                    &[],
                    "none requested",
                    &LeafNotes::new(),
                ));
                let mut vdevs = Map::new();
                vdevs.insert(st.name.clone(), vdev_json(&st.root, &BTreeMap::new()));
                jp.insert(
                    st.name.clone(),
                    json!({"name": st.name, "state": st.state,
                           "pool_guid": st.pool_guid.to_string(),
                           "status": st.status, "action": st.action,
                           "vdevs": vdevs, "error_count": "0"}),
                );
            }
            Err(e) => errs.push(e),
        }
    }
    if json_out {
        ctx.print_json("cairn pool status", "pools", Value::Object(jp));
    } else if names.is_empty() {
        outln!(ctx, "no pools available");
    } else {
        out!(ctx, "{}", texts.join("\n"));
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
    s.push_str(&render_config(&root, false, false, &LeafNotes::new()));
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
