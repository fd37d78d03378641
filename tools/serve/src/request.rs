//! `POST /v1/completions` and `POST /v1/chat/completions` bodies: parsed
//! field by field from JSON, so every refusal names its parameter. Both
//! endpoints share the parser: the fields they have in common mean the same,
//! and each has its own few (`prompt`, `echo`, `logprobs: N`, `best_of` for
//! completions; `messages`, `logprobs: bool` with `top_logprobs`,
//! `max_completion_tokens` for chat).
//!
//! A few fields OpenAI clients send by default are accepted only at the value
//! that changes nothing (`suffix: null`, chat's `tools: []`); any other value,
//! and any field we do not know, is a 400 naming it.
//!
//! What the request asks of the model (token ids, `logit_bias` ids, lengths
//! against the context window, `n` against the batch) is checked once the
//! model is known: by the engine's door (`gpt2::Request::prepare`, rendered
//! by `completions::refused`) and by `completions.rs`. The ranges of the
//! numbers are checked here, though the door checks them again: here they
//! are checked in the body's field order, before the model is asked for (so
//! a body gets the same answer while the model loads, or with a wrong
//! `model`), on the f64 the client sent, before rounding to the engine's f32
//! could carry a value across a bound (`top_p` 1.00000001 becomes 1,
//! `temperature` 1e39 infinity), and they include the values no `usize` can
//! carry to the engine (a negative `max_tokens` or `top_k`). The checks that
//! relate two fields (`best_of` equals `n`, `max_tokens: 0` needs `echo`,
//! `top_logprobs` needs `logprobs`) come after every field is read.

use serde_json::{Map, Value};

use super::error::ApiError;
use gpt2::logprobs::MAX_LOGPROBS;
use gpt2::sampling::SamplingParams;

/// OpenAI's limit on stop sequences.
pub const MAX_STOPS: usize = 4;

/// The endpoint a body was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/completions`: `object: "text_completion"`, `choices[i].text`.
    Completions,
    /// `POST /v1/chat/completions`: `object: "chat.completion"`,
    /// `choices[i].message` (a stream's `delta`).
    Chat,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// A chat message's author.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// As the API names it.
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    pub const ALL: [Role; 3] = [Role::System, Role::User, Role::Assistant];
}

/// One chat message; a content given as parts is their texts joined by
/// newlines (as vLLM joins text parts).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Completions: one prompt, or a batch (one set of `n` choices each).
    Prompts(Vec<Prompt>),
    /// Chat: the conversation, rendered into one prompt by the server's
    /// chat template (`chat.rs`).
    Messages(Vec<Message>),
}

/// A validated request (lengths are checked against the model later, once
/// its tokenizer and context window are known).
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub api: Api,
    pub input: Input,
    /// `None`: the endpoint's default (completions: 16, as OpenAI; chat:
    /// the rest of the context window, as OpenAI and vLLM). 0 only with
    /// `echo` (the prompt is scored, nothing generated).
    pub max_tokens: Option<usize>,
    /// Samples per prompt (OpenAI's `n`; `best_of` may only equal it).
    pub n: usize,
    /// Completions: the prompt is returned before the generated text (and
    /// scored, with `logprobs`).
    pub echo: bool,
    /// The log-probability of each returned token with this many most
    /// likely alternatives (completions: `logprobs: N`; chat: `logprobs:
    /// true` with `top_logprobs: N`); `None`: none.
    pub logprobs: Option<usize>,
    pub sampling: SamplingParams,
    /// `None`: a fresh seed per request, as OpenAI does without one.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    /// vLLM's name: generate exactly `max_tokens`, past `<|endoftext|>`.
    pub ignore_eos: bool,
    /// The model asked for; the server refuses any but the one it serves
    /// (and never echoes this string back).
    pub model: Option<String>,
    /// `stream_options.include_usage`: a last chunk with empty `choices`
    /// and the usage, before `[DONE]` (streams only, as OpenAI does).
    pub include_usage: bool,
}

/// The default of `max_tokens` on completions, as in OpenAI's API.
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// Fields read, kept apart until every field is in: the checks that relate
/// two of them come last.
#[derive(Default)]
struct Later {
    best_of: Option<usize>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    chat_logprobs: bool,
    top_logprobs: Option<usize>,
}

