//! Loading `model.safetensors`: the header read and checked (name, dtype,
//! shape, byte range) against the config, then every tensor read with
//! bounded reads (`pread`) into memory this process owns. The file is never
//! memory-mapped, so how the kernel caches or maps its pages never shows in
//! this process's resident memory, and once loaded nothing reads it again.
//!
//! The four `[K, N]` matrices of every block, and the LM head (`wte`
//! transposed), are packed once, at load, in the column panels of
//! [`gpt2_kernels::pack_panels`] (one anonymous map, huge pages where the OS
//! grants them), which the kernels stream in order. Each is read through one
//! reused staging buffer (a whole block matrix, or a slab of the LM head's
//! rows), so the load holds the packed copy plus that one buffer; nothing
//! keeps the stored matrices: each layer holds only its panels.
//!
//! Every tensor name is built in one place, by prefix, in `gpt2` and
//! `block` (as candle's `VarBuilder::pp` does): the shape checks, the
//! list of [`expected_shapes`], the mask buffers to skip, the packing and
//! the loading all read those two functions.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gpt2_kernels::{pack, pack_t, packed_bytes, Dtype, Panels, PanelsMut, PANEL};
use memmap2::{Mmap, MmapMut};
use rayon::prelude::*;
use safetensors::Dtype as FileDtype;

use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::layers::{Embeddings, LayerNorm, PackedLinear};
use crate::profile::Op;

/// The values one read fetches (1 MiB of f32): the pieces of a tensor are
/// read in parallel, as many at once as the pool has threads.
const READ_PIECE: usize = 1 << 18;

#[cfg(target_endian = "big")]
compile_error!("safetensors stores little-endian floats; big-endian hosts are not supported");

/// One f32 tensor: its values read into memory, or (while loading) where
/// they lie in the file. Cloning shares the values.
#[derive(Clone)]
pub struct Tensor {
    storage: Storage,
    shape: Vec<usize>,
    /// Canonical name (without `transformer.`).
    name: String,
}

#[derive(Clone)]
enum Storage {
    /// Not read yet: the values stored as `stored` from byte `offset` of
    /// the file, read when packed ([`Tensor::read`], a bounded piece at a
    /// time) or kept ([`Tensor::owned`]). Only a loading model has these.
    File {
        file: Arc<Source>,
        offset: u64,
        stored: Stored,
    },
    /// The values, as f32.
    Owned(Arc<Vec<f32>>),
}

/// The open checkpoint, shared by the tensors not read yet.
struct Source {
    file: File,
    path: PathBuf,
}

/// The float formats a checkpoint may store a tensor in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stored {
    F32,
    Bf16,
    F16,
}

impl Stored {
    fn bytes(self) -> usize {
        match self {
            Stored::F32 => 4,
            Stored::Bf16 | Stored::F16 => 2,
        }
    }

    /// `bytes` (little-endian 16-bit values) into `out` as f32, exactly:
    /// every BF16 and F16 value is an f32 value, NaN and infinities included.
    fn widen(self, bytes: &[u8], out: &mut [f32]) {
        let bits = bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        match self {
            Stored::Bf16 => out
                .iter_mut()
                .zip(bits)
                .for_each(|(o, b)| *o = half::bf16::from_bits(b).to_f32()),
            Stored::F16 => out
                .iter_mut()
                .zip(bits)
                .for_each(|(o, b)| *o = half::f16::from_bits(b).to_f32()),
            Stored::F32 => unreachable!("f32 is read as it is stored"),
        }
    }
}

impl Tensor {
    /// The values, row-major. Only for a tensor read into memory (every
    /// tensor of a loaded model).
    pub fn data(&self) -> &[f32] {
        match &self.storage {
            Storage::Owned(v) => v,
            Storage::File { .. } => unreachable!("a tensor still in the file is read through read()"),
        }
    }

