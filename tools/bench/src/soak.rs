//! `soak`: sustained mixed load in threads and batched modes. Checks that no
//! request fails, every request gets exactly its token count, and resident
//! memory, threads and open files stay flat after warm-up. It drives the
//! benchmark's load loop ([`run_test`]) on the in-process engine
//! ([`InProcess`]), one test per mode, with a mix of requests of its own
//! and memory samples taken as the loop runs.
//!
//! Warm-up is one request per client of the mix's longest length, all at
//! once, before the mix (each client's first act, before the loop's clock
//! starts): a KV cache's pages become resident as positions are first
//! written and stay so, so without it RSS climbs through the whole run as
//! each cache meets a longer prompt (bounded by concurrency x the longest
//! request, 66 MiB a cache at 900 tokens on 124M) and a flat-memory check
//! either fails or needs a slack that would hide a leak.
//!
//! `cargo run --release --bin soak` runs the size (500 requests at
//! concurrency 16, prompts of 1 to 900 tokens); CI runs a small one on the
//! tiny synthetic model. The run fails (exit status 1) if any check fails,
//! or a flag is out of range (named, before anything is loaded: at most 1024
//! clients, 100000 requests, and a warm-up whose KV caches fit the memory
//! available), or the `--json` file cannot be written (checked before the
//! run: its directory must take a new file, and an existing file is never
//! replaced). On a terminal a progress bar counts each mode's requests;
//! elsewhere a line goes to stderr every 50 requests.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use gpt2::rng::Rng;
use gpt2::{Gpt2Config, Gpt2Model, Scheduler, SchedulerConfig};
use gpt2_hub::{self as hub, DtypeArgs, KernelArgs, WeightsArgs};

use crate::failure::{Cause, Failure};
use crate::in_process::{Client, InProcess, Mode, PoolLayout};
use crate::progress::Progress;
use crate::run::ModeChoice;
use crate::runner::{run_test, Backend, Load, Observer, Reply, MAX_CLIENTS};
use crate::RequestRecord;

/// The `soak` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    #[command(flatten)]
    pub weights: WeightsArgs,
    /// The kernels (the binary sets them before [`run`]).
    #[command(flatten)]
    pub kernels: KernelArgs,
    #[command(flatten)]
    pub dtype: DtypeArgs,
    /// Requests per mode (at most 100000).
    #[arg(long, default_value_t = 500)]
    pub requests: usize,
    /// Client threads, each with a request in flight (at most 1024, and the
    /// warm-up's KV caches must fit the memory available).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Prompt lengths are drawn from 1..=this (capped by the context window).
    #[arg(long, default_value_t = 900)]
    pub max_prompt: usize,
    /// max_new_tokens is drawn from 1..=this (capped so the request fits the window).
    #[arg(long, default_value_t = 32)]
    pub max_new: usize,
    #[arg(long, default_value = "both", value_parser = mode_names())]
    pub mode: ModeChoice,
    /// Seed of the request mix.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Allowed RSS growth from the middle to the last sample under load, in MiB.
    #[arg(long, default_value_t = 64.0)]
    pub rss_slack_mib: f64,
    /// Also write the summary as JSON to this file: a new one (an existing
    /// file is refused, before the run, and never replaced).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Testing only: leak this many KiB (written, so resident) per request,
    /// to show that the memory check fails on a leak.
    #[arg(long, hide = true, default_value_t = 0)]
    pub leak_kib_per_request: usize,
}

/// `--mode`: the names of [`ModeChoice`], listed plainly in the help.
fn mode_names() -> impl clap::builder::TypedValueParser<Value = ModeChoice> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["threads", "batched", "both"])
        .try_map(|name| <ModeChoice as clap::ValueEnum>::from_str(&name, false))
}

/// Most requests per mode (`--requests`): the mix is drawn up front, up to
/// a context window of prompt tokens each.
const MAX_REQUESTS: usize = 100_000;
/// Most KiB `--leak-kib-per-request` may leak.
const MAX_LEAK_KIB: usize = 64 << 10;
const GIB: f64 = (1u64 << 30) as f64;

/// Resident memory, threads and open files of this process.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Sample {
    pub rss_mib: f64,
    pub threads: usize,
    pub fds: usize,
}

