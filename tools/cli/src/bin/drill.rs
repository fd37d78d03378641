//! `drill`: fault drills (rolling restart, crash, overload) and the
//! scale-out sweep of `gpt2 serve` replicas behind HAProxy, each driving
//! `throughput --url` through a local cluster (`deploy/local-cluster.sh`).
//! The drills are `gpt2_drill`; this file parses the flags.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "drill",
    version,
    about = "Fault drills and the scale-out sweep of gpt2 serve replicas behind HAProxy (needs haproxy and \
             taskset, and the gpt2 and throughput binaries built beside this one)",
    after_help = "Exit status: 0 every check passed; 1 the drill could not run (named on stderr); 2 a bad flag; \
                  3 it ran, and a check failed (the report says which)."
)]
struct Args {
    #[command(flatten)]
    drill: gpt2_drill::DrillArgs,
}

fn main() -> ExitCode {
    match gpt2_drill::run(Args::parse().drill) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("drill: a check FAILED (exit status 3)");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
