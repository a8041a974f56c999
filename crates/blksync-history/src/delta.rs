//! Delta files (docs/DELTA-FORMAT.md): a header, checksummed records of data or zeros, an index
//! and a footer with a whole-file hash and a commit marker.
//!
//! [`Writer`] appends records from many threads and commits atomically (temporary name, fsync,
//! rename, directory fsync). [`Delta::open`] validates everything — header, footer, whole-file
//! hash, index, every record — before any caller sees a byte, with every length checked against
//! the file's size and fixed limits first, so a corrupt, truncated or hostile file is an error,
//! never a panic or a huge allocation. [`Delta::open_index`] checks the structure only (header,
//! footer, index) and leaves the records to be checked as they are read: a backup chain opens
//! every increment on each run, and must not read all of them to list them.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::fields::{Decoder, Encoder};

const MAGIC: &[u8; 16] = b"BLKSYNC-DELTA\0\0\0";
const COMMIT: &[u8; 24] = b"BLKSYNC-DELTA-COMMITTED\0";
/// The version written. Version 1 (read too) has no image fingerprints after the index.
const VERSION: u32 = 2;
const FOOTER: u64 = 8 + 8 + 32 + 24;
const MAX_HEADER: u32 = 64 << 10;
const MAX_FIELD: usize = 4 << 10;
/// Largest record, decoded.
pub const MAX_RECORD: u32 = 16 << 20;
const MAX_STORED: u32 = MAX_RECORD + (64 << 10);
/// Fixed part of a record before its payload: kind, offset, len, before hash, codec, stored.
const RECORD_HEAD: usize = 1 + 8 + 4 + 16 + 1 + 4;
const INDEX_ENTRY: u64 = 1 + 8 + 4 + 8;
/// Bytes after the index entries in version 2: the two image fingerprints.
const STATES: u64 = 64;

/// Fingerprints of the whole image a delta applies to and of the one it produces
/// ([`crate::fingerprint`]); zeros where not recorded (undo logs, chain increments, version 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct States {
    /// The image before.
    pub before: [u8; 32],
    /// The image after.
    pub after: [u8; 32],
}

impl States {
    /// Not recorded.
    pub const UNRECORDED: [u8; 32] = [0; 32];
}

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Kind {
    /// Bytes.
    Data,
    /// Zeros.
    Zeros,
}

/// The header of a delta.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Header {
    /// Unique id.
    #[serde(serialize_with = "hex", deserialize_with = "unhex")]
    pub id: [u8; 16],
    /// Id of the previous delta in a chain, zeros for none.
    #[serde(serialize_with = "hex", deserialize_with = "unhex")]
    pub parent: [u8; 16],
    /// Comparison granularity used to make it.
    pub block_size: u32,
    /// Size of the image it applies to.
    pub size_before: u64,
    /// Size of the image it produces.
    pub size_after: u64,
    /// Creation time, seconds since the epoch.
    pub created: i64,
    /// Creator's time zone, seconds east of UTC.
    pub utc_offset: i32,
    /// Where the new content came from.
    pub source: String,
    /// Filesystem UUID or label of the source, when known.
    pub source_identity: String,
    /// Free text.
    pub comment: String,
    /// blksync version that wrote it.
    pub tool_version: String,
}

impl Header {
    /// The header of a delta written now, by this version, with a fresh id; sizes are zero
    /// until set.
    pub fn new(parent: [u8; 16], block_size: u32, source: &str, comment: &str) -> Result<Header> {
        let (created, utc_offset) = crate::id::now();
        Ok(Header {
            id: crate::id::random_id()?,
            parent,
            block_size,
            size_before: 0,
            size_after: 0,
            created,
            utc_offset,
            source: source.to_string(),
            source_identity: String::new(),
            comment: comment.to_string(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
        })
    }
}

fn hex<S: serde::Serializer>(v: &[u8; 16], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&to_hex(v))
}

fn unhex<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<[u8; 16], D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    let mut out = [0u8; 16];
    if text.len() != 32 || !text.is_ascii() {
        return Err(serde::de::Error::custom(format!("{text:?} is not a 32-digit hex id")));
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(serde::de::Error::custom)?;
    }
    Ok(out)
}

pub use crate::id::to_hex;

/// One index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Data or zeros.
    pub kind: Kind,
    /// Image offset.
    pub offset: u64,
    /// Bytes covered.
    pub len: u32,
    /// File position of the record.
    pub position: u64,
}

