//! Row-wise and element-wise kernels: layer norm, GELU, residual add.
//! Written for LLVM's vectoriser (lane arrays, branch-free math), each
//! compiled for every kernel set; none fuses a multiply-add, so every set
//! gives the same bits.

use rayon::prelude::*;

use crate::arch::{Isa, Kernel};
use crate::{active, Kernels};

/// Elements per rayon task for element-wise work; below one such chunk a call
/// runs on the calling thread, where thread wake-up would cost more than it saves.
const PAR_CHUNK: usize = 16 * 1024;

/// `out[M,C] = (x - mean) / sqrt(var + eps) * gamma + beta`, for each row of
/// `x[M,C]`, with `C = gamma.len()`. Mean and (biased) variance are computed
/// in two passes, as PyTorch does. Overwrites `out`. On the
/// [`active`] kernel set.
pub fn layernorm(out: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    active().layernorm(out, x, gamma, beta, eps)
}

/// GPT-2's tanh approximation of GELU ("gelu_new"), in place:
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
/// Not the erf form: the two differ by up to ~1e-3, which the reference tests see.
/// On the [`active`] kernel set.
pub fn gelu_inplace(x: &mut [f32]) {
    active().gelu_inplace(x)
}

/// `acc += x`, element-wise (the residual connections). On the
/// [`active`] kernel set.
pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    active().add_assign(acc, x)
}

impl Kernels {
    /// [`layernorm`] on this kernel set.
    pub fn layernorm(self, out: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let c = gamma.len();
        assert_eq!(beta.len(), c, "layernorm: beta is not [C={c}]");
        assert_eq!(out.len(), x.len(), "layernorm: out and x differ in length");
        assert_eq!(x.len() % c, 0, "layernorm: x is not [M, C={c}]");
        // SAFETY (both): LayerNorm reads and writes only through its slices.
        let row = |(out, x): (&mut [f32], &[f32])| unsafe {
            self.run(LayerNorm {
                out,
                x,
                gamma,
                beta,
                eps,
            })
        };
        // A prompt's rows are independent: split them over the pool when there
        // are enough (one decode row stays on this thread).
        if x.len() <= PAR_CHUNK {
            unsafe {
                self.run(LayerNorm {
                    out,
                    x,
                    gamma,
                    beta,
                    eps,
                })
            };
        } else {
            out.par_chunks_exact_mut(c)
                .zip(x.par_chunks_exact(c))
                .for_each(row);
        }
    }

    /// [`gelu_inplace`] on this kernel set.
    pub fn gelu_inplace(self, x: &mut [f32]) {
        // SAFETY (both): Gelu touches only its slice.
        if x.len() <= PAR_CHUNK {
            unsafe { self.run(Gelu(x)) };
        } else {
            x.par_chunks_mut(PAR_CHUNK)
                .for_each(|c| unsafe { self.run(Gelu(c)) });
        }
    }

    /// [`add_assign`] on this kernel set.
    pub fn add_assign(self, acc: &mut [f32], x: &[f32]) {
        assert_eq!(acc.len(), x.len(), "add_assign: lengths differ");
        // SAFETY: AddAssign touches only its slices.
        unsafe { self.run(AddAssign(acc, x)) }
    }
}

/// Layer norm of the rows of `x[.., C]` into `out`, `C = gamma.len()`.
struct LayerNorm<'a> {
    out: &'a mut [f32],
    x: &'a [f32],
    gamma: &'a [f32],
    beta: &'a [f32],
    eps: f32,
}

impl Kernel for LayerNorm<'_> {
    type Out = ();

    #[inline(always)]
    unsafe fn run<I: Isa>(self) {
        let LayerNorm {
            out,
            x,
            gamma,
            beta,
            eps,
        } = self;
        let c = gamma.len();
        for (o, xr) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            let mean = lane_sum(xr, |v| v) / c as f32;
            let var = lane_sum(xr, |v| (v - mean) * (v - mean)) / c as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((o, &v), &g), &b) in o.iter_mut().zip(xr).zip(gamma).zip(beta) {
                *o = (v - mean) * rstd * g + b;
            }
        }
    }
}

/// [`gelu_inplace`] over one slice.
struct Gelu<'a>(&'a mut [f32]);

impl Kernel for Gelu<'_> {
    type Out = ();

    #[inline(always)]
    unsafe fn run<I: Isa>(self) {
        const S: f32 = 0.797_884_6; // sqrt(2 / pi)
        for v in self.0.iter_mut() {
            let u = *v;
            *v = 0.5 * u * (1.0 + tanh(S * (u + 0.044_715 * u * u * u)));
        }
    }
}

/// [`add_assign`]'s body.
struct AddAssign<'a>(&'a mut [f32], &'a [f32]);

impl Kernel for AddAssign<'_> {
    type Out = ();

    #[inline(always)]
    unsafe fn run<I: Isa>(self) {
        for (a, &v) in self.0.iter_mut().zip(self.1) {
            *a += v;
        }
    }
}

/// `sum(f(v) for v in x)` in `LANES` partial sums, then the lanes in order:
/// a single running sum cannot be vectorised (each add waits for the last).
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for ch in chunks {
        for (a, &v) in acc.iter_mut().zip(ch) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `tanh` as a rational function (Eigen's float approximation: odd degree-13
/// numerator over even degree-6 denominator, a few ulp from the true value),
/// branch-free so that a loop over it vectorises, which libm's call per
/// value does not.
#[inline(always)]
fn tanh(x: f32) -> f32 {
    // Beyond +-7.9, tanh is +-1 in f32; the polynomial is fitted up to there.
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let mut p = x2 * -2.760_768_5e-16 + 2.000_188e-13;
    p = p * x2 + -8.604_672e-11;
    p = p * x2 + 5.122_297e-8;
    p = p * x2 + 1.485_722_4e-5;
    p = p * x2 + 6.372_619_3e-4;
    p = p * x2 + 4.893_524_6e-3;
    p *= x;
    let mut q = x2 * 1.198_258_4e-6 + 1.185_347_1e-4;
    q = q * x2 + 2.268_434_6e-3;
    q = q * x2 + 4.893_525e-3;
    p / q
}
