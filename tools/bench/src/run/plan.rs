//! The validated shape of a run: the flags checked (errors name the flag)
//! and their defaults resolved, before anything is loaded or sent; the
//! cells the run measures (one per dtype, times every `--sweep` axis).

use gpt2::{Dtype, KvDtype};

use clap::ValueEnum;

use super::options::{Options, DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT};
use super::sweep::{Axis, AxisSweep, Value};
use crate::in_process::{Mode, PoolLayout};
use crate::runner::{poisson_arrivals, MAX_CLIENTS};
use crate::stats::Thresholds;

/// The longest open-loop schedule a test may have (`--request-rate`).
pub const MAX_SCHEDULE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The validated shape of a run: defaults resolved, flags checked.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// The cells' weight formats, in the order first met, without duplicates.
    pub dtypes: Vec<Dtype>,
    /// The run's concurrency levels above 1 (`--levels`), ascending,
    /// without duplicates; a cell of the concurrency axis has its own.
    pub levels: Vec<usize>,
    /// The run's new tokens per request (`--max-new-tokens`).
    pub max_new_tokens: usize,
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
    /// The `--sweep` axes, in the order given (none: no sweep).
    pub sweeps: Vec<AxisSweep>,
    /// What each repetition measures, a model load each: the product of
    /// the sweeps (the first varying slowest), each once per dtype of
    /// `--dtype` unless dtype is swept; without a sweep, one per dtype.
    pub cells: Vec<CellPlan>,
}

/// One cell of a run: the settings its model load and its tests run with.
#[derive(Debug, Clone, PartialEq)]
pub struct CellPlan {
    /// A `--sweep model=` value; `None`: the run's weights flags.
    pub model: Option<String>,
    pub dtype: Dtype,
    /// The KV caches' format.
    pub kv_dtype: KvDtype,
    /// Synthetic prompts of this many tokens each; `None`: the text prompts.
    pub prompt_tokens: Option<usize>,
    pub max_new_tokens: usize,
    /// Concurrency levels above 1, ascending.
    pub levels: Vec<usize>,
    /// The cell's value on each swept axis, in the sweeps' order.
    pub swept: Vec<(Axis, String)>,
}

impl CellPlan {
    /// `prompt-tokens=128, dtype=bf16`: the swept values, for progress and labels.
    pub fn label(&self) -> String {
        let parts: Vec<String> = self.swept.iter().map(|(a, v)| format!("{a}={v}")).collect();
        parts.join(", ")
    }

    /// This cell with `axis` set to `value`.
    fn with(&self, axis: Axis, value: &Value) -> CellPlan {
        let mut c = self.clone();
        match (axis, value) {
            (Axis::PromptTokens, Value::Count(n)) => c.prompt_tokens = Some(*n),
            (Axis::MaxNewTokens, Value::Count(n)) => c.max_new_tokens = *n,
            (Axis::Concurrency, Value::Count(n)) => c.levels = (*n > 1).then_some(*n).into_iter().collect(),
            (Axis::Dtype, Value::Dtype(d)) => c.dtype = *d,
            (Axis::KvDtype, Value::KvDtype(k)) => c.kv_dtype = *k,
            (Axis::Model, Value::Model(m)) => c.model = Some(m.clone()),
            // `sweep::parse` gives each axis its own kind of value.
            _ => unreachable!("--sweep {axis} with the value {value:?}"),
        }
        c.swept.push((axis, value.to_string()));
        c
    }
}

impl RunPlan {
    /// Checks `opts` on a machine of `cores` cores; errors name the flag.
    pub fn new(opts: &Options, cores: usize) -> Result<RunPlan, String> {
        check_sweeps(opts)?;
        let levels = levels(opts)?;
        let max_new_tokens = opts.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS);
        let cells = cells(opts, &levels, max_new_tokens);
        let dtypes = distinct(cells.iter().map(|c| c.dtype));
        let requests_per_level = opts.requests_per_level.unwrap_or(if opts.full { 20 } else { 6 });
        let repetitions = opts.repetitions.unwrap_or(if opts.full { 3 } else { 1 });
        for (name, v) in [
            ("--single-requests", opts.single_requests),
            ("--requests-per-level", requests_per_level),
            ("--repetitions", repetitions),
            ("--max-new-tokens", max_new_tokens),
            ("--max-batch", opts.max_batch),
            ("--max-prompt-rows", opts.max_prompt_rows),
            ("--max-step-rows", opts.max_step_rows),
        ] {
            if v < 1 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        let highest = cells.iter().filter_map(|c| c.levels.last()).max();
        let (threads, max_busy) = threads(opts, cores, highest.copied().unwrap_or(1))?;
        let prefix_cache_bytes = workload(opts)?;
        if opts.probe && cells.iter().any(|c| c.kv_dtype != KvDtype::F32) {
            return Err(
                "--probe counts the KV cache's bytes at f32's 4 a value; with --kv-dtype bf16 its decode figures \
                 would be wrong: run the probe with the f32 cache"
                    .into(),
            );
        }
        if let Some(rate) = opts.request_rate {
            let all = distinct(cells.iter().flat_map(|c| c.levels.iter().copied()));
            check_rate(opts, rate, &all, requests_per_level)?;
        }
        // The default targets are the default workload's (124M, a short
        // prompt): a sweep's cells are held to `failed` and to --target.
        let mut thresholds = Thresholds {
            strict: opts.strict,
            defaults: opts.sweeps.is_empty(),
            ..Thresholds::default()
        };
        for t in &opts.targets {
            thresholds.set(t)?;
        }
        Ok(RunPlan {
            dtypes,
            levels,
            max_new_tokens,
            modes: opts.mode.modes(),
            requests_per_level,
            repetitions,
            threads,
            cores,
            max_busy,
            prefix_cache_bytes,
            thresholds,
            sweeps: opts.sweeps.clone(),
            cells,
        })
    }

