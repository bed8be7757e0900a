//! Who may touch the daemon (issue 15, items 6 and 8): `serve --nbd-socket PATH` replaces only a
//! stale socket (a regular file, a directory or a live socket there is refused and left as it
//! was), the daemon's sockets are 0600 whatever the umask unless `--nbd-socket-mode` asks for
//! more, and a state directory group or others may write (or another user owns) is refused.
//! Where the machine allows it (root, `runuser`, `nbdinfo`), user `nobody` is shown not to get
//! through a 0600 socket, and to get through a 0666 one (so the check can tell the two apart).

use cairn_tests::{find_program, Env, NbdClient};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

/// A pool `tank` with an 8 MiB volume `tank/vol`.
fn pool_with_volume(env: &Env) {
    let l = env.leaves(&["a", "b"]);
    env.ok(&[
        "pool", "create", "--size", "64M", "tank", "mirror", &l[0], &l[1],
    ]);
    env.ok(&["dataset", "create", "-V", "8M", "tank/vol"]);
}

/// A socket file at `p` that nobody answers on (its listener is gone, as after a crash).
fn stale_socket(p: &Path) {
    drop(UnixListener::bind(p).expect("bind"));
    assert!(
        UnixStream::connect(p).is_err(),
        "the socket left behind does not answer"
    );
}

#[test]
fn a_file_at_the_nbd_socket_path_survives_and_serve_fails_naming_it() {
    let env = Env::new();
    pool_with_volume(&env);
    let img = env.path("disk.img");
    std::fs::write(&img, b"precious\n").unwrap();
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o640)).unwrap();
    let ino = std::fs::metadata(&img).unwrap().ino();
    // Relative, as the attack typed it (the daemon's cwd is the test directory).
    let err = env.fail(&["serve", "--nbd-socket", "disk.img"]);
    assert!(
        err.contains("disk.img") && err.contains("regular file"),
        "the error names the file and why: {err}"
    );
    assert_eq!(std::fs::read(&img).unwrap(), b"precious\n");
    assert_eq!(std::fs::metadata(&img).unwrap().ino(), ino);
    assert_eq!(mode(&img), 0o640);
    // A directory: the same.
    let dir = env.mkdir("sockdir");
    std::fs::write(dir.join("inside"), b"x").unwrap();
    let err = env.fail(&["serve", "--nbd-socket", &env.p("sockdir")]);
    assert!(
        err.contains(&env.p("sockdir")) && err.contains("directory"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join("inside")).unwrap(), b"x");
    // A regular file where the control socket goes: refused too, and kept.
    let ctl = env.state_dir().join(cairn_tests::CONTROL_SOCKET);
    std::fs::write(&ctl, b"not a socket").unwrap();
    let err = env.fail(&["serve"]);
    assert!(
        err.contains(&*ctl.to_string_lossy()) && err.contains("regular file"),
        "{err}"
    );
    assert_eq!(std::fs::read(&ctl).unwrap(), b"not a socket");
    // Nothing of the failed starts is left beside the paths (no private directories, no sockets).
    assert!(!env.nbd_socket().exists(), "no NBD socket was made");
    std::fs::remove_file(&ctl).unwrap();
    // And the pool is fine: a daemon starts once the paths are clear.
    let mut d = env.serve();
    let c = env.nbd_connect("tank/vol").expect("connect");
    assert_eq!(c.size(), 8 << 20);
    c.disconnect().unwrap();
    d.stop();
}

#[test]
fn a_live_socket_is_refused_and_keeps_serving() {
    let env = Env::new();
    pool_with_volume(&env);
    let sock = env.path("shared.sock");
    let s = sock.to_str().unwrap();
    let mut d = env.serve_with(&["--nbd-socket", s]);
    // A second daemon (another state directory) asked for the same path.
    let other = Env::new();
    let err = other.fail(&["serve", "--nbd-socket", s]);
    assert!(err.contains(s) && err.contains("listening"), "{err}");
    let c = NbdClient::connect(&sock, "tank/vol").expect("the first daemon still answers");
    c.disconnect().unwrap();
    d.stop();
}

#[test]
fn stale_sockets_are_replaced_and_serve_works() {
    let env = Env::new();
    pool_with_volume(&env);
    let sock = env.path("nbd-elsewhere.sock");
    stale_socket(&sock);
    // The control socket too, as a daemon killed with SIGKILL leaves it.
    stale_socket(&env.state_dir().join(cairn_tests::CONTROL_SOCKET));
    let mut d = env.serve_with(&["--nbd-socket", sock.to_str().unwrap()]);
    let c = NbdClient::connect(&sock, "tank/vol").expect("connect through the new socket");
    assert_eq!(c.size(), 8 << 20);
    c.disconnect().unwrap();
    env.ok(&["pool", "list"]);
    d.stop();
}

