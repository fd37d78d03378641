//! Softmax and causal self-attention of one query over a KV cache.

use crate::arch::{self, fmadd};

/// Numerically stable softmax over `x`, in place.
pub fn softmax_inplace(x: &mut [f32]) {
    // The maximum in 8 lanes (a single running max is a chain of dependent
    // compares; the maximum does not depend on the order).
    let mut top = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let max = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for (m, &v) in top.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    let max = top.into_iter().fold(max, f32::max);
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
/// libm's `expf` is a call per value, which no loop vectorises
/// (`docs/hot-path.md` has what it cost).
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
    let hd = q.len();
    let h8 = hd / 8 * 8;
    for kj in &ks {
        assert!(kj.len() >= hd, "dots: key shorter than the query");
    }
    // SAFETY: the query and every key hold at least `hd >= h8` floats
    // (asserted above).
    let mut out = unsafe { arch::dot_lanes::<J>(q.as_ptr(), ks.map(|k| k.as_ptr()), h8) };
    for (o, kj) in out.iter_mut().zip(&ks) {
        for d in h8..hd {
            *o = fmadd(q[d], kj[d], *o);
        }
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
    // Eight keys at a time: eight independent chains hide the FMA latency.
    let mut i = 0;
    while i + 8 <= t {
        let s = dots::<8>(q, std::array::from_fn(|j| key(i + j)));
        for (dst, s) in scores[i..i + 8].iter_mut().zip(s) {
            *dst = s * scale;
        }
        i += 8;
    }
    for (j, dst) in scores.iter_mut().enumerate().skip(i) {
        *dst = dots(q, [key(j)])[0] * scale;
    }
    softmax_inplace(scores);
    weighted_sum(out, scores, v, stride);
}

/// `out[d] = Σ_i p[i] · v[i·stride + d]`, summed in order of i from 0.
/// Columns go 64 at a time (eight AVX2 registers held across all of `p`),
/// so the sums never leave registers; any remainder one column at a time.
fn weighted_sum(out: &mut [f32], p: &[f32], v: &[f32], stride: usize) {
    const W: usize = 64;
    let hd = out.len();
    let mut d0 = 0;
    while d0 + W <= hd {
        let mut acc = [0f32; W];
        for (i, &pi) in p.iter().enumerate() {
            let vi: &[f32; W] = v[i * stride + d0..][..W].try_into().expect("64 floats");
            for (a, &vv) in acc.iter_mut().zip(vi) {
                *a = fmadd(pi, vv, *a);
            }
        }
        out[d0..d0 + W].copy_from_slice(&acc);
        d0 += W;
    }
    for (d, o) in out.iter_mut().enumerate().skip(d0) {
        *o = p
            .iter()
            .enumerate()
            .fold(0.0, |a, (i, &pi)| fmadd(pi, v[i * stride + d], a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::values;

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
        let q = values(67, 1);
        let ks: Vec<Vec<f32>> = (0..8).map(|j| values(67, 2 + j)).collect();
        let eight = dots::<8>(&q, std::array::from_fn(|j| &ks[j][..]));
        let four = dots(&q, [&ks[4][..], &ks[5], &ks[6], &ks[7]]);
        for (j, k) in ks.iter().enumerate() {
            // The order the doc comment promises, written out in scalars.
            let mut lanes = [0f32; 8];
            for d in 0..64 {
                lanes[d % 8] = fmadd(q[d], k[d], lanes[d % 8]);
            }
            let l = lanes;
            let mut want = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
            for d in 64..67 {
                want = fmadd(q[d], k[d], want);
            }
            assert_eq!(dots(&q, [&k[..]])[0], want, "key {j} alone");
            assert_eq!(eight[j], want, "key {j} of eight");
            if j >= 4 {
                assert_eq!(four[j - 4], want, "key {j} of four");
            }
        }
    }
}
