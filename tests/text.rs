//! The tokenizer against Hugging Face's `GPT2TokenizerFast`, and streaming decode.

use std::path::Path;

use gpt2::tokenizer::{Gpt2Tokenizer, TextStream};
use gpt2::Error;
use serde::Deserialize;

#[derive(Deserialize)]
struct Parity {
    transformers_version: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

fn parity() -> Parity {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/fixtures/tokenizer_parity.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn ids_match_hugging_face_on_the_corpus_and_round_trip() {
    let (tok, p) = (Gpt2Tokenizer::builtin(), parity());
    assert!(p.cases.len() >= 50, "the corpus has {} strings", p.cases.len());
    for case in &p.cases {
        let ids = tok.encode(&case.text).unwrap();
        assert_eq!(
            ids, case.ids,
            "ids for {:?} differ from transformers {} (regenerate with weights/fixtures/make_tokenizer_fixtures.py)",
            case.text, p.transformers_version
        );
        assert_eq!(
            tok.decode(&ids).unwrap(),
            case.text,
            "round trip of {:?}",
            case.text
        );
    }
}

#[test]
fn known_anchors() {
    let tok = Gpt2Tokenizer::builtin();
    assert_eq!(
        tok.encode("Hello, how are you?").unwrap(),
        [15496, 11, 703, 389, 345, 30]
    );
    assert_eq!(
        tok.encode("The quick brown fox").unwrap(),
        [464, 2068, 7586, 21831]
    );
    assert_eq!(tok.encode("<|endoftext|>").unwrap(), [50256]);
    assert_eq!(tok.encode("").unwrap(), Vec::<u32>::new());
    assert_eq!(tok.vocab_size(), 50257);
}

#[test]
fn decoding_an_id_past_the_vocabulary_is_an_error() {
    let err = Gpt2Tokenizer::builtin().decode(&[1, 50257]).unwrap_err();
    assert!(matches!(err, Error::TokenId { id: 50257, .. }), "{err}");
}

#[test]
fn an_unreadable_tokenizer_file_names_its_path() {
    let err = Gpt2Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("/nonexistent/tokenizer.json"), "{err}");
    let bad = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bad-tokenizer.json");
    std::fs::write(&bad, "{ not a tokenizer").unwrap();
    let err = Gpt2Tokenizer::from_file(&bad).err().unwrap();
    assert!(
        matches!(err, Error::Tokenizer(_)) && err.to_string().contains("bad-tokenizer.json"),
        "{err}"
    );
}

/// Streams `ids` one token at a time and returns the pieces.
fn stream(tok: &Gpt2Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut s = TextStream::new(tok);
    let mut pieces: Vec<String> = ids.iter().filter_map(|&id| s.push(id).unwrap()).collect();
    pieces.extend(s.finish().unwrap());
    pieces
}

#[test]
fn streaming_never_splits_a_character_and_adds_up_to_the_text() {
    let (tok, p) = (Gpt2Tokenizer::builtin(), parity());
    let mut multi_token_chars = 0;
    for case in &p.cases {
        let pieces = stream(&tok, &case.ids);
        assert_eq!(pieces.concat(), case.text, "streamed pieces of {:?}", case.text);
        for piece in &pieces {
            assert!(
                !piece.contains('\u{FFFD}') || case.text.contains('\u{FFFD}'),
                "a broken character was emitted for {:?}: {piece:?}",
                case.text
            );
        }
        multi_token_chars += usize::from(pieces.len() < case.ids.len());
    }
    assert!(
        multi_token_chars > 0,
        "the corpus should hold characters that span several tokens"
    );
}

#[test]
fn an_emoji_split_over_tokens_is_held_until_complete() {
    let tok = Gpt2Tokenizer::builtin();
    let ids = tok.encode("🦀").unwrap();
    assert!(
        ids.len() > 1,
        "the crab emoji takes several byte-level tokens: {ids:?}"
    );
    let mut s = TextStream::new(&tok);
    for &id in &ids[..ids.len() - 1] {
        assert_eq!(s.push(id).unwrap(), None);
    }
    assert_eq!(s.push(*ids.last().unwrap()).unwrap().as_deref(), Some("🦀"));
    assert_eq!(s.finish().unwrap(), None);
}
