//! `throughput --url` against a mock OpenAI-compatible server started here
//! (axum on 127.0.0.1, an ephemeral port, stopped on drop), and
//! `throughput compare` on the reports.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::{scratch_dir, throughput_within};
use serde_json::{json, Value};

/// What the mock does with completions (and its model list).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    /// Exactly `max_tokens` chunks for each of the `n` choices asked (their
    /// chunks interleaved, each naming its `index`), the usage to match.
    Good,
    /// As `Good`, but one choice whatever `n` asks (a server that ignores it).
    OneChoice,
    /// One token fewer than asked, the usage to match (an early stop).
    Short,
    /// One chunk fewer than its usage counts.
    Miscounted,
    /// Request n (from 0, in the order they reach the server): n % 4 == 1
    /// answers 500, n % 4 == 3 answers 429, the others are good.
    SomeErrors,
    /// Completions answer 200 with text that is no event stream.
    GarbageStream,
    /// `/v1/models` answers 200 with HTML.
    GarbageModels,
}

struct Shared {
    behaviour: Behaviour,
    /// The bearer token required, if any.
    key: Option<&'static str>,
    requests: AtomicUsize,
    /// Every completion request's body.
    seen: Mutex<Vec<Value>>,
}

/// The mock server; dropping it stops it (its runtime, and with it every
/// connection, is dropped on its thread).
struct Mock {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mock {
    fn start(behaviour: Behaviour, key: Option<&'static str>) -> Mock {
        let shared = Arc::new(Shared {
            behaviour,
            key,
            requests: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = Router::new()
                    .route("/v1/models", get(models))
                    .route("/v1/completions", post(completions))
                    .with_state(state);
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    r = axum::serve(listener, app) => r.unwrap(),
                    _ = stopped => {}
                }
            });
        });
        Mock {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Value> {
        self.shared.seen.lock().unwrap().clone()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    (status, Json(body)).into_response()
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    match shared.key {
        None => true,
        Some(k) => headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {k}")),
    }
}

async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !authorized(&shared, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid api key",
            "authentication_error",
        );
    }
    if shared.behaviour == Behaviour::GarbageModels {
        return (StatusCode::OK, "<html>hello</html>").into_response();
    }
    Json(json!({"object": "list", "data": [
        {"id": "mock-gpt2", "object": "model", "owned_by": "mock"},
        {"id": "other", "object": "model", "owned_by": "someone"}
    ]}))
    .into_response()
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&shared, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid api key",
            "authentication_error",
        );
    }
    let n = shared.requests.fetch_add(1, Ordering::SeqCst);
    shared.seen.lock().unwrap().push(body.clone());
    let asked = body["max_tokens"].as_u64().unwrap_or(0) as usize;
    let prompt_tokens = body["prompt"].as_array().map_or(0, Vec::len);
    let choices = match shared.behaviour {
        Behaviour::Good => body["n"].as_u64().unwrap_or(1) as usize,
        _ => 1,
    };
    let (chunks, counted, finish) = match shared.behaviour {
        Behaviour::SomeErrors if n % 4 == 1 => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "engine exploded",
                "server_error",
            )
        }
        Behaviour::SomeErrors if n % 4 == 3 => {
            return error(StatusCode::TOO_MANY_REQUESTS, "too many requests", "rate_limit")
        }
        Behaviour::GarbageStream => {
            return (StatusCode::OK, "this is not an event stream\n").into_response();
        }
        Behaviour::Short => (asked - 1, asked - 1, "stop"),
        Behaviour::Miscounted => (asked - 1, asked, "length"),
        _ => (asked, asked, "length"),
    };
    let mut sse = String::new();
    for i in 0..chunks {
        let finish = (i + 1 == chunks).then_some(finish);
        // The last choice first: chunks need not come in index order.
        for index in (0..choices).rev() {
            let chunk = json!({"id": "c", "object": "text_completion", "model": body["model"],
                               "choices": [{"index": index, "text": format!(" t{i}"), "finish_reason": finish}]});
            sse.push_str(&format!("data: {chunk}\n\n"));
        }
    }
    let counted = counted * choices;
    let usage = json!({"choices": [], "usage": {"prompt_tokens": prompt_tokens,
                       "completion_tokens": counted, "total_tokens": prompt_tokens + counted}});
    sse.push_str(&format!("data: {usage}\n\ndata: [DONE]\n\n"));
    ([("content-type", "text/event-stream")], sse).into_response()
}

