//! The SVG saturation curve.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::*;
use crate::Metadata;

pub(super) const SVG_W: f64 = 800.0;
pub(super) const SVG_H: f64 = 420.0;
pub(super) const PLOT_TOP: f64 = 78.0;
pub(super) const PLOT_BOTTOM: f64 = 330.0;
/// (left, right) of the two panels' plot areas.
pub(super) const PANELS: [(f64, f64); 2] = [(72.0, 372.0), (472.0, 772.0)];
const REFERENCE_COLOR: &str = "#8c8c8c";
const REFERENCE_DASH: &str = "6 4";

/// A self-contained SVG of the saturation curve: tokens/s (left panel, with
/// the reference study dashed) and p50 latency (right panel) against
/// concurrency, one line per (mode, dtype): the mode's colour, the dtype's
/// dash. NaN and infinities are drawn as 0.
pub fn svg(report: &Report) -> String {
    let plot = Plot::new(report);
    let mut s = String::new();
    svg_header(&mut s, &report.metadata);
    s.push_str(&plot.panels());
    s.push_str(&plot.series());
    s.push_str(&plot.legend());
    s.push_str("</svg>\n");
    s
}

/// What the two panels show, and where a value lands.
struct Plot<'a> {
    levels: Vec<&'a LevelAnalysis>,
    /// One line each, in the legend's order: by mode, then dtype.
    lines: Vec<(String, String)>,
    /// The measured concurrency levels, ascending: the x ticks.
    xs: Vec<usize>,
    /// log2 of the lowest and highest level.
    lo: f64,
    hi: f64,
    /// The reference series: one point per concurrency where a level carries it.
    reference: Vec<(usize, f64)>,
    /// The y axes: tokens/s, then p50 latency.
    axes: [Axis; 2],
}

pub(super) fn lg(c: usize) -> f64 {
    (c.max(1) as f64).log2()
}

impl<'a> Plot<'a> {
    fn new(report: &'a Report) -> Self {
        let levels = sorted_levels(&report.analysis.levels);
        let dtypes = dtypes_in_order(&levels);
        let lines = modes_in_order(&levels)
            .into_iter()
            .flat_map(|m| dtypes.iter().map(move |d| (m.clone(), d.clone())))
            .filter(|(m, d)| levels.iter().any(|l| &l.mode == m && &l.dtype == d))
            .collect();
        // X: the measured concurrency levels, log2-spaced.
        let xs: Vec<usize> = levels
            .iter()
            .map(|l| l.concurrency)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let (lo, hi) = match (xs.first(), xs.last()) {
            (Some(&a), Some(&b)) => (lg(a), lg(b)),
            _ => (0.0, 0.0),
        };
        let mut reference: Vec<(usize, f64)> = Vec::new();
        for l in &levels {
            if let Some((_, tok)) = l.reference {
                if !reference.iter().any(|&(c, _)| c == l.concurrency) {
                    reference.push((l.concurrency, finite(tok)));
                }
            }
        }
        reference.sort_by_key(|&(c, _)| c);
        let tok_max = levels
            .iter()
            .map(|l| finite(l.tokens_per_s))
            .chain(reference.iter().map(|&(_, t)| t))
            .fold(0.0, f64::max);
        let lat_max = levels
            .iter()
            .map(|l| finite(l.latency_p50_ms))
            .fold(0.0, f64::max);
        // 5% headroom so the highest marker does not sit on the frame.
        let axes = [nice_axis(tok_max * 1.05), nice_axis(lat_max * 1.05)];
        Plot {
            levels,
            lines,
            xs,
            lo,
            hi,
            reference,
            axes,
        }
    }

    fn x_at(&self, panel: usize, c: usize) -> f64 {
        let (l, r) = PANELS[panel];
        let pad = 0.07 * (r - l);
        if self.hi > self.lo {
            l + pad + (lg(c) - self.lo) / (self.hi - self.lo) * (r - l - 2.0 * pad)
        } else {
            (l + r) / 2.0
        }
    }

    fn y_at(&self, panel: usize, v: f64) -> f64 {
        frame(panel).y_at(&self.axes[panel], v)
    }

