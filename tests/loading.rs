//! Loading checkpoints: both naming styles, and a clear error for every bad input.

mod common;

use std::path::Path;

use common::scratch_dir;
use gpt2::weights::expected_shapes;
use gpt2::{Error, Gpt2Config, Gpt2Model};

const MICRO: &str =
    r#"{"model_type":"gpt2","n_layer":1,"n_head":2,"n_embd":8,"n_positions":16,"vocab_size":32}"#;

/// A tensor to write: name, dtype string, shape, raw little-endian bytes.
type Entry = (String, &'static str, Vec<usize>, Vec<u8>);

/// Every tensor of the micro config, with `prefix` ("transformer." or "").
fn micro_tensors(prefix: &str) -> Vec<Entry> {
    let config = Gpt2Config::from_json(MICRO).unwrap();
    expected_shapes(&config)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let bytes = (0..n)
                .flat_map(|j| (((i * 31 + j * 17) % 23) as f32 / 23.0 - 0.5).to_le_bytes())
                .collect();
            (format!("{prefix}{name}"), "F32", shape, bytes)
        })
        .collect()
}

/// Writes a safetensors file by hand, so tests control every byte. `pad`
/// extra header bytes move the data section (alignment tests).
fn write_safetensors(path: &Path, tensors: &[Entry], pad: usize) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut text = serde_json::Value::Object(header).to_string();
    text.push_str(&" ".repeat(pad));
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(text.as_bytes());
    for (_, _, _, bytes) in tensors {
        file.extend_from_slice(bytes);
    }
    std::fs::write(path, file).unwrap();
}

fn checkpoint(name: &str, config: &str, tensors: &[Entry], pad: usize) -> std::path::PathBuf {
    let dir = scratch_dir(name);
    std::fs::write(dir.join("config.json"), config).unwrap();
    write_safetensors(&dir.join("model.safetensors"), tensors, pad);
    dir
}

