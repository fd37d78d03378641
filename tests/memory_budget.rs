//! The memory estimate against what the loader and the caches really take,
//! and the refusal of a run that cannot fit.

mod common;

use common::synth_dir;
use gpt2::memory::{self, Footprint};
use gpt2::synth::Preset;
use gpt2::{Dtype, Gpt2Config, Gpt2Model, KvCache, KvDtype};

/// Bytes of the tensors the loader copies as f32: `wpe`, each block's two
/// norms (weight and bias) and four biases, `ln_f`. Written out here, apart
/// from the loader's table, so that the two are checked against each other.
fn copied_bytes(c: &Gpt2Config) -> u64 {
    let (l, e, f, p) = (c.n_layer, c.n_embd, c.n_inner, c.n_positions);
    let per_block = 2 * e + 3 * e + e + 2 * e + f + e;
    4 * (p * e + l * per_block + 2 * e) as u64
}

/// The 124M checkpoint loaded in each dtype: the estimate's weights are the
/// loader's packed bytes plus the copied f32 tensors, to the byte (no
/// tolerance: both count the same layout).
#[test]
fn weights_estimate_is_what_the_loader_holds() {
    let dir = synth_dir(Preset::Gpt2_124M, 0);
    for dtype in Dtype::ALL {
        let model = Gpt2Model::load_with(&dir, dtype).unwrap();
        let f = Footprint::estimate(&model.config, dtype, KvDtype::F32, 1, 1, 1);
        let packed = model.weights.packed_bytes as u64;
        assert_eq!(f.weights, packed + copied_bytes(&model.config), "{dtype}");
    }
}

/// GPT-2 XL (1.56 B parameters) in f32 is about 6.2 GB; bf16 about half,
/// int8 about a quarter (plus the f32 copies and int8's column scales).
#[test]
fn xl_weights_are_its_parameters_in_the_dtype() {
    let xl = Preset::Xl.config(0);
    let bytes = |dtype| Footprint::estimate(&xl, dtype, KvDtype::F32, 0, 0, 1).weights as f64;
    let f32 = bytes(Dtype::F32);
    assert!((6.1e9..6.35e9).contains(&f32), "xl f32 weights {f32}");
    let bf16 = bytes(Dtype::Bf16);
    assert!(
        (0.49..0.52).contains(&(bf16 / f32)),
        "xl bf16 / f32 = {}",
        bf16 / f32
    );
    let int8 = bytes(Dtype::Int8);
    assert!(
        (0.24..0.28).contains(&(int8 / f32)),
        "xl int8 / f32 = {}",
        int8 / f32
    );
}

/// One sequence's KV cache is what `KvCache::resident_bytes` says for its
/// format: 124M's full f32 context is 72 MiB, bf16 about half of it.
#[test]
fn kv_estimate_is_the_cache_resident_bytes() {
    let c = Preset::Gpt2_124M.config(0);
    for kv in KvDtype::ALL {
        for positions in [0, 1, 17, 1024] {
            let f = Footprint::estimate(&c, Dtype::F32, kv, 3, positions, 1);
            assert_eq!(
                f.kv_per_sequence,
                KvCache::resident_bytes(&c, kv, positions) as u64,
                "{kv} {positions}"
            );
            assert_eq!(f.kv_caches(), 3 * f.kv_per_sequence);
        }
    }
    let full = |kv| Footprint::estimate(&c, Dtype::F32, kv, 1, 1024, 1).kv_per_sequence as f64;
    assert_eq!(full(KvDtype::F32), (2 * 12 * 1024 * 768 * 4) as f64);
    let ratio = full(KvDtype::Bf16) / full(KvDtype::F32);
    assert!((0.5..0.6).contains(&ratio), "bf16 / f32 KV = {ratio}");
}

/// The work buffers grow with the rows, by each row's activations,
/// attention scores and logits.
#[test]
fn scratch_grows_with_the_rows() {
    let c = Preset::Gpt2_124M.config(0);
    let rows = |n| Footprint::estimate(&c, Dtype::F32, KvDtype::F32, 1, 1, n).scratch;
    let per_row = rows(2000) - rows(1000);
    assert_eq!(per_row % 1000, 0);
    // At least the scores (H x P) and the logits (V) of a row, in f32.
    assert!(per_row / 1000 > 4 * (12 * 1024 + 50257), "{per_row}");
    assert_eq!(rows(2000) - rows(1000), rows(3000) - rows(2000));
}

/// XL with 4096 sequences of 1024 positions needs some 2.5 TB of KV
/// caches: refused, by name, with what it needs and what there is.
#[test]
fn an_absurd_run_is_refused_by_name() {
    let limit = memory::limit();
    if cfg!(target_os = "linux") {
        assert!(limit.is_some(), "Linux tells MemAvailable");
    }
    let Some(limit) = limit else { return };
    let xl = Preset::Xl.config(0);
    let f = Footprint::estimate(&xl, Dtype::F32, KvDtype::F32, 4096, 1024, 512);
    assert!(f.total() > limit.bytes);
    let what = "gpt2-xl f32, 4096 sequences of 1024 positions";
    let msg = memory::check(&f, what).unwrap_err().to_string();
    for needle in [
        "not enough memory",
        what,
        "weights 5.",
        "KV caches",
        "4096 x",
        "scratch",
        "available",
    ] {
        assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    }
    assert!(
        msg.contains(&limit.source) || msg.contains("MemAvailable") || msg.contains("cgroup"),
        "{msg}"
    );
}

/// A run that fits is not refused: the tiny model, one short sequence.
#[test]
fn a_small_run_passes() {
    let tiny = Preset::Tiny.config(0);
    let f = Footprint::estimate(&tiny, Dtype::F32, KvDtype::F32, 1, 16, 16);
    assert!(f.total() < 64 << 20, "{}", f.breakdown());
    memory::check(&f, "tiny").unwrap();
}

/// The peak resident size is readable and resettable on Linux, and the
/// peak never falls below what was just touched.
#[test]
#[cfg(target_os = "linux")]
fn peak_rss_is_read_and_reset() {
    assert!(
        memory::reset_peak_rss(),
        "Linux takes `5` in /proc/self/clear_refs"
    );
    let before = memory::peak_rss_bytes().unwrap();
    let touched = vec![1u8; 64 << 20];
    let after = memory::peak_rss_bytes().unwrap();
    assert!(
        after >= before && after >= touched.len() as u64,
        "{before} -> {after}"
    );
    std::hint::black_box(touched);
}

/// After a reset the peak is the resident size then, not the earlier
/// peak: 64 MiB touched and freed no longer count.
#[test]
fn the_peak_resets_to_the_resident_size() {
    let peak = || memory::peak_rss_bytes().unwrap_or(0);
    let touched = vec![1u8; 64 << 20];
    let before = peak();
    drop(std::hint::black_box(touched));
    if !memory::reset_peak_rss() {
        // Not Linux, or a kernel older than 4.0: nothing to reset.
        return;
    }
    assert!(
        peak() + (32 << 20) < before,
        "peak {} after the reset, {before} before",
        peak()
    );
}
