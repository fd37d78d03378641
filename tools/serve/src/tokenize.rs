//! `POST /tokenize` and `POST /detokenize`, in llama-server's shapes:
//! `{"content": text, "with_pieces": bool}` → `{"tokens": [id, ...]}` (or
//! `[{"id", "piece"}, ...]`, a piece being its text, or its bytes where they
//! are not UTF-8 alone), and `{"tokens": [id, ...]}` → `{"content": text}`.
//!
//! The bodies are read as completions' are (the same limit, timeout and JSON
//! content type), parsed field by field (an unknown field is a 400 naming
//! it) and tokenized on a blocking thread: a body of a megabyte of text is
//! CPU work the runtime's threads should not do.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::completions::read_body;
use super::error::ApiError;
use super::request;
use super::state::{App, Engine};
use gpt2::request::check_token_ids;
use gpt2::Invalid;

pub async fn tokenize(State(app): State<Arc<App>>, req: Request) -> Response {
    answer(app, req, tokenize_body).await
}

pub async fn detokenize(State(app): State<Arc<App>>, req: Request) -> Response {
    answer(app, req, detokenize_body).await
}

/// Reads the body, then answers it with `work` on a blocking thread.
async fn answer(app: Arc<App>, req: Request, work: fn(&App, &[u8]) -> Result<Value, ApiError>) -> Response {
    let body = match read_body(&app, req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match tokio::task::spawn_blocking(move || work(&app, &body)).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("the request failed: {e}"),
        )
        .into_response(),
    }
}

/// `/tokenize`: `content` as token ids, with their pieces if asked.
fn tokenize_body(app: &App, body: &[u8]) -> Result<Value, ApiError> {
    let fields = object(body)?;
    let (mut content, mut with_pieces) = (None, false);
    for (name, v) in &fields {
        let name = name.as_str();
        match name {
            "content" => {
                content = Some(
                    v.as_str()
                        .ok_or_else(|| ApiError::param(name, "`content` must be a string"))?,
                )
            }
            "with_pieces" => with_pieces = boolean(name, v)?.unwrap_or(false),
            // GPT-2 has no beginning-of-text token to add: either value means the same.
            "add_special" => {
                boolean(name, v)?;
            }
            // `<|endoftext|>` in the text is always read as the special token.
            "parse_special" => {
                if boolean(name, v)? == Some(false) {
                    return Err(ApiError::param(
                        name,
                        "`parse_special: false` is not supported: `<|endoftext|>` in `content` is always \
                         the special token",
                    ));
                }
            }
            "model" => {}
            _ => return Err(unknown(name)),
        }
    }
    let content =
        content.ok_or_else(|| ApiError::param("content", "missing required parameter `content`"))?;
    let engine = engine_for(app, &fields)?;
    let tok = &engine.tokenizer;
    let ids = tok
        .encode(content)
        .map_err(|e| ApiError::param("content", format!("cannot tokenize `content`: {e}")))?;
    if !with_pieces {
        return Ok(json!({ "tokens": ids }));
    }
    let pieces = ids
        .iter()
        .map(|&id| {
            let bytes = tok.token_bytes(id).map_err(internal)?;
            // As llama-server: the text, or the bytes where they are not UTF-8 alone.
            let piece = match String::from_utf8(bytes) {
                Ok(text) => json!(text),
                Err(e) => json!(e.into_bytes()),
            };
            Ok(json!({ "id": id, "piece": piece }))
        })
        .collect::<Result<Vec<Value>, ApiError>>()?;
    Ok(json!({ "tokens": pieces }))
}

