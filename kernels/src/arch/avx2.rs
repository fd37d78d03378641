//! The innermost loops on x86-64 with AVX2 and FMA: eight f32 lanes per
//! register, sixteen registers. Contracts and roundings as in `portable.rs`
//! (see the seam's table in `arch/mod.rs`).

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Weight, LINE};
use crate::matmul::PANEL;

/// A weight format's columns `8v..8v+8` of one row, widened into an f32
/// vector.
pub(crate) trait Lanes: Weight {
    /// # Safety
    /// `row` valid for the whole group of [`Weight::GROUP`] columns that
    /// holds columns `8v..8v+8`, and a group's start.
    unsafe fn vector(row: *const Self, v: usize) -> __m256;
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn vector(row: *const Self, v: usize) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { _mm256_loadu_ps(row.add(8 * v)) }
    }
}

impl Lanes for half::bf16 {
    /// The 32 bytes of the 16-column group, unpacked against zero (low
    /// words for columns 0-7, high for 8-15, [`Weight::slot`]) into the top
    /// halves of the lanes. Both vectors of a group load the same bytes,
    /// which the compiler loads once.
    #[inline(always)]
    unsafe fn vector(row: *const Self, v: usize) -> __m256 {
        // SAFETY: the caller's contract (a group is 32 bytes).
        unsafe {
            let (group, zero) = (
                _mm256_loadu_si256(row.add(16 * (v / 2)).cast()),
                _mm256_setzero_si256(),
            );
            _mm256_castsi256_ps(if v % 2 == 0 {
                _mm256_unpacklo_epi16(zero, group)
            } else {
                _mm256_unpackhi_epi16(zero, group)
            })
        }
    }
}

impl Lanes for i8 {
    /// 8 bytes sign-extended to 32-bit lanes and converted (exactly) to f32.
    #[inline(always)]
    unsafe fn vector(row: *const Self, v: usize) -> __m256 {
        // SAFETY: the caller's contract (8 values are 8 bytes).
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(row.add(8 * v).cast()))) }
    }
}

/// `out[r0..r0+R, j0..j0+W] += x[r0..r0+R, ks] · w[ks, 0..W]`: for each k in
/// `ks`, broadcast `x[r, k]` and multiply-add it with the `W` weights at
/// `w + k·stride` (in any [`Lanes`] format, widened as loaded); `R x W/8`
/// accumulator registers, loaded from `out` first and stored back at the end
/// (exactly: a store and reload does not round).
///
/// With `PREFETCH`, iteration i also asks for the cache line at
/// `ahead + i·64` bytes (into L2); a hint, which never faults.
///
/// # Safety
/// Pointers valid for `x[M, K]`, `out[M, N]`, and `W` weights at
/// `w + k·stride` for every k in `ks`, with `r0 + R <= M` and
/// `j0 + W <= N`; `W` a multiple of 8, at most 64.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn tile<const R: usize, const W: usize, const PREFETCH: bool, E: Lanes>(
    out: *mut f32,
    x: *const f32,
    w: *const E,
    stride: usize,
    r0: usize,
    j0: usize,
    ks: Range<usize>,
    k: usize,
    n: usize,
    ahead: *const u8,
) {
    // SAFETY (whole body): every offset is inside the buffers by the contract above.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 8]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            for (v, reg) in a.iter_mut().enumerate().take(W / 8) {
                *reg = _mm256_loadu_ps(out.add((r0 + r) * n + j0 + 8 * v));
            }
        }
        let xrow = |r: usize| x.add((r0 + r) * k);
        let k0 = ks.start;
        for kk in ks {
            if PREFETCH {
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add((kk - k0) * LINE).cast());
            }
            let wrow = w.add(kk * stride);
            if R == 2 && W == 48 {
                // Both broadcasts first, then each weight vector loaded once
                // for both rows: 12 sums + 2 + 1 registers. In the row-by-row
                // order below LLVM keeps all six weight vectors live and
                // spills sums to the stack. The same sums in the same order.
                let xs: [__m256; R] = std::array::from_fn(|r| _mm256_broadcast_ss(&*xrow(r).add(kk)));
                for v in 0..W / 8 {
                    let wv = E::vector(wrow, v);
                    for (a, xv) in acc.iter_mut().zip(&xs) {
                        a[v] = _mm256_fmadd_ps(*xv, wv, a[v]);
                    }
                }
                continue;
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*xrow(r).add(kk));
                for (v, reg) in a.iter_mut().enumerate().take(W / 8) {
                    *reg = _mm256_fmadd_ps(xv, E::vector(wrow, v), *reg);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, reg) in a.iter().enumerate().take(W / 8) {
                _mm256_storeu_ps(out.add((r0 + r) * n + j0 + 8 * v), *reg);
            }
        }
    }
}

