//! Renderers for a [`Report`]: the stdout summary, the Markdown report and the
//! SVG saturation curve. Pure functions from a report to text; nothing here
//! measures or computes statistics (that is `stats`), it only formats and
//! derives ratios already present in [`Analysis`](super::Analysis).
//!
//! Numbers: rates with 2 decimals, milliseconds with 1, non-finite values as
//! "n/a" in tables and as 0 in the plot.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::{LevelAnalysis, Report, Spread, TestResult};

const SYNTHETIC_BANNER: &str = "SYNTHETIC WEIGHTS (random): speed is real, text is noise";
const REFERENCE_LABEL: &str = "reference (other machine)";

// ---------------------------------------------------------------------------
// stdout
// ---------------------------------------------------------------------------

/// The human summary printed on stdout: header, per-test rows (means over
/// repetitions), scaling, recommended concurrency and targets. Plain text,
/// aligned columns, fits a 100-column terminal for the usual test names.
pub fn stdout_table(report: &Report) -> String {
    let md = &report.metadata;
    let mut out = String::new();

    let _ = writeln!(out, "GPT-2 throughput benchmark ({} run)", md.run_mode);
    let _ = writeln!(
        out,
        "weights: {} [sha256 {}]",
        one_line(&md.weights_source),
        short_sha(&md.weights_sha256)
    );
    if md.synthetic_weights {
        let bar = "!".repeat(SYNTHETIC_BANNER.len() + 8);
        let _ = writeln!(out, "{bar}\n!!! {SYNTHETIC_BANNER} !!!\n{bar}");
    }
    let _ = writeln!(
        out,
        "threads: {} pool, {} threads per request, {} cores, at most {} busy threads",
        md.pool_layout, md.threads_per_request, md.cores, md.max_busy_threads
    );
    let _ = writeln!(
        out,
        "cpu: {} | {} new tokens per request (EOS ignored), {} warmup, {} repetition{}",
        one_line(&md.cpu_model),
        md.max_new_tokens,
        md.warmup_requests,
        md.repetitions,
        plural(md.repetitions)
    );

    // Per-test rows, one per (mode, concurrency), means over repetitions.
    let groups = group_tests(&report.tests);
    let reps = groups.iter().map(|g| g.tests.len()).max().unwrap_or(0);
    out.push('\n');
    if reps > 1 {
        let _ = writeln!(
            out,
            "Tests: rates and latencies are means over {reps} repetitions, requests and failed are totals"
        );
    } else {
        out.push_str("Tests\n");
    }
    let mut table = Table::new(&[
        "test", "mode", "conc", "reqs", "fail", "req/s", "tok/s", "p50 ms", "p95", "p99", "TTFT", "TPOT",
    ]);
    table.left(0).left(1);
    for g in &groups {
        let first = g.tests[0];
        let mean = |f: fn(&TestResult) -> f64| mean_of(g.tests.iter().map(|t| f(t)));
        let mean_tok = mean(|t| t.tokens_per_s);
        let mut tok = f2(mean_tok);
        if let Some(s) = spread_for(&report.analysis.spread, &first.mode, &g.test_names()) {
            if s.n > 1 {
                let _ = write!(tok, " ±{}", f2(s.stddev));
            }
        }
        table.row(vec![
            first.name.clone(),
            first.mode.clone(),
            first.concurrency.to_string(),
            g.tests.iter().map(|t| t.requests).sum::<usize>().to_string(),
            g.tests.iter().map(|t| t.failed).sum::<usize>().to_string(),
            f2(mean(|t| t.requests_per_s)),
            tok,
            f1(mean(|t| t.latency_ms.p50)),
            f1(mean(|t| t.latency_ms.p95)),
            f1(mean(|t| t.latency_ms.p99)),
            f1(mean(|t| t.ttft_ms.p50)),
            f1(mean(|t| t.tpot_ms.p50)),
        ]);
    }
    if groups.is_empty() {
        out.push_str("(no tests)\n");
    } else {
        out.push_str(&table.text());
        out.push_str("(end-to-end latency p50/p95/p99, TTFT p50 and TPOT p50, all in ms)\n");
    }

    // Scaling.
    let levels = sorted_levels(&report.analysis.levels);
    if !levels.is_empty() {
        out.push_str("\nScaling vs concurrency 1 (efficiency = tok/s(N) / (N * tok/s(1)))\n(ref: the reference study, on another machine)\n");
        let mut t = Table::new(&[
            "mode",
            "conc",
            "tok/s",
            "scaling",
            "efficiency",
            "p50 lat ms",
            "lat penalty",
            "vs threads",
            "ref tok/s",
        ]);
        t.left(0);
        for l in &levels {
            t.row(vec![
                l.mode.clone(),
                l.concurrency.to_string(),
                f2(l.tokens_per_s),
                times(l.scaling),
                percent(l.efficiency),
                f1(l.latency_p50_ms),
                times(l.latency_penalty),
                l.vs_threads.map_or_else(|| "-".to_string(), times),
                l.reference.map_or_else(|| "-".to_string(), |(_, tok)| f2(tok)),
            ]);
        }
        out.push_str(&t.text());
    }

    // Recommended concurrency.
    if !report.analysis.recommended_concurrency.is_empty() {
        out.push_str("\nRecommended concurrency (lowest level reaching 90% of the mode's best tok/s)\n");
        for (mode, conc) in &report.analysis.recommended_concurrency {
            let at = level_at(&levels, mode, *conc);
            match at {
                Some(l) => {
                    let _ = writeln!(
                        out,
                        "{mode}: {conc}  ({} tok/s, p50 latency {} ms)",
                        f2(l.tokens_per_s),
                        f1(l.latency_p50_ms)
                    );
                }
                None => {
                    let _ = writeln!(out, "{mode}: {conc}");
                }
            }
        }
    }

    // Targets.
    let targets = &report.analysis.targets;
    if !targets.is_empty() {
        out.push_str("\nTargets\n");
        let mut t = Table::new(&["target", "condition", "measured", "result"]);
        t.left(0).left(1).left(3);
        for tg in targets {
            t.row(vec![
                tg.name.clone(),
                format!("{} {}", tg.op, target_value(tg.threshold, tg)),
                target_value(tg.measured, tg),
                pass_fail(tg.pass).to_string(),
            ]);
        }
        out.push_str(&t.text());
        out.push_str(&targets_verdict(report));
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// Markdown
// ---------------------------------------------------------------------------

/// The Markdown report. `svg_file_name` is the saturation-curve plot, linked
/// relative to the Markdown file (so both should sit in the same directory).
pub fn markdown(report: &Report, svg_file_name: &str) -> String {
    let md = &report.metadata;
    let a = &report.analysis;
    let levels = sorted_levels(&a.levels);
    let mut out = String::new();

    out.push_str("# GPT-2 throughput benchmark\n\n");
    let _ = writeln!(
        out,
        "Concurrent text generation with gpt2-rs: each request generates exactly {} tokens \
         from one of {} prompt{}, at concurrency levels {} in mode{} {}. \
         Throughput counts generated tokens only; latencies are per request.\n",
        md.max_new_tokens,
        md.prompts.len(),
        plural(md.prompts.len()),
        join_usize(&md.concurrency_levels),
        plural(md.modes.len()),
        md.modes
            .iter()
            .map(|m| format!("`{}`", md_code(m)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if md.synthetic_weights {
        let _ = writeln!(
            out,
            "> **{SYNTHETIC_BANNER}.** The weights are random numbers with the shape of the real \
             checkpoint: timings are representative, generated text is meaningless.\n"
        );
    }

    // Setup.
    out.push_str("## Setup\n\n");
    let mut t = Table::new(&["setting", "value"]);
    t.left(0).left(1);
    let m = &md.model;
    let setup: Vec<(&str, String)> = vec![
        ("timestamp (UTC)", md_text(&md.timestamp_utc)),
        ("git commit", format!("`{}`", md_code(&md.git_commit))),
        ("CPU", md_text(&md.cpu_model)),
        ("cores", md.cores.to_string()),
        ("pool layout", md_text(&md.pool_layout)),
        ("threads per request", md.threads_per_request.to_string()),
        ("max busy threads", md.max_busy_threads.to_string()),
        ("rustc", md_text(&md.rustc)),
        ("weights source", md_text(&md.weights_source)),
        (
            "weights sha256",
            format!("`{}`", md_code(&short_sha(&md.weights_sha256))),
        ),
        (
            "synthetic weights",
            if md.synthetic_weights {
                format!("**yes: {SYNTHETIC_BANNER}**")
            } else {
                "no".to_string()
            },
        ),
        (
            "model",
            format!(
                "{} layers, {} heads, {} embd, {} positions, vocab {}",
                m.n_layer, m.n_head, m.n_embd, m.n_positions, m.vocab_size
            ),
        ),
        (
            "parameters",
            format!("{:.1} M ({})", m.n_params as f64 / 1e6, thousands(m.n_params)),
        ),
        ("dtype", md_text(&m.dtype)),
        ("max_new_tokens", format!("{} (EOS ignored)", md.max_new_tokens)),
        ("warmup requests", md.warmup_requests.to_string()),
        ("repetitions", md.repetitions.to_string()),
        ("run mode", md_text(&md.run_mode)),
        (
            "modes",
            md.modes.iter().map(|s| md_text(s)).collect::<Vec<_>>().join(", "),
        ),
        ("concurrency levels", join_usize(&md.concurrency_levels)),
        ("prompts", format!("{} (listed below)", md.prompts.len())),
        ("schema version", report.schema_version.to_string()),
    ];
    for (k, v) in setup {
        t.row(vec![k.to_string(), v]);
    }
    out.push_str(&t.markdown());
    if !md.prompts.is_empty() {
        out.push_str("\nPrompts:\n\n");
        for (i, p) in md.prompts.iter().enumerate() {
            let _ = writeln!(out, "{}. {}", i + 1, md_text(p));
        }
    }

    // Results.
    out.push_str("\n## Results\n\n");
    if report.tests.is_empty() {
        out.push_str("No tests were run.\n");
    } else {
        out.push_str("### Throughput\n\n");
        let mut t = Table::new(&[
            "test",
            "mode",
            "concurrency",
            "repetition",
            "requests",
            "failed",
            "generated tokens",
            "prompt tokens",
            "duration s",
            "req/s",
            "tok/s",
        ]);
        t.left(0).left(1);
        for r in &report.tests {
            t.row(vec![
                md_text(&r.name),
                md_text(&r.mode),
                r.concurrency.to_string(),
                r.repetition.to_string(),
                r.requests.to_string(),
                r.failed.to_string(),
                r.total_tokens.to_string(),
                r.prompt_tokens.to_string(),
                f2(r.duration_s),
                f2(r.requests_per_s),
                f2(r.tokens_per_s),
            ]);
        }
        out.push_str(&t.markdown());

        out.push_str("\n### Latency (ms)\n\n");
        let mut t = Table::new(&[
            "test",
            "mode",
            "concurrency",
            "repetition",
            "latency mean",
            "p50",
            "p95",
            "p99",
            "TTFT mean",
            "p50",
            "p99",
            "TPOT mean",
            "p50",
            "p99",
        ]);
        t.left(0).left(1);
        for r in &report.tests {
            t.row(vec![
                md_text(&r.name),
                md_text(&r.mode),
                r.concurrency.to_string(),
                r.repetition.to_string(),
                f1(r.latency_ms.mean),
                f1(r.latency_ms.p50),
                f1(r.latency_ms.p95),
                f1(r.latency_ms.p99),
                f1(r.ttft_ms.mean),
                f1(r.ttft_ms.p50),
                f1(r.ttft_ms.p99),
                f1(r.tpot_ms.mean),
                f1(r.tpot_ms.p50),
                f1(r.tpot_ms.p99),
            ]);
        }
        out.push_str(&t.markdown());
        out.push_str(&failures_section(report));
    }

    // Scaling.
    out.push_str("\n## Scaling\n\n");
    if levels.is_empty() {
        out.push_str("No scaling analysis (no levels).\n");
    } else {
        let ref_req = format!("{REFERENCE_LABEL} req/s");
        let ref_tok = format!("{REFERENCE_LABEL} tok/s");
        let mut t = Table::new(&[
            "mode",
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
        ]);
        t.left(0);
        for l in &levels {
            let (rr, rt) = match l.reference {
                Some((r, tk)) => (f2(r), f2(tk)),
                None => ("—".to_string(), "—".to_string()),
            };
            t.row(vec![
                md_text(&l.mode),
                l.concurrency.to_string(),
                f2(l.requests_per_s),
                f2(l.tokens_per_s),
                rr,
                rt,
                times(l.scaling),
                percent(l.efficiency),
                f1(l.latency_p50_ms),
                times(l.latency_penalty),
                l.vs_threads.map_or_else(|| "—".to_string(), times),
            ]);
        }
        out.push_str(&t.markdown());
        out.push_str(
            "\n*Scaling* is tokens/s at concurrency N over tokens/s of the single request \
             (concurrency 1, one baseline for every mode: with one request in flight there is \
             nothing to batch). \
             *Efficiency* = throughput(N) / (N · throughput(1)): 100% means N concurrent requests \
             each run as fast as one alone, 1/N means no gain over running them one after another. \
             *Latency penalty* is the p50 end-to-end latency at N over that at 1. \
             *vs threads* is a mode's tokens/s over threads mode's at the same concurrency. \
             The reference column is a PyTorch GPT-2 124M study on a different CPU: compare the \
             shape of the curves, not the absolute numbers.\n\n",
        );
        out.push_str(&tradeoff_sentences(&levels));
    }

    // Recommended concurrency.
    out.push_str("\n## Recommended concurrency\n\n");
    out.push_str(
        "Rule: per mode, the lowest concurrency whose tokens/s reaches 90% of that mode's best \
         tokens/s. Beyond it, more concurrency mostly adds latency.\n\n",
    );
    if a.recommended_concurrency.is_empty() {
        out.push_str("No recommendation (no levels).\n");
    } else {
        let mut t = Table::new(&[
            "mode",
            "recommended concurrency",
            "tok/s there",
            "p50 latency ms there",
            "best tok/s",
            "best at concurrency",
        ]);
        t.left(0);
        for (mode, conc) in &a.recommended_concurrency {
            let at = level_at(&levels, mode, *conc);
            let best = levels
                .iter()
                .filter(|l| &l.mode == mode || l.concurrency == 1)
                .max_by(|x, y| finite(x.tokens_per_s).total_cmp(&finite(y.tokens_per_s)));
            t.row(vec![
                md_text(mode),
                conc.to_string(),
                at.map_or_else(|| "—".to_string(), |l| f2(l.tokens_per_s)),
                at.map_or_else(|| "—".to_string(), |l| f1(l.latency_p50_ms)),
                best.map_or_else(|| "—".to_string(), |l| f2(l.tokens_per_s)),
                best.map_or_else(|| "—".to_string(), |l| l.concurrency.to_string()),
            ]);
        }
        out.push_str(&t.markdown());
    }

    // Targets.
    out.push_str("\n## Targets\n\n");
    if a.targets.is_empty() {
        out.push_str("No targets were set.\n");
    } else {
        let mut t = Table::new(&["target", "condition", "measured", "result"]);
        t.left(0).left(1).left(3);
        for tg in &a.targets {
            t.row(vec![
                format!("`{}`", md_code(&tg.name)),
                format!(
                    "{} {}",
                    tg.op.replace('<', "&lt;").replace('|', "\\|"),
                    target_value(tg.threshold, tg)
                ),
                target_value(tg.measured, tg),
                if tg.pass {
                    "PASS".to_string()
                } else {
                    "**FAIL**".to_string()
                },
            ]);
        }
        out.push_str(&t.markdown());
        out.push('\n');
        out.push_str(&targets_verdict(report));
        out.push('\n');
    }

    // Spread.
    if !a.spread.is_empty() {
        out.push_str("\n## Spread over repetitions\n\n");
        let mut t = Table::new(&[
            "test", "mode", "metric", "mean", "stddev", "cv", "min", "max", "n",
        ]);
        t.left(0).left(1).left(2);
        for s in &a.spread {
            // Milliseconds with 1 decimal, rates with 2.
            let v = |x: f64| if s.metric.ends_with("_ms") { f1(x) } else { f2(x) };
            let cv = if finite(s.mean) != 0.0 {
                percent(s.stddev / s.mean)
            } else {
                "—".to_string()
            };
            t.row(vec![
                md_text(&s.test),
                if s.mode.is_empty() {
                    "—".to_string()
                } else {
                    md_text(&s.mode)
                },
                format!("`{}`", md_code(&s.metric)),
                v(s.mean),
                v(s.stddev),
                cv,
                v(s.min),
                v(s.max),
                s.n.to_string(),
            ]);
        }
        out.push_str(&t.markdown());
        out.push_str("\ncv = stddev / mean.\n");
    }

    // Plot.
    out.push_str("\n## Saturation curve\n\n");
    let _ = writeln!(
        out,
        "![Saturation curve: tokens/s and p50 latency vs concurrency]({})\n",
        md_link_target(svg_file_name)
    );
    out.push_str(
        "Left: tokens/s per mode against concurrency, with the reference study dashed. \
         Right: p50 end-to-end latency. Where tokens/s flattens while latency keeps rising, \
         the machine is saturated.\n",
    );

    // Method.
    out.push_str("\n## Method\n\n");
    let _ = writeln!(
        out,
        "- Fixed output length: every request asks for {} new tokens and EOS is ignored; a request \
         that returns fewer tokens, errors or panics counts as failed and its tokens are not counted.",
        md.max_new_tokens
    );
    out.push_str(
        "- tokens/s = generated tokens of successful requests / wall-clock duration of the test; \
         prompt tokens are reported apart and not included. Latency, TTFT and TPOT cover \
         successful requests only.\n\
         - TTFT (time to first token) runs from the request's start to its first generated token, \
         so it includes the prompt's prefill.\n\
         - TPOT (time per output token) = (end-to-end latency − TTFT) / (generated tokens − 1): \
         the decode speed one request sees.\n",
    );
    let _ = writeln!(
        out,
        "- Warmup: {} request{} ran before timing, excluded from every figure.",
        md.warmup_requests,
        plural(md.warmup_requests)
    );
    let _ = writeln!(
        out,
        "- Threads: {} pool, {} threads per request, {} cores, at most {} compute threads busy at \
         the highest concurrency.",
        md_text(&md.pool_layout),
        md.threads_per_request,
        md.cores,
        md.max_busy_threads
    );
    out.push_str("- Every request's raw timings are in the JSON report (`raw` of each test).\n");
    out
}

/// Failed requests (first 20), with their error text, if any test had failures.
fn failures_section(report: &Report) -> String {
    let failed: Vec<_> = report
        .tests
        .iter()
        .flat_map(|t| t.raw.iter().filter(|r| r.error.is_some()).map(move |r| (t, r)))
        .collect();
    let total_failed: usize = report.tests.iter().map(|t| t.failed).sum();
    if failed.is_empty() && total_failed == 0 {
        return String::new();
    }
    let mut out = String::from("\n### Failed requests\n\n");
    const SHOWN: usize = 20;
    let mut t = Table::new(&["test", "mode", "repetition", "request", "tokens", "error"]);
    t.left(0).left(1).left(5);
    for (test, r) in failed.iter().take(SHOWN) {
        t.row(vec![
            md_text(&test.name),
            md_text(&test.mode),
            test.repetition.to_string(),
            r.index.to_string(),
            r.generated_tokens.to_string(),
            md_text(r.error.as_deref().unwrap_or("")),
        ]);
    }
    let _ = writeln!(out, "{total_failed} request{} failed.\n", plural(total_failed));
    if !failed.is_empty() {
        out.push_str(&t.markdown());
        if failed.len() > SHOWN {
            let _ = writeln!(
                out,
                "\n… and {} more (see the JSON report).",
                failed.len() - SHOWN
            );
        }
    }
    out
}

/// One sentence per mode at its highest concurrency, then a mode comparison
/// at the highest level every mode measured.
fn tradeoff_sentences(levels: &[&LevelAnalysis]) -> String {
    let mut out = String::new();
    let modes = modes_in_order(levels);
    for mode in &modes {
        let top = levels
            .iter()
            .filter(|l| &l.mode == mode && l.concurrency > 1)
            .max_by_key(|l| l.concurrency);
        match top {
            Some(l) => {
                let _ = writeln!(
                    out,
                    "At concurrency {}, {} mode gives {} the throughput of a single request for {} \
                     the p50 latency ({} efficiency).",
                    l.concurrency,
                    md_text(mode),
                    times(l.scaling),
                    times(l.latency_penalty),
                    percent(l.efficiency)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "{} mode was only measured at concurrency 1: no trade-off to show.",
                    md_text(mode)
                );
            }
        }
    }
    if modes.len() >= 2 {
        // The highest concurrency that every mode measured.
        let common = levels
            .iter()
            .map(|l| l.concurrency)
            .filter(|&c| {
                modes
                    .iter()
                    .all(|m| levels.iter().any(|l| &l.mode == m && l.concurrency == c))
            })
            .max();
        if let Some(c) = common {
            let at: Vec<_> = modes
                .iter()
                .filter_map(|m| levels.iter().find(|l| &l.mode == m && l.concurrency == c))
                .collect();
            let parts: Vec<String> = at
                .iter()
                .map(|l| {
                    format!(
                        "{} {} tok/s at {} ms p50",
                        md_text(&l.mode),
                        f2(l.tokens_per_s),
                        f1(l.latency_p50_ms)
                    )
                })
                .collect();
            let _ = writeln!(out, "\nAt concurrency {c}: {}.", parts.join(", "));
        }
    }
    out
}

fn targets_verdict(report: &Report) -> String {
    let targets = &report.analysis.targets;
    let failed: Vec<&str> = targets
        .iter()
        .filter(|t| !t.pass)
        .map(|t| t.name.as_str())
        .collect();
    if failed.is_empty() {
        format!("All {} target{} PASS.", targets.len(), plural(targets.len()))
    } else {
        format!(
            "{} of {} target{} FAIL: {}.",
            failed.len(),
            targets.len(),
            plural(targets.len()),
            failed.join(", ")
        )
    }
}

// ---------------------------------------------------------------------------
// SVG
// ---------------------------------------------------------------------------

const SVG_W: f64 = 800.0;
const SVG_H: f64 = 420.0;
const PLOT_TOP: f64 = 78.0;
const PLOT_BOTTOM: f64 = 330.0;
/// (left, right) of the two panels' plot areas.
const PANELS: [(f64, f64); 2] = [(72.0, 372.0), (472.0, 772.0)];
const REFERENCE_COLOR: &str = "#8c8c8c";

/// A self-contained SVG of the saturation curve: tokens/s (left panel, with
/// the reference study dashed) and p50 latency (right panel) against
/// concurrency, one line per mode. NaN and infinities are drawn as 0.
pub fn svg(report: &Report) -> String {
    let md = &report.metadata;
    let levels = sorted_levels(&report.analysis.levels);
    let modes = modes_in_order(&levels);

    // X: the measured concurrency levels, log2-spaced.
    let xs: Vec<usize> = levels
        .iter()
        .map(|l| l.concurrency)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let lg = |c: usize| (c.max(1) as f64).log2();
    let (lo, hi) = match (xs.first(), xs.last()) {
        (Some(&a), Some(&b)) => (lg(a), lg(b)),
        _ => (0.0, 0.0),
    };
    let x_at = |panel: usize, c: usize| -> f64 {
        let (l, r) = PANELS[panel];
        let pad = 0.07 * (r - l);
        if hi > lo {
            l + pad + (lg(c) - lo) / (hi - lo) * (r - l - 2.0 * pad)
        } else {
            (l + r) / 2.0
        }
    };

    // The reference series: one point per concurrency where a level carries it.
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
    let y_at = |panel: usize, v: f64| -> f64 {
        let top = axes[panel].top;
        PLOT_BOTTOM - finite(v).clamp(0.0, top) / top * (PLOT_BOTTOM - PLOT_TOP)
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{SVG_H}" viewBox="0 0 {SVG_W} {SVG_H}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let mut title = String::from("GPT-2 throughput: saturation curve");
    if md.synthetic_weights {
        title.push_str(": SYNTHETIC weights (random)");
    }
    let _ = writeln!(s, "<title>{}</title>", xml(&title));
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let title_color = if md.synthetic_weights {
        "#b00000"
    } else {
        "#000000"
    };
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="16" font-weight="bold" fill="{title_color}">{}</text>"#,
        SVG_W / 2.0,
        xml(&title)
    );
    let subtitle = format!(
        "{}{} | {} cores, {} pool, {} threads/request | {} tokens/request | {}",
        if md.synthetic_weights {
            "speed is real, text is noise | "
        } else {
            ""
        },
        md.cpu_model,
        md.cores,
        md.pool_layout,
        md.threads_per_request,
        md.max_new_tokens,
        md.timestamp_utc
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="42" text-anchor="middle" font-size="11" fill="#555555">{}</text>"##,
        SVG_W / 2.0,
        xml(&truncate_chars(&one_line(&subtitle), 128))
    );

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
        // Horizontal grid and y ticks.
        for i in 0..=axes[panel].steps {
            let v = axes[panel].step * i as f64;
            let y = y_at(panel, v);
            let _ = writeln!(
                s,
                r##"<line x1="{l}" y1="{y:.1}" x2="{r}" y2="{y:.1}" stroke="#e5e5e5" stroke-width="1"/>"##
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                l - 6.0,
                y + 4.0,
                tick_label(v, axes[panel].step)
            );
        }
        // X ticks at the measured levels.
        for &c in &xs {
            let x = x_at(panel, c);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{PLOT_BOTTOM}" x2="{x:.1}" y2="{}" stroke="#333333"/>"##,
                PLOT_BOTTOM + 5.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{x:.1}" y="{}" text-anchor="middle">{c}</text>"#,
                PLOT_BOTTOM + 18.0
            );
        }
        // Axes.
        let _ = writeln!(
            s,
            r##"<path d="M{l} {PLOT_TOP} V{PLOT_BOTTOM} H{r}" fill="none" stroke="#333333" stroke-width="1"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">concurrency (requests in flight)</text>"#,
            (l + r) / 2.0,
            PLOT_BOTTOM + 36.0
        );
        let (yx, yy) = (l - 52.0, (PLOT_TOP + PLOT_BOTTOM) / 2.0);
        let _ = writeln!(
            s,
            r#"<text x="{yx}" y="{yy}" text-anchor="middle" transform="rotate(-90 {yx} {yy})">{}</text>"#,
            y_titles[panel]
        );
    }
    if xs.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#777777">no data</text>"##,
            SVG_W / 2.0,
            (PLOT_TOP + PLOT_BOTTOM) / 2.0
        );
    }

    // Series: one polyline per (mode, panel), plus the reference on panel 0.
    if !reference.is_empty() {
        let pts: Vec<(f64, f64)> = reference.iter().map(|&(c, t)| (x_at(0, c), y_at(0, t))).collect();
        series(&mut s, &pts, REFERENCE_COLOR, true, REFERENCE_LABEL);
    }
    for mode in &modes {
        let color = mode_color(mode);
        // A mode without its own concurrency-1 level starts from the shared single request.
        let mut ls: Vec<&LevelAnalysis> = levels.iter().copied().filter(|l| &l.mode == mode).collect();
        if !ls.iter().any(|l| l.concurrency == 1) {
            if let Some(single) = levels.iter().find(|l| l.concurrency == 1) {
                ls.insert(0, single);
            }
        }
        let tok: Vec<_> = ls
            .iter()
            .map(|l| (x_at(0, l.concurrency), y_at(0, l.tokens_per_s)))
            .collect();
        let lat: Vec<_> = ls
            .iter()
            .map(|l| (x_at(1, l.concurrency), y_at(1, l.latency_p50_ms)))
            .collect();
        series(&mut s, &tok, color, false, &format!("{mode} tokens/s"));
        series(&mut s, &lat, color, false, &format!("{mode} p50 latency"));
    }

    // Legend, centred along the bottom.
    let mut entries: Vec<(String, &str, bool)> =
        modes.iter().map(|m| (m.clone(), mode_color(m), false)).collect();
    if !reference.is_empty() {
        entries.push((format!("{REFERENCE_LABEL}, tokens/s"), REFERENCE_COLOR, true));
    }
    let widths: Vec<f64> = entries
        .iter()
        .map(|(name, _, _)| 40.0 + 7.0 * name.chars().count() as f64)
        .collect();
    let mut x = (SVG_W - widths.iter().sum::<f64>()).max(0.0) / 2.0;
    let y = SVG_H - 24.0;
    for ((name, color, dashed), w) in entries.iter().zip(&widths) {
        let dash = if *dashed { r#" stroke-dasharray="6 4""# } else { "" };
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
        x += w;
    }
    s.push_str("</svg>\n");
    s
}

/// One polyline with a marker per point.
fn series(s: &mut String, pts: &[(f64, f64)], color: &str, dashed: bool, label: &str) {
    let points: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let dash = if dashed { r#" stroke-dasharray="6 4""# } else { "" };
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

fn mode_color(mode: &str) -> &'static str {
    match mode {
        "threads" => "#d62728",
        "batched" => "#1f77b4",
        _ => "#7f7f7f",
    }
}

/// A y axis from 0 to `top` in `steps` round steps (1, 2, 2.5 or 5 × 10^k).
struct Axis {
    top: f64,
    step: f64,
    steps: usize,
}

fn nice_axis(max: f64) -> Axis {
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

fn tick_label(v: f64, step: f64) -> String {
    // As many decimals as the step needs (2.5 -> 1, 0.25 -> 2), at most 6.
    let decimals = (0..6)
        .find(|&d| {
            let scaled = step * 10f64.powi(d as i32);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(6);
    format!("{v:.decimals$}")
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// Tests with the same (mode, concurrency), in first-seen order.
struct Group<'a> {
    tests: Vec<&'a TestResult>,
}

impl Group<'_> {
    fn test_names(&self) -> Vec<&str> {
        self.tests.iter().map(|t| t.name.as_str()).collect()
    }
}

fn group_tests(tests: &[TestResult]) -> Vec<Group<'_>> {
    let mut groups: Vec<Group> = Vec::new();
    for t in tests {
        match groups
            .iter_mut()
            .find(|g| g.tests[0].mode == t.mode && g.tests[0].concurrency == t.concurrency)
        {
            Some(g) => g.tests.push(t),
            None => groups.push(Group { tests: vec![t] }),
        }
    }
    groups
}

/// The tokens/s spread of a (mode, concurrency) group: the entry of that
/// mode and one of the group's test names (the modes share test names).
fn spread_for<'a>(spread: &'a [Spread], mode: &str, names: &[&str]) -> Option<&'a Spread> {
    spread.iter().find(|s| {
        let m = s.metric.to_ascii_lowercase();
        let tokens = m.contains("tok") && (m.ends_with("per_s") || m.ends_with("/s"));
        tokens && s.mode == mode && names.contains(&s.test.as_str())
    })
}

/// Levels grouped by mode (first-seen order), each mode by concurrency.
fn sorted_levels(levels: &[LevelAnalysis]) -> Vec<&LevelAnalysis> {
    let mut out: Vec<&LevelAnalysis> = levels.iter().collect();
    let modes = modes_in_order(&out);
    out.sort_by_key(|l| (modes.iter().position(|m| m == &l.mode), l.concurrency));
    out
}

/// A mode's level at `concurrency`; at 1 the single request is shared by all
/// modes, so any mode's level 1 stands in for a mode without its own.
fn level_at<'a>(levels: &[&'a LevelAnalysis], mode: &str, concurrency: usize) -> Option<&'a LevelAnalysis> {
    let own = levels
        .iter()
        .find(|l| l.mode == mode && l.concurrency == concurrency);
    own.or_else(|| levels.iter().find(|l| concurrency == 1 && l.concurrency == 1))
        .copied()
}

