//! The tests of a run, written once for every backend: the warmup (not
//! counted), then per repetition the single request (one baseline for
//! every mode: with one request in flight there is nothing to batch) and
//! each mode's concurrency levels. A mode is a [`Lane`]: the in-process
//! engine in threads or batched mode, or a server over HTTP; each test runs
//! through the one load loop, [`run_test`].

use std::error::Error;

use super::options::{Options, DEFAULT_CONCURRENT_PROMPTS};
use super::plan::RunPlan;
use crate::progress::Progress;
use crate::runner::{poisson_arrivals, run_test, Backend, Load};
use crate::{stats, RequestRecord, TestResult};

/// The prompts of a run, as token ids.
pub(super) struct Prompts {
    /// The single test's one prompt.
    pub single: Vec<Vec<u32>>,
    /// The concurrent tests' prompts, rotated.
    pub concurrent: Vec<Vec<u32>>,
}

impl Prompts {
    /// The prompts `opts` names, each tokenized by `tok` and checked by
    /// `check` (which names the prompt in its error) before any work.
    pub fn encode(
        opts: &Options,
        tok: &gpt2::Gpt2Tokenizer,
        check: impl Fn(&str, &[u32]) -> Result<(), Box<dyn Error>>,
    ) -> Result<Prompts, Box<dyn Error>> {
        let ids = prompt_texts(opts)
            .iter()
            .map(|text| {
                let ids = tok.encode(text)?;
                check(text, &ids)?;
                Ok(ids)
            })
            .collect::<Result<Vec<_>, Box<dyn Error>>>()?;
        let (single, concurrent) = ids.split_at(1);
        Ok(Prompts {
            single: single.to_vec(),
            concurrent: concurrent.to_vec(),
        })
    }

    /// The most tokens any prompt has.
    pub fn longest(&self) -> usize {
        self.single
            .iter()
            .chain(&self.concurrent)
            .map(Vec::len)
            .max()
            .unwrap_or(0)
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

/// What every test of a run shares.
pub(super) struct Protocol<'a> {
    pub opts: &'a Options,
    pub plan: &'a RunPlan,
    pub progress: &'a Progress,
    pub prompts: &'a Prompts,
}

impl Protocol<'_> {
    /// One test on `lane`: `requests` requests from `concurrency` clients,
    /// each of `--max-new-tokens` tokens, its open-loop arrivals drawn afresh
    /// from the seed.
    fn test<B: Backend>(
        &self,
        lane: &Lane<B>,
        dtype: &str,
        name: &str,
        concurrency: usize,
        requests: usize,
        prompts: &[Vec<u32>],
    ) -> Result<(f64, Vec<RequestRecord>), String> {
        let opts = self.opts;
        let arrivals = opts
            .request_rate
            .map(|r| poisson_arrivals(requests, r, opts.arrival_seed));
        let load = Load {
            name,
            mode: lane.mode,
            dtype,
            concurrency,
            requests,
            prompts,
            max_new_tokens: &[opts.max_new_tokens],
            arrivals: arrivals.as_deref(),
        };
        run_test(&lane.backend, &load, self.progress)
    }

    /// The warmup of a load, `--warmup` requests on each lane in turn, not
    /// counted; `note` announces it.
    pub fn warmup<B: Backend>(&self, lanes: &[Lane<B>], dtype: &str, note: &str) -> Result<(), String> {
        if self.opts.warmup == 0 {
            return Ok(());
        }
        self.progress.println(note);
        for lane in lanes {
            self.test(lane, dtype, "warmup", 1, self.opts.warmup, &self.prompts.single)?;
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
        let (opts, prompts) = (self.opts, self.prompts);
        let (secs, raw) = self.test(single, dtype, "single", 1, opts.single_requests, &prompts.single)?;
        let mut tests = vec![stats::test_result(
            "single",
            single.mode,
            dtype,
            1,
            rep,
            secs,
            raw,
        )];
        for lane in lanes {
            for &level in &self.plan.levels {
                let name = format!("concurrent-{level}");
                let requests = self.plan.requests_at(level);
                let (secs, raw) = self.test(lane, dtype, &name, level, requests, &prompts.concurrent)?;
                tests.push(stats::test_result(&name, lane.mode, dtype, level, rep, secs, raw));
            }
        }
        Ok(tests)
    }
}
