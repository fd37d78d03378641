//! Per-op timing of forward passes (`--profile`): where a request's time goes.
//!
//! Off by default: the forward pass then pays one branch per op. On, each op
//! is timed with `Instant` and charged with the bytes of weights it reads and
//! the FLOPs it does, so the table shows achieved GB/s and GFLOP/s per op.

use std::time::Instant;

/// The ops of a GPT-2 forward pass, plus sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Embed,
    LayerNorm,
    Qkv,
    Attention,
    AttnProj,
    Residual,
    MlpUp,
    Gelu,
    MlpDown,
    LmHead,
    Sampling,
}

impl Op {
    pub const ALL: [Op; 11] = [
        Op::Embed,
        Op::LayerNorm,
        Op::Qkv,
        Op::Attention,
        Op::AttnProj,
        Op::Residual,
        Op::MlpUp,
        Op::Gelu,
        Op::MlpDown,
        Op::LmHead,
        Op::Sampling,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Embed => "embed",
            Op::LayerNorm => "layer norms",
            Op::Qkv => "qkv",
            Op::Attention => "attention",
            Op::AttnProj => "attention proj",
            Op::Residual => "residuals",
            Op::MlpUp => "mlp up",
            Op::Gelu => "gelu",
            Op::MlpDown => "mlp down",
            Op::LmHead => "lm head",
            Op::Sampling => "sampling",
        }
    }

    /// What bounds the op: weight bytes read ("GB/s") or arithmetic ("GFLOP/s").
    pub fn is_matmul(self) -> bool {
        matches!(
            self,
            Op::Qkv | Op::AttnProj | Op::MlpUp | Op::MlpDown | Op::LmHead
        )
    }
}

/// Prefill (the prompt, up to the first token) or decode (every later token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Prefill,
    Decode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpStat {
    pub nanos: u64,
    pub calls: u64,
    /// Bytes of weights (and KV cache, for attention) read.
    pub bytes: u64,
    pub flops: u64,
}

/// Accumulated op times for both phases.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The phase charged by the next ops; the caller switches it.
    pub phase: Phase,
    pub stats: [[OpStat; Op::ALL.len()]; 2],
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            phase: Phase::Prefill,
            stats: [[OpStat::default(); Op::ALL.len()]; 2],
        }
    }
}

impl Profile {
    pub fn stat(&self, phase: Phase, op: Op) -> &OpStat {
        &self.stats[phase as usize][op as usize]
    }

    pub fn add(&mut self, op: Op, nanos: u64, bytes: u64, flops: u64) {
        let s = &mut self.stats[self.phase as usize][op as usize];
        s.nanos += nanos;
        s.calls += 1;
        s.bytes += bytes;
        s.flops += flops;
    }

    /// Adds another profile's counts into this one.
    pub fn merge(&mut self, other: &Profile) {
        for (mine, theirs) in self.stats.iter_mut().zip(&other.stats) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                a.nanos += b.nanos;
                a.calls += b.calls;
                a.bytes += b.bytes;
                a.flops += b.flops;
            }
        }
    }

    /// One row per (phase, op) that ran, for reports.
    pub fn rows(&self) -> Vec<OpRow> {
        let mut rows = Vec::new();
        for (phase, name) in [(Phase::Prefill, "prefill"), (Phase::Decode, "decode")] {
            let total: u64 = Op::ALL.iter().map(|&op| self.stat(phase, op).nanos).sum();
            for op in Op::ALL {
                let s = self.stat(phase, op);
                if s.calls == 0 {
                    continue;
                }
                let secs = s.nanos as f64 / 1e9;
                let rate = |x: u64| (secs > 0.0 && x > 0).then(|| x as f64 / secs / 1e9);
                rows.push(OpRow {
                    phase: name.into(),
                    op: op.name().into(),
                    ms: s.nanos as f64 / 1e6,
                    share: s.nanos as f64 / total.max(1) as f64,
                    calls: s.calls,
                    gb_per_s: rate(s.bytes),
                    gflop_per_s: rate(s.flops),
                });
            }
        }
        rows
    }

    /// A Markdown table per phase: ms, share of the phase, GB/s or GFLOP/s.
    pub fn table(&self) -> String {
        rows_table(&self.rows())
    }
}

/// Renders profile rows (from [`Profile::rows`] or a saved report) as one
/// Markdown table per phase.
pub fn rows_table(rows: &[OpRow]) -> String {
    let mut out = String::new();
    for phase in ["prefill", "decode"] {
        let mine: Vec<&OpRow> = rows.iter().filter(|r| r.phase == phase).collect();
        if mine.is_empty() {
            continue;
        }
        let total: f64 = mine.iter().map(|r| r.ms).sum();
        out.push_str(&format!("\n{phase}: {total:.1} ms in all\n\n"));
        out.push_str("| op | ms | share | calls | GB/s | GFLOP/s |\n|---|---:|---:|---:|---:|---:|\n");
        let rate = |x: Option<f64>| x.map_or_else(String::new, |v| format!("{v:.1}"));
        for r in mine {
            out.push_str(&format!(
                "| {} | {:.2} | {:.1}% | {} | {} | {} |\n",
                r.op,
                r.ms,
                100.0 * r.share,
                r.calls,
                rate(r.gb_per_s),
                rate(r.gflop_per_s)
            ));
        }
    }
    out
}

/// One line of a profile table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OpRow {
    /// "prefill" or "decode".
    pub phase: String,
    pub op: String,
    pub ms: f64,
    /// Fraction of the phase's time.
    pub share: f64,
    pub calls: u64,
    /// Weight (and KV cache) bytes read per second.
    pub gb_per_s: Option<f64>,
    pub gflop_per_s: Option<f64>,
}

/// Times ops into an optional profile; with `None` it only runs them.
pub struct Timer<'p> {
    profile: Option<&'p mut Profile>,
}

impl<'p> Timer<'p> {
    pub fn new(profile: Option<&'p mut Profile>) -> Self {
        Timer { profile }
    }

    /// Runs `f`, charging its time to `op` with the given bytes and FLOPs.
    #[inline]
    pub fn time<T>(&mut self, op: Op, bytes: usize, flops: usize, f: impl FnOnce() -> T) -> T {
        match self.profile.as_deref_mut() {
            None => f(),
            Some(p) => {
                let t = Instant::now();
                let r = f();
                p.add(op, t.elapsed().as_nanos() as u64, bytes as u64, flops as u64);
                r
            }
        }
    }
}

/// A number field of this process's `/proc/self/status` (Linux), e.g.
/// `VmRSS:` or `Threads:` (memory fields are in KiB); `None` elsewhere.
pub fn proc_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix(field))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Bytes of memory the OS can still give (`MemAvailable` of
/// `/proc/meminfo`), where it tells (Linux); `None` elsewhere.
pub fn mem_available_bytes() -> Option<u64> {
    crate::memory::mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// This process's peak resident set size in bytes (`VmHWM`), where the OS
/// tells it (Linux); `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status("VmHWM:").map(|kib| kib * 1024)
}
