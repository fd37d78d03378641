//! Helpers shared by the tools' integration tests: the engine tests' helpers
//! (`tests/common` at the repository root) plus the programs' runners.
#![allow(dead_code)]

#[path = "../../../../tests/common/mod.rs"]
mod engine;
pub mod in_process;
pub mod server;

pub use engine::*;

/// Runs `throughput` with `args` (OPENAI_API_KEY unset), killed after
/// `secs`: a hang fails the test instead of stalling the suite.
pub fn throughput_within(args: &[&str], secs: u64) -> std::process::Output {
    throughput_measured(args, secs).0
}

/// [`throughput_within`], sampling the process's peak resident memory
/// (`VmHWM`) while it runs: (output, peak bytes seen, seconds taken).
pub fn throughput_measured(args: &[&str], secs: u64) -> (std::process::Output, u64, f64) {
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_throughput"))
        .args(args)
        .env_remove("OPENAI_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let (d, p) = (Arc::clone(&done), Arc::clone(&peak));
    let sampler = std::thread::spawn(move || {
        while !d.load(Ordering::SeqCst) {
            if start.elapsed() > Duration::from_secs(secs) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                return;
            }
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                let kib = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
                if let Some(k) = kib {
                    p.fetch_max(k * 1024, Ordering::SeqCst);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    assert!(
        out.status.code().is_some(),
        "{args:?}: killed after {secs} s (a hang)"
    );
    (out, peak.load(Ordering::SeqCst), start.elapsed().as_secs_f64())
}
