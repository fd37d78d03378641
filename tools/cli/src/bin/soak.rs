//! `soak`: sustained mixed load in threads and batched modes. Checks that no
//! request fails, every request gets exactly its token count, and resident
//! memory, threads and open files stay flat after warm-up.
//!
//! Warm-up is one request per client of the mix's longest length, all at
//! once, before the mix: a KV cache's pages become resident as positions are
//! first written and stay so, so without it RSS climbs through the whole run
//! as each cache meets a longer prompt (bounded by concurrency x the longest
//! request, 66 MiB a cache at 900 tokens on 124M) and a flat-memory check
//! either fails or needs a slack that would hide a leak.
//!
//! `cargo run --release --bin soak` runs the size (500 requests at
//! concurrency 16, prompts of 1 to 900 tokens); CI runs a small one on the
//! tiny synthetic model. Exit status 1 if any check fails, or a flag is out
//! of range (named, before anything is loaded: at most 1024 clients, 100000
//! requests, and a warm-up whose KV caches fit the memory available), or
//! the `--json` file cannot be written (checked before the run: its
//! directory must take a new file, and an existing file is never replaced).
//! On a terminal a progress bar counts each mode's requests; elsewhere a line
//! goes to stderr every 50 requests.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use gpt2::rng::Rng;
use gpt2::{GenerateOptions, Gpt2Model, Scheduler, SchedulerConfig, Session};
use gpt2_bench::progress::Progress;
use gpt2_hub::{self as hub, DtypeArgs, WeightsArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Threads,
    Batched,
    Both,
}

#[derive(Parser, Debug)]
#[command(
    name = "soak",
    version,
    about = "Sustained mixed load: failures, exact token counts, RSS/threads/fds"
)]
struct Args {
    #[command(flatten)]
    weights: WeightsArgs,
    #[command(flatten)]
    kernels: gpt2_hub::KernelArgs,
    #[command(flatten)]
    dtype: DtypeArgs,
    /// Requests per mode (at most 100000).
    #[arg(long, default_value_t = 500)]
    requests: usize,
    /// Client threads, each with a request in flight (at most 1024, and the
    /// warm-up's KV caches must fit the memory available).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Prompt lengths are drawn from 1..=this (capped by the context window).
    #[arg(long, default_value_t = 900)]
    max_prompt: usize,
    /// max_new_tokens is drawn from 1..=this (capped so the request fits the window).
    #[arg(long, default_value_t = 32)]
    max_new: usize,
    #[arg(long, value_enum, default_value = "both")]
    mode: ModeArg,
    /// Seed of the request mix.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Allowed RSS growth from the middle to the last sample under load, in MiB.
    #[arg(long, default_value_t = 64.0)]
    rss_slack_mib: f64,
    /// Also write the summary as JSON to this file: a new one (an existing
    /// file is refused, before the run, and never replaced).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Testing only: leak this many KiB (written, so resident) per request,
    /// to show that the memory check fails on a leak.
    #[arg(long, hide = true, default_value_t = 0)]
    leak_kib_per_request: usize,
}

