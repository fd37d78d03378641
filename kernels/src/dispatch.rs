//! Which instruction set the kernels run on, chosen at run time.
//!
//! The binary is built for baseline x86-64 and carries every set
//! ([`KernelSet`]); the process uses one, [`active`], chosen once: the
//! `--kernels` flag through [`init`], else `GPT2_KERNELS`, else the best set
//! this CPU runs. A [`Kernels`] is proof that a set runs on this CPU (only
//! detection makes one), so every kernel can be called on a given set, as
//! the tests do for each of [`Kernels::supported`], without touching the
//! process-wide choice.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::arch::{self, Kernel};

/// The environment variable that picks the kernel set when no flag does.
pub const ENV: &str = "GPT2_KERNELS";

/// An instruction set the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelSet {
    /// Plain Rust for baseline x86-64 (SSE2) or any other CPU; multiply and
    /// add round separately.
    Portable,
    /// AVX2 and FMA: 16 registers of 8 f32 lanes.
    Avx2,
    /// AVX-512 (F, BW, DQ, VL): 32 registers of 16 f32 lanes.
    Avx512,
}

impl KernelSet {
    /// Every set, best first: the order [`KernelSet::supported`] keeps.
    pub const ALL: [KernelSet; 3] = [KernelSet::Avx512, KernelSet::Avx2, KernelSet::Portable];

    /// The name `--kernels` and `GPT2_KERNELS` take and every report prints.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelSet::Portable => "portable",
            KernelSet::Avx2 => "avx2",
            KernelSet::Avx512 => "avx512",
        }
    }

    /// The CPU features the set needs, as `is_x86_feature_detected!` names them.
    pub fn features(self) -> &'static [&'static str] {
        match self {
            KernelSet::Portable => &[],
            #[cfg(target_arch = "x86_64")]
            KernelSet::Avx2 => arch::avx2::FEATURES,
            #[cfg(target_arch = "x86_64")]
            KernelSet::Avx512 => arch::avx512::FEATURES,
            #[cfg(not(target_arch = "x86_64"))]
            KernelSet::Avx2 => &["avx2", "fma"],
            #[cfg(not(target_arch = "x86_64"))]
            KernelSet::Avx512 => &["avx512f", "avx512bw", "avx512dq", "avx512vl"],
        }
    }

    /// The features of [`KernelSet::features`] this CPU lacks (all of them
    /// off x86-64, where only the portable set is built).
    pub fn missing_features(self) -> Vec<&'static str> {
        self.features()
            .iter()
            .copied()
            .filter(|f| !has_feature(f))
            .collect()
    }

    /// Whether this CPU runs the set.
    pub fn is_supported(self) -> bool {
        self.missing_features().is_empty()
    }

    /// Every set this CPU runs, best first (portable always last).
    pub fn supported() -> Vec<KernelSet> {
        KernelSet::ALL.into_iter().filter(|s| s.is_supported()).collect()
    }

    /// The best set this CPU runs.
    pub fn best() -> KernelSet {
        KernelSet::supported()[0]
    }
}

