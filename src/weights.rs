//! Named tensors from safetensors files (memory-mapped, one or many shards), from memory or made
//! on demand, with errors that name the file and the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};

use crate::error::{Error, Result};

pub struct Weights {
    origin: String,
    source: Source,
}

enum Source {
    Files { mmap: MmapedSafetensors, files: HashMap<String, PathBuf> },
    Memory(HashMap<String, Tensor>),
    Made(HashMap<String, TensorMaker>),
}

/// Makes one tensor when it is asked for (random test weights too large to hold all at once).
pub type TensorMaker = Box<dyn Fn() -> Result<Tensor> + Send + Sync>;

impl Weights {
    /// Memory-map safetensors files. Each file's header is validated up front so that a
    /// truncated or corrupt file is reported by name before any tensor is read.
    pub fn from_safetensors(paths: &[PathBuf]) -> Result<Self> {
        let mut files = HashMap::new();
        for path in paths {
            for name in read_header_names(path)? {
                files.insert(name, path.clone());
            }
        }
        // SAFETY: the files are only read; modifying a checkpoint while it is loaded is unsupported.
        let mmap = unsafe { MmapedSafetensors::multi(paths) }
            .map_err(|e| Error::BadFile { path: paths.first().cloned().unwrap_or_default(), msg: e.to_string() })?;
        let origin = match paths {
            [one] => one.display().to_string(),
            many => format!("{} ({} shards)", many[0].parent().unwrap_or(Path::new(".")).display(), many.len()),
        };
        Ok(Self { origin, source: Source::Files { mmap, files } })
    }

    pub fn from_tensors(tensors: HashMap<String, Tensor>, origin: impl Into<String>) -> Self {
        Self { origin: origin.into(), source: Source::Memory(tensors) }
    }

    pub fn from_makers(makers: Vec<(String, TensorMaker)>, origin: impl Into<String>) -> Self {
        Self { origin: origin.into(), source: Source::Made(makers.into_iter().collect()) }
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Files { files, .. } => files.contains_key(name),
            Source::Memory(m) => m.contains_key(name),
            Source::Made(m) => m.contains_key(name),
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match &self.source {
            Source::Files { files, .. } => files.keys().cloned().collect(),
            Source::Memory(m) => m.keys().cloned().collect(),
            Source::Made(m) => m.keys().cloned().collect(),
        };
        names.sort();
        names
    }

    /// The tensor `name` with the expected `shape`, converted to `dtype` on `device`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.get_any(name, dtype, device)?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                origin: self.origin_of(name),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    /// The tensor `name` whatever its shape.
    pub fn get_any(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let missing = || Error::MissingTensor { origin: self.origin.clone(), name: name.to_string() };
        let t = match &self.source {
            Source::Files { mmap, files } => {
                if !files.contains_key(name) {
                    return Err(missing());
                }
                mmap.load(name, device).map_err(|e| Error::BadTensor {
                    origin: self.origin_of(name),
                    name: name.to_string(),
                    msg: e.to_string(),
                })?
            }
            Source::Memory(m) => m.get(name).ok_or_else(missing)?.to_device(device)?,
            Source::Made(m) => m.get(name).ok_or_else(missing)?()?.to_device(device)?,
        };
        Ok(t.to_dtype(dtype)?)
    }

    fn origin_of(&self, name: &str) -> String {
        match &self.source {
            Source::Files { files, .. } => files.get(name).map_or(self.origin.clone(), |p| p.display().to_string()),
            Source::Memory(_) | Source::Made(_) => self.origin.clone(),
        }
    }
}

/// Tensor names in a safetensors file, checking that the header and data fit the file.
fn read_header_names(path: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let bad = |msg: String| Error::BadFile { path: path.to_path_buf(), msg };
    let mut f = std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let file_len = f.metadata().map_err(|source| Error::Io { path: path.to_path_buf(), source })?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| bad("not a safetensors file (shorter than its 8-byte header length)".into()))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > file_len.saturating_sub(8) {
        return Err(bad(format!("truncated: header of {header_len} bytes in a file of {file_len} bytes")));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let meta: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("invalid header: {e}")))?;
    let data_len = file_len - 8 - header_len;
    let mut names = Vec::new();
    for (name, info) in meta {
        if name == "__metadata__" {
            continue;
        }
        let end = info.get("data_offsets").and_then(|o| o.get(1)).and_then(|v| v.as_u64()).unwrap_or(u64::MAX);
        if end > data_len {
            return Err(bad(format!("truncated: tensor `{name}` ends at byte {end} of a {data_len}-byte data section")));
        }
        names.push(name);
    }
    Ok(names)
}

/// Save tensors as safetensors atomically: write a temporary file beside `path`, then rename.
pub fn save_safetensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| Error::BadFile { path: tmp.clone(), msg: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}
