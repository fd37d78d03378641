//! A run of the engine in this process: each repetition runs every cell
//! (a dtype of `--dtype`, or a point of the `--sweep` axes), each loading
//! its model afresh (the previous one dropped first, the order rotating) and
//! running the protocol on it in threads and batched modes; with
//! `--profile` the single request is profiled, with `--probe` the machine's
//! limits are measured once, after the last. Before any cell runs, every
//! cell's prompts are checked against its model's context and its
//! footprint against the memory the process can have (`gpt2::memory`), a
//! synthetic preset's config read before it is written.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gpt2::memory;
use gpt2::profile::{self, Profile};
use gpt2::synth::Preset;
use gpt2::{
    Dtype, Fit, Footprint, GenerateOptions, Gpt2Config, Gpt2Model, Gpt2Tokenizer, Invalid, KvDtype, Request,
    Scheduler, SchedulerConfig,
};

use super::measured::{Measured, Served};
use super::options::Options;
use super::plan::{CellPlan, RunPlan};
use super::protocol::{Lane, Prompts, Protocol};
use crate::in_process::{InProcess, Mode, PoolLayout};
use crate::progress::Progress;
use crate::roofline::{self, EngineTimes};
use crate::{meta, DtypeProfile, DtypeRun, ModelInfo, Sweep, SweepAxis, SweepCell, TestResult};
use gpt2_hub as hub;

/// Bytes in a MiB, for the memory figures.
const MIB: f64 = (1u64 << 20) as f64;

/// Runs the protocol on the engine, every cell in every repetition.
pub(super) fn measure(opts: &Options, plan: &RunPlan) -> Result<Measured, Box<dyn Error>> {
    // Before any work: a run whose results cannot be written is not started.
    gpt2::files::check_writable_dir(&opts.out_dir)?;
    let checkpoints = Checkpoint::every(opts, plan)?;
    // Every cell's prompts are checked against its model's context, and
    // its footprint against the memory the process can have, before any
    // model is loaded or a synthetic one written.
    let cells = plan
        .cells
        .iter()
        .enumerate()
        .map(|(i, c)| Cell::new(opts, plan, i, c, &checkpoints))
        .collect::<Result<Vec<_>, _>>()?;
    for cell in &cells {
        cell.check_memory(opts, plan)?;
    }
    let files = checkpoints
        .iter()
        .map(Checkpoint::files)
        .collect::<Result<Vec<_>, _>>()?;
    let progress = Progress::new(
        plan.total_requests(opts, plan.modes.len(), false) as u64,
        "requests",
    );
    for (c, f) in checkpoints.iter().zip(&files) {
        let sweep = c
            .asked
            .as_ref()
            .map_or_else(String::new, |m| format!(" (model={m})"));
        progress.println(&format!("weights{sweep}: {}", f.source));
    }
    announce_threads(opts, plan, &progress);
    let bench = Bench {
        opts,
        plan,
        progress: &progress,
        files: &files,
        pool: &Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(plan.threads)
                .build()?,
        ),
    };
    let all = bench.every_load(&cells)?;
    // Without a sweep (`--probe` is refused with one) there is one checkpoint.
    let cfg = &checkpoints[0].cfg;
    let roofline = opts.probe.then(|| {
        let limits = roofline::measure_limits(&progress, cfg, &plan.dtypes);
        roofline::roofline(cfg, &limits, &all.tests, &all.engines)
    });
    progress.finish();
    let sweep = plan.is_sweep().then(|| sweep(plan, &cells, &files, &all));
    Ok(Measured {
        served: served(opts, plan, &checkpoints, &files, all.dtypes),
        tests: all.tests,
        profile: opts.profile.then_some(all.profiles),
        roofline,
        sweep,
    })
}

