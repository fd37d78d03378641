//! What the server's parts share: its configuration, the loaded engine,
//! each connection's handle, and the accounting of each request: its slots
//! and KV cache reservation ([`InFlight`]) and its log line ([`RequestLog`]).
//! Below the routes and the bridge, which both hold them.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{Method, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{watch, Notify};

use super::chat::ChatTemplate;
use super::error::ApiError;
use super::metrics::Metrics;
use gpt2::scheduler::Scheduler;
use gpt2::tokenizer::Gpt2Tokenizer;

/// How the server runs (everything but where the weights come from).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Most sequences decoded together (and the most choices, `n`, of one prompt).
    pub max_batch: usize,
    /// Sequences that may wait for a batch slot: a request needs one per
    /// choice of each prompt (`n` × prompts), and gets 429 if they would
    /// pass `max_batch + max_queue` in flight (400 if they always would).
    pub max_queue: usize,
    /// Most prompt rows per engine step.
    pub max_prompt_rows: usize,
    /// While sequences decode, most rows per engine step
    /// (`SchedulerConfig::max_step_rows`).
    pub max_step_rows: usize,
    /// The engine's rayon pool; `None` uses the global one.
    pub pool: Option<Arc<rayon::ThreadPool>>,
    /// When set, every route but `/health` needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// After the shutdown signal, how long `/health` says 503 while new
    /// requests are still taken (so a load balancer stops sending them).
    pub drain: Duration,
    /// After the drain, how long in-flight requests may run on.
    pub grace: Duration,
    /// Largest request body accepted (413 past it).
    pub body_limit: usize,
    /// A connection must deliver a request's whole head within this, from
    /// its start or from the end of the previous response: a partial header
    /// and an idle keep-alive connection are closed after it (hyper's
    /// `header_read_timeout`).
    pub header_timeout: Duration,
    /// A request's whole body must arrive within this (408 past it).
    pub body_timeout: Duration,
    /// Most connections open at once; past it a new one gets a 503 and is closed.
    pub max_connections: usize,
    /// A stream whose client has taken nothing for this long is cancelled,
    /// its connection closed and its slot freed.
    pub write_stall: Duration,
    /// Answer a request whose client shut its sending side down after it
    /// (hyper's `half_close`). Off, such an end of input counts as the client
    /// leaving (its request is cancelled, counted in
    /// `gpt2_connections_closed_mid_request_total`), which is also how a
    /// client that gave up on a non-streaming request is noticed before its
    /// answer is written: TCP cannot tell the two apart.
    pub half_close: bool,
    /// Bytes the KV caches of the requests in flight may reserve together
    /// (429 `kv_cache_full` past it); `None`: half the memory available
    /// (`MemAvailable`) once the weights are loaded.
    pub kv_cache_bytes: Option<usize>,
    /// How `/v1/chat/completions` renders `messages` into a prompt
    /// (`--chat-template FILE`, else the plain transcript: see `chat.rs`).
    pub chat_template: ChatTemplate,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_batch: 32,
            max_queue: 256,
            max_prompt_rows: 128,
            max_step_rows: gpt2::SchedulerConfig::default().max_step_rows,
            pool: None,
            api_key: None,
            drain: Duration::ZERO,
            grace: Duration::from_secs(10),
            body_limit: 1 << 20,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
            write_stall: Duration::from_secs(30),
            half_close: false,
            kv_cache_bytes: None,
            chat_template: ChatTemplate::default(),
        }
    }
}

/// One accepted connection, as its requests see it (a request extension).
#[derive(Debug, Default)]
pub struct Connection {
    closed: Notify,
}

impl Connection {
    /// Drops the connection now, whatever it is doing (a write the client
    /// does not read included).
    pub fn close(&self) {
        self.closed.notify_one();
    }

    /// Resolves once [`close`](Connection::close) is called.
    pub(crate) async fn closed(&self) {
        self.closed.notified().await;
    }
}

