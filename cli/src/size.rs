//! Sizes as zpool/zfs read and print them.
//!
//! Parsing follows `zfs_nicestrtonum`: every suffix is a power of 1024
//! (`K`, `M`, `G`, `T`, `P`, `E`), optionally followed by `B` or `iB`, in
//! any case; a bare `B` means bytes; decimals are allowed and the result is
//! rounded down to a whole byte. Unlike the popular crates (bytesize,
//! byte-unit), `10G` is 10 GiB here, as zfs means it.
//!
//! Printing follows OpenZFS's `zfs_nicenum_format`: below 1024 the plain
//! integer; exact multiples of the unit without decimals (`960M`, `100G`);
//! otherwise the most decimals (2, 1 or 0) that keep the text within five
//! characters (`1.50K`, `10.5G`, `10.0K` for 10239 bytes, `1024K`).

/// Unit letters, index `i` meaning `1024^i`. Index 0 is the plain number.
const UNITS: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];

/// Parses a zfs-style size into bytes.
///
/// Accepted: `4096`, `4096B`, `8K`, `8k`, `8KB`, `8KiB`, `1.5G`, `.5T`. Each of
/// K, M, G, T, P and E is a power of 1024. A fraction is rounded down to a
/// whole byte (`1.5` is 1 byte, as in zfs). Negative numbers, unknown
/// suffixes and values above `u64::MAX` are errors, worded as
/// `invalid size '12Q': unknown suffix 'Q'`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = |why: &str| format!("invalid size '{s}': {why}");
    let t = s.trim();
    if t.is_empty() {
        return Err(err("empty value"));
    }
    if t.starts_with('-') {
        return Err(err("negative sizes are not allowed"));
    }

    // Split into integer digits, fraction digits and the suffix.
    let bytes = t.as_bytes();
    let int_end = bytes
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(bytes.len());
    let int_digits = &t[..int_end];
    let mut rest = &t[int_end..];
    let mut frac_digits = "";
    if let Some(after_dot) = rest.strip_prefix('.') {
        let frac_end = after_dot
            .bytes()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(after_dot.len());
        frac_digits = &after_dot[..frac_end];
        rest = &after_dot[frac_end..];
    }
    if int_digits.is_empty() && frac_digits.is_empty() {
        return Err(err("not a number"));
    }

    let shift = suffix_shift(rest).ok_or_else(|| err(&format!("unknown suffix '{rest}'")))?;
    let mult: u128 = 1u128 << shift;

    let too_large = || err("value too large");
    let mut int_value: u128 = 0;
    for d in int_digits.bytes() {
        int_value = int_value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u128::from(d - b'0')))
            .ok_or_else(too_large)?;
    }
    let whole = int_value.checked_mul(mult).ok_or_else(too_large)?;

    // floor(0.d1d2...dn * mult), exactly: Horner's rule from the last digit,
    // taking the floor at every step (floor(floor(y)/10) == floor(y/10)).
    // The accumulator stays below `mult`, so this never overflows.
    let mut frac_value: u128 = 0;
    for d in frac_digits.bytes().rev() {
        frac_value = (u128::from(d - b'0') * mult + frac_value) / 10;
    }

    let total = whole.checked_add(frac_value).ok_or_else(too_large)?;
    u64::try_from(total).map_err(|_| too_large())
}

/// The power-of-two shift a suffix stands for, or `None` if it is unknown.
///
/// `""` and `"B"` are bytes; `X`, `XB` and `XiB` (any case) for X in
/// K, M, G, T, P, E. `BB` and `BiB` are rejected, as zfs does.
fn suffix_shift(suffix: &str) -> Option<u32> {
    if suffix.is_empty() || suffix.eq_ignore_ascii_case("b") {
        return Some(0);
    }
    let mut chars = suffix.chars();
    let letter = chars.next()?.to_ascii_uppercase();
    let index = UNITS[1..]
        .iter()
        .position(|u| u.starts_with(letter))
        .and_then(|i| u32::try_from(i + 1).ok())?;
    let tail = chars.as_str();
    if tail.is_empty() || tail.eq_ignore_ascii_case("b") || tail.eq_ignore_ascii_case("ib") {
        Some(10 * index)
    } else {
        None
    }
}

