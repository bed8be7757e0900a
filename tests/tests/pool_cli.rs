//! End-to-end tests of the `cairn pool` commands: create, list, status, import, export, destroy, add,
//! get, set and history, with the bad inputs each must refuse without changing anything.
//!
//! Every test runs the real binary in its own temporary directory with its own state directory
//! (see `cairn_tests::Env`). Leaves are sparse files of 64-256 MiB.

use cairn_tests::{json_leaves, scribble, Env, MIB};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The size of one label (4 per leaf: 2 at the front, 2 at the end).
const LABEL: u64 = 256 * 1024;

/// Asserts that `stderr` is `cannot <verb> '<name>': <reason>` (for an empty name `cannot <verb>:
/// <reason> (the name given is empty)`) and that the reason holds every needle.
fn assert_cannot(stderr: &str, verb: &str, name: &str, needles: &[&str]) {
    let prefix = if name.is_empty() {
        assert!(stderr.contains("(the name given is empty)"), "{stderr}");
        format!("cannot {verb}: ")
    } else {
        format!("cannot {verb} '{name}': ")
    };
    let line = stderr
        .lines()
        .find(|l| l.starts_with("cannot "))
        .unwrap_or_else(|| panic!("no `cannot ...` line in stderr:\n{stderr}"));
    assert!(
        line.starts_with(&prefix),
        "expected `{prefix}...`, got:\n{stderr}"
    );
    let reason = &line[prefix.len()..];
    assert!(!reason.trim().is_empty(), "empty reason:\n{stderr}");
    for n in needles {
        assert!(
            reason.contains(n),
            "the reason should mention {n:?}:\n{stderr}"
        );
    }
}

/// The rows of the config table of `pool status` (or of an import listing): (indent, fields).
fn config_rows(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut rows = Vec::new();
    let mut in_config = false;
    for l in text.lines() {
        if l.trim_start() == "config:" {
            in_config = true;
            continue;
        }
        if !in_config {
            continue;
        }
        if l.trim().is_empty() {
            if rows.is_empty() {
                continue;
            }
            break;
        }
        let Some(row) = l.strip_prefix('\t') else {
            break;
        };
        let indent = row.len() - row.trim_start().len();
        rows.push((indent, row.split_whitespace().map(str::to_string).collect()));
    }
    rows
}

/// The config rows without the NAME STATE... header, as (indent, name, state).
fn vdev_rows(text: &str) -> Vec<(usize, String, String)> {
    config_rows(text)
        .into_iter()
        .filter(|(_, f)| f[0] != "NAME")
        .map(|(i, f)| (i, f[0].clone(), f.get(1).cloned().unwrap_or_default()))
        .collect()
}

/// The tree shape of a status/import config: (indent, name) pairs.
fn tree(text: &str) -> Vec<(usize, String)> {
    vdev_rows(text)
        .into_iter()
        .map(|(i, n, _)| (i, n))
        .collect()
}

fn t(items: &[(usize, &str)]) -> Vec<(usize, String)> {
    items.iter().map(|&(i, n)| (i, n.to_string())).collect()
}

/// The first 2 and last 2 labels of a leaf: what a label write would change.
fn label_area(path: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).expect("open leaf");
    let len = f.metadata().expect("stat").len();
    let p = len / LABEL * LABEL;
    let mut front = vec![0u8; (2 * LABEL).min(len) as usize];
    f.read_exact_at(&mut front, 0).expect("read front");
    let mut back = Vec::new();
    if p >= 4 * LABEL {
        back = vec![0u8; 2 * LABEL as usize];
        f.read_exact_at(&mut back, p - 2 * LABEL)
            .expect("read back");
    }
    front.extend(back);
    front
}

fn all_zero(path: &Path) -> bool {
    label_area(path).iter().all(|&b| b == 0)
}

fn s(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `pool create [-f] [--size SIZE] NAME SPEC...` with the spec words given as leaf names inside the
/// tempdir (made absolute) and the keywords kept as they are.
fn create_args(
    env: &Env,
    size: Option<&str>,
    force: bool,
    name: &str,
    spec: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = vec!["pool".into(), "create".into()];
    if force {
        a.push("-f".into());
    }
    if let Some(sz) = size {
        a.push("--size".into());
        a.push(sz.into());
    }
    a.push(name.into());
    for w in spec {
        if matches!(*w, "mirror" | "stripe") {
            a.push(w.to_string());
        } else {
            a.push(env.p(w));
        }
    }
    a
}

/// A create that must succeed.
fn create(env: &Env, size: &str, name: &str, spec: &[&str]) -> String {
    env.ok(&s(&create_args(env, Some(size), false, name, spec)))
}

/// A create that must fail; returns stderr.
fn try_create(env: &Env, size: Option<&str>, force: bool, name: &str, spec: &[&str]) -> String {
    env.fail(&s(&create_args(env, size, force, name, spec)))
}

// ---------------------------------------------------------------------------------------------------
// create, list, status
// ---------------------------------------------------------------------------------------------------

#[test]
fn create_raid10_sparse_and_output_shapes() {
    let env = Env::new();
    let out = create(
        &env,
        "256M",
        "tank",
        &["mirror", "a", "b", "mirror", "c", "d"],
    );
    assert_eq!(out, "", "create prints nothing on success");

    // Sparse leaves of exactly 256 MiB that use little disk.
    for l in ["a", "b", "c", "d"] {
        let md = std::fs::metadata(env.path(l)).unwrap();
        assert!(md.is_file());
        assert_eq!(md.len(), 256 * MIB, "{l} has the --size length");
        let used = md.blocks() * 512;
        assert!(
            used < 16 * MIB,
            "{l} should be sparse: {used} bytes allocated"
        );
    }

    // list: the zpool header and one row.
    let list = env.ok(&["pool", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "NAME", "SIZE", "ALLOC", "FREE", "CKPOINT", "EXPANDSZ", "FRAG", "CAP", "DEDUP",
            "HEALTH", "ALTROOT"
        ]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row.len(), 11, "{list}");
    assert_eq!(row[0], "tank");
    assert_eq!(row[9], "ONLINE");
    assert!(row[1].ends_with('M'), "human size like 503M: {}", row[1]);
    assert!(row[7].ends_with('%'), "CAP with a percent sign: {}", row[7]);
    assert_eq!(row[8], "1.00x");

    // -H: no header, tab separated, the same row.
    let h = env.ok(&["pool", "list", "-H"]);
    assert_eq!(h.lines().count(), 1, "{h}");
    let hf: Vec<&str> = h.trim_end_matches('\n').split('\t').collect();
    assert_eq!(hf, row, "-H holds the same fields, separated by tabs");
    assert!(!h.contains("NAME"));

    // -p: exact numbers. Two mirrors of 256 MiB leaves: a bit less than 512 MiB.
    let size = env.pool_size("tank");
    assert!(
        size > 480 * MIB && size <= 512 * MIB,
        "size of two 256M mirrors: {size}"
    );
    let p = env.ok(&["pool", "list", "-H", "-p"]);
    let pf: Vec<&str> = p.trim_end().split('\t').collect();
    assert_eq!(pf[1], size.to_string());
    let alloc: u64 = pf[2].parse().expect("exact alloc");
    let free: u64 = pf[3].parse().expect("exact free");
    assert!(
        alloc > 0 && alloc < MIB,
        "a fresh pool allocates a little: {alloc}"
    );
    assert_eq!(alloc + free, size, "alloc + free = size");
    assert_eq!(pf[7], "0", "-p CAP has no percent sign");

    // -o: the chosen columns in that order.
    let o = env.ok(&["pool", "list", "-o", "name,size,health"]);
    let ol: Vec<Vec<&str>> = o.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        ol,
        [
            vec!["NAME", "SIZE", "HEALTH"],
            vec!["tank", row[1], "ONLINE"]
        ]
    );
    let ohp = env.ok(&["pool", "list", "-Hp", "-o", "health,name,size"]);
    assert_eq!(ohp, format!("ONLINE\ttank\t{size}\n"));

    // -j: output_version and exact values with -p.
    let j = env.list_json();
    assert_eq!(j["output_version"]["command"], "cairn pool list");
    assert!(j["output_version"]["vers_major"].is_u64(), "{j}");
    assert!(j["output_version"]["vers_minor"].is_u64(), "{j}");
    let tank = &j["pools"]["tank"];
    assert_eq!(tank["name"], "tank");
    assert_eq!(tank["state"], "ONLINE");
    let guid = tank["pool_guid"].as_str().expect("guid string");
    assert!(
        !guid.is_empty() && guid.bytes().all(|b| b.is_ascii_digit()),
        "{guid}"
    );
    assert_eq!(tank["properties"]["size"]["value"], size.to_string());
    assert_eq!(tank["properties"]["health"]["value"], "ONLINE");
    assert_eq!(
        j["pools"].as_object().unwrap().len(),
        1,
        "exactly one pool: {j}"
    );

    // status: zpool's shape.
    let st = env.ok(&["pool", "status"]);
    let sl: Vec<&str> = st.lines().collect();
    assert_eq!(sl[0], "  pool: tank", "{st}");
    assert_eq!(sl[1], " state: ONLINE", "{st}");
    assert!(sl.contains(&"config:"), "{st}");
    assert!(
        sl.iter().any(|l| l.starts_with("  scan:")),
        "a scan line: {st}"
    );
    assert_eq!(
        sl.last().copied(),
        Some("errors: No known data errors"),
        "{st}"
    );
    let rows = config_rows(&st);
    assert_eq!(
        rows[0].1,
        ["NAME", "STATE", "READ", "WRITE", "CKSUM"],
        "{st}"
    );
    assert_eq!(
        tree(&st),
        t(&[
            (0, "tank"),
            (2, "mirror-0"),
            (4, "a"),
            (4, "b"),
            (2, "mirror-1"),
            (4, "c"),
            (4, "d")
        ]),
        "{st}"
    );
    for (_, f) in &rows[1..] {
        assert_eq!(&f[1..], ["ONLINE", "0", "0", "0"], "{st}");
    }
    // The columns line up: STATE starts at the same column on every row.
    let col = |l: &str, w: &str| l.find(w);
    let state_col = sl
        .iter()
        .find(|l| l.contains("NAME"))
        .and_then(|l| col(l, "STATE"));
    for l in sl
        .iter()
        .filter(|l| l.contains("ONLINE") && l.starts_with('\t'))
    {
        assert_eq!(col(l, "ONLINE"), state_col, "aligned STATE column:\n{st}");
    }

    // status -P: full paths.
    let sp = env.ok(&["pool", "status", "-P", "tank"]);
    let names: Vec<String> = vdev_rows(&sp).into_iter().map(|r| r.1).collect();
    let mut want = vec!["tank".to_string(), "mirror-0".into()];
    want.extend(env.leaves(&["a", "b"]));
    want.push("mirror-1".into());
    want.extend(env.leaves(&["c", "d"]));
    assert_eq!(names, want, "{sp}");

    // status -j: output_version and the vdev tree.
    let sj = env.json(&["pool", "status", "-j"]);
    assert_eq!(sj["output_version"]["command"], "cairn pool status");
    let p = &sj["pools"]["tank"];
    assert_eq!(p["state"], "ONLINE");
    assert_eq!(p["pool_guid"], guid);
    let root = &p["vdevs"]["tank"];
    assert_eq!(root["vdev_type"], "root");
    let m0 = &root["vdevs"]["mirror-0"];
    assert_eq!(m0["vdev_type"], "mirror");
    assert_eq!(m0["state"], "ONLINE");
    assert_eq!(m0["vdevs"]["a"]["path"], env.p("a"));
    assert_eq!(m0["vdevs"]["a"]["vdev_type"], "leaf");
    assert_eq!(root["vdevs"]["mirror-1"]["vdevs"]["d"]["path"], env.p("d"));
    let leaves = json_leaves(p);
    assert_eq!(
        leaves.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c", "d"]
    );
    for (_, l) in &leaves {
        assert_eq!(l["state"], "ONLINE");
        assert!(l["devid"].as_str().is_some_and(|d| !d.is_empty()), "{l}");
    }
}

