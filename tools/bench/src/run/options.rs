//! The `throughput` flags (the binary flattens [`Options`] into its
//! parser) and the default prompts.

use std::path::PathBuf;

use clap::ValueEnum;
use gpt2::{Dtype, KvDtype};
use gpt2_hub::WeightsArgs;

use super::sweep::AxisSweep;
use crate::in_process::{Mode, PoolLayout};

/// New tokens per request unless `--max-new-tokens` is given.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 30;

/// The single test's prompt unless `--prompt` is given.
pub const DEFAULT_PROMPT: &str = "Hello, how are you?";

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

impl ModeChoice {
    /// The modes chosen, in the order they run.
    pub fn modes(self) -> Vec<Mode> {
        match self {
            ModeChoice::Threads => vec![Mode::Threads],
            ModeChoice::Batched => vec![Mode::Batched],
            ModeChoice::Both => vec![Mode::Threads, Mode::Batched],
        }
    }
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
    /// the next: use --repetitions 3 or more to compare them [default: f32].
    #[arg(
        long = "dtype",
        value_name = "DTYPE",
        value_delimiter = ',',
        conflicts_with = "url"
    )]
    pub dtypes: Vec<Dtype>,
    /// Exact number of tokens every request generates (EOS is ignored) [default: 30].
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// The KV cache's storage format: f32, or bf16 (half the bytes, each key
    /// and value rounded to bf16) [default: f32].
    #[arg(long, value_name = "KV", conflicts_with = "url")]
    pub kv_dtype: Option<KvDtype>,
    /// Sweep an axis of the workload: `--sweep prompt-tokens=6,128,512,900`
    /// (repeatable; several sweeps run their product). Axes: prompt-tokens
    /// (synthetic prompts of that many tokens), model (a synthetic preset:
    /// distil, 124m, medium, large, xl, tiny; else a hub model id or a
    /// checkpoint directory, as --model and --weights), dtype, concurrency
    /// (the one level measured beside the single request), max-new-tokens
    /// and kv-dtype. Every cell runs the whole protocol on its own model
    /// load (warmup, single request, levels), the cells' order rotating from
    /// one repetition to the next; the report adds a table and an SVG per
    /// axis. An axis and its own flag (e.g. --levels with concurrency) are
    /// refused together. Before any cell runs, a cell whose weights, KV
    /// caches and work buffers could outgrow the memory the process can
    /// have is refused by name. Only `failed` and the --target named
    /// targets are held in a sweep: the default targets are the default
    /// workload's.
    #[arg(
        long = "sweep",
        value_name = "AXIS=V1,V2,...",
        value_parser = super::sweep::parse,
        conflicts_with_all = ["url", "probe", "profile"]
    )]
    pub sweeps: Vec<AxisSweep>,
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
    /// Batched mode: while sequences decode, most rows per step (decode
    /// rows first, prompt rows fill the rest, at least half the decode rows).
    #[arg(long, default_value_t = gpt2::SchedulerConfig::default().max_step_rows, conflicts_with = "url")]
    pub max_step_rows: usize,
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
    #[arg(long, default_value = DEFAULT_PROMPT)]
    pub prompt: String,
    /// Prompts rotated in the concurrent tests (repeat the flag) [default: 3 built-in prompts].
    #[arg(long = "concurrent-prompt", value_name = "TEXT")]
    pub concurrent_prompts: Vec<String>,
    /// Synthetic prompts instead of the text ones: every request (warmup and
    /// single test too) gets N seeded token ids of its own, whose first
    /// differs from every other request's of the run, so that no two
    /// requests share more than --shared-prefix-tokens and no prefix cache
    /// can reuse more.
    #[arg(long, value_name = "N", conflicts_with_all = ["prompt", "concurrent_prompts"])]
    pub prompt_tokens: Option<usize>,
    /// With --prompt-tokens (or its sweep): every request's prompt starts with the same
    /// N-token preamble (seeded), then its own --prompt-tokens tokens: the
    /// few-shot or system text a prefix cache can reuse.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub shared_prefix_tokens: usize,
    /// With --prompt-tokens (or its sweep): the seed of the synthetic
    /// prompts (`throughput pair` adds the run's number, so that runs against
    /// one server never send the prompts of an earlier run); text prompts
    /// have no seed.
    #[arg(long, value_name = "SEED", default_value_t = 0)]
    pub prompt_seed: u64,
    /// Completions of each request (OpenAI `n`), each of --max-new-tokens
    /// tokens, sharing the prompt's prefill; tokens/s counts them all, TTFT
    /// is the first token of any, latency the end of the last. In process
    /// batched mode only (--mode batched; the single test then runs batched
    /// too): threads mode runs a request on its own session, with no
    /// prefill to share. With --url: the `n` of every request.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub choices: usize,
    /// Batched mode: MiB of finished sequences' KV caches the scheduler
    /// keeps for prefix reuse (least recently used out; 0: none, every
    /// prompt is prefilled whole). A server's own setting decides with --url
    /// (`gpt2 serve --prefix-cache-mib`).
    #[arg(long, value_name = "MIB", default_value_t = 0, conflicts_with = "url")]
    pub prefix_cache_mib: usize,
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
    /// --prefix-cache-mib, --profile, --probe (the server's own settings; no
    /// roofline), and
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
