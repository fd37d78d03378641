//! The `gpt2` command, end to end, on the tiny synthetic checkpoint.

mod common;

use std::process::{Command, Output};

use common::synth_dir;
use gpt2::synth::Preset;

fn gpt2(args: &[&str]) -> Output {
    gpt2_with_env(args, &[])
}

fn gpt2_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn tokenize_and_detokenize() {
    let out = gpt2(&["tokenize", "--text", "Hello, how are you?"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "[15496,11,703,389,345,30]");
    let out = gpt2(&["detokenize", "--tokens", "464,2068,7586,21831"]);
    assert_eq!(text(&out.stdout).trim_end_matches('\n'), "The quick brown fox");
    let out = gpt2(&["detokenize", "--tokens", "1,99999"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("99999"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn generate_streams_text_and_reports_timings() {
    let dir = synth_dir(Preset::Tiny, 0);
    let out = gpt2(&[
        "generate",
        "--weights",
        dir.to_str().unwrap(),
        "--prompt",
        "Hello, how are you?",
        "--max-new-tokens",
        "12",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.starts_with("Hello, how are you?") && stdout.len() > "Hello, how are you?".len() + 1,
        "{stdout}"
    );
    assert!(stderr.contains("weights: local checkpoint"), "{stderr}");
    // Our generator marks its config.json, so a synthetic checkpoint given as a
    // directory is still named synthetic.
    assert!(stderr.contains("SYNTHETIC tiny checkpoint, seed 0"), "{stderr}");
    assert!(
        stderr.contains("generated 12 tokens (MaxNewTokens)") && stderr.contains("time to first token"),
        "{stderr}"
    );
}

#[test]
fn logits_prints_one_row_per_token() {
    let dir = synth_dir(Preset::Tiny, 0);
    let out = gpt2(&[
        "logits",
        "--weights",
        dir.to_str().unwrap(),
        "--tokens",
        "15496,11,703",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"], serde_json::json!([15496, 11, 703]));
    let rows = v["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.as_array().unwrap().len() == 50257));
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let dir = synth_dir(Preset::Tiny, 0);
    let w = dir.to_str().unwrap();
    let long = "word ".repeat(200);
    for (args, needle) in [
        (vec!["generate", "--weights", w, "--prompt", ""], "empty prompt"),
        (
            vec!["generate", "--weights", w, "--prompt", &long],
            "longer than the context window of 128",
        ),
        (
            vec![
                "generate",
                "--weights",
                w,
                "--prompt",
                "Hi",
                "--temperature",
                "-1",
            ],
            "temperature",
        ),
        (
            vec![
                "generate",
                "--weights",
                w,
                "--prompt",
                "Hi",
                "--temperature",
                "1",
                "--top-p",
                "1.5",
            ],
            "top_p",
        ),
        (
            vec![
                "generate",
                "--weights",
                w,
                "--prompt",
                "Hi",
                "--temperature",
                "1",
                "--top-k",
                "0",
            ],
            "top_k",
        ),
        (
            vec![
                "generate",
                "--weights",
                w,
                "--prompt",
                "Hi",
                "--tokenizer",
                "/no/such/tokenizer.json",
            ],
            "/no/such/tokenizer.json",
        ),
        (
            vec!["generate", "--weights", "/no/such/dir", "--prompt", "Hi"],
            "/no/such/dir",
        ),
        (
            vec!["logits", "--weights", w, "--tokens", "50257"],
            "token id 50257",
        ),
        (
            vec!["generate", "--prompt", "Hi", "--no-such-flag"],
            "--no-such-flag",
        ),
    ] {
        let out = gpt2(&args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}

#[test]
fn logits_that_overflow_are_an_error_not_nulls() {
    let dir = common::overflowing_checkpoint("cli-overflow");
    let out = gpt2(&[
        "logits",
        "--weights",
        dir.to_str().unwrap(),
        "--tokens",
        "15496,11",
    ]);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "exit 0 with stdout of {} bytes",
        out.stdout.len()
    );
    assert!(out.stdout.is_empty(), "printed logits anyway");
    assert!(
        stderr.contains("non-finite logit") && stderr.contains("position 0"),
        "{stderr}"
    );
}

#[test]
fn an_endless_config_is_refused_by_name() {
    let src = synth_dir(Preset::Tiny, 0);
    let dir = common::scratch_dir("cli-endless-config");
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join("config.json")).unwrap();
    let out = gpt2(&["logits", "--weights", dir.to_str().unwrap(), "--tokens", "1"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("config.json") && stderr.contains("not a regular file"),
        "{stderr}"
    );
}

#[test]
fn logits_out_never_replaces_a_file() {
    let dir = synth_dir(Preset::Tiny, 0);
    let scratch = common::scratch_dir("cli-logits-out");
    let path = scratch.join("logits.json");
    std::fs::write(&path, "earlier results").unwrap();
    let out = gpt2(&[
        "logits",
        "--weights",
        dir.to_str().unwrap(),
        "--tokens",
        "1",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "earlier results");
}

/// Every kernel set this CPU runs gives the same logits to rounding (sets may
/// round differently: portable does not fuse multiply-adds), and a set that is
/// unknown or that the CPU lacks is refused by name before anything loads.
#[test]
fn kernels_flag_picks_a_set_and_refuses_what_cannot_run() {
    let dir = synth_dir(Preset::Tiny, 0);
    let logits = |set: &str| -> Vec<f64> {
        let out = gpt2(&[
            "logits",
            "--kernels",
            set,
            "--weights",
            dir.to_str().unwrap(),
            "--tokens",
            "15496,11",
        ]);
        assert!(out.status.success(), "--kernels {set}: {}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().clone())
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let sets: Vec<&str> = gpt2_kernels::KernelSet::supported()
        .into_iter()
        .map(|s| s.as_str())
        .collect();
    assert!(sets.contains(&"portable"), "{sets:?}");
    let base = logits(sets[0]);
    for set in &sets[1..] {
        let other = logits(set);
        let worst = base
            .iter()
            .zip(&other)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 1e-3, "{set} against {}: worst |diff| {worst}", sets[0]);
    }
    let out = gpt2(&[
        "--kernels",
        "avx9",
        "logits",
        "--weights",
        dir.to_str().unwrap(),
        "--tokens",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("avx512, avx2"),
        "{}",
        text(&out.stderr)
    );
    let out = gpt2_with_env(
        &["logits", "--weights", dir.to_str().unwrap(), "--tokens", "1"],
        &[("GPT2_KERNELS", "avx9")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("GPT2_KERNELS"),
        "{}",
        text(&out.stderr)
    );
    if let Some(missing) = gpt2_kernels::KernelSet::ALL.iter().find(|s| !s.is_supported()) {
        let out = gpt2(&[
            "logits",
            "--kernels",
            missing.as_str(),
            "--weights",
            dir.to_str().unwrap(),
            "--tokens",
            "1",
        ]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("lacks"), "{}", text(&out.stderr));
    }
}

/// `gpt2 synth` with `--layers`, `--vocab` and `--positions` writes a reduced
/// checkpoint of the preset's heads and width, named so, that loads and runs.
#[test]
fn synth_writes_a_reduced_preset() {
    let dir = common::scratch_dir("cli-synth-reduced");
    let out = gpt2(&[
        "synth",
        "--preset",
        "medium",
        "--layers",
        "1",
        "--vocab",
        "300",
        "--positions",
        "16",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("wrote synthetic medium-1l-v300-p16 checkpoint"),
        "{stderr}"
    );
    let config =
        gpt2::Gpt2Config::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let dims = (
        config.n_layer,
        config.n_head,
        config.n_embd,
        config.vocab_size,
        config.n_positions,
    );
    assert_eq!(dims, (1, 16, 1024, 300, 16));
    let out = gpt2(&["logits", "--weights", dir.to_str().unwrap(), "--tokens", "1,299"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A shape we refuse is an error naming it, not a panic.
    let out = gpt2(&[
        "synth",
        "--preset",
        "tiny",
        "--layers",
        "0",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("tiny-0l-v50257-p128"),
        "{stderr}"
    );
}

/// `--synthetic-preset` cannot be given with another source: the error names both flags.
#[test]
fn synthetic_preset_conflicts_are_named() {
    for other in [["--model", "gpt2-xl"], ["--weights", "/tmp"]] {
        let mut args = vec!["generate", "--prompt", "Hi", "--synthetic-preset", "xl"];
        args.extend(other);
        let out = gpt2(&args);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("--synthetic-preset") && stderr.contains(other[0]),
            "{stderr}"
        );
    }
}
