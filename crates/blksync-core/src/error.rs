//! Errors of the library.
//!
//! Every error says *where*: which path (or endpoint), which operation and, for I/O, which byte
//! offset. Each error has an [`ErrorKind`], and each kind has one documented process exit code
//! ([`ErrorKind::exit_code`]), so that a front end, or a remote agent sending `(kind, message)`
//! over the wire, reports the same failure the same way.

use std::fmt;
use std::io;
use std::path::Path;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarsely: the part of an error that scripts may branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request itself is invalid (bad option value, impossible combination).
    Usage,
    /// A path does not exist.
    NotFound,
    /// The operating system denied access.
    PermissionDenied,
    /// Reading or writing failed.
    Io,
    /// The destination filesystem or device ran out of space.
    NoSpace,
    /// The sizes of source and destination do not allow the requested sync.
    SizeMismatch,
    /// The destination is mounted or held open exclusively by someone else.
    InUse,
    /// After syncing, the destination does not read back equal to the source.
    VerifyFailed,
    /// The run was stopped by a signal before it finished.
    Interrupted,
    /// The other host could not be reached, the agent could not start, or the connection
    /// broke.
    Connection,
    /// The other side sent something that breaks the protocol.
    Protocol,
    /// A delta file is damaged, truncated or not a delta at all.
    Corrupt,
    /// A delta was made for other content than the target holds.
    WrongTarget,
    /// The endpoint cannot do what was asked (an address scheme this build does not
    /// implement, resizing a fixed-size endpoint).
    Unsupported,
}

impl ErrorKind {
    /// The process exit code for this kind of failure (see README, "Exit codes").
    ///
    /// 0 and 1 are success and "differences found" (`compare`), never errors.
    #[must_use]
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Usage | ErrorKind::Unsupported => 2,
            ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::Io => 3,
            ErrorKind::NoSpace => 4,
            ErrorKind::SizeMismatch => 5,
            ErrorKind::InUse => 6,
            ErrorKind::VerifyFailed => 7,
            ErrorKind::Interrupted => 130,
            ErrorKind::Connection | ErrorKind::Protocol => 8,
            ErrorKind::Corrupt => 9,
            ErrorKind::WrongTarget => 10,
        }
    }

    /// The kind's number on the wire (docs/PROTOCOL.md, `Error.kind`).
    #[must_use]
    pub fn to_wire(self) -> u8 {
        WIRE_KINDS.iter().position(|k| *k == self).map_or(3, |i| i as u8)
    }

    /// The kind for a number from the wire; unknown numbers are I/O errors.
    #[must_use]
    pub fn from_wire(n: u8) -> ErrorKind {
        WIRE_KINDS.get(usize::from(n)).copied().unwrap_or(ErrorKind::Io)
    }

    /// Classifies an operating-system error.
    #[must_use]
    pub fn of_io(err: &io::Error) -> ErrorKind {
        match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => ErrorKind::PermissionDenied,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ErrorKind::NoSpace,
            io::ErrorKind::ResourceBusy => ErrorKind::InUse,
            io::ErrorKind::Interrupted => ErrorKind::Interrupted,
            _ => ErrorKind::Io,
        }
    }
}

/// Wire numbering of kinds; the order is part of the protocol.
const WIRE_KINDS: [ErrorKind; 14] = [
    ErrorKind::Usage,
    ErrorKind::NotFound,
    ErrorKind::PermissionDenied,
    ErrorKind::Io,
    ErrorKind::NoSpace,
    ErrorKind::SizeMismatch,
    ErrorKind::InUse,
    ErrorKind::VerifyFailed,
    ErrorKind::Interrupted,
    ErrorKind::Protocol,
    ErrorKind::Connection,
    ErrorKind::Corrupt,
    ErrorKind::WrongTarget,
    ErrorKind::Unsupported,
];

/// What would get past an error, for a front end to say in its own terms (a flag, a button):
/// the library's messages name no front end's options, since a second front end (an NBD
/// server, a library user) has other ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Hint {
    /// Overriding the safety check that refused.
    Force,
    /// A larger copy-on-write area for the snapshot (it overflowed).
    LargerSnapshot,
    /// A smaller one (the volume group has too little free space for it).
    SmallerSnapshot,
    /// Waiting longer for a peer that is silent.
    LongerTimeout,
    /// Syncing only the part both sides have (their sizes differ).
    CommonSize,
}

impl Hint {
    const WIRE: [Hint; 5] =
        [Hint::Force, Hint::LargerSnapshot, Hint::SmallerSnapshot, Hint::LongerTimeout, Hint::CommonSize];

