//! The compressed image through its public API, on real files: round trips against an
//! in-memory model, threads, in-place updates and their space, damage, a child process killed
//! with SIGKILL, and the size against zstd of the whole raw image.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use blksync_core::ErrorKind;
use blksync_core::endpoint::{Source, Target};
use blksync_image::{Image, Options, Tuning};
use proptest::prelude::*;

/// xorshift64*: cases are seeds, so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// `len` bytes of one of three kinds: zeros, noise, or text-like data that compresses.
fn data(kind: u64, seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    match kind % 3 {
        0 => vec![0; len],
        1 => (0..len).map(|_| rng.next() as u8).collect(),
        _ => {
            const WORDS: [&[u8]; 8] = [b"block ", b"sync ", b"chunk ", b"zstd ", b"image ", b"hole ", b"disk ", b"\n"];
            let mut out = Vec::with_capacity(len + 8);
            while out.len() < len {
                out.extend_from_slice(WORDS[rng.below(8) as usize]);
            }
            out.truncate(len);
            out
        }
    }
}

fn read_all(image: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; image.size() as usize];
    image.read_at(&mut buf, 0).unwrap();
    buf
}

/// Holes read as zeros, and segments tile the image.
fn check_segments(image: &Image, model: &[u8]) {
    let mut pos = 0;
    while pos < image.size() {
        let seg = image.segment_at(pos).unwrap();
        assert!(seg.start == pos && seg.end > pos && seg.end <= image.size(), "{seg:?} at {pos}");
        if !seg.allocated {
            assert!(model[seg.start as usize..seg.end as usize].iter().all(|&b| b == 0), "a hole over data: {seg:?}");
        }
        pos = seg.end;
    }
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn small_tuning(chunk: u32) -> Tuning {
    // Patches as large as the format allows: a chunk of 8 KiB and more gets them.
    Tuning { commit_every: 4 * u64::from(chunk), cache_bytes: 3 * u64::from(chunk), patch_blocks: Some(u32::MAX) }
}

#[derive(Debug, Clone)]
enum Op {
    Write { at: u64, len: usize, kind: u64, seed: u64 },
    Zero { at: u64, len: usize },
    Resize { size: u64 },
    Read { at: u64, len: usize },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u64>(), 1usize..40_000, any::<u64>(), any::<u64>())
            .prop_map(|(at, len, kind, seed)| Op::Write { at, len, kind, seed }),
        2 => (any::<u64>(), 1usize..60_000).prop_map(|(at, len)| Op::Zero { at, len }),
        1 => (0u64..300_000).prop_map(|size| Op::Resize { size }),
        2 => (any::<u64>(), 1usize..50_000).prop_map(|(at, len)| Op::Read { at, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any sequence of writes, zeroings, resizes, flushes and reopens reads back as the same
    /// operations on a byte vector, through a cache small enough to evict all the time and with
    /// commits every few chunks.
    #[test]
    fn images_read_back_as_the_model_after_any_operations(
        shift in 12u32..=15, size in 0u64..200_000, level in prop_oneof![Just(1), Just(3), Just(-3)],
        ops in proptest::collection::vec(op(), 1..30),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.bsz");
        let chunk = 1u32 << shift;
        let options = Options { chunk_size: chunk, level, ..Options::default() };
        let mut image = Image::create(&path, size, options).unwrap().tuned(small_tuning(chunk));
        let mut model = vec![0u8; size as usize];
        for op in ops {
            let len_now = model.len() as u64;
            match op {
                Op::Write { at, len, kind, seed } => {
                    let at = at % (len_now + 1);
                    let len = len.min((len_now - at) as usize);
                    let bytes = data(kind, seed, len);
                    image.write_at(&bytes, at).unwrap();
                    model[at as usize..at as usize + len].copy_from_slice(&bytes);
                }
                Op::Zero { at, len } => {
                    let at = at % (len_now + 1);
                    let len = len.min((len_now - at) as usize);
                    image.zero(at, len as u64).unwrap();
                    model[at as usize..at as usize + len].fill(0);
                }
                Op::Resize { size } => {
                    image.set_size(size).unwrap();
                    model.resize(size as usize, 0);
                }
                Op::Read { at, len } => {
                    let at = at % (len_now + 1);
                    let len = len.min((len_now - at) as usize);
                    let mut buf = vec![0xa5; len];
                    image.read_at(&mut buf, at).unwrap();
                    prop_assert!(buf == model[at as usize..at as usize + len], "read {len} at {at}");
                }
                Op::Flush => image.flush().unwrap(),
                Op::Reopen => {
                    drop(image);
                    image = Image::open(&path, true).unwrap().tuned(small_tuning(chunk));
                }
            }
            prop_assert_eq!(image.size(), model.len() as u64);
        }
        prop_assert!(read_all(&image) == model);
        check_segments(&image, &model);
        image.flush().unwrap();
        drop(image);
        let image = Image::open(&path, false).unwrap();
        prop_assert!(read_all(&image) == model, "after reopening read-only");
        check_segments(&image, &model);
    }
}

/// Reads past the end fail, writes to a read-only image fail, and a read of nothing works.
#[test]
fn out_of_range_and_read_only_operations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.bsz");
    let image = Image::create(&path, 10_000, Options { chunk_size: 4096, ..Options::default() }).unwrap();
    let mut buf = [0u8; 10];
    let e = image.read_at(&mut buf, 9_995).unwrap_err();
    assert!(e.to_string().contains("past the end of the image"), "{e}");
    assert!(image.write_at(&buf, 9_991).is_err());
    image.read_at(&mut [], 10_000).unwrap();
    assert!(Image::create(&path, 1, Options::default()).is_err(), "create never overwrites");
    assert!(Image::create(&dir.path().join("b"), 1, Options { chunk_size: 3000, ..Options::default() }).is_err());
    assert!(Image::create(&dir.path().join("c"), 1, Options { level: 0, ..Options::default() }).is_err());
    assert!(!dir.path().join("b").exists() && !dir.path().join("c").exists());
    drop(image);
    let ro = Image::open(&path, false).unwrap();
    assert_eq!(ro.write_at(&buf, 0).unwrap_err().kind(), ErrorKind::Usage);
    assert_eq!(Image::open(&path, true).unwrap_err().kind(), ErrorKind::InUse, "a reader holds it");
    drop(ro);
    let rw = Image::open(&path, true).unwrap();
    assert_eq!(Image::open(&path, false).unwrap_err().kind(), ErrorKind::InUse, "a writer holds it");
    assert!(rw.caps().holes && rw.caps().resizable && rw.caps().zero_offload && !rw.caps().stable);
}

/// Untouched and zeroed chunks are holes; written ones are allocated, and the file holds
/// nothing for the holes.
#[test]
fn zero_chunks_are_holes_and_take_no_space() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.bsz");
    let chunk = 1u64 << 16;
    let image = Image::create(&path, 1 << 30, Options { chunk_size: chunk as u32, ..Options::default() }).unwrap();
    image.write_at(&data(1, 1, 100), 5 * chunk + 7).unwrap();
    image.write_at(&data(1, 2, chunk as usize), 9 * chunk).unwrap();
    image.write_at(&vec![0; chunk as usize], 10 * chunk).unwrap();
    assert_eq!(
        image.segment_at(0).unwrap(),
        blksync_core::endpoint::Segment { start: 0, end: 5 * chunk, allocated: false }
    );
    assert!(image.segment_at(5 * chunk + 3).unwrap().allocated, "a chunk with unstored writes is allocated");
    assert_eq!(image.segment_at(6 * chunk).unwrap().end, 9 * chunk);
    image.zero(9 * chunk, chunk).unwrap();
    image.flush().unwrap();
    assert_eq!(image.segment_at(6 * chunk).unwrap().end, 1 << 30, "9 is a hole again, and 10 (zeros) never was data");
    let usage = image.usage();
    // Chunk 5 (100 bytes written into a zero chunk) is a patch on a zero base: data, not a hole.
    assert_eq!((usage.raw_chunks, usage.zstd_chunks, usage.patched_chunks), (0, 0, 1));
    assert!(image.segment_at(5 * chunk).unwrap().allocated);
    // 1 GiB logical: 16384 entries of index (384 KiB) and one small chunk.
    assert!(allocated(&path) < 600 << 10, "{} bytes allocated", allocated(&path));
}

