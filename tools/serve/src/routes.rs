//! The routes, the shared state, and the two layers every request passes:
//! the log line (and its count in `/metrics`) and the API-key check.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, watch};

use super::error::{ApiError, Outcome};
use super::metrics::Metrics;
use super::request::{CompletionRequest, Prompt};
use super::stream::{bridge, Finish, Job, Update};
use super::{Connection, Engine, ServeConfig};
use gpt2::model::KvCache;
use gpt2::tokenizer::EOS_TOKEN;
use gpt2::{Error, Fit, GenerateOptions, Invalid, Param};

/// What every handler shares.
pub struct App {
    pub config: ServeConfig,
    pub metrics: Metrics,
    /// Set once the weights are loaded; `/health` is 503 until then.
    pub engine: OnceLock<Arc<Engine>>,
    /// `true` once the shutdown grace period is over: bridges cancel their
    /// sequences at the next token, requests still waiting answer 503, and
    /// streams end with an error event and `[DONE]`.
    pub aborted: watch::Sender<bool>,
    /// Longest text prompt in bytes that can fit the context window: set
    /// with the engine (see [`prompt_byte_cap`]).
    pub prompt_cap: OnceLock<usize>,
    /// Bytes all in-flight requests' KV caches may reserve together, set
    /// with the engine (`--kv-cache-mib`, or half the memory available then).
    pub kv_budget: OnceLock<usize>,
    kv_reserved: AtomicUsize,
    /// Set on the shutdown signal: `/health` answers 503 from then on.
    draining: AtomicBool,
    in_flight: AtomicUsize,
    next_id: AtomicU64,
    /// SHA-256 of the API key: comparing digests keeps the comparison
    /// constant-time whatever the length of the presented key.
    key_digest: Option<[u8; 32]>,
    started: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl App {
    pub fn new(config: ServeConfig) -> Self {
        let key_digest = config
            .api_key
            .as_ref()
            .map(|k| Sha256::digest(k.as_bytes()).into());
        App {
            config,
            metrics: Metrics::new(),
            engine: OnceLock::new(),
            aborted: watch::Sender::new(false),
            prompt_cap: OnceLock::new(),
            kv_budget: OnceLock::new(),
            kv_reserved: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            key_digest,
            started: unix_now(),
        }
    }

    fn engine(&self) -> Result<Arc<Engine>, ApiError> {
        self.engine.get().cloned().ok_or_else(ApiError::not_ready)
    }

    /// From now on `/health` answers 503 (requests are still served).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.metrics.draining.set(1);
    }

    /// The grace period is over: what is still in flight is ended now.
    pub fn abort_in_flight(&self) {
        self.aborted.send_replace(true);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A slot for one more request, unless `max_batch + max_queue` are in
    /// flight, with `kv` bytes of the KV cache budget, unless they are taken.
    fn admit(self: &Arc<Self>, kv: usize) -> Result<InFlight, ApiError> {
        let limit = self.config.max_batch + self.config.max_queue;
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .map_err(|n| {
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    format!(
                        "the server is full: {n} requests in flight (max_batch {} + max_queue {}); retry later",
                        self.config.max_batch, self.config.max_queue
                    ),
                )
            })?;
        self.metrics.in_flight.inc();
        // Dropped on the way out if the reservation fails: the slot is freed again.
        let slot = InFlight {
            app: Arc::clone(self),
            kv: 0,
        };
        let budget = self.kv_budget.get().copied().unwrap_or(usize::MAX);
        let reserved = self
            .kv_reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                r.checked_add(kv).filter(|&t| t <= budget)
            })
            .map_err(|r| {
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "kv_cache_full",
                    format!(
                        "the server's KV cache budget is taken: {} of {} MiB reserved by the requests in \
                         flight, and this one needs {:.1} MiB more; retry later",
                        r >> 20,
                        budget >> 20,
                        kv as f64 / (1 << 20) as f64
                    ),
                )
            })?;
        self.metrics.kv_reserved.set((reserved + kv) as i64);
        let mut slot = slot;
        slot.kv = kv;
        Ok(slot)
    }
}

/// An admitted request; its slot and its KV cache reservation are freed on drop.
pub struct InFlight {
    app: Arc<App>,
    /// Bytes of the KV cache budget reserved.
    kv: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let app = &self.app;
        app.in_flight.fetch_sub(1, Ordering::AcqRel);
        app.metrics.in_flight.dec();
        if self.kv > 0 {
            let left = app.kv_reserved.fetch_sub(self.kv, Ordering::AcqRel) - self.kv;
            app.metrics.kv_reserved.set(left as i64);
        }
    }
}

/// One request's log line, written (and counted in `/metrics`) when the
/// last holder drops it: the logging layer as the response starts, or the
/// request's bridge once its generation is over, whichever is later.
pub struct RequestLog {
    app: Arc<App>,
    method: Method,
    path: String,
    route: String,
    start: Instant,
    /// 0 until the response starts; a client that left before is logged as
    /// 499 (nginx's "client closed request").
    status: AtomicU16,
    outcome: Mutex<Option<&'static str>>,
    pub prompt: AtomicUsize,
    pub generated: AtomicUsize,
}

