//! The full feature phase of one session (docs/ISCSI.md, "Full feature phase"): many SCSI
//! commands in flight on one connection, within the target's `CmdSN` window.
//!
//! ```text
//!  callers ──register (state lock: ITT, `CmdSN`)──▶ outgoing queue ──▶ writer thread ──▶ socket
//!  reader thread ◀── PDUs ──────────────────────────────────────────────────────────── socket
//!      ├─ Data-In: into the task's buffer (in order, within its length)
//!      ├─ R2T: queues Data-Out PDUs from the task's data
//!      ├─ NOP-In with a TTT: queues the NOP-Out answer
//!      └─ SCSI Response, or Data-In with status: completes the task; its caller wakes
//! ```
//!
//! Only the writer thread writes to the socket, and the reader never waits for it (the queue is
//! unbounded; it holds at most the PDUs of the commands in flight), so the reader always drains
//! the socket and a target blocked on a full send buffer cannot deadlock against us. Commands
//! are numbered and queued in one step under the state lock, so they reach the target in `CmdSN`
//! order. When the reader stops (end of file, an error, a protocol violation), every task in
//! flight fails with the cause, and so does every later command.
//!
//! Nothing waits forever on a target that stops answering either: the reader wakes every tick
//! (a socket read timeout) while the socket is silent; with commands outstanding and nothing
//! heard for half the session's timeout it sends a NOP-Out ping (ITT ≠ 0xffffffff, which the
//! target must answer with a NOP-In), and after the whole timeout it ends the session.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::login::{Link, Negotiated, seconds};
use crate::pdu::{self, Digests, Pdu, RESERVED_TAG, WireError, flag, opcode};
use crate::scsi::Cdb;

/// How long a logout may wait for its answer.
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(10);
/// Sense data kept (SPC-4: 252 bytes at most).
const MAX_SENSE: usize = 252;
/// Bytes of read buffers kept for reuse: a fresh 256 KiB buffer is an `mmap` and 64 page
/// faults, which cost more CPU than the network copy on a fast link.
const POOL_BYTES: usize = 16 << 20;
/// The longest the reader sleeps on a silent socket before it looks at the clock.
const MAX_TICK: Duration = Duration::from_secs(1);
/// The reader's buffer: small, so that a large Data-In segment is read from the socket straight
/// into the task's buffer (`BufReader` bypasses itself for reads larger than it), while the
/// 48-byte headers still come a few per system call.
const READ_BUFFER: usize = 16 << 10;

/// Why a command failed without a SCSI status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The connection is gone (closed, broken, logged out, or the target asked to end it).
    Connection(String),
    /// The target broke the protocol; the connection was closed.
    Protocol(String),
}

/// A command's data direction.
pub(crate) enum Data {
    /// No data.
    None,
    /// Data from the target: at most this many bytes.
    In(u32),
    /// Data to the target: this range of a shared buffer.
    Out(Arc<Vec<u8>>, Range<usize>),
}

impl Data {
    /// The same data again (the buffer is shared, not copied), for a command sent again.
    pub(crate) fn again(&self) -> Data {
        match self {
            Data::None => Data::None,
            Data::In(n) => Data::In(*n),
            Data::Out(buf, range) => Data::Out(Arc::clone(buf), range.clone()),
        }
    }
}

/// A completed command: its SCSI status, sense and data.
#[derive(Debug)]
pub(crate) struct Response {
    /// The iSCSI response code (0: command completed at the target).
    pub response: u8,
    /// SCSI status.
    pub status: u8,
    /// Sense data (CHECK CONDITION).
    pub sense: Vec<u8>,
    /// Data-In received (only the bytes that came).
    pub data: Vec<u8>,
}

pub(crate) type Completion = Result<Response, Cause>;

/// Where the completions of a group of commands arrive: their caller sleeps once, until the
/// last one is in, instead of waking for each (a 2 MiB read is eight commands).
#[derive(Default)]
pub(crate) struct Batch {
    state: Mutex<BatchState>,
    done: Condvar,
}

#[derive(Default)]
struct BatchState {
    results: Vec<Option<Completion>>,
    pending: usize,
}

impl Batch {
    pub(crate) fn new() -> Arc<Batch> {
        Arc::new(Batch::default())
    }

    fn lock(&self) -> MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for one more completion.
    fn add(&self) -> usize {
        let mut b = self.lock();
        b.results.push(None);
        b.pending += 1;
        b.results.len() - 1
    }

    fn complete(&self, slot: usize, completion: Completion) {
        let mut b = self.lock();
        if b.results[slot].is_none() {
            b.results[slot] = Some(completion);
            b.pending -= 1;
            if b.pending == 0 {
                self.done.notify_one();
            }
        }
    }

    /// Waits for every command submitted with this batch; their completions, in submission
    /// order.
    pub(crate) fn wait(&self) -> Vec<Completion> {
        let mut b = self.lock();
        while b.pending > 0 {
            b = self.done.wait(b).unwrap_or_else(PoisonError::into_inner);
        }
        std::mem::take(&mut b.results)
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Cause::Connection("the session ended".into()))))
            .collect()
    }
}

/// A task's place in its batch. A task dropped unanswered (it cannot be, but a caller must
/// never sleep for ever on a bug) fails as a lost connection.
struct Reply {
    batch: Arc<Batch>,
    slot: usize,
    sent: bool,
}

impl Reply {
    fn send(mut self, completion: Completion) {
        self.sent = true;
        self.batch.complete(self.slot, completion);
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.sent {
            self.batch.complete(self.slot, Err(Cause::Connection("the session ended".into())));
        }
    }
}