    /// The values `from..to` (in elements) as f32, read into the front of
    /// `buf` (grown if shorter, never shrunk or cleared: every value is
    /// overwritten): reads of exactly those bytes, a [`READ_PIECE`] at a
    /// time on the caller's rayon pool, whatever the tensor's size.
    fn read<'b>(&self, from: usize, to: usize, buf: &'b mut Vec<f32>) -> Result<&'b [f32]> {
        if buf.len() < to - from {
            buf.resize(to - from, 0.0);
        }
        let out = &mut buf[..to - from];
        let (file, offset, stored) = match &self.storage {
            Storage::Owned(v) => {
                out.copy_from_slice(&v[from..to]);
                return Ok(out);
            }
            Storage::File {
                file, offset, stored, ..
            } => (file, *offset, *stored),
        };
        let size = stored.bytes();
        out.par_chunks_mut(READ_PIECE)
            .enumerate()
            .try_for_each(|(i, piece)| {
                let at = offset + ((from + i * READ_PIECE) * size) as u64;
                let read = |bytes: &mut [u8]| {
                    crate::files::read_exact_at(&file.file, bytes, at).map_err(|e| Error::io(&file.path, e))
                };
                match stored {
                    // Little-endian f32 bytes are the values themselves.
                    Stored::F32 => read(bytemuck::cast_slice_mut(piece)),
                    _ => {
                        let mut bytes = vec![0; piece.len() * size];
                        read(&mut bytes)?;
                        stored.widen(&bytes, piece);
                        Ok(())
                    }
                }
            })?;
        Ok(out)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The canonical name, e.g. `h.0.attn.c_attn.bias`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the values are still in the file, not yet read (never, once
    /// a model is loaded).
    pub fn in_file(&self) -> bool {
        matches!(self.storage, Storage::File { .. })
    }

    /// A tensor with no values, standing in while [`gpt2`] is only planned.
    fn placeholder(name: String, shape: &[usize]) -> Self {
        Tensor {
            storage: Storage::Owned(Arc::default()),
            shape: shape.to_vec(),
            name,
        }
    }

    /// The same tensor with its values read into memory (a tensor already
    /// read is shared, not copied again).
    fn owned(&self) -> Result<Tensor> {
        if !self.in_file() {
            return Ok(self.clone());
        }
        let mut values = Vec::new();
        self.read(0, self.len(), &mut values)?;
        debug_assert_eq!(values.len(), self.len());
        Ok(Tensor {
            storage: Storage::Owned(Arc::new(values)),
            shape: self.shape.clone(),
            name: self.name.clone(),
        })
    }

    /// Elements.
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A `[K, N]` weight packed in column panels for
/// [`gpt2_kernels::linear_panels`], in the run's [`Dtype`]:
/// `gpt2_kernels::packed_bytes(dtype, K, N)` bytes of the one anonymous map
/// that holds every layer's panels. Cloning shares them.
#[derive(Clone)]
pub struct Packed {
    /// `None` in the layers a plan or the packing pass builds (and drops).
    map: Option<Arc<Mmap>>,
    start: usize,
    dtype: Dtype,
    k: usize,
    n: usize,
}

impl Packed {
    /// The panels, as the kernels read them.
    pub fn panels(&self) -> Panels<'_> {
        let bytes = packed_bytes(self.dtype, self.k, self.n);
        let map = self.map.as_ref().expect("only the loaded model's layers are run");
        Panels::from_bytes(self.dtype, &map[self.start..self.start + bytes], self.k, self.n)
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
}

/// The weights of one transformer block (Conv1D weights are `[in, out]`).
pub struct Block {
    pub ln_1: LayerNorm,         // (C), (C)            `ln_1`
    pub attn_qkv: PackedLinear,  // (C, 3C) + (3C)      `attn.c_attn`
    pub attn_proj: PackedLinear, // (C, C) + (C)        `attn.c_proj`
    pub ln_2: LayerNorm,         // (C), (C)            `ln_2`
    pub mlp_fc: PackedLinear,    // (C, F) + (F)        `mlp.c_fc`
    pub mlp_proj: PackedLinear,  // (F, C) + (C)        `mlp.c_proj`
}

/// All weights of a GPT-2 checkpoint.
pub struct Weights {
    pub embed: Embeddings,     // wte (V, C), wpe (P, C)
    pub blocks: Vec<Block>,    // L blocks
    pub ln_f: LayerNorm,       // (C), (C)
    pub lm_head: PackedLinear, // (C, V), no bias: wteᵀ, or lm_head.weightᵀ when untied
    /// Every tensor by canonical name, in checkpoint order, as
    /// [`Weights::check_finite`] reads it.
    params: Vec<(String, Param)>,
    /// Bytes of the packed copies (in anonymous memory).
    pub packed_bytes: usize,
    /// The format of the packed matrices.
    pub dtype: Dtype,
}

/// Where [`Weights::check_finite`] reads a tensor's values.
enum Param {
    Tensor(Tensor),
    /// A matrix, read in its panels (`[K, N]`; `transposed`: stored `[N, K]`),
    /// as converted to the run's dtype.
    Panels {
        panels: Packed,
        transposed: bool,
    },
}

impl Param {
    /// Whether any value is NaN or infinite: a branch-free scan (exponent
    /// bits all ones), in parallel; the element is located only after.
    fn any_non_finite(&self) -> bool {
        match self {
            Param::Tensor(t) => Panels::F32(t.data()).any_non_finite(),
            Param::Panels { panels, .. } => panels.panels().any_non_finite(),
        }
    }

    /// The first NaN or infinity, by its row-major index in the tensor as
    /// stored in the file (in a matrix converted to int8, a column with one
    /// has a non-finite scale: its first element is reported).
    fn first_non_finite(&self) -> Option<(usize, f32)> {
        let (panels, transposed) = match self {
            Param::Tensor(t) => {
                return t.data().iter().copied().enumerate().find(|(_, v)| !v.is_finite());
            }
            Param::Panels { panels, transposed } => (panels, *transposed),
        };
        let (k, n) = (panels.k, panels.n);
        let panels = panels.panels();
        let mut column = vec![0.0; k];
        let mut first: Option<(usize, f32)> = None;
        for j in 0..n {
            panels.unpack_column(&mut column, k, j);
            let Some((i, &v)) = column.iter().enumerate().find(|(_, v)| !v.is_finite()) else {
                continue;
            };
            // Column j of a transposed matrix is row j as stored.
            let index = if transposed { j * k + i } else { i * n + j };
            if transposed {
                return Some((index, v));
            }
            if first.is_none_or(|(best, _)| index < best) {
                first = Some((index, v));
            }
        }
        first
    }
}

impl Weights {
    /// Fails on the first NaN or infinity in any tensor, in checkpoint order
    /// (a full pass over the weights). A block matrix or the LM head is
    /// scanned in its panels, which hold the same values (plus zero padding)
    /// and are what the kernels read.
    pub fn check_finite(&self, path: &Path) -> Result<()> {
        for (name, param) in &self.params {
            if !param.any_non_finite() {
                continue;
            }
            if let Some((index, value)) = param.first_non_finite() {
                return Err(Error::NonFinite {
                    path: path.to_owned(),
                    tensor: name.clone(),
                    index,
                    value,
                });
            }
        }
        Ok(())
    }
}

/// Names every tensor of a GPT-2 checkpoint with `n_layer` blocks, in
/// checkpoint order, and builds the weights from them.
fn gpt2(vb: &Vb, config: &Gpt2Config, n_layer: usize) -> Result<Weights> {
    let (c, v, p) = (config.n_embd, config.vocab_size, config.n_positions);
    let wte = vb.matrix("wte.weight", &[v, c])?;
    let wpe = vb.tensor("wpe.weight", &[p, c])?;
    // n_layer is config.json's word: grow with what the file holds.
    let mut blocks = Vec::new();
    for i in 0..n_layer {
        blocks.push(block(&vb.pp(&format!("h.{i}")), config)?);
    }
    let ln_f = vb.layer_norm("ln_f", c, config.layer_norm_epsilon)?;
    let (embed, lm_head) = match vb.optional("lm_head.weight", &[v, c]) {
        Some(head) => (
            Embeddings::untied(vb.keep(wte)?, wpe),
            vb.linear_t(head, Op::LmHead)?,
        ),
        None => {
            let head = vb.linear_t(wte, Op::LmHead)?;
            (Embeddings::tied(head.panels().clone(), wpe), head)
        }
    };
    Ok(Weights {
        embed,
        blocks,
        ln_f,
        lm_head,
        params: Vec::new(),
        packed_bytes: 0,
        dtype: Dtype::F32,
    })
}

/// Names the tensors of one block, `h.{i}.…`.
fn block(vb: &Vb, config: &Gpt2Config) -> Result<Block> {
    let (c, f, eps) = (config.n_embd, config.n_inner, config.layer_norm_epsilon);
    let (attn, mlp) = (vb.pp("attn"), vb.pp("mlp"));
    // The hub's original `gpt2` file carries causal-mask buffers; they are not weights.
    attn.skip("bias");
    attn.skip("masked_bias");
    Ok(Block {
        ln_1: vb.layer_norm("ln_1", c, eps)?,
        attn_qkv: attn.linear("c_attn", c, 3 * c, Op::Qkv)?,
        attn_proj: attn.linear("c_proj", c, c, Op::AttnProj)?,
        ln_2: vb.layer_norm("ln_2", c, eps)?,
        mlp_fc: mlp.linear("c_fc", c, f, Op::MlpUp)?,
        mlp_proj: mlp.linear("c_proj", f, c, Op::MlpDown)?,
    })
}

/// Hands out tensors by name, built by prefix (candle's `VarBuilder::pp`).
/// [`load`] runs [`gpt2`] three times, over a store in each [`Store`] mode.
struct Vb<'s, 'f> {
    prefix: String,
    store: &'s RefCell<Store<'f>>,
    /// The format the matrices are packed in.
    dtype: Dtype,
}

/// What a run of [`gpt2`] does with the tensors it names.
enum Store<'f> {
    /// Lists the names with their shapes and adds up the panels' bytes; with
    /// a file, also fails on the first tensor missing from it. Hands out
    /// placeholders (without a file) or shared views.
    Plan {
        found: Option<&'f Found>,
        specs: Vec<Spec>,
        packed: usize,
    },
    /// Reads every matrix into `staging` (a whole block matrix, or a slab
    /// of the LM head) and packs it into `panels` (the anonymous map, not
    /// yet shared).
    Pack {
        found: &'f Found,
        panels: &'f mut [u8],
        offset: usize,
        staging: Vec<f32>,
    },
    /// Takes the tensors out of the file's set (the kept ones were read
    /// when the header was checked); the matrices become views of the
    /// packed map, in the order they were packed.
    Take {
        found: Found,
        map: Arc<Mmap>,
        offset: usize,
        params: Vec<(String, Param)>,
    },
}

