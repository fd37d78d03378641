//! Machine limits, measured: sustained memory read bandwidth and peak FMA
//! throughput, the raw probes. `gpt2_bench::probe` runs them (and `linear_packed`
//! at GPT-2 shapes) into its `Limits`, and the benchmark report's `Roofline`
//! divides what the engine achieves by those.
//!
//! Both probes run on exactly `threads` OS threads (`std::thread::scope`, not
//! rayon, so the count is exact and no pool is shared with the kernels), start
//! them together behind a barrier, and return a checksum of the work next to
//! the rate: the checksum goes through `black_box`, so the compiler cannot
//! delete the loads or the FMAs it depends on.
//!
//! Units are SI: 1 GB = 1e9 bytes, 1 GFLOP = 1e9 floating-point operations,
//! an FMA counting as two.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// The best sustained read rate of [`read_bandwidth`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadBandwidth {
    /// Bytes read per second, best over the repetitions.
    pub bytes_per_s: f64,
    /// Sum of the buffer from the last repetition (order of summation varies).
    pub checksum: f64,
}

/// The FMA throughput of [`fma_peak`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FmaPeak {
    /// Peak rate, 10⁹ floating-point operations per second: the sum over the
    /// threads of each one's best window of [`FMA_WINDOW`].
    pub gflops: f64,
    /// All the work over the whole run of the slowest thread, in the same
    /// unit: below `gflops` by what other load on the machine took.
    pub sustained_gflops: f64,
    /// Sum of the final accumulators of every thread.
    pub checksum: f64,
    /// Width of the FMA instructions measured: 512 (AVX-512), 256 (AVX2 +
    /// FMA), or 128 for the portable loop (separate multiplies and adds in
    /// SSE registers, not the core's FMA peak).
    pub vector_bits: u32,
}

/// The length of the windows that [`fma_peak`] keeps the best of. Short
/// enough that most windows of a busy machine are not interrupted, long
/// enough (~100 clock reads) that the clock costs nothing.
pub const FMA_WINDOW: Duration = Duration::from_millis(1);

/// Reads `buf` once per repetition, split into `threads` contiguous chunks,
/// one per thread, and returns the best of `reps` timings. Make `buf` far
/// larger than the last-level cache (and touch it first) to measure DRAM.
///
/// A repetition is timed from the first thread's start, after the barrier
/// that releases them all, to the last one's end, so it is the slowest chunk
/// that counts.
pub fn read_bandwidth(buf: &[f32], threads: usize, reps: usize) -> ReadBandwidth {
    timed_reads(buf, threads, reps, sum)
}

/// Rows of x that every weight meets in [`read_fma_bandwidth`]: a decode
/// step batched over 8 sequences.
pub const FMA_ROWS: usize = 8;

/// [`read_bandwidth`] with the arithmetic of an 8-row decode step on top:
/// every loaded 8-float vector goes into [`FMA_ROWS`] fused multiply-adds,
/// one per row, into accumulators held in registers, and a software
/// prefetch asks for the lines 2 KiB ahead. Nothing else: no x loads, no
/// stores, no tiles. So this is the most an 8-row step that streams its
/// weights once can expect of this machine: where reads and FMAs overlap
/// fully it matches `read_bandwidth`; where they do not it is lower.
/// (Here, 2 threads on 2 Zen 3 cores, best of 5 reads of 1 GiB: 0.75-1.0x
/// the plain read; a loop of the same kind without the prefetch measured
/// 0.66-0.82x.) The checksum is [`FMA_ROWS`] times the buffer's sum.
pub fn read_fma_bandwidth(buf: &[f32], threads: usize, reps: usize) -> ReadBandwidth {
    timed_reads(buf, threads, reps, sum_rows)
}

/// How [`read_patterns`] lays a read out over its threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPattern {
    /// Each thread reads its contiguous share of the buffer front to back
    /// (what [`read_bandwidth`] does).
    OneStream,
    /// Each thread reads its share as `n` equal parts side by side, a block
    /// of each in turn: `n` streams in flight (the one-row kernel reads two
    /// panels at once).
    Streams(usize),
    /// One stream per thread, with a software prefetch of the lines 4 KiB
    /// ahead.
    Prefetched,
    /// The engine's order: the buffer cut into the given matrix sizes (a
    /// decode step's, in bytes), each matrix split among the threads as a
    /// linear layer splits its panels, with a fork-join (a barrier) after
    /// each, as after every op of a forward pass.
    Ops,
}

