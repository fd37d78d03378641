//! Issuing a test's requests and recording each one: the client side of the
//! benchmark, apart from what serves the requests. A [`Backend`] runs one
//! request (in this process: [`super::in_process::InProcess`]; over HTTP:
//! [`super::http::Http`]); [`run_test`] drives it from client threads,
//! closed loop or on a Poisson schedule, turns what it returns into
//! [`RequestRecord`]s, and tells an [`Observer`] as it goes (`throughput`'s
//! status lines, `soak`'s memory samples). It is the one load loop: every
//! test of `throughput` (in process or `--url`) and every mode of `soak` runs
//! through it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::RequestRecord;
use crate::failure::Failure;
use crate::progress::Progress;
use gpt2::rng::Rng;

/// What one request returned, as its client saw it: its timings, and each
/// completion it asked for (one, or `--choices` sharing the prompt).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// From the submission to the first token of any choice.
    pub ttft: Duration,
    /// From the submission to the end: the last choice's last token (in
    /// process), the stream's end (a server).
    pub total: Duration,
    /// Each choice, in index order.
    pub choices: Vec<Choice>,
}

/// One completion of a [`Reply`].
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Tokens generated.
    pub tokens: usize,
    /// From the submission to each token, in order; what the inter-token
    /// latencies are computed from.
    pub token_times: Vec<Duration>,
    /// Why generation stopped, for the error of a short request.
    pub stop: String,
}

impl Reply {
    /// A reply of one choice of `tokens` tokens that arrived at
    /// `token_times`, the first at `ttft`, the request ending at `total`.
    pub fn one(
        tokens: usize,
        ttft: Duration,
        total: Duration,
        token_times: Vec<Duration>,
        stop: String,
    ) -> Reply {
        Reply {
            ttft,
            total,
            choices: vec![Choice {
                tokens,
                token_times,
                stop,
            }],
        }
    }

    /// Tokens generated, every choice's.
    pub fn tokens(&self) -> usize {
        self.choices.iter().map(|c| c.tokens).sum()
    }
}

/// What serves the requests of a test.
pub trait Backend: Sync {
    /// One client thread's state (a session, a connection), made before the
    /// test's clock starts.
    type Client;

    /// The state of client thread `client`, which sends requests of `prompts`.
    fn connect(&self, client: usize, prompts: &[Vec<u32>]) -> Self::Client;

    /// Runs one request to the end: `prompt`, greedy, `choices`
    /// completions of exactly `max_new_tokens` new tokens each (a backend
    /// made for one count, as the HTTP one is, is only sent that count);
    /// `Err` names why it failed (an error, a panic).
    fn send(
        &self,
        client: &mut Self::Client,
        prompt: &[u32],
        max_new_tokens: usize,
        choices: usize,
    ) -> Result<Reply, Failure>;

    /// The client thread is done (after its last request).
    fn disconnect(&self, _client: Self::Client) {}

    /// The prefix cache's counters so far, where this backend keeps one
    /// that can be read (the in-process scheduler); a test's reuse is
    /// their difference over it.
    fn prefix_stats(&self) -> Option<gpt2::prefix::PrefixStats> {
        None
    }
}

/// One test's requests.
#[derive(Debug, Clone, Copy)]
pub struct Load<'a> {
    /// The test's name, mode and weight format, for the status lines.
    pub name: &'a str,
    pub mode: &'a str,
    pub dtype: &'a str,
    /// Client threads: requests in flight at most.
    pub concurrency: usize,
    pub requests: usize,
    /// Rotated: request i takes prompt i mod len.
    pub prompts: &'a [Vec<u32>],
    /// Tokens request i must generate, rotated the same way: one count for
    /// every request (`throughput`), or one per prompt (`soak`'s mix).
    /// Fewer or more is a failure.
    pub max_new_tokens: &'a [usize],
    /// Completions of each request (OpenAI `n`), each of its token count;
    /// another number of them is a failure.
    pub choices: usize,
    /// When each request is due, from the start of the test (open loop);
    /// `None`: closed loop, a client sends its next request when its last ends.
    pub arrivals: Option<&'a [Duration]>,
}

impl Load<'_> {
    /// The prompt and token count of request `index`.
    fn request(&self, index: usize) -> (&[u32], usize) {
        (
            &self.prompts[index % self.prompts.len()],
            self.max_new_tokens[index % self.max_new_tokens.len()],
        )
    }

    /// `[name mode dtype]`, how every status line of the test starts.
    fn tag(&self) -> String {
        format!("[{} {} {}]", self.name, self.mode, self.dtype)
    }
}

