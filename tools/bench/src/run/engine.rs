//! A run of the engine in this process: each repetition loads each dtype's
//! model afresh (the previous one dropped first, the order rotating) and
//! runs the protocol on it in threads and batched modes; with `--profile`
//! the single request is profiled, with `--probe` the machine's limits are
//! measured once, after the last.

use std::error::Error;
use std::path::Path;
use std::sync::{Arc, Mutex};

use gpt2::profile::{self, Profile};
use gpt2::{
    Dtype, Fit, GenerateOptions, Gpt2Config, Gpt2Model, Invalid, Request, Scheduler, SchedulerConfig,
};

use super::measured::{Measured, Served};
use super::options::Options;
use super::plan::RunPlan;
use super::protocol::{Lane, Prompts, Protocol};
use crate::in_process::{InProcess, Mode, PoolLayout};
use crate::progress::Progress;
use crate::roofline::{self, EngineTimes};
use crate::{meta, DtypeProfile, DtypeRun, ModelInfo, TestResult};
use gpt2_hub as hub;

/// Bytes in a MiB, for the memory figures.
const MIB: f64 = (1u64 << 20) as f64;

/// Runs the protocol on the engine, every dtype in every repetition.
pub(super) fn measure(opts: &Options, plan: &RunPlan) -> Result<Measured, Box<dyn Error>> {
    // Before any work: a run whose results cannot be written is not started.
    gpt2::files::check_writable_dir(&opts.out_dir)?;
    let resolved = hub::resolve(&opts.weights)?;
    let tok = resolved.load_tokenizer()?;
    // Every dtype loads the same checkpoint, so its config checks the
    // prompts before any model is loaded.
    let (config_path, model_path) = gpt2::weights::checkpoint_files(&resolved.dir);
    let cfg = Gpt2Config::from_file(&config_path)?;
    let loads = plan.dtypes.len() * plan.repetitions;
    let progress = Progress::new(
        plan.total_requests(opts, plan.modes.len(), loads, loads) as u64,
        "requests",
    );
    let weights_source = resolved.source.describe(cfg.synthetic.as_ref());
    progress.println(&format!("weights: {weights_source}"));
    let prompts = Prompts::new(opts, &tok, cfg.vocab_size, |what, ids| {
        fits(opts, &cfg, what, ids)
    })?;
    announce_threads(opts, plan, &progress);
    let bench = Bench {
        protocol: Protocol {
            opts,
            plan,
            progress: &progress,
            prompts: &prompts,
        },
        dir: &resolved.dir,
        pool: &Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(plan.threads)
                .build()?,
        ),
    };
    let all = bench.every_load()?;
    let roofline = opts.probe.then(|| {
        let limits = roofline::measure_limits(&progress, &cfg, &plan.dtypes);
        roofline::roofline(&cfg, &limits, &all.tests, &all.engines)
    });
    progress.finish();
    let served = Served {
        kernels: gpt2_kernels::active().to_string(),
        pool_layout: opts.pool.name().into(),
        threads_per_request: plan.threads,
        max_busy_threads: plan.max_busy,
        modes: plan.modes.iter().map(|m| m.name().to_string()).collect(),
        max_batch: opts.max_batch,
        max_prompt_rows: opts.max_prompt_rows,
        weights_source,
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
        dtypes: all.dtypes,
        server: None,
    };
    Ok(Measured {
        tests: all.tests,
        served,
        profile: opts.profile.then_some(all.profiles),
        roofline,
    })
}

/// A prompt's check: a valid request (the engine's door) whose prompt and
/// new tokens fit the context window; `what` names the prompt.
fn fits(opts: &Options, cfg: &Gpt2Config, what: &str, ids: &[u32]) -> Result<(), Box<dyn Error>> {
    let gen = GenerateOptions::greedy(opts.max_new_tokens);
    match Request::prepare(cfg, ids.to_vec(), gen, Fit::Whole) {
        Ok(_) => Ok(()),
        Err(Invalid::ContextExceeded(l)) => Err(format!(
            "{what} is {} tokens; with --max-new-tokens {} it needs {} positions, past the context \
             window of {}",
            l.prompt_tokens,
            l.max_new_tokens,
            l.positions(),
            l.n_positions
        )
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// The threads' layout and batched mode's limits, on stderr.
fn announce_threads(opts: &Options, plan: &RunPlan, progress: &Progress) {
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
             prompt rows per step, prefix reuse {}",
            plan.threads,
            opts.max_batch,
            opts.max_prompt_rows,
            match opts.prefix_cache_mib {
                0 => "off (--prefix-cache-mib 0)".to_string(),
                m => format!("on: {m} MiB of finished KV caches kept"),
            }
        ));
    }
}

/// What every dtype of a run shares: the protocol, the checkpoint and the
/// compute pool.
struct Bench<'a> {
    protocol: Protocol<'a>,
    /// The checkpoint directory every dtype loads.
    dir: &'a Path,
    pool: &'a Arc<rayon::ThreadPool>,
}

