//! The daemon's unix sockets (issue 15, items 6 and 8): made with the mode asked for whatever the
//! umask, and never over anything but a stale socket.
//!
//! A path that holds a socket nobody answers on (connect says ECONNREFUSED: its daemon died) is
//! stale and removed. Anything else there is refused and left untouched: a regular file (`serve
//! --nbd-socket disk.img` used to replace the file with a socket), a directory, a symbolic link,
//! or a socket someone answers on.
//!
//! The socket is bound in a fresh private directory (0700) beside the path, given its mode, and
//! only then hard-linked into place (which fails if something appeared at the path meanwhile), so
//! at no moment can another user connect to it with the umask's mode. The private directory is
//! removed again; the listener stays bound to the linked file.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The default mode of the daemon's sockets: only its user may connect.
pub const PRIVATE: u32 = 0o600;

/// `--nbd-socket-mode`: an octal mode of at most 0777 (`660`, `0660`).
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(format!(
            "invalid mode '{s}': an octal mode of at most 777, such as 600 or 660"
        )),
    }
}

/// Bind a listening unix socket at `path` with permissions `mode` (see the module documentation).
/// The error says why, naming the path.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, String> {
    let fail = |why: String| format!("cannot listen on '{}': {why}", path.display());
    clear_stale(path).map_err(fail)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| fail("the path names no file".into()))?;
    let private = Private::create(dir, &name.to_string_lossy()).map_err(|e| {
        fail(format!(
            "cannot make a private directory in {}: {e}",
            dir.display()
        ))
    })?;
    let tmp = private.0.join("s");
    let listener = UnixListener::bind(&tmp).map_err(|e| fail(e.to_string()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .map_err(|e| fail(format!("cannot set its mode: {e}")))?;
    match fs::hard_link(&tmp, path) {
        Ok(()) => Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(fail(
            "something was created there while the daemon started; it is left as it is".into(),
        )),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Remove `path` if it is a stale socket; refuse anything else that is there.
fn clear_stale(path: &Path) -> Result<(), String> {
    let m = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let t = m.file_type();
    let what = if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_socket() {
        return match UnixStream::connect(path) {
            Ok(_) => Err(
                "a server is listening on this socket (another daemon?); it is \
                           left as it is"
                    .into(),
            ),
            // Nobody answers: a socket left by a daemon that died.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("cannot remove the stale socket: {e}")),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!(
                "a socket is there that cannot be checked ({e}); it is left as it is"
            )),
        };
    } else {
        "a special file"
    };
    Err(format!(
        "it is {what}, not a socket; it is left as it is (remove it yourself, or choose another \
         path)"
    ))
}

/// A private directory (0700), removed with what is in it when dropped.
struct Private(PathBuf);

impl Private {
    fn create(parent: &Path, name: &str) -> io::Result<Private> {
        let mut last = None;
        for _ in 0..16 {
            let r = crate::statedir::random_nonzero_u64()?;
            let p = parent.join(format!(".{name}.cairn-{r:016x}"));
            match fs::DirBuilder::new().mode(0o700).create(&p) {
                Ok(()) => {
                    let d = Private(p);
                    // The umask may have taken bits away (the socket inside must be reachable).
                    fs::set_permissions(&d.0, fs::Permissions::from_mode(0o700))?;
                    return Ok(d);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free name")))
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        for bad in ["", "888", "1777", "rw", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_socket_gets_its_mode_and_nothing_is_left_beside_it() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("nbd.sock");
        let l = bind(&p, 0o640).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // Clients connect through the linked name.
        UnixStream::connect(&p).unwrap();
        l.accept().unwrap();
    }

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("s");
        // Live: refused, still answering.
        let live = bind(&p, PRIVATE).unwrap();
        let err = bind(&p, PRIVATE).unwrap_err();
        assert!(
            err.contains("listening") && err.contains(&*p.to_string_lossy()),
            "{err}"
        );
        UnixStream::connect(&p).unwrap();
        // Stale once its listener is gone: replaced.
        drop(live);
        let e = UnixStream::connect(&p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "stale: {e}");
        let _again = bind(&p, PRIVATE).unwrap();
        UnixStream::connect(&p).expect("the new socket answers");
        // A regular file and a directory: refused, untouched.
        let f = tmp.path().join("disk.img");
        fs::write(&f, b"precious").unwrap();
        let err = bind(&f, PRIVATE).unwrap_err();
        assert!(err.contains("regular file"), "{err}");
        assert_eq!(fs::read(&f).unwrap(), b"precious");
        let d = tmp.path().join("dir");
        fs::create_dir(&d).unwrap();
        assert!(bind(&d, PRIVATE).unwrap_err().contains("a directory"));
        assert!(d.is_dir());
    }
}