    /// The hint's number on the wire (docs/PROTOCOL.md, `Error.hint`); 0 is none.
    #[must_use]
    pub fn to_wire(hint: Option<Hint>) -> u8 {
        hint.and_then(|h| Hint::WIRE.iter().position(|w| *w == h)).map_or(0, |i| i as u8 + 1)
    }

    /// The hint for a number from the wire; 0 and unknown numbers are none.
    #[must_use]
    pub fn from_wire(n: u8) -> Option<Hint> {
        n.checked_sub(1).and_then(|i| Hint::WIRE.get(usize::from(i)).copied())
    }
}

/// An error of this crate: a kind, a human description of where and what, the cause, and
/// what would help.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<io::Error>,
    hint: Option<Hint>,
}

impl Error {
    /// An error with no underlying OS error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into(), source: None, hint: None }
    }

    /// An invalid request.
    pub fn usage(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Usage, message)
    }

    /// An I/O failure of `op` ("reading", "punching a hole in", ...) on `path`, at `offset` when
    /// it is known.
    #[must_use]
    pub fn io(op: &str, path: &Path, offset: Option<u64>, source: io::Error) -> Error {
        let message = match offset {
            Some(offset) => format!("{op} {} at byte offset {offset}", path.display()),
            None => format!("{op} {}", path.display()),
        };
        Error { kind: ErrorKind::of_io(&source), message, source: Some(source), hint: None }
    }

    /// A protocol violation by the other side.
    pub fn protocol(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Protocol, message)
    }

    /// The same error with `prefix: ` in front of its message (a host name, say).
    #[must_use]
    pub fn context(mut self, prefix: &str) -> Error {
        self.message = format!("{prefix}: {}", self.message);
        self
    }

    /// The same error, with what would help.
    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<Option<Hint>>) -> Error {
        self.hint = hint.into();
        self
    }

    /// What would help, when the library knows.
    #[must_use]
    pub fn hint(&self) -> Option<Hint> {
        self.hint
    }

    /// A new message for the same failure (its kind, cause and hint kept).
    #[must_use]
    pub fn reworded(self, message: impl Into<String>) -> Error {
        Error { message: message.into(), source: None, ..self }
    }

    /// The kind of failure, which decides the exit code.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The description without the OS error.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The underlying OS error, when there is one.
    #[must_use]
    pub fn os_error(&self) -> Option<&io::Error> {
        self.source.as_ref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            // Strip Rust's " (os error N)" suffix: users know strerror texts, not numbers.
            let text = source.to_string();
            let text = text.split(" (os error").next().unwrap_or(&text);
            write!(f, ": {text}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The OS error is already part of Display; returning it here would make anyhow print it
        // twice.
        None
    }
}

/// Adds path and offset context to `io::Result`s.
pub trait IoContext<T> {
    /// The error of `op` on `path` at byte `offset`.
    fn at(self, op: &str, path: &Path, offset: u64) -> Result<T>;
    /// The error of `op` on `path`.
    fn on(self, op: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, op: &str, path: &Path, offset: u64) -> Result<T> {
        self.map_err(|e| Error::io(op, path, Some(offset), e))
    }
    fn on(self, op: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, None, e))
    }
}

impl<T> IoContext<T> for rustix::io::Result<T> {
    fn at(self, op: &str, path: &Path, offset: u64) -> Result<T> {
        self.map_err(io::Error::from).at(op, path, offset)
    }
    fn on(self, op: &str, path: &Path) -> Result<T> {
        self.map_err(io::Error::from).on(op, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_error_names_path_offset_and_cause() {
        let e = Error::io("reading", Path::new("/dev/sdz"), Some(4096), io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.to_string(), "reading /dev/sdz at byte offset 4096: Input/output error");
        assert_eq!(e.kind(), ErrorKind::Io);
    }

    #[test]
    fn hints_cross_the_wire_and_survive_a_new_wording() {
        for n in 0..=u8::MAX {
            let hint = Hint::from_wire(n);
            assert_eq!(Hint::to_wire(hint), if hint.is_some() { n } else { 0 });
        }
        let e = Error::usage("x").with_hint(Hint::Force).context("host").reworded("y");
        assert_eq!((e.hint(), e.message()), (Some(Hint::Force), "y"));
    }

    #[test]
    fn disk_full_maps_to_its_own_exit_code() {
        let e = Error::io("writing", Path::new("x"), None, io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.kind().exit_code(), 4);
    }
}
