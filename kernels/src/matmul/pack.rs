//! The packed weight layout: column panels of 48, built once at load, in
//! any [`Dtype`]: f32 as stored, bf16 rounded to nearest even, or int8 with
//! one scale per column. Within a panel, f32 and bf16 keep row after row of
//! 48 values; int8 keeps groups of four rows, each column's four values
//! side by side (the operand of an integer dot product), K rounded up to a
//! multiple of 4 with zeros ([`index`]).

use std::ops::Range;

use half::bf16;
use rayon::prelude::*;

use crate::arch::Weight;
use crate::Dtype;

/// Width of the column panels of [`pack_panels`]: a multiple of every tile
/// width (48, 24, 16), so that a tile never straddles two panels.
pub const PANEL: usize = 48;

/// Where `w[kk, c]` (row kk, column c of a panel) is stored, from the
/// panel's start: rows in groups of `T::K_GROUP`, a group's columns at
/// their [`Weight::slot`], each column's rows of the group side by side.
#[inline(always)]
fn index<T: Weight>(kk: usize, c: usize) -> usize {
    let g = T::K_GROUP;
    (kk / g * PANEL + T::slot(c)) * g + kk % g
}

/// Floats in the packed form of a `[K, N]` weight: N rounded up to whole panels.
pub fn packed_len(k: usize, n: usize) -> usize {
    n.div_ceil(PANEL) * PANEL * k
}

/// Values in the panels of a `[K, N]` weight in `dtype`: N rounded up to
/// whole panels, K (for int8) to groups of four.
pub(crate) fn panel_values(dtype: Dtype, k: usize, n: usize) -> usize {
    let rows = match dtype {
        Dtype::Int8 => k.next_multiple_of(<i8 as Weight>::K_GROUP),
        Dtype::F32 | Dtype::Bf16 => k,
    };
    packed_len(rows, n)
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
///
/// [`linear_packed`]: super::linear_packed
/// [`linear`]: super::linear
pub fn pack_panels(dst: &mut [f32], w: &[f32], k: usize, n: usize) {
    assert_eq!(w.len(), k * n, "pack_panels: w is not [K={k}, N={n}]");
    pack_with(dst, w, k, n, |v, _| v);
}

/// [`pack_panels`] from the transpose: `wt` is `w` stored `[N, K]` (the
/// token embedding `wte[V, C]` that GPT-2's LM head multiplies by), and `dst`
/// receives the panels of `w[K, N]`. Each panel gathers 48 rows of `wt`.
pub fn pack_panels_t(dst: &mut [f32], wt: &[f32], k: usize, n: usize) {
    assert_eq!(wt.len(), n * k, "pack_panels_t: wt is not [N={n}, K={k}]");
    pack_with_t(dst, wt, k, n, |v, _| v);
}

/// Column `j` of a `[K, N]` weight packed by [`pack_panels`] (row `j` of the
/// `[N, K]` matrix packed by [`pack_panels_t`]) into `dst[K]`: exact copies.
/// GPT-2 reads its token embeddings this way from the packed LM head.
pub fn unpack_column(dst: &mut [f32], panels: &[f32], k: usize, j: usize) {
    unpack_with(dst, panels, k, j, |v| v)
}

/// A packed weight in one of the [`Dtype`]s, as the kernels read it: the
/// panels of [`pack_panels`], each value in the format, and for int8 the
/// per-column scales (`n` rounded up to whole panels, zero past N).
#[derive(Clone, Copy)]
pub enum Panels<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    Int8 { q: &'a [i8], scales: &'a [f32] },
}

/// [`Panels`] being written by [`pack`] or [`pack_t`].
pub enum PanelsMut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [bf16]),
    Int8 { q: &'a mut [i8], scales: &'a mut [f32] },
}