fn load_err(dir: &Path) -> Error {
    match Gpt2Model::load(dir) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn both_naming_styles_load_and_agree() {
    let hf = checkpoint("load-hf", MICRO, &micro_tensors("transformer."), 0);
    // The hub's original file: no prefix, plus causal-mask buffers to skip.
    let mut hub = micro_tensors("");
    hub.push((
        "h.0.attn.bias".into(),
        "F32",
        vec![1, 1, 16, 16],
        vec![0; 16 * 16 * 4],
    ));
    hub.push(("h.0.attn.masked_bias".into(), "F32", vec![], vec![0; 4]));
    let hub = checkpoint("load-hub", MICRO, &hub, 0);
    let a = Gpt2Model::load(&hf).unwrap().logits_all(&[1, 2, 3], 8).unwrap();
    let b = Gpt2Model::load(&hub).unwrap().logits_all(&[1, 2, 3], 8).unwrap();
    assert_eq!(a, b);
}

/// The tensors are read from the file, not mapped: a data section on, or
/// off, a 4-byte boundary loads alike, and what the model keeps is in memory.
#[test]
fn weights_load_alike_whether_aligned_or_not() {
    let tensors = micro_tensors("transformer.");
    // Paddings that put the data section on, and off, a 4-byte boundary.
    let data_start = |pad| {
        let dir = checkpoint("load-probe", MICRO, &tensors, pad);
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
    };
    let on = (0..4).find(|&p| data_start(p) % 4 == 0).unwrap();
    let off = (0..4).find(|&p| data_start(p) % 4 != 0).unwrap();
    let aligned = Gpt2Model::load(&checkpoint("load-aligned", MICRO, &tensors, on)).unwrap();
    let misaligned = Gpt2Model::load(&checkpoint("load-misaligned", MICRO, &tensors, off)).unwrap();
    // Either way, what the model keeps no longer refers to the file.
    assert!(!aligned.weights.embed.wpe.in_file());
    assert!(!misaligned.weights.embed.wpe.in_file());
    assert_eq!(
        aligned.logits_all(&[5, 6], 8).unwrap(),
        misaligned.logits_all(&[5, 6], 8).unwrap()
    );
}

#[test]
fn an_untied_lm_head_is_used() {
    let mut tensors = micro_tensors("transformer.");
    let tied = Gpt2Model::load(&checkpoint("load-tied", MICRO, &tensors, 0)).unwrap();
    tensors.push(("lm_head.weight".into(), "F32", vec![32, 8], vec![0; 32 * 8 * 4]));
    let untied = Gpt2Model::load(&checkpoint("load-untied", MICRO, &tensors, 0)).unwrap();
    assert!(!untied.weights.embed.is_tied());
    assert!(untied.logits_all(&[1], 8).unwrap().iter().all(|&x| x == 0.0));
    assert!(tied.logits_all(&[1], 8).unwrap().iter().any(|&x| x != 0.0));
}

/// Tied, the token embeddings come from the packed LM head; untied, from
/// `wte`. An untied head equal to `wte` must give the tied model's logits
/// exactly, and a different head different ones.
#[test]
fn embeddings_and_lm_head_agree_tied_and_untied() {
    let mut tensors = micro_tensors("transformer.");
    let tied = Gpt2Model::load(&checkpoint("load-tied-same", MICRO, &tensors, 0)).unwrap();
    let wte = tensors
        .iter()
        .find(|t| t.0 == "transformer.wte.weight")
        .unwrap()
        .clone();
    tensors.push(("lm_head.weight".into(), "F32", wte.2.clone(), wte.3.clone()));
    let same = Gpt2Model::load(&checkpoint("load-untied-same", MICRO, &tensors, 0)).unwrap();
    let tokens = [0, 1, 5, 31];
    assert_eq!(
        tied.logits_all(&tokens, 8).unwrap(),
        same.logits_all(&tokens, 8).unwrap()
    );
    // A head that differs from wte in one row changes that token's logit only.
    let head = tensors.last_mut().unwrap();
    head.3[..8 * 4].iter_mut().for_each(|b| *b = 0);
    let other = Gpt2Model::load(&checkpoint("load-untied-other", MICRO, &tensors, 0)).unwrap();
    let (a, b) = (
        tied.logits_all(&tokens, 8).unwrap(),
        other.logits_all(&tokens, 8).unwrap(),
    );
    for (ra, rb) in a.chunks_exact(32).zip(b.chunks_exact(32)) {
        assert_eq!(rb[0], 0.0);
        assert_eq!(ra[1..], rb[1..]);
    }
}

#[test]
fn missing_files_name_their_path() {
    let dir = scratch_dir("load-missing");
    let err = load_err(&dir);
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains("config.json"),
        "{err}"
    );
    std::fs::write(dir.join("config.json"), MICRO).unwrap();
    let err = load_err(&dir);
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn truncated_or_corrupt_files_are_named_errors() {
    let dir = checkpoint("load-truncated", MICRO, &micro_tensors("transformer."), 0);
    let path = dir.join("model.safetensors");
    let full = std::fs::read(&path).unwrap();
    for (what, bytes) in [
        ("cut in half", full[..full.len() / 2].to_vec()),
        ("cut by one byte", full[..full.len() - 1].to_vec()),
        ("three bytes", full[..3].to_vec()),
        ("empty", Vec::new()),
        ("garbage", b"this is not a safetensors file at all".to_vec()),
        (
            "header length past the end",
            [&u64::MAX.to_le_bytes()[..], &full[8..]].concat(),
        ),
    ] {
        std::fs::write(&path, &bytes).unwrap();
        let err = load_err(&dir);
        assert!(matches!(err, Error::Safetensors { .. }), "{what}: {err}");
        assert!(err.to_string().contains("model.safetensors"), "{what}: {err}");
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let mut tensors = micro_tensors("transformer.");
    tensors.retain(|t| t.0 != "transformer.h.0.mlp.c_fc.bias");
    let err = load_err(&checkpoint("load-missing-tensor", MICRO, &tensors, 0));
    assert!(
        matches!(&err, Error::MissingTensor { tensor, .. } if tensor == "transformer.h.0.mlp.c_fc.bias"),
        "{err}"
    );
}

#[test]
fn a_wrong_shape_names_tensor_expected_and_got() {
    let mut tensors = micro_tensors("transformer.");
    let t = tensors
        .iter_mut()
        .find(|t| t.0 == "transformer.h.0.attn.c_attn.weight")
        .unwrap();
    t.2 = vec![24, 8]; // transposed: [out, in] instead of [in, out]
    let err = load_err(&checkpoint("load-shape", MICRO, &tensors, 0));
    let msg = err.to_string();
    assert!(matches!(err, Error::Shape { .. }), "{msg}");
    assert!(
        msg.contains("c_attn.weight") && msg.contains("[24, 8]") && msg.contains("[8, 24]"),
        "{msg}"
    );
}

#[test]
fn a_config_that_disagrees_with_the_tensors_is_a_shape_error() {
    let config = MICRO.replace("\"n_embd\":8", "\"n_embd\":16");
    let err = load_err(&checkpoint(
        "load-mismatch",
        &config,
        &micro_tensors("transformer."),
        0,
    ));
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    assert!(err.to_string().contains("from config.json"), "{err}");
}

#[test]
fn a_dtype_we_cannot_read_is_named() {
    for (dtype, size) in [("I8", 1), ("F64", 8)] {
        let mut tensors = micro_tensors("transformer.");
        for t in tensors.iter_mut().filter(|t| t.0 == "transformer.wte.weight") {
            t.1 = dtype;
            t.3.resize(t.3.len() / 4 * size, 0);
        }
        let err = load_err(&checkpoint("load-bad-dtype", MICRO, &tensors, 0));
        let msg = err.to_string();
        assert!(
            matches!(err, Error::Dtype { .. })
                && msg.contains(dtype)
                && msg.contains("wte")
                && msg.contains("model.safetensors"),
            "{msg}"
        );
    }
}

/// The tiny synthetic checkpoint with every tensor rounded to `dtype` (BF16
/// or F16, round to nearest even), written twice: stored in that dtype, and
/// stored as f32 holding exactly the rounded values.
fn rounded_checkpoints(dtype: safetensors::Dtype) -> (std::path::PathBuf, std::path::PathBuf) {
    use safetensors::tensor::TensorView;
    let src = common::synth_dir(gpt2::synth::Preset::Tiny, 0);
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tag = format!("{dtype:?}").to_lowercase();
    let (half_dir, f32_dir) = (
        scratch_dir(&format!("load-{tag}")),
        scratch_dir(&format!("load-{tag}-as-f32")),
    );
    let mut halves: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut rounded: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let values = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()));
        let (mut h, mut r) = (Vec::new(), Vec::new());
        for v in values {
            let (bits, back) = match dtype {
                safetensors::Dtype::BF16 => {
                    let x = half::bf16::from_f32(v);
                    (x.to_bits(), x.to_f32())
                }
                _ => {
                    let x = half::f16::from_f32(v);
                    (x.to_bits(), x.to_f32())
                }
            };
            h.extend_from_slice(&bits.to_le_bytes());
            r.extend_from_slice(&back.to_le_bytes());
        }
        halves.push((name.clone(), view.shape().to_vec(), h));
        rounded.push((name, view.shape().to_vec(), r));
    }
    let write = |dir: &Path, dt, tensors: &[(String, Vec<usize>, Vec<u8>)]| {
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, shape, b)| (n.clone(), TensorView::new(dt, shape.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    };
    write(&half_dir, dtype, &halves);
    write(&f32_dir, safetensors::Dtype::F32, &rounded);
    (half_dir, f32_dir)
}

