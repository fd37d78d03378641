//! `throughput compare A.json B.json ...`: several reports (any schema
//! [`super::legacy`] reads; in-process and `--url` runs, other machines)
//! and llama.cpp's benchmark outputs ([`super::llama`]) rendered into one
//! Markdown table and one SVG with every curve
//! ([`super::report::compare_markdown`], [`super::report::compare_svg`]),
//! written as new files like a run's.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::llama::{self, LlamaPoint};
use super::report::Compared;
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
    let paths = run::write_set(&opts.out_dir, &base, |stem| {
        vec![
            (
                "md",
                report::compare_markdown(&compared, &format!("{stem}.svg")).into_bytes(),
            ),
            ("svg", svg.clone().into_bytes()),
        ]
    })?;
    if let Some(md) = paths.first() {
        print!("{}", std::fs::read_to_string(md)?);
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    eprintln!("wrote {}", names.join(", "));
    Ok(paths)
}
