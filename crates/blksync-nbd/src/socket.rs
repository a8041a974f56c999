//! The byte stream to a server: TCP or a unix socket, one type for both so that the handshake
//! and the connection do not care which.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use blksync_core::{Error, ErrorKind, Result};

use crate::address::{NbdAddress, Transport};

/// How long one TCP connection attempt may take: a host that drops SYNs fails in this time, not
/// after the kernel's two minutes of retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected stream.
#[derive(Debug)]
pub(crate) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// An OS error's text without Rust's " (os error N)" suffix: users know strerror texts.
pub(crate) fn io_text(e: &io::Error) -> String {
    let text = e.to_string();
    text.split(" (os error").next().unwrap_or(&text).to_string()
}

impl Socket {
    /// Connects to the server of `address`. Every address a host name resolves to is tried in
    /// turn; a failure is `Connection`, naming the address and the last cause.
    pub(crate) fn connect(address: &NbdAddress) -> Result<Socket> {
        let fail =
            |e: &io::Error| Error::new(ErrorKind::Connection, format!("connecting to {address}: {}", io_text(e)));
        match address.transport() {
            Transport::Tcp { host, port } => {
                let addrs = (host.as_str(), *port).to_socket_addrs().map_err(|e| fail(&e))?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                        Ok(stream) => {
                            // A request header must not wait for the ACK of the previous payload.
                            stream.set_nodelay(true).map_err(|e| fail(&e))?;
                            return Ok(Socket::Tcp(stream));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(fail(&last))
            }
            Transport::Unix(path) => UnixStream::connect(path).map(Socket::Unix).map_err(|e| fail(&e)),
            Transport::Abstract(name) => connect_abstract(name).map(Socket::Unix).map_err(|e| fail(&e)),
        }
    }

    /// A second handle on the same stream (for the reader thread).
    pub(crate) fn try_clone(&self) -> io::Result<Socket> {
        match self {
            Socket::Tcp(s) => s.try_clone().map(Socket::Tcp),
            Socket::Unix(s) => s.try_clone().map(Socket::Unix),
        }
    }

    /// Shuts the stream down in both directions, which also wakes a thread blocked reading it.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Shuts the reading half: a thread blocked reading wakes with end of file, while replies can
    /// still be written (how a server stops a connection cleanly).
    pub(crate) fn shutdown_read(&self) {
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Read),
            Socket::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }

    /// Sets or clears the write timeout (a stopping server's bound on a client that reads no
    /// replies).
    pub(crate) fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_write_timeout(timeout),
            Socket::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    /// Sets or clears the read timeout (the handshake has one, transmission none).
    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_read_timeout(timeout),
            Socket::Unix(s) => s.set_read_timeout(timeout),
        }
    }
}

#[cfg(target_os = "linux")]
fn connect_abstract(name: &[u8]) -> io::Result<UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    UnixStream::connect_addr(&addr)
}

#[cfg(not(target_os = "linux"))]
fn connect_abstract(_: &[u8]) -> io::Result<UnixStream> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "abstract unix sockets exist only on Linux"))
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
