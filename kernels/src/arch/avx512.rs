//! The AVX-512 set: sixteen f32 lanes per register, thirty-two registers,
//! so wider tiles (`matmul/tiles.rs`: 8 rows x 48 columns, 24 sums); with
//! AVX512-VNNI (Cascade Lake, Ice Lake, Zen 4 on), the int8 products in one
//! `vpdpbusd` per 64.

use std::arch::x86_64::*;

use super::{avx2, Isa, Kernel, Vector, Widen};
use crate::Dtype;

/// The AVX-512 [`Isa`]; `VNNI`: with AVX512-VNNI's integer dot products.
#[derive(Clone, Copy)]
pub(crate) struct Avx512<const VNNI: bool>;

/// The features [`entry`] is compiled with, as `is_x86_feature_detected!`
/// names them: what the CPU must have for this set (every AVX-512 CPU since
/// Skylake-SP, and AMD's since Zen 4, has all of them).
pub(crate) const FEATURES: &[&str] = &["avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"];

/// A kernel compiled for AVX-512: its `#[inline(always)]` body inlines
/// here.
///
/// # Safety
/// The CPU has every one of [`FEATURES`], and the kernel's own contract holds.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) unsafe fn entry<K: Kernel>(k: K) -> K::Out {
    // SAFETY: the caller's contract.
    unsafe { k.run::<Avx512<false>>() }
}

/// What [`entry_vnni`] adds to [`FEATURES`].
pub(crate) const VNNI: &str = "avx512vnni";

/// [`entry`] with AVX512-VNNI too (the int8 products).
///
/// # Safety
/// As [`entry`], and the CPU has [`VNNI`].
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub(crate) unsafe fn entry_vnni<K: Kernel>(k: K) -> K::Out {
    // SAFETY: the caller's contract.
    unsafe { k.run::<Avx512<true>>() }
}

impl Vector for __m512 {
    const LANES: usize = 16;

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the trait's contract (the CPU has this set, pointers
        // valid for 16 floats), as in every method below.
        unsafe { _mm512_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the trait's contract.
        unsafe { _mm512_loadu_ps(p) }
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the trait's contract.
        unsafe { _mm512_storeu_ps(p, self) }
    }

    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Self {
        // SAFETY: the trait's contract.
        unsafe { _mm512_set1_ps(*p) }
    }

    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: the trait's contract.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }

    /// Lanes 8-15 onto 0-7, then AVX2's halving sum.
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // SAFETY: the trait's contract.
        unsafe {
            let half = _mm256_add_ps(_mm512_castps512_ps256(self), _mm512_extractf32x8_ps::<1>(self));
            avx2::sum8(half)
        }
    }

    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        // SAFETY: the trait's contract.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }
}

/// The word permutation that widens one bf16 group of 16 (in the packed
/// layout AVX2 reads, `Weight::slot`) to 16 f32 lanes: word `2c + 1` of the
/// result (the top half of lane c) takes the word where column c is stored;
/// even words are zeroed by the mask [`BF16_HIGH_WORDS`].
const BF16_WIDEN: [u16; 32] = {
    let mut idx = [0u16; 32];
    let mut c = 0;
    while c < 16 {
        // `<half::bf16 as Weight>::slot(c)`, spelled out for a const.
        let slot = match c / 4 {
            1 => c + 4,
            2 => c - 4,
            _ => c,
        };
        idx[2 * c + 1] = slot as u16;
        c += 1;
    }
    idx
};

/// The odd words of a 512-bit register: the top halves of its 16 lanes.
const BF16_HIGH_WORDS: __mmask32 = 0xAAAA_AAAA;

impl<const VNNI: bool> Isa for Avx512<VNNI> {
    type V = __m512;

    /// Fused: inside [`entry`] this is one `vfmadd`.
    #[inline(always)]
    fn fmadd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    /// f32: one load. bf16: the group's 32 bytes permuted word by word into
    /// the top halves of the lanes, zeros below (one `vpermw` with a zeroing
    /// mask), which also undoes AVX2's column swap: the packed layout is the
    /// same for every set.
    #[inline(always)]
    unsafe fn widen<E: Widen>(row: *const E, v: usize) -> __m512 {
        // SAFETY: the caller's contract (group v of bf16 is 32 bytes);
        // E::DTYPE says what `row` points to.
        unsafe {
            match E::DTYPE {
                Dtype::F32 => _mm512_loadu_ps(row.cast::<f32>().add(16 * v)),
                Dtype::Bf16 => {
                    let group = _mm256_loadu_si256(row.cast::<u16>().add(16 * v).cast());
                    let idx = _mm512_loadu_si512(BF16_WIDEN.as_ptr().cast());
                    _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(
                        BF16_HIGH_WORDS,
                        idx,
                        _mm512_zextsi256_si512(group),
                    ))
                }
                Dtype::Int8 => unreachable!("int8 is multiplied as integers"),
            }
        }
    }

    type Sums = __m512i;
    type Quads = __m512i;
    const OFFSET: i32 = if VNNI { 128 } else { 0 };

    #[inline(always)]
    unsafe fn sums_zero() -> __m512i {
        // SAFETY: the trait's contract (the CPU has the set, pointers valid),
        // as in every method below.
        unsafe { _mm512_setzero_si512() }
    }

    #[inline(always)]
    unsafe fn quads_zero() -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_setzero_si512() }
    }

    #[inline(always)]
    unsafe fn sums_load(p: *const i32) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_loadu_si512(p.cast()) }
    }

    #[inline(always)]
    unsafe fn sums_store(s: __m512i, p: *mut i32) {
        // SAFETY: the trait's contract.
        unsafe { _mm512_storeu_si512(p.cast(), s) }
    }

    /// With VNNI the sign bit flipped: `w + 128` as an unsigned byte.
    #[inline(always)]
    unsafe fn weights4(p: *const i8) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe {
            let w = _mm512_loadu_si512(p.cast());
            if VNNI {
                _mm512_xor_si512(w, _mm512_set1_epi8(i8::MIN))
            } else {
                w
            }
        }
    }

    #[inline(always)]
    unsafe fn splat4(p: *const i8) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_set1_epi32(p.cast::<i32>().read_unaligned()) }
    }

    /// VNNI: `vpdpbusd` (unsigned `w + 128` by signed x, four products per
    /// lane added to it). Without: AVX2's sign trick, with `w` negated under
    /// a mask of x's negative bytes (AVX-512 has no `vpsignb`; where x is 0
    /// its absolute value zeroes the product).
    #[inline(always)]
    unsafe fn dot4(acc: __m512i, w: __m512i, x: __m512i) -> __m512i {
        // SAFETY: the trait's contract; VNNI is set only in `entry_vnni`.
        unsafe {
            if VNNI {
                _mm512_dpbusd_epi32(acc, w, x)
            } else {
                let neg = _mm512_movepi8_mask(x);
                let sw = _mm512_mask_sub_epi8(w, neg, _mm512_setzero_si512(), w);
                let pairs = _mm512_maddubs_epi16(_mm512_abs_epi8(x), sw);
                _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Weight;

    /// The permutation is the packed layout's, read back: column c of a
    /// group is where `Weight::slot` put it.
    #[test]
    fn bf16_widen_reads_the_slots_of_the_packed_layout() {
        for c in 0..16 {
            assert_eq!(
                BF16_WIDEN[2 * c + 1] as usize,
                <half::bf16 as Weight>::slot(c),
                "column {c}"
            );
        }
    }
}
