//! From the engine's tokens to the client's text: one blocking task per
//! choice forwards each token as a text piece (never half a UTF-8
//! character, never the start of a stop string that may yet complete),
//! with its log-probability when asked, and cancels the sequence when the
//! client is gone, or has not taken a piece for the write-stall timeout
//! (then its connection is closed too). The choices of one request share
//! one channel to the HTTP side, each update marked with its choice's index.
//!
//! Log-probabilities come as [`TokenEntry`]s: the token's own text (the
//! token decoded alone: a token holding part of a UTF-8 character decodes
//! to U+FFFD, as vLLM returns it), its log-probability under the raw model
//! (`gpt2::logprobs`), the most likely alternatives, and its `text_offset`:
//! where the token's text starts in the choice's `text`, in characters
//! (Unicode scalar values, what Python's `text[offset:]` counts), the
//! echoed prompt included. A token that ends a character another began
//! starts where that character starts; `<|endoftext|>`, which is not part of
//! the text, starts at its end. An entry goes out with the first text that
//! follows its offset, so a stop string cutting the text also drops the
//! entries of the tokens from the cut on: the entries returned are those of
//! the tokens whose text starts in the text returned (a token that straddles
//! the cut is kept), whether streamed or not.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tokio::sync::mpsc::{self, error::TrySendError};

use super::error::ApiError;
use super::state::{App, Connection, Engine, InFlight, RequestLog};
use gpt2::scheduler::{Event, RequestHandle};
use gpt2::tokenizer::{Gpt2Tokenizer, TextStream};
use gpt2::{Generation, StopReason, TokenLogprob};

/// What a choice's bridge sends to the HTTP side.
#[derive(Debug)]
pub enum Update {
    /// Text of choice `index`: the echoed prompt, or what one generated
    /// token completed (empty when it completes no character yet, or is
    /// held back as a possible stop string's start), with the entries of the
    /// tokens whose text starts in it (with `logprobs` asked for).
    Text {
        index: usize,
        text: String,
        logprobs: Vec<TokenEntry>,
    },
    /// The end of choice `index`: the text and entries still held back, and
    /// the summary; or the error.
    End {
        index: usize,
        result: Result<Finish, ApiError>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub text: String,
    pub logprobs: Vec<TokenEntry>,
    /// `length` (max_tokens or the context window) or `stop` (EOS or a stop string).
    pub reason: &'static str,
    pub completion_tokens: usize,
}

/// One returned token's log-probability (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEntry {
    /// The token decoded alone.
    pub text: String,
    /// `None` for the prompt's first token, which nothing predicts.
    pub logprob: Option<f32>,
    /// The most likely tokens at its position, most likely first, as
    /// (text, log-probability); `None` with `logprob`.
    pub top: Option<Vec<(String, f32)>>,
    /// Characters of the choice's text before this token's.
    pub offset: usize,
}

