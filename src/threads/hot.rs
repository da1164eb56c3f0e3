//! Parallel loops for decoding: the pool's other workers kept spinning between loops.
//!
//! A decode step makes a few hundred parallel loops of 5-50 us each (one per packed product,
//! one for the attention). On rayon's own loops the other worker falls asleep in the gaps
//! between them (the norms, RoPE, residuals run on the calling thread), and each loop then pays
//! a futex wake and a context switch, measured at 12-16% of a batch-8 step on the 2-core
//! machine. Here the first loop hands each other worker of the pool a job ([`serve`]) that
//! takes tasks from the loops that follow, and spins while it waits; it returns to rayon once
//! no loop has come for [`IDLE`]. llama.cpp's thread pool spins between graph nodes the same
//! way.
//!
//! A loop is one published job: a pointer to the caller's closure, and one atomic word
//! `epoch << 32 | tasks << 16 | next`. Anyone who takes task `next` does so by a
//! compare-exchange of that word, so a task is taken once, and only while its epoch is the
//! current one: the closure of a finished loop (gone with the caller's stack frame) is never
//! called. The caller takes tasks too, and returns once every task is done, so the loop never
//! waits on a worker that has not woken yet. One caller at a time owns the job; a second one
//! (another thread, or a task's own inner loop) runs rayon's loop instead.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a serving worker spins without a loop before it goes back to rayon. Longer than
/// the gaps within a decode step (tens of microseconds), short enough that the idle time
/// after generation ends is not felt.
const IDLE: Duration = Duration::from_millis(2);

/// Loops of more tasks than the word's 16 bits take rayon's path.
const MAX_TASKS: usize = u16::MAX as usize;

/// The caller's closure, behind a thin pointer that fits an `AtomicPtr`.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
}

struct Hot {
    /// Held by the caller whose loop is published.
    owned: AtomicBool,
    /// `epoch << 32 | tasks << 16 | next`.
    word: AtomicU64,
    /// The current loop's `Job` (valid while a task of the current epoch is untaken or running).
    job: AtomicPtr<Job<'static>>,
    /// Tasks of the current loop finished.
    done: AtomicUsize,
    /// Workers in [`serve`].
    serving: AtomicUsize,
    /// The first panic of a task, raised again on the caller.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

static HOT: Hot = Hot {
    owned: AtomicBool::new(false),
    word: AtomicU64::new(0),
    job: AtomicPtr::new(std::ptr::null_mut()),
    done: AtomicUsize::new(0),
    serving: AtomicUsize::new(0),
    panic: Mutex::new(None),
};

fn unpack(word: u64) -> (u64, usize, usize) {
    (word >> 32, (word >> 16) as usize & 0xffff, word as usize & 0xffff)
}

impl Hot {
    /// Takes and runs one task of the current loop; false when none is left to take.
    fn run_one(&self) -> bool {
        let word = self.word.load(Ordering::Acquire);
        let (_, tasks, next) = unpack(word);
        if next >= tasks {
            return false;
        }
        // Read before the exchange: if the exchange succeeds, this loop was unfinished when
        // it did, so the pointer read before it is this loop's (the next loop's is stored
        // only after every task of this one is done).
        let job = self.job.load(Ordering::Acquire);
        if self.word.compare_exchange(word, word + 1, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return true; // Someone else took it; look again.
        }
        // SAFETY: task `next` of the current loop is ours, so the caller is still waiting for
        // it to be done and its closure is alive.
        let f = unsafe { (*job).f };
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| f(next))) {
            self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(payload);
        }
        self.done.fetch_add(1, Ordering::Release);
        true
    }
}

/// A worker's side: take tasks of whatever loop is published until none has come for [`IDLE`].
fn serve() {
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        if HOT.run_one() {
            idle_since = Instant::now();
            continue;
        }
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        // The clock is read every 64 spins: a read costs more than a spin.
        if spins.is_multiple_of(64) && idle_since.elapsed() > IDLE {
            break;
        }
    }
    HOT.serving.fetch_sub(1, Ordering::AcqRel);
}

/// `f(task)` for every task in `0..tasks`, over the pool's threads; returns when all are done.
/// Inside a rayon pool of two or more threads the other workers are kept spinning between
/// calls (module doc); elsewhere, or while another loop owns the job, it is rayon's loop.
pub fn for_each_task(tasks: usize, f: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads();
    if tasks <= 1 || threads <= 1 {
        (0..tasks).for_each(f);
        return;
    }
    let Some(me) = rayon::current_thread_index() else {
        return rayon_loop(tasks, f);
    };
    if tasks > MAX_TASKS || HOT.owned.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        return rayon_loop(tasks, f);
    }
    // Once every worker has gone back to rayon they are called again (one wake each, as rayon's
    // own loop would cost); they find this loop when they start. Not while some still serve: a
    // worker's second `serve` job would run after its first and count itself out twice.
    if HOT.serving.load(Ordering::Acquire) == 0 {
        HOT.serving.store(threads - 1, Ordering::Release);
        rayon::spawn_broadcast(move |ctx| {
            if ctx.index() != me {
                serve();
            }
        });
        // Rayon runs the broadcast's job for this thread too (it returns at once); it is not
        // among the serving workers.
    }
    let job = Job { f: &f };
    // SAFETY: the lifetime is erased only for the pointer's type; no task runs after this
    // function returns (it waits for all of them), so nothing reads the job after `f` is gone.
    let job_ptr = &job as *const Job<'_> as *mut Job<'static>;
    HOT.job.store(job_ptr, Ordering::Release);
    HOT.done.store(0, Ordering::Relaxed);
    let (epoch, _, _) = unpack(HOT.word.load(Ordering::Relaxed));
    HOT.word.store((epoch + 1) << 32 | (tasks as u64) << 16, Ordering::Release);
    while HOT.run_one() {}
    while HOT.done.load(Ordering::Acquire) < tasks {
        std::hint::spin_loop();
    }
    let panic = HOT.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    HOT.owned.store(false, Ordering::Release);
    if let Some(payload) = panic {
        resume_unwind(payload);
    }
}

