//! One batched decode step that can be run again and again: `batch`
//! sequences with `position` tokens cached each, every run decoding the same
//! position (the caches are rewound after it). The e2e bench and
//! `throughput --probe` time it.

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::model::{Gpt2Model, KvCache, Row, Scratch};

/// `batch` sequences, prefilled, ready to decode one row each.
pub struct DecodeStep {
    caches: Vec<KvCache>,
    rows: Vec<Row>,
    position: usize,
    /// The step's scratch; set its `profile` to see where a run goes.
    pub scratch: Scratch,
}

impl DecodeStep {
    /// Prefills `batch` caches with the same `position` tokens each (capped
    /// by the context window) on the current rayon pool.
    pub fn new(model: &Gpt2Model, batch: usize, position: usize) -> Result<Self> {
        let cfg = &model.config;
        let position = position.min(cfg.n_positions - 1);
        let token = |i: usize| (i * 101 % cfg.vocab_size) as u32;
        let mut caches: Vec<KvCache> = (0..batch).map(|_| model.new_cache()).collect::<Result<_>>()?;
        let mut scratch = model.new_scratch(position.max(batch).max(1))?;
        let prompt: Vec<Row> = (0..position)
            .map(|p| Row {
                seq: 0,
                token: token(p),
                pos: p,
                logits: false,
            })
            .collect();
        // One sequence computes the prompt; the others copy its cache (the
        // same bits as computing it: `KvCache::copy_prefix_from`).
        if let Some((first, rest)) = caches.split_first_mut().filter(|_| !prompt.is_empty()) {
            model.forward(&prompt, &mut [first], &mut scratch)?;
            for cache in rest {
                cache.copy_prefix_from(first, position)?;
            }
        }
        let rows = (0..batch)
            .map(|s| Row {
                seq: s,
                token: token(position + s),
                pos: position,
                logits: true,
            })
            .collect();
        Ok(DecodeStep {
            caches,
            rows,
            position,
            scratch,
        })
    }

    /// The position every run decodes: the cached tokens per sequence.
    pub fn position(&self) -> usize {
        self.position
    }

    /// One forward pass of the batch (logits for every row), timed; the
    /// caches are then rewound to `position`.
    pub fn run(&mut self, model: &Gpt2Model) -> Result<Duration> {
        let mut refs: Vec<&mut KvCache> = self.caches.iter_mut().collect();
        let t0 = Instant::now();
        model.forward(&self.rows, &mut refs, &mut self.scratch)?;
        let elapsed = t0.elapsed();
        for cache in refs.iter_mut() {
            cache.truncate(self.position);
        }
        Ok(elapsed)
    }
}
