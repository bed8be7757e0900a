//! `cairn pool iostat [-v] [-l] [-y] [-H] [-p] [-j] [POOL...] [INTERVAL [COUNT]]`, in zpool's
//! shape:
//!
//! ```text
//!               capacity     operations     bandwidth
//! pool        alloc   free   read  write   read  write
//! ----------  -----  -----  -----  -----  -----  -----
//! tank        51.2M   446M      3     12  1.20M  3.05M
//! ```
//!
//! The first report covers the time since the pool was opened (rates averaged over it), then one
//! report per INTERVAL of the rates over that interval, until COUNT reports or Ctrl-C. The figures
//! are sampled on the client's side: the client asks for raw counters (`pool iostat --sample`,
//! through `crate::run_once`: the daemon, the foreground command holding the pool, or itself) each
//! round and computes the rates from the differences, so the reports stream under the daemon too.
//! `-v`: every vdev (alloc and free on the pool and its top-level vdevs, `-` below); `-l`: the
//! total_wait columns (moving averages of the leaves' read and write latency, the mean of the
//! leaves with a figure above them); `-y`: no since-open report; `-H`: no headers, tabs; `-p`:
//! exact numbers (latency in nanoseconds). `-j`: the since-open report as totals (`reads`,
//! `writes`, `read_bytes`, `write_bytes`, per vdev), the later ones as per-second rates.

use crate::ctx::Ctx;
use crate::poolcmd::targets;
use crate::size::format_compact;
use crate::statedir::StateDir;
use crate::{emit, out, run_once, CmdError, ListFlags};
use cairn_pool::pool::{PoolStatus, VdevStatus};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::{Duration, Instant};

type CmdResult = Result<ExitCode, Vec<CmdError>>;

/// The options of iostat.
#[derive(Clone, Copy, Default)]
pub struct Opts {
    pub verbose: bool,
    pub latency: bool,
    pub skip_first: bool,
    pub scripted: bool,
    pub parsable: bool,
    pub json: bool,
}

impl Opts {
    pub fn new(verbose: bool, latency: bool, skip_first: bool, f: &ListFlags) -> Opts {
        Opts {
            verbose,
            latency,
            skip_first,
            scripted: f.scripted,
            parsable: f.parsable,
            json: f.json,
        }
    }
}

/// One vdev's counters at one moment (a row of the report).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub pool: String,
    pub name: String,
    pub depth: usize,
    /// (allocated, size) of the pool and its top-level vdevs.
    pub space: Option<(u64, u64)>,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_lat_us: u64,
    pub write_lat_us: u64,
    /// Milliseconds the pool's counters have been counting.
    pub counting_ms: u64,
}

/// Mean latency (µs) of the leaves below `v` that have a figure.
fn mean_lat(v: &VdevStatus, f: fn(&VdevStatus) -> u64) -> u64 {
    fn walk(v: &VdevStatus, f: fn(&VdevStatus) -> u64, acc: &mut (u64, u64)) {
        if v.children.is_empty() {
            let x = f(v);
            if x > 0 {
                acc.0 += x;
                acc.1 += 1;
            }
        }
        for c in &v.children {
            walk(c, f, acc);
        }
    }
    let mut acc = (0, 0);
    walk(v, f, &mut acc);
    acc.0.checked_div(acc.1).unwrap_or(0)
}

