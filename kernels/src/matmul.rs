//! Matrix products: the hot path. Almost all of a forward pass is spent here.
//!
//! GPT-2 stores its Conv1D weights as `[K, N]` (input-major), so a linear layer
//! is `out[M,N] = x[M,K] · w[K,N] + bias[N]` with `w` used as stored. The LM
//! head multiplies by the token embedding `wte[V, C]`, i.e. by `w[N,K]`
//! transposed ([`matmul_bt`]). No kernel copies or transposes a weight.
//!
//! Two regimes:
//! - many rows (prefill): SGEMM through `matrixmultiply`, the output columns
//!   split over rayon threads. FLOP-bound.
//! - few rows (decode, batched decode): `matrixmultiply` would repack the whole
//!   weight matrix on every call, so instead each thread streams a block of
//!   weight columns once and applies it to every row. Memory-bound.

use rayon::prelude::*;

/// Rows up to which the streaming kernels beat SGEMM (they read each weight
/// once for all rows; SGEMM repacks the weights on every call).
pub const FEW_ROWS: usize = 16;

/// Accumulator width of the hand-vectorised loops: 16 f32 is two AVX2 or one
/// AVX-512 register. LLVM keeps `[f32; LANES]` arithmetic in vector registers.
const LANES: usize = 16;

/// Column tile of the few-row linear kernel: each `k` step reads 32
/// contiguous floats (two cache lines) of one weight row.
const TILE: usize = 32;

/// `a * b + c`, as one fused instruction where the CPU has FMA (compiled with
/// `target-cpu=native`); plain multiply-add otherwise, since a software `fma`
/// call would be far slower than the rounding difference is worth.
#[inline(always)]
fn fmadd(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

/// Dot product of two equal-length slices, with `LANES` independent partial sums
/// so that the loop vectorises (a single running sum cannot be reordered).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
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
            *s = fmadd(xi, yi, *s);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A raw output pointer that rayon tasks may share. Each task writes a
/// disjoint set of elements, which is what makes sharing it sound.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the pointer is only dereferenced at indices that exactly one task
// owns (disjoint column ranges), and the buffer outlives the parallel region.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Splits `n` columns into contiguous chunks, a multiple of `align` wide, about
/// `per_thread` chunks for each thread of the current rayon pool.
fn column_chunks(n: usize, align: usize, per_thread: usize) -> Vec<(usize, usize)> {
    let parts = (rayon::current_num_threads() * per_thread).max(1);
    let width = n.div_ceil(parts).div_ceil(align).max(1) * align;
    (0..n)
        .step_by(width)
        .map(|j0| (j0, (j0 + width).min(n)))
        .collect()
}

/// `out[M,N] = x[M,K] · w[K,N] + bias[N]`: a linear layer with the weight in
/// GPT-2's stored `[in, out]` layout. Overwrites `out`.
pub fn linear(out: &mut [f32], x: &[f32], w: &[f32], bias: &[f32], m: usize, k: usize, n: usize) {
    assert_eq!(out.len(), m * n, "linear: out is not [M={m}, N={n}]");
    assert_eq!(x.len(), m * k, "linear: x is not [M={m}, K={k}]");
    assert_eq!(w.len(), k * n, "linear: w is not [K={k}, N={n}]");
    assert_eq!(bias.len(), n, "linear: bias is not [N={n}]");
    if m <= FEW_ROWS {
        linear_few_rows(out, x, w, bias, m, k, n);
    } else {
        for row in out.chunks_exact_mut(n) {
            row.copy_from_slice(bias);
        }
        // x[M,K] row-major: row stride K; w[K,N]: row stride N.
        sgemm_acc_columns(out, x, (k, 1), w, (n, 1), m, k, n);
    }
}

/// `out[M,N] = x[M,K] · w[N,K]ᵀ`: the LM head, where `w` is the token
/// embedding `wte[V, C]`. Overwrites `out`.
pub fn matmul_bt(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    assert_eq!(out.len(), m * n, "matmul_bt: out is not [M={m}, N={n}]");
    assert_eq!(x.len(), m * k, "matmul_bt: x is not [M={m}, K={k}]");
    assert_eq!(w.len(), n * k, "matmul_bt: w is not [N={n}, K={k}]");
    if m <= FEW_ROWS {
        // Each output column is a dot product with one contiguous row of `w`:
        // stream `w` once, applying each row to every x row while it is in L1.
        let out_ptr = OutPtr(out.as_mut_ptr());
        column_chunks(n, 1, 8).into_par_iter().for_each(|(j0, j1)| {
            for j in j0..j1 {
                let wrow = &w[j * k..(j + 1) * k];
                for (r, xrow) in x.chunks_exact(k).enumerate() {
                    // SAFETY: column j belongs to this task only; r < m, j < n.
                    unsafe { *out_ptr.get().add(r * n + j) = dot(xrow, wrow) };
                }
            }
        });
    } else {
        out.fill(0.0);
        // wᵀ is [K, N] with row stride 1 and column stride K.
        sgemm_acc_columns(out, x, (k, 1), w, (1, k), m, k, n);
    }
}

/// `out[M,N] += a[M,K] · b[K,N]` through `matrixmultiply`, with `b` given by
/// (row, column) strides and the output columns split over rayon threads.
#[allow(clippy::too_many_arguments)]
fn sgemm_acc_columns(
    out: &mut [f32],
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    m: usize,
    k: usize,
    n: usize,
) {
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Chunks a multiple of 16 wide, so that the SGEMM micro-kernel tiles fit.
    column_chunks(n, 16, 1).into_par_iter().for_each(|(j0, j1)| {
        // SAFETY: a is [M,K] and b is [K,N] under the given strides (checked
        // by the callers' length asserts); the task writes only columns
        // j0..j1 of out, which no other task touches.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                j1 - j0,
                1.0,
                a.as_ptr(),
                rsa as isize,
                csa as isize,
                b.as_ptr().add(j0 * csb),
                rsb as isize,
                csb as isize,
                1.0,
                out_ptr.get().add(j0),
                n as isize,
                1,
            )
        }
    });
}

