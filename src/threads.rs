//! The thread pool the CPU work runs on.

/// Run `f` on a worker of a rayon pool (as many threads as rayon's global pool). A parallel
/// loop started there splits with the pool's other workers directly; started from an outside
/// thread (main), every loop is injected into the pool and the caller blocks on a latch, a
/// round trip through the scheduler that costs more than a decode step's small products take.
pub fn in_thread_pool<T: Send>(f: impl FnOnce() -> crate::Result<T> + Send) -> crate::Result<T> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        // As much stack as a main thread gets: graphs are walked recursively.
        .stack_size(8 << 20)
        .build()
        .map_err(|e| crate::Error::msg(format!("cannot start the thread pool: {e}")))?;
    pool.install(f)
}
