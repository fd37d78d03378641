//! gpt2-rs: a pure-Rust GPT-2 inference engine.
//!
//! The path of data: [`hub`] finds a checkpoint (local, Hugging Face cache or
//! synthetic); [`config`] reads its hyper-parameters, [`specs`] lists the
//! tensors they imply, and [`weights`] checks the file against that table and
//! reads it in one pass of bounded reads into a [`model::Gpt2Model`]. Nothing
//! is mapped from the file or zero-copy: each weight is copied into memory
//! (the norms, biases, position embeddings) or packed into one anonymous map
//! of panels (the matrices, the LM head) ([`tensor`]), and the file is closed
//! before the load returns. The model's
//! [`forward`](model::Gpt2Model::forward) turns a batch of [`row::Row`]s
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
pub mod rng;
pub mod row;
pub mod sampling;
pub mod scheduler;
pub mod serve;
pub mod specs;
pub mod synth;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use config::Gpt2Config;
pub use error::{Error, Result};
pub use generate::{GenerateOptions, Generation, Session, StopReason};
pub use gpt2_kernels::Dtype;
pub use model::{Gpt2Model, KvCache, Row, Scratch};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{RequestHandle, Scheduler, SchedulerConfig};
pub use tokenizer::Gpt2Tokenizer;
