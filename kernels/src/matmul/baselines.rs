//! Products the engine does not call; the benches compare them with
//! [`linear_packed`](super::linear_packed), and `dot` is their streaming
//! yardstick.

use rayon::prelude::*;

use super::{column_chunks, linear_impl, Layout, OutPtr};
use crate::arch::{Isa, Kernel};
use crate::{active, Kernels};

/// Accumulator width of [`dot`]: 16 f32 is two AVX2 or one AVX-512
/// register. LLVM keeps `[f32; LANES]` arithmetic in vector registers.
const LANES: usize = 16;

/// Dot product of two equal-length slices, with `LANES` independent partial sums
/// so that the loop vectorises (a single running sum cannot be reordered).
/// On the [`active`](crate::active) kernel set.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    active().dot(a, b)
}

/// [`dot`]'s body.
struct Dot<'a>(&'a [f32], &'a [f32]);

impl Kernel for Dot<'_> {
    type Out = f32;

    #[inline(always)]
    unsafe fn run<I: Isa>(self) -> f32 {
        let Dot(a, b) = self;
        let mut acc = [0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let tail: f32 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in ca.zip(cb) {
            for ((s, &xi), &yi) in acc.iter_mut().zip(x).zip(y) {
                *s = I::fmadd(xi, yi, *s);
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

/// `out[M,N] = x[M,K] · w[K,N] + bias[N]`: a linear layer with the weight in
/// GPT-2's stored `[in, out]` layout. Overwrites `out`.
///
/// The same tiles and the same sums as [`linear_packed`](super::linear_packed),
/// so the same results bit for bit; tasks own column chunks. Over the stored
/// layout a task reads a slice of every weight row: many short runs, slower
/// from memory.
/// On the [`active`](crate::active) kernel set.
pub fn linear(out: &mut [f32], x: &[f32], w: &[f32], bias: &[f32], m: usize, k: usize, n: usize) {
    active().linear(out, x, w, bias, m, k, n)
}

/// `out[M,N] = x[M,K] · w[N,K]ᵀ`: the LM head over the token embedding
/// `wte[V, C]` as stored. Overwrites `out`. Not used by the engine (which packs
/// the LM head, see the module docs); the benches compare it.
///
/// Each output is a dot product of an x row with a contiguous row of `w`.
/// Tasks own chunks of `w`'s rows (vocabulary entries) and stream them in
/// order; tiles of 3 x rows by 4 w rows keep 12 vector accumulators busy.
/// On the [`active`](crate::active) kernel set.
pub fn matmul_bt(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    active().matmul_bt(out, x, w, m, k, n)
}

impl Kernels {
    /// [`dot`] on this kernel set.
    pub fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot: lengths differ");
        // SAFETY: Dot reads only through its slices.
        unsafe { self.run(Dot(a, b)) }
    }

    /// [`linear`] on this kernel set.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(self, out: &mut [f32], x: &[f32], w: &[f32], bias: &[f32], m: usize, k: usize, n: usize) {
        assert_eq!(w.len(), k * n, "linear: w is not [K={k}, N={n}]");
        linear_impl(self, out, x, w, Layout::Rows, Some(bias), m, k, n);
    }

    /// [`matmul_bt`] on this kernel set.
    pub fn matmul_bt(self, out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
        assert_eq!(out.len(), m * n, "matmul_bt: out is not [M={m}, N={n}]");
        assert_eq!(x.len(), m * k, "matmul_bt: x is not [M={m}, K={k}]");
        assert_eq!(w.len(), n * k, "matmul_bt: w is not [N={n}, K={k}]");
        if m == 0 || n == 0 {
            return;
        }
        let out = OutPtr(out.as_mut_ptr());
        // Several chunks per thread: rayon balances them if a core is busy.
        let (count, width) = column_chunks(n, 4, rayon::current_num_threads() * 4);
        (0..count).into_par_iter().for_each(|c| {
            let cols = c * width..((c + 1) * width).min(n);
            // SAFETY: the chunk's columns are within 0..N and no other task
            // writes them.
            unsafe {
                self.run(BtChunk {
                    out,
                    x,
                    w,
                    cols,
                    m,
                    k,
                    n,
                })
            };
        });
    }
}

/// One task of `matmul_bt`: columns `cols` of every row, in tiles of 3 x
/// rows by 4 w rows. Contract: `cols` within `0..N`, written by no other task.
struct BtChunk<'a> {
    out: OutPtr,
    x: &'a [f32],
    w: &'a [f32],
    cols: std::ops::Range<usize>,
    m: usize,
    k: usize,
    n: usize,
}

impl Kernel for BtChunk<'_> {
    type Out = ();

    #[inline(always)]
    unsafe fn run<I: Isa>(self) {
        let BtChunk {
            out,
            x,
            w,
            cols,
            m,
            k,
            n,
        } = self;
        let mut j = cols.start;
        while j < cols.end {
            let c = (cols.end - j).min(4);
            let mut r = 0;
            while r < m {
                let rows = (m - r).min(3);
                // SAFETY: rows r..r+rows < M and columns j..j+c within
                // this task's chunk, which no other task writes; the CPU has I.
                unsafe { bt_tile_any::<I>(rows, c, out, x, w, r, j, k, n) };
                r += rows;
            }
            j += c;
        }
    }
}

