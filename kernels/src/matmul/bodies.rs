//! The innermost loops of the f32 and bf16 tiles, written once over any
//! [`Isa`]: what changes with the set is the vector (8 or 16 lanes) and how
//! a weight widens; the order of the sums does not. `tiles.rs` chooses the
//! shapes and calls them; the int8 tiles are in `int8.rs`.

use std::ops::Range;

use super::pack::PANEL;
use crate::arch::{Isa, Vector, Widen, LINE, MIN_LANES};

/// Most vectors a tile row holds: 64 columns (the widest tile) in the
/// narrowest vectors.
const MAX_VECTORS: usize = 64 / MIN_LANES;

/// Vectors in one row of a panel: [`PANEL`] columns in the narrowest
/// vectors (6 of 8 lanes; AVX-512 fills 3 of 16).
const PANEL_VECTORS: usize = PANEL / MIN_LANES;

/// `out[r0..r0+R, j0..j0+W] += x[r0..r0+R, ks] · w[ks, 0..W]`: for each k in
/// `ks`, broadcast `x[r, k]` and multiply-add it with the `W` weights at
/// `w + k·stride` (widened as loaded); `R x W/L` accumulator registers,
/// loaded from `out` first and stored back at the end (exactly: a store and
/// reload does not round).
///
/// Iteration i also asks for the `PF` cache lines from
/// `ahead + i·PF·64` bytes (into L2); a hint, which never faults.
///
/// # Safety
/// The CPU has `I`; pointers valid for `x[M, K]`, `out[M, N]`, and `W`
/// weights at `w + k·stride` for every k in `ks`, with `r0 + R <= M` and
/// `j0 + W <= N`; `W` a multiple of the lanes, at most 64, `w` at the start
/// of a weight group.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn tile<I: Isa, const R: usize, const W: usize, const PF: usize, E: Widen>(
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
    let l = I::V::LANES;
    let nv = W / l;
    debug_assert!(W.is_multiple_of(l) && nv <= MAX_VECTORS);
    // SAFETY (whole body): every offset is inside the buffers by the contract above.
    unsafe {
        let mut acc = [[I::V::zero(); MAX_VECTORS]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            for (v, reg) in a.iter_mut().enumerate().take(nv) {
                *reg = I::V::load(out.add((r0 + r) * n + j0 + l * v));
            }
        }
        // Two weight rows per iteration, unrolled by hand so that a build
        // for baseline x86-64 loops as tightly as one tuned for the host
        // CPU; each sum still adds its products in order of k. Not with
        // more than 16 sums (AVX-512's 8 x 48): there LLVM hoists both
        // rows' broadcasts and spills sums (30-60 spills per 48 FMAs, as
        // the Zen 4 tuning did to the loop unrolled for it).
        let k0 = ks.start;
        let mut kk = k0;
        let unroll = R * nv <= 16;
        while unroll && kk + 2 <= ks.end {
            tile_row::<I, R, W, PF, E>(&mut acc, x, w, stride, r0, k, kk, k0, ahead);
            tile_row::<I, R, W, PF, E>(&mut acc, x, w, stride, r0, k, kk + 1, k0, ahead);
            kk += 2;
        }
        while kk < ks.end {
            tile_row::<I, R, W, PF, E>(&mut acc, x, w, stride, r0, k, kk, k0, ahead);
            kk += 1;
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, reg) in a.iter().enumerate().take(nv) {
                reg.store(out.add((r0 + r) * n + j0 + l * v));
            }
        }
    }
}

