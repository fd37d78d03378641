//! Softmax and causal self-attention of one query over a KV cache.

use crate::arch::{Isa, Kernel, Vector};
use crate::{active, Kernels};

/// Numerically stable softmax over `x`, in place. On the
/// [`active`] kernel set.
pub fn softmax_inplace(x: &mut [f32]) {
    active().softmax_inplace(x)
}

/// [`softmax_inplace`]'s body.
struct Softmax<'a>(&'a mut [f32]);

impl Kernel for Softmax<'_> {
    type Out = ();

    #[inline(always)]
    unsafe fn run<I: Isa>(self) {
        softmax::<I>(self.0)
    }
}

/// [`softmax_inplace`] on the set `I`.
#[inline(always)]
fn softmax<I: Isa>(x: &mut [f32]) {
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
    for v in x.iter_mut() {
        *v = exp::<I>(*v - max);
    }
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
fn exp<I: Isa>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2E).round();
    let r = I::fmadd(n, -LN2_LO, I::fmadd(n, -LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    p = I::fmadd(p, r, 1.398_199_9e-3);
    p = I::fmadd(p, r, 8.333_452e-3);
    p = I::fmadd(p, r, 4.166_579_6e-2);
    p = I::fmadd(p, r, 1.666_666_5e-1);
    p = I::fmadd(p, r, 5e-1);
    let e = I::fmadd(p, r * r, r) + 1.0;
    // n is in -126..=0 here, so n + 127 is a valid biased exponent.
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `q · k_j` for `J` keys at once. Each dot product is accumulated in the
/// set's L lanes (8 or 16) over `0..hd/L*L`, the lanes summed by halves,
/// then the tail added in order: the same roundings whatever `J`, so a score
/// does not depend on how the keys were grouped.
#[inline(always)]
fn dots<I: Isa, const J: usize>(q: &[f32], ks: [&[f32]; J]) -> [f32; J] {
    let hd = q.len();
    let h8 = hd / I::V::LANES * I::V::LANES;
    for kj in &ks {
        assert!(kj.len() >= hd, "dots: key shorter than the query");
    }
    let mut ptrs = [q.as_ptr(); J];
    for (p, kj) in ptrs.iter_mut().zip(&ks) {
        *p = kj.as_ptr();
    }
    // SAFETY: the query and every key hold at least `hd >= h8` floats
    // (asserted above); the CPU has I (the kernel's entry point).
    let mut out = unsafe { dot_lanes::<I, J>(q.as_ptr(), ptrs, h8) };
    for (o, kj) in out.iter_mut().zip(&ks) {
        for d in h8..hd {
            *o = I::fmadd(q[d], kj[d], *o);
        }
    }
    out
}

/// `q · k_j` over `0..hl` for `J` keys (`hl` a multiple of the lanes L):
/// per key, L lanes accumulated over d in steps of L, then summed by halves
/// ([`Vector::sum`]).
///
/// # Safety
/// The CPU has `I`; `q` and every key valid for `hl` floats.
#[inline(always)]
unsafe fn dot_lanes<I: Isa, const J: usize>(q: *const f32, ks: [*const f32; J], hl: usize) -> [f32; J] {
    let l = I::V::LANES;
    // SAFETY (whole body): every offset is below hl (the contract above).
    unsafe {
        let mut acc = [I::V::zero(); J];
        let mut d = 0;
        while d < hl {
            let qd = I::V::load(q.add(d));
            for (a, k) in acc.iter_mut().zip(&ks) {
                *a = I::V::mul_add(qd, I::V::load(k.add(d)), *a);
            }
            d += l;
        }
        let mut out = [0f32; J];
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = a.sum();
        }
        out
    }
}

/// Attention of one query of one head over the first `t` cached positions:
/// `out[hd] = softmax(q · K[0..t]ᵀ · scale) · V[0..t]`.
///
/// `k` and `v` start at this head's first element of position 0 and hold one
/// position every `stride` floats (`stride = hd` for the engine's cache, which
/// keeps each head's positions contiguous; `C` for heads side by side). The
/// causal mask is implicit: the caller passes `t = pos + 1`, so no later
/// position is read. `scores` is scratch of at least `t` floats. Overwrites
/// `out`. On the [`active`] kernel set.
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
    active().attention_head(out, q, k, v, t, stride, scores, scale)
}

impl Kernels {
    /// [`softmax_inplace`] on this kernel set.
    pub fn softmax_inplace(self, x: &mut [f32]) {
        // SAFETY: Softmax touches only its slice.
        unsafe { self.run(Softmax(x)) }
    }

    /// [`attention_head`] on this kernel set.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_head(
        self,
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
        let head = Head {
            out,
            q,
            k,
            v,
            stride,
            scores: &mut scores[..t],
            scale,
        };
        // SAFETY: Head reads and writes only through its slices (their
        // lengths checked above).
        unsafe { self.run(head) }
    }
}

/// [`attention_head`]'s body, its lengths checked.
struct Head<'a> {
    out: &'a mut [f32],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    stride: usize,
    /// `t` of them.
    scores: &'a mut [f32],
    scale: f32,
}

