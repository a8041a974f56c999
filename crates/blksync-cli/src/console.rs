//! Every byte the binary prints goes through here, so that a failing output stream never panics
//! (`println!` panics when stdout is a closed pipe or a full disk, which exited 101).
//!
//! The rules, which follow `cmp` and ripgrep:
//!
//! - **stdout closed by its reader** (EPIPE, as in `blksync list DIR | head -1`): the reader has
//!   what it wanted. Printing stops quietly and the command's own exit code stands (0 after a
//!   successful run, 1 for `compare` finding differences).
//! - **any other stdout failure** (ENOSPC on `> /dev/full`, EIO): the result was the output and
//!   it is lost, so this is an error like any other write error: exit 4 for a full disk, 3
//!   otherwise (`compare`: 2, as `cmp` does), with a message on stderr. The same codes as
//!   `restore DIR -` writing the image to stdout.
//! - **stderr fails**: progress, warnings and summaries are display only; they are dropped and
//!   the exit code is what it would have been.

use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once stdout's reader has gone away: later results are not even formatted for it.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `text` and a newline to stdout in one piece. A closed pipe is not an error (see the
/// module docs); any other failure is, as an I/O error on "standard output".
pub fn out(text: &str) -> blksync::Result<()> {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut stdout = io::stdout().lock();
    let result = stdout.write_all(text.as_bytes()).and_then(|()| stdout.write_all(b"\n")).and_then(|()| stdout.flush());
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => Err(blksync::Error::io("writing", Path::new("standard output"), None, e)),
    }
}

/// Writes `text` and a newline to stderr, ignoring failures: there is nowhere left to report
/// them, and losing a progress line or a summary must not change the outcome.
pub fn err(text: &str) {
    let mut stderr = io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes()).and_then(|()| stderr.write_all(b"\n"));
}
