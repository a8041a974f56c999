//! What the server exports: a named [`Source`] (read-only) or [`Target`] (writable), and what
//! follows from its caps: transmission flags, block sizes, and the NBD error value of a blksync
//! error (`docs/NBD.md`, "Transmission flags and block sizes", "Errors").

use std::sync::Arc;

use blksync_core::endpoint::{Source, Target};
use blksync_core::{Error, ErrorKind};

use crate::wire::{MAX_STRING, errno, transmission_flag as tf, wire_errno};

/// The largest READ or WRITE payload: the protocol's default, which every client accepts.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// The endpoint behind an export.
#[derive(Clone)]
pub enum Backend {
    /// Read-only: writes get `EPERM`.
    ReadOnly(Arc<dyn Source>),
    /// Writable.
    Writable(Arc<dyn Target>),
}

/// One export: a name clients ask for, a description for humans, and the endpoint.
#[derive(Clone)]
pub struct Export {
    name: String,
    description: String,
    backend: Backend,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("endpoint", &self.source().name())
            .field("writable", &self.target().is_some())
            .finish_non_exhaustive()
    }
}

impl Export {
    /// A read-only export of `source` called `name` (`""` is the default export too).
    pub fn read_only(name: impl Into<String>, source: Arc<dyn Source>) -> Export {
        Export { name: name.into(), description: String::new(), backend: Backend::ReadOnly(source) }
    }

    /// A writable export of `target` called `name`.
    pub fn writable(name: impl Into<String>, target: Arc<dyn Target>) -> Export {
        Export { name: name.into(), description: String::new(), backend: Backend::Writable(target) }
    }

    /// The same export with a description (`NBD_OPT_LIST`, `NBD_INFO_DESCRIPTION`).
    #[must_use]
    pub fn with_description(self, description: impl Into<String>) -> Export {
        Export { description: description.into(), ..self }
    }

    /// The name clients ask for.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The description (may be empty).
    #[must_use]
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The endpoint, for reading.
    #[must_use]
    pub fn source(&self) -> &dyn Source {
        match &self.backend {
            Backend::ReadOnly(s) => s.as_ref(),
            Backend::Writable(t) => t.as_ref(),
        }
    }

    /// The endpoint, for writing, when the export is writable.
    #[must_use]
    pub fn target(&self) -> Option<&dyn Target> {
        match &self.backend {
            Backend::ReadOnly(_) => None,
            Backend::Writable(t) => Some(t.as_ref()),
        }
    }

    /// Checks what a client could not live with: a name longer than the protocol's strings or
    /// with a NUL in it.
    pub(crate) fn check(&self) -> blksync_core::Result<()> {
        if self.name.len() > MAX_STRING || self.name.contains('\0') {
            return Err(Error::usage(format!(
                "an NBD export name must be at most 4096 bytes without NUL, not {:?}",
                self.name
            )));
        }
        Ok(())
    }

    /// Zeroing is cheap (a punched hole or an offload, not written zeros): TRIM does it and
    /// `FAST_ZERO` may.
    pub(crate) fn zero_is_cheap(&self) -> bool {
        let caps = self.source().caps();
        self.target().is_some() && (caps.zero_offload || caps.discard_zeroes)
    }

    /// The transmission flags, for a connection with or without structured replies.
    pub(crate) fn flags(&self, structured: bool) -> u16 {
        let mut flags = tf::HAS_FLAGS | tf::CAN_MULTI_CONN;
        if self.target().is_some() {
            flags |= tf::SEND_FLUSH | tf::SEND_FUA | tf::SEND_WRITE_ZEROES | tf::SEND_FAST_ZERO;
            if self.zero_is_cheap() {
                flags |= tf::SEND_TRIM;
            }
        } else {
            flags |= tf::READ_ONLY;
        }
        if structured {
            flags |= tf::SEND_DF;
        }
        flags
    }

    /// Minimum, preferred and maximum block sizes for a minimum of `min_block` (a power of two).
    pub(crate) fn block_sizes(&self, min_block: u32) -> (u32, u32, u32) {
        let caps = self.source().caps().block_size;
        let preferred = if caps.is_power_of_two() && (512..=1 << 20).contains(&caps) { caps } else { 4096 };
        (min_block, preferred.max(min_block), MAX_PAYLOAD)
    }
}

/// The NBD error value for an endpoint's error: its OS error when it has one, else its kind.
pub(crate) fn errno_of(e: &Error) -> u32 {
    if let Some(raw) = e.os_error().and_then(std::io::Error::raw_os_error) {
        return wire_errno(raw);
    }
    match e.kind() {
        ErrorKind::NoSpace => errno::ENOSPC,
        ErrorKind::Usage => errno::EINVAL,
        ErrorKind::Unsupported => errno::ENOTSUP,
        ErrorKind::PermissionDenied => errno::EPERM,
        _ => errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blksync_core::endpoint::memory::Memory;

    #[test]
    fn flags_say_read_only_or_what_a_target_can_do() {
        let m = Arc::new(Memory::new("m", 4096));
        let ro = Export::read_only("a", m.clone());
        assert_eq!(ro.flags(false), tf::HAS_FLAGS | tf::CAN_MULTI_CONN | tf::READ_ONLY);
        assert_ne!(ro.flags(true) & tf::SEND_DF, 0);
        let rw = Export::writable("b", m);
        let flags = rw.flags(false);
        assert_eq!(flags & tf::READ_ONLY, 0);
        assert_ne!(flags & tf::SEND_WRITE_ZEROES, 0);
        assert_eq!(flags & tf::SEND_TRIM, 0, "Memory's zeroing is not offloaded, so no TRIM");
        assert_eq!(rw.block_sizes(1), (1, 4096, MAX_PAYLOAD));
        assert_eq!(rw.block_sizes(8192), (8192, 8192, MAX_PAYLOAD));
    }

    #[test]
    fn errors_map_to_their_os_error_or_their_kind() {
        let os =
            Error::io("writing", std::path::Path::new("x"), Some(0), std::io::Error::from_raw_os_error(libc::EDQUOT));
        assert_eq!(errno_of(&os), errno::ENOSPC);
        for (kind, value) in [
            (ErrorKind::Io, errno::EIO),
            (ErrorKind::NoSpace, errno::ENOSPC),
            (ErrorKind::Usage, errno::EINVAL),
            (ErrorKind::Unsupported, errno::ENOTSUP),
            (ErrorKind::PermissionDenied, errno::EPERM),
            (ErrorKind::Corrupt, errno::EIO),
        ] {
            assert_eq!(errno_of(&Error::new(kind, "x")), value, "{kind:?}");
        }
    }

    #[test]
    fn long_names_and_nul_are_refused() {
        let m: Arc<dyn Source> = Arc::new(Memory::new("m", 0));
        assert!(Export::read_only("x".repeat(4097), m.clone()).check().is_err());
        assert!(Export::read_only("a\0b", m.clone()).check().is_err());
        assert!(Export::read_only("", m).check().is_ok());
    }
}
