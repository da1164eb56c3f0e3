//! Evaluation on the commonsense benchmark: answer extraction from a model's output and the
//! per-task accuracy report. Source: `shared/research/seeds.md` §0.4.

pub mod answer;
pub mod report;

pub use answer::{extract_answer, Task};
pub use report::{EvalReport, TaskScore};