enum Kind {
    None,
    Read { buf: Vec<u8>, received: usize },
    Write { data: Arc<Vec<u8>>, range: Range<usize> },
}

struct Task {
    kind: Kind,
    lun: [u8; 8],
    reply: Reply,
}

/// What the writer thread sends: a header, then maybe data from a shared buffer.
enum Out {
    Pdu { header: Vec<u8>, data: Option<(Arc<Vec<u8>>, Range<usize>)> },
    Stop,
}

struct State {
    cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    next_itt: u32,
    tasks: HashMap<u32, Task>,
    dead: Option<Cause>,
    logout: Option<(u32, Sender<bool>)>,
    /// The ITT of our NOP-Out ping while its NOP-In is awaited.
    ping: Option<u32>,
    /// The reader holds a task out of the table while it reads its Data-In.
    receiving: bool,
    /// Threads waiting on `Shared::changed` (a notification costs a system call even when
    /// nobody waits, so it is sent only when somebody does).
    waiters: usize,
}

impl State {
    /// A free Initiator Task Tag (never the reserved one, never one in flight).
    fn new_itt(&mut self) -> u32 {
        loop {
            let itt = self.next_itt;
            self.next_itt = self.next_itt.wrapping_add(1);
            if itt != RESERVED_TAG && !self.tasks.contains_key(&itt) && self.ping != Some(itt) {
                break itt;
            }
        }
    }

