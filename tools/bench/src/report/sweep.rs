//! A sweep's report (`throughput --sweep`): its cells side by side, and per
//! swept axis a table and a two-panel SVG of tokens/s and TTFT p50 against
//! the axis, one curve per other setting. The axis renderer reads a neutral
//! list of [`CurvePoint`]s, so that another engine's figures (llama.cpp's,
//! read from its own JSON) can be drawn by the same code.

use std::fmt::Write as _;

use super::svg::{
    draw_legend, frame, legend_rows, nice_axis, no_data, series, Heading, LegendEntry, LEGEND_ROW, PANELS,
    PLOT_BOTTOM, PLOT_TOP, SVG_H, SVG_W,
};
use super::*;
use crate::Sweep;

/// One point of a curve against a swept axis.
#[derive(Debug, Clone, PartialEq)]
pub struct CurvePoint {
    /// The curve it belongs to: the other settings, e.g. `dtype=bf16, batched c4`.
    pub series: String,
    /// Where it sits along the axis: the value, or for a named value
    /// (model, dtype) its position among the axis's values.
    pub x: f64,
    /// The value as the axis names it.
    pub x_label: String,
    pub tokens_per_s: f64,
    /// TTFT p50, ms; `None` where no request succeeded.
    pub ttft_ms: Option<f64>,
}

/// Curve colours, in the order the curves are first met.
const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
/// Past the palette, curves repeat its colours with these dashes.
const DASHES: [Option<&str>; 3] = [None, Some("8 3"), Some("2 3")];

/// A test of one cell as the curves read it: its (mode, concurrency), and
/// its means over the repetitions.
struct Figure {
    mode: String,
    concurrency: usize,
    tokens_per_s: f64,
    ttft_ms: Option<f64>,
}

/// Cell `cell`'s tests, one [`Figure`] per (test, mode) in the order run.
fn figures(report: &Report, cell: usize) -> Vec<Figure> {
    let mine: Vec<&TestResult> = report.tests.iter().filter(|t| t.cell == Some(cell)).collect();
    let keys = first_seen(mine.iter().map(|t| (t.name.as_str(), t.mode.as_str())));
    keys.into_iter()
        .map(|(name, mode)| {
            let reps: Vec<&&TestResult> = mine.iter().filter(|t| t.name == name && t.mode == mode).collect();
            let ok: Vec<f64> = reps
                .iter()
                .filter(|t| t.requests > t.failed)
                .map(|t| t.ttft_ms.p50)
                .collect();
            Figure {
                mode: mode.to_string(),
                concurrency: reps[0].concurrency,
                tokens_per_s: mean_of(reps.iter().map(|t| t.tokens_per_s)),
                ttft_ms: (!ok.is_empty()).then(|| mean_of(ok.into_iter())),
            }
        })
        .collect()
}

/// Whether the cells ran more than one dtype without sweeping it (`--dtype
/// a,b` beside a sweep): the dtype is then one of the other settings.
fn dtype_unswept(sweep: &Sweep) -> bool {
    sweep.axes.iter().all(|a| a.axis != "dtype") && first_seen(sweep.cells.iter().map(|c| &c.dtype)).len() > 1
}

/// The points of `axis` in `report`'s sweep (none if it swept no such
/// axis). Each cell gives a point per test: the single request (`single`)
/// and each mode's levels (`batched c4`), under the cell's other settings;
/// against concurrency, each mode's test at the cell's level (the single
/// request standing for every mode at 1).
pub fn axis_points(report: &Report, axis: &str) -> Vec<CurvePoint> {
    let Some(sweep) = &report.sweep else {
        return Vec::new();
    };
    let Some(values) = sweep.axes.iter().find(|a| a.axis == axis).map(|a| &a.values) else {
        return Vec::new();
    };
    let numeric = values.iter().all(|v| v.parse::<f64>().is_ok());
    let mut points = Vec::new();
    for (i, cell) in sweep.cells.iter().enumerate() {
        let Some(value) = cell.swept.get(axis) else {
            continue;
        };
        let x = match numeric {
            true => value.parse().unwrap_or(f64::NAN),
            false => values.iter().position(|v| v == value).unwrap_or(0) as f64,
        };
        let mut others: Vec<String> = sweep
            .axes
            .iter()
            .filter(|a| a.axis != axis)
            .filter_map(|a| cell.swept.get(&a.axis).map(|v| format!("{}={v}", a.axis)))
            .collect();
        if dtype_unswept(sweep) {
            others.push(format!("dtype={}", cell.dtype));
        }
        let mut point = |test: String, f: &Figure| {
            let series = others
                .iter()
                .cloned()
                .chain([test])
                .collect::<Vec<_>>()
                .join(", ");
            points.push(CurvePoint {
                series,
                x,
                x_label: value.clone(),
                tokens_per_s: f.tokens_per_s,
                ttft_ms: f.ttft_ms,
            });
        };
        for f in figures(report, i) {
            match (axis, f.concurrency) {
                ("concurrency", 1) if value == "1" => {
                    for mode in &report.metadata.modes {
                        point(mode.clone(), &f);
                    }
                }
                ("concurrency", c) if c.to_string() == *value => point(f.mode.clone(), &f),
                ("concurrency", _) => {}
                (_, 1) => point("single".into(), &f),
                (_, c) => point(format!("{} c{c}", f.mode), &f),
            }
        }
    }
    points
}

