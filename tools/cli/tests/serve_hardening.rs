//! `gpt2 serve` against clients that are not well behaved (issue 31): huge
//! prompts, partial headers, idle and over-the-limit connections, streams
//! nobody reads, the end of the grace period; and the smaller protocol
//! points (`model`, `Retry-After`, f32 ranges, `include_usage`, ...).
//! Every server binds loopback on an ephemeral port and is stopped on drop.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::in_process::{Checkpoint, InProcess};
use common::server::{self, metric, post_json, post_raw, ServerProcess, PATIENCE};
use common::{scratch_dir, synth_dir};
use gpt2::synth::Preset;
use gpt2_serve::ServeConfig;
use serde_json::{json, Value};

fn tiny_dir() -> String {
    synth_dir(Preset::Tiny, 0).to_str().unwrap().to_string()
}

fn tiny_server(extra: &[&str]) -> ServerProcess {
    let dir = tiny_dir();
    let mut args = vec!["--weights", dir.as_str()];
    args.extend_from_slice(extra);
    ServerProcess::ready(&args, &[])
}

fn greedy(prompt: Value, max_tokens: usize, stream: bool) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": stream})
}

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// A raw connection with a read timeout of `PATIENCE`.
fn connect(base: &str) -> TcpStream {
    let s = TcpStream::connect(addr(base)).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

/// Reads until the server closes the connection; returns what came and
/// how long it took. A read that times out fails the test.
fn read_to_close(s: &mut TcpStream) -> (String, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection was not closed: {e} after {:?}", start.elapsed()),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
}

// ---- item 1: CPU work off the async threads ----

#[test]
fn health_answers_at_once_while_megabyte_prompts_are_refused() {
    let server = tiny_server(&[]);
    let url = server.url("/v1/completions");
    // 1,000,000 digits: tokenizing it took 0.4-0.6 s inside the handler.
    let huge = json!({"prompt": "7".repeat(1_000_000), "max_tokens": 1}).to_string();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (worst, refused) = std::thread::scope(|s| {
        let senders: Vec<_> = (0..8)
            .map(|_| {
                let (url, huge, done) = (&url, &huge, &done);
                s.spawn(move || {
                    let mut replies = Vec::new();
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        replies.push(post_raw(url, "application/json", huge));
                    }
                    replies
                })
            })
            .collect();
        // Let the first prompts arrive, then time /health among them.
        std::thread::sleep(Duration::from_millis(300));
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let t = Instant::now();
            assert_eq!(server::get(&server.url("/health"), None).status, 200);
            worst = worst.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(50));
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let refused: Vec<server::Reply> = senders.into_iter().flat_map(|h| h.join().unwrap()).collect();
        (worst, refused)
    });
    assert!(!refused.is_empty());
    for r in &refused {
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(r.json["error"]["param"], "prompt", "{}", r.text);
        assert_eq!(r.json["error"]["code"], "context_length_exceeded", "{}", r.text);
    }
    eprintln!(
        "slowest /health: {worst:?} among {} refused prompts",
        refused.len()
    );
    // The handler no longer does the work: /health waits for nothing but a
    // free runtime thread (milliseconds); 500 ms is a slow, shared machine's margin.
    assert!(
        worst < Duration::from_millis(500),
        "/health took {worst:?} while {} megabyte prompts were refused",
        refused.len()
    );
}

#[test]
fn a_prompt_just_under_the_cap_is_tokenized_and_judged_by_its_tokens() {
    let server = tiny_server(&[]);
    let url = server.url("/v1/completions");
    // 128 positions; " the" is one token: 200 of them are too many tokens,
    // but few enough bytes to be tokenized and counted.
    let r = post_json(&url, &json!({"prompt": " the".repeat(200), "max_tokens": 1}));
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("200 prompt tokens"),
        "{}",
        r.text
    );
}

// ---- item 2: connection timeouts and limits ----

