//! End-to-end tests of resilvering (SPEC section 6): replace, attach and detach, a leaf attached
//! again or brought back online after its file changed (its old contents are verified, not trusted),
//! and pausing or cancelling a resilver.
//!
//! The fixture is `cairn_tests::raid10`: the RAID1+0 pool `tank` of four sparse 256 MiB leaves with
//! the 128 MiB volume `tank/vol`, a daemon, and a model of the volume's contents. The clients come
//! from the Debian package qemu-utils (qemu-img).

use cairn_tests::raid10::*;
use cairn_tests::{random_bytes, Env, MIB};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------------
// 5. Replace
// ---------------------------------------------------------------------------------------------------

#[test]
fn replace_with_a_new_file_then_the_old_leaf_goes() {
    let (env, mut d, model) = setup_with_data(100 * MIB, 0x50);
    env.sparse("e", 256 * MIB);
    // Slow enough to see both leaves while it resilvers.
    env.ok(&["pool", "set", "scrub_rate_limit=64M", "tank"]);
    env.ok(&["pool", "replace", "tank", "b", &env.p("e")]);
    // Both are there while it resilvers (about 5 s at this rate).
    assert_eq!(children(&env, "mirror-0"), ["a", "b", "e"]);
    assert_eq!(scan_fs(&env), ("RESILVER".into(), "SCANNING".into()));
    wait_resilvered(&env, Duration::from_secs(25));
    wait_for(&env, "b is detached", Duration::from_secs(5), || {
        !leaf_names(&env).contains(&"b".to_string())
    });
    assert_eq!(children(&env, "mirror-0"), ["a", "e"]);
    assert_eq!(leaf(&env, "e")["state"], "ONLINE");
    assert_eq!(env.pool_health("tank"), "ONLINE");
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    assert_clean_scrub(&env);
    // e holds everything.
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    env.ok(&["pool", "online", "tank", "a"]);
    // The old leaf is free again: it can be attached (as a new leaf).
    d.assert_alive();
}

#[test]
fn a_replace_right_after_unflushed_writes_copies_them_too() {
    // The writes are acknowledged but not flushed: they sit in the open txg when the replace starts,
    // and were written to a and b only. The new leaf must get them before b leaves.
    let (env, mut d, mut model) = setup_with_data(8 * MIB, 0x53);
    env.sparse("e", 256 * MIB);
    let data = random_bytes(24 * MIB as usize, 0x54);
    let mut c = env.nbd_connect(VOL).expect("connect to tank/vol");
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        let o = 8 * MIB + i as u64 * MIB;
        c.write(o, chunk)
            .unwrap_or_else(|e| panic!("NBD write at {o}: {e}"));
    }
    model[8 * MIB as usize..32 * MIB as usize].copy_from_slice(&data);
    env.ok(&["pool", "replace", "tank", "b", &env.p("e")]);
    c.disconnect().expect("NBD disconnect");
    wait_resilvered(&env, Duration::from_secs(20));
    wait_for(&env, "b is detached", Duration::from_secs(5), || {
        children(&env, "mirror-0") == ["a", "e"]
    });
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    env.ok(&["pool", "online", "tank", "a"]);
    // a lacks the txgs it was offline for; once it has them, a scrub finds nothing wrong.
    wait_resilvered(&env, Duration::from_secs(20));
    assert_clean_scrub(&env);
    d.assert_alive();
}