    /// Whether the target owes us an answer.
    fn outstanding(&self) -> bool {
        !self.tasks.is_empty() || self.logout.is_some() || self.receiving
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    out: Mutex<Sender<Out>>,
    socket: TcpStream,
    terms: Negotiated,
    pool: Mutex<Vec<Vec<u8>>>,
    /// How long the target may be silent while it owes us an answer.
    timeout: Duration,
    /// The clock of `heard`.
    epoch: Instant,
    /// Milliseconds after `epoch` when bytes last came from the target, or when it began to owe
    /// us an answer after a quiet spell.
    heard: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue(&self, out: Out) {
        // A send fails only when the writer has stopped, and then the session is dead anyway.
        let _ = self.out.lock().unwrap_or_else(PoisonError::into_inner).send(out);
    }

    /// Ends the session: every task fails with the first cause; the socket is shut so that
    /// both threads stop.
    fn die(&self, cause: Cause) {
        let mut state = self.lock();
        let cause = state.dead.get_or_insert(cause).clone();
        for (_, task) in state.tasks.drain() {
            task.reply.send(Err(cause.clone()));
        }
        state.logout = None;
        drop(state);
        self.changed.notify_all();
        let _ = self.socket.shutdown(Shutdown::Both);
        self.queue(Out::Stop);
    }

    /// Unlocks the state and wakes whoever waits for it to change (a window that opened, a
    /// task that completed).
    fn release(&self, state: MutexGuard<'_, State>) {
        let wake = state.waiters > 0;
        drop(state);
        if wake {
            self.changed.notify_all();
        }
    }

    /// Waits for the state to change.
    fn wait_changed<'a>(&self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        state.waiters += 1;
        let mut state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        state.waiters -= 1;
        state
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Something came from the target (or the silence starts counting from now).
    fn heard(&self) {
        self.heard.store(self.now(), Ordering::Relaxed);
    }

    /// The socket has been silent for a tick: with answers owed, a ping after half the timeout,
    /// and after all of it the cause that ends the session.
    fn silence(&self) -> Option<Cause> {
        let mut state = self.lock();
        if state.dead.is_some() {
            return None;
        }
        if !state.outstanding() {
            // Idle is not silence: the engine may be busy elsewhere for as long as it likes.
            self.heard();
            return None;
        }
        let quiet = self.now().saturating_sub(self.heard.load(Ordering::Relaxed));
        let timeout = self.timeout.as_millis() as u64;
        if quiet >= timeout {
            return Some(Cause::Connection(format!(
                "no answer from the target for {}, not even to a NOP-Out ping; ?timeout=SECONDS in the address waits longer",
                seconds(self.timeout)
            )));
        }
        if quiet >= timeout / 2 && state.ping.is_none() {
            // RFC 7143 §11.18: a NOP-Out with a task tag asks for a NOP-In with the same tag;
            // immediate, so that a closed CmdSN window does not hold it back.
            let itt = state.new_itt();
            let mut ping = Pdu::new(opcode::NOP_OUT);
            ping.set_immediate();
            ping.bhs[1] = flag::FINAL;
            ping.set_u32(16, itt);
            ping.set_u32(20, RESERVED_TAG);
            ping.set_u32(24, state.cmd_sn);
            ping.set_u32(28, state.exp_stat_sn);
            state.ping = Some(itt);
            self.queue(Out::Pdu { header: pdu::header(&ping.bhs, 0, self.terms.digests), data: None });
        }
        None
    }

    /// Takes `ExpCmdSN`/`MaxCmdSN` from a target PDU (RFC 7143 §4.2.2.1: only a sane pair, and
    /// `MaxCmdSN` only forwards).
    fn window(state: &mut State, pdu: &Pdu) -> bool {
        let (exp, max) = pdu.cmd_window();
        if pdu::sn_after(exp, max.wrapping_add(1)) || !pdu::sn_after(max, state.max_cmd_sn) {
            return false;
        }
        state.max_cmd_sn = max;
        true
    }
}

/// The reader's side of the socket: notes when bytes arrive, and while none do, wakes every
/// tick to ping the target or give up on it ([`Shared::silence`]). A tick never reaches the
/// PDU decoder, so a timeout in the middle of a PDU does not lose its place.
struct Watched {
    stream: TcpStream,
    shared: Arc<Shared>,
}

impl Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Ok(n) => {
                    if n > 0 {
                        self.shared.heard();
                    }
                    return Ok(n);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if let Some(cause) = self.shared.silence() {
                        self.shared.die(cause);
                        return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the target went silent"));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

type Input = BufReader<Watched>;

/// One session in the full feature phase.
pub(crate) struct Session {
    shared: Arc<Shared>,
    depth: usize,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Session {
    /// Starts the reader and writer threads on a logged-in link. `timeout`: how long the
    /// target may be silent while it owes an answer.
    pub(crate) fn start(link: Link, terms: Negotiated, depth: usize, timeout: Duration) -> std::io::Result<Session> {
        let timeout = timeout.max(Duration::from_millis(4));
        link.stream.set_read_timeout(Some((timeout / 4).min(MAX_TICK)))?;
        let reading = link.stream.try_clone()?;
        let writing = link.stream.try_clone()?;
        let (tx, rx) = channel();
        let state = State {
            cmd_sn: link.cmd_sn,
            max_cmd_sn: link.max_cmd_sn,
            exp_stat_sn: link.exp_stat_sn,
            next_itt: link.next_itt,
            tasks: HashMap::new(),
            dead: None,
            logout: None,
            ping: None,
            receiving: false,
            waiters: 0,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            out: Mutex::new(tx),
            socket: link.stream,
            terms,
            pool: Mutex::new(Vec::new()),
            timeout,
            epoch: Instant::now(),
            heard: AtomicU64::new(0),
        });
        let for_writer = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("iscsi-writer".into())
            .spawn(move || write_loop(&for_writer, BufWriter::with_capacity(256 << 10, writing), &rx))?;
        let for_reader = Arc::clone(&shared);
        let reader = std::thread::Builder::new().name("iscsi-reader".into()).spawn(move || {
            let watched = Watched { stream: reading, shared: Arc::clone(&for_reader) };
            let mut input = BufReader::with_capacity(READ_BUFFER, watched);
            let cause = loop {
                if let Err(cause) = read_one(&for_reader, &mut input) {
                    break cause;
                }
            };
            for_reader.die(cause);
        })?;
        Ok(Session { shared, depth: depth.max(1), threads: Mutex::new(vec![writer, reader]) })
    }

    /// What the login agreed on.
    pub(crate) fn terms(&self) -> &Negotiated {
        &self.shared.terms
    }

    /// Sends a command whose completion will arrive in `batch`. Waits while the `CmdSN` window
    /// is shut or `depth` commands are in flight.
    pub(crate) fn submit(&self, lun: [u8; 8], cdb: &Cdb, data: Data, batch: &Arc<Batch>) -> Result<(), Cause> {
        let terms = self.shared.terms;
        let mut state = self.shared.lock();
        loop {
            if let Some(cause) = &state.dead {
                return Err(cause.clone());
            }
            let window_open = !pdu::sn_after(state.cmd_sn, state.max_cmd_sn);
            if window_open && state.tasks.len() < self.depth && state.logout.is_none() {
                break;
            }
            state = self.shared.wait_changed(state);
        }
        if !state.outstanding() {
            // The silence that counts starts now, not at the last answer before an idle spell.
            self.shared.heard();
        }
        let itt = state.new_itt();
        let cmd_sn = state.cmd_sn;
        state.cmd_sn = state.cmd_sn.wrapping_add(1);
        let mut pdu = Pdu::new(opcode::SCSI_COMMAND);
        pdu.bhs[8..16].copy_from_slice(&lun);
        pdu.set_u32(16, itt);
        pdu.set_u32(24, cmd_sn);
        pdu.set_u32(28, state.exp_stat_sn);
        pdu.bhs[32..48].copy_from_slice(cdb);
        let mut flags = flag::ATTR_SIMPLE;
        let (kind, expected, immediate, unsolicited) = match data {
            Data::None => (Kind::None, 0, None, 0..0),
            Data::In(len) => {
                flags |= flag::READ;
                (Kind::Read { buf: self.buffer(len as usize), received: 0 }, len, None, 0..0)
            }
            Data::Out(buf, range) => {
                flags |= flag::WRITE;
                let len = range.len();
                let first = (terms.first_burst as usize).min(len);
                let imm = if terms.immediate_data { first.min(terms.target_mrdsl as usize) } else { 0 };
                let unsolicited = if terms.initial_r2t { 0..0 } else { imm..first };
                let immediate = (imm > 0).then(|| (Arc::clone(&buf), range.start..range.start + imm));
                (Kind::Write { data: buf, range }, len as u32, immediate, unsolicited)
            }
        };
        if unsolicited.is_empty() {
            flags |= flag::FINAL;
        }
        pdu.bhs[1] = flags;
        pdu.set_u32(20, expected);
        let imm_len = immediate.as_ref().map_or(0, |(_, r)| r.len());
        self.shared.queue(Out::Pdu { header: pdu::header(&pdu.bhs, imm_len, terms.digests), data: immediate });
        if let Kind::Write { data, range } = &kind
            && !unsolicited.is_empty()
        {
            let base = range.start;
            data_out(&self.shared, &state, data, base, (itt, RESERVED_TAG, lun), unsolicited);
        }
        let reply = Reply { batch: Arc::clone(batch), slot: batch.add(), sent: false };
        state.tasks.insert(itt, Task { kind, lun, reply });
        Ok(())
    }

    /// One command, waited for.
    pub(crate) fn run(&self, lun: [u8; 8], cdb: &Cdb, data: Data) -> Completion {
        let batch = Batch::new();
        self.submit(lun, cdb, data, &batch)?;
        batch.wait().pop().unwrap_or_else(|| Err(self.dead_cause()))
    }

    /// A buffer of `len` bytes, recycled when one is at hand (its old bytes are overwritten by
    /// the Data-In before anyone sees them: only what arrived is handed out).
    pub(crate) fn buffer(&self, len: usize) -> Vec<u8> {
        let mut pool = self.shared.pool.lock().unwrap_or_else(PoisonError::into_inner);
        match pool.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = pool.swap_remove(i);
                b.resize(len, 0);
                b
            }
            None => vec![0; len],
        }
    }

