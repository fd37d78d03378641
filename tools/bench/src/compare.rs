//! `throughput compare A.json B.json ...`: several reports (any schema
//! [`super::legacy`] reads; in-process and `--url` runs, other machines)
//! and llama.cpp's benchmark outputs ([`super::llama`]) rendered into one
//! Markdown table and one SVG with every curve
//! ([`super::report::compare_markdown`], [`super::report::compare_svg`]),
//! and, for sweeps beside llama-bench outputs, one SVG per shared axis with
//! both engines' curves ([`joint_axes`]); written as new files like a run's.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::llama::{self, LlamaAxis, LlamaPoint};
use super::report::{Compared, CurvePoint};
use super::{meta, report, run, Report, SCHEMA_VERSION};

/// The longest report we read (a `--full` run at 32 clients is a few MB).
const REPORT_LIMIT: u64 = 256 << 20;

/// The `throughput compare` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareOptions {
    /// The JSON reports to compare, numbered in the order given (1, 2,
    /// ...), and llama.cpp's outputs, told apart by their content and
    /// numbered L1, L2, ...: `llama-bench -o json` or `-o jsonl`, and
    /// `llama-batched-bench --output-format jsonl` in a file named after
    /// its GGUF (`<model>-<dtype>.jsonl`). A directory stands for its
    /// `.json` and `.jsonl` files in name order (`scripts/llama-curves.sh`
    /// writes one).
    #[arg(value_name = "REPORT.json", required = true)]
    pub reports: Vec<PathBuf>,
    /// Directory for the Markdown table and the SVG
    /// (`throughput_compare_<UTC>[_N].{md,svg}`, never over an earlier file).
    #[arg(long, default_value = "data/benchmarks")]
    pub out_dir: PathBuf,
}

/// Reads one report; errors name the file and what is wrong with it.
pub fn read_report(path: &Path) -> Result<Report, String> {
    let text = gpt2::files::read_bounded_string(path, REPORT_LIMIT).map_err(|e| e.to_string())?;
    parse_report(path, &text)
}

/// [`read_report`] on text already read from `path`.
fn parse_report(path: &Path, text: &str) -> Result<Report, String> {
    let report: Report = serde_json::from_str(text)
        .map_err(|e| format!("{}: not a throughput report: {e}", path.display()))?;
    if report.schema_version > SCHEMA_VERSION {
        return Err(format!(
            "{}: schema version {} is newer than this binary reads ({SCHEMA_VERSION}); use a newer throughput",
            path.display(),
            report.schema_version
        ));
    }
    Ok(report)
}

/// Our reports and llama.cpp's outputs, each with its file's name.
#[derive(Default)]
struct Inputs {
    reports: Vec<(String, Report)>,
    llama: Vec<(String, Vec<LlamaPoint>)>,
}

impl Inputs {
    /// Reads `path`, a report or a llama.cpp output, told apart by content.
    fn read(&mut self, path: &Path) -> Result<(), String> {
        let text = gpt2::files::read_bounded_string(path, REPORT_LIMIT).map_err(|e| e.to_string())?;
        let name = path.display().to_string();
        if llama::detect(&text).is_some() {
            self.llama.push((name, llama::parse_llama(path, &text)?));
        } else {
            self.reports.push((name, parse_report(path, &text)?));
        }
        Ok(())
    }
}

/// The files `path` stands for: itself, or a directory's `.json` and
/// `.jsonl` files in name order.
fn expand(path: &Path) -> Result<Vec<PathBuf>, String> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let p = entry.map_err(|e| format!("{}: {e}", path.display()))?.path();
        if matches!(p.extension().and_then(|e| e.to_str()), Some("json" | "jsonl")) {
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(format!("{}: no .json or .jsonl files in it", path.display()));
    }
    files.sort();
    Ok(files)
}

/// Reads every input (all of them before writing anything), writes the
/// comparison, prints the Markdown on stdout; returns the written paths.
pub fn compare(opts: &CompareOptions) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    gpt2::files::check_writable_dir(&opts.out_dir)?;
    let mut inputs = Inputs::default();
    for arg in &opts.reports {
        for path in expand(arg)? {
            inputs.read(&path)?;
        }
    }
    let compared = Compared {
        reports: &inputs.reports,
        llama: &inputs.llama,
    };
    let base = format!(
        "throughput_compare_{}",
        meta::utc_timestamp(SystemTime::now(), false)
    );
    let svg = report::compare_svg(&compared);
    let joint = joint_axes(&inputs);
    let paths = run::write_set(&opts.out_dir, &base, |stem| {
        let mut files = vec![
            (
                "md".to_string(),
                report::compare_markdown(&compared, &format!("{stem}.svg")).into_bytes(),
            ),
            ("svg".to_string(), svg.clone().into_bytes()),
        ];
        files.extend(
            joint
                .iter()
                .map(|(ext, svg)| (ext.clone(), svg.clone().into_bytes())),
        );
        files
    })?;
    if let Some(md) = paths.first() {
        print!("{}", std::fs::read_to_string(md)?);
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    eprintln!("wrote {}", names.join(", "));
    Ok(paths)
}

