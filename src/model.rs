//! The GPT-2 forward pass over a batch of rows.
//!
//! Dimension legend: M = rows in the batch, C = channels (n_embd), F = MLP
//! width (n_inner), V = vocabulary, L = layers, H = heads, hd = C / H,
//! P = context window (n_positions).
//!
//! A batch row is one token of one sequence at one position. Prefill is many
//! rows of one sequence; batched decode is one row from each of many
//! sequences; both are the same call to [`Gpt2Model::forward`]. The model is
//! immutable and shared; the KV cache ([`KvCache`]) belongs to a sequence and
//! the work buffers ([`Scratch`]) to a caller, so any number of threads can
//! run forward passes over one model at once.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpt2_kernels::{Dtype, KvDtype, QuantScratch};
use rayon::prelude::*;

use crate::config::Gpt2Config;
use crate::error::{Error, Result};
pub use crate::kv::KvCache;
use crate::layers::{gelu, residual};
use crate::profile::{Op, Profile, Timer};
pub use crate::row::Row;
use crate::weights::{self, Weights};

/// Attention work (cached positions x channels, summed over the batch's
/// rows) below which the heads run on the calling thread: short contexts
/// finish before a handed-out task would wake (measured in
/// `docs/hot-path.md`).
const PAR_ATTENTION: usize = 128 * 768;

/// Longest a worker spins for [`keep_pool_awake`].
const SPIN_CAP: Duration = Duration::from_millis(1);

/// Runs `f` on this thread while the pool's other workers spin rather than
/// sleep. A rayon worker sleeps after some 30 µs without work, and waking it
/// would delay the next parallel op (after one-thread attention: the
/// projection) in every layer; measurements in `docs/hot-path.md`.
/// A spinner is a job like any other: a worker busy with other work (other
/// requests on a shared pool) runs it only later, finds `f` done and returns
/// at once. None spins longer than [`SPIN_CAP`]. Costs two small allocations
/// a call. The scheduler keeps the pool awake the same way while it samples.
pub(crate) fn keep_pool_awake<T>(f: impl FnOnce() -> T) -> T {
    // Outside a pool there is no next parallel op of ours to keep warm for:
    // `forward` and the scheduler run on pool threads.
    let idle = match rayon::current_thread_index() {
        Some(_) => rayon::current_num_threads() - 1,
        None => 0,
    };
    if idle == 0 {
        return f();
    }
    struct Done(Arc<AtomicBool>);
    impl Drop for Done {
        // Also when `f` panics: no spinner waits for a result that never comes.
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let done = Done(Arc::new(AtomicBool::new(false)));
    for _ in 0..idle {
        let done = Arc::clone(&done.0);
        rayon::spawn(move || {
            let start = Instant::now();
            while !done.load(Ordering::Acquire) && start.elapsed() < SPIN_CAP {
                std::hint::spin_loop();
            }
        });
    }
    f()
}

/// A GPT-2 model: config plus weights. `Send + Sync`, `&self` only.
pub struct Gpt2Model {
    pub config: Gpt2Config,
    pub weights: Weights,
    /// The format of every KV cache this model makes ([`Gpt2Model::new_cache`]).
    kv_dtype: KvDtype,
}

/// `n` zeroed floats, or an error naming `what` if that much cannot be had.
fn zeroed_vec(n: Option<usize>, what: &str) -> Result<Vec<f32>> {
    let n = n.ok_or_else(|| Error::Engine(format!("the {what} buffer's size overflows")))?;
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|e| Error::Engine(format!("cannot allocate the {what} buffer of {n} floats: {e}")))?;
    v.resize(n, 0.0);
    Ok(v)
}

