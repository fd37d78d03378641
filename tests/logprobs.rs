//! Log-probabilities against Hugging Face `transformers`: the engine's
//! prompt scores (through a `Session`, the `Scheduler` and `gpt2::score`)
//! and generated-token logprobs equal `log_softmax` of the reference logits
//! (`weights/fixtures`, made by `make_reference.py`), computed here in f64;
//! a check that this comparison catches a shifted log-softmax or the wrong
//! position; generated tokens' logprobs are the raw model's; and the
//! sliding window of `gpt2::score` is the perplexity guide's.

mod common;

use std::sync::{Arc, OnceLock};

use common::fixture::{case, fixture, PromptCase};
use common::{overflowing_checkpoint, synth_dir};
use gpt2::logprobs::TokenLogprob;
use gpt2::scheduler::Event;
use gpt2::score::{self, ScoreOptions};
use gpt2::synth::Preset;
use gpt2::{
    Fit, GenerateOptions, Generation, Gpt2Model, Request, SamplingParams, Scheduler, SchedulerConfig, Session,
};

/// The bound: within 1e-4 of the reference, absolute.
const ATOL: f64 = 1e-4;
/// Alternatives compared per position.
const TOP: usize = 5;
const REGENERATE: &str = "if the model or generator changed on purpose, regenerate the fixtures: \
    `cargo build --release --bin gpt2 && python weights/fixtures/make_reference.py`";

/// One model per preset, loaded once per test binary.
fn model(preset: Preset) -> Arc<Gpt2Model> {
    static TINY: OnceLock<Arc<Gpt2Model>> = OnceLock::new();
    static BIG: OnceLock<Arc<Gpt2Model>> = OnceLock::new();
    let cell = if preset == Preset::Tiny { &TINY } else { &BIG };
    let load =
        || Arc::new(Gpt2Model::load(&synth_dir(preset, case(preset).seed)).expect("load synthetic model"));
    Arc::clone(cell.get_or_init(load))
}

/// `log_softmax` of one row of logits, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .map(|&x| f64::from(x))
        .fold(f64::NEG_INFINITY, f64::max);
    let lse = max
        + logits
            .iter()
            .map(|&x| (f64::from(x) - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&x| f64::from(x) - lse).collect()
}

/// Compares one token's logprob and its `top` alternatives with a
/// reference log-softmax row: the token's value, each alternative's value
/// and the k-th largest reference value within [`ATOL`], and the ids those
/// of the reference's top (where two ids differ, their reference values
/// must tie within the tolerance). The max abs difference, or what failed.
fn compare(got: &TokenLogprob, want: &[f64], top: usize) -> Result<f64, String> {
    let mut max_abs = 0f64;
    let mut close = |what: &str, a: f32, b: f64| {
        let d = (f64::from(a) - b).abs();
        max_abs = max_abs.max(d);
        if d <= ATOL {
            Ok(())
        } else {
            Err(format!("{what}: got {a}, want {b} (diff {d:e})"))
        }
    };
    close(
        &format!("token {}", got.token),
        got.logprob,
        want[got.token as usize],
    )?;
    let mut order: Vec<usize> = (0..want.len()).collect();
    order.sort_by(|&a, &b| want[b].total_cmp(&want[a]).then(a.cmp(&b)));
    if got.top.len() != top {
        return Err(format!("{} alternatives, want {top}", got.top.len()));
    }
    for (k, (&(id, lp), &ref_id)) in got.top.iter().zip(&order).enumerate() {
        close(&format!("top {k} value"), lp, want[ref_id])?;
        close(&format!("top {k} (id {id})"), lp, want[id as usize])?;
        if id as usize != ref_id && (want[id as usize] - want[ref_id]).abs() > 2.0 * ATOL {
            return Err(format!("top {k}: id {id}, want {ref_id}"));
        }
    }
    Ok(max_abs)
}

/// The reference log-softmax at fixture position `j` of prompt `p`.
fn reference(p: &PromptCase, j: usize, v: usize) -> Vec<f64> {
    log_softmax(&fixture().logits[p.logits_offset + j * v..][..v])
}

/// The request every path runs: the prompt scored, then its 30 greedy
/// tokens with their logprobs (or, `generate` false, the prompt only).
fn request(model: &Gpt2Model, p: &PromptCase, generate: bool) -> Request {
    let opts = GenerateOptions {
        logprobs: generate.then_some(TOP),
        prompt_logprobs: Some(TOP),
        ..GenerateOptions::greedy(if generate { p.greedy.len() } else { 0 })
    };
    Request::prepare(&model.config, p.ids.clone(), opts, Fit::Prompt).unwrap()
}

