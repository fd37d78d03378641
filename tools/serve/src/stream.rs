//! From the engine's tokens to the client's text: one blocking task per
//! request forwards each token as a text piece (never half a UTF-8
//! character, never the start of a stop string that may yet complete) and
//! cancels the sequence when the client is gone, or has not taken a piece
//! for the write-stall timeout (then its connection is closed too).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tokio::sync::mpsc::{self, error::TrySendError};

use super::error::ApiError;
use super::state::{App, Connection, Engine, InFlight, RequestLog};
use gpt2::scheduler::{Event, RequestHandle};
use gpt2::tokenizer::TextStream;
use gpt2::{Generation, StopReason};

/// What the bridge sends to the HTTP side.
#[derive(Debug)]
pub enum Update {
    /// The text of one generated token (empty when it completes no character
    /// yet, or is held back as a possible stop string's start).
    Token(String),
    /// The end: the text still held back, and the summary; or the error.
    End(Result<Finish, ApiError>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub text: String,
    /// `length` (max_tokens or the context window) or `stop` (EOS or a stop string).
    pub reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Holds back text that may be the start of a stop string.
#[derive(Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        StopFilter {
            stops,
            pending: String::new(),
        }
    }

    /// Adds `piece`; returns the text safe to send, and whether a stop string
    /// matched (the text is then everything before it, and the rest is dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.pending.truncate(at);
            return (std::mem::take(&mut self.pending), true);
        }
        // The earliest position from which the rest could still grow into a
        // stop string; everything before it can go.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let rest = self.pending.split_off(hold);
        (std::mem::replace(&mut self.pending, rest), false)
    }

    /// The end of the text: whatever was held back goes out.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Everything one request's bridge needs.
pub struct Job {
    pub app: Arc<App>,
    pub engine: Arc<Engine>,
    pub handle: RequestHandle,
    pub stops: Vec<String>,
    pub prompt_tokens: usize,
    /// The token that ends this generation (not sent as text), if one does.
    pub eos: Option<u32>,
    pub arrived: Instant,
    pub log: Arc<RequestLog>,
    pub in_flight: InFlight,
    /// The runtime the HTTP side runs on (the bounded wait for a slow reader).
    pub runtime: tokio::runtime::Handle,
    /// How long a piece may wait for the client to take the previous ones.
    pub write_stall: Duration,
    /// The request's connection, closed when its reader stalls.
    pub connection: Option<Arc<Connection>>,
}

/// Why a piece could not be handed to the HTTP side.
enum Unsent {
    /// The receiver is gone: the client left, or the server answered already.
    Gone,
    /// The client took nothing for the write-stall timeout.
    Stalled,
}

/// Hands `update` over, waiting at most `stall` while the channel is full
/// (it fills only when the client does not read: the response is written
/// no faster than the client takes it).
fn send(
    tx: &mpsc::Sender<Update>,
    update: Update,
    runtime: &tokio::runtime::Handle,
    stall: Duration,
) -> Result<(), Unsent> {
    match tx.try_send(update) {
        Ok(()) => Ok(()),
        Err(TrySendError::Closed(_)) => Err(Unsent::Gone),
        Err(TrySendError::Full(update)) => {
            match runtime.block_on(tokio::time::timeout(stall, tx.send(update))) {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Unsent::Gone),
                Err(_) => Err(Unsent::Stalled),
            }
        }
    }
}

/// How the relay of a request's tokens ended.
enum End {
    /// The generation is over: its summary, or its error, goes to the client last.
    Over(Result<Finish, ApiError>),
    /// The client cannot take more.
    Unsent(Unsent),
}

/// Runs on a blocking thread until the request is over; `tx` closing (the
/// client left, or the server gave up on it) cancels the sequence.
pub fn bridge(job: Job, tx: mpsc::Sender<Update>) {
    let send = |u| send(&tx, u, &job.runtime, job.write_stall);
    let end = Relay::new(&job).run(&tx, &send);
    let unsent = match end {
        End::Unsent(unsent) => Some(unsent),
        End::Over(result) => {
            if let Err(e) = &result {
                job.log.set_outcome(e.code);
            }
            send(Update::End(result)).err()
        }
    };
    match unsent {
        None => {}
        // The first outcome set wins: one set by the HTTP side (the end of
        // the grace period) stays.
        Some(Unsent::Gone) => {
            job.handle.cancel();
            job.log.set_outcome("cancelled");
        }
        Some(Unsent::Stalled) => {
            job.handle.cancel();
            job.log.set_outcome(WRITE_STALLED);
            if let Some(c) = &job.connection {
                c.close();
            }
        }
    }
    // The slot is freed and the request counted before `tx` closes (which
    // ends the stream with `[DONE]`), so a client that has it sees both.
    let Job { in_flight, log, .. } = job;
    drop(in_flight);
    drop(log);
    drop(tx);
}

