//! int8 weights times int8 activations, summed as integers.
//!
//! Each row of x is quantised on its own
//! ([`Kernels::quantize_rows`](crate::Kernels::quantize_rows)): one scale
//! per row, `sx = max|x| / 127`, `q = round(x · 127 / max|x|)` in ±127, so
//! a row's values never depend on the other rows of its batch. The weights are
//! int8 with one scale per column (`sw`), packed with four consecutive k of
//! a column in each 32-bit lane (`pack.rs`, `index` for `i8`). Then
//!
//! `out[r, j] = (Σ_k q[r, k] · w[k, j]) as f32 · (sx[r] · sw[j]) + b[j]`
//!
//! The sum is exact in i32 (at most 127 · 127 · K), so every instruction set
//! computes the same integer, whatever instructions it uses, tile it falls
//! in, block order or batch: AVX512-VNNI and AVX-VNNI (`vpdpbusd`), AVX2
//! and AVX-512 without VNNI (`vpmaddubsw` with the sign trick), and the
//! portable set. The epilogue is the same three float operations in every
//! set (no fused multiply-add), so the output is the same bits on every CPU
//! and every kernel set, and equals [`crate::reference::linear_int8`] exactly.
//!
//! Tiles: R rows x 48 columns (AVX-512: three vectors of 16 i32 sums) or
//! x 24 (eight lanes: three of 8), sums in registers over a block of k; on
//! AVX-512 one row reads four panels side by side (four streams) and two to
//! four rows two, as one to three f32 rows do (`tiles.rs`).

use std::ops::Range;

use rayon::prelude::*;

use super::{OutPtr, PANEL};
use crate::arch::{Isa, Vector, LINE};

/// Bytes of one group of four weight rows in a panel: 48 columns x 4.
const GROUP_BYTES: usize = 4 * PANEL;

/// Groups of four k per block when several row groups share a panel: 12 KiB
/// of it, which stays in L1 while every row group (and, with eight lanes,
/// both halves of the panel) uses it.
const BLOCK_GROUPS: usize = 64;

/// How far ahead of the tile, in bytes of the task's stream, the tiles of
/// three or more rows ask for weights (into L2): the arithmetic of a block
/// then takes long enough that the hardware prefetcher stops running ahead.
const PREFETCH_AHEAD: usize = 2 * BLOCK_GROUPS * GROUP_BYTES;

/// From this many rows on, the tiles prefetch.
const PREFETCH_FROM_ROWS: usize = 3;

/// Activations quantised per row for [`linear_panels`](super::linear_panels)
/// over int8 weights: `q` (M, K rounded up to 4, zeros after K), each row's
/// `scale` (M) and `Σ q` (M). Allocated once for up to `rows` rows of up to
/// `k` inputs and reused: a linear call never allocates it.
pub struct QuantScratch {
    q: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
    rows: usize,
    k: usize,
}

impl QuantScratch {
    /// Room for `rows` rows of `k` inputs; an error if it cannot be had.
    pub fn try_new(rows: usize, k: usize) -> Result<QuantScratch, std::collections::TryReserveError> {
        fn zeroed<T: Default + Clone>(n: usize) -> Result<Vec<T>, std::collections::TryReserveError> {
            let mut v = Vec::new();
            v.try_reserve_exact(n)?;
            v.resize(n, T::default());
            Ok(v)
        }
        let k4 = k.next_multiple_of(4);
        Ok(QuantScratch {
            q: zeroed(rows.saturating_mul(k4))?,
            scales: zeroed(rows)?,
            sums: zeroed(rows)?,
            rows,
            k,
        })
    }

    /// [`QuantScratch::try_new`], which panics if the memory cannot be had.
    pub fn new(rows: usize, k: usize) -> QuantScratch {
        QuantScratch::try_new(rows, k).expect("QuantScratch: out of memory")
    }

    /// Whether it holds `m` rows of `k` inputs.
    pub fn fits(&self, m: usize, k: usize) -> bool {
        m <= self.rows && m.saturating_mul(k.next_multiple_of(4)) <= self.q.len()
    }