#[test]
fn create_single_stripe_threeway_and_mixed() {
    let env = Env::new();
    create(&env, "128M", "one", &["s0"]);
    let unit = env.pool_size("one");
    assert!(unit > 100 * MIB && unit <= 128 * MIB, "{unit}");
    let st = env.ok(&["pool", "status", "one"]);
    assert_eq!(tree(&st), t(&[(0, "one"), (2, "s0")]), "{st}");

    // A 3-way mirror holds the size of one leaf.
    create(&env, "128M", "three", &["mirror", "m1", "m2", "m3"]);
    assert_eq!(env.pool_size("three"), unit);
    let st = env.ok(&["pool", "status", "three"]);
    assert_eq!(
        tree(&st),
        t(&[
            (0, "three"),
            (2, "mirror-0"),
            (4, "m1"),
            (4, "m2"),
            (4, "m3")
        ]),
        "{st}"
    );

    // A stripe adds its children up.
    create(&env, "128M", "striped", &["stripe", "t1", "t2"]);
    assert_eq!(env.pool_size("striped"), 2 * unit);
    let st = env.ok(&["pool", "status", "striped"]);
    assert_eq!(
        tree(&st),
        t(&[(0, "striped"), (2, "stripe-0"), (4, "t1"), (4, "t2")]),
        "{st}"
    );
    let j = env.status_json("striped");
    assert_eq!(
        j["vdevs"]["striped"]["vdevs"]["stripe-0"]["vdev_type"],
        "stripe"
    );

    // Stripe and mirror mixed at create time.
    create(
        &env,
        "128M",
        "mixed",
        &["stripe", "x1", "x2", "mirror", "y1", "y2"],
    );
    assert_eq!(env.pool_size("mixed"), 3 * unit);
    let st = env.ok(&["pool", "status", "mixed"]);
    assert_eq!(
        tree(&st),
        t(&[
            (0, "mixed"),
            (2, "stripe-0"),
            (4, "x1"),
            (4, "x2"),
            (2, "mirror-1"),
            (4, "y1"),
            (4, "y2")
        ]),
        "{st}"
    );

    // Two single leaves: dynamic striping over both.
    create(&env, "128M", "two", &["z1", "z2"]);
    assert_eq!(env.pool_size("two"), 2 * unit);

    assert_eq!(
        env.pool_names(),
        ["mixed", "one", "striped", "three", "two"],
        "pool list is sorted by name"
    );
    for n in env.pool_names() {
        assert_eq!(env.pool_health(&n), "ONLINE");
    }
}

