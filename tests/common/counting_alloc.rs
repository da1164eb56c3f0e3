//! A global allocator that counts live heap bytes and their peak, for the tests that measure what
//! an operation keeps. A test binary that includes it (`#[path = "common/counting_alloc.rs"] mod
//! counting_alloc;`) counts every thread's allocations: it should hold that one test only.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grow(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call forwards to the system allocator unchanged; only the counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grow(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes allocated and not yet freed.
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most bytes live at once since the last `reset_peak`.
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Start the peak again from what is live now.
pub fn reset_peak() {
    PEAK.store(live(), Ordering::Relaxed);
}

/// Heap bytes that `forward`'s output holds for backward (the output and what its graph keeps),
/// over those live before it; then the backward of its sum, which must reach each of `inputs`.
pub fn held_for_backward(forward: impl FnOnce() -> candle_core::Tensor, inputs: &[&candle_core::Tensor]) -> usize {
    let before = live();
    let y = forward();
    let held = live() - before;
    let grads = y.sum_all().unwrap().backward().unwrap();
    for (i, input) in inputs.iter().enumerate() {
        assert!(grads.get(input).is_some(), "input {i} got no gradient");
    }
    held
}

/// `held` of the fused op (true) and of the separate ops (false), each after one warm-up run of
/// both: the first run also sets up the matmul's workspace and thread pool.
pub fn fused_and_separate(held: impl Fn(bool) -> usize) -> (usize, usize) {
    let _warm_up = (held(true), held(false));
    (held(true), held(false))
}
