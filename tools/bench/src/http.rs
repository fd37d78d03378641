//! The benchmark's requests sent to an OpenAI-compatible server
//! (`throughput --url`): a [`Backend`] that posts each prompt, as token ids,
//! to `/v1/completions` with `stream: true` and reads the server-sent events
//! back, one chunk per generated token.
//!
//! Every request asks for greedy decoding of exactly `max_tokens` tokens
//! (`temperature: 0`, `ignore_eos: true`, vLLM's name, which llama.cpp's
//! `llama-server` and `gpt2 serve` take too) and for the token counts
//! (`stream_options.include_usage`). A request succeeds only if the server's
//! `usage` and the number of streamed token chunks agree (and the runner
//! then checks they equal `max_tokens`); anything else is a failure whose
//! text names what was wrong, so that failures group by cause in the report.
//! No wait is unbounded: connecting, the answer's head and every read have
//! a timeout, and every request has a deadline as a whole (`--request-deadline`,
//! else [`default_deadline`] of its size). Nothing a server sends is buffered
//! without a bound: a line and an event at most [`StreamLimits::line`]
//! bytes, a stream at most [`StreamLimits::bytes`] and
//! [`StreamLimits::events`], all derived from the request ([`StreamLimits::for_request`]).

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::runner::{Backend, Reply, MAX_CLIENTS};
use super::ServerInfo;

/// How long opening a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest answer we read whole (the model list, an error body).
const BODY_LIMIT: u64 = 1 << 20;
/// How much of a bad answer an error quotes.
const QUOTE: usize = 120;

/// The longest line, and the longest event (its `data:` lines joined), of
/// an event stream, besides the model's name (which servers echo in every
/// chunk): one token's chunk is a few hundred bytes.
pub const LINE_LIMIT: usize = 64 << 10;
/// Bytes a stream may carry per token asked for, besides the model's name:
/// a generous bound on one chunk (id, object, created, model, one choice
/// with its text, index, logprobs and finish reason) and its blank line.
pub const BYTES_PER_TOKEN: u64 = 16 << 10;
/// Events a stream may carry beyond one per token asked for: a closing
/// chunk, the `usage` chunk, `[DONE]`, and a few a server may add.
pub const EVENT_SLACK: usize = 8;
/// Bytes a stream may carry beyond its tokens' (comments, keep-alives, the
/// `usage` chunk, `[DONE]`).
pub const STREAM_SLACK_BYTES: u64 = 256 << 10;
/// The default deadline of a request ([`default_deadline`]): time per
/// token asked for, and per prompt token, on top of `--http-timeout`.
pub const DEADLINE_PER_TOKEN: Duration = Duration::from_secs(1);
pub const DEADLINE_PER_PROMPT_TOKEN: Duration = Duration::from_millis(10);

/// The longest a request of `prompt_tokens` asking for `max_tokens` may
/// take when `--request-deadline` is not given: `timeout` (the silence the
/// server may keep before its answer begins) + 1 s per token asked for +
/// 10 ms per prompt token. Generous for any server that makes progress (a
/// 124M model on two cores streams tens of tokens a second), and a bound on
/// one that trickles bytes, each within `timeout`, forever.
/// At most [`MAX_DEADLINE`], as `--request-deadline`.
pub fn default_deadline(timeout: Duration, prompt_tokens: usize, max_tokens: usize) -> Duration {
    let times = |d: Duration, n: usize| d.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX));
    timeout
        .saturating_add(times(DEADLINE_PER_TOKEN, max_tokens))
        .saturating_add(times(DEADLINE_PER_PROMPT_TOKEN, prompt_tokens))
        .min(MAX_DEADLINE)
}

/// The longest deadline a request may have (`--request-deadline` and the default alike).
pub const MAX_DEADLINE: Duration = Duration::from_secs(86_400);

/// What one request's event stream may carry before it fails (each bound
/// its own failure kind, named in the error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Tokens asked for (named in the errors).
    pub max_tokens: usize,
    /// Longest line, and longest event (its data lines joined), bytes.
    pub line: usize,
    /// Most events (`data:` blocks, `[DONE]` included).
    pub events: usize,
    /// Most bytes in all.
    pub bytes: u64,
}

