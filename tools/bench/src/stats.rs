//! Statistics of a benchmark run: summaries of request timings, and the
//! analysis (scaling, efficiency, knee, targets, spread) computed from tests.

use super::{
    Analysis, LevelAnalysis, Recommendation, RequestRecord, Spread, Summary, Target, TestResult,
    REFERENCE_STUDY,
};

/// The `q`-quantile (0..=1) of sorted values, interpolating linearly between
/// ranks as numpy's default does. 0 for no values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => {
            let rank = q.clamp(0.0, 1.0) * (n - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// mean / p50 / p95 / p99 of `values` (any order).
pub fn summarize(values: &[f64]) -> Summary {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    };
    Summary {
        mean,
        p50: quantile(&v, 0.50),
        p95: quantile(&v, 0.95),
        p99: quantile(&v, 0.99),
    }
}

/// (mean, sample standard deviation, min, max).
pub fn spread(values: &[f64]) -> (f64, f64, f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0, 0.0, 0.0);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (mean, var.sqrt(), min, max)
}

/// Builds a test's figures from its raw records. `duration_s` is the wall
/// time from the first request's start to the last one's end.
pub fn test_result(
    name: &str,
    mode: &str,
    dtype: &str,
    concurrency: usize,
    repetition: usize,
    duration_s: f64,
    raw: Vec<RequestRecord>,
) -> TestResult {
    let ok: Vec<&RequestRecord> = raw.iter().filter(|r| !r.failed()).collect();
    let total_tokens: usize = ok.iter().map(|r| r.generated_tokens).sum();
    let per_s = |x: f64| if duration_s > 0.0 { x / duration_s } else { 0.0 };
    TestResult {
        name: name.into(),
        mode: mode.into(),
        dtype: dtype.into(),
        concurrency,
        repetition,
        requests: raw.len(),
        failed: raw.len() - ok.len(),
        total_tokens,
        prompt_tokens: raw.iter().map(|r| r.prompt_tokens).sum(),
        duration_s,
        requests_per_s: per_s(ok.len() as f64),
        tokens_per_s: per_s(total_tokens as f64),
        latency_ms: summarize(&ok.iter().map(|r| r.latency_ms).collect::<Vec<_>>()),
        ttft_ms: summarize(&ok.iter().filter_map(|r| r.ttft_ms).collect::<Vec<_>>()),
        tpot_ms: summarize(&ok.iter().filter_map(|r| r.tpot_ms).collect::<Vec<_>>()),
        itl_ms: Some(summarize(&inter_token_ms(&ok))),
        prefix: None,
        cell: None,
        raw,
    }
}

/// The gaps between consecutive tokens of `requests`, all pooled (as vLLM's
/// `bench serve` reports ITL): what a reader of a stream waits per token,
/// stalls included, which TPOT's mean per request smooths away. A request
/// of several choices gives each choice's gaps (its choices' tokens arrive
/// together, and the gap between two of them is no wait of any reader).
pub fn inter_token_ms(requests: &[&RequestRecord]) -> Vec<f64> {
    requests
        .iter()
        .flat_map(|r| std::iter::once(&r.token_ms).chain(&r.choice_ms))
        .flat_map(|times| times.windows(2).map(|w| w[1] - w[0]))
        .collect()
}

/// The targets taken from the reference study (its machine's figures,
/// rounded down): a miss fails the run (exit status 3) by default. Every
/// other target (the continuous-batching ones, the project's own
/// aspirations) is measured and reported, and fails the run only when
/// required: with `--strict`, or when named by `--target`.
pub const REFERENCE_TARGETS: [&str; 5] = [
    "single_requests_per_s",
    "single_tokens_per_s",
    "concurrent_requests_per_s",
    "concurrent_tokens_per_s",
    "failed",
];

/// Every target's name, for the error naming an unknown one.
const KNOWN_TARGETS: &str = "single_requests_per_s, single_tokens_per_s, concurrent_requests_per_s, \
                             concurrent_tokens_per_s, failed, batched_scaling_at_8, batched_tpot_penalty_at_8, \
                             batched_efficiency_at_4, batched_holds_past_8";

