//! One `throughput` run: the options, their validated plan, per repetition
//! and weight format (dtype) the tests in order (warmup, the single request
//! and every mode's levels; the dtypes in turn, their order rotating from
//! one repetition to the next), the optional probe, and the report written
//! to disk. With `--url` the same protocol is sent to an OpenAI-compatible
//! server instead ([`run_http`], mode `http`).
//!
//! Default protocol (the reference study's): greedy, exactly 30 new tokens
//! per request (EOS ignored), 2 warmup requests, 5 sequential single
//! requests, then 6 requests at each concurrency level (2 and 4), 3 prompts
//! rotated, one client thread per in-flight request sharing the one
//! immutable model, f32 weights.

use std::error::Error;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use clap::ValueEnum;

use super::http::{Http, HttpOptions};
use super::in_process::{InProcess, Mode, PoolLayout};
use super::roofline::EngineTimes;
use super::runner::{poisson_arrivals, run_test, Load, MAX_CLIENTS};
use super::stats::{self, Thresholds};
use super::{
    meta, report, roofline, DtypeProfile, DtypeRun, Metadata, ModelInfo, Report, ServerInfo, TestResult,
    SCHEMA_VERSION,
};
use crate::progress::Progress;
use gpt2::profile::{self, Profile};
use gpt2::{
    Dtype, Fit, GenerateOptions, Gpt2Config, Gpt2Model, Invalid, Request, Scheduler, SchedulerConfig,
};
use gpt2_hub::{self as hub, WeightsArgs};

/// The prompts of the concurrent tests unless `--concurrent-prompt` is given.
pub const DEFAULT_CONCURRENT_PROMPTS: [&str; 3] = [
    "Hello, how are you?",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away, there lived a",
];

/// Which execution modes a run measures (`throughput --mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeChoice {
    /// One client thread per in-flight request, each running its own forward passes.
    Threads,
    /// The same requests through the continuous-batching scheduler.
    Batched,
    /// Both, one after the other, for a side-by-side comparison.
    Both,
}

