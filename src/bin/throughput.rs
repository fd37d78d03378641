//! `throughput`: single-request and concurrent throughput of GPT-2 on this
//! machine, the CPU saturation curve, as JSON + Markdown + SVG.
//!
//! Default protocol (the reference study's): greedy, exactly 30 new tokens per
//! request (EOS ignored), 2 warmup requests, 5 sequential single requests,
//! then 6 requests at each concurrency level (2 and 4), 3 prompts rotated,
//! one client thread per in-flight request sharing the one immutable model.
//!
//! Two modes run the same requests from the same client threads: `threads`
//! (each request runs its own forward passes: the saturation curve) and
//! `batched` (requests are submitted to the continuous-batching scheduler,
//! which decodes all of them in one forward step).

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use gpt2::bench::stats::{self, Thresholds};
use gpt2::bench::step::DecodeStep;
use gpt2::bench::{report, Metadata, ModelInfo, Report, RequestRecord, Roofline, TestResult, SCHEMA_VERSION};
use gpt2::hub::{self, WeightsArgs};
use gpt2::profile::Profile;
use gpt2::{GenerateOptions, Generation, Gpt2Model, Scheduler, SchedulerConfig, Session};
use sha2::{Digest, Sha256};

const DEFAULT_CONCURRENT_PROMPTS: [&str; 3] = [
    "Hello, how are you?",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away, there lived a",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PoolLayout {
    /// One rayon pool shared by all requests (`--threads-per-request` threads, default: all cores).
    Shared,
    /// A pool per in-flight request (`--threads-per-request` threads each, default: cores / concurrency).
    PerRequest,
}

impl PoolLayout {
    fn name(self) -> &'static str {
        match self {
            PoolLayout::Shared => "shared",
            PoolLayout::PerRequest => "per-request",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// One client thread per in-flight request, each running its own forward passes.
    Threads,
    /// The same requests through the continuous-batching scheduler.
    Batched,
    /// Both, one after the other, for a side-by-side comparison.
    Both,
}

/// How one test's requests are executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Threads,
    Batched,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Threads => "threads",
            Mode::Batched => "batched",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "throughput",
    version,
    about = "Benchmark GPT-2 inference: single-request and concurrent throughput, latency percentiles and the \
             CPU saturation curve. Writes JSON, Markdown and SVG under --out-dir."
)]
struct Args {
    #[command(flatten)]
    weights: WeightsArgs,
    /// Exact number of tokens every request generates (EOS is ignored).
    #[arg(long, default_value_t = 30)]
    max_new_tokens: usize,
    /// Requests run before measuring, not counted.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Sequential requests in the single-request test.
    #[arg(long, default_value_t = 5)]
    single_requests: usize,
    /// Concurrency levels of the concurrent tests (1 is the single-request test)
    /// [default: 2,4, or 2,4,8,16,32 with --full].
    #[arg(long, value_delimiter = ',')]
    levels: Option<Vec<usize>>,
    /// Which execution modes to measure.
    #[arg(long, value_enum, default_value = "both")]
    mode: ModeArg,
    /// Batched mode: most sequences decoded together.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Batched mode: most prompt rows prefilled per step.
    #[arg(long, default_value_t = 128)]
    max_prompt_rows: usize,
    /// Open loop: requests arrive as a seeded Poisson process at this many per
    /// second (each level still caps in-flight requests at its concurrency);
    /// latency and TTFT count from the arrival, so queueing shows.
    /// Default: closed loop (a client sends its next request when the last ends).
    #[arg(long, value_name = "R")]
    request_rate: Option<f64>,
    /// Seed of the Poisson arrivals.
    #[arg(long, default_value_t = 0)]
    arrival_seed: u64,
    /// Break the single-request test's time down by op (prefill and decode apart).
    #[arg(long)]
    profile: bool,
    /// Measure this machine's limits (read bandwidth, FMA peak, SGEMM) and
    /// report achieved / limit for decode and prefill.
    #[arg(long)]
    probe: bool,
    /// Requests per concurrency level, and at least the level itself, so
    /// that every client runs one [default: 6, or 20 with --full].
    #[arg(long)]
    requests_per_level: Option<usize>,
    /// Repetitions of every test [default: 1, or 3 with --full].
    #[arg(long)]
    repetitions: Option<usize>,
    /// More requests per level and repetitions with spread (stddev, min, max).
    #[arg(long)]
    full: bool,
    /// Prompt of the single-request test.
    #[arg(long, default_value = "Hello, how are you?")]
    prompt: String,
    /// Prompts rotated in the concurrent tests (repeat the flag) [default: 3 built-in prompts].
    #[arg(long = "concurrent-prompt", value_name = "TEXT")]
    concurrent_prompts: Vec<String>,
    /// How compute threads are organised.
    #[arg(long, value_enum, default_value = "shared")]
    pool: PoolLayout,
    /// Threads of the shared pool, or of each request's pool (see --pool).
    #[arg(long)]
    threads_per_request: Option<usize>,
    /// Allow more busy compute threads than cores (per-request pools only).
    #[arg(long)]
    oversubscribe: bool,
    /// Print only the JSON report on stdout.
    #[arg(long)]
    json: bool,
    /// Directory for the JSON, Markdown and SVG outputs.
    #[arg(long, default_value = "data/benchmarks")]
    out_dir: PathBuf,
    /// Override a pass/fail target, e.g. `--target single_tokens_per_s=50` (repeatable).
    #[arg(long = "target", value_name = "NAME=VALUE")]
    targets: Vec<String>,
}

