//! The three identities of a leaf (SPEC section 2): where it was given, where it really is, and what it is.
//!
//! - `path`: the path as the user gave it, made absolute against the current directory if it was relative,
//!   but with symlinks left unresolved (so `/dev/disk/by-id/...` stays readable in messages);
//! - `phys_path`: the canonical location: the realpath for a file; for a block device the
//!   `/dev/disk/by-path` link that resolves to the same device if there is one, else the realpath;
//! - `devid`: a stable identifier of the device itself, which survives renames and re-enumeration:
//!   for a block device the `/dev/disk/by-id` link resolving to it (`wwn-*` first, then the others in name
//!   order), else the sysfs WWID or serial, else `dev:MAJ:MIN`; for a regular file
//!   `file:fsid=<hex>:ino=<inode>` (or `file:dev=MAJ:MIN:ino=<inode>` when the file system reports no fsid),
//!   which is unchanged by a rename inside the same file system.
//!
//! Invariants: identification only reads (stat, readlink, sysfs); the choice among several candidate links
//! is deterministic (sorted by name), so the same device gives the same identity on every call.

use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The identities recorded for a leaf in the pool configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LeafIdentity {
    /// The path as given (absolute, symlinks unresolved).
    pub path: String,
    /// The canonical location (realpath, or a /dev/disk/by-path link for disks).
    pub phys_path: String,
    /// A stable device id (see the module docs).
    pub devid: String,
}

/// Works out the three identities of the leaf at `path`.
///
/// Errors: the stat of `path` fails (e.g. `NotFound`), or `path` is neither a regular file nor a block
/// device (`InvalidInput`).
pub fn identify(path: &Path) -> io::Result<LeafIdentity> {
    let abs = std::path::absolute(path)?;
    let meta = fs::metadata(&abs)?;
    let ft = meta.file_type();
    let (phys_path, devid) = if ft.is_block_device() {
        let rdev = meta.rdev();
        let real = fs::canonicalize(&abs)?;
        let phys = find_link_to(Path::new("/dev/disk/by-path"), rdev, |_| 0)
            .unwrap_or(real)
            .display()
            .to_string();
        (phys, block_devid(rdev))
    } else if ft.is_file() {
        let real = fs::canonicalize(&abs)?.display().to_string();
        (real, file_devid(&abs, &meta))
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a regular file or block device", abs.display()),
        ));
    };
    Ok(LeafIdentity {
        path: abs.display().to_string(),
        phys_path,
        devid,
    })
}