/// 1 warmup, 2 single requests, level 2 with 4 requests: 7 requests, 6 counted.
fn quick<'a>(url: &'a str, out_dir: &'a str) -> Vec<&'a str> {
    vec![
        "--url",
        url,
        "--max-new-tokens",
        "4",
        "--warmup",
        "1",
        "--single-requests",
        "2",
        "--levels",
        "2",
        "--requests-per-level",
        "4",
        "--out-dir",
        out_dir,
        "--http-timeout",
        "30",
    ]
}

/// Every default target passes whatever the speed (each measured value > 0).
const EASY_TARGETS: [&str; 8] = [
    "--target",
    "single_tokens_per_s=0",
    "--target",
    "single_requests_per_s=0",
    "--target",
    "concurrent_tokens_per_s=0",
    "--target",
    "concurrent_requests_per_s=0",
];

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn files_in(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

#[test]
fn a_good_server_gives_a_complete_report() {
    let mock = Mock::start(Behaviour::Good, Some("sekrit"));
    let out_dir = scratch_dir("url-good");
    let url = mock.url();
    let mut args = quick(&url, out_dir.to_str().unwrap());
    args.extend(EASY_TARGETS);
    args.extend(["--api-key", "sekrit", "--json"]);
    let out = throughput_within(&args, 120);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report: gpt2_bench::Report = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report.schema_version, 5);
    let md = &report.metadata;
    assert_eq!(md.modes, ["http"]);
    assert_eq!(md.model, None, "a server's model shape is not known");
    let server = md.server.as_ref().expect("the server is named");
    assert_eq!(
        (server.url.as_str(), server.model.as_str()),
        (url.as_str(), "mock-gpt2")
    );
    assert_eq!(server.owned_by.as_deref(), Some("mock"));
    assert_eq!(
        server.models["data"][1]["id"], "other",
        "the whole model list is kept"
    );
    assert_eq!(md.engine(), "mock mock-gpt2");
    assert!(
        !md.synthetic_weights,
        "the mock says nothing of synthetic weights"
    );
    let tests: Vec<(&str, &str, usize, usize)> = report
        .tests
        .iter()
        .map(|t| (t.name.as_str(), t.mode.as_str(), t.concurrency, t.requests))
        .collect();
    assert_eq!(tests, [("single", "http", 1, 2), ("concurrent-2", "http", 2, 4)]);
    for t in &report.tests {
        assert_eq!((t.failed, t.total_tokens), (0, t.requests * 4), "{}", t.name);
        assert!(t.tokens_per_s > 0.0 && t.ttft_ms.p50 > 0.0, "{}", t.name);
        assert!(t.itl_ms.is_some_and(|s| s.mean >= 0.0), "{}", t.name);
        for r in &t.raw {
            assert_eq!(r.token_ms.len(), 4, "{r:?}");
            assert_eq!(r.token_ms.first().copied(), r.ttft_ms, "{r:?}");
            assert!(r.token_ms.windows(2).all(|w| w[0] <= w[1]), "{r:?}");
        }
    }
    // What the server was asked: every request, the prompts as token ids.
    let tok = gpt2::Gpt2Tokenizer::builtin();
    let single = tok.encode("Hello, how are you?").unwrap();
    let seen = mock.seen();
    assert_eq!(seen.len(), 7, "1 warmup + 2 single + 4 at level 2");
    for body in &seen {
        assert_eq!(body["model"], "mock-gpt2");
        assert_eq!(body["max_tokens"], 4);
        assert_eq!(body["temperature"], 0.0);
        assert_eq!(
            (&body["stream"], &body["ignore_eos"]),
            (&json!(true), &json!(true))
        );
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert!(
            body["prompt"]
                .as_array()
                .is_some_and(|p| p.iter().all(Value::is_u64)),
            "{body}"
        );
    }
    assert_eq!(
        seen[0]["prompt"],
        json!(single),
        "the warmup sends the single prompt"
    );
    // JSON, Markdown and SVG written; the Markdown names the server and the ITL.
    let md_file = files_in(&out_dir, "md");
    assert_eq!(
        (
            md_file.len(),
            files_in(&out_dir, "svg").len(),
            files_in(&out_dir, "json").len()
        ),
        (1, 1, 1)
    );
    let md_text = std::fs::read_to_string(&md_file[0]).unwrap();
    assert!(
        md_text.contains("| server ") && md_text.contains("mock-gpt2"),
        "{md_text}"
    );
    assert!(
        md_text.contains("ITL mean") && !md_text.contains("## Dtype comparison"),
        "{md_text}"
    );
}

