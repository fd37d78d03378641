//! Chunked prefill between decode steps: a long prompt arriving while
//! others decode takes no more prompt rows a step than the step's row
//! budget leaves (`SchedulerConfig::max_step_rows`), every decoding
//! sequence gets its token in every step of that prefill, and every
//! request's tokens are those it gets alone. A lone prompt still takes
//! `max_prompt_rows` a step.

mod common;

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use common::synth_dir;
use gpt2::scheduler::{StepObserver, StepStats};
use gpt2::synth::Preset;
use gpt2::{GenerateOptions, Generation, Gpt2Model, SamplingParams, Scheduler, SchedulerConfig, Session};

/// Every step the engine ran; optionally the engine held after the first
/// step in which `n` sequences decode until the test says go, so that a
/// request submitted meanwhile is admitted at the next step.
#[derive(Debug, Default)]
struct Steps {
    log: Mutex<Vec<StepStats>>,
    gate: Mutex<Option<Held>>,
}

/// The engine's side of the gate.
#[derive(Debug)]
struct Held {
    /// Decode rows of the step after which the engine waits.
    n: usize,
    /// Told when the engine waits.
    held: Sender<()>,
    go: Receiver<()>,
}

/// The test's side of the gate.
struct Gate {
    held: Receiver<()>,
    go: Sender<()>,
}

impl Steps {
    fn gated(n: usize) -> (Arc<Steps>, Gate) {
        let (held_tx, held) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        let steps = Steps {
            gate: Mutex::new(Some(Held {
                n,
                held: held_tx,
                go: go_rx,
            })),
            ..Steps::default()
        };
        (Arc::new(steps), Gate { held, go })
    }

    fn log(&self) -> Vec<StepStats> {
        self.log.lock().unwrap().clone()
    }
}

impl StepObserver for Steps {
    fn on_step(&self, step: &StepStats) {
        self.log.lock().unwrap().push(*step);
        let mut gate = self.gate.lock().unwrap();
        if gate.as_ref().is_some_and(|g| step.decode_rows == g.n) {
            let g = gate.take().expect("a gate");
            g.held.send(()).expect("the test waits");
            // The engine reads its submissions right after this returns.
            g.go.recv().expect("the test sends go");
        }
    }
}

/// The steps after the first one in which `n` sequences decoded.
fn after_gate(log: &[StepStats], n: usize) -> &[StepStats] {
    let at = log
        .iter()
        .position(|s| s.decode_rows == n)
        .expect("the gate step");
    &log[at + 1..]
}

fn tiny() -> Arc<Gpt2Model> {
    Arc::new(Gpt2Model::load(&synth_dir(Preset::Tiny, 0)).unwrap())
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingParams::greedy(),
        seed: 0,
        ignore_eos: true,
        eos_token_id: None,
        logprobs: None,
        prompt_logprobs: None,
    }
}

fn prompt(len: usize, salt: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((salt * 7919 + j * 104_729) % 50_000) as u32)
        .collect()
}

fn alone(model: &Gpt2Model, prompt: &[u32], opts: &GenerateOptions) -> Generation {
    Session::new(model, 16)
        .unwrap()
        .generate(model, prompt, opts, |_| {})
        .unwrap()
}

