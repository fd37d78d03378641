//! The f32 products held to their naive twins ([`reference`]) on odd
//! shapes, on every kernel set this CPU runs: the stored and packed layouts,
//! the panel packing, `matmul_bt`, and the rule that a row's result never
//! depends on its batch or on the pool.

mod common;

use common::{assert_close, values, ROWS};
use gpt2_kernels::{
    pack_panels, pack_panels_t, packed_len, reference, unpack_column, KernelSet, Kernels, PANEL,
};

/// The kernels' tests run on every kernel set this CPU supports; this one
/// says which were left out, and fails if `GPT2_REQUIRE_KERNELS` (a
/// comma-separated list, as `kernels/run_avx512_check.sh` sets it) names
/// one that this CPU cannot run, so a check meant for AVX-512 cannot pass
/// without running it.
#[test]
fn every_kernel_set_is_tested_or_named_as_not() {
    let supported = KernelSet::supported();
    assert!(supported.contains(&KernelSet::Portable));
    for set in KernelSet::ALL {
        if !supported.contains(&set) {
            eprintln!(
                "NOTICE: kernel set {set} NOT TESTED: this CPU lacks {}",
                set.missing_features().join(", ")
            );
        }
    }
    if let Ok(required) = std::env::var("GPT2_REQUIRE_KERNELS") {
        for name in required.split(',').filter(|s| !s.trim().is_empty()) {
            let set: KernelSet = name
                .parse()
                .unwrap_or_else(|e| panic!("GPT2_REQUIRE_KERNELS: {e}"));
            assert!(
                supported.contains(&set),
                "GPT2_REQUIRE_KERNELS names {set}, which this CPU cannot run: {}",
                Kernels::new(set).unwrap_err()
            );
        }
    }
}

#[test]
fn linear_matches_naive_on_odd_shapes() {
    for ks in Kernels::supported() {
        for &m in &ROWS {
            for &(k, n) in &[
                (1, 1),
                (7, 3),
                (64, 32),
                (65, 33),
                (33, 100),
                (96, 257),
                (200, 70),
                (301, 129),
            ] {
                let (x, w, b) = (values(m * k, 1), values(k * n, 2), values(n, 3));
                let (mut got, mut want) = (vec![f32::NAN; m * n], vec![0.0; m * n]);
                ks.linear(&mut got, &x, &w, &b, m, k, n);
                reference::linear(&mut want, &x, &w, &b, m, k, n);
                assert_close(
                    &format!("{ks}: linear m={m} k={k} n={n}"),
                    &got,
                    &want,
                    1e-5,
                    1e-5,
                );
            }
        }
    }
}

/// The packed layout changes where the weights are read from, never the
/// order of the sums: its results equal the stored layout's bit for bit
/// (so also the naive twin's, within the tolerance above).
#[test]
fn linear_packed_equals_linear_exactly() {
    for ks in Kernels::supported() {
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        for &m in &ROWS {
            for &(k, n) in &[
                (1, 1),
                (7, 3),
                (65, 33),
                (33, 100),
                (200, 70),
                (301, 129),
                (768, 96),
                // Several whole panels per task, odd and even counts, and a
                // partial one: one row reads two panels at a time.
                (24, 336),
                (40, 500),
            ] {
                let (x, w, b) = (values(m * k, 13), values(k * n, 14), values(n, 15));
                let mut packed = vec![f32::NAN; packed_len(k, n)];
                pack_panels(&mut packed, &w, k, n);
                let (mut got, mut want) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                ks.linear(&mut want, &x, &w, &b, m, k, n);
                ks.linear_packed(&mut got, &x, &packed, Some(&b), m, k, n);
                assert_eq!(got, want, "{ks}: linear_packed m={m} k={k} n={n}");
                three.install(|| ks.linear_packed(&mut got, &x, &packed, Some(&b), m, k, n));
                assert_eq!(got, want, "{ks}: linear_packed m={m} k={k} n={n} on 3 threads");
                one.install(|| ks.linear_packed(&mut got, &x, &packed, Some(&b), m, k, n));
                assert_eq!(got, want, "{ks}: linear_packed m={m} k={k} n={n} on 1 thread");
            }
        }
    }
}

