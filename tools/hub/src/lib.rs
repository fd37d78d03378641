//! Where the weights come from: one resolution shared by every binary.
//!
//! In order: `--weights DIR` (a local Hugging Face directory);
//! `--synthetic-preset NAME` or `--synthetic` (= `--synthetic-preset 124m`);
//! else `--model ID` (default `gpt2`) from the Hugging Face cache, or
//! downloaded into it with `hf-hub` unless `HF_HUB_OFFLINE` is set. If that
//! fails (no network), one notice on stderr and the deterministic synthetic
//! checkpoint of the model's shape (124M for a model not of the GPT-2
//! family), generated once under `weights/synthetic/` and reused.
//!
//! Hub files are pinned and verified: `gpt2` resolves to a fixed commit whose
//! three files' SHA-256 are known here; any other model, the rest of the family
//! (`distilgpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`) included, to
//! `--revision` (default `main`: we know no published SHA-256 of their files to
//! pin), each file checked against the hash the hub named it by (its cache
//! blob's name: the SHA-256 of an LFS file, the git blob id of a small one). A
//! mismatch, or a cached file we cannot check, is an error that names the
//! file, never a silent fallback.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use sha2::Sha256;

use gpt2::error::{Error, Result};
use gpt2::synth::{self, Preset};
use gpt2::tokenizer::Gpt2Tokenizer;

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
    /// A Hugging Face model id, looked up in the HF cache or downloaded: `gpt2`
    /// (pinned), `distilgpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` or any other.
    #[arg(long, value_name = "ID", default_value = "gpt2")]
    pub model: String,
    /// Use the deterministic synthetic GPT-2 124M checkpoint (random weights);
    /// the same as `--synthetic-preset 124m`.
    #[arg(long, conflicts_with = "weights")]
    pub synthetic: bool,
    /// Use the deterministic synthetic checkpoint of this shape (random
    /// weights, generated once under weights/synthetic/; xl is 6.2 GB).
    #[arg(long, value_name = "PRESET", conflicts_with_all = ["weights", "model", "synthetic"])]
    pub synthetic_preset: Option<Preset>,
    /// The hub revision (branch, tag or commit) of `--model`. Default: the
    /// pinned commit for `gpt2`, `main` for any other model.
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// A tokenizer.json to use instead of the checkpoint's or the built-in GPT-2 one.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
}

/// `--dtype`: the format the linear layers' weights are converted to at
/// load; `--kv-dtype`: the format of the KV caches.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct DtypeArgs {
    /// Weight format of the linear layers and the LM head: f32, bf16 or int8
    /// (activations, biases, norms and attention stay f32).
    #[arg(long, default_value_t = gpt2::Dtype::F32)]
    pub dtype: gpt2::Dtype,
    /// Format of the KV cache's keys and values: f32, or bf16 (half the bytes a
    /// decode step reads from a long context; rounded to nearest even as written).
    #[arg(long, value_name = "KV_DTYPE", default_value_t = gpt2::KvDtype::F32)]
    pub kv_dtype: gpt2::KvDtype,
}

/// `--kernels`: which instruction set's kernels run (chosen once, before any kernel).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct KernelArgs {
    /// Kernel instruction set: avx512, avx2 or portable, with the set's VNNI int8 products
    /// where the CPU has them (`+novnni` leaves them out, `+vnni` requires them; the results
    /// are the same bits). Default: $GPT2_KERNELS, else the best this CPU runs. A set the CPU
    /// lacks is an error, never a silent fallback.
    #[arg(long, value_name = "SET", global = true)]
    pub kernels: Option<gpt2_kernels::KernelSpec>,
}

impl KernelArgs {
    /// Chooses the process's kernel set: the flag, else `GPT2_KERNELS`, else the best.
    /// Call it first in `main`, before any model is loaded.
    pub fn init(&self) -> std::result::Result<gpt2_kernels::Kernels, gpt2_kernels::KernelsError> {
        gpt2_kernels::init(self.kernels)
    }
}

/// Where the weights in use came from; printed with every output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    Local { dir: PathBuf },
    Hub { model_id: String, revision: String },
    Synthetic { preset: String, seed: u64 },
}

impl WeightsSource {
    /// This source in words for every output: a synthetic checkpoint passed as a local
    /// directory (`marked`: the `gpt2_rs_synthetic` entry our generator writes into
    /// `config.json`) says that it is synthetic, as the generated fallback does.
    pub fn describe(&self, marked: Option<&gpt2::config::SyntheticInfo>) -> String {
        match (self, marked) {
            (WeightsSource::Local { .. }, Some(info)) => format!(
                "{self} (SYNTHETIC {} checkpoint, seed {}: random weights, the text is noise)",
                info.preset, info.seed
            ),
            _ => self.to_string(),
        }
    }

