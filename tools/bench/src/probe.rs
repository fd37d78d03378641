//! The limits of this machine, measured inside the project, for the benchmark
//! report's "achieved / limit" columns: sustained DRAM read bandwidth, peak FMA
//! throughput, and our own matrix product ([`gpt2_kernels::linear_packed`], as
//! the engine runs it) at GPT-2 124M shapes.
//!
//! One idea, three layers: `gpt2_kernels::probe` holds the raw probes (a read
//! loop, an FMA loop); this module runs them and `linear_packed` into
//! [`Limits`]; `crate::roofline` sets what the engine achieves against
//! a [`Limits`] (`crate::Roofline`, the report's `roofline`).
//!
//! Units are SI: 1 GB = 1e9 bytes, 1 GFLOP = 1e9 floating-point operations.

use std::time::Instant;

use gpt2_kernels::probe::{
    fma_peak, int8_dot_peak, read_bandwidth, read_fma_bandwidth, read_patterns, ReadPattern, FMA_ROWS,
};
use gpt2_kernels::Dtype;
use serde::{Deserialize, Serialize};

/// What this machine can do, measured by [`measure`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limits {
    /// Sustained read bandwidth of one thread, GB/s.
    pub read_gbs_1t: f64,
    /// Sustained read bandwidth of `threads` threads, GB/s: the best
    /// repetition of the best of [`Limits::read_patterns`] (one stream per
    /// thread in reports written before they were measured).
    pub read_gbs_all: f64,
    /// The all-threads read of the bandwidth buffer in each access pattern
    /// ([`ReadPattern`]), repetitions interleaved: its best, median and
    /// worst. Empty in reports written before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_patterns: Vec<ReadRate>,
    /// The all-threads read of a buffer the size of a batch-1 decode step's
    /// weights in each dtype the run measured (the best pattern): the
    /// ceiling of that decode, which a last-level cache as large as the
    /// weights may partly hold, as it holds the model's. Empty in reports
    /// written before, or without a model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decode_reads: Vec<DecodeRead>,
    /// The same read with 8 FMAs per loaded vector (an 8-row decode step's
    /// arithmetic, [`read_fma_bandwidth`]), one thread and `threads`, GB/s.
    /// 0 in reports written before it was measured.
    #[serde(default)]
    pub read_fma8_gbs_1t: f64,
    #[serde(default)]
    pub read_fma8_gbs_all: f64,
    /// Threads of the "all" figures: `std::thread::available_parallelism()`.
    pub threads: usize,
    /// Peak FMA throughput of one thread, GFLOP/s.
    pub fma_gflops_1t: f64,
    /// Peak FMA throughput of `threads` threads, GFLOP/s.
    pub fma_gflops_all: f64,
    /// Peak int8 dot-product throughput of one thread and of `threads`,
    /// 10⁹ operations per second (a multiply-add counting two, as an FMA
    /// does), with the widest instruction the CPU has ([`Limits::int8_dot`]):
    /// the ceiling of the int8 products. 0 in reports written before.
    #[serde(default)]
    pub int8_gops_1t: f64,
    #[serde(default)]
    pub int8_gops_all: f64,
    /// The instruction of that peak (`vpdpbusd zmm`, ...); empty before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub int8_dot: String,
    /// Our `linear_packed` at GPT-2 shapes, on `threads` threads.
    #[serde(alias = "sgemm")]
    pub linear_packed: Vec<LinearPoint>,
    /// `linear_packed` at 8 rows ([`FMA_ROWS`]) on one thread over a weight
    /// that stays in L2 (K = 768, one 48-column panel, 147 KB): the
    /// few-row kernel's arithmetic with no memory stream at all, GFLOP/s.
    /// 0 in reports written before it was measured.
    #[serde(default)]
    pub rows8_in_l2_gflops_1t: f64,
    /// The same in every weight dtype (the f32 entry is
    /// `rows8_in_l2_gflops_1t`): bf16 and int8 widen each weight as it is
    /// loaded, which costs arithmetic. Empty in reports written before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rows8_in_l2_by_dtype: Vec<DtypeRate>,
}

/// One access pattern's read rate over a run, all threads, GB/s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadRate {
    pub pattern: String,
    pub best_gbs: f64,
    pub median_gbs: f64,
    pub worst_gbs: f64,
}

