//! Loading `model.safetensors`: memory-mapped, every tensor checked (name,
//! dtype, shape) against the config, and borrowed as `&[f32]` straight from the
//! map. A tensor is copied only when its bytes are not 4-byte aligned.
//!
//! The four `[K, N]` matrices of every block, and the LM head (`wte`
//! transposed), are also packed once, at load, in the column panels of
//! [`gpt2_kernels::pack_panels`] (anonymous memory, huge pages where the OS
//! grants them), which the kernels stream in order: decode reads them 1.1-1.5x
//! faster than in the stored layout (`cargo bench -p gpt2-kernels`). The map's
//! pages of those tensors are then handed back to the OS, so the packed copy
//! does not double the resident memory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::Gpt2Config;
use crate::error::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!("safetensors stores little-endian floats; big-endian hosts are not supported");

/// One f32 tensor, either borrowed from the memory map or owned.
pub struct Tensor {
    storage: Storage,
    shape: Vec<usize>,
}

enum Storage {
    /// `len` floats at byte offset `start` of the map (4-byte aligned).
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    /// A copy, made when the bytes in the file were misaligned.
    Owned(Vec<f32>),
}

impl Tensor {
    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        match &self.storage {
            // Alignment was checked when the tensor was made, so this cannot fail.
            Storage::Mapped { map, start, len } => bytemuck::cast_slice(&map[*start..*start + len * 4]),
            Storage::Owned(v) => v,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Whether the values are read in place from the memory map.
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }
}

/// A `[K, N]` weight packed in column panels for [`gpt2_kernels::linear_packed`].
pub struct Packed {
    map: Arc<Mmap>,
    start: usize, // in floats
    len: usize,
}

impl Packed {
    /// The panels: `gpt2_kernels::packed_len(K, N)` floats.
    pub fn data(&self) -> &[f32] {
        // The map is page-aligned and `start` a whole number of floats.
        &bytemuck::cast_slice(&self.map[..])[self.start..self.start + self.len]
    }
}

/// The packed matrices of one block, read by the forward pass.
pub struct PackedLayer {
    pub attn_qkv: Packed,  // (C, 3C)
    pub attn_proj: Packed, // (C, C)
    pub mlp_fc: Packed,    // (C, F)
    pub mlp_proj: Packed,  // (F, C)
}

impl PackedLayer {
    /// The four matrices, in the order of [`LayerWeights::matrices`].
    fn matrices(&self) -> [&Packed; 4] {
        [&self.attn_qkv, &self.attn_proj, &self.mlp_fc, &self.mlp_proj]
    }
}

/// The weights of one transformer block. Conv1D weights are `[in, out]`.
pub struct LayerWeights {
    pub ln_1_g: Tensor,      // (C)
    pub ln_1_b: Tensor,      // (C)
    pub attn_qkv_w: Tensor,  // (C, 3C)   `attn.c_attn.weight`
    pub attn_qkv_b: Tensor,  // (3C)
    pub attn_proj_w: Tensor, // (C, C)    `attn.c_proj.weight`
    pub attn_proj_b: Tensor, // (C)
    pub ln_2_g: Tensor,      // (C)
    pub ln_2_b: Tensor,      // (C)
    pub mlp_fc_w: Tensor,    // (C, F)    `mlp.c_fc.weight`, F = n_inner
    pub mlp_fc_b: Tensor,    // (F)
    pub mlp_proj_w: Tensor,  // (F, C)    `mlp.c_proj.weight`
    pub mlp_proj_b: Tensor,  // (C)
}

impl LayerWeights {
    /// The four `[K, N]` matrices, in the order of [`PackedLayer`]'s fields.
    fn matrices(&self) -> [&Tensor; 4] {
        [
            &self.attn_qkv_w,
            &self.attn_proj_w,
            &self.mlp_fc_w,
            &self.mlp_proj_w,
        ]
    }
}

