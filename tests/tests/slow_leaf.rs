//! A slow leaf must not stall the pool (issue 15, item 11): each commit used to write the labels and
//! uberblocks of every leaf one after another, and a mirror's children one after another, so 500 ms
//! of injected latency per write made `replace` take 16 s. Now every leaf's writes and flushes are
//! issued in parallel, and a mirror child slower than the pool's `slow_io_deadline` is faulted "too
//! slow" while its complete sibling carries on; what it missed goes into its dirty time log, and
//! after `clear` a resilver brings it back.
//!
//! The injected latency is 10 minutes per write of leaf b: a commit that waited for one of b's writes
//! (serial or parallel) could not finish within the harness's 120 s command timeout, so the commands
//! below finishing at all is the proof; no duration is asserted.
//!
//! Fixture: `cairn_tests::raid10` (`mirror a b mirror c d`, 256 MiB leaves, the 128 MiB volume
//! `tank/vol`, a daemon). Client: qemu-img (Debian package qemu-utils).

use cairn_tests::raid10::*;
use cairn_tests::MIB;
use std::time::Duration;

#[test]
fn a_mirror_child_slower_than_the_deadline_is_faulted_and_the_pool_carries_on() {
    let (env, mut d, mut model) = setup_with_data(8 * MIB, 0x5101);
    env.ok(&["pool", "set", "slow_io_deadline=2s", "tank"]);
    assert_eq!(
        env.ok(&[
            "pool",
            "get",
            "-H",
            "-o",
            "value",
            "slow_io_deadline",
            "tank"
        ])
        .trim(),
        "2s"
    );
    // Every write of b now takes 10 minutes.
    env.ok(&[
        "inject", "-d", "b", "-e", "latency", "-T", "write", "--delay", "600000", "tank",
    ]);

    // Commands that commit (each one at least once, with the labels of every leaf).
    env.ok(&["dataset", "create", "-V", "16M", "tank/v2"]);
    env.sparse("e", 256 * MIB);
    env.ok(&["pool", "attach", "tank", "c", &env.p("e")]);
    write_random(&env, &mut model, 16 * MIB, 8 * MIB, 0x5102);
    env.ok(&["dataset", "create", "-V", "16M", "tank/v3"]);

    // b is faulted as too slow; a carries mirror-0.
    let st = status(&env, false);
    let row: Vec<&str> = st
        .lines()
        .find(|l| l.split_whitespace().next() == Some("b"))
        .unwrap_or_else(|| panic!("no row for b:\n{st}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[1], "FAULTED", "{st}");
    assert!(st.contains("too slow"), "b's row should say why:\n{st}");
    assert_eq!(leaf(&env, "a")["state"], "ONLINE");
    let ev = env.ok(&["pool", "events", "-H", "tank"]);
    assert!(
        ev.lines()
            .any(|l| l.contains("slow_io") && l.contains("too slow")),
        "a slow_io event should name the deadline:\n{ev}"
    );
    assert!(
        ev.lines()
            .any(|l| l.contains("state_change") && l.contains("FAULTED: too slow")),
        "{ev}"
    );
    // Everything reads back meanwhile.
    assert_volume(&env, &model);

    // The device recovers; clear brings b back and a resilver copies what it missed.
    env.ok(&["inject", "-c", "all", "tank"]);
    env.ok(&["pool", "clear", "tank", "b"]);
    let s = wait_resilvered(&env, Duration::from_secs(60));
    // The 8 MiB written while b was faulted are spread over both mirrors in 1 MiB runs.
    assert!(
        num(&s["processed"]) >= 2 * MIB,
        "the resilver copies mirror-0's part of what was written while b was faulted: {s:#}"
    );
    assert_eq!(leaf(&env, "b")["state"], "ONLINE");
    assert_eq!(env.pool_health("tank"), "ONLINE");

    // b alone holds mirror-0's data: everything reads back with a offline.
    env.ok(&["pool", "offline", "tank", "a"]);
    assert_volume(&env, &model);
    env.ok(&["pool", "online", "tank", "a"]);
    wait_resilvered(&env, Duration::from_secs(60));
    assert_clean_scrub(&env);
    d.assert_alive();
}
