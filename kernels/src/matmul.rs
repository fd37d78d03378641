//! Matrix products: the hot path. Almost all of a forward pass is spent here.
//!
//! GPT-2 stores its Conv1D weights as `[K, N]` (input-major), so a linear layer
//! is `out[M,N] = x[M,K] · w[K,N] + bias[N]`. The engine packs every such
//! weight once, at load, into column panels ([`pack_panels`]): 48 columns of
//! all K rows, contiguous, so that a kernel streams one run of memory per
//! panel instead of 48 floats per row at a stride of N. The LM head multiplies
//! by the token embedding `wte[V, C]`, i.e. by `w[K=C, N=V]` transposed; it is
//! packed from the transpose ([`pack_panels_t`]) and runs through the same
//! [`linear_packed`]. [`linear`] reads the stored layout (same results, bit
//! for bit, slower from memory); [`matmul_bt`] is the dot-product form over
//! `wte` as stored. Neither is used by the engine: the benches compare them.
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
//! `matrixmultiply` (kept here as [`linear_sgemm`] for comparison in the
//! benches): its blocking, and so its rounding, differs from ours.

use rayon::prelude::*;

/// Accumulator width of the hand-vectorised loops: 16 f32 is two AVX2 or one
/// AVX-512 register. LLVM keeps `[f32; LANES]` arithmetic in vector registers.
const LANES: usize = 16;

