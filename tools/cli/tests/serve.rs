//! `gpt2 serve` over real HTTP on loopback, with the tiny synthetic model:
//! the binary on an ephemeral port for most tests; the library's `serve`
//! in-process where a test must hold the engine between steps (a gate on
//! the scheduler's step observer) or hold the weights back.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::server::{self, metric, post_json, post_raw, ServerProcess, PATIENCE};
use common::synth_dir;
use gpt2::scheduler::{StepObserver, StepStats};
use gpt2::synth::Preset;
use gpt2::tokenizer::Gpt2Tokenizer;
use gpt2::{GenerateOptions, Gpt2Model, Scheduler, SchedulerConfig, Session};
use gpt2_serve::{Engine, ServeConfig};
use serde_json::{json, Value};

const PROMPT: &str = "The quick brown fox jumps over";

fn tiny_dir() -> String {
    synth_dir(Preset::Tiny, 0).to_str().unwrap().to_string()
}

fn tiny_server(extra: &[&str]) -> ServerProcess {
    let dir = tiny_dir();
    let mut args = vec!["--weights", dir.as_str()];
    args.extend_from_slice(extra);
    ServerProcess::ready(&args, &[])
}

/// The greedy text of `prompt` in-process: a `Session`, then the tokenizer.
fn in_process_text(prompt: &str, max_tokens: usize) -> (usize, String) {
    let model = Gpt2Model::load_with(&synth_dir(Preset::Tiny, 0), gpt2::Dtype::F32).unwrap();
    let tok = Gpt2Tokenizer::builtin();
    let ids = tok.encode(prompt).unwrap();
    let opts = GenerateOptions::greedy(max_tokens);
    let generation = Session::new(&model, 16)
        .unwrap()
        .generate(&model, &ids, &opts, |_| {})
        .unwrap();
    // The scheduler gives the same tokens (tests/batching.rs); check it here too.
    let sched = Scheduler::new(Arc::new(model), SchedulerConfig::default()).unwrap();
    assert_eq!(
        sched.generate(ids.clone(), opts).unwrap().tokens,
        generation.tokens
    );
    (ids.len(), tok.decode(&generation.tokens).unwrap())
}

fn greedy(prompt: Value, max_tokens: usize, stream: bool) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": stream})
}

#[track_caller]
fn assert_error(reply: &server::Reply, status: u16, needles: &[&str]) {
    assert_eq!(reply.status, status, "{}", reply.text);
    let err = &reply.json["error"];
    let message = err["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {}", reply.text));
    assert!(
        err["type"].is_string() && err.get("code").is_some(),
        "{}",
        reply.text
    );
    for n in needles {
        assert!(message.contains(n), "{n:?} not in {message:?}");
    }
}

