//! The reduced weight formats, bf16 and int8: their conversions and
//! packing, the packed panels held to their naive twins ([`reference`]),
//! and int8's exact integer sums, the same bits on every kernel set.

mod common;

use common::{assert_close, values, ROWS};
use gpt2_kernels::matmul::to_bf16;
use gpt2_kernels::{pack, pack_t, packed_bytes, reference, Dtype, Kernels, Panels, PanelsMut, PANEL};

/// `w[K, N]` packed in `dtype`, in a buffer of u32 (4-byte aligned).
fn packed(dtype: Dtype, w: &[f32], k: usize, n: usize) -> Vec<u32> {
    let mut buf = vec![u32::MAX; packed_bytes(dtype, k, n) / 4];
    let dst = PanelsMut::from_bytes(dtype, bytemuck::cast_slice_mut(&mut buf), k, n);
    pack(dst, w, k, n);
    buf
}

fn panels(dtype: Dtype, buf: &[u32], k: usize, n: usize) -> Panels<'_> {
    Panels::from_bytes(dtype, bytemuck::cast_slice(buf), k, n)
}

/// The stored `[K, N]` layout of packed int8 panels: `(q, scales)`.
fn unpack_int8(p: Panels, k: usize, n: usize) -> (Vec<i8>, Vec<f32>) {
    let Panels::Int8 { q, scales } = p else {
        panic!("not int8")
    };
    let mut out = vec![0i8; k * n];
    let k4 = k.next_multiple_of(4);
    for kk in 0..k {
        for j in 0..n {
            // Four rows of a column side by side, 48 columns a group.
            let (p, c) = (j / PANEL, j % PANEL);
            out[kk * n + j] = q[p * k4 * PANEL + (kk / 4 * PANEL + c) * 4 + kk % 4];
        }
    }
    (out, scales[..n].to_vec())
}

/// Round to nearest even, not truncation; NaN kept; overflow to infinity.
#[test]
fn bf16_rounds_to_nearest_even() {
    let bits = |v: f32| to_bf16(v).to_bits();
    assert_eq!(bits(f32::from_bits(0x3f80_8000)), 0x3f80, "a tie to even (down)");
    assert_eq!(bits(f32::from_bits(0x3f81_8000)), 0x3f82, "a tie to even (up)");
    assert_eq!(
        bits(f32::from_bits(0x3f80_c000)),
        0x3f81,
        "above half rounds up, not truncates"
    );
    assert_eq!(
        bits(f32::from_bits(0xbf80_7fff)),
        0xbf80,
        "below half rounds down"
    );
    assert!(to_bf16(f32::NAN).to_f32().is_nan());
    assert_eq!(to_bf16(f32::MAX).to_f32(), f32::INFINITY);
    let mut xs = values(20_000, 40);
    for (i, v) in xs.iter_mut().enumerate() {
        *v *= 10f32.powi(i as i32 % 60 - 30);
    }
    for v in xs {
        assert_eq!(
            (bits(v) as u32) << 16,
            reference::round_bf16(v).to_bits(),
            "{v:e}"
        );
    }
}

/// Each column's largest magnitude maps to ±127, every value to its
/// nearest step: a scale off by two, or rounding by truncation, fails.
#[test]
fn int8_quantiser_uses_the_full_range_and_rounds_to_nearest() {
    let (k, n) = (301, 129);
    let mut w = values(k * n, 41);
    for (i, v) in w.iter_mut().enumerate() {
        *v *= 10f32.powi((i % n) as i32 % 5 - 2); // columns of different magnitude
    }
    for kk in 0..k {
        w[kk * n + 7] = 0.0; // an all-zero column
    }
    let buf = packed(Dtype::Int8, &w, k, n);
    let (q, scales) = unpack_int8(panels(Dtype::Int8, &buf, k, n), k, n);
    assert_eq!(
        (q.clone(), scales.clone()),
        reference::quantize_int8(&w, k, n),
        "the naive twin"
    );
    for j in 0..n {
        let col = |kk: usize| (w[kk * n + j], q[kk * n + j]);
        let max_q = (0..k).map(|kk| col(kk).1.unsigned_abs()).max().unwrap();
        if j == 7 {
            assert_eq!((scales[j], max_q), (0.0, 0), "zero column");
            continue;
        }
        assert_eq!(max_q, 127, "column {j}: the largest weight maps to 127");
        let absmax = (0..k).map(|kk| col(kk).0.abs()).fold(0.0, f32::max);
        assert_eq!(scales[j], absmax / 127.0, "column {j}: scale");
        for kk in 0..k {
            let (v, qv) = col(kk);
            let err = (qv as f32 * scales[j] - v).abs();
            assert!(
                err <= 0.5 * scales[j] * (1.0 + 1e-5),
                "w[{kk},{j}] = {v}: q {qv}, error {err}"
            );
        }
    }
}

