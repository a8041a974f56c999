//! Writes a peer receives, applied on several threads when each costs CPU.
//!
//! A peer reads its requests on one thread. For a file or a device a write is a copy, and one
//! thread keeps up with any link. For a compressed image ([`Caps::costly_writes`]) a write
//! recompresses the chunk it lands in: on one thread, a 1 %-changed update of a 4 GiB image over
//! ssh took 11 s where the local engine, whose two workers write in parallel, took 6.4 s (issue
//! 10). So such writes, with the decoding of their wire compression, go to a small pool.
//!
//! Order: the pool applies writes in any order, as the local engine's workers do. Within one
//! pass of a command no two writes overlap, and every other request (a zeroing, a flush, a read,
//! a new scan) is a barrier: the peer waits for the writes before it (`Writers::drain`), so
//! nothing after a barrier can overtake a write before it. The hash pass's questions about its
//! scan are not barriers: they concern chunks the pass has not written yet.
//!
//! Errors: a failed write is reported once, on the next write or at the next barrier, which
//! fails with it; writes queued after a failure are dropped, not applied.
//!
//! [`Caps::costly_writes`]: crate::endpoint::Caps::costly_writes

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, bounded};

use crate::endpoint::Target;
use crate::error::{Error, Result};
use crate::protocol::message::Chunk;

/// Writes queued per thread: each is at most a data frame (1 MiB decoded), so this bounds the
/// pool's memory to a few MiB while every thread always has the next write at hand.
const QUEUED_PER_THREAD: usize = 2;

/// The pool's threads are at most this many: compression of one chunk per core is the point.
const MAX_THREADS: usize = 4;

/// A pool of threads applying writes to one target.
pub(crate) struct Writers {
    jobs: Option<Sender<Chunk>>,
    state: Arc<(Mutex<State>, Condvar)>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    /// Writes queued or being applied.
    pending: usize,
    /// The first failure, until it is reported.
    failed: Option<Error>,
    /// A failure happened since the last barrier: later writes are dropped.
    stopped: bool,
}

impl Writers {
    /// A pool of one thread per core (at most [`MAX_THREADS`]) writing to `target`.
    pub(crate) fn new(target: &Arc<dyn Target>) -> Writers {
        let n = std::thread::available_parallelism().map_or(2, std::num::NonZero::get).clamp(2, MAX_THREADS);
        let (jobs, queue) = bounded::<Chunk>(n * QUEUED_PER_THREAD);
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let threads = (0..n)
            .map(|_| {
                let (queue, state, target) = (queue.clone(), Arc::clone(&state), Arc::clone(target));
                std::thread::spawn(move || {
                    for chunk in queue {
                        let skip = state.0.lock().unwrap_or_else(PoisonError::into_inner).stopped;
                        let result = if skip { Ok(()) } else { apply(target.as_ref(), &chunk) };
                        let mut st = state.0.lock().unwrap_or_else(PoisonError::into_inner);
                        if let Err(e) = result {
                            st.stopped = true;
                            st.failed.get_or_insert(e);
                        }
                        st.pending -= 1;
                        drop(st);
                        state.1.notify_all();
                    }
                })
            })
            .collect();
        Writers { jobs: Some(jobs), state, threads }
    }

    /// Queues a write; an earlier write's failure is returned instead (once).
    pub(crate) fn submit(&self, chunk: Chunk) -> Result<()> {
        {
            let mut st = self.state.0.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(e) = st.failed.take() {
                return Err(e);
            }
            st.pending += 1;
        }
        let Some(jobs) = &self.jobs else { return Ok(()) };
        if jobs.send(chunk).is_err() {
            // The threads are gone (they never exit on their own before the pool is dropped).
            self.state.0.lock().unwrap_or_else(PoisonError::into_inner).pending -= 1;
        }
        Ok(())
    }

    /// Waits until every queued write was applied; returns the failure of one, if any. Writes
    /// are accepted again afterwards.
    pub(crate) fn drain(&self) -> Result<()> {
        let mut st = self.state.0.lock().unwrap_or_else(PoisonError::into_inner);
        while st.pending > 0 {
            st = self.state.1.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.stopped = false;
        st.failed.take().map_or(Ok(()), Err)
    }
}

impl Drop for Writers {
    /// Applies what is queued, then stops the threads.
    fn drop(&mut self) {
        drop(self.jobs.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn apply(target: &dyn Target, chunk: &Chunk) -> Result<()> {
    let data = crate::compress::decode(chunk)?;
    target.write_at(&data, chunk.offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::memory::Memory;
    use crate::endpoint::{Source, Target};

    fn chunk(offset: u64, byte: u8, len: usize) -> Chunk {
        Chunk { offset, codec: crate::protocol::message::codec::RAW, raw_len: len as u32, payload: vec![byte; len] }
    }

    #[test]
    fn every_write_is_applied_by_the_barrier() {
        let memory = Arc::new(Memory::with_bytes("m", vec![0; 1 << 20]));
        let writers = Writers::new(&(Arc::clone(&memory) as Arc<dyn Target>));
        for i in 0..256u64 {
            writers.submit(chunk(i * 4096, (i % 250) as u8 + 1, 4096)).unwrap();
        }
        writers.drain().unwrap();
        let mut buf = vec![0; 1 << 20];
        memory.read_at(&mut buf, 0).unwrap();
        for i in 0..256usize {
            assert!(buf[i * 4096..(i + 1) * 4096].iter().all(|&b| b == (i % 250) as u8 + 1), "block {i}");
        }
    }

    #[test]
    fn a_failed_write_fails_the_barrier_once_and_stops_later_writes() {
        let memory = Arc::new(Memory::with_bytes("m", vec![0; 8192]).resizable(false));
        let writers = Writers::new(&(Arc::clone(&memory) as Arc<dyn Target>));
        // Past the end of a fixed-size memory endpoint: refused.
        writers.submit(chunk(1 << 30, 1, 4096)).unwrap();
        let e = writers.drain().unwrap_err();
        assert!(!e.to_string().is_empty());
        // After the barrier, writes work again.
        writers.submit(chunk(0, 7, 4096)).unwrap();
        writers.drain().unwrap();
        let mut buf = vec![0; 4096];
        memory.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
    }
}