/// Every swept axis's SVG: `(axis, svg)`, in the axes' order.
pub fn axis_svgs(report: &Report) -> Vec<(String, String)> {
    let Some(sweep) = &report.sweep else {
        return Vec::new();
    };
    let synthetic = if report.metadata.synthetic_weights {
        ": SYNTHETIC weights (random)"
    } else {
        ""
    };
    sweep
        .axes
        .iter()
        .map(|a| {
            let title = format!("GPT-2 throughput against {}{synthetic}", a.axis);
            (
                a.axis.clone(),
                axis_svg(&title, &a.axis, &axis_points(report, &a.axis)),
            )
        })
        .collect()
}

/// The end of an axis SVG's file name, after the report's stem and a dot:
/// `prompt-tokens.svg` (anything but letters, digits and `-` as `_`).
pub fn axis_svg_ext(axis: &str) -> String {
    let name: String = axis
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{name}.svg")
}

/// Where the points' x values land on an axis: by their value, on a log
/// scale where they are all positive and span 8x or more (token counts,
/// concurrency), else evenly by value; a lone value in the middle.
struct XScale {
    lo: f64,
    hi: f64,
    log: bool,
}

impl XScale {
    fn new(xs: &[f64]) -> XScale {
        let (lo, hi) = xs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
        let log = lo > 0.0 && hi / lo >= 8.0;
        let f = |x: f64| if log { x.log2() } else { x };
        XScale {
            lo: f(lo),
            hi: f(hi),
            log,
        }
    }

    /// The x of value `x` in panel `panel`.
    fn at(&self, panel: usize, x: f64) -> f64 {
        let (l, r) = PANELS[panel];
        let pad = 0.07 * (r - l);
        let v = if self.log { x.log2() } else { x };
        if self.hi > self.lo && v.is_finite() {
            l + pad + (v - self.lo) / (self.hi - self.lo) * (r - l - 2.0 * pad)
        } else {
            (l + r) / 2.0
        }
    }
}