impl TokenEntry {
    fn new(
        tokenizer: &Gpt2Tokenizer,
        lp: Option<&TokenLogprob>,
        token: u32,
        offset: usize,
    ) -> Result<Self, gpt2::Error> {
        let top = lp
            .map(|lp| {
                lp.top
                    .iter()
                    .map(|&(id, l)| Ok((tokenizer.decode(&[id])?, l)))
                    .collect::<Result<Vec<_>, gpt2::Error>>()
            })
            .transpose()?;
        Ok(TokenEntry {
            text: tokenizer.decode(&[token])?,
            logprob: lp.map(|lp| lp.logprob),
            top,
            offset,
        })
    }
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

/// What the choices of one request share.
pub struct Job {
    pub app: Arc<App>,
    pub engine: Arc<Engine>,
    pub stops: Vec<String>,
    /// The token that ends this generation (not sent as text), if one does.
    pub eos: Option<u32>,
    /// Whether log-probabilities are returned.
    pub logprobs: bool,
    pub arrived: Instant,
    /// The request's slots and KV cache reservation, held until its last
    /// choice ends (then freed, before its log line: see [`bridge`]).
    pub _in_flight: InFlight,
    pub log: Arc<RequestLog>,
    /// The runtime the HTTP side runs on (the bounded wait for a slow reader).
    pub runtime: tokio::runtime::Handle,
    /// How long a piece may wait for the client to take the previous ones.
    pub write_stall: Duration,
    /// The request's connection, closed when its reader stalls.
    pub connection: Option<Arc<Connection>>,
    /// Set by the request's first token: its time to first token is
    /// observed once, whichever choice it comes from.
    pub first_token: AtomicBool,
}

/// One choice of a request.
pub struct Choice {
    /// Its place in `choices`: prompt index × n + choice.
    pub index: usize,
    pub handle: RequestHandle,
    /// With `echo`: the prompt's ids, returned before the generated text.
    pub echo: Option<Arc<[u32]>>,
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

/// How the relay of a choice's tokens ended.
enum End {
    /// The generation is over: its summary, or its error, goes to the client last.
    Over(Result<Finish, ApiError>),
    /// The client cannot take more.
    Unsent(Unsent),
}

/// Runs on a blocking thread until the choice is over; `tx` closing (the
/// client left, or the server gave up on it) cancels the sequence.
pub fn bridge(job: Arc<Job>, choice: Choice, tx: mpsc::Sender<Update>) {
    let send = |u| send(&tx, u, &job.runtime, job.write_stall);
    let end = Relay::new(&job, &choice).run(&tx, &send);
    let unsent = match end {
        End::Unsent(unsent) => Some(unsent),
        End::Over(result) => {
            if let Err(e) = &result {
                job.log.set_outcome(e.code);
            }
            send(Update::End {
                index: choice.index,
                result,
            })
            .err()
        }
    };
    match unsent {
        None => {}
        // The first outcome set wins: one set by the HTTP side (the end of
        // the grace period) stays.
        Some(Unsent::Gone) => {
            choice.handle.cancel();
            job.log.set_outcome("cancelled");
        }
        Some(Unsent::Stalled) => {
            choice.handle.cancel();
            job.log.set_outcome(WRITE_STALLED);
            if let Some(c) = &job.connection {
                c.close();
            }
        }
    }
    // The last choice frees the slots and counts the request before its
    // `tx` closes the channel (which ends the stream with `[DONE]`), so a
    // client that has it sees both: every choice drops its share of the
    // job before its sender.
    drop(job);
    drop(tx);
}

/// One choice's tokens on their way to text: counted, timed, decoded, held
/// back past stop strings, with their log-probabilities.
struct Relay<'a> {
    job: &'a Job,
    choice: &'a Choice,
    text: TextStream<'a>,
    filter: StopFilter,
    generated: usize,
    /// When the last token came (the request's arrival before the first).
    last: Instant,
    /// Characters of the echoed prompt: where the generated text starts.
    base: usize,
    /// Characters of generated text decoded so far (before the stop filter).
    decoded: usize,
    /// Characters of generated text sent (after the stop filter).
    sent: usize,
    /// The next token's log-probability (`Event::Logprob` precedes its `Token`).
    next_logprob: Option<TokenLogprob>,
    /// Entries whose text has not gone out yet.
    held: VecDeque<TokenEntry>,
    echoed: bool,
}

impl<'a> Relay<'a> {
    fn new(job: &'a Job, choice: &'a Choice) -> Self {
        Relay {
            job,
            choice,
            text: TextStream::new(&job.engine.tokenizer),
            filter: StopFilter::new(job.stops.clone()),
            generated: 0,
            last: job.arrived,
            base: 0,
            decoded: 0,
            sent: 0,
            next_logprob: None,
            held: VecDeque::new(),
            echoed: false,
        }
    }

