//! Loading `model.safetensors`: memory-mapped, every tensor checked (name,
//! dtype, shape) against the config, and borrowed as `&[f32]` straight from the
//! map. A tensor is copied only when its bytes are not 4-byte aligned.

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

/// All weights of a GPT-2 checkpoint.
pub struct Weights {
    pub wte: Tensor, // (V, C) token embedding, also the tied LM head
    pub wpe: Tensor, // (P, C) position embedding
    pub layers: Vec<LayerWeights>,
    pub ln_f_g: Tensor,          // (C)
    pub ln_f_b: Tensor,          // (C)
    pub lm_head: Option<Tensor>, // (V, C) only when the checkpoint unties it
    /// Bytes read in place from the map, and bytes copied because misaligned.
    pub mapped_bytes: usize,
    pub copied_bytes: usize,
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

    /// Fails on the first NaN or infinity in any tensor (a full pass over the
    /// weights: about 0.1 s for 124M parameters).
    pub fn check_finite(&self, path: &Path) -> Result<()> {
        use rayon::prelude::*;
        for (name, t) in self.tensors() {
            // A branch-free scan that vectorises (exponent bits all ones means
            // NaN or infinity), in parallel; the element is located only after.
            let data = t.data();
            let bad = data.par_chunks(1 << 16).any(|c| {
                c.iter()
                    .fold(false, |acc, v| acc | (v.to_bits() & 0x7f80_0000 == 0x7f80_0000))
            });
            if !bad {
                continue;
            }
            if let Some((index, &value)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
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
    Ok(Weights {
        wte,
        wpe,
        layers,
        ln_f_g,
        ln_f_b,
        lm_head,
        mapped_bytes,
        copied_bytes,
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
