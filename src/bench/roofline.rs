//! `throughput --probe`: what the engine achieves against this machine's
//! limits ([`crate::probe::Limits`]), as a [`Roofline`]. The FLOP and byte
//! counts are the functions below; [`measure`] times the workloads.

use std::time::Duration;

use super::step::DecodeStep;
use super::{
    Batch8Roofline, DecodeRoofline, PrefillRoofline, Roofline, RooflineLimits, StepRoofline, TestResult,
};
use crate::config::Gpt2Config;
use crate::error::Result;
use crate::probe::Limits;
use crate::progress::Progress;
use crate::{GenerateOptions, Gpt2Model, Session};

/// Tokens of the prefill timed alone (capped by the context).
pub const PREFILL_TOKENS: usize = 128;
/// Rows and cached position of the batched decode step.
pub const BATCH8: (usize, usize) = (8, 64);
/// Cached position of the one-row step after a long prompt.
pub const LONG_DECODE_POSITION: usize = 200;

/// Bytes a batch-1 decode step reads: every weight once (f32). The KV cache
/// it reads is small next to that at the benchmark's prompt lengths and is
/// left out.
pub fn decode_bytes(cfg: &Gpt2Config) -> f64 {
    (cfg.n_params() * 4) as f64
}

/// The weights of the blocks' linear layers (QKV, projection, MLP up and down).
pub fn block_weights(cfg: &Gpt2Config) -> f64 {
    let c = cfg.n_embd as f64;
    cfg.n_layer as f64 * (4.0 * c * c + 2.0 * c * cfg.n_inner as f64)
}

/// FLOPs of a prefill of `tokens`: 2 per weight per token in the blocks,
/// attention's QK and AV over the causal triangle, and the LM head for the
/// last row only.
pub fn prefill_flops(cfg: &Gpt2Config, tokens: usize) -> f64 {
    let (c, l, v) = (cfg.n_embd as f64, cfg.n_layer as f64, cfg.vocab_size as f64);
    let t = tokens as f64;
    let attention = l * 2.0 * 2.0 * c * t * (t + 1.0) / 2.0;
    2.0 * block_weights(cfg) * t + attention + 2.0 * c * v
}

/// The arithmetic alone of a decode step of `rows` rows, ms: its linear
/// layers (the blocks' and the LM head's weights, `rows` rows each) at
/// `gflops_1t`, one core's rate with the weight in L2, on each of `threads`
/// threads (they compute independently). `None` without a rate.
pub fn step_compute_ms(cfg: &Gpt2Config, rows: usize, gflops_1t: f64, threads: usize) -> Option<f64> {
    let lm_head = (cfg.n_embd * cfg.vocab_size) as f64;
    (gflops_1t > 0.0)
        .then(|| 2.0 * rows as f64 * (block_weights(cfg) + lm_head) / (gflops_1t * threads as f64) / 1e6)
}

/// Bytes a one-row decode step at `position` reads: every f32 weight, and
/// the keys and values of every layer at the cached positions and the new one.
pub fn long_decode_bytes(cfg: &Gpt2Config, position: usize) -> f64 {
    decode_bytes(cfg) + (2 * cfg.n_layer * (position + 1) * cfg.n_embd * 4) as f64
}

/// The mean over the single-request tests of their p50 time per output
/// token, ms (NaN without one).
fn single_tpot_ms(tests: &[TestResult]) -> f64 {
    let single: Vec<f64> = tests
        .iter()
        .filter(|t| t.concurrency == 1)
        .map(|t| t.tpot_ms.p50)
        .filter(|&x| x > 0.0)
        .collect();
    if single.is_empty() {
        f64::NAN
    } else {
        single.iter().sum::<f64>() / single.len() as f64
    }
}

