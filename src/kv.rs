//! One sequence's KV cache: the keys and values of every layer and head, in
//! f32 or bf16 ([`KvDtype`]), and the two things attention does with them
//! (write a position, attend over positions `0..=pos`).
//!
//! Layout: `(L, H, P, row)` for keys and as much for values, `row` = hd
//! values (f32) or hd rounded up to 16 (bf16, in the packed weights' slot
//! order: `gpt2_kernels::kv_row_bf16`). Each head's positions are one run of
//! memory, so attention streams it (rather than `hd` values every C;
//! `docs/hot-path.md`), and a run's first positions are its first pages.

use gpt2_kernels::{attention_head, attention_head_bf16, bf16_row_len, kv_row_bf16, KvDtype};

use crate::config::Gpt2Config;
use crate::error::{Error, Result};

/// Keys and values of every layer for one sequence.
///
/// Memory for the full context window is reserved up front as an anonymous
/// map, which the OS backs with pages only as positions are written.
pub struct KvCache {
    k: Store, // (L, H, P, row)
    v: Store, // (L, H, P, row)
    len: usize,
    n_positions: usize,
    n_embd: usize,
    n_head: usize,
    n_layer: usize,
}

/// The values of a cache in their format.
enum Store {
    F32(Slab<f32>),
    /// bf16 bits.
    Bf16(Slab<u16>),
}

impl KvCache {
    /// An empty cache for `config`'s layers x positions x channels keys and
    /// as many values, stored as `kv`. Its memory is mapped, not touched:
    /// pages become resident as positions are written. An error (naming the
    /// size) if the OS refuses the mapping.
    pub fn new(config: &Gpt2Config, kv: KvDtype) -> Result<Self> {
        let row = row_len(config, kv);
        let size = (config.n_layer * config.n_head)
            .checked_mul(config.n_positions)
            .and_then(|n| n.checked_mul(row));
        let what = || {
            format!(
                "a KV cache of 2 x {} layers x {} positions x {} channels in {kv}",
                config.n_layer, config.n_positions, config.n_embd
            )
        };
        let size = size.ok_or_else(|| Error::Engine(format!("{} overflows", what())))?;
        let refused = |e: std::io::Error| Error::Engine(format!("cannot allocate {}: {e}", what()));
        let store = || -> Result<Store> {
            Ok(match kv {
                KvDtype::F32 => Store::F32(Slab::zeroed(size).map_err(refused)?),
                KvDtype::Bf16 => Store::Bf16(Slab::zeroed(size).map_err(refused)?),
            })
        };
        Ok(KvCache {
            k: store()?,
            v: store()?,
            len: 0,
            n_positions: config.n_positions,
            n_embd: config.n_embd,
            n_head: config.n_head,
            n_layer: config.n_layer,
        })
    }

    /// Resident bytes of a `kv` cache for `config` once `positions` are
    /// written: keys and values of every (layer, head) are `positions` rows
    /// at the start of their own region, each rounded up to whole 4 KiB
    /// pages (the map's untouched pages are not resident).
    pub fn resident_bytes(config: &Gpt2Config, kv: KvDtype, positions: usize) -> usize {
        let row_bytes = row_len(config, kv) * kv.bytes_per_value();
        resident(config.n_layer * config.n_head, row_bytes, positions)
    }

    /// [`KvCache::resident_bytes`] of this cache's config and format.
    pub fn resident_bytes_at(&self, positions: usize) -> usize {
        let row_bytes = self.row() * self.dtype().bytes_per_value();
        resident(self.n_layer * self.n_head, row_bytes, positions)
    }

    /// The format its keys and values are stored in.
    pub fn dtype(&self) -> KvDtype {
        match self.k {
            Store::F32(_) => KvDtype::F32,
            Store::Bf16(_) => KvDtype::Bf16,
        }
    }

    /// Positions stored so far; the next row of this sequence has `pos == len()`.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets positions `len..`, keeping the memory.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Forgets every position, keeping the memory for the next sequence.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Marks positions `..=pos` written (the forward pass, once every layer
    /// has written them).
    pub(crate) fn extend_to(&mut self, pos: usize) {
        self.len = self.len.max(pos + 1);
    }