    /// Gives a read's buffer back for reuse.
    pub(crate) fn recycle(&self, buf: Vec<u8>) {
        let mut pool = self.shared.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.iter().map(Vec::capacity).sum::<usize>() + buf.capacity() <= POOL_BYTES {
            pool.push(buf);
        }
    }

    fn dead_cause(&self) -> Cause {
        self.shared.lock().dead.clone().unwrap_or_else(|| Cause::Connection("the session ended".into()))
    }

    /// Why the session is unusable, if it is.
    pub(crate) fn dead(&self) -> Option<Cause> {
        self.shared.lock().dead.clone()
    }

    /// Waits for the commands in flight, logs out (waiting for the answer at most 10 s), and
    /// stops both threads. Returns whether the target confirmed the logout.
    pub(crate) fn logout(&self) -> bool {
        let mut state = self.shared.lock();
        while !state.tasks.is_empty() && state.dead.is_none() {
            state = self.shared.wait_changed(state);
        }
        let mut confirmed = false;
        if state.dead.is_none() && state.logout.is_none() {
            let (tx, rx) = channel();
            let itt = state.new_itt();
            self.shared.heard();
            let mut req = Pdu::new(opcode::LOGOUT_REQUEST);
            req.set_immediate();
            req.bhs[1] = flag::FINAL;
            req.set_u32(16, itt);
            req.set_u32(24, state.cmd_sn);
            req.set_u32(28, state.exp_stat_sn);
            state.logout = Some((itt, tx));
            self.shared.queue(Out::Pdu { header: pdu::header(&req.bhs, 0, self.shared.terms.digests), data: None });
            drop(state);
            confirmed = rx.recv_timeout(LOGOUT_TIMEOUT).unwrap_or(false);
        } else {
            drop(state);
        }
        self.shared.die(Cause::Connection("the session was logged out".into()));
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            let _ = t.join();
        }
        confirmed
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.die(Cause::Connection("the session was closed".into()));
        for t in std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner)) {
            let _ = t.join();
        }
    }
}

/// Queues the Data-Out PDUs of `[rel.start, rel.end)` of a write (relative to its data), each
/// at most the target's `MaxRecvDataSegmentLength`, `DataSN` from 0, F on the last.
fn data_out(
    shared: &Shared,
    state: &State,
    data: &Arc<Vec<u8>>,
    base: usize,
    tags: (u32, u32, [u8; 8]),
    rel: Range<usize>,
) {
    let (itt, ttt, lun) = tags;
    let max = shared.terms.target_mrdsl as usize;
    let mut at = rel.start;
    let mut sn = 0u32;
    while at < rel.end {
        let n = (rel.end - at).min(max);
        let mut pdu = Pdu::new(opcode::DATA_OUT);
        if at + n == rel.end {
            pdu.bhs[1] = flag::FINAL;
        }
        pdu.bhs[8..16].copy_from_slice(&lun);
        pdu.set_u32(16, itt);
        pdu.set_u32(20, ttt);
        pdu.set_u32(28, state.exp_stat_sn);
        pdu.set_u32(36, sn);
        pdu.set_u32(40, at as u32);
        let header = pdu::header(&pdu.bhs, n, shared.terms.digests);
        shared.queue(Out::Pdu { header, data: Some((Arc::clone(data), base + at..base + at + n)) });
        at += n;
        sn += 1;
    }
}

fn write_loop(shared: &Shared, mut output: BufWriter<TcpStream>, rx: &Receiver<Out>) {
    let digests = shared.terms.digests;
    let mut next = rx.recv().ok();
    while let Some(Out::Pdu { header, data }) = next {
        let mut sent = output.write_all(&header);
        if let (Ok(()), Some((buf, range))) = (&sent, data) {
            let part = &buf[range];
            sent = output.write_all(part).and_then(|()| output.write_all(&pdu::trailer(&[part], digests)));
        }
        // Flush only when nothing else is queued: PDUs queued together leave in one write.
        next = rx.try_recv().ok();
        if sent.is_ok() && next.is_none() {
            sent = output.flush();
            next = rx.recv().ok();
        }
        if let Err(e) = sent {
            shared.die(Cause::Connection(format!("sending to the target failed: {e}")));
            return;
        }
    }
}

fn protocol(why: impl Into<String>) -> Cause {
    Cause::Protocol(why.into())
}

fn wire(e: WireError) -> Cause {
    match e {
        WireError::Protocol(why) => Cause::Protocol(why),
        other => Cause::Connection(other.to_string()),
    }
}