impl ReadPattern {
    /// The pattern in words, as reports name it.
    pub fn name(self) -> String {
        match self {
            ReadPattern::OneStream => "1 stream per thread".into(),
            ReadPattern::Streams(n) => format!("{n} streams per thread"),
            ReadPattern::Prefetched => "1 stream, prefetch 4 KiB ahead".into(),
            ReadPattern::Ops => "the engine's order: per matrix, a fork-join".into(),
        }
    }
}

/// The rates of one [`ReadPattern`] over the repetitions of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadSpread {
    pub pattern: ReadPattern,
    /// Bytes per second: the best, median and worst repetition.
    pub best: f64,
    pub median: f64,
    pub worst: f64,
    /// The buffer's sum from the last repetition, times the pattern's reads.
    pub checksum: f64,
}

/// Reads `buf` with each of `patterns` in turn, `reps` times each, the
/// patterns interleaved repetition by repetition (so that a busy moment of
/// a shared machine does not fall on one pattern), on `threads` threads.
/// `ops` are the matrix sizes of [`ReadPattern::Ops`] in floats (cycled
/// until the buffer is covered). Each result is its pattern's best, median
/// and worst repetition.
pub fn read_patterns(
    buf: &[f32],
    threads: usize,
    reps: usize,
    patterns: &[ReadPattern],
    ops: &[usize],
) -> Vec<ReadSpread> {
    assert!(
        threads >= 1 && reps >= 1,
        "read_patterns: threads and reps must be at least 1"
    );
    assert!(ops.iter().all(|&n| n > 0), "read_patterns: an empty matrix");
    let mut times = vec![Vec::with_capacity(reps); patterns.len()];
    let mut checksums = vec![0f64; patterns.len()];
    for _ in 0..reps {
        for (i, &p) in patterns.iter().enumerate() {
            let (t, sum) = timed_pattern(buf, threads, p, ops);
            times[i].push(t);
            checksums[i] = sum;
        }
    }
    let bytes = std::mem::size_of_val(buf) as f64;
    patterns
        .iter()
        .zip(times)
        .zip(checksums)
        .map(|((&pattern, mut t), checksum)| {
            t.sort();
            let rate = |d: Duration| bytes / d.as_secs_f64().max(1e-9);
            ReadSpread {
                pattern,
                best: rate(t[0]),
                median: rate(t[t.len() / 2]),
                worst: rate(t[t.len() - 1]),
                checksum: black_box(checksum),
            }
        })
        .collect()
}

/// One read of `buf` in `pattern` on `threads` threads: `(time, sum)`.
fn timed_pattern(buf: &[f32], threads: usize, pattern: ReadPattern, ops: &[usize]) -> (Duration, f64) {
    // The matrices of the engine's order, cycled over the buffer.
    let mut matrices = Vec::new();
    if pattern == ReadPattern::Ops {
        let mut at = 0;
        for &n in ops.iter().cycle() {
            if at >= buf.len() {
                break;
            }
            let end = (at + n).min(buf.len());
            matrices.push(&buf[at..end]);
            at = end;
        }
    }
    let barrier = Barrier::new(threads);
    timed_threads(buf, threads, |t, part| match pattern {
        ReadPattern::OneStream => sum(part),
        ReadPattern::Streams(n) => sum_streams(part, n),
        ReadPattern::Prefetched => sum_prefetched(part),
        ReadPattern::Ops => {
            let mut sum_all = 0.0;
            for m in &matrices {
                // This thread's share, as a linear layer's task takes a run
                // of whole panels, then the fork-join's barrier.
                let c = m.len().div_ceil(threads);
                sum_all += black_box(sum(&m[(t * c).min(m.len())..((t + 1) * c).min(m.len())]));
                barrier.wait();
            }
            sum_all
        }
    })
}