#[test]
fn partial_headers_and_idle_connections_are_closed_after_the_header_timeout() {
    let server = tiny_server(&["--header-timeout-seconds", "1"]);
    // A partial header.
    let mut partial = connect(&server.base);
    partial.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    // A connection that sends nothing.
    let mut silent = connect(&server.base);
    // A keep-alive connection, idle after one answered request.
    let mut idle = connect(&server.base);
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    for (what, conn) in [
        ("partial", &mut partial),
        ("silent", &mut silent),
        ("idle", &mut idle),
    ] {
        let (_, waited) = read_to_close(conn);
        // Within the 1 s timeout, and a generous margin for a slow machine.
        assert!(
            waited < Duration::from_secs(10),
            "{what}: closed after {waited:?}"
        );
    }
    assert_eq!(server::get(&server.url("/health"), None).status, 200);
}

#[test]
fn an_oversized_expect_continue_gets_413_without_sending_the_body() {
    let server = tiny_server(&["--max-body-bytes", "4096", "--body-timeout-seconds", "1"]);
    let mut s = connect(&server.base);
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 5000000\r\nExpect: 100-continue\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    // A body that stops half way gets 408 after the body timeout.
    let mut slow = connect(&server.base);
    write!(
        slow,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"prompt\": "
    )
    .unwrap();
    let (answer, waited) = read_to_close(&mut slow);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
}

