//! The reference fixtures: logits and greedy tokens from Hugging Face
//! `transformers` on the synthetic checkpoints, made by
//! `weights/fixtures/make_reference.py` ([`fixture`]) and, for the family's
//! reduced shapes, `weights/fixtures/make_family.py` ([`family`]).

use std::collections::HashMap;
use std::sync::OnceLock;

use gpt2::synth::Preset;
use serde::Deserialize;

#[derive(Deserialize)]
pub struct Manifest {
    pub versions: HashMap<String, String>,
    pub logits_file: String,
    pub configs: Vec<ConfigCase>,
}

#[derive(Deserialize)]
pub struct ConfigCase {
    pub preset: String,
    pub seed: u64,
    pub model_sha256: String,
    pub prompts: Vec<PromptCase>,
    /// The reduced shape of a family fixture (`Preset::reduced`'s arguments).
    #[serde(default)]
    pub reduced: Option<Reduced>,
    /// The sha256 of the checkpoint renamed in the hub's naming, if made.
    #[serde(default)]
    pub hub_naming_sha256: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
pub struct Reduced {
    pub n_layer: usize,
    pub vocab_size: usize,
    pub n_positions: usize,
}

#[derive(Deserialize)]
pub struct PromptCase {
    pub ids: Vec<u32>,
    pub positions: Vec<usize>,
    pub logits_offset: usize,
    pub greedy: Vec<u32>,
    pub last_step_logits_offset: usize,
}

pub struct Fixture {
    pub manifest: Manifest,
    pub logits: Vec<f32>,
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| load("reference.json"))
}

/// The family's fixtures (`weights/fixtures/family.json`).
pub fn family() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| load("family.json"))
}

fn load(manifest: &str) -> Fixture {
    let dir = super::repo_root().join("weights/fixtures");
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join(manifest)).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join(&manifest.logits_file)).unwrap();
    let logits = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Fixture { manifest, logits }
}

pub fn case(preset: Preset) -> &'static ConfigCase {
    fixture()
        .manifest
        .configs
        .iter()
        .find(|c| c.preset == preset.name())
        .expect("preset in fixture")
}
