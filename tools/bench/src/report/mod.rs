//! Renderers for a [`Report`]: the stdout summary, the Markdown report and the
//! SVG saturation curve. Pure functions from a report to text; nothing here
//! measures or computes statistics (that is `stats`), it only formats and
//! derives ratios already present in [`Analysis`](super::Analysis).
//!
//! Numbers: rates with 2 decimals, milliseconds with 1, non-finite values as
//! "n/a" in tables and as 0 in the plot; a figure not measured (no
//! reference at that level, no f32 to compare with) as "—".
//!
//! Tables: each is built once, as a `table::Table` of typed cells and notes
//! (the scaling, targets and dtype tables are shared by stdout and the
//! Markdown), and rendered as aligned text or as Markdown, where each cell
//! is escaped by its kind.
//!
//! Several dtypes: every row names its dtype, and the rows of one mode and
//! level sit together, one per dtype in the order they ran, so that they
//! read side by side.
//!
//! A sweep (`--sweep`): its cells side by side and a table and an SVG per
//! swept axis (`sweep.rs`) take the place of the sections that read one
//! analysis of the whole run (scaling, dtypes, recommendations, spread,
//! the saturation curve): those would mix the cells.

mod compare;
mod markdown;
mod pair;
mod roofline;
mod stdout;
mod svg;
mod sweep;
mod table;

pub use compare::{compare_markdown, compare_svg, Compared};
pub use markdown::markdown;
pub use pair::pair_markdown;
pub use roofline::limits_table;
use roofline::optional_sections;
pub use stdout::stdout_table;
pub use svg::svg;
pub use sweep::{axis_points, axis_svg, axis_svg_ext, axis_svgs, CurvePoint};
use sweep::{md_sweep, stdout_sweep};
use table::{Cell, Table};

use super::{LevelAnalysis, Report, Spread, TestResult};

const SYNTHETIC_BANNER: &str = "SYNTHETIC WEIGHTS (random): speed is real, text is noise";
const REFERENCE_LABEL: &str = "reference (other machine)";

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// One line: all targets pass, or which fail; then the opt-in targets
/// missed (not required, so not a failed run), if any.
fn targets_verdict(report: &Report) -> String {
    let targets = &report.analysis.targets;
    let missed = |required: bool| -> Vec<String> {
        targets
            .iter()
            .filter(|t| !t.pass && t.required == required)
            .map(|t| report.target_label(t))
            .collect()
    };
    let (failed, opt_in) = (missed(true), missed(false));
    let required = targets.iter().filter(|t| t.required).count();
    let mut line = if failed.is_empty() && opt_in.is_empty() {
        format!("All {} target{} PASS.", targets.len(), plural(targets.len()))
    } else if failed.is_empty() {
        format!("All {required} required target{} PASS.", plural(required))
    } else {
        format!(
            "{} of {required} required target{} FAIL: {}.",
            failed.len(),
            plural(required),
            failed.join(", ")
        )
    };
    if !opt_in.is_empty() {
        line.push_str(&format!(
            " Opt-in target{} missed (not required; `--strict` requires every target): {}.",
            plural(opt_in.len()),
            opt_in.join(", ")
        ));
    }
    line
}

/// A target's result: PASS, FAIL (required), or `missed (opt-in)`.
fn target_result(t: &super::Target) -> &'static str {
    match (t.pass, t.required) {
        (true, _) => "PASS",
        (false, true) => "FAIL",
        (false, false) => "missed (opt-in)",
    }
}

/// Tests with the same (dtype, mode, concurrency).
struct Group<'a> {
    tests: Vec<&'a TestResult>,
}

impl Group<'_> {
    fn test_names(&self) -> Vec<&str> {
        self.tests.iter().map(|t| t.name.as_str()).collect()
    }
}

/// The groups by (mode, concurrency) in first-seen order, and within one
/// the dtypes in first-seen order.
fn group_tests(tests: &[TestResult]) -> Vec<Group<'_>> {
    let mut groups: Vec<Group> = Vec::new();
    for t in tests {
        match groups.iter_mut().find(|g| {
            let g = g.tests[0];
            g.dtype == t.dtype && g.mode == t.mode && g.concurrency == t.concurrency
        }) {
            Some(g) => g.tests.push(t),
            None => groups.push(Group { tests: vec![t] }),
        }
    }
    let levels = first_seen(tests.iter().map(|t| (t.mode.as_str(), t.concurrency)));
    let dtypes = first_seen(tests.iter().map(|t| t.dtype.as_str()));
    groups.sort_by_key(|g| {
        let t = g.tests[0];
        let level = levels.iter().position(|&l| l == (t.mode.as_str(), t.concurrency));
        (level, dtypes.iter().position(|&d| d == t.dtype))
    });
    groups
}

/// The distinct items, in first-seen order.
fn first_seen<T: PartialEq>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// The tokens/s spread of a (dtype, mode, concurrency) group: the entry of
/// that dtype and mode and one of the group's test names (the modes share
/// test names).
fn spread_for<'a>(spread: &'a [Spread], dtype: &str, mode: &str, names: &[&str]) -> Option<&'a Spread> {
    spread.iter().find(|s| {
        let m = s.metric.to_ascii_lowercase();
        let tokens = m.contains("tok") && (m.ends_with("per_s") || m.ends_with("/s"));
        tokens && s.dtype == dtype && s.mode == mode && names.contains(&s.test.as_str())
    })
}

