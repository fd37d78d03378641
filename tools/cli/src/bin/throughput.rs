//! `throughput`: single-request and concurrent throughput of GPT-2 on this
//! machine, the CPU saturation curve, as JSON + Markdown + SVG.
//!
//! Default protocol (the reference study's): greedy, exactly 30 new tokens per
//! request (EOS ignored), 2 warmup requests, 5 sequential single requests,
//! then 6 requests at each concurrency level (2 and 4), 3 prompts rotated,
//! one client thread per in-flight request sharing the one immutable model.
//!
//! Two modes run the same requests from the same client threads: `threads`
//! (each request runs its own forward passes: the saturation curve) and
//! `batched` (requests are submitted to the continuous-batching scheduler,
//! which decodes all of them in one forward step).
//!
//! `--url http://HOST:PORT` sends the same tests to an OpenAI-compatible
//! server instead (mode `http`); `throughput compare A.json B.json ...`
//! renders reports together; `throughput pair --a FLAGS --b FLAGS --
//! COMMON...` measures two variants alternating and gives their ratios;
//! `throughput arrival` measures what one long prompt's arrival does to the
//! inter-token latency of the streams already decoding.
//!
//! This file parses the flags; the run is `gpt2_bench::run`, the
//! comparison `gpt2_bench::compare`, the pairs `gpt2_bench::pair`, the
//! arrival `gpt2_bench::arrival`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gpt2_bench::arrival::{self, ArrivalOptions};
use gpt2_bench::compare::{self, CompareOptions};
use gpt2_bench::pair::{self, PairOptions};
use gpt2_bench::run::{self, Options};

#[derive(Parser, Debug)]
#[command(
    name = "throughput",
    version,
    about = "Benchmark GPT-2 inference: single-request and concurrent throughput, latency percentiles and the \
             CPU saturation curve. Writes JSON, Markdown and SVG under --out-dir.",
    after_help = "Exit status: 0 every request succeeded and every required target passed; 1 the run could not \
                  finish (an error, named on stderr); 2 a bad flag; 3 the report was written but required targets \
                  were missed; 4 the report was written but requests failed. Required: the reference study's \
                  targets (single_* and concurrent_* requests and tokens per second, failed), any target named by \
                  --target, and with --strict every target; the project's own batching targets are otherwise \
                  reported, and a miss noted on stderr, without failing the run. `throughput compare`: 0 \
                  written, 1 an input unreadable or not a report, 2 a bad flag. `throughput pair`: 0 written, \
                  1 a run could not finish or a variant's flags are wrong (named), 2 a bad flag of its own, 4 \
                  written but requests failed. `throughput arrival`: 0 written, 1 a trial could not finish \
                  or a flag's value is refused (named), 2 a bad flag.",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    options: Options,
    #[command(flatten)]
    kernels: gpt2_hub::KernelArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Render several JSON reports (any schema version, in-process or --url
    /// runs, any machine) into one Markdown table and one SVG with every
    /// curve (tokens/s against concurrency), under --out-dir.
    Compare(CompareOptions),
    /// Measure two variants of one benchmark alternating (A B, B A, ...):
    /// each run the flags after `--` plus the variant's own (--a, --b), in
    /// process or --url; the ratios A / B of the runs' last tests (tokens/s,
    /// TTFT p50, latency p50), pair by pair, and their medians. E.g. n
    /// choices against as many requests: `throughput pair --a '--choices 8
    /// --levels 1' --b '--levels 8' -- --synthetic --mode batched
    /// --prompt-tokens 200`.
    Pair(PairOptions),
    /// One long prompt arriving among decoding streams: the streams'
    /// inter-token latency before it (p50) and during its prefill (p99,
    /// max), its time to first token there and alone, and the steps the
    /// engine ran, for each --max-step-rows budget, alternating. In
    /// process, on the scheduler. E.g. `throughput arrival --synthetic
    /// --threads 2 --streams 15 --prompt-tokens 900 --max-step-rows 28,160`.
    Arrival(ArrivalOptions),
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.kernels.init() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match &args.command {
        Some(Command::Compare(c)) => {
            return match compare::compare(c) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Pair(p)) => {
            return match pair::pair(p) {
                Ok(report) if report.failed_requests() > 0 => {
                    eprintln!(
                        "FAILED: {} requests failed over the runs (exit status 4)",
                        report.failed_requests()
                    );
                    ExitCode::from(4)
                }
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Arrival(a)) => {
            return match arrival::arrival(a) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {}
    }
    // A value the plan refuses (out of range, two flags setting one thing) is a bad flag too.
    if let Err(e) = run::check(&args.options) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match run::run(&args.options) {
        Ok(outcome) => {
            if let Some(line) = outcome.summary() {
                eprintln!("{line}");
            }
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
