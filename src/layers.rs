//! The layers of the forward pass. Each owns its weights, knows the bytes it
//! reads and the FLOPs it does, and times itself into the profile under its
//! own [`Op`] (as candle's `with_tracing.rs` wraps a layer), so that
//! [`Gpt2Model::forward`](crate::model::Gpt2Model::forward) reads one line
//! per op. Dimensions as in [`crate::model`]: M rows, C channels, F MLP
//! width, V vocabulary, P positions; a linear layer maps K inputs to N
//! outputs.

use gpt2_kernels::{add_assign, gelu_inplace, layernorm, linear_panels_with, QuantScratch};

use crate::profile::{Op, Timer};
use crate::row::Row;
use crate::tensor::{Packed, Tensor};

const F32: usize = std::mem::size_of::<f32>();

/// The layers of one transformer block (Conv1D weights are `[in, out]`).
///
/// `N` is what a layer norm is and `L` what a linear layer is: in a loaded
/// model the layers themselves (the defaults); while the table of tensors
/// is listed ([`crate::specs`]), nothing (`()`); while the loader reads a
/// block, a linear layer whose panels are not yet shared.
pub struct Block<N = LayerNorm, L = PackedLinear> {
    pub ln_1: N,      // (C), (C)            `ln_1`
    pub attn_qkv: L,  // (C, 3C) + (3C)      `attn.c_attn`
    pub attn_proj: L, // (C, C) + (C)        `attn.c_proj`
    pub ln_2: N,      // (C), (C)            `ln_2`
    pub mlp_fc: L,    // (C, F) + (F)        `mlp.c_fc`
    pub mlp_proj: L,  // (F, C) + (C)        `mlp.c_proj`
}

impl<N, L> Block<N, L> {
    /// The same block with each linear layer made into `f` of it.
    pub(crate) fn map_linear<M>(self, mut f: impl FnMut(L) -> M) -> Block<N, M> {
        Block {
            ln_1: self.ln_1,
            attn_qkv: f(self.attn_qkv),
            attn_proj: f(self.attn_proj),
            ln_2: self.ln_2,
            mlp_fc: f(self.mlp_fc),
            mlp_proj: f(self.mlp_proj),
        }
    }
}

/// `out (M, N) = x (M, K) W + b`, with `W` packed in column panels, in the
/// run's dtype.
pub struct PackedLinear {
    panels: Packed,       // W (K, N) in column panels: packed_bytes(dtype, K, N)
    bias: Option<Tensor>, // (N); none for the LM head
    k: usize,
    n: usize,
    op: Op,
}

impl PackedLinear {
    /// A layer over `panels` (a `[k, n]` weight packed by
    /// `gpt2_kernels::pack` or `pack_t`), profiled as `op`.
    pub(crate) fn new(panels: Packed, bias: Option<Tensor>, k: usize, n: usize, op: Op) -> Self {
        PackedLinear {
            panels,
            bias,
            k,
            n,
            op,
        }
    }

    /// The packed weight.
    pub fn panels(&self) -> &Packed {
        &self.panels
    }

    /// `(K, N)`: inputs and outputs.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Bytes of weights one call reads: the matrix in its dtype (without its
    /// panels' padding; int8 with its scales) and the f32 bias.
    pub fn bytes(&self) -> usize {
        let bias = if self.bias.is_some() { self.n } else { 0 };
        self.panels.dtype().weight_bytes(self.k, self.n) + bias * F32
    }

    /// Multiply-adds of one call over `m` rows, two FLOPs each.
    pub fn flops(&self, m: usize) -> usize {
        2 * m * self.k * self.n
    }

    /// `out (m, N) = x (m, K) W + b` on the current rayon pool, timed under
    /// the layer's op; int8 weights quantise x's rows into `xq` first.
    #[inline]
    pub fn forward(&self, out: &mut [f32], x: &[f32], m: usize, xq: &mut QuantScratch, t: &mut Timer<'_>) {
        t.time(self.op, self.bytes(), self.flops(m), || {
            let bias = self.bias.as_ref().map(Tensor::data);
            linear_panels_with(out, x, self.panels.panels(), bias, xq, m, self.k, self.n)
        })
    }
}

