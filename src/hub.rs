//! Where the weights come from: one resolution shared by every binary.
//!
//! In order: `--weights DIR` (a local Hugging Face directory); `--synthetic`;
//! else `--model ID` (default `gpt2`) from the Hugging Face cache, or
//! downloaded into it with `hf-hub` unless `HF_HUB_OFFLINE` is set. If that
//! fails (no network), one notice on stderr and the deterministic synthetic
//! 124M checkpoint, generated once under `weights/synthetic/` and reused.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::synth::{self, Preset};
use crate::tokenizer::Gpt2Tokenizer;

/// The seed of the default synthetic checkpoint.
pub const SYNTHETIC_SEED: u64 = 0;

/// How long a download may take before we give up: the first, small file
/// doubles as a probe of the network and gets a short bound.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What the user asked for (the `--weights`/`--model`/`--synthetic` flags).
#[derive(Debug, Clone, clap::Args)]
pub struct WeightsArgs {
    /// A local checkpoint directory (config.json + model.safetensors).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["model", "synthetic"])]
    pub weights: Option<PathBuf>,
    /// A Hugging Face model id, looked up in the HF cache or downloaded.
    #[arg(long, value_name = "ID", default_value = "gpt2")]
    pub model: String,
    /// Use the deterministic synthetic GPT-2 124M checkpoint (random weights).
    #[arg(long, conflicts_with = "weights")]
    pub synthetic: bool,
    /// A tokenizer.json to use instead of the checkpoint's or the built-in GPT-2 one.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
}

/// Where the weights in use came from; printed with every output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    Local { dir: PathBuf },
    Hub { model_id: String, revision: String },
    Synthetic { preset: String, seed: u64 },
}

impl fmt::Display for WeightsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightsSource::Local { dir } => write!(f, "local checkpoint {}", dir.display()),
            WeightsSource::Hub { model_id, revision } => write!(f, "hub {model_id} @ {revision}"),
            WeightsSource::Synthetic { preset, seed } => {
                write!(
                    f,
                    "SYNTHETIC {preset} checkpoint, seed {seed} (random weights: the text is noise)"
                )
            }
        }
    }
}

/// A checkpoint directory ready to load, and where it came from.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub dir: PathBuf,
    pub source: WeightsSource,
    /// `tokenizer.json` to use; `None` means the built-in GPT-2 tokenizer.
    pub tokenizer: Option<PathBuf>,
}

impl Resolved {
    pub fn load_tokenizer(&self) -> Result<Gpt2Tokenizer> {
        match &self.tokenizer {
            Some(path) => Gpt2Tokenizer::from_file(path),
            None => Ok(Gpt2Tokenizer::builtin()),
        }
    }
}

/// Resolves the flags to a checkpoint directory. Notices go to stderr.
pub fn resolve(args: &WeightsArgs) -> Result<Resolved> {
    let mut resolved = if let Some(dir) = &args.weights {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
            ));
        }
        let tok = dir.join("tokenizer.json");
        Resolved {
            dir: dir.clone(),
            source: WeightsSource::Local { dir: dir.clone() },
            tokenizer: tok.is_file().then_some(tok),
        }
    } else if args.synthetic {
        synthetic(Preset::Gpt2_124M, SYNTHETIC_SEED)?
    } else {
        match from_hub(&args.model) {
            Ok(r) => r,
            Err(why) => {
                eprintln!(
                    "notice: could not get `{}` from the Hugging Face hub ({why}); falling back to the \
                     deterministic SYNTHETIC GPT-2 124M checkpoint (seed {SYNTHETIC_SEED}, random weights) \
                     with the built-in GPT-2 tokenizer. Pass --weights DIR to use a local checkpoint.",
                    args.model
                );
                synthetic(Preset::Gpt2_124M, SYNTHETIC_SEED)?
            }
        }
    };
    if let Some(t) = &args.tokenizer {
        resolved.tokenizer = Some(t.clone());
    }
    Ok(resolved)
}

/// The synthetic checkpoint of `preset` and `seed` under `weights/synthetic/`,
/// generated on first use.
pub fn synthetic(preset: Preset, seed: u64) -> Result<Resolved> {
    let dir = synthetic_root().join(format!("{}-seed{seed}", preset.name()));
    // config.json is written last, so its presence means a complete checkpoint.
    if !dir.join("config.json").is_file() {
        eprintln!(
            "generating the synthetic {} checkpoint into {} (once) ...",
            preset.name(),
            dir.display()
        );
        synth::write_checkpoint(&dir, preset, seed)?;
    }
    Ok(Resolved {
        dir,
        source: WeightsSource::Synthetic {
            preset: preset.name().into(),
            seed,
        },
        tokenizer: None,
    })
}

/// `weights/synthetic` in the source tree (git-ignored), or `GPT2_RS_SYNTHETIC_DIR`.
fn synthetic_root() -> PathBuf {
    std::env::var_os("GPT2_RS_SYNTHETIC_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/synthetic"))
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "False"))
}

/// The cache first (honouring `HF_HOME`), then a bounded download.
fn from_hub(model_id: &str) -> Result<Resolved, String> {
    const FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(model_id.to_string());
    let cached: Vec<Option<PathBuf>> = FILES.iter().map(|f| repo.get(f)).collect();
    let paths: Vec<PathBuf> = if let [Some(c), Some(m), Some(t)] = &cached[..] {
        vec![c.clone(), m.clone(), t.clone()]
    } else if offline() {
        return Err(format!(
            "HF_HUB_OFFLINE is set and it is not in the cache at {}",
            cache.path().display()
        ));
    } else {
        let mut paths = Vec::new();
        for (i, file) in FILES.iter().enumerate() {
            let timeout = if i == 0 { PROBE_TIMEOUT } else { DOWNLOAD_TIMEOUT };
            paths.push(download(model_id, file, timeout)?);
        }
        paths
    };
    let dir = paths[0]
        .parent()
        .ok_or("cache path without a parent")?
        .to_path_buf();
    if paths.iter().any(|p| p.parent() != Some(&dir)) {
        return Err("config.json and model.safetensors are in different cache snapshots".into());
    }
    // The snapshot directory is named after the commit.
    let revision = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Resolved {
        dir,
        source: WeightsSource::Hub {
            model_id: model_id.into(),
            revision,
        },
        tokenizer: Some(paths[2].clone()),
    })
}

/// One file through `hf-hub`, on a helper thread so that a stalled connection
/// cannot hang us: after `timeout` we give up (the thread dies with the process).
fn download(model_id: &str, file: &str, timeout: Duration) -> Result<PathBuf, String> {
    let (tx, rx) = mpsc::channel();
    let (id, name) = (model_id.to_string(), file.to_string());
    std::thread::spawn(move || {
        let result = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()
            .and_then(|api| api.model(id).get(&name))
            .map_err(|e| e.to_string());
        let _ = tx.send(result);
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => r.map_err(|e| format!("{file}: {e}")),
        Err(_) => Err(format!("{file}: no answer within {} s", timeout.as_secs())),
    }
}
