//! End-to-end test of the registry race (issue 15, item 3): while one volume is created and destroyed
//! in a loop, everything that reads another volume (`dataset get`, `dataset list`, NBD connects, and
//! writes whose space check walks the other volumes' reservations) must succeed every time. Before the
//! fix, readers read the registry and the objects it names under separate acquisitions of the pool
//! lock, so a destroy in between made them fail with `object N does not exist` for a volume they
//! were not even asking about, and an NBD connect to it was refused as "no such export".
//!
//! The churn runs a fixed number of rounds (not a time), alternating a thick volume (with a
//! refreservation, which `available` and a writer's headroom walk) and a sparse one; the readers go on
//! until it is done. Every command goes through the running daemon, so both sides share one open pool.

use cairn_tests::{random_bytes, Env, MIB};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Create/destroy rounds of `tank/tmp`.
const ROUNDS: usize = 800;
/// Threads of each kind of reader.
const READERS: usize = 2;
/// Size of both volumes.
const VOL: &str = "8M";
const KEEP: &str = "tank/keep";

/// What the readers saw go wrong (the first few messages), and how many tries they made.
#[derive(Default)]
struct Tally {
    failures: Mutex<Vec<String>>,
    tries: AtomicUsize,
}

impl Tally {
    fn check(&self, what: &str, r: Result<(), String>) {
        self.tries.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = r {
            self.failures.lock().unwrap().push(format!("{what}: {e}"));
        }
    }
}

/// `cairn ARGS` must exit 0; the error is its stderr.
fn cli(env: &Env, args: &[&str]) -> Result<String, String> {
    let o = env.run(args);
    if o.code == 0 {
        Ok(o.stdout)
    } else {
        Err(format!("exit {}: {}", o.code, o.stderr.trim()))
    }
}

#[test]
fn readers_of_one_volume_never_fail_while_another_is_created_and_destroyed() {
    let env = Env::new();
    let l = env.leaves(&["a", "b"]);
    env.ok(&[
        "pool", "create", "--size", "256M", "tank", "mirror", &l[0], &l[1],
    ]);
    // Thick: its own writes refresh the headroom other reservations leave.
    env.ok(&["dataset", "create", "-V", VOL, KEEP]);
    let _d = env.serve();
    let data = random_bytes(64 * 1024, 15);
    {
        let mut c = env.nbd_connect(KEEP).expect("connect to tank/keep");
        c.write(0, &data).unwrap();
        c.flush().unwrap();
        c.disconnect().unwrap();
    }
    let done = AtomicBool::new(false);
    let tally = Tally::default();
    std::thread::scope(|s| {
        // The churn: thick and sparse in turn, a fixed number of rounds.
        s.spawn(|| {
            for i in 0..ROUNDS {
                let mut create = vec!["dataset", "create", "-V", VOL];
                if i % 2 == 1 {
                    create.push("-s");
                }
                create.push("tank/tmp");
                let r =
                    cli(&env, &create).and_then(|_| cli(&env, &["dataset", "destroy", "tank/tmp"]));
                if let Err(e) = r {
                    done.store(true, Ordering::SeqCst);
                    panic!("round {i} of the churn failed: {e}");
                }
            }
            done.store(true, Ordering::SeqCst);
        });
        // Properties and listings of tank/keep (and of the pool, which lists tank/tmp or not).
        for _ in 0..READERS {
            s.spawn(|| {
                while !done.load(Ordering::SeqCst) {
                    tally.check(
                        "dataset get",
                        cli(
                            &env,
                            &[
                                "dataset",
                                "get",
                                "-H",
                                "-p",
                                "-o",
                                "value",
                                "used,available,referenced,volsize",
                                KEEP,
                            ],
                        )
                        .and_then(|out| {
                            let v: Vec<&str> = out.lines().collect();
                            match v.as_slice() {
                                [_, _, _, size] if *size == (8 * MIB).to_string() => Ok(()),
                                _ => Err(format!("unexpected output {out:?}")),
                            }
                        }),
                    );
                    tally.check(
                        "dataset list",
                        cli(&env, &["dataset", "list", "-H", "-p", "-t", "all"]).and_then(|out| {
                            if out.lines().any(|l| l.starts_with("tank/keep\t")) {
                                Ok(())
                            } else {
                                Err(format!("tank/keep not listed: {out:?}"))
                            }
                        }),
                    );
                    tally.check(
                        "dataset list tank/keep",
                        cli(&env, &["dataset", "list", "-H", "-p", KEEP]).map(|_| ()),
                    );
                }
            });
        }
        // NBD connects to tank/keep, each reading back what was written.
        for _ in 0..READERS {
            s.spawn(|| {
                while !done.load(Ordering::SeqCst) {
                    tally.check(
                        "NBD connect",
                        env.nbd_connect(KEEP)
                            .map_err(|e| e.to_string())
                            .and_then(|mut c| {
                                let got = c.read(0, 4096).map_err(|e| format!("read: {e}"))?;
                                if got != data[..4096] {
                                    return Err("read back other bytes".into());
                                }
                                c.disconnect().map_err(|e| format!("disconnect: {e}"))
                            }),
                    );
                }
            });
        }
        // One client writing all along: its space check walks the other volumes' reservations
        // (refreshed at most once a second).
        s.spawn(|| {
            let mut c = env.nbd_connect(KEEP).expect("connect to tank/keep");
            let mut n = 0u64;
            while !done.load(Ordering::SeqCst) {
                let off = MIB + (n % 64) * 64 * 1024;
                tally.check(
                    "NBD write",
                    c.write(off, &data)
                        .map_err(|e| format!("write at {off}: {e}")),
                );
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            c.disconnect().unwrap();
        });
    });
    let failures = tally.failures.into_inner().unwrap();
    let tries = tally.tries.load(Ordering::Relaxed);
    eprintln!("{tries} reads and writes of tank/keep during {ROUNDS} create/destroy rounds");
    assert!(
        failures.is_empty(),
        "{} of {tries} reads and writes of tank/keep failed while tank/tmp was created and \
         destroyed; the first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The churn left nothing behind.
    let names = env.ok(&["dataset", "list", "-H", "-o", "name"]);
    assert_eq!(names.trim(), KEEP);
}
