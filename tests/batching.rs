//! Continuous batching: batched requests reproduce single requests exactly,
//! failures and cancellations stay contained, the same seed gives the same
//! text in every mode; in every weight dtype.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::synth_dir;
use gpt2::scheduler::Event;
use gpt2::synth::Preset;
use gpt2::{
    Dtype, Error, GenerateOptions, Generation, Gpt2Model, SamplingParams, Scheduler, SchedulerConfig, Session,
};

fn tiny() -> Arc<Gpt2Model> {
    tiny_in(Dtype::F32)
}

fn tiny_in(dtype: Dtype) -> Arc<Gpt2Model> {
    Arc::new(Gpt2Model::load_with(&synth_dir(Preset::Tiny, 0), dtype).unwrap())
}

/// Prompts of mixed lengths (1 to 100 tokens), deterministic.
fn prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let len = [1, 5, 17, 40, 100, 3, 64, 9][i % 8];
            (0..len)
                .map(|j| ((i * 7919 + j * 104_729) % 50_000) as u32)
                .collect()
        })
        .collect()
}

fn alone(model: &Gpt2Model, prompt: &[u32], opts: &GenerateOptions) -> Generation {
    Session::new(model, 16)
        .expect("session")
        .generate(model, prompt, opts, |_| {})
        .unwrap()
}

fn sampled(seed: u64, n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: Some(40),
            top_p: Some(0.95),
            repetition_penalty: None,
            ..SamplingParams::greedy()
        },
        seed,
        ignore_eos: true,
        eos_token_id: None,
        logprobs: None,
        prompt_logprobs: None,
    }
}

#[test]
fn batched_greedy_equals_each_request_run_alone() {
    for dtype in Dtype::ALL {
        batched_greedy_equals_alone(dtype);
    }
}

fn batched_greedy_equals_alone(dtype: Dtype) {
    let model = tiny_in(dtype);
    // Small budgets force chunked prefill interleaved with decode steps.
    let config = SchedulerConfig {
        max_batch: 5,
        max_prompt_rows: 24,
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::new(Arc::clone(&model), config).unwrap();
    let prompts = prompts(12);
    // Staggered arrivals: submit in three waves while earlier ones decode.
    let mut handles = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let opts = GenerateOptions::greedy(6 + i % 5 * 4);
        handles.push((i, opts.clone(), sched.submit(p.clone(), opts).unwrap()));
        if i % 4 == 3 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for (i, opts, h) in handles {
        let mut streamed = Vec::new();
        let got = h.stream(|t| streamed.push(t)).unwrap();
        let want = alone(&model, &prompts[i], &opts);
        assert_eq!(
            got.tokens,
            want.tokens,
            "{dtype}: request {i} (prompt of {} tokens)",
            prompts[i].len()
        );
        assert_eq!(streamed, got.tokens, "request {i}: the stream is the result");
        assert_eq!(got.stop, want.stop);
        assert_eq!(got.timings.token_times.len(), opts.max_new_tokens);
    }
}

#[test]
fn same_seed_same_text_in_every_mode_and_at_any_concurrency() {
    for dtype in Dtype::ALL {
        same_seed_same_text(dtype);
    }
}

fn same_seed_same_text(dtype: Dtype) {
    let model = tiny_in(dtype);
    let prompts = prompts(6);
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| alone(&model, p, &sampled(i as u64, 12)).tokens)
        .collect();
    // Threads mode: one session per client thread, on pools of 1 and 2 threads.
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let got: Vec<Vec<u32>> = std::thread::scope(|s| {
            let hs: Vec<_> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let (model, pool) = (&model, &pool);
                    s.spawn(move || pool.install(|| alone(model, p, &sampled(i as u64, 12)).tokens))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got, want, "{dtype}: threads mode, pool of {threads}");
    }
    // Batched mode at several batch sizes.
    for max_batch in [1, 2, 6] {
        let config = SchedulerConfig {
            max_batch,
            ..SchedulerConfig::default()
        };
        let sched = Scheduler::new(Arc::clone(&model), config).unwrap();
        let hs: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| sched.submit(p.clone(), sampled(i as u64, 12)).unwrap())
            .collect();
        let got: Vec<Vec<u32>> = hs.into_iter().map(|h| h.wait().unwrap().tokens).collect();
        assert_eq!(got, want, "{dtype}: batched mode, max_batch {max_batch}");
    }
}

#[test]
fn a_bad_request_fails_alone() {
    let model = tiny();
    let sched = Scheduler::new(Arc::clone(&model), SchedulerConfig::default()).unwrap();
    let n_positions = model.config.n_positions;
    let good = sched.submit(vec![1, 2, 3], GenerateOptions::greedy(8)).unwrap();
    // Rejected at submission, naming the problem; nothing is queued.
    let too_long = sched.submit(vec![1; n_positions + 1], GenerateOptions::greedy(4));
    assert!(
        matches!(too_long, Err(Error::PromptTooLong { .. })),
        "{too_long:?}"
    );
    let bad_id = sched.submit(vec![1, 60_000], GenerateOptions::greedy(4));
    assert!(
        matches!(bad_id, Err(Error::TokenId { id: 60_000, .. })),
        "{bad_id:?}"
    );
    let mut bad_sampling = sampled(0, 4);
    bad_sampling.sampling.top_p = Some(1.5);
    assert!(sched.submit(vec![1], bad_sampling).is_err());
    assert!(sched.submit(vec![], GenerateOptions::greedy(4)).is_err());
    // A prompt that fills the window stops normally at the context limit.
    let full = sched
        .submit(vec![7; n_positions], GenerateOptions::greedy(4))
        .unwrap();
    let g = full.wait().unwrap();
    assert_eq!((g.tokens.len(), g.stop), (1, gpt2::StopReason::ContextFull));
    assert_eq!(
        good.wait().unwrap().tokens,
        alone(&model, &[1, 2, 3], &GenerateOptions::greedy(8)).tokens
    );
}

