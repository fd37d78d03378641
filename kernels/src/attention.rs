//! Softmax and causal self-attention of one query over a KV cache.

use crate::matmul::fmadd;

/// Numerically stable softmax over `x`, in place.
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Two passes that vectorise: the exponentials, then their sum in 8 lanes.
    x.iter_mut().for_each(|v| *v = exp(*v - max));
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (s, v) in lanes.iter_mut().zip(c) {
            *s += v;
        }
    }
    let inv = 1.0 / (lanes.iter().sum::<f32>() + tail);
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `e^x` for `x <= 0` (softmax's range), branch-free so that a loop over it
/// vectorises: `x = n ln2 + r` with `|r| <= ln2 / 2`, a degree-6 polynomial
/// for `e^r` (Cephes' `expf` coefficients, about 1 ulp), times `2^n` built
/// from the exponent bits. Below -87 (where e^x is under f32's normal range)
/// it returns e^-87, which is 0 for softmax's purposes (a weight of 1.6e-38).
/// The libm call it replaces cost ~20 ns a value: 0.7 ms a decode step at
/// 250 positions of context.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2E).round();
    let r = fmadd(n, -LN2_LO, fmadd(n, -LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    p = fmadd(p, r, 1.398_199_9e-3);
    p = fmadd(p, r, 8.333_452e-3);
    p = fmadd(p, r, 4.166_579_6e-2);
    p = fmadd(p, r, 1.666_666_5e-1);
    p = fmadd(p, r, 5e-1);
    let e = fmadd(p, r * r, r) + 1.0;
    // n is in -126..=0 here, so n + 127 is a valid biased exponent.
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `q · k_j` for `J` keys at once. Each dot product is accumulated in 8 lanes
/// over `0..hd/8*8`, the lanes summed pairwise, then the tail added in order:
/// the same roundings whatever `J`, so a score does not depend on how the
/// keys were grouped.
#[inline(always)]
fn dots<const J: usize>(q: &[f32], ks: [&[f32]; J]) -> [f32; J] {
    let h8 = q.len() / 8 * 8;
    let mut acc = [[0f32; 8]; J];
    for d in (0..h8).step_by(8) {
        let qd: &[f32; 8] = q[d..d + 8].try_into().expect("8 floats");
        for (a, kj) in acc.iter_mut().zip(&ks) {
            let kd: &[f32; 8] = kj[d..d + 8].try_into().expect("8 floats");
            for l in 0..8 {
                a[l] = fmadd(qd[l], kd[l], a[l]);
            }
        }
    }
    let mut out = [0f32; J];
    for ((o, a), kj) in out.iter_mut().zip(&acc).zip(&ks) {
        let p = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
        let mut s = (p[0] + p[2]) + (p[1] + p[3]);
        for d in h8..q.len() {
            s = fmadd(q[d], kj[d], s);
        }
        *o = s;
    }
    out
}

/// Attention of one query of one head over the first `t` cached positions:
/// `out[hd] = softmax(q · K[0..t]ᵀ · scale) · V[0..t]`.
///
/// `k` and `v` start at this head's first element of position 0 and hold one
/// position every `stride` floats (`stride = hd` for the engine's cache, which
/// keeps each head's positions contiguous; `C` for heads side by side). The
/// causal mask is implicit: the caller passes `t = pos + 1`, so no later
/// position is read. `scores` is scratch of at least `t` floats. Overwrites `out`.
#[allow(clippy::too_many_arguments)]
pub fn attention_head(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    stride: usize,
    scores: &mut [f32],
    scale: f32,
) {
    let hd = q.len();
    assert_eq!(out.len(), hd, "attention_head: out is not [hd={hd}]");
    assert!(t >= 1, "attention_head: no position to attend to");
    let need = (t - 1) * stride + hd;
    assert!(
        k.len() >= need && v.len() >= need,
        "attention_head: cache shorter than t={t}"
    );
    assert!(scores.len() >= t, "attention_head: scores shorter than t={t}");
    let scores = &mut scores[..t];
    let key = |i: usize| &k[i * stride..i * stride + hd];
    // Four keys at a time: four independent chains hide the FMA latency.
    let mut i = 0;
    while i + 4 <= t {
        let s = dots(q, [key(i), key(i + 1), key(i + 2), key(i + 3)]);
        for (dst, s) in scores[i..i + 4].iter_mut().zip(s) {
            *dst = s * scale;
        }
        i += 4;
    }
    for (j, dst) in scores.iter_mut().enumerate().skip(i) {
        *dst = dots(q, [key(j)])[0] * scale;
    }
    softmax_inplace(scores);
    out.fill(0.0);
    for (i, &p) in scores.iter().enumerate() {
        for (o, &vv) in out.iter_mut().zip(&v[i * stride..i * stride + hd]) {
            *o = fmadd(p, vv, *o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_libm_over_softmax_range() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn grouped_and_single_dots_round_alike() {
        let q: Vec<f32> = (0..67).map(|i| (i as f32 * 0.37).sin()).collect();
        let ks: Vec<Vec<f32>> = (0..4)
            .map(|j| (0..67).map(|i| ((i * 7 + j) as f32 * 0.11).cos()).collect())
            .collect();
        let four = dots(&q, [&ks[0][..], &ks[1], &ks[2], &ks[3]]);
        for (j, k) in ks.iter().enumerate() {
            assert_eq!(four[j], dots(&q, [&k[..]])[0]);
        }
    }
}
