//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use gpt2::synth::{self, Preset};

pub mod fixture;

/// A synthetic checkpoint of `preset` and `seed`, written once into Cargo's
/// per-target temporary directory and reused by later tests and runs.
pub fn synth_dir(preset: Preset, seed: u64) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("synth-{}-{seed}", preset.name()));
    // config.json is written last, so its presence means a complete checkpoint.
    if !dir.join("config.json").exists() {
        synth::write_checkpoint(&dir, preset, seed).expect("write synthetic checkpoint");
    }
    dir
}

/// The repository root, from whichever crate's tests include this file
/// (the engine's at the root, or a tool's under `tools/`).
pub fn repo_root() -> &'static Path {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    dir.ancestors()
        .find(|d| d.join("kernels").is_dir() && d.join("tools").is_dir())
        .unwrap_or(dir)
}

/// A fresh, empty directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Index of the largest value (the first one on ties, like torch.argmax).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Asserts `|a - b| <= atol + rtol * |b|` everywhere and returns the max abs
/// difference; on failure names the worst index and how to regenerate.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let (mut max_abs, mut worst, mut worst_i) = (0f32, f32::NEG_INFINITY, 0);
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let d = (a - b).abs();
        max_abs = max_abs.max(d);
        let excess = if d.is_nan() {
            f32::INFINITY
        } else {
            d - (atol + rtol * b.abs())
        };
        if excess > worst {
            (worst, worst_i) = (excess, i);
        }
    }
    assert!(
        worst <= 0.0,
        "{what}: max abs diff {max_abs:e}; worst index {worst_i}: got {} want {} \
         (tolerance {atol:e} + {rtol:e}*|want|)",
        got[worst_i],
        want[worst_i]
    );
    max_abs
}

/// A copy of the tiny checkpoint with every `h.0.mlp.c_fc.weight` value at
/// 3e38: finite, so the loader accepts it, but the MLP overflows to inf/NaN.
pub fn overflowing_checkpoint(name: &str) -> PathBuf {
    use safetensors::tensor::{Dtype, TensorView};
    let src = synth_dir(Preset::Tiny, 0);
    let dir = scratch_dir(name);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let huge: Vec<u8> = std::iter::repeat_n(3e38f32.to_le_bytes(), 1 << 20)
        .flatten()
        .collect();
    let tensors: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            if name.ends_with("h.0.mlp.c_fc.weight") {
                let shape = view.shape().to_vec();
                let n = view.data().len();
                (name, TensorView::new(Dtype::F32, shape, &huge[..n]).unwrap())
            } else {
                (name, view)
            }
        })
        .collect();
    safetensors::serialize_to_file(tensors, None, &dir.join("model.safetensors")).unwrap();
    dir
}