/// Bytes of a `[K, N]` weight packed in `dtype`: the panels (N rounded up to
/// whole panels; int8 K to groups of four), and for int8 the scales after
/// them. A multiple of 4, so that packed matrices laid end to end keep
/// every part aligned.
pub fn packed_bytes(dtype: Dtype, k: usize, n: usize) -> usize {
    let values = panel_values(dtype, k, n) * dtype.bytes_per_value();
    let scales = if dtype == Dtype::Int8 {
        n.div_ceil(PANEL) * PANEL * 4
    } else {
        0
    };
    (values + scales).next_multiple_of(4)
}

/// Splits `bytes` (`packed_bytes(dtype, k, n)` of them, 4-byte aligned) into
/// the parts of a packed `[K, N]` weight.
///
/// # Panics
/// On a length or alignment that does not fit.
fn split(dtype: Dtype, bytes: &[u8], k: usize, n: usize) -> (&[u8], &[u8]) {
    assert_eq!(
        bytes.len(),
        packed_bytes(dtype, k, n),
        "{dtype} panels of [K={k}, N={n}]: wrong length"
    );
    assert_eq!(
        bytes.as_ptr() as usize % 4,
        0,
        "{dtype} panels: not 4-byte aligned"
    );
    bytes.split_at(panel_values(dtype, k, n) * dtype.bytes_per_value())
}

impl<'a> Panels<'a> {
    /// A `[K, N]` weight packed in `dtype` in `bytes`, as [`pack`] wrote it.
    ///
    /// # Panics
    /// Unless `bytes` is `packed_bytes(dtype, k, n)` long and 4-byte aligned.
    pub fn from_bytes(dtype: Dtype, bytes: &'a [u8], k: usize, n: usize) -> Self {
        let (values, scales) = split(dtype, bytes, k, n);
        match dtype {
            Dtype::F32 => Panels::F32(bytemuck::cast_slice(values)),
            Dtype::Bf16 => Panels::Bf16(bytemuck::cast_slice(values)),
            Dtype::Int8 => Panels::Int8 {
                q: bytemuck::cast_slice(values),
                scales: &bytemuck::cast_slice(scales)[..n.div_ceil(PANEL) * PANEL],
            },
        }
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            Panels::F32(_) => Dtype::F32,
            Panels::Bf16(_) => Dtype::Bf16,
            Panels::Int8 { .. } => Dtype::Int8,
        }
    }

    /// Column `j` of the `[K, N]` weight (row `j` of an `[N, K]` one packed by
    /// [`pack_t`]) into `dst[K]`, widened to f32 exactly (int8 as
    /// `q · scale`, one rounding).
    pub fn unpack_column(&self, dst: &mut [f32], k: usize, j: usize) {
        match *self {
            Panels::F32(p) => unpack_with(dst, p, k, j, |v| v),
            Panels::Bf16(p) => unpack_with(dst, p, k, j, bf16::to_f32),
            Panels::Int8 { q, scales } => {
                let s = scales[j];
                unpack_with(dst, q, k, j, |v| v as f32 * s)
            }
        }
    }

    /// Whether any value, or int8 scale, is NaN or infinite: a branch-free
    /// scan (exponent bits all ones), in parallel.
    pub fn any_non_finite(&self) -> bool {
        fn scan<T: Copy + Sync>(v: &[T], bad: impl Fn(T) -> bool + Sync) -> bool {
            v.par_chunks(1 << 16)
                .any(|c| c.iter().fold(false, |acc, &x| acc | bad(x)))
        }
        match *self {
            Panels::F32(p) => scan(p, |v: f32| v.to_bits() & 0x7f80_0000 == 0x7f80_0000),
            Panels::Bf16(p) => scan(p, |v: bf16| v.to_bits() & 0x7f80 == 0x7f80),
            Panels::Int8 { scales, .. } => scan(scales, |v: f32| v.to_bits() & 0x7f80_0000 == 0x7f80_0000),
        }
    }
}