#[test]
fn a_non_finite_weight_survives_conversion_where_the_check_sees_it() {
    let (k, n) = (5, 50);
    for (at, bad) in [(3 * n + 49, f32::NAN), (n + 2, f32::INFINITY), (0, f32::MAX)] {
        let mut w = values(k * n, 42);
        w[at] = bad;
        // f32::MAX is finite, but past bf16's range.
        let dtypes: &[_] = match bad == f32::MAX {
            true => &[Dtype::Bf16],
            false => &[Dtype::Bf16, Dtype::Int8],
        };
        for &dtype in dtypes {
            let buf = packed(dtype, &w, k, n);
            let p = panels(dtype, &buf, k, n);
            assert!(p.any_non_finite(), "{dtype} with {bad} at {at}");
            let mut col = vec![0.0; k];
            p.unpack_column(&mut col, k, at % n);
            assert!(col.iter().any(|v| !v.is_finite()), "{dtype}: column {}", at % n);
        }
    }
}

#[test]
fn linear_panels_match_their_naive_twins_on_odd_shapes() {
    for ks in Kernels::variants() {
        for &m in &ROWS {
            for &(k, n) in &[
                (1, 1),
                (7, 3),
                (65, 33),
                (33, 100),
                (96, 257),
                (301, 129),
                (24, 336),
            ] {
                let (x, w, b) = (values(m * k, 43), values(k * n, 44), values(n, 45));
                let mut want = vec![0.0; m * n];
                let mut got = vec![f32::NAN; m * n];
                let what = |d: &str| format!("{ks}: {d} m={m} k={k} n={n}");

                let buf = packed(Dtype::Bf16, &w, k, n);
                let bits: Vec<u16> = w.iter().map(|&v| to_bf16(v).to_bits()).collect();
                reference::linear_bf16(&mut want, &x, &bits, &b, m, k, n);
                ks.linear_panels(&mut got, &x, panels(Dtype::Bf16, &buf, k, n), Some(&b), m, k, n);
                assert_close(&what("bf16"), &got, &want, 1e-5, 1e-5);

                // Integer sums are exact: the same bits as the twin.
                let buf = packed(Dtype::Int8, &w, k, n);
                let p = panels(Dtype::Int8, &buf, k, n);
                let (q, scales) = unpack_int8(p, k, n);
                reference::linear_int8(&mut want, &x, &q, &scales, &b, m, k, n);
                ks.linear_panels(&mut got, &x, p, Some(&b), m, k, n);
                assert_eq!(got, want, "{}", what("int8"));
                ks.linear_panels(&mut got, &x, p, None, m, k, n);
                reference::linear_int8(&mut want, &x, &q, &scales, &vec![0.0; n], m, k, n);
                assert_eq!(got, want, "{}", what("int8 without bias"));
            }
        }
    }
}

/// The contract of `linear_packed`, in every format: a row's result is
/// the same bits whatever else is in the batch and whatever the pool.
#[test]
fn every_dtype_s_results_do_not_depend_on_batch_or_threads() {
    for ks in Kernels::variants() {
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for dtype in Dtype::ALL {
            for &(k, n) in &[(65, 33), (301, 129), (768, 200)] {
                let m = 40;
                let (x, w, b) = (values(m * k, 46), values(k * n, 47), values(n, 48));
                let buf = packed(dtype, &w, k, n);
                let p = panels(dtype, &buf, k, n);
                let mut all = vec![0.0; m * n];
                ks.linear_panels(&mut all, &x, p, Some(&b), m, k, n);
                for rows in [1, 2, 3, 4, 5, 7, 8, 9, 17, 33] {
                    for (r0, pool) in [(0, &one), (m - rows, &three), ((m - rows) / 2, &one)] {
                        let mut got = vec![0.0; rows * n];
                        let xs = &x[r0 * k..(r0 + rows) * k];
                        pool.install(|| ks.linear_panels(&mut got, xs, p, Some(&b), rows, k, n));
                        assert_eq!(
                            got,
                            all[r0 * n..(r0 + rows) * n],
                            "{ks}: {dtype} k={k} n={n} rows {r0}+{rows}"
                        );
                    }
                }
            }
        }
    }
}

