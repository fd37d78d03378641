//! The machine's limits and what the engine achieves against them: the
//! probe's table (stderr) and the report's optional sections (achieved /
//! limit, per-op profile), in Markdown, on stdout and in the `.md` alike.

use std::fmt::Write as _;

use super::*;
use crate::probe::Limits;
use crate::{DtypeRoofline, Roofline, RooflineLimits, StepRoofline};
use gpt2_kernels::probe::FMA_ROWS;

/// The sections a report has only with `--probe` or `--profile`, in that
/// order; empty without either.
pub(super) fn optional_sections(report: &Report) -> String {
    let mut out = String::new();
    if let Some(r) = &report.roofline {
        out.push_str(&achieved_over_limit(r));
        for d in &r.dtypes {
            let label = if r.dtypes.len() > 1 {
                format!("{}: ", d.dtype)
            } else {
                String::new()
            };
            out.push_str(&batch8_against_fma8(&label, &r.limits, d));
            out.push_str(&batch8_in_parts(&label, &r.limits, d));
        }
    }
    for p in report.profile.iter().flatten() {
        let _ = writeln!(
            out,
            "\n## Per-op profile of the single-request test ({})",
            p.dtype
        );
        out.push_str(&gpt2::profile::rows_table(&p.rows));
    }
    out
}

/// A percentage with no decimals.
fn pct0(fraction: f64) -> String {
    format!("{:.0}%", 100.0 * fraction)
}

/// `## Achieved / limit`: per dtype one row per workload, then our SGEMM,
/// the read bandwidth of one thread and what bounds decode and prefill.
fn achieved_over_limit(r: &Roofline) -> String {
    let l = &r.limits;
    let mut t = Table::new(&["", "dtype", "achieved", "limit", "achieved / limit"]);
    t.left(0).left(1);
    for dr in &r.dtypes {
        let (d, p) = (&dr.decode, &dr.prefill);
        let dtype = dr.dtype.clone();
        t.row(vec![
            format!(
                "decode, batch 1 ({:.0} MB read per token)",
                d.bytes_per_token / 1e6
            ),
            dtype.clone(),
            format!("{:.1} GB/s ({:.1} tok/s)", d.achieved_gbs, d.tokens_per_s),
            match d.read_gbs {
                Some(read) => format!(
                    "{read:.1} GB/s read of a buffer that size ({:.1} tok/s)",
                    d.ceiling_tokens_per_s
                ),
                None => format!(
                    "{:.1} GB/s read bandwidth ({:.1} tok/s)",
                    l.read_gbs_all, d.ceiling_tokens_per_s
                ),
            },
            pct0(d.fraction_of_bandwidth),
        ]);
        if let Some(s) = &dr.long_decode {
            t.row(step_row(
                &format!("decode, batch 1 at position {} (weights and KV cache", s.position),
                &dtype,
                s,
                1,
                format!("{:.1} GB/s read bandwidth", l.read_gbs_all),
            ));
        }
        if let Some(b) = &dr.batch8 {
            t.row(step_row(
                &format!("decode, 8 rows (8 sequences at position {}", b.step.position),
                &dtype,
                &b.step,
                8,
                format!(
                    "{:.1} GB/s read bandwidth ({:.1} tok/s)",
                    l.read_gbs_all,
                    8.0 * l.read_gbs_all * 1e9 / d.bytes_per_token
                ),
            ));
        }
        t.row(vec![
            format!("prefill, {} tokens in {:.0} ms", p.tokens, p.ms),
            dtype,
            format!("{:.1} GFLOP/s", p.gflops),
            match &p.peak {
                Some(peak) => format!("{:.1} GOP/s {}", peak.gflops, peak.name),
                None => format!("{:.1} GFLOP/s FMA peak", l.fma_gflops_all),
            },
            pct0(p.fraction_of_fma_peak),
        ]);
    }
    t.row(vec![
        "(our SGEMM at M = 128, best GPT-2 shape)".to_string(),
        "f32".to_string(),
        format!("{:.1} GFLOP/s", l.linear_packed_gflops),
        format!("{:.1} GFLOP/s", l.fma_gflops_all),
        pct0(l.linear_packed_gflops / l.fma_gflops_all),
    ]);
    let mut out = String::from("\n## Achieved / limit (measured on this machine)\n\n");
    out.push_str(&t.compact_markdown());
    let _ = writeln!(
        out,
        "\nRead bandwidth on one thread: {:.1} GB/s. Decode moves every weight once per token (the \
         linear layers' matrices in the dtype, int8 with its per-column scales, the rest in f32), so \
         its ceiling is bandwidth / bytes per token; prefill is bound by FMA throughput.",
        l.read_gbs_1t
    );
    out
}

/// The row of one timed decode step of `rows` rows: `what` is the
/// workload, which the step's time completes in its parentheses.
fn step_row(what: &str, dtype: &str, s: &StepRoofline, rows: usize, limit: String) -> Vec<String> {
    vec![
        format!("{what}, one step in {:.1} ms)", s.step_ms),
        dtype.to_string(),
        format!(
            "{:.1} GB/s ({:.1} tok/s)",
            s.achieved_gbs,
            rows as f64 * 1e3 / s.step_ms
        ),
        limit,
        pct0(s.fraction_of_bandwidth),
    ]
}