#[test]
fn a_replacement_takes_the_place_of_the_leaf_it_replaces() {
    let (env, mut d, model) = setup_with_data(16 * MIB, 0x55);
    env.sparse("e", 256 * MIB);
    env.ok(&["pool", "replace", "tank", "a", &env.p("e")]);
    wait_resilvered(&env, Duration::from_secs(20));
    // In the order status shows them (the JSON's objects are keyed by name).
    let order = |env: &Env| -> Vec<String> {
        let st = status(env, false);
        st.lines()
            .skip_while(|l| l.split_whitespace().next() != Some("mirror-0"))
            .skip(1)
            .take_while(|l| l.starts_with("\t    "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    };
    wait_for(&env, "a is detached", Duration::from_secs(5), || {
        order(&env) == ["e", "b"]
    });
    env.ok(&["pool", "offline", "tank", "b"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

#[test]
fn replace_in_place_after_the_file_was_deleted() {
    let (env, mut d, model) = setup_with_data(100 * MIB, 0x51);
    std::fs::remove_file(env.path("b")).expect("rm b");
    env.sparse("b", 256 * MIB);
    env.ok(&["pool", "replace", "tank", "b"]);
    wait_resilvered(&env, Duration::from_secs(20));
    wait_for(
        &env,
        "the old b is detached",
        Duration::from_secs(5),
        || leaf_names(&env) == ["a", "b", "c", "d"],
    );
    assert_eq!(children(&env, "mirror-0"), ["a", "b"]);
    let b = leaf(&env, "b");
    assert_eq!(b["state"], "ONLINE", "{b:#}");
    assert_eq!(b["path"], env.p("b"), "{b:#}");
    assert_eq!(env.pool_health("tank"), "ONLINE");
    assert!(
        num(&scan(&env)["processed"]) >= 40 * MIB,
        "a new empty leaf gets everything"
    );
    assert_clean_scrub(&env);
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

#[test]
fn a_replace_whose_resilver_is_canceled_keeps_the_old_leaf_until_one_completes() {
    let (env, mut d, model) = setup_with_data(100 * MIB, 0x52);
    env.sparse("e", 256 * MIB);
    env.ok(&["pool", "set", "scrub_rate_limit=16M", "tank"]);
    env.ok(&["pool", "replace", "tank", "b", &env.p("e")]);
    let st = status(&env, false);
    assert!(
        st.lines()
            .any(|l| l.trim_start().starts_with("e ") && l.ends_with("(resilvering)")),
        "the new leaf shows it is being resilvered:\n{st}"
    );
    env.ok(&["pool", "scrub", "-s", "tank"]);
    assert_eq!(scan_fs(&env), ("RESILVER".into(), "CANCELED".into()));
    // The old leaf stays (it is the only complete copy besides a).
    assert_eq!(children(&env, "mirror-0"), ["a", "b", "e"]);
    assert_volume(&env, &model);
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    d.stop();
    let mut d = env.serve();
    wait_resilvered(&env, Duration::from_secs(20));
    wait_for(&env, "b is detached", Duration::from_secs(5), || {
        children(&env, "mirror-0") == ["a", "e"]
    });
    assert_clean_scrub(&env);
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

/// A replace issued while another leaf's attach resilver runs: when that first resilver completes,
/// the old leaf must stay (the other leaf's completion does not make it redundant); it leaves once
/// its own replacement has been resilvered. Detaching it early left the mirror with one complete
/// copy while the replacement still copied.
#[test]
fn a_replaced_leaf_waits_for_its_own_replacement_not_for_another_attach() {
    let (env, mut d, model) = setup_with_data(32 * MIB, 0x56);
    env.sparse("x", 256 * MIB);
    env.sparse("e", 256 * MIB);
    env.ok(&["pool", "set", "scrub_rate_limit=4M", "tank"]);
    env.ok(&["pool", "attach", "tank", "a", &env.p("x")]);
    env.ok(&["pool", "replace", "tank", "b", &env.p("e")]);
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    wait_resilvered(&env, Duration::from_secs(30));
    wait_for(&env, "b is detached", Duration::from_secs(5), || {
        children(&env, "mirror-0") == ["a", "e", "x"]
    });
    let j = env.json(&["pool", "events", "-j", "tank"]);
    let ev: Vec<(String, String, String)> = j["events"]
        .as_array()
        .expect("events array")
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (s("class"), s("vdev"), s("detail"))
        })
        .collect();
    let done: Vec<usize> = (0..ev.len())
        .filter(|&i| ev[i].0 == "resilver_done")
        .collect();
    let b_left = ev
        .iter()
        .position(|e| e.1 == env.p("b") && e.2 == "detached")
        .unwrap_or_else(|| panic!("no detach event for b: {ev:?}"));
    assert!(
        done.len() >= 2 && done.iter().all(|&i| i < b_left),
        "b left before the last resilver (its replacement's) completed: {ev:?}"
    );
    assert_clean_scrub(&env);
    env.ok(&["pool", "offline", "tank", "a"]);
    env.ok(&["pool", "offline", "tank", "x"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

/// The new leaf of a replace goes missing during its resilver: the resilver that then completes has
/// not copied onto it, so it keeps what it lacks (it had been cleared, the old leaf detached at the
/// next small resilver, and the mirror left with one real copy). Back and online, it gets
/// everything, and only then does the old leaf leave.
#[test]
fn a_resilver_target_missing_during_the_resilver_keeps_what_it_lacks() {
    let (env, mut d, model) = setup_with_data(64 * MIB, 0x58);
    env.sparse("g", 256 * MIB);
    env.ok(&["pool", "set", "scrub_rate_limit=2M", "tank"]);
    env.ok(&["pool", "replace", "tank", "b", &env.p("g")]);
    std::thread::sleep(Duration::from_millis(500));
    std::fs::rename(env.path("g"), env.path("g.away")).unwrap();
    wait_for(&env, "g is seen missing", Duration::from_secs(10), || {
        leaf(&env, "g")["state"] != "ONLINE"
    });
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    wait_scan_end(&env, Duration::from_secs(30));
    // Nothing was copied onto g: b stays.
    assert_eq!(children(&env, "mirror-0"), ["a", "b", "g"]);
    std::fs::rename(env.path("g.away"), env.path("g")).unwrap();
    env.ok(&["pool", "online", "tank", "g"]);
    let s = wait_resilvered(&env, Duration::from_secs(30));
    assert!(
        num(&s["processed"]) >= 16 * MIB,
        "g gets all of mirror-0's data: {s:#}"
    );
    wait_for(&env, "b is detached", Duration::from_secs(5), || {
        children(&env, "mirror-0") == ["a", "g"]
    });
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

/// A leaf detached before its resilver finished, attached again: it must get everything it lacked,
/// not only what changed since it left (its departure label claimed it held all up to then).
#[test]
fn a_leaf_detached_mid_resilver_and_attached_again_gets_everything() {
    let (env, mut d, mut model) = setup_with_data(64 * MIB, 0x59);
    env.sparse("g", 256 * MIB);
    env.ok(&["pool", "set", "scrub_rate_limit=1M", "tank"]);
    env.ok(&["pool", "attach", "tank", "a", &env.p("g")]);
    std::thread::sleep(Duration::from_millis(500));
    env.ok(&["pool", "detach", "tank", "g"]);
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    write_random(&env, &mut model, 100 * MIB, MIB, 0x5a);
    env.ok(&["pool", "attach", "tank", "a", &env.p("g")]);
    let s = wait_resilvered(&env, Duration::from_secs(30));
    assert!(
        num(&s["processed"]) >= 16 * MIB,
        "g gets all of mirror-0's data: {s:#}"
    );
    env.ok(&["pool", "offline", "tank", "a"]);
    env.ok(&["pool", "offline", "tank", "b"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

/// While the only other child of a mirror is still being resilvered, the complete one cannot be
/// taken offline (as detach): it would leave the data on no device.
#[test]
fn offline_of_the_only_complete_child_is_refused_while_its_sibling_resilvers() {
    let (env, mut d, model) = setup_with_data(64 * MIB, 0x5b);
    env.ok(&["pool", "offline", "tank", "b"]);
    env.sparse("g", 256 * MIB);
    env.ok(&["pool", "set", "scrub_rate_limit=1M", "tank"]);
    env.ok(&["pool", "attach", "tank", "a", &env.p("g")]);
    let e = env.fail(&["pool", "offline", "tank", "a"]);
    assert!(e.contains("no valid replicas"), "{e}");
    assert_eq!(leaf(&env, "a")["state"], "ONLINE");
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    wait_resilvered(&env, Duration::from_secs(30));
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

/// Detaching the new leaf of a replacement cancels it (as zpool): the old leaf stays, and is no
/// longer marked as being replaced, so a later resilver does not take it away.
#[test]
fn detaching_a_replacement_cancels_the_replace() {
    let (env, mut d, model) = setup_with_data(16 * MIB, 0x57);
    env.sparse("e", 256 * MIB);
    env.sparse("f", 256 * MIB);
    env.ok(&["pool", "set", "scrub_rate_limit=1M", "tank"]);
    env.ok(&["pool", "replace", "tank", "b", &env.p("e")]);
    env.ok(&["pool", "detach", "tank", "e"]);
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    assert_eq!(children(&env, "mirror-0"), ["a", "b"]);
    env.ok(&["pool", "attach", "tank", "a", &env.p("f")]);
    wait_resilvered(&env, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(children(&env, "mirror-0"), ["a", "b", "f"]);
    env.ok(&["pool", "offline", "tank", "a"]);
    env.ok(&["pool", "offline", "tank", "f"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 6. Attach, detach, attach again
// ---------------------------------------------------------------------------------------------------

#[test]
fn attach_detach_and_attach_again_copies_only_the_changes() {
    let (env, mut d, mut model) = setup_with_data(100 * MIB, 0x60);
    env.sparse("e", 256 * MIB);
    env.ok(&["pool", "attach", "tank", "a", &env.p("e")]);
    assert_eq!(children(&env, "mirror-0"), ["a", "b", "e"]);
    let first = num(&wait_resilvered(&env, Duration::from_secs(20))["processed"]);
    assert!(
        first >= 40 * MIB,
        "a new leaf gets all of mirror-0's data (~50M), got {first}"
    );
    env.ok(&["pool", "detach", "tank", "e"]);
    assert_eq!(children(&env, "mirror-0"), ["a", "b"]);
    assert!(!leaf_names(&env).contains(&"e".to_string()));

    write_random(&env, &mut model, 8 * MIB, 2 * MIB, 0x61);
    env.ok(&["pool", "attach", "tank", "a", &env.p("e")]);
    assert_eq!(children(&env, "mirror-0"), ["a", "b", "e"]);
    let s = wait_resilvered(&env, Duration::from_secs(20));
    let second = num(&s["processed"]);
    assert!(
        second > 0 && second * 10 <= first,
        "attached again, e should get only what changed since it left: first resilver {first}, \
         second {second}"
    );
    assert_clean_scrub(&env);
    // e holds everything, the new data too.
    env.ok(&["pool", "offline", "tank", "a"]);
    env.ok(&["pool", "offline", "tank", "b"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

#[test]
fn a_leaf_detached_from_one_mirror_and_attached_to_another_gets_everything() {
    let (env, mut d, model) = setup_with_data(100 * MIB, 0x62);
    env.sparse("e", 256 * MIB);
    env.ok(&["pool", "attach", "tank", "a", &env.p("e")]);
    wait_resilvered(&env, Duration::from_secs(20));
    env.ok(&["pool", "detach", "tank", "e"]);
    // Its label says it left mirror-0: for mirror-1 it holds nothing.
    env.ok(&["pool", "attach", "tank", "c", &env.p("e")]);
    assert_eq!(children(&env, "mirror-1"), ["c", "d", "e"]);
    let s = wait_resilvered(&env, Duration::from_secs(20));
    assert!(
        num(&s["processed"]) >= 40 * MIB,
        "e joins another mirror: it needs all of its data (~50M): {s:#}"
    );
    assert_clean_scrub(&env);
    env.ok(&["pool", "offline", "tank", "c"]);
    env.ok(&["pool", "offline", "tank", "d"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

/// `a` holds the only proven copy of mirror-0 while `b` is being verified: it can neither be
/// detached nor taken offline.
fn assert_a_cannot_leave(env: &Env) {
    for verb in ["detach", "offline"] {
        let e = env.fail(&["pool", verb, "tank", "a"]);
        assert!(e.contains("no valid replicas"), "{verb}: {e}");
    }
}

/// The verification at full speed to its end: the resilver's figures and the checksum errors it
/// counted on `b`. Then, after `clear`, a scrub finds nothing to repair and `b` alone serves every
/// byte of `model`.
fn verify_to_the_end(env: &Env, model: &[u8]) -> (serde_json::Value, u64) {
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    let s = wait_resilvered(env, Duration::from_secs(60));
    let cksum = errors_of(env, "b").2;
    env.ok(&["pool", "clear", "tank"]);
    assert_clean_scrub(env);
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(env, model);
    (s, cksum)
}

/// `pool detach tank b`, garbage over most of `b`'s file, `pool attach tank a b`: `b` is not trusted
/// because it was once a copy. Until a resilver has read and verified everything on it, status says
/// it is being verified and `a` cannot leave (detach or offline); the pass rewrites what is bad,
/// counts it as checksum errors on `b`, and a scrub afterwards finds nothing left to repair.
#[test]
fn a_leaf_attached_again_is_verified_before_it_counts_as_a_copy() {
    let (env, mut d, mut model) = setup_with_data(100 * MIB, 0x63);
    env.ok(&["pool", "detach", "tank", "b"]);
    // Someone writes over b while it is out of the pool (past its front labels).
    corrupt(&env, "b", 4 * MIB, 200 * MIB, 0x64);
    write_random(&env, &mut model, 110 * MIB, MIB, 0x65);
    // Slowly, so that the pass can be watched.
    env.ok(&["pool", "set", "scrub_rate_limit=2M", "tank"]);
    let out = env.ok(&["pool", "attach", "tank", "a", &env.p("b")]);
    assert_eq!(children(&env, "mirror-0"), ["a", "b"], "{out}");
    let st = status(&env, false);
    let line = st
        .lines()
        .find(|l| l.trim_start().starts_with("b "))
        .unwrap_or_else(|| panic!("no line for b:\n{st}"));
    assert!(
        line.contains("(resilvering: verifying)"),
        "b is shown as being verified: {line:?}\n{st}"
    );
    assert_a_cannot_leave(&env);
    let (s, cksum) = verify_to_the_end(&env, &model);
    assert!(
        num(&s["processed"]) >= 10 * MIB,
        "the garbage over b's data is rewritten: {s:#}"
    );
    assert!(cksum > 0, "the bad blocks found on b are counted");
    d.assert_alive();
}

/// The verification pass outlives a kill -9 of the daemon: after the restart the leaf is still no
/// full copy and the pass goes on verifying (not copying over what was fine).
#[test]
fn the_verification_of_a_leaf_attached_again_survives_a_kill() {
    let (env, mut d, model) = setup_with_data(100 * MIB, 0x6b);
    env.ok(&["pool", "detach", "tank", "b"]);
    corrupt(&env, "b", 4 * MIB, 20 * MIB, 0x6c);
    env.ok(&["pool", "set", "scrub_rate_limit=1M", "tank"]);
    env.ok(&["pool", "attach", "tank", "a", &env.p("b")]);
    d.kill();
    let mut d = env.serve();
    let st = status(&env, false);
    assert!(st.contains("(resilvering: verifying)"), "{st}");
    assert_a_cannot_leave(&env);
    verify_to_the_end(&env, &model);
    d.assert_alive();
}

/// A leaf re-attached untouched is verified too, but nothing on it is rewritten: the pass reads it
/// (and copies only what it missed), so the resilver writes far less than a full copy.
#[test]
fn an_untouched_leaf_attached_again_is_read_but_not_rewritten() {
    let (env, mut d, mut model) = setup_with_data(100 * MIB, 0x66);
    env.ok(&["pool", "detach", "tank", "b"]);
    write_random(&env, &mut model, 110 * MIB, MIB, 0x67);
    let before = pool_read_bytes(&env);
    env.ok(&["pool", "attach", "tank", "a", &env.p("b")]);
    let s = wait_resilvered(&env, Duration::from_secs(60));
    let processed = num(&s["processed"]);
    assert!(
        processed > 0 && processed <= 4 * MIB,
        "only what b missed (1 MiB and metadata) is written: {s:#}"
    );
    let read = pool_read_bytes(&env) - before;
    assert!(
        read >= 80 * MIB,
        "b's ~50 MiB were read and verified, with a's as the source (read {read} bytes)"
    );
    assert_eq!(errors_of(&env, "b"), (0, 0, 0));
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

/// `pool offline`, the leaf's file written by someone else, `pool online`: its dirty time log covers
/// only what the pool wrote meanwhile, so the whole leaf is verified, and the damage repaired.
#[test]
fn a_leaf_changed_while_offline_is_verified_when_it_comes_back() {
    let (env, mut d, mut model) = setup_with_data(100 * MIB, 0x68);
    env.ok(&["pool", "offline", "tank", "b"]);
    corrupt(&env, "b", 4 * MIB, 200 * MIB, 0x69);
    write_random(&env, &mut model, 110 * MIB, MIB, 0x6a);
    env.ok(&["pool", "set", "scrub_rate_limit=2M", "tank"]);
    env.ok(&["pool", "online", "tank", "b"]);
    assert_a_cannot_leave(&env);
    let (s, cksum) = verify_to_the_end(&env, &model);
    assert!(num(&s["processed"]) >= 10 * MIB && cksum > 0, "{s:#}");
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// 7. Pause and cancel a resilver
// ---------------------------------------------------------------------------------------------------

#[test]
fn a_resilver_can_be_paused_resumed_and_canceled() {
    let (env, mut d, mut model) = setup_with_data(100 * MIB, 0x70);
    // 16 MiB batches of two copies at 12 MiB/s: a batch every 2.7 s.
    env.ok(&["pool", "set", "scrub_rate_limit=12M", "tank"]);
    env.ok(&["pool", "offline", "tank", "b"]);
    write_random(&env, &mut model, 0, 64 * MIB, 0x71);
    env.ok(&["pool", "online", "tank", "b"]);
    wait_for(
        &env,
        "the resilver has begun",
        Duration::from_secs(10),
        || {
            let s = scan(&env);
            s["function"] == "RESILVER" && num(&s["examined"]) > 0
        },
    );
    assert_eq!(scan_fs(&env).1, "SCANNING", "{:#}", scan(&env));
    let t = scan_text(&env);
    assert!(t.contains("resilver in progress since "), "{t}");

    env.ok(&["pool", "scrub", "-p", "tank"]);
    assert_eq!(scan_fs(&env), ("RESILVER".into(), "PAUSED".into()));
    let t = scan_text(&env);
    assert!(
        t.contains("resilver paused since ") && t.contains("resilver started on "),
        "{t}"
    );
    let examined = scan_num(&env, "examined");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(scan_num(&env, "examined"), examined, "paused means paused");

    env.ok(&["pool", "scrub", "tank"]);
    assert_eq!(
        scan_fs(&env),
        ("RESILVER".into(), "SCANNING".into()),
        "`scrub` resumes the paused resilver (it does not start a scrub)"
    );
    assert!(scan_num(&env, "examined") >= examined);

    env.ok(&["pool", "scrub", "-s", "tank"]);
    assert_eq!(scan_fs(&env), ("RESILVER".into(), "CANCELED".into()));
    let t = scan_text(&env);
    assert!(t.starts_with("  scan: resilver canceled on "), "{t}");
    assert!(
        status(&env, false).contains("(resilver needed)"),
        "b still lacks data"
    );

    // Reads avoid b's stale copies (no checksum errors on b).
    assert_volume(&env, &model);
    assert_eq!(
        errors_of(&env, "b"),
        (0, 0, 0),
        "reads went to b's stale copies"
    );

    // A new daemon resilvers b again, to the end.
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    d.stop();
    let mut d = env.serve();
    let s = wait_resilvered(&env, Duration::from_secs(20));
    assert_eq!(num(&s["errors"]), 0, "{s:#}");
    assert_clean_scrub(&env);
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

#[test]
fn a_resilver_requested_during_a_scrub_runs_after_it_without_checksum_errors() {
    let (env, mut d, mut model) = setup_with_data(100 * MIB, 0x72);
    env.ok(&["pool", "set", "scrub_rate_limit=16M", "tank"]);
    env.ok(&["pool", "scrub", "tank"]);
    wait_for(
        &env,
        "the scrub has examined data",
        Duration::from_secs(10),
        || scan_num(&env, "examined") > 0,
    );
    // b misses 32 MiB of writes, partly behind the scrub's position and partly ahead of it.
    env.ok(&["pool", "offline", "tank", "b"]);
    write_random(&env, &mut model, 0, 32 * MIB, 0x73);
    env.ok(&["pool", "online", "tank", "b"]);
    assert_eq!(
        scan_fs(&env),
        ("SCRUB".into(), "SCANNING".into()),
        "the resilver waits for the scrub"
    );
    assert!(status(&env, false).contains("(resilver needed)"));
    env.ok(&["pool", "set", "scrub_rate_limit=0", "tank"]);
    wait_resilvered(&env, Duration::from_secs(20));
    // b was only offline: what it missed is not a checksum error.
    assert_eq!(
        errors_of(&env, "b"),
        (0, 0, 0),
        "b's stale copies were counted as errors:\n{}",
        status(&env, false)
    );
    assert!(!status(&env, false).contains("unrecoverable error"));
    assert_clean_scrub(&env);
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    d.assert_alive();
}

#[test]
fn scrub_rate_limit_caps_the_scrub_bandwidth() {
    let (env, mut d, _model) = setup_with_data(100 * MIB, 0x74);
    let t0 = Instant::now();
    env.ok(&["pool", "scrub", "-w", "tank"]);
    let free = t0.elapsed();
    let issued = scan_num(&env, "issued");
    assert!(issued >= 200 * MIB, "two copies of 100M: issued {issued}");
    env.ok(&["pool", "set", "scrub_rate_limit=32M", "tank"]);
    assert_eq!(
        env.ok(&[
            "pool",
            "get",
            "-Hp",
            "-o",
            "value",
            "scrub_rate_limit",
            "tank"
        ])
        .trim(),
        (32 * MIB).to_string()
    );
    let t0 = Instant::now();
    env.ok(&["pool", "scrub", "-w", "tank"]);
    let limited = t0.elapsed();
    // ~200 MiB at 32 MiB/s, less the first 16 MiB batch (two copies) that goes at once: over 5 s.
    assert!(
        limited >= Duration::from_secs(4) && limited > free * 2,
        "a scrub of {issued} bytes at 32M/s took {limited:?} (unlimited: {free:?})"
    );
    assert_eq!(scan_fs(&env), ("SCRUB".into(), "FINISHED".into()));
    d.assert_alive();
}
