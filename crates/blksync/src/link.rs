//! A link to a peer: requests in, replies out, whether the peer is a thread of this process or
//! an agent at the other end of ssh.
//!
//! Over ssh, a writer thread encodes requests onto the agent's stdin (flushing when the queue is
//! empty, so small frames batch up) and a reader thread decodes replies from its stdout. When
//! the connection dies the reader turns that into an `Error` reply naming the host and what ssh
//! said, so nothing waits forever on a dead agent.

use std::io::{BufWriter, Write};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::error::{Error, ErrorKind, Result};
use crate::location::Remote;
use crate::progress::Observer;
use crate::protocol::frame::read_frame;
use crate::protocol::{FEATURES, Msg, VERSION};
use crate::ssh::{self, SshOptions};

/// How often an agent says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a remote agent may stay silent (no frame, not even `Alive`) before the client gives
/// up on it, unless `--timeout` says otherwise: six missed heartbeats.
pub const DEFAULT_SILENCE: Duration = Duration::from_secs(30);

/// Messages queued per direction. Data messages are up to 1 MiB, so this bounds the memory a
/// link holds while still keeping the pipe full.
const QUEUE: usize = 8;

/// Bytes that crossed the wire.
#[derive(Debug, Default)]
pub struct Wire {
    /// Bytes sent to the peer.
    pub sent: AtomicU64,
    /// Bytes received from the peer.
    pub received: AtomicU64,
}

/// What the peer said about itself in the handshake.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The peer's blksync version.
    pub tool_version: String,
    /// Its host's boot id.
    pub boot_id: Vec<u8>,
}

/// State of the handshake with a remote peer.
enum Hello {
    /// Nothing outstanding.
    Done,
    /// The Hello was sent and its reply not read yet; `ours` is the hash the agent's
    /// executable must have when it is our own build (just uploaded, or from the cache), and
    /// where it came from.
    Pending { ours: Option<(Vec<u8>, &'static str)> },
}

/// A connected peer.
pub struct Link {
    /// `host` for remote peers, `local` otherwise; prefixes error messages.
    pub name: String,
    /// Requests to the peer ([`Link::send`]).
    tx: Sender<Msg>,
    /// Replies from the peer, to be read directly only after the first [`Link::recv`].
    pub rx: Receiver<Msg>,
    /// Wire counters (stay zero for a local peer).
    pub wire: Arc<Wire>,
    /// Handshake facts, once the first reply came ([`Link::info`]).
    info: Mutex<PeerInfo>,
    /// `--timeout`: the longest a transfer through this link may go without progress.
    pub timeout: Option<Duration>,
    /// Set when the connection is gone (the reader stopped), so nobody waits for a reply.
    ended: Arc<std::sync::atomic::AtomicBool>,
    /// Why the watchdog gave the agent up, once it did: whoever next finds the connection gone
    /// says that, not just "lost" (which of them finds it first is a race).
    verdict: Arc<Mutex<Option<String>>>,
    remote: bool,
    /// Whether the Hello reply is still to be read.
    hello: Mutex<Hello>,
    /// Set by `close`: the end of the connection is expected, not an error.
    closing: Arc<std::sync::atomic::AtomicBool>,
    /// The ssh side: its start, its process and threads.
    agent: Mutex<Agent>,
    stderr: Option<Arc<Mutex<Vec<String>>>>,
    /// `close` need not wait for the agent to exit (`allow_quick_close`).
    quick_close: bool,
    /// Replies taken off the queue while the client waited on another link
    /// ([`Link::setting_aside`]), read before the queue's.
    stash: Mutex<std::collections::VecDeque<Msg>>,
}

/// The ssh side of a link, or a local peer's thread.
#[derive(Default)]
struct Agent {
    /// Until the first reply is wanted, ssh runs and the bootstrap waits for its first line,
    /// while requests queue up to ride with it (`Link::start`).
    pending: Option<Box<Pending>>,
    /// Why the start failed: every later request gets it again.
    failed: Option<(ErrorKind, String)>,
    child: Option<Child>,
    /// Writer first (`close` waits for it alone after a quick close).
    threads: Vec<JoinHandle<()>>,
    /// Dropped by `close` to stop the watchdog at once.
    watchdog_stop: Option<Sender<()>>,
    /// What the start found that the user should know, until [`Link::report`] passes it on.
    warnings: Vec<String>,
}

/// What a remote link's start needs.
struct Pending {
    starting: ssh::Starting,
    requests: Receiver<Msg>,
    replies: Sender<Msg>,
    silence: Duration,
}

/// Encodes requests onto the agent's stdin, flushing when the queue is empty so that small frames
/// batch up.
fn spawn_writer(
    mut stdin: BufWriter<std::process::ChildStdin>,
    requests: Receiver<Msg>,
    wire: Arc<Wire>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while let Ok(msg) = requests.recv() {
            let mut next = Some(msg);
            while let Some(msg) = next {
                match msg.write_to(&mut stdin) {
                    Ok(n) => wire.sent.fetch_add(n, Ordering::Relaxed),
                    Err(_) => return,
                };
                next = requests.try_recv().ok();
            }
            if stdin.flush().is_err() {
                return;
            }
        }
    })
}