/// `out[ja..ja+48] += x[ks] · wa[ks, 0..48]` and the same for `jb`, `wb`:
/// two 1 x 48 tiles of one row, their weights (two panels, rows 48 floats
/// apart) read side by side; 2 x 6 accumulators. `out` and `x` point at the
/// row's start.
///
/// # Safety
/// `x` valid for `ks.end` floats, `wa` and `wb` for `ks.end` rows of 48,
/// `out` for columns `ja..ja+48` and `jb..jb+48`.
#[inline(always)]
pub unsafe fn tile_pair<E: Lanes>(
    out: *mut f32,
    x: *const f32,
    wa: *const E,
    wb: *const E,
    ja: usize,
    jb: usize,
    ks: Range<usize>,
) {
    // SAFETY (whole body): every offset is inside the buffers by the contract above.
    unsafe {
        let mut a = [_mm256_setzero_ps(); 6];
        let mut b = [_mm256_setzero_ps(); 6];
        for v in 0..6 {
            a[v] = _mm256_loadu_ps(out.add(ja + 8 * v));
            b[v] = _mm256_loadu_ps(out.add(jb + 8 * v));
        }
        for kk in ks {
            let xv = _mm256_broadcast_ss(&*x.add(kk));
            let (ra, rb) = (wa.add(PANEL * kk), wb.add(PANEL * kk));
            for (v, s) in a.iter_mut().enumerate() {
                *s = _mm256_fmadd_ps(xv, E::vector(ra, v), *s);
            }
            for (v, s) in b.iter_mut().enumerate() {
                *s = _mm256_fmadd_ps(xv, E::vector(rb, v), *s);
            }
        }
        for v in 0..6 {
            _mm256_storeu_ps(out.add(ja + 8 * v), a[v]);
            _mm256_storeu_ps(out.add(jb + 8 * v), b[v]);
        }
    }
}

/// The 8-lane sums of `x[r0 + r, 0..k8] · w[j0 + c, 0..k8]` for `R x C`
/// pairs (lane l holds the products at `k ≡ l mod 8`, added in order of k),
/// unreduced.
///
/// # Safety
/// Pointers valid for `x[M, K]` and `w[N, K]`, with `r0 + R <= M`,
/// `j0 + C <= N`, and `k8 <= K` a multiple of 8.
#[inline(always)]
pub unsafe fn bt_lanes<const R: usize, const C: usize>(
    x: *const f32,
    w: *const f32,
    r0: usize,
    j0: usize,
    k8: usize,
    k: usize,
) -> [[[f32; 8]; C]; R] {
    let mut acc = [[[0f32; 8]; C]; R];
    // SAFETY (whole body): every offset is inside the buffers by the contract above.
    unsafe {
        let mut v = [[_mm256_setzero_ps(); C]; R];
        for kk in (0..k8).step_by(8) {
            let mut wv = [_mm256_setzero_ps(); C];
            for (c, reg) in wv.iter_mut().enumerate() {
                *reg = _mm256_loadu_ps(w.add((j0 + c) * k + kk));
            }
            for (r, vr) in v.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add((r0 + r) * k + kk));
                for (reg, wc) in vr.iter_mut().zip(&wv) {
                    *reg = _mm256_fmadd_ps(xv, *wc, *reg);
                }
            }
        }
        for (ar, vr) in acc.iter_mut().zip(&v) {
            for (a, reg) in ar.iter_mut().zip(vr) {
                _mm256_storeu_ps(a.as_mut_ptr(), *reg);
            }
        }
    }
    acc
}

/// `q · k_j` over `0..h8` for `J` keys: per key, 8 lanes accumulated over d
/// in steps of 8, then `(l0+l4 + l2+l6) + (l1+l5 + l3+l7)` exactly as the
/// portable code adds them.
///
/// # Safety
/// `q` and every key valid for `h8` floats, `h8` a multiple of 8.
#[inline(always)]
pub unsafe fn dot_lanes<const J: usize>(q: *const f32, ks: [*const f32; J], h8: usize) -> [f32; J] {
    // SAFETY (whole body): every offset is below h8 (the contract above).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); J];
        for d in (0..h8).step_by(8) {
            let qd = _mm256_loadu_ps(q.add(d));
            for (a, k) in acc.iter_mut().zip(&ks) {
                *a = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k.add(d)), *a);
            }
        }
        acc.map(|a| {
            // [l0+l4, l1+l5, l2+l6, l3+l7]
            let p = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
            // [p0+p2, p1+p3, ..]
            let p = _mm_add_ps(p, _mm_movehl_ps(p, p));
            // (p0+p2) + (p1+p3)
            _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps::<1>(p, p)))
        })
    }
}

/// `x · w_j` over `0..k32` for `J` int8 columns, each an exact i32: per 32
/// values, `|x|` times `w` with x's sign (`vpsignb`), adjacent products
/// added to i16 (`vpmaddubsw`: at most 2 · 127 · 127, no saturation from
/// values within ±127), then to i32 (`vpmaddwd` by ones).
///
/// # Safety
/// `x` and every column valid for `k32` values, `k32` a multiple of 32.
#[inline(always)]
pub unsafe fn dot_i8<const J: usize>(x: *const i8, ws: [*const i8; J], k32: usize) -> [i32; J] {
    // SAFETY (whole body): every offset is below k32 (the contract above).
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); J];
        for i in (0..k32).step_by(32) {
            let xv = _mm256_loadu_si256(x.add(i).cast());
            let ax = _mm256_sign_epi8(xv, xv);
            for (a, w) in acc.iter_mut().zip(&ws) {
                let wv = _mm256_loadu_si256(w.add(i).cast());
                let pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv));
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
            }
        }
        acc.map(|a| {
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), a);
            lanes.iter().sum()
        })
    }
}
