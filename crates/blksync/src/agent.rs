//! `blksync agent`: the far end of a remote sync, speaking the protocol on stdin/stdout.
//!
//! Nothing but the banner and frames ever reaches stdout; diagnostics go to stderr, which ssh
//! carries back to the client.

use std::io::{BufReader, BufWriter, Write};
use std::os::fd::AsFd;

use crossbeam_channel::bounded;

use crate::protocol::frame::read_frame;
use crate::protocol::{BANNER, Msg};

/// Runs the agent until the client says `Bye` or goes away. Returns the process exit code.
#[must_use]
pub fn run() -> u8 {
    // Our own descriptors for fds 0 and 1: std's Stdout is line-buffered, which would split binary
    // frames at every newline byte.
    let (Ok(stdin), Ok(stdout)) =
        (std::io::stdin().as_fd().try_clone_to_owned(), std::io::stdout().as_fd().try_clone_to_owned())
    else {
        return 8;
    };
    // Pipes of 1 MiB instead of 64 KiB: a data frame then fits in one pipe buffer instead of
    // taking 16 wake-ups of each side. Failure (not a pipe, or over the system limit) is fine.
    let _ = rustix::pipe::fcntl_setpipe_size(&stdin, 1 << 20);
    let _ = rustix::pipe::fcntl_setpipe_size(&stdout, 1 << 20);
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::from(stdout));
    if out.write_all(BANNER).and_then(|()| out.flush()).is_err() {
        return 8;
    }
    let (requests_tx, requests) = bounded::<Msg>(8);
    let (replies, replies_rx) = bounded::<Msg>(8);
    let protocol_errors = replies.clone();
    // Liveness: an `Alive` every few seconds, whatever the request loop is doing (hashing a base
    // for minutes, blocked on a slow disk), so the client can tell a working agent from a
    // stopped one. A full reply queue means data is flowing anyway.
    // It stops the moment serving ends: its sender would otherwise keep the writer, and so the
    // agent, alive until the next beat, and every connection would end a beat late.
    let heartbeat = replies.clone();
    let (stop_heartbeat, stopped) = bounded::<()>(0);
    std::thread::spawn(move || {
        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(crate::link::HEARTBEAT) {
            if let Err(crossbeam_channel::TrySendError::Disconnected(_)) = heartbeat.try_send(Msg::Alive) {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        let mut input = BufReader::with_capacity(1 << 20, std::fs::File::from(stdin));
        let mut buf = Vec::new();
        loop {
            match read_frame(&mut input, &mut buf).and_then(|k| k.map(|k| Msg::decode(k, &buf[1..])).transpose()) {
                Ok(Some(msg)) => {
                    if requests_tx.send(msg).is_err() {
                        return;
                    }
                }
                // The client went away: serving ends when this sender drops.
                Ok(None) => return,
                Err(e) => {
                    let _ = protocol_errors.send(Msg::failure(&e));
                    return;
                }
            }
        }
    });
    let writer = std::thread::spawn(move || {
        while let Ok(msg) = replies_rx.recv() {
            let mut next = Some(msg);
            while let Some(msg) = next {
                if msg.write_to(&mut out).is_err() {
                    return;
                }
                next = replies_rx.try_recv().ok();
            }
            if out.flush().is_err() {
                return;
            }
        }
    });
    crate::peer::serve(&requests, &replies);
    drop(stop_heartbeat);
    drop(replies);
    let _ = writer.join();
    0
}
