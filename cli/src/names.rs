//! Pool and dataset name rules, after zpool/zfs (`pool_namecheck`,
//! `dataset_namecheck` and libzfs's `zpool_name_valid`).
//!
//! The reasons are worded as zpool words them, so that the CLI can print
//! `cannot create '<name>': <reason>`.

/// Longest pool or dataset name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Names that are vdev keywords in a `pool create` line and so cannot be
/// pool names.
const RESERVED_EXACT: [&str; 6] = ["mirror", "raidz", "draid", "spare", "log", "stripe"];

/// Prefixes that zpool reserves (`mirror2`, `raidz1`, `draid2:...`, `spares`).
const RESERVED_PREFIXES: [&str; 4] = ["mirror", "raidz", "draid", "spare"];

/// Characters allowed in a pool name besides ASCII alphanumerics.
fn pool_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | ' ')
}

/// Characters allowed in a dataset name component besides ASCII alphanumerics.
fn component_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')
}

/// Checks a pool name against zpool's rules.
///
/// A pool name begins with a letter, holds only ASCII alphanumerics, `_`,
/// `-`, `.`, `:` and spaces, is at most [`MAX_NAME_LEN`] bytes, is none of
/// the vdev keywords (`mirror`, `raidz`, `draid`, `spare`, `log`, `stripe`),
/// does not begin with `mirror`, `raidz`, `draid` or `spare`, and does not
/// look like a Solaris disk name (`c` followed by a digit).
///
/// The error is the reason alone, e.g. `name must begin with a letter`,
/// `invalid character '/' in pool name` or `name is reserved`.
pub fn validate_pool_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_LEN {
        return Err("name is too long".to_string());
    }
    if let Some(bad) = name.chars().find(|&c| !pool_char_ok(c)) {
        return Err(format!(
            "invalid character '{}' in pool name",
            bad.escape_debug()
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err("name must begin with a letter".to_string());
    }
    if RESERVED_EXACT.contains(&name) || RESERVED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Err("name is reserved".to_string());
    }
    let mut chars = name.chars();
    if chars.next() == Some('c') && chars.next().is_some_and(|c| c.is_ascii_digit()) {
        return Err("pool name is reserved".to_string());
    }
    Ok(())
}

/// Checks a dataset name `POOL/NAME[/NAME...]` and splits it into the pool
/// name and the rest (`"tank/vols/a"` gives `("tank", "vols/a")`).
///
/// The pool part follows [`validate_pool_name`]; every later component is
/// non-empty, holds only ASCII alphanumerics, `_`, `-`, `.` and `:`, and is
/// neither `.` nor `..`. The whole name is at most [`MAX_NAME_LEN`] bytes.
/// Snapshot (`@`) and bookmark (`#`) delimiters are rejected: this is for
/// plain dataset names.
/// `POOL/VOL@SNAP`: the volume part as [`validate_dataset_name`], one `@`, and a snapshot name of
/// the same characters. Returns (pool, volume, snapshot).
pub fn validate_snapshot_name(name: &str) -> Result<(String, String, String), String> {
    if name.len() > MAX_NAME_LEN {
        return Err("name is too long".to_string());
    }
    let Some((vol, snap)) = name.split_once('@') else {
        return Err("missing '@' delimiter in snapshot name".to_string());
    };
    let (pool, v) = validate_dataset_name(vol)?;
    if snap.is_empty() {
        return Err("empty snapshot name".to_string());
    }
    if let Some(bad) = snap.chars().find(|&c| !component_char_ok(c)) {
        return Err(match bad {
            '@' => "multiple '@' delimiters in name".to_string(),
            _ => format!(
                "invalid character '{}' in snapshot name",
                bad.escape_debug()
            ),
        });
    }
    Ok((pool, v, snap.to_string()))
}

/// A volume or snapshot name; returns the pool.
pub fn validate_any_name(name: &str) -> Result<String, String> {
    if name.contains('@') {
        validate_snapshot_name(name).map(|(p, _, _)| p)
    } else {
        validate_dataset_name(name).map(|(p, _)| p)
    }
}

