//! Prefix reuse and `n` choices give what a cold prefill gives: a request
//! that starts from a cached prefix, and each choice of one prompt, gets
//! the tokens and logprobs it gets alone, in every weight dtype and on
//! every kernel set this CPU runs.
//!
//! The kernel set is chosen once per process (`GPT2_KERNELS`, else the
//! best), so [`every_kernel_set`] runs this binary's cases again in a child
//! process per other set, with `GPT2_KERNELS` naming it (as
//! `kernels/run_avx512_check.sh` runs whole test binaries per set). Run
//! with `GPT2_KERNELS` set, the cases run on that set only.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::synth_dir;
use gpt2::synth::Preset;
use gpt2::{
    Dtype, Fit, GenerateOptions, Generation, Gpt2Model, Request, SamplingParams, Scheduler, SchedulerConfig,
    Session,
};
use gpt2_kernels::{dispatch, KernelSpec, Kernels};

/// The cases [`every_kernel_set`] runs per set.
const CASES: [&str; 4] = [
    "prefix_reuse_equals_cold_prefill",
    "choices_equal_each_choice_alone",
    "a_cancelled_choice_disturbs_no_other",
    "prompt_only_choices_share_the_scores",
];

fn tiny_in(dtype: Dtype) -> Arc<Gpt2Model> {
    Arc::new(Gpt2Model::load_with(&synth_dir(Preset::Tiny, 0), dtype).unwrap())
}

/// `n` deterministic token ids, different for each `tag`.
fn ids(n: usize, tag: usize) -> Vec<u32> {
    (0..n)
        .map(|j| ((tag * 7919 + j * 104_729 + 13) % 50_000) as u32)
        .collect()
}

/// `max_new_tokens` tokens with their logprobs: greedy, or sampled from `seed`.
fn opts(greedy: bool, seed: u64, max_new_tokens: usize) -> GenerateOptions {
    let sampling = if greedy {
        SamplingParams::greedy()
    } else {
        SamplingParams {
            temperature: 0.9,
            top_k: Some(40),
            top_p: Some(0.95),
            ..SamplingParams::greedy()
        }
    };
    GenerateOptions {
        sampling,
        seed,
        logprobs: Some(2),
        ..GenerateOptions::greedy(max_new_tokens)
    }
}

/// A request run alone through a `Session`.
fn alone(model: &Gpt2Model, request: Request) -> Generation {
    Session::new(model, 16)
        .unwrap()
        .run(model, request, |_| {})
        .unwrap()
}

/// Tokens, stop and every logprob equal (timings aside).
#[track_caller]
fn assert_same(got: &Generation, want: &Generation, what: &str) {
    assert_eq!(
        (&got.tokens, got.stop, &got.logprobs, &got.prompt_logprobs),
        (&want.tokens, want.stop, &want.logprobs, &want.prompt_logprobs),
        "{what}"
    );
}

fn scheduler(model: &Arc<Gpt2Model>, prefix_cache_bytes: usize) -> Scheduler {
    let config = SchedulerConfig {
        // Few prompt rows a step: prefills span several steps.
        max_prompt_rows: 8,
        prefix_cache_bytes,
        ..SchedulerConfig::default()
    };
    Scheduler::new(Arc::clone(model), config).unwrap()
}

/// A: prompt P + suffix 1, then B: P + suffix 2 (reuses P), then C: A's
/// prompt again (reuses all of it but its last token, whose row gives the
/// first logits). Each equals the same request on a scheduler without a
/// prefix cache, and the stats count what was reused.
#[test]
fn prefix_reuse_equals_cold_prefill() {
    eprintln!("kernels: {}", gpt2_kernels::active());
    let p = ids(40, 1);
    let a: Vec<u32> = p.iter().chain(&ids(6, 2)).copied().collect();
    let b: Vec<u32> = p.iter().chain(&ids(5, 3)).copied().collect();
    assert_ne!(
        a[p.len()],
        b[p.len()],
        "the suffixes differ from their first token"
    );
    for dtype in Dtype::ALL {
        let model = tiny_in(dtype);
        for greedy in [true, false] {
            let what = |name: &str| format!("{dtype}, {}: {name}", if greedy { "greedy" } else { "seeded" });
            let run = |s: &Scheduler, prompt: &[u32]| {
                s.submit(prompt.to_vec(), opts(greedy, 7, 12))
                    .unwrap()
                    .wait()
                    .unwrap()
            };
            let cold = scheduler(&model, 0);
            let warm = scheduler(&model, 64 << 20);
            let reused = |s: &Scheduler| (s.stats().prefix.hits, s.stats().prefix.tokens_reused);

            assert_same(&run(&warm, &a), &run(&cold, &a), &what("A"));
            assert_eq!(reused(&warm), (0, 0), "{}", what("A has nothing to reuse"));
            assert_same(&run(&warm, &b), &run(&cold, &b), &what("B, after A"));
            assert_eq!(reused(&warm), (1, p.len() as u64), "{}", what("B reuses P"));
            assert_same(&run(&warm, &a), &run(&cold, &a), &what("C = A again"));
            let c_reused = a.len() as u64 - 1;
            assert_eq!(
                reused(&warm),
                (2, p.len() as u64 + c_reused),
                "{}",
                what("C reuses len - 1")
            );
            assert_eq!(reused(&cold), (0, 0), "{}", what("no cache, no reuse"));
        }
    }
}

