//! The Markdown report: one function per section.

use std::fmt::Write as _;

use super::*;

/// The Markdown report. `svg_file_name` is the saturation-curve plot, linked
/// relative to the Markdown file (so both should sit in the same directory).
/// The optional sections (achieved / limit, per-op profile) come last.
pub fn markdown(report: &Report, svg_file_name: &str) -> String {
    let sections = [
        md_intro(report),
        md_setup(report),
        md_results(report),
        md_scaling(report),
        md_dtypes(report),
        md_recommended(report),
        md_targets(report),
        md_spread(report),
        md_plot(svg_file_name),
        md_method(report),
        optional_sections(report),
    ];
    sections.concat()
}

/// The title, what was run, and the synthetic-weights warning.
fn md_intro(report: &Report) -> String {
    let md = &report.metadata;
    let mut out = String::new();
    out.push_str("# GPT-2 throughput benchmark\n\n");
    let dtypes: Vec<String> = md
        .dtypes
        .iter()
        .map(|d| format!("`{}`", md_code(&d.dtype)))
        .collect();
    let engine = match &md.server {
        None => "gpt2-rs".to_string(),
        Some(srv) => format!(
            "the server at {} (`{}`)",
            md_text(&srv.url),
            md_code(&md.engine())
        ),
    };
    let weights = match &md.server {
        None => format!("with the linear layers' weights in {}", dtypes.join(", ")),
        Some(_) => format!("weights in {} (as the server names them)", dtypes.join(", ")),
    };
    let _ = writeln!(
        out,
        "Concurrent text generation with {engine}: each request generates exactly {} tokens \
         from one of {} prompt{}, at concurrency levels {} in mode{} {}, {weights}{}. Throughput \
         counts generated tokens only; latencies are per request.\n",
        md.max_new_tokens,
        md.prompts.len(),
        plural(md.prompts.len()),
        join_usize(&md.concurrency_levels),
        plural(md.modes.len()),
        md.modes
            .iter()
            .map(|m| format!("`{}`", md_code(m)))
            .collect::<Vec<_>>()
            .join(", "),
        if dtypes.len() > 1 {
            " (each repetition runs every dtype in turn, each loaded afresh, the order rotating)"
        } else {
            ""
        }
    );
    if md.synthetic_weights {
        let _ = writeln!(
            out,
            "> **{SYNTHETIC_BANNER}.** The weights are random numbers with the shape of the real \
             checkpoint: timings are representative, generated text is meaningless.\n"
        );
    }
    out
}

/// `## Setup`: the metadata as a table, then the prompts.
fn md_setup(report: &Report) -> String {
    let md = &report.metadata;
    let mut out = String::new();
    out.push_str("## Setup\n\n");
    let mut t = Table::new(&["setting", "value"]);
    t.left(0).left(1);
    let mut setup: Vec<(&str, String)> = vec![
        ("timestamp (UTC)", md_text(&md.timestamp_utc)),
        ("git commit", format!("`{}`", md_code(&md.git_commit))),
    ];
    match &md.server {
        Some(srv) => setup.extend([
            ("server", md_text(&srv.url)),
            ("server model", format!("`{}`", md_code(&srv.model))),
            (
                "server owned_by",
                srv.owned_by.as_deref().map_or_else(|| "—".to_string(), md_text),
            ),
            ("client CPU", md_text(&md.cpu_model)),
            ("client cores", md.cores.to_string()),
        ]),
        None => setup.extend([
            ("CPU", md_text(&md.cpu_model)),
            (
                "kernels",
                if md.kernels.is_empty() {
                    "—".to_string()
                } else {
                    md_text(&md.kernels)
                },
            ),
            ("cores", md.cores.to_string()),
            ("pool layout", md_text(&md.pool_layout)),
            ("threads per request", md.threads_per_request.to_string()),
            ("max busy threads", md.max_busy_threads.to_string()),
        ]),
    }
    setup.extend([
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
            } else if md.server.is_some() {
                "not that the server says".to_string()
            } else {
                "no".to_string()
            },
        ),
    ]);
    match &md.model {
        Some(m) => setup.extend([
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
        ]),
        None => setup.push(("model", "the server's (its shape is not known here)".to_string())),
    }
    setup.extend([
        (
            "dtypes",
            md.dtypes
                .iter()
                .map(|d| md_text(&d.dtype))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("max_new_tokens", format!("{} (EOS ignored)", md.max_new_tokens)),
        ("warmup requests", md.warmup_requests.to_string()),
        ("repetitions", md.repetitions.to_string()),
        ("run mode", md_text(&md.run_mode)),
        (
            "modes",
            md.modes.iter().map(|s| md_text(s)).collect::<Vec<_>>().join(", "),
        ),
        ("concurrency levels", join_usize(&md.concurrency_levels)),
        ("arrival", md_text(&md.arrival)),
        ("prompts", format!("{} (listed below)", md.prompts.len())),
        ("schema version", report.schema_version.to_string()),
    ]);
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
    out
}

