//! `cairn pool wait [-t ACTIVITY[,ACTIVITY...]] POOL [INTERVAL]`: block until none of the
//! activities is in progress, as zpool wait. The client asks once per half second
//! (`pool wait --check`, through `crate::run_once`: the daemon, this process, or the foreground
//! command holding the pool) what is still in progress; with INTERVAL it prints that every
//! INTERVAL seconds.
//!
//! In progress: `scrub`, a scrub scanning (a paused one is not, as zpool); `resilver`, a resilver
//! or sequential rebuild scanning; `replace`, a leaf being replaced; `trim`, a manual trim active;
//! `free`, the pool's `freeing` above 0. Work nobody runs (a scan left scanning by a foreground
//! command that was killed, with no daemon) is an error, not an endless wait; frees without a daemon
//! are driven by the checks' own commits.

use crate::ctx::Ctx;
use crate::statedir::StateDir;
use crate::{emit, outln, run_once, CmdError};
use std::process::ExitCode;
use std::time::{Duration, Instant};

type CmdResult = Result<ExitCode, Vec<CmdError>>;

pub const ACTIVITIES: &[&str] = &["free", "replace", "resilver", "scrub", "trim"];

/// `-t` as given (none: every activity).
pub fn parse_activities(t: Option<&str>) -> Result<Vec<&'static str>, CmdError> {
    let Some(t) = t else {
        return Ok(ACTIVITIES.to_vec());
    };
    let mut out = Vec::new();
    for a in t.split(',') {
        match ACTIVITIES.iter().find(|x| **x == a.trim()) {
            Some(x) => out.push(*x),
            None => {
                return Err(CmdError::usage(
                    "wait",
                    format!(
                        "invalid activity '{a}': one of {} (comma-separated)",
                        ACTIVITIES.join(", ")
                    ),
                ))
            }
        }
    }
    Ok(out)
}

pub fn parse_interval(i: Option<&str>) -> Result<Option<u64>, CmdError> {
    match i {
        None => Ok(None),
        Some(s) => match s.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(CmdError::usage(
                "wait",
                format!("invalid interval '{s}': interval must be a positive number of seconds"),
            )),
        },
    }
}

/// What of `activities` is in progress on `pool`: `ACTIVITY\tDETAIL` lines.
fn in_progress(ctx: &mut Ctx, pool: &str, activities: &[&str]) -> Result<Vec<String>, CmdError> {
    let err = |e: String| CmdError::new("wait for", pool, e);
    let p = ctx.pools.get(ctx.sd, pool, "wait for")?;
    let runner = ctx.pools.runs_work();
    let scan = p.scan_state().map_err(|e| err(e.to_string()))?;
    let scanning = scan.state == "scanning";
    let not_run = |what: &str| {
        err(format!(
            "the {what} is not running (no daemon runs it); resume it with 'cairn pool scrub \
             {pool}' or start 'cairn serve'"
        ))
    };
    let pct = (scan.examined as f64 * 100.0 / scan.to_examine.max(1) as f64).min(100.0);
    let mut out = Vec::new();
    for a in activities {
        match *a {
            "scrub" if scanning && scan.function == "scrub" => {
                if !runner {
                    return Err(not_run("scrub"));
                }
                out.push(format!("scrub\t{pct:.2}% done"));
            }
            "resilver" if scanning && scan.function != "scrub" => {
                if !runner {
                    return Err(not_run(&scan.function));
                }
                out.push(format!("resilver\t{pct:.2}% done"));
            }
            "replace" => {
                let replacing: Vec<String> = p
                    .config()
                    .tops
                    .iter()
                    .flat_map(|t| t.children.iter())
                    .filter(|c| c.flags.replacing)
                    .map(|c| cairn_pool::pool::leaf_name(&c.identity.path))
                    .collect();
                if !replacing.is_empty() {
                    if !(runner && scanning) {
                        return Err(not_run("resilver of the replace"));
                    }
                    out.push(format!("replace\t{}", replacing.join(", ")));
                }
            }
            "trim" if p.trim_active() => {
                if !runner {
                    return Err(err(format!(
                        "the trim is not running (no daemon runs it); resume it with 'cairn \
                         pool trim {pool}'"
                    )));
                }
                out.push("trim\tactive".into());
            }
            "free" => {
                let freeing = |p: &cairn_pool::Pool| {
                    p.get_props(&["freeing".to_string()])
                        .ok()
                        .and_then(|v| v.first().and_then(|x| x.1.parse::<u64>().ok()))
                        .unwrap_or(0)
                };
                let mut left = freeing(&p);
                if left > 0 && !runner {
                    // Nobody commits this pool but us: each commit frees a share.
                    p.sync().map_err(|e| err(e.to_string()))?;
                    left = freeing(&p);
                }
                if left > 0 {
                    out.push(format!("free\t{} left", crate::size::format_bytes_b(left)));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// `pool wait --check`: print what is in progress (nothing: done). Without `--check` (a command
/// line sent to the daemon directly), wait here.
pub fn wait(ctx: &mut Ctx, pool: &str, t: Option<&str>, check: bool) -> CmdResult {
    let acts = parse_activities(t).map_err(|e| vec![e])?;
    loop {
        let busy = in_progress(ctx, pool, &acts).map_err(|e| vec![e])?;
        if check {
            for l in busy {
                outln!(ctx, "{l}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        if busy.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The client's loop: ask every half second until nothing is in progress.
pub fn client(sd: &StateDir, argv: &[String], interval: Option<u64>) -> u8 {
    let mut argv = argv.to_vec();
    argv.push("--check".into());
    let mut last_print: Option<Instant> = None;
    loop {
        let r = run_once(sd, &argv);
        if r.code != 0 {
            emit(&r);
            return r.code;
        }
        if r.out.trim().is_empty() {
            return 0;
        }
        if let Some(iv) = interval {
            if last_print.is_none_or(|t| t.elapsed() >= Duration::from_secs(iv)) {
                for l in r.out.lines() {
                    let (a, d) = l.split_once('\t').unwrap_or((l, ""));
                    println!("{a:<10} {d}");
                }
                last_print = Some(Instant::now());
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
