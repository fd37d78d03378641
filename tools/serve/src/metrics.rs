//! `/metrics`: the server's counters in the Prometheus text format.
//!
//! Requests are counted by route, status and outcome when they end (a
//! stream when its last event is sent or its client leaves); token counts
//! and latencies as they happen; the scheduler's queue depth and active
//! sequences are read at scrape time, its step times as each step ends.

use std::time::Duration;

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

fn histogram(name: &str, help: &str, start: f64, count: usize) -> Histogram {
    let buckets = exponential_buckets(start, 2.0, count).expect("valid bucket parameters");
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid histogram")
}

impl Metrics {
    pub fn new() -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "gpt2_requests_total",
                "HTTP requests by route, status and outcome",
            ),
            &["route", "status", "outcome"],
        )
        .expect("valid counter");
        let prompt_tokens =
            IntCounter::new("gpt2_prompt_tokens_total", "Prompt tokens admitted").expect("valid counter");
        let generated_tokens =
            IntCounter::new("gpt2_generated_tokens_total", "Tokens generated").expect("valid counter");
        let queue_depth = IntGauge::new(
            "gpt2_queue_depth",
            "Requests submitted to the engine, not yet in the batch",
        )
        .expect("valid gauge");
        let active_sequences =
            IntGauge::new("gpt2_active_sequences", "Sequences in the engine's batch").expect("valid gauge");
        let in_flight = IntGauge::new(
            "gpt2_requests_in_flight",
            "Completion requests admitted and not yet over",
        )
        .expect("valid gauge");
        let draining = IntGauge::new(
            "gpt2_draining",
            "1 once the server is shutting down (/health answers 503), else 0",
        )
        .expect("valid gauge");
        let ttft = histogram(
            "gpt2_time_to_first_token_seconds",
            "Request arrival to its first generated token",
            0.000_5,
            16,
        );
        let inter_token = histogram(
            "gpt2_inter_token_latency_seconds",
            "Time between two tokens of one request",
            0.000_1,
            16,
        );
        let step = histogram(
            "gpt2_step_seconds",
            "One engine step: a batched forward pass and sampling",
            0.000_1,
            16,
        );
        let open_connections =
            IntGauge::new("gpt2_open_connections", "HTTP connections open now").expect("valid gauge");
        let connections_refused = IntCounter::new(
            "gpt2_connections_refused_total",
            "Connections answered 503 and closed because --max-connections were open",
        )
        .expect("valid counter");
        let closed_mid_request = IntCounter::new(
            "gpt2_connections_closed_mid_request_total",
            "Connections whose client closed its side before its request was answered",
        )
        .expect("valid counter");
        let kv_reserved = IntGauge::new(
            "gpt2_kv_cache_reserved_bytes",
            "KV cache bytes reserved by the requests in flight (resident at most)",
        )
        .expect("valid gauge");
        let kv_budget = IntGauge::new(
            "gpt2_kv_cache_budget_bytes",
            "KV cache bytes the requests in flight may reserve together (--kv-cache-mib)",
        )
        .expect("valid gauge");
        let kv_pooled = IntGauge::new(
            "gpt2_kv_caches_pooled",
            "KV caches kept for reuse while the engine is busy (released when it goes idle)",
        )
        .expect("valid gauge");
        let registry = Registry::new();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(prompt_tokens.clone()),
            Box::new(generated_tokens.clone()),
            Box::new(queue_depth.clone()),
            Box::new(active_sequences.clone()),
            Box::new(in_flight.clone()),
            Box::new(draining.clone()),
            Box::new(open_connections.clone()),
            Box::new(kv_reserved.clone()),
            Box::new(kv_budget.clone()),
            Box::new(kv_pooled.clone()),
            Box::new(connections_refused.clone()),
            Box::new(closed_mid_request.clone()),
            Box::new(ttft.clone()),
            Box::new(inter_token.clone()),
            Box::new(step.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            open_connections,
            kv_reserved,
            kv_budget,
            kv_pooled,
            connections_refused,
            closed_mid_request,
            prompt_tokens,
            generated_tokens,
            queue_depth,
            active_sequences,
            in_flight,
            draining,
            ttft,
            inter_token,
            step,
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

/// The scheduler's step times go straight into the histogram.
#[derive(Debug)]
pub struct StepTimes(pub Histogram);

impl StepObserver for StepTimes {
    fn on_step(&self, step: &StepStats) {
        self.0.observe(step.elapsed.as_secs_f64());
    }
}