/// Modes in first-seen order.
fn modes_in_order(levels: &[&LevelAnalysis]) -> Vec<String> {
    let mut modes: Vec<String> = Vec::new();
    for l in levels {
        if !modes.contains(&l.mode) {
            modes.push(l.mode.clone());
        }
    }
    modes
}

/// Minimal text table: right-aligned unless marked left, 2-space gutters.
struct Table {
    headers: Vec<String>,
    left: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            left: vec![false; headers.len()],
            rows: Vec::new(),
        }
    }

    fn left(&mut self, col: usize) -> &mut Self {
        self.left[col] = true;
        self
    }

    fn row(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.headers.len());
        self.rows.push(row);
    }

    fn widths(&self) -> Vec<usize> {
        let mut w: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        w
    }

    fn cell(&self, text: &str, col: usize, width: usize) -> String {
        let pad = " ".repeat(width.saturating_sub(text.chars().count()));
        if self.left[col] {
            format!("{text}{pad}")
        } else {
            format!("{pad}{text}")
        }
    }

    fn text(&self) -> String {
        let w = self.widths();
        let line = |cells: &[String]| -> String {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| self.cell(c, i, w[i]))
                .collect();
            format!("{}\n", parts.join("  ").trim_end())
        };
        let mut out = line(&self.headers);
        let rule: Vec<String> = w.iter().map(|&n| "-".repeat(n)).collect();
        out.push_str(&format!("{}\n", rule.join("  ")));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }

    fn markdown(&self) -> String {
        let w: Vec<usize> = self.widths().into_iter().map(|n| n.max(3)).collect();
        let line = |cells: &[String]| -> String {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| self.cell(c, i, w[i]))
                .collect();
            format!("| {} |\n", parts.join(" | "))
        };
        let mut out = line(&self.headers);
        let rule: Vec<String> = w
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                if self.left[i] {
                    format!(":{}", "-".repeat(n - 1))
                } else {
                    format!("{}:", "-".repeat(n - 1))
                }
            })
            .collect();
        out.push_str(&format!("| {} |\n", rule.join(" | ")));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
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

