//! `--config FILE.toml`: every key of the file is the long flag of the same name (`learning_rate
//! = 3e-4` is `--learning-rate 3e-4`). The file's flags are placed before the command line's, and
//! later flags override earlier ones, so the command line wins.

use std::ffi::OsString;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// Expand `--config FILE` (after the subcommand) into the flags the file holds.
pub fn expand_config_args(args: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(pos) = args.iter().position(|a| a == "--config") else {
        if let Some(pos) = args.iter().position(|a| a.to_string_lossy().starts_with("--config=")) {
            let path = args[pos].to_string_lossy()["--config=".len()..].to_string();
            return splice(args, pos, 1, Path::new(&path));
        }
        return Ok(args);
    };
    let path = args.get(pos + 1).ok_or_else(|| Error::msg("--config needs a file"))?.clone();
    splice(args, pos, 2, Path::new(&path))
}

fn splice(mut args: Vec<OsString>, pos: usize, len: usize, path: &Path) -> Result<Vec<OsString>> {
    let flags = config_flags(path)?;
    args.drain(pos..pos + len);
    // After the subcommand name (args[0] is the program, args[1] the subcommand).
    let at = 2.min(args.len());
    args.splice(at..at, flags);
    Ok(args)
}

pub fn config_flags(path: &Path) -> Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::BadFile { path: path.to_path_buf(), msg: e.to_string() })?;
    let mut flags = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        let bad = |what: &str| Error::BadFile { path: path.to_path_buf(), msg: format!("`{key}`: {what}") };
        match value {
            toml::Value::Boolean(b) => flags.push(OsString::from(format!("{flag}={b}"))),
            toml::Value::String(s) => flags.push(OsString::from(format!("{flag}={s}"))),
            toml::Value::Integer(i) => flags.push(OsString::from(format!("{flag}={i}"))),
            toml::Value::Float(f) => flags.push(OsString::from(format!("{flag}={f}"))),
            toml::Value::Array(items) => {
                let parts = items
                    .iter()
                    .map(|v| match v {
                        toml::Value::String(s) => Ok(s.clone()),
                        toml::Value::Integer(i) => Ok(i.to_string()),
                        toml::Value::Float(f) => Ok(f.to_string()),
                        _ => Err(bad("arrays may hold strings and numbers only")),
                    })
                    .collect::<Result<Vec<_>>>()?;
                flags.push(OsString::from(format!("{flag}={}", parts.join(","))));
            }
            _ => return Err(bad("tables and dates are not flags")),
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_flags_come_before_command_line_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "learning_rate = 0.001\ntarget_modules = [\"q_proj\", \"v_proj\"]\nresume = true\n").unwrap();
        let args: Vec<OsString> = ["prog", "finetune", "--config", path.to_str().unwrap(), "--learning-rate", "0.002"]
            .iter()
            .map(OsString::from)
            .collect();
        let out: Vec<String> = expand_config_args(args).unwrap().iter().map(|s| s.to_string_lossy().to_string()).collect();
        assert_eq!(out[..2], ["prog", "finetune"]);
        assert!(out.contains(&"--learning-rate=0.001".to_string()));
        assert!(out.contains(&"--target-modules=q_proj,v_proj".to_string()));
        assert!(out.contains(&"--resume=true".to_string()));
        assert_eq!(out[out.len() - 2..], ["--learning-rate", "0.002"]);
    }

    #[test]
    fn a_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "learning_rate = = 3").unwrap();
        let err = config_flags(&path).unwrap_err().to_string();
        assert!(err.contains("bad.toml"), "{err}");
    }
}
