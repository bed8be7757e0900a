//! The state directory and the pool cache.
//!
//! The state directory holds what outlives one `cairn` command: the list of
//! imported pools (`pools.json`, Cairn's `zpool.cache`), its lock
//! (`pools.lock`), this host's id (`hostid`) and the daemon's sockets. It is
//! chosen by [`resolve_state_dir`]: `--state-dir`, else `$CAIRN_STATE_DIR`,
//! else a per-user default (`$XDG_STATE_HOME/cairn`, else
//! `$HOME/.local/state/cairn`, else `/var/lib/cairn` for root).
//!
//! The cache is JSON, rewritten atomically (temporary file, fsync, rename,
//! fsync of the directory). Read-modify-write cycles hold an exclusive
//! `flock` on `pools.lock` ([`StateDir::lock_cache`], or
//! [`StateDir::update_cache`] which does the whole cycle) so that two
//! concurrent commands never lose each other's updates.

use std::ffi::{CStr, OsString};
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The pool cache file inside the state directory.
pub const CACHE_FILE: &str = "pools.json";
/// The temporary file the cache is written to before the rename.
pub const CACHE_TMP_FILE: &str = "pools.json.tmp";
/// The lock file that serialises cache updates.
pub const CACHE_LOCK_FILE: &str = "pools.lock";
/// The file holding this host's id.
pub const HOSTID_FILE: &str = "hostid";

/// The cache format version written by this build.
const CACHE_VERSION: u32 = 1;

/// The environment that decides the default state directory, gathered once
/// so that the precedence rules can be tested without touching the
/// process's environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StateEnv {
    /// `$CAIRN_STATE_DIR`.
    cairn_state_dir: Option<OsString>,
    /// `$XDG_STATE_HOME`.
    xdg_state_home: Option<OsString>,
    /// `$HOME`.
    home: Option<OsString>,
    /// The effective user id.
    uid: u32,
    /// The home directory in the password database, for a user without `$HOME`.
    passwd_home: Option<PathBuf>,
}

impl StateEnv {
    fn from_process() -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        let home = std::env::var_os("HOME");
        let passwd_home = if home.as_ref().is_some_and(|h| !h.is_empty()) {
            None
        } else {
            passwd_home(uid)
        };
        StateEnv {
            cairn_state_dir: std::env::var_os("CAIRN_STATE_DIR"),
            xdg_state_home: std::env::var_os("XDG_STATE_HOME"),
            home,
            uid,
            passwd_home,
        }
    }
}

/// Picks the state directory: `flag` (`--state-dir`), else
/// `$CAIRN_STATE_DIR`, else `$XDG_STATE_HOME/cairn`, else
/// `$HOME/.local/state/cairn`, else `/var/lib/cairn` when running as root
/// without `$HOME`. Empty variables count as unset and a relative
/// `$XDG_STATE_HOME` is ignored, as the XDG spec asks. A non-root user with
/// no `$HOME` gets the home directory from the password database, and as a
/// last resort `$TMPDIR/cairn-<uid>`.
pub fn resolve_state_dir(flag: Option<&Path>) -> PathBuf {
    resolve_with(flag, &StateEnv::from_process())
}

/// The precedence rules of [`resolve_state_dir`], on given values.
fn resolve_with(flag: Option<&Path>, env: &StateEnv) -> PathBuf {
    let set = |v: &Option<OsString>| v.as_ref().filter(|s| !s.is_empty()).map(PathBuf::from);
    if let Some(flag) = flag {
        return flag.to_path_buf();
    }
    if let Some(dir) = set(&env.cairn_state_dir) {
        return dir;
    }
    if let Some(xdg) = set(&env.xdg_state_home).filter(|p| p.is_absolute()) {
        return xdg.join("cairn");
    }
    if let Some(home) = set(&env.home) {
        return home.join(".local/state/cairn");
    }
    if env.uid == 0 {
        return PathBuf::from("/var/lib/cairn");
    }
    if let Some(home) = env.passwd_home.as_ref().filter(|p| p.is_absolute()) {
        return home.join(".local/state/cairn");
    }
    std::env::temp_dir().join(format!("cairn-{}", env.uid))
}

