//! Every kernel at GPT-2 124M shapes, printing achieved GB/s (weight-streaming
//! kernels) or GFLOP/s (SGEMM): the linear layers at 1-128 rows, the LM head,
//! then layer norm, GELU, the residual add, softmax and one head's attention
//! (in cache, each next to its naive twin). `cargo bench -p gpt2-kernels [-- FILTER]`;
//! `GPT2_KERNELS=avx512|avx2|portable` picks the kernel set (default: the best).
//! Medians over repetitions; the machine is shared, so compare ratios.

use std::hint::black_box;
use std::time::{Duration, Instant};

use gpt2_kernels as k;

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

/// Weights in huge pages, as the model's memory-mapped checkpoint is (the
/// page cache maps large files with huge pages here); a plain `Vec` would add
/// TLB misses the real engine does not have.
struct Weights(memmap2::MmapMut);

impl Weights {
    fn new(n: usize) -> Self {
        let mut map = memmap2::MmapMut::map_anon(n * 4).expect("anonymous map");
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        for (dst, v) in map.chunks_exact_mut(4).zip(values(n)) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        Weights(map)
    }

    fn get_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `get`, and the borrow is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() / 4) }
    }

    fn get(&self) -> &[f32] {
        // SAFETY: the map is page-aligned, its length a multiple of 4, and
        // every bit pattern is a valid f32.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() / 4) }
    }
}

/// Median wall time of `f` over enough repetitions to fill ~0.5 s.
fn median(mut f: impl FnMut()) -> Duration {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().max(Duration::from_micros(1));
    let reps = (Duration::from_millis(500).as_secs_f64() / once.as_secs_f64()).clamp(5.0, 2000.0) as usize;
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[reps / 2]
}

/// An in-place kernel over `n` floats against its naive twin; each timed call
/// first copies the input back in (counted in the time).
fn in_place(label: &str, n: usize, fast: impl Fn(&mut [f32]), naive: impl Fn(&mut [f32])) {
    let x = values(n);
    let mut y = x.clone();
    let mut time = |f: &dyn Fn(&mut [f32])| {
        median(|| {
            y.copy_from_slice(&x);
            f(black_box(&mut y))
        })
    };
    let (t, tn) = (time(&fast), time(&naive));
    println!(
        "{label:42} {:9.2} us {:7.1} GB/s   naive {:9.2} us (with a copy-in)",
        t.as_secs_f64() * 1e6,
        (2 * n * 4) as f64 / t.as_secs_f64() / 1e9,
        tn.as_secs_f64() * 1e6
    );
}

/// Relative L2 distance of `got` from `want`.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let e: f64 = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| ((a - b) as f64).powi(2))
        .sum();
    let r: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    (e / r).sqrt()
}

/// One result line: the median time, and the rate as GB/s of `bytes` (the
/// weights streamed) and GFLOP/s of `flops`.
fn report(label: &str, t: Duration, bytes: usize, flops: usize) {
    let s = t.as_secs_f64();
    println!(
        "{label:42} {:9.1} us {:7.1} GB/s {:7.1} GFLOP/s",
        s * 1e6,
        bytes as f64 / s / 1e9,
        flops as f64 / s / 1e9
    );
}

/// GPT-2 124M's channels and vocabulary.
const C: usize = 768;
const V: usize = 50257;

/// The row counts every product is timed at: decode, batched decode, a prompt.
const ROWS: [usize; 7] = [1, 2, 4, 8, 16, 32, 128];

fn main() {
    let filter = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let threads = rayon::current_num_threads();
    let kernels = match k::init(None) {
        Ok(set) => set,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "threads: {threads}, kernels: {kernels}, cpu: {}",
        k::CpuInfo::detect()
    );
    // The int8 activations' work space, allocated once as the engine does.
    let mut quant = k::QuantScratch::new(128, 4 * C);
    stream_read();
    for &(name, kk, n) in &[
        ("qkv", C, 3 * C),
        ("attn_proj", C, C),
        ("mlp_up", C, 4 * C),
        ("mlp_down", 4 * C, C),
    ] {
        let layer = Layer::new(kk, n);
        for m in ROWS {
            let label = format!("linear {name} M={m} K={kk} N={n}");
            if label.contains(&filter) {
                linear_rows(&label, &layer, m, &mut quant);
            }
        }
    }
    lm_head(&filter, &mut quant);
    row_kernels(&filter);
    attention_kernels(&filter);
}

