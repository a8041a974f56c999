//! [`Iscsi`]: a LUN as a blksync `Source` and `Target` (docs/ISCSI.md, "Commands used",
//! "Sense and retries", "Zeroing", "Holes", "Alignment and sizes", "Errors"). What open learns
//! of the LUN is in [`crate::lun`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use blksync_core::endpoint::{Caps, Identity, Segment, Source, Target};
use blksync_core::{Error, ErrorKind, Result};

use crate::address::IscsiAddress;
use crate::ahead::Ahead;
use crate::login::{self, Link, Login, Negotiated};
use crate::lun::{LunInfo, ZeroMethod};
use crate::options::{Credentials, IscsiOptions};
use crate::scsi::{self, BlockLimits, Capacity, Cdb, Inquiry, Provisioning, Sense};
use crate::session::{Batch, Cause, Data, Response, Session};

/// The largest command this initiator sends, whatever the options say.
const MAX_REQUEST_SIZE: usize = 32 << 20;
/// Times a command is sent again after UNIT ATTENTION, BUSY or TASK SET FULL.
const RETRIES: usize = 5;
/// Blocks per WRITE SAME or UNMAP when the target reports no limit.
const DEFAULT_ZERO_BLOCKS: u64 = 1 << 16;
/// GET LBA STATUS allocation length: header and 64 descriptors.
pub(crate) const STATUS_LEN: u32 = 8 + 16 * 64;

/// An open iSCSI LUN.
pub struct Iscsi {
    address: IscsiAddress,
    name: PathBuf,
    session: Session,
    info: LunInfo,
    lun: [u8; 8],
    writable: bool,
    piece: usize,
    segments: Mutex<Vec<Segment>>,
    /// 0: SYNCHRONIZE CACHE(16) untried, 1: works, 2: use (10).
    sync_kind: AtomicU8,
    zeros: OnceLock<Arc<Vec<u8>>>,
    closed: AtomicBool,
    /// Read-ahead, for a LUN opened for reading ([`crate::ahead`]).
    ahead: Option<Mutex<Ahead<Pending>>>,
}

/// Commands sent together, whose answers are awaited together ([`Iscsi::collect`]).
struct Pending {
    commands: Vec<(u64, Cdb, Data)>,
    batch: Arc<Batch>,
    /// The first command that could not be sent (the session died), and why.
    failed: Option<(u64, Error)>,
}

impl std::fmt::Debug for Iscsi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iscsi")
            .field("address", &self.address.to_string())
            .field("info", &self.info)
            .field("writable", &self.writable)
            .field("request_size", &self.piece)
            .finish_non_exhaustive()
    }
}

/// An error that names the address and maybe the byte offset.
fn at(offset: Option<u64>) -> String {
    offset.map_or(String::new(), |o| format!(" at byte offset {o}"))
}