#[test]
fn connections_past_the_cap_get_503_with_retry_after() {
    let server = tiny_server(&["--max-connections", "3"]);
    let held: Vec<TcpStream> = (0..3).map(|_| connect(&server.base)).collect();
    // The three are accepted before the fourth comes.
    let start = Instant::now();
    loop {
        let mut extra = connect(&server.base);
        let (answer, _) = read_to_close(&mut extra);
        if answer.starts_with("HTTP/1.1 503") {
            assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
            assert!(answer.contains("too_many_connections"), "{answer}");
            break;
        }
        assert!(start.elapsed() < PATIENCE, "never refused: {answer}");
    }
    drop(held);
    let start = Instant::now();
    while !matches!(server::agent().get(server.url("/health")).call(), Ok(r) if r.status() == 200) {
        assert!(start.elapsed() < PATIENCE, "the slots were not freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = server::get(&server.url("/metrics"), None).text;
    assert!(
        metric(&m, "gpt2_connections_refused_total").unwrap() >= 1.0,
        "{m}"
    );
}

// ---- item 4: `model` ----

#[test]
fn only_the_served_model_is_accepted_retrieved_and_echoed() {
    let server = tiny_server(&[]);
    let url = server.url("/v1/completions");
    let mut body = greedy(json!("Hi"), 3, false);
    body["model"] = json!("gpt-4");
    let r = post_json(&url, &body);
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.json["error"]["code"], "model_not_found", "{}", r.text);
    assert_eq!(r.json["error"]["type"], "invalid_request_error", "{}", r.text);
    assert_eq!(r.json["error"]["param"], "model", "{}", r.text);
    // A long name is not echoed back whole.
    body["model"] = json!("m".repeat(100_000));
    let r = post_json(&url, &body);
    assert_eq!(r.status, 404);
    assert!(r.text.len() < 1000, "{} bytes", r.text.len());
    // The served name works, and is what every chunk says.
    body["model"] = json!("synth-tiny-0");
    body["stream"] = json!(true);
    let streamed = server::stream(&url, &body, || {});
    assert!(streamed.done && streamed.chunks.iter().all(|c| c["model"] == "synth-tiny-0"));
    let one = server::get(&server.url("/v1/models/synth-tiny-0"), None);
    assert_eq!(one.status, 200, "{}", one.text);
    assert_eq!(
        (one.json["id"].clone(), one.json["object"].clone()),
        (json!("synth-tiny-0"), json!("model"))
    );
    let none = server::get(&server.url("/v1/models/gpt-4"), None);
    assert_eq!(none.status, 404);
    assert_eq!(none.json["error"]["code"], "model_not_found");
}

// ---- items 8 and 11 ----

#[test]
fn values_that_32_bit_floats_cannot_hold_are_refused_by_name() {
    let server = tiny_server(&[]);
    let url = server.url("/v1/completions");
    for (field, value) in [
        ("temperature", json!(1e39)),
        ("temperature", json!(1e-50)),
        ("top_p", json!(1e-50)),
        ("repetition_penalty", json!(1e-300)),
        ("repetition_penalty", json!(1e39)),
    ] {
        let mut body = greedy(json!("Hi"), 2, false);
        body[field] = value.clone();
        let r = post_json(&url, &body);
        assert_eq!(r.status, 400, "{field}={value}: {}", r.text);
        assert_eq!(r.json["error"]["param"], field, "{}", r.text);
    }
}

#[test]
fn content_type_bearer_scheme_usage_and_a_full_context() {
    let dir = tiny_dir();
    let server = ServerProcess::ready(&["--weights", &dir], &[("GPT2_API_KEY", "k3y")]);
    let url = server.url("/v1/completions");
    let post = |content_type: &str, auth: &str, body: &Value| {
        let r = server::agent()
            .post(&url)
            .header("Content-Type", content_type)
            .header("Authorization", auth)
            .send(body.to_string())
            .unwrap();
        r.status().as_u16()
    };
    let body = greedy(json!("Hi"), 2, false);
    assert_eq!(post("application/jsonfoo", "Bearer k3y", &body), 400);
    assert_eq!(post("application/json-seq", "Bearer k3y", &body), 400);
    assert_eq!(post("application/json; charset=utf-8", "Bearer k3y", &body), 200);
    assert_eq!(post("Application/JSON", "bearer k3y", &body), 200);
    assert_eq!(post("application/json", "BEARER k3y", &body), 200);
    assert_eq!(post("application/json", "Basic k3y", &body), 401);

    // A stream carries `usage` only with include_usage, in a chunk of its own.
    let stream = |options: Value| {
        let mut body = greedy(json!("Hi"), 4, true);
        body["stream_options"] = options;
        let r = server::agent()
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Authorization", "Bearer k3y")
            .send(body.to_string())
            .unwrap();
        let status = r.status().as_u16();
        let mut text = String::new();
        r.into_body().into_reader().read_to_string(&mut text).unwrap();
        server::parse_sse(status, &text)
    };
    for options in [Value::Null, json!({}), json!({"include_usage": false})] {
        let s = stream(options.clone());
        assert!(s.done, "{options}");
        assert!(
            s.chunks.iter().all(|c| c.get("usage").is_none()),
            "{options}: {:?}",
            s.chunks
        );
        assert_eq!(s.last()["choices"][0]["finish_reason"], "length");
    }
    let s = stream(json!({"include_usage": true}));
    let (usage, rest) = s.chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]), "{usage}");
    assert_eq!(usage["usage"]["completion_tokens"], 4, "{usage}");
    assert!(
        rest.iter()
            .all(|c| c["usage"].is_null() && c.get("usage").is_some()),
        "{rest:?}"
    );
    assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], "length");

    // A prompt filling the 128 positions still gets its one next token.
    let full = json!({"prompt": vec![464u32; 128], "max_tokens": 1, "temperature": 0});
    let r = server::agent()
        .post(&url)
        .header("Content-Type", "application/json")
        .header("Authorization", "Bearer k3y")
        .send(full.to_string())
        .unwrap();
    assert_eq!(r.status(), 200);
    let over = json!({"prompt": vec![464u32; 128], "max_tokens": 2});
    assert_eq!(post("application/json", "Bearer k3y", &over), 400);
}

#[test]
fn a_failed_load_does_not_promise_a_grace_period() {
    let empty = scratch_dir("serve-hardening-empty-weights");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(["serve", "--port", "0", "--weights", empty.to_str().unwrap()])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("config.json"), "{stderr}");
    assert!(!stderr.contains("to finish"), "{stderr}");
}