fn pass_fail(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "FAIL"
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
    use super::super::{Analysis, Metadata, ModelInfo, RequestRecord, Summary, Target, REFERENCE_STUDY};
    use super::*;

    fn level(mode: &str, c: usize, tok: f64, lat: f64, tok1: f64, lat1: f64) -> LevelAnalysis {
        let reference = REFERENCE_STUDY.iter().find(|r| r.0 == c).map(|r| (r.1, r.2));
        LevelAnalysis {
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
            raw: vec![RequestRecord {
                index: 0,
                client: 0,
                prompt_tokens: 10,
                generated_tokens: 50,
                start_ms: 0.0,
                ttft_ms: Some(lat / 20.0),
                latency_ms: lat,
                tpot_ms: Some(lat / 50.0),
                error: None,
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
            .map(|m| (m.to_string(), *levels.last().unwrap()))
            .collect();
        Report {
            schema_version: 1,
            metadata: Metadata {
                timestamp_utc: "2025-01-01T00:00:00Z".to_string(),
                git_commit: "abc1234".to_string(),
                rustc: "rustc 1.80.0".to_string(),
                cpu_model: "Fast & <Cheap> CPU \"x\"".to_string(),
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
                model: ModelInfo {
                    n_layer: 12,
                    n_head: 12,
                    n_embd: 768,
                    n_positions: 1024,
                    vocab_size: 50257,
                    n_params: 124_439_808,
                    dtype: "f32".to_string(),
                },
                max_new_tokens: 50,
                warmup_requests: 2,
                repetitions: reps,
                prompts: vec!["Hello | world".to_string(), "The *quick* fox".to_string()],
            },
            tests,
            analysis: Analysis {
                levels: lv,
                recommended_concurrency: recommended,
                targets: vec![
                    Target {
                        name: "single_tokens_per_s".to_string(),
                        op: ">".to_string(),
                        threshold: 25.24,
                        measured: 30.0,
                        pass: true,
                    },
                    Target {
                        name: "failed".to_string(),
                        op: "<=".to_string(),
                        threshold: 0.0,
                        measured: 1.0,
                        pass: false,
                    },
                ],
                spread,
            },
            profile: None,
            roofline: None,
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
        assert!(md.contains("At concurrency 4, threads mode gives 2.00× the throughput"));
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
