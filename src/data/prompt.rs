//! The LLM-Adapters prompt templates, byte for byte.
//!
//! Source: `docs/METHODS.md` §0.2. Training uses `generate_prompt` of LLM-Adapters
//! `finetune.py` (copied into DoRA and ParallelControl); evaluation uses `generate_prompt` of
//! `commonsense_evaluate.py` / `llama_evaluation.py`. The two differ in whitespace (the
//! training no-input header ends with two spaces, its blank lines hold 16 spaces; the evaluation
//! ones are empty), and a model trained on one is evaluated with the other, so both are kept
//! exactly, odd whitespace included. An empty `input` selects the no-input variant, as Python's
//! `if data_point["input"]:` does.

/// 16 spaces: the indentation of the Python triple-quoted strings.
const IND: &str = "                ";

const HEADER_NO_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.";
const HEADER_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.";

/// Training prompt with the answer appended (`generate_prompt(data_point)` of finetune.py).
pub fn train_prompt(instruction: &str, input: &str, output: &str) -> String {
    if input.is_empty() {
        format!(
            "{HEADER_NO_INPUT}  \n\n{IND}### Instruction:\n{IND}{instruction}\n{IND}\n{IND}### Response:\n{IND}{output}"
        )
    } else {
        format!(
            "{HEADER_WITH_INPUT} \n\n{IND}### Instruction:\n{IND}{instruction}\n{IND}\n{IND}### Input:\n{IND}{input}\n{IND}\n{IND}### Response:\n{IND}{output}"
        )
    }
}

/// Evaluation prompt, ending where the model's answer starts (`generate_prompt(instruction,
/// input)` of commonsense_evaluate.py).
pub fn eval_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!("{HEADER_NO_INPUT} \n\n{IND}### Instruction:\n{IND}{instruction}\n\n{IND}### Response:\n{IND}")
    } else {
        format!(
            "{HEADER_WITH_INPUT}\n\n{IND}### Instruction:\n{IND}{instruction}\n\n{IND}### Input:\n{IND}{input}\n\n{IND}### Response:\n{IND}"
        )
    }
}

/// The part of the training prompt before the answer: what `train_on_inputs=False` masks.
pub fn train_prompt_prefix(instruction: &str, input: &str) -> String {
    train_prompt(instruction, input, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` spaces, spelled out so that a reader can count them.
    fn sp(n: usize) -> String {
        " ".repeat(n)
    }

    #[test]
    fn train_prompt_no_input_is_byte_exact() {
        let expected = String::new()
            + "Below is an instruction that describes a task. Write a response that appropriately completes the request."
            + &sp(2)
            + "\n\n"
            + &sp(16) + "### Instruction:\n"
            + &sp(16) + "INSTR\n"
            + &sp(16) + "\n"
            + &sp(16) + "### Response:\n"
            + &sp(16) + "OUT";
        assert_eq!(train_prompt("INSTR", "", "OUT"), expected);
        // The repr quoted in docs/METHODS.md §0.2.
        let repr = "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n                ### Instruction:\n                INSTR\n                \n                ### Response:\n                OUT";
        assert_eq!(train_prompt("INSTR", "", "OUT"), repr);
    }

    #[test]
    fn train_prompt_with_input_is_byte_exact() {
        let expected = String::new()
            + "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request."
            + &sp(1)
            + "\n\n"
            + &sp(16) + "### Instruction:\n"
            + &sp(16) + "INSTR\n"
            + &sp(16) + "\n"
            + &sp(16) + "### Input:\n"
            + &sp(16) + "IN\n"
            + &sp(16) + "\n"
            + &sp(16) + "### Response:\n"
            + &sp(16) + "OUT";
        assert_eq!(train_prompt("INSTR", "IN", "OUT"), expected);
    }

    #[test]
    fn eval_prompt_no_input_is_byte_exact() {
        let expected = String::new()
            + "Below is an instruction that describes a task. Write a response that appropriately completes the request."
            + &sp(1)
            + "\n\n"
            + &sp(16) + "### Instruction:\n"
            + &sp(16) + "INSTR\n"
            + "\n"
            + &sp(16) + "### Response:\n"
            + &sp(16);
        assert_eq!(eval_prompt("INSTR", ""), expected);
        let repr = "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n                ### Instruction:\n                INSTR\n\n                ### Response:\n                ";
        assert_eq!(eval_prompt("INSTR", ""), repr);
    }

    #[test]
    fn eval_prompt_with_input_is_byte_exact() {
        let expected = String::new()
            + "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request."
            + "\n\n"
            + &sp(16) + "### Instruction:\n"
            + &sp(16) + "INSTR\n"
            + "\n"
            + &sp(16) + "### Input:\n"
            + &sp(16) + "IN\n"
            + "\n"
            + &sp(16) + "### Response:\n"
            + &sp(16);
        assert_eq!(eval_prompt("INSTR", "IN"), expected);
    }

    #[test]
    fn train_and_eval_prompts_differ() {
        assert_ne!(train_prompt_prefix("x", ""), eval_prompt("x", ""));
        assert!(train_prompt("x", "", "y").starts_with(&train_prompt_prefix("x", "")));
    }
}
