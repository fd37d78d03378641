//! The Markdown report: one function per section.

use std::fmt::Write as _;

use super::*;

/// The Markdown report. `svg_file_name` is the saturation-curve plot, linked
/// relative to the Markdown file (so both should sit in the same directory).
/// The optional sections (achieved / limit, per-op profile) come last. A
/// sweep's report has its cells and axes instead of the sections that read
/// the whole run as one (its axes' SVGs are named from `svg_file_name`).
pub fn markdown(report: &Report, svg_file_name: &str) -> String {
    if report.sweep.is_some() {
        let sections = [
            md_intro(report),
            md_setup(report),
            md_sweep(report, svg_file_name),
            md_results(report),
            md_targets(report),
            md_method(report),
        ];
        return sections.concat();
    }
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
    let prompts = match md.prompt_tokens {
        None if md.prompts.is_empty() => "a synthetic prompt of its own (its cell's prompt-tokens)".into(),
        None => format!("one of {} prompt{}", md.prompts.len(), plural(md.prompts.len())),
        Some(n) if md.shared_prefix_tokens > 0 => format!(
            "a synthetic prompt of its own ({} tokens shared by every request, then {n} of its own)",
            md.shared_prefix_tokens
        ),
        Some(n) => format!("a synthetic prompt of its own ({n} tokens)"),
    };
    let choices = match md.choices {
        1 => String::new(),
        n => format!(" in each of its {n} choices (OpenAI `n`, one prefill)"),
    };
    let _ = writeln!(
        out,
        "Concurrent text generation with {engine}: each request generates exactly {} tokens{choices} \
         from {prompts}, at concurrency levels {} in mode{} {}, {weights}{}. Throughput \
         counts generated tokens only; latencies are per request.\n",
        md.max_new_tokens,
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
    let mut t = Table::new(&["setting", "value"]);
    t.left(0).left(1);
    for (k, v) in setup_rows(report) {
        t.row([Cell::Plain(k.to_string()), v]);
    }
    let mut out = format!("## Setup\n\n{}", t.markdown());
    if !md.prompts.is_empty() {
        out.push_str("\nPrompts:\n\n");
        for (i, p) in md.prompts.iter().enumerate() {
            let _ = writeln!(out, "{}. {}", i + 1, md_text(p));
        }
    }
    out
}

/// The setup table's rows: when and what ran, on what, with which weights
/// and model, and the protocol.
fn setup_rows(report: &Report) -> Vec<(&'static str, Cell)> {
    let md = &report.metadata;
    let mut rows = vec![
        ("timestamp (UTC)", Cell::Text(md.timestamp_utc.clone())),
        ("git commit", Cell::Code(md.git_commit.clone())),
    ];
    rows.extend(engine_rows(md));
    rows.extend([
        ("rustc", Cell::Text(md.rustc.clone())),
        ("weights source", Cell::Text(md.weights_source.clone())),
        ("weights sha256", Cell::Code(short_sha(&md.weights_sha256))),
        (
            "synthetic weights",
            if md.synthetic_weights {
                Cell::Strong(format!("yes: {SYNTHETIC_BANNER}"))
            } else if md.server.is_some() {
                "not that the server says".into()
            } else {
                "no".into()
            },
        ),
    ]);
    match &md.model {
        Some(m) => rows.extend([
            (
                "model",
                Cell::Plain(format!(
                    "{} layers, {} heads, {} embd, {} positions, vocab {}",
                    m.n_layer, m.n_head, m.n_embd, m.n_positions, m.vocab_size
                )),
            ),
            (
                "parameters",
                Cell::Plain(format!(
                    "{:.1} M ({})",
                    m.n_params as f64 / 1e6,
                    thousands(m.n_params)
                )),
            ),
        ]),
        None if report.sweep.is_some() => rows.push(("model", "swept (see Sweep)".into())),
        None => rows.push(("model", "the server's (its shape is not known here)".into())),
    }
    let dtypes: Vec<&str> = md.dtypes.iter().map(|d| d.dtype.as_str()).collect();
    rows.extend([
        ("dtypes", Cell::Text(dtypes.join(", "))),
        ("KV cache", Cell::Text(md.kv_dtype.clone())),
        (
            "max_new_tokens",
            format!("{} (EOS ignored)", md.max_new_tokens).into(),
        ),
        ("warmup requests", md.warmup_requests.to_string().into()),
        ("repetitions", md.repetitions.to_string().into()),
        ("run mode", Cell::Text(md.run_mode.clone())),
        ("modes", Cell::Text(md.modes.join(", "))),
        ("concurrency levels", join_usize(&md.concurrency_levels).into()),
        ("arrival", Cell::Text(md.arrival.clone())),
        ("requests", Cell::Text(md.workload())),
        (
            "prompts",
            if md.prompts.is_empty() {
                "synthetic (see requests)".into()
            } else {
                format!("{} (listed below)", md.prompts.len()).into()
            },
        ),
        ("schema version", report.schema_version.to_string().into()),
    ]);
    rows
}

/// What served the requests: the server, or this machine's engine.
fn engine_rows(md: &crate::Metadata) -> Vec<(&'static str, Cell)> {
    match &md.server {
        Some(srv) => vec![
            ("server", Cell::Text(srv.url.clone())),
            ("server model", Cell::Code(srv.model.clone())),
            (
                "server owned_by",
                srv.owned_by.clone().map_or(Cell::Missing, Cell::Text),
            ),
            ("client CPU", Cell::Text(md.cpu_model.clone())),
            ("client cores", md.cores.to_string().into()),
        ],
        None => vec![
            ("CPU", Cell::Text(md.cpu_model.clone())),
            (
                "kernels",
                if md.kernels.is_empty() {
                    Cell::Missing
                } else {
                    Cell::Text(md.kernels.clone())
                },
            ),
            ("cores", md.cores.to_string().into()),
            ("pool layout", Cell::Text(md.pool_layout.clone())),
            ("threads per request", md.threads_per_request.to_string().into()),
            ("max busy threads", md.max_busy_threads.to_string().into()),
        ],
    }
}

/// `## Results`: throughput and latency per test, then any failures.
fn md_results(report: &Report) -> String {
    if report.tests.is_empty() {
        return "\n## Results\n\nNo tests were run.\n".to_string();
    }
    format!(
        "\n## Results\n\n### Throughput\n\n{}\n### Latency (ms)\n\n{}{}{}",
        throughput_table(&report.tests).markdown(),
        latency_table(&report.tests).markdown(),
        prefix_section(&report.tests),
        failures_section(report)
    )
}

/// `### Prefix reuse`: what each test took from the scheduler's prefix
/// cache, where it was counted (in process, batched mode); nothing if no
/// test counted any.
fn prefix_section(tests: &[TestResult]) -> String {
    if tests.iter().all(|t| t.prefix.is_none()) {
        return String::new();
    }
    let mut t = test_table(
        &["requests", "hits", "prompt tokens", "reused", "reused %"],
        tests,
    );
    for r in tests {
        let (hits, reused, share) = match r.prefix {
            Some(p) => (
                Some(p.hits.to_string()),
                Some(p.tokens_reused.to_string()),
                Some(percent(p.tokens_reused as f64 / r.prompt_tokens as f64)),
            ),
            None => (None, None, None),
        };
        let cells: [Cell; 5] = [
            r.requests.to_string().into(),
            hits.into(),
            r.prompt_tokens.to_string().into(),
            reused.into(),
            share.into(),
        ];
        test_row(&mut t, r, cells);
    }
    t.note(
        "Hits: requests that started from a cached prefix; reused: prompt tokens taken from the cache instead \
         of computed (— where nothing counts it: threads mode).",
    );
    format!("\n### Prefix reuse\n\n{}", t.markdown())
}

/// Per test: requests, failures, tokens, duration and rates.
fn throughput_table(tests: &[TestResult]) -> Table {
    let mut t = test_table(
        &[
            "requests",
            "failed",
            "generated tokens",
            "prompt tokens",
            "duration s",
            "req/s",
            "tok/s",
        ],
        tests,
    );
    for r in tests {
        let counts = [r.requests, r.failed, r.total_tokens, r.prompt_tokens].map(|n| n.to_string());
        let rates = [r.duration_s, r.requests_per_s, r.tokens_per_s].map(f2);
        test_row(&mut t, r, counts.into_iter().chain(rates));
    }
    t
}

/// Per test: end-to-end latency, TTFT, TPOT and ITL, in ms.
fn latency_table(tests: &[TestResult]) -> Table {
    let mut t = test_table(
        &[
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
        ],
        tests,
    );
    for r in tests {
        let (lat, ttft, tpot) = (&r.latency_ms, &r.ttft_ms, &r.tpot_ms);
        let itl = r.itl_ms.map_or([f64::NAN; 3], |s| [s.mean, s.p50, s.p99]);
        let ms = [lat.mean, lat.p50, lat.p95, lat.p99]
            .into_iter()
            .chain([ttft.mean, ttft.p50, ttft.p99, tpot.mean, tpot.p50, tpot.p99])
            .chain(itl);
        test_row(&mut t, r, ms.map(f1));
    }
    t
}

/// A table with a row per test: the columns that name it (test, mode,
/// dtype, concurrency, repetition), then `figures`.
/// `tests` of a sweep name their cell first.
fn test_table(figures: &[&str], tests: &[TestResult]) -> Table {
    let cell: &[&str] = if tests.iter().any(|t| t.cell.is_some()) {
        &["cell"]
    } else {
        &[]
    };
    let names = ["test", "mode", "dtype", "concurrency", "repetition"];
    let titles: Vec<&str> = cell.iter().chain(&names).chain(figures).copied().collect();
    let mut t = Table::new(&titles);
    let first = cell.len();
    t.left(first).left(first + 1).left(first + 2);
    t
}

/// Test `r`'s row of a [`test_table`]: its names (its cell first in a
/// sweep), then `figures`.
fn test_row<C: Into<Cell>>(t: &mut Table, r: &TestResult, figures: impl IntoIterator<Item = C>) {
    let cell = r.cell.map(|c| Cell::from(c.to_string()));
    let names = [
        Cell::Text(r.name.clone()),
        Cell::Text(r.mode.clone()),
        Cell::Text(r.dtype.clone()),
        r.concurrency.to_string().into(),
        r.repetition.to_string().into(),
    ];
    let row = cell
        .into_iter()
        .chain(names)
        .chain(figures.into_iter().map(Into::into));
    t.row(row);
}

/// `## Scaling`: each level against the single request and the reference.
fn md_scaling(report: &Report) -> String {
    let levels = sorted_levels(&report.analysis.levels);
    if levels.is_empty() {
        return "\n## Scaling\n\nNo scaling analysis (no levels).\n".to_string();
    }
    let mut t = scaling_table(&levels);
    t.note(
        "*Scaling* is tokens/s at concurrency N over tokens/s of the single request of the \
         same dtype (concurrency 1, one baseline for every mode: with one request in flight there is \
         nothing to batch). \
         *Efficiency* = throughput(N) / (N · throughput(1)): 100% means N concurrent requests \
         each run as fast as one alone, 1/N means no gain over running them one after another. \
         *Latency penalty* is the p50 end-to-end latency at N over that at 1. \
         *vs threads* is a mode's tokens/s over threads mode's at the same concurrency and dtype; \
         *vs f32* a dtype's tokens/s over f32's at the same mode and concurrency. \
         The reference column is a PyTorch GPT-2 124M study on a different CPU: compare the \
         shape of the curves, not the absolute numbers.",
    );
    t.note(tradeoff_sentences(&levels));
    format!("\n## Scaling\n\n{}", t.markdown())
}

/// `## Dtype comparison`: per dtype its headline rates and memory, against
/// f32's.
fn md_dtypes(report: &Report) -> String {
    // A server's memory is its own: nothing to compare.
    if report.metadata.server.is_some() {
        return String::new();
    }
    if report.metadata.dtypes.is_empty() {
        return "\n## Dtype comparison\n\nNo dtypes listed.\n".to_string();
    }
    let mut t = dtype_table(report);
    let (_, at) = dtype_rows(report);
    let conc = at.map_or_else(String::new, |(m, c)| {
        format!(
            " The concurrent column is {} mode at concurrency {c} (8 where measured, else the \
             highest level).",
            md_text(&m)
        )
    });
    t.note(format!(
        "Tokens/s are means over repetitions; *vs f32* is a dtype's figure over f32's, where f32 \
         ran.{conc}"
    ));
    t.note(dtype_memory_note(report));
    format!("\n## Dtype comparison\n\n{}", t.markdown())
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
            t.row([
                Cell::Text(r.mode.clone()),
                Cell::Text(r.dtype.clone()),
                r.concurrency.to_string().into(),
                at.map(|l| f2(l.tokens_per_s)).into(),
                at.map(|l| f1(l.latency_p50_ms)).into(),
                best.map(|l| f2(l.tokens_per_s)).into(),
                best.map(|l| l.concurrency.to_string()).into(),
            ]);
        }
        out.push_str(&t.markdown());
    }
    out
}

