//! `POST /v1/chat/completions`' one addition to completions: the chat
//! template, which renders a conversation (`messages`) into the one prompt
//! the model continues. Everything else (parameters, checks, admission,
//! the run, the answer) is the completions path's (`completions.rs`).
//!
//! GPT-2 has no chat template. Servers differ: vLLM refuses chat for such a
//! model, llama-server falls back to ChatML. We render a plain transcript:
//!
//! ```text
//! System: You are terse.
//! User: Hello?
//! Assistant:
//! ```
//!
//! that is, each message as `Role: content` and a newline, then the
//! generation prompt `Assistant:`, with the stop string `"\nUser:"` added
//! to the request's own (the model writing the user's next turn ends the
//! answer, `finish_reason: "stop"`). Why not ChatML, for GPT-2:
//! - GPT-2's tokenizer has no `<|im_start|>` / `<|im_end|>` tokens: each
//!   marker is split into 7 ordinary tokens (`<`, `|`, `im`, `_`, `start`,
//!   `|`, `>`), so a message costs 17 tokens of markup of a 1024-token
//!   window against the transcript's 3 (`User`, `:`, the newline).
//! - The model never saw those markers as structure, and cannot emit
//!   `<|im_end|>` as one token: an answer would rarely end where ChatML
//!   says it ends, and run to `max_tokens`.
//! - WebText, what GPT-2 learnt from, holds interviews, forum threads and
//!   scripts written as `Name: text` lines; a transcript is text it can
//!   continue, and a new `User:` line is an end of turn it does write.
//!
//! The generation prompt ends at the colon, not a space: GPT-2's tokens
//! carry their leading space (`" Hello"`), and a prompt ending in a space
//! makes it continue from an unusual split. So an answer starts with the
//! space (`content: " Hello."`), as the model wrote it.
//!
//! `--chat-template FILE` replaces the template with a JSON file of this
//! shape (the default, written out):
//!
//! ```json
//! {
//!   "message": "{role}: {content}\n",
//!   "roles": {"system": "System", "user": "User", "assistant": "Assistant"},
//!   "generation": "Assistant:",
//!   "stop": ["\nUser:"]
//! }
//! ```
//!
//! - `message` (required): each message, in order; `{role}` is replaced by
//!   the role's name and `{content}` (required) by the message's text.
//!   Nothing else in it is special, and the content is inserted as is
//!   (placeholders in a message's text are not expanded).
//! - `roles`: the name `{role}` gives each of `system`, `user`,
//!   `assistant`; a role left out keeps its own name.
//! - `generation`: appended after the last message (default empty).
//! - `stop`: at most 4 stop strings added to every chat request's own.
//!
//! ChatML, for a model that was trained on it, is then `{"message":
//! "<|im_start|>{role}\n{content}<|im_end|>\n", "generation":
//! "<|im_start|>assistant\n", "stop": ["<|im_end|>"]}`. A file that is not
//! this shape is refused at startup, naming the file and the fault.

use std::path::Path;

use serde_json::{Map, Value};

use super::request::{Message, Role, MAX_STOPS};

/// How a conversation becomes a prompt (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    /// `message` split at its placeholders.
    message: Vec<Part>,
    /// `{role}`'s text for system, user, assistant (in [`Role::ALL`]'s order).
    roles: [String; 3],
    generation: String,
    stop: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Role,
    Content,
}

/// Largest template file read.
const FILE_LIMIT: u64 = 1 << 20;

impl Default for ChatTemplate {
    /// The transcript of the module doc.
    fn default() -> Self {
        ChatTemplate::from_json(
            r#"{"message": "{role}: {content}\n",
                "roles": {"system": "System", "user": "User", "assistant": "Assistant"},
                "generation": "Assistant:", "stop": ["\nUser:"]}"#,
        )
        .expect("the default chat template is valid")
    }
}

impl ChatTemplate {
    /// `--chat-template FILE`; an error names the file and the fault.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = gpt2::files::read_bounded_string(path, FILE_LIMIT)
            .map_err(|e| format!("--chat-template: {e}"))?;
        ChatTemplate::from_json(&text).map_err(|e| format!("--chat-template {}: {e}", path.display()))
    }

    /// A template from its JSON text.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Object(fields) = value else {
            return Err(
                "must be a JSON object with `message` (and optionally `roles`, `generation`, `stop`)".into(),
            );
        };
        let mut template = ChatTemplate {
            message: Vec::new(),
            roles: Role::ALL.map(|r| r.name().to_string()),
            generation: String::new(),
            stop: Vec::new(),
        };
        for (key, v) in &fields {
            match key.as_str() {
                "message" => template.message = parts(text_field(key, v)?)?,
                "roles" => template.roles = roles(v, template.roles)?,
                "generation" => template.generation = text_field(key, v)?.to_string(),
                "stop" => template.stop = stops(v)?,
                _ => {
                    return Err(format!(
                        "unknown key `{key}`: a template has `message`, `roles`, `generation` and `stop`"
                    ))
                }
            }
        }
        if template.message.is_empty() {
            return Err("`message` is missing".into());
        }
        Ok(template)
    }

    /// The prompt for `messages`: each rendered by `message`, then `generation`.
    pub fn render(&self, messages: &[Message]) -> String {
        let mut out = String::new();
        for m in messages {
            for part in &self.message {
                out.push_str(match part {
                    Part::Text(t) => t,
                    Part::Role => &self.roles[m.role as usize],
                    Part::Content => &m.content,
                });
            }
        }
        out.push_str(&self.generation);
        out
    }

    /// The stop strings every chat request gets besides its own.
    pub fn stop(&self) -> &[String] {
        &self.stop
    }
}

