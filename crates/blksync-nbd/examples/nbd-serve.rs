//! Serves a raw file read-only over NBD on a unix socket, for `bench/nbd_serve.py`:
//! `nbd-serve FILE SOCKET`. Prints `ready` once it accepts; stops (cleanly, through the stop
//! handle) when its standard input ends.
//!
//! The file is read with positioned reads and reported all allocated: a stand-in for
//! `blksync-endpoint`'s local file, which depends on this crate and so cannot be used here.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blksync_core::endpoint::{Identity, Segment, Source};
use blksync_core::{Error, Result};
use blksync_nbd::server::{Export, Listener, Server, ServerOptions};

struct RawFile {
    path: PathBuf,
    file: File,
    size: u64,
}

impl Source for RawFile {
    fn name(&self) -> &Path {
        &self.path
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| Error::io("reading", &self.path, Some(offset), e))
    }
    fn segment_at(&self, offset: u64) -> Result<Segment> {
        Ok(Segment { start: offset, end: self.size, allocated: true })
    }
    fn drop_cache(&self, _: u64, _: u64) {}
    fn identity(&self) -> Identity {
        Identity::None
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file, socket] = &args[..] else {
        return Err(Error::usage("usage: nbd-serve FILE SOCKET"));
    };
    let path = PathBuf::from(file);
    let f = File::open(&path).map_err(|e| Error::io("opening", &path, None, e))?;
    let size = f.metadata().map_err(|e| Error::io("reading the size of", &path, None, e))?.len();
    let export = Export::read_only("", Arc::new(RawFile { path, file: f, size }));
    let server = Server::new(Listener::bind_unix(Path::new(socket))?, vec![export], ServerOptions::default())?;
    let stop = server.stop_handle();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        stop.stop();
    });
    let _ = writeln!(std::io::stdout(), "ready");
    server.run()
}