/// Weight row `kk` of [`tile`]: its prefetches, then `acc[r] += x[r0 + r,
/// kk] · w[kk, ..]` for every row.
///
/// # Safety
/// As [`tile`], with `kk` in its `ks`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_row<I: Isa, const R: usize, const W: usize, const PF: usize, E: Widen>(
    acc: &mut [[I::V; MAX_VECTORS]; R],
    x: *const f32,
    w: *const E,
    stride: usize,
    r0: usize,
    k: usize,
    kk: usize,
    k0: usize,
    ahead: *const u8,
) {
    let nv = W / I::V::LANES;
    // SAFETY (whole body): in bounds by the caller's contract.
    unsafe {
        for p in 0..PF {
            I::V::prefetch(ahead.wrapping_add(((kk - k0) * PF + p) * LINE));
        }
        let wrow = w.add(kk * stride);
        if R == 2 && W == 48 {
            // Both broadcasts first, then each weight vector widened once
            // for both rows: 12 sums + 2 + 1 of AVX2's 16 registers. In
            // the row-by-row order below LLVM keeps all six weight
            // vectors live and spills sums. The same sums in the same order.
            let mut xs = [I::V::zero(); R];
            for (r, xv) in xs.iter_mut().enumerate() {
                *xv = I::V::splat(x.add((r0 + r) * k + kk));
            }
            for v in 0..nv {
                let wv = I::widen(wrow, v);
                for (a, xv) in acc.iter_mut().zip(&xs) {
                    a[v] = I::V::mul_add(*xv, wv, a[v]);
                }
            }
            return;
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = I::V::splat(x.add((r0 + r) * k + kk));
            for (v, reg) in a.iter_mut().enumerate().take(nv) {
                *reg = I::V::mul_add(xv, I::widen(wrow, v), *reg);
            }
        }
    }
}

/// `out[j[s]..j[s]+48] += x[ks] · w[s][ks, 0..48]` for each of `S` panels:
/// S 1 x 48 tiles of one row, their weights (S panels, rows 48 values
/// apart) read side by side, S streams at once. `out` and `x` point at the
/// row's start.
///
/// # Safety
/// The CPU has `I`; `x` valid for `ks.end` floats, each `w[s]` for `ks.end`
/// rows of 48, `out` for columns `j[s]..j[s]+48`.
#[inline(always)]
pub(super) unsafe fn tile_streams<I: Isa, E: Widen, const S: usize>(
    out: *mut f32,
    x: *const f32,
    w: [*const E; S],
    j: [usize; S],
    ks: Range<usize>,
) {
    let l = I::V::LANES;
    let nv = PANEL / l;
    debug_assert!(nv <= PANEL_VECTORS);
    // SAFETY (whole body): every offset is inside the buffers by the contract above.
    unsafe {
        let mut acc = [[I::V::zero(); PANEL_VECTORS]; S];
        for (a, &js) in acc.iter_mut().zip(&j) {
            for (v, reg) in a.iter_mut().enumerate().take(nv) {
                *reg = I::V::load(out.add(js + l * v));
            }
        }
        // Two weight rows per iteration, unrolled by hand (as in `tile`).
        let mut kk = ks.start;
        while kk + 2 <= ks.end {
            streams_row::<I, E, S>(&mut acc, x, &w, kk);
            streams_row::<I, E, S>(&mut acc, x, &w, kk + 1);
            kk += 2;
        }
        if kk < ks.end {
            streams_row::<I, E, S>(&mut acc, x, &w, kk);
        }
        for (a, &js) in acc.iter().zip(&j) {
            for (v, reg) in a.iter().enumerate().take(nv) {
                reg.store(out.add(js + l * v));
            }
        }
    }
}

/// Weight row `kk` of [`tile_streams`]: `x[kk]` times every panel's row.
/// A function, not a closure: a closure is not compiled with the entry
/// point's target features, so its intrinsics would be calls.
///
/// # Safety
/// As [`tile_streams`], with `kk` in its `ks`.
#[inline(always)]
unsafe fn streams_row<I: Isa, E: Widen, const S: usize>(
    acc: &mut [[I::V; PANEL_VECTORS]; S],
    x: *const f32,
    w: &[*const E; S],
    kk: usize,
) {
    let nv = PANEL / I::V::LANES;
    // SAFETY (whole body): in bounds by the caller's contract.
    unsafe {
        let xv = I::V::splat(x.add(kk));
        for (a, &ws) in acc.iter_mut().zip(w) {
            let row = ws.add(PANEL * kk);
            for (v, reg) in a.iter_mut().enumerate().take(nv) {
                *reg = I::V::mul_add(xv, I::widen(row, v), *reg);
            }
        }
    }
}