/// What a driver is told as a test runs: [`Progress`] shows `throughput`'s
/// status lines; `soak` also samples memory.
pub trait Observer: Sync {
    /// Every client is connected (its state made): the test's clock starts
    /// when this returns, and no request was sent before.
    fn started(&self) {}

    /// A client took request `index`, before it waits for its arrival or
    /// sends it.
    fn taken(&self, _index: usize) {}

    /// A request waits longer than [`LONG_WAIT`] for its open-loop arrival:
    /// `line` says which and how long.
    fn waiting(&self, line: &str);

    /// Request `record` of `load` ended (succeeded or failed).
    fn ended(&self, load: &Load, record: &RequestRecord);
}

/// `throughput`'s view of a test: one status line per request (the bar's
/// message on a terminal; a failure stays on screen), counted on the bar.
impl Observer for Progress {
    fn waiting(&self, line: &str) {
        self.status(line);
    }

    fn ended(&self, load: &Load, rec: &RequestRecord) {
        let line = format!(
            "{} request {}/{} (client {}): {:.0} ms, {} tokens{}",
            load.tag(),
            rec.index + 1,
            load.requests,
            rec.client,
            rec.latency_ms,
            rec.generated_tokens,
            rec.error
                .as_deref()
                .map(|e| format!(", FAILED: {e}"))
                .unwrap_or_default()
        );
        // A failure stays on screen above a bar; a success is its message.
        if rec.error.is_some() {
            self.println(&line);
        } else {
            self.status(&line);
        }
        self.inc(1);
    }
}

/// Most client threads one test may start (`--levels`): past this a level
/// measures thread creation, not the engine.
pub const MAX_CLIENTS: usize = 1024;

/// An open-loop wait longer than this shows as a status line.
pub const LONG_WAIT: Duration = Duration::from_secs(1);

/// Runs `load` on `backend`: `requests` requests from `concurrency` client
/// threads, prompts rotated. Every client connects first; when all have,
/// `observer` is told and the clock starts. Closed loop: each client takes
/// the next request when its last one ends. With arrivals, request i is due
/// at its arrival time from the clock's start and its latency counts from
/// then. `observer` sees each request taken and ended. Returns the wall time
/// from the first start to the last end, in seconds, and the records in
/// submission order.
///
/// If a client thread cannot be started (the OS refuses a thread), those
/// already started are released without sending anything and the error
/// names the thread and the level.
pub fn run_test<B: Backend>(
    backend: &B,
    load: &Load,
    observer: &impl Observer,
) -> Result<(f64, Vec<RequestRecord>), String> {
    let next = AtomicUsize::new(0);
    let gate = Gate::default();
    let (mut records, spawn_error) = std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(load.concurrency);
        let mut spawn_error = None;
        for client in 0..load.concurrency {
            let (next, gate) = (&next, &gate);
            let spawned = std::thread::Builder::new()
                .name(format!("client-{client}"))
                .spawn_scoped(s, move || run_client(backend, load, client, next, gate, observer));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    spawn_error = Some(format!(
                        "{} {} {}: could not start client thread {} of {}: {e}",
                        load.name,
                        load.mode,
                        load.dtype,
                        client + 1,
                        load.concurrency
                    ));
                    break;
                }
            }
        }
        if spawn_error.is_none() {
            gate.wait_connected(handles.len());
            observer.started();
        }
        gate.open(spawn_error.is_none());
        let records: Vec<RequestRecord> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect();
        (records, spawn_error)
    });
    if let Some(e) = spawn_error {
        return Err(e);
    }
    records.sort_by_key(|r| r.index);
    let start = records.iter().map(|r| r.start_ms).fold(f64::INFINITY, f64::min);
    let end = records
        .iter()
        .map(|r| r.start_ms + r.latency_ms)
        .fold(0.0, f64::max);
    Ok(((end - start).max(0.0) / 1e3, records))
}

/// Where client threads wait until all of them are started and connected:
/// opened with `true` to go (the clock starts then), or `false` to leave
/// without sending anything. Unlike a `Barrier` sized to the level, a
/// thread that never started cannot leave the others waiting forever.
#[derive(Default)]
struct Gate {
    state: std::sync::Mutex<GateState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct GateState {
    /// Clients connected so far.
    connected: usize,
    /// `None` while closed; then whether to go, and when it opened.
    opened: Option<(bool, Instant)>,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One more client is connected.
    fn connected(&self) {
        self.lock().connected += 1;
        self.changed.notify_all();
    }

    /// Blocks until `clients` clients are connected.
    fn wait_connected(&self, clients: usize) {
        let guard = self.lock();
        drop(
            self.changed
                .wait_while(guard, |s| s.connected < clients)
                .unwrap_or_else(|e| e.into_inner()),
        );
    }

    fn open(&self, go: bool) {
        self.lock().opened = Some((go, Instant::now()));
        self.changed.notify_all();
    }

    /// Blocks until opened; whether to go, and when it opened (the clock's start).
    fn wait(&self) -> (bool, Instant) {
        let guard = self.lock();
        let guard = self
            .changed
            .wait_while(guard, |s| s.opened.is_none())
            .unwrap_or_else(|e| e.into_inner());
        guard.opened.unwrap_or((false, Instant::now()))
    }
}

/// Tells the gate its client is connected when dropped: after `connect`
/// returns, or as a panic in it unwinds, so the test never waits for a
/// client that is gone.
struct Connected<'a>(&'a Gate);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.connected();
    }
}