impl Iscsi {
    /// Logs in to the target of `address` (see [`crate::address`]), finds the LUN (the first
    /// disk LUN when the address names none), clears the UNIT ATTENTION of a new session and
    /// reads the LUN's size, block size and provisioning.
    pub fn open(address: &str, writable: bool, options: &IscsiOptions) -> Result<Iscsi> {
        let address = crate::address::parse(address)?;
        let credentials = Credentials::gather(&address, options)?;
        let what = address.to_string();
        let stream = login::connect(address.host(), address.port(), &what, options.timeout)?;
        let mut link = Link::new(stream, address.portal(), what.clone(), options.timeout);
        let initiator = options.initiator();
        let who = Login {
            initiator: &initiator,
            target: Some(address.iqn()),
            credentials: &credentials,
            prefer_digests: options.digests,
        };
        let terms = match login::login(&mut link, &who) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound && e.message().contains("no such target") => {
                return Err(with_target_list(e, &address, options));
            }
            Err(e) => return Err(e),
        };
        let session = Session::start(link, terms, options.queue_depth, options.timeout)
            .map_err(|e| Error::io("starting the threads of the iSCSI session with", Path::new(&what), None, e))?;
        let mut endpoint = Iscsi {
            name: PathBuf::from(&what),
            address: address.clone(),
            session,
            info: LunInfo {
                lun: 0,
                inquiry: Inquiry { qualifier: 0, device_type: 0, vendor: String::new(), product: String::new() },
                capacity: Capacity { blocks: 0, block_size: 512, lbpme: false, lbprz: false },
                limits: BlockLimits::default(),
                provisioning: Provisioning::default(),
                lba_status: false,
                write_protected: false,
                zero: ZeroMethod::Write,
            },
            lun: scsi::lun_field(0),
            writable,
            piece: 0,
            segments: Mutex::new(Vec::new()),
            sync_kind: AtomicU8::new(0),
            zeros: OnceLock::new(),
            closed: AtomicBool::new(false),
            // A LUN being written is read only to compare with what will be written there:
            // nothing is read ahead of its writes.
            ahead: (!writable).then(|| Mutex::new(Ahead::default())),
        };
        let lun = match address.lun() {
            Some(l) => l,
            None => endpoint.first_disk_lun()?,
        };
        endpoint.address = address.with_lun(lun);
        endpoint.name = PathBuf::from(endpoint.address.to_string());
        endpoint.lun = scsi::lun_field(lun);
        endpoint.info = endpoint.probe(lun)?;
        if writable && endpoint.info.write_protected {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("{}: the LUN is write-protected; refusing to open it as a destination", endpoint.address),
            ));
        }
        let block = endpoint.info.capacity.block_size as usize;
        let mut piece =
            if options.request_size == 0 { crate::options::DEFAULT_REQUEST_SIZE } else { options.request_size };
        piece = piece.min(MAX_REQUEST_SIZE);
        if endpoint.info.limits.max_transfer > 0 {
            piece = piece.min(endpoint.info.limits.max_transfer as usize * block);
        }
        endpoint.piece = (piece / block * block).max(block);
        Ok(endpoint)
    }

    /// The address, with the LUN that was opened.
    #[must_use]
    pub fn address(&self) -> &IscsiAddress {
        &self.address
    }

    /// What the login agreed on.
    #[must_use]
    pub fn negotiated(&self) -> &Negotiated {
        self.session.terms()
    }

    /// What open learnt of the LUN.
    #[must_use]
    pub fn info(&self) -> &LunInfo {
        &self.info
    }

    /// Bytes per READ(16)/WRITE(16).
    #[must_use]
    pub fn request_size(&self) -> usize {
        self.piece
    }

    /// Logs out now, from any thread (a Ctrl-C handler's, say): commands still in flight are
    /// waited for, later ones fail as `Connection`. Returns whether the target confirmed.
    /// `close` and drop do the same; after one of them this does nothing.
    pub fn logout(&self) -> bool {
        if self.closed.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.session.logout()
    }

    pub(crate) fn protocol(&self, why: &str) -> Error {
        Error::new(ErrorKind::Protocol, format!("{}: the target broke the SCSI protocol: {why}", self.address))
    }

    fn cause_error(&self, verb: &str, offset: Option<u64>, cause: &Cause) -> Error {
        let portal = self.address.portal();
        match cause {
            Cause::Connection(why) => Error::new(
                ErrorKind::Connection,
                format!("{verb} {}{}: {why} (portal {portal})", self.address, at(offset)),
            ),
            Cause::Protocol(why) => Error::new(
                ErrorKind::Protocol,
                format!(
                    "{verb} {}{}: the target broke the iSCSI protocol: {why} (portal {portal})",
                    self.address,
                    at(offset)
                ),
            ),
        }
    }

    /// The error for a completed command that did not succeed.
    fn status_error(&self, verb: &str, offset: Option<u64>, cdb: &Cdb, r: &Response) -> Error {
        let name = scsi::command_name(cdb);
        let place = format!("{verb} {}{}", self.address, at(offset));
        if r.response != 0 {
            return Error::new(
                ErrorKind::Io,
                format!("{place}: {name} failed at the target (iSCSI response {:#04x})", r.response),
            );
        }
        let status = match r.status {
            scsi::CHECK_CONDITION => "CHECK CONDITION",
            scsi::BUSY => "BUSY",
            scsi::RESERVATION_CONFLICT => "RESERVATION CONFLICT (another initiator holds a reservation)",
            scsi::TASK_SET_FULL => "TASK SET FULL",
            _ => "an unexpected status",
        };
        let sense = Sense::parse(&r.sense);
        let kind = match sense {
            Some(Sense { key: scsi::DATA_PROTECT, asc: 0x27, ascq: 0x07 }) => ErrorKind::NoSpace,
            Some(Sense { key: scsi::DATA_PROTECT, .. }) => ErrorKind::PermissionDenied,
            _ if r.status == scsi::RESERVATION_CONFLICT => ErrorKind::InUse,
            _ => ErrorKind::Io,
        };
        let sense = sense.map_or_else(|| "no sense data".to_string(), |s| s.to_string());
        Error::new(kind, format!("{place}: {name} ended with {status} ({:#04x}), {sense}", r.status))
    }

    fn retry_worthy(r: &Response) -> bool {
        r.response == 0
            && (matches!(r.status, scsi::BUSY | scsi::TASK_SET_FULL)
                || (r.status == scsi::CHECK_CONDITION
                    && Sense::parse(&r.sense).is_some_and(|s| s.key == scsi::UNIT_ATTENTION)))
    }

    #[allow(clippy::needless_pass_by_value)] // Callers build the data in the call: `Data::In(96)`.
    pub(crate) fn command(&self, verb: &str, offset: Option<u64>, cdb: &Cdb, data: Data) -> Result<Response> {
        self.command_on(self.lun, verb, offset, cdb, &data)
    }

    /// One command, sent again after UNIT ATTENTION, BUSY or TASK SET FULL (at most 5 times);
    /// anything but GOOD is an error.
    pub(crate) fn command_on(
        &self,
        lun: [u8; 8],
        verb: &str,
        offset: Option<u64>,
        cdb: &Cdb,
        data: &Data,
    ) -> Result<Response> {
        let mut tries = 0;
        loop {
            let r = self.session.run(lun, cdb, data.again()).map_err(|c| self.cause_error(verb, offset, &c))?;
            if r.response == 0 && r.status == scsi::GOOD {
                return Ok(r);
            }
            tries += 1;
            if tries > RETRIES || !Self::retry_worthy(&r) {
                return Err(self.status_error(verb, offset, cdb, &r));
            }
        }
    }

    /// Many commands at once: all are sent (as the window allows) before the answers are
    /// awaited, together; one that must be sent again goes again alone. Returns the responses
    /// in order.
    fn pipeline(&self, verb: &str, commands: Vec<(u64, Cdb, Data)>) -> Result<Vec<Response>> {
        let pending = self.send(verb, commands);
        self.collect(verb, pending)
    }

    /// Sends commands (as the window allows), without waiting for their answers.
    fn send(&self, verb: &str, commands: Vec<(u64, Cdb, Data)>) -> Pending {
        let batch = Batch::new();
        let mut failed = None;
        for (offset, cdb, data) in &commands {
            if let Err(c) = self.session.submit(self.lun, cdb, data.again(), &batch) {
                failed = Some((*offset, c));
                break;
            }
        }
        let failed = failed.map(|(offset, c)| (offset, self.cause_error(verb, Some(offset), &c)));
        Pending { commands, batch, failed }
    }

    /// Waits for commands sent together; the responses in order, or the error at the lowest
    /// offset.
    fn collect(&self, verb: &str, pending: Pending) -> Result<Vec<Response>> {
        let Pending { commands, batch, failed } = pending;
        let mut first_error = failed;
        let mut out = Vec::with_capacity(commands.len());
        for (i, completion) in batch.wait().into_iter().enumerate() {
            let (offset, cdb, data) = &commands[i];
            let result = match completion {
                Ok(r) if r.response == 0 && r.status == scsi::GOOD => Ok(r),
                Ok(r) if Self::retry_worthy(&r) => self.command_on(self.lun, verb, Some(*offset), cdb, data),
                Ok(r) => Err(self.status_error(verb, Some(*offset), cdb, &r)),
                Err(c) => Err(self.cause_error(verb, Some(*offset), &c)),
            };
            match result {
                Ok(r) => out.push(r),
                Err(e) => {
                    if first_error.as_ref().is_none_or(|(o, _)| offset < o) {
                        first_error = Some((*offset, e));
                    }
                }
            }
        }
        match first_error {
            Some((_, e)) => Err(e),
            None => Ok(out),
        }
    }

    pub(crate) fn block(&self) -> u64 {
        u64::from(self.info.capacity.block_size)
    }

    fn check_range(&self, verb: &str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{verb} {} at byte offset {offset}: {len} bytes would pass the end of the LUN ({} bytes)",
                    self.address,
                    self.size()
                ),
            )),
        }
    }

    fn check_write(&self, verb: &str, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::usage(format!("{verb} {}: it was opened read-only", self.address)));
        }
        self.check_range(verb, offset, len)?;
        let b = self.block();
        if !offset.is_multiple_of(b) || !len.is_multiple_of(b) {
            return Err(Error::usage(format!(
                "{verb} {} at byte offset {offset}: {len} bytes are not aligned to the LUN's block size of {b} bytes",
                self.address
            )));
        }
        mark_allocated(&mut self.segments.lock().unwrap_or_else(PoisonError::into_inner), offset, offset + len);
        Ok(())
    }

    /// The READ(16) commands of an aligned range: pieces of the request size.
    fn read_commands(&self, offset: u64, len: u64) -> Vec<(u64, Cdb, Data)> {
        let b = self.block();
        (0..len)
            .step_by(self.piece)
            .map(|rel| {
                let n = (len - rel).min(self.piece as u64);
                let at = offset + rel;
                (at, scsi::read16(at / b, (n / b) as u32), Data::In(n as u32))
            })
            .collect()
    }

    /// Whether `[offset, offset + len)` holds data as far as is known (no holes reported, or
    /// the cached allocation map says allocated): worth reading ahead.
    fn known_data(&self, offset: u64, len: u64) -> bool {
        if !self.info.lba_status {
            return true;
        }
        let Ok(cache) = self.segments.try_lock() else { return false };
        let mut at = offset;
        while at < offset + len {
            match cache.iter().find(|s| s.start <= at && at < s.end) {
                Some(s) if s.allocated => at = s.end,
                _ => return false,
            }
        }
        true
    }

    /// Reads an aligned range into `out`, in pieces all sent at once, or takes what was read
    /// ahead for it; a sequential read asks for the next ones ahead ([`crate::ahead`]).
    fn read_aligned(&self, out: &mut [u8], offset: u64) -> Result<()> {
        let len = out.len() as u64;
        let pending = match &self.ahead {
            None => self.send("reading", self.read_commands(offset, len)),
            Some(ahead) => {
                let mut ahead = ahead.lock().unwrap_or_else(PoisonError::into_inner);
                let (hit, sequential) = ahead.take(offset, len);
                // What the reader waits for goes first, then what is read ahead.
                let pending = hit.unwrap_or_else(|| self.send("reading", self.read_commands(offset, len)));
                if sequential && len >= self.piece as u64 {
                    for (at, n) in ahead.plan(len, self.size(), |at, n| self.known_data(at, n)) {
                        let group = self.send("reading", self.read_commands(at, n));
                        ahead.add(at, n, group);
                    }
                }
                pending
            }
        };
        let responses = self.collect("reading", pending)?;
        let mut rel = 0;
        for r in responses {
            let n = (out.len() - rel).min(self.piece);
            if r.data.len() != n {
                return Err(self.protocol(&format!(
                    "READ(16) at byte offset {} returned {} of {n} bytes",
                    offset + rel as u64,
                    r.data.len()
                )));
            }
            out[rel..rel + n].copy_from_slice(&r.data);
            self.session.recycle(r.data);
            rel += n;
        }
        Ok(())
    }

    fn write_aligned(&self, data: &Arc<Vec<u8>>, range: std::ops::Range<usize>, offset: u64) -> Result<()> {
        let b = self.block();
        let commands: Vec<_> = (0..range.len())
            .step_by(self.piece)
            .map(|rel| {
                let n = (range.len() - rel).min(self.piece);
                let at = offset + rel as u64;
                let start = range.start + rel;
                (at, scsi::write16(at / b, (n as u64 / b) as u32), Data::Out(Arc::clone(data), start..start + n))
            })
            .collect();
        self.pipeline("writing", commands).map(|_| ())
    }

    fn zero_block(&self) -> Arc<Vec<u8>> {
        Arc::clone(self.zeros.get_or_init(|| Arc::new(vec![0; self.piece])))
    }

    /// Zeros written over `[offset, end)` where it is not zero already, in 4 KiB steps (or
    /// blocks, when larger).
    fn write_zeros_where_needed(&self, offset: u64, end: u64) -> Result<()> {
        let step = self.block().max(4096) as usize;
        let mut buf = vec![0; self.piece];
        let zeros = self.zero_block();
        let mut at = offset;
        while at < end {
            let n = ((end - at) as usize).min(self.piece);
            self.read_aligned(&mut buf[..n], at)?;
            let mut i = 0;
            while i < n {
                let run_start = i;
                while i < n && buf[i..(i + step).min(n)].iter().any(|&x| x != 0) {
                    i = (i + step).min(n);
                }
                if i > run_start {
                    self.write_aligned(&zeros, 0..i - run_start, at + run_start as u64)?;
                }
                while i < n && buf[i..(i + step).min(n)].iter().all(|&x| x == 0) {
                    i = (i + step).min(n);
                }
            }
            at += n as u64;
        }
        Ok(())
    }

    fn zero_limit(limit: u64) -> u64 {
        let max = if limit == 0 { DEFAULT_ZERO_BLOCKS } else { limit.min(u64::from(u32::MAX)) };
        max.max(1)
    }

    /// The segments of `[offset, size)` from GET LBA STATUS at `offset`'s block.
    fn lba_status(&self, offset: u64) -> Result<Vec<Segment>> {
        let b = self.block();
        let size = self.size();
        let lba = offset / b;
        let r = self.command(
            "reading the allocation map of",
            Some(offset),
            &scsi::get_lba_status(lba, STATUS_LEN),
            Data::In(STATUS_LEN),
        )?;
        let statuses = scsi::lba_status_parse(&r.data, lba).map_err(|why| self.protocol(&why))?;
        let mut segments: Vec<Segment> = Vec::new();
        for s in statuses {
            let start = (s.lba * b).min(size);
            let end = ((s.lba + u64::from(s.blocks)).saturating_mul(b)).min(size);
            if start >= end {
                break;
            }
            // Deallocated and anchored blocks read as zeros under LBPRZ (open checked it).
            let allocated = !matches!(s.status, 1 | 2);
            match segments.last_mut() {
                Some(last) if last.allocated == allocated && last.end == start => last.end = end,
                _ => segments.push(Segment { start, end, allocated }),
            }
        }
        Ok(segments)
    }
}