/// BF16 and F16 checkpoints are read natively (converted exactly to f32 as
/// they are packed, then to the run's dtype): the same logits, bit for bit,
/// as an f32 file holding the same values, at every `--dtype`.
#[test]
fn bf16_and_f16_checkpoints_load_as_their_exact_f32_values() {
    for dtype in [safetensors::Dtype::BF16, safetensors::Dtype::F16] {
        let (half_dir, f32_dir) = rounded_checkpoints(dtype);
        let tokens = [15496, 11, 703, 389, 50256];
        for run in gpt2::Dtype::ALL {
            let half = Gpt2Model::load_with(&half_dir, run).unwrap();
            let full = Gpt2Model::load_with(&f32_dir, run).unwrap();
            assert_eq!(
                half.logits_all(&tokens, 8).unwrap(),
                full.logits_all(&tokens, 8).unwrap(),
                "{dtype:?} file, {run} weights"
            );
        }
        let half = Gpt2Model::load(&half_dir).unwrap();
        assert!(
            !half.weights.embed.wpe.in_file(),
            "{dtype:?}: still reads the file"
        );
    }
}

/// A BF16 tensor whose bytes do not match its shape is named, with its dtype.
#[test]
fn a_bf16_tensor_of_the_wrong_size_is_named() {
    let mut tensors = micro_tensors("");
    for t in tensors.iter_mut().filter(|t| t.0 == "h.0.mlp.c_fc.weight") {
        t.1 = "BF16";
        t.3.truncate(t.3.len() / 2 - 2);
    }
    let err = load_err(&checkpoint("load-bf16-size", MICRO, &tensors, 0));
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("`h.0.mlp.c_fc.weight`")
            && msg.contains("of BF16 needs"),
        "{msg}"
    );
}