#[test]
fn greedy_stream_equals_whole_response_equals_in_process() {
    let server = tiny_server(&[]);
    let url = server.url("/v1/completions");
    let (prompt_tokens, want) = in_process_text(PROMPT, 20);

    let whole = post_json(&url, &greedy(json!(PROMPT), 20, false));
    assert_eq!(whole.status, 200, "{}", whole.text);
    let j = &whole.json;
    assert_eq!(j["object"], "text_completion");
    assert!(j["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")), "{j}");
    assert!(
        j["created"].as_u64().is_some() && j["model"] == "synth-tiny-0",
        "{j}"
    );
    let choice = &j["choices"][0];
    assert_eq!(
        (choice["index"].clone(), choice["logprobs"].clone()),
        (json!(0), Value::Null)
    );
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["text"].as_str().unwrap(), want);
    assert_eq!(
        j["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 20, "total_tokens": prompt_tokens + 20})
    );

    let streamed = server::stream(&url, &greedy(json!(PROMPT), 20, true), || {});
    assert_eq!(streamed.status, 200);
    assert!(streamed.done, "no [DONE]");
    // One chunk per generated token, then the one with the finish reason.
    assert_eq!(streamed.token_chunks().len(), 20);
    assert!(streamed
        .token_chunks()
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(streamed.last()["choices"][0]["finish_reason"], "length");
    // No `stream_options.include_usage`, no usage (issue 31, item 11).
    assert!(streamed.chunks.iter().all(|c| c.get("usage").is_none()));
    assert_eq!(streamed.text(), want);

    // Token ids give the same as the text they encode; the served `model` is
    // accepted (any other is a 404: issue 31, item 4).
    let ids = Gpt2Tokenizer::builtin().encode(PROMPT).unwrap();
    let mut body = greedy(json!(ids), 20, false);
    body["model"] = json!("synth-tiny-0");
    let by_ids = post_json(&url, &body);
    assert_eq!(by_ids.json["choices"][0]["text"].as_str().unwrap(), want);
    assert_eq!(by_ids.json["model"], "synth-tiny-0");

    let models = server::get(&server.url("/v1/models"), None);
    assert_eq!(models.status, 200);
    assert_eq!(models.json["object"], "list");
    assert_eq!(models.json["data"][0]["id"], "synth-tiny-0");
    assert_eq!(models.json["data"][0]["dtype"], "f32");
    // One log line per request, with its tokens.
    assert!(
        server
            .stderr()
            .contains("POST /v1/completions 200 ok prompt_tokens=6 generated_tokens=20"),
        "{}",
        server.stderr()
    );
}

#[test]
fn thirty_two_concurrent_streams_each_get_exactly_max_tokens() {
    let server = tiny_server(&["--max-batch", "32"]);
    let url = server.url("/v1/completions");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let url = &url;
                s.spawn(move || {
                    let body = json!({
                        "prompt": format!("Request number {i} says"),
                        "max_tokens": 24, "temperature": 0.8, "seed": i, "ignore_eos": true, "stream": true,
                    });
                    server::stream(url, &body, || {})
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in results.iter().enumerate() {
        assert!(r.status == 200 && r.done, "request {i}: status {}", r.status);
        assert_eq!(r.token_chunks().len(), 24, "request {i}");
        assert_eq!(r.last()["choices"][0]["finish_reason"], "length", "request {i}");
    }
    let m = server::get(&server.url("/metrics"), None).text;
    assert!(
        metric(&m, "gpt2_generated_tokens_total").unwrap() >= 32.0 * 24.0,
        "{m}"
    );
    let ok = r#"gpt2_requests_total{outcome="ok",route="/v1/completions",status="200"}"#;
    assert_eq!(metric(&m, ok), Some(32.0), "{m}");
    assert_eq!(metric(&m, "gpt2_active_sequences"), Some(0.0), "{m}");
}

#[test]
fn every_bad_request_gets_its_status_and_names_the_problem() {
    let server = tiny_server(&["--max-body-bytes", "4096"]);
    let url = server.url("/v1/completions");
    let post = |body: Value| post_json(&url, &body);

    let r = post(json!({"prompt": "a", "best_of_three": 2}));
    assert_error(&r, 400, &["best_of_three"]);
    assert_eq!(r.json["error"]["param"], "best_of_three");
    assert_error(
        &post(json!({"prompt": "a", "temperature": -0.5})),
        400,
        &["temperature"],
    );
    assert_error(&post(json!({"prompt": "a", "top_p": 1.5})), 400, &["top_p"]);
    assert_error(
        &post(json!({"prompt": "a", "max_tokens": 0})),
        400,
        &["max_tokens"],
    );
    assert_error(&post(json!({"prompt": "a", "n": 0})), 400, &["n"]);
    // No-op values of fields clients send by default are fine.
    let fine = post(
        json!({"prompt": "a", "max_tokens": 2, "n": 1, "echo": false, "logprobs": null,
                           "user": "me", "stream_options": {"include_usage": true}}),
    );
    assert_eq!(fine.status, 200, "{}", fine.text);
    // Past the context window (128 positions): both lengths are named.
    let r = post(json!({"prompt": vec![1u32; 120], "max_tokens": 20}));
    assert_error(&r, 400, &["128", "120 prompt tokens", "20 max_tokens"]);
    let r = post(json!({"prompt": vec![1u32; 200]}));
    assert_error(&r, 400, &["128", "200 prompt tokens"]);
    // A token id past the vocabulary.
    assert_error(&post(json!({"prompt": [1, 60000]})), 400, &["60000", "50257"]);
    assert_error(
        &post_raw(&url, "application/json", "{\"prompt\": "),
        400,
        &["JSON"],
    );
    assert_error(
        &post_raw(&url, "text/plain", r#"{"prompt": "a"}"#),
        400,
        &["Content-Type"],
    );
    let big = json!({"prompt": "x".repeat(10_000)});
    assert_error(&post(big), 413, &["4096"]);
    let r = server::get(&server.url("/v2/nothing"), None);
    assert_error(&r, 404, &["/v2/nothing"]);
    let r = post_json(&server.url("/health"), &json!({}));
    assert_error(&r, 405, &["/health"]);
    let m = server::get(&server.url("/metrics"), None).text;
    let bad = r#"gpt2_requests_total{outcome="invalid_request",route="/v1/completions",status="400"}"#;
    assert!(metric(&m, bad).unwrap() >= 5.0, "{m}");
}

#[test]
fn api_key_guards_everything_but_health() {
    let dir = tiny_dir();
    let server = ServerProcess::ready(&["--weights", &dir], &[("GPT2_API_KEY", "s3cret")]);
    assert_eq!(server::get(&server.url("/health"), None).status, 200);
    assert_error(
        &server::get(&server.url("/v1/models"), None),
        401,
        &["Authorization"],
    );
    assert_error(
        &server::get(&server.url("/v1/models"), Some("wrong")),
        401,
        &["invalid API key"],
    );
    assert_error(
        &server::get(&server.url("/metrics"), Some("s3cre")),
        401,
        &["invalid API key"],
    );
    assert_eq!(server::get(&server.url("/v1/models"), Some("s3cret")).status, 200);
    let r = server::agent()
        .post(server.url("/v1/completions"))
        .header("Content-Type", "application/json")
        .header("Authorization", "Bearer s3cret")
        .send(greedy(json!("Hi"), 3, false).to_string())
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    // One sequence at a time, so the later requests are still queued or
    // running when the signal comes.
    let mut server = tiny_server(&["--max-batch", "1", "--grace-seconds", "100"]);
    let url = server.url("/v1/completions");
    let started = std::sync::Barrier::new(9);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (url, started) = (&url, &started);
                s.spawn(move || {
                    server::stream(url, &greedy(json!(PROMPT), 100, true), || {
                        started.wait();
                    })
                })
            })
            .collect();
        started.wait();
        server.terminate();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert!(r.status == 200 && r.done, "status {}", r.status);
        assert_eq!(r.token_chunks().len(), 100);
    }
    let status = server.wait();
    let log = server.stderr();
    assert!(status.success(), "{status}: {log}");
    let in_flight: usize = log
        .split("shutting down: no new connections; ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no shutdown line: {log}"));
    assert!(in_flight >= 1, "{log}");
}

