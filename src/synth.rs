//! Deterministic synthetic checkpoints: `config.json` + `model.safetensors`,
//! f32, `transformers` naming, the exact shape of a real GPT-2.
//!
//! Weights are N(0, 0.02) as GPT-2 initialises them (residual projections
//! scaled by 1/sqrt(2L)); layer norms and biases get non-trivial values so
//! that a test notices if one is ignored. Every tensor draws from its own
//! stream (a [`SplitMix64`] of [`crate::rng`]), seeded by the seed and the
//! tensor's name, and the Gaussian draws
//! use `libm` (pure Rust, identical everywhere) rather than the platform's
//! math library, so the file is byte-identical for a seed on every machine.

use std::path::{Path, PathBuf};

use safetensors::{tensor::TensorView, Dtype};

use crate::config::{Gpt2Config, SyntheticInfo};
use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use crate::specs::expected_shapes;

/// Named shapes we can generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Preset {
    /// distilgpt2: 6 layers, 12 heads, 768 channels, 1024 positions, 82M parameters.
    Distil,
    /// GPT-2 small: 12 layers, 12 heads, 768 channels, 1024 positions, 124M parameters.
    #[cfg_attr(feature = "clap", value(name = "124m"))]
    Gpt2_124M,
    /// gpt2-medium: 24 layers, 16 heads, 1024 channels, 1024 positions, 355M parameters.
    Medium,
    /// gpt2-large: 36 layers, 20 heads, 1280 channels, 1024 positions, 774M parameters.
    Large,
    /// gpt2-xl: 48 layers, 25 heads, 1600 channels, 1024 positions, 1.56B parameters.
    Xl,
    /// 2 layers, 4 heads, 64 channels, 128 positions, the full GPT-2 vocabulary.
    Tiny,
}

impl Preset {
    /// Every preset, smallest real model first.
    pub const ALL: [Preset; 6] = [
        Preset::Distil,
        Preset::Gpt2_124M,
        Preset::Medium,
        Preset::Large,
        Preset::Xl,
        Preset::Tiny,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Distil => "distil",
            Preset::Gpt2_124M => "124m",
            Preset::Medium => "medium",
            Preset::Large => "large",
            Preset::Xl => "xl",
            Preset::Tiny => "tiny",
        }
    }

    /// The preset a name ([`Preset::name`]) stands for.
    pub fn from_name(name: &str) -> Option<Preset> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name.trim()))
    }

    /// `(n_layer, n_head, n_embd, n_positions)`; the vocabulary is GPT-2's 50257.
    fn dims(self) -> (usize, usize, usize, usize) {
        match self {
            Preset::Distil => (6, 12, 768, 1024),
            Preset::Gpt2_124M => (12, 12, 768, 1024),
            Preset::Medium => (24, 16, 1024, 1024),
            Preset::Large => (36, 20, 1280, 1024),
            Preset::Xl => (48, 25, 1600, 1024),
            Preset::Tiny => (2, 4, 64, 128),
        }
    }

    /// The text of the `config.json` we write: a valid Hugging Face GPT-2
    /// config (so `transformers` loads it) plus our provenance entry.
    pub fn config_json(self, seed: u64) -> String {
        let (n_layer, n_head, n_embd, n_positions) = self.dims();
        let config = serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_layer": n_layer,
            "n_head": n_head,
            "n_embd": n_embd,
            "n_positions": n_positions,
            "n_ctx": n_positions,
            "n_inner": null,
            "vocab_size": 50257,
            "layer_norm_epsilon": 1e-5,
            "initializer_range": 0.02,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "tie_word_embeddings": true,
            "torch_dtype": "float32",
            "gpt2_rs_synthetic": SyntheticInfo { preset: self.name().into(), seed },
        });
        serde_json::to_string_pretty(&config).expect("a JSON literal serialises") + "\n"
    }

    pub fn config(self, seed: u64) -> Gpt2Config {
        Gpt2Config::from_json(&self.config_json(seed)).expect("presets are valid configs")
    }
}

/// FNV-1a of a tensor name: gives each tensor its own stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
    })
}

