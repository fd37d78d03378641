//! `gpt2 serve`: an OpenAI-compatible HTTP server over the continuous-batching
//! [`Scheduler`], so concurrent clients share each forward step.
//!
//! [`serve`] binds nothing itself: it takes a listener (so tests can use
//! port 0 and run it in-process), starts loading the weights in the
//! background (`/health` is 503 until they are ready) and serves until the
//! shutdown future resolves. Then it drains: `/health` answers 503 at once
//! (a load balancer's check takes the replica out) while requests are still
//! served for the drain period; then it stops accepting, lets in-flight
//! requests finish within the grace period and ends the rest (a 503, or an
//! error event and `[DONE]` in a stream). Connections are accepted by our
//! own loop, at most `max_connections` at once, each served by hyper's
//! HTTP/1 builder with its header-read timeout (which also closes idle
//! keep-alive connections). [`run`] is the binary's side: flags, the
//! listening socket, SIGINT/SIGTERM.
//!
//! The modules, each above the ones it uses: `routes` (the router, the log
//! and API-key layers, the small endpoints), `completions` (`POST
//! /v1/completions`: body, checks, admission, submission), `reply` (its
//! answer: one JSON body or server-sent events), `stream` (the bridge: token
//! ids to text pieces, stop strings, cancellation), `state` (what they all
//! share: the configuration, the engine, the request slots and log lines),
//! `request` (parsing a completion request's JSON body), `metrics`
//! (Prometheus), `error` (OpenAI-style error bodies).

mod completions;
mod error;
mod metrics;
mod reply;
mod request;
mod routes;
mod state;
mod stream;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Semaphore};

pub use error::ApiError;
pub use metrics::{Metrics, StepTimes};
pub use request::{CompletionRequest, Prompt};
pub use state::{Connection, Engine, ServeConfig};
pub use stream::StopFilter;

use gpt2::scheduler::{Scheduler, SchedulerConfig};
use gpt2::{Dtype, Gpt2Model};
use gpt2_hub::{self as hub, DtypeArgs, WeightsArgs, WeightsSource};

/// Errors of starting or running the server.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves on `listener` until `shutdown` resolves (then as described in the
/// module doc). `load` runs on a blocking thread with the scheduler
/// configuration to use (limits, pool, the metrics' step observer); its
/// error stops the server and is returned.
pub async fn serve<L, F>(
    listener: tokio::net::TcpListener,
    config: ServeConfig,
    load: L,
    shutdown: F,
) -> Result<(), BoxError>
where
    L: FnOnce(SchedulerConfig) -> gpt2::Result<Engine> + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (drain, grace) = (config.drain, config.grace);
    let app = Arc::new(state::App::new(config));
    let scheduler_config = SchedulerConfig {
        max_batch: app.config.max_batch,
        max_prompt_rows: app.config.max_prompt_rows,
        pool: app.config.pool.clone(),
        observer: Some(Arc::new(StepTimes(app.metrics.step.clone()))),
        ..SchedulerConfig::default()
    };
    // `true` once the server should stop: the signal, or a failed load.
    let stop = Arc::new(watch::Sender::new(false));
    let load_error = Arc::new(std::sync::Mutex::new(None));
    {
        let (app, stop, load_error) = (Arc::clone(&app), Arc::clone(&stop), Arc::clone(&load_error));
        tokio::spawn(async move {
            let t = Instant::now();
            let result = tokio::task::spawn_blocking(move || {
                load(scheduler_config).map(|engine| {
                    let cap = completions::prompt_byte_cap(&engine);
                    (engine, cap)
                })
            })
            .await;
            match result {
                Ok(Ok((engine, cap))) => {
                    let config = &engine.scheduler.model().config;
                    let budget = app
                        .config
                        .kv_cache_bytes
                        .unwrap_or_else(|| default_kv_budget(config));
                    eprintln!(
                        "gpt2 serve: ready in {:.2} s: model `{}`, dtype {}, {} positions; KV cache budget {} MiB \
                         ({} full-context sequences)",
                        t.elapsed().as_secs_f64(),
                        engine.model_id,
                        engine.scheduler.model().dtype(),
                        config.n_positions,
                        budget >> 20,
                        budget / gpt2::model::KvCache::resident_bytes(config, config.n_positions).max(1)
                    );
                    app.metrics
                        .kv_budget
                        .set(i64::try_from(budget).unwrap_or(i64::MAX));
                    let _ = app.kv_budget.set(budget);
                    let _ = app.prompt_cap.set(cap);
                    let _ = app.engine.set(Arc::new(engine));
                }
                Ok(Err(e)) => {
                    *load_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(BoxError::from(e));
                    stop.send_replace(true);
                }
                Err(e) => {
                    let e = format!("loading the model failed: {e}");
                    *load_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(BoxError::from(e));
                    stop.send_replace(true);
                }
            }
        });
    }
    {
        let (app, stop) = (Arc::clone(&app), Arc::clone(&stop));
        tokio::spawn(async move {
            shutdown.await;
            app.start_draining();
            if !drain.is_zero() {
                eprintln!(
                    "gpt2 serve: draining: /health answers 503; requests are still served for {} s",
                    drain.as_secs_f64()
                );
                tokio::time::sleep(drain).await;
            }
            stop.send_replace(true);
        });
    }
    let graceful = GracefulShutdown::new();
    accept(&listener, &app, &graceful, stop.subscribe()).await;
    drop(listener);
    let failed = load_error.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(e) = failed {
        return Err(e);
    }
    eprintln!(
        "gpt2 serve: shutting down: no new connections; {} requests in flight get {} s to finish",
        app.in_flight(),
        grace.as_secs_f64()
    );
    // Keep-alive is turned off and idle connections close; those with a
    // request in flight close once it is answered.
    let all_closed = graceful.shutdown();
    tokio::pin!(all_closed);
    if tokio::time::timeout(grace, &mut all_closed).await.is_err() {
        eprintln!(
            "gpt2 serve: grace period over; ending {} requests still in flight (503, or an error event in a stream)",
            app.in_flight()
        );
        app.abort_in_flight();
        // Time to write those answers; a client that does not read them is not waited for.
        let _ = tokio::time::timeout(ABORT_FLUSH, &mut all_closed).await;
    }
    eprintln!("gpt2 serve: stopped");
    Ok(())
}

