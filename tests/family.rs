//! The GPT-2 family's shapes against Hugging Face `transformers`: reduced
//! checkpoints with the heads and width of distilgpt2, gpt2-medium,
//! gpt2-large and gpt2-xl (2 blocks, 2048 tokens, 256 positions), from
//! fixtures made by `weights/fixtures/make_family.py`: logits (a 200-token
//! prompt among them), greedy tokens through the KV cache, the checkpoint's
//! bytes, and the same checkpoint in the hub's naming.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::fixture::{family, ConfigCase};
use common::{argmax, assert_close};
use gpt2::synth::{self, Preset, SynthSpec};
use gpt2::{Gpt2Model, Row};
use sha2::{Digest, Sha256};

/// The same tolerances as `tests/reference.rs`.
const ATOL: f32 = 1e-4;
const RTOL: f32 = 1e-4;
const REGENERATE: &str = "if the model or generator changed on purpose, regenerate the fixtures: \
    `cargo build --release --bin gpt2 && python weights/fixtures/make_family.py` \
    (needs `pip install torch transformers safetensors numpy`)";

fn case(preset: Preset) -> &'static ConfigCase {
    let found = family()
        .manifest
        .configs
        .iter()
        .find(|c| c.preset == preset.name());
    found.expect("preset in family.json")
}

fn spec(c: &ConfigCase) -> SynthSpec {
    let r = c.reduced.expect("a family fixture is of a reduced shape");
    let preset = Preset::from_name(&c.preset).expect("a preset name");
    preset.reduced(r.n_layer, r.vocab_size, r.n_positions)
}

/// The reduced checkpoint of a case, written once into Cargo's per-target
/// temporary directory (config.json last: its presence means complete).
fn checkpoint(c: &ConfigCase) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let spec = spec(c);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("family-{}-{}", spec.name(), c.seed));
    if !dir.join("config.json").exists() {
        synth::write_spec(&dir, &spec, c.seed).expect("write the reduced checkpoint");
    }
    dir
}

fn sha256(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()))
}

fn check_bytes(c: &ConfigCase, dir: &Path) {
    assert_eq!(
        sha256(&dir.join("model.safetensors")),
        c.model_sha256,
        "the synthetic {} checkpoint (seed {}) is not the one the fixtures were made from; {REGENERATE}",
        spec(c).name(),
        c.seed
    );
}

/// The stored logits of every prompt, from one full forward over it.
fn check_logits(c: &ConfigCase, m: &Gpt2Model, what: &str) {
    let v = m.config.vocab_size;
    let mut max_abs = 0f32;
    for p in &c.prompts {
        let ours = m.logits_all(&p.ids, 64).unwrap();
        for (j, &pos) in p.positions.iter().enumerate() {
            let want = &family().logits[p.logits_offset + j * v..][..v];
            let what = format!(
                "{what} logits, prompt of {}, position {pos}; {REGENERATE}",
                p.ids.len()
            );
            max_abs = max_abs.max(assert_close(&what, &ours[pos * v..][..v], want, ATOL, RTOL));
        }
    }
    let version = &family().manifest.versions["transformers"];
    eprintln!("{what}: max abs logit diff vs transformers {version} = {max_abs:e}");
}

