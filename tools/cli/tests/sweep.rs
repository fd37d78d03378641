//! `throughput --sweep` end to end on the tiny synthetic model: every cell
//! in the JSON, an SVG per axis, the cells' order rotating, and bad sweeps
//! refused by name before anything runs.

mod common;

use common::{scratch_dir, synth_dir, throughput_within};
use gpt2::synth::Preset;
use gpt2_bench::Report;

/// The flags of a short run: 3 new tokens, no warmup, one single request,
/// one level of 2 requests, batched mode.
fn quick<'a>(out_dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--warmup",
        "0",
        "--single-requests",
        "1",
        "--requests-per-level",
        "2",
        "--mode",
        "batched",
        "--json",
        "--out-dir",
        out_dir,
    ];
    args.extend(extra);
    args
}

/// Runs a sweep that must succeed; its report, stderr and the files written.
fn sweep_ok(args: &[&str], out_dir: &std::path::Path) -> (Report, String, Vec<String>) {
    let out = throughput_within(args, 120);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    // The default targets are not held in a sweep: a good run exits 0.
    assert_eq!(out.status.code(), Some(0), "{args:?}\n{stderr}");
    let report: Report = serde_json::from_str(&stdout).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    (report, stderr, files)
}

/// prompt-tokens x dtype, two repetitions: four cells, each with its own
/// load and every test twice, their order rotating; the JSON keeps each
/// cell's settings, memory and analysis; one SVG per axis, no saturation
/// curve (it would mix the cells).
#[test]
fn a_two_by_two_sweep_keeps_every_cell_and_draws_each_axis() {
    let weights = synth_dir(Preset::Tiny, 0);
    let out_dir = scratch_dir("sweep-2x2");
    let (w, o) = (weights.to_str().unwrap(), out_dir.to_str().unwrap());
    let args = quick(
        o,
        &[
            "--weights",
            w,
            "--max-new-tokens",
            "3",
            "--levels",
            "2",
            "--repetitions",
            "2",
            "--sweep",
            "prompt-tokens=4,9",
            "--sweep",
            "dtype=f32,bf16",
        ],
    );
    let (report, stderr, files) = sweep_ok(&args, &out_dir);
    assert_eq!(report.schema_version, 5);
    let sweep = report.sweep.as_ref().expect("a sweep report");
    let axes: Vec<(&str, Vec<&str>)> = sweep
        .axes
        .iter()
        .map(|a| (a.axis.as_str(), a.values.iter().map(String::as_str).collect()))
        .collect();
    assert_eq!(
        axes,
        [("prompt-tokens", vec!["4", "9"]), ("dtype", vec!["f32", "bf16"])]
    );
    let cells: Vec<(Option<usize>, &str)> = sweep
        .cells
        .iter()
        .map(|c| (c.prompt_tokens, c.dtype.as_str()))
        .collect();
    assert_eq!(
        cells,
        [
            (Some(4), "f32"),
            (Some(4), "bf16"),
            (Some(9), "f32"),
            (Some(9), "bf16")
        ],
        "the first axis varies slowest"
    );
    assert_eq!(
        sweep.order,
        [vec![0, 1, 2, 3], vec![1, 2, 3, 0]],
        "each repetition starts one cell on"
    );
    // The progress lines say the same order.
    let ran: Vec<&str> = stderr.lines().filter(|l| l.starts_with("cell ")).collect();
    assert_eq!(ran.len(), 8, "{stderr}");
    assert!(
        ran[4].starts_with("cell 1 (prompt-tokens=4, dtype=bf16), repetition 2 of 2"),
        "{ran:?}"
    );
    for (i, c) in sweep.cells.iter().enumerate() {
        assert_eq!(c.swept["prompt-tokens"], c.prompt_tokens.unwrap().to_string());
        assert_eq!(c.swept["dtype"], c.dtype);
        assert_eq!((c.max_new_tokens, c.concurrency_levels.clone()), (3, vec![1, 2]));
        assert!(c.memory.packed_weight_bytes.is_some_and(|b| b > 0), "{c:?}");
        assert!(c.memory.peak_rss_bytes >= c.memory.rss_after_load_bytes, "{c:?}");
        let levels: Vec<(&str, usize)> = c
            .analysis
            .levels
            .iter()
            .map(|l| (l.mode.as_str(), l.concurrency))
            .collect();
        assert_eq!(levels, [("threads", 1), ("batched", 2)], "cell {i}");
        let tests: Vec<_> = report.tests.iter().filter(|t| t.cell == Some(i)).collect();
        assert_eq!(tests.len(), 4, "cell {i}: single and batched c2, twice");
        for t in tests {
            assert_eq!((t.dtype.as_str(), t.failed), (c.dtype.as_str(), 0), "cell {i}");
            assert_eq!(t.total_tokens, t.requests * 3);
            assert!(t.raw.iter().all(|r| r.prompt_tokens == c.prompt_tokens.unwrap()));
        }
    }
    assert!(report.tests.iter().all(|t| t.cell.is_some()));
    // Only `failed` is held, once per cell.
    let targets: Vec<(&str, Option<usize>)> = report
        .analysis
        .targets
        .iter()
        .map(|t| (t.name.as_str(), t.cell))
        .collect();
    assert_eq!(targets, (0..4).map(|i| ("failed", Some(i))).collect::<Vec<_>>());
    assert!(report.analysis.levels.is_empty(), "levels live in the cells");

    let svg = |axis: &str| files.iter().find(|f| f.ends_with(&format!(".{axis}.svg")));
    assert_eq!(files.len(), 4, "json, md and an SVG per axis: {files:?}");
    for axis in ["prompt-tokens", "dtype"] {
        let name = svg(axis).unwrap_or_else(|| panic!("no SVG of {axis}: {files:?}"));
        let text = std::fs::read_to_string(out_dir.join(name)).unwrap();
        // Against prompt-tokens a curve per dtype and test (single, batched
        // c2), and the same against dtype per prompt length: 4 curves, 2 panels.
        assert_eq!(text.matches("<polyline").count(), 8, "{axis}: {text}");
    }
    let md = files.iter().find(|f| f.ends_with(".md")).unwrap();
    let md = std::fs::read_to_string(out_dir.join(md)).unwrap();
    assert!(
        md.contains("## Sweep") && md.contains("### Against prompt-tokens"),
        "{md}"
    );
    assert!(
        md.contains(svg("dtype").unwrap().as_str()),
        "the Markdown links each SVG"
    );
}