pub fn validate_dataset_name(name: &str) -> Result<(String, String), String> {
    if name.is_empty() {
        return Err("empty name".to_string());
    }
    if name.len() > MAX_NAME_LEN {
        return Err("name is too long".to_string());
    }
    if name.starts_with('/') {
        return Err("leading slash in name".to_string());
    }
    let (pool, rest) = match name.split_once('/') {
        Some((pool, rest)) => (pool, Some(rest)),
        None => (name, None),
    };
    validate_pool_name(pool)?;
    let Some(rest) = rest else {
        return Err("missing dataset name".to_string());
    };
    if rest.is_empty() || rest.ends_with('/') {
        return Err("trailing slash in name".to_string());
    }
    for component in rest.split('/') {
        if component.is_empty() {
            return Err("empty component in name".to_string());
        }
        if let Some(bad) = component.chars().find(|&c| !component_char_ok(c)) {
            return Err(match bad {
                '@' => "snapshot delimiter '@' is not expected here".to_string(),
                '#' => "bookmark delimiter '#' is not expected here".to_string(),
                _ => format!("invalid character '{}' in name", bad.escape_debug()),
            });
        }
        if component == "." {
            return Err("self reference, '.' is found in name".to_string());
        }
        if component == ".." {
            return Err("parent reference, '..' is found in name".to_string());
        }
    }
    Ok((pool.to_string(), rest.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_err(name: &str) -> String {
        validate_pool_name(name).expect_err(name)
    }

    #[test]
    fn good_pool_names() {
        for name in [
            "tank",
            "Tank",
            "t",
            "tank0",
            "my_pool-1.2:3",
            "my pool",
            "logs",
            "stripes",
            "striped",
            "cache",
            "c",
            "ca1",
            "Mirror",
            "RAIDZ",
            "a_mirror",
        ] {
            assert_eq!(validate_pool_name(name), Ok(()), "{name}");
        }
        assert_eq!(validate_pool_name(&"a".repeat(MAX_NAME_LEN)), Ok(()));
    }

    #[test]
    fn pool_name_must_begin_with_a_letter() {
        for name in ["", "1tank", "_tank", "-tank", ".tank", " tank", ":x"] {
            assert_eq!(pool_err(name), "name must begin with a letter", "{name:?}");
        }
    }

    #[test]
    fn pool_name_invalid_characters() {
        assert_eq!(pool_err("tank/a"), "invalid character '/' in pool name");
        assert_eq!(pool_err("tank@s"), "invalid character '@' in pool name");
        assert_eq!(pool_err("tank%"), "invalid character '%' in pool name");
        assert_eq!(pool_err("/tank"), "invalid character '/' in pool name");
        assert_eq!(
            pool_err("t\u{e9}"),
            "invalid character '\u{e9}' in pool name"
        );
        assert_eq!(pool_err("a\nb"), "invalid character '\\n' in pool name");
        assert_eq!(pool_err("a\0b"), "invalid character '\\0' in pool name");
    }

    #[test]
    fn reserved_pool_names() {
        for name in [
            "mirror", "raidz", "draid", "spare", "log", "stripe", "mirror1", "mirrored", "raidz2",
            "draid1", "spares", "spare-a",
        ] {
            assert_eq!(pool_err(name), "name is reserved", "{name}");
        }
        for name in ["c0", "c1t0d0", "c9pool"] {
            assert_eq!(pool_err(name), "pool name is reserved", "{name}");
        }
    }

    #[test]
    fn pool_name_length() {
        assert_eq!(pool_err(&"a".repeat(MAX_NAME_LEN + 1)), "name is too long");
    }

    #[test]
    fn good_dataset_names() {
        assert_eq!(
            validate_dataset_name("tank/vol"),
            Ok(("tank".to_string(), "vol".to_string()))
        );
        assert_eq!(
            validate_dataset_name("tank/a/b-c_d.e:f"),
            Ok(("tank".to_string(), "a/b-c_d.e:f".to_string()))
        );
        assert_eq!(
            validate_dataset_name("my pool/v"),
            Ok(("my pool".to_string(), "v".to_string()))
        );
        assert_eq!(
            validate_dataset_name("tank/.hidden/..x"),
            Ok(("tank".to_string(), ".hidden/..x".to_string()))
        );
    }

    #[test]
    fn bad_dataset_names() {
        let cases: &[(&str, &str)] = &[
            ("", "empty name"),
            ("tank", "missing dataset name"),
            ("/tank/v", "leading slash in name"),
            ("tank/", "trailing slash in name"),
            ("tank/v/", "trailing slash in name"),
            ("tank//v", "empty component in name"),
            ("tank/a b", "invalid character ' ' in name"),
            ("tank/v%x", "invalid character '%' in name"),
            ("tank/v@snap", "snapshot delimiter '@' is not expected here"),
            ("tank/v#bm", "bookmark delimiter '#' is not expected here"),
            ("tank/./v", "self reference, '.' is found in name"),
            ("tank/..", "parent reference, '..' is found in name"),
            ("1tank/v", "name must begin with a letter"),
            ("mirror/v", "name is reserved"),
            ("ta@nk/v", "invalid character '@' in pool name"),
        ];
        for &(name, want) in cases {
            assert_eq!(validate_dataset_name(name), Err(want.to_string()), "{name}");
        }
        let long = format!("tank/{}", "v".repeat(MAX_NAME_LEN));
        assert_eq!(
            validate_dataset_name(&long),
            Err("name is too long".to_string())
        );
        let max = format!("tank/{}", "v".repeat(MAX_NAME_LEN - 5));
        assert!(validate_dataset_name(&max).is_ok());
    }
}