/// The yardstick: a plain streaming read (dot products) of 1 GiB.
fn stream_read() {
    use rayon::prelude::*;
    let buf = Weights::new(256 << 20);
    let buf = buf.get();
    let ones = vec![1.0f32; 1 << 16];
    let t = median(|| {
        let s: f32 = buf
            .par_chunks(1 << 16)
            .map(|ch| k::dot(ch, &ones[..ch.len()]))
            .sum();
        black_box(s);
    });
    println!(
        "{:42} {:9.1} us {:7.1} GB/s",
        "stream read 1 GiB (all threads)",
        t.as_secs_f64() * 1e6,
        (buf.len() * 4) as f64 / t.as_secs_f64() / 1e9
    );
}

/// One linear layer's `w[K, N]` in every form the benches time, each in
/// enough copies to come from memory: the copies are used in turn.
struct Layer {
    k: usize,
    n: usize,
    /// The copies of each form: `copies` of the f32 ones.
    copies: usize,
    /// `copies` x `w[K, N]` as stored.
    stored: Weights,
    /// The same matrices packed in panels, as the engine holds them.
    packed: Weights,
    /// bf16 and int8 panels: the dtype, its copies, their bytes.
    reduced: Vec<(k::Dtype, usize, Weights)>,
    bias: Vec<f32>,
}

impl Layer {
    fn new(kk: usize, n: usize) -> Layer {
        // Enough copies of the matrix (1 GiB) to overflow the last-level
        // cache (480 MB on some Xeons), used in turn, so the weights stream
        // from memory as in a real forward pass.
        let copies = (1 << 30) / (kk * n * 4) + 1;
        let (stored, bias) = (Weights::new(copies * kk * n), values(n));
        let ws: Vec<&[f32]> = stored.get().chunks_exact(kk * n).collect();
        let mut packed = Weights::new(copies * k::packed_len(kk, n));
        for (dst, w) in packed.get_mut().chunks_exact_mut(k::packed_len(kk, n)).zip(&ws) {
            k::pack_panels(dst, w, kk, n);
        }
        // And in the reduced formats, converted from the f32 ones: as many
        // copies as fill the same bytes (so that they too come from memory,
        // past a last-level cache that may hold hundreds of MB), in huge
        // pages like the engine's.
        let reduced = [k::Dtype::Bf16, k::Dtype::Int8]
            .into_iter()
            .map(|d| {
                let bytes = k::packed_bytes(d, kk, n);
                let count = (copies * kk * n * 4).div_ceil(bytes);
                let mut buf = Weights::new(count * bytes / 4);
                for (i, dst) in bytemuck::cast_slice_mut::<f32, u8>(buf.get_mut())
                    .chunks_exact_mut(bytes)
                    .enumerate()
                {
                    k::pack(k::PanelsMut::from_bytes(d, dst, kk, n), ws[i % copies], kk, n);
                }
                (d, count, buf)
            })
            .collect();
        Layer {
            k: kk,
            n,
            copies,
            stored,
            packed,
            reduced,
            bias,
        }
    }
}

