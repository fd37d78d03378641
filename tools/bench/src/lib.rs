//! The `throughput` benchmark's data: what one run measured, the analysis
//! computed from it, and the renderers (`report`: Markdown, stdout table, SVG).
//!
//! The JSON written by `throughput` is [`Report`] serialised; its schema is
//! documented in `docs/results-schema.md` and versioned by [`SCHEMA_VERSION`].

pub mod arrival;
pub mod compare;
pub mod deadline;
pub mod failure;
pub mod http;
pub mod in_process;
pub mod legacy;
pub mod llama;
pub mod meta;
pub mod pair;
pub mod probe;
pub mod progress;
pub mod report;
pub mod roofline;
pub mod run;
pub mod runner;
pub mod soak;
pub mod sse;
pub mod stats;

use serde::{Deserialize, Serialize};

use failure::Failure;

/// Bump when a field changes meaning or disappears (adding fields is compatible).
///
/// 2: `roofline` grouped into `limits`, `decode`, `prefill`, `long_decode`,
/// `batch8` (1 had the same figures flat).
///
/// 3: a run measures one or more weight formats: every test, level, target
/// and spread entry names its `dtype`; `metadata.dtypes` lists them with
/// their memory (2 had `metadata.model.dtype`, always f32); the roofline has
/// the machine's limits once and the engine's figures per dtype; the
/// recommended concurrencies are objects. [`legacy`] reads 1 and 2 (as f32).
///
/// 4: a run may measure an OpenAI-compatible server (`throughput --url`):
/// its tests' mode is `http`, `metadata.server` names the server, and
/// `metadata.model` is `null` (the server's model is not known here); every
/// test has `itl_ms` (inter-token latency) and every request its
/// `token_ms`. Reports of schema 3 read as they are (no server, no ITL).
///
/// 5: a run may sweep the workload (`throughput --sweep`): `sweep` holds
/// the axes, every cell's settings, memory and analysis, and the order the
/// cells ran; each test and target names its `cell`; the top-level
/// `analysis` of a sweep has only the targets (a level or a spread of
/// several cells would mean nothing). Reports of schema 4 read as they are
/// (no sweep).
pub const SCHEMA_VERSION: u32 = 5;

/// The reference study that our default protocol reproduces: PyTorch GPT-2
/// 124M on some other CPU. `(concurrency, requests/s, tokens/s)`.
pub const REFERENCE_STUDY: [(usize, f64, f64); 3] = [(1, 0.84, 25.24), (2, 1.26, 37.88), (4, 1.38, 41.46)];

/// mean / p50 / p95 / p99 of a set of values, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

/// One request as measured by its client thread.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Order of submission within the test.
    pub index: usize,
    /// Which client thread ran it.
    pub client: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// When it started, from the start of the test.
    pub start_ms: f64,
    /// Time to first token; `None` if it failed before one.
    pub ttft_ms: Option<f64>,
    /// End-to-end latency.
    pub latency_ms: f64,
    /// Per output token after the first: `(latency - ttft) / (n - 1)`.
    pub tpot_ms: Option<f64>,
    /// When each generated token arrived, from the request's start (so the
    /// first is `ttft_ms`); empty if it failed, and in reports before schema 4.
    /// Empty for a request of several choices: see `choice_ms`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_ms: Vec<f64>,
    /// A request of several choices (`--choices`): when each choice's tokens
    /// arrived, one list per choice in index order, as `token_ms` is for
    /// one. Empty for one choice, and if the request failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choice_ms: Vec<Vec<f64>>,
    /// Why it failed, in words (an error, a panic, or fewer tokens than
    /// asked): `cause`'s text; `None` if it succeeded.
    pub error: Option<String>,
    /// Why it failed, as a value: what the drill groups by. `None` if it
    /// succeeded, and in reports written before it was recorded (their
    /// `error` alone says why).
    #[serde(default)]
    pub cause: Option<Failure>,
}

impl RequestRecord {
    /// Whether the request failed: what every count of failures (a test's
    /// `failed`, the exit status, the drill's tally) reads.
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// Marks the request failed by `failure`: its cause, and its text as the error.
    pub fn fail(&mut self, failure: Failure) {
        self.error = Some(failure.to_string());
        self.cause = Some(failure);
    }
}

