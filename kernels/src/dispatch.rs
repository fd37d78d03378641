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

    /// The feature that gives the set integer dot products (`vpdpbusd`) for
    /// the int8 products, if it has such an extension.
    pub fn vnni_feature(self) -> Option<&'static str> {
        match self {
            KernelSet::Portable => None,
            #[cfg(target_arch = "x86_64")]
            KernelSet::Avx2 => Some(arch::avx2::VNNI),
            #[cfg(target_arch = "x86_64")]
            KernelSet::Avx512 => Some(arch::avx512::VNNI),
            #[cfg(not(target_arch = "x86_64"))]
            KernelSet::Avx2 => Some("avxvnni"),
            #[cfg(not(target_arch = "x86_64"))]
            KernelSet::Avx512 => Some("avx512vnni"),
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
            "avxvnni" => is_x86_feature_detected!("avxvnni"),
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
            "unknown kernel set `{}`: expected avx512, avx2 or portable, \
             optionally +vnni or +novnni",
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

/// A `--kernels` or `GPT2_KERNELS` value: a set, and whether its int8
/// products use VNNI. `avx512` takes every extension this CPU has for the
/// set; `avx512+vnni` requires VNNI; `avx512+novnni` leaves it out (to
/// compare the two: both compute the same bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelSpec {
    pub set: KernelSet,
    /// `None`: VNNI where the CPU has it.
    pub vnni: Option<bool>,
}

impl From<KernelSet> for KernelSpec {
    fn from(set: KernelSet) -> Self {
        KernelSpec { set, vnni: None }
    }
}

impl FromStr for KernelSpec {
    type Err = UnknownKernelSet;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UnknownKernelSet(s.to_owned());
        let mut parts = s.trim().split('+');
        let set: KernelSet = parts.next().unwrap_or_default().parse().map_err(|_| bad())?;
        let mut spec = KernelSpec::from(set);
        for ext in parts {
            spec.vnni = match ext.trim().to_ascii_lowercase().as_str() {
                "vnni" if set != KernelSet::Portable => Some(true),
                "novnni" => Some(false),
                _ => return Err(bad()),
            };
        }
        Ok(spec)
    }
}

impl fmt::Display for KernelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.set.as_str())?;
        match self.vnni {
            Some(true) => f.write_str("+vnni"),
            Some(false) => f.write_str("+novnni"),
            None => Ok(()),
        }
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
    AlreadyChosen { active: Kernels, requested: Kernels },
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

/// A kernel set this CPU runs, and whether its int8 products use VNNI: only
/// [`Kernels::new`] and [`Kernels::with_spec`] (which check the CPU) make
/// one. Every kernel has a method here that runs it on this set; the free
/// functions of the crate run the [`active`] one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kernels {
    set: KernelSet,
    vnni: bool,
}

impl Kernels {
    /// `set`, if this CPU runs it, with VNNI where the CPU has it.
    pub fn new(set: KernelSet) -> Result<Kernels, KernelsError> {
        Kernels::with_spec(set.into())
    }

    /// The set `spec` names, if this CPU runs it, with VNNI as it asks.
    pub fn with_spec(spec: KernelSpec) -> Result<Kernels, KernelsError> {
        let set = spec.set;
        let mut missing = set.missing_features();
        let has_vnni = set.vnni_feature().is_some_and(has_feature);
        if spec.vnni == Some(true) && !has_vnni {
            missing.push(set.vnni_feature().unwrap_or("vnni"));
        }
        if missing.is_empty() {
            Ok(Kernels {
                set,
                vnni: spec.vnni.unwrap_or(has_vnni),
            })
        } else {
            Err(KernelsError::Unsupported { set, missing })
        }
    }

    /// Every set this CPU runs, best first.
    pub fn supported() -> Vec<Kernels> {
        KernelSet::supported()
            .into_iter()
            .filter_map(|s| Kernels::new(s).ok())
            .collect()
    }

    /// Every set this CPU runs, each with and (where it has VNNI) without
    /// VNNI: what the tests run every kernel on.
    pub fn variants() -> Vec<Kernels> {
        Kernels::supported()
            .into_iter()
            .flat_map(|k| {
                let without = Kernels { vnni: false, ..k };
                if k.vnni {
                    vec![k, without]
                } else {
                    vec![k]
                }
            })
            .collect()
    }

    /// The best set this CPU runs.
    pub fn best() -> Kernels {
        Kernels::new(KernelSet::best()).expect("the best set is supported")
    }

    pub fn set(self) -> KernelSet {
        self.set
    }

    /// Whether the int8 products use VNNI's `vpdpbusd`.
    pub fn vnni(self) -> bool {
        self.vnni
    }

    /// This CPU's kernels on `set`, a narrower set than this one's (every
    /// x86 set's features include the narrower ones'), for the kernels that
    /// run faster there; VNNI where the CPU has it for that set.
    ///
    /// # Panics
    /// If `set` is wider than this one's.
    pub(crate) fn with_set(self, set: KernelSet) -> Kernels {
        assert!(set <= self.set, "kernels: {set} is wider than {}", self.set);
        Kernels {
            set,
            vnni: self.vnni && set.vnni_feature().is_some_and(has_feature),
        }
    }