/// All weights of a GPT-2 checkpoint.
pub struct Weights {
    pub wte: Tensor, // (V, C) token embedding, also the tied LM head
    pub wpe: Tensor, // (P, C) position embedding
    pub layers: Vec<LayerWeights>,
    pub ln_f_g: Tensor,          // (C)
    pub ln_f_b: Tensor,          // (C)
    pub lm_head: Option<Tensor>, // (V, C) only when the checkpoint unties it
    /// The block matrices in column panels, one entry per layer.
    pub packed: Vec<PackedLayer>,
    /// The LM head as a `[C, V]` weight (the transpose of [`Weights::lm_head`])
    /// in column panels.
    pub lm_head_packed: Packed,
    /// Bytes read in place from the map, and bytes copied because misaligned.
    pub mapped_bytes: usize,
    pub copied_bytes: usize,
    /// Bytes of the packed copies (in anonymous memory).
    pub packed_bytes: usize,
}

impl Weights {
    /// The LM head's matrix `[V, C]`: `lm_head.weight` if present, else `wte`.
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// Every tensor with its canonical name, in checkpoint order.
    pub fn tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![
            ("wte.weight".to_string(), &self.wte),
            ("wpe.weight".to_string(), &self.wpe),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            for (suffix, t) in layer_fields(l) {
                out.push((format!("h.{i}.{suffix}"), t));
            }
        }
        out.push(("ln_f.weight".into(), &self.ln_f_g));
        out.push(("ln_f.bias".into(), &self.ln_f_b));
        if let Some(t) = &self.lm_head {
            out.push(("lm_head.weight".into(), t));
        }
        out
    }

    /// Token `tok`'s embedding (row `tok` of `wte`) into `dst[C]`. With the
    /// LM head tied, from its packed copy: the map's pages of `wte` were
    /// released, and reading them back would grow resident memory by up to
    /// 154 MB as prompts touch more of the vocabulary.
    pub fn token_embedding(&self, dst: &mut [f32], tok: usize) {
        let c = dst.len();
        if self.lm_head.is_none() {
            gpt2_kernels::unpack_column(dst, self.lm_head_packed.data(), c, tok);
        } else {
            dst.copy_from_slice(&self.wte.data()[tok * c..(tok + 1) * c]);
        }
    }

    /// Fails on the first NaN or infinity in any tensor (a full pass over the
    /// weights: about 0.1 s for 124M parameters).
    ///
    /// A block matrix or the LM head is scanned in its packed copy, which
    /// holds the same values (plus zero padding) and is what the kernels read;
    /// only when that finds a bad value is the stored tensor searched for its
    /// index.
    pub fn check_finite(&self, path: &Path) -> Result<()> {
        use rayon::prelude::*;
        let packed: HashMap<*const Tensor, &[f32]> = self
            .layers
            .iter()
            .zip(&self.packed)
            .flat_map(|(l, p)| l.matrices().into_iter().zip(p.matrices()))
            .chain([(self.lm_head(), &self.lm_head_packed)])
            .map(|(t, p)| (t as *const Tensor, p.data()))
            .collect();
        for (name, t) in self.tensors() {
            // A branch-free scan that vectorises (exponent bits all ones means
            // NaN or infinity), in parallel; the element is located only after.
            let scan = match packed.get(&(t as *const Tensor)) {
                Some(p) => *p,
                None => t.data(),
            };
            let bad = scan.par_chunks(1 << 16).any(|c| {
                c.iter()
                    .fold(false, |acc, v| acc | (v.to_bits() & 0x7f80_0000 == 0x7f80_0000))
            });
            if !bad {
                continue;
            }
            if let Some((index, &value)) = t.data().iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(Error::NonFinite {
                    path: path.to_owned(),
                    tensor: name,
                    index,
                    value,
                });
            }
        }
        Ok(())
    }
}

