//! `gpt2 serve`: an OpenAI-compatible HTTP server over the continuous-batching
//! [`Scheduler`](gpt2::Scheduler), so concurrent clients share each forward step.
//!
//! [`serve`] binds nothing itself: it takes a listener (so tests can use
//! port 0 and run it in-process), starts loading the weights in the
//! background (`/health` is 503 until they are ready) and serves until the
//! shutdown future resolves. Then it drains: `/health` answers 503 at once
//! (a load balancer's check takes the replica out) while requests are still
//! served for the drain period; then it stops accepting, lets in-flight
//! requests finish within the grace period and ends the rest (a 503, or an
//! error event and `[DONE]` in a stream). Connections are accepted by our
//! own loop, at most `max_connections` at once, each served by hyper's
//! HTTP/1 builder with its header-read timeout (which also closes idle
//! keep-alive connections). [`run`] is the binary's side: flags, the
//! listening socket, SIGINT/SIGTERM.
//!
//! The modules, each above the ones it uses: `cli` (the process: flags,
//! runtime, socket, signals, loading the weights), `server` ([`serve`]: the
//! background load, the accept loop, drain and grace), `routes` (the router,
//! the log and API-key layers, the small endpoints), `completions` (`POST
//! /v1/completions` and `POST /v1/chat/completions`, one path: body,
//! checks, admission, submission), `reply` (their answer: one JSON body or
//! server-sent events), `stream` (the bridge: token ids to text pieces and
//! log-probabilities, stop strings, cancellation), `state` (what they all
//! share: the configuration, the engine, the request slots and log lines),
//! `chat` (the chat template: messages to a prompt), `request` (parsing a
//! request's JSON body), `tokenize` (`POST /tokenize` and `/detokenize`,
//! llama-server's shapes), `metrics` (Prometheus, with vLLM's names for the
//! gateways), `error` (OpenAI-style error bodies).

mod chat;
mod cli;
mod completions;
mod error;
mod metrics;
mod reply;
mod request;
mod routes;
mod server;
mod state;
mod stream;
mod tokenize;

pub use chat::ChatTemplate;
pub use cli::{load_engine, run, ServeArgs};
pub use error::ApiError;
pub use metrics::{Metrics, StepTimes};
pub use request::{Api, CompletionRequest, Input, Message, Prompt, Role};
pub use server::{serve, BoxError};
pub use state::{Connection, Engine, ServeConfig};
pub use stream::StopFilter;
