//! An NBD server over blksync endpoints: any [`Source`](blksync_core::endpoint::Source) as a
//! read-only export, any [`Target`](blksync_core::endpoint::Target) as a writable one, to qemu,
//! libnbd's tools, the kernel's client or this crate's own. The library half of `blksync serve`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use blksync_core::endpoint::memory::Memory;
//! use blksync_nbd::server::{Export, Listener, Server, ServerOptions};
//!
//! let image = Arc::new(Memory::new("image", 1 << 30));
//! let listener = Listener::bind_loopback(blksync_nbd::server::DEFAULT_PORT)?;
//! let server = Server::new(listener, vec![Export::writable("disk", image)], ServerOptions::default())?;
//! let stop = server.stop_handle();
//! std::thread::spawn(move || { /* later: */ stop.stop(); });
//! server.run()?; // returns once stopped, with every writable export flushed
//! # Ok::<(), blksync_core::Error>(())
//! ```
//!
//! What it speaks and why is in `docs/NBD.md`, "NBD server": fixed newstyle, `NBD_OPT_GO` with
//! block sizes, structured replies with holes, `base:allocation`; a reader and a pool of workers
//! per connection, so requests in flight run at once and replies go out as they complete; every
//! length from a client bounded before anything is allocated for it. Modules: [`export`] (what
//! is served), `negotiation`, `request` (the checks), `session` (transmission).

pub mod export;
mod negotiation;
mod request;
mod session;

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use blksync_core::{Error, ErrorKind, Result};

pub use export::{Backend, Export};

use crate::socket::{Socket, io_text};

/// The protocol's port.
pub const DEFAULT_PORT: u16 = 10809;

/// After a stop, how long a reply may wait for a client that does not read it.
const STOP_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How the server runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Worker threads per connection: how many of its requests run at once (default 8).
    pub workers: usize,
    /// Connections served at once (default 16); one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// How long negotiation may wait for the client (default 30 s; `None`: for ever).
    pub handshake_timeout: Option<Duration>,
    /// Minimum block size, a power of two (default 1: blksync endpoints take any offset; set the
    /// sector size for a device opened with `O_DIRECT`).
    pub min_block: u32,
    /// Payload bytes (write data, read buffers) one connection may hold at once (default
    /// 64 MiB); a single request may be larger, up to the 32 MiB maximum payload.
    pub max_buffered: usize,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            workers: 8,
            max_connections: 16,
            handshake_timeout: Some(Duration::from_secs(30)),
            min_block: 1,
            max_buffered: 64 << 20,
        }
    }
}

/// A bound listener: TCP or a unix socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A unix socket.
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Listener {
        Listener::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Listener {
        Listener::Unix(l)
    }
}

fn bind_error(what: &str, e: &io::Error) -> Error {
    let kind = match e.kind() {
        io::ErrorKind::AddrInUse => ErrorKind::InUse,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        _ => ErrorKind::Connection,
    };
    Error::new(kind, format!("listening on {what}: {}", io_text(e)))
}

impl Listener {
    /// Listens on `127.0.0.1:PORT` (0: a free port): reachable from this host only.
    pub fn bind_loopback(port: u16) -> Result<Listener> {
        Listener::bind_tcp(&format!("127.0.0.1:{port}"), false)
    }

