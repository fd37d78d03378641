//! The number formats a packed weight can be stored in.
//!
//! Activations, accumulation, biases, layer norms and attention are f32 in
//! every format; only the matrices of the linear layers (and the LM head)
//! change. The KV cache's keys and values have their own [`KvDtype`]. What each format costs and how far it moves the logits:
//! `docs/hot-path.md`, "Reduced precision".

use std::fmt;
use std::str::FromStr;

/// The format of a linear layer's packed weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Dtype {
    /// IEEE f32, as GPT-2 was trained and as the reference logits are.
    #[default]
    F32,
    /// bfloat16: f32 rounded to its top 16 bits, nearest even (NaN stays NaN);
    /// widened back to f32 exactly in the registers.
    Bf16,
    /// Symmetric int8 with one f32 scale per output column:
    /// `w[k, j] ≈ q[k, j] · scale[j]`, `scale[j] = max_k |w[k, j]| / 127`.
    Int8,
}

impl Dtype {
    /// Every format, in the order reports list them.
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::Bf16, Dtype::Int8];

    /// The name `--dtype` takes and every report prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::Int8 => "int8",
        }
    }

    /// Bytes of one stored weight value (without scales).
    pub fn bytes_per_value(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
            Dtype::Int8 => 1,
        }
    }

    /// Bytes a product with a `[K, N]` weight reads from it, without the
    /// panels' padding: the values, and for int8 the N scales.
    pub fn weight_bytes(self, k: usize, n: usize) -> usize {
        let scales = if self == Dtype::Int8 { 4 * n } else { 0 };
        self.bytes_per_value() * k * n + scales
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--dtype` value that names no format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownDtype(pub String);

impl fmt::Display for UnknownDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown dtype `{}`: expected f32, bf16 or int8", self.0)
    }
}

impl std::error::Error for UnknownDtype {}

impl FromStr for Dtype {
    type Err = UnknownDtype;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownDtype(s.to_owned()))
    }
}

/// The format of a KV cache's keys and values (`--kv-dtype`).
///
/// Queries, scores, softmax and the attention output stay f32 in both; only
/// what is stored changes. bf16 halves the bytes a decode step streams from
/// the cache (round to nearest even as each key and value is written,
/// widened exactly as it is read), so a row's result still depends only on
/// its own sequence: batching never changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum KvDtype {
    /// IEEE f32: the reference.
    #[default]
    F32,
    /// bfloat16, as [`Dtype::Bf16`] rounds weights.
    Bf16,
}

impl KvDtype {
    /// Every format, in the order reports list them.
    pub const ALL: [KvDtype; 2] = [KvDtype::F32, KvDtype::Bf16];

    /// The name `--kv-dtype` takes and every report prints.
    pub fn as_str(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
        }
    }

    /// Bytes of one stored key or value element.
    pub fn bytes_per_value(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--kv-dtype` value that names no format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKvDtype(pub String);

impl fmt::Display for UnknownKvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown KV cache dtype `{}`: expected f32 or bf16", self.0)
    }
}

impl std::error::Error for UnknownKvDtype {}

impl FromStr for KvDtype {
    type Err = UnknownKvDtype;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KvDtype::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownKvDtype(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_named() {
        for d in Dtype::ALL {
            assert_eq!(d.as_str().parse::<Dtype>(), Ok(d));
        }
        assert_eq!("BF16".parse::<Dtype>(), Ok(Dtype::Bf16));
        let err = "fp8".parse::<Dtype>().unwrap_err().to_string();
        assert!(err.contains("`fp8`") && err.contains("bf16"), "{err}");
        for d in KvDtype::ALL {
            assert_eq!(d.as_str().parse::<KvDtype>(), Ok(d));
        }
        let err = "int8".parse::<KvDtype>().unwrap_err().to_string();
        assert!(err.contains("`int8`") && err.contains("KV"), "{err}");
    }

    #[test]
    fn int8_bytes_count_the_scales() {
        assert_eq!(Dtype::F32.weight_bytes(768, 2304), 768 * 2304 * 4);
        assert_eq!(Dtype::Bf16.weight_bytes(768, 2304), 768 * 2304 * 2);
        assert_eq!(Dtype::Int8.weight_bytes(768, 2304), 768 * 2304 + 2304 * 4);
    }
}
