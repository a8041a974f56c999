//! `--bwlimit`: a rate limit shared by all workers.
//!
//! Each worker asks for permission before reading; the throttle tracks how many bytes were
//! granted since the start and sleeps the caller until that many bytes are due at the configured
//! rate. Long-run accuracy is exact, bursts are at most one chunk, and sleeping happens in short
//! slices so a cancel is noticed promptly.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A shared bytes-per-second limit.
#[derive(Debug)]
pub struct Throttle {
    rate: u64,
    state: Mutex<(Instant, u64)>,
}

impl Throttle {
    /// A limit of `rate` bytes per second (must be positive).
    #[must_use]
    pub fn new(rate: u64) -> Throttle {
        Throttle { rate: rate.max(1), state: Mutex::new((Instant::now(), 0)) }
    }

    /// The limit, in bytes per second.
    #[must_use]
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Waits until `bytes` more may pass, or until `cancel` is set.
    pub fn take(&self, bytes: u64, cancel: &AtomicBool) {
        let due = {
            let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            state.1 += bytes;
            state.0 + Duration::from_secs_f64(state.1 as f64 / self.rate as f64)
        };
        loop {
            let now = Instant::now();
            if now >= due || cancel.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_ends_a_wait_at_once() {
        let t = Throttle::new(1);
        let cancel = AtomicBool::new(true);
        let start = Instant::now();
        t.take(1 << 30, &cancel);
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
