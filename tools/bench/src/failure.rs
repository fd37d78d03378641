//! Why a request failed, as a value: a [`Failure`] is made where the
//! failure is seen (the HTTP client, the stream reader, the runner's token
//! count, the in-process engine) and carried by the request's record. Its
//! `Display` is the sentence users read (the report's `error`, the status
//! line); its [`Cause`] is what the drill groups by and checks, and the
//! report's JSON keeps the whole value (`raw[].cause`), so every reader
//! sorts failures by the same kind instead of by the words of a message.

use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};

use crate::deadline::{DEADLINE_PER_PROMPT_TOKEN, DEADLINE_PER_TOKEN};

/// Why one request failed. Each kind keeps what its message names, and
/// `Display` renders that message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Failure {
    /// The server answered with an error status: `HTTP 429: <its words>`.
    HttpStatus { status: u16, said: Said },
    /// No connection: refused, reset or closed before the answer
    /// (`io: Connection refused (os error 111)`); the client's words.
    Connection { error: String },
    /// No answer within `--http-timeout` (`timeout: ...`); the client's words.
    TimedOut { error: String },
    /// The request could not be sent or answered for another reason of the
    /// HTTP client (a protocol error, a host not found); its words.
    Transport { error: String },
    /// The request's deadline passed, whichever read noticed it.
    Deadline { seconds: f64 },
    /// No bytes of the stream within `--http-timeout`, after `events` events.
    StreamStalled { events: usize, error: String },
    /// Reading the stream failed after `events` events (a reset
    /// connection, a line that is not UTF-8).
    StreamBroke { events: usize, error: String },
    /// The stream ended before `data: [DONE]`, after `events` events.
    StreamEnded { events: usize },
    /// A line of the stream went past `limit` bytes.
    LineTooLong { limit: usize },
    /// An event (its data lines joined) went past `limit` bytes.
    EventTooLong { limit: usize },
    /// The stream went past `limit` events for `asked` tokens.
    TooManyEvents { limit: usize, asked: usize },
    /// The stream went past `limit` bytes for `asked` tokens.
    StreamTooLong { limit: u64, asked: usize },
    /// A line that is not server-sent events (clipped).
    NotEventStream { line: String },
    /// An event whose data is not JSON: the parser's words and the data (clipped).
    NotJson { error: String, data: String },
    /// An error object sent mid-stream.
    ErrorEvent { said: Said },
    /// A chunk without `choices` (clipped).
    NoChoices { data: String },
    /// A `usage` without its token counts (the chunk, clipped).
    UsageWithoutCounts { data: String },
    /// No `usage` at all (the server ignored `stream_options.include_usage`).
    NoUsage,
    /// `usage` counts `usage` completion tokens but `chunks` were streamed.
    CompletionMiscount { usage: usize, chunks: usize },
    /// `usage` counts `usage` prompt tokens but `sent` were sent.
    PromptMiscount { usage: usize, sent: usize },
    /// Fewer tokens than asked; `stop` is why generation stopped.
    Short {
        tokens: usize,
        asked: usize,
        stop: String,
    },
    /// More tokens than asked.
    Long {
        tokens: usize,
        asked: usize,
        stop: String,
    },
    /// Another number of completions than the `asked` choices (`--choices`,
    /// OpenAI `n`): `got` is the most the answer gave (its highest `index` + 1).
    Choices { got: usize, asked: usize },
    /// The in-process engine returned an error (its words).
    Engine { message: String },
    /// The in-process engine panicked (the panic's message).
    Panicked { message: String },
}

/// What an error answer said besides its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Said {
    /// An empty body.
    Nothing,
    /// The error object's message, on one line.
    Message(String),
    /// A body that is not an error object, on one line and clipped
    /// (shown between backticks).
    Body(String),
}