/// What one mode's soak saw, and whether its checks passed.
#[derive(Debug, serde::Serialize)]
pub struct ModeSummary {
    pub mode: &'static str,
    pub requests: usize,
    pub failed: usize,
    pub wrong_count: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
    /// Positions of each warm-up request (the mix's longest), one per client.
    pub warmup_positions: usize,
    /// The KV caches at that length, all clients together: what warm-up
    /// makes resident once, so that the mix adds nothing to it.
    pub kv_caches_mib: f64,
    /// After warm-up, before the mix.
    pub start: Sample,
    pub middle: Sample,
    /// The last sample under load (when the last `concurrency` requests start).
    pub late: Sample,
    /// After the mode's threads, sessions and scheduler are gone.
    pub end: Sample,
    pub checks_passed: bool,
    pub problems: Vec<String>,
}

/// Runs the soak `opts` asks for: every mode in turn on one model, the
/// summary as JSON on stdout (and in `--json`), PASS or FAIL on stderr.
/// Whether every check passed; `Err` for a bad flag or a run that could not
/// start.
pub fn run(opts: &Options) -> Result<bool, Box<dyn Error>> {
    check_flags(opts)?;
    if let Some(path) = &opts.json {
        check_json_path(path)?;
    }
    let resolved = hub::resolve(&opts.weights)?;
    let (dtype, kv) = (opts.dtype.dtype, opts.dtype.kv_dtype);
    eprintln!("dtype: {dtype} (linear layers' weights), KV cache {kv}");
    let model = Arc::new(Gpt2Model::load_with(&resolved.dir, dtype)?.with_kv_dtype(kv));
    let weights_source = resolved.source.describe(model.config.synthetic.as_ref());
    eprintln!("weights: {weights_source}");
    let mix = Mix::draw(opts, &model.config);
    check_memory(opts, &mix, &model.config)?;
    // One pool of a thread per core, for every mode.
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().build()?);
    let mut summaries = Vec::new();
    for mode in opts.mode.modes() {
        summaries.push(soak(mode, opts, &model, &pool, &mix)?);
    }
    let ok = summaries.iter().all(|s| s.checks_passed);
    let json = serde_json::json!({
        "weights_source": weights_source,
        "dtype": model.dtype().as_str(),
        "requests_per_mode": opts.requests,
        "concurrency": opts.concurrency,
        "max_prompt": opts.max_prompt,
        "max_new": opts.max_new,
        "seed": opts.seed,
        "modes": summaries,
        "passed": ok,
    });
    if let Some(path) = &opts.json {
        gpt2::files::write_new(path, serde_json::to_string_pretty(&json)?.as_bytes())
            .map_err(|e| format!("--json {}: {e}", path.display()))?;
    }
    println!("{}", serde_json::to_string_pretty(&json)?);
    eprintln!("{}", if ok { "soak: PASS" } else { "soak: FAIL" });
    Ok(ok)
}

/// Checks the flags a run needs before anything is loaded; errors name the flag.
fn check_flags(opts: &Options) -> Result<(), String> {
    for (flag, v) in [
        ("--requests", opts.requests),
        ("--concurrency", opts.concurrency),
        ("--max-prompt", opts.max_prompt),
        ("--max-new", opts.max_new),
    ] {
        if v == 0 {
            return Err(format!("{flag} must be at least 1, not 0"));
        }
    }
    if opts.concurrency > MAX_CLIENTS {
        return Err(format!(
            "--concurrency {}: that many client threads measure thread creation, not the engine; at most \
             {MAX_CLIENTS}",
            opts.concurrency
        ));
    }
    if opts.requests > MAX_REQUESTS {
        return Err(format!(
            "--requests {}: at most {MAX_REQUESTS} per mode (the mix is drawn before the run)",
            opts.requests
        ));
    }
    if !(opts.rss_slack_mib.is_finite() && opts.rss_slack_mib >= 0.0) {
        return Err(format!(
            "--rss-slack-mib must be a finite number of MiB >= 0, not {}",
            opts.rss_slack_mib
        ));
    }
    if opts.leak_kib_per_request > MAX_LEAK_KIB {
        return Err(format!("--leak-kib-per-request: at most {MAX_LEAK_KIB}"));
    }
    Ok(())
}

