//! The ways to damage a checkpoint, drawing them at random, and applying them.

use serde_json::{json, Value};

use super::{Base, Case, MICRO_CONFIG};
use gpt2::files::CONFIG_LIMIT;
use gpt2::rng::Rng;

/// One way to damage the checkpoint. Tensor indices count in file order,
/// modulo the number of tensors; positions are taken modulo the length.
/// Header and config edits apply first, then byte edits in list order.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Set (or with `None` remove) a key of config.json.
    ConfigField(String, Option<Value>),
    /// Replace config.json by these bytes.
    ConfigBytes(Vec<u8>),
    /// Set `key` (dtype, shape, data_offsets, ...) of a tensor's header entry.
    HeaderField {
        tensor: usize,
        key: String,
        value: Value,
    },
    /// Move a tensor's data_offsets (or only their end) by `delta`.
    ShiftOffsets {
        tensor: usize,
        delta: i64,
        end_only: bool,
    },
    /// Give tensor `to` the data_offsets of tensor `from`: overlapping data.
    /// With `swap`, exchange them instead: offsets out of order in the header.
    CopyOffsets { from: usize, to: usize, swap: bool },
    /// List the header entries last to first (still a valid file).
    Reverse,
    /// Write a tensor's entry twice in the header text, the copy under `name`.
    Duplicate { tensor: usize, name: Option<String> },
    /// Give a tensor's header entry another name.
    Rename { tensor: usize, name: String },
    /// Drop a tensor's header entry (its bytes stay).
    Remove { tensor: usize },
    /// Extra header spaces: the data no longer starts 4-byte aligned.
    Pad(usize),
    /// Overwrite element `index` of a tensor with a NaN or an infinity.
    Poison { tensor: usize, index: usize, value: f32 },
    /// Replace the 8-byte header length, or add to it if `relative`.
    HeaderLen { value: u64, relative: bool },
    /// Flip this bit of the file (modulo its length in bits).
    FlipBit(usize),
    /// Cut the file to this length (modulo its length + 1).
    Truncate(usize),
    /// Insert these bytes at this position (modulo the length + 1).
    Splice { at: usize, bytes: Vec<u8> },
    /// Replace the whole file.
    Garbage(Vec<u8>),
    /// Grow config.json to `len` bytes with `bulk` (the size, not the bytes,
    /// is kept, so that a report stays short).
    LargeConfig { bulk: Bulk, len: usize },
    /// Grow the safetensors header by about `len` bytes of `bulk`, the
    /// length field telling the truth: a large file the loader must not copy.
    LargeHeader { bulk: Bulk, len: usize },
    /// Put something that is not a regular file where a file should be.
    NotAFile { file: Target, kind: Special },
}

/// What a large input is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bulk {
    /// Spaces after the object's last field (valid JSON).
    Whitespace,
    /// A field `"pad"` holding a string of this length (valid JSON).
    LongString,
    /// A field `"pad"` holding arrays nested `len / 2` deep.
    Nesting,
}

/// One of the two files of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Config,
    Weights,
}

/// What stands in for a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    /// A symbolic link to `/dev/zero`: endless zeros, length 0 (unix).
    DevZero,
    /// A named pipe nobody writes: opening it for reading blocks (unix).
    Fifo,
    /// A directory.
    Directory,
    /// A symbolic link to nothing (unix; elsewhere, no file).
    Dangling,
}

/// A group of mutations, so that a test can aim at one part of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `config.json`: fields removed, set to odd values, or the file replaced.
    Config,
    /// The safetensors header's entries: dtypes, shapes, offsets, names.
    Header,
    /// The file's bytes: header length, bit flips, truncation, splices, garbage.
    Bytes,
    /// A NaN or an infinity in a tensor's data.
    Poison,
    /// Sizes past the limits, and files that are not regular: config.json
    /// around [`CONFIG_LIMIT`], headers of up to 8 MiB, a link to
    /// `/dev/zero`, a FIFO. A case of 1 MiB or more is one draw in 8, so
    /// that a mixed run keeps its pace.
    Large,
}