/// Work buffers for batches of up to `max_rows` rows, allocated once.
pub struct Scratch {
    max_rows: usize,
    x: Vec<f32>,          // (M, C) residual stream
    h: Vec<f32>,          // (M, C) layer-norm output
    qkv: Vec<f32>,        // (M, 3C) queries, keys, values
    att: Vec<f32>,        // (M, C) attention output, heads side by side
    proj: Vec<f32>,       // (M, C) output of a projection, before the residual add
    fc: Vec<f32>,         // (M, F) MLP hidden layer
    scores: Vec<f32>,     // (M * H, P) attention scores of each (row, head)
    lm_in: Vec<f32>,      // (M, C) final-normed rows that want logits
    quant: QuantScratch,  // (M, max(C, F)) a linear's input rows quantised, for int8 weights
    logits: Vec<f32>,     // (rows wanting logits, V), grown on demand
    next_pos: Vec<usize>, // per sequence: the position its next row must have
    /// Per-op timings, when profiling is on.
    pub profile: Option<Box<Profile>>,
}

impl Scratch {
    /// Buffers for up to `max_rows` rows (at least 1); an error naming the
    /// buffer if one cannot be allocated.
    pub fn new(config: &Gpt2Config, max_rows: usize) -> Result<Self> {
        let max_rows = max_rows.max(1);
        let (c, f, h, p) = (config.n_embd, config.n_inner, config.n_head, config.n_positions);
        let rows = |n: usize, what: &str| zeroed_vec(max_rows.checked_mul(n), what);
        Ok(Scratch {
            max_rows,
            x: rows(c, "residual")?,
            h: rows(c, "layer-norm")?,
            qkv: rows(3 * c, "qkv")?,
            att: rows(c, "attention")?,
            proj: rows(c, "projection")?,
            fc: rows(f, "MLP")?,
            scores: rows(h.saturating_mul(p), "attention scores")?,
            lm_in: rows(c, "LM head input")?,
            quant: QuantScratch::try_new(max_rows, c.max(f)).map_err(|e| {
                Error::Engine(format!(
                    "cannot allocate the int8 activations buffer of {max_rows} rows: {e}"
                ))
            })?,
            logits: Vec::new(),
            next_pos: Vec::new(),
            profile: None,
        })
    }

    /// The largest batch this scratch can run.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// The logits of the last forward pass, `(n, V)` for its `n` rows that
    /// asked for them, in row order (followed by stale values: slice it).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
}

/// Causal self-attention of one batch over its sequences' KV caches. It has
/// no weights, so it is made per pass, from the batch's rows.
struct Attention<'r> {
    rows: &'r [Row],
    c: usize,  // C
    nh: usize, // H
    hd: usize, // hd = C / H
    p: usize,  // P: the stride of `scores`
    scale: f32,
    /// Cached positions attended to, summed over the rows.
    positions: usize,
    /// Bytes of one cached key or value element.
    kv_bytes: usize,
}

impl<'r> Attention<'r> {
    fn new(cfg: &Gpt2Config, kv: KvDtype, rows: &'r [Row]) -> Self {
        let hd = cfg.head_dim();
        Attention {
            rows,
            c: cfg.n_embd,
            nh: cfg.n_head,
            hd,
            p: cfg.n_positions,
            scale: 1.0 / (hd as f32).sqrt(),
            positions: rows.iter().map(|r| r.pos + 1).sum(),
            kv_bytes: kv.bytes_per_value(),
        }
    }

    /// Appends every row's key and value (from `qkv (M, 3C)`) to its cache at
    /// layer `l`, then `att (M, C)` = each (row, head)'s attention over
    /// positions `0..=pos`, with `scores (M * H, P)` as work space. Timed as
    /// one op, charged with every cached key and value it reads.
    fn forward(
        &self,
        att: &mut [f32],
        scores: &mut [f32],
        qkv: &[f32],
        caches: &mut [&mut KvCache],
        l: usize,
        t: &mut Timer<'_>,
    ) {
        let (bytes, flops) = (
            2 * self.positions * self.c * self.kv_bytes,
            4 * self.positions * self.c,
        );
        t.time(Op::Attention, bytes, flops, || {
            self.append_kv(qkv, caches, l);
            self.heads(att, scores, qkv, caches, l);
        })
    }

