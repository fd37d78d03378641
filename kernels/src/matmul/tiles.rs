//! What one task of a linear call does: `out[.., cols] += x · w[.., cols]`
//! for all M rows, in register tiles, reading its weights in memory order.
//! Written once over the instruction set `I` (`crate::arch`); every function
//! is `#[inline(always)]`, so a task compiles into its set's entry point.
//!
//! | rows M | over panels ([`linear_packed`]) | over the stored layout ([`linear`]) |
//! |---|---|---|
//! | 1-3 | [`rows_streams`]: 1 x 48 tiles on two panels at once (AVX-512 CPUs run them on AVX2) | 8 lanes: 1 x 48, 2 x 48, 4 x 24 tiles; 16 lanes: 1 x 48, 2 x 48, 8 x 48 |
//! | 4-8 | 8 lanes: 4 x 24 (f32, int8) or 6 x 16 (bf16); 16 lanes: 8 x 48; software prefetch | as at 1-3 rows |
//! | more | 8 lanes: 6 x 16; 16 lanes: 8 x 48; software prefetch | 8 lanes: 6 x 16 |
//!
//! With AVX2's 16 registers, tile shapes keep 6 to 12 accumulators busy with
//! at most 12 registers; with AVX-512's 32, 8 x 48 holds 24 (3 per row), so
//! each weight vector loaded serves 8 rows and each broadcast 3 vectors.
//! Every width divides 48, the panel width. The weight rows go in blocks of
//! [`block_rows`]; within a block every tile adds its products in order of
//! k, and blocks go in order of k, so each output is the same sum in the
//! same order whatever the shape. The tile bodies are in `bodies.rs`
//! (`tile`, `tile_streams`); a partial tile at the right edge is scalar ([`edge`]).
//!
//! [`linear_packed`]: super::linear_packed
//! [`linear`]: super::linear

use std::ops::Range;

use super::{bodies, Layout, OutPtr, PANEL};
use crate::arch::{Isa, Vector, Widen, LINE};

/// One call's operands, as every tile of its tasks sees them. `E` is the
/// weights' format (f32, bf16 or int8), widened to f32 as it is loaded.
pub(crate) struct Operands<'a, E> {
    /// `out[M, N]`, shared by the tasks; each writes only its own columns.
    pub out: OutPtr,
    /// `x[M, K]`.
    pub x: &'a [f32],
    /// `w[K, N]`, laid out as `layout` says.
    pub w: &'a [E],
    pub layout: Layout,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// Most rows that [`rows_streams`] takes: one stream at a time keeps
/// too few lines in flight for them; from four rows the tiles gain nothing
/// from a second stream.
pub(super) const ROWS_TWO_STREAMS: usize = 3;

/// Weight rows per block when two or three rows take turns in
/// [`rows_streams`]: two panels' blocks (24 KiB) stay in L1 for the
/// second and third rows.
const TWO_STREAM_BLOCK: usize = 64;

/// From this many rows on, the tiles over panels prefetch: the arithmetic
/// of a block then takes long enough that the hardware prefetcher stops
/// running ahead. One or two rows stream at full bandwidth without it.
const PREFETCH_FROM_ROWS: usize = 3;

/// How many blocks ahead, in a task's reading order, the tiles prefetch.
const PREFETCH_BLOCKS: usize = 2;

/// `out[.., cols] += x · w[.., cols]` for all M rows: the work of one task.
///
/// # Safety
/// The CPU has `I`; no other thread touches columns `cols` of `out`; `cols`
/// within `0..N`, `cols.start` a multiple of [`PANEL`].
#[inline(always)]
pub(super) unsafe fn linear_block<I: Isa, E: Widen>(op: &Operands<E>, cols: Range<usize>) {
    // SAFETY (every call): the caller's contract, passed on.
    if op.m <= ROWS_TWO_STREAMS && op.layout == Layout::Panels {
        unsafe { rows_streams::<I, E>(op, cols) };
        return;
    }
    unsafe {
        if I::V::LANES == 16 {
            // 32 registers: up to 8 rows x 3 vectors of sums.
            match op.m {
                1 => sweep::<I, 48, 1, E>(op, cols),
                2 => sweep::<I, 48, 2, E>(op, cols),
                _ => sweep::<I, 48, 8, E>(op, cols),
            }
            return;
        }
        match op.m {
            1 => sweep::<I, 48, 1, E>(op, cols),
            2 => sweep::<I, 48, 2, E>(op, cols),
            // A 24-wide tile would start in the middle of a permuted group.
            3 | 4 | 7 | 8 if E::GROUP == 8 => sweep::<I, 24, 4, E>(op, cols),
            _ => sweep::<I, 16, 6, E>(op, cols),
        }
    }
}

