//! The small kernels of a forward pass (layer norm, GELU, softmax, one
//! head's attention, the residual add) held to their naive twins
//! ([`reference`]) on every kernel set this CPU runs.

mod common;

use common::{assert_close, values};
use gpt2_kernels::{reference, Kernels};

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

#[test]
fn add_assign_adds() {
    for ks in Kernels::supported() {
        let mut a = vec![1.0, 2.0, 3.0];
        ks.add_assign(&mut a, &[0.5, -2.0, 1.0]);
        assert_eq!(a, vec![1.5, 0.0, 4.0], "{ks}");
    }
}