/// One test: a number of requests at a fixed concurrency in one mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    /// e.g. "single" or "concurrent-4".
    pub name: String,
    /// "threads": one client thread per in-flight request, each running its
    /// own forward passes; "batched": requests share batched forward steps.
    pub mode: String,
    /// The format of the packed weights: "f32", "bf16" or "int8" (f32 in
    /// reports before schema 3).
    #[serde(default = "legacy::f32_name")]
    pub dtype: String,
    pub concurrency: usize,
    /// 0-based repetition index (`--full` repeats every test).
    pub repetition: usize,
    pub requests: usize,
    pub failed: usize,
    /// Generated tokens of the successful requests.
    pub total_tokens: usize,
    /// Prompt tokens of all requests, counted apart.
    pub prompt_tokens: usize,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub tokens_per_s: f64,
    pub latency_ms: Summary,
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    /// Inter-token latency: the gaps between consecutive tokens of the
    /// successful requests (of each choice), all of them pooled (`None`
    /// before schema 4).
    #[serde(default)]
    pub itl_ms: Option<Summary>,
    /// Prefix reuse during the test, as the in-process scheduler counted it
    /// (batched mode); `None` where nothing counts it (threads mode, a
    /// server), and in reports written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<PrefixReuse>,
    /// The sweep cell the test ran in (an index of `sweep.cells`); `None`
    /// in a run without a sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<usize>,
    /// Every request's raw timings.
    pub raw: Vec<RequestRecord>,
}

/// What a test's requests took from the scheduler's prefix cache: the
/// difference of [`gpt2::prefix::PrefixStats`] over the test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PrefixReuse {
    /// Requests that started from a cached prefix.
    pub hits: u64,
    /// Prompt tokens taken from the cache instead of computed.
    pub tokens_reused: u64,
}

/// Where and how the run happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub timestamp_utc: String,
    pub git_commit: String,
    pub rustc: String,
    pub cpu_model: String,
    /// The kernel instruction set the engine ran (`avx512`, `avx2`, `portable`; empty before schema 4's
    /// run-time dispatch, `n/a (server)` for `--url` runs).
    #[serde(default)]
    pub kernels: String,
    /// Logical cores available to this process.
    pub cores: usize,
    /// "shared": one rayon pool for all requests; "per-request": a pool each.
    pub pool_layout: String,
    /// Threads in the shared pool, or in each request's pool.
    pub threads_per_request: usize,
    /// Upper bound of busy compute threads at the highest concurrency.
    pub max_busy_threads: usize,
    pub concurrency_levels: Vec<usize>,
    /// "quick" (default) or "full".
    pub run_mode: String,
    pub modes: Vec<String>,
    /// "closed loop" or "poisson R req/s, seed S".
    #[serde(default)]
    pub arrival: String,
    /// Batched mode: most sequences per step, and prompt rows per step.
    #[serde(default)]
    pub max_batch: usize,
    #[serde(default)]
    pub max_prompt_rows: usize,
    /// e.g. `SYNTHETIC 124m checkpoint, seed 0 (...)` or `hub gpt2 @ <revision>`.
    pub weights_source: String,
    pub weights_sha256: String,
    pub synthetic_weights: bool,
    /// The checkpoint's shape; `None` for a server (`--url`), whose model
    /// is not known here (schema 4; always present before).
    pub model: Option<ModelInfo>,
    /// The weight formats measured, in the order they ran (schema 2 and
    /// older: f32 alone, its memory unknown).
    #[serde(default = "legacy::f32_runs")]
    pub dtypes: Vec<DtypeRun>,
    /// The KV caches' format (`--kv-dtype`: `f32` or `bf16`; in a sweep of
    /// it, each cell's is its own); `f32` in reports before it existed;
    /// `unknown (the server's)` for a server.
    #[serde(default = "legacy::f32_name")]
    pub kv_dtype: String,
    pub max_new_tokens: usize,
    pub warmup_requests: usize,
    pub repetitions: usize,
    /// The text prompts (the single test's, then the concurrent tests');
    /// empty with `--prompt-tokens` (synthetic prompts: see `prompt_tokens`).
    pub prompts: Vec<String>,
    /// `--prompt-tokens`: every request's prompt ends with this many
    /// synthetic token ids of its own (the first differing from every other
    /// request's of the run); `None`: the text prompts, rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<usize>,
    /// `--shared-prefix-tokens`: the synthetic preamble every request's
    /// prompt starts with (0: none).
    #[serde(default)]
    pub shared_prefix_tokens: usize,
    /// `--choices`: completions per request (OpenAI `n`), sharing one prefill.
    #[serde(default = "legacy::one")]
    pub choices: usize,
    /// The in-process scheduler's prefix-cache budget (`--prefix-cache-mib`;
    /// 0: no reuse); `None` for a server, whose own setting decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache_mib: Option<usize>,
    /// The server measured (`throughput --url`); `None` for the in-process engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerInfo>,
}

