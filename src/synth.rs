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
//!
//! The file is streamed: its header first, then each tensor's bytes,
//! generated in pieces of [`PIECE`] values ([`IN_FLIGHT`] at a time, in
//! parallel) and written in order, so writing gpt2-xl (6.2 GB) holds tens of
//! MiB, never the file.

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

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

    /// `(n_layer, n_head, n_embd, n_positions)`; the vocabulary is GPT-2's [`VOCAB`].
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

    /// This preset's whole shape.
    pub fn spec(self) -> SynthSpec {
        let (n_layer, _, _, n_positions) = self.dims();
        SynthSpec {
            preset: self,
            n_layer,
            vocab_size: VOCAB,
            n_positions,
        }
    }

    /// This preset's attention geometry (its heads of 64, or tiny's of 16,
    /// so its width) with `n_layer` blocks, a `vocab_size` vocabulary and
    /// `n_positions` positions: a small checkpoint laid out as the big one.
    pub fn reduced(self, n_layer: usize, vocab_size: usize, n_positions: usize) -> SynthSpec {
        SynthSpec {
            preset: self,
            n_layer,
            vocab_size,
            n_positions,
        }
    }

    /// The text of the `config.json` we write for this preset.
    pub fn config_json(self, seed: u64) -> String {
        self.spec().config_json(seed)
    }

    pub fn config(self, seed: u64) -> Gpt2Config {
        self.spec().config(seed).expect("presets are valid configs")
    }
}

/// GPT-2's vocabulary size.
pub const VOCAB: usize = 50257;

/// The shape of a synthetic checkpoint: a preset's ([`Preset::spec`]) or a
/// preset's reduced ([`Preset::reduced`]). Heads and width are the preset's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthSpec {
    pub preset: Preset,
    pub n_layer: usize,
    pub vocab_size: usize,
    pub n_positions: usize,
}

impl SynthSpec {
    /// The preset's name, or for a reduced shape the preset and what changed,
    /// e.g. `xl-2l-v2048-p256`; written into `config.json`.
    pub fn name(&self) -> String {
        if *self == self.preset.spec() {
            self.preset.name().into()
        } else {
            let (p, l, v, n) = (
                self.preset.name(),
                self.n_layer,
                self.vocab_size,
                self.n_positions,
            );
            format!("{p}-{l}l-v{v}-p{n}")
        }
    }

    /// The text of the `config.json` we write: a valid Hugging Face GPT-2
    /// config (so `transformers` loads it) plus our provenance entry.
    pub fn config_json(&self, seed: u64) -> String {
        let (_, n_head, n_embd, _) = self.preset.dims();
        let config = serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_layer": self.n_layer,
            "n_head": n_head,
            "n_embd": n_embd,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_inner": null,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": 1e-5,
            "initializer_range": 0.02,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "tie_word_embeddings": true,
            "torch_dtype": "float32",
            "gpt2_rs_synthetic": SyntheticInfo { preset: self.name(), seed },
        });
        serde_json::to_string_pretty(&config).expect("a JSON literal serialises") + "\n"
    }

    /// The validated config: a reduced shape we refuse (no layer, no
    /// position) is an [`Error::InvalidArgument`] naming the problem.
    pub fn config(&self, seed: u64) -> Result<Gpt2Config> {
        Gpt2Config::from_json(&self.config_json(seed))
            .map_err(|msg| Error::InvalidArgument(format!("synthetic checkpoint {}: {msg}", self.name())))
    }
}

/// FNV-1a of a tensor name: gives each tensor its own stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
    })
}

