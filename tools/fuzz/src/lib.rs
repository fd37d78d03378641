//! The loader fuzzer as a library: a tiny valid checkpoint (the micro
//! config, [`MICRO_CONFIG`], and its `model.safetensors`), the ways to damage
//! it ([`Mutation`], grouped in [`Family`]s and drawn from a seed by
//! [`random_case`]), and the run of one damaged case against the loader
//! ([`run_case`]) with its outcome judged ([`contract_violation`]) and named
//! ([`kind`]). The contract: loading never panics, never trusts a size
//! written in a header, and turns every bad input into an [`Error`] that
//! names the file.
//!
//! Two programs drive it: the `fuzz_loader` binary (a timed run over a seed's
//! stream of cases, each case replayable from its own seed) and
//! `tests/loader_fuzz.rs` (the same mutations under proptest, plus the known
//! attacks one by one). Both install [`CappedAlloc`], which turns a runaway
//! allocation into a failure instead of swapping.

mod alloc;
mod mutation;

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::Mutex;

use serde_json::{json, Value};

pub use alloc::{CappedAlloc, ALLOC_CAP, LARGEST_ALLOC};
pub use mutation::{
    apply, grow_json, random_case, random_mutation, Bulk, Family, Mutation, Special, Target, FAMILIES,
};

use gpt2::weights::expected_shapes;
use gpt2::{Error, Gpt2Config, Gpt2Model};

/// L = 2, H = 2, C = 8, P = 4, V = 16, F = 32: 1920 parameters, 7.7 kB.
pub const MICRO_CONFIG: &str = r#"{"model_type":"gpt2","n_layer":2,"n_head":2,"n_embd":8,"n_positions":4,"n_ctx":4,"vocab_size":16,"eos_token_id":15}"#;

/// The undamaged micro checkpoint, taken apart: config, header entries in
/// file order, and the data section.
pub struct Base {
    /// `config.json`, parsed.
    pub config: Value,
    /// (name, `{"dtype", "shape", "data_offsets"}`) of each tensor.
    pub entries: Vec<(String, Value)>,
    /// The data section: every tensor's little-endian f32s, back to back.
    pub data: Vec<u8>,
}

/// Builds the undamaged micro checkpoint (its data: small, distinct, finite floats).
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
    /// The bytes of `config.json`.
    pub config: Vec<u8>,
    /// The bytes of `model.safetensors`.
    pub file: Vec<u8>,
    /// Files replaced by something else (the last one given wins).
    pub replaced: Vec<(Target, Special)>,
}

/// What loading one case gave.
pub enum Outcome {
    /// Loaded, finite, and a forward pass ran.
    Loaded,
    /// Refused by the loader or by `check_finite`.
    Rejected(Error),
    /// Loaded, but the forward pass returned an error.
    ForwardFailed(Error),
}

/// Removes whatever is at `path` (file, link, FIFO or directory).
fn remove(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).expect("clear the fuzz directory"),
        Ok(_) => std::fs::remove_file(path).expect("clear the fuzz directory"),
        Err(_) => {}
    }
}

fn write_fresh(path: &Path, bytes: &[u8], special: Option<Special>) {
    // Removed and created anew, never rewritten in place (no case's map is
    // alive by now anyway); also spares ext4's flush on replace-by-rename.
    remove(path);
    let made = match special {
        None => std::fs::write(path, bytes),
        Some(Special::Directory) => std::fs::create_dir(path),
        #[cfg(unix)]
        Some(Special::DevZero) => std::os::unix::fs::symlink("/dev/zero", path),
        #[cfg(unix)]
        Some(Special::Dangling) => std::os::unix::fs::symlink(path.with_extension("gone"), path),
        #[cfg(unix)]
        Some(Special::Fifo) => std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .and_then(|s| {
                s.success()
                    .then_some(())
                    .ok_or(std::io::Error::other(s.to_string()))
            }),
        #[cfg(not(unix))]
        Some(_) => Ok(()),
    };
    made.unwrap_or_else(|e| panic!("cannot make {} in the fuzz directory: {e}", path.display()));
}