/// Levels grouped by mode (first-seen order), each mode by concurrency,
/// each concurrency by dtype (first-seen order).
fn sorted_levels(levels: &[LevelAnalysis]) -> Vec<&LevelAnalysis> {
    let mut out: Vec<&LevelAnalysis> = levels.iter().collect();
    let modes = modes_in_order(&out);
    let dtypes = dtypes_in_order(&out);
    out.sort_by_key(|l| {
        (
            modes.iter().position(|m| m == &l.mode),
            l.concurrency,
            dtypes.iter().position(|d| d == &l.dtype),
        )
    });
    out
}

/// A (dtype, mode)'s level at `concurrency`; at 1 the single request is
/// shared by all modes, so the dtype's level 1 of any mode stands in for a
/// mode without its own.
fn level_at<'a>(
    levels: &[&'a LevelAnalysis],
    dtype: &str,
    mode: &str,
    concurrency: usize,
) -> Option<&'a LevelAnalysis> {
    let mine = || levels.iter().filter(|l| l.dtype == dtype);
    let own = mine().find(|l| l.mode == mode && l.concurrency == concurrency);
    own.or_else(|| mine().find(|l| concurrency == 1 && l.concurrency == 1))
        .copied()
}

/// Modes in first-seen order.
fn modes_in_order(levels: &[&LevelAnalysis]) -> Vec<String> {
    first_seen(levels.iter().map(|l| l.mode.clone()))
}

/// Dtypes in first-seen order.
fn dtypes_in_order(levels: &[&LevelAnalysis]) -> Vec<String> {
    first_seen(levels.iter().map(|l| l.dtype.clone()))
}

/// The row of `dtype` in the dtype comparison: what it ran, where the
/// comparison reads its throughput.
struct DtypeRow<'a> {
    run: &'a super::DtypeRun,
    /// The single request's level.
    single: Option<&'a LevelAnalysis>,
    /// The compared concurrent level: batched mode's if measured (else the
    /// last mode's), at 8 if measured, else at the highest concurrency.
    concurrent: Option<&'a LevelAnalysis>,
}

/// One [`DtypeRow`] per dtype of the report, in the order they ran, and the
/// (mode, concurrency) of the compared concurrent level.
fn dtype_rows(report: &Report) -> (Vec<DtypeRow<'_>>, Option<(String, usize)>) {
    let levels = sorted_levels(&report.analysis.levels);
    let modes = modes_in_order(&levels);
    let mode = modes
        .iter()
        .find(|m| m.as_str() == "batched")
        .or(modes.last())
        .cloned();
    let at = mode.and_then(|m| {
        let cs: Vec<usize> = levels
            .iter()
            .filter(|l| l.mode == m && l.concurrency > 1)
            .map(|l| l.concurrency)
            .collect();
        let c = if cs.contains(&8) {
            Some(8)
        } else {
            cs.into_iter().max()
        };
        c.map(|c| (m, c))
    });
    let rows = report
        .metadata
        .dtypes
        .iter()
        .map(|run| DtypeRow {
            run,
            single: levels
                .iter()
                .copied()
                .find(|l| l.dtype == run.dtype && l.concurrency == 1),
            concurrent: at
                .as_ref()
                .and_then(|(m, c)| level_at(&levels, &run.dtype, m, *c)),
        })
        .collect();
    (rows, at)
}

/// The dtype comparison's columns and rows: per dtype its single-request
/// and concurrent tokens/s, its packed weights and its memory, and each
/// tokens/s and the packed bytes against f32's where f32 ran.
fn dtype_table(report: &Report) -> Table {
    let (rows, at) = dtype_rows(report);
    let conc = at.map_or_else(
        || "concurrent tok/s".to_string(),
        |(m, c)| format!("{m} c{c} tok/s"),
    );
    let mut t = Table::new(&[
        "dtype",
        "single tok/s",
        "vs f32",
        &conc,
        "vs f32",
        "packed MiB",
        "vs f32",
        "load RSS",
        "peak RSS",
    ]);
    t.left(0);
    let f32 = rows.iter().find(|r| r.run.dtype == "f32");
    let tok = |l: Option<&LevelAnalysis>| l.map_or(f64::NAN, |l| l.tokens_per_s);
    let mib = |b: Option<u64>| b.map_or(f64::NAN, |b| b as f64 / (1u64 << 20) as f64);
    let vs = |x: f64, f: Option<f64>| -> Cell {
        f.filter(|&f| f > 0.0 && x.is_finite())
            .map(|f| times(x / f))
            .into()
    };
    for r in &rows {
        let peak = mib(r.run.peak_rss_bytes);
        t.row([
            Cell::Text(r.run.dtype.clone()),
            f2(tok(r.single)).into(),
            vs(tok(r.single), f32.map(|f| tok(f.single))),
            f2(tok(r.concurrent)).into(),
            vs(tok(r.concurrent), f32.map(|f| tok(f.concurrent))),
            f1(mib(r.run.packed_weight_bytes)).into(),
            vs(
                mib(r.run.packed_weight_bytes),
                f32.map(|f| mib(f.run.packed_weight_bytes)),
            ),
            f1(mib(r.run.rss_after_load_bytes)).into(),
            Cell::Plain(if r.run.peak_rss_own || !peak.is_finite() {
                f1(peak)
            } else {
                format!("{} cumulative", f1(peak))
            }),
        ]);
    }
    t
}

