//! `POST /v1/completions`: the body read within its limits, parsed and
//! checked (by the body's parser, then the engine's door), the request
//! admitted and submitted, and its bridge started; `reply.rs` answers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::reply::{stream_response, whole_response, Reply};
use super::request::{CompletionRequest, Prompt};
use super::state::{unix_now, App, Connection, Engine, RequestLog};
use super::stream::{bridge, Job, Update};
use gpt2::model::KvCache;
use gpt2::tokenizer::EOS_TOKEN;
use gpt2::{Error, Fit, GenerateOptions, Gpt2Config, Invalid, Param};

pub async fn completions(State(app): State<Arc<App>>, req: Request) -> Response {
    let arrived = Instant::now();
    let log = req.extensions().get::<Arc<RequestLog>>().cloned();
    let connection = req.extensions().get::<Arc<Connection>>().cloned();
    let Some(log) = log else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "no request log",
        )
        .into_response();
    };
    let body = match read_body(&app, req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    // Parsing, tokenizing and the checks are CPU work (a 1 MB body, a long
    // prompt): on a blocking thread, so the runtime's threads keep serving
    // everyone else (`/health` among them).
    let started = {
        let (app, log) = (Arc::clone(&app), Arc::clone(&log));
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || start_completion(&app, &log, &body, arrived, runtime, connection))
            .await
    };
    let started = started.unwrap_or_else(|e| {
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("the request's checks failed: {e}"),
        ))
    });
    let aborted = app.aborted.subscribe();
    match started {
        Ok((rx, reply)) if reply.stream => stream_response(rx, reply, aborted, log).into_response(),
        Ok((rx, reply)) => whole_response(rx, reply, aborted, log).await,
        Err(e) => e.into_response(),
    }
}

/// The body, read whole within the body timeout, and the headers; a body
/// declared larger than the limit is refused before any of it is read (so
/// `Expect: 100-continue` gets 413, never `100 Continue`).
pub(crate) async fn read_body(app: &App, req: Request) -> Result<Bytes, ApiError> {
    let headers = req.headers();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.config.body_limit as u64) {
        return Err(too_large(app));
    }
    // Checked before the body is read, too: no point in taking it.
    if !is_json(headers) {
        return Err(ApiError::bad_request(
            "invalid_content_type",
            "the body must be JSON, sent with `Content-Type: application/json`",
        ));
    }
    let timeout = app.config.body_timeout;
    match tokio::time::timeout(timeout, Bytes::from_request(req, &())).await {
        Ok(body) => body.map_err(|e| body_error(app, e)),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the body did not arrive within {} s", timeout.as_secs_f64()),
        )),
    }
}

/// `Content-Type: application/json`, optionally with parameters
/// (`; charset=utf-8`); the media type itself is case-insensitive.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// The longest text, in bytes, that can tokenize into at most `n_positions`
/// tokens: every token covers at most as many bytes as the longest token of
/// the vocabulary decodes to (GPT-2's byte-level BPE splits the text's bytes
/// among its tokens), so a longer prompt cannot fit and is refused before
/// tokenizing it. For GPT-2 at 1024 positions this is 1024 x 128 bytes.
pub fn prompt_byte_cap(engine: &Engine) -> usize {
    let longest = (0..engine.tokenizer.vocab_size() as u32)
        .filter_map(|id| engine.tokenizer.decode(&[id]).ok())
        .map(|t| t.len())
        .max()
        .unwrap_or(0)
        .max(1);
    engine
        .scheduler
        .model()
        .config
        .n_positions
        .saturating_mul(longest)
}

/// Checks the request, submits it and starts its bridge (on a blocking thread).
fn start_completion(
    app: &Arc<App>,
    log: &Arc<RequestLog>,
    body: &[u8],
    arrived: Instant,
    runtime: tokio::runtime::Handle,
    connection: Option<Arc<Connection>>,
) -> Result<(mpsc::Receiver<Update>, Reply), ApiError> {
    let req = CompletionRequest::parse(body)?;
    let engine = app.engine()?;
    if let Some(asked) = &req.model {
        if *asked != engine.model_id {
            return Err(ApiError::model_not_found(asked, &engine.model_id));
        }
    }
    let mut request = prepare(app, &engine, &req)?;
    let prompt_tokens = request.prompt().len();
    let kv = kv_reservation(
        app,
        &engine.scheduler.model().config,
        prompt_tokens,
        req.max_tokens,
    )?;
    let in_flight = app.admit(kv)?;
    let id = app.next_request_id();
    // Without a seed every request gets its own, as OpenAI samples afresh.
    request.set_seed(req.seed.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }));
    let handle = engine.scheduler.submit_request(request).map_err(submit_error)?;
    log.prompt.store(prompt_tokens, Ordering::Relaxed);
    app.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
    let reply = Reply {
        id: format!("cmpl-{:x}-{id}", app.started()),
        created: unix_now(),
        // Only the served model's name, whatever the request said.
        model: engine.model_id.clone(),
        stream: req.stream,
        include_usage: req.stream && req.include_usage,
    };
    let job = Job {
        app: Arc::clone(app),
        eos: (!req.ignore_eos).then_some(EOS_TOKEN),
        engine,
        handle,
        stops: req.stop,
        prompt_tokens,
        arrived,
        log: Arc::clone(log),
        in_flight,
        runtime,
        write_stall: app.config.write_stall,
        connection,
    };
    // Room for a burst of tokens; the bridge waits if the client is slower.
    let (tx, rx) = mpsc::channel(64);
    tokio::task::spawn_blocking(move || bridge(job, tx));
    Ok((rx, reply))
}