#[test]
fn the_model_sent_can_be_named() {
    let mock = Mock::start(Behaviour::Good, None);
    let out_dir = scratch_dir("url-model");
    let url = mock.url();
    let mut args = quick(&url, out_dir.to_str().unwrap());
    args.extend(EASY_TARGETS);
    args.extend(["--server-model", "other"]);
    let out = throughput_within(&args, 120);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    let seen = mock.seen();
    assert_eq!(seen.len(), 7);
    assert!(seen.iter().all(|b| b["model"] == "other"));
    let report = gpt2_bench::compare::read_report(&files_in(&out_dir, "json")[0]).unwrap();
    let server = report.metadata.server.unwrap();
    assert_eq!(
        (server.model.as_str(), server.owned_by.as_deref()),
        ("other", Some("someone"))
    );
}

/// `--choices 2`: every request asks for `n: 2` and counts both choices'
/// tokens, each choice's times apart; `--prompt-tokens` with
/// `--shared-prefix-tokens`: every prompt starts with the same preamble,
/// then differs from every other at its first own token.
#[test]
fn choices_and_shared_prefixes_are_sent_and_counted() {
    let mock = Mock::start(Behaviour::Good, None);
    let out_dir = scratch_dir("url-choices");
    let url = mock.url();
    let mut args = quick(&url, out_dir.to_str().unwrap());
    args.extend(EASY_TARGETS);
    args.extend([
        "--choices",
        "2",
        "--prompt-tokens",
        "3",
        "--shared-prefix-tokens",
        "5",
        "--json",
    ]);
    let out = throughput_within(&args, 120);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report: gpt2_bench::Report = serde_json::from_str(&stdout).unwrap();
    let md = &report.metadata;
    assert_eq!(
        (
            md.choices,
            md.prompt_tokens,
            md.shared_prefix_tokens,
            md.prefix_cache_mib
        ),
        (2, Some(3), 5, None),
        "a server's prefix cache is its own"
    );
    for t in &report.tests {
        assert_eq!((t.failed, t.total_tokens), (0, t.requests * 2 * 4), "{}", t.name);
        assert_eq!(t.prefix, None, "{}: a server's reuse is not counted here", t.name);
        for r in &t.raw {
            assert_eq!(r.prompt_tokens, 8, "{r:?}");
            assert_eq!(r.choice_ms.len(), 2, "{r:?}");
            assert!(r.choice_ms.iter().all(|c| c.len() == 4), "{r:?}");
        }
    }
    let seen = mock.seen();
    assert_eq!(seen.len(), 7);
    assert!(seen.iter().all(|b| b["n"] == 2), "{seen:?}");
    let prompts: Vec<Vec<u64>> = seen
        .iter()
        .map(|b| {
            b["prompt"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap())
                .collect()
        })
        .collect();
    for p in &prompts {
        assert_eq!(
            (p.len(), &p[..5]),
            (8, &prompts[0][..5]),
            "one preamble: {prompts:?}"
        );
        assert!(p.iter().all(|&t| t < 50257), "{p:?}");
    }
    let firsts: std::collections::HashSet<u64> = prompts.iter().map(|p| p[5]).collect();
    assert_eq!(
        firsts.len(),
        7,
        "each request's own tokens start apart: {prompts:?}"
    );
}

