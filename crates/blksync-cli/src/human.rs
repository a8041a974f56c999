//! Numbers as people read them, in one format everywhere: sizes and rates with one decimal in
//! binary units, and counts with the right singular or plural.

pub use blksync::size::{format_rate as rate, format_size as size};

/// `1 range`, `2 ranges`, `0 ranges`.
pub fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

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