/// An OpenAI-compatible server a run measured (`throughput --url`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// The base URL given, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// The `model` sent with every request: `--server-model`, else the
    /// first id `/v1/models` listed.
    pub model: String,
    /// That model's `owned_by` in `/v1/models`, if it names one (e.g.
    /// `gpt2-rs`, `vllm`, `llamacpp`).
    pub owned_by: Option<String>,
    /// The whole `/v1/models` answer, as the server sent it.
    pub models: serde_json::Value,
}

impl Metadata {
    /// The requests' shape in words, for the reports: their prompts, the
    /// choices per request and whether a prefix could be reused.
    pub fn workload(&self) -> String {
        let prompts = match self.prompt_tokens {
            // A sweep of prompt-tokens: each cell's own.
            None if self.prompts.is_empty() => {
                "synthetic: each cell's prompt-tokens, each request its own".into()
            }
            None => format!("{} text prompt(s), rotated", self.prompts.len()),
            Some(n) if self.shared_prefix_tokens > 0 => format!(
                "synthetic: a preamble of {} tokens shared by every request, then {n} tokens of its own",
                self.shared_prefix_tokens
            ),
            Some(n) => format!("synthetic: {n} tokens, each request its own"),
        };
        let choices = match self.choices {
            1 => String::new(),
            n => format!("; {n} choices per request (one prefill)"),
        };
        let reuse = match (self.prefix_cache_mib, &self.server) {
            (_, Some(_)) => "the server's own setting".to_string(),
            (Some(0) | None, None) => "off".to_string(),
            (Some(m), None) => format!("on, {m} MiB (batched mode)"),
        };
        format!("{prompts}{choices}; prefix reuse: {reuse}")
    }

    /// What served the requests, for labels that must tell runs apart:
    /// `gpt2-rs` in process, or the server's owner and model id.
    pub fn engine(&self) -> String {
        match &self.server {
            None => "gpt2-rs".into(),
            Some(s) => match &s.owned_by {
                Some(owner) => format!("{owner} {}", s.model),
                None => format!("server {}", s.model),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub n_positions: usize,
    pub vocab_size: usize,
    pub n_params: usize,
}

/// One weight format of a run and the memory it took. The model of one
/// format is dropped before the next one is loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DtypeRun {
    /// "f32", "bf16" or "int8".
    pub dtype: String,
    /// Bytes of the packed matrices (the blocks' linear layers and the LM
    /// head) as the loader reports them.
    pub packed_weight_bytes: Option<u64>,
    /// Resident memory (VmRSS) right after loading: this format's weights,
    /// plus what the process already held (tokenizer, thread pools, freed
    /// memory the allocator kept). `None` where the OS does not tell.
    pub rss_after_load_bytes: Option<u64>,
    /// The resident high-water mark (VmHWM) after this format's tests: the
    /// peak of its load and its tests when [`Self::peak_rss_own`], else the
    /// process's peak so far (this format and every one before it).
    pub peak_rss_bytes: Option<u64>,
    /// Whether the high-water mark was reset to the resident size before
    /// this format's load (Linux `/proc/self/clear_refs`), so that
    /// `peak_rss_bytes` is this format's own.
    pub peak_rss_own: bool,
}

/// Scaling of one (dtype, mode, concurrency) level against the single
/// request of the same dtype.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelAnalysis {
    #[serde(default = "legacy::f32_name")]
    pub dtype: String,
    pub mode: String,
    pub concurrency: usize,
    /// Means over repetitions.
    pub requests_per_s: f64,
    pub tokens_per_s: f64,
    pub latency_p50_ms: f64,
    /// tokens_per_s / tokens_per_s at concurrency 1.
    pub scaling: f64,
    /// scaling / concurrency.
    pub efficiency: f64,
    /// latency_p50 / latency_p50 at concurrency 1.
    pub latency_penalty: f64,
    /// The reference study's (requests/s, tokens/s) at this level, if it has one.
    pub reference: Option<(f64, f64)>,
    /// tokens_per_s over threads mode's at the same concurrency (modes other
    /// than threads, where both were measured).
    #[serde(default)]
    pub vs_threads: Option<f64>,
    /// tokens_per_s over f32's at the same mode and concurrency (dtypes
    /// other than f32, in runs that measured f32).
    #[serde(default)]
    pub vs_f32: Option<f64>,
}

/// The lowest concurrency of a (dtype, mode) reaching 90% of its best tokens/s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    pub dtype: String,
    pub mode: String,
    pub concurrency: usize,
}

