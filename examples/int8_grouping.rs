//! Which int8 grouping to keep: one scale per output column (what the engine
//! does) against one scale per block of 32 weights along K, measured as the
//! logit error each gives on the synthetic 124M checkpoint (random weights:
//! the hub is out of reach here).
//!
//! Each grouping is simulated exactly in f32: every matrix the engine packs
//! is quantised and dequantised (`q · scale`) into a new checkpoint, which is
//! loaded in f32. The real int8 kernels (`--dtype int8`) are printed beside
//! them: they quantise each linear's input rows to int8 too (one scale per
//! row), so their error adds the activations' to the per-column weights'.
//!
//! `cargo run --release --example int8_grouping`

use std::path::Path;

use gpt2::synth::{self, Preset};
use gpt2::{Dtype, Gpt2Model};
use safetensors::tensor::TensorView;
use safetensors::{Dtype as FileDtype, SafeTensors};

/// Quantises `w` (`[rows, cols]`, row-major) to int8 and back, with one scale
/// per `group` consecutive values along `axis` K (`k_is_rows`: K indexes
/// rows, as in Conv1D `[in, out]`; else columns, as in `wte [V, C]`).
/// `group = None`: the whole of K (one scale per output).
fn fake_quantise(w: &mut [f32], rows: usize, cols: usize, k_is_rows: bool, group: Option<usize>) {
    let (k, n) = if k_is_rows { (rows, cols) } else { (cols, rows) };
    let at = |kk: usize, j: usize| if k_is_rows { kk * cols + j } else { j * cols + kk };
    let g = group.unwrap_or(k);
    for j in 0..n {
        for k0 in (0..k).step_by(g) {
            let ks = k0..(k0 + g).min(k);
            let scale = ks.clone().map(|kk| w[at(kk, j)].abs()).fold(0.0, f32::max) / 127.0;
            for kk in ks {
                let v = &mut w[at(kk, j)];
                *v = if scale > 0.0 {
                    (*v / scale).round_ties_even().clamp(-127.0, 127.0) * scale
                } else {
                    0.0
                };
            }
        }
    }
}

/// A copy of the checkpoint in `src` with every packed matrix fake-quantised.
fn write_variant(src: &Path, dst: &Path, group: Option<usize>) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let mut values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let matrix = name.ends_with(".weight") && shape.len() == 2 && !name.ends_with("wpe.weight");
        if matrix {
            // Conv1D weights are [in, out]: K is the rows; wte is [V, C]: K is C.
            let k_is_rows = !name.ends_with("wte.weight");
            fake_quantise(&mut values, shape[0], shape[1], k_is_rows, group);
        }
        tensors.push((name, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let views = tensors.iter().map(|(name, shape, b)| {
        (
            name.clone(),
            TensorView::new(FileDtype::F32, shape.clone(), b).unwrap(),
        )
    });
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
}

/// Relative L2 distance of `got` from `want`.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut e, mut r) = (0f64, 0f64);
    for (&a, &b) in got.iter().zip(want) {
        e += ((a - b) as f64).powi(2);
        r += (b as f64).powi(2);
    }
    (e / r).sqrt()
}

fn main() {
    let src = synth::cached(Preset::Gpt2_124M, 0, |_| {}).expect("synthetic checkpoint");
    println!("SYNTHETIC 124M checkpoint (random weights): {}", src.display());
    let tokens: Vec<u32> = (0..64).map(|i| (i * 7919 % 50_000) as u32).collect();
    let reference = Gpt2Model::load(&src).unwrap().logits_all(&tokens, 64).unwrap();
    let int8 = Gpt2Model::load_with(&src, Dtype::Int8)
        .unwrap()
        .logits_all(&tokens, 64)
        .unwrap();
    println!(
        "{:44} {:>14} {:>16}",
        "int8 grouping", "rel. L2 error", "bytes per weight"
    );
    let k = 768.0; // the smallest K of GPT-2's matrices
    println!(
        "{:44} {:>13.3}% {:>16.4}",
        "int8 kernels (per column, x per row)",
        rel_l2(&int8, &reference) * 100.0,
        1.0 + 4.0 / k
    );
    let tmp = std::env::temp_dir().join("gpt2-int8-grouping");
    for (label, group, bytes) in [
        ("per output column (simulated in f32)", None, 1.0 + 4.0 / k),
        ("per 32 along K (simulated in f32)", Some(32), 1.0 + 4.0 / 32.0),
    ] {
        let dir = tmp.join(group.map_or("column".into(), |g| format!("block{g}")));
        write_variant(&src, &dir, group);
        let logits = Gpt2Model::load(&dir).unwrap().logits_all(&tokens, 64).unwrap();
        println!(
            "{label:44} {:>13.3}% {bytes:>16.4}",
            rel_l2(&logits, &reference) * 100.0
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