/// Checks, before the run, that the summary can be written to `path`: a
/// new file (none there yet) in a directory that takes one.
fn check_json_path(path: &Path) -> Result<(), String> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(format!(
            "--json {}: the file exists; soak writes a new file and never replaces one",
            path.display()
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    gpt2::files::check_writable_dir(dir).map_err(|e| format!("--json {}: {e}", path.display()))
}

/// The warm-up makes every client's KV cache resident for the mix's
/// longest request at once: refused, by name, where that cannot fit.
fn check_memory(opts: &Options, mix: &Mix, cfg: &Gpt2Config) -> Result<(), String> {
    let positions = mix.warmup_positions();
    let kv = kv_cache_bytes(opts.concurrency, positions, cfg, opts.dtype.kv_dtype);
    match gpt2::profile::mem_available_bytes() {
        Some(avail) if kv > avail => Err(format!(
            "--concurrency {}: the warm-up holds {} KV caches of {positions} positions, {:.1} GiB, more \
             than the {:.1} GiB of memory available; lower --concurrency or --max-prompt",
            opts.concurrency,
            opts.concurrency,
            kv as f64 / GIB,
            avail as f64 / GIB
        )),
        _ => Ok(()),
    }
}

/// The requests of every mode: prompts and how many tokens each must
/// generate, request i being `prompts[i]` and `max_new[i]`.
struct Mix {
    prompts: Vec<Vec<u32>>,
    max_new: Vec<usize>,
}

impl Mix {
    /// A seeded mix: prompt lengths uniform in 1..=max_prompt, max_new_tokens
    /// uniform in 1..=max_new, each capped so prompt + new tokens fit the window.
    fn draw(opts: &Options, cfg: &Gpt2Config) -> Mix {
        let mut rng = Rng::new(opts.seed);
        let max_prompt = opts.max_prompt.min(cfg.n_positions - 1);
        let mut mix = Mix {
            prompts: Vec::with_capacity(opts.requests),
            max_new: Vec::with_capacity(opts.requests),
        };
        for _ in 0..opts.requests {
            let len = 1 + rng.below(max_prompt);
            mix.prompts
                .push((0..len).map(|_| rng.below(cfg.vocab_size) as u32).collect());
            mix.max_new
                .push((1 + rng.below(opts.max_new)).min(cfg.n_positions - len + 1));
        }
        mix
    }

    /// The request of the most positions (the last of them, on a tie): the warm-up's.
    fn longest(&self) -> usize {
        (0..self.prompts.len())
            .max_by_key(|&i| self.prompts[i].len() + self.max_new[i])
            .expect("at least one request")
    }

    /// The positions the warm-up request writes.
    fn warmup_positions(&self) -> usize {
        let i = self.longest();
        self.prompts[i].len() + self.max_new[i] - 1
    }
}

/// One mode's soak: the mix through the load loop from `concurrency`
/// clients, each warmed up first, then the checks on what it measured.
fn soak(
    mode: Mode,
    opts: &Options,
    model: &Arc<Gpt2Model>,
    pool: &Arc<rayon::ThreadPool>,
    mix: &Mix,
) -> Result<ModeSummary, Box<dyn Error>> {
    let name = mode.name();
    let scheduler = (mode == Mode::Batched)
        .then(|| {
            Scheduler::new(
                Arc::clone(model),
                SchedulerConfig {
                    max_batch: opts.concurrency,
                    pool: Some(Arc::clone(pool)),
                    ..SchedulerConfig::default()
                },
            )
        })
        .transpose()?;
    let requests = mix.prompts.len();
    let watch = Watch::new(name, requests, opts.concurrency);
    let warmup = mix.longest();
    let backend = Soaked {
        engine: InProcess {
            model,
            mode,
            layout: PoolLayout::Shared,
            threads: pool.current_num_threads(),
            shared_pool: pool,
            scheduler: scheduler.as_ref(),
            profile: None,
        },
        warmup: (&mix.prompts[warmup], mix.max_new[warmup]),
        leak_kib: opts.leak_kib_per_request,
        warmup_failed: AtomicUsize::new(0),
        watch: &watch,
    };
    let load = Load {
        name: "soak",
        mode: name,
        dtype: model.dtype().as_str(),
        concurrency: opts.concurrency,
        requests,
        prompts: &mix.prompts,
        max_new_tokens: &mix.max_new,
        choices: 1,
        arrivals: None,
    };
    let t0 = Instant::now();
    let (_, records) = run_test(&backend, &load, &watch)?;
    let seconds = t0.elapsed().as_secs_f64();
    watch.progress.finish();
    let warmup_failed = backend.warmup_failed.into_inner();
    drop(scheduler);
    let ran = Ran {
        records,
        warmup_failed,
        seconds,
        end: sample(),
    };
    let positions = mix.warmup_positions();
    let kv_caches_mib = kv_cache_bytes(opts.concurrency, positions, &model.config, model.kv_dtype()) as f64
        / (1u64 << 20) as f64;
    let summary = watch.summary(&ran, opts.rss_slack_mib, positions, kv_caches_mib);
    log_summary(&summary);
    Ok(summary)
}

/// What one mode's test left: its records (in index order), its warm-up
/// failures, the time it took (warm-up included) and the sample after it.
struct Ran {
    records: Vec<RequestRecord>,
    warmup_failed: usize,
    seconds: f64,
    end: Sample,
}

/// The engine as soak drives it: each client's first request, before the
/// loop's clock starts, is the warm-up (the mix's longest request), and
/// every request, the warm-up's too, may leak memory (testing).
struct Soaked<'a> {
    engine: InProcess<'a>,
    /// The warm-up's prompt and token count.
    warmup: (&'a [u32], usize),
    /// `--leak-kib-per-request`.
    leak_kib: usize,
    /// Warm-up requests that failed: each counts as a failed request.
    warmup_failed: AtomicUsize,
    watch: &'a Watch,
}

impl Backend for Soaked<'_> {
    type Client = Client;

    fn connect(&self, client: usize, prompts: &[Vec<u32>]) -> Client {
        let mut state = self.engine.connect(client, prompts);
        let (prompt, max_new_tokens) = self.warmup;
        if let Err(e) = self.send(&mut state, prompt, max_new_tokens, 1) {
            self.warmup_failed.fetch_add(1, Ordering::Relaxed);
            self.watch
                .progress
                .println(&format!("[{}] warm-up request FAILED: {e}", self.watch.mode));
        }
        state
    }

    fn send(
        &self,
        client: &mut Client,
        prompt: &[u32],
        max_new_tokens: usize,
        choices: usize,
    ) -> Result<Reply, Failure> {
        let reply = self.engine.send(client, prompt, max_new_tokens, choices);
        if self.leak_kib > 0 {
            std::mem::forget(vec![1u8; self.leak_kib << 10]);
        }
        reply
    }

    fn disconnect(&self, client: Client) {
        self.engine.disconnect(client);
    }
}