/// The kind of a failure, as the drill groups and checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// An error status.
    Status(u16),
    /// The connection failed before an answer.
    Connection,
    /// No answer, or no next bytes, within the timeout.
    TimedOut,
    /// The request's deadline passed.
    Deadline,
    /// The stream was cut mid-response (broke, or ended before `[DONE]`).
    StreamCut,
    /// The stream went past one of the client's bounds.
    PastBound,
    /// Fewer or more tokens than asked, or a `usage` that disagrees with the
    /// tokens streamed.
    WrongCount,
    /// Anything else: a stream that is not one, an error event, an engine
    /// error, a panic.
    Other,
}

impl Failure {
    /// The kind this failure is counted as.
    pub fn cause(&self) -> Cause {
        use Failure::*;
        match self {
            HttpStatus { status, .. } => Cause::Status(*status),
            Connection { .. } => Cause::Connection,
            TimedOut { .. } | StreamStalled { .. } => Cause::TimedOut,
            Deadline { .. } => Cause::Deadline,
            StreamBroke { .. } | StreamEnded { .. } => Cause::StreamCut,
            LineTooLong { .. } | EventTooLong { .. } | TooManyEvents { .. } | StreamTooLong { .. } => {
                Cause::PastBound
            }
            CompletionMiscount { .. } | Short { .. } | Long { .. } | Choices { .. } => Cause::WrongCount,
            Transport { .. }
            | NotEventStream { .. }
            | NotJson { .. }
            | ErrorEvent { .. }
            | NoChoices { .. }
            | UsageWithoutCounts { .. }
            | NoUsage
            | PromptMiscount { .. }
            | Engine { .. }
            | Panicked { .. } => Cause::Other,
        }
    }

    /// For a stream past its bounds, which bound: the start of its message
    /// (`line too long`, `too many events`, ...).
    pub fn bound(&self) -> Option<&'static str> {
        match self {
            Failure::LineTooLong { .. } => Some("line too long"),
            Failure::EventTooLong { .. } => Some("event too long"),
            Failure::TooManyEvents { .. } => Some("too many events"),
            Failure::StreamTooLong { .. } => Some("stream too long"),
            _ => None,
        }
    }
}

/// What went wrong under a request, as the HTTP client or the OS tells it.
enum Net {
    TimedOut,
    Connection,
    Other,
}

/// An error of the HTTP client by its kind, not its words: a timeout, a
/// connection refused, reset or closed, or something else.
fn net(e: &ureq::Error) -> Net {
    match e {
        ureq::Error::Timeout(_) => Net::TimedOut,
        ureq::Error::ConnectionFailed => Net::Connection,
        ureq::Error::Io(io) => io_net(io),
        _ => Net::Other,
    }
}

/// An I/O error by its kind; one that carries an error of the HTTP client
/// (what its body reader returns) by that one's.
fn io_net(e: &io::Error) -> Net {
    if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>()) {
        return net(inner);
    }
    use io::ErrorKind::*;
    match e.kind() {
        TimedOut | WouldBlock => Net::TimedOut,
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | BrokenPipe
        | UnexpectedEof => Net::Connection,
        _ => Net::Other,
    }
}

impl Failure {
    /// An error of the HTTP client before the answer began (connecting,
    /// sending, waiting for the head), in its words.
    pub fn transport(e: &ureq::Error) -> Failure {
        let error = e.to_string();
        match net(e) {
            Net::TimedOut => Failure::TimedOut { error },
            Net::Connection => Failure::Connection { error },
            Net::Other => Failure::Transport { error },
        }
    }

    /// A read of the event stream that failed after `events` events: a
    /// stall if it timed out, else a break.
    pub fn stream_read(events: usize, e: &io::Error) -> Failure {
        let error = one_line(&e.to_string());
        match io_net(e) {
            Net::TimedOut => Failure::StreamStalled { events, error },
            Net::Connection | Net::Other => Failure::StreamBroke { events, error },
        }
    }
}

