//! What tools and gateways ask of `gpt2 serve` beside completions, over real
//! HTTP against the binary on an ephemeral loopback port with the tiny
//! synthetic model: `/tokenize` and `/detokenize` (llama-server's shapes),
//! the gateway's metrics under vLLM's names, and prefix reuse
//! (`--prefix-cache-mib`).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server::{self, metric, post_json, post_raw, ServerProcess, PATIENCE};
use common::synth_dir;
use gpt2::synth::Preset;
use gpt2::tokenizer::Gpt2Tokenizer;
use serde_json::{json, Value};

fn tiny_server(extra: &[&str]) -> ServerProcess {
    let dir = synth_dir(Preset::Tiny, 0);
    let mut args = vec!["--weights", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    ServerProcess::ready(&args, &[])
}

fn greedy(prompt: Value, max_tokens: usize, stream: bool) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": stream})
}

#[track_caller]
fn assert_refused(reply: &server::Reply, status: u16, param: &str, needles: &[&str]) {
    assert_eq!(reply.status, status, "{}", reply.text);
    let err = &reply.json["error"];
    assert_eq!(err["param"], param, "{}", reply.text);
    let message = err["message"].as_str().unwrap_or_default();
    for n in needles {
        assert!(message.contains(n), "{n:?} not in {message:?}");
    }
}

/// Characters of one, two, three and four UTF-8 bytes, some of which GPT-2
/// splits over tokens, and the special token.
const TEXT: &str = "Grüße, naïve café: 世界 🤗🦀 <|endoftext|> end";

