//! Reading a server's answer to one streamed completion (`throughput
//! --url`): server-sent events, one chunk per generated token of a choice
//! (its `index`: several with `n`), read to `data: [DONE]` and checked
//! against the `usage` the server counts.
//!
//! SSE parsing lives here alone: `data:` lines (several in one event are
//! joined by newlines) make an event, a blank line ends it, `:` comments and
//! `event:`, `id:`, `retry:` are skipped. Nothing a server sends is buffered
//! without a bound: a line and an event at most [`StreamLimits::line`]
//! bytes, a stream at most [`StreamLimits::bytes`] and
//! [`StreamLimits::events`], all derived from the request
//! ([`StreamLimits::for_request`]). Each way a stream can be wrong is its
//! own [`Failure`].

use std::io::{BufRead, Read};
use std::time::Duration;

use serde_json::Value;

use crate::failure::{clip, one_line, Failure, Said};
use crate::runner::{Choice, Reply};

/// The longest line, and the longest event (its `data:` lines joined), of
/// an event stream, besides the model's name (which servers echo in every
/// chunk): one token's chunk is a few hundred bytes.
pub const LINE_LIMIT: usize = 64 << 10;
/// Bytes a stream may carry per token asked for, besides the model's name:
/// a generous bound on one chunk (id, object, created, model, one choice
/// with its text, index, logprobs and finish reason) and its blank line.
pub const BYTES_PER_TOKEN: u64 = 16 << 10;
/// Events a stream may carry per choice beyond one per token asked for: a
/// closing chunk, the `usage` chunk, `[DONE]`, and a few a server may add.
pub const EVENT_SLACK: usize = 8;
/// Bytes a stream may carry beyond its tokens' (comments, keep-alives, the
/// `usage` chunk, `[DONE]`).
pub const STREAM_SLACK_BYTES: u64 = 256 << 10;

/// What one request's event stream may carry before it fails (each bound
/// its own failure kind, named in the error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Tokens asked for, every choice's (named in the errors).
    pub max_tokens: usize,
    /// Choices asked for (`n`): a chunk of a higher `index` fails.
    pub choices: usize,
    /// Longest line, and longest event (its data lines joined), bytes.
    pub line: usize,
    /// Most events (`data:` blocks, `[DONE]` included).
    pub events: usize,
    /// Most bytes in all.
    pub bytes: u64,
}

impl StreamLimits {
    /// The bounds for a request asking for `choices` completions of
    /// `max_tokens` each of model `model` (its name is echoed in every
    /// chunk): a line or event at most [`LINE_LIMIT`] + the name; `choices`
    /// × (`max_tokens` + [`EVENT_SLACK`]) events; and that many times
    /// ([`BYTES_PER_TOKEN`] + the name) + [`STREAM_SLACK_BYTES`] bytes. A
    /// request buffers one line and one event at a time, and a time per
    /// token chunk.
    pub fn for_request(max_tokens: usize, choices: usize, model: &str) -> StreamLimits {
        let name = model.len();
        let max_tokens = max_tokens.saturating_mul(choices);
        let events = max_tokens.saturating_add(EVENT_SLACK.saturating_mul(choices));
        StreamLimits {
            max_tokens,
            choices,
            line: LINE_LIMIT + name,
            events,
            bytes: (events as u64)
                .saturating_mul(BYTES_PER_TOKEN + name as u64)
                .saturating_add(STREAM_SLACK_BYTES),
        }
    }
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
    /// Each choice, by its `index` (a chunk's choice without one is 0).
    pub choices: Vec<ChoiceStream>,
    /// When `[DONE]` arrived.
    pub done_at: Duration,
    /// The last `usage` given.
    pub usage: Option<Usage>,
}

/// What a stream said of one choice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChoiceStream {
    /// When each of its chunks arrived (one per token).
    pub token_times: Vec<Duration>,
    /// The last `finish_reason` given.
    pub finish_reason: Option<String>,
    /// Whether its last chunk had empty text and a `finish_reason`: a
    /// closing chunk that some servers (llama-server) send after the last
    /// token.
    pub ends_with_closing_chunk: bool,
}

