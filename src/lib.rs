//! gpt2-rs: a pure-Rust GPT-2 inference engine.
//!
//! The path of data: [`config`] and [`weights`] read a Hugging Face checkpoint
//! (memory-mapped, zero-copy) into a [`model::Gpt2Model`]; its
//! [`forward`](model::Gpt2Model::forward) turns a batch of rows (token,
//! sequence, position) into logits using the kernels of the `gpt2-kernels`
//! crate; [`synth`] writes deterministic synthetic checkpoints for machines
//! that cannot download the real one.

pub mod config;
pub mod error;
pub mod model;
pub mod synth;
pub mod weights;

pub use config::Gpt2Config;
pub use error::{Error, Result};
pub use model::{Gpt2Model, KvCache, Row, Scratch};