/// Overridable pass/fail thresholds (the reference study's targets and the
/// project's own by default), and which of them a miss fails the run for.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    pub single_requests_per_s: f64,
    pub single_tokens_per_s: f64,
    pub concurrent_requests_per_s: f64,
    pub concurrent_tokens_per_s: f64,
    pub failed: usize,
    pub batched_scaling_at_8: f64,
    pub batched_tpot_penalty_at_8: f64,
    pub batched_efficiency_at_4: f64,
    pub batched_holds_past_8: f64,
    /// `--strict`: every target is required.
    pub strict: bool,
    /// Whether the default thresholds are held at all: they are the
    /// default workload's (GPT-2 124M, short prompts). False in a sweep,
    /// where only `failed` and the targets named by `--target` are.
    pub defaults: bool,
    /// Targets named by `--target`: required whatever `strict` says.
    pub named: Vec<String>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            single_requests_per_s: 0.5,
            single_tokens_per_s: 20.0,
            concurrent_requests_per_s: 1.0,
            concurrent_tokens_per_s: 30.0,
            failed: 0,
            batched_scaling_at_8: 6.0,
            batched_tpot_penalty_at_8: 1.5,
            batched_efficiency_at_4: 0.9,
            // "Keeps rising or holds": a dip of up to 10% is within this
            // machine's run-to-run noise.
            batched_holds_past_8: 0.9,
            strict: false,
            defaults: true,
            named: Vec::new(),
        }
    }
}

impl Thresholds {
    /// Applies one `NAME=VALUE` override; the target named becomes required.
    /// The value must be a finite number (a NaN would pass or fail every
    /// comparison alike, an infinity no run could meet or miss).
    pub fn set(&mut self, spec: &str) -> Result<(), String> {
        let (name, value) = spec
            .split_once('=')
            .ok_or_else(|| format!("--target `{spec}` is not NAME=VALUE"))?;
        let v: f64 = value
            .trim()
            .parse()
            .map_err(|_| format!("--target `{spec}`: `{value}` is not a number"))?;
        if !v.is_finite() {
            return Err(format!(
                "--target `{spec}`: the value must be a finite number, not `{}`",
                value.trim()
            ));
        }
        let name = name.trim();
        match name {
            "single_requests_per_s" => self.single_requests_per_s = v,
            "single_tokens_per_s" => self.single_tokens_per_s = v,
            "concurrent_requests_per_s" => self.concurrent_requests_per_s = v,
            "concurrent_tokens_per_s" => self.concurrent_tokens_per_s = v,
            "failed" if v >= 0.0 && v.fract() == 0.0 && v <= usize::MAX as f64 => self.failed = v as usize,
            "failed" => {
                return Err(format!(
                    "--target `{spec}`: `failed` is a count of requests, a whole number >= 0"
                ))
            }
            "batched_scaling_at_8" => self.batched_scaling_at_8 = v,
            "batched_tpot_penalty_at_8" => self.batched_tpot_penalty_at_8 = v,
            "batched_efficiency_at_4" => self.batched_efficiency_at_4 = v,
            "batched_holds_past_8" => self.batched_holds_past_8 = v,
            other => return Err(format!("unknown target `{other}` (known: {KNOWN_TARGETS})")),
        }
        if !self.named.iter().any(|n| n == name) {
            self.named.push(name.to_string());
        }
        Ok(())
    }

    /// Whether missing target `name` fails the run: a reference-study
    /// target, any target under `--strict`, or one named by `--target`.
    pub fn required(&self, name: &str) -> bool {
        self.strict || REFERENCE_TARGETS.contains(&name) || self.named.iter().any(|n| n == name)
    }

    /// Whether target `name` is measured: every one with the defaults,
    /// else `failed` and those named by `--target`.
    pub fn held(&self, name: &str) -> bool {
        self.defaults || name == "failed" || self.named.iter().any(|n| n == name)
    }
}

