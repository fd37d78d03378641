//! gpt2-rs: a pure-Rust GPT-2 inference engine.
//!
//! The path of data: [`hub`] finds a checkpoint (local, Hugging Face cache or
//! synthetic); [`config`] and [`weights`] read it (bounded reads, no file
//! map: every tensor kept is copied or packed) into a [`model::Gpt2Model`],
//! whose [`forward`](model::Gpt2Model::forward) turns a batch of rows
//! (token, sequence, position) into logits using the kernels of the
//! `gpt2-kernels` crate. [`tokenizer`] turns text into ids and
//! back, [`sampling`] picks tokens, and [`generate`] runs the decode loop.
//! [`synth`] writes deterministic synthetic checkpoints for machines that
//! cannot download the real one.

pub mod bench;
pub mod config;
pub mod drill;
pub mod error;
pub mod files;
pub mod fuzz;
pub mod generate;
pub mod header;
pub mod hub;
pub mod layers;
pub mod model;
pub mod probe;
pub mod profile;
pub mod progress;
pub mod request;
pub mod rng;
pub mod sampling;
pub mod scheduler;
pub mod serve;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use config::Gpt2Config;
pub use error::{Error, Result};
pub use error::{Invalid, Lengths, Param};
pub use generate::{GenerateOptions, Generation, Session, StopReason};
pub use gpt2_kernels::Dtype;
pub use model::{Gpt2Model, KvCache, Row, Scratch};
pub use request::{Fit, Request};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{RequestHandle, Scheduler, SchedulerConfig};
pub use tokenizer::Gpt2Tokenizer;