/// The home directory of `uid` in the password database.
fn passwd_home(uid: libc::uid_t) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;

    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: an all-zero `passwd` is a valid value (integers and null
        // pointers); getpwuid_r only writes to it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the duration of the call and
        // `buf.len()` is the true size of `buf`.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_dir.is_null() {
            return None;
        }
        // SAFETY: on success pw_dir points to a NUL-terminated string inside
        // `buf`, which is alive here.
        let dir = unsafe { CStr::from_ptr(pwd.pw_dir) };
        let dir = std::ffi::OsStr::from_bytes(dir.to_bytes());
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
}

/// A random nonzero `u64` from the kernel's generator (for host ids and GUIDs).
pub fn random_nonzero_u64() -> io::Result<u64> {
    loop {
        let mut buf = [0u8; 8];
        let from_file = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
        if from_file.is_err() {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
            let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
            if usize::try_from(n).ok() != Some(buf.len()) {
                return Err(io::Error::last_os_error());
            }
        }
        let v = u64::from_le_bytes(buf);
        if v != 0 {
            return Ok(v);
        }
    }
}

/// This machine's host name: `gethostname`, else `/etc/hostname`, else
/// `localhost`.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes; gethostname
    // writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
        if !name.is_empty() {
            return name;
        }
    }
    fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// An io::Error of the same kind whose message names the path.
fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Refuses a state directory that is not private to the user running
/// cairn: owned by another user, or writable by its group or by others.
/// The message names the directory, what is wrong and the fix.
pub fn check_private(root: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(root).map_err(|e| with_path(e, "cannot read", root))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mode = m.mode() & 0o7777;
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{why}: whoever can write there can replace the daemon's sockets and the pool \
                 cache; {}",
                if m.uid() != me {
                    format!(
                        "use a state directory of your own (--state-dir), or make it yours with \
                         'chown {me} {0} && chmod 700 {0}'",
                        root.display()
                    )
                } else {
                    format!("make it private with 'chmod 700 {}'", root.display())
                }
            ),
        ))
    };
    if m.uid() != me {
        return refuse(format!(
            "it is owned by uid {}, not by the user running cairn (uid {me})",
            m.uid()
        ));
    }
    let writable = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => "its group and others",
        (true, false) => "its group",
        (false, true) => "others",
        (false, false) => return Ok(()),
    };
    refuse(format!("it is writable by {writable} (mode {mode:04o})"))
}

/// One imported pool, as remembered in the cache.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CacheEntry {
    /// The pool's name.
    pub name: String,
    /// The pool's GUID.
    pub guid: u64,
    /// The paths of its leaves, where the pool was last opened.
    pub leaves: Vec<String>,
}

/// The on-disk form of the cache.
#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    pools: Vec<CacheEntry>,
}

/// An exclusive lock on the pool cache, released when dropped.
#[derive(Debug)]
pub struct CacheLock {
    file: File,
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        // Closing the file releases the flock anyway; unlocking first makes
        // the release independent of any duplicated descriptor.
        let _ = self.file.unlock();
    }
}

