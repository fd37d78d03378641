//! Continuous batching: every in-flight request shares each forward step.
//!
//! A [`Scheduler`] owns one engine thread. Requests are submitted from any
//! thread and come back as a [`RequestHandle`] that streams tokens and ends
//! with the [`Generation`] (or the request's own error). Each engine step:
//!
//! 1. takes new requests (FIFO) while fewer than `max_batch` are active,
//!    giving each a KV cache from a pool that is reused while the engine is
//!    busy and released to the OS whenever it goes idle;
//! 2. builds one batch: one decode row for every sequence that has
//!    finished its prompt, then prompt rows of newly admitted sequences, at
//!    most `max_prompt_rows` of them, and while any sequence decodes no more
//!    than the step's row budget leaves (`max_step_rows`), so a long prompt
//!    is prefilled in chunks between the others' tokens instead of stalling
//!    them;
//! 3. runs one forward pass, which reads every weight once for the whole
//!    batch (this is the point: N requests no longer cost N weight streams);
//! 4. samples each sequence's next token with its own seeded sampler,
//!    streams it, and retires finished, failed or cancelled sequences.
//!
//! Sampling, timing and the stop rule are `generate::Decode`'s, the step a
//! [`Session`](crate::Session) takes for a request alone: with the forward
//! pass giving each row the logits it would get alone, a request's tokens
//! and stop are those it gets alone, and its timings are counted alike.
//!
//! Choices (`n`): [`Scheduler::submit_n`] runs `n` samples of one prompt as
//! `n` sequences that share its prefill: the first computes the prompt, and
//! when its last prompt row is done the others copy its cache
//! ([`KvCache::copy_prefix_from`]) and sample their first token from the
//! same logits, each with its own seed ([`Request::choice`]).
//!
//! Prefix reuse: with `prefix_cache_bytes`, finished sequences' caches are
//! kept (`crate::prefix`) and a new request starts from the longest cached
//! prefix of its prompt, prefilling only the rest.
//!
//! Failure isolation: a request is checked before it is queued
//! ([`Request::prepare`]: a bad one fails alone, and nothing is queued); a
//! sampling error (e.g. non-finite logits) ends only its
//! sequence; a panic inside a batched step is caught, and the step's
//! sequences are re-run one by one so that only the culprit fails.

use std::collections::VecDeque;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::Invalid;
use crate::error::{Error, Result};
use crate::generate::{Decode, GenerateOptions, Generation, StopReason};
use crate::logprobs::TokenLogprob;
use crate::model::{keep_pool_awake, Gpt2Model, KvCache, Row, Scratch};
use crate::prefix::{PrefixCache, PrefixStats};
use crate::request::{Fit, Request};

/// Limits of the engine loop.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences decoded together; later requests wait in FIFO order.
    pub max_batch: usize,
    /// Most prompt rows in one step (on top of the decode rows).
    pub max_prompt_rows: usize,
    /// While any sequence decodes: most rows in one step, decode rows first
    /// and prompt rows filling the rest (vLLM's per-step token budget), but
    /// never fewer prompt rows than half the decode rows, so a prefill
    /// always advances, nor more than `max_prompt_rows`. With nothing
    /// decoding, a step takes `max_prompt_rows` prompt rows: a lone
    /// prompt's time to first token is not held back.
    ///
    /// Why: a step's time is the gap between every decoding sequence's
    /// tokens, and once a step is compute-bound its time grows about
    /// linearly with its rows. GPT-2 124M in f32 on 2 Zen 2 cores, 15 decode
    /// rows plus `p` rows of a prompt at position 450 cost (CPU time) 1.33x
    /// the 15 rows alone at p = 8, 1.55x at 12, 1.78x at 17, 2.1x at 24 and
    /// 6.0x at 128 (the old policy's chunk). The default, 28, gives 15
    /// decoding streams 13 prompt rows a step, about 1.6x their decode step:
    /// within issue 34's bound (the streams' inter-token p99 at most 2x
    /// their p50 without the arrival) with room for the noise of a p99.
    /// Set it to `max_batch + max_prompt_rows` or more for the old policy
    /// (prompt rows up to `max_prompt_rows` whatever decodes).
    pub max_step_rows: usize,
    /// The rayon pool the forward passes run on; `None` uses the global
    /// pool (one thread per core).
    pub pool: Option<Arc<rayon::ThreadPool>>,
    /// Testing only: a step whose batch carries this token id panics, as if
    /// the engine had a bug, to exercise failure isolation.
    #[doc(hidden)]
    pub fault_token: Option<u32>,
    /// Told about every step, on the engine thread (e.g. a server's metrics).
    pub observer: Option<Arc<dyn StepObserver>>,
    /// Resident bytes of finished sequences' KV caches kept for prefix reuse
    /// (least recently used out); 0 keeps none.
    pub prefix_cache_bytes: usize,
}

