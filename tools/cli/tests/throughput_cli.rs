//! The `throughput` binary end to end on the tiny synthetic model.

mod common;

use common::{scratch_dir, synth_dir, throughput_within};
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
    let report: gpt2_bench::Report = serde_json::from_str(&stdout).unwrap();
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
        // Inter-token latency in process too: every token's arrival, in order.
        assert!(t.itl_ms.is_some_and(|s| s.p50 > 0.0), "{} {}", t.mode, t.name);
        for r in &t.raw {
            assert_eq!(r.token_ms.len(), 5, "{r:?}");
            assert_eq!(r.token_ms.first().copied(), r.ttft_ms, "{r:?}");
            assert!(r.token_ms.windows(2).all(|w| w[0] <= w[1]), "{r:?}");
        }
    }
    let batched = report
        .analysis
        .levels
        .iter()
        .find(|l| l.mode == "batched")
        .unwrap();
    assert!(batched.vs_threads.is_some_and(|r| r > 0.0));
    assert!(report.tests.iter().all(|t| t.dtype == "f32"), "f32 by default");
    let profile = report.profile.expect("--profile adds the per-op table");
    let [profile] = &profile[..] else {
        panic!("one table per dtype: {profile:?}")
    };
    assert_eq!(profile.dtype, "f32");
    for op in ["qkv", "attention", "mlp up", "lm head", "sampling"] {
        assert!(
            profile
                .rows
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
        (
            vec!["--dtype", "f32,fp8"],
            "unknown dtype `fp8`: expected f32, bf16 or int8",
        ),
        (vec!["--choices", "0"], "--choices must be at least 1"),
        (
            vec!["--choices", "2"],
            "--choices 2 needs --mode batched: threads mode runs each request on its own session",
        ),
        (
            vec!["--choices", "40", "--mode", "batched"],
            "--choices 40 is more than --max-batch 32",
        ),
        (
            vec!["--choices", "2", "--mode", "batched", "--profile"],
            "--profile times the single request's own session",
        ),
        (vec!["--prompt-tokens", "0"], "--prompt-tokens must be at least 1"),
        (
            vec!["--shared-prefix-tokens", "8"],
            "--shared-prefix-tokens shapes synthetic prompts: it needs --prompt-tokens <N>",
        ),
        (
            vec!["--prompt-tokens", "4", "--prompt", "hi"],
            "--prompt <PROMPT>",
        ),
        (
            vec!["--prompt-tokens", "100", "--shared-prefix-tokens", "20"],
            "each synthetic prompt (--shared-prefix-tokens 20 + --prompt-tokens 100) is 120 tokens; with \
             --max-new-tokens 30 it needs 149 positions, past the context window of 128",
        ),
        (
            vec!["--prefix-cache-mib", "16", "--mode", "threads"],
            "--prefix-cache-mib 16 is batched mode's scheduler's; --mode threads has none",
        ),
    ] {
        let mut all = vec!["--weights", w];
        all.extend(args);
        let out = throughput(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{all:?} should fail");
        assert!(stderr.contains(needle), "{all:?}: {stderr}");
    }
}

/// `--shared-prefix-tokens` with a prefix cache: every request after the
/// warmup starts from the cached preamble, and each test says how much it
/// reused; `--choices 2` generates and counts twice the tokens, each
/// choice's apart. Without the cache (the default) nothing is reused.
#[test]
fn shared_prefixes_are_reused_and_choices_counted() {
    let weights = synth_dir(Preset::Tiny, 0);
    let out_dir = scratch_dir("throughput-prefix");
    let (w, o) = (weights.to_str().unwrap(), out_dir.to_str().unwrap());
    let run = |extra: &[&str]| -> gpt2_bench::Report {
        let mut args = vec![
            "--weights",
            w,
            "--mode",
            "batched",
            "--prompt-tokens",
            "4",
            "--shared-prefix-tokens",
            "8",
            "--max-new-tokens",
            "3",
            "--warmup",
            "1",
            "--single-requests",
            "2",
            "--levels",
            "2",
            "--requests-per-level",
            "4",
            "--json",
            "--out-dir",
            o,
        ];
        args.extend(extra);
        let out = throughput_within(&args, 120);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(matches!(out.status.code(), Some(0 | 3)), "{extra:?}: {stderr}");
        serde_json::from_str(&stdout).unwrap()
    };

    let reused = run(&["--prefix-cache-mib", "16", "--choices", "2"]);
    let md = &reused.metadata;
    assert_eq!(
        (
            md.prompt_tokens,
            md.shared_prefix_tokens,
            md.choices,
            md.prefix_cache_mib
        ),
        (Some(4), 8, 2, Some(16))
    );
    assert!(md.prompts.is_empty(), "no text prompts: {:?}", md.prompts);
    assert!(
        md.workload().contains("prefix reuse: on, 16 MiB"),
        "{}",
        md.workload()
    );
    let names: Vec<(&str, &str)> = reused
        .tests
        .iter()
        .map(|t| (t.name.as_str(), t.mode.as_str()))
        .collect();
    assert_eq!(
        names,
        [("single", "batched"), ("concurrent-2", "batched")],
        "several choices run batched, the single request too"
    );
    for t in &reused.tests {
        assert_eq!((t.failed, t.total_tokens), (0, t.requests * 2 * 3), "{}", t.name);
        let r = t.requests as u64;
        assert_eq!(
            t.prefix,
            Some(gpt2_bench::PrefixReuse {
                hits: r,
                tokens_reused: 8 * r
            }),
            "{}: every request starts from the preamble the warmup left, and from no more",
            t.name
        );
        for rec in &t.raw {
            assert_eq!((rec.prompt_tokens, rec.generated_tokens), (12, 6), "{rec:?}");
            assert!(rec.token_ms.is_empty(), "{rec:?}");
            assert_eq!(rec.choice_ms.len(), 2, "{rec:?}");
            assert!(rec.choice_ms.iter().all(|c| c.len() == 3), "{rec:?}");
        }
    }

    let cold = run(&[]);
    assert_eq!(
        (cold.metadata.choices, cold.metadata.prefix_cache_mib),
        (1, Some(0))
    );
    for t in &cold.tests {
        assert_eq!((t.failed, t.total_tokens), (0, t.requests * 3), "{}", t.name);
        let counted = (t.mode == "batched").then_some(gpt2_bench::PrefixReuse::default());
        assert_eq!(t.prefix, counted, "{} {}: no cache, no reuse", t.name, t.mode);
        assert!(t
            .raw
            .iter()
            .all(|r| r.token_ms.len() == 3 && r.choice_ms.is_empty()));
    }
}

fn quick<'a>(weights: &'a str, out_dir: &'a str) -> Vec<&'a str> {
    vec![
        "--weights",
        weights,
        "--max-new-tokens",
        "3",
        "--warmup",
        "0",
        "--single-requests",
        "1",
        "--levels",
        "2",
        "--requests-per-level",
        "2",
        "--mode",
        "batched",
        "--out-dir",
        out_dir,
    ]
}

/// Each dtype (given twice, run once) loads its own model and runs every
/// test; the report names the dtype of every test, level and target, and
/// each dtype's memory. (`--probe` per dtype is left to the unit tests of
/// `bench::roofline`: measuring the machine takes 5 to 10 s and 1 GiB.)
#[test]
fn several_dtypes_run_every_test_each() {
    let weights = synth_dir(Preset::Tiny, 0);
    let out_dir = scratch_dir("throughput-dtypes");
    let mut args = quick(weights.to_str().unwrap(), out_dir.to_str().unwrap());
    args.extend(["--dtype", "f32,bf16,f32", "--json"]);
    let out = throughput_within(&args, 240);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // The default targets are a real machine's: a tiny model may miss none or some.
    assert!(matches!(out.status.code(), Some(0 | 3)), "{stderr}");
    let report: gpt2_bench::Report = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report.schema_version, 5);
    let dtypes: Vec<&str> = report.metadata.dtypes.iter().map(|d| d.dtype.as_str()).collect();
    assert_eq!(dtypes, ["f32", "bf16"]);
    for d in &report.metadata.dtypes {
        assert!(d.packed_weight_bytes.is_some_and(|b| b > 0), "{d:?}");
        let (rss, peak) = (d.rss_after_load_bytes.unwrap(), d.peak_rss_bytes.unwrap());
        assert!(rss > 0 && peak >= rss, "{d:?}");
    }
    let tests: Vec<(&str, &str)> = report
        .tests
        .iter()
        .map(|t| (t.dtype.as_str(), t.name.as_str()))
        .collect();
    assert_eq!(
        tests,
        [
            ("f32", "single"),
            ("f32", "concurrent-2"),
            ("bf16", "single"),
            ("bf16", "concurrent-2")
        ]
    );
    assert!(report
        .tests
        .iter()
        .all(|t| t.failed == 0 && t.total_tokens == t.requests * 3));
    let a = &report.analysis;
    for l in &a.levels {
        assert_eq!(l.vs_f32.is_some(), l.dtype == "bf16", "{l:?}");
    }
    // Every target is met or missed per dtype.
    for name in ["single_tokens_per_s", "failed"] {
        let of: Vec<&str> = a
            .targets
            .iter()
            .filter(|t| t.name == name)
            .map(|t| t.dtype.as_str())
            .collect();
        assert_eq!(of, ["f32", "bf16"], "{name}");
    }
    assert!(stderr.contains("[single threads bf16]"), "{stderr}");
    // The Markdown report compares them.
    let md = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "md"))
        .unwrap();
    let md = std::fs::read_to_string(md).unwrap();
    assert!(md.contains("## Dtype comparison"), "{md}");
    assert!(md.lines().any(|l| l.starts_with("| bf16 ")), "{md}");
}