/// Whether this CPU has the feature `name` (one of [`KernelSet::features`]).
fn has_feature(name: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match name {
            "avx2" => is_x86_feature_detected!("avx2"),
            "fma" => is_x86_feature_detected!("fma"),
            "avx512f" => is_x86_feature_detected!("avx512f"),
            "avx512bw" => is_x86_feature_detected!("avx512bw"),
            "avx512dq" => is_x86_feature_detected!("avx512dq"),
            "avx512vl" => is_x86_feature_detected!("avx512vl"),
            "avx512vnni" => is_x86_feature_detected!("avx512vnni"),
            "avx512bf16" => is_x86_feature_detected!("avx512bf16"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = name;
        false
    }
}

impl fmt::Display for KernelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--kernels` or `GPT2_KERNELS` value that names no set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKernelSet(pub String);

impl fmt::Display for UnknownKernelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown kernel set `{}`: expected avx512, avx2 or portable",
            self.0
        )
    }
}

impl std::error::Error for UnknownKernelSet {}

impl FromStr for KernelSet {
    type Err = UnknownKernelSet;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KernelSet::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownKernelSet(s.to_owned()))
    }
}

/// Why a kernel set cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelsError {
    /// `GPT2_KERNELS` names no set (or is not UTF-8).
    Env(UnknownKernelSet),
    /// The CPU lacks features the set needs.
    Unsupported {
        set: KernelSet,
        missing: Vec<&'static str>,
    },
    /// The process already runs another set ([`init`] after the first kernel
    /// call, or twice with different sets).
    AlreadyChosen { active: KernelSet, requested: KernelSet },
}

impl fmt::Display for KernelsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelsError::Env(e) => write!(f, "{ENV}: {e}"),
            KernelsError::Unsupported { set, missing } => {
                let runs: Vec<_> = KernelSet::supported().iter().map(|s| s.as_str()).collect();
                write!(
                    f,
                    "kernel set {set} needs CPU features this CPU ({}) lacks: {}; it runs {}",
                    CpuInfo::detect().model_name,
                    missing.join(", "),
                    runs.join(", ")
                )
            }
            KernelsError::AlreadyChosen { active, requested } => write!(
                f,
                "kernel set {requested} requested, but this process already runs {active} \
                 (the set is chosen once, before the first kernel call)"
            ),
        }
    }
}

impl std::error::Error for KernelsError {}

/// A kernel set this CPU runs: only [`Kernels::new`] (which checks the CPU)
/// makes one. Every kernel has a method here that runs it on this set; the
/// free functions of the crate run the [`active`] one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kernels(KernelSet);

impl Kernels {
    /// `set`, if this CPU runs it.
    pub fn new(set: KernelSet) -> Result<Kernels, KernelsError> {
        let missing = set.missing_features();
        if missing.is_empty() {
            Ok(Kernels(set))
        } else {
            Err(KernelsError::Unsupported { set, missing })
        }
    }

    /// Every set this CPU runs, best first.
    pub fn supported() -> Vec<Kernels> {
        KernelSet::supported().into_iter().map(Kernels).collect()
    }

    /// The best set this CPU runs.
    pub fn best() -> Kernels {
        Kernels(KernelSet::best())
    }

    pub fn set(self) -> KernelSet {
        self.0
    }

    /// f32 lanes per vector register of the set: the lanes attention's dot
    /// products sum in.
    pub fn lanes(self) -> usize {
        match self.0 {
            KernelSet::Portable | KernelSet::Avx2 => 8,
            KernelSet::Avx512 => 16,
        }
    }

    /// Runs `k`'s body compiled for this set.
    ///
    /// # Safety
    /// `k`'s own contract (pointers in bounds); the CPU side is what a
    /// `Kernels` proves.
    #[inline]
    pub(crate) unsafe fn run<K: Kernel>(self, k: K) -> K::Out {
        match self.0 {
            // SAFETY: the caller's contract; the portable set needs no feature.
            KernelSet::Portable => unsafe { arch::portable::entry(k) },
            // SAFETY: a `Kernels` holds a set only once `new` found every one
            // of its features on this CPU; the kernel's contract is the caller's.
            #[cfg(target_arch = "x86_64")]
            KernelSet::Avx2 => unsafe { arch::avx2::entry(k) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            KernelSet::Avx512 => unsafe { arch::avx512::entry(k) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("{} is never supported off x86-64", self.0),
        }
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// The process-wide choice, made once.
static ACTIVE: OnceLock<Kernels> = OnceLock::new();

/// The set `GPT2_KERNELS` names, `None` when it is unset.
pub fn from_env() -> Result<Option<KernelSet>, KernelsError> {
    match std::env::var_os(ENV) {
        None => Ok(None),
        Some(v) => {
            let s = v
                .to_str()
                .ok_or_else(|| KernelsError::Env(UnknownKernelSet(v.to_string_lossy().into_owned())))?;
            s.parse().map(Some).map_err(KernelsError::Env)
        }
    }
}

/// What the process would choose: `flag`, else `GPT2_KERNELS`, else the
/// best set; an error if that set does not run here or the variable names
/// no set (never a silent fallback to another set).
fn choose(flag: Option<KernelSet>) -> Result<Kernels, KernelsError> {
    let set = match flag {
        Some(s) => s,
        None => from_env()?.unwrap_or_else(KernelSet::best),
    };
    Kernels::new(set)
}

/// Chooses the process's kernel set: `flag` (a `--kernels` value) if given,
/// else `GPT2_KERNELS`, else the best this CPU runs. Call it at start, before
/// any kernel; it returns the set now active. Errors name an unknown
/// `GPT2_KERNELS`, a set this CPU lacks, or a set other than the one already
/// chosen (by an earlier `init` or the first kernel call).
pub fn init(flag: Option<KernelSet>) -> Result<Kernels, KernelsError> {
    let want = choose(flag)?;
    let got = *ACTIVE.get_or_init(|| want);
    if got == want {
        Ok(got)
    } else {
        Err(KernelsError::AlreadyChosen {
            active: got.set(),
            requested: want.set(),
        })
    }
}

/// The process's kernel set: [`init`]'s choice, or, if no one called it,
/// chosen at the first kernel call from `GPT2_KERNELS` or the CPU.
///
/// # Panics
/// At that first call, if `GPT2_KERNELS` names no set or one this CPU
/// lacks (the message says which): binaries call [`init`] first, which
/// returns that as an error instead.
pub fn active() -> Kernels {
    *ACTIVE.get_or_init(|| choose(None).unwrap_or_else(|e| panic!("{e}")))
}

/// The CPU, as reports and metadata name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuInfo {
    /// `GenuineIntel`, `AuthenticAMD`, ...; empty off x86-64.
    pub vendor: String,
    /// The brand string (`AMD EPYC 7B13`, ...); `unknown` where there is none.
    pub model_name: String,
    /// Family and model as Linux's `/proc/cpuinfo` counts them (base plus
    /// extended fields); 0 off x86-64.
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    /// Each feature the kernel sets care about, and whether the CPU has it.
    pub flags: Vec<(&'static str, bool)>,
}

/// The features [`CpuInfo`] reports.
const REPORTED: [&str; 8] = [
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512vnni",
    "avx512bf16",
];

impl CpuInfo {
    /// This CPU, from `cpuid`.
    pub fn detect() -> CpuInfo {
        let flags = REPORTED.iter().map(|&f| (f, has_feature(f))).collect();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid;
            // Leaves past the maximum the CPU reports are not asked for.
            let leaf0 = __cpuid(0);
            let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
                .iter()
                .flat_map(|r| r.to_le_bytes())
                .collect();
            let (mut family, mut model, mut stepping) = (0, 0, 0);
            if leaf0.eax >= 1 {
                let eax = __cpuid(1).eax;
                let base_family = (eax >> 8) & 0xf;
                family = base_family + if base_family == 0xf { (eax >> 20) & 0xff } else { 0 };
                model = (eax >> 4) & 0xf;
                if base_family == 0x6 || base_family == 0xf {
                    model += ((eax >> 16) & 0xf) << 4;
                }
                stepping = eax & 0xf;
            }
            let max_ext = __cpuid(0x8000_0000).eax;
            let model_name = if max_ext >= 0x8000_0004 {
                let brand: Vec<u8> = (0x8000_0002u32..=0x8000_0004)
                    .flat_map(|leaf| {
                        let r = __cpuid(leaf);
                        [r.eax, r.ebx, r.ecx, r.edx]
                            .into_iter()
                            .flat_map(|v| v.to_le_bytes())
                    })
                    .collect();
                String::from_utf8_lossy(&brand)
                    .trim_matches(char::from(0))
                    .trim()
                    .to_owned()
            } else {
                String::new()
            };
            CpuInfo {
                vendor: String::from_utf8_lossy(&vendor).into_owned(),
                model_name: if model_name.is_empty() {
                    "unknown".into()
                } else {
                    model_name
                },
                family,
                model,
                stepping,
                flags,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        CpuInfo {
            vendor: String::new(),
            model_name: "unknown".into(),
            family: 0,
            model: 0,
            stepping: 0,
            flags,
        }
    }

    /// The reported features the CPU has, in [`CpuInfo::flags`] order.
    pub fn present(&self) -> Vec<&'static str> {
        self.flags.iter().filter(|(_, on)| *on).map(|(f, _)| *f).collect()
    }
}

impl fmt::Display for CpuInfo {
    /// `AMD Ryzen 9 5950X 16-Core Processor (family 25, model 33, stepping
    /// 0; avx2 fma)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (family {}, model {}, stepping {}; {})",
            self.model_name,
            self.family,
            self.model,
            self.stepping,
            self.present().join(" ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_named() {
        for s in KernelSet::ALL {
            assert_eq!(s.as_str().parse::<KernelSet>(), Ok(s));
        }
        assert_eq!("AVX2".parse::<KernelSet>(), Ok(KernelSet::Avx2));
        let err = "sse9".parse::<KernelSet>().unwrap_err().to_string();
        assert!(
            err.contains("`sse9`") && err.contains("avx512, avx2 or portable"),
            "{err}"
        );
    }

    #[test]
    fn supported_sets_are_best_first_and_end_with_portable() {
        let s = KernelSet::supported();
        assert_eq!(s.last(), Some(&KernelSet::Portable));
        assert!(s.windows(2).all(|w| w[0] > w[1]), "best first: {s:?}");
        assert_eq!(KernelSet::best(), s[0]);
        for set in KernelSet::ALL {
            assert_eq!(Kernels::new(set).is_ok(), s.contains(&set), "{set}");
        }
    }

    #[test]
    fn a_set_the_cpu_lacks_is_a_named_error() {
        let lacking = KernelSet::ALL.into_iter().find(|s| !s.is_supported());
        let Some(set) = lacking else {
            eprintln!("NOTICE: this CPU runs every kernel set; nothing to refuse");
            return;
        };
        let err = Kernels::new(set).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(set.as_str()) && msg.contains("lacks"), "{msg}");
        let KernelsError::Unsupported { missing, .. } = err else {
            panic!("{msg}")
        };
        assert!(
            !missing.is_empty() && missing.iter().all(|f| msg.contains(f)),
            "{msg}"
        );
    }

    #[test]
    fn cpu_info_names_the_cpu_and_its_flags() {
        let cpu = CpuInfo::detect();
        assert!(!cpu.model_name.is_empty());
        assert_eq!(cpu.flags.len(), REPORTED.len());
        for set in KernelSet::supported() {
            for f in set.features() {
                assert!(cpu.present().contains(f), "{set} runs, so {f} is present: {cpu}");
            }
        }
        #[cfg(target_arch = "x86_64")]
        assert!(cpu.family > 0, "{cpu}");
    }
}
