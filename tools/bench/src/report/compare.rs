//! Several reports side by side (`throughput compare`): one Markdown table
//! and one SVG with every curve (tokens/s against concurrency), each curve a
//! (report, mode, dtype), labelled by the report's engine, mode and dtype
//! and its machine.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::svg::{dtype_dash, legend_entry, lg, nice_axis, no_data, series, Frame, Heading};
use super::*;

/// One curve: a (mode, dtype) of one report, its levels ascending.
struct Curve<'a> {
    /// 1-based number of its report, as the tables name it.
    report: usize,
    engine: String,
    mode: &'a str,
    dtype: &'a str,
    /// The CPU and cores of the machine that ran the benchmark (the
    /// client's, for a server).
    machine: String,
    levels: Vec<&'a LevelAnalysis>,
}

impl Curve<'_> {
    fn label(&self) -> String {
        format!(
            "[{}] {} {} {}, {}",
            self.report, self.engine, self.mode, self.dtype, self.machine
        )
    }

    fn at(&self, c: usize) -> Option<&LevelAnalysis> {
        self.levels.iter().copied().find(|l| l.concurrency == c)
    }
}

/// Every report's curves, in the order of the reports, then of their modes
/// and dtypes. A mode without its own concurrency-1 level starts from its
/// dtype's single request (shared by the modes).
fn curves(reports: &[(String, Report)]) -> Vec<Curve<'_>> {
    let mut out = Vec::new();
    for (i, (_, r)) in reports.iter().enumerate() {
        let levels = sorted_levels(&r.analysis.levels);
        let md = &r.metadata;
        let machine = format!(
            "{}{}, {} cores",
            if md.server.is_some() { "client " } else { "" },
            one_line(&md.cpu_model),
            md.cores
        );
        for mode in modes_in_order(&levels) {
            for dtype in dtypes_in_order(&levels) {
                let mut mine: Vec<&LevelAnalysis> = levels
                    .iter()
                    .copied()
                    .filter(|l| l.mode == mode && l.dtype == dtype)
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                if !mine.iter().any(|l| l.concurrency == 1) {
                    if let Some(single) = level_at(&levels, &dtype, &mode, 1) {
                        mine.insert(0, single);
                    }
                }
                // The mode's own levels come last (the shared single first).
                let own = mine[mine.len() - 1];
                out.push(Curve {
                    report: i + 1,
                    engine: md.engine(),
                    mode: &own.mode,
                    dtype: &own.dtype,
                    machine: machine.clone(),
                    levels: mine,
                });
            }
        }
    }
    out
}