impl fmt::Display for Said {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Said::Nothing => Ok(()),
            Said::Message(m) => f.write_str(m),
            Said::Body(b) => write!(f, "`{b}`"),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Failure::*;
        // A bound's message starts with its name.
        if let Some(bound) = self.bound() {
            write!(f, "{bound}: ")?;
        }
        match self {
            HttpStatus { status, said: Said::Nothing } => write!(f, "HTTP {status}"),
            HttpStatus { status, said } => write!(f, "HTTP {status}: {said}"),
            Connection { error } | TimedOut { error } | Transport { error } => f.write_str(error),
            Deadline { seconds } => write!(
                f,
                "request deadline passed: {seconds:.1} s (--request-deadline; by default --http-timeout + {} s per \
                 token asked + {} ms per prompt token)",
                DEADLINE_PER_TOKEN.as_secs(),
                DEADLINE_PER_PROMPT_TOKEN.as_millis()
            ),
            StreamStalled { events, error } | StreamBroke { events, error } => {
                write!(f, "the event stream broke after {events} events: {error}")
            }
            StreamEnded { events } => {
                write!(f, "the event stream ended without `data: [DONE]` after {events} events")
            }
            LineTooLong { limit } => write!(f, "a line of the event stream went past {limit} bytes"),
            EventTooLong { limit } => write!(f, "an event of the stream went past {limit} bytes"),
            TooManyEvents { limit, asked } => {
                write!(f, "the stream went past {limit} events for {asked} tokens asked")
            }
            StreamTooLong { limit, asked } => write!(f, "past {limit} bytes for {asked} tokens asked"),
            NotEventStream { line } => write!(f, "not a server-sent event stream: line `{line}`"),
            NotJson { error, data } => write!(f, "a stream event is not JSON ({error}): `{data}`"),
            ErrorEvent { said } => write!(f, "error in the stream: {said}"),
            NoChoices { data } => write!(f, "a stream event has no `choices`: `{data}`"),
            UsageWithoutCounts { data } => write!(f, "a stream event's `usage` lacks its counts: `{data}`"),
            NoUsage => f.write_str(
                "the stream carried no `usage` (the server ignored `stream_options.include_usage`)",
            ),
            CompletionMiscount { usage, chunks } => write!(
                f,
                "`usage` counts {usage} completion tokens but {chunks} token chunks were streamed"
            ),
            PromptMiscount { usage, sent } => {
                write!(f, "`usage` counts {usage} prompt tokens but {sent} were sent")
            }
            Short { tokens, asked, stop } => write!(f, "short: {tokens} of {asked} tokens (stop: {stop})"),
            Long { tokens, asked, stop } => {
                write!(f, "long: {tokens} tokens where {asked} were asked (stop: {stop})")
            }
            Choices { got, asked } => {
                write!(f, "{got} choices where {asked} were asked for (`n`)")
            }
            Engine { message } => f.write_str(message),
            Panicked { message } => write!(f, "panicked: {message}"),
        }
    }
}

/// How much of what a server sent a failure quotes, in characters.
const QUOTE: usize = 120;

