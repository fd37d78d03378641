//! Weights resolution. One test function: it sets process environment
//! variables, which must not race with other tests in this binary.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::path::Path;

use common::scratch_dir;
use gpt2::synth::{self, Preset};
use gpt2_hub::{resolve, WeightsArgs, WeightsSource};

fn args(model: &str) -> WeightsArgs {
    WeightsArgs {
        weights: None,
        model: model.into(),
        synthetic: false,
        synthetic_preset: None,
        revision: None,
        tokenizer: None,
    }
}

/// Moves each file of a snapshot into `blobs/<id>` (its SHA-256 if `lfs`,
/// else its git blob id) and links it back, as `hf-hub` lays out a cache.
fn as_blobs(repo: &Path, snapshot: &Path) {
    use sha2::Digest;
    let blobs = repo.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    for entry in std::fs::read_dir(snapshot).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let lfs = path.file_name().unwrap() == "model.safetensors";
        let id: Vec<u8> = if lfs {
            sha2::Sha256::digest(&bytes).to_vec()
        } else {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {}\0", bytes.len()).as_bytes());
            h.update(&bytes);
            h.finalize().to_vec()
        };
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::rename(&path, blobs.join(&id)).unwrap();
        std::os::unix::fs::symlink(blobs.join(&id), &path).unwrap();
    }
}

#[test]
fn resolution_order_cache_offline_and_fallback() {
    let home = scratch_dir("hub-home");
    let synthetic = scratch_dir("hub-synthetic");
    std::env::set_var("HF_HOME", &home);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("GPT2_RS_SYNTHETIC_DIR", &synthetic);

    // A local directory wins, and names itself; a missing one is an error.
    let local = scratch_dir("hub-local");
    let r = resolve(&WeightsArgs {
        weights: Some(local.clone()),
        ..args("gpt2")
    })
    .unwrap();
    assert_eq!(r.source, WeightsSource::Local { dir: local.clone() });
    let err = resolve(&WeightsArgs {
        weights: Some(local.join("nope")),
        ..args("gpt2")
    })
    .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");

    // A filled Hugging Face cache is used without the network, with its revision.
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.join("hub/models--someone--tiny-gpt2");
    let snapshot = repo.join("snapshots").join(commit);
    synth::write_checkpoint(&snapshot, Preset::Tiny, 0).unwrap();
    std::fs::copy(
        common::repo_root().join("weights/gpt2/tokenizer.json"),
        snapshot.join("tokenizer.json"),
    )
    .unwrap();
    let refs = repo.join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("main"), commit).unwrap();

    // Files not stored as blobs named by their hash cannot be verified: refused.
    let err = resolve(&args("someone/tiny-gpt2")).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("cannot verify"),
        "{err}"
    );

    as_blobs(&repo, &snapshot);
    let r = resolve(&args("someone/tiny-gpt2")).unwrap();
    assert_eq!(
        r.source,
        WeightsSource::Hub {
            model_id: "someone/tiny-gpt2".into(),
            revision: commit.into()
        }
    );
    assert_eq!(r.dir, snapshot);
    assert!(gpt2::Gpt2Model::load(&r.dir).is_ok());
    assert_eq!(r.load_tokenizer().unwrap().encode("Hello").unwrap(), [15496]);
    // A revision asked by commit finds the same snapshot; an unknown one is
    // not cached, so (offline) it falls back rather than using another.
    let by_commit = resolve(&WeightsArgs {
        revision: Some(commit.into()),
        ..args("someone/tiny-gpt2")
    })
    .unwrap();
    assert_eq!(by_commit.dir, snapshot);
    let other = resolve(&WeightsArgs {
        revision: Some("v2".into()),
        ..args("someone/tiny-gpt2")
    })
    .unwrap();
    assert!(
        matches!(other.source, WeightsSource::Synthetic { .. }),
        "{}",
        other.source
    );

    // A blob whose bytes no longer match its name is refused by name, no fallback.
    let blob = std::fs::canonicalize(snapshot.join("model.safetensors")).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&blob, &bytes).unwrap();
    let err = resolve(&args("someone/tiny-gpt2")).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("sha256"),
        "{err}"
    );

    // `gpt2` is pinned to a commit and to its files' hashes: other bytes under
    // that commit are refused, naming the file and the expected hash.
    let pinned = "607a30d783dfa663caf39e06633721c8d4cfcd7e";
    let gpt2_repo = home.join("hub/models--gpt2");
    let gpt2_snapshot = gpt2_repo.join("snapshots").join(pinned);
    std::fs::create_dir_all(&gpt2_snapshot).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(snapshot.join(f), gpt2_snapshot.join(f)).unwrap();
    }
    let err = resolve(&args("gpt2")).unwrap_err().to_string();
    assert!(
        err.contains("config.json")
            && err.contains("0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4"),
        "{err}"
    );
    std::fs::remove_dir_all(&gpt2_repo).unwrap();

    // Not cached and offline: the synthetic 124M fallback, generated once.
    let r = resolve(&args("gpt2")).unwrap();
    assert_eq!(
        r.source,
        WeightsSource::Synthetic {
            preset: "124m".into(),
            seed: 0
        }
    );
    assert!(r.dir.starts_with(&synthetic) && r.dir.join("model.safetensors").is_file());
    let made = std::fs::metadata(r.dir.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let again = resolve(&WeightsArgs {
        synthetic: true,
        ..args("gpt2")
    })
    .unwrap();
    assert_eq!(again.dir, r.dir);
    let reused = std::fs::metadata(again.dir.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(made, reused, "the synthetic checkpoint is reused, not rewritten");
    assert!(again.source.to_string().contains("SYNTHETIC"));
}