/// A streamed request's result, checking that the `Prompt` event (sent once,
/// before any token) carries the scores the result has, and each `Logprob`
/// event those of the token after it.
fn streamed(handle: gpt2::RequestHandle) -> Generation {
    let (mut prompt, mut logprobs, mut tokens) = (None, Vec::new(), Vec::new());
    while let Some(event) = handle.recv() {
        match event {
            Event::Prompt(scores) => {
                assert!(prompt.is_none() && tokens.is_empty(), "one Prompt event, first");
                prompt = Some(scores);
            }
            Event::Logprob(lp) => logprobs.push(lp),
            Event::Token(t) => {
                tokens.push(t);
                assert_eq!(logprobs.len(), tokens.len(), "each Logprob just before its Token");
                assert_eq!(logprobs.last().unwrap().token, t);
            }
            Event::Done(result) => {
                let gen = result.unwrap();
                // No event when the prompt is not scored.
                assert_eq!(prompt.unwrap_or_default(), gen.prompt_logprobs);
                assert_eq!((&tokens, &logprobs), (&gen.tokens, &gen.logprobs));
                return gen;
            }
        }
    }
    panic!("no Done event");
}

/// Every path's scores for `p`, named: what each says at the prompt's
/// positions (index `pos` scores token `pos + 1`; `None` past the prompt)
/// and its generated tokens' logprobs (empty for prompt-only paths).
type Scores = (String, Vec<TokenLogprob>, Vec<TokenLogprob>);

fn every_path(model: &Arc<Gpt2Model>, sched: &Scheduler, p: &PromptCase) -> Vec<Scores> {
    let mut out = Vec::new();
    let mut session = Session::new(model, 8).unwrap();
    let mut add = |name: &str, gen: Generation| {
        assert_eq!(
            gen.prompt_logprobs.len(),
            p.ids.len() - 1,
            "{name}: the first token has none"
        );
        if !gen.tokens.is_empty() {
            assert_eq!(gen.tokens, p.greedy, "{name}: greedy tokens; {REGENERATE}");
        }
        out.push((name.to_string(), gen.prompt_logprobs, gen.logprobs));
    };
    add(
        "session",
        session.run(model, request(model, p, true), |_| {}).unwrap(),
    );
    add(
        "session, prompt only",
        session.run(model, request(model, p, false), |_| {}).unwrap(),
    );
    add(
        "scheduler",
        streamed(sched.submit_request(request(model, p, true)).unwrap()),
    );
    let choices = sched.submit_n(request(model, p, false), 3).unwrap();
    for (i, h) in choices.into_iter().enumerate() {
        add(&format!("scheduler, prompt only, choice {i} of 3"), streamed(h));
    }
    let opts = ScoreOptions { stride: 1, top: TOP };
    let scored = score::score(model, &p.ids, &opts).unwrap();
    assert!(scored.logprobs[0].is_none(), "score: the first token has none");
    let prompt = scored.logprobs.into_iter().skip(1).map(Option::unwrap).collect();
    out.push(("score".into(), prompt, Vec::new()));
    out
}

fn check_against_reference(preset: Preset) {
    let (c, m) = (case(preset), model(preset));
    let v = m.config.vocab_size;
    let sched = Scheduler::new(Arc::clone(&m), SchedulerConfig::default()).unwrap();
    let mut max_abs = 0f64;
    let mut checked = 0;
    for p in &c.prompts {
        let last = p.ids.len() - 1;
        for (name, prompt, generated) in every_path(&m, &sched, p) {
            let mut check = |what: String, got: &TokenLogprob, want: Vec<f64>| {
                let d = compare(got, &want, TOP).unwrap_or_else(|e| {
                    panic!(
                        "{} {what}, path {name}, prompt {:?}: {e}; {REGENERATE}",
                        c.preset, p.ids
                    )
                });
                max_abs = max_abs.max(d);
                checked += 1;
            };
            for (j, &pos) in p.positions.iter().enumerate() {
                if pos < last {
                    assert_eq!(prompt[pos].token, p.ids[pos + 1]);
                    check(format!("prompt position {pos}"), &prompt[pos], reference(p, j, v));
                } else if !generated.is_empty() {
                    // The last prompt row's logits gave the first token.
                    check(
                        format!("position {pos} (first generated)"),
                        &generated[0],
                        reference(p, j, v),
                    );
                }
            }
            if let Some(lp) = generated.last() {
                let want = log_softmax(&fixture().logits[p.last_step_logits_offset..][..v]);
                check("the last greedy step".into(), lp, want);
            }
        }
    }
    assert!(checked > 20, "{checked} comparisons");
    eprintln!(
        "{}: max abs logprob diff vs transformers {} = {max_abs:e} ({checked} tokens with top {TOP})",
        c.preset,
        fixture().manifest.versions["transformers"]
    );
}