/// Runs `work(t, part)` on `threads` new threads, thread t on its
/// contiguous share of `buf` (whole blocks but for the last), released
/// together: `(time, Σ results)`. The threads take the time themselves,
/// from the first one's start to the last one's end (a clock held by the
/// spawning thread, one more than the cores, would start late whenever it
/// is not scheduled at once, and overstate the rate).
fn timed_threads(buf: &[f32], threads: usize, work: impl Fn(usize, &[f32]) -> f32 + Sync) -> (Duration, f64) {
    let chunk = buf.len().div_ceil(threads).div_ceil(BLOCK) * BLOCK;
    let barrier = Barrier::new(threads);
    let runs: Vec<(Instant, Instant, f32)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, work) = (&barrier, &work);
                let part = &buf[(t * chunk).min(buf.len())..((t + 1) * chunk).min(buf.len())];
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    let sum = black_box(work(t, black_box(part)));
                    (start, Instant::now(), sum)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("probe: a worker panicked"))
            .collect()
    });
    let start = runs.iter().map(|r| r.0).min().expect("at least one thread");
    let end = runs.iter().map(|r| r.1).max().expect("at least one thread");
    (end - start, runs.iter().map(|r| f64::from(r.2)).sum())
}

/// [`sum`] over `n` equal parts of `x` side by side: block i of every part,
/// then block i + 1.
fn sum_streams(x: &[f32], n: usize) -> f32 {
    let part = x.len().div_ceil(n.max(1)).div_ceil(BLOCK).max(1) * BLOCK;
    let parts: Vec<&[f32]> = x.chunks(part).collect();
    sum_parts(&parts, false)
}

/// [`sum`] with a software prefetch of the lines 4 KiB ahead.
fn sum_prefetched(x: &[f32]) -> f32 {
    sum_parts(&[x], true)
}

/// The sum of every part, read block by block side by side (block i of
/// each part, then block i + 1), optionally prefetching 4 KiB ahead in each.
fn sum_parts(parts: &[&[f32]], prefetch: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { sum_parts_avx2(parts, prefetch) };
    }
    let _ = prefetch;
    let mut total = 0.0;
    let longest = parts.iter().map(|p| p.len()).max().unwrap_or(0);
    for b in (0..longest).step_by(BLOCK) {
        for p in parts {
            if let Some(block) = p.get(b..(b + BLOCK).min(p.len())) {
                total += sum_portable(block);
            }
        }
    }
    total
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_parts_avx2(parts: &[&[f32]], prefetch: bool) -> f32 {
    use std::arch::x86_64::*;
    /// Floats between a block and the lines its loop prefetches (4 KiB).
    const AHEAD: usize = 1024;
    let whole = parts.iter().map(|p| p.len() / BLOCK).min().unwrap_or(0);
    let mut acc = [_mm256_setzero_ps(); 8];
    for b in 0..whole {
        for p in parts {
            let ptr = p.as_ptr().wrapping_add(b * BLOCK);
            if prefetch {
                for line in 0..BLOCK / 16 {
                    // A hint: it never faults, wherever it points.
                    _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(AHEAD + 16 * line).cast());
                }
            }
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: block b < whole is inside every part, so floats
                // 8i..8i+8 (i < 8) of it are in bounds.
                let v = unsafe { _mm256_loadu_ps(ptr.add(8 * i)) };
                *a = _mm256_add_ps(*a, v);
            }
        }
    }
    // The rest of each part, past the blocks all parts have.
    let tail: f32 = parts.iter().map(|p| p[whole * BLOCK..].iter().sum::<f32>()).sum();
    // SAFETY: the CPU supports AVX2 (this function's own requirement).
    let total = unsafe { lanes_total(&acc) };
    total + tail
}

/// Times `read` over `buf` split into `threads` chunks, best of `reps`.
fn timed_reads(buf: &[f32], threads: usize, reps: usize, read: fn(&[f32]) -> f32) -> ReadBandwidth {
    assert!(threads >= 1, "read_bandwidth: threads must be at least 1");
    assert!(reps >= 1, "read_bandwidth: reps must be at least 1");
    let mut best = Duration::MAX;
    let mut checksum = 0.0f64;
    for _ in 0..reps {
        let (t, sum) = timed_threads(buf, threads, |_, part| read(part));
        best = best.min(t);
        checksum = sum;
    }
    let bytes = std::mem::size_of_val(buf) as f64;
    ReadBandwidth {
        bytes_per_s: bytes / best.as_secs_f64().max(1e-9),
        checksum: black_box(checksum),
    }
}

