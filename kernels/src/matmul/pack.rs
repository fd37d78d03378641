//! The packed weight layout: column panels of 48, built once at load.

use rayon::prelude::*;

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
///
/// [`linear_packed`]: super::linear_packed
/// [`linear`]: super::linear
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