/// Counts every byte read from the agent as a sign of life.
struct Heard<R> {
    inner: R,
    heard: Arc<AtomicU64>,
    epoch: std::time::Instant,
}

impl<R: std::io::Read> std::io::Read for Heard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.heard.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

impl<R: std::io::BufRead> std::io::BufRead for Heard<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        let buf = self.inner.fill_buf()?;
        if !buf.is_empty() {
            self.heard.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        Ok(buf)
    }
    fn consume(&mut self, n: usize) {
        self.inner.consume(n);
    }
}

/// Ends a link whose agent has gone silent: stopped (SIGSTOP), stuck behind a live sshd, or a
/// hostile one that announced a frame and sent nothing more. It reports the silence as the
/// link's error and kills ssh, so nothing waits on it for ever.
struct Watchdog {
    name: String,
    heard: Arc<AtomicU64>,
    delivering: Arc<std::sync::atomic::AtomicBool>,
    epoch: std::time::Instant,
    silence: Duration,
    closing: Arc<std::sync::atomic::AtomicBool>,
    ended: Arc<std::sync::atomic::AtomicBool>,
    replies: Sender<Msg>,
    pid: u32,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Where the verdict goes for [`Link::lost`].
    verdict: Arc<Mutex<Option<String>>>,
    /// Closed by `Link::close`, which wakes the watchdog at once: its clone of `replies` would
    /// otherwise keep the reply queue open, and `close` waiting, until the next tick.
    stop: Receiver<()>,
}

impl Watchdog {
    fn run(self) {
        let tick = (self.silence / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = self.stop.recv_timeout(tick) {
            // Closed by us, or already dead (the reader said why): nothing to watch, and the pid
            // may soon belong to someone else.
            if self.closing.load(Ordering::Relaxed) || self.ended.load(Ordering::Relaxed) {
                return;
            }
            if self.delivering.load(Ordering::Relaxed) {
                continue;
            }
            let now = self.epoch.elapsed().as_millis() as u64;
            let quiet = Duration::from_millis(now.saturating_sub(self.heard.load(Ordering::Relaxed)));
            if quiet < self.silence {
                continue;
            }
            let message = format!(
                "{}: no word from the agent for {} s (it is stopped, stuck, or the link is down){}",
                self.name,
                self.silence.as_secs(),
                ssh::stderr_tail(&self.stderr)
            );
            *self.verdict.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(message.clone());
            let _ = self.replies.send_timeout(
                Msg::Error { kind: ErrorKind::Connection, message, hint: Some(crate::error::Hint::LongerTimeout) },
                Duration::from_secs(5),
            );
            if let Some(pid) = i32::try_from(self.pid).ok().and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            return;
        }
    }
}

impl Link {
    /// A peer served by a thread of this process.
    #[must_use]
    pub fn local() -> Link {
        let (tx, requests) = bounded(QUEUE);
        let (replies, rx) = bounded(QUEUE);
        let thread = std::thread::spawn(move || crate::peer::serve(&requests, &replies));
        Link {
            name: "local".into(),
            tx,
            rx,
            wire: Arc::new(Wire::default()),
            info: Mutex::new(PeerInfo {
                tool_version: env!("CARGO_PKG_VERSION").into(),
                boot_id: crate::peer::boot_id(),
            }),
            timeout: None,
            ended: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            verdict: Arc::new(Mutex::new(None)),
            remote: false,
            hello: Mutex::new(Hello::Done),
            closing: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            agent: Mutex::new(Agent { threads: vec![thread], ..Agent::default() }),
            stderr: None,
            quick_close: false,
            stash: Mutex::default(),
        }
    }