    /// Relays the engine's events until the generation or the client is done.
    fn run(mut self, tx: &mpsc::Sender<Update>, send: &impl Fn(Update) -> Result<(), Unsent>) -> End {
        let job = self.job;
        // The prompt's scores come from the engine; without them the echo
        // goes out at once.
        if !job.logprobs {
            if let Some(end) = self.echo(&[], send) {
                return end;
            }
        }
        loop {
            if tx.is_closed() || *job.app.aborted.borrow() {
                return End::Unsent(Unsent::Gone);
            }
            let end = match self.choice.handle.recv() {
                Some(Event::Prompt(scores)) => self.echo(&scores, send),
                Some(Event::Logprob(lp)) => {
                    self.next_logprob = Some(lp);
                    None
                }
                Some(Event::Token(t)) => self.token(t, send),
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

    /// With `echo`, once: the prompt's text, and its tokens' entries with
    /// `scores` (one per prompt token after the first).
    fn echo(&mut self, scores: &[TokenLogprob], send: &impl Fn(Update) -> Result<(), Unsent>) -> Option<End> {
        let ids = self.choice.echo.as_deref().filter(|_| !self.echoed)?;
        self.echoed = true;
        let (text, chars, entries) =
            match echo_text(&self.job.engine.tokenizer, ids, scores, self.job.logprobs) {
                Ok(echoed) => echoed,
                Err(e) => return Some(End::Over(Err(engine_error(e)))),
            };
        self.base = chars;
        let update = Update::Text {
            index: self.choice.index,
            text,
            logprobs: entries,
        };
        send(update).err().map(End::Unsent)
    }

    /// Counts and times token `t` and sends its text; the end, if it is one
    /// (a stop string completed, or the client cannot take it).
    fn token(&mut self, t: u32, send: &impl Fn(Update) -> Result<(), Unsent>) -> Option<End> {
        let (job, metrics) = (self.job, &self.job.app.metrics);
        self.generated += 1;
        job.log.generated.fetch_add(1, Ordering::Relaxed);
        metrics.generated_tokens.inc();
        let now = Instant::now();
        if !job.first_token.swap(true, Ordering::Relaxed) {
            metrics.observe_ttft(now - job.arrived);
        } else if self.generated > 1 {
            metrics.observe_inter_token(now - self.last);
        }
        self.last = now;
        let lp = self.next_logprob.take();
        if job.logprobs {
            match TokenEntry::new(&job.engine.tokenizer, lp.as_ref(), t, self.base + self.decoded) {
                Ok(entry) => self.held.push_back(entry),
                Err(e) => return Some(End::Over(Err(engine_error(e)))),
            }
        }
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
        self.decoded += piece.chars().count();
        let (out, matched) = self.filter.push(&piece);
        self.sent += out.chars().count();
        let update = Update::Text {
            index: self.choice.index,
            text: out,
            logprobs: self.release(),
        };
        if let Err(unsent) = send(update) {
            return Some(End::Unsent(unsent));
        }
        if matched {
            self.choice.handle.cancel();
            return Some(End::Over(Ok(self.finish(
                "stop",
                String::new(),
                self.generated,
                false,
            ))));
        }
        None
    }

    /// The entries of the tokens whose text starts in the text sent.
    fn release(&mut self) -> Vec<TokenEntry> {
        let end = self.base + self.sent;
        let n = self.held.iter().take_while(|e| e.offset < end).count();
        self.held.drain(..n).collect()
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
        self.sent += out.chars().count();
        Ok(self.finish(reason, out, generation.tokens.len(), !matched))
    }

    /// The last update's content: `text`, and the entries it releases:
    /// all of them when `whole` (the text went out whole: the end-of-text
    /// token's entry, at its end, too), else those before a stop string's cut.
    fn finish(&mut self, reason: &'static str, text: String, generated: usize, whole: bool) -> Finish {
        let logprobs = if whole {
            self.held.drain(..).collect()
        } else {
            let kept = self.release();
            self.held.clear();
            kept
        };
        Finish {
            text,
            logprobs,
            reason,
            completion_tokens: generated,
        }
    }
}

/// The prompt's text and its length in characters, and (`with_entries`)
/// its tokens' entries, the first without a log-probability and each other
/// with its score in `scores`.
fn echo_text(
    tokenizer: &Gpt2Tokenizer,
    ids: &[u32],
    scores: &[TokenLogprob],
    with_entries: bool,
) -> Result<(String, usize, Vec<TokenEntry>), gpt2::Error> {
    let mut stream = TextStream::new(tokenizer);
    let (mut text, mut chars, mut entries) = (String::new(), 0, Vec::new());
    for (i, &id) in ids.iter().enumerate() {
        if with_entries {
            let lp = i.checked_sub(1).and_then(|j| scores.get(j));
            entries.push(TokenEntry::new(tokenizer, lp, id, chars)?);
        }
        let piece = stream.push(id)?.unwrap_or_default();
        chars += piece.chars().count();
        text.push_str(&piece);
    }
    let rest = stream.finish()?.unwrap_or_default();
    chars += rest.chars().count();
    text.push_str(&rest);
    Ok((text, chars, entries))
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