/// An unknown dtype is a usage error (status 2) that names it, before
/// anything is loaded.
#[test]
fn an_unknown_dtype_is_refused_by_name() {
    let weights = synth_dir(Preset::Tiny, 0);
    let out = throughput(&["--weights", weights.to_str().unwrap(), "--dtype", "fp8"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("fp8") && stderr.contains("--dtype"), "{stderr}");
    assert!(!stderr.contains("weights:"), "loaded before refusing: {stderr}");
}

#[test]
fn impossible_levels_and_rates_are_refused_not_a_hang() {
    let weights = synth_dir(Preset::Tiny, 0);
    let w = weights.to_str().unwrap();
    for (args, needle) in [
        (vec!["--levels", "100000"], "--levels"),
        (vec!["--request-rate", "1e-9"], "--request-rate 0.000000001"),
    ] {
        let mut all = vec!["--weights", w];
        all.extend(args);
        let out = throughput_within(&all, 60);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{all:?}: a bad flag: {stderr}");
        assert!(
            stderr.contains(needle) && !stderr.contains("panicked"),
            "{all:?}: {stderr}"
        );
    }
}

#[test]
fn an_unwritable_out_dir_is_named_before_the_run() {
    let weights = synth_dir(Preset::Tiny, 0);
    let scratch = scratch_dir("throughput-unwritable");
    let file = scratch.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let bad = file.join("reports");
    let out = throughput_within(&quick(weights.to_str().unwrap(), bad.to_str().unwrap()), 60);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("a-file/reports"), "{stderr}");
    assert!(
        !stderr.contains("request 1/"),
        "ran before checking the directory: {stderr}"
    );
}

