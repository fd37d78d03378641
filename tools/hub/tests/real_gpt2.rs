//! The real GPT-2 from the hub against Hugging Face's own greedy output
//! (ignored without network).

use gpt2::{GenerateOptions, Gpt2Model, Session};
use gpt2_hub::{resolve, WeightsArgs, WeightsSource};

/// Hugging Face's own greedy reference for the real GPT-2 ("The dog" → ...).
#[test]
#[ignore = "needs network: GPT-2 weights from the Hugging Face hub (or a filled HF cache)"]
fn real_gpt2_matches_hugging_face_greedy() {
    let args = WeightsArgs {
        weights: None,
        model: "gpt2".into(),
        synthetic: false,
        synthetic_preset: None,
        revision: None,
        tokenizer: None,
    };
    let resolved = resolve(&args).unwrap();
    assert!(
        matches!(resolved.source, WeightsSource::Hub { .. }),
        "the real weights are not available: {}",
        resolved.source
    );
    let m = Gpt2Model::load(&resolved.dir).unwrap();
    let g = Session::new(&m, 16)
        .expect("session")
        .generate(&m, &[464, 3290], &GenerateOptions::greedy(18), |_| {})
        .unwrap();
    let mut all = vec![464, 3290];
    all.extend(g.tokens);
    assert_eq!(
        all,
        [
            464, 3290, 373, 1043, 287, 257, 2214, 1474, 262, 16246, 286, 2688, 290, 2688, 27262, 13, 198,
            198, 464, 3290
        ]
    );
}
