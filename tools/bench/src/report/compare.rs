//! Several reports side by side (`throughput compare`): one Markdown table
//! and one SVG with every curve (tokens/s against concurrency), each curve a
//! (report, mode, dtype), labelled by the report's engine, mode and dtype
//! and its machine. llama.cpp's outputs ([`crate::llama`]) join them:
//! llama-batched-bench's decode tokens/s against sequences as curves beside
//! ours, llama-bench's prefill and decode tokens/s as a table.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::svg::{dtype_dash, legend_entry, lg, nice_axis, no_data, series, Frame, Heading};
use super::*;
use crate::llama::{self, LlamaPoint, BATCHED_BENCH, LLAMA_BENCH};

/// One point of a curve.
struct Level {
    concurrency: usize,
    tokens_per_s: f64,
    /// `None` for llama.cpp, which times no request end to end.
    latency_p50_ms: Option<f64>,
}

/// One curve: a (mode, dtype) of one report, or one shape of a
/// llama-batched-bench file; its levels ascending.
struct Curve {
    /// Its input as the tables number it: `2` for the second report, `L1`
    /// for the first llama.cpp file.
    tag: String,
    engine: String,
    mode: String,
    dtype: String,
    /// The CPU and cores of the machine that ran the benchmark (the
    /// client's, for a server); llama.cpp's threads.
    machine: String,
    /// The line's dash: that of its dtype, or of our dtype a llama.cpp
    /// type is set beside.
    dash: Option<&'static str>,
    levels: Vec<Level>,
}

impl Curve {
    fn label(&self) -> String {
        format!(
            "[{}] {} {} {}, {}",
            self.tag, self.engine, self.mode, self.dtype, self.machine
        )
    }

    fn at(&self, c: usize) -> Option<&Level> {
        self.levels.iter().find(|l| l.concurrency == c)
    }
}

/// The inputs of one comparison: our reports and llama.cpp's outputs, each
/// with its name as the user gave the file.
pub struct Compared<'a> {
    pub reports: &'a [(String, Report)],
    pub llama: &'a [(String, Vec<LlamaPoint>)],
}

/// Every report's curves, in the order of the reports, then of their modes
/// and dtypes; then every llama-batched-bench shape's. A mode without its
/// own concurrency-1 level starts from its dtype's single request (shared
/// by the modes).
fn curves(inputs: &Compared) -> Vec<Curve> {
    let mut out = Vec::new();
    for (i, (_, r)) in inputs.reports.iter().enumerate() {
        out.extend(report_curves(i + 1, r));
    }
    for (i, (_, points)) in inputs.llama.iter().enumerate() {
        out.extend(llama_curves(i + 1, points));
    }
    out
}

/// The curves of report number `n`.
fn report_curves(n: usize, r: &Report) -> Vec<Curve> {
    let levels = sorted_levels(&r.analysis.levels);
    let md = &r.metadata;
    let machine = format!(
        "{}{}, {} cores",
        if md.server.is_some() { "client " } else { "" },
        one_line(&md.cpu_model),
        md.cores
    );
    let mut out = Vec::new();
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
            out.push(Curve {
                tag: n.to_string(),
                engine: md.engine(),
                dash: dtype_dash(&dtype),
                mode: mode.clone(),
                dtype,
                machine: machine.clone(),
                levels: mine
                    .iter()
                    .map(|l| Level {
                        concurrency: l.concurrency,
                        tokens_per_s: l.tokens_per_s,
                        latency_p50_ms: Some(l.latency_p50_ms),
                    })
                    .collect(),
            });
        }
    }
    out
}

