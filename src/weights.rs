//! Loading `model.safetensors`, in four steps:
//!
//! 1. **The table.** [`Specs`] lists the name, shape and role of every
//!    tensor the config implies, from the config alone.
//! 2. **The check.** The header is read with two bounded reads and checked
//!    entry by entry ([`crate::header`]: dtype, shape and byte range against
//!    each other and the file); then every tensor of the file against the
//!    table (a name it lists, a float dtype, the shape it expects), in file
//!    order, and every tensor the table requires looked for, in checkpoint
//!    order. Errors say the tensor, expected and got. No weight is read, and
//!    nothing is allocated for them, before the whole file has passed.
//! 3. **One pass** over the table, in checkpoint order, reads each tensor
//!    once, with bounded reads (`pread`, a `READ_PIECE` at a time, in
//!    parallel) of exactly its bytes; F32, BF16 and F16 are widened to f32
//!    exactly:
//!    - *copied*: the norms, the biases and `wpe` (and `wte` when the
//!      checkpoint has an LM head of its own) are read into f32 memory this
//!      process owns, which the layers keep ([`Tensor`]);
//!    - *packed*: the four matrices of every block and the LM head (`wte`,
//!      or `lm_head.weight`, transposed) are read through one reused staging
//!      buffer (a whole block matrix, or a slab of the head's rows) and packed
//!      in the run's [`Dtype`] into the column panels of
//!      [`gpt2_kernels::pack_panels`], in one anonymous map (huge pages where
//!      the OS grants them), which the kernels stream in order. Nothing keeps
//!      the stored matrices: the load holds the map, the copies and that one
//!      buffer.
//! 4. **The hand-over.** The file is closed (its handle is dropped when the
//!    pass ends, before [`load`] returns), the map is made read-only and
//!    shared, and each linear layer gets its view of it ([`Packed`]).
//!
//! The file is never memory-mapped and nothing is zero-copy: every weight a
//! model holds is a copy or a packing in memory of its own, so how the OS
//! caches the file's pages never shows in this process's resident memory,
//! and once loaded nothing reads the file again.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gpt2_kernels::{pack, pack_t, packed_bytes, Dtype, Panels, PanelsMut, PANEL};
use memmap2::{Mmap, MmapMut};
use rayon::prelude::*;
use safetensors::tensor::Metadata;
use safetensors::Dtype as FileDtype;

use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::layers::{Embeddings, LayerNorm, PackedLinear};
use crate::profile::Op;
use crate::specs::{block, panel_len, Prefix, Role, Specs, Tensors, LM_HEAD, LN_F, WPE, WTE};

pub use crate::layers::Block;
pub use crate::specs::expected_shapes;
pub use crate::tensor::{Packed, Tensor};

/// The values one read fetches (1 MiB of f32): the pieces of a tensor are
/// read in parallel, as many at once as the pool has threads.
const READ_PIECE: usize = 1 << 18;

#[cfg(target_endian = "big")]
compile_error!("safetensors stores little-endian floats; big-endian hosts are not supported");

/// All weights of a GPT-2 checkpoint.
pub struct Weights {
    pub embed: Embeddings,     // wte (V, C), wpe (P, C)
    pub blocks: Vec<Block>,    // L blocks
    pub ln_f: LayerNorm,       // (C), (C)
    pub lm_head: PackedLinear, // (C, V), no bias: wteᵀ, or lm_head.weightᵀ when untied
    /// Every tensor by canonical name, in checkpoint order, as
    /// [`Weights::check_finite`] reads it.
    params: Vec<(String, Param)>,
    /// The panel map every [`Packed`] views.
    map: Arc<Mmap>,
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
        at: PanelsAt,
        transposed: bool,
    },
}

