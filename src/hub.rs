//! Resolve a model or adapter given as a local directory or as a Hugging Face repo id.
//!
//! Repo ids are looked up in the local hub cache first (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`, layout `models--org--name/snapshots/<commit>/` with
//! `refs/<revision>` naming the commit), and downloaded through hf-hub only when the cache lacks a
//! file and `HF_HUB_OFFLINE` is not set.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The hub cache directory the way huggingface_hub chooses it.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

fn offline() -> bool {
    matches!(std::env::var("HF_HUB_OFFLINE").as_deref(), Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes") | Ok("ON") | Ok("on"))
}

/// A model repository: a local directory, or a hub repo resolved file by file.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Dir(PathBuf),
    Hub { repo: String, revision: String },
}

impl ModelSource {
    /// `spec` is a directory that exists, or `org/name` optionally followed by `@revision`.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        let (repo, revision) = spec.split_once('@').unwrap_or((spec, "main"));
        let looks_like_repo = repo.split('/').count() == 2 && !repo.starts_with('.') && !repo.starts_with('/');
        if !looks_like_repo {
            return Err(Error::msg(format!("`{spec}` is neither a directory nor a Hugging Face repo id (org/name)")));
        }
        Ok(Self::Hub { repo: repo.to_string(), revision: revision.to_string() })
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Dir(p) => p.display().to_string(),
            Self::Hub { repo, revision } => format!("{repo}@{revision}"),
        }
    }

    /// The local path of `file`, downloading it when allowed. A missing file names the repo and the file.
    pub fn file(&self, file: &str) -> Result<PathBuf> {
        match self {
            Self::Dir(dir) => {
                let p = dir.join(file);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(Error::BadFile { path: p, msg: "file not found".into() })
                }
            }
            Self::Hub { repo, revision } => {
                if let Some(p) = cached_file(&cache_dir(), repo, revision, file) {
                    return Ok(p);
                }
                if offline() {
                    return Err(Error::Hub(format!(
                        "{repo}: `{file}` is not in the cache {} and HF_HUB_OFFLINE is set",
                        cache_dir().display()
                    )));
                }
                download(repo, revision, file)
            }
        }
    }

    /// Like `file`, but a file that does not exist is `None` rather than an error.
    pub fn optional_file(&self, file: &str) -> Option<PathBuf> {
        match self {
            Self::Dir(dir) => Some(dir.join(file)).filter(|p| p.is_file()),
            Self::Hub { .. } => self.file(file).ok(),
        }
    }
}

/// Look a file up in the hub cache layout.
pub fn cached_file(cache: &Path, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let commit = match std::fs::read_to_string(root.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) => revision.to_string(), // a commit hash given directly
    };
    Some(root.join("snapshots").join(commit).join(file)).filter(|p| p.is_file())
}

fn download(repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
    use hf_hub::{api::sync::ApiBuilder, Repo, RepoType};
    let api = ApiBuilder::new()
        .with_cache_dir(cache_dir())
        .with_progress(true)
        .build()
        .map_err(|e| Error::Hub(format!("{repo}: {e}")))?;
    api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()))
        .get(file)
        .map_err(|e| Error::Hub(format!("{repo}: cannot fetch `{file}`: {e}")))
}

/// The files of a Hugging Face model: config, weights (one file or the shards named by the
/// index), and the tokenizer when there is one.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
}

impl ModelFiles {
    pub fn resolve(source: &ModelSource) -> Result<Self> {
        let config = source.file("config.json")?;
        let weights = match source.optional_file("model.safetensors.index.json") {
            Some(index) => {
                let v: serde_json::Value = crate::error::read_json(&index)?;
                let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::BadFile {
                    path: index.clone(),
                    msg: "no `weight_map` object".into(),
                })?;
                let mut shards: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
                shards.sort();
                shards.dedup();
                shards.into_iter().map(|s| source.file(s)).collect::<Result<Vec<_>>>()?
            }
            None => vec![source.file("model.safetensors")?],
        };
        Ok(Self { config, weights, tokenizer: source.optional_file("tokenizer.json") })
    }
}