/// Packs the four matrices of every block and the LM head into one anonymous
/// map, then lets the OS drop the file map's pages of the originals (they are
/// read again, from the page cache, only if someone asks for them).
fn pack(path: &Path, layers: &[LayerWeights], lm_head: &Tensor) -> Result<Packing> {
    use gpt2_kernels::{pack_panels, pack_panels_t, packed_len};
    // Shapes as checked against the config: block matrices [K, N], the LM
    // head [V, C], i.e. the transpose of a [K = C, N = V] weight.
    let kn = |t: &Tensor| (t.shape()[0], t.shape()[1]);
    let (v, c) = kn(lm_head);
    let matrices = || layers.iter().flat_map(|l| l.matrices());
    let len = |t: &Tensor| packed_len(kn(t).0, kn(t).1);
    let total = matrices().map(len).sum::<usize>() + packed_len(c, v);
    // At least one float: a zero-length map is refused.
    let mut anon = memmap2::MmapMut::map_anon(total.max(1) * 4).map_err(|e| Error::io(path, e))?;
    // Huge pages spare the streaming kernels a TLB miss every 4 KiB; without
    // them (THP off) the kernels are a little slower, not wrong.
    #[cfg(target_os = "linux")]
    let _ = anon.advise(memmap2::Advice::HugePage);
    {
        let mut rest: &mut [f32] = bytemuck::cast_slice_mut(&mut anon[..]);
        for t in matrices() {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len(t));
            pack_panels(head, t.data(), kn(t).0, kn(t).1);
            rest = tail;
        }
        pack_panels_t(&mut rest[..packed_len(c, v)], lm_head.data(), c, v);
    }
    let map = Arc::new(anon.make_read_only().map_err(|e| Error::io(path, e))?);
    let mut start = 0;
    let mut next = |len: usize| {
        let p = Packed {
            map: Arc::clone(&map),
            start,
            len,
        };
        start += len;
        p
    };
    let packed = layers
        .iter()
        .map(|l| {
            let [attn_qkv, attn_proj, mlp_fc, mlp_proj] = l.matrices().map(|t| {
                t.release_pages();
                next(len(t))
            });
            PackedLayer {
                attn_qkv,
                attn_proj,
                mlp_fc,
                mlp_proj,
            }
        })
        .collect();
    let lm_head_packed = next(packed_len(c, v));
    // Tied, the token embeddings are read from the packed copy too
    // (`Weights::token_embedding`), so nothing reads these pages again.
    lm_head.release_pages();
    Ok(Packing {
        layers: packed,
        lm_head: lm_head_packed,
        bytes: total * 4,
    })
}

/// What [`pack`] makes.
struct Packing {
    layers: Vec<PackedLayer>,
    lm_head: Packed,
    bytes: usize,
}

impl Tensor {
    /// Asks the OS to drop this tensor's resident pages of the file map
    /// (whole pages inside the tensor only). A no-op for copies.
    fn release_pages(&self) {
        const PAGE: usize = 4096;
        if let Storage::Mapped { map, start, len } = &self.storage {
            let base = map.as_ptr() as usize;
            let (lo, hi) = (
                (base + start).next_multiple_of(PAGE),
                (base + start + len * 4) / PAGE * PAGE,
            );
            if hi > lo {
                // SAFETY: the map is private, read-only and never written, so
                // MADV_DONTNEED only unmaps clean file pages: a later read
                // faults the same bytes back from the file. No reference sees
                // different contents. A failure (which only means the pages
                // stay resident) is ignored.
                let _ = unsafe {
                    map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo - base, hi - lo)
                };
            }
        }
    }
}

fn layer_fields(l: &LayerWeights) -> [(&'static str, &Tensor); 12] {
    let tensors = [
        &l.ln_1_g,
        &l.ln_1_b,
        &l.attn_qkv_w,
        &l.attn_qkv_b,
        &l.attn_proj_w,
        &l.attn_proj_b,
        &l.ln_2_g,
        &l.ln_2_b,
        &l.mlp_fc_w,
        &l.mlp_fc_b,
        &l.mlp_proj_w,
        &l.mlp_proj_b,
    ];
    std::array::from_fn(|i| (LAYER_SUFFIXES[i], tensors[i]))
}

/// The twelve tensors of every block, by suffix after `h.{i}.`.
const LAYER_SUFFIXES: [&str; 12] = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
];

