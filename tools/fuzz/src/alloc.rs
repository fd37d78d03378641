//! The fuzzer's allocator: refuses any single allocation over [`ALLOC_CAP`],
//! so that trusting a size written in a header fails fast ("memory allocation
//! of N bytes failed", or an error from a fallible reservation) instead of
//! swapping; the micro checkpoint needs kilobytes. It also records the
//! largest single request, which the tests bound.
//!
//! A library cannot install a global allocator for its users, so each
//! program that wants it (the `fuzz_loader` binary, `tests/loader_fuzz.rs`)
//! installs it itself:
//!
//! ```
//! #[global_allocator]
//! static ALLOC: gpt2_fuzz::CappedAlloc = gpt2_fuzz::CappedAlloc;
//! # fn main() {
//! assert!(Vec::<u8>::new().try_reserve(gpt2_fuzz::ALLOC_CAP + 1).is_err());
//! # }
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The largest single allocation [`CappedAlloc`] grants: 1 GiB.
pub const ALLOC_CAP: usize = 1 << 30;

/// The largest single allocation asked for so far, granted or not (stays 0
/// unless [`CappedAlloc`] is the global allocator).
pub static LARGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, refusing single allocations over [`ALLOC_CAP`].
pub struct CappedAlloc;

fn admit(size: usize) -> bool {
    LARGEST_ALLOC.fetch_max(size, Ordering::Relaxed);
    size <= ALLOC_CAP
}

// SAFETY: every call is forwarded unchanged to `System`, or refused with null,
// which the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if admit(layout.size()) {
            System.alloc(layout)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if admit(layout.size()) {
            System.alloc_zeroed(layout)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if admit(new_size) {
            System.realloc(ptr, layout, new_size)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_over_the_cap_and_records_the_request() {
        let too_big = Layout::from_size_align(ALLOC_CAP + 1, 8).unwrap();
        // SAFETY: a refused allocation returns null and needs no dealloc.
        let ptr = unsafe { CappedAlloc.alloc(too_big) };
        assert!(ptr.is_null());
        assert!(LARGEST_ALLOC.load(Ordering::Relaxed) > ALLOC_CAP);
        let small = Layout::from_size_align(64, 8).unwrap();
        // SAFETY: a granted pointer is freed with the layout it was given.
        unsafe {
            let ptr = CappedAlloc.alloc(small);
            assert!(!ptr.is_null());
            CappedAlloc.dealloc(ptr, small);
        }
    }
}