/// An opened state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens the state directory at `root`, creating it (and its missing
    /// parents) with mode 0700 if it does not exist, whatever the umask.
    ///
    /// A directory that another user owns, or that group or others may
    /// write, is refused (see [`check_private`]): whoever can write there can
    /// replace the daemon's sockets and the pool cache.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<StateDir> {
        let root = root.into();
        let existed = fs::symlink_metadata(&root).is_ok();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(|e| with_path(e, "cannot create state directory", &root))?;
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("state directory {} is not a directory", root.display()),
            ));
        }
        if !existed {
            // The umask may have taken bits of 0700 away; ours is exactly 0700.
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
                .map_err(|e| with_path(e, "cannot set the mode of state directory", &root))?;
        }
        check_private(&root)?;
        Ok(StateDir { root })
    }

    /// The directory's path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of a file inside the state directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// This host's id: a random nonzero number created on first use and
    /// kept in `hostid` (16 hex digits). Concurrent first uses agree on one
    /// value: the file is written aside and hard-linked into place.
    pub fn host_id(&self) -> io::Result<u64> {
        let path = self.path(HOSTID_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => return parse_hostid(&text, &path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_path(e, "cannot read", &path)),
        }
        let id = random_nonzero_u64()?;
        let tmp = self.path(&format!(
            "{HOSTID_FILE}.tmp.{}.{id:016x}",
            std::process::id()
        ));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(format!("{id:016x}\n").as_bytes())?;
            f.sync_all()?;
            match fs::hard_link(&tmp, &path) {
                Ok(()) => {
                    sync_dir(&self.root)?;
                    Ok(id)
                }
                // Someone else created it first: theirs wins.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    parse_hostid(&fs::read_to_string(&path)?, &path)
                }
                Err(e) => Err(e),
            }
        })();
        let _ = fs::remove_file(&tmp);
        result.map_err(|e| with_path(e, "cannot create", &path))
    }

    /// This machine's host name (see [`hostname`]).
    pub fn hostname(&self) -> String {
        hostname()
    }

    /// Reads the pool cache. A missing file is an empty cache; an
    /// unreadable or corrupt one is an error that names the file.
    pub fn load_cache(&self) -> io::Result<Vec<CacheEntry>> {
        let path = self.path(CACHE_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(with_path(e, "cannot read pool cache", &path)),
        };
        let file: CacheFile = serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("corrupt pool cache {}: {e}", path.display()),
            )
        })?;
        if file.version != CACHE_VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "pool cache {} has unsupported version {}",
                    path.display(),
                    file.version
                ),
            ));
        }
        Ok(file.pools)
    }

    /// Replaces the pool cache atomically: writes `pools.json.tmp`, fsyncs
    /// it, renames it over `pools.json` and fsyncs the directory. Callers
    /// that read, modify and write hold [`StateDir::lock_cache`] throughout
    /// (or use [`StateDir::update_cache`]).
    pub fn save_cache(&self, entries: &[CacheEntry]) -> io::Result<()> {
        let path = self.path(CACHE_FILE);
        let tmp = self.path(CACHE_TMP_FILE);
        let file = CacheFile {
            version: CACHE_VERSION,
            pools: entries.to_vec(),
        };
        let mut text = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        text.push(b'\n');
        (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)?;
            sync_dir(&self.root)
        })()
        .map_err(|e| with_path(e, "cannot write pool cache", &path))
    }

    /// Takes the exclusive cache lock (`flock` on `pools.lock`), waiting
    /// for any other holder. The lock is released when the guard drops.
    pub fn lock_cache(&self) -> io::Result<CacheLock> {
        let file = self.open_lock_file()?;
        loop {
            match file.lock() {
                Ok(()) => return Ok(CacheLock { file }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(with_path(e, "cannot lock", &self.path(CACHE_LOCK_FILE))),
            }
        }
    }

    /// Takes the cache lock if it is free; `None` if another holder has it.
    #[allow(dead_code)]
    pub fn try_lock_cache(&self) -> io::Result<Option<CacheLock>> {
        let file = self.open_lock_file()?;
        match file.try_lock() {
            Ok(()) => Ok(Some(CacheLock { file })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => {
                Err(with_path(e, "cannot lock", &self.path(CACHE_LOCK_FILE)))
            }
        }
    }

    /// Locks, loads, lets `f` modify the entries, saves if they changed,
    /// and unlocks: one read-modify-write cycle that cannot lose a
    /// concurrent update.
    pub fn update_cache<T>(&self, f: impl FnOnce(&mut Vec<CacheEntry>) -> T) -> io::Result<T> {
        let _lock = self.lock_cache()?;
        let before = self.load_cache()?;
        let mut entries = before.clone();
        let out = f(&mut entries);
        if entries != before {
            self.save_cache(&entries)?;
        }
        Ok(out)
    }

    fn open_lock_file(&self) -> io::Result<File> {
        let path = self.path(CACHE_LOCK_FILE);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| with_path(e, "cannot open", &path))
    }
}

fn parse_hostid(text: &str, path: &Path) -> io::Result<u64> {
    match u64::from_str_radix(text.trim(), 16) {
        Ok(id) if id != 0 => Ok(id),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("corrupt host id file {}", path.display()),
        )),
    }
}

