//! `/metrics`: the server's counters in the Prometheus text format.
//!
//! Requests are counted by route, status and outcome when they end (a
//! stream when its last event is sent or its client leaves); token counts
//! and latencies as they happen; the scheduler's queue depth and active
//! sequences are read at scrape time, its step times as each step ends.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use gpt2::scheduler::{SchedulerStats, StepObserver, StepStats};

/// Every metric the server exports, registered in its own registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// By `route` (the matched pattern, never the raw path), `status` and
    /// `outcome`: `ok`, `cancelled` (the client left first), `write_stalled`
    /// (the client stopped reading its stream), `shutdown` (ended by the end
    /// of the grace period) or the error's code.
    pub requests: IntCounterVec,
    /// Connections open now.
    pub open_connections: IntGauge,
    /// KV cache bytes reserved by the requests in flight, and the budget.
    pub kv_reserved: IntGauge,
    pub kv_budget: IntGauge,
    /// KV caches the engine keeps for reuse (read at scrape time).
    pub kv_pooled: IntGauge,
    /// Connections closed at once, past `--max-connections`.
    pub connections_refused: IntCounter,
    /// Connections whose client closed (or, without `--half-close`,
    /// half-closed) its side before its request was answered.
    pub closed_mid_request: IntCounter,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub queue_depth: IntGauge,
    pub active_sequences: IntGauge,
    pub in_flight: IntGauge,
    pub draining: IntGauge,
    /// Request arrival to its first token, server side.
    pub ttft: Histogram,
    /// Between two successive tokens of one request.
    pub inter_token: Histogram,
    /// One engine step: forward pass and sampling.
    pub step: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        Metrics {
            requests: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "gpt2_requests_total",
                        "HTTP requests by route, status and outcome",
                    ),
                    &["route", "status", "outcome"],
                )
                .expect("valid counter"),
            ),
            prompt_tokens: counter(r, "gpt2_prompt_tokens_total", "Prompt tokens admitted"),
            generated_tokens: counter(r, "gpt2_generated_tokens_total", "Tokens generated"),
            queue_depth: gauge(
                r,
                "gpt2_queue_depth",
                "Requests submitted to the engine, not yet in the batch",
            ),
            active_sequences: gauge(r, "gpt2_active_sequences", "Sequences in the engine's batch"),
            in_flight: gauge(
                r,
                "gpt2_requests_in_flight",
                "Completion requests admitted and not yet over",
            ),
            draining: gauge(
                r,
                "gpt2_draining",
                "1 once the server is shutting down (/health answers 503), else 0",
            ),
            open_connections: gauge(r, "gpt2_open_connections", "HTTP connections open now"),
            kv_reserved: gauge(
                r,
                "gpt2_kv_cache_reserved_bytes",
                "KV cache bytes reserved by the requests in flight (resident at most)",
            ),
            kv_budget: gauge(
                r,
                "gpt2_kv_cache_budget_bytes",
                "KV cache bytes the requests in flight may reserve together (--kv-cache-mib)",
            ),
            kv_pooled: gauge(
                r,
                "gpt2_kv_caches_pooled",
                "KV caches kept for reuse while the engine is busy (released when it goes idle)",
            ),
            connections_refused: counter(
                r,
                "gpt2_connections_refused_total",
                "Connections answered 503 and closed because --max-connections were open",
            ),
            closed_mid_request: counter(
                r,
                "gpt2_connections_closed_mid_request_total",
                "Connections whose client closed its side before its request was answered",
            ),
            ttft: histogram(
                r,
                "gpt2_time_to_first_token_seconds",
                "Request arrival to its first generated token",
                0.000_5,
            ),
            inter_token: histogram(
                r,
                "gpt2_inter_token_latency_seconds",
                "Time between two tokens of one request",
                0.000_1,
            ),
            step: histogram(
                r,
                "gpt2_step_seconds",
                "One engine step: a batched forward pass and sampling",
                0.000_1,
            ),
            registry,
        }
    }

    /// The text exposition, with the engine's gauges as of now (`None`
    /// while the model loads).
    pub fn render(&self, engine: Option<SchedulerStats>) -> String {
        let stats = engine.unwrap_or_default();
        self.queue_depth.set(stats.queued as i64);
        self.active_sequences.set(stats.active as i64);
        self.kv_pooled.set(stats.pooled_caches as i64);
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# cannot encode the metrics: {e}\n"))
    }

    pub fn observe_ttft(&self, d: Duration) {
        self.ttft.observe(d.as_secs_f64());
    }

    pub fn observe_inter_token(&self, d: Duration) {
        self.inter_token.observe(d.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `metric`, registered in `registry` (each name once).
fn register<M: Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help).expect("valid counter"))
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid gauge"))
}

/// 16 buckets, doubling from `start` seconds.
fn histogram(registry: &Registry, name: &str, help: &str, start: f64) -> Histogram {
    let buckets = exponential_buckets(start, 2.0, 16).expect("valid bucket parameters");
    let opts = HistogramOpts::new(name, help).buckets(buckets);
    register(registry, Histogram::with_opts(opts).expect("valid histogram"))
}

/// The scheduler's step times go straight into the histogram.
#[derive(Debug)]
pub struct StepTimes(pub Histogram);

impl StepObserver for StepTimes {
    fn on_step(&self, step: &StepStats) {
        self.0.observe(step.elapsed.as_secs_f64());
    }
}