/// What served an in-process run: this engine, and its checkpoint (or, in
/// a model sweep, every one).
fn served(
    opts: &Options,
    plan: &RunPlan,
    checkpoints: &[Checkpoint],
    files: &[Files],
    dtypes: Vec<DtypeRun>,
) -> Served {
    let (weights_source, weights_sha256, model) = match (checkpoints, files) {
        ([one], [f]) => (f.source.clone(), f.sha256.clone(), Some(model_info(&one.cfg))),
        _ => {
            let each: Vec<String> = checkpoints
                .iter()
                .zip(files)
                .map(|(c, f)| format!("model={}: {}", c.asked.as_deref().unwrap_or("?"), f.source))
                .collect();
            (format!("swept: {}", each.join("; ")), String::new(), None)
        }
    };
    Served {
        kernels: gpt2_kernels::active().to_string(),
        pool_layout: opts.pool.name().into(),
        threads_per_request: plan.threads,
        max_busy_threads: plan.max_busy,
        modes: plan.modes.iter().map(|m| m.name().to_string()).collect(),
        max_batch: opts.max_batch,
        max_prompt_rows: opts.max_prompt_rows,
        weights_source,
        weights_sha256,
        synthetic_weights: files.iter().any(|f| f.synthetic),
        model,
        dtypes,
        server: None,
    }
}

fn model_info(cfg: &Gpt2Config) -> ModelInfo {
    ModelInfo {
        n_layer: cfg.n_layer,
        n_head: cfg.n_head,
        n_embd: cfg.n_embd,
        n_positions: cfg.n_positions,
        vocab_size: cfg.vocab_size,
        n_params: cfg.n_params(),
    }
}

/// A checkpoint the run's cells load: the run's own (its weights flags),
/// or a `--sweep model=` value's; its config and tokenizer known before
/// anything is loaded, a synthetic one not yet written.
struct Checkpoint {
    /// The sweep's `model` value; `None`: the run's weights flags.
    asked: Option<String>,
    cfg: Gpt2Config,
    tok: Gpt2Tokenizer,
    at: At,
}

/// Where a checkpoint is.
enum At {
    /// A directory (local, or the hub's cache).
    Dir(hub::Resolved),
    /// A synthetic preset, written (once) only after the run is checked.
    Preset(Preset),
}

/// A checkpoint's files, ready to load.
struct Files {
    dir: PathBuf,
    /// Where it came from, in words (a synthetic one named so).
    source: String,
    synthetic: bool,
    sha256: String,
}

impl Checkpoint {
    /// Every checkpoint the cells name, each resolved once, in the order
    /// first named.
    fn every(opts: &Options, plan: &RunPlan) -> Result<Vec<Checkpoint>, Box<dyn Error>> {
        let mut out: Vec<Checkpoint> = Vec::new();
        for c in &plan.cells {
            if !out.iter().any(|k| k.asked == c.model) {
                out.push(Checkpoint::resolve(opts, c.model.as_deref())?);
            }
        }
        Ok(out)
    }

    /// The run's weights flags, or a `--sweep model=` value: a synthetic
    /// preset by name, else a checkpoint directory, else a hub model id,
    /// resolved as `--weights` and `--model` are (a hub id the hub cannot
    /// give falls back, with the hub's notice, to the synthetic checkpoint
    /// of its shape, which the weights source names).
    fn resolve(opts: &Options, asked: Option<&str>) -> Result<Checkpoint, Box<dyn Error>> {
        let w = &opts.weights;
        // `--synthetic-preset`/`--synthetic` (`--weights` wins over them).
        let preset = w.weights.is_none().then(|| w.synthetic_choice()).flatten();
        let at = match (asked, preset) {
            (None, Some(preset)) => At::Preset(preset),
            (None, None) => At::Dir(hub::resolve(w)?),
            (Some(name), _) => match Preset::from_name(name) {
                Some(preset) => At::Preset(preset),
                None => {
                    let dir = Path::new(name);
                    let args = hub::WeightsArgs {
                        weights: dir.is_dir().then(|| dir.to_path_buf()),
                        model: name.to_string(),
                        ..w.clone()
                    };
                    At::Dir(hub::resolve(&args)?)
                }
            },
        };
        let (cfg, tok) = match &at {
            At::Preset(p) => {
                let tok = match &w.tokenizer {
                    Some(t) => Gpt2Tokenizer::from_file(t)?,
                    None => Gpt2Tokenizer::builtin(),
                };
                (p.config(hub::SYNTHETIC_SEED), tok)
            }
            At::Dir(r) => {
                let (config_path, _) = gpt2::weights::checkpoint_files(&r.dir);
                (Gpt2Config::from_file(&config_path)?, r.load_tokenizer()?)
            }
        };
        Ok(Checkpoint {
            asked: asked.map(String::from),
            cfg,
            tok,
            at,
        })
    }

