//! `throughput arrival`: what one long prompt's arrival does to the
//! inter-token latency (ITL) of the streams already decoding, in process,
//! on the scheduler itself.
//!
//! Each trial starts `--streams` sequences of `--stream-prompt-tokens`
//! each, lets every one emit `--warmup-tokens`, then records
//! `--baseline-tokens` more (the baseline window: nothing arrives); then
//! submits one `--prompt-tokens` prompt and records the streams' gaps from
//! its submission until `--after-tokens` tokens past its first token (the
//! arrival window). Every token is stamped when its stream's client thread
//! receives it, as a client sees it. The figure: the arrival window's ITL
//! p99 over the baseline's p50 (issue 34's target: at most 2). Then, with
//! the streams gone, the same prompt alone: its time to first token (TTFT),
//! which a budget for prompt rows beside decode rows must not hold back.
//!
//! `--max-step-rows A,B` measures each budget in every repetition, the
//! order rotating (A B, B A, ...), so a before / after comparison shares
//! the machine's moods; a budget of `max_batch + max_prompt_rows` or more is
//! the old policy (prompt rows up to `--max-prompt-rows` whatever decodes).
//! The steps the engine ran during the arrival's prefill (rows, decode
//! rows, time) come from a step observer. Percentiles are the benchmark's
//! one definition ([`stats::quantile`]).
//!
//! Issue 34's measurement (124M synthetic, f32, 2 threads):
//!
//! ```text
//! throughput arrival --synthetic --threads 2 --streams 15 --prompt-tokens 900 \
//!     --max-step-rows 28,160 --repetitions 3
//! ```

use std::error::Error;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use gpt2::rng::Rng;
use gpt2::scheduler::{Event, RequestHandle, StepObserver, StepStats};
use gpt2::{GenerateOptions, Gpt2Config, Gpt2Model, SamplingParams, Scheduler, SchedulerConfig};
use gpt2_hub as hub;
use serde::{Deserialize, Serialize};

use crate::{meta, run, stats};

/// Bump when a field of [`ArrivalReport`] changes meaning or disappears.
pub const ARRIVAL_SCHEMA_VERSION: u32 = 1;

/// Longest a trial waits for the engine (a stream's next token, the
/// arrival's first token) before it gives up as an error.
const STALL: Duration = Duration::from_secs(300);

/// The `throughput arrival` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ArrivalOptions {
    #[command(flatten)]
    pub weights: hub::WeightsArgs,
    #[command(flatten)]
    pub dtype: hub::DtypeArgs,
    /// Threads of the engine's pool [default: one per core].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Sequences decoding when the long prompt arrives.
    #[arg(long, default_value_t = 15)]
    pub streams: usize,
    /// Prompt tokens of each stream (synthetic, seeded).
    #[arg(long, default_value_t = 16)]
    pub stream_prompt_tokens: usize,
    /// Prompt tokens of the long arrival (synthetic, seeded).
    #[arg(long, default_value_t = 900)]
    pub prompt_tokens: usize,
    /// Tokens each stream emits before the baseline window.
    #[arg(long, default_value_t = 4)]
    pub warmup_tokens: usize,
    /// Gaps each stream records in the baseline window, before the arrival.
    #[arg(long, default_value_t = 20)]
    pub baseline_tokens: usize,
    /// Tokens each stream records after the arrival's first token (the
    /// arrival window runs from its submission to these).
    #[arg(long, default_value_t = 4)]
    pub after_tokens: usize,
    /// Trials per budget.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Most prompt rows prefilled per step.
    #[arg(long, default_value_t = 128)]
    pub max_prompt_rows: usize,
    /// The steps' row budgets while sequences decode, comma-separated, each
    /// measured in every repetition [default: the scheduler's].
    #[arg(long, value_delimiter = ',')]
    pub max_step_rows: Option<Vec<usize>>,
    /// Seed of the synthetic prompts.
    #[arg(long, default_value_t = 0)]
    pub prompt_seed: u64,
    /// Directory for the JSON (`throughput_arrival_<UTC>[_N].json`, never
    /// over an earlier file).
    #[arg(long, default_value = "data/benchmarks")]
    pub out_dir: PathBuf,
}