// ---- in-process: a long-context tiny model, the engine held at will ----

/// The tiny checkpoint with 1024 positions (its `wpe` rows repeated), so a
/// stream can outgrow the socket buffers.
fn long_context_dir() -> PathBuf {
    use safetensors::tensor::TensorView;
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("synth-tiny-1024-positions");
    if dir.join("config.json").exists() {
        return dir;
    }
    let src = synth_dir(Preset::Tiny, 0);
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut wpe = Vec::new();
    let tensors: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| !name.ends_with("wpe.weight"))
        .collect();
    let (wpe_name, view) = st
        .tensors()
        .into_iter()
        .find(|(name, _)| name.ends_with("wpe.weight"))
        .unwrap();
    for _ in 0..8 {
        wpe.extend_from_slice(view.data());
    }
    let mut all = tensors;
    all.push((
        wpe_name,
        TensorView::new(view.dtype(), vec![1024, 64], &wpe).unwrap(),
    ));
    safetensors::serialize_to_file(all, None, &dir.join("model.safetensors")).unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["n_positions"] = json!(1024);
    config["n_ctx"] = json!(1024);
    config.as_object_mut().unwrap().remove("gpt2_rs_synthetic");
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

/// `gpt2_serve::serve` on the long-context tiny model, on its own runtime
/// thread, the engine held at will; its listener's send buffer set to
/// `send_buffer` bytes (accepted sockets inherit it) when given.
fn start(config: ServeConfig, send_buffer: Option<u32>) -> InProcess {
    let checkpoint = Checkpoint {
        dir: long_context_dir(),
        model_id: "tiny-1024",
        weights: "SYNTHETIC tiny checkpoint, 1024 positions",
    };
    InProcess::start(checkpoint, config, send_buffer)
}

fn config(max_batch: usize, max_queue: usize) -> ServeConfig {
    ServeConfig {
        max_batch,
        max_queue,
        pool: Some(Arc::new(
            rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap(),
        )),
        ..ServeConfig::default()
    }
}

/// A client socket with a small receive buffer, connected to `base`.
fn small_window_client(base: &str) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr: std::net::SocketAddr = addr(base).parse().unwrap();
    let s = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(1024).unwrap();
        socket.connect(addr).await.unwrap()
    });
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

fn send_request(s: &mut TcpStream, body: &Value) {
    let body = body.to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
}

const STALLED: &str = r#"gpt2_requests_total{outcome="write_stalled",route="/v1/completions",status="200"}"#;

#[test]
fn a_stream_nobody_reads_is_cancelled_after_the_write_stall_timeout() {
    let server = start(
        ServeConfig {
            write_stall: Duration::from_secs(1),
            ..config(1, 0)
        },
        Some(4096),
    );
    let mut reader = small_window_client(&server.base);
    send_request(&mut reader, &greedy(json!("a"), 1000, true));
    // It never reads. Its slot is the only one: another request is refused...
    server.wait_for("admitted", PATIENCE, |m| {
        metric(m, "gpt2_requests_in_flight") == Some(1.0)
    });
    let refused = post_json(&server.url("/v1/completions"), &greedy(json!("b"), 2, false));
    assert_eq!(refused.status, 429, "{}", refused.text);
    // ...until the stall timeout (1 s, after the buffers fill) frees it.
    server.wait_for("stalled", Duration::from_secs(60), |m| {
        metric(m, STALLED) == Some(1.0) && metric(m, "gpt2_requests_in_flight") == Some(0.0)
    });
    let m = server.metrics();
    assert!(metric(&m, "gpt2_generated_tokens_total").unwrap() < 1000.0, "{m}");
    let ok = post_json(&server.url("/v1/completions"), &greedy(json!("b"), 2, false));
    assert_eq!(ok.status, 200, "{}", ok.text);
    // And its connection was closed: reading it now ends.
    let (text, _) = read_to_close(&mut reader);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(!text.contains("[DONE]"));
}