/// Reads a server-sent event stream of completion chunks to `data: [DONE]`,
/// `now` telling the time of each. Fails on a line that is not SSE, an
/// event that is not a JSON chunk, an error object sent mid-stream, a
/// stream that ends (or breaks, or stalls) before `[DONE]`; and, each its
/// own kind, a stream past `limits`: a line or event too long, too many
/// events, too many bytes. It holds one line and one event at a time,
/// never more than `limits.line` bytes each.
pub fn read_stream(
    mut reader: impl BufRead,
    limits: &StreamLimits,
    mut now: impl FnMut() -> Duration,
) -> Result<Stream, Failure> {
    let mut stream = Stream::default();
    let mut sse = Sse::new(*limits);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let line = sse.next_line(&mut reader, &mut buf)?;
        if let Some(l) = line.filter(|l| !l.is_empty()) {
            sse.field(l)?;
            continue;
        }
        // A blank line, or the end, dispatches the event.
        if let Some(data) = sse.dispatch()? {
            if data.trim() == "[DONE]" {
                stream.done_at = now();
                return Ok(stream);
            }
            chunk(&mut stream, &data, now(), limits.choices)?;
        }
        if line.is_none() {
            return Err(Failure::StreamEnded { events: sse.events });
        }
    }
}

/// The event stream as it is read: bytes and events so far, within their
/// bounds, and the data of the event being gathered.
struct Sse {
    limits: StreamLimits,
    bytes: u64,
    /// Events dispatched, `[DONE]` included.
    events: usize,
    /// The `data:` lines of the current event, joined by newlines.
    data: Option<String>,
}

impl Sse {
    fn new(limits: StreamLimits) -> Sse {
        Sse {
            limits,
            bytes: 0,
            events: 0,
            data: None,
        }
    }

    /// The next line into `buf`, without its line ending; `None` at the end
    /// of the stream. Reads at most one byte past the line bound.
    fn next_line<'b>(
        &mut self,
        reader: &mut impl BufRead,
        buf: &'b mut Vec<u8>,
    ) -> Result<Option<&'b str>, Failure> {
        let limits = &self.limits;
        buf.clear();
        let n = reader
            .by_ref()
            .take(limits.line as u64 + 1)
            .read_until(b'\n', buf)
            .map_err(|e| Failure::stream_read(self.events, &e))?;
        self.bytes += n as u64;
        if self.bytes > limits.bytes {
            return Err(Failure::StreamTooLong {
                limit: limits.bytes,
                asked: limits.max_tokens,
            });
        }
        if n == 0 {
            return Ok(None);
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        } else if buf.len() > limits.line {
            return Err(Failure::LineTooLong { limit: limits.line });
        }
        // (Otherwise the stream's last line, without its newline.)
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        match std::str::from_utf8(buf) {
            Ok(l) => Ok(Some(l)),
            Err(_) => Err(Failure::StreamBroke {
                events: self.events,
                error: "a line is not UTF-8".into(),
            }),
        }
    }

    /// One line of an event: a comment, a field we skip, or data.
    fn field(&mut self, line: &str) -> Result<(), Failure> {
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "data" => self.data(value),
            "event" | "id" | "retry" => Ok(()),
            _ => Err(Failure::NotEventStream { line: clip(line) }),
        }
    }

    /// A `data:` line, joined to the event's others within the line bound.
    fn data(&mut self, value: &str) -> Result<(), Failure> {
        let joined = self.data.as_ref().map_or(0, |d| d.len() + 1) + value.len();
        if joined > self.limits.line {
            return Err(Failure::EventTooLong {
                limit: self.limits.line,
            });
        }
        match &mut self.data {
            Some(d) => {
                d.push('\n');
                d.push_str(value);
            }
            None => self.data = Some(value.to_string()),
        }
        Ok(())
    }

    /// The event gathered, if any, counted against the events bound.
    fn dispatch(&mut self) -> Result<Option<String>, Failure> {
        let Some(data) = self.data.take() else {
            return Ok(None);
        };
        self.events += 1;
        if self.events > self.limits.events {
            return Err(Failure::TooManyEvents {
                limit: self.limits.events,
                asked: self.limits.max_tokens,
            });
        }
        Ok(Some(data))
    }
}

