//! The server's life: the weights loaded in the background, connections
//! accepted (at most `max_connections`, each served by hyper's HTTP/1 with
//! its header-read timeout), then the drain, the grace period and the end
//! of what is still in flight.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Semaphore};

use super::completions::prompt_byte_cap;
use super::error::{self, ApiError};
use super::metrics::StepTimes;
use super::routes;
use super::state::{App, Connection, Engine, ServeConfig};
use gpt2::scheduler::SchedulerConfig;

/// Errors of starting or running the server.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a failed load leaves its error, for [`serve`] to return.
type LoadError = Arc<Mutex<Option<BoxError>>>;

/// Serves on `listener` until `shutdown` resolves (then as described in the
/// crate's doc). `load` runs on a blocking thread with the scheduler
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
    let grace = config.grace;
    let app = Arc::new(App::new(config));
    // `true` once the server should stop: the signal, or a failed load.
    let stop = Arc::new(watch::Sender::new(false));
    let load_error = LoadError::default();
    spawn_load(Arc::clone(&app), load, Arc::clone(&stop), Arc::clone(&load_error));
    spawn_drain(Arc::clone(&app), shutdown, Arc::clone(&stop));
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

/// Runs `load` on a blocking thread: its engine is then served, or its
/// error left in `failed` and the server stopped.
fn spawn_load<L>(app: Arc<App>, load: L, stop: Arc<watch::Sender<bool>>, failed: LoadError)
where
    L: FnOnce(SchedulerConfig) -> gpt2::Result<Engine> + Send + 'static,
{
    let scheduler_config = SchedulerConfig {
        max_batch: app.config.max_batch,
        max_prompt_rows: app.config.max_prompt_rows,
        max_step_rows: app.config.max_step_rows,
        pool: app.config.pool.clone(),
        observer: Some(Arc::new(StepTimes(app.metrics.step.clone()))),
        ..SchedulerConfig::default()
    };
    tokio::spawn(async move {
        let t = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            load(scheduler_config).map(|engine| {
                let cap = prompt_byte_cap(&engine);
                (engine, cap)
            })
        })
        .await;
        let error = match result {
            Ok(Ok((engine, cap))) => return set_engine(&app, engine, cap, t.elapsed()),
            Ok(Err(e)) => BoxError::from(e),
            Err(e) => BoxError::from(format!("loading the model failed: {e}")),
        };
        *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
        stop.send_replace(true);
    });
}

/// The loaded engine goes into service, with its KV cache budget and prompt cap.
fn set_engine(app: &App, engine: Engine, prompt_cap: usize, loaded_in: Duration) {
    let model = engine.scheduler.model();
    let config = &model.config;
    let budget = app
        .config
        .kv_cache_bytes
        .unwrap_or_else(|| default_kv_budget(model));
    eprintln!(
        "gpt2 serve: ready in {:.2} s: model `{}`, dtype {}, {} positions; KV cache budget {} MiB \
         ({} full-context sequences)",
        loaded_in.as_secs_f64(),
        engine.model_id,
        engine.scheduler.model().dtype(),
        config.n_positions,
        budget >> 20,
        budget / model.cache_bytes(config.n_positions).max(1)
    );
    app.metrics
        .kv_budget
        .set(i64::try_from(budget).unwrap_or(i64::MAX));
    let _ = app.kv_budget.set(budget);
    let _ = app.prompt_cap.set(prompt_cap);
    let _ = app.engine.set(Arc::new(engine));
}

/// On `shutdown`, `/health` answers 503 at once; after the drain period,
/// `stop` tells the accept loop to end.
fn spawn_drain<F>(app: Arc<App>, shutdown: F, stop: Arc<watch::Sender<bool>>)
where
    F: Future<Output = ()> + Send + 'static,
{
    let drain = app.config.drain;
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

/// The KV cache budget by default: half of `MemAvailable` (read after the
/// weights are loaded), but at least one full-context sequence; without
/// `/proc/meminfo`, no budget beyond `--max-batch`.
fn default_kv_budget(model: &gpt2::Gpt2Model) -> usize {
    let one = model.cache_bytes(model.config.n_positions);
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
    app: &Arc<App>,
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