#[test]
fn tokenize_and_detokenize_round_trip_in_llama_servers_shapes() {
    let server = tiny_server(&["--max-body-bytes", "4096"]);
    let (tok_url, detok_url) = (server.url("/tokenize"), server.url("/detokenize"));
    let want = Gpt2Tokenizer::builtin().encode(TEXT).unwrap();

    let ids = post_json(&tok_url, &json!({"content": TEXT}));
    assert_eq!(ids.status, 200, "{}", ids.text);
    assert_eq!(ids.json, json!({"tokens": want}));
    // GPT-2 has no special token to add: `add_special` changes nothing.
    let special = post_json(
        &tok_url,
        &json!({"content": TEXT, "add_special": true, "parse_special": true}),
    );
    assert_eq!(special.json, ids.json);
    assert!(want.contains(&50256), "{want:?}");

    let back = post_json(&detok_url, &json!({"tokens": want}));
    assert_eq!(back.status, 200, "{}", back.text);
    assert_eq!(back.json, json!({"content": TEXT}));
    let empty = post_json(&detok_url, &json!({"tokens": []}));
    assert_eq!(empty.json, json!({"content": ""}));

    // With pieces: each token's text, or its bytes where they are not UTF-8
    // alone; together they are the text's bytes.
    let pieces = post_json(&tok_url, &json!({"content": TEXT, "with_pieces": true}));
    assert_eq!(pieces.status, 200, "{}", pieces.text);
    let items = pieces.json["tokens"].as_array().unwrap();
    let got: Vec<u64> = items.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert_eq!(got, want.iter().map(|&i| u64::from(i)).collect::<Vec<_>>());
    let mut bytes = Vec::new();
    let mut split = 0;
    for item in items {
        assert_eq!(item.as_object().unwrap().len(), 2, "{item}");
        match &item["piece"] {
            Value::String(s) => bytes.extend_from_slice(s.as_bytes()),
            Value::Array(b) => {
                split += 1;
                let b: Vec<u8> = b
                    .iter()
                    .map(|x| u8::try_from(x.as_u64().unwrap()).unwrap())
                    .collect();
                assert!(
                    std::str::from_utf8(&b).is_err(),
                    "{item}: valid UTF-8 sent as bytes"
                );
                bytes.extend(b);
            }
            other => panic!("piece {other}"),
        }
    }
    assert_eq!(String::from_utf8(bytes).unwrap(), TEXT);
    assert!(split > 0, "no piece held part of a character: {}", pieces.text);
    assert!(
        items.iter().any(|t| t["piece"] == " café" || t["piece"] == "Gr"),
        "{}",
        pieces.text
    );

    // Refusals name the parameter.
    let r = post_json(&tok_url, &json!({"content": "a", "with_piece": true}));
    assert_refused(&r, 400, "with_piece", &["unknown parameter `with_piece`"]);
    let r = post_json(&tok_url, &json!({"text": "a"}));
    assert_refused(&r, 400, "text", &["unknown parameter"]);
    let r = post_json(&tok_url, &json!({"with_pieces": true}));
    assert_refused(&r, 400, "content", &["missing"]);
    let r = post_json(&detok_url, &json!({"tokens": [464, 50257]}));
    assert_refused(
        &r,
        400,
        "tokens",
        &["`tokens[1]`", "50257", "vocabulary of 50257"],
    );
    let r = post_json(&detok_url, &json!({"tokens": [464, -1]}));
    assert_refused(&r, 400, "tokens", &["`tokens[1]` is -1"]);
    let r = post_json(&detok_url, &json!({"tokens": [1], "model": "gpt-4"}));
    assert_refused(&r, 404, "model", &["gpt-4"]);
    // The body is read as completions' are: JSON only, within the size limit.
    let r = post_raw(&tok_url, "text/plain", r#"{"content": "a"}"#);
    assert_eq!(
        (r.status, &r.json["error"]["code"]),
        (400, &json!("invalid_content_type"))
    );
    let r = post_json(&tok_url, &json!({"content": "a".repeat(5000)}));
    assert_eq!(
        (r.status, &r.json["error"]["code"]),
        (413, &json!("payload_too_large"))
    );
    let r = post_raw(&detok_url, "application/json", "{\"tokens\": [1,");
    assert_eq!(
        (r.status, &r.json["error"]["code"]),
        (400, &json!("invalid_json"))
    );
}

#[test]
fn tokenize_needs_the_api_key_like_every_route_but_health() {
    let server = tiny_server(&["--api-key", "sesame"]);
    let r = post_json(&server.url("/tokenize"), &json!({"content": "hi"}));
    assert_eq!(r.status, 401, "{}", r.text);
    let r = post_json(&server.url("/detokenize"), &json!({"tokens": [1]}));
    assert_eq!(r.status, 401, "{}", r.text);
    let r = server::agent()
        .post(server.url("/tokenize"))
        .header("Authorization", "Bearer sesame")
        .header("Content-Type", "application/json")
        .send(json!({"content": "hi"}).to_string())
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The gauges, histograms and their types a gateway reads, as vLLM names them.
const VLLM_SERIES: [(&str, &str); 5] = [
    ("vllm:num_requests_waiting", "gauge"),
    ("vllm:num_requests_running", "gauge"),
    ("vllm:kv_cache_usage_perc", "gauge"),
    ("vllm:time_to_first_token_seconds", "histogram"),
    ("vllm:e2e_request_latency_seconds", "histogram"),
];

#[test]
fn gateway_metrics_under_vllms_names_follow_the_load() {
    // One sequence at a time, on one thread: concurrent requests queue.
    let server = tiny_server(&["--max-batch", "1", "--threads", "1"]);
    let url = server.url("/v1/completions");
    let scrape = || server::get(&server.url("/metrics"), None).text;
    for i in 0..3 {
        let r = post_json(&url, &greedy(json!(format!("Request number {i}")), 4, false));
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // A refused request and a tokenization are no generations.
    assert_eq!(post_json(&url, &json!({"prompt": "a", "top_k": 0})).status, 400);
    assert_eq!(
        post_json(&server.url("/tokenize"), &json!({"content": "a"})).status,
        200
    );
    let m = scrape();
    for (name, kind) in VLLM_SERIES {
        assert!(
            m.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind}:\n{m}"
        );
    }
    assert_eq!(
        metric(&m, "vllm:time_to_first_token_seconds_count"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "gpt2_time_to_first_token_seconds_count"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "vllm:e2e_request_latency_seconds_count"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(metric(&m, "vllm:num_requests_running"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "vllm:kv_cache_usage_perc"), Some(0.0), "{m}");

    // Long streams, queued behind each other; /metrics read while they run.
    const STREAMS: usize = 4;
    let finished = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (url, finished) = (url.clone(), Arc::clone(&finished));
            std::thread::spawn(move || {
                let s = server::stream(&url, &greedy(json!(format!("Stream {i}")), 120, true), || {});
                finished.fetch_add(1, Ordering::SeqCst);
                s
            })
        })
        .collect();
    let (mut running, mut waiting, mut usage) = (0.0_f64, 0.0_f64, Vec::new());
    let start = Instant::now();
    while finished.load(Ordering::SeqCst) < STREAMS {
        let m = scrape();
        let r = metric(&m, "vllm:num_requests_running").unwrap();
        running = running.max(r);
        waiting = waiting.max(metric(&m, "vllm:num_requests_waiting").unwrap());
        if r > 0.0 {
            usage.push(metric(&m, "vllm:kv_cache_usage_perc").unwrap());
        }
        assert!(start.elapsed() < PATIENCE, "the streams never ended");
        std::thread::sleep(Duration::from_millis(2));
    }
    for c in clients {
        let s = c.join().unwrap();
        assert!(s.status == 200 && s.done, "a stream failed");
    }
    // `--max-batch 1`: one runs, the others wait.
    assert_eq!(running, 1.0, "never saw a request running");
    assert!(waiting >= 1.0, "never saw a request waiting");
    assert!(
        !usage.is_empty() && usage.iter().all(|&u| u > 0.0 && u <= 1.0),
        "KV use while running: {usage:?}"
    );
    let m = scrape();
    assert_eq!(metric(&m, "vllm:num_requests_running"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "vllm:num_requests_waiting"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "vllm:kv_cache_usage_perc"), Some(0.0), "{m}");
    // Each stream is counted once its last byte is out.
    let total = (3 + STREAMS) as f64;
    assert_eq!(
        metric(&m, "vllm:e2e_request_latency_seconds_count"),
        Some(total),
        "{m}"
    );
    assert_eq!(
        metric(&m, "vllm:time_to_first_token_seconds_count"),
        Some(total),
        "{m}"
    );
}

/// A 64-token prompt (as ids) sent twice, greedy: the texts and the
/// prefix-cache counters after each request.
fn twice(server: &ServerProcess) -> [(String, f64, f64); 2] {
    let prompt: Vec<u32> = (0..64).map(|i| 1000 + 37 * i).collect();
    let url = server.url("/v1/completions");
    [(); 2].map(|()| {
        let r = post_json(&url, &greedy(json!(prompt), 8, false));
        assert_eq!(r.status, 200, "{}", r.text);
        let m = server::get(&server.url("/metrics"), None).text;
        (
            r.json["choices"][0]["text"].as_str().unwrap().to_string(),
            metric(&m, "gpt2_prefix_cache_hits_total").unwrap(),
            metric(&m, "gpt2_prefix_cache_tokens_reused_total").unwrap(),
        )
    })
}

#[test]
fn a_repeated_prompt_reuses_its_prefix_and_gives_the_same_text() {
    let server = tiny_server(&[]);
    let [(first, hits0, reused0), (second, hits1, reused1)] = twice(&server);
    assert_eq!((hits0, reused0), (0.0, 0.0), "the first request is cold");
    assert_eq!(second, first);
    // All of the prompt but its last position, whose logits are needed.
    assert_eq!((hits1, reused1), (1.0, 63.0));
    let m = server::get(&server.url("/metrics"), None).text;
    assert!(metric(&m, "gpt2_prefix_cache_bytes").unwrap() > 0.0, "{m}");

    // Off, nothing is reused, and the text is the same as with reuse.
    let off = tiny_server(&["--prefix-cache-mib", "0"]);
    let [(cold1, h0, r0), (cold2, h1, r1)] = twice(&off);
    assert_eq!((h0, r0, h1, r1), (0.0, 0.0, 0.0, 0.0));
    assert_eq!((cold1.as_str(), cold2.as_str()), (first.as_str(), first.as_str()));
    let m = server::get(&off.url("/metrics"), None).text;
    assert_eq!(metric(&m, "gpt2_prefix_cache_bytes"), Some(0.0), "{m}");
}

#[test]
fn a_prefix_cache_past_the_address_space_is_refused_by_name() {
    let dir = synth_dir(Preset::Tiny, 0);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(["serve", "--port", "0", "--weights", dir.to_str().unwrap()])
        .args(["--prefix-cache-mib", &usize::MAX.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--prefix-cache-mib"),
        "{stderr}"
    );
}
