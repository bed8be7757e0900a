//! Who may read the data, and what a log on a pipe looks like (issue 15, items 7 and 10): leaf files
//! that `pool create --size` makes are private whatever the umask, leaves others can read are
//! warned about at create and import, stderr on a pipe carries no colour escapes, and an error
//! about an empty name says so.

use cairn_tests::Env;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

fn mode(env: &Env, leaf: &str) -> u32 {
    std::fs::metadata(env.path(leaf))
        .expect("leaf exists")
        .permissions()
        .mode()
        & 0o777
}

/// `cairn ARGS` run through `sh` under umask 000 (the attack: a permissive umask).
fn run_umask_000(env: &Env, args: &[&str]) -> std::process::Output {
    let bin = cairn_tests::cairn_bin();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask 000; exec \"$@\"")
        .arg("sh")
        .arg(bin)
        .arg("--state-dir")
        .arg(env.state_dir())
        .args(args)
        .current_dir(env.p(""))
        .env_remove("CAIRN_LOG");
    cmd.output().expect("run cairn under sh")
}

/// Two 64 MiB sparse leaves `a` and `b`, made by the test (so with the test's umask).
fn two_leaves(env: &Env) -> Vec<String> {
    for n in ["a", "b"] {
        env.sparse(n, 64 << 20);
        std::fs::set_permissions(env.path(n), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    env.leaves(&["a", "b"])
}

#[test]
fn leaves_made_by_create_are_private_whatever_the_umask() {
    let env = Env::new();
    let (a, b) = (env.p("a"), env.p("b"));
    let o = run_umask_000(
        &env,
        &["pool", "create", "--size", "64M", "tank", "mirror", &a, &b],
    );
    assert!(
        o.status.success(),
        "create failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for l in ["a", "b"] {
        assert_eq!(mode(&env, l), 0o600, "leaf {l} is private");
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("warning: leaf"),
        "private leaves draw no warning: {err}"
    );
}

#[test]
fn leaves_others_can_read_are_warned_about_at_create_and_import() {
    let env = Env::new();
    let l = two_leaves(&env);
    std::fs::set_permissions(env.path("a"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = env.run(&["pool", "create", "tank", "mirror", &l[0], &l[1]]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("warning: leaf") && o.stderr.contains(&l[0]) && o.stderr.contains("0644"),
        "create warns about a, readable by others: {}",
        o.stderr
    );
    assert!(
        !o.stderr.contains(&format!("leaf {} ", l[1])),
        "{}",
        o.stderr
    );
    env.ok(&["pool", "export", "tank"]);
    std::fs::set_permissions(env.path("b"), std::fs::Permissions::from_mode(0o662)).unwrap();
    let o = env.run(&["pool", "import", "-d", &env.p(""), "tank"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for leaf in &l {
        assert!(
            o.stderr.contains(&format!("warning: leaf {leaf} ")),
            "import warns about {leaf}: {}",
            o.stderr
        );
    }
}

#[test]
fn the_daemons_log_on_a_pipe_has_no_colour_escapes() {
    let env = Env::new();
    let l = two_leaves(&env);
    env.ok(&["pool", "create", "tank", "mirror", &l[0], &l[1]]);
    env.ok(&["dataset", "create", "-V", "8M", "tank/vol"]);
    let mut d = env.serve();
    // A client that sends garbage after the handshake makes the daemon log a warning.
    let mut c = env.nbd_connect("tank/vol").expect("connect");
    c.send_raw(&[0xde; 28]).expect("send garbage");
    drop(c);
    // Wait (by count, not time) until the warning is in the log.
    let mut log = String::new();
    for _ in 0..200 {
        log = d.log();
        if log.contains("magic") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        log.contains("magic"),
        "the daemon logs the bad request: {log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI escapes in a log that is not a terminal: {log:?}"
    );
    d.assert_alive();
    // The same for a one-shot command's warnings on a pipe.
    let o = Command::new(cairn_tests::cairn_bin())
        .args([
            "--state-dir",
            env.state_dir().to_str().unwrap(),
            "dataset",
            "list",
            "",
        ])
        .env("CAIRN_LOG", "debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains('\u{1b}'), "{err:?}");
    let _ = std::io::stderr().flush();
}

#[test]
fn an_error_about_an_empty_name_says_the_name_is_empty() {
    let env = Env::new();
    let err = env.fail(&["dataset", "list", ""]);
    assert!(
        !err.contains("''") && err.contains("empty"),
        "the error says the name is empty instead of quoting nothing: {err}"
    );
}