/// A decoded record.
#[derive(Debug, Clone)]
pub struct Record {
    /// The index entry.
    pub entry: Entry,
    /// BLAKE3 of the bytes the image held there before.
    pub before_hash: [u8; 16],
    /// The bytes (data records only).
    pub data: Vec<u8>,
}

/// The `before_hash` of a record whose old content is not known (parts of merged deltas);
/// `apply` does not check the target under such a record.
pub const UNRECORDED: [u8; 16] = [0; 16];

/// BLAKE3 truncated to 16 bytes.
#[must_use]
pub fn hash16(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// Hash of `len` zero bytes, without allocating `len` bytes at once.
#[must_use]
pub fn zero_hash(len: u64) -> [u8; 16] {
    static ZEROS: [u8; 65536] = [0; 65536];
    let mut h = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        left -= n as u64;
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

fn record_hash(kind: Kind, offset: u64, len: u32, before: &[u8; 16], data: &[u8]) -> [u8; 16] {
    let kind = [kind_byte(kind)];
    hash16(&[&kind, &offset.to_le_bytes(), &len.to_le_bytes(), before, data])
}

fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::Data => 1,
        Kind::Zeros => 2,
    }
}

fn encode_header(h: &Header) -> Vec<u8> {
    let mut fields = Encoder::new(0, 256);
    fields
        .raw(&h.id)
        .raw(&h.parent)
        .u32(h.block_size)
        .u64(h.size_before)
        .u64(h.size_after)
        .i64(h.created)
        .i32(h.utc_offset);
    for text in [&h.source, &h.source_identity, &h.comment, &h.tool_version] {
        let mut t = text.as_bytes();
        t = &t[..t.len().min(MAX_FIELD)];
        fields.bytes(t);
    }
    let fields = fields.finish();
    // Encoder::finish puts a length and a type byte in front; keep only the fields.
    let fields = &fields[5..];
    let mut out = Vec::with_capacity(fields.len() + 56);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(fields.len() as u32).to_le_bytes());
    out.extend_from_slice(fields);
    let hash = blake3::hash(&out);
    out.extend_from_slice(hash.as_bytes());
    out
}

/// Writes a delta file.
pub struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    inner: Mutex<Inner>,
    /// Records are clipped to end here (an undo log restores a file's old size, so what lay past
    /// it needs no record).
    limit: u64,
    /// A second handle for fdatasync outside the lock, and how far it has made the file durable.
    syncer: File,
    synced: Mutex<u64>,
}

struct Inner {
    file: BufWriter<File>,
    position: u64,
    hasher: blake3::Hasher,
    index: Vec<Entry>,
    states: States,
}

impl Inner {
    fn write(&mut self, bytes: &[u8], path: &Path) -> Result<()> {
        self.file.write_all(bytes).at("writing", path, self.position)?;
        self.hasher.update(bytes);
        self.position += bytes.len() as u64;
        Ok(())
    }
}

fn cut(bytes: &[u8], len: u32) -> &[u8] {
    &bytes[..(len as usize).min(bytes.len())]
}

/// `PATH.partial`: where an undo log for `path` is written until it is complete.
#[must_use]
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".partial");
    PathBuf::from(name)
}

/// Refuses to write a new file at `out` (a delta, or an uploaded file) when that would destroy
/// something: a device node or another non-regular file there (the file is renamed into place,
/// which would replace the node), or a file that the same command reads (`inputs`), such as
/// `diff SRC BASE -o BASE`.
pub fn check_output(out: &Path, inputs: &[crate::endpoint::Identity]) -> Result<()> {
    check_output_with(out, inputs, false)
}

/// [`check_output`], where `replace_any` (`sync --undo FILE --force`) lets the output replace
/// an existing regular file that is not a delta.
pub fn check_output_with(out: &Path, inputs: &[crate::endpoint::Identity], replace_any: bool) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(out) else { return Ok(()) };
    if !meta.is_file() {
        return Err(Error::usage(format!(
            "{} exists and is not a regular file; the output is written as a new file and would replace it",
            out.display()
        )));
    }
    if inputs.contains(&crate::endpoint::Identity::File { dev: meta.dev(), ino: meta.ino() }) {
        return Err(Error::usage(format!(
            "{} is also an input of this command; writing the output there would destroy it",
            out.display()
        )));
    }
    // Replacing an earlier delta (tonight's `-o today.delta`, this week's undo log) is the
    // normal case; replacing anything else is a typo that loses data (a disk image became a
    // 57 KB delta).
    if meta.len() > 0 && !replace_any && !is_delta(out) {
        return Err(Error::usage(format!(
            "{} exists and is not a blksync delta; the output would replace it. Remove it first if that is what you want",
            out.display()
        )));
    }
    Ok(())
}

