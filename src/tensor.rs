//! The two forms a loaded weight takes: a [`Tensor`] (f32 values this
//! process owns, copied from the file) and a [`Packed`] matrix (a view of
//! the one anonymous map that holds every linear layer's column panels).
//! The layers hold these; the loader ([`crate::weights`]) makes them. Neither
//! refers to the checkpoint file: once loaded, nothing reads it again.

use std::sync::Arc;

use gpt2_kernels::{packed_bytes, Dtype, Panels};
use memmap2::Mmap;

/// An f32 tensor read into memory, row-major. Cloning shares the values.
#[derive(Clone)]
pub struct Tensor {
    values: Arc<Vec<f32>>,
    shape: Vec<usize>,
    /// Canonical name (without `transformer.`).
    name: String,
}

impl Tensor {
    /// `values` (row-major, as many as `shape` holds) named `name`.
    pub(crate) fn new(name: String, shape: Vec<usize>, values: Vec<f32>) -> Self {
        debug_assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
        Tensor {
            values: Arc::new(values),
            shape,
            name,
        }
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.values
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The canonical name, e.g. `h.0.attn.c_attn.bias`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the values are still in the file: never. A `Tensor` owns its
    /// values (the loader's places in the file are another type, dropped
    /// with the file at the end of the load); callers may assert it.
    pub fn in_file(&self) -> bool {
        false
    }
}

/// A `[K, N]` weight packed in column panels for
/// [`gpt2_kernels::linear_panels`], in the run's [`Dtype`]:
/// `gpt2_kernels::packed_bytes(dtype, K, N)` bytes of the one read-only
/// anonymous map that holds every layer's panels. Cloning shares them.
#[derive(Clone)]
pub struct Packed {
    map: Arc<Mmap>,
    /// Where the panels start in `map`, in bytes.
    start: usize,
    dtype: Dtype,
    k: usize,
    n: usize,
}

impl Packed {
    /// The `[k, n]` panels at byte `start` of `map`, packed in `dtype`.
    pub(crate) fn new(map: Arc<Mmap>, start: usize, dtype: Dtype, k: usize, n: usize) -> Self {
        Packed {
            map,
            start,
            dtype,
            k,
            n,
        }
    }

    /// The panels, as the kernels read them.
    pub fn panels(&self) -> Panels<'_> {
        let bytes = &self.map[self.start..self.start + packed_bytes(self.dtype, self.k, self.n)];
        Panels::from_bytes(self.dtype, bytes, self.k, self.n)
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// `(K, N)`: rows and columns of the matrix the panels hold.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}