/// Sees each engine step as it ends. Runs on the engine thread between
/// steps, so it must be quick: everyone's next token waits for it.
pub trait StepObserver: Send + Sync + fmt::Debug {
    fn on_step(&self, step: &StepStats);
}

/// One engine step, as an observer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepStats {
    /// Rows in the forward pass: `decode_rows` plus prompt rows.
    pub rows: usize,
    /// One per sequence past its prompt.
    pub decode_rows: usize,
    /// Forward pass and sampling.
    pub elapsed: Duration,
}

/// A snapshot of the engine's load (see [`Scheduler::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SchedulerStats {
    /// Requests submitted and not yet admitted to the batch.
    pub queued: usize,
    /// Sequences in the batch (prefilling or decoding).
    pub active: usize,
    /// Forward steps run so far.
    pub steps: u64,
    /// KV caches kept for reuse (released whenever the engine goes idle).
    pub pooled_caches: usize,
    /// The prefix cache's counters and size.
    pub prefix: PrefixStats,
}

/// Written by the engine thread, read by anyone.
#[derive(Debug, Default)]
struct Counters {
    /// Submitted but not yet taken off the channel by the engine.
    submitted: AtomicUsize,
    /// The engine's own queue and batch sizes.
    queued: AtomicUsize,
    active: AtomicUsize,
    steps: AtomicU64,
    pooled: AtomicUsize,
    prefix_hits: AtomicU64,
    prefix_tokens: AtomicU64,
    prefix_bytes: AtomicUsize,
    prefix_entries: AtomicUsize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch: 32,
            max_prompt_rows: 128,
            max_step_rows: 28,
            pool: None,
            fault_token: None,
            observer: None,
            prefix_cache_bytes: 0,
        }
    }
}

/// What a request's handle receives.
#[derive(Debug)]
pub enum Event {
    /// The prompt's scores, once its rows are computed (with
    /// [`GenerateOptions::prompt_logprobs`]; before any token).
    Prompt(Vec<TokenLogprob>),
    /// The log-probability of the token that comes next (with
    /// [`GenerateOptions::logprobs`]; sent just before its `Token`).
    Logprob(TokenLogprob),
    /// The next generated token.
    Token(u32),
    /// The end: the whole generation, or why this request failed.
    Done(Result<Generation>),
}

/// The submitter's side of one request.
#[derive(Debug)]
pub struct RequestHandle {
    events: Receiver<Event>,
    cancelled: Arc<AtomicBool>,
}

impl RequestHandle {
    /// The next event; `None` once the request is over and drained.
    pub fn recv(&self) -> Option<Event> {
        self.events.recv().ok()
    }

    /// Streams tokens to `on_token` and returns the result.
    pub fn stream(self, mut on_token: impl FnMut(u32)) -> Result<Generation> {
        while let Some(event) = self.recv() {
            match event {
                Event::Token(t) => on_token(t),
                Event::Prompt(_) | Event::Logprob(_) => {}
                Event::Done(result) => return result,
            }
        }
        Err(Error::Engine(
            "the engine stopped before the request finished".into(),
        ))
    }

    /// Waits for the result, ignoring the token stream.
    pub fn wait(self) -> Result<Generation> {
        self.stream(|_| {})
    }