    /// Whether the run sweeps an axis (its report has a `sweep`).
    pub fn is_sweep(&self) -> bool {
        !self.sweeps.is_empty()
    }

    /// Requests a level runs: fewer than its clients would never reach it.
    pub fn requests_at(&self, level: usize) -> usize {
        self.requests_per_level.max(level)
    }

    /// Every request of a run, warmups included, over `lanes` modes (each
    /// load warms up each): the progress bar's length. In process each cell
    /// of each repetition is a load and a run of the tests (the single
    /// request, then each lane's levels); a `server` is loaded once, every
    /// repetition on it.
    pub fn total_requests(&self, opts: &Options, lanes: usize, server: bool) -> usize {
        let run = |levels: &[usize]| -> usize {
            let concurrent: usize = levels.iter().map(|&l| self.requests_at(l)).sum();
            opts.single_requests + lanes * concurrent
        };
        let warmup = lanes * opts.warmup;
        if server {
            return warmup + self.repetitions * run(&self.levels);
        }
        let per_rep: usize = self.cells.iter().map(|c| warmup + run(&c.levels)).sum();
        self.repetitions * per_rep
    }
}

/// The distinct items, in the order first met.
fn distinct<T: PartialEq>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// Each `--sweep`: its axis swept once, and not beside a plain flag that
/// sets the same thing (both named). (`--model gpt2` and `--prompt` with
/// their default values cannot be told from their absence.)
fn check_sweeps(opts: &Options) -> Result<(), String> {
    for (i, s) in opts.sweeps.iter().enumerate() {
        if opts.sweeps[..i].iter().any(|o| o.axis == s.axis) {
            return Err(format!(
                "--sweep {0}: the axis is swept twice; give its values in one --sweep {0}=V1,V2,...",
                s.axis
            ));
        }
        let given = |flag: &str| match flag {
            "--prompt-tokens" => opts.prompt_tokens.is_some(),
            "--prompt" => opts.prompt != DEFAULT_PROMPT,
            "--concurrent-prompt" => !opts.concurrent_prompts.is_empty(),
            "--weights" => opts.weights.weights.is_some(),
            // WeightsArgs' default model.
            "--model" => opts.weights.model != "gpt2",
            "--synthetic" => opts.weights.synthetic,
            "--synthetic-preset" => opts.weights.synthetic_preset.is_some(),
            "--revision" => opts.weights.revision.is_some(),
            "--dtype" => !opts.dtypes.is_empty(),
            "--levels" => opts.levels.is_some(),
            "--max-new-tokens" => opts.max_new_tokens.is_some(),
            "--kv-dtype" => opts.kv_dtype.is_some(),
            _ => false,
        };
        if let Some(flag) = s.axis.flags().iter().find(|f| given(f)) {
            let what = match s.axis {
                Axis::PromptTokens => "prompts",
                Axis::Model => "checkpoint",
                Axis::Dtype => "weight format",
                Axis::Concurrency => "concurrency levels",
                Axis::MaxNewTokens => "new tokens per request",
                Axis::KvDtype => "KV cache's format",
            };
            return Err(format!(
                "--sweep {} and {flag} both set the {what}: give one of them",
                s.axis
            ));
        }
    }
    Ok(())
}

/// The cells: the product of the sweeps, the first axis varying slowest,
/// then each `--dtype` (f32 if none) unless dtype is swept; every setting
/// not swept is the run's.
fn cells(opts: &Options, levels: &[usize], max_new_tokens: usize) -> Vec<CellPlan> {
    let dtypes = if opts.dtypes.is_empty() {
        vec![Dtype::F32]
    } else {
        distinct(opts.dtypes.iter().copied())
    };
    let mut cells = vec![CellPlan {
        model: None,
        dtype: dtypes[0],
        kv_dtype: opts.kv_dtype.unwrap_or(KvDtype::F32),
        prompt_tokens: opts.prompt_tokens,
        max_new_tokens,
        levels: levels.to_vec(),
        swept: Vec::new(),
    }];
    for sweep in &opts.sweeps {
        cells = cells
            .iter()
            .flat_map(|c| sweep.values.iter().map(move |v| c.with(sweep.axis, v)))
            .collect();
    }
    if opts.sweeps.iter().all(|s| s.axis != Axis::Dtype) {
        cells = cells
            .iter()
            .flat_map(|c| {
                dtypes.iter().map(move |&d| CellPlan {
                    dtype: d,
                    ..c.clone()
                })
            })
            .collect();
    }
    cells
}

/// `--choices`, `--prompt-tokens` (and the flags that shape synthetic
/// prompts) and `--prefix-cache-mib`, checked; the
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
    let synthetic = opts.prompt_tokens.is_some() || opts.sweeps.iter().any(|s| s.axis == Axis::PromptTokens);
    if opts.shared_prefix_tokens > 0 && !synthetic {
        return Err(
            "--shared-prefix-tokens shapes synthetic prompts: it needs --prompt-tokens <N> (or --sweep \
             prompt-tokens=...)"
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