/// The read of a buffer of a decode step's size in one dtype, all threads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeRead {
    pub dtype: String,
    /// The buffer: the bytes a batch-1 decode step reads in that dtype.
    pub bytes: f64,
    /// The best pattern's best and median repetition, GB/s.
    pub best_gbs: f64,
    pub median_gbs: f64,
    /// Which pattern that was.
    pub pattern: String,
}

/// A kernel rate in one weight dtype.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DtypeRate {
    pub dtype: String,
    pub gflops: f64,
}

/// One timed shape of `out[M,N] = x[M,K] · w[K,N] + bias[N]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinearPoint {
    /// The layer of GPT-2 with this shape: `qkv`, `mlp_up` or `mlp_down`.
    pub name: String,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// `2·M·K·N` over the median time of a call, each call reading its
    /// weights from memory.
    pub gflops: f64,
    /// The same calls on one copy of the weights, which stays in cache: the
    /// kernel's arithmetic without the stream from memory. 0 in reports
    /// written before it was measured.
    #[serde(default)]
    pub gflops_hot: f64,
}

/// The linear layers of GPT-2 124M (C = 768): name, K, N.
const GPT2_LAYERS: [(&str, usize, usize); 3] = [
    ("qkv", 768, 3 * 768),
    ("mlp_up", 768, 4 * 768),
    ("mlp_down", 4 * 768, 768),
];

/// Rows per call: a 128-token prefill, and a decode step batched over 8 sequences.
const GPT2_ROWS: [usize; 2] = [128, 8];

/// How much to measure; [`measure`] picks one, the tests a tiny one.
struct ProbeSettings {
    /// Size of the bandwidth buffer, far above the last-level cache.
    buf_bytes: usize,
    /// Repetitions of the bandwidth read; the best counts.
    read_reps: usize,
    /// Duration of each FMA run.
    fma_seconds: f64,
    /// Timed calls per `linear_packed` shape (after one warm-up), from memory and
    /// from cache; the medians count.
    gemm_reps: usize,
    /// Total size of the weight copies the `linear_packed` calls cycle through, so that
    /// each call reads its weights from DRAM, as a layer of a real forward does.
    cold_bytes: usize,
    /// (name, M, K, N)
    shapes: Vec<(String, usize, usize, usize)>,
}

impl ProbeSettings {
    fn new(quick: bool) -> ProbeSettings {
        let shapes = GPT2_ROWS
            .iter()
            .flat_map(|&m| {
                GPT2_LAYERS
                    .iter()
                    .map(move |&(name, k, n)| (name.to_string(), m, k, n))
            })
            .collect();
        ProbeSettings {
            buf_bytes: if quick { 256 << 20 } else { 1 << 30 },
            read_reps: if quick { 4 } else { 20 },
            fma_seconds: if quick { 0.1 } else { 0.5 },
            gemm_reps: if quick { 5 } else { 21 },
            cold_bytes: 128 << 20,
            shapes,
        }
    }
}

/// Measures this machine: a second or two with `quick` (256 MiB buffer, short runs),
/// 5 to 10 s without (1 GiB buffer). Needs the bandwidth buffer in RAM.
///
/// # Panics
/// If the buffer cannot be mapped or the thread pool cannot start.
pub fn measure(quick: bool) -> Limits {
    measure_for(quick, &[])
}

/// [`measure`], and the read of a buffer of each of `decode` (a dtype and
/// the bytes a batch-1 decode step reads in it): [`Limits::decode_reads`].
pub fn measure_for(quick: bool, decode: &[(Dtype, f64)]) -> Limits {
    measure_with(&ProbeSettings::new(quick), decode)
}

/// The access patterns the probe reads the bandwidth buffer in.
const READ_PATTERNS: [ReadPattern; 5] = [
    ReadPattern::OneStream,
    ReadPattern::Streams(2),
    ReadPattern::Streams(4),
    ReadPattern::Prefetched,
    ReadPattern::Ops,
];

/// A decode step's matrices in the engine's order, floats (f32): GPT-2
/// 124M's four per block, then the LM head.
fn decode_matrices() -> Vec<usize> {
    let (c, f) = (768, 3072);
    let block = [c * 3 * c, c * c, c * f, f * c]; // QKV, projection, MLP up, MLP down
    let mut ops: Vec<usize> = (0..12).flat_map(|_| block).collect();
    ops.push(c * 50257); // the LM head
    ops
}

