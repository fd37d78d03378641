//! The AVX2 + FMA set: eight f32 lanes per register, sixteen registers;
//! with AVX-VNNI (Alder Lake, Sapphire Rapids, Zen 5 on), the int8 products
//! in one `vpdpbusd` per 32.

use std::arch::x86_64::*;

use super::{Isa, Kernel, Vector, Widen};
use crate::Dtype;

/// The AVX2 + FMA [`Isa`]; `VNNI`: with AVX-VNNI's integer dot products.
#[derive(Clone, Copy)]
pub(crate) struct Avx2<const VNNI: bool>;

/// The features [`entry`] is compiled with, as `is_x86_feature_detected!`
/// names them: what the CPU must have for this set.
pub(crate) const FEATURES: &[&str] = &["avx2", "fma"];

/// What [`entry_vnni`] adds to [`FEATURES`].
pub(crate) const VNNI: &str = "avxvnni";

/// A kernel compiled for AVX2 + FMA: its `#[inline(always)]` body inlines
/// here, so its intrinsics and its vectorised loops use them.
///
/// # Safety
/// The CPU has every one of [`FEATURES`], and the kernel's own contract holds.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn entry<K: Kernel>(k: K) -> K::Out {
    // SAFETY: the caller's contract.
    unsafe { k.run::<Avx2<false>>() }
}

/// [`entry`] with AVX-VNNI too (the int8 products).
///
/// # Safety
/// As [`entry`], and the CPU has [`VNNI`].
#[target_feature(enable = "avx2,fma,avxvnni")]
pub(crate) unsafe fn entry_vnni<K: Kernel>(k: K) -> K::Out {
    // SAFETY: the caller's contract.
    unsafe { k.run::<Avx2<true>>() }
}

impl Vector for __m256 {
    const LANES: usize = 8;

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the trait's contract (the CPU has AVX2 and FMA, pointers
        // valid for 8 floats), as in every method below.
        unsafe { _mm256_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the trait's contract.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the trait's contract.
        unsafe { _mm256_storeu_ps(p, self) }
    }

    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Self {
        // SAFETY: the trait's contract.
        unsafe { _mm256_broadcast_ss(&*p) }
    }

    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: the trait's contract.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }

    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // SAFETY: the trait's contract.
        unsafe { sum8(self) }
    }

    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        // SAFETY: the trait's contract.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }
}

/// The 8 lanes of `a` summed by halves: `(l0+l4 + l2+l6) + (l1+l5 + l3+l7)`.
///
/// # Safety
/// The CPU has AVX.
#[inline(always)]
pub(crate) unsafe fn sum8(a: __m256) -> f32 {
    // SAFETY: the caller's contract.
    unsafe {
        // [l0+l4, l1+l5, l2+l6, l3+l7]
        let p = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        // [p0+p2, p1+p3, ..]
        let p = _mm_add_ps(p, _mm_movehl_ps(p, p));
        // (p0+p2) + (p1+p3)
        _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps::<1>(p, p)))
    }
}

impl<const VNNI: bool> Isa for Avx2<VNNI> {
    type V = __m256;

    /// Fused: inside [`entry`] this is one `vfmadd`.
    #[inline(always)]
    fn fmadd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    /// f32: one load. bf16: the 32 bytes of the 16-column group unpacked
    /// against zero (low words for columns 0-7, high for 8-15, see
    /// `Weight::slot`) into the top halves of the lanes; both vectors of a
    /// group load the same bytes, which the compiler loads once. int8: 8
    /// bytes sign-extended to 32-bit lanes and converted (exactly).
    #[inline(always)]
    unsafe fn widen<E: Widen>(row: *const E, v: usize) -> __m256 {
        // SAFETY: the caller's contract (a group is 32 bytes in bf16);
        // E::DTYPE says what `row` points to.
        unsafe {
            match E::DTYPE {
                Dtype::F32 => _mm256_loadu_ps(row.cast::<f32>().add(8 * v)),
                Dtype::Bf16 => {
                    let group = _mm256_loadu_si256(row.cast::<u16>().add(16 * (v / 2)).cast());
                    let zero = _mm256_setzero_si256();
                    _mm256_castsi256_ps(if v.is_multiple_of(2) {
                        _mm256_unpacklo_epi16(zero, group)
                    } else {
                        _mm256_unpackhi_epi16(zero, group)
                    })
                }
                Dtype::Int8 => unreachable!("int8 is multiplied as integers"),
            }
        }
    }

    type Sums = __m256i;
    type Quads = __m256i;
    const OFFSET: i32 = if VNNI { 128 } else { 0 };

    #[inline(always)]
    unsafe fn sums_zero() -> __m256i {
        // SAFETY: the trait's contract (the CPU has the set, pointers valid),
        // as in every method below.
        unsafe { _mm256_setzero_si256() }
    }

    #[inline(always)]
    unsafe fn quads_zero() -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_setzero_si256() }
    }

    #[inline(always)]
    unsafe fn sums_load(p: *const i32) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_loadu_si256(p.cast()) }
    }

    #[inline(always)]
    unsafe fn sums_store(s: __m256i, p: *mut i32) {
        // SAFETY: the trait's contract.
        unsafe { _mm256_storeu_si256(p.cast(), s) }
    }

    /// With VNNI the sign bit flipped: `w + 128` as an unsigned byte.
    #[inline(always)]
    unsafe fn weights4(p: *const i8) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe {
            let w = _mm256_loadu_si256(p.cast());
            if VNNI {
                _mm256_xor_si256(w, _mm256_set1_epi8(i8::MIN))
            } else {
                w
            }
        }
    }

    #[inline(always)]
    unsafe fn splat4(p: *const i8) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_set1_epi32(p.cast::<i32>().read_unaligned()) }
    }

    /// VNNI: `vpdpbusd` (unsigned `w + 128` by signed x, four products per
    /// lane added to it). Without: llama.cpp's sign trick, `|x|` (unsigned)
    /// by `w` with x's sign (`vpsignb`), adjacent products added to i16
    /// (`vpmaddubsw`: at most 2 · 127 · 127, so never saturating), then to
    /// i32 (`vpmaddwd` by ones).
    #[inline(always)]
    unsafe fn dot4(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: the trait's contract; VNNI is set only in `entry_vnni`.
        unsafe {
            if VNNI {
                _mm256_dpbusd_avx_epi32(acc, w, x)
            } else {
                let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
                _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
            }
        }
    }
}