impl<'a> PanelsMut<'a> {
    /// [`Panels::from_bytes`], to be written.
    pub fn from_bytes(dtype: Dtype, bytes: &'a mut [u8], k: usize, n: usize) -> Self {
        split(dtype, bytes, k, n);
        let (values, scales) = bytes.split_at_mut(panel_values(dtype, k, n) * dtype.bytes_per_value());
        match dtype {
            Dtype::F32 => PanelsMut::F32(bytemuck::cast_slice_mut(values)),
            Dtype::Bf16 => PanelsMut::Bf16(bytemuck::cast_slice_mut(values)),
            Dtype::Int8 => PanelsMut::Int8 {
                q: bytemuck::cast_slice_mut(values),
                scales: &mut bytemuck::cast_slice_mut(scales)[..n.div_ceil(PANEL) * PANEL],
            },
        }
    }
}

fn unpack_with<T: Weight>(dst: &mut [f32], panels: &[T], k: usize, j: usize, f: impl Fn(T) -> f32) {
    assert_eq!(dst.len(), k, "unpack_column: dst is not [K={k}]");
    let panel = &panels[(j / PANEL * panel_rows::<T>(k) * PANEL).min(panels.len())..];
    assert!(
        k == 0 || index::<T>(k - 1, j % PANEL) < panel.len(),
        "unpack_column: column {j} is past the panels"
    );
    for (kk, d) in dst.iter_mut().enumerate() {
        *d = f(panel[index::<T>(kk, j % PANEL)]);
    }
}

/// Weight rows a panel of `T` holds for K: K rounded up to `T`'s groups.
fn panel_rows<T: Weight>(k: usize) -> usize {
    k.next_multiple_of(T::K_GROUP)
}

/// `v` rounded to bf16: to nearest, ties to even; NaN stays NaN (quieted),
/// a finite value past bf16's largest rounds to infinity (which the loader's
/// finiteness check then refuses).
#[inline]
pub fn to_bf16(v: f32) -> bf16 {
    bf16::from_f32(v)
}

/// The int8 scale of a column whose largest magnitude is `absmax`:
/// `absmax / 127`, so that the largest weight maps to ±127. NaN or infinite
/// when the column holds one (and the loader refuses it).
#[inline]
pub fn int8_scale(absmax: f32) -> f32 {
    absmax / 127.0
}

