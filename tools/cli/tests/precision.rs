//! How far bf16 and int8 weights move the logits from the f32 reference
//! (Hugging Face `transformers`, the committed fixtures), on the tiny and the
//! 124M synthetic checkpoints (random weights: no hub here). The tolerances
//! are stated in `docs/hot-path.md` ("Reduced precision"); each is tight
//! enough that a quantiser off by a factor of two in its step, or rounding by
//! truncation, fails it.

mod common;

use std::process::Command;

use common::fixture::{case, fixture};
use common::{argmax, synth_dir};
use gpt2::synth::Preset;
use gpt2::{Dtype, Gpt2Model};

/// How far one dtype's logits are from the reference.
#[derive(Debug)]
struct Drift {
    /// ‖ours − reference‖₂ / ‖reference‖₂ over every fixture position.
    rel_l2: f64,
    max_abs: f32,
    /// Positions of the reference greedy continuations (teacher-forced) where
    /// our argmax is the reference's next token, of how many.
    greedy: (usize, usize),
}

fn drift(preset: Preset, dtype: Dtype) -> Drift {
    let c = case(preset);
    let model = Gpt2Model::load_with(&synth_dir(preset, c.seed), dtype).unwrap();
    assert_eq!(model.dtype(), dtype);
    let v = model.config.vocab_size;
    let (mut err2, mut ref2, mut max_abs, mut agree, mut total) = (0f64, 0f64, 0f32, 0, 0);
    for p in &c.prompts {
        let ours = model.logits_all(&p.ids, 64).unwrap();
        for (j, &pos) in p.positions.iter().enumerate() {
            let want = &fixture().logits[p.logits_offset + j * v..][..v];
            for (&a, &b) in ours[pos * v..][..v].iter().zip(want) {
                err2 += ((a - b) as f64).powi(2);
                ref2 += (b as f64).powi(2);
                max_abs = max_abs.max((a - b).abs());
            }
        }
        // The reference's greedy continuation, fed in: at each step, does our
        // most likely next token agree?
        let seq: Vec<u32> = p
            .ids
            .iter()
            .chain(&p.greedy[..p.greedy.len() - 1])
            .copied()
            .collect();
        let logits = model.logits_all(&seq, 64).unwrap();
        for (i, &want) in p.greedy.iter().enumerate() {
            let pos = p.ids.len() - 1 + i;
            agree += usize::from(argmax(&logits[pos * v..][..v]) == want);
            total += 1;
        }
    }
    let d = Drift {
        rel_l2: (err2 / ref2).sqrt(),
        max_abs,
        greedy: (agree, total),
    };
    eprintln!(
        "{} {dtype}: relative L2 {:.3}%, max |diff| {:.4}, greedy agreement {}/{}",
        c.preset,
        d.rel_l2 * 100.0,
        d.max_abs,
        d.greedy.0,
        d.greedy.1
    );
    d
}

#[track_caller]
fn check(preset: Preset, dtype: Dtype, max_rel_l2: f64, min_agreement: f64) {
    let d = drift(preset, dtype);
    assert!(
        d.rel_l2 <= max_rel_l2,
        "{} {dtype}: relative L2 logit error {:.3}% > {:.3}%",
        preset.name(),
        d.rel_l2 * 100.0,
        max_rel_l2 * 100.0
    );
    let agreement = d.greedy.0 as f64 / d.greedy.1 as f64;
    assert!(
        agreement >= min_agreement,
        "{} {dtype}: greedy agreement {}/{} < {min_agreement}",
        preset.name(),
        d.greedy.0,
        d.greedy.1
    );
}

#[test]
fn f32_is_the_reference() {
    check(Preset::Tiny, Dtype::F32, 1e-5, 1.0);
}

#[test]
fn tiny_bf16_logits_stay_within_tolerance() {
    check(Preset::Tiny, Dtype::Bf16, TINY_BF16, 0.95);
}

#[test]
fn tiny_int8_logits_stay_within_tolerance() {
    check(Preset::Tiny, Dtype::Int8, TINY_INT8, 0.9);
}

#[test]
fn gpt2_124m_bf16_logits_stay_within_tolerance() {
    check(Preset::Gpt2_124M, Dtype::Bf16, BIG_BF16, 0.95);
}

#[test]
fn gpt2_124m_int8_logits_stay_within_tolerance() {
    check(Preset::Gpt2_124M, Dtype::Int8, BIG_INT8, 0.9);
}

/// `gpt2 logits --dtype bf16` prints what the bf16 model computes, not f32.
#[test]
fn the_logits_command_computes_in_the_asked_dtype() {
    let dir = synth_dir(Preset::Tiny, case(Preset::Tiny).seed);
    let tokens = [3u32, 1, 4, 1, 5];
    let run = |dtype: &str| -> Vec<f32> {
        let out = Command::new(env!("CARGO_BIN_EXE_gpt2"))
            .args(["logits", "--tokens", "3,1,4,1,5", "--dtype", dtype, "--weights"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["dtype"], dtype);
        let rows = json["logits"].as_array().unwrap();
        rows.iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32))
            .collect()
    };
    let f32_logits = run("f32");
    for dtype in [Dtype::Bf16, Dtype::Int8] {
        let want = Gpt2Model::load_with(&dir, dtype)
            .unwrap()
            .logits_all(&tokens, 64)
            .unwrap();
        let got = run(dtype.as_str());
        assert_eq!(got, want, "{dtype}: the command's logits are the {dtype} model's");
        assert_ne!(got, f32_logits, "{dtype}: the command's logits are not f32's");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(["logits", "--tokens", "1", "--dtype", "fp8", "--weights"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`fp8`"), "{err}");
}

// The stated tolerances (docs/hot-path.md, "Reduced precision"): relative L2
// logit error against the f32 reference, 1.3 to 1.5 times what was measured
// (tiny 0.21% and 1.06%, 124M 0.45% and 3.06%; int8 quantises the
// activations per row too, which took it from 0.79% and 2.07% with f32
// activations); a step twice too coarse in the weights or in the
// activations, or truncation, fails. The bounds are 1% (bf16) and
// 5% (int8) on the 124M checkpoint.
const TINY_BF16: f64 = 0.003;
const TINY_INT8: f64 = 0.016;
const BIG_BF16: f64 = 0.006;
const BIG_INT8: f64 = 0.045;
