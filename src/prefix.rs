//! Prefix reuse: the KV caches of recently finished sequences, kept within
//! a byte budget, so a new prompt that starts like one of them starts from
//! its positions instead of computing them again (llama-server's
//! `cache_prompt`, vLLM's automatic prefix caching).
//!
//! A cached position holds exactly what a cold prefill computes there: a
//! row's keys and values depend only on the tokens up to it, and the kernels
//! give every row the same bits whatever else is in the batch. So a request
//! that reuses a prefix gets the tokens it gets alone (`tests/prefix.rs`).
//!
//! The budget counts each entry's resident bytes
//! ([`KvCache::resident_bytes_at`]); the least recently used entries go first.
//! An entry whose tokens start another's is dropped for the longer one, so
//! a growing conversation keeps one entry.

use crate::model::KvCache;

/// What a lookup found: the entry and how many of its positions to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit {
    entry: usize,
    /// Positions to copy (at least 1, less than the prompt's length).
    pub(crate) len: usize,
}

/// Prefix-cache counters, as [`SchedulerStats`](crate::scheduler::SchedulerStats) shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefixStats {
    /// Requests that started from a cached prefix.
    pub hits: u64,
    /// Prompt positions taken from the cache instead of computed.
    pub tokens_reused: u64,
    /// Resident bytes of the caches kept now.
    pub bytes: usize,
    /// Caches kept now.
    pub entries: usize,
}

struct Entry {
    /// The tokens whose positions `cache` holds (`cache.len()` of them).
    tokens: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    /// The clock when it was last stored or used.
    used: u64,
}

/// The kept caches and their budget; owned by the engine thread.
pub(crate) struct PrefixCache {
    budget: usize,
    entries: Vec<Entry>,
    clock: u64,
    stats: PrefixStats,
}

impl PrefixCache {
    /// Keeps at most `budget` resident bytes of caches (0: keeps none).
    pub(crate) fn new(budget: usize) -> Self {
        PrefixCache {
            budget,
            entries: Vec::new(),
            clock: 0,
            stats: PrefixStats::default(),
        }
    }

    pub(crate) fn stats(&self) -> PrefixStats {
        self.stats
    }

    /// The longest prefix of `prompt` some entry holds, leaving at least the
    /// prompt's last token to compute (its row gives the first logits).
    pub(crate) fn lookup(&mut self, prompt: &[u32]) -> Option<Hit> {
        let limit = prompt.len().saturating_sub(1);
        let (entry, len) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .max_by_key(|&(i, len)| (len, std::cmp::Reverse(i)))?;
        (len > 0).then_some(Hit { entry, len })
    }

    /// Copies the hit's positions into `cache` and counts the reuse.
    pub(crate) fn restore(&mut self, hit: Hit, cache: &mut KvCache) -> crate::Result<()> {
        self.clock += 1;
        let e = &mut self.entries[hit.entry];
        cache.copy_prefix_from(&e.cache, hit.len)?;
        e.used = self.clock;
        self.stats.hits += 1;
        self.stats.tokens_reused += hit.len as u64;
        Ok(())
    }

    /// Keeps `cache`, which holds the positions of `tokens[..cache.len()]`,
    /// if it fits the budget; returns the caches it does not keep (this one
    /// or the ones it replaces or evicts) for reuse as empty caches.
    pub(crate) fn store(&mut self, tokens: &[u32], cache: KvCache) -> Vec<KvCache> {
        let len = cache.len();
        let bytes = cache.resident_bytes_at(len);
        if len == 0 || bytes > self.budget {
            return vec![cache];
        }
        let tokens = &tokens[..len];
        // Already covered by a longer (or equal) entry: nothing new.
        if let Some(e) = self.entries.iter_mut().find(|e| e.tokens.starts_with(tokens)) {
            self.clock += 1;
            e.used = self.clock;
            return vec![cache];
        }
        let mut freed = Vec::new();
        // Entries this one extends are dropped for it.
        let mut i = 0;
        while i < self.entries.len() {
            if tokens.starts_with(&self.entries[i].tokens) {
                freed.push(self.remove(i));
            } else {
                i += 1;
            }
        }
        while self.stats.bytes + bytes > self.budget {
            let oldest = (0..self.entries.len()).min_by_key(|&i| self.entries[i].used);
            match oldest {
                Some(i) => freed.push(self.remove(i)),
                None => break,
            }
        }
        self.clock += 1;
        self.entries.push(Entry {
            tokens: tokens.to_vec(),
            cache,
            bytes,
            used: self.clock,
        });
        self.stats.bytes += bytes;
        self.stats.entries = self.entries.len();
        freed
    }