#[test]
fn unknown_and_duplicated_tensors_are_rejected() {
    let mut tensors = micro_tensors("transformer.");
    tensors.push(("transformer.h.0.attn.rotary".into(), "F32", vec![1], vec![0; 4]));
    let err = load_err(&checkpoint("load-unknown", MICRO, &tensors, 0));
    assert!(
        matches!(&err, Error::UnknownTensor { tensor, .. } if tensor == "transformer.h.0.attn.rotary"),
        "{err}"
    );

    // A mask buffer of a layer the config does not have is not "exactly those".
    let mut tensors = micro_tensors("");
    tensors.push(("h.5.attn.bias".into(), "F32", vec![1], vec![0; 4]));
    let err = load_err(&checkpoint("load-unknown-mask", MICRO, &tensors, 0));
    assert!(matches!(err, Error::UnknownTensor { .. }), "{err}");

    let mut tensors = micro_tensors("transformer.");
    tensors.push(("wpe.weight".into(), "F32", vec![16, 8], vec![0; 16 * 8 * 4]));
    let err = load_err(&checkpoint("load-duplicate", MICRO, &tensors, 0));
    assert!(matches!(err, Error::DuplicateTensor { .. }), "{err}");
}

#[test]
fn an_unsupported_config_is_rejected_with_the_path() {
    let config = MICRO.replace("\"n_layer\"", "\"activation_function\":\"relu\",\"n_layer\"");
    let err = load_err(&checkpoint(
        "load-relu",
        &config,
        &micro_tensors("transformer."),
        0,
    ));
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Config { .. }) && msg.contains("config.json") && msg.contains("relu"),
        "{msg}"
    );
    let dir = checkpoint("load-badjson", "{not json", &micro_tensors("transformer."), 0);
    assert!(matches!(load_err(&dir), Error::Config { .. }));
}