/// The shape of every tensor a checkpoint of this config must hold, by
/// canonical name (without the `transformer.` prefix). Public so that the
/// synthetic generator writes exactly what the loader expects.
pub fn expected_shapes(config: &Gpt2Config) -> BTreeMap<String, Vec<usize>> {
    let layers = (0..config.n_layer).flat_map(|i| LAYER_SUFFIXES.map(|s| format!("h.{i}.{s}")));
    ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]
        .map(String::from)
        .into_iter()
        .chain(layers)
        .filter_map(|name| expected_shape(&name, config).map(|shape| (name, shape)))
        .collect()
}

/// The shape the tensor `canonical` must have under `config` (`lm_head.weight`
/// included), or `None` if such a checkpoint has no tensor of that name.
/// Computed per name rather than from `expected_shapes`, so that a config.json
/// claiming billions of layers costs nothing before the file disagrees.
/// Validated configs keep these products far from overflow.
fn expected_shape(canonical: &str, config: &Gpt2Config) -> Option<Vec<usize>> {
    let (c, f, v, p) = (
        config.n_embd,
        config.n_inner,
        config.vocab_size,
        config.n_positions,
    );
    Some(match canonical {
        "wte.weight" | "lm_head.weight" => vec![v, c],
        "wpe.weight" => vec![p, c],
        "ln_f.weight" | "ln_f.bias" => vec![c],
        _ => match layer_field(canonical, config.n_layer)? {
            "ln_1.weight" | "ln_1.bias" | "ln_2.weight" | "ln_2.bias" => vec![c],
            "attn.c_attn.weight" => vec![c, 3 * c],
            "attn.c_attn.bias" => vec![3 * c],
            "attn.c_proj.weight" => vec![c, c],
            "attn.c_proj.bias" | "mlp.c_proj.bias" => vec![c],
            "mlp.c_fc.weight" => vec![c, f],
            "mlp.c_fc.bias" => vec![f],
            "mlp.c_proj.weight" => vec![f, c],
            _ => return None,
        },
    })
}

/// For `h.{i}.{field}` with a canonically written `i < n_layer` (not `h.01`
/// or `h.+1`, which `parse` would accept), the `field`.
fn layer_field(canonical: &str, n_layer: usize) -> Option<&str> {
    let (index, field) = canonical.strip_prefix("h.")?.split_once('.')?;
    let i: usize = index.parse().ok()?;
    (i < n_layer && i.to_string() == index).then_some(field)
}

/// The hub's original `gpt2` file carries causal-mask buffers `h.N.attn.bias`
/// and `h.N.attn.masked_bias`; they are not weights, and exactly those are skipped.
fn is_mask_buffer(canonical: &str, n_layer: usize) -> bool {
    layer_field(canonical, n_layer).is_some_and(|field| matches!(field, "attn.bias" | "attn.masked_bias"))
}