impl CompletionRequest {
    pub fn parse(api: Api, body: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(ApiError::bad_request(
                "invalid_json",
                "the body must be a JSON object of request fields",
            ));
        };
        Self::from_fields(api, &fields)
    }

    fn from_fields(api: Api, fields: &Map<String, Value>) -> Result<Self, ApiError> {
        let mut req = CompletionRequest {
            api,
            input: Input::Prompts(Vec::new()),
            max_tokens: None,
            n: 1,
            echo: false,
            logprobs: None,
            // OpenAI's defaults: temperature 1, no top-k, top_p 1.
            sampling: SamplingParams {
                temperature: 1.0,
                ..SamplingParams::greedy()
            },
            seed: None,
            stop: Vec::new(),
            stream: false,
            ignore_eos: false,
            model: None,
            include_usage: false,
        };
        let mut later = Later::default();
        let mut has_input = false;
        for (name, v) in fields {
            let name = name.as_str();
            match (api, name) {
                (Api::Completions, "prompt") => {
                    req.input = Input::Prompts(prompts(v)?);
                    has_input = true;
                }
                (Api::Chat, "messages") => {
                    req.input = Input::Messages(messages(v)?);
                    has_input = true;
                }
                (_, "max_tokens") => later.max_tokens = count(name, v, 0)?,
                (Api::Chat, "max_completion_tokens") => later.max_completion_tokens = count(name, v, 1)?,
                (_, "n") => req.n = count(name, v, 1)?.unwrap_or(1),
                (Api::Completions, "best_of") => later.best_of = count(name, v, 1)?,
                (Api::Completions, "echo") => req.echo = boolean(name, v)?.unwrap_or(false),
                (Api::Completions, "logprobs") => req.logprobs = logprobs(name, v)?,
                (Api::Chat, "logprobs") => later.chat_logprobs = boolean(name, v)?.unwrap_or(false),
                (Api::Chat, "top_logprobs") => later.top_logprobs = logprobs(name, v)?,
                (_, "temperature") => {
                    if let Some(t) = in_range(name, v, ">= 0", |t| t >= 0.0)? {
                        req.sampling.temperature = unless_special(name, t, 0.0)?.unwrap_or(0.0);
                    }
                }
                (_, "top_p") => {
                    if let Some(p) = in_range(name, v, "in (0, 1]", |p| p > 0.0 && p <= 1.0)? {
                        req.sampling.top_p = unless_special(name, p, 1.0)?;
                    }
                }
                (_, "repetition_penalty") => {
                    if let Some(r) = in_range(name, v, "> 0", |r| r > 0.0)? {
                        req.sampling.repetition_penalty = unless_special(name, r, 1.0)?;
                    }
                }
                (_, "presence_penalty") => req.sampling.presence_penalty = penalty(name, v)?,
                (_, "frequency_penalty") => req.sampling.frequency_penalty = penalty(name, v)?,
                (_, "logit_bias") => req.sampling.logit_bias = logit_bias(v)?,
                (_, "top_k") => req.sampling.top_k = top_k(v)?,
                (_, "seed") => req.seed = seed(v)?,
                (_, "stop") => req.stop = stops(v)?,
                (_, "stream") => req.stream = boolean(name, v)?.unwrap_or(false),
                (_, "ignore_eos") => req.ignore_eos = boolean(name, v)?.unwrap_or(false),
                (_, "model") => req.model = string(name, v)?.map(str::to_string),
                // Accepted, and not used.
                (_, "user") => {
                    string(name, v)?;
                }
                (_, "stream_options") => req.include_usage = stream_options(v)?,
                _ => no_op_field(api, name, v)?,
            }
        }
        if !has_input {
            let name = match api {
                Api::Completions => "prompt",
                Api::Chat => "messages",
            };
            return Err(ApiError::param(
                name,
                format!("missing required parameter `{name}`"),
            ));
        }
        req.settle(later)?;
        Ok(req)
    }

    /// The checks that relate two fields, once all are read.
    fn settle(&mut self, later: Later) -> Result<(), ApiError> {
        if let Some(b) = later.best_of.filter(|&b| b != self.n) {
            return Err(ApiError::param(
                "best_of",
                format!(
                    "`best_of` is {b}, but must equal `n` ({}) or be null: this server returns every sample \
                     it draws and does not rank them",
                    self.n
                ),
            ));
        }
        // Chat's newer name wins over the deprecated one, as in vLLM.
        self.max_tokens = later.max_completion_tokens.or(later.max_tokens);
        if self.max_tokens == Some(0) && !self.echo {
            let why = match self.api {
                Api::Completions => "0 only with `echo: true` (the prompt is scored, nothing generated)",
                Api::Chat => "at least 1",
            };
            return Err(ApiError::param(
                "max_tokens",
                format!("`max_tokens` is 0, but must be {why}"),
            ));
        }
        if self.api == Api::Chat {
            match (later.chat_logprobs, later.top_logprobs) {
                (true, top) => self.logprobs = Some(top.unwrap_or(0)),
                (false, Some(_)) => {
                    return Err(ApiError::param(
                        "top_logprobs",
                        "`top_logprobs` needs `logprobs: true`",
                    ))
                }
                (false, None) => {}
            }
        }
        Ok(())
    }
}

