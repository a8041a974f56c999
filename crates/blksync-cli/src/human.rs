//! Numbers as people read them, in one format everywhere (summaries, the bar, plain progress):
//! sizes and rates with one decimal in binary units, durations as `m:ss` or `h:mm:ss`, and
//! counts with the right singular or plural.

pub use blksync::size::{format_rate as rate, format_size as size};

/// `0:05`, `2:03`, `1:02:03`: a duration in seconds as a clock shows it (rounded to the second).
pub fn duration(seconds: f64) -> String {
    // Saturating float-to-int conversion: negative or NaN durations show as 0:00.
    #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
    let s = seconds.round().max(0.0) as u64;
    let (h, m, s) = (s / 3600, s % 3600 / 60, s % 60);
    if h > 0 { format!("{h}:{m:02}:{s:02}") } else { format!("{m}:{s:02}") }
}

/// `1 range`, `2 ranges`, `0 ranges`.
pub fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The time left at `rate` bytes per second for `remaining` bytes, or `?` before there is a
/// rate to go by.
pub fn eta(remaining: u64, rate: f64) -> String {
    if rate > 0.0 && rate.is_finite() { duration(remaining as f64 / rate) } else { "?".to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_clocks_not_raw_seconds() {
        assert_eq!(duration(0.0), "0:00");
        assert_eq!(duration(4.6), "0:05");
        assert_eq!(duration(59.4), "0:59");
        assert_eq!(duration(123.0), "2:03");
        assert_eq!(duration(3599.0), "59:59");
        assert_eq!(duration(3723.0), "1:02:03");
        assert_eq!(duration(100.0 * 3600.0), "100:00:00");
        assert_eq!(duration(-3.0), "0:00");
        assert_eq!(duration(f64::NAN), "0:00");
    }

    #[test]
    fn eta_is_unknown_without_a_rate() {
        assert_eq!(eta(1 << 30, 0.0), "?");
        assert_eq!(eta(1 << 30, f64::INFINITY), "?");
        assert_eq!(eta(600 << 20, f64::from(10 << 20)), "1:00");
        assert_eq!(eta(0, 1.0), "0:00");
    }

    #[test]
    fn counts_of_one_are_singular() {
        assert_eq!(count(1u64, "range", "ranges"), "1 range");
        assert_eq!(count(0u64, "range", "ranges"), "0 ranges");
        assert_eq!(count(2u64, "delta", "deltas"), "2 deltas");
        assert_eq!(count(1u32, "increment", "increments"), "1 increment");
    }

    #[test]
    fn sizes_and_rates_share_one_precision() {
        // indicatif's own {bytes} printed "512.00 MiB" next to our "1.2 GiB".
        assert_eq!(size(512 << 20), "512.0 MiB");
        assert_eq!(size(3 << 29), "1.5 GiB");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(rate(512 << 20, 1.0), "512.0 MiB/s");
        assert_eq!(rate(3 << 30, 2.0), "1.5 GiB/s");
        assert_eq!(rate(1, 0.0), "- B/s");
    }
}