/// The validated plan of a run.
struct Plan {
    levels: Vec<usize>,
    modes: Vec<Mode>,
    requests_per_level: usize,
    repetitions: usize,
    threads: usize,
    cores: usize,
    thresholds: Thresholds,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn plan(args: &Args) -> Result<Plan, String> {
    let levels = args.levels.clone().unwrap_or_else(|| {
        if args.full {
            vec![2, 4, 8, 16, 32]
        } else {
            vec![2, 4]
        }
    });
    if levels.contains(&0) {
        return Err("--levels: a concurrency level of 0 runs nothing; use levels >= 1".into());
    }
    let mut levels: Vec<usize> = levels.into_iter().filter(|&l| l > 1).collect();
    levels.sort_unstable();
    levels.dedup();
    let requests_per_level = args.requests_per_level.unwrap_or(if args.full { 20 } else { 6 });
    let repetitions = args.repetitions.unwrap_or(if args.full { 3 } else { 1 });
    for (name, v) in [
        ("--single-requests", args.single_requests),
        ("--requests-per-level", requests_per_level),
        ("--repetitions", repetitions),
        ("--max-new-tokens", args.max_new_tokens),
        ("--max-batch", args.max_batch),
        ("--max-prompt-rows", args.max_prompt_rows),
    ] {
        if v < 1 {
            return Err(format!("{name} must be at least 1"));
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max_level = levels.last().copied().unwrap_or(1);
    let threads = match (args.pool, args.threads_per_request) {
        (_, Some(0)) => return Err("--threads-per-request must be at least 1".into()),
        (_, Some(t)) => t,
        (PoolLayout::Shared, None) => cores,
        (PoolLayout::PerRequest, None) => (cores / max_level).max(1),
    };
    let busy = match args.pool {
        PoolLayout::Shared => threads,
        PoolLayout::PerRequest => threads * max_level,
    };
    if busy > cores && !args.oversubscribe {
        return Err(format!(
            "{busy} busy compute threads ({} pool of {threads} at concurrency {max_level}) on {cores} cores: \
             that measures oversubscription. Lower --threads-per-request, or pass --oversubscribe to do it anyway",
            args.pool.name()
        ));
    }
    if let Some(r) = args.request_rate {
        if !(r.is_finite() && r > 0.0) {
            return Err(format!(
                "--request-rate must be a positive number of requests per second, not {r}"
            ));
        }
    }
    let modes = match args.mode {
        ModeArg::Threads => vec![Mode::Threads],
        ModeArg::Batched => vec![Mode::Batched],
        ModeArg::Both => vec![Mode::Threads, Mode::Batched],
    };
    let mut thresholds = Thresholds::default();
    for t in &args.targets {
        thresholds.set(t)?;
    }
    Ok(Plan {
        levels,
        modes,
        requests_per_level,
        repetitions,
        threads,
        cores,
        thresholds,
    })
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let plan = plan(args)?;
    let resolved = hub::resolve(&args.weights)?;
    let tok = resolved.load_tokenizer()?;
    let model = Gpt2Model::load(&resolved.dir)?;
    eprintln!("weights: {}", resolved.source);

    // Tokenize and check every prompt before any work.
    let concurrent_texts: Vec<String> = if args.concurrent_prompts.is_empty() {
        DEFAULT_CONCURRENT_PROMPTS.iter().map(|s| s.to_string()).collect()
    } else {
        args.concurrent_prompts.clone()
    };
    let encode = |text: &str| -> Result<Vec<u32>, Box<dyn std::error::Error>> {
        let ids = tok.encode(text)?;
        let opts = GenerateOptions::greedy(args.max_new_tokens);
        gpt2::generate::check_request(&ids, &opts, model.config.n_positions)?;
        let need = ids.len() + args.max_new_tokens - 1;
        if need > model.config.n_positions {
            return Err(format!(
                "prompt {text:?} is {} tokens; with --max-new-tokens {} it needs {need} positions, past the \
                 context window of {}",
                ids.len(),
                args.max_new_tokens,
                model.config.n_positions
            )
            .into());
        }
        Ok(ids)
    };
    let single_prompt = vec![encode(&args.prompt)?];
    let concurrent_prompts = concurrent_texts
        .iter()
        .map(|t| encode(t))
        .collect::<Result<Vec<_>, _>>()?;

    let max_busy = match args.pool {
        PoolLayout::Shared => plan.threads,
        PoolLayout::PerRequest => plan.threads * plan.levels.last().copied().unwrap_or(1),
    };
    eprintln!(
        "threads: {} pool, {} thread(s){}, {} cores; at most {max_busy} busy compute threads",
        args.pool.name(),
        plan.threads,
        if args.pool == PoolLayout::PerRequest {
            " per request"
        } else {
            ""
        },
        plan.cores
    );
    let shared_pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(plan.threads)
            .build()?,
    );
    let model = Arc::new(model);
    // Batched mode: one engine thread driving a pool of `plan.threads`
    // compute threads; the client threads only submit and wait.
    let scheduler = if plan.modes.contains(&Mode::Batched) {
        eprintln!(
            "batched mode: one engine thread on the shared pool of {} compute threads, max batch {}, at most {} \
             prompt rows per step",
            plan.threads, args.max_batch, args.max_prompt_rows
        );
        Some(Scheduler::new(
            Arc::clone(&model),
            SchedulerConfig {
                max_batch: args.max_batch,
                max_prompt_rows: args.max_prompt_rows,
                pool: Some(Arc::clone(&shared_pool)),
                ..SchedulerConfig::default()
            },
        )?)
    } else {
        None
    };
    let runner = Runner {
        model: &model,
        opts: GenerateOptions::greedy(args.max_new_tokens),
        layout: args.pool,
        threads: plan.threads,
        shared_pool: &shared_pool,
        scheduler: scheduler.as_ref(),
        request_rate: args.request_rate,
        arrival_seed: args.arrival_seed,
        profile: None,
    };

    if args.warmup > 0 {
        eprintln!("warmup: {} request(s) per mode, not counted", args.warmup);
        for &mode in &plan.modes {
            runner.run("warmup", mode, 1, args.warmup, &single_prompt);
        }
    }
    let mut tests: Vec<TestResult> = Vec::new();
    let single_profile = Mutex::new(Profile::default());
    for rep in 0..plan.repetitions {
        // The single request: one baseline for every mode (with one request
        // in flight there is nothing to batch), run in threads mode.
        let single_runner = Runner {
            profile: (args.profile && rep == 0).then_some(&single_profile),
            ..runner.clone()
        };
        let (d, raw) = single_runner.run("single", Mode::Threads, 1, args.single_requests, &single_prompt);
        tests.push(stats::test_result("single", "threads", 1, rep, d, raw));
        for &mode in &plan.modes {
            for &level in &plan.levels {
                let name = format!("concurrent-{level}");
                // Fewer requests than clients would never reach the level.
                let n = plan.requests_per_level.max(level);
                let (d, raw) = runner.run(&name, mode, level, n, &concurrent_prompts);
                tests.push(stats::test_result(&name, mode.name(), level, rep, d, raw));
            }
        }
    }
    drop(scheduler);
    let profile = args
        .profile
        .then(|| single_profile.into_inner().unwrap_or_else(|e| e.into_inner()));
    if let Some(p) = &profile {
        eprintln!("per-op profile of the single-request test:\n{}", p.table());
    }
    let roofline = if args.probe {
        Some(measure_roofline(&model, &tests, &shared_pool)?)
    } else {
        None
    };

    let analysis = stats::analyze(&tests, &plan.thresholds);
    let model_path = resolved.dir.join("model.safetensors");
    let metadata = Metadata {
        timestamp_utc: utc_timestamp(SystemTime::now(), true),
        git_commit: git_commit(),
        rustc: env!("GPT2_RUSTC_VERSION").into(),
        cpu_model: cpu_model(),
        cores: plan.cores,
        pool_layout: args.pool.name().into(),
        threads_per_request: plan.threads,
        max_busy_threads: max_busy,
        concurrency_levels: std::iter::once(1).chain(plan.levels.iter().copied()).collect(),
        run_mode: if args.full { "full" } else { "quick" }.into(),
        modes: plan.modes.iter().map(|m| m.name().to_string()).collect(),
        arrival: match args.request_rate {
            Some(r) => format!("poisson {r} req/s, seed {}", args.arrival_seed),
            None => "closed loop".into(),
        },
        max_batch: args.max_batch,
        max_prompt_rows: args.max_prompt_rows,
        weights_source: resolved.source.to_string(),
        weights_sha256: sha256_file(&model_path)?,
        synthetic_weights: matches!(resolved.source, hub::WeightsSource::Synthetic { .. }),
        model: ModelInfo {
            n_layer: model.config.n_layer,
            n_head: model.config.n_head,
            n_embd: model.config.n_embd,
            n_positions: model.config.n_positions,
            vocab_size: model.config.vocab_size,
            n_params: model.config.n_params(),
            dtype: "f32".into(),
        },
        max_new_tokens: args.max_new_tokens,
        warmup_requests: args.warmup,
        repetitions: plan.repetitions,
        prompts: std::iter::once(args.prompt.clone())
            .chain(concurrent_texts)
            .collect(),
    };
    let report = Report {
        schema_version: SCHEMA_VERSION,
        metadata,
        tests,
        analysis,
        profile: profile.map(|p| p.rows()),
        roofline,
    };
    write_outputs(args, &report)
}

fn write_outputs(args: &Args, report: &Report) -> Result<(), Box<dyn std::error::Error>> {
    let dir = &args.out_dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let stem = format!("throughput_gpt2_{}", utc_timestamp(SystemTime::now(), false));
    let (json_path, md_path, svg_path) = (
        dir.join(format!("{stem}.json")),
        dir.join(format!("{stem}.md")),
        dir.join(format!("{stem}.svg")),
    );
    let json = serde_json::to_string_pretty(report)?;
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(&json_path, &json)?;
    write(&svg_path, &report::svg(report))?;
    let svg_name = svg_path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let extra = extra_sections(report);
    write(&md_path, &(report::markdown(report, &svg_name) + &extra))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{json}")?;
    } else {
        writeln!(out, "{}{extra}", report::stdout_table(report))?;
    }
    eprintln!(
        "wrote {}, {} and {}",
        json_path.display(),
        md_path.display(),
        svg_path.display()
    );
    Ok(())
}

/// An achieved / limit row for one timed decode step of `rows` rows, or
/// nothing when the report has no such step (`step_ms` 0).
fn step_row(what: &str, step_ms: f64, rows: f64, gbs: f64, limit: &str, fraction: f64) -> String {
    if step_ms <= 0.0 {
        return String::new();
    }
    format!(
        "| {what}, one step in {step_ms:.1} ms) | {gbs:.1} GB/s ({:.1} tok/s) | {limit} | {:.0}% |\n",
        rows * 1e3 / step_ms,
        100.0 * fraction,
    )
}

/// The achieved / limit row of a one-row decode step after a long prompt.
fn long_decode_row(r: &Roofline) -> String {
    step_row(
        &format!(
            "decode, batch 1 at position {} (weights and KV cache",
            r.long_decode_position
        ),
        r.long_decode_step_ms,
        1.0,
        r.long_decode_achieved_gbs,
        &format!("{:.1} GB/s read bandwidth", r.read_gbs_all),
        r.long_decode_fraction_of_bandwidth,
    )
}

/// The achieved / limit row of an 8-row decode step.
fn batch8_row(r: &Roofline) -> String {
    step_row(
        &format!("decode, 8 rows (8 sequences at position {}", r.batch8_position),
        r.batch8_step_ms,
        8.0,
        r.batch8_achieved_gbs,
        &format!(
            "{:.1} GB/s read bandwidth ({:.1} tok/s)",
            r.read_gbs_all,
            8.0 * r.decode_ceiling_tokens_per_s
        ),
        r.batch8_fraction_of_bandwidth,
    )
}

/// Markdown for the optional parts of a report: roofline and profile.
fn extra_sections(report: &Report) -> String {
    let mut out = String::new();
    if let Some(r) = &report.roofline {
        out.push_str(&format!(
            "\n## Achieved / limit (measured on this machine)\n\n\
             | | achieved | limit | achieved / limit |\n|---|---:|---:|---:|\n\
             | decode, batch 1 ({:.0} MB read per token) | {:.1} GB/s ({:.1} tok/s) | {:.1} GB/s read bandwidth ({:.1} tok/s) | {:.0}% |\n\
             {}{}\
             | prefill, {} tokens in {:.0} ms | {:.1} GFLOP/s | {:.1} GFLOP/s FMA peak | {:.0}% |\n\
             | (our SGEMM at M = 128, best GPT-2 shape) | {:.1} GFLOP/s | {:.1} GFLOP/s | {:.0}% |\n\n\
             Read bandwidth on one thread: {:.1} GB/s. Decode moves every f32 weight once per token, so \
             its ceiling is bandwidth / bytes per token; prefill is bound by FMA throughput.\n",
            r.decode_bytes_per_token / 1e6,
            r.decode_achieved_gbs,
            r.decode_tokens_per_s,
            r.read_gbs_all,
            r.decode_ceiling_tokens_per_s,
            100.0 * r.decode_fraction_of_bandwidth,
            long_decode_row(r),
            batch8_row(r),
            r.prefill_tokens,
            r.prefill_ms,
            r.prefill_gflops,
            r.fma_gflops_all,
            100.0 * r.prefill_fraction_of_fma_peak,
            r.sgemm_gflops,
            r.fma_gflops_all,
            100.0 * r.sgemm_gflops / r.fma_gflops_all,
            r.read_gbs_1t,
        ));
        if r.batch8_step_ms > 0.0 && r.read_fma8_gbs_all > 0.0 {
            out.push_str(&format!(
                "\nA decode step of 8 rows streams the weights once for 8 tokens; its bandwidth-bound \
                 rate is 8 tokens per pass at the read bandwidth. Reading with 8 FMAs per loaded vector \
                 (that step's arithmetic and nothing else) runs at {:.1} GB/s here, {:.0}% of the plain \
                 read: what the hardware allows when reads and FMAs overlap as well as they can. The step \
                 reaches {:.0}% of that.\n",
                r.read_fma8_gbs_all,
                100.0 * r.read_fma8_gbs_all / r.read_gbs_all,
                100.0 * r.batch8_achieved_gbs / r.read_fma8_gbs_all,
            ));
        }
        if let Some(p) = r.batch8_parts() {
            out.push_str(&format!(
                "\nThe same step in two parts: streaming the weights once at the read bandwidth takes \
                 {:.1} ms; its linear layers' arithmetic, at the rate the same kernel reaches on each of the \
                 step's threads with a weight in L2, {:.1} ms. Were the two fully overlapped the step would take {:.1} ms, \
                 run one after the other {:.1} ms; it takes {:.1} ms, hiding {:.0}% of the smaller part \
                 (attention and the small ops are in neither part).\n",
                p.stream_ms,
                p.compute_ms,
                p.overlapped_ms(),
                p.serial_ms(),
                p.step_ms,
                100.0 * p.hidden(),
            ));
        }
    }
    if let Some(rows) = &report.profile {
        out.push_str("\n## Per-op profile of the single-request test\n");
        out.push_str(&gpt2::profile::rows_table(rows));
    }
    out
}

/// Runs requests on client threads, in threads or batched mode.
#[derive(Clone)]
struct Runner<'a> {
    model: &'a Gpt2Model,
    opts: GenerateOptions,
    layout: PoolLayout,
    threads: usize,
    shared_pool: &'a rayon::ThreadPool,
    scheduler: Option<&'a Scheduler>,
    request_rate: Option<f64>,
    arrival_seed: u64,
    /// Where threads-mode sessions add their per-op profile, if profiling.
    profile: Option<&'a Mutex<Profile>>,
}