/// [`bt_tile`] for `rows` in 1..=3 and `cols` in 1..=4, as constants.
///
/// # Safety
/// As [`bt_tile`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn bt_tile_any<I: Isa>(
    rows: usize,
    cols: usize,
    out: OutPtr,
    x: &[f32],
    w: &[f32],
    r0: usize,
    j0: usize,
    k: usize,
    n: usize,
) {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match (rows, cols) {
            (1, 1) => bt_tile::<I, 1, 1>(out, x, w, r0, j0, k, n),
            (1, 2) => bt_tile::<I, 1, 2>(out, x, w, r0, j0, k, n),
            (1, 3) => bt_tile::<I, 1, 3>(out, x, w, r0, j0, k, n),
            (1, 4) => bt_tile::<I, 1, 4>(out, x, w, r0, j0, k, n),
            (2, 1) => bt_tile::<I, 2, 1>(out, x, w, r0, j0, k, n),
            (2, 2) => bt_tile::<I, 2, 2>(out, x, w, r0, j0, k, n),
            (2, 3) => bt_tile::<I, 2, 3>(out, x, w, r0, j0, k, n),
            (2, 4) => bt_tile::<I, 2, 4>(out, x, w, r0, j0, k, n),
            (3, 1) => bt_tile::<I, 3, 1>(out, x, w, r0, j0, k, n),
            (3, 2) => bt_tile::<I, 3, 2>(out, x, w, r0, j0, k, n),
            (3, 3) => bt_tile::<I, 3, 3>(out, x, w, r0, j0, k, n),
            (3, 4) => bt_tile::<I, 3, 4>(out, x, w, r0, j0, k, n),
            _ => unreachable!("a matmul_bt tile of {rows} x {cols}"),
        }
    }
}

/// `out[r0..r0+R, j0..j0+C] = x[r0.., :] · w[j0.., :]ᵀ`: R x C dot products of
/// length K, each accumulated in 8 lanes over `k` in order, the lanes summed
/// pairwise, then the `K % 8` tail added in order: the same roundings for
/// every R and C.
///
/// # Safety
/// `r0 + R <= M`, `j0 + C <= N`, and no other thread writes those outputs.
#[inline(always)]
unsafe fn bt_tile<I: Isa, const R: usize, const C: usize>(
    out: OutPtr,
    x: &[f32],
    w: &[f32],
    r0: usize,
    j0: usize,
    k: usize,
    n: usize,
) {
    debug_assert!((r0 + R) * k <= x.len() && j0 + C <= n && w.len() == k * n);
    let k8 = k / 8 * 8;
    // SAFETY: the bounds above keep every load inside x and w.
    let acc = unsafe { I::bt_lanes::<R, C>(x.as_ptr(), w.as_ptr(), r0, j0, k8, k) };
    for (r, ar) in acc.iter().enumerate() {
        for (c, a) in ar.iter().enumerate() {
            let pairs = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
            let mut s = (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]);
            let (xr, wr) = (&x[(r0 + r) * k..][..k], &w[(j0 + c) * k..][..k]);
            for kk in k8..k {
                s = I::fmadd(xr[kk], wr[kk], s);
            }
            // SAFETY: in bounds and owned by this task (the caller's contract).
            unsafe { *out.get().add((r0 + r) * n + j0 + c) = s };
        }
    }
}

/// `out[M,N] = x[M,K] · w[K,N] + bias[N]` through `matrixmultiply`'s SGEMM,
/// output columns split over rayon threads. Not used by the engine (its
/// rounding depends on M, see the module docs); the benches compare it.
pub fn linear_sgemm(out: &mut [f32], x: &[f32], w: &[f32], bias: &[f32], m: usize, k: usize, n: usize) {
    assert_eq!(out.len(), m * n, "linear_sgemm: out is not [M={m}, N={n}]");
    assert_eq!(x.len(), m * k, "linear_sgemm: x is not [M={m}, K={k}]");
    assert_eq!(w.len(), k * n, "linear_sgemm: w is not [K={k}, N={n}]");
    assert_eq!(bias.len(), n, "linear_sgemm: bias is not [N={n}]");
    for row in out.chunks_exact_mut(n) {
        row.copy_from_slice(bias);
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Chunks a multiple of 16 wide, so that the SGEMM micro-kernel tiles fit.
    let (count, width) = column_chunks(n, 16, rayon::current_num_threads());
    (0..count).into_par_iter().for_each(|c| {
        let (j0, j1) = (c * width, ((c + 1) * width).min(n));
        // SAFETY: x is [M,K] and w is [K,N] (asserted above); the task writes
        // only columns j0..j1 of out, which no other task touches.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                j1 - j0,
                1.0,
                x.as_ptr(),
                k as isize,
                1,
                w.as_ptr().add(j0),
                n as isize,
                1,
                1.0,
                out_ptr.get().add(j0),
                n as isize,
                1,
            )
        }
    });
}
