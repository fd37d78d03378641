//! `throughput compare` with llama.cpp's outputs beside our reports: the
//! committed captures of llama-bench and llama-batched-bench (on the
//! synthetic 124M, f32) and a committed report, rendered into one Markdown
//! file and one SVG; a bad llama.cpp file is named and nothing is written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{scratch_dir, throughput_within};

fn testdata(name: &str) -> PathBuf {
    common::repo_root().join("tools/bench/src/testdata").join(name)
}

const REPORT: &str = "schema2_probe_report.json";
const BENCH: &str = "llama-bench_124m-f32.json";
const BATCHED: &str = "llama-batched-bench_124m-f32.jsonl";

fn compare(out_dir: &Path, inputs: &[&Path]) -> Output {
    let mut args = vec!["compare", "--out-dir", out_dir.to_str().unwrap()];
    args.extend(inputs.iter().map(|p| p.to_str().unwrap()));
    throughput_within(&args, 60)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The one file of `ext` in `dir`, read.
fn only(dir: &Path, ext: &str) -> String {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    std::fs::read_to_string(&files[0]).unwrap()
}

/// The rows of the Markdown table under `## title`, split into cells.
fn rows(md: &str, title: &str) -> Vec<Vec<String>> {
    md.lines()
        .skip_while(|l| *l != title)
        .skip(4)
        .take_while(|l| l.starts_with("| "))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect()
}

#[test]
fn llama_cpp_curves_and_tests_sit_beside_a_report() {
    let out_dir = scratch_dir("compare-llama");
    let (report, bench, batched) = (testdata(REPORT), testdata(BENCH), testdata(BATCHED));
    let out = compare(&out_dir, &[&report, &bench, &batched]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let md = only(&out_dir, "md");
    assert!(md.contains("1 report and 2 llama.cpp files"), "{md}");

    let files = rows(&md, "## llama.cpp outputs");
    let tools: Vec<(&str, &str, &str)> = files
        .iter()
        .map(|r| (r[1].as_str(), r[3].as_str(), r[4].as_str()))
        .collect();
    assert_eq!(
        tools,
        [
            ("L1", "llama-bench", "124m f32"),
            ("L2", "llama-batched-bench", "124m f32")
        ],
        "{md}"
    );

    // llama-batched-bench's decode tokens/s at 1 and 4 sequences, as the
    // concurrency columns of our curves.
    let by_level = rows(&md, "## Tokens/s by concurrency");
    let llama: Vec<&Vec<String>> = by_level.iter().filter(|r| r[1] == "L2").collect();
    assert_eq!(llama.len(), 2, "a curve per prompt length: {md}");
    assert_eq!(llama[0][2], "llama.cpp 124m");
    assert_eq!(llama[0][3], "decode (pp 6, tg 30)");
    assert!(
        llama[0].contains(&"1.26".to_string()) && llama[0].contains(&"5.21".to_string()),
        "{md}"
    );
    let ours = by_level.len() - llama.len();
    assert!(ours > 0, "the report's curves are there too: {md}");
    assert_eq!(
        rows(&md, "## p50 latency (ms) by concurrency").len(),
        ours,
        "llama.cpp times no request end to end: {md}"
    );

    // llama-bench's tests as a table: prefills of 6 and 128 tokens, a decode of 30.
    let head = md
        .lines()
        .skip_while(|l| *l != "## llama-bench: tokens/s by test")
        .nth(2)
        .unwrap();
    assert!(
        head.contains("pp 6") && head.contains("pp 128") && head.contains("tg 30"),
        "{head}"
    );
    let bench_rows = rows(&md, "## llama-bench: tokens/s by test");
    assert_eq!(bench_rows.len(), 1, "{md}");
    let expected = [
        "L1",
        "124m",
        "f32",
        "163,037,184",
        "621.9",
        "2",
        "16.98",
        "18.93",
        "2.46",
    ];
    assert_eq!(bench_rows[0][1..10], expected, "{md}");

    let svg = only(&out_dir, "svg");
    assert_eq!(svg.matches("<polyline").count(), by_level.len(), "{svg}");
    assert!(
        svg.contains("[L2] llama.cpp 124m decode (pp 128, tg 30) f32, 2 threads"),
        "{svg}"
    );
}

/// A folder stands for its .json and .jsonl files, as
/// scripts/llama-curves.sh writes them.
#[test]
fn a_folder_of_llama_cpp_outputs_is_read_whole() {
    let folder = scratch_dir("compare-llama-folder");
    for name in [BENCH, BATCHED] {
        std::fs::copy(testdata(name), folder.join(name)).unwrap();
    }
    std::fs::write(folder.join("llama-bench_124m-f32.log"), "not read").unwrap();
    let out_dir = scratch_dir("compare-llama-folder-out");
    let out = compare(&out_dir, &[&folder]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let md = only(&out_dir, "md");
    assert!(md.contains("0 reports and 2 llama.cpp files, 2 curves"), "{md}");
}

#[test]
fn a_malformed_llama_cpp_file_is_named_and_nothing_is_written() {
    let dir = scratch_dir("compare-llama-bad");
    let good = std::fs::read_to_string(testdata(BATCHED)).unwrap();
    let no_rate = dir.join("llama-batched-bench_124m-f32.jsonl");
    std::fs::write(&no_rate, good.replacen(r#""speed_tg""#, r#""speed""#, 1)).unwrap();
    let unnamed = dir.join("batched.jsonl");
    std::fs::write(&unnamed, &good).unwrap();
    let bench = std::fs::read_to_string(testdata(BENCH)).unwrap();
    let cut = dir.join("llama-bench_124m-f32.json");
    std::fs::write(&cut, &bench[..bench.len() / 2]).unwrap();

    let out_dir = scratch_dir("compare-llama-bad-out");
    for (file, needle) in [
        (&no_rate, "line 1: missing field `speed_tg`"),
        (&unnamed, "<model>-<dtype>.jsonl"),
        (&cut, "llama-bench JSON"),
    ] {
        let out = compare(&out_dir, &[&testdata(REPORT), file]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(file.to_str().unwrap()) && err.contains(needle),
            "{err}"
        );
    }
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0, "nothing written");
}

/// A sweep over prompt tokens beside llama-bench's prefill tests: one more
/// SVG, against prompt tokens, with both engines' prefill curves (ours from
/// the cells' TTFT, llama.cpp's from its `pp` tests).
#[test]
fn a_prompt_sweep_and_llama_bench_share_one_prefill_plot() {
    let run_dir = scratch_dir("compare-llama-sweep-run");
    let run_str = run_dir.to_str().unwrap().to_string();
    let args = [
        "--synthetic-preset",
        "tiny",
        "--sweep",
        "prompt-tokens=6,16",
        "--max-new-tokens",
        "4",
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
        &run_str,
    ];
    let out = throughput_within(&args, 120);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("the sweep's JSON");
    let out_dir = scratch_dir("compare-llama-sweep");
    let out = compare(&out_dir, &[&report, &testdata(BENCH)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let joint = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".prompt-tokens.svg"))
        .expect("a prompt-tokens SVG");
    let svg = std::fs::read_to_string(joint).unwrap();
    assert!(svg.contains("gpt2-rs f32 prefill"), "{svg}");
    assert!(svg.contains("llama.cpp 124m f32 prefill"), "{svg}");
}