#[test]
fn a_long_arrival_is_prefilled_in_chunks_between_the_streams_tokens() {
    let model = tiny();
    const STREAMS: usize = 4;
    const LONG: usize = 90;
    const STEP_ROWS: usize = 10;
    // Beside 4 decode rows, a 10-row budget leaves 6 prompt rows.
    const CHUNK: usize = STEP_ROWS - STREAMS;
    let (steps, gate) = Steps::gated(STREAMS);
    let config = SchedulerConfig {
        max_batch: 8,
        max_prompt_rows: 64,
        max_step_rows: STEP_ROWS,
        observer: Some(Arc::clone(&steps) as Arc<dyn StepObserver>),
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::new(Arc::clone(&model), config).unwrap();
    let stream_opts = greedy(40);
    let stream_prompts: Vec<Vec<u32>> = (0..STREAMS).map(|i| prompt(3 + i, i)).collect();
    let streams: Vec<_> = stream_prompts
        .iter()
        .map(|p| sched.submit(p.clone(), stream_opts.clone()).unwrap())
        .collect();
    // Submitted while the engine waits after a step of every stream decoding.
    gate.held.recv().unwrap();
    let long = prompt(LONG, 99);
    let long_opts = greedy(5);
    let arrival = sched.submit(long.clone(), long_opts.clone()).unwrap();
    gate.go.send(()).unwrap();

    let got_long = arrival.wait().unwrap();
    let got_streams: Vec<Generation> = streams.into_iter().map(|h| h.wait().unwrap()).collect();

    drop(sched);
    let log = steps.log();
    let prefill: Vec<&StepStats> = after_gate(&log, STREAMS)
        .iter()
        .filter(|s| s.rows > s.decode_rows)
        .collect();
    let prompt_rows: Vec<usize> = prefill.iter().map(|s| s.rows - s.decode_rows).collect();
    assert_eq!(
        prompt_rows.iter().sum::<usize>(),
        LONG,
        "the whole prompt, once: {prompt_rows:?}"
    );
    assert!(
        prompt_rows.iter().all(|&p| p <= CHUNK),
        "at most {CHUNK} prompt rows a step beside {STREAMS} decode rows: {prompt_rows:?}"
    );
    assert_eq!(prefill.len(), LONG.div_ceil(CHUNK), "{prompt_rows:?}");
    for s in &prefill {
        assert_eq!(
            s.decode_rows, STREAMS,
            "every stream gets its token in every prefill step: {s:?}"
        );
    }

    assert_eq!(
        got_long.tokens,
        alone(&model, &long, &long_opts).tokens,
        "the arrival"
    );
    for (i, (p, got)) in stream_prompts.iter().zip(&got_streams).enumerate() {
        assert_eq!(got.tokens, alone(&model, p, &stream_opts).tokens, "stream {i}");
    }
}

/// However many sequences decode, the prompt rows are never fewer than
/// half the decode rows, so a prefill advances whatever the budget.
#[test]
fn a_prefill_beside_many_decoders_still_gets_half_as_many_rows() {
    let model = tiny();
    const STREAMS: usize = 5;
    let (steps, gate) = Steps::gated(STREAMS);
    let config = SchedulerConfig {
        max_batch: 8,
        max_prompt_rows: 64,
        // Fewer than the decode rows: the prompt gets half as many, 3.
        max_step_rows: 4,
        observer: Some(Arc::clone(&steps) as Arc<dyn StepObserver>),
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::new(Arc::clone(&model), config).unwrap();
    let streams: Vec<_> = (0..STREAMS)
        .map(|i| sched.submit(prompt(2, i), greedy(40)).unwrap())
        .collect();
    gate.held.recv().unwrap();
    let long = prompt(51, 7);
    let arrival = sched.submit(long.clone(), greedy(2)).unwrap();
    gate.go.send(()).unwrap();
    let got = arrival.wait().unwrap();
    for s in streams {
        s.wait().unwrap();
    }
    drop(sched);
    let log = steps.log();
    let prompt_rows: Vec<usize> = after_gate(&log, STREAMS)
        .iter()
        .filter(|s| s.rows > s.decode_rows)
        .map(|s| s.rows - s.decode_rows)
        .collect();
    assert_eq!(prompt_rows, [3; 17], "51 rows, 3 a step");
    assert_eq!(got.tokens, alone(&model, &long, &greedy(2)).tokens);
}

/// With nothing decoding, a prompt takes `max_prompt_rows` a step, however
/// small the step budget: a lone prompt's first token is not held back.
#[test]
fn a_lone_prompt_takes_max_prompt_rows_a_step() {
    let model = tiny();
    let steps = Arc::new(Steps::default());
    let config = SchedulerConfig {
        max_prompt_rows: 64,
        max_step_rows: 4,
        observer: Some(Arc::clone(&steps) as Arc<dyn StepObserver>),
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::new(Arc::clone(&model), config).unwrap();
    let long = prompt(90, 3);
    let got = sched.generate(long.clone(), greedy(3)).unwrap();
    drop(sched);
    let rows: Vec<(usize, usize)> = steps.log().iter().map(|s| (s.rows, s.decode_rows)).collect();
    assert_eq!(
        rows,
        [(64, 0), (26, 0), (1, 1), (1, 1)],
        "two prefill steps, then decode"
    );
    assert_eq!(got.tokens, alone(&model, &long, &greedy(3)).tokens);
}

#[test]
fn a_zero_step_budget_is_refused_by_name() {
    let config = SchedulerConfig {
        max_step_rows: 0,
        ..SchedulerConfig::default()
    };
    let e = Scheduler::new(tiny(), config).err().expect("refused").to_string();
    assert!(e.contains("max_step_rows (0)"), "{e}");
}
