//! The engine's door: what to generate, checked once before any work.
//!
//! [`Request::prepare`] checks a prompt and its [`GenerateOptions`] against
//! a model's config: the prompt is not empty, its token ids are in the
//! vocabulary, it fits the context window (alone, or with every token asked
//! for: [`Fit`]), at least one token is asked for, and the sampling
//! parameters are in range. It returns a [`Request`] that
//! [`Session::run`](crate::Session::run) and
//! [`Scheduler::submit_request`](crate::Scheduler::submit_request) run
//! without checking again, or one [`Invalid`] naming the parameter and the
//! problem, which the CLI prints and the server answers as a 400.

use crate::config::Gpt2Config;
use crate::error::{Invalid, Lengths};
use crate::logprobs::MAX_LOGPROBS;
use crate::rng::SplitMix64;
use crate::sampling::SamplingParams;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Generate at most this many tokens: at least 1, or 0 when the prompt
    /// is only scored (`prompt_logprobs`).
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Seed of this request's own RNG: same seed, same text, whatever else runs.
    pub seed: u64,
    /// Keep going past `<|endoftext|>` (benchmarks need exact lengths).
    pub ignore_eos: bool,
    /// The end-of-text token; `None` means generation never stops on a token.
    pub eos_token_id: Option<u32>,
    /// The raw model's log-probability of each generated token, with this
    /// many most likely alternatives (at most
    /// [`MAX_LOGPROBS`](crate::logprobs::MAX_LOGPROBS)); `None`: none.
    pub logprobs: Option<usize>,
    /// Score the prompt too: the log-probability of each prompt token after
    /// the first, with this many alternatives. Every prompt row then gets
    /// logits, and the prompt is computed in full (no reuse of a cached
    /// prefix, whose logits are gone).
    pub prompt_logprobs: Option<usize>,
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
            logprobs: None,
            prompt_logprobs: None,
        }
    }
}

/// How much of a request the context window must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// The prompt; generation stops early, with
    /// [`StopReason::ContextFull`](crate::StopReason::ContextFull), if the
    /// window fills first. The library's and the CLI's rule.
    Prompt,
    /// The prompt and all `max_new_tokens` (the last of which is never fed
    /// back, so needs no position): for callers that promise the length,
    /// as the server does for `max_tokens` and the benchmark for its runs.
    Whole,
}

/// A request that passed [`Request::prepare`]: the engine runs it as is.
/// It was checked against one config; run it on a model of that config (on
/// another, the forward pass refuses what does not fit, as an error).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    prompt: Vec<u32>,
    opts: GenerateOptions,
}

