//! Resident memory of a run: about one copy of the weights.

mod common;

use common::synth_dir;
use gpt2::synth::Preset;

/// `gpt2 generate` on the 124M checkpoint (475 MiB of f32) peaks at most at
/// 1.15x the weights file (it was 2.07x: the file map's pages and the packed
/// copy were resident together, the LM head's 154 MB above all). The binary
/// reports its own peak (`VmHWM`), read just before it exits.
#[test]
fn generate_peaks_near_one_copy_of_the_weights() {
    let dir = synth_dir(Preset::Gpt2_124M, 0);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(["generate", "--weights", dir.to_str().unwrap()])
        .args(["--prompt", "hi", "--max-new-tokens", "5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let Some(line) = stderr.lines().find(|l| l.starts_with("peak resident memory")) else {
        eprintln!("notice: this OS reports no peak resident memory; not checked\n{stderr}");
        return;
    };
    eprintln!("{line}");
    let ratio: f64 = line
        .split('(')
        .nth(1)
        .and_then(|r| r.split('x').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the ratio in {line:?}"));
    assert!(ratio <= 1.15, "{line}");
}