/// Threads writing interleaved 4 KiB blocks into the same chunks, and reading meanwhile,
/// lose no write: each chunk is loaded, changed and stored under its busy mark.
#[test]
fn concurrent_writers_on_shared_chunks_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.bsz");
    let chunk = 1u32 << 15;
    let size = 64 * u64::from(chunk);
    let image = Image::create(&path, size, Options { chunk_size: chunk, ..Options::default() })
        .unwrap()
        .tuned(small_tuning(chunk));
    let threads = 4u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let image = &image;
            s.spawn(move || {
                let mut block = t;
                while block * 4096 < size {
                    image.write_at(&data(2, block, 4096), block * 4096).unwrap();
                    let mut back = vec![0; 4096];
                    image.read_at(&mut back, block * 4096).unwrap();
                    assert_eq!(back, data(2, block, 4096));
                    block += threads;
                }
            });
        }
    });
    image.flush().unwrap();
    drop(image);
    let image = Image::open(&path, false).unwrap();
    let all = read_all(&image);
    for (block, got) in all.chunks(4096).enumerate() {
        assert_eq!(got, data(2, block as u64, 4096), "block {block}");
    }
}

/// An update of about 5 % of the chunks, repeated, keeps the allocated size within the spec's
/// bound after each commit (live data + index + headers; freed copies punched out), and the
/// file's length does not creep.
#[test]
fn in_place_updates_keep_the_file_about_its_live_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.bsz");
    let chunk = 1u32 << 15;
    let chunks = 256u64;
    let size = chunks * u64::from(chunk);
    let image = Image::create(&path, size, Options { chunk_size: chunk, ..Options::default() }).unwrap();
    let mut rng = Rng::new(5);
    for i in 0..chunks {
        image.write_at(&data(2 + 2 * (i % 4 / 3), i, chunk as usize), i * u64::from(chunk)).unwrap();
    }
    image.flush().unwrap();
    let first = allocated(&path);
    let first_len = std::fs::metadata(&path).unwrap().len();
    let slack = 64 << 10; // filesystem metadata blocks, rounding
    let mut stored = 0;
    for round in 0..12 {
        for _ in 0..chunks / 20 {
            let i = rng.below(chunks);
            for block in 0..u64::from(chunk) / 4096 {
                if rng.below(4) == 0 {
                    let at = i * u64::from(chunk) + block * 4096;
                    image.write_at(&data(2 + 2 * (rng.below(4) / 3), rng.next(), 4096), at).unwrap();
                }
            }
        }
        stored += image.stats().chunks_stored;
        image.flush().unwrap();
        let usage = image.usage();
        let bound = 8192 + usage.live + usage.index + slack;
        assert!(allocated(&path) <= bound, "round {round}: {} allocated, bound {bound}", allocated(&path));
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= first_len + first_len / 4, "round {round}: length {len}, first {first_len}");
    }
    assert!(stored > 0);
    assert!(allocated(&path) <= first + first / 4, "{} allocated, {first} at first", allocated(&path));
}

/// Every chunk is rewritten once per flush however many 4 KiB writes it took.
#[test]
fn scattered_small_writes_rewrite_each_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.bsz");
    let chunk = 1u32 << 16;
    let image =
        Image::create(&path, 32 * u64::from(chunk), Options { chunk_size: chunk, ..Options::default() }).unwrap();
    for i in (0..32u64).step_by(3) {
        for block in (0..16u64).step_by(2) {
            image.write_at(&data(2, i * 100 + block, 4096), i * u64::from(chunk) + block * 4096).unwrap();
        }
    }
    image.flush().unwrap();
    assert_eq!(image.stats().chunks_stored, 11);
    // Sequential 256 KiB reads of a 1 MiB-chunk image decompress each chunk once.
    drop(image);
    let path2 = dir.path().join("big.bsz");
    let image = Image::create(&path2, 4 << 20, Options::default()).unwrap();
    image.write_at(&data(2, 9, 4 << 20), 0).unwrap();
    image.flush().unwrap();
    drop(image);
    let image = Image::open(&path2, false).unwrap();
    let mut buf = vec![0; 256 << 10];
    for at in (0..4u64 << 20).step_by(256 << 10) {
        image.read_at(&mut buf, at).unwrap();
    }
    assert_eq!(image.stats().chunks_loaded, 4);
}