/// A "no such target" error, with the targets the portal does have.
fn with_target_list(e: Error, address: &IscsiAddress, options: &IscsiOptions) -> Error {
    let portal = format!("iscsi://{}", address.portal());
    match login::discover(&portal, options) {
        Ok(targets) if !targets.is_empty() => {
            let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
            Error::new(e.kind(), format!("{}; it has: {}", e.message(), names.join(", ")))
        }
        _ => e,
    }
}

impl Drop for Iscsi {
    fn drop(&mut self) {
        self.logout();
    }
}

/// Sets `[start, end)` allocated in a list of consecutive segments, merging neighbours.
fn mark_allocated(segments: &mut Vec<Segment>, start: u64, end: u64) {
    if start >= end || !segments.iter().any(|s| s.start < end && start < s.end && !s.allocated) {
        return;
    }
    let mut out: Vec<Segment> = Vec::with_capacity(segments.len() + 2);
    let mut push = |s: Segment| match out.last_mut() {
        Some(last) if last.allocated == s.allocated && last.end == s.start => last.end = s.end,
        _ if s.start < s.end => out.push(s),
        _ => {}
    };
    for s in segments.iter() {
        if s.allocated || s.end <= start || end <= s.start {
            push(*s);
            continue;
        }
        push(Segment { end: start.max(s.start), ..*s });
        push(Segment { start: start.max(s.start), end: end.min(s.end), allocated: true });
        push(Segment { start: end.min(s.end), ..*s });
    }
    *segments = out;
}

