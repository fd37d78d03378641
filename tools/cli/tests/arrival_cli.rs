//! `throughput arrival` end to end on the tiny synthetic model: the trials
//! alternate the budgets, the steps of the arrival's prefill follow each
//! budget, and bad values are refused by name.

mod common;

use common::{scratch_dir, synth_dir};
use gpt2::synth::Preset;
use gpt2_bench::arrival::ArrivalReport;

fn arrival(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_throughput"))
        .arg("arrival")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn each_budget_is_measured_alternating_and_its_steps_follow_it() {
    let weights = synth_dir(Preset::Tiny, 0);
    let out_dir = scratch_dir("arrival-cli");
    let args = [
        "--weights",
        weights.to_str().unwrap(),
        "--threads",
        "1",
        "--streams",
        "4",
        "--stream-prompt-tokens",
        "4",
        "--prompt-tokens",
        "100",
        "--warmup-tokens",
        "2",
        "--baseline-tokens",
        "5",
        "--after-tokens",
        "2",
        "--max-prompt-rows",
        "64",
        "--max-step-rows",
        "10,200",
        "--repetitions",
        "2",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ];
    let out = arrival(&args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("p99/p50") && stdout.contains("lone TTFT ms"),
        "{stdout}"
    );
    let written: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("throughput_arrival_")
        })
        .collect();
    assert_eq!(written.len(), 1, "{written:?}");
    let report: ArrivalReport = serde_json::from_str(&std::fs::read_to_string(&written[0]).unwrap()).unwrap();

    let order: Vec<(usize, usize)> = report
        .trials
        .iter()
        .map(|t| (t.repetition, t.max_step_rows))
        .collect();
    assert_eq!(order, [(0, 10), (0, 200), (1, 200), (1, 10)], "A B, then B A");
    let budgets: Vec<usize> = report.summary.iter().map(|s| s.max_step_rows).collect();
    assert_eq!(budgets, [10, 200]);
    for t in &report.trials {
        assert_eq!(t.baseline_itl_ms.count, 4 * 5, "{t:?}");
        assert!(t.arrival_itl_ms.count >= 4 * 2, "{t:?}");
        assert!(
            t.baseline_itl_ms.p50 > 0.0 && t.arrival_ttft_ms > 0.0 && t.lone_ttft_ms > 0.0,
            "{t:?}"
        );
        let prompt_rows: Vec<usize> = t
            .arrival_steps
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.rows - s.decode_rows, s.steps))
            .collect();
        assert_eq!(prompt_rows.iter().sum::<usize>(), 100, "the whole prompt: {t:?}");
        assert!(
            t.arrival_steps.iter().all(|s| s.decode_rows == 4),
            "every stream decodes: {t:?}"
        );
        let most = prompt_rows.iter().max().copied().unwrap();
        // Beside 4 decode rows a budget of 10 leaves 6; 200 is the old
        // policy: --max-prompt-rows.
        assert_eq!(most, if t.max_step_rows == 10 { 6 } else { 64 }, "{t:?}");
    }

    // A second call writes a new file beside the first.
    assert!(arrival(&args).status.success());
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 2);
}

#[test]
fn bad_values_are_refused_by_name() {
    let weights = synth_dir(Preset::Tiny, 0);
    let out_dir = scratch_dir("arrival-cli-bad");
    let w = weights.to_str().unwrap();
    let o = out_dir.to_str().unwrap();
    for (args, want) in [
        (vec!["--max-step-rows", "0"], "--max-step-rows must be at least 1"),
        (vec!["--streams", "32"], "--streams 32 leaves no batch slot"),
        (
            vec!["--prompt-tokens", "128"],
            "--prompt-tokens 128 must be below the model's context (128)",
        ),
        (
            vec!["--prompt-tokens", "100", "--stream-prompt-tokens", "120"],
            "--stream-prompt-tokens 120 leaves fewer than",
        ),
    ] {
        let mut all = vec!["--weights", w, "--out-dir", o];
        all.extend(&args);
        let out = arrival(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    assert_eq!(
        std::fs::read_dir(&out_dir).map_or(0, |d| d.count()),
        0,
        "nothing written"
    );
}