/// One client thread: connects, then takes the next request index until
/// there are none.
fn run_client<B: Backend>(
    backend: &B,
    load: &Load,
    client: usize,
    next: &AtomicUsize,
    gate: &Gate,
    observer: &impl Observer,
) -> Vec<RequestRecord> {
    let mut state = {
        let _connected = Connected(gate);
        backend.connect(client, load.prompts)
    };
    let mut records = Vec::new();
    let (go, t0) = gate.wait();
    if !go {
        backend.disconnect(state);
        return records;
    }
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        if index >= load.requests {
            break;
        }
        observer.taken(index);
        let (prompt, max_new_tokens) = load.request(index);
        // Open loop: wait for the arrival; latency counts from it.
        let start = match load.arrivals {
            Some(a) => {
                let due = t0 + a[index];
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    if wait > LONG_WAIT {
                        observer.waiting(&format!(
                            "{} request {}/{} arrives in {:.1} s",
                            load.tag(),
                            index + 1,
                            load.requests,
                            wait.as_secs_f64()
                        ));
                    }
                    std::thread::sleep(wait);
                }
                due
            }
            None => Instant::now(),
        };
        let reply = backend.send(&mut state, prompt, max_new_tokens, load.choices);
        let rec = record(
            index,
            client,
            prompt.len(),
            (start - t0).as_secs_f64() * 1e3,
            start.elapsed().as_secs_f64() * 1e3,
            reply,
            (max_new_tokens, load.choices),
        );
        observer.ended(load, &rec);
        records.push(rec);
    }
    backend.disconnect(state);
    records
}

