//! What issue 33 adds to `gpt2 serve`'s API, over real HTTP on loopback
//! with the tiny synthetic model: log-probabilities and `echo` (against the
//! engine's own logits and the committed `transformers` reference), `n` and
//! batched prompts (seeds, index order, streams), `/v1/chat/completions`
//! (the default template and `--chat-template`), every bad input of the
//! issue refused by name, and whole-or-nothing admission.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::fixture::{case, fixture};
use common::in_process::{Checkpoint, InProcess};
use common::server::{self, metric, post_json, ServerProcess, PATIENCE};
use common::{scratch_dir, synth_dir};
use gpt2::request::choice_seed;
use gpt2::synth::Preset;
use gpt2::tokenizer::Gpt2Tokenizer;
use gpt2::{GenerateOptions, Gpt2Model, Session};
use gpt2_serve::ServeConfig;
use serde_json::{json, Value};

const PROMPT: &str = "The quick brown fox jumps over";

fn tiny_dir() -> String {
    synth_dir(Preset::Tiny, 0).to_str().unwrap().to_string()
}

fn tiny_server(extra: &[&str]) -> ServerProcess {
    let dir = tiny_dir();
    let mut args = vec!["--weights", dir.as_str()];
    args.extend_from_slice(extra);
    ServerProcess::ready(&args, &[])
}

fn tokenizer() -> &'static Gpt2Tokenizer {
    static T: OnceLock<Gpt2Tokenizer> = OnceLock::new();
    T.get_or_init(Gpt2Tokenizer::builtin)
}

fn model() -> &'static Gpt2Model {
    static M: OnceLock<Gpt2Model> = OnceLock::new();
    M.get_or_init(|| Gpt2Model::load_with(&synth_dir(Preset::Tiny, 0), gpt2::Dtype::F32).unwrap())
}

fn decode(id: u32) -> String {
    tokenizer().decode(&[id]).unwrap()
}

/// `log_softmax` of one logits row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let lse = max + row.iter().map(|&x| (f64::from(x) - max).exp()).sum::<f64>().ln();
    row.iter().map(|&x| f64::from(x) - lse).collect()
}

/// The engine's own log-softmax rows for every position of `ids`
/// (`Gpt2Model::logits_all`): row j scores the token at j + 1.
fn engine_rows(ids: &[u32]) -> Vec<Vec<f64>> {
    let v = model().config.vocab_size;
    let logits = model().logits_all(ids, 64).unwrap();
    logits.chunks(v).map(log_softmax).collect()
}

/// The greedy continuation of `ids` in-process.
fn greedy_ids(ids: &[u32], max_tokens: usize) -> Vec<u32> {
    let opts = GenerateOptions::greedy(max_tokens);
    Session::new(model(), 16)
        .unwrap()
        .generate(model(), ids, &opts, |_| {})
        .unwrap()
        .tokens
}

fn floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array().unwrap().iter().map(Value::as_f64).collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn offsets(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect()
}

#[track_caller]
fn assert_near(what: &str, got: f64, want: f64, atol: f64, rtol: f64) {
    assert!(
        (got - want).abs() <= atol + rtol * want.abs(),
        "{what}: got {got}, want {want}"
    );
}

/// `text_offset` is where each token's text starts in `text`, in
/// characters: the text from there starts with the token's own text (a
/// token holding part of a character decodes to U+FFFD, and
/// `<|endoftext|>` is not text: neither can be found).
#[track_caller]
fn assert_offsets_consistent(text: &str, lp: &Value) {
    let (tokens, offs) = (strings(&lp["tokens"]), offsets(&lp["text_offset"]));
    assert_eq!(tokens.len(), offs.len());
    assert!(offs.windows(2).all(|w| w[0] <= w[1]), "{offs:?}");
    let chars: Vec<char> = text.chars().collect();
    for (t, &o) in tokens.iter().zip(&offs) {
        assert!(o <= chars.len(), "offset {o} past the text ({})", chars.len());
        if t.contains('\u{FFFD}') || t == "<|endoftext|>" {
            continue;
        }
        let from: String = chars[o..].iter().collect();
        assert!(from.starts_with(t.as_str()), "{t:?} at {o}: {from:?}");
    }
}