    fn append_kv(&self, qkv: &[f32], caches: &mut [&mut KvCache], l: usize) {
        let (c, hd) = (self.c, self.hd);
        for (qkv_r, row) in qkv.chunks_exact(3 * c).zip(self.rows) {
            let cache = &mut *caches[row.seq];
            for head in 0..self.nh {
                let (k, v) = (&qkv_r[c + head * hd..][..hd], &qkv_r[2 * c + head * hd..][..hd]);
                cache.write(l, head, row.pos, k, v);
            }
        }
    }

    /// One task per (row, head). Every key and value of this batch is
    /// already in the cache; row r reads positions 0..=pos only.
    fn heads(&self, att: &mut [f32], scores: &mut [f32], qkv: &[f32], caches: &[&mut KvCache], l: usize) {
        let (c, nh, hd, p) = (self.c, self.nh, self.hd, self.p);
        let head = |(i, (out, sc)): (usize, (&mut [f32], &mut [f32]))| {
            let (r, head) = (i / nh, i % nh);
            let row = &self.rows[r];
            let q = &qkv[r * 3 * c + head * hd..][..hd];
            caches[row.seq].attend(out, q, l, head, row.pos + 1, sc, self.scale);
        };
        // Short contexts are cheaper on this thread than handed out; the
        // pool spins meanwhile, ready for the projection.
        if self.positions * c < PAR_ATTENTION {
            keep_pool_awake(|| {
                att.chunks_mut(hd)
                    .zip(scores.chunks_mut(p))
                    .enumerate()
                    .for_each(head)
            });
        } else {
            att.par_chunks_mut(hd)
                .zip(scores.par_chunks_mut(p))
                .enumerate()
                .for_each(head);
        }
    }
}