/// The KV cache budget by default: half of `MemAvailable` (read after the
/// weights are loaded), but at least one full-context sequence; without
/// `/proc/meminfo`, no budget beyond `--max-batch`.
fn default_kv_budget(config: &gpt2::Gpt2Config) -> usize {
    let one = gpt2::model::KvCache::resident_bytes(config, config.n_positions);
    gpt2::profile::mem_available_bytes().map_or(usize::MAX, |bytes| {
        (usize::try_from(bytes).unwrap_or(usize::MAX) / 2).max(one)
    })
}

/// After the grace period, how long the answers to the requests it ended may take to go out.
const ABORT_FLUSH: Duration = Duration::from_secs(2);

/// Accepts connections until `stop` says so, each served on its own task by
/// hyper with the configured timeouts, at most `max_connections` at once.
async fn accept(
    listener: &tokio::net::TcpListener,
    app: &Arc<state::App>,
    graceful: &GracefulShutdown,
    stop: watch::Receiver<bool>,
) {
    let router = routes::router(Arc::clone(app));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(app.config.header_timeout)
        .half_close(app.config.half_close)
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(app.config.max_connections));
    let stopping = stopped(stop);
    tokio::pin!(stopping);
    loop {
        let (tcp, _peer) = tokio::select! {
            () = &mut stopping => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before
                    // it was taken: wait a little rather than spin.
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                    ) {
                        eprintln!("gpt2 serve: cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            app.metrics.connections_refused.inc();
            tokio::spawn(refuse(tcp, app.config.max_connections));
            continue;
        };
        // Each SSE chunk is a small write: without TCP_NODELAY, Nagle holds it back until the
        // previous one is acknowledged, which the client may delay by tens of milliseconds.
        if let Err(e) = tcp.set_nodelay(true) {
            eprintln!("gpt2 serve: cannot set TCP_NODELAY on a connection: {e}");
        }
        let connection = Arc::new(Connection::default());
        let service = {
            let (router, connection) = (TowerToHyperService::new(router.clone()), Arc::clone(&connection));
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(Arc::clone(&connection));
                router.call(req)
            })
        };
        let conn = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
        let app = Arc::clone(app);
        app.metrics.open_connections.inc();
        tokio::spawn(async move {
            tokio::select! {
                ended = conn => {
                    // The other errors are the client's (a reset, a timeout): nothing to do.
                    if ended.is_err_and(|e| e.is_incomplete_message()) {
                        app.metrics.closed_mid_request.inc();
                        eprintln!(
                            "gpt2 serve: a client closed its side of a connection before its request was \
                             answered; the request was dropped (--half-close answers a client that only \
                             shut down its sending side)"
                        );
                    }
                }
                () = connection.closed() => {}
            }
            app.metrics.open_connections.dec();
            drop(slot);
        });
    }
}