/// Reads one PDU from the target and acts on it.
fn read_one(shared: &Shared, input: &mut Input) -> Result<(), Cause> {
    let terms = shared.terms;
    let digests: Digests = terms.digests;
    let pdu = pdu::read_header(input, digests).map_err(wire)?;
    let len = pdu.announced_data_len();
    if len > terms.our_mrdsl as usize {
        return Err(protocol(format!(
            "a data segment of {len} bytes, more than our MaxRecvDataSegmentLength of {}",
            terms.our_mrdsl
        )));
    }
    let itt = pdu.itt();
    match pdu.opcode() {
        opcode::DATA_IN => data_in(shared, input, &pdu, len),
        opcode::SCSI_RESPONSE => scsi_response(shared, input, &pdu, len),
        opcode::R2T => r2t(shared, &pdu, len),
        opcode::NOP_IN => nop_in(shared, input, &pdu, len),
        opcode::LOGOUT_RESPONSE => {
            let _ = pdu::read_data(input, len, len, digests).map_err(wire)?;
            let mut state = shared.lock();
            Shared::window(&mut state, &pdu);
            match state.logout.take() {
                Some((want, tx)) if want == itt => {
                    let _ = tx.send(pdu.bhs[2] == 0);
                    Ok(())
                }
                _ => Err(protocol("a Logout Response to no logout")),
            }
        }
        opcode::ASYNC => {
            let _ = pdu::read_data(input, len, len, digests).map_err(wire)?;
            let mut state = shared.lock();
            Shared::window(&mut state, &pdu);
            state.exp_stat_sn = pdu.stat_sn().wrapping_add(1);
            shared.release(state);
            match pdu.bhs[36] {
                0 | 255 => Ok(()),
                1 => Err(Cause::Connection("the target asked for a logout (asynchronous event 1)".into())),
                2 => Err(Cause::Connection("the target is dropping the connection (asynchronous event 2)".into())),
                3 => Err(Cause::Connection("the target is dropping the session (asynchronous event 3)".into())),
                e => Err(Cause::Connection(format!("the target sent asynchronous event {e}"))),
            }
        }
        opcode::REJECT => {
            let data = pdu::read_data(input, len, len, digests).map_err(wire)?;
            let reason = pdu.bhs[2];
            let rejected =
                (data.len() >= pdu::BHS_LEN).then(|| u32::from_be_bytes([data[16], data[17], data[18], data[19]]));
            let mut state = shared.lock();
            Shared::window(&mut state, &pdu);
            state.exp_stat_sn = pdu.stat_sn().wrapping_add(1);
            let why = format!("the target rejected a PDU (reason {reason:#04x})");
            if rejected.is_some() && rejected == state.ping {
                // A target that refuses pings still answered: it is alive.
                state.ping = None;
                return Ok(());
            }
            match rejected.and_then(|itt| state.tasks.remove(&itt)) {
                Some(task) => {
                    task.reply.send(Err(Cause::Protocol(why)));
                    shared.release(state);
                    Ok(())
                }
                None => Err(Cause::Protocol(why)),
            }
        }
        other => Err(protocol(format!("a PDU of opcode {other:#04x} in the full feature phase"))),
    }
}

/// A SCSI Response: status and sense complete the task.
fn scsi_response(shared: &Shared, input: &mut Input, pdu: &Pdu, len: usize) -> Result<(), Cause> {
    let itt = pdu.itt();
    let data = pdu::read_data(input, len, len, shared.terms.digests).map_err(wire)?;
    let sense = if data.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
        if n + 2 > data.len() {
            return Err(protocol(format!("SenseLength {n} in a data segment of {} bytes", data.len())));
        }
        data[2..2 + n.min(MAX_SENSE)].to_vec()
    } else {
        Vec::new()
    };
    let mut state = shared.lock();
    Shared::window(&mut state, pdu);
    state.exp_stat_sn = pdu.stat_sn().wrapping_add(1);
    let task = state
        .tasks
        .remove(&itt)
        .ok_or_else(|| protocol(format!("a SCSI Response for task {itt:#x}, which is not in flight")))?;
    let data = match task.kind {
        Kind::Read { mut buf, received } => {
            buf.truncate(received);
            buf
        }
        _ => Vec::new(),
    };
    task.reply.send(Ok(Response { response: pdu.bhs[2], status: pdu.bhs[3], sense, data }));
    shared.release(state);
    Ok(())
}

/// An R2T: the Data-Out PDUs of the range it asks for are queued.
fn r2t(shared: &Shared, pdu: &Pdu, len: usize) -> Result<(), Cause> {
    let itt = pdu.itt();
    let terms = shared.terms;
    if len != 0 {
        return Err(protocol("an R2T with data"));
    }
    let mut state = shared.lock();
    let moved = Shared::window(&mut state, pdu);
    let Some(Task { kind: Kind::Write { data, range }, lun, .. }) = state.tasks.get(&itt) else {
        return Err(protocol(format!("an R2T for task {itt:#x}, which is no write in flight")));
    };
    let (offset, want) = (pdu.u32_at(40) as usize, pdu.u32_at(44) as usize);
    if want == 0 || want > terms.max_burst as usize || offset.checked_add(want).is_none_or(|e| e > range.len()) {
        return Err(protocol(format!(
            "an R2T for bytes {offset}+{want} of a write of {} (MaxBurstLength {})",
            range.len(),
            terms.max_burst
        )));
    }
    let (data, base, lun) = (Arc::clone(data), range.start, *lun);
    data_out(shared, &state, &data, base, (itt, pdu.ttt(), lun), offset..offset + want);
    if moved {
        shared.release(state);
    }
    Ok(())
}

