//! Softmax and causal self-attention of one query over a KV cache.

use half::bf16;

use crate::arch::{Isa, Kernel, Vector, Weight, Widen, LINE, MIN_LANES};
use crate::matmul::to_bf16;
use crate::{active, Dtype, Kernels};

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
/// does not depend on how the keys were grouped. A key is `hd` values of `E`
/// in [`Weight::slot`] order (f32: as is; bf16: [`kv_row_bf16`]'s layout),
/// widened exactly, so bf16 keys give the scores of their f32 values.
#[inline(always)]
fn dots<I: Isa, E: Widen, const J: usize>(q: &[f32], ks: [&[E]; J]) -> [f32; J] {
    let hd = q.len();
    let h8 = hd / I::V::LANES * I::V::LANES;
    for kj in &ks {
        assert!(kj.len() >= row_len::<E>(hd), "dots: key shorter than the query");
    }
    let mut ptrs = [ks[0].as_ptr(); J];
    for (p, kj) in ptrs.iter_mut().zip(&ks) {
        *p = kj.as_ptr();
    }
    // SAFETY: the query holds `hd >= h8` floats and every key a whole row
    // (asserted above): every group that holds a column below h8; the CPU
    // has I (the kernel's entry point).
    let mut out = unsafe { dot_lanes::<I, E, J>(q.as_ptr(), ptrs, h8) };
    for (o, kj) in out.iter_mut().zip(&ks) {
        for d in h8..hd {
            *o = I::fmadd(q[d], kj[E::slot(d)].to_f32(), *o);
        }
    }
    out
}

/// Elements of `E` one cached position of `hd` channels takes: `hd` for
/// f32, whole groups of 16 for bf16 (zero past `hd`), so that every vector
/// load widens inside the row.
#[inline(always)]
fn row_len<E: Weight>(hd: usize) -> usize {
    match E::DTYPE {
        Dtype::Bf16 => hd.next_multiple_of(E::GROUP),
        _ => hd,
    }
}

/// `q · k_j` over `0..hl` for `J` keys (`hl` a multiple of the lanes L):
/// per key, L lanes accumulated over d in steps of L, then summed by halves
/// ([`Vector::sum`]).
///
/// # Safety
/// The CPU has `I`; `q` valid for `hl` floats, every key for the groups of
/// `E` that hold its first `hl` columns.
#[inline(always)]
unsafe fn dot_lanes<I: Isa, E: Widen, const J: usize>(
    q: *const f32,
    ks: [*const E; J],
    hl: usize,
) -> [f32; J] {
    let l = I::V::LANES;
    // SAFETY (whole body): every offset is below hl (the contract above).
    unsafe {
        let mut acc = [I::V::zero(); J];
        let mut d = 0;
        while d < hl {
            let qd = I::V::load(q.add(d));
            for (a, k) in acc.iter_mut().zip(&ks) {
                *a = I::V::mul_add(qd, I::widen::<E>(*k, d / l), *a);
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

/// [`attention_head`] over a bf16 cache: `k` and `v` hold one position every
/// `stride` values (at least [`bf16_row_len`]`(hd)`), each written by
/// [`kv_row_bf16`]. The result is bit for bit [`attention_head`]'s over the
/// same keys and values widened to f32 (widening is exact and the sums run
/// in the same order); only the bytes read are halved. On the [`active`]
/// kernel set.
#[allow(clippy::too_many_arguments)]
pub fn attention_head_bf16(
    out: &mut [f32],
    q: &[f32],
    k: &[u16],
    v: &[u16],
    t: usize,
    stride: usize,
    scores: &mut [f32],
    scale: f32,
) {
    active().attention_head_bf16(out, q, k, v, t, stride, scores, scale)
}

/// Values of a bf16 cache row for `hd` channels: `hd` rounded up to whole
/// groups of 16 (the padding is zero and never read as a channel).
pub fn bf16_row_len(hd: usize) -> usize {
    row_len::<bf16>(hd)
}

/// Writes `src` (one position's `hd` keys or values of one head) as a bf16
/// cache row: each value rounded to nearest even ([`to_bf16`]), stored at
/// its [`Weight::slot`] in its group of 16 (the packed bf16 weights' layout,
/// so one load widens in lane order on every set), zeros past `hd`.
/// `dst.len()` must be [`bf16_row_len`]`(src.len())`.
pub fn kv_row_bf16(dst: &mut [u16], src: &[f32]) {
    assert_eq!(
        dst.len(),
        bf16_row_len(src.len()),
        "kv_row_bf16: dst is not one row"
    );
    dst.fill(0);
    for (c, &x) in src.iter().enumerate() {
        dst[bf16::slot(c)] = to_bf16(x).to_bits();
    }
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
        let head = Head::checked(out, q, k, v, t, stride, scores, scale);
        // SAFETY: Head reads and writes only through its slices (their
        // lengths checked by `checked`).
        unsafe { self.run(head) }
    }

    /// [`attention_head_bf16`] on this kernel set.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_head_bf16(
        self,
        out: &mut [f32],
        q: &[f32],
        k: &[u16],
        v: &[u16],
        t: usize,
        stride: usize,
        scores: &mut [f32],
        scale: f32,
    ) {
        let (k, v): (&[bf16], &[bf16]) = (bytemuck::cast_slice(k), bytemuck::cast_slice(v));
        let head = Head::checked(out, q, k, v, t, stride, scores, scale);
        // SAFETY: as in `attention_head`.
        unsafe { self.run(head) }
    }
}

/// [`attention_head`]'s body, its lengths checked, over keys and values
/// stored as `E`.
struct Head<'a, E> {
    out: &'a mut [f32],
    q: &'a [f32],
    k: &'a [E],
    v: &'a [E],
    stride: usize,
    /// `t` of them.
    scores: &'a mut [f32],
    scale: f32,
}

impl<'a, E: Weight> Head<'a, E> {
    /// The kernel's arguments, each length checked against the others.
    #[allow(clippy::too_many_arguments)]
    fn checked(
        out: &'a mut [f32],
        q: &'a [f32],
        k: &'a [E],
        v: &'a [E],
        t: usize,
        stride: usize,
        scores: &'a mut [f32],
        scale: f32,
    ) -> Self {
        let hd = q.len();
        let row = row_len::<E>(hd);
        assert_eq!(out.len(), hd, "attention_head: out is not [hd={hd}]");
        assert!(t >= 1, "attention_head: no position to attend to");
        assert!(
            stride >= row,
            "attention_head: stride {stride} under a row of {row}"
        );
        let need = (t - 1) * stride + row;
        assert!(
            k.len() >= need && v.len() >= need,
            "attention_head: cache shorter than t={t}"
        );
        assert!(scores.len() >= t, "attention_head: scores shorter than t={t}");
        Head {
            out,
            q,
            k,
            v,
            stride,
            scores: &mut scores[..t],
            scale,
        }
    }
}

/// How far ahead of the keys (and values) being read the kernel asks for
/// lines: 8 positions of 64 f32 channels is 2 KiB, about what one core has
/// in flight. A head's positions are one run of memory, but the hardware
/// prefetchers stop at every 4 KiB page; a long context is then read at
/// the latency of a page's first lines unless we ask ahead.
const PREFETCH_AHEAD: usize = 2048;

impl<E: Widen> Kernel for Head<'_, E> {
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
        let row = row_len::<E>(hd);
        let key = |i: usize| &k[i * stride..i * stride + row];
        let ahead = PREFETCH_AHEAD / std::mem::size_of::<E>();
        // Eight keys at a time: eight independent chains hide the FMA latency.
        let mut i = 0;
        while i + 8 <= t {
            // SAFETY: a prefetch never faults; the address is only formed
            // (wrapping), never dereferenced.
            unsafe { prefetch_run::<I, E>(k.as_ptr().wrapping_add(i * stride + ahead), 8 * stride) };
            let s = dots::<I, E, 8>(
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
            *dst = dots::<I, E, 1>(q, [key(j)])[0] * scale;
        }
        softmax::<I>(scores);
        weighted_sum::<I, E>(out, scores, v, stride);
    }
}

