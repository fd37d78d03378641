//! The table of the tensors a GPT-2 config implies: each one's name, shape
//! and [`Role`], computed from the config alone, with no file (as llm.c's
//! `fill_in_parameter_sizes`). The loader ([`crate::weights`]) checks a
//! checkpoint against it and then reads the tensors in its order; the
//! synthetic generator writes what [`expected_shapes`] lists.
//!
//! Names are built in one place, by prefix (as candle's `VarBuilder::pp`):
//! a block's in `block`, which the table lists and the loader reads
//! through the same function (`Tensors` says what each does with a
//! layer's tensors), and the ones outside the blocks from the constants
//! below, in [`Specs::new`]. Adding a layer to a block is a line in `block`
//! and a field of [`Block`] (a linear one also a line in its `map_linear`);
//! adding a tensor to every linear layer or layer norm is a line in each
//! `Tensors` implementation.

use std::collections::BTreeMap;
use std::convert::Infallible;

use gpt2_kernels::{packed_bytes, Dtype};

use crate::config::Gpt2Config;
use crate::layers::Block;
use crate::profile::Op;

/// The token embeddings `(V, C)`.
pub const WTE: &str = "wte.weight";
/// The position embeddings `(P, C)`.
pub const WPE: &str = "wpe.weight";
/// The final layer norm's prefix.
pub const LN_F: &str = "ln_f";
/// An LM head of its own `(V, C)`, which most checkpoints lack (tied to `wte`).
pub const LM_HEAD: &str = "lm_head.weight";

/// What the loader makes of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Required; copied into memory as f32 and kept as stored: the norms,
    /// the biases, `wpe`.
    Copied,
    /// Required; a linear layer's `[K, N]` weight, packed into the panel map
    /// (not kept as stored).
    Packed,
    /// Required; `wte (V, C)`: packed transposed as the LM head when the
    /// file has no [`LM_HEAD`] (tied; the token embeddings are then read back
    /// from those panels), else copied.
    Embeddings,
    /// Optional; [`LM_HEAD`], packed transposed as the LM head when present.
    LmHead,
    /// Not a weight: skipped when present (the hub's causal-mask buffers).
    Skipped,
}

/// One tensor of the table. In [`Specs`]'s block template the name is
/// relative to `h.{i}.`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
}

impl Spec {
    fn new(name: String, shape: &[usize], role: Role) -> Self {
        Spec {
            name,
            shape: shape.to_vec(),
            role,
        }
    }

    /// Whether a checkpoint must hold this tensor.
    pub fn required(&self) -> bool {
        matches!(self.role, Role::Copied | Role::Packed | Role::Embeddings)
    }

    /// `(K, N)` of the panels this tensor is packed into, or `None` if it is
    /// copied or skipped. `tied`: the file has no [`LM_HEAD`].
    pub fn panels(&self, tied: bool) -> Option<(usize, usize)> {
        let packed = match self.role {
            Role::Packed => return Some((self.shape[0], self.shape[1])),
            Role::Embeddings => tied,
            Role::LmHead => !tied,
            Role::Copied | Role::Skipped => false,
        };
        // Stored (V, C); the LM head multiplies by its transpose.
        packed.then(|| (self.shape[1], self.shape[0]))
    }
}

/// Bytes a `[k, n]` matrix takes in the panel map: its panels in `dtype`,
/// rounded up so that the next matrix starts a cache line.
pub fn panel_len(dtype: Dtype, k: usize, n: usize) -> usize {
    packed_bytes(dtype, k, n).next_multiple_of(64)
}

/// A name prefix such as `h.0.attn`; [`Prefix::pp`] goes one level down.
pub struct Prefix(String);

impl Prefix {
    /// The prefix `prefix` (`""`: none).
    pub fn new(prefix: impl Into<String>) -> Self {
        Prefix(prefix.into())
    }

    /// The prefix `self.name`.
    pub fn pp(&self, name: &str) -> Self {
        Prefix(self.name(name))
    }

    /// The full name of `name` under this prefix.
    pub fn name(&self, name: &str) -> String {
        if self.0.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.0)
        }
    }
}

/// What [`block`] hands each layer's tensors to: the table lists them
/// (`Vec<Spec>`: a layer is nothing), the loader reads them (a layer is
/// the layer).
pub(crate) trait Tensors {
    type Norm;
    type Linear;
    type Error;

    /// The layer norm `p.weight`, `p.bias`, both `(c)`.
    fn norm(&mut self, p: &Prefix, c: usize, eps: f32) -> Result<Self::Norm, Self::Error>;

