//! The soak binary at CI size: mixed load on the tiny model in both modes,
//! no failure, exact token counts, no thread or file growth.

mod common;

use common::synth_dir;
use gpt2::synth::Preset;

#[test]
fn soak_at_ci_size_passes_in_both_modes() {
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
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak failed:\n{stdout}\n{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["passed"], true);
    for mode in json["modes"].as_array().unwrap() {
        assert_eq!(mode["failed"], 0, "{mode}");
        assert_eq!(mode["wrong_count"], 0, "{mode}");
        assert_eq!(mode["requests"], 80, "{mode}");
    }
    assert_eq!(json["modes"].as_array().unwrap().len(), 2);
}