/// Layer norm over each row of C channels: `(x - mean) / sqrt(var + eps) * gamma + beta`.
pub struct LayerNorm {
    gamma: Tensor, // (C)
    beta: Tensor,  // (C)
    eps: f32,
}

impl LayerNorm {
    pub(crate) fn new(gamma: Tensor, beta: Tensor, eps: f32) -> Self {
        LayerNorm { gamma, beta, eps }
    }

    /// `out (M, C) = ln(x (M, C))`, timed as one layer-norm op.
    #[inline]
    pub fn forward(&self, out: &mut [f32], x: &[f32], t: &mut Timer<'_>) {
        t.time(Op::LayerNorm, 0, 0, || self.apply(out, x))
    }

    /// Normalises the rows `xs` (each `(C)`) into consecutive rows of `out`,
    /// timed as one layer-norm op (the final norm, of the rows that want
    /// logits).
    #[inline]
    pub fn forward_rows<'x>(&self, out: &mut [f32], xs: impl Iterator<Item = &'x [f32]>, t: &mut Timer<'_>) {
        t.time(Op::LayerNorm, 0, 0, || {
            let c = self.gamma.data().len();
            for (dst, xr) in out.chunks_exact_mut(c).zip(xs) {
                self.apply(dst, xr);
            }
        })
    }

    fn apply(&self, out: &mut [f32], x: &[f32]) {
        layernorm(out, x, self.gamma.data(), self.beta.data(), self.eps)
    }
}

/// Token plus position embeddings.
pub struct Embeddings {
    wte: TokenTable,
    pub wpe: Tensor, // (P, C)
}

/// Where the token embeddings `wte (V, C)` are read from.
enum TokenTable {
    /// The tied LM head's panels (`wte` transposed, `(C, V)` packed), read
    /// back as f32 (exactly as the LM head uses them: in bf16 or int8, the
    /// rounded values): the file is closed once loaded, and an f32 copy of
    /// `wte` would cost 154 MB beside a 39 MB int8 head.
    Tied(Packed),
    /// `wte (V, C)` as loaded, when the checkpoint has its own LM head.
    Untied(Tensor),
}

impl Embeddings {
    /// Embeddings read from the tied LM head's `panels`.
    pub(crate) fn tied(panels: Packed, wpe: Tensor) -> Self {
        Embeddings {
            wte: TokenTable::Tied(panels),
            wpe,
        }
    }

    pub(crate) fn untied(wte: Tensor, wpe: Tensor) -> Self {
        Embeddings {
            wte: TokenTable::Untied(wte),
            wpe,
        }
    }

    /// Whether the LM head is `wte` (no `lm_head.weight` in the checkpoint).
    pub fn is_tied(&self) -> bool {
        matches!(self.wte, TokenTable::Tied(_))
    }

    /// Token `tok`'s embedding (row `tok` of `wte`) into `dst (C)`.
    pub fn token(&self, dst: &mut [f32], tok: usize) {
        let c = dst.len();
        match &self.wte {
            TokenTable::Tied(panels) => panels.panels().unpack_column(dst, c, tok),
            TokenTable::Untied(wte) => dst.copy_from_slice(&wte.data()[tok * c..(tok + 1) * c]),
        }
    }

    /// `x (M, C) = wte[token] + wpe[pos]` for every row, timed as one op.
    #[inline]
    pub fn forward(&self, x: &mut [f32], rows: &[Row], t: &mut Timer<'_>) {
        let c = self.wpe.shape()[1];
        let m = rows.len();
        let wpe = self.wpe.data();
        t.time(Op::Embed, 2 * m * c * F32, m * c, || {
            for (xr, row) in x.chunks_exact_mut(c).zip(rows) {
                let (tok, pos) = (row.token as usize, row.pos);
                self.token(xr, tok);
                add_assign(xr, &wpe[pos * c..(pos + 1) * c]);
            }
        })
    }
}

/// `x += y` (a residual connection), timed.
#[inline]
pub fn residual(x: &mut [f32], y: &[f32], t: &mut Timer<'_>) {
    t.time(Op::Residual, 0, 0, || add_assign(x, y))
}

/// tanh-GELU of every element of `x`, in place, timed.
#[inline]
pub fn gelu(x: &mut [f32], t: &mut Timer<'_>) {
    t.time(Op::Gelu, 0, 0, || gelu_inplace(x))
}