impl Weights {
    /// Fails on the first NaN or infinity in any tensor, in checkpoint order
    /// (a full pass over the weights). A block matrix or the LM head is
    /// scanned in its panels, which hold the same values (plus zero padding)
    /// and are what the kernels read.
    pub fn check_finite(&self, path: &Path) -> Result<()> {
        for (name, param) in &self.params {
            let found = match param {
                Param::Tensor(t) => first_non_finite(t),
                Param::Panels { at, transposed } => {
                    first_non_finite_packed(&at.view(&self.map, self.dtype), *transposed)
                }
            };
            if let Some((index, value)) = found {
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

/// The first NaN or infinity of `t`, by row-major index. A branch-free scan
/// (exponent bits all ones), in parallel, first; the element is located only
/// after.
fn first_non_finite(t: &Tensor) -> Option<(usize, f32)> {
    if !Panels::F32(t.data()).any_non_finite() {
        return None;
    }
    t.data().iter().copied().enumerate().find(|(_, v)| !v.is_finite())
}

/// The first NaN or infinity of the matrix in `packed`, by its row-major
/// index in the tensor as stored in the file (`transposed`: stored `[N, K]`).
/// In a matrix converted to int8, a column with one has a non-finite scale:
/// its first element is reported.
fn first_non_finite_packed(packed: &Packed, transposed: bool) -> Option<(usize, f32)> {
    let panels = packed.panels();
    if !panels.any_non_finite() {
        return None;
    }
    let (k, n) = packed.dims();
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

/// The open checkpoint: read by the check and the pass, closed when the
/// pass ends.
struct Checkpoint {
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
    fn of(dtype: FileDtype) -> Option<Self> {
        match dtype {
            FileDtype::F32 => Some(Stored::F32),
            FileDtype::BF16 => Some(Stored::Bf16),
            FileDtype::F16 => Some(Stored::F16),
            _ => None,
        }
    }

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

/// A checked tensor of the file: where its values lie, in what format, and
/// its shape (the one the table expects).
struct Entry {
    /// Byte of the file where the values start.
    offset: u64,
    stored: Stored,
    shape: Vec<usize>,
}

impl Entry {
    /// Elements.
    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values `from..to` (in elements) as f32, read from `file` into the
    /// front of `buf` (grown if shorter, never shrunk or cleared: every value
    /// is overwritten): reads of exactly those bytes, a [`READ_PIECE`] at a
    /// time on the caller's rayon pool, whatever the tensor's size.
    fn read<'b>(
        &self,
        file: &Checkpoint,
        from: usize,
        to: usize,
        buf: &'b mut Vec<f32>,
    ) -> Result<&'b [f32]> {
        if buf.len() < to - from {
            buf.resize(to - from, 0.0);
        }
        let out = &mut buf[..to - from];
        let (stored, size) = (self.stored, self.stored.bytes());
        out.par_chunks_mut(READ_PIECE)
            .enumerate()
            .try_for_each(|(i, piece)| {
                let at = self.offset + ((from + i * READ_PIECE) * size) as u64;
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
}

/// The checked tensors of a file, by canonical name, each with its name as
/// written.
struct Found {
    path: PathBuf,
    /// Whether the file writes names with `transformer.`.
    prefixed: bool,
    entries: HashMap<String, (String, Entry)>,
}

impl Found {
    /// The error for a required tensor the file lacks, named as the file
    /// would write it.
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

/// Checks every tensor of the header (`metadata`, whose offsets count from
/// byte `data_start` of `path`) against `specs`, in file order, so that of
/// several faults the first one is reported, the same one on every run (the
/// header's map has no order); then looks for every tensor `specs` requires,
/// in checkpoint order (the first missing one is the error).
fn check(path: &Path, data_start: u64, metadata: &Metadata, specs: &Specs) -> Result<Found> {
    let mut infos: Vec<_> = metadata.tensors().into_iter().collect();
    infos.sort_by(|(a, x), (b, y)| (x.data_offsets.0, a).cmp(&(y.data_offsets.0, b)));
    let mut found = Found {
        path: path.to_owned(),
        prefixed: false,
        entries: HashMap::new(),
    };
    for (name, info) in infos {
        let canonical = match name.strip_prefix("transformer.") {
            Some(rest) => {
                found.prefixed = true;
                rest
            }
            None => &name,
        };
        let spec = specs.get(canonical);
        if spec.is_some_and(|s| s.role == Role::Skipped) {
            continue;
        }
        let Some(spec) = spec else {
            return Err(Error::UnknownTensor {
                path: path.to_owned(),
                tensor: name,
            });
        };
        let Some(stored) = Stored::of(info.dtype) else {
            return Err(Error::Dtype {
                path: path.to_owned(),
                tensor: name,
                dtype: format!("{:?}", info.dtype),
            });
        };
        if info.shape != spec.shape {
            return Err(Error::Shape {
                path: path.to_owned(),
                tensor: name,
                expected: spec.shape.clone(),
                got: info.shape.clone(),
            });
        }
        if let Some((first, _)) = found.entries.get(canonical) {
            return Err(Error::DuplicateTensor {
                path: path.to_owned(),
                tensor: canonical.to_owned(),
                first: first.clone(),
                second: name,
            });
        }
        let entry = Entry {
            offset: data_start + info.data_offsets.0 as u64,
            stored,
            shape: spec.shape.clone(),
        };
        found.entries.insert(canonical.to_owned(), (name, entry));
    }
    let mut required = specs.iter().filter(|(_, s)| s.required());
    if let Some((name, _)) = required.find(|(name, _)| !found.entries.contains_key(name)) {
        return Err(found.missing(&name));
    }
    Ok(found)
}

/// Where a `[k, n]` matrix's panels lie in the panel map, from byte `start`.
#[derive(Clone, Copy)]
struct PanelsAt {
    start: usize,
    k: usize,
    n: usize,
}

impl PanelsAt {
    /// The view of these panels in `map` (the panel map, made read-only).
    fn view(self, map: &Arc<Mmap>, dtype: Dtype) -> Packed {
        Packed::new(Arc::clone(map), self.start, dtype, self.k, self.n)
    }
}

/// A linear layer as the pass leaves it: its bias read, its panels written
/// but the map not yet shared.
struct PendingLinear {
    panels: PanelsAt,
    bias: Option<Tensor>,
    op: Op,
}

impl PendingLinear {
    /// The layer, viewing its panels in `map`.
    fn attach(self, map: &Arc<Mmap>, dtype: Dtype) -> PackedLinear {
        let (k, n) = (self.panels.k, self.panels.n);
        PackedLinear::new(self.panels.view(map, dtype), self.bias, k, n, self.op)
    }
}

/// What the pass read: every layer, the linear ones pending.
struct Read {
    /// `wte` as stored, when the LM head is the checkpoint's own.
    wte: Option<Tensor>,
    wpe: Tensor,
    blocks: Vec<Block<LayerNorm, PendingLinear>>,
    ln_f: LayerNorm,
    lm_head: PendingLinear,
}

/// The one pass: reads each tensor it is asked for from the file, once, and
/// copies it into memory or packs it into the next panels of the map. The
/// checked entries are taken out of `found` as they are read.
struct Reader<'f> {
    file: &'f Checkpoint,
    found: Found,
    /// The panel map, being written.
    panels: &'f mut [u8],
    /// Where the next matrix's panels start in `panels`.
    next: usize,
    dtype: Dtype,
    /// Reused for every matrix read to be packed.
    staging: Vec<f32>,
    params: Vec<(String, Param)>,
}

impl Reader<'_> {
    /// Reads every tensor of the table, in its order. `tied`: the file has
    /// no [`LM_HEAD`], so `wte` is packed as the LM head.
    fn read(&mut self, config: &Gpt2Config, tied: bool) -> Result<Read> {
        let (wte, head) = if tied {
            (None, Some(self.pack(WTE.into(), true)?))
        } else {
            (Some(self.copy(WTE.into())?), None)
        };
        let wpe = self.copy(WPE.into())?;
        // The check found every block the config names in the file.
        let mut blocks = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            blocks.push(block(self, &Prefix::new(format!("h.{i}")), config)?);
        }
        let ln_f = self.norm(&Prefix::new(LN_F), config.n_embd, config.layer_norm_epsilon)?;
        let panels = match head {
            Some(wte) => wte,
            None => self.pack(LM_HEAD.into(), true)?,
        };
        Ok(Read {
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head: PendingLinear {
                panels,
                bias: None,
                op: Op::LmHead,
            },
        })
    }

    /// The checked entry of `name`. Every tensor the table requires was found
    /// by [`check`], so a missing one is the same error it would give.
    fn take(&mut self, name: &str) -> Result<Entry> {
        match self.found.entries.remove(name) {
            Some((_, entry)) => Ok(entry),
            None => Err(self.found.missing(name)),
        }
    }

    /// The tensor `name`, copied into memory as f32.
    fn copy(&mut self, name: String) -> Result<Tensor> {
        let entry = self.take(&name)?;
        let mut values = Vec::new();
        entry.read(self.file, 0, entry.len(), &mut values)?;
        let tensor = Tensor::new(name.clone(), entry.shape, values);
        self.params.push((name, Param::Tensor(tensor.clone())));
        Ok(tensor)
    }

    /// The matrix `name` packed into the next panels of the map: stored
    /// `[k, n]`, or `[n, k]` if `transposed` (the LM head, `[C, V]` as
    /// `wteᵀ`).
    fn pack(&mut self, name: String, transposed: bool) -> Result<PanelsAt> {
        let entry = self.take(&name)?;
        let (rows, cols) = (entry.shape[0], entry.shape[1]);
        let (k, n) = if transposed { (cols, rows) } else { (rows, cols) };
        let dtype = self.dtype;
        let dst = &mut self.panels[self.next..self.next + packed_bytes(dtype, k, n)];
        if transposed {
            // The LM head (wte, 154 MB for GPT-2) a slab of panels at a
            // time: memory never holds the whole stored matrix beside its
            // panels. Panel p gathers stored rows 48p.., so slabs of whole
            // panels pack exactly as one call.
            const SLAB: usize = 64 * PANEL;
            for from in (0..n).step_by(SLAB) {
                let to = (from + SLAB).min(n);
                let wt = entry.read(self.file, from * k, to * k, &mut self.staging)?;
                pack_t(PanelsMut::from_bytes(dtype, dst, k, n), wt, k, n, from..to);
            }
        } else {
            // Whole: int8 takes each column's scale from all its rows.
            let w = entry.read(self.file, 0, k * n, &mut self.staging)?;
            pack(PanelsMut::from_bytes(dtype, dst, k, n), w, k, n);
        }
        let at = PanelsAt {
            start: self.next,
            k,
            n,
        };
        self.next += panel_len(dtype, k, n);
        self.params.push((name, Param::Panels { at, transposed }));
        Ok(at)
    }
}

/// The pass reads a block's layers through [`block`]: the names and the
/// order are the table's.
impl Tensors for Reader<'_> {
    type Norm = LayerNorm;
    type Linear = PendingLinear;
    type Error = Error;

    fn norm(&mut self, p: &Prefix, _c: usize, eps: f32) -> Result<LayerNorm> {
        let gamma = self.copy(p.name("weight"))?;
        Ok(LayerNorm::new(gamma, self.copy(p.name("bias"))?, eps))
    }

    fn linear(&mut self, p: &Prefix, _k: usize, _n: usize, op: Op) -> Result<PendingLinear> {
        let panels = self.pack(p.name("weight"), false)?;
        let bias = Some(self.copy(p.name("bias"))?);
        Ok(PendingLinear { panels, bias, op })
    }

    /// Skipped tensors were left out by [`check`]: nothing to read.
    fn skip(&mut self, _name: String) {}
}

/// Reads `path`'s header, checks every tensor against the table for
/// `config`, and reads the tensors in one pass: the kept ones copied, the
/// matrices packed in `dtype` (see the module doc).
pub fn load(path: &Path, config: &Gpt2Config, dtype: Dtype) -> Result<Weights> {
    // A FIFO would block the open; a device has no length to read up to.
    crate::files::check_regular(path)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    // Every fault of the header named by its tensor, and no key twice; then
    // the `safetensors` crate's own parse of it.
    let (data_start, metadata) = crate::header::read(path, &file, size)?;
    let file = Checkpoint {
        file,
        path: path.to_owned(),
    };
    let specs = Specs::new(config);
    let found = check(path, data_start, &metadata, &specs)?;

    let tied = !found.entries.contains_key(LM_HEAD);
    let total: usize = specs
        .iter()
        .filter_map(|(_, s)| s.panels(tied))
        .map(|(k, n)| panel_len(dtype, k, n))
        .sum();
    // At least one byte: a zero-length map is refused.
    let mut anon = MmapMut::map_anon(total.max(1)).map_err(|e| Error::io(path, e))?;
    // Huge pages spare the streaming kernels a TLB miss every 4 KiB; without
    // them (THP off) the kernels are a little slower, not wrong.
    #[cfg(target_os = "linux")]
    let _ = anon.advise(memmap2::Advice::HugePage);

    let mut reader = Reader {
        file: &file,
        found,
        panels: &mut anon[..],
        next: 0,
        dtype,
        staging: Vec::new(),
        params: Vec::new(),
    };
    let read = reader.read(config, tied)?;
    let Reader { next, params, .. } = reader;
    debug_assert_eq!(next, total, "the table and the pass disagree on the panels");
    // Nothing the model keeps reads the file: it is closed here.
    drop(file);

    let map = Arc::new(anon.make_read_only().map_err(|e| Error::io(path, e))?);
    let lm_head = read.lm_head.attach(&map, dtype);
    let embed = match read.wte {
        Some(wte) => Embeddings::untied(wte, read.wpe),
        None => Embeddings::tied(lm_head.panels().clone(), read.wpe),
    };
    let blocks = read.blocks.into_iter();
    Ok(Weights {
        embed,
        blocks: blocks.map(|b| b.map_linear(|l| l.attach(&map, dtype))).collect(),
        ln_f: read.ln_f,
        lm_head,
        params,
        map,
        packed_bytes: total,
        dtype,
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
        let file = Checkpoint {
            file: File::open(&path).unwrap(),
            path: path.clone(),
        };
        for (stored, len) in [
            (Stored::F32, 2 * READ_PIECE),
            (Stored::Bf16, 3 * READ_PIECE),
            (Stored::F16, 3 * READ_PIECE),
        ] {
            let entry = Entry {
                offset: 64,
                stored,
                shape: vec![len],
            };
            let mut buf = Vec::new();
            // The first pieces are there; the last one runs past the end.
            let ok = len - READ_PIECE;
            assert!(entry.read(&file, 0, ok, &mut buf).is_ok(), "{stored:?}");
            let err = entry.read(&file, 0, len, &mut buf).unwrap_err();
            assert!(
                matches!(&err, Error::Io { path: p, source } if *p == path
                    && source.kind() == std::io::ErrorKind::UnexpectedEof),
                "{stored:?}: {err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
