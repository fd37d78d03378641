//! The instruction-set seam: one module per instruction set, each an [`Isa`]
//! (its f32 [`Vector`], how each weight format widens into one, its scalar
//! fused multiply-add, its four-way int8 dot product): what the engine's
//! kernels need, no more. The loop bodies are written once over any of
//! them, beside the kernels they serve (`matmul/bodies.rs` and
//! `matmul/int8.rs` for the linear layers, `attention.rs` for its dot
//! products). The bench baselines that need per-set code of their own keep
//! it outside the seam (`matmul/baselines/`).
//!
//! | set | module | vector | registers | int8 dot product |
//! |---|---|---|---|---|
//! | portable | `portable.rs` | `[f32; 8]`, plain Rust (LLVM vectorises) | what the target has | one product at a time |
//! | avx2 | `avx2.rs` | `__m256`, AVX2 + FMA | 16 | `vpmaddubsw` sign trick; AVX-VNNI `vpdpbusd` in `entry_vnni` |
//! | avx512 | `avx512.rs` | `__m512`, AVX-512 F/BW/DQ/VL | 32 | masked sign trick; AVX512-VNNI `vpdpbusd` in `entry_vnni` |
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

pub(crate) mod portable;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

use crate::Dtype;

/// Bytes in a cache line: the unit of the tiles' prefetch.
pub(crate) const LINE: usize = 64;

/// The fewest f32 lanes of any set's [`Vector`] (portable and AVX2 have 8,
/// AVX-512 16): what arrays of vectors sized at compile time are sized for.
pub(crate) const MIN_LANES: usize = 8;

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
    /// A multiple of [`MIN_LANES`].
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
    unsafe fn widen<E: Widen>(row: *const E, v: usize) -> Self::V;

    /// `LANES` i32 sums: the accumulators of the int8 products.
    type Sums: Copy;

    /// `4·LANES` int8 values: four consecutive k of each of `LANES` columns
    /// (the int8 panel layout), or four activations repeated.
    type Quads: Copy;

    /// What [`Isa::dot4`] adds to each weight before multiplying: 0 where
    /// the products are signed by signed, 128 where the instruction wants
    /// one side unsigned (VNNI's `vpdpbusd`). A row's lanes then hold
    /// `Σ (w + OFFSET)·x`, and the exact sum is that less
    /// `OFFSET · Σ x` ([`crate::matmul`]'s int8 epilogue subtracts it).
    const OFFSET: i32;

    /// Zero in every lane.
    ///
    /// # Safety
    /// The CPU has the set.
    unsafe fn sums_zero() -> Self::Sums;

    /// Zero in every byte.
    ///
    /// # Safety
    /// The CPU has the set.
    unsafe fn quads_zero() -> Self::Quads;

    /// # Safety
    /// The CPU has the set; `p` valid for `LANES` i32.
    unsafe fn sums_load(p: *const i32) -> Self::Sums;

    /// # Safety
    /// The CPU has the set; `p` valid for `LANES` i32.
    unsafe fn sums_store(s: Self::Sums, p: *mut i32);

    /// `4·LANES` weights from `p`, as [`Isa::dot4`] takes them (with
    /// [`Isa::OFFSET`] added where the set needs it).
    ///
    /// # Safety
    /// The CPU has the set; `p` valid for `4·LANES` bytes.
    unsafe fn weights4(p: *const i8) -> Self::Quads;

    /// The four activations at `p` in every lane.
    ///
    /// # Safety
    /// The CPU has the set; `p` valid for 4 bytes.
    unsafe fn splat4(p: *const i8) -> Self::Quads;

    /// `acc + Σ_{i<4} w[4l+i] · x[i]` in each lane l, exact in i32 (`w` from
    /// [`Isa::weights4`], so offset by [`Isa::OFFSET`]; every |x| ≤ 127).
    ///
    /// # Safety
    /// The CPU has the set.
    unsafe fn dot4(acc: Self::Sums, w: Self::Quads, x: Self::Quads) -> Self::Sums;
}

/// A value of a packed weight format, and where the panels keep it.
pub(crate) trait Weight: Copy + Send + Sync + 'static {
    /// Which format this is: each set's `widen` branches on it (a constant).
    const DTYPE: Dtype;

    /// Columns in a group whose order in memory is permuted so that one
    /// load widens in lanes order ([`Weight::slot`]): 8 (no permutation), or
    /// 16 for bf16. Tiles start at a group's first column.
    const GROUP: usize = 8;

    /// Weight rows stored together, column by column (int8 keeps four
    /// consecutive k of a column in one 32-bit lane, the operand of an
    /// integer dot product); a panel holds K rounded up to a multiple of
    /// them, the extra rows zero.
    const K_GROUP: usize = 1;

    /// Where column `c` of a row is stored, from the start of its group of
    /// [`Weight::GROUP`] columns.
    #[inline(always)]
    fn slot(c: usize) -> usize {
        c
    }

    fn to_f32(self) -> f32;
}

/// A format the float tiles widen to f32 as they load it (every bf16 is an
/// f32), so it changes what is loaded, never the order of the sums.
pub(crate) trait Widen: Weight {}

impl Weight for f32 {
    const DTYPE: Dtype = Dtype::F32;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Widen for f32 {}

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

impl Widen for half::bf16 {}

impl Weight for i8 {
    const DTYPE: Dtype = Dtype::Int8;
    const K_GROUP: usize = 4;

    /// The integer itself; the column's scale is applied after the sum.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}