/// Everything a run is asked to do: the `throughput` flags (this struct is
/// their clap definition, flattened into the binary's parser).
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    #[command(flatten)]
    pub weights: WeightsArgs,
    /// Weight formats to measure, comma-separated: f32, bf16, int8. Each
    /// repetition runs them in turn, each loading the model afresh (the
    /// previous one dropped first), the order rotating from one repetition to
    /// the next: use --repetitions 3 or more to compare them.
    #[arg(
        long = "dtype",
        value_name = "DTYPE",
        value_delimiter = ',',
        default_value = "f32",
        conflicts_with = "url"
    )]
    pub dtypes: Vec<Dtype>,
    /// Exact number of tokens every request generates (EOS is ignored).
    #[arg(long, default_value_t = 30)]
    pub max_new_tokens: usize,
    /// Requests run before measuring, not counted.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Sequential requests in the single-request test.
    #[arg(long, default_value_t = 5)]
    pub single_requests: usize,
    /// Concurrency levels of the concurrent tests (1 is the single-request test)
    /// [default: 2,4, or 2,4,8,16,32 with --full].
    #[arg(long, value_delimiter = ',')]
    pub levels: Option<Vec<usize>>,
    /// Which execution modes to measure.
    #[arg(long, value_enum, default_value = "both", conflicts_with = "url")]
    pub mode: ModeChoice,
    /// Batched mode: most sequences decoded together.
    #[arg(long, default_value_t = 32, conflicts_with = "url")]
    pub max_batch: usize,
    /// Batched mode: most prompt rows prefilled per step.
    #[arg(long, default_value_t = 128, conflicts_with = "url")]
    pub max_prompt_rows: usize,
    /// Open loop: requests arrive as a seeded Poisson process at this many per
    /// second (each level still caps in-flight requests at its concurrency);
    /// latency and TTFT count from the arrival, so queueing shows.
    /// Default: closed loop (a client sends its next request when the last ends).
    #[arg(long, value_name = "R")]
    pub request_rate: Option<f64>,
    /// Seed of the Poisson arrivals.
    #[arg(long, default_value_t = 0)]
    pub arrival_seed: u64,
    /// Break the single-request test's time down by op (prefill and decode apart).
    #[arg(long, conflicts_with = "url")]
    pub profile: bool,
    /// Measure this machine's limits (read bandwidth, FMA peak, SGEMM) and
    /// report achieved / limit for decode and prefill.
    #[arg(long, conflicts_with = "url")]
    pub probe: bool,
    /// Requests per concurrency level, and at least the level itself, so
    /// that every client runs one [default: 6, or 20 with --full].
    #[arg(long)]
    pub requests_per_level: Option<usize>,
    /// Repetitions of every test [default: 1, or 3 with --full].
    #[arg(long)]
    pub repetitions: Option<usize>,
    /// More requests per level and repetitions with spread (stddev, min, max).
    #[arg(long)]
    pub full: bool,
    /// Prompt of the single-request test.
    #[arg(long, default_value = "Hello, how are you?")]
    pub prompt: String,
    /// Prompts rotated in the concurrent tests (repeat the flag) [default: 3 built-in prompts].
    #[arg(long = "concurrent-prompt", value_name = "TEXT")]
    pub concurrent_prompts: Vec<String>,
    /// How compute threads are organised.
    #[arg(long, value_enum, default_value = "shared", conflicts_with = "url")]
    pub pool: PoolLayout,
    /// Threads of the shared pool, or of each request's pool (see --pool).
    #[arg(long, conflicts_with = "url")]
    pub threads_per_request: Option<usize>,
    /// Allow more busy compute threads than cores (per-request pools only).
    #[arg(long, conflicts_with = "url")]
    pub oversubscribe: bool,
    /// Print only the JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    /// Directory for the JSON, Markdown and SVG outputs.
    #[arg(long, default_value = "data/benchmarks")]
    pub out_dir: PathBuf,
    /// Set a pass/fail target, e.g. `--target single_tokens_per_s=50`
    /// (repeatable): the value must be a finite number, and a target so
    /// named is required (missing it exits 3), whichever it is.
    #[arg(long = "target", value_name = "NAME=VALUE")]
    pub targets: Vec<String>,
    /// Require every target: a miss of any (the project's own batching
    /// targets too, not only the reference study's) exits 3. Without it the
    /// project's own targets are measured and reported, and a miss of one
    /// is noted but leaves the exit status 0.
    #[arg(long)]
    pub strict: bool,
    /// Benchmark an OpenAI-compatible server (`gpt2 serve`, vLLM, llama.cpp's
    /// llama-server) at http://HOST:PORT instead of the in-process engine:
    /// the same tests (mode `http`), each prompt sent as token ids to
    /// /v1/completions, streamed, greedy, exactly --max-new-tokens tokens
    /// (`ignore_eos`). The prompts are tokenized here (--tokenizer, else
    /// --weights DIR's tokenizer.json, else the built-in GPT-2 one); no model
    /// is loaded. Refused with it: --dtype, --mode, --max-batch,
    /// --max-prompt-rows, --pool, --threads-per-request, --oversubscribe,
    /// --profile, --probe (the server's own settings; no roofline), and
    /// --model, --synthetic, --revision (the hub's; see --server-model).
    #[arg(
        long,
        value_name = "URL",
        conflicts_with_all = ["model", "synthetic", "revision"]
    )]
    pub url: Option<String>,
    /// With --url: the bearer token sent (`Authorization: Bearer KEY`);
    /// default: the OPENAI_API_KEY environment variable, if set.
    #[arg(long, value_name = "KEY", requires = "url")]
    pub api_key: Option<String>,
    /// With --url: the `model` sent with every request [default: the first
    /// id the server's /v1/models lists].
    #[arg(long, value_name = "NAME", requires = "url")]
    pub server_model: Option<String>,
    /// With --url: the longest the server may stay silent (for the answer to
    /// begin, or between two reads of a stream) before the request fails,
    /// seconds; connecting may take at most 5 s.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, requires = "url")]
    pub http_timeout: f64,
    /// With --url: the longest one request may take as a whole, connecting to
    /// its last token, seconds; past it the request fails [default: derived
    /// from the request: --http-timeout + 1 s per token asked for + 10 ms per
    /// prompt token, at most 86400]. Whatever the deadline, a request whose
    /// stream carries more than it asked for (more than --max-new-tokens + 8
    /// events, a line or event over 64 KiB, more than 16 KiB per token in
    /// all) fails at once, by name.
    #[arg(long, value_name = "SECS", requires = "url")]
    pub request_deadline: Option<f64>,
}

/// The longest open-loop schedule a test may have (`--request-rate`).
pub const MAX_SCHEDULE: std::time::Duration = std::time::Duration::from_secs(3600);

/// How a finished run went, for the exit status (`throughput --help`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// Requests that failed, over every test (warmup excluded).
    pub failed_requests: usize,
    pub requests: usize,
    /// Names of the required targets the run missed.
    pub missed_targets: Vec<String>,
    /// Names of the targets the run missed that were not required (the
    /// project's own, without `--strict` or `--target`): noted, exit 0.
    pub missed_opt_in: Vec<String>,
}

impl RunOutcome {
    /// 0: every request succeeded and every required target passed (a
    /// missed opt-in target is only noted); 3: required targets missed; 4:
    /// requests failed (whatever the targets). 1 is a run that could not
    /// finish, 2 a bad flag (clap's usage error).
    pub fn exit_code(&self) -> u8 {
        if self.failed_requests > 0 {
            4
        } else if !self.missed_targets.is_empty() {
            3
        } else {
            0
        }
    }

