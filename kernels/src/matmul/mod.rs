//! Matrix products: the hot path. Almost all of a forward pass is spent here.
//!
//! GPT-2 stores its Conv1D weights as `[K, N]` (input-major), so a linear layer
//! is `out[M,N] = x[M,K] · w[K,N] + bias[N]`. The engine packs every such
//! weight once, at load, into column panels ([`pack_panels`]): 48 columns of
//! all K rows, contiguous, so that a kernel streams one run of memory per
//! panel instead of 48 floats per row at a stride of N. The LM head multiplies
//! by the token embedding `wte[V, C]`, i.e. by `w[K=C, N=V]` transposed; it is
//! packed from the transpose ([`pack_panels_t`]) and runs through the same
//! [`linear_packed`].
//!
//! One kernel serves every row count, from decode (M = 1, bound by memory
//! bandwidth: every weight is read once per token) through batched decode to
//! prefill (M in the hundreds, bound by FMA throughput): register tiles of
//! R rows x W columns, with the weights streamed strictly in memory order.
//!
//! **Every output element is computed with the same sequence of roundings
//! whatever M, the tile it falls in, or the number of threads.** A row's
//! result therefore does not depend on which other rows share its batch, so
//! continuous batching gives bit-for-bit the logits (and tokens) of a request
//! run alone, on any pool size. This is why the engine does not use
//! `matrixmultiply` (kept as [`linear_sgemm`] for comparison in the benches):
//! its blocking, and so its rounding, differs from ours.
//!
//! Where things are:
//! - `pack.rs`: the panel layout ([`PANEL`], [`pack_panels`],
//!   [`pack_panels_t`], [`unpack_column`]), built once at load.
//! - here: [`linear_packed`], the engine's kernel, and the split of a call
//!   into one task per thread.
//! - `tiles.rs`: what one task does: tile shapes by row count, block lengths,
//!   the order the weights are read in, software prefetch; `bodies.rs`: the
//!   tiles' innermost loops; `int8.rs`: the int8 products.
//! - `baselines/`: what the engine does not call and the benches compare:
//!   [`linear`] (the stored layout, through the same tiles: same results bit
//!   for bit, slower from memory), [`matmul_bt`] (dot products over `wte` as
//!   stored, with its own per-set code), [`linear_sgemm`] (`matrixmultiply`),
//!   [`dot`].
//! - `crate::arch`: the instruction-set seam the loops are written over, one
//!   module per set.
//!
//! What each choice measured: `docs/hot-path.md`.

mod baselines;
mod bodies;
mod int8;
mod pack;
mod tiles;

pub use baselines::{dot, linear, linear_sgemm, matmul_bt};
pub use int8::QuantScratch;
pub use pack::{
    int8_scale, pack, pack_panels, pack_panels_t, pack_t, packed_bytes, packed_len, to_bf16, to_int8,
    unpack_column, Panels, PanelsMut, PANEL,
};

use rayon::prelude::*;

use crate::arch::{Isa, Kernel, Widen};
use crate::{active, Kernels};

/// `out[M,N] = x[M,K] · w[K,N] + bias[N]`, with `w` packed in panels by
/// [`pack_panels`] (or [`pack_panels_t`]). Overwrites `out`. On the
/// [`active`] kernel set; [`Kernels::linear_packed`] on a
/// given one.
///
/// Most of the running time of a forward pass is spent here: every linear
/// layer of every block, and the LM head. Shapes: `x` is `[M, K]`, `panels`
/// is `packed_len(K, N)` floats, `bias` is `[N]`, or `None` for zeros (the
/// LM head has none), `out` is `[M, N]`. The result equals
/// [`reference::linear`](crate::reference::linear) (within f32 rounding) and
/// [`linear`] over the stored layout bit for bit, on the same kernel set:
/// each output is the bias plus its K products added in order of k, one
/// multiply-add at a time (fused, but for the portable set).
///
/// Why tiled: each thread takes a run of whole panels, one stretch of memory
/// read front to back, and computes it in register tiles of up to 6 rows x
/// 16-48 columns (8 x 48 with AVX-512), so that each weight loaded serves
/// every row of its tile (decode streams at memory bandwidth) and each row's
/// broadcast serves the tile's columns (prefill runs near FMA peak); see
/// `tiles.rs`.
pub fn linear_packed(
    out: &mut [f32],
    x: &[f32],
    panels: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    active().linear_packed(out, x, panels, bias, m, k, n)
}