/// Every family.
pub const FAMILIES: [Family; 5] = [
    Family::Config,
    Family::Header,
    Family::Bytes,
    Family::Poison,
    Family::Large,
];

#[rustfmt::skip]
const CONFIG_FIELDS: &[&str] = &[
    "n_layer", "n_head", "n_embd", "n_positions", "n_ctx", "vocab_size", "n_inner", "layer_norm_epsilon",
    "activation_function", "model_type", "eos_token_id", "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn", "gpt2_rs_synthetic",
];
const HEADER_KEYS: &[&str] = &["dtype", "shape", "data_offsets", "extra"];
const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I8", "U8", "I32", "U64", "BOOL", "F8_E4M3", "F4", "E8M0", "C64", "f32", "",
];
#[rustfmt::skip]
const NAMES: &[&str] = &[
    "wte.weight", "transformer.wpe.weight", "lm_head.weight", "transformer.h.1.ln_1.weight",
    "h.0.attn.bias", "h.7.attn.bias", "transformer.h.+0.ln_1.weight", "transformer.h.01.ln_1.weight",
    "transformer.h.2.ln_1.weight", "transformer.h.18446744073709551616.ln_1.weight", "__metadata__", "",
];
/// Sizes, offsets and counts at the edges: zero, off by one, 2^32, 2^62, u64::MAX.
#[rustfmt::skip]
const NUMBERS: &[u64] = &[
    0, 1, 2, 3, 4, 7, 8, 16, 24, 31, 32, 1 << 31, 1 << 32, 1 << 53, 1 << 62, u64::MAX,
];

