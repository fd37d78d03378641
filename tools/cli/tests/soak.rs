//! The soak binary at CI size: mixed load on the tiny model in both modes,
//! no failure, exact token counts, no thread or file growth, flat memory;
//! and the memory check trips on a leak.

mod common;

use common::synth_dir;
use gpt2::synth::Preset;

/// Runs the soak at CI size with `extra` flags; (exit ok, JSON, stderr).
fn soak(extra: &[&str]) -> (bool, serde_json::Value, String) {
    let dir = synth_dir(Preset::Tiny, 0);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_soak"))
        .args(["--weights", dir.to_str().unwrap()])
        .args([
            "--requests",
            "80",
            "--concurrency",
            "8",
            "--max-prompt",
            "120",
            "--max-new",
            "12",
            "--rss-slack-mib",
            "8",
        ])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}:\n{stdout}\n{stderr}"));
    (out.status.success(), json, stderr)
}

#[test]
fn soak_at_ci_size_passes_in_both_modes() {
    let (ok, json, stderr) = soak(&[]);
    assert!(ok, "soak failed:\n{json}\n{stderr}");
    assert_eq!(json["passed"], true);
    for mode in json["modes"].as_array().unwrap() {
        assert_eq!(mode["failed"], 0, "{mode}");
        assert_eq!(mode["wrong_count"], 0, "{mode}");
        assert_eq!(mode["requests"], 80, "{mode}");
    }
    assert_eq!(json["modes"].as_array().unwrap().len(), 2);
    assert_eq!(json["dtype"], "f32", "f32 by default");
    assert!(stderr.contains("dtype: f32"), "{stderr}");
}

/// A leak of 1 MiB a request (80 requests, 8 MiB slack) fails the soak, by
/// name, in both modes. On bf16 weights: `--dtype` reaches the model and
/// the JSON.
#[test]
fn a_leak_fails_the_memory_check() {
    let (ok, json, stderr) = soak(&["--leak-kib-per-request", "1024", "--dtype", "bf16"]);
    assert!(!ok, "a leaking soak passed:\n{json}\n{stderr}");
    assert_eq!(json["dtype"], "bf16");
    for mode in json["modes"].as_array().unwrap() {
        assert_eq!(mode["failed"], 0, "{mode}");
        let problems = mode["problems"].to_string();
        assert!(problems.contains("RSS grew from"), "{mode}");
    }
}
