//! A copy of a leaf file next to the real one (issue 15, item 4): `cp --sparse=always l/d l/c` writes a
//! backup of leaf `d` over leaf `c`'s file. Two devices then carry one leaf GUID. Import must tell them
//! apart (the newest txg and the recorded device identity win), list the other as a duplicate, never
//! open it, and never record one path for two leaves.

use cairn_tests::{json_leaves, Env};
use std::process::Command;

fn cp_sparse(env: &Env, from: &str, to: &str) {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(env.path(from))
        .arg(env.path(to))
        .status()
        .expect("run cp");
    assert!(st.success(), "cp {from} {to} failed");
}

/// The leaf paths pools.json records for the only pool in it.
fn cached_leaves(env: &Env) -> Vec<String> {
    let s = std::fs::read_to_string(env.state_dir().join("pools.json")).expect("pools.json");
    let v: serde_json::Value = serde_json::from_str(&s).expect("pools.json is JSON");
    v["pools"][0]["leaves"]
        .as_array()
        .expect("leaves")
        .iter()
        .map(|l| l.as_str().expect("string").to_string())
        .collect()
}

/// (name, state, path) of every leaf of `status -j`.
fn leaf_states(env: &Env, pool: &str) -> Vec<(String, String, String)> {
    json_leaves(&env.status_json(pool))
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v["state"].as_str().unwrap_or_default().to_string(),
                v["path"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn copy_of_a_leaf_over_another_is_a_duplicate() {
    let env = Env::new();
    env.mkdir("l");
    env.ok(&[
        "pool", "create", "--size", "128M", "tank", "mirror", "l/c", "l/d",
    ]);
    env.ok(&["pool", "export", "tank"]);
    cp_sparse(&env, "l/d", "l/c");

    let listing = env.importable(&[&env.path("l")]);
    assert!(
        listing.contains("c: duplicate of leaf d (copy, not the recorded device), not used"),
        "the listing names the copy as a duplicate:\n{listing}"
    );
    // The row of leaf d shows d, ONLINE; leaf c is missing (its file holds d's copy).
    let rows: Vec<&str> = listing
        .lines()
        .filter(|l| l.trim_start().starts_with("c ") || l.trim_start().starts_with("d "))
        .collect();
    assert!(
        rows.iter()
            .any(|r| r.trim_start().starts_with("d ") && r.contains("ONLINE")),
        "leaf d is listed under its own name:\n{listing}"
    );
    assert!(
        rows.iter().any(|r| r.trim_start().starts_with("c ")
            && r.contains("UNAVAIL")
            && r.contains("copy of leaf d")),
        "leaf c is missing, its file holds a copy of d:\n{listing}"
    );

    env.ok(&["pool", "import", "-d", &env.p("l"), "tank"]);
    let cached = cached_leaves(&env);
    let mut uniq = cached.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(
        uniq.len(),
        cached.len(),
        "pools.json lists a path twice: {cached:?}"
    );
    assert!(cached.contains(&env.p("l/d")), "{cached:?}");

    // status opens it (no "in use by another process": nothing is opened twice).
    let leaves = leaf_states(&env, "tank");
    assert!(
        leaves
            .iter()
            .any(|(n, s, p)| n == "d" && s == "ONLINE" && *p == env.p("l/d")),
        "{leaves:?}"
    );
    assert!(
        leaves.iter().any(|(n, s, _)| n == "c" && s != "ONLINE"),
        "{leaves:?}"
    );
    assert_eq!(env.pool_health("tank"), "DEGRADED");

    // Export and import again: the same choice.
    env.ok(&["pool", "export", "tank"]);
    env.ok(&["pool", "import", "-d", &env.p("l"), "tank"]);
    let cached = cached_leaves(&env);
    assert_eq!(
        cached.iter().filter(|p| **p == env.p("l/c")).count(),
        1,
        "{cached:?}"
    );
    let leaves = leaf_states(&env, "tank");
    assert!(
        leaves
            .iter()
            .any(|(n, s, p)| n == "d" && s == "ONLINE" && *p == env.p("l/d")),
        "{leaves:?}"
    );
}

#[test]
fn older_backup_of_a_leaf_is_listed_and_not_used() {
    let env = Env::new();
    env.mkdir("l");
    env.ok(&[
        "pool", "create", "--size", "128M", "tank", "mirror", "l/c", "l/d",
    ]);
    env.ok(&["pool", "export", "tank"]);
    // A backup of d, then the pool moves on without it.
    cp_sparse(&env, "l/d", "l/backup");
    env.ok(&["pool", "import", "-d", &env.p("l"), "tank"]);
    env.ok(&["dataset", "create", "-V", "8M", "tank/vol"]);
    env.ok(&["pool", "export", "tank"]);

    let listing = env.importable(&[&env.path("l")]);
    assert!(
        listing.contains("backup: duplicate of leaf d (older copy), not used"),
        "{listing}"
    );
    assert!(listing.contains("state: ONLINE"), "{listing}");
    env.ok(&["pool", "import", "-d", &env.p("l"), "tank"]);
    let cached = cached_leaves(&env);
    assert!(!cached.contains(&env.p("l/backup")), "{cached:?}");
    assert_eq!(env.pool_health("tank"), "ONLINE");
    let leaves = leaf_states(&env, "tank");
    assert!(
        leaves
            .iter()
            .all(|(_, s, p)| s == "ONLINE" && *p != env.p("l/backup")),
        "{leaves:?}"
    );
}