/// Once loaded, nothing reads the checkpoint file: rewriting it in place or
/// truncating it (as `cp` or a download client would) under a running model
/// changes nothing, and faults nothing (it was SIGBUS). Tied and untied.
#[test]
fn a_checkpoint_rewritten_in_place_after_loading_is_never_read() {
    let mut tensors = micro_tensors("transformer.");
    for untied in [false, true] {
        if untied {
            tensors.push(("lm_head.weight".into(), "F32", vec![32, 8], vec![7; 32 * 8 * 4]));
        }
        let dir = checkpoint(
            if untied {
                "load-rewrite-untied"
            } else {
                "load-rewrite"
            },
            MICRO,
            &tensors,
            0,
        );
        let model = Gpt2Model::load(&dir).unwrap();
        let before = model.logits_all(&[5, 6, 7], 8).unwrap();
        let path = dir.join("model.safetensors");
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        // In place: the same inode, first other bytes of the same size, then cut short.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &vec![0xFF; len]))
            .unwrap();
        assert_eq!(
            model.logits_all(&[5, 6, 7], 8).unwrap(),
            before,
            "untied: {untied}"
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1000)
            .unwrap();
        assert_eq!(
            model.logits_all(&[5, 6, 7], 8).unwrap(),
            before,
            "untied: {untied}"
        );
    }
}

/// A header that names a tensor twice: JSON parsers keep one of the two
/// silently (the `safetensors` crate keeps the last); we refuse it by name.
#[test]
fn a_key_given_twice_in_the_header_is_refused() {
    let dir = checkpoint("load-duplicate-key", MICRO, &micro_tensors(""), 0);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    // Repeat the first entry (same key, same bytes) at the end of the object.
    let first_end = header.find("]}").unwrap() + 2;
    let entry = &header[1..first_end];
    let doubled = format!("{},{entry}}}", &header[..header.len() - 1]);
    let mut file = (doubled.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(doubled.as_bytes());
    file.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, file).unwrap();
    let err = load_err(&dir);
    let key = entry.split('"').nth(1).unwrap();
    assert!(
        matches!(err, Error::Safetensors { .. })
            && err.to_string().contains(&format!("`{key}` appears twice")),
        "{err}"
    );
}

/// The finiteness check reads the weights as converted: NaN or infinity is
/// refused in every dtype, naming the tensor; a finite f32 past bf16's range
/// (which rounds to infinity) is refused in bf16 only.
#[test]
fn non_finite_weights_are_refused_in_every_dtype() {
    let name = "h.0.mlp.c_fc.weight"; // (8, 32)
    let index = 3 * 32 + 5;
    let poisoned = |value: f32| {
        let mut tensors = micro_tensors("");
        let entry = tensors.iter_mut().find(|t| t.0 == name).unwrap();
        entry.3[index * 4..index * 4 + 4].copy_from_slice(&value.to_le_bytes());
        checkpoint("load-non-finite", MICRO, &tensors, 0)
    };
    for dtype in gpt2::Dtype::ALL {
        for value in [f32::NAN, f32::NEG_INFINITY] {
            let dir = poisoned(value);
            match Gpt2Model::load_with(&dir, dtype) {
                Err(Error::NonFinite {
                    tensor, index: got, ..
                }) => {
                    assert_eq!(tensor, name, "{dtype}");
                    // Int8 finds the column (its scale), and names its first element.
                    let want = if dtype == gpt2::Dtype::Int8 { 5 } else { index };
                    assert_eq!(got, want, "{dtype} {value}");
                }
                Err(e) => panic!("{dtype} {value}: {e}"),
                Ok(_) => panic!("{dtype}: a checkpoint with {value} loaded"),
            }
        }
        let dir = poisoned(3.4e38);
        let loaded = Gpt2Model::load_with(&dir, dtype);
        match dtype {
            gpt2::Dtype::Bf16 => {
                let err = loaded
                    .err()
                    .expect("3.4e38 rounds to infinity in bf16")
                    .to_string();
                assert!(err.contains(name) && err.contains("inf"), "{err}");
            }
            _ => assert!(loaded.is_ok(), "{dtype}: 3.4e38 is finite"),
        }
    }
}