impl Source for Iscsi {
    fn name(&self) -> &Path {
        &self.name
    }

    fn caps(&self) -> Caps {
        let offload = self.info.zero != ZeroMethod::Write;
        Caps {
            resizable: false,
            holes: self.info.lba_status,
            zero_offload: offload,
            discard_zeroes: offload,
            changed_blocks: false,
            stable: false,
            unused_blocks: false,
            costly_writes: false,
            block_size: self.info.capacity.block_size,
        }
    }

    fn size(&self) -> u64 {
        self.info.capacity.bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range("reading", offset, len)?;
        if buf.is_empty() {
            return Ok(());
        }
        let b = self.block();
        if offset.is_multiple_of(b) && len.is_multiple_of(b) {
            return self.read_aligned(buf, offset);
        }
        // Widened to whole blocks through a bounce buffer (the size is whole blocks).
        let start = offset / b * b;
        let end = (offset + len).div_ceil(b) * b;
        let mut bounce = vec![0; (end - start) as usize];
        self.read_aligned(&mut bounce, start)?;
        let rel = (offset - start) as usize;
        buf.copy_from_slice(&bounce[rel..rel + buf.len()]);
        Ok(())
    }

    fn segment_at(&self, offset: u64) -> Result<Segment> {
        let size = self.size();
        if offset >= size {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "reading the allocation map of {} at byte offset {offset}: past its end ({size} bytes)",
                    self.address
                ),
            ));
        }
        if !self.info.lba_status {
            return Ok(Segment { start: 0, end: size, allocated: true });
        }
        // Held across the request, so that no write marks the cache between the answer and its
        // being cached (writes here are synchronous: one in flight has not returned yet, and
        // the engine never asks about a range it is writing).
        let mut cache = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = cache.iter().find(|s| s.start <= offset && offset < s.end) {
            return Ok(*s);
        }
        let segments = self.lba_status(offset)?;
        match segments.iter().find(|s| s.start <= offset && offset < s.end).copied() {
            Some(s) => {
                *cache = segments;
                Ok(s)
            }
            // No answer about this block: allocated (never wrong), up to the next block.
            None => Ok(Segment { start: offset, end: (offset / self.block() + 1) * self.block(), allocated: true }),
        }
    }

    fn drop_cache(&self, _offset: u64, _len: u64) {}

    fn identity(&self) -> Identity {
        Identity::None
    }

    fn close(self: Box<Self>) -> Result<()> {
        self.logout();
        Ok(())
    }
}

