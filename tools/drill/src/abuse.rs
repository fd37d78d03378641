//! `drill abuse`: the hostile clients of issue 31's cases 1-3, replayed
//! against a two-replica cluster while ordinary clients are served through
//! HAProxy:
//!
//! - flooders (case 1): `--flood-clients` threads, each posting a
//!   completion whose prompt is 1,000,000 digits through HAProxy, again and
//!   again for `--flood-seconds` (the server must refuse it; what matters
//!   is what refusing costs everyone else);
//! - slowloris (case 2): `--slowloris` connections that send a partial
//!   request head and then one more header line every 5 s, spread over
//!   HAProxy's port and each replica's own (a client that bypasses the
//!   proxy reaches the replica as it is);
//! - non-readers (case 3): `--non-readers` streaming completions of as
//!   many tokens as the context holds, sent to the replicas in turn from a
//!   socket with a 1 KiB receive buffer that is never read.
//!
//! Meanwhile every replica's `/health` is probed directly every 100 ms on a
//! fresh connection (as HAProxy's checks do) and HAProxy's view of the
//! replicas is polled. The checks: no ordinary request fails, HAProxy marks
//! no replica DOWN (its `chkdown` counters do not move), and `/health`
//! answers 200 with a p99 under 100 ms.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use super::cluster::Cluster;
use super::tally::{count, most_first, Check, Events};
use gpt2_bench::stats;

/// What the attack is made of (`drill abuse`'s flags).
#[derive(Debug, Clone, Copy)]
pub struct Attack {
    pub flood_clients: usize,
    pub flood_seconds: f64,
    pub slowloris: usize,
    pub non_readers: usize,
    /// Tokens each non-reader asks for.
    pub non_reader_tokens: usize,
}

/// The length of the flooders' prompt, in characters (case 1: digits).
pub const FLOOD_PROMPT_CHARS: usize = 1_000_000;
/// `/health` p99 the drill requires, ms.
pub const HEALTH_P99_MS: f64 = 100.0;
/// How long one `/health` probe may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the attackers and the watchers saw, for the report.
#[derive(Debug, Default)]
pub struct Seen {
    /// Flood requests by outcome (`HTTP 400`, `no answer: ...`), most first.
    pub flood: Vec<(String, usize)>,
    /// `/health` probes: latency ms, and whether each answered 200.
    pub probes: Vec<(f64, bool)>,
    /// HAProxy states other than UP seen while polling: (replica, state).
    pub not_up: Vec<(usize, String)>,
    /// Slowloris connections the far end closed while held, of those opened.
    pub slowloris_closed: usize,
    pub slowloris_opened: usize,
    /// Per non-reader: where it went, and what became of its stream.
    pub non_readers: Vec<(String, String)>,
}

/// `host:port` of an `http://host:port` URL.
fn addr_of(url: &str) -> Result<SocketAddr, String> {
    let hostport = url.trim_start_matches("http://");
    let hostport = hostport.split('/').next().unwrap_or(hostport);
    hostport
        .parse()
        .map_err(|e| format!("{url} is not http://IP:PORT: {e}"))
}

/// The status code of an HTTP response head, if `bytes` start with one.
fn status_of(bytes: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(&bytes[..bytes.len().min(64)]).ok()?;
    let mut words = text.split_whitespace();
    words.next().filter(|w| w.starts_with("HTTP/"))?;
    words.next()?.parse().ok()
}

/// The head and body of a completion request for `body`, on a connection
/// the server is to close after it.
fn completion_request(body: serde_json::Value) -> (String, String) {
    let body = body.to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: drill\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    (head, body)
}

/// One request on a fresh connection, read until the peer closes or
/// `limit` passes: the status, or why there was none.
fn one_request(addr: SocketAddr, head: &str, body: &[u8], limit: Duration) -> Result<u16, String> {
    let mut s = TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("connect: {}", e.kind()))?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body))
        .map_err(|e| format!("write: {}", e.kind()))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The head is enough; the rest of a small answer is read to the end.
    while got.len() < 64 << 10 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if got.is_empty() => return Err(format!("read: {}", e.kind())),
            Err(_) => break,
        }
    }
    status_of(&got).ok_or_else(|| "no HTTP answer".to_string())
}