/// An anonymous map of `bytes`, every page touched, in huge pages where the
/// kernel gives them.
fn touched_buffer(bytes: usize) -> memmap2::MmapMut {
    let mut map =
        memmap2::MmapMut::map_anon(bytes).unwrap_or_else(|e| panic!("probe: cannot map {bytes} bytes: {e}"));
    // Huge pages spare the read loop a TLB miss every 4 KiB; without them
    // the figure is a little lower, so say so rather than fail.
    #[cfg(target_os = "linux")]
    if let Err(e) = map.advise(memmap2::Advice::HugePage) {
        eprintln!("probe: no transparent huge pages for the bandwidth buffer ({e})");
    }
    // Writing every float touches every page: no page fault, and no shared
    // zero page, inside the timed reads.
    bytemuck::cast_slice_mut::<u8, f32>(&mut map[..]).fill(1.0);
    map
}

fn measure_with(settings: &ProbeSettings, decode: &[(Dtype, f64)]) -> Limits {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ops = decode_matrices();

    let (read_gbs_1t, read_patterns, read_fma8_gbs_1t, read_fma8_gbs_all) = {
        let map = touched_buffer(settings.buf_bytes);
        let buf: &[f32] = bytemuck::cast_slice(&map[..]);
        let gbs = |t| read_bandwidth(buf, t, settings.read_reps).bytes_per_s / 1e9;
        let fma8 = |t| read_fma_bandwidth(buf, t, settings.read_reps).bytes_per_s / 1e9;
        let patterns = read_rates(buf, threads, settings.read_reps, &ops);
        let (one, one8) = (gbs(1), fma8(1));
        (
            one,
            patterns,
            one8,
            if threads == 1 { one8 } else { fma8(threads) },
        )
    };
    let read_gbs_all = read_patterns.iter().map(|r| r.best_gbs).fold(0.0, f64::max);
    let decode_reads = decode
        .iter()
        .map(|&(dtype, bytes)| {
            let map = touched_buffer((bytes as usize).next_multiple_of(4).max(4));
            let buf: &[f32] = bytemuck::cast_slice(&map[..]);
            // The same repetitions, however small the buffer: each is short.
            let best = read_rates(buf, threads, settings.read_reps.max(10), &ops)
                .into_iter()
                .max_by(|a, b| a.best_gbs.total_cmp(&b.best_gbs))
                .expect("at least one pattern");
            DecodeRead {
                dtype: dtype.as_str().into(),
                bytes,
                best_gbs: best.best_gbs,
                median_gbs: best.median_gbs,
                pattern: best.pattern,
            }
        })
        .collect();

    let fma_gflops_1t = fma_peak(1, settings.fma_seconds).gflops;
    let fma_gflops_all = if threads == 1 {
        fma_gflops_1t
    } else {
        fma_peak(threads, settings.fma_seconds).gflops
    };
    let dot_1t = int8_dot_peak(1, settings.fma_seconds);
    let int8_gops_all = if threads == 1 {
        dot_1t.gops
    } else {
        int8_dot_peak(threads, settings.fma_seconds).gops
    };

    // `linear_packed` runs on rayon's current pool: give it exactly `threads`.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap_or_else(|e| panic!("probe: cannot start a pool of {threads} threads: {e}"));
    let linear_packed = pool.install(|| {
        settings
            .shapes
            .iter()
            .map(|(name, m, k, n)| {
                let (gflops, gflops_hot) = time_linear(*m, *k, *n, settings.gemm_reps, settings.cold_bytes);
                LinearPoint {
                    name: name.clone(),
                    m: *m,
                    k: *k,
                    n: *n,
                    gflops,
                    gflops_hot,
                }
            })
            .collect()
    });

    // One thread: a one-panel weight is one task, so there is no fork-join
    // in the call, and the cores compute independently of each other.
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap_or_else(|e| panic!("probe: cannot start a pool of 1 thread: {e}"));
    let rows8_in_l2_by_dtype: Vec<DtypeRate> = Dtype::ALL
        .into_iter()
        .map(|dtype| DtypeRate {
            dtype: dtype.as_str().into(),
            gflops: one.install(|| {
                time_linear_in_cache(
                    FMA_ROWS,
                    768,
                    48,
                    dtype,
                    settings.read_reps,
                    10 * settings.gemm_reps,
                )
            }),
        })
        .collect();
    let rows8_in_l2_gflops_1t = rows8_in_l2_by_dtype[0].gflops;

    Limits {
        read_gbs_1t,
        read_gbs_all,
        read_patterns,
        decode_reads,
        read_fma8_gbs_1t,
        read_fma8_gbs_all,
        threads,
        fma_gflops_1t,
        fma_gflops_all,
        int8_gops_1t: dot_1t.gops,
        int8_gops_all,
        int8_dot: dot_1t.instruction.into(),
        linear_packed,
        rows8_in_l2_gflops_1t,
        rows8_in_l2_by_dtype,
    }
}