/// A server that answers one choice where `n` asked for more fails every
/// request, by name.
#[test]
fn a_server_that_ignores_n_fails_by_name() {
    let mock = Mock::start(Behaviour::OneChoice, None);
    let out_dir = scratch_dir("url-one-choice");
    let url = mock.url();
    let mut args = quick(&url, out_dir.to_str().unwrap());
    args.extend(["--choices", "3"]);
    let out = throughput_within(&args, 120);
    let stderr = text(&out).1;
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    let report = gpt2_bench::compare::read_report(&files_in(&out_dir, "json")[0]).unwrap();
    assert_eq!(
        errors(&report),
        [("1 choices where 3 were asked for (`n`)".to_string(), 6)]
    );
}

/// `throughput pair` against one server: the variants alternate (A B, then
/// B A), each run a whole run of the common flags plus its own; the JSON
/// keeps every run and the ratios; no run is sent a prompt of another's.
#[test]
fn pair_alternates_the_variants_and_never_resends_a_prompt() {
    let mock = Mock::start(Behaviour::Good, None);
    let out_dir = scratch_dir("url-pair");
    let url = mock.url();
    let args = [
        "pair",
        "--pairs",
        "2",
        "--a",
        "--choices 2",
        "--out-dir",
        out_dir.to_str().unwrap(),
        "--",
        "--url",
        &url,
        "--prompt-tokens",
        "3",
        "--shared-prefix-tokens",
        "5",
        "--max-new-tokens",
        "4",
        "--warmup",
        "1",
        "--single-requests",
        "1",
        "--levels",
        "2",
        "--requests-per-level",
        "2",
        "--http-timeout",
        "30",
    ];
    let out = throughput_within(&args, 120);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("## Ratios") && stdout.contains("| tokens/s"),
        "{stdout}"
    );
    // Four runs of 1 warmup, 1 single request and 2 at level 2, in turn.
    let seen = mock.seen();
    assert_eq!(seen.len(), 16);
    let n: Vec<u64> = seen
        .chunks(4)
        .map(|run| run[0]["n"].as_u64().unwrap_or(1))
        .collect();
    assert_eq!(n, [2, 1, 1, 2], "A B, then B A");
    let mut prompts: Vec<String> = seen.iter().map(|b| b["prompt"].to_string()).collect();
    prompts.sort();
    prompts.dedup();
    assert_eq!(prompts.len(), 16, "every prompt sent once");

    let json = files_in(&out_dir, "json");
    assert_eq!((json.len(), files_in(&out_dir, "md").len()), (1, 1));
    let report: gpt2_bench::pair::PairReport =
        serde_json::from_str(&std::fs::read_to_string(&json[0]).unwrap()).unwrap();
    assert_eq!(
        (report.a.as_slice(), report.b.len()),
        (&["--choices".to_string(), "2".into()][..], 0)
    );
    let choices: Vec<usize> = report.runs.iter().map(|r| r.metadata.choices).collect();
    assert_eq!(choices, [2, 1, 1, 2]);
    let orders: Vec<&str> = report.pairs.iter().map(|p| p.order.as_str()).collect();
    assert_eq!(orders, ["AB", "BA"]);
    for p in &report.pairs {
        assert_eq!(
            (p.a.test.as_str(), p.b.test.as_str()),
            ("concurrent-2", "concurrent-2")
        );
        assert!(p.ratio.tokens_per_s > 0.0 && p.ratio.ttft_p50 > 0.0, "{p:?}");
        assert_eq!((p.a.failed, p.b.failed), (0, 0));
    }
    let figures: Vec<&str> = report.ratios.iter().map(|r| r.figure.as_str()).collect();
    assert_eq!(figures, ["tokens_per_s", "ttft_p50", "latency_p50"]);
}