/// One trial: one budget, one repetition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub repetition: usize,
    pub max_step_rows: usize,
    /// The streams' gaps before the arrival, pooled.
    pub baseline_itl_ms: Gaps,
    /// The streams' gaps from the arrival's submission to `after_tokens`
    /// past its first token, pooled.
    pub arrival_itl_ms: Gaps,
    /// Arrival window's p99 over the baseline's p50.
    pub p99_over_baseline_p50: f64,
    /// Arrival window's largest gap over the baseline's p50.
    pub max_over_baseline_p50: f64,
    /// The long prompt's time to first token among the streams.
    pub arrival_ttft_ms: f64,
    /// The same prompt's time to first token alone (nothing else running).
    pub lone_ttft_ms: f64,
    /// The steps from the arrival's submission to the end of its prefill.
    pub arrival_steps: Vec<StepShape>,
    /// The time of a baseline step (the engine's, without the clients), p50.
    pub baseline_step_ms_p50: f64,
}

/// Gaps between consecutive tokens of each stream, pooled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gaps {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// Steps of one shape, in the order first seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepShape {
    pub rows: usize,
    pub decode_rows: usize,
    pub steps: usize,
    /// The engine's time for such a step (forward pass and sampling), p50.
    pub step_ms_p50: f64,
}

/// One budget over the repetitions: each figure's median.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetSummary {
    pub max_step_rows: usize,
    pub baseline_itl_p50_ms: f64,
    pub arrival_itl_p99_ms: f64,
    pub arrival_itl_max_ms: f64,
    pub p99_over_baseline_p50: f64,
    pub max_over_baseline_p50: f64,
    pub arrival_ttft_ms: f64,
    pub lone_ttft_ms: f64,
}

/// Everything one `throughput arrival` call wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArrivalReport {
    pub arrival_schema_version: u32,
    pub timestamp_utc: String,
    pub git_commit: String,
    pub cpu: String,
    pub weights: String,
    pub dtype: String,
    /// The KV cache's format (`--kv-dtype`).
    pub kv_dtype: String,
    pub threads: usize,
    pub streams: usize,
    pub stream_prompt_tokens: usize,
    pub prompt_tokens: usize,
    pub max_batch: usize,
    pub max_prompt_rows: usize,
    /// In the order the trials ran.
    pub trials: Vec<Trial>,
    /// One per budget, in the order asked for.
    pub summary: Vec<BudgetSummary>,
}

/// Runs the trials `opts` asks for, prints the table, writes the JSON.
pub fn arrival(opts: &ArrivalOptions) -> Result<ArrivalReport, Box<dyn Error>> {
    let budgets = opts
        .max_step_rows
        .clone()
        .unwrap_or_else(|| vec![SchedulerConfig::default().max_step_rows]);
    check(opts, &budgets)?;
    gpt2::files::check_writable_dir(&opts.out_dir)?;
    let resolved = hub::resolve(&opts.weights)?;
    let (config_path, _) = gpt2::weights::checkpoint_files(&resolved.dir);
    let cfg = Gpt2Config::from_file(&config_path)?;
    fits(opts, &cfg)?;
    let weights = resolved.source.describe(cfg.synthetic.as_ref());
    eprintln!("weights: {weights}");
    let model =
        Arc::new(Gpt2Model::load_with(&resolved.dir, opts.dtype.dtype)?.with_kv_dtype(opts.dtype.kv_dtype));
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(threads).build()?);
    let mut trials = Vec::new();
    for rep in 0..opts.repetitions {
        for i in 0..budgets.len() {
            let budget = budgets[(rep + i) % budgets.len()];
            eprintln!(
                "repetition {}/{}: max_step_rows {budget}",
                rep + 1,
                opts.repetitions
            );
            trials.push(trial(&model, &pool, opts, budget, rep)?);
        }
    }
    let report = ArrivalReport {
        arrival_schema_version: ARRIVAL_SCHEMA_VERSION,
        timestamp_utc: meta::utc_timestamp(SystemTime::now(), true),
        git_commit: meta::git_commit(),
        cpu: meta::cpu_model(),
        weights,
        dtype: opts.dtype.dtype.as_str().into(),
        kv_dtype: opts.dtype.kv_dtype.as_str().into(),
        threads,
        streams: opts.streams,
        stream_prompt_tokens: opts.stream_prompt_tokens,
        prompt_tokens: opts.prompt_tokens,
        max_batch: opts.max_batch,
        max_prompt_rows: opts.max_prompt_rows,
        summary: budgets.iter().map(|&b| summarize(&trials, b)).collect(),
        trials,
    };
    write(&report, opts)?;
    Ok(report)
}