    /// Whether this cache was made for `config` in `kv`.
    pub(crate) fn fits(&self, config: &Gpt2Config, kv: KvDtype) -> bool {
        (self.n_layer, self.n_head, self.n_embd, self.n_positions)
            == (config.n_layer, config.n_head, config.n_embd, config.n_positions)
            && self.dtype() == kv
    }

    /// Makes this cache hold the first `len` positions of `src` (a cache of
    /// the same config and format), bit for bit: a sequence that shares a
    /// prompt prefix with `src` continues from there, as if it had computed
    /// them. Each (layer, head) keeps its positions in one run, so this is
    /// `2 x layers x heads` copies of `len` rows.
    pub fn copy_prefix_from(&mut self, src: &KvCache, len: usize) -> Result<()> {
        let same = (
            self.n_layer,
            self.n_positions,
            self.n_embd,
            self.n_head,
            self.dtype(),
        ) == (src.n_layer, src.n_positions, src.n_embd, src.n_head, src.dtype());
        if !same || len > src.len {
            return Err(Error::Engine(format!(
                "cannot copy {len} positions from a cache of {} (config and format match: {same})",
                src.len
            )));
        }
        let run = self.n_positions * self.row();
        let heads = self.n_layer * self.n_head;
        let n = len * self.row();
        match (&mut self.k, &src.k, &mut self.v, &src.v) {
            (Store::F32(k), Store::F32(sk), Store::F32(v), Store::F32(sv)) => {
                copy_runs(k, sk, heads, run, n);
                copy_runs(v, sv, heads, run, n);
            }
            (Store::Bf16(k), Store::Bf16(sk), Store::Bf16(v), Store::Bf16(sv)) => {
                copy_runs(k, sk, heads, run, n);
                copy_runs(v, sv, heads, run, n);
            }
            _ => unreachable!("the formats were checked equal"),
        }
        self.len = len;
        Ok(())
    }

    /// Stores one position's keys and values (`hd` each) of layer `l`, head
    /// `head`, rounded to the cache's format.
    pub(crate) fn write(&mut self, l: usize, head: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (o, row) = (self.offset(l, head, pos), self.row());
        match (&mut self.k, &mut self.v) {
            (Store::F32(ks), Store::F32(vs)) => {
                ks[o..o + row].copy_from_slice(k);
                vs[o..o + row].copy_from_slice(v);
            }
            (Store::Bf16(ks), Store::Bf16(vs)) => {
                kv_row_bf16(&mut ks[o..o + row], k);
                kv_row_bf16(&mut vs[o..o + row], v);
            }
            _ => unreachable!("keys and values share a format"),
        }
    }

    /// `out (hd)` = the attention of query `q (hd)` of layer `l`, head
    /// `head` over positions `0..t`, with `scores` (at least `t`) as work
    /// space: `gpt2_kernels::attention_head` in the cache's format.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        &self,
        out: &mut [f32],
        q: &[f32],
        l: usize,
        head: usize,
        t: usize,
        scores: &mut [f32],
        scale: f32,
    ) {
        let (start, row) = (self.offset(l, head, 0), self.row());
        let run = start..start + t * row;
        match (&self.k, &self.v) {
            (Store::F32(k), Store::F32(v)) => {
                attention_head(out, q, &k[run.clone()], &v[run], t, row, scores, scale)
            }
            (Store::Bf16(k), Store::Bf16(v)) => {
                attention_head_bf16(out, q, &k[run.clone()], &v[run], t, row, scores, scale)
            }
            _ => unreachable!("keys and values share a format"),
        }
    }

    /// Values one position of one head takes.
    fn row(&self) -> usize {
        let hd = self.n_embd / self.n_head;
        match self.k {
            Store::F32(_) => hd,
            Store::Bf16(_) => bf16_row_len(hd),
        }
    }

    /// Start of layer `l`, head `head`, position `pos` in `k` / `v`.
    fn offset(&self, l: usize, head: usize, pos: usize) -> usize {
        ((l * self.n_head + head) * self.n_positions + pos) * self.row()
    }
}

