//! The Markdown of `throughput pair`: what the two variants were, the
//! ratios' medians over the pairs, then every pair.

use std::fmt::Write as _;

use super::*;
use crate::pair::{Headline, PairReport};

/// The pair's Markdown: the setup, the ratios (A / B: median, min, max),
/// every pair's figures, and any failed requests.
pub fn pair_markdown(report: &PairReport) -> String {
    let mut out = String::from("# GPT-2 throughput: variant A against variant B, paired\n\n");
    let flags = |f: &[String]| {
        if f.is_empty() {
            "nothing".to_string()
        } else {
            format!("`{}`", md_code(&f.join(" ")))
        }
    };
    let _ = writeln!(
        out,
        "Both variants ran `throughput` with {}; A added {}, B added {}. {} pair{} of runs, alternating \
         (A B, then B A, ...); each run a whole `throughput` run (its warmup, then its tests), its figures \
         those of its last test (its highest concurrency level; the median over its repetitions). Ratios \
         are A / B, taken pair by pair: quote the median. Commit `{}`, {}.\n",
        flags(&report.common),
        flags(&report.a),
        flags(&report.b),
        report.pairs.len(),
        plural(report.pairs.len()),
        md_code(&report.git_commit),
        md_text(&report.timestamp_utc),
    );
    // The variants' requests, from the first pair (A ran first, then B).
    for (label, run) in ["A", "B"].into_iter().zip(&report.runs) {
        let md = &run.metadata;
        let _ = writeln!(
            out,
            "- {label}: {}, {} new tokens per choice; {}.",
            md_text(&md.engine()),
            md.max_new_tokens,
            md_text(&md.workload())
        );
    }
    if report.runs.iter().any(|r| r.metadata.synthetic_weights) {
        let _ = writeln!(out, "\n> **{SYNTHETIC_BANNER}.**");
    }
    let mut ratios = Table::new(&["figure (A / B)", "median", "min", "max"]);
    ratios.left(0);
    for r in &report.ratios {
        let name = match r.figure.as_str() {
            "tokens_per_s" => "tokens/s",
            "ttft_p50" => "TTFT p50",
            "latency_p50" => "latency p50",
            other => other,
        };
        ratios.row([
            Cell::Plain(name.into()),
            times(r.median).into(),
            times(r.min).into(),
            times(r.max).into(),
        ]);
    }
    let _ = write!(out, "\n## Ratios\n\n{}", ratios.markdown());
    let mut pairs = Table::new(&[
        "pair",
        "order",
        "A test",
        "A tok/s",
        "A TTFT p50 ms",
        "A latency p50 ms",
        "A prompt tokens reused",
        "B test",
        "B tok/s",
        "B TTFT p50 ms",
        "B latency p50 ms",
        "B prompt tokens reused",
        "tok/s A/B",
        "TTFT A/B",
        "latency A/B",
    ]);
    pairs.left(1).left(2).left(7);
    for (i, p) in report.pairs.iter().enumerate() {
        let figures = |h: &Headline| {
            [
                Cell::Text(format!("{} {}", h.test, h.mode)),
                f2(h.tokens_per_s).into(),
                f1(h.ttft_p50_ms).into(),
                f1(h.latency_p50_ms).into(),
                h.prefix_tokens_reused.map(|n| n.to_string()).into(),
            ]
        };
        let row = [Cell::Plain((i + 1).to_string()), Cell::Plain(p.order.clone())]
            .into_iter()
            .chain(figures(&p.a))
            .chain(figures(&p.b))
            .chain([p.ratio.tokens_per_s, p.ratio.ttft_p50, p.ratio.latency_p50].map(|x| times(x).into()));
        pairs.row(row);
    }
    pairs.note(
        "Prompt tokens reused: what the in-process scheduler's prefix cache gave the test (every repetition's); \
         — where nothing counts it (threads mode, a server).",
    );
    let _ = write!(out, "\n## Pairs\n\n{}", pairs.markdown());
    let failed = report.failed_requests();
    if failed > 0 {
        let _ = writeln!(
            out,
            "\n**{failed} request{} failed** over the runs: their figures leave them out; each run's report \
             (`runs[]` in the JSON) says which and why.",
            plural(failed)
        );
    }
    out
}