    /// One line for stderr when the status is not 0, or when opt-in
    /// targets were missed.
    pub fn summary(&self) -> Option<String> {
        let opt_in = (!self.missed_opt_in.is_empty()).then(|| {
            format!(
                "opt-in targets missed (not required; --strict or --target NAME=VALUE requires them): {}",
                self.missed_opt_in.join(", ")
            )
        });
        let main = match self.exit_code() {
            4 => Some(format!(
                "FAILED: {} of {} requests failed (exit status 4)",
                self.failed_requests, self.requests
            )),
            3 => Some(format!(
                "targets missed: {} (exit status 3)",
                self.missed_targets.join(", ")
            )),
            _ => None,
        };
        match (main, opt_in) {
            (Some(m), Some(o)) => Some(format!("{m}\n{o}")),
            (m, o) => m.or(o),
        }
    }
}

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
    pub thresholds: Thresholds,
}

impl RunPlan {
    /// Checks `opts` on a machine of `cores` cores; errors name the flag.
    pub fn new(opts: &Options, cores: usize) -> Result<RunPlan, String> {
        let mut dtypes: Vec<Dtype> = Vec::new();
        for &d in &opts.dtypes {
            if !dtypes.contains(&d) {
                dtypes.push(d);
            }
        }
        if dtypes.is_empty() {
            return Err("--dtype: name at least one of f32, bf16, int8".into());
        }
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
        let requests_per_level = opts.requests_per_level.unwrap_or(if opts.full { 20 } else { 6 });
        let repetitions = opts.repetitions.unwrap_or(if opts.full { 3 } else { 1 });
        for (name, v) in [
            ("--single-requests", opts.single_requests),
            ("--requests-per-level", requests_per_level),
            ("--repetitions", repetitions),
            ("--max-new-tokens", opts.max_new_tokens),
            ("--max-batch", opts.max_batch),
            ("--max-prompt-rows", opts.max_prompt_rows),
        ] {
            if v < 1 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        let max_level = levels.last().copied().unwrap_or(1);
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
        if let Some(r) = opts.request_rate {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!(
                    "--request-rate must be a positive number of requests per second, not {r}"
                ));
            }
            // Each test's schedule is a prefix of the seed's one stream, so
            // the largest test's last arrival bounds them all.
            let most = [opts.warmup, opts.single_requests]
                .into_iter()
                .chain(levels.iter().map(|&l| requests_per_level.max(l)))
                .max()
                .unwrap_or(1);
            let last = poisson_arrivals(most, r, opts.arrival_seed)
                .last()
                .copied()
                .unwrap_or_default();
            if last > MAX_SCHEDULE {
                return Err(format!(
                    "--request-rate {r}: the last of {most} seeded arrivals (--arrival-seed {}) comes after {:.3e} s, \
                     more than the {} s a test may wait; raise the rate",
                    opts.arrival_seed,
                    last.as_secs_f64(),
                    MAX_SCHEDULE.as_secs()
                ));
            }
        }
        let modes = match opts.mode {
            ModeChoice::Threads => vec![Mode::Threads],
            ModeChoice::Batched => vec![Mode::Batched],
            ModeChoice::Both => vec![Mode::Threads, Mode::Batched],
        };
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
            modes,
            requests_per_level,
            repetitions,
            threads,
            cores,
            max_busy,
            thresholds,
        })
    }

    /// Requests a level runs: fewer than its clients would never reach it.
    pub fn requests_at(&self, level: usize) -> usize {
        self.requests_per_level.max(level)
    }

    /// Every request of the run, warmup included (once per dtype and
    /// repetition: each loads its model afresh), over every dtype: the
    /// progress bar's length.
    pub fn total_requests(&self, warmup: usize, single_requests: usize) -> usize {
        let levels: usize = self.levels.iter().map(|&l| self.requests_at(l)).sum();
        let per_load = warmup * self.modes.len() + single_requests + self.modes.len() * levels;
        self.dtypes.len() * self.repetitions * per_load
    }
}

