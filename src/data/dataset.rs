//! LLM-Adapters records and the train/validation split.
//!
//! Source: `docs/METHODS.md` §0.1 (the record format: a JSON list of
//! `{"instruction", "input", "output", "answer"}`) and §0.3 (`train_test_split(test_size=120,
//! shuffle=True, seed=42)`). The split here is deterministic for a seed but does not reproduce
//! numpy's permutation; it uses its own small generator so that the order never changes with a
//! dependency's version (a checkpoint stores the seed, not the order).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{read_json, Error, Result};

/// One instruction-tuning record.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Example {
    pub instruction: String,
    #[serde(default)]
    pub input: String,
    pub output: String,
    /// The gold label ("true", "answer3", ...); test files have it, generic sets may not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
}

/// Read a JSON list of examples. A row that is not a well-formed example is an error naming
/// the file and the (0-based) row index.
pub fn load_examples(path: &Path) -> Result<Vec<Example>> {
    let rows: Vec<serde_json::Value> = match read_json::<serde_json::Value>(path)? {
        serde_json::Value::Array(rows) => rows,
        other => {
            return Err(Error::BadFile {
                path: path.to_path_buf(),
                msg: format!(
                    "expected a JSON list of examples, found {}",
                    json_kind(&other)
                ),
            })
        }
    };
    rows.into_iter()
        .enumerate()
        .map(|(row, value)| parse_row(path, row, value))
        .collect()
}

fn parse_row(path: &Path, row: usize, value: serde_json::Value) -> Result<Example> {
    let bad = |msg: String| Error::BadRow {
        path: path.to_path_buf(),
        row,
        msg,
    };
    if !value.is_object() {
        return Err(bad(format!(
            "expected an object, found {}",
            json_kind(&value)
        )));
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

pub(crate) fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Split off `val_size` examples at random, like `train_test_split(test_size=val_size,
/// shuffle=True, seed=seed)`: both parts come in shuffled order. Returns `(train, val)`.
pub fn train_val_split<T: Clone>(
    items: &[T],
    val_size: usize,
    seed: u64,
) -> Result<(Vec<T>, Vec<T>)> {
    if val_size > 0 && val_size >= items.len() {
        return Err(Error::msg(format!(
            "validation size {val_size} must be smaller than the dataset ({} examples)",
            items.len()
        )));
    }
    let order = seeded_permutation(items.len(), seed);
    let pick = |idx: &[usize]| idx.iter().map(|&i| items[i].clone()).collect::<Vec<T>>();
    Ok((pick(&order[val_size..]), pick(&order[..val_size])))
}

/// A permutation of `0..n` that depends only on `seed` (Fisher–Yates driven by SplitMix64).
pub fn seeded_permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// SplitMix64 (Steele et al.): tiny, well mixed, and fixed forever.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (rejection sampling, no modulo bias).
    fn below(&mut self, bound: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % bound;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % bound;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
        let path = dir.path().join("data.json");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn loads_rows_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            r#"[{"instruction": "i1", "input": "", "output": "o1", "answer": "true"},
                {"instruction": "i2", "output": "o2"}]"#,
        );
        let ex = load_examples(&path).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].answer.as_deref(), Some("true"));
        assert_eq!(ex[1].input, "");
        assert_eq!(ex[1].answer, None);
    }

    fn row_error(text: &str) -> (usize, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, text);
        match load_examples(&path) {
            Err(Error::BadRow { path: p, row, msg }) => {
                assert_eq!(p, path);
                (row, msg)
            }
            other => panic!("expected BadRow, got {other:?}"),
        }
    }

    #[test]
    fn malformed_rows_name_file_and_row() {
        let ok = r#"{"instruction": "i", "output": "o"}"#;
        let (row, msg) = row_error(&format!(r#"[{ok}, {{"instruction": "i"}}]"#));
        assert_eq!(row, 1);
        assert!(msg.contains("output"), "{msg}");
        let (row, msg) = row_error(&format!(
            r#"[{ok}, {ok}, {{"instruction": 3, "output": "o"}}]"#
        ));
        assert_eq!(row, 2);
        assert!(msg.contains("invalid type"), "{msg}");
        let (row, msg) = row_error(r#"["just a string"]"#);
        assert_eq!(row, 0);
        assert!(msg.contains("expected an object"), "{msg}");
    }

    #[test]
    fn not_a_list_is_a_file_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, r#"{"instruction": "i"}"#);
        assert!(matches!(load_examples(&path), Err(Error::BadFile { .. })));
        let path = write(&dir, "[1,");
        assert!(matches!(load_examples(&path), Err(Error::Json { .. })));
    }

    #[test]
    fn split_is_seeded_and_complete() {
        let items: Vec<u32> = (0..100).collect();
        let (train, val) = train_val_split(&items, 12, 42).unwrap();
        assert_eq!((train.len(), val.len()), (88, 12));
        let mut all: Vec<u32> = train.iter().chain(&val).copied().collect();
        all.sort();
        assert_eq!(all, items);
        assert_eq!(
            train_val_split(&items, 12, 42).unwrap(),
            (train.clone(), val.clone())
        );
        assert_ne!(train_val_split(&items, 12, 43).unwrap().1, val);
        assert!(train_val_split(&items, 100, 42).is_err());
        assert_eq!(train_val_split(&items, 0, 42).unwrap().0.len(), 100);
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = seeded_permutation(1000, 7);
        assert_ne!(p, (0..1000).collect::<Vec<_>>());
        p.sort();
        assert_eq!(p, (0..1000).collect::<Vec<_>>());
        assert!(seeded_permutation(0, 1).is_empty());
    }
}