    /// The linear layer `p.weight (k, n)`, packed, plus `p.bias (n)`,
    /// profiled as `op`.
    fn linear(&mut self, p: &Prefix, k: usize, n: usize, op: Op) -> Result<Self::Linear, Self::Error>;

    /// The name of a tensor that is not a weight, skipped if the file has it.
    fn skip(&mut self, name: String);
}

/// Names the tensors of the block under `p` (`h.{i}`), in checkpoint order.
pub(crate) fn block<T: Tensors>(
    t: &mut T,
    p: &Prefix,
    config: &Gpt2Config,
) -> Result<Block<T::Norm, T::Linear>, T::Error> {
    let (c, f, eps) = (config.n_embd, config.n_inner, config.layer_norm_epsilon);
    let (attn, mlp) = (p.pp("attn"), p.pp("mlp"));
    // The hub's original `gpt2` file carries causal-mask buffers; they are not weights.
    t.skip(attn.name("bias"));
    t.skip(attn.name("masked_bias"));
    Ok(Block {
        ln_1: t.norm(&p.pp("ln_1"), c, eps)?,
        attn_qkv: t.linear(&attn.pp("c_attn"), c, 3 * c, Op::Qkv)?,
        attn_proj: t.linear(&attn.pp("c_proj"), c, c, Op::AttnProj)?,
        ln_2: t.norm(&p.pp("ln_2"), c, eps)?,
        mlp_fc: t.linear(&mlp.pp("c_fc"), c, f, Op::MlpUp)?,
        mlp_proj: t.linear(&mlp.pp("c_proj"), f, c, Op::MlpDown)?,
    })
}

/// Listing a block: each layer's tensors become specs.
impl Tensors for Vec<Spec> {
    type Norm = ();
    type Linear = ();
    type Error = Infallible;

    fn norm(&mut self, p: &Prefix, c: usize, _eps: f32) -> Result<(), Infallible> {
        self.push(Spec::new(p.name("weight"), &[c], Role::Copied));
        self.push(Spec::new(p.name("bias"), &[c], Role::Copied));
        Ok(())
    }

    fn linear(&mut self, p: &Prefix, k: usize, n: usize, _op: Op) -> Result<(), Infallible> {
        self.push(Spec::new(p.name("weight"), &[k, n], Role::Packed));
        self.push(Spec::new(p.name("bias"), &[n], Role::Copied));
        Ok(())
    }

    fn skip(&mut self, name: String) {
        self.push(Spec::new(name, &[], Role::Skipped));
    }
}

/// The table for one config: the tensors before the blocks, one block's
/// (named relative to `h.{i}.`) and the ones after. The blocks are listed
/// only as a reader reaches them, so a config.json claiming billions of
/// layers costs nothing before the file disagrees.
pub struct Specs {
    front: Vec<Spec>,
    block: Vec<Spec>,
    back: Vec<Spec>,
    n_layer: usize,
}

impl Specs {
    pub fn new(config: &Gpt2Config) -> Self {
        let (c, v, p) = (config.n_embd, config.vocab_size, config.n_positions);
        let front = vec![
            Spec::new(WTE.into(), &[v, c], Role::Embeddings),
            Spec::new(WPE.into(), &[p, c], Role::Copied),
        ];
        let mut block_specs = Vec::new();
        let Ok(_) = block(&mut block_specs, &Prefix::new(""), config);
        let mut back = Vec::new();
        let Ok(()) = back.norm(&Prefix::new(LN_F), c, config.layer_norm_epsilon);
        back.push(Spec::new(LM_HEAD.into(), &[v, c], Role::LmHead));
        Specs {
            front,
            block: block_specs,
            back,
            n_layer: config.n_layer,
        }
    }

    /// The spec of the tensor named `canonical` (without `transformer.`),
    /// or `None` if such a checkpoint has no tensor of that name.
    pub fn get(&self, canonical: &str) -> Option<&Spec> {
        let (specs, name) = match layer_field(canonical, self.n_layer) {
            Some(field) => (&self.block, field),
            None => (&self.front, canonical),
        };
        let found = specs.iter().find(|s| s.name == name);
        found.or_else(|| self.back.iter().find(|s| s.name == canonical))
    }

