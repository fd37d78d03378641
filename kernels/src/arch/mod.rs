//! The instruction-set seam: the innermost loops of the kernels, one module
//! per instruction set. Every module provides the same five functions, with
//! the same contracts and the same roundings:
//!
//! | function | computes | called from |
//! |---|---|---|
//! | [`tile`] | `out[R, W] += x[R, ks] · w[ks, W]`, broadcast and multiply-add | `matmul::tiles` |
//! | [`tile_pair`] | the same for one row over two 48-wide panels read side by side | `matmul::tiles` |
//! | [`bt_lanes`] | `R x C` dot products, each in 8 lanes | `matmul::baselines` (`matmul_bt`) |
//! | [`dot_lanes`] | `J` dot products in 8 lanes, each reduced to one sum | `attention` |
//! | [`dot_i8`] | `J` int8 dot products, exact in i32 | `matmul::baselines` (`linear_int8_dot`) |
//!
//! - `avx2.rs`: x86-64 with AVX2 and FMA (sixteen 256-bit registers).
//! - `portable.rs`: plain Rust with [`fmadd`], the same sums in the same order;
//!   what any other CPU builds.
//!
//! Selection is at compile time, here and nowhere else (`target_feature`, set
//! by `-C target-cpu=native` in `.cargo/config.toml`); the rest of the crate
//! calls `arch::tile` and the others without a `cfg`. The tile driver
//! (`matmul/tiles.rs`: shapes, blocks, read order, prefetch) is written once
//! above this seam.
//!
//! Where the next pieces plug in:
//! - Another instruction set (AVX-512, issue 22): a module beside these with
//!   the same four functions, selected below. Run-time selection replaces the
//!   `pub(crate) use` lines with one choice made at start
//!   (`is_x86_feature_detected!`): an enum or a table of function pointers
//!   that the driver is instantiated over. The tile shapes in `tiles.rs`
//!   assume AVX2's 16 registers of 8 lanes; that is the part to make generic
//!   over vector width.
//! - Another weight dtype: a [`Weight`] impl here (its scalar widening to
//!   f32) and a `Lanes` impl in each module (8 values loaded and widened to
//!   one f32 vector); the tile bodies are generic over it, so f32, bf16 and
//!   int8 panels run through the same sums. Its packer goes beside
//!   `pack_panels` in `matmul/pack.rs`.
//!
//! Any body must give each output the roundings of the portable one: the
//! tests hold the kernels built on them to the stored-layout kernel bit for
//! bit, across row counts and thread counts.

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod avx2;
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
pub(crate) use avx2::{bt_lanes, dot_i8, dot_lanes, tile, tile_pair, Lanes};

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
mod portable;
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
pub(crate) use portable::{bt_lanes, dot_i8, dot_lanes, tile, tile_pair, Lanes};

/// Bytes in a cache line: the unit of [`tile`]'s prefetch.
pub(crate) const LINE: usize = 64;

/// A value of a packed weight format, widened to f32 exactly (every bf16 and
/// every int8 is an f32). The tiles multiply by the widened value, so a
/// format changes what is loaded, never the order of the sums.
pub(crate) trait Weight: Copy + Send + Sync + 'static {
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
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Weight for half::bf16 {
    const GROUP: usize = 16;

    /// Columns 4-7 and 8-11 of each 16 swap places, so that one 32-byte
    /// load unpacked against zero word by word (within each 128-bit half:
    /// words 0-3 and 8-11, then 4-7 and 12-15) gives columns 0-7 and 8-15,
    /// each value already in the top half of its lane: two in-lane shuffles
    /// for 16 values, where zero-extending and shifting costs four.
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
    /// The integer itself; the column's scale is applied after the sum.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}

/// `a * b + c`, as one fused instruction where the CPU has FMA (compiled with
/// `target-cpu=native`); plain multiply-add otherwise, since a software `fma`
/// call would be far slower than the rounding difference is worth.
#[inline(always)]
pub(crate) fn fmadd(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}