/// [`READ_PATTERNS`] over `buf` on `threads` threads, GB/s.
fn read_rates(buf: &[f32], threads: usize, reps: usize, ops: &[usize]) -> Vec<ReadRate> {
    read_patterns(buf, threads, reps, &READ_PATTERNS, ops)
        .into_iter()
        .map(|r| ReadRate {
            pattern: r.pattern.name(),
            best_gbs: r.best / 1e9,
            median_gbs: r.median / 1e9,
            worst_gbs: r.worst / 1e9,
        })
        .collect()
}

/// One shape of `linear_packed` with its inputs: `copies` packed weights.
struct Case {
    m: usize,
    k: usize,
    n: usize,
    dtype: Dtype,
    /// Each copy's packed bytes (in u32, for alignment).
    ws: Vec<Vec<u32>>,
    x: Vec<f32>,
    bias: Vec<f32>,
    out: Vec<f32>,
}

impl Case {
    fn new(m: usize, k: usize, n: usize, dtype: Dtype, copies: usize) -> Case {
        use gpt2_kernels::{pack, packed_bytes, PanelsMut};
        let ws = (0..copies)
            .map(|c| {
                let mut p = vec![0u32; packed_bytes(dtype, k, n) / 4];
                let dst = PanelsMut::from_bytes(dtype, bytemuck::cast_slice_mut(&mut p), k, n);
                pack(dst, &filled(k * n, c), k, n); // [K, N] in panels
                p
            })
            .collect();
        Case {
            m,
            k,
            n,
            dtype,
            ws,
            x: filled(m * k, copies),    // [M, K]
            bias: filled(n, copies + 1), // [N]
            out: vec![0.0f32; m * n],    // [M, N]
        }
    }

    /// Seconds of one call on weight copy `c`.
    fn call(&mut self, c: usize) -> f64 {
        let w =
            gpt2_kernels::Panels::from_bytes(self.dtype, bytemuck::cast_slice(&self.ws[c]), self.k, self.n);
        let t0 = Instant::now();
        gpt2_kernels::linear_panels(
            &mut self.out,
            &self.x,
            w,
            Some(&self.bias),
            self.m,
            self.k,
            self.n,
        );
        let secs = t0.elapsed().as_secs_f64();
        std::hint::black_box(&self.out);
        secs
    }

    /// `2·M·K·N` over the median of `secs`, GFLOP/s.
    fn gflops(&self, mut secs: Vec<f64>) -> f64 {
        secs.sort_by(f64::total_cmp);
        2.0 * (self.m * self.k * self.n) as f64 / secs[secs.len() / 2].max(1e-9) / 1e9
    }
}

/// GFLOP/s of the engine's `linear_packed` at one shape, `(from memory,
/// from cache)`, over the median of `reps` calls of each kind after one
/// warm-up. From memory, each call takes the next of several packed weight
/// copies that together take `cold_bytes`; from cache, a call takes copy 0
/// right after an untimed call on it (a GPT-2 124M weight, 2.4–9.4 MB, fits
/// in the last-level cache of the machines we measure). The two kinds
/// alternate, so that both see the same conditions on a shared machine,
/// where what the neighbours run can halve a core's FMA rate for seconds.
fn time_linear(m: usize, k: usize, n: usize, reps: usize, cold_bytes: usize) -> (f64, f64) {
    // Copy 0 stays in cache; copies 1.. take `cold_bytes` between them.
    let cold_copies = cold_bytes.div_ceil(k * n * std::mem::size_of::<f32>()).max(1);
    let mut case = Case::new(m, k, n, Dtype::F32, 1 + cold_copies);
    case.call(1);
    let (mut cold, mut hot) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for r in 0..reps {
        cold.push(case.call(1 + (r + 1) % cold_copies));
        case.call(0);
        hot.push(case.call(0));
    }
    (case.gflops(cold), case.gflops(hot))
}