/// A connection past `--max-connections`: a 503 and closed, without
/// reading its request.
async fn refuse(mut tcp: tokio::net::TcpStream, max: usize) {
    let body = ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        format!("the server has {max} connections open, its most; retry later"),
    )
    .body()
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {}\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        error::RETRY_AFTER_SECS,
        body.len()
    );
    let write = async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Resolves once `rx` holds `true` (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The `gpt2 serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on. Default 127.0.0.1 (loopback only).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one (printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    #[command(flatten)]
    pub weights: WeightsArgs,
    #[command(flatten)]
    pub dtype: DtypeArgs,
    /// Most sequences decoded together in one forward step.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Requests that may wait for a batch slot; more in flight than
    /// max-batch + max-queue get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Most prompt rows prefilled per step, beside the decode rows.
    #[arg(long, default_value_t = 128)]
    pub max_prompt_rows: usize,
    /// Threads of the engine's pool (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Require `Authorization: Bearer KEY` on every route but /health
    /// (default: the GPT2_API_KEY environment variable, if set).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// On SIGINT/SIGTERM, how long /health answers 503 while requests are
    /// still taken, before the server stops listening: at least a load
    /// balancer's health-check interval times its fall count, so that it
    /// stops routing here first.
    #[arg(long, default_value_t = 0.0)]
    pub drain_seconds: f64,
    /// After the drain, how long in-flight requests may run before they are cancelled.
    #[arg(long, default_value_t = 10.0)]
    pub grace_seconds: f64,
    /// Largest request body accepted, in bytes (413 past it, at once when
    /// its Content-Length says so, `Expect: 100-continue` included).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// A connection is closed when a request's head has not arrived within
    /// this: a partial header, and an idle keep-alive connection (counted
    /// from the end of its last response).
    #[arg(long, default_value_t = 30.0)]
    pub header_timeout_seconds: f64,
    /// A request whose body has not arrived whole within this gets 408.
    #[arg(long, default_value_t = 30.0)]
    pub body_timeout_seconds: f64,
    /// A stream whose client has read nothing for this long is cancelled
    /// and its connection closed (outcome `write_stalled`).
    #[arg(long, default_value_t = 30.0)]
    pub write_stall_seconds: f64,
    /// Answer a request whose client shuts its sending side down after it
    /// (`shutdown(SHUT_WR)`). Off (the default), the end of a client's input
    /// means it left: its request is dropped and counted
    /// (gpt2_connections_closed_mid_request_total), which is how a client
    /// that gave up on a non-streaming request is noticed before its answer
    /// is due; with it, such a client is noticed only when that answer is
    /// written. TCP cannot tell the two apart.
    #[arg(long)]
    pub half_close: bool,
    /// MiB the KV caches of the requests in flight may reserve together
    /// (each request reserves what its prompt + max_tokens positions fill);
    /// past it a request gets 429 kv_cache_full. Default: half the memory
    /// available once the weights are loaded.
    #[arg(long, value_name = "MIB")]
    pub kv_cache_mib: Option<usize>,
    /// Most connections open at once; more get a 503 and are closed.
    /// Default: the open-files limit less 64 for the rest of the process,
    /// at most 4096 (1024 when the limit is unknown).
    #[arg(long)]
    pub max_connections: Option<usize>,
}

/// `--max-connections`' default: the soft open-files limit
/// (`/proc/self/limits`) less 64, between 16 and 4096; 1024 if unknown.
fn default_max_connections() -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<usize>().ok()
        });
    limit.map_or(1024, |n| n.saturating_sub(64).clamp(16, 4096))
}

/// `gpt2 serve`: binds, prints `gpt2 serve: listening on http://ADDR`, loads
/// the weights in the background and serves until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> Result<(), BoxError> {
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("GPT2_API_KEY").ok().filter(|k| !k.is_empty()));
    if api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return Err("--api-key must not be empty".into());
    }
    if args.max_batch == 0 || args.max_prompt_rows == 0 {
        return Err(format!(
            "--max-batch ({}) and --max-prompt-rows ({}) must be at least 1",
            args.max_batch, args.max_prompt_rows
        )
        .into());
    }
    for (flag, secs) in [
        ("--drain-seconds", args.drain_seconds),
        ("--grace-seconds", args.grace_seconds),
    ] {
        if !(secs.is_finite() && (0.0..=86_400.0).contains(&secs)) {
            return Err(format!("{flag} must be between 0 and 86400 seconds, got {secs}").into());
        }
    }
    for (flag, secs) in [
        ("--header-timeout-seconds", args.header_timeout_seconds),
        ("--body-timeout-seconds", args.body_timeout_seconds),
        ("--write-stall-seconds", args.write_stall_seconds),
    ] {
        if !(secs.is_finite() && (0.001..=86_400.0).contains(&secs)) {
            return Err(format!("{flag} must be between 0.001 and 86400 seconds, got {secs}").into());
        }
    }
    let max_connections = args.max_connections.unwrap_or_else(default_max_connections);
    let kv_cache_bytes = match args.kv_cache_mib {
        Some(0) => return Err("--kv-cache-mib must be at least 1".into()),
        Some(mib) => Some(
            mib.checked_mul(1 << 20)
                .ok_or_else(|| format!("--kv-cache-mib {mib} is past the address space"))?,
        ),
        None => None,
    };
    if max_connections == 0 {
        return Err("--max-connections must be at least 1".into());
    }
    let pool = match args.threads {
        Some(0) => return Err("--threads must be at least 1".into()),
        Some(n) => Some(Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .thread_name(|i| format!("gpt2-pool-{i}"))
                .build()
                .map_err(|e| format!("cannot start {n} engine threads: {e}"))?,
        )),
        None => None,
    };
    let config = ServeConfig {
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        max_prompt_rows: args.max_prompt_rows,
        pool,
        api_key,
        drain: Duration::from_secs_f64(args.drain_seconds),
        grace: Duration::from_secs_f64(args.grace_seconds),
        body_limit: args.max_body_bytes,
        header_timeout: Duration::from_secs_f64(args.header_timeout_seconds),
        body_timeout: Duration::from_secs_f64(args.body_timeout_seconds),
        max_connections,
        write_stall: Duration::from_secs_f64(args.write_stall_seconds),
        half_close: args.half_close,
        kv_cache_bytes,
    };
    // Every admitted request holds a blocking thread (its bridge) until it
    // ends, and parsing takes one more for a moment: room for all of them.
    let blocking = config.max_batch + config.max_queue + 64;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(blocking.max(512))
        .thread_name("gpt2-http")
        .build()
        .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
    let result = runtime.block_on(async move {
        let host = args.host.clone().unwrap_or_else(|| "127.0.0.1".into());
        let listener = tokio::net::TcpListener::bind((host.as_str(), args.port))
            .await
            .map_err(|e| format!("cannot listen on {host}:{}: {e}", args.port))?;
        let addr = listener.local_addr()?;
        eprintln!("gpt2 serve: listening on http://{addr}");
        if config.api_key.is_none() && !addr.ip().is_loopback() {
            eprintln!(
                "gpt2 serve: warning: listening on {addr} without an API key: anyone who can reach it \
                 can use it (set --api-key or GPT2_API_KEY)"
            );
        }
        let (weights, dtype) = (args.weights.clone(), args.dtype.dtype);
        serve(
            listener,
            config,
            move |sc| load_engine(&weights, dtype, sc),
            shutdown_signal(),
        )
        .await
    });
    // Bridges of cancelled requests end at their next token; do not wait on them.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