    /// Every tensor, with its full name, in checkpoint order: `wte`, `wpe`,
    /// each block's, `ln_f`'s, the LM head.
    pub fn iter(&self) -> impl Iterator<Item = (String, &Spec)> + '_ {
        fn whole(s: &Spec) -> (String, &Spec) {
            (s.name.clone(), s)
        }
        let blocks = (0..self.n_layer).flat_map(move |i| {
            let p = Prefix::new(format!("h.{i}"));
            self.block.iter().map(move |s| (p.name(&s.name), s))
        });
        self.front
            .iter()
            .map(whole)
            .chain(blocks)
            .chain(self.back.iter().map(whole))
    }
}

/// The shape of every tensor a checkpoint of this config must hold, by
/// canonical name (without the `transformer.` prefix). Public so that the
/// synthetic generator writes exactly what the loader expects.
pub fn expected_shapes(config: &Gpt2Config) -> BTreeMap<String, Vec<usize>> {
    Specs::new(config)
        .iter()
        .filter(|(_, s)| s.required())
        .map(|(name, s)| (name, s.shape.clone()))
        .collect()
}

/// For `h.{i}.{field}` with a canonically written `i < n_layer` (not `h.01`
/// or `h.+1`, which `parse` would accept), the `field`.
fn layer_field(canonical: &str, n_layer: usize) -> Option<&str> {
    let (index, field) = canonical.strip_prefix("h.")?.split_once('.')?;
    let i: usize = index.parse().ok()?;
    (i < n_layer && i.to_string() == index).then_some(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micro() -> Gpt2Config {
        Gpt2Config::from_json(
            r#"{"model_type":"gpt2","n_layer":2,"n_head":2,"n_embd":8,"n_positions":16,"vocab_size":32}"#,
        )
        .unwrap()
    }

    #[test]
    fn only_canonical_layer_names_are_mask_buffers() {
        let specs = Specs::new(&micro());
        let skipped = |name: &str| specs.get(name).is_some_and(|s| s.role == Role::Skipped);
        assert!(skipped("h.1.attn.bias") && skipped("h.0.attn.masked_bias"));
        for name in [
            "h.+1.attn.bias",
            "h.01.attn.bias",
            "h.2.attn.bias",
            "h.1.attn.c_attn.bias",
            "h..attn.bias",
        ] {
            assert!(!skipped(name), "{name}");
        }
    }

    /// The table in checkpoint order, with each tensor's shape and role.
    #[test]
    fn the_table_lists_every_tensor_in_checkpoint_order() {
        let specs = Specs::new(&micro());
        let all: Vec<(String, Vec<usize>, Role)> = specs
            .iter()
            .filter(|(_, s)| s.role != Role::Skipped)
            .map(|(name, s)| (name, s.shape.clone(), s.role))
            .collect();
        let block = |i: usize| {
            let p = |n: &str| format!("h.{i}.{n}");
            [
                (p("ln_1.weight"), vec![8], Role::Copied),
                (p("ln_1.bias"), vec![8], Role::Copied),
                (p("attn.c_attn.weight"), vec![8, 24], Role::Packed),
                (p("attn.c_attn.bias"), vec![24], Role::Copied),
                (p("attn.c_proj.weight"), vec![8, 8], Role::Packed),
                (p("attn.c_proj.bias"), vec![8], Role::Copied),
                (p("ln_2.weight"), vec![8], Role::Copied),
                (p("ln_2.bias"), vec![8], Role::Copied),
                (p("mlp.c_fc.weight"), vec![8, 32], Role::Packed),
                (p("mlp.c_fc.bias"), vec![32], Role::Copied),
                (p("mlp.c_proj.weight"), vec![32, 8], Role::Packed),
                (p("mlp.c_proj.bias"), vec![8], Role::Copied),
            ]
        };
        let mut want = vec![
            ("wte.weight".to_string(), vec![32, 8], Role::Embeddings),
            ("wpe.weight".to_string(), vec![16, 8], Role::Copied),
        ];
        want.extend(block(0));
        want.extend(block(1));
        want.extend([
            ("ln_f.weight".to_string(), vec![8], Role::Copied),
            ("ln_f.bias".to_string(), vec![8], Role::Copied),
            ("lm_head.weight".to_string(), vec![32, 8], Role::LmHead),
        ]);
        assert_eq!(all, want);
        assert_eq!(
            specs.get("h.1.mlp.c_fc.weight").map(|s| &s.shape[..]),
            Some(&[8, 32][..])
        );
        assert_eq!(specs.get("lm_head.weight").map(|s| s.role), Some(Role::LmHead));
        assert!(specs.get("h.2.ln_1.weight").is_none());
    }
}
