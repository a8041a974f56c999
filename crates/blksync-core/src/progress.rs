//! Progress reporting and cancellation.
//!
//! The library never prints. The engine keeps [`Counters`] and hands a [`Snapshot`] of them to an
//! [`Observer`] after every chunk (from worker threads, so observers rate-limit themselves). The
//! front end decides whether that becomes a bar, a log line or nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

/// What a long-running job is doing right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Comparing and copying.
    Sync,
    /// Comparing only (`compare`, dry runs).
    Compare,
    /// Re-reading both ends after a sync (`--verify`).
    Verify,
}

/// Receives progress and warnings. All methods have empty defaults.
pub trait Observer: Sync {
    /// A phase starts, covering `total` bytes.
    fn phase(&self, _phase: Phase, _total: u64) {}
    /// Counters moved.
    fn progress(&self, _snapshot: &Snapshot) {}
    /// Something the user should know that is not an error.
    fn warn(&self, _message: &str) {}
    /// What blksync is doing, for `--verbose`: what was opened and what it can do, which
    /// strategy runs and where.
    fn note(&self, _message: &str) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// Who is watching a job and how to stop it.
#[derive(Clone, Copy)]
pub struct Control<'a> {
    /// Receives progress.
    pub observer: &'a dyn Observer,
    /// Set (by a signal handler, say) to stop the job at the next chunk boundary.
    pub cancel: &'a AtomicBool,
}

impl Control<'_> {
    /// The user asked to stop.
    #[must_use]
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// Running totals of a job, updated by many threads.
#[derive(Debug)]
pub struct Counters {
    started: Instant,
    total: AtomicU64,
    scanned: AtomicU64,
    read_source: AtomicU64,
    read_destination: AtomicU64,
    differing: AtomicU64,
    written: AtomicU64,
    zeroed: AtomicU64,
}

/// A consistent-enough copy of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// Bytes the job covers.
    pub bytes_total: u64,
    /// Bytes examined so far (holes included: knowing a hole is examining it).
    pub bytes_scanned: u64,
    /// Bytes read from the source.
    pub bytes_read_source: u64,
    /// Bytes read from the destination.
    pub bytes_read_destination: u64,
    /// Bytes in blocks that differ.
    pub bytes_differing: u64,
    /// Bytes of data written.
    pub bytes_written: u64,
    /// Bytes made zero without writing data (holes punched, ranges discarded or zeroed).
    pub bytes_zeroed: u64,
    /// Seconds since the job started.
    pub seconds: f64,
}

impl Snapshot {
    /// Bytes known to have been examined: `bytes_scanned`, or more while work is in flight.
    ///
    /// A chunk counts as scanned only when all of it is done, but its differing blocks and the
    /// data written for them are counted as they go (in the remote relay, as each `Data` frame
    /// passes; locally, per run of blocks on each worker). Mid-run, `bytes_written` could
    /// therefore exceed `bytes_scanned`. Whatever was found differing or was written has been
    /// examined, so the largest of these is still a true count, and the one to show as done.
    #[must_use]
    pub fn bytes_examined(&self) -> u64 {
        self.bytes_scanned.max(self.bytes_differing).max(self.bytes_written.saturating_add(self.bytes_zeroed))
    }
}

impl Default for Counters {
    fn default() -> Self {
        Counters::new()
    }
}

macro_rules! adders {
    ($($name:ident => $field:ident),* $(,)?) => {
        $(
            #[doc = concat!("Adds `n` to `", stringify!($field), "`.")]
            pub fn $name(&self, n: u64) { self.$field.fetch_add(n, Ordering::Relaxed); }
        )*
    };
}

impl Counters {
    /// Zeroed counters; the clock starts now.
    #[must_use]
    pub fn new() -> Counters {
        Counters {
            started: Instant::now(),
            total: AtomicU64::new(0),
            scanned: AtomicU64::new(0),
            read_source: AtomicU64::new(0),
            read_destination: AtomicU64::new(0),
            differing: AtomicU64::new(0),
            written: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
        }
    }

    /// Sets the total the run works through.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    adders! {
        add_scanned => scanned,
        add_read_source => read_source,
        add_read_destination => read_destination,
        add_differing => differing,
        add_written => written,
        add_zeroed => zeroed,
    }

    /// Reads all counters.
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            bytes_total: self.total.load(Ordering::Relaxed),
            bytes_scanned: self.scanned.load(Ordering::Relaxed),
            bytes_read_source: self.read_source.load(Ordering::Relaxed),
            bytes_read_destination: self.read_destination.load(Ordering::Relaxed),
            bytes_differing: self.differing.load(Ordering::Relaxed),
            bytes_written: self.written.load(Ordering::Relaxed),
            bytes_zeroed: self.zeroed.load(Ordering::Relaxed),
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }
}
