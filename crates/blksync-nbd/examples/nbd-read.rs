//! Reads a whole NBD export the way the engine's workers read a source: `--threads` threads,
//! each taking the next `--buffer`-sized chunk and reading it with one `read_at`; hole chunks
//! (by `segment_at`) are skipped, as the engine skips them. Prints one JSON line with the bytes
//! read and the seconds taken. For `bench/nbd.py`.
//!
//! Usage: `nbd-read URI [--threads 2] [--buffer 2097152] [--request-size 262144]`

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use blksync_core::endpoint::Source;
use blksync_nbd::{Nbd, NbdOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let uri = args.next().ok_or("usage: nbd-read URI [--threads N] [--buffer BYTES] [--request-size BYTES]")?;
    let (mut threads, mut buffer, mut options) = (2usize, 2usize << 20, NbdOptions::default());
    while let Some(flag) = args.next() {
        let value: usize = args.next().ok_or("a flag without a value")?.parse()?;
        match flag.as_str() {
            "--threads" => threads = value,
            "--buffer" => buffer = value,
            "--request-size" => options.request_size = value,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let nbd = Nbd::open(&uri, false, &options)?;
    let size = nbd.size();
    let next = AtomicU64::new(0);
    let read = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| -> Result<(), blksync_core::Error> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<(), blksync_core::Error> {
                    let mut buf = vec![0u8; buffer];
                    loop {
                        let offset = next.fetch_add(buffer as u64, Ordering::Relaxed);
                        if offset >= size {
                            return Ok(());
                        }
                        let len = (size - offset).min(buffer as u64) as usize;
                        let segment = nbd.segment_at(offset)?;
                        if !segment.allocated && segment.end >= offset + len as u64 {
                            continue;
                        }
                        nbd.read_at(&mut buf[..len], offset)?;
                        read.fetch_add(len as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("a reader panicked"))
    })?;
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{{\"bytes\": {}, \"seconds\": {seconds:.4}, \"threads\": {threads}, \"buffer\": {buffer}, \"request_size\": {}}}",
        read.load(Ordering::Relaxed),
        nbd.request_size()
    );
    Box::new(nbd).close()?;
    Ok(())
}
