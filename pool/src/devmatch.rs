//! Telling apart two devices that carry one leaf GUID (a copy of a leaf file next to the real one, e.g.
//! `cp --sparse=always d c`), for both the import listing ([`crate::import::scan`]) and the open
//! ([`crate::Pool::open_on`]): they must choose the same device, and the other is a duplicate that is
//! never opened as the leaf.
//!
//! The rule, in order: the device that took part in the newest txg; then the one whose device identity
//! (devid: file system and inode for a file, by-id for a disk) is the one the configuration records; then
//! the one at the recorded path; then the one with more valid labels; then the first in search order.
//! A copy made with `cp` has the same labels and txg as its source, but not its inode, so the identity
//! tells them apart.
//!
//! Invariant: a configuration never records one path for two leaves ([`check_distinct_paths`]); the
//! commit refuses such a configuration rather than writing it to the labels.

use cairn_vdev::config::PoolConfig;
use cairn_vdev::identity::{identify, LeafIdentity};
use cairn_vdev::Txg;
use std::collections::BTreeMap;
use std::path::Path;

/// How strongly a device claims to be a leaf; the greater claim wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Claim {
    /// The newest txg whose uberblock the device holds.
    pub txg: Txg,
    /// Its devid is the recorded one.
    pub same_device: bool,
    /// It is at the recorded path.
    pub same_path: bool,
    /// Valid labels on it.
    pub valid_labels: usize,
}

impl Claim {
    /// The claim of the device found at `path` on the leaf whose recorded identity is `recorded`.
    pub(crate) fn of(path: &Path, recorded: &LeafIdentity, txg: Txg, valid_labels: usize) -> Claim {
        let now = identify(path).ok();
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Claim {
            txg,
            same_device: now
                .as_ref()
                .is_some_and(|n| !recorded.devid.is_empty() && n.devid == recorded.devid),
            same_path: abs.to_string_lossy() == recorded.path,
            valid_labels,
        }
    }

    /// Why a device with this claim lost to `winner`, in a few words.
    pub(crate) fn why_not(&self, winner: &Claim) -> &'static str {
        if self.txg < winner.txg {
            "older copy"
        } else if !self.same_device && winner.same_device {
            "copy, not the recorded device"
        } else if !self.same_path && winner.same_path {
            "copy, not at the recorded path"
        } else if self.valid_labels < winner.valid_labels {
            "copy with fewer valid labels"
        } else {
            "identical copy"
        }
    }
}

/// Refuses a configuration that records one path for two leaves (opening that path would open one
/// device as two leaves). Returns the reason, naming the path.
pub fn check_distinct_paths(config: &PoolConfig) -> Result<(), String> {
    let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
    for t in &config.tops {
        for c in &t.children {
            if c.identity.path.is_empty() {
                continue;
            }
            if let Some(other) = seen.insert(c.identity.path.as_str(), c.guid.0) {
                return Err(format!(
                    "leaves {other} and {} would both be recorded at '{}' (refusing to record \
                     one path for two leaves)",
                    c.guid.0, c.identity.path
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_vdev::config::{
        LeafConfig, LeafFlags, PoolState, TopConfig, TopKind, CONFIG_VERSION,
    };
    use cairn_vdev::Guid;

    fn leaf(guid: u64, path: &str) -> LeafConfig {
        LeafConfig {
            guid: Guid(guid),
            identity: LeafIdentity {
                path: path.into(),
                phys_path: path.into(),
                devid: format!("file:ino={guid}"),
            },
            size: 1 << 27,
            create_txg: Txg(1),
            flags: LeafFlags::default(),
        }
    }

    fn config(children: Vec<LeafConfig>) -> PoolConfig {
        PoolConfig {
            version: CONFIG_VERSION,
            name: "tank".into(),
            pool_guid: Guid(1),
            state: PoolState::Active,
            config_txg: Txg(1),
            host_id: 0,
            hostname: String::new(),
            tops: vec![TopConfig {
                id: 0,
                guid: Guid(2),
                kind: TopKind::Mirror,
                asize: 1 << 26,
                create_txg: Txg(1),
                children,
            }],
        }
    }

    #[test]
    fn one_path_for_two_leaves_is_refused() {
        assert!(check_distinct_paths(&config(vec![leaf(3, "/l/c"), leaf(4, "/l/d")])).is_ok());
        let e = check_distinct_paths(&config(vec![leaf(3, "/l/c"), leaf(4, "/l/c")])).unwrap_err();
        assert!(
            e.contains("'/l/c'") && e.contains("3") && e.contains("4"),
            "{e}"
        );
    }

    #[test]
    fn claims_order_txg_then_identity() {
        let c = |txg, dev, path, labels| Claim {
            txg: Txg(txg),
            same_device: dev,
            same_path: path,
            valid_labels: labels,
        };
        assert!(c(5, false, false, 1) > c(4, true, true, 4));
        assert!(c(5, true, false, 4) > c(5, false, true, 4));
        assert!(c(5, false, true, 1) > c(5, false, false, 4));
        assert_eq!(
            c(4, true, true, 4).why_not(&c(5, false, false, 1)),
            "older copy"
        );
        assert_eq!(
            c(5, false, true, 4).why_not(&c(5, true, false, 4)),
            "copy, not the recorded device"
        );
    }
}