/// Runs the benchmark `opts` asks for and writes its report (JSON, Markdown,
/// SVG) under `opts.out_dir`; the summary (or the JSON) goes to stdout,
/// progress to stderr. Each repetition runs the dtypes one after the other,
/// each with its own model (`run_dtype`), in an order that rotates; with
/// `--probe` the machine's limits are measured once, after the last.
pub fn run(opts: &Options) -> Result<RunOutcome, Box<dyn Error>> {
    if let Some(url) = &opts.url {
        return run_http(opts, url);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let plan = RunPlan::new(opts, cores)?;
    // Before any work: a run whose results cannot be written is not started.
    gpt2::files::check_writable_dir(&opts.out_dir)?;
    let resolved = hub::resolve(&opts.weights)?;
    let tok = resolved.load_tokenizer()?;
    // Every dtype loads the same checkpoint, so its config checks the
    // prompts before any model is loaded.
    let (config_path, model_path) = gpt2::weights::checkpoint_files(&resolved.dir);
    let cfg = Gpt2Config::from_file(&config_path)?;
    let progress = Progress::new(
        plan.total_requests(opts.warmup, opts.single_requests) as u64,
        "requests",
    );
    progress.println(&format!(
        "weights: {}",
        resolved.source.describe(cfg.synthetic.as_ref())
    ));

    // Tokenize and check every prompt before any work.
    let concurrent_texts: Vec<String> = if opts.concurrent_prompts.is_empty() {
        DEFAULT_CONCURRENT_PROMPTS.iter().map(|s| s.to_string()).collect()
    } else {
        opts.concurrent_prompts.clone()
    };
    let encode = |text: &str| -> Result<Vec<u32>, Box<dyn Error>> {
        let gen = GenerateOptions::greedy(opts.max_new_tokens);
        match Request::prepare(&cfg, tok.encode(text)?, gen, Fit::Whole) {
            Ok(request) => Ok(request.into_parts().0),
            Err(Invalid::ContextExceeded(l)) => Err(format!(
                "prompt {text:?} is {} tokens; with --max-new-tokens {} it needs {} positions, past the context \
                 window of {}",
                l.prompt_tokens,
                l.max_new_tokens,
                l.positions(),
                l.n_positions
            )
            .into()),
            Err(e) => Err(e.into()),
        }
    };
    let single_prompt = vec![encode(&opts.prompt)?];
    let concurrent_prompts = concurrent_texts
        .iter()
        .map(|t| encode(t))
        .collect::<Result<Vec<_>, _>>()?;

    progress.println(&format!(
        "threads: {} pool, {} thread(s){}, {} cores; at most {} busy compute threads",
        opts.pool.name(),
        plan.threads,
        if opts.pool == PoolLayout::PerRequest {
            " per request"
        } else {
            ""
        },
        plan.cores,
        plan.max_busy
    ));
    if plan.modes.contains(&Mode::Batched) {
        progress.println(&format!(
            "batched mode: one engine thread on the shared pool of {} compute threads, max batch {}, at most {} \
             prompt rows per step",
            plan.threads, opts.max_batch, opts.max_prompt_rows
        ));
    }
    let bench = Bench {
        opts,
        plan: &plan,
        dir: &resolved.dir,
        pool: &Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(plan.threads)
                .build()?,
        ),
        progress: &progress,
        single_prompt: &single_prompt,
        concurrent_prompts: &concurrent_prompts,
    };
    let mut tests: Vec<TestResult> = Vec::new();
    let (mut dtypes, mut profiles, mut engines) = (Vec::new(), Vec::new(), Vec::new());
    // Repetitions outer, dtypes inner, their order rotating: with several
    // repetitions the dtypes alternate, so their ratios are not one
    // dtype's quiet minute against another's busy one.
    let n = plan.dtypes.len();
    for rep in 0..plan.repetitions {
        for i in 0..n {
            let dtype = plan.dtypes[(rep + i) % n];
            let measured = run_dtype(&bench, dtype, rep)?;
            tests.extend(measured.tests);
            profiles.extend(measured.profile);
            engines.extend(measured.engine);
            // Memory: the largest over this dtype's loads.
            match dtypes
                .iter_mut()
                .find(|d: &&mut DtypeRun| d.dtype == measured.run.dtype)
            {
                Some(d) => {
                    let m = measured.run;
                    d.rss_after_load_bytes = d.rss_after_load_bytes.max(m.rss_after_load_bytes);
                    d.peak_rss_bytes = d.peak_rss_bytes.max(m.peak_rss_bytes);
                    d.peak_rss_own &= m.peak_rss_own;
                }
                None => dtypes.push(measured.run),
            }
        }
    }
    // In the order asked for.
    dtypes.sort_by_key(|d| plan.dtypes.iter().position(|p| p.as_str() == d.dtype));
    tests.sort_by_key(|t| {
        (
            plan.dtypes.iter().position(|p| p.as_str() == t.dtype),
            t.repetition,
        )
    });
    let roofline = opts.probe.then(|| {
        let limits = roofline::measure_limits(&progress, &cfg, &plan.dtypes);
        roofline::roofline(&cfg, &limits, &tests, &engines)
    });
    progress.finish();

    let analysis = stats::analyze(&tests, &plan.thresholds);
    let metadata = Metadata {
        timestamp_utc: meta::utc_timestamp(SystemTime::now(), true),
        git_commit: meta::git_commit(),
        rustc: env!("GPT2_RUSTC_VERSION").into(),
        cpu_model: meta::cpu_model(),
        kernels: gpt2_kernels::active().to_string(),
        cores: plan.cores,
        pool_layout: opts.pool.name().into(),
        threads_per_request: plan.threads,
        max_busy_threads: plan.max_busy,
        concurrency_levels: std::iter::once(1).chain(plan.levels.iter().copied()).collect(),
        run_mode: if opts.full { "full" } else { "quick" }.into(),
        modes: plan.modes.iter().map(|m| m.name().to_string()).collect(),
        arrival: match opts.request_rate {
            Some(r) => format!("poisson {r} req/s, seed {}", opts.arrival_seed),
            None => "closed loop".into(),
        },
        max_batch: opts.max_batch,
        max_prompt_rows: opts.max_prompt_rows,
        weights_source: resolved.source.describe(cfg.synthetic.as_ref()),
        weights_sha256: meta::sha256_file(&model_path)?,
        synthetic_weights: resolved.source.is_synthetic(cfg.synthetic.as_ref()),
        model: Some(ModelInfo {
            n_layer: cfg.n_layer,
            n_head: cfg.n_head,
            n_embd: cfg.n_embd,
            n_positions: cfg.n_positions,
            vocab_size: cfg.vocab_size,
            n_params: cfg.n_params(),
        }),
        dtypes,
        max_new_tokens: opts.max_new_tokens,
        warmup_requests: opts.warmup,
        repetitions: plan.repetitions,
        prompts: std::iter::once(opts.prompt.clone())
            .chain(concurrent_texts)
            .collect(),
        server: None,
    };
    let report = Report {
        schema_version: SCHEMA_VERSION,
        metadata,
        tests,
        analysis,
        profile: opts.profile.then_some(profiles),
        roofline,
    };
    write_outputs(&report, &opts.out_dir, opts.json)?;
    Ok(RunOutcome::of(&report))
}