/// Runs `behaviour`'s mock through `quick` and returns (status, stderr,
/// the report if one was written).
fn run_against(behaviour: Behaviour, name: &str) -> (Option<i32>, String, Option<gpt2_bench::Report>) {
    let mock = Mock::start(behaviour, None);
    let out_dir = scratch_dir(name);
    let url = mock.url();
    let out = throughput_within(&quick(&url, out_dir.to_str().unwrap()), 120);
    let report = files_in(&out_dir, "json")
        .first()
        .map(|p| gpt2_bench::compare::read_report(p).unwrap());
    (out.status.code(), text(&out).1, report)
}

/// The errors of a report's requests, each with how many requests had it.
fn errors(report: &gpt2_bench::Report) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for r in report.tests.iter().flat_map(|t| &t.raw) {
        if let Some(e) = &r.error {
            match out.iter_mut().find(|(x, _)| x == e) {
                Some((_, n)) => *n += 1,
                None => out.push((e.clone(), 1)),
            }
        }
    }
    out.sort();
    out
}

#[test]
fn fewer_tokens_than_asked_fail_every_request() {
    let (code, stderr, report) = run_against(Behaviour::Short, "url-short");
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("FAILED: 6 of 6 requests failed"), "{stderr}");
    let report = report.expect("the report is still written");
    assert_eq!(
        errors(&report),
        [("short: 3 of 4 tokens (stop: stop)".to_string(), 6)]
    );
    assert!(report.tests.iter().all(|t| t.total_tokens == 0));
}

#[test]
fn a_usage_that_disagrees_with_the_stream_fails_by_name() {
    let (code, stderr, report) = run_against(Behaviour::Miscounted, "url-miscounted");
    assert_eq!(code, Some(4), "{stderr}");
    let want = "`usage` counts 4 completion tokens but 3 token chunks were streamed";
    assert_eq!(errors(&report.unwrap()), [(want.to_string(), 6)]);
}

#[test]
fn http_errors_are_counted_by_status_and_message() {
    let (code, stderr, report) = run_against(Behaviour::SomeErrors, "url-errors");
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("FAILED: 3 of 6 requests failed"), "{stderr}");
    let report = report.unwrap();
    assert_eq!(
        errors(&report),
        [
            ("HTTP 429: too many requests".to_string(), 1),
            ("HTTP 500: engine exploded".to_string(), 2)
        ]
    );
    let ok: usize = report.tests.iter().map(|t| t.requests - t.failed).sum();
    assert_eq!(ok, 3);
    assert_eq!(report.tests.iter().map(|t| t.total_tokens).sum::<usize>(), 3 * 4);
}

#[test]
fn a_stream_that_is_not_one_fails_by_name() {
    let (code, stderr, report) = run_against(Behaviour::GarbageStream, "url-garbage-stream");
    assert_eq!(code, Some(4), "{stderr}");
    let want = "not a server-sent event stream: line `this is not an event stream`";
    assert_eq!(errors(&report.unwrap()), [(want.to_string(), 6)]);
}

#[test]
fn a_model_list_that_is_not_json_is_a_named_error() {
    let (code, stderr, report) = run_against(Behaviour::GarbageModels, "url-garbage-models");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("/v1/models answered something that is not JSON")
            && stderr.contains("<html>hello</html>"),
        "{stderr}"
    );
    assert!(report.is_none(), "nothing is run or written");
}