#[test]
fn stop_strings_end_the_text_before_them() {
    let server = tiny_server(&[]);
    let url = server.url("/v1/completions");
    let (_, full) = in_process_text(PROMPT, 40);
    // A stop string from the middle of the greedy text.
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    let (from, to) = (chars[chars.len() / 2].0, chars[chars.len() / 2 + 3].0);
    let stop = &full[from..to];
    let want = &full[..full.find(stop).unwrap()];
    let mut body = greedy(json!(PROMPT), 40, false);
    body["stop"] = json!(["never in this text \u{1}", stop]);
    let whole = post_json(&url, &body);
    assert_eq!(whole.status, 200, "{}", whole.text);
    assert_eq!(whole.json["choices"][0]["text"].as_str().unwrap(), want);
    assert_eq!(whole.json["choices"][0]["finish_reason"], "stop");
    let used = whole.json["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(used < 40, "{used}");
    body["stream"] = json!(true);
    let streamed = server::stream(&url, &body, || {});
    assert_eq!(streamed.text(), want);
    assert!(streamed
        .chunks
        .iter()
        .all(|c| !c["choices"][0]["text"].as_str().unwrap().contains(stop)));
    assert_eq!(streamed.last()["choices"][0]["finish_reason"], "stop");
    assert_eq!(streamed.token_chunks().len() as u64, used);
    // The sequence was cancelled, so no slot stays taken (the engine sees
    // the cancellation at its next step).
    let start = Instant::now();
    loop {
        let m = server::get(&server.url("/metrics"), None).text;
        if metric(&m, "gpt2_active_sequences") == Some(0.0) {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "a stopped sequence stays active:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- in-process: the engine held between steps ----

/// Holds the engine after each step until a permit is given (or it is open).
#[derive(Debug)]
struct Gate {
    /// The server's own observer (its step-time metric), set at load.
    inner: std::sync::OnceLock<Arc<dyn StepObserver>>,
    state: Mutex<(bool, usize)>,
    cv: Condvar,
}

impl Gate {
    fn closed() -> Arc<Self> {
        Arc::new(Gate {
            inner: std::sync::OnceLock::new(),
            state: Mutex::new((false, 0)),
            cv: Condvar::new(),
        })
    }

    fn open(&self) {
        self.state.lock().unwrap().0 = true;
        self.cv.notify_all();
    }

    fn permit(&self) {
        self.state.lock().unwrap().1 += 1;
        self.cv.notify_all();
    }
}

impl StepObserver for Gate {
    fn on_step(&self, step: &StepStats) {
        if let Some(inner) = self.inner.get() {
            inner.on_step(step);
        }
        let mut st = self.state.lock().unwrap();
        while !st.0 && st.1 == 0 {
            st = self.cv.wait(st).unwrap();
        }
        if !st.0 {
            st.1 -= 1;
        }
    }
}

/// `gpt2_serve::serve` on its own runtime thread; stopped and joined on drop.
struct InProcess {
    base: String,
    gate: Arc<Gate>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The tiny model behind a server; `before_load` runs first (e.g. waits),
/// `fault_token` makes the engine fail any step that carries it.
fn start(
    config: ServeConfig,
    gated: bool,
    fault_token: Option<u32>,
    before_load: impl FnOnce() + Send + 'static,
) -> InProcess {
    let gate = Gate::closed();
    if !gated {
        gate.open();
    }
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let engine_gate = Arc::clone(&gate);
    let load = move |mut sc: SchedulerConfig| {
        before_load();
        let model = Arc::new(Gpt2Model::load_with(
            &synth_dir(Preset::Tiny, 0),
            gpt2::Dtype::F32,
        )?);
        // The gate passes every step on to the server's own observer.
        if let Some(inner) = sc.observer.take() {
            let _ = engine_gate.inner.set(inner);
        }
        sc.observer = Some(engine_gate as Arc<dyn StepObserver>);
        sc.fault_token = fault_token;
        Ok(Engine {
            scheduler: Scheduler::new(model, sc)?,
            tokenizer: Gpt2Tokenizer::builtin(),
            model_id: "tiny".into(),
            weights: "SYNTHETIC tiny checkpoint (random weights)".into(),
            synthetic: true,
        })
    };
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let stopped = async move {
                let _ = stop_rx.await;
            };
            gpt2_serve::serve(listener, config, load, stopped).await.unwrap();
        });
        rt.shutdown_timeout(Duration::from_secs(5));
    });
    let addr = addr_rx.recv_timeout(PATIENCE).expect("the server binds");
    InProcess {
        base: format!("http://{addr}"),
        gate,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

impl InProcess {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn metrics(&self) -> String {
        server::get(&self.url("/metrics"), None).text
    }

    /// Waits until `/metrics` satisfies `ok`, giving the engine one step per poll.
    fn step_until(&self, what: &str, ok: impl Fn(&str) -> bool) {
        let start = Instant::now();
        loop {
            let m = self.metrics();
            if ok(&m) {
                return;
            }
            assert!(start.elapsed() < PATIENCE, "never {what}:\n{m}");
            self.gate.permit();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.gate.open();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn small_config(max_batch: usize, max_queue: usize) -> ServeConfig {
    ServeConfig {
        max_batch,
        max_queue,
        // Its own pool, so a held engine holds none of another test's threads.
        pool: Some(Arc::new(
            rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap(),
        )),
        grace: Duration::from_secs(1),
        ..ServeConfig::default()
    }
}

/// Sends a completion request on a raw socket (so the test decides when the
/// connection closes) and returns the socket's reader.
fn raw_request(base: &str, body: &Value) -> BufReader<TcpStream> {
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    BufReader::new(s)
}

/// A streamed request for `tokens` tokens, read up to its first token
/// (on a gated server, the engine is held after that step).
fn held_stream(base: &str, tokens: usize) -> BufReader<TcpStream> {
    let mut conn = raw_request(base, &greedy(json!(PROMPT), tokens, true));
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(conn.read_line(&mut line).unwrap() > 0, "the stream ended early");
    }
    conn
}

const CANCELLED: &str = r#"gpt2_requests_total{outcome="cancelled",route="/v1/completions",status="200"}"#;

#[test]
fn a_dropped_stream_frees_its_slot() {
    let server = start(small_config(4, 4), true, None, || {});
    server::wait_healthy(&server.base);
    // The first token arrives; the engine is held after that step.
    let conn = held_stream(&server.base, 100);
    assert_eq!(metric(&server.metrics(), "gpt2_active_sequences"), Some(1.0));
    drop(conn);
    server.step_until("cancelled", |m| {
        metric(m, CANCELLED) == Some(1.0) && metric(m, "gpt2_active_sequences") == Some(0.0)
    });
    let m = server.metrics();
    assert!(metric(&m, "gpt2_generated_tokens_total").unwrap() < 100.0, "{m}");
    assert_eq!(metric(&m, "gpt2_requests_in_flight"), Some(0.0), "{m}");
}

#[test]
fn a_dropped_request_frees_its_slot() {
    let server = start(small_config(4, 4), true, None, || {});
    server::wait_healthy(&server.base);
    let conn = raw_request(&server.base, &greedy(json!(PROMPT), 100, false));
    server.step_until("admitted", |m| metric(m, "gpt2_active_sequences") == Some(1.0));
    drop(conn);
    // The client left before any response: logged as 499, counted cancelled.
    let cancelled = r#"gpt2_requests_total{outcome="cancelled",route="/v1/completions",status="499"}"#;
    server.step_until("cancelled", |m| {
        metric(m, cancelled) == Some(1.0) && metric(m, "gpt2_active_sequences") == Some(0.0)
    });
    assert!(metric(&server.metrics(), "gpt2_generated_tokens_total").unwrap() < 100.0);
}

#[test]
fn past_max_batch_plus_max_queue_is_429() {
    let server = start(small_config(1, 0), true, None, || {});
    server::wait_healthy(&server.base);
    let url = server.url("/v1/completions");
    let mut first = raw_request(&server.base, &greedy(json!(PROMPT), 10, true));
    let mut line = String::new();
    first.read_line(&mut line).unwrap();
    assert!(line.contains("200"), "{line}");
    let r = post_json(&url, &greedy(json!(PROMPT), 10, false));
    assert_error(&r, 429, &["max_batch 1", "max_queue 0"]);
    server.gate.open();
    let mut rest = String::new();
    while !rest.contains("[DONE]") {
        assert!(first.read_line(&mut rest).unwrap() > 0, "the stream ended early");
    }
    drop(first);
    server.step_until("freed", |m| metric(m, "gpt2_requests_in_flight") == Some(0.0));
    assert_eq!(post_json(&url, &greedy(json!(PROMPT), 3, false)).status, 200);
}

#[test]
fn an_engine_failure_fails_only_its_request() {
    let fault = 31337;
    let server = start(small_config(4, 4), false, Some(fault), || {});
    server::wait_healthy(&server.base);
    let url = server.url("/v1/completions");
    let (bad, good) = std::thread::scope(|s| {
        let bad = s.spawn(|| post_json(&url, &greedy(json!([464, fault, 318]), 8, false)));
        let good = s.spawn(|| post_json(&url, &greedy(json!(PROMPT), 8, false)));
        (bad.join().unwrap(), good.join().unwrap())
    });
    assert_error(&bad, 500, &["injected fault"]);
    assert_eq!(good.status, 200, "{}", good.text);
    assert_eq!(good.json["usage"]["completion_tokens"], 8);
    let streamed = server::stream(&url, &greedy(json!([fault]), 4, true), || {});
    assert!(
        streamed.done && streamed.last()["error"]["message"].is_string(),
        "{:?}",
        streamed.chunks
    );
    assert_eq!(server::get(&server.url("/health"), None).status, 200);
}

#[test]
fn health_is_503_until_the_weights_are_loaded() {
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let server = start(small_config(4, 4), false, None, move || {
        let _ = release_rx.recv();
    });
    assert_error(&server::get(&server.url("/health"), None), 503, &["loading"]);
    assert_error(
        &post_json(&server.url("/v1/completions"), &greedy(json!("a"), 2, false)),
        503,
        &["loading"],
    );
    assert_eq!(server::get(&server.url("/metrics"), None).status, 200);
    release_tx.send(()).unwrap();
    server::wait_healthy(&server.base);
    assert_eq!(
        post_json(&server.url("/v1/completions"), &greedy(json!("a"), 2, false)).status,
        200
    );
}

#[test]
fn requests_past_the_grace_period_are_cancelled() {
    let config = ServeConfig {
        grace: Duration::from_millis(200),
        ..small_config(4, 4)
    };
    let mut server = start(config, true, None, || {});
    server::wait_healthy(&server.base);
    let mut conn = held_stream(&server.base, 100);
    // Shut down while the engine is held: the request cannot finish in time.
    server.stop.take().expect("running").send(()).unwrap();
    let mut rest = String::new();
    while matches!(conn.read_line(&mut rest), Ok(n) if n > 0) {}
    // Ended by the server: an error event, then `[DONE]` (issue 31, item 5).
    let (error, done) = (rest.find(r#""code":"shutdown""#), rest.find("data: [DONE]"));
    assert!(error.is_some() && done.is_some() && error < done, "{rest}");
    let serve = server.thread.take().expect("running").join();
    assert!(serve.is_ok(), "serve failed");
}

#[test]
fn after_the_signal_health_is_503_while_requests_are_still_served_for_the_drain() {
    let config = ServeConfig {
        drain: Duration::from_secs(3),
        grace: Duration::from_secs(30),
        ..small_config(4, 4)
    };
    let mut server = start(config, true, None, || {});
    server::wait_healthy(&server.base);
    // A request in flight when the signal comes, held after its first token.
    let mut conn = held_stream(&server.base, 50);
    server.stop.take().expect("running").send(()).unwrap();
    let start = Instant::now();
    let health = loop {
        let h = server::get(&server.url("/health"), None);
        if h.status != 200 || start.elapsed() > PATIENCE {
            break h;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_error(&health, 503, &["shutting down", "finishing: 1"]);
    assert_eq!(server::metric(&server.metrics(), "gpt2_draining"), Some(1.0));
    // During the drain a new request is still taken and served whole.
    server.gate.open();
    let late = post_json(&server.url("/v1/completions"), &greedy(json!("a"), 5, false));
    assert_eq!(late.status, 200, "{}", late.text);
    assert_eq!(late.json["usage"]["completion_tokens"], 5);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "the drain was over before the check"
    );
    // And the one in flight finishes.
    let mut rest = String::new();
    while matches!(conn.read_line(&mut rest), Ok(n) if n > 0) {}
    assert!(rest.contains("data: [DONE]"), "{rest}");
    let serve = server.thread.take().expect("running").join();
    assert!(serve.is_ok(), "serve failed");
    // Stopped listening after the drain.
    assert!(TcpStream::connect(server.base.trim_start_matches("http://")).is_err());
}

#[test]
fn bad_flags_are_refused_by_name() {
    let dir = tiny_dir();
    for (flag, value) in [
        ("--max-batch", "0"),
        ("--threads", "0"),
        ("--grace-seconds", "-1"),
        ("--drain-seconds", "nan"),
        ("--header-timeout-seconds", "0"),
        ("--body-timeout-seconds", "nan"),
        ("--write-stall-seconds", "-1"),
        ("--max-connections", "0"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpt2"))
            .args([
                "serve",
                "--port",
                "0",
                "--weights",
                &dir,
                &format!("{flag}={value}"),
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(flag), "{flag}: {stderr}");
    }
}