/// A self-contained SVG of `points` against the axis `axis_name`:
/// tokens/s (left) and TTFT p50 (right), one curve per series in the order
/// first met, each a colour (and past eight, a dash too), the legend along
/// the bottom. `title` in red when it says SYNTHETIC. NaN and infinities are
/// drawn as 0; a point without a TTFT is left out of the right panel.
pub fn axis_svg(title: &str, axis_name: &str, points: &[CurvePoint]) -> String {
    let names = first_seen(points.iter().map(|p| p.series.as_str()));
    let entries: Vec<LegendEntry> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let dash = DASHES[(i / PALETTE.len()) % DASHES.len()];
            (n.to_string(), PALETTE[i % PALETTE.len()], dash)
        })
        .collect();
    let rows = legend_rows(&entries);
    let height = SVG_H + LEGEND_ROW * rows.len().saturating_sub(1) as f64;
    let mut s = String::new();
    let subtitle = format!("tokens/s and TTFT p50 against {axis_name}, one curve per other setting");
    Heading {
        width: SVG_W,
        height,
        title,
        title_y: 24.0,
        subtitle: &subtitle,
        subtitle_y: 42.0,
        alarm: title.contains("SYNTHETIC"),
    }
    .draw(&mut s);
    let mut ticks: Vec<(f64, String)> = Vec::new();
    for p in points {
        if !ticks.iter().any(|(x, _)| *x == p.x) {
            ticks.push((p.x, p.x_label.clone()));
        }
    }
    ticks.sort_by(|a, b| a.0.total_cmp(&b.0));
    let scale = XScale::new(&ticks.iter().map(|t| t.0).collect::<Vec<_>>());
    let top = |f: fn(&CurvePoint) -> f64| points.iter().map(f).map(finite).fold(0.0, f64::max);
    let axes = [
        nice_axis(top(|p| p.tokens_per_s) * 1.05),
        nice_axis(top(|p| p.ttft_ms.unwrap_or(0.0)) * 1.05),
    ];
    let panel_titles = [
        format!("tokens/s vs {axis_name}"),
        format!("TTFT p50 (ms) vs {axis_name}"),
    ];
    for (panel, y_title) in ["tokens/s", "TTFT p50 (ms)"].into_iter().enumerate() {
        let (l, r) = PANELS[panel];
        let _ = writeln!(
            s,
            r#"<text x="{}" y="66" text-anchor="middle" font-size="13" font-weight="bold">{}</text>"#,
            (l + r) / 2.0,
            xml(&panel_titles[panel])
        );
        let xs: Vec<(f64, String)> = ticks
            .iter()
            .map(|(x, n)| (scale.at(panel, *x), n.clone()))
            .collect();
        frame(panel).draw_labelled(&mut s, &axes[panel], &xs, (axis_name, y_title), l - 52.0);
    }
    if points.is_empty() {
        no_data(&mut s, SVG_W / 2.0, (PLOT_TOP + PLOT_BOTTOM) / 2.0);
    }
    for (name, color, dash) in &entries {
        let mut mine: Vec<&CurvePoint> = points.iter().filter(|p| &p.series == name).collect();
        mine.sort_by(|a, b| a.x.total_cmp(&b.x));
        let tok: Vec<(f64, f64)> = mine
            .iter()
            .map(|p| (scale.at(0, p.x), frame(0).y_at(&axes[0], p.tokens_per_s)))
            .collect();
        let ttft: Vec<(f64, f64)> = mine
            .iter()
            .filter_map(|p| p.ttft_ms.map(|t| (scale.at(1, p.x), frame(1).y_at(&axes[1], t))))
            .collect();
        series(&mut s, &tok, color, *dash, &format!("{name} tokens/s"));
        series(&mut s, &ttft, color, *dash, &format!("{name} TTFT p50"));
    }
    s.push_str(&draw_legend(&entries, &rows, SVG_H - 30.0));
    s.push_str("</svg>\n");
    s
}

/// `points` as a table: per series (in the order first met), a row per
/// value of the axis in ascending order, with its tokens/s against the
/// series' first value's.
pub(super) fn axis_table(axis_name: &str, points: &[CurvePoint]) -> Table {
    let mut t = Table::new(&["series", axis_name, "tok/s", "vs first", "TTFT p50 ms"]);
    t.left(0).left(1);
    for name in first_seen(points.iter().map(|p| p.series.as_str())) {
        let mut mine: Vec<&CurvePoint> = points.iter().filter(|p| p.series == name).collect();
        mine.sort_by(|a, b| a.x.total_cmp(&b.x));
        let first = mine[0].tokens_per_s;
        for p in mine {
            t.row([
                Cell::Text(name.to_string()),
                Cell::Text(p.x_label.clone()),
                f2(p.tokens_per_s).into(),
                (first > 0.0).then(|| times(p.tokens_per_s / first)).into(),
                p.ttft_ms.map(f1).into(),
            ]);
        }
    }
    t.note(format!(
        "Means over repetitions. vs first: tok/s over the series' tok/s at its first {axis_name}."
    ));
    t
}