impl RunOutcome {
    /// The outcome a written report tells.
    fn of(report: &Report) -> RunOutcome {
        RunOutcome {
            failed_requests: report.tests.iter().map(|t| t.failed).sum(),
            requests: report.tests.iter().map(|t| t.requests).sum(),
            missed_targets: report
                .analysis
                .targets
                .iter()
                .filter(|t| !t.pass && t.required)
                .map(|t| report.target_label(t))
                .collect(),
            missed_opt_in: report
                .analysis
                .targets
                .iter()
                .filter(|t| !t.pass && !t.required)
                .map(|t| report.target_label(t))
                .collect(),
        }
    }
}

/// The prompts of a run: the single test's, then the concurrent tests'.
fn prompt_texts(opts: &Options) -> (String, Vec<String>) {
    let concurrent = if opts.concurrent_prompts.is_empty() {
        DEFAULT_CONCURRENT_PROMPTS.iter().map(|s| s.to_string()).collect()
    } else {
        opts.concurrent_prompts.clone()
    };
    (opts.prompt.clone(), concurrent)
}

/// `throughput --url`: the run's protocol sent to an OpenAI-compatible
/// server. The plan is checked as for the in-process run (levels, rates,
/// targets; the thread flags are refused by clap), the output directory
/// and the server (`/v1/models`) before any request, and the report is the
/// in-process one's with mode `http`, the server in `metadata.server`, no
/// model shape, memory, profile or roofline.
pub fn run_http(opts: &Options, url: &str) -> Result<RunOutcome, Box<dyn Error>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let plan = RunPlan::new(opts, cores)?;
    if !(opts.http_timeout.is_finite() && opts.http_timeout > 0.0 && opts.http_timeout <= 86_400.0) {
        return Err(format!(
            "--http-timeout must be a number of seconds above 0 and at most 86400, not {}",
            opts.http_timeout
        )
        .into());
    }
    if let Some(d) = opts.request_deadline {
        if !(d.is_finite() && d > 0.0 && d <= 86_400.0) {
            return Err(format!(
                "--request-deadline must be a number of seconds above 0 and at most 86400, not {d}"
            )
            .into());
        }
    }
    gpt2::files::check_writable_dir(&opts.out_dir)?;
    let (tok, tokenizer_source) = match (&opts.weights.tokenizer, &opts.weights.weights) {
        (Some(t), _) => (gpt2::Gpt2Tokenizer::from_file(t)?, t.display().to_string()),
        (None, Some(dir)) if dir.join("tokenizer.json").is_file() => {
            let t = dir.join("tokenizer.json");
            (gpt2::Gpt2Tokenizer::from_file(&t)?, t.display().to_string())
        }
        _ => (
            gpt2::Gpt2Tokenizer::builtin(),
            "the built-in GPT-2 tokenizer".to_string(),
        ),
    };
    let (single_text, concurrent_texts) = prompt_texts(opts);
    let encode = |text: &str| -> Result<Vec<u32>, Box<dyn Error>> {
        let ids = tok.encode(text)?;
        if ids.is_empty() {
            return Err(format!("prompt {text:?} is no tokens at all; a request needs at least one").into());
        }
        Ok(ids)
    };
    let single_prompt = vec![encode(&single_text)?];
    let concurrent_prompts = concurrent_texts
        .iter()
        .map(|t| encode(t))
        .collect::<Result<Vec<_>, _>>()?;
    let api_key = opts
        .api_key
        .clone()
        .or_else(|| std::env::var("OPENAI_API_KEY").ok().filter(|k| !k.is_empty()));
    let (http, server) = Http::connect(&HttpOptions {
        url: url.to_string(),
        api_key,
        model: opts.server_model.clone(),
        max_tokens: opts.max_new_tokens,
        timeout: std::time::Duration::from_secs_f64(opts.http_timeout),
        deadline: opts.request_deadline.map(std::time::Duration::from_secs_f64),
    })?;
    let dtype = server_field(&server, "dtype")
        .and_then(serde_json::Value::as_str)
        .map_or_else(|| "unknown".to_string(), String::from);
    // A server's weights are its own: synthetic ones are known as such only
    // if the server says so: its model's `synthetic` flag (`gpt2 serve`),
    // else the word anywhere in its model list.
    let synthetic = match server_field(&server, "synthetic").and_then(serde_json::Value::as_bool) {
        Some(flag) => flag,
        None => server
            .models
            .to_string()
            .to_ascii_lowercase()
            .contains("synthetic"),
    };
    let per_rep = opts.single_requests + plan.levels.iter().map(|&l| plan.requests_at(l)).sum::<usize>();
    let progress = Progress::new((opts.warmup + plan.repetitions * per_rep) as u64, "requests");
    progress.println(&format!(
        "server: {} model `{}`{}; prompts tokenized with {tokenizer_source}",
        server.url,
        server.model,
        server
            .owned_by
            .as_deref()
            .map(|o| format!(" (owned by {o})"))
            .unwrap_or_default()
    ));
    if synthetic {
        progress
            .println("the server's model list says its weights are SYNTHETIC (random): the text is noise");
    }
    let longest = std::iter::once(&single_prompt[0])
        .chain(&concurrent_prompts)
        .map(Vec::len)
        .max()
        .unwrap_or(0);
    let limits = http.limits();
    progress.println(&format!(
        "each request: deadline {:.0} s{}; its stream at most {} events, {} KiB, {} KiB a line",
        http.deadline(longest).as_secs_f64(),
        if opts.request_deadline.is_some() {
            " (--request-deadline)"
        } else {
            " for the longest prompt (derived: --http-timeout + 1 s per token asked + 10 ms per prompt token)"
        },
        limits.events,
        limits.bytes >> 10,
        limits.line >> 10
    ));
    let run_one = |name: &str, concurrency: usize, requests: usize, prompts: &[Vec<u32>]| {
        let arrivals = opts
            .request_rate
            .map(|r| poisson_arrivals(requests, r, opts.arrival_seed));
        let load = Load {
            name,
            mode: HTTP_MODE,
            dtype: &dtype,
            concurrency,
            requests,
            prompts,
            max_new_tokens: opts.max_new_tokens,
            arrivals: arrivals.as_deref(),
        };
        run_test(&http, &load, &progress)
    };
    if opts.warmup > 0 {
        progress.println(&format!("warmup: {} request(s), not counted", opts.warmup));
        run_one("warmup", 1, opts.warmup, &single_prompt)?;
    }
    let mut tests = Vec::new();
    for rep in 0..plan.repetitions {
        let (secs, raw) = run_one("single", 1, opts.single_requests, &single_prompt)?;
        tests.push(stats::test_result("single", HTTP_MODE, &dtype, 1, rep, secs, raw));
        for &level in &plan.levels {
            let name = format!("concurrent-{level}");
            let (secs, raw) = run_one(&name, level, plan.requests_at(level), &concurrent_prompts)?;
            tests.push(stats::test_result(
                &name, HTTP_MODE, &dtype, level, rep, secs, raw,
            ));
        }
    }
    progress.finish();
    let analysis = stats::analyze(&tests, &plan.thresholds);
    let metadata = Metadata {
        timestamp_utc: meta::utc_timestamp(SystemTime::now(), true),
        git_commit: meta::git_commit(),
        rustc: env!("GPT2_RUSTC_VERSION").into(),
        cpu_model: meta::cpu_model(),
        kernels: "n/a (server)".into(),
        cores: plan.cores,
        pool_layout: "n/a (server)".into(),
        threads_per_request: 0,
        max_busy_threads: 0,
        concurrency_levels: std::iter::once(1).chain(plan.levels.iter().copied()).collect(),
        run_mode: if opts.full { "full" } else { "quick" }.into(),
        modes: vec![HTTP_MODE.into()],
        arrival: match opts.request_rate {
            Some(r) => format!("poisson {r} req/s, seed {}", opts.arrival_seed),
            None => "closed loop".into(),
        },
        max_batch: 0,
        max_prompt_rows: 0,
        weights_source: format!(
            "the server's: model `{}` at {}{}",
            server.model,
            server.url,
            if synthetic {
                " (SYNTHETIC, as its model list says)"
            } else {
                ""
            }
        ),
        weights_sha256: String::new(),
        synthetic_weights: synthetic,
        model: None,
        dtypes: vec![DtypeRun {
            dtype: dtype.clone(),
            packed_weight_bytes: None,
            rss_after_load_bytes: None,
            peak_rss_bytes: None,
            peak_rss_own: false,
        }],
        max_new_tokens: opts.max_new_tokens,
        warmup_requests: opts.warmup,
        repetitions: plan.repetitions,
        prompts: std::iter::once(single_text).chain(concurrent_texts).collect(),
        server: Some(server),
    };
    let report = Report {
        schema_version: SCHEMA_VERSION,
        metadata,
        tests,
        analysis,
        profile: None,
        roofline: None,
    };
    write_outputs(&report, &opts.out_dir, opts.json)?;
    Ok(RunOutcome::of(&report))
}

