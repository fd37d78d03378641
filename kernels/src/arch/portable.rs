//! The innermost loops in plain Rust: what a CPU without AVX2 and FMA builds.
//! Each function has the contract of its namesake in `avx2.rs` and adds the
//! same products in the same order, with [`fmadd`]; LLVM vectorises the lane
//! arrays. No prefetch hint.

use std::ops::Range;

use super::{fmadd, Weight};
use crate::matmul::PANEL;

/// Any [`Weight`]: the loops below widen one value at a time.
pub(crate) trait Lanes: Weight {}

impl<T: Weight> Lanes for T {}

/// `out[r0..r0+R, j0..j0+W] += x[r0..r0+R, ks] · w[ks, 0..W]`, the weights
/// of row k at `w + k·stride`; `ahead` is ignored.
///
/// # Safety
/// As `avx2::tile`: pointers valid for `x[M, K]`, `out[M, N]`, and `W`
/// weights at `w + k·stride` for every k in `ks`, with `r0 + R <= M` and
/// `j0 + W <= N`.
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
    let _ = ahead;
    // SAFETY (whole body): every offset is inside the buffers by the contract above.
    unsafe {
        let mut acc = [[0f32; W]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            a.copy_from_slice(std::slice::from_raw_parts(out.add((r0 + r) * n + j0), W));
        }
        for kk in ks {
            let wrow = std::slice::from_raw_parts(w.add(kk * stride), W);
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = *x.add((r0 + r) * k + kk);
                for (c, s) in a.iter_mut().enumerate() {
                    *s = fmadd(xv, wrow[E::slot(c)].to_f32(), *s);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            std::slice::from_raw_parts_mut(out.add((r0 + r) * n + j0), W).copy_from_slice(a);
        }
    }
}

/// `out[ja..ja+48] += x[ks] · wa[ks, 0..48]` and the same for `jb`, `wb`;
/// `out` and `x` point at the row's start. One panel after the other: each
/// output's sum is the same whichever order the panels go in.
///
/// # Safety
/// As `avx2::tile_pair`: `x` valid for `ks.end` floats, `wa` and `wb` for
/// `ks.end` rows of 48, `out` for columns `ja..ja+48` and `jb..jb+48`.
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
    // SAFETY: the contract above; with one row at `out` and `x` (r0 = 0), the
    // row strides K and N are never used, hence 0.
    unsafe {
        tile::<1, PANEL, false, E>(out, x, wa, PANEL, 0, ja, ks.clone(), 0, 0, std::ptr::null());
        tile::<1, PANEL, false, E>(out, x, wb, PANEL, 0, jb, ks, 0, 0, std::ptr::null());
    }
}

/// The 8-lane sums of `x[r0 + r, 0..k8] · w[j0 + c, 0..k8]` for `R x C`
/// pairs, unreduced.
///
/// # Safety
/// As `avx2::bt_lanes`: pointers valid for `x[M, K]` and `w[N, K]`, with
/// `r0 + R <= M`, `j0 + C <= N`, and `k8 <= K` a multiple of 8.
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
    for kk in (0..k8).step_by(8) {
        for (r, ar) in acc.iter_mut().enumerate() {
            // SAFETY: in bounds by the contract above.
            let xs = unsafe { std::slice::from_raw_parts(x.add((r0 + r) * k + kk), 8) };
            for (c, a) in ar.iter_mut().enumerate() {
                // SAFETY: as above.
                let ws = unsafe { std::slice::from_raw_parts(w.add((j0 + c) * k + kk), 8) };
                for l in 0..8 {
                    a[l] = fmadd(xs[l], ws[l], a[l]);
                }
            }
        }
    }
    acc
}

/// `q · k_j` over `0..h8` for `J` keys: per key, 8 lanes accumulated over d
/// in steps of 8, then `(l0+l4 + l2+l6) + (l1+l5 + l3+l7)`.
///
/// # Safety
/// As `avx2::dot_lanes`: `q` and every key valid for `h8` floats, `h8` a
/// multiple of 8.
#[inline(always)]
pub unsafe fn dot_lanes<const J: usize>(q: *const f32, ks: [*const f32; J], h8: usize) -> [f32; J] {
    // SAFETY: in bounds by the contract above.
    let (q, ks) = unsafe {
        (
            std::slice::from_raw_parts(q, h8),
            ks.map(|k| std::slice::from_raw_parts(k, h8)),
        )
    };
    // Keys inner: J independent chains hide the FMA latency.
    let mut acc = [[0f32; 8]; J];
    for d in (0..h8).step_by(8) {
        for (a, kj) in acc.iter_mut().zip(&ks) {
            for l in 0..8 {
                a[l] = fmadd(q[d + l], kj[d + l], a[l]);
            }
        }
    }
    acc.map(|a| {
        let p = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
        (p[0] + p[2]) + (p[1] + p[3])
    })
}

/// `x · w_j` over `0..k32` for `J` int8 columns, each an exact i32.
///
/// # Safety
/// As `avx2::dot_i8`: `x` and every column valid for `k32` values.
#[inline(always)]
pub unsafe fn dot_i8<const J: usize>(x: *const i8, ws: [*const i8; J], k32: usize) -> [i32; J] {
    // SAFETY: in bounds by the contract above.
    let x = unsafe { std::slice::from_raw_parts(x, k32) };
    ws.map(|w| {
        // SAFETY: as above.
        let w = unsafe { std::slice::from_raw_parts(w, k32) };
        x.iter().zip(w).map(|(&a, &b)| a as i32 * b as i32).sum()
    })
}