/// A tensor name the checkpoint may hold.
struct Spec {
    name: String,
    shape: Vec<usize>,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Required, and kept as stored (read into memory as the file's tensors
    /// are listed).
    Required,
    /// Required, and read only to be packed (not kept as stored).
    Matrix,
    /// A matrix the file may lack (`lm_head.weight`).
    Optional,
    /// Not a weight: skipped when present (the hub's mask buffers).
    Skip,
}

/// The checked tensors of a file, by canonical name, with the name as written.
struct Found {
    path: PathBuf,
    prefixed: bool,
    tensors: HashMap<String, (String, Tensor)>,
}

impl Found {
    fn missing(&self, canonical: &str) -> Error {
        Error::MissingTensor {
            path: self.path.clone(),
            tensor: if self.prefixed {
                format!("transformer.{canonical}")
            } else {
                canonical.to_owned()
            },
        }
    }
}

impl<'s, 'f> Vb<'s, 'f> {
    fn new(store: &'s RefCell<Store<'f>>, dtype: Dtype) -> Self {
        Vb {
            prefix: String::new(),
            store,
            dtype,
        }
    }

    /// The builder for names under `prefix.`.
    fn pp(&self, prefix: &str) -> Self {
        Vb {
            prefix: self.name(prefix),
            store: self.store,
            dtype: self.dtype,
        }
    }

    fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let name = self.name(name);
        self.get(&name, shape, Kind::Required)
            .ok_or_else(|| self.missing(&name))
    }

    /// A matrix read only to be packed: never kept as stored.
    fn matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let name = self.name(name);
        self.get(&name, shape, Kind::Matrix)
            .ok_or_else(|| self.missing(&name))
    }

    /// A matrix that was fetched to be packed but is kept as stored after
    /// all (an untied `wte`): read into memory when taken.
    fn keep(&self, t: Tensor) -> Result<Tensor> {
        match &mut *self.store.borrow_mut() {
            Store::Take { params, .. } => {
                let kept = t.owned()?;
                if let Some(entry) = params.iter_mut().rev().find(|(name, _)| *name == kept.name) {
                    entry.1 = Param::Tensor(kept.clone());
                }
                Ok(kept)
            }
            _ => Ok(t),
        }
    }

    fn optional(&self, name: &str, shape: &[usize]) -> Option<Tensor> {
        self.get(&self.name(name), shape, Kind::Optional)
    }

    /// A name that is not a weight, skipped if the file has it.
    fn skip(&self, name: &str) {
        if let Store::Plan { specs, .. } = &mut *self.store.borrow_mut() {
            specs.push(Spec {
                name: self.name(name),
                shape: Vec::new(),
                kind: Kind::Skip,
            });
        }
    }

    /// The tensor `name` of the file, if it has it; planned without a file,
    /// a placeholder for every required one.
    fn get(&self, name: &str, shape: &[usize], kind: Kind) -> Option<Tensor> {
        let shared = |found: &Found| found.tensors.get(name).map(|(_, t)| t.clone());
        match &mut *self.store.borrow_mut() {
            Store::Plan { found, specs, .. } => {
                specs.push(Spec {
                    name: name.to_owned(),
                    shape: shape.to_vec(),
                    kind,
                });
                match found {
                    Some(found) => shared(found),
                    None => matches!(kind, Kind::Required | Kind::Matrix)
                        .then(|| Tensor::placeholder(name.to_owned(), shape)),
                }
            }
            Store::Pack { found, .. } => shared(found),
            Store::Take { found, params, .. } => {
                // What the model keeps was read into memory (`load`), so
                // once loaded nothing reads the file. Matrices are not kept;
                // `pack` replaces them by their panels.
                let (_, t) = found.tensors.remove(name)?;
                debug_assert!(kind != Kind::Required || !t.in_file(), "{name} was not read");
                params.push((name.to_owned(), Param::Tensor(t.clone())));
                Some(t)
            }
        }
    }

    /// The error for a required tensor the file lacks.
    fn missing(&self, name: &str) -> Error {
        match &*self.store.borrow() {
            Store::Plan {
                found: Some(found), ..
            }
            | Store::Pack { found, .. } => found.missing(name),
            Store::Take { found, .. } => found.missing(name),
            Store::Plan { found: None, .. } => unreachable!("a plan without a file misses nothing"),
        }
    }

    /// The layer norm `name.weight`, `name.bias`, both `(c)`.
    fn layer_norm(&self, name: &str, c: usize, eps: f32) -> Result<LayerNorm> {
        let vb = self.pp(name);
        Ok(LayerNorm::new(
            vb.tensor("weight", &[c])?,
            vb.tensor("bias", &[c])?,
            eps,
        ))
    }

    /// The linear layer `name.weight (k, n)`, `name.bias (n)`, packed.
    fn linear(&self, name: &str, k: usize, n: usize, op: Op) -> Result<PackedLinear> {
        let vb = self.pp(name);
        let panels = self.pack(vb.matrix("weight", &[k, n])?, k, n, false)?;
        let bias = vb.tensor("bias", &[n])?;
        Ok(PackedLinear::new(panels, Some(bias), k, n, op))
    }

    /// A linear layer without bias over `weight` stored `(n, k)`: the LM head.
    fn linear_t(&self, weight: Tensor, op: Op) -> Result<PackedLinear> {
        let (n, k) = (weight.shape()[0], weight.shape()[1]);
        Ok(PackedLinear::new(self.pack(weight, k, n, true)?, None, k, n, op))
    }

    /// `weight` as a `[k, n]` matrix (stored `[n, k]` if `transposed`) in
    /// the next panels of the packed map.
    fn pack(&self, weight: Tensor, k: usize, n: usize, transposed: bool) -> Result<Packed> {
        let dtype = self.dtype;
        let bytes = packed_bytes(dtype, k, n);
        // Each matrix starts a cache line.
        let len = bytes.next_multiple_of(64);
        let mut packed = Packed {
            map: None,
            start: 0,
            dtype,
            k,
            n,
        };
        match &mut *self.store.borrow_mut() {
            Store::Plan { packed: total, .. } => {
                *total += len;
                Ok(packed)
            }
            Store::Pack {
                panels,
                offset,
                staging,
                ..
            } => {
                let dst = &mut panels[*offset..*offset + bytes];
                if transposed {
                    // The LM head (wte, 154 MB for GPT-2) a slab of panels at
                    // a time: memory never holds the whole stored matrix
                    // beside its panels. Panel p gathers stored rows 48p..,
                    // so slabs of whole panels pack exactly as one call.
                    const SLAB: usize = 64 * PANEL;
                    for from in (0..n).step_by(SLAB) {
                        let to = (from + SLAB).min(n);
                        let wt = weight.read(from * k, to * k, staging)?;
                        pack_t(PanelsMut::from_bytes(dtype, dst, k, n), wt, k, n, from..to);
                    }
                } else {
                    // Whole: int8 takes each column's scale from all its rows.
                    let w = weight.read(0, k * n, staging)?;
                    pack(PanelsMut::from_bytes(dtype, dst, k, n), w, k, n);
                }
                *offset += len;
                Ok(packed)
            }
            Store::Take {
                map, offset, params, ..
            } => {
                (packed.map, packed.start) = (Some(Arc::clone(map)), *offset);
                *offset += len;
                let view = Param::Panels {
                    panels: packed.clone(),
                    transposed,
                };
                if let Some(entry) = params.iter_mut().rev().find(|(name, _)| *name == weight.name) {
                    entry.1 = view;
                }
                Ok(packed)
            }
        }
    }
}