    /// Each panel's title, grid, ticks and axes ("no data" without levels).
    fn panels(&self) -> String {
        let mut s = String::new();
        let panel_titles = ["tokens/s vs concurrency", "p50 latency (ms) vs concurrency"];
        let y_titles = ["tokens/s", "p50 latency (ms)"];
        for panel in 0..2 {
            let (l, r) = PANELS[panel];
            let _ = writeln!(
                s,
                r#"<text x="{}" y="66" text-anchor="middle" font-size="13" font-weight="bold">{}</text>"#,
                (l + r) / 2.0,
                panel_titles[panel]
            );
            let xs: Vec<(f64, usize)> = self.xs.iter().map(|&c| (self.x_at(panel, c), c)).collect();
            frame(panel).draw(&mut s, &self.axes[panel], &xs, y_titles[panel], l - 52.0);
        }
        if self.xs.is_empty() {
            no_data(&mut s, SVG_W / 2.0, (PLOT_TOP + PLOT_BOTTOM) / 2.0);
        }
        s
    }

    /// One polyline per (mode, dtype, panel), plus the reference on panel 0.
    fn series(&self) -> String {
        let (levels, reference) = (&self.levels, &self.reference);
        let mut s = String::new();
        if !reference.is_empty() {
            let pts: Vec<(f64, f64)> = reference
                .iter()
                .map(|&(c, t)| (self.x_at(0, c), self.y_at(0, t)))
                .collect();
            series(
                &mut s,
                &pts,
                REFERENCE_COLOR,
                Some(REFERENCE_DASH),
                REFERENCE_LABEL,
            );
        }
        for (mode, dtype) in &self.lines {
            let (color, dash) = (mode_color(mode), dtype_dash(dtype));
            let mine = || levels.iter().copied().filter(|l| &l.dtype == dtype);
            // A mode without its own concurrency-1 level starts from the
            // dtype's shared single request.
            let mut ls: Vec<&LevelAnalysis> = mine().filter(|l| &l.mode == mode).collect();
            if !ls.iter().any(|l| l.concurrency == 1) {
                if let Some(single) = mine().find(|l| l.concurrency == 1) {
                    ls.insert(0, single);
                }
            }
            let tok: Vec<_> = ls
                .iter()
                .map(|l| (self.x_at(0, l.concurrency), self.y_at(0, l.tokens_per_s)))
                .collect();
            let lat: Vec<_> = ls
                .iter()
                .map(|l| (self.x_at(1, l.concurrency), self.y_at(1, l.latency_p50_ms)))
                .collect();
            series(&mut s, &tok, color, dash, &format!("{mode} {dtype} tokens/s"));
            series(&mut s, &lat, color, dash, &format!("{mode} {dtype} p50 latency"));
        }

        s
    }

    /// The legend along the bottom, rows centred, as many rows as it needs
    /// (one line per mode and dtype: a dtype alone needs no name).
    fn legend(&self) -> String {
        let several = dtypes_in_order(&self.levels).len() > 1;
        let mut entries: Vec<LegendEntry> = self
            .lines
            .iter()
            .map(|(m, d)| {
                let name = if several { format!("{m} {d}") } else { m.clone() };
                (name, mode_color(m), dtype_dash(d))
            })
            .collect();
        if !self.reference.is_empty() {
            entries.push((
                format!("{REFERENCE_LABEL}, tokens/s"),
                REFERENCE_COLOR,
                Some(REFERENCE_DASH),
            ));
        }
        draw_legend(&entries, &legend_rows(&entries), SVG_H - 30.0)
    }
}

/// A legend entry: its name, colour and dash.
pub(super) type LegendEntry = (String, &'static str, Option<&'static str>);

/// The width a legend entry takes.
fn entry_width(name: &str) -> f64 {
    40.0 + 7.0 * name.chars().count() as f64
}

/// The entries laid out in rows (their indices), each row within the
/// picture's width.
pub(super) fn legend_rows(entries: &[LegendEntry]) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = vec![Vec::new()];
    let mut used = 0.0;
    for (i, (name, _, _)) in entries.iter().enumerate() {
        let w = entry_width(name);
        if used + w > SVG_W - 20.0 && !rows[rows.len() - 1].is_empty() {
            rows.push(Vec::new());
            used = 0.0;
        }
        used += w;
        let last = rows.len() - 1;
        rows[last].push(i);
    }
    rows
}

/// The legend's `rows` of `entries`, each centred, the first at `y`.
pub(super) fn draw_legend(entries: &[LegendEntry], rows: &[Vec<usize>], y: f64) -> String {
    let mut s = String::new();
    for (r, row) in rows.iter().enumerate() {
        let total: f64 = row.iter().map(|&i| entry_width(&entries[i].0)).sum();
        let mut x = (SVG_W - total).max(0.0) / 2.0;
        let y = y + LEGEND_ROW * r as f64;
        for &i in row {
            let (name, color, dash) = &entries[i];
            legend_entry(&mut s, x, y, name, color, *dash);
            x += entry_width(name);
        }
    }
    s
}

/// The height of a legend row.
pub(super) const LEGEND_ROW: f64 = 16.0;