impl Runner<'_> {
    /// `n` requests, at most `concurrency` in flight, prompts rotated.
    /// Closed loop: each client thread takes the next request when its last
    /// one ends. With a request rate, request i is due at its Poisson arrival
    /// time and its latency counts from then. Returns the wall time from the
    /// first start to the last end, and the records.
    fn run(
        &self,
        name: &str,
        mode: Mode,
        concurrency: usize,
        n: usize,
        prompts: &[Vec<u32>],
    ) -> (f64, Vec<RequestRecord>) {
        let arrivals = self
            .request_rate
            .map(|r| poisson_arrivals(n, r, self.arrival_seed));
        let next = AtomicUsize::new(0);
        let barrier = Barrier::new(concurrency);
        let t0 = Instant::now();
        let mut records: Vec<RequestRecord> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..concurrency)
                .map(|client| {
                    let (next, barrier, arrivals) = (&next, &barrier, arrivals.as_deref());
                    s.spawn(move || self.client(name, mode, client, n, prompts, next, barrier, arrivals, t0))
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        records.sort_by_key(|r| r.index);
        let start = records.iter().map(|r| r.start_ms).fold(f64::INFINITY, f64::min);
        let end = records
            .iter()
            .map(|r| r.start_ms + r.latency_ms)
            .fold(0.0, f64::max);
        ((end - start).max(0.0) / 1e3, records)
    }

    #[allow(clippy::too_many_arguments)]
    fn client(
        &self,
        name: &str,
        mode: Mode,
        client: usize,
        n: usize,
        prompts: &[Vec<u32>],
        next: &AtomicUsize,
        barrier: &Barrier,
        arrivals: Option<&[Duration]>,
        t0: Instant,
    ) -> Vec<RequestRecord> {
        let max_prompt = prompts.iter().map(Vec::len).max().unwrap_or(1);
        let new_session = || {
            let mut s = Session::new(self.model, max_prompt.clamp(1, 256))?;
            s.set_profiling(self.profile.is_some());
            Ok::<_, gpt2::Error>(s)
        };
        // Allocated before the clock starts; if that fails, each request
        // tries again and reports the error.
        let mut session = (mode == Mode::Threads).then(new_session).and_then(Result::ok);
        let own_pool = match (mode, self.layout) {
            (Mode::Threads, PoolLayout::PerRequest) => rayon::ThreadPoolBuilder::new()
                .num_threads(self.threads)
                .build()
                .ok(),
            _ => None,
        };
        let pool = own_pool.as_ref().unwrap_or(self.shared_pool);
        let mut records = Vec::new();
        barrier.wait();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= n {
                break;
            }
            let prompt = &prompts[index % prompts.len()];
            // Open loop: wait for the arrival; latency counts from it.
            let start = match arrivals {
                Some(a) => {
                    let due = t0 + a[index];
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    due
                }
                None => Instant::now(),
            };
            let result: std::thread::Result<gpt2::Result<Generation>> = match mode {
                Mode::Threads => catch_unwind(AssertUnwindSafe(|| {
                    let s = match session {
                        Some(ref mut s) => s,
                        None => session.insert(new_session()?),
                    };
                    pool.install(|| s.generate(self.model, prompt, &self.opts, |_| {}))
                })),
                Mode::Batched => catch_unwind(AssertUnwindSafe(|| match self.scheduler {
                    Some(sched) => sched.generate(prompt.clone(), self.opts.clone()),
                    None => Err(gpt2::Error::Engine("no scheduler".into())),
                })),
            };
            let latency_ms = start.elapsed().as_secs_f64() * 1e3;
            // Generation timings count from the submission; add any queueing
            // between the arrival and the submission.
            let queued_ms = latency_ms
                - result
                    .as_ref()
                    .ok()
                    .and_then(|r| r.as_ref().ok())
                    .map_or(latency_ms, |g| g.timings.total.as_secs_f64() * 1e3);
            let mut rec = RequestRecord {
                index,
                client,
                prompt_tokens: prompt.len(),
                generated_tokens: 0,
                start_ms: (start - t0).as_secs_f64() * 1e3,
                ttft_ms: None,
                latency_ms,
                tpot_ms: None,
                error: None,
            };
            match result {
                Ok(Ok(g)) => {
                    let k = g.tokens.len();
                    let ttft_ms = queued_ms.max(0.0) + g.timings.ttft.as_secs_f64() * 1e3;
                    rec.generated_tokens = k;
                    rec.ttft_ms = Some(ttft_ms);
                    rec.tpot_ms = (k > 1).then(|| (latency_ms - ttft_ms) / (k - 1) as f64);
                    if k != self.opts.max_new_tokens {
                        rec.error = Some(format!(
                            "short: {k} of {} tokens (stop: {:?})",
                            self.opts.max_new_tokens, g.stop
                        ));
                    }
                }
                Ok(Err(e)) => rec.error = Some(e.to_string()),
                Err(panic) => {
                    rec.error = Some(format!("panicked: {}", gpt2::scheduler::panic_message(&*panic)));
                    // The session may be half-updated; start afresh.
                    session = None;
                }
            }
            eprintln!(
                "[{name} {}] request {}/{n} (client {client}): {:.0} ms, {} tokens{}",
                mode.name(),
                index + 1,
                latency_ms,
                rec.generated_tokens,
                rec.error
                    .as_deref()
                    .map(|e| format!(", FAILED: {e}"))
                    .unwrap_or_default()
            );
            records.push(rec);
        }
        if let (Some(total), Some(p)) = (self.profile, session.as_ref().and_then(|s| s.profile())) {
            total.lock().unwrap_or_else(|e| e.into_inner()).merge(p);
        }
        records
    }
}