/// model x concurrency: a preset by name and a checkpoint directory; a
/// cell of concurrency 1 runs the single request alone, one of 3 its level.
#[test]
fn models_and_concurrency_sweep_by_name() {
    let weights = synth_dir(Preset::Tiny, 0);
    let out_dir = scratch_dir("sweep-models");
    let (w, o) = (weights.to_str().unwrap(), out_dir.to_str().unwrap());
    let models = format!("model=tiny,{w}");
    let args = quick(
        o,
        &[
            "--max-new-tokens",
            "2",
            "--kv-dtype",
            "bf16",
            "--sweep",
            &models,
            "--sweep",
            "concurrency=1,3",
        ],
    );
    let (report, _, files) = sweep_ok(&args, &out_dir);
    let sweep = report.sweep.unwrap();
    let cells: Vec<(&str, Vec<usize>)> = sweep
        .cells
        .iter()
        .map(|c| (c.swept["model"].as_str(), c.concurrency_levels.clone()))
        .collect();
    assert_eq!(
        cells,
        [
            ("tiny", vec![1]),
            ("tiny", vec![1, 3]),
            (w, vec![1]),
            (w, vec![1, 3])
        ]
    );
    assert!(sweep
        .cells
        .iter()
        .all(|c| c.model.n_layer == 2 && c.synthetic_weights));
    assert!(
        sweep.cells[0].weights_source.contains("SYNTHETIC tiny"),
        "{:?}",
        sweep.cells[0]
    );
    assert_eq!(report.metadata.concurrency_levels, [1, 3]);
    assert_eq!(report.metadata.kv_dtype, "bf16");
    assert!(sweep.cells.iter().all(|c| c.kv_dtype == "bf16"));
    assert_eq!(report.metadata.model, None, "the model is swept");
    for (i, c) in sweep.cells.iter().enumerate() {
        let conc: Vec<usize> = report
            .tests
            .iter()
            .filter(|t| t.cell == Some(i))
            .map(|t| t.concurrency)
            .collect();
        assert_eq!(conc, c.concurrency_levels, "cell {i}");
    }
    assert!(
        files.iter().any(|f| f.ends_with(".model.svg"))
            && files.iter().any(|f| f.ends_with(".concurrency.svg"))
    );
}

/// The KV cache's format as an axis: each cell's caches in its own.
#[test]
fn the_kv_cache_format_sweeps() {
    let weights = synth_dir(Preset::Tiny, 0);
    let out_dir = scratch_dir("sweep-kv");
    let (w, o) = (weights.to_str().unwrap(), out_dir.to_str().unwrap());
    let args = quick(
        o,
        &[
            "--weights",
            w,
            "--max-new-tokens",
            "3",
            "--levels",
            "2",
            "--prompt-tokens",
            "40",
            "--sweep",
            "kv-dtype=bf16,f32",
        ],
    );
    let (report, stderr, files) = sweep_ok(&args, &out_dir);
    let sweep = report.sweep.unwrap();
    let kv: Vec<&str> = sweep.cells.iter().map(|c| c.kv_dtype.as_str()).collect();
    assert_eq!(kv, ["bf16", "f32"]);
    assert_eq!(report.metadata.kv_dtype, "f32", "the run's flag, not given");
    assert!(stderr.contains("dtype f32, KV cache bf16:"), "{stderr}");
    assert!(report
        .tests
        .iter()
        .all(|t| t.failed == 0 && t.total_tokens == 3 * t.requests));
    assert!(files.iter().any(|f| f.ends_with(".kv-dtype.svg")), "{files:?}");
}

