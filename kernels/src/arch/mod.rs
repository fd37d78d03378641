//! The instruction-set seam: one module per instruction set, each an [`Isa`]
//! (its f32 [`Vector`], how each weight format widens into one, its scalar
//! fused multiply-add), and the loop bodies written once over any of them
//! (`bodies.rs`).
//!
//! | set | module | vector | registers |
//! |---|---|---|---|
//! | portable | `portable.rs` | `[f32; 8]`, plain Rust (LLVM vectorises) | what the target has |
//! | avx2 | `avx2.rs` | `__m256`, AVX2 + FMA | 16 |
//! | avx512 | `avx512.rs` | `__m512`, AVX-512 F/BW/DQ/VL | 32 |
//!
//! The choice is made at run time, once ([`crate::dispatch`]): every kernel
//! is a [`Kernel`] whose body is generic over the set and `#[inline(always)]`
//! all the way down, and each x86 set has one `#[target_feature]` entry point
//! (`avx2::entry`, `avx512::entry`) that instantiates it, so the intrinsics
//! and LLVM's vectorised loops inline into code compiled for that set. The
//! binary itself targets baseline x86-64 and runs on any of them.
//!
//! Within one set every output has the same roundings whatever the tile it
//! falls in, the batch or the pool size (the tests hold the packed kernels
//! to the stored-layout one bit for bit, per set). Across sets they may
//! differ: portable adds without fusing (a software `fma` would be far
//! slower than the rounding is worth), the x86 sets fuse, and the dot
//! products of attention sum in the vector's lanes (8 or 16).
//!
//! Another weight dtype: a [`Weight`] impl here (its scalar widening and its
//! `DTYPE`) and an arm in each set's `widen`. Another instruction set: a
//! module with an [`Isa`] impl and an entry point, and a [`KernelSet`]
//! variant.
//!
//! [`KernelSet`]: crate::KernelSet

pub(crate) mod bodies;
pub(crate) mod portable;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

use crate::Dtype;

/// Bytes in a cache line: the unit of the tiles' prefetch.
pub(crate) const LINE: usize = 64;

/// A kernel body, generic over the instruction set it is compiled for.
/// [`Kernels::run`](crate::Kernels) calls [`Kernel::run`] through the set's
/// `#[target_feature]` entry point; impls are `#[inline(always)]` so that
/// the whole body lands in it.
pub(crate) trait Kernel {
    type Out;

    /// # Safety
    /// The CPU runs `I`'s instructions, and the kernel's own contract
    /// (pointers in bounds) holds.
    unsafe fn run<I: Isa>(self) -> Self::Out;
}

/// `LANES` f32 values in registers, and the operations the loop bodies use.
///
/// # Safety (every method)
/// Called only where the CPU has the owning set's instructions (inside its
/// entry point), with pointers valid for `LANES` floats.
pub(crate) trait Vector: Copy {
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `*p` in every lane.
    unsafe fn splat(p: *const f32) -> Self;
    /// `a * b + c`, lane by lane, with the set's rounding.
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    /// The lanes summed by halves: the upper half added to the lower until
    /// one is left (for 8 lanes `(l0+l4 + l2+l6) + (l1+l5 + l3+l7)`).
    unsafe fn sum(self) -> f32;
    /// A hint to bring the line at `p` into L2; never faults.
    unsafe fn prefetch(p: *const u8);
}

/// An instruction set: its vector and the loads that only it can write.
pub(crate) trait Isa: Copy + 'static {
    type V: Vector;

    /// `a * b + c` in scalars, rounded as [`Vector::mul_add`] rounds each lane.
    fn fmadd(a: f32, b: f32, c: f32) -> f32;

    /// Columns `L·v .. L·v + L` (`L` the lanes) of one weight row, widened
    /// to f32 exactly.
    ///
    /// # Safety
    /// The CPU has the set; `row` starts a group of [`Weight::GROUP`]
    /// columns and is valid for every group that holds those columns.
    unsafe fn widen<E: Weight>(row: *const E, v: usize) -> Self::V;

    /// The 8-lane sums of `x[r0 + r, 0..k8] · w[j0 + c, 0..k8]` for `R x C`
    /// pairs (lane l holds the products at `k ≡ l mod 8`, added in order of
    /// k), unreduced: `matmul_bt`'s body, in 8 lanes in every set.
    ///
    /// # Safety
    /// The CPU has the set; pointers valid for `x[M, K]` and `w[N, K]`, with
    /// `r0 + R <= M`, `j0 + C <= N`, and `k8 <= K` a multiple of 8.
    unsafe fn bt_lanes<const R: usize, const C: usize>(
        x: *const f32,
        w: *const f32,
        r0: usize,
        j0: usize,
        k8: usize,
        k: usize,
    ) -> [[[f32; 8]; C]; R];

    /// `x · w_j` over `0..k32` for `J` int8 columns, each an exact i32.
    ///
    /// # Safety
    /// The CPU has the set; `x` and every column valid for `k32` values,
    /// `k32` a multiple of 32.
    unsafe fn dot_i8<const J: usize>(x: *const i8, ws: [*const i8; J], k32: usize) -> [i32; J];
}

/// A value of a packed weight format, widened to f32 exactly (every bf16 and
/// every int8 is an f32). The tiles multiply by the widened value, so a
/// format changes what is loaded, never the order of the sums.
pub(crate) trait Weight: Copy + Send + Sync + 'static {
    /// Which format this is: each set's `widen` branches on it (a constant).
    const DTYPE: Dtype;

    /// Columns in a group whose order in memory is permuted so that one
    /// load widens in lanes order ([`Weight::slot`]): 8 (no permutation), or
    /// 16 for bf16. Tiles start at a group's first column.
    const GROUP: usize = 8;

    /// Where column `c` of a row is stored, from the start of its group of
    /// [`Weight::GROUP`] columns.
    #[inline(always)]
    fn slot(c: usize) -> usize {
        c
    }

    fn to_f32(self) -> f32;
}

impl Weight for f32 {
    const DTYPE: Dtype = Dtype::F32;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Weight for half::bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    const GROUP: usize = 16;

    /// Columns 4-7 and 8-11 of each 16 swap places, so that AVX2's one
    /// 32-byte load unpacked against zero word by word (within each 128-bit
    /// half: words 0-3 and 8-11, then 4-7 and 12-15) gives columns 0-7 and
    /// 8-15, each value already in the top half of its lane: two in-lane
    /// shuffles for 16 values. AVX-512 reads the same layout with one
    /// word permute (`avx512.rs`), so one packed layout serves every set.
    #[inline(always)]
    fn slot(c: usize) -> usize {
        let i = c % 16;
        c - i
            + match i / 4 {
                1 => i + 4,
                2 => i - 4,
                _ => i,
            }
    }

    /// The top half of an f32's bits: widening is a shift.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Weight for i8 {
    const DTYPE: Dtype = Dtype::Int8;

    /// The integer itself; the column's scale is applied after the sum.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}
