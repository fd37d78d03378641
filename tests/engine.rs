//! The forward API: prefill vs decode, batches vs sequences alone, bad rows.

mod common;

use common::{assert_close, synth_dir};
use gpt2::synth::Preset;
use gpt2::{Error, Gpt2Model, KvCache, KvDtype, Row};

fn tiny() -> Gpt2Model {
    Gpt2Model::load(&synth_dir(Preset::Tiny, 0)).unwrap()
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 7919 + salt * 104_729) % 50257)
        .collect()
}

fn rows(seq: usize, tokens: &[u32], start: usize) -> Vec<Row> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, &token)| Row {
            seq,
            token,
            pos: start + i,
            logits: true,
        })
        .collect()
}

#[test]
fn prefill_equals_token_by_token_decode() {
    let m = tiny();
    let tokens = prompt(40, 1);
    let prefill = m.logits_all(&tokens, 64).unwrap();
    // One row at a time through the cache.
    let mut cache = m.new_cache().expect("cache");
    let mut scratch = m.new_scratch(1).expect("scratch");
    let mut decode = Vec::new();
    for (pos, &token) in tokens.iter().enumerate() {
        let row = Row {
            seq: 0,
            token,
            pos,
            logits: true,
        };
        decode.extend_from_slice(m.forward(&[row], &mut [&mut cache], &mut scratch).unwrap());
    }
    let d = assert_close("prefill vs decode", &decode, &prefill, 1e-5, 0.0);
    eprintln!("prefill vs decode: max abs diff {d:e}");
    // And in uneven chunks (7 rows, then the rest), which is how long prompts run.
    let chunked = m.logits_all(&tokens, 7).unwrap();
    assert_close("prefill in chunks of 7", &chunked, &prefill, 1e-5, 0.0);
}

#[test]
fn a_batch_of_sequences_equals_each_sequence_alone() {
    let m = tiny();
    let v = m.config.vocab_size;
    let prompts = [prompt(5, 1), prompt(12, 2), prompt(1, 3), prompt(30, 4)];
    let alone: Vec<Vec<f32>> = prompts.iter().map(|p| m.logits_all(p, 64).unwrap()).collect();

    // Bring the sequences to different positions: prefill all but the last token...
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| m.new_cache().expect("cache")).collect();
    let mut scratch = m.new_scratch(64).expect("scratch");
    for (i, p) in prompts.iter().enumerate() {
        if p.len() > 1 {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            m.forward(&rows(i, &p[..p.len() - 1], 0), &mut refs, &mut scratch)
                .unwrap();
        }
    }
    // ...then one batched decode step with a row from every sequence, in a
    // shuffled order, plus an extra row that wants no logits.
    let order = [2, 0, 3, 1];
    let mut batch: Vec<Row> = order
        .iter()
        .map(|&i| Row {
            seq: i,
            token: *prompts[i].last().unwrap(),
            pos: prompts[i].len() - 1,
            logits: true,
        })
        .collect();
    batch.push(Row {
        seq: 1,
        token: 42,
        pos: prompts[1].len(),
        logits: false,
    });
    let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
    let logits = m.forward(&batch, &mut refs, &mut scratch).unwrap();
    assert_eq!(logits.len(), order.len() * v, "only rows that ask get logits");
    for (j, &i) in order.iter().enumerate() {
        let want = &alone[i][(prompts[i].len() - 1) * v..][..v];
        assert_close(
            &format!("sequence {i} in a batch"),
            &logits[j * v..][..v],
            want,
            1e-5,
            0.0,
        );
    }
    assert_eq!(caches[1].len(), prompts[1].len() + 1);
}

#[test]
fn bad_rows_are_rejected_before_any_work() {
    let m = tiny();
    let mut cache = m.new_cache().expect("cache");
    let mut scratch = m.new_scratch(4).expect("scratch");
    let row = |token, pos| Row {
        seq: 0,
        token,
        pos,
        logits: true,
    };
    let err = m
        .forward(&[row(50257, 0)], &mut [&mut cache], &mut scratch)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TokenId {
                id: 50257,
                vocab_size: 50257
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("50257"), "{err}");
    let err = m
        .forward(&[row(1, 1)], &mut [&mut cache], &mut scratch)
        .unwrap_err();
    assert!(err.to_string().contains("expects position 0, got 1"), "{err}");
    let err = m.forward(&[], &mut [&mut cache], &mut scratch).unwrap_err();
    assert!(matches!(err, Error::Batch(_)), "{err}");
    let five: Vec<Row> = (0..5).map(|p| row(1, p)).collect();
    let err = m.forward(&five, &mut [&mut cache], &mut scratch).unwrap_err();
    assert!(err.to_string().contains("at most 4"), "{err}");
    let err = m
        .forward(&[Row { seq: 3, ..row(1, 0) }], &mut [&mut cache], &mut scratch)
        .unwrap_err();
    assert!(err.to_string().contains("sequence 3"), "{err}");
    assert_eq!(cache.len(), 0, "a rejected batch leaves the cache alone");
}

#[test]
fn more_positions_than_the_context_window_is_an_error() {
    let m = tiny();
    let n = m.config.n_positions; // 128
    let err = m.logits_all(&prompt(n + 1, 5), 64).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ContextLength {
                pos: 128,
                n_positions: 128
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("n_positions = 128"), "{err}");
    assert!(
        m.logits_all(&prompt(n, 5), 64).is_ok(),
        "exactly n_positions fits"
    );
}

#[test]
fn the_model_is_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Gpt2Model>();
    let m = tiny();
    let want = m.logits_all(&prompt(9, 6), 64).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| assert_eq!(m.logits_all(&prompt(9, 6), 64).unwrap(), want));
        }
    });
}

#[test]
fn a_kv_cache_too_large_for_memory_is_an_error_not_an_abort() {
    use gpt2::Gpt2Config;
    let config = |n_layer: u64, n_positions: u64| {
        Gpt2Config::from_json(&format!(
            r#"{{"n_layer": {n_layer}, "n_head": 1, "n_embd": 8, "n_positions": {n_positions}, "vocab_size": 16}}"#
        ))
        .unwrap()
    };
    // 2^30 layers x 2^16 positions x 8 channels: 2 PiB of keys, past any
    // address space, so the OS refuses the map.
    let err = KvCache::new(&config(1 << 30, 1 << 16), KvDtype::F32)
        .err()
        .expect("no such map");
    let msg = err.to_string();
    assert!(
        msg.contains("cannot allocate a KV cache of 2 x 1073741824 layers x 65536 positions x 8 channels"),
        "{msg}"
    );
    // 2^40 x 2^20 x 8 floats fit a usize, their bytes do not.
    let err = KvCache::new(&config(1 << 40, 1 << 20), KvDtype::F32)
        .err()
        .expect("no such size");
    assert!(err.to_string().contains("overflow"), "{err}");
    // A small one maps.
    assert!(KvCache::new(&config(2, 16), KvDtype::F32).unwrap().is_empty());
}
