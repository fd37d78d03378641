//! Weights resolution. One test function: it sets process environment
//! variables, which must not race with other tests in this binary.

mod common;

use std::path::Path;

use common::scratch_dir;
use gpt2::hub::{resolve, WeightsArgs, WeightsSource};
use gpt2::synth::{self, Preset};

fn args(model: &str) -> WeightsArgs {
    WeightsArgs {
        weights: None,
        model: model.into(),
        synthetic: false,
        tokenizer: None,
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
    let snapshot = home.join("hub/models--someone--tiny-gpt2/snapshots").join(commit);
    synth::write_checkpoint(&snapshot, Preset::Tiny, 0).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/gpt2/tokenizer.json"),
        snapshot.join("tokenizer.json"),
    )
    .unwrap();
    let refs = home.join("hub/models--someone--tiny-gpt2/refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("main"), commit).unwrap();
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
