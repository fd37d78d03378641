//! The benchmark's requests sent to an OpenAI-compatible server
//! (`throughput --url`): a [`Backend`] that posts each prompt, as token ids,
//! to `/v1/completions` with `stream: true` and reads the server-sent events
//! back ([`crate::sse`]), one chunk per generated token.
//!
//! Every request asks for greedy decoding of exactly `max_tokens` tokens
//! (`temperature: 0`, `ignore_eos: true`, vLLM's name, which llama.cpp's
//! `llama-server` and `gpt2 serve` take too) and for the token counts
//! (`stream_options.include_usage`); with `--choices` N > 1, for N
//! completions of its prompt (`n`, each chunk naming its choice's `index`). A request succeeds only if the server's
//! `usage` and the number of streamed token chunks agree (and the runner
//! then checks they equal `max_tokens`); anything else is a [`Failure`] of
//! its own kind, so that failures group by cause in the report and the drill.
//! No wait is unbounded: connecting, the answer's head and every read have
//! a timeout, and every request has a deadline as a whole (`--request-deadline`,
//! else [`default_deadline`] of its size); nothing a server sends is
//! buffered without a bound ([`StreamLimits`]).

use std::io::BufReader;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::runner::{Backend, Reply, MAX_CLIENTS};
use super::ServerInfo;
use crate::deadline::default_deadline;
use crate::failure::{clip, one_line, Failure, Said};
use crate::sse::{read_stream, StreamLimits};

/// How long opening a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest answer we read whole (the model list, an error body).
const BODY_LIMIT: u64 = 1 << 20;

/// How to reach the server (`throughput --url`, `--api-key`,
/// `--server-model`, `--http-timeout`).
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// `http://HOST:PORT`, with or without a trailing `/v1`.
    pub url: String,
    /// Sent as `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The `model` of every request; default: the first id `/v1/models` lists.
    pub model: Option<String>,
    /// Tokens every request asks for, per choice.
    pub max_tokens: usize,
    /// Completions every request asks for (`n`).
    pub choices: usize,
    /// Longest silence of the server: waiting for an answer's head, or for
    /// the next bytes of a stream.
    pub timeout: Duration,
    /// The longest one request may take, connecting to `[DONE]`; `None`:
    /// [`default_deadline`] of each request's size.
    pub deadline: Option<Duration>,
}

/// A server, its model chosen, ready to take requests from many client
/// threads (one connection pool, shared).
pub struct Http {
    agent: ureq::Agent,
    completions: String,
    auth: Option<String>,
    model: String,
    max_tokens: usize,
    choices: usize,
    /// `--http-timeout`, for the default deadline.
    timeout: Duration,
    /// `--request-deadline`, if given.
    deadline: Option<Duration>,
    limits: StreamLimits,
}