/// The flags' own checks, each naming its flag.
fn check(opts: &ArrivalOptions, budgets: &[usize]) -> Result<(), String> {
    for (flag, v) in [
        ("--streams", opts.streams),
        ("--stream-prompt-tokens", opts.stream_prompt_tokens),
        ("--prompt-tokens", opts.prompt_tokens),
        ("--baseline-tokens", opts.baseline_tokens),
        ("--repetitions", opts.repetitions),
        ("--max-prompt-rows", opts.max_prompt_rows),
    ] {
        if v == 0 {
            return Err(format!("{flag} must be at least 1"));
        }
    }
    if opts.threads == Some(0) {
        return Err("--threads must be at least 1".into());
    }
    if opts.streams >= opts.max_batch {
        return Err(format!(
            "--streams {} leaves no batch slot for the arrival: --max-batch is {}",
            opts.streams, opts.max_batch
        ));
    }
    if budgets.is_empty() || budgets.contains(&0) {
        return Err(format!(
            "--max-step-rows must be at least 1 each, got {budgets:?}"
        ));
    }
    Ok(())
}

/// The prompts fit the model's context, the streams with room to decode.
fn fits(opts: &ArrivalOptions, cfg: &Gpt2Config) -> Result<(), String> {
    let n = cfg.n_positions;
    if opts.prompt_tokens >= n {
        return Err(format!(
            "--prompt-tokens {} must be below the model's context ({n}) to leave its first token room",
            opts.prompt_tokens
        ));
    }
    let least = opts.warmup_tokens + opts.baseline_tokens + opts.after_tokens + 2;
    if opts.stream_prompt_tokens + least > n {
        return Err(format!(
            "--stream-prompt-tokens {} leaves fewer than {least} tokens of the context ({n}) to decode",
            opts.stream_prompt_tokens
        ));
    }
    Ok(())
}

/// Every step the engine ran, with the time it ended.
#[derive(Debug, Default)]
struct StepLog(Mutex<Vec<(Instant, StepStats)>>);

impl StepObserver for StepLog {
    fn on_step(&self, step: &StepStats) {
        if let Ok(mut log) = self.0.lock() {
            log.push((Instant::now(), *step));
        }
    }
}

/// A stream's client: its thread stamps each token as it arrives.
struct Stream {
    times: Arc<Mutex<Vec<Instant>>>,
    /// Set once the thread has ended (the stream finished, failed or was cancelled).
    ended: Arc<AtomicBool>,
    /// Set by the trial: the thread cancels the stream at its next token.
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<(), String>>,
}

