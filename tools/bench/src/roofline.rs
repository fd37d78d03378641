//! `throughput --probe`: what the engine achieves against this machine's
//! limits ([`crate::probe::Limits`]), as a [`Roofline`]. The FLOP and byte
//! counts are the functions below; [`time_engine`] times one dtype's
//! workloads while its model is loaded, [`measure_limits`] the machine once,
//! and [`roofline`] sets the one against the other.

use std::time::Duration;

use super::{
    Batch8Roofline, ComputePeak, DecodeRoofline, DtypeRoofline, PrefillRoofline, Roofline, RooflineLimits,
    StepRoofline, TestResult,
};
use crate::probe::Limits;
use crate::progress::Progress;
use gpt2::config::Gpt2Config;
use gpt2::error::Result;
use gpt2::timed::DecodeStep;
use gpt2::{Dtype, GenerateOptions, Gpt2Model, Session};

/// Tokens of the prefill timed alone (capped by the context).
pub const PREFILL_TOKENS: usize = 128;
/// Rows and cached position of the batched decode step.
pub const BATCH8: (usize, usize) = (8, 64);
/// Cached position of the one-row step after a long prompt.
pub const LONG_DECODE_POSITION: usize = 200;

/// Bytes a batch-1 decode step reads with the linear layers' weights in
/// `dtype`: every weight once, the packed matrices (each block's QKV C×3C,
/// projection C×C, MLP up C×F and down F×C, and the LM head C×V) at
/// [`Dtype::weight_bytes`], everything else (biases, layer norms, position
/// embeddings) in f32. The tied token embeddings count once, as the LM head.
/// The KV cache it reads is small next to that at the benchmark's prompt
/// lengths and is left out.
pub fn decode_bytes(cfg: &Gpt2Config, dtype: Dtype) -> f64 {
    let (c, f, v) = (cfg.n_embd, cfg.n_inner, cfg.vocab_size);
    let block = dtype.weight_bytes(c, 3 * c)
        + dtype.weight_bytes(c, c)
        + dtype.weight_bytes(c, f)
        + dtype.weight_bytes(f, c);
    let packed = cfg.n_layer * block + dtype.weight_bytes(c, v);
    let packed_values = block_weights(cfg) as usize + c * v;
    (packed + 4 * (cfg.n_params() - packed_values)) as f64
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

/// Bytes a one-row decode step at `position` reads: every weight (as
/// [`decode_bytes`]), and the keys and values (f32) of every layer at the
/// cached positions and the new one.
pub fn long_decode_bytes(cfg: &Gpt2Config, dtype: Dtype, position: usize) -> f64 {
    decode_bytes(cfg, dtype) + (2 * cfg.n_layer * (position + 1) * cfg.n_embd * 4) as f64
}

/// The mean over `dtype`'s single-request tests of their p50 time per
/// output token, ms (NaN without one).
fn single_tpot_ms(tests: &[TestResult], dtype: Dtype) -> f64 {
    let single: Vec<f64> = tests
        .iter()
        .filter(|t| t.concurrency == 1 && t.dtype == dtype.as_str())
        .map(|t| t.tpot_ms.p50)
        .filter(|&x| x > 0.0)
        .collect();
    if single.is_empty() {
        f64::NAN
    } else {
        single.iter().sum::<f64>() / single.len() as f64
    }
}

/// One dtype's workloads, each timed alone while its model was loaded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineTimes {
    pub dtype: Dtype,
    /// A prefill's tokens and its time.
    pub prefill: (usize, Duration),
    /// The 8-row decode step's cached position and its time.
    pub batch8: (usize, Duration),
    /// The one-row step's after a long prompt.
    pub long_decode: (usize, Duration),
    /// Threads of the pool the 8-row step ran on.
    pub threads: usize,
}

/// Times a prefill and two decode steps of `model` alone on `pool`.
pub fn time_engine(model: &Gpt2Model, pool: &rayon::ThreadPool) -> Result<EngineTimes> {
    let tokens = PREFILL_TOKENS.min(model.config.n_positions);
    let prefill = time_prefill(model, pool, tokens)?;
    let (rows, position) = BATCH8;
    Ok(EngineTimes {
        dtype: model.dtype(),
        prefill: (tokens, prefill),
        batch8: time_step(model, pool, rows, position)?,
        long_decode: time_step(model, pool, 1, LONG_DECODE_POSITION)?,
        threads: pool.current_num_threads(),
    })
}

/// Measures the machine's limits (a few seconds), with the read of a buffer
/// of a decode step's size in each of `dtypes` of `cfg`'s model, and prints
/// their table on `progress`.
pub fn measure_limits(progress: &Progress, cfg: &Gpt2Config, dtypes: &[Dtype]) -> Limits {
    progress.println("probe: measuring read bandwidth, FMA peak and SGEMM (takes a few seconds) ...");
    let decode: Vec<(Dtype, f64)> = dtypes.iter().map(|&d| (d, decode_bytes(cfg, d))).collect();
    let limits = crate::probe::measure_for(false, &decode);
    progress.println(&super::report::limits_table(&limits));
    limits
}