#[test]
fn tiny_logprobs_match_transformers() {
    check_against_reference(Preset::Tiny);
}

#[test]
fn gpt2_124m_logprobs_match_transformers() {
    check_against_reference(Preset::Gpt2_124M);
}

/// The comparison above can fail: against the reference shifted by a
/// constant (±1e-3), or at the neighbouring position (the off-by-one of
/// scoring token `t` from its own row), it reports an error.
#[test]
fn the_comparison_fails_if_shifted_or_at_the_wrong_position() {
    for preset in [Preset::Tiny, Preset::Gpt2_124M] {
        let (c, m) = (case(preset), model(preset));
        let v = m.config.vocab_size;
        let mut neighbours = 0;
        for p in &c.prompts {
            let run = Session::new(&m, 8)
                .unwrap()
                .run(&m, request(&m, p, true), |_| {})
                .unwrap();
            // Position `pos` scores the prompt's next token, or the first
            // generated one after the prompt's last.
            let ours = |pos: usize| run.prompt_logprobs.get(pos).unwrap_or(&run.logprobs[0]);
            for (j, &pos) in p.positions.iter().enumerate() {
                let want = reference(p, j, v);
                assert!(compare(ours(pos), &want, TOP).is_ok(), "the unshifted row passes");
                for shift in [1e-3, -1e-3] {
                    let shifted: Vec<f64> = want.iter().map(|x| x + shift).collect();
                    assert!(
                        compare(ours(pos), &shifted, TOP).is_err(),
                        "{} position {pos}: a log-softmax off by {shift} must fail",
                        c.preset
                    );
                }
            }
            for (ja, pair) in p.positions.windows(2).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                if b == a + 1 {
                    neighbours += 1;
                    let msg = |x, y| {
                        format!(
                            "{}: position {x} against the reference at {y} must fail",
                            c.preset
                        )
                    };
                    assert!(
                        compare(ours(a), &reference(p, ja + 1, v), TOP).is_err(),
                        "{}",
                        msg(a, b)
                    );
                    assert!(
                        compare(ours(b), &reference(p, ja, v), TOP).is_err(),
                        "{}",
                        msg(b, a)
                    );
                }
            }
        }
        assert!(
            neighbours > 0,
            "{}: the fixtures have neighbouring positions",
            c.preset
        );
    }
}

/// Generated tokens' logprobs, greedy and sampled, alone and batched, are
/// `log_softmax` of the raw logits of the whole sequence (prompt and
/// generated) at their positions: temperature, top-k and top-p do not
/// change them. Under greedy each is its position's top alternative.
#[test]
fn generated_logprobs_are_the_raw_models() {
    let m = model(Preset::Tiny);
    let v = m.config.vocab_size;
    let sched = Scheduler::new(Arc::clone(&m), SchedulerConfig::default()).unwrap();
    let prompt: Vec<u32> = vec![464, 2068, 7586, 21831, 18045, 625];
    let sampled = SamplingParams {
        temperature: 0.7,
        top_k: Some(40),
        top_p: Some(0.9),
        ..SamplingParams::greedy()
    };
    for (name, sampling) in [("greedy", SamplingParams::greedy()), ("sampled", sampled)] {
        let opts = GenerateOptions {
            sampling: sampling.clone(),
            seed: 11,
            logprobs: Some(3),
            ..GenerateOptions::greedy(24)
        };
        let alone = Session::new(&m, 8)
            .unwrap()
            .generate(&m, &prompt, &opts, |_| {})
            .unwrap();
        let batched = streamed(sched.submit(prompt.clone(), opts).unwrap());
        assert_eq!(
            alone,
            Generation {
                timings: alone.timings.clone(),
                ..batched.clone()
            }
        );
        assert_eq!(alone.logprobs.len(), alone.tokens.len());
        let all: Vec<u32> = prompt.iter().chain(&alone.tokens).copied().collect();
        let logits = m.logits_all(&all, 16).unwrap();
        for (i, lp) in alone.logprobs.iter().enumerate() {
            let pos = prompt.len() - 1 + i;
            assert_eq!(lp.token, alone.tokens[i]);
            let want = log_softmax(&logits[pos * v..][..v]);
            compare(lp, &want, 3).unwrap_or_else(|e| panic!("{name} token {i} (position {pos}): {e}"));
            if name == "greedy" {
                assert_eq!(lp.top[0], (lp.token, lp.logprob), "greedy: the top alternative");
            }
        }
        if name == "sampled" {
            let not_top = alone.logprobs.iter().filter(|lp| lp.top[0].0 != lp.token).count();
            assert!(
                not_top > 0,
                "sampling picked only top tokens: the test shows nothing"
            );
        }
    }
}