#[test]
fn pack_panels_t_packs_the_transpose() {
    for &(k, n) in &[(1, 1), (3, 50), (65, 97)] {
        let w = values(k * n, 17);
        let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect(); // [N, K]
        let (mut a, mut b) = (vec![f32::NAN; packed_len(k, n)], vec![1.0; packed_len(k, n)]);
        pack_panels(&mut a, &w, k, n);
        pack_panels_t(&mut b, &wt, k, n);
        assert_eq!(a, b, "k={k} n={n}");
        for j in 0..n {
            let mut row = vec![f32::NAN; k];
            unpack_column(&mut row, &b, k, j);
            assert_eq!(row, wt[j * k..(j + 1) * k], "row {j} of wt");
        }
    }
}

#[test]
fn pack_panels_places_every_weight_and_pads_with_zeros() {
    let (k, n) = (3, 50); // two panels, the second 2 columns wide
    let w = values(k * n, 16);
    let mut packed = vec![f32::NAN; packed_len(k, n)];
    pack_panels(&mut packed, &w, k, n);
    assert_eq!(packed.len(), 2 * k * PANEL);
    for kk in 0..k {
        for j in 0..2 * PANEL {
            let at = (j / PANEL * k + kk) * PANEL + j % PANEL;
            let want = if j < n { w[kk * n + j] } else { 0.0 };
            assert_eq!(packed[at], want, "k={kk} j={j}");
        }
    }
}

#[test]
fn matmul_bt_matches_naive_on_odd_shapes() {
    for ks in Kernels::supported() {
        for &m in &ROWS {
            for &(k, n) in &[(1, 1), (7, 3), (64, 32), (65, 33), (33, 100), (96, 257)] {
                let (x, w) = (values(m * k, 4), values(n * k, 5));
                let (mut got, mut want) = (vec![f32::NAN; m * n], vec![0.0; m * n]);
                ks.matmul_bt(&mut got, &x, &w, m, k, n);
                reference::matmul_bt(&mut want, &x, &w, m, k, n);
                assert_close(
                    &format!("{ks}: matmul_bt m={m} k={k} n={n}"),
                    &got,
                    &want,
                    1e-5,
                    1e-5,
                );
            }
        }
    }
}

/// Each row's result is bit-for-bit the same whatever else is in the
/// batch and whatever the pool size: what makes batched generation
/// reproduce single-request generation exactly.
#[test]
fn results_do_not_depend_on_batch_or_threads() {
    for ks in Kernels::supported() {
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for &(k, n) in &[(65, 33), (301, 129), (768, 200)] {
            let m = 40;
            let (x, w, b) = (values(m * k, 9), values(k * n, 10), values(n, 11));
            let mut all = vec![0.0; m * n];
            ks.linear(&mut all, &x, &w, &b, m, k, n);
            let mut all_bt = vec![0.0; m * n];
            let wt = values(n * k, 12);
            ks.matmul_bt(&mut all_bt, &x, &wt, m, k, n);
            for (rows, pool) in [(1, &one), (2, &three), (7, &one), (17, &three)] {
                for r0 in (0..m - rows).step_by(11) {
                    let xs = &x[r0 * k..(r0 + rows) * k];
                    let mut got = vec![0.0; rows * n];
                    pool.install(|| ks.linear(&mut got, xs, &w, &b, rows, k, n));
                    assert_eq!(
                        got,
                        all[r0 * n..(r0 + rows) * n],
                        "{ks}: linear k={k} n={n} rows {r0}+{rows}"
                    );
                    pool.install(|| ks.matmul_bt(&mut got, xs, &wt, rows, k, n));
                    assert_eq!(
                        got,
                        all_bt[r0 * n..(r0 + rows) * n],
                        "{ks}: matmul_bt k={k} n={n} rows {r0}+{rows}"
                    );
                }
            }
        }
    }
}

#[test]
fn linear_runs_inside_a_one_thread_pool() {
    for ks in Kernels::supported() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let (m, k, n) = (20, 65, 70);
        let (x, w, b) = (values(m * k, 6), values(k * n, 7), values(n, 8));
        let (mut got, mut want) = (vec![0.0; m * n], vec![0.0; m * n]);
        pool.install(|| ks.linear(&mut got, &x, &w, &b, m, k, n));
        reference::linear(&mut want, &x, &w, &b, m, k, n);
        assert_close(
            &format!("{ks}: linear in a 1-thread pool"),
            &got,
            &want,
            1e-5,
            1e-5,
        );
    }
}