/// The int8 products are exact integer sums: every kernel set, with VNNI
/// and without, computes the same bits, at K that fill four-row groups
/// or not, with rows of zeros, one huge value, and x at ±127 steps that
/// would saturate a careless 16-bit sum.
#[test]
fn int8_is_the_same_bits_on_every_kernel_set() {
    let variants = Kernels::variants();
    eprintln!(
        "int8 compared on {}",
        variants
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for &(m, k, n) in &[
        (1, 1, 1),
        (3, 5, 50),
        (9, 31, 97),
        (17, 768, 96),
        (5, 3072, 48),
        (33, 130, 145),
        // Quantised in parallel.
        (24, 3072, 50),
        // Whole panels in four and two streams, and some left over.
        (1, 64, 980),
        (2, 64, 980),
    ] {
        let mut x = values(m * k, 52);
        x[..k].fill(0.0); // a row of zeros
        if m > 1 {
            x[k] = 1e6; // one value that dwarfs its row
        }
        if m > 2 {
            for (i, v) in x[2 * k..3 * k].iter_mut().enumerate() {
                *v = if i % 2 == 0 { 1.0 } else { -1.0 }; // every q at ±127
            }
        }
        let mut w = values(k * n, 53);
        for v in w.iter_mut().step_by(3) {
            *v = v.signum(); // weights at ±127 too
        }
        let buf = packed(Dtype::Int8, &w, k, n);
        let p = panels(Dtype::Int8, &buf, k, n);
        let (q, scales) = unpack_int8(p, k, n);
        let b = values(n, 54);
        let mut want = vec![0.0; m * n];
        reference::linear_int8(&mut want, &x, &q, &scales, &b, m, k, n);
        for ks in &variants {
            let mut got = vec![f32::NAN; m * n];
            ks.linear_panels(&mut got, &x, p, Some(&b), m, k, n);
            assert_eq!(got, want, "{ks}: m={m} k={k} n={n}");
        }
    }
}

/// A row's quantisation is the naive twin's, and a NaN or infinity in a
/// row makes that row's outputs NaN, never finite garbage; the other
/// rows are untouched.
#[test]
fn int8_activations_quantise_per_row_and_carry_non_finite_values() {
    let (m, k) = (4, 67);
    let mut x = values(m * k, 55);
    x[k + 3] = f32::NAN;
    x[2 * k + 9] = f32::INFINITY;
    for ks in Kernels::variants() {
        let mut q = vec![1; m * 68];
        let (mut sx, mut sums) = (vec![0.0; m], vec![0; m]);
        ks.quantize_rows(&mut q, &mut sx, &mut sums, &x, m, k);
        for r in [0, 3] {
            let (want_q, want_s) = reference::quantize_row_int8(&x[r * k..(r + 1) * k]);
            assert_eq!(&q[r * 68..r * 68 + k], &want_q[..], "{ks}: row {r}");
            assert_eq!(&q[r * 68 + k..(r + 1) * 68], &[0i8], "{ks}: row {r}: the padding");
            assert_eq!(sx[r], want_s, "{ks}: row {r}");
            assert_eq!(
                sums[r],
                want_q.iter().map(|&v| v as i32).sum::<i32>(),
                "{ks}: row {r}"
            );
            assert!(
                want_q.iter().any(|&v| v.unsigned_abs() == 127),
                "row {r} uses the full range"
            );
        }
        assert!(sx[1].is_nan() && sx[2].is_infinite(), "{ks}: {sx:?}");
    }
    let (k, n) = (k, 50);
    let w = values(k * n, 56);
    let buf = packed(Dtype::Int8, &w, k, n);
    for ks in Kernels::variants() {
        let mut out = vec![0.0; m * n];
        ks.linear_panels(&mut out, &x, panels(Dtype::Int8, &buf, k, n), None, m, k, n);
        for r in 0..m {
            let row = &out[r * n..(r + 1) * n];
            match r {
                1 | 2 => assert!(row.iter().all(|v| v.is_nan()), "{ks}: row {r}"),
                _ => assert!(row.iter().all(|v| v.is_finite()), "{ks}: row {r}"),
            }
        }
    }
}

/// The LM head is packed from `wte`, a slab of whole panels at a time: the
/// same bytes as packing its transpose in one call.
#[test]
fn pack_t_in_slabs_packs_the_transpose() {
    for dtype in Dtype::ALL {
        for &(k, n, slab) in &[(1, 1, 48), (3, 50, 48), (65, 197, 96), (16, 480, 480)] {
            let w = values(k * n, 49);
            let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect(); // [N, K]
            let want = packed(dtype, &w, k, n);
            let mut got = vec![7u32; packed_bytes(dtype, k, n) / 4];
            for from in (0..n).step_by(slab) {
                let to = (from + slab).min(n);
                let dst = PanelsMut::from_bytes(dtype, bytemuck::cast_slice_mut(&mut got), k, n);
                pack_t(dst, &wt[from * k..to * k], k, n, from..to);
            }
            assert_eq!(got, want, "{dtype} k={k} n={n} in slabs of {slab}");
            let p = panels(dtype, &got, k, n);
            let mut row = vec![f32::NAN; k];
            for j in [0, n / 2, n - 1] {
                p.unpack_column(&mut row, k, j);
                let exact: Vec<f32> = match dtype {
                    Dtype::F32 => wt[j * k..(j + 1) * k].to_vec(),
                    Dtype::Bf16 => wt[j * k..(j + 1) * k]
                        .iter()
                        .map(|&v| reference::round_bf16(v))
                        .collect(),
                    Dtype::Int8 => {
                        let (q, s) = unpack_int8(p, k, n);
                        (0..k).map(|kk| q[kk * n + j] as f32 * s[j]).collect()
                    }
                };
                assert_eq!(row, exact, "{dtype}: row {j} of wt");
            }
        }
    }
}