    /// f32 lanes per vector register of the set: the lanes attention's dot
    /// products sum in.
    pub fn lanes(self) -> usize {
        match self.set {
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
        match self.set {
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
            _ => unreachable!("{} is never supported off x86-64", self.set),
        }
    }

    /// [`Kernels::run`] for kernels that use the integer dot products: the
    /// set's VNNI instantiation when this `Kernels` has VNNI.
    ///
    /// # Safety
    /// As [`Kernels::run`].
    #[inline]
    pub(crate) unsafe fn run_int8<K: Kernel>(self, k: K) -> K::Out {
        match (self.set, self.vnni) {
            // SAFETY: `vnni` is set only where `with_spec` found the set's
            // VNNI feature on this CPU; the kernel's contract is the caller's.
            #[cfg(target_arch = "x86_64")]
            (KernelSet::Avx2, true) => unsafe { arch::avx2::entry_vnni(k) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            (KernelSet::Avx512, true) => unsafe { arch::avx512::entry_vnni(k) },
            // SAFETY: the caller's contract.
            _ => unsafe { self.run(k) },
        }
    }
}

impl fmt::Display for Kernels {
    /// The set, then `+vnni` when its int8 products use VNNI.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.set.as_str())?;
        if self.vnni {
            f.write_str("+vnni")?;
        }
        Ok(())
    }
}

/// The process-wide choice, made once.
static ACTIVE: OnceLock<Kernels> = OnceLock::new();

/// The set `GPT2_KERNELS` names, `None` when it is unset.
pub fn from_env() -> Result<Option<KernelSpec>, KernelsError> {
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
fn choose(flag: Option<KernelSpec>) -> Result<Kernels, KernelsError> {
    let spec = match flag {
        Some(s) => s,
        None => from_env()?.unwrap_or_else(|| KernelSet::best().into()),
    };
    Kernels::with_spec(spec)
}

/// Chooses the process's kernel set: `flag` (a `--kernels` value) if given,
/// else `GPT2_KERNELS`, else the best this CPU runs. Call it at start, before
/// any kernel; it returns the set now active. Errors name an unknown
/// `GPT2_KERNELS`, a set this CPU lacks, or a set other than the one already
/// chosen (by an earlier `init` or the first kernel call).
pub fn init(flag: Option<KernelSpec>) -> Result<Kernels, KernelsError> {
    let want = choose(flag)?;
    let got = *ACTIVE.get_or_init(|| want);
    if got == want {
        Ok(got)
    } else {
        Err(KernelsError::AlreadyChosen {
            active: got,
            requested: want,
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
const REPORTED: [&str; 9] = [
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512vnni",
    "avx512bf16",
    "avxvnni",
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
    fn a_spec_names_a_set_and_its_vnni() {
        let spec = |s: &str| s.parse::<KernelSpec>();
        assert_eq!(spec("avx512"), Ok(KernelSet::Avx512.into()));
        assert_eq!(
            spec("AVX2+novnni"),
            Ok(KernelSpec {
                set: KernelSet::Avx2,
                vnni: Some(false)
            })
        );
        assert_eq!(spec("avx512+vnni").unwrap().vnni, Some(true));
        for bad in ["portable+vnni", "avx2+fast", "avx2+", "+vnni"] {
            let err = spec(bad).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{bad}`")) && err.contains("+novnni"),
                "{err}"
            );
        }
        for s in ["avx512+vnni", "avx2+novnni", "portable"] {
            assert_eq!(spec(s).unwrap().to_string(), s);
        }
    }

    /// VNNI is used where the CPU has it, refused by name where it lacks
    /// it, and left out on request; every variant is one the CPU runs.
    #[test]
    fn vnni_follows_the_cpu_and_the_spec() {
        for set in KernelSet::supported() {
            let has = set.vnni_feature().is_some_and(has_feature);
            let k = Kernels::new(set).unwrap();
            assert_eq!(k.vnni(), has, "{set}");
            assert_eq!(k.to_string(), format!("{set}{}", if has { "+vnni" } else { "" }));
            let off = Kernels::with_spec(KernelSpec {
                set,
                vnni: Some(false),
            })
            .unwrap();
            assert!(!off.vnni() && off.to_string() == set.as_str(), "{off}");
            let on = Kernels::with_spec(KernelSpec {
                set,
                vnni: Some(true),
            });
            match (has, on) {
                (true, Ok(k)) => assert!(k.vnni()),
                (false, Err(e)) => {
                    let msg = e.to_string();
                    assert!(set == KernelSet::Portable || msg.contains("vnni"), "{msg}");
                }
                (has, got) => panic!("{set}: has vnni {has}, got {got:?}"),
            }
        }
        let variants = Kernels::variants();
        assert!(variants
            .iter()
            .all(|k| Kernels::supported().iter().any(|s| s.set() == k.set())));
        assert_eq!(
            variants.iter().filter(|k| k.vnni()).count(),
            Kernels::supported().iter().filter(|k| k.vnni()).count()
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