#[test]
fn mirror_of_different_sizes_warns_and_uses_the_smallest() {
    let env = Env::new();
    env.sparse("small", 128 * MIB);
    env.sparse("big", 256 * MIB);
    let o = env.run(&["pool", "create", "ref", &env.p("small")]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let unit = env.pool_size("ref");
    env.ok(&["pool", "destroy", "ref"]);

    let o = env.run(&[
        "pool",
        "create",
        "tank",
        "mirror",
        &env.p("small"),
        &env.p("big"),
    ]);
    assert_eq!(o.code, 0, "different sizes are allowed: {}", o.stderr);
    assert!(
        o.stderr.contains("warning") && o.stderr.contains("different sizes"),
        "a warning names the size mismatch: {:?}",
        o.stderr
    );
    assert!(
        o.stderr.contains("mirror-0"),
        "the warning names the vdev: {:?}",
        o.stderr
    );
    assert_eq!(env.pool_size("tank"), unit, "sized to the smallest leaf");
    assert_eq!(env.pool_health("tank"), "ONLINE");
    // The files are left as they were.
    assert_eq!(std::fs::metadata(env.path("big")).unwrap().len(), 256 * MIB);
}

// ---------------------------------------------------------------------------------------------------
// export, move, import, history
// ---------------------------------------------------------------------------------------------------

#[test]
fn export_move_import_by_name_guid_and_new_name() {
    let env = Env::new();
    let old = env.mkdir("old");
    create(
        &env,
        "128M",
        "tank",
        &["mirror", "old/a", "old/b", "mirror", "old/c", "old/d"],
    );
    env.ok(&["pool", "set", "comment=moved", "tank"]);
    let before = env.status_json("tank");
    let guid = before["pool_guid"].as_str().unwrap().to_string();
    let size = env.pool_size("tank");

    assert_eq!(env.ok(&["pool", "export", "tank"]), "");
    assert_eq!(env.ok(&["pool", "list"]).trim(), "no pools available");
    let e = env.fail(&["pool", "status", "tank"]);
    assert_cannot(&e, "open", "tank", &["no such pool"]);

    // Move every leaf to another directory.
    let new = env.mkdir("new");
    for l in ["a", "b", "c", "d"] {
        std::fs::rename(old.join(l), new.join(l)).unwrap();
    }
    assert_eq!(
        env.importable(&[&old]).trim(),
        "no pools available to import"
    );
    let listing = env.importable(&[&new]);
    assert_eq!(env.importable_names(&[&new]), ["tank"], "{listing}");
    assert!(listing.contains(&format!("id: {guid}")), "{listing}");
    assert!(listing.lines().any(|l| l == "  state: ONLINE"), "{listing}");
    assert_eq!(
        tree(&listing),
        t(&[
            (0, "tank"),
            (2, "mirror-0"),
            (4, "a"),
            (4, "b"),
            (2, "mirror-1"),
            (4, "c"),
            (4, "d")
        ]),
        "{listing}"
    );
    // Listing changes nothing.
    assert!(env.pool_names().is_empty());

    // Import by name: the new paths are recorded.
    let newdir = new.to_str().unwrap();
    assert_eq!(env.ok(&["pool", "import", "-d", newdir, "tank"]), "");
    assert_eq!(env.pool_names(), ["tank"]);
    assert_eq!(env.pool_size("tank"), size);
    let sp = env.ok(&["pool", "status", "-P", "tank"]);
    let leaf_names: Vec<String> = vdev_rows(&sp)
        .into_iter()
        .filter(|r| r.1.starts_with('/'))
        .map(|r| r.1)
        .collect();
    assert_eq!(
        leaf_names,
        env.leaves(&["new/a", "new/b", "new/c", "new/d"]),
        "{sp}"
    );
    let after = env.status_json("tank");
    let (b, a) = (json_leaves(&before), json_leaves(&after));
    for ((n, lb), (_, la)) in b.iter().zip(&a) {
        assert_eq!(la["path"], env.p(&format!("new/{n}")));
        assert_eq!(la["phys_path"], env.p(&format!("new/{n}")));
        assert_eq!(la["devid"], lb["devid"], "a file's devid survives a rename");
        assert_eq!(la["guid"], lb["guid"]);
    }
    let c = env.ok(&["pool", "get", "-H", "comment", "tank"]);
    assert_eq!(c, "tank\tcomment\tmoved\tlocal\n");
    assert_eq!(
        env.importable(&[&new]).trim(),
        "no pools available to import",
        "an imported pool is not offered again"
    );
    let e = env.fail(&["pool", "import", "-d", newdir, "tank"]);
    assert_cannot(&e, "import", "tank", &["already imported"]);

    // Import by numeric GUID.
    env.ok(&["pool", "export", "tank"]);
    env.ok(&["pool", "import", "-d", newdir, &guid]);
    assert_eq!(env.pool_names(), ["tank"]);

    // Import under a new name (by name).
    env.ok(&["pool", "export", "tank"]);
    env.ok(&["pool", "import", "-d", newdir, "tank", "pond"]);
    assert_eq!(env.pool_names(), ["pond"]);
    let st = env.ok(&["pool", "status", "pond"]);
    assert!(st.starts_with("  pool: pond\n state: ONLINE\n"), "{st}");
    assert_eq!(tree(&st)[0], (0, "pond".to_string()));
    assert_eq!(env.status_json("pond")["pool_guid"], guid.as_str());
    let e = env.fail(&["pool", "status", "tank"]);
    assert_cannot(&e, "open", "tank", &["no such pool"]);

    // Under the new name after another export/import cycle too.
    env.ok(&["pool", "export", "pond"]);
    assert_eq!(env.importable_names(&[&new]), ["pond"]);
    env.ok(&["pool", "import", "-d", newdir, &guid, "lake"]);
    assert_eq!(env.pool_names(), ["lake"]);

    // History: every change, in order.
    let h = env.ok(&["pool", "history", "lake"]);
    let lines: Vec<&str> = h.lines().collect();
    assert_eq!(lines[0], "History for 'lake':", "{h}");
    let wanted = [
        "pool create",
        "pool set comment=moved tank",
        "pool export tank",
        &format!("pool import -d {newdir} tank"),
        "pool export tank",
        &format!("pool import -d {newdir} {guid}"),
        "pool export tank",
        &format!("pool import -d {newdir} tank pond"),
        "pool export pond",
        &format!("pool import -d {newdir} {guid} lake"),
    ];
    assert_eq!(lines.len(), 1 + wanted.len(), "{h}");
    for (l, w) in lines[1..].iter().zip(wanted) {
        assert!(l.contains(w), "history line {l:?} should hold {w:?}:\n{h}");
        // 2026-11-22.00:22:23 cairn ...
        let (ts, cmd) = l.split_once(' ').unwrap();
        assert_eq!(ts.len(), 19, "timestamp {ts:?}");
        assert!(cmd.starts_with("cairn "), "{l}");
    }
}

#[test]
fn relative_leaf_paths_are_recorded_absolute() {
    let env = Env::new();
    let elsewhere = env.mkdir("elsewhere");
    env.ok(&[
        "pool", "create", "--size", "64M", "tank", "mirror", "a", "./b",
    ]);
    let from_elsewhere = |args: &[&str]| {
        let o = env.run_in(&elsewhere, args);
        assert_eq!(o.code, 0, "{args:?}: {}", o.stderr);
        o.stdout
    };
    let sp = from_elsewhere(&["pool", "status", "-P", "tank"]);
    let leaves: Vec<String> = vdev_rows(&sp)
        .into_iter()
        .filter(|r| r.1.starts_with('/'))
        .map(|r| r.1)
        .collect();
    assert_eq!(leaves, env.leaves(&["a", "b"]), "{sp}");
    env.ok(&["pool", "export", "tank"]);
    env.ok(&["pool", "import", "-d", ".", "tank"]);
    let sp = from_elsewhere(&["pool", "status", "-P", "tank"]);
    assert!(sp.contains(&format!("\t    {}  ", env.p("a"))), "{sp}");
    from_elsewhere(&["pool", "export", "tank"]);
}

#[test]
fn leaves_moved_while_imported_are_found_again_by_import() {
    let env = Env::new();
    create(&env, "64M", "tank", &["mirror", "a", "b"]);
    let new = env.mkdir("new");
    for l in ["a", "b"] {
        std::fs::rename(env.path(l), new.join(l)).unwrap();
    }
    // The pool cannot be opened at its recorded paths: status shows it UNAVAIL with the leaves it
    // looked for (exit 0, as zpool), and the action says what to do.
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(st.starts_with("  pool: tank\n state: UNAVAIL\n"), "{st}");
    assert!(st.contains(&env.p("a")) && st.contains("import -d"), "{st}");
    let rows = tree(&st);
    assert_eq!(
        rows.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        ["tank", "a", "b"],
        "{st}"
    );
    for l in ["a", "b"] {
        let line = st
            .lines()
            .find(|x| x.trim_start().starts_with(&format!("{l} ")))
            .unwrap();
        assert!(
            line.contains("UNAVAIL") && line.ends_with("cannot open"),
            "{line}"
        );
    }
    assert_eq!(env.status_json("tank")["state"], "UNAVAIL");
    // list shows it UNAVAIL (as zpool lists a pool it cannot open).
    assert_eq!(
        env.ok(&["pool", "list", "-H", "-o", "name,health"]),
        "tank\tUNAVAIL\n"
    );
    env.ok(&["pool", "import", "-d", new.to_str().unwrap(), "tank"]);
    assert_eq!(env.pool_names(), ["tank"]);
    assert_eq!(env.pool_health("tank"), "ONLINE");
    let j = env.status_json("tank");
    let paths: Vec<String> = json_leaves(&j)
        .iter()
        .map(|l| l.1["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(paths, env.leaves(&["new/a", "new/b"]));
}

#[test]
fn import_by_guid_when_two_exported_pools_share_a_name() {
    let env = Env::new();
    let d1 = env.mkdir("d1");
    let d2 = env.mkdir("d2");
    create(&env, "64M", "dup", &["d1/a"]);
    let g1 = env.status_json("dup")["pool_guid"]
        .as_str()
        .unwrap()
        .to_string();
    env.ok(&["pool", "export", "dup"]);
    create(&env, "64M", "dup", &["d2/a"]);
    let g2 = env.status_json("dup")["pool_guid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(g1, g2);

    // With one of them imported, importing the other by name collides.
    let e = env.fail(&["pool", "import", "-d", d1.to_str().unwrap(), "dup"]);
    assert_cannot(&e, "import", "dup", &["already imported"]);
    assert_eq!(env.pool_names(), ["dup"]);
    assert_eq!(env.status_json("dup")["pool_guid"], g2.as_str());
    env.ok(&["pool", "export", "dup"]);

    let both = [d1.as_path(), d2.as_path()];
    assert_eq!(env.importable_names(&both), ["dup", "dup"]);
    let args = |w: &str| {
        vec![
            "pool".to_string(),
            "import".into(),
            "-d".into(),
            d1.to_str().unwrap().into(),
            "-d".into(),
            d2.to_str().unwrap().into(),
            w.into(),
        ]
    };
    let a = args("dup");
    let e = env.fail(&s(&a));
    assert_cannot(&e, "import", "dup", &["more than one", &g1, &g2]);
    assert!(env.pool_names().is_empty());
    let a = args(&g2);
    env.ok(&s(&a));
    assert_eq!(env.status_json("dup")["pool_guid"], g2.as_str());
    // The other one under a new name.
    let mut a = args(&g1);
    a.push("dup1".into());
    env.ok(&s(&a));
    assert_eq!(env.pool_names(), ["dup", "dup1"]);
    assert_eq!(env.status_json("dup1")["pool_guid"], g1.as_str());
}

// ---------------------------------------------------------------------------------------------------
// destroy, add
// ---------------------------------------------------------------------------------------------------

#[test]
fn destroy_removes_the_pool_and_frees_its_leaves() {
    let env = Env::new();
    create(&env, "128M", "tank", &["mirror", "a", "b"]);
    assert_eq!(env.ok(&["pool", "destroy", "tank"]), "");
    assert!(env.pool_names().is_empty());
    assert_eq!(env.ok(&["pool", "list"]).trim(), "no pools available");
    assert_eq!(
        env.importable(&[env.dir()]).trim(),
        "no pools available to import",
        "a destroyed pool is not offered for import"
    );
    let e = env.fail(&["pool", "destroy", "tank"]);
    assert_cannot(&e, "destroy", "tank", &["no such pool"]);
    let e = env.fail(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_cannot(&e, "import", "tank", &["no such pool"]);

    // The leaves are free: no -f needed.
    env.ok(&[
        "pool",
        "create",
        "again",
        "mirror",
        &env.p("a"),
        &env.p("b"),
    ]);
    assert_eq!(env.pool_names(), ["again"]);
    assert_eq!(env.pool_health("again"), "ONLINE");
}

#[test]
fn add_grows_the_pool_and_checks_the_replication_level() {
    let env = Env::new();
    create(&env, "128M", "tank", &["mirror", "a", "b"]);
    let unit = env.pool_size("tank");
    env.sparse("e", 128 * MIB);
    env.sparse("f", 128 * MIB);
    env.sparse("g", 128 * MIB);

    assert_eq!(
        env.ok(&["pool", "add", "tank", "mirror", &env.p("e"), &env.p("f")]),
        ""
    );
    assert_eq!(env.pool_size("tank"), 2 * unit, "SIZE grows by one mirror");
    let st = env.ok(&["pool", "status", "tank"]);
    assert_eq!(
        tree(&st),
        t(&[
            (0, "tank"),
            (2, "mirror-0"),
            (4, "a"),
            (4, "b"),
            (2, "mirror-1"),
            (4, "e"),
            (4, "f")
        ]),
        "{st}"
    );

    // A single leaf in a mirrored pool: refused without -f, nothing changes.
    let e = env.fail(&["pool", "add", "tank", &env.p("g")]);
    assert_cannot(&e, "add", "tank", &["mismatched replication level", "-f"]);
    assert_eq!(env.pool_size("tank"), 2 * unit);
    assert!(!env.ok(&["pool", "status", "tank"]).contains("\tg"));
    assert!(
        all_zero(&env.path("g")),
        "the refused leaf carries no label"
    );

    // A one-child mirror is refused too.
    let e = env.fail(&["pool", "add", "tank", "mirror", &env.p("g")]);
    assert_cannot(&e, "add", "tank", &["at least 2"]);
    // A leaf already in the pool.
    let e = env.fail(&["pool", "add", "tank", "mirror", &env.p("g"), &env.p("a")]);
    assert_cannot(&e, "add", "tank", &["a"]);
    assert!(all_zero(&env.path("g")));
    // A pool that does not exist.
    let e = env.fail(&["pool", "add", "nope", "mirror", &env.p("g"), &env.p("e")]);
    assert_cannot(&e, "add", "nope", &["no such pool"]);

    // With -f.
    env.ok(&["pool", "add", "-f", "tank", &env.p("g")]);
    assert_eq!(env.pool_size("tank"), 3 * unit);
    let st = env.ok(&["pool", "status", "tank"]);
    assert_eq!(tree(&st).last(), Some(&(2, "g".to_string())), "{st}");
    assert!(!all_zero(&env.path("g")));

    // It all survives export/import.
    env.ok(&["pool", "export", "tank"]);
    env.ok(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_eq!(env.pool_size("tank"), 3 * unit);
    assert_eq!(env.pool_health("tank"), "ONLINE");
    let h = env.ok(&["pool", "history", "tank"]);
    assert_eq!(
        h.lines().filter(|l| l.contains(" pool add ")).count(),
        2,
        "only the successful adds are in the history:\n{h}"
    );
}

#[test]
fn add_missing_leaf_is_refused() {
    let env = Env::new();
    create(&env, "128M", "tank", &["mirror", "a", "b"]);
    let unit = env.pool_size("tank");
    env.sparse("e", 128 * MIB);
    let e = env.fail(&[
        "pool",
        "add",
        "tank",
        "mirror",
        &env.p("e"),
        &env.p("nofile"),
    ]);
    assert_cannot(&e, "add", "tank", &["nofile"]);
    assert!(!env.path("nofile").exists());
    assert!(all_zero(&env.path("e")));
    assert_eq!(env.pool_size("tank"), unit);
}

#[test]
fn add_missing_leaf_does_not_suggest_size() {
    let env = Env::new();
    create(&env, "128M", "tank", &["mirror", "a", "b"]);
    env.sparse("e", 128 * MIB);
    let e = env.fail(&[
        "pool",
        "add",
        "tank",
        "mirror",
        &env.p("e"),
        &env.p("nofile"),
    ]);
    assert_cannot(&e, "add", "tank", &["nofile"]);
    assert!(
        !e.contains("--size"),
        "`pool add` has no --size option, the hint is wrong: {e}"
    );
}

// ---------------------------------------------------------------------------------------------------
// get, set
// ---------------------------------------------------------------------------------------------------

#[test]
fn get_and_set_properties() {
    let env = Env::new();
    create(&env, "128M", "tank", &["a"]);
    let size = env.pool_size("tank");

    let all = env.ok(&["pool", "get", "all", "tank"]);
    let lines: Vec<Vec<&str>> = all
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["NAME", "PROPERTY", "VALUE", "SOURCE"], "{all}");
    let prop = |name: &str| {
        lines
            .iter()
            .find(|l| l.len() >= 2 && l[1] == name)
            .unwrap_or_else(|| panic!("no {name} in get all:\n{all}"))
            .clone()
    };
    assert_eq!(prop("name")[2], "tank");
    assert_eq!(prop("health")[2], "ONLINE");
    assert_eq!(prop("comment")[2..], ["-", "default"]);
    assert_eq!(prop("scrub_schedule")[2..], ["off", "default"]);
    assert_eq!(prop("scrub_rate_limit")[2..], ["0", "default"]);
    let p = env.ok(&["pool", "get", "-H", "-p", "size", "tank"]);
    assert_eq!(p, format!("tank\tsize\t{size}\t-\n"));

    // comment
    assert_eq!(env.ok(&["pool", "set", "comment=hello world", "tank"]), "");
    let g = env.ok(&["pool", "get", "comment", "tank"]);
    let gl: Vec<&str> = g.lines().collect();
    assert_eq!(gl.len(), 2, "{g}");
    assert_eq!(
        gl[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "PROPERTY", "VALUE", "SOURCE"]
    );
    assert!(gl[1].starts_with("tank  "), "{g}");
    assert!(gl[1].contains("hello world"), "{g}");
    assert!(gl[1].trim_end().ends_with("local"), "{g}");
    assert_eq!(
        env.ok(&["pool", "get", "-H", "comment", "tank"]),
        "tank\tcomment\thello world\tlocal\n"
    );

    // scrub_rate_limit: a size, stored as bytes.
    env.ok(&["pool", "set", "scrub_rate_limit=10M", "tank"]);
    assert_eq!(
        env.ok(&["pool", "get", "-H", "-p", "scrub_rate_limit", "tank"]),
        "tank\tscrub_rate_limit\t10485760\tlocal\n"
    );
    assert_eq!(
        env.ok(&["pool", "get", "-H", "scrub_rate_limit", "tank"]),
        "tank\tscrub_rate_limit\t10M\tlocal\n"
    );
    let j = env.json(&[
        "pool",
        "get",
        "-j",
        "-p",
        "scrub_rate_limit,comment",
        "tank",
    ]);
    assert!(j["output_version"].is_object(), "{j}");
    let jp = &j["pools"]["tank"]["properties"];
    assert_eq!(jp["scrub_rate_limit"]["value"], "10485760");
    assert_eq!(jp["comment"]["value"], "hello world");
    assert_eq!(jp["comment"]["source"]["type"], "LOCAL");

    // scrub_schedule: good values are kept, bad ones refused.
    env.ok(&["pool", "set", "scrub_schedule=weekly", "tank"]);
    let e = env.fail(&["pool", "set", "scrub_schedule=every-tuesday", "tank"]);
    assert_cannot(&e, "set", "tank", &["scrub_schedule", "every-tuesday"]);
    let e = env.fail(&["pool", "set", "scrub_schedule=0 3 * *", "tank"]);
    assert_cannot(&e, "set", "tank", &["scrub_schedule"]);
    assert_eq!(
        env.ok(&["pool", "get", "-H", "scrub_schedule", "tank"]),
        "tank\tscrub_schedule\tweekly\tlocal\n",
        "a refused value changes nothing"
    );
    env.ok(&["pool", "set", "scrub_schedule=7d", "tank"]);
    env.ok(&["pool", "set", "scrub_schedule=0 3 * * 0", "tank"]);
    assert_eq!(
        env.ok(&["pool", "get", "-H", "scrub_schedule", "tank"]),
        "tank\tscrub_schedule\t0 3 * * 0\tlocal\n"
    );

    // Unknown and readonly properties, bad sizes, no '='.
    let e = env.fail(&["pool", "set", "frobnicate=1", "tank"]);
    assert_cannot(&e, "set", "tank", &["frobnicate"]);
    let e = env.fail(&["pool", "set", "size=1G", "tank"]);
    assert_cannot(&e, "set", "tank", &["size", "readonly"]);
    let e = env.fail(&["pool", "set", "health=FAULTED", "tank"]);
    assert_cannot(&e, "set", "tank", &["readonly"]);
    let e = env.fail(&["pool", "set", "scrub_rate_limit=fast", "tank"]);
    assert_cannot(&e, "set", "tank", &["fast"]);
    let e = env.fail(&["pool", "set", "comment", "tank"]);
    assert_cannot(&e, "set", "tank", &[]);
    let e = env.fail(&["pool", "set", "comment=x", "nope"]);
    assert_cannot(&e, "set", "nope", &["no such pool"]);
    let e = env.fail(&["pool", "get", "frobnicate", "tank"]);
    assert_cannot(&e, "get", "tank", &["frobnicate"]);
    assert_eq!(env.pool_size("tank"), size);
    assert_eq!(
        env.ok(&["pool", "get", "-H", "-p", "scrub_rate_limit", "tank"]),
        "tank\tscrub_rate_limit\t10485760\tlocal\n"
    );

    // Properties survive export/import; history holds the successful sets only.
    env.ok(&["pool", "export", "tank"]);
    env.ok(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_eq!(
        env.ok(&["pool", "get", "-H", "comment", "tank"]),
        "tank\tcomment\thello world\tlocal\n"
    );
    let h = env.ok(&["pool", "history", "tank"]);
    assert_eq!(
        h.lines().filter(|l| l.contains(" pool set ")).count(),
        5,
        "{h}"
    );
    assert!(
        !h.contains("frobnicate") && !h.contains("every-tuesday"),
        "{h}"
    );

    // -o at create time.
    env.ok(&[
        "pool",
        "create",
        "--size",
        "64M",
        "-o",
        "comment=born",
        "-o",
        "scrub_rate_limit=1G",
        "other",
        &env.p("b"),
    ]);
    assert_eq!(
        env.ok(&[
            "pool",
            "get",
            "-H",
            "-p",
            "comment,scrub_rate_limit",
            "other"
        ]),
        "other\tcomment\tborn\tlocal\nother\tscrub_rate_limit\t1073741824\tlocal\n"
    );
}

// ---------------------------------------------------------------------------------------------------
// Bad input at create: refused, with nothing changed
// ---------------------------------------------------------------------------------------------------

/// Nothing was created: no pools, and none of `files` exists.
fn assert_nothing_created(env: &Env, files: &[&str]) {
    assert!(env.pool_names().is_empty(), "no pool was created");
    for f in files {
        assert!(!env.path(f).exists(), "{f} must not have been created");
    }
}

#[test]
fn create_refuses_a_missing_leaf_without_size() {
    let env = Env::new();
    env.sparse("a", 128 * MIB);
    let e = try_create(&env, None, false, "tank", &["mirror", "a", "b"]);
    assert_cannot(&e, "create", "tank", &[&env.p("b")]);
    assert!(
        e.contains("no such file") || e.contains("No such file"),
        "{e}"
    );
    assert_nothing_created(&env, &["b"]);
    assert!(all_zero(&env.path("a")), "the other leaf was not labelled");
    // A missing directory, even with --size.
    let e = try_create(&env, Some("128M"), false, "tank", &["nodir/x"]);
    assert_cannot(&e, "create", "tank", &["nodir"]);
    assert_nothing_created(&env, &["nodir"]);
    // A directory is not a leaf.
    env.mkdir("adir");
    let e = try_create(&env, Some("128M"), false, "tank", &["mirror", "a", "adir"]);
    assert_cannot(&e, "create", "tank", &["adir"]);
    assert!(all_zero(&env.path("a")));
    assert_nothing_created(&env, &[]);
}

#[test]
fn create_with_a_size_too_large_for_a_file_leaves_nothing_behind() {
    let env = Env::new();
    // The file system refuses a file of 1E: the files the command created are removed.
    let e = try_create(&env, Some("1E"), false, "tank", &["mirror", "a", "b"]);
    assert_cannot(
        &e,
        "create",
        "tank",
        &[&env.p("a"), "1152921504606846976 bytes"],
    );
    assert_nothing_created(&env, &["a", "b"]);
    // 8E is no possible file size at all: said so, naming the size.
    let e = try_create(&env, Some("8E"), false, "tank", &["mirror", "a", "b"]);
    assert_cannot(&e, "create", "tank", &["'8E'", "largest possible file"]);
    assert!(!e.contains("integral type"), "{e}");
    assert_nothing_created(&env, &["a", "b"]);
    // A retry with a sensible size works.
    create(&env, "128M", "tank", &["mirror", "a", "b"]);
    assert_eq!(env.pool_health("tank"), "ONLINE");
}

#[test]
fn create_refuses_leaves_smaller_than_64m() {
    let env = Env::new();
    env.sparse("small", 32 * MIB);
    let e = try_create(
        &env,
        Some("128M"),
        false,
        "tank",
        &["mirror", "new", "small"],
    );
    assert_cannot(&e, "create", "tank", &["small", "64M"]);
    assert_nothing_created(&env, &["new"]);
    assert_eq!(
        std::fs::metadata(env.path("small")).unwrap().len(),
        32 * MIB
    );
    assert!(all_zero(&env.path("small")));

    // One byte short of 64 MiB.
    env.sparse("short", 64 * MIB - 1);
    let e = try_create(&env, None, false, "tank", &["short"]);
    assert_cannot(&e, "create", "tank", &["short", "64M"]);
    assert!(all_zero(&env.path("short")));

    // --size below the minimum creates nothing.
    let e = try_create(&env, Some("63M"), false, "tank", &["n1"]);
    assert_cannot(&e, "create", "tank", &["64M"]);
    assert_nothing_created(&env, &["n1"]);
    let e = try_create(&env, Some("lots"), false, "tank", &["n1"]);
    assert_cannot(&e, "create", "tank", &["lots"]);
    assert_nothing_created(&env, &["n1"]);

    // Exactly 64 MiB is enough.
    create(&env, "64M", "tank", &["n1"]);
    assert_eq!(env.pool_names(), ["tank"]);
}

#[test]
fn create_refuses_the_same_leaf_twice() {
    let env = Env::new();
    // Twice the same path, with --size: the file is not even created.
    let e = try_create(&env, Some("128M"), false, "tank", &["mirror", "a", "a"]);
    assert_cannot(&e, "create", "tank", &["more than once"]);
    assert_nothing_created(&env, &["a"]);

    env.sparse("a", 128 * MIB);
    env.mkdir("sub");
    let abs = env.p("a");
    let spellings: [&[&str]; 5] = [
        &["mirror", "a", &abs],
        &["mirror", "./a", "sub/../a"],
        &["a", "mirror", "b", "./a"],
        &["stripe", &abs, "x", "stripe", "y", "a"],
        &["mirror", "a", "b", "mirror", "c", "a"],
    ];
    for spec in spellings {
        let mut args = vec!["pool", "create", "--size", "128M", "tank"];
        args.extend_from_slice(spec);
        let e = env.fail(&args);
        assert_cannot(&e, "create", "tank", &["more than once"]);
        assert_nothing_created(&env, &["b", "c", "x", "y"]);
        assert!(all_zero(&env.path("a")), "{spec:?} labelled a");
    }

    // Through a symbolic link.
    std::os::unix::fs::symlink("a", env.path("link")).unwrap();
    let e = env.fail(&["pool", "create", "tank", "mirror", "a", "link"]);
    assert_cannot(&e, "create", "tank", &["more than once"]);
    assert_nothing_created(&env, &[]);
    assert!(all_zero(&env.path("a")));
}

#[test]
fn create_refuses_the_same_leaf_twice_through_a_hard_link() {
    let env = Env::new();
    env.sparse("a", 128 * MIB);
    std::fs::hard_link(env.path("a"), env.path("hard")).unwrap();
    let e = env.fail(&["pool", "create", "tank", "mirror", "a", "hard"]);
    assert_nothing_created(&env, &[]);
    assert!(all_zero(&env.path("a")));
    // The devid (file system + inode) is the same: it is one leaf given twice.
    assert_cannot(&e, "create", "tank", &["more than once"]);
}

#[test]
fn create_refuses_a_mirror_with_one_child() {
    let env = Env::new();
    for spec in [
        &["mirror", "a"][..],
        &["mirror", "a", "b", "mirror", "c"],
        &["mirror", "a", "mirror", "b", "c"],
    ] {
        let e = try_create(&env, Some("128M"), false, "tank", spec);
        assert_cannot(&e, "create", "tank", &["mirror", "at least 2"]);
        assert_nothing_created(&env, &["a", "b", "c"]);
    }
    let e = env.fail(&["pool", "create", "--size", "128M", "tank", "stripe"]);
    assert_cannot(&e, "create", "tank", &["stripe"]);
    let e = env.fail(&[
        "pool", "create", "--size", "128M", "tank", "raidz", "a", "b",
    ]);
    assert_cannot(&e, "create", "tank", &["raidz"]);
    assert_nothing_created(&env, &["a", "b", "raidz"]);
}

#[test]
fn create_refuses_bad_pool_names() {
    let env = Env::new();
    let cases: &[(&str, &str)] = &[
        ("1abc", "begin with a letter"),
        ("mirror", "reserved"),
        ("stripe", "reserved"),
        ("c0d0", "reserved"),
        ("a/b", "'/'"),
        ("", "begin with a letter"),
        ("ta@nk", "'@'"),
    ];
    for &(name, why) in cases {
        let e = env.fail(&["pool", "create", "--size", "128M", name, &env.p("leaf")]);
        assert_cannot(&e, "create", name, &["invalid pool name", why]);
        assert_nothing_created(&env, &["leaf"]);
    }
    let long = "a".repeat(256);
    let e = env.fail(&["pool", "create", "--size", "128M", &long, &env.p("leaf")]);
    assert_cannot(&e, "create", &long, &["too long"]);
    assert_nothing_created(&env, &["leaf"]);
    // Names close to the reserved ones are fine.
    env.ok(&["pool", "create", "--size", "64M", "Mirror", &env.p("leaf")]);
    assert_eq!(env.pool_names(), ["Mirror"]);
}

#[test]
fn create_refuses_a_name_already_imported() {
    let env = Env::new();
    create(&env, "128M", "tank", &["mirror", "a", "b"]);
    let e = try_create(&env, Some("128M"), false, "tank", &["mirror", "c", "d"]);
    assert_cannot(&e, "create", "tank", &["already"]);
    assert!(!env.path("c").exists() && !env.path("d").exists());
    assert_eq!(env.pool_names(), ["tank"]);
    let j = env.status_json("tank");
    assert_eq!(
        json_leaves(&j)
            .iter()
            .map(|l| l.0.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"],
        "the imported pool is untouched"
    );
}

#[test]
fn create_refuses_a_leaf_of_an_exported_pool_without_f() {
    let env = Env::new();
    create(&env, "128M", "old", &["mirror", "a", "b"]);
    env.ok(&["pool", "export", "old"]);
    let before = label_area(&env.path("a"));

    let e = try_create(&env, Some("128M"), false, "new", &["mirror", "a", "c"]);
    assert_cannot(
        &e,
        "create",
        "new",
        &[&env.p("a"), "exported pool 'old'", "-f"],
    );
    assert_nothing_created(&env, &["c"]);
    assert_eq!(
        label_area(&env.path("a")),
        before,
        "the refused leaf is untouched"
    );
    assert_eq!(env.importable_names(&[env.dir()]), ["old"]);

    // -f with another bad leaf: still refused, and the old pool's leaf is untouched.
    env.sparse("small", 32 * MIB);
    let e = try_create(&env, Some("128M"), true, "new", &["mirror", "a", "small"]);
    assert_cannot(&e, "create", "new", &["small"]);
    assert_eq!(label_area(&env.path("a")), before);
    assert_eq!(env.importable_names(&[env.dir()]), ["old"]);

    // -f: allowed, since the old pool is not open.
    env.ok(&s(&create_args(
        &env,
        Some("128M"),
        true,
        "new",
        &["mirror", "a", "c"],
    )));
    assert_eq!(env.pool_names(), ["new"]);
    assert_eq!(env.pool_health("new"), "ONLINE");
    let listing = env.importable(&[env.dir()]);
    let st = env.ok(&["pool", "status", "new"]);
    assert_eq!(
        tree(&st),
        t(&[(0, "new"), (2, "mirror-0"), (4, "a"), (4, "c")]),
        "{st}"
    );
    // The old pool lost a; it may still be offered (on b alone), never with a in it.
    if listing.contains("pool: old") {
        let rows = vdev_rows(&listing);
        assert!(
            !rows.iter().any(|r| r.1 == "a" && r.2 == "ONLINE"),
            "{listing}"
        );
    }
}

#[test]
fn create_refuses_a_leaf_of_an_imported_pool_without_f() {
    let env = Env::new();
    create(&env, "128M", "old", &["mirror", "a", "b"]);
    let before = label_area(&env.path("a"));

    let e = try_create(&env, Some("128M"), false, "new", &["mirror", "c", "a"]);
    assert_cannot(&e, "create", "new", &[&env.p("a"), "active pool 'old'"]);
    assert!(!env.path("c").exists(), "c must not have been created");
    assert_eq!(label_area(&env.path("a")), before);
    assert_eq!(env.pool_names(), ["old"], "the other pool is untouched");
    assert_eq!(env.pool_health("old"), "ONLINE");

    // The same leaf through a relative spelling.
    let e = env.fail(&["pool", "create", "new", "./a"]);
    assert_cannot(&e, "create", "new", &["pool 'old'"]);
    assert_eq!(label_area(&env.path("a")), before);

    // -f does not override a pool that is imported (active), even with no daemon holding it open.
    env.sparse("c", 128 * MIB);
    let e = try_create(&env, None, true, "new", &["mirror", "c", "a"]);
    assert_cannot(
        &e,
        "create",
        "new",
        &[&env.p("a"), "part of active pool 'old'"],
    );
    assert_eq!(label_area(&env.path("a")), before);
    assert_eq!(env.pool_names(), ["old"]);
    assert_eq!(env.pool_health("old"), "ONLINE");
}

#[test]
fn f_never_takes_a_leaf_of_an_active_pool() {
    let env = Env::new();
    create(&env, "128M", "p1", &["mirror", "a", "b"]);
    create(&env, "128M", "p2", &["c"]);
    let before = label_area(&env.path("a"));
    let (a, c) = (env.p("a"), env.p("c"));

    // create -f, add -f, attach -f, replace -f: all refused, nothing changed.
    let e = try_create(&env, None, true, "p3", &["a"]);
    assert_cannot(&e, "create", "p3", &[&a, "part of active pool 'p1'"]);
    assert!(!env.pool_names().contains(&"p3".to_string()));
    let e = env.fail(&["pool", "add", "-f", "p2", &a]);
    assert_cannot(&e, "add", "p2", &[&a, "part of active pool 'p1'"]);
    let e = env.fail(&["pool", "attach", "-f", "p2", &c, &a]);
    assert_cannot(&e, "attach", &a, &["part of active pool 'p1'"]);
    env.sparse("d", 128 * MIB);
    env.ok(&["pool", "attach", "p2", &c, &env.p("d")]);
    let e = env.fail(&["pool", "replace", "-f", "p2", &env.p("d"), &a]);
    assert_cannot(&e, "replace", &env.p("d"), &["part of active pool 'p1'"]);
    assert_eq!(label_area(&env.path("a")), before);
    assert_eq!(env.pool_health("p1"), "ONLINE");
    let st = env.ok(&["pool", "status", "p2"]);
    assert!(!st.contains("\ta ") && !st.contains(" a "), "{st}");

    // Once p1 is exported, -f may take its leaf (as zpool allows).
    env.ok(&["pool", "export", "p1"]);
    env.ok(&["pool", "create", "-f", "p3", &a]);
    assert_eq!(env.pool_health("p3"), "ONLINE");
}

// ---------------------------------------------------------------------------------------------------
// Import of damaged or incomplete pools
// ---------------------------------------------------------------------------------------------------

#[test]
fn import_with_one_leaf_of_a_mirror_missing_is_degraded() {
    let env = Env::new();
    create(
        &env,
        "128M",
        "tank",
        &["mirror", "a", "b", "mirror", "c", "d"],
    );
    env.ok(&["pool", "export", "tank"]);
    let away = env.mkdir("away");
    std::fs::rename(env.path("d"), away.join("d")).unwrap();

    let listing = env.importable(&[env.dir()]);
    assert!(
        listing.lines().any(|l| l == "  state: DEGRADED"),
        "{listing}"
    );
    let rows = vdev_rows(&listing);
    let state = |n: &str| {
        rows.iter()
            .find(|r| r.1 == n)
            .unwrap_or_else(|| panic!("{n} not in:\n{listing}"))
            .2
            .clone()
    };
    assert_eq!(state("d"), "UNAVAIL", "{listing}");
    assert_eq!(state("mirror-0"), "ONLINE", "{listing}");
    assert_eq!(state("mirror-1"), "DEGRADED", "{listing}");

    env.ok(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_eq!(env.pool_health("tank"), "DEGRADED");
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(st.lines().any(|l| l == " state: DEGRADED"), "{st}");
    assert!(st.lines().any(|l| l.starts_with("status: ")), "{st}");
    assert!(st.lines().any(|l| l.starts_with("action: ")), "{st}");
    let row = vdev_rows(&st)
        .into_iter()
        .find(|r| r.1 == "d")
        .expect("d listed");
    assert_eq!(row.2, "UNAVAIL", "{st}");
    let leaves = json_leaves(&env.status_json("tank"));
    let d = &leaves.iter().find(|l| l.0 == "d").unwrap().1;
    assert_eq!(d["state"], "UNAVAIL");
    assert_eq!(
        d["path"],
        env.p("d"),
        "the missing leaf keeps its last path"
    );
    for (n, l) in &leaves {
        if n != "d" {
            assert_eq!(l["state"], "ONLINE", "{n}");
        }
    }
}

#[test]
fn import_with_a_whole_top_level_vdev_missing_is_refused() {
    let env = Env::new();
    create(
        &env,
        "128M",
        "tank",
        &["mirror", "a", "b", "mirror", "c", "d"],
    );
    env.ok(&["pool", "export", "tank"]);
    let away = env.mkdir("away");
    for l in ["c", "d"] {
        std::fs::rename(env.path(l), away.join(l)).unwrap();
    }
    let before = label_area(&env.path("a"));

    let listing = env.importable(&[env.dir()]);
    assert_eq!(env.importable_names(&[env.dir()]), ["tank"], "{listing}");
    assert!(
        listing.lines().any(|l| l == "  state: UNAVAIL"),
        "{listing}"
    );
    assert!(listing.contains("cannot be imported"), "{listing}");

    let e = env.fail(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_cannot(
        &e,
        "import",
        "tank",
        &["mirror-1", &env.p("c"), &env.p("d")],
    );
    let e = env.fail(&["pool", "import", "-f", "-d", &env.p(""), "tank"]);
    assert_cannot(&e, "import", "tank", &["mirror-1"]);
    assert!(env.pool_names().is_empty());
    assert_eq!(
        label_area(&env.path("a")),
        before,
        "a refused import writes nothing"
    );

    // Bring them back: the pool imports.
    for l in ["c", "d"] {
        std::fs::rename(away.join(l), env.path(l)).unwrap();
    }
    env.ok(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_eq!(env.pool_health("tank"), "ONLINE");
}

#[test]
fn import_listing_of_an_unavailable_pool_is_aligned() {
    let env = Env::new();
    create(&env, "64M", "tank", &["a", "b"]);
    env.ok(&["pool", "export", "tank"]);
    std::fs::remove_file(env.path("b")).unwrap();
    let listing = env.importable(&[env.dir()]);
    assert!(
        listing.lines().any(|l| l == "  state: UNAVAIL"),
        "{listing}"
    );
    for key in ["pool:", "id:", "state:", "status:", "action:", "config:"] {
        let line = listing
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no {key} line:\n{listing}"));
        // zpool right-aligns the keys on the colon, in column 7.
        assert_eq!(line.find(':'), Some(7), "misaligned {key:?}:\n{listing}");
    }
}

#[test]
fn garbage_labels_make_the_pool_disappear_without_a_panic() {
    let env = Env::new();
    create(&env, "128M", "tank", &["mirror", "a", "b"]);
    env.ok(&["pool", "export", "tank"]);
    for (i, l) in ["a", "b"].iter().enumerate() {
        let p = env.path(l);
        let len = std::fs::metadata(&p).unwrap().len();
        scribble(&p, 0, MIB, None, 1 + i as u64);
        scribble(&p, len - MIB, MIB, None, 11 + i as u64);
    }
    assert_eq!(
        env.importable(&[env.dir()]).trim(),
        "no pools available to import"
    );
    let e = env.fail(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_cannot(&e, "import", "tank", &["no such pool"]);
    let e = env.fail(&["pool", "import", "-f", "-d", &env.p(""), "tank"]);
    assert_cannot(&e, "import", "tank", &["no such pool"]);
    assert!(env.pool_names().is_empty());
    // The leaves hold no pool any more: they can be used again without -f.
    env.ok(&[
        "pool",
        "create",
        "fresh",
        "mirror",
        &env.p("a"),
        &env.p("b"),
    ]);
}

#[test]
fn truncated_leaves_never_panic() {
    let env = Env::new();
    create(&env, "128M", "tank", &["mirror", "a", "b"]);
    env.ok(&["pool", "export", "tank"]);

    // One leaf truncated to 1 MiB: only its front labels are left, they point past its end.
    File::options()
        .write(true)
        .open(env.path("a"))
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let listing = env.importable(&[env.dir()]);
    assert!(
        listing.lines().any(|l| l == "  state: DEGRADED"),
        "{listing}"
    );
    let rows = vdev_rows(&listing);
    assert!(
        rows.iter().any(|r| r.1 == "a" && r.2 == "UNAVAIL"),
        "{listing}"
    );
    env.ok(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_eq!(env.pool_health("tank"), "DEGRADED");
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(
        vdev_rows(&st)
            .iter()
            .any(|r| r.1 == "a" && r.2 == "UNAVAIL"),
        "{st}"
    );
    env.ok(&["pool", "export", "tank"]);

    // Both truncated (one to 1 MiB, one to nothing): nothing to import.
    File::options()
        .write(true)
        .open(env.path("b"))
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let out = env.run(&["pool", "import", "-d", &env.p("")]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!out.stdout.contains("ONLINE"), "{}", out.stdout);
    let e = env.fail(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_cannot(&e, "import", "tank", &[]);
    File::options()
        .write(true)
        .open(env.path("b"))
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_eq!(
        env.importable(&[env.dir()]).trim(),
        "no pools available to import"
    );
    let e = env.fail(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_cannot(&e, "import", "tank", &["no such pool"]);
    assert!(env.pool_names().is_empty());
}

#[test]
fn garbage_files_in_the_import_directory_are_ignored() {
    let env = Env::new();
    let dir = env.mkdir("disks");
    create(&env, "128M", "tank", &["mirror", "disks/a", "disks/b"]);
    env.ok(&["pool", "export", "tank"]);

    std::fs::write(dir.join("empty"), b"").unwrap();
    std::fs::write(dir.join("one"), b"x").unwrap();
    std::fs::write(dir.join("text"), b"hello, this is not a leaf\n").unwrap();
    let r = env.sparse("disks/random1m", MIB);
    scribble(&r, 0, MIB, None, 7);
    // Looks like a leaf, with garbage where the labels would be.
    let r = env.sparse("disks/random70m", 70 * MIB);
    scribble(&r, 0, MIB, None, 8);
    scribble(&r, 69 * MIB, MIB, None, 9);
    // A label's worth of 0xff, and one of zeros.
    let r = env.sparse("disks/ones", 4 * LABEL);
    scribble(&r, 0, 4 * LABEL, Some(0xff), 0);
    env.sparse("disks/zeros", 64 * MIB);
    std::fs::create_dir(dir.join("subdir")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/leaf", dir.join("dangling")).unwrap();
    std::os::unix::fs::symlink(".", dir.join("loop")).unwrap();
    // A FIFO must not be opened (that would block): best effort, mkfifo may be absent.
    let _ = std::process::Command::new("mkfifo")
        .arg(dir.join("fifo"))
        .status();

    let listing = env.importable(&[&dir]);
    assert_eq!(env.importable_names(&[&dir]), ["tank"], "{listing}");
    assert_eq!(
        tree(&listing),
        t(&[(0, "tank"), (2, "mirror-0"), (4, "a"), (4, "b")]),
        "{listing}"
    );
    env.ok(&["pool", "import", "-d", dir.to_str().unwrap(), "tank"]);
    assert_eq!(env.pool_health("tank"), "ONLINE");
    assert_eq!(
        std::fs::read(dir.join("text")).unwrap(),
        b"hello, this is not a leaf\n"
    );
    assert!(
        all_zero(&dir.join("zeros")),
        "import touched only the pool's leaves"
    );
}

#[test]
fn three_of_four_labels_destroyed_still_imports() {
    let env = Env::new();
    create(
        &env,
        "100M",
        "tank",
        &["mirror", "a", "b", "mirror", "c", "d"],
    );
    env.ok(&["pool", "export", "tank"]);
    // Leaf a keeps only L3 (the brief's case); b keeps only L0, c only L1, d only L2.
    for (leaf, keep) in [("a", 3u64), ("b", 0), ("c", 1), ("d", 2)] {
        let p = env.path(leaf);
        let len = std::fs::metadata(&p).unwrap().len();
        let end = len / LABEL * LABEL;
        let offs = [0, LABEL, end - 2 * LABEL, end - LABEL];
        for (i, off) in offs.iter().enumerate() {
            if i as u64 != keep {
                scribble(&p, *off, LABEL, Some(0), 0);
            }
        }
    }
    let listing = env.importable(&[env.dir()]);
    assert_eq!(env.importable_names(&[env.dir()]), ["tank"], "{listing}");
    assert!(listing.lines().any(|l| l == "  state: ONLINE"), "{listing}");

    env.ok(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_eq!(env.pool_health("tank"), "ONLINE");
    let st = env.ok(&["pool", "status", "tank"]);
    for (_, n, state) in vdev_rows(&st) {
        assert_eq!(state, "ONLINE", "{n}:\n{st}");
    }
    env.ok(&["pool", "export", "tank"]);
    env.ok(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_eq!(env.pool_health("tank"), "ONLINE");
}

#[test]
fn import_errors() {
    let env = Env::new();
    create(&env, "64M", "tank", &["a"]);
    env.ok(&["pool", "export", "tank"]);
    let d = env.p("");
    let e = env.fail(&["pool", "import", "-d", &d, "nosuch"]);
    assert_cannot(&e, "import", "nosuch", &["no such pool"]);
    let e = env.fail(&["pool", "import", "-d", &d, "12345"]);
    assert_cannot(&e, "import", "12345", &["no such pool"]);
    for bad in ["1bad", "mirror", "a/b"] {
        let e = env.fail(&["pool", "import", "-d", &d, "tank", bad]);
        assert_cannot(&e, "import", "tank", &[bad]);
    }
    let missing = env.p("nonexistent");
    let e = env.fail(&["pool", "import", "-d", &missing]);
    assert_cannot(&e, "import", &missing, &[]);
    assert!(env.pool_names().is_empty());
    let e = env.fail(&["pool", "export", "tank"]);
    assert_cannot(&e, "export", "tank", &["no such pool"]);
    // Still importable after all that.
    assert_eq!(env.importable_names(&[env.dir()]), ["tank"]);
    env.ok(&["pool", "import", "-d", &d, "tank"]);
}

/// One property of a dataset, exact (`dataset get -H -p -o value`).
fn ds_value(env: &Env, ds: &str, prop: &str) -> String {
    env.ok(&["dataset", "get", "-H", "-p", "-o", "value", prop, ds])
        .trim()
        .to_string()
}

#[test]
fn reservations_larger_than_the_pool_are_refused() {
    let env = Env::new();
    create(&env, "128M", "tank", &["mirror", "a", "b"]);
    // A thick volume larger than the pool: refused, nothing created.
    let e = env.fail(&["dataset", "create", "-V", "100G", "tank/big"]);
    assert_cannot(&e, "create", "tank/big", &["out of space"]);
    assert!(!env.ok(&["dataset", "list", "-H"]).contains("tank/big"));

    env.ok(&["dataset", "create", "-V", "16M", "tank/vol"]);
    env.ok(&["dataset", "create", "-s", "-V", "100G", "tank/thin"]);
    let res = ds_value(&env, "tank/vol", "refreservation");
    for (ds, assignment) in [
        ("tank/vol", "refreservation=100G"),
        ("tank/thin", "refreservation=100G"),
        ("tank/vol", "volsize=100G"),
        ("tank/vol", "volsize=1G"),
    ] {
        let e = env.fail(&["dataset", "set", assignment, ds]);
        assert_cannot(
            &e,
            "set property for",
            ds,
            &["size is greater than available space"],
        );
    }
    assert_eq!(ds_value(&env, "tank/vol", "refreservation"), res);
    assert_eq!(
        ds_value(&env, "tank/vol", "volsize"),
        (16 * MIB).to_string()
    );
    assert_eq!(ds_value(&env, "tank/thin", "refreservation"), "none");
    // What fits is accepted; lowering always is.
    env.ok(&["dataset", "set", "refreservation=32M", "tank/thin"]);
    assert_eq!(
        ds_value(&env, "tank/thin", "refreservation"),
        (32 * MIB).to_string()
    );
    env.ok(&["dataset", "set", "refreservation=none", "tank/thin"]);
    env.ok(&["dataset", "set", "volsize=32M", "tank/vol"]);
    // `auto` reserves what a non-sparse volume of that size reserves, as zfs: refused where that
    // does not fit (a 100G volume), granted at creation and by `set` where it does.
    let e = env.fail(&["dataset", "set", "refreservation=auto", "tank/thin"]);
    assert_cannot(
        &e,
        "set property for",
        "tank/thin",
        &["size is greater than available space"],
    );
    env.ok(&[
        "dataset",
        "create",
        "-s",
        "-V",
        "8M",
        "-o",
        "refreservation=auto",
        "tank/auto",
    ]);
    let r: u64 = ds_value(&env, "tank/auto", "refreservation")
        .parse()
        .unwrap();
    assert!(
        (8 * MIB..9 * MIB).contains(&r),
        "auto at creation reserved {r}"
    );
    env.ok(&["dataset", "create", "-s", "-V", "4M", "tank/small"]);
    assert_eq!(ds_value(&env, "tank/small", "refreservation"), "none");
    env.ok(&["dataset", "set", "refreservation=auto", "tank/small"]);
    let r: u64 = ds_value(&env, "tank/small", "refreservation")
        .parse()
        .unwrap();
    assert!((4 * MIB..5 * MIB).contains(&r), "auto by set reserved {r}");
    let e = env.fail(&["dataset", "set", "refreservation=lots", "tank/thin"]);
    assert!(e.contains("lots"), "{e}");
}

#[test]
fn a_pool_whose_leaves_were_deleted_is_unavail_and_can_be_forgotten() {
    let env = Env::new();
    create(&env, "128M", "tank", &["mirror", "a", "b"]);
    create(&env, "128M", "p2", &["c"]);
    env.ok(&["dataset", "create", "-V", "16M", "p2/vol"]);
    env.ok(&["dataset", "create", "-V", "16M", "tank/vol"]);
    std::fs::remove_file(env.path("a")).unwrap();
    std::fs::remove_file(env.path("b")).unwrap();

    // Listed as UNAVAIL with exit 0, the healthy pool beside it.
    assert_eq!(
        env.ok(&["pool", "list", "-H", "-o", "name,size,health"]),
        "p2\t124M\tONLINE\ntank\t-\tUNAVAIL\n"
    );
    assert_eq!(env.pool_health("tank"), "UNAVAIL");
    // dataset list prints what it can read and says (exit 1) what it could not.
    let o = env.run(&["dataset", "list", "-H", "-o", "name"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert_eq!(o.stdout, "p2/vol\n");
    assert!(o.stderr.contains("cannot list 'tank'"), "{}", o.stderr);

    // destroy without -f cannot mark the labels destroyed: refused, with the way out.
    let e = env.fail(&["pool", "destroy", "tank"]);
    assert_cannot(&e, "destroy", "tank", &["unavailable", "-f"]);
    assert_eq!(env.pool_names(), ["p2", "tank"]);
    // export forgets it.
    env.ok(&["pool", "export", "tank"]);
    assert_eq!(env.pool_names(), ["p2"]);
    assert_eq!(env.ok(&["dataset", "list", "-H", "-o", "name"]), "p2/vol\n");

    // The same with a daemon holding the pool open when its leaves go; destroy -f forgets it.
    let _d = env.serve();
    std::fs::remove_file(env.path("c")).unwrap();
    assert_eq!(
        env.ok(&["pool", "list", "-H", "-o", "name,health"]),
        "p2\tUNAVAIL\n"
    );
    let e = env.fail(&["pool", "destroy", "p2"]);
    assert_cannot(&e, "destroy", "p2", &["unavailable", "-f"]);
    env.ok(&["pool", "destroy", "-f", "p2"]);
    assert!(env.pool_names().is_empty());
    assert_eq!(env.ok(&["pool", "list"]).trim(), "no pools available");
}

#[test]
fn a_pool_name_is_the_root_of_its_datasets() {
    let env = Env::new();
    create(&env, "128M", "tank", &["mirror", "a", "b"]);
    create(&env, "128M", "other", &["c"]);
    for v in ["tank/v1", "tank/v2", "other/keep"] {
        env.ok(&["dataset", "create", "-s", "-V", "16M", v]);
    }
    // list POOL and list -r POOL show the pool's volumes.
    for args in [
        &["dataset", "list", "-H", "-o", "name", "tank"][..],
        &["dataset", "list", "-r", "-H", "-o", "name", "tank"],
    ] {
        assert_eq!(env.ok(args), "tank/v1\ntank/v2\n", "{args:?}");
    }
    assert_eq!(
        env.ok(&["dataset", "list", "-H", "-o", "name", "other", "tank/v2"]),
        "other/keep\ntank/v2\n"
    );
    let o = env.run(&["dataset", "list", "nopool"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert_cannot(&o.stderr, "list", "nopool", &["no such pool"]);
    // A dataset of a pool that does not exist: named, with the pool, as zfs.
    let e = env.fail(&["dataset", "create", "-V", "16M", "nopool/v1"]);
    assert_cannot(&e, "create", "nopool/v1", &["no such pool 'nopool'"]);
    let e = env.fail(&["dataset", "set", "readonly=on", "nopool/v1"]);
    assert_cannot(
        &e,
        "set property for",
        "nopool/v1",
        &["no such pool 'nopool'"],
    );
    // `set` without '=' is a usage error (exit 2), and changes nothing.
    let o = env.run(&["dataset", "set", "volsize", "tank/v1"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("missing '='"), "{}", o.stderr);

    // destroy POOL without -r: the pool's root cannot go; nothing changes.
    let e = env.fail(&["dataset", "destroy", "tank"]);
    assert_cannot(&e, "destroy", "tank", &["destroy -r", "pool destroy"]);
    assert_eq!(
        env.ok(&["dataset", "list", "-H", "-o", "name", "tank"]),
        "tank/v1\ntank/v2\n"
    );
    // destroy -r POOL destroys its volumes and leaves the pool and the other pools alone.
    env.ok(&["dataset", "destroy", "-r", "tank"]);
    assert_eq!(env.ok(&["dataset", "list", "-H", "-o", "name", "tank"]), "");
    assert_eq!(
        env.ok(&["dataset", "list", "-H", "-o", "name"]),
        "other/keep\n"
    );
    assert_eq!(env.pool_names(), ["other", "tank"]);
    env.ok(&["dataset", "destroy", "-r", "tank"]);
}

/// Zeroes the four labels of a leaf (what `labelclear` would do).
fn zero_labels(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len() / LABEL * LABEL;
    for off in [0, LABEL, len - 2 * LABEL, len - LABEL] {
        scribble(path, off, LABEL, Some(0), 0);
    }
}

#[test]
fn a_leaf_without_labels_is_corrupted_data_not_cannot_open() {
    let env = Env::new();
    create(&env, "128M", "tank", &["mirror", "a", "b", "c"]);
    zero_labels(&env.path("b"));
    std::fs::remove_file(env.path("c")).unwrap();
    let reason = |text: &str, leaf: &str| -> String {
        let l = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(leaf))
            .unwrap_or_else(|| panic!("no row {leaf}:\n{text}"));
        l.to_string()
    };
    let st = env.ok(&["pool", "status", "tank"]);
    let b = reason(&st, "b");
    assert!(
        b.contains("UNAVAIL") && b.contains("corrupted data"),
        "{st}"
    );
    assert!(b.contains("missing or invalid label"), "{st}");
    assert!(!b.contains("cannot open"), "{st}");
    let c = reason(&st, "c");
    assert!(c.contains("UNAVAIL") && c.contains("cannot open"), "{st}");
    assert!(st.contains("label is missing or invalid"), "{st}");

    // The import listing tells the two apart the same way.
    env.ok(&["pool", "export", "tank"]);
    let listing = env.importable(&[env.dir()]);
    assert!(
        reason(&listing, "b").contains("missing or invalid label"),
        "{listing}"
    );
    assert!(reason(&listing, "c").contains("cannot open"), "{listing}");
}

#[test]
fn usage_errors_exit_2() {
    let env = Env::new();
    for args in [
        &["pool", "create"][..],
        &["pool", "create", "tank"],
        &["pool", "frobnicate"],
        &["pool", "list", "--bogus"],
        &["pool", "add", "tank"],
    ] {
        let o = env.run(args);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(!o.stderr.is_empty());
    }
    assert!(env.pool_names().is_empty());
}

#[test]
fn bad_columns_and_intervals_are_usage_errors() {
    let env = Env::new();
    create(&env, "128M", "tank", &["c"]);
    for (args, needle) in [
        (
            &["pool", "list", "-o", "name,bogus"][..],
            "invalid property 'bogus'",
        ),
        (
            &["pool", "list", "-o", "name,", "tank"],
            "empty property name in -o 'name,'",
        ),
        (
            &["dataset", "list", "-o", ",name"],
            "empty property name in -o ',name'",
        ),
        (
            &["dataset", "list", "-o", "bogus"],
            "invalid property 'bogus'",
        ),
        (&["dataset", "list", "-t", "bogus"], "invalid type 'bogus'"),
        (
            &["pool", "get", "-o", "bogus", "size", "tank"],
            "invalid field 'bogus'",
        ),
        (
            &["pool", "iostat", "tank", "0", "1"],
            "interval must be a positive number",
        ),
        (
            &["pool", "iostat", "0"],
            "interval must be a positive number",
        ),
        (&["pool", "iostat", "tank", "1.5"], "invalid interval '1.5'"),
        (
            &["pool", "iostat", "tank", "1", "0"],
            "count must be a positive number",
        ),
        (&["pool", "iostat", "tank", "1", "x"], "invalid count 'x'"),
        (&["pool", "iostat", "tank", "1", "2", "3"], "too many"),
    ] {
        let o = env.run(args);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains(needle), "{args:?}: {}", o.stderr);
        assert!(!o.stderr.contains("cannot"), "{args:?}: {}", o.stderr);
        assert!(o.stdout.is_empty(), "{args:?}: {}", o.stdout);
    }
    env.ok(&["pool", "iostat", "tank", "1", "1"]);
}

// ---------------------------------------------------------------------------------------------------
// Pools held open by another process, pools of another system
// ---------------------------------------------------------------------------------------------------

/// Holds an exclusive flock on a leaf, as a process that has the pool open does.
fn hold_open(path: &Path) -> File {
    let f = File::open(path).expect("open leaf");
    f.try_lock().expect("lock the leaf");
    f
}

#[test]
fn a_pool_held_open_is_refused_even_with_f() {
    let env = Env::new();
    create(&env, "128M", "tank", &["mirror", "a", "b"]);
    env.ok(&["pool", "export", "tank"]);
    let before = label_area(&env.path("a"));
    let d = env.p("");

    let lock = hold_open(&env.path("a"));
    let e = try_create(&env, Some("128M"), true, "new", &["mirror", "a", "c"]);
    assert_cannot(&e, "create", "new", &["in use"]);
    let e = try_create(&env, Some("128M"), true, "new", &["mirror", "c", "a"]);
    assert_cannot(&e, "create", "new", &["in use"]);
    assert_nothing_created(&env, &["c"]);
    let e = env.fail(&["pool", "import", "-d", &d, "tank"]);
    assert_cannot(&e, "import", "tank", &["in use"]);
    let e = env.fail(&["pool", "import", "-f", "-d", &d, "tank"]);
    assert_cannot(&e, "import", "tank", &["in use"]);
    assert!(env.pool_names().is_empty());
    assert_eq!(label_area(&env.path("a")), before);
    drop(lock);

    // Released: import works, and an imported pool held open refuses export and create -f.
    env.ok(&["pool", "import", "-d", &d, "tank"]);
    let lock = hold_open(&env.path("b"));
    let e = try_create(&env, Some("128M"), true, "new", &["mirror", "b", "c"]);
    assert_cannot(&e, "create", "new", &["part of active pool 'tank'"]);
    assert!(!env.path("c").exists());
    let e = env.fail(&["pool", "export", "tank"]);
    assert_cannot(&e, "export", "tank", &["in use"]);
    let e = env.fail(&["pool", "destroy", "tank"]);
    assert_cannot(&e, "destroy", "tank", &["in use"]);
    drop(lock);
    assert_eq!(env.pool_names(), ["tank"]);
    assert_eq!(env.pool_health("tank"), "ONLINE");
    env.ok(&["pool", "export", "tank"]);
}

#[test]
fn a_pool_imported_by_another_system_needs_f() {
    let env = Env::new();
    create(&env, "128M", "tank", &["mirror", "a", "b"]);
    let other = env.mkdir("state2");
    let d = env.p("");
    let run2 = |args: &[&str]| env.run_with_state(&other, args);

    // The second system sees the pool, marked as in use elsewhere.
    let o = run2(&["pool", "import", "-d", &d]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("pool: tank"), "{}", o.stdout);
    assert!(o.stdout.contains("another system"), "{}", o.stdout);
    assert!(o.stdout.contains("-f"), "{}", o.stdout);

    let o = run2(&["pool", "import", "-d", &d, "tank"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert_cannot(&o.stderr, "import", "tank", &["another system", "-f"]);
    let o = run2(&["pool", "list"]);
    assert_eq!(o.stdout.trim(), "no pools available");
    assert_eq!(
        env.pool_health("tank"),
        "ONLINE",
        "the first system still has it"
    );

    let o = run2(&["pool", "import", "-f", "-d", &d, "tank"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = run2(&["pool", "list", "-H", "-o", "name,health"]);
    assert_eq!(o.stdout, "tank\tONLINE\n");
    // The first system no longer owns it: it shows it UNAVAIL and says why instead of using it.
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(
        st.contains("state: UNAVAIL") && st.contains("not imported here"),
        "{st}"
    );
    assert_eq!(env.pool_health("tank"), "UNAVAIL");
    let h = run2(&["pool", "history", "tank"]);
    assert!(h.stdout.contains("pool import -f -d"), "{}", h.stdout);
    // It can forget it, and import it again once the second system has exported it.
    env.ok(&["pool", "export", "tank"]);
    assert!(env.pool_names().is_empty());
    let o = run2(&["pool", "export", "tank"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    env.ok(&["pool", "import", "-d", &d, "tank"]);
    assert_eq!(env.pool_health("tank"), "ONLINE");
}

/// A RAID1+0 pool one of whose mirrors lost both files, without a daemon: status places the leaves
/// in their mirrors from the labels still on them, the healthy ones ONLINE (they showed as
/// 'corrupted data' in a flat list), the missing ones UNAVAIL, 'cannot open'.
#[test]
fn status_of_a_pool_missing_a_whole_mirror_shows_its_vdev_tree() {
    let env = Env::new();
    create(
        &env,
        "128M",
        "tank",
        &["mirror", "a", "b", "mirror", "c", "d"],
    );
    for l in ["c", "d"] {
        std::fs::remove_file(env.path(l)).unwrap();
    }
    let st = env.ok(&["pool", "status", "tank"]);
    assert!(st.starts_with("  pool: tank\n state: UNAVAIL\n"), "{st}");
    assert_eq!(
        tree(&st),
        t(&[
            (0, "tank"),
            (2, "mirror-0"),
            (4, "a"),
            (4, "b"),
            (2, "mirror-1"),
            (4, "c"),
            (4, "d")
        ]),
        "{st}"
    );
    let rows = vdev_rows(&st);
    let state = |n: &str| {
        rows.iter()
            .find(|r| r.1 == n)
            .map(|r| r.2.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        (state("a"), state("b"), state("mirror-1"), state("c")),
        (
            "ONLINE".into(),
            "ONLINE".into(),
            "UNAVAIL".into(),
            "UNAVAIL".into()
        ),
        "{st}"
    );
    assert!(
        st.lines()
            .any(|l| l.trim_start().starts_with("c ") && l.ends_with("cannot open")),
        "{st}"
    );
}

/// A pool of two single leaves given to import with an older copy of one of them (the pool went
/// on after the copy was taken): refused, naming the copy (its allocation map is as old as its
/// data), and the copy is left as it was; with the current leaf it imports. (All devices of one
/// older copy of a whole pool are that pool as it was, and import it.)
#[test]
fn import_refuses_an_older_copy_of_a_single_leaf_next_to_current_ones() {
    let env = Env::new();
    let old = env.mkdir("old");
    let cur = env.mkdir("cur");
    create(&env, "64M", "tank", &["cur/x", "cur/y"]);
    env.ok(&["pool", "export", "tank"]);
    std::fs::copy(cur.join("x"), old.join("x")).unwrap();
    env.ok(&["pool", "import", "-d", cur.to_str().unwrap(), "tank"]);
    for v in ["a", "b", "c"] {
        env.ok(&["dataset", "create", "-s", "-V", "1M", &format!("tank/{v}")]);
    }
    env.ok(&["pool", "export", "tank"]);
    std::fs::rename(cur.join("x"), env.path("x-aside")).unwrap();
    let before = std::fs::read(old.join("x")).unwrap();
    let e = env.fail(&[
        "pool",
        "import",
        "-d",
        old.to_str().unwrap(),
        "-d",
        cur.to_str().unwrap(),
        "tank",
    ]);
    assert_cannot(
        &e,
        "import",
        "tank",
        &["older copies", &old.join("x").display().to_string()],
    );
    assert!(
        std::fs::read(old.join("x")).unwrap() == before,
        "the copy was written to"
    );
    std::fs::rename(env.path("x-aside"), cur.join("x")).unwrap();
    env.ok(&[
        "pool",
        "import",
        "-d",
        old.to_str().unwrap(),
        "-d",
        cur.to_str().unwrap(),
        "tank",
    ]);
    assert_eq!(
        env.ok(&["dataset", "list", "-H", "-o", "name"]),
        "tank/a\ntank/b\ntank/c\n"
    );
}

/// The same with a mirror: an older copy of one child, the other child missing, the other mirror
/// current. Refused, and the copy is not written to (the open read the newest objset from it first,
/// found it wrong, and "healed" it from the other mirror).
#[test]
fn import_refuses_a_mirror_of_one_older_copy_and_does_not_write_to_it() {
    let env = Env::new();
    let old = env.mkdir("old");
    let cur = env.mkdir("cur");
    create(
        &env,
        "256M",
        "tank",
        &["mirror", "cur/a", "cur/b", "mirror", "cur/c", "cur/d"],
    );
    env.ok(&["dataset", "create", "-V", "100M", "tank/vol"]);
    env.ok(&["pool", "export", "tank"]);
    std::fs::copy(cur.join("a"), old.join("a")).unwrap();
    env.ok(&["pool", "import", "-d", cur.to_str().unwrap(), "tank"]);
    let mut d = env.serve();
    env.qemu_io_ok(
        &[],
        &env.nbd_uri("tank/vol"),
        &["write -P 0x3c 0 32M", "flush"],
    );
    env.ok(&["pool", "export", "tank"]);
    d.stop();
    for l in ["a", "b"] {
        std::fs::rename(cur.join(l), env.path(&format!("{l}-aside"))).unwrap();
    }
    let before = std::fs::read(old.join("a")).unwrap();
    let dirs = ["-d", old.to_str().unwrap(), "-d", cur.to_str().unwrap()];
    let e = env.fail(&[&["pool", "import"][..], &dirs, &["tank"]].concat());
    assert_cannot(
        &e,
        "import",
        "tank",
        &["older copies", &old.join("a").display().to_string()],
    );
    assert!(
        std::fs::read(old.join("a")).unwrap() == before,
        "the refused copy was written to"
    );
}
