//! Crash safety by simulation: the image is stopped after every possible number of changes to
//! its file (the last write torn in half), and what reopens must hold, per chunk, its old or its
//! new content, and the old or the new size.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use blksync_core::endpoint::{Source, Target};

use super::{Image, Options, Tuning};

const CHUNK: u64 = 8192;

/// Chunk `i`'s content in generation `generation`: zeros, noise or text, by turns.
fn content(generation: u64, i: u64) -> Vec<u8> {
    let mut x = (generation * 7919 + i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    match (generation + i) % 3 {
        0 => vec![0; CHUNK as usize],
        1 => (0..CHUNK).map(|_| next() as u8).collect(),
        _ => (0..CHUNK).map(|k| b"old new "[(k as usize + (next() % 3) as usize) % 8]).collect(),
    }
}

fn tuning() -> Tuning {
    // Commits every chunk or two, a cache of two chunks: many commits and evictions.
    Tuning { commit_every: CHUNK, cache_bytes: 2 * CHUNK, patch_blocks: None }
}

/// An image of `chunks` chunks of generation 0 (its last one cut short), committed.
fn base(dir: &Path, chunks: u64) -> (PathBuf, Vec<u8>) {
    let path = dir.join("base.bsz");
    let size = chunks * CHUNK - 100;
    let image = Image::create(&path, size, Options { chunk_size: CHUNK as u32, ..Options::default() }).unwrap();
    let mut model = Vec::new();
    for i in 0..chunks {
        model.extend(content(0, i));
    }
    model.truncate(size as usize);
    image.write_at(&model, 0).unwrap();
    image.flush().unwrap();
    (path, model)
}

/// Runs `update` on copies of the base image stopped after 0, 1, 2, … changes to the file until
/// one runs to its end, and checks each reopened copy against the contents before (`old`) and
/// after (`new`). Returns how many crash points there were.
fn crash_everywhere(
    dir: &Path,
    base: &Path,
    old: &[u8],
    new: &[u8],
    update: &dyn Fn(&Image) -> blksync_core::Result<()>,
) -> u64 {
    crash_everywhere_with(dir, base, old, new, CHUNK, tuning(), update)
}

/// [`crash_everywhere`] for images of `chunk`-byte chunks, opened with `tuning`.
fn crash_everywhere_with(
    dir: &Path,
    base: &Path,
    old: &[u8],
    new: &[u8],
    chunk: u64,
    tuning: Tuning,
    update: &dyn Fn(&Image) -> blksync_core::Result<()>,
) -> u64 {
    let case = dir.join("case.bsz");
    for n in 0.. {
        std::fs::copy(base, &case).unwrap();
        let image = Image::open(&case, true).unwrap().tuned(tuning);
        image.faults().left.store(n, Ordering::SeqCst);
        let result = update(&image);
        let crashed = image.faults().dead.load(Ordering::SeqCst);
        drop(image);
        let image = Image::open(&case, false).unwrap_or_else(|e| panic!("crash at change {n}: {e}"));
        let size = image.size() as usize;
        assert!(size == old.len() || size == new.len(), "crash at change {n}: size {size}");
        let mut got = vec![0; size];
        image.read_at(&mut got, 0).unwrap_or_else(|e| panic!("crash at change {n}: {e}"));
        for (i, piece) in got.chunks(chunk as usize).enumerate() {
            let range = i * chunk as usize..i * chunk as usize + piece.len();
            let of = |model: &[u8]| {
                let mut want = vec![0; piece.len()];
                let end = range.end.min(model.len());
                if range.start < end {
                    want[..end - range.start].copy_from_slice(&model[range.start..end]);
                }
                want
            };
            assert!(piece == of(old) || piece == of(new), "crash at change {n}: chunk {i} is neither old nor new");
        }
        if !crashed {
            result.unwrap();
            assert!(got == new, "the update without a crash");
            return n;
        }
    }
    unreachable!()
}

/// Each chunk written once, as the engine writes: whole chunks, zeroed chunks, and chunks in
/// ascending 4 KiB runs.
fn rewrite(image: &Image, chunks: &[u64], generation: u64) -> blksync_core::Result<()> {
    for &i in chunks {
        let at = i * CHUNK;
        let len = (image.size() - at).min(CHUNK) as usize;
        let bytes = &content(generation, i)[..len];
        match i % 3 {
            0 => image.write_at(bytes, at)?,
            1 if blksync_core::zero::is_zero(bytes) => image.zero(at, len as u64)?,
            _ => {
                for block in (0..len).step_by(4096) {
                    let end = (block + 4096).min(len);
                    image.write_at(&bytes[block..end], at + block as u64)?;
                }
            }
        }
    }
    image.flush()
}

fn model_after(old: &[u8], chunks: &[u64], generation: u64) -> Vec<u8> {
    let mut new = old.to_vec();
    for &i in chunks {
        let at = (i * CHUNK) as usize;
        let len = (new.len() - at).min(CHUNK as usize);
        new[at..at + len].copy_from_slice(&content(generation, i)[..len]);
    }
    new
}

#[test]
fn a_crash_at_any_change_to_the_file_leaves_each_chunk_old_or_new() {
    let dir = tempfile::tempdir().unwrap();
    let (base, old) = base(dir.path(), 16);
    let chunks = [0, 1, 2, 3, 5, 6, 8, 11, 12, 14, 15];
    let new = model_after(&old, &chunks, 1);
    let points = crash_everywhere(dir.path(), &base, &old, &new, &|image| rewrite(image, &chunks, 1));
    assert!(points > 30, "only {points} changes to the file");
}

#[test]
fn a_crash_while_growing_or_shrinking_leaves_the_old_or_the_new_size_and_content() {
    let dir = tempfile::tempdir().unwrap();
    let (base, old) = base(dir.path(), 12);
    // Grow by five and a half chunks, write into the new part and the old one.
    let grown = old.len() + 5 * CHUNK as usize + 4000;
    let mut new = old.clone();
    new.resize(grown, 0);
    let chunks = [2, 12, 14, 16];
    let new = model_after(&new, &chunks, 2);
    crash_everywhere(dir.path(), &base, &old, &new, &|image| {
        image.set_size(grown as u64)?;
        rewrite(image, &chunks, 2)
    });
    // Shrink to the middle of a chunk, then write a chunk before the cut.
    let cut = 5 * CHUNK as usize + 1234;
    let new = model_after(&old[..cut], &[1], 3);
    crash_everywhere(dir.path(), &base, &old, &new, &|image| {
        image.set_size(cut as u64)?;
        rewrite(image, &[1], 3)
    });
}

/// What a killed run wrote and never committed is punched out when the image is next opened
/// writable, and a failed commit refuses further writes.
#[test]
fn uncommitted_space_is_reclaimed_at_the_next_writable_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.bsz");
    let chunk = 1u64 << 16;
    let image = Image::create(&path, 64 * chunk, Options { chunk_size: chunk as u32, ..Options::default() }).unwrap();
    let noise: Vec<u8> = (0..64).flat_map(|i| content(1, 3 * i)).collect::<Vec<u8>>().repeat(8);
    image.write_at(&noise[..8 * chunk as usize], 0).unwrap();
    image.flush().unwrap();
    let committed = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap()) * 512;
    // 56 more chunks of noise written (3.5 MiB), then a crash before the commit's header.
    let image = image.tuned(Tuning { commit_every: 1 << 40, ..Tuning::default() });
    image.write_at(&noise[8 * chunk as usize..], 8 * chunk).unwrap();
    image.faults().left.store(0, Ordering::SeqCst);
    let e = image.flush().unwrap_err();
    assert!(e.to_string().contains("simulated crash"), "{e}");
    assert!(image.write_at(&[1], 0).unwrap_err().to_string().contains("earlier failure"));
    drop(image);
    let blocks = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap()) * 512;
    assert!(blocks() > committed + (3 << 20));
    let image = Image::open(&path, true).unwrap();
    assert!(blocks() <= committed + (64 << 10), "{} allocated after the open, {committed} committed", blocks());
    let mut back = vec![0; 8 * chunk as usize];
    image.read_at(&mut back, 0).unwrap();
    assert!(back == noise[..8 * chunk as usize]);
}