    /// Rows and inputs it was made for.
    pub fn capacity(&self) -> (usize, usize) {
        (self.rows, self.k)
    }

    pub(super) fn parts(&mut self) -> (&mut [i8], &mut [f32], &mut [i32]) {
        (&mut self.q, &mut self.scales, &mut self.sums)
    }
}

impl crate::Kernels {
    /// Quantises each row of `x` (M, K) as the int8 products do, into `q`
    /// (M, K4: K rounded up to 4, the rest zero), `scales` (M) and `sums`
    /// (M): `scale = max|x| / 127`, `q = round(x · (127 / max|x|))` to
    /// nearest, ties to even, clamped to ±127, and `sum = Σ q`. A row of
    /// zeros has scale 0 and q 0; a row holding a NaN or an infinity has a
    /// NaN or infinite scale and q 0, so its outputs are NaN.
    ///
    /// The same IEEE operations on every kernel set (so the same bits), run
    /// on this one so that they vectorise at its width, in parallel over rows
    /// for large batches; a row's result never depends on the others.
    #[allow(clippy::too_many_arguments)]
    pub fn quantize_rows(
        self,
        q: &mut [i8],
        scales: &mut [f32],
        sums: &mut [i32],
        x: &[f32],
        m: usize,
        k: usize,
    ) {
        let kernels = self;
        let k4 = k.next_multiple_of(4);
        assert_eq!(x.len(), m * k, "quantize_rows: x is not [M={m}, K={k}]");
        assert!(
            q.len() >= m * k4 && scales.len() >= m && sums.len() >= m,
            "quantize_rows: too little room for {m} rows"
        );
        if k == 0 {
            scales[..m].fill(0.0);
            sums[..m].fill(0);
            return;
        }
        let run = |q: &mut [i8], scales: &mut [f32], sums: &mut [i32], x: &[f32]| {
            // SAFETY: quantising needs no CPU feature beyond the set's, which
            // `kernels` proves, and touches only these slices.
            unsafe {
                kernels.run(QuantizeRows {
                    q,
                    scales,
                    sums,
                    x,
                    k,
                })
            }
        };
        if m * k < 1 << 16 {
            // Under ~50 µs of work: a fork-join would cost more than it saves.
            run(&mut q[..m * k4], &mut scales[..m], &mut sums[..m], x);
            return;
        }
        const ROWS: usize = 8;
        q[..m * k4]
            .par_chunks_mut(ROWS * k4)
            .zip(scales[..m].par_chunks_mut(ROWS))
            .zip(sums[..m].par_chunks_mut(ROWS).zip(x.par_chunks(ROWS * k)))
            .for_each(|((q, s), (sum, x))| run(q, s, sum, x));
    }
}

/// Rows of [`Kernels::quantize_rows`](crate::Kernels::quantize_rows),
/// compiled for a kernel set.
struct QuantizeRows<'a> {
    q: &'a mut [i8],
    scales: &'a mut [f32],
    sums: &'a mut [i32],
    x: &'a [f32],
    k: usize,
}

impl crate::arch::Kernel for QuantizeRows<'_> {
    type Out = ();

    #[inline(always)]
    unsafe fn run<I: Isa>(self) {
        let k4 = self.q.len() / self.scales.len().max(1);
        for (((q, s), sum), x) in self
            .q
            .chunks_exact_mut(k4)
            .zip(self.scales.iter_mut())
            .zip(self.sums.iter_mut())
            .zip(self.x.chunks_exact(self.k))
        {
            (*s, *sum) = quantize_row(q, x);
        }
    }
}

