//! Generation: prompt ids → prefill → decode loop over the KV cache → stop.
//!
//! `Decode` is one sequence's side of a decode step: sample the next
//! token, stamp its time, apply the stop rule. [`Session`] runs it for one
//! request on the caller's thread; the [`Scheduler`](crate::Scheduler) runs
//! it for each sequence of a batch, so both stop and time alike.

use std::time::{Duration, Instant};

use crate::error::Result;
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
        }
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
        let next = self.sampler.sample(logits, &self.history)?;
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
        Generation {
            prompt_tokens: self.prompt_tokens,
            tokens: self.history.split_off(self.prompt_tokens),
            stop,
            timings: self.timings,
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
        let prompt = seq.prompt();
        let mut rows = Vec::with_capacity(self.scratch.max_rows());

        // Prefill, in chunks of at most max_rows rows; only the very last row
        // needs logits.
        self.cache.clear();
        self.set_phase(Phase::Prefill);
        let chunk = self.scratch.max_rows();
        let mut pos = 0;
        let mut logits: &[f32] = &[];
        while pos < prompt.len() {
            let end = (pos + chunk).min(prompt.len());
            rows.clear();
            rows.extend((pos..end).map(|p| Row {
                seq: 0,
                token: prompt[p],
                pos: p,
                logits: p + 1 == prompt.len(),
            }));
            logits = model.forward(&rows, &mut [&mut self.cache], &mut self.scratch)?;
            pos = end;
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