/// A pass/fail target on a headline figure of one dtype (every dtype of a
/// run is held to the same targets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// e.g. "single_tokens_per_s".
    pub name: String,
    #[serde(default = "legacy::f32_name")]
    pub dtype: String,
    /// ">" or "=".
    pub op: String,
    pub threshold: f64,
    pub measured: f64,
    pub pass: bool,
    /// Whether a miss fails the run (exit status 3): the reference study's
    /// targets always; the project's own (the batching ones) only with
    /// `--strict` or when named by `--target`. Reports written before the
    /// field existed held every target required.
    #[serde(default = "legacy::required")]
    pub required: bool,
    /// The sweep cell it was measured on (an index of `sweep.cells`);
    /// `None` in a run without a sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<usize>,
}

/// mean / stddev / min / max of one headline figure over repetitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub test: String,
    #[serde(default = "legacy::f32_name")]
    pub dtype: String,
    /// `threads` or `batched`: the test names are shared by the modes. Empty
    /// in reports written before the field existed.
    #[serde(default)]
    pub mode: String,
    pub metric: String,
    pub mean: f64,
    pub stddev: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    pub levels: Vec<LevelAnalysis>,
    /// Per dtype and mode (schema 2 wrote `[mode, concurrency]` pairs).
    #[serde(deserialize_with = "legacy::recommendations")]
    pub recommended_concurrency: Vec<Recommendation>,
    pub targets: Vec<Target>,
    pub spread: Vec<Spread>,
}

/// Achieved against measured machine limits (`throughput --probe`): the
/// limits, measured once, then each dtype's workloads set against them.
/// Built by [`roofline::roofline`]; [`legacy`] reads schema 1's flat figures
/// and schema 2's one part (f32) into this shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Roofline {
    pub limits: RooflineLimits,
    /// In the order the dtypes ran.
    pub dtypes: Vec<DtypeRoofline>,
}

/// One dtype's workloads against the limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DtypeRoofline {
    pub dtype: String,
    /// Batch-1 decode after the short prompts of the single-request test.
    pub decode: DecodeRoofline,
    pub prefill: PrefillRoofline,
    /// One decode step of a single sequence after a long prompt; `None` in
    /// reports written before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_decode: Option<StepRoofline>,
    /// One decode step of 8 sequences; `None` in reports written before it
    /// was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch8: Option<Batch8Roofline>,
}

/// The machine limits a [`Roofline`] divides by: a summary of
/// [`crate::probe::Limits`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RooflineLimits {
    /// Sustained read bandwidth, GB/s, one thread and all threads.
    pub read_gbs_1t: f64,
    pub read_gbs_all: f64,
    /// The all-threads read with 8 FMAs per loaded vector (the arithmetic of
    /// an 8-row step and nothing else), GB/s: the most an 8-row step can
    /// stream at. `None` in reports written before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_fma8_gbs_all: Option<f64>,
    /// Peak FMA throughput of all threads, GFLOP/s.
    pub fma_gflops_all: f64,
    /// Our `linear_packed` at M = 128 (GPT-2 shapes), the best of them, GFLOP/s.
    pub linear_packed_gflops: f64,
}