impl Stream {
    fn start(handle: RequestHandle) -> Stream {
        let times = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, e, s) = (Arc::clone(&times), Arc::clone(&ended), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let result = loop {
                match handle.recv() {
                    Some(Event::Token(_)) => {
                        t.lock().map_err(|e| e.to_string())?.push(Instant::now());
                        if s.load(Ordering::Relaxed) {
                            handle.cancel();
                        }
                    }
                    Some(Event::Done(Err(e))) => break Err(e.to_string()),
                    Some(_) => {}
                    // Done with a result, or cancelled (the engine drops the reply).
                    None => break Ok(()),
                }
            };
            e.store(true, Ordering::Relaxed);
            result
        });
        Stream {
            times,
            ended,
            stop,
            thread,
        }
    }

    fn times(&self) -> Vec<Instant> {
        self.times.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// Waits until `done` holds of every stream's token times, checking every
/// millisecond; an error if a stream ends first or nothing comes for
/// [`STALL`].
fn wait_until(streams: &[Stream], what: &str, done: impl Fn(&[Instant]) -> bool) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if streams.iter().all(|s| done(&s.times())) {
            return Ok(());
        }
        if let Some(i) = streams.iter().position(|s| s.ended.load(Ordering::Relaxed)) {
            return Err(format!(
                "stream {i} ended after {} tokens, before {what}",
                streams[i].times().len()
            ));
        }
        if start.elapsed() > STALL {
            return Err(format!("no progress in {STALL:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Submission to first token of `handle`, waiting for its end.
fn ttft(handle: RequestHandle, submitted: Instant) -> Result<Instant, String> {
    let mut first = None;
    while let Some(event) = handle.recv() {
        match event {
            Event::Token(_) if first.is_none() => first = Some(Instant::now()),
            Event::Done(Err(e)) => return Err(format!("the long prompt failed: {e}")),
            _ => {}
        }
    }
    first.ok_or_else(|| {
        format!(
            "the long prompt ended without a token after {:?}",
            submitted.elapsed()
        )
    })
}

fn greedy(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: SamplingParams::greedy(),
        seed: 0,
        ignore_eos: true,
        eos_token_id: None,
        logprobs: None,
        prompt_logprobs: None,
    }
}

/// One trial of `budget`: the streams' baseline, the arrival among them,
/// then the arrival alone.
fn trial(
    model: &Arc<Gpt2Model>,
    pool: &Arc<rayon::ThreadPool>,
    opts: &ArrivalOptions,
    budget: usize,
    rep: usize,
) -> Result<Trial, Box<dyn Error>> {
    let log = Arc::new(StepLog::default());
    let sched = Scheduler::new(
        Arc::clone(model),
        SchedulerConfig {
            max_batch: opts.max_batch,
            max_prompt_rows: opts.max_prompt_rows,
            max_step_rows: budget,
            pool: Some(Arc::clone(pool)),
            observer: Some(Arc::clone(&log) as Arc<dyn StepObserver>),
            ..SchedulerConfig::default()
        },
    )?;
    let (vocab, n_positions) = (model.config.vocab_size, model.config.n_positions);
    let mut rng = Rng::new(opts.prompt_seed);
    let mut prompt = |len: usize| -> Vec<u32> { (0..len).map(|_| rng.below(vocab) as u32).collect() };
    let long = prompt(opts.prompt_tokens);
    // The streams decode until cancelled: the whole context is theirs.
    let stream_new = n_positions - opts.stream_prompt_tokens;
    let mut streams = Vec::with_capacity(opts.streams);
    for _ in 0..opts.streams {
        let p = prompt(opts.stream_prompt_tokens);
        streams.push(Stream::start(sched.submit(p, greedy(stream_new))?));
    }
    let base_end = opts.warmup_tokens + opts.baseline_tokens + 1;
    wait_until(&streams, "the baseline window's end", |t| t.len() >= base_end)?;
    let baseline_done = Instant::now();
    let submitted = Instant::now();
    let first = ttft(sched.submit(long.clone(), greedy(1))?, submitted)?;
    wait_until(&streams, "the arrival window's end", |t| {
        t.iter().filter(|&&x| x > first).count() >= opts.after_tokens
    })?;
    for s in &streams {
        s.stop.store(true, Ordering::Relaxed);
    }
    let mut baseline = Vec::new();
    let mut during = Vec::new();
    for s in streams {
        let times = s.times();
        s.thread
            .join()
            .map_err(|_| "a stream's client thread panicked")??;
        let span = |from: usize, to: usize| -> Vec<f64> {
            (from..to)
                .map(|k| (times[k] - times[k - 1]).as_secs_f64() * 1e3)
                .collect::<Vec<f64>>()
        };
        baseline.extend(span(opts.warmup_tokens + 1, base_end));
        // From the first token after the submission to the `after`-th
        // after the first token: every gap that overlaps the arrival.
        let from = times.iter().position(|&x| x > submitted).unwrap_or(times.len());
        let to = times.iter().position(|&x| x > first).unwrap_or(times.len()) + opts.after_tokens;
        during.extend(span(from.max(1), to.min(times.len())));
    }
    // Alone: wait for the cancelled streams to be retired.
    while sched.stats().active > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let alone_at = Instant::now();
    let lone = ttft(sched.submit(long, greedy(1))?, alone_at)?;
    drop(sched);
    let steps = log.0.lock().map(|l| l.clone()).unwrap_or_default();
    let baseline_gaps = gaps(&baseline);
    let arrival_gaps = gaps(&during);
    Ok(Trial {
        repetition: rep,
        max_step_rows: budget,
        p99_over_baseline_p50: arrival_gaps.p99 / baseline_gaps.p50,
        max_over_baseline_p50: arrival_gaps.max / baseline_gaps.p50,
        baseline_itl_ms: baseline_gaps,
        arrival_itl_ms: arrival_gaps,
        arrival_ttft_ms: ms(first - submitted),
        lone_ttft_ms: ms(lone - alone_at),
        arrival_steps: shapes(&prefill_steps(&steps, submitted, opts.prompt_tokens)),
        baseline_step_ms_p50: median(
            steps
                .iter()
                .filter(|(t, s)| *t <= baseline_done && s.rows == s.decode_rows && s.rows == opts.streams)
                .map(|(_, s)| ms(s.elapsed))
                .collect(),
        ),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The median of `v` ([`stats::quantile`]'s, 0 when empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    stats::quantile(&v, 0.5)
}

fn gaps(values: &[f64]) -> Gaps {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Gaps {
        count: v.len(),
        p50: stats::quantile(&v, 0.5),
        p99: stats::quantile(&v, 0.99),
        max: v.last().copied().unwrap_or(0.0),
    }
}

/// The steps that ended after `submitted`, up to the one that took the
/// last of the arrival's `prompt` rows (the streams' prompts were done by
/// then, so every prompt row is the arrival's). By content, not by time:
/// the step that gives the first token is told of after the token is out.
fn prefill_steps(steps: &[(Instant, StepStats)], submitted: Instant, prompt: usize) -> Vec<StepStats> {
    let mut left = prompt;
    let mut out = Vec::new();
    for (_, s) in steps.iter().filter(|(t, _)| *t > submitted) {
        if left == 0 {
            break;
        }
        left = left.saturating_sub(s.rows - s.decode_rows);
        out.push(*s);
    }
    out
}

/// The steps grouped by shape, in the order each shape was first seen.
fn shapes(steps: &[StepStats]) -> Vec<StepShape> {
    let mut groups: Vec<(usize, usize, Vec<f64>)> = Vec::new();
    for s in steps {
        match groups.iter_mut().find(|g| (g.0, g.1) == (s.rows, s.decode_rows)) {
            Some(g) => g.2.push(ms(s.elapsed)),
            None => groups.push((s.rows, s.decode_rows, vec![ms(s.elapsed)])),
        }
    }
    groups
        .into_iter()
        .map(|(rows, decode_rows, t)| StepShape {
            rows,
            decode_rows,
            steps: t.len(),
            step_ms_p50: median(t),
        })
        .collect()
}

/// `budget`'s trials: each figure's median.
fn summarize(trials: &[Trial], budget: usize) -> BudgetSummary {
    let mine: Vec<&Trial> = trials.iter().filter(|t| t.max_step_rows == budget).collect();
    let median = |f: fn(&Trial) -> f64| median(mine.iter().map(|t| f(t)).collect());
    BudgetSummary {
        max_step_rows: budget,
        baseline_itl_p50_ms: median(|t| t.baseline_itl_ms.p50),
        arrival_itl_p99_ms: median(|t| t.arrival_itl_ms.p99),
        arrival_itl_max_ms: median(|t| t.arrival_itl_ms.max),
        p99_over_baseline_p50: median(|t| t.p99_over_baseline_p50),
        max_over_baseline_p50: median(|t| t.max_over_baseline_p50),
        arrival_ttft_ms: median(|t| t.arrival_ttft_ms),
        lone_ttft_ms: median(|t| t.lone_ttft_ms),
    }
}

/// The summary as a plain table (medians over the repetitions).
pub fn table(report: &ArrivalReport) -> String {
    let mut out = format!(
        "{} streams of {} prompt tokens, one {}-token arrival; {}, {} threads; medians over repetitions\n",
        report.streams, report.stream_prompt_tokens, report.prompt_tokens, report.dtype, report.threads
    );
    out.push_str(&format!(
        "{:>13} {:>12} {:>12} {:>12} {:>9} {:>9} {:>12} {:>12}\n",
        "max_step_rows",
        "ITL p50 ms",
        "arr. p99 ms",
        "arr. max ms",
        "p99/p50",
        "max/p50",
        "arr. TTFT ms",
        "lone TTFT ms"
    ));
    for s in &report.summary {
        out.push_str(&format!(
            "{:>13} {:>12.1} {:>12.1} {:>12.1} {:>9.2} {:>9.2} {:>12.0} {:>12.0}\n",
            s.max_step_rows,
            s.baseline_itl_p50_ms,
            s.arrival_itl_p99_ms,
            s.arrival_itl_max_ms,
            s.p99_over_baseline_p50,
            s.max_over_baseline_p50,
            s.arrival_ttft_ms,
            s.lone_ttft_ms
        ));
    }
    out.push_str(
        "steps during the arrival's prefill (rows = decode + prompt), first trial of each budget:\n",
    );
    for s in &report.summary {
        if let Some(t) = report.trials.iter().find(|t| t.max_step_rows == s.max_step_rows) {
            let shapes: Vec<String> = t
                .arrival_steps
                .iter()
                .map(|x| {
                    format!(
                        "{}x({}+{}, {:.1} ms)",
                        x.steps,
                        x.decode_rows,
                        x.rows - x.decode_rows,
                        x.step_ms_p50
                    )
                })
                .collect();
            out.push_str(&format!(
                "{:>13}: baseline step {:.1} ms; {}\n",
                s.max_step_rows,
                t.baseline_step_ms_p50,
                shapes.join(", ")
            ));
        }
    }
    out
}

/// Writes the JSON as a new file under `opts.out_dir`, prints the table.
fn write(report: &ArrivalReport, opts: &ArrivalOptions) -> Result<(), Box<dyn Error>> {
    let base = format!(
        "throughput_arrival_{}",
        meta::utc_timestamp(SystemTime::now(), false)
    );
    let json = serde_json::to_string_pretty(report)?;
    let paths = run::write_set(&opts.out_dir, &base, |_| {
        vec![("json", json.clone().into_bytes())]
    })?;
    print!("{}", table(report));
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    eprintln!("wrote {}", names.join(", "));
    Ok(())
}