/// Damage is found: a flipped byte in a chunk is a read error naming the chunk's offset (and
/// the other chunks still read); in the index, an open error; in the newest header, the older
/// slot's commit is tried, whose index a later commit has reused: an open error too, never a
/// wrong read. A damaged older slot is ignored.
#[test]
fn damage_is_an_error_naming_where_never_a_wrong_read() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = 1u64 << 16;
    let make = |name: &str| -> PathBuf {
        let path = dir.path().join(name);
        let image =
            Image::create(&path, 8 * chunk, Options { chunk_size: chunk as u32, ..Options::default() }).unwrap();
        for i in 0..8 {
            image.write_at(&data(1 + i % 2, i, chunk as usize), i * chunk).unwrap();
        }
        image.flush().unwrap();
        image.write_at(&data(2, 99, chunk as usize), 3 * chunk).unwrap();
        image.flush().unwrap();
        path
    };
    let flip = |path: &Path, at: u64| {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[at as usize] ^= 0x10;
        std::fs::write(path, bytes).unwrap();
    };
    let read_header = |path: &Path, slot: u64| {
        let bytes = std::fs::read(path).unwrap();
        blksync_image::header::Header::decode(&bytes[slot as usize * 4096..]).unwrap()
    };

    // A chunk: find chunk 5's payload through the index.
    let path = make("chunk.bsz");
    let (h0, h1) = (read_header(&path, 0), read_header(&path, 1));
    let newest = if h0.generation > h1.generation { h0 } else { h1 };
    let bytes = std::fs::read(&path).unwrap();
    let at = newest.index_offset as usize + 5 * 24;
    let entry = blksync_image::index::Entry::decode(bytes[at..at + 24].try_into().unwrap(), chunk as u32).unwrap();
    flip(&path, entry.offset + 100);
    let image = Image::open(&path, false).unwrap();
    let mut buf = vec![0; 10];
    let e = image.read_at(&mut buf, 5 * chunk + 3).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    let text = e.to_string();
    assert!(text.contains(&format!("byte offset {}", 5 * chunk)) && text.contains("chunk.bsz"), "{text}");
    assert!(text.contains(&format!("file offset {}", entry.offset)), "{text}");
    image.read_at(&mut buf, 4 * chunk).unwrap();
    drop(image);

    // The index.
    let path = make("index.bsz");
    let (h0, h1) = (read_header(&path, 0), read_header(&path, 1));
    let newest = if h0.generation > h1.generation { h0 } else { h1 };
    flip(&path, newest.index_offset + 30);
    let e = Image::open(&path, true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("damaged index"), "{e}");

    // The newest header, then the older one.
    let path = make("newest.bsz");
    let newest_slot = u64::from(read_header(&path, 1).generation > read_header(&path, 0).generation);
    let mut copy = std::fs::read(&path).unwrap();
    copy[(newest_slot * 4096 + 30) as usize] ^= 1;
    std::fs::write(dir.path().join("torn.bsz"), &copy).unwrap();
    let e = Image::open(&dir.path().join("torn.bsz"), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    flip(&path, (1 - newest_slot) * 4096 + 30);
    let image = Image::open(&path, false).unwrap();
    assert_eq!(read_all(&image)[3 * chunk as usize..4 * chunk as usize], data(2, 99, chunk as usize)[..]);
    drop(image);

    // Not an image, truncated, a newer version.
    let other = dir.path().join("raw.img");
    std::fs::write(&other, vec![1u8; 10_000]).unwrap();
    assert!(Image::open(&other, false).unwrap_err().to_string().contains("not a blksync compressed image"));
    assert!(!blksync_image::is_image(&other).unwrap());
    assert!(blksync_image::is_image(&path).unwrap());
    assert!(!blksync_image::is_image(&dir.path().join("missing")).unwrap());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&other, &bytes[..5000]).unwrap();
    assert!(Image::open(&other, false).unwrap_err().to_string().contains("truncated"));
    let mut newer = bytes.clone();
    for slot in [0, 4096] {
        newer[slot + 8] = 2;
    }
    std::fs::write(&other, &newer).unwrap();
    assert_eq!(Image::open(&other, false).unwrap_err().kind(), ErrorKind::Unsupported);
    let cut = newest_payload_end(&bytes);
    std::fs::write(&other, &bytes[..cut - 1]).unwrap();
    let e = Image::open(&other, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

/// Where the last payload or index ends.
fn newest_payload_end(bytes: &[u8]) -> usize {
    let h = |slot: usize| blksync_image::header::Header::decode(&bytes[slot * 4096..]).ok();
    let newest = [h(0), h(1)].into_iter().flatten().max_by_key(|h| h.generation).unwrap();
    let mut end = (newest.index_offset + newest.index_len()) as usize;
    for i in 0..newest.count as usize {
        let at = newest.index_offset as usize + i * 24;
        let e = blksync_image::index::Entry::decode(bytes[at..at + 24].try_into().unwrap(), newest.chunk_size).unwrap();
        end = end.max((e.offset + u64::from(e.stored)) as usize);
    }
    end
}

/// Seeded random and mutated inputs through every decoder: an error or a value, never a panic.
#[test]
fn random_and_mutated_files_are_refused_or_read_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.bsz");
    let image = Image::create(&path, 20 * 4096 + 5, Options { chunk_size: 4096, ..Options::default() }).unwrap();
    for i in 0..20 {
        image.write_at(&data(i, i, 4096), i * 4096).unwrap();
    }
    image.flush().unwrap();
    drop(image);
    // With patches: 16 KiB chunks, records of one and two blocks over payloads and a zero chunk.
    let patched = dir.path().join("patched.bsz");
    let image = Image::create(&patched, 5 * 16384 - 100, Options { chunk_size: 16384, ..Options::default() })
        .unwrap()
        .tuned(Tuning { patch_blocks: Some(2), ..Tuning::default() });
    image.write_at(&data(2, 1, 3 * 16384), 0).unwrap();
    image.flush().unwrap();
    for (at, kind) in [(4096u64, 1), (16384 + 8192, 2), (16384 + 12288, 2), (3 * 16384, 1)] {
        image.write_at(&data(kind, at, 4096), at).unwrap();
    }
    image.flush().unwrap();
    drop(image);
    let goods = [std::fs::read(&path).unwrap(), std::fs::read(&patched).unwrap()];
    assert_eq!(patch_table(&goods[1]).len(), 3);
    // `BLKSYNC_IMAGE_SEEDS=DIR` writes these valid images there, as seeds for the fuzz target.
    if let Ok(seeds) = std::env::var("BLKSYNC_IMAGE_SEEDS") {
        std::fs::write(Path::new(&seeds).join("valid.bsz"), &goods[0]).unwrap();
        std::fs::write(Path::new(&seeds).join("patched.bsz"), &goods[1]).unwrap();
    }
    let mut rng = Rng::new(77);
    for case in 0..10_000 {
        let mut bytes = if case % 10 == 0 {
            let len = rng.below(9000) as usize;
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            goods[case % 2].clone()
        };
        for _ in 0..=rng.below(8) {
            if bytes.is_empty() {
                break;
            }
            let at =
                if rng.below(2) == 0 { rng.below(8192.min(bytes.len() as u64)) } else { rng.below(bytes.len() as u64) };
            match rng.below(4) {
                0 => bytes[at as usize] ^= 1 << rng.below(8),
                1 => bytes[at as usize] = rng.next() as u8,
                2 => bytes.truncate(at as usize),
                _ => {
                    let v = [0u64, 1, 4096, 8192, u64::MAX, 1 << 40, rng.next()][rng.below(7) as usize];
                    let at = (at as usize) & !7;
                    if at + 8 <= bytes.len() {
                        bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        blksync_image::exercise(&bytes);
    }
}

/// The child side of the SIGKILL test: runs only when the parent sets the variable.
#[test]
fn sigkill_child() {
    let Ok(spec) = std::env::var("BLKSYNC_IMAGE_CHILD") else { return };
    let (path, seed) = spec.split_once(':').unwrap();
    let plan = Plan::new(seed.parse().unwrap());
    let image = Image::open(Path::new(path), true).unwrap().tuned(Tuning {
        commit_every: plan.chunk / 2,
        cache_bytes: 4 * plan.chunk,
        patch_blocks: Some(2),
    });
    for round in 1..=Plan::ROUNDS {
        for &i in &plan.rounds[round as usize] {
            // Ascending 4 KiB runs within the chunk, as the engine writes: all of them (a new
            // payload) or one or two (a patch record, new or merged, or past the limit of two).
            let content = plan.content(round, i);
            for block in plan.blocks(round, i) {
                let at = (block * 4096) as usize;
                image.write_at(&content[at..at + 4096], i * plan.chunk + block * 4096).unwrap();
            }
        }
        image.flush().unwrap();
        println!("committed {round}");
        std::io::Write::flush(&mut std::io::stdout()).unwrap();
    }
}

/// What the SIGKILL test's child writes: in each round, a seeded set of chunks, each with
/// content that names the round and the chunk in every 4 KiB block (so a mix is seen). Every
/// third round writes the chunks whole; the others one or two seeded blocks of each (patches).
struct Plan {
    chunk: u64,
    chunks: u64,
    rounds: Vec<Vec<u64>>,
}

impl Plan {
    const ROUNDS: u64 = 400;

    fn new(seed: u64) -> Plan {
        let mut rng = Rng::new(seed);
        let chunks = 48;
        let mut rounds = vec![(0..chunks).collect::<Vec<_>>()];
        for _ in 0..Plan::ROUNDS {
            let mut set: Vec<u64> = (0..chunks).filter(|_| rng.below(4) == 0).collect();
            set.push(0);
            set.sort_unstable();
            set.dedup();
            rounds.push(set);
        }
        Plan { chunk: 1 << 15, chunks, rounds }
    }

    fn content(&self, round: u64, i: u64) -> Vec<u8> {
        let mut out = data(1 + (round + i) % 2, round * 1000 + i, self.chunk as usize);
        for block in out.chunks_mut(4096) {
            block[..16].copy_from_slice(&[round.to_le_bytes(), i.to_le_bytes()].concat());
        }
        out
    }

    /// The blocks of chunk `i` that round `round` writes.
    fn blocks(&self, round: u64, i: u64) -> Vec<u64> {
        let all = self.chunk / 4096;
        if round.is_multiple_of(3) {
            return (0..all).collect();
        }
        let mut rng = Rng::new(round * 7777 + i);
        let mut set: Vec<u64> = (0..=rng.below(2)).map(|_| rng.below(all)).collect();
        set.sort_unstable();
        set.dedup();
        set
    }

    /// The newest round up to `last` after which chunk `i` held exactly `got` (its content
    /// replayed round by round), if any.
    fn round_of(&self, i: u64, got: &[u8], last: u64) -> Option<u64> {
        let mut state = self.content(0, i);
        let mut found = (state == got).then_some(0);
        for round in 1..=last.min(Plan::ROUNDS) {
            if !self.rounds[round as usize].contains(&i) {
                continue;
            }
            let content = self.content(round, i);
            for block in self.blocks(round, i) {
                let at = (block * 4096) as usize;
                state[at..at + 4096].copy_from_slice(&content[at..at + 4096]);
            }
            if state == got {
                found = Some(round);
            }
        }
        found
    }
}

/// A child updating an image in rounds, each ending in a flush that it reports, is killed with
/// SIGKILL at seeded moments (after a seeded number of reported commits, then a seeded delay,
/// mid-round): the image opens, every chunk holds its content after one round whole (base and
/// patch record together), never older than the last reported commit, and a writable open and
/// a new round work.
#[test]
fn a_writer_killed_with_sigkill_leaves_every_chunk_old_or_new() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    for seed in 1..=6u64 {
        let plan = Plan::new(seed);
        let path = dir.path().join(format!("kill-{seed}.bsz"));
        let image = Image::create(
            &path,
            plan.chunks * plan.chunk,
            Options { chunk_size: plan.chunk as u32, ..Options::default() },
        )
        .unwrap();
        for i in 0..plan.chunks {
            image.write_at(&plan.content(0, i), i * plan.chunk).unwrap();
        }
        image.flush().unwrap();
        drop(image);
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "sigkill_child", "--nocapture", "--test-threads=1"])
            .env("BLKSYNC_IMAGE_CHILD", format!("{}:{seed}", path.display()))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut rng = Rng::new(seed * 31);
        let wait_for = 1 + rng.below(4);
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut reported = 0;
        while reported < wait_for {
            let line = lines.next().expect("the child ended early").unwrap();
            if let Some(n) = line.strip_prefix("committed ") {
                reported = n.parse().unwrap();
            }
        }
        // The moment within the next rounds: a seeded delay (not a synchronisation: the kill
        // lands wherever the child is).
        std::thread::sleep(std::time::Duration::from_micros(rng.below(20_000)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for line in lines.map_while(std::result::Result::ok) {
            if let Some(n) = line.strip_prefix("committed ") {
                reported = n.parse().unwrap();
            }
        }
        let image = Image::open(&path, true).unwrap();
        let all = read_all(&image);
        let mut newest = 0;
        for i in 0..plan.chunks {
            let got = &all[(i * plan.chunk) as usize..((i + 1) * plan.chunk) as usize];
            let round = plan
                .round_of(i, got, reported + 1)
                .unwrap_or_else(|| panic!("seed {seed}: chunk {i} is no round's content"));
            let floor = (0..=reported).rev().find(|&r| plan.rounds[r as usize].contains(&i)).unwrap();
            assert!(round >= floor, "seed {seed}: chunk {i} holds round {round}, older than {floor}");
            newest = newest.max(round);
        }
        eprintln!(
            "seed {seed}: killed after the commit of round {reported} was reported; newest chunk: round {newest}; \
             {} chunks with a patch",
            image.usage().patched_chunks
        );
        // The next sync repairs: a writable open takes new writes.
        image.write_at(&plan.content(0, 1), plan.chunk).unwrap();
        image.flush().unwrap();
    }
}

/// The size against zstd of the whole raw image, on real files of this machine (64 MiB of
/// /usr/lib and /usr/share, a stand-in for a disk's content), and the speed of both. Prints the
/// numbers; fails when the image is over 1.15 × `zstd -1` of the whole file. Skips without the
/// zstd command.
#[test]
fn the_image_is_at_most_15_percent_larger_than_zstd_of_the_whole_raw_file() {
    let Ok(out) = std::process::Command::new("zstd").arg("--version").output() else {
        eprintln!("skipping: no zstd command");
        return;
    };
    assert!(out.status.success());
    let total: usize = std::env::var("BLKSYNC_IMAGE_SIZE_MIB").map_or(64, |v| v.parse().unwrap()) << 20;
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.img");
    let mut content = Vec::with_capacity(total);
    let mut todo: Vec<PathBuf> = vec!["/usr/lib".into(), "/usr/share".into()];
    while let Some(p) = todo.pop() {
        if content.len() >= total {
            break;
        }
        let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
        if meta.is_dir() {
            let mut names: Vec<PathBuf> =
                std::fs::read_dir(&p).into_iter().flatten().flatten().map(|e| e.path()).collect();
            names.sort();
            todo.extend(names.into_iter().rev());
        } else if meta.is_file()
            && let Ok(bytes) = std::fs::read(&p)
        {
            content.extend_from_slice(&bytes);
            // A filesystem aligns files to blocks; a disk has free (zeroed) space too.
            content.resize(content.len().next_multiple_of(4096), 0);
        }
    }
    content.resize(total, 0);
    std::fs::write(&raw, &content).unwrap();
    let zstd = |level: &str| {
        let start = std::time::Instant::now();
        let out = std::process::Command::new("zstd").args([level, "-q", "-c", "-T1"]).arg(&raw).output().unwrap();
        (out.stdout.len() as u64, start.elapsed().as_secs_f64())
    };
    let (z1, z1_time) = zstd("-1");
    let (z3, _) = zstd("-3");
    let mut lines = Vec::new();
    for level in [1, 3] {
        let path = dir.path().join(format!("img-{level}.bsz"));
        let start = std::time::Instant::now();
        let image = Image::create(&path, total as u64, Options { level, ..Options::default() }).unwrap();
        for (k, piece) in content.chunks(2 << 20).enumerate() {
            image.write_at(piece, k as u64 * (2 << 20)).unwrap();
        }
        image.flush().unwrap();
        let write = start.elapsed().as_secs_f64();
        drop(image);
        let image = Image::open(&path, false).unwrap();
        let start = std::time::Instant::now();
        let back = read_all(&image);
        let read = start.elapsed().as_secs_f64();
        assert!(back == content);
        let len = std::fs::metadata(&path).unwrap().len();
        let alloc = allocated(&path);
        lines.push(format!(
            "level {level}: image {len} bytes ({alloc} allocated) = {:.3} x zstd -1 ({z1}), {:.3} x zstd -3 ({z3}); \
             compress {:.0} MB/s, decompress {:.0} MB/s (zstd -1 CLI {:.0} MB/s)",
            len as f64 / z1 as f64,
            len as f64 / z3 as f64,
            total as f64 / write / 1e6,
            total as f64 / read / 1e6,
            total as f64 / z1_time / 1e6,
        ));
        if level == 1 {
            assert!(len as f64 <= 1.15 * z1 as f64, "{}", lines.join("\n"));
        }
    }
    eprintln!("{} MiB of /usr files:\n{}", total >> 20, lines.join("\n"));
}

/// The child side of the memory test: runs only when the parent sets the variable, and prints
/// its peak RSS.
#[test]
fn memory_child() {
    let Ok(path) = std::env::var("BLKSYNC_IMAGE_MEMORY") else { return };
    let path = Path::new(&path);
    let gib = 1u64 << 30;
    let image = Image::create(path, 1 << 40, Options::default()).unwrap();
    // Two workers: whole chunks every 16 GiB, and scattered 4 KiB writes into 32 more chunks
    // (the cache full of dirty chunks).
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let image = &image;
            s.spawn(move || {
                for k in (t..64).step_by(2) {
                    image.write_at(&data(2, k, 1 << 20), k * 16 * gib).unwrap();
                }
                for k in (t..32).step_by(2) {
                    for block in (0..256u64).step_by(7) {
                        image.write_at(&data(1, block, 4096), k * 16 * gib + gib + block * 4096).unwrap();
                    }
                }
            });
        }
    });
    image.flush().unwrap();
    drop(image);
    let image = Image::open(path, true).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    for k in 0..64 {
        image.read_at(&mut buf, k * 16 * gib + (512 << 10)).unwrap();
    }
    image.write_at(&buf[..4096], 5 * gib).unwrap();
    image.flush().unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().to_string();
    println!("hwm {hwm}");
}