    /// Asks the engine to drop this request; its sequence and cache are
    /// freed at the next step. Dropping the handle does the same.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

/// A request on its way to the engine: one prompt's choices, each with
/// its own request (seed) and handle; the first computes the prompt.
struct Submission {
    choices: Vec<(Request, Reply)>,
    submitted: Instant,
}

impl Submission {
    fn cancelled(&self) -> bool {
        self.choices.iter().all(|(_, r)| r.cancelled())
    }
}

/// The engine's side of a request's handle.
struct Reply {
    events: Sender<Event>,
    /// Whether every token is sent as it comes, or only the result at the end.
    stream: bool,
    cancelled: Arc<AtomicBool>,
}

impl Reply {
    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}

/// Runs submitted requests in shared batched forward steps on its own thread.
pub struct Scheduler {
    submit: Option<Sender<Submission>>,
    max_batch: usize,
    engine: Option<JoinHandle<()>>,
    model: Arc<Gpt2Model>,
    counters: Arc<Counters>,
}

impl Scheduler {
    pub fn new(model: Arc<Gpt2Model>, config: SchedulerConfig) -> Result<Self> {
        if config.max_batch == 0 || config.max_prompt_rows == 0 || config.max_step_rows == 0 {
            return Err(Error::InvalidArgument(format!(
                "max_batch ({}), max_prompt_rows ({}) and max_step_rows ({}) must be at least 1",
                config.max_batch, config.max_prompt_rows, config.max_step_rows
            )));
        }
        let scratch = model.new_scratch(config.max_batch + config.max_prompt_rows)?;
        let max_batch = config.max_batch;
        let (tx, rx) = mpsc::channel();
        let engine_model = Arc::clone(&model);
        let counters = Arc::new(Counters::default());
        let engine_counters = Arc::clone(&counters);
        let engine = std::thread::Builder::new()
            .name("gpt2-engine".into())
            .spawn(move || Engine::new(engine_model, config, scratch, engine_counters).run(rx))
            .map_err(|e| Error::Engine(format!("cannot start the engine thread: {e}")))?;
        Ok(Scheduler {
            submit: Some(tx),
            max_batch,
            engine: Some(engine),
            model,
            counters,
        })
    }

    /// The model every request runs on.
    pub fn model(&self) -> &Arc<Gpt2Model> {
        &self.model
    }

    /// How loaded the engine is now. `active` and `queued` are updated
    /// between steps, so a request counts as queued from its submission
    /// until it is admitted, and as active until it is retired.
    pub fn stats(&self) -> SchedulerStats {
        let c = &self.counters;
        SchedulerStats {
            queued: c.submitted.load(Ordering::Relaxed) + c.queued.load(Ordering::Relaxed),
            active: c.active.load(Ordering::Relaxed),
            steps: c.steps.load(Ordering::Relaxed),
            pooled_caches: c.pooled.load(Ordering::Relaxed),
            prefix: PrefixStats {
                hits: c.prefix_hits.load(Ordering::Relaxed),
                tokens_reused: c.prefix_tokens.load(Ordering::Relaxed),
                bytes: c.prefix_bytes.load(Ordering::Relaxed),
                entries: c.prefix_entries.load(Ordering::Relaxed),
            },
        }
    }

    /// The most choices one [`submit_n`](Scheduler::submit_n) may ask for:
    /// they run at once, so the batch must hold them all.
    pub fn max_choices(&self) -> usize {
        self.max_batch
    }

    /// Queues `n` samples of one checked request (OpenAI's `n`): choice `i`
    /// runs [`request.choice(i)`](Request::choice), so it gets the tokens
    /// that request gets alone, and the prompt is computed once for all.
    /// `n` must be in `1..=`[`max_choices`](Scheduler::max_choices)
    /// ([`Invalid::Choices`]); the choices are admitted together or not at all.
    pub fn submit_n(&self, request: Request, n: usize) -> Result<Vec<RequestHandle>> {
        let choices = self.choices(&request, n)?;
        self.enqueue_all(choices, Instant::now(), true)
    }