#[test]
fn a_server_that_is_not_listening_is_a_named_error() {
    // A port that was free a moment ago and has nothing behind it now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out_dir = scratch_dir("url-down");
    let out = throughput_within(&quick(&url, out_dir.to_str().unwrap()), 60);
    let stderr = text(&out).1;
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the server at {url}")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A server that takes the connection and never answers: the timeout
/// turns the wait into a named error.
#[test]
fn a_silent_server_times_out_by_name() {
    // Connections complete in the kernel's backlog; nothing ever reads them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let out_dir = scratch_dir("url-silent");
    let mut args = quick(&url, out_dir.to_str().unwrap());
    let at = args.iter().position(|a| *a == "--http-timeout").unwrap();
    args[at + 1] = "1";
    let out = throughput_within(&args, 60);
    let stderr = text(&out).1;
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the server at {url}")) && stderr.contains("timeout"),
        "{stderr}"
    );
    drop(silent);
}

#[test]
fn a_wrong_key_is_a_named_error() {
    let mock = Mock::start(Behaviour::Good, Some("sekrit"));
    let out_dir = scratch_dir("url-key");
    let url = mock.url();
    let mut args = quick(&url, out_dir.to_str().unwrap());
    args.extend(["--api-key", "wrong"]);
    let out = throughput_within(&args, 60);
    let stderr = text(&out).1;
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/v1/models: HTTP 401: invalid api key"),
        "{stderr}"
    );
}

/// The in-process engine's flags make no sense for a server: refused by
/// name, before anything is sent.
#[test]
fn engine_flags_are_refused_with_url() {
    for flag in [
        vec!["--dtype", "bf16"],
        vec!["--mode", "batched"],
        vec!["--probe"],
        vec!["--profile"],
        vec!["--threads-per-request", "1"],
        vec!["--model", "gpt2"],
        vec!["--synthetic"],
        vec!["--prefix-cache-mib", "16"],
    ] {
        let mut args = vec!["--url", "http://127.0.0.1:9"];
        args.extend(&flag);
        let out = throughput_within(&args, 30);
        let stderr = text(&out).1;
        assert_eq!(out.status.code(), Some(2), "{flag:?}: {stderr}");
        assert!(
            stderr.contains(flag[0]) && stderr.contains("--url"),
            "{flag:?}: {stderr}"
        );
    }
    let out = throughput_within(&["--api-key", "k"], 30);
    assert_eq!(out.status.code(), Some(2), "--api-key needs --url");
    let out = throughput_within(&["--url", "https://127.0.0.1:9"], 30);
    let stderr = text(&out).1;
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("https is not supported"), "{stderr}");
}

fn testdata(name: &str) -> PathBuf {
    common::repo_root().join("tools/bench/src/testdata").join(name)
}

