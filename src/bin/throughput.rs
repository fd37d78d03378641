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
//! This file parses the flags; the run is `gpt2::bench::run`.

use std::process::ExitCode;

use clap::Parser;
use gpt2::bench::run::{self, Options};

#[derive(Parser, Debug)]
#[command(
    name = "throughput",
    version,
    about = "Benchmark GPT-2 inference: single-request and concurrent throughput, latency percentiles and the \
             CPU saturation curve. Writes JSON, Markdown and SVG under --out-dir.",
    after_help = "Exit status: 0 every request succeeded and every target passed; 1 the run could not finish \
                  (an error, named on stderr); 2 a bad flag; 3 the report was written but targets were missed; 4 \
                  the report was written but requests failed."
)]
struct Args {
    #[command(flatten)]
    options: Options,
}

fn main() -> ExitCode {
    match run::run(&Args::parse().options) {
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
