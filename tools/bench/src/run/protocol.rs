//! The tests of a run, written once for every backend: the warmup (not
//! counted), then per repetition the single request (one baseline for
//! every mode: with one request in flight there is nothing to batch) and
//! each mode's concurrency levels. A mode is a [`Lane`]: the in-process
//! engine in threads or batched mode, or a server over HTTP; each test runs
//! through the one load loop, [`run_test`], on the run's [`Prompts`] (the
//! text ones rotated, or a synthetic one per request) and records the
//! prefix reuse its backend counted.

use std::borrow::Cow;
use std::error::Error;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::options::{Options, DEFAULT_CONCURRENT_PROMPTS};
use super::plan::RunPlan;
use crate::progress::Progress;
use crate::runner::{poisson_arrivals, run_test, Backend, Load};
use crate::{stats, PrefixReuse, RequestRecord, TestResult};
use gpt2::rng::Rng;

/// The prompts of a run, as token ids.
pub(super) enum Prompts {
    /// The text prompts: the single test's one (the warmup's too), and the
    /// concurrent tests', rotated.
    Text {
        single: Vec<Vec<u32>>,
        concurrent: Vec<Vec<u32>>,
    },
    /// `--prompt-tokens`: a prompt of its own for every request.
    Synthetic(Synthetic),
}

/// Which tests' prompts: the warmup and single test's, or the levels'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Which {
    Single,
    Concurrent,
}

impl Prompts {
    /// The prompts `opts` names: the text ones, each tokenized by `tok`, or
    /// with `prompt_tokens` (`--prompt-tokens`, or a cell's) synthetic ones
    /// of token ids below `vocab`. `check` sees each text prompt, or one
    /// synthetic prompt (all have its length), with words naming it for its
    /// error, before any work.
    pub fn new(
        opts: &Options,
        prompt_tokens: Option<usize>,
        tok: &gpt2::Gpt2Tokenizer,
        vocab: usize,
        check: impl Fn(&str, &[u32]) -> Result<(), Box<dyn Error>>,
    ) -> Result<Prompts, Box<dyn Error>> {
        if let Some(own) = prompt_tokens {
            let synthetic = Synthetic::new(opts.shared_prefix_tokens, own, vocab, opts.prompt_seed);
            let what = format!(
                "each synthetic prompt (--shared-prefix-tokens {} + --prompt-tokens {own})",
                opts.shared_prefix_tokens
            );
            check(&what, &synthetic.prompt(0))?;
            return Ok(Prompts::Synthetic(synthetic));
        }
        let ids = prompt_texts(opts)
            .iter()
            .map(|text| {
                let ids = tok.encode(text)?;
                check(&format!("prompt {text:?}"), &ids)?;
                Ok(ids)
            })
            .collect::<Result<Vec<_>, Box<dyn Error>>>()?;
        let (single, concurrent) = ids.split_at(1);
        Ok(Prompts::Text {
            single: single.to_vec(),
            concurrent: concurrent.to_vec(),
        })
    }

    /// The prompts of a test of `requests` requests, rotated by the runner:
    /// the text ones, or `requests` new synthetic ones.
    pub fn for_test(&self, which: Which, requests: usize) -> Cow<'_, [Vec<u32>]> {
        match (self, which) {
            (Prompts::Text { single, .. }, Which::Single) => Cow::Borrowed(single),
            (Prompts::Text { concurrent, .. }, Which::Concurrent) => Cow::Borrowed(concurrent),
            (Prompts::Synthetic(s), _) => Cow::Owned(s.take(requests)),
        }
    }

    /// The most tokens any prompt has.
    pub fn longest(&self) -> usize {
        match self {
            Prompts::Text { single, concurrent } => {
                single.iter().chain(concurrent).map(Vec::len).max().unwrap_or(0)
            }
            Prompts::Synthetic(s) => s.len(),
        }
    }
}

/// Synthetic prompts (`--prompt-tokens`, `--shared-prefix-tokens`): one
/// preamble for all, then each prompt's own tokens, the first of them
/// counting up from a seeded start (so the first `vocab` prompts made all
/// differ there: no two share more than the preamble), the rest drawn from
/// the prompt's own seeded stream. Token ids are below the vocabulary.
pub(super) struct Synthetic {
    preamble: Vec<u32>,
    own: usize,
    vocab: usize,
    seed: u64,
    /// Where the first own tokens count up from.
    first: usize,
    /// Prompts made so far: the next one's number.
    made: AtomicUsize,
}

impl Synthetic {
    /// Prompts of a `shared`-token preamble and `own` tokens each (`own` at
    /// least 1), of ids below `vocab` (at least 1), seeded by `seed`.
    pub fn new(shared: usize, own: usize, vocab: usize, seed: u64) -> Synthetic {
        let vocab = vocab.max(1);
        let mut rng = Rng::new(seed);
        let preamble = (0..shared).map(|_| rng.below(vocab) as u32).collect();
        Synthetic {
            preamble,
            own: own.max(1),
            vocab,
            seed,
            first: rng.below(vocab),
            made: AtomicUsize::new(0),
        }
    }

    /// Tokens of every prompt.
    pub fn len(&self) -> usize {
        self.preamble.len() + self.own
    }

    /// Prompt number `j`.
    fn prompt(&self, j: usize) -> Vec<u32> {
        let mut rng = Rng::new(gpt2::request::choice_seed(self.seed, j + 1));
        let mut p = Vec::with_capacity(self.len());
        p.extend_from_slice(&self.preamble);
        p.push(((self.first + j) % self.vocab) as u32);
        p.extend((1..self.own).map(|_| rng.below(self.vocab) as u32));
        p
    }