/// The fields OpenAI clients may send, accepted only at the value that
/// changes nothing; any other field is unknown.
fn no_op_field(api: Api, name: &str, v: &Value) -> Result<(), ApiError> {
    match (api, name) {
        (Api::Completions, "suffix") => no_op(name, v, &[Value::Null], "null"),
        (Api::Chat, "tools" | "functions") => match v {
            Value::Null => Ok(()),
            Value::Array(a) if a.is_empty() => Ok(()),
            _ => Err(unsupported(name, "null or []")),
        },
        (Api::Chat, "tool_choice" | "function_call") => {
            no_op(name, v, &[Value::Null, Value::from("none")], "null or \"none\"")
        }
        (Api::Chat, "response_format") => no_op(
            name,
            v,
            &[Value::Null, serde_json::json!({"type": "text"})],
            "null or {\"type\": \"text\"}",
        ),
        _ => Err(ApiError::param(
            name,
            format!("unknown parameter `{name}`: this server does not support it"),
        )),
    }
}

/// `prompt`: a string, an array of token ids, or a batch: an array of
/// strings or of token-id arrays.
fn prompts(v: &Value) -> Result<Vec<Prompt>, ApiError> {
    const WHAT: &str =
        "`prompt` must be a string, an array of token ids, an array of strings or an array of \
                        token-id arrays";
    let Value::Array(items) = v else {
        return match v {
            Value::String(s) => Ok(vec![Prompt::Text(s.clone())]),
            _ => Err(ApiError::param("prompt", WHAT)),
        };
    };
    match items.first() {
        None => Err(ApiError::param(
            "prompt",
            "`prompt` is an empty array: at least one token id or prompt is needed",
        )),
        Some(Value::String(_)) => items
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Value::String(s) => Ok(Prompt::Text(s.clone())),
                _ => Err(ApiError::param(
                    "prompt",
                    format!(
                        "`prompt[{i}]` is {s}, not a string: a batch is all strings or all token-id arrays"
                    ),
                )),
            })
            .collect(),
        Some(Value::Array(_)) => items
            .iter()
            .enumerate()
            .map(|(i, ids)| match ids {
                Value::Array(a) if !a.is_empty() => {
                    token_ids(a, "prompt", &format!("prompt[{i}]")).map(Prompt::Ids)
                }
                Value::Array(_) => Err(ApiError::param(
                    "prompt",
                    format!("`prompt[{i}]` is an empty array: at least one token id is needed"),
                )),
                _ => Err(ApiError::param(
                    "prompt",
                    format!(
                        "`prompt[{i}]` is {ids}, not an array of token ids: a batch is all strings or all \
                             token-id arrays"
                    ),
                )),
            })
            .collect(),
        Some(_) => Ok(vec![Prompt::Ids(token_ids(items, "prompt", "prompt")?)]),
    }
}

/// Token ids: non-negative integers that fit 32 bits (the vocabulary is the
/// door's to check); a refusal names `param` and the item's place, `at[i]`.
/// Also `/tokenize`'s reader of `tokens`.
pub(crate) fn token_ids(items: &[Value], param: &str, at: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, t)| {
            t.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
                ApiError::param(
                    param,
                    format!("`{at}[{i}]` is {t}, not a token id (a non-negative integer)"),
                )
            })
        })
        .collect()
}