/// A server's report and two committed in-process ones (schemas 1 and 2)
/// in one table and one plot.
#[test]
fn compare_renders_every_report() {
    let mock = Mock::start(Behaviour::Good, None);
    let runs = scratch_dir("url-compare-runs");
    let url = mock.url();
    let mut args = quick(&url, runs.to_str().unwrap());
    args.extend(EASY_TARGETS);
    let out = throughput_within(&args, 120);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    let http = files_in(&runs, "json").remove(0);
    let (s1, s2) = (
        testdata("schema1_probe_report.json"),
        testdata("schema2_probe_report.json"),
    );
    let out_dir = scratch_dir("url-compare");
    let o = out_dir.to_str().unwrap();
    let compare = |files: &[&Path]| {
        let mut args = vec!["compare", "--out-dir", o];
        args.extend(files.iter().map(|p| p.to_str().unwrap()));
        throughput_within(&args, 60)
    };
    let out = compare(&[&http, &s1, &s2]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let md = std::fs::read_to_string(&files_in(&out_dir, "md")[0]).unwrap();
    assert_eq!(stdout, md, "the table is printed too");
    // Each report's curves, numbered, labelled by engine and mode.
    let rows: Vec<Vec<String>> = md
        .lines()
        .skip_while(|l| *l != "## Tokens/s by concurrency")
        .skip(4)
        .take_while(|l| l.starts_with("| "))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    let engines: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r[1].as_str(), r[2].as_str(), r[3].as_str()))
        .collect();
    assert_eq!(
        engines,
        [
            ("1", "mock mock-gpt2", "http"),
            ("2", "gpt2-rs", "threads"),
            ("2", "gpt2-rs", "batched"),
            ("3", "gpt2-rs", "threads"),
            ("3", "gpt2-rs", "batched")
        ],
        "{md}"
    );
    assert!(
        md.contains("SYNTHETIC"),
        "the committed reports' synthetic weights are named: {md}"
    );
    let svg = std::fs::read_to_string(&files_in(&out_dir, "svg")[0]).unwrap();
    let curves = rows.len();
    assert_eq!(svg.matches("<polyline").count(), curves, "{svg}");
    assert!(svg.contains("[1] mock mock-gpt2 http unknown"), "{svg}");

    // A second comparison in the same second gets its own files.
    let out = compare(&[&s1, &s2]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(files_in(&out_dir, "md").len(), 2);

    // Bad inputs are named, and nothing is written.
    let not_report = out_dir.join("not-a-report.json");
    std::fs::write(&not_report, r#"{"a": 1}"#).unwrap();
    let missing = out_dir.join("missing.json");
    for (file, needle) in [
        (&not_report, "not a throughput report"),
        (&missing, "missing.json"),
    ] {
        let out = compare(&[&s1, file]);
        let stderr = text(&out).1;
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
    assert_eq!(files_in(&out_dir, "md").len(), 2);
    let out = throughput_within(&["compare"], 30);
    assert_eq!(out.status.code(), Some(2), "no reports is a usage error");
}

/// The real `gpt2 serve` on the tiny synthetic model, killed on drop.
struct Serve {
    child: std::process::Child,
    url: String,
    /// Everything it printed on stderr so far (drained on a thread, so
    /// that its request log never fills the pipe).
    log: Arc<Mutex<String>>,
}

impl Serve {
    fn start(weights: &Path) -> Serve {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_gpt2"))
            .args(["serve", "--port", "0", "--threads", "1", "--weights"])
            .arg(weights)
            .env_remove("GPT2_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("gpt2 serve: listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
                sink.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let mut serve = Serve {
            child,
            url: String::new(),
            log,
        };
        serve.url = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no listening line: {}", serve.log.lock().unwrap()));
        serve
    }

    /// Waits (up to 2 minutes) until the weights are loaded: /v1/models answers 200.
    fn wait_ready(&self) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        for _ in 0..240 {
            if let Ok(r) = agent.get(format!("{}/v1/models", self.url)).call() {
                if r.status() == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("gpt2 serve never became ready: {}", self.log.lock().unwrap());
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `throughput --url` against the real server: every request exactly the
/// tokens asked, the server named with its dtype and synthetic weights.
#[test]
fn the_real_server_is_benchmarked() {
    let weights = common::synth_dir(gpt2::synth::Preset::Tiny, 0);
    let serve = Serve::start(&weights);
    serve.wait_ready();
    let out_dir = scratch_dir("url-real-serve");
    let mut args = quick(&serve.url, out_dir.to_str().unwrap());
    args.extend(EASY_TARGETS);
    args.extend(["--weights", weights.to_str().unwrap(), "--json"]);
    let out = throughput_within(&args, 240);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stderr}\nserver:\n{}",
        serve.log.lock().unwrap()
    );
    let report: gpt2_bench::Report = serde_json::from_str(&stdout).unwrap();
    let md = &report.metadata;
    let server = md.server.as_ref().unwrap();
    assert_eq!(server.owned_by.as_deref(), Some("gpt2-rs"));
    assert!(
        md.synthetic_weights,
        "gpt2 serve says its tiny weights are synthetic"
    );
    assert_eq!(md.dtypes[0].dtype, "f32");
    for t in &report.tests {
        assert_eq!((t.mode.as_str(), t.failed), ("http", 0), "{}", t.name);
        assert_eq!(t.total_tokens, t.requests * 4, "{}", t.name);
        assert!(t.raw.iter().all(|r| r.token_ms.len() == 4), "{}", t.name);
    }
}
