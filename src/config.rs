//! `config.json`: the hyper-parameters of a GPT-2 checkpoint, and what we refuse.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// GPT-2 hyper-parameters, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    /// L: transformer blocks.
    pub n_layer: usize,
    /// H: attention heads; `n_embd / n_head` is the head dimension.
    pub n_head: usize,
    /// C: channels of the residual stream.
    pub n_embd: usize,
    /// P: the context window (maximum positions).
    pub n_positions: usize,
    /// V: vocabulary size.
    pub vocab_size: usize,
    /// Width of the MLP's hidden layer (4C unless `n_inner` says otherwise).
    pub n_inner: usize,
    pub layer_norm_epsilon: f32,
    /// End-of-text token, if the config names one.
    pub eos_token_id: Option<u32>,
    /// Set by our synthetic generator: which preset and seed made the checkpoint.
    pub synthetic: Option<SyntheticInfo>,
}

/// The `gpt2_rs_synthetic` entry our generator writes into `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct SyntheticInfo {
    pub preset: String,
    pub seed: u64,
}

/// `config.json` as Hugging Face writes it; unknown keys are ignored.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    n_layer: usize,
    n_head: usize,
    n_embd: usize,
    n_positions: usize,
    n_ctx: Option<usize>,
    vocab_size: usize,
    n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_activation")]
    activation_function: String,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    reorder_and_upcast_attn: bool,
    eos_token_id: Option<u32>,
    gpt2_rs_synthetic: Option<SyntheticInfo>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}

impl Gpt2Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::files::read_bounded_string(path, crate::files::CONFIG_LIMIT)?;
        Self::from_json(&text).map_err(|msg| Error::Config {
            path: path.to_owned(),
            msg,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| name_the_field(text, e))?;
        if let Some(t) = raw.model_type.as_deref() {
            if t != "gpt2" {
                return Err(format!("model_type is \"{t}\", only \"gpt2\" is supported"));
            }
        }
        // "gelu_pytorch_tanh" is the same tanh approximation under another name.
        if !matches!(raw.activation_function.as_str(), "gelu_new" | "gelu_pytorch_tanh") {
            return Err(format!(
                "activation_function is \"{}\", only \"gelu_new\" (tanh GELU) is supported",
                raw.activation_function
            ));
        }
        if raw.scale_attn_by_inverse_layer_idx {
            return Err("scale_attn_by_inverse_layer_idx = true is not supported".into());
        }
        if raw.reorder_and_upcast_attn {
            return Err("reorder_and_upcast_attn = true is not supported".into());
        }
        for (name, v) in [
            ("n_layer", raw.n_layer),
            ("n_head", raw.n_head),
            ("n_embd", raw.n_embd),
            ("n_positions", raw.n_positions),
            ("vocab_size", raw.vocab_size),
            ("n_inner", raw.n_inner.unwrap_or(1)),
        ] {
            if v == 0 {
                return Err(format!("{name} is 0"));
            }
        }
        if raw.n_embd % raw.n_head != 0 {
            return Err(format!(
                "n_embd = {} is not divisible by n_head = {}",
                raw.n_embd, raw.n_head
            ));
        }
        if let Some(n_ctx) = raw.n_ctx {
            if n_ctx != raw.n_positions {
                return Err(format!(
                    "n_ctx = {n_ctx} differs from n_positions = {}",
                    raw.n_positions
                ));
            }
        }
        if raw.vocab_size > u32::MAX as usize {
            return Err(format!("vocab_size = {} does not fit token ids", raw.vocab_size));
        }
        let n_inner = match raw.n_inner {
            Some(f) => f,
            None => raw
                .n_embd
                .checked_mul(4)
                .ok_or_else(|| format!("n_embd = {} is too large", raw.n_embd))?,
        };
        // Every size derived from the config (3C, C * F, V * C, the total)
        // must be computable; the weights file then bounds them for real.
        let weight_bytes = param_count(raw.n_layer, raw.n_embd, n_inner, raw.vocab_size, raw.n_positions)
            .and_then(|n| n.checked_mul(4));
        if weight_bytes.is_none() {
            return Err(format!(
                "n_layer = {}, n_embd = {}, n_inner = {n_inner}, vocab_size = {}, n_positions = {} \
                 describe more weights than memory can address",
                raw.n_layer, raw.n_embd, raw.vocab_size, raw.n_positions
            ));
        }
        // Checked as f32, the type it is used in: 1e-50 would become 0, 1e300 infinity.
        let eps = raw.layer_norm_epsilon as f32;
        if !(eps.is_finite() && eps > 0.0) {
            return Err(format!(
                "layer_norm_epsilon = {} must be a positive, finite f32",
                raw.layer_norm_epsilon
            ));
        }
        Ok(Gpt2Config {
            n_layer: raw.n_layer,
            n_head: raw.n_head,
            n_embd: raw.n_embd,
            n_positions: raw.n_positions,
            vocab_size: raw.vocab_size,
            n_inner,
            layer_norm_epsilon: eps,
            eos_token_id: raw.eos_token_id,
            synthetic: raw.gpt2_rs_synthetic,
        })
    }

    /// hd: channels per head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Number of parameters (counting the tied LM head once).
    pub fn n_params(&self) -> usize {
        param_count(
            self.n_layer,
            self.n_embd,
            self.n_inner,
            self.vocab_size,
            self.n_positions,
        )
        .expect("validated configs have a countable size")
    }
}