/// One event's JSON chunk into `stream`, arrived at `at`, of a request
/// that asked for `asked` choices.
fn chunk(stream: &mut Stream, data: &str, at: Duration, asked: usize) -> Result<(), Failure> {
    let v: Value = serde_json::from_str(data).map_err(|e| Failure::NotJson {
        error: e.to_string(),
        data: clip(data),
    })?;
    if let Some(e) = v.get("error") {
        let said = match e.get("message").and_then(Value::as_str) {
            Some(m) => Said::Message(one_line(m)),
            None => Said::Body(clip(&e.to_string())),
        };
        return Err(Failure::ErrorEvent { said });
    }
    let Some(choices) = v.get("choices").and_then(Value::as_array) else {
        return Err(Failure::NoChoices { data: clip(data) });
    };
    for c in choices {
        let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
        // Bounded before anything is kept for it.
        let index = match usize::try_from(index) {
            Ok(i) if i < asked => i,
            _ => {
                let got = usize::try_from(index).map_or(usize::MAX, |i| i.saturating_add(1));
                return Err(Failure::Choices { got, asked });
            }
        };
        if stream.choices.len() <= index {
            stream.choices.resize_with(index + 1, ChoiceStream::default);
        }
        let choice = &mut stream.choices[index];
        let text = c.get("text").and_then(Value::as_str).unwrap_or("");
        let finish = c.get("finish_reason").and_then(Value::as_str);
        choice.token_times.push(at);
        choice.ends_with_closing_chunk = text.is_empty() && finish.is_some();
        if let Some(f) = finish {
            choice.finish_reason = Some(f.to_string());
        }
    }
    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
        let count = |k: &str| u.get(k).and_then(Value::as_u64).map(|n| n as usize);
        let (Some(prompt_tokens), Some(completion_tokens)) =
            (count("prompt_tokens"), count("completion_tokens"))
        else {
            return Err(Failure::UsageWithoutCounts { data: clip(data) });
        };
        stream.usage = Some(Usage {
            prompt_tokens,
            completion_tokens,
        });
    }
    Ok(())
}