/// GFLOP/s of `linear_packed` at one shape over one weight (from cache
/// when it fits), after one warm-up call: `rounds` rounds of `calls` calls,
/// the best round's median. Best of several, like the read bandwidth: a
/// limit of the machine, which a neighbour's burst should not lower.
fn time_linear_in_cache(m: usize, k: usize, n: usize, dtype: Dtype, rounds: usize, calls: usize) -> f64 {
    let mut case = Case::new(m, k, n, dtype, 1);
    case.call(0);
    (0..rounds)
        .map(|_| {
            let secs = (0..calls).map(|_| case.call(0)).collect();
            case.gflops(secs)
        })
        .fold(0.0, f64::max)
}

/// `len` deterministic values in [-0.5, 0.5), different for each `seed`.
fn filled(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

impl Limits {
    /// The arithmetic peak of `dtype`'s products on all threads, and its
    /// name: the int8 dot-product peak for int8 where measured, else the FMA
    /// peak (bf16 is widened to f32 and multiplied by FMAs).
    pub fn compute_peak(&self, dtype: Dtype) -> (f64, String) {
        if dtype == Dtype::Int8 && self.int8_gops_all > 0.0 {
            (
                self.int8_gops_all,
                format!("int8 dot-product peak ({})", self.int8_dot),
            )
        } else {
            (self.fma_gflops_all, "FMA peak".into())
        }
    }

    /// [`Limits::rows8_in_l2_gflops_1t`] in `dtype`; f32's where it was not
    /// measured in that dtype (reports written before).
    pub fn rows8_in_l2_gflops(&self, dtype: Dtype) -> f64 {
        self.rows8_in_l2_by_dtype
            .iter()
            .find(|r| r.dtype == dtype.as_str())
            .map_or(self.rows8_in_l2_gflops_1t, |r| r.gflops)
    }

    /// The best `linear_packed` rate at `min_rows` rows or more, GFLOP/s (0
    /// without such a shape): the report's figure for prefill-sized calls.
    pub fn best_linear_packed_gflops(&self, min_rows: usize) -> f64 {
        self.linear_packed
            .iter()
            .filter(|p| p.m >= min_rows)
            .map(|p| p.gflops)
            .fold(0.0, f64::max)
    }

    /// The decode rate that memory bandwidth allows, tokens/s, when each token
    /// must stream `bytes_per_token` bytes (for batch 1: all the weights) at
    /// the all-threads read bandwidth.
    pub fn decode_ceiling_tok_s(&self, bytes_per_token: f64) -> f64 {
        assert!(
            bytes_per_token > 0.0,
            "decode_ceiling_tok_s: bytes_per_token must be positive"
        );
        self.read_gbs_all * 1e9 / bytes_per_token
    }

    /// The read rate a batch-1 decode in `dtype` is held to, GB/s: the read
    /// of a buffer of its size ([`Limits::decode_reads`]) where measured,
    /// else the bandwidth buffer's.
    pub fn decode_read_gbs(&self, dtype: Dtype) -> f64 {
        self.decode_reads
            .iter()
            .find(|r| r.dtype == dtype.as_str())
            .map_or(self.read_gbs_all, |r| r.best_gbs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_settings() -> ProbeSettings {
        ProbeSettings {
            buf_bytes: 4 << 20,
            read_reps: 2,
            fma_seconds: 0.05,
            gemm_reps: 3,
            cold_bytes: 1 << 20,
            // M = 4 takes the few-rows path of `linear_packed`, M = 40 the many-rows one.
            shapes: vec![("few".to_string(), 4, 48, 80), ("many".to_string(), 40, 48, 80)],
        }
    }

    #[test]
    fn tiny_measurement_is_finite_and_positive() {
        let l = measure_with(&tiny_settings(), &[(Dtype::Int8, 3e6)]);
        let figures = [
            l.read_gbs_1t,
            l.read_gbs_all,
            l.read_fma8_gbs_1t,
            l.read_fma8_gbs_all,
            l.fma_gflops_1t,
            l.fma_gflops_all,
            l.rows8_in_l2_gflops_1t,
        ];
        assert!(figures.iter().all(|f| f.is_finite() && *f > 0.0), "{l:?}");
        assert!(l.threads >= 1);
        assert_eq!(l.linear_packed.len(), 2);
        assert!(
            l.linear_packed
                .iter()
                .all(|p| [p.gflops, p.gflops_hot].iter().all(|g| g.is_finite() && *g > 0.0)),
            "{l:?}"
        );

        let table = crate::report::limits_table(&l);
        assert!(
            table.contains("| read bandwidth (GB/s) |") && table.contains("| many | 40 | 48 | 80 |"),
            "{table}"
        );
        let ceiling = l.decode_ceiling_tok_s(1e9);
        assert!(
            (ceiling - l.read_gbs_all).abs() <= 1e-9 * ceiling,
            "{ceiling} vs {}",
            l.read_gbs_all
        );

        // Every pattern read, the best of them the limit; the decode-sized
        // buffer read and used for its dtype, the big buffer for the others.
        assert_eq!(l.read_patterns.len(), READ_PATTERNS.len());
        let best = l.read_patterns.iter().map(|r| r.best_gbs).fold(0.0, f64::max);
        assert_eq!(l.read_gbs_all, best);
        assert!(
            l.read_patterns
                .iter()
                .all(|r| r.best_gbs >= r.median_gbs && r.median_gbs >= r.worst_gbs && r.worst_gbs > 0.0),
            "{:?}",
            l.read_patterns
        );
        assert_eq!(l.decode_reads.len(), 1);
        assert_eq!(l.decode_read_gbs(Dtype::Int8), l.decode_reads[0].best_gbs);
        assert_eq!(l.decode_read_gbs(Dtype::F32), l.read_gbs_all);
        assert!(
            table.contains("2 streams per thread") && table.contains("int8"),
            "{table}"
        );

        let back: Limits = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back.linear_packed[1].name, "many");
        assert_eq!(back.read_gbs_all, l.read_gbs_all);
        assert_eq!(back.decode_reads, l.decode_reads);
    }

    /// int8 is held to its dot products' peak where measured, everything
    /// else (and int8 in reports from before) to the FMA peak.
    #[test]
    fn each_dtype_has_its_arithmetic_peak() {
        let mut l = measure_with(&tiny_settings(), &[]);
        assert!(l.int8_gops_all > 0.0 && !l.int8_dot.is_empty(), "{l:?}");
        assert_eq!(l.compute_peak(Dtype::Int8).0, l.int8_gops_all);
        assert!(l.compute_peak(Dtype::Int8).1.contains(&l.int8_dot));
        for d in [Dtype::F32, Dtype::Bf16] {
            assert_eq!(l.compute_peak(d), (l.fma_gflops_all, "FMA peak".to_string()));
        }
        l.int8_gops_all = 0.0;
        assert_eq!(l.compute_peak(Dtype::Int8).0, l.fma_gflops_all);
    }

    /// The engine's order reads a decode step's matrices, 124M's 124.4M
    /// weights less the biases, norms and position embeddings.
    #[test]
    fn the_engine_order_is_a_decode_step() {
        let ops = decode_matrices();
        assert_eq!(ops.len(), 12 * 4 + 1);
        assert_eq!(ops.iter().sum::<usize>(), 124_439_808 - 907_776);
    }

    #[test]
    fn settings_cover_the_gpt2_shapes() {
        for quick in [true, false] {
            let settings = ProbeSettings::new(quick);
            assert_eq!(settings.shapes.len(), 6);
            assert!(settings.shapes.contains(&("mlp_down".to_string(), 8, 3072, 768)));
            assert!(
                settings.buf_bytes >= 256 << 20,
                "the buffer must dwarf the last-level cache"
            );
        }
    }

    /// The full measurement, printed:
    /// `cargo test --release --lib probe -- --ignored --nocapture`.
    #[test]
    #[ignore = "takes seconds and 1 GiB of RAM; run by hand"]
    fn print_full_measurement() {
        let l = measure(false);
        println!("{}", crate::report::limits_table(&l));
        println!("{}", serde_json::to_string_pretty(&l).unwrap());
        assert!(l.read_gbs_all > 0.0 && l.fma_gflops_all > 0.0);
    }
}