/// Whether the file at `path` starts like a delta (its magic), whatever its state.
fn is_delta(path: &Path) -> bool {
    let mut magic = [0u8; 16];
    File::open(path).and_then(|f| f.read_exact_at(&mut magic, 0)).is_ok_and(|()| &magic == MAGIC)
}

impl Writer {
    /// Starts a delta at `path` (written under a temporary name until [`Writer::commit`]),
    /// readable by its owner only: deltas hold exactly the changed blocks of an image.
    pub fn create(path: &Path, header: &Header) -> Result<Writer> {
        Writer::create_with_mode(path, header, 0o600)
    }

    /// Starts a delta at `path` with permissions `mode`.
    pub fn create_with_mode(path: &Path, header: &Header, mode: u32) -> Result<Writer> {
        let (file, tmp) = crate::temp::create(path, mode)?;
        Writer::start(path, tmp, file, header)
    }

    /// Starts an undo log at `path`, written as `PATH.partial` until [`Writer::commit`]: unlike
    /// other deltas, an undo log must survive its writer being killed, since the destination is
    /// then half-synced and the log is the only way back. Its records are made durable with
    /// [`Writer::sync_through`] before the bytes they save are overwritten, and `apply` reads a
    /// `.partial` log up to its first torn record ([`Delta::recover`]). An existing `.partial`
    /// is the log of an earlier sync that did not finish: it is never replaced.
    pub fn create_journal(path: &Path, header: &Header) -> Result<Writer> {
        let partial = partial_path(path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::new(
                        ErrorKind::Usage,
                        format!(
                            "{} exists: an earlier sync with this undo log did not finish, and it holds the old content of what that sync overwrote. \
                             Roll the destination back with `blksync apply {} DST` first, or remove it if that rollback is no longer wanted",
                            partial.display(),
                            partial.display()
                        ),
                    )
                } else {
                    Error::io("creating", &partial, None, e)
                }
            })?;
        let mut writer = Writer::start(path, partial, file, header)?;
        writer.limit = header.size_after;
        // The header durable first: a log killed later is always one `apply` can read.
        writer.sync_through()?;
        Ok(writer)
    }

    fn start(path: &Path, tmp: PathBuf, file: File, header: &Header) -> Result<Writer> {
        let syncer = file.try_clone().on("opening", &tmp)?;
        let mut inner = Inner {
            file: BufWriter::with_capacity(1 << 20, file),
            position: 0,
            hasher: blake3::Hasher::new(),
            index: Vec::new(),
            states: States::default(),
        };
        inner.write(&encode_header(header), &tmp)?;
        Ok(Writer {
            path: path.to_path_buf(),
            tmp,
            inner: Mutex::new(inner),
            limit: u64::MAX,
            syncer,
            synced: Mutex::new(0),
        })
    }

    /// Where the file is written until it is committed.
    #[must_use]
    pub fn temporary_path(&self) -> &Path {
        &self.tmp
    }

    /// Makes every record appended so far durable (flush and fdatasync). Threads that call it
    /// together share one fdatasync: the first does it for all that were appended.
    pub fn sync_through(&self) -> Result<()> {
        let position = {
            let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let at = inner.position;
            inner.file.flush().at("writing", &self.tmp, at)?;
            at
        };
        let mut synced = self.synced.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *synced < position {
            let upto = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).position;
            self.syncer.sync_data().on("flushing", &self.tmp)?;
            *synced = upto.max(position);
        }
        Ok(())
    }

    /// Appends a record. `data` is the new content (ignored for zeros); `before` the old content
    /// (`None` when it was zeros). Safe to call from many threads.
    pub fn record(&self, kind: Kind, offset: u64, len: u32, data: &[u8], before: Option<&[u8]>) -> Result<()> {
        if offset >= self.limit {
            return Ok(());
        }
        let keep = (self.limit - offset).min(u64::from(len)) as u32;
        let (len, data, before) =
            if keep < len { (keep, cut(data, keep), before.map(|b| cut(b, keep))) } else { (len, data, before) };
        let before_hash = match before {
            Some(b) => hash16(&[b]),
            None => zero_hash(u64::from(len)),
        };
        self.record_hashed(kind, offset, len, data, before_hash)
    }

    /// Appends a record whose old content is known only by its hash ([`UNRECORDED`] when not
    /// at all).
    pub fn record_hashed(&self, kind: Kind, offset: u64, len: u32, data: &[u8], before_hash: [u8; 16]) -> Result<()> {
        let data = if kind == Kind::Data { data } else { &[] };
        let hash = record_hash(kind, offset, len, &before_hash, data);
        // Compress outside the lock so workers compress in parallel.
        let (codec, payload) = match zstd::bulk::compress(data, 3) {
            Ok(packed) if kind == Kind::Data && packed.len() < data.len() - data.len() / 16 => (1u8, packed),
            _ => (0u8, data.to_vec()),
        };
        let mut head = Vec::with_capacity(RECORD_HEAD);
        head.push(kind_byte(kind));
        head.extend_from_slice(&offset.to_le_bytes());
        head.extend_from_slice(&len.to_le_bytes());
        head.extend_from_slice(&before_hash);
        head.push(codec);
        head.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let position = inner.position;
        inner.write(&head, &self.tmp)?;
        inner.write(&payload, &self.tmp)?;
        inner.write(&hash, &self.tmp)?;
        inner.index.push(Entry { kind, offset, len, position });
        Ok(())
    }

    /// Sets the image fingerprints written with the index (unrecorded by default).
    pub fn set_states(&self, states: States) {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).states = states;
    }

    /// The records appended so far, by offset.
    #[must_use]
    pub fn entries(&self) -> Vec<Entry> {
        let mut index = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).index.clone();
        index.sort_by_key(|e| e.offset);
        index
    }

    /// Reads back a record appended so far (its bytes, decoded and checked).
    pub fn read_back(&self, entry: &Entry) -> Result<Record> {
        let end = {
            let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let at = inner.position;
            inner.file.flush().at("writing", &self.tmp, at)?;
            at
        };
        read_record(&self.syncer, &self.tmp, entry, end)
    }

    /// Writes index and footer, makes the file durable and gives it its name.
    pub fn commit(self) -> Result<u64> {
        let mut inner = self.inner.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.index.sort_by_key(|e| e.offset);
        let index_position = inner.position;
        let mut index = Vec::with_capacity(8 + inner.index.len() * INDEX_ENTRY as usize);
        index.extend_from_slice(&(inner.index.len() as u64).to_le_bytes());
        for e in &inner.index {
            index.push(kind_byte(e.kind));
            index.extend_from_slice(&e.offset.to_le_bytes());
            index.extend_from_slice(&e.len.to_le_bytes());
            index.extend_from_slice(&e.position.to_le_bytes());
        }
        index.extend_from_slice(&inner.states.before);
        index.extend_from_slice(&inner.states.after);
        inner.write(&index, &self.tmp)?;
        let mut footer = Vec::with_capacity(FOOTER as usize);
        footer.extend_from_slice(&index_position.to_le_bytes());
        footer.extend_from_slice(&(inner.index.len() as u64).to_le_bytes());
        footer.extend_from_slice(inner.hasher.finalize().as_bytes());
        footer.extend_from_slice(COMMIT);
        inner.file.write_all(&footer).on("writing", &self.tmp)?;
        let size = inner.position + FOOTER;
        let file = inner.file.into_inner().map_err(|e| Error::io("writing", &self.tmp, None, e.into_error()))?;
        file.sync_all().on("flushing", &self.tmp)?;
        crate::temp::commit(&self.tmp, &self.path)?;
        Ok(size)
    }

    /// Removes the temporary file of a delta that will not be committed.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// A validated delta file.
