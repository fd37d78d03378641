//! Loader fuzzer: damages a tiny valid checkpoint (`config.json` +
//! `model.safetensors`) and checks that loading never panics, never trusts a
//! size written in a header, and turns every bad input into a `gpt2::Error`
//! that names the file.
//!
//!     cargo run --release --bin fuzz_loader -- --seconds 600 [--seed N]
//!
//! A case is a list of mutations drawn from its own seed; `--replay SEED`
//! reruns one case without catching its panic. `tests/loader_fuzz.rs`
//! compiles this file as a module and drives the same mutators from proptest.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use gpt2::weights::expected_shapes;
use gpt2::{Error, Gpt2Config, Gpt2Model};
use serde_json::{json, Value};

/// Refuses any single allocation over 1 GiB, so that trusting a size from a
/// header aborts the run ("memory allocation of N bytes failed") instead of
/// swapping; the micro checkpoint needs kilobytes.
struct CappedAlloc;

pub const ALLOC_CAP: usize = 1 << 30;
/// The largest single allocation asked for so far.
pub static LARGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);

fn admit(size: usize) -> bool {
    LARGEST_ALLOC.fetch_max(size, Ordering::Relaxed);
    size <= ALLOC_CAP
}

// SAFETY: every call is forwarded unchanged to `System`, or refused with null,
// which the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if admit(layout.size()) {
            System.alloc(layout)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if admit(layout.size()) {
            System.alloc_zeroed(layout)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if admit(new_size) {
            System.realloc(ptr, layout, new_size)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// L = 2, H = 2, C = 8, P = 4, V = 16, F = 32: 1920 parameters, 7.7 kB.
pub const MICRO_CONFIG: &str = r#"{"model_type":"gpt2","n_layer":2,"n_head":2,"n_embd":8,"n_positions":4,"n_ctx":4,"vocab_size":16,"eos_token_id":15}"#;

/// xorshift64*: the only randomness here, seeded explicitly.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

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
    CopyOffsets {
        from: usize,
        to: usize,
        swap: bool,
    },
    /// List the header entries last to first (still a valid file).
    Reverse,
    /// Write a tensor's entry twice in the header text, the copy under `name`.
    Duplicate {
        tensor: usize,
        name: Option<String>,
    },
    Rename {
        tensor: usize,
        name: String,
    },
    Remove {
        tensor: usize,
    },
    /// Extra header spaces: the data no longer starts 4-byte aligned.
    Pad(usize),
    /// Overwrite element `index` of a tensor with a NaN or an infinity.
    Poison {
        tensor: usize,
        index: usize,
        value: f32,
    },
    /// Replace the 8-byte header length, or add to it if `relative`.
    HeaderLen {
        value: u64,
        relative: bool,
    },
    FlipBit(usize),
    Truncate(usize),
    Splice {
        at: usize,
        bytes: Vec<u8>,
    },
    /// Replace the whole file.
    Garbage(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Config,
    Header,
    Bytes,
    Poison,
}

pub const FAMILIES: [Family; 4] = [Family::Config, Family::Header, Family::Bytes, Family::Poison];

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

fn odd_number(rng: &mut Rng) -> Value {
    match rng.below(5) {
        0 => json!(rng.pick(&[-1i64, -8, i64::MIN])),
        1 => json!(rng.pick(&[1.5, -0.0, 1e-50, 1e300, 2.0])),
        _ => json!(rng.pick(NUMBERS)),
    }
}

fn odd_shape(rng: &mut Rng) -> Value {
    let dims: Vec<u64> = (0..rng.below(4)).map(|_| rng.pick(NUMBERS)).collect();
    json!(dims)
}

fn odd_value(rng: &mut Rng) -> Value {
    match rng.below(6) {
        0 => rng.pick(&[
            json!(null),
            json!(true),
            json!("8"),
            json!("gelu_new"),
            json!("gpt2"),
            json!({}),
        ]),
        1 => odd_shape(rng),
        2 => json!({"preset": "tiny", "seed": odd_number(rng)}),
        _ => odd_number(rng),
    }
}

pub fn random_mutation(rng: &mut Rng, family: Family) -> Mutation {
    let tensor = rng.below(64);
    match family {
        Family::Config => match rng.below(4) {
            0 => Mutation::ConfigField(rng.pick(CONFIG_FIELDS).into(), None),
            1 => {
                let cut = rng.below(MICRO_CONFIG.len());
                Mutation::ConfigBytes(if rng.below(2) == 0 {
                    MICRO_CONFIG.as_bytes()[..cut].to_vec()
                } else {
                    rng.bytes(64)
                })
            }
            _ => Mutation::ConfigField(rng.pick(CONFIG_FIELDS).into(), Some(odd_value(rng))),
        },
        Family::Header => match rng.below(11) {
            0 => Mutation::HeaderField {
                tensor,
                key: rng.pick(HEADER_KEYS).into(),
                value: odd_value(rng),
            },
            1 => Mutation::HeaderField {
                tensor,
                key: "dtype".into(),
                value: json!(rng.pick(DTYPES)),
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
                delta: rng.pick(&[-8, -4, -1, 1, 4, 8, 1 << 40, i64::MIN / 2]),
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
                name: rng.pick(NAMES).into(),
            },
            8 => Mutation::Remove { tensor },
            9 => Mutation::Pad(rng.below(8)),
            _ => Mutation::Reverse,
        },
        Family::Bytes => match rng.below(5) {
            0 => Mutation::HeaderLen {
                value: rng.pick(&[0, 1, 7, u64::MAX, 1 << 32, 1 << 50, 100_000_001, 8]),
                relative: rng.below(2) == 0,
            },
            1 => Mutation::Truncate(rng.next_u64() as usize),
            2 => Mutation::Splice {
                at: rng.next_u64() as usize,
                bytes: rng.bytes(16),
            },
            3 => Mutation::Garbage(rng.bytes(64)),
            _ => Mutation::FlipBit(rng.next_u64() as usize),
        },
        Family::Poison => Mutation::Poison {
            tensor,
            index: rng.next_u64() as usize,
            value: rng.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
        },
    }
}

/// The mutations of one case: 1..=max of them, from `families`, all drawn from `seed`.
pub fn random_case(seed: u64, families: &[Family], max: usize) -> Vec<Mutation> {
    let mut rng = Rng::new(seed);
    let n = 1 + rng.below(max.max(1));
    (0..n)
        .map(|_| {
            let family = rng.pick(families);
            random_mutation(&mut rng, family)
        })
        .collect()
}

/// The undamaged micro checkpoint, taken apart: config, header entries in
/// file order, and the data section.
pub struct Base {
    pub config: Value,
    pub entries: Vec<(String, Value)>,
    pub data: Vec<u8>,
}

pub fn base() -> Base {
    let config = Gpt2Config::from_json(MICRO_CONFIG).expect("the micro config is valid");
    let (mut entries, mut data) = (Vec::new(), Vec::new());
    for (i, (name, shape)) in expected_shapes(&config).into_iter().enumerate() {
        let start = data.len();
        let n: usize = shape.iter().product();
        data.extend((0..n).flat_map(|j| (((i * 31 + j * 17) % 23) as f32 / 23.0 - 0.5).to_le_bytes()));
        let entry = json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]});
        entries.push((format!("transformer.{name}"), entry));
    }
    Base {
        config: serde_json::from_str(MICRO_CONFIG).expect("valid JSON"),
        entries,
        data,
    }
}

