//! Naive twins of the fast kernels: the definition of each op written as
//! plainly as possible, accumulating in f64. The tests below hold every fast
//! kernel to its twin on odd shapes; `benches/` uses them as a baseline.

/// `out[M,N] = x[M,K] · w[K,N] + bias[N]`.
pub fn linear(out: &mut [f32], x: &[f32], w: &[f32], bias: &[f32], m: usize, k: usize, n: usize) {
    for r in 0..m {
        for j in 0..n {
            let mut s = bias[j] as f64;
            for kk in 0..k {
                s += x[r * k + kk] as f64 * w[kk * n + j] as f64;
            }
            out[r * n + j] = s as f32;
        }
    }
}

/// `v` rounded to bfloat16 (the top 16 bits of an f32), to nearest with
/// ties to even, as f32; NaN stays NaN. From the definition: drop the low 16
/// bits, and add one to what is kept when they are more than half, or
/// exactly half and what is kept is odd (a carry into the exponent is the
/// right answer, up to infinity).
pub fn round_bf16(v: f32) -> f32 {
    if v.is_nan() {
        return v;
    }
    let bits = v.to_bits();
    let (kept, dropped) = (bits >> 16, bits & 0xffff);
    let up = dropped > 0x8000 || (dropped == 0x8000 && kept & 1 == 1);
    f32::from_bits((kept + up as u32) << 16)
}

/// Symmetric int8 quantisation of `w[K,N]` with one scale per column:
/// `scale[j] = max_k |w[k,j]| / 127`, `q[k,j] = round(w[k,j] / scale[j])`
/// (ties to even), so `w ≈ q · scale`. `(q [K,N], scales [N])`.
pub fn quantize_int8(w: &[f32], k: usize, n: usize) -> (Vec<i8>, Vec<f32>) {
    let scales: Vec<f32> = (0..n)
        .map(|j| (0..k).map(|kk| w[kk * n + j].abs()).fold(0.0, f32::max) / 127.0)
        .collect();
    let q = (0..k * n)
        .map(|i| {
            let s = scales[i % n];
            if s > 0.0 {
                (w[i] / s).round_ties_even() as i8
            } else {
                0
            }
        })
        .collect();
    (q, scales)
}

/// `out[M,N] = x[M,K] · w[K,N] + bias[N]` with `w` in bf16 (`w_bits`, each
/// the top half of an f32).
#[allow(clippy::too_many_arguments)]
pub fn linear_bf16(out: &mut [f32], x: &[f32], w_bits: &[u16], bias: &[f32], m: usize, k: usize, n: usize) {
    let w: Vec<f32> = w_bits.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
    linear(out, x, &w, bias, m, k, n)
}

/// One row of activations quantised to int8: `scale = max|x| / 127`,
/// `q = round(x · (127 / max|x|))` (ties to even, within ±127); zeros when
/// the row is. `(q, scale)`.
pub fn quantize_row_int8(x: &[f32]) -> (Vec<i8>, f32) {
    let absmax = x.iter().map(|v| v.abs()).fold(0.0, f32::max);
    let q = x
        .iter()
        .map(|&v| {
            if absmax > 0.0 && absmax.is_finite() {
                (v * (127.0 / absmax)).round_ties_even().clamp(-127.0, 127.0) as i8
            } else {
                0
            }
        })
        .collect();
    (q, absmax / 127.0)
}

/// `out[M,N] = (xq[M,K] · q[K,N]) · (sx[M] · scales[N]) + bias[N]`: int8
/// weights with a scale per column, each row of x quantised to int8 with its
/// own scale ([`quantize_row_int8`]), the products summed exactly, then
/// scaled in f32 (a multiply, a multiply, an add, as the kernels do).
#[allow(clippy::too_many_arguments)]
pub fn linear_int8(
    out: &mut [f32],
    x: &[f32],
    q: &[i8],
    scales: &[f32],
    bias: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
    for r in 0..m {
        let (xq, sx) = quantize_row_int8(&x[r * k..(r + 1) * k]);
        for j in 0..n {
            let s: i64 = (0..k).map(|kk| xq[kk] as i64 * q[kk * n + j] as i64).sum();
            out[r * n + j] = s as i32 as f32 * (sx * scales[j]) + bias[j];
        }
    }
}