impl RequestLog {
    /// The first outcome set wins: a later "ok" cannot hide a cancellation.
    pub fn set_outcome(&self, outcome: &'static str) {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        o.get_or_insert(outcome);
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let status = match self.status.load(Ordering::Relaxed) {
            0 => 499,
            s => s,
        };
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(match status {
                499 => "cancelled",
                s if s < 400 => "ok",
                _ => "error",
            });
        let (prompt, generated) = (
            self.prompt.load(Ordering::Relaxed),
            self.generated.load(Ordering::Relaxed),
        );
        eprintln!(
            "gpt2 serve: {} {} {status} {outcome} prompt_tokens={prompt} generated_tokens={generated} {:.1} ms",
            self.method,
            self.path,
            self.start.elapsed().as_secs_f64() * 1e3
        );
        self.app
            .metrics
            .requests
            .with_label_values(&[self.route.as_str(), &status.to_string(), outcome])
            .inc();
    }
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/completions", post(completions))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(app.config.body_limit))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), authorize))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), log_request))
        .with_state(app)
}

async fn log_request(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_string();
    let log = Arc::new(RequestLog {
        app,
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        route,
        start: Instant::now(),
        status: AtomicU16::new(0),
        outcome: Mutex::new(None),
        prompt: AtomicUsize::new(0),
        generated: AtomicUsize::new(0),
    });
    req.extensions_mut().insert(Arc::clone(&log));
    let response = next.run(req).await;
    log.status.store(response.status().as_u16(), Ordering::Relaxed);
    if let Some(Outcome(o)) = response.extensions().get::<Outcome>() {
        log.set_outcome(o);
    }
    response
}

async fn authorize(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(want) = &app.key_digest else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let ok = presented.is_some_and(|key| {
        let got: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
        bool::from(got.ct_eq(want))
    });
    if ok {
        next.run(req).await
    } else {
        let message = if presented.is_some() {
            "invalid API key"
        } else {
            "missing API key: send the header `Authorization: Bearer KEY`"
        };
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", message).into_response()
    }
}

/// The credentials of `Authorization: Bearer TOKEN`; the scheme is
/// case-insensitive (RFC 7235 2.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.draining.load(Ordering::Relaxed) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            format!(
                "the server is shutting down (requests in flight, finishing: {}); send new ones elsewhere",
                app.in_flight()
            ),
        )
        .into_response();
    }
    match app.engine() {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

fn model_card(app: &App, engine: &Engine) -> Value {
    let model = engine.scheduler.model();
    json!({
        "id": engine.model_id,
        "object": "model",
        "created": app.started,
        "owned_by": "gpt2-rs",
        "max_model_len": model.config.n_positions,
        "dtype": model.dtype().as_str(),
        "weights": engine.weights,
        "synthetic": engine.synthetic,
    })
}

async fn models(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let engine = app.engine()?;
    Ok(Json(
        json!({"object": "list", "data": [model_card(&app, &engine)]}),
    ))
}

/// `GET /v1/models/{id}` (the OpenAI client's `models.retrieve`); ids may
/// hold a `/` (`openai-community/gpt2`).
async fn model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let engine = app.engine()?;
    if id != engine.model_id {
        return Err(ApiError::model_not_found(&id, &engine.model_id));
    }
    Ok(Json(model_card(&app, &engine)))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let stats = app.engine.get().map(|e| e.scheduler.stats());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        app.metrics.render(stats),
    )
        .into_response()
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn completions(State(app): State<Arc<App>>, req: Request) -> Response {
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
async fn read_body(app: &App, req: Request) -> Result<Bytes, ApiError> {
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

/// What each chunk or response repeats.
struct Reply {
    id: String,
    created: u64,
    model: String,
    stream: bool,
    include_usage: bool,
}

impl Reply {
    /// A whole response (`usage` given) or a stream's chunk (`usage` never:
    /// it has a chunk of its own, see [`Reply::usage_chunk`]).
    fn body(&self, text: &str, finish: Option<&Finish>, usage: Option<&Finish>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "text": text,
                "index": 0,
                "logprobs": null,
                "finish_reason": finish.map(|f| f.reason),
            }],
        });
        if let Some(f) = usage {
            v["usage"] = usage_json(f);
        } else if self.include_usage {
            // As OpenAI: with `include_usage`, every other chunk has `usage: null`.
            v["usage"] = Value::Null;
        }
        v
    }

    /// `stream_options.include_usage`: the last chunk, empty `choices`.
    fn usage_chunk(&self, f: &Finish) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_json(f),
        })
    }
}

