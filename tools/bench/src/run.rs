//! One `throughput` run: the options and their validated plan
//! ([`RunPlan`]: its cells, one per dtype times the `--sweep` axes, parsed
//! by `sweep`), the tests written once over any backend (`protocol`: the
//! warmup, the single request, every mode's levels, each test through the
//! one load loop [`crate::runner::run_test`]), what serves them (`engine`:
//! the engine in this process, each repetition loading each cell's model
//! afresh, the order rotating, with the optional profile and probe;
//! `server`: with `--url`, an OpenAI-compatible server, mode `http`), what
//! they measured made into the report with its one metadata builder
//! (`measured`), and the report written to disk.
//!
//! Default protocol (the reference study's): greedy, exactly 30 new tokens
//! per request (EOS ignored), 2 warmup requests, 5 sequential single
//! requests, then 6 requests at each concurrency level (2 and 4), 3 prompts
//! rotated, one client thread per in-flight request sharing the one
//! immutable model, f32 weights.

mod engine;
mod measured;
mod options;
mod plan;
mod protocol;
mod server;
mod sweep;

use std::error::Error;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use self::options::{ModeChoice, Options, DEFAULT_CONCURRENT_PROMPTS};
pub use self::plan::{CellPlan, RunPlan, MAX_SCHEDULE};
pub use self::server::HTTP_MODE;
pub use self::sweep::{Axis, AxisSweep, Value};
use super::{meta, report, Report};

/// How a finished run went, for the exit status (`throughput --help`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// Requests that failed, over every test (warmup excluded).
    pub failed_requests: usize,
    pub requests: usize,
    /// Names of the required targets the run missed.
    pub missed_targets: Vec<String>,
    /// Names of the targets the run missed that were not required (the
    /// project's own, without `--strict` or `--target`): noted, exit 0.
    pub missed_opt_in: Vec<String>,
}

impl RunOutcome {
    /// The outcome a written report tells.
    fn of(report: &Report) -> RunOutcome {
        RunOutcome {
            failed_requests: report.tests.iter().map(|t| t.failed).sum(),
            requests: report.tests.iter().map(|t| t.requests).sum(),
            missed_targets: report
                .analysis
                .targets
                .iter()
                .filter(|t| !t.pass && t.required)
                .map(|t| report.target_label(t))
                .collect(),
            missed_opt_in: report
                .analysis
                .targets
                .iter()
                .filter(|t| !t.pass && !t.required)
                .map(|t| report.target_label(t))
                .collect(),
        }
    }

    /// 0: every request succeeded and every required target passed (a
    /// missed opt-in target is only noted); 3: required targets missed; 4:
    /// requests failed (whatever the targets). 1 is a run that could not
    /// finish, 2 a bad flag (clap's usage error).
    pub fn exit_code(&self) -> u8 {
        if self.failed_requests > 0 {
            4
        } else if !self.missed_targets.is_empty() {
            3
        } else {
            0
        }
    }

    /// One line for stderr when the status is not 0, or when opt-in
    /// targets were missed.
    pub fn summary(&self) -> Option<String> {
        let opt_in = (!self.missed_opt_in.is_empty()).then(|| {
            format!(
                "opt-in targets missed (not required; --strict or --target NAME=VALUE requires them): {}",
                self.missed_opt_in.join(", ")
            )
        });
        let main = match self.exit_code() {
            4 => Some(format!(
                "FAILED: {} of {} requests failed (exit status 4)",
                self.failed_requests, self.requests
            )),
            3 => Some(format!(
                "targets missed: {} (exit status 3)",
                self.missed_targets.join(", ")
            )),
            _ => None,
        };
        match (main, opt_in) {
            (Some(m), Some(o)) => Some(format!("{m}\n{o}")),
            (m, o) => m.or(o),
        }
    }
}

