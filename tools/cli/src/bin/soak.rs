//! `soak`: sustained mixed load in threads and batched modes. Checks that no
//! request fails, every request gets exactly its token count, and resident
//! memory, threads and open files stay flat after warm-up. Exit status 1 if
//! any check fails, a flag is out of range or the `--json` file cannot be
//! written; 2 if the kernels cannot be set.
//!
//! This file parses the flags; the soak is `gpt2_bench::soak`.

use std::process::ExitCode;

use clap::Parser;
use gpt2_bench::soak;

#[derive(Parser, Debug)]
#[command(
    name = "soak",
    version,
    about = "Sustained mixed load: failures, exact token counts, RSS/threads/fds"
)]
struct Args {
    #[command(flatten)]
    options: soak::Options,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.options.kernels.init() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match soak::run(&args.options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