/// `messages`: a non-empty array of `{role, content}`, `role` one of
/// `system`, `user`, `assistant`, `content` a string or an array of text
/// parts (`{"type": "text", "text": ...}`).
fn messages(v: &Value) -> Result<Vec<Message>, ApiError> {
    let bad = |msg: String| ApiError::param("messages", msg);
    let Value::Array(items) = v else {
        return Err(bad(
            "`messages` must be an array of {role, content} objects".into()
        ));
    };
    if items.is_empty() {
        return Err(bad("`messages` is empty: at least one message is needed".into()));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(fields) = m else {
                return Err(bad(format!("`messages[{i}]` must be an object with `role` and `content`")));
            };
            if let Some(k) = fields.keys().find(|k| !matches!(k.as_str(), "role" | "content")) {
                return Err(bad(format!(
                    "`messages[{i}].{k}` is not supported: a message has only `role` and `content`"
                )));
            }
            let role = match fields.get("role").and_then(Value::as_str) {
                Some(r) => Role::ALL
                    .into_iter()
                    .find(|x| x.name() == r)
                    .ok_or_else(|| {
                        bad(format!(
                            "`messages[{i}].role` is {r:?}: only \"system\", \"user\" and \"assistant\" are supported"
                        ))
                    })?,
                None => return Err(bad(format!("`messages[{i}].role` must be a string"))),
            };
            let content = match fields.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => text_parts(parts, i)?,
                _ => {
                    return Err(bad(format!(
                        "`messages[{i}].content` must be a string or an array of text parts"
                    )))
                }
            };
            Ok(Message { role, content })
        })
        .collect()
}

/// The texts of a message's content parts, joined by newlines.
fn text_parts(parts: &[Value], i: usize) -> Result<String, ApiError> {
    let texts = parts
        .iter()
        .enumerate()
        .map(
            |(j, p)| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                (Some("text"), _) => Err(format!("`messages[{i}].content[{j}].text` must be a string")),
                (Some(other), _) => Err(format!(
                    "`messages[{i}].content[{j}]` is of type {other:?}: only text parts are supported"
                )),
                (None, _) => Err(format!(
                    "`messages[{i}].content[{j}]` must be an object with `type: \"text\"` and `text`"
                )),
            },
        )
        .collect::<Result<Vec<&str>, String>>()
        .map_err(|m| ApiError::param("messages", m))?;
    Ok(texts.join("\n"))
}

/// `logprobs` (completions) or `top_logprobs` (chat): 0 to
/// [`MAX_LOGPROBS`] alternatives, or null.
fn logprobs(name: &str, v: &Value) -> Result<Option<usize>, ApiError> {
    match integer(name, v)? {
        None => Ok(None),
        Some(n) if (0..=MAX_LOGPROBS as i128).contains(&n) => Ok(Some(n as usize)),
        Some(n) => Err(ApiError::param(
            name,
            format!("`{name}` must be between 0 and {MAX_LOGPROBS}, got {n}"),
        )),
    }
}

/// `presence_penalty`, `frequency_penalty`: in [-2, 2] (OpenAI's range); null is 0.
fn penalty(name: &str, v: &Value) -> Result<f32, ApiError> {
    Ok(in_range(name, v, "in [-2, 2]", |x| (-2.0..=2.0).contains(&x))?.map_or(0.0, |x| x as f32))
}

/// `logit_bias`: token id (a decimal string, as JSON keys are) → bias in
/// [-100, 100]. Whether each id is in the vocabulary is the door's check.
fn logit_bias(v: &Value) -> Result<Vec<(u32, f32)>, ApiError> {
    let name = "logit_bias";
    let m = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Object(m) => m,
        _ => {
            return Err(ApiError::param(
                name,
                "`logit_bias` must be an object of token id to bias",
            ))
        }
    };
    m.iter()
        .map(|(key, bias)| {
            // Only the canonical decimal form, so no id is given twice ("7", "07").
            let id = key
                .parse::<u32>()
                .ok()
                .filter(|id| id.to_string() == *key)
                .ok_or_else(|| {
                    ApiError::param(
                        name,
                        format!("`logit_bias` key {key:?} is not a token id (a non-negative integer)"),
                    )
                })?;
            let b = match bias.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => b as f32,
                _ => {
                    return Err(ApiError::param(
                        name,
                        format!("`logit_bias[\"{key}\"]` must be a number in [-100, 100], got {bias}"),
                    ))
                }
            };
            Ok((id, b))
        })
        .collect()
}

fn stops(v: &Value) -> Result<Vec<String>, ApiError> {
    let list = match v {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::param("stop", "`stop` must be a string or an array of strings"))
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::param(
                "stop",
                "`stop` must be a string or an array of strings",
            ))
        }
    };
    if list.len() > MAX_STOPS {
        return Err(ApiError::param(
            "stop",
            format!(
                "`stop` has {} sequences; at most {MAX_STOPS} are allowed",
                list.len()
            ),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "`stop` sequences must not be empty"));
    }
    Ok(list)
}