/// The same with patches (16 KiB chunks, records of up to two blocks) over a base that has
/// some: a crash at any change to the file (records, the patch table, the index, headers, each
/// write torn) leaves every chunk with its old content (base and old record) or its new one,
/// whether the update makes a new record, merges one, replaces a block of one, outgrows the
/// limit into a whole rewrite, or drops a record by a whole-chunk write or zeroing.
#[test]
fn a_crash_at_any_change_leaves_each_chunk_old_or_new_with_patches() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = 16384u64;
    let tuning = Tuning { commit_every: chunk, cache_bytes: 2 * chunk, patch_blocks: Some(2) };
    let path = dir.path().join("base.bsz");
    let size = 12 * chunk - 100;
    let image =
        Image::create(&path, size, Options { chunk_size: chunk as u32, ..Options::default() }).unwrap().tuned(tuning);
    let mut old: Vec<u8> = (0..12).flat_map(|i| content(0, i).repeat(2)).collect();
    old.truncate(size as usize);
    image.write_at(&old, 0).unwrap();
    image.flush().unwrap();
    let block = |model: &mut Vec<u8>, image: &Image, at: u64, len: usize, generation: u64| {
        let bytes: Vec<u8> = content(generation, at).repeat(2)[..len].to_vec();
        model[at as usize..at as usize + len].copy_from_slice(&bytes);
        image.write_at(&bytes, at)
    };
    // Committed records in the base: one block each in chunks 1, 3, 5, 7, 9.
    for i in [1u64, 3, 5, 7, 9] {
        block(&mut old, &image, i * chunk + 4096, 4096, 1).unwrap();
    }
    image.flush().unwrap();
    drop(image);
    let image = Image::open(&path, false).unwrap();
    assert_eq!(image.usage().patched_chunks, 5);
    drop(image);
    // The update, each chunk's writes together (so each chunk is stored once).
    let update = |image: &Image, model: &mut Vec<u8>| -> blksync_core::Result<()> {
        block(model, image, chunk, 4096, 2)?; // 1: merged into a record of 2
        block(model, image, 3 * chunk, 4096, 2)?; // 3: 3 blocks, past the limit: rewritten
        block(model, image, 3 * chunk + 8192, 4096, 2)?;
        block(model, image, 4 * chunk + 12288, 4096, 2)?; // 4: a new record
        block(model, image, 5 * chunk + 4096, 4096, 2)?; // 5: its block replaced
        block(model, image, 7 * chunk, chunk as usize, 2)?; // 7: whole: the record goes
        image.zero(9 * chunk, chunk)?; // 9: zeroed whole: a hole
        model[(9 * chunk) as usize..(10 * chunk) as usize].fill(0);
        block(model, image, 10 * chunk + 5000, 100, 2)?; // 10: part of a block, read first
        block(model, image, 11 * chunk + 4096, 4096, 2)?; // 11: the last chunk, cut short
        image.flush()
    };
    let mut new = old.clone();
    let dry = dir.path().join("dry.bsz");
    std::fs::copy(&path, &dry).unwrap();
    update(&Image::open(&dry, true).unwrap().tuned(tuning), &mut new).unwrap();
    let points =
        crash_everywhere_with(dir.path(), &path, &old, &new, chunk, tuning, &|image| update(image, &mut old.clone()));
    assert!(points >= 20, "only {points} changes to the file");
    let image = Image::open(&dry, false).unwrap();
    assert!(image.usage().patched_chunks >= 4, "{:?}", image.usage());
}
