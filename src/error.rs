//! One error type for the whole engine. Every variant that concerns a file, a tensor or a row
//! names it, so that a user can fix their input without reading a backtrace.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },

    #[error("{path}: missing key `{key}` in config")]
    MissingConfigKey { path: PathBuf, key: String },

    #[error("{path}: invalid config: {msg}")]
    InvalidConfig { path: PathBuf, msg: String },

    #[error("{origin}: tensor `{name}` not found")]
    MissingTensor { origin: String, name: String },

    #[error("{origin}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch { origin: String, name: String, expected: Vec<usize>, got: Vec<usize> },

    #[error("{origin}: tensor `{name}`: {msg}")]
    BadTensor { origin: String, name: String, msg: String },

    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },

    #[error("{path}, row {row}: {msg}")]
    BadRow { path: PathBuf, row: usize, msg: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("hub: {0}")]
    Hub(String),

    #[error("adapter: {0}")]
    Adapter(String),

    #[error("training: {0}")]
    Training(String),

    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn msg(s: impl Into<String>) -> Self {
        Error::Msg(s.into())
    }
}

/// Attach a path to an `std::io::Error`.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, std::io::Error> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io { path: path.into(), source })
    }
}

/// Read and parse a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).at(path)?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}
