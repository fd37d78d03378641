//! `gpt2 serve` refuses, before it reads a weight, a configuration whose
//! weights, KV caches and work buffers could outgrow the machine's memory,
//! and exits non-zero saying so; one that fits goes on to load.

mod common;

use common::scratch_dir;
use common::server::ServerProcess;
use gpt2::synth::Preset;
use gpt2::{Dtype, Footprint, KvDtype};

/// A checkpoint directory holding only the XL config: the refusal must come
/// before the loader looks for `model.safetensors`.
fn xl_config_only(name: &str) -> String {
    let dir = scratch_dir(name);
    std::fs::write(dir.join("config.json"), Preset::Xl.config_json(0)).unwrap();
    dir.to_str().unwrap().to_string()
}

/// A million sequences a step is some 400 GB of work buffers for XL
/// (each row's attention scores and logits): more than any test machine has.
#[test]
fn serve_refuses_a_batch_too_large_for_memory() {
    let dir = xl_config_only("memory-refusal-xl-batch");
    let mut server = ServerProcess::start(&["--weights", &dir, "--max-batch", "1000000"], &[]);
    let status = server.wait();
    let stderr = server.stderr();
    assert!(!status.success(), "exit {status}; stderr:\n{stderr}");
    for needle in [
        "not enough memory",
        "--max-batch 1000000",
        "weights 5.",
        "scratch",
        "available",
    ] {
        assert!(stderr.contains(needle), "`{needle}` not in stderr:\n{stderr}");
    }
    // Refused on the config alone: the missing weights file was never opened.
    assert!(!stderr.contains("model.safetensors"), "{stderr}");
    assert!(!stderr.contains("loading the weights"), "{stderr}");
}

/// The same XL config with a default batch is not refused on this account
/// (weights of 6.2 GB fit the machines the tests run on): it gets as far
/// as the loader, which then finds no weights file. Skipped where the
/// machine cannot hold XL's weights at all.
#[test]
fn serve_with_a_fitting_batch_goes_on_to_load() {
    // One sequence, 129 rows a step, the 256 MiB prefix cache, and room to spare.
    let xl = Footprint::estimate(&Preset::Xl.config(0), Dtype::F32, KvDtype::F32, 1, 1024, 129);
    let roomy = gpt2::memory::limit().is_none_or(|l| l.bytes > xl.total() + (1 << 30));
    if !roomy {
        eprintln!("skipped: this machine cannot hold XL's weights");
        return;
    }
    let dir = xl_config_only("memory-refusal-xl-fits");
    let mut server = ServerProcess::start(&["--weights", &dir, "--max-batch", "1"], &[]);
    let status = server.wait();
    let stderr = server.stderr();
    assert!(!status.success(), "{stderr}");
    assert!(!stderr.contains("not enough memory"), "{stderr}");
    assert!(stderr.contains("model.safetensors"), "{stderr}");
}