/// [`linear_packed`] over panels in any [`Dtype`](crate::Dtype), and the
/// contract is the same in every format: a row's result does not depend on
/// the other rows or the pool size. bf16 weights are widened to f32 exactly
/// as they are loaded and the products added as in f32. Int8 quantises each
/// row of x to int8 ([`Kernels::quantize_rows`]: one scale per row, from
/// that row alone) and sums the products as integers, exactly, then `out = (Σ q·w) ·
/// (sx · sw) + b` (`int8.rs`): the same bits on every kernel set, equal to
/// [`reference::linear_int8`](crate::reference::linear_int8). On the
/// [`active`] kernel set; [`Kernels::linear_panels`] on a
/// given one. Int8 allocates its quantised rows per call here; the engine
/// calls [`linear_panels_with`], which reuses them.
pub fn linear_panels(
    out: &mut [f32],
    x: &[f32],
    w: Panels,
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    active().linear_panels(out, x, w, bias, m, k, n)
}

/// [`linear_panels`] with the int8 activations quantised into `quant`
/// (which must hold M rows of K; unused by f32 and bf16), so that a call
/// allocates nothing.
#[allow(clippy::too_many_arguments)]
pub fn linear_panels_with(
    out: &mut [f32],
    x: &[f32],
    w: Panels,
    bias: Option<&[f32]>,
    quant: &mut QuantScratch,
    m: usize,
    k: usize,
    n: usize,
) {
    active().linear_panels_with(out, x, w, bias, quant, m, k, n)
}

impl Kernels {
    /// [`linear_packed`] on this kernel set.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_packed(
        self,
        out: &mut [f32],
        x: &[f32],
        panels: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        assert_eq!(
            panels.len(),
            packed_len(k, n),
            "linear_packed: w is not [K={k}, N={n}] packed in panels"
        );
        self.linear_panels(out, x, Panels::F32(panels), bias, m, k, n);
    }

    /// [`linear_panels`] on this kernel set.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_panels(
        self,
        out: &mut [f32],
        x: &[f32],
        w: Panels,
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        let rows = if w.dtype() == crate::Dtype::Int8 { m } else { 0 };
        let mut quant = QuantScratch::new(rows, k);
        self.linear_panels_with(out, x, w, bias, &mut quant, m, k, n)
    }

    /// [`linear_panels_with`] on this kernel set.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_panels_with(
        self,
        out: &mut [f32],
        x: &[f32],
        w: Panels,
        bias: Option<&[f32]>,
        quant: &mut QuantScratch,
        m: usize,
        k: usize,
        n: usize,
    ) {
        let len = match w {
            Panels::F32(p) => p.len(),
            Panels::Bf16(p) => p.len(),
            Panels::Int8 { q, scales } => {
                assert_eq!(
                    scales.len(),
                    n.div_ceil(PANEL) * PANEL,
                    "linear: int8 scales are not [N={n}] in panels"
                );
                q.len()
            }
        };
        assert_eq!(
            len,
            pack::panel_values(w.dtype(), k, n),
            "linear: {} w is not [K={k}, N={n}] packed in panels",
            w.dtype()
        );
        match w {
            Panels::F32(p) => linear_impl(self, out, x, p, Layout::Panels, bias, m, k, n),
            Panels::Bf16(p) => linear_impl(self, out, x, p, Layout::Panels, bias, m, k, n),
            Panels::Int8 { q, scales } => linear_int8(self, out, x, q, scales, bias, quant, m, k, n),
        }
    }
}

/// How a `[K, N]` weight is laid out in memory.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Row-major, as stored: `w[k, j]` at `k·N + j`.
    Rows,
    /// Column panels ([`pack_panels`]): `w[k, j]` at `(j/48·K + k)·48 + j%48`.
    Panels,
}

impl Layout {
    /// `(offset, stride)`: `w[k, j]` is at `offset + k·stride`.
    #[inline(always)]
    fn col(self, j: usize, k: usize, n: usize) -> (usize, usize) {
        match self {
            Layout::Rows => (j, n),
            Layout::Panels => (j / PANEL * k * PANEL + j % PANEL, PANEL),
        }
    }
}

/// A raw output pointer that rayon tasks may share. Each task writes a
/// disjoint set of elements, which is what makes sharing it sound.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the pointer is only dereferenced at indices that exactly one task
// owns (disjoint column ranges or disjoint buffers), and the buffer outlives
// the parallel region.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Splits `n` columns into at most `parts` contiguous chunks, each a multiple
/// of `align` wide (the last may be narrower): `(count, width)`; chunk `i`
/// is `i * width .. min((i + 1) * width, n)`. No allocation.
fn column_chunks(n: usize, align: usize, parts: usize) -> (usize, usize) {
    let width = n.div_ceil(parts.max(1)).div_ceil(align).max(1) * align;
    (n.div_ceil(width), width)
}

