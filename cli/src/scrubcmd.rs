//! `cairn pool scrub` and the scans other commands start (a resilver after online, attach,
//! replace, clear): in the daemon's background, or in the foreground without one.

use crate::ctx::Ctx;
use crate::errln;
use crate::size::format_bytes_b;
use crate::CmdError;
use cairn_pool::Pool;
use std::sync::Arc;

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
