//! An interactive conversation: read a user line, render the whole conversation with the chat
//! template, stream the answer, keep it for the next turn.
//!
//! Why here and not in the CLI: the loop is what `candle-peft chat` does, and taking any reader
//! and writers lets the tests drive it. Each turn re-reads the whole conversation (no KV cache
//! kept between turns): the template may render earlier turns differently once a new one is
//! added, so only re-rendering is always right.

use std::io::{BufRead, Write};

use super::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::data::tokenize::{decode_text, encode_ids};
use crate::eval::generate::stream::{generate_text, TextGenerationConfig};
use crate::model::llama::Llama;

fn io(e: std::io::Error) -> Error {
    Error::msg(format!("chat: {e}"))
}

/// Run the conversation until `input` ends; returns it. Answers go to `out` as they are
/// written; the prompt marker and per-turn problems (a conversation past the model's context)
/// go to `err`, and the turn is dropped so that the user can go on.
#[allow(clippy::too_many_arguments)]
pub fn run_chat(
    model: &Llama,
    tokenizer: &tokenizers::Tokenizer,
    template: &ChatTemplate,
    system: Option<&str>,
    cfg: &TextGenerationConfig,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Vec<Message>> {
    let mut conversation: Vec<Message> = system.map(|s| Message::new("system", s)).into_iter().collect();
    let decode = |ids: &[u32]| decode_text(tokenizer, ids);
    let mut turn_cfg = cfg.clone();
    loop {
        write!(err, "> ").and_then(|()| err.flush()).map_err(io)?;
        let mut line = String::new();
        if input.read_line(&mut line).map_err(io)? == 0 {
            writeln!(err).map_err(io)?;
            return Ok(conversation);
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        conversation.push(Message::new("user", line));
        let text = template.render(&conversation, true)?;
        // The template writes the special tokens itself (apply_chat_template tokenizes with
        // add_special_tokens=False).
        let ids = encode_ids(tokenizer, &text, false)?;
        // Another seed each turn, so that asking again does not repeat the same draws.
        turn_cfg.sampling.seed = cfg.sampling.seed.wrapping_add(conversation.len() as u64);
        let answer = generate_text(model, decode, &ids, &turn_cfg, |piece| write!(out, "{piece}").and_then(|()| out.flush()).map_err(io));
        match answer {
            Ok(answer) => {
                writeln!(out).map_err(io)?;
                conversation.push(Message::new("assistant", &answer.text));
            }
            Err(e) => {
                writeln!(err, "error: {e}").map_err(io)?;
                conversation.pop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::eval::generate::sampling::SamplingConfig;
    use crate::model::LlamaConfig;

    /// A word-level tokenizer of 12 words, so that the tiny model's ids decode to text.
    fn tokenizer() -> tokenizers::Tokenizer {
        let words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "there", "how", "are", "you", "fine", "\n"];
        let vocab: serde_json::Map<String, serde_json::Value> = words.iter().enumerate().map(|(i, w)| (w.to_string(), i.into())).collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
        });
        json.to_string().parse().unwrap()
    }

    #[test]
    fn keeps_the_conversation_and_drops_a_turn_past_the_context() {
        let mut config = LlamaConfig::tiny(12);
        config.max_position_embeddings = 40;
        let model = Llama::random(config, 21, DType::F32, &Device::Cpu).unwrap();
        let template = ChatTemplate::new("{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}", "", "", "test");
        let cfg = TextGenerationConfig { max_new_tokens: 5, eos_token_ids: vec![2], stop_strings: vec![], sampling: SamplingConfig { seed: 1, ..Default::default() } };
        let long = "how are you ".repeat(12);
        let input = format!("hi there\n\n{long}\nhow are you\n").into_bytes();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let conv = run_chat(&model, &tokenizer(), &template, None, &cfg, &mut input.as_slice(), &mut out, &mut err).unwrap();
        let roles: Vec<&str> = conv.iter().map(|m| m.role.as_str()).collect();
        // The empty line is skipped, the long one refused (with both lengths), the others answered.
        assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
        assert_eq!((conv[0].content.as_str(), conv[2].content.as_str()), ("hi there", "how are you"));
        let err = String::from_utf8(err).unwrap();
        assert!(err.contains("context of 40 tokens") && err.contains("5 new tokens"), "{err}");
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out, format!("{}\n{}\n", conv[1].content, conv[3].content));
    }
}