/// The devid of a block device with device number `rdev`.
fn block_devid(rdev: u64) -> String {
    // wwn-* names the medium itself; the others (ata-, nvme-, scsi-, usb-...) come next, in name order.
    let rank = |name: &str| if name.starts_with("wwn-") { 0 } else { 1 };
    if let Some(link) = find_link_to(Path::new("/dev/disk/by-id"), rdev, rank) {
        return link.display().to_string();
    }
    let (maj, min) = (major(rdev), minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
    if let Some(id) = sysfs_id(&sys.join("device")) {
        return id;
    }
    // A partition has no device/ of its own: use its disk's, qualified by the partition number.
    if let Some(part) = read_trimmed(&sys.join("partition")) {
        if let Some(id) = sysfs_id(&sys.join("..").join("device")) {
            return format!("{id}-part{part}");
        }
    }
    format!("dev:{maj}:{min}")
}

/// `wwid:<...>` or `serial:<...>` from a sysfs device directory, if either is present and non-empty.
fn sysfs_id(dev_dir: &Path) -> Option<String> {
    if let Some(w) = read_trimmed(&dev_dir.join("wwid")) {
        return Some(format!("wwid:{w}"));
    }
    read_trimmed(&dev_dir.join("serial")).map(|s| format!("serial:{s}"))
}

fn read_trimmed(p: &Path) -> Option<String> {
    let s = fs::read_to_string(p).ok()?;
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// The devid of a regular file: file system identity plus inode.
fn file_devid(path: &Path, meta: &fs::Metadata) -> String {
    let fsid = rustix::fs::statvfs(path).map(|s| s.f_fsid).unwrap_or(0);
    if fsid != 0 {
        format!("file:fsid={fsid:016x}:ino={}", meta.ino())
    } else {
        let dev = meta.dev();
        format!("file:dev={}:{}:ino={}", major(dev), minor(dev), meta.ino())
    }
}

/// The entry of `dir` (a directory of symlinks such as /dev/disk/by-id) that resolves to the block device
/// `rdev`; among several, the lowest `rank`, then the smallest name.
fn find_link_to(dir: &Path, rdev: u64, rank: impl Fn(&str) -> u32) -> Option<PathBuf> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
    names.into_iter().map(|n| dir.join(n)).find(|p| {
        fs::metadata(p)
            .map(|m| m.file_type().is_block_device() && m.rdev() == rdev)
            .unwrap_or(false)
    })
}

fn major(dev: u64) -> u32 {
    rustix::fs::major(dev as rustix::fs::Dev)
}

fn minor(dev: u64) -> u32 {
    rustix::fs::minor(dev as rustix::fs::Dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_identity_survives_rename() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        fs::write(&a, vec![0u8; 4096]).unwrap();
        let id_a = identify(&a).unwrap();
        assert_eq!(id_a.path, a.display().to_string());
        assert_eq!(
            id_a.phys_path,
            fs::canonicalize(&a).unwrap().display().to_string()
        );
        assert!(id_a.devid.starts_with("file:"), "{}", id_a.devid);
        assert!(id_a.devid.contains(":ino="), "{}", id_a.devid);

        let b = dir.path().join("b.img");
        fs::rename(&a, &b).unwrap();
        let id_b = identify(&b).unwrap();
        assert_eq!(id_b.devid, id_a.devid);
        assert_ne!(id_b.path, id_a.path);
        assert_eq!(id_b.path, b.display().to_string());
        assert_eq!(
            id_b.phys_path,
            fs::canonicalize(&b).unwrap().display().to_string()
        );
        // Stable across calls.
        assert_eq!(identify(&b).unwrap(), id_b);
    }

    #[test]
    fn different_files_have_different_devids() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::write(&a, b"x").unwrap();
        fs::write(&b, b"y").unwrap();
        assert_ne!(identify(&a).unwrap().devid, identify(&b).unwrap().devid);
    }

    #[test]
    fn symlink_kept_in_path_resolved_in_phys_path() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::write(&real, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let id = identify(&link).unwrap();
        assert_eq!(id.path, link.display().to_string());
        assert_eq!(
            id.phys_path,
            fs::canonicalize(&real).unwrap().display().to_string()
        );
        assert_eq!(id.devid, identify(&real).unwrap().devid);
    }

    #[test]
    fn relative_path_becomes_absolute() {
        // Reach a temp file from the current directory through `..` components, so that nothing is
        // created in the (shared) working directory and the current directory is not changed.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("leaf");
        fs::write(&file, b"x").unwrap();
        let cwd = std::env::current_dir().unwrap();
        let mut rel = PathBuf::new();
        for _ in cwd.components().skip(1) {
            rel.push("..");
        }
        rel.push(file.strip_prefix("/").unwrap());
        assert!(rel.is_relative());
        let id = identify(&rel).unwrap();
        let expect = std::env::current_dir().unwrap().join(&rel);
        assert!(Path::new(&id.path).is_absolute());
        assert_eq!(id.path, expect.display().to_string());
        assert_eq!(
            id.phys_path,
            fs::canonicalize(&rel).unwrap().display().to_string()
        );
    }

    #[test]
    fn errors_for_missing_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let e = identify(&dir.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = identify(dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn block_device_identity_if_available() {
        for cand in ["/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/loop0"] {
            let p = Path::new(cand);
            let Ok(meta) = fs::metadata(p) else { continue };
            if !meta.file_type().is_block_device() {
                continue;
            }
            let id = identify(p).unwrap();
            assert_eq!(id.path, cand);
            assert!(!id.phys_path.is_empty());
            assert!(!id.devid.is_empty());
            // Deterministic.
            assert_eq!(identify(p).unwrap(), id);
            return;
        }
    }
}