/// `## Results`: throughput and latency per test, then any failures.
fn md_results(report: &Report) -> String {
    let mut out = String::new();
    out.push_str("\n## Results\n\n");
    if report.tests.is_empty() {
        out.push_str("No tests were run.\n");
    } else {
        out.push_str("### Throughput\n\n");
        let mut t = Table::new(&[
            "test",
            "mode",
            "dtype",
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
        t.left(0).left(1).left(2);
        for r in &report.tests {
            t.row(vec![
                md_text(&r.name),
                md_text(&r.mode),
                md_text(&r.dtype),
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
            "dtype",
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
            "ITL mean",
            "p50",
            "p99",
        ]);
        t.left(0).left(1).left(2);
        for r in &report.tests {
            t.row(vec![
                md_text(&r.name),
                md_text(&r.mode),
                md_text(&r.dtype),
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
                f1(r.itl_ms.map_or(f64::NAN, |s| s.mean)),
                f1(r.itl_ms.map_or(f64::NAN, |s| s.p50)),
                f1(r.itl_ms.map_or(f64::NAN, |s| s.p99)),
            ]);
        }
        out.push_str(&t.markdown());
        out.push_str(&failures_section(report));
    }
    out
}

/// `## Scaling`: each level against the single request and the reference.
fn md_scaling(report: &Report) -> String {
    let levels = sorted_levels(&report.analysis.levels);
    let mut out = String::new();
    out.push_str("\n## Scaling\n\n");
    if levels.is_empty() {
        out.push_str("No scaling analysis (no levels).\n");
    } else {
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
        t.left(0).left(1);
        for l in &levels {
            let (rr, rt) = match l.reference {
                Some((r, tk)) => (f2(r), f2(tk)),
                None => ("—".to_string(), "—".to_string()),
            };
            t.row(vec![
                md_text(&l.mode),
                md_text(&l.dtype),
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
                l.vs_f32.map_or_else(|| "—".to_string(), times),
            ]);
        }
        out.push_str(&t.markdown());
        out.push_str(
            "\n*Scaling* is tokens/s at concurrency N over tokens/s of the single request of the \
             same dtype (concurrency 1, one baseline for every mode: with one request in flight there is \
             nothing to batch). \
             *Efficiency* = throughput(N) / (N · throughput(1)): 100% means N concurrent requests \
             each run as fast as one alone, 1/N means no gain over running them one after another. \
             *Latency penalty* is the p50 end-to-end latency at N over that at 1. \
             *vs threads* is a mode's tokens/s over threads mode's at the same concurrency and dtype; \
             *vs f32* a dtype's tokens/s over f32's at the same mode and concurrency. \
             The reference column is a PyTorch GPT-2 124M study on a different CPU: compare the \
             shape of the curves, not the absolute numbers.\n\n",
        );
        out.push_str(&tradeoff_sentences(&levels));
    }
    out
}

/// `## Dtype comparison`: per dtype its headline rates and memory, against
/// f32's.
fn md_dtypes(report: &Report) -> String {
    // A server's memory is its own: nothing to compare.
    if report.metadata.server.is_some() {
        return String::new();
    }
    let mut out = String::from("\n## Dtype comparison\n\n");
    if report.metadata.dtypes.is_empty() {
        out.push_str("No dtypes listed.\n");
        return out;
    }
    out.push_str(&dtype_table(report).markdown());
    let (_, at) = dtype_rows(report);
    let conc = at.map_or_else(String::new, |(m, c)| {
        format!(
            " The concurrent column is {} mode at concurrency {c} (8 where measured, else the \
             highest level).",
            md_text(&m)
        )
    });
    let _ = writeln!(
        out,
        "\nTokens/s are means over repetitions; *vs f32* is a dtype's figure over f32's, where f32 \
         ran.{conc}\n"
    );
    out.push_str(&dtype_memory_note(report));
    out
}

/// `## Recommended concurrency`: the rule and each mode's level.
fn md_recommended(report: &Report) -> String {
    let a = &report.analysis;
    let levels = sorted_levels(&report.analysis.levels);
    let mut out = String::new();
    out.push_str("\n## Recommended concurrency\n\n");
    out.push_str(
        "Rule: per dtype and mode, the lowest concurrency whose tokens/s reaches 90% of that mode's \
         best tokens/s. Beyond it, more concurrency mostly adds latency.\n\n",
    );
    if a.recommended_concurrency.is_empty() {
        out.push_str("No recommendation (no levels).\n");
    } else {
        let mut t = Table::new(&[
            "mode",
            "dtype",
            "recommended concurrency",
            "tok/s there",
            "p50 latency ms there",
            "best tok/s",
            "best at concurrency",
        ]);
        t.left(0).left(1);
        for r in &a.recommended_concurrency {
            let at = level_at(&levels, &r.dtype, &r.mode, r.concurrency);
            let best = levels
                .iter()
                .filter(|l| l.dtype == r.dtype && (l.mode == r.mode || l.concurrency == 1))
                .max_by(|x, y| finite(x.tokens_per_s).total_cmp(&finite(y.tokens_per_s)));
            t.row(vec![
                md_text(&r.mode),
                md_text(&r.dtype),
                r.concurrency.to_string(),
                at.map_or_else(|| "—".to_string(), |l| f2(l.tokens_per_s)),
                at.map_or_else(|| "—".to_string(), |l| f1(l.latency_p50_ms)),
                best.map_or_else(|| "—".to_string(), |l| f2(l.tokens_per_s)),
                best.map_or_else(|| "—".to_string(), |l| l.concurrency.to_string()),
            ]);
        }
        out.push_str(&t.markdown());
    }
    out
}

/// `## Targets`: pass/fail per target and the verdict.
fn md_targets(report: &Report) -> String {
    let a = &report.analysis;
    let mut out = String::new();
    out.push_str("\n## Targets\n\n");
    if a.targets.is_empty() {
        out.push_str("No targets were set.\n");
    } else {
        let mut t = Table::new(&["target", "dtype", "condition", "measured", "result"]);
        t.left(0).left(1).left(2).left(4);
        for tg in &a.targets {
            t.row(vec![
                format!("`{}`", md_code(&tg.name)),
                md_text(&tg.dtype),
                format!(
                    "{} {}",
                    tg.op.replace('<', "&lt;").replace('|', "\\|"),
                    target_value(tg.threshold, tg)
                ),
                target_value(tg.measured, tg),
                match target_result(tg) {
                    "FAIL" => "**FAIL**".to_string(),
                    other => other.to_string(),
                },
            ]);
        }
        out.push_str(&t.markdown());
        out.push('\n');
        out.push_str(&targets_verdict(report));
        out.push('\n');
    }
    out
}

/// `## Spread over repetitions`, only with repetitions.
fn md_spread(report: &Report) -> String {
    let a = &report.analysis;
    let mut out = String::new();
    if !a.spread.is_empty() {
        out.push_str("\n## Spread over repetitions\n\n");
        let mut t = Table::new(&[
            "test", "mode", "dtype", "metric", "mean", "stddev", "cv", "min", "max", "n",
        ]);
        t.left(0).left(1).left(2).left(3);
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
                md_text(&s.dtype),
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
    out
}

/// `## Saturation curve`: the SVG, linked by file name.
fn md_plot(svg_file_name: &str) -> String {
    let mut out = String::new();
    out.push_str("\n## Saturation curve\n\n");
    let _ = writeln!(
        out,
        "![Saturation curve: tokens/s and p50 latency vs concurrency]({})\n",
        md_link_target(svg_file_name)
    );
    out.push_str(
        "Left: tokens/s per mode and dtype against concurrency (f32 solid, bf16 dashed, int8 \
         dotted), with the reference study grey and dashed. \
         Right: p50 end-to-end latency. Where tokens/s flattens while latency keeps rising, \
         the machine is saturated.\n",
    );
    out
}

/// `## Method`: how the figures were measured.
fn md_method(report: &Report) -> String {
    let md = &report.metadata;
    let mut out = String::new();
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
         the decode speed one request sees.\n\
         - ITL (inter-token latency): the gaps between consecutive tokens of the successful \
         requests, all pooled: stalls show in its p99 where TPOT's per-request mean hides them.\n",
    );
    let _ = writeln!(
        out,
        "- Warmup: {} request{} ran before timing, excluded from every figure.",
        md.warmup_requests,
        plural(md.warmup_requests)
    );
    match &md.server {
        Some(srv) => {
            let _ = writeln!(
                out,
                "- Server: every request is a `POST {}/v1/completions` of the prompt as token ids, \
                 model `{}`, `stream: true`, `temperature: 0`, `ignore_eos: true`, \
                 `max_tokens: {}`; TTFT is the first streamed token chunk's arrival, the end is \
                 `data: [DONE]`. Token counts are the server's `usage`; a request whose `usage` and \
                 number of streamed chunks disagree, or that answers an HTTP error, fails. The \
                 client machine's CPU and cores are listed, not the server's.",
                md_text(&srv.url),
                md_code(&srv.model),
                md.max_new_tokens
            );
        }
        None => {
            let _ = writeln!(
                out,
                "- Threads: {} pool, {} threads per request, {} cores, at most {} compute threads busy at \
             the highest concurrency.",
                md_text(&md.pool_layout),
                md.threads_per_request,
                md.cores,
                md.max_busy_threads
            );
            let _ = writeln!(
                out,
                "- Dtypes: {}. Each loads the checkpoint afresh, its linear layers' weights converted as \
             they are packed (activations, biases, norms, attention and the KV cache stay f32), after \
             the previous dtype's model is dropped; each runs the warmup and every test.",
                md.dtypes
                    .iter()
                    .map(|d| md_text(&d.dtype))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
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
    let mut t = Table::new(&[
        "test",
        "mode",
        "dtype",
        "repetition",
        "request",
        "tokens",
        "error",
    ]);
    t.left(0).left(1).left(2).left(6);
    for (test, r) in failed.iter().take(SHOWN) {
        t.row(vec![
            md_text(&test.name),
            md_text(&test.mode),
            md_text(&test.dtype),
            test.repetition.to_string(),
            r.index.to_string(),
            r.generated_tokens.to_string(),
            md_text(r.error.as_deref().unwrap_or("")),
        ]);
    }
    let _ = writeln!(out, "{total_failed} request{} failed.\n", plural(total_failed));
    // By cause: the same error text (an HTTP status and its message, a
    // short count) from any test counts together.
    let mut causes: Vec<(&str, usize)> = Vec::new();
    for (_, r) in &failed {
        let e = r.error.as_deref().unwrap_or("");
        match causes.iter_mut().find(|(c, _)| *c == e) {
            Some((_, n)) => *n += 1,
            None => causes.push((e, 1)),
        }
    }
    if !causes.is_empty() {
        let mut c = Table::new(&["requests", "error"]);
        c.left(1);
        for (e, n) in &causes {
            c.row(vec![n.to_string(), md_text(e)]);
        }
        out.push_str(&c.markdown());
        out.push('\n');
    }
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

/// Per dtype: one sentence per mode at its highest concurrency, then a mode
/// comparison at the highest level every mode measured.
fn tradeoff_sentences(levels: &[&LevelAnalysis]) -> String {
    let mut out = String::new();
    let modes = modes_in_order(levels);
    for dtype in dtypes_in_order(levels) {
        let levels: Vec<&LevelAnalysis> = levels.iter().copied().filter(|l| l.dtype == dtype).collect();
        let dtype = md_text(&dtype);
        for mode in &modes {
            let top = levels
                .iter()
                .filter(|l| &l.mode == mode && l.concurrency > 1)
                .max_by_key(|l| l.concurrency);
            match top {
                Some(l) => {
                    let _ = writeln!(
                        out,
                        "At concurrency {}, {} mode ({dtype}) gives {} the throughput of a single request \
                         for {} the p50 latency ({} efficiency).",
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
                        "{} mode ({dtype}) was only measured at concurrency 1: no trade-off to show.",
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
                let parts: Vec<String> = modes
                    .iter()
                    .filter_map(|m| levels.iter().find(|l| &l.mode == m && l.concurrency == c))
                    .map(|l| {
                        format!(
                            "{} {} tok/s at {} ms p50",
                            md_text(&l.mode),
                            f2(l.tokens_per_s),
                            f1(l.latency_p50_ms)
                        )
                    })
                    .collect();
                let _ = writeln!(out, "\nAt concurrency {c} ({dtype}): {}.\n", parts.join(", "));
            }
        }
    }
    out
}
