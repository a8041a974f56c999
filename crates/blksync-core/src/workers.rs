//! How many worker threads read and hash by default, on whichever host runs the work.

/// Every core, at least two (one can wait on I/O while the other compares), at most eight
/// (memory is 4 MiB a worker).
#[must_use]
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from).clamp(2, 8)
}