/// Greedy decoding through the KV cache, one row per step, as generation does.
fn check_greedy(c: &ConfigCase, m: &Gpt2Model, what: &str) {
    let v = m.config.vocab_size;
    for p in &c.prompts {
        let mut cache = m.new_cache().expect("cache");
        let mut scratch = m.new_scratch(p.ids.len()).expect("scratch");
        let rows: Vec<Row> = (p.ids.iter().enumerate())
            .map(|(pos, &token)| Row {
                seq: 0,
                token,
                pos,
                logits: pos + 1 == p.ids.len(),
            })
            .collect();
        let mut next = argmax(m.forward(&rows, &mut [&mut cache], &mut scratch).unwrap());
        let (mut out, mut last) = (vec![next], Vec::new());
        while out.len() < p.greedy.len() {
            let row = Row {
                seq: 0,
                token: next,
                pos: cache.len(),
                logits: true,
            };
            let logits = m.forward(&[row], &mut [&mut cache], &mut scratch).unwrap();
            (next, last) = (argmax(logits), logits.to_vec());
            out.push(next);
        }
        let n = p.ids.len();
        assert_eq!(out, p.greedy, "{what} greedy ids, prompt of {n}; {REGENERATE}");
        let want = &family().logits[p.last_step_logits_offset..][..v];
        let what = format!("{what} logits of the last greedy step, prompt of {n}");
        assert_close(&what, &last, want, ATOL, RTOL);
    }
}

fn check_preset(preset: Preset) {
    let c = case(preset);
    let dir = checkpoint(c);
    check_bytes(c, &dir);
    let m = Gpt2Model::load(&dir).expect("load the reduced checkpoint");
    let what = spec(c).name();
    check_logits(c, &m, &what);
    check_greedy(c, &m, &what);
}

#[test]
fn distil_shape_matches_transformers() {
    check_preset(Preset::Distil);
}

#[test]
fn medium_shape_matches_transformers() {
    check_preset(Preset::Medium);
}

#[test]
fn large_shape_matches_transformers() {
    check_preset(Preset::Large);
}

#[test]
fn xl_shape_matches_transformers() {
    check_preset(Preset::Xl);
}

/// `src` as the hub's GPT-2 files name their tensors: no `transformer.`,
/// and each block's causal-mask buffers, `attn.bias (1, 1, P, P)` and
/// `attn.masked_bias ()` (what `make_family.py` writes, byte for byte).
fn write_hub_naming(src: &Path, dst: &Path, n_layer: usize, n_positions: usize) {
    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};
    let bytes = std::fs::read(src).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mask: Vec<u8> = (0..n_positions * n_positions)
        .flat_map(|i| f32::from(u8::from(i % n_positions <= i / n_positions)).to_le_bytes())
        .collect();
    let masked_bias = (-1e4f32).to_le_bytes();
    let mut tensors: Vec<(String, TensorView)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name.strip_prefix("transformer.").unwrap_or(&name).to_string(),
                view,
            )
        })
        .collect();
    for i in 0..n_layer {
        let shape = vec![1, 1, n_positions, n_positions];
        tensors.push((
            format!("h.{i}.attn.bias"),
            TensorView::new(Dtype::F32, shape, &mask).unwrap(),
        ));
        let scalar = TensorView::new(Dtype::F32, vec![], &masked_bias).unwrap();
        tensors.push((format!("h.{i}.attn.masked_bias"), scalar));
    }
    let metadata = Some([("format".to_string(), "pt".to_string())].into());
    safetensors::serialize_to_file(tensors, metadata, dst).unwrap();
}

/// The checkpoint renamed as the hub names GPT-2's tensors, mask buffers
/// included, is the file transformers read, and loads to the same logits.
#[test]
fn hub_naming_loads_to_the_same_logits() {
    let c = family()
        .manifest
        .configs
        .iter()
        .find(|c| c.hub_naming_sha256.is_some());
    let c = c.expect("a family fixture in the hub's naming");
    let (src, r) = (checkpoint(c), c.reduced.unwrap());
    let dir = common::scratch_dir("family-hub-naming");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    write_hub_naming(
        &src.join("model.safetensors"),
        &dir.join("model.safetensors"),
        r.n_layer,
        r.n_positions,
    );
    assert_eq!(
        Some(sha256(&dir.join("model.safetensors"))),
        c.hub_naming_sha256,
        "the renamed {} checkpoint is not the one transformers read; {REGENERATE}",
        c.preset
    );
    let m = Gpt2Model::load(&dir).expect("load the checkpoint in the hub's naming");
    check_logits(c, &m, &format!("{} in the hub's naming", spec(c).name()));
}