/// `f(index, chunk)` for the consecutive chunks of `chunk` values of `data` (the last may be
/// shorter), as [`for_each_task`]: rayon's `par_chunks_mut` for the loops of decoding.
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    struct Base<T>(*mut T);
    // SAFETY: each task makes a slice of its own chunk only; the chunks are disjoint.
    unsafe impl<T: Send> Sync for Base<T> {}
    let (len, chunk) = (data.len(), chunk.max(1));
    let base = Base(data.as_mut_ptr());
    for_each_task(len.div_ceil(chunk), |i| {
        let base = &base;
        let start = i * chunk;
        // SAFETY: chunk i lies within `data`, which is borrowed mutably for the whole loop.
        let part = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), chunk.min(len - start)) };
        f(i, part)
    });
}

/// Rows of x up to which a product's loop runs on [`for_each_task`] (decoding's batches). A
/// prompt's products take rayon's loop, whose workers also run candle's own parallel ops between
/// the products (a worker spinning here would leave those to the calling thread).
const HOT_ROWS: usize = 32;

/// The loop of a product over `rows` rows of x: [`for_each_task`] up to [`HOT_ROWS`], else
/// rayon's.
pub fn for_each_product_task(rows: usize, tasks: usize, f: impl Fn(usize) + Sync) {
    if rows <= HOT_ROWS {
        for_each_task(tasks, f)
    } else {
        rayon_loop(tasks, f)
    }
}

fn rayon_loop(tasks: usize, f: impl Fn(usize) + Sync) {
    use rayon::prelude::*;
    (0..tasks).into_par_iter().for_each(&f);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
    }

    /// Every task runs exactly once, loop after loop, with loops of every size, and the results
    /// are the same from inside a pool (served), outside any pool, and inside a nested loop.
    #[test]
    fn every_task_runs_once() {
        let run = |tasks: usize| {
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            for_each_task(tasks, |i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
            counts.iter().map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>()
        };
        for tasks in [0, 1, 2, 3, 17, 1000] {
            assert!(run(tasks).iter().all(|&c| c == 1), "{tasks} tasks, outside a pool");
        }
        let chunks = |len: usize| {
            let mut v = vec![0usize; len];
            for_each_chunk_mut(&mut v, 7, |i, c| c.iter_mut().for_each(|x| *x += i + 1));
            v == (0..len).map(|j| j / 7 + 1).collect::<Vec<_>>()
        };
        in_pool(3, || {
            for round in 0..2000 {
                let tasks = round % 37;
                assert!(run(tasks).iter().all(|&c| c == 1), "round {round}: {tasks} tasks");
                assert!(chunks(round % 50), "round {round}: chunks of {}", round % 50);
            }
            // A task's own loop (the job is owned) goes to rayon.
            let inner = AtomicUsize::new(0);
            for_each_task(8, |_| for_each_task(5, |_| {
                inner.fetch_add(1, Ordering::Relaxed);
            }));
            assert_eq!(inner.load(Ordering::Relaxed), 40);
        });
    }

    /// Two threads of one pool calling at once: both loops complete, one served, one on rayon.
    #[test]
    fn concurrent_callers_both_finish() {
        in_pool(2, || {
            let (a, b) = rayon::join(
                || (0..200).map(|_| { let s = AtomicUsize::new(0); for_each_task(20, |i| { s.fetch_add(i, Ordering::Relaxed); }); s.into_inner() }).sum::<usize>(),
                || (0..200).map(|_| { let s = AtomicUsize::new(0); for_each_task(30, |i| { s.fetch_add(i, Ordering::Relaxed); }); s.into_inner() }).sum::<usize>(),
            );
            assert_eq!((a, b), (200 * 190, 200 * 435));
        });
    }

    /// A task's panic reaches the caller, after the other tasks are done, and the next loop runs.
    #[test]
    fn a_panic_reaches_the_caller() {
        in_pool(2, || {
            let finished = AtomicUsize::new(0);
            let result = catch_unwind(AssertUnwindSafe(|| {
                for_each_task(16, |i| {
                    if i == 7 {
                        panic!("task 7");
                    }
                    finished.fetch_add(1, Ordering::Relaxed);
                })
            }));
            assert!(result.is_err());
            assert_eq!(finished.load(Ordering::Relaxed), 15);
            let again = AtomicUsize::new(0);
            for_each_task(16, |_| {
                again.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(again.load(Ordering::Relaxed), 16);
        });
    }
}