/// Few-row linear layer: each task owns a range of output columns and streams
/// the matching `[K, TILE]` blocks of `w` once, applying each block to all rows.
fn linear_few_rows(out: &mut [f32], x: &[f32], w: &[f32], bias: &[f32], m: usize, k: usize, n: usize) {
    let out_ptr = OutPtr(out.as_mut_ptr());
    column_chunks(n, TILE, 4).into_par_iter().for_each(|(j0, j1)| {
        let mut j = j0;
        while j < j1 {
            let width = TILE.min(j1 - j);
            let mut r = 0;
            // Four rows at a time: 4 x TILE accumulators fill the vector registers.
            while r < m {
                let rows = (m - r).min(4);
                // SAFETY: rows r..r+rows and columns j..j+width are in bounds
                // and those columns belong to this task only.
                unsafe {
                    match (rows, width) {
                        (4, TILE) => tile::<4>(out_ptr, x, w, bias, r, j, k, n),
                        (3, TILE) => tile::<3>(out_ptr, x, w, bias, r, j, k, n),
                        (2, TILE) => tile::<2>(out_ptr, x, w, bias, r, j, k, n),
                        (1, TILE) => tile::<1>(out_ptr, x, w, bias, r, j, k, n),
                        _ => edge(out_ptr, x, w, bias, r..r + rows, j..j + width, k, n),
                    }
                }
                r += rows;
            }
            j += width;
        }
    });
}

/// `R` rows times one full `TILE` of columns starting at `(r0, j0)`.
///
/// # Safety
/// `r0 + R <= M`, `j0 + TILE <= N`, and no other thread writes those outputs.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<const R: usize>(
    out: OutPtr,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    r0: usize,
    j0: usize,
    k: usize,
    n: usize,
) {
    let mut acc = [[0f32; TILE]; R];
    for a in acc.iter_mut() {
        a.copy_from_slice(&bias[j0..j0 + TILE]);
    }
    for kk in 0..k {
        let wrow: &[f32; TILE] = w[kk * n + j0..kk * n + j0 + TILE].try_into().unwrap();
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = x[(r0 + r) * k + kk];
            for (s, &wv) in a.iter_mut().zip(wrow) {
                *s = fmadd(xv, wv, *s);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: in bounds and owned by this task (the caller's contract).
        let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add((r0 + r) * n + j0), TILE) };
        dst.copy_from_slice(a);
    }
}

/// Scalar fallback for a partial tile at the right edge of the matrix.
///
/// # Safety
/// The ranges are in bounds and no other thread writes those outputs.
#[allow(clippy::too_many_arguments)]
unsafe fn edge(
    out: OutPtr,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    k: usize,
    n: usize,
) {
    for r in rows {
        for j in cols.clone() {
            let mut s = bias[j];
            for kk in 0..k {
                s = fmadd(x[r * k + kk], w[kk * n + j], s);
            }
            // SAFETY: in bounds and owned by this task (the caller's contract).
            unsafe { *out.get().add(r * n + j) = s };
        }
    }
}