fn mean_of(tests: &[&TestResult], f: impl Fn(&TestResult) -> f64) -> f64 {
    if tests.is_empty() {
        0.0
    } else {
        tests.iter().map(|t| f(t)).sum::<f64>() / tests.len() as f64
    }
}

/// The distinct `items`, in order of first appearance.
fn distinct<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// Scaling per level, the recommended concurrency, targets and spread, each
/// dtype on its own (against its own single request, held to the same
/// targets), dtypes in order of first appearance; then each level's tokens/s
/// against f32's.
pub fn analyze(tests: &[TestResult], thresholds: &Thresholds) -> Analysis {
    let mut all = Analysis {
        levels: Vec::new(),
        recommended_concurrency: Vec::new(),
        targets: Vec::new(),
        spread: Vec::new(),
    };
    for dtype in distinct(tests.iter().map(|t| t.dtype.as_str())) {
        let mine: Vec<&TestResult> = tests.iter().filter(|t| t.dtype == dtype).collect();
        let a = analyze_dtype(dtype, &mine, thresholds);
        all.levels.extend(a.levels);
        all.recommended_concurrency.extend(a.recommended_concurrency);
        all.targets.extend(a.targets);
        all.spread.extend(a.spread);
    }
    set_ratios(
        &mut all.levels,
        |l, f32| {
            l.dtype != "f32" && f32.dtype == "f32" && f32.mode == l.mode && f32.concurrency == l.concurrency
        },
        |l| &mut l.vs_f32,
    );
    all
}

/// Sets `field` of every level that has a match among `levels` (the first
/// `other` that `matches(level, other)` accepts) to the level's tokens/s
/// over the match's.
fn set_ratios(
    levels: &mut [LevelAnalysis],
    matches: impl Fn(&LevelAnalysis, &LevelAnalysis) -> bool,
    field: fn(&mut LevelAnalysis) -> &mut Option<f64>,
) {
    for i in 0..levels.len() {
        let l = &levels[i];
        let r = levels
            .iter()
            .find(|other| matches(l, other))
            .map(|other| ratio(l.tokens_per_s, other.tokens_per_s));
        if r.is_some() {
            *field(&mut levels[i]) = r;
        }
    }
}

/// `a / b`, 0 when `b` is not positive.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// One dtype's tests, grouped as the analysis reads them.
struct Dtype<'a> {
    dtype: &'a str,
    tests: &'a [&'a TestResult],
    /// The single-request baseline, shared by every mode: with one request
    /// in flight, batching has nothing to batch.
    base: Vec<&'a TestResult>,
}

impl<'a> Dtype<'a> {
    /// The tests (repetitions) of one level.
    fn level(&self, mode: &str, c: usize) -> Vec<&'a TestResult> {
        self.tests
            .iter()
            .copied()
            .filter(|t| t.mode == mode && t.concurrency == c)
            .collect()
    }

    /// Distinct (mode, concurrency) levels in order of first appearance.
    fn keys(&self) -> Vec<(&'a str, usize)> {
        distinct(self.tests.iter().map(|t| (t.mode.as_str(), t.concurrency)))
    }
}

/// [`analyze`] of one dtype's tests.
fn analyze_dtype(dtype: &str, tests: &[&TestResult], thresholds: &Thresholds) -> Analysis {
    let d = Dtype {
        dtype,
        tests,
        base: tests.iter().copied().filter(|t| t.concurrency == 1).collect(),
    };
    let levels = levels(&d);
    let mut targets = reference_targets(&d, &levels, thresholds);
    targets.extend(batched_targets(&d, &levels, thresholds));
    let failed: usize = tests.iter().map(|t| t.failed).sum();
    targets.push(Op::AtMost.target(dtype, "failed", thresholds.failed as f64, failed as f64));
    targets.retain(|t| thresholds.held(&t.name));
    for t in &mut targets {
        t.required = thresholds.required(&t.name);
    }
    Analysis {
        recommended_concurrency: recommendations(dtype, &levels),
        levels,
        targets,
        spread: spread_rows(&d),
    }
}

