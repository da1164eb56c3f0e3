//! Memory figures of this process: resident set (current and peak, from /proc) and, on CUDA, the
//! peak of device memory in use, sampled on a thread (candle has no allocator statistics).

use candle_core::Device;

use crate::error::{Error, IoContext, Result};

/// VmRSS / VmHWM of this process in MiB.
pub fn proc_status_mib(field: &str) -> Result<f64> {
    let text = std::fs::read_to_string("/proc/self/status").at("/proc/self/status")?;
    let line = text.lines().find(|l| l.starts_with(field)).ok_or_else(|| Error::msg(format!("no {field} in /proc/self/status")))?;
    let kib: f64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).ok_or_else(|| Error::msg(format!("bad {field} line")))?;
    Ok(kib / 1024.0)
}

/// Resets the resident-set peak (VmHWM) to the current resident set (Linux ≥ 4.0; where refused,
/// the peak stays the one since start).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The peak memory `f` uses over what was in use before it: device memory sampled on a thread on
/// CUDA; on the CPU the resident-set peak (VmHWM, reset first) over the resident set before, which
/// misses what the allocator reuses from earlier frees.
pub fn peak_extra_mib(device: &Device, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    if let Some(gpu) = GpuMemory::start(device)? {
        f()?;
        device.synchronize()?;
        return gpu.finish();
    }
    let baseline = proc_status_mib("VmRSS")?;
    reset_peak_rss();
    f()?;
    Ok(proc_status_mib("VmHWM")? - baseline)
}

/// The peak of device memory in use while training runs, sampled on a thread.
pub struct GpuMemory {
    #[cfg(feature = "cuda")]
    sampler: Option<(std::sync::Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<Result<usize>>, usize)>,
}

impl GpuMemory {
    /// None on devices other than CUDA.
    #[cfg(feature = "cuda")]
    pub fn start(device: &Device) -> Result<Option<Self>> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let Device::Cuda(dev) = device else { return Ok(None) };
        device.synchronize()?;
        let ctx = dev.cuda_stream().context().clone();
        let used = move || -> Result<usize> {
            let (free, total) = ctx.mem_get_info().map_err(|e| Error::msg(format!("cuMemGetInfo: {e}")))?;
            Ok(total - free)
        };
        // Read twice: the CUDA emulator (kernels/emu) reports the peak since the previous read,
        // so the second read is what is in use now; on a GPU both reads are the same.
        used()?;
        let baseline = used()?;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || -> Result<usize> {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(used()?);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(peak.max(used()?))
        });
        Ok(Some(Self { sampler: Some((stop, handle, baseline)) }))
    }

    #[cfg(not(feature = "cuda"))]
    pub fn start(_device: &Device) -> Result<Option<Self>> {
        Ok(None)
    }

    /// Device memory in use when sampling started, in MiB (on a GPU it includes the CUDA
    /// context, which PyTorch's `max_memory_allocated` does not count).
    #[cfg(feature = "cuda")]
    pub fn baseline_mib(&self) -> f64 {
        self.sampler.as_ref().map_or(0.0, |(_, _, baseline)| *baseline as f64 / 1048576.0)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn baseline_mib(&self) -> f64 {
        0.0
    }

    /// Stops sampling; the peak over the baseline in MiB.
    #[cfg(feature = "cuda")]
    pub fn finish(mut self) -> Result<f64> {
        let (stop, handle, baseline) = self.sampler.take().expect("started");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = handle.join().map_err(|_| Error::msg("the GPU memory sampler panicked"))??;
        Ok(peak.saturating_sub(baseline) as f64 / 1048576.0)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn finish(self) -> Result<f64> {
        Err(Error::msg("no GPU memory sampler without the `cuda` feature"))
    }
}

/// The machine's memory read bandwidth in GB/s (10⁹ bytes a second): the best of five parallel
/// sums over a buffer of `bytes` (much larger than the caches), on the current thread pool. What
/// a decoding step that streams its weights can reach at most.
pub fn read_bandwidth_gb_s(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let words = vec![1u64; bytes / 8];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = std::time::Instant::now();
        let sum = words.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &w| a.wrapping_add(w))).reduce(|| 0, u64::wrapping_add);
        best = best.min(start.elapsed().as_secs_f64());
        std::hint::black_box(sum);
    }
    (words.len() * 8) as f64 / best / 1e9
}