/// Runs the benchmark `opts` asks for and writes its report (JSON, Markdown,
/// SVG) under `opts.out_dir`; the summary (or the JSON) goes to stdout,
/// progress to stderr.
pub fn run(opts: &Options) -> Result<RunOutcome, Box<dyn Error>> {
    let report = measure(opts)?;
    write_outputs(&report, &opts.out_dir, opts.json)?;
    Ok(RunOutcome::of(&report))
}

/// Runs the benchmark `opts` asks for and returns its report, writing
/// nothing (progress goes to stderr): [`run`]'s measurement, and each run of
/// `throughput pair`.
pub fn measure(opts: &Options) -> Result<Report, Box<dyn Error>> {
    let plan = RunPlan::new(opts, cores())?;
    let measured = match &opts.url {
        Some(url) => server::measure(opts, &plan, url)?,
        None => engine::measure(opts, &plan)?,
    };
    Ok(measured.report(opts, &plan))
}

/// Checks `opts` as [`measure`] would before it starts; the error names the flag.
pub fn check(opts: &Options) -> Result<(), String> {
    RunPlan::new(opts, cores()).map(|_| ())
}

/// Logical cores available to this process.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Writes `throughput_gpt2_<UTC>[_N].{json,md,svg}` into `dir` (a sweep:
/// `.{json,md}` and a `.<axis>.svg` per swept axis) and prints the summary
/// (or, with `json`, the JSON) on stdout. No report is ever
/// replaced: a stem taken by an earlier run (another run in the same second)
/// gets the next free `_N`. The three files are written under temporary
/// names first and only then given their names, so an interrupted run leaves
/// none of them.
pub fn write_outputs(report: &Report, dir: &Path, json: bool) -> Result<(), Box<dyn Error>> {
    let base = format!(
        "throughput_gpt2_{}",
        meta::utc_timestamp(SystemTime::now(), false)
    );
    let text = serde_json::to_string_pretty(report)?;
    // A sweep's pictures are its axes' (a saturation curve would mix its
    // cells); a run without one has its saturation curve.
    let svgs: Vec<(String, String)> = match &report.sweep {
        Some(_) => report::axis_svgs(report)
            .into_iter()
            .map(|(axis, svg)| (report::axis_svg_ext(&axis), svg))
            .collect(),
        None => vec![("svg".into(), report::svg(report))],
    };
    let paths = write_set(dir, &base, |stem| {
        let md = report::markdown(report, &format!("{stem}.svg"));
        let mut files = vec![
            ("json".to_string(), text.clone().into_bytes()),
            ("md".to_string(), md.into_bytes()),
        ];
        files.extend(
            svgs.iter()
                .map(|(ext, svg)| (ext.clone(), svg.clone().into_bytes())),
        );
        files
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{text}")?;
    } else {
        writeln!(out, "{}", report::stdout_table(report))?;
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    eprintln!("wrote {}", names.join(", "));
    Ok(())
}

/// Writes the files `make(stem)` gives (extension, bytes) as a new set
/// named `<base>[_N].<ext>` in `dir` (created if missing): the first `_N`
/// whose names are all free, so nothing is ever replaced; all or none of
/// them. Returns their paths.
pub fn write_set<E: AsRef<str>>(
    dir: &Path,
    base: &str,
    make: impl Fn(&str) -> Vec<(E, Vec<u8>)>,
) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut n = 1;
    loop {
        let stem = if n == 1 {
            base.to_string()
        } else {
            format!("{base}_{n}")
        };
        let made: Vec<(PathBuf, Vec<u8>)> = make(&stem)
            .into_iter()
            .map(|(ext, bytes)| (dir.join(format!("{stem}.{}", ext.as_ref())), bytes))
            .collect();
        let files: Vec<(&Path, &[u8])> = made.iter().map(|(p, b)| (p.as_path(), b.as_slice())).collect();
        match gpt2::files::write_new_set(&files) {
            Ok(()) => return Ok(made.into_iter().map(|(p, _)| p).collect()),
            Err(gpt2::Error::Exists { .. }) if n < 1000 => n += 1,
            Err(e) => return Err(e.into()),
        }
    }
}
