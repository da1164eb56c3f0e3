//! The thread pool the CPU work runs on.

mod hot;

pub use hot::{for_each_chunk_mut, for_each_product_task, for_each_task};

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

/// An output buffer that the tasks of one parallel loop write at disjoint places (each its own
/// tiles or columns), through the raw pointer: split slices cannot express a tile of rows.
pub struct DisjointOut(pub *mut f32);
// SAFETY: the tasks write disjoint elements, and the buffer outlives them (a rayon `for_each`
// returns after every task).
unsafe impl Sync for DisjointOut {}

/// `y = x Wᵀ` [t, rows] from a kernel over W's rows: the rows in a few chunks per thread (a task
/// per 16 rows costs more in scheduling than a small matrix's rows take), each row read once
/// for all t rows of x. `dot(first, out)` fills `out`, [n, t], for W's rows `first..first + n`.
pub fn rows_product(rows: usize, t: usize, dot: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut y_t = vec![0f32; rows * t];
    let chunk = rows.div_ceil(4 * rayon::current_num_threads()).max(64);
    let out = DisjointOut(y_t.as_mut_ptr());
    for_each_product_task(t, rows.div_ceil(chunk), |c| {
        let out = &out;
        let n = chunk.min(rows - c * chunk);
        // SAFETY: chunk c's rows [c·chunk, c·chunk + n) of y_t [rows, t]: this task's alone.
        dot(c * chunk, unsafe { std::slice::from_raw_parts_mut(out.0.add(c * chunk * t), n * t) })
    });
    // [rows, t] → [t, rows].
    if t == 1 {
        return y_t;
    }
    let mut y = vec![0f32; t * rows];
    for r in 0..rows {
        for j in 0..t {
            y[j * rows + r] = y_t[r * t + j];
        }
    }
    y
}

/// The tensor side of a CPU product kernel: x [.., cols] of any float dtype read as f32 rows,
/// `f(values, t)` giving y [t, rows], returned shaped as x with `rows` last, in x's dtype. A last
/// dim other than `cols` is an error naming `what` (the weight).
pub fn product_tensor(
    x: &candle_core::Tensor,
    cols: usize,
    rows: usize,
    what: &str,
    f: impl FnOnce(&[f32], usize) -> crate::Result<Vec<f32>>,
) -> crate::Result<candle_core::Tensor> {
    let dims = x.dims();
    if dims.last() != Some(&cols) {
        return Err(crate::Error::msg(format!("x of shape {dims:?} against {what} of {cols} columns")));
    }
    let t = x.elem_count() / cols.max(1);
    // An f32 x is read in place: a decode step makes a hundred of these products.
    let y = if x.dtype() == candle_core::DType::F32 {
        with_values(x, |values: &[f32]| f(values, t))??
    } else {
        f(&x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?, t)?
    };
    let mut out = dims.to_vec();
    *out.last_mut().expect("x has a last dim") = rows;
    Ok(candle_core::Tensor::from_vec(y, out, x.device())?.to_dtype(x.dtype())?)
}

/// `f` of a tensor's values in row-major order: borrowed from a contiguous CPU tensor, else
/// through a host copy.
pub(crate) fn with_values<T: candle_core::WithDType, R>(t: &candle_core::Tensor, f: impl FnOnce(&[T]) -> R) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(f(&cpu.as_slice::<T>()?[start..end]));
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<T>()?))
}