/// A NOP-In: a ping (a TTT) is answered; either way it may open the window.
fn nop_in(shared: &Shared, input: &mut Input, pdu: &Pdu, len: usize) -> Result<(), Cause> {
    let itt = pdu.itt();
    let digests = shared.terms.digests;
    let data = pdu::read_data(input, len, len, digests).map_err(wire)?;
    let mut state = shared.lock();
    if itt != RESERVED_TAG {
        // The answer to our ping (RFC 7143 §11.19: it carries, and advances, StatSN).
        if state.ping != Some(itt) {
            return Err(protocol("a NOP-In answering a NOP-Out we never sent"));
        }
        state.ping = None;
        Shared::window(&mut state, pdu);
        state.exp_stat_sn = pdu.stat_sn().wrapping_add(1);
        shared.release(state);
        return Ok(());
    }
    let moved = Shared::window(&mut state, pdu);
    if pdu.ttt() != RESERVED_TAG {
        // A ping: answer with the same TTT and LUN, echoing its data.
        let mut out = Pdu::new(opcode::NOP_OUT);
        out.set_immediate();
        out.bhs[1] = flag::FINAL;
        out.bhs[8..16].copy_from_slice(&pdu.bhs[8..16]);
        out.set_u32(16, RESERVED_TAG);
        out.set_u32(20, pdu.ttt());
        out.set_u32(24, state.cmd_sn);
        out.set_u32(28, state.exp_stat_sn);
        let n = data.len();
        let payload = (n > 0).then(|| (Arc::new(data), 0..n));
        shared.queue(Out::Pdu { header: pdu::header(&out.bhs, n, digests), data: payload });
    }
    if moved {
        shared.release(state);
    }
    Ok(())
}