/// Bad sweeps are flag errors (status 2) that name the flag and the value,
/// before anything is loaded; a cell past the context is named (status 1).
#[test]
fn bad_sweeps_are_refused_by_name() {
    let weights = synth_dir(Preset::Tiny, 0);
    let w = weights.to_str().unwrap();
    for (args, needles) in [
        (
            vec!["--sweep", "prompt-tokens=6,abc"],
            vec!["--sweep", "`abc` is not a number of prompt tokens"],
        ),
        (
            vec!["--sweep", "width=1,2"],
            vec!["--sweep", "unknown axis `width`"],
        ),
        (
            vec!["--sweep", "concurrency=2,2"],
            vec!["--sweep", "the value `2` is given twice"],
        ),
        (
            vec!["--sweep", "dtype=f32,fp8"],
            vec!["--sweep", "unknown dtype `fp8`"],
        ),
        (
            vec!["--sweep", "dtype=f32,bf16", "--dtype", "int8"],
            vec!["--sweep dtype and --dtype"],
        ),
        (
            vec!["--sweep", "concurrency=1,2", "--levels", "4"],
            vec!["--sweep concurrency and --levels"],
        ),
        (
            vec!["--sweep", "max-new-tokens=2,4", "--max-new-tokens", "3"],
            vec!["--sweep max-new-tokens and --max-new-tokens"],
        ),
        (
            vec!["--sweep", "prompt-tokens=4", "--prompt-tokens", "8"],
            vec!["--sweep prompt-tokens and --prompt-tokens"],
        ),
        (
            vec!["--sweep", "model=tiny", "--synthetic"],
            vec!["--sweep model and --synthetic"],
        ),
        (
            vec!["--sweep", "prompt-tokens=4", "--sweep", "prompt-tokens=8"],
            vec!["--sweep prompt-tokens: the axis is swept twice"],
        ),
        (
            vec!["--sweep", "prompt-tokens=4", "--probe"],
            vec!["--sweep", "--probe"],
        ),
        (
            vec!["--sweep", "kv-dtype=f32,bf16", "--kv-dtype", "bf16"],
            vec!["--sweep kv-dtype and --kv-dtype"],
        ),
        (vec!["--sweep", "kv-dtype=f32,fp8"], vec!["--sweep", "kv-dtype: "]),
        (
            vec!["--kv-dtype", "bf16", "--probe"],
            vec!["--probe counts the KV cache's bytes"],
        ),
        (
            vec!["--sweep", "model=tiny", "--synthetic-preset", "tiny"],
            vec!["--sweep model and --synthetic-preset"],
        ),
    ] {
        let mut all = vec!["--weights", w];
        if args.contains(&"--synthetic") || args.contains(&"--synthetic-preset") {
            all.clear();
        }
        all.extend(&args);
        let out = throughput_within(&all, 30);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {stderr}");
        for n in needles {
            assert!(stderr.contains(n), "{all:?}: no {n:?} in {stderr}");
        }
        assert!(!stderr.contains("weights:"), "loaded before refusing: {stderr}");
    }
    // tiny has 128 positions: 120 prompt tokens and 30 new ones do not fit.
    let out_dir = scratch_dir("sweep-context");
    let out = throughput_within(
        &[
            "--weights",
            w,
            "--out-dir",
            out_dir.to_str().unwrap(),
            "--sweep",
            "prompt-tokens=4,120",
        ],
        30,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--sweep cell 1 (prompt-tokens=120)")
            && stderr.contains("past the context window of 128"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("request 1/") && !stderr.contains("cell 0 ("),
        "ran a cell before refusing: {stderr}"
    );
}

/// A cell that cannot fit the machine's memory is refused up front, by
/// name, before any cell runs and before a weight is read: here XL's config
/// alone (no weights file), 1024 sequences of 930 positions (some 550 GiB of
/// KV cache) in the second cell.
#[test]
fn a_cell_too_large_for_memory_is_refused_before_any_runs() {
    let dir = scratch_dir("sweep-memory-xl");
    std::fs::write(dir.join("config.json"), Preset::Xl.config_json(0)).unwrap();
    let out_dir = scratch_dir("sweep-memory-out");
    let out = throughput_within(
        &[
            "--weights",
            dir.to_str().unwrap(),
            "--out-dir",
            out_dir.to_str().unwrap(),
            "--mode",
            "batched",
            "--sweep",
            "prompt-tokens=4,900",
            "--sweep",
            "concurrency=1,1024",
        ],
        60,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for needle in ["not enough memory", "--sweep cell ", "sequences of", "available"] {
        assert!(stderr.contains(needle), "no {needle:?} in {stderr}");
    }
    assert!(
        !stderr.contains("model.safetensors"),
        "a weight was looked for: {stderr}"
    );
    assert!(
        !stderr.lines().any(|l| l.starts_with("cell ")),
        "a cell ran: {stderr}"
    );
}
