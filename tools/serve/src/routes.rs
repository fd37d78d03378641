//! The routes and the two layers every request passes: the log line (and
//! its count in `/metrics`, and a generation's end-to-end latency) and the
//! API-key check. `POST /v1/completions` is `completions.rs`'s, `/tokenize`
//! and `/detokenize` are `tokenize.rs`'s; the rest are answered here.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::body::{Frame, SizeHint};
use serde_json::{json, Value};

use super::completions::{chat_completions, completions};
use super::error::{ApiError, Outcome};
use super::state::{App, Engine, RequestLog};
use super::tokenize::{detokenize, tokenize};

/// The routes that generate text: their 200 answers are timed in
/// `vllm:e2e_request_latency_seconds`.
const GENERATION_ROUTES: [&str; 2] = ["/v1/completions", "/v1/chat/completions"];

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(app.config.body_limit))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), authorize))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), log_request))
        .with_state(app)
}

async fn log_request(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let arrived = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_string();
    let generation = GENERATION_ROUTES.contains(&route.as_str());
    let log = Arc::new(RequestLog::new(
        Arc::clone(&app),
        req.method().clone(),
        req.uri().path().to_string(),
        route,
    ));
    req.extensions_mut().insert(Arc::clone(&log));
    let response = next.run(req).await;
    log.responded(response.status().as_u16());
    if let Some(Outcome(o)) = response.extensions().get::<Outcome>() {
        log.set_outcome(o);
    }
    if generation && response.status() == StatusCode::OK {
        return response.map(|inner| {
            Body::new(Timed {
                inner,
                arrived,
                app: Some(app),
            })
        });
    }
    response
}

/// A generation's 200 answer, timed into `vllm:e2e_request_latency_seconds`
/// from the request's arrival to its last byte handed to the connection: a
/// stream ends long after its handler returns. An answer that does not end
/// (its client left, or the stream failed) is not counted: it produced no
/// whole result.
struct Timed {
    inner: Body,
    arrived: Instant,
    /// Taken when the latency is observed, so it is observed once.
    app: Option<Arc<App>>,
}

impl HttpBody for Timed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // A body that knows its length (a whole JSON answer) is over with its
        // last frame; hyper need not poll it again.
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if ended {
            if let Some(app) = self.app.take() {
                app.metrics.observe_e2e(self.arrived.elapsed());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn authorize(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if !app.needs_key() || req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    if presented.is_some_and(|key| app.key_matches(key.trim())) {
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
    if app.is_draining() {
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
        "created": app.started(),
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
