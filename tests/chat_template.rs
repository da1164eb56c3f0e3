//! Chat templates rendered as transformers renders them: SmolLM2-135M-Instruct's own template
//! (from its GGUF) and two others, over several conversations, compared byte for byte with
//! `tests/fixtures/chat_template/cases.json` (made by `make_chat_template_fixture.py` with
//! transformers 5.17's `render_jinja_template`); and where a model's template is found.

mod common;

use candle_peft::eval::chat::{model_chat_template, ChatTemplate, Message};
use serde_json::Value;

fn fixture() -> Value {
    let path = common::fixture("chat_template/cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn template(fx: &Value, name: &str) -> ChatTemplate {
    let t = &fx["templates"][name];
    let s = |k: &str| t[k].as_str().unwrap().to_string();
    ChatTemplate::new(s("template"), s("bos_token"), s("eos_token"), name)
}

#[test]
fn renders_byte_for_byte_as_transformers() {
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    let (mut rendered, mut refused) = (0, 0);
    for (i, case) in cases.iter().enumerate() {
        let name = case["template"].as_str().unwrap();
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let got = template(&fx, name).render(&messages, case["add_generation_prompt"].as_bool().unwrap());
        match (&case["expected"], &case["error"]) {
            (Value::String(want), _) => {
                assert_eq!(got.unwrap(), *want, "case {i} ({name})");
                rendered += 1;
            }
            (_, Value::String(why)) => {
                let err = got.unwrap_err().to_string();
                assert!(err.contains(why.as_str()), "case {i} ({name}): error {err:?}, transformers said {why:?}");
                refused += 1;
            }
            _ => panic!("case {i}: neither expected nor error"),
        }
    }
    assert!(rendered >= 25 && refused >= 2, "{rendered} rendered, {refused} refused");
    assert!(fx["templates"]["smollm2"]["template"].as_str().unwrap().contains("SmolLM"), "the fixture holds SmolLM2's own template");
}

#[test]
fn a_gguf_s_template_comes_from_its_metadata() {
    use candle_core::quantized::gguf_file::{self, Value as V};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let fx = fixture();
    let smollm2 = fx["templates"]["smollm2"]["template"].as_str().unwrap();
    let md = [("general.architecture", V::String("llama".into())), ("tokenizer.chat_template", V::String(smollm2.into()))];
    let md: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &md, &[]).unwrap();
    let names = |id: u32| Some(["<|endoftext|>", "<|im_start|>", "<|im_end|>"][id as usize].to_string());
    let t = model_chat_template(path.to_str().unwrap(), Some(1), Some(2), names).unwrap().unwrap();
    assert_eq!((t.source.as_str(), t.bos_token.as_str(), t.eos_token.as_str()), (smollm2, "<|im_start|>", "<|im_end|>"));
    // Without the key there is no template (the caller falls back to ChatML).
    let bare = dir.path().join("bare.gguf");
    gguf_file::write(&mut std::fs::File::create(&bare).unwrap(), &md[..1], &[]).unwrap();
    assert_eq!(model_chat_template(bare.to_str().unwrap(), Some(1), Some(2), names).unwrap(), None);
}

#[test]
fn a_model_directory_s_template_comes_from_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().to_str().unwrap();
    let names = |id: u32| Some(format!("<tok{id}>"));
    assert_eq!(model_chat_template(spec, Some(1), Some(2), names).unwrap(), None);
    // The list form, with special tokens as AddedToken objects.
    let config = serde_json::json!({
        "chat_template": [{"name": "rag", "template": "R"}, {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}],
        "bos_token": {"content": "<s>", "normalized": false},
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let t = model_chat_template(spec, Some(1), Some(2), names).unwrap().unwrap();
    assert_eq!((t.bos_token.as_str(), t.eos_token.as_str()), ("<s>", "<tok2>"), "a token the config does not name comes from the vocabulary");
    assert_eq!(t.render(&[Message::new("user", "hey")], true).unwrap(), "<s>hey");
    // chat_template.jinja wins over tokenizer_config.json, as in transformers.
    std::fs::write(dir.path().join("chat_template.jinja"), "J{{ messages | length }}\n").unwrap();
    let t = model_chat_template(spec, Some(1), Some(2), names).unwrap().unwrap();
    assert_eq!(t.render(&[Message::new("user", "hey")], true).unwrap(), "J1");
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"chat_template\": 5}").unwrap();
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    assert!(model_chat_template(spec, Some(1), Some(2), names).is_err());
}

/// The real SmolLM2-135M-Instruct GGUF (`scripts/fetch_assets.sh`): the template found in it is
/// the fixture's, and the streamed pieces of a sampled answer, split characters included, add up
/// to the tokenizer's decoding of the whole answer.
#[test]
#[ignore = "needs scripts/fetch_assets.sh"]
fn smollm2_gguf_template_and_streaming() {
    use candle_peft::eval::generate::sampling::SamplingConfig;
    use candle_peft::eval::generate::stream::{generate_text, TextGenerationConfig};
    let root = std::env::var_os("CANDLE_PEFT_ASSETS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/assets"));
    let path = root.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/fetch_assets.sh first", path.display());
    let loaded = candle_peft::loading::load_model(path.to_str().unwrap(), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let tok = loaded.tokenizer.as_ref().unwrap();
    let c = &loaded.model.config;
    let t = model_chat_template(path.to_str().unwrap(), c.bos_token_id, c.eos_token_ids.first().copied(), |id| tok.id_to_token(id))
        .unwrap()
        .unwrap();
    let fx = fixture();
    assert_eq!(t.source, fx["templates"]["smollm2"]["template"].as_str().unwrap());
    assert_eq!((t.bos_token.as_str(), t.eos_token.as_str()), ("<|im_start|>", "<|im_end|>"));
    let text = t.render(&[Message::new("user", "Write one line in Chinese with an emoji: 猫 🐈")], true).unwrap();
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    let decode = |ids: &[u32]| Ok(tok.decode(ids, true).unwrap());
    let cfg = TextGenerationConfig {
        max_new_tokens: 40,
        eos_token_ids: c.eos_token_ids.clone(),
        stop_strings: vec![],
        sampling: SamplingConfig { temperature: 1.2, seed: 2, ..Default::default() },
    };
    let mut pieces = Vec::new();
    let got = generate_text(&loaded.model, decode, &ids, &cfg, |p| {
        pieces.push(p.to_string());
        Ok(())
    })
    .unwrap();
    let answer = &got.tokens[..got.tokens.len() - usize::from(got.stop == candle_peft::eval::generate::stream::StopReason::Eos)];
    assert_eq!(pieces.concat(), tok.decode(answer, true).unwrap());
    // Byte-level BPE splits these characters over several tokens: each is shown once whole.
    let text = "猫 🐈 café — 🐈‍⬛";
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    let mut stream = candle_peft::eval::generate::stream::TextStream::new(decode, vec![]);
    let pieces: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap().0).collect();
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert!(pieces.iter().any(String::is_empty), "no token split a character: {pieces:?}");
}
