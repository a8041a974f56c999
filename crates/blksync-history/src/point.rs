//! Naming a point of a chain: the newest, a number, or a time, and how a time is shown.

use serde::{Deserialize, Serialize};

use crate::chain::Chain;
use crate::error::{Error, Result};

/// Which point to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum At {
    /// The newest.
    Latest,
    /// Point number N.
    Number(u64),
    /// The newest point created at or before this time (seconds since the epoch).
    Time(i64),
}

/// The point `at` names, refusing a point at or after a break in the chain: "the newest" of a
/// broken chain is lost, and restoring the last good point instead would be a silent lie.
pub fn point(chain: &Chain, at: At) -> Result<u64> {
    if let Some(b) = &chain.broken {
        let lost = match at {
            At::Latest => true,
            At::Number(n) => n >= b.first_lost,
            At::Time(_) => false,
        };
        if lost {
            return Err(b.error(&chain.dir, chain.newest().1));
        }
    }
    pick(chain, at)
}

/// The point `at` names in `chain`. A point that does not exist is a usage error (exit 2), whose
/// message gives the time asked for (when it was one) and the points there are.
pub fn pick(chain: &Chain, at: At) -> Result<u64> {
    let points: Vec<(u64, i64, i32)> =
        std::iter::once((chain.base_number, chain.base.header.created, chain.base.header.utc_offset))
            .chain(chain.increments.iter().map(|i| (i.seq, i.delta.header.created, i.delta.header.utc_offset)))
            .collect();
    let missing = |what: String| {
        Error::usage(format!("{} has no point {what}; it has {}", chain.dir.display(), describe(&points)))
    };
    match at {
        At::Latest => Ok(chain.newest().1),
        At::Number(n) if points.iter().any(|p| p.0 == n) => Ok(n),
        At::Number(n) => Err(missing(n.to_string())),
        At::Time(t) => points.iter().rev().find(|p| p.1 <= t).map(|p| p.0).ok_or_else(|| {
            // Shown in the zone of the newest point, as `list` shows the points' times.
            let offset = points.last().map_or(0, |p| p.2);
            missing(format!("at or before {}", format_time(t, offset)))
        }),
    }
}

/// "points 0 (2026-11-20 03:00:00 +01:00) to 5 (…)": the range a user can pick from.
fn describe(points: &[(u64, i64, i32)]) -> String {
    let point = |p: &(u64, i64, i32)| format!("{} ({})", p.0, format_time(p.1, p.2));
    match points {
        [] => "no points".to_string(),
        [only] => format!("only point {}", point(only)),
        [first, .., last] => format!("{} points, {} to {}", points.len(), point(first), point(last)),
    }
}

/// `2026-11-22 05:59:09 +01:00`: a time in seconds since the epoch, as a local time at
/// `utc_offset` seconds from UTC (how `list` shows when a point was made).
#[must_use]
pub fn format_time(epoch: i64, utc_offset: i32) -> String {
    let local = epoch + i64::from(utc_offset);
    let (days, secs) = (local.div_euclid(86_400), local.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let sign = if utc_offset < 0 { '-' } else { '+' };
    let off = utc_offset.unsigned_abs();
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} {sign}{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        off / 3600,
        off % 3600 / 60
    )
}
