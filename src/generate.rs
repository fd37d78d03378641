//! Generation: prompt ids → prefill → decode loop over the KV cache → stop.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::model::{Gpt2Model, KvCache, Row, Scratch};
use crate::profile::{Op, Phase, Profile};
use crate::sampling::{Sampler, SamplingParams};

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Generate at most this many tokens (at least 1).
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Seed of this request's own RNG: same seed, same text, whatever else runs.
    pub seed: u64,
    /// Keep going past `<|endoftext|>` (benchmarks need exact lengths).
    pub ignore_eos: bool,
    /// The end-of-text token; `None` means generation never stops on a token.
    pub eos_token_id: Option<u32>,
}

impl GenerateOptions {
    /// Greedy decoding of exactly `max_new_tokens` tokens (EOS ignored).
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerateOptions {
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            seed: 0,
            ignore_eos: true,
            eos_token_id: None,
        }
    }
}

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

/// Per-request timings, measured from the start of `generate`.
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

    /// Generates from `prompt`, calling `on_token` with each new id as soon as
    /// it is sampled.
    pub fn generate(
        &mut self,
        model: &Gpt2Model,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32),
    ) -> Result<Generation> {
        let start = Instant::now();
        let n_positions = model.config.n_positions;
        check_request(prompt, opts, n_positions)?;
        let mut sampler = Sampler::new(opts.sampling.clone(), opts.seed)?;
        let mut history = Vec::with_capacity(prompt.len() + opts.max_new_tokens);
        history.extend_from_slice(prompt);
        let mut timings = Timings {
            token_times: Vec::with_capacity(opts.max_new_tokens),
            ..Timings::default()
        };
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

        let stop = loop {
            let t = Instant::now();
            let next = sampler.sample(logits, &history)?;
            let now = start.elapsed();
            if let Some(p) = self.scratch.profile.as_deref_mut() {
                p.add(Op::Sampling, t.elapsed().as_nanos() as u64, 0, 0);
                p.phase = Phase::Decode;
            }
            if timings.token_times.is_empty() {
                timings.ttft = now;
            }
            timings.token_times.push(now);
            timings.total = now;
            history.push(next);
            on_token(next);
            if history.len() - prompt.len() == opts.max_new_tokens {
                break StopReason::MaxNewTokens;
            }
            if !opts.ignore_eos && opts.eos_token_id == Some(next) {
                break StopReason::Eos;
            }
            if pos == n_positions {
                break StopReason::ContextFull;
            }
            let row = Row {
                seq: 0,
                token: next,
                pos,
                logits: true,
            };
            logits = model.forward(&[row], &mut [&mut self.cache], &mut self.scratch)?;
            pos += 1;
        };
        Ok(Generation {
            prompt_tokens: prompt.len(),
            tokens: history.split_off(prompt.len()),
            stop,
            timings,
        })
    }
}

/// Checks a request before any work.
pub fn check_request(prompt: &[u32], opts: &GenerateOptions, n_positions: usize) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument(
            "empty prompt: at least one token is needed (start from `<|endoftext|>` to generate from nothing)"
                .into(),
        ));
    }
    if prompt.len() > n_positions {
        return Err(Error::PromptTooLong {
            prompt_tokens: prompt.len(),
            n_positions,
        });
    }
    if opts.max_new_tokens == 0 {
        return Err(Error::InvalidArgument("max_new_tokens must be at least 1".into()));
    }
    opts.sampling.validate()
}