/// A Data-In PDU: its data straight into the task's buffer, in order and within its length.
fn data_in(shared: &Shared, input: &mut Input, pdu: &Pdu, len: usize) -> Result<(), Cause> {
    let itt = pdu.itt();
    let flags = pdu.flags();
    if flags & flag::ACK != 0 {
        return Err(protocol("a Data-In asking for an acknowledgement (ErrorRecoveryLevel 0 has none)"));
    }
    if flags & flag::STATUS != 0 && flags & flag::FINAL == 0 {
        return Err(protocol("a Data-In with status but without F"));
    }
    // The task is out of the table while its data is read (no lock held during I/O); on any
    // error it goes back, so that dying fails it with the others.
    let mut task = {
        let mut state = shared.lock();
        let task = state
            .tasks
            .remove(&itt)
            .ok_or_else(|| protocol(format!("a Data-In for task {itt:#x}, which is not in flight")))?;
        // Still owed while it is out of the table: a target that stops mid-PDU times out.
        state.receiving = true;
        task
    };
    let result = (|| {
        let Kind::Read { buf, received } = &mut task.kind else {
            return Err(protocol(format!("a Data-In for task {itt:#x}, which is no read")));
        };
        let offset = pdu.u32_at(40) as usize;
        if offset != *received || offset + len > buf.len() {
            return Err(protocol(format!(
                "a Data-In for bytes {offset}+{len} after {} of {} bytes (out of order or too long)",
                *received,
                buf.len()
            )));
        }
        pdu::read_data_into(input, &mut buf[offset..offset + len], shared.terms.digests).map_err(wire)?;
        *received += len;
        Ok(())
    })();
    let mut state = shared.lock();
    state.receiving = false;
    if let Some(cause) = &state.dead {
        // The session died while the data was read (the writer failed): the task missed the
        // roll call of `die` and fails here.
        let cause = cause.clone();
        task.reply.send(Err(cause));
        return result;
    }
    let moved = Shared::window(&mut state, pdu);
    if result.is_err() || flags & flag::STATUS == 0 {
        state.tasks.insert(itt, task);
        if moved {
            shared.release(state);
        }
        return result;
    }
    state.exp_stat_sn = pdu.stat_sn().wrapping_add(1);
    let data = match task.kind {
        Kind::Read { mut buf, received } => {
            buf.truncate(received);
            buf
        }
        _ => Vec::new(),
    };
    task.reply.send(Ok(Response { response: 0, status: pdu.bhs[3], sense: Vec::new(), data }));
    shared.release(state);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi;
    use std::io::Read;
    use std::net::TcpListener;

    fn terms() -> Negotiated {
        Negotiated {
            digests: Digests::default(),
            target_mrdsl: 8192,
            our_mrdsl: 1 << 18,
            max_burst: 1 << 18,
            first_burst: 1 << 16,
            immediate_data: true,
            initial_r2t: true,
            tsih: 1,
        }
    }

    fn pair() -> (Link, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut link = Link::new(client, "test".into(), "test".into(), Duration::from_secs(30));
        link.max_cmd_sn = 64;
        (link, server)
    }

    /// Seeded random PDUs from a fake target end every command in a result or an error: no
    /// panic, no hang, no allocation beyond the bounds, whatever the bytes.
    #[test]
    fn random_target_pdus_end_in_errors_never_in_panics_or_hangs() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let (link, mut server) = pair();
            let mut bytes = Vec::new();
            for _ in 0..=next() % 5 {
                let ops = [
                    opcode::DATA_IN,
                    opcode::SCSI_RESPONSE,
                    opcode::R2T,
                    opcode::NOP_IN,
                    opcode::REJECT,
                    opcode::ASYNC,
                    next() as u8,
                ];
                let mut p = Pdu::new(ops[(next() % 7) as usize]);
                p.bhs[1] = next() as u8;
                p.bhs[3] = (next() % 3) as u8;
                p.set_u32(16, (next() % 3) as u32 + 1);
                p.set_u32(20, if next() % 2 == 0 { RESERVED_TAG } else { next() as u32 });
                p.set_u32(32, 100);
                p.set_u32(40, (next() % 3) as u32 * 512);
                p.set_u32(44, if next() % 4 == 0 { next() as u32 } else { (next() % 3) as u32 * 512 });
                p.data = (0..next() % 1100).map(|_| next() as u8).collect();
                let mut wire = p.encode(Digests::default());
                if next() % 6 == 0 {
                    wire[5] = 0xff;
                }
                bytes.extend(wire);
            }
            let session = Session::start(link, terms(), 4, Duration::from_secs(30)).unwrap();
            let feeder = std::thread::spawn(move || {
                let _ = server.write_all(&bytes);
                let _ = server.shutdown(Shutdown::Write);
                let _ = std::io::copy(&mut server, &mut std::io::sink());
            });
            let write = Arc::new(vec![7u8; 4096]);
            let batch = Batch::new();
            let _ = session.submit(scsi::lun_field(1), &scsi::read16(0, 2), Data::In(1024), &batch);
            let _ = session.submit(scsi::lun_field(1), &scsi::write16(0, 8), Data::Out(write, 0..4096), &batch);
            let _ = session.submit(scsi::lun_field(1), &scsi::test_unit_ready(), Data::None, &batch);
            let _ = batch.wait();
            drop(session);
            feeder.join().unwrap();
        }
    }

    /// With `InitialR2T=No`, unsolicited Data-Out (TTT 0xffffffff) follows the immediate data up
    /// to `FirstBurstLength`, and the command PDU does not say F; the rest waits for an R2T.
    #[test]
    fn unsolicited_data_follows_immediate_data_when_initial_r2t_is_no() {
        let (link, mut server) = pair();
        let t = Negotiated { initial_r2t: false, first_burst: 16384, target_mrdsl: 4096, ..terms() };
        let session = Session::start(link, t, 4, Duration::from_secs(30)).unwrap();
        let target = std::thread::spawn(move || {
            let mut input = server.try_clone().unwrap();
            let cmd = pdu::read_pdu(&mut input, Digests::default(), 1 << 20).unwrap();
            assert_eq!((cmd.data.len(), cmd.flags() & flag::FINAL), (4096, 0));
            let mut got = cmd.data.clone();
            for sn in 0..3 {
                let d = pdu::read_pdu(&mut input, Digests::default(), 1 << 20).unwrap();
                assert_eq!(
                    (d.opcode(), d.ttt(), d.u32_at(36), d.u32_at(40) as usize),
                    (opcode::DATA_OUT, RESERVED_TAG, sn, got.len())
                );
                assert_eq!(d.flags() & flag::FINAL != 0, sn == 2);
                got.extend_from_slice(&d.data);
            }
            let mut r2t = Pdu::new(opcode::R2T);
            r2t.set_u32(16, cmd.itt());
            r2t.set_u32(20, 9);
            r2t.set_u32(40, 16384);
            r2t.set_u32(44, 24576);
            server.write_all(&r2t.encode(Digests::default())).unwrap();
            while got.len() < 40960 {
                let d = pdu::read_pdu(&mut input, Digests::default(), 1 << 20).unwrap();
                assert_eq!((d.ttt(), d.data.len()), (9, 4096));
                got.extend_from_slice(&d.data);
            }
            let mut resp = Pdu::new(opcode::SCSI_RESPONSE);
            resp.bhs[1] = flag::FINAL;
            resp.set_u32(16, cmd.itt());
            server.write_all(&resp.encode(Digests::default())).unwrap();
            let _ = input.read_to_end(&mut Vec::new());
            got
        });
        let data: Vec<u8> = (0..40960u32).map(|i| (i % 253) as u8).collect();
        let r = session.run(scsi::lun_field(1), &scsi::write16(0, 80), Data::Out(Arc::new(data.clone()), 0..40960));
        assert_eq!(r.unwrap().status, 0);
        drop(session);
        assert_eq!(target.join().unwrap(), data);
    }

    #[test]
    fn a_read_assembles_data_in_and_a_write_answers_r2t() {
        let (link, mut server) = pair();
        let session = Session::start(link, terms(), 4, Duration::from_secs(30)).unwrap();
        let target = std::thread::spawn(move || {
            let mut input = server.try_clone().unwrap();
            // The read: two Data-In, the second with status.
            let cmd = pdu::read_pdu(&mut input, Digests::default(), 1 << 20).unwrap();
            assert_eq!(cmd.opcode(), opcode::SCSI_COMMAND);
            for (i, part) in [[1u8; 512], [2u8; 512]].iter().enumerate() {
                let mut d = Pdu::new(opcode::DATA_IN);
                d.bhs[1] = if i == 1 { flag::FINAL | flag::STATUS } else { 0 };
                d.set_u32(16, cmd.itt());
                d.set_u32(28, 2);
                d.set_u32(32, 70);
                d.set_u32(40, i as u32 * 512);
                d.data = part.to_vec();
                server.write_all(&d.encode(Digests::default())).unwrap();
            }
            // The write: immediate data of 8192, then an R2T for the rest.
            let cmd = pdu::read_pdu(&mut input, Digests::default(), 1 << 20).unwrap();
            assert_eq!(cmd.data.len(), 8192);
            let mut r2t = Pdu::new(opcode::R2T);
            r2t.set_u32(16, cmd.itt());
            r2t.set_u32(20, 77);
            r2t.set_u32(40, 8192);
            r2t.set_u32(44, 12288);
            server.write_all(&r2t.encode(Digests::default())).unwrap();
            let mut got = cmd.data.clone();
            loop {
                let d = pdu::read_pdu(&mut input, Digests::default(), 1 << 20).unwrap();
                assert_eq!((d.opcode(), d.ttt()), (opcode::DATA_OUT, 77));
                assert_eq!(d.u32_at(40) as usize, got.len());
                got.extend_from_slice(&d.data);
                if d.flags() & flag::FINAL != 0 {
                    break;
                }
            }
            let mut resp = Pdu::new(opcode::SCSI_RESPONSE);
            resp.bhs[1] = flag::FINAL;
            resp.set_u32(16, cmd.itt());
            server.write_all(&resp.encode(Digests::default())).unwrap();
            let mut rest = Vec::new();
            let _ = input.read_to_end(&mut rest);
            got
        });
        let r = session.run(scsi::lun_field(1), &scsi::read16(0, 2), Data::In(1024)).unwrap();
        assert_eq!(r.status, 0);
        assert_eq!(&r.data[..512], &[1; 512]);
        assert_eq!(&r.data[512..], &[2; 512]);
        let data: Vec<u8> = (0..20480u32).map(|i| (i % 251) as u8).collect();
        let shared = Arc::new(data.clone());
        let r = session.run(scsi::lun_field(1), &scsi::write16(0, 40), Data::Out(shared, 0..20480));
        assert_eq!(r.unwrap().status, 0);
        drop(session);
        assert_eq!(target.join().unwrap(), data);
    }

    /// A target that takes a command and then says nothing: a NOP-Out ping (ITT ≠ 0xffffffff,
    /// immediate, TTT 0xffffffff) goes out after half the timeout, and after the timeout the
    /// command fails as a connection error that says so.
    #[test]
    fn a_silent_target_is_pinged_then_given_up_on() {
        let (link, server) = pair();
        let session = Session::start(link, terms(), 4, Duration::from_millis(200)).unwrap();
        let target = std::thread::spawn(move || {
            let mut input = server.try_clone().unwrap();
            let cmd = pdu::read_pdu(&mut input, Digests::default(), 1 << 20).unwrap();
            let ping = pdu::read_pdu(&mut input, Digests::default(), 1 << 20).unwrap();
            let _ = input.read_to_end(&mut Vec::new());
            (cmd, ping)
        });
        let r = session.run(scsi::lun_field(1), &scsi::read16(0, 8), Data::In(4096));
        let Err(Cause::Connection(why)) = r else { panic!("the command did not time out") };
        assert!(why.contains("no answer from the target for 0.2 s"), "{why}");
        assert!(session.dead().is_some());
        drop(session);
        let (cmd, ping) = target.join().unwrap();
        assert_eq!(ping.opcode(), opcode::NOP_OUT);
        assert!(ping.bhs[0] & 0x40 != 0 && ping.flags() & flag::FINAL != 0, "immediate, final");
        assert!(ping.itt() != RESERVED_TAG && ping.itt() != cmd.itt(), "a task tag of its own");
        assert_eq!(ping.ttt(), RESERVED_TAG);
    }

    /// A target that answers every ping is alive, however long a command takes: the command
    /// completes after three pings (each NOP-In advances `StatSN`, which the next PDU acknowledges).
    #[test]
    fn a_target_that_answers_pings_keeps_a_slow_command_alive() {
        let (link, mut server) = pair();
        // Each pong must come within half of it (1.5 s), generous on a loaded machine; three pings
        // make the test take about 4.5 s.
        let session = Session::start(link, terms(), 4, Duration::from_secs(3)).unwrap();
        let target = std::thread::spawn(move || {
            let mut input = server.try_clone().unwrap();
            let cmd = pdu::read_pdu(&mut input, Digests::default(), 1 << 20).unwrap();
            let mut acknowledged = Vec::new();
            for stat_sn in 10..13u32 {
                let ping = pdu::read_pdu(&mut input, Digests::default(), 1 << 20).unwrap();
                assert_eq!(ping.opcode(), opcode::NOP_OUT);
                acknowledged.push(ping.u32_at(28));
                let mut pong = Pdu::new(opcode::NOP_IN);
                pong.bhs[1] = flag::FINAL;
                pong.set_u32(16, ping.itt());
                pong.set_u32(20, RESERVED_TAG);
                pong.set_u32(24, stat_sn);
                pong.set_u32(28, 1);
                pong.set_u32(32, 64);
                server.write_all(&pong.encode(Digests::default())).unwrap();
            }
            let mut resp = Pdu::new(opcode::SCSI_RESPONSE);
            resp.bhs[1] = flag::FINAL;
            resp.set_u32(16, cmd.itt());
            resp.set_u32(24, 13);
            server.write_all(&resp.encode(Digests::default())).unwrap();
            let _ = input.read_to_end(&mut Vec::new());
            acknowledged
        });
        assert_eq!(session.run(scsi::lun_field(1), &scsi::test_unit_ready(), Data::None).unwrap().status, 0);
        drop(session);
        let acknowledged = target.join().unwrap();
        assert_eq!(acknowledged[1..], [11, 12], "ExpStatSN follows the NOP-Ins");
    }

    /// An idle session (nothing outstanding) is not a silent target, however long it lasts.
    #[test]
    fn an_idle_session_does_not_time_out() {
        let (link, mut server) = pair();
        let session = Session::start(link, terms(), 4, Duration::from_millis(500)).unwrap();
        let target = std::thread::spawn(move || {
            let mut input = server.try_clone().unwrap();
            let cmd = pdu::read_pdu(&mut input, Digests::default(), 1 << 20).unwrap();
            let mut resp = Pdu::new(opcode::SCSI_RESPONSE);
            resp.bhs[1] = flag::FINAL;
            resp.set_u32(16, cmd.itt());
            server.write_all(&resp.encode(Digests::default())).unwrap();
            let _ = input.read_to_end(&mut Vec::new());
        });
        // Idle for three timeouts: the engine busy elsewhere.
        std::thread::sleep(Duration::from_millis(1500));
        assert!(session.dead().is_none());
        assert_eq!(session.run(scsi::lun_field(1), &scsi::test_unit_ready(), Data::None).unwrap().status, 0);
        drop(session);
        target.join().unwrap();
    }
}
