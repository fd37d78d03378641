//! A completion's answer, from the bridge's updates: one JSON body
//! (`stream: false`) or a stream of server-sent events, each ended at the
//! end of the shutdown grace period if still running.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use super::error::ApiError;
use super::state::RequestLog;
use super::stream::{Finish, Update};

/// What each chunk or response repeats.
pub struct Reply {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage` (streams only, as OpenAI does).
    pub include_usage: bool,
}

impl Reply {
    /// A whole response (`usage` given) or a stream's chunk (`usage` never:
    /// it has a chunk of its own, see [`Reply::usage_chunk`]).
    fn body(&self, text: &str, finish: Option<&Finish>, usage: Option<&Finish>) -> Value {
        let mut v = self.envelope(json!([{
            "text": text,
            "index": 0,
            "logprobs": null,
            "finish_reason": finish.map(|f| f.reason),
        }]));
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
        let mut v = self.envelope(json!([]));
        v["usage"] = usage_json(f);
        v
    }

    /// What every response and chunk holds around its `choices`.
    fn envelope(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
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
pub async fn whole_response(
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
pub fn stream_response(
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
