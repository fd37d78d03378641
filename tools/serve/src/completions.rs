//! `POST /v1/completions` and `POST /v1/chat/completions`, one path for
//! both: the body read within its limits, parsed (`request.rs`; chat's
//! `messages` rendered by the chat template, `chat.rs`), each prompt checked
//! at the engine's door, the request admitted whole (every choice of every
//! prompt, or none), submitted, and one bridge started per choice;
//! `reply.rs` answers.
//!
//! A request of P prompts and `n` choices runs P × n sequences: each prompt
//! is submitted once with `Scheduler::submit_n` (its prefill shared by its
//! choices) and choice i of prompt p is `choices[p × n + i]` (OpenAI's and
//! vLLM's order). They are admitted together or refused whole: 429 when
//! they do not fit in flight now (`max_batch + max_queue` sequences, the KV
//! cache budget), 400 naming `n` (or `prompt`, for a batch with `n: 1`)
//! when they never could, or when `n` passes the batch (`max_choices`).
//!
//! Seeds: every prompt of a request runs with the request's seed (a fresh
//! one per request without `seed`), and choice i with the engine's
//! `choice_seed(seed, i)`; so choice i of a prompt is the same whatever else
//! the request holds, and equals a request of that prompt alone with
//! `seed: choice_seed(seed, i)`.

use std::sync::atomic::{AtomicBool, Ordering};
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
use super::request::{Api, CompletionRequest, Input, Prompt, DEFAULT_MAX_TOKENS};
use super::state::{unix_now, App, Connection, Engine, RequestLog};
use super::stream::{bridge, Choice, Job, Update};
use gpt2::tokenizer::EOS_TOKEN;
use gpt2::{Error, Fit, GenerateOptions, Invalid, Param};

pub async fn completions(State(app): State<Arc<App>>, req: Request) -> Response {
    handle(app, req, Api::Completions).await
}

pub async fn chat_completions(State(app): State<Arc<App>>, req: Request) -> Response {
    handle(app, req, Api::Chat).await
}