/// The mode of every test of a `--url` run.
pub const HTTP_MODE: &str = "http";

/// A field of the chosen model's entry in the server's `/v1/models`
/// (`gpt2 serve` gives `dtype` and `synthetic`).
fn server_field<'a>(server: &'a ServerInfo, field: &str) -> Option<&'a serde_json::Value> {
    server
        .models
        .get("data")?
        .as_array()?
        .iter()
        .find(|m| m.get("id").and_then(serde_json::Value::as_str) == Some(server.model.as_str()))?
        .get(field)
}

/// What every dtype of a run shares: the flags, the plan, the checkpoint,
/// the compute pool, the progress bar and the tokenized prompts.
struct Bench<'a> {
    opts: &'a Options,
    plan: &'a RunPlan,
    /// The checkpoint directory every dtype loads.
    dir: &'a Path,
    pool: &'a Arc<rayon::ThreadPool>,
    progress: &'a Progress,
    single_prompt: &'a [Vec<u32>],
    concurrent_prompts: &'a [Vec<u32>],
}

/// What one dtype's part of a run measured.
struct DtypeMeasured {
    tests: Vec<TestResult>,
    run: DtypeRun,
    /// With `--profile`.
    profile: Option<DtypeProfile>,
    /// With `--probe`.
    engine: Option<EngineTimes>,
}