/// SplitMix64's increment. Its state after `k` draws is its seed plus
/// `k` times this (a Weyl sequence), so a piece of a tensor can start its
/// stream where it lies without drawing what comes before it.
const SPLITMIX64_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Values `start..start + len` (`start` even) of a tensor's values
/// `mean + std * N(0, 1)`, as little-endian f32 bytes. Box-Muller in f64
/// through `libm`: the pair `2j, 2j + 1` comes from draws `2j, 2j + 1` of the
/// tensor's stream, whatever the pieces.
fn gaussian_bytes(stream: u64, start: usize, len: usize, mean: f64, std: f64) -> Vec<u8> {
    debug_assert!(start % 2 == 0, "a piece starts on a pair");
    let mut rng = SplitMix64::new(stream.wrapping_add((start as u64).wrapping_mul(SPLITMIX64_GAMMA)));
    let mut out = Vec::with_capacity(4 * (len + 1));
    while out.len() < 4 * len {
        let r = libm::sqrt(-2.0 * libm::log(rng.next_f64_nonzero()));
        let theta = 2.0 * std::f64::consts::PI * rng.next_f64_nonzero();
        out.extend_from_slice(&((mean + std * r * libm::cos(theta)) as f32).to_le_bytes());
        out.extend_from_slice(&((mean + std * r * libm::sin(theta)) as f32).to_le_bytes());
    }
    out.truncate(4 * len);
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

/// Writes the checkpoint of `preset` into `dir`: [`write_spec`] of its whole shape.
pub fn write_checkpoint(dir: &Path, preset: Preset, seed: u64) -> Result<()> {
    write_spec(dir, &preset.spec(), seed)
}

/// Writes `config.json` and `model.safetensors` of `spec` into `dir`
/// (created if needed). The weights are streamed into a temporary file that
/// is renamed when complete, and `config.json` is written last, so a
/// directory with a `config.json` holds a complete checkpoint even if an
/// earlier run was interrupted.
pub fn write_spec(dir: &Path, spec: &SynthSpec, seed: u64) -> Result<()> {
    let config = spec.config(seed)?;
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let model_path = dir.join("model.safetensors");
    // The process id keeps two writers of one cache directory apart.
    let tmp = dir.join(format!(".model.safetensors.{}.tmp", std::process::id()));
    let written = write_safetensors(&tmp, &config, seed, PIECE, IN_FLIGHT).map_err(write_err(&tmp));
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &model_path).map_err(write_err(&model_path)))
    {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, spec.config_json(seed)).map_err(write_err(&config_path))
}

/// Values generated per parallel task: 1 Mi values, 4 MiB.
const PIECE: usize = 1 << 20;
/// Pieces generated at once, then written in order: what the writer holds (64 MiB).
const IN_FLIGHT: usize = 16;

/// The tensors of a checkpoint of `config` in file order, by their names in
/// the file (`transformer.` and the canonical name), with their shapes.
fn file_tensors(config: &Gpt2Config) -> Vec<(String, String, Vec<usize>)> {
    // `expected_shapes` is sorted by name, as safetensors orders tensors of one dtype.
    expected_shapes(config)
        .into_iter()
        .map(|(name, shape)| (format!("transformer.{name}"), name, shape))
        .collect()
}