#[cfg(test)]
impl KvCache {
    /// `cache` as if `len` positions had been written (they hold zeros).
    pub(crate) fn with_len_for_test(mut cache: KvCache, len: usize) -> KvCache {
        cache.len = len.min(cache.n_positions);
        cache
    }
}

/// Resident bytes of keys and values of `heads` (layer, head) regions, each
/// `positions` rows of `row_bytes` rounded up to whole 4 KiB pages.
fn resident(heads: usize, row_bytes: usize, positions: usize) -> usize {
    2 * heads * (positions * row_bytes).div_ceil(4096) * 4096
}

/// Values a position of one head takes in `kv`.
fn row_len(config: &Gpt2Config, kv: KvDtype) -> usize {
    let hd = config.head_dim();
    match kv {
        KvDtype::F32 => hd,
        KvDtype::Bf16 => bf16_row_len(hd),
    }
}

/// The first `n` values of each of `heads` runs of `run` values.
fn copy_runs<T: Copy>(dst: &mut [T], src: &[T], heads: usize, run: usize, n: usize) {
    for h in 0..heads {
        let at = h * run;
        dst[at..at + n].copy_from_slice(&src[at..at + n]);
    }
}

/// Zeroed storage in an anonymous map: the OS hands out zero pages as they
/// are first written (as `calloc` does for large blocks), and a refusal is
/// an error rather than an abort.
struct Slab<T> {
    map: memmap2::MmapMut,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: bytemuck::Pod> Slab<T> {
    fn zeroed(len: usize) -> std::io::Result<Self> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| std::io::Error::other(format!("{len} values overflow the address space")))?;
        // A zero-length map is an error on some systems; map one page instead.
        let map = memmap2::MmapMut::map_anon(bytes.max(1))?;
        Ok(Slab {
            map,
            len,
            _t: std::marker::PhantomData,
        })
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for Slab<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // The map is page-aligned, so the cast cannot fail.
        bytemuck::cast_slice(&self.map[..self.len * std::mem::size_of::<T>()])
    }
}

impl<T: bytemuck::Pod> std::ops::DerefMut for Slab<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.map[..self.len * std::mem::size_of::<T>()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::Preset;

    #[test]
    fn bf16_halves_the_resident_bytes_and_pages_round_up() {
        let c = Preset::Gpt2_124M.config(0);
        let f32s = KvCache::resident_bytes(&c, KvDtype::F32, 1024);
        assert_eq!(f32s, 2 * 12 * 1024 * 768 * 4, "72 MiB per full f32 sequence");
        assert_eq!(KvCache::resident_bytes(&c, KvDtype::Bf16, 1024), f32s / 2);
        // One position still takes a page per (layer, head) and side.
        assert_eq!(KvCache::resident_bytes(&c, KvDtype::Bf16, 1), 2 * 12 * 12 * 4096);
        let cache = KvCache::new(&c, KvDtype::Bf16).unwrap();
        assert_eq!(
            cache.resident_bytes_at(900),
            KvCache::resident_bytes(&c, KvDtype::Bf16, 900)
        );
    }

    #[test]
    fn a_prefix_copies_only_between_caches_of_one_format() {
        let c = Preset::Tiny.config(0);
        let mut a = KvCache::new(&c, KvDtype::Bf16).unwrap();
        let hd = c.head_dim();
        let k: Vec<f32> = (0..hd).map(|i| i as f32 * 0.25).collect();
        a.write(1, 2, 0, &k, &k);
        a.extend_to(0);
        let mut b = KvCache::new(&c, KvDtype::Bf16).unwrap();
        b.copy_prefix_from(&a, 1).unwrap();
        let (mut out, mut scores) = (vec![0.0; hd], vec![0.0; 1]);
        b.attend(&mut out, &k, 1, 2, 1, &mut scores, 1.0);
        // One position: softmax is 1, the output is its value (exact in bf16).
        assert_eq!(out, k);
        let mut f = KvCache::new(&c, KvDtype::F32).unwrap();
        let err = f.copy_prefix_from(&a, 1).unwrap_err().to_string();
        assert!(err.contains("format"), "{err}");
    }
}