/// Formats a byte count the way `zpool list` / `zfs list` print sizes:
/// `0`, `512`, `1K`, `1.50K`, `960M`, `1.88G`, `10.0G`, `100G`, `1.00T`.
pub fn format_compact(bytes: u64) -> String {
    nicenum(bytes, "")
}

/// Like [`format_compact`], but plain byte counts carry a `B` (`0B`,
/// `512B`), as in the `scan:` line of `zpool status`. Larger values are
/// identical to [`format_compact`] (`1.50K`, `10G`).
pub fn format_bytes_b(bytes: u64) -> String {
    nicenum(bytes, "B")
}

/// OpenZFS's nicenum: `zero_unit` is the suffix for values below 1024.
fn nicenum(num: u64, zero_unit: &str) -> String {
    let mut index = 0usize;
    let mut n = num;
    while n >= 1024 && index < UNITS.len() - 1 {
        n /= 1024;
        index += 1;
    }
    if index == 0 {
        return format!("{num}{zero_unit}");
    }
    let unit = UNITS[index];
    let divisor = 1u64 << (10 * index);
    if num.is_multiple_of(divisor) {
        return format!("{n}{unit}");
    }
    // The most precision that fits in five characters, as zfs tries 2, 1, 0.
    // The u64 -> f64 conversions match the C code's (double) casts.
    let val = num as f64 / divisor as f64;
    let mut text = String::new();
    for decimals in (0..=2usize).rev() {
        text = format!("{val:.decimals$}{unit}");
        if text.len() <= 5 {
            break;
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;
    const M: u64 = K * 1024;
    const G: u64 = M * 1024;
    const T: u64 = G * 1024;
    const P: u64 = T * 1024;
    const E: u64 = P * 1024;

    #[test]
    fn parses_plain_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("4096b"), Ok(4096));
        assert_eq!(parse_size(" 512 "), Ok(512));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn parses_every_suffix_form() {
        for (suffix, mult) in [("K", K), ("M", M), ("G", G), ("T", T), ("P", P), ("E", E)] {
            let lower = suffix.to_ascii_lowercase();
            for form in [
                suffix.to_string(),
                lower.clone(),
                format!("{suffix}B"),
                format!("{lower}b"),
                format!("{suffix}iB"),
                format!("{lower}ib"),
                format!("{suffix}IB"),
            ] {
                assert_eq!(parse_size(&format!("3{form}")), Ok(3 * mult), "3{form}");
            }
        }
        assert_eq!(parse_size("1GiB"), Ok(G));
        assert_eq!(parse_size("10G"), Ok(10 * G));
    }

    #[test]
    fn parses_decimals_rounding_down() {
        assert_eq!(parse_size("1.5G"), Ok(1_610_612_736));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size(".5K"), Ok(512));
        assert_eq!(parse_size("0.5k"), Ok(512));
        assert_eq!(parse_size("2."), Ok(2));
        assert_eq!(parse_size("1.5"), Ok(1));
        assert_eq!(parse_size("1.999"), Ok(1));
        // 0.1 KiB = 102.4 bytes -> 102.
        assert_eq!(parse_size("0.1K"), Ok(102));
        // 1/3 of an EiB, digit by digit, stays exact and rounds down.
        assert_eq!(
            parse_size("0.333333333333333333333333333E"),
            Ok(384_307_168_202_282_325)
        );
        // Trailing zeros in a long fraction change nothing.
        assert_eq!(
            parse_size("1.50000000000000000000000000000000000000000G"),
            Ok(1_610_612_736)
        );
        assert_eq!(parse_size("15.9999999999999999999999E"), Ok(u64::MAX));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(
            parse_size("12Q").unwrap_err(),
            "invalid size '12Q': unknown suffix 'Q'"
        );
        assert_eq!(
            parse_size("10Q").unwrap_err(),
            "invalid size '10Q': unknown suffix 'Q'"
        );
        assert!(parse_size("-1G").unwrap_err().contains("negative"));
        assert!(parse_size("").unwrap_err().starts_with("invalid size ''"));
        assert!(parse_size("   ").is_err());
        assert!(parse_size("G").unwrap_err().contains("not a number"));
        assert!(parse_size(".").unwrap_err().contains("not a number"));
        assert!(parse_size("+5").is_err());
        assert!(parse_size("1 G").is_err());
        assert!(parse_size("1.2.3G").is_err());
        assert!(parse_size("1GBB").is_err());
        assert!(parse_size("1BiB").is_err());
        assert!(parse_size("1BB").is_err());
        assert!(parse_size("1KiBx").is_err());
        assert!(parse_size("1Z").is_err());
        assert!(parse_size("0x10").is_err());
        assert!(parse_size("1e3").is_err());
        assert!(parse_size("١٢").is_err());
        assert!(parse_size("1\u{e9}")
            .unwrap_err()
            .contains("unknown suffix"));
    }

    #[test]
    fn overflow_is_an_error() {
        assert!(parse_size("16E").unwrap_err().contains("too large"));
        assert!(parse_size("18446744073709551616")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("99999999999999999999999999999999999999999999").is_err());
        assert!(parse_size("17179869184G").is_err());
        assert_eq!(parse_size("17179869183G"), Ok(17_179_869_183 * G));
        assert!(
            parse_size("15.99999999999999999999999999999999999999999999999999999999999999E")
                .is_ok()
        );
    }

    #[test]
    fn compact_matches_zpool() {
        let cases: &[(u64, &str)] = &[
            (0, "0"),
            (1, "1"),
            (512, "512"),
            (1023, "1023"),
            (1024, "1K"),
            (1536, "1.50K"),
            // Exact ties round half to even, as C's printf does.
            (1152, "1.12K"),
            (1408, "1.38K"),
            (102_912, "100K"),
            (103_936, "102K"),
            (10239, "10.0K"),
            (10 * K + 512, "10.5K"),
            (110 * K, "110K"),
            (110 * K + 300, "110K"),
            (1023 * K + 1000, "1024K"),
            (960 * M, "960M"),
            (2_018_634_629, "1.88G"),
            (10 * G, "10G"),
            (10 * G + 40 * M, "10.0G"),
            (10 * G + G / 2, "10.5G"),
            (100 * G, "100G"),
            (9 * G + G / 2, "9.50G"),
            (T + T / 1000, "1.00T"),
            (T, "1T"),
            (E, "1E"),
            (u64::MAX, "16.0E"),
        ];
        for &(bytes, want) in cases {
            assert_eq!(format_compact(bytes), want, "{bytes}");
        }
    }

    #[test]
    fn bytes_b_only_differs_below_1k() {
        assert_eq!(format_bytes_b(0), "0B");
        assert_eq!(format_bytes_b(512), "512B");
        assert_eq!(format_bytes_b(1023), "1023B");
        assert_eq!(format_bytes_b(1024), "1K");
        assert_eq!(format_bytes_b(1536), "1.50K");
        assert_eq!(format_bytes_b(10 * G), "10G");
    }

    #[test]
    fn compact_never_exceeds_five_chars_above_1k_and_roundtrips_roughly() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = x >> (x % 64);
            let s = format_compact(v);
            if v >= 1024 {
                assert!(s.len() <= 5, "{v} -> {s}");
            }
            // Only values that round up to 16.0E cannot be read back.
            let Ok(back) = parse_size(&s) else {
                assert_eq!(s, "16.0E", "{v}");
                continue;
            };
            // Three significant digits: within 0.5% (plus rounding) of the value.
            let diff = back.abs_diff(v);
            assert!(diff <= v / 100 + 1, "{v} -> {s} -> {back}");
        }
    }

    #[test]
    fn exact_format_roundtrip() {
        for v in [0, 1, 1023, K, 3 * M, 960 * M, 7 * G, 100 * T, 2 * P, 15 * E] {
            assert_eq!(parse_size(&format_compact(v)), Ok(v));
        }
    }
}