    fn remove(&mut self, i: usize) -> KvCache {
        let e = self.entries.swap_remove(i);
        self.stats.bytes -= e.bytes;
        self.stats.entries = self.entries.len();
        e.cache
    }
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Gpt2Config;
    use crate::KvDtype;

    fn config() -> Gpt2Config {
        let json = r#"{"n_layer": 1, "n_head": 1, "n_embd": 1024, "n_positions": 64, "vocab_size": 16}"#;
        Gpt2Config::from_json(json).unwrap()
    }

    /// A cache of `len` positions whose values encode (position, tag).
    fn filled(len: usize, tag: u32) -> (Vec<u32>, KvCache) {
        let c = config();
        let model_free = KvCache::new(&c, KvDtype::F32).unwrap();
        let tokens: Vec<u32> = (0..len as u32).map(|i| i % 7 + tag).collect();
        (tokens, KvCache::with_len_for_test(model_free, len))
    }

    #[test]
    fn longest_prefix_leaves_the_last_token_and_lru_evicts() {
        let c = config();
        let one = KvCache::resident_bytes(&c, KvDtype::F32, 4);
        // Room for two 4-position entries.
        let mut p = PrefixCache::new(2 * one);
        let (a, ca) = filled(4, 0);
        assert!(p.store(&a, ca).is_empty());
        // The same prompt: all but its last token come from the cache.
        let hit = p.lookup(&a).unwrap();
        assert_eq!(hit.len, 3);
        // A longer prompt sharing all 4.
        let mut longer = a.clone();
        longer.extend([9, 9]);
        assert_eq!(p.lookup(&longer).unwrap().len, 4);
        // Nothing shared: no hit.
        assert!(p.lookup(&[15, 15]).is_none());
        // Two more entries: the least recently used (a, stored first) goes.
        let (b, cb) = filled(4, 1);
        assert!(p.store(&b, cb).is_empty());
        let mut cache = KvCache::new(&c, KvDtype::F32).unwrap();
        let hit = p.lookup(&b).unwrap();
        p.restore(hit, &mut cache).unwrap();
        let (d, cd) = filled(4, 2);
        assert_eq!(p.store(&d, cd).len(), 1, "one evicted");
        assert!(p.lookup(&a).is_none(), "a was the oldest");
        assert!(p.lookup(&b).is_some());
        assert_eq!(p.stats().entries, 2);
        assert_eq!(p.stats().bytes, 2 * one);
        assert_eq!((p.stats().hits, p.stats().tokens_reused), (1, 3));
    }

    #[test]
    fn an_extension_replaces_its_prefix_and_the_budget_holds() {
        let c = config();
        let mut p = PrefixCache::new(KvCache::resident_bytes(&c, KvDtype::F32, 16));
        let (a, ca) = filled(6, 0);
        p.store(
            &a[..3],
            KvCache::with_len_for_test(KvCache::new(&c, KvDtype::F32).unwrap(), 3),
        );
        assert_eq!(p.store(&a, ca).len(), 1, "the 3-token entry is replaced");
        assert_eq!(p.stats().entries, 1);
        // A prefix of a kept entry adds nothing.
        let back = p.store(
            &a[..2],
            KvCache::with_len_for_test(KvCache::new(&c, KvDtype::F32).unwrap(), 2),
        );
        assert_eq!((back.len(), p.stats().entries), (1, 1));
        // Larger than the whole budget: not kept.
        let (big, cbig) = filled(40, 3);
        assert_eq!(p.store(&big, cbig).len(), 1);
        assert!(p.stats().bytes <= KvCache::resident_bytes(&c, KvDtype::F32, 16));
    }
}