fn rows_of(st: &PoolStatus, verbose: bool) -> Vec<Row> {
    fn walk(st: &PoolStatus, v: &VdevStatus, depth: usize, verbose: bool, out: &mut Vec<Row>) {
        out.push(Row {
            pool: st.name.clone(),
            name: v.name.clone(),
            depth,
            space: if depth == 0 {
                Some((st.allocated, st.size))
            } else {
                v.space
            },
            reads: v.reads,
            writes: v.writes,
            read_bytes: v.read_bytes,
            write_bytes: v.write_bytes,
            read_lat_us: mean_lat(v, |v| v.read_latency_us),
            write_lat_us: mean_lat(v, |v| v.write_latency_us),
            counting_ms: st.counting_ms,
        });
        if verbose {
            for c in &v.children {
                walk(st, c, depth + 1, verbose, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(st, &st.root, 0, verbose, &mut out);
    out
}

/// The counters of the pools named (all: every imported pool), now.
fn sample(ctx: &mut Ctx, pools: &[String], verbose: bool) -> Result<Vec<Row>, Vec<CmdError>> {
    let names = targets(ctx, pools, "iostat")?;
    let mut rows = Vec::new();
    for n in &names {
        let p = ctx.pools.get(ctx.sd, n, "iostat").map_err(|e| vec![e])?;
        rows.extend(rows_of(&p.status(), verbose));
    }
    Ok(rows)
}

/// `pool iostat`: one report since the pool was opened (the client does the intervals,
/// [`client`]); `--sample`: the raw counters as JSON, for the client.
pub(crate) fn iostat(ctx: &mut Ctx, o: &Opts, sample_only: bool, args: &[String]) -> CmdResult {
    let (pools, _, _) = crate::client::split_interval("iostat", args).map_err(|e| vec![e])?;
    let rows = sample(ctx, &pools, o.verbose)?;
    if sample_only {
        out!(ctx, "{}", serde_json::to_string(&rows).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let text = render(o, None, &rows, 0.0, true);
    out!(ctx, "{text}");
    Ok(ExitCode::SUCCESS)
}

/// Rates between two samples (or since the pool was opened).
struct Rates {
    reads: u64,
    writes: u64,
    read_bytes: u64,
    write_bytes: u64,
}

fn rates(prev: Option<&Row>, cur: &Row, secs: f64) -> Rates {
    let (d, secs) = match prev {
        Some(p) => (
            [
                cur.reads.saturating_sub(p.reads),
                cur.writes.saturating_sub(p.writes),
                cur.read_bytes.saturating_sub(p.read_bytes),
                cur.write_bytes.saturating_sub(p.write_bytes),
            ],
            secs,
        ),
        None => (
            [cur.reads, cur.writes, cur.read_bytes, cur.write_bytes],
            // At least a second: a pool just opened (without a daemon, by this very command)
            // shows its counts, not a burst's rate.
            (cur.counting_ms as f64 / 1000.0).max(1.0),
        ),
    };
    let per = |v: u64| (v as f64 / secs.max(0.001)).round() as u64;
    Rates {
        reads: per(d[0]),
        writes: per(d[1]),
        read_bytes: per(d[2]),
        write_bytes: per(d[3]),
    }
}

/// A report: `prev` is the sample before (None: since the pool was opened), `secs` the time
/// between them; `header`: print the banner (always with -v).
pub fn render(o: &Opts, prev: Option<&[Row]>, cur: &[Row], secs: f64, header: bool) -> String {
    let find = |r: &Row| {
        prev.and_then(|p| {
            p.iter()
                .find(|x| x.pool == r.pool && x.name == r.name && x.depth == r.depth)
        })
    };
    if o.json {
        let rows: Vec<Value> = cur
            .iter()
            .map(|r| {
                let (alloc, free) = match r.space {
                    Some((a, s)) => (json!(a), json!(s.saturating_sub(a))),
                    None => (Value::Null, Value::Null),
                };
                let mut v = json!({"pool": r.pool, "name": r.name, "depth": r.depth,
                    "alloc": alloc, "free": free,
                    "read_latency_us": r.read_lat_us, "write_latency_us": r.write_lat_us});
                match prev {
                    None => {
                        v["reads"] = json!(r.reads);
                        v["writes"] = json!(r.writes);
                        v["read_bytes"] = json!(r.read_bytes);
                        v["write_bytes"] = json!(r.write_bytes);
                    }
                    Some(_) => {
                        let x = rates(find(r), r, secs);
                        v["per_second"] = json!(true);
                        v["reads"] = json!(x.reads);
                        v["writes"] = json!(x.writes);
                        v["read_bytes"] = json!(x.read_bytes);
                        v["write_bytes"] = json!(x.write_bytes);
                    }
                }
                v
            })
            .collect();
        let v = crate::output::json_envelope("cairn pool iostat", "vdevs", Value::Array(rows));
        return format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    let num = |v: u64| {
        if o.parsable {
            v.to_string()
        } else {
            format_compact(v)
        }
    };
    let lat = |us: u64| {
        if us == 0 {
            "-".to_string()
        } else if o.parsable {
            (us * 1000).to_string()
        } else if us < 1000 {
            format!("{us}us")
        } else if us < 1_000_000 {
            format!("{}ms", us / 1000)
        } else {
            format!("{}s", us / 1_000_000)
        }
    };
    let mut lines: Vec<(String, Vec<String>)> = Vec::new();
    for r in cur {
        let x = rates(if prev.is_some() { find(r) } else { None }, r, secs);
        let x = if prev.is_some() && find(r).is_none() {
            // A vdev new since the last sample: its counters since open.
            rates(None, r, secs)
        } else {
            x
        };
        let (alloc, free) = match r.space {
            Some((a, s)) => (num(a), num(s.saturating_sub(a))),
            None => ("-".into(), "-".into()),
        };
        let mut cells = vec![
            alloc,
            free,
            num(x.reads),
            num(x.writes),
            num(x.read_bytes),
            num(x.write_bytes),
        ];
        if o.latency {
            cells.push(lat(r.read_lat_us));
            cells.push(lat(r.write_lat_us));
        }
        let name = if o.scripted {
            r.name.clone()
        } else {
            format!("{}{}", "  ".repeat(r.depth), r.name)
        };
        lines.push((name, cells));
    }
    if o.scripted {
        let mut s = String::new();
        for (n, cells) in lines {
            s.push_str(&n);
            for c in cells {
                s.push('\t');
                s.push_str(&c);
            }
            s.push('\n');
        }
        return s;
    }
    let w = lines
        .iter()
        .map(|(n, _)| n.len())
        .max()
        .unwrap_or(0)
        .max(10);
    let cw = lines
        .iter()
        .flat_map(|(_, c)| c.iter().map(String::len))
        .max()
        .unwrap_or(0)
        .max(5);
    let mut groups = vec!["capacity", "operations", "bandwidth"];
    let mut subs = vec!["alloc", "free", "read", "write", "read", "write"];
    if o.latency {
        groups.push("total_wait");
        subs.extend(["read", "write"]);
    }
    let dashes = {
        let mut d = "-".repeat(w);
        for _ in &subs {
            d.push_str("  ");
            d.push_str(&"-".repeat(cw));
        }
        d.push('\n');
        d
    };
    let mut s = String::new();
    if header {
        let gw = 2 * cw + 2;
        s.push_str(&" ".repeat(w));
        for g in &groups {
            s.push_str(&format!("  {g:^gw$}"));
        }
        s = s.trim_end().to_string();
        s.push('\n');
        s.push_str(&format!("{:<w$}", "pool"));
        for h in &subs {
            s.push_str(&format!("  {h:>cw$}"));
        }
        s.push('\n');
        s.push_str(&dashes);
    }
    for (n, cells) in &lines {
        s.push_str(&format!("{n:<w$}"));
        for c in cells {
            s.push_str(&format!("  {c:>cw$}"));
        }
        s.push('\n');
    }
    // As zpool: -v closes every report with a dash line; several pools get one too.
    let pools = cur
        .iter()
        .map(|r| &r.pool)
        .collect::<std::collections::BTreeSet<_>>();
    if o.verbose || pools.len() > 1 {
        s.push_str(&dashes);
    }
    s
}

/// The client's loop (every `pool iostat` but `--sample`).
pub fn client(sd: &StateDir, o: &Opts, args: &[String]) -> u8 {
    let (pools, mut interval, mut count) = match crate::client::split_interval("iostat", args) {
        Ok(x) => x,
        Err(e) => return crate::client::usage_error(&e),
    };
    if o.skip_first && interval.is_none() {
        // -y alone: one report of the next second.
        interval = Some(1);
        count = Some(1);
    }
    let mut argv: Vec<String> = ["cairn", "pool", "iostat", "--sample"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if o.verbose {
        argv.push("-v".into());
    }
    argv.extend(pools);
    let take = || -> Result<(Vec<Row>, Instant), u8> {
        let r = run_once(sd, &argv);
        if r.code != 0 {
            emit(&r);
            return Err(r.code);
        }
        match serde_json::from_str::<Vec<Row>>(r.out.trim()) {
            Ok(rows) => Ok((rows, Instant::now())),
            Err(e) => {
                eprintln!("cannot iostat: bad sample from the pool's holder: {e}");
                Err(1)
            }
        }
    };
    let mut prev: Option<(Vec<Row>, Instant)> = None;
    if o.skip_first {
        match take() {
            Ok(s) => prev = Some(s),
            Err(c) => return c,
        }
        std::thread::sleep(Duration::from_secs(interval.unwrap_or(1)));
    }
    let mut printed = 0u64;
    loop {
        let cur = match take() {
            Ok(s) => s,
            Err(c) => return c,
        };
        let secs = prev
            .as_ref()
            .map(|(_, t)| cur.1.duration_since(*t).as_secs_f64())
            .unwrap_or(0.0);
        let header = printed == 0 || o.verbose;
        let text = render(
            o,
            prev.as_ref().map(|p| p.0.as_slice()),
            &cur.0,
            secs,
            header,
        );
        emit(&crate::daemon::ControlReply {
            code: 0,
            out: text,
            err: String::new(),
        });
        printed += 1;
        prev = Some(cur);
        match (interval, count) {
            (None, _) => return 0,
            (Some(_), Some(c)) if printed >= c => return 0,
            (Some(iv), _) => std::thread::sleep(Duration::from_secs(iv)),
        }
    }
}