/// `n` values `mean + std * N(0, 1)` (Box-Muller, in f64 through `libm`).
fn gaussian(seed: u64, name: &str, n: usize, mean: f64, std: f64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed ^ name_hash(name));
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let r = libm::sqrt(-2.0 * libm::log(rng.next_f64_nonzero()));
        let theta = 2.0 * std::f64::consts::PI * rng.next_f64_nonzero();
        out.push((mean + std * r * libm::cos(theta)) as f32);
        out.push((mean + std * r * libm::sin(theta)) as f32);
    }
    out.truncate(n);
    out
}

/// The value distribution of each tensor, by canonical name.
fn init(name: &str, n_layer: usize) -> (f64, f64) {
    if name.ends_with("ln_1.weight") || name.ends_with("ln_2.weight") || name == "ln_f.weight" {
        (1.0, 0.1)
    } else if name.contains("ln_") && name.ends_with(".bias") {
        (0.0, 0.05)
    } else if name.ends_with("c_proj.weight") {
        (0.0, 0.02 / (2.0 * n_layer as f64).sqrt())
    } else {
        (0.0, 0.02)
    }
}

/// Where generated synthetic checkpoints are kept: `GPT2_RS_SYNTHETIC_DIR`,
/// else `weights/synthetic` in the source tree (git-ignored).
pub fn cache_root() -> PathBuf {
    std::env::var_os("GPT2_RS_SYNTHETIC_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/synthetic"))
}

/// The synthetic checkpoint of `preset` and `seed` under [`cache_root`],
/// written on first use (`on_write` is told where, before). `config.json` is
/// written last, so its presence means a complete checkpoint.
pub fn cached(preset: Preset, seed: u64, on_write: impl FnOnce(&Path)) -> Result<PathBuf> {
    let dir = cache_root().join(format!("{}-seed{seed}", preset.name()));
    if !dir.join("config.json").is_file() {
        on_write(&dir);
        write_checkpoint(&dir, preset, seed)?;
    }
    Ok(dir)
}

/// Writes `config.json` and `model.safetensors` into `dir` (created if needed).
/// The weights file is written to a temporary file and renamed, and
/// `config.json` is written last, so a directory with a `config.json` holds a
/// complete checkpoint even if an earlier run was interrupted.
pub fn write_checkpoint(dir: &Path, preset: Preset, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Write {
        path: dir.to_owned(),
        source: e,
    })?;
    let config = preset.config(seed);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = expected_shapes(&config)
        .into_iter()
        .map(|(name, shape)| {
            let (mean, std) = init(&name, config.n_layer);
            let values = gaussian(seed, &name, shape.iter().product(), mean, std);
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (format!("transformer.{name}"), shape, bytes)
        })
        .collect();
    let views = tensors.iter().map(|(name, shape, bytes)| {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes).expect("length matches shape");
        (name.clone(), view)
    });
    let metadata = Some([("format".to_string(), "pt".to_string())].into());
    let model_path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, metadata, &model_path).map_err(|e| Error::Write {
        path: model_path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, preset.config_json(seed)).map_err(|e| Error::Write {
        path: config_path,
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_has_the_asked_moments_and_is_repeatable() {
        let v = gaussian(7, "x", 100_001, 1.0, 0.5);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            (mean - 1.0).abs() < 0.01 && (var.sqrt() - 0.5).abs() < 0.01,
            "{mean} {var}"
        );
        assert_eq!(v, gaussian(7, "x", 100_001, 1.0, 0.5));
        assert_ne!(v[..10], gaussian(7, "y", 10, 1.0, 0.5)[..]);
    }

    /// The parameter counts of the Hugging Face models each preset copies.
    #[test]
    fn presets_have_the_family_s_parameter_counts() {
        let want = [
            (Preset::Distil, 81_912_576),
            (Preset::Gpt2_124M, 124_439_808),
            (Preset::Medium, 354_823_168),
            (Preset::Large, 774_030_080),
            (Preset::Xl, 1_557_611_200),
        ];
        for (preset, n) in want {
            assert_eq!(preset.config(0).n_params(), n, "{}", preset.name());
            assert_eq!(Preset::from_name(preset.name()), Some(preset));
        }
        assert_eq!(Preset::from_name("XL"), Some(Preset::Xl));
        assert_eq!(Preset::from_name("gpt3"), None);
    }

    #[test]
    fn presets_parse() {
        let c = Preset::Gpt2_124M.config(3);
        assert_eq!((c.n_layer, c.n_embd, c.vocab_size), (12, 768, 50257));
        assert_eq!(c.synthetic.unwrap().seed, 3);
    }
}
