//! `/metrics`: the server's counters in the Prometheus text format.
//!
//! Requests are counted by route, status and outcome when they end (a
//! stream when its last event is sent or its client leaves); token counts
//! and latencies as they happen; the scheduler's queue depth and active
//! sequences are read at scrape time, its step times as each step ends.
//!
//! Beside our own `gpt2_*` names, the series an inference gateway routes and
//! scales on, under vLLM's names and types (the model-server protocol of the
//! Gateway API inference extension; KEDA and HPA examples use them too):
//! `vllm:num_requests_waiting`, `vllm:num_requests_running`,
//! `vllm:kv_cache_usage_perc` (a fraction, 0 to 1, as vLLM's), and the
//! `vllm:time_to_first_token_seconds` and `vllm:e2e_request_latency_seconds`
//! histograms with vLLM's bucket boundaries. Prometheus allows `:` in metric
//! names (vLLM exports these so), and so does the `prometheus` crate. vLLM
//! labels them with `model_name` (and `engine`); ours carry no labels: one
//! server serves one model, and the gateway's endpoint picker reads the
//! series whatever its labels.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    exponential_buckets, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use gpt2::prefix::PrefixStats;
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
    /// vLLM's names, for the inference gateways (see the module doc).
    pub gateway: Gateway,
    /// The engine's prefix cache.
    pub prefix: PrefixCache,
}

/// The series inference gateways route and scale on, under vLLM's names and
/// types: the scheduler's queue and batch and KV use over the budget (set
/// at scrape time), TTFT and end-to-end latency with vLLM's buckets.
#[derive(Debug)]
pub struct Gateway {
    pub num_requests_waiting: IntGauge,
    pub num_requests_running: IntGauge,
    pub kv_cache_usage: Gauge,
    /// Fed by [`Metrics::observe_ttft`] beside `gpt2_time_to_first_token_seconds`.
    pub ttft: Histogram,
    /// A generation's arrival to the last byte of its answer (200s only).
    pub e2e_latency: Histogram,
}

/// The engine's prefix-cache totals, caught up at scrape time (see
/// [`catch_up`]), and the bytes it keeps now.
#[derive(Debug)]
pub struct PrefixCache {
    pub hits: IntCounter,
    pub tokens_reused: IntCounter,
    pub bytes: IntGauge,
    /// Held while the counters catch up, so two scrapes at once cannot both
    /// add the same difference.
    catching_up: Mutex<()>,
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
            gateway: Gateway::new(r),
            prefix: PrefixCache::new(r),
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
        self.gateway
            .set(&stats, self.kv_reserved.get(), self.kv_budget.get());
        self.prefix.set(&stats.prefix);
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# cannot encode the metrics: {e}\n"))
    }

    /// Into both TTFT histograms: ours and vLLM's buckets.
    pub fn observe_ttft(&self, d: Duration) {
        self.ttft.observe(d.as_secs_f64());
        self.gateway.ttft.observe(d.as_secs_f64());
    }

    /// A generation answered whole (200), from its arrival.
    pub fn observe_e2e(&self, d: Duration) {
        self.gateway.e2e_latency.observe(d.as_secs_f64());
    }

    pub fn observe_inter_token(&self, d: Duration) {
        self.inter_token.observe(d.as_secs_f64());
    }
}

impl Gateway {
    fn new(r: &Registry) -> Self {
        Gateway {
            num_requests_waiting: gauge(
                r,
                "vllm:num_requests_waiting",
                "Requests waiting to be processed (the engine's queue; gpt2_queue_depth)",
            ),
            num_requests_running: gauge(
                r,
                "vllm:num_requests_running",
                "Requests in the engine's batch (gpt2_active_sequences)",
            ),
            kv_cache_usage: register(
                r,
                Gauge::new(
                    "vllm:kv_cache_usage_perc",
                    "KV cache use, 0 to 1: the bytes reserved by the requests in flight over the budget \
                     the server admits (--kv-cache-mib)",
                )
                .expect("valid gauge"),
            ),
            ttft: histogram_with(
                r,
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds",
                &VLLM_TTFT_BUCKETS,
            ),
            e2e_latency: histogram_with(
                r,
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds: a generation's arrival to the last byte \
                 of its 200 answer",
                &VLLM_LATENCY_BUCKETS,
            ),
        }
    }

    /// The gauges, from the engine's stats and the KV bytes reserved of the budget.
    fn set(&self, stats: &SchedulerStats, kv_reserved: i64, kv_budget: i64) {
        self.num_requests_waiting.set(stats.queued as i64);
        self.num_requests_running.set(stats.active as i64);
        self.kv_cache_usage.set(usage(kv_reserved, kv_budget));
    }
}

impl PrefixCache {
    fn new(r: &Registry) -> Self {
        PrefixCache {
            hits: counter(
                r,
                "gpt2_prefix_cache_hits_total",
                "Requests that started from a cached prefix of a finished request's KV cache",
            ),
            tokens_reused: counter(
                r,
                "gpt2_prefix_cache_tokens_reused_total",
                "Prompt positions taken from the prefix cache instead of computed",
            ),
            bytes: gauge(
                r,
                "gpt2_prefix_cache_bytes",
                "Resident bytes of the KV caches kept for prefix reuse (--prefix-cache-mib)",
            ),
            catching_up: Mutex::new(()),
        }
    }

