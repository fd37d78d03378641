//! The routes, the shared state, and the two layers every request passes:
//! the log line (and its count in `/metrics`) and the API-key check.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::error::{ApiError, Outcome};
use super::metrics::Metrics;
use super::request::{CompletionRequest, Prompt};
use super::stream::{bridge, Finish, Job, Update};
use super::{Engine, ServeConfig};
use crate::tokenizer::EOS_TOKEN;
use crate::{Error, GenerateOptions};

/// What every handler shares.
pub struct App {
    pub config: ServeConfig,
    pub metrics: Metrics,
    /// Set once the weights are loaded; `/health` is 503 until then.
    pub engine: OnceLock<Arc<Engine>>,
    /// Set when the shutdown grace period is over: bridges cancel their
    /// sequences at the next token.
    pub abort: AtomicBool,
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
            abort: AtomicBool::new(false),
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

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A slot for one more request, unless `max_batch + max_queue` are in flight.
    fn admit(self: &Arc<Self>) -> Result<InFlight, ApiError> {
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
        Ok(InFlight(Arc::clone(self)))
    }
}

/// An admitted request; its slot is freed on drop.
pub struct InFlight(Arc<App>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.in_flight.dec();
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
        .and_then(|v| v.strip_prefix("Bearer "));
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

async fn models(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let engine = app.engine()?;
    let model = engine.scheduler.model();
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": engine.model_id,
            "object": "model",
            "created": app.started,
            "owned_by": "gpt2-rs",
            "max_model_len": model.config.n_positions,
            "dtype": model.dtype().as_str(),
            "weights": engine.weights,
            "synthetic": engine.synthetic,
        }]
    })))
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

async fn completions(
    State(app): State<Arc<App>>,
    Extension(log): Extension<Arc<RequestLog>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    match start_completion(&app, &log, &headers, body, arrived) {
        Ok((rx, reply)) if reply.stream => stream_response(rx, reply).into_response(),
        Ok((rx, reply)) => whole_response(rx, reply).await,
        Err(e) => e.into_response(),
    }
}

/// What each chunk or response repeats.
struct Reply {
    id: String,
    created: u64,
    model: String,
    stream: bool,
}

impl Reply {
    fn body(&self, text: &str, finish: Option<&Finish>) -> Value {
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
        if let Some(f) = finish {
            v["usage"] = json!({
                "prompt_tokens": f.prompt_tokens,
                "completion_tokens": f.completion_tokens,
                "total_tokens": f.prompt_tokens + f.completion_tokens,
            });
        }
        v
    }
}

/// Checks the request, submits it and starts its bridge.
fn start_completion(
    app: &Arc<App>,
    log: &Arc<RequestLog>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    arrived: Instant,
) -> Result<(mpsc::Receiver<Update>, Reply), ApiError> {
    let body = body.map_err(|e| body_error(app, e))?;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("application/json"));
    if !json {
        return Err(ApiError::bad_request(
            "invalid_content_type",
            "the body must be JSON, sent with `Content-Type: application/json`",
        ));
    }
    let req = CompletionRequest::parse(&body)?;
    let engine = app.engine()?;
    let model = engine.scheduler.model();
    let (n_positions, vocab_size) = (model.config.n_positions, model.config.vocab_size);
    let prompt = match &req.prompt {
        // As OpenAI does: no prompt means the start of a new document.
        Prompt::Text(t) if t.is_empty() => vec![EOS_TOKEN],
        Prompt::Text(t) => engine
            .tokenizer
            .encode(t)
            .map_err(|e| ApiError::param("prompt", format!("cannot tokenize `prompt`: {e}")))?,
        Prompt::Ids(ids) => ids.clone(),
    };
    if let Some((i, id)) = prompt.iter().enumerate().find(|(_, &t)| t as usize >= vocab_size) {
        return Err(ApiError::param(
            "prompt",
            format!("`prompt[{i}]` is token id {id}, past the vocabulary of {vocab_size} tokens (0..{vocab_size})"),
        ));
    }
    let wanted = prompt.len().saturating_add(req.max_tokens);
    if wanted > n_positions {
        let param = if prompt.len() >= n_positions {
            "prompt"
        } else {
            "max_tokens"
        };
        let e = ApiError::param(
            param,
            format!(
                "the context window is {n_positions} positions, but the request needs {wanted}: \
                 {} prompt tokens + {} max_tokens; shorten the prompt or lower max_tokens",
                prompt.len(),
                req.max_tokens
            ),
        );
        return Err(ApiError {
            code: "context_length_exceeded",
            ..e
        });
    }
    let in_flight = app.admit()?;
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    // Without a seed every request gets its own, as OpenAI samples afresh.
    let seed = req.seed.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    });
    let opts = GenerateOptions {
        max_new_tokens: req.max_tokens,
        sampling: req.sampling.clone(),
        seed,
        ignore_eos: req.ignore_eos,
        eos_token_id: Some(EOS_TOKEN),
    };
    let prompt_tokens = prompt.len();
    let handle = engine.scheduler.submit(prompt, opts).map_err(submit_error)?;
    log.prompt.store(prompt_tokens, Ordering::Relaxed);
    app.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
    let reply = Reply {
        id: format!("cmpl-{:x}-{id}", app.started),
        created: unix_now(),
        model: req.model.clone().unwrap_or_else(|| engine.model_id.clone()),
        stream: req.stream,
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
    };
    // Room for a burst of tokens; the bridge waits if the client is slower.
    let (tx, rx) = mpsc::channel(64);
    tokio::task::spawn_blocking(move || bridge(job, tx));
    Ok((rx, reply))
}

fn body_error(app: &App, e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the body is larger than the {} bytes this server accepts",
                app.config.body_limit
            ),
        )
    } else {
        ApiError::bad_request("invalid_body", format!("cannot read the body: {e}"))
    }
}

fn submit_error(e: Error) -> ApiError {
    match e {
        Error::Engine(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "engine_error",
            format!("cannot submit the request: {e}"),
        ),
        Error::TokenId { .. } | Error::PromptTooLong { .. } => ApiError::param("prompt", e.to_string()),
        _ => ApiError::bad_request("invalid_request", e.to_string()),
    }
}

/// `stream: false`: the pieces joined into one response.
async fn whole_response(mut rx: mpsc::Receiver<Update>, reply: Reply) -> Response {
    let mut text = String::new();
    while let Some(update) = rx.recv().await {
        match update {
            Update::Token(piece) => text.push_str(&piece),
            Update::End(Ok(finish)) => {
                text.push_str(&finish.text);
                return Json(reply.body(&text, Some(&finish))).into_response();
            }
            Update::End(Err(e)) => return e.into_response(),
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
/// reason and usage, then `[DONE]`.
fn stream_response(
    rx: mpsc::Receiver<Update>,
    reply: Reply,
) -> Sse<impl tokio_stream::Stream<Item = Result<SseEvent, Infallible>>> {
    let events = ReceiverStream::new(rx).map(move |update| {
        let body = match update {
            Update::Token(piece) => reply.body(&piece, None),
            Update::End(Ok(finish)) => reply.body(&finish.text, Some(&finish)),
            // The status is already sent: the error goes in the stream.
            Update::End(Err(e)) => e.body(),
        };
        Ok(SseEvent::default().data(body.to_string()))
    });
    Sse::new(events.chain(tokio_stream::once(Ok(SseEvent::default().data("[DONE]")))))
}