impl StreamLimits {
    /// The bounds for a request asking for `max_tokens` of model `model`
    /// (its name is echoed in every chunk): a line or event at most
    /// [`LINE_LIMIT`] + the name; `max_tokens` + [`EVENT_SLACK`] events; and
    /// (`max_tokens` + [`EVENT_SLACK`]) × ([`BYTES_PER_TOKEN`] + the name) +
    /// [`STREAM_SLACK_BYTES`] bytes. A request buffers one line and one
    /// event at a time, and a time per token chunk.
    pub fn for_request(max_tokens: usize, model: &str) -> StreamLimits {
        let name = model.len();
        let events = max_tokens.saturating_add(EVENT_SLACK);
        StreamLimits {
            max_tokens,
            line: LINE_LIMIT + name,
            events,
            bytes: (events as u64)
                .saturating_mul(BYTES_PER_TOKEN + name as u64)
                .saturating_add(STREAM_SLACK_BYTES),
        }
    }
}

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
    /// Tokens every request asks for.
    pub max_tokens: usize,
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
            limits: StreamLimits::for_request(opts.max_tokens, &model),
            model,
            max_tokens: opts.max_tokens,
            timeout: opts.timeout,
            deadline: opts.deadline,
        };
        Ok((http, info))
    }

    /// The deadline of a request of `prompt_tokens`: `--request-deadline`,
    /// else [`default_deadline`].
    pub fn deadline(&self, prompt_tokens: usize) -> Duration {
        self.deadline
            .unwrap_or_else(|| default_deadline(self.timeout, prompt_tokens, self.max_tokens))
    }

    /// What each request's stream may carry.
    pub fn limits(&self) -> StreamLimits {
        self.limits
    }

    /// The body of one request for `prompt`.
    fn request_body(&self, prompt: &[u32]) -> Value {
        json!({
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
    }
}

impl Backend for Http {
    type Client = ();

    fn connect(&self, _client: usize, _prompts: &[Vec<u32>]) {}

    fn send(&self, _client: &mut (), prompt: &[u32], max_new_tokens: usize) -> Result<Reply, String> {
        debug_assert_eq!(max_new_tokens, self.max_tokens, "made for one count");
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
        let late = |e: String| {
            if start.elapsed() >= deadline {
                format!(
                    "request deadline passed: {:.1} s (--request-deadline; by default --http-timeout + {} s per token \
                     asked + {} ms per prompt token)",
                    deadline.as_secs_f64(),
                    DEADLINE_PER_TOKEN.as_secs(),
                    DEADLINE_PER_PROMPT_TOKEN.as_millis()
                )
            } else {
                e
            }
        };
        let resp = req
            .send_json(self.request_body(prompt))
            .map_err(|e| late(e.to_string()))?;
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

/// An error answer as a failure's text: `HTTP 429: <the error's message>`,
/// the message taken from the OpenAI error object when there is one.
fn status_error(status: u16, body: &mut ureq::Body) -> String {
    let text = read_text(body).unwrap_or_else(|e| format!("(body unreadable: {e})"));
    let parsed: Option<Value> = serde_json::from_str(&text).ok();
    let message = parsed.as_ref().and_then(|v| {
        let e = v.get("error").unwrap_or(v);
        e.get("message")
            .and_then(Value::as_str)
            .or_else(|| e.as_str())
            .map(String::from)
    });
    match message {
        Some(m) => format!("HTTP {status}: {}", one_line(&m)),
        None if text.trim().is_empty() => format!("HTTP {status}"),
        None => format!("HTTP {status}: {}", quote(&text)),
    }
}

/// A whole (bounded) answer body as text.
fn read_text(body: &mut ureq::Body) -> Result<String, String> {
    body.with_config()
        .limit(BODY_LIMIT)
        .lossy_utf8(true)
        .read_to_string()
        .map_err(|e| format!("reading the answer: {e}"))
}

/// The start of `text` on one line, for an error message.
fn quote(text: &str) -> String {
    let line = one_line(text);
    if line.chars().count() > QUOTE {
        format!("`{}…`", line.chars().take(QUOTE).collect::<String>())
    } else {
        format!("`{line}`")
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The token counts of a completion (`usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What one streamed completion said, read to its `data: [DONE]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stream {
    /// When each chunk with a choice arrived (one per token).
    pub token_times: Vec<Duration>,
    /// When `[DONE]` arrived.
    pub done_at: Duration,
    /// The last `finish_reason` given.
    pub finish_reason: Option<String>,
    /// Whether the last chunk with a choice had empty text and a
    /// `finish_reason`: a closing chunk that some servers (llama-server)
    /// send after the last token.
    pub ends_with_closing_chunk: bool,
    /// The last `usage` given.
    pub usage: Option<Usage>,
}

/// Reads a server-sent event stream of completion chunks to `data: [DONE]`,
/// `now` telling the time of each. SSE parsing lives here alone: `data:`
/// lines (several in one event are joined by newlines) make an event, a
/// blank line ends it, `:` comments and `event:`, `id:`, `retry:` are
/// skipped. Errors: a line that is not SSE, an event that is not a JSON
/// chunk, an error object sent mid-stream, a stream that ends (or breaks)
/// before `[DONE]`; and, each its own kind, a stream past `limits`: a line
/// or event too long, too many events, too many bytes. It holds one line
/// and one event at a time, never more than `limits.line` bytes each.
pub fn read_stream(
    mut reader: impl BufRead,
    limits: &StreamLimits,
    mut now: impl FnMut() -> Duration,
) -> Result<Stream, String> {
    let mut stream = Stream::default();
    let mut data: Option<String> = None;
    let mut events = 0usize;
    let mut bytes = 0u64;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        buf.clear();
        let n = match (&mut reader)
            .take(limits.line as u64 + 1)
            .read_until(b'\n', &mut buf)
        {
            Ok(n) => n,
            Err(e) => {
                return Err(format!(
                    "the event stream broke after {events} events: {}",
                    one_line(&e.to_string())
                ))
            }
        };
        bytes += n as u64;
        if bytes > limits.bytes {
            return Err(format!(
                "stream too long: past {} bytes for {} tokens asked",
                limits.bytes, limits.max_tokens
            ));
        }
        let line = if n == 0 {
            None
        } else {
            if buf.last() == Some(&b'\n') {
                buf.pop();
            } else if buf.len() > limits.line {
                return Err(format!(
                    "line too long: a line of the event stream went past {} bytes",
                    limits.line
                ));
            }
            // (Otherwise the stream's last line, without its newline.)
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            match std::str::from_utf8(&buf) {
                Ok(l) => Some(l),
                Err(_) => {
                    return Err(format!(
                        "the event stream broke after {events} events: a line is not UTF-8"
                    ))
                }
            }
        };
        match line {
            // A blank line, or the end, dispatches the event.
            Some("") | None => {
                if let Some(d) = data.take() {
                    events += 1;
                    if events > limits.events {
                        return Err(format!(
                            "too many events: the stream went past {} events for {} tokens asked",
                            limits.events, limits.max_tokens
                        ));
                    }
                    if d.trim() == "[DONE]" {
                        stream.done_at = now();
                        return Ok(stream);
                    }
                    chunk(&mut stream, &d, now())?;
                }
                if line.is_none() {
                    return Err(format!(
                        "the event stream ended without `data: [DONE]` after {events} events"
                    ));
                }
            }
            Some(l) if l.starts_with(':') => {}
            Some(l) => {
                let (field, value) = l.split_once(':').unwrap_or((l, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "data" => {
                        let joined = data.as_ref().map_or(0, |d| d.len() + 1) + value.len();
                        if joined > limits.line {
                            return Err(format!(
                                "event too long: an event of the stream went past {} bytes",
                                limits.line
                            ));
                        }
                        match &mut data {
                            Some(d) => {
                                d.push('\n');
                                d.push_str(value);
                            }
                            None => data = Some(value.to_string()),
                        }
                    }
                    "event" | "id" | "retry" => {}
                    _ => return Err(format!("not a server-sent event stream: line {}", quote(l))),
                }
            }
        }
    }
}

/// One event's JSON chunk into `stream`, arrived at `at`.
fn chunk(stream: &mut Stream, data: &str, at: Duration) -> Result<(), String> {
    let v: Value = serde_json::from_str(data)
        .map_err(|e| format!("a stream event is not JSON ({e}): {}", quote(data)))?;
    if let Some(e) = v.get("error") {
        let m = e.get("message").and_then(Value::as_str).map(String::from);
        return Err(format!(
            "error in the stream: {}",
            m.map_or_else(|| quote(&e.to_string()), |m| one_line(&m))
        ));
    }
    let choices = v.get("choices").and_then(Value::as_array);
    let Some(choices) = choices else {
        return Err(format!("a stream event has no `choices`: {}", quote(data)));
    };
    if let Some(c) = choices.first() {
        let text = c.get("text").and_then(Value::as_str).unwrap_or("");
        let finish = c.get("finish_reason").and_then(Value::as_str);
        stream.token_times.push(at);
        stream.ends_with_closing_chunk = text.is_empty() && finish.is_some();
        if let Some(f) = finish {
            stream.finish_reason = Some(f.to_string());
        }
    }
    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
        let count = |k: &str| u.get(k).and_then(Value::as_u64).map(|n| n as usize);
        match (count("prompt_tokens"), count("completion_tokens")) {
            (Some(prompt_tokens), Some(completion_tokens)) => {
                stream.usage = Some(Usage {
                    prompt_tokens,
                    completion_tokens,
                })
            }
            _ => {
                return Err(format!(
                    "a stream event's `usage` lacks its counts: {}",
                    quote(data)
                ))
            }
        }
    }
    Ok(())
}

impl Stream {
    /// The request's reply, if the stream is consistent: a `usage` whose
    /// prompt count is `prompt_tokens` and whose completion count is the
    /// number of token chunks. Whether that count is the one asked for is
    /// the runner's check.
    pub fn reply(mut self, prompt_tokens: usize) -> Result<Reply, String> {
        let usage = self
            .usage
            .ok_or("the stream carried no `usage` (the server ignored `stream_options.include_usage`)")?;
        // A closing chunk after the last token is not a token.
        if self.ends_with_closing_chunk && self.token_times.len() == usage.completion_tokens + 1 {
            self.token_times.pop();
        }
        if self.token_times.len() != usage.completion_tokens {
            return Err(format!(
                "`usage` counts {} completion tokens but {} token chunks were streamed",
                usage.completion_tokens,
                self.token_times.len()
            ));
        }
        if usage.prompt_tokens != prompt_tokens {
            return Err(format!(
                "`usage` counts {} prompt tokens but {prompt_tokens} were sent",
                usage.prompt_tokens
            ));
        }
        Ok(Reply {
            tokens: usage.completion_tokens,
            ttft: self.token_times.first().copied().unwrap_or(self.done_at),
            // The end is `[DONE]`: what the client waited for.
            total: self.done_at,
            token_times: self.token_times,
            stop: self.finish_reason.unwrap_or_else(|| "none given".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` read as a stream, the clock ticking 1 ms per event.
    fn stream_of(text: &str) -> Result<Stream, String> {
        stream_within(text, &StreamLimits::for_request(16, "m"))
    }

    fn stream_within(text: &str, limits: &StreamLimits) -> Result<Stream, String> {
        let mut t = 0u64;
        read_stream(text.as_bytes(), limits, || {
            t += 1;
            Duration::from_millis(t)
        })
    }

    fn token(text: &str, finish: Option<&str>) -> String {
        format!(
            "data: {}\n\n",
            json!({"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]})
        )
    }

    fn usage(prompt: usize, completion: usize) -> String {
        format!(
            "data: {}\n\n",
            json!({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                   "total_tokens": prompt + completion}})
        )
    }

    #[test]
    fn a_well_formed_stream_is_a_reply() {
        let text = [
            ": a comment\n\n".to_string(),
            token("Hello", None),
            token("", None),
            "event: completion\r\ndata: ".to_string()
                + &json!({"choices": [{"text": "!", "finish_reason": "length"}]}).to_string()
                + "\r\n\r\n",
            usage(4, 3),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        let s = stream_of(&text).unwrap();
        assert_eq!(s.token_times.len(), 3, "an empty piece is a token too");
        assert_eq!(s.finish_reason.as_deref(), Some("length"));
        let r = s.reply(4).unwrap();
        assert_eq!(r.tokens, 3);
        // The clock ticks once per event: tokens at 1, 2, 3 ms, [DONE] at 5.
        assert_eq!(r.ttft, Duration::from_millis(1));
        assert_eq!(r.total, Duration::from_millis(5));
        assert_eq!(r.token_times.len(), 3);
        assert_eq!(r.stop, "length");
    }

    #[test]
    fn usage_on_the_last_token_and_a_closing_chunk_are_understood() {
        // vLLM-style: usage on its own chunk; llama-server-style: a closing
        // chunk with empty text and a finish reason, usage on it.
        let closing = format!(
            "data: {}\n\n",
            json!({"choices": [{"text": "", "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 2, "completion_tokens": 2}})
        );
        let text = [
            token("a", None),
            token("b", None),
            closing,
            "data: [DONE]\n\n".into(),
        ]
        .concat();
        let r = stream_of(&text).unwrap().reply(2).unwrap();
        assert_eq!((r.tokens, r.token_times.len()), (2, 2));
    }

    #[test]
    fn inconsistent_streams_are_named_failures() {
        let done = "data: [DONE]\n\n".to_string();
        let fail = |parts: &[String], prompt: usize| stream_of(&parts.concat()).and_then(|s| s.reply(prompt));
        let e = fail(&[token("a", None), usage(1, 2), done.clone()], 1).unwrap_err();
        assert_eq!(
            e,
            "`usage` counts 2 completion tokens but 1 token chunks were streamed"
        );
        let e = fail(&[token("a", None), done.clone()], 1).unwrap_err();
        assert!(e.contains("no `usage`"), "{e}");
        let e = fail(&[token("a", None), usage(3, 1), done.clone()], 1).unwrap_err();
        assert_eq!(e, "`usage` counts 3 prompt tokens but 1 were sent");
        let e = fail(&[token("a", None), usage(1, 1)], 1).unwrap_err();
        assert_eq!(e, "the event stream ended without `data: [DONE]` after 2 events");
        let e = fail(&["data: {not json\n\n".into()], 1).unwrap_err();
        assert!(e.starts_with("a stream event is not JSON"), "{e}");
        let e = fail(&["<html>oops</html>\n".into()], 1).unwrap_err();
        assert_eq!(e, "not a server-sent event stream: line `<html>oops</html>`");
        let e = fail(
            &[format!(
                "data: {}\n\n",
                json!({"error": {"message": "out of\nmemory"}})
            )],
            1,
        )
        .unwrap_err();
        assert_eq!(e, "error in the stream: out of memory");
        let e = fail(&[format!("data: {}\n\n", json!({"id": 1}))], 1).unwrap_err();
        assert!(e.starts_with("a stream event has no `choices`"), "{e}");
    }

    #[test]
    fn the_limits_follow_the_request() {
        let l = StreamLimits::for_request(30, "gpt2");
        assert_eq!(l.line, LINE_LIMIT + 4);
        assert_eq!(l.events, 38);
        assert_eq!(l.bytes, 38 * (BYTES_PER_TOKEN + 4) + STREAM_SLACK_BYTES);
        // 30 tokens of `gpt2 serve`'s chunks (about 200 bytes each) fit with room to spare.
        let chunk = token(&"x".repeat(100), None);
        let text = [chunk.repeat(30), usage(5, 30), "data: [DONE]\n\n".into()].concat();
        assert!(stream_within(&text, &l).is_ok());
        let t = Duration::from_secs(60);
        assert_eq!(default_deadline(t, 200, 30), Duration::from_secs(92));
        assert_eq!(default_deadline(t, 0, usize::MAX), MAX_DEADLINE);
    }

    /// Every bound is its own named failure, reached after reading at most
    /// about the bound (never the whole of an endless stream).
    #[test]
    fn streams_past_their_limits_fail_by_kind() {
        let l = StreamLimits::for_request(4, "m");
        // No newline ever: the line is refused at the line limit.
        let mut endless = std::io::repeat(b'x').take(1 << 30);
        let e = read_stream(BufReader::new(&mut endless), &l, Duration::default).unwrap_err();
        assert_eq!(
            e,
            format!(
                "line too long: a line of the event stream went past {} bytes",
                l.line
            )
        );
        assert!(
            endless.limit() > (1 << 30) - 2 * l.line as u64,
            "read far past the line limit"
        );
        // Good events forever: refused past max_tokens + slack events.
        let forever = token("a", None).repeat(1000);
        let e = stream_within(&forever, &l).unwrap_err();
        assert_eq!(
            e,
            "too many events: the stream went past 12 events for 4 tokens asked"
        );
        // Comments forever (no events at all): refused past the byte bound.
        let comments = ": keep-alive\n".repeat((l.bytes as usize / 13) + 10);
        let e = stream_within(&comments, &l).unwrap_err();
        assert_eq!(
            e,
            format!("stream too long: past {} bytes for 4 tokens asked", l.bytes)
        );
        // One event of many short data lines: refused at the line limit.
        let long_event = "data: xxxxxxxxxxxxxxxx\n".repeat(l.line / 16);
        let e = stream_within(&long_event, &l).unwrap_err();
        assert_eq!(
            e,
            format!(
                "event too long: an event of the stream went past {} bytes",
                l.line
            )
        );
    }

    #[test]
    fn data_lines_of_one_event_are_joined() {
        let text = "data: {\"choices\":\ndata: [{\"text\":\"x\"}]}\n\ndata: [DONE]\n\n";
        assert_eq!(stream_of(text).unwrap().token_times.len(), 1);
    }

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
            timeout: Duration::from_secs(60),
            deadline: None,
            limits: StreamLimits::for_request(7, "m"),
        };
        let b = http.request_body(&[1, 2]);
        assert_eq!(b["prompt"], json!([1, 2]));
        assert_eq!(b["max_tokens"], 7);
        assert_eq!(b["temperature"], 0.0);
        assert_eq!(
            (b["ignore_eos"].clone(), b["stream"].clone()),
            (json!(true), json!(true))
        );
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["model"], "m");
    }
}