impl Gpt2Model {
    /// Loads `config.json` and `model.safetensors` from a checkpoint directory.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, Dtype::F32)
    }

    /// [`Gpt2Model::load`] with the linear layers' weights converted to
    /// `dtype` as they are packed.
    pub fn load_with(dir: &Path, dtype: Dtype) -> Result<Self> {
        let (config_path, weights_path) = weights::checkpoint_files(dir);
        Self::load_files(&config_path, &weights_path, dtype)
    }

    pub fn load_files(config_path: &Path, weights_path: &Path, dtype: Dtype) -> Result<Self> {
        let config = Gpt2Config::from_file(config_path)?;
        let weights = weights::load(weights_path, &config, dtype)?;
        // One pass over every weight: NaN or infinity is refused at load, not
        // discovered as garbage logits; the first token would read them all anyway.
        weights.check_finite(weights_path)?;
        Ok(Gpt2Model {
            config,
            weights,
            kv_dtype: KvDtype::F32,
        })
    }

    /// This model, making its KV caches in `kv` from now on (f32 as loaded).
    pub fn with_kv_dtype(mut self, kv: KvDtype) -> Self {
        self.kv_dtype = kv;
        self
    }

    /// The format of the linear layers' packed weights.
    pub fn dtype(&self) -> Dtype {
        self.weights.dtype
    }

    /// The format of the KV caches it makes and reads.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// A KV cache for one sequence, in [`Gpt2Model::kv_dtype`] (see [`KvCache::new`]).
    pub fn new_cache(&self) -> Result<KvCache> {
        KvCache::new(&self.config, self.kv_dtype)
    }

    /// [`KvCache::resident_bytes`] of this model's caches.
    pub fn cache_bytes(&self, positions: usize) -> usize {
        KvCache::resident_bytes(&self.config, self.kv_dtype, positions)
    }

    /// Work buffers for batches of up to `max_rows` rows (see [`Scratch::new`]).
    pub fn new_scratch(&self, max_rows: usize) -> Result<Scratch> {
        Scratch::new(&self.config, max_rows)
    }

    /// Runs one forward pass over `rows`, appending each row's key and value
    /// to its sequence's cache, and returns the logits `(n, V)` of the `n`
    /// rows that asked for them, in row order.
    ///
    /// Rows of one sequence must have consecutive positions, the first equal
    /// to that cache's `len()`. On error nothing has been changed.
    ///
    /// The parallel ops run on the current rayon pool. Called from outside
    /// any pool, the pass runs on a thread of the global pool: from outside,
    /// every parallel op would hand its work in and sleep until woken (some
    /// 50 round trips a token), where inside they are plain fork-joins.
    pub fn forward<'s>(
        &self,
        rows: &[Row],
        caches: &mut [&mut KvCache],
        s: &'s mut Scratch,
    ) -> Result<&'s [f32]> {
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.forward_in_pool(rows, caches, s));
        }
        self.forward_in_pool(rows, caches, s)
    }

    fn forward_in_pool<'s>(
        &self,
        rows: &[Row],
        caches: &mut [&mut KvCache],
        s: &'s mut Scratch,
    ) -> Result<&'s [f32]> {
        self.check_batch(rows, caches, s)?;
        // The logits buffer grows to the largest batch of logit rows seen,
        // before anything changes, so that running short is a clean error.
        let wanted = rows.iter().filter(|r| r.logits).count();
        let need = wanted.saturating_mul(self.config.vocab_size);
        if s.logits.len() < need {
            s.logits
                .try_reserve_exact(need - s.logits.len())
                .map_err(|e| Error::Engine(format!("cannot allocate logits for {wanted} rows: {e}")))?;
            s.logits.resize(need, 0.0);
        }
        let cfg = &self.config;
        let (m, c, f, v) = (rows.len(), cfg.n_embd, cfg.n_inner, cfg.vocab_size);
        let (nh, p) = (cfg.n_head, cfg.n_positions);
        let w = &self.weights;
        let x = &mut s.x[..m * c];
        let h = &mut s.h[..m * c];
        let qkv = &mut s.qkv[..m * 3 * c];
        let att = &mut s.att[..m * c];
        let proj = &mut s.proj[..m * c];
        let fc = &mut s.fc[..m * f];
        let scores = &mut s.scores[..m * nh * p];
        let xq = &mut s.quant;

        let mut profile = s.profile.take();
        let mut t = Timer::new(profile.as_deref_mut());
        let attn = Attention::new(cfg, self.kv_dtype, rows);

        w.embed.forward(x, rows, &mut t); // x = wte[token] + wpe[pos]
        for (l, b) in w.blocks.iter().enumerate() {
            b.ln_1.forward(h, x, &mut t); // h = ln_1(x)
            b.attn_qkv.forward(qkv, h, m, xq, &mut t); // qkv = h Wqkv + b
            attn.forward(att, scores, qkv, caches, l, &mut t); // append k, v; att = softmax(q kᵀ / √hd) v
            b.attn_proj.forward(proj, att, m, xq, &mut t); // proj = att Wo + b
            residual(x, proj, &mut t); // x += proj
            b.ln_2.forward(h, x, &mut t); // h = ln_2(x)
            b.mlp_fc.forward(fc, h, m, xq, &mut t); // fc = h Wfc + b
            gelu(fc, &mut t); // fc = gelu(fc)
            b.mlp_proj.forward(proj, fc, m, xq, &mut t); // proj = fc Wproj + b
            residual(x, proj, &mut t); // x += proj
        }

        for row in rows {
            caches[row.seq].extend_to(row.pos);
        }

        // Final norm and LM head, only for the rows that want logits.
        let n = rows.iter().filter(|r| r.logits).count();
        let lm_in = &mut s.lm_in[..n * c];
        let wanted = x
            .chunks_exact(c)
            .zip(rows)
            .filter(|(_, r)| r.logits)
            .map(|(xr, _)| xr);
        w.ln_f.forward_rows(lm_in, wanted, &mut t); // lm_in = ln_f(x) of those rows
        w.lm_head.forward(&mut s.logits[..n * v], lm_in, n, xq, &mut t); // logits = lm_in wteᵀ
        s.profile = profile;
        Ok(&s.logits[..n * v])
    }

    /// Checks every row before any work, so a bad batch changes nothing.
    fn check_batch(&self, rows: &[Row], caches: &[&mut KvCache], s: &mut Scratch) -> Result<()> {
        let cfg = &self.config;
        if rows.is_empty() {
            return Err(Error::Batch("no rows".into()));
        }
        if rows.len() > s.max_rows {
            return Err(Error::Batch(format!(
                "{} rows, but the scratch holds at most {}",
                rows.len(),
                s.max_rows
            )));
        }
        if s.x.len() != s.max_rows * cfg.n_embd || s.fc.len() != s.max_rows * cfg.n_inner {
            return Err(Error::Batch("the scratch was made for another config".into()));
        }
        s.next_pos.clear();
        s.next_pos.extend(caches.iter().map(|c| c.len()));
        for (i, row) in rows.iter().enumerate() {
            crate::request::check_token_ids([row.token], cfg.vocab_size)?;
            if row.pos >= cfg.n_positions {
                return Err(Error::ContextLength {
                    pos: row.pos,
                    n_positions: cfg.n_positions,
                });
            }
            let Some(cache) = caches.get(row.seq) else {
                return Err(Error::Batch(format!(
                    "row {i} names sequence {}, but only {} caches were given",
                    row.seq,
                    caches.len()
                )));
            };
            if !cache.fits(cfg, self.kv_dtype) {
                return Err(Error::Batch(format!(
                    "row {i}: the cache of sequence {} was made for another config or KV format than {}",
                    row.seq, self.kv_dtype
                )));
            }
            let expected = s.next_pos[row.seq];
            if row.pos != expected {
                return Err(Error::Batch(format!(
                    "row {i}: sequence {} expects position {expected}, got {}",
                    row.seq, row.pos
                )));
            }
            s.next_pos[row.seq] += 1;
        }
        Ok(())
    }

    /// Logits `(T, V)` for every position of `tokens`, run from an empty cache
    /// in chunks of at most `chunk` rows. For checking against other
    /// implementations (`gpt2 logits`) and for tests. A NaN or infinite
    /// logit (weights or activations that overflow f32) is an error naming
    /// its position and vocabulary index, not a value to print.
    pub fn logits_all(&self, tokens: &[u32], chunk: usize) -> Result<Vec<f32>> {
        let mut cache = self.new_cache()?;
        let mut scratch = self.new_scratch(chunk)?;
        let mut out = Vec::with_capacity(tokens.len() * self.config.vocab_size);
        for (ci, part) in tokens.chunks(scratch.max_rows()).enumerate() {
            let start = ci * scratch.max_rows();
            let rows: Vec<Row> = part
                .iter()
                .enumerate()
                .map(|(i, &token)| Row {
                    seq: 0,
                    token,
                    pos: start + i,
                    logits: true,
                })
                .collect();
            out.extend_from_slice(self.forward(&rows, &mut [&mut cache], &mut scratch)?);
        }
        let v = self.config.vocab_size;
        if let Some((i, &value)) = out.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(Error::NonFiniteOutput {
                position: i / v,
                index: i % v,
                value,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The helper returns `f`'s result inside and outside a pool; a panic in
    /// `f` propagates, and the pool's workers are free for work afterwards.
    #[test]
    fn keep_pool_awake_returns_and_survives_a_panic() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        assert_eq!(keep_pool_awake(|| 7), 7);
        pool.install(|| {
            assert_eq!(keep_pool_awake(|| 42), 42);
            let caught = std::panic::catch_unwind(|| keep_pool_awake(|| panic!("in f")));
            assert!(caught.is_err());
            let workers: std::collections::BTreeSet<usize> = (0..64)
                .into_par_iter()
                .map(|_| {
                    std::thread::sleep(Duration::from_micros(200));
                    rayon::current_thread_index().unwrap()
                })
                .collect();
            assert_eq!(workers.len(), 2, "both workers took part");
        });
    }
}