    /// Its files: a synthetic preset written under `weights/synthetic/`
    /// (once), the weights file hashed.
    fn files(&self) -> Result<Files, Box<dyn Error>> {
        let resolved = match &self.at {
            At::Dir(r) => r.clone(),
            At::Preset(p) => hub::synthetic(*p, hub::SYNTHETIC_SEED)?,
        };
        let (_, model_path) = gpt2::weights::checkpoint_files(&resolved.dir);
        let marked = self.cfg.synthetic.as_ref();
        Ok(Files {
            source: resolved.source.describe(marked),
            synthetic: resolved.source.is_synthetic(marked),
            sha256: meta::sha256_file(&model_path)?,
            dir: resolved.dir,
        })
    }
}

/// One cell as it runs: its plan, its checkpoint (and that checkpoint's
/// index) and its prompts.
struct Cell<'a> {
    plan: &'a CellPlan,
    checkpoint: &'a Checkpoint,
    /// The index of its checkpoint (and of its [`Files`]).
    k: usize,
    prompts: Prompts,
    /// `cell 3 (dtype=bf16)` in a sweep, else empty: what errors name.
    name: String,
}

impl<'a> Cell<'a> {
    /// Cell `i`: its checkpoint, and its prompts made and checked against
    /// that checkpoint's context (the error names the cell in a sweep).
    fn new(
        opts: &Options,
        run: &RunPlan,
        i: usize,
        plan: &'a CellPlan,
        checkpoints: &'a [Checkpoint],
    ) -> Result<Cell<'a>, Box<dyn Error>> {
        let k = checkpoints
            .iter()
            .position(|c| c.asked == plan.model)
            .ok_or("a cell's checkpoint was not resolved")?;
        let checkpoint = &checkpoints[k];
        let cfg = &checkpoint.cfg;
        let name = match run.is_sweep() {
            true => format!("--sweep cell {i} ({})", plan.label()),
            false => String::new(),
        };
        let prompts = Prompts::new(
            opts,
            plan.prompt_tokens,
            &checkpoint.tok,
            cfg.vocab_size,
            |what, ids| {
                fits(cfg, plan.max_new_tokens, what, ids).map_err(|e| match name.is_empty() {
                    true => e,
                    false => format!("{name}: {e}").into(),
                })
            },
        )?;
        Ok(Cell {
            plan,
            checkpoint,
            k,
            prompts,
            name,
        })
    }

    /// Whether the cell's weights, KV caches (its highest level's sequences,
    /// every choice one, each of its longest prompt and new tokens; the
    /// prefix cache) and work buffers fit the memory the process can have
    /// (`gpt2::memory::check`): else the engine's error naming it.
    fn check_memory(&self, opts: &Options, run: &RunPlan) -> Result<(), Box<dyn Error>> {
        let (c, cfg) = (self.plan, &self.checkpoint.cfg);
        let sequences = c.levels.last().copied().unwrap_or(1) * opts.choices;
        let positions = (self.prompts.longest() + c.max_new_tokens).min(cfg.n_positions);
        let rows = opts.max_batch + opts.max_prompt_rows;
        let footprint = Footprint {
            prefix_cache: run.prefix_cache_bytes as u64,
            ..Footprint::estimate(cfg, c.dtype, c.kv_dtype, sequences, positions, rows)
        };
        let what = format!(
            "`throughput`{} of {} ({}, KV cache {}): {sequences} sequences of {positions} positions (the highest \
             level x --choices), {rows} rows a step (--max-batch {} + --max-prompt-rows {}), --prefix-cache-mib {}",
            if self.name.is_empty() { String::new() } else { format!(" {}", self.name) },
            c.model.as_deref().unwrap_or("the run's checkpoint"),
            c.dtype,
            c.kv_dtype,
            opts.max_batch,
            opts.max_prompt_rows,
            opts.prefix_cache_mib
        );
        Ok(memory::check(&footprint, &what)?)
    }
}