    /// Whether the weights are random: generated here, or marked so by our generator.
    pub fn is_synthetic(&self, marked: Option<&gpt2::config::SyntheticInfo>) -> bool {
        marked.is_some() || matches!(self, WeightsSource::Synthetic { .. })
    }
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

impl WeightsArgs {
    /// The synthetic checkpoint asked for, if one is: `--synthetic-preset`,
    /// else 124M for `--synthetic`.
    pub fn synthetic_choice(&self) -> Option<Preset> {
        let plain = self.synthetic.then_some(Preset::Gpt2_124M);
        self.synthetic_preset.or(plain)
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
    } else if let Some(preset) = args.synthetic_choice() {
        synthetic(preset, SYNTHETIC_SEED)?
    } else {
        match from_hub(&args.model, args.revision.as_deref()) {
            Ok(r) => r,
            Err(HubError::Refused(e)) => return Err(e),
            Err(HubError::Unreachable(why)) => {
                let preset = model_preset(&args.model).unwrap_or(Preset::Gpt2_124M);
                eprintln!(
                    "notice: could not get `{}` from the Hugging Face hub ({why}); falling back to the \
                     deterministic SYNTHETIC GPT-2 {} checkpoint (seed {SYNTHETIC_SEED}, random weights) \
                     with the built-in GPT-2 tokenizer. Pass --weights DIR to use a local checkpoint.",
                    args.model,
                    preset.name()
                );
                synthetic(preset, SYNTHETIC_SEED)?
            }
        }
    };
    if let Some(t) = &args.tokenizer {
        resolved.tokenizer = Some(t.clone());
    }
    Ok(resolved)
}

/// The synthetic checkpoint of `preset` and `seed` ([`synth::cached`]:
/// under `weights/synthetic/`, generated on first use).
pub fn synthetic(preset: Preset, seed: u64) -> Result<Resolved> {
    let dir = synth::cached(preset, seed, |dir| {
        eprintln!(
            "generating the synthetic {} checkpoint into {} (once) ...",
            preset.name(),
            dir.display()
        )
    })?;
    Ok(Resolved {
        dir,
        source: WeightsSource::Synthetic {
            preset: preset.name().into(),
            seed,
        },
        tokenizer: None,
    })
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "False"))
}

/// The three files of a checkpoint on the hub, in the order we fetch them.
const HUB_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// A model of the GPT-2 family on the hub: its ids (the short one the hub
/// redirects, and its organisation's), its shape, and its pin if we have one.
struct FamilyModel {
    ids: &'static [&'static str],
    preset: Preset,
    pin: Option<Pinned>,
}

/// A revision and the hashes of its files, known here.
struct Pinned {
    revision: &'static str,
    /// SHA-256 of each of [`HUB_FILES`], in that order.
    sha256: [&'static str; 3],
}

/// The family. `gpt2` is pinned to its `main` as of when it was pinned here,
/// whose files we hashed. The others resolve to `main`, each file checked
/// against its cache blob's name: we found no published SHA-256 of their
/// files to pin (their snapshot commits appear in public code, but nothing
/// says which holds which bytes).
const FAMILY: [FamilyModel; 5] = [
    FamilyModel {
        ids: &["gpt2", "openai-community/gpt2"],
        preset: Preset::Gpt2_124M,
        pin: Some(Pinned {
            revision: "607a30d783dfa663caf39e06633721c8d4cfcd7e",
            sha256: [
                "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4",
                "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
                "8414cab924d8b9b33013f0d221c5862f365ee9be39c5c2bfae8a5a9e970478a6",
            ],
        }),
    },
    FamilyModel {
        ids: &["distilgpt2", "distilbert/distilgpt2"],
        preset: Preset::Distil,
        pin: None,
    },
    FamilyModel {
        ids: &["gpt2-medium", "openai-community/gpt2-medium"],
        preset: Preset::Medium,
        pin: None,
    },
    FamilyModel {
        ids: &["gpt2-large", "openai-community/gpt2-large"],
        preset: Preset::Large,
        pin: None,
    },
    FamilyModel {
        ids: &["gpt2-xl", "openai-community/gpt2-xl"],
        preset: Preset::Xl,
        pin: None,
    },
];

fn family(model_id: &str) -> Option<&'static FamilyModel> {
    FAMILY.iter().find(|m| m.ids.contains(&model_id))
}

fn pinned(model_id: &str) -> Option<&'static Pinned> {
    family(model_id).and_then(|m| m.pin.as_ref())
}

/// The synthetic preset of a hub model of the GPT-2 family (`gpt2-xl` → xl),
/// the shape its fallback takes; `None` for any other model.
pub fn model_preset(model_id: &str) -> Option<Preset> {
    family(model_id).map(|m| m.preset)
}

/// Why the hub gave us nothing: unreachable (fall back to the synthetic
/// checkpoint) or refused (a file failed its check: an error, no fallback).
enum HubError {
    Unreachable(String),
    Refused(Error),
}

impl From<String> for HubError {
    fn from(why: String) -> Self {
        HubError::Unreachable(why)
    }
}

impl From<&str> for HubError {
    fn from(why: &str) -> Self {
        HubError::Unreachable(why.into())
    }
}

