//! The eight commonsense tasks of the LLM-Adapters benchmark, named as their folders on disk
//! (`dataset/<name>/`); docs/METHODS.md §0.1.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A commonsense task, named on disk as in LLM-Adapters' `dataset/<name>/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Task {
    #[serde(rename = "boolq")]
    BoolQ,
    #[serde(rename = "piqa")]
    Piqa,
    #[serde(rename = "social_i_qa")]
    SocialIqa,
    #[serde(rename = "hellaswag")]
    HellaSwag,
    #[serde(rename = "winogrande")]
    WinoGrande,
    #[serde(rename = "ARC-Challenge")]
    ArcChallenge,
    #[serde(rename = "ARC-Easy")]
    ArcEasy,
    #[serde(rename = "openbookqa")]
    OpenBookQa,
}

impl Task {
    /// In the order of the published tables (BoolQ … OBQA).
    pub const ALL: [Task; 8] = [
        Task::BoolQ,
        Task::Piqa,
        Task::SocialIqa,
        Task::HellaSwag,
        Task::WinoGrande,
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::OpenBookQa,
    ];

    /// The LLM-Adapters directory name (`dataset/<name>/test.json`).
    pub fn dir_name(self) -> &'static str {
        match self {
            Task::BoolQ => "boolq",
            Task::Piqa => "piqa",
            Task::SocialIqa => "social_i_qa",
            Task::HellaSwag => "hellaswag",
            Task::WinoGrande => "winogrande",
            Task::ArcChallenge => "ARC-Challenge",
            Task::ArcEasy => "ARC-Easy",
            Task::OpenBookQa => "openbookqa",
        }
    }

    /// Parse a task name: the LLM-Adapters names, case and `-`/`_`/space insensitive, plus the
    /// usual short forms (siqa, arc-c, arc-e, obqa, ...).
    pub fn from_name(name: &str) -> Result<Task> {
        let key: String = name
            .chars()
            .filter(|c| !matches!(c, '-' | '_' | ' '))
            .collect::<String>()
            .to_lowercase();
        let task = match key.as_str() {
            "boolq" => Task::BoolQ,
            "piqa" => Task::Piqa,
            "socialiqa" | "siqa" => Task::SocialIqa,
            "hellaswag" | "hellas" => Task::HellaSwag,
            "winogrande" | "winog" | "wino" => Task::WinoGrande,
            "arcchallenge" | "arcc" => Task::ArcChallenge,
            "arceasy" | "arce" => Task::ArcEasy,
            "openbookqa" | "obqa" => Task::OpenBookQa,
            _ => {
                let known: Vec<&str> = Task::ALL.iter().map(|t| t.dir_name()).collect();
                return Err(Error::msg(format!(
                    "unknown task `{name}`; known tasks: {}",
                    known.join(", ")
                )));
            }
        };
        Ok(task)
    }
}

impl FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Task> {
        Task::from_name(s)
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.dir_name())
    }
}

