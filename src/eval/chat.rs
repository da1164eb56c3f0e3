//! A model's chat template: its own Jinja template, rendered as transformers'
//! `apply_chat_template(tokenize=False)` renders it.
//!
//! Why: an instruction-tuned model answers well only in the format it was tuned on, and that
//! format ships with the model: `chat_template` in `tokenizer_config.json` (a string, or a list
//! of `{"name", "template"}` of which `default` is used), `chat_template.jinja` beside it
//! (transformers ≥ 4.43 saves it there, and reads it first), or the GGUF metadata key
//! `tokenizer.chat_template`. ChatML is only the fallback for a model that has none.
//!
//! transformers renders with jinja2's `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)` with the `loopcontrols` extension, `raise_exception(msg)` and
//! `strftime_now(fmt)` (here in UTC) as globals and a `tojson` filter that is `json.dumps(x,
//! ensure_ascii=False)` (no HTML escaping), and passes `messages`, `add_generation_prompt` and
//! the tokenizer's special tokens (`bos_token`, `eos_token`, ...). minijinja with the same
//! settings, Python's string methods (`minijinja_contrib::pycompat`) and those globals gives the
//! same text (`tests/chat_template.rs` compares with transformers' output byte for byte).
//! `{% generation %}` blocks (assistant masks for training) are not supported.

use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};

use crate::error::{Error, Result};

pub mod session;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// The ChatML format (what SmolLM2-Instruct and Qwen use), for models without a template.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A template with the special tokens it is rendered with.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    /// Where it came from (a file, GGUF metadata, or the ChatML fallback), for messages.
    pub origin: String,
}

impl ChatTemplate {
    pub fn new(source: impl Into<String>, bos_token: impl Into<String>, eos_token: impl Into<String>, origin: impl Into<String>) -> Self {
        Self { source: source.into(), bos_token: bos_token.into(), eos_token: eos_token.into(), origin: origin.into() }
    }

    /// The ChatML fallback.
    pub fn chatml(bos_token: &str, eos_token: &str) -> Self {
        Self::new(CHATML, bos_token, eos_token, "ChatML (the model has no chat template)")
    }

    /// The `chat_template` of a parsed `tokenizer_config.json`, with its `bos_token` and
    /// `eos_token` when it names them (a string or an `{"content": ...}` object), else `None`.
    pub fn from_tokenizer_config(config: &serde_json::Value, origin: &str) -> Result<Option<Self>> {
        let bad = |msg: &str| Error::msg(format!("{origin}: chat_template {msg}"));
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => {
                let find = |name: &str| {
                    named.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name)).and_then(|t| t.get("template"))
                };
                let t = find("default").ok_or_else(|| bad("is a list of named templates without one named `default`"))?;
                t.as_str().ok_or_else(|| bad("`default`'s template is not a string"))?.to_string()
            }
            Some(_) => return Err(bad("must be a string or a list of {\"name\", \"template\"}")),
        };
        Ok(Some(Self::new(source, special_token(config, "bos_token"), special_token(config, "eos_token"), origin)))
    }

    /// Render a conversation; `add_generation_prompt` appends the header of the assistant's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = environment();
        let fail = |e: minijinja::Error| Error::msg(format!("chat template ({}): {}", self.origin, describe(&e)));
        let template = env.template_from_str(&self.source).map_err(fail)?;
        let messages: Vec<Value> =
            messages.iter().map(|m| minijinja::context! { role => m.role.as_str(), content => m.content.as_str() }).collect();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            tools => (),
            documents => (),
        };
        template.render(ctx).map_err(fail)
    }
}

/// The model's template: `chat_template.jinja` or `tokenizer_config.json` beside a Hugging Face
/// model, or a GGUF's `tokenizer.chat_template`; `None` when it has none. `token_text` gives the
/// text of a special token id (the tokenizer's vocabulary), for the BOS and EOS the template
/// may print when the files do not name them.
pub fn model_chat_template(
    spec: &str,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    token_text: impl Fn(u32) -> Option<String>,
) -> Result<Option<ChatTemplate>> {
    let text = |id: Option<u32>| id.and_then(&token_text).unwrap_or_default();
    let path = Path::new(spec);
    let found = if path.is_file() {
        let (content, _) = crate::loading::gguf::read_content(path)?;
        match content.metadata.get("tokenizer.chat_template") {
            None => None,
            Some(v) => {
                let s = v.to_string().map_err(|_| {
                    Error::InvalidConfig { path: path.to_path_buf(), msg: "metadata `tokenizer.chat_template` must be a string".into() }
                })?;
                Some(ChatTemplate::new(s.clone(), "", "", format!("{spec}: tokenizer.chat_template")))
            }
        }
    } else {
        let source = crate::hub::ModelSource::parse(spec)?;
        let config = match source.optional_file("tokenizer_config.json") {
            Some(p) => Some((crate::error::read_json::<serde_json::Value>(&p)?, p)),
            None => None,
        };
        let mut found = match &config {
            Some((json, p)) => ChatTemplate::from_tokenizer_config(json, &p.display().to_string())?,
            None => None,
        };
        if let Some(p) = source.optional_file("chat_template.jinja") {
            let jinja = std::fs::read_to_string(&p).map_err(|e| Error::Io { path: p.clone(), source: e })?;
            let token = |key: &str| config.as_ref().map(|(json, _)| special_token(json, key)).unwrap_or_default();
            found = Some(ChatTemplate::new(jinja, token("bos_token"), token("eos_token"), p.display().to_string()));
        }
        found
    };
    Ok(found.map(|mut t| {
        if t.bos_token.is_empty() {
            t.bos_token = text(bos_id);
        }
        if t.eos_token.is_empty() {
            t.eos_token = text(eos_id);
        }
        t
    }))
}