/// Up to `max` random bytes (the length is drawn too, 0 included).
fn random_bytes(rng: &mut Rng, max: usize) -> Vec<u8> {
    let n = rng.below(max + 1);
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

fn odd_number(rng: &mut Rng) -> Value {
    match rng.below(5) {
        0 => json!(*rng.pick(&[-1i64, -8, i64::MIN])),
        1 => json!(*rng.pick(&[1.5, -0.0, 1e-50, 1e300, 2.0])),
        _ => json!(*rng.pick(NUMBERS)),
    }
}

fn odd_shape(rng: &mut Rng) -> Value {
    let dims: Vec<u64> = (0..rng.below(4)).map(|_| *rng.pick(NUMBERS)).collect();
    json!(dims)
}

fn odd_value(rng: &mut Rng) -> Value {
    match rng.below(6) {
        0 => rng
            .pick(&[
                json!(null),
                json!(true),
                json!("8"),
                json!("gelu_new"),
                json!("gpt2"),
                json!({}),
            ])
            .clone(),
        1 => odd_shape(rng),
        2 => json!({"preset": "tiny", "seed": odd_number(rng)}),
        _ => odd_number(rng),
    }
}

/// One mutation of `family`, drawn from `rng`.
pub fn random_mutation(rng: &mut Rng, family: Family) -> Mutation {
    let tensor = rng.below(64);
    match family {
        Family::Config => match rng.below(4) {
            0 => Mutation::ConfigField(rng.pick(CONFIG_FIELDS).to_string(), None),
            1 => {
                let cut = rng.below(MICRO_CONFIG.len());
                Mutation::ConfigBytes(if rng.below(2) == 0 {
                    MICRO_CONFIG.as_bytes()[..cut].to_vec()
                } else {
                    random_bytes(rng, 64)
                })
            }
            _ => Mutation::ConfigField(rng.pick(CONFIG_FIELDS).to_string(), Some(odd_value(rng))),
        },
        Family::Header => match rng.below(11) {
            0 => Mutation::HeaderField {
                tensor,
                key: rng.pick(HEADER_KEYS).to_string(),
                value: odd_value(rng),
            },
            1 => Mutation::HeaderField {
                tensor,
                key: "dtype".into(),
                value: json!(*rng.pick(DTYPES)),
            },
            2 => Mutation::HeaderField {
                tensor,
                key: "shape".into(),
                value: odd_shape(rng),
            },
            3 => {
                let ends = [odd_number(rng), odd_number(rng)];
                Mutation::HeaderField {
                    tensor,
                    key: "data_offsets".into(),
                    value: json!(ends),
                }
            }
            4 => Mutation::ShiftOffsets {
                tensor,
                delta: *rng.pick(&[-8, -4, -1, 1, 4, 8, 1 << 40, i64::MIN / 2]),
                end_only: rng.below(2) == 0,
            },
            5 => Mutation::CopyOffsets {
                from: rng.below(64),
                to: tensor,
                swap: rng.below(2) == 0,
            },
            6 => Mutation::Duplicate {
                tensor,
                name: (rng.below(2) == 0).then(|| rng.pick(NAMES).to_string()),
            },
            7 => Mutation::Rename {
                tensor,
                name: rng.pick(NAMES).to_string(),
            },
            8 => Mutation::Remove { tensor },
            9 => Mutation::Pad(rng.below(8)),
            _ => Mutation::Reverse,
        },
        Family::Bytes => match rng.below(5) {
            0 => Mutation::HeaderLen {
                value: *rng.pick(&[0, 1, 7, u64::MAX, 1 << 32, 1 << 50, 100_000_001, 8]),
                relative: rng.below(2) == 0,
            },
            1 => Mutation::Truncate(rng.next_u64() as usize),
            2 => Mutation::Splice {
                at: rng.next_u64() as usize,
                bytes: random_bytes(rng, 16),
            },
            3 => Mutation::Garbage(random_bytes(rng, 64)),
            _ => Mutation::FlipBit(rng.next_u64() as usize),
        },
        Family::Poison => Mutation::Poison {
            tensor,
            index: rng.next_u64() as usize,
            value: *rng.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
        },
        Family::Large => random_large(rng),
    }
}

/// A [`Family::Large`] mutation: one in 8 is 1 MiB or more.
fn random_large(rng: &mut Rng) -> Mutation {
    let bulk = *rng.pick(&[Bulk::Whitespace, Bulk::LongString, Bulk::Nesting]);
    let limit = CONFIG_LIMIT as usize;
    match rng.below(8) {
        // Around the limit: one byte under, at, one over, twice.
        0 => Mutation::LargeConfig {
            bulk,
            len: *rng.pick(&[limit - 1, limit, limit + 1, 2 * limit]),
        },
        1 => Mutation::LargeHeader {
            bulk,
            len: *rng.pick(&[1 << 20, 8 << 20]),
        },
        // Large for a config or header, small for a disk: 4-64 kB.
        2 | 3 => Mutation::LargeConfig {
            bulk,
            len: 4096 << rng.below(5),
        },
        4 | 5 => Mutation::LargeHeader {
            bulk,
            len: 4096 << rng.below(5),
        },
        _ => {
            let file = *rng.pick(&[Target::Config, Target::Weights]);
            // A FIFO as model.safetensors blocks `File::open` in the loader
            // (it does not check the kind first): drawn for config.json only
            // until it does; `tests/loader_fuzz.rs` keeps the case, ignored.
            let kinds: &[Special] = match file {
                Target::Config => &[
                    Special::DevZero,
                    Special::Fifo,
                    Special::Directory,
                    Special::Dangling,
                ],
                Target::Weights => &[
                    Special::DevZero,
                    Special::Fifo,
                    Special::Directory,
                    Special::Dangling,
                ],
            };
            Mutation::NotAFile {
                file,
                kind: *rng.pick(kinds),
            }
        }
    }
}

/// `json` (an object's text) grown by `bulk` to `len` bytes, or a little
/// more where `len` is too small for the object and its bulk.
pub fn grow_json(json: &str, bulk: Bulk, len: usize) -> Vec<u8> {
    let body = json.trim_end().strip_suffix('}').unwrap_or(json);
    let room = len.saturating_sub(json.len());
    let mut out = Vec::with_capacity(len.max(json.len() + 16));
    out.extend_from_slice(body.as_bytes());
    match bulk {
        Bulk::Whitespace => {
            out.push(b'}');
            out.resize(out.len() + room, b' ');
        }
        Bulk::LongString => {
            // `,"pad":""` is 9 bytes.
            out.extend_from_slice(b",\"pad\":\"");
            out.resize(out.len() + room.saturating_sub(9), b'x');
            out.extend_from_slice(b"\"}");
        }
        Bulk::Nesting => {
            // `,"pad":` is 7 bytes, then `[` * depth and `]` * depth.
            let depth = room.saturating_sub(7) / 2;
            out.extend_from_slice(b",\"pad\":");
            out.resize(out.len() + depth, b'[');
            out.resize(out.len() + depth, b']');
            out.push(b'}');
        }
    }
    // Odd room for an even nesting: a space makes up the length.
    out.resize(out.len().max(len), b' ');
    out
}

/// The mutations of one case: 1..=max of them, from `families`, all drawn from `seed`.
pub fn random_case(seed: u64, families: &[Family], max: usize) -> Vec<Mutation> {
    let mut rng = Rng::new(seed);
    let n = 1 + rng.below(max.max(1));
    (0..n)
        .map(|_| {
            let family = *rng.pick(families);
            random_mutation(&mut rng, family)
        })
        .collect()
}

fn offsets(entry: &Value) -> Option<(u64, u64)> {
    let o = entry.get("data_offsets")?;
    Some((o.get(0)?.as_u64()?, o.get(1)?.as_u64()?))
}

/// Shifts a JSON offset by `delta`; one outside i64 / u64 becomes a float.
fn shift(v: &Value, delta: i64) -> Value {
    let x = v.as_u64().map_or(0, |x| x as i128) + delta as i128;
    u64::try_from(x)
        .map(Value::from)
        .or_else(|_| i64::try_from(x).map(Value::from))
        .unwrap_or(json!(x as f64))
}

/// The micro checkpoint with `mutations` applied, as the bytes of its two
/// files. Never panics, whatever the mutations.
pub fn apply(base: &Base, mutations: &[Mutation]) -> Case {
    let mut config = base.config.clone();
    let mut config_bytes = None;
    let (mut entries, mut data) = (base.entries.clone(), base.data.clone());
    let (mut copies, mut pad) = (Vec::new(), 0);
    for m in mutations {
        let n = entries.len().max(1);
        match m {
            Mutation::ConfigField(key, Some(v)) => config[key.as_str()] = v.clone(),
            Mutation::ConfigField(key, None) => {
                if let Some(o) = config.as_object_mut() {
                    o.remove(key);
                }
            }
            Mutation::ConfigBytes(b) => config_bytes = Some(b.clone()),
            Mutation::LargeConfig { bulk, len } => {
                config_bytes = Some(grow_json(&config.to_string(), *bulk, *len))
            }
            Mutation::HeaderField { tensor, key, value } => {
                if let Some((_, e)) = entries.get_mut(tensor % n) {
                    e[key.as_str()] = value.clone();
                }
            }
            Mutation::ShiftOffsets {
                tensor,
                delta,
                end_only,
            } => {
                if let Some(o) = entries
                    .get_mut(tensor % n)
                    .and_then(|(_, e)| e["data_offsets"].as_array_mut())
                {
                    for (i, v) in o.iter_mut().enumerate() {
                        if i == 1 || !end_only {
                            *v = shift(v, *delta);
                        }
                    }
                }
            }
            Mutation::CopyOffsets { from, to, swap } => {
                if let Some((_, e)) = entries.get(from % n) {
                    let o = e["data_offsets"].clone();
                    let old = std::mem::replace(&mut entries[to % n].1["data_offsets"], o);
                    if *swap {
                        entries[from % n].1["data_offsets"] = old;
                    }
                }
            }
            Mutation::Reverse => entries.reverse(),
            Mutation::Duplicate { tensor, name } => {
                if let Some((own, e)) = entries.get(tensor % n) {
                    copies.push((name.clone().unwrap_or(own.clone()), e.clone()));
                }
            }
            Mutation::Rename { tensor, name } => {
                if let Some((own, _)) = entries.get_mut(tensor % n) {
                    own.clone_from(name);
                }
            }
            Mutation::Remove { tensor } if !entries.is_empty() => drop(entries.remove(tensor % n)),
            Mutation::Pad(k) => pad += k,
            Mutation::Poison { tensor, index, value } => {
                if let Some((a, b)) = entries.get(tensor % n).and_then(|(_, e)| offsets(e)) {
                    let (a, len) = (a as usize, b.saturating_sub(a) as usize / 4);
                    let at = a.saturating_add(4 * (index % len.max(1)));
                    if len > 0 && at + 4 <= data.len() {
                        data[at..at + 4].copy_from_slice(&value.to_le_bytes());
                    }
                }
            }
            _ => {}
        }
    }
    // The header is written by hand: a JSON map cannot hold duplicate names.
    let meta = json!({"format": "pt"});
    let items = std::iter::once(("__metadata__".to_string(), meta))
        .chain(copies)
        .chain(entries);
    let items: Vec<String> = items.map(|(k, v)| format!("{}:{v}", Value::from(k))).collect();
    let mut header = format!("{{{}}}", items.join(",")).into_bytes();
    // Bulk goes into `__metadata__`, the one place a header may carry
    // anything (string values only: nesting there is an error).
    let mut replaced = Vec::new();
    for m in mutations {
        match m {
            Mutation::LargeHeader { bulk, len } => {
                let text = String::from_utf8(header).expect("the header is JSON text");
                let (meta_end, rest) = text.split_at(text.find('}').expect("a metadata object") + 1);
                let grown = grow_json(meta_end, *bulk, len + meta_end.len());
                header = [grown.as_slice(), rest.as_bytes()].concat();
            }
            Mutation::NotAFile { file, kind } => replaced.push((*file, *kind)),
            _ => {}
        }
    }
    // Pad with spaces as safetensors does, so that the data is 8-byte aligned.
    // (Reserved exactly: a doubled 16 MiB header would be the largest allocation.)
    let spaces = (8 - header.len() % 8) % 8 + pad;
    header.reserve_exact(spaces);
    header.resize(header.len() + spaces, b' ');
    let mut file = Vec::with_capacity(8 + header.len() + data.len());
    file.extend_from_slice(&(header.len() as u64).to_le_bytes());
    file.extend_from_slice(&header);
    file.extend_from_slice(&data);
    for m in mutations {
        let len = file.len();
        match m {
            Mutation::HeaderLen { value, relative } if len >= 8 => {
                let old = u64::from_le_bytes(file[..8].try_into().expect("8 bytes"));
                let new = if *relative {
                    old.wrapping_add(*value)
                } else {
                    *value
                };
                file[..8].copy_from_slice(&new.to_le_bytes());
            }
            Mutation::FlipBit(bit) if len > 0 => file[bit / 8 % len] ^= 1 << (bit % 8),
            Mutation::Truncate(at) => file.truncate(at % (len + 1)),
            Mutation::Splice { at, bytes } => {
                drop(file.splice(at % (len + 1)..at % (len + 1), bytes.clone()))
            }
            Mutation::Garbage(bytes) => file.clone_from(bytes),
            _ => {}
        }
    }
    Case {
        config: config_bytes.unwrap_or_else(|| config.to_string().into_bytes()),
        file,
        replaced,
    }
}