    /// A link to an agent on `remote` over ssh. ssh starts now; the bootstrap waits until the
    /// first reply is wanted, and every request sent until then rides with its first line
    /// (`Link::start`), the `Hello` first: a slow link pays no round trip for the banner
    /// (issue 13, item 4). So a connection that fails shows at the first call, not here.
    pub fn ssh(remote: &Remote, options: &SshOptions) -> Result<Link> {
        let starting = ssh::spawn(remote, options)?;
        let stderr = starting.stderr();
        let (tx, requests) = bounded::<Msg>(QUEUE);
        let (replies, rx) = bounded::<Msg>(QUEUE);
        let silence = options.timeout.unwrap_or(DEFAULT_SILENCE);
        let pending = Pending { starting, requests, replies, silence };
        let link = Link {
            name: remote.destination(),
            tx,
            rx,
            wire: Arc::new(Wire::default()),
            info: Mutex::new(PeerInfo::default()),
            timeout: options.timeout,
            ended: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            verdict: Arc::new(Mutex::new(None)),
            remote: true,
            hello: Mutex::new(Hello::Done),
            closing: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            agent: Mutex::new(Agent { pending: Some(Box::new(pending)), ..Agent::default() }),
            stderr: Some(stderr),
            quick_close: false,
            stash: Mutex::default(),
        };
        // Which build answers is known only once the bootstrap has spoken, so the hash is always
        // asked for (the agent hashes its executable, a few milliseconds) and compared when the
        // agent is our own build.
        link.send(Msg::Hello { version: VERSION, features: FEATURES, want_exe_hash: true })?;
        Ok(link)
    }

