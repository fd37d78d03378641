//! The benchmark's requests served in this process: a [`Backend`] over the
//! shared model, each request greedy, either on its client's own
//! [`Session`] (threads mode) or through the continuous-batching
//! [`Scheduler`] (batched mode). `throughput` and `soak` both drive it.
//!
//! A request of several choices (`throughput --choices`) is batched mode's
//! alone: [`Scheduler::submit_n`] computes its prompt once for all of them.
//! Threads mode runs one request on one session and has no prefill to
//! share, so `throughput` refuses the two together (a request of several
//! choices here fails, named, rather than run them one after another).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use clap::ValueEnum;

use super::runner::{Backend, Choice, Reply};
use crate::failure::Failure;
use gpt2::prefix::PrefixStats;
use gpt2::profile::Profile;
use gpt2::{Fit, GenerateOptions, Generation, Gpt2Model, Request, Scheduler, Session};

/// How compute threads are organised (`throughput --pool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PoolLayout {
    /// One rayon pool shared by all requests (`--threads-per-request` threads, default: all cores).
    Shared,
    /// A pool per in-flight request (`--threads-per-request` threads each, default: cores / concurrency).
    PerRequest,
}

impl PoolLayout {
    /// As the report's metadata names it.
    pub fn name(self) -> &'static str {
        match self {
            PoolLayout::Shared => "shared",
            PoolLayout::PerRequest => "per-request",
        }
    }
}

/// How one test's requests are executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each request runs its own forward passes on its client's session.
    Threads,
    /// Requests are submitted to the scheduler, which decodes them together.
    Batched,
}

impl Mode {
    /// As the report names it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Threads => "threads",
            Mode::Batched => "batched",
        }
    }
}

/// The in-process engine, in one mode.
#[derive(Clone)]
pub struct InProcess<'a> {
    pub model: &'a Gpt2Model,
    pub mode: Mode,
    pub layout: PoolLayout,
    /// Threads of each request's own pool (per-request layout).
    pub threads: usize,
    pub shared_pool: &'a rayon::ThreadPool,
    /// The scheduler of batched mode.
    pub scheduler: Option<&'a Scheduler>,
    /// Where threads-mode sessions add their per-op profile, if profiling.
    pub profile: Option<&'a Mutex<Profile>>,
}

/// One client thread's state in threads mode: its session and, with
/// per-request pools, its pool.
pub struct Client {
    session: Option<Session>,
    own_pool: Option<rayon::ThreadPool>,
    /// Rows of the session's scratch: the longest prompt, within 1..=256.
    max_rows: usize,
}

impl InProcess<'_> {
    fn new_session(&self, max_rows: usize) -> gpt2::Result<Session> {
        let mut s = Session::new(self.model, max_rows)?;
        s.set_profiling(self.profile.is_some());
        Ok(s)
    }

    /// The request's `choices` generations, in index order.
    fn generate(
        &self,
        client: &mut Client,
        prompt: &[u32],
        max_new_tokens: usize,
        choices: usize,
    ) -> gpt2::Result<Vec<Generation>> {
        let opts = GenerateOptions::greedy(max_new_tokens);
        match (self.mode, self.scheduler) {
            (Mode::Threads, _) if choices > 1 => Err(gpt2::Error::Engine(format!(
                "threads mode runs one choice per request, not {choices}: only batched mode shares a prefill"
            ))),
            (Mode::Threads, _) => {
                let s = match client.session {
                    Some(ref mut s) => s,
                    None => client.session.insert(self.new_session(client.max_rows)?),
                };
                let pool = client.own_pool.as_ref().unwrap_or(self.shared_pool);
                Ok(vec![
                    pool.install(|| s.generate(self.model, prompt, &opts, |_| {}))?
                ])
            }
            // One choice as before: its tokens are not streamed.
            (Mode::Batched, Some(sched)) if choices == 1 => Ok(vec![sched.generate(prompt.to_vec(), opts)?]),
            (Mode::Batched, Some(sched)) => {
                let request = Request::prepare(&self.model.config, prompt.to_vec(), opts, Fit::Prompt)?;
                // Not streamed either: the choices' tokens wake nobody.
                sched.generate_n(request, choices)
            }
            (Mode::Batched, None) => Err(gpt2::Error::Engine("no scheduler".into())),
        }
    }
}

impl Backend for InProcess<'_> {
    type Client = Client;

    fn connect(&self, _client: usize, prompts: &[Vec<u32>]) -> Client {
        let max_rows = prompts.iter().map(Vec::len).max().unwrap_or(1).clamp(1, 256);
        // Allocated before the clock starts; if that fails, each request
        // tries again and reports the error.
        let session = (self.mode == Mode::Threads)
            .then(|| self.new_session(max_rows))
            .and_then(Result::ok);
        let own_pool = match (self.mode, self.layout) {
            (Mode::Threads, PoolLayout::PerRequest) => rayon::ThreadPoolBuilder::new()
                .num_threads(self.threads)
                .build()
                .ok(),
            _ => None,
        };
        Client {
            session,
            own_pool,
            max_rows,
        }
    }

    fn send(
        &self,
        client: &mut Client,
        prompt: &[u32],
        max_new_tokens: usize,
        choices: usize,
    ) -> Result<Reply, Failure> {
        let generated = catch_unwind(AssertUnwindSafe(|| {
            self.generate(client, prompt, max_new_tokens, choices)
        }));
        match generated {
            Ok(Ok(gens)) => Ok(reply(gens)),
            Ok(Err(e)) => Err(Failure::Engine {
                message: e.to_string(),
            }),
            Err(panic) => {
                // The session may be half-updated; start afresh.
                client.session = None;
                let message = gpt2::scheduler::panic_message(&*panic);
                Err(Failure::Panicked { message })
            }
        }
    }

    fn disconnect(&self, client: Client) {
        if let (Some(total), Some(p)) = (self.profile, client.session.as_ref().and_then(|s| s.profile())) {
            total.lock().unwrap_or_else(|e| e.into_inner()).merge(p);
        }
    }

    /// Batched mode's scheduler's counters (threads mode reuses nothing).
    fn prefix_stats(&self) -> Option<PrefixStats> {
        match (self.mode, self.scheduler) {
            (Mode::Batched, Some(s)) => Some(s.stats().prefix),
            _ => None,
        }
    }
}

/// A request's reply from its choices' generations, whose timings all count
/// from the one submission: the first token of any, the end of the last.
fn reply(gens: Vec<Generation>) -> Reply {
    let ttft = gens.iter().map(|g| g.timings.ttft).min().unwrap_or_default();
    let total = gens.iter().map(|g| g.timings.total).max().unwrap_or_default();
    let choices = gens
        .into_iter()
        .map(|g| Choice {
            tokens: g.tokens.len(),
            stop: format!("{:?}", g.stop),
            token_times: g.timings.token_times,
        })
        .collect();
    Reply { ttft, total, choices }
}