impl Http {
    /// Checks the URL and asks `GET /v1/models`; errors name the URL and
    /// what went wrong (nothing listening, an HTTP error, an answer that is
    /// not a model list).
    pub fn connect(opts: &HttpOptions) -> Result<(Http, ServerInfo), String> {
        let base = base_url(&opts.url)?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // Error answers are read, not turned into bare status codes.
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_recv_response(Some(opts.timeout))
            .timeout_per_read(Some(opts.timeout))
            .timeout_per_write(Some(opts.timeout))
            // `GET /v1/models`: the timeout's worth; each completion sets its own.
            .timeout_global(Some(opts.deadline.unwrap_or(opts.timeout)))
            // Every client thread keeps its connection between requests.
            .max_idle_connections(MAX_CLIENTS)
            .max_idle_connections_per_host(MAX_CLIENTS)
            .build()
            .into();
        let auth = opts.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let models_url = format!("{base}/v1/models");
        let mut req = agent.get(&models_url);
        if let Some(a) = &auth {
            req = req.header("Authorization", a);
        }
        let resp = req
            .call()
            .map_err(|e| format!("cannot reach the server at {base}: GET /v1/models: {e}"))?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        if status != 200 {
            return Err(format!("GET {models_url}: {}", status_error(status, &mut body)));
        }
        let text = read_text(&mut body).map_err(|e| format!("GET {models_url}: {e}"))?;
        let models: Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "GET {models_url} answered something that is not JSON ({e}): {}",
                quote(&text)
            )
        })?;
        let listed: Vec<&Value> = models
            .get("data")
            .and_then(Value::as_array)
            .map(|d| d.iter().collect())
            .unwrap_or_default();
        let ids: Vec<&str> = listed
            .iter()
            .filter_map(|m| m.get("id").and_then(Value::as_str))
            .collect();
        let model = match (&opts.model, ids.first()) {
            (Some(m), _) => m.clone(),
            (None, Some(id)) => id.to_string(),
            (None, None) => {
                return Err(format!(
                    "GET {models_url} lists no model (no `data[].id`): {}; name one with --server-model",
                    quote(&text)
                ))
            }
        };
        let owned_by = listed
            .iter()
            .find(|m| m.get("id").and_then(Value::as_str) == Some(model.as_str()))
            .and_then(|m| m.get("owned_by"))
            .and_then(Value::as_str)
            .map(String::from);
        let info = ServerInfo {
            url: base.clone(),
            model: model.clone(),
            owned_by,
            models,
        };
        let http = Http {
            agent,
            completions: format!("{base}/v1/completions"),
            auth,
            limits: StreamLimits::for_request(opts.max_tokens, opts.choices, &model),
            model,
            max_tokens: opts.max_tokens,
            choices: opts.choices,
            timeout: opts.timeout,
            deadline: opts.deadline,
        };
        Ok((http, info))
    }

    /// The deadline of a request of `prompt_tokens`: `--request-deadline`,
    /// else [`default_deadline`] of the tokens asked, every choice's.
    pub fn deadline(&self, prompt_tokens: usize) -> Duration {
        let asked = self.max_tokens.saturating_mul(self.choices);
        self.deadline
            .unwrap_or_else(|| default_deadline(self.timeout, prompt_tokens, asked))
    }

    /// What each request's stream may carry.
    pub fn limits(&self) -> StreamLimits {
        self.limits
    }

    /// The body of one request for `prompt` (`n` only when asking for
    /// more than one choice, so a one-choice body is what it always was).
    fn request_body(&self, prompt: &[u32]) -> Value {
        let mut body = json!({
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if self.choices > 1 {
            body["n"] = json!(self.choices);
        }
        body
    }
}

impl Backend for Http {
    type Client = ();

    fn connect(&self, _client: usize, _prompts: &[Vec<u32>]) {}

    fn send(
        &self,
        _client: &mut (),
        prompt: &[u32],
        max_new_tokens: usize,
        choices: usize,
    ) -> Result<Reply, Failure> {
        debug_assert_eq!(
            (max_new_tokens, choices),
            (self.max_tokens, self.choices),
            "made for one count"
        );
        let start = Instant::now();
        let deadline = self.deadline(prompt.len());
        let mut req = self
            .agent
            .post(&self.completions)
            .config()
            .timeout_global(Some(deadline))
            .build()
            .header("Accept", "text/event-stream");
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        // A deadline that passed is named as such, whichever read noticed it.
        let late = |f: Failure| {
            if start.elapsed() >= deadline {
                Failure::Deadline {
                    seconds: deadline.as_secs_f64(),
                }
            } else {
                f
            }
        };
        let resp = req
            .send_json(self.request_body(prompt))
            .map_err(|e| late(Failure::transport(&e)))?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        if status != 200 {
            return Err(status_error(status, &mut body));
        }
        // ureq's own cap lies past ours, so ours (which names the bound) trips first.
        let cap = self.limits.bytes + self.limits.line as u64 + 2;
        let reader = BufReader::new(body.into_with_config().limit(cap).reader());
        let stream = read_stream(reader, &self.limits, || start.elapsed()).map_err(late)?;
        stream.reply(prompt.len())
    }
}

/// `url` as the base of the API's paths: `http://` only (this build has no
/// TLS), without a trailing `/` or `/v1`.
pub fn base_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
    if trimmed.starts_with("https://") {
        return Err(format!(
            "--url {url}: https is not supported (this build has no TLS); use http:// or a local TLS proxy"
        ));
    }
    match trimmed.strip_prefix("http://") {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => Ok(trimmed.to_string()),
        _ => Err(format!("--url {url}: expected http://HOST:PORT")),
    }
}

/// An error answer as a failure: `HTTP 429: <the error's message>`, the
/// message taken from the OpenAI error object when there is one, else the
/// body quoted.
fn status_error(status: u16, body: &mut ureq::Body) -> Failure {
    let text = read_text(body).unwrap_or_else(|e| format!("(body unreadable: {e})"));
    let parsed: Option<Value> = serde_json::from_str(&text).ok();
    let message = parsed.as_ref().and_then(|v| {
        let e = v.get("error").unwrap_or(v);
        e.get("message").and_then(Value::as_str).or_else(|| e.as_str())
    });
    let said = match message {
        Some(m) => Said::Message(one_line(m)),
        None if text.trim().is_empty() => Said::Nothing,
        None => Said::Body(clip(&text)),
    };
    Failure::HttpStatus { status, said }
}

/// A whole (bounded) answer body as text.
fn read_text(body: &mut ureq::Body) -> Result<String, String> {
    body.with_config()
        .limit(BODY_LIMIT)
        .lossy_utf8(true)
        .read_to_string()
        .map_err(|e| format!("reading the answer: {e}"))
}

/// The start of `text` on one line, quoted, for an error message.
fn quote(text: &str) -> String {
    format!("`{}`", clip(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_trimmed() {
        assert_eq!(
            base_url("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(base_url("http://h:1/v1").unwrap(), "http://h:1");
        assert!(base_url("https://h")
            .unwrap_err()
            .contains("https is not supported"));
        for bad in ["127.0.0.1:8080", "http://", "ftp://x", "http://a b"] {
            assert!(
                base_url(bad).unwrap_err().contains("expected http://HOST:PORT"),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_request_asks_for_exactly_max_tokens_greedily() {
        let http = Http {
            agent: ureq::Agent::new_with_defaults(),
            completions: String::new(),
            auth: None,
            model: "m".into(),
            max_tokens: 7,
            choices: 1,
            timeout: Duration::from_secs(60),
            deadline: None,
            limits: StreamLimits::for_request(7, 1, "m"),
        };
        let b = http.request_body(&[1, 2]);
        assert!(
            b.get("n").is_none(),
            "one choice: no `n`, the body as it always was"
        );
        assert_eq!(b["prompt"], json!([1, 2]));
        assert_eq!(b["max_tokens"], 7);
        assert_eq!(b["temperature"], 0.0);
        assert_eq!(
            (b["ignore_eos"].clone(), b["stream"].clone()),
            (json!(true), json!(true))
        );
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["model"], "m");
        let n8 = Http { choices: 8, ..http };
        assert_eq!(n8.request_body(&[1])["n"], 8);
    }
}