/// What the dtype comparison's memory columns are, and what a cumulative
/// peak is: lines that fit 100 columns, one paragraph in Markdown.
fn dtype_memory_note(report: &Report) -> String {
    let mut out = String::from(
        "Memory in MiB (2^20 bytes). packed: the packed matrices (blocks' linear layers, LM head)\n\
         as the loader reports them.\n\
         load RSS: resident memory right after loading that dtype, the previous dtype's model dropped\n\
         first (it includes what the process already held: tokenizer, threads, kept allocations).\n\
         peak RSS: the resident high-water mark over that dtype's load and tests, reset before its load.\n",
    );
    if report.metadata.dtypes.iter().any(|d| !d.peak_rss_own) {
        out.push_str(
            "cumulative: the high-water mark could not be reset here, so that peak is the process's\n\
             peak so far, over that dtype and every one above it.\n",
        );
    }
    out
}

/// Each level against the single request of its dtype, the other mode
/// and f32, and the reference study. Text leaves out the request rates
/// and shortens the titles to fit a terminal.
fn scaling_table(levels: &[&LevelAnalysis]) -> Table {
    let ref_req = format!("{REFERENCE_LABEL} req/s");
    let ref_tok = format!("{REFERENCE_LABEL} tok/s");
    let mut t = Table::new(&[
        "mode",
        "dtype",
        "concurrency",
        "req/s",
        "tok/s",
        &ref_req,
        &ref_tok,
        "scaling",
        "efficiency",
        "p50 latency ms",
        "latency penalty",
        "vs threads",
        "vs f32",
    ]);
    t.left(0)
        .left(1)
        .short(2, "conc")
        .markdown_only(3)
        .markdown_only(5);
    t.short(6, "ref tok/s").short(9, "p50 ms").short(10, "lat pen");
    for l in levels {
        t.row([
            Cell::Text(l.mode.clone()),
            Cell::Text(l.dtype.clone()),
            l.concurrency.to_string().into(),
            f2(l.requests_per_s).into(),
            f2(l.tokens_per_s).into(),
            l.reference.map(|(req, _)| f2(req)).into(),
            l.reference.map(|(_, tok)| f2(tok)).into(),
            times(l.scaling).into(),
            percent(l.efficiency).into(),
            f1(l.latency_p50_ms).into(),
            times(l.latency_penalty).into(),
            l.vs_threads.map(times).into(),
            l.vs_f32.map(times).into(),
        ]);
    }
    t
}

/// The pass/fail targets, and the verdict under them.
fn targets_table(report: &Report) -> Table {
    // A sweep's targets are its cells'.
    let of = if report.sweep.is_some() { "cell" } else { "dtype" };
    let mut t = Table::new(&["target", of, "condition", "measured", "result"]);
    t.left(0).left(1).left(2).left(4);
    for tg in &report.analysis.targets {
        let whose = match (tg.cell, &report.sweep) {
            (Some(i), Some(s)) => s.cell_label(i),
            _ => tg.dtype.clone(),
        };
        t.row([
            Cell::Code(tg.name.clone()),
            Cell::Text(whose),
            format!("{} {}", tg.op, target_value(tg.threshold, tg)).into(),
            target_value(tg.measured, tg).into(),
            match target_result(tg) {
                "FAIL" => Cell::Strong("FAIL".into()),
                other => other.into(),
            },
        ]);
    }
    t.note(targets_verdict(report));
    t
}

fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

fn mean_of(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

fn fmt_dec(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "n/a".to_string()
    }
}

/// Rates (req/s, tok/s) and seconds.
fn f2(x: f64) -> String {
    fmt_dec(x, 2)
}

/// Milliseconds.
fn f1(x: f64) -> String {
    fmt_dec(x, 1)
}

fn times(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}×")
    } else {
        "n/a".to_string()
    }
}

fn percent(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}%", x * 100.0)
    } else {
        "n/a".to_string()
    }
}

/// A target's threshold or measured value: integers as integers when both are
/// (counts such as "failed = 0"), otherwise 2 decimals.
fn target_value(x: f64, t: &super::Target) -> String {
    let integral = |v: f64| v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15;
    if integral(t.threshold) && integral(t.measured) {
        format!("{x:.0}")
    } else {
        f2(x)
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn join_usize(v: &[usize]) -> String {
    v.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let groups: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).unwrap_or_default())
        .collect();
    groups.join(",")
}