/// What the whole run measured, every dtype and repetition.
#[derive(Default)]
struct AllLoads {
    /// By dtype in the order asked for, then by repetition.
    tests: Vec<TestResult>,
    /// In the order asked for, each with its largest memory over its loads.
    dtypes: Vec<DtypeRun>,
    profiles: Vec<DtypeProfile>,
    engines: Vec<EngineTimes>,
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

/// One dtype's model as loaded, and the memory it took.
struct Loaded {
    model: Arc<Gpt2Model>,
    run: DtypeRun,
}

impl Bench<'_> {
    /// Every repetition, each running every dtype. Repetitions outer,
    /// dtypes inner, their order rotating: with several repetitions the
    /// dtypes alternate, so their ratios are not one dtype's quiet minute
    /// against another's busy one.
    fn every_load(&self) -> Result<AllLoads, Box<dyn Error>> {
        let plan = self.protocol.plan;
        let mut all = AllLoads::default();
        let n = plan.dtypes.len();
        for rep in 0..plan.repetitions {
            for i in 0..n {
                let measured = self.run_dtype(plan.dtypes[(rep + i) % n], rep)?;
                all.tests.extend(measured.tests);
                all.profiles.extend(measured.profile);
                all.engines.extend(measured.engine);
                // Memory: the largest over this dtype's loads.
                let m = measured.run;
                match all.dtypes.iter_mut().find(|d| d.dtype == m.dtype) {
                    Some(d) => {
                        d.rss_after_load_bytes = d.rss_after_load_bytes.max(m.rss_after_load_bytes);
                        d.peak_rss_bytes = d.peak_rss_bytes.max(m.peak_rss_bytes);
                        d.peak_rss_own &= m.peak_rss_own;
                    }
                    None => all.dtypes.push(m),
                }
            }
        }
        // In the order asked for.
        let asked = |d: &str| plan.dtypes.iter().position(|p| p.as_str() == d);
        all.dtypes.sort_by_key(|d| asked(&d.dtype));
        all.tests.sort_by_key(|t| (asked(&t.dtype), t.repetition));
        Ok(all)
    }

    /// Loads `dtype`'s model (the caller's previous one is gone by then,
    /// and the resident high-water mark is reset first, so this dtype's peak
    /// is its own).
    fn load(&self, dtype: Dtype) -> Result<Loaded, Box<dyn Error>> {
        let peak_rss_own = meta::reset_peak_rss();
        let model = Arc::new(Gpt2Model::load_with(self.dir, dtype)?);
        let rss_after_load_bytes = profile::proc_status("VmRSS:").map(|kib| kib * 1024);
        let packed = model.weights.packed_bytes;
        self.protocol.progress.println(&format!(
            "dtype {dtype}: packed weights {:.1} MiB, resident after load {}",
            packed as f64 / MIB,
            rss_after_load_bytes.map_or_else(|| "unknown".into(), |r| format!("{:.1} MiB", r as f64 / MIB))
        ));
        Ok(Loaded {
            model,
            run: DtypeRun {
                dtype: dtype.as_str().into(),
                packed_weight_bytes: Some(packed as u64),
                rss_after_load_bytes,
                peak_rss_bytes: None,
                peak_rss_own,
            },
        })
    }

    /// One dtype's part of repetition `rep`: its model loaded, the warmup
    /// and the repetition's tests, the memory it took, and in the first
    /// repetition its profile and, with `--probe`, its workloads timed
    /// alone. The model, its scheduler and its sessions are dropped on
    /// return.
    fn run_dtype(&self, dtype: Dtype, rep: usize) -> Result<DtypeMeasured, Box<dyn Error>> {
        let (opts, plan, progress) = (self.protocol.opts, self.protocol.plan, self.protocol.progress);
        let Loaded { model, mut run } = self.load(dtype)?;
        // Batched mode: one engine thread driving the shared pool's compute
        // threads; the client threads only submit and wait.
        let scheduler = if plan.modes.contains(&Mode::Batched) {
            Some(Scheduler::new(
                Arc::clone(&model),
                SchedulerConfig {
                    max_batch: opts.max_batch,
                    max_prompt_rows: opts.max_prompt_rows,
                    max_step_rows: opts.max_step_rows,
                    pool: Some(Arc::clone(self.pool)),
                    prefix_cache_bytes: plan.prefix_cache_bytes,
                    ..SchedulerConfig::default()
                },
            )?)
        } else {
            None
        };
        let engine = |mode: Mode| Lane {
            mode: mode.name(),
            backend: InProcess {
                model: &model,
                mode,
                layout: opts.pool,
                threads: plan.threads,
                shared_pool: self.pool,
                scheduler: scheduler.as_ref(),
                profile: None,
            },
        };
        let lanes: Vec<Lane<InProcess>> = plan.modes.iter().map(|&m| engine(m)).collect();
        let d = dtype.as_str();
        let note = format!(
            "warmup ({dtype}): {} request(s) per mode, not counted",
            opts.warmup
        );
        self.protocol.warmup(&lanes, d, &note)?;
        // The single request runs in threads mode, profiled in the first
        // repetition with `--profile`; a request of several choices is
        // batched mode's alone (the plan refused threads mode with it).
        let single_profile = Mutex::new(Profile::default());
        let mut single = engine(if opts.choices > 1 {
            Mode::Batched
        } else {
            Mode::Threads
        });
        single.backend.profile = (opts.profile && rep == 0).then_some(&single_profile);
        let tests = self.protocol.repetition(&single, &lanes, d, rep)?;
        drop(scheduler);
        // Before the probe, whose decode steps hold 8 KV caches of their own.
        run.peak_rss_bytes = profile::peak_rss_bytes();
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
            Some(roofline::time_engine(&model, self.pool)?)
        } else {
            None
        };
        Ok(DtypeMeasured {
            tests,
            run,
            profile,
            engine,
        })
    }
}