fn usage_json(f: &Finish) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    })
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
    let model = engine.scheduler.model();
    let n_positions = model.config.n_positions;
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
                            "`prompt` is {} bytes of text; the context window of {n_positions} tokens holds at most \
                             {cap} bytes (at the longest token's length); shorten the prompt",
                            t.len()
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
        // Drawn below, once the request is admitted.
        seed: 0,
        ignore_eos: req.ignore_eos,
        eos_token_id: Some(EOS_TOKEN),
    };
    // Every token asked for must fit, as `max_tokens` promises.
    let mut request = gpt2::Request::prepare(&model.config, prompt, opts, Fit::Whole).map_err(refused)?;
    let prompt_tokens = request.prompt().len();
    let wanted = prompt_tokens.saturating_add(req.max_tokens);
    // Positions this request's cache may fill, in resident bytes.
    let kv = KvCache::resident_bytes(&model.config, wanted.min(n_positions));
    let budget = app.kv_budget.get().copied().unwrap_or(usize::MAX);
    if kv > budget {
        return Err(ApiError {
            code: "kv_cache_exceeded",
            ..ApiError::param(
                "max_tokens",
                format!(
                    "{} prompt tokens + {} max_tokens need {:.1} MiB of KV cache, more than this server's \
                     whole budget of {} MiB (--kv-cache-mib); lower max_tokens or shorten the prompt",
                    prompt_tokens,
                    req.max_tokens,
                    kv as f64 / (1 << 20) as f64,
                    budget >> 20
                ),
            )
        });
    }
    let in_flight = app.admit(kv)?;
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
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
        id: format!("cmpl-{:x}-{id}", app.started),
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
        // The body's parser refuses these first, in its own words.
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

/// The answer to a request still running when the grace period ends.
fn shutdown_error() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        SHUTDOWN,
        "the server is shutting down and its grace period is over; retry elsewhere",
    )
}

/// The outcome of a request ended by the end of the grace period.
const SHUTDOWN: &str = "shutdown";

/// Resolves once `rx` holds `true` (never if its sender is gone).
async fn raised(mut rx: watch::Receiver<bool>) {
    if rx.wait_for(|&a| a).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// `stream: false`: the pieces joined into one response.
async fn whole_response(
    mut rx: mpsc::Receiver<Update>,
    reply: Reply,
    aborted: watch::Receiver<bool>,
    log: Arc<RequestLog>,
) -> Response {
    let mut text = String::new();
    let aborted = raised(aborted);
    tokio::pin!(aborted);
    loop {
        let update = tokio::select! {
            u = rx.recv() => u,
            () = &mut aborted => {
                log.set_outcome(SHUTDOWN);
                return shutdown_error().into_response();
            }
        };
        match update {
            Some(Update::Token(piece)) => text.push_str(&piece),
            Some(Update::End(Ok(finish))) => {
                text.push_str(&finish.text);
                return Json(reply.body(&text, Some(&finish), Some(&finish))).into_response();
            }
            Some(Update::End(Err(e))) => return e.into_response(),
            None => break,
        }
    }
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "engine_error",
        "the request ended without a result",
    )
    .into_response()
}

/// `stream: true`: one SSE chunk per token, the last with the finish
/// reason, then (with `stream_options.include_usage`) the usage, then
/// `[DONE]`. At the end of the grace period: an error event, then `[DONE]`.
fn stream_response(
    rx: mpsc::Receiver<Update>,
    reply: Reply,
    aborted: watch::Receiver<bool>,
    log: Arc<RequestLog>,
) -> Sse<Events> {
    Sse::new(Events {
        rx,
        reply,
        aborted: Box::pin(raised(aborted)),
        log,
        queue: VecDeque::new(),
        finished: false,
    })
}

/// A stream's events. Polled only as fast as the client takes them, so a
/// client that does not read leaves the bridge's channel full (see the
/// write-stall timeout in `stream.rs`).
pub struct Events {
    rx: mpsc::Receiver<Update>,
    reply: Reply,
    aborted: Pin<Box<dyn Future<Output = ()> + Send>>,
    log: Arc<RequestLog>,
    /// Event data ready to go.
    queue: VecDeque<String>,
    /// Nothing more is taken from `rx`.
    finished: bool,
}

impl tokio_stream::Stream for Events {
    type Item = Result<SseEvent, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(data) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(SseEvent::default().data(data))));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            if this.aborted.as_mut().poll(cx).is_ready() {
                this.log.set_outcome(SHUTDOWN);
                this.queue.push_back(shutdown_error().body().to_string());
                this.queue.push_back("[DONE]".into());
                this.finished = true;
                // The bridge sees the channel closed and cancels the sequence.
                this.rx.close();
                continue;
            }
            match std::task::ready!(this.rx.poll_recv(cx)) {
                Some(Update::Token(piece)) => {
                    this.queue
                        .push_back(this.reply.body(&piece, None, None).to_string());
                }
                Some(Update::End(Ok(finish))) => {
                    let last = this.reply.body(&finish.text, Some(&finish), None);
                    this.queue.push_back(last.to_string());
                    if this.reply.include_usage {
                        this.queue.push_back(this.reply.usage_chunk(&finish).to_string());
                    }
                }
                // The status is already sent: the error goes in the stream.
                Some(Update::End(Err(e))) => this.queue.push_back(e.body().to_string()),
                None => {
                    this.queue.push_back("[DONE]".into());
                    this.finished = true;
                }
            }
        }
    }
}
