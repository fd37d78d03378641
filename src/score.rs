//! Scoring a text: the log-probability of each of its tokens under the
//! model and its perplexity, past the context window with a sliding window.
//!
//! A text longer than the window (`n_positions`) is scored as the
//! `transformers` perplexity guide does
//! (<https://huggingface.co/docs/transformers/perplexity>): windows of
//! `window = n_positions` tokens start every `stride` tokens, from a cold
//! cache, and each scores only the tokens the window before it did not; the
//! last window ends at the text's end. With `stride < window` every scored
//! token after the first window sees at least `window - stride` tokens of
//! context. With `stride == window` the windows do not overlap, and the
//! first token of each has nothing before it in its window, so it is not
//! scored: as in the guide, that is one token fewer per window. The first
//! token of the text is never scored.
//!
//! Each window is a prompt-only request run by a [`Session`]
//! (`prompt_logprobs`, `max_new_tokens: 0`), so a token's number is the
//! raw model's [`token_logprob`](crate::logprobs::token_logprob), the same
//! bits `echo` with `logprobs` gives over HTTP. Memory stays bounded
//! whatever the text's length: the session holds one chunk of logits rows
//! (never `T x V`), and a window's scores are dropped once its new ones are
//! kept.
//!
//! The total negative log-likelihood is the exact sum of the scored
//! tokens' `-logprob` in f64. (The guide adds up each window's mean loss
//! times its count of targets, which is the same sum up to rounding.)

use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::generate::Session;
use crate::logprobs::{TokenLogprob, MAX_LOGPROBS};
use crate::model::Gpt2Model;
use crate::request::{check_token_ids, Fit, GenerateOptions, Request};

/// Rows per forward pass while a window is computed: the session's logits
/// buffer holds this many rows of V (128 x 50257 floats = 26 MB for GPT-2).
const CHUNK: usize = 128;

/// How to score a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreOptions {
    /// Tokens between the starts of two windows: in `1..=n_positions`.
    pub stride: usize,
    /// The most likely alternatives reported with each token (at most
    /// [`MAX_LOGPROBS`]).
    pub top: usize,
}

impl ScoreOptions {
    /// The guide's choice for GPT-2: half the window (512 of 1024), no
    /// alternatives.
    pub fn half_window(config: &Gpt2Config) -> Self {
        ScoreOptions {
            stride: (config.n_positions / 2).max(1),
            top: 0,
        }
    }
}

/// The scores of a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// One per token of the text: its log-probability given the tokens
    /// before it in its window, or `None` where nothing predicts it (the
    /// first token, and with `stride == window` the first of each window).
    pub logprobs: Vec<Option<TokenLogprob>>,
    /// The sum of `-logprob` over the scored tokens.
    pub nll: f64,
    /// How many tokens were scored.
    pub count: usize,
    /// Tokens per window (the model's `n_positions`).
    pub window: usize,
    pub stride: usize,
    /// Windows run.
    pub windows: usize,
}

impl Score {
    /// `exp(nll / count)`.
    pub fn perplexity(&self) -> f64 {
        (self.nll / self.count as f64).exp()
    }
}

/// One window of a text: it runs `tokens[begin..end]` and scores the
/// tokens at `first..end` (each from the row before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub begin: usize,
    pub end: usize,
    pub first: usize,
}

/// The windows over a text of `len` tokens: the guide's loop
/// (`for begin in range(0, len, stride)`, `end = min(begin + window, len)`,
/// the targets from the previous `end`, stopping at the window that reaches
/// the text's end), with the token at `begin` left out when nothing in its
/// window comes before it.
pub fn windows(len: usize, window: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    for begin in (0..len).step_by(stride.max(1)) {
        let end = (begin + window).min(len);
        out.push(Window {
            begin,
            end,
            first: prev_end.max(begin + 1),
        });
        prev_end = end;
        if end == len {
            break;
        }
    }
    out
}

/// Checks a scoring of `tokens` with `opts` on a model of `config` before
/// any work; the errors name the parameter (`text`, `stride`, `top`).
pub fn check(config: &Gpt2Config, tokens: &[u32], opts: &ScoreOptions) -> Result<()> {
    let window = config.n_positions;
    if tokens.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "text: {} token(s); scoring needs at least 2 (the first token has nothing before it to be \
             predicted from)",
            tokens.len()
        )));
    }
    if opts.stride == 0 || opts.stride > window {
        return Err(Error::InvalidArgument(format!(
            "stride {}: must be in 1..={window} (the context window, n_positions; half of it is the \
             usual choice)",
            opts.stride
        )));
    }
    if opts.top > MAX_LOGPROBS {
        return Err(Error::InvalidArgument(format!(
            "top {}: at most {MAX_LOGPROBS} alternatives per token",
            opts.top
        )));
    }
    check_token_ids(tokens.iter().copied(), config.vocab_size)?;
    Ok(())
}

