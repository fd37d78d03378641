//! The `throughput` benchmark's data: what one run measured, the analysis
//! computed from it, and the renderers (`report`: Markdown, stdout table, SVG).
//!
//! The JSON written by `throughput` is [`Report`] serialised; its schema is
//! documented in `docs/results-schema.md` and versioned by [`SCHEMA_VERSION`].

pub mod in_process;
pub mod legacy;
pub mod meta;
pub mod report;
pub mod roofline;
pub mod run;
pub mod runner;
pub mod stats;
pub mod step;

use serde::{Deserialize, Serialize};

/// Bump when a field changes meaning or disappears (adding fields is compatible).
///
/// 2: `roofline` grouped into `limits`, `decode`, `prefill`, `long_decode`,
/// `batch8` (1 had the same figures flat; [`legacy`] still reads them).
pub const SCHEMA_VERSION: u32 = 2;

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
    /// Why it failed (an error, a panic, or fewer tokens than asked); `None` if it succeeded.
    pub error: Option<String>,
}

/// One test: a number of requests at a fixed concurrency in one mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    /// e.g. "single" or "concurrent-4".
    pub name: String,
    /// "threads": one client thread per in-flight request, each running its
    /// own forward passes; "batched": requests share batched forward steps.
    pub mode: String,
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
    /// Every request's raw timings.
    pub raw: Vec<RequestRecord>,
}

/// Where and how the run happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub timestamp_utc: String,
    pub git_commit: String,
    pub rustc: String,
    pub cpu_model: String,
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
    /// e.g. "SYNTHETIC 124m checkpoint, seed 0 (...)" or "hub gpt2 @ <revision>".
    pub weights_source: String,
    pub weights_sha256: String,
    pub synthetic_weights: bool,
    pub model: ModelInfo,
    pub max_new_tokens: usize,
    pub warmup_requests: usize,
    pub repetitions: usize,
    pub prompts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub n_positions: usize,
    pub vocab_size: usize,
    pub n_params: usize,
    pub dtype: String,
}

/// Scaling of one (mode, concurrency) level against the single request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelAnalysis {
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
}

/// A pass/fail target on a headline figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// e.g. "single_tokens_per_s".
    pub name: String,
    /// ">" or "=".
    pub op: String,
    pub threshold: f64,
    pub measured: f64,
    pub pass: bool,
}

/// mean / stddev / min / max of one headline figure over repetitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub test: String,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    pub levels: Vec<LevelAnalysis>,
    /// Per mode: the lowest concurrency reaching 90% of that mode's best tokens/s.
    pub recommended_concurrency: Vec<(String, usize)>,
    pub targets: Vec<Target>,
    pub spread: Vec<Spread>,
}

/// Achieved against measured machine limits (`throughput --probe`): the
/// limits, then one part per workload set against them. Measured by
/// [`roofline::measure`]; schema 1 wrote the same figures flat, and
/// [`legacy`] reads them into this shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Roofline {
    pub limits: RooflineLimits,
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
    /// Bytes a batch-1 decode step reads: every weight once (f32); the KV
    /// cache of the short prompts is left out.
    pub bytes_per_token: f64,
    /// Single-request decode rate, 1 / p50 time per output token.
    pub tokens_per_s: f64,
    /// bytes_per_token x tokens_per_s, GB/s.
    pub achieved_gbs: f64,
    /// achieved_gbs / limits.read_gbs_all.
    pub fraction_of_bandwidth: f64,
    /// limits.read_gbs_all / bytes_per_token: the bandwidth-bound ceiling.
    pub ceiling_tokens_per_s: f64,
}

/// A prefill timed alone against the FMA peak.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillRoofline {
    /// A prefill of this many tokens, timed alone (median).
    pub tokens: usize,
    pub ms: f64,
    pub gflops: f64,
    /// gflops / limits.fma_gflops_all.
    pub fraction_of_fma_peak: f64,
}

/// One decode step, timed alone (median of 9), against the read bandwidth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRoofline {
    /// Tokens cached per sequence: the position the step decodes.
    pub position: usize,
    pub step_ms: f64,
    /// The bytes the step reads / step_ms, GB/s: every f32 weight, plus the
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
/// computing on them ([`Roofline::batch8_parts`]).
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

impl Roofline {
    /// The 8-row step's parts, or `None` in reports without them.
    pub fn batch8_parts(&self) -> Option<StepParts> {
        let b = self.batch8.as_ref()?;
        let compute_ms = b.compute_ms?;
        let known = [
            b.step.step_ms,
            compute_ms,
            self.limits.read_gbs_all,
            self.decode.bytes_per_token,
        ];
        known
            .iter()
            .all(|v| v.is_finite() && *v > 0.0)
            .then(|| StepParts {
                stream_ms: self.decode.bytes_per_token / self.limits.read_gbs_all / 1e6,
                compute_ms,
                step_ms: b.step.step_ms,
            })
    }
}

/// Everything one `throughput` run wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub metadata: Metadata,
    pub tests: Vec<TestResult>,
    pub analysis: Analysis,
    /// Per-op breakdown of the single-request test (`--profile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<crate::profile::OpRow>>,
    /// Achieved / limit (`--probe`); schema 1's flat layout is read too.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "legacy::roofline"
    )]
    pub roofline: Option<Roofline>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roofline(step_ms: f64, compute_ms: f64) -> Roofline {
        Roofline {
            limits: RooflineLimits {
                read_gbs_1t: 20.0,
                read_gbs_all: 40.0,
                read_fma8_gbs_all: Some(35.0),
                fma_gflops_all: 200.0,
                linear_packed_gflops: 120.0,
            },
            decode: DecodeRoofline {
                bytes_per_token: 0.5e9,
                tokens_per_s: 60.0,
                achieved_gbs: 30.0,
                fraction_of_bandwidth: 0.75,
                ceiling_tokens_per_s: 80.0,
            },
            prefill: PrefillRoofline {
                tokens: 128,
                ms: 180.0,
                gflops: 120.0,
                fraction_of_fma_peak: 0.6,
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
        let parts = |step| roofline(step, 10.0).batch8_parts().unwrap();
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
        let q = roofline(27.5, 20.0).batch8_parts().unwrap();
        assert!(
            (q.hidden() - 0.4).abs() < 1e-9,
            "5 of the 12.5 ms stream hidden: {q:?}"
        );
    }

    #[test]
    fn batch8_parts_need_every_figure() {
        assert_eq!(roofline(20.0, 0.0).batch8_parts(), None, "no compute time");
        let mut older = roofline(20.0, 10.0);
        older.batch8.as_mut().unwrap().compute_ms = None;
        assert_eq!(older.batch8_parts(), None, "older report: no compute time");
        older.batch8 = None;
        assert_eq!(older.batch8_parts(), None, "older report: no 8-row step");
        assert_eq!(roofline(0.0, 10.0).batch8_parts(), None, "no step timed");
        let mut r = roofline(20.0, 10.0);
        r.limits.read_gbs_all = 0.0;
        assert_eq!(r.batch8_parts(), None);
    }
}
