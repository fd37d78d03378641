//! The `throughput` binary end to end on the tiny synthetic model.

mod common;

use common::{scratch_dir, synth_dir};
use gpt2::synth::Preset;

fn throughput(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_throughput"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn both_modes_write_a_complete_report() {
    let weights = synth_dir(Preset::Tiny, 0);
    let out_dir = scratch_dir("throughput-cli");
    let out = throughput(&[
        "--weights",
        weights.to_str().unwrap(),
        "--max-new-tokens",
        "5",
        "--warmup",
        "1",
        "--single-requests",
        "2",
        "--levels",
        "2,6",
        "--requests-per-level",
        "4",
        "--profile",
        "--json",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: gpt2::bench::Report = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report.metadata.modes, ["threads", "batched"]);
    let modes: Vec<(&str, usize)> = report
        .tests
        .iter()
        .map(|t| (t.mode.as_str(), t.concurrency))
        .collect();
    assert_eq!(
        modes,
        [
            ("threads", 1),
            ("threads", 2),
            ("threads", 6),
            ("batched", 2),
            ("batched", 6)
        ]
    );
    // A level runs at least as many requests as it has clients: 4 per level
    // were asked for, level 6 runs 6.
    let requests: Vec<usize> = report.tests.iter().map(|t| t.requests).collect();
    assert_eq!(requests, [2, 4, 6, 4, 6]);
    for t in &report.tests {
        assert_eq!(t.failed, 0, "{}", t.name);
        assert_eq!(t.total_tokens, t.requests * 5, "{} {}", t.mode, t.name);
        assert!(t.tokens_per_s > 0.0 && t.raw.iter().all(|r| r.ttft_ms.is_some()));
    }
    let batched = report
        .analysis
        .levels
        .iter()
        .find(|l| l.mode == "batched")
        .unwrap();
    assert!(batched.vs_threads.is_some_and(|r| r > 0.0));
    let profile = report.profile.expect("--profile adds the per-op table");
    for op in ["qkv", "attention", "mlp up", "lm head", "sampling"] {
        assert!(
            profile
                .iter()
                .any(|r| r.phase == "decode" && r.op == op && r.ms > 0.0),
            "{op}"
        );
    }
    assert!(report.metadata.synthetic_weights || report.metadata.weights_source.contains("local"));
    // JSON, Markdown and SVG were written.
    let names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for ext in ["json", "md", "svg"] {
        assert!(names.iter().any(|n| n.ends_with(ext)), "no .{ext} in {names:?}");
    }
}

#[test]
fn bad_flags_are_named_errors() {
    let weights = synth_dir(Preset::Tiny, 0);
    let w = weights.to_str().unwrap();
    for (args, needle) in [
        (vec!["--levels", "0"], "--levels"),
        (vec!["--max-batch", "0"], "--max-batch"),
        (vec!["--request-rate", "0"], "--request-rate"),
        (vec!["--mode", "sideways"], "--mode"),
    ] {
        let mut all = vec!["--weights", w];
        all.extend(args);
        let out = throughput(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{all:?} should fail");
        assert!(stderr.contains(needle), "{all:?}: {stderr}");
    }
}