    /// Queues a request. A request that can never run (empty prompt, prompt
    /// past the context window, unknown token id, bad sampling parameters:
    /// [`Request::prepare`] with [`Fit::Prompt`]) is an error here, and
    /// nothing is queued.
    pub fn submit(&self, prompt: Vec<u32>, opts: GenerateOptions) -> Result<RequestHandle> {
        let submitted = Instant::now();
        let request = Request::prepare(&self.model.config, prompt, opts, Fit::Prompt)?;
        self.enqueue(request, submitted, true)
    }

    /// Queues a request already checked.
    pub fn submit_request(&self, request: Request) -> Result<RequestHandle> {
        self.enqueue(request, Instant::now(), true)
    }

    /// Submits and waits: the batched twin of [`crate::Session::generate`].
    /// Its tokens are not sent one by one, since nobody reads them before
    /// the end: each send wakes the waiting thread, which cost the engine
    /// 20-40 µs per sequence per step here.
    pub fn generate(&self, prompt: Vec<u32>, opts: GenerateOptions) -> Result<Generation> {
        let submitted = Instant::now();
        let request = Request::prepare(&self.model.config, prompt, opts, Fit::Prompt)?;
        self.enqueue(request, submitted, false)?.wait()
    }

    /// Runs `n` choices of a checked request and waits for all of them, in
    /// choice order: the batched twin of `n` calls of
    /// [`Session::run`](crate::Session::run). As with
    /// [`generate`](Scheduler::generate), nothing is sent before the end.
    pub fn generate_n(&self, request: Request, n: usize) -> Result<Vec<Generation>> {
        let choices = self.choices(&request, n)?;
        self.enqueue_all(choices, Instant::now(), false)?
            .into_iter()
            .map(RequestHandle::wait)
            .collect()
    }

    /// The `n` choices of `request`, if the batch can hold them all.
    fn choices(&self, request: &Request, n: usize) -> Result<Vec<Request>> {
        if n == 0 || n > self.max_batch {
            return Err(Invalid::Choices {
                n,
                max: self.max_batch,
            }
            .into());
        }
        Ok((0..n).map(|i| request.choice(i)).collect())
    }

    fn enqueue(&self, request: Request, submitted: Instant, stream: bool) -> Result<RequestHandle> {
        let mut handles = self.enqueue_all(vec![request], submitted, stream)?;
        Ok(handles.remove(0))
    }

    fn enqueue_all(
        &self,
        requests: Vec<Request>,
        submitted: Instant,
        stream: bool,
    ) -> Result<Vec<RequestHandle>> {
        let mut handles = Vec::with_capacity(requests.len());
        let choices = requests
            .into_iter()
            .map(|request| {
                let (events, rx) = mpsc::channel();
                let cancelled = Arc::new(AtomicBool::new(false));
                handles.push(RequestHandle {
                    events: rx,
                    cancelled: Arc::clone(&cancelled),
                });
                let reply = Reply {
                    events,
                    stream,
                    cancelled,
                };
                (request, reply)
            })
            .collect();
        let submission = Submission { choices, submitted };
        // Counted before the send, so the engine never takes it off first.
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        let sent = self.submit.as_ref().and_then(|tx| tx.send(submission).ok());
        if sent.is_none() {
            self.counters.submitted.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::Engine("the engine thread has stopped".into()));
        }
        Ok(handles)
    }
}

impl Drop for Scheduler {
    /// Finishes the requests already submitted, then stops the engine thread.
    fn drop(&mut self) {
        self.submit.take();
        if let Some(engine) = self.engine.take() {
            let _ = engine.join();
        }
    }
}

/// A request being served.
struct Sequence {
    reply: Reply,
    decode: Decode,
    cache: KvCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Ended with an error (already sent); retired at the end of the step.
    failed: bool,
    /// Why it ends after its newest token; retired at the end of the step.
    stop: Option<StopReason>,
    /// The other choices of its prompt, waiting for its prefill: each gets
    /// a copy of the cache and samples from its last prompt row's logits.
    forks: Vec<Fork>,
}

/// A choice waiting for the sequence computing its prompt.
struct Fork {
    reply: Reply,
    decode: Decode,
    cache: KvCache,
}

impl Sequence {
    fn in_prefill(&self) -> bool {
        self.prefilled < self.decode.prompt().len()
    }