/// A socket with a small receive buffer (set before connecting, so the
/// window stays small), connected to `addr`.
fn small_window(addr: SocketAddr) -> Result<TcpStream, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        socket.set_recv_buffer_size(1024).map_err(|e| e.to_string())?;
        let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
            .await
            .map_err(|_| "connect: timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let std = stream.into_std().map_err(|e| e.to_string())?;
        std.set_nonblocking(false).map_err(|e| e.to_string())?;
        Ok(std)
    })
}

/// Runs the attack on `cluster` for its length, watching `/health` and
/// HAProxy meanwhile; returns what was seen and the drill's checks on it
/// (the ordinary clients' own check is the caller's).
pub fn attack(
    cluster: &Cluster,
    model: &str,
    a: &Attack,
    ev: &mut Events,
) -> Result<(Seen, Vec<Check>), String> {
    let lb = addr_of(&cluster.lb_url())?;
    let replicas: Vec<SocketAddr> = (0..cluster.spec.replicas)
        .map(|i| addr_of(&cluster.replica_url(i, "")))
        .collect::<Result<_, _>>()?;
    let chkdown = |i: usize| -> u64 {
        cluster
            .lb_field(i, "chkdown")
            .ok()
            .flatten()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let downs_before: Vec<u64> = (0..replicas.len()).map(chkdown).collect();
    ev.note(format!(
        "attack begins: {} flooders ({FLOOD_PROMPT_CHARS}-digit prompts through HAProxy) for {:.0} s, {} slowloris \
         connections, {} non-reading streams of {} tokens",
        a.flood_clients, a.flood_seconds, a.slowloris, a.non_readers, a.non_reader_tokens
    ));
    let seen = run(cluster, model, a, lb, &replicas);
    ev.note(seen.summary());
    let downs: Vec<u64> = (0..replicas.len())
        .map(|i| chkdown(i).saturating_sub(downs_before[i]))
        .collect();
    let checks = vec![seen.no_replica_down(&downs), seen.health_held()];
    Ok((seen, checks))
}

/// The attackers and the watchers, each on its own thread: the flooders
/// for their time, the others until the flooders are done.
fn run(cluster: &Cluster, model: &str, a: &Attack, lb: SocketAddr, replicas: &[SocketAddr]) -> Seen {
    let stop = AtomicBool::new(false);
    let length = Duration::from_secs_f64(a.flood_seconds);
    // Slowloris spreads over HAProxy and each replica.
    let targets: Vec<SocketAddr> = std::iter::once(lb).chain(replicas.iter().copied()).collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        // Case 2: slowloris, opened first and held to the end.
        let slowloris = s.spawn(|| slowloris(&targets, a.slowloris, &stop));
        // Case 3: non-readers, one per replica in turn, held to the end.
        let non_readers = s.spawn(|| non_readers(replicas, model, a, &stop));
        let probes = s.spawn(|| probe_health(replicas, &stop));
        let not_up = s.spawn(|| watch_haproxy(cluster, replicas.len(), &stop));
        // Case 1: the flooders, for their time; then everything stops.
        let flood = flood(s, lb, model, a.flood_clients, start + length);
        stop.store(true, Ordering::SeqCst);
        let (slowloris_opened, slowloris_closed) = joined(slowloris);
        Seen {
            flood,
            probes: joined(probes),
            not_up: joined(not_up),
            slowloris_closed,
            slowloris_opened,
            non_readers: joined(non_readers),
        }
    })
}