/// Batch-1 decode against the read bandwidth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeRoofline {
    /// Bytes a batch-1 decode step reads: every weight once, the packed
    /// matrices in the dtype and the rest in f32; the KV cache of the short
    /// prompts is left out.
    pub bytes_per_token: f64,
    /// Single-request decode rate, 1 / p50 time per output token.
    pub tokens_per_s: f64,
    /// bytes_per_token x tokens_per_s, GB/s.
    pub achieved_gbs: f64,
    /// achieved_gbs / read_gbs.
    pub fraction_of_bandwidth: f64,
    /// read_gbs / bytes_per_token: the bandwidth-bound ceiling.
    pub ceiling_tokens_per_s: f64,
    /// The read rate it is held to, GB/s: that of a buffer of
    /// bytes_per_token (`Limits::decode_reads`). `None` in reports written
    /// before it was measured, where it was limits.read_gbs_all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_gbs: Option<f64>,
}

/// A prefill timed alone against the FMA peak.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillRoofline {
    /// A prefill of this many tokens, timed alone (median).
    pub tokens: usize,
    pub ms: f64,
    pub gflops: f64,
    /// gflops / the dtype's arithmetic peak: limits.fma_gflops_all, or
    /// `peak` where that is given.
    pub fraction_of_fma_peak: f64,
    /// The peak held to when it is not the FMA peak (int8: its integer dot
    /// products'). `None` for the FMA peak, and in reports written before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak: Option<ComputePeak>,
}

/// An arithmetic peak other than the FMAs', measured by the probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputePeak {
    /// What it is: "int8 dot-product peak (vpdpbusd zmm)".
    pub name: String,
    /// 10⁹ operations per second (a multiply-add counting two).
    pub gflops: f64,
}

/// One decode step, timed alone (median of 9), against the read bandwidth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRoofline {
    /// Tokens cached per sequence: the position the step decodes.
    pub position: usize,
    pub step_ms: f64,
    /// The bytes the step reads / step_ms, GB/s: every weight, plus the
    /// KV cache at `position` for the long decode (for 8 rows the weights
    /// alone, streamed once per step, as if the step did nothing else).
    pub achieved_gbs: f64,
    /// achieved_gbs / limits.read_gbs_all (for 8 rows: the step's rate over
    /// the bandwidth-bound rate of 8 tokens per pass over the weights).
    pub fraction_of_bandwidth: f64,
}

/// The 8-row decode step, and its arithmetic alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch8Roofline {
    #[serde(flatten)]
    pub step: StepRoofline,
    /// The arithmetic of that step's linear layers (the blocks' and the LM
    /// head's weights, times 8 rows) at the rate the same kernel reaches
    /// with a weight in L2, one core's rate times the step's threads, ms:
    /// what the step's linears would cost if nothing came from memory.
    /// `None` in reports written before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_ms: Option<f64>,
}

/// An 8-row decode step against its two parts: streaming the weights and
/// computing on them ([`DtypeRoofline::batch8_parts`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepParts {
    /// The weights read once at the all-threads read bandwidth, ms.
    pub stream_ms: f64,
    /// The linear layers' arithmetic with the weights in L2, ms.
    pub compute_ms: f64,
    /// The step as measured, ms.
    pub step_ms: f64,
}

impl StepParts {
    /// The step if streaming and computing overlapped perfectly: the larger.
    pub fn overlapped_ms(&self) -> f64 {
        self.stream_ms.max(self.compute_ms)
    }

    /// The step if they did not overlap at all: the sum.
    pub fn serial_ms(&self) -> f64 {
        self.stream_ms + self.compute_ms
    }

    /// How much of the smaller part the step hides behind the larger: 1 when
    /// it takes [`Self::overlapped_ms`], 0 when it takes [`Self::serial_ms`],
    /// below 0 when it takes longer than both parts one after the other (the
    /// step's other work, attention first, is in neither part).
    pub fn hidden(&self) -> f64 {
        (self.serial_ms() - self.step_ms) / self.stream_ms.min(self.compute_ms)
    }
}