/// `submit_n(req, 4)`: choice i gets the tokens `req.choice(i)` gets alone,
/// and the seeds make the choices differ.
#[test]
fn choices_equal_each_choice_alone() {
    eprintln!("kernels: {}", gpt2_kernels::active());
    for dtype in Dtype::ALL {
        let model = tiny_in(dtype);
        let sched = scheduler(&model, 0);
        let request = Request::prepare(&model.config, ids(30, 4), opts(false, 42, 10), Fit::Prompt).unwrap();
        let handles = sched.submit_n(request.clone(), 4).unwrap();
        let got: Vec<Generation> = handles.into_iter().map(|h| h.wait().unwrap()).collect();
        for (i, g) in got.iter().enumerate() {
            assert_same(
                g,
                &alone(&model, request.choice(i)),
                &format!("{dtype}: choice {i} of 4"),
            );
        }
        assert!(
            got.iter().any(|g| g.tokens != got[0].tokens),
            "{dtype}: four seeded choices all alike"
        );
    }
}

/// A choice cancelled while the shared prompt is still being computed (120
/// tokens at 8 rows a step) ends without a result; the other choices get
/// what they get alone. Choice 0 computes the prompt for the others, so it
/// is cancelled too, as well as a fork.
#[test]
fn a_cancelled_choice_disturbs_no_other() {
    eprintln!("kernels: {}", gpt2_kernels::active());
    for dtype in Dtype::ALL {
        let model = tiny_in(dtype);
        let sched = scheduler(&model, 0);
        let request = Request::prepare(&model.config, ids(120, 5), opts(false, 3, 6), Fit::Prompt).unwrap();
        for cancelled in [0, 2] {
            let handles = sched.submit_n(request.clone(), 4).unwrap();
            handles[cancelled].cancel();
            for (i, h) in handles.into_iter().enumerate() {
                let what = format!("{dtype}: choice {i}, choice {cancelled} cancelled");
                if i == cancelled {
                    assert!(h.wait().is_err(), "{what}: no result");
                } else {
                    assert_same(&h.wait().unwrap(), &alone(&model, request.choice(i)), &what);
                }
            }
        }
        assert_eq!(sched.stats().active, 0);
    }
}

/// `n` choices of a request that only scores its prompt all end with the
/// prompt's scores, those a `Session` gives, and no token.
#[test]
fn prompt_only_choices_share_the_scores() {
    eprintln!("kernels: {}", gpt2_kernels::active());
    for dtype in Dtype::ALL {
        let model = tiny_in(dtype);
        let sched = scheduler(&model, 0);
        let scored = GenerateOptions {
            prompt_logprobs: Some(3),
            ..GenerateOptions::greedy(0)
        };
        let request = Request::prepare(&model.config, ids(30, 6), scored, Fit::Prompt).unwrap();
        let want = alone(&model, request.clone());
        assert_eq!(want.prompt_logprobs.len(), 29);
        for (i, h) in sched.submit_n(request, 3).unwrap().into_iter().enumerate() {
            let got = h.wait().unwrap();
            assert!(got.tokens.is_empty(), "{dtype}: choice {i} generated");
            assert_same(&got, &want, &format!("{dtype}: prompt-only choice {i}"));
        }
    }
}

/// The cases above on every other kernel set this CPU runs, each in a
/// child process with `GPT2_KERNELS` naming the set (with and without
/// VNNI where the set has it). Skipped when `GPT2_KERNELS` is set: then
/// the caller (or this test, in a child) chose the set.
#[test]
fn every_kernel_set() {
    if std::env::var_os(dispatch::ENV).is_some() {
        return;
    }
    let here = gpt2_kernels::active();
    let mut specs: Vec<KernelSpec> = Vec::new();
    for k in Kernels::supported() {
        specs.push(k.set().into());
        if k.vnni() {
            specs.push(KernelSpec {
                set: k.set(),
                vnni: Some(false),
            });
        }
    }
    let exe = std::env::current_exe().unwrap();
    for spec in specs {
        if Kernels::with_spec(spec).ok() == Some(here) {
            continue; // the cases ran in this process
        }
        let out = Command::new(&exe)
            .args(["--exact", "--nocapture"])
            .args(CASES)
            .env(dispatch::ENV, spec.to_string())
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "{}={spec}:\n{stdout}\n{stderr}",
            dispatch::ENV
        );
        let passed = format!("test result: ok. {} passed", CASES.len());
        assert!(
            stdout.contains(&passed),
            "{}={spec}: not every case ran:\n{stdout}",
            dispatch::ENV
        );
        eprintln!("{}={spec}: {passed}", dispatch::ENV);
    }
}