/// Measures the machine's limits, times a prefill and two decode steps alone
/// on `pool`, and sets them, with the single-request decode rate of
/// `tests`, against the limits. Status lines go to `progress`.
pub fn measure(
    model: &Gpt2Model,
    tests: &[TestResult],
    pool: &rayon::ThreadPool,
    progress: &Progress,
) -> Result<Roofline> {
    progress.println("probe: measuring read bandwidth, FMA peak and SGEMM (takes a few seconds) ...");
    let limits = crate::probe::measure(false);
    progress.println(&super::report::limits_table(&limits));
    let cfg = &model.config;
    let tokens = PREFILL_TOKENS.min(cfg.n_positions);
    let prefill = time_prefill(model, pool, tokens)?;
    let (rows, position) = BATCH8;
    let batch8 = time_step(model, pool, rows, position)?;
    let long = time_step(model, pool, 1, LONG_DECODE_POSITION)?;
    Ok(roofline(
        cfg,
        &limits,
        single_tpot_ms(tests),
        (tokens, prefill),
        batch8,
        long,
        pool.current_num_threads(),
    ))
}

/// The roofline from the timings: the prefill's (tokens, duration), and the
/// 8-row and long decode steps' (position, duration), the 8-row step on
/// `threads` threads.
fn roofline(
    cfg: &Gpt2Config,
    limits: &Limits,
    tpot_ms: f64,
    (tokens, prefill): (usize, Duration),
    (batch8_position, batch8_step): (usize, Duration),
    (long_position, long_step): (usize, Duration),
    threads: usize,
) -> Roofline {
    let bytes = decode_bytes(cfg);
    let tokens_per_s = 1e3 / tpot_ms;
    let prefill_gflops = prefill_flops(cfg, tokens) / prefill.as_secs_f64() / 1e9;
    let batch8_gbs = bytes / batch8_step.as_secs_f64() / 1e9;
    let long_gbs = long_decode_bytes(cfg, long_position) / long_step.as_secs_f64() / 1e9;
    let read_all = limits.read_gbs_all;
    Roofline {
        limits: RooflineLimits {
            read_gbs_1t: limits.read_gbs_1t,
            read_gbs_all: read_all,
            read_fma8_gbs_all: Some(limits.read_fma8_gbs_all),
            fma_gflops_all: limits.fma_gflops_all,
            linear_packed_gflops: limits.best_linear_packed_gflops(PREFILL_TOKENS),
        },
        decode: DecodeRoofline {
            bytes_per_token: bytes,
            tokens_per_s,
            achieved_gbs: bytes * tokens_per_s / 1e9,
            fraction_of_bandwidth: bytes * tokens_per_s / 1e9 / read_all,
            ceiling_tokens_per_s: limits.decode_ceiling_tok_s(bytes),
        },
        prefill: PrefillRoofline {
            tokens,
            ms: prefill.as_secs_f64() * 1e3,
            gflops: prefill_gflops,
            fraction_of_fma_peak: prefill_gflops / limits.fma_gflops_all,
        },
        long_decode: Some(StepRoofline {
            position: long_position,
            step_ms: long_step.as_secs_f64() * 1e3,
            achieved_gbs: long_gbs,
            fraction_of_bandwidth: long_gbs / read_all,
        }),
        batch8: Some(Batch8Roofline {
            step: StepRoofline {
                position: batch8_position,
                step_ms: batch8_step.as_secs_f64() * 1e3,
                achieved_gbs: batch8_gbs,
                fraction_of_bandwidth: batch8_gbs / read_all,
            },
            compute_ms: step_compute_ms(cfg, BATCH8.0, limits.rows8_in_l2_gflops_1t, threads),
        }),
    }
}

/// A prefill of `tokens` alone on `pool`: the median of 3.
fn time_prefill(model: &Gpt2Model, pool: &rayon::ThreadPool, tokens: usize) -> Result<Duration> {
    let cfg = &model.config;
    let prompt: Vec<u32> = (0..tokens as u32)
        .map(|i| (i * 101) % cfg.vocab_size as u32)
        .collect();
    let mut session = Session::new(model, tokens)?;
    let mut times: Vec<Duration> = (0..3)
        .map(|_| {
            pool.install(|| session.generate(model, &prompt, &GenerateOptions::greedy(1), |_| {}))
                .map(|g| g.timings.ttft)
        })
        .collect::<Result<_>>()?;
    times.sort();
    Ok(times[1])
}

