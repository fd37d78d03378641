//! Products the engine does not call; the benches compare them with
//! [`linear_packed`](super::linear_packed), and `dot` is their streaming
//! yardstick. [`matmul_bt()`] keeps its per-set code in `matmul_bt.rs`,
//! outside the instruction-set seam.

mod matmul_bt;

pub use matmul_bt::matmul_bt;

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
