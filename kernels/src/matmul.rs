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

thread_local! {
    /// Partial sums of the K-split few-row kernel, reused across calls so
    /// the decode loop does not allocate. Taken out while in use, so a
    /// re-entrant call (rayon may run another job on this thread while it
    /// waits) gets a fresh buffer instead of a borrow error.
    static PARTIALS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Few-row linear layer, split over K: task `i` owns weight rows
/// `ks_i = K·i/T .. K·(i+1)/T`, one contiguous block of `w`, and streams it
/// front to back (the access pattern the hardware prefetcher follows best),
/// applying each weight to every row while it is in L1. Task 0 accumulates
/// into `out` (seeded with the bias), the others into partial sums that are
/// added at the end: `T·M·N` adds, against `K·N` weights streamed.
fn linear_few_rows(out: &mut [f32], x: &[f32], w: &[f32], bias: &[f32], m: usize, k: usize, n: usize) {
    for row in out.chunks_exact_mut(n) {
        row.copy_from_slice(bias);
    }
    let parts = rayon::current_num_threads().min(k / 64).max(1);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let ks = |i: usize| k * i / parts..k * (i + 1) / parts;
    if parts == 1 {
        // SAFETY: out is [M, N], and this is the only task.
        unsafe { few_rows_block(out_ptr, x, w, m, k, n, 0..k) };
        return;
    }
    let mut partials = PARTIALS.take();
    partials.clear();
    partials.resize((parts - 1) * m * n, 0.0);
    let part_ptr = OutPtr(partials.as_mut_ptr());
    (0..parts).into_par_iter().for_each(|i| {
        // SAFETY: task 0 owns `out`, task i > 0 owns the i-1'th [M, N] block
        // of `partials`; no two tasks share a buffer.
        unsafe {
            let dst = if i == 0 {
                out_ptr
            } else {
                OutPtr(part_ptr.get().add((i - 1) * m * n))
            };
            few_rows_block(dst, x, w, m, k, n, ks(i));
        }
    });
    for part in partials.chunks_exact(m * n) {
        for (o, p) in out.iter_mut().zip(part) {
            *o += p;
        }
    }
    PARTIALS.set(partials);
}

/// `out += x[.., ks] · w[ks, ..]` for all M rows and N columns, in tiles.
///
/// # Safety
/// `out` points to an `[M, N]` buffer no other thread touches; `ks` within `0..K`.
#[allow(clippy::too_many_arguments)]
unsafe fn few_rows_block(
    out: OutPtr,
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    ks: std::ops::Range<usize>,
) {
    // Register blocking by row count: one row takes 64-wide tiles (8
    // accumulators), two rows 32-wide, more rows the classic 6 x 16 AVX2
    // block (12 accumulators, 2 weight loads per 12 FMAs).
    //
    // Loop order: for a block of KB weight rows (contiguous in memory), sweep
    // the tiles left to right, so `w` is read strictly in order; a tile's
    // KB x W weights stay in L1 for the other row groups. Partial sums go
    // through `out` once per block. (Tile by tile down all K rows instead
    // reads 64 to 256 bytes per row at a stride of N floats, a new page at
    // almost every access, and ran at a third of the bandwidth.)
    const KB: usize = 16;
    macro_rules! sweep {
        ($w:expr, $($r:literal)+) => {{
            for k0 in ks.clone().step_by(KB) {
                let k1 = (k0 + KB).min(ks.end);
                let mut j = 0;
                while j + $w <= n {
                    let mut r = 0;
                    while r < m {
                        let rows = (m - r).min(max_rows!($($r)+));
                        // SAFETY: rows r..r+rows < M, columns j..j+W <= N, in
                        // the buffer this task owns (the caller's contract).
                        unsafe {
                            match rows {
                                $($r => tile::<$r, $w>(out, x, w, r, j, k0..k1, k, n),)+
                                _ => unreachable!(),
                            }
                        }
                        r += rows;
                    }
                    j += $w;
                }
                if j < n {
                    // SAFETY: as above, for the last partial tile.
                    unsafe { edge(out, x, w, 0..m, j..n, k0..k1, k, n) };
                }
            }
        }};
    }
    macro_rules! max_rows {
        ($($r:literal)+) => { 0 $(.max($r))+ };
    }
    match m {
        1 => sweep!(64, 1),
        2 => sweep!(32, 1 2),
        _ => sweep!(16, 1 2 3 4 5 6),
    }
}

/// `out[r0..r0+R, j0..j0+W] += x[.., ks] · w[ks, ..]`: for each k in `ks`,
/// broadcast x[r, k] and multiply-add it with the `W` contiguous weights of row k.
///
/// # Safety
/// `r0 + R <= M`, `j0 + W <= N`, and no other thread writes those outputs.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<const R: usize, const W: usize>(
    out: OutPtr,
    x: &[f32],
    w: &[f32],
    r0: usize,
    j0: usize,
    ks: std::ops::Range<usize>,
    k: usize,
    n: usize,
) {
    debug_assert!(r0 + R <= x.len() / k && j0 + W <= n && w.len() == k * n);
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    {
        // SAFETY: the bounds above (the caller's contract) keep every load and
        // store inside x, w, bias and out; AVX2 and FMA are enabled at compile time.
        unsafe { avx2::tile::<R, W>(out.get(), x.as_ptr(), w.as_ptr(), r0, j0, ks, k, n) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    {
        let mut acc = [[0f32; W]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            // SAFETY: in bounds and owned by this task (the caller's contract).
            a.copy_from_slice(unsafe { std::slice::from_raw_parts(out.get().add((r0 + r) * n + j0), W) });
        }
        for kk in ks {
            let wrow = &w[kk * n + j0..kk * n + j0 + W];
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = x[(r0 + r) * k + kk];
                for (s, &wv) in a.iter_mut().zip(wrow) {
                    *s = fmadd(xv, wv, *s);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: in bounds and owned by this task (the caller's contract).
            let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add((r0 + r) * n + j0), W) };
            dst.copy_from_slice(a);
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod avx2 {
    use std::arch::x86_64::*;

    /// The AVX2 body of [`super::tile`]: `R x W/8` accumulator registers.
    ///
    /// # Safety
    /// Pointers valid for `x[M, K]`, `w[K, N]`, `out[M, N]`, with
    /// `r0 + R <= M` and `j0 + W <= N`; `W` a multiple of 8.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub unsafe fn tile<const R: usize, const W: usize>(
        out: *mut f32,
        x: *const f32,
        w: *const f32,
        r0: usize,
        j0: usize,
        ks: std::ops::Range<usize>,
        k: usize,
        n: usize,
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
            for kk in ks {
                let wrow = w.add(kk * n + j0);
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*xrow(r).add(kk));
                    for (v, reg) in a.iter_mut().enumerate().take(W / 8) {
                        *reg = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wrow.add(8 * v)), *reg);
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
}
/// Scalar fallback for a partial tile at the right edge: `out += x · w` there.
///
/// # Safety
/// The ranges are in bounds and no other thread writes those outputs.
#[allow(clippy::too_many_arguments)]
unsafe fn edge(
    out: OutPtr,
    x: &[f32],
    w: &[f32],
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    ks: std::ops::Range<usize>,
    k: usize,
    n: usize,
) {
    for r in rows {
        for j in cols.clone() {
            // SAFETY: in bounds and owned by this task (the caller's contract).
            let dst = unsafe { &mut *out.get().add(r * n + j) };
            for kk in ks.clone() {
                *dst = fmadd(x[r * k + kk], w[kk * n + j], *dst);
            }
        }
    }
}
