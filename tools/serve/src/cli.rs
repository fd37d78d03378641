//! The `gpt2 serve` process: its flags ([`ServeArgs`]), checked into a
//! [`ServeConfig`]; the HTTP runtime, the listening socket and the
//! SIGINT/SIGTERM that start the shutdown; the weights loaded into an
//! [`Engine`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gpt2::memory::{self, Footprint};
use gpt2::scheduler::{Scheduler, SchedulerConfig};
use gpt2::{Dtype, Gpt2Config, Gpt2Model, KvDtype};
use gpt2_hub::{self as hub, DtypeArgs, WeightsArgs, WeightsSource};

use super::chat::ChatTemplate;
use super::server::{serve, BoxError};
use super::state::{Engine, ServeConfig};

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
    /// Sequences that may wait for a batch slot (a request runs one per
    /// prompt and choice: prompts x n); a request that would put more than
    /// max-batch + max-queue in flight gets 429, whole.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Most prompt rows prefilled per step, beside the decode rows.
    #[arg(long, default_value_t = 128)]
    pub max_prompt_rows: usize,
    /// While sequences decode, most rows per step: decode rows first, a
    /// long prompt's chunk fills the rest (at least half the decode rows),
    /// so its prefill does not stall the streams.
    #[arg(long, default_value_t = SchedulerConfig::default().max_step_rows)]
    pub max_step_rows: usize,
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
    /// MiB of finished requests' KV caches kept for prefix reuse: a request
    /// whose prompt starts like one of theirs prefills only the rest (least
    /// recently used out; 0 turns reuse off). A budget of its own, beside
    /// --kv-cache-mib (which bounds the requests in flight).
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub prefix_cache_mib: usize,
    /// Most connections open at once; more get a 503 and are closed.
    /// Default: the open-files limit less 64 for the rest of the process,
    /// at most 4096 (1024 when the limit is unknown).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// A JSON chat template for /v1/chat/completions, replacing the plain
    /// "Role: content" transcript: {"message": "{role}: {content}\n",
    /// "roles": {...}, "generation": "Assistant:", "stop": [...]} (see the
    /// serve crate's chat module).
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
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

impl ServeArgs {
    /// The server's configuration, every flag checked.
    fn config(&self) -> Result<ServeConfig, BoxError> {
        let api_key = self
            .api_key
            .clone()
            .or_else(|| std::env::var("GPT2_API_KEY").ok().filter(|k| !k.is_empty()));
        if api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return Err("--api-key must not be empty".into());
        }
        if self.max_batch == 0 || self.max_prompt_rows == 0 || self.max_step_rows == 0 {
            return Err(format!(
                "--max-batch ({}), --max-prompt-rows ({}) and --max-step-rows ({}) must be at least 1",
                self.max_batch, self.max_prompt_rows, self.max_step_rows
            )
            .into());
        }
        // A drain or a grace period may be 0; a timeout may not.
        for (flag, secs, least) in [
            ("--drain-seconds", self.drain_seconds, 0.0),
            ("--grace-seconds", self.grace_seconds, 0.0),
            ("--header-timeout-seconds", self.header_timeout_seconds, 0.001),
            ("--body-timeout-seconds", self.body_timeout_seconds, 0.001),
            ("--write-stall-seconds", self.write_stall_seconds, 0.001),
        ] {
            if !(secs.is_finite() && (least..=86_400.0).contains(&secs)) {
                return Err(format!("{flag} must be between {least} and 86400 seconds, got {secs}").into());
            }
        }
        let max_connections = self.max_connections.unwrap_or_else(default_max_connections);
        let kv_cache_bytes = match self.kv_cache_mib {
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
        Ok(ServeConfig {
            max_batch: self.max_batch,
            max_queue: self.max_queue,
            max_prompt_rows: self.max_prompt_rows,
            max_step_rows: self.max_step_rows,
            pool: self.pool()?,
            api_key,
            drain: Duration::from_secs_f64(self.drain_seconds),
            grace: Duration::from_secs_f64(self.grace_seconds),
            body_limit: self.max_body_bytes,
            header_timeout: Duration::from_secs_f64(self.header_timeout_seconds),
            body_timeout: Duration::from_secs_f64(self.body_timeout_seconds),
            max_connections,
            write_stall: Duration::from_secs_f64(self.write_stall_seconds),
            half_close: self.half_close,
            kv_cache_bytes,
            chat_template: match &self.chat_template {
                Some(path) => ChatTemplate::from_file(path)?,
                None => ChatTemplate::default(),
            },
        })
    }

    /// `--prefix-cache-mib` in bytes.
    fn prefix_cache_bytes(&self) -> Result<usize, BoxError> {
        let mib = self.prefix_cache_mib;
        mib.checked_mul(1 << 20)
            .ok_or_else(|| format!("--prefix-cache-mib {mib} is past the address space").into())
    }