/// Weight rows per block: the k extent of one tile call.
///
/// Stored layout: a block's tiles are swept left to right, so `w` is read in
/// memory order, and a tile's block of weights stays in L1 for the other row
/// groups. Few rows want short blocks (the block's rows stream side by side),
/// many rows long ones (fewer passes over `out`).
///
/// Panels: 4 rows are one 4 x 24 row group, so nothing rereads a block and
/// long blocks mean fewer stores and reloads of the sums; up to 32 rows take
/// blocks of 64 panel rows (12 KiB), which stay in L1 while every group uses
/// them; prompts take 768 (144 KiB, from L2; all of K but for the MLP's down
/// projection), so each tile loads and stores its sums rarely.
fn block_rows(layout: Layout, m: usize) -> usize {
    match layout {
        Layout::Rows if m <= 16 => 16,
        Layout::Rows => 128,
        Layout::Panels if m <= 4 => 256,
        Layout::Panels if m <= 32 => 64,
        Layout::Panels => 768,
    }
}

/// [`linear_block`] in `W`-wide tiles of up to `ROWS` rows, block by block.
///
/// # Safety
/// As [`linear_block`].
#[inline(always)]
unsafe fn sweep<I: Isa, const W: usize, const ROWS: usize, E: Widen>(op: &Operands<E>, cols: Range<usize>) {
    let kb = block_rows(op.layout, op.m);
    match op.layout {
        Layout::Rows => {
            for ks in blocks(op.k, kb) {
                // SAFETY: the caller's contract, passed on.
                unsafe { row_tiles::<I, W, ROWS, E>(op, cols.clone(), ks) };
            }
        }
        Layout::Panels => {
            // Each panel's blocks in turn (a single stream per task), and
            // the block PREFETCH_BLOCKS further along that order prefetched
            // while this one is computed.
            let prefetch = op.m >= PREFETCH_FROM_ROWS;
            let mut ahead = panel_blocks(cols.clone(), op.k, kb).skip(PREFETCH_BLOCKS);
            for (p0, ks) in panel_blocks(cols.clone(), op.k, kb) {
                let pf = ahead.next().filter(|_| prefetch).map(|(q0, kq)| {
                    let (first, _) = op.layout.col(q0, op.k, op.n);
                    Prefetch {
                        first: op.w.as_ptr().wrapping_add(first + kq.start * PANEL).cast(),
                        bytes: kq.len() * PANEL * std::mem::size_of::<E>(),
                    }
                });
                // SAFETY: the caller's contract; one panel of `cols`.
                unsafe { panel_tiles::<I, W, ROWS, E>(op, p0..(p0 + PANEL).min(cols.end), ks, pf) };
            }
        }
    }
}

/// A block of weights to prefetch: `bytes` bytes from `first`.
#[derive(Clone, Copy)]
struct Prefetch {
    first: *const u8,
    bytes: usize,
}

/// The blocks of weight rows `0..K`, `kb` at a time (the last may be shorter).
#[inline(always)]
fn blocks(k: usize, kb: usize) -> impl Iterator<Item = Range<usize>> {
    (0..k).step_by(kb).map(move |k0| k0..(k0 + kb).min(k))
}

/// The (panel's first column, block) pairs of `cols`, in the order a task
/// reads them: every block of a panel, then the next panel.
#[inline(always)]
fn panel_blocks(cols: Range<usize>, k: usize, kb: usize) -> impl Iterator<Item = (usize, Range<usize>)> {
    cols.step_by(PANEL)
        .flat_map(move |p0| blocks(k, kb).map(move |ks| (p0, ks)))
}