/// Scores `tokens` (see the module doc). Errors: [`check`]'s, a forward
/// pass's, or a non-finite log-probability (weights or activations that
/// overflow f32), naming the token's position.
pub fn score(model: &Gpt2Model, tokens: &[u32], opts: &ScoreOptions) -> Result<Score> {
    check(&model.config, tokens, opts)?;
    let window = model.config.n_positions;
    let mut session = Session::new(model, CHUNK.min(window))?;
    let mut logprobs: Vec<Option<TokenLogprob>> = vec![None; tokens.len()];
    let (mut nll, mut count) = (0f64, 0usize);
    // Each window is a request that only scores its prompt.
    let scored = GenerateOptions {
        prompt_logprobs: Some(opts.top),
        ..GenerateOptions::greedy(0)
    };
    let spans = windows(tokens.len(), window, opts.stride);
    for w in &spans {
        let prompt = tokens[w.begin..w.end].to_vec();
        let request = Request::prepare(&model.config, prompt, scored.clone(), Fit::Prompt)?;
        // `prompt_logprobs[i]` scores the window's token `i + 1`.
        let run = session.run(model, request, |_| {})?;
        let fresh = run.prompt_logprobs.into_iter().skip(w.first - w.begin - 1);
        for (pos, lp) in (w.first..w.end).zip(fresh) {
            if !lp.logprob.is_finite() {
                return Err(Error::Engine(format!(
                    "the model gave the token at position {pos} a non-finite log-probability ({}): the \
                     weights or activations overflow f32",
                    lp.logprob
                )));
            }
            nll -= f64::from(lp.logprob);
            count += 1;
            logprobs[pos] = Some(lp);
        }
    }
    Ok(Score {
        logprobs,
        nll,
        count,
        window,
        stride: opts.stride,
        windows: spans.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The windows score every token after the first exactly once when they
    /// overlap, and leave out each window's first token when they do not.
    #[test]
    fn windows_follow_the_guide() {
        // 1024 positions, stride 512, 1500 tokens: two windows.
        let w = windows(1500, 1024, 512);
        assert_eq!(
            w,
            [
                Window {
                    begin: 0,
                    end: 1024,
                    first: 1
                },
                Window {
                    begin: 512,
                    end: 1500,
                    first: 1024
                }
            ]
        );
        // A short text: one window.
        assert_eq!(
            windows(5, 8, 4),
            [Window {
                begin: 0,
                end: 5,
                first: 1
            }]
        );
        for (len, window, stride) in [(300, 128, 64), (300, 128, 1), (129, 128, 127), (1000, 7, 3)] {
            let w = windows(len, window, stride);
            let scored: usize = w.iter().map(|w| w.end - w.first).sum();
            assert_eq!(scored, len - 1, "{len} {window} {stride}");
            assert!(w.windows(2).all(|p| p[1].first == p[0].end), "contiguous");
            assert!(w.iter().all(|w| w.end - w.begin <= window && w.first > w.begin));
            assert_eq!(w.last().unwrap().end, len);
        }
        // Not overlapping: one token fewer per window.
        let w = windows(300, 128, 128);
        assert_eq!(w.len(), 3);
        assert_eq!(w.iter().map(|w| w.end - w.first).sum::<usize>(), 300 - 3);
    }

    #[test]
    fn bad_options_name_their_parameter() {
        let config = Gpt2Config::from_json(
            r#"{"n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 8, "vocab_size": 16}"#,
        )
        .unwrap();
        let opts = |stride, top| ScoreOptions { stride, top };
        let err = |t: &[u32], o| check(&config, t, &o).unwrap_err().to_string();
        assert!(err(&[], opts(4, 0)).contains("text: 0 token"));
        assert!(err(&[1], opts(4, 0)).contains("at least 2"));
        assert!(err(&[1, 2], opts(0, 0)).contains("stride 0"));
        assert!(err(&[1, 2], opts(9, 0)).contains("stride 9: must be in 1..=8"));
        assert!(err(&[1, 2], opts(8, 21)).contains("top 21"));
        assert!(err(&[1, 16], opts(8, 0)).contains("token id 16"));
        assert!(check(&config, &[1, 2], &opts(8, 20)).is_ok());
        assert_eq!(ScoreOptions::half_window(&config).stride, 4);
    }
}
