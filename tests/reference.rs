//! gpt2-rs against Hugging Face `transformers`: logits and greedy tokens on
//! synthetic checkpoints, from fixtures made by `weights/fixtures/make_reference.py`.

mod common;

use std::sync::OnceLock;

use common::fixture::{case, fixture};
use common::{argmax, assert_close, synth_dir};
use gpt2::synth::Preset;
use gpt2::{Gpt2Model, Row};
use sha2::{Digest, Sha256};

const ATOL: f32 = 1e-4;
const RTOL: f32 = 1e-4;
const REGENERATE: &str = "if the model or generator changed on purpose, regenerate the fixtures: \
    `cargo build --release --bin gpt2 && python weights/fixtures/make_reference.py` \
    (needs `pip install torch transformers safetensors numpy`)";

/// One model per preset, loaded once per test binary.
fn model(preset: Preset) -> &'static Gpt2Model {
    static TINY: OnceLock<Gpt2Model> = OnceLock::new();
    static BIG: OnceLock<Gpt2Model> = OnceLock::new();
    let cell = if preset == Preset::Tiny { &TINY } else { &BIG };
    cell.get_or_init(|| Gpt2Model::load(&synth_dir(preset, case(preset).seed)).expect("load synthetic model"))
}

fn check_logits(preset: Preset) {
    let (c, m) = (case(preset), model(preset));
    let v = m.config.vocab_size;
    let mut max_abs = 0f32;
    for p in &c.prompts {
        let ours = m.logits_all(&p.ids, 64).unwrap();
        for (j, &pos) in p.positions.iter().enumerate() {
            let want = &fixture().logits[p.logits_offset + j * v..][..v];
            let what = format!(
                "{} logits, prompt {:?}, position {pos}; {REGENERATE}",
                c.preset, p.ids
            );
            max_abs = max_abs.max(assert_close(&what, &ours[pos * v..][..v], want, ATOL, RTOL));
        }
    }
    eprintln!(
        "{}: max abs logit diff vs transformers {} = {max_abs:e}",
        c.preset,
        fixture().manifest.versions["transformers"]
    );
}

/// Greedy decoding through the KV cache, one row per step, as generation does.
fn check_greedy(preset: Preset) {
    let (c, m) = (case(preset), model(preset));
    let v = m.config.vocab_size;
    for p in &c.prompts {
        let mut cache = m.new_cache().expect("cache");
        let mut scratch = m.new_scratch(p.ids.len()).expect("scratch");
        let rows: Vec<Row> = p
            .ids
            .iter()
            .enumerate()
            .map(|(pos, &token)| Row {
                seq: 0,
                token,
                pos,
                logits: pos + 1 == p.ids.len(),
            })
            .collect();
        let mut next = argmax(m.forward(&rows, &mut [&mut cache], &mut scratch).unwrap());
        let mut out = vec![next];
        let mut last = Vec::new();
        while out.len() < p.greedy.len() {
            let row = Row {
                seq: 0,
                token: next,
                pos: cache.len(),
                logits: true,
            };
            let logits = m.forward(&[row], &mut [&mut cache], &mut scratch).unwrap();
            next = argmax(logits);
            last = logits.to_vec();
            out.push(next);
        }
        assert_eq!(
            out, p.greedy,
            "{} greedy ids for prompt {:?}; {REGENERATE}",
            c.preset, p.ids
        );
        let want = &fixture().logits[p.last_step_logits_offset..][..v];
        let what = format!("{} logits of the last greedy step, prompt {:?}", c.preset, p.ids);
        assert_close(&what, &last, want, ATOL, RTOL);
    }
}

fn check_checkpoint_bytes(preset: Preset) {
    let c = case(preset);
    let bytes = std::fs::read(synth_dir(preset, c.seed).join("model.safetensors")).unwrap();
    let digest = format!("{:x}", Sha256::digest(&bytes));
    assert_eq!(
        digest, c.model_sha256,
        "the synthetic {} checkpoint (seed {}) is not the one the fixtures were made from; {REGENERATE}",
        c.preset, c.seed
    );
}

#[test]
fn tiny_synthetic_checkpoint_is_byte_identical_to_the_fixtures() {
    check_checkpoint_bytes(Preset::Tiny);
}

#[test]
fn tiny_logits_match_transformers() {
    check_logits(Preset::Tiny);
}

#[test]
fn tiny_greedy_matches_transformers() {
    check_greedy(Preset::Tiny);
}

#[test]
fn gpt2_124m_synthetic_checkpoint_is_byte_identical_to_the_fixtures() {
    check_checkpoint_bytes(Preset::Gpt2_124M);
}

#[test]
fn gpt2_124m_logits_match_transformers() {
    check_logits(Preset::Gpt2_124M);
}

#[test]
fn gpt2_124m_greedy_matches_transformers() {
    check_greedy(Preset::Gpt2_124M);
}