impl Request {
    /// Checks `prompt` and `opts` for a model of `config`, in the order the
    /// module doc lists; the first problem found is the error.
    pub fn prepare(
        config: &Gpt2Config,
        prompt: Vec<u32>,
        opts: GenerateOptions,
        fit: Fit,
    ) -> Result<Request, Invalid> {
        if prompt.is_empty() {
            return Err(Invalid::EmptyPrompt);
        }
        check_token_ids(prompt.iter().copied(), config.vocab_size)?;
        let lengths = Lengths {
            prompt_tokens: prompt.len(),
            max_new_tokens: opts.max_new_tokens,
            n_positions: config.n_positions,
        };
        if lengths.prompt_tokens > lengths.n_positions {
            return Err(Invalid::PromptTooLong(lengths));
        }
        if fit == Fit::Whole && lengths.positions() > lengths.n_positions {
            return Err(Invalid::ContextExceeded(lengths));
        }
        if opts.max_new_tokens == 0 && opts.prompt_logprobs.is_none() {
            return Err(Invalid::NoNewTokens);
        }
        opts.sampling.validate()?;
        let vocab_size = config.vocab_size;
        if let Some(&(id, _)) = opts
            .sampling
            .logit_bias
            .iter()
            .find(|b| b.0 as usize >= vocab_size)
        {
            return Err(Invalid::LogitBiasToken { id, vocab_size });
        }
        if let Some(n) = [opts.logprobs, opts.prompt_logprobs]
            .into_iter()
            .flatten()
            .find(|&n| n > MAX_LOGPROBS)
        {
            return Err(Invalid::Logprobs(n));
        }
        Ok(Request { prompt, opts })
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    pub fn options(&self) -> &GenerateOptions {
        &self.opts
    }

    /// Any seed is valid, so it may be chosen after the checks: the server
    /// draws one only for a request it admits.
    pub fn set_seed(&mut self, seed: u64) {
        self.opts.seed = seed;
    }

    /// Choice `i` of `n` samples of this request: the same request with
    /// [`choice_seed`]`(seed, i)`, so choice 0 is the request itself and each
    /// choice's tokens depend only on the request and `i`.
    pub fn choice(&self, i: usize) -> Request {
        let mut r = self.clone();
        r.opts.seed = choice_seed(self.opts.seed, i);
        r
    }

    pub fn into_parts(self) -> (Vec<u32>, GenerateOptions) {
        (self.prompt, self.opts)
    }
}

/// The seed of choice `i` of a request seeded `seed`: `seed` itself for
/// choice 0, else a SplitMix64 draw from `seed` and `i`, so the choices'
/// random streams are unrelated and fixed by the request alone.
pub fn choice_seed(seed: u64, i: usize) -> u64 {
    if i == 0 {
        return seed;
    }
    SplitMix64::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}

/// The first of `ids` outside a vocabulary of `vocab_size` tokens, as the
/// error naming it and its index. The one token-id check: the door, the
/// model's forward pass and the tokenizer's decode all use it.
pub fn check_token_ids(ids: impl IntoIterator<Item = u32>, vocab_size: usize) -> Result<(), Invalid> {
    match ids
        .into_iter()
        .enumerate()
        .find(|&(_, id)| id as usize >= vocab_size)
    {
        Some((index, id)) => Err(Invalid::TokenId {
            index,
            id,
            vocab_size,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Param;

    fn config() -> Gpt2Config {
        let json = r#"{"n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 8, "vocab_size": 16}"#;
        Gpt2Config::from_json(json).unwrap()
    }

    fn prepare(prompt: &[u32], max_new: usize, fit: Fit) -> Result<Request, Invalid> {
        Request::prepare(&config(), prompt.to_vec(), GenerateOptions::greedy(max_new), fit)
    }

    #[test]
    fn each_problem_names_its_parameter() {
        let err = prepare(&[1, 16], 1, Fit::Prompt).unwrap_err();
        assert_eq!(
            err,
            Invalid::TokenId {
                index: 1,
                id: 16,
                vocab_size: 16
            }
        );
        assert_eq!(err.param(), Param::Prompt);
        assert_eq!(prepare(&[], 1, Fit::Prompt).unwrap_err(), Invalid::EmptyPrompt);
        assert_eq!(
            prepare(&[1; 9], 1, Fit::Prompt).unwrap_err().param(),
            Param::Prompt
        );
        assert_eq!(prepare(&[1], 0, Fit::Prompt).unwrap_err(), Invalid::NoNewTokens);
        let mut opts = GenerateOptions::greedy(1);
        opts.sampling.top_p = Some(1.5);
        let err = Request::prepare(&config(), vec![1], opts, Fit::Prompt).unwrap_err();
        assert_eq!((err.param(), err.param().name()), (Param::TopP, "top_p"));
        let mut opts = GenerateOptions::greedy(1);
        opts.sampling.logit_bias = vec![(3, 1.0), (16, 1.0)];
        let err = Request::prepare(&config(), vec![1], opts, Fit::Prompt).unwrap_err();
        assert_eq!(
            err,
            Invalid::LogitBiasToken {
                id: 16,
                vocab_size: 16
            }
        );
        assert_eq!(err.param().name(), "logit_bias");
        let mut opts = GenerateOptions::greedy(1);
        opts.prompt_logprobs = Some(21);
        let err = Request::prepare(&config(), vec![1], opts, Fit::Prompt).unwrap_err();
        assert_eq!(
            (err.clone(), err.param().name()),
            (Invalid::Logprobs(21), "logprobs")
        );
    }

    /// `max_new_tokens: 0` only scores the prompt, so it needs `prompt_logprobs`.
    #[test]
    fn no_new_tokens_only_when_scoring() {
        let mut opts = GenerateOptions::greedy(0);
        assert_eq!(
            Request::prepare(&config(), vec![1, 2], opts.clone(), Fit::Whole).unwrap_err(),
            Invalid::NoNewTokens
        );
        opts.prompt_logprobs = Some(0);
        assert!(Request::prepare(&config(), vec![1, 2], opts, Fit::Whole).is_ok());
    }

    #[test]
    fn choice_zero_is_the_request() {
        assert_eq!(choice_seed(7, 0), 7);
        let seeds: std::collections::BTreeSet<u64> = (0..64).map(|i| choice_seed(7, i)).collect();
        assert_eq!(seeds.len(), 64, "distinct seeds");
        assert_ne!(choice_seed(7, 1), choice_seed(8, 1));
    }

    /// The last new token needs no position: 8 positions hold a 4-token
    /// prompt and 5 new tokens, not 6; a full window is the prompt's fault.
    #[test]
    fn whole_needs_room_for_every_token_but_the_last() {
        assert!(prepare(&[1; 4], 5, Fit::Whole).is_ok());
        let err = prepare(&[1; 4], 6, Fit::Whole).unwrap_err();
        assert!(matches!(err, Invalid::ContextExceeded(_)), "{err:?}");
        assert_eq!(err.param(), Param::MaxNewTokens);
        let err = prepare(&[1; 8], 2, Fit::Whole).unwrap_err();
        assert_eq!(err.param(), Param::Prompt);
        assert!(
            prepare(&[1; 8], 2, Fit::Prompt).is_ok(),
            "stops at ContextFull instead"
        );
        assert!(prepare(&[1; 8], usize::MAX, Fit::Whole).is_err());
    }

    #[test]
    fn the_message_is_the_errors() {
        let err = prepare(&[], 1, Fit::Prompt).unwrap_err();
        assert_eq!(err.to_string(), crate::Error::from(err.clone()).to_string());
        assert_eq!(
            err.to_string(),
            "invalid argument: empty prompt: at least one token is needed (start from `<|endoftext|>` to \
             generate from nothing)"
        );
    }
}