/// Runs independent FMA chains held in registers on each of `threads` threads
/// for about `seconds`, and returns the total rate. With enough independent
/// chains to cover the FMA latency this is the core's peak: FMA units × f32
/// lanes × 2 FLOP × clock, per core, with the widest FMA the CPU has
/// (AVX-512's 16 lanes where present, else AVX2's 8; [`FmaPeak::vector_bits`]
/// says which).
pub fn fma_peak(threads: usize, seconds: f64) -> FmaPeak {
    assert!(threads >= 1, "fma_peak: threads must be at least 1");
    assert!(seconds > 0.0, "fma_peak: seconds must be positive");
    let unit = FmaUnit::widest();
    let budget = Duration::from_secs_f64(seconds);
    let barrier = Barrier::new(threads);
    let runs: Vec<FmaRun> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = &barrier;
                s.spawn(move || {
                    // acc ← acc·a + b converges to b / (1 - a) = 1: no overflow,
                    // no denormals, however long it runs.
                    let (a, b) = (black_box(0.999_9f32), black_box(1e-4f32));
                    barrier.wait();
                    let mut run = FmaRun {
                        flops: 0,
                        elapsed: Duration::ZERO,
                        best: 0.0,
                        check: 0.0,
                    };
                    let t0 = Instant::now();
                    while run.elapsed < budget {
                        let w0 = Instant::now();
                        let mut flops = 0u64;
                        while w0.elapsed() < FMA_WINDOW {
                            run.check += unit.chains(FMA_ITERS, a, b);
                            flops += FMA_ITERS * unit.flops_per_iter();
                        }
                        run.best = run.best.max(flops as f64 / w0.elapsed().as_secs_f64());
                        run.flops += flops;
                        run.elapsed = t0.elapsed();
                    }
                    black_box(run)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("fma_peak: a worker panicked"))
            .collect()
    });
    let flops: u64 = runs.iter().map(|r| r.flops).sum();
    let slowest = runs.iter().map(|r| r.elapsed).max().unwrap_or(Duration::ZERO);
    FmaPeak {
        gflops: runs.iter().map(|r| r.best).sum::<f64>() / 1e9,
        sustained_gflops: flops as f64 / slowest.as_secs_f64().max(1e-9) / 1e9,
        checksum: black_box(runs.iter().map(|r| f64::from(r.check)).sum()),
        vector_bits: unit.bits(),
    }
}

/// The int8 dot-product throughput of [`int8_dot_peak`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DotPeak {
    /// Peak rate, 10⁹ integer operations per second (a multiply-add of two
    /// int8 values counting as two, as an FMA does): the sum over the
    /// threads of each one's best window of [`FMA_WINDOW`].
    pub gops: f64,
    /// Sum of the final accumulators of every thread.
    pub checksum: i64,
    /// What was measured: `vpdpbusd zmm` (AVX512-VNNI), `vpdpbusd ymm`
    /// (AVX-VNNI), `vpmaddubsw ymm` (AVX2's three-instruction form) or
    /// `portable`.
    pub instruction: &'static str,
}

/// Runs independent int8 dot-product chains (four multiply-adds into each
/// i32 lane per instruction, as the int8 tiles do) on each of `threads`
/// threads for about `seconds`: the ceiling of the int8 products, as
/// [`fma_peak`] is of the f32 ones. With the widest instruction the CPU
/// has: AVX512-VNNI, AVX-VNNI, else AVX2's `vpmaddubsw` + `vpmaddwd` +
/// `vpaddd`.
pub fn int8_dot_peak(threads: usize, seconds: f64) -> DotPeak {
    assert!(threads >= 1, "int8_dot_peak: threads must be at least 1");
    assert!(seconds > 0.0, "int8_dot_peak: seconds must be positive");
    let (chains, ops_per_iter, instruction): (fn(u64) -> i64, u64, &'static str) = dot_unit();
    let budget = Duration::from_secs_f64(seconds);
    let barrier = Barrier::new(threads);
    let runs: Vec<(f64, i64)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let (t0, mut best, mut check) = (Instant::now(), 0f64, 0i64);
                    while t0.elapsed() < budget {
                        let w0 = Instant::now();
                        let mut ops = 0u64;
                        while w0.elapsed() < FMA_WINDOW {
                            check = check.wrapping_add(chains(black_box(FMA_ITERS)));
                            ops += FMA_ITERS * ops_per_iter;
                        }
                        best = best.max(ops as f64 / w0.elapsed().as_secs_f64());
                    }
                    black_box((best, check))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("int8_dot_peak: a worker panicked"))
            .collect()
    });
    DotPeak {
        gops: runs.iter().map(|r| r.0).sum::<f64>() / 1e9,
        checksum: runs.iter().fold(0i64, |a, r| a.wrapping_add(r.1)),
        instruction,
    }
}