/// A thread's result; its panic goes on.
fn joined<T>(h: ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Calls `each` every `period` until `stop` is set.
fn until_stopped(stop: &AtomicBool, period: Duration, mut each: impl FnMut()) {
    while !stop.load(Ordering::SeqCst) {
        each();
        std::thread::sleep(period);
    }
}

/// `n` connections spread over `targets`, each sending a partial request
/// head and then one more header line every 5 s until `stop`: how many
/// were opened, and how many of those the far end closed meanwhile.
fn slowloris(targets: &[SocketAddr], n: usize, stop: &AtomicBool) -> (usize, usize) {
    let open = |target: &SocketAddr| {
        let mut c = TcpStream::connect_timeout(target, Duration::from_secs(2)).ok()?;
        c.set_write_timeout(Some(Duration::from_millis(200))).ok()?;
        c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: drill\r\n")
            .ok()?;
        c.set_nonblocking(true).ok()?;
        Some(c)
    };
    let mut conns: Vec<Option<TcpStream>> = (0..n).map(|i| open(&targets[i % targets.len()])).collect();
    let opened = conns.iter().filter(|c| c.is_some()).count();
    let mut closed = 0;
    let mut last_line = Instant::now();
    until_stopped(stop, Duration::from_millis(100), || {
        let due = last_line.elapsed() >= Duration::from_secs(5);
        for slot in conns.iter_mut() {
            let Some(c) = slot else { continue };
            let mut buf = [0u8; 512];
            let gone = match c.read(&mut buf) {
                Ok(_) => true, // closed, or an answer (a 408): either ends it
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
            let gone = gone || (due && c.write_all(b"X-Slow: 1\r\n").is_err());
            if gone {
                closed += 1;
                *slot = None;
            }
        }
        if due {
            last_line = Instant::now();
        }
    });
    (opened, closed)
}

/// Streaming completions of `a.non_reader_tokens` sent to the replicas in
/// turn from small-window sockets nobody reads until `stop`: per stream,
/// where it went and what became of it.
fn non_readers(replicas: &[SocketAddr], model: &str, a: &Attack, stop: &AtomicBool) -> Vec<(String, String)> {
    let (head, body) = completion_request(serde_json::json!({"model": model, "prompt": "Hello",
        "max_tokens": a.non_reader_tokens, "stream": true, "ignore_eos": true}));
    let held: Vec<(String, Result<TcpStream, String>)> = (0..a.non_readers)
        .map(|i| {
            let target = replicas[i % replicas.len()];
            let sent = small_window(target).and_then(|mut c| {
                c.write_all(head.as_bytes())
                    .and_then(|_| c.write_all(body.as_bytes()))
                    .map_err(|e| e.to_string())?;
                Ok(c)
            });
            (format!("replica {} ({target})", i % replicas.len()), sent)
        })
        .collect();
    until_stopped(stop, Duration::from_millis(100), || {});
    held.into_iter()
        .map(|(name, conn)| {
            let state = match conn {
                Ok(c) => drain(c).to_string(),
                Err(e) => format!("not sent: {e}"),
            };
            (name, state)
        })
        .collect()
}

/// What became of a stream while nobody read it: drains what the buffers
/// hold (for at most 2 s) and sees how it ends.
fn drain(mut c: TcpStream) -> &'static str {
    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 64 << 10];
    let mut tail: Vec<u8> = Vec::new();
    let until = Instant::now() + Duration::from_secs(2);
    let mut closed = false;
    while Instant::now() < until {
        match c.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                let cut = tail.len().saturating_sub(4096);
                tail.drain(..cut);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
            }
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let done = String::from_utf8_lossy(&tail).contains("data: [DONE]");
    match (closed, done) {
        (_, true) => "completed (read to [DONE] once drained)",
        (true, false) => "ended by the server before [DONE]",
        (false, false) => "still streaming",
    }
}

/// `/health` on every replica, a fresh connection every 100 ms, until
/// `stop`: each probe's latency (ms) and whether it answered 200.
fn probe_health(replicas: &[SocketAddr], stop: &AtomicBool) -> Vec<(f64, bool)> {
    let head = "GET /health HTTP/1.1\r\nHost: drill\r\nConnection: close\r\n\r\n";
    let mut probes = Vec::new();
    until_stopped(stop, Duration::from_millis(100), || {
        for &r in replicas {
            let t = Instant::now();
            let ok = one_request(r, head, b"", PROBE_TIMEOUT) == Ok(200);
            probes.push((t.elapsed().as_secs_f64() * 1e3, ok));
        }
    });
    probes
}

/// HAProxy's view of the `replicas`, polled until `stop`: every state
/// other than UP seen, once each.
fn watch_haproxy(cluster: &Cluster, replicas: usize, stop: &AtomicBool) -> Vec<(usize, String)> {
    let mut not_up: Vec<(usize, String)> = Vec::new();
    until_stopped(stop, Duration::from_millis(200), || {
        for i in 0..replicas {
            if let Ok(st) = cluster.lb_status(i) {
                if st != "UP" && !not_up.iter().any(|(j, x)| *j == i && *x == st) {
                    not_up.push((i, st));
                }
            }
        }
    });
    not_up
}

