//! `throughput`: single-request and concurrent throughput of GPT-2 on this
//! machine, the CPU saturation curve, as JSON + Markdown + SVG.
//!
//! Default protocol (the reference study's): greedy, exactly 30 new tokens per
//! request (EOS ignored), 2 warmup requests, 5 sequential single requests,
//! then 6 requests at each concurrency level (2 and 4), 3 prompts rotated,
//! one client thread per in-flight request sharing the one immutable model.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use gpt2::bench::stats::{self, Thresholds};
use gpt2::bench::{report, Metadata, ModelInfo, Report, RequestRecord, TestResult, SCHEMA_VERSION};
use gpt2::hub::{self, WeightsArgs};
use gpt2::{GenerateOptions, Gpt2Model, Session};
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
    /// Concurrency levels of the concurrent tests (1 is the single-request test).
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    levels: Vec<usize>,
    /// Requests per concurrency level [default: 6, or 20 with --full].
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
    if args.levels.contains(&0) {
        return Err("--levels: a concurrency level of 0 runs nothing; use levels >= 1".into());
    }
    let mut levels: Vec<usize> = args.levels.iter().copied().filter(|&l| l > 1).collect();
    levels.sort_unstable();
    levels.dedup();
    let requests_per_level = args.requests_per_level.unwrap_or(if args.full { 20 } else { 6 });
    let repetitions = args.repetitions.unwrap_or(if args.full { 3 } else { 1 });
    for (name, v) in [
        ("--single-requests", args.single_requests),
        ("--requests-per-level", requests_per_level),
        ("--repetitions", repetitions),
        ("--max-new-tokens", args.max_new_tokens),
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
    let mut thresholds = Thresholds::default();
    for t in &args.targets {
        thresholds.set(t)?;
    }
    Ok(Plan {
        levels,
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
    let shared_pool = rayon::ThreadPoolBuilder::new()
        .num_threads(plan.threads)
        .build()?;
    let runner = Runner {
        model: &model,
        opts: GenerateOptions::greedy(args.max_new_tokens),
        layout: args.pool,
        threads: plan.threads,
        shared_pool: &shared_pool,
    };

    if args.warmup > 0 {
        eprintln!("warmup: {} request(s), not counted", args.warmup);
        runner.run("warmup", 1, args.warmup, &single_prompt);
    }
    let mut tests: Vec<TestResult> = Vec::new();
    for rep in 0..plan.repetitions {
        let (d, raw) = runner.run("single", 1, args.single_requests, &single_prompt);
        tests.push(stats::test_result("single", "threads", 1, rep, d, raw));
        for &level in &plan.levels {
            let name = format!("concurrent-{level}");
            let (d, raw) = runner.run(&name, level, plan.requests_per_level, &concurrent_prompts);
            tests.push(stats::test_result(&name, "threads", level, rep, d, raw));
        }
    }

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
        modes: vec!["threads".into()],
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
    write(&md_path, &report::markdown(report, &svg_name))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{json}")?;
    } else {
        writeln!(out, "{}", report::stdout_table(report))?;
    }
    eprintln!(
        "wrote {}, {} and {}",
        json_path.display(),
        md_path.display(),
        svg_path.display()
    );
    Ok(())
}

/// Runs requests on client threads with the chosen thread layout.
struct Runner<'a> {
    model: &'a Gpt2Model,
    opts: GenerateOptions,
    layout: PoolLayout,
    threads: usize,
    shared_pool: &'a rayon::ThreadPool,
}

impl Runner<'_> {
    /// `n` requests, `concurrency` in flight (closed loop: each client thread
    /// takes the next request when its last one ends), prompts rotated.
    /// Returns the wall time from the first start to the last end, and records.
    fn run(
        &self,
        name: &str,
        concurrency: usize,
        n: usize,
        prompts: &[Vec<u32>],
    ) -> (f64, Vec<RequestRecord>) {
        let next = AtomicUsize::new(0);
        let barrier = Barrier::new(concurrency);
        let t0 = Instant::now();
        let mut records: Vec<RequestRecord> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..concurrency)
                .map(|client| {
                    let (next, barrier) = (&next, &barrier);
                    s.spawn(move || self.client(name, client, n, prompts, next, barrier, t0))
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
        client: usize,
        n: usize,
        prompts: &[Vec<u32>],
        next: &AtomicUsize,
        barrier: &Barrier,
        t0: Instant,
    ) -> Vec<RequestRecord> {
        let max_prompt = prompts.iter().map(Vec::len).max().unwrap_or(1);
        let mut session = Session::new(self.model, max_prompt.clamp(1, 256));
        let own_pool = match self.layout {
            PoolLayout::PerRequest => rayon::ThreadPoolBuilder::new()
                .num_threads(self.threads)
                .build()
                .ok(),
            PoolLayout::Shared => None,
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
            let start = Instant::now();
            let result = catch_unwind(AssertUnwindSafe(|| {
                pool.install(|| session.generate(self.model, prompt, &self.opts, |_| {}))
            }));
            let latency_ms = start.elapsed().as_secs_f64() * 1e3;
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
                    rec.generated_tokens = k;
                    rec.ttft_ms = Some(g.timings.ttft.as_secs_f64() * 1e3);
                    rec.tpot_ms =
                        (k > 1).then(|| (latency_ms - g.timings.ttft.as_secs_f64() * 1e3) / (k - 1) as f64);
                    if k != self.opts.max_new_tokens {
                        rec.error = Some(format!(
                            "short: {k} of {} tokens (stop: {:?})",
                            self.opts.max_new_tokens, g.stop
                        ));
                    }
                }
                Ok(Err(e)) => rec.error = Some(e.to_string()),
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    rec.error = Some(format!("panicked: {what}"));
                    // The session may be half-updated; start afresh.
                    session = Session::new(self.model, max_prompt.clamp(1, 256));
                }
            }
            eprintln!(
                "[{name}] request {}/{n} (client {client}): {:.0} ms, {} tokens{}",
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
        records
    }
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
