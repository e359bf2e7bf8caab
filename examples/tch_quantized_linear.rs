//! Quantize a `tch::nn::Linear` to INT8, INT4 (group 32) and f16, then compare storage size,
//! weight error and output error with the f32 layer.
//!
//! Needs libtorch (tch 0.26 = PyTorch 2.13.0); `.ci/tch.sh` sets it up and runs:
//!     cargo run --release --features tch --example tch_quantized_linear [in_features] [out_features]

use std::time::Instant;

use diffulex_edge::torch::QuantizedLinear;
use diffulex_edge::Format;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<i64>());
    let in_features = args.next().transpose()?.unwrap_or(4096);
    let out_features = args.next().transpose()?.unwrap_or(4096);
    let batch = 8;

    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let layer = nn::linear(vs.root(), in_features, out_features, Default::default());
    let xs = Tensor::randn([batch, in_features], (Kind::Float, Device::Cpu));

    let t = Instant::now();
    let reference = tch::no_grad(|| layer.forward(&xs));
    let f32_ms = t.elapsed().as_secs_f64() * 1e3;
    let f32_bytes = 4 * in_features * out_features;
    println!(
        "nn::Linear {in_features} -> {out_features}, batch {batch}: f32 weights {:.1} MiB, forward {f32_ms:.2} ms, max |y| {:.3}",
        f32_bytes as f64 / (1 << 20) as f64,
        max_abs(&reference)
    );
    println!(
        "{:<9} {:>9} {:>6} {:>8} {:>13} {:>13} {:>11} {:>10}",
        "format", "MiB", "bpw", "ratio", "max |dW|", "max |dy|", "quantize ms", "forward ms"
    );

    let mut kernel = "";
    for format in [Format::Int4Grouped { group: 32 }, Format::Int8PerChannel, Format::F16] {
        let t = Instant::now();
        let q = QuantizedLinear::from_linear(&layer, format)?;
        let quant_ms = t.elapsed().as_secs_f64() * 1e3;
        kernel = q.kernel().name();

        let t = Instant::now();
        let y = q.try_forward(&xs)?;
        let fwd_ms = t.elapsed().as_secs_f64() * 1e3;

        let dw = max_abs(&(q.weight().dequantize()? - layer.ws.detach()));
        let dy = max_abs(&(&y - &reference));
        let bytes = q.weight().storage_bytes();
        println!(
            "{:<9} {:>9.2} {:>6.3} {:>7.2}x {:>13.3e} {:>13.3e} {:>11.1} {:>10.2}",
            format.name(),
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 * 8.0 / (in_features * out_features) as f64,
            f32_bytes as f64 / bytes as f64,
            dw,
            dy,
            quant_ms,
            fwd_ms
        );
    }
    println!("kernel: {kernel}");
    Ok(())
}
