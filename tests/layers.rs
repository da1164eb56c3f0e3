//! The crate's layers, lowest first, and the rule that holds them apart: a module may use its own
//! layer and the layers below it, never one above. Every top-level module of `src/` must be placed
//! in exactly one layer, so a new module is placed on purpose.
//!
//! The check reads the source (comments stripped) for `crate::NAME` paths, including grouped
//! `use crate::{a, b::c}` imports; `super::` stays within a module and cannot cross a layer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Lowest first. `main.rs` belongs to `cli`.
const LAYERS: &[(&str, &[&str])] = &[
    ("core: errors, files, weights I/O, CUDA plumbing, the kernel check and bench harnesses", &["error", "fsutil", "alloc", "memory", "weights", "hub", "cuda", "selftest", "kernel_bench", "threads", "simd", "validate"]),
    ("quant: quantized weights", &["quant"]),
    ("ops: custom ops with their CPU reference and CUDA launcher", &["ops"]),
    ("model: the trainable LLaMA", &["model"]),
    ("methods: the PEFT methods, injected by module name", &["adapters"]),
    ("loading and data", &["loading", "data"]),
    ("training", &["training"]),
    ("eval", &["eval"]),
    ("reports: charts", &["plot"]),
    ("serving: the HTTP server and its decoding loop", &["serving"]),
    ("cli", &["cli", "demo"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, modules)| modules.contains(&module))
}

/// The source without `//` comments (doc comments included): intra-doc links to a higher layer
/// are documentation, not a dependency. String literals are rare enough in paths to ignore.
fn code_only(source: &str) -> String {
    source
        .lines()
        .map(|line| match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules that `source` names through `crate::`, with the line of each use.
fn crate_references(source: &str) -> Vec<(String, usize)> {
    let code = code_only(source);
    let mut out = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            // `candle_peft::` or `some_crate::` is another path; only a bare `crate::` counts.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if !name.is_empty() {
                        out.push((name, n + 1));
                    }
                }
            } else {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                out.push((name, n + 1));
            }
        }
    }
    out
}

/// The top-level module a file of `src/` belongs to (`src/model/llama.rs` → `model`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative.components().next().expect("non-empty").as_os_str().to_string_lossy().to_string();
    match first.strip_suffix(".rs") {
        Some("main") => "cli".to_string(),
        Some(stem) => stem.to_string(),
        None => first,
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every use of a higher layer in one file: (line, the module used, its layer, the file's layer).
fn violations(module: &str, source: &str) -> Vec<String> {
    let Some(own) = layer_of(module) else {
        return vec![format!("module `{module}` is in no layer of tests/layers.rs")];
    };
    crate_references(source)
        .into_iter()
        .filter_map(|(target, line)| {
            let theirs = layer_of(&target)?; // `crate::Result`, `crate::Error`: re-exports of core
            (theirs > own).then(|| {
                format!("line {line}: `{module}` ({}) uses `crate::{target}` ({}), a higher layer", LAYERS[own].0, LAYERS[theirs].0)
            })
        })
        .collect()
}

#[test]
fn no_module_uses_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut found = BTreeMap::new();
    for file in &files {
        if file.file_name().is_some_and(|n| n == "lib.rs") {
            continue;
        }
        let source = std::fs::read_to_string(file).expect("readable source");
        let v = violations(&module_of(&src, file), &source);
        if !v.is_empty() {
            found.insert(file.strip_prefix(&src).expect("under src").display().to_string(), v);
        }
    }
    assert!(found.is_empty(), "imports from a higher layer:\n{found:#?}");
}

#[test]
fn every_top_level_module_is_in_a_layer() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).expect("src/lib.rs");
    let declared: Vec<String> = code_only(&lib)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod ").or_else(|| l.trim().strip_prefix("mod ")))
        .map(|m| m.trim_end_matches(';').trim().to_string())
        .collect();
    assert!(declared.len() >= 10, "read too few modules from lib.rs: {declared:?}");
    let unplaced: Vec<&String> = declared.iter().filter(|m| layer_of(m).is_none()).collect();
    assert!(unplaced.is_empty(), "modules in no layer (add them to LAYERS): {unplaced:?}");
}

#[test]
fn the_check_catches_an_upward_import() {
    assert!(violations("model", "use crate::ops::nn::rms_norm;\nuse crate::quant::BaseWeight;\n").is_empty());
    let v = violations("model", "use crate::ops::nn;\nuse crate::training::Trainer;\n");
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].starts_with("line 2:") && v[0].contains("crate::training"), "{v:?}");
    let grouped = violations("ops", "use crate::{quant::BaseWeight, adapters::Dropout};");
    assert_eq!(grouped.len(), 1, "{grouped:?}");
    let inline = violations("quant", "    let x = crate::eval::Task::ALL; // crate::cli in a comment is fine\n");
    assert_eq!(inline.len(), 1, "{inline:?}");
    assert!(violations("data", "/// see [`crate::eval::Task`]\nfn f() {}\n").is_empty(), "doc links are not imports");
    assert!(violations("data", "use candle_peft::eval::Task;").is_empty(), "only crate:: paths are checked");
    assert_eq!(violations("nowhere", "").len(), 1, "an unplaced module is reported");
}