/// The request as the engine runs it: the prompt's token ids and the
/// options, through the engine's door.
fn prepare(app: &App, engine: &Engine, req: &CompletionRequest) -> Result<gpt2::Request, ApiError> {
    let config = &engine.scheduler.model().config;
    let prompt = match &req.prompt {
        // As OpenAI does: no prompt means the start of a new document.
        Prompt::Text(t) if t.is_empty() => vec![EOS_TOKEN],
        Prompt::Text(t) => {
            let cap = app.prompt_cap.get().copied().unwrap_or(usize::MAX);
            if t.len() > cap {
                return Err(ApiError {
                    code: "context_length_exceeded",
                    ..ApiError::param(
                        "prompt",
                        format!(
                            "`prompt` is {} bytes of text; the context window of {} tokens holds at most \
                             {cap} bytes (at the longest token's length); shorten the prompt",
                            t.len(),
                            config.n_positions
                        ),
                    )
                });
            }
            engine
                .tokenizer
                .encode(t)
                .map_err(|e| ApiError::param("prompt", format!("cannot tokenize `prompt`: {e}")))?
        }
        Prompt::Ids(ids) => ids.clone(),
    };
    let opts = GenerateOptions {
        max_new_tokens: req.max_tokens,
        sampling: req.sampling.clone(),
        // Drawn once the request is admitted.
        seed: 0,
        ignore_eos: req.ignore_eos,
        eos_token_id: Some(EOS_TOKEN),
        logprobs: None,
        prompt_logprobs: None,
    };
    // Every token asked for must fit, as `max_tokens` promises.
    gpt2::Request::prepare(config, prompt, opts, Fit::Whole).map_err(refused)
}

/// The bytes of KV cache the request's positions may fill (resident), if
/// the server's whole budget can ever hold them.
fn kv_reservation(
    app: &App,
    config: &Gpt2Config,
    prompt_tokens: usize,
    max_tokens: usize,
) -> Result<usize, ApiError> {
    let wanted = prompt_tokens.saturating_add(max_tokens);
    let kv = KvCache::resident_bytes(config, wanted.min(config.n_positions));
    let budget = app.kv_budget.get().copied().unwrap_or(usize::MAX);
    if kv <= budget {
        return Ok(kv);
    }
    Err(ApiError {
        code: "kv_cache_exceeded",
        ..ApiError::param(
            "max_tokens",
            format!(
                "{} prompt tokens + {} max_tokens need {:.1} MiB of KV cache, more than this server's \
                 whole budget of {} MiB (--kv-cache-mib); lower max_tokens or shorten the prompt",
                prompt_tokens,
                max_tokens,
                kv as f64 / (1 << 20) as f64,
                budget >> 20
            ),
        )
    })
}

fn too_large(app: &App) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!(
            "the body is larger than the {} bytes this server accepts",
            app.config.body_limit
        ),
    )
}

fn body_error(app: &App, e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(app)
    } else {
        ApiError::bad_request("invalid_body", format!("cannot read the body: {e}"))
    }
}

/// A request the engine's door refused, in this API's words (its
/// `max_tokens` is the engine's `max_new_tokens`).
fn refused(e: Invalid) -> ApiError {
    let param = match e.param() {
        Param::MaxNewTokens => "max_tokens",
        p => p.name(),
    };
    match e {
        Invalid::TokenId {
            index,
            id,
            vocab_size,
        } => ApiError::param(
            param,
            format!("`prompt[{index}]` is token id {id}, past the vocabulary of {vocab_size} tokens (0..{vocab_size})"),
        ),
        Invalid::PromptTooLong(l) | Invalid::ContextExceeded(l) => ApiError {
            code: "context_length_exceeded",
            ..ApiError::param(
                param,
                format!(
                    "the context window is {} positions, but the request needs {}: {} prompt tokens + {} \
                     max_tokens (the last generated token needs none, so prompt + max_tokens may be {}); shorten \
                     the prompt or lower max_tokens",
                    l.n_positions,
                    l.prompt_tokens.saturating_add(l.max_new_tokens),
                    l.prompt_tokens,
                    l.max_new_tokens,
                    l.n_positions + 1
                ),
            )
        },
        // The body's parser refuses these first, in its own words (see
        // `request.rs`: checked on the JSON numbers, in the body's order).
        other => ApiError::param(param, other.to_string()),
    }
}

/// A checked request can fail to be queued only if the engine stopped.
fn submit_error(e: Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "engine_error",
        format!("cannot submit the request: {e}"),
    )
}