/// One decode step of `batch` sequences, each with `position` tokens cached
/// (capped by the context), timed alone on `pool`: the median of 9 steps.
/// Returns the position and the time.
pub fn time_step(
    model: &Gpt2Model,
    pool: &rayon::ThreadPool,
    batch: usize,
    position: usize,
) -> Result<(usize, Duration)> {
    pool.install(|| {
        let mut step = DecodeStep::new(model, batch, position)?;
        let mut times: Vec<Duration> = (0..9).map(|_| step.run(model)).collect::<Result<_>>()?;
        times.sort();
        Ok((step.position(), times[times.len() / 2]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::LinearPoint;

    fn gpt2_124m() -> Gpt2Config {
        let json =
            r#"{"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}"#;
        Gpt2Config::from_json(json).unwrap()
    }

    #[test]
    fn counts_match_gpt2_124m() {
        let cfg = gpt2_124m();
        assert_eq!(decode_bytes(&cfg), 124_439_808.0 * 4.0);
        // 12 layers of 4C² + 2·C·4C = 12C² weights.
        assert_eq!(block_weights(&cfg), 12.0 * 12.0 * 768.0 * 768.0);
        let t = 128.0;
        let want =
            2.0 * block_weights(&cfg) * t + 12.0 * 4.0 * 768.0 * t * (t + 1.0) / 2.0 + 2.0 * 768.0 * 50257.0;
        assert_eq!(prefill_flops(&cfg, 128), want);
        assert_eq!(
            long_decode_bytes(&cfg, 200) - decode_bytes(&cfg),
            (2 * 12 * 201 * 768 * 4) as f64
        );
        assert_eq!(step_compute_ms(&cfg, 8, 0.0, 2), None);
        let one = step_compute_ms(&cfg, 8, 50.0, 1).unwrap();
        let two = step_compute_ms(&cfg, 8, 50.0, 2).unwrap();
        assert!((one - 2.0 * two).abs() < 1e-12, "{one} vs {two}");
    }

    #[test]
    fn achieved_over_limit() {
        let cfg = gpt2_124m();
        let point = |m, gflops| LinearPoint {
            name: "qkv".into(),
            m,
            k: 768,
            n: 2304,
            gflops,
            gflops_hot: gflops,
        };
        let limits = Limits {
            read_gbs_1t: 10.0,
            read_gbs_all: 20.0,
            read_fma8_gbs_1t: 8.0,
            read_fma8_gbs_all: 16.0,
            threads: 2,
            fma_gflops_1t: 50.0,
            fma_gflops_all: 100.0,
            linear_packed: vec![point(128, 60.0), point(8, 90.0)],
            rows8_in_l2_gflops_1t: 40.0,
        };
        let ms = Duration::from_millis;
        let r = roofline(
            &cfg,
            &limits,
            50.0,
            (128, ms(500)),
            (64, ms(100)),
            (200, ms(40)),
            2,
        );
        assert_eq!(r.limits.linear_packed_gflops, 60.0, "the best at M >= 128 only");
        assert_eq!(r.decode.tokens_per_s, 20.0);
        let gbs = decode_bytes(&cfg) * 20.0 / 1e9;
        assert!((r.decode.fraction_of_bandwidth - gbs / 20.0).abs() < 1e-12);
        assert!((r.prefill.gflops - prefill_flops(&cfg, 128) / 0.5 / 1e9).abs() < 1e-9);
        let b = r.batch8.unwrap();
        assert_eq!((b.step.position, b.step.step_ms), (64, 100.0));
        assert_eq!(b.compute_ms, step_compute_ms(&cfg, 8, 40.0, 2));
        let l = r.long_decode.unwrap();
        assert!((l.achieved_gbs - long_decode_bytes(&cfg, 200) / 0.04 / 1e9).abs() < 1e-9);
    }
}
