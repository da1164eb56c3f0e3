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