#[derive(Debug)]
pub struct Delta {
    path: PathBuf,
    file: File,
    /// Its header.
    pub header: Header,
    /// Its records, by offset.
    pub index: Vec<Entry>,
    /// Fingerprints of the images before and after.
    pub states: States,
    /// File size.
    pub file_size: u64,
    /// The footer's whole-file hash.
    file_hash: [u8; 32],
    /// Where the record area ends (the index, or the end of an uncommitted undo log).
    records_end: u64,
    /// An undo log recovered from a writer that was killed ([`Delta::recover`]).
    pub partial: bool,
}

impl Delta {
    fn corrupt(&self, what: impl std::fmt::Display) -> Error {
        corrupt(&self.path, what)
    }

    /// Opens and fully validates a delta (docs/DELTA-FORMAT.md, "Validation").
    pub fn open(path: &Path) -> Result<Delta> {
        let delta = Delta::open_index(path)?;
        delta.verify()?;
        Ok(delta)
    }

    /// Opens a delta and checks its structure: magic, version, the checksummed header, the footer
    /// and its commit marker, the index. Records are checked when read; [`Delta::verify`] checks
    /// the rest.
    pub fn open_index(path: &Path) -> Result<Delta> {
        let (file, file_size, header, records_start, version) = open_header(path, FOOTER)?;
        let read = |buf: &mut [u8], at: u64| -> Result<()> {
            file.read_exact_at(buf, at).map_err(|_| corrupt(path, format!("truncated at byte offset {at}")))
        };
        let mut footer = [0u8; FOOTER as usize];
        read(&mut footer, file_size - FOOTER)?;
        if &footer[48..] != COMMIT {
            return Err(corrupt(path, "no commit marker: the file is truncated or was never completed"));
        }
        let index_position = u64::from_le_bytes(footer[..8].try_into().unwrap_or_default());
        let count = u64::from_le_bytes(footer[8..16].try_into().unwrap_or_default());
        let index_end = file_size - FOOTER;
        let trailer = if version >= 2 { STATES } else { 0 };
        if index_position < records_start
            || index_position > index_end
            || count.checked_mul(INDEX_ENTRY).and_then(|n| n.checked_add(8 + trailer))
                != Some(index_end - index_position)
        {
            return Err(corrupt(path, "index position or size is inconsistent with the file size"));
        }
        let mut raw = vec![0u8; (index_end - index_position) as usize];
        read(&mut raw, index_position)?;
        let (entries, states) = raw[8..].split_at(raw.len() - 8 - trailer as usize);
        let states = match states {
            [] => States::default(),
            s => {
                States { before: s[..32].try_into().unwrap_or_default(), after: s[32..].try_into().unwrap_or_default() }
            }
        };
        let mut index = Vec::with_capacity(count as usize);
        let mut end_of_previous = 0u64;
        for e in entries.chunks_exact(INDEX_ENTRY as usize) {
            let kind = match e[0] {
                1 => Kind::Data,
                2 => Kind::Zeros,
                k => return Err(corrupt(path, format!("unknown record kind {k} in the index"))),
            };
            let offset = u64::from_le_bytes(e[1..9].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(e[9..13].try_into().unwrap_or_default());
            let position = u64::from_le_bytes(e[13..21].try_into().unwrap_or_default());
            let end = offset.checked_add(u64::from(len));
            if len == 0
                || len > MAX_RECORD
                || offset < end_of_previous
                || end.is_none_or(|end| end > header.size_after)
                || position < records_start
                || position.checked_add(RECORD_HEAD as u64 + 16).is_none_or(|end| end > index_position)
            {
                return Err(corrupt(path, format!("index entry for byte offset {offset} is invalid")));
            }
            end_of_previous = offset + u64::from(len);
            index.push(Entry { kind, offset, len, position });
        }
        let file_hash = footer[16..48].try_into().unwrap_or_default();
        let records_end = file_size - FOOTER;
        Ok(Delta {
            path: path.to_path_buf(),
            file,
            header,
            index,
            states,
            file_size,
            file_hash,
            records_end,
            partial: false,
        })
    }

    /// Opens an undo log that was never committed (`NAME.partial`, left by a sync that was
    /// killed): the header is checked as usual, then the records are read in file order, each
    /// checked, up to the first one that is torn or invalid. Every record before that was made
    /// durable before the bytes it saves were overwritten, so what is recovered covers everything
    /// the sync changed (docs/DELTA-FORMAT.md, "Undo logs").
    ///
    /// `Ok(None)` for a log whose header never became durable (its writer was killed as it
    /// started): nothing had been overwritten yet, so there is nothing to roll back.
    pub fn recover(path: &Path) -> Result<Option<Delta>> {
        let opened = open_header(path, 0);
        if let Err(e) = &opened {
            // The header is written whole and synced before any record and any change, so a
            // short file that is not yet a header was cut off before anything happened.
            let short = std::fs::metadata(path).is_ok_and(|m| m.len() < u64::from(MAX_HEADER) + 56);
            if short && e.kind() == ErrorKind::Corrupt && !e.message().contains("bad magic") {
                return Ok(None);
            }
        }
        let (file, file_size, header, records_start, _) = opened?;
        let mut delta = Delta {
            path: path.to_path_buf(),
            file,
            header,
            index: Vec::new(),
            states: States::default(),
            file_size,
            file_hash: [0; 32],
            records_end: file_size,
            partial: true,
        };
        let mut position = records_start;
        let mut head = [0u8; RECORD_HEAD];
        while position + (RECORD_HEAD as u64) + 16 <= file_size {
            if delta.file.read_exact_at(&mut head, position).is_err() {
                break;
            }
            let kind = match head[0] {
                1 => Kind::Data,
                2 => Kind::Zeros,
                _ => break,
            };
            let offset = u64::from_le_bytes(head[1..9].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(head[9..13].try_into().unwrap_or_default());
            let stored = u32::from_le_bytes(head[RECORD_HEAD - 4..].try_into().unwrap_or_default());
            if len == 0
                || len > MAX_RECORD
                || offset.checked_add(u64::from(len)).is_none_or(|e| e > delta.header.size_after)
            {
                break;
            }
            let entry = Entry { kind, offset, len, position };
            if delta.read(&entry).is_err() {
                break;
            }
            delta.index.push(entry);
            position += RECORD_HEAD as u64 + u64::from(stored) + 16;
        }
        delta.index.sort_by_key(|e| e.offset);
        if delta.index.windows(2).any(|w| w[0].offset + u64::from(w[0].len) > w[1].offset) {
            return Err(corrupt(path, "records overlap: this is not an undo log blksync wrote"));
        }
        Ok(Some(delta))
    }

    /// Checks what [`Delta::open_index`] left: the whole-file hash, then every record.
    pub fn verify(&self) -> Result<()> {
        self.verify_hash()?;
        self.index.iter().try_for_each(|entry| self.read(entry).map(|_| ()))
    }

    /// Checks the whole-file hash: the file is byte for byte what its writer committed, so it is
    /// not damaged. (Each record's own checksum is still checked whenever the record is read.)
    pub fn verify_hash(&self) -> Result<()> {
        if self.partial {
            // No whole-file hash yet; each record was checked when it was recovered.
            return Ok(());
        }
        let end = self.file_size - FOOTER;
        let mut hasher = blake3::Hasher::new();
        let mut buf = crate::buffer::Aligned::new(1 << 20);
        let mut pos = 0;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            self.file
                .read_exact_at(&mut buf[..n], pos)
                .map_err(|_| self.corrupt(format!("truncated at byte offset {pos}")))?;
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
        if hasher.finalize().as_bytes() != &self.file_hash {
            return Err(self.corrupt("file checksum mismatch: the delta is damaged"));
        }
        Ok(())
    }

    /// Reads and checks one record.
    pub fn read(&self, entry: &Entry) -> Result<Record> {
        read_record(&self.file, &self.path, entry, self.records_end)
    }

    /// The delta's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads and checks the record `entry` names in `file`, whose records end at `records_end`.
fn read_record(file: &File, path: &Path, entry: &Entry, records_end: u64) -> Result<Record> {
    let mut head = [0u8; RECORD_HEAD];
    file.read_exact_at(&mut head, entry.position)
        .map_err(|_| corrupt(path, format!("record at byte offset {} is truncated", entry.position)))?;
    let mut d = Decoder::new(&head, "record");
    let kind = d.u8()?;
    let offset = d.u64()?;
    let len = d.u32()?;
    let before_hash: [u8; 16] = d.fixed()?;
    let codec = d.u8()?;
    let stored = d.u32()?;
    if kind != kind_byte(entry.kind) || offset != entry.offset || len != entry.len {
        return Err(corrupt(path, format!("record at byte offset {} does not match the index", entry.position)));
    }
    let payload_at = entry.position + RECORD_HEAD as u64;
    if stored > MAX_STORED || payload_at + u64::from(stored) + 16 > records_end {
        return Err(corrupt(path, format!("record at byte offset {} has an impossible size", entry.position)));
    }
    let mut payload = vec![0u8; stored as usize + 16];
    file.read_exact_at(&mut payload, payload_at)
        .map_err(|_| corrupt(path, format!("record at byte offset {} is truncated", entry.position)))?;
    let hash = payload.split_off(stored as usize);
    let data = match (entry.kind, codec) {
        (Kind::Zeros, 0) if stored == 0 => Vec::new(),
        (Kind::Data, 0) if stored == len => payload,
        (Kind::Data, 1) => zstd::bulk::decompress(&payload, len as usize)
            .ok()
            .filter(|d| d.len() == len as usize)
            .ok_or_else(|| corrupt(path, format!("record at byte offset {} does not decompress", entry.position)))?,
        _ => return Err(corrupt(path, format!("record at byte offset {} has a bad encoding", entry.position))),
    };
    if record_hash(entry.kind, offset, len, &before_hash, &data)[..] != hash[..] {
        return Err(corrupt(path, format!("record at byte offset {} fails its checksum", entry.position)));
    }
    Ok(Record { entry: *entry, before_hash, data })
}

/// Opens a delta and checks its header: magic, version and the checksummed fields. `footer` is
/// the room the rest of the file must leave for a footer. Returns the file, its size, the
/// header and where the records start.
fn open_header(path: &Path, footer: u64) -> Result<(File, u64, Header, u64, u32)> {
    let file = File::open(path).on("opening delta", path)?;
    let file_size = file.metadata().on("inspecting", path)?.len();
    let read = |buf: &mut [u8], at: u64| -> Result<()> {
        file.read_exact_at(buf, at).map_err(|_| corrupt(path, format!("truncated at byte offset {at}")))
    };
    if file_size < 24 + footer {
        return Err(corrupt(path, format!("{file_size} bytes is too short for a delta")));
    }
    let mut head = [0u8; 24];
    read(&mut head, 0)?;
    if &head[..16] != MAGIC {
        return Err(corrupt(path, "not a blksync delta (bad magic)"));
    }
    let version = u32::from_le_bytes([head[16], head[17], head[18], head[19]]);
    if !(1..=VERSION).contains(&version) {
        return Err(corrupt(path, format!("delta format version {version}; this blksync reads version {VERSION}")));
    }
    let header_len = u32::from_le_bytes([head[20], head[21], head[22], head[23]]);
    if header_len > MAX_HEADER || u64::from(header_len) + 24 + 32 + footer > file_size {
        return Err(corrupt(path, format!("header length {header_len} is impossible")));
    }
    let mut header_bytes = vec![0u8; 24 + header_len as usize + 32];
    read(&mut header_bytes, 0)?;
    let (covered, stored_hash) = header_bytes.split_at(24 + header_len as usize);
    if blake3::hash(covered).as_bytes() != stored_hash {
        return Err(corrupt(path, "header checksum mismatch"));
    }
    let header = decode_header(&covered[24..]).map_err(|e| corrupt(path, e.message()))?;
    Ok((file, file_size, header, header_bytes.len() as u64, version))
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("{}: {what}", path.display()))
}

fn decode_header(fields: &[u8]) -> Result<Header> {
    let mut d = Decoder::new(fields, "delta header");
    let text = |d: &mut Decoder<'_>| -> Result<String> {
        let b = d.bytes()?;
        if b.len() > MAX_FIELD {
            return Err(Error::protocol("header field too long"));
        }
        Ok(String::from_utf8_lossy(b).into_owned())
    };
    let header = Header {
        id: d.fixed()?,
        parent: d.fixed()?,
        block_size: d.u32()?,
        size_before: d.u64()?,
        size_after: d.u64()?,
        created: d.i64()?,
        utc_offset: d.i32()?,
        source: text(&mut d)?,
        source_identity: text(&mut d)?,
        comment: text(&mut d)?,
        tool_version: text(&mut d)?,
    };
    d.end()?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            id: [1; 16],
            parent: [0; 16],
            block_size: 4096,
            size_before: 1 << 20,
            size_after: 1 << 20,
            created: 1_700_000_000,
            utc_offset: 3600,
            source: "/dev/vg/lv".into(),
            source_identity: String::new(),
            comment: "nightly".into(),
            tool_version: "0.1.0".into(),
        }
    }

    fn write(dir: &Path, records: &[(Kind, u64, Vec<u8>)]) -> PathBuf {
        let path = dir.join("d.delta");
        let w = Writer::create(&path, &header()).unwrap();
        for (kind, offset, data) in records {
            w.record(*kind, *offset, data.len() as u32, data, None).unwrap();
        }
        w.commit().unwrap();
        path
    }

    #[test]
    fn records_round_trip_and_the_header_survives() {
        let dir = tempfile::tempdir().unwrap();
        let text = b"compressible ".repeat(1000);
        let path = write(dir.path(), &[(Kind::Data, 8192, text.clone()), (Kind::Zeros, 0, vec![0; 4096])]);
        let d = Delta::open(&path).unwrap();
        assert_eq!(d.header, header());
        assert_eq!(d.index.len(), 2);
        assert_eq!(d.index[0].offset, 0, "index is sorted");
        assert_eq!(d.read(&d.index[1]).unwrap().data, text);
        assert!(d.file_size < 2000, "compressible data is compressed: {}", d.file_size);
        let left = std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.file_name() != "d.delta").count();
        assert_eq!(left, 0, "no temporary file is left");
    }

    #[test]
    fn fingerprints_round_trip_and_version_1_files_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.delta");
        let w = Writer::create(&path, &header()).unwrap();
        w.record(Kind::Data, 0, 4096, &[5; 4096], None).unwrap();
        let states = States { before: [1; 32], after: [2; 32] };
        w.set_states(states);
        w.commit().unwrap();
        let d = Delta::open(&path).unwrap();
        assert_eq!(d.states, states);
        assert_eq!(d.read(&d.index[0]).unwrap().data, vec![5; 4096]);

        // The same delta as version 1 wrote it: no fingerprints after the index.
        let mut bytes = std::fs::read(&path).unwrap();
        let footer = bytes.len() - FOOTER as usize;
        bytes.drain(footer - STATES as usize..footer);
        bytes[16..20].copy_from_slice(&1u32.to_le_bytes());
        let header_end = 24 + u32::from_le_bytes(bytes[20..24].try_into().unwrap()) as usize;
        let header_hash = blake3::hash(&bytes[..header_end]);
        bytes[header_end..header_end + 32].copy_from_slice(header_hash.as_bytes());
        let end = bytes.len() - FOOTER as usize;
        let file_hash = blake3::hash(&bytes[..end]);
        bytes[end + 16..end + 48].copy_from_slice(file_hash.as_bytes());
        let old = dir.path().join("v1.delta");
        std::fs::write(&old, &bytes).unwrap();
        let d = Delta::open(&old).unwrap();
        assert_eq!(d.states, States::default(), "version 1 records no fingerprints");
        assert_eq!(d.read(&d.index[0]).unwrap().data, vec![5; 4096]);
    }

    #[test]
    fn any_flipped_bit_or_truncation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &[(Kind::Data, 4096, vec![7; 5000])]);
        let good = std::fs::read(&path).unwrap();
        for i in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let e = Delta::open(&path).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "flip at {i}: {e}");
        }
        for cut in [0, 10, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..cut]).unwrap();
            assert_eq!(Delta::open(&path).unwrap_err().kind(), ErrorKind::Corrupt);
        }
    }

    /// Opened by structure (no whole-file hash to stop at), damaged files are errors, not panics:
    /// every byte flipped three ways, and an index entry pointing near the end of the address
    /// space (found by the `delta_reader` fuzz target: the bounds check overflowed).
    #[test]
    fn structural_damage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &[(Kind::Data, 4096, vec![7; 3000]), (Kind::Zeros, 65536, Vec::new())]);
        let good = std::fs::read(&path).unwrap();
        let open_all = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            if let Ok(d) = Delta::open_index(&path) {
                for e in &d.index {
                    let _ = d.read(e);
                }
                let _ = d.verify();
            }
        };
        for i in 0..good.len() {
            for pattern in [0x01, 0x80, 0xFF] {
                let mut bad = good.clone();
                bad[i] ^= pattern;
                open_all(&bad);
            }
        }
        let footer = good.len() - FOOTER as usize;
        let index = u64::from_le_bytes(good[footer..footer + 8].try_into().unwrap()) as usize;
        let mut bad = good.clone();
        bad[index + 8 + 13..index + 8 + 21].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        assert_eq!(Delta::open_index(&path).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    proptest! {
        /// Random bytes, with or without a valid magic in front, are an error, not a panic.
        #[test]
        fn random_files_are_refused(data in proptest::collection::vec(any::<u8>(), 0..400), magic in any::<bool>()) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x");
            let mut bytes = if magic { MAGIC.to_vec() } else { Vec::new() };
            bytes.extend_from_slice(&data);
            std::fs::write(&path, &bytes).unwrap();
            prop_assert!(Delta::open(&path).is_err());
        }
    }
}