/// The loaded model behind the server.
pub struct Engine {
    pub scheduler: Scheduler,
    pub tokenizer: Gpt2Tokenizer,
    /// The id `/v1/models` lists and responses echo by default.
    pub model_id: String,
    /// Where the weights came from, in words.
    pub weights: String,
    pub synthetic: bool,
}

/// What every handler shares.
pub struct App {
    pub config: ServeConfig,
    pub metrics: Metrics,
    /// Set once the weights are loaded; `/health` is 503 until then.
    pub engine: OnceLock<Arc<Engine>>,
    /// `true` once the shutdown grace period is over: bridges cancel their
    /// sequences at the next token, requests still waiting answer 503, and
    /// streams end with an error event and `[DONE]`.
    pub aborted: watch::Sender<bool>,
    /// Longest text prompt in bytes that can fit the context window: set
    /// with the engine (see [`prompt_byte_cap`](super::completions::prompt_byte_cap)).
    pub prompt_cap: OnceLock<usize>,
    /// Bytes all in-flight requests' KV caches may reserve together, set
    /// with the engine (`--kv-cache-mib`, or half the memory available then).
    pub kv_budget: OnceLock<usize>,
    kv_reserved: AtomicUsize,
    /// Set on the shutdown signal: `/health` answers 503 from then on.
    draining: AtomicBool,
    /// Requests admitted and not yet over.
    in_flight: AtomicUsize,
    /// Their sequences (one per choice of each prompt), against `max_batch + max_queue`.
    sequences: AtomicUsize,
    next_id: AtomicU64,
    /// SHA-256 of the API key: comparing digests keeps the comparison
    /// constant-time whatever the length of the presented key.
    key_digest: Option<[u8; 32]>,
    started: u64,
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl App {
    pub fn new(config: ServeConfig) -> Self {
        let key_digest = config
            .api_key
            .as_ref()
            .map(|k| Sha256::digest(k.as_bytes()).into());
        App {
            config,
            metrics: Metrics::new(),
            engine: OnceLock::new(),
            aborted: watch::Sender::new(false),
            prompt_cap: OnceLock::new(),
            kv_budget: OnceLock::new(),
            kv_reserved: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            sequences: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            key_digest,
            started: unix_now(),
        }
    }

    pub fn engine(&self) -> Result<Arc<Engine>, ApiError> {
        self.engine.get().cloned().ok_or_else(ApiError::not_ready)
    }

    /// Seconds since the epoch when the server started (`created` of the
    /// model card, and part of every completion's id).
    pub fn started(&self) -> u64 {
        self.started
    }

    /// A number no other request of this server has.
    pub fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether routes need an API key.
    pub fn needs_key(&self) -> bool {
        self.key_digest.is_some()
    }

    /// Whether `key` is the API key (compared in constant time).
    pub fn key_matches(&self, key: &str) -> bool {
        self.key_digest.as_ref().is_some_and(|want| {
            let got: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            bool::from(got.ct_eq(want))
        })
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// From now on `/health` answers 503 (requests are still served).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.metrics.draining.set(1);
    }

    /// The grace period is over: what is still in flight is ended now.
    pub fn abort_in_flight(&self) {
        self.aborted.send_replace(true);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The most sequences in flight at once: `max_batch + max_queue`.
    pub fn max_sequences(&self) -> usize {
        self.config.max_batch.saturating_add(self.config.max_queue)
    }

    /// Slots for a request of `sequences` sequences, unless they would put
    /// more than [`max_sequences`](App::max_sequences) in flight, and `kv`
    /// bytes of the KV cache budget, unless they are taken: all of it, or
    /// (429) none.
    pub fn admit(self: &Arc<Self>, sequences: usize, kv: usize) -> Result<InFlight, ApiError> {
        add_within(&self.sequences, sequences, self.max_sequences()).map_err(|n| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!(
                    "the server is full: {n} sequences in flight (max_batch {} + max_queue {}), and this request \
                     needs {sequences} more; retry later",
                    self.config.max_batch, self.config.max_queue
                ),
            )
        })?;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.metrics.in_flight.inc();
        // Dropped on the way out if the reservation fails: the slots are freed again.
        let slot = InFlight {
            app: Arc::clone(self),
            sequences,
            kv: 0,
        };
        let budget = self.kv_budget.get().copied().unwrap_or(usize::MAX);
        let reserved = add_within(&self.kv_reserved, kv, budget).map_err(|r| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "kv_cache_full",
                format!(
                    "the server's KV cache budget is taken: {} of {} MiB reserved by the requests in \
                     flight, and this one needs {:.1} MiB more; retry later",
                    r >> 20,
                    budget >> 20,
                    kv as f64 / (1 << 20) as f64
                ),
            )
        })?;
        self.metrics.kv_reserved.set((reserved + kv) as i64);
        let mut slot = slot;
        slot.kv = kv;
        Ok(slot)
    }
}