/// The cache first (honouring `HF_HOME`), then a bounded download; then every
/// file is verified.
fn from_hub(model_id: &str, revision: Option<&str>) -> Result<Resolved, HubError> {
    let pin = pinned(model_id);
    let revision = match (revision, pin) {
        (Some(r), _) => r.to_string(),
        (None, Some(p)) => p.revision.to_string(),
        (None, None) => "main".to_string(),
    };
    let repo = hf_hub::Repo::with_revision(model_id.to_string(), hf_hub::RepoType::Model, revision.clone());
    let cache = hf_hub::Cache::from_env();
    let paths: Vec<PathBuf> = if let Some(paths) = cached_snapshot(cache.path(), &repo) {
        paths
    } else if offline() {
        return Err(format!(
            "HF_HUB_OFFLINE is set and revision {revision} is not in the cache at {}",
            cache.path().display()
        )
        .into());
    } else {
        let mut paths = Vec::new();
        for (i, file) in HUB_FILES.iter().enumerate() {
            let timeout = if i == 0 { PROBE_TIMEOUT } else { DOWNLOAD_TIMEOUT };
            paths.push(download(&repo, file, timeout)?);
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
    let commit = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Asked for a branch of a pinned model: its commit must be the pinned one.
    if let Some(p) = pin.filter(|p| revision == p.revision) {
        if commit != p.revision {
            return Err(HubError::Refused(Error::Integrity {
                path: dir,
                what: "snapshot commit",
                expected: p.revision.into(),
                got: commit,
            }));
        }
    }
    for (i, path) in paths.iter().enumerate() {
        let expected = match pin.filter(|p| p.revision == commit) {
            Some(p) => Expected::Sha256(p.sha256[i].into()),
            None => expected_from_blob(path).map_err(HubError::Refused)?,
        };
        verify_file(path, &expected).map_err(HubError::Refused)?;
    }
    Ok(Resolved {
        dir,
        source: WeightsSource::Hub {
            model_id: model_id.into(),
            revision: commit,
        },
        tokenizer: Some(paths[2].clone()),
    })
}

/// The cached files of `repo` at its revision (a commit, or a branch through
/// `refs/`), if all three are there.
fn cached_snapshot(cache: &Path, repo: &hf_hub::Repo) -> Option<Vec<PathBuf>> {
    let root = cache.join(repo.folder_name());
    let rev = repo.revision();
    let commit = if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) {
        rev.to_string()
    } else {
        std::fs::read_to_string(root.join("refs").join(rev))
            .ok()?
            .trim()
            .to_string()
    };
    let dir = root.join("snapshots").join(commit);
    let paths: Vec<PathBuf> = HUB_FILES.iter().map(|f| dir.join(f)).collect();
    paths.iter().all(|p| p.is_file()).then_some(paths)
}

/// The digest a file must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// Hex SHA-256 of the bytes (an LFS file's id on the hub).
    Sha256(String),
    /// Hex git blob id: SHA-1 of `blob <len>\0` and the bytes (a small file's id).
    GitBlob(String),
}

/// What the hub said a cached file is: `hf-hub` and `huggingface_hub` store
/// each file as `blobs/<etag>` and link the snapshot to it, and the etag is
/// the SHA-256 of an LFS file or the git blob id of a small one.
pub fn expected_from_blob(path: &Path) -> Result<Expected> {
    let target = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hex = name.bytes().all(|b| b.is_ascii_hexdigit());
    match name.len() {
        64 if hex => Ok(Expected::Sha256(name.to_ascii_lowercase())),
        40 if hex => Ok(Expected::GitBlob(name.to_ascii_lowercase())),
        _ => Err(Error::Integrity {
            path: path.to_owned(),
            what: "hub hash",
            expected: "a cache blob named by its hash".into(),
            got: format!(
                "{} (cannot verify it; pass its directory with --weights to use it as is)",
                target.display()
            ),
        }),
    }
}

/// Hashes `path` (streaming, 1 MiB at a time) and fails on a mismatch,
/// naming the file and both digests.
pub fn verify_file(path: &Path, expected: &Expected) -> Result<()> {
    use gpt2::files::hex_digest;
    let (what, want, got) = match expected {
        Expected::Sha256(want) => ("sha256", want, hex_digest::<Sha256>(path, b"")?),
        Expected::GitBlob(want) => {
            let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
            let header = format!("blob {len}\0");
            (
                "git blob id",
                want,
                hex_digest::<sha1::Sha1>(path, header.as_bytes())?,
            )
        }
    };
    if got != *want {
        return Err(Error::Integrity {
            path: path.to_owned(),
            what,
            expected: want.clone(),
            got,
        });
    }
    Ok(())
}

/// One file through `hf-hub`, on a helper thread so that a stalled connection
/// cannot hang us: after `timeout` we give up (the thread dies with the process).
fn download(repo: &hf_hub::Repo, file: &str, timeout: Duration) -> Result<PathBuf, String> {
    let (tx, rx) = mpsc::channel();
    let (repo, name) = (repo.clone(), file.to_string());
    std::thread::spawn(move || {
        let result = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()
            .and_then(|api| api.repo(repo).get(&name))
            .map_err(|e| e.to_string());
        let _ = tx.send(result);
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => r.map_err(|e| format!("{file}: {e}")),
        Err(_) => Err(format!("{file}: no answer within {} s", timeout.as_secs())),
    }
}