/// Asks for the lines of `len` values of `E` from `p` (a hint; never faults).
///
/// # Safety
/// The CPU has `I`.
#[inline(always)]
unsafe fn prefetch_run<I: Isa, E>(p: *const E, len: usize) {
    let bytes = len * std::mem::size_of::<E>();
    let mut at = 0;
    while at < bytes {
        // SAFETY: prefetch never faults (the trait's contract); the pointer
        // is formed with wrapping arithmetic and never read.
        unsafe { I::V::prefetch(p.cast::<u8>().wrapping_add(at)) };
        at += LINE;
    }
}

/// `out[d] = Σ_i p[i] · v[i·stride + slot(d)]`, summed in order of i from 0.
/// Columns go 64 at a time (eight AVX2 or four AVX-512 registers held
/// across all of `p`), so the sums never leave registers; any remainder one
/// column at a time.
#[inline(always)]
fn weighted_sum<I: Isa, E: Widen>(out: &mut [f32], p: &[f32], v: &[E], stride: usize) {
    const W: usize = 64;
    let hd = out.len();
    let lanes = I::V::LANES;
    let ahead = PREFETCH_AHEAD / std::mem::size_of::<E>();
    let mut d0 = 0;
    while d0 + W <= hd {
        let row_end = (p.len() - 1) * stride + d0 + W;
        assert!(v.len() >= row_end, "weighted_sum: values shorter than p");
        let mut acc = [0f32; W];
        // SAFETY: every row i < p.len() holds the groups of columns
        // d0..d0 + W (asserted above; d0 is a multiple of 64, so of every
        // group); the CPU has I; prefetch never faults.
        unsafe {
            let mut sums = [I::V::zero(); W / MIN_LANES];
            let n = W / lanes;
            for (i, pi) in p.iter().enumerate() {
                let row = v.as_ptr().add(i * stride + d0);
                if i % 8 == 0 {
                    prefetch_run::<I, E>(row.wrapping_add(ahead), 8 * stride);
                }
                let pv = I::V::splat(pi);
                for (j, a) in sums[..n].iter_mut().enumerate() {
                    *a = I::V::mul_add(pv, I::widen::<E>(row, j), *a);
                }
            }
            for (j, a) in sums[..n].iter().enumerate() {
                a.store(acc.as_mut_ptr().add(j * lanes));
            }
        }
        out[d0..d0 + W].copy_from_slice(&acc);
        d0 += W;
    }
    for (d, o) in out.iter_mut().enumerate().skip(d0) {
        *o = p.iter().enumerate().fold(0.0, |a, (i, &pi)| {
            I::fmadd(pi, v[i * stride + E::slot(d)].to_f32(), a)
        });
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
            let eight = dots::<I, f32, 8>(
                q,
                [&ks[0][..], &ks[1], &ks[2], &ks[3], &ks[4], &ks[5], &ks[6], &ks[7]],
            );
            let four = dots::<I, f32, 4>(q, [&ks[4][..], &ks[5], &ks[6], &ks[7]]);
            let alone = ks.iter().map(|k| dots::<I, f32, 1>(q, [&k[..]])[0]).collect();
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