impl DtypeRoofline {
    /// The 8-row step's parts against `limits`, or `None` in reports without them.
    pub fn batch8_parts(&self, limits: &RooflineLimits) -> Option<StepParts> {
        let b = self.batch8.as_ref()?;
        let compute_ms = b.compute_ms?;
        let known = [
            b.step.step_ms,
            compute_ms,
            limits.read_gbs_all,
            self.decode.bytes_per_token,
        ];
        known
            .iter()
            .all(|v| v.is_finite() && *v > 0.0)
            .then(|| StepParts {
                stream_ms: self.decode.bytes_per_token / limits.read_gbs_all / 1e6,
                compute_ms,
                step_ms: b.step.step_ms,
            })
    }
}

/// The per-op profile of one dtype's single-request test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DtypeProfile {
    pub dtype: String,
    pub rows: Vec<gpt2::profile::OpRow>,
}

/// Everything one `throughput` run wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub metadata: Metadata,
    pub tests: Vec<TestResult>,
    pub analysis: Analysis,
    /// Per-op breakdown of the single-request test, per dtype (`--profile`);
    /// schema 2's one table is read as f32's.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "legacy::profile"
    )]
    pub profile: Option<Vec<DtypeProfile>>,
    /// Achieved / limit (`--probe`); schema 1's and 2's layouts are read too.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "legacy::roofline"
    )]
    pub roofline: Option<Roofline>,
    /// The sweep (`--sweep`): its axes and cells; `None` without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<Sweep>,
}

/// A run's sweep of the workload (`throughput --sweep AXIS=V1,V2,...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sweep {
    /// The swept axes, in the order given.
    pub axes: Vec<SweepAxis>,
    /// Every cell: the product of the axes (the first varying slowest),
    /// each once per `--dtype` unless dtype is swept. Tests and targets
    /// name theirs by its index here.
    pub cells: Vec<SweepCell>,
    /// Per repetition, the cells' indices in the order they ran (each
    /// repetition starts one cell further on).
    pub order: Vec<Vec<usize>>,
}

/// One swept axis and its values, as given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepAxis {
    /// `prompt-tokens`, `model`, `dtype`, `concurrency` or `max-new-tokens`.
    pub axis: String,
    pub values: Vec<String>,
}

/// One cell of a sweep: what it ran with, the memory it took, and its
/// analysis (levels, recommendations, spread; its targets are the
/// report's, naming the cell).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepCell {
    /// The cell's value on each swept axis (axis name to value).
    pub swept: std::collections::BTreeMap<String, String>,
    /// What the checkpoint was asked as: a `model` value of the sweep, else
    /// the run's own (as `metadata.weights_source` names it).
    pub model_name: String,
    pub model: ModelInfo,
    pub weights_source: String,
    pub weights_sha256: String,
    pub synthetic_weights: bool,
    pub dtype: String,
    /// The KV caches' format: `f32` or `bf16`.
    pub kv_dtype: String,
    /// Tokens of each synthetic prompt; `None`: the text prompts.
    pub prompt_tokens: Option<usize>,
    pub max_new_tokens: usize,
    /// The concurrency levels measured, the single request's 1 first.
    pub concurrency_levels: Vec<usize>,
    /// The cell's memory: its packed weights, the resident size after its
    /// load and the high-water mark of its load and tests, the largest over
    /// its repetitions (`peak_rss_own`: the mark was reset before each of
    /// its loads; else it is the process's peak so far).
    pub memory: DtypeRun,
    pub analysis: Analysis,
}

impl Report {
    /// Whether the run measured more than one dtype (the renderers then
    /// name the dtype wherever a figure could be any of them).
    pub fn several_dtypes(&self) -> bool {
        self.metadata.dtypes.len() > 1
    }

    /// A target's name as the exit summary and the verdicts print it: with
    /// its dtype when the run measured several.
    pub fn target_label(&self, t: &Target) -> String {
        match (t.cell, &self.sweep) {
            (Some(i), Some(s)) => format!("{} ({})", t.name, s.cell_label(i)),
            _ if self.several_dtypes() => format!("{} ({})", t.name, t.dtype),
            _ => t.name.clone(),
        }
    }
}