/// A prompt's check: a valid request (the engine's door) whose prompt and
/// `max_new_tokens` fit the context window; `what` names the prompt.
fn fits(cfg: &Gpt2Config, max_new_tokens: usize, what: &str, ids: &[u32]) -> Result<(), Box<dyn Error>> {
    let gen = GenerateOptions::greedy(max_new_tokens);
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

/// The sweep's record: its axes, each cell's settings and memory (their
/// analyses come with the report), and the order the cells ran.
fn sweep(plan: &RunPlan, cells: &[Cell], files: &[Files], all: &AllLoads) -> Sweep {
    let axes = plan
        .sweeps
        .iter()
        .map(|s| SweepAxis {
            axis: s.axis.name().into(),
            values: s.values.iter().map(ToString::to_string).collect(),
        })
        .collect();
    let cells = cells
        .iter()
        .zip(&all.cells)
        .map(|(c, memory)| {
            let (k, f) = (c.checkpoint, &files[c.k]);
            SweepCell {
                swept: c
                    .plan
                    .swept
                    .iter()
                    .map(|(a, v)| (a.name().to_string(), v.clone()))
                    .collect::<BTreeMap<_, _>>(),
                model_name: c.plan.model.clone().unwrap_or_else(|| f.source.clone()),
                model: model_info(&k.cfg),
                weights_source: f.source.clone(),
                weights_sha256: f.sha256.clone(),
                synthetic_weights: f.synthetic,
                dtype: c.plan.dtype.as_str().into(),
                kv_dtype: c.plan.kv_dtype.as_str().into(),
                prompt_tokens: c.plan.prompt_tokens,
                max_new_tokens: c.plan.max_new_tokens,
                concurrency_levels: std::iter::once(1).chain(c.plan.levels.iter().copied()).collect(),
                memory: memory.clone().unwrap_or_else(|| unmeasured(c.plan.dtype)),
                analysis: Default::default(),
            }
        })
        .collect();
    Sweep {
        axes,
        cells,
        order: all.order.clone(),
    }
}

/// The memory of a load that did not say.
fn unmeasured(dtype: Dtype) -> DtypeRun {
    DtypeRun {
        dtype: dtype.as_str().into(),
        packed_weight_bytes: None,
        rss_after_load_bytes: None,
        peak_rss_bytes: None,
        peak_rss_own: false,
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

/// What every cell of a run shares: the run's options, plan and progress,
/// and the compute pool.
struct Bench<'a> {
    opts: &'a Options,
    plan: &'a RunPlan,
    progress: &'a Progress,
    /// Each checkpoint's files, by its index.
    files: &'a [Files],
    pool: &'a Arc<rayon::ThreadPool>,
}

/// What the whole run measured, every cell and repetition.
#[derive(Default)]
struct AllLoads {
    /// By cell, then by repetition; in a sweep each names its cell.
    tests: Vec<TestResult>,
    /// Per dtype in the order first run, its largest memory over its loads.
    dtypes: Vec<DtypeRun>,
    /// Per cell, its largest memory over its loads.
    cells: Vec<Option<DtypeRun>>,
    /// Per repetition, the cells in the order they ran.
    order: Vec<Vec<usize>>,
    profiles: Vec<DtypeProfile>,
    engines: Vec<EngineTimes>,
}

/// What one cell's load measured.
struct CellMeasured {
    tests: Vec<TestResult>,
    run: DtypeRun,
    /// With `--profile`.
    profile: Option<DtypeProfile>,
    /// With `--probe`.
    engine: Option<EngineTimes>,
}

/// One cell's model as loaded, and the memory it took.
struct Loaded {
    model: Arc<Gpt2Model>,
    run: DtypeRun,
}

/// `into` widened to the larger of each memory figure of it and `m`.
fn widen(into: &mut DtypeRun, m: &DtypeRun) {
    into.rss_after_load_bytes = into.rss_after_load_bytes.max(m.rss_after_load_bytes);
    into.peak_rss_bytes = into.peak_rss_bytes.max(m.peak_rss_bytes);
    into.peak_rss_own &= m.peak_rss_own;
}

impl Bench<'_> {
    /// Every repetition, each running every cell. Repetitions outer, cells
    /// inner, their order rotating (repetition r starts at cell r): with
    /// several repetitions the cells alternate, so that their ratios are
    /// not one cell's quiet minute against another's busy one.
    fn every_load(&self, cells: &[Cell]) -> Result<AllLoads, Box<dyn Error>> {
        let plan = self.plan;
        let n = cells.len();
        let mut all = AllLoads {
            cells: vec![None; n],
            ..AllLoads::default()
        };
        let mut tests: Vec<(usize, TestResult)> = Vec::new();
        for rep in 0..plan.repetitions {
            let order: Vec<usize> = (0..n).map(|i| (rep + i) % n).collect();
            for &c in &order {
                let m = self.run_cell(&cells[c], c, rep)?;
                let cell = plan.is_sweep().then_some(c);
                tests.extend(m.tests.into_iter().map(|t| (c, TestResult { cell, ..t })));
                all.profiles.extend(m.profile);
                all.engines.extend(m.engine);
                match &mut all.cells[c] {
                    Some(d) => widen(d, &m.run),
                    None => all.cells[c] = Some(m.run.clone()),
                }
                match all.dtypes.iter_mut().find(|d| d.dtype == m.run.dtype) {
                    Some(d) => widen(d, &m.run),
                    None => all.dtypes.push(m.run),
                }
            }
            all.order.push(order);
        }
        // In the order asked for.
        let asked = |d: &str| plan.dtypes.iter().position(|p| p.as_str() == d);
        all.dtypes.sort_by_key(|d| asked(&d.dtype));
        tests.sort_by_key(|(c, t)| (*c, t.repetition));
        all.tests = tests.into_iter().map(|(_, t)| t).collect();
        Ok(all)
    }

    /// Loads `dtype`'s model from `dir`, its KV caches in `kv` (the
    /// caller's previous one is gone by then, and the resident high-water
    /// mark is reset first, so that this load's peak is its own).
    fn load(&self, dir: &Path, dtype: Dtype, kv: KvDtype) -> Result<Loaded, Box<dyn Error>> {
        let peak_rss_own = gpt2::memory::reset_peak_rss();
        let model = Arc::new(Gpt2Model::load_with(dir, dtype)?.with_kv_dtype(kv));
        let rss_after_load_bytes = profile::proc_status("VmRSS:").map(|kib| kib * 1024);
        let packed = model.weights.packed_bytes;
        self.progress.println(&format!(
            "dtype {dtype}, KV cache {kv}: packed weights {:.1} MiB, resident after load {}",
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

    /// Cell `c`'s part of repetition `rep`: its model loaded, the warmup
    /// and the repetition's tests on its workload, the memory it took, and
    /// in the first repetition its profile and, with `--probe`, its
    /// workloads timed alone. The model, its scheduler and its sessions are
    /// dropped on return.
    fn run_cell(&self, cell: &Cell, c: usize, rep: usize) -> Result<CellMeasured, Box<dyn Error>> {
        let (opts, plan, progress) = (self.opts, self.plan, self.progress);
        let dtype = cell.plan.dtype;
        if plan.is_sweep() {
            progress.println(&format!(
                "cell {c} ({}), repetition {} of {}",
                cell.plan.label(),
                rep + 1,
                plan.repetitions
            ));
        }
        let dir = &self.files[cell.k].dir;
        let Loaded { model, mut run } = self.load(dir, dtype, cell.plan.kv_dtype)?;
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
        let protocol = Protocol {
            opts,
            plan,
            progress,
            prompts: &cell.prompts,
            max_new_tokens: cell.plan.max_new_tokens,
            levels: &cell.plan.levels,
        };
        let d = dtype.as_str();
        let note = format!(
            "warmup ({dtype}): {} request(s) per mode, not counted",
            opts.warmup
        );
        protocol.warmup(&lanes, d, &note)?;
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
        let tests = protocol.repetition(&single, &lanes, d, rep)?;
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
        Ok(CellMeasured {
            tests,
            run,
            profile,
            engine,
        })
    }
}