impl Kernel for Head<'_> {
    type Out = ();

    #[inline(always)]
    unsafe fn run<I: Isa>(self) {
        let Head {
            out,
            q,
            k,
            v,
            stride,
            scores,
            scale,
        } = self;
        let (hd, t) = (q.len(), scores.len());
        let key = |i: usize| &k[i * stride..i * stride + hd];
        // Eight keys at a time: eight independent chains hide the FMA latency.
        let mut i = 0;
        while i + 8 <= t {
            let s = dots::<I, 8>(
                q,
                [
                    key(i),
                    key(i + 1),
                    key(i + 2),
                    key(i + 3),
                    key(i + 4),
                    key(i + 5),
                    key(i + 6),
                    key(i + 7),
                ],
            );
            for (dst, s) in scores[i..i + 8].iter_mut().zip(s) {
                *dst = s * scale;
            }
            i += 8;
        }
        for (j, dst) in scores.iter_mut().enumerate().skip(i) {
            *dst = dots::<I, 1>(q, [key(j)])[0] * scale;
        }
        softmax::<I>(scores);
        weighted_sum::<I>(out, scores, v, stride);
    }
}

/// `out[d] = Σ_i p[i] · v[i·stride + d]`, summed in order of i from 0.
/// Columns go 64 at a time (eight AVX2 or four AVX-512 registers held
/// across all of `p`), so the sums never leave registers; any remainder one
/// column at a time.
#[inline(always)]
fn weighted_sum<I: Isa>(out: &mut [f32], p: &[f32], v: &[f32], stride: usize) {
    const W: usize = 64;
    let hd = out.len();
    let mut d0 = 0;
    while d0 + W <= hd {
        let mut acc = [0f32; W];
        for (i, &pi) in p.iter().enumerate() {
            let vi: &[f32; W] = v[i * stride + d0..][..W].try_into().expect("64 floats");
            for (a, &vv) in acc.iter_mut().zip(vi) {
                *a = I::fmadd(pi, vv, *a);
            }
        }
        out[d0..d0 + W].copy_from_slice(&acc);
        d0 += W;
    }
    for (d, o) in out.iter_mut().enumerate().skip(d0) {
        *o = p
            .iter()
            .enumerate()
            .fold(0.0, |a, (i, &pi)| I::fmadd(pi, v[i * stride + d], a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::values;
    use crate::KernelSet;

    /// `exp` over `xs`, in place, on a given set.
    struct Exps<'a>(&'a mut [f32]);

    impl Kernel for Exps<'_> {
        type Out = ();

        #[inline(always)]
        unsafe fn run<I: Isa>(self) {
            for v in self.0.iter_mut() {
                *v = exp::<I>(*v);
            }
        }
    }

    #[test]
    fn exp_is_close_to_libm_over_softmax_range() {
        for ks in Kernels::supported() {
            let xs: Vec<f32> = (0..=200_000).map(|i| -87.0 * i as f32 / 200_000.0).collect();
            let mut got = xs.clone();
            // SAFETY: Exps touches only its slice.
            unsafe { ks.run(Exps(&mut got)) };
            let mut worst = 0f32;
            for (&x, &g) in xs.iter().zip(&got) {
                worst = worst.max(((g - x.exp()) / x.exp()).abs());
            }
            assert!(worst < 3e-7, "{ks}: worst relative error {worst}");
            let mut edges = [0.0, -1000.0, f32::NEG_INFINITY];
            // SAFETY: as above.
            unsafe { ks.run(Exps(&mut edges)) };
            assert_eq!(edges[0], 1.0, "{ks}");
            assert!(edges[1] < 1e-37 && edges[2] < 1e-37, "{ks}: {edges:?}");
        }
    }

    /// The dots of 8 keys, of the last 4 of them, and of each alone.
    struct GroupedDots<'a> {
        q: &'a [f32],
        ks: &'a [Vec<f32>],
    }

    impl Kernel for GroupedDots<'_> {
        type Out = ([f32; 8], [f32; 4], Vec<f32>);

        #[inline(always)]
        unsafe fn run<I: Isa>(self) -> Self::Out {
            let (q, ks) = (self.q, self.ks);
            let eight = dots::<I, 8>(
                q,
                [&ks[0][..], &ks[1], &ks[2], &ks[3], &ks[4], &ks[5], &ks[6], &ks[7]],
            );
            let four = dots::<I, 4>(q, [&ks[4][..], &ks[5], &ks[6], &ks[7]]);
            let alone = ks.iter().map(|k| dots::<I, 1>(q, [&k[..]])[0]).collect();
            (eight, four, alone)
        }
    }

    #[test]
    fn grouped_and_single_dots_round_alike() {
        // 67 = 64 in lanes (either width) and a tail of 3.
        let q = values(67, 1);
        let ks: Vec<Vec<f32>> = (0..8).map(|j| values(67, 2 + j)).collect();
        for set in Kernels::supported() {
            let fma = |a: f32, b: f32, c: f32| match set.set() {
                KernelSet::Portable => a * b + c,
                _ => a.mul_add(b, c),
            };
            // SAFETY: GroupedDots reads only through its slices.
            let (eight, four, alone) = unsafe { set.run(GroupedDots { q: &q, ks: &ks }) };
            for (j, k) in ks.iter().enumerate() {
                // The order the doc comment promises, written out in scalars:
                // L lanes, summed by halves, then the tail.
                let lanes = set.lanes();
                let mut l = vec![0f32; lanes];
                for d in 0..64 {
                    l[d % lanes] = fma(q[d], k[d], l[d % lanes]);
                }
                while l.len() > 1 {
                    let h = l.len() / 2;
                    l = (0..h).map(|i| l[i] + l[i + h]).collect();
                }
                let mut want = l[0];
                for d in 64..67 {
                    want = fma(q[d], k[d], want);
                }
                assert_eq!(alone[j], want, "{set}: key {j} alone");
                assert_eq!(eight[j], want, "{set}: key {j} of eight");
                if j >= 4 {
                    assert_eq!(four[j - 4], want, "{set}: key {j} of four");
                }
            }
        }
    }
}