/// The curves of llama.cpp file number `n`: one per (model, dtype, prompt,
/// generated tokens, threads) of its llama-batched-bench lines, decode
/// tokens/s against sequences.
fn llama_curves(n: usize, points: &[LlamaPoint]) -> Vec<Curve> {
    let mut out: Vec<Curve> = Vec::new();
    for p in points.iter().filter(|p| p.tool == BATCHED_BENCH) {
        let Some(cp) = p.curve_point() else { continue };
        let level = Level {
            concurrency: p.sequences,
            tokens_per_s: cp.tokens_per_s,
            latency_p50_ms: None,
        };
        let machine = format!("{} threads", p.threads);
        let engine = format!("llama.cpp {}", p.model);
        let mode = format!("decode (pp {}, tg {})", p.prompt_tokens, p.new_tokens);
        match out
            .iter_mut()
            .find(|c| c.engine == engine && c.mode == mode && c.dtype == p.dtype && c.machine == machine)
        {
            Some(c) => c.levels.push(level),
            None => out.push(Curve {
                tag: format!("L{n}"),
                engine,
                mode,
                dash: dtype_dash(llama::counterpart(&p.dtype).unwrap_or(&p.dtype)),
                dtype: p.dtype.clone(),
                machine,
                levels: vec![level],
            }),
        }
    }
    for c in &mut out {
        c.levels.sort_by_key(|l| l.concurrency);
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

/// The comparison in Markdown: the reports and llama.cpp files (each
/// named as the user gave the file), then tokens/s of every curve and p50
/// latency of every report's curve at every level, llama-bench's tests,
/// and the plot `svg_file_name` (linked relative to the Markdown file).
pub fn compare_markdown(inputs: &Compared, svg_file_name: &str) -> String {
    let curves = curves(inputs);
    let reports = inputs.reports;
    let mut out = String::from("# GPT-2 throughput comparison\n\n");
    let _ = writeln!(
        out,
        "{} report{}{}, {} curve{}: tokens/s and p50 end-to-end latency against concurrency, means \
         over each run's repetitions. Runs on different machines, engines, prompts or token counts \
         compare in shape, not in absolute numbers: the setup of each is listed first.\n",
        reports.len(),
        plural(reports.len()),
        llama_count(inputs.llama.len()),
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
    if !inputs.llama.is_empty() {
        out.push_str("\n## llama.cpp outputs\n\n");
        out.push_str(&llama_files_table(inputs.llama).markdown());
    }
    out.push_str(&by_level(&curves, "Tokens/s by concurrency", |l| {
        Some(f2(l.tokens_per_s))
    }));
    if !inputs.llama.is_empty() {
        out.push_str(LLAMA_DECODE_NOTE);
    }
    let timed: Vec<Curve> = curves
        .into_iter()
        .filter(|c| c.levels.iter().any(|l| l.latency_p50_ms.is_some()))
        .collect();
    out.push_str(&by_level(&timed, "p50 latency (ms) by concurrency", |l| {
        l.latency_p50_ms.map(f1)
    }));
    out.push_str(&llama_bench_section(inputs.llama));
    out.push_str("\n## Curves\n\n");
    let _ = writeln!(
        out,
        "![Tokens/s against concurrency, every curve]({})\n",
        md_link_target(svg_file_name)
    );
    out.push_str(
        "One line per report, mode and dtype (f32 solid, bf16 dashed, int8 dotted, other dtypes \
         dash-dotted), numbered as the reports above. Concurrency 1 is each run's single \
         request, shared by its modes.",
    );
    if !inputs.llama.is_empty() {
        out.push_str(
            " llama.cpp's lines (L…) are dashed as the dtype they are set beside: f16 as bf16, \
             q8_0 as int8.",
        );
    }
    out.push('\n');
    out
}

/// How llama-batched-bench's rows differ from ours, under the tokens/s table.
const LLAMA_DECODE_NOTE: &str = "\nRows L…: llama-batched-bench's decode rate (`S_TG`: every \
     sequence's generated tokens over the time of the decode steps alone, the prefill excluded) \
     with as many sequences as the column's concurrency; ours divide the generated tokens by the \
     test's whole time, prefill included, so at equal speed ours read lower.\n";

/// " and N llama.cpp file(s)", or nothing.
fn llama_count(n: usize) -> String {
    match n {
        0 => String::new(),
        n => format!(" and {n} llama.cpp file{}", plural(n)),
    }
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
fn by_level(curves: &[Curve], title: &str, value: fn(&Level) -> Option<String>) -> String {
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
            c.tag.clone().into(),
            Cell::Text(c.engine.clone()),
            Cell::Text(c.mode.clone()),
            Cell::Text(c.dtype.clone()),
            Cell::Text(c.machine.clone()),
        ];
        row.extend(xs.iter().map(|&x| Cell::from(c.at(x).and_then(value))));
        t.row(row);
    }
    out.push_str(&t.markdown());
    out
}

/// One row per llama.cpp file: which tool, which models, how many shapes.
fn llama_files_table(files: &[(String, Vec<LlamaPoint>)]) -> Table {
    let mut t = Table::new(&["#", "file", "tool", "models", "threads", "shapes", "repetitions"]);
    t.left(1).left(2).left(3);
    for (i, (name, points)) in files.iter().enumerate() {
        let models = first_seen(points.iter().map(|p| format!("{} {}", p.model, p.dtype)));
        let threads = first_seen(points.iter().map(|p| p.threads.to_string()));
        let samples = first_seen(points.iter().map(|p| p.samples.to_string()));
        t.row([
            format!("L{}", i + 1).into(),
            Cell::Code(name.clone()),
            Cell::Text(points.first().map_or_else(String::new, |p| p.tool.clone())),
            Cell::Text(models.join(", ")),
            threads.join(", ").into(),
            points.len().to_string().into(),
            samples.join(", ").into(),
        ]);
    }
    t
}

/// llama-bench's tests: a row per (file, model, dtype, threads), a column
/// per test (`pp N`: prefill of N tokens; `tg N`: N tokens decoded), the
/// mean tokens/s over its repetitions. Empty without llama-bench output.
fn llama_bench_section(files: &[(String, Vec<LlamaPoint>)]) -> String {
    let bench: Vec<(usize, &LlamaPoint)> = files
        .iter()
        .enumerate()
        .flat_map(|(i, (_, ps))| ps.iter().map(move |p| (i + 1, p)))
        .filter(|(_, p)| p.tool == LLAMA_BENCH)
        .collect();
    if bench.is_empty() {
        return String::new();
    }
    let test = |p: &LlamaPoint| match p.prefill_tok_s {
        Some(_) => (0, p.prompt_tokens),
        None => (1, p.new_tokens),
    };
    let tests: Vec<(u8, usize)> = bench
        .iter()
        .map(|(_, p)| test(p))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let heads: Vec<String> = ["#", "model", "dtype", "params", "weights (MiB)", "threads"]
        .iter()
        .map(|s| s.to_string())
        .chain(
            tests
                .iter()
                .map(|&(k, n)| format!("{} {n}", if k == 0 { "pp" } else { "tg" })),
        )
        .collect();
    let mut t = Table::new(&heads.iter().map(String::as_str).collect::<Vec<_>>());
    t.left(1).left(2);
    let rows = first_seen(bench.iter().map(|&(i, p)| (i, &p.model, &p.dtype, p.threads)));
    for (i, model, dtype, threads) in rows {
        let mine: Vec<&LlamaPoint> = bench
            .iter()
            .filter(|&&(j, p)| (j, &p.model, &p.dtype, p.threads) == (i, model, dtype, threads))
            .map(|&(_, p)| p)
            .collect();
        let mut row: Vec<Cell> = vec![
            format!("L{i}").into(),
            Cell::Text(model.clone()),
            Cell::Text(dtype.clone()),
            Cell::from(mine[0].model_params.map(|n| thousands(n as usize))),
            Cell::from(mine[0].model_bytes.map(|b| f1(b as f64 / (1u64 << 20) as f64))),
            threads.to_string().into(),
        ];
        row.extend(tests.iter().map(|&k| {
            let tok_s = mine
                .iter()
                .find(|p| test(p) == k)
                .and_then(|p| p.prefill_tok_s.or(p.decode_tok_s));
            Cell::from(tok_s.map(f2))
        }));
        t.row(row);
    }
    t.note(
        "Tokens/s, the mean over each test's repetitions: `pp N` a prefill of N prompt tokens \
         (our prefill and TTFT), `tg N` N tokens decoded one at a time from an empty context \
         (our single request's decode).",
    );
    format!("\n## llama-bench: tokens/s by test\n\n{}", t.markdown())
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
pub fn compare_svg(inputs: &Compared) -> String {
    let curves = curves(inputs);
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
    let synthetic = inputs.reports.iter().any(|(_, r)| r.metadata.synthetic_weights);
    let mut title = String::from("GPT-2 throughput comparison: tokens/s vs concurrency");
    if synthetic {
        title.push_str(" (some SYNTHETIC weights)");
    }
    let mut subtitle = format!(
        "{} reports{}; means over repetitions; numbered as in the Markdown table",
        inputs.reports.len(),
        llama_count(inputs.llama.len())
    );
    if !inputs.llama.is_empty() {
        subtitle.push_str("; llama.cpp (L): decode tokens/s alone");
    }
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
        series(&mut s, &pts, color, c.dash, &c.label());
        legend_entry(
            &mut s,
            LEFT,
            BOTTOM + 60.0 + ROW * i as f64,
            &truncate_chars(&c.label(), 110),
            color,
            c.dash,
        );
    }
    s.push_str("</svg>\n");
    s
}