    /// Starts a remote link's agent if it waits: the requests queued so far go with the
    /// bootstrap's first line, then the writer, the reader and the watchdog take over. Called
    /// for the first reply, and for a request that finds the queue full.
    fn start(&self) -> Result<()> {
        let mut agent = self.agent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(pending) = agent.pending.take() else {
            return match &agent.failed {
                Some((kind, message)) => Err(Error::new(*kind, message.clone())),
                None => Ok(()),
            };
        };
        let Pending { starting, requests, replies, silence } = *pending;
        let mut preface = Vec::new();
        while let Ok(msg) = requests.try_recv() {
            msg.write_to(&mut preface).map_err(|e| Error::new(ErrorKind::Io, format!("{}: {e}", self.name)))?;
        }
        self.wire.sent.fetch_add(preface.len() as u64, Ordering::Relaxed);
        let conn = match starting.finish(&preface) {
            Ok(conn) => conn,
            Err(e) => {
                self.ended.store(true, Ordering::Relaxed);
                agent.failed = Some((e.kind(), e.to_string()));
                return Err(e);
            }
        };
        agent.warnings = conn.warnings;
        let ours = if conn.uploaded {
            Some((conn.exe_hash, "uploaded"))
        } else if conn.cached {
            Some((conn.exe_hash, "cached"))
        } else {
            None
        };
        *self.hello.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Hello::Pending { ours };
        let writer = spawn_writer(BufWriter::with_capacity(1 << 20, conn.stdin), requests, Arc::clone(&self.wire));
        let stderr = Arc::clone(&conn.stderr);
        // Liveness (docs/PROTOCOL.md): `heard` is when the agent last sent a byte, in ms since
        // `epoch`; while the reader waits for us to take a reply (`delivering`), the silence is
        // ours, not the agent's.
        let epoch = std::time::Instant::now();
        let heard = Arc::new(AtomicU64::new(0));
        let delivering = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut stdout = Heard { inner: conn.stdout, heard: Arc::clone(&heard), epoch };
        let (reader_heard, reader_delivering) = (Arc::clone(&heard), Arc::clone(&delivering));
        let watchdog_replies = replies.clone();
        let reader_ended = Arc::clone(&self.ended);
        let reader_name = self.name.clone();
        let reader_closing = Arc::clone(&self.closing);
        let reader_wire = Arc::clone(&self.wire);
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let failure = loop {
                match read_frame(&mut stdout, &mut buf) {
                    Ok(Some(kind)) => {
                        reader_wire.received.fetch_add(buf.len() as u64 + 4, Ordering::Relaxed);
                        match Msg::decode(kind, &buf[1..]) {
                            Ok(Msg::Alive) => {}
                            Ok(msg) => {
                                reader_delivering.store(true, Ordering::Relaxed);
                                let sent = replies.send(msg);
                                reader_heard.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                                reader_delivering.store(false, Ordering::Relaxed);
                                if sent.is_err() {
                                    return;
                                }
                            }
                            Err(e) => break e.to_string(),
                        }
                    }
                    Ok(None) => break "the connection closed (agent exited or was killed)".to_string(),
                    Err(e) => break e.to_string(),
                }
            };
            reader_ended.store(true, Ordering::Relaxed);
            if reader_closing.load(Ordering::Relaxed) {
                return;
            }
            // Let ssh's last words reach the stderr collector before quoting them.
            std::thread::sleep(Duration::from_millis(100));
            let message = format!("{reader_name}: {failure}{}", ssh::stderr_tail(&stderr));
            let _ = replies.send(Msg::Error { kind: ErrorKind::Connection, message, hint: None });
        });
        let (watchdog_stop, stop) = bounded::<()>(0);
        let watchdog = Watchdog {
            verdict: Arc::clone(&self.verdict),
            stop,
            name: self.name.clone(),
            heard,
            delivering,
            epoch,
            silence,
            closing: Arc::clone(&self.closing),
            ended: Arc::clone(&self.ended),
            replies: watchdog_replies,
            pid: conn.child.id(),
            stderr: Arc::clone(&conn.stderr),
        };
        let watchdog = std::thread::spawn(move || watchdog.run());
        agent.child = Some(conn.child);
        agent.threads = vec![writer, reader, watchdog];
        agent.watchdog_stop = Some(watchdog_stop);
        Ok(())
    }

    /// Passes what the start found wrong on the way (an unusable `--remote-path`, a replaced
    /// cached agent) to `observer`, once per process for each message.
    pub fn report(&self, observer: &dyn Observer) {
        let warnings =
            std::mem::take(&mut self.agent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).warnings);
        for warning in &warnings {
            warn_once(observer, warning);
        }
    }

    /// What the peer said about itself; defaults until its first reply was read.
    #[must_use]
    pub fn info(&self) -> PeerInfo {
        self.info.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Reads and checks the Hello reply; `ours` is the hash the agent's executable must have when
    /// it is our own build, and where it came from (`uploaded`, `cached`). The agent reports the
    /// hash itself, so this catches a damaged upload or cache entry, never a hostile one (see
    /// docs/PROTOCOL.md, "Trusting the upload cache").
    fn finish_handshake(&self, ours: Option<(&[u8], &str)>) -> Result<()> {
        match self.next_reply()? {
            Msg::HelloReply { version, tool_version, boot_id, exe_hash, .. } => {
                let tool_version = String::from_utf8_lossy(&tool_version).into_owned();
                if version != VERSION {
                    return Err(Error::new(
                        ErrorKind::Connection,
                        format!(
                            "{}: the agent speaks protocol {version} (blksync {tool_version}), this blksync speaks protocol {VERSION} (blksync {})",
                            self.name,
                            env!("CARGO_PKG_VERSION")
                        ),
                    ));
                }
                if let Some((hash, origin)) = ours
                    && hash != exe_hash
                {
                    return Err(Error::new(
                        ErrorKind::Connection,
                        format!(
                            "{}: the {origin} agent does not match this binary (BLAKE3 mismatch); it is damaged, remove it from ~/.cache/blksync there",
                            self.name
                        ),
                    ));
                }
                *self.info.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    PeerInfo { tool_version, boot_id };
                Ok(())
            }
            other => Err(self.unexpected(&other)),
        }
    }

    /// True for an agent over ssh.
    #[must_use]
    pub fn is_remote(&self) -> bool {
        self.remote
    }

    /// The connection is gone: no reply will come.
    #[must_use]
    pub fn is_gone(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    /// Sends a request. One that finds the queue full starts a waiting agent (`Link::start`).
    pub fn send(&self, msg: Msg) -> Result<()> {
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(crossbeam_channel::TrySendError::Full(msg)) => {
                self.start()?;
                self.tx.send(msg).map_err(|_| self.lost())
            }
            // A start that failed says why; otherwise the connection is gone.
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                Err(self.start().err().unwrap_or_else(|| self.lost()))
            }
        }
    }

    /// Sends a request and waits for its reply; peer errors become `Err`.
    pub fn call(&mut self, msg: Msg) -> Result<Msg> {
        self.send(msg)?;
        self.recv()
    }

    /// The next reply; peer errors become `Err`. The first one starts a waiting agent and reads
    /// the `Hello` reply before it. [`Link::rx`] may be read directly only after that.
    pub fn recv(&self) -> Result<Msg> {
        self.start()?;
        let hello =
            std::mem::replace(&mut *self.hello.lock().unwrap_or_else(std::sync::PoisonError::into_inner), Hello::Done);
        if let Hello::Pending { ours } = hello {
            self.finish_handshake(ours.as_ref().map(|(hash, origin)| (hash.as_slice(), *origin)))?;
        }
        self.next_reply()
    }

    fn next_reply(&self) -> Result<Msg> {
        let stashed = self.stash.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop_front();
        match stashed.map_or_else(|| self.rx.recv(), Ok) {
            Ok(Msg::Error { kind, message, hint }) => Err(self.error(kind, message).with_hint(hint)),
            Ok(msg) => Ok(msg),
            Err(_) => Err(self.lost()),
        }
    }

    /// The next reply within `timeout`, as it came (an `Error` too), replies set aside first.
    /// For the routers of a pass, after the first [`Link::recv`].
    pub fn recv_timeout(&self, timeout: Duration) -> std::result::Result<Msg, crossbeam_channel::RecvTimeoutError> {
        if let Some(msg) = self.stash.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop_front() {
            return Ok(msg);
        }
        self.rx.recv_timeout(timeout)
    }

    /// Runs `f` while a thread takes this link's replies off its bounded queue and sets them
    /// aside, so that a peer streaming replies (a scan started early) goes on instead of
    /// waiting for the client, which is busy with another link. Memory stays bounded by what
    /// the peer may send unasked: a scan's window of summaries.
    pub fn setting_aside<R>(&self, f: impl FnOnce() -> R) -> R {
        let (stop, stopped) = bounded::<()>(0);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                loop {
                    crossbeam_channel::select! {
                        recv(self.rx) -> msg => match msg {
                            Ok(msg) => self.stash.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push_back(msg),
                            Err(_) => return,
                        },
                        recv(stopped) -> _ => return,
                    }
                }
            });
            let result = f();
            drop(stop);
            result
        })
    }

    /// A peer-reported error, prefixed with the host for remote peers.
    #[must_use]
    pub fn error(&self, kind: ErrorKind, message: String) -> Error {
        if self.remote && !message.starts_with(&format!("{}:", self.name)) {
            Error::new(kind, message).context(&self.name)
        } else {
            Error::new(kind, message)
        }
    }

    /// A reply that makes no sense at this point.
    #[must_use]
    pub fn unexpected(&self, msg: &Msg) -> Error {
        let mut text = format!("{msg:?}");
        text.truncate(120);
        Error::protocol(format!("{}: unexpected reply {text}", self.name))
    }

    /// The error for a connection found gone: the watchdog's verdict when it gave the agent up,
    /// otherwise that it was lost, with ssh's last words.
    #[must_use]
    pub fn lost(&self) -> Error {
        if let Some(verdict) = self.verdict.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
            return Error::new(ErrorKind::Connection, verdict).with_hint(crate::error::Hint::LongerTimeout);
        }
        let tail = self.stderr.as_ref().map(|s| ssh::stderr_tail(s)).unwrap_or_default();
        Error::new(ErrorKind::Connection, format!("{}: the connection was lost{tail}", self.name))
    }

    /// Lets `close` return once its `Bye` is on the way, without waiting for the agent to exit:
    /// for a session whose endpoints were plain files or devices, whose closing cannot fail and
    /// prints nothing. Waiting would cost a round trip on a slow link (issue 13, item 4).
    pub fn allow_quick_close(&mut self) {
        self.quick_close = true;
    }

    /// Says goodbye and waits, a few seconds at most, for the peer to finish. A peer may be
    /// blocked on a full reply queue (the run ended while it was still answering), so replies
    /// are drained all along; for ssh, the agent is given a moment to exit, then ssh is killed.
    pub fn close(mut self) {
        use crossbeam_channel::TrySendError;
        self.closing.store(true, Ordering::Relaxed);
        let agent = self.agent.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        // An agent that never started has nothing to say goodbye to: ssh goes.
        if let Some(pending) = agent.pending.take() {
            pending.starting.abandon();
            return;
        }
        drop(agent.watchdog_stop.take());
        let mut child = agent.child.take();
        let mut threads = std::mem::take(&mut agent.threads);
        if self.quick_close && child.is_some() {
            let _ = self.tx.try_send(Msg::Bye);
            let (tx, _) = bounded(0);
            drop(std::mem::replace(&mut self.tx, tx));
            // The writer ends once the `Bye` is in ssh's pipe; ssh delivers it and exits with
            // the agent, on its own. Dropping the `Child` neither kills nor waits for it.
            let writer = threads.remove(0);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !writer.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            return;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match self.tx.try_send(Msg::Bye) {
                Err(TrySendError::Full(_)) if std::time::Instant::now() < deadline => {
                    while self.rx.try_recv().is_ok() {}
                    std::thread::sleep(Duration::from_millis(1));
                }
                // Sent, the peer is gone, or it is stuck past the deadline.
                _ => break,
            }
        }
        let (tx, _) = bounded(0);
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(child) = child.as_mut() {
            for _ in 0..50 {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                while self.rx.try_recv().is_ok() {}
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Drain until the peer's end of the reply queue closes, so its threads can finish.
        while std::time::Instant::now() < deadline {
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(_) | Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        let (_, rx) = bounded(0);
        drop(std::mem::replace(&mut self.rx, rx));
        for t in threads {
            // A thread still stuck after the deadline is left to end with the process.
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// Passes `message` to `observer` unless this process already did: one command may connect to a
/// host several times (both sides of a sync, the inputs and output of a merge), and a warning
/// about how that host is reached is worth reading once.
fn warn_once(observer: &dyn Observer, message: &str) {
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !seen.iter().any(|m| m == message) {
        seen.push(message.to_string());
        observer.warn(message);
    }
}