/// [`linear_panels`] (f32, bf16) and [`linear`] on `kernels`: `out = bias`,
/// then one task per thread adds `x · w` into its columns.
#[allow(clippy::too_many_arguments)]
fn linear_impl<E: Widen>(
    kernels: Kernels,
    out: &mut [f32],
    x: &[f32],
    w: &[E],
    layout: Layout,
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(out.len(), m * n, "linear: out is not [M={m}, N={n}]");
    assert_eq!(x.len(), m * k, "linear: x is not [M={m}, K={k}]");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "linear: bias is not [N={n}]");
    }
    if m == 0 || n == 0 {
        return;
    }
    for row in out.chunks_exact_mut(n) {
        match bias {
            Some(bias) => row.copy_from_slice(bias),
            None => row.fill(0.0),
        }
    }
    // One task per thread, each a run of whole panels: in the packed layout
    // that is one contiguous stretch of memory, read front to back.
    let op = tiles::Operands {
        out: OutPtr(out.as_mut_ptr()),
        x,
        w,
        layout,
        m,
        k,
        n,
    };
    // One to three rows stream their weights (`tiles::rows_streams`), and
    // there the AVX2 instantiation reads faster than AVX-512's on the
    // AVX-512 CPUs measured (docs/hot-path.md): every output is the same
    // sum of the same fused products in either, so the choice changes no
    // bit.
    let kernels = match kernels.set() {
        crate::KernelSet::Avx512 if layout == Layout::Panels && m <= tiles::ROWS_TWO_STREAMS => {
            kernels.with_set(crate::KernelSet::Avx2)
        }
        _ => kernels,
    };
    for_each_task(n, |cols| {
        // SAFETY: tasks own disjoint column ranges of `out`, each starting
        // a whole panel (the task's contract).
        unsafe { kernels.run(LinearTask { op: &op, cols }) };
    });
}

/// Runs `task(cols)` in parallel for runs of whole panels of `0..n`, one
/// run per thread of the current pool: in the packed layout each is one
/// contiguous stretch of memory, read front to back.
fn for_each_task(n: usize, task: impl Fn(std::ops::Range<usize>) + Sync) {
    let (count, width) = column_chunks(n, PANEL, rayon::current_num_threads());
    (0..count).into_par_iter().for_each(|t| {
        let j0 = t * width;
        task(j0..(j0 + width).min(n));
    });
}

/// One task of [`linear_impl`]: its columns' products.
///
/// Contract: no other task touches columns `cols` of `op.out`, which lie
/// within `0..N` and start a panel.
struct LinearTask<'a, 'b, E> {
    op: &'a tiles::Operands<'b, E>,
    cols: std::ops::Range<usize>,
}

impl<E: Widen> Kernel for LinearTask<'_, '_, E> {
    type Out = ();

    #[inline(always)]
    unsafe fn run<I: Isa>(self) {
        // SAFETY: the task's contract, and the CPU has I (`run`'s own).
        unsafe { tiles::linear_block::<I, E>(self.op, self.cols) };
    }
}

/// [`linear_panels_with`] over int8 panels on `kernels`: each row of x
/// quantised into `quant`, then one task per thread computes its columns'
/// integer sums and finishes them (`int8.rs`).
#[allow(clippy::too_many_arguments)]
fn linear_int8(
    kernels: Kernels,
    out: &mut [f32],
    x: &[f32],
    w: &[i8],
    sw: &[f32],
    bias: Option<&[f32]>,
    quant: &mut QuantScratch,
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(out.len(), m * n, "linear: out is not [M={m}, N={n}]");
    assert_eq!(x.len(), m * k, "linear: x is not [M={m}, K={k}]");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "linear: bias is not [N={n}]");
    }
    assert!(
        quant.fits(m, k),
        "linear: the int8 scratch does not hold [M={m}, K={k}]"
    );
    // Σ (w + 128)·x, the VNNI form, stays within i32 up to this K.
    assert!(k <= 1 << 16, "linear: int8 K={k} is past 65536");
    if m == 0 || n == 0 {
        return;
    }
    let (q, sx, sums) = quant.parts();
    kernels.quantize_rows(q, sx, sums, x, m, k);
    let op = int8::Operands {
        out: OutPtr(out.as_mut_ptr()),
        q,
        sx,
        sums,
        w,
        sw,
        bias,
        m,
        k4: k.next_multiple_of(4),
        n,
    };
    for_each_task(n, |cols| {
        // SAFETY: tasks own disjoint column ranges of `out`, each starting
        // a whole panel (the task's contract).
        unsafe { kernels.run_int8(Int8Task { op: &op, cols }) };
    });
}

/// One task of [`linear_int8`]. Contract: no other task touches columns
/// `cols` of `op.out`, which lie within `0..N` and start a panel.
struct Int8Task<'a, 'b> {
    op: &'a int8::Operands<'b>,
    cols: std::ops::Range<usize>,
}

impl Kernel for Int8Task<'_, '_> {
    type Out = ();

    #[inline(always)]
    unsafe fn run<I: Isa>(self) {
        // SAFETY: the task's contract, and the CPU has I (`run`'s own).
        unsafe { int8::linear_block::<I>(self.op, self.cols) };
    }
}