/// Independent chains of the int8 dot-product loops.
const DOT_CHAINS: usize = 16;

/// The widest int8 dot-product loop this CPU runs: the loop, its integer
/// operations per iteration, and its name.
fn dot_unit() -> (fn(u64) -> i64, u64, &'static str) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bw") {
            // SAFETY (each arm's call): the features were detected just above.
            return (
                |n| unsafe { dot_chains_avx512vnni(n) },
                (DOT_CHAINS * 64 * 2) as u64,
                "vpdpbusd zmm",
            );
        }
        if is_x86_feature_detected!("avxvnni") {
            return (
                |n| unsafe { dot_chains_avxvnni(n) },
                (DOT_CHAINS * 32 * 2) as u64,
                "vpdpbusd ymm",
            );
        }
        if is_x86_feature_detected!("avx2") {
            return (
                |n| unsafe { dot_chains_avx2(n) },
                (DOT_CHAINS * 32 * 2) as u64,
                "vpmaddubsw ymm",
            );
        }
    }
    (dot_chains_portable, (DOT_CHAINS * 4 * 2) as u64, "portable")
}

/// `iters` rounds of a four-way int8 dot product into each of [`DOT_CHAINS`]
/// 32-bit lanes, in plain Rust.
fn dot_chains_portable(iters: u64) -> i64 {
    let (a, b) = (black_box([3i8, -2, 5, 7]), black_box([1i8, 4, -6, 2]));
    let mut acc = [0i32; DOT_CHAINS];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            let d: i32 = a
                .iter()
                .zip(&b)
                .map(|(&p, &q)| (p ^ *x as i8) as i32 * q as i32)
                .sum();
            *x = x.wrapping_add(d);
        }
    }
    acc.iter().map(|&x| x as i64).sum()
}

/// The lanes of `acc`'s registers summed into an i64.
#[cfg(target_arch = "x86_64")]
fn lanes_i64<T: Copy>(acc: &[T]) -> i64 {
    let n = std::mem::size_of_val(acc) / 4;
    // SAFETY: the registers are plain bytes, read as their i32 lanes.
    let lanes = unsafe { std::slice::from_raw_parts(acc.as_ptr().cast::<i32>(), n) };
    lanes.iter().map(|&x| x as i64).sum()
}

/// # Safety
/// The CPU must support AVX512-VNNI and AVX512-BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_chains_avx512vnni(iters: u64) -> i64 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_epi8(black_box(3)), _mm512_set1_epi8(black_box(-2)));
    let mut acc = [_mm512_setzero_si512(); DOT_CHAINS];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_dpbusd_epi32(*x, a, b);
        }
    }
    lanes_i64(&acc)
}

/// # Safety
/// The CPU must support AVX-VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn dot_chains_avxvnni(iters: u64) -> i64 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_epi8(black_box(3)), _mm256_set1_epi8(black_box(-2)));
    let mut acc = [_mm256_setzero_si256(); DOT_CHAINS];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm256_dpbusd_avx_epi32(*x, a, b);
        }
    }
    lanes_i64(&acc)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_chains_avx2(iters: u64) -> i64 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_epi8(black_box(3)), _mm256_set1_epi8(black_box(-2)));
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_si256(); DOT_CHAINS];
    let _ = a;
    for _ in 0..iters {
        for x in acc.iter_mut() {
            // The chain's own bytes as the unsigned operand, so that the
            // products are not loop-invariant (and hoisted).
            *x = _mm256_add_epi32(*x, _mm256_madd_epi16(_mm256_maddubs_epi16(*x, b), ones));
        }
    }
    lanes_i64(&acc)
}

/// Which FMA loop [`fma_peak`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FmaUnit {
    Portable,
    Avx2,
    Avx512,
}