/// Each level's means over its repetitions, set against the single request
/// (and, for modes other than threads, against threads at the same level).
fn levels(d: &Dtype) -> Vec<LevelAnalysis> {
    let base_tps = mean_of(&d.base, |t| t.tokens_per_s);
    let base_p50 = mean_of(&d.base, |t| t.latency_ms.p50);
    let mut levels: Vec<LevelAnalysis> = d
        .keys()
        .into_iter()
        .map(|(mode, c)| {
            let ts = d.level(mode, c);
            let tps = mean_of(&ts, |t| t.tokens_per_s);
            let p50 = mean_of(&ts, |t| t.latency_ms.p50);
            LevelAnalysis {
                dtype: d.dtype.into(),
                mode: mode.into(),
                concurrency: c,
                requests_per_s: mean_of(&ts, |t| t.requests_per_s),
                tokens_per_s: tps,
                latency_p50_ms: p50,
                scaling: ratio(tps, base_tps),
                efficiency: ratio(tps, base_tps * c as f64),
                latency_penalty: ratio(p50, base_p50),
                reference: REFERENCE_STUDY.iter().find(|r| r.0 == c).map(|r| (r.1, r.2)),
                vs_threads: None,
                vs_f32: None,
            }
        })
        .collect();
    set_ratios(
        &mut levels,
        |l, t| {
            l.mode != "threads" && l.concurrency > 1 && t.mode == "threads" && t.concurrency == l.concurrency
        },
        |l| &mut l.vs_threads,
    );
    levels
}

/// Per mode, the lowest concurrency reaching 90% of its best tokens/s (the
/// single-request level counting for every mode).
fn recommendations(dtype: &str, levels: &[LevelAnalysis]) -> Vec<Recommendation> {
    distinct(levels.iter().map(|l| l.mode.as_str()))
        .into_iter()
        .map(|m| {
            let mine: Vec<&LevelAnalysis> = levels
                .iter()
                .filter(|l| l.mode == m || l.concurrency == 1)
                .collect();
            let best = mine.iter().map(|l| l.tokens_per_s).fold(0.0, f64::max);
            let knee = mine
                .iter()
                .filter(|l| l.tokens_per_s >= 0.9 * best)
                .map(|l| l.concurrency)
                .min()
                .unwrap_or(1);
            Recommendation {
                dtype: dtype.into(),
                mode: m.to_string(),
                concurrency: knee,
            }
        })
        .collect()
}

/// How a target's measured figure is held to its threshold.
#[derive(Debug, Clone, Copy)]
enum Op {
    Above,
    AtLeast,
    AtMost,
}

impl Op {
    /// Target `name` of `dtype`: `measured` against `threshold` (required
    /// until the thresholds say otherwise).
    fn target(self, dtype: &str, name: &str, threshold: f64, measured: f64) -> Target {
        let (op, pass) = match self {
            Op::Above => (">", measured > threshold),
            Op::AtLeast => (">=", measured >= threshold),
            Op::AtMost => ("<=", measured <= threshold),
        };
        Target {
            name: name.into(),
            dtype: dtype.into(),
            op: op.into(),
            threshold,
            measured,
            pass,
            required: true,
            cell: None,
        }
    }
}

