//! The portable set: plain Rust, what any x86-64 (or other) CPU runs. A
//! vector is `[f32; 8]`, which LLVM keeps in SSE registers; multiply and add
//! round separately (no FMA in baseline x86-64, and a software `fma` call
//! would be far slower than the rounding difference is worth). No prefetch
//! hint.

use super::{Isa, Kernel, Vector, Widen};

/// The portable [`Isa`].
#[derive(Clone, Copy)]
pub(crate) struct Portable;

/// Eight f32 lanes in plain Rust.
#[derive(Clone, Copy)]
pub(crate) struct P8([f32; 8]);

/// The portable instantiation of a kernel: no features to enable, but out of
/// line like the others, so that one copy serves every call site.
///
/// # Safety
/// The kernel's own contract holds (the portable set needs no CPU feature).
#[inline(never)]
pub(crate) unsafe fn entry<K: Kernel>(k: K) -> K::Out {
    // SAFETY: the caller's contract.
    unsafe { k.run::<Portable>() }
}

impl Vector for P8 {
    const LANES: usize = 8;

    #[inline(always)]
    unsafe fn zero() -> Self {
        P8([0.0; 8])
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's contract (8 floats at p).
        P8(unsafe { p.cast::<[f32; 8]>().read_unaligned() })
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's contract (8 floats at p).
        unsafe { p.cast::<[f32; 8]>().write_unaligned(self.0) }
    }

    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Self {
        // SAFETY: the caller's contract.
        P8([unsafe { *p }; 8])
    }

    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        let mut o = c.0;
        for ((o, a), b) in o.iter_mut().zip(a.0).zip(b.0) {
            *o += a * b;
        }
        P8(o)
    }

    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        let a = self.0;
        let p = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
        (p[0] + p[2]) + (p[1] + p[3])
    }

    #[inline(always)]
    unsafe fn prefetch(_: *const u8) {}
}

impl Isa for Portable {
    type V = P8;

    #[inline(always)]
    fn fmadd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }

    /// One value at a time, from its slot.
    #[inline(always)]
    unsafe fn widen<E: Widen>(row: *const E, v: usize) -> P8 {
        let mut o = [0f32; 8];
        for (c, o) in o.iter_mut().enumerate() {
            // SAFETY: the caller's contract: the group holding column 8v + c
            // is valid, and `slot` stays inside it.
            *o = unsafe { *row.add(E::slot(8 * v + c)) }.to_f32();
        }
        P8(o)
    }

    type Sums = [i32; 8];
    type Quads = [i8; 32];
    const OFFSET: i32 = 0;

    #[inline(always)]
    unsafe fn sums_zero() -> [i32; 8] {
        [0; 8]
    }

    #[inline(always)]
    unsafe fn quads_zero() -> [i8; 32] {
        [0; 32]
    }

    #[inline(always)]
    unsafe fn sums_load(p: *const i32) -> [i32; 8] {
        // SAFETY: the caller's contract (8 i32 at p).
        unsafe { p.cast::<[i32; 8]>().read_unaligned() }
    }

    #[inline(always)]
    unsafe fn sums_store(s: [i32; 8], p: *mut i32) {
        // SAFETY: the caller's contract (8 i32 at p).
        unsafe { p.cast::<[i32; 8]>().write_unaligned(s) }
    }

    #[inline(always)]
    unsafe fn weights4(p: *const i8) -> [i8; 32] {
        // SAFETY: the caller's contract (32 bytes at p).
        unsafe { p.cast::<[i8; 32]>().read_unaligned() }
    }

    #[inline(always)]
    unsafe fn splat4(p: *const i8) -> [i8; 32] {
        // SAFETY: the caller's contract (4 bytes at p).
        let x = unsafe { p.cast::<[i8; 4]>().read_unaligned() };
        std::array::from_fn(|i| x[i % 4])
    }

    #[inline(always)]
    unsafe fn dot4(acc: [i32; 8], w: [i8; 32], x: [i8; 32]) -> [i32; 8] {
        std::array::from_fn(|l| {
            acc[l]
                + (0..4)
                    .map(|i| w[4 * l + i] as i32 * x[4 * l + i] as i32)
                    .sum::<i32>()
        })
    }
}
