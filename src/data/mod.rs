//! Data in the LLM-Adapters format: the JSON records, the prompt templates, tokenization with
//! labels, batching, and the rebuild of the commonsense sets from OLMo's request files.
//! Source of every convention here: `docs/METHODS.md` §0.1–§0.3.

pub mod batch;
pub mod commonsense;
pub mod dataset;
pub mod images;
pub mod prompt;
pub mod task;
pub mod tokenize;

pub use batch::{Batch, BatchIter, BatchPosition};
pub use commonsense::{convert_commonsense, ConversionReport};
pub use dataset::{load_examples, train_val_split, Example};
pub use prompt::{eval_prompt, train_prompt};
pub use task::Task;
pub use tokenize::{tokenize_example, TokenizeOptions, Tokenized};