/// A special token of `tokenizer_config.json`: a string, or an `AddedToken` object's `content`.
fn special_token(config: &serde_json::Value, key: &str) -> String {
    match config.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        None => String::new(),
    }
}

/// jinja2 as transformers configures it (see the module doc).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_syntax(minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().expect("a valid syntax"));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| -> std::result::Result<Value, minijinja::Error> {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        strftime(&format, secs).map(Value::from)
    });
    env.add_filter("tojson", tojson);
    env
}

/// Python's `strftime` for the codes chat templates use (Llama 3.x asks for `"%d %b %Y"`), at
/// `secs` after the Unix epoch, in UTC (Python uses local time; a date is what templates print).
fn strftime(format: &str, secs: u64) -> std::result::Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let days = (secs / 86_400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    let (month_name, weekday) = (MONTHS[(month - 1) as usize], DAYS[days.rem_euclid(7) as usize]);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            other => {
                let code = other.map_or(String::new(), String::from);
                return Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: %{code} is not supported")));
            }
        }
    }
    Ok(out)
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`, with Python's
/// separators (`", "` and `": "`, or `","` and newlines when indented) and no HTML escaping.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(value: &Value, indent: Option<usize>, depth: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&value.to_string()),
        ValueKind::String => write_json_string(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                out.push_str(if i > 0 { sep } else { "" });
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                out.push_str(if i > 0 { sep } else { "" });
                newline(out, depth + 1);
                write_json_string(&key.to_string(), out);
                out.push_str(": ");
                write_json(&value.get_item(key)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: cannot serialize {}", value.kind()))),
    }
    Ok(())
}

/// A JSON string as Python's `json.dumps(ensure_ascii=False)` writes it.
fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A minijinja error with its cause and the template line, without its debug dump.
fn describe(e: &minijinja::Error) -> String {
    let mut msg = match e.kind() {
        // `raise_exception`'s message is the template's own words.
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<Message> {
        vec![Message::new("system", "Be brief."), Message::new("user", "Hi"), Message::new("assistant", "Hello."), Message::new("user", "Bye")]
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::chatml("", "");
        let want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n\
                    <|im_start|>user\nBye<|im_end|>\n";
        assert_eq!(t.render(&conversation(), false).unwrap(), want);
        assert_eq!(t.render(&conversation(), true).unwrap(), format!("{want}<|im_start|>assistant\n"));
    }

    #[test]
    fn the_list_form_takes_the_default_template_and_token_objects() {
        let config = serde_json::json!({
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}"},
            ],
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
        });
        let t = ChatTemplate::from_tokenizer_config(&config, "tokenizer_config.json").unwrap().unwrap();
        assert_eq!(t.render(&conversation()[1..3], true).unwrap(), "<s>[user]Hi[assistant]Hello.</s>");
        let no_default = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "x"}]});
        assert!(ChatTemplate::from_tokenizer_config(&no_default, "c").unwrap_err().to_string().contains("default"));
        assert_eq!(ChatTemplate::from_tokenizer_config(&serde_json::json!({}), "c").unwrap(), None);
        assert!(ChatTemplate::from_tokenizer_config(&serde_json::json!({"chat_template": 3}), "c").is_err());
    }

    #[test]
    fn template_errors_are_errors_with_the_templates_words() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "", "test");
        let err = t.render(&conversation(), true).unwrap_err().to_string();
        assert!(err.contains("roles must alternate") && err.contains("test"), "{err}");
        let broken = ChatTemplate::new("{% for m in messages %}", "", "", "test");
        assert!(broken.render(&conversation(), true).is_err());
    }

    #[test]
    fn strftime_formats_dates_as_python() {
        // 2024-07-26 13:05:09 UTC, a Friday (Llama 3.1's default date); 2000-02-29; the epoch.
        assert_eq!(strftime("%d %b %Y, %A %H:%M:%S %%", 1_722_000_000 - 1_722_000_000 % 86_400 + 47_109).unwrap(), "26 Jul 2024, Friday 13:05:09 %");
        assert_eq!(strftime("%Y-%m-%d %a %B %y", 951_782_400).unwrap(), "2000-02-29 Tue February 00");
        assert_eq!(strftime("%d %b %Y", 0).unwrap(), "01 Jan 1970");
        assert!(strftime("%Q", 0).is_err());
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = ChatTemplate::new("{{ {'a': [1, 2.5, none, true], 'b': 'x\"<é>\\n'} | tojson }}|{{ [] | tojson }}|{{ [1, {'k': 2}] | tojson(indent=2) }}", "", "", "t");
        assert_eq!(t.render(&[], false).unwrap(), "{\"a\": [1, 2.5, null, true], \"b\": \"x\\\"<é>\\n\"}|[]|[\n  1,\n  {\n    \"k\": 2\n  }\n]");
    }
}