/// The reference study's targets: the single request's rates, and the
/// best concurrent level's when there is one.
fn reference_targets(d: &Dtype, levels: &[LevelAnalysis], th: &Thresholds) -> Vec<Target> {
    let single_rps = mean_of(&d.base, |t| t.requests_per_s);
    let single_tps = mean_of(&d.base, |t| t.tokens_per_s);
    let mut targets = vec![
        Op::Above.target(
            d.dtype,
            "single_requests_per_s",
            th.single_requests_per_s,
            single_rps,
        ),
        Op::Above.target(d.dtype, "single_tokens_per_s", th.single_tokens_per_s, single_tps),
    ];
    let concurrent: Vec<&LevelAnalysis> = levels.iter().filter(|l| l.concurrency > 1).collect();
    if !concurrent.is_empty() {
        let best = |f: fn(&LevelAnalysis) -> f64| concurrent.iter().map(|l| f(l)).fold(0.0, f64::max);
        targets.push(Op::Above.target(
            d.dtype,
            "concurrent_requests_per_s",
            th.concurrent_requests_per_s,
            best(|l| l.requests_per_s),
        ));
        targets.push(Op::Above.target(
            d.dtype,
            "concurrent_tokens_per_s",
            th.concurrent_tokens_per_s,
            best(|l| l.tokens_per_s),
        ));
    }
    targets
}

/// Continuous batching (issue 6): at concurrency 8, >= 6x the single
/// request's tokens/s with p50 per-token latency <= 1.5x; at 4, >= 90%
/// efficiency; past 8, the curve keeps rising or holds. Each where the run
/// measured that level.
fn batched_targets(d: &Dtype, levels: &[LevelAnalysis], th: &Thresholds) -> Vec<Target> {
    let mut targets = Vec::new();
    let batched = |c: usize| levels.iter().find(|l| l.mode == "batched" && l.concurrency == c);
    if let Some(l) = batched(8) {
        targets.push(Op::AtLeast.target(
            d.dtype,
            "batched_scaling_at_8",
            th.batched_scaling_at_8,
            l.scaling,
        ));
        let tpot = |ts: &[&TestResult]| mean_of(ts, |t| t.tpot_ms.p50);
        let penalty = ratio(tpot(&d.level("batched", 8)), tpot(&d.base));
        let mut t = Op::AtMost.target(
            d.dtype,
            "batched_tpot_penalty_at_8",
            th.batched_tpot_penalty_at_8,
            penalty,
        );
        t.pass &= penalty > 0.0;
        targets.push(t);
    }
    if let Some(l) = batched(4) {
        targets.push(Op::AtLeast.target(
            d.dtype,
            "batched_efficiency_at_4",
            th.batched_efficiency_at_4,
            l.efficiency,
        ));
    }
    if let Some(worst) = worst_past_8(levels) {
        targets.push(Op::AtLeast.target(d.dtype, "batched_holds_past_8", th.batched_holds_past_8, worst));
    }
    targets
}

/// Past 8, batched throughput keeps rising or holds: each level's tok/s
/// over the best of the batched levels below it (the single request
/// included), the worst such ratio; `None` without a level past 8.
fn worst_past_8(levels: &[LevelAnalysis]) -> Option<f64> {
    let mut ladder: Vec<&LevelAnalysis> = levels
        .iter()
        .filter(|l| l.mode == "batched" || l.concurrency == 1)
        .collect();
    ladder.sort_by_key(|l| l.concurrency);
    ladder
        .iter()
        .enumerate()
        .filter(|(_, l)| l.concurrency > 8)
        .map(|(i, l)| {
            let below = ladder[..i].iter().map(|b| b.tokens_per_s).fold(0.0, f64::max);
            ratio(l.tokens_per_s, below)
        })
        .reduce(f64::min)
}

/// One figure of a test, read from it.
type Figure = fn(&TestResult) -> f64;

