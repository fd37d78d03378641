//! Issuing a test's requests and recording each one: the client side of the
//! benchmark, apart from what serves the requests. A [`Backend`] runs one
//! request (in this process: [`super::in_process::InProcess`]; an HTTP
//! client would be another); [`run_test`] drives it from client threads,
//! closed loop or on a Poisson schedule, and turns what it returns into
//! [`RequestRecord`]s.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use super::RequestRecord;
use crate::progress::Progress;
use crate::rng::Rng;

/// What one request returned, as its client saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Tokens generated.
    pub tokens: usize,
    /// From the submission to the first token.
    pub ttft: Duration,
    /// From the submission to the last token.
    pub total: Duration,
    /// Why generation stopped, for the error of a short request.
    pub stop: String,
}

/// What serves the requests of a test.
pub trait Backend: Sync {
    /// One client thread's state (a session, a connection), made before the
    /// test's clock starts.
    type Client;

    /// The state of client thread `client`, which sends requests of `prompts`.
    fn connect(&self, client: usize, prompts: &[Vec<u32>]) -> Self::Client;

    /// Runs one request to the end; `Err` names why it failed (an error, a
    /// panic).
    fn send(&self, client: &mut Self::Client, prompt: &[u32]) -> Result<Reply, String>;

    /// The client thread is done (after its last request).
    fn disconnect(&self, _client: Self::Client) {}
}

/// One test's requests.
#[derive(Debug, Clone, Copy)]
pub struct Load<'a> {
    /// The test's name and mode, for the status lines.
    pub name: &'a str,
    pub mode: &'a str,
    /// Client threads: requests in flight at most.
    pub concurrency: usize,
    pub requests: usize,
    /// Rotated: request i takes prompt i mod len.
    pub prompts: &'a [Vec<u32>],
    /// Tokens every request must generate; fewer is a failure.
    pub max_new_tokens: usize,
    /// When each request is due, from the start of the test (open loop);
    /// `None`: closed loop, a client sends its next request when its last ends.
    pub arrivals: Option<&'a [Duration]>,
}

/// Runs `load` on `backend`: `requests` requests from `concurrency` client
/// threads, prompts rotated. Closed loop: each client takes the next request
/// when its last one ends. With arrivals, request i is due at its arrival
/// time and its latency counts from then. One status line per request on
/// `progress`. Returns the wall time from the first start to the last end,
/// in seconds, and the records in submission order.
pub fn run_test<B: Backend>(backend: &B, load: &Load, progress: &Progress) -> (f64, Vec<RequestRecord>) {
    let next = AtomicUsize::new(0);
    let barrier = Barrier::new(load.concurrency);
    let t0 = Instant::now();
    let mut records: Vec<RequestRecord> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..load.concurrency)
            .map(|client| {
                let (next, barrier) = (&next, &barrier);
                s.spawn(move || run_client(backend, load, client, next, barrier, t0, progress))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    records.sort_by_key(|r| r.index);
    let start = records.iter().map(|r| r.start_ms).fold(f64::INFINITY, f64::min);
    let end = records
        .iter()
        .map(|r| r.start_ms + r.latency_ms)
        .fold(0.0, f64::max);
    ((end - start).max(0.0) / 1e3, records)
}

/// One client thread: takes the next request index until there are none.
fn run_client<B: Backend>(
    backend: &B,
    load: &Load,
    client: usize,
    next: &AtomicUsize,
    barrier: &Barrier,
    t0: Instant,
    progress: &Progress,
) -> Vec<RequestRecord> {
    let mut state = backend.connect(client, load.prompts);
    let mut records = Vec::new();
    barrier.wait();
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        if index >= load.requests {
            break;
        }
        let prompt = &load.prompts[index % load.prompts.len()];
        // Open loop: wait for the arrival; latency counts from it.
        let start = match load.arrivals {
            Some(a) => {
                let due = t0 + a[index];
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                due
            }
            None => Instant::now(),
        };
        let reply = backend.send(&mut state, prompt);
        let rec = record(
            index,
            client,
            prompt.len(),
            (start - t0).as_secs_f64() * 1e3,
            start.elapsed().as_secs_f64() * 1e3,
            reply,
            load.max_new_tokens,
        );
        let line = format!(
            "[{} {}] request {}/{} (client {client}): {:.0} ms, {} tokens{}",
            load.name,
            load.mode,
            index + 1,
            load.requests,
            rec.latency_ms,
            rec.generated_tokens,
            rec.error
                .as_deref()
                .map(|e| format!(", FAILED: {e}"))
                .unwrap_or_default()
        );
        // A failure stays on screen above a bar; a success is its message.
        if rec.error.is_some() {
            progress.println(&line);
        } else {
            progress.status(&line);
        }
        progress.inc(1);
        records.push(rec);
    }
    backend.disconnect(state);
    records
}

/// A request's record from its reply and its latency from `start_ms`.
fn record(
    index: usize,
    client: usize,
    prompt_tokens: usize,
    start_ms: f64,
    latency_ms: f64,
    reply: Result<Reply, String>,
    max_new_tokens: usize,
) -> RequestRecord {
    let mut rec = RequestRecord {
        index,
        client,
        prompt_tokens,
        generated_tokens: 0,
        start_ms,
        ttft_ms: None,
        latency_ms,
        tpot_ms: None,
        error: None,
    };
    match reply {
        Ok(r) => {
            // The reply's timings count from the submission; add any
            // queueing between the arrival and the submission.
            let queued_ms = latency_ms - r.total.as_secs_f64() * 1e3;
            let k = r.tokens;
            let ttft_ms = queued_ms.max(0.0) + r.ttft.as_secs_f64() * 1e3;
            rec.generated_tokens = k;
            rec.ttft_ms = Some(ttft_ms);
            rec.tpot_ms = (k > 1).then(|| (latency_ms - ttft_ms) / (k - 1) as f64);
            if k != max_new_tokens {
                rec.error = Some(format!(
                    "short: {k} of {max_new_tokens} tokens (stop: {})",
                    r.stop
                ));
            }
        }
        Err(e) => rec.error = Some(e),
    }
    rec
}

