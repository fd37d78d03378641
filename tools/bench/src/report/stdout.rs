//! The human summary printed on stdout: one function per section.

use std::fmt::Write as _;

use super::*;

/// The human summary printed on stdout: header, per-test rows (means over
/// repetitions), scaling, the dtype comparison, recommended concurrency and
/// targets, then the optional sections (achieved / limit, per-op profile);
/// for a sweep, the header, its cells and axes, and the targets.
/// Plain text, aligned columns; the main tables fit a 100-column terminal
/// for the usual test names.
pub fn stdout_table(report: &Report) -> String {
    if report.sweep.is_some() {
        return [
            stdout_header(report),
            stdout_sweep(report),
            stdout_targets(report),
        ]
        .concat();
    }
    let sections = [
        stdout_header(report),
        stdout_tests(report),
        stdout_scaling(report),
        stdout_dtypes(report),
        stdout_recommended(report),
        stdout_targets(report),
        optional_sections(report),
    ];
    sections.concat()
}

/// Title, weights (with the synthetic banner), threads and CPU.
fn stdout_header(report: &Report) -> String {
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
    let dtypes: Vec<&str> = md.dtypes.iter().map(|d| d.dtype.as_str()).collect();
    if let Some(srv) = &md.server {
        let _ = writeln!(
            out,
            "server: {} model {}{}, dtype {} (as it says); mode http",
            one_line(&srv.url),
            one_line(&srv.model),
            srv.owned_by
                .as_deref()
                .map(|o| format!(" (owned by {})", one_line(o)))
                .unwrap_or_default(),
            dtypes.join(", ")
        );
    } else {
        if report.several_dtypes() {
            let _ = writeln!(
                out,
                "dtypes: {} (linear layers' weights; each repetition runs each, order rotating); KV cache {}",
                dtypes.join(", "),
                one_line(&md.kv_dtype)
            );
        } else {
            let _ = writeln!(
                out,
                "dtype: {} (linear layers' weights); KV cache {}",
                dtypes.join(", "),
                one_line(&md.kv_dtype)
            );
        }
        let _ = writeln!(
            out,
            "threads: {} pool, {} threads per request, {} cores, at most {} busy threads",
            md.pool_layout, md.threads_per_request, md.cores, md.max_busy_threads
        );
    }
    let _ = writeln!(
        out,
        "{}cpu: {}\n{}{} new tokens per {} (EOS ignored), {} warmup, {} repetition{}",
        if md.server.is_some() { "client " } else { "" },
        one_line(&md.cpu_model),
        if md.server.is_none() && !md.kernels.is_empty() {
            format!("kernels: {} | ", one_line(&md.kernels))
        } else {
            String::new()
        },
        md.max_new_tokens,
        if md.choices > 1 { "choice" } else { "request" },
        md.warmup_requests,
        md.repetitions,
        plural(md.repetitions)
    );
    let _ = writeln!(out, "requests: {}", one_line(&md.workload()));
    // What the prefix cache gave each test that counted it.
    for t in report
        .tests
        .iter()
        .filter(|t| t.prefix.is_some_and(|p| p.hits > 0))
    {
        let p = t.prefix.unwrap_or_default();
        let _ = writeln!(
            out,
            "prefix reuse, {} {} {} rep {}: {} of {} requests started from a cached prefix, {} of {} prompt tokens reused",
            t.name, t.mode, t.dtype, t.repetition, p.hits, t.requests, p.tokens_reused, t.prompt_tokens
        );
    }
    out
}

/// Per-test rows, one per (mode, concurrency, dtype), means over repetitions.
fn stdout_tests(report: &Report) -> String {
    let mut out = String::new();
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
    // No concurrency column: the test's name carries it (`concurrent-N`).
    let mut table = Table::new(&[
        "test", "mode", "dtype", "reqs", "fail", "req/s", "tok/s", "p50 ms", "p95", "p99", "TTFT", "TPOT",
    ]);
    table.left(0).left(1).left(2);
    for g in &groups {
        let first = g.tests[0];
        let mean = |f: fn(&TestResult) -> f64| mean_of(g.tests.iter().map(|t| f(t)));
        let mean_tok = mean(|t| t.tokens_per_s);
        let mut tok = f2(mean_tok);
        if let Some(s) = spread_for(
            &report.analysis.spread,
            &first.dtype,
            &first.mode,
            &g.test_names(),
        ) {
            if s.n > 1 {
                let _ = write!(tok, " ±{}", f2(s.stddev));
            }
        }
        table.row([
            first.name.clone(),
            first.mode.clone(),
            first.dtype.clone(),
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
        table.note("(end-to-end latency p50/p95/p99, TTFT p50 and TPOT p50, all in ms)");
        out.push_str(&table.text());
    }
    out
}

/// Scaling against the single request, per level.
fn stdout_scaling(report: &Report) -> String {
    let levels = sorted_levels(&report.analysis.levels);
    if levels.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\nScaling vs concurrency 1 of the same dtype (efficiency = tok/s(N) / (N * tok/s(1)),\n\
         lat pen = p50 latency(N) / p50 latency(1); vs f32: tok/s over f32's at the same mode and\n\
         level; ref: the reference study, on another machine)\n",
    );
    out.push_str(&scaling_table(&levels).text());
    out
}

/// Per dtype: single-request and concurrent tokens/s and memory, against f32.
fn stdout_dtypes(report: &Report) -> String {
    if report.metadata.dtypes.is_empty() || report.metadata.server.is_some() {
        return String::new();
    }
    let mut t = dtype_table(report);
    t.note(dtype_memory_note(report));
    format!("\nDtype comparison\n{}", t.text())
}

/// The recommended concurrency of each dtype and mode.
fn stdout_recommended(report: &Report) -> String {
    let levels = sorted_levels(&report.analysis.levels);
    let mut out = String::new();
    if !report.analysis.recommended_concurrency.is_empty() {
        out.push_str("\nRecommended concurrency (lowest level reaching 90% of the mode's best tok/s)\n");
        for r in &report.analysis.recommended_concurrency {
            let (dtype, mode, conc) = (&r.dtype, &r.mode, r.concurrency);
            let at = level_at(&levels, dtype, mode, conc);
            match at {
                Some(l) => {
                    let _ = writeln!(
                        out,
                        "{mode} {dtype}: {conc}  ({} tok/s, p50 latency {} ms)",
                        f2(l.tokens_per_s),
                        f1(l.latency_p50_ms)
                    );
                }
                None => {
                    let _ = writeln!(out, "{mode} {dtype}: {conc}");
                }
            }
        }
    }
    out
}

/// The pass/fail targets and the verdict.
fn stdout_targets(report: &Report) -> String {
    if report.analysis.targets.is_empty() {
        return String::new();
    }
    format!("\nTargets\n{}", targets_table(report).text())
}
