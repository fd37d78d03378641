//! The benchmark clients against hostile input (issue 31, items 10 and 12):
//! `throughput --url` against a server started here that streams without
//! newlines, streams events forever, or trickles bytes forever (each
//! request must fail by name, within bounded memory and time); `soak` and
//! `throughput` refusing out-of-range flags and unwritable outputs before
//! any work; and the exit status of a run that missed only opt-in targets.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{scratch_dir, synth_dir, throughput_measured, throughput_within};
use gpt2::synth::Preset;

/// What the hostile server's completions send after a `200` head.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Hostile {
    /// `x` bytes, never a newline.
    NoNewlines,
    /// Well-formed token chunks, never `[DONE]`.
    EndlessEvents,
    /// An SSE comment line every 100 ms: each read well within
    /// `--http-timeout`, the stream never ending.
    Trickle,
}

/// The most any one response of the server sends: so that even a client
/// without bounds (the old code) ends, and the test with it.
const SERVER_CAP: u64 = 300 << 20;

struct Shared {
    stop: AtomicBool,
    /// The most bytes one completion response got written into its socket.
    most_sent: AtomicU64,
    completions: AtomicU64,
}

/// A plain-TCP HTTP/1.1 server on 127.0.0.1 (an ephemeral port): a model
/// list, and completions that misbehave as `Hostile` says. Dropping it
/// stops it: every thread sees the stop flag within a second and is joined.
struct HostileServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl HostileServer {
    fn start(behaviour: Hostile) -> HostileServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            most_sent: AtomicU64::new(0),
            completions: AtomicU64::new(0),
        });
        let threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
        let (sh, th) = (Arc::clone(&shared), Arc::clone(&threads));
        let acceptor = std::thread::spawn(move || {
            while !sh.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let sh = Arc::clone(&sh);
                        let t = std::thread::spawn(move || serve(conn, behaviour, &sh));
                        th.lock().unwrap().push(t);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        HostileServer {
            addr,
            shared,
            threads,
            acceptor: Some(acceptor),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

/// One connection: one request read (head and body, bounded), one answer.
fn serve(mut conn: TcpStream, behaviour: Hostile, shared: &Shared) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A client that stops reading blocks a write for at most this long, so
    // the stop flag is seen.
    conn.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) if head.len() < 64 << 10 => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length.min(1 << 20)];
    if conn.read_exact(&mut body).is_err() {
        return;
    }
    if head.starts_with("get /v1/models") {
        let list = r#"{"object":"list","data":[{"id":"hostile","object":"model","owned_by":"test"}]}"#;
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{list}",
            list.len()
        );
        return;
    }
    shared.completions.fetch_add(1, Ordering::SeqCst);
    if conn
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return;
    }
    let piece: Vec<u8> = match behaviour {
        Hostile::NoNewlines => vec![b'x'; 64 << 10],
        Hostile::EndlessEvents => {
            let chunk = "data: {\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\" x\",\"finish_reason\":null}]}\n\n";
            chunk.repeat((64 << 10) / chunk.len()).into_bytes()
        }
        Hostile::Trickle => b": still here\n".to_vec(),
    };
    let mut sent = 0u64;
    while !shared.stop.load(Ordering::SeqCst) && sent < SERVER_CAP {
        match conn.write(&piece) {
            Ok(n) if n > 0 => {
                sent += n as u64;
                shared.most_sent.fetch_max(sent, Ordering::SeqCst);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
            }
            _ => return,
        }
        if behaviour == Hostile::Trickle {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// 1 warmup, 1 single request, level 2 with 2 requests: 4 requests, 3 counted.
fn quick<'a>(url: &'a str, out_dir: &'a str) -> Vec<&'a str> {
    vec![
        "--url",
        url,
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
        "--out-dir",
        out_dir,
        "--http-timeout",
        "10",
    ]
}

/// The errors of the report in `dir`, each with how many requests had it.
fn report_errors(dir: &std::path::Path) -> Vec<(String, usize)> {
    let json = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("the report is written");
    let report = gpt2_bench::compare::read_report(&json).unwrap();
    let mut out: Vec<(String, usize)> = Vec::new();
    for r in report.tests.iter().flat_map(|t| &t.raw) {
        if let Some(e) = &r.error {
            match out.iter_mut().find(|(x, _)| x == e) {
                Some((_, n)) => *n += 1,
                None => out.push((e.clone(), 1)),
            }
        }
    }
    out
}

/// Against a hostile server: every counted request fails, by the kind
/// `want` names, the report is written and the status is 4; the client
/// read a bounded part of what was sent, in bounded memory and time.
fn hostile_run(behaviour: Hostile, name: &str, want: &str) -> (f64, u64, u64) {
    let server = HostileServer::start(behaviour);
    let out_dir = scratch_dir(name);
    let url = server.url();
    let (out, peak, secs) = throughput_measured(&quick(&url, out_dir.to_str().unwrap()), 120);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let sent = server.shared.most_sent.load(Ordering::SeqCst);
    let completions = server.shared.completions.load(Ordering::SeqCst);
    drop(server);
    eprintln!(
        "{behaviour:?}: {secs:.1} s, peak RSS {} MiB, at most {} KiB sent on one stream",
        peak >> 20,
        sent >> 10
    );
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("FAILED: 3 of 3 requests failed"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(completions, 4, "{stderr}");
    let errors = report_errors(&out_dir);
    assert_eq!(errors.len(), 1, "one kind of failure: {errors:?}");
    assert!(errors[0].0.starts_with(want), "{errors:?}");
    assert_eq!(errors[0].1, 3, "{errors:?}");
    (secs, peak, sent)
}

/// Item 10: a stream without a newline is refused at the line limit
/// (64 KiB), not read to 256 MiB per request.
#[test]
fn a_stream_without_newlines_fails_at_the_line_limit() {
    let (secs, peak, sent) = hostile_run(
        Hostile::NoNewlines,
        "bounds-no-newlines",
        "line too long: a line of the event stream went past",
    );
    // What the server got into the socket: the client's 64 KiB and the
    // kernel's buffers, far below the server's 300 MiB.
    assert!(sent < 32 << 20, "the client read {sent} bytes of one stream");
    assert!(peak < 128 << 20, "peak resident memory {peak} bytes");
    assert!(secs < 60.0, "{secs} s");
}

/// Item 10: well-formed events forever are refused past the events a
/// request asked for (4 tokens + 8), not read until a deadline.
#[test]
fn endless_events_fail_as_too_many() {
    let (secs, peak, sent) = hostile_run(
        Hostile::EndlessEvents,
        "bounds-endless",
        "too many events: the stream went past 12 events for 4 tokens asked",
    );
    assert!(sent < 32 << 20, "the client read {sent} bytes of one stream");
    assert!(peak < 128 << 20, "peak resident memory {peak} bytes");
    assert!(secs < 60.0, "{secs} s");
}

/// Item 10: a stream that trickles a comment every 100 ms (each read
/// within --http-timeout, nothing counted as an event) ends at the default
/// deadline: --http-timeout 2 + 4 tokens x 1 s + the prompt's 10 ms a
/// token, about 6 s.
#[test]
fn a_trickling_stream_ends_at_the_default_deadline() {
    let server = HostileServer::start(Hostile::Trickle);
    let out_dir = scratch_dir("bounds-trickle");
    let url = server.url();
    let mut args = quick(&url, out_dir.to_str().unwrap());
    let set = |args: &mut Vec<&str>, flag: &str, value: &'static str| {
        let at = args.iter().position(|a| *a == flag).unwrap();
        args[at + 1] = value;
    };
    set(&mut args, "--warmup", "0");
    set(&mut args, "--http-timeout", "2");
    let (out, _, secs) = throughput_measured(&args, 120);
    drop(server);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("deadline 6 s"), "{stderr}");
    let errors = report_errors(&out_dir);
    let failed: usize = errors.iter().map(|(_, n)| n).sum();
    assert_eq!(failed, 3, "{errors:?}");
    assert!(
        errors
            .iter()
            .all(|(e, _)| e.starts_with("request deadline passed: 6.")),
        "{errors:?}"
    );
    // Two rounds of about 6 s (the single request, then the level's two together).
    assert!((10.0..60.0).contains(&secs), "{secs} s");
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Item 10: a target that is not a finite number is refused by name,
/// before anything runs.
#[test]
fn non_finite_targets_are_refused() {
    let weights = synth_dir(Preset::Tiny, 0);
    for value in ["nan", "NaN", "inf", "-inf", "infinity"] {
        let spec = format!("single_tokens_per_s={value}");
        let out = throughput_within(&["--weights", weights.to_str().unwrap(), "--target", &spec], 60);
        let stderr = text(&out);
        assert_eq!(out.status.code(), Some(2), "{spec}: {stderr}");
        assert!(
            stderr.contains(&format!("--target `{spec}`: the value must be a finite number")),
            "{spec}: {stderr}"
        );
        assert!(!stderr.contains("weights:"), "ran before refusing: {stderr}");
    }
}

fn soak(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_soak"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(120)).is_err() {
            let _ = Command::new("kill").args(["-9", &id.to_string()]).status();
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = tx.send(());
    killer.join().unwrap();
    out
}

/// Item 10: `soak` refuses out-of-range flags by name before loading
/// anything (`--concurrency 100000` reached 8.6 GB and aborted).
#[test]
fn soak_refuses_out_of_range_flags_before_the_run() {
    let weights = synth_dir(Preset::Tiny, 0);
    let w = weights.to_str().unwrap();
    for (args, needle) in [
        (vec!["--concurrency", "100000"], "--concurrency 100000"),
        (vec!["--requests", "100000000"], "--requests 100000000"),
        (vec!["--concurrency", "0"], "--concurrency must be at least 1"),
        (vec!["--rss-slack-mib", "nan"], "--rss-slack-mib"),
        (vec!["--rss-slack-mib=-1"], "--rss-slack-mib"),
    ] {
        let mut all = vec!["--weights", w];
        all.extend(&args);
        let start = Instant::now();
        let out = soak(&all);
        let stderr = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("dtype:"),
            "{args:?} loaded before refusing: {stderr}"
        );
        assert!(start.elapsed() < Duration::from_secs(30), "{args:?}");
    }
}

/// Item 10: `soak --json` is checked before the run: a path whose
/// directory cannot be made, or a file that exists (never replaced).
#[test]
fn soak_checks_its_json_path_before_the_run() {
    let weights = synth_dir(Preset::Tiny, 0);
    let w = weights.to_str().unwrap();
    let scratch = scratch_dir("soak-json");
    let file = scratch.join("a-file");
    std::fs::write(&file, "precious").unwrap();
    let under_file = file.join("summary.json");
    for (path, needle) in [
        (under_file.to_str().unwrap(), "a-file/summary.json"),
        ("/proc/x/y", "--json /proc/x/y"),
        (file.to_str().unwrap(), "the file exists"),
    ] {
        let out = soak(&[
            "--weights",
            w,
            "--requests",
            "4",
            "--concurrency",
            "2",
            "--json",
            path,
        ]);
        let stderr = text(&out);
        assert_eq!(out.status.code(), Some(1), "{path}: {stderr}");
        assert!(stderr.contains(needle), "{path}: {stderr}");
        assert!(
            !stderr.contains("dtype:"),
            "{path}: ran before checking: {stderr}"
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    // A new path is written, once.
    let fresh = scratch.join("fresh.json");
    let args = [
        "--weights",
        w,
        "--requests",
        "4",
        "--concurrency",
        "2",
        "--max-prompt",
        "8",
        "--max-new",
        "2",
        "--mode",
        "batched",
        "--json",
        fresh.to_str().unwrap(),
    ];
    let out = soak(&args);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&fresh).unwrap()).unwrap();
    assert_eq!(json["passed"], true);
}

/// A run on the tiny model whose reference-study targets pass (each set
/// to 0, so whatever the machine) and whose batched efficiency at 4 is
/// about 0.25 (`--max-batch 1` decodes one sequence at a time), far below
/// the project's own 0.90.
fn opt_in_miss<'a>(weights: &'a str, out_dir: &'a str) -> Vec<&'a str> {
    vec![
        "--weights",
        weights,
        "--max-new-tokens",
        "3",
        "--warmup",
        "0",
        "--single-requests",
        "2",
        "--levels",
        "4",
        "--requests-per-level",
        "4",
        "--mode",
        "batched",
        "--max-batch",
        "1",
        "--out-dir",
        out_dir,
        "--target",
        "single_tokens_per_s=0",
        "--target",
        "single_requests_per_s=0",
        "--target",
        "concurrent_tokens_per_s=0",
        "--target",
        "concurrent_requests_per_s=0",
    ]
}

/// Item 12: a run that succeeded exits 0 even though it missed the
/// project's own batching target, which the report and stderr still show;
/// `--strict`, or naming the target, makes the miss exit 3.
#[test]
fn a_missed_opt_in_target_exits_0_unless_required() {
    let weights = synth_dir(Preset::Tiny, 0);
    let w = weights.to_str().unwrap();
    let out_dir = scratch_dir("bounds-opt-in");
    let o = out_dir.to_str().unwrap();
    let out = throughput_within(&opt_in_miss(w, o), 120);
    let stderr = text(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("opt-in targets missed (not required; --strict or --target NAME=VALUE requires them): batched_efficiency_at_4"),
        "{stderr}"
    );
    assert!(stdout.contains("missed (opt-in)"), "{stdout}");
    let md = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "md"))
        .unwrap();
    let md = std::fs::read_to_string(md).unwrap();
    assert!(
        md.contains("All 5 required targets PASS. Opt-in target missed"),
        "{md}"
    );

    for extra in [vec!["--strict"], vec!["--target", "batched_efficiency_at_4=0.9"]] {
        let mut args = opt_in_miss(w, o);
        args.extend(&extra);
        let out = throughput_within(&args, 120);
        let stderr = text(&out);
        assert_eq!(out.status.code(), Some(3), "{extra:?}: {stderr}");
        assert!(
            stderr.contains("targets missed: batched_efficiency_at_4 (exit status 3)"),
            "{extra:?}: {stderr}"
        );
    }
}
