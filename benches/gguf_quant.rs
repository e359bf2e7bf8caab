//! Quantization and dequantization throughput of the GGML block formats on one 4096 x 14336 matrix
//! slice (256 rows, so a run stays short; throughput per element is what matters).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use diffulex_edge::formats::ggml::any as ggml_any;
use diffulex_edge::formats::ggml::block::{GgmlType, QuantMode};
use diffulex_edge::simd::KernelLevel;

fn data(rows: usize, cols: usize) -> Vec<f32> {
    // deterministic pseudo-Gaussian (sum of uniforms), no rand dependency
    let mut s = 0x9e3779b97f4a7c15u64;
    (0..rows * cols)
        .map(|_| {
            let mut acc = 0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            acc
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let (rows, cols) = (256, 14336);
    let x = data(rows, cols);
    let level = KernelLevel::detect();
    let mut g = c.benchmark_group("ggml_quantize");
    g.throughput(Throughput::Elements((rows * cols) as u64));
    g.sample_size(10);
    for &t in GgmlType::ALL {
        g.bench_function(format!("{}/search", t.name()), |b| {
            b.iter(|| ggml_any::quantize(t, &x, rows, cols, None, QuantMode::Search, level).unwrap())
        });
        if t.has_rtn() {
            g.bench_function(format!("{}/rtn", t.name()), |b| {
                b.iter(|| ggml_any::quantize(t, &x, rows, cols, None, QuantMode::Rtn, level).unwrap())
            });
        }
    }
    g.finish();

    // The round-to-nearest (gguf-py-identical) quantizers on the whole 4096 x 14336 matrix (235 MB
    // of f32: does not fit in any cache, as in a real export), SIMD kernels vs the scalar level.
    // benchmarks/bench_gguf.py measures the same against gguf-py.
    let (rows, cols) = (4096, 14336);
    let x = data(rows, cols);
    let mut g = c.benchmark_group("ggml_quantize_rtn_4096x14336");
    g.throughput(Throughput::Elements((rows * cols) as u64));
    g.sample_size(10);
    for t in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1] {
        for lv in [level, KernelLevel::Scalar] {
            g.bench_function(format!("{}/{}", t.name(), lv.name()), |b| {
                b.iter(|| ggml_any::quantize(t, &x, rows, cols, None, QuantMode::Rtn, lv).unwrap())
            });
        }
    }
    g.finish();
    drop(x);
    let (rows, cols) = (256, 14336);
    let x = data(rows, cols);
    let mut g = c.benchmark_group("ggml_dequantize");
    g.throughput(Throughput::Elements((rows * cols) as u64));
    g.sample_size(10);
    for &t in GgmlType::ALL {
        let q = ggml_any::quantize(t, &x, rows, cols, None, QuantMode::Search, level).unwrap();
        let mut out = vec![0f32; rows * cols];
        g.bench_function(t.name(), |b| b.iter(|| ggml_any::dequantize_into(t, &q, &mut out, level).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