/// Arrival times of `n` requests of a Poisson process at `rate` per second:
/// exponential gaps from a seeded xorshift, so a seed fixes the schedule.
fn poisson_arrivals(n: usize, rate: f64, seed: u64) -> Vec<Duration> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Uniform in (0, 1]: never ln(0).
            let u = ((state >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let at = Duration::from_secs_f64(t);
            t += -u.ln() / rate;
            at
        })
        .collect()
}

/// Times a prefill alone and derives achieved / limit for decode and prefill.
fn measure_roofline(
    model: &Gpt2Model,
    tests: &[TestResult],
    pool: &rayon::ThreadPool,
) -> Result<Roofline, Box<dyn std::error::Error>> {
    eprintln!("probe: measuring read bandwidth, FMA peak and SGEMM (takes a few seconds) ...");
    let limits = gpt2::probe::measure(false);
    eprintln!("{}", limits.table());
    let cfg = &model.config;
    // Batch-1 decode reads every weight once (f32); the KV cache it reads is
    // small next to that at these prompt lengths and is left out.
    let decode_bytes = (cfg.n_params() * 4) as f64;
    let single: Vec<f64> = tests
        .iter()
        .filter(|t| t.concurrency == 1)
        .map(|t| t.tpot_ms.p50)
        .filter(|&x| x > 0.0)
        .collect();
    let tpot_ms = if single.is_empty() {
        f64::NAN
    } else {
        single.iter().sum::<f64>() / single.len() as f64
    };
    let decode_tps = 1e3 / tpot_ms;
    // Prefill: a prompt of 128 tokens, median of 3, on the shared pool.
    let tokens = 128.min(cfg.n_positions);
    let prompt: Vec<u32> = (0..tokens as u32)
        .map(|i| (i * 101) % cfg.vocab_size as u32)
        .collect();
    let mut session = Session::new(model, tokens)?;
    let mut times: Vec<f64> = (0..3)
        .map(|_| {
            pool.install(|| session.generate(model, &prompt, &GenerateOptions::greedy(1), |_| {}))
                .map(|g| g.timings.ttft.as_secs_f64())
        })
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    let prefill_s = times[1];
    // FLOPs: 2 per weight per token in the blocks, attention's QK and AV, and
    // the LM head for the last row only.
    let (c, l, v) = (cfg.n_embd as f64, cfg.n_layer as f64, cfg.vocab_size as f64);
    let block_weights = l * (4.0 * c * c + 2.0 * c * cfg.n_inner as f64);
    let t = tokens as f64;
    let attention = l * 2.0 * 2.0 * c * t * (t + 1.0) / 2.0;
    let flops = 2.0 * block_weights * t + attention + 2.0 * c * v;
    let prefill_gflops = flops / prefill_s / 1e9;
    let (batch8_position, batch8_step_s) = time_batched_step(model, pool, 8, 64)?;
    let batch8_gbs = decode_bytes / batch8_step_s / 1e9;
    // The 8-row step's linear layers (the blocks' and the LM head's weights,
    // 8 rows each) at the rate the same kernel computes with its weight in
    // L2, on every thread of the step's pool (they compute independently):
    // the arithmetic alone.
    let batch8_compute_ms = if limits.rows8_in_l2_gflops_1t > 0.0 {
        let threads = pool.current_num_threads() as f64;
        2.0 * 8.0 * (block_weights + c * v) / (limits.rows8_in_l2_gflops_1t * threads) / 1e6
    } else {
        0.0
    };
    // Decode after a long prompt: the weights, and now the keys and values of
    // every layer at the 200 cached positions and the new one as well.
    let (long_position, long_step_s) = time_batched_step(model, pool, 1, 200)?;
    let long_bytes = decode_bytes + (2 * cfg.n_layer * (long_position + 1) * cfg.n_embd * 4) as f64;
    let long_gbs = long_bytes / long_step_s / 1e9;
    let sgemm = limits
        .sgemm
        .iter()
        .filter(|p| p.m >= 128)
        .map(|p| p.gflops)
        .fold(0.0, f64::max);
    Ok(Roofline {
        read_gbs_1t: limits.read_gbs_1t,
        read_gbs_all: limits.read_gbs_all,
        fma_gflops_all: limits.fma_gflops_all,
        sgemm_gflops: sgemm,
        decode_bytes_per_token: decode_bytes,
        decode_tokens_per_s: decode_tps,
        decode_achieved_gbs: decode_bytes * decode_tps / 1e9,
        decode_fraction_of_bandwidth: decode_bytes * decode_tps / 1e9 / limits.read_gbs_all,
        decode_ceiling_tokens_per_s: limits.decode_ceiling_tok_s(decode_bytes),
        prefill_tokens: tokens,
        prefill_ms: prefill_s * 1e3,
        prefill_gflops,
        prefill_fraction_of_fma_peak: prefill_gflops / limits.fma_gflops_all,
        read_fma8_gbs_all: limits.read_fma8_gbs_all,
        batch8_step_ms: batch8_step_s * 1e3,
        batch8_position,
        batch8_achieved_gbs: batch8_gbs,
        batch8_fraction_of_bandwidth: batch8_gbs / limits.read_gbs_all,
        batch8_compute_ms,
        long_decode_step_ms: long_step_s * 1e3,
        long_decode_position: long_position,
        long_decode_achieved_gbs: long_gbs,
        long_decode_fraction_of_bandwidth: long_gbs / limits.read_gbs_all,
    })
}