/// One legend entry at (`x`, `y`): a line with a marker, and its name.
pub(super) fn legend_entry(s: &mut String, x: f64, y: f64, name: &str, color: &str, dash: Option<&str>) {
    let dash = dash.map_or_else(String::new, |d| format!(r#" stroke-dasharray="{d}""#));
    let _ = writeln!(
        s,
        r#"<line x1="{x:.1}" y1="{y}" x2="{:.1}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/>"#,
        x + 24.0
    );
    let _ = writeln!(
        s,
        r#"<circle cx="{:.1}" cy="{y}" r="3.5" fill="{color}"/>"#,
        x + 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{}">{}</text>"#,
        x + 30.0,
        y + 4.0,
        xml(name)
    );
}

/// The saturation curve's opening tag, title and subtitle: the machine
/// (or the server) and the protocol.
fn svg_header(s: &mut String, md: &Metadata) {
    let mut title = String::from("GPT-2 throughput: saturation curve");
    if md.synthetic_weights {
        title.push_str(": SYNTHETIC weights (random)");
    }
    let dtypes: Vec<&str> = md.dtypes.iter().map(|d| d.dtype.as_str()).collect();
    let noise = if md.synthetic_weights {
        "speed is real, text is noise | "
    } else {
        ""
    };
    let subtitle = match &md.server {
        Some(srv) => format!(
            "{noise}{} at {} | client {} | {} weights | {} tokens/request | {}",
            md.engine(),
            srv.url,
            md.cpu_model,
            dtypes.join(", "),
            md.max_new_tokens,
            md.timestamp_utc
        ),
        None => format!(
            "{noise}{} | {} cores, {} pool, {} threads/request | {} weights | {} tokens/request | {}",
            md.cpu_model,
            md.cores,
            md.pool_layout,
            md.threads_per_request,
            dtypes.join(", "),
            md.max_new_tokens,
            md.timestamp_utc
        ),
    };
    let head = Heading {
        width: SVG_W,
        height: SVG_H,
        title: &title,
        title_y: 24.0,
        subtitle: &subtitle,
        subtitle_y: 42.0,
        alarm: md.synthetic_weights,
    };
    head.draw(s);
}

/// The opening tag of a picture, its white ground, and its title and
/// subtitle centred at the top.
pub(super) struct Heading<'a> {
    pub(super) width: f64,
    pub(super) height: f64,
    pub(super) title: &'a str,
    pub(super) title_y: f64,
    /// One line, cut to 128 characters.
    pub(super) subtitle: &'a str,
    pub(super) subtitle_y: f64,
    /// The title in red (synthetic weights).
    pub(super) alarm: bool,
}

impl Heading<'_> {
    pub(super) fn draw(&self, s: &mut String) {
        let (w, h) = (self.width, self.height);
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, "<title>{}</title>", xml(self.title));
        let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="16" font-weight="bold" fill="{}">{}</text>"#,
            w / 2.0,
            self.title_y,
            if self.alarm { "#b00000" } else { "#000000" },
            xml(self.title)
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" font-size="11" fill="#555555">{}</text>"##,
            w / 2.0,
            self.subtitle_y,
            xml(&truncate_chars(&one_line(self.subtitle), 128))
        );
    }
}

/// The plot area of panel `panel` (0 left, 1 right) of the two-panel
/// pictures (the saturation curve, an axis of a sweep).
pub(super) fn frame(panel: usize) -> Frame {
    let (left, right) = PANELS[panel];
    Frame {
        left,
        right,
        top: PLOT_TOP,
        bottom: PLOT_BOTTOM,
    }
}

/// A plot area's edges, in SVG units; concurrency runs along x.
#[derive(Debug, Clone, Copy)]
pub(super) struct Frame {
    pub(super) left: f64,
    pub(super) right: f64,
    pub(super) top: f64,
    pub(super) bottom: f64,
}

impl Frame {
    /// Where `v` lands on `axis` (NaN and infinities at 0).
    pub(super) fn y_at(&self, axis: &Axis, v: f64) -> f64 {
        self.bottom - finite(v).clamp(0.0, axis.top) / axis.top * (self.bottom - self.top)
    }

    /// The horizontal grid with the y ticks of `axis`, an x tick at each
    /// `(x, level)`, the axes, and their titles (`y_title` centred on
    /// `y_title_x`).
    pub(super) fn draw(
        &self,
        s: &mut String,
        axis: &Axis,
        xs: &[(f64, usize)],
        y_title: &str,
        y_title_x: f64,
    ) {
        let xs: Vec<(f64, String)> = xs.iter().map(|&(x, c)| (x, c.to_string())).collect();
        let titles = ("concurrency (requests in flight)", y_title);
        self.draw_labelled(s, axis, &xs, titles, y_title_x);
    }