/// One request of the mix: prompt tokens and how many to generate.
struct Job {
    prompt: Vec<u32>,
    max_new: usize,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Sample {
    rss_mib: f64,
    threads: usize,
    fds: usize,
}

#[derive(Debug, serde::Serialize)]
struct ModeSummary {
    mode: &'static str,
    requests: usize,
    failed: usize,
    wrong_count: usize,
    generated_tokens: usize,
    seconds: f64,
    /// Positions of each warm-up request (the mix's longest), one per client.
    warmup_positions: usize,
    /// The KV caches at that length, all clients together: what warm-up
    /// makes resident once, so that the mix adds nothing to it.
    kv_caches_mib: f64,
    /// After warm-up, before the mix.
    start: Sample,
    middle: Sample,
    /// The last sample under load (when the last `concurrency` requests start).
    late: Sample,
    /// After the mode's threads, sessions and scheduler are gone.
    end: Sample,
    checks_passed: bool,
    problems: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.kernels.init() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Most client threads (`--concurrency`), as `throughput --levels`.
const MAX_CONCURRENCY: usize = gpt2_bench::runner::MAX_CLIENTS;
/// Most requests per mode (`--requests`): the mix is drawn up front, up to
/// a context window of prompt tokens each.
const MAX_REQUESTS: usize = 100_000;
/// Most KiB `--leak-kib-per-request` may leak.
const MAX_LEAK_KIB: usize = 64 << 10;

/// Checks the flags a run needs before anything is loaded; errors name the flag.
fn check_flags(args: &Args) -> Result<(), String> {
    for (flag, v) in [
        ("--requests", args.requests),
        ("--concurrency", args.concurrency),
        ("--max-prompt", args.max_prompt),
        ("--max-new", args.max_new),
    ] {
        if v == 0 {
            return Err(format!("{flag} must be at least 1, not 0"));
        }
    }
    if args.concurrency > MAX_CONCURRENCY {
        return Err(format!(
            "--concurrency {}: that many client threads measure thread creation, not the engine; at most \
             {MAX_CONCURRENCY}",
            args.concurrency
        ));
    }
    if args.requests > MAX_REQUESTS {
        return Err(format!(
            "--requests {}: at most {MAX_REQUESTS} per mode (the mix is drawn before the run)",
            args.requests
        ));
    }
    if !(args.rss_slack_mib.is_finite() && args.rss_slack_mib >= 0.0) {
        return Err(format!(
            "--rss-slack-mib must be a finite number of MiB >= 0, not {}",
            args.rss_slack_mib
        ));
    }
    if args.leak_kib_per_request > MAX_LEAK_KIB {
        return Err(format!("--leak-kib-per-request: at most {MAX_LEAK_KIB}"));
    }
    Ok(())
}

/// Checks, before the run, that the summary can be written to `path`: a
/// new file (none there yet) in a directory that takes one.
fn check_json_path(path: &std::path::Path) -> Result<(), String> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(format!(
            "--json {}: the file exists; soak writes a new file and never replaces one",
            path.display()
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    gpt2::files::check_writable_dir(dir).map_err(|e| format!("--json {}: {e}", path.display()))
}

fn run(args: &Args) -> Result<bool, Box<dyn std::error::Error>> {
    check_flags(args)?;
    if let Some(path) = &args.json {
        check_json_path(path)?;
    }
    let resolved = hub::resolve(&args.weights)?;
    let dtype = args.dtype.dtype;
    eprintln!("dtype: {dtype} (linear layers' weights)");
    let model = Arc::new(Gpt2Model::load_with(&resolved.dir, dtype)?);
    eprintln!(
        "weights: {}",
        resolved.source.describe(model.config.synthetic.as_ref())
    );
    let jobs = mix(args, &model);
    // The warm-up makes every client's KV cache resident for the mix's
    // longest request at once: refused, by name, where that cannot fit.
    let warmup_positions = jobs
        .iter()
        .map(|j| j.prompt.len() + j.max_new - 1)
        .max()
        .unwrap_or(0);
    let kv = kv_cache_bytes(args.concurrency, warmup_positions, &model.config);
    if let Some(avail) = gpt2::profile::mem_available_bytes() {
        if kv > avail {
            return Err(format!(
                "--concurrency {}: the warm-up holds {} KV caches of {warmup_positions} positions, {:.1} GiB, more \
                 than the {:.1} GiB of memory available; lower --concurrency or --max-prompt",
                args.concurrency,
                args.concurrency,
                kv as f64 / GIB,
                avail as f64 / GIB
            )
            .into());
        }
    }
    let modes: &[&'static str] = match args.mode {
        ModeArg::Threads => &["threads"],
        ModeArg::Batched => &["batched"],
        ModeArg::Both => &["threads", "batched"],
    };
    let mut summaries = Vec::new();
    for &mode in modes {
        summaries.push(soak(mode, args, &model, &jobs)?);
    }
    let ok = summaries.iter().all(|s| s.checks_passed);
    let json = serde_json::json!({
        "weights_source": resolved.source.describe(model.config.synthetic.as_ref()),
        "dtype": model.dtype().as_str(),
        "requests_per_mode": args.requests,
        "concurrency": args.concurrency,
        "max_prompt": args.max_prompt,
        "max_new": args.max_new,
        "seed": args.seed,
        "modes": summaries,
        "passed": ok,
    });
    if let Some(path) = &args.json {
        gpt2::files::write_new(path, serde_json::to_string_pretty(&json)?.as_bytes())
            .map_err(|e| format!("--json {}: {e}", path.display()))?;
    }
    println!("{}", serde_json::to_string_pretty(&json)?);
    eprintln!("{}", if ok { "soak: PASS" } else { "soak: FAIL" });
    Ok(ok)
}

/// A seeded mix: prompt lengths uniform in 1..=max_prompt, max_new_tokens
/// uniform in 1..=max_new, each capped so prompt + new tokens fit the window.
fn mix(args: &Args, model: &Gpt2Model) -> Vec<Job> {
    let cfg = &model.config;
    let mut rng = Rng::new(args.seed);
    let max_prompt = args.max_prompt.min(cfg.n_positions - 1);
    (0..args.requests)
        .map(|_| {
            let len = 1 + rng.below(max_prompt);
            let prompt = (0..len).map(|_| rng.below(cfg.vocab_size) as u32).collect();
            let max_new = (1 + rng.below(args.max_new)).min(cfg.n_positions - len + 1);
            Job { prompt, max_new }
        })
        .collect()
}

fn soak(
    mode: &'static str,
    args: &Args,
    model: &Arc<Gpt2Model>,
    jobs: &[Job],
) -> Result<ModeSummary, Box<dyn std::error::Error>> {
    let scheduler = (mode == "batched")
        .then(|| {
            Scheduler::new(
                Arc::clone(model),
                SchedulerConfig {
                    max_batch: args.concurrency,
                    ..SchedulerConfig::default()
                },
            )
        })
        .transpose()?;
    let next = AtomicUsize::new(0);
    let (failed, wrong, tokens) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
    let samples = std::sync::Mutex::new(Vec::new());
    // Warm-up (see the module doc): every client runs the mix's longest
    // request at once, so that each KV cache (a session's, or one of the
    // scheduler's pool of `concurrency`) has its pages for every position
    // the mix will write, and buffers and allocator arenas come to size.
    // `start` is sampled after it, `middle` at half way, `late` when the
    // last `concurrency` requests start: memory is flat if `late` is both.
    let longest = jobs
        .iter()
        .max_by_key(|j| j.prompt.len() + j.max_new)
        .expect("at least one request");
    let warmup_positions = longest.prompt.len() + longest.max_new - 1;
    let kv_bytes = kv_cache_bytes(args.concurrency, warmup_positions, &model.config);
    let warmed = std::sync::Barrier::new(args.concurrency);
    let half = jobs.len() / 2;
    let late = jobs.len().saturating_sub(args.concurrency).max(half);
    let progress = Progress::new(jobs.len() as u64, &format!("{mode} requests"));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..args.concurrency {
            s.spawn(|| {
                let mut session: Option<Session> = None;
                let mut run_job = |job: &Job| {
                    let opts = GenerateOptions::greedy(job.max_new);
                    let result = match &scheduler {
                        Some(sched) => sched.generate(job.prompt.clone(), opts),
                        None => match session {
                            Some(ref mut s) => Ok(s),
                            None => Session::new(model, 128).map(|s| session.insert(s)),
                        }
                        .and_then(|s| s.generate(model, &job.prompt, &opts, |_| {})),
                    };
                    if args.leak_kib_per_request > 0 {
                        std::mem::forget(vec![1u8; args.leak_kib_per_request << 10]);
                    }
                    result
                };
                let warm_up = run_job(longest);
                if let Err(e) = &warm_up {
                    failed.fetch_add(1, Ordering::Relaxed);
                    progress.println(&format!("[{mode}] warm-up request FAILED: {e}"));
                }
                if warmed.wait().is_leader() {
                    let start = sample();
                    samples
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((START, start));
                }
                warmed.wait();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= jobs.len() {
                        break;
                    }
                    if i == half || i == late {
                        samples
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((i, sample()));
                    }
                    let job = &jobs[i];
                    let result = run_job(job);
                    match result {
                        Ok(g) if g.tokens.len() == job.max_new => {
                            tokens.fetch_add(g.tokens.len(), Ordering::Relaxed);
                        }
                        Ok(g) => {
                            wrong.fetch_add(1, Ordering::Relaxed);
                            progress.println(&format!(
                                "[{mode}] request {i}: {} tokens, expected {} ({:?})",
                                g.tokens.len(),
                                job.max_new,
                                g.stop
                            ));
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            progress.println(&format!("[{mode}] request {i} FAILED: {e}"));
                        }
                    }
                    progress.inc(1);
                    // A bar counts the requests itself; plain stderr gets a line every 50.
                    if (i + 1) % 50 == 0 && !progress.is_bar() {
                        progress.status(&format!("[{mode}] {} / {} requests", i + 1, jobs.len()));
                    }
                }
            });
        }
    });
    let seconds = t0.elapsed().as_secs_f64();
    progress.finish();
    drop(scheduler);
    let end = sample();
    let mut taken = samples.into_inner().unwrap_or_else(|e| e.into_inner());
    taken.sort_by_key(|(i, _)| *i);
    let at = |n: usize| taken.iter().find(|(i, _)| *i == n).map_or(end, |(_, s)| *s);
    let (start, middle, late) = (at(START), at(half), at(late));
    let (failed, wrong) = (failed.into_inner(), wrong.into_inner());
    let mut problems = Vec::new();
    if failed > 0 {
        problems.push(format!("{failed} requests failed"));
    }
    if wrong > 0 {
        problems.push(format!("{wrong} requests got the wrong token count"));
    }
    for (when, before) in [("after warm-up", start), ("middle", middle)] {
        if late.rss_mib - before.rss_mib > args.rss_slack_mib {
            problems.push(format!(
                "RSS grew from {:.0} MiB ({when}) to {:.0} MiB (late), more than {} MiB",
                before.rss_mib, late.rss_mib, args.rss_slack_mib
            ));
        }
    }
    // Under load the counts must not grow; after the mode they must not exceed
    // the start (its client threads and engine are gone by then).
    for (what, s0, s1, s2) in [
        ("threads", start.threads, late.threads, end.threads),
        ("open files", start.fds, late.fds, end.fds),
    ] {
        if s1 > s0 || s2 > s0 {
            problems.push(format!("{what} grew: {s0} at the start, {s1} late, {s2} after"));
        }
    }
    let summary = ModeSummary {
        mode,
        requests: jobs.len(),
        failed,
        wrong_count: wrong,
        generated_tokens: tokens.into_inner(),
        seconds,
        warmup_positions,
        kv_caches_mib: kv_bytes as f64 / (1u64 << 20) as f64,
        start,
        middle,
        late,
        end,
        checks_passed: problems.is_empty(),
        problems,
    };
    eprintln!(
        "[{mode}] {} requests in {:.1} s: {} failed, {} wrong counts; start / middle / late / after: RSS \
         {:.0} / {:.0} / {:.0} / {:.0} MiB; threads {} / {} / {} / {}; fds {} / {} / {} / {}",
        summary.requests,
        seconds,
        summary.failed,
        summary.wrong_count,
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
    Ok(summary)
}

/// Resident bytes of `caches` KV caches of `positions` positions each.
fn kv_cache_bytes(caches: usize, positions: usize, cfg: &gpt2::Gpt2Config) -> u64 {
    (caches as u64) * gpt2::model::KvCache::resident_bytes(cfg, positions) as u64
}

const GIB: f64 = (1u64 << 30) as f64;

/// The key of the sample taken after warm-up (the others: a request index).
const START: usize = usize::MAX;

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
