//! Random ids and keys, and the creation time stamped on what blksync writes.

use crate::error::{Error, ErrorKind, Result};

/// `N` random bytes, from the kernel.
pub fn random<const N: usize>() -> Result<[u8; N]> {
    use std::io::Read;
    let mut id = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(|e| Error::new(ErrorKind::Io, format!("reading /dev/urandom: {e}")))?;
    Ok(id)
}

/// Seconds since the epoch and the local UTC offset, from `date` semantics without a time-zone
/// database: the offset is what `localtime_r` says, via the `TZ`-aware `date +%z`.
#[must_use]
pub fn now() -> (i64, i32) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let offset = std::process::Command::new("date")
        .arg("+%z")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|z| {
            let z = z.trim();
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let digits = z.trim_start_matches(['+', '-']);
            let hours: i32 = digits.get(..2)?.parse().ok()?;
            let minutes: i32 = digits.get(2..4)?.parse().ok()?;
            Some(sign * (hours * 3600 + minutes * 60))
        })
        .unwrap_or(0);
    (secs, offset)
}

/// A random 16-byte id (a delta, a backup point).
pub fn random_id() -> Result<[u8; 16]> {
    random()
}

/// Lower-case hex of an id (or any bytes).
#[must_use]
pub fn to_hex(v: &[u8]) -> String {
    use std::fmt::Write as _;
    v.iter().fold(String::with_capacity(32), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}
