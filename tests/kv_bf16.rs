//! The KV cache in bf16 (`--kv-dtype bf16`): a row's logits are the same
//! bits whatever its batch, as with f32, and the rounding of keys and values
//! moves the logits of a long context by a bounded amount
//! (`docs/hot-path.md`, "The KV cache in bf16").

mod common;

use std::sync::Arc;

use common::synth_dir;
use gpt2::synth::Preset;
use gpt2::{Dtype, GenerateOptions, Gpt2Model, KvDtype, Row, Scheduler, SchedulerConfig, Session};

fn model(preset: Preset, kv: KvDtype) -> Gpt2Model {
    let model = Gpt2Model::load_with(&synth_dir(preset, 0), Dtype::F32).unwrap();
    model.with_kv_dtype(kv)
}

/// `n` seeded token ids below 50 000.
fn tokens(n: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|j| ((seed * 7919 + j * 104_729) % 50_000) as u32)
        .collect()
}

#[test]
fn a_bf16_cache_gives_each_row_the_same_bits_batched_or_alone() {
    let m = model(Preset::Tiny, KvDtype::Bf16);
    assert_eq!(m.new_cache().unwrap().dtype(), KvDtype::Bf16);
    let (a, b) = (tokens(40, 1), tokens(25, 2));
    // Alone: each sequence's logits at every position.
    let alone = |p: &[u32]| m.logits_all(p, 7).unwrap();
    let (want_a, want_b) = (alone(&a), alone(&b));
    // Together: rows of both sequences interleaved in every batch.
    let (mut ca, mut cb) = (m.new_cache().unwrap(), m.new_cache().unwrap());
    let mut scratch = m.new_scratch(16).unwrap();
    let v = m.config.vocab_size;
    for pos in 0..a.len() {
        let mut rows = vec![Row {
            seq: 0,
            token: a[pos],
            pos,
            logits: true,
        }];
        if pos < b.len() {
            rows.push(Row {
                seq: 1,
                token: b[pos],
                pos,
                logits: true,
            });
        }
        let got = m.forward(&rows, &mut [&mut ca, &mut cb], &mut scratch).unwrap();
        assert_eq!(got[..v], want_a[pos * v..][..v], "sequence a, position {pos}");
        if pos < b.len() {
            assert_eq!(
                got[v..2 * v],
                want_b[pos * v..][..v],
                "sequence b, position {pos}"
            );
        }
    }
}

#[test]
fn the_scheduler_with_a_bf16_cache_reproduces_each_request_alone() {
    let m = Arc::new(model(Preset::Tiny, KvDtype::Bf16));
    let opts = GenerateOptions::greedy(12);
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| tokens(3 + 9 * i, i)).collect();
    let config = SchedulerConfig {
        max_batch: 4,
        max_prompt_rows: 10,
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::new(Arc::clone(&m), config).unwrap();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| sched.submit(p.clone(), opts.clone()).unwrap())
        .collect();
    for (p, h) in prompts.iter().zip(handles) {
        let batched = h.wait().unwrap();
        let alone = Session::new(&m, p.len())
            .unwrap()
            .generate(&m, p, &opts, |_| {})
            .unwrap();
        assert_eq!(batched.tokens, alone.tokens, "prompt of {} tokens", p.len());
    }
}

/// ‖bf16 − f32‖₂ / ‖f32‖₂ of the logits at `positions` of one long prompt,
/// and how many of those positions keep their argmax.
fn drift_at(positions: &[usize]) -> (f64, usize) {
    let prompt = tokens(positions.iter().max().unwrap() + 1, 3);
    let logits = |kv| model(Preset::Gpt2_124M, kv).logits_all(&prompt, 128).unwrap();
    let (exact, rounded) = (logits(KvDtype::F32), logits(KvDtype::Bf16));
    let v = 50257;
    let (mut err2, mut ref2, mut same) = (0f64, 0f64, 0);
    for &pos in positions {
        let (a, b) = (&rounded[pos * v..][..v], &exact[pos * v..][..v]);
        for (&x, &y) in a.iter().zip(b) {
            err2 += ((x - y) as f64).powi(2);
            ref2 += (y as f64).powi(2);
        }
        same += usize::from(common::argmax(a) == common::argmax(b));
    }
    ((err2 / ref2).sqrt(), same)
}

#[test]
fn a_bf16_cache_moves_the_logits_at_position_900_by_little() {
    let positions = [0, 100, 500, 899, 900];
    let (rel_l2, same) = drift_at(&positions);
    eprintln!("124M synthetic, bf16 KV vs f32 KV: relative L2 {rel_l2:.2e}, argmax kept at {same}/5");
    // Measured: 1.04e-3 (the bf16 weights move the same logits by 4.5e-3,
    // `docs/hot-path.md`). The bound is 1.4x that, so truncating instead of
    // rounding to nearest (about twice the error) or a row in the wrong
    // slot fails it.
    assert!(rel_l2 < 1.5e-3, "relative L2 {rel_l2}");
    assert_eq!(same, positions.len(), "the most likely token changed");
}