#[test]
fn a_panic_in_a_batched_step_fails_only_its_request() {
    let model = tiny();
    const FAULT: u32 = 4242;
    let config = SchedulerConfig {
        fault_token: Some(FAULT),
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::new(Arc::clone(&model), config).unwrap();
    let prompts = prompts(5);
    let good: Vec<_> = prompts
        .iter()
        .map(|p| sched.submit(p.clone(), GenerateOptions::greedy(10)).unwrap())
        .collect();
    let bad = sched
        .submit(vec![5, FAULT, 6], GenerateOptions::greedy(10))
        .unwrap();
    let err = bad.wait().unwrap_err();
    assert!(err.to_string().contains("injected fault"), "{err}");
    for (p, h) in prompts.iter().zip(good) {
        assert_eq!(
            h.wait().unwrap().tokens,
            alone(&model, p, &GenerateOptions::greedy(10)).tokens
        );
    }
    // The engine is still serving; `generate`, which sends no token events,
    // gives the tokens of a lone run too.
    assert_eq!(
        sched
            .generate(vec![1, 2], GenerateOptions::greedy(3))
            .unwrap()
            .tokens,
        alone(&model, &[1, 2], &GenerateOptions::greedy(3)).tokens
    );
}

#[test]
fn cancelling_frees_the_sequence_and_others_finish() {
    let model = tiny();
    let config = SchedulerConfig {
        max_batch: 1,
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::new(Arc::clone(&model), config).unwrap();
    // The long request holds the only batch slot until it is cancelled.
    let long = sched.submit(vec![1, 2, 3], GenerateOptions::greedy(100)).unwrap();
    let next = sched.submit(vec![4, 5], GenerateOptions::greedy(5)).unwrap();
    match long.recv() {
        Some(Event::Token(_)) => {}
        other => panic!("expected a token, got {other:?}"),
    }
    long.cancel();
    let g = next.wait().unwrap();
    // The cancelled stream ends early, without a result.
    let mut more = 0;
    while let Some(event) = long.recv() {
        assert!(
            matches!(event, Event::Token(_)),
            "a cancelled request sent {event:?}"
        );
        more += 1;
    }
    assert!(more < 99, "the cancelled request ran to the end");
    assert_eq!(
        g.tokens,
        alone(&model, &[4, 5], &GenerateOptions::greedy(5)).tokens
    );
    // A dropped handle is a cancellation too.
    drop(sched.submit(vec![9], GenerateOptions::greedy(100)).unwrap());
    assert_eq!(
        sched
            .generate(vec![8], GenerateOptions::greedy(2))
            .unwrap()
            .tokens
            .len(),
        2
    );
}

/// Finite weights whose logits overflow: the request ends with a clear error
/// in both modes instead of sampling garbage.
#[test]
fn non_finite_logits_end_the_request_with_an_error() {
    let src = synth_dir(Preset::Tiny, 0);
    let dir = common::scratch_dir("overflowing-logits");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    // Final layer norm gain and bias 3e38: its outputs overflow to infinity.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    for name in ["transformer.ln_f.weight", "transformer.ln_f.bias"] {
        let offsets = &header[name]["data_offsets"];
        let (start, end) = (
            offsets[0].as_u64().unwrap() as usize,
            offsets[1].as_u64().unwrap() as usize,
        );
        for f in bytes[8 + header_len + start..8 + header_len + end].chunks_exact_mut(4) {
            f.copy_from_slice(&3e38f32.to_le_bytes());
        }
    }
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    let model = Arc::new(Gpt2Model::load(&dir).unwrap());
    let err = Session::new(&model, 8).expect("session").generate(
        &model,
        &[1, 2, 3],
        &GenerateOptions::greedy(4),
        |_| {},
    );
    assert!(matches!(err, Err(Error::NonFiniteLogits { .. })), "{err:?}");
    let sched = Scheduler::new(Arc::clone(&model), SchedulerConfig::default()).unwrap();
    let err = sched.generate(vec![1, 2, 3], GenerateOptions::greedy(4));
    assert!(matches!(err, Err(Error::NonFiniteLogits { .. })), "{err:?}");
}

#[test]
fn a_decode_step_rewinds_so_every_run_decodes_the_same_position() {
    let model = tiny();
    let mut step = gpt2::timed::DecodeStep::new(&model, 3, 10).unwrap();
    assert_eq!(step.position(), 10);
    step.run(&model).unwrap();
    let first = step.scratch.logits().to_vec();
    assert_eq!(first.len(), 3 * model.config.vocab_size);
    step.run(&model).unwrap();
    assert_eq!(
        step.scratch.logits(),
        &first[..],
        "the second run saw the first one's keys"
    );
    // Past the context window the position is capped: the step still runs.
    let mut long = gpt2::timed::DecodeStep::new(&model, 1, 10_000).unwrap();
    assert_eq!(long.position(), model.config.n_positions - 1);
    long.run(&model).unwrap();
}