/// `v / scale` rounded to the nearest integer, ties to even, within ±127;
/// 0 for a zero or non-finite scale.
#[inline]
pub fn to_int8(v: f32, scale: f32) -> i8 {
    if scale > 0.0 && scale.is_finite() {
        (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8
    } else {
        0
    }
}

/// The larger of `acc` and `|v|`, NaN once either is NaN (where `f32::max`
/// would drop it).
#[inline]
fn absmax(acc: f32, v: f32) -> f32 {
    let a = v.abs();
    if a > acc || a.is_nan() {
        a
    } else {
        acc
    }
}

/// Packs `w[K, N]` (stored layout) into `dst`, converting each value to
/// `dst`'s format; int8 takes each column's scale from its largest magnitude.
/// [`pack_panels`] for any [`Dtype`].
pub fn pack(dst: PanelsMut, w: &[f32], k: usize, n: usize) {
    assert_eq!(w.len(), k * n, "pack: w is not [K={k}, N={n}]");
    match dst {
        PanelsMut::F32(p) => pack_with(p, w, k, n, |v, _| v),
        PanelsMut::Bf16(p) => pack_with(p, w, k, n, |v, _| to_bf16(v)),
        PanelsMut::Int8 { q, scales } => {
            // Each column's largest magnitude, then its scale; zero past N.
            scales.fill(0.0);
            for row in w.chunks_exact(n.max(1)) {
                for (m, &v) in scales.iter_mut().zip(row) {
                    *m = absmax(*m, v);
                }
            }
            for s in scales.iter_mut() {
                *s = int8_scale(*s);
            }
            let scales = &*scales;
            pack_with(q, w, k, n, |v, j| to_int8(v, scales[j]));
        }
    }
}

/// Packs columns `cols` of a `[K, N]` weight given as its transpose: `wt`
/// holds rows `cols` of the `[N, K]` matrix (the token embedding the LM head
/// multiplies by). `cols.start` is a multiple of [`PANEL`], so slabs of
/// whole panels pack exactly as one call over all N would, and a caller may
/// hand each slab's source back to the OS before reading the next.
/// [`pack_panels_t`] for any [`Dtype`], a slab at a time.
pub fn pack_t(dst: PanelsMut, wt: &[f32], k: usize, n: usize, cols: Range<usize>) {
    assert!(
        cols.start.is_multiple_of(PANEL) && cols.start <= cols.end && cols.end <= n,
        "pack_t: columns {cols:?} of {n} do not start a panel"
    );
    assert_eq!(
        wt.len(),
        cols.len() * k,
        "pack_t: wt is not [{}, K={k}]",
        cols.len()
    );
    let slab = |rows: usize| cols.start / PANEL * rows * PANEL..cols.end.div_ceil(PANEL) * rows * PANEL;
    let w = cols.len();
    match dst {
        PanelsMut::F32(p) => pack_with_t(&mut p[slab(k)], wt, k, w, |v, _| v),
        PanelsMut::Bf16(p) => pack_with_t(&mut p[slab(k)], wt, k, w, |v, _| to_bf16(v)),
        PanelsMut::Int8 { q, scales } => {
            let s = &mut scales[cols.start..cols.start + w.div_ceil(PANEL) * PANEL];
            s.fill(0.0);
            s.par_iter_mut()
                .zip(wt.par_chunks_exact(k.max(1)))
                .for_each(|(s, row)| {
                    *s = int8_scale(row.iter().fold(0.0, |m, &v| absmax(m, v)));
                });
            let s = &*s;
            pack_with_t(&mut q[slab(panel_rows::<i8>(k))], wt, k, w, |v, j| {
                to_int8(v, s[j])
            });
        }
    }
}

/// Whether panels of `len` values of `T`, checked to be those of a `[K, N]`
/// weight, have anything to fill.
fn panels_to_fill<T: Weight>(len: usize, k: usize, n: usize) -> bool {
    let want = packed_len(panel_rows::<T>(k), n);
    assert_eq!(len, want, "pack: dst is not {want} values");
    n > 0 && k > 0
}

/// [`pack_panels`] into any format: `conv(w[k, j], j)` where the format
/// keeps it ([`index`]), zero past column N and row K.
fn pack_with<T: Weight + Default>(
    dst: &mut [T],
    w: &[f32],
    k: usize,
    n: usize,
    conv: impl Fn(f32, usize) -> T + Sync,
) {
    if !panels_to_fill::<T>(dst.len(), k, n) {
        return;
    }
    let rows = panel_rows::<T>(k);
    dst.par_chunks_mut(rows * PANEL)
        .enumerate()
        .for_each(|(p, panel)| {
            let (j0, j1) = (p * PANEL, ((p + 1) * PANEL).min(n));
            if j1 - j0 < PANEL || rows > k {
                panel.fill(T::default());
            }
            for kk in 0..k {
                for (c, &v) in w[kk * n + j0..kk * n + j1].iter().enumerate() {
                    panel[index::<T>(kk, c)] = conv(v, j0 + c);
                }
            }
        });
}

/// [`pack_panels_t`] into any format: `conv(wt[j, k], j)` where the format
/// keeps it, zero past row N (and int8's rows past K).
fn pack_with_t<T: Weight + Default>(
    dst: &mut [T],
    wt: &[f32],
    k: usize,
    n: usize,
    conv: impl Fn(f32, usize) -> T + Sync,
) {
    if !panels_to_fill::<T>(dst.len(), k, n) {
        return;
    }
    dst.par_chunks_mut(panel_rows::<T>(k) * PANEL)
        .enumerate()
        .for_each(|(p, panel)| {
            panel.fill(T::default());
            for c in 0..PANEL.min(n - p * PANEL) {
                let j = p * PANEL + c;
                for (kk, &v) in wt[j * k..][..k].iter().enumerate() {
                    panel[index::<T>(kk, c)] = conv(v, j);
                }
            }
        });
}