fn stream_options(v: &Value) -> Result<bool, ApiError> {
    let Value::Object(m) = v else {
        return if v.is_null() {
            Ok(false)
        } else {
            Err(ApiError::param(
                "stream_options",
                "`stream_options` must be an object",
            ))
        };
    };
    let mut include_usage = false;
    for (k, x) in m {
        match (k.as_str(), x) {
            ("include_usage", Value::Bool(b)) => include_usage = *b,
            ("include_usage", Value::Null) => {}
            _ => {
                return Err(ApiError::param(
                    "stream_options",
                    format!("unsupported `stream_options.{k}`: only `include_usage` (a boolean) is accepted"),
                ))
            }
        }
    }
    Ok(include_usage)
}

/// `x` (finite and > 0 in f64) as the 32-bit float sampling computes in:
/// a value that overflows to infinity or rounds to zero (or to a subnormal,
/// which a division by overflows) would not mean what was asked, so it is
/// refused by name.
fn as_f32(name: &str, x: f64) -> Result<f32, ApiError> {
    let y = x as f32;
    if y.is_normal() {
        Ok(y)
    } else {
        Err(ApiError::param(
            name,
            format!(
                "`{name}` is {x}, which 32-bit floats (what sampling computes in) cannot hold: \
                 it must be between {:e} and {:e}",
                f32::MIN_POSITIVE,
                f32::MAX
            ),
        ))
    }
}

fn unsupported(name: &str, accepted: &str) -> ApiError {
    ApiError::param(
        name,
        format!("`{name}` is not supported by this server: only {accepted} (the default) is accepted"),
    )
}

fn no_op(name: &str, v: &Value, accepted: &[Value], shown: &str) -> Result<(), ApiError> {
    if accepted.contains(v) {
        Ok(())
    } else {
        Err(unsupported(name, shown))
    }
}

/// `v` as a `T` (`None` for null), or a refusal saying what `name` must be.
fn typed<'v, T>(
    name: &str,
    v: &'v Value,
    must_be: &str,
    get: impl FnOnce(&'v Value) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    if v.is_null() {
        return Ok(None);
    }
    get(v)
        .map(Some)
        .ok_or_else(|| ApiError::param(name, format!("`{name}` must be {must_be}, got {v}")))
}

fn number(name: &str, v: &Value) -> Result<Option<f64>, ApiError> {
    typed(name, v, "a number", Value::as_f64)
}

fn integer(name: &str, v: &Value) -> Result<Option<i128>, ApiError> {
    typed(name, v, "an integer", |v| {
        v.as_i64().map(i128::from).or_else(|| v.as_u64().map(i128::from))
    })
}

fn boolean(name: &str, v: &Value) -> Result<Option<bool>, ApiError> {
    typed(name, v, "true or false", Value::as_bool)
}

/// A count of at least `least` (`None` for null).
fn count(name: &str, v: &Value, least: usize) -> Result<Option<usize>, ApiError> {
    match integer(name, v)? {
        None => Ok(None),
        Some(n) if n >= least as i128 => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
        Some(_) => Err(ApiError::param(
            name,
            format!("`{name}` must be at least {least}, got {v}"),
        )),
    }
}

/// A sampling number (`None` for null) within its range, checked on the
/// f64 the client sent (see the module doc for why here).
fn in_range(name: &str, v: &Value, must_be: &str, holds: fn(f64) -> bool) -> Result<Option<f64>, ApiError> {
    match number(name, v)? {
        Some(x) if !(x.is_finite() && holds(x)) => Err(ApiError::param(
            name,
            format!("`{name}` must be {must_be}, got {x}"),
        )),
        x => Ok(x),
    }
}

/// `x` as the f32 sampling computes in ([`as_f32`]), or `None` when it is
/// `special`: the value that turns the parameter off (`top_p` 1, a
/// repetition penalty of 1) or makes sampling greedy (temperature 0), which
/// is kept exactly.
fn unless_special(name: &str, x: f64, special: f64) -> Result<Option<f32>, ApiError> {
    if x == special {
        Ok(None)
    } else {
        as_f32(name, x).map(Some)
    }
}

/// At least 1, or -1 (or null) for no limit.
fn top_k(v: &Value) -> Result<Option<usize>, ApiError> {
    match integer("top_k", v)? {
        None | Some(-1) => Ok(None),
        Some(k) if k >= 1 => Ok(Some(usize::try_from(k).unwrap_or(usize::MAX))),
        Some(k) => Err(ApiError::param(
            "top_k",
            format!("`top_k` must be at least 1, or -1 for no limit; got {k}"),
        )),
    }
}

fn seed(v: &Value) -> Result<Option<u64>, ApiError> {
    integer("seed", v)?
        .map(|s| {
            u64::try_from(s).map_err(|_| {
                ApiError::param("seed", format!("`seed` must be a non-negative integer, got {s}"))
            })
        })
        .transpose()
}

