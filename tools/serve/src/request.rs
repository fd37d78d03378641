//! `POST /v1/completions` bodies: parsed field by field from JSON, so every
//! refusal names its parameter.
//!
//! Fields OpenAI clients send by default are accepted when their value is
//! the no-op one (`n: 1`, `echo: false`, `logprobs: null`, ...); any other
//! value, and any field we do not know, is a 400 naming it.
//!
//! What the request asks of the model (token ids, lengths against the
//! context window) is the engine's door's to check (`gpt2::Request::prepare`,
//! rendered by `completions::refused`). The ranges of `max_tokens` and the
//! sampling values are checked here, though the door checks them again:
//! here they are checked in the body's field order, before the model is
//! asked for (so a body gets the same answer while the model loads, or
//! with a wrong `model`), on the f64 the client sent, before rounding to the
//! engine's f32 could carry a value across a bound (`top_p` 1.00000001
//! becomes 1, `temperature` 1e39 infinity), and they include the values no
//! `usize` can carry to the engine (a negative `max_tokens` or `top_k`).

use serde_json::{Map, Value};

use super::error::ApiError;
use gpt2::sampling::SamplingParams;

/// OpenAI's limit on stop sequences.
pub const MAX_STOPS: usize = 4;

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// A validated completion request (lengths are checked against the model
/// later, once its tokenizer and context window are known).
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub max_tokens: usize,
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

/// The default of `max_tokens`, as in OpenAI's API.
pub const DEFAULT_MAX_TOKENS: usize = 16;

impl CompletionRequest {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(ApiError::bad_request(
                "invalid_json",
                "the body must be a JSON object of request fields",
            ));
        };
        Self::from_fields(&fields)
    }

    fn from_fields(fields: &Map<String, Value>) -> Result<Self, ApiError> {
        let mut req = CompletionRequest {
            prompt: Prompt::Text(String::new()),
            max_tokens: DEFAULT_MAX_TOKENS,
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
        let mut has_prompt = false;
        for (name, v) in fields {
            let name = name.as_str();
            match name {
                "prompt" => {
                    req.prompt = prompt(v)?;
                    has_prompt = true;
                }
                "max_tokens" => {
                    if !v.is_null() {
                        req.max_tokens = positive(name, v)?;
                    }
                }
                "temperature" => {
                    if let Some(t) = in_range(name, v, ">= 0", |t| t >= 0.0)? {
                        req.sampling.temperature = unless_special(name, t, 0.0)?.unwrap_or(0.0);
                    }
                }
                "top_p" => {
                    if let Some(p) = in_range(name, v, "in (0, 1]", |p| p > 0.0 && p <= 1.0)? {
                        req.sampling.top_p = unless_special(name, p, 1.0)?;
                    }
                }
                "repetition_penalty" => {
                    if let Some(r) = in_range(name, v, "> 0", |r| r > 0.0)? {
                        req.sampling.repetition_penalty = unless_special(name, r, 1.0)?;
                    }
                }
                "top_k" => req.sampling.top_k = top_k(v)?,
                "seed" => req.seed = seed(v)?,
                "stop" => req.stop = stops(v)?,
                "stream" => req.stream = boolean(name, v)?.unwrap_or(false),
                "ignore_eos" => req.ignore_eos = boolean(name, v)?.unwrap_or(false),
                "model" => req.model = string(name, v)?.map(str::to_string),
                // Accepted, and not used.
                "user" => {
                    string(name, v)?;
                }
                "stream_options" => req.include_usage = stream_options(v)?,
                _ => no_op_field(name, v)?,
            }
        }
        if !has_prompt {
            return Err(ApiError::param("prompt", "missing required parameter `prompt`"));
        }
        Ok(req)
    }
}

/// The fields OpenAI clients send by default, accepted only at the value
/// that changes nothing; any other field is unknown.
fn no_op_field(name: &str, v: &Value) -> Result<(), ApiError> {
    match name {
        "n" | "best_of" => no_op(name, v, &[Value::Null, Value::from(1)], "1"),
        "echo" => no_op(name, v, &[Value::Null, Value::Bool(false)], "false"),
        "logprobs" | "suffix" => no_op(name, v, &[Value::Null], "null"),
        "presence_penalty" | "frequency_penalty" => match number(name, v)? {
            Some(x) if x != 0.0 => Err(unsupported(name, "0")),
            _ => Ok(()),
        },
        "logit_bias" => match v {
            Value::Null => Ok(()),
            Value::Object(m) if m.is_empty() => Ok(()),
            _ => Err(unsupported(name, "null or {}")),
        },
        _ => Err(ApiError::param(
            name,
            format!("unknown parameter `{name}`: this server does not support it"),
        )),
    }
}

