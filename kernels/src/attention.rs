//! Softmax and causal self-attention of one query over a KV cache.

use crate::matmul::dot;

/// Numerically stable softmax over `x`, in place.
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Attention of one query of one head over the first `t` cached positions:
/// `out[hd] = softmax(q · K[0..t]ᵀ · scale) · V[0..t]`.
///
/// `k` and `v` start at this head's first element of position 0 and hold one
/// position every `stride` floats (`stride = hd` for the engine's cache, which
/// keeps each head's positions contiguous; `C` for heads side by side). The causal mask is implicit: the caller passes
/// `t = pos + 1`, so no later position is read. `scores` is scratch of at least
/// `t` floats. Overwrites `out`.
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
    for (i, s) in scores.iter_mut().enumerate() {
        *s = dot(q, &k[i * stride..i * stride + hd]) * scale;
    }
    softmax_inplace(scores);
    out.fill(0.0);
    for (i, &p) in scores.iter().enumerate() {
        for (o, &vv) in out.iter_mut().zip(&v[i * stride..i * stride + hd]) {
            *o += p * vv;
        }
    }
}