/// The two files of one case.
pub struct Case {
    pub config: Vec<u8>,
    pub file: Vec<u8>,
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
    let mut header = format!("{{{}}}", items.join(","));
    // Pad with spaces as safetensors does, so that the data is 8-byte aligned.
    header.push_str(&" ".repeat((8 - header.len() % 8) % 8 + pad));
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
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
    }
}

pub enum Outcome {
    /// Loaded, finite, and a forward pass ran.
    Loaded,
    /// Refused by the loader or by `check_finite`.
    Rejected(Error),
    /// Loaded, but the forward pass returned an error.
    ForwardFailed(Error),
}

fn write_fresh(path: &Path, bytes: &[u8]) {
    // Removed and created anew, never rewritten in place (no case's map is
    // alive by now anyway); also spares ext4's flush on replace-by-rename.
    let _ = std::fs::remove_file(path);
    std::fs::write(path, bytes).expect("write into the fuzz directory");
}

/// Writes the case into `dir` and runs it: load, `check_finite`, and a
/// forward pass of up to two tokens. A panic propagates to the caller.
pub fn run_case(dir: &Path, case: &Case) -> Outcome {
    write_fresh(&dir.join("config.json"), &case.config);
    let weights = dir.join("model.safetensors");
    write_fresh(&weights, &case.file);
    let model = match Gpt2Model::load(dir) {
        Ok(model) => model,
        Err(e) => return Outcome::Rejected(e),
    };
    if let Err(e) = model.weights.check_finite(&weights) {
        return Outcome::Rejected(e);
    }
    let last = (model.config.vocab_size - 1) as u32;
    let tokens = &[0, last][..model.config.n_positions.min(2)];
    match model.logits_all(tokens, 2) {
        Ok(_) => Outcome::Loaded,
        Err(e) => Outcome::ForwardFailed(e),
    }
}

/// What is wrong with an outcome, if anything: a load error must be
/// non-empty and name the file it is about.
pub fn contract_violation(outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::Rejected(e) => {
            let msg = e.to_string();
            let named = msg.contains("config.json") || msg.contains("model.safetensors");
            (!named).then(|| format!("load error names no file: {msg}"))
        }
        Outcome::ForwardFailed(e) => e.to_string().is_empty().then(|| "empty forward error".into()),
        Outcome::Loaded => None,
    }
}