/// One row of [`Kernels::quantize_rows`](crate::Kernels::quantize_rows):
/// `(scale, Σ q)`. Loops of 16 lanes without a float-to-int conversion, so
/// that they vectorise.
#[inline(always)]
fn quantize_row(q: &mut [i8], x: &[f32]) -> (f32, i32) {
    // The largest magnitude as bits: for non-negative floats the order of
    // the bits is the order of the values, and NaN's bits are above
    // infinity's, so a NaN is kept (where `f32::max` would drop it).
    let mut lanes = [0i32; 16];
    let chunks = x.chunks_exact(16);
    for &v in chunks.remainder() {
        lanes[0] = lanes[0].max((v.to_bits() & 0x7fff_ffff) as i32);
    }
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = (*l).max((v.to_bits() & 0x7fff_ffff) as i32);
        }
    }
    let absmax = f32::from_bits(lanes.into_iter().max().unwrap_or(0) as u32);
    let scale = super::int8_scale(absmax);
    q.fill(0);
    if !(absmax > 0.0 && absmax.is_finite()) {
        return (scale, 0);
    }
    let inv = 127.0 / absmax;
    // Adding 1.5 · 2²³ to a value within ±2²² rounds it to an integer, to
    // nearest even, and leaves that integer in the low bits of the sum.
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: i32 = 0x4b40_0000;
    let quant = |v: f32| ((v * inv).clamp(-127.0, 127.0) + ROUND).to_bits() as i32 - ROUND_BITS;
    let mut sums = [0i32; 16];
    let (qs, xs) = (q[..x.len()].chunks_exact_mut(16), x.chunks_exact(16));
    let (q_tail, x_tail) = (x.len() / 16 * 16, xs.remainder());
    for (qc, xc) in qs.zip(xs) {
        for ((d, &v), s) in qc.iter_mut().zip(xc).zip(sums.iter_mut()) {
            let r = quant(v);
            *d = r as i8;
            *s += r;
        }
    }
    for (d, &v) in q[q_tail..].iter_mut().zip(x_tail) {
        let r = quant(v);
        *d = r as i8;
        sums[0] += r;
    }
    (scale, sums.iter().sum())
}

/// One int8 call's operands, as every tile of its tasks sees them.
pub(super) struct Operands<'a> {
    /// `out[M, N]`: each task writes the integer sums of its columns there
    /// (as i32), then replaces them with the finished values.
    pub out: OutPtr,
    /// The quantised activations `q[M, K4]`, their scales and sums.
    pub q: &'a [i8],
    pub sx: &'a [f32],
    pub sums: &'a [i32],
    /// The weights in int8 panels, `K4` rows each, and their column scales.
    pub w: &'a [i8],
    pub sw: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub m: usize,
    pub k4: usize,
    pub n: usize,
}

/// How a row count is cut into tiles on set `I`.
struct Shape {
    /// Most rows per tile.
    rows: usize,
    /// Vectors of sums per row and panel: 3 (48 columns with 16 lanes, 24
    /// with 8) or 6 (48 with 8 lanes, one row only).
    vectors: usize,
    /// Panels read side by side: 1, 2 or 4 streams.
    streams: usize,
}

fn shape<I: Isa>(m: usize) -> Shape {
    let (wide, vnni) = (I::V::LANES == 16, I::OFFSET != 0);
    let shape = |rows, vectors, streams| Shape {
        rows,
        vectors,
        streams,
    };
    match (wide, vnni, m) {
        // 32 registers, VNNI: one row reads 4 panels at once (12 sums, 12
        // weight vectors), up to 4 rows 2 panels (24 sums, 6 weight
        // vectors), more rows 8 x 3 vectors.
        (true, true, 1) => shape(1, 3, 4),
        (true, true, 2..=4) => shape(m, 3, 2),
        (true, true, _) => shape(8, 3, 1),
        // The sign trick's temporaries take 5 more: 2 rows x 2 panels, or 6
        // rows x 3 vectors.
        (true, false, 1..=2) => shape(m, 3, 2),
        (true, false, _) => shape(6, 3, 1),
        // 16 registers: one row takes two whole panels side by side (12
        // sums; with the sign trick's temporaries LLVM keeps some of them on
        // the stack, and it is still 0.71x the time of one panel, 0.83-0.90x
        // with VNNI); more rows half a panel at a time, 3 rows with VNNI's
        // one instruction per product (9 sums), 2 with the sign trick's
        // temporaries (6 sums).
        (false, _, 1) => shape(1, 6, 2),
        (false, _, _) => shape(if vnni { 3 } else { 2 }, 3, 1),
    }
}

