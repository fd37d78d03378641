//! The small kernels of a forward pass (layer norm, GELU, softmax, one
//! head's attention, the residual add) held to their naive twins
//! ([`reference`]) on every kernel set this CPU runs.

mod common;

use common::{assert_close, values};
use gpt2_kernels::{bf16_row_len, kv_row_bf16, reference, Kernels};
use half::bf16;

#[test]
fn layernorm_matches_naive() {
    for ks in Kernels::supported() {
        // Up to the lane width and past it, with a tail; 40 x 768 runs the rows in parallel.
        for &(m, c) in &[(1, 1), (3, 7), (5, 64), (2, 769), (1, 16), (4, 33), (40, 768)] {
            let x: Vec<f32> = values(m * c, 9).iter().map(|v| v * 3.0 + 0.5).collect();
            let (g, b) = (values(c, 10), values(c, 11));
            let (mut got, mut want) = (vec![0.0; m * c], vec![0.0; m * c]);
            ks.layernorm(&mut got, &x, &g, &b, 1e-5);
            reference::layernorm(&mut want, &x, &g, &b, 1e-5);
            assert_close(&format!("{ks}: layernorm m={m} c={c}"), &got, &want, 1e-5, 1e-5);
        }
    }
}

#[test]
fn gelu_matches_naive_small_and_parallel() {
    for ks in Kernels::supported() {
        for n in [1, 31, 100_003] {
            // Beyond +-10 too, where tanh saturates.
            let x: Vec<f32> = values(n, 12).iter().map(|v| v * 24.0).collect();
            let (mut got, mut want) = (x.clone(), x);
            ks.gelu_inplace(&mut got);
            reference::gelu(&mut want);
            assert_close(&format!("{ks}: gelu n={n}"), &got, &want, 1e-6, 1e-5);
        }
    }
}

#[test]
fn softmax_matches_naive_and_survives_large_inputs() {
    for ks in Kernels::supported() {
        for n in [1, 5, 1000] {
            let x: Vec<f32> = values(n, 13).iter().map(|v| v * 80.0).collect();
            let (mut got, mut want) = (x.clone(), x);
            ks.softmax_inplace(&mut got);
            reference::softmax(&mut want);
            assert_close(&format!("{ks}: softmax n={n}"), &got, &want, 1e-6, 1e-5);
            assert!((got.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }
}

#[test]
fn attention_head_matches_naive() {
    for ks in Kernels::supported() {
        for &(t, hd, stride) in &[(1, 1, 1), (3, 8, 24), (17, 64, 768), (100, 12, 36)] {
            let q = values(hd, 14);
            let (k, v) = (values(t * stride, 15), values(t * stride, 16));
            let (mut got, mut want) = (vec![0.0; hd], vec![0.0; hd]);
            let mut scores = vec![0.0; t + 3];
            let scale = 1.0 / (hd as f32).sqrt();
            ks.attention_head(&mut got, &q, &k, &v, t, stride, &mut scores, scale);
            reference::attention_head(&mut want, &q, &k, &v, t, stride, scale);
            assert_close(&format!("{ks}: attention t={t} hd={hd}"), &got, &want, 1e-6, 1e-5);
        }
    }
}

/// A bf16 cache gives, bit for bit, the attention of its values widened to
/// f32 (same sums, same order), on every set; and the rows round to nearest.
#[test]
fn attention_over_a_bf16_cache_is_attention_over_its_widened_values() {
    for ks in Kernels::supported() {
        // hd 64 (GPT-2), 67 (a tail past the lanes and a padded group), 8 (half a group);
        // t past the 8-key groups and the prefetch distance.
        for &(t, hd) in &[(1, 64), (9, 67), (300, 64), (33, 8)] {
            let row = bf16_row_len(hd);
            let stride = row + 16;
            let q = values(hd, 14);
            let (k, v) = (values(t * hd, 15), values(t * hd, 16));
            let (mut kb, mut vb) = (vec![0u16; t * stride], vec![0u16; t * stride]);
            for i in 0..t {
                kv_row_bf16(&mut kb[i * stride..][..row], &k[i * hd..][..hd]);
                kv_row_bf16(&mut vb[i * stride..][..row], &v[i * hd..][..hd]);
            }
            let widen = |x: &[f32]| -> Vec<f32> { x.iter().map(|&x| bf16::from_f32(x).to_f32()).collect() };
            let (kw, vw) = (widen(&k), widen(&v));
            let scale = 1.0 / (hd as f32).sqrt();
            let (mut got, mut want) = (vec![0.0; hd], vec![0.0; hd]);
            let mut scores = vec![0.0; t];
            ks.attention_head_bf16(&mut got, &q, &kb, &vb, t, stride, &mut scores, scale);
            ks.attention_head(&mut want, &q, &kw, &vw, t, hd, &mut scores, scale);
            assert_eq!(got, want, "{ks}: t={t} hd={hd}");
        }
    }
}

#[test]
fn a_bf16_cache_row_is_rounded_to_nearest_even_in_the_weights_layout() {
    let src: Vec<f32> = (0..20).map(|i| 1.0 + i as f32 / 3.0).collect();
    let mut row = vec![7u16; bf16_row_len(20)];
    assert_eq!(row.len(), 32);
    kv_row_bf16(&mut row, &src);
    let mut back: Vec<f32> = vec![0.0; 32];
    for (c, b) in back.iter_mut().enumerate() {
        // Columns 4-7 and 8-11 of each 16 swap places.
        let slot = c - c % 16 + [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15][c % 16];
        *b = bf16::from_bits(row[slot]).to_f32();
    }
    for (c, &x) in src.iter().enumerate() {
        assert_eq!(back[c], bf16::from_f32(x).to_f32(), "column {c}");
    }
    assert!(back[20..].iter().all(|&x| x == 0.0), "padding is zero: {back:?}");
}

#[test]
fn add_assign_adds() {
    for ks in Kernels::supported() {
        let mut a = vec![1.0, 2.0, 3.0];
        ks.add_assign(&mut a, &[0.5, -2.0, 1.0]);
        assert_eq!(a, vec![1.5, 0.0, 4.0], "{ks}");
    }
}