    /// Catches the counters up with the engine's totals.
    fn set(&self, stats: &PrefixStats) {
        self.bytes.set(i64::try_from(stats.bytes).unwrap_or(i64::MAX));
        let _alone = self.catching_up.lock().unwrap_or_else(|e| e.into_inner());
        catch_up(&self.hits, stats.hits);
        catch_up(&self.tokens_reused, stats.tokens_reused);
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
    histogram_with(registry, name, help, &buckets)
}

fn histogram_with(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(registry, Histogram::with_opts(opts).expect("valid histogram"))
}

/// vLLM's bucket boundaries of `vllm:time_to_first_token_seconds`
/// (`vllm/v1/metrics/loggers.py`), so dashboards made for vLLM read ours alike.
const VLLM_TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's `request_latency_buckets`, those of `vllm:e2e_request_latency_seconds`.
const VLLM_LATENCY_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
];

/// `reserved` over `budget`, within 0..=1 (0 while there is no budget yet).
fn usage(reserved: i64, budget: i64) -> f64 {
    if budget <= 0 {
        return 0.0;
    }
    (reserved as f64 / budget as f64).clamp(0.0, 1.0)
}

/// Brings `counter` up to `total`, a count the engine keeps itself: a
/// Prometheus counter only goes up, so it is raised by the difference (a
/// total below it, read by a scrape that lost a race, changes nothing).
fn catch_up(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// The scheduler's step times go straight into the histogram.
#[derive(Debug)]
pub struct StepTimes(pub Histogram);

impl StepObserver for StepTimes {
    fn on_step(&self, step: &StepStats) {
        self.0.observe(step.elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpt2::prefix::PrefixStats;

    fn stats(queued: usize, active: usize, hits: u64, tokens_reused: u64) -> SchedulerStats {
        SchedulerStats {
            queued,
            active,
            prefix: PrefixStats {
                hits,
                tokens_reused,
                bytes: 4096,
                entries: 1,
            },
            ..SchedulerStats::default()
        }
    }

    /// The value of an unlabeled series in `text`.
    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    #[test]
    fn gateway_series_have_vllm_names_and_types() {
        let m = Metrics::new();
        m.kv_budget.set(1000);
        m.kv_reserved.set(250);
        let text = m.render(Some(stats(3, 2, 0, 0)));
        for (name, kind) in [
            ("vllm:num_requests_waiting", "gauge"),
            ("vllm:num_requests_running", "gauge"),
            ("vllm:kv_cache_usage_perc", "gauge"),
            ("vllm:time_to_first_token_seconds", "histogram"),
            ("vllm:e2e_request_latency_seconds", "histogram"),
            ("gpt2_prefix_cache_hits_total", "counter"),
            ("gpt2_prefix_cache_tokens_reused_total", "counter"),
            ("gpt2_prefix_cache_bytes", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} {kind}:\n{text}"
            );
        }
        assert_eq!(value(&text, "vllm:num_requests_waiting"), 3.0);
        assert_eq!(value(&text, "vllm:num_requests_running"), 2.0);
        assert_eq!(value(&text, "vllm:kv_cache_usage_perc"), 0.25);
        assert_eq!(value(&text, "gpt2_prefix_cache_bytes"), 4096.0);
        // vLLM's boundaries, first and last.
        assert!(
            text.contains(r#"vllm:time_to_first_token_seconds_bucket{le="0.001"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vllm:e2e_request_latency_seconds_bucket{le="7680"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn ttft_feeds_both_histograms() {
        let m = Metrics::new();
        m.observe_ttft(Duration::from_millis(30));
        m.observe_e2e(Duration::from_millis(700));
        let text = m.render(None);
        assert_eq!(value(&text, "gpt2_time_to_first_token_seconds_count"), 1.0);
        assert_eq!(value(&text, "vllm:time_to_first_token_seconds_count"), 1.0);
        assert!(
            text.contains(r#"vllm:time_to_first_token_seconds_bucket{le="0.02"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vllm:time_to_first_token_seconds_bucket{le="0.04"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vllm:e2e_request_latency_seconds_bucket{le="0.5"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vllm:e2e_request_latency_seconds_bucket{le="0.8"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn prefix_counters_follow_the_engine_totals() {
        let m = Metrics::new();
        let text = m.render(Some(stats(0, 0, 2, 126)));
        assert_eq!(value(&text, "gpt2_prefix_cache_hits_total"), 2.0);
        assert_eq!(value(&text, "gpt2_prefix_cache_tokens_reused_total"), 126.0);
        // The same totals again add nothing; a later, larger one adds the rest.
        m.render(Some(stats(0, 0, 2, 126)));
        let text = m.render(Some(stats(0, 0, 3, 189)));
        assert_eq!(value(&text, "gpt2_prefix_cache_hits_total"), 3.0);
        assert_eq!(value(&text, "gpt2_prefix_cache_tokens_reused_total"), 189.0);
        // A stale snapshot (a scrape that lost a race) never lowers a counter.
        let text = m.render(Some(stats(0, 0, 1, 0)));
        assert_eq!(value(&text, "gpt2_prefix_cache_hits_total"), 3.0);
    }

    #[test]
    fn kv_usage_is_a_fraction() {
        assert_eq!(usage(0, 0), 0.0);
        assert_eq!(usage(5, 0), 0.0);
        assert_eq!(usage(0, 100), 0.0);
        assert_eq!(usage(50, 100), 0.5);
        assert_eq!(usage(100, 100), 1.0);
        assert_eq!(usage(i64::MAX, 1), 1.0);
    }
}