/// `out[.., cols]` for all M rows: the integer sums of the task's columns,
/// then the epilogue. The work of one task.
///
/// # Safety
/// The CPU has `I`; no other thread touches columns `cols` of `out`; `cols`
/// within `0..N`, `cols.start` a multiple of [`PANEL`]; the operands'
/// lengths as [`Operands`] says.
#[inline(always)]
pub(super) unsafe fn linear_block<I: Isa>(op: &Operands, cols: Range<usize>) {
    let s = shape::<I>(op.m);
    let full = cols.start + (cols.end - cols.start) / PANEL * PANEL;
    let panels = (full - cols.start) / PANEL;
    let col = |i: usize| cols.start + i * PANEL;
    // SAFETY (every call): whole panels within `cols`, owned by this task.
    unsafe {
        // Run t of the streams is panels t·q .. (t+1)·q, read side by side;
        // the panels past S·q one at a time.
        let q = panels / s.streams;
        for i in 0..q {
            let mut js = [col(i); 4];
            for (t, j) in js.iter_mut().enumerate().take(s.streams) {
                *j = col(t * q + i);
            }
            panel_rows::<I>(op, &s, &js[..s.streams]);
        }
        for i in s.streams * q..panels {
            panel_rows::<I>(op, &s, &[col(i)]);
        }
        if full < cols.end {
            edge_panel::<I>(op, &s, full, cols.end - full);
        }
    }
    // The epilogue, the same operations on every set: `out = (Σ - OFFSET ·
    // Σ q) · (sx · sw) + b` (no fused multiply-add, so the same bits).
    let cols_n = cols.len();
    for r in 0..op.m {
        let (sx, off) = (op.sx[r], I::OFFSET * op.sums[r]);
        // SAFETY: row r < M, columns `cols` are this task's; each slot holds
        // the i32 the tiles stored, read back as its bits.
        let row = unsafe { std::slice::from_raw_parts_mut(op.out.get().add(r * op.n + cols.start), cols_n) };
        let sw = &op.sw[cols.clone()];
        match op.bias {
            Some(b) => {
                for ((o, &w), &b) in row.iter_mut().zip(sw).zip(&b[cols.clone()]) {
                    *o = (o.to_bits() as i32 - off) as f32 * (sx * w) + b;
                }
            }
            None => {
                for (o, &w) in row.iter_mut().zip(sw) {
                    *o = (o.to_bits() as i32 - off) as f32 * (sx * w) + 0.0;
                }
            }
        }
    }
}

/// The row groups `(first row, rows)` of M rows, at most `max` each, spread
/// evenly (13 rows in groups of at most 8: 7 and 6).
fn row_groups(m: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let groups = m.div_ceil(max.max(1));
    (0..groups).map(move |g| {
        let (r0, r1) = (g * m / groups, (g + 1) * m / groups);
        (r0, r1 - r0)
    })
}

/// The integer sums of whole panels `js` (one, or 2 or 4 read side by side)
/// for every row: row groups inside blocks of k when there are several
/// groups (the block stays in L1 for all of them), else one pass over all
/// of K.
///
/// # Safety
/// As [`linear_block`], every panel in `js` whole and owned by this task.
#[inline(always)]
unsafe fn panel_rows<I: Isa>(op: &Operands, s: &Shape, js: &[usize]) {
    let groups = op.k4 / 4;
    let halves = PANEL / (s.vectors * I::V::LANES);
    let several = op.m > s.rows || halves > 1;
    let block = if several { BLOCK_GROUPS } else { groups.max(1) };
    let prefetch = op.m >= PREFETCH_FROM_ROWS;
    let out = op.out.get().cast::<i32>();
    for g0 in (0..groups).step_by(block.max(1)) {
        let gs = g0..(g0 + block).min(groups);
        for (gi, (r0, rows)) in row_groups(op.m, s.rows).enumerate() {
            for h in 0..halves {
                let c0 = h * s.vectors * I::V::LANES;
                let (mut dst, mut w) = ([out; 4], [op.w.as_ptr(); 4]);
                for (t, &j) in js.iter().enumerate() {
                    dst[t] = out.wrapping_add(r0 * op.n + j + c0);
                    w[t] = op.w.as_ptr().wrapping_add(j / PANEL * op.k4 * PANEL + 4 * c0);
                }
                let tile = Tile {
                    dst,
                    ld: op.n,
                    x: op.q[r0 * op.k4..].as_ptr(),
                    k4: op.k4,
                    w,
                    gs: gs.clone(),
                    first: g0 == 0,
                    ahead: if prefetch && gi == 0 { PREFETCH_AHEAD } else { 0 },
                };
                // SAFETY: rows r0..r0+rows < M; the panels' columns
                // c0..c0+vectors·L of every row, owned by this task; groups
                // within the panels' K4 / 4.
                unsafe { tile_any::<I>(&tile, rows, s.vectors, js.len()) };
            }
        }
    }
}

