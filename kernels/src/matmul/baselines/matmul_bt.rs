//! [`matmul_bt`]: the LM head as dot products over `wte[V, C]` as stored, a
//! baseline the benches compare with the packed LM head. Its sums are
//! 8 lanes wide on every set (AVX-512 runs AVX2's), not the set's
//! [`Vector`](crate::arch::Vector), so its per-set code ([`BtLanes`]) and
//! the `#[target_feature]` entry points that compile a chunk for each set
//! live here, outside the instruction-set seam (`crate::arch`), which holds
//! only what the engine's kernels need.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::arch::avx2::Avx2;
use crate::arch::portable::Portable;
use crate::arch::Isa;
use crate::matmul::{column_chunks, OutPtr};
use crate::{active, KernelSet, Kernels};

/// `out[M,N] = x[M,K] · w[N,K]ᵀ`: the LM head over the token embedding
/// `wte[V, C]` as stored. Overwrites `out`. Not used by the engine (which packs
/// the LM head, see [`crate::matmul`]); the benches compare it.
///
/// Each output is a dot product of an x row with a contiguous row of `w`.
/// Tasks own chunks of `w`'s rows (vocabulary entries) and stream them in
/// order; tiles of 3 x rows by 4 w rows keep 12 vector accumulators busy.
/// On the [`active`](crate::active) kernel set.
pub fn matmul_bt(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    active().matmul_bt(out, x, w, m, k, n)
}

impl Kernels {
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
            let chunk = BtChunk {
                out,
                x,
                w,
                cols,
                m,
                k,
                n,
            };
            // SAFETY: the chunk's columns are within 0..N and no other task
            // writes them.
            unsafe { run_chunk(self, chunk) };
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

impl BtChunk<'_> {
    /// The chunk's tiles, on the set `I`.
    ///
    /// # Safety
    /// The CPU has `I` (the caller is its entry point), and the chunk's
    /// contract holds.
    #[inline(always)]
    unsafe fn run<I: BtLanes>(self) {
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
unsafe fn bt_tile_any<I: BtLanes>(
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
unsafe fn bt_tile<I: BtLanes, const R: usize, const C: usize>(
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

/// A set's 8-lane sums for [`bt_tile`]: the part of `matmul_bt` written per
/// instruction set (the `K % 8` tail rounds with the set's [`Isa::fmadd`]).
trait BtLanes: Isa {
    /// The 8-lane sums of `x[r0 + r, 0..k8] · w[j0 + c, 0..k8]` for `R x C`
    /// pairs (lane l holds the products at `k ≡ l mod 8`, added in order of
    /// k), unreduced.
    ///
    /// # Safety
    /// The CPU has the set; pointers valid for `x[M, K]` and `w[N, K]`, with
    /// `r0 + R <= M`, `j0 + C <= N`, and `k8 <= K` a multiple of 8.
    unsafe fn bt_lanes<const R: usize, const C: usize>(
        x: *const f32,
        w: *const f32,
        r0: usize,
        j0: usize,
        k8: usize,
        k: usize,
    ) -> [[[f32; 8]; C]; R];
}

impl BtLanes for Portable {
    #[inline(always)]
    unsafe fn bt_lanes<const R: usize, const C: usize>(
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
                // SAFETY: in bounds by the contract.
                let xs = unsafe { std::slice::from_raw_parts(x.add((r0 + r) * k + kk), 8) };
                for (c, a) in ar.iter_mut().enumerate() {
                    // SAFETY: as above.
                    let ws = unsafe { std::slice::from_raw_parts(w.add((j0 + c) * k + kk), 8) };
                    for l in 0..8 {
                        a[l] = Self::fmadd(xs[l], ws[l], a[l]);
                    }
                }
            }
        }
        acc
    }
}

/// In `__m256` registers (AVX-512 runs them too: [`entry_avx512`]).
#[cfg(target_arch = "x86_64")]
impl BtLanes for Avx2<false> {
    #[inline(always)]
    unsafe fn bt_lanes<const R: usize, const C: usize>(
        x: *const f32,
        w: *const f32,
        r0: usize,
        j0: usize,
        k8: usize,
        k: usize,
    ) -> [[[f32; 8]; C]; R] {
        let mut acc = [[[0f32; 8]; C]; R];
        // SAFETY (whole body): every offset is inside the buffers by the contract.
        unsafe {
            use std::arch::x86_64::*;
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
}

/// Runs `chunk` compiled for `kernels`' set, as [`Kernels::run`] does for
/// the engine's kernels, through this baseline's own entry points.
///
/// # Safety
/// The chunk's contract; the CPU side is what a `Kernels` proves.
unsafe fn run_chunk(kernels: Kernels, chunk: BtChunk) {
    match kernels.set() {
        // SAFETY: the caller's contract; the portable set needs no feature.
        KernelSet::Portable => unsafe { entry_portable(chunk) },
        // SAFETY: a `Kernels` holds a set only once it found every one of
        // its features on this CPU; the chunk's contract is the caller's.
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx2 => unsafe { entry_avx2(chunk) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx512 => unsafe { entry_avx512(chunk) },
        #[cfg(not(target_arch = "x86_64"))]
        set => unreachable!("{set} is never supported off x86-64"),
    }
}

/// The portable instantiation of a chunk, out of line like the others.
///
/// # Safety
/// The chunk's contract.
#[inline(never)]
unsafe fn entry_portable(chunk: BtChunk) {
    // SAFETY: the caller's contract; the portable set needs no feature.
    unsafe { chunk.run::<Portable>() }
}

/// A chunk compiled for AVX2 + FMA (`arch::avx2::entry`'s features).
///
/// # Safety
/// The CPU has AVX2 and FMA, and the chunk's contract holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn entry_avx2(chunk: BtChunk) {
    // SAFETY: the caller's contract.
    unsafe { chunk.run::<Avx2<false>>() }
}

/// A chunk compiled for AVX-512 (`arch::avx512::entry`'s features): AVX2's
/// body, whose sums are the 8 lanes this baseline promises on every set.
///
/// # Safety
/// The CPU has the AVX-512 set's features, and the chunk's contract holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn entry_avx512(chunk: BtChunk) {
    // SAFETY: the caller's contract; the set includes AVX2 and FMA.
    unsafe { chunk.run::<Avx2<false>>() }
}
