//! The binaries' allocator. A training step allocates and frees buffers of tens to hundreds of
//! megabytes many times; glibc's malloc (and mimalloc's default) hands them back to the OS and the
//! next step pays for zeroing fresh pages again (a third of a CPU step on SmolLM2-135M went to
//! `clear_page_erms`). mimalloc with purging off keeps freed memory for reuse.

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (index 15 in both v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never return freed memory to the OS (call first thing in `main`, with mimalloc installed as
/// the global allocator: `#[global_allocator] static A: mimalloc::MiMalloc = mimalloc::MiMalloc;`).
pub fn keep_freed_memory() {
    // SAFETY: setting an allocator option is thread-safe and takes effect on later frees.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
