//! Byte sizes as humans write them on a command line (`4K`, `1M`, `10G`, `1.5T`) and as we print
//! them back.
//!
//! Suffixes are binary (K = 1024), as in `dd`, `truncate` and `qemu-img`: nobody sizing a disk
//! image means 1000. `KiB` and `KB` are accepted as synonyms of `K` for the same reason.

use crate::error::{Error, Result};

const UNITS: [(&str, u32); 7] = [("", 0), ("K", 10), ("M", 20), ("G", 30), ("T", 40), ("P", 50), ("E", 60)];

/// Parses a size such as `4096`, `4K`, `1M`, `1.5G`, `2TiB`, `512B`.
pub fn parse_size(text: &str) -> Result<u64> {
    let bad =
        || Error::usage(format!("invalid size {text:?}: expected a number with an optional K, M, G, T, P or E suffix"));
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    if number.is_empty() {
        return Err(bad());
    }
    let suffix = suffix.trim().to_ascii_uppercase();
    let suffix = suffix
        .strip_suffix("IB")
        .or_else(|| suffix.strip_suffix('B').filter(|s| !s.is_empty()))
        .unwrap_or(if suffix == "B" { "" } else { &suffix });
    let shift = UNITS.iter().find(|(name, _)| *name == suffix).map(|(_, s)| *s).ok_or_else(bad)?;
    let too_big = || Error::usage(format!("size {text:?} is too large"));
    if let Some((whole, frac)) = number.split_once('.') {
        if frac.contains('.') || (whole.is_empty() && frac.is_empty()) {
            return Err(bad());
        }
        // Exact decimal arithmetic: "1.5G" must be 1610612736, not a float rounding away from it.
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| too_big())? };
        let digits = frac.len() as u32;
        if digits > 18 {
            return Err(bad());
        }
        let frac_value: u128 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| bad())? };
        let scale = 10u128.pow(digits);
        let total = (whole.checked_mul(scale).ok_or_else(too_big)? + frac_value)
            .checked_mul(1u128 << shift)
            .ok_or_else(too_big)?;
        if total % scale != 0 {
            return Err(Error::usage(format!("size {text:?} is not a whole number of bytes")));
        }
        u64::try_from(total / scale).map_err(|_| too_big())
    } else {
        let value: u64 = number.parse().map_err(|_| too_big())?;
        value.checked_mul(1u64 << shift).ok_or_else(too_big)
    }
}

/// Formats a byte count for humans: `0 B`, `512 B`, `4.0 KiB`, `1.5 GiB`.
#[must_use]
pub fn format_size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let units = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

/// Formats `bytes` moved in `seconds` as a rate: `1.2 GiB/s`.
#[must_use]
pub fn format_rate(bytes: u64, seconds: f64) -> String {
    if seconds <= 0.0 {
        return "- B/s".to_string();
    }
    // Saturating float-to-int conversion; rates are never negative.
    #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
    let per_second = (bytes as f64 / seconds) as u64;
    format!("{}/s", format_size(per_second))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512B").unwrap(), 512);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("4KB").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size(".5K").unwrap(), 512);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("15E").unwrap(), 15 << 60);
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "K", "-1", "1X", "1.2.3", ".", "16E", "99999999999999999999", "0.3B", "1 K B"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn formats_binary_units() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(4096), "4.0 KiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(u64::MAX), "16.0 EiB");
    }

    proptest! {
        #[test]
        fn plain_numbers_round_trip(n in any::<u64>()) {
            prop_assert_eq!(parse_size(&n.to_string()).unwrap(), n);
        }

        #[test]
        fn suffix_multiplies(n in 0u64..1_000_000, unit in 0usize..5) {
            let (name, shift) = UNITS[unit];
            prop_assert_eq!(parse_size(&format!("{n}{name}")).unwrap(), n << shift);
        }

        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = parse_size(&s);
        }
    }
}
