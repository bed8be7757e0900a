//! `cairn pool iostat`: I/O statistics per pool and vdev.

use crate::ctx::Ctx;
use crate::output::Table;
use crate::poolcmd::targets;
use crate::size::format_compact;
use crate::{out, CmdError, ListFlags};
use cairn_pool::pool::VdevStatus;
use cairn_pool::Pool;
use serde_json::{json, Value};
use std::process::ExitCode;
use std::sync::Arc;

type CmdResult = Result<ExitCode, Vec<CmdError>>;

fn one(e: CmdError) -> Vec<CmdError> {
    vec![e]
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

pub(crate) fn iostat(
    ctx: &mut Ctx,
    verbose: bool,
    flags: &ListFlags,
    args: &[String],
) -> CmdResult {
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