impl Target for Iscsi {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write("writing", offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let n = buf.len();
        // One copy, shared by every command and Data-Out PDU of this write; recycled after.
        let mut copy = self.session.buffer(n);
        copy.copy_from_slice(buf);
        let copy = Arc::new(copy);
        let result = self.write_aligned(&copy, 0..n, offset);
        if let Ok(copy) = Arc::try_unwrap(copy) {
            self.session.recycle(copy);
        }
        result
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write("zeroing", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let b = self.block();
        let end = offset + len;
        match self.info.zero {
            ZeroMethod::WriteSameUnmap => {
                let max = Self::zero_limit(self.info.limits.max_write_same);
                let block = Arc::new(vec![0; b as usize]);
                let mut commands = Vec::new();
                let mut lba = offset / b;
                while lba < end / b {
                    let n = (end / b - lba).min(max);
                    commands.push((
                        lba * b,
                        scsi::write_same16_unmap(lba, n as u32),
                        Data::Out(Arc::clone(&block), 0..b as usize),
                    ));
                    lba += n;
                }
                self.pipeline("zeroing", commands).map(|_| ())
            }
            ZeroMethod::Unmap => {
                let max = Self::zero_limit(u64::from(self.info.limits.max_unmap));
                let mut lba = offset / b;
                while lba < end / b {
                    let n = (end / b - lba).min(max);
                    let params = scsi::unmap_parameters(&[(lba, n as u32)]);
                    let len = params.len();
                    self.command(
                        "zeroing",
                        Some(lba * b),
                        &scsi::unmap(len as u16),
                        Data::Out(Arc::new(params), 0..len),
                    )?;
                    lba += n;
                }
                // UNMAP is advice: what is still mapped gets written zeros.
                let mut at = offset;
                while at < end {
                    let segments = self.lba_status(at)?;
                    let Some(first) = segments.first().copied() else {
                        return self.write_zeros_where_needed(at, end);
                    };
                    let stop = first.end.min(end).max(at + b);
                    if first.allocated {
                        self.write_zeros_where_needed(at, stop.min(end))?;
                    }
                    at = stop;
                }
                Ok(())
            }
            ZeroMethod::Write => self.write_zeros_where_needed(offset, end),
        }
    }

    fn set_size(&self, size: u64) -> Result<()> {
        let have = self.size();
        if size == have {
            return Ok(());
        }
        if size > have {
            return Err(Error::new(
                ErrorKind::SizeMismatch,
                format!(
                    "{}: the LUN is {have} bytes, smaller than the {size} bytes needed; grow it on the target",
                    self.address
                ),
            ));
        }
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("{}: a LUN has a fixed size ({have} bytes) and cannot be shrunk to {size} bytes", self.address),
        ))
    }

    fn flush(&self) -> Result<()> {
        if let Some(c) = self.session.dead() {
            return Err(self.cause_error("flushing", None, &c));
        }
        if self.sync_kind.load(Ordering::Acquire) != 2 {
            match self.command("flushing", None, &scsi::synchronize_cache16(), Data::None) {
                Ok(_) => {
                    self.sync_kind.store(1, Ordering::Release);
                    return Ok(());
                }
                Err(e)
                    if self.sync_kind.load(Ordering::Acquire) == 0
                        && e.message().contains("invalid command operation code") =>
                {
                    self.sync_kind.store(2, Ordering::Release);
                }
                Err(e) => return Err(e),
            }
        }
        self.command("flushing", None, &scsi::synchronize_cache10(), Data::None).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(start: u64, end: u64, allocated: bool) -> Segment {
        Segment { start, end, allocated }
    }

    #[test]
    fn writes_mark_cached_holes_allocated() {
        let mut s = vec![seg(0, 100, false), seg(100, 200, true)];
        mark_allocated(&mut s, 50, 60);
        assert_eq!(
            s,
            vec![seg(0, 50, false), seg(50, 200, true)].into_iter().fold(Vec::new(), |mut v, x| {
                if x.start == 50 {
                    v.push(seg(50, 60, true));
                    v.push(seg(60, 100, false));
                    v.push(seg(100, 200, true));
                } else {
                    v.push(x);
                }
                v
            })
        );
        mark_allocated(&mut s, 0, 200);
        assert_eq!(s, vec![seg(0, 200, true)]);
    }
}