/// The row groups `(first row, rows)` of M rows, `rows` at most `max`.
#[inline(always)]
fn row_groups(m: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..m).step_by(max).map(move |r| (r, (m - r).min(max)))
}

/// Weight rows `ks` of one panel's columns `cols`, for every row group.
/// Row groups outer: a group's x block (R x KB) stays in L1 across the
/// panel's tiles, and the panel block (KB x 48) across the groups. Tile call
/// t prefetches `per_k` lines a weight row from line `t·KB·per_k` of
/// `ahead`: with 8 lanes one line (`per_k` 1), for the calls that lie
/// wholly inside the block; with 16 lanes (fewer, wider calls) enough lines
/// that the calls cover the block, the last one maybe past it.
///
/// # Safety
/// As [`linear_block`], with `cols` within one panel.
#[inline(always)]
unsafe fn panel_tiles<I: Isa, const W: usize, const ROWS: usize, E: Widen>(
    op: &Operands<E>,
    cols: Range<usize>,
    ks: Range<usize>,
    ahead: Option<Prefetch>,
) {
    let full = cols.start + (cols.end - cols.start) / W * W;
    let wide = I::V::LANES == 16;
    let calls = op.m.div_ceil(ROWS) * ((full - cols.start) / W);
    let per_k = match ahead {
        Some(a) if wide => (a.bytes.div_ceil(LINE))
            .div_ceil((calls * ks.len()).max(1))
            .clamp(1, 3),
        _ => 1,
    };
    let mut call = 0;
    for (r, rows) in row_groups(op.m, ROWS) {
        for j in (cols.start..full).step_by(W) {
            let (from, to) = (
                call * ks.len() * per_k * LINE,
                (call + 1) * ks.len() * per_k * LINE,
            );
            let pf = match ahead {
                Some(a) if (wide && from < a.bytes) || to <= a.bytes => a.first.wrapping_add(from),
                _ => std::ptr::null(),
            };
            call += 1;
            // SAFETY: rows r..r+rows < M, columns j..j+W within `cols`,
            // which this task owns, and within one panel (W divides PANEL).
            // Prefetching is a hint: it never faults, whatever the address.
            unsafe { tile_group::<I, W, ROWS, E>(op, r, rows, j, ks.clone(), pf, per_k) };
        }
    }
    // SAFETY: the rest of `cols`, owned by this task.
    unsafe { edge::<I, E>(op, full..cols.end, ks) };
}

/// Weight rows `ks` of columns `cols` in the stored layout, for every row
/// group. Tiles outer: a tile's KB x W weights stay in L1 for the row groups
/// (a KB x N block of the stored layout would not).
///
/// # Safety
/// As [`linear_block`].
#[inline(always)]
unsafe fn row_tiles<I: Isa, const W: usize, const ROWS: usize, E: Widen>(
    op: &Operands<E>,
    cols: Range<usize>,
    ks: Range<usize>,
) {
    let full = cols.start + (cols.end - cols.start) / W * W;
    for j in (cols.start..full).step_by(W) {
        for (r, rows) in row_groups(op.m, ROWS) {
            // SAFETY: rows r..r+rows < M, columns j..j+W within `cols`,
            // which this task owns.
            unsafe { tile_group::<I, W, ROWS, E>(op, r, rows, j, ks.clone(), std::ptr::null(), 0) };
        }
    }
    // SAFETY: the rest of `cols`, owned by this task.
    unsafe { edge::<I, E>(op, full..cols.end, ks) };
}

/// [`tile`] for a row group of `rows` (at most `ROWS`), prefetching `per_k`
/// lines (1 to 3) a weight row from `ahead` unless it is null.
///
/// # Safety
/// As [`tile`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_group<I: Isa, const W: usize, const ROWS: usize, E: Widen>(
    op: &Operands<E>,
    r0: usize,
    rows: usize,
    j0: usize,
    ks: Range<usize>,
    ahead: *const u8,
    per_k: usize,
) {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match (ahead.is_null(), per_k) {
            (true, _) => tile_rows::<I, W, ROWS, 0, E>(op, r0, rows, j0, ks, ahead),
            (false, 1) => tile_rows::<I, W, ROWS, 1, E>(op, r0, rows, j0, ks, ahead),
            (false, 2) => tile_rows::<I, W, ROWS, 2, E>(op, r0, rows, j0, ks, ahead),
            (false, _) => tile_rows::<I, W, ROWS, 3, E>(op, r0, rows, j0, ks, ahead),
        }
    }
}

