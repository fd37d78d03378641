//! The validated shape of a run: the flags checked (errors name the flag)
//! and their defaults resolved, before anything is loaded or sent.

use gpt2::Dtype;

use clap::ValueEnum;

use super::options::Options;
use crate::in_process::{Mode, PoolLayout};
use crate::runner::{poisson_arrivals, MAX_CLIENTS};
use crate::stats::Thresholds;

/// The longest open-loop schedule a test may have (`--request-rate`).
pub const MAX_SCHEDULE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The validated shape of a run: defaults resolved, flags checked.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// The weight formats, in the order given, without duplicates.
    pub dtypes: Vec<Dtype>,
    /// Concurrency levels above 1, ascending, without duplicates.
    pub levels: Vec<usize>,
    pub modes: Vec<Mode>,
    pub requests_per_level: usize,
    pub repetitions: usize,
    /// Threads of the shared pool, or of each request's pool.
    pub threads: usize,
    pub cores: usize,
    /// Most compute threads busy at once, at the highest level.
    pub max_busy: usize,
    /// Batched mode's prefix-cache budget, bytes (`--prefix-cache-mib`).
    pub prefix_cache_bytes: usize,
    pub thresholds: Thresholds,
}

impl RunPlan {
    /// Checks `opts` on a machine of `cores` cores; errors name the flag.
    pub fn new(opts: &Options, cores: usize) -> Result<RunPlan, String> {
        let dtypes = dtypes(opts)?;
        let levels = levels(opts)?;
        let requests_per_level = opts.requests_per_level.unwrap_or(if opts.full { 20 } else { 6 });
        let repetitions = opts.repetitions.unwrap_or(if opts.full { 3 } else { 1 });
        for (name, v) in [
            ("--single-requests", opts.single_requests),
            ("--requests-per-level", requests_per_level),
            ("--repetitions", repetitions),
            ("--max-new-tokens", opts.max_new_tokens),
            ("--max-batch", opts.max_batch),
            ("--max-prompt-rows", opts.max_prompt_rows),
            ("--max-step-rows", opts.max_step_rows),
        ] {
            if v < 1 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        let (threads, max_busy) = threads(opts, cores, levels.last().copied().unwrap_or(1))?;
        let prefix_cache_bytes = workload(opts)?;
        if let Some(rate) = opts.request_rate {
            check_rate(opts, rate, &levels, requests_per_level)?;
        }
        let mut thresholds = Thresholds {
            strict: opts.strict,
            ..Thresholds::default()
        };
        for t in &opts.targets {
            thresholds.set(t)?;
        }
        Ok(RunPlan {
            dtypes,
            levels,
            modes: opts.mode.modes(),
            requests_per_level,
            repetitions,
            threads,
            cores,
            max_busy,
            prefix_cache_bytes,
            thresholds,
        })
    }

    /// Requests a level runs: fewer than its clients would never reach it.
    pub fn requests_at(&self, level: usize) -> usize {
        self.requests_per_level.max(level)
    }

    /// Every request of a run, warmups included, over `loads` loads of what
    /// serves them (each warms up each of its `lanes` modes) and `runs`
    /// runs of the tests (the single request, then each lane's levels): the
    /// progress bar's length. In process each dtype of each repetition is a
    /// load and a run; a server is loaded once for every repetition.
    pub fn total_requests(&self, opts: &Options, lanes: usize, loads: usize, runs: usize) -> usize {
        let levels: usize = self.levels.iter().map(|&l| self.requests_at(l)).sum();
        loads * lanes * opts.warmup + runs * (opts.single_requests + lanes * levels)
    }
}

/// The weight formats, in the order given, without duplicates.
fn dtypes(opts: &Options) -> Result<Vec<Dtype>, String> {
    let mut dtypes: Vec<Dtype> = Vec::new();
    for &d in &opts.dtypes {
        if !dtypes.contains(&d) {
            dtypes.push(d);
        }
    }
    if dtypes.is_empty() {
        return Err("--dtype: name at least one of f32, bf16, int8".into());
    }
    Ok(dtypes)
}

/// `--choices`, `--prompt-tokens` and `--prefix-cache-mib`, checked; the
/// prefix cache's budget in bytes. In process, several choices need batched
/// mode alone (threads mode has no prefill to share) and fit the batch; a
/// prefix cache needs the scheduler of batched mode. (The prompts' length
/// against the context is checked with the model's config, before it loads.)
fn workload(opts: &Options) -> Result<usize, String> {
    if opts.choices == 0 {
        return Err("--choices must be at least 1 (completions per request)".into());
    }
    if opts.prompt_tokens == Some(0) {
        return Err(
            "--prompt-tokens must be at least 1 (each request's own tokens, after any --shared-prefix-tokens)"
                .into(),
        );
    }
    if opts.url.is_some() {
        return Ok(0);
    }
    let modes = opts.mode.modes();
    if opts.choices > 1 && modes.contains(&Mode::Threads) {
        return Err(format!(
            "--choices {} needs --mode batched: threads mode runs each request on its own session, which cannot \
             share one prefill between choices (--mode is {})",
            opts.choices,
            opts.mode.to_possible_value().map_or("?".into(), |v| v.get_name().to_string())
        ));
    }
    if opts.choices > 1 && opts.profile {
        return Err(format!(
            "--profile times the single request's own session in threads mode; with --choices {} it runs batched",
            opts.choices
        ));
    }
    if opts.choices > opts.max_batch {
        return Err(format!(
            "--choices {} is more than --max-batch {}: a request's choices are decoded together, in one batch",
            opts.choices, opts.max_batch
        ));
    }
    if opts.prefix_cache_mib > 0 && !modes.contains(&Mode::Batched) {
        return Err(format!(
            "--prefix-cache-mib {} is batched mode's scheduler's; --mode threads has none",
            opts.prefix_cache_mib
        ));
    }
    opts.prefix_cache_mib.checked_mul(1 << 20).ok_or_else(|| {
        format!(
            "--prefix-cache-mib {} is more bytes than this machine can count",
            opts.prefix_cache_mib
        )
    })
}

/// The concurrency levels above 1, ascending, without duplicates; 0 and
/// more than [`MAX_CLIENTS`] are refused.
fn levels(opts: &Options) -> Result<Vec<usize>, String> {
    let levels = opts.levels.clone().unwrap_or_else(|| {
        if opts.full {
            vec![2, 4, 8, 16, 32]
        } else {
            vec![2, 4]
        }
    });
    if levels.contains(&0) {
        return Err("--levels: a concurrency level of 0 runs nothing; use levels >= 1".into());
    }
    if let Some(&l) = levels.iter().find(|&&l| l > MAX_CLIENTS) {
        return Err(format!(
            "--levels: a concurrency level of {l} would start {l} client threads; at most {MAX_CLIENTS}"
        ));
    }
    let mut levels: Vec<usize> = levels.into_iter().filter(|&l| l > 1).collect();
    levels.sort_unstable();
    levels.dedup();
    Ok(levels)
}

/// The threads of the pool(s) and the most busy at once at `max_level`;
/// more busy threads than cores only with `--oversubscribe`.
fn threads(opts: &Options, cores: usize, max_level: usize) -> Result<(usize, usize), String> {
    let threads = match (opts.pool, opts.threads_per_request) {
        (_, Some(0)) => return Err("--threads-per-request must be at least 1".into()),
        (_, Some(t)) => t,
        (PoolLayout::Shared, None) => cores,
        (PoolLayout::PerRequest, None) => (cores / max_level).max(1),
    };
    let max_busy = match opts.pool {
        PoolLayout::Shared => threads,
        PoolLayout::PerRequest => threads * max_level,
    };
    if max_busy > cores && !opts.oversubscribe {
        return Err(format!(
            "{max_busy} busy compute threads ({} pool of {threads} at concurrency {max_level}) on {cores} \
             cores: that measures oversubscription. Lower --threads-per-request, or pass --oversubscribe to do \
             it anyway",
            opts.pool.name()
        ));
    }
    Ok((threads, max_busy))
}

/// `--request-rate`: a positive rate whose seeded schedule fits
/// [`MAX_SCHEDULE`] for the largest test.
fn check_rate(opts: &Options, rate: f64, levels: &[usize], requests_per_level: usize) -> Result<(), String> {
    if !(rate.is_finite() && rate > 0.0) {
        return Err(format!(
            "--request-rate must be a positive number of requests per second, not {rate}"
        ));
    }
    // Each test's schedule is a prefix of the seed's one stream, so the
    // largest test's last arrival bounds them all.
    let most = [opts.warmup, opts.single_requests]
        .into_iter()
        .chain(levels.iter().map(|&l| requests_per_level.max(l)))
        .max()
        .unwrap_or(1);
    let last = poisson_arrivals(most, rate, opts.arrival_seed)
        .last()
        .copied()
        .unwrap_or_default();
    if last > MAX_SCHEDULE {
        return Err(format!(
            "--request-rate {rate}: the last of {most} seeded arrivals (--arrival-seed {}) comes after {:.3e} s, \
             more than the {} s a test may wait; raise the rate",
            opts.arrival_seed,
            last.as_secs_f64(),
            MAX_SCHEDULE.as_secs()
        ));
    }
    Ok(())
}
