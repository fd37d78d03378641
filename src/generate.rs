//! Generation: prompt ids → prefill → decode loop over the KV cache → stop.
//!
//! `Decode` is one sequence's side of a decode step: sample the next
//! token, stamp its time, apply the stop rule. [`Session`] runs it for one
//! request on the caller's thread; the [`Scheduler`](crate::Scheduler) runs
//! it for each sequence of a batch, so both stop and time alike.

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::logprobs::{token_logprob, TokenLogprob};
use crate::model::{Gpt2Model, KvCache, Row, Scratch};
use crate::profile::{Op, Phase, Profile};
pub use crate::request::GenerateOptions;
use crate::request::{Fit, Request};
use crate::sampling::Sampler;

/// Why generation stopped. All are normal ends, not errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `max_new_tokens` were generated.
    MaxNewTokens,
    /// The model produced the end-of-text token (and `ignore_eos` was off).
    Eos,
    /// The context window is full: no position is left for another token.
    ContextFull,
}

/// Per-request timings, measured from the start of `generate` (or `run`,
/// or the submission to a scheduler).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    /// Time to first token: prefill plus the first sample.
    pub ttft: Duration,
    /// Until the last token was sampled.
    pub total: Duration,
    /// When each generated token was ready.
    pub token_times: Vec<Duration>,
}

impl Timings {
    /// Time per output token after the first: `(total - ttft) / (n - 1)`.
    pub fn tpot(&self) -> Option<Duration> {
        let n = self.token_times.len();
        (n > 1).then(|| (self.total - self.ttft) / (n as u32 - 1))
    }
}

/// The result of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Generated ids (an EOS that stopped generation is included).
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    pub timings: Timings,
    /// With [`GenerateOptions::logprobs`]: one per generated token.
    pub logprobs: Vec<TokenLogprob>,
    /// With [`GenerateOptions::prompt_logprobs`]: one per prompt token after
    /// the first (the first has nothing to be predicted from).
    pub prompt_logprobs: Vec<TokenLogprob>,
}

/// One sequence's decoding: its sampler, its tokens, its timings and the
/// stop rule. Whatever runs the forward passes hands it each row of logits
/// the sequence gets; it samples from nothing else, so a sequence's tokens
/// do not depend on what else ran.
pub(crate) struct Decode {
    sampler: Sampler,
    /// Prompt then generated ids.
    history: Vec<u32>,
    prompt_tokens: usize,
    max_new_tokens: usize,
    /// The token that stops generation (`None` with `ignore_eos`).
    eos: Option<u32>,
    /// The model's context window.
    n_positions: usize,
    started: Instant,
    timings: Timings,
    /// Alternatives per generated token, when their logprobs are wanted.
    logprobs: Option<usize>,
    token_logprobs: Vec<TokenLogprob>,
    /// Alternatives per prompt token, when the prompt is scored.
    prompt_top: Option<usize>,
    prompt_logprobs: Vec<TokenLogprob>,
}

impl Decode {
    /// Starts `request` on a model of `n_positions` positions; its timings
    /// count from `started`.
    pub(crate) fn new(request: Request, n_positions: usize, started: Instant) -> Self {
        let (mut history, opts) = request.into_parts();
        let prompt_tokens = history.len();
        history.reserve_exact(opts.max_new_tokens);
        Decode {
            sampler: Sampler::checked(opts.sampling, opts.seed),
            history,
            prompt_tokens,
            max_new_tokens: opts.max_new_tokens,
            eos: opts.eos_token_id.filter(|_| !opts.ignore_eos),
            n_positions,
            started,
            timings: Timings {
                token_times: Vec::with_capacity(opts.max_new_tokens),
                ..Timings::default()
            },
            logprobs: opts.logprobs,
            token_logprobs: Vec::new(),
            prompt_top: opts.prompt_logprobs,
            prompt_logprobs: Vec::new(),
        }
    }

    /// Whether every prompt row needs its logits (the prompt is scored).
    pub(crate) fn scores_prompt(&self) -> bool {
        self.prompt_top.is_some()
    }

    /// Whether the request only scores its prompt (`max_new_tokens` 0): it
    /// ends when the prompt's last row is computed, without a token.
    pub(crate) fn prompt_only(&self) -> bool {
        self.max_new_tokens == 0
    }

    /// Prompt and generated ids so far.
    pub(crate) fn history(&self) -> &[u32] {
        &self.history
    }

    /// Scores the prompt token after position `pos` from that position's
    /// `logits` (when the prompt is scored and a next prompt token exists).
    pub(crate) fn score_prompt(&mut self, pos: usize, logits: &[f32]) {
        if let (Some(top), true) = (self.prompt_top, pos + 1 < self.prompt_tokens) {
            let next = self.history[pos + 1];
            self.prompt_logprobs.push(token_logprob(logits, next, top));
        }
    }

    /// The prompt's scores so far (all of them once its rows are computed).
    pub(crate) fn prompt_logprobs(&self) -> &[TokenLogprob] {
        &self.prompt_logprobs
    }

    /// Takes another sequence's prompt scores: a fork of the same prompt.
    pub(crate) fn set_prompt_logprobs(&mut self, scores: Vec<TokenLogprob>) {
        self.prompt_logprobs = scores;
    }

    /// The logprob of the newest token, when they are wanted.
    pub(crate) fn last_logprob(&self) -> Option<&TokenLogprob> {
        self.logprobs.and(self.token_logprobs.last())
    }

    pub(crate) fn prompt(&self) -> &[u32] {
        &self.history[..self.prompt_tokens]
    }

    /// The newest token: the one the next decode row feeds back.
    pub(crate) fn last(&self) -> u32 {
        *self.history.last().expect("a request has a prompt")
    }