/// `clients` threads posting a completion of a [`FLOOD_PROMPT_CHARS`]-digit
/// prompt to `lb` again and again until `end`: the outcomes, most first.
fn flood<'s>(
    s: &'s Scope<'s, '_>,
    lb: SocketAddr,
    model: &str,
    clients: usize,
    end: Instant,
) -> Vec<(String, usize)> {
    let prompt = "1".repeat(FLOOD_PROMPT_CHARS);
    let (head, body) =
        completion_request(serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 1}));
    let request = std::sync::Arc::new((head, body));
    let flooders: Vec<_> = (0..clients)
        .map(|_| {
            let request = request.clone();
            s.spawn(move || {
                let mut mine = Vec::new();
                while Instant::now() < end {
                    let outcome =
                        match one_request(lb, &request.0, request.1.as_bytes(), Duration::from_secs(30)) {
                            Ok(code) => format!("HTTP {code}"),
                            Err(e) => format!("no answer ({e})"),
                        };
                    count(&mut mine, outcome);
                }
                mine
            })
        })
        .collect();
    let mut flood = Vec::new();
    for f in flooders {
        for (k, n) in f.join().unwrap_or_default() {
            for _ in 0..n {
                count(&mut flood, k.clone());
            }
        }
    }
    most_first(&mut flood, |k| k);
    flood
}

impl Seen {
    /// The event line that ends the attack.
    fn summary(&self) -> String {
        let flood_total: usize = self.flood.iter().map(|(_, n)| n).sum();
        let listed = |items: Vec<String>, sep: &str| items.join(sep);
        format!(
            "attack ends: {flood_total} flood requests ({}); slowloris: {} of {} closed by the far end while held; \
             non-readers: {}",
            listed(self.flood.iter().map(|(k, n)| format!("{n} {k}")).collect(), ", "),
            self.slowloris_closed,
            self.slowloris_opened,
            listed(self.non_readers.iter().map(|(n, s)| format!("{n}: {s}")).collect(), "; ")
        )
    }

    /// HAProxy marked no replica DOWN: its counters of DOWN transitions
    /// (`downs`, per replica) did not move and no poll saw one.
    fn no_replica_down(&self, downs: &[u64]) -> Check {
        let states = self
            .not_up
            .iter()
            .map(|(i, s)| format!("replica {i} {s}"))
            .collect::<Vec<_>>();
        Check {
            what: "HAProxy marks no replica DOWN".into(),
            passed: downs.iter().all(|&d| d == 0) && self.not_up.is_empty(),
            seen: format!(
                "DOWN transitions per replica {downs:?}{}",
                if states.is_empty() {
                    String::new()
                } else {
                    format!("; seen: {}", states.join(", "))
                }
            ),
        }
    }

    /// Every `/health` probe answered 200, the p99 under [`HEALTH_P99_MS`].
    fn health_held(&self) -> Check {
        let lat: Vec<f64> = self.probes.iter().map(|p| p.0).collect();
        let latency = stats::summarize(&lat);
        let max = lat.iter().copied().fold(0.0, f64::max);
        let failed = self.probes.iter().filter(|p| !p.1).count();
        Check {
            what: format!("every replica's /health answers 200, p99 under {HEALTH_P99_MS:.0} ms"),
            passed: !self.probes.is_empty() && failed == 0 && latency.p99 < HEALTH_P99_MS,
            seen: format!(
                "{} probes, {failed} failed (no 200 within {} s), p50 {:.1} ms, p99 {:.1} ms, max {max:.1} ms",
                self.probes.len(),
                PROBE_TIMEOUT.as_secs(),
                latency.p50,
                latency.p99
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_addresses_are_read() {
        assert_eq!(status_of(b"HTTP/1.1 400 Bad Request\r\n"), Some(400));
        assert_eq!(status_of(b"garbage"), None);
        assert_eq!(status_of(b""), None);
        assert_eq!(
            addr_of("http://127.0.0.1:8080/health").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert!(addr_of("http://localhost:80").is_err());
    }
}