/// What soak sees of its mode's test: memory samples after warm-up (when
/// the clock starts), at half way and when the last `concurrency` requests
/// start; each failure on screen, and the requests counted.
struct Watch {
    mode: &'static str,
    progress: Progress,
    requests: usize,
    half: usize,
    late: usize,
    /// (request index, or [`START`]; the sample then).
    samples: Mutex<Vec<(usize, Sample)>>,
}

/// The key of the sample taken after warm-up (the others: a request index).
const START: usize = usize::MAX;

impl Watch {
    fn new(mode: &'static str, requests: usize, concurrency: usize) -> Watch {
        let half = requests / 2;
        Watch {
            mode,
            progress: Progress::new(requests as u64, &format!("{mode} requests")),
            requests,
            half,
            late: requests.saturating_sub(concurrency).max(half),
            samples: Mutex::new(Vec::new()),
        }
    }

    fn take_sample(&self, key: usize) {
        let s = sample();
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((key, s));
    }

    /// The summary of what the mode's test left, with the checks: no
    /// failure, no wrong count, memory flat (within `slack_mib`) from the
    /// start and the middle to the late sample, and threads and open files
    /// no more late or after than at the start.
    fn summary(&self, ran: &Ran, slack_mib: f64, warmup_positions: usize, kv_caches_mib: f64) -> ModeSummary {
        let taken = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let (records, end) = (&ran.records, ran.end);
        let at = |n: usize| taken.iter().find(|(i, _)| *i == n).map_or(end, |(_, s)| *s);
        let (start, middle, late) = (at(START), at(self.half), at(self.late));
        let wrong = records.iter().filter(|r| wrong_count(r)).count();
        let failed = ran.warmup_failed + records.iter().filter(|r| r.error.is_some()).count() - wrong;
        let mut problems = Vec::new();
        if failed > 0 {
            problems.push(format!("{failed} requests failed"));
        }
        if wrong > 0 {
            problems.push(format!("{wrong} requests got the wrong token count"));
        }
        problems.extend(growth(slack_mib, [start, middle, late, end]));
        ModeSummary {
            mode: self.mode,
            requests: self.requests,
            failed,
            wrong_count: wrong,
            generated_tokens: records
                .iter()
                .filter(|r| r.error.is_none())
                .map(|r| r.generated_tokens)
                .sum(),
            seconds: ran.seconds,
            warmup_positions,
            kv_caches_mib,
            start,
            middle,
            late,
            end,
            checks_passed: problems.is_empty(),
            problems,
        }
    }
}