/// The names [`gpt2`] and [`block`] give, for looking up one name at a time:
/// a config.json claiming billions of layers then costs nothing before the
/// file disagrees.
struct Schema {
    top: Vec<Spec>,   // outside the blocks
    block: Vec<Spec>, // after `h.{i}.`
    n_layer: usize,
}

impl Schema {
    fn new(config: &Gpt2Config) -> Self {
        Schema {
            top: plan(|vb| gpt2(vb, config, 0).map(drop)),
            block: plan(|vb| block(vb, config).map(drop)),
            n_layer: config.n_layer,
        }
    }

    /// The spec of `canonical`, or `None` if such a checkpoint has no tensor
    /// of that name.
    fn get(&self, canonical: &str) -> Option<&Spec> {
        let (specs, name) = match layer_field(canonical, self.n_layer) {
            Some(field) => (&self.block, field),
            None => (&self.top, canonical),
        };
        specs.iter().find(|s| s.name == name)
    }

    /// The shape the tensor `canonical` must have (`lm_head.weight` included).
    fn expected_shape(&self, canonical: &str) -> Option<&[usize]> {
        self.get(canonical)
            .filter(|s| s.kind != Kind::Skip)
            .map(|s| &s.shape[..])
    }

    /// Whether `canonical` is one of the buffers skipped when present.
    fn is_skipped(&self, canonical: &str) -> bool {
        self.get(canonical).is_some_and(|s| s.kind == Kind::Skip)
    }
}

