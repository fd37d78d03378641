//! The one error type of the library. Every variant names what went wrong and
//! where: the file, the tensor, the shapes, the token id, the lengths.
//!
//! A request the engine refuses before any work is an [`Invalid`], which
//! names the parameter at fault; it becomes an [`Error`] (with the same
//! message) wherever it meets other failures.

use std::fmt;
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
    /// A run that would need more memory than the process can have, refused
    /// before it starts (see [`memory::check`](crate::memory::check)).
    #[error(
        "not enough memory for {what}: it needs {needed} ({breakdown}), more than the {available} available \
         ({limit}); use a smaller dtype, fewer sequences or shorter ones"
    )]
    Memory {
        what: String,
        needed: String,
        breakdown: String,
        available: String,
        limit: String,
    },
}

/// Why a request cannot run, found at the engine's door
/// ([`Request::prepare`](crate::request::Request::prepare)) before any work.
/// Each names its parameter ([`Invalid::param`]) and carries the values at
/// fault, so a front end can say it in its own words: the CLI prints it (its
/// `Display` is the [`Error`] it converts to), the server answers a 400
/// naming the parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Invalid {
    /// No prompt token: the model needs one to predict the next from.
    EmptyPrompt,
    /// `prompt[index]` is past the vocabulary.
    TokenId {
        index: usize,
        id: u32,
        vocab_size: usize,
    },
    /// The prompt alone is longer than the context window.
    PromptTooLong(Lengths),
    /// The prompt fits, but not with every token asked for (refused only
    /// when the caller wants them all: [`Fit::Whole`](crate::request::Fit::Whole)).
    /// The last new token is never fed back, so it needs no position.
    ContextExceeded(Lengths),
    /// `max_new_tokens` is 0.
    NoNewTokens,
    /// Negative, NaN or infinite.
    Temperature(f32),
    /// 0 (at least one token must be kept).
    TopK(usize),
    /// Outside (0, 1], or NaN.
    TopP(f32),
    /// Zero, negative, NaN or infinite.
    RepetitionPenalty(f32),
    /// Outside [-2, 2] (OpenAI's range), or NaN.
    PresencePenalty(f32),
    /// Outside [-2, 2] (OpenAI's range), or NaN.
    FrequencyPenalty(f32),
    /// A `logit_bias` entry for a token past the vocabulary.
    LogitBiasToken { id: u32, vocab_size: usize },
    /// A `logit_bias` value outside [-100, 100] (OpenAI's range), or NaN.
    LogitBiasValue { id: u32, bias: f32 },
    /// More alternatives per token than [`MAX_LOGPROBS`](crate::logprobs::MAX_LOGPROBS).
    Logprobs(usize),
    /// A number of choices that cannot run: 0, or more than the batch holds.
    Choices { n: usize, max: usize },
}

/// A request's lengths against the context window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lengths {
    pub prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub n_positions: usize,
}

impl Lengths {
    /// Positions the request fills at most: every token but the last new
    /// one, which is never fed back.
    pub fn positions(&self) -> usize {
        self.prompt_tokens
            .saturating_add(self.max_new_tokens)
            .saturating_sub(1)
    }
}

/// The request parameter an [`Invalid`] is about, by the engine's names (a
/// front end maps them to its own: the server's `max_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    Prompt,
    MaxNewTokens,
    Temperature,
    TopK,
    TopP,
    RepetitionPenalty,
    PresencePenalty,
    FrequencyPenalty,
    LogitBias,
    Logprobs,
    N,
}

impl Param {
    pub fn name(self) -> &'static str {
        match self {
            Param::Prompt => "prompt",
            Param::MaxNewTokens => "max_new_tokens",
            Param::Temperature => "temperature",
            Param::TopK => "top_k",
            Param::TopP => "top_p",
            Param::RepetitionPenalty => "repetition_penalty",
            Param::PresencePenalty => "presence_penalty",
            Param::FrequencyPenalty => "frequency_penalty",
            Param::LogitBias => "logit_bias",
            Param::Logprobs => "logprobs",
            Param::N => "n",
        }
    }
}

