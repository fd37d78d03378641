//! `throughput compare A.json B.json ...`: several reports (any schema
//! [`super::legacy`] reads; in-process and `--url` runs, other machines)
//! rendered into one Markdown table and one SVG with every curve
//! ([`super::report::compare_markdown`], [`super::report::compare_svg`]),
//! written as new files like a run's.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{meta, report, run, Report, SCHEMA_VERSION};

/// The longest report we read (a `--full` run at 32 clients is a few MB).
const REPORT_LIMIT: u64 = 256 << 20;

/// The `throughput compare` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareOptions {
    /// The JSON reports to compare, in the order their curves are numbered.
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
    let report: Report = serde_json::from_str(&text)
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

/// Reads every report (all of them before writing anything), writes the
/// comparison, prints the Markdown on stdout; returns the written paths.
pub fn compare(opts: &CompareOptions) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    gpt2::files::check_writable_dir(&opts.out_dir)?;
    let reports = opts
        .reports
        .iter()
        .map(|p| Ok((p.display().to_string(), read_report(p)?)))
        .collect::<Result<Vec<_>, String>>()?;
    let base = format!(
        "throughput_compare_{}",
        meta::utc_timestamp(SystemTime::now(), false)
    );
    let svg = report::compare_svg(&reports);
    let paths = run::write_set(&opts.out_dir, &base, |stem| {
        vec![
            (
                "md",
                report::compare_markdown(&reports, &format!("{stem}.svg")).into_bytes(),
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