/// The specs `f` names, without a file.
fn plan(f: impl FnOnce(&Vb) -> Result<()>) -> Vec<Spec> {
    let store = RefCell::new(Store::Plan {
        found: None,
        specs: Vec::new(),
        packed: 0,
    });
    f(&Vb::new(&store, Dtype::F32)).expect("a plan without a file misses nothing");
    match store.into_inner() {
        Store::Plan { specs, .. } => specs,
        _ => unreachable!("the store stays a plan"),
    }
}

/// The shape of every tensor a checkpoint of this config must hold, by
/// canonical name (without the `transformer.` prefix). Public so that the
/// synthetic generator writes exactly what the loader expects.
pub fn expected_shapes(config: &Gpt2Config) -> BTreeMap<String, Vec<usize>> {
    plan(|vb| gpt2(vb, config, config.n_layer).map(drop))
        .into_iter()
        .filter(|s| matches!(s.kind, Kind::Required | Kind::Matrix))
        .map(|s| (s.name, s.shape))
        .collect()
}

/// For `h.{i}.{field}` with a canonically written `i < n_layer` (not `h.01`
/// or `h.+1`, which `parse` would accept), the `field`.
fn layer_field(canonical: &str, n_layer: usize) -> Option<&str> {
    let (index, field) = canonical.strip_prefix("h.")?.split_once('.')?;
    let i: usize = index.parse().ok()?;
    (i < n_layer && i.to_string() == index).then_some(field)
}