/// `a * b + c`, as one fused instruction where the CPU has FMA (compiled with
/// `target-cpu=native`); plain multiply-add otherwise, since a software `fma`
/// call would be far slower than the rounding difference is worth.
#[inline(always)]
pub(crate) fn fmadd(a: f32, b: f32, c: f32) -> f32 {
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

/// `out[M,N] = x[M,K] · w[K,N] + bias[N]`: a linear layer with the weight in
/// GPT-2's stored `[in, out]` layout. Overwrites `out`.
///
/// Each output is the bias plus the K products added in order of k, one
/// fused multiply-add at a time; tasks own column chunks. Over the stored
/// layout a task reads a slice of every weight row: many short runs.
pub fn linear(out: &mut [f32], x: &[f32], w: &[f32], bias: &[f32], m: usize, k: usize, n: usize) {
    assert_eq!(w.len(), k * n, "linear: w is not [K={k}, N={n}]");
    linear_impl(out, x, w, Layout::Rows, Some(bias), m, k, n);
}

/// Floats in a 64-byte cache line.
const LINE: usize = 16;

/// How many panel blocks ahead a few-row kernel prefetches (see `linear_block`).
const PREFETCH_BLOCKS: usize = 2;

/// Width of the column panels of [`pack_panels`]: a multiple of every tile
/// width (48, 24, 16), so that a tile never straddles two panels.
pub const PANEL: usize = 48;

/// Floats in the packed form of a `[K, N]` weight: N rounded up to whole panels.
pub fn packed_len(k: usize, n: usize) -> usize {
    n.div_ceil(PANEL) * PANEL * k
}

/// Packs `w[K, N]` into column panels for [`linear_packed`]: panel `p` holds
/// columns `p·48 .. p·48 + 48` of rows `0..K`, row after row, so
/// `dst[(p·K + k)·48 + c] = w[k, p·48 + c]`, and zero past column N.
///
/// Done once at load. The stored layout makes a kernel read 48 floats of one
/// row, then jump N floats to the next: many short streams, which the
/// prefetcher follows poorly. Packed, every task reads one contiguous run per
/// panel. The values and the order of the sums are unchanged, so
/// [`linear_packed`] returns exactly what [`linear`] does.
pub fn pack_panels(dst: &mut [f32], w: &[f32], k: usize, n: usize) {
    assert_eq!(w.len(), k * n, "pack_panels: w is not [K={k}, N={n}]");
    assert_eq!(
        dst.len(),
        packed_len(k, n),
        "pack_panels: dst is not {} floats",
        packed_len(k, n)
    );
    if n == 0 || k == 0 {
        return;
    }
    dst.par_chunks_mut(k * PANEL).enumerate().for_each(|(p, panel)| {
        let (j0, j1) = (p * PANEL, ((p + 1) * PANEL).min(n));
        for (kk, row) in panel.chunks_exact_mut(PANEL).enumerate() {
            row[..j1 - j0].copy_from_slice(&w[kk * n + j0..kk * n + j1]);
            row[j1 - j0..].fill(0.0);
        }
    });
}

/// [`pack_panels`] from the transpose: `wt` is `w` stored `[N, K]` (the
/// token embedding `wte[V, C]` that GPT-2's LM head multiplies by), and `dst`
/// receives the panels of `w[K, N]`. Each panel gathers 48 rows of `wt`.
pub fn pack_panels_t(dst: &mut [f32], wt: &[f32], k: usize, n: usize) {
    assert_eq!(wt.len(), n * k, "pack_panels_t: wt is not [N={n}, K={k}]");
    assert_eq!(
        dst.len(),
        packed_len(k, n),
        "pack_panels_t: dst is not {} floats",
        packed_len(k, n)
    );
    if n == 0 || k == 0 {
        return;
    }
    dst.par_chunks_mut(k * PANEL).enumerate().for_each(|(p, panel)| {
        panel.fill(0.0);
        for c in 0..PANEL.min(n - p * PANEL) {
            let src = &wt[(p * PANEL + c) * k..][..k];
            for (kk, &v) in src.iter().enumerate() {
                panel[kk * PANEL + c] = v;
            }
        }
    });
}

/// Column `j` of a `[K, N]` weight packed by [`pack_panels`] (row `j` of the
/// `[N, K]` matrix packed by [`pack_panels_t`]) into `dst[K]`: exact copies.
/// GPT-2 reads its token embeddings this way from the packed LM head.
pub fn unpack_column(dst: &mut [f32], panels: &[f32], k: usize, j: usize) {
    assert_eq!(dst.len(), k, "unpack_column: dst is not [K={k}]");
    let base = j / PANEL * k * PANEL + j % PANEL;
    assert!(
        k == 0 || base + (k - 1) * PANEL < panels.len(),
        "unpack_column: column {j} is past the panels"
    );
    for (kk, d) in dst.iter_mut().enumerate() {
        *d = panels[base + kk * PANEL];
    }
}

/// [`linear`] with the weight packed by [`pack_panels`]: the same result,
/// bit for bit, read from memory in order.
/// `bias: None` is a bias of zeros (the LM head has none).
pub fn linear_packed(
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
    linear_impl(out, x, panels, Layout::Panels, bias, m, k, n);
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

#[allow(clippy::too_many_arguments)]
fn linear_impl(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
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
    // that is one contiguous stretch of memory, read front to back. (Cutting
    // K in halves instead, with the halves' sums added at the end, measured
    // the same within +-5% at 1-8 rows from huge pages, and needs a buffer
    // and an extra pass over the output.)
    let out_ptr = OutPtr(out.as_mut_ptr());
    let (count, width) = column_chunks(n, PANEL, rayon::current_num_threads());
    (0..count).into_par_iter().for_each(|t| {
        let j0 = t * width;
        // SAFETY: tasks own disjoint column ranges of `out`.
        unsafe { linear_block(out_ptr, x, w, layout, m, k, n, j0..(j0 + width).min(n)) };
    });
}

/// Most rows that [`rows_two_streams`] takes.
const ROWS_TWO_STREAMS: usize = 3;

/// Weight rows per block when several rows take turns in
/// [`rows_two_streams`]: two panels' blocks (24 KiB) stay in L1 for the
/// second and third rows.
const TWO_STREAM_BLOCK: usize = 64;

/// [`linear_block`] for one to three rows over panels: the task's whole
/// panels read as two streams at once (panel i of the first half beside
/// panel i of the second), then any partial panel. One row takes all K rows
/// of a pair in one pass; two or three rows take blocks of
/// [`TWO_STREAM_BLOCK`] weight rows, row after row, the first reading the
/// pair's block from memory and the others from L1.
///
/// One row through two streams took 0.82-0.95x the time of one stream (LM
/// head 0.92x; 200 alternating calls per GPT-2 shape, 2 threads, weights
/// from memory), and one-row decode steps 0.91-0.95x (31 alternating steps
/// at 8-200 positions): one stream at a time, it seems, keeps too few lines
/// in flight. Two rows took 0.90-0.96x the time of 2 x 48 tiles over one
/// stream, three rows 0.88-0.99x the 4 x 24 tiles (300 alternating calls,
/// all but one of ten shape runs), and 2- and 3-row decode steps 0.89-0.98x
/// (31 alternating steps at 8-200 positions); four rows gained nothing
/// (0.94-1.07x), eight rows lost. Interleaving two panels block by block
/// (2-16 rows, same tiles) changed
/// nothing: the streams must be read in the same loop. Two streams need 12
/// accumulators, all the registers hold. Each output is the same sum in the
/// same order as through [`tile`]: results are unchanged.
///
/// # Safety
/// As [`linear_block`], with `m <= ROWS_TWO_STREAMS` and `w` in panels.
unsafe fn rows_two_streams(
    out: OutPtr,
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    cols: std::ops::Range<usize>,
) {
    debug_assert!((1..=ROWS_TWO_STREAMS).contains(&m));
    let panels = (cols.end - cols.start) / PANEL;
    let full = cols.start + panels * PANEL;
    // Panel i pairs with panel `second + i`; an odd one out runs alone.
    let second = panels.div_ceil(2);
    let col = |i: usize| cols.start + i * PANEL;
    let off = |j: usize| Layout::Panels.col(j, k, n).0;
    let kb = if m == 1 { k.max(1) } else { TWO_STREAM_BLOCK };
    let blocks = || (0..k).step_by(kb).map(|k0| k0..(k0 + kb).min(k));
    for i in 0..panels / 2 {
        let (ja, jb) = (col(i), col(second + i));
        for ks in blocks() {
            for r in 0..m {
                // SAFETY: both panels are whole, within `cols` (owned by
                // this task); row r < M; ks within 0..K.
                unsafe { tile_pair(out, x, w, off(ja), off(jb), r, ja, jb, ks.clone(), k, n) };
            }
        }
    }
    if panels % 2 == 1 {
        let j = col(second - 1);
        for ks in blocks() {
            for r in 0..m {
                // SAFETY: as above.
                unsafe {
                    tile::<1, PANEL, false>(
                        out,
                        x,
                        w,
                        off(j),
                        PANEL,
                        r,
                        j,
                        ks.clone(),
                        k,
                        n,
                        std::ptr::null(),
                    )
                };
            }
        }
    }
    if full < cols.end {
        let (o, stride) = Layout::Panels.col(full, k, n);
        // SAFETY: the partial panel at the right edge, within `cols`.
        unsafe { edge(out, x, w, o, stride, 0..m, full..cols.end, 0..k, k, n) };
    }
}

/// `out[r, ja..ja+48] += x[r, ks] · panel at wa, rows ks` and the same for
/// `jb`, `wb`: two 1 x 48 tiles, their weights read side by side.
///
/// # Safety
/// Both panels whole and in bounds, `r < M`, `ks` within `0..K`, `out`
/// row r's columns `ja..ja+48` and `jb..jb+48` owned by this task.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_pair(
    out: OutPtr,
    x: &[f32],
    w: &[f32],
    wa: usize,
    wb: usize,
    r: usize,
    ja: usize,
    jb: usize,
    ks: std::ops::Range<usize>,
    k: usize,
    n: usize,
) {
    debug_assert!(wa.max(wb) + k * PANEL <= w.len() && ja.max(jb) + PANEL <= n);
    debug_assert!((r + 1) * k <= x.len() && ks.end <= k);
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    // SAFETY: the bounds above (the caller's contract); AVX2 and FMA are
    // enabled at compile time.
    unsafe {
        avx2::tile_pair(
            out.get().add(r * n),
            x.as_ptr().add(r * k),
            w.as_ptr().add(wa),
            w.as_ptr().add(wb),
            ja,
            jb,
            ks,
        )
    };
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    // SAFETY: as above.
    unsafe {
        tile::<1, PANEL, false>(out, x, w, wa, PANEL, r, ja, ks.clone(), k, n, std::ptr::null());
        tile::<1, PANEL, false>(out, x, w, wb, PANEL, r, jb, ks, k, n, std::ptr::null());
    }
}

/// `out[.., cols] += x · w[.., cols]` for all M rows, in tiles.
///
/// # Safety
/// `out` points to an `[M, N]` buffer whose columns `cols` no other thread
/// touches; `cols` within `0..N`, `cols.start` a multiple of [`PANEL`];
/// `w` holds `[K, N]` in `layout`.
#[allow(clippy::too_many_arguments)]
unsafe fn linear_block(
    out: OutPtr,
    x: &[f32],
    w: &[f32],
    layout: Layout,
    m: usize,
    k: usize,
    n: usize,
    cols: std::ops::Range<usize>,
) {
    if m <= ROWS_TWO_STREAMS && layout == Layout::Panels {
        // SAFETY: the caller's contract, passed on.
        unsafe { rows_two_streams(out, x, w, m, k, n, cols) };
        return;
    }
    // Every weight row, in blocks of KB.
    let ks = 0..k;
    // Register blocking by row count (over panels, up to three rows go to
    // `rows_two_streams` instead, so 1-3 rows below serve the stored layout
    // only): one row takes 48-wide tiles (6 accumulators), two rows 2 x 48,
    // 3-4 and 7-8 rows 4 x 24, other counts
    // the classic 6 x 16 AVX2 block (12 accumulators, 2 weight loads per 12 FMAs).
    //
    // Stored layout: for a block of KB weight rows, sweep the tiles left to
    // right, so `w` is read in memory order; a tile's KB x W weights stay in
    // L1 for the other row groups. Partial sums go through `out` once per
    // block (exactly: a store and reload does not round). Tile by tile down
    // all K rows instead reads 64 to 256 bytes per row at a stride of N
    // floats, a new page at almost every access, which the prefetcher does
    // not follow: it measured at well under half the bandwidth. Few rows want
    // short blocks (the KB rows stream side by side); many rows want long
    // ones (fewer passes over `out`).
    //
    // Panels (4 rows or more; fewer went to `rows_two_streams`): one panel
    // at a time, its KB x 48 blocks in order: a single stream per task.
    // Four rows are one 4 x 24 group: nothing rereads a block, so blocks of
    // 256 rows (fewer stores and reloads of the sums) measured 3-5% faster than 64
    // at all five GPT-2 shapes (2 threads from memory, 300 alternating
    // calls). Up to 32 rows take blocks of 64 panel rows (12 KiB), which
    // stay in L1 while every group uses them.
    // Prompts take blocks of 768 (144 KiB, from L2; all of K but for the
    // MLP's down projection): each tile loads and stores its sums far less
    // often. 256 measured 8-9% faster than 64 on prefill of 128 and 512
    // tokens (e2e bench, 3 alternating runs), and 768 2-5% faster than 256
    // at M = 128 (6 of 6 alternating kernel runs at GPT-2's shapes).
    //
    // From 3 rows on, the arithmetic of a block takes long enough that the
    // hardware prefetcher stops running ahead: the reads stop overlapping
    // the FMAs and a step costs about streaming time plus compute time. The
    // tiles then prefetch the block PREFETCH_BLOCKS ahead in this task's
    // order into L2, one line per weight row they compute. Measured from
    // huge pages at GPT-2's shapes (7 alternating runs, medians): without
    // it 8 rows take 1.0-1.18x as long; one or two rows stream at full
    // bandwidth without it.
    let prefetch = layout == Layout::Panels && m > 2;
    let kb = match layout {
        Layout::Rows if m <= 16 => 16,
        Layout::Rows => 128,
        Layout::Panels if m <= 4 => 256,
        Layout::Panels if m <= 32 => 64,
        Layout::Panels => 768,
    };
    macro_rules! sweep {
        ($w:expr, $($r:literal)+) => {{
            // One tile: rows r..r+R, columns j..j+W, weight rows `ks`.
            // `ahead`: where this tile prefetches its cache lines, or null.
            let tile_at = |r: usize, rows: usize, j: usize, ks: std::ops::Range<usize>, ahead: *const f32| {
                let (off, stride) = layout.col(j, k, n);
                // SAFETY: rows r..r+rows < M, columns j..j+W within `cols`,
                // which this task owns (the caller's contract), and within
                // one panel (W divides PANEL). Prefetching is a hint: it
                // never faults, whatever the address.
                unsafe {
                    match (rows, ahead.is_null()) {
                        $(($r, true) => tile::<$r, $w, false>(out, x, w, off, stride, r, j, ks, k, n, ahead),
                        ($r, false) => tile::<$r, $w, true>(out, x, w, off, stride, r, j, ks, k, n, ahead),)+
                        _ => unreachable!(),
                    }
                }
            };
            let groups = || {
                (0..m)
                    .step_by(max_rows!($($r)+))
                    .map(|r| (r, (m - r).min(max_rows!($($r)+))))
            };
            // `ahead`: the block to prefetch while this one is computed, as
            // (first float, floats), if any.
            let tiles = |cols: std::ops::Range<usize>, ks: std::ops::Range<usize>, ahead: Option<(*const f32, usize)>| {
                let full = cols.start + (cols.end - cols.start) / $w * $w;
                if layout == Layout::Panels {
                    // Row groups outer: a group's x block (R x KB) stays in
                    // L1 across the panel's tiles, and the panel block
                    // (KB x 48) across the groups. Tile call t prefetches
                    // lines t·KB .. (t+1)·KB of the block ahead, one line a
                    // weight row, until the block is covered.
                    let mut call = 0;
                    for (r, rows) in groups() {
                        for j in (cols.start..full).step_by($w) {
                            let pf = match ahead {
                                Some((first, floats)) if (call + 1) * ks.len() * LINE <= floats => {
                                    first.wrapping_add(call * ks.len() * LINE)
                                }
                                _ => std::ptr::null(),
                            };
                            call += 1;
                            tile_at(r, rows, j, ks.clone(), pf);
                        }
                    }
                } else {
                    // Tiles outer: a tile's KB x W weights stay in L1 for
                    // the row groups (a KB x N block of the stored layout
                    // would not).
                    for j in (cols.start..full).step_by($w) {
                        for (r, rows) in groups() {
                            tile_at(r, rows, j, ks.clone(), std::ptr::null());
                        }
                    }
                }
                if full < cols.end {
                    let (off, stride) = layout.col(full, k, n);
                    // SAFETY: as above, for the last partial tile.
                    unsafe { edge(out, x, w, off, stride, 0..m, full..cols.end, ks, k, n) };
                }
            };
            let blocks = |ks: std::ops::Range<usize>| {
                (ks.start..ks.end).step_by(kb).map(move |k0| k0..(k0 + kb).min(ks.end))
            };
            match layout {
                Layout::Rows => {
                    for kr in blocks(ks.clone()) {
                        tiles(cols.clone(), kr, None);
                    }
                }
                Layout::Panels => {
                    // The (panel, block) pairs in the order this task reads
                    // them, and the same sequence PREFETCH_BLOCKS ahead.
                    let order = || {
                        cols.clone()
                            .step_by(PANEL)
                            .flat_map(|p0| blocks(ks.clone()).map(move |kr| (p0, kr)))
                    };
                    let mut ahead = order().skip(PREFETCH_BLOCKS);
                    for (p0, kr) in order() {
                        let pf = ahead.next().filter(|_| prefetch).map(|(q0, kq)| {
                            let (first, _) = layout.col(q0, k, n);
                            (w.as_ptr().wrapping_add(first + kq.start * PANEL), kq.len() * PANEL)
                        });
                        tiles(p0..(p0 + PANEL).min(cols.end), kr, pf);
                    }
                }
            }
        }};
    }
    macro_rules! max_rows {
        ($($r:literal)+) => { 0 $(.max($r))+ };
    }
    // Tile shapes keep 6 to 12 accumulators busy with at most 12 registers
    // (of 16), and every width divides 48, the column-chunk alignment.
    match m {
        1 => sweep!(48, 1),
        2 => sweep!(48, 1 2),
        3 | 4 | 7 | 8 => sweep!(24, 1 2 3 4),
        _ => sweep!(16, 1 2 3 4 5 6),
    }
}

/// `out[M,N] = x[M,K] · w[N,K]ᵀ`: the LM head over the token embedding
/// `wte[V, C]` as stored. Overwrites `out`. Not used by the engine (which packs
/// the LM head, see the module docs); the benches compare it.
///
/// Each output is a dot product of an x row with a contiguous row of `w`.
/// Tasks own chunks of `w`'s rows (vocabulary entries) and stream them in
/// order; tiles of 3 x rows by 4 w rows keep 12 vector accumulators busy.
pub fn matmul_bt(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    assert_eq!(out.len(), m * n, "matmul_bt: out is not [M={m}, N={n}]");
    assert_eq!(x.len(), m * k, "matmul_bt: x is not [M={m}, K={k}]");
    assert_eq!(w.len(), n * k, "matmul_bt: w is not [N={n}, K={k}]");
    if m == 0 || n == 0 {
        return;
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Several chunks per thread: rayon balances them if a core is busy.
    let (count, width) = column_chunks(n, 4, rayon::current_num_threads() * 4);
    (0..count).into_par_iter().for_each(|c| {
        let (j0, j1) = (c * width, ((c + 1) * width).min(n));
        let mut j = j0;
        while j < j1 {
            let cols = (j1 - j).min(4);
            let mut r = 0;
            while r < m {
                let rows = (m - r).min(3);
                macro_rules! bt {
                    ($($rr:literal $cc:literal),+) => {
                        match (rows, cols) {
                            // SAFETY: rows r..r+rows < M and columns j..j+cols
                            // within this task's chunk, which no other task writes.
                            $(($rr, $cc) => unsafe { bt_tile::<$rr, $cc>(out_ptr, x, w, r, j, k, n) },)+
                            _ => unreachable!(),
                        }
                    };
                }
                bt!(1 1, 1 2, 1 3, 1 4, 2 1, 2 2, 2 3, 2 4, 3 1, 3 2, 3 3, 3 4);
                r += rows;
            }
            j += cols;
        }
    });
}

/// `out[r0..r0+R, j0..j0+C] = x[r0.., :] · w[j0.., :]ᵀ`: R x C dot products of
/// length K, each accumulated in 8 lanes over `k` in order, the lanes summed
/// pairwise, then the `K % 8` tail added in order: the same roundings for
/// every R and C.
///
/// # Safety
/// `r0 + R <= M`, `j0 + C <= N`, and no other thread writes those outputs.
#[inline(always)]
unsafe fn bt_tile<const R: usize, const C: usize>(
    out: OutPtr,
    x: &[f32],
    w: &[f32],
    r0: usize,
    j0: usize,
    k: usize,
    n: usize,
) {
    debug_assert!(r0 + R <= x.len() / k && j0 + C <= n && w.len() == k * n);
    let k8 = k / 8 * 8;
    let mut acc = [[[0f32; 8]; C]; R];
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    // SAFETY: the bounds above keep every load inside x and w; AVX2 and FMA
    // are enabled at compile time.
    unsafe {
        avx2::bt_lanes::<R, C>(&mut acc, x.as_ptr(), w.as_ptr(), r0, j0, k8, k)
    };
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    for kk in (0..k8).step_by(8) {
        for (r, ar) in acc.iter_mut().enumerate() {
            let xs = &x[(r0 + r) * k + kk..][..8];
            for (c, a) in ar.iter_mut().enumerate() {
                let ws = &w[(j0 + c) * k + kk..][..8];
                for l in 0..8 {
                    a[l] = fmadd(xs[l], ws[l], a[l]);
                }
            }
        }
    }
    for (r, ar) in acc.iter().enumerate() {
        for (c, a) in ar.iter().enumerate() {
            let pairs = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
            let mut s = (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]);
            let (xr, wr) = (&x[(r0 + r) * k..][..k], &w[(j0 + c) * k..][..k]);
            for kk in k8..k {
                s = fmadd(xr[kk], wr[kk], s);
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

/// `out[r0..r0+R, j0..j0+W] += x[.., ks] · w[ks, j0..j0+W]`: for each k in
/// `ks`, broadcast x[r, k] and multiply-add it with the `W` contiguous weights
/// of row k, which start at `w[off + k·stride]`.
///
/// # Safety
/// `r0 + R <= M`, `j0 + W <= N`, `w[off + k·stride..][..W]` in bounds for
/// every k in `ks`, and no other thread writes those outputs.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<const R: usize, const W: usize, const PREFETCH: bool>(
    out: OutPtr,
    x: &[f32],
    w: &[f32],
    off: usize,
    stride: usize,
    r0: usize,
    j0: usize,
    ks: std::ops::Range<usize>,
    k: usize,
    n: usize,
    ahead: *const f32,
) {
    debug_assert!(r0 + R <= x.len() / k && j0 + W <= n);
    debug_assert!(ks.is_empty() || off + (ks.end - 1) * stride + W <= w.len());
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    {
        // SAFETY: the bounds above (the caller's contract) keep every load and
        // store inside x, w, bias and out; AVX2 and FMA are enabled at compile time.
        unsafe {
            avx2::tile::<R, W, PREFETCH>(
                out.get(),
                x.as_ptr(),
                w.as_ptr().add(off),
                stride,
                r0,
                j0,
                ks,
                k,
                n,
                ahead,
            )
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    {
        let _ = ahead; // No portable prefetch hint.
        let mut acc = [[0f32; W]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            // SAFETY: in bounds and owned by this task (the caller's contract).
            a.copy_from_slice(unsafe { std::slice::from_raw_parts(out.get().add((r0 + r) * n + j0), W) });
        }
        for kk in ks {
            let wrow = &w[off + kk * stride..][..W];
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
    /// Pointers valid for `x[M, K]`, `out[M, N]`, and `W` weights at
    /// `w + k·stride` for every k in `ks`, with `r0 + R <= M` and
    /// `j0 + W <= N`; `W` a multiple of 8.
    ///
    /// With `PREFETCH`, iteration i also asks for the cache line at
    /// `ahead + i·16` (into L2); a hint, which never faults.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub unsafe fn tile<const R: usize, const W: usize, const PREFETCH: bool>(
        out: *mut f32,
        x: *const f32,
        w: *const f32,
        stride: usize,
        r0: usize,
        j0: usize,
        ks: std::ops::Range<usize>,
        k: usize,
        n: usize,
        ahead: *const f32,
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
                    _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add((kk - k0) * super::LINE).cast());
                }
                let wrow = w.add(kk * stride);
                if R == 2 && W == 48 {
                    // Both broadcasts first, then each weight vector loaded
                    // once for both rows: 12 sums + 2 + 1 registers. In the
                    // row-by-row order below LLVM keeps all six weight
                    // vectors live and spills sums to the stack: 2 rows
                    // took 1.01-1.09x as long from memory, 1.4-1.5x from
                    // cache. The same sums in the same order.
                    let xs: [__m256; R] = std::array::from_fn(|r| _mm256_broadcast_ss(&*xrow(r).add(kk)));
                    for v in 0..W / 8 {
                        let wv = _mm256_loadu_ps(wrow.add(8 * v));
                        for (a, xv) in acc.iter_mut().zip(&xs) {
                            a[v] = _mm256_fmadd_ps(*xv, wv, a[v]);
                        }
                    }
                    continue;
                }
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

    /// The AVX2 body of [`super::tile_pair`]: 2 x 6 accumulators. `out` and
    /// `x` point at the row's start.
    ///
    /// # Safety
    /// `x` valid for `ks.end` floats, `wa` and `wb` for `ks.end` rows of 48,
    /// `out` for columns `ja..ja+48` and `jb..jb+48`.
    #[inline(always)]
    pub unsafe fn tile_pair(
        out: *mut f32,
        x: *const f32,
        wa: *const f32,
        wb: *const f32,
        ja: usize,
        jb: usize,
        ks: std::ops::Range<usize>,
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
                let (ra, rb) = (wa.add(super::PANEL * kk), wb.add(super::PANEL * kk));
                for (v, s) in a.iter_mut().enumerate() {
                    *s = _mm256_fmadd_ps(xv, _mm256_loadu_ps(ra.add(8 * v)), *s);
                }
                for (v, s) in b.iter_mut().enumerate() {
                    *s = _mm256_fmadd_ps(xv, _mm256_loadu_ps(rb.add(8 * v)), *s);
                }
            }
            for v in 0..6 {
                _mm256_storeu_ps(out.add(ja + 8 * v), a[v]);
                _mm256_storeu_ps(out.add(jb + 8 * v), b[v]);
            }
        }
    }

    /// The AVX2 body of [`super::bt_tile`]: lane sums over `0..k8`.
    ///
    /// # Safety
    /// Pointers valid for `x[M, K]` and `w[N, K]`, with `r0 + R <= M`,
    /// `j0 + C <= N`, and `k8 <= K` a multiple of 8.
    #[inline(always)]
    pub unsafe fn bt_lanes<const R: usize, const C: usize>(
        acc: &mut [[[f32; 8]; C]; R],
        x: *const f32,
        w: *const f32,
        r0: usize,
        j0: usize,
        k8: usize,
        k: usize,
    ) {
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
    }
}
/// Scalar fallback for a partial tile at the right edge: `out += x · w` there,
/// with `w[k, j]` at `off + k·stride + (j - cols.start)`.
///
/// # Safety
/// The ranges are in bounds and no other thread writes those outputs.
#[allow(clippy::too_many_arguments)]
unsafe fn edge(
    out: OutPtr,
    x: &[f32],
    w: &[f32],
    off: usize,
    stride: usize,
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
                *dst = fmadd(x[r * k + kk], w[off + kk * stride + (j - cols.start)], *dst);
            }
        }
    }
}