fn prompt(v: &Value) -> Result<Prompt, ApiError> {
    const WHAT: &str = "`prompt` must be a string or an array of token ids";
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(items) => match items.first() {
            None => Err(ApiError::param(
                "prompt",
                "`prompt` is an empty array: at least one token id is needed",
            )),
            Some(Value::String(_)) if items.len() == 1 => prompt(&items[0]),
            Some(Value::String(_)) | Some(Value::Array(_)) => Err(ApiError::param(
                "prompt",
                "batched prompts (an array of prompts) are not supported: send one prompt per request",
            )),
            Some(_) => items
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
                        ApiError::param(
                            "prompt",
                            format!("`prompt[{i}]` is {t}, not a token id (a non-negative integer)"),
                        )
                    })
                })
                .collect::<Result<Vec<u32>, _>>()
                .map(Prompt::Ids),
        },
        _ => Err(ApiError::param("prompt", WHAT)),
    }
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

fn positive(name: &str, v: &Value) -> Result<usize, ApiError> {
    match integer(name, v)? {
        Some(n) if n >= 1 => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        _ => Err(ApiError::param(
            name,
            format!("`{name}` must be at least 1, got {v}"),
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
        CompletionRequest::parse(body.as_bytes())
    }

    #[test]
    fn defaults_and_fields() {
        let r = parse(r#"{"prompt": "hi"}"#).unwrap();
        assert_eq!(r.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(r.sampling.temperature, 1.0);
        let r = parse(
            r#"{"prompt": [1, 2], "max_tokens": 3, "temperature": 0, "top_k": -1, "top_p": 1,
                "stop": "x", "stream": true, "n": 1, "echo": false, "logprobs": null,
                "stream_options": {"include_usage": true}, "user": "u", "seed": 7}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, Prompt::Ids(vec![1, 2]));
        assert_eq!((r.max_tokens, r.seed, r.stream), (3, Some(7), true));
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
    fn refusals_name_the_parameter() {
        for (body, param) in [
            (r#"{"prompt": "a", "max_tokens": 0}"#, "max_tokens"),
            (r#"{"prompt": "a", "max_tokens": 1.5}"#, "max_tokens"),
            (r#"{"prompt": "a", "temperature": -1}"#, "temperature"),
            (r#"{"prompt": "a", "top_p": 0}"#, "top_p"),
            (r#"{"prompt": "a", "top_k": 0}"#, "top_k"),
            (r#"{"prompt": "a", "n": 2}"#, "n"),
            (r#"{"prompt": "a", "echo": true}"#, "echo"),
            (r#"{"prompt": "a", "stop": ["", "b"]}"#, "stop"),
            (r#"{"prompt": "a", "frobnicate": 1}"#, "frobnicate"),
            (r#"{"prompt": [1, -2]}"#, "prompt"),
            (r#"{"prompt": ["a", "b"]}"#, "prompt"),
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
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert!(e.message.contains(param), "{body}: {}", e.message);
        }
        assert_eq!(parse("{not json").unwrap_err().code, "invalid_json");
        assert_eq!(parse("[1]").unwrap_err().code, "invalid_json");
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
            (r#"{"prompt": "a", "max_tokens": -3}"#, "`max_tokens` must be at least 1, got -3"),
            (r#"{"prompt": "a", "seed": -1}"#, "`seed` must be a non-negative integer, got -1"),
            (r#"{"prompt": "a", "model": 1}"#, "`model` must be a string"),
            (r#"{"prompt": "a", "user": 1}"#, "`user` must be a string"),
            (
                r#"{"prompt": "a", "presence_penalty": 0.5}"#,
                "`presence_penalty` is not supported by this server: only 0 (the default) is accepted",
            ),
            (
                r#"{"prompt": "a", "logit_bias": {"1": 2}}"#,
                "`logit_bias` is not supported by this server: only null or {} (the default) is accepted",
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
