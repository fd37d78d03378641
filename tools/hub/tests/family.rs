//! The GPT-2 family through the hub: `--synthetic-preset`, and `--model`
//! for `distilgpt2`, `gpt2-medium`, `gpt2-large` and `gpt2-xl` from a faked
//! cache. Only one test function sets process environment variables (they
//! must not race with another reading them).

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::path::Path;

use clap::Parser;
use common::scratch_dir;
use gpt2::synth::{self, Preset};
use gpt2_hub::{model_preset, resolve, WeightsArgs, WeightsSource};

#[derive(Parser, Debug)]
struct Flags {
    #[command(flatten)]
    weights: WeightsArgs,
}

fn parse(args: &[&str]) -> Result<WeightsArgs, String> {
    let argv = std::iter::once("tool").chain(args.iter().copied());
    Flags::try_parse_from(argv)
        .map(|f| f.weights)
        .map_err(|e| e.to_string())
}

/// `--synthetic-preset` names a preset; it conflicts, by name, with the other
/// sources; `--synthetic` is still the 124M one.
#[test]
fn synthetic_preset_flag_parses_and_conflicts_by_name() {
    let choice = |args: &[&str]| parse(args).unwrap().synthetic_choice();
    assert_eq!(choice(&["--synthetic-preset", "xl"]), Some(Preset::Xl));
    assert_eq!(choice(&["--synthetic-preset", "124m"]), Some(Preset::Gpt2_124M));
    assert_eq!(choice(&["--synthetic-preset", "distil"]), Some(Preset::Distil));
    assert_eq!(choice(&["--synthetic"]), Some(Preset::Gpt2_124M));
    assert_eq!(choice(&[]), None);
    for other in [
        &["--model", "gpt2-xl"][..],
        &["--weights", "/tmp"],
        &["--synthetic"],
    ] {
        let args: Vec<&str> = ["--synthetic-preset", "xl"]
            .iter()
            .chain(other)
            .copied()
            .collect();
        let err = parse(&args).unwrap_err();
        assert!(
            err.contains("--synthetic-preset") && err.contains(other[0]),
            "{other:?}: {err}"
        );
    }
    let err = parse(&["--synthetic-preset", "gpt3"]).unwrap_err();
    assert!(err.contains("gpt3") && err.contains("xl"), "{err}");
}

/// A snapshot of the tiny checkpoint under `repo` at `commit`, `main` naming
/// it, each file stored as `blobs/<its hash>` as `hf-hub` lays a cache out.
fn fake_cache(repo: &Path, commit: &str) {
    use sha2::Digest;
    let snapshot = repo.join("snapshots").join(commit);
    synth::write_checkpoint(&snapshot, Preset::Tiny, 0).unwrap();
    std::fs::copy(
        common::repo_root().join("weights/gpt2/tokenizer.json"),
        snapshot.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let blobs = repo.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        let path = snapshot.join(f);
        let bytes = std::fs::read(&path).unwrap();
        let id: Vec<u8> = if f == "model.safetensors" {
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

fn model(id: &str) -> WeightsArgs {
    parse(&["--model", id]).unwrap()
}

#[test]
fn family_models_resolve_through_the_cache_and_fall_back_to_their_shape() {
    let home = scratch_dir("family-home");
    let synthetic = scratch_dir("family-synthetic");
    std::env::set_var("HF_HOME", &home);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("GPT2_RS_SYNTHETIC_DIR", &synthetic);

    let family = [
        ("distilgpt2", "distilbert/distilgpt2", Preset::Distil),
        ("gpt2-medium", "openai-community/gpt2-medium", Preset::Medium),
        ("gpt2-large", "openai-community/gpt2-large", Preset::Large),
        ("gpt2-xl", "openai-community/gpt2-xl", Preset::Xl),
    ];
    // Stand-ins for the family's synthetic checkpoints, so that no test writes
    // gigabytes: `synth::cached` takes a directory with a config.json as done.
    for (_, _, preset) in family {
        synth::write_checkpoint(
            &synthetic.join(format!("{}-seed0", preset.name())),
            Preset::Tiny,
            0,
        )
        .unwrap();
    }

    for (i, (short, long, preset)) in family.into_iter().enumerate() {
        assert_eq!(
            (model_preset(short), model_preset(long)),
            (Some(preset), Some(preset))
        );
        // Not cached and offline: the synthetic checkpoint of the model's shape.
        let r = resolve(&model(short)).unwrap();
        let want = WeightsSource::Synthetic {
            preset: preset.name().into(),
            seed: 0,
        };
        assert_eq!(r.source, want, "{short}");
        assert_eq!(r.dir, synthetic.join(format!("{}-seed0", preset.name())));

        // Cached under either id: found on `main`, each file verified by its blob.
        for id in [short, long] {
            let commit = format!("{i:040x}");
            let repo = home
                .join("hub")
                .join(format!("models--{}", id.replace('/', "--")));
            fake_cache(&repo, &commit);
            let r = resolve(&model(id)).unwrap();
            let want = WeightsSource::Hub {
                model_id: id.into(),
                revision: commit.clone(),
            };
            assert_eq!(r.source, want);
            assert!(gpt2::Gpt2Model::load(&r.dir).is_ok());
            // A blob whose bytes no longer match its name: refused by name.
            let blob = std::fs::canonicalize(r.dir.join("config.json")).unwrap();
            let mut bytes = std::fs::read(&blob).unwrap();
            bytes.push(b' ');
            std::fs::write(&blob, &bytes).unwrap();
            let err = resolve(&model(id)).unwrap_err().to_string();
            assert!(
                err.contains("config.json") && err.contains("git blob id"),
                "{id}: {err}"
            );
        }
    }

    // `--synthetic-preset` announces the preset it stands for.
    let r = resolve(&parse(&["--synthetic-preset", "xl"]).unwrap()).unwrap();
    assert_eq!(r.dir, synthetic.join("xl-seed0"));
    let said = r.source.to_string();
    assert!(said.contains("SYNTHETIC xl checkpoint"), "{said}");
    // An unknown model still falls back to the 124M shape.
    assert_eq!(model_preset("someone/else"), None);
}