/// The cells side by side: what each ran with, its headline figures and
/// its memory.
fn cells_table(report: &Report, sweep: &Sweep) -> Table {
    let mut t = Table::new(&[
        "cell",
        "settings",
        "params M",
        "single tok/s",
        "TTFT p50 ms",
        "best concurrent tok/s",
        "load RSS",
        "peak RSS",
    ]);
    t.left(1)
        .short(2, "M params")
        .short(4, "TTFT")
        .short(5, "best conc tok/s");
    let mib = |b: Option<u64>| b.map(|b| f1(b as f64 / (1u64 << 20) as f64));
    for (i, c) in sweep.cells.iter().enumerate() {
        let label = sweep.cell_label(i);
        let settings = label.split_once(": ").map_or(label.as_str(), |(_, s)| s);
        let figures = figures(report, i);
        let single = figures.iter().find(|f| f.concurrency == 1);
        let best = figures
            .iter()
            .filter(|f| f.concurrency > 1)
            .max_by(|a, b| finite(a.tokens_per_s).total_cmp(&finite(b.tokens_per_s)));
        let peak = mib(c.memory.peak_rss_bytes).map(|p| match c.memory.peak_rss_own {
            true => p,
            false => format!("{p} cumulative"),
        });
        t.row([
            i.to_string().into(),
            Cell::Text(settings.to_string()),
            f1(c.model.n_params as f64 / 1e6).into(),
            single.map(|f| f2(f.tokens_per_s)).into(),
            single.and_then(|f| f.ttft_ms).map(f1).into(),
            best.map(|f| format!("{} ({} c{})", f2(f.tokens_per_s), f.mode, f.concurrency))
                .into(),
            mib(c.memory.rss_after_load_bytes).into(),
            peak.into(),
        ]);
    }
    t
}

/// What the cells table's memory columns are, and the order the cells ran.
fn cells_note(sweep: &Sweep) -> String {
    let mut out = String::from(
        "Memory in MiB, the largest over the cell's repetitions. load RSS: resident memory right after\n\
         the cell's model loaded (the previous cell's dropped first). peak RSS: the resident high-water\n\
         mark of the cell's load and tests, reset just before its load.\n",
    );
    if sweep.cells.iter().any(|c| !c.memory.peak_rss_own) {
        out.push_str(
            "cumulative: the high-water mark could not be reset here, so that peak is the process's\n\
             peak so far, over that cell and every one run before it.\n",
        );
    }
    let order: Vec<String> = sweep
        .order
        .iter()
        .enumerate()
        .map(|(r, o)| {
            let cells: Vec<String> = o.iter().map(ToString::to_string).collect();
            format!("repetition {}: {}", r + 1, cells.join(" "))
        })
        .collect();
    let _ = writeln!(out, "Cells in the order run: {}.", order.join("; "));
    out
}

/// The sweep's sections on stdout: the cells, then a table per axis.
pub(super) fn stdout_sweep(report: &Report) -> String {
    let Some(sweep) = &report.sweep else {
        return String::new();
    };
    let mut t = cells_table(report, sweep);
    t.note(cells_note(sweep));
    let mut out = format!("\nSweep: {} cells\n{}", sweep.cells.len(), t.text());
    for a in &sweep.axes {
        let points = axis_points(report, &a.axis);
        let _ = write!(
            out,
            "\ntok/s and TTFT p50 against {}\n{}",
            a.axis,
            axis_table(&a.axis, &points).text()
        );
    }
    out
}

/// `## Sweep`: the axes, the cells, and per axis its table and its SVG
/// (named from the report's `svg_file_name` by [`axis_svg_ext`]).
pub(super) fn md_sweep(report: &Report, svg_file_name: &str) -> String {
    let Some(sweep) = &report.sweep else {
        return String::new();
    };
    let axes: Vec<String> = sweep
        .axes
        .iter()
        .map(|a| format!("`{}` = {}", md_code(&a.axis), md_text(&a.values.join(", "))))
        .collect();
    let mut t = cells_table(report, sweep);
    t.note(cells_note(sweep));
    let mut out = format!(
        "\n## Sweep\n\nAxes: {}. Each cell loads its model afresh and runs the whole protocol (warmup, \
         the single request, every mode's levels); each repetition runs every cell, starting one cell \
         further on. Only `failed` and the targets named by `--target` are held: the default targets \
         are the default workload's.\n\n{}",
        axes.join("; "),
        t.markdown()
    );
    let stem = svg_file_name.strip_suffix(".svg").unwrap_or(svg_file_name);
    for a in &sweep.axes {
        let points = axis_points(report, &a.axis);
        let file = format!("{stem}.{}", axis_svg_ext(&a.axis));
        let _ = write!(
            out,
            "\n### Against {0}\n\n{1}\n![tokens/s and TTFT p50 against {0}]({2})\n",
            md_text(&a.axis),
            axis_table(&a.axis, &points).markdown(),
            md_link_target(&file)
        );
    }
    out
}
