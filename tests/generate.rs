//! Generation: the decode loop, stop reasons, seeded sampling, bad requests.

mod common;

use common::synth_dir;
use gpt2::synth::Preset;
use gpt2::{Error, GenerateOptions, Gpt2Model, SamplingParams, Session, StopReason};

fn tiny() -> Gpt2Model {
    Gpt2Model::load(&synth_dir(Preset::Tiny, 0)).unwrap()
}

const PROMPT: [u32; 6] = [15496, 11, 703, 389, 345, 30];

#[test]
fn greedy_generation_matches_the_transformers_fixture() {
    // weights/fixtures/reference.json: the tiny model's greedy continuation of PROMPT.
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/weights/fixtures/reference.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let want: Vec<u32> =
        serde_json::from_value(fixture["configs"][0]["prompts"][0]["greedy"].clone()).unwrap();
    assert_eq!(fixture["configs"][0]["preset"], "tiny");
    let m = tiny();
    // A scratch of 4 rows: the 6-token prompt is prefilled in two chunks.
    let mut session = Session::new(&m, 4).expect("session");
    let mut streamed = Vec::new();
    let g = session
        .generate(&m, &PROMPT, &GenerateOptions::greedy(30), |t| streamed.push(t))
        .unwrap();
    assert_eq!(g.tokens, want);
    assert_eq!(streamed, want, "the callback sees every token, in order");
    assert_eq!((g.stop, g.prompt_tokens), (StopReason::MaxNewTokens, 6));
    assert_eq!(g.timings.token_times.len(), 30);
    assert!(g.timings.ttft <= g.timings.total && g.timings.tpot().is_some());
    // The session is reusable: the same request again gives the same tokens.
    assert_eq!(
        session
            .generate(&m, &PROMPT, &GenerateOptions::greedy(30), |_| {})
            .unwrap()
            .tokens,
        want
    );
}

#[test]
fn eos_stops_unless_ignored() {
    let m = tiny();
    let mut session = Session::new(&m, 16).expect("session");
    // The tiny model greedily repeats one token; call that token EOS.
    let first = session
        .generate(&m, &PROMPT, &GenerateOptions::greedy(1), |_| {})
        .unwrap()
        .tokens[0];
    let opts = GenerateOptions {
        ignore_eos: false,
        eos_token_id: Some(first),
        logprobs: None,
        prompt_logprobs: None,
        ..GenerateOptions::greedy(10)
    };
    let g = session.generate(&m, &PROMPT, &opts, |_| {}).unwrap();
    assert_eq!((g.stop, g.tokens.len()), (StopReason::Eos, 1));
    let g = session
        .generate(
            &m,
            &PROMPT,
            &GenerateOptions {
                ignore_eos: true,
                ..opts
            },
            |_| {},
        )
        .unwrap();
    assert_eq!((g.stop, g.tokens.len()), (StopReason::MaxNewTokens, 10));
}

#[test]
fn a_full_context_window_is_a_normal_stop() {
    let m = tiny(); // n_positions = 128
    let prompt: Vec<u32> = (0..120).map(|i| i * 37 % 50257).collect();
    let mut session = Session::new(&m, 64).expect("session");
    let g = session
        .generate(&m, &prompt, &GenerateOptions::greedy(30), |_| {})
        .unwrap();
    // Positions 120..127 take 8 more tokens, and the logits at 127 give a 9th.
    assert_eq!((g.stop, g.tokens.len()), (StopReason::ContextFull, 9));
    let full: Vec<u32> = (0..128).collect();
    let g = session
        .generate(&m, &full, &GenerateOptions::greedy(5), |_| {})
        .unwrap();
    assert_eq!((g.stop, g.tokens.len()), (StopReason::ContextFull, 1));
}

#[test]
fn sampling_is_reproducible_from_the_seed() {
    let m = tiny();
    let mut session = Session::new(&m, 16).expect("session");
    let opts = |seed| GenerateOptions {
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: Some(50),
            top_p: Some(0.95),
            repetition_penalty: Some(1.3),
            ..SamplingParams::greedy()
        },
        seed,
        ..GenerateOptions::greedy(20)
    };
    let a = session.generate(&m, &PROMPT, &opts(1), |_| {}).unwrap().tokens;
    let b = session.generate(&m, &PROMPT, &opts(1), |_| {}).unwrap().tokens;
    let c = session.generate(&m, &PROMPT, &opts(2), |_| {}).unwrap().tokens;
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Another thread running other requests does not change a seeded request.
    std::thread::scope(|s| {
        let other = s.spawn(|| {
            Session::new(&m, 16)
                .expect("session")
                .generate(&m, &PROMPT, &opts(9), |_| {})
                .unwrap()
        });
        assert_eq!(
            Session::new(&m, 16)
                .expect("session")
                .generate(&m, &PROMPT, &opts(1), |_| {})
                .unwrap()
                .tokens,
            a
        );
        other.join().unwrap();
    });
}

#[test]
fn bad_requests_are_clear_errors() {
    let m = tiny();
    let mut s = Session::new(&m, 16).expect("session");
    let err = s
        .generate(&m, &[], &GenerateOptions::greedy(5), |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("empty prompt"), "{err}");
    let long: Vec<u32> = vec![1; 129];
    let err = s
        .generate(&m, &long, &GenerateOptions::greedy(5), |_| {})
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::PromptTooLong {
                prompt_tokens: 129,
                n_positions: 128
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("129") && err.to_string().contains("128"),
        "{err}"
    );
    let err = s
        .generate(&m, &PROMPT, &GenerateOptions::greedy(0), |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("max_new_tokens"), "{err}");
    for (params, name) in [
        (
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::greedy()
            },
            "temperature",
        ),
        (
            SamplingParams {
                temperature: 1.0,
                top_p: Some(1.5),
                ..SamplingParams::greedy()
            },
            "top_p",
        ),
        (
            SamplingParams {
                temperature: 1.0,
                top_p: Some(0.0),
                ..SamplingParams::greedy()
            },
            "top_p",
        ),
        (
            SamplingParams {
                temperature: 1.0,
                top_k: Some(0),
                ..SamplingParams::greedy()
            },
            "top_k",
        ),
    ] {
        let opts = GenerateOptions {
            sampling: params,
            ..GenerateOptions::greedy(5)
        };
        let err = s.generate(&m, &PROMPT, &opts, |_| {}).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(_)) && err.to_string().contains(name),
            "{err}"
        );
    }
    let err = s
        .generate(&m, &[50257], &GenerateOptions::greedy(5), |_| {})
        .unwrap_err();
    assert!(matches!(err, Error::TokenId { .. }), "{err}");
}