    /// Listens on `address` (`HOST:PORT`). An NBD export has neither authentication nor
    /// encryption, so an address that is not loopback is refused unless `allow_remote`.
    pub fn bind_tcp(address: &str, allow_remote: bool) -> Result<Listener> {
        let addrs: Vec<SocketAddr> = address
            .to_socket_addrs()
            .map_err(|e| Error::usage(format!("bad listening address {address}: {}", io_text(&e))))?
            .collect();
        if !allow_remote && let Some(remote) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            return Err(Error::usage(format!(
                "{address} ({remote}) is reachable from other hosts, and an NBD export has no authentication \
                 or encryption: listen on 127.0.0.1 or a unix socket, or allow remote clients explicitly"
            )));
        }
        TcpListener::bind(&addrs[..]).map(Listener::Tcp).map_err(|e| bind_error(address, &e))
    }

    /// Listens on a unix socket at `path`. A socket file already there is removed only if
    /// nothing answers on it (a server that died left it); a live one is `InUse`.
    pub fn bind_unix(path: &Path) -> Result<Listener> {
        let what = path.display().to_string();
        match UnixListener::bind(path) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if UnixStream::connect(path).is_ok() {
                    return Err(bind_error(&what, &e));
                }
                std::fs::remove_file(path).map_err(|e| bind_error(&what, &e))?;
                UnixListener::bind(path).map(Listener::Unix).map_err(|e| bind_error(&what, &e))
            }
            other => other.map(Listener::Unix).map_err(|e| bind_error(&what, &e)),
        }
    }

    /// The NBD URI of `export` on this listener (`nbd://127.0.0.1:PORT/NAME` or
    /// `nbd+unix:///NAME?socket=PATH`), for messages and clients; `None` for an unnamed socket.
    #[must_use]
    pub fn uri(&self, export: &str) -> Option<String> {
        let name: String = export
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~:@".contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        match self {
            Listener::Tcp(l) => {
                let addr = l.local_addr().ok()?;
                Some(match addr {
                    SocketAddr::V4(a) => format!("nbd://{}:{}/{name}", a.ip(), a.port()),
                    SocketAddr::V6(a) => format!("nbd://[{}]:{}/{name}", a.ip(), a.port()),
                })
            }
            Listener::Unix(l) => {
                let addr = l.local_addr().ok()?;
                Some(format!("nbd+unix:///{name}?socket={}", addr.as_pathname()?.display()))
            }
        }
    }

    fn accept(&self) -> io::Result<Socket> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // A reply header must not wait for the ACK of the previous payload.
                s.set_nodelay(true)?;
                Ok(Socket::Tcp(s))
            }
            Listener::Unix(l) => l.accept().map(|(s, _)| Socket::Unix(s)),
        }
    }

    /// Where to connect to wake a blocked `accept`.
    fn wake_address(&self) -> Option<Wake> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(Wake::Tcp),
            Listener::Unix(l) => l.local_addr().ok().map(Wake::Unix),
        }
    }
}

#[derive(Debug)]
enum Wake {
    Tcp(SocketAddr),
    Unix(std::os::unix::net::SocketAddr),
}

#[derive(Debug, Default)]
struct Connections {
    stopped: bool,
    next: u64,
    live: HashMap<u64, Socket>,
}

#[derive(Debug)]
struct StopState {
    wake: Option<Wake>,
    connections: Mutex<Connections>,
}

/// Stops a running [`Server`] from any thread: [`StopHandle::stop`]. Cloneable.
#[derive(Debug, Clone)]
pub struct StopHandle {
    state: Arc<StopState>,
}

impl StopHandle {
    /// Stops the server: no new connections, every connection stops reading requests and
    /// finishes those it has; `Server::run` then flushes writable exports and returns.
    /// Idempotent.
    pub fn stop(&self) {
        {
            let mut c = self.state.connections.lock().unwrap_or_else(PoisonError::into_inner);
            c.stopped = true;
            for s in c.live.values() {
                s.shutdown_read();
                // A client that reads no replies must not hold the stop for ever.
                let _ = s.set_write_timeout(Some(STOP_WRITE_TIMEOUT));
            }
        }
        // Wake the accept loop with a connection of our own; it sees the flag and ends.
        let _ = match &self.state.wake {
            Some(Wake::Tcp(addr)) => {
                let ip = if addr.ip().is_unspecified() {
                    if addr.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    }
                } else {
                    addr.ip()
                };
                TcpStream::connect((ip, addr.port())).map(drop)
            }
            Some(Wake::Unix(addr)) => UnixStream::connect_addr(addr).map(drop),
            None => Ok(()),
        };
    }

    /// Whether [`StopHandle::stop`] was called.
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        self.state.connections.lock().unwrap_or_else(PoisonError::into_inner).stopped
    }

    /// Registers a connection so that a stop reaches it; `None` once stopped.
    fn register(&self, socket: &Socket) -> Option<u64> {
        let mut c = self.state.connections.lock().unwrap_or_else(PoisonError::into_inner);
        let clone = socket.try_clone().ok()?;
        if c.stopped {
            return None;
        }
        let id = c.next;
        c.next += 1;
        c.live.insert(id, clone);
        Some(id)
    }

    fn unregister(&self, id: u64) {
        self.state.connections.lock().unwrap_or_else(PoisonError::into_inner).live.remove(&id);
    }
}