impl Stream {
    /// The request's reply, if the stream is consistent: a `usage` whose
    /// prompt count is `prompt_tokens` and whose completion count is the
    /// number of token chunks, every choice's. Whether each choice has the
    /// count asked, and whether there are as many choices as asked, is the
    /// runner's check (a stream of no token at all is one choice of none).
    pub fn reply(mut self, prompt_tokens: usize) -> Result<Reply, Failure> {
        let usage = self.usage.ok_or(Failure::NoUsage)?;
        let chunks = |s: &Stream| s.choices.iter().map(|c| c.token_times.len()).sum::<usize>();
        // A closing chunk after a choice's last token is not a token.
        let closing = self.choices.iter().filter(|c| c.ends_with_closing_chunk).count();
        if closing > 0 && chunks(&self) == usage.completion_tokens + closing {
            for c in self.choices.iter_mut().filter(|c| c.ends_with_closing_chunk) {
                c.token_times.pop();
            }
        }
        if chunks(&self) != usage.completion_tokens {
            return Err(Failure::CompletionMiscount {
                usage: usage.completion_tokens,
                chunks: chunks(&self),
            });
        }
        if usage.prompt_tokens != prompt_tokens {
            return Err(Failure::PromptMiscount {
                usage: usage.prompt_tokens,
                sent: prompt_tokens,
            });
        }
        if self.choices.is_empty() {
            self.choices.push(ChoiceStream::default());
        }
        let first = self.choices.iter().filter_map(|c| c.token_times.first()).min();
        Ok(Reply {
            ttft: first.copied().unwrap_or(self.done_at),
            // The end is `[DONE]`: what the client waited for.
            total: self.done_at,
            choices: self
                .choices
                .into_iter()
                .map(|c| Choice {
                    tokens: c.token_times.len(),
                    token_times: c.token_times,
                    stop: c.finish_reason.unwrap_or_else(|| "none given".into()),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deadline::{default_deadline, MAX_DEADLINE};
    use serde_json::json;
    use std::io::BufReader;

    /// `text` read as a stream, the clock ticking 1 ms per event.
    fn stream_of(text: &str) -> Result<Stream, Failure> {
        stream_within(text, &StreamLimits::for_request(16, 1, "m"))
    }

    fn stream_within(text: &str, limits: &StreamLimits) -> Result<Stream, Failure> {
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
        assert_eq!(s.choices[0].token_times.len(), 3, "an empty piece is a token too");
        assert_eq!(s.choices[0].finish_reason.as_deref(), Some("length"));
        let r = s.reply(4).unwrap();
        assert_eq!((r.tokens(), r.choices.len()), (3, 1));
        // The clock ticks once per event: tokens at 1, 2, 3 ms, [DONE] at 5.
        assert_eq!(r.ttft, Duration::from_millis(1));
        assert_eq!(r.total, Duration::from_millis(5));
        assert_eq!(r.choices[0].token_times.len(), 3);
        assert_eq!(r.choices[0].stop, "length");
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
        assert_eq!((r.tokens(), r.choices[0].token_times.len()), (2, 2));
    }

    fn of_choice(index: usize, text: &str, finish: Option<&str>) -> String {
        format!(
            "data: {}\n\n",
            json!({"choices": [{"index": index, "text": text, "finish_reason": finish}]})
        )
    }

    /// `n`: each chunk's `index` says its choice; the choices interleave,
    /// each may end with a closing chunk, and `usage` counts them all.
    #[test]
    fn the_choices_of_a_stream_are_told_apart_by_index() {
        let l = StreamLimits::for_request(2, 2, "m");
        assert_eq!((l.max_tokens, l.choices, l.events), (4, 2, 4 + 2 * EVENT_SLACK));
        let text = [
            of_choice(1, "a", None),
            of_choice(0, "b", None),
            of_choice(0, "c", None),
            of_choice(1, "d", None),
            of_choice(1, "", Some("length")),
            of_choice(0, "", Some("length")),
            usage(3, 4),
            "data: [DONE]\n\n".into(),
        ]
        .concat();
        let r = stream_within(&text, &l).unwrap().reply(3).unwrap();
        assert_eq!(r.tokens(), 4);
        let times: Vec<Vec<u64>> = r
            .choices
            .iter()
            .map(|c| c.token_times.iter().map(|t| t.as_millis() as u64).collect())
            .collect();
        assert_eq!(
            times,
            [vec![2, 3], vec![1, 4]],
            "by index, closing chunks dropped"
        );
        assert_eq!(r.ttft, Duration::from_millis(1), "the first token of any choice");
        // A choice past those asked for fails before anything is kept for it.
        let e = stream_within(&of_choice(2, "x", None), &l).unwrap_err();
        assert_eq!(e, Failure::Choices { got: 3, asked: 2 });
        let huge = format!(
            "data: {}\n\n",
            json!({"choices": [{"index": u64::MAX, "text": "x"}]})
        );
        assert!(matches!(
            stream_within(&huge, &l).unwrap_err(),
            Failure::Choices { asked: 2, .. }
        ));
    }

    #[test]
    fn inconsistent_streams_are_named_failures() {
        let done = "data: [DONE]\n\n".to_string();
        let fail = |parts: &[String], prompt: usize| {
            stream_of(&parts.concat())
                .and_then(|s| s.reply(prompt))
                .map_err(|e| e.to_string())
        };
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
        let l = StreamLimits::for_request(30, 1, "gpt2");
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
        let l = StreamLimits::for_request(4, 1, "m");
        // No newline ever: the line is refused at the line limit.
        let mut endless = std::io::repeat(b'x').take(1 << 30);
        let e = read_stream(BufReader::new(&mut endless), &l, Duration::default)
            .unwrap_err()
            .to_string();
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
        let e = stream_within(&forever, &l).unwrap_err().to_string();
        assert_eq!(
            e,
            "too many events: the stream went past 12 events for 4 tokens asked"
        );
        // Comments forever (no events at all): refused past the byte bound.
        let comments = ": keep-alive\n".repeat((l.bytes as usize / 13) + 10);
        let e = stream_within(&comments, &l).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("stream too long: past {} bytes for 4 tokens asked", l.bytes)
        );
        // One event of many short data lines: refused at the line limit.
        let long_event = "data: xxxxxxxxxxxxxxxx\n".repeat(l.line / 16);
        let e = stream_within(&long_event, &l).unwrap_err().to_string();
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
        assert_eq!(stream_of(text).unwrap().choices[0].token_times.len(), 1);
    }
}
