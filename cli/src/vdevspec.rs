//! Parsing of the VDEV_SPEC words of `cairn pool create` and `cairn pool add`.
//!
//! ```text
//! VDEV_SPEC: mirror LEAF LEAF... | stripe LEAF... | LEAF      (repeated)
//! ```
//!
//! As in zpool, a keyword opens a group that runs up to the next keyword
//! (`mirror a b c` is a 3-way mirror), and a leaf outside any group, which
//! can only be before the first keyword, is a top-level vdev of its own:
//! `a b mirror c d stripe e f` gives `a`, `b`, `mirror(c, d)`, `stripe(e, f)`.
//!
//! Leaf paths are kept exactly as given; resolving relative paths and
//! finding duplicates (on canonical paths) is the pool layer's job.

use std::path::PathBuf;

/// The kind of a top-level vdev in a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecKind {
    /// One leaf, used directly as a top-level vdev.
    Single,
    /// `mirror`: every child holds every block (at least 2 children).
    Mirror,
    /// `stripe`: a fixed chunk interleave over the children (at least 1).
    Stripe,
}

/// One top-level vdev of a spec, with its leaves as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopSpec {
    /// Mirror, stripe or a single leaf.
    pub kind: SpecKind,
    /// The leaf paths, unresolved. A `Single` has exactly one.
    pub leaves: Vec<PathBuf>,
}

/// zpool vdev types that Cairn does not implement. They are rejected rather
/// than taken for file names (`raidz a b c` would otherwise create a leaf
/// called `raidz`); a file of such a name can be given as `./raidz`.
const UNSUPPORTED: [&str; 7] = [
    "raidz", "draid", "spare", "log", "cache", "special", "dedup",
];

fn keyword(word: &str) -> Option<SpecKind> {
    match word {
        "mirror" => Some(SpecKind::Mirror),
        "stripe" => Some(SpecKind::Stripe),
        _ => None,
    }
}

fn is_unsupported(word: &str) -> bool {
    UNSUPPORTED.iter().any(|u| match word.strip_prefix(u) {
        Some("") => true,
        // raidz1..3, draid2, draid:4d:1s, draid2:4d:12c:1s.
        Some(tail) if matches!(*u, "raidz" | "draid") => {
            tail.starts_with(|c: char| c.is_ascii_digit() || (*u == "draid" && c == ':'))
        }
        _ => false,
    })
}

fn check_group(kind: &SpecKind, name: &str, count: usize) -> Result<(), String> {
    match kind {
        SpecKind::Mirror if count < 2 => Err(format!("{name} requires at least 2 devices")),
        SpecKind::Stripe if count < 1 => Err(format!("{name} requires at least 1 device")),
        _ => Ok(()),
    }
}