#[test]
fn a_stream_longer_than_the_header_timeout_is_not_cut() {
    let server = start(
        ServeConfig {
            header_timeout: Duration::from_millis(300),
            ..config(2, 2)
        },
        None,
    );
    server.hold(true);
    let url = server.url("/v1/completions");
    let (released, streamed) = std::thread::scope(|s| {
        let h = s.spawn(|| server::stream(&url, &greedy(json!("a"), 20, true), || {}));
        // Held for three header timeouts while its response is open.
        std::thread::sleep(Duration::from_secs(1));
        server.hold(false);
        (true, h.join().unwrap())
    });
    assert!(released && streamed.done, "{:?}", streamed.chunks);
    // 20 token chunks and the closing one.
    assert_eq!(streamed.chunks.len(), 21);
    assert_eq!(streamed.last()["choices"][0]["finish_reason"], "length");
}

#[test]
fn retry_after_on_429() {
    let server = start(config(1, 0), None);
    server.hold(true);
    let mut first = connect(&server.base);
    send_request(&mut first, &greedy(json!("a"), 5, true));
    server.wait_for("admitted", PATIENCE, |m| {
        metric(m, "gpt2_requests_in_flight") == Some(1.0)
    });
    let r = server::agent()
        .post(server.url("/v1/completions"))
        .header("Content-Type", "application/json")
        .send(greedy(json!("b"), 2, false).to_string())
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    server.hold(false);
    drop(first);
}