    /// The decode step: samples the next token from `logits` (this
    /// sequence's row, after its last token), stamps its time, and returns
    /// it with the reason to stop after it, if there is one.
    pub(crate) fn step(&mut self, logits: &[f32]) -> Result<(u32, Option<StopReason>)> {
        let next = self.sampler.sample(logits, &self.history, self.prompt_tokens)?;
        if let Some(top) = self.logprobs {
            self.token_logprobs.push(token_logprob(logits, next, top));
        }
        let now = self.started.elapsed();
        let t = &mut self.timings;
        if t.token_times.is_empty() {
            t.ttft = now;
        }
        t.token_times.push(now);
        t.total = now;
        self.history.push(next);
        // Every token but the newest holds a position in the cache: with
        // the window full there is none to feed the newest back into.
        let stop = if self.history.len() - self.prompt_tokens == self.max_new_tokens {
            Some(StopReason::MaxNewTokens)
        } else if self.eos == Some(next) {
            Some(StopReason::Eos)
        } else if self.history.len() > self.n_positions {
            Some(StopReason::ContextFull)
        } else {
            None
        };
        Ok((next, stop))
    }

    /// The result, once [`step`](Decode::step) gave a reason to stop.
    pub(crate) fn finish(mut self, stop: StopReason) -> Generation {
        if self.timings.token_times.is_empty() {
            // A prompt only scored: over when its last row was computed.
            self.timings.total = self.started.elapsed();
        }
        Generation {
            prompt_tokens: self.prompt_tokens,
            tokens: self.history.split_off(self.prompt_tokens),
            stop,
            timings: self.timings,
            logprobs: self.token_logprobs,
            prompt_logprobs: self.prompt_logprobs,
        }
    }
}

/// A request's reusable state: its KV cache and work buffers. Keep one per
/// thread and reuse it across requests; nothing is allocated per token.
pub struct Session {
    cache: KvCache,
    scratch: Scratch,
}

impl Session {
    /// `max_rows` bounds the rows per forward pass: prompts longer than that
    /// are prefilled in chunks. An error if the cache or buffers cannot be
    /// allocated (a config whose context window is too large for memory).
    pub fn new(model: &Gpt2Model, max_rows: usize) -> Result<Self> {
        Ok(Session {
            cache: model.new_cache()?,
            scratch: model.new_scratch(max_rows)?,
        })
    }

    /// Turns the per-op profile on (a fresh one) or off.
    pub fn set_profiling(&mut self, on: bool) {
        self.scratch.profile = on.then(Box::default);
    }

    /// The per-op profile accumulated since profiling was turned on.
    pub fn profile(&self) -> Option<&Profile> {
        self.scratch.profile.as_deref()
    }

    fn set_phase(&mut self, phase: Phase) {
        if let Some(p) = self.scratch.profile.as_deref_mut() {
            p.phase = phase;
        }
    }

    /// Checks the request ([`Request::prepare`], the context window holding
    /// the prompt), then generates, calling `on_token` with each new id as
    /// soon as it is sampled.
    pub fn generate(
        &mut self,
        model: &Gpt2Model,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: impl FnMut(u32),
    ) -> Result<Generation> {
        let start = Instant::now();
        let request = Request::prepare(&model.config, prompt.to_vec(), opts.clone(), Fit::Prompt)?;
        self.decode(model, request, start, on_token)
    }

    /// Generates for a request already checked, calling `on_token` with
    /// each new id as soon as it is sampled.
    pub fn run(
        &mut self,
        model: &Gpt2Model,
        request: Request,
        on_token: impl FnMut(u32),
    ) -> Result<Generation> {
        self.decode(model, request, Instant::now(), on_token)
    }

    fn decode(
        &mut self,
        model: &Gpt2Model,
        request: Request,
        start: Instant,
        mut on_token: impl FnMut(u32),
    ) -> Result<Generation> {
        let mut seq = Decode::new(request, model.config.n_positions, start);
        let prompt_len = seq.prompt().len();
        let mut rows = Vec::with_capacity(self.scratch.max_rows());

        // Prefill, in chunks of at most max_rows rows; only the very last row
        // needs logits, unless the prompt is scored.
        self.cache.clear();
        self.set_phase(Phase::Prefill);
        let chunk = self.scratch.max_rows();
        let scored = seq.scores_prompt();
        let v = model.config.vocab_size;
        let mut pos = 0;
        let mut logits: &[f32] = &[];
        while pos < prompt_len {
            let end = (pos + chunk).min(prompt_len);
            let prompt = seq.prompt();
            rows.clear();
            rows.extend((pos..end).map(|p| Row {
                seq: 0,
                token: prompt[p],
                pos: p,
                logits: scored || p + 1 == prompt_len,
            }));
            logits = model.forward(&rows, &mut [&mut self.cache], &mut self.scratch)?;
            if scored {
                for (i, p) in (pos..end).enumerate() {
                    seq.score_prompt(p, &logits[i * v..(i + 1) * v]);
                }
                logits = &logits[(end - pos - 1) * v..(end - pos) * v];
            }
            pos = end;
        }
        if seq.prompt_only() {
            return Ok(seq.finish(StopReason::MaxNewTokens));
        }

        loop {
            let t = Instant::now();
            let (next, stop) = seq.step(logits)?;
            if let Some(p) = self.scratch.profile.as_deref_mut() {
                p.add(Op::Sampling, t.elapsed().as_nanos() as u64, 0, 0);
                p.phase = Phase::Decode;
            }
            on_token(next);
            if let Some(stop) = stop {
                return Ok(seq.finish(stop));
            }
            let row = Row {
                seq: 0,
                token: next,
                pos,
                logits: true,
            };
            logits = model.forward(&[row], &mut [&mut self.cache], &mut self.scratch)?;
            pos += 1;
        }
    }
}