/// `text` on one line (its runs of white space made one space).
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The start of `text` on one line, as a failure quotes it: at most
/// [`QUOTE`] characters, `…` marking a cut.
pub fn clip(text: &str) -> String {
    let line = one_line(text);
    if line.chars().count() > QUOTE {
        format!("{}…", line.chars().take(QUOTE).collect::<String>())
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind's message, as users read it (and as reports before causes
    /// were recorded wrote it), and the kind it counts as.
    #[test]
    fn every_failure_says_what_it_always_said() {
        let cases: Vec<(Failure, &str, Cause)> = vec![
            (
                Failure::HttpStatus {
                    status: 429,
                    said: Said::Message("too many requests".into()),
                },
                "HTTP 429: too many requests",
                Cause::Status(429),
            ),
            (
                Failure::HttpStatus {
                    status: 503,
                    said: Said::Nothing,
                },
                "HTTP 503",
                Cause::Status(503),
            ),
            (
                Failure::HttpStatus {
                    status: 502,
                    said: Said::Body("<html>bad gateway</html>".into()),
                },
                "HTTP 502: `<html>bad gateway</html>`",
                Cause::Status(502),
            ),
            (
                Failure::Deadline { seconds: 6.04 },
                "request deadline passed: 6.0 s (--request-deadline; by default --http-timeout + 1 s per token \
                 asked + 10 ms per prompt token)",
                Cause::Deadline,
            ),
            (
                Failure::StreamStalled {
                    events: 3,
                    error: "timeout: per read".into(),
                },
                "the event stream broke after 3 events: timeout: per read",
                Cause::TimedOut,
            ),
            (
                Failure::StreamEnded { events: 2 },
                "the event stream ended without `data: [DONE]` after 2 events",
                Cause::StreamCut,
            ),
            (
                Failure::LineTooLong { limit: 65537 },
                "line too long: a line of the event stream went past 65537 bytes",
                Cause::PastBound,
            ),
            (
                Failure::EventTooLong { limit: 9 },
                "event too long: an event of the stream went past 9 bytes",
                Cause::PastBound,
            ),
            (
                Failure::TooManyEvents { limit: 12, asked: 4 },
                "too many events: the stream went past 12 events for 4 tokens asked",
                Cause::PastBound,
            ),
            (
                Failure::StreamTooLong { limit: 99, asked: 4 },
                "stream too long: past 99 bytes for 4 tokens asked",
                Cause::PastBound,
            ),
            (
                Failure::ErrorEvent {
                    said: Said::Message("out of memory".into()),
                },
                "error in the stream: out of memory",
                Cause::Other,
            ),
            (
                Failure::Short {
                    tokens: 3,
                    asked: 4,
                    stop: "stop".into(),
                },
                "short: 3 of 4 tokens (stop: stop)",
                Cause::WrongCount,
            ),
            (
                Failure::Choices { got: 1, asked: 8 },
                "1 choices where 8 were asked for (`n`)",
                Cause::WrongCount,
            ),
            (
                Failure::Panicked {
                    message: "boom".into(),
                },
                "panicked: boom",
                Cause::Other,
            ),
        ];
        for (failure, text, cause) in cases {
            assert_eq!(failure.to_string(), text);
            assert_eq!(failure.cause(), cause, "{text}");
        }
    }

    /// The HTTP client's errors are sorted by their kind, and keep its words.
    #[test]
    fn client_errors_are_sorted_by_kind() {
        let io = |kind| ureq::Error::Io(io::Error::from(kind));
        let timeout = Failure::transport(&ureq::Error::Timeout(ureq::Timeout::Global));
        assert_eq!(timeout.cause(), Cause::TimedOut);
        assert_eq!(timeout.to_string(), "timeout: global");
        for kind in [io::ErrorKind::ConnectionRefused, io::ErrorKind::ConnectionReset] {
            assert_eq!(
                Failure::transport(&io(kind)).cause(),
                Cause::Connection,
                "{kind:?}"
            );
        }
        let peer = ureq::Error::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "Peer disconnected"));
        assert_eq!(
            Failure::transport(&peer),
            Failure::Connection {
                error: "io: Peer disconnected".into()
            }
        );
        assert_eq!(
            Failure::transport(&ureq::Error::ConnectionFailed).cause(),
            Cause::Connection
        );
        assert_eq!(
            Failure::transport(&ureq::Error::HostNotFound).cause(),
            Cause::Other
        );
        // A read of the body: the client's timeout inside an I/O error is a stall.
        let stalled = io::Error::other(ureq::Error::Timeout(ureq::Timeout::PerRead));
        assert_eq!(Failure::stream_read(3, &stalled).cause(), Cause::TimedOut);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(Failure::stream_read(3, &reset).cause(), Cause::StreamCut);
    }

    /// The report's JSON keeps the whole failure, and reads it back.
    #[test]
    fn failures_travel_through_json() {
        let f = Failure::HttpStatus {
            status: 429,
            said: Said::Message("full".into()),
        };
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "http_status", "status": 429, "said": {"message": "full"}})
        );
        assert_eq!(serde_json::from_value::<Failure>(json).unwrap(), f);
        let none = serde_json::to_value(Failure::NoUsage).unwrap();
        assert_eq!(none, serde_json::json!({"kind": "no_usage"}));
    }
}