/// Resolves and loads the weights (announcing where they came from, SYNTHETIC
/// ones included) and starts the scheduler over them.
pub fn load_engine(weights: &WeightsArgs, dtype: Dtype, config: SchedulerConfig) -> gpt2::Result<Engine> {
    eprintln!("gpt2 serve: loading the weights ({dtype}) ...");
    let resolved = hub::resolve(weights)?;
    let tokenizer = resolved.load_tokenizer()?;
    let model = Arc::new(Gpt2Model::load_with(&resolved.dir, dtype)?);
    let weights_text = resolved.source.describe(model.config.synthetic.as_ref());
    eprintln!("gpt2 serve: weights: {weights_text}");
    let synthetic = resolved.source.is_synthetic(model.config.synthetic.as_ref());
    let model_id = match &resolved.source {
        WeightsSource::Hub { model_id, .. } => model_id.clone(),
        WeightsSource::Local { dir } => dir
            .file_name()
            .map_or_else(|| "gpt2".into(), |n| n.to_string_lossy().into_owned()),
        WeightsSource::Synthetic { preset, .. } => format!("gpt2-synthetic-{preset}"),
    };
    Ok(Engine {
        scheduler: Scheduler::new(model, config)?,
        tokenizer,
        model_id,
        weights: weights_text,
        synthetic,
    })
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