/// Adds `n` to `counter` unless the sum would pass `limit`: the count
/// before, or the count that left no room.
fn add_within(counter: &AtomicUsize, n: usize, limit: usize) -> Result<usize, usize> {
    counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
        c.checked_add(n).filter(|&t| t <= limit)
    })
}

/// An admitted request; its slots and its KV cache reservation are freed on drop.
pub struct InFlight {
    app: Arc<App>,
    sequences: usize,
    /// Bytes of the KV cache budget reserved.
    kv: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let app = &self.app;
        app.in_flight.fetch_sub(1, Ordering::AcqRel);
        app.sequences.fetch_sub(self.sequences, Ordering::AcqRel);
        app.metrics.in_flight.dec();
        if self.kv > 0 {
            let left = app.kv_reserved.fetch_sub(self.kv, Ordering::AcqRel) - self.kv;
            app.metrics.kv_reserved.set(left as i64);
        }
    }
}

/// One request's log line, written (and counted in `/metrics`) when the
/// last holder drops it: the logging layer as the response starts, or the
/// request's bridge once its generation is over, whichever is later.
pub struct RequestLog {
    app: Arc<App>,
    method: Method,
    path: String,
    route: String,
    start: Instant,
    /// 0 until the response starts; a client that left before is logged as
    /// 499 (nginx's "client closed request").
    status: AtomicU16,
    outcome: Mutex<Option<&'static str>>,
    pub prompt: AtomicUsize,
    pub generated: AtomicUsize,
}

impl RequestLog {
    /// The log of a request that starts now.
    pub fn new(app: Arc<App>, method: Method, path: String, route: String) -> Self {
        RequestLog {
            app,
            method,
            path,
            route,
            start: Instant::now(),
            status: AtomicU16::new(0),
            outcome: Mutex::new(None),
            prompt: AtomicUsize::new(0),
            generated: AtomicUsize::new(0),
        }
    }

    /// The response starts with `status`.
    pub fn responded(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }

    /// The first outcome set wins: a later "ok" cannot hide a cancellation.
    pub fn set_outcome(&self, outcome: &'static str) {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        o.get_or_insert(outcome);
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let status = match self.status.load(Ordering::Relaxed) {
            0 => 499,
            s => s,
        };
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(match status {
                499 => "cancelled",
                s if s < 400 => "ok",
                _ => "error",
            });
        let (prompt, generated) = (
            self.prompt.load(Ordering::Relaxed),
            self.generated.load(Ordering::Relaxed),
        );
        eprintln!(
            "gpt2 serve: {} {} {status} {outcome} prompt_tokens={prompt} generated_tokens={generated} {:.1} ms",
            self.method,
            self.path,
            self.start.elapsed().as_secs_f64() * 1e3
        );
        self.app
            .metrics
            .requests
            .with_label_values(&[self.route.as_str(), &status.to_string(), outcome])
            .inc();
    }
}