/// [`tile`] with the row count `rows` as a constant; only the counts up to
/// `ROWS` are instantiated.
///
/// # Safety
/// As [`tile`].
#[inline(always)]
unsafe fn tile_rows<I: Isa, const W: usize, const ROWS: usize, const PF: usize, E: Widen>(
    op: &Operands<E>,
    r0: usize,
    rows: usize,
    j0: usize,
    ks: Range<usize>,
    ahead: *const u8,
) {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match rows {
            1 => tile::<I, 1, W, PF, E>(op, r0, j0, ks, ahead),
            2 if ROWS >= 2 => tile::<I, 2, W, PF, E>(op, r0, j0, ks, ahead),
            3 if ROWS >= 3 => tile::<I, 3, W, PF, E>(op, r0, j0, ks, ahead),
            4 if ROWS >= 4 => tile::<I, 4, W, PF, E>(op, r0, j0, ks, ahead),
            5 if ROWS >= 5 => tile::<I, 5, W, PF, E>(op, r0, j0, ks, ahead),
            6 if ROWS >= 6 => tile::<I, 6, W, PF, E>(op, r0, j0, ks, ahead),
            7 if ROWS >= 7 => tile::<I, 7, W, PF, E>(op, r0, j0, ks, ahead),
            8 if ROWS >= 8 => tile::<I, 8, W, PF, E>(op, r0, j0, ks, ahead),
            _ => unreachable!("a row group of {rows}, at most {ROWS}"),
        }
    }
}

/// `out[r0..r0+R, j0..j0+W] += x[r0..r0+R, ks] · w[ks, j0..j0+W]`: for each
/// k in `ks`, broadcast `x[r, k]` and multiply-add it with the `W`
/// contiguous weights of row k. Iteration i also prefetches `PF` cache
/// lines from `ahead + i·PF·64`.
///
/// # Safety
/// The CPU has `I`; `r0 + R <= M`, `j0 + W <= N` within one panel (over
/// panels), `ks` within `0..K`, and no other thread writes those outputs.
#[inline(always)]
unsafe fn tile<I: Isa, const R: usize, const W: usize, const PF: usize, E: Widen>(
    op: &Operands<E>,
    r0: usize,
    j0: usize,
    ks: Range<usize>,
    ahead: *const u8,
) {
    let (off, stride) = op.layout.col(j0, op.k, op.n);
    debug_assert!(r0 + R <= op.m && j0 + W <= op.n);
    debug_assert!(ks.is_empty() || off + (ks.end - 1) * stride + W <= op.w.len());
    // SAFETY: the bounds above (the caller's contract) keep every load and
    // store inside x, w and out.
    unsafe {
        bodies::tile::<I, R, W, PF, E>(
            op.out.get(),
            op.x.as_ptr(),
            op.w.as_ptr().add(off),
            stride,
            r0,
            j0,
            ks,
            op.k,
            op.n,
            ahead,
        )
    }
}

/// [`linear_block`] for one to three rows over panels: the task's whole
/// panels read as two streams at once (the task's panels cut into two runs,
/// panel i of each side by side), then any panel left over, then any
/// partial panel. One row takes all K rows of its panels in one pass; two
/// or three rows take blocks of [`TWO_STREAM_BLOCK`] weight rows, row after
/// row, the first reading the block from memory and the others from L1. The
/// streams must be read in the same loop (interleaving the panels block by
/// block does not help); their sums fill 12 AVX2 registers. AVX-512 CPUs
/// run these rows on the AVX2 instantiation (`linear_impl`). Each output is
/// the same sum in the same order as through [`tile`].
///
/// # Safety
/// As [`linear_block`], with `M <= ROWS_TWO_STREAMS` and `w` in panels.
#[inline(always)]
unsafe fn rows_streams<I: Isa, E: Widen>(op: &Operands<E>, cols: Range<usize>) {
    // SAFETY: the caller's contract, passed on.
    unsafe { rows_in_streams::<I, E, 2>(op, cols) }
}