    /// Batch slots it holds: its own and its forks'.
    fn slots(&self) -> usize {
        1 + self.forks.len()
    }

    /// Whether nobody wants it any more: its client, and its forks' (which
    /// need its prefill), all gone.
    fn abandoned(&self) -> bool {
        self.reply.cancelled() && self.forks.iter().all(|f| f.reply.cancelled())
    }

    /// Sends `e` to it and its waiting forks: they share its prompt.
    fn fail(&mut self, e: Error) {
        self.failed = true;
        for f in self.forks.drain(..) {
            let _ = f.reply.events.send(Event::Done(Err(Error::Engine(format!(
                "the prompt shared with choice 0 failed: {e}"
            )))));
        }
        let _ = self.reply.events.send(Event::Done(Err(e)));
    }

    /// The decode step on this sequence's row of `logits`: the token (and
    /// its logprob) streamed, the stop or the error recorded.
    fn decode_step(&mut self, logits: &[f32]) {
        match catch_unwind(AssertUnwindSafe(|| self.decode.step(logits))) {
            Ok(Ok((next, stop))) => {
                self.stop = stop;
                if !self.reply.stream {
                    return;
                }
                let lp = self.decode.last_logprob().cloned();
                let events = &self.reply.events;
                let gone = lp.is_some_and(|lp| events.send(Event::Logprob(lp)).is_err())
                    || events.send(Event::Token(next)).is_err();
                if gone {
                    // The handle is gone: nobody wants the rest.
                    self.reply.cancelled.store(true, Ordering::Relaxed);
                }
            }
            Ok(Err(e)) => self.fail(e),
            Err(p) => self.fail(Error::Engine(format!(
                "sampling panicked: {}",
                panic_message(&*p)
            ))),
        }
    }

    /// Its prompt is computed: the prompt's scores go out, the forks become
    /// sequences of their own (returned), and a request that only scores
    /// its prompt ends.
    fn prompt_done(&mut self, logits: &[f32]) -> Vec<Sequence> {
        let prompt_len = self.decode.prompt().len();
        let scores = self.decode.prompt_logprobs().to_vec();
        let mut spawned = Vec::with_capacity(self.forks.len());
        for mut f in std::mem::take(&mut self.forks) {
            if f.reply.cancelled() {
                continue;
            }
            f.decode.set_prompt_logprobs(scores.clone());
            let mut seq = Sequence {
                reply: f.reply,
                decode: f.decode,
                cache: f.cache,
                prefilled: prompt_len,
                failed: false,
                stop: None,
                forks: Vec::new(),
            };
            match seq.cache.copy_prefix_from(&self.cache, prompt_len) {
                Ok(()) => seq.start(logits),
                Err(e) => seq.fail(e),
            }
            spawned.push(seq);
        }
        self.start(logits);
        spawned
    }

    /// The first step after the prompt: its scores, then its first token.
    fn start(&mut self, logits: &[f32]) {
        if self.reply.stream && self.decode.scores_prompt() {
            let scores = self.decode.prompt_logprobs().to_vec();
            let _ = self.reply.events.send(Event::Prompt(scores));
        }
        if self.decode.prompt_only() {
            self.stop = Some(StopReason::MaxNewTokens);
        } else {
            self.decode_step(logits);
        }
    }
}

struct Engine {
    model: Arc<Gpt2Model>,
    config: SchedulerConfig,
    scratch: Scratch,
    queue: VecDeque<Submission>,
    active: Vec<Sequence>,
    pool: Vec<KvCache>,
    prefix: PrefixCache,
    rows: Vec<Row>,
    counters: Arc<Counters>,
}

impl Engine {
    fn new(
        model: Arc<Gpt2Model>,
        config: SchedulerConfig,
        scratch: Scratch,
        counters: Arc<Counters>,
    ) -> Self {
        Engine {
            prefix: PrefixCache::new(config.prefix_cache_bytes),
            model,
            scratch,
            queue: VecDeque::new(),
            active: Vec::with_capacity(config.max_batch),
            pool: Vec::new(),
            rows: Vec::new(),
            config,
            counters,
        }
    }

