//! `throughput --url`: the run's protocol sent to an OpenAI-compatible
//! server. The plan is checked as for the in-process run (levels, rates,
//! targets; the thread flags are refused by clap), the output directory and
//! the server (`/v1/models`) before any request, and the report is the
//! in-process one's with mode `http`, the server in `metadata.server`, no
//! model shape, memory, profile or roofline.

use std::error::Error;

use super::measured::{Measured, Served};
use super::options::Options;
use super::plan::RunPlan;
use super::protocol::{Lane, Prompts, Protocol};
use crate::http::{Http, HttpOptions};
use crate::progress::Progress;
use crate::{DtypeRun, ServerInfo};

/// The mode of every test of a `--url` run.
pub const HTTP_MODE: &str = "http";

/// Runs the protocol on the server at `url`: one load (the server's),
/// every repetition on it.
pub(super) fn measure(opts: &Options, plan: &RunPlan, url: &str) -> Result<Measured, Box<dyn Error>> {
    check_timeouts(opts)?;
    gpt2::files::check_writable_dir(&opts.out_dir)?;
    let (tok, tokenizer_source) = tokenizer(opts)?;
    // Synthetic prompts' ids are the tokenizer's: the server's model is not known here.
    let prompts = Prompts::new(opts, opts.prompt_tokens, &tok, tok.vocab_size(), |what, ids| {
        if ids.is_empty() {
            return Err(format!("{what} is no tokens at all; a request needs at least one").into());
        }
        Ok(())
    })?;
    let api_key = opts
        .api_key
        .clone()
        .or_else(|| std::env::var("OPENAI_API_KEY").ok().filter(|k| !k.is_empty()));
    let (http, server) = Http::connect(&HttpOptions {
        url: url.to_string(),
        api_key,
        model: opts.server_model.clone(),
        max_tokens: plan.max_new_tokens,
        choices: opts.choices,
        timeout: std::time::Duration::from_secs_f64(opts.http_timeout),
        deadline: opts.request_deadline.map(std::time::Duration::from_secs_f64),
    })?;
    let dtype = server_field(&server, "dtype")
        .and_then(serde_json::Value::as_str)
        .map_or_else(|| "unknown".to_string(), String::from);
    let synthetic = says_synthetic(&server);
    let progress = Progress::new(plan.total_requests(opts, 1, true) as u64, "requests");
    announce(
        opts,
        &http,
        &server,
        synthetic,
        &prompts,
        &tokenizer_source,
        &progress,
    );
    let protocol = Protocol {
        opts,
        plan,
        progress: &progress,
        prompts: &prompts,
        max_new_tokens: plan.max_new_tokens,
        levels: &plan.levels,
    };
    let lanes = [Lane {
        mode: HTTP_MODE,
        backend: http,
    }];
    let note = format!("warmup: {} request(s), not counted", opts.warmup);
    protocol.warmup(&lanes, &dtype, &note)?;
    let mut tests = Vec::new();
    for rep in 0..plan.repetitions {
        tests.extend(protocol.repetition(&lanes[0], &lanes, &dtype, rep)?);
    }
    progress.finish();
    Ok(Measured {
        tests,
        served: served(server, synthetic, dtype),
        profile: None,
        roofline: None,
        sweep: None,
    })
}

/// `--http-timeout` and `--request-deadline`: seconds above 0, at most a day.
fn check_timeouts(opts: &Options) -> Result<(), String> {
    if !(opts.http_timeout.is_finite() && opts.http_timeout > 0.0 && opts.http_timeout <= 86_400.0) {
        return Err(format!(
            "--http-timeout must be a number of seconds above 0 and at most 86400, not {}",
            opts.http_timeout
        ));
    }
    if let Some(d) = opts.request_deadline {
        if !(d.is_finite() && d > 0.0 && d <= 86_400.0) {
            return Err(format!(
                "--request-deadline must be a number of seconds above 0 and at most 86400, not {d}"
            ));
        }
    }
    Ok(())
}

