//! What the kernels' test binaries share: their inputs, the tolerance
//! check, the row counts.

// The inputs the crate's unit tests use too: one generator, not a copy.
#[path = "../../src/test_data.rs"]
mod test_data;

pub(crate) use test_data::values;

/// `|a - b| <= atol + rtol * |b|` everywhere; the message names the worst index.
#[track_caller]
pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let (mut worst, mut worst_i) = (0f32, 0);
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let excess = (a - b).abs() - (atol + rtol * b.abs());
        if excess > worst || a.is_nan() {
            (worst, worst_i) = (excess.max(f32::MIN_POSITIVE), i);
        }
    }
    assert!(
        worst <= 0.0,
        "{what}: index {worst_i}: got {} want {} (tolerance {atol} + {rtol}*|want|)",
        got[worst_i],
        want[worst_i]
    );
}

/// Row counts that cover every tile shape and its edges.
#[allow(dead_code)] // not every test binary multiplies matrices
pub(crate) const ROWS: [usize; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33];