/// Reads `path`'s header, checks every tensor against `config`, and reads
/// the tensors: the kept ones whole, the matrices into their panels.
pub fn load(path: &Path, config: &Gpt2Config, dtype: Dtype) -> Result<Weights> {
    // A FIFO would block the open; a device has no length to read up to.
    crate::files::check_regular(path)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    // Every fault of the header named by its tensor, and no key twice; then
    // the `safetensors` crate's own parse of it.
    let (data_start, metadata) = crate::header::read(path, &file, size)?;
    let source = Arc::new(Source {
        file,
        path: path.to_owned(),
    });
    let schema = Schema::new(config);

    // In file order, so that of several faults the first one is reported,
    // the same one on every run (the header's map has no order).
    let mut infos: Vec<_> = metadata.tensors().into_iter().collect();
    infos.sort_by(|(a, x), (b, y)| (x.data_offsets.0, a).cmp(&(y.data_offsets.0, b)));
    let mut found = Found {
        path: path.to_owned(),
        prefixed: false,
        tensors: HashMap::new(),
    };
    for (name, info) in infos {
        let canonical = match name.strip_prefix("transformer.") {
            Some(rest) => {
                found.prefixed = true;
                rest
            }
            None => &name,
        };
        if schema.is_skipped(canonical) {
            continue;
        }
        let Some(shape) = schema.expected_shape(canonical) else {
            return Err(Error::UnknownTensor {
                path: path.to_owned(),
                tensor: name,
            });
        };
        let stored = match info.dtype {
            FileDtype::F32 => Stored::F32,
            FileDtype::BF16 => Stored::Bf16,
            FileDtype::F16 => Stored::F16,
            other => {
                return Err(Error::Dtype {
                    path: path.to_owned(),
                    tensor: name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        if info.shape != shape {
            return Err(Error::Shape {
                path: path.to_owned(),
                tensor: name,
                expected: shape.to_vec(),
                got: info.shape.clone(),
            });
        }
        if let Some((first, _)) = found.tensors.get(canonical) {
            return Err(Error::DuplicateTensor {
                path: path.to_owned(),
                tensor: canonical.to_owned(),
                first: first.clone(),
                second: name,
            });
        }
        let tensor = Tensor {
            storage: Storage::File {
                file: Arc::clone(&source),
                offset: data_start + info.data_offsets.0 as u64,
                stored,
            },
            shape: shape.to_vec(),
            name: canonical.to_owned(),
        };
        // What the model keeps as stored (biases, norms, `wpe`: small) is
        // read now; the matrices when they are packed.
        let kept = schema.get(canonical).is_some_and(|s| s.kind == Kind::Required);
        let tensor = if kept { tensor.owned()? } else { tensor };
        let canonical = canonical.to_owned();
        found.tensors.insert(canonical, (name, tensor));
    }

    // Every tensor present (the first missing one, in checkpoint order, is
    // the error), and the size of the panels.
    let plan = RefCell::new(Store::Plan {
        found: Some(&found),
        specs: Vec::new(),
        packed: 0,
    });
    gpt2(&Vb::new(&plan, dtype), config, config.n_layer)?;
    let Store::Plan { packed: total, .. } = plan.into_inner() else {
        unreachable!("the store stays a plan")
    };

    // At least one byte: a zero-length map is refused.
    let mut anon = MmapMut::map_anon(total.max(1)).map_err(|e| Error::io(path, e))?;
    // Huge pages spare the streaming kernels a TLB miss every 4 KiB; without
    // them (THP off) the kernels are a little slower, not wrong.
    #[cfg(target_os = "linux")]
    let _ = anon.advise(memmap2::Advice::HugePage);
    let pack = RefCell::new(Store::Pack {
        found: &found,
        panels: &mut anon[..],
        offset: 0,
        staging: Vec::new(),
    });
    gpt2(&Vb::new(&pack, dtype), config, config.n_layer)?;
    drop(pack);

    let take = RefCell::new(Store::Take {
        found,
        map: Arc::new(anon.make_read_only().map_err(|e| Error::io(path, e))?),
        offset: 0,
        params: Vec::new(),
    });
    let weights = gpt2(&Vb::new(&take, dtype), config, config.n_layer)?;
    let Store::Take { params, .. } = take.into_inner() else {
        unreachable!("the store stays a take")
    };
    // Nothing the model keeps reads the file any more: it is closed here.
    debug_assert_eq!(
        Arc::strong_count(&source),
        1,
        "a tensor still reads from the file"
    );
    drop(source);
    Ok(Weights {
        params,
        packed_bytes: total,
        dtype,
        ..weights
    })
}

/// The two files of a Hugging Face checkpoint directory.
pub fn checkpoint_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("config.json"), dir.join("model.safetensors"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file cut short under the loader (after its header was checked
    /// against its length) is a read error naming the file: it was a fault
    /// (SIGBUS) while the file was mapped. Every stored format, and a read
    /// spanning several pieces.
    #[test]
    fn a_file_shorter_than_its_tensors_is_a_named_read_error() {
        let dir = std::env::temp_dir().join(format!("gpt2-weights-short-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        std::fs::write(&path, vec![0u8; 4 * READ_PIECE + 100]).unwrap();
        let source = Arc::new(Source {
            file: File::open(&path).unwrap(),
            path: path.clone(),
        });
        for (stored, len) in [
            (Stored::F32, 2 * READ_PIECE),
            (Stored::Bf16, 3 * READ_PIECE),
            (Stored::F16, 3 * READ_PIECE),
        ] {
            let tensor = Tensor {
                storage: Storage::File {
                    file: Arc::clone(&source),
                    offset: 64,
                    stored,
                },
                shape: vec![len],
                name: "wte.weight".into(),
            };
            let mut buf = Vec::new();
            // The first pieces are there; the last one runs past the end.
            let ok = len - READ_PIECE;
            assert!(tensor.read(0, ok, &mut buf).is_ok(), "{stored:?}");
            let err = tensor.read(0, len, &mut buf).unwrap_err();
            assert!(
                matches!(&err, Error::Io { path: p, source } if *p == path
                    && source.kind() == std::io::ErrorKind::UnexpectedEof),
                "{stored:?}: {err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_canonical_layer_names_are_mask_buffers() {
        let config = Gpt2Config::from_json(
            r#"{"model_type":"gpt2","n_layer":2,"n_head":2,"n_embd":8,"n_positions":16,"vocab_size":32}"#,
        )
        .unwrap();
        let schema = Schema::new(&config);
        assert!(schema.is_skipped("h.1.attn.bias") && schema.is_skipped("h.0.attn.masked_bias"));
        for name in [
            "h.+1.attn.bias",
            "h.01.attn.bias",
            "h.2.attn.bias",
            "h.1.attn.c_attn.bias",
            "h..attn.bias",
        ] {
            assert!(!schema.is_skipped(name), "{name}");
        }
    }
}
