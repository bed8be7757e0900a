//! `cairn pool trim`: start, suspend or cancel the manual trim of a pool's leaves
//! (`cairn_pool::trim`). Under the daemon the trim runs in the background (`-w` waits for it);
//! without one it runs in the foreground, and Ctrl-C suspends it (resumed by the next `trim`).

use crate::ctx::Ctx;
use crate::size::format_bytes_b;
use crate::{errln, CmdError};
use cairn_pool::trim::{TrimAction, TrimState};
use std::process::ExitCode;

type CmdResult = Result<ExitCode, Vec<CmdError>>;

#[allow(clippy::too_many_arguments)]
pub fn trim(
    ctx: &mut Ctx,
    pool: &str,
    leaves: &[String],
    wait: bool,
    suspend: bool,
    cancel: bool,
    secure: bool,
) -> CmdResult {
    let err = |name: &str, e: String| vec![CmdError::new("trim", name, e)];
    if secure {
        return Err(err(
            pool,
            "secure trim is not supported (files and discards cannot promise the data is gone)"
                .into(),
        ));
    }
    let p = ctx.pools.get(ctx.sd, pool, "trim").map_err(|e| vec![e])?;
    let action = if suspend {
        TrimAction::Suspend
    } else if cancel {
        TrimAction::Cancel
    } else {
        TrimAction::Start
    };
    let what = if leaves.len() == 1 { &leaves[0] } else { pool };
    p.trim(leaves, action)
        .map_err(|e| err(what, e.to_string()))?;
    let _ = p.log_history(&ctx.cmdline.clone(), &ctx.sd.hostname());
    if action != TrimAction::Start {
        return Ok(ExitCode::SUCCESS);
    }
    if ctx.pools.is_daemon() {
        p.start_trim_thread();
        if wait {
            p.wait_trim();
        }
    } else {
        crate::interrupt::catch();
        // Meanwhile status and `trim -s`/`-c` reach the pool through this process.
        let server = crate::fgserve::Server::start(ctx.sd, pool, "trim", p.clone(), None);
        let r = p.run_trim(&crate::interrupt::interrupted, &mut || {});
        drop(server);
        r.map_err(|e| err(pool, e.to_string()))?;
        if crate::interrupt::interrupted() {
            let _ = p.trim(&[], TrimAction::Suspend);
            errln!(
                ctx,
                "trim of '{pool}' suspended (run 'cairn pool trim {pool}' to resume)"
            );
            ctx.exit = crate::interrupt::exit_code();
            return Ok(ExitCode::from(ctx.exit));
        }
    }
    if !p.trim_active() {
        let done: u64 = p
            .trim_status()
            .values()
            .filter(|t| t.state == TrimState::Complete)
            .map(|t| t.trimmed)
            .sum();
        if wait || !ctx.pools.is_daemon() {
            errln!(
                ctx,
                "trim of '{pool}' finished: {} trimmed",
                format_bytes_b(done)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