/// A short name for the kind of an error: the variant, and for free-text
/// variants the words of the message before any number or name.
pub fn kind(e: &Error) -> String {
    let debug = format!("{e:?}");
    let variant = debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or_default();
    let detail: String = match e {
        Error::Config { msg, .. } | Error::Safetensors { msg, .. } => {
            let word = |w: &&str| {
                !w.starts_with(|c: char| c.is_ascii_digit())
                    && w.chars().all(|c| c.is_alphanumeric() || "_-,".contains(c))
            };
            msg.split(' ').take_while(word).collect::<Vec<_>>().join(" ")
        }
        Error::Io { source, .. } => format!("{:?}", source.kind()),
        _ => String::new(),
    };
    format!("{variant} {}", detail.trim()).trim_end().to_string()
}

/// Silences the default panic output; the message of the latest panic is kept here.
pub static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

pub fn quiet_panics() {
    panic::set_hook(Box::new(|info| {
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = info.to_string();
    }));
}

/// Fuzzes the checkpoint loader: every damaged checkpoint must give a named error, never a panic.
#[derive(Parser)]
struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seed of the case stream (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Most mutations stacked on one case.
    #[arg(long, default_value_t = 3)]
    max_mutations: usize,
    /// Run only the case with this case seed (printed for each panic), panics not caught.
    #[arg(long)]
    replay: Option<u64>,
    /// A case running longer than this many seconds is reported as a hang.
    #[arg(long, default_value_t = 20)]
    hang_seconds: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("gpt2-fuzz-loader-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the fuzz directory");
    let base = base();
    if let Some(seed) = args.replay {
        let mutations = random_case(seed, &FAMILIES, args.max_mutations);
        println!("case {seed}: {mutations:?}");
        let outcome = run_case(&dir, &apply(&base, &mutations));
        match &outcome {
            Outcome::Loaded => println!("loaded"),
            Outcome::Rejected(e) | Outcome::ForwardFailed(e) => println!("{}: {e}", kind(e)),
        }
        return ExitCode::from(contract_violation(&outcome).is_some() as u8);
    }
    if !matches!(run_case(&dir, &apply(&base, &[])), Outcome::Loaded) {
        eprintln!("the undamaged micro checkpoint does not load");
        return ExitCode::from(2);
    }

    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    // Watchdog: a case that runs too long is a hang (the loader looping over a
    // count from the header); report its seed and stop.
    let start = Instant::now();
    let current = Arc::new((AtomicU64::new(0), AtomicU64::new(0))); // (case seed, started at ms)
    let watched = Arc::clone(&current);
    let hang_ms = args.hang_seconds * 1000;
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        let since = watched.1.load(Ordering::Relaxed);
        if start.elapsed().as_millis() as u64 > since + hang_ms {
            eprintln!(
                "HANG: case {} ran over {hang_ms} ms",
                watched.0.load(Ordering::Relaxed)
            );
            std::process::exit(3);
        }
    });

    quiet_panics();
    let deadline = start + Duration::from_secs(args.seconds);
    let mut stream = Rng::new(seed);
    let (mut cases, mut loaded, mut violations) = (0u64, 0u64, Vec::new());
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut panics: Vec<(u64, String)> = Vec::new();
    let mut last_report = start;
    while Instant::now() < deadline {
        let case_seed = stream.next_u64();
        current.0.store(case_seed, Ordering::Relaxed);
        current
            .1
            .store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let case = apply(&base, &random_case(case_seed, &FAMILIES, args.max_mutations));
        cases += 1;
        match panic::catch_unwind(AssertUnwindSafe(|| run_case(&dir, &case))) {
            Err(_) => {
                let msg = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).clone();
                eprintln!("PANIC in case {case_seed}: {msg}");
                panics.push((case_seed, msg));
            }
            Ok(outcome) => {
                if let Some(v) = contract_violation(&outcome) {
                    eprintln!("VIOLATION in case {case_seed}: {v}");
                    violations.push((case_seed, v));
                }
                match outcome {
                    Outcome::Loaded => loaded += 1,
                    Outcome::Rejected(e) => *kinds.entry(kind(&e)).or_default() += 1,
                    Outcome::ForwardFailed(e) => {
                        *kinds.entry(format!("forward: {}", kind(&e))).or_default() += 1
                    }
                }
            }
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            last_report = Instant::now();
            eprintln!(
                "{:>5.0} s: {cases} cases, {} panics",
                start.elapsed().as_secs_f64(),
                panics.len()
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "seed {seed}: {cases} cases in {secs:.1} s ({:.0}/s)",
        cases as f64 / secs
    );
    println!("{loaded:>10}  loaded (benign mutation)");
    for (k, n) in &kinds {
        println!("{n:>10}  {k}");
    }
    println!("{:>10}  panics", panics.len());
    println!("{:>10}  errors naming no file", violations.len());
    println!(
        "largest single allocation: {} bytes",
        LARGEST_ALLOC.load(Ordering::Relaxed)
    );
    for (case_seed, msg) in panics.iter().take(20) {
        println!("panic, replay with --replay {case_seed}: {msg}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    ExitCode::from((!panics.is_empty() || !violations.is_empty()) as u8)
}
