//! Commands that repeat on the client's side: each round asks once (`crate::run_once`: the
//! daemon, this process, or the foreground command holding the pool) and prints, so that the
//! output streams whoever runs the command, and Ctrl-C ends the client alone.

use crate::statedir::StateDir;
use crate::{emit, run_once, CmdError, PoolCmd, Top};
use std::time::Duration;

/// Pool names, interval and count.
pub type PoolsInterval = (Vec<String>, Option<u64>, Option<u64>);

/// `[POOL...] [INTERVAL [COUNT]]` as zpool reads it: the numbers after the pool names are the
/// interval (seconds, at least 1) and the count (at least 1).
pub fn split_interval(verb: &str, args: &[String]) -> Result<PoolsInterval, CmdError> {
    let bad = |m: String| {
        CmdError::usage(
            verb,
            format!("{m}\nusage: cairn pool {verb} [OPTIONS] [POOL...] [INTERVAL [COUNT]]"),
        )
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
    if nums.len() > 2 {
        return Err(bad(format!("too many arguments: '{}'", nums[2])));
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
    Ok((pools, interval, count))
}

/// Print a usage error as `crate::execute` does; exit code 2.
pub fn usage_error(e: &CmdError) -> u8 {
    eprintln!("error: {}\n\nFor more information, try '--help'.", e.reason);
    2
}

/// Run `cmd` as a client-side loop if it is one; `None` if it runs once as usual.
pub fn repeat(sd: &StateDir, cmd: &Top, argv: &[String]) -> Option<u8> {
    let Top::Pool(cmd) = cmd else { return None };
    match cmd {
        PoolCmd::Status { pools, .. } => {
            let (_, interval, count) = match split_interval("status", pools) {
                Ok(x) => x,
                Err(e) => return Some(usage_error(&e)),
            };
            let interval = interval?;
            Some(every(interval, count, || {
                let r = run_once(sd, argv);
                emit(&r);
                (r.code != 0).then_some(r.code)
            }))
        }
        PoolCmd::Wait {
            activities,
            interval,
            check: false,
            ..
        } => {
            let checked = crate::waitcmd::parse_activities(activities.as_deref())
                .and_then(|_| crate::waitcmd::parse_interval(interval.as_deref()));
            Some(match checked {
                Ok(iv) => crate::waitcmd::client(sd, argv, iv),
                Err(e) => usage_error(&e),
            })
        }
        PoolCmd::Iostat {
            verbose,
            latency,
            skip_first,
            flags,
            sample: false,
            args,
        } => {
            let o = crate::iostatcmd::Opts::new(*verbose, *latency, *skip_first, flags);
            Some(crate::iostatcmd::client(sd, &o, args))
        }
        PoolCmd::Scrub {
            pause: false,
            stop: false,
            wait: true,
            pools,
        } => daemon_scrub_wait(sd, pools),
        _ => None,
    }
}

/// `scrub -w` under the daemon on a terminal: start the scrubs there (without `-w`), then show the
/// same progress bar as a foreground scrub, from `status -j` every half second, until each has
/// ended. `None` without a terminal or a daemon (the command then runs as usual: the daemon
/// waits, or the scrub runs here with its own bar).
fn daemon_scrub_wait(sd: &StateDir, pools: &[String]) -> Option<u8> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let mut argv: Vec<String> = ["cairn", "pool", "scrub"].map(String::from).to_vec();
    argv.extend(pools.iter().cloned());
    let r = crate::daemon::forward(sd.root(), argv)?;
    emit(&r);
    if r.code != 0 {
        return Some(r.code);
    }
    for name in pools {
        let bar = crate::scrubcmd::Progress::new(name);
        let mut last = None;
        loop {
            let argv = ["cairn", "pool", "status", "-j", name.as_str()].map(String::from);
            let Some(r) = crate::daemon::forward(sd.root(), argv.to_vec()) else {
                break;
            };
            if r.code != 0 {
                emit(&r);
                return Some(r.code);
            }
            let Some(s) = scan_of(&r.out, name) else {
                break;
            };
            if let Some(b) = &bar {
                b.update(&s);
            }
            if s.state != "scanning" {
                last = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if let Some(b) = bar {
            b.finish();
        }
        if let Some(m) = last.and_then(|s| crate::scrubcmd::ended_message(name, &s)) {
            eprintln!("{m}");
        }
    }
    Some(0)
}

/// The scan state of `status -j` output.
fn scan_of(json: &str, name: &str) -> Option<cairn_pool::scan::ScanState> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let s = &v["pools"][name]["scan_stats"];
    let n = |k: &str| {
        s[k].as_str()
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(cairn_pool::scan::ScanState {
        function: s["function"].as_str()?.to_lowercase(),
        state: s["state"].as_str()?.to_lowercase(),
        to_examine: n("to_examine"),
        examined: n("examined"),
        issued: n("issued"),
        repaired: n("processed"),
        errors: n("errors"),
        active_ms: n("active_ms"),
        ..Default::default()
    })
}

/// Call `round` `count` times (or until interrupted), `interval` seconds apart; stop at the
/// first round that returns an exit code.
pub fn every(interval: u64, count: Option<u64>, mut round: impl FnMut() -> Option<u8>) -> u8 {
    let mut n = 0u64;
    loop {
        if let Some(code) = round() {
            return code;
        }
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return 0;
        }
        std::thread::sleep(Duration::from_secs(interval));
    }
}
