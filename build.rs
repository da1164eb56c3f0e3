//! Without the `cuda` feature this does nothing. With it, every `kernels/*.cu` is compiled to PTX
//! by nvcc (compute capability from `CUDA_COMPUTE_CAP`, default 80 so that the PTX also
//! JIT-compiles on Hopper) into `OUT_DIR`, and rebuilt when a kernel changes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "cu")).collect())
        .unwrap_or_default();
    kernels.sort();
    for cu in &kernels {
        compile(cu, &out, &cap);
    }
}

fn compile(cu: &Path, out: &Path, cap: &str) {
    println!("cargo:rerun-if-changed={}", cu.display());
    let ptx = out.join(cu.file_stem().expect("kernel file name")).with_extension("ptx");
    let status = Command::new("nvcc")
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&ptx)
        .arg(cu)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc failed on {} ({s})", cu.display()),
        Err(e) => panic!(
            "the `cuda` feature needs nvcc on PATH to compile {} ({e}); install a CUDA toolkit, or see the README for the PyPI-wheel route",
            cu.display()
        ),
    }
}