/// The roofline of every dtype in `engines` (in their order) against
/// `limits`, their decode rates from the single-request tests of `tests`.
pub fn roofline(
    cfg: &Gpt2Config,
    limits: &Limits,
    tests: &[TestResult],
    engines: &[EngineTimes],
) -> Roofline {
    Roofline {
        limits: RooflineLimits {
            read_gbs_1t: limits.read_gbs_1t,
            read_gbs_all: limits.read_gbs_all,
            read_fma8_gbs_all: Some(limits.read_fma8_gbs_all),
            fma_gflops_all: limits.fma_gflops_all,
            linear_packed_gflops: limits.best_linear_packed_gflops(PREFILL_TOKENS),
        },
        dtypes: engines
            .iter()
            .map(|e| dtype_roofline(cfg, limits, single_tpot_ms(tests, e.dtype), e))
            .collect(),
    }
}

/// One dtype's part: the decode rate from `tpot_ms`, the rest from `times`.
fn dtype_roofline(cfg: &Gpt2Config, limits: &Limits, tpot_ms: f64, times: &EngineTimes) -> DtypeRoofline {
    let dtype = times.dtype;
    let ((tokens, prefill), (batch8_position, batch8_step)) = (times.prefill, times.batch8);
    let (long_position, long_step) = times.long_decode;
    let bytes = decode_bytes(cfg, dtype);
    let tokens_per_s = 1e3 / tpot_ms;
    let prefill_gflops = prefill_flops(cfg, tokens) / prefill.as_secs_f64() / 1e9;
    let batch8_gbs = bytes / batch8_step.as_secs_f64() / 1e9;
    let long_gbs = long_decode_bytes(cfg, dtype, long_position) / long_step.as_secs_f64() / 1e9;
    let read_all = limits.read_gbs_all;
    // Decode at batch 1 against the read of a buffer of its own size.
    let read_decode = limits.decode_read_gbs(dtype);
    DtypeRoofline {
        dtype: dtype.as_str().into(),
        decode: DecodeRoofline {
            bytes_per_token: bytes,
            tokens_per_s,
            achieved_gbs: bytes * tokens_per_s / 1e9,
            fraction_of_bandwidth: bytes * tokens_per_s / 1e9 / read_decode,
            ceiling_tokens_per_s: read_decode * 1e9 / bytes,
            read_gbs: Some(read_decode),
        },
        prefill: {
            // int8 against its integer dot products' peak, the rest the FMAs'.
            let (peak, name) = limits.compute_peak(dtype);
            PrefillRoofline {
                tokens,
                ms: prefill.as_secs_f64() * 1e3,
                gflops: prefill_gflops,
                fraction_of_fma_peak: prefill_gflops / peak,
                peak: (dtype == Dtype::Int8)
                    .then_some((peak, name))
                    .map(|(gflops, name)| ComputePeak { name, gflops }),
            }
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
            compute_ms: step_compute_ms(cfg, BATCH8.0, limits.rows8_in_l2_gflops(dtype), times.threads),
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
        assert_eq!(decode_bytes(&cfg, Dtype::F32), 124_439_808.0 * 4.0);
        // 12 layers of 4C² + 2·C·4C = 12C² weights.
        assert_eq!(block_weights(&cfg), 12.0 * 12.0 * 768.0 * 768.0);
        let t = 128.0;
        let want =
            2.0 * block_weights(&cfg) * t + 12.0 * 4.0 * 768.0 * t * (t + 1.0) / 2.0 + 2.0 * 768.0 * 50257.0;
        assert_eq!(prefill_flops(&cfg, 128), want);
        for dtype in Dtype::ALL {
            assert_eq!(
                long_decode_bytes(&cfg, dtype, 200) - decode_bytes(&cfg, dtype),
                (2 * 12 * 201 * 768 * 4) as f64,
                "the KV cache is f32 in every dtype"
            );
        }
        assert_eq!(step_compute_ms(&cfg, 8, 0.0, 2), None);
        let one = step_compute_ms(&cfg, 8, 50.0, 1).unwrap();
        let two = step_compute_ms(&cfg, 8, 50.0, 2).unwrap();
        assert!((one - 2.0 * two).abs() < 1e-12, "{one} vs {two}");
    }

    /// bf16 halves and int8 quarters the bytes of a 124M decode step: the
    /// packed matrices are 99.3% of its weights.
    #[test]
    fn reduced_precision_reads_a_fraction_of_the_bytes() {
        let cfg = gpt2_124m();
        let f32 = decode_bytes(&cfg, Dtype::F32);
        for (dtype, fraction) in [(Dtype::Bf16, 0.5), (Dtype::Int8, 0.25)] {
            let got = decode_bytes(&cfg, dtype) / f32;
            assert!(
                (got / fraction - 1.0).abs() < 0.03,
                "{dtype}: {got} of f32's bytes"
            );
            assert!(
                got > fraction,
                "{dtype}: the f32 rest and the int8 scales add to the values"
            );
        }
        // Exactly: the matrices' values and int8's per-column scales, the
        // other 907,776 weights (biases, norms, wpe) in f32.
        let (c, f, v) = (768, 3072, 50257);
        let matrices = 12 * (c * 3 * c + c * c + c * f + f * c) + c * v;
        let rest = 124_439_808 - matrices;
        assert_eq!(rest, 907_776);
        assert_eq!(decode_bytes(&cfg, Dtype::Bf16), (2 * matrices + 4 * rest) as f64);
        let scales = 4 * (12 * (3 * c + c + f + c) + v);
        assert_eq!(
            decode_bytes(&cfg, Dtype::Int8),
            (matrices + scales + 4 * rest) as f64
        );
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
            read_patterns: Vec::new(),
            // bf16's decode is held to a buffer of its size, f32's to the
            // big buffer (not measured).
            decode_reads: vec![crate::probe::DecodeRead {
                dtype: "bf16".into(),
                bytes: decode_bytes(&cfg, Dtype::Bf16),
                best_gbs: 25.0,
                median_gbs: 24.0,
                pattern: "1 stream per thread".into(),
            }],
            read_fma8_gbs_1t: 8.0,
            read_fma8_gbs_all: 16.0,
            threads: 2,
            fma_gflops_1t: 50.0,
            fma_gflops_all: 100.0,
            int8_gops_1t: 0.0,
            int8_gops_all: 0.0,
            int8_dot: String::new(),
            linear_packed: vec![point(128, 60.0), point(8, 90.0)],
            rows8_in_l2_gflops_1t: 40.0,
            // bf16's own rate; int8 not measured: f32's is used.
            rows8_in_l2_by_dtype: vec![crate::probe::DtypeRate {
                dtype: "bf16".into(),
                gflops: 30.0,
            }],
        };
        let ms = Duration::from_millis;
        let times = |dtype| EngineTimes {
            dtype,
            prefill: (128, ms(500)),
            batch8: (64, ms(100)),
            long_decode: (200, ms(40)),
            threads: 2,
        };
        // Single requests at 50 ms (f32) and 25 ms (bf16) per output token.
        let single = |dtype: &str, tpot: f64| TestResult {
            tpot_ms: super::super::Summary {
                p50: tpot,
                ..Default::default()
            },
            ..super::super::stats::test_result("single", "threads", dtype, 1, 0, 1.0, vec![])
        };
        let tests = [single("f32", 50.0), single("bf16", 25.0)];
        let r = roofline(&cfg, &limits, &tests, &[times(Dtype::F32), times(Dtype::Bf16)]);
        assert_eq!(r.limits.linear_packed_gflops, 60.0, "the best at M >= 128 only");
        let [f, b] = &r.dtypes[..] else {
            panic!("two dtypes: {:?}", r.dtypes)
        };
        assert_eq!((f.dtype.as_str(), b.dtype.as_str()), ("f32", "bf16"));
        assert_eq!((f.decode.tokens_per_s, b.decode.tokens_per_s), (20.0, 40.0));
        for (d, dtype, tok_s) in [(f, Dtype::F32, 20.0), (b, Dtype::Bf16, 40.0)] {
            let gbs = decode_bytes(&cfg, dtype) * tok_s / 1e9;
            assert_eq!(d.decode.bytes_per_token, decode_bytes(&cfg, dtype));
            let read = if dtype == Dtype::Bf16 { 25.0 } else { 20.0 };
            assert_eq!(d.decode.read_gbs, Some(read));
            assert!((d.decode.fraction_of_bandwidth - gbs / read).abs() < 1e-12);
            assert!((d.decode.ceiling_tokens_per_s - read * 1e9 / decode_bytes(&cfg, dtype)).abs() < 1e-9);
            assert!((d.prefill.gflops - prefill_flops(&cfg, 128) / 0.5 / 1e9).abs() < 1e-9);
            let s = d.batch8.as_ref().unwrap();
            assert_eq!((s.step.position, s.step.step_ms), (64, 100.0));
            assert!((s.step.achieved_gbs - decode_bytes(&cfg, dtype) / 0.1 / 1e9).abs() < 1e-9);
            let rate = if dtype == Dtype::Bf16 { 30.0 } else { 40.0 };
            assert_eq!(
                s.compute_ms,
                step_compute_ms(&cfg, 8, rate, 2),
                "{dtype}: its own kernel's rate"
            );
            let l = d.long_decode.as_ref().unwrap();
            assert!((l.achieved_gbs - long_decode_bytes(&cfg, dtype, 200) / 0.04 / 1e9).abs() < 1e-9);
        }
    }
}