/// The family and context curves of both engines in one SVG each, where
/// the inputs have them: against prompt tokens, each engine's prefill
/// tokens/s (ours: a sweep's `prompt-tokens` cells, prompt tokens over the
/// single request's TTFT p50; llama.cpp: llama-bench's `pp` tests), and
/// against the model's parameters, each engine's decode tokens/s (ours: a
/// sweep's `model` cells, 1000 / the single request's TPOT p50; llama.cpp:
/// llama-bench's `tg` tests, whose count includes the GGUF's untied LM
/// head). Each as `(file extension, SVG)`.
fn joint_axes(inputs: &Inputs) -> Vec<(String, String)> {
    let llama: Vec<_> = inputs
        .llama
        .iter()
        .flat_map(|(_, points)| points.iter().filter_map(|p| p.curve_point()))
        .collect();
    let axes = [
        (
            "prompt-tokens",
            LlamaAxis::PromptTokens,
            "prefill tokens/s against prompt tokens",
        ),
        (
            "model",
            LlamaAxis::ModelParams,
            "decode tokens/s against model parameters",
        ),
    ];
    let mut out = Vec::new();
    for (axis, llama_axis, what) in axes {
        let mut points: Vec<CurvePoint> = inputs
            .reports
            .iter()
            .flat_map(|(_, r)| our_points(r, axis))
            .collect();
        if points.is_empty() {
            continue;
        }
        points.extend(llama.iter().filter(|p| p.axis == llama_axis).map(|p| CurvePoint {
            series: p.series.clone(),
            x: p.x,
            x_label: x_label(axis, p.x),
            tokens_per_s: p.tokens_per_s,
            ttft_ms: None,
        }));
        let title = format!("gpt2-rs and llama.cpp: {what}");
        out.push((
            report::axis_svg_ext(axis),
            report::axis_svg(&title, axis, &points),
        ));
    }
    out
}

/// Our points on `axis` ("prompt-tokens" or "model") from a sweep's cells,
/// as [`joint_axes`] describes; none for a report without that axis.
fn our_points(report: &Report, axis: &str) -> Vec<CurvePoint> {
    let Some(sweep) = &report.sweep else {
        return Vec::new();
    };
    if !sweep.axes.iter().any(|a| a.axis == axis) {
        return Vec::new();
    }
    let mut points = Vec::new();
    for (i, cell) in sweep.cells.iter().enumerate() {
        let single: Vec<&crate::TestResult> = report
            .tests
            .iter()
            .filter(|t| t.cell == Some(i) && t.name == "single" && t.failed == 0)
            .collect();
        let median = |v: Vec<f64>| -> Option<f64> {
            let mut v: Vec<f64> = v.into_iter().filter(|x| x.is_finite() && *x > 0.0).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied()
        };
        let others: Vec<String> = cell
            .swept
            .iter()
            .filter(|(a, _)| a.as_str() != axis)
            .map(|(a, v)| format!("{a}={v}"))
            .collect();
        let (x, y, what) = if axis == "prompt-tokens" {
            let Some(n) = cell.prompt_tokens else { continue };
            let ttft = median(single.iter().map(|t| t.ttft_ms.p50).collect());
            (n as f64, ttft.map(|ms| n as f64 / ms * 1e3), "prefill")
        } else {
            let tpot = median(single.iter().map(|t| t.tpot_ms.p50).collect());
            (cell.model.n_params as f64, tpot.map(|ms| 1e3 / ms), "decode")
        };
        let Some(y) = y else { continue };
        let mut series = format!("gpt2-rs {} {what}", cell.dtype);
        if !others.is_empty() {
            series = format!("{series} ({})", others.join(", "));
        }
        points.push(CurvePoint {
            series,
            x,
            x_label: x_label(axis, x),
            tokens_per_s: y,
            ttft_ms: None,
        });
    }
    points
}

/// How the joint plots name an x: tokens, or parameters in millions.
fn x_label(axis: &str, x: f64) -> String {
    if axis == "model" {
        format!("{:.0}M", x / 1e6)
    } else {
        format!("{x:.0}")
    }
}