/// First 16 hex characters of a digest, with an ellipsis if cut.
fn short_sha(sha: &str) -> String {
    if sha.is_empty() {
        return "unknown".to_string();
    }
    let cut: String = sha.chars().take(16).collect();
    if sha.chars().count() > 16 {
        format!("{cut}…")
    } else {
        cut
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Escape text from metadata for XML (element content and attributes).
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab/newline are not allowed in XML 1.0.
            c if c.is_control() && c != '\t' && c != '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Free text in Markdown (also inside table cells): one line, Markdown
/// punctuation and HTML escaped.
fn md_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in one_line(s).chars() {
        match c {
            '\\' | '`' | '*' | '_' | '[' | ']' | '|' | '#' | '~' => {
                out.push('\\');
                out.push(c);
            }
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            c => out.push(c),
        }
    }
    out
}

/// Text for inside a single-backtick code span in a table cell.
fn md_code(s: &str) -> String {
    one_line(s).replace('`', "'").replace('|', "\\|")
}

/// A relative link target; angle brackets allow spaces and parentheses.
fn md_link_target(name: &str) -> String {
    if name.chars().any(|c| c.is_whitespace() || c == '(' || c == ')') {
        format!("<{}>", name.replace('<', "%3C").replace('>', "%3E"))
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        Analysis, DtypeRun, Metadata, ModelInfo, Recommendation, RequestRecord, Summary, Target,
        REFERENCE_STUDY,
    };
    use super::*;

    fn level(mode: &str, c: usize, tok: f64, lat: f64, tok1: f64, lat1: f64) -> LevelAnalysis {
        let reference = REFERENCE_STUDY.iter().find(|r| r.0 == c).map(|r| (r.1, r.2));
        LevelAnalysis {
            dtype: "f32".to_string(),
            mode: mode.to_string(),
            concurrency: c,
            requests_per_s: tok / 50.0,
            tokens_per_s: tok,
            latency_p50_ms: lat,
            scaling: tok / tok1,
            efficiency: tok / tok1 / c as f64,
            latency_penalty: lat / lat1,
            reference,
            vs_threads: None,
            vs_f32: None,
        }
    }

    fn test_result(mode: &str, c: usize, rep: usize, tok: f64, lat: f64) -> TestResult {
        let s = |x: f64| Summary {
            mean: x,
            p50: x,
            p95: x * 1.1,
            p99: x * 1.2,
        };
        TestResult {
            name: if c == 1 {
                "single".to_string()
            } else {
                format!("concurrent-{c}")
            },
            mode: mode.to_string(),
            dtype: "f32".to_string(),
            concurrency: c,
            repetition: rep,
            requests: 4 * c,
            failed: 0,
            total_tokens: 200 * c,
            prompt_tokens: 40 * c,
            duration_s: 200.0 * c as f64 / tok,
            requests_per_s: tok / 50.0,
            tokens_per_s: tok,
            latency_ms: s(lat),
            ttft_ms: s(lat / 20.0),
            tpot_ms: s(lat / 50.0),
            itl_ms: Some(s(lat / 50.0)),
            prefix: None,
            cell: None,
            raw: vec![RequestRecord {
                index: 0,
                client: 0,
                prompt_tokens: 10,
                generated_tokens: 50,
                start_ms: 0.0,
                ttft_ms: Some(lat / 20.0),
                latency_ms: lat,
                tpot_ms: Some(lat / 50.0),
                token_ms: Vec::new(),
                choice_ms: Vec::new(),
                error: None,
                cause: None,
            }],
        }
    }

    /// `modes` each at levels 1, 2, 4; `reps` repetitions of every test.
    fn report(modes: &[&str], levels: &[usize], reps: usize) -> Report {
        let mut tests = Vec::new();
        let mut lv = Vec::new();
        let mut spread = Vec::new();
        for (mi, &mode) in modes.iter().enumerate() {
            let tok = |c: usize| 30.0 * (c as f64).powf(0.5 + 0.2 * mi as f64);
            let lat = |c: usize| 1600.0 * (c as f64).powf(0.6);
            // Like `stats`: the single request (concurrency 1) is run in the first mode only.
            for &c in levels.iter().filter(|&&c| mi == 0 || c > 1) {
                for rep in 0..reps {
                    tests.push(test_result(mode, c, rep, tok(c) + rep as f64, lat(c)));
                }
                lv.push(level(mode, c, tok(c), lat(c), tok(levels[0]), lat(levels[0])));
                if reps > 1 {
                    let name = if c == 1 {
                        "single".to_string()
                    } else {
                        format!("concurrent-{c}")
                    };
                    // As `stats` writes it: the bare test name and its mode.
                    let sd = 0.25 + 0.5 * mi as f64;
                    let m = tok(c) + (reps - 1) as f64 / 2.0;
                    for (metric, mean) in [("tokens_per_s", m), ("latency_p50_ms", lat(c))] {
                        spread.push(Spread {
                            test: name.clone(),
                            dtype: "f32".to_string(),
                            mode: mode.to_string(),
                            metric: metric.to_string(),
                            mean,
                            stddev: sd,
                            min: mean - sd,
                            max: mean + sd,
                            n: reps,
                        });
                    }
                }
            }
        }
        let recommended = modes
            .iter()
            .map(|m| Recommendation {
                dtype: "f32".to_string(),
                mode: m.to_string(),
                concurrency: *levels.last().unwrap(),
            })
            .collect();
        Report {
            schema_version: 1,
            metadata: Metadata {
                timestamp_utc: "2025-01-01T00:00:00Z".to_string(),
                git_commit: "abc1234".to_string(),
                rustc: "rustc 1.80.0".to_string(),
                cpu_model: "Fast & <Cheap> CPU \"x\"".to_string(),
                kernels: "avx2".to_string(),
                cores: 8,
                pool_layout: "shared".to_string(),
                threads_per_request: 8,
                max_busy_threads: 8,
                concurrency_levels: levels.to_vec(),
                run_mode: "quick".to_string(),
                modes: modes.iter().map(|m| m.to_string()).collect(),
                arrival: "closed loop".to_string(),
                max_batch: 32,
                max_prompt_rows: 128,
                weights_source: "SYNTHETIC 124m checkpoint, seed 0 (R&D)".to_string(),
                weights_sha256: "0123456789abcdef0123456789abcdef".to_string(),
                synthetic_weights: true,
                model: Some(ModelInfo {
                    n_layer: 12,
                    n_head: 12,
                    n_embd: 768,
                    n_positions: 1024,
                    vocab_size: 50257,
                    n_params: 124_439_808,
                }),
                dtypes: vec![DtypeRun {
                    dtype: "f32".to_string(),
                    packed_weight_bytes: Some(497_000_000),
                    rss_after_load_bytes: Some(520_000_000),
                    peak_rss_bytes: Some(600_000_000),
                    peak_rss_own: true,
                }],
                kv_dtype: "f32".to_string(),
                max_new_tokens: 50,
                warmup_requests: 2,
                repetitions: reps,
                prompts: vec!["Hello | world".to_string(), "The *quick* fox".to_string()],
                prompt_tokens: None,
                shared_prefix_tokens: 0,
                choices: 1,
                prefix_cache_mib: Some(0),
                server: None,
            },
            tests,
            analysis: Analysis {
                levels: lv,
                recommended_concurrency: recommended,
                targets: vec![
                    Target {
                        name: "single_tokens_per_s".to_string(),
                        dtype: "f32".to_string(),
                        op: ">".to_string(),
                        threshold: 25.24,
                        measured: 30.0,
                        pass: true,
                        required: true,
                        cell: None,
                    },
                    Target {
                        name: "failed".to_string(),
                        dtype: "f32".to_string(),
                        op: "<=".to_string(),
                        threshold: 0.0,
                        measured: 1.0,
                        pass: false,
                        required: true,
                        cell: None,
                    },
                ],
                spread,
            },
            profile: None,
            roofline: None,
            sweep: None,
        }
    }

    #[test]
    fn markdown_has_every_section_and_the_reference_column() {
        let r = report(&["threads", "batched"], &[1, 2, 4], 2);
        let md = markdown(&r, "throughput.svg");
        for heading in [
            "# GPT-2 throughput benchmark",
            "## Setup",
            "## Results",
            "## Scaling",
            "## Recommended concurrency",
            "## Targets",
            "## Spread over repetitions",
            "## Saturation curve",
            "## Method",
        ] {
            assert!(md.lines().any(|l| l == heading), "missing heading {heading:?}");
        }
        assert!(md.contains("reference (other machine)"));
        assert!(md.contains("(throughput.svg)"));
        assert!(md.contains(SYNTHETIC_BANNER));
        assert!(md.contains("`0123456789abcdef…`"));
        assert!(
            md.contains("Hello \\| world"),
            "a prompt's pipe must not split a table cell"
        );
        assert!(md.contains("At concurrency 4, threads mode (f32) gives 2.00× the throughput"));
        assert!(md.contains("| PASS ") && md.contains("**FAIL**"));
        // The reference figures at concurrency 4 appear in the scaling table.
        assert!(md.contains("41.46"));
        assert!(md.contains("124,439,808"));
        // Spread entries name their mode (the modes share test names).
        let spread_row = |mode: &str, metric: &str| {
            md.lines()
                .find(|l| l.starts_with("| concurrent-4") && l.contains(mode) && l.contains(metric))
                .unwrap_or_else(|| panic!("no spread row for {mode} {metric}:\n{md}"))
                .to_string()
        };
        assert!(spread_row("batched", "`tokens_per_s`").contains(" 0.75 |"));
        assert!(spread_row("threads", "`tokens_per_s`").contains(" 0.25 |"));
    }

    #[test]
    fn markdown_leaves_out_spread_without_repetitions() {
        let md = markdown(&report(&["threads"], &[1, 2, 4], 1), "plot.svg");
        assert!(!md.contains("## Spread over repetitions"));
    }

    #[test]
    fn svg_is_well_formed_with_one_polyline_per_series() {
        let r = report(&["threads", "batched"], &[1, 2, 4], 1);
        let s = svg(&r);
        assert!(s.starts_with("<svg"));
        assert!(s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<svg").count(), 1);
        assert_eq!(s.matches("</svg>").count(), 1);
        // 2 modes × 2 panels + the reference.
        assert_eq!(s.matches("<polyline").count(), 5);
        assert!(s.contains("stroke=\"#d62728\"") && s.contains("stroke=\"#1f77b4\""));
        // batched has no level 1 of its own: its lines start from the shared single request.
        for line in s
            .lines()
            .filter(|l| l.starts_with("<polyline") && l.contains("#1f77b4"))
        {
            let points = line.split('"').nth(1).unwrap();
            assert_eq!(points.split(' ').count(), 3, "{line}");
        }
        assert!(s.contains("reference (other machine)"));
        assert!(s.contains("SYNTHETIC weights"));
        assert!(s.contains("Fast &amp; &lt;Cheap&gt; CPU"));
        assert_no_raw_ampersand(&s);
        assert_balanced_tags(&s);
        assert!(!s.contains("NaN") && !s.contains("inf"));
    }

    #[test]
    fn stdout_table_has_targets_and_spread() {
        let r = report(&["threads", "batched"], &[1, 2, 4], 3);
        let t = stdout_table(&r);
        assert!(t.contains("PASS") && t.contains("FAIL"));
        assert!(t.contains(SYNTHETIC_BANNER));
        // One row per (mode, concurrency), not per repetition.
        assert_eq!(
            t.lines()
                .filter(|l| l.contains("concurrent-4") && l.contains("threads"))
                .count(),
            1
        );
        for line in t.lines() {
            assert!(
                line.chars().count() <= 100,
                "line wider than 100 columns: {line:?}"
            );
        }

        // Test names are shared by the modes: each row gets its own mode's
        // stddev from the entry's mode, even where both modes' means are equal.
        let mut same_means = r.clone();
        same_means.analysis.spread.iter_mut().for_each(|s| s.mean = 1.0);
        for report in [&r, &same_means] {
            let t = stdout_table(report);
            for (mode, sd) in [("threads", "±0.25"), ("batched", "±0.75")] {
                let rows: Vec<&str> = t
                    .lines()
                    .filter(|l| l.contains(mode) && l.contains("concurrent-"))
                    .collect();
                assert_eq!(rows.len(), 2, "{t}");
                assert!(rows.iter().all(|l| l.contains(sd)), "{mode} rows lack {sd}:\n{t}");
            }
        }
    }

    /// `r` with a bf16 copy of everything it measured at twice the tokens/s,
    /// its packed weights half the size, its peak cumulative unless `own`.
    fn with_bf16(mut r: Report, own: bool) -> Report {
        let bf16 = |d: &mut String| *d = "bf16".to_string();
        let mut tests = r.tests.clone();
        for t in &mut tests {
            bf16(&mut t.dtype);
            t.tokens_per_s *= 2.0;
        }
        r.tests.extend(tests);
        let mut levels = r.analysis.levels.clone();
        for l in &mut levels {
            bf16(&mut l.dtype);
            l.tokens_per_s *= 2.0;
            l.vs_f32 = Some(2.0);
        }
        r.analysis.levels.extend(levels);
        let mut targets = r.analysis.targets.clone();
        targets.iter_mut().for_each(|t| bf16(&mut t.dtype));
        r.analysis.targets.extend(targets);
        let mut spread = r.analysis.spread.clone();
        spread.iter_mut().for_each(|s| bf16(&mut s.dtype));
        r.analysis.spread.extend(spread);
        let mut rec = r.analysis.recommended_concurrency.clone();
        rec.iter_mut().for_each(|x| bf16(&mut x.dtype));
        r.analysis.recommended_concurrency.extend(rec);
        let f32 = r.metadata.dtypes[0].clone();
        r.metadata.dtypes.push(DtypeRun {
            dtype: "bf16".to_string(),
            packed_weight_bytes: f32.packed_weight_bytes.map(|b| b / 2),
            peak_rss_own: own,
            ..f32
        });
        r
    }

    #[test]
    fn several_dtypes_read_side_by_side() {
        let r = with_bf16(report(&["threads", "batched"], &[1, 2, 4, 8], 2), true);
        let t = stdout_table(&r);
        for line in t.lines() {
            assert!(line.chars().count() <= 100, "wider than 100 columns: {line:?}");
        }
        // A level's rows sit together, f32 first.
        let rows: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("concurrent-4") && l.contains("batched"))
            .collect();
        assert_eq!(rows.len(), 2, "{t}");
        assert!(rows[0].contains(" f32 ") && rows[1].contains(" bf16 "), "{t}");
        assert!(t.contains("dtypes: f32, bf16"));
        // The comparison: batched at 8, bf16 at twice the rates and half the bytes.
        let cmp = t.lines().skip_while(|l| !l.starts_with("Dtype comparison"));
        let cmp: Vec<&str> = cmp.take(5).collect();
        assert!(cmp[1].contains("batched c8 tok/s"), "{cmp:?}");
        let bf16 = cmp.iter().find(|l| l.starts_with("bf16")).unwrap();
        assert_eq!(bf16.matches("2.00×").count(), 2, "{bf16}");
        assert!(bf16.contains("0.50×") && !bf16.contains("cumulative"), "{bf16}");
        // Every target twice, and the verdict names the dtype.
        assert!(t.contains("failed (f32), failed (bf16)"), "{t}");

        let md = markdown(&r, "x.svg");
        assert!(md.lines().any(|l| l == "## Dtype comparison"));
        assert!(md.contains("At concurrency 8, batched mode (bf16) gives"));
        assert!(md.contains("| bf16 "));
        let vs_f32 = md
            .lines()
            .find(|l| l.starts_with("| batched") && l.contains("| bf16 ") && l.contains("|           8 |"))
            .unwrap_or_else(|| panic!("no bf16 scaling row at 8:\n{md}"));
        assert!(vs_f32.trim_end().ends_with("2.00× |"), "{vs_f32}");

        let s = svg(&r);
        // 2 modes × 2 dtypes × 2 panels + the reference.
        assert_eq!(s.matches("<polyline").count(), 9);
        assert!(s.contains("threads bf16") && s.contains("batched f32"));
        assert!(s.contains("f32, bf16 weights"), "the subtitle names the dtypes");
        assert!(s.contains(r#"stroke-dasharray="8 3""#));
        assert_balanced_tags(&s);
    }

    #[test]
    fn a_peak_that_could_not_be_reset_is_marked_cumulative() {
        let r = with_bf16(report(&["threads"], &[1, 2], 1), false);
        let t = stdout_table(&r);
        let bf16 = t.lines().find(|l| l.starts_with("bf16 ")).unwrap();
        assert!(bf16.ends_with("572.2 cumulative"), "{bf16}");
        assert!(t.contains("cumulative: the high-water mark could not be reset"));
        let md = markdown(&r, "x.svg");
        assert!(md.contains("cumulative: the high-water mark could not be reset"));
    }

    #[test]
    fn single_level_and_degenerate_values_render() {
        let mut r = report(&["threads"], &[1], 1);
        r.analysis.levels[0].tokens_per_s = f64::NAN;
        r.analysis.levels[0].latency_p50_ms = 0.0;
        r.analysis.levels[0].scaling = f64::INFINITY;
        r.tests[0].tokens_per_s = f64::NAN;
        let s = svg(&r);
        assert_balanced_tags(&s);
        assert!(!s.contains("NaN") && !s.contains("inf"));
        let md = markdown(&r, "a b.svg");
        assert!(md.contains("only measured at concurrency 1"));
        assert!(md.contains("(<a b.svg>)"));
        assert!(stdout_table(&r).contains("n/a"));

        let mut empty = r.clone();
        empty.tests.clear();
        empty.analysis = Analysis {
            levels: vec![],
            recommended_concurrency: vec![],
            targets: vec![],
            spread: vec![],
        };
        let s = svg(&empty);
        assert_eq!(s.matches("<polyline").count(), 0);
        assert_balanced_tags(&s);
        assert!(markdown(&empty, "x.svg").contains("## Targets"));
        assert!(stdout_table(&empty).contains("(no tests)"));
    }

    /// Two reports, one a server's: every (report, mode, dtype) a curve,
    /// numbered, labelled by engine; a well-formed SVG with one line each.
    #[test]
    fn compare_sets_reports_side_by_side() {
        let local = report(&["threads", "batched"], &[1, 2, 4], 1);
        let mut server = report(&["http"], &[1, 2, 8], 1);
        server.metadata.synthetic_weights = false;
        server.metadata.server = Some(crate::ServerInfo {
            url: "http://10.0.0.1:8000".to_string(),
            model: "gpt2 & <co>".to_string(),
            owned_by: Some("vllm".to_string()),
            models: serde_json::json!({"data": []}),
        });
        let reports = [("a.json".to_string(), local), ("b.json".to_string(), server)];
        let both = Compared {
            reports: &reports,
            llama: &[],
        };
        let md = compare_markdown(&both, "cmp.svg");
        assert!(md.contains("(cmp.svg)") && md.contains(SYNTHETIC_BANNER));
        let rows: Vec<&str> = md
            .lines()
            .skip_while(|l| *l != "## Tokens/s by concurrency")
            .skip(4)
            .take_while(|l| l.starts_with("| "))
            .collect();
        assert_eq!(rows.len(), 3, "{md}");
        assert!(
            rows[2].contains("vllm gpt2 &amp; &lt;co&gt;") && rows[2].contains("client "),
            "{md}"
        );
        // Levels 1, 2, 4, 8 as columns; report 1 has no 8, report 2 no 4.
        let head = md
            .lines()
            .skip_while(|l| *l != "## Tokens/s by concurrency")
            .nth(2)
            .unwrap();
        let cols: Vec<&str> = head
            .split('|')
            .map(str::trim)
            .filter(|c| c.starts_with('c'))
            .collect();
        assert_eq!(cols, ["c1", "c2", "c4", "c8"], "{head}");
        assert!(rows[0].trim_end().ends_with("— |"), "{}", rows[0]);
        let s = compare_svg(&both);
        assert_eq!(s.matches("<polyline").count(), 3);
        assert!(s.contains("[2] vllm gpt2 &amp; &lt;co&gt; http f32"));
        assert_no_raw_ampersand(&s);
        assert_balanced_tags(&s);
        assert!(!s.contains("NaN") && !s.contains("inf"));
        let empty = compare_svg(&Compared {
            reports: &[],
            llama: &[],
        });
        assert_balanced_tags(&empty);
        assert!(empty.contains("no data"));
    }

    /// `r` as a sweep of `axis` over `values`: each value a cell with a
    /// copy of `r`'s tests, its tokens/s divided by the cell's number + 1.
    fn as_sweep(r: &Report, axis: &str, values: &[&str]) -> Report {
        let mut out = r.clone();
        out.tests.clear();
        let mut cells = Vec::new();
        for (i, v) in values.iter().enumerate() {
            out.tests.extend(r.tests.iter().map(|t| TestResult {
                cell: Some(i),
                tokens_per_s: t.tokens_per_s / (i + 1) as f64,
                ..t.clone()
            }));
            cells.push(crate::SweepCell {
                swept: [(axis.to_string(), v.to_string())].into_iter().collect(),
                model_name: "tiny".into(),
                model: r.metadata.model.clone().unwrap(),
                weights_source: "synthetic tiny".into(),
                weights_sha256: String::new(),
                synthetic_weights: true,
                dtype: "f32".into(),
                kv_dtype: "f32".into(),
                prompt_tokens: Some(6),
                max_new_tokens: 50,
                concurrency_levels: vec![1, 2, 4],
                memory: r.metadata.dtypes[0].clone(),
                analysis: r.analysis.clone(),
            });
        }
        out.analysis.targets = vec![Target {
            cell: Some(1),
            ..r.analysis.targets[1].clone()
        }];
        out.sweep = Some(crate::Sweep {
            axes: vec![crate::SweepAxis {
                axis: axis.into(),
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
            cells,
            order: vec![vec![0, 1], vec![1, 0]],
        });
        out
    }

    /// A sweep of two prompt lengths: a curve per test (single, each mode
    /// and level), a point per cell; its table, its SVG, and the sections
    /// that would mix the cells left out.
    #[test]
    fn a_sweep_draws_a_curve_per_other_setting() {
        let r = as_sweep(
            &report(&["threads", "batched"], &[1, 2, 4], 1),
            "prompt-tokens",
            &["6", "900"],
        );
        let points = axis_points(&r, "prompt-tokens");
        let series = first_seen(points.iter().map(|p| p.series.as_str()));
        assert_eq!(
            series,
            ["single", "threads c2", "threads c4", "batched c2", "batched c4"]
        );
        let single: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.series == "single")
            .map(|p| (p.x, p.tokens_per_s))
            .collect();
        assert_eq!(single, [(6.0, 30.0), (900.0, 15.0)], "{points:?}");
        assert!(points.iter().all(|p| p.ttft_ms.is_some_and(|t| t > 0.0)));
        assert!(axis_points(&r, "dtype").is_empty(), "not swept");

        let s = axis_svg("GPT-2 & co against prompt-tokens", "prompt-tokens", &points);
        assert_eq!(s.matches("<polyline").count(), 2 * 5, "two panels, five curves");
        assert!(s.contains(">900</text>") && s.contains("TTFT p50 (ms) vs prompt-tokens"));
        assert_no_raw_ampersand(&s);
        assert_balanced_tags(&s);
        assert!(!s.contains("NaN") && !s.contains("inf"));
        let [(axis, svg)] = &axis_svgs(&r)[..] else {
            panic!("one SVG per axis")
        };
        assert_eq!(
            (axis.as_str(), axis_svg_ext(axis).as_str()),
            ("prompt-tokens", "prompt-tokens.svg")
        );
        assert!(svg.contains("SYNTHETIC"));

        let t = stdout_table(&r);
        assert!(
            t.contains("Sweep: 2 cells") && t.contains("against prompt-tokens"),
            "{t}"
        );
        assert!(t.contains("repetition 2: 1 0"), "{t}");
        let row = t
            .lines()
            .find(|l| l.starts_with("single") && l.contains(" 900 "))
            .unwrap();
        assert!(row.contains("15.00") && row.contains("0.50×"), "{row}");
        assert!(
            !t.contains("Scaling vs concurrency"),
            "no section that mixes the cells: {t}"
        );
        assert!(t.contains("failed (cell 1: prompt-tokens=900)"), "{t}");
        let md = markdown(&r, "run.svg");
        assert!(
            md.contains("## Sweep") && md.contains("(run.prompt-tokens.svg)"),
            "{md}"
        );
        assert!(!md.contains("## Saturation curve") && !md.contains("## Scaling"));
        assert!(md.contains("| cell | test"), "the tests name their cell: {md}");

        // Against concurrency: each mode's test at the cell's level, the
        // single request standing for every mode at 1.
        let c = as_sweep(
            &report(&["threads", "batched"], &[1, 2, 4], 1),
            "concurrency",
            &["1", "2"],
        );
        let points = axis_points(&c, "concurrency");
        let got: Vec<(&str, f64)> = points.iter().map(|p| (p.series.as_str(), p.x)).collect();
        assert_eq!(
            got,
            [
                ("threads", 1.0),
                ("batched", 1.0),
                ("threads", 2.0),
                ("batched", 2.0)
            ]
        );
        assert_balanced_tags(&axis_svg("t", "concurrency", &points));
        assert!(axis_svg("t", "x", &[]).contains("no data"));
    }

    fn assert_no_raw_ampersand(s: &str) {
        for (i, _) in s.match_indices('&') {
            let rest = &s[i..];
            let ok = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                .iter()
                .any(|e| rest.starts_with(e));
            assert!(ok, "unescaped & at byte {i}: {:?}", &rest[..rest.len().min(20)]);
        }
    }

    /// Every opened element is closed in order (self-closing tags count as both).
    fn assert_balanced_tags(s: &str) {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = s;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("unterminated tag") + start;
            let tag = &rest[start + 1..end];
            assert!(!tag.contains('<'), "'<' inside a tag: {tag:?}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "mismatched </{name}>");
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap_or("").to_string());
            }
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed elements: {stack:?}");
    }
}