/// The partial panel at the right edge (`width` < 48 columns from `j`):
/// each row group's sums over all of K into a 48-column buffer (the packed
/// panel is zero past N), then the valid columns copied out.
///
/// # Safety
/// As [`linear_block`], the panel at `j` the task's last, partial one.
#[inline(always)]
unsafe fn edge_panel<I: Isa>(op: &Operands, s: &Shape, j: usize, width: usize) {
    let groups = op.k4 / 4;
    let halves = PANEL / (s.vectors * I::V::LANES);
    let rows_max = s.rows;
    let mut buf = [0i32; 8 * PANEL];
    let out = op.out.get().cast::<i32>();
    for (r0, rows) in row_groups(op.m, rows_max) {
        for h in 0..halves {
            let c0 = h * s.vectors * I::V::LANES;
            let tile = Tile {
                dst: [buf.as_mut_ptr().wrapping_add(c0); 4],
                ld: PANEL,
                x: op.q[r0 * op.k4..].as_ptr(),
                k4: op.k4,
                w: [op.w.as_ptr().wrapping_add(j / PANEL * op.k4 * PANEL + 4 * c0); 4],
                gs: 0..groups,
                first: true,
                ahead: 0,
            };
            // SAFETY: `buf` holds 8 rows of 48; the panel is whole in memory
            // (zero past N); rows r0..r0+rows < M.
            unsafe { tile_any::<I>(&tile, rows, s.vectors, 1) };
        }
        for r in 0..rows {
            for c in 0..width {
                // SAFETY: row r0 + r < M, column j + c < N, owned by this task.
                unsafe { out.add((r0 + r) * op.n + j + c).write(buf[r * PANEL + c]) };
            }
        }
    }
}

/// One tile call: rows `x..` (row r at `x + r·k4`), panels `w` (one or two)
/// starting at this tile's first column, their sums at `dst` (row r at
/// `dst + r·ld`), over groups `gs` of four k.
struct Tile {
    dst: [*mut i32; 4],
    ld: usize,
    x: *const i8,
    k4: usize,
    w: [*const i8; 4],
    gs: Range<usize>,
    /// Whether the sums start from zero (else from `dst`).
    first: bool,
    /// Bytes ahead of the weights to prefetch (0: none).
    ahead: usize,
}

/// [`tile`] with its shape as constants: only the shapes [`shape`] gives
/// this set are instantiated.
///
/// # Safety
/// As [`tile`].
#[inline(always)]
unsafe fn tile_any<I: Isa>(t: &Tile, rows: usize, vectors: usize, panels: usize) {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        if I::V::LANES == 8 {
            return match (vectors, rows) {
                (6, _) if panels == 2 => tile::<I, 1, 6, 2>(t),
                (6, _) => tile::<I, 1, 6, 1>(t),
                (_, 1) => tile::<I, 1, 3, 1>(t),
                (_, 2) => tile::<I, 2, 3, 1>(t),
                _ => tile::<I, 3, 3, 1>(t),
            };
        }
        match (panels, rows) {
            (4, _) => tile::<I, 1, 3, 4>(t),
            (2, 1) => tile::<I, 1, 3, 2>(t),
            (2, 2) => tile::<I, 2, 3, 2>(t),
            (2, 3) => tile::<I, 3, 3, 2>(t),
            (2, _) => tile::<I, 4, 3, 2>(t),
            (_, 1) => tile::<I, 1, 3, 1>(t),
            (_, 2) => tile::<I, 2, 3, 1>(t),
            (_, 3) => tile::<I, 3, 3, 1>(t),
            (_, 4) => tile::<I, 4, 3, 1>(t),
            (_, 5) => tile::<I, 5, 3, 1>(t),
            (_, 6) => tile::<I, 6, 3, 1>(t),
            (_, 7) => tile::<I, 7, 3, 1>(t),
            _ => tile::<I, 8, 3, 1>(t),
        }
    }
}