/// `n_params` in checked arithmetic: `None` if any step overflows.
fn param_count(n_layer: usize, c: usize, f: usize, v: usize, p: usize) -> Option<usize> {
    let c3 = c.checked_mul(3)?;
    let cf = c.checked_mul(f)?;
    // ln_1, ln_2 (4C); c_attn (C * 3C + 3C); attn c_proj (C * C + C); c_fc (C * F + F); mlp c_proj (F * C + C).
    let per_layer = [
        c.checked_mul(4)?,
        c.checked_mul(c3)?,
        c3,
        c.checked_mul(c)?,
        c,
        cf,
        f,
        cf,
        c,
    ]
    .into_iter()
    .try_fold(0usize, usize::checked_add)?;
    [
        v.checked_mul(c)?,
        p.checked_mul(c)?,
        n_layer.checked_mul(per_layer)?,
        c.checked_mul(2)?,
    ]
    .into_iter()
    .try_fold(0usize, usize::checked_add)
}

/// serde reports a value of the wrong type by its position only ("invalid
/// value: integer `-1`, expected usize at line 1 column 14"); this finds the
/// field by reading each known one alone, and otherwise keeps serde's words.
fn name_the_field(text: &str, err: serde_json::Error) -> String {
    use serde::de::DeserializeOwned;
    use serde_json::Value;
    fn check<T: DeserializeOwned>(v: &Value) -> Result<(), serde_json::Error> {
        serde_json::from_value::<T>(v.clone()).map(drop)
    }
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text) else {
        return err.to_string();
    };
    for (field, v) in &map {
        let checked = match field.as_str() {
            "n_layer" | "n_head" | "n_embd" | "n_positions" | "vocab_size" => check::<usize>(v),
            "n_ctx" | "n_inner" => check::<Option<usize>>(v),
            "eos_token_id" => check::<Option<u32>>(v),
            "model_type" => check::<Option<String>>(v),
            "activation_function" => check::<String>(v),
            "layer_norm_epsilon" => check::<f64>(v),
            "scale_attn_by_inverse_layer_idx" | "reorder_and_upcast_attn" => check::<bool>(v),
            "gpt2_rs_synthetic" => check::<Option<SyntheticInfo>>(v),
            _ => Ok(()),
        };
        if let Err(e) = checked {
            return format!("{field} = {v}: {e}");
        }
    }
    err.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"n_layer":2,"n_head":4,"n_embd":64,
        "n_positions":128,"vocab_size":50257"#;

    fn with(extra: &str) -> Result<Gpt2Config, String> {
        Gpt2Config::from_json(&format!("{BASE}{extra}}}"))
    }

    #[test]
    fn defaults_fill_in() {
        let c = with("").unwrap();
        assert_eq!((c.n_inner, c.layer_norm_epsilon, c.head_dim()), (256, 1e-5, 16));
    }

    #[test]
    fn rejects_what_we_do_not_implement() {
        for (extra, needle) in [
            (r#","activation_function":"gelu""#, "activation_function"),
            (
                r#","scale_attn_by_inverse_layer_idx":true"#,
                "scale_attn_by_inverse_layer_idx",
            ),
            (r#","reorder_and_upcast_attn":true"#, "reorder_and_upcast_attn"),
            (r#","n_ctx":64"#, "n_ctx"),
            (r#","model_type":"llama""#, "model_type"),
        ] {
            let err = with(extra).unwrap_err();
            assert!(err.contains(needle), "{extra}: {err}");
        }
        let err = Gpt2Config::from_json(
            &BASE
                .replace("\"n_head\":4", "\"n_head\":5")
                .replace("50257", "50257}"),
        )
        .unwrap_err();
        assert!(err.contains("not divisible"), "{err}");
        let err = Gpt2Config::from_json(r#"{"n_layer":2}"#).unwrap_err();
        assert!(err.contains("missing field"), "{err}");
    }

    #[test]
    fn the_124m_shape_has_124m_parameters() {
        let c = Gpt2Config::from_json(
            r#"{"n_layer":12,"n_head":12,"n_embd":768,"n_positions":1024,"vocab_size":50257}"#,
        )
        .unwrap();
        assert_eq!(c.n_params(), 124_439_808);
    }
}