#[test]
fn exit_status_tells_missed_targets_from_failed_requests() {
    let weights = synth_dir(Preset::Tiny, 0);
    let out_dir = scratch_dir("throughput-exit");
    let o = out_dir.to_str().unwrap();
    let mut args = quick(weights.to_str().unwrap(), o);
    args.extend(["--target", "single_tokens_per_s=1e12"]);
    let out = throughput_within(&args, 120);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("targets missed: single_tokens_per_s"), "{stderr}");

    // Every request fails (the MLP overflows to NaN): exit 4, report written.
    let broken = common::overflowing_checkpoint("throughput-overflow");
    let fail_dir = scratch_dir("throughput-exit-fail");
    let out = throughput_within(&quick(broken.to_str().unwrap(), fail_dir.to_str().unwrap()), 120);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("FAILED: 3 of 3 requests failed"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(&fail_dir).unwrap().count(),
        3,
        "the report is still written"
    );
}

#[test]
fn runs_started_together_never_overwrite_each_other() {
    let weights = synth_dir(Preset::Tiny, 0);
    let out_dir = scratch_dir("throughput-together");
    let (w, o) = (weights.to_str().unwrap(), out_dir.to_str().unwrap());
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let args: Vec<String> = quick(w, o).into_iter().map(String::from).collect();
            std::thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                throughput_within(&args, 120)
            })
        })
        .collect();
    for r in runs {
        let out = r.join().unwrap();
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 12, "4 runs, 3 files each: {names:?}");
    for n in names.iter().filter(|n| n.ends_with(".md")) {
        // Each Markdown report links its own SVG.
        let md = std::fs::read_to_string(out_dir.join(n)).unwrap();
        assert!(md.contains(&n.replace(".md", ".svg")), "{n}");
    }
}