/// A 1 TiB image at 1 MiB chunks (an index of 1M entries), written by two threads, committed,
/// reopened and updated, stays under the project's 64 MiB RSS ceiling: the index is 24 MiB and
/// the cache 16 MiB. Measured in a child process, alone.
#[test]
fn a_1_tib_image_stays_under_64_mib_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "memory_child", "--nocapture", "--test-threads=1"])
        .env("BLKSYNC_IMAGE_MEMORY", dir.path().join("tib.bsz"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let kib: u64 = stdout
        .lines()
        .find_map(|l| l.split("hwm ").nth(1))
        .and_then(|v| v.trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no hwm line in {stdout}"));
    eprintln!("1 TiB image: peak RSS {} MiB", kib >> 10);
    assert!(kib < 64 << 10, "peak RSS {kib} KiB");
    let allocated = allocated(&dir.path().join("tib.bsz"));
    assert!(allocated < 200 << 20, "{allocated} bytes allocated");
}

/// The newest valid header slot of the image at `path`.
fn newest_header(bytes: &[u8]) -> blksync_image::header::Header {
    let h = |slot: usize| blksync_image::header::Header::decode(&bytes[slot * 4096..]).ok();
    [h(0), h(1)].into_iter().flatten().max_by_key(|h| h.generation).unwrap()
}

/// The committed patch table of the image in `bytes`: (chunk, patch, file offset of the entry).
fn patch_table(bytes: &[u8]) -> Vec<(u64, blksync_image::index::Patch, usize)> {
    let h = newest_header(bytes);
    (0..h.patch_count as usize)
        .map(|k| {
            let at = h.patch_offset as usize + 32 * k;
            let (chunk, patch) =
                blksync_image::index::Patch::decode(bytes[at..at + 32].try_into().unwrap(), h.chunk_size, h.count)
                    .unwrap();
            (chunk, patch, at)
        })
        .collect()
}

#[derive(Debug, Clone)]
enum BlockOp {
    /// `n` whole 4 KiB blocks from block `block` on.
    Blocks {
        block: u64,
        n: u64,
        kind: u64,
        seed: u64,
    },
    /// A write that is not whole blocks.
    Small {
        at: u64,
        len: usize,
        seed: u64,
    },
    ZeroBlocks {
        block: u64,
        n: u64,
    },
    Chunk {
        i: u64,
        kind: u64,
        seed: u64,
    },
    ZeroChunk {
        i: u64,
    },
    Read {
        at: u64,
        len: usize,
    },
    Flush,
    Reopen,
}

fn block_op() -> impl Strategy<Value = BlockOp> {
    prop_oneof![
        8 => (any::<u64>(), 1u64..4, any::<u64>(), any::<u64>())
            .prop_map(|(block, n, kind, seed)| BlockOp::Blocks { block, n, kind, seed }),
        2 => (any::<u64>(), 1usize..6000, any::<u64>()).prop_map(|(at, len, seed)| BlockOp::Small { at, len, seed }),
        2 => (any::<u64>(), 1u64..3).prop_map(|(block, n)| BlockOp::ZeroBlocks { block, n }),
        1 => (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(i, kind, seed)| BlockOp::Chunk { i, kind, seed }),
        1 => any::<u64>().prop_map(|i| BlockOp::ZeroChunk { i }),
        3 => (any::<u64>(), 1usize..40_000).prop_map(|(at, len)| BlockOp::Read { at, len }),
        1 => Just(BlockOp::Flush),
        1 => Just(BlockOp::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Scattered whole-block writes (which become patches without reading their chunk), small
    /// unaligned writes, zeroed blocks and chunks, whole chunks, reads, flushes and reopens read
    /// back as the same operations on a byte vector, with patches of 1 to 8 blocks, a last chunk
    /// cut short, and a cache that evicts all the time.
    #[test]
    fn block_writes_with_patches_read_back_as_the_model(
        shift in 14u32..=16, chunks in 2u64..8, tail in 0u64..20_000, limit in 1u32..=8,
        ops in proptest::collection::vec(block_op(), 1..60),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.bsz");
        let chunk = 1u32 << shift;
        let size = (chunks * u64::from(chunk)).saturating_sub(tail % u64::from(chunk));
        let tuning = Tuning { patch_blocks: Some(limit), ..small_tuning(chunk) };
        let options = Options { chunk_size: chunk, level: 1, ..Options::default() };
        let mut image = Image::create(&path, size, options).unwrap().tuned(tuning);
        // A base of data, committed, so that patches lie over payloads.
        let mut model = data(2, 1, size as usize);
        image.write_at(&model, 0).unwrap();
        image.flush().unwrap();
        let blocks = size / 4096;
        let whole = size / u64::from(chunk);
        for op in ops {
            match op {
                BlockOp::Blocks { block, n, kind, seed } if blocks > 0 => {
                    let block = block % blocks;
                    let n = n.min(blocks - block);
                    let bytes = data(kind, seed, (n * 4096) as usize);
                    image.write_at(&bytes, block * 4096).unwrap();
                    model[(block * 4096) as usize..((block + n) * 4096) as usize].copy_from_slice(&bytes);
                }
                BlockOp::ZeroBlocks { block, n } if blocks > 0 => {
                    let block = block % blocks;
                    let n = n.min(blocks - block);
                    image.zero(block * 4096, n * 4096).unwrap();
                    model[(block * 4096) as usize..((block + n) * 4096) as usize].fill(0);
                }
                BlockOp::Small { at, len, seed } => {
                    let at = at % (size + 1);
                    let len = len.min((size - at) as usize);
                    let bytes = data(2, seed, len);
                    image.write_at(&bytes, at).unwrap();
                    model[at as usize..at as usize + len].copy_from_slice(&bytes);
                }
                BlockOp::Chunk { i, kind, seed } if whole > 0 => {
                    let at = (i % whole) * u64::from(chunk);
                    let bytes = data(kind, seed, chunk as usize);
                    image.write_at(&bytes, at).unwrap();
                    model[at as usize..at as usize + chunk as usize].copy_from_slice(&bytes);
                }
                BlockOp::ZeroChunk { i } if whole > 0 => {
                    let at = (i % whole) * u64::from(chunk);
                    image.zero(at, u64::from(chunk)).unwrap();
                    model[at as usize..at as usize + chunk as usize].fill(0);
                }
                BlockOp::Read { at, len } => {
                    let at = at % (size + 1);
                    let len = len.min((size - at) as usize);
                    let mut buf = vec![0xa5; len];
                    image.read_at(&mut buf, at).unwrap();
                    prop_assert!(buf == model[at as usize..at as usize + len], "read {len} at {at}");
                }
                BlockOp::Flush => image.flush().unwrap(),
                BlockOp::Reopen => {
                    drop(image);
                    image = Image::open(&path, true).unwrap().tuned(tuning);
                }
                _ => {}
            }
        }
        prop_assert!(read_all(&image) == model);
        check_segments(&image, &model);
        image.flush().unwrap();
        drop(image);
        let image = Image::open(&path, false).unwrap();
        prop_assert!(read_all(&image) == model, "after reopening read-only");
        check_segments(&image, &model);
        for (_, patch, _) in patch_table(&std::fs::read(&path).unwrap()) {
            prop_assert!(u32::from(patch.blocks) <= limit.min(chunk / 8192));
        }
    }
}

/// A chunk's few changed blocks become a patch record (its payload untouched, nothing
/// decompressed), more changes merge into a new record, and past the limit the chunk is
/// rewritten whole without one; a whole-chunk write or zeroing drops the patch, a zero chunk
/// with a patch is data, and the header carries the patches flag exactly while there are
/// patches.
#[test]
fn patches_are_made_merged_and_given_up_past_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.bsz");
    let chunk = 256u64 << 10; // a limit of 8 blocks
    let size = 8 * chunk - 5000;
    let image = Image::create(&path, size, Options { chunk_size: chunk as u32, ..Options::default() }).unwrap();
    let mut model = data(2, 7, size as usize);
    model[(6 * chunk) as usize..(7 * chunk) as usize].fill(0); // chunk 6 stays a zero chunk
    image.write_at(&model, 0).unwrap();
    image.flush().unwrap();
    let flags = |path: &Path| {
        let bytes = std::fs::read(path).unwrap();
        let h = newest_header(&bytes);
        let slot = if blksync_image::header::Header::decode(&bytes[..]).ok() == Some(h) { 0 } else { 4096 };
        u32::from_le_bytes(bytes[slot + 12..slot + 16].try_into().unwrap())
    };
    assert_eq!(flags(&path), 0, "no patches: the format before them");
    drop(image);
    let mut image = Image::open(&path, true).unwrap();
    let write = |image: &Image, model: &mut Vec<u8>, at: u64, len: usize, seed: u64| {
        let bytes = data(1, seed, len);
        image.write_at(&bytes, at).unwrap();
        model[at as usize..at as usize + len].copy_from_slice(&bytes);
    };
    let table = |path: &Path| patch_table(&std::fs::read(path).unwrap());
    // Three blocks of chunk 1: a record of 3.
    for b in [3, 9, 40] {
        write(&image, &mut model, chunk + b * 4096, 4096, b);
    }
    image.flush().unwrap();
    let s = image.stats();
    assert_eq!((s.chunks_stored, s.patches_stored, s.chunks_loaded, s.patches_loaded), (1, 1, 0, 0));
    assert_eq!(table(&path).iter().map(|(i, p, _)| (*i, p.blocks)).collect::<Vec<_>>(), [(1, 3)]);
    assert_eq!(flags(&path), 1);
    // Three more and one again: merged into a record of 6, the old one read, no chunk.
    for b in [0, 9, 41, 63] {
        write(&image, &mut model, chunk + b * 4096, 4096, 100 + b);
    }
    image.flush().unwrap();
    let s = image.stats();
    assert_eq!((s.patches_stored, s.chunks_loaded, s.patches_loaded), (2, 0, 1));
    assert_eq!(table(&path).iter().map(|(i, p, _)| (*i, p.blocks)).collect::<Vec<_>>(), [(1, 6)]);
    assert!(read_all(&image) == model);
    // Three more: 9 blocks, past the limit of 8: the chunk is rewritten whole.
    for b in [1, 2, 50] {
        write(&image, &mut model, chunk + b * 4096, 4096, 200 + b);
    }
    image.flush().unwrap();
    assert!(table(&path).is_empty());
    assert_eq!(flags(&path), 0, "the last patch gone: the flag too");
    assert_eq!(image.usage().patched_chunks, 0);
    // A zero chunk with a patch is data; a part-block write reads its block first.
    write(&image, &mut model, 6 * chunk + 5 * 4096 + 100, 300, 300);
    image.flush().unwrap();
    assert!(image.segment_at(6 * chunk).unwrap().allocated);
    assert_eq!(table(&path).iter().map(|(i, p, _)| (*i, p.blocks)).collect::<Vec<_>>(), [(6, 1)]);
    let usage = image.usage();
    assert_eq!((usage.zero_chunks, usage.patched_chunks), (0, 1), "a zero base with a patch is no hole");
    // The last chunk, cut short: its last whole block and the part block after it.
    let last_block = (size / 4096 - 1) * 4096;
    write(&image, &mut model, last_block, 4096, 400);
    write(&image, &mut model, size - 900, 900, 401);
    // A whole-chunk write drops chunk 6's patch; chunk 2 gets one, then is zeroed whole.
    write(&image, &mut model, 6 * chunk, chunk as usize, 402);
    write(&image, &mut model, 2 * chunk + 4096, 4096, 403);
    image.flush().unwrap();
    assert_eq!(table(&path).iter().map(|(i, _, _)| *i).collect::<Vec<_>>(), [2, 7]);
    image.zero(2 * chunk, chunk).unwrap();
    model[(2 * chunk) as usize..(3 * chunk) as usize].fill(0);
    image.flush().unwrap();
    assert_eq!(table(&path).iter().map(|(i, _, _)| *i).collect::<Vec<_>>(), [7]);
    assert!(!image.segment_at(2 * chunk).unwrap().allocated, "zeroed whole: a hole again");
    assert!(read_all(&image) == model);
    check_segments(&image, &model);
    drop(image);
    image = Image::open(&path, false).unwrap();
    assert!(read_all(&image) == model);
    check_segments(&image, &model);
}

/// The effect patches exist for: 1 % of a multi-chunk image's 4 KiB blocks, scattered, changed
/// in place (as a sync over ssh writes them, long after the scan read the chunks) decompress no
/// chunk and store about the changed blocks, not the chunks they touch.
#[test]
fn a_one_percent_scattered_update_decompresses_no_chunk_and_stores_little() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.bsz");
    let chunk = 1u64 << 20;
    let chunks = 16;
    let image = Image::create(&path, chunks * chunk, Options::default()).unwrap();
    let mut model = data(2, 3, (chunks * chunk) as usize);
    image.write_at(&model, 0).unwrap();
    image.flush().unwrap();
    drop(image);
    let image = Image::open(&path, true).unwrap();
    let blocks = chunks * chunk / 4096;
    let mut rng = Rng::new(11);
    let mut touched = std::collections::BTreeSet::new();
    let mut changed = std::collections::BTreeSet::new();
    while changed.len() < (blocks / 100) as usize {
        let b = rng.below(blocks);
        if changed.insert(b) {
            touched.insert(b * 4096 / chunk);
        }
    }
    for &b in &changed {
        let bytes = data(1, b, 4096);
        image.write_at(&bytes, b * 4096).unwrap();
        model[(b * 4096) as usize..((b + 1) * 4096) as usize].copy_from_slice(&bytes);
    }
    image.flush().unwrap();
    let s = image.stats();
    let n = touched.len() as u64;
    eprintln!("{} blocks changed in {n} chunks: {s:?}", changed.len());
    assert_eq!(s.chunks_loaded, 0, "no chunk decompressed for writing");
    assert_eq!((s.chunks_stored, s.patches_stored), (n, n));
    // Each record: its blocks (noise does not compress) and their numbers, no chunk.
    assert!(s.bytes_stored <= changed.len() as u64 * 4098 + n * 64, "{} bytes stored", s.bytes_stored);
    assert!(s.bytes_stored * 16 < n * chunk);
    assert!(read_all(&image) == model);
    drop(image);
    let image = Image::open(&path, false).unwrap();
    assert!(read_all(&image) == model);
}

/// The content of the image `tests/fixtures/before-patches.bsz` holds, written by blksync before
/// patches existed (`blksync sync --compress` of these 3 MiB - 1000 bytes).
fn before_patches_content() -> Vec<u8> {
    let mib = 1usize << 20;
    let mut out: Vec<u8> = (0..mib).map(|k| ((k * 7 + k / 4096) % 251) as u8).collect();
    out.resize(2 * mib, 0);
    let line = b"blksync old format\n";
    out.extend(line.iter().cycle().take(mib - 1000));
    out
}

/// An image written before patches existed (no flag) opens, reads and takes updates: without
/// patches it stays in that format; the first patch sets the flag, and rewriting the patched
/// chunk whole clears it again.
#[test]
fn an_image_from_before_patches_opens_reads_and_updates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.bsz");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/before-patches.bsz"), &path).unwrap();
    let mut model = before_patches_content();
    let image = Image::open(&path, false).unwrap();
    assert!(read_all(&image) == model);
    check_segments(&image, &model);
    assert!(!image.segment_at(1 << 20).unwrap().allocated, "its zero chunk is a hole");
    drop(image);
    let image = Image::open(&path, true).unwrap();
    let bytes = data(1, 5, 4096);
    image.write_at(&bytes, (2 << 20) + 8192).unwrap();
    model[(2 << 20) + 8192..(2 << 20) + 12288].copy_from_slice(&bytes);
    image.flush().unwrap();
    assert_eq!(image.stats().patches_stored, 1);
    assert!(read_all(&image) == model);
    assert_ne!(newest_header(&std::fs::read(&path).unwrap()).patch_count, 0);
    // The last chunk (cut short) rewritten: more blocks than a patch holds, so no patch left.
    let rest = data(2, 6, (1 << 20) - 1000);
    image.write_at(&rest, 2 << 20).unwrap();
    model[2 << 20..].copy_from_slice(&rest);
    image.flush().unwrap();
    assert_eq!(image.usage().patched_chunks, 0);
    drop(image);
    let file = std::fs::read(&path).unwrap();
    let h = newest_header(&file);
    let slot = if blksync_image::header::Header::decode(&file[..]).ok() == Some(h) { 0 } else { 4096 };
    assert_eq!(h.patch_count, 0);
    assert!(file[slot + 12..slot + 16] == [0; 4] && file[slot + 72..slot + 104].iter().all(|&b| b == 0));
    let image = Image::open(&path, false).unwrap();
    assert!(read_all(&image) == model);
}