/// `out[M,N] = x[M,K] · w[N,K]ᵀ`.
pub fn matmul_bt(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    for r in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for kk in 0..k {
                s += x[r * k + kk] as f64 * w[j * k + kk] as f64;
            }
            out[r * n + j] = s as f32;
        }
    }
}

/// Row-wise layer norm of `x[M,C]`.
pub fn layernorm(out: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let c = gamma.len();
    for (o, xr) in out.chunks_mut(c).zip(x.chunks(c)) {
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
        for i in 0..c {
            let norm = (xr[i] as f64 - mean) / (var + eps as f64).sqrt();
            o[i] = (norm * gamma[i] as f64 + beta[i] as f64) as f32;
        }
    }
}

/// tanh-approximated GELU.
pub fn gelu(x: &mut [f32]) {
    for v in x.iter_mut() {
        let u = *v as f64;
        let inner = (2.0 / std::f64::consts::PI).sqrt() * (u + 0.044715 * u * u * u);
        *v = (0.5 * u * (1.0 + inner.tanh())) as f32;
    }
}

/// Softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let exps: Vec<f64> = x.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    for (v, e) in x.iter_mut().zip(exps) {
        *v = (e / sum) as f32;
    }
}

/// One head's attention over `t` positions, cache rows every `stride` floats.
#[allow(clippy::too_many_arguments)]
pub fn attention_head(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], t: usize, stride: usize, scale: f32) {
    let hd = q.len();
    let mut p: Vec<f32> = (0..t)
        .map(|i| {
            let s: f64 = (0..hd).map(|d| q[d] as f64 * k[i * stride + d] as f64).sum();
            (s * scale as f64) as f32
        })
        .collect();
    softmax(&mut p);
    for d in 0..hd {
        out[d] = (0..t)
            .map(|i| p[i] as f64 * v[i * stride + d] as f64)
            .sum::<f64>() as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::values;

    /// `|a - b| <= atol + rtol * |b|` everywhere; the message names the worst index.
    #[track_caller]
    fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths differ");
        let (mut worst, mut worst_i) = (0f32, 0);
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            let excess = (a - b).abs() - (atol + rtol * b.abs());
            if excess > worst || a.is_nan() {
                (worst, worst_i) = (excess.max(f32::MIN_POSITIVE), i);
            }
        }
        assert!(
            worst <= 0.0,
            "{what}: index {worst_i}: got {} want {} (tolerance {atol} + {rtol}*|want|)",
            got[worst_i],
            want[worst_i]
        );
    }

    const ROWS: [usize; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33];

    /// The tests here run on every kernel set this CPU supports; this one
    /// says which were left out, and fails if `GPT2_REQUIRE_KERNELS` (a
    /// comma-separated list, as `kernels/run_avx512_check.sh` sets it) names
    /// one that this CPU cannot run, so a check meant for AVX-512 cannot pass
    /// without running it.
    #[test]
    fn every_kernel_set_is_tested_or_named_as_not() {
        let supported = crate::KernelSet::supported();
        assert!(supported.contains(&crate::KernelSet::Portable));
        for set in crate::KernelSet::ALL {
            if !supported.contains(&set) {
                eprintln!(
                    "NOTICE: kernel set {set} NOT TESTED: this CPU lacks {}",
                    set.missing_features().join(", ")
                );
            }
        }
        if let Ok(required) = std::env::var("GPT2_REQUIRE_KERNELS") {
            for name in required.split(',').filter(|s| !s.trim().is_empty()) {
                let set: crate::KernelSet = name
                    .parse()
                    .unwrap_or_else(|e| panic!("GPT2_REQUIRE_KERNELS: {e}"));
                assert!(
                    supported.contains(&set),
                    "GPT2_REQUIRE_KERNELS names {set}, which this CPU cannot run: {}",
                    crate::Kernels::new(set).unwrap_err()
                );
            }
        }
    }

    #[test]
    fn linear_matches_naive_on_odd_shapes() {
        for ks in crate::Kernels::supported() {
            for &m in &ROWS {
                for &(k, n) in &[
                    (1, 1),
                    (7, 3),
                    (64, 32),
                    (65, 33),
                    (33, 100),
                    (96, 257),
                    (200, 70),
                    (301, 129),
                ] {
                    let (x, w, b) = (values(m * k, 1), values(k * n, 2), values(n, 3));
                    let (mut got, mut want) = (vec![f32::NAN; m * n], vec![0.0; m * n]);
                    ks.linear(&mut got, &x, &w, &b, m, k, n);
                    linear(&mut want, &x, &w, &b, m, k, n);
                    assert_close(
                        &format!("{ks}: linear m={m} k={k} n={n}"),
                        &got,
                        &want,
                        1e-5,
                        1e-5,
                    );
                }
            }
        }
    }

    /// The packed layout changes where the weights are read from, never the
    /// order of the sums: its results equal the stored layout's bit for bit
    /// (so also the naive twin's, within the tolerance above).
    #[test]
    fn linear_packed_equals_linear_exactly() {
        for ks in crate::Kernels::supported() {
            let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            for &m in &ROWS {
                for &(k, n) in &[
                    (1, 1),
                    (7, 3),
                    (65, 33),
                    (33, 100),
                    (200, 70),
                    (301, 129),
                    (768, 96),
                    // Several whole panels per task, odd and even counts, and a
                    // partial one: one row reads two panels at a time.
                    (24, 336),
                    (40, 500),
                ] {
                    let (x, w, b) = (values(m * k, 13), values(k * n, 14), values(n, 15));
                    let mut packed = vec![f32::NAN; crate::packed_len(k, n)];
                    crate::pack_panels(&mut packed, &w, k, n);
                    let (mut got, mut want) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                    ks.linear(&mut want, &x, &w, &b, m, k, n);
                    ks.linear_packed(&mut got, &x, &packed, Some(&b), m, k, n);
                    assert_eq!(got, want, "{ks}: linear_packed m={m} k={k} n={n}");
                    three.install(|| ks.linear_packed(&mut got, &x, &packed, Some(&b), m, k, n));
                    assert_eq!(got, want, "{ks}: linear_packed m={m} k={k} n={n} on 3 threads");
                    one.install(|| ks.linear_packed(&mut got, &x, &packed, Some(&b), m, k, n));
                    assert_eq!(got, want, "{ks}: linear_packed m={m} k={k} n={n} on 1 thread");
                }
            }
        }
    }

    #[test]
    fn pack_panels_t_packs_the_transpose() {
        for &(k, n) in &[(1, 1), (3, 50), (65, 97)] {
            let w = values(k * n, 17);
            let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect(); // [N, K]
            let (mut a, mut b) = (
                vec![f32::NAN; crate::packed_len(k, n)],
                vec![1.0; crate::packed_len(k, n)],
            );
            crate::pack_panels(&mut a, &w, k, n);
            crate::pack_panels_t(&mut b, &wt, k, n);
            assert_eq!(a, b, "k={k} n={n}");
            for j in 0..n {
                let mut row = vec![f32::NAN; k];
                crate::unpack_column(&mut row, &b, k, j);
                assert_eq!(row, wt[j * k..(j + 1) * k], "row {j} of wt");
            }
        }
    }

    #[test]
    fn pack_panels_places_every_weight_and_pads_with_zeros() {
        let (k, n) = (3, 50); // two panels, the second 2 columns wide
        let w = values(k * n, 16);
        let mut packed = vec![f32::NAN; crate::packed_len(k, n)];
        crate::pack_panels(&mut packed, &w, k, n);
        assert_eq!(packed.len(), 2 * k * crate::PANEL);
        for kk in 0..k {
            for j in 0..2 * crate::PANEL {
                let at = (j / crate::PANEL * k + kk) * crate::PANEL + j % crate::PANEL;
                let want = if j < n { w[kk * n + j] } else { 0.0 };
                assert_eq!(packed[at], want, "k={kk} j={j}");
            }
        }
    }

    #[test]
    fn matmul_bt_matches_naive_on_odd_shapes() {
        for ks in crate::Kernels::supported() {
            for &m in &ROWS {
                for &(k, n) in &[(1, 1), (7, 3), (64, 32), (65, 33), (33, 100), (96, 257)] {
                    let (x, w) = (values(m * k, 4), values(n * k, 5));
                    let (mut got, mut want) = (vec![f32::NAN; m * n], vec![0.0; m * n]);
                    ks.matmul_bt(&mut got, &x, &w, m, k, n);
                    matmul_bt(&mut want, &x, &w, m, k, n);
                    assert_close(
                        &format!("{ks}: matmul_bt m={m} k={k} n={n}"),
                        &got,
                        &want,
                        1e-5,
                        1e-5,
                    );
                }
            }
        }
    }

    /// Each row's result is bit-for-bit the same whatever else is in the
    /// batch and whatever the pool size: what makes batched generation
    /// reproduce single-request generation exactly.
    #[test]
    fn results_do_not_depend_on_batch_or_threads() {
        for ks in crate::Kernels::supported() {
            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
            for &(k, n) in &[(65, 33), (301, 129), (768, 200)] {
                let m = 40;
                let (x, w, b) = (values(m * k, 9), values(k * n, 10), values(n, 11));
                let mut all = vec![0.0; m * n];
                ks.linear(&mut all, &x, &w, &b, m, k, n);
                let mut all_bt = vec![0.0; m * n];
                let wt = values(n * k, 12);
                ks.matmul_bt(&mut all_bt, &x, &wt, m, k, n);
                for (rows, pool) in [(1, &one), (2, &three), (7, &one), (17, &three)] {
                    for r0 in (0..m - rows).step_by(11) {
                        let xs = &x[r0 * k..(r0 + rows) * k];
                        let mut got = vec![0.0; rows * n];
                        pool.install(|| ks.linear(&mut got, xs, &w, &b, rows, k, n));
                        assert_eq!(
                            got,
                            all[r0 * n..(r0 + rows) * n],
                            "{ks}: linear k={k} n={n} rows {r0}+{rows}"
                        );
                        pool.install(|| ks.matmul_bt(&mut got, xs, &wt, rows, k, n));
                        assert_eq!(
                            got,
                            all_bt[r0 * n..(r0 + rows) * n],
                            "{ks}: matmul_bt k={k} n={n} rows {r0}+{rows}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn linear_runs_inside_a_one_thread_pool() {
        for ks in crate::Kernels::supported() {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let (m, k, n) = (20, 65, 70);
            let (x, w, b) = (values(m * k, 6), values(k * n, 7), values(n, 8));
            let (mut got, mut want) = (vec![0.0; m * n], vec![0.0; m * n]);
            pool.install(|| ks.linear(&mut got, &x, &w, &b, m, k, n));
            linear(&mut want, &x, &w, &b, m, k, n);
            assert_close(
                &format!("{ks}: linear in a 1-thread pool"),
                &got,
                &want,
                1e-5,
                1e-5,
            );
        }
    }

    #[test]
    fn layernorm_matches_naive() {
        for ks in crate::Kernels::supported() {
            // Up to the lane width and past it, with a tail; 40 x 768 runs the rows in parallel.
            for &(m, c) in &[(1, 1), (3, 7), (5, 64), (2, 769), (1, 16), (4, 33), (40, 768)] {
                let x: Vec<f32> = values(m * c, 9).iter().map(|v| v * 3.0 + 0.5).collect();
                let (g, b) = (values(c, 10), values(c, 11));
                let (mut got, mut want) = (vec![0.0; m * c], vec![0.0; m * c]);
                ks.layernorm(&mut got, &x, &g, &b, 1e-5);
                layernorm(&mut want, &x, &g, &b, 1e-5);
                assert_close(&format!("{ks}: layernorm m={m} c={c}"), &got, &want, 1e-5, 1e-5);
            }
        }
    }

    #[test]
    fn gelu_matches_naive_small_and_parallel() {
        for ks in crate::Kernels::supported() {
            for n in [1, 31, 100_003] {
                // Beyond +-10 too, where tanh saturates.
                let x: Vec<f32> = values(n, 12).iter().map(|v| v * 24.0).collect();
                let (mut got, mut want) = (x.clone(), x);
                ks.gelu_inplace(&mut got);
                gelu(&mut want);
                assert_close(&format!("{ks}: gelu n={n}"), &got, &want, 1e-6, 1e-5);
            }
        }
    }

    #[test]
    fn softmax_matches_naive_and_survives_large_inputs() {
        for ks in crate::Kernels::supported() {
            for n in [1, 5, 1000] {
                let x: Vec<f32> = values(n, 13).iter().map(|v| v * 80.0).collect();
                let (mut got, mut want) = (x.clone(), x);
                ks.softmax_inplace(&mut got);
                softmax(&mut want);
                assert_close(&format!("{ks}: softmax n={n}"), &got, &want, 1e-6, 1e-5);
                assert!((got.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn attention_head_matches_naive() {
        for ks in crate::Kernels::supported() {
            for &(t, hd, stride) in &[(1, 1, 1), (3, 8, 24), (17, 64, 768), (100, 12, 36)] {
                let q = values(hd, 14);
                let (k, v) = (values(t * stride, 15), values(t * stride, 16));
                let (mut got, mut want) = (vec![0.0; hd], vec![0.0; hd]);
                let mut scores = vec![0.0; t + 3];
                let scale = 1.0 / (hd as f32).sqrt();
                ks.attention_head(&mut got, &q, &k, &v, t, stride, &mut scores, scale);
                attention_head(&mut want, &q, &k, &v, t, stride, scale);
                assert_close(&format!("{ks}: attention t={t} hd={hd}"), &got, &want, 1e-6, 1e-5);
            }
        }
    }

    #[test]
    fn add_assign_adds() {
        for ks in crate::Kernels::supported() {
            let mut a = vec![1.0, 2.0, 3.0];
            ks.add_assign(&mut a, &[0.5, -2.0, 1.0]);
            assert_eq!(a, vec![1.5, 0.0, 4.0], "{ks}");
        }
    }

    /// `w[K, N]` packed in `dtype`, in a buffer of u32 (4-byte aligned).
    fn packed(dtype: crate::Dtype, w: &[f32], k: usize, n: usize) -> Vec<u32> {
        let mut buf = vec![u32::MAX; crate::packed_bytes(dtype, k, n) / 4];
        let dst = crate::PanelsMut::from_bytes(dtype, bytemuck::cast_slice_mut(&mut buf), k, n);
        crate::pack(dst, w, k, n);
        buf
    }

    fn panels(dtype: crate::Dtype, buf: &[u32], k: usize, n: usize) -> crate::Panels<'_> {
        crate::Panels::from_bytes(dtype, bytemuck::cast_slice(buf), k, n)
    }

    /// The stored `[K, N]` layout of packed int8 panels: `(q, scales)`.
    fn unpack_int8(p: crate::Panels, k: usize, n: usize) -> (Vec<i8>, Vec<f32>) {
        let crate::Panels::Int8 { q, scales } = p else {
            panic!("not int8")
        };
        let mut out = vec![0i8; k * n];
        let k4 = k.next_multiple_of(4);
        for kk in 0..k {
            for j in 0..n {
                // Four rows of a column side by side, 48 columns a group.
                let (p, c) = (j / crate::PANEL, j % crate::PANEL);
                out[kk * n + j] = q[p * k4 * crate::PANEL + (kk / 4 * crate::PANEL + c) * 4 + kk % 4];
            }
        }
        (out, scales[..n].to_vec())
    }

    /// Round to nearest even, not truncation; NaN kept; overflow to infinity.
    #[test]
    fn bf16_rounds_to_nearest_even() {
        let bits = |v: f32| crate::matmul::to_bf16(v).to_bits();
        assert_eq!(bits(f32::from_bits(0x3f80_8000)), 0x3f80, "a tie to even (down)");
        assert_eq!(bits(f32::from_bits(0x3f81_8000)), 0x3f82, "a tie to even (up)");
        assert_eq!(
            bits(f32::from_bits(0x3f80_c000)),
            0x3f81,
            "above half rounds up, not truncates"
        );
        assert_eq!(
            bits(f32::from_bits(0xbf80_7fff)),
            0xbf80,
            "below half rounds down"
        );
        assert!(crate::matmul::to_bf16(f32::NAN).to_f32().is_nan());
        assert_eq!(crate::matmul::to_bf16(f32::MAX).to_f32(), f32::INFINITY);
        let mut xs = values(20_000, 40);
        for (i, v) in xs.iter_mut().enumerate() {
            *v *= 10f32.powi(i as i32 % 60 - 30);
        }
        for v in xs {
            assert_eq!((bits(v) as u32) << 16, round_bf16(v).to_bits(), "{v:e}");
        }
    }

    /// Each column's largest magnitude maps to ±127, every value to its
    /// nearest step: a scale off by two, or rounding by truncation, fails.
    #[test]
    fn int8_quantiser_uses_the_full_range_and_rounds_to_nearest() {
        let (k, n) = (301, 129);
        let mut w = values(k * n, 41);
        for (i, v) in w.iter_mut().enumerate() {
            *v *= 10f32.powi((i % n) as i32 % 5 - 2); // columns of different magnitude
        }
        for kk in 0..k {
            w[kk * n + 7] = 0.0; // an all-zero column
        }
        let buf = packed(crate::Dtype::Int8, &w, k, n);
        let (q, scales) = unpack_int8(panels(crate::Dtype::Int8, &buf, k, n), k, n);
        assert_eq!(
            (q.clone(), scales.clone()),
            quantize_int8(&w, k, n),
            "the naive twin"
        );
        for j in 0..n {
            let col = |kk: usize| (w[kk * n + j], q[kk * n + j]);
            let max_q = (0..k).map(|kk| col(kk).1.unsigned_abs()).max().unwrap();
            if j == 7 {
                assert_eq!((scales[j], max_q), (0.0, 0), "zero column");
                continue;
            }
            assert_eq!(max_q, 127, "column {j}: the largest weight maps to 127");
            let absmax = (0..k).map(|kk| col(kk).0.abs()).fold(0.0, f32::max);
            assert_eq!(scales[j], absmax / 127.0, "column {j}: scale");
            for kk in 0..k {
                let (v, qv) = col(kk);
                let err = (qv as f32 * scales[j] - v).abs();
                assert!(
                    err <= 0.5 * scales[j] * (1.0 + 1e-5),
                    "w[{kk},{j}] = {v}: q {qv}, error {err}"
                );
            }
        }
    }

    #[test]
    fn a_non_finite_weight_survives_conversion_where_the_check_sees_it() {
        let (k, n) = (5, 50);
        for (at, bad) in [(3 * n + 49, f32::NAN), (n + 2, f32::INFINITY), (0, f32::MAX)] {
            let mut w = values(k * n, 42);
            w[at] = bad;
            // f32::MAX is finite, but past bf16's range.
            let dtypes: &[_] = match bad == f32::MAX {
                true => &[crate::Dtype::Bf16],
                false => &[crate::Dtype::Bf16, crate::Dtype::Int8],
            };
            for &dtype in dtypes {
                let buf = packed(dtype, &w, k, n);
                let p = panels(dtype, &buf, k, n);
                assert!(p.any_non_finite(), "{dtype} with {bad} at {at}");
                let mut col = vec![0.0; k];
                p.unpack_column(&mut col, k, at % n);
                assert!(col.iter().any(|v| !v.is_finite()), "{dtype}: column {}", at % n);
            }
        }
    }

    #[test]
    fn linear_panels_match_their_naive_twins_on_odd_shapes() {
        for ks in crate::Kernels::variants() {
            for &m in &ROWS {
                for &(k, n) in &[
                    (1, 1),
                    (7, 3),
                    (65, 33),
                    (33, 100),
                    (96, 257),
                    (301, 129),
                    (24, 336),
                ] {
                    let (x, w, b) = (values(m * k, 43), values(k * n, 44), values(n, 45));
                    let mut want = vec![0.0; m * n];
                    let mut got = vec![f32::NAN; m * n];
                    let what = |d: &str| format!("{ks}: {d} m={m} k={k} n={n}");

                    let buf = packed(crate::Dtype::Bf16, &w, k, n);
                    let bits: Vec<u16> = w.iter().map(|&v| crate::matmul::to_bf16(v).to_bits()).collect();
                    linear_bf16(&mut want, &x, &bits, &b, m, k, n);
                    ks.linear_panels(
                        &mut got,
                        &x,
                        panels(crate::Dtype::Bf16, &buf, k, n),
                        Some(&b),
                        m,
                        k,
                        n,
                    );
                    assert_close(&what("bf16"), &got, &want, 1e-5, 1e-5);

                    // Integer sums are exact: the same bits as the twin.
                    let buf = packed(crate::Dtype::Int8, &w, k, n);
                    let p = panels(crate::Dtype::Int8, &buf, k, n);
                    let (q, scales) = unpack_int8(p, k, n);
                    linear_int8(&mut want, &x, &q, &scales, &b, m, k, n);
                    ks.linear_panels(&mut got, &x, p, Some(&b), m, k, n);
                    assert_eq!(got, want, "{}", what("int8"));
                    ks.linear_panels(&mut got, &x, p, None, m, k, n);
                    linear_int8(&mut want, &x, &q, &scales, &vec![0.0; n], m, k, n);
                    assert_eq!(got, want, "{}", what("int8 without bias"));
                }
            }
        }
    }

    /// The contract of `linear_packed`, in every format: a row's result is
    /// the same bits whatever else is in the batch and whatever the pool.
    #[test]
    fn every_dtype_s_results_do_not_depend_on_batch_or_threads() {
        for ks in crate::Kernels::variants() {
            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
            for dtype in crate::Dtype::ALL {
                for &(k, n) in &[(65, 33), (301, 129), (768, 200)] {
                    let m = 40;
                    let (x, w, b) = (values(m * k, 46), values(k * n, 47), values(n, 48));
                    let buf = packed(dtype, &w, k, n);
                    let p = panels(dtype, &buf, k, n);
                    let mut all = vec![0.0; m * n];
                    ks.linear_panels(&mut all, &x, p, Some(&b), m, k, n);
                    for rows in [1, 2, 3, 4, 5, 7, 8, 9, 17, 33] {
                        for (r0, pool) in [(0, &one), (m - rows, &three), ((m - rows) / 2, &one)] {
                            let mut got = vec![0.0; rows * n];
                            let xs = &x[r0 * k..(r0 + rows) * k];
                            pool.install(|| ks.linear_panels(&mut got, xs, p, Some(&b), rows, k, n));
                            assert_eq!(
                                got,
                                all[r0 * n..(r0 + rows) * n],
                                "{ks}: {dtype} k={k} n={n} rows {r0}+{rows}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The int8 products are exact integer sums: every kernel set, with VNNI
    /// and without, computes the same bits, at K that fill four-row groups
    /// or not, with rows of zeros, one huge value, and x at ±127 steps that
    /// would saturate a careless 16-bit sum.
    #[test]
    fn int8_is_the_same_bits_on_every_kernel_set() {
        let variants = crate::Kernels::variants();
        eprintln!(
            "int8 compared on {}",
            variants
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 50),
            (9, 31, 97),
            (17, 768, 96),
            (5, 3072, 48),
            (33, 130, 145),
            // Quantised in parallel.
            (24, 3072, 50),
            // Whole panels in four and two streams, and some left over.
            (1, 64, 980),
            (2, 64, 980),
        ] {
            let mut x = values(m * k, 52);
            x[..k].fill(0.0); // a row of zeros
            if m > 1 {
                x[k] = 1e6; // one value that dwarfs its row
            }
            if m > 2 {
                for (i, v) in x[2 * k..3 * k].iter_mut().enumerate() {
                    *v = if i % 2 == 0 { 1.0 } else { -1.0 }; // every q at ±127
                }
            }
            let mut w = values(k * n, 53);
            for v in w.iter_mut().step_by(3) {
                *v = v.signum(); // weights at ±127 too
            }
            let buf = packed(crate::Dtype::Int8, &w, k, n);
            let p = panels(crate::Dtype::Int8, &buf, k, n);
            let (q, scales) = unpack_int8(p, k, n);
            let b = values(n, 54);
            let mut want = vec![0.0; m * n];
            linear_int8(&mut want, &x, &q, &scales, &b, m, k, n);
            for ks in &variants {
                let mut got = vec![f32::NAN; m * n];
                ks.linear_panels(&mut got, &x, p, Some(&b), m, k, n);
                assert_eq!(got, want, "{ks}: m={m} k={k} n={n}");
            }
        }
    }

    /// A row's quantisation is the naive twin's, and a NaN or infinity in a
    /// row makes that row's outputs NaN, never finite garbage; the other
    /// rows are untouched.
    #[test]
    fn int8_activations_quantise_per_row_and_carry_non_finite_values() {
        let (m, k) = (4, 67);
        let mut x = values(m * k, 55);
        x[k + 3] = f32::NAN;
        x[2 * k + 9] = f32::INFINITY;
        for ks in crate::Kernels::variants() {
            let mut q = vec![1; m * 68];
            let (mut sx, mut sums) = (vec![0.0; m], vec![0; m]);
            ks.quantize_rows(&mut q, &mut sx, &mut sums, &x, m, k);
            for r in [0, 3] {
                let (want_q, want_s) = quantize_row_int8(&x[r * k..(r + 1) * k]);
                assert_eq!(&q[r * 68..r * 68 + k], &want_q[..], "{ks}: row {r}");
                assert_eq!(&q[r * 68 + k..(r + 1) * 68], &[0i8], "{ks}: row {r}: the padding");
                assert_eq!(sx[r], want_s, "{ks}: row {r}");
                assert_eq!(
                    sums[r],
                    want_q.iter().map(|&v| v as i32).sum::<i32>(),
                    "{ks}: row {r}"
                );
                assert!(
                    want_q.iter().any(|&v| v.unsigned_abs() == 127),
                    "row {r} uses the full range"
                );
            }
            assert!(sx[1].is_nan() && sx[2].is_infinite(), "{ks}: {sx:?}");
        }
        let (k, n) = (k, 50);
        let w = values(k * n, 56);
        let buf = packed(crate::Dtype::Int8, &w, k, n);
        for ks in crate::Kernels::variants() {
            let mut out = vec![0.0; m * n];
            ks.linear_panels(
                &mut out,
                &x,
                panels(crate::Dtype::Int8, &buf, k, n),
                None,
                m,
                k,
                n,
            );
            for r in 0..m {
                let row = &out[r * n..(r + 1) * n];
                match r {
                    1 | 2 => assert!(row.iter().all(|v| v.is_nan()), "{ks}: row {r}"),
                    _ => assert!(row.iter().all(|v| v.is_finite()), "{ks}: row {r}"),
                }
            }
        }
    }

    /// The LM head is packed from `wte`, a slab of whole panels at a time: the
    /// same bytes as packing its transpose in one call.
    #[test]
    fn pack_t_in_slabs_packs_the_transpose() {
        for dtype in crate::Dtype::ALL {
            for &(k, n, slab) in &[(1, 1, 48), (3, 50, 48), (65, 197, 96), (16, 480, 480)] {
                let w = values(k * n, 49);
                let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect(); // [N, K]
                let want = packed(dtype, &w, k, n);
                let mut got = vec![7u32; crate::packed_bytes(dtype, k, n) / 4];
                for from in (0..n).step_by(slab) {
                    let to = (from + slab).min(n);
                    let dst = crate::PanelsMut::from_bytes(dtype, bytemuck::cast_slice_mut(&mut got), k, n);
                    crate::pack_t(dst, &wt[from * k..to * k], k, n, from..to);
                }
                assert_eq!(got, want, "{dtype} k={k} n={n} in slabs of {slab}");
                let p = panels(dtype, &got, k, n);
                let mut row = vec![f32::NAN; k];
                for j in [0, n / 2, n - 1] {
                    p.unpack_column(&mut row, k, j);
                    let exact: Vec<f32> = match dtype {
                        crate::Dtype::F32 => wt[j * k..(j + 1) * k].to_vec(),
                        crate::Dtype::Bf16 => wt[j * k..(j + 1) * k].iter().map(|&v| round_bf16(v)).collect(),
                        crate::Dtype::Int8 => {
                            let (q, s) = unpack_int8(p, k, n);
                            (0..k).map(|kk| q[kk * n + j] as f32 * s[j]).collect()
                        }
                    };
                    assert_eq!(row, exact, "{dtype}: row {j} of wt");
                }
            }
        }
    }
}