#[track_caller]
fn assert_param(reply: &server::Reply, status: u16, param: &str) {
    assert_eq!(reply.status, status, "{}", reply.text);
    let err = &reply.json["error"];
    assert_eq!(err["param"], param, "{}", reply.text);
    assert!(err["message"].as_str().unwrap().contains(param), "{}", reply.text);
}

/// A stream's chunks by choice index: (the text joined, how many chunks
/// carried a finish reason, whether that was the choice's last chunk).
fn by_choice(
    s: &server::Streamed,
    field: fn(&Value) -> Option<&str>,
) -> BTreeMap<u64, (String, usize, bool)> {
    let mut out: BTreeMap<u64, (String, usize, bool)> = BTreeMap::new();
    for c in &s.chunks {
        for choice in c["choices"].as_array().unwrap() {
            let e = out.entry(choice["index"].as_u64().unwrap()).or_default();
            e.0.push_str(field(choice).unwrap_or(""));
            let finished = !choice["finish_reason"].is_null();
            e.1 += usize::from(finished);
            e.2 = finished;
        }
    }
    out
}

/// Echo with `max_tokens: 0` scores the prompt: equal to the log-softmax of
/// the engine's own logits (1e-5) and of the `transformers` reference logits
/// (the reference tests' tolerance), position by position; the first token
/// has none. Several prompts in one request, as evaluation harnesses send.
/// The same on the 124M checkpoint: the server's echo logprobs of each
/// committed reference prompt equal `log_softmax` of the `transformers`
/// logits at every position the fixture holds.
#[test]
fn echo_scores_match_transformers_on_124m() {
    let big = case(Preset::Gpt2_124M);
    let dir = synth_dir(Preset::Gpt2_124M, big.seed);
    let server = ServerProcess::ready(&["--weights", dir.to_str().unwrap()], &[]);
    // Both presets have the full GPT-2 vocabulary.
    let v = model().config.vocab_size;
    let mut compared = 0;
    for (k, p) in big.prompts.iter().enumerate() {
        let r = post_json(
            &format!("{}/v1/completions", server.base),
            &json!({"prompt": p.ids, "echo": true, "logprobs": 0, "max_tokens": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.text);
        let got = floats(&r.json["choices"][0]["logprobs"]["token_logprobs"]);
        assert_eq!(got.len(), p.ids.len());
        assert_eq!(got[0], None, "the first token has no logprob");
        for (j, &pos) in p.positions.iter().enumerate() {
            let Some(&next) = p.ids.get(pos + 1) else { continue };
            let reference = &fixture().logits[p.logits_offset + j * v..][..v];
            let want = log_softmax(reference)[next as usize];
            let g = got[pos + 1].unwrap_or_else(|| panic!("prompt {k}: token {} has no logprob", pos + 1));
            assert_near(
                &format!("124M prompt {k}, token {}", pos + 1),
                g,
                want,
                1e-4,
                1e-4,
            );
            compared += 1;
        }
    }
    assert!(compared > 0, "the fixture has no 124M position with a next token");
    eprintln!("124M: {compared} positions compared with transformers over HTTP");
}

#[test]
fn echo_scores_prompts_as_the_engine_and_transformers_do() {
    let server = tiny_server(&[]);
    let tiny = case(Preset::Tiny);
    let v = model().config.vocab_size;
    // The fixture prompts whose every position has reference logits.
    let cases: Vec<_> = tiny
        .prompts
        .iter()
        .filter(|p| p.positions.len() == p.ids.len())
        .collect();
    assert!(cases.len() >= 2, "the fixture has whole prompts");
    let ids: Vec<&Vec<u32>> = cases.iter().map(|p| &p.ids).collect();
    let r = post_json(
        &server.url("/v1/completions"),
        &json!({"prompt": ids, "echo": true, "logprobs": 3, "max_tokens": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let choices = r.json["choices"].as_array().unwrap();
    assert_eq!(choices.len(), cases.len());
    let total: usize = cases.iter().map(|p| p.ids.len()).sum();
    assert_eq!(
        r.json["usage"],
        json!({"prompt_tokens": total, "completion_tokens": 0, "total_tokens": total})
    );
    for (k, (p, choice)) in cases.iter().zip(choices).enumerate() {
        assert_eq!(choice["index"], k);
        assert_eq!(choice["finish_reason"], "length");
        let text = choice["text"].as_str().unwrap();
        assert_eq!(text, tokenizer().decode(&p.ids).unwrap());
        let lp = &choice["logprobs"];
        let want_tokens: Vec<String> = p.ids.iter().map(|&id| decode(id)).collect();
        assert_eq!(strings(&lp["tokens"]), want_tokens);
        assert_offsets_consistent(text, lp);
        let got = floats(&lp["token_logprobs"]);
        let tops = lp["top_logprobs"].as_array().unwrap();
        assert_eq!(
            (got[0], &tops[0]),
            (None, &Value::Null),
            "the first token has no logprob"
        );
        let rows = engine_rows(&p.ids);
        for j in 1..p.ids.len() {
            let g = got[j].unwrap_or_else(|| panic!("token {j} has no logprob"));
            let what = format!("prompt {k}, token {j}");
            assert_near(&what, g, rows[j - 1][p.ids[j] as usize], 1e-5, 0.0);
            assert_eq!(p.positions[j - 1], j - 1);
            let reference = &fixture().logits[p.logits_offset + (j - 1) * v..][..v];
            let want = log_softmax(reference)[p.ids[j] as usize];
            assert_near(&format!("{what} vs transformers"), g, want, 1e-4, 1e-4);
            // The top 3 alternatives and the token itself, by their text.
            let top = tops[j].as_object().unwrap();
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&a, &b| rows[j - 1][b].total_cmp(&rows[j - 1][a]));
            for &id in &order[..3] {
                let t = decode(id as u32);
                let l = top[&t].as_f64().unwrap_or_else(|| panic!("{t:?} not in {top:?}"));
                assert!(l >= rows[j - 1][id] - 1e-5, "{what}: {t:?}");
            }
            assert!(top.len() <= 4, "{top:?}");
            assert_near(&what, top[&want_tokens[j]].as_f64().unwrap(), g, 0.0, 0.0);
        }
    }
    // Each of n choices scores its prompt alike.
    let two = post_json(
        &server.url("/v1/completions"),
        &json!({"prompt": ids[0], "n": 2, "echo": true, "logprobs": 3, "max_tokens": 0}),
    );
    let first = &r.json["choices"][0]["logprobs"];
    assert_eq!(&two.json["choices"][0]["logprobs"], first, "{}", two.text);
    assert_eq!(&two.json["choices"][1]["logprobs"], first, "{}", two.text);
    // Offsets count characters, not bytes; a character split over byte
    // tokens starts where its first token does.
    let text = "Zürich café, naïve — 日本語 ok";
    let r = post_json(
        &server.url("/v1/completions"),
        &json!({"prompt": text, "echo": true, "logprobs": 0, "max_tokens": 0}),
    );
    let choice = &r.json["choices"][0];
    assert_eq!(choice["text"], text);
    assert_offsets_consistent(text, &choice["logprobs"]);
    let offs = offsets(&choice["logprobs"]["text_offset"]);
    assert_eq!(*offs.last().unwrap(), text.chars().count() - " ok".len());
    // `logprobs: 0`: each position's object holds the token alone.
    for top in choice["logprobs"]["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
    {
        assert_eq!(top.as_object().unwrap().len(), 1, "{top}");
    }
    // Nothing was generated, and the model's metrics agree.
    let m = server::get(&server.url("/metrics"), None).text;
    assert_eq!(metric(&m, "gpt2_generated_tokens_total"), Some(0.0), "{m}");
}

/// Generated tokens' logprobs equal the engine's, after the echoed prompt's;
/// a stream carries the same entries, prompt first, in its chunks.
#[test]
fn generated_logprobs_offsets_and_their_stream() {
    let server = tiny_server(&[]);
    let url = server.url("/v1/completions");
    let body = json!({"prompt": PROMPT, "echo": true, "logprobs": 2, "max_tokens": 12,
                      "temperature": 0, "ignore_eos": true});
    let r = post_json(&url, &body);
    assert_eq!(r.status, 200, "{}", r.text);
    let choice = &r.json["choices"][0];
    let prompt = tokenizer().encode(PROMPT).unwrap();
    let mut all = prompt.clone();
    all.extend(greedy_ids(&prompt, 12));
    let text = choice["text"].as_str().unwrap();
    assert_eq!(text, tokenizer().decode(&all).unwrap());
    assert!(text.starts_with(PROMPT));
    let lp = &choice["logprobs"];
    let want: Vec<String> = all.iter().map(|&id| decode(id)).collect();
    assert_eq!(strings(&lp["tokens"]), want);
    assert_offsets_consistent(text, lp);
    let got = floats(&lp["token_logprobs"]);
    let rows = engine_rows(&all);
    assert_eq!(got[0], None);
    for j in 1..all.len() {
        assert_near(
            &format!("token {j}"),
            got[j].unwrap(),
            rows[j - 1][all[j] as usize],
            1e-5,
            0.0,
        );
    }
    // Greedy: each generated token is its position's likeliest.
    for j in prompt.len()..all.len() {
        let top = lp["top_logprobs"][j].as_object().unwrap();
        let best = top.values().filter_map(Value::as_f64).fold(f64::MIN, f64::max);
        assert_near(&format!("greedy token {j}"), got[j].unwrap(), best, 0.0, 0.0);
    }

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let s = server::stream(&url, &streamed, || {});
    assert!(s.done);
    // The prompt first, as one chunk with its entries; then one per token,
    // then the finish reason.
    let first = &s.chunks[0]["choices"][0];
    assert_eq!(first["text"], PROMPT);
    assert_eq!(strings(&first["logprobs"]["tokens"]).len(), prompt.len());
    assert_eq!(s.chunks.len(), 1 + 12 + 1);
    assert_eq!(s.text(), text);
    let joined = |key: &str| -> Vec<Value> {
        s.chunks
            .iter()
            .flat_map(|c| c["choices"][0]["logprobs"][key].as_array().unwrap().clone())
            .collect()
    };
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(&joined(key), lp[key].as_array().unwrap(), "{key}");
    }
    // Without `logprobs` there are none, echo or not.
    let plain = post_json(&url, &json!({"prompt": PROMPT, "echo": true, "max_tokens": 0}));
    assert_eq!(plain.json["choices"][0]["text"], PROMPT);
    assert_eq!(plain.json["choices"][0]["logprobs"], Value::Null);
}

/// A stop string cuts the text; the logprob entries returned are those of
/// the tokens whose text starts before the cut, streamed or not.
#[test]
fn a_stop_string_drops_the_logprobs_past_its_cut() {
    let server = tiny_server(&[]);
    let url = server.url("/v1/completions");
    let body =
        json!({"prompt": PROMPT, "logprobs": 1, "max_tokens": 30, "temperature": 0, "ignore_eos": true});
    let full = post_json(&url, &body);
    let (text, lp) = (
        full.json["choices"][0]["text"].as_str().unwrap(),
        &full.json["choices"][0]["logprobs"],
    );
    let (tokens, offs) = (strings(&lp["tokens"]), offsets(&lp["text_offset"]));
    let chars: Vec<char> = text.chars().collect();
    // A token (not the first) whose text first occurs where it starts.
    let k = (2..tokens.len())
        .find(|&k| {
            let t = &tokens[k];
            let first = text.find(t.as_str()).map(|b| text[..b].chars().count());
            !t.trim().is_empty() && !t.contains('\u{FFFD}') && first == Some(offs[k])
        })
        .unwrap_or_else(|| panic!("no token to stop at in {text:?}"));
    let cut = offs[k];
    let kept = offs.iter().filter(|&&o| o < cut).count();
    let mut stopped = body.clone();
    stopped["stop"] = json!([tokens[k]]);
    let r = post_json(&url, &stopped);
    let choice = &r.json["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(
        choice["text"].as_str().unwrap(),
        chars[..cut].iter().collect::<String>()
    );
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        let got = choice["logprobs"][key].as_array().unwrap();
        assert_eq!(got[..], lp[key].as_array().unwrap()[..kept], "{key}");
    }
    stopped["stream"] = json!(true);
    let s = server::stream(&url, &stopped, || {});
    let streamed: Vec<Value> = s
        .chunks
        .iter()
        .flat_map(|c| c["choices"][0]["logprobs"]["tokens"].as_array().unwrap().clone())
        .collect();
    assert_eq!(&streamed, choice["logprobs"]["tokens"].as_array().unwrap());
    assert_eq!(s.text(), choice["text"].as_str().unwrap());
}

/// Choice i of a seeded request is what that prompt alone gives with
/// `choice_seed(seed, i)`, whatever else the request holds; choices come
/// in prompt × n order, whole or streamed.
#[test]
fn n_choices_follow_their_seeds_whatever_the_batch() {
    let server = tiny_server(&[]);
    let url = server.url("/v1/completions");
    let seed = 1234u64;
    let sampled = |prompt: Value, n: usize, seed: u64| json!({"prompt": prompt, "n": n, "seed": seed, "max_tokens": 8, "temperature": 1.0, "ignore_eos": true});
    let texts = |r: &server::Reply| -> Vec<String> {
        let choices = r.json["choices"].as_array().unwrap();
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i, "{}", r.text);
        }
        choices
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    let three = post_json(&url, &sampled(json!(PROMPT), 3, seed));
    assert_eq!(three.status, 200, "{}", three.text);
    let three = texts(&three);
    assert_eq!(three.len(), 3);
    assert!(three[0] != three[1] || three[1] != three[2], "{three:?}");
    for (i, t) in three.iter().enumerate() {
        let alone = post_json(&url, &sampled(json!(PROMPT), 1, choice_seed(seed, i)));
        assert_eq!(&texts(&alone)[0], t, "choice {i}");
    }
    let other = "Another prompt, first in the batch";
    let batch = post_json(&url, &sampled(json!([other, PROMPT]), 3, seed));
    let (other_tokens, prompt_tokens) = (
        tokenizer().encode(other).unwrap().len(),
        tokenizer().encode(PROMPT).unwrap().len(),
    );
    assert_eq!(
        batch.json["usage"],
        json!({"prompt_tokens": other_tokens + prompt_tokens, "completion_tokens": 48,
               "total_tokens": other_tokens + prompt_tokens + 48})
    );
    let batch = texts(&batch);
    assert_eq!(batch.len(), 6);
    assert_eq!(batch[3..], three[..]);
    let first_alone = texts(&post_json(&url, &sampled(json!(other), 3, seed)));
    assert_eq!(batch[..3], first_alone[..]);

    // Streamed: the choices interleave, each ends once, then the usage, then one [DONE].
    let mut body = sampled(json!([other, PROMPT]), 3, seed);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = server::stream(&url, &body, || {});
    assert!(s.done);
    let (usage, rest) = s.chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 48);
    assert_eq!(usage["usage"]["prompt_tokens"], other_tokens + prompt_tokens);
    let rest = server::Streamed {
        status: s.status,
        chunks: rest.to_vec(),
        done: true,
    };
    let got = by_choice(&rest, |c| c["text"].as_str());
    assert_eq!(got.len(), 6);
    for (i, (text, finishes, last)) in &got {
        assert_eq!(text, &batch[*i as usize], "choice {i}");
        assert_eq!((*finishes, *last), (1, true), "choice {i}");
    }
}

/// Batched greedy prompts: choice p is prompt p's own greedy text.
#[test]
fn batch_prompts_come_back_in_index_order() {
    let server = tiny_server(&[]);
    let prompts = ["One", "Two words", "And three words here"];
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tokenizer().encode(p).unwrap()).collect();
    let r = post_json(
        &server.url("/v1/completions"),
        &json!({"prompt": ids, "n": 2, "max_tokens": 5, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let choices = r.json["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6);
    for (index, c) in choices.iter().enumerate() {
        let want = tokenizer().decode(&greedy_ids(&ids[index / 2], 5)).unwrap();
        assert_eq!(
            (c["index"].as_u64(), c["text"].as_str()),
            (Some(index as u64), Some(want.as_str()))
        );
    }
}

const MESSAGES: &str =
    r#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]"#;

/// The chat answer is the completion of the rendered transcript, stopped
/// at the template's stop string; streamed, the role comes first.
#[test]
fn chat_is_the_transcripts_completion_whole_and_streamed() {
    let server = tiny_server(&[]);
    let messages: Value = serde_json::from_str(MESSAGES).unwrap();
    let rendered = "System: Be brief.\nUser: Hello there\nAssistant:";
    let chat_url = server.url("/v1/chat/completions");
    let body = json!({"messages": messages, "max_tokens": 40, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let chat = post_json(&chat_url, &body);
    assert_eq!(chat.status, 200, "{}", chat.text);
    let plain = post_json(
        &server.url("/v1/completions"),
        &json!({"prompt": rendered, "max_tokens": 40, "temperature": 0, "stop": ["\nUser:"], "logprobs": 2}),
    );
    let j = &chat.json;
    assert_eq!(j["object"], "chat.completion");
    assert!(j["id"].as_str().unwrap().starts_with("chatcmpl-"), "{j}");
    let choice = &j["choices"][0];
    let want = &plain.json["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], want["text"]);
    assert_eq!(choice["finish_reason"], want["finish_reason"]);
    assert_eq!(j["usage"], plain.json["usage"]);
    assert_eq!(
        j["usage"]["prompt_tokens"],
        tokenizer().encode(rendered).unwrap().len()
    );
    // Chat's logprobs: one entry per token, with its bytes and top 2.
    let content = choice["logprobs"]["content"].as_array().unwrap();
    let want_lp = &want["logprobs"];
    assert_eq!(content.len(), strings(&want_lp["tokens"]).len());
    for (e, (t, l)) in content.iter().zip(
        strings(&want_lp["tokens"])
            .iter()
            .zip(floats(&want_lp["token_logprobs"])),
    ) {
        assert_eq!(
            (e["token"].as_str(), e["logprob"].as_f64()),
            (Some(t.as_str()), l)
        );
        assert_eq!(e["bytes"], json!(t.as_bytes()));
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2);
    }

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let s = server::stream(&chat_url, &streamed, || {});
    assert!(s.done);
    assert!(s.chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(
        s.chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let got = by_choice(&s, |c| c["delta"]["content"].as_str());
    assert_eq!(got[&0].0, choice["message"]["content"].as_str().unwrap());
    assert_eq!((got[&0].1, got[&0].2), (1, true));
    let tokens: Vec<Value> = s
        .chunks
        .iter()
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(&tokens, content);
}

/// `--chat-template FILE` renders the messages its way (seen in the prompt's
/// token count and the answer); a bad file stops the server, named.
#[test]
fn a_chat_template_file_replaces_the_transcript() {
    let dir = scratch_dir("serve-surface-chat-template");
    let path = dir.join("template.json");
    std::fs::write(
        &path,
        r####"{"message": "### {role}\n{content}\n", "roles": {"user": "Human"}, "generation": "### Bot\n", "stop": ["###"]}"####,
    )
    .unwrap();
    let server = tiny_server(&["--chat-template", path.to_str().unwrap()]);
    let messages: Value = serde_json::from_str(MESSAGES).unwrap();
    let rendered = "### system\nBe brief.\n### Human\nHello there\n### Bot\n";
    let chat = post_json(
        &server.url("/v1/chat/completions"),
        &json!({"messages": messages, "max_tokens": 20, "temperature": 0}),
    );
    assert_eq!(chat.status, 200, "{}", chat.text);
    assert_eq!(
        chat.json["usage"]["prompt_tokens"],
        tokenizer().encode(rendered).unwrap().len()
    );
    let plain = post_json(
        &server.url("/v1/completions"),
        &json!({"prompt": rendered, "max_tokens": 20, "temperature": 0, "stop": ["###"]}),
    );
    assert_eq!(
        chat.json["choices"][0]["message"]["content"],
        plain.json["choices"][0]["text"]
    );

    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"message": "{role} says"}"#).unwrap();
    for (file, fault) in [
        (bad.clone(), "{content}"),
        (dir.join("missing.json"), "missing.json"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpt2"))
            .args([
                "serve",
                "--port",
                "0",
                "--weights",
                &tiny_dir(),
                "--chat-template",
            ])
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(file.to_str().unwrap()) && stderr.contains(fault),
            "{stderr}"
        );
    }
}

/// Every bad input of the issue's list is a 400 naming its parameter, on
/// both endpoints, and nothing of a refused request runs.
#[test]
fn every_bad_input_is_a_400_naming_its_parameter() {
    let server = tiny_server(&["--max-batch", "2", "--max-queue", "0"]);
    let url = server.url("/v1/completions");
    let chat_url = server.url("/v1/chat/completions");
    let user = json!([{"role": "user", "content": "hi"}]);
    for (body, param) in [
        (json!({"prompt": "a", "logprobs": 21}), "logprobs"),
        (json!({"prompt": "a", "n": 0}), "n"),
        (json!({"prompt": "a", "n": 1000}), "n"),
        // More choices than the batch holds: never runnable here.
        (json!({"prompt": "a", "n": 5}), "n"),
        (json!({"prompt": "a", "best_of": 3, "n": 2}), "best_of"),
        (json!({"prompt": "a", "logit_bias": {"60000": 1}}), "logit_bias"),
        (json!({"prompt": "a", "logit_bias": {"5": 1000}}), "logit_bias"),
        (json!({"prompt": "a", "logit_bias": {"five": 1}}), "logit_bias"),
        (json!({"prompt": "a", "presence_penalty": 3}), "presence_penalty"),
        (
            json!({"prompt": "a", "frequency_penalty": -2.5}),
            "frequency_penalty",
        ),
        (json!({"prompt": "a", "max_tokens": 0}), "max_tokens"),
        // n × prompts past max_batch + max_queue (2 + 0).
        (json!({"prompt": ["a", "b"], "n": 2}), "n"),
        (json!({"prompt": ["a", "b", "c"]}), "prompt"),
        (json!({"prompt": [[1], []]}), "prompt"),
        (json!({"prompt": "a", "suffix": "z"}), "suffix"),
    ] {
        assert_param(&post_json(&url, &body), 400, param);
    }
    for (body, param) in [
        (json!({"messages": user, "n": 3}), "n"),
        (
            json!({"messages": user, "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"messages": user, "top_logprobs": 2}), "top_logprobs"),
        (
            json!({"messages": user, "logit_bias": {"60000": 1}}),
            "logit_bias",
        ),
        (
            json!({"messages": user, "max_completion_tokens": 0}),
            "max_completion_tokens",
        ),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "messages",
        ),
        (json!({"messages": []}), "messages"),
        (json!({"prompt": "a"}), "prompt"),
    ] {
        assert_param(&post_json(&chat_url, &body), 400, param);
    }
    // The unknown logit_bias id is named with the vocabulary.
    let r = post_json(&url, &json!({"prompt": "a", "logit_bias": {"60000": 1}}));
    assert!(r.json["error"]["message"].as_str().unwrap().contains("60000"));
    let m = server::get(&server.url("/metrics"), None).text;
    for series in [
        "gpt2_generated_tokens_total",
        "gpt2_prompt_tokens_total",
        "gpt2_requests_in_flight",
    ] {
        assert_eq!(metric(&m, series), Some(0.0), "{series}\n{m}");
    }
    // What fits runs: two choices, or two prompts.
    let ok = post_json(&url, &json!({"prompt": ["a", "b"], "max_tokens": 2}));
    assert_eq!(
        ok.json["choices"].as_array().map(Vec::len),
        Some(2),
        "{}",
        ok.text
    );
}

/// A request whose choices together pass the whole KV cache budget can
/// never run: 400 naming `n`; one that just fits runs.
#[test]
fn n_past_the_whole_kv_budget_is_a_400() {
    // The tiny model's cache holds 64 positions in 64 KiB: 16 sequences in 1 MiB.
    let server = tiny_server(&["--kv-cache-mib", "1"]);
    let url = server.url("/v1/completions");
    let body = |n: usize| json!({"prompt": PROMPT, "n": n, "max_tokens": 4, "temperature": 0});
    let r = post_json(&url, &body(17));
    assert_param(&r, 400, "n");
    assert_eq!(r.json["error"]["code"], "kv_cache_exceeded");
    let r = post_json(&url, &body(16));
    assert_eq!(r.json["choices"].as_array().map(Vec::len), Some(16), "{}", r.text);
}

// ---- in-process: the engine held while a request is in flight ----

/// Room for 3 sequences (max_batch 2 + max_queue 1): while a request of 2
/// choices runs, one of 2 more is refused whole (429, nothing of it runs)
/// and one of 1 more is taken; once the first is done, the 2 fit.
#[test]
fn choices_are_admitted_whole_or_refused_whole() {
    let tiny = Checkpoint {
        dir: synth_dir(Preset::Tiny, 0),
        model_id: "tiny",
        weights: "SYNTHETIC tiny checkpoint (random weights)",
    };
    let config = ServeConfig {
        max_batch: 2,
        max_queue: 1,
        // Its own pool, so the held engine holds none of another test's threads.
        pool: Some(Arc::new(
            rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap(),
        )),
        grace: Duration::from_secs(1),
        ..ServeConfig::default()
    };
    let server = InProcess::start(tiny, config, None);
    let url = server.url("/v1/completions");
    let body = |n: usize, stream: bool| json!({"prompt": PROMPT, "n": n, "max_tokens": 6, "temperature": 0, "ignore_eos": true, "stream": stream});
    server.hold(true);
    // The first request's stream starts; the engine is held after a step.
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut first = TcpStream::connect(&addr).unwrap();
    first.set_read_timeout(Some(PATIENCE)).unwrap();
    let payload = body(2, true).to_string();
    write!(
        first,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    )
    .unwrap();
    let mut first = BufReader::new(first);
    let mut line = String::new();
    first.read_line(&mut line).unwrap();
    assert!(line.contains("200"), "{line}");
    let prompt_tokens = tokenizer().encode(PROMPT).unwrap().len() as f64;
    assert_eq!(server.metric("gpt2_prompt_tokens_total"), Some(prompt_tokens));

    let refused = post_json(&url, &body(2, false));
    assert_eq!(refused.status, 429, "{}", refused.text);
    assert_eq!(refused.json["error"]["code"], "queue_full");
    assert!(
        refused.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs 2 more"),
        "{}",
        refused.text
    );
    // Nothing of it was admitted or submitted.
    assert_eq!(server.metric("gpt2_requests_in_flight"), Some(1.0));
    assert_eq!(server.metric("gpt2_prompt_tokens_total"), Some(prompt_tokens));

    // One more sequence fits beside the two.
    std::thread::scope(|s| {
        let third = s.spawn(|| post_json(&url, &body(1, false)));
        let start = std::time::Instant::now();
        while server.metric("gpt2_requests_in_flight") != Some(2.0) {
            assert!(start.elapsed() < PATIENCE, "the third request was not admitted");
            std::thread::sleep(Duration::from_millis(20));
        }
        server.hold(false);
        let third = third.join().unwrap();
        assert_eq!(third.status, 200, "{}", third.text);
    });
    let mut rest = String::new();
    while !rest.contains("[DONE]") {
        assert!(first.read_line(&mut rest).unwrap() > 0, "the stream ended early");
    }
    drop(first);
    let start = std::time::Instant::now();
    while server.metric("gpt2_requests_in_flight") != Some(0.0) {
        assert!(start.elapsed() < PATIENCE, "the slots were never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let again = post_json(&url, &body(2, false));
    assert_eq!(
        again.json["choices"].as_array().map(Vec::len),
        Some(2),
        "{}",
        again.text
    );
    // 2 + 1 + 2 choices of 6 tokens: the refused request generated none.
    assert_eq!(server.metric("gpt2_generated_tokens_total"), Some(30.0));
}
