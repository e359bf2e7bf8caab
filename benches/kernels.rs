//! Criterion benches for the quantized linear kernels and the quantizers, each next to a baseline
//! measured in the same run (f32 weights through the same driver; a plain copy of the same bytes).
//! `cargo bench --bench kernels` (set RAYON_NUM_THREADS to pin the thread count).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use diffulex_edge::formats::int4::{self, Int4Layout};
use diffulex_edge::formats::int8;
use diffulex_edge::kernels::linear::{linear, F32Weights, Int4Weights, Int8Weights};
use diffulex_edge::kernels::w8a8::{linear_w8a8, quantize_activations};
use diffulex_edge::simd::KernelLevel;

fn data(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn linear_benches(c: &mut Criterion) {
    let (n, k) = (4096, 4096);
    let level = KernelLevel::detect();
    let wf = data(n * k, 1);
    let q8 = int8::quantize(&wf, n, k, true, level).unwrap();
    let layout = Int4Layout::new(n, k, 32).unwrap();
    let q4 = int4::quantize(&wf, layout, false, level).unwrap();
    let layout128 = Int4Layout::new(n, k, 128).unwrap();
    let q4b = int4::quantize(&wf, layout128, false, level).unwrap();
    let w8 = Int8Weights::new(&q8.q, &q8.scales, &q8.zero_points, k).unwrap();
    let w4 = Int4Weights::new(layout, &q4.packed, &q4.scales, &q4.zeros).unwrap();
    let w4b = Int4Weights::new(layout128, &q4b.packed, &q4b.scales, &q4b.zeros).unwrap();
    let wff = F32Weights::new(&wf, n, k).unwrap();
    for m in [1usize, 64] {
        let mut g = c.benchmark_group(format!("linear_{n}x{k}_m{m}"));
        g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        let x = data(m * k, 2);
        let mut out = vec![0f32; m * n];
        g.bench_function("f32_weights", |b| b.iter(|| linear(black_box(&x), m, &wff, None, &mut out, level).unwrap()));
        g.bench_function("int8", |b| b.iter(|| linear(black_box(&x), m, &w8, None, &mut out, level).unwrap()));
        g.bench_function("int4_g32", |b| b.iter(|| linear(black_box(&x), m, &w4, None, &mut out, level).unwrap()));
        g.bench_function("int4_g128", |b| b.iter(|| linear(black_box(&x), m, &w4b, None, &mut out, level).unwrap()));
        let mut xq = vec![0i8; m * k];
        let mut xs = vec![0f32; m];
        for lv in KernelLevel::available().into_iter().filter(|l| *l != KernelLevel::Scalar) {
            g.bench_with_input(BenchmarkId::new("w8a8", lv.name()), &lv, |b, lv| {
                b.iter(|| {
                    quantize_activations(&x, m, k, None, &mut xq, &mut xs, *lv).unwrap();
                    linear_w8a8(&xq, &xs, &q8.q, &q8.scales, &q8.zero_points, k, None, &mut out, *lv).unwrap()
                })
            });
        }
        g.finish();
    }
}

/// The weight-only GEMV (batch 1 and 8) on the three Llama shapes, next to a copy of 64 MiB
/// (read + written bytes / time is the copy bandwidth the GEMV's weight bytes / time is compared to).
fn gemv_benches(c: &mut Criterion) {
    let level = KernelLevel::detect();
    let mut g = c.benchmark_group("gemv_copy");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let src = vec![1u8; 64 << 20];
    let mut dst = vec![0u8; 64 << 20];
    g.throughput(Throughput::Bytes(2 * src.len() as u64));
    g.bench_function("copy_64MiB", |b| b.iter(|| dst.copy_from_slice(black_box(&src))));
    g.finish();
    // (out n, in k): nn.Linear(4096, 4096), nn.Linear(4096, 14336), nn.Linear(14336, 4096)
    for (n, k) in [(4096usize, 4096usize), (14336, 4096), (4096, 14336)] {
        let wf = data(n * k, 1);
        let q8 = int8::quantize(&wf, n, k, true, level).unwrap();
        let w8 = Int8Weights::new(&q8.q, &q8.scales, &q8.zero_points, k).unwrap();
        let mut g = c.benchmark_group(format!("gemv_{k}x{n}"));
        g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        for m in [1usize, 8] {
            let x = data(m * k, 2);
            let mut out = vec![0f32; m * n];
            if m == 1 {
                g.throughput(Throughput::Bytes((n * k) as u64));
                g.bench_function("int8_m1", |b| {
                    b.iter(|| linear(black_box(&x), m, &w8, None, &mut out, level).unwrap())
                });
            }
            for group in [32, 128] {
                let layout = Int4Layout::new(n, k, group).unwrap();
                let q4 = int4::quantize(&wf, layout, false, level).unwrap();
                let w4 = Int4Weights::new(layout, &q4.packed, &q4.scales, &q4.zeros).unwrap();
                // weight bytes incl. scales and zero points, as bench_linear.py counts them
                g.throughput(Throughput::Bytes((q4.packed.len() + q4.scales.len() * 5) as u64));
                g.bench_function(format!("int4_g{group}_m{m}"), |b| {
                    b.iter(|| linear(black_box(&x), m, &w4, None, &mut out, level).unwrap())
                });
            }
        }
        g.finish();
    }
}

fn quantize_benches(c: &mut Criterion) {
    let (n, k) = (4096, 14336);
    let level = KernelLevel::detect();
    let w = data(n * k, 3);
    let mut g = c.benchmark_group(format!("quantize_{n}x{k}"));
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes((n * k * 4) as u64));
    let mut dst = vec![0f32; n * k];
    g.bench_function("copy_f32", |b| b.iter(|| dst.copy_from_slice(black_box(&w))));
    let (mut q, mut s, mut z) = (vec![0i8; n * k], vec![0f32; n], vec![0i8; n]);
    g.bench_function("int8_into", |b| {
        b.iter(|| int8::quantize_into(black_box(&w), n, k, true, level, &mut q, &mut s, &mut z).unwrap())
    });
    g.bench_function("int8_alloc", |b| b.iter(|| int8::quantize(black_box(&w), n, k, true, level).unwrap()));
    let layout = Int4Layout::new(n, k, 32).unwrap();
    let (mut p, mut s4, mut z4) = (vec![0u8; n * k / 2], vec![0f32; n * k / 32], vec![0u8; n * k / 32]);
    g.bench_function("int4_g32_into", |b| {
        b.iter(|| int4::quantize_into(black_box(&w), layout, false, level, &mut p, &mut s4, &mut z4).unwrap())
    });
    g.finish();
}

criterion_group!(benches, linear_benches, gemv_benches, quantize_benches);
criterion_main!(benches);
