//! gpt2-rs: a pure-Rust GPT-2 inference engine.
//!
//! ```
//! use gpt2::synth::{self, Preset};
//! use gpt2::{GenerateOptions, Gpt2Model, Gpt2Tokenizer, Session};
//!
//! # fn main() -> gpt2::Result<()> {
//! // Any checkpoint directory (config.json, model.safetensors) loads; this is
//! // the tiny synthetic one, whose random weights write noise.
//! let model = Gpt2Model::load(&synth::cached(Preset::Tiny, 0, |_| {})?)?;
//! let tokenizer = Gpt2Tokenizer::builtin();
//! let prompt = tokenizer.encode("Hello, how are you?")?;
//! let mut session = Session::new(&model, prompt.len())?;
//! let out = session.generate(&model, &prompt, &GenerateOptions::greedy(8), |_| {})?;
//! println!("{}", tokenizer.decode(&out.tokens)?);
//! # Ok(())
//! # }
//! ```
//!
//! The path of data: [`config`] reads a checkpoint's hyper-parameters,
//! [`specs`] lists the tensors they imply, and [`weights`] checks the file
//! against that table and reads it in one pass of bounded reads into a
//! [`model::Gpt2Model`]. Nothing is mapped from the file or zero-copy: each
//! weight is copied into memory (the norms, biases, position embeddings) or
//! packed into one anonymous map of panels (the matrices, the LM head)
//! ([`tensor`]), and the file is closed before the load returns. The model's
//! [`forward`](model::Gpt2Model::forward) turns a batch of [`row::Row`]s
//! (token, sequence, position) into logits using the kernels of the
//! `gpt2-kernels` crate. [`tokenizer`] turns text into ids and back,
//! [`sampling`] picks tokens, [`generate`] runs one request's decode loop and
//! [`scheduler`] many requests' in one batch. [`synth`] writes deterministic
//! synthetic checkpoints for machines that cannot download the real one.
//!
//! This crate has no network, HTTP or terminal code: finding weights on the
//! Hugging Face hub (`gpt2-hub`), the server (`gpt2-serve`), the benchmark
//! (`gpt2-bench`), the drills (`gpt2-drill`), the loader fuzzer (`gpt2-fuzz`)
//! and the binaries (`gpt2-cli`) are crates above it, under `tools/`.

pub mod config;
pub mod error;
pub mod files;
pub mod generate;
pub mod header;
pub mod kv;
pub mod layers;
pub mod logprobs;
pub mod memory;
pub mod model;
pub mod prefix;
pub mod profile;
pub mod request;
pub mod rng;
pub mod row;
pub mod sampling;
pub mod scheduler;
pub mod score;
pub mod specs;
pub mod synth;
pub mod tensor;
pub mod timed;
pub mod tokenizer;
pub mod weights;

pub use config::Gpt2Config;
pub use error::{Error, Result};
pub use error::{Invalid, Lengths, Param};
pub use generate::{GenerateOptions, Generation, Session, StopReason};
pub use gpt2_kernels::{Dtype, KvDtype};
pub use kv::KvCache;
pub use logprobs::TokenLogprob;
pub use memory::Footprint;
pub use model::{Gpt2Model, Row, Scratch};
pub use request::{Fit, Request};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{RequestHandle, Scheduler, SchedulerConfig};
pub use score::{Score, ScoreOptions};
pub use tokenizer::Gpt2Tokenizer;