impl Observer for Watch {
    fn started(&self) {
        self.take_sample(START);
    }

    fn taken(&self, index: usize) {
        if index == self.half || index == self.late {
            self.take_sample(index);
        }
    }

    fn waiting(&self, line: &str) {
        self.progress.status(line);
    }

    fn ended(&self, _load: &Load, rec: &RequestRecord) {
        let (i, mode) = (rec.index, self.mode);
        if let Some(e) = &rec.error {
            let failed = if wrong_count(rec) { "" } else { " FAILED" };
            self.progress
                .println(&format!("[{mode}] request {i}{failed}: {e}"));
        }
        self.progress.inc(1);
        // A bar counts the requests itself; plain stderr gets a line every 50.
        if (i + 1) % 50 == 0 && !self.progress.is_bar() {
            self.progress
                .status(&format!("[{mode}] {} / {} requests", i + 1, self.requests));
        }
    }
}

/// Whether a failed request answered, but with the wrong number of tokens
/// (the runner's short or long), rather than not at all.
fn wrong_count(r: &RequestRecord) -> bool {
    r.cause.as_ref().map(Failure::cause) == Some(Cause::WrongCount)
}

/// The memory and count checks on the `[start, middle, late, end]`
/// samples: RSS may grow by at most `slack_mib` from the start or the middle
/// to late; under load the thread and file counts must not grow, and after
/// the mode they must not exceed the start (its client threads and engine
/// are gone by then).
fn growth(slack_mib: f64, [start, middle, late, end]: [Sample; 4]) -> Vec<String> {
    let mut problems = Vec::new();
    for (when, before) in [("after warm-up", start), ("middle", middle)] {
        if late.rss_mib - before.rss_mib > slack_mib {
            problems.push(format!(
                "RSS grew from {:.0} MiB ({when}) to {:.0} MiB (late), more than {} MiB",
                before.rss_mib, late.rss_mib, slack_mib
            ));
        }
    }
    for (what, s0, s1, s2) in [
        ("threads", start.threads, late.threads, end.threads),
        ("open files", start.fds, late.fds, end.fds),
    ] {
        if s1 > s0 || s2 > s0 {
            problems.push(format!("{what} grew: {s0} at the start, {s1} late, {s2} after"));
        }
    }
    problems
}

/// The mode's one line on stderr.
fn log_summary(s: &ModeSummary) {
    let (start, middle, late, end) = (s.start, s.middle, s.late, s.end);
    eprintln!(
        "[{}] {} requests in {:.1} s: {} failed, {} wrong counts; start / middle / late / after: RSS \
         {:.0} / {:.0} / {:.0} / {:.0} MiB; threads {} / {} / {} / {}; fds {} / {} / {} / {}",
        s.mode,
        s.requests,
        s.seconds,
        s.failed,
        s.wrong_count,
        start.rss_mib,
        middle.rss_mib,
        late.rss_mib,
        end.rss_mib,
        start.threads,
        middle.threads,
        late.threads,
        end.threads,
        start.fds,
        middle.fds,
        late.fds,
        end.fds
    );
}

/// Resident bytes of `caches` KV caches of `positions` positions each.
fn kv_cache_bytes(caches: usize, positions: usize, cfg: &Gpt2Config, kv: gpt2::KvDtype) -> u64 {
    (caches as u64) * gpt2::KvCache::resident_bytes(cfg, kv, positions) as u64
}

/// Resident memory, threads and open files of this process (Linux /proc;
/// zeros elsewhere).
fn sample() -> Sample {
    let field = |name: &str| gpt2::profile::proc_status(name).unwrap_or(0);
    Sample {
        rss_mib: field("VmRSS:") as f64 / 1024.0,
        threads: field("Threads:") as usize,
        fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()),
    }
}