fn string<'v>(name: &str, v: &'v Value) -> Result<Option<&'v str>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        _ => Err(ApiError::param(name, format!("`{name}` must be a string"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<CompletionRequest, ApiError> {
        CompletionRequest::parse(Api::Completions, body.as_bytes())
    }

    fn chat(body: &str) -> Result<CompletionRequest, ApiError> {
        CompletionRequest::parse(Api::Chat, body.as_bytes())
    }

    #[test]
    fn defaults_and_fields() {
        let r = parse(r#"{"prompt": "hi"}"#).unwrap();
        assert_eq!((r.max_tokens, r.n, r.echo, r.logprobs), (None, 1, false, None));
        assert_eq!(r.sampling.temperature, 1.0);
        let r = parse(
            r#"{"prompt": [1, 2], "max_tokens": 3, "temperature": 0, "top_k": -1, "top_p": 1,
                "stop": "x", "stream": true, "n": 1, "echo": false, "logprobs": null, "best_of": null,
                "presence_penalty": 0, "frequency_penalty": null, "logit_bias": {}, "suffix": null,
                "stream_options": {"include_usage": true}, "user": "u", "seed": 7}"#,
        )
        .unwrap();
        assert_eq!(r.input, Input::Prompts(vec![Prompt::Ids(vec![1, 2])]));
        assert_eq!((r.max_tokens, r.seed, r.stream), (Some(3), Some(7), true));
        assert_eq!(r.stop, vec!["x".to_string()]);
        assert_eq!(r.sampling, SamplingParams::greedy());
        assert!(r.include_usage);
        assert!(
            !parse(r#"{"prompt": "a", "stream_options": {"include_usage": false}}"#)
                .unwrap()
                .include_usage
        );
        // Small but normal 32-bit values are kept as given.
        let r = parse(r#"{"prompt": "a", "temperature": 1e-30, "top_p": 1e-30}"#).unwrap();
        assert_eq!((r.sampling.temperature, r.sampling.top_p), (1e-30, Some(1e-30)));
    }

    #[test]
    fn the_fields_of_issue_33() {
        let r = parse(
            r#"{"prompt": "a", "n": 3, "best_of": 3, "echo": true, "logprobs": 5, "max_tokens": 0,
                "presence_penalty": -2, "frequency_penalty": 1.5, "logit_bias": {"50256": -100, "7": 2.5}}"#,
        )
        .unwrap();
        assert_eq!(
            (r.n, r.echo, r.logprobs, r.max_tokens),
            (3, true, Some(5), Some(0))
        );
        assert_eq!(
            (r.sampling.presence_penalty, r.sampling.frequency_penalty),
            (-2.0, 1.5)
        );
        // Keys in the body's (string) order.
        assert_eq!(r.sampling.logit_bias, vec![(50256, -100.0), (7, 2.5)]);
        // Batches: strings, or token-id arrays.
        let r = parse(r#"{"prompt": ["a", ""]}"#).unwrap();
        assert_eq!(
            r.input,
            Input::Prompts(vec![Prompt::Text("a".into()), Prompt::Text(String::new())])
        );
        let r = parse(r#"{"prompt": [[1, 2], [3]]}"#).unwrap();
        assert_eq!(
            r.input,
            Input::Prompts(vec![Prompt::Ids(vec![1, 2]), Prompt::Ids(vec![3])])
        );
        assert_eq!(
            parse(r#"{"prompt": "a", "logprobs": 0}"#).unwrap().logprobs,
            Some(0)
        );
        assert_eq!(
            parse(r#"{"prompt": "a", "logprobs": 20}"#).unwrap().logprobs,
            Some(20)
        );
    }

    #[test]
    fn chat_fields() {
        let r = chat(
            r#"{"messages": [{"role": "system", "content": "s"},
                             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                "logprobs": true, "top_logprobs": 2, "max_completion_tokens": 5, "max_tokens": 9,
                "tools": [], "tool_choice": "none", "response_format": {"type": "text"}}"#,
        )
        .unwrap();
        assert_eq!(
            r.input,
            Input::Messages(vec![
                Message {
                    role: Role::System,
                    content: "s".into()
                },
                Message {
                    role: Role::User,
                    content: "a\nb".into()
                },
            ])
        );
        // The newer name wins.
        assert_eq!((r.logprobs, r.max_tokens), (Some(2), Some(5)));
        let r = chat(r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": true}"#).unwrap();
        assert_eq!((r.logprobs, r.max_tokens), (Some(0), None));
        let r = chat(r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": false}"#).unwrap();
        assert_eq!(r.logprobs, None);
    }

    #[test]
    fn refusals_name_the_parameter() {
        for (body, param) in [
            (r#"{"prompt": "a", "max_tokens": 0}"#, "max_tokens"),
            (r#"{"prompt": "a", "max_tokens": 0, "echo": false}"#, "max_tokens"),
            (r#"{"prompt": "a", "max_tokens": 1.5}"#, "max_tokens"),
            (r#"{"prompt": "a", "temperature": -1}"#, "temperature"),
            (r#"{"prompt": "a", "top_p": 0}"#, "top_p"),
            (r#"{"prompt": "a", "top_k": 0}"#, "top_k"),
            (r#"{"prompt": "a", "n": 0}"#, "n"),
            (r#"{"prompt": "a", "n": -1}"#, "n"),
            (r#"{"prompt": "a", "n": 2, "best_of": 3}"#, "best_of"),
            (r#"{"prompt": "a", "best_of": 2}"#, "best_of"),
            (r#"{"prompt": "a", "echo": 1}"#, "echo"),
            (r#"{"prompt": "a", "logprobs": 21}"#, "logprobs"),
            (r#"{"prompt": "a", "logprobs": -1}"#, "logprobs"),
            (r#"{"prompt": "a", "logprobs": true}"#, "logprobs"),
            (r#"{"prompt": "a", "presence_penalty": 2.5}"#, "presence_penalty"),
            (r#"{"prompt": "a", "frequency_penalty": -3}"#, "frequency_penalty"),
            (r#"{"prompt": "a", "logit_bias": {"1": 1000}}"#, "logit_bias"),
            (r#"{"prompt": "a", "logit_bias": {"x": 1}}"#, "logit_bias"),
            (r#"{"prompt": "a", "logit_bias": {"01": 1}}"#, "logit_bias"),
            (r#"{"prompt": "a", "logit_bias": {"-1": 1}}"#, "logit_bias"),
            (r#"{"prompt": "a", "logit_bias": {"1": "a"}}"#, "logit_bias"),
            (r#"{"prompt": "a", "logit_bias": [1]}"#, "logit_bias"),
            (r#"{"prompt": "a", "suffix": "b"}"#, "suffix"),
            (r#"{"prompt": "a", "stop": ["", "b"]}"#, "stop"),
            (r#"{"prompt": "a", "frobnicate": 1}"#, "frobnicate"),
            (r#"{"prompt": [1, -2]}"#, "prompt"),
            (r#"{"prompt": []}"#, "prompt"),
            (r#"{"prompt": [[1], []]}"#, "prompt"),
            (r#"{"prompt": ["a", 1]}"#, "prompt"),
            (r#"{"prompt": [[1], "a"]}"#, "prompt"),
            (r#"{"prompt": [1, "a"]}"#, "prompt"),
            (r#"{"prompt": {"a": 1}}"#, "prompt"),
            (r#"{"max_tokens": 2}"#, "prompt"),
            (r#"{"prompt": "a", "temperature": 1e39}"#, "temperature"),
            (r#"{"prompt": "a", "temperature": 1e-50}"#, "temperature"),
            (r#"{"prompt": "a", "top_p": 1e-50}"#, "top_p"),
            (
                r#"{"prompt": "a", "repetition_penalty": 1e-300}"#,
                "repetition_penalty",
            ),
            (
                r#"{"prompt": "a", "repetition_penalty": 1e39}"#,
                "repetition_penalty",
            ),
            (
                r#"{"prompt": "a", "stream_options": {"include_usage": 1}}"#,
                "stream_options",
            ),
            // Chat's own fields are not completions', and the other way round.
            (r#"{"prompt": "a", "messages": []}"#, "messages"),
            (r#"{"prompt": "a", "top_logprobs": 2}"#, "top_logprobs"),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert!(e.message.contains(param), "{body}: {}", e.message);
        }
        assert_eq!(parse("{not json").unwrap_err().code, "invalid_json");
        assert_eq!(parse("[1]").unwrap_err().code, "invalid_json");
    }

    #[test]
    fn chat_refusals_name_the_parameter() {
        let user = r#""messages": [{"role": "user", "content": "x"}]"#;
        for (rest, param) in [
            ("", "messages"),
            (r#""messages": []"#, "messages"),
            (r#""messages": "hi""#, "messages"),
            (r#""messages": [{"role": "tool", "content": "x"}]"#, "messages"),
            (r#""messages": [{"role": "user"}]"#, "messages"),
            (r#""messages": [{"content": "x"}]"#, "messages"),
            (r#""messages": [{"role": "user", "content": null}]"#, "messages"),
            (
                r#""messages": [{"role": "user", "content": "x", "name": "n"}]"#,
                "messages",
            ),
            (
                r#""messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]"#,
                "messages",
            ),
            (&format!(r#"{user}, "top_logprobs": 2"#), "top_logprobs"),
            (
                &format!(r#"{user}, "logprobs": true, "top_logprobs": 21"#),
                "top_logprobs",
            ),
            (&format!(r#"{user}, "logprobs": 3"#), "logprobs"),
            (&format!(r#"{user}, "max_tokens": 0"#), "max_tokens"),
            (
                &format!(r#"{user}, "max_completion_tokens": 0"#),
                "max_completion_tokens",
            ),
            (&format!(r#"{user}, "n": 0"#), "n"),
            (&format!(r#"{user}, "echo": true"#), "echo"),
            (&format!(r#"{user}, "prompt": "a""#), "prompt"),
            (&format!(r#"{user}, "tools": [{{}}]"#), "tools"),
            (
                &format!(r#"{user}, "response_format": {{"type": "json_object"}}"#),
                "response_format",
            ),
            (&format!(r#"{user}, "logit_bias": {{"5": -101}}"#), "logit_bias"),
        ] {
            let body = format!("{{{rest}}}");
            let e = chat(&body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert!(e.message.contains(param), "{body}: {}", e.message);
        }
    }

    /// The parser's own words, which clients (and the tests over HTTP) see.
    #[test]
    fn refusals_word_for_word() {
        for (body, message) in [
            (r#"{"prompt": "a", "temperature": -0.5}"#, "`temperature` must be >= 0, got -0.5"),
            (r#"{"prompt": "a", "top_p": 1.5}"#, "`top_p` must be in (0, 1], got 1.5"),
            (
                r#"{"prompt": "a", "repetition_penalty": 0}"#,
                "`repetition_penalty` must be > 0, got 0",
            ),
            (
                r#"{"prompt": "a", "top_k": 0}"#,
                "`top_k` must be at least 1, or -1 for no limit; got 0",
            ),
            (r#"{"prompt": "a", "max_tokens": -3}"#, "`max_tokens` must be at least 0, got -3"),
            (
                r#"{"prompt": "a", "max_tokens": 0}"#,
                "`max_tokens` is 0, but must be 0 only with `echo: true` (the prompt is scored, nothing generated)",
            ),
            (r#"{"prompt": "a", "n": 0}"#, "`n` must be at least 1, got 0"),
            (
                r#"{"prompt": "a", "best_of": 2}"#,
                "`best_of` is 2, but must equal `n` (1) or be null: this server returns every sample it draws and \
                 does not rank them",
            ),
            (r#"{"prompt": "a", "logprobs": 21}"#, "`logprobs` must be between 0 and 20, got 21"),
            (
                r#"{"prompt": "a", "presence_penalty": 2.5}"#,
                "`presence_penalty` must be in [-2, 2], got 2.5",
            ),
            (
                r#"{"prompt": "a", "logit_bias": {"1": 1000}}"#,
                "`logit_bias[\"1\"]` must be a number in [-100, 100], got 1000",
            ),
            (
                r#"{"prompt": "a", "logit_bias": {"1.5": 1}}"#,
                "`logit_bias` key \"1.5\" is not a token id (a non-negative integer)",
            ),
            (r#"{"prompt": "a", "seed": -1}"#, "`seed` must be a non-negative integer, got -1"),
            (r#"{"prompt": "a", "model": 1}"#, "`model` must be a string"),
            (r#"{"prompt": "a", "user": 1}"#, "`user` must be a string"),
            (
                r#"{"prompt": "a", "suffix": "x"}"#,
                "`suffix` is not supported by this server: only null (the default) is accepted",
            ),
            (
                r#"{"prompt": "a", "temperature": 1e39}"#,
                "`temperature` is 1000000000000000000000000000000000000000, which 32-bit floats (what sampling \
                 computes in) cannot hold: it must be between 1.1754944e-38 and 3.4028235e38",
            ),
            // Faults are found in the body's (alphabetical) field order.
            (r#"{"top_p": 0, "prompt": "a", "temperature": -1}"#, "`temperature` must be >= 0, got -1"),
        ] {
            assert_eq!(parse(body).unwrap_err().message, message, "{body}");
        }
    }
}