/// A request's record from its reply and its latency from `start_ms`;
/// `asked` is (tokens per choice, choices).
fn record(
    index: usize,
    client: usize,
    prompt_tokens: usize,
    start_ms: f64,
    latency_ms: f64,
    reply: Result<Reply, Failure>,
    asked: (usize, usize),
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
        token_ms: Vec::new(),
        choice_ms: Vec::new(),
        error: None,
        cause: None,
    };
    let r = match reply {
        Ok(r) => r,
        Err(e) => {
            rec.fail(e);
            return rec;
        }
    };
    // The reply's timings count from the submission; add any queueing
    // between the arrival and the submission.
    let queued_ms = (latency_ms - r.total.as_secs_f64() * 1e3).max(0.0);
    let ttft_ms = queued_ms + r.ttft.as_secs_f64() * 1e3;
    rec.generated_tokens = r.tokens();
    rec.ttft_ms = Some(ttft_ms);
    // Per token of one choice after the first: the choices of a request
    // advance together, one token each per step.
    let longest = r.choices.iter().map(|c| c.tokens).max().unwrap_or(0);
    rec.tpot_ms = (longest > 1).then(|| (latency_ms - ttft_ms) / (longest - 1) as f64);
    let mut times: Vec<Vec<f64>> = r
        .choices
        .iter()
        .map(|c| {
            c.token_times
                .iter()
                .map(|t| queued_ms + t.as_secs_f64() * 1e3)
                .collect()
        })
        .collect();
    if times.len() == 1 {
        rec.token_ms = times.remove(0);
    } else {
        rec.choice_ms = times;
    }
    let (max_new_tokens, choices) = asked;
    if r.choices.len() != choices {
        let got = r.choices.len();
        rec.fail(Failure::Choices { got, asked: choices });
        return rec;
    }
    // The first choice of the wrong length names the failure.
    for c in r.choices {
        let (tokens, asked, stop) = (c.tokens, max_new_tokens, c.stop);
        if tokens < asked {
            rec.fail(Failure::Short { tokens, asked, stop });
            break;
        } else if tokens > asked {
            rec.fail(Failure::Long { tokens, asked, stop });
            break;
        }
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
        fn send(
            &self,
            _client: &mut usize,
            prompt: &[u32],
            _max_new_tokens: usize,
            _choices: usize,
        ) -> Result<Reply, Failure> {
            if prompt == [0] {
                return Err(Failure::Engine {
                    message: "boom".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(self.ms));
            Ok(Reply::one(
                self.tokens,
                Duration::from_millis(self.ms / 2),
                Duration::from_millis(self.ms),
                vec![Duration::from_millis(self.ms / 2), Duration::from_millis(self.ms)],
                "Length".into(),
            ))
        }
    }

    fn load<'a>(prompts: &'a [Vec<u32>], arrivals: Option<&'a [Duration]>) -> Load<'a> {
        Load {
            name: "t",
            mode: "fake",
            dtype: "f32",
            concurrency: 2,
            requests: 5,
            prompts,
            max_new_tokens: &[3],
            choices: 1,
            arrivals,
        }
    }

    /// A gate opened with `false` releases every waiter at once: what lets
    /// a test whose last client thread could not start end instead of hang.
    #[test]
    fn a_closed_gate_releases_its_waiters() {
        for go in [false, true] {
            let gate = Gate::default();
            let went = std::thread::scope(|s| {
                let waiters: Vec<_> = (0..4).map(|_| s.spawn(|| gate.wait().0)).collect();
                std::thread::sleep(Duration::from_millis(20));
                gate.open(go);
                waiters.into_iter().map(|w| w.join().unwrap()).collect::<Vec<_>>()
            });
            assert_eq!(went, [go; 4]);
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
        let (secs, recs) = run_test(&fake, &load(&prompts, None), &progress).unwrap();
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
            Ok(Reply::one(
                tokens,
                Duration::from_millis(10),
                Duration::from_millis(total_ms),
                vec![Duration::from_millis(10), Duration::from_millis(total_ms)],
                "Eos".into(),
            ))
        };
        let r = record(0, 0, 4, 0.0, 100.0, ok(2, 60), (3, 1));
        assert_eq!(r.error.as_deref(), Some("short: 2 of 3 tokens (stop: Eos)"));
        // 40 ms between the arrival and the submission, then 10 to the first token.
        assert!((r.ttft_ms.unwrap() - 50.0).abs() < 1e-9, "{r:?}");
        assert_eq!(
            r.token_ms,
            [50.0, 100.0],
            "token times count from the arrival too"
        );
        let long = record(0, 0, 4, 0.0, 100.0, ok(2, 60), (1, 1));
        assert_eq!(
            long.error.as_deref(),
            Some("long: 2 tokens where 1 were asked (stop: Eos)")
        );
        assert!((r.tpot_ms.unwrap() - 50.0).abs() < 1e-9, "{r:?}");
        let one = record(0, 0, 4, 0.0, 100.0, ok(1, 100), (1, 1));
        assert_eq!((one.error, one.tpot_ms), (None, None));
    }

    /// A request of several choices counts every choice's tokens, its TTFT
    /// is the first token of any, its TPOT a step of one choice; each
    /// choice must have the count asked, and there must be as many choices.
    #[test]
    fn choices_count_together_and_each_is_checked() {
        let ms = Duration::from_millis;
        let choice = |tokens: usize, first: u64| Choice {
            tokens,
            token_times: (0..tokens as u64).map(|i| ms(first + 10 * i)).collect(),
            stop: "Length".into(),
        };
        let reply = |choices| {
            Ok(Reply {
                ttft: ms(20),
                total: ms(60),
                choices,
            })
        };
        let r = record(
            0,
            0,
            4,
            0.0,
            60.0,
            reply(vec![choice(3, 20), choice(3, 30)]),
            (3, 2),
        );
        assert_eq!(r.error, None, "{r:?}");
        assert_eq!((r.generated_tokens, r.ttft_ms), (6, Some(20.0)));
        assert!(
            (r.tpot_ms.unwrap() - 20.0).abs() < 1e-9,
            "(60 - 20) / 2 steps: {r:?}"
        );
        assert_eq!(r.choice_ms, [vec![20.0, 30.0, 40.0], vec![30.0, 40.0, 50.0]]);
        assert!(r.token_ms.is_empty());

        let short = record(
            0,
            0,
            4,
            0.0,
            60.0,
            reply(vec![choice(3, 20), choice(2, 30)]),
            (3, 2),
        );
        assert_eq!(
            short.error.as_deref(),
            Some("short: 2 of 3 tokens (stop: Length)")
        );
        let fewer = record(0, 0, 4, 0.0, 60.0, reply(vec![choice(3, 20)]), (3, 2));
        assert_eq!(fewer.cause, Some(Failure::Choices { got: 1, asked: 2 }));
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
        let (_, recs) = run_test(&fake, &load(&prompts, Some(&due)), &progress).unwrap();
        for r in &recs {
            assert!((r.start_ms - 20.0 * r.index as f64).abs() < 1e-6, "{r:?}");
        }
    }
}