    /// A request taken off the submission channel into the queue.
    fn enqueue(&mut self, r: Submission) {
        self.counters.submitted.fetch_sub(1, Ordering::Relaxed);
        self.queue.push_back(r);
    }

    /// Batch slots taken: every active sequence and every waiting fork.
    fn slots(&self) -> usize {
        self.active.iter().map(Sequence::slots).sum()
    }

    /// Makes the queue and batch sizes visible to [`Scheduler::stats`].
    fn publish(&self) {
        let c = &self.counters;
        c.queued.store(
            self.queue.iter().map(|s| s.choices.len()).sum(),
            Ordering::Relaxed,
        );
        c.active.store(self.slots(), Ordering::Relaxed);
        c.pooled.store(self.pool.len(), Ordering::Relaxed);
        let p = self.prefix.stats();
        c.prefix_hits.store(p.hits, Ordering::Relaxed);
        c.prefix_tokens.store(p.tokens_reused, Ordering::Relaxed);
        c.prefix_bytes.store(p.bytes, Ordering::Relaxed);
        c.prefix_entries.store(p.entries, Ordering::Relaxed);
    }

    fn run(mut self, mut rx: Receiver<Submission>) {
        let pool = self.config.pool.clone();
        let mut open = true;
        loop {
            // Block only when there is nothing to do, and outside the pool:
            // an idle engine holds none of its threads.
            if self.active.is_empty() && self.queue.is_empty() {
                if !open {
                    return;
                }
                // Idle: the pooled caches go back to the OS (their written
                // pages are resident), so memory shrinks back after a burst;
                // the next burst maps fresh ones. The prefix cache stays,
                // within its budget.
                self.pool.clear();
                self.publish();
                match rx.recv() {
                    Ok(r) => self.enqueue(r),
                    Err(_) => return,
                }
            }
            // Then step on a pool thread until nothing is left: each step
            // handed to the pool and back cost two thread wake-ups (30-60 µs
            // each here), and its first parallel op a third.
            let (engine, receiver, still_open) = in_pool(pool.as_deref(), move || {
                let open = self.busy(&rx, open);
                (self, rx, open)
            });
            (self, rx, open) = (engine, receiver, still_open);
        }
    }