    /// The engine's own pool of `--threads`, if given.
    fn pool(&self) -> Result<Option<Arc<rayon::ThreadPool>>, BoxError> {
        match self.threads {
            Some(0) => Err("--threads must be at least 1".into()),
            Some(n) => Ok(Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("gpt2-pool-{i}"))
                    .build()
                    .map_err(|e| format!("cannot start {n} engine threads: {e}"))?,
            ))),
            None => Ok(None),
        }
    }
}

/// `gpt2 serve`: binds, prints `gpt2 serve: listening on http://ADDR`, loads
/// the weights in the background and serves until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> Result<(), BoxError> {
    let config = args.config()?;
    let prefix_cache_bytes = args.prefix_cache_bytes()?;
    // Every admitted sequence holds a blocking thread (its bridge) until it
    // ends, and parsing takes one more for a moment: room for all of them.
    let blocking = config.max_batch + config.max_queue + 64;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(blocking.max(512))
        .thread_name("gpt2-http")
        .build()
        .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
    let result = runtime.block_on(listen_and_serve(args, config, prefix_cache_bytes));
    // Bridges of cancelled requests end at their next token; do not wait on them.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

/// Binds `--host`:`--port` and serves there until SIGINT or SIGTERM.
async fn listen_and_serve(
    args: ServeArgs,
    config: ServeConfig,
    prefix_cache_bytes: usize,
) -> Result<(), BoxError> {
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
    let (weights, dtypes, kv_budget) = (args.weights, args.dtype, config.kv_cache_bytes);
    serve(
        listener,
        config,
        // The server sets the scheduler's limits; the prefix cache's budget is the binary's flag.
        move |sc| {
            let sc = SchedulerConfig {
                prefix_cache_bytes,
                ..sc
            };
            load_engine(&weights, dtypes, sc, kv_budget)
        },
        shutdown_signal(),
    )
    .await
}

/// Resolves and loads the weights (announcing where they came from, SYNTHETIC
/// ones included) and starts the scheduler over them; first refuses, before
/// a weight is read, a server that could outgrow the memory it can have
/// ([`check_memory`]). `kv_budget`: `--kv-cache-mib` in bytes, if given.
pub fn load_engine(
    weights: &WeightsArgs,
    dtypes: DtypeArgs,
    config: SchedulerConfig,
    kv_budget: Option<usize>,
) -> gpt2::Result<Engine> {
    let (dtype, kv) = (dtypes.dtype, dtypes.kv_dtype);
    let resolved = hub::resolve(weights)?;
    check_memory(&resolved.dir, dtype, kv, &config, kv_budget)?;
    eprintln!("gpt2 serve: loading the weights ({dtype}, KV cache {kv}) ...");
    let tokenizer = resolved.load_tokenizer()?;
    let model = Arc::new(Gpt2Model::load_with(&resolved.dir, dtype)?.with_kv_dtype(kv));
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

/// Refuses a server over the checkpoint in `dir` whose weights in `dtype`,
/// KV caches and work buffers could together need more memory than the
/// process can have, reading only its config.json. The KV caches are those
/// the server can grow to: `--max-batch` full-context sequences, or fewer
/// when the KV budget (`kv_budget`, else the server's default: half of
/// `MemAvailable` once the weights are in) holds fewer; beside them the
/// prefix cache's budget. The work buffers are a step's rows: `--max-batch`
/// decode rows plus `--max-prompt-rows` prompt rows.
fn check_memory(
    dir: &Path,
    dtype: Dtype,
    kv: KvDtype,
    sc: &SchedulerConfig,
    kv_budget: Option<usize>,
) -> gpt2::Result<()> {
    let (config_path, _) = gpt2::weights::checkpoint_files(dir);
    let model = Gpt2Config::from_file(&config_path)?;
    let positions = model.n_positions;
    let rows = sc.max_batch.saturating_add(sc.max_prompt_rows);
    let estimate = |sequences| Footprint::estimate(&model, dtype, kv, sequences, positions, rows);
    let one = estimate(1);
    let budget = match kv_budget {
        Some(bytes) => bytes as u64,
        None => gpt2::profile::mem_available_bytes()
            .map_or(u64::MAX, |available| available.saturating_sub(one.weights) / 2),
    };
    let sequences = budget
        .div_ceil(one.kv_per_sequence.max(1))
        .clamp(1, sc.max_batch as u64);
    let footprint = Footprint {
        prefix_cache: sc.prefix_cache_bytes as u64,
        ..estimate(sequences as usize)
    };
    let what = format!(
        "`gpt2 serve` of {} ({dtype}, KV cache {kv}): {sequences} sequences of {positions} positions (--max-batch {}, \
         --kv-cache-mib {}), {rows} rows a step (--max-batch + --max-prompt-rows {}), --prefix-cache-mib {}",
        dir.display(),
        sc.max_batch,
        kv_budget.map_or_else(|| "default".to_string(), |b| (b >> 20).to_string()),
        sc.max_prompt_rows,
        sc.prefix_cache_bytes >> 20
    );
    memory::check(&footprint, &what)
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
