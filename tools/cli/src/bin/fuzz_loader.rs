//! Loader fuzzer: damages a tiny valid checkpoint (`config.json` +
//! `model.safetensors`) and checks that loading never panics, never trusts a
//! size written in a header, and turns every bad input into a `gpt2::Error`
//! that names the file. The mutations and the contract live in
//! [`gpt2_fuzz`]; this binary is the timed run.
//!
//!     cargo run --release --bin fuzz_loader -- --seconds 600 [--seed N]
//!
//! A case is a list of mutations drawn from its own seed; `--replay SEED`
//! reruns one case without catching its panic. `tests/loader_fuzz.rs` drives
//! the same mutations from proptest. On a terminal a progress bar shows the
//! run; elsewhere a status line goes to stderr every 30 s.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use gpt2::rng::Rng;
use gpt2_bench::progress::Progress;
use gpt2_fuzz::{
    apply, base, contract_violation, kind, quiet_panics, random_case, run_case, run_case_caught, Base,
    CappedAlloc, Outcome, Tally, FAMILIES, LARGEST_ALLOC,
};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// Fuzzes the checkpoint loader: every damaged checkpoint must give a named error, never a panic.
#[derive(Parser)]
struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seed of the case stream (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Most mutations stacked on one case.
    #[arg(long, default_value_t = 3)]
    max_mutations: usize,
    /// Run only the case with this case seed (printed for each panic), panics not caught.
    #[arg(long)]
    replay: Option<u64>,
    /// A case running longer than this many seconds is reported as a hang.
    #[arg(long, default_value_t = 20)]
    hang_seconds: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // `GPT2_KERNELS` is checked here, by name, not at the first kernel call.
    if let Err(e) = gpt2_kernels::init(None) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let dir = std::env::temp_dir().join(format!("gpt2-fuzz-loader-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the fuzz directory");
    let base = base();
    if let Some(seed) = args.replay {
        return replay(&dir, &base, seed, args.max_mutations);
    }
    if !matches!(run_case(&dir, &apply(&base, &[])), Outcome::Loaded) {
        eprintln!("the undamaged micro checkpoint does not load");
        return ExitCode::from(2);
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let (tally, secs) = fuzz(&dir, &base, seed, &args);
    let _ = std::fs::remove_dir_all(&dir);
    report(&tally, seed, secs);
    ExitCode::from(!tally.passed() as u8)
}

/// Runs one case, panics not caught; exit status 1 if it breaks the contract.
fn replay(dir: &Path, base: &Base, seed: u64, max_mutations: usize) -> ExitCode {
    let mutations = random_case(seed, &FAMILIES, max_mutations);
    println!("case {seed}: {mutations:?}");
    let outcome = run_case(dir, &apply(base, &mutations));
    match &outcome {
        Outcome::Loaded => println!("loaded"),
        Outcome::Rejected(e) | Outcome::ForwardFailed(e) => println!("{}: {e}", kind(e)),
    }
    ExitCode::from(contract_violation(&outcome).is_some() as u8)
}

/// The timed run: cases from the stream of `seed` until `--seconds` have
/// passed. Returns what they found and the seconds taken.
fn fuzz(dir: &Path, base: &Base, seed: u64, args: &Args) -> (Tally, f64) {
    let progress = Arc::new(Progress::new(args.seconds, "seconds"));
    // Watchdog: a case that runs too long is a hang (the loader looping over a
    // count from the header); report its seed and stop.
    let start = Instant::now();
    let current = Arc::new((AtomicU64::new(0), AtomicU64::new(0))); // (case seed, started at ms)
    let watched = Arc::clone(&current);
    let watch_progress = Arc::clone(&progress);
    let hang_ms = args.hang_seconds * 1000;
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        let since = watched.1.load(Ordering::Relaxed);
        if start.elapsed().as_millis() as u64 > since + hang_ms {
            watch_progress.println(&format!(
                "HANG: case {} ran over {hang_ms} ms",
                watched.0.load(Ordering::Relaxed)
            ));
            std::process::exit(3);
        }
    });

    quiet_panics();
    let deadline = start + Duration::from_secs(args.seconds);
    // A bar follows the run closely; plain stderr gets a line every 30 s.
    let every = Duration::from_millis(if progress.is_bar() { 200 } else { 30_000 });
    let mut stream = Rng::new(seed);
    let mut tally = Tally::default();
    let (mut last_report, mut shown_secs) = (start, 0);
    while Instant::now() < deadline {
        let case_seed = stream.next_u64();
        current.0.store(case_seed, Ordering::Relaxed);
        current
            .1
            .store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let case = apply(base, &random_case(case_seed, &FAMILIES, args.max_mutations));
        if let Some(line) = tally.record(case_seed, run_case_caught(dir, &case)) {
            progress.println(&line);
        }
        if last_report.elapsed() > every {
            last_report = Instant::now();
            let elapsed = start.elapsed();
            let secs = elapsed.as_secs().min(args.seconds);
            progress.inc(secs - shown_secs);
            shown_secs = secs;
            let counts = format!("{} cases, {} panics", tally.cases, tally.panics.len());
            if progress.is_bar() {
                progress.status(&counts);
            } else {
                progress.status(&format!("{:>5.0} s: {counts}", elapsed.as_secs_f64()));
            }
        }
    }
    // The watchdog holds the bar too: clear it before the report.
    progress.finish();
    (tally, start.elapsed().as_secs_f64())
}

/// The summary on stdout: counts by kind, then a replay line per panic (20 at most).
fn report(tally: &Tally, seed: u64, secs: f64) {
    let cases = tally.cases;
    println!(
        "seed {seed}: {cases} cases in {secs:.1} s ({:.0}/s)",
        cases as f64 / secs
    );
    println!("{:>10}  loaded (benign mutation)", tally.loaded);
    for (k, n) in &tally.kinds {
        println!("{n:>10}  {k}");
    }
    println!("{:>10}  panics", tally.panics.len());
    println!("{:>10}  errors naming no file", tally.violations.len());
    println!(
        "largest single allocation: {} bytes",
        LARGEST_ALLOC.load(Ordering::Relaxed)
    );
    for (case_seed, msg) in tally.panics.iter().take(20) {
        println!("panic, replay with --replay {case_seed}: {msg}");
    }
}
