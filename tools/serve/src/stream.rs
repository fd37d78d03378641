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
use super::routes::{App, InFlight, RequestLog};
use super::{Connection, Engine};
use gpt2::scheduler::{Event, RequestHandle};
use gpt2::tokenizer::TextStream;
use gpt2::StopReason;

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

/// Runs on a blocking thread until the request is over; `tx` closing (the
/// client left, or the server gave up on it) cancels the sequence.
pub fn bridge(job: Job, tx: mpsc::Sender<Update>) {
    let Job {
        app,
        engine,
        handle,
        stops,
        prompt_tokens,
        eos,
        arrived,
        log,
        in_flight,
        runtime,
        write_stall,
        connection,
    } = job;
    let send = |u| send(&tx, u, &runtime, write_stall);
    let metrics = &app.metrics;
    let mut text = TextStream::new(&engine.tokenizer);
    let mut filter = StopFilter::new(stops);
    let mut generated = 0;
    let mut last = arrived;
    let finish = |reason, text, generated| Finish {
        text,
        reason,
        prompt_tokens,
        completion_tokens: generated,
    };
    let end = loop {
        if tx.is_closed() || *app.aborted.borrow() {
            break Err(Unsent::Gone);
        }
        match handle.recv() {
            Some(Event::Token(t)) => {
                generated += 1;
                log.generated.store(generated, Ordering::Relaxed);
                metrics.generated_tokens.inc();
                let now = Instant::now();
                if generated == 1 {
                    metrics.observe_ttft(now - arrived);
                } else {
                    metrics.observe_inter_token(now - last);
                }
                last = now;
                let piece = if eos == Some(t) {
                    // The end-of-text token ends the text; it is not part of it.
                    Ok(None)
                } else {
                    text.push(t)
                };
                let piece = match piece {
                    Ok(p) => p.unwrap_or_default(),
                    Err(e) => break Ok(Err(engine_error(e))),
                };
                let (out, matched) = filter.push(&piece);
                if let Err(unsent) = send(Update::Token(out)) {
                    break Err(unsent);
                }
                if matched {
                    handle.cancel();
                    break Ok(Ok(finish("stop", String::new(), generated)));
                }
            }
            Some(Event::Done(Ok(generation))) => {
                let rest = if generation.stop == StopReason::Eos {
                    Ok(None)
                } else {
                    text.finish()
                };
                let rest = match rest {
                    Ok(r) => r.unwrap_or_default(),
                    Err(e) => break Ok(Err(engine_error(e))),
                };
                let (mut out, matched) = filter.push(&rest);
                let reason = if matched {
                    "stop"
                } else {
                    out.push_str(&filter.flush());
                    match generation.stop {
                        StopReason::Eos => "stop",
                        StopReason::MaxNewTokens | StopReason::ContextFull => "length",
                    }
                };
                break Ok(Ok(finish(reason, out, generation.tokens.len())));
            }
            Some(Event::Done(Err(e))) => break Ok(Err(engine_error(e))),
            None => {
                break Ok(Err(engine_error(gpt2::Error::Engine(
                    "the engine stopped before the request finished".into(),
                ))))
            }
        }
    };
    let unsent = match end {
        Err(unsent) => Some(unsent),
        Ok(result) => {
            if let Err(e) = &result {
                log.set_outcome(e.code);
            }
            send(Update::End(result)).err()
        }
    };
    match unsent {
        None => {}
        // The first outcome set wins: one set by the HTTP side (the end of
        // the grace period) stays.
        Some(Unsent::Gone) => {
            handle.cancel();
            log.set_outcome("cancelled");
        }
        Some(Unsent::Stalled) => {
            handle.cancel();
            log.set_outcome(WRITE_STALLED);
            if let Some(c) = &connection {
                c.close();
            }
        }
    }
    // The slot is freed and the request counted before `tx` closes (which
    // ends the stream with `[DONE]`), so a client that has it sees both.
    drop(in_flight);
    drop(log);
    drop(tx);
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