/// One decode step of `batch` sequences, each with `position` tokens cached
/// (capped by the context), timed alone on `pool`: the median of 9 steps.
/// Returns the position and the seconds.
fn time_batched_step(
    model: &Gpt2Model,
    pool: &rayon::ThreadPool,
    batch: usize,
    position: usize,
) -> gpt2::Result<(usize, f64)> {
    pool.install(|| {
        let mut step = DecodeStep::new(model, batch, position)?;
        let mut times: Vec<f64> = (0..9)
            .map(|_| step.run(model).map(|d| d.as_secs_f64()))
            .collect::<gpt2::Result<_>>()?;
        times.sort_by(f64::total_cmp);
        Ok((step.position(), times[times.len() / 2]))
    })
}

fn sha256_file(path: &Path) -> Result<String, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(format!("{:x}", hasher.finalize()))
}

fn git_commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(commit) => {
            let dirty =
                git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{commit}-dirty")
            } else {
                commit
            }
        }
        None => "unknown".into(),
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// `2026-11-28T04:35:12Z` (`pretty`) or `20261128T043512Z` (for file names).
fn utc_timestamp(t: SystemTime, pretty: bool) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if pretty {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
    } else {
        format!("{year:04}{month:02}{day:02}T{h:02}{m:02}{s:02}Z")
    }
}