/// Parses VDEV_SPEC words into top-level vdev specs, in order.
///
/// Errors: an empty spec (`missing vdev specification`), a mirror with
/// fewer than 2 leaves (`mirror requires at least 2 devices`), a stripe
/// with none (`stripe requires at least 1 device`), a keyword right after
/// another keyword, an empty leaf word, and zpool vdev types Cairn does not
/// support (`raidz`, `draid`, `spare`, `log`, `cache`, `special`, `dedup`).
pub fn parse_vdev_spec(words: &[String]) -> Result<Vec<TopSpec>, String> {
    if words.is_empty() {
        return Err("missing vdev specification".to_string());
    }
    let mut tops: Vec<TopSpec> = Vec::new();
    // The open group, with the keyword that opened it.
    let mut group: Option<(&str, TopSpec)> = None;

    for word in words {
        let word = word.as_str();
        if let Some(kind) = keyword(word) {
            if let Some((open, top)) = group.take() {
                if top.leaves.is_empty() {
                    return Err(format!(
                        "invalid vdev specification: '{open}' must be followed by devices, not '{word}'"
                    ));
                }
                check_group(&top.kind, open, top.leaves.len())?;
                tops.push(top);
            }
            group = Some((
                word,
                TopSpec {
                    kind,
                    leaves: Vec::new(),
                },
            ));
            continue;
        }
        if is_unsupported(word) {
            return Err(format!(
                "invalid vdev specification: unsupported vdev type '{word}' \
                 (write './{word}' for a file of that name)"
            ));
        }
        if word.is_empty() {
            return Err("invalid vdev specification: empty device name".to_string());
        }
        let leaf = PathBuf::from(word);
        match group.as_mut() {
            Some((_, top)) => top.leaves.push(leaf),
            None => tops.push(TopSpec {
                kind: SpecKind::Single,
                leaves: vec![leaf],
            }),
        }
    }
    if let Some((open, top)) = group {
        check_group(&top.kind, open, top.leaves.len())?;
        tops.push(top);
    }
    Ok(tops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn top(kind: SpecKind, leaves: &[&str]) -> TopSpec {
        TopSpec {
            kind,
            leaves: leaves.iter().map(PathBuf::from).collect(),
        }
    }

    #[test]
    fn single_leaves_are_their_own_top_level_vdevs() {
        assert_eq!(
            parse_vdev_spec(&words("a /tmp/b ./c")),
            Ok(vec![
                top(SpecKind::Single, &["a"]),
                top(SpecKind::Single, &["/tmp/b"]),
                top(SpecKind::Single, &["./c"]),
            ])
        );
    }

    #[test]
    fn raid10_and_mixed() {
        assert_eq!(
            parse_vdev_spec(&words("mirror a b mirror c d")),
            Ok(vec![
                top(SpecKind::Mirror, &["a", "b"]),
                top(SpecKind::Mirror, &["c", "d"]),
            ])
        );
        assert_eq!(
            parse_vdev_spec(&words("x mirror a b c stripe d stripe e f")),
            Ok(vec![
                top(SpecKind::Single, &["x"]),
                top(SpecKind::Mirror, &["a", "b", "c"]),
                top(SpecKind::Stripe, &["d"]),
                top(SpecKind::Stripe, &["e", "f"]),
            ])
        );
    }

    #[test]
    fn leaves_are_kept_as_given() {
        let spec = vec!["my disk.img".to_string(), "../x//y".to_string()];
        assert_eq!(
            parse_vdev_spec(&spec),
            Ok(vec![
                top(SpecKind::Single, &["my disk.img"]),
                top(SpecKind::Single, &["../x//y"]),
            ])
        );
        // Duplicates are the pool layer's business.
        assert_eq!(
            parse_vdev_spec(&words("mirror a a")).map(|t| t.len()),
            Ok(1)
        );
    }

    #[test]
    fn errors() {
        let err = |s: &str| parse_vdev_spec(&words(s)).unwrap_err();
        assert_eq!(err(""), "missing vdev specification");
        assert_eq!(err("mirror"), "mirror requires at least 2 devices");
        assert_eq!(err("mirror a"), "mirror requires at least 2 devices");
        assert_eq!(
            err("mirror a b mirror c"),
            "mirror requires at least 2 devices"
        );
        assert_eq!(
            err("mirror a stripe b"),
            "mirror requires at least 2 devices"
        );
        assert_eq!(err("stripe"), "stripe requires at least 1 device");
        assert_eq!(err("a stripe"), "stripe requires at least 1 device");
        assert_eq!(
            err("mirror stripe a b"),
            "invalid vdev specification: 'mirror' must be followed by devices, not 'stripe'"
        );
        assert_eq!(
            err("stripe mirror a b"),
            "invalid vdev specification: 'stripe' must be followed by devices, not 'mirror'"
        );
        assert_eq!(
            err("mirror mirror a b"),
            "invalid vdev specification: 'mirror' must be followed by devices, not 'mirror'"
        );
        assert_eq!(
            err("raidz a b c"),
            "invalid vdev specification: unsupported vdev type 'raidz' \
             (write './raidz' for a file of that name)"
        );
        assert!(err("draid:4d a b").contains("unsupported"));
        assert_eq!(parse_vdev_spec(&words("./raidz")).map(|t| t.len()), Ok(1));
        assert!(err("raidz2 a b c").contains("unsupported vdev type 'raidz2'"));
        assert!(err("mirror a b log c").contains("unsupported vdev type 'log'"));
        assert!(err("a spare b").contains("unsupported"));
        assert!(err("draid2:4d:1s a b").contains("unsupported"));
        assert_eq!(
            parse_vdev_spec(&[String::new()]).unwrap_err(),
            "invalid vdev specification: empty device name"
        );
    }

    #[test]
    fn names_that_only_look_like_keywords_are_leaves() {
        assert_eq!(
            parse_vdev_spec(&words("mirrors logs raidzx Mirror")),
            Ok(vec![
                top(SpecKind::Single, &["mirrors"]),
                top(SpecKind::Single, &["logs"]),
                top(SpecKind::Single, &["raidzx"]),
                top(SpecKind::Single, &["Mirror"]),
            ])
        );
    }
}