/// `layer` at `m` rows: as stored, packed in panels (the engine), in bf16
/// and int8 panels; int8's error at one row; `matrixmultiply` from 16 rows.
fn linear_rows(label: &str, layer: &Layer, m: usize, quant: &mut k::QuantScratch) {
    let (kk, n, copies, b) = (layer.k, layer.n, layer.copies, &layer.bias);
    let ws: Vec<&[f32]> = layer.stored.get().chunks_exact(kk * n).collect();
    let ps: Vec<&[f32]> = layer.packed.get().chunks_exact(k::packed_len(kk, n)).collect();
    let (x, mut out) = (values(m * kk), vec![0.0; m * n]);
    let mut i = 0;
    let t = median(|| {
        i = (i + 1) % copies;
        k::linear(black_box(&mut out), &x, ws[i], b, m, kk, n)
    });
    report(&format!("{label} (as stored)"), t, kk * n * 4, 2 * m * kk * n);
    let t = median(|| {
        i = (i + 1) % copies;
        k::linear_packed(black_box(&mut out), &x, ps[i], Some(b), m, kk, n)
    });
    report(
        &format!("  packed panels (engine) M={m}"),
        t,
        kk * n * 4,
        2 * m * kk * n,
    );
    for (d, count, buf) in &layer.reduced {
        let bytes = k::packed_bytes(*d, kk, n);
        let ps: Vec<k::Panels> = bytemuck::cast_slice::<f32, u8>(buf.get())
            .chunks_exact(bytes)
            .map(|b| k::Panels::from_bytes(*d, b, kk, n))
            .collect();
        let t = median(|| {
            i = (i + 1) % count;
            k::linear_panels_with(black_box(&mut out), &x, ps[i], Some(b), quant, m, kk, n)
        });
        report(
            &format!("  {d} panels M={m}"),
            t,
            d.weight_bytes(kk, n),
            2 * m * kk * n,
        );
    }
    if m == 1 {
        // How far int8 (activations quantised per row too) is from
        // f32 on this layer (no bias).
        let mut exact = vec![0.0; m * n];
        k::linear(&mut exact, &x, ws[0], &vec![0.0; n], m, kk, n);
        let (_, _, buf) = &layer.reduced[1];
        let packed = &bytemuck::cast_slice::<f32, u8>(buf.get())[..k::packed_bytes(k::Dtype::Int8, kk, n)];
        let p = k::Panels::from_bytes(k::Dtype::Int8, packed, kk, n);
        k::linear_panels(&mut out, &x, p, None, m, kk, n);
        println!("  int8 error vs f32: {:.3}%", rel_l2(&out, &exact) * 100.0);
    }
    if m >= 16 {
        // matrixmultiply's SGEMM on the same shape, for comparison.
        let t = median(|| {
            i = (i + 1) % copies;
            k::linear_sgemm(black_box(&mut out), &x, ws[i], b, m, kk, n)
        });
        let gflops = (2 * m * kk * n) as f64 / t.as_secs_f64() / 1e9;
        println!(
            "{:42} {:9.1} us {:>12} {gflops:7.1} GFLOP/s",
            format!("  matrixmultiply M={m}"),
            t.as_secs_f64() * 1e6,
            ""
        );
    }
}

/// The LM head: packed from wte's transpose, as the engine runs it, and
/// the dot-product form over wte as stored.
fn lm_head(filter: &str, quant: &mut k::QuantScratch) {
    let (c, v) = (C, V);
    let w = Weights::new(v * c);
    let w = w.get();
    let mut packed = Weights::new(k::packed_len(c, v));
    k::pack_panels_t(packed.get_mut(), w, c, v);
    let heads: Vec<(k::Dtype, Weights)> = [k::Dtype::Bf16, k::Dtype::Int8]
        .into_iter()
        .map(|d| {
            let mut buf = Weights::new(k::packed_bytes(d, c, v) / 4);
            let dst = k::PanelsMut::from_bytes(d, bytemuck::cast_slice_mut(buf.get_mut()), c, v);
            k::pack_t(dst, w, c, v, 0..v);
            (d, buf)
        })
        .collect();
    for m in ROWS {
        let label = format!("lm_head M={m} K={c} N={v}");
        if !label.contains(filter) {
            continue;
        }
        let (x, mut out) = (values(m * c), vec![0.0; m * v]);
        let t = median(|| k::linear_packed(black_box(&mut out), &x, packed.get(), None, m, c, v));
        report(&label, t, c * v * 4, 2 * m * c * v);
        for (d, buf) in &heads {
            let p = k::Panels::from_bytes(*d, bytemuck::cast_slice(buf.get()), c, v);
            let t = median(|| k::linear_panels_with(black_box(&mut out), &x, p, None, quant, m, c, v));
            report(
                &format!("  {d} panels M={m}"),
                t,
                d.weight_bytes(c, v),
                2 * m * c * v,
            );
        }
        let t = median(|| k::matmul_bt(black_box(&mut out), &x, w, m, c, v));
        report(
            &format!("  matmul_bt (wte as stored) M={m}"),
            t,
            c * v * 4,
            2 * m * c * v,
        );
    }
}