/// Damage to patches is found: a flipped byte in a record is a read error naming the chunk's
/// logical offset and the record's file offset (the other chunks still read); in the table, an
/// open error; a record referenced for another chunk (the table entries swapped, every hash
/// fixed up) fails its seeded checksum; a hostile patch count or table offset is refused before
/// anything is allocated for it.
#[test]
fn damaged_patches_are_errors_naming_where() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = 64u64 << 10; // patches of up to 2 blocks
    let make = |name: &str| -> (PathBuf, Vec<u8>) {
        let path = dir.path().join(name);
        let image =
            Image::create(&path, 8 * chunk, Options { chunk_size: chunk as u32, ..Options::default() }).unwrap();
        let mut model = data(2, 1, 8 * chunk as usize);
        image.write_at(&model, 0).unwrap();
        image.flush().unwrap();
        for (i, b) in [(2u64, 3u64), (5, 0)] {
            let at = i * chunk + b * 4096;
            let bytes = data(1, i, 4096);
            image.write_at(&bytes, at).unwrap();
            model[at as usize..at as usize + 4096].copy_from_slice(&bytes);
        }
        image.flush().unwrap();
        (path, model)
    };
    let patch_of = |path: &Path, chunk_no: u64| {
        patch_table(&std::fs::read(path).unwrap()).into_iter().find(|(i, _, _)| *i == chunk_no).unwrap()
    };
    let edit = |path: &Path, f: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = std::fs::read(path).unwrap();
        f(&mut bytes);
        std::fs::write(path, bytes).unwrap();
    };

    // A record.
    let (path, model) = make("record.bsz");
    let (_, patch, _) = patch_of(&path, 5);
    edit(&path, &|b| b[patch.offset as usize + 10] ^= 0x40);
    let image = Image::open(&path, false).unwrap();
    let mut buf = vec![0; chunk as usize];
    let e = image.read_at(&mut buf, 5 * chunk).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    let text = e.to_string();
    assert!(text.contains("patch record") && text.contains("record.bsz"), "{text}");
    assert!(text.contains(&format!("byte offset {}", 5 * chunk)), "{text}");
    assert!(text.contains(&format!("file offset {}", patch.offset)), "{text}");
    for i in [2, 4] {
        image.read_at(&mut buf, i * chunk).unwrap();
        assert!(buf == model[(i * chunk) as usize..((i + 1) * chunk) as usize]);
    }
    drop(image);

    // The table.
    let (path, _) = make("table.bsz");
    let (_, _, at) = patch_of(&path, 2);
    edit(&path, &|b| b[at + 5] ^= 1);
    let e = Image::open(&path, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("damaged patch table"), "{e}");

    // A record referenced for another chunk: everything but the chunk numbers swapped.
    let (path, _) = make("moved.bsz");
    let ((_, _, first), (_, _, second)) = (patch_of(&path, 2), patch_of(&path, 5));
    edit(&path, &|bytes| {
        let (x, y) = (bytes[first + 4..first + 32].to_vec(), bytes[second + 4..second + 32].to_vec());
        bytes[first + 4..first + 32].copy_from_slice(&y);
        bytes[second + 4..second + 32].copy_from_slice(&x);
        blksync_image::fix_checksums(bytes);
    });
    let image = Image::open(&path, false).unwrap();
    let e = image.read_at(&mut buf, 2 * chunk).unwrap_err();
    assert!(e.to_string().contains("checksum mismatch") && e.to_string().contains("patch record"), "{e}");
    drop(image);

    // Hostile counts and offsets, with every hash right.
    let (path, _) = make("hostile.bsz");
    let good = std::fs::read(&path).unwrap();
    let len = good.len() as u64;
    for (count, offset) in
        [(1u64 << 40, None), (u64::MAX, None), (8, Some(len.div_ceil(4096) * 4096)), (8, Some(1 << 50))]
    {
        let mut bytes = good.clone();
        // Both slots (the older one had no patches: the flag set there too), or open takes the
        // other.
        for slot in [0, 4096] {
            bytes[slot + 12] |= 1;
            bytes[slot + 80..slot + 88].copy_from_slice(&count.to_le_bytes());
            if let Some(offset) = offset {
                bytes[slot + 72..slot + 80].copy_from_slice(&offset.to_le_bytes());
            }
        }
        blksync_image::fix_checksums(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        let e = Image::open(&path, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        if offset.is_some() {
            assert!(e.to_string().contains("past the end of the file"), "{e}");
        }
    }
}