impl FmaUnit {
    /// The widest this CPU has.
    fn widest() -> FmaUnit {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return FmaUnit::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return FmaUnit::Avx2;
            }
        }
        FmaUnit::Portable
    }

    fn bits(self) -> u32 {
        match self {
            FmaUnit::Portable => 128,
            FmaUnit::Avx2 => 256,
            FmaUnit::Avx512 => 512,
        }
    }

    /// FLOP per iteration of [`FmaUnit::chains`]: one FMA (2 FLOP) per lane
    /// of every chain.
    fn flops_per_iter(self) -> u64 {
        match self {
            FmaUnit::Portable | FmaUnit::Avx2 => FLOPS_PER_ITER,
            FmaUnit::Avx512 => (CHAINS_512 * 16 * 2) as u64,
        }
    }

    /// `iters` rounds of `acc ← acc·a + b` over the unit's chains.
    fn chains(self, iters: u64, a: f32, b: f32) -> f32 {
        match self {
            FmaUnit::Portable => fma_chains_portable(iters, a, b),
            // SAFETY: `widest` chose this unit only on a CPU with AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            FmaUnit::Avx2 => unsafe { fma_chains_avx2(iters, a, b) },
            // SAFETY: `widest` chose this unit only on a CPU with AVX-512 F.
            #[cfg(target_arch = "x86_64")]
            FmaUnit::Avx512 => unsafe { fma_chains_avx512(iters, a, b) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the portable unit off x86-64"),
        }
    }
}

/// What one thread of [`fma_peak`] did.
struct FmaRun {
    flops: u64,
    elapsed: Duration,
    /// Best FLOP/s over a window.
    best: f64,
    check: f32,
}

/// Floats per inner block of the read loop: 8 accumulators × 8 lanes.
const BLOCK: usize = 64;

/// Independent FMA chains. An FMA has a latency of 4–5 cycles and two issue
/// per cycle on current x86 cores, so at least 8–10 chains must be in flight
/// to saturate both units; 12 plus the two constants still fit the 16 YMM
/// registers.
const CHAINS: usize = 12;

/// Independent chains of the AVX-512 loop: two 512-bit FMA units with a
/// latency of 4 cycles need 8 in flight; 16 keep the loop far from that
/// bound. (24 spilled in a build for baseline x86-64: LLVM rotated the
/// accumulators through the stack, and the probe read half the peak.)
const CHAINS_512: usize = 16;

/// Iterations between two looks at the clock (~25k cycles at peak).
const FMA_ITERS: u64 = 4096;

/// FLOP per iteration of the AVX2 and portable loops: `CHAINS` FMAs of 8
/// lanes, 2 FLOP each.
const FLOPS_PER_ITER: u64 = (CHAINS * 8 * 2) as u64;

/// Sum of `x` with 8 independent 8-lane accumulators, so that the add latency
/// never limits the loads.
fn sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { sum_avx2(x) };
    }
    sum_portable(x)
}

/// The fallback of [`sum`]: a `[f32; 64]` accumulator that LLVM keeps in
/// eight vector registers (or 16 SSE ones).
fn sum_portable(x: &[f32]) -> f32 {
    let blocks = x.chunks_exact(BLOCK);
    let tail: f32 = blocks.remainder().iter().sum();
    let mut acc = [0.0f32; BLOCK];
    for block in blocks {
        for (a, v) in acc.iter_mut().zip(block) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let blocks = x.chunks_exact(BLOCK);
    let tail: f32 = blocks.remainder().iter().sum();
    let mut acc = [_mm256_setzero_ps(); 8];
    for block in blocks {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: `block` holds 64 floats, so floats 8i..8i+8 (i < 8) are in
            // bounds; the unaligned load has no alignment requirement.
            let v = unsafe { _mm256_loadu_ps(block.as_ptr().add(8 * i)) };
            *a = _mm256_add_ps(*a, v);
        }
    }
    // SAFETY: the CPU supports AVX2 (this function's own requirement).
    let total = unsafe { lanes_total(&acc) };
    total + tail
}

/// Every 8-float vector of `x` multiplied by 1 and added into [`FMA_ROWS`]
/// accumulators, one per row: the sum of `x` times [`FMA_ROWS`].
fn sum_rows(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        return unsafe { sum_rows_avx2(x, black_box(1.0)) };
    }
    sum_rows_portable(x, black_box(1.0))
}