impl Invalid {
    /// The parameter to change. A request past the context window blames
    /// the prompt when the prompt alone fills it, else `max_new_tokens`.
    pub fn param(&self) -> Param {
        match self {
            Invalid::EmptyPrompt | Invalid::TokenId { .. } | Invalid::PromptTooLong(_) => Param::Prompt,
            Invalid::ContextExceeded(l) if l.prompt_tokens >= l.n_positions => Param::Prompt,
            Invalid::ContextExceeded(_) | Invalid::NoNewTokens => Param::MaxNewTokens,
            Invalid::Temperature(_) => Param::Temperature,
            Invalid::TopK(_) => Param::TopK,
            Invalid::TopP(_) => Param::TopP,
            Invalid::RepetitionPenalty(_) => Param::RepetitionPenalty,
            Invalid::PresencePenalty(_) => Param::PresencePenalty,
            Invalid::FrequencyPenalty(_) => Param::FrequencyPenalty,
            Invalid::LogitBiasToken { .. } | Invalid::LogitBiasValue { .. } => Param::LogitBias,
            Invalid::Logprobs(_) => Param::Logprobs,
            Invalid::Choices { .. } => Param::N,
        }
    }
}

impl From<Invalid> for Error {
    /// The ids and lengths keep their own variants (as the model and the
    /// tokenizer report them); the rest are invalid arguments.
    fn from(e: Invalid) -> Self {
        let msg = match e {
            Invalid::TokenId { id, vocab_size, .. } => return Error::TokenId { id, vocab_size },
            Invalid::PromptTooLong(l) => {
                return Error::PromptTooLong {
                    prompt_tokens: l.prompt_tokens,
                    n_positions: l.n_positions,
                }
            }
            Invalid::EmptyPrompt => "empty prompt: at least one token is needed (start from `<|endoftext|>` \
                                     to generate from nothing)"
                .to_string(),
            Invalid::ContextExceeded(l) => format!(
                "{} prompt tokens + {} max_new_tokens need {} positions (the last new token needs none), past the \
                 context window of {}",
                l.prompt_tokens,
                l.max_new_tokens,
                l.positions(),
                l.n_positions
            ),
            Invalid::NoNewTokens => {
                "max_new_tokens must be at least 1 (0 only when the prompt is scored: prompt_logprobs)".to_string()
            }
            Invalid::Temperature(t) => format!("temperature must be >= 0 and finite, got {t}"),
            Invalid::TopK(k) => format!("top_k must be at least 1, got {k}"),
            Invalid::TopP(p) => format!("top_p must be in (0, 1], got {p}"),
            Invalid::RepetitionPenalty(r) => format!("repetition_penalty must be > 0 and finite, got {r}"),
            Invalid::PresencePenalty(x) => format!("presence_penalty must be in [-2, 2], got {x}"),
            Invalid::FrequencyPenalty(x) => format!("frequency_penalty must be in [-2, 2], got {x}"),
            Invalid::LogitBiasToken { id, vocab_size } => format!(
                "logit_bias names token id {id}, past the vocabulary of {vocab_size} tokens (0..{vocab_size})"
            ),
            Invalid::LogitBiasValue { id, bias } => {
                format!("logit_bias for token id {id} must be in [-100, 100], got {bias}")
            }
            Invalid::Logprobs(n) => format!(
                "logprobs must be at most {}, got {n}",
                crate::logprobs::MAX_LOGPROBS
            ),
            Invalid::Choices { n, max } => {
                format!("n must be between 1 and {max} (the most sequences the engine batches), got {n}")
            }
        };
        Error::InvalidArgument(msg)
    }
}

impl fmt::Display for Invalid {
    /// The message of the [`Error`] it becomes: one wording for each problem.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Error::from(self.clone()).fmt(f)
    }
}

impl std::error::Error for Invalid {}

impl Error {
    /// An I/O failure on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