/// `gpt2::score` past the window: the guide's loop, written out here over
/// `logits_all` of each window, gives the same tokens scored, the same
/// logprobs, the same count and NLL; with stride = window each window
/// starts cold and its first token goes unscored.
#[test]
fn score_slides_its_window_as_the_guide_does() {
    let m = model(Preset::Tiny);
    let (v, window) = (m.config.vocab_size, m.config.n_positions);
    let tokens: Vec<u32> = (0..300u64).map(|i| (i * 7919 % 50_257) as u32).collect();
    for stride in [50, 128, 97] {
        let got = score::score(&m, &tokens, &ScoreOptions { stride, top: 2 }).unwrap();
        // transformers' perplexity guide, with the exact sum instead of mean x count.
        let (mut want, mut nll, mut prev_end, mut windows) = (vec![None; tokens.len()], 0f64, 0, 0);
        for begin in (0..tokens.len()).step_by(stride) {
            let end = (begin + window).min(tokens.len());
            let trg_len = end - prev_end;
            let logits = m.logits_all(&tokens[begin..end], 64).unwrap();
            // Targets: the last trg_len tokens of the window, less the first
            // of the window (the label shift: nothing predicts it).
            for t in (end - trg_len).max(begin + 1)..end {
                let lp = log_softmax(&logits[(t - begin - 1) * v..][..v])[tokens[t] as usize];
                nll -= lp;
                want[t] = Some(lp);
            }
            prev_end = end;
            windows += 1;
            if end == tokens.len() {
                break;
            }
        }
        let count = want.iter().flatten().count();
        assert_eq!(
            (got.count, got.windows, got.window, got.stride),
            (count, windows, window, stride)
        );
        if stride == window {
            assert_eq!(
                count,
                tokens.len() - windows,
                "stride = window: each window's first token unscored"
            );
        } else {
            assert_eq!(count, tokens.len() - 1);
        }
        for (t, (g, w)) in got.logprobs.iter().zip(&want).enumerate() {
            match (g, w) {
                (Some(g), Some(w)) => {
                    assert_eq!(g.token, tokens[t]);
                    assert!(
                        (f64::from(g.logprob) - w).abs() < 1e-5,
                        "stride {stride}, token {t}: {} vs {w}",
                        g.logprob
                    );
                    assert_eq!(g.top.len(), 2);
                }
                (None, None) => {}
                _ => panic!(
                    "stride {stride}, token {t}: scored {} here, {} by the guide",
                    g.is_some(),
                    w.is_some()
                ),
            }
        }
        assert!(
            (got.nll - nll).abs() < 1e-3,
            "stride {stride}: nll {} vs {nll}",
            got.nll
        );
        assert_eq!(got.perplexity(), (got.nll / got.count as f64).exp());
    }
}

/// Bad inputs are errors naming the parameter, and a model whose
/// activations overflow is an error naming the position, not a NaN
/// perplexity.
#[test]
fn score_refuses_bad_input_and_overflow() {
    let m = model(Preset::Tiny);
    let err = |tokens: &[u32], stride| {
        score::score(&m, tokens, &ScoreOptions { stride, top: 0 })
            .unwrap_err()
            .to_string()
    };
    assert!(err(&[], 64).contains("text: 0 token"));
    assert!(err(&[5], 64).contains("at least 2"));
    assert!(err(&[5, 6], 0).contains("stride 0"));
    assert!(err(&[5, 6], 129).contains("stride 129"));
    let bad = Gpt2Model::load(&overflowing_checkpoint("score-overflow")).unwrap();
    let e = score::score(&bad, &[5, 6, 7], &ScoreOptions { stride: 64, top: 0 }).unwrap_err();
    assert!(
        e.to_string().contains("position 1") && e.to_string().contains("non-finite"),
        "{e}"
    );
}