/// The concurrency levels any curve measured, ascending.
fn all_levels(curves: &[Curve]) -> Vec<usize> {
    curves
        .iter()
        .flat_map(|c| c.levels.iter().map(|l| l.concurrency))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The comparison in Markdown: the reports (`(name, report)`, the name as
/// the user gave the file), then tokens/s and p50 latency of every curve
/// at every level, and the plot `svg_file_name` (linked relative to the
/// Markdown file).
pub fn compare_markdown(reports: &[(String, Report)], svg_file_name: &str) -> String {
    let curves = curves(reports);
    let mut out = String::from("# GPT-2 throughput comparison\n\n");
    let _ = writeln!(
        out,
        "{} report{}, {} curve{}: tokens/s and p50 end-to-end latency against concurrency, means \
         over each run's repetitions. Runs on different machines, engines, prompts or token counts \
         compare in shape, not in absolute numbers: the setup of each is listed first.\n",
        reports.len(),
        plural(reports.len()),
        curves.len(),
        plural(curves.len())
    );
    let synthetic: Vec<String> = reports
        .iter()
        .enumerate()
        .filter(|(_, (_, r))| r.metadata.synthetic_weights)
        .map(|(i, _)| format!("[{}]", i + 1))
        .collect();
    if !synthetic.is_empty() {
        let _ = writeln!(
            out,
            "> **{SYNTHETIC_BANNER}**: report{} {}.\n",
            plural(synthetic.len()),
            synthetic.join(", ")
        );
    }
    out.push_str("## Reports\n\n");
    out.push_str(&reports_table(reports).markdown());
    out.push_str(&by_level(&curves, "Tokens/s by concurrency", |l| {
        f2(l.tokens_per_s)
    }));
    out.push_str(&by_level(&curves, "p50 latency (ms) by concurrency", |l| {
        f1(l.latency_p50_ms)
    }));
    out.push_str("\n## Curves\n\n");
    let _ = writeln!(
        out,
        "![Tokens/s against concurrency, every curve]({})\n",
        md_link_target(svg_file_name)
    );
    out.push_str(
        "One line per report, mode and dtype (f32 solid, bf16 dashed, int8 dotted, other dtypes \
         dash-dotted), numbered as the reports above. Concurrency 1 is each run's single \
         request, shared by its modes.\n",
    );
    out
}

/// One row per report: what ran, where, when, with which weights.
fn reports_table(reports: &[(String, Report)]) -> Table {
    let mut t = Table::new(&[
        "#",
        "file",
        "engine",
        "CPU",
        "cores",
        "timestamp (UTC)",
        "git commit",
        "weights",
        "tokens/request",
        "arrival",
        "schema",
    ]);
    for c in [1, 2, 3, 5, 6, 7, 9] {
        t.left(c);
    }
    for (i, (name, r)) in reports.iter().enumerate() {
        let md = &r.metadata;
        let weights = if md.synthetic_weights {
            Cell::Markdown(format!("**SYNTHETIC** {}", md_text(&md.weights_source)))
        } else {
            Cell::Text(md.weights_source.clone())
        };
        t.row([
            (i + 1).to_string().into(),
            Cell::Code(name.clone()),
            Cell::Text(md.engine()),
            Cell::Text(md.cpu_model.clone()),
            md.cores.to_string().into(),
            Cell::Text(md.timestamp_utc.clone()),
            Cell::Code(short_sha(&md.git_commit)),
            weights,
            md.max_new_tokens.to_string().into(),
            Cell::Text(md.arrival.clone()),
            r.schema_version.to_string().into(),
        ]);
    }
    t
}

/// `## title`: every curve's `value` at every level any curve measured.
fn by_level(curves: &[Curve], title: &str, value: fn(&LevelAnalysis) -> String) -> String {
    let mut out = format!("\n## {title}\n\n");
    if curves.is_empty() {
        out.push_str("No levels in any report.\n");
        return out;
    }
    let xs = all_levels(curves);
    let heads: Vec<String> = ["#", "engine", "mode", "dtype", "machine"]
        .iter()
        .map(|s| s.to_string())
        .chain(xs.iter().map(|c| format!("c{c}")))
        .collect();
    let heads: Vec<&str> = heads.iter().map(String::as_str).collect();
    let mut t = Table::new(&heads);
    t.left(1).left(2).left(3).left(4);
    for c in curves {
        let mut row = vec![
            c.report.to_string().into(),
            Cell::Text(c.engine.clone()),
            Cell::Text(c.mode.to_string()),
            Cell::Text(c.dtype.to_string()),
            Cell::Text(c.machine.clone()),
        ];
        row.extend(xs.iter().map(|&x| Cell::from(c.at(x).map(value))));
        t.row(row);
    }
    out.push_str(&t.markdown());
    out
}

const W: f64 = 860.0;
const TOP: f64 = 70.0;
const BOTTOM: f64 = 370.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 830.0;
const ROW: f64 = 16.0;
/// The colours of the curves, in turn.
const PALETTE: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf",
];

/// The comparison's plot: tokens/s against concurrency (log2), one line
/// per curve, its colour by curve and its dash by dtype, and a legend with
/// one row per curve below.
pub fn compare_svg(reports: &[(String, Report)]) -> String {
    let curves = curves(reports);
    let xs = all_levels(&curves);
    let h = BOTTOM + 60.0 + ROW * curves.len() as f64;
    let (lo, hi) = match (xs.first(), xs.last()) {
        (Some(&a), Some(&b)) => (lg(a), lg(b)),
        _ => (0.0, 0.0),
    };
    let pad = 0.05 * (RIGHT - LEFT);
    let x_at = |c: usize| {
        if hi > lo {
            LEFT + pad + (lg(c) - lo) / (hi - lo) * (RIGHT - LEFT - 2.0 * pad)
        } else {
            (LEFT + RIGHT) / 2.0
        }
    };
    let top = curves
        .iter()
        .flat_map(|c| c.levels.iter().map(|l| finite(l.tokens_per_s)))
        .fold(0.0, f64::max);
    let axis = nice_axis(top * 1.05);
    let frame = Frame {
        left: LEFT,
        right: RIGHT,
        top: TOP,
        bottom: BOTTOM,
    };

    let mut s = String::new();
    let synthetic = reports.iter().any(|(_, r)| r.metadata.synthetic_weights);
    let mut title = String::from("GPT-2 throughput comparison: tokens/s vs concurrency");
    if synthetic {
        title.push_str(" (some SYNTHETIC weights)");
    }
    let subtitle = format!(
        "{} reports; means over repetitions; numbered as in the Markdown table",
        reports.len()
    );
    let head = Heading {
        width: W,
        height: h,
        title: &title,
        title_y: 26.0,
        subtitle: &subtitle,
        subtitle_y: 46.0,
        alarm: synthetic,
    };
    head.draw(&mut s);
    let ticks: Vec<(f64, usize)> = xs.iter().map(|&c| (x_at(c), c)).collect();
    frame.draw(&mut s, &axis, &ticks, "tokens/s", LEFT - 56.0);
    if xs.is_empty() {
        no_data(&mut s, W / 2.0, (TOP + BOTTOM) / 2.0);
    }
    for (i, c) in curves.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = c
            .levels
            .iter()
            .map(|l| (x_at(l.concurrency), frame.y_at(&axis, l.tokens_per_s)))
            .collect();
        series(&mut s, &pts, color, dtype_dash(c.dtype), &c.label());
        legend_entry(
            &mut s,
            LEFT,
            BOTTOM + 60.0 + ROW * i as f64,
            &truncate_chars(&c.label(), 110),
            color,
            dtype_dash(c.dtype),
        );
    }
    s.push_str("</svg>\n");
    s
}
