//! `serve`: a file, a device, any endpoint address, or a backup chain's point, exported over NBD
//! (`blksync_nbd::server`, docs/NBD.md "NBD server"), so that a hypervisor can boot last
//! Tuesday's backup, or `nbdcopy` and `qemu-img` read it, without restoring it first.
//!
//! A chain's point is read through the chain, as `restore` reads it: the newest record wins, and
//! every byte read from the base is checked against its content hashes. It is served read-only;
//! a writable endpoint needs `writable`, and writes go straight to it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use blksync_nbd::server::{Export, Listener, Server, ServerOptions};

use crate::backup::At;
use crate::endpoint::{OpenTarget, Source, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::progress::Control;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address; `explicit` when the user named it, which alone allows a non-loopback one.
    Tcp {
        /// `HOST:PORT`.
        address: String,
        /// Named by the user (`--listen`), not the default.
        explicit: bool,
    },
    /// A unix socket at this path.
    Unix(PathBuf),
}

impl Default for Listen {
    fn default() -> Listen {
        Listen::Tcp { address: format!("127.0.0.1:{}", blksync_nbd::server::DEFAULT_PORT), explicit: false }
    }
}

/// Options of `serve`.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Which point of a chain (a chain's directory only).
    pub at: Option<At>,
    /// Let clients write (a file, a device or an export; never a chain's point).
    pub writable: bool,
    /// Where to listen.
    pub listen: Listen,
}

/// Serves `address` until `control` is cancelled (SIGINT, SIGTERM), then flushes a writable
/// export and returns. `ready` receives the address clients use (`nbd://…` or
/// `nbd+unix:///?socket=…`) once the server listens.
pub fn serve(address: &Path, options: &ServeOptions, ready: impl FnOnce(&str), control: Control<'_>) -> Result<()> {
    let export = if address.is_dir() {
        if options.writable {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{}: a backup point is served read-only (a copy-on-write overlay for writes is not built yet); restore it to write to it",
                    address.display()
                ),
            ));
        }
        let chain = crate::backup::load(address)?;
        let n = crate::backup::point(&chain, options.at.unwrap_or(At::Latest))?;
        chain.verify(n, false)?;
        let image: Arc<dyn Source> = Arc::new(chain.image(n)?);
        Export::read_only("", image).with_description(format!("point {n} of {}", address.display()))
    } else if options.at.is_some() {
        return Err(Error::usage(format!(
            "{}: a point (--at) is chosen in a backup chain's directory",
            address.display()
        )));
    } else if options.writable {
        let how = OpenTarget { read_only: false, create: false, ..OpenTarget::default() };
        let target: Arc<dyn Target> = Arc::from(crate::endpoint::open_target(address, how)?);
        if !target.exists() {
            return Err(Error::new(ErrorKind::NotFound, format!("{} does not exist", address.display())));
        }
        Export::writable("", target)
    } else {
        let source: Arc<dyn Source> = Arc::from(crate::endpoint::open_source(address)?);
        Export::read_only("", source)
    };
    let listener = match &options.listen {
        Listen::Tcp { address, explicit } => Listener::bind_tcp(address, *explicit)?,
        Listen::Unix(path) => Listener::bind_unix(path)?,
    };
    let server = Server::new(listener, vec![export], ServerOptions::default())?;
    let uri = server.listener().uri("").unwrap_or_default();
    ready(&uri);
    let stop = server.stop_handle();
    std::thread::scope(|scope| {
        // A signal handler can only set a flag; this turns it into the server's stop.
        let watcher = scope.spawn(|| {
            while !control.cancel.load(Ordering::Relaxed) && !stop.is_stopped() {
                std::thread::sleep(Duration::from_millis(100));
            }
            stop.stop();
        });
        let served = server.run();
        // Ended by itself (an error): the watcher must not wait for a signal.
        stop.stop();
        let _ = watcher.join();
        served
    })
}