    /// The next `count` prompts, none made before.
    pub fn take(&self, count: usize) -> Vec<Vec<u32>> {
        let from = self.made.fetch_add(count, Ordering::Relaxed);
        (from..from + count).map(|j| self.prompt(j)).collect()
    }
}

/// The prompts of a run: the single test's, then the concurrent tests'.
pub(super) fn prompt_texts(opts: &Options) -> Vec<String> {
    let concurrent: Vec<String> = if opts.concurrent_prompts.is_empty() {
        DEFAULT_CONCURRENT_PROMPTS.iter().map(|s| s.to_string()).collect()
    } else {
        opts.concurrent_prompts.clone()
    };
    std::iter::once(opts.prompt.clone()).chain(concurrent).collect()
}

/// A backend and the mode its tests are named by.
pub(super) struct Lane<'a, B> {
    pub mode: &'a str,
    pub backend: B,
}

/// What every test of a load shares: the run's, and the workload of its
/// cell (a server's is the run's).
pub(super) struct Protocol<'a> {
    pub opts: &'a Options,
    pub plan: &'a RunPlan,
    pub progress: &'a Progress,
    pub prompts: &'a Prompts,
    pub max_new_tokens: usize,
    /// Concurrency levels above 1.
    pub levels: &'a [usize],
}

/// What one test measured: its wall time, its requests, and the prefix
/// reuse the backend counted over it.
struct Ran {
    secs: f64,
    raw: Vec<RequestRecord>,
    prefix: Option<PrefixReuse>,
}

impl Ran {
    fn result(self, name: &str, mode: &str, dtype: &str, concurrency: usize, rep: usize) -> TestResult {
        TestResult {
            prefix: self.prefix,
            ..stats::test_result(name, mode, dtype, concurrency, rep, self.secs, self.raw)
        }
    }
}

impl Protocol<'_> {
    /// One test on `lane`: `requests` requests from `concurrency` clients,
    /// each of `--choices` × the load's new tokens, on `which` prompts,
    /// its open-loop arrivals drawn afresh from the seed.
    fn test<B: Backend>(
        &self,
        lane: &Lane<B>,
        dtype: &str,
        name: &str,
        concurrency: usize,
        requests: usize,
        which: Which,
    ) -> Result<Ran, String> {
        let opts = self.opts;
        let arrivals = opts
            .request_rate
            .map(|r| poisson_arrivals(requests, r, opts.arrival_seed));
        let prompts = self.prompts.for_test(which, requests);
        let load = Load {
            name,
            mode: lane.mode,
            dtype,
            concurrency,
            requests,
            prompts: &prompts,
            max_new_tokens: &[self.max_new_tokens],
            choices: opts.choices,
            arrivals: arrivals.as_deref(),
        };
        let before = lane.backend.prefix_stats();
        let (secs, raw) = run_test(&lane.backend, &load, self.progress)?;
        // Every request has ended, so every hit of the test is counted (at
        // its admission).
        let prefix = before.zip(lane.backend.prefix_stats()).map(|(b, a)| PrefixReuse {
            hits: a.hits.saturating_sub(b.hits),
            tokens_reused: a.tokens_reused.saturating_sub(b.tokens_reused),
        });
        Ok(Ran { secs, raw, prefix })
    }

    /// The warmup of a load, `--warmup` requests on each lane in turn, not
    /// counted; `note` announces it.
    pub fn warmup<B: Backend>(&self, lanes: &[Lane<B>], dtype: &str, note: &str) -> Result<(), String> {
        if self.opts.warmup == 0 {
            return Ok(());
        }
        self.progress.println(note);
        for lane in lanes {
            self.test(lane, dtype, "warmup", 1, self.opts.warmup, Which::Single)?;
        }
        Ok(())
    }

    /// Repetition `rep` of the tests: the single request on `single`, then
    /// each lane's levels in turn.
    pub fn repetition<B: Backend>(
        &self,
        single: &Lane<B>,
        lanes: &[Lane<B>],
        dtype: &str,
        rep: usize,
    ) -> Result<Vec<TestResult>, String> {
        let single_test = self.test(
            single,
            dtype,
            "single",
            1,
            self.opts.single_requests,
            Which::Single,
        )?;
        let mut tests = vec![single_test.result("single", single.mode, dtype, 1, rep)];
        for lane in lanes {
            for &level in self.levels {
                let name = format!("concurrent-{level}");
                let requests = self.plan.requests_at(level);
                let ran = self.test(lane, dtype, &name, level, requests, Which::Concurrent)?;
                tests.push(ran.result(&name, lane.mode, dtype, level, rep));
            }
        }
        Ok(tests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One preamble for all; every prompt's own tokens start apart, call
    /// after call; the ids stay below the vocabulary; a seed fixes them.
    #[test]
    fn synthetic_prompts_share_the_preamble_and_nothing_more() {
        let s = Synthetic::new(6, 3, 50, 7);
        assert_eq!(s.len(), 9);
        let mut all = s.take(20);
        all.extend(s.take(30));
        let preamble = &all[0][..6];
        for p in &all {
            assert_eq!((p.len(), &p[..6]), (9, preamble));
            assert!(p.iter().all(|&t| t < 50), "{p:?}");
        }
        let mut firsts: Vec<u32> = all.iter().map(|p| p[6]).collect();
        firsts.sort_unstable();
        firsts.dedup();
        assert_eq!(firsts.len(), 50, "the first own token of 50 prompts all differ");
        assert_eq!(Synthetic::new(6, 3, 50, 7).take(50), all, "a seed fixes them");
        let other = Synthetic::new(6, 3, 50, 8).take(1);
        assert_ne!(other[0], all[0], "another seed, other prompts");
        // No preamble: the prompts are their own tokens alone.
        assert!(Synthetic::new(0, 1, 10, 0).take(3).iter().all(|p| p.len() == 1));
    }
}
