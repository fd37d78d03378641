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
//!
//! This file parses the flags; the run is `gpt2::bench::run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gpt2::bench::in_process::PoolLayout;
use gpt2::bench::run::{self, ModeChoice, Options};
use gpt2::hub::WeightsArgs;

#[derive(Parser, Debug)]
#[command(
    name = "throughput",
    version,
    about = "Benchmark GPT-2 inference: single-request and concurrent throughput, latency percentiles and the \
             CPU saturation curve. Writes JSON, Markdown and SVG under --out-dir.",
    after_help = "Exit status: 0 every request succeeded and every target passed; 1 the run could not finish \
                  (an error, named on stderr); 2 a bad flag; 3 the report was written but targets were missed; 4 \
                  the report was written but requests failed."
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
    mode: ModeChoice,
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

impl From<Args> for Options {
    fn from(a: Args) -> Self {
        Options {
            weights: a.weights,
            max_new_tokens: a.max_new_tokens,
            warmup: a.warmup,
            single_requests: a.single_requests,
            levels: a.levels,
            mode: a.mode,
            max_batch: a.max_batch,
            max_prompt_rows: a.max_prompt_rows,
            request_rate: a.request_rate,
            arrival_seed: a.arrival_seed,
            profile: a.profile,
            probe: a.probe,
            requests_per_level: a.requests_per_level,
            repetitions: a.repetitions,
            full: a.full,
            prompt: a.prompt,
            concurrent_prompts: a.concurrent_prompts,
            pool: a.pool,
            threads_per_request: a.threads_per_request,
            oversubscribe: a.oversubscribe,
            json: a.json,
            out_dir: a.out_dir,
            targets: a.targets,
        }
    }
}

fn main() -> ExitCode {
    match run::run(&Args::parse().into()) {
        Ok(outcome) => {
            if let Some(line) = outcome.summary() {
                eprintln!("{line}");
            }
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