fn text_field<'v>(key: &str, v: &'v Value) -> Result<&'v str, String> {
    v.as_str().ok_or_else(|| format!("`{key}` must be a string"))
}

/// `message` split at `{role}` and `{content}`; `{content}` must be there.
fn parts(mut rest: &str) -> Result<Vec<Part>, String> {
    let mut out = Vec::new();
    loop {
        let next = [("{role}", Part::Role), ("{content}", Part::Content)]
            .into_iter()
            .filter_map(|(p, part)| rest.find(p).map(|at| (at, p.len(), part)))
            .min_by_key(|&(at, ..)| at);
        let Some((at, len, part)) = next else { break };
        if at > 0 {
            out.push(Part::Text(rest[..at].to_string()));
        }
        out.push(part);
        rest = &rest[at + len..];
    }
    if !rest.is_empty() {
        out.push(Part::Text(rest.to_string()));
    }
    if !out.contains(&Part::Content) {
        return Err("`message` must contain `{content}`".into());
    }
    Ok(out)
}

fn roles(v: &Value, mut names: [String; 3]) -> Result<[String; 3], String> {
    let Value::Object(m): &Value = v else {
        return Err("`roles` must be an object of role to name".into());
    };
    let m: &Map<String, Value> = m;
    for (role, name) in m {
        let Some(r) = Role::ALL.into_iter().find(|r| r.name() == role) else {
            return Err(format!(
                "`roles` names an unknown role `{role}`: the roles are system, user and assistant"
            ));
        };
        names[r as usize] = name
            .as_str()
            .ok_or_else(|| format!("`roles.{role}` must be a string"))?
            .to_string();
    }
    Ok(names)
}

fn stops(v: &Value) -> Result<Vec<String>, String> {
    let list: Vec<String> = v
        .as_array()
        .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect())
        .ok_or("`stop` must be an array of strings")?;
    if list.len() > MAX_STOPS || list.iter().any(String::is_empty) {
        return Err(format!(
            "`stop` must hold at most {MAX_STOPS} strings, none empty"
        ));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, content: &str) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }

    #[test]
    fn the_default_is_a_transcript() {
        let t = ChatTemplate::default();
        let text = t.render(&[
            msg(Role::System, "Be terse."),
            msg(Role::User, "Hi {role}?"),
            msg(Role::Assistant, "Hello."),
            msg(Role::User, "Bye"),
        ]);
        // Placeholders in a message are text, not expanded.
        assert_eq!(
            text,
            "System: Be terse.\nUser: Hi {role}?\nAssistant: Hello.\nUser: Bye\nAssistant:"
        );
        assert_eq!(t.stop(), ["\nUser:"]);
    }

    #[test]
    fn a_template_file_replaces_it() {
        let t = ChatTemplate::from_json(
            r#"{"message": "<|im_start|>{role}\n{content}<|im_end|>\n", "generation": "<|im_start|>assistant\n",
                "stop": ["<|im_end|>"], "roles": {"user": "human"}}"#,
        )
        .unwrap();
        assert_eq!(
            t.render(&[msg(Role::System, "s"), msg(Role::User, "u")]),
            "<|im_start|>system\ns<|im_end|>\n<|im_start|>human\nu<|im_end|>\n<|im_start|>assistant\n"
        );
        // Content alone, nothing else.
        let t = ChatTemplate::from_json(r#"{"message": "{content}"}"#).unwrap();
        assert_eq!(t.render(&[msg(Role::User, "a"), msg(Role::User, "b")]), "ab");
        assert!(t.stop().is_empty());
    }

    #[test]
    fn bad_templates_are_refused_by_their_fault() {
        for (json, fault) in [
            ("{", "not valid JSON"),
            ("[]", "JSON object"),
            (r#"{"generation": "x"}"#, "`message` is missing"),
            (r#"{"message": "{role}: hi"}"#, "`{content}`"),
            (r#"{"message": 3}"#, "`message` must be a string"),
            (
                r#"{"message": "{content}", "roles": {"tool": "T"}}"#,
                "unknown role `tool`",
            ),
            (r#"{"message": "{content}", "stop": ["a", ""]}"#, "`stop`"),
            (
                r#"{"message": "{content}", "stop": ["a", "b", "c", "d", "e"]}"#,
                "at most 4",
            ),
            (
                r#"{"message": "{content}", "prefix": "x"}"#,
                "unknown key `prefix`",
            ),
        ] {
            let e = ChatTemplate::from_json(json).unwrap_err();
            assert!(e.contains(fault), "{json}: {e}");
        }
        let e = ChatTemplate::from_file(Path::new("/nonexistent/t.json")).unwrap_err();
        assert!(e.contains("/nonexistent/t.json"), "{e}");
    }

    /// The module doc's count: the markup around a message of two tokens,
    /// in GPT-2 tokens, ChatML's against the transcript's.
    #[test]
    fn chatml_markup_costs_gpt2_17_tokens_a_message_the_transcript_3() {
        let tokenizer = gpt2::tokenizer::Gpt2Tokenizer::builtin();
        let markup = |template: &str| {
            let t = ChatTemplate::from_json(template).unwrap();
            let text = t.render(&[msg(Role::User, "Hello there")]);
            tokenizer.encode(&text).unwrap().len() - tokenizer.encode("Hello there").unwrap().len()
        };
        let chatml = markup(r#"{"message": "<|im_start|>{role}\n{content}<|im_end|>\n"}"#);
        assert_eq!(chatml, 17);
        assert_eq!(markup(r#"{"message": "{role}: {content}\n"}"#), 3);
    }
}