/// The 8-row step of one dtype against the read with its FMAs, where both
/// were measured; `label` starts the paragraph (the dtype, with several).
fn batch8_against_fma8(label: &str, limits: &RooflineLimits, d: &DtypeRoofline) -> String {
    let (Some(b), Some(fma8)) = (&d.batch8, limits.read_fma8_gbs_all) else {
        return String::new();
    };
    format!(
        "\n{label}A decode step of 8 rows streams the weights once for 8 tokens; its bandwidth-bound \
         rate is 8 tokens per pass at the read bandwidth. Reading with 8 FMAs per loaded vector \
         (that step's arithmetic and nothing else) runs at {:.1} GB/s here, {:.0}% of the plain \
         read: what the hardware allows when reads and FMAs overlap as well as they can. The step \
         reaches {:.0}% of that.\n",
        fma8,
        100.0 * fma8 / limits.read_gbs_all,
        100.0 * b.step.achieved_gbs / fma8,
    )
}

/// One dtype's 8-row step set against its stream and its arithmetic apart;
/// `label` starts the paragraph.
fn batch8_in_parts(label: &str, limits: &RooflineLimits, d: &DtypeRoofline) -> String {
    let Some(p) = d.batch8_parts(limits) else {
        return String::new();
    };
    format!(
        "\n{label}The same step in two parts: streaming the weights once at the read bandwidth takes \
         {:.1} ms; its linear layers' arithmetic, at the rate its dtype's kernel reaches on each of the \
         step's threads with a weight in L2, {:.1} ms. Were the two fully overlapped the step would take {:.1} ms, \
         run one after the other {:.1} ms; it takes {:.1} ms, hiding {:.0}% of the smaller part \
         (attention and the small ops are in neither part).\n",
        p.stream_ms,
        p.compute_ms,
        p.overlapped_ms(),
        p.serial_ms(),
        p.step_ms,
        100.0 * p.hidden(),
    )
}

/// The measured limits as two Markdown tables: the machine, then
/// `linear_packed` at GPT-2 shapes (printed by `throughput --probe`).
pub fn limits_table(l: &Limits) -> String {
    let threads = format!("{} threads", l.threads);
    let mut machine = Table::new(&["limit", "1 thread", &threads]);
    machine.left(0);
    let both = |name: String, one: f64, all: f64| vec![name, format!("{one:.1}"), format!("{all:.1}")];
    machine.row(both(
        "read bandwidth (GB/s)".into(),
        l.read_gbs_1t,
        l.read_gbs_all,
    ));
    machine.row(both(
        format!("read with {FMA_ROWS} FMAs per vector (GB/s)"),
        l.read_fma8_gbs_1t,
        l.read_fma8_gbs_all,
    ));
    machine.row(both(
        "FMA peak (GFLOP/s)".into(),
        l.fma_gflops_1t,
        l.fma_gflops_all,
    ));
    if l.int8_gops_all > 0.0 {
        machine.row(both(
            format!("int8 dot-product peak, {} (GOP/s)", l.int8_dot),
            l.int8_gops_1t,
            l.int8_gops_all,
        ));
    }
    machine.row(vec![
        format!("`linear_packed`, {FMA_ROWS} rows, weight in L2 (GFLOP/s)"),
        format!("{:.1}", l.rows8_in_l2_gflops_1t),
        String::new(),
    ]);
    for r in l.rows8_in_l2_by_dtype.iter().filter(|r| r.dtype != "f32") {
        machine.row(vec![
            format!("the same, {} weights (GFLOP/s)", r.dtype),
            format!("{:.1}", r.gflops),
            String::new(),
        ]);
    }
    let mut reads = Table::new(&[&format!("read, {threads}"), "best GB/s", "median", "worst"]);
    reads.left(0);
    for r in &l.read_patterns {
        reads.row(vec![
            r.pattern.clone(),
            format!("{:.1}", r.best_gbs),
            format!("{:.1}", r.median_gbs),
            format!("{:.1}", r.worst_gbs),
        ]);
    }
    for r in &l.decode_reads {
        reads.row(vec![
            format!(
                "a buffer of a {} decode step ({:.0} MB; {})",
                r.dtype,
                r.bytes / 1e6,
                r.pattern
            ),
            format!("{:.1}", r.best_gbs),
            format!("{:.1}", r.median_gbs),
            String::new(),
        ]);
    }
    let title = format!("SGEMM `linear_packed`, {}", threads);
    let mut shapes = Table::new(&[&title, "M", "K", "N", "GFLOP/s", "weights in cache"]);
    shapes.left(0);
    for p in &l.linear_packed {
        shapes.row(vec![
            p.name.clone(),
            p.m.to_string(),
            p.k.to_string(),
            p.n.to_string(),
            format!("{:.1}", p.gflops),
            format!("{:.1}", p.gflops_hot),
        ]);
    }
    if l.read_patterns.is_empty() && l.decode_reads.is_empty() {
        return format!("{}\n{}", machine.compact_markdown(), shapes.compact_markdown());
    }
    format!(
        "{}\n{}\n{}",
        machine.compact_markdown(),
        reads.compact_markdown(),
        shapes.compact_markdown()
    )
}