impl Sweep {
    /// `cell 3: prompt-tokens=128, dtype=bf16`: the cell's swept values in
    /// the axes' order (its dtype too where several ran).
    pub fn cell_label(&self, i: usize) -> String {
        let Some(c) = self.cells.get(i) else {
            return format!("cell {i}");
        };
        let mut parts: Vec<String> = self
            .axes
            .iter()
            .filter_map(|a| c.swept.get(&a.axis).map(|v| format!("{}={v}", a.axis)))
            .collect();
        if !c.swept.contains_key("dtype") && self.cells.iter().any(|o| o.dtype != c.dtype) {
            parts.push(format!("dtype={}", c.dtype));
        }
        format!("cell {i}: {}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RooflineLimits {
        RooflineLimits {
            read_gbs_1t: 20.0,
            read_gbs_all: 40.0,
            read_fma8_gbs_all: Some(35.0),
            fma_gflops_all: 200.0,
            linear_packed_gflops: 120.0,
        }
    }

    fn roofline(step_ms: f64, compute_ms: f64) -> DtypeRoofline {
        DtypeRoofline {
            dtype: "f32".into(),
            decode: DecodeRoofline {
                bytes_per_token: 0.5e9,
                tokens_per_s: 60.0,
                achieved_gbs: 30.0,
                fraction_of_bandwidth: 0.75,
                ceiling_tokens_per_s: 80.0,
                read_gbs: Some(40.0),
            },
            prefill: PrefillRoofline {
                tokens: 128,
                ms: 180.0,
                gflops: 120.0,
                fraction_of_fma_peak: 0.6,
                peak: None,
            },
            long_decode: Some(StepRoofline {
                position: 200,
                step_ms: 16.0,
                achieved_gbs: 32.0,
                fraction_of_bandwidth: 0.8,
            }),
            batch8: Some(Batch8Roofline {
                step: StepRoofline {
                    position: 64,
                    step_ms,
                    achieved_gbs: 0.5e9 / step_ms / 1e6,
                    fraction_of_bandwidth: 0.5,
                },
                compute_ms: Some(compute_ms),
            }),
        }
    }

    #[test]
    fn batch8_parts_place_the_step_between_overlap_and_sum() {
        // 0.5 GB at 40 GB/s: 12.5 ms of streaming; 10 ms of arithmetic.
        let parts = |step| roofline(step, 10.0).batch8_parts(&limits()).unwrap();
        let p = parts(12.5);
        assert!((p.stream_ms - 12.5).abs() < 1e-9, "{p:?}");
        assert_eq!((p.overlapped_ms(), p.serial_ms()), (12.5, 22.5));
        assert!((p.hidden() - 1.0).abs() < 1e-9, "perfect overlap: {p:?}");
        assert!(parts(22.5).hidden().abs() < 1e-9, "no overlap");
        assert!(
            (parts(17.5).hidden() - 0.5).abs() < 1e-9,
            "half of the 10 ms hidden"
        );
        assert!(parts(25.0).hidden() < 0.0, "longer than both parts in a row");
        // The smaller part is the stream when compute is the larger.
        let q = roofline(27.5, 20.0).batch8_parts(&limits()).unwrap();
        assert!(
            (q.hidden() - 0.4).abs() < 1e-9,
            "5 of the 12.5 ms stream hidden: {q:?}"
        );
    }

    #[test]
    fn batch8_parts_need_every_figure() {
        let l = limits();
        assert_eq!(roofline(20.0, 0.0).batch8_parts(&l), None, "no compute time");
        let mut older = roofline(20.0, 10.0);
        older.batch8.as_mut().unwrap().compute_ms = None;
        assert_eq!(older.batch8_parts(&l), None, "older report: no compute time");
        older.batch8 = None;
        assert_eq!(older.batch8_parts(&l), None, "older report: no 8-row step");
        assert_eq!(roofline(0.0, 10.0).batch8_parts(&l), None, "no step timed");
        let no_bandwidth = RooflineLimits {
            read_gbs_all: 0.0,
            ..limits()
        };
        assert_eq!(roofline(20.0, 10.0).batch8_parts(&no_bandwidth), None);
    }
}