/// Resident memory of this process (VmRSS), bytes; `None` where the OS does
/// not tell.
fn rss_bytes() -> Option<u64> {
    profile::proc_status("VmRSS:").map(|kib| kib * 1024)
}

/// One dtype's part of repetition `rep`: its model loaded (the caller's
/// previous one is gone by then, and the resident high-water mark is reset
/// first, so this dtype's peak is its own), the warmup and the repetition's
/// tests, the memory it took, and in the first repetition its profile and,
/// with `--probe`, its workloads timed alone. The model, its scheduler and
/// its sessions are dropped on return.
fn run_dtype(b: &Bench, dtype: Dtype, rep: usize) -> Result<DtypeMeasured, Box<dyn Error>> {
    let (opts, plan, progress) = (b.opts, b.plan, b.progress);
    let peak_rss_own = meta::reset_peak_rss();
    let model = Arc::new(Gpt2Model::load_with(b.dir, dtype)?);
    let rss_after_load_bytes = rss_bytes();
    let packed = model.weights.packed_bytes;
    progress.println(&format!(
        "dtype {dtype}: packed weights {:.1} MiB, resident after load {}",
        packed as f64 / MIB,
        rss_after_load_bytes.map_or_else(|| "unknown".into(), |r| format!("{:.1} MiB", r as f64 / MIB))
    ));
    // Batched mode: one engine thread driving the shared pool's compute
    // threads; the client threads only submit and wait.
    let scheduler = if plan.modes.contains(&Mode::Batched) {
        Some(Scheduler::new(
            Arc::clone(&model),
            SchedulerConfig {
                max_batch: opts.max_batch,
                max_prompt_rows: opts.max_prompt_rows,
                pool: Some(Arc::clone(b.pool)),
                ..SchedulerConfig::default()
            },
        )?)
    } else {
        None
    };
    let engine = |mode| InProcess {
        model: &model,
        opts: GenerateOptions::greedy(opts.max_new_tokens),
        mode,
        layout: opts.pool,
        threads: plan.threads,
        shared_pool: b.pool,
        scheduler: scheduler.as_ref(),
        profile: None,
    };
    // One test: its arrivals (open loop) drawn afresh from the seed.
    let run_one =
        |backend: &InProcess, name: &str, concurrency: usize, requests: usize, prompts: &[Vec<u32>]| {
            let arrivals = opts
                .request_rate
                .map(|r| poisson_arrivals(requests, r, opts.arrival_seed));
            let load = Load {
                name,
                mode: backend.mode.name(),
                dtype: dtype.as_str(),
                concurrency,
                requests,
                prompts,
                max_new_tokens: opts.max_new_tokens,
                arrivals: arrivals.as_deref(),
            };
            run_test(backend, &load, progress)
        };

    if opts.warmup > 0 {
        progress.println(&format!(
            "warmup ({dtype}): {} request(s) per mode, not counted",
            opts.warmup
        ));
        for &mode in &plan.modes {
            run_one(&engine(mode), "warmup", 1, opts.warmup, b.single_prompt)?;
        }
    }
    let mut tests: Vec<TestResult> = Vec::new();
    let single_profile = Mutex::new(Profile::default());
    let d = dtype.as_str();
    {
        // The single request: one baseline for every mode (with one request
        // in flight there is nothing to batch), run in threads mode.
        let single = InProcess {
            profile: (opts.profile && rep == 0).then_some(&single_profile),
            ..engine(Mode::Threads)
        };
        let (secs, raw) = run_one(&single, "single", 1, opts.single_requests, b.single_prompt)?;
        tests.push(stats::test_result("single", "threads", d, 1, rep, secs, raw));
        for &mode in &plan.modes {
            let backend = engine(mode);
            for &level in &plan.levels {
                let name = format!("concurrent-{level}");
                let (secs, raw) = run_one(
                    &backend,
                    &name,
                    level,
                    plan.requests_at(level),
                    b.concurrent_prompts,
                )?;
                tests.push(stats::test_result(&name, mode.name(), d, level, rep, secs, raw));
            }
        }
    }
    drop(scheduler);
    // Before the probe, whose decode steps hold 8 KV caches of their own.
    let peak_rss_bytes = profile::peak_rss_bytes();
    let profile = (opts.profile && rep == 0).then(|| {
        let p = single_profile.into_inner().unwrap_or_else(|e| e.into_inner());
        progress.println(&format!(
            "per-op profile of the single-request test ({dtype}):\n{}",
            p.table()
        ));
        DtypeProfile {
            dtype: d.into(),
            rows: p.rows(),
        }
    });
    let engine = if opts.probe && rep == 0 {
        progress.println(&format!(
            "probe ({dtype}): timing a prefill and two decode steps alone ..."
        ));
        Some(roofline::time_engine(&model, b.pool)?)
    } else {
        None
    };
    Ok(DtypeMeasured {
        tests,
        run: DtypeRun {
            dtype: d.into(),
            packed_weight_bytes: Some(packed as u64),
            rss_after_load_bytes,
            peak_rss_bytes,
            peak_rss_own,
        },
        profile,
        engine,
    })
}