/// `## Targets`: pass/fail per target and the verdict.
fn md_targets(report: &Report) -> String {
    if report.analysis.targets.is_empty() {
        return "\n## Targets\n\nNo targets were set.\n".to_string();
    }
    format!("\n## Targets\n\n{}", targets_table(report).markdown())
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
                Cell::Plain(percent(s.stddev / s.mean))
            } else {
                Cell::Missing
            };
            t.row([
                Cell::Text(s.test.clone()),
                if s.mode.is_empty() {
                    Cell::Missing
                } else {
                    Cell::Text(s.mode.clone())
                },
                Cell::Text(s.dtype.clone()),
                Cell::Code(s.metric.clone()),
                v(s.mean).into(),
                v(s.stddev).into(),
                cv,
                v(s.min).into(),
                v(s.max).into(),
                s.n.to_string().into(),
            ]);
        }
        t.note("cv = stddev / mean.");
        out.push_str(&t.markdown());
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
             they are packed (activations, biases, norms and attention stay f32, the KV cache is {}), \
             after the previous dtype's model is dropped; each runs the warmup and every test.",
                md.dtypes
                    .iter()
                    .map(|d| md_text(&d.dtype))
                    .collect::<Vec<_>>()
                    .join(", "),
                md_text(&md.kv_dtype)
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
        t.row([
            Cell::Text(test.name.clone()),
            Cell::Text(test.mode.clone()),
            Cell::Text(test.dtype.clone()),
            test.repetition.to_string().into(),
            r.index.to_string().into(),
            r.generated_tokens.to_string().into(),
            Cell::Text(r.error.clone().unwrap_or_default()),
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
            c.row([n.to_string().into(), Cell::Text(e.to_string())]);
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