    /// [`Frame::draw`] with any x tick labels and the axes' `(x, y)` titles.
    pub(super) fn draw_labelled(
        &self,
        s: &mut String,
        axis: &Axis,
        xs: &[(f64, String)],
        (x_title, y_title): (&str, &str),
        y_title_x: f64,
    ) {
        let (l, r, top, bottom) = (self.left, self.right, self.top, self.bottom);
        for i in 0..=axis.steps {
            let v = axis.step * i as f64;
            let y = self.y_at(axis, v);
            let _ = writeln!(
                s,
                r##"<line x1="{l}" y1="{y:.1}" x2="{r}" y2="{y:.1}" stroke="#e5e5e5" stroke-width="1"/>"##
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                l - 6.0,
                y + 4.0,
                tick_label(v, axis.step)
            );
        }
        for (x, label) in xs {
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{}" stroke="#333333"/>"##,
                bottom + 5.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
                bottom + 18.0,
                xml(label)
            );
        }
        let _ = writeln!(
            s,
            r##"<path d="M{l} {top} V{bottom} H{r}" fill="none" stroke="#333333" stroke-width="1"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (l + r) / 2.0,
            bottom + 36.0,
            xml(x_title)
        );
        let (yx, yy) = (y_title_x, (top + bottom) / 2.0);
        let _ = writeln!(
            s,
            r#"<text x="{yx}" y="{yy}" text-anchor="middle" transform="rotate(-90 {yx} {yy})">{}</text>"#,
            xml(y_title)
        );
    }
}

/// "no data", grey, centred on (`x`, `y`).
pub(super) fn no_data(s: &mut String, x: f64, y: f64) {
    let _ = writeln!(
        s,
        r##"<text x="{x}" y="{y}" text-anchor="middle" fill="#777777">no data</text>"##
    );
}

/// One polyline with a marker per point, solid or with `dash` (an SVG
/// `stroke-dasharray`).
pub(super) fn series(s: &mut String, pts: &[(f64, f64)], color: &str, dash: Option<&str>, label: &str) {
    let points: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let dash = dash.map_or_else(String::new, |d| format!(r#" stroke-dasharray="{d}""#));
    let _ = writeln!(
        s,
        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}><title>{}</title></polyline>"#,
        points.join(" "),
        xml(label)
    );
    for (x, y) in pts {
        let _ = writeln!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"/>"#);
    }
}

/// The dash of a dtype's lines: f32 solid, bf16 dashed, int8 dotted.
pub(super) fn dtype_dash(dtype: &str) -> Option<&'static str> {
    match dtype {
        "f32" => None,
        "bf16" => Some("8 3"),
        "int8" => Some("2 3"),
        _ => Some("8 3 2 3"),
    }
}

pub(super) fn mode_color(mode: &str) -> &'static str {
    match mode {
        "threads" => "#d62728",
        "batched" => "#1f77b4",
        "http" => "#2ca02c",
        _ => "#7f7f7f",
    }
}

/// A y axis from 0 to `top` in `steps` round steps (1, 2, 2.5 or 5 × 10^k).
pub(super) struct Axis {
    pub(super) top: f64,
    pub(super) step: f64,
    pub(super) steps: usize,
}

pub(super) fn nice_axis(max: f64) -> Axis {
    let max = if max.is_finite() && max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    // The small epsilon keeps an exact multiple (e.g. max = 40, step = 10) at 4 steps.
    let steps = ((max / step) - 1e-9).ceil().max(1.0) as usize;
    Axis {
        top: step * steps as f64,
        step,
        steps,
    }
}

pub(super) fn tick_label(v: f64, step: f64) -> String {
    // As many decimals as the step needs (2.5 -> 1, 0.25 -> 2), at most 6.
    let decimals = (0..6)
        .find(|&d| {
            let scaled = step * 10f64.powi(d as i32);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(6);
    format!("{v:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axis_rounds_up_to_round_steps() {
        let a = nice_axis(41.46);
        assert_eq!((a.step, a.top, a.steps), (10.0, 50.0, 5));
        let a = nice_axis(40.0);
        assert_eq!((a.step, a.top), (10.0, 40.0));
        let a = nice_axis(0.0);
        assert!(a.top > 0.0 && a.step > 0.0);
        let a = nice_axis(f64::NAN);
        assert!(a.top > 0.0);
        assert_eq!(tick_label(0.25, 0.25), "0.25");
        assert_eq!(tick_label(1500.0, 500.0), "1500");
    }
}