async fn handle(app: Arc<App>, req: Request, api: Api) -> Response {
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
        tokio::task::spawn_blocking(move || {
            let started = Started {
                arrived,
                runtime,
                connection,
            };
            start(&app, &log, api, &body, started)
        })
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

/// Where and when a request came in.
struct Started {
    arrived: Instant,
    runtime: tokio::runtime::Handle,
    connection: Option<Arc<Connection>>,
}

/// Checks the request, admits it, submits its prompts and starts a bridge
/// per choice (on a blocking thread).
fn start(
    app: &Arc<App>,
    log: &Arc<RequestLog>,
    api: Api,
    body: &[u8],
    started: Started,
) -> Result<(mpsc::Receiver<Update>, Reply), ApiError> {
    let req = CompletionRequest::parse(api, body)?;
    let engine = app.engine()?;
    if let Some(asked) = &req.model {
        if *asked != engine.model_id {
            return Err(ApiError::model_not_found(asked, &engine.model_id));
        }
    }
    let max = engine.scheduler.max_choices();
    if req.n > max {
        return Err(refused(Invalid::Choices { n: req.n, max }));
    }
    let mut stops = req.stop.clone();
    let prompts = match &req.input {
        Input::Prompts(p) => p.clone(),
        Input::Messages(m) => {
            let template = &app.config.chat_template;
            stops.extend_from_slice(template.stop());
            vec![Prompt::Text(template.render(m))]
        }
    };
    let requests = prompts
        .iter()
        .map(|p| prepare(app, &engine, &req, p))
        .collect::<Result<Vec<_>, _>>()?;
    let (n, sequences) = (req.n, requests.len().saturating_mul(req.n));
    let whole = if n > 1 { "n" } else { "prompt" };
    fits_ever(app, requests.len(), n, whole)?;
    let kv = kv_reservation(app, engine.scheduler.model(), &requests, n, whole)?;
    let in_flight = app.admit(sequences, kv)?;
    let id = app.next_request_id();
    let seed = req.seed.unwrap_or_else(|| fresh_seed(id));
    let prompt_tokens: usize = requests.iter().map(|r| r.prompt().len()).sum();
    let mut choices = Vec::with_capacity(sequences);
    for (p, mut request) in requests.into_iter().enumerate() {
        let echo: Option<Arc<[u32]>> = req.echo.then(|| request.prompt().into());
        request.set_seed(seed);
        let handles = engine.scheduler.submit_n(request, n).map_err(submit_error)?;
        choices.extend(handles.into_iter().enumerate().map(|(i, handle)| Choice {
            index: p * n + i,
            handle,
            echo: echo.clone(),
        }));
    }
    log.prompt.store(prompt_tokens, Ordering::Relaxed);
    app.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
    let prefix = match api {
        Api::Completions => "cmpl",
        Api::Chat => "chatcmpl",
    };
    let reply = Reply {
        api,
        id: format!("{prefix}-{:x}-{id}", app.started()),
        created: unix_now(),
        // Only the served model's name, whatever the request said.
        model: engine.model_id.clone(),
        stream: req.stream,
        include_usage: req.stream && req.include_usage,
        logprobs: req.logprobs.is_some(),
        choices: choices.len(),
        prompt_tokens,
    };
    let job = Arc::new(Job {
        app: Arc::clone(app),
        eos: (!req.ignore_eos).then_some(EOS_TOKEN),
        engine,
        stops,
        logprobs: req.logprobs.is_some(),
        arrived: started.arrived,
        _in_flight: in_flight,
        log: Arc::clone(log),
        runtime: started.runtime,
        write_stall: app.config.write_stall,
        connection: started.connection,
        first_token: AtomicBool::new(false),
    });
    // Room for a burst of tokens; the bridges wait if the client is slower.
    let (tx, rx) = mpsc::channel(64);
    for choice in choices {
        let (job, tx) = (Arc::clone(&job), tx.clone());
        tokio::task::spawn_blocking(move || bridge(job, choice, tx));
    }
    Ok((rx, reply))
}

/// Refuses (400, naming `whole`: `n`, or `prompt` for a batch) a request
/// whose `prompts` x `n` sequences are more than the server ever runs at
/// once; one that fits now or later goes on to admission.
fn fits_ever(app: &App, prompts: usize, n: usize, whole: &str) -> Result<(), ApiError> {
    let sequences = prompts.saturating_mul(n);
    if sequences <= app.max_sequences() {
        return Ok(());
    }
    Err(ApiError::param(
        whole,
        format!(
            "{prompts} prompt(s) × n = {n} need {sequences} sequences, more than this server ever runs at once \
             ({}: --max-batch + --max-queue); lower n or send fewer prompts",
            app.max_sequences()
        ),
    ))
}

/// A seed for a request without one: every request gets its own, as OpenAI
/// samples afresh.
fn fresh_seed(id: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// One prompt as the engine runs it: its token ids and the options, through
/// the engine's door.
fn prepare(
    app: &App,
    engine: &Engine,
    req: &CompletionRequest,
    prompt: &Prompt,
) -> Result<gpt2::Request, ApiError> {
    let config = &engine.scheduler.model().config;
    let prompt = match prompt {
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
    let max_new_tokens = req.max_tokens.unwrap_or(match req.api {
        Api::Completions => DEFAULT_MAX_TOKENS,
        // The rest of the window (the last new token needs no position);
        // a prompt past it is refused by the door.
        Api::Chat => (config.n_positions + 1).saturating_sub(prompt.len()).max(1),
    });
    // The prompt is scored with `echo` and `logprobs`, and to return it
    // alone (`max_tokens: 0`, which the engine allows only when scoring).
    let prompt_logprobs = match (req.echo, max_new_tokens) {
        (true, 0) => Some(req.logprobs.unwrap_or(0)),
        (true, _) => req.logprobs,
        (false, _) => None,
    };
    let opts = GenerateOptions {
        max_new_tokens,
        sampling: req.sampling.clone(),
        // Set once the request is admitted.
        seed: 0,
        ignore_eos: req.ignore_eos,
        eos_token_id: Some(EOS_TOKEN),
        logprobs: req.logprobs,
        prompt_logprobs,
    };
    // Every token asked for must fit, as `max_tokens` promises.
    gpt2::Request::prepare(config, prompt, opts, Fit::Whole).map_err(refused)
}

/// The bytes of KV cache the request's sequences may fill (resident): one
/// cache per choice of each prompt, each up to its prompt + `max_tokens`
/// positions; refused (400) if the server's whole budget can never hold
/// one sequence (naming `max_tokens`) or all of them (naming `whole`).
fn kv_reservation(
    app: &App,
    model: &gpt2::Gpt2Model,
    requests: &[gpt2::Request],
    n: usize,
    whole: &str,
) -> Result<usize, ApiError> {
    let budget = app.kv_budget.get().copied().unwrap_or(usize::MAX);
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let mut total = 0usize;
    for r in requests {
        let (prompt_tokens, max_tokens) = (r.prompt().len(), r.options().max_new_tokens);
        let wanted = prompt_tokens.saturating_add(max_tokens);
        let kv = model.cache_bytes(wanted.min(model.config.n_positions));
        if kv > budget {
            return Err(ApiError {
                code: "kv_cache_exceeded",
                ..ApiError::param(
                    "max_tokens",
                    format!(
                        "{prompt_tokens} prompt tokens + {max_tokens} max_tokens need {:.1} MiB of KV cache, more \
                         than this server's whole budget of {} MiB (--kv-cache-mib); lower max_tokens or shorten \
                         the prompt",
                        mib(kv),
                        budget >> 20
                    ),
                )
            });
        }
        total = total.saturating_add(kv.saturating_mul(n));
    }
    if total > budget {
        return Err(ApiError {
            code: "kv_cache_exceeded",
            ..ApiError::param(
                whole,
                format!(
                    "{} prompt(s) × n = {n} need {:.1} MiB of KV cache together, more than this server's whole \
                     budget of {} MiB (--kv-cache-mib); lower n or send fewer prompts",
                    requests.len(),
                    mib(total),
                    budget >> 20
                ),
            )
        });
    }
    Ok(total)
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