/// An NBD server: a listener, its exports, and how to run.
#[derive(Debug)]
pub struct Server {
    listener: Listener,
    exports: Vec<Export>,
    options: ServerOptions,
    stop: StopHandle,
}

impl Server {
    /// A server of `exports` (at least one, names distinct; the empty name also means the
    /// first) on `listener`.
    pub fn new(listener: Listener, exports: Vec<Export>, options: ServerOptions) -> Result<Server> {
        if exports.is_empty() {
            return Err(Error::usage("an NBD server needs at least one export"));
        }
        for (i, e) in exports.iter().enumerate() {
            e.check()?;
            if exports[..i].iter().any(|o| o.name() == e.name()) {
                return Err(Error::usage(format!("two NBD exports are called {:?}", e.name())));
            }
        }
        if !options.min_block.is_power_of_two() || options.min_block > 64 << 10 {
            return Err(Error::usage(format!(
                "an NBD minimum block size must be a power of two up to 64 KiB, not {}",
                options.min_block
            )));
        }
        let stop =
            StopHandle { state: Arc::new(StopState { wake: listener.wake_address(), connections: Mutex::default() }) };
        Ok(Server { listener, exports, options, stop })
    }

    /// A handle that stops [`Server::run`].
    #[must_use]
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// The listener (for its address, [`Listener::uri`]).
    #[must_use]
    pub fn listener(&self) -> &Listener {
        &self.listener
    }

    /// Serves until stopped: accepts connections, a thread each, at most
    /// `max_connections` at once. After a stop, waits for every connection to finish its
    /// requests, flushes every writable export and returns the first flush error. A listener
    /// that fails for good (not a client's aborted connection, not a shortage of descriptors)
    /// is an error too.
    pub fn run(self) -> Result<()> {
        let active = AtomicUsize::new(0);
        let result = std::thread::scope(|scope| {
            loop {
                let accepted = self.listener.accept();
                if self.stop.is_stopped() {
                    return Ok(());
                }
                let socket = match accepted {
                    Ok(s) => s,
                    Err(e) if transient(&e) => continue,
                    Err(e) if scarce(&e) => {
                        // Out of descriptors or memory: let connections end before trying again.
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    Err(e) => {
                        self.stop.stop();
                        return Err(Error::new(
                            ErrorKind::Connection,
                            format!("accepting NBD clients: {}", io_text(&e)),
                        ));
                    }
                };
                if active.load(Ordering::SeqCst) >= self.options.max_connections.max(1) {
                    socket.shutdown();
                    continue;
                }
                let Some(id) = self.stop.register(&socket) else { continue };
                active.fetch_add(1, Ordering::SeqCst);
                let (active, server) = (&active, &self);
                scope.spawn(move || {
                    server.connection(&socket);
                    socket.shutdown();
                    server.stop.unregister(id);
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        let mut flushed = Ok(());
        for target in self.exports.iter().filter_map(Export::target) {
            let r = target.flush();
            if flushed.is_ok() {
                flushed = r;
            }
        }
        result.and(flushed)
    }

    /// One connection: negotiation, then transmission.
    fn connection(&self, socket: &Socket) {
        if socket.set_read_timeout(self.options.handshake_timeout).is_err() {
            return;
        }
        let Ok(mut stream) = socket.try_clone() else { return };
        let Ok(Some(agreed)) = negotiation::negotiate(&mut stream, &self.exports, self.options.min_block) else {
            return;
        };
        if socket.set_read_timeout(None).is_err() {
            return;
        }
        session::transmit(socket, &self.exports[agreed.export], agreed, &self.options);
    }
}

fn transient(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted)
        || e.raw_os_error() == Some(libc::EPROTO)
}

fn scarce(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Runs the server's decoders and checks over `data`, asserting what must hold whatever a
/// client sends. For the fuzz target `nbd_server` and the random-input test; it panics only on
/// a bug.
#[doc(hidden)]
pub fn exercise_decoders(data: &[u8]) {
    request::exercise(data);
    crate::wire::exercise_decoders(data);
}
