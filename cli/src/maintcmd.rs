//! `cairn pool sync`, `pool labelclear` and `pool resilver`.

use crate::ctx::Ctx;
use crate::poolcmd::targets;
use crate::{errln, CmdError};
use cairn_pool::PoolState;
use std::path::Path;
use std::process::ExitCode;

type CmdResult = Result<ExitCode, Vec<CmdError>>;

/// `pool sync [POOL...]`: commit the open transaction group of the pools (all: every imported
/// pool) now, as zpool sync.
pub fn sync(ctx: &mut Ctx, pools: &[String]) -> CmdResult {
    let names = targets(ctx, pools, "sync")?;
    let mut errs = Vec::new();
    for n in &names {
        match ctx.pools.get(ctx.sd, n, "sync") {
            Ok(p) => {
                if let Err(e) = p.sync() {
                    errs.push(CmdError::new("sync", n, e));
                }
            }
            Err(e) => errs.push(e),
        }
    }
    if errs.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(errs)
    }
}

/// `pool labelclear [-f] LEAF`: wipe Cairn's four labels (and uberblock rings) of a leaf. Refused
/// for a leaf of a pool imported here or open in any process; `-f` is needed for a leaf of an
/// exported pool or of a pool another system has imported (its label says active); a leaf of a
/// destroyed pool, a detached leaf or a file without a label is wiped as it is.
pub fn labelclear(ctx: &mut Ctx, leaf: &Path, force: bool) -> CmdResult {
    let shown = leaf.display().to_string();
    let err = |r: String| vec![CmdError::new("labelclear", &shown, r)];
    let path = ctx.abs(leaf);
    let label = cairn_pool::pool::leaf_label(&path).map_err(|e| err(e.to_string()))?;
    if let Some((name, guid, state)) = &label {
        let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        let cache = ctx.sd.load_cache().unwrap_or_default();
        let imported = cache.iter().any(|e| {
            e.guid == guid.0
                && e.leaves
                    .iter()
                    .any(|l| std::fs::canonicalize(l).unwrap_or_else(|_| l.into()) == canon)
        });
        if imported {
            return Err(err(format!(
                "{shown} is a member (ACTIVE) of pool '{name}', imported here; destroy the pool \
                 or detach the leaf first"
            )));
        }
        match state {
            PoolState::Exported if !force => {
                return Err(err(format!(
                    "{shown} is a member of exported pool '{name}'; use '-f' to clear it anyway"
                )))
            }
            PoolState::Active if !force => {
                return Err(err(format!(
                    "{shown} is a member of pool '{name}', which may be imported on another \
                     system; use '-f' to clear it anyway"
                )))
            }
            _ => {}
        }
    }
    cairn_pool::pool::clear_labels(&path).map_err(|e| match e {
        cairn_pool::PoolError::InUse(_) => err(format!(
            "{shown} is in use: its pool is open in another process"
        )),
        e => err(e.to_string()),
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `pool resilver POOL...`: start a resilver of the leaves that lack txgs, or restart the running
/// (or paused) one from the beginning, as zpool resilver. Behind a running scrub it is queued.
pub fn resilver(ctx: &mut Ctx, pools: &[String]) -> CmdResult {
    for name in pools {
        let err = |e: String| vec![CmdError::new("resilver", name, e)];
        let p = ctx
            .pools
            .get(ctx.sd, name, "resilver")
            .map_err(|e| vec![e])?;
        let st = p.scan_state().map_err(|e| err(e.to_string()))?;
        if st.function == "resilver" && (st.state == "scanning" || st.state == "paused") {
            crate::scrubcmd::control_scan(ctx, name, &p, cairn_scrub::STOP).map_err(err)?;
        }
        let started = cairn_scrub::request_resilver(&p).map_err(|e| err(e.to_string()))?;
        let _ = p.log_history(&ctx.cmdline.clone(), &ctx.sd.hostname());
        if !started {
            return Err(err(
                "no leaf lacks any txg: there is nothing to resilver".into()
            ));
        }
        let now = p.scan_state().map_err(|e| err(e.to_string()))?;
        if now.function != "resilver" {
            errln!(
                ctx,
                "resilver of '{name}' queued behind the running {}",
                now.function
            );
        }
        match ctx.pools.scans() {
            Some(m) => m.ensure_running(name, p.clone()),
            None => {
                crate::scrubcmd::run_foreground(ctx, name, &p)?;
                if ctx.exit != 0 {
                    break;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