/// Writes the case into `dir` and runs it: load, `check_finite`, and a
/// forward pass of up to two tokens. A panic propagates to the caller.
pub fn run_case(dir: &Path, case: &Case) -> Outcome {
    let special = |t: Target| case.replaced.iter().rev().find(|(f, _)| *f == t).map(|(_, k)| *k);
    write_fresh(&dir.join("config.json"), &case.config, special(Target::Config));
    let weights = dir.join("model.safetensors");
    write_fresh(&weights, &case.file, special(Target::Weights));
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

/// [`run_case`] with a panic caught: `Err` holds its message, as the hook of
/// [`quiet_panics`] recorded it (with its location) or, without that hook,
/// the panic's payload.
pub fn run_case_caught(dir: &Path, case: &Case) -> Result<Outcome, String> {
    panic::catch_unwind(AssertUnwindSafe(|| run_case(dir, case))).map_err(|payload| {
        let recorded = std::mem::take(&mut *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()));
        if !recorded.is_empty() {
            return recorded;
        }
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
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

/// The latest panic's message and location, as [`quiet_panics`]'s hook saw it.
pub static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

/// Replaces the panic hook of the whole process by one that prints nothing
/// and keeps the panic's message in [`LAST_PANIC`], for a long run that
/// reports panics itself.
pub fn quiet_panics() {
    panic::set_hook(Box::new(|info| {
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = info.to_string();
    }));
}

/// What a run of cases found.
#[derive(Debug, Default)]
pub struct Tally {
    /// Cases run.
    pub cases: u64,
    /// Cases that loaded and ran: the mutation was benign.
    pub loaded: u64,
    /// Refusals by [`kind`]; a failed forward pass as `forward: <kind>`.
    pub kinds: BTreeMap<String, u64>,
    /// (case seed, message) of each panic.
    pub panics: Vec<(u64, String)>,
    /// (case seed, what is wrong) of each [`contract_violation`].
    pub violations: Vec<(u64, String)>,
}

impl Tally {
    /// Counts one case's result (from [`run_case_caught`]). Returns the line
    /// to report at once, for a panic or a contract violation.
    pub fn record(&mut self, case_seed: u64, result: Result<Outcome, String>) -> Option<String> {
        self.cases += 1;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(msg) => {
                let line = format!("PANIC in case {case_seed}: {msg}");
                self.panics.push((case_seed, msg));
                return Some(line);
            }
        };
        let violation = contract_violation(&outcome);
        match outcome {
            Outcome::Loaded => self.loaded += 1,
            Outcome::Rejected(e) => *self.kinds.entry(kind(&e)).or_default() += 1,
            Outcome::ForwardFailed(e) => {
                *self.kinds.entry(format!("forward: {}", kind(&e))).or_default() += 1
            }
        }
        let v = violation?;
        let line = format!("VIOLATION in case {case_seed}: {v}");
        self.violations.push((case_seed, v));
        Some(line)
    }

    /// No panic and no contract violation.
    pub fn passed(&self) -> bool {
        self.panics.is_empty() && self.violations.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_case_seed_fixes_its_mutations() {
        let a = format!("{:?}", random_case(7, &FAMILIES, 3));
        assert_eq!(a, format!("{:?}", random_case(7, &FAMILIES, 3)));
        assert_ne!(a, format!("{:?}", random_case(8, &FAMILIES, 3)));
    }

    #[test]
    fn a_tally_counts_and_reports() {
        let mut t = Tally::default();
        assert_eq!(t.record(1, Ok(Outcome::Loaded)), None);
        let line = t.record(2, Err("boom".into()));
        assert_eq!(line.as_deref(), Some("PANIC in case 2: boom"));
        let unnamed = Error::Config {
            path: "elsewhere".into(),
            msg: "bad".into(),
        };
        let line = t.record(3, Ok(Outcome::Rejected(unnamed))).unwrap();
        assert!(
            line.starts_with("VIOLATION in case 3: load error names no file"),
            "{line}"
        );
        assert_eq!(
            (t.cases, t.loaded, t.panics.len(), t.violations.len()),
            (3, 1, 1, 1)
        );
        assert!(!t.passed());
    }
}
