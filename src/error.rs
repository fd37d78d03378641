//! The one error type of the library. Every variant names what went wrong and
//! where: the file, the tensor, the shapes, the token id, the lengths.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}: it is {kind}, not a regular file", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("cannot read {}: longer than the {limit} bytes we accept for it", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{} already exists: refusing to overwrite it", path.display())]
    Exists { path: PathBuf },
    #[error("{}: {what} {got} does not match the expected {expected}; refusing to use it", path.display())]
    Integrity {
        path: PathBuf,
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("{}: invalid config: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{}: not a valid safetensors file: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },
    #[error("{}: missing tensor `{tensor}`", path.display())]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{}: tensor `{tensor}` has shape {got:?}, expected {expected:?} (from config.json)", path.display())]
    Shape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{}: tensor `{tensor}` has unsupported dtype {dtype}: only F32, BF16 and F16 checkpoints are supported", path.display())]
    Dtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{}: unknown tensor `{tensor}` (not part of a GPT-2 checkpoint)", path.display())]
    UnknownTensor { path: PathBuf, tensor: String },
    #[error("{}: tensor `{tensor}` is stored twice (as `{first}` and `{second}`)", path.display())]
    DuplicateTensor {
        path: PathBuf,
        tensor: String,
        first: String,
        second: String,
    },
    #[error("{}: tensor `{tensor}` holds a non-finite value ({value}) at index {index}", path.display())]
    NonFinite {
        path: PathBuf,
        tensor: String,
        index: usize,
        value: f32,
    },
    #[error("token id {id} is out of range: the vocabulary has {vocab_size} tokens (0..{vocab_size})")]
    TokenId { id: u32, vocab_size: usize },
    #[error("context window exceeded: position {pos} needs {} positions, the model has n_positions = {n_positions}", pos + 1)]
    ContextLength { pos: usize, n_positions: usize },
    #[error(
        "the model produced a non-finite logit ({value}) for token id {index}; refusing to sample from it"
    )]
    NonFiniteLogits { index: usize, value: f32 },
    #[error(
        "the model produced a non-finite logit ({value}) for the token at position {position}, vocabulary index {index}: the weights or activations overflow f32"
    )]
    NonFiniteOutput {
        position: usize,
        index: usize,
        value: f32,
    },
    #[error(
        "the prompt is {prompt_tokens} tokens, longer than the context window of {n_positions} positions"
    )]
    PromptTooLong {
        prompt_tokens: usize,
        n_positions: usize,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The batching engine failed a request (a caught panic, or it stopped).
    #[error("engine: {0}")]
    Engine(String),
}

impl Error {
    /// An I/O failure on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