/// One request's tokens on their way to text: counted, timed, decoded and
/// held back past stop strings.
struct Relay<'a> {
    job: &'a Job,
    text: TextStream<'a>,
    filter: StopFilter,
    generated: usize,
    /// When the last token came (the request's arrival before the first).
    last: Instant,
}

impl<'a> Relay<'a> {
    fn new(job: &'a Job) -> Self {
        Relay {
            job,
            text: TextStream::new(&job.engine.tokenizer),
            filter: StopFilter::new(job.stops.clone()),
            generated: 0,
            last: job.arrived,
        }
    }

    /// Relays the engine's events until the generation or the client is done.
    fn run(mut self, tx: &mpsc::Sender<Update>, send: &impl Fn(Update) -> Result<(), Unsent>) -> End {
        let job = self.job;
        loop {
            if tx.is_closed() || *job.app.aborted.borrow() {
                return End::Unsent(Unsent::Gone);
            }
            let end = match job.handle.recv() {
                Some(Event::Token(t)) => self.token(t, send),
                Some(Event::Prompt(_) | Event::Logprob(_)) => None,
                Some(Event::Done(Ok(generation))) => Some(End::Over(self.done(&generation))),
                Some(Event::Done(Err(e))) => Some(End::Over(Err(engine_error(e)))),
                None => Some(End::Over(Err(engine_error(gpt2::Error::Engine(
                    "the engine stopped before the request finished".into(),
                ))))),
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Counts and times token `t` and sends its text; the end, if it is one
    /// (a stop string completed, or the client cannot take it).
    fn token(&mut self, t: u32, send: &impl Fn(Update) -> Result<(), Unsent>) -> Option<End> {
        let (job, metrics) = (self.job, &self.job.app.metrics);
        self.generated += 1;
        job.log.generated.store(self.generated, Ordering::Relaxed);
        metrics.generated_tokens.inc();
        let now = Instant::now();
        if self.generated == 1 {
            metrics.observe_ttft(now - job.arrived);
        } else {
            metrics.observe_inter_token(now - self.last);
        }
        self.last = now;
        let piece = if job.eos == Some(t) {
            // The end-of-text token ends the text; it is not part of it.
            Ok(None)
        } else {
            self.text.push(t)
        };
        let piece = match piece {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => return Some(End::Over(Err(engine_error(e)))),
        };
        let (out, matched) = self.filter.push(&piece);
        if let Err(unsent) = send(Update::Token(out)) {
            return Some(End::Unsent(unsent));
        }
        if matched {
            job.handle.cancel();
            return Some(End::Over(Ok(self.finish("stop", String::new(), self.generated))));
        }
        None
    }

    /// The text still held back and the summary, once the engine is done.
    fn done(&mut self, generation: &Generation) -> Result<Finish, ApiError> {
        let rest = if generation.stop == StopReason::Eos {
            Ok(None)
        } else {
            self.text.finish()
        };
        let rest = rest.map_err(engine_error)?.unwrap_or_default();
        let (mut out, matched) = self.filter.push(&rest);
        let reason = if matched {
            "stop"
        } else {
            out.push_str(&self.filter.flush());
            match generation.stop {
                StopReason::Eos => "stop",
                StopReason::MaxNewTokens | StopReason::ContextFull => "length",
            }
        };
        Ok(self.finish(reason, out, generation.tokens.len()))
    }

    fn finish(&self, reason: &'static str, text: String, generated: usize) -> Finish {
        Finish {
            text,
            reason,
            prompt_tokens: self.job.prompt_tokens,
            completion_tokens: generated,
        }
    }
}

/// The outcome of a stream whose client stopped reading.
pub const WRITE_STALLED: &str = "write_stalled";

fn engine_error(e: gpt2::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "engine_error",
        format!("generation failed: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut f = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let (text, matched) = f.push(p);
            out.push(text);
            if matched {
                return (out, true, String::new());
            }
        }
        (out, false, f.flush())
    }

    #[test]
    fn stop_strings_are_held_back_and_never_sent() {
        // A stop string split over pieces: its start is held, then dropped.
        assert_eq!(run(&["lo w"], &["hel", "lo", " w", "orld"]).0, ["he", "l", ""]);
        // A false start is released once it cannot match any more.
        let (out, matched, rest) = run(&["lox"], &["hel", "lo", " w"]);
        assert_eq!(
            (out, matched, rest.as_str()),
            (vec!["he".into(), "l".into(), "lo w".into()], false, "")
        );
        // Held text at the end goes out with the end.
        assert_eq!(
            run(&["xyz"], &["ab", "x"]),
            (vec!["ab".into(), "".into()], false, "x".into())
        );
        // The earliest of several stop strings wins; text before it is kept.
        assert_eq!(run(&["c", "b"], &["abcd"]).0, ["a"]);
        // Multi-byte text is cut at character boundaries only.
        assert_eq!(run(&["é!"], &["café", "?"]).0, ["caf", "é?"]);
    }
}