/// Arrival times of `n` requests of a Poisson process at `rate` per second:
/// exponential gaps drawn from [`Rng`], so a seed fixes the schedule.
pub fn poisson_arrivals(n: usize, rate: f64, seed: u64) -> Vec<Duration> {
    let mut rng = Rng::new(seed);
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            let at = Duration::from_secs_f64(t);
            t += rng.exponential(rate);
            at
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Replies after `ms`, with `tokens` tokens; prompt [0] fails.
    struct Fake {
        tokens: usize,
        ms: u64,
        connected: Mutex<Vec<usize>>,
    }

    impl Backend for Fake {
        type Client = usize;
        fn connect(&self, client: usize, _prompts: &[Vec<u32>]) -> usize {
            self.connected.lock().unwrap().push(client);
            client
        }
        fn send(&self, _client: &mut usize, prompt: &[u32]) -> Result<Reply, String> {
            if prompt == [0] {
                return Err("boom".into());
            }
            std::thread::sleep(Duration::from_millis(self.ms));
            Ok(Reply {
                tokens: self.tokens,
                ttft: Duration::from_millis(self.ms / 2),
                total: Duration::from_millis(self.ms),
                stop: "Length".into(),
            })
        }
    }

    fn load<'a>(prompts: &'a [Vec<u32>], arrivals: Option<&'a [Duration]>) -> Load<'a> {
        Load {
            name: "t",
            mode: "fake",
            concurrency: 2,
            requests: 5,
            prompts,
            max_new_tokens: 3,
            arrivals,
        }
    }

    #[test]
    fn every_request_is_recorded_once_in_order() {
        let fake = Fake {
            tokens: 3,
            ms: 2,
            connected: Mutex::default(),
        };
        let prompts = [vec![1, 2], vec![0], vec![3]];
        let progress = Progress::with_bar(false, 5, "requests");
        let (secs, recs) = run_test(&fake, &load(&prompts, None), &progress);
        assert!(secs > 0.0);
        assert_eq!(recs.iter().map(|r| r.index).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        let mut clients = fake.connected.into_inner().unwrap();
        clients.sort();
        assert_eq!(clients, [0, 1]);
        for r in &recs {
            if r.index % 3 == 1 {
                assert_eq!(r.error.as_deref(), Some("boom"), "{r:?}");
                assert_eq!((r.generated_tokens, r.ttft_ms), (0, None));
            } else {
                assert_eq!(r.error, None, "{r:?}");
                assert_eq!(r.generated_tokens, 3);
                assert_eq!(r.prompt_tokens, prompts[r.index % 3].len());
                let (ttft, tpot) = (r.ttft_ms.unwrap(), r.tpot_ms.unwrap());
                assert!((r.latency_ms - ttft - 2.0 * tpot).abs() < 1e-9, "{r:?}");
            }
        }
    }

    #[test]
    fn short_requests_fail_and_queueing_counts_in_ttft() {
        let ok = |tokens, total_ms| {
            Ok(Reply {
                tokens,
                ttft: Duration::from_millis(10),
                total: Duration::from_millis(total_ms),
                stop: "Eos".into(),
            })
        };
        let r = record(0, 0, 4, 0.0, 100.0, ok(2, 60), 3);
        assert_eq!(r.error.as_deref(), Some("short: 2 of 3 tokens (stop: Eos)"));
        // 40 ms between the arrival and the submission, then 10 to the first token.
        assert!((r.ttft_ms.unwrap() - 50.0).abs() < 1e-9, "{r:?}");
        assert!((r.tpot_ms.unwrap() - 50.0).abs() < 1e-9, "{r:?}");
        let one = record(0, 0, 4, 0.0, 100.0, ok(1, 100), 1);
        assert_eq!((one.error, one.tpot_ms), (None, None));
    }

    #[test]
    fn arrivals_are_seeded_and_delay_the_requests() {
        let a = poisson_arrivals(50, 100.0, 7);
        assert_eq!(a, poisson_arrivals(50, 100.0, 7), "a seed fixes the schedule");
        assert_ne!(a, poisson_arrivals(50, 100.0, 8));
        assert_eq!(a[0], Duration::ZERO);
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        // Mean gap 10 ms: 49 gaps, well within a factor of 2.
        let last = a[49].as_secs_f64();
        assert!((0.245..0.98).contains(&last), "{last}");

        let fake = Fake {
            tokens: 3,
            ms: 1,
            connected: Mutex::default(),
        };
        let prompts = [vec![1]];
        let due: Vec<Duration> = (0..5).map(|i| Duration::from_millis(20 * i)).collect();
        let progress = Progress::with_bar(false, 5, "requests");
        let (_, recs) = run_test(&fake, &load(&prompts, Some(&due)), &progress);
        for r in &recs {
            assert!((r.start_ms - 20.0 * r.index as f64).abs() < 1e-6, "{r:?}");
        }
    }
}
