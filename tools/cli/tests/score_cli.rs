//! `gpt2 score`, end to end on the tiny synthetic checkpoint (128
//! positions): its JSON holds the numbers the engine computes in process
//! (`gpt2::score`), its perplexity is `exp(nll / count)`, a text longer
//! than the window is scored with the sliding window, and bad inputs are
//! named errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::server::{post_json, ServerProcess};
use common::{scratch_dir, synth_dir};
use gpt2::score::{self, Score, ScoreOptions};
use gpt2::synth::Preset;
use gpt2::{Gpt2Model, Gpt2Tokenizer};
use serde_json::Value;

fn gpt2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `gpt2 score --weights <tiny> --file <file>` with `extra` flags.
fn score_cli(file: &Path, extra: &[&str]) -> Output {
    let dir = synth_dir(Preset::Tiny, 0);
    let mut args = vec![
        "score",
        "--weights",
        dir.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    gpt2(&args)
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A varied English-like text of about `words` words.
fn prose(words: usize) -> String {
    let vocab = [
        "the", "river", "ran", "past", "old", "mills", "and", "quiet", "towns,", "where", "people", "kept",
        "bees.", "In", "winter", "snow", "covered", "roofs", "of", "slate",
    ];
    (0..words)
        .map(|i| vocab[(i * 7 + i / 3) % vocab.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// The JSON of `gpt2 score --json` against the engine's scores of the same
/// tokens: ids, each logprob (bit for bit) and its alternatives, the first
/// token's `null`, nll, count, window and stride; and the perplexity is
/// `exp(nll / count)`.
fn check_json(json: &Value, ids: &[u32], want: &Score, top: usize) {
    let tokens = json["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), ids.len());
    let tok = Gpt2Tokenizer::builtin();
    for (i, (t, lp)) in tokens.iter().zip(&want.logprobs).enumerate() {
        assert_eq!(t["id"], ids[i], "token {i}");
        assert_eq!(t["text"], tok.decode(&ids[i..i + 1]).unwrap(), "token {i}");
        match lp {
            None => assert!(t["logprob"].is_null(), "token {i} has no logprob: {t}"),
            Some(lp) => {
                assert_eq!(t["logprob"].as_f64().unwrap() as f32, lp.logprob, "token {i}");
                let alts = t["top"].as_array().map_or(&[][..], Vec::as_slice);
                assert_eq!(alts.len(), top, "token {i}");
                for (a, &(id, logprob)) in alts.iter().zip(&lp.top) {
                    assert_eq!(
                        (a["id"].as_u64(), a["logprob"].as_f64().map(|x| x as f32)),
                        (Some(id.into()), Some(logprob))
                    );
                }
            }
        }
    }
    let (nll, count) = (json["nll"].as_f64().unwrap(), json["count"].as_u64().unwrap());
    let ppl = json["perplexity"].as_f64().unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
    assert!(close(nll, want.nll), "nll {nll} vs the engine's {}", want.nll);
    assert_eq!(count, want.count as u64);
    assert!(
        close(ppl, (nll / count as f64).exp()),
        "perplexity {ppl} is not exp(nll / count)"
    );
    assert!(close(ppl, want.perplexity()));
    assert_eq!(
        (json["window"].as_u64(), json["stride"].as_u64()),
        (Some(want.window as u64), Some(want.stride as u64))
    );
}

/// The tokens of `path` and the engine's scores of them with `opts`.
fn in_process(path: &Path, opts: &ScoreOptions) -> (Vec<u32>, Score) {
    let ids = Gpt2Tokenizer::builtin()
        .encode(&std::fs::read_to_string(path).unwrap())
        .unwrap();
    let model = Gpt2Model::load(&synth_dir(Preset::Tiny, 0)).unwrap();
    let s = score::score(&model, &ids, opts).unwrap();
    (ids, s)
}

#[test]
fn json_holds_the_engines_numbers() {
    let dir = scratch_dir("score-cli-short");
    let file = write(
        &dir,
        "short.txt",
        "The quick brown fox jumps over the lazy dog. Café, naïve — 東京.",
    );
    let out = score_cli(&file, &["--json", "--top", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The default stride: half the window.
    let (ids, want) = in_process(&file, &ScoreOptions { stride: 64, top: 3 });
    assert_eq!(want.windows, 1);
    assert_eq!(want.count, ids.len() - 1);
    check_json(&json, &ids, &want, 3);

    // The table says the same perplexity.
    let out = score_cli(&file, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains(&format!("perplexity {:.6}", want.perplexity())),
        "{table}"
    );
    assert_eq!(
        table.lines().count(),
        1 + ids.len() + 1,
        "header, one line a token, the total"
    );
}

/// Past the 128-position window: with the default stride (64) every token
/// after the first is scored once; with stride = window (128) the windows
/// start cold, so the first token of each has none (count = T - windows).
#[test]
fn a_text_longer_than_the_window_slides() {
    let dir = scratch_dir("score-cli-long");
    let file = write(&dir, "long.txt", &prose(300));
    for stride in [64, 128, 100] {
        let out = score_cli(&file, &["--json", "--stride", &stride.to_string()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        let (ids, want) = in_process(&file, &ScoreOptions { stride, top: 0 });
        assert!(
            ids.len() > 2 * 128,
            "{} tokens: longer than two windows",
            ids.len()
        );
        assert!(want.windows >= 3);
        check_json(&json, &ids, &want, 0);
        let count = json["count"].as_u64().unwrap() as usize;
        let unscored: Vec<usize> = (0..ids.len())
            .filter(|&i| json["tokens"][i]["logprob"].is_null())
            .collect();
        if stride == 128 {
            assert_eq!(count, ids.len() - want.windows);
            let starts: Vec<usize> = (0..want.windows).map(|w| w * 128).collect();
            assert_eq!(unscored, starts, "each window's first token");
        } else {
            assert_eq!(count, ids.len() - 1);
            assert_eq!(unscored, [0]);
        }
    }
}

#[test]
fn bad_inputs_are_named_errors() {
    let dir = scratch_dir("score-cli-bad");
    let good = write(&dir, "good.txt", "Hello there, world.");
    let empty = write(&dir, "empty.txt", "");
    let one = write(&dir, "one.txt", "Hello");
    let missing = dir.join("missing.txt");
    for (file, extra, needle) in [
        (&missing, &[][..], "missing.txt"),
        (&empty, &[][..], "0 token"),
        (&one, &[][..], "at least 2"),
        (&good, &["--stride", "0"][..], "stride 0"),
        (&good, &["--stride", "129"][..], "stride 129"),
        (&good, &["--top", "21"][..], "top 21"),
        (&dir, &[][..], "directory"),
    ] {
        let out = score_cli(file, extra);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{} {extra:?} succeeded", file.display());
        assert!(
            stderr.contains("error:") && stderr.contains(needle),
            "{} {extra:?}: {stderr}",
            file.display()
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(out.stdout.is_empty(), "nothing printed on failure");
    }
}

/// The same figure over HTTP: a text within the window, sent to `gpt2 serve`
/// with `echo`, `logprobs` and `max_tokens: 0` (how evaluation harnesses
/// score a text), gives the per-token logprobs and the perplexity that
/// `gpt2 score` prints.
#[test]
fn http_echo_gives_the_same_perplexity() {
    let dir = scratch_dir("score-cli-http");
    let words =
        "Evaluation harnesses score a text by sending it back with echo and reading each token's logprob.";
    let file = write(&dir, "eval.txt", words);
    let out = score_cli(&file, &["--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cli: Vec<f64> = json["tokens"].as_array().unwrap()[1..]
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect();

    let weights = synth_dir(Preset::Tiny, 0);
    let server = ServerProcess::ready(&["--weights", weights.to_str().unwrap()], &[]);
    let body = serde_json::json!({"prompt": words, "echo": true, "logprobs": 0, "max_tokens": 0});
    let reply = post_json(&format!("{}/v1/completions", server.base), &body);
    assert_eq!(reply.status, 200, "{}", reply.text);
    let choice = &reply.json["choices"][0];
    assert_eq!(choice["text"].as_str(), Some(words));
    let lps = choice["logprobs"]["token_logprobs"].as_array().unwrap();
    assert!(
        lps[0].is_null(),
        "the first token has nothing to be predicted from"
    );
    let http: Vec<f64> = lps[1..].iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(http.len(), cli.len(), "one logprob per token after the first");
    for (i, (h, c)) in http.iter().zip(&cli).enumerate() {
        assert!(
            (h - c).abs() <= 1e-6,
            "token {}: HTTP {h} vs gpt2 score {c}",
            i + 1
        );
    }
    let ppl = (-http.iter().sum::<f64>() / http.len() as f64).exp();
    let want = json["perplexity"].as_f64().unwrap();
    assert!(
        (ppl - want).abs() <= 1e-6 * want,
        "HTTP perplexity {ppl} vs gpt2 score {want}"
    );
}
