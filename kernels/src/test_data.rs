//! Test inputs from the project's one RNG: `rand_xoshiro`'s xoshiro256**
//! seeded through splitmix64 (`seed_from_u64`), as the root crate's
//! `src/rng.rs`. Deterministic: a seed fixes the values on every machine.
//! The unit tests and the tests in `kernels/tests/` (which include this
//! file) draw from it alike.

use rand_xoshiro::rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256StarStar;

/// `n` values uniform in [-1, 1), fixed by `seed`: the top 24 bits of each
/// draw, so every value is exact in f32.
pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Xoshiro256StarStar::seed_from_u64(seed);
    (0..n)
        .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        .collect()
}
