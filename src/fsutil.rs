//! Atomic writes: a checkpoint or adapter directory is written beside its destination and swapped
//! in with renames, so an interrupted write never leaves the previous version damaged.

use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// Write a directory through `fill`, which receives a fresh temporary directory; then replace
/// `dir` with it. If `fill` fails or the process dies, `dir` is untouched.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).at(parent)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).at(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).at(&tmp)?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old: Option<PathBuf> = if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old).at(dir)?;
        Some(old)
    } else {
        None
    };
    std::fs::rename(&tmp, dir).at(dir)?;
    if let Some(old) = old {
        std::fs::remove_dir_all(&old).at(&old)?;
    }
    Ok(())
}

/// An output directory that is new: absent, or an empty directory. A file there, or a directory
/// with anything in it, is the user's and is refused before any work is done.
pub fn require_new_dir(dir: &Path) -> Result<()> {
    if !dir.exists() && dir.symlink_metadata().is_err() {
        return Ok(());
    }
    let msg = if !dir.is_dir() {
        "the output exists and is a file; nothing was written (choose a new path)"
    } else if std::fs::read_dir(dir).at(dir)?.next().is_some() {
        "the output exists and is not empty; nothing was written (choose a new path)"
    } else {
        return Ok(());
    };
    Err(crate::Error::BadFile { path: dir.to_path_buf(), msg: msg.into() })
}

/// The report files a command is about to write (`flag` names the option that chose them): any
/// that exists is refused unless the user asked to replace it with `--overwrite`.
pub fn refuse_to_replace(paths: &[PathBuf], flag: &str, overwrite: bool) -> Result<()> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) if !overwrite => Err(crate::Error::BadFile {
            path: p.clone(),
            msg: format!("exists; pass --overwrite to replace it, or choose another {flag}"),
        }),
        _ => Ok(()),
    }
}

/// Write a whole file atomically (temporary file, then rename).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).at(&tmp)?;
    std::fs::rename(&tmp, path).at(path)
}

/// Bytes free for an unprivileged writer on the file system that holds `path` (or its nearest
/// existing ancestor); None where the platform does not say.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `c` is a NUL-terminated path and `st` a buffer of the size statvfs writes.
        if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: statvfs returned 0, so it filled `st`.
        let st = unsafe { st.assume_init() };
        // The fields are u64 here and narrower on some other unix targets.
        #[allow(clippy::unnecessary_cast)]
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        let _ = existing;
        None
    }
}

/// Refuse to start writing `bytes` under `dir` when the file system has less free: a run that
/// would fail at its first save says so before it trains (a full disk once left an empty `best/`).
pub fn require_space(dir: &Path, bytes: u64, what: &str) -> Result<()> {
    match free_bytes(dir) {
        Some(free) if free < bytes => Err(crate::Error::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!("{what} needs {} MiB, and only {} MiB are free there", bytes.div_ceil(1 << 20), free / (1 << 20)),
            ),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_is_measured_and_a_shortfall_names_the_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let free = free_bytes(&tmp.path().join("not/yet/made")).expect("statvfs on Linux");
        assert!(free > 0);
        assert!(require_space(tmp.path(), 1, "a byte").is_ok());
        let e = require_space(tmp.path(), u64::MAX / 2, "a checkpoint").unwrap_err().to_string();
        assert!(e.contains(&tmp.path().display().to_string()) && e.contains("a checkpoint needs"), "{e}");
    }
}
