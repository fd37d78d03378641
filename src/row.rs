//! One row of a batch: the unit [`Gpt2Model::forward`](crate::model::Gpt2Model::forward)
//! takes, and that the embedding layer reads. It sits below the layers and
//! the model so that both name it without importing each other.

/// One row of a batch: `token` of sequence `seq` (an index into the caches
/// passed to `forward`) at position `pos`. `logits` asks for this row's
/// next-token logits; rows that do not ask skip the final norm and LM head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub seq: usize,
    pub token: u32,
    pub pos: usize,
    pub logits: bool,
}
