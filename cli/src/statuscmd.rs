//! `cairn pool status`: the pool's health, scan, configuration table and errors, as zpool shows
//! them (text and `-j`).

use crate::ctx::Ctx;
use crate::poolcmd::{format_time, targets};
use crate::size::{format_bytes_b, format_compact};
use crate::statedir::CacheEntry;
use crate::{out, outln, CmdError, StatusOpts};
use cairn_pool::import;
use cairn_pool::pool::{PoolStatus, VdevStatus};
use cairn_pool::trim::{LeafTrim, TrimState};
use cairn_pool::Pool;
use cairn_vdev::units::now_secs;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

type CmdResult = Result<ExitCode, Vec<CmdError>>;

/// Durations as zpool prints them: HH:MM:SS, or "N days HH:MM:SS".
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d} days {h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

/// The `scan:` lines of status (`exact`: byte figures as exact numbers, `-p`).
pub fn scan_text(s: &cairn_pool::scan::ScanState, exact: bool) -> String {
    let format_compact = |v: u64| {
        if exact {
            v.to_string()
        } else {
            format_compact(v)
        }
    };
    let format_bytes_b = |v: u64| {
        if exact {
            v.to_string()
        } else {
            format_bytes_b(v)
        }
    };
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

/// zpool's compact counter: 0..999 as is, then 1.2K...
fn count(v: u64, exact: bool) -> String {
    if exact || v < 1000 {
        v.to_string()
    } else {
        format_compact(v)
    }
}

/// How status shows the vdevs of its table (its options).
#[derive(Clone, Copy, Default)]
pub(crate) struct Show {
    /// `-P`: the full path of leaves.
    pub full: bool,
    /// `-L`: symbolic links resolved.
    pub resolve: bool,
    /// `-g`: GUIDs instead of names.
    pub guids: bool,
    /// `-p`: exact counters.
    pub exact: bool,
    /// `-e`: only unhealthy vdevs (and those above them).
    pub errors_only: bool,
    /// `-s`: the SLOW column.
    pub slow: bool,
}

impl Show {
    fn of(o: &StatusOpts) -> Show {
        Show {
            full: o.full_paths,
            resolve: o.resolve,
            guids: o.guids,
            exact: o.parsable,
            errors_only: o.errors_only,
            slow: o.slow,
        }
    }

    /// The name a vdev's row shows.
    fn name(&self, v: &VdevStatus, depth: usize) -> String {
        if self.guids && depth > 0 {
            return v.guid.to_string();
        }
        let Some(path) = v.path.as_deref().filter(|_| self.full || self.resolve) else {
            return v.name.clone();
        };
        let path = if self.resolve {
            std::fs::canonicalize(path)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| path.to_string())
        } else {
            path.to_string()
        };
        if self.full {
            path
        } else {
            cairn_pool::pool::leaf_name(&path)
        }
    }
}

/// A vdev that is not ONLINE, has errors, or (a leaf) has something to say (`-e`).
fn unhealthy(v: &VdevStatus) -> bool {
    v.state != "ONLINE"
        || v.read_errors + v.write_errors + v.checksum_errors > 0
        || (v.children.is_empty() && v.reason.is_some())
}

fn has_unhealthy(v: &VdevStatus) -> bool {
    unhealthy(v) || v.children.iter().any(has_unhealthy)
}

fn vdev_rows<'a>(
    v: &'a VdevStatus,
    depth: usize,
    show: &Show,
    out: &mut Vec<(String, &'a VdevStatus)>,
) {
    if show.errors_only && depth > 0 && !has_unhealthy(v) {
        return;
    }
    out.push((format!("{}{}", "  ".repeat(depth), show.name(v, depth)), v));
    for c in &v.children {
        vdev_rows(c, depth + 1, show, out);
    }
}

/// What status adds after a leaf's state and reason, by leaf guid (its trim, `-t`).
pub(crate) type LeafNotes = BTreeMap<u64, String>;

pub(crate) fn render_config(
    root: &VdevStatus,
    show: &Show,
    counters: bool,
    notes: &LeafNotes,
) -> String {
    let mut rows = Vec::new();
    vdev_rows(root, 0, show, &mut rows);
    let w = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0).max(10);
    let mut s = String::new();
    if counters {
        s.push_str(&format!(
            "\t{:<w$}  {:<8} {:>5} {:>5} {:>5}",
            "NAME", "STATE", "READ", "WRITE", "CKSUM"
        ));
        if show.slow {
            s.push_str(&format!(" {:>5}", "SLOW"));
        }
        s.push('\n');
    }
    for (n, v) in rows {
        let mut line = format!("\t{:<w$}  {:<8}", n, v.state);
        if counters {
            line.push_str(&format!(
                " {:>5} {:>5} {:>5}",
                count(v.read_errors, show.exact),
                count(v.write_errors, show.exact),
                count(v.checksum_errors, show.exact)
            ));
            if show.slow {
                line.push_str(&format!(" {:>5}", count(v.slow_ios, show.exact)));
            }
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
    o: &StatusOpts,
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
    s.push_str(&render_config(&st.root, &Show::of(o), true, notes));
    s.push('\n');
    if o.dedup {
        // As zpool with no dedup table: Cairn does not deduplicate.
        s.push_str(" dedup: no DDT entries\n\n");
    }
    if st.error_count == 0 {
        s.push_str("errors: No known data errors\n");
    } else if o.verbose {
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

/// Is the pool healthy (`-x` leaves it out)? ONLINE, nothing to say about it, no data errors.
fn healthy(st: &PoolStatus) -> bool {
    st.state == "ONLINE" && st.status.is_none() && st.error_count == 0
}

/// The notes of `-i`: Cairn has no `initialize` (thin leaves need none), so every leaf is
/// "(uninitialized)", as zpool shows a leaf never initialized.
fn initialize_notes(v: &VdevStatus, notes: &mut LeafNotes) {
    if v.children.is_empty() && v.vdev_type == "leaf" {
        let n = notes.entry(v.guid).or_default();
        if !n.is_empty() {
            n.push_str("  ");
        }
        n.push_str("(uninitialized)");
    }
    for c in &v.children {
        initialize_notes(c, notes);
    }
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

/// `pool status [OPTIONS] [POOL...] [INTERVAL [COUNT]]`: one report (the client repeats it per
/// interval, `crate::client`).
pub(crate) fn status(ctx: &mut Ctx, o: &StatusOpts, args: &[String]) -> CmdResult {
    let (pools, _, _) = crate::client::split_interval("status", args).map_err(|e| vec![e])?;
    let names = targets(ctx, &pools, "status")?;
    let mut errs = Vec::new();
    let mut texts = Vec::new();
    let mut jp = Map::new();
    for n in &names {
        match ctx.pools.get(ctx.sd, n, "open") {
            Ok(p) => {
                let st = p.status();
                if o.unhealthy && healthy(&st) {
                    continue;
                }
                let errors = data_error_list(&p);
                let scan = p.scan_state().unwrap_or_default();
                let sched = p
                    .get_props(&["scrub_schedule".to_string()])
                    .ok()
                    .and_then(|v| v.first().map(|x| x.1.clone()))
                    .unwrap_or_else(|| "off".into());
                let mut scan_lines = scan_text(&scan, o.parsable);
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
                let mut notes = trim_notes(&st.root, &trims, o.trim);
                if o.initialize {
                    initialize_notes(&st.root, &mut notes);
                }
                texts.push(status_text(&st, o, &errors, &scan_lines, &notes));
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
                               "active_ms": scan.active_ms.to_string(),
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
                    o,
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
    if o.json {
        ctx.print_json("cairn pool status", "pools", Value::Object(jp));
    } else if names.is_empty() {
        outln!(ctx, "no pools available");
    } else if o.unhealthy && texts.is_empty() && errs.is_empty() {
        // As zpool -x.
        if pools.is_empty() {
            outln!(ctx, "all pools are healthy");
        } else {
            for n in &pools {
                outln!(ctx, "pool '{n}' is healthy");
            }
        }
    } else {
        out!(ctx, "{}", texts.join("\n"));
    }
    if errs.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(errs)
    }
}