/// The fallback of [`sum_rows`]: plain multiplies and adds.
fn sum_rows_portable(x: &[f32], one: f32) -> f32 {
    let blocks = x.chunks_exact(8);
    let tail: f32 = blocks.remainder().iter().sum::<f32>() * FMA_ROWS as f32;
    let mut acc = [[0.0f32; 8]; FMA_ROWS];
    for v in blocks {
        for row in acc.iter_mut() {
            for (a, &w) in row.iter_mut().zip(v) {
                *a += w * one;
            }
        }
    }
    acc.iter().flatten().sum::<f32>() + tail
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_rows_avx2(x: &[f32], one: f32) -> f32 {
    use std::arch::x86_64::*;
    /// Floats between a vector and the line its loop prefetches (2 KiB).
    const AHEAD: usize = 512;
    let blocks = x.chunks_exact(BLOCK);
    let tail: f32 = blocks.remainder().iter().sum::<f32>() * FMA_ROWS as f32;
    let m = _mm256_set1_ps(one);
    // Distinct starting values (row r starts at r, taken off at the end):
    // equal accumulators fed the same FMAs could be merged into one.
    let mut acc: [__m256; FMA_ROWS] = std::array::from_fn(|r| _mm256_set1_ps(r as f32));
    for block in blocks {
        let p = block.as_ptr();
        for line in 0..BLOCK / 16 {
            // A hint: it never faults, wherever it points.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD + 16 * line).cast());
        }
        for i in 0..BLOCK / 8 {
            // SAFETY: `block` holds 64 floats, so floats 8i..8i+8 (i < 8) are
            // in bounds; the unaligned load has no alignment requirement.
            let v = unsafe { _mm256_loadu_ps(p.add(8 * i)) };
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(v, m, *a);
            }
        }
    }
    // SAFETY: the CPU supports AVX2 (this function's own requirement).
    let total = unsafe { lanes_total(&acc) };
    total - ROW_STARTS + tail
}

/// What the starting values of [`sum_rows_avx2`]'s accumulators add up to:
/// 8 lanes of 0 + 1 + ... + 7.
const ROW_STARTS: f32 = (8 * FMA_ROWS * (FMA_ROWS - 1) / 2) as f32;

/// The sum of every lane of every register of `acc`: the registers added
/// in order, then their 8 lanes.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lanes_total(acc: &[std::arch::x86_64::__m256]) -> f32 {
    use std::arch::x86_64::*;
    let mut total = _mm256_setzero_ps();
    for &a in acc {
        total = _mm256_add_ps(total, a);
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds 8 floats; the unaligned store has no alignment
    // requirement.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
    lanes.iter().sum()
}

/// `iters` rounds of `acc ← acc·a + b` over [`CHAINS`] independent 8-lane
/// accumulators; returns the sum of the accumulators. The portable
/// [`FmaUnit`]: a separate multiply and add per element
/// (still 2 FLOP), since a software `fma` call would measure libm.
fn fma_chains_portable(iters: u64, a: f32, b: f32) -> f32 {
    let mut acc = [[0.0f32; 8]; CHAINS];
    for (i, chain) in acc.iter_mut().enumerate() {
        chain.fill(i as f32 * 0.01);
    }
    for _ in 0..iters {
        for chain in acc.iter_mut() {
            for x in chain.iter_mut() {
                *x = *x * a + b;
            }
        }
    }
    acc.iter().flatten().sum()
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(iters: u64, a: f32, b: f32) -> f32 {
    use std::arch::x86_64::*;
    let va = _mm256_set1_ps(a);
    let vb = _mm256_set1_ps(b);
    // Distinct starting values: equal chains would let LLVM merge them into one,
    // which would then be latency-bound.
    let mut acc = [_mm256_setzero_ps(); CHAINS];
    for (i, x) in acc.iter_mut().enumerate() {
        *x = _mm256_set1_ps(i as f32 * 0.01);
    }
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, va, vb);
        }
    }
    // SAFETY: the CPU supports AVX2 (this function's own requirement).
    unsafe { lanes_total(&acc) }
}