/// `/detokenize`: `tokens` as text (a character they hold only part of
/// becomes U+FFFD).
fn detokenize_body(app: &App, body: &[u8]) -> Result<Value, ApiError> {
    let fields = object(body)?;
    let mut tokens = None;
    for (name, v) in &fields {
        match name.as_str() {
            "tokens" => tokens = Some(token_ids(v)?),
            "model" => {}
            other => return Err(unknown(other)),
        }
    }
    let tokens = tokens.ok_or_else(|| ApiError::param("tokens", "missing required parameter `tokens`"))?;
    let engine = engine_for(app, &fields)?;
    let tok = &engine.tokenizer;
    if let Err(Invalid::TokenId {
        index,
        id,
        vocab_size,
    }) = check_token_ids(tokens.iter().copied(), tok.vocab_size())
    {
        return Err(ApiError::param(
            "tokens",
            format!("`tokens[{index}]` is token id {id}, past the vocabulary of {vocab_size} tokens (0..{vocab_size})"),
        ));
    }
    let content = tok.decode(&tokens).map_err(internal)?;
    Ok(json!({ "content": content }))
}

/// The body as a JSON object of fields.
fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object of request fields",
        )),
        Err(e) => Err(ApiError::bad_request(
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

/// The engine, once `model` (if given) names the one it serves.
fn engine_for(app: &App, fields: &Map<String, Value>) -> Result<Arc<Engine>, ApiError> {
    let asked = match fields.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m),
        Some(_) => return Err(ApiError::param("model", "`model` must be a string")),
    };
    let engine = app.engine()?;
    match asked {
        Some(m) if *m != engine.model_id => Err(ApiError::model_not_found(m, &engine.model_id)),
        _ => Ok(engine),
    }
}

fn token_ids(v: &Value) -> Result<Vec<u32>, ApiError> {
    let items = v
        .as_array()
        .ok_or_else(|| ApiError::param("tokens", "`tokens` must be an array of token ids"))?;
    request::token_ids(items, "tokens", "tokens")
}

fn boolean(name: &str, v: &Value) -> Result<Option<bool>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        _ => Err(ApiError::param(
            name,
            format!("`{name}` must be true or false, got {v}"),
        )),
    }
}

fn unknown(name: &str) -> ApiError {
    ApiError::param(
        name,
        format!("unknown parameter `{name}`: this server does not support it"),
    )
}

/// A failure of the tokenizer on input it accepted: the server's fault.
fn internal(e: gpt2::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "tokenizer_error",
        format!("the tokenizer failed: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_parameter() {
        for (body, param) in [
            (r#"{"tokens": [1, -2]}"#, "tokens"),
            (r#"{"tokens": [1, 1.5]}"#, "tokens"),
            (r#"{"tokens": [1, 4294967296]}"#, "tokens"),
            (r#"{"tokens": "1 2"}"#, "tokens"),
            (r#"{"tokens": [1], "tokenz": 1}"#, "tokenz"),
            (r#"{"tokens": [1], "model": 3}"#, "model"),
            (r#"{}"#, "tokens"),
        ] {
            let app = App::new(Default::default());
            let e = detokenize_body(&app, body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert!(e.message.contains(param), "{body}: {}", e.message);
        }
        for (body, param) in [
            (r#"{"content": 1}"#, "content"),
            (r#"{"content": "a", "with_pieces": "yes"}"#, "with_pieces"),
            (r#"{"content": "a", "add_special": 1}"#, "add_special"),
            (r#"{"content": "a", "parse_special": false}"#, "parse_special"),
            (r#"{"content": "a", "n_probs": 2}"#, "n_probs"),
            (r#"{"with_pieces": true}"#, "content"),
        ] {
            let app = App::new(Default::default());
            let e = tokenize_body(&app, body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert!(e.message.contains(param), "{body}: {}", e.message);
        }
        let app = App::new(Default::default());
        assert_eq!(tokenize_body(&app, b"[1]").unwrap_err().code, "invalid_json");
        assert_eq!(detokenize_body(&app, b"{").unwrap_err().code, "invalid_json");
        // A well-formed body waits for the model.
        let e = tokenize_body(&app, br#"{"content": "a"}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