    /// Steps until no sequence is active or queued, taking new requests
    /// between steps. Returns whether any submitter is left.
    fn busy(&mut self, rx: &Receiver<Submission>, mut open: bool) -> bool {
        loop {
            while open {
                match rx.try_recv() {
                    Ok(r) => self.enqueue(r),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            self.retire_cancelled();
            self.admit();
            self.publish();
            // Admission fills the batch from the queue, so no active
            // sequence means an empty queue.
            if self.active.is_empty() {
                return open;
            }
            self.step();
        }
    }

    fn retire_cancelled(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            let seq = &mut self.active[i];
            // A waiting fork whose client left frees its slot now.
            let (gone, kept): (Vec<Fork>, Vec<Fork>) = std::mem::take(&mut seq.forks)
                .into_iter()
                .partition(|f| f.reply.cancelled());
            seq.forks = kept;
            self.pool.extend(gone.into_iter().map(|f| f.cache));
            if self.active[i].abandoned() {
                let seq = self.active.remove(i);
                self.keep(seq);
            } else {
                i += 1;
            }
        }
        self.queue.retain(|r| !r.cancelled());
    }

    /// A cache from the pool, or a new one, emptied.
    fn cache(&mut self) -> Result<KvCache> {
        let mut cache = self.pool.pop().map_or_else(|| self.model.new_cache(), Ok)?;
        cache.clear();
        Ok(cache)
    }

    fn admit(&mut self) {
        while let Some(sub) = self.queue.front() {
            // FIFO: the next submission waits until all its choices fit.
            if self.slots() + sub.choices.len() > self.config.max_batch {
                break;
            }
            let sub = self.queue.pop_front().expect("a front");
            // A cache per choice; if one cannot be had, the submission fails
            // and the others carry on.
            let caches: Result<Vec<KvCache>> = (0..sub.choices.len()).map(|_| self.cache()).collect();
            let mut caches = match caches {
                Ok(c) => c,
                Err(e) => {
                    for (_, reply) in sub.choices {
                        let _ = reply.events.send(Event::Done(Err(Error::Engine(e.to_string()))));
                    }
                    continue;
                }
            };
            let n_positions = self.model.config.n_positions;
            let mut choices = sub.choices.into_iter();
            let (request, reply) = choices.next().expect("at least one choice");
            let mut cache = caches.remove(0);
            let decode = Decode::new(request, n_positions, sub.submitted);
            // Start from the longest cached prefix, unless the prompt is
            // scored: its cached positions' logits are gone.
            let mut prefilled = 0;
            if !decode.scores_prompt() {
                if let Some(hit) = self.prefix.lookup(decode.prompt()) {
                    if self.prefix.restore(hit, &mut cache).is_ok() {
                        prefilled = hit.len;
                    } else {
                        cache.clear();
                    }
                }
            }
            let forks = choices
                .zip(caches)
                .map(|((request, reply), cache)| Fork {
                    reply,
                    decode: Decode::new(request, n_positions, sub.submitted),
                    cache,
                })
                .collect();
            self.active.push(Sequence {
                reply,
                decode,
                cache,
                prefilled,
                failed: false,
                stop: None,
                forks,
            });
        }
    }

    /// One batched forward step over every active sequence, then sampling.
    fn step(&mut self) {
        // Decode rows first (every sequence past its prompt), then prompt
        // rows in admission order within the budget.
        self.rows.clear();
        for (i, seq) in self.active.iter().enumerate() {
            if !seq.in_prefill() {
                let pos = seq.cache.len();
                self.rows.push(Row {
                    seq: i,
                    token: seq.decode.last(),
                    pos,
                    logits: true,
                });
            }
        }
        let mut budget = self.prompt_budget(self.rows.len());
        for (i, seq) in self.active.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if seq.in_prefill() {
                let prompt = seq.decode.prompt();
                let scored = seq.decode.scores_prompt();
                let n = (prompt.len() - seq.prefilled).min(budget);
                let end = seq.prefilled + n;
                self.rows.extend((seq.prefilled..end).map(|p| Row {
                    seq: i,
                    token: prompt[p],
                    pos: p,
                    logits: scored || p + 1 == prompt.len(),
                }));
                budget -= n;
            }
        }
        if self.rows.is_empty() {
            return;
        }
        let rows = std::mem::take(&mut self.rows);
        let start = Instant::now();
        match self.forward(&rows) {
            // The pool spins meanwhile, ready for the next step.
            Ok(()) => keep_pool_awake(|| self.sample(&rows)),
            Err(_) => self.isolate(&rows),
        }
        let stats = StepStats {
            rows: rows.len(),
            decode_rows: rows
                .iter()
                .filter(|r| r.pos >= self.active[r.seq].decode.prompt().len())
                .count(),
            elapsed: start.elapsed(),
        };
        self.rows = rows;
        self.retire_finished();
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        self.publish();
        if let Some(observer) = &self.config.observer {
            observer.on_step(&stats);
        }
    }

    /// Prompt rows a step may take beside `decode_rows` decode rows
    /// ([`SchedulerConfig::max_step_rows`]).
    fn prompt_budget(&self, decode_rows: usize) -> usize {
        let c = &self.config;
        if decode_rows == 0 {
            return c.max_prompt_rows;
        }
        c.max_step_rows
            .saturating_sub(decode_rows)
            .max(decode_rows.div_ceil(2))
            .min(c.max_prompt_rows)
    }

    /// Runs `rows` through the model, a panic caught as an error. On an error
    /// nothing of the step counts (caches only grow when a pass completes).
    fn forward(&mut self, rows: &[Row]) -> Result<()> {
        let fault = self.config.fault_token;
        let (model, scratch, active) = (&self.model, &mut self.scratch, &mut self.active);
        catch_unwind(AssertUnwindSafe(|| {
            if let Some(t) = fault {
                if rows.iter().any(|r| r.token == t) {
                    panic!("injected fault: token {t} in the batch");
                }
            }
            let mut caches: Vec<&mut KvCache> = active.iter_mut().map(|s| &mut s.cache).collect();
            // Already on a thread of the engine's pool (`run`).
            model.forward(rows, &mut caches, scratch).map(|_| ())
        }))
        .unwrap_or_else(|panic| Err(Error::Engine(format!("panicked: {}", panic_message(&*panic)))))
    }