/// Memory-maps `path` and checks every tensor against `config`.
pub fn load(path: &Path, config: &Gpt2Config) -> Result<Weights> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let bad = |msg: String| Error::Safetensors {
        path: path.to_owned(),
        msg,
    };
    if size < 8 {
        return Err(bad(format!(
            "the file is {size} bytes, shorter than the 8-byte header length"
        )));
    }
    // SAFETY: the map is read-only. Its contents could change if another
    // process rewrote the file while we run; our own writers (the synthetic
    // generator) replace files by rename, never in place, so a map stays valid.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
    let st = SafeTensors::deserialize(&map).map_err(|e| bad(e.to_string()))?;

    // In file order, so that of several faults the first one is reported,
    // the same one on every run (the header's map has no order).
    let mut views: Vec<_> = st.iter().collect();
    views.sort_by_key(|(name, view)| (view.data().as_ptr(), *name));
    let mut found: HashMap<String, (String, Tensor)> = HashMap::new();
    let mut prefixed = false;
    let (mut mapped_bytes, mut copied_bytes) = (0, 0);
    for (name, view) in views {
        let canonical = match name.strip_prefix("transformer.") {
            Some(rest) => {
                prefixed = true;
                rest
            }
            None => name,
        };
        if is_mask_buffer(canonical, config.n_layer) {
            continue;
        }
        let Some(shape) = expected_shape(canonical, config) else {
            return Err(Error::UnknownTensor {
                path: path.to_owned(),
                tensor: name.to_owned(),
            });
        };
        if view.dtype() != Dtype::F32 {
            return Err(Error::Dtype {
                path: path.to_owned(),
                tensor: name.to_owned(),
                dtype: format!("{:?}", view.dtype()),
            });
        }
        if view.shape() != shape.as_slice() {
            return Err(Error::Shape {
                path: path.to_owned(),
                tensor: name.to_owned(),
                expected: shape,
                got: view.shape().to_vec(),
            });
        }
        if let Some((first, _)) = found.get(canonical) {
            return Err(Error::DuplicateTensor {
                path: path.to_owned(),
                tensor: canonical.to_owned(),
                first: first.clone(),
                second: name.to_owned(),
            });
        }
        let bytes = view.data();
        let storage = if bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok() {
            mapped_bytes += bytes.len();
            Storage::Mapped {
                map: Arc::clone(&map),
                start: bytes.as_ptr() as usize - map.as_ptr() as usize,
                len: bytes.len() / 4,
            }
        } else {
            copied_bytes += bytes.len();
            Storage::Owned(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            )
        };
        let tensor = Tensor { storage, shape };
        found.insert(canonical.to_owned(), (name.to_owned(), tensor));
    }

    // n_layer is config.json's word: reserve no more than the file holds.
    let mut layers = Vec::with_capacity(config.n_layer.min(found.len()));
    let mut take = |canonical: &str| -> Result<Tensor> {
        found
            .remove(canonical)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::MissingTensor {
                path: path.to_owned(),
                tensor: if prefixed && canonical != "lm_head.weight" {
                    format!("transformer.{canonical}")
                } else {
                    canonical.to_owned()
                },
            })
    };
    let wte = take("wte.weight")?;
    let wpe = take("wpe.weight")?;
    for i in 0..config.n_layer {
        let mut t = |suffix: &str| take(&format!("h.{i}.{suffix}"));
        layers.push(LayerWeights {
            ln_1_g: t("ln_1.weight")?,
            ln_1_b: t("ln_1.bias")?,
            attn_qkv_w: t("attn.c_attn.weight")?,
            attn_qkv_b: t("attn.c_attn.bias")?,
            attn_proj_w: t("attn.c_proj.weight")?,
            attn_proj_b: t("attn.c_proj.bias")?,
            ln_2_g: t("ln_2.weight")?,
            ln_2_b: t("ln_2.bias")?,
            mlp_fc_w: t("mlp.c_fc.weight")?,
            mlp_fc_b: t("mlp.c_fc.bias")?,
            mlp_proj_w: t("mlp.c_proj.weight")?,
            mlp_proj_b: t("mlp.c_proj.bias")?,
        });
    }
    let ln_f_g = take("ln_f.weight")?;
    let ln_f_b = take("ln_f.bias")?;
    let lm_head = take("lm_head.weight").ok();
    let packing = pack(path, &layers, lm_head.as_ref().unwrap_or(&wte))?;
    Ok(Weights {
        wte,
        wpe,
        layers,
        ln_f_g,
        ln_f_b,
        lm_head,
        packed: packing.layers,
        lm_head_packed: packing.lm_head,
        mapped_bytes,
        copied_bytes,
        packed_bytes: packing.bytes,
    })
}

/// The two files of a Hugging Face checkpoint directory.
pub fn checkpoint_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("config.json"), dir.join("model.safetensors"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_layer_names_are_mask_buffers() {
        assert!(is_mask_buffer("h.1.attn.bias", 2) && is_mask_buffer("h.0.attn.masked_bias", 2));
        for name in [
            "h.+1.attn.bias",
            "h.01.attn.bias",
            "h.2.attn.bias",
            "h.1.attn.c_attn.bias",
            "h..attn.bias",
        ] {
            assert!(!is_mask_buffer(name, 2), "{name}");
        }
    }
}