#[test]
fn at_the_end_of_the_grace_period_requests_get_503_and_streams_an_error_then_done() {
    let mut server = start(
        ServeConfig {
            grace: Duration::from_millis(500),
            ..config(1, 4)
        },
        None,
    );
    server.hold(true);
    // A stream, held after its first token...
    let mut streamed = BufReader::new(connect(&server.base));
    send_request(streamed.get_mut(), &greedy(json!("a"), 100, true));
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(streamed.read_line(&mut line).unwrap() > 0);
    }
    // ...and a whole request queued behind it.
    let mut whole = connect(&server.base);
    send_request(&mut whole, &greedy(json!("b"), 5, false));
    server.wait_for("queued", PATIENCE, |m| {
        metric(m, "gpt2_requests_in_flight") == Some(2.0)
    });
    server.signal_stop();
    let (answer, waited) = read_to_close(&mut whole);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
    assert!(answer.contains(r#""code":"shutdown""#), "{answer}");
    assert!(waited < Duration::from_secs(30), "{waited:?}");
    let mut rest = String::new();
    while matches!(streamed.read_line(&mut rest), Ok(n) if n > 0) {}
    let events: Vec<&str> = rest.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let n = events.len();
    assert!(n >= 2, "{rest}");
    assert_eq!(events[n - 1], "[DONE]", "{rest}");
    let error: Value = serde_json::from_str(events[n - 2]).unwrap();
    assert_eq!(error["error"]["code"], "shutdown", "{rest}");
    server.hold(false);
    server.join();
}

// ---- item 7: half-closed requests ----

/// Sends a small completion request, shuts the sending side down, and
/// reads whatever comes back until the server closes.
fn half_closed_request(base: &str, max_tokens: usize) -> String {
    let mut s = connect(base);
    send_request(&mut s, &greedy(json!("Hi"), max_tokens, false));
    s.shutdown(std::net::Shutdown::Write).unwrap();
    read_to_close(&mut s).0
}

#[test]
fn a_half_closed_request_is_answered_with_half_close_and_counted_without() {
    let server = tiny_server(&["--half-close"]);
    let answer = half_closed_request(&server.base, 3);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""completion_tokens":3"#), "{answer}");
    let ok = r#"gpt2_requests_total{outcome="ok",route="/v1/completions",status="200"}"#;
    // Counted when the request's handler ends, a moment after its last byte
    // went out: wait for it.
    let counted = |server: &ServerProcess, name: &str| {
        let start = Instant::now();
        loop {
            let m = server::get(&server.url("/metrics"), None).text;
            if metric(&m, name) == Some(1.0) {
                break;
            }
            assert!(start.elapsed() < PATIENCE, "never counted as {name}:\n{m}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    counted(&server, ok);

    // Without it, the end of input is the client leaving: dropped, but
    // counted and logged. 120 tokens, so that the server reads the end of
    // input long before the answer is ready; should a machine still finish
    // first, it is an ordinary answered request, counted as such. Either way
    // the request is never lost from the counts (the bug: neither).
    let server = tiny_server(&[]);
    let answer = half_closed_request(&server.base, 120);
    if !answer.is_empty() {
        eprintln!("NOTICE: the 120-token answer was complete before the end of input was read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        counted(&server, ok);
        return;
    }
    counted(&server, "gpt2_connections_closed_mid_request_total");
    let logged = "closed its side of a connection before its request was answered";
    assert!(
        server.stderr_contains_within(logged, PATIENCE),
        "{}",
        server.stderr()
    );
}

// ---- item 9: the KV cache budget ----

#[test]
fn the_kv_cache_budget_bounds_admission_and_idle_caches_are_released() {
    // The 1024-position tiny model: 2 layers x 4 heads x 16 dims, so each of
    // its 16 key/value regions fills a 4 KiB page per 64 positions: 64 KiB.
    let server = start(
        ServeConfig {
            kv_cache_bytes: Some(512 << 10),
            ..config(4, 4)
        },
        None,
    );
    server.hold(true);
    let url = server.url("/v1/completions");
    let in_flight = |n: f64| move |m: &str| metric(m, "gpt2_requests_in_flight") == Some(n);
    // 1 + 400 positions: 7 pages of each region, 448 KiB.
    let mut first = connect(&server.base);
    send_request(&mut first, &greedy(json!("a"), 400, true));
    server.wait_for("admitted", PATIENCE, in_flight(1.0));
    let r = server::agent()
        .post(&url)
        .header("Content-Type", "application/json")
        .send(greedy(json!("a"), 400, false).to_string())
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let text = r.into_body().read_to_string().unwrap();
    assert!(text.contains("kv_cache_full"), "{text}");
    // 1 + 60 positions: one page each, 64 KiB: exactly the budget.
    let mut second = connect(&server.base);
    send_request(&mut second, &greedy(json!("a"), 60, true));
    server.wait_for("admitted", PATIENCE, in_flight(2.0));
    assert_eq!(
        metric(&server.metrics(), "gpt2_kv_cache_reserved_bytes"),
        Some((512 << 10) as f64)
    );
    // More than the whole budget can never run: a 400 naming max_tokens.
    let r = post_json(&url, &greedy(json!("a"), 600, false));
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json["error"]["param"], "max_tokens", "{}", r.text);
    assert_eq!(r.json["error"]["code"], "kv_cache_exceeded", "{}", r.text);
    server.hold(false);
    for conn in [&mut first, &mut second] {
        let (text, _) = read_to_close_or_done(conn);
        assert!(text.contains("data: [DONE]"), "{text}");
    }
    // Once idle, nothing is reserved and the engine keeps no cache.
    server.wait_for("released", PATIENCE, |m| {
        metric(m, "gpt2_requests_in_flight") == Some(0.0)
            && metric(m, "gpt2_kv_cache_reserved_bytes") == Some(0.0)
            && metric(m, "gpt2_kv_caches_pooled") == Some(0.0)
    });
    assert_eq!(post_json(&url, &greedy(json!("a"), 400, false)).status, 200);
}

/// Reads a streamed response until its `[DONE]` (the connection stays open).
fn read_to_close_or_done(s: &mut TcpStream) -> (String, Duration) {
    let start = Instant::now();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !got.contains("data: [DONE]") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => panic!("{e}: {got}"),
        }
    }
    (got, start.elapsed())
}