    /// After a failed batched step: re-run each sequence's rows alone, so
    /// only the sequences that fail on their own are failed.
    fn isolate(&mut self, rows: &[Row]) {
        let mut seqs: Vec<usize> = rows.iter().map(|r| r.seq).collect();
        seqs.dedup();
        for s in seqs {
            let own: Vec<Row> = rows.iter().filter(|r| r.seq == s).copied().collect();
            match self.forward(&own) {
                Ok(()) => self.sample(&own),
                Err(e) => self.active[s].fail(e),
            }
        }
    }

    /// Takes the logits of every row of `rows` that has them (in the
    /// scratch, in row order): a prompt row's scores its next prompt token,
    /// the last prompt row's and a decode row's give the next token.
    fn sample(&mut self, rows: &[Row]) {
        let v = self.model.config.vocab_size;
        let logits = self.scratch.logits();
        let mut li = 0;
        let mut spawned = Vec::new();
        for row in rows {
            let seq = &mut self.active[row.seq];
            let prompt_len = seq.decode.prompt().len();
            if row.pos < prompt_len {
                seq.prefilled = row.pos + 1;
            }
            if !row.logits {
                continue;
            }
            let lg = &logits[li * v..(li + 1) * v];
            li += 1;
            if seq.failed {
                continue;
            }
            if row.pos + 1 < prompt_len {
                seq.decode.score_prompt(row.pos, lg);
            } else if row.pos + 1 == prompt_len {
                spawned.extend(seq.prompt_done(lg));
            } else {
                seq.decode_step(lg);
            }
        }
        // After the others: their rows index `active` as it was.
        self.active.extend(spawned);
    }

    /// Ends sequences that reached a stop (sending their result), failed, or
    /// were cancelled; their caches go to the prefix cache or the pool.
    fn retire_finished(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            let seq = &self.active[i];
            let dropped = seq.failed || seq.abandoned();
            if !dropped && seq.stop.is_none() {
                i += 1;
                continue;
            }
            // `remove`, not `swap_remove`: admission order is the prompt-row
            // priority order.
            let seq = self.active.remove(i);
            // Before the result goes out, so whoever has it sees the slot free.
            self.counters.active.store(self.slots(), Ordering::Relaxed);
            if seq.failed {
                self.pool.push(seq.cache);
                continue;
            }
            let Sequence {
                reply,
                decode,
                cache,
                stop,
                ..
            } = seq;
            self.keep_cache(decode.history(), cache);
            if let (false, Some(stop)) = (dropped, stop) {
                let _ = reply.events.send(Event::Done(Ok(decode.finish(stop))));
            }
        }
    }

    /// A sequence that is over: its cache, whose positions are valid, to
    /// the prefix cache.
    fn keep(&mut self, seq: Sequence) {
        let Sequence { decode, cache, .. } = seq;
        self.keep_cache(decode.history(), cache);
    }

    /// `cache` (holding `tokens[..cache.len()]`) kept for prefix reuse if
    /// the budget allows; what is not kept goes to the pool.
    fn keep_cache(&mut self, tokens: &[u32], cache: KvCache) {
        if self.config.prefix_cache_bytes == 0 {
            self.pool.push(cache);
        } else {
            let freed = self.prefix.store(tokens, cache);
            self.pool.extend(freed);
        }
    }
}

/// Runs `f` on a thread of `pool`, or of the global pool (where a
/// `rayon::scope` called from outside runs its body), and waits for it.
fn in_pool<T: Send>(pool: Option<&rayon::ThreadPool>, f: impl FnOnce() -> T + Send) -> T {
    match pool {
        Some(p) => p.install(f),
        None => rayon::scope(|_| f()),
    }
}

/// The message of a caught panic (`&str` or `String` payloads).
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
