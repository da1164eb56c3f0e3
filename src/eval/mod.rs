//! Evaluation on the commonsense benchmark: generation (greedy, beam search), answer extraction
//! from a model's output, the evaluation loop and the per-task accuracy report; and generation
//! for a user: sampling, stop strings, streamed text and the model's chat template.
//! Source: `docs/METHODS.md` §0.4.

pub mod answer;
pub mod chat;
pub mod evaluate;
pub mod generate;
pub mod linear_probe;
pub mod report;

pub use answer::{extract_answer, Task};
pub use evaluate::{evaluate_dir, evaluate_task, Prediction};
pub use generate::{beam_search, generate, greedy, GenerationConfig};
pub use report::{EvalReport, TaskScore};