/// GB/s of `bytes` in `t`.
fn gb(t: Duration, bytes: usize) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

/// The small kernels of a forward pass over rows, at GPT-2's shapes: one
/// decode row and a 128-token prompt. GB/s counts the floats read and
/// written once (they are in cache: this is the in-cache rate, not DRAM);
/// the naive twin (`reference`, f64 sums, no lanes) for comparison.
fn row_kernels(filter: &str) {
    let c = C;
    for rows in [1, 128] {
        let label = format!("layernorm M={rows} C={c}");
        if label.contains(filter) {
            let (x, g, b) = (values(rows * c), values(c), values(c));
            let mut out = vec![0.0; rows * c];
            let t = median(|| k::layernorm(black_box(&mut out), &x, &g, &b, 1e-5));
            let naive = median(|| k::reference::layernorm(black_box(&mut out), &x, &g, &b, 1e-5));
            println!(
                "{label:42} {:9.2} us {:7.1} GB/s   naive {:9.2} us",
                t.as_secs_f64() * 1e6,
                gb(t, 2 * rows * c * 4),
                naive.as_secs_f64() * 1e6
            );
        }
        let label = format!("gelu M={rows} N={}", 4 * c);
        if label.contains(filter) {
            in_place(&label, rows * 4 * c, k::gelu_inplace, k::reference::gelu);
        }
        let label = format!("add_assign (residual) M={rows} C={c}");
        if label.contains(filter) {
            let (mut acc, x) = (values(rows * c), values(rows * c));
            let t = median(|| k::add_assign(black_box(&mut acc), &x));
            println!(
                "{label:42} {:9.2} us {:7.1} GB/s",
                t.as_secs_f64() * 1e6,
                gb(t, 3 * rows * c * 4)
            );
        }
    }
}

/// Softmax over t scores, and one query of one head (hd 64) over t cached
/// positions, the cache laid out as the engine keeps it (each head's
/// positions contiguous), each beside its naive twin.
fn attention_kernels(filter: &str) {
    for t_len in [64, 256, 1024] {
        let label = format!("softmax N={t_len}");
        if label.contains(filter) {
            in_place(&label, t_len, k::softmax_inplace, k::reference::softmax);
        }
        let label = format!("attention_head hd=64 t={t_len}");
        if label.contains(filter) {
            let hd = 64;
            let (q, kc, vc) = (values(hd), values(t_len * hd), values(t_len * hd));
            let (mut out, mut scores) = (vec![0.0; hd], vec![0.0; t_len]);
            let t = median(|| {
                k::attention_head(black_box(&mut out), &q, &kc, &vc, t_len, hd, &mut scores, 0.125)
            });
            let naive =
                median(|| k::reference::attention_head(black_box(&mut out), &q, &kc, &vc, t_len, hd, 0.125));
            println!(
                "{label:42} {:9.2} us {:7.1} GB/s {:7.1} GFLOP/s   {:.1} ns/key, naive {:9.2} us",
                t.as_secs_f64() * 1e6,
                gb(t, 2 * t_len * hd * 4),
                (4 * t_len * hd) as f64 / t.as_secs_f64() / 1e9,
                t.as_secs_f64() * 1e9 / t_len as f64,
                naive.as_secs_f64() * 1e6
            );
        }
    }
}
