//! What a run measured and what served it, made into the report: the
//! analysis against the plan's targets, and the one [`Metadata`] builder
//! every run (in process or `--url`) goes through.

use std::time::SystemTime;

use super::options::Options;
use super::plan::RunPlan;
use super::protocol::prompt_texts;
use crate::{
    meta, stats, Analysis, DtypeProfile, DtypeRun, Metadata, ModelInfo, Report, Roofline, ServerInfo, Sweep,
    Target, TestResult, SCHEMA_VERSION,
};

/// What a run measured, and what served it.
pub(super) struct Measured {
    pub tests: Vec<TestResult>,
    pub served: Served,
    /// With `--profile`.
    pub profile: Option<Vec<DtypeProfile>>,
    /// With `--probe`.
    pub roofline: Option<Roofline>,
    /// With `--sweep`: the cells (their analyses still empty) and their order.
    pub sweep: Option<Sweep>,
}

impl Measured {
    /// The report: the tests, their analysis against the plan's targets
    /// (each cell's on its own in a sweep), and the metadata.
    pub fn report(self, opts: &Options, plan: &RunPlan) -> Report {
        let (analysis, sweep) = match self.sweep {
            None => (stats::analyze(&self.tests, &plan.thresholds), None),
            Some(sweep) => {
                let (analysis, sweep) = analyze_cells(&self.tests, sweep, plan);
                (analysis, Some(sweep))
            }
        };
        Report {
            schema_version: SCHEMA_VERSION,
            metadata: metadata(opts, plan, self.served),
            tests: self.tests,
            analysis,
            profile: self.profile,
            roofline: self.roofline,
            sweep,
        }
    }
}

/// Each cell analysed on its own tests; the run's analysis is every cell's
/// targets, each naming its cell (levels and spread mean something only
/// within a cell).
fn analyze_cells(tests: &[TestResult], mut sweep: Sweep, plan: &RunPlan) -> (Analysis, Sweep) {
    let mut targets = Vec::new();
    for (i, cell) in sweep.cells.iter_mut().enumerate() {
        let mine: Vec<TestResult> = tests.iter().filter(|t| t.cell == Some(i)).cloned().collect();
        let mut a = stats::analyze(&mine, &plan.thresholds);
        targets.extend(a.targets.drain(..).map(|t| Target { cell: Some(i), ..t }));
        cell.analysis = a;
    }
    let analysis = Analysis {
        targets,
        ..Analysis::default()
    };
    (analysis, sweep)
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
        concurrency_levels: concurrency_levels(plan),
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
        kv_dtype: match served.server {
            None => opts.kv_dtype.unwrap_or(gpt2::KvDtype::F32).as_str().into(),
            Some(_) => "unknown (the server's)".into(),
        },
        max_new_tokens: plan.max_new_tokens,
        warmup_requests: opts.warmup,
        repetitions: plan.repetitions,
        prompts: match plan.cells.iter().all(|c| c.prompt_tokens.is_none()) {
            true => prompt_texts(opts),
            false => Vec::new(),
        },
        prompt_tokens: opts.prompt_tokens,
        shared_prefix_tokens: opts.shared_prefix_tokens,
        choices: opts.choices,
        prefix_cache_mib: served.server.is_none().then_some(opts.prefix_cache_mib),
        server: served.server,
    }
}

/// Every concurrency level of the run, ascending, the single request's 1
/// first: the cells' (each the run's `--levels`, or its own in a
/// concurrency sweep).
fn concurrency_levels(plan: &RunPlan) -> Vec<usize> {
    let mut levels: Vec<usize> = plan.cells.iter().flat_map(|c| c.levels.iter().copied()).collect();
    levels.push(1);
    levels.sort_unstable();
    levels.dedup();
    levels
}
