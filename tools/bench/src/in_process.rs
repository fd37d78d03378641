//! The benchmark's requests served in this process: a [`Backend`] over the
//! shared model, each request greedy, either on its client's own
//! [`Session`] (threads mode) or through the continuous-batching
//! [`Scheduler`] (batched mode). `throughput` and `soak` both drive it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use clap::ValueEnum;

use super::runner::{Backend, Reply};
use crate::failure::Failure;
use gpt2::profile::Profile;
use gpt2::{GenerateOptions, Generation, Gpt2Model, Scheduler, Session};

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

    fn generate(
        &self,
        client: &mut Client,
        prompt: &[u32],
        max_new_tokens: usize,
    ) -> gpt2::Result<Generation> {
        let opts = GenerateOptions::greedy(max_new_tokens);
        match self.mode {
            Mode::Threads => {
                let s = match client.session {
                    Some(ref mut s) => s,
                    None => client.session.insert(self.new_session(client.max_rows)?),
                };
                let pool = client.own_pool.as_ref().unwrap_or(self.shared_pool);
                pool.install(|| s.generate(self.model, prompt, &opts, |_| {}))
            }
            Mode::Batched => match self.scheduler {
                Some(sched) => sched.generate(prompt.to_vec(), opts),
                None => Err(gpt2::Error::Engine("no scheduler".into())),
            },
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

    fn send(&self, client: &mut Client, prompt: &[u32], max_new_tokens: usize) -> Result<Reply, Failure> {
        match catch_unwind(AssertUnwindSafe(|| self.generate(client, prompt, max_new_tokens))) {
            Ok(Ok(g)) => Ok(Reply {
                tokens: g.tokens.len(),
                ttft: g.timings.ttft,
                total: g.timings.total,
                token_times: g.timings.token_times,
                stop: format!("{:?}", g.stop),
            }),
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
}