/// `dst[r][p] (+)= Σ_{g in gs} Σ_i w_p[g][.., i] · x[r, 4g + i]` for R rows,
/// P panels and NV vectors of lanes: R x P x NV registers of sums, each
/// group's weight vectors loaded once for all R rows, each row's four
/// activations broadcast once for all P x NV vectors.
///
/// # Safety
/// The CPU has `I`; `x` valid for R rows of `k4` bytes, each `w[p]` for
/// `gs.end` groups of [`GROUP_BYTES`] from this tile's first column, each
/// `dst[p]` for R rows of `NV·L` i32 at stride `ld`, written by no other
/// thread.
#[inline(always)]
unsafe fn tile<I: Isa, const R: usize, const NV: usize, const P: usize>(t: &Tile) {
    let l = I::V::LANES;
    // SAFETY (whole body): every offset is inside the buffers by the contract.
    unsafe {
        let mut acc = [[[I::sums_zero(); NV]; P]; R];
        if !t.first {
            for (r, a) in acc.iter_mut().enumerate() {
                for (p, ap) in a.iter_mut().enumerate() {
                    for (v, s) in ap.iter_mut().enumerate() {
                        *s = I::sums_load(t.dst[p].add(r * t.ld + v * l));
                    }
                }
            }
        }
        // Two groups per iteration, unrolled by hand so that a build for
        // baseline x86-64 loops as tightly as one tuned for the host CPU.
        let mut g = t.gs.start;
        while g + 2 <= t.gs.end {
            group::<I, R, NV, P>(&mut acc, t, g);
            group::<I, R, NV, P>(&mut acc, t, g + 1);
            g += 2;
        }
        if g < t.gs.end {
            group::<I, R, NV, P>(&mut acc, t, g);
        }
        for (r, a) in acc.iter().enumerate() {
            for (p, ap) in a.iter().enumerate().take(P) {
                for (v, s) in ap.iter().enumerate() {
                    I::sums_store(*s, t.dst[p].add(r * t.ld + v * l));
                }
            }
        }
    }
}

/// One group of four k of [`tile`]: each weight vector loaded once for all
/// R rows, each row's four activations broadcast once for its P x NV sums.
///
/// # Safety
/// As [`tile`], `g` within its groups.
#[inline(always)]
unsafe fn group<I: Isa, const R: usize, const NV: usize, const P: usize>(
    acc: &mut [[[I::Sums; NV]; P]; R],
    t: &Tile,
    g: usize,
) {
    let l = I::V::LANES;
    // SAFETY (whole body): in bounds by the caller's contract.
    unsafe {
        // Plain loops, no closures: a closure is not compiled with the entry
        // point's target features, so its intrinsics would become calls.
        let mut wv = [[I::quads_zero(); NV]; P];
        for (p, wp) in wv.iter_mut().enumerate() {
            let wg = t.w[p].add(g * GROUP_BYTES);
            if t.ahead != 0 {
                for i in 0..(NV * 4 * l).div_ceil(LINE) {
                    I::V::prefetch(wg.wrapping_add(t.ahead + i * LINE).cast());
                }
            }
            for (v, reg) in wp.iter_mut().enumerate() {
                *reg = I::weights4(wg.add(4 * l * v));
            }
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = I::splat4(t.x.add(r * t.k4 + 4 * g));
            for (ap, wp) in a.iter_mut().zip(&wv) {
                for (s, w) in ap.iter_mut().zip(wp) {
                    *s = I::dot4(*s, *w, xv);
                }
            }
        }
    }
}
