//! Memory a run will need against memory it can have, checked before the
//! weights are read, so that a configuration too large for the machine is
//! refused by name instead of being killed by the OOM killer halfway.
//!
//! [`Footprint::estimate`] counts what a run makes resident, from the same
//! byte counts the loader, the KV cache and the work buffers use; [`limit`]
//! reads what the process may still take: the smallest headroom of its
//! cgroups (v2 `memory.max`, v1 `memory.limit_in_bytes`) and the kernel's
//! `MemAvailable`. [`check`] compares them.
//!
//! The margin policy is explicit: a run is refused when it needs more than
//! is available, and only then. There is no fudge factor, because the
//! headroom is read while the process already holds its runtime (binary,
//! threads, tokenizer): what is compared is what the run will add. The
//! estimate is an upper bound in the places it cannot know (every KV cache
//! full, the logits of every row), so a refusal means the run *could*
//! outgrow the machine, not that it certainly would.
//!
//! [`peak_rss_bytes`] and [`reset_peak_rss`] measure what a run really held.

use std::path::{Path, PathBuf};

use gpt2_kernels::{Dtype, KvDtype};

use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::kv::KvCache;
use crate::specs::{panel_len, Role, Specs};

pub use crate::profile::peak_rss_bytes;

/// Where cgroup file systems are mounted (the systemd and container default).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Bytes the process may still make resident, and which limit says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub bytes: u64,
    /// e.g. `cgroup v2 memory.max (/sys/fs/cgroup/memory.max): 8.00 GiB
    /// less 1.20 GiB in use`, or `MemAvailable (/proc/meminfo)`.
    pub source: String,
}

/// The tightest of the limits this process is under, or `None` if none can
/// be read (not Linux): then nothing is refused.
pub fn limit() -> Option<Limit> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let (v2, v1) = cgroup_paths(&cgroups);
    let mut found: Vec<Limit> = Vec::new();
    if let Some(path) = v2 {
        found.extend(cgroup_limit(Path::new(CGROUP_ROOT), &path, &V2));
    }
    if let Some(path) = v1 {
        found.extend(cgroup_limit(&Path::new(CGROUP_ROOT).join("memory"), &path, &V1));
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    found.extend(mem_available(&meminfo).map(|bytes| Limit {
        bytes,
        source: "MemAvailable (/proc/meminfo)".into(),
    }));
    found.into_iter().min_by_key(|l| l.bytes)
}

/// The process's cgroup paths from `/proc/self/cgroup`: the v2 one (`0::PATH`)
/// and the v1 memory controller's (`N:...memory...:PATH`).
fn cgroup_paths(text: &str) -> (Option<String>, Option<String>) {
    let (mut v2, mut v1) = (None, None);
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_owned());
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_owned());
        }
    }
    (v2, v1)
}

