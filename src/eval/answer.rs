//! The eight commonsense tasks and the extraction of a prediction from a model's output.
//!
//! Source: `docs/METHODS.md` §0.4 (LLM-Adapters `commonsense_evaluate.py`,
//! `extract_answer`): the prediction is the **first** match of the task's pattern in the
//! response (`re.findall(pattern, output)[0]`), case-sensitive; no match gives "" which never
//! equals a gold answer. The response is the decoded text after the last "### Response:",
//! stripped (ParallelControl's `split(...)[-1].strip()`).

use std::sync::OnceLock;

use regex::Regex;

pub use crate::data::Task;

/// How a prediction is read from a response to this task.
impl Task {
    /// The alternatives of the answer pattern (`extract_answer` in commonsense_evaluate.py).
    pub fn pattern(self) -> &'static str {
        match self {
            Task::BoolQ => "true|false",
            Task::Piqa => "solution1|solution2",
            Task::SocialIqa | Task::ArcChallenge | Task::ArcEasy | Task::OpenBookQa => {
                "answer1|answer2|answer3|answer4|answer5"
            }
            Task::HellaSwag => "ending1|ending2|ending3|ending4",
            Task::WinoGrande => "option1|option2",
        }
    }

    fn regex(self) -> &'static Regex {
        static CACHE: OnceLock<Vec<Regex>> = OnceLock::new();
        let all = CACHE.get_or_init(|| {
            Task::ALL
                .iter()
                .map(|t| Regex::new(t.pattern()).expect("static pattern"))
                .collect()
        });
        &all[Task::ALL
            .iter()
            .position(|&t| t == self)
            .expect("task in ALL")]
    }
}

/// The model's response: the text after the last "### Response:", stripped.
pub fn response_text(decoded: &str) -> &str {
    decoded
        .rsplit("### Response:")
        .next()
        .unwrap_or(decoded)
        .trim()
}

/// The first match of the task's pattern in `output`, or "" when there is none.
pub fn extract_answer(task: Task, output: &str) -> String {
    task.regex()
        .find(output)
        .map(|m| m.as_str().to_string())
        .unwrap_or_default()
}

/// Whether the prediction extracted from `output` equals the gold `answer` exactly.
pub fn is_correct(task: Task, output: &str, answer: &str) -> bool {
    let pred = extract_answer(task, output);
    !pred.is_empty() && pred == answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases() {
        for t in Task::ALL {
            assert_eq!(Task::from_name(t.dir_name()).unwrap(), t);
            assert_eq!(t.dir_name().parse::<Task>().unwrap(), t);
        }
        assert_eq!(Task::from_name("ARC-C").unwrap(), Task::ArcChallenge);
        assert_eq!(Task::from_name("arc_easy").unwrap(), Task::ArcEasy);
        assert_eq!(Task::from_name("SocialIQA").unwrap(), Task::SocialIqa);
        assert_eq!(Task::from_name("OBQA").unwrap(), Task::OpenBookQa);
        assert_eq!(Task::from_name("BoolQ").unwrap(), Task::BoolQ);
        let err = Task::from_name("mmlu").unwrap_err().to_string();
        assert!(
            err.contains("unknown task `mmlu`") && err.contains("ARC-Easy"),
            "{err}"
        );
    }

    #[test]
    fn serde_uses_dir_names() {
        assert_eq!(
            serde_json::to_string(&Task::ArcChallenge).unwrap(),
            "\"ARC-Challenge\""
        );
        assert_eq!(
            serde_json::from_str::<Task>("\"social_i_qa\"").unwrap(),
            Task::SocialIqa
        );
    }

    #[test]
    fn extracts_each_tasks_format() {
        let cases = [
            (Task::BoolQ, "the correct answer is true", "true"),
            (Task::BoolQ, "the correct answer is false", "false"),
            (Task::Piqa, "the correct answer is solution2", "solution2"),
            (Task::SocialIqa, "the correct answer is answer3", "answer3"),
            (Task::HellaSwag, "the correct answer is ending4", "ending4"),
            (Task::WinoGrande, "the correct answer is option1", "option1"),
            (
                Task::ArcChallenge,
                "the correct answer is answer5",
                "answer5",
            ),
            (Task::ArcEasy, "the correct answer is answer1", "answer1"),
            (Task::OpenBookQa, "the correct answer is answer4", "answer4"),
        ];
        for (task, out, want) in cases {
            assert_eq!(extract_answer(task, out), want, "{task}");
            assert!(is_correct(task, out, want));
        }
    }

    #[test]
    fn first_match_wins() {
        assert_eq!(extract_answer(Task::BoolQ, "false, not true"), "false");
        assert_eq!(
            extract_answer(Task::Piqa, "solution2 rather than solution1"),
            "solution2"
        );
        assert_eq!(
            extract_answer(Task::HellaSwag, "ending3 ending1"),
            "ending3"
        );
        assert_eq!(extract_answer(Task::ArcEasy, "answer2answer4"), "answer2");
        // A match inside a word counts, as with re.findall.
        assert_eq!(extract_answer(Task::BoolQ, "it is untrue"), "true");
    }

    #[test]
    fn no_match_is_empty_and_wrong() {
        assert_eq!(extract_answer(Task::BoolQ, "the correct answer is yes"), "");
        assert_eq!(
            extract_answer(Task::BoolQ, "True"),
            "",
            "case-sensitive as in Python"
        );
        assert_eq!(extract_answer(Task::WinoGrande, "option3"), "");
        assert_eq!(extract_answer(Task::HellaSwag, "ending5"), "");
        assert!(!is_correct(Task::Piqa, "no idea", "solution1"));
        assert!(!is_correct(Task::Piqa, "", ""));
    }

    #[test]
    fn response_is_the_text_after_the_last_marker() {
        let decoded = "Below ... ### Response:\n                 the correct answer is answer3 ";
        assert_eq!(response_text(decoded), "the correct answer is answer3");
        assert_eq!(response_text("  no marker  "), "no marker");
    }
}