/// The tokenizer of the prompts (no model is loaded) and where it came from:
/// `--tokenizer`, else `--weights DIR`'s tokenizer.json, else the built-in one.
fn tokenizer(opts: &Options) -> Result<(gpt2::Gpt2Tokenizer, String), Box<dyn Error>> {
    Ok(match (&opts.weights.tokenizer, &opts.weights.weights) {
        (Some(t), _) => (gpt2::Gpt2Tokenizer::from_file(t)?, t.display().to_string()),
        (None, Some(dir)) if dir.join("tokenizer.json").is_file() => {
            let t = dir.join("tokenizer.json");
            (gpt2::Gpt2Tokenizer::from_file(&t)?, t.display().to_string())
        }
        _ => (
            gpt2::Gpt2Tokenizer::builtin(),
            "the built-in GPT-2 tokenizer".to_string(),
        ),
    })
}

/// A field of the chosen model's entry in the server's `/v1/models`
/// (`gpt2 serve` gives `dtype` and `synthetic`).
fn server_field<'a>(server: &'a ServerInfo, field: &str) -> Option<&'a serde_json::Value> {
    server
        .models
        .get("data")?
        .as_array()?
        .iter()
        .find(|m| m.get("id").and_then(serde_json::Value::as_str) == Some(server.model.as_str()))?
        .get(field)
}

/// Whether the server's weights are synthetic: a server's weights are its
/// own, known as synthetic only if the server says so: its model's
/// `synthetic` flag (`gpt2 serve`), else the word anywhere in its model list.
fn says_synthetic(server: &ServerInfo) -> bool {
    match server_field(server, "synthetic").and_then(serde_json::Value::as_bool) {
        Some(flag) => flag,
        None => server
            .models
            .to_string()
            .to_ascii_lowercase()
            .contains("synthetic"),
    }
}

/// The server, its weights and each request's bounds, on stderr.
fn announce(
    opts: &Options,
    http: &Http,
    server: &ServerInfo,
    synthetic: bool,
    prompts: &Prompts,
    tokenizer_source: &str,
    progress: &Progress,
) {
    progress.println(&format!(
        "server: {} model `{}`{}; prompts tokenized with {tokenizer_source}",
        server.url,
        server.model,
        server
            .owned_by
            .as_deref()
            .map(|o| format!(" (owned by {o})"))
            .unwrap_or_default()
    ));
    if synthetic {
        progress
            .println("the server's model list says its weights are SYNTHETIC (random): the text is noise");
    }
    let limits = http.limits();
    progress.println(&format!(
        "each request: deadline {:.0} s{}; its stream at most {} events, {} KiB, {} KiB a line",
        http.deadline(prompts.longest()).as_secs_f64(),
        if opts.request_deadline.is_some() {
            " (--request-deadline)"
        } else {
            " for the longest prompt (derived: --http-timeout + 1 s per token asked + 10 ms per prompt token)"
        },
        limits.events,
        limits.bytes >> 10,
        limits.line >> 10
    ));
}

/// What served a `--url` run: the server, nothing of this process's engine.
fn served(server: ServerInfo, synthetic: bool, dtype: String) -> Served {
    const NA: &str = "n/a (server)";
    Served {
        kernels: NA.into(),
        pool_layout: NA.into(),
        threads_per_request: 0,
        max_busy_threads: 0,
        modes: vec![HTTP_MODE.into()],
        max_batch: 0,
        max_prompt_rows: 0,
        weights_source: format!(
            "the server's: model `{}` at {}{}",
            server.model,
            server.url,
            if synthetic {
                " (SYNTHETIC, as its model list says)"
            } else {
                ""
            }
        ),
        weights_sha256: String::new(),
        synthetic_weights: synthetic,
        model: None,
        dtypes: vec![DtypeRun {
            dtype,
            packed_weight_bytes: None,
            rss_after_load_bytes: None,
            peak_rss_bytes: None,
            peak_rss_own: false,
        }],
        server: Some(server),
    }
}
