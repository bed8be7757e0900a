//! `cairn pool scrub` and the scans other commands start (a resilver after online, attach,
//! replace, clear): in the daemon's background, or in the foreground without one.

use crate::ctx::Ctx;
use crate::errln;
use crate::size::format_bytes_b;
use crate::CmdError;
use cairn_pool::scan::ScanState;
use cairn_pool::Pool;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn one(e: CmdError) -> Vec<CmdError> {
    vec![e]
}

/// Start (or queue) a resilver if some leaf lacks txgs; without a daemon it runs now.
pub(crate) fn resilver_if_needed(
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

/// A progress bar for a scan on a terminal (nothing on a pipe): `scrub tank [=====   ] 52% eta 1m 20s`.
pub(crate) struct Progress(indicatif::ProgressBar, String);

impl Progress {
    pub fn new(name: &str) -> Option<Progress> {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(100);
            b.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {percent}% {prefix}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            Progress(b, name.to_string())
        })
    }

    pub fn update(&self, s: &ScanState) {
        self.0.set_message(format!("{} {}", s.function, self.1));
        let pct = (s.examined * 100)
            .checked_div(s.to_examine.max(1))
            .unwrap_or(0);
        self.0.set_position(pct.min(100));
        self.0.set_prefix(eta_label(s));
    }

    pub fn finish(self) {
        self.0.finish_and_clear();
    }
}

/// The bar's time to go, from the scan's own rate (bytes examined per second of scanning):
/// `eta 1m 20s`, or nothing before there is a rate.
pub(crate) fn eta_label(s: &ScanState) -> String {
    if s.active_ms < 1000 || s.examined == 0 {
        return String::new();
    }
    let rate = (s.examined as u128 * 1000 / s.active_ms as u128).max(1);
    let left = (s.to_examine.saturating_sub(s.examined) as u128 / rate) as u64;
    let (h, m, sec) = (left / 3600, left / 60 % 60, left % 60);
    let t = if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {sec}s")
    } else {
        format!("{sec}s")
    };
    format!("eta {t}")
}

/// What a scan that ended says on stderr.
pub(crate) fn ended_message(name: &str, s: &ScanState) -> Option<String> {
    match s.state.as_str() {
        "finished" => Some(format!(
            "{} of '{name}' finished: {} repaired, {} errors",
            s.function,
            format_bytes_b(s.repaired),
            s.errors
        )),
        "paused" => Some(format!(
            "{} of '{name}' paused (run 'cairn pool scrub {name}' to resume)",
            s.function
        )),
        "canceled" => Some(format!("{} of '{name}' canceled", s.function)),
        _ => None,
    }
}

/// Run the pool's scan in this process, with a progress bar on a terminal. Meanwhile other
/// commands reach the pool through this process (`crate::fgserve`), and SIGINT or SIGTERM pause
/// the scan, as `scrub -p` would (the next `scrub` resumes it): the command then exits 128 + the
/// signal.
pub(crate) fn run_foreground(
    ctx: &mut Ctx,
    name: &str,
    p: &Arc<Pool>,
) -> Result<(), Vec<CmdError>> {
    crate::interrupt::catch();
    let function = p
        .scan_state()
        .map(|s| s.function)
        .unwrap_or_else(|_| "scan".into());
    let manager = Arc::new(cairn_scrub::ScanManager::default());
    let server =
        crate::fgserve::Server::start(ctx.sd, name, &function, p.clone(), Some(manager.clone()));
    let control = Arc::new(AtomicU8::new(cairn_scrub::RUN));
    let bar = Progress::new(name);
    let done = AtomicBool::new(false);
    let r = std::thread::scope(|sc| {
        // The signal only sets a flag: turn it into a pause, which the scan takes at once (also
        // in the middle of a rate limit's wait).
        sc.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                if crate::interrupt::interrupted() {
                    control.store(cairn_scrub::PAUSE, Ordering::SeqCst);
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let r = manager.run_here(name, p, control.clone(), &mut |s| {
            if let Some(b) = &bar {
                b.update(s);
            }
        });
        done.store(true, Ordering::SeqCst);
        r
    });
    drop(server);
    if let Some(b) = bar {
        b.finish();
    }
    let s = r.map_err(|e| one(CmdError::new(&function, name, e.to_string())))?;
    if let Some(m) = ended_message(name, &s) {
        errln!(ctx, "{m}");
    }
    if crate::interrupt::interrupted() {
        ctx.exit = crate::interrupt::exit_code();
    }
    Ok(())
}

/// Pause or stop (`cairn_scrub::PAUSE`, `STOP`) the scan of pool `name`: through the daemon's scan
/// thread if one runs (waiting until the worker has recorded it), else in the scan state itself.
pub(crate) fn control_scan(ctx: &Ctx, name: &str, p: &Pool, what: u8) -> Result<(), String> {
    if ctx.pools.scans().is_some_and(|m| m.signal(name, what)) {
        for _ in 0..1200 {
            if !ctx.pools.scans().is_some_and(|m| m.is_running(name)) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        Ok(())
    } else {
        cairn_scrub::set_control(p, what)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

pub(crate) fn scrub(
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
    if pause
        && p.scan_state().is_ok_and(|s| {
            s.state == "paused" && !ctx.pools.scans().is_some_and(|m| m.is_running(name))
        })
    {
        // Nothing to do, as zpool says; not an error.
        errln!(
            ctx,
            "the scrub of '{name}' is already paused (run 'cairn pool scrub {name}' to resume)"
        );
        return Ok(());
    }
    if let Some(w) = what {
        return control_scan(ctx, name, &p, w).map_err(err);
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
