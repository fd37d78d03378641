//! The numeric kernels of gpt2-rs: plain functions over `f32` slices.
//!
//! Dimension legend (used in every shape comment in this crate):
//! - `M`: rows of a batch (tokens, possibly from many sequences)
//! - `K`: input features of a linear layer, `N`: its output features
//! - `C`: channels (`n_embd`), `T`: positions attended to, `hd`: head dimension
//!
//! Conventions, after llm.c: the output comes first, then the inputs, then the
//! dimensions; no kernel allocates; lengths are checked on entry. A name says
//! whether a kernel overwrites its output (`linear`, `matmul_bt`) or adds into
//! it (`add_assign`). Every fast kernel has a naive twin in [`reference`](mod@reference) that
//! the tests compare it against.
//!
//! Parallel kernels use rayon's *current* pool, so a caller that wants a fixed
//! number of threads runs them inside `pool.install(..)`.
//!
//! Every kernel runs on the instruction set chosen at run time
//! ([`dispatch`]): the free functions on the process's [`active`] set, the
//! methods of [`Kernels`] of the same names on a given one (the tests run
//! each on every set this CPU supports).

mod arch;
pub mod attention;
pub mod dispatch;
pub mod dtype;
pub mod elementwise;
pub mod matmul;
pub mod probe;
pub mod reference;
#[cfg(test)]
mod test_data;

pub use attention::{attention_head, attention_head_bf16, bf16_row_len, kv_row_bf16, softmax_inplace};
pub use dispatch::{active, init, CpuInfo, KernelSet, KernelSpec, Kernels, KernelsError, UnknownKernelSet};
pub use dtype::{Dtype, KvDtype, UnknownDtype, UnknownKvDtype};
pub use elementwise::{add_assign, gelu_inplace, layernorm};
pub use matmul::{
    dot, linear, linear_packed, linear_panels, linear_panels_with, linear_sgemm, matmul_bt, pack,
    pack_panels, pack_panels_t, pack_t, packed_bytes, packed_len, unpack_column, Panels, PanelsMut,
    QuantScratch, PANEL,
};
