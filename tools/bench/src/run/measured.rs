//! What a run measured and what served it, made into the report: the
//! analysis against the plan's targets, and the one [`Metadata`] builder
//! every run (in process or `--url`) goes through.

use std::time::SystemTime;

use super::options::Options;
use super::plan::RunPlan;
use super::protocol::prompt_texts;
use crate::{
    meta, stats, DtypeProfile, DtypeRun, Metadata, ModelInfo, Report, Roofline, ServerInfo, TestResult,
    SCHEMA_VERSION,
};

/// What a run measured, and what served it.
pub(super) struct Measured {
    pub tests: Vec<TestResult>,
    pub served: Served,
    /// With `--profile`.
    pub profile: Option<Vec<DtypeProfile>>,
    /// With `--probe`.
    pub roofline: Option<Roofline>,
}

impl Measured {
    /// The report: the tests, their analysis against the plan's targets,
    /// and the metadata.
    pub fn report(self, opts: &Options, plan: &RunPlan) -> Report {
        let analysis = stats::analyze(&self.tests, &plan.thresholds);
        Report {
            schema_version: SCHEMA_VERSION,
            metadata: metadata(opts, plan, self.served),
            tests: self.tests,
            analysis,
            profile: self.profile,
            roofline: self.roofline,
        }
    }
}

/// What served a run's requests: the metadata in which the engine in this
/// process and a server (`--url`) differ.
pub(super) struct Served {
    pub kernels: String,
    pub pool_layout: String,
    pub threads_per_request: usize,
    pub max_busy_threads: usize,
    pub modes: Vec<String>,
    pub max_batch: usize,
    pub max_prompt_rows: usize,
    pub weights_source: String,
    pub weights_sha256: String,
    pub synthetic_weights: bool,
    pub model: Option<ModelInfo>,
    pub dtypes: Vec<DtypeRun>,
    pub server: Option<ServerInfo>,
}

/// A report's [`Metadata`], made in this one place for every run: when,
/// which build and CPU, the protocol, and what `served` the requests.
fn metadata(opts: &Options, plan: &RunPlan, served: Served) -> Metadata {
    Metadata {
        timestamp_utc: meta::utc_timestamp(SystemTime::now(), true),
        git_commit: meta::git_commit(),
        rustc: env!("GPT2_RUSTC_VERSION").into(),
        cpu_model: meta::cpu_model(),
        kernels: served.kernels,
        cores: plan.cores,
        pool_layout: served.pool_layout,
        threads_per_request: served.threads_per_request,
        max_busy_threads: served.max_busy_threads,
        concurrency_levels: std::iter::once(1).chain(plan.levels.iter().copied()).collect(),
        run_mode: if opts.full { "full" } else { "quick" }.into(),
        modes: served.modes,
        arrival: match opts.request_rate {
            Some(r) => format!("poisson {r} req/s, seed {}", opts.arrival_seed),
            None => "closed loop".into(),
        },
        max_batch: served.max_batch,
        max_prompt_rows: served.max_prompt_rows,
        weights_source: served.weights_source,
        weights_sha256: served.weights_sha256,
        synthetic_weights: served.synthetic_weights,
        model: served.model,
        dtypes: served.dtypes,
        max_new_tokens: opts.max_new_tokens,
        warmup_requests: opts.warmup,
        repetitions: plan.repetitions,
        prompts: match opts.prompt_tokens {
            Some(_) => Vec::new(),
            None => prompt_texts(opts),
        },
        prompt_tokens: opts.prompt_tokens,
        shared_prefix_tokens: opts.shared_prefix_tokens,
        choices: opts.choices,
        prefix_cache_mib: served.server.is_none().then_some(opts.prefix_cache_mib),
        server: served.server,
    }
}
