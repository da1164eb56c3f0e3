//! Per-task accuracy and the unweighted average over tasks, as a text table and as JSON.
//!
//! Source: `docs/METHODS.md` §0.4–§0.5: accuracy = correct / N per task, and the
//! reported "Avg" is the plain mean of the task accuracies (not weighted by N).

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::answer::Task;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskScore {
    pub task: Task,
    pub correct: usize,
    pub total: usize,
    /// correct / total, in [0, 1] (0 when empty); kept in sync by `EvalReport`.
    pub accuracy: f64,
}

impl TaskScore {
    fn new(task: Task) -> Self {
        Self {
            task,
            correct: 0,
            total: 0,
            accuracy: 0.0,
        }
    }

    fn add(&mut self, correct: usize, total: usize) {
        self.correct += correct;
        self.total += total;
        self.accuracy = if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        };
    }
}

/// Scores in the order the tasks were first seen; `average` is kept in sync.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub tasks: Vec<TaskScore>,
    /// Unweighted mean of the task accuracies; `None` before any task is recorded.
    pub average: Option<f64>,
}

impl EvalReport {
    pub fn new() -> Self {
        Self::default()
    }

    /// Count one prediction.
    pub fn record(&mut self, task: Task, correct: bool) {
        self.add(task, correct as usize, 1);
    }

    /// Add `correct` out of `total` predictions for `task`.
    pub fn add(&mut self, task: Task, correct: usize, total: usize) {
        let idx = match self.tasks.iter().position(|s| s.task == task) {
            Some(i) => i,
            None => {
                self.tasks.push(TaskScore::new(task));
                self.tasks.len() - 1
            }
        };
        self.tasks[idx].add(correct, total);
        self.average = self.mean_accuracy();
    }

    pub fn get(&self, task: Task) -> Option<&TaskScore> {
        self.tasks.iter().find(|s| s.task == task)
    }

    fn mean_accuracy(&self) -> Option<f64> {
        if self.tasks.is_empty() {
            return None;
        }
        Some(self.tasks.iter().map(|s| s.accuracy).sum::<f64>() / self.tasks.len() as f64)
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::msg(format!("serializing the report: {e}")))
    }

    pub fn save_json(&self, path: &Path) -> Result<()> {
        crate::fsutil::write_file_atomic(path, (self.to_json()? + "\n").as_bytes())
    }

    /// An aligned table: task, correct, total, accuracy in %, then the average.
    pub fn table(&self) -> String {
        let width = self
            .tasks
            .iter()
            .map(|s| s.task.dir_name().len())
            .max()
            .unwrap_or(0)
            .max("Average".len());
        let mut out = format!(
            "{:<width$}  {:>8}  {:>8}  {:>8}\n",
            "task", "correct", "total", "acc %"
        );
        for s in &self.tasks {
            out += &format!(
                "{:<width$}  {:>8}  {:>8}  {:>8.2}\n",
                s.task.dir_name(),
                s.correct,
                s.total,
                100.0 * s.accuracy
            );
        }
        if let Some(avg) = self.average {
            out += &format!(
                "{:<width$}  {:>8}  {:>8}  {:>8.2}\n",
                "Average",
                "",
                "",
                100.0 * avg
            );
        }
        out
    }
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.table())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EvalReport {
        let mut r = EvalReport::new();
        r.add(Task::BoolQ, 3, 4); // 0.75
        r.record(Task::ArcChallenge, true);
        r.record(Task::ArcChallenge, false); // 0.5
        r.record(Task::BoolQ, false); // 3/5 = 0.6
        r
    }

    #[test]
    fn accumulates_and_averages_unweighted() {
        let r = sample();
        assert_eq!(r.get(Task::BoolQ).unwrap().correct, 3);
        assert_eq!(r.get(Task::BoolQ).unwrap().total, 5);
        assert!((r.get(Task::BoolQ).unwrap().accuracy - 0.6).abs() < 1e-12);
        // Unweighted: (0.6 + 0.5) / 2, not 4 / 7.
        assert!((r.average.unwrap() - 0.55).abs() < 1e-12);
        assert_eq!(EvalReport::new().average, None);
    }

    #[test]
    fn table_is_aligned() {
        let table = sample().table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{table}");
        assert!(
            lines[1].starts_with("boolq ") && lines[1].ends_with("60.00"),
            "{table}"
        );
        assert!(
            lines[2].starts_with("ARC-Challenge ") && lines[2].ends_with("50.00"),
            "{table}"
        );
        assert!(
            lines[3].starts_with("Average ") && lines[3].ends_with("55.00"),
            "{table}"
        );
    }

    #[test]
    fn json_round_trip() {
        let r = sample();
        let json = r.to_json().unwrap();
        assert!(json.contains("\"task\": \"ARC-Challenge\""), "{json}");
        let back: EvalReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        r.save_json(&path).unwrap();
        assert_eq!(crate::error::read_json::<EvalReport>(&path).unwrap(), r);
    }
}