/// mean / stddev / min / max over the repetitions of every level that has
/// several, for its tokens/s, requests/s and p50 latency.
fn spread_rows(d: &Dtype) -> Vec<Spread> {
    let metrics: [(&str, Figure); 3] = [
        ("tokens_per_s", |t| t.tokens_per_s),
        ("requests_per_s", |t| t.requests_per_s),
        ("latency_p50_ms", |t| t.latency_ms.p50),
    ];
    let mut rows = Vec::new();
    for (mode, c) in d.keys() {
        let ts = d.level(mode, c);
        if ts.len() < 2 {
            continue;
        }
        for (metric, f) in metrics {
            let values: Vec<f64> = ts.iter().map(|t| f(t)).collect();
            let (mean, stddev, min, max) = spread(&values);
            rows.push(Spread {
                test: ts[0].name.clone(),
                dtype: d.dtype.into(),
                mode: mode.into(),
                metric: metric.into(),
                mean,
                stddev,
                min,
                max,
                n: values.len(),
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(latency: f64, tokens: usize, error: Option<&str>) -> RequestRecord {
        RequestRecord {
            index: 0,
            client: 0,
            prompt_tokens: 6,
            generated_tokens: tokens,
            start_ms: 0.0,
            ttft_ms: Some(latency / 10.0),
            latency_ms: latency,
            tpot_ms: Some(latency * 0.9 / (tokens.max(2) - 1) as f64),
            token_ms: Vec::new(),
            choice_ms: Vec::new(),
            error: error.map(String::from),
            cause: None,
        }
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), 2.5);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert!((quantile(&v, 0.95) - 3.85).abs() < 1e-12);
        assert_eq!(quantile(&[], 0.5), 0.0);
        let s = summarize(&[3.0, 1.0, 2.0]);
        assert_eq!((s.mean, s.p50), (2.0, 2.0));
    }

    #[test]
    fn failed_requests_count_apart_and_add_no_tokens() {
        let t = test_result(
            "x",
            "threads",
            "f32",
            2,
            0,
            2.0,
            vec![rec(100.0, 30, None), rec(50.0, 3, Some("short"))],
        );
        assert_eq!(
            (t.requests, t.failed, t.total_tokens, t.prompt_tokens),
            (2, 1, 30, 12)
        );
        assert_eq!((t.requests_per_s, t.tokens_per_s), (0.5, 15.0));
        assert_eq!(t.latency_ms.p50, 100.0);
    }

    /// ITL pools every gap of the successful requests; a failed one's are left out.
    #[test]
    fn inter_token_latency_pools_the_gaps() {
        let mut a = rec(100.0, 3, None);
        a.token_ms = vec![10.0, 20.0, 60.0];
        let mut b = rec(100.0, 2, None);
        b.token_ms = vec![5.0, 7.0];
        let mut failed = rec(100.0, 2, Some("short"));
        failed.token_ms = vec![0.0, 1000.0];
        let t = test_result("x", "http", "f32", 2, 0, 1.0, vec![a, b, failed]);
        let itl = t.itl_ms.unwrap();
        // Gaps 10, 40 and 2.
        assert!((itl.mean - 52.0 / 3.0).abs() < 1e-9, "{itl:?}");
        assert_eq!(itl.p50, 10.0);
        // Two choices whose tokens arrive together: each choice's gaps
        // (10, 10, 20), never the zero gap between the choices.
        let mut n2 = rec(100.0, 4, None);
        n2.choice_ms = vec![vec![5.0, 15.0], vec![5.0, 15.0, 35.0]];
        let t = test_result("x", "batched", "f32", 1, 0, 1.0, vec![n2]);
        let itl = t.itl_ms.unwrap();
        assert!((itl.mean - 40.0 / 3.0).abs() < 1e-9, "{itl:?}");
    }

    #[test]
    fn analysis_computes_efficiency_knee_and_targets() {
        let mk = |c: usize, dur: f64, lat: f64| {
            let raw = (0..4).map(|_| rec(lat, 30, None)).collect();
            test_result(&format!("c{c}"), "threads", "f32", c, 0, dur, raw)
        };
        // 120 tokens in 4 s at 1, 2.5 s at 2, 2.4 s at 4.
        let tests = vec![mk(1, 4.0, 1000.0), mk(2, 2.5, 1600.0), mk(4, 2.4, 3000.0)];
        let a = analyze(&tests, &Thresholds::default());
        let l2 = &a.levels[1];
        assert!((l2.scaling - 1.6).abs() < 1e-9 && (l2.efficiency - 0.8).abs() < 1e-9);
        assert!((l2.latency_penalty - 1.6).abs() < 1e-9);
        assert_eq!(l2.reference, Some((1.26, 37.88)));
        // Best is 50 tok/s at 4; 48 tok/s at 2 is within 90%: the knee is 2.
        assert_eq!(
            a.recommended_concurrency,
            vec![Recommendation {
                dtype: "f32".into(),
                mode: "threads".into(),
                concurrency: 2
            }]
        );
        let single_tps = a
            .targets
            .iter()
            .find(|t| t.name == "single_tokens_per_s")
            .unwrap();
        assert!(single_tps.pass && single_tps.measured == 30.0);
        assert!(a.targets.iter().find(|t| t.name == "failed").unwrap().pass);
        assert!(a.spread.is_empty());
    }

    /// Past concurrency 8 the batched curve is judged against the best level
    /// below it: a dip beyond the threshold fails, however high the top is.
    #[test]
    fn batched_curve_must_hold_past_8() {
        let mk = |mode: &str, c: usize, dur: f64| {
            let raw = (0..c.max(1)).map(|_| rec(1000.0, 30, None)).collect();
            test_result(&format!("c{c}"), mode, "f32", c, 0, dur, raw)
        };
        // Tokens: 30 per request; tok/s = 30c / dur.
        let run = |d16: f64, d32: f64| {
            let tests = vec![
                mk("threads", 1, 1.0),
                mk("batched", 8, 1.0),
                mk("batched", 16, d16),
                mk("batched", 32, d32),
            ];
            let a = analyze(&tests, &Thresholds::default());
            a.targets
                .into_iter()
                .find(|t| t.name == "batched_holds_past_8")
                .unwrap()
        };
        // 240, 480, 960 tok/s: rising.
        let t = run(1.0, 1.0);
        assert!(t.pass && (t.measured - 2.0).abs() < 1e-9);
        // 240, 480, then 400: 400 / 480 = 0.83 < 0.9.
        let t = run(1.0, 2.4);
        assert!(!t.pass && (t.measured - 400.0 / 480.0).abs() < 1e-9);
        // 240, then 228 at 16 (0.95): holds.
        let t = run(480.0 / 228.0, 1.0);
        assert!(t.pass && (t.measured - 0.95).abs() < 1e-9);
        // No level past 8: no such target.
        let a = analyze(
            &[mk("threads", 1, 1.0), mk("batched", 8, 1.0)],
            &Thresholds::default(),
        );
        assert!(a.targets.iter().all(|t| t.name != "batched_holds_past_8"));
    }

    /// Each dtype scales against its own single request and meets every
    /// target on its own; its levels are set against f32's.
    #[test]
    fn each_dtype_is_analysed_against_itself_and_f32() {
        let mk = |dtype: &str, mode: &str, c: usize, dur: f64| {
            let raw = (0..c).map(|_| rec(1000.0, 30, None)).collect();
            test_result(&format!("c{c}"), mode, dtype, c, 0, dur, raw)
        };
        // bf16: twice f32's single rate (30 vs 15 tok/s), the same scaling.
        let tests = vec![
            mk("f32", "threads", 1, 2.0),
            mk("f32", "batched", 4, 2.0),
            mk("bf16", "threads", 1, 1.0),
            mk("bf16", "batched", 4, 1.0),
        ];
        let a = analyze(&tests, &Thresholds::default());
        let level = |dtype: &str, c: usize| {
            a.levels
                .iter()
                .find(|l| l.dtype == dtype && l.concurrency == c)
                .unwrap()
        };
        for dtype in ["f32", "bf16"] {
            assert!((level(dtype, 4).scaling - 4.0).abs() < 1e-9, "{dtype}");
        }
        assert_eq!(level("f32", 4).vs_f32, None);
        assert!((level("bf16", 4).vs_f32.unwrap() - 2.0).abs() < 1e-9);
        assert!((level("bf16", 1).vs_f32.unwrap() - 2.0).abs() < 1e-9);
        // single_tokens_per_s > 20: bf16 passes, f32 does not.
        let single: Vec<(&str, bool)> = a
            .targets
            .iter()
            .filter(|t| t.name == "single_tokens_per_s")
            .map(|t| (t.dtype.as_str(), t.pass))
            .collect();
        assert_eq!(single, [("f32", false), ("bf16", true)]);
        let efficiency = a.targets.iter().filter(|t| t.name == "batched_efficiency_at_4");
        assert_eq!(efficiency.count(), 2, "a per-run target applies per dtype");
        let recommended: Vec<&str> = a
            .recommended_concurrency
            .iter()
            .map(|r| r.dtype.as_str())
            .collect();
        assert_eq!(recommended, ["f32", "f32", "bf16", "bf16"]);
    }

    #[test]
    fn thresholds_parse_overrides_and_reject_unknown_names() {
        let mut t = Thresholds::default();
        t.set("single_tokens_per_s=55").unwrap();
        assert_eq!(t.single_tokens_per_s, 55.0);
        assert!(t.set("speed=1").unwrap_err().contains("unknown target"));
        assert!(t.set("failed").is_err());
        assert!(t.set("failed=x").is_err());
        assert!(t.set("failed=1.5").is_err());
        for bad in ["nan", "inf", "-inf", "infinity", "NaN"] {
            let e = t.set(&format!("single_tokens_per_s={bad}")).unwrap_err();
            assert!(e.contains("must be a finite number"), "{bad}: {e}");
        }
        assert_eq!(t.single_tokens_per_s, 55.0, "a refused value changes nothing");
    }

    /// The reference study's targets are required; the project's own only
    /// with --strict or when named, and a miss of an unrequired one is
    /// still reported as a miss.
    #[test]
    fn only_the_reference_targets_are_required_by_default() {
        let mk = |mode: &str, c: usize, dur: f64| {
            let raw = (0..c).map(|_| rec(1000.0, 30, None)).collect();
            test_result(&format!("c{c}"), mode, "f32", c, 0, dur, raw)
        };
        // Batched at 4: scaling 1.0, efficiency 0.25 < 0.9.
        let tests = vec![mk("threads", 1, 1.0), mk("batched", 4, 4.0)];
        let required = |t: &Thresholds| -> Vec<(String, bool, bool)> {
            analyze(&tests, t)
                .targets
                .into_iter()
                .map(|t| (t.name, t.pass, t.required))
                .collect()
        };
        let by_default = required(&Thresholds::default());
        for (name, _, req) in &by_default {
            assert_eq!(*req, REFERENCE_TARGETS.contains(&name.as_str()), "{name}");
        }
        let eff = by_default
            .iter()
            .find(|t| t.0 == "batched_efficiency_at_4")
            .unwrap();
        assert_eq!((eff.1, eff.2), (false, false), "missed, not required");
        let strict = Thresholds {
            strict: true,
            ..Thresholds::default()
        };
        assert!(required(&strict).iter().all(|t| t.2));
        let mut named = Thresholds::default();
        named.set("batched_efficiency_at_4=0.5").unwrap();
        let eff = required(&named)
            .into_iter()
            .find(|t| t.0 == "batched_efficiency_at_4")
            .unwrap();
        assert_eq!((eff.1, eff.2), (false, true));

        // A sweep holds `failed` and what --target names, nothing else.
        let mut sweep = Thresholds {
            defaults: false,
            ..Thresholds::default()
        };
        let names = |t: &Thresholds| -> Vec<String> { required(t).into_iter().map(|t| t.0).collect() };
        assert_eq!(names(&sweep), ["failed"]);
        sweep.set("single_tokens_per_s=1e12").unwrap();
        assert_eq!(names(&sweep), ["single_tokens_per_s", "failed"]);
        assert!(
            required(&sweep).iter().any(|t| !t.1 && t.2),
            "the named target is missed and required"
        );
    }
}