#[test]
fn sockets_are_private_under_umask_000() {
    let env = Env::new();
    pool_with_volume(&env);
    // The default NBD socket (in the state directory) and the control socket.
    let mut d = env.serve_with_umask(0o000, &[]);
    let ctl = env.state_dir().join(cairn_tests::CONTROL_SOCKET);
    assert_eq!(mode(&env.nbd_socket()), 0o600);
    assert_eq!(mode(&ctl), 0o600);
    d.stop();
    // One outside the state directory (the attack: it was 0777 there).
    let out = env.path("out.sock");
    let mut d = env.serve_with_umask(0o000, &["--nbd-socket", out.to_str().unwrap()]);
    assert_eq!(mode(&out), 0o600);
    assert_eq!(mode(&ctl), 0o600);
    let c = NbdClient::connect(&out, "tank/vol").expect("the owner connects");
    c.disconnect().unwrap();
    // No private directory used while binding is left in the directory.
    let left: Vec<String> = std::fs::read_dir(env.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".cairn-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    d.stop();
}

#[test]
fn nbd_socket_mode_shares_the_socket_on_purpose() {
    let env = Env::new();
    pool_with_volume(&env);
    let out = env.path("group.sock");
    let mut d = env.serve_with_umask(
        0o000,
        &[
            "--nbd-socket",
            out.to_str().unwrap(),
            "--nbd-socket-mode",
            "660",
        ],
    );
    assert_eq!(mode(&out), 0o660);
    // The control socket stays private.
    assert_eq!(
        mode(&env.state_dir().join(cairn_tests::CONTROL_SOCKET)),
        0o600
    );
    d.stop();
    // Under the usual umask too (a mode is a mode, not a mask), and in the state directory.
    let mut d = env.serve_with(&["--nbd-socket-mode", "0664"]);
    assert_eq!(mode(&env.nbd_socket()), 0o664);
    d.stop();
    // A mode that is not octal is refused before anything happens.
    let o = env.run(&["serve", "--nbd-socket-mode", "rw-rw----"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("octal"), "{}", o.stderr);
}

#[test]
fn a_state_directory_others_may_write_is_refused() {
    let env = Env::new();
    pool_with_volume(&env);
    let sd = env.state_dir().to_path_buf();
    let sds = sd.to_str().unwrap();
    let before: Vec<_> = std::fs::read_dir(&sd)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for (m, says) in [
        (0o777, "mode 0777"),
        (0o775, "mode 0775"),
        (0o757, "mode 0757"),
    ] {
        std::fs::set_permissions(&sd, std::fs::Permissions::from_mode(m)).unwrap();
        for cmd in [&["pool", "list"][..], &["serve"][..]] {
            let err = env.fail(cmd);
            assert!(
                err.contains(sds)
                    && err.contains(says)
                    && err.contains(&format!("chmod 700 {sds}")),
                "`{}` with the state directory {m:o}: {err}",
                cmd.join(" ")
            );
        }
        assert_eq!(mode(&sd), m, "the directory's mode is left alone");
        let now: Vec<_> = std::fs::read_dir(&sd)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(now.len(), before.len(), "nothing made in it: {now:?}");
    }
    // Readable by others is fine (0755 is what a usual umask makes); the pool is still there.
    std::fs::set_permissions(&sd, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(env.pool_names(), ["tank"]);
    // Owned by another user: only root can set that up.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let chown = |uid: u32| {
            std::os::unix::fs::chown(&sd, Some(uid), None).expect("chown the state directory")
        };
        let mine = std::fs::metadata(&sd).unwrap().uid();
        chown(65534);
        let err = env.fail(&["pool", "list"]);
        assert!(
            err.contains(sds) && err.contains("owned by uid 65534"),
            "{err}"
        );
        chown(mine);
        env.ok(&["pool", "list"]);
    } else {
        eprintln!("note: not root, the state directory owned by another user is not tried");
    }
}

#[test]
fn a_state_directory_cairn_makes_is_0700_whatever_the_umask() {
    let env = Env::new();
    let new = env.path("fresh/state");
    let o = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$@\"")
        .arg("sh")
        .arg(cairn_tests::cairn_bin())
        .arg("--state-dir")
        .arg(&new)
        .args(["pool", "list"])
        .current_dir(env.dir())
        .env_remove("CAIRN_STATE_DIR")
        .output()
        .expect("run cairn");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(mode(&new), 0o700);
}

/// `nbdinfo --size` on `socket` as user `nobody`: (exit code, stderr).
fn nbdinfo_as_nobody(runuser: &Path, nbdinfo: &Path, socket: &Path) -> (i32, String) {
    let uri = format!("nbd+unix:///tank/vol?socket={}", socket.display());
    let o = Command::new(runuser)
        .args(["-u", "nobody", "--"])
        .arg(nbdinfo)
        .args(["--size", &uri])
        .current_dir("/")
        .output()
        .expect("run runuser");
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn another_user_cannot_connect_to_a_private_socket() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let (Some(runuser), Some(nbdinfo), true) =
        (find_program("runuser"), find_program("nbdinfo"), root)
    else {
        eprintln!(
            "note: skipped: needs root, runuser and nbdinfo (libnbd-bin) to connect as 'nobody'"
        );
        return;
    };
    let env = Env::new();
    pool_with_volume(&env);
    // A directory nobody may enter (the test's own is private), as a shared socket directory is.
    let shared = tempfile::Builder::new()
        .prefix("cairn-shared-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = shared.path().join("nbd.sock");
    let s = sock.to_str().unwrap();
    let mut d = env.serve_with_umask(0o000, &["--nbd-socket", s]);
    let (code, out) = nbdinfo_as_nobody(&runuser, &nbdinfo, &sock);
    assert_ne!(code, 0, "nobody connected to a 0600 socket: {out}");
    assert!(
        out.contains("ermission denied"),
        "refused by the mode: {out}"
    );
    d.stop();
    // The control: shared on purpose, nobody gets through (so the refusal above was the mode's).
    let mut d = env.serve_with(&["--nbd-socket", s, "--nbd-socket-mode", "666"]);
    let (code, out) = nbdinfo_as_nobody(&runuser, &nbdinfo, &sock);
    assert_eq!(
        code, 0,
        "nobody reads the size of a shared socket's export: {out}"
    );
    assert_eq!(out.trim(), (8u64 << 20).to_string());
    d.stop();
}