/// Bytes in a MiB, for the memory figures.
const MIB: f64 = (1u64 << 20) as f64;

/// Writes `throughput_gpt2_<UTC>[_N].{json,md,svg}` into `dir` and prints
/// the summary (or, with `json`, the JSON) on stdout. No report is ever
/// replaced: a stem taken by an earlier run (another run in the same second)
/// gets the next free `_N`. The three files are written under temporary
/// names first and only then given their names, so an interrupted run leaves
/// none of them.
pub fn write_outputs(report: &Report, dir: &Path, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let base = format!(
        "throughput_gpt2_{}",
        meta::utc_timestamp(SystemTime::now(), false)
    );
    let text = serde_json::to_string_pretty(report)?;
    let svg = report::svg(report);
    let paths = write_set(dir, &base, |stem| {
        let md = report::markdown(report, &format!("{stem}.svg"));
        vec![
            ("json", text.clone().into_bytes()),
            ("md", md.into_bytes()),
            ("svg", svg.clone().into_bytes()),
        ]
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{text}")?;
    } else {
        writeln!(out, "{}", report::stdout_table(report))?;
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    eprintln!("wrote {}", names.join(", "));
    Ok(())
}

/// Writes the files `make(stem)` gives (extension, bytes) as a new set
/// named `<base>[_N].<ext>` in `dir` (created if missing): the first `_N`
/// whose names are all free, so nothing is ever replaced; all or none of
/// them. Returns their paths.
pub fn write_set(
    dir: &Path,
    base: &str,
    make: impl Fn(&str) -> Vec<(&'static str, Vec<u8>)>,
) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut n = 1;
    loop {
        let stem = if n == 1 {
            base.to_string()
        } else {
            format!("{base}_{n}")
        };
        let made: Vec<(PathBuf, Vec<u8>)> = make(&stem)
            .into_iter()
            .map(|(ext, bytes)| (dir.join(format!("{stem}.{ext}")), bytes))
            .collect();
        let files: Vec<(&Path, &[u8])> = made.iter().map(|(p, b)| (p.as_path(), b.as_slice())).collect();
        match gpt2::files::write_new_set(&files) {
            Ok(()) => return Ok(made.into_iter().map(|(p, _)| p).collect()),
            Err(gpt2::Error::Exists { .. }) if n < 1000 => n += 1,
            Err(e) => return Err(e.into()),
        }
    }
}