/// The header safetensors writes for these f32 tensors (its own `Metadata`,
/// padded with spaces to 8 bytes), preceded by its length.
fn header(tensors: &[(String, String, Vec<usize>)]) -> std::io::Result<Vec<u8>> {
    let mut offset = 0;
    let infos = tensors
        .iter()
        .map(|(name, _, shape)| {
            let end = offset + 4 * shape.iter().product::<usize>();
            let info = TensorInfo {
                dtype: Dtype::F32,
                shape: shape.clone(),
                data_offsets: (offset, end),
            };
            offset = end;
            (name.clone(), info)
        })
        .collect();
    let metadata = Some([("format".to_string(), "pt".to_string())].into());
    let json = Metadata::new(metadata, infos)
        .and_then(|m| Ok(serde_json::to_vec(&m)?))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let n = json.len().next_multiple_of(8);
    let mut out = (n as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.resize(8 + n, b' ');
    Ok(out)
}

/// Streams the safetensors file of `config` into `path`: the header, then
/// each tensor's values, `in_flight` pieces of `piece` values (even)
/// generated in parallel at a time.
fn write_safetensors(
    path: &Path,
    config: &Gpt2Config,
    seed: u64,
    piece: usize,
    in_flight: usize,
) -> std::io::Result<()> {
    let tensors = file_tensors(config);
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    file.write_all(&header(&tensors)?)?;
    for (_, name, shape) in &tensors {
        let (mean, std) = init(name, config.n_layer);
        let (stream, n) = (seed ^ name_hash(name), shape.iter().product::<usize>());
        let starts: Vec<usize> = (0..n).step_by(piece).collect();
        for group in starts.chunks(in_flight) {
            let pieces: Vec<Vec<u8>> = group
                .par_iter()
                .map(|&start| gaussian_bytes(stream, start, piece.min(n - start), mean, std))
                .collect();
            pieces.iter().try_for_each(|p| file.write_all(p))?;
        }
    }
    file.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer before streaming: every tensor in memory, serialised by
    /// `safetensors` itself. The streamed file must be byte for byte this.
    fn in_memory(config: &Gpt2Config, seed: u64) -> Vec<u8> {
        use safetensors::tensor::TensorView;
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = expected_shapes(config)
            .into_iter()
            .map(|(name, shape)| {
                let (mean, std) = init(&name, config.n_layer);
                let n = shape.iter().product();
                let bytes = gaussian_bytes(seed ^ name_hash(&name), 0, n, mean, std);
                (format!("transformer.{name}"), shape, bytes)
            })
            .collect();
        let views = tensors.iter().map(|(name, shape, bytes)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes).expect("length matches shape");
            (name.clone(), view)
        });
        let metadata = Some([("format".to_string(), "pt".to_string())].into());
        safetensors::serialize(views, metadata).unwrap()
    }

    fn values(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn gaussian_has_the_asked_moments_and_is_repeatable() {
        let v = values(&gaussian_bytes(7, 0, 100_001, 1.0, 0.5));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            (mean - 1.0).abs() < 0.01 && (var.sqrt() - 0.5).abs() < 0.01,
            "{mean} {var}"
        );
        assert_eq!(v, values(&gaussian_bytes(7, 0, 100_001, 1.0, 0.5)));
        assert_ne!(v[..10], values(&gaussian_bytes(8, 0, 10, 1.0, 0.5))[..]);
    }

    /// A piece started in the middle of a stream is that part of the whole
    /// stream, drawn from its start (odd lengths included).
    #[test]
    fn pieces_are_parts_of_the_whole_stream() {
        let whole = gaussian_bytes(11, 0, 1001, 0.0, 1.0);
        for (start, len) in [(0, 1), (2, 7), (500, 501), (1000, 1)] {
            assert_eq!(
                gaussian_bytes(11, start, len, 0.0, 1.0),
                whole[4 * start..4 * (start + len)],
                "{start} {len}"
            );
        }
    }

    /// The streamed writer writes what `safetensors` would: through
    /// `write_spec`, and in small pieces that split tensors over many groups.
    #[test]
    fn the_streamed_file_is_the_in_memory_one() {
        let dir = std::env::temp_dir().join(format!("gpt2-synth-stream-{}", std::process::id()));
        let odd = Preset::Tiny.reduced(1, 1001, 9);
        for (spec, seed) in [(Preset::Tiny.spec(), 0), (odd, 5)] {
            let want = in_memory(&spec.config(seed).unwrap(), seed);
            write_spec(&dir, &spec, seed).unwrap();
            let streamed = std::fs::read(dir.join("model.safetensors")).unwrap();
            assert!(streamed == want, "{}", spec.name());
            let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
            assert_eq!(config, spec.config_json(seed));
            let small = dir.join("small-pieces");
            write_safetensors(&small, &spec.config(seed).unwrap(), seed, 6, 3).unwrap();
            assert!(std::fs::read(&small).unwrap() == want, "{}", spec.name());
            std::fs::remove_file(small).unwrap();
        }
        let leftovers = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 2, "only config.json and model.safetensors remain");
        std::fs::remove_dir_all(&dir).unwrap();
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
            assert_eq!(preset.spec().name(), preset.name());
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

    /// A reduced preset keeps the heads and width, changes the rest, says so
    /// in its name, and a shape we refuse is an error naming it.
    #[test]
    fn reduced_presets_keep_the_geometry() {
        let spec = Preset::Xl.reduced(2, 2048, 256);
        let c = spec.config(1).unwrap();
        let dims = (
            c.n_layer,
            c.n_head,
            c.n_embd,
            c.n_inner,
            c.vocab_size,
            c.n_positions,
        );
        assert_eq!(dims, (2, 25, 1600, 6400, 2048, 256));
        assert_eq!(c.synthetic.unwrap().preset, "xl-2l-v2048-p256");
        let err = Preset::Xl
            .reduced(0, 2048, 256)
            .config(1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("xl-0l-v2048-p256"), "{err}");
    }
}
