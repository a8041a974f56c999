//! `serve`: a file, a device, any endpoint address, or a backup chain's point, exported over NBD
//! (`blksync_nbd::server`, docs/NBD.md "NBD server"), so that a hypervisor can boot last
//! Tuesday's backup, or `nbdcopy` and `qemu-img` read it, without restoring it first.
//!
//! A chain's point is read through the chain, as `restore` reads it: the newest record wins, and
//! every byte read from the base is checked against its content hashes. It is served read-only
//! unless `writable`; then writes go to a copy-on-write overlay ([`crate::overlay`]) that never
//! touches the chain, and are thrown away at the end or saved as a delta (`save_overlay`). Any
//! other writable endpoint needs `writable`, and writes go straight to it.

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
    /// Let clients write: to a file, a device or an export directly; to a chain's point in an
    /// overlay.
    pub writable: bool,
    /// When the server stops, keep what clients wrote to a chain's point as a delta here.
    pub save_overlay: Option<PathBuf>,
    /// Where to listen.
    pub listen: Listen,
}

/// What a `serve` did that its caller reports.
#[derive(Debug, Default)]
pub struct Served {
    /// The delta `save_overlay` wrote, and the bytes it holds.
    pub saved: Option<(PathBuf, u64)>,
}

/// Serves `address` until `control` is cancelled (SIGINT, SIGTERM), then flushes a writable
/// export and returns. `ready` receives the address clients use (`nbd://…` or
/// `nbd+unix:///?socket=…`) once the server listens.
pub fn serve(address: &Path, options: &ServeOptions, ready: impl FnOnce(&str), control: Control<'_>) -> Result<Served> {
    if options.save_overlay.is_some() && !(options.writable && address.is_dir()) {
        return Err(Error::usage(format!(
            "{}: an overlay to save is what clients write to a backup point served writable",
            address.display()
        )));
    }
    let mut overlay = None;
    let export = if address.is_dir() {
        let chain = crate::backup::load(address)?;
        let n = crate::backup::point(&chain, options.at.unwrap_or(At::Latest))?;
        chain.verify(n, false)?;
        let image: Arc<dyn Source> = Arc::new(chain.image(n)?);
        let description = format!("point {n} of {}", address.display());
        if options.writable {
            if let Some(path) = &options.save_overlay {
                crate::delta::check_output_with(path, &[], false)?;
            }
            // The overlay's file lives where the saved delta goes (or in TMPDIR), never in the
            // chain's directory.
            let dir = options
                .save_overlay
                .as_ref()
                .and_then(|p| p.parent().filter(|d| !d.as_os_str().is_empty()).map(Path::to_path_buf))
                .unwrap_or_else(std::env::temp_dir);
            let layer = Arc::new(crate::overlay::Overlay::new(Arc::clone(&image), &dir)?);
            let header = crate::delta::Header::new(
                point_id(&chain, n),
                4096,
                &address.display().to_string(),
                &format!("what clients wrote to {description} served by blksync serve --writable"),
            )?;
            overlay = Some((Arc::clone(&layer), header));
            Export::writable("", layer as Arc<dyn Target>).with_description(description)
        } else {
            Export::read_only("", image).with_description(description)
        }
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
    })?;
    let mut served = Served::default();
    if let (Some((layer, header)), Some(path)) = (overlay, &options.save_overlay) {
        let bytes = layer.save(path, header)?;
        served.saved = Some((path.clone(), bytes));
    }
    Ok(served)
}

/// The id of point `n` of `chain`: the parent of a delta made against it.
fn point_id(chain: &crate::chain::Chain, n: u64) -> [u8; 16] {
    chain.increments.iter().find(|i| i.seq == n).map_or(chain.base.header.id, |i| i.delta.header.id)
}