/// # Safety
/// The CPU must support AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn fma_chains_avx512(iters: u64, a: f32, b: f32) -> f32 {
    use std::arch::x86_64::*;
    let va = _mm512_set1_ps(a);
    let vb = _mm512_set1_ps(b);
    // Distinct starting values, as in `fma_chains_avx2`.
    let mut acc = [_mm512_setzero_ps(); CHAINS_512];
    for (i, x) in acc.iter_mut().enumerate() {
        *x = _mm512_set1_ps(i as f32 * 0.01);
    }
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, va, vb);
        }
    }
    let mut total = 0.0;
    for x in acc {
        total += _mm512_reduce_add_ps(x);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_agree_with_a_plain_sum() {
        // 1000 is not a multiple of 64: exercises the tail.
        let x: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        let want: f32 = x.iter().sum();
        assert_eq!(sum_portable(&x), want);
        assert_eq!(sum(&x), want);
    }

    #[test]
    fn fma_chains_agree_with_the_portable_loop() {
        let want = fma_chains_portable(100, 0.9, 0.1);
        if FmaUnit::widest() == FmaUnit::Avx2 {
            let got = FmaUnit::Avx2.chains(100, 0.9, 0.1);
            assert!(
                (got - want).abs() <= 1e-3 * want.abs(),
                "fma: {got} vs portable {want}"
            );
        }
        // Each chain converges to b / (1 - a) = 1 whatever its start, so the
        // widest unit's sum is its chain count.
        let unit = FmaUnit::widest();
        let chains = match unit {
            FmaUnit::Avx512 => CHAINS_512 * 16,
            _ => CHAINS * 8,
        } as f32;
        let got = unit.chains(2000, 0.9, 0.1);
        assert!(
            (got - chains).abs() <= 1e-3 * chains,
            "{unit:?}: {got} vs {chains}"
        );
        if unit != FmaUnit::Avx512 {
            eprintln!("NOTICE: no AVX-512 on this CPU: its FMA loop was not run");
        }
    }

    #[test]
    fn read_bandwidth_is_finite_and_positive() {
        let buf = vec![1.0f32; 1 << 20];
        for threads in [1, 2, 3] {
            let r = read_bandwidth(&buf, threads, 2);
            assert!(
                r.bytes_per_s.is_finite() && r.bytes_per_s > 0.0,
                "{threads} threads: {r:?}"
            );
            assert_eq!(
                r.checksum,
                buf.len() as f64,
                "{threads} threads: every float read once"
            );
        }
    }

    /// Every pattern reads every float once, on any thread count, with
    /// sizes that leave partial blocks, parts and matrices; best ≥ median ≥
    /// worst.
    #[test]
    fn every_read_pattern_reads_every_float_once() {
        let buf = vec![1.0f32; (1 << 18) + 37];
        let patterns = [
            ReadPattern::OneStream,
            ReadPattern::Streams(2),
            ReadPattern::Streams(3),
            ReadPattern::Prefetched,
            ReadPattern::Ops,
        ];
        for threads in [1, 2, 3] {
            for r in read_patterns(&buf, threads, 3, &patterns, &[1000, 70_001, 333]) {
                assert_eq!(
                    r.checksum,
                    buf.len() as f64,
                    "{threads} threads, {}",
                    r.pattern.name()
                );
                assert!(
                    r.best >= r.median && r.median >= r.worst && r.worst > 0.0,
                    "{threads} threads: {r:?}"
                );
            }
        }
    }

    #[test]
    fn row_sums_count_every_float_once_per_row() {
        // 1000 floats: 15 whole blocks and a tail of 40.
        let x: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        let want = x.iter().sum::<f32>() * FMA_ROWS as f32;
        assert_eq!(sum_rows_portable(&x, 1.0), want);
        assert_eq!(sum_rows(&x), want);
        let buf = vec![1.0f32; 1 << 20];
        for threads in [1, 2, 3] {
            let r = read_fma_bandwidth(&buf, threads, 2);
            assert!(
                r.bytes_per_s.is_finite() && r.bytes_per_s > 0.0,
                "{threads} threads: {r:?}"
            );
            assert_eq!(r.checksum, (buf.len() * FMA_ROWS) as f64, "{threads} threads");
        }
    }

    #[test]
    fn fma_peak_is_finite_and_positive() {
        for threads in [1, 2] {
            let p = fma_peak(threads, 0.05);
            assert!(p.gflops.is_finite() && p.gflops > 0.0, "{threads} threads: {p:?}");
            assert!(
                p.sustained_gflops > 0.0 && p.sustained_gflops <= p.gflops,
                "{threads} threads: {p:?}"
            );
            assert!(p.checksum.is_finite(), "{threads} threads: {p:?}");
            assert_eq!(
                p.vector_bits,
                FmaUnit::widest().bits(),
                "{threads} threads: {p:?}"
            );
        }
    }
}