/// [`rows_streams`] with `S` streams.
///
/// # Safety
/// As [`rows_streams`].
#[inline(always)]
unsafe fn rows_in_streams<I: Isa, E: Widen, const S: usize>(op: &Operands<E>, cols: Range<usize>) {
    debug_assert!((1..=ROWS_TWO_STREAMS).contains(&op.m) && op.layout == Layout::Panels);
    let panels = (cols.end - cols.start) / PANEL;
    let full = cols.start + panels * PANEL;
    // Run s is panels s·q .. (s+1)·q; the S·q-th panel on run alone.
    let q = panels / S;
    let col = |i: usize| cols.start + i * PANEL;
    let kb = if op.m == 1 { op.k.max(1) } else { TWO_STREAM_BLOCK };
    for i in 0..q {
        let js: [usize; S] = std::array::from_fn(|s| col(s * q + i));
        for ks in blocks(op.k, kb) {
            for r in 0..op.m {
                // SAFETY: every panel is whole, within `cols` (owned by
                // this task); row r < M; ks within 0..K.
                unsafe { tile_streams::<I, E, S>(op, r, js, ks.clone()) };
            }
        }
    }
    for i in S * q..panels {
        for ks in blocks(op.k, kb) {
            for r in 0..op.m {
                // SAFETY: as above.
                unsafe { tile::<I, 1, PANEL, 0, E>(op, r, col(i), ks.clone(), std::ptr::null()) };
            }
        }
    }
    // SAFETY: the partial panel at the right edge, within `cols`.
    unsafe { edge::<I, E>(op, full..cols.end, 0..op.k) };
}

/// `out[r, j[s]..j[s]+48] += x[r, ks] · w[ks, j[s]..j[s]+48]` for each of
/// S panels: S 1 x 48 tiles of row r, their panels read side by side.
///
/// # Safety
/// The CPU has `I`; every panel whole, `r < M`, `ks` within `0..K`, `out`
/// row r's columns of those panels owned by this task; `w` in panels.
#[inline(always)]
unsafe fn tile_streams<I: Isa, E: Widen, const S: usize>(
    op: &Operands<E>,
    r: usize,
    j: [usize; S],
    ks: Range<usize>,
) {
    debug_assert!(r < op.m && ks.end <= op.k);
    let mut w = [op.w.as_ptr(); S];
    for (w, &js) in w.iter_mut().zip(&j) {
        let at = op.layout.col(js, op.k, op.n).0;
        debug_assert!(at + op.k * PANEL <= op.w.len() && js + PANEL <= op.n);
        *w = w.wrapping_add(at);
    }
    // SAFETY: the bounds above (the caller's contract).
    unsafe {
        bodies::tile_streams::<I, E, S>(op.out.get().add(r * op.n), op.x.as_ptr().add(r * op.k), w, j, ks)
    };
}

/// A partial tile at the right edge, narrower than the tiles: `out += x · w`
/// over columns `cols` and weight rows `ks`, every row, one scalar
/// multiply-add at a time in order of k, rounded as the set's vectors round.
///
/// # Safety
/// `cols` within `0..N` (and within one panel, over panels), `ks` within
/// `0..K`, and no other thread writes those outputs.
#[inline(always)]
unsafe fn edge<I: Isa, E: Widen>(op: &Operands<E>, cols: Range<usize>, ks: Range<usize>) {
    if cols.is_empty() {
        return;
    }
    let (off, stride) = op.layout.col(cols.start, op.k, op.n);
    let (x, w, k, n) = (op.x, op.w, op.k, op.n);
    for r in 0..op.m {
        for j in cols.clone() {
            // SAFETY: in bounds and owned by this task (the caller's contract).
            let dst = unsafe { &mut *op.out.get().add(r * n + j) };
            for kk in ks.clone() {
                *dst = I::fmadd(
                    x[r * k + kk],
                    w[off + kk * stride + E::slot(j - cols.start)].to_f32(),
                    *dst,
                );
            }
        }
    }
}
