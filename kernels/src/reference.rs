//! Naive twins of the fast kernels: the definition of each op written as
//! plainly as possible, accumulating in f64. The tests in `kernels/tests/`
//! hold every fast kernel to its twin on odd shapes; `benches/` uses them as
//! a baseline.

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