/// fsyncs a directory, making a rename or link in it durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn env(cairn: Option<&str>, xdg: Option<&str>, home: Option<&str>, uid: u32) -> StateEnv {
        StateEnv {
            cairn_state_dir: cairn.map(OsString::from),
            xdg_state_home: xdg.map(OsString::from),
            home: home.map(OsString::from),
            uid,
            passwd_home: None,
        }
    }

    #[test]
    fn state_dir_precedence() {
        let all = env(Some("/s/env"), Some("/xdg"), Some("/home/u"), 1000);
        let flag = Path::new("/from/flag");
        assert_eq!(resolve_with(Some(flag), &all), PathBuf::from("/from/flag"));
        assert_eq!(
            resolve_with(Some(Path::new("rel")), &all),
            PathBuf::from("rel")
        );
        assert_eq!(resolve_with(None, &all), PathBuf::from("/s/env"));

        let no_cairn = env(None, Some("/xdg"), Some("/home/u"), 1000);
        assert_eq!(resolve_with(None, &no_cairn), PathBuf::from("/xdg/cairn"));

        let home_only = env(None, None, Some("/home/u"), 1000);
        assert_eq!(
            resolve_with(None, &home_only),
            PathBuf::from("/home/u/.local/state/cairn")
        );
        let root_home = env(None, None, Some("/root"), 0);
        assert_eq!(
            resolve_with(None, &root_home),
            PathBuf::from("/root/.local/state/cairn")
        );
        let root_bare = env(None, None, None, 0);
        assert_eq!(
            resolve_with(None, &root_bare),
            PathBuf::from("/var/lib/cairn")
        );
    }

    #[test]
    fn empty_and_relative_values_are_skipped() {
        let e = env(Some(""), Some("relative/xdg"), Some("/home/u"), 1000);
        assert_eq!(
            resolve_with(None, &e),
            PathBuf::from("/home/u/.local/state/cairn")
        );
        let e = env(Some(""), Some(""), Some(""), 0);
        assert_eq!(resolve_with(None, &e), PathBuf::from("/var/lib/cairn"));
    }

    #[test]
    fn user_without_home_falls_back_to_passwd_then_tmp() {
        let mut e = env(None, None, None, 1234);
        e.passwd_home = Some(PathBuf::from("/home/pw"));
        assert_eq!(
            resolve_with(None, &e),
            PathBuf::from("/home/pw/.local/state/cairn")
        );
        e.passwd_home = None;
        assert_eq!(
            resolve_with(None, &e),
            std::env::temp_dir().join("cairn-1234")
        );
    }

    #[test]
    fn resolve_from_process_honours_the_flag() {
        let flag = Path::new("/some/where");
        assert_eq!(resolve_state_dir(Some(flag)), flag);
        assert!(!resolve_state_dir(None).as_os_str().is_empty());
    }

    #[test]
    fn open_creates_private_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/b/state");
        let sd = StateDir::open(&root).unwrap();
        assert_eq!(sd.root(), root);
        let mode = fs::metadata(&root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Opening again is fine and leaves an existing directory's mode alone.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o750)).unwrap();
        StateDir::open(&root).unwrap();
        let mode = fs::metadata(&root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o750);
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        StateDir::open(&root).unwrap();
        for (mode, says) in [
            (0o770, "writable by its group (mode 0770)"),
            (0o757, "writable by others (mode 0757)"),
            (0o1777, "writable by its group and others (mode 1777)"),
        ] {
            fs::set_permissions(&root, fs::Permissions::from_mode(mode)).unwrap();
            let err = StateDir::open(&root).unwrap_err().to_string();
            assert!(err.contains(says), "{mode:o}: {err}");
            assert!(
                err.contains(&format!("chmod 700 {}", root.display())),
                "{err}"
            );
            // Nothing changed.
            let now = fs::metadata(&root).unwrap().permissions().mode() & 0o7777;
            assert_eq!(now, mode);
        }
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        StateDir::open(&root).unwrap();
    }

    #[test]
    fn open_on_a_file_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        fs::write(&file, b"x").unwrap();
        let err = StateDir::open(&file).unwrap_err();
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn host_id_is_created_once() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::open(tmp.path()).unwrap();
        let id = sd.host_id().unwrap();
        assert_ne!(id, 0);
        assert_eq!(sd.host_id().unwrap(), id);
        assert_eq!(StateDir::open(tmp.path()).unwrap().host_id().unwrap(), id);
        let text = fs::read_to_string(sd.path(HOSTID_FILE)).unwrap();
        assert_eq!(text, format!("{id:016x}\n"));
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from(HOSTID_FILE)]);
    }

    #[test]
    fn concurrent_host_id_creation_agrees() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::open(tmp.path()).unwrap();
        let ids: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| sd.host_id().unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|&id| id == ids[0]), "{ids:?}");
    }

    #[test]
    fn corrupt_host_id_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::open(tmp.path()).unwrap();
        for bad in ["", "zz\n", "0000000000000000\n"] {
            fs::write(sd.path(HOSTID_FILE), bad).unwrap();
            let err = sd.host_id().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains(HOSTID_FILE), "{err}");
        }
    }

    #[test]
    fn hostname_is_not_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::open(tmp.path()).unwrap();
        assert!(!sd.hostname().is_empty());
        assert_eq!(sd.hostname(), hostname());
    }

    fn entry(name: &str, guid: u64) -> CacheEntry {
        CacheEntry {
            name: name.to_string(),
            guid,
            leaves: vec![format!("/dev/{name}0"), format!("/srv/{name} 1.img")],
        }
    }

    #[test]
    fn cache_roundtrip() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::open(tmp.path()).unwrap();
        assert_eq!(sd.load_cache().unwrap(), Vec::new());
        let entries = vec![entry("tank", 1), entry("backup", u64::MAX)];
        sd.save_cache(&entries).unwrap();
        assert_eq!(sd.load_cache().unwrap(), entries);
        assert!(!sd.path(CACHE_TMP_FILE).exists());
        let mode = fs::metadata(sd.path(CACHE_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        // Overwrite with fewer entries.
        sd.save_cache(&entries[1..]).unwrap();
        assert_eq!(sd.load_cache().unwrap(), entries[1..].to_vec());
        sd.save_cache(&[]).unwrap();
        assert_eq!(sd.load_cache().unwrap(), Vec::new());
    }

    #[test]
    fn corrupt_cache_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::open(tmp.path()).unwrap();
        let path = sd.path(CACHE_FILE);
        for bad in [
            &b"{not json"[..],
            b"",
            b"[]",
            b"{\"version\":2,\"pools\":[]}",
        ] {
            fs::write(&path, bad).unwrap();
            let err = sd.load_cache().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }
    }

    #[test]
    fn cache_lock_is_exclusive() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::open(tmp.path()).unwrap();
        let lock = sd.lock_cache().unwrap();
        assert!(sd.try_lock_cache().unwrap().is_none());
        drop(lock);
        let again = sd.try_lock_cache().unwrap();
        assert!(again.is_some());
    }

    #[test]
    fn concurrent_updates_are_not_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::open(tmp.path()).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let sd = sd.clone();
                s.spawn(move || {
                    for i in 0..10u64 {
                        sd.update_cache(|e| e.push(entry(&format!("p{t}_{i}"), t * 100 + i)))
                            .unwrap();
                    }
                });
            }
        });
        let mut guids: Vec<u64> = sd.load_cache().unwrap().iter().map(|e| e.guid).collect();
        guids.sort_unstable();
        let want: Vec<u64> = (0..4)
            .flat_map(|t| (0..10).map(move |i| t * 100 + i))
            .collect();
        assert_eq!(guids, want);
    }

    #[test]
    fn update_cache_without_change_does_not_write() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::open(tmp.path()).unwrap();
        let n = sd.update_cache(|e| e.len()).unwrap();
        assert_eq!(n, 0);
        assert!(!sd.path(CACHE_FILE).exists());
    }

    #[test]
    fn random_values_differ() {
        let a = random_nonzero_u64().unwrap();
        let b = random_nonzero_u64().unwrap();
        assert_ne!(a, 0);
        assert_ne!(a, b);
    }
}