/// The bytes of a cgroup limit or usage file: `None` for `max` (no limit)
/// or anything that is not a number.
fn cgroup_bytes(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The page cache the kernel can drop from a cgroup (`inactive_file` of its
/// `memory.stat`; v1 writes `total_inactive_file` for the hierarchy): it is
/// counted in the usage but does not stand in the way, as container
/// runtimes reckon a working set.
fn inactive_file(stat: &str, key: &str) -> u64 {
    stat.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
pub(crate) fn mem_available(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Headroom under a limit: `limit - (usage - inactive_file)`, and where it came from.
fn headroom(kind: &str, file: PathBuf, limit: u64, usage: u64, reclaimable: u64) -> Limit {
    let used = usage.saturating_sub(reclaimable);
    Limit {
        bytes: limit.saturating_sub(used),
        source: format!(
            "{kind} ({}): {} less {} in use",
            file.display(),
            human(limit),
            human(used)
        ),
    }
}

/// The files of one cgroup version's memory controller.
struct Controller {
    kind: &'static str,
    limit: &'static str,
    usage: &'static str,
    /// The `memory.stat` key of the page cache the kernel can drop.
    inactive_file: &'static str,
}

const V2: Controller = Controller {
    kind: "cgroup v2 memory.max",
    limit: "memory.max",
    usage: "memory.current",
    inactive_file: "inactive_file",
};

/// v1 reports no limit as a huge number, which the other limits undercut.
const V1: Controller = Controller {
    kind: "cgroup v1 memory.limit_in_bytes",
    limit: "memory.limit_in_bytes",
    usage: "memory.usage_in_bytes",
    inactive_file: "total_inactive_file",
};

/// The tightest headroom of the cgroup at `path` (as `/proc/self/cgroup`
/// names it) and its ancestors under `root`, the controller's mount: a
/// parent's limit binds its children too. When `path` is not under `root`
/// (a container sees its own cgroup at the mount's root), from `root`.
fn cgroup_limit(root: &Path, path: &str, files: &Controller) -> Option<Limit> {
    let nested = root.join(path.trim_start_matches('/'));
    let mut dir = if nested.is_dir() {
        nested
    } else {
        root.to_path_buf()
    };
    let mut best: Option<Limit> = None;
    while dir.starts_with(root) {
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        let limit = read(files.limit).as_deref().and_then(cgroup_bytes);
        let usage = read(files.usage).as_deref().and_then(cgroup_bytes);
        if let (Some(limit), Some(usage)) = (limit, usage) {
            let stat = read("memory.stat").unwrap_or_default();
            let reclaimable = inactive_file(&stat, files.inactive_file);
            let here = headroom(files.kind, dir.join(files.limit), limit, usage, reclaimable);
            if best.as_ref().is_none_or(|b| here.bytes < b.bytes) {
                best = Some(here);
            }
        }
        if !dir.pop() {
            break;
        }
    }
    best
}

/// What a run makes resident, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// The packed matrices in the run's dtype and the f32 norms, biases and
    /// position embeddings.
    pub weights: u64,
    /// One sequence's KV cache, every position it may hold written.
    pub kv_per_sequence: u64,
    pub sequences: usize,
    /// The work buffers of the forward pass, or the loader's staging buffer
    /// if that is larger (the loader frees it before any work buffer is made).
    pub scratch: u64,
    /// KV caches kept beyond the running sequences (a server's prefix
    /// cache); [`Footprint::estimate`] leaves it 0.
    pub prefix_cache: u64,
}

impl Footprint {
    /// What a run of `sequences` sequences of at most `positions` positions
    /// each will make resident, with weights packed in `dtype`, caches in
    /// `kv` and forward passes of up to `max_rows` rows. The LM head is
    /// taken as tied to `wte` (as every GPT-2 checkpoint has it); the logits
    /// buffer as grown to every row (a scoring pass asks for all).
    pub fn estimate(
        config: &Gpt2Config,
        dtype: Dtype,
        kv: KvDtype,
        sequences: usize,
        positions: usize,
        max_rows: usize,
    ) -> Footprint {
        Footprint {
            weights: weight_bytes(config, dtype),
            kv_per_sequence: KvCache::resident_bytes(config, kv, positions) as u64,
            sequences,
            scratch: scratch_bytes(config, max_rows).max(staging_bytes(config)),
            prefix_cache: 0,
        }
    }

    /// Every KV cache of the run, the prefix cache's included.
    pub fn kv_caches(&self) -> u64 {
        self.kv_per_sequence
            .saturating_mul(self.sequences as u64)
            .saturating_add(self.prefix_cache)
    }

    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.kv_caches())
            .saturating_add(self.scratch)
    }

    /// `weights 5.80 GiB + KV caches 6.00 GiB (16 x 384.0 MiB) + scratch 40.0 MiB`.
    pub fn breakdown(&self) -> String {
        let prefix = if self.prefix_cache > 0 {
            format!(" + {} prefix cache", human(self.prefix_cache))
        } else {
            String::new()
        };
        format!(
            "weights {} + KV caches {} ({} x {}{prefix}) + scratch {}",
            human(self.weights),
            human(self.kv_caches()),
            self.sequences,
            human(self.kv_per_sequence),
            human(self.scratch)
        )
    }
}

/// Bytes the loader keeps: each matrix's panels as `panel_len` lays them out
/// in the panel map, each copied tensor in f32.
fn weight_bytes(config: &Gpt2Config, dtype: Dtype) -> u64 {
    let specs = Specs::new(config);
    let bytes = specs.iter().map(|(_, spec)| match spec.panels(true) {
        Some((k, n)) => panel_len(dtype, k, n),
        None if spec.role == Role::Copied => 4 * spec.shape.iter().product::<usize>(),
        None => 0,
    });
    bytes.map(|b| b as u64).sum()
}

/// The loader's staging buffer at its largest: the largest matrix packed
/// whole, in f32 (the LM head is read a slab at a time, less than that).
fn staging_bytes(config: &Gpt2Config) -> u64 {
    let specs = Specs::new(config);
    let matrices = specs.iter().filter(|(_, s)| s.role == Role::Packed);
    let largest = matrices.map(|(_, s)| s.shape.iter().product::<usize>()).max();
    4 * largest.unwrap_or(0) as u64
}

/// The forward pass's work buffers for `max_rows` rows, as
/// [`Scratch::new`](crate::model::Scratch::new) makes them, and its logits
/// grown to every row.
fn scratch_bytes(config: &Gpt2Config, max_rows: usize) -> u64 {
    let (c, f, h, p, v) = (
        config.n_embd as u64,
        config.n_inner as u64,
        config.n_head as u64,
        config.n_positions as u64,
        config.vocab_size as u64,
    );
    // x, h, qkv (3C), att, proj, lm_in; fc (F); scores (H x P); logits (V).
    let floats = 8 * c + f + h * p + v;
    // The int8 activations: max(C, F) bytes rounded to 4, a scale and a sum.
    let quant = c.max(f).next_multiple_of(4) + 8;
    (max_rows.max(1) as u64).saturating_mul(4 * floats + quant)
}

/// `Ok` if `footprint` fits in [`limit`] (or no limit can be read); else an
/// [`Error::Memory`] naming `what` (e.g. "gpt2-xl f32, 16 sequences of 1024
/// positions"), the bytes needed, part by part, and the bytes available
/// with their source.
pub fn check(footprint: &Footprint, what: &str) -> Result<()> {
    match limit() {
        Some(limit) => check_against(footprint, what, &limit),
        None => Ok(()),
    }
}

/// [`check`] against a given limit: refused when it needs more than is available.
fn check_against(footprint: &Footprint, what: &str, limit: &Limit) -> Result<()> {
    let needed = footprint.total();
    if needed <= limit.bytes {
        return Ok(());
    }
    Err(Error::Memory {
        what: what.to_owned(),
        needed: human(needed),
        breakdown: footprint.breakdown(),
        available: human(limit.bytes),
        limit: limit.source.clone(),
    })
}

/// Resets this process's resident high-water mark (`VmHWM`) to its resident
/// size now (Linux 4.0 and later: `5` written to `/proc/self/clear_refs`),
/// so that a later [`peak_rss_bytes`] is the peak since this call; whether
/// the kernel took it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `1.50 GiB` at a GiB and above, else `12.0 MiB`.
fn human(bytes: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    let b = bytes as f64;
    if b >= 1024.0 * MIB {
        format!("{:.2} GiB", b / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_kib() {
        let text = "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   12345678 kB\n";
        assert_eq!(mem_available(text), Some(12_345_678 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn cgroup_paths_find_the_v2_and_the_v1_memory_lines() {
        assert_eq!(
            cgroup_paths("0::/user.slice/session-1.scope\n"),
            (Some("/user.slice/session-1.scope".into()), None)
        );
        let v1 = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n";
        assert_eq!(cgroup_paths(v1), (None, Some("/docker/abc".into())));
        // Hybrid: both hierarchies.
        let hybrid = "5:memory:/a\n0::/b\n";
        assert_eq!(cgroup_paths(hybrid), (Some("/b".into()), Some("/a".into())));
        assert_eq!(cgroup_paths(""), (None, None));
    }

    #[test]
    fn cgroup_files_read_bytes_and_max_is_no_limit() {
        assert_eq!(cgroup_bytes("8589934592\n"), Some(8 << 30));
        assert_eq!(cgroup_bytes("max\n"), None);
        assert_eq!(cgroup_bytes(""), None);
        let stat = "anon 100\nfile 900\nactive_file 300\ninactive_file 600\n";
        assert_eq!(inactive_file(stat, "inactive_file"), 600);
        let v1 = "cache 5\ninactive_file 7\ntotal_inactive_file 70\n";
        assert_eq!(inactive_file(v1, "total_inactive_file"), 70);
        assert_eq!(inactive_file("", "inactive_file"), 0);
    }

    #[test]
    fn headroom_is_the_limit_less_what_cannot_be_reclaimed() {
        let l = headroom(
            "cgroup v2 memory.max",
            "/x/memory.max".into(),
            8 << 30,
            3 << 30,
            1 << 30,
        );
        assert_eq!(l.bytes, 6 << 30);
        assert!(
            l.source.contains("/x/memory.max") && l.source.contains("8.00 GiB less 2.00 GiB in use"),
            "{}",
            l.source
        );
        // Over the limit already: nothing left, not an underflow.
        assert_eq!(headroom("v", "f".into(), 1, 5, 0).bytes, 0);
    }

    /// A cgroup tree on disk: the parent's tighter limit binds the child.
    #[test]
    fn a_parent_cgroup_limit_binds_its_child() {
        let root = std::env::temp_dir().join(format!("gpt2-cgroup-{}", std::process::id()));
        let child = root.join("parent/child");
        std::fs::create_dir_all(&child).unwrap();
        let write = |dir: &Path, max: &str, current: &str| {
            std::fs::write(dir.join("memory.max"), max).unwrap();
            std::fs::write(dir.join("memory.current"), current).unwrap();
        };
        write(&child, "max\n", "100\n");
        write(&root.join("parent"), "1000\n", "400\n");
        let l = cgroup_limit(&root, "/parent/child", &V2).unwrap();
        assert_eq!(l.bytes, 600);
        assert!(l.source.contains("parent/memory.max"), "{}", l.source);
        write(&child, "300\n", "100\n");
        assert_eq!(cgroup_limit(&root, "/parent/child", &V2).unwrap().bytes, 200);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// v1 in a container: the path `/proc/self/cgroup` names is not under
    /// the mount, whose root is the container's own cgroup; its page cache
    /// does not count.
    #[test]
    fn a_v1_limit_is_read_at_the_mount_root_when_the_path_is_elsewhere() {
        let root = std::env::temp_dir().join(format!("gpt2-cgroup-v1-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("memory.limit_in_bytes"), "1000\n").unwrap();
        std::fs::write(root.join("memory.usage_in_bytes"), "700\n").unwrap();
        std::fs::write(root.join("memory.stat"), "cache 500\ntotal_inactive_file 200\n").unwrap();
        let l = cgroup_limit(&root, "/docker/abc", &V1).unwrap();
        assert_eq!(l.bytes, 500);
        assert!(
            l.source.starts_with("cgroup v1 memory.limit_in_bytes"),
            "{}",
            l.source
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn check_refuses_only_past_the_limit_and_names_everything() {
        let f = Footprint {
            weights: 1 << 30,
            kv_per_sequence: 1 << 20,
            sequences: 4,
            scratch: 0,
            prefix_cache: 0,
        };
        let limit = |bytes| Limit {
            bytes,
            source: "MemAvailable (/proc/meminfo)".into(),
        };
        assert!(check_against(&f, "x", &limit(f.total())).is_ok());
        let msg = check_against(&f, "gpt2-xl f32, 4 sequences", &limit(f.total() - 1))
            .unwrap_err()
            .to_string();
        for needle in [
            "gpt2-xl f32, 4 sequences",
            "1.00 GiB",
            "4 x 1.0 MiB",
            "MemAvailable (/proc/meminfo)",
        ] {
            assert!(msg.contains(needle), "`{needle}` not in: {msg}");
        }
    }
}
