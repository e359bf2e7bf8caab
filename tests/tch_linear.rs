#![cfg(feature = "tch")]
//! `diffulex_edge::torch` against libtorch: the quantized layer vs torch's own f32 matmul on the
//! same (dequantized) weights, vs the original f32 `nn::Linear` within the format's error, input
//! shapes and dtypes, and the error cases. Run through `.ci/tch.sh`.

use diffulex_edge::formats::{int4, int8, Format};
use diffulex_edge::simd::KernelLevel;
use diffulex_edge::torch::{self, QuantizedLinear, QuantizedWeight};
use diffulex_edge::Error;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

/// Every format QuantizedLinear stores, with the symmetry choices that matter.
fn formats() -> Vec<(Format, bool)> {
    vec![
        (Format::F16, false),
        (Format::BF16, false),
        (Format::Int8PerChannel, true),
        (Format::Int8PerChannel, false),
        (Format::Int4Grouped { group: 32 }, false),
        (Format::Int4Grouped { group: 32 }, true),
        (Format::Int4Grouped { group: 128 }, false),
    ]
}

fn max(t: &Tensor) -> f64 {
    t.max().double_value(&[])
}

/// A seeded `nn::Linear` (Kaiming-uniform weights, uniform bias, both requiring grad).
fn layer(k: i64, n: i64, seed: i64) -> (nn::VarStore, nn::Linear) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let l = nn::linear(vs.root(), k, n, Default::default());
    (vs, l)
}

/// Per-element bound on |w - dequant(w)| the format guarantees: half a quantization step for
/// the integer formats (step = the row's or group's scale), half an ulp for f16 (2^-11 relative,
/// 2^-25 absolute in the subnormal range) and bf16 (2^-8 relative). For the integer formats a
/// 1e-5 relative slack on the step and 4 ulps of |w| cover the rounding of `(q - zp) * scale` and
/// of the difference itself (the same allowance as the core's own tests).
fn half_step(q: &QuantizedWeight, w: &Tensor) -> Tensor {
    let (n, k) = q.shape();
    let per_elem: Vec<f32> = match q {
        QuantizedWeight::Int8(m) => (0..n * k).map(|i| m.scales[i / k] * 0.5).collect(),
        QuantizedWeight::Int4(m) => {
            let g = k.div_ceil(m.group);
            (0..n * k).map(|i| m.scales[(i / k) * g + (i % k) / m.group] * 0.5).collect()
        }
        QuantizedWeight::Half(h) => {
            let (rel, tiny) = match h.kind {
                torch::HalfKind::F16 => (2f64.powi(-11), 2f64.powi(-25)),
                torch::HalfKind::BF16 => (2f64.powi(-8), 0.0),
            };
            return w.abs() * rel + tiny;
        }
    };
    Tensor::from_slice(&per_elem).reshape([n as i64, k as i64]) * (1.0 + 1e-5) + w.abs() * (4.0 * f32::EPSILON as f64)
}

/// Assert |got - want| <= bound everywhere, printing the worst offender otherwise.
fn assert_within(what: &str, got: &Tensor, want: &Tensor, bound: &Tensor) {
    let excess = (got - want).abs() - bound;
    let worst = max(&excess);
    assert!(worst <= 0.0, "{what}: error exceeds bound by {worst:e} (max |diff| {:e})", max(&(got - want).abs()));
}

/// f32 summation bound: each of two K-term f32 dot products is within about K·ε·Σ|x·w| of the
/// exact value (plus one rounding for the bias), so two of them differ by at most twice that.
fn summation_bound(x2: &Tensor, w: &Tensor, bias: Option<&Tensor>, k: usize) -> Tensor {
    let mag = x2.abs().matmul(&w.abs().tr());
    let mag = match bias {
        Some(b) => mag + b.abs(),
        None => mag,
    };
    mag * (2.0 * (k as f64 + 2.0) * f32::EPSILON as f64) + 1e-6
}

#[test]
fn matches_torch_matmul_on_dequantized_weights() {
    for &(m, k, n) in &[(1i64, 64i64, 16i64), (5, 200, 37), (9, 300, 64), (3, 1, 4)] {
        let (_vs, lin) = layer(k, n, 7);
        let xs = Tensor::randn([m, k], CPU);
        for (format, sym) in formats() {
            let q = QuantizedLinear::from_tensors_with(&lin.ws, lin.bs.as_ref(), format, sym).unwrap();
            assert_eq!((q.out_features(), q.in_features()), (n as usize, k as usize));
            let w = q.weight().dequantize().unwrap();
            assert_eq!(w.size(), [n, k]);
            assert_eq!(w.kind(), Kind::Float);
            let bias = Tensor::from_slice(q.bias().unwrap());
            let want = xs.matmul(&w.tr()) + &bias;
            let got = q.forward(&xs);
            assert_eq!(got.size(), [m, n]);
            assert_eq!(got.kind(), Kind::Float);
            let bound = summation_bound(&xs, &w, Some(&bias), k as usize);
            assert_within(&format!("{} sym={sym} m={m} k={k} n={n}", format.name()), &got, &want, &bound);
        }
    }
}

#[test]
fn every_kernel_level_agrees_with_torch() {
    let (_vs, lin) = layer(160, 24, 3);
    let xs = Tensor::randn([4, 160], CPU);
    for level in KernelLevel::available() {
        for (format, sym) in formats() {
            let q = QuantizedLinear::from_tensors_with(&lin.ws, lin.bs.as_ref(), format, sym)
                .unwrap()
                .with_kernel(level.name())
                .unwrap();
            assert_eq!(q.kernel(), level);
            let w = q.weight().dequantize().unwrap();
            let bias = lin.bs.as_ref().unwrap().detach();
            let want = xs.matmul(&w.tr()) + &bias;
            let bound = summation_bound(&xs, &w, Some(&bias), 160);
            assert_within(&format!("{} {level:?}", format.name()), &q.forward(&xs), &want, &bound);
        }
    }
}

#[test]
fn close_to_the_f32_linear_within_quantization_error() {
    let (m, k, n) = (6i64, 256i64, 48i64);
    let (_vs, lin) = layer(k, n, 11);
    let xs = Tensor::randn([m, k], CPU);
    let reference = tch::no_grad(|| lin.forward(&xs));
    let w = lin.ws.detach();
    let bias = lin.bs.as_ref().unwrap().detach();
    for (format, sym) in formats() {
        let q = QuantizedLinear::from_tensors_with(&lin.ws, lin.bs.as_ref(), format, sym).unwrap();
        let wq = q.weight().dequantize().unwrap();
        let e = half_step(q.weight(), &w);
        // the weights themselves are within half a step ...
        assert_within(&format!("{} weights", format.name()), &wq, &w, &e);
        // ... so each output is within sum_k |x_k| * half_step[n, k], plus f32 summation error
        let bound = xs.abs().matmul(&e.tr())
            + summation_bound(&xs, &w, Some(&bias), k as usize)
            + summation_bound(&xs, &wq, Some(&bias), k as usize);
        let got = q.forward(&xs);
        assert_within(&format!("{} sym={sym} vs nn::Linear", format.name()), &got, &reference, &bound);
        // and the quantized layer is not trivially exact for the lossy formats
        let err = max(&(&got - &reference).abs());
        assert!(err < 0.1 * max(&reference.abs()), "{}: error {err} is too large", format.name());
    }
}

#[test]
fn leading_dimensions_are_kept() {
    let (_vs, lin) = layer(96, 20, 5);
    let q = QuantizedLinear::from_linear(&lin, Format::Int4Grouped { group: 32 }).unwrap();
    let xs = Tensor::randn([2, 3, 96], CPU);
    let y = q.forward(&xs);
    assert_eq!(y.size(), [2, 3, 20]);
    // rows are independent, so the 3-D result is exactly the 2-D result reshaped
    let flat = q.forward(&xs.reshape([6, 96]));
    assert!(y.reshape([6, 20]).equal(&flat));
    assert_eq!(q.forward(&xs.reshape([2, 1, 3, 96])).size(), [2, 1, 3, 20]);
    assert_eq!(q.forward(&xs.get(0).get(0)).size(), [20]);
    // non-contiguous input (a transposed view) reads the logical layout
    let xt = Tensor::randn([96, 4], CPU).tr();
    assert!(!xt.is_contiguous());
    assert!(q.forward(&xt).equal(&q.forward(&xt.contiguous())));
    // an empty batch is fine
    assert_eq!(q.forward(&Tensor::zeros([0, 96], CPU)).size(), [0, 20]);
}

#[test]
fn half_precision_inputs_keep_their_dtype() {
    let (_vs, lin) = layer(128, 32, 9);
    let xs = Tensor::randn([4, 128], CPU);
    for format in [Format::Int8PerChannel, Format::Int4Grouped { group: 64 }, Format::BF16] {
        let q = QuantizedLinear::from_linear(&lin, format).unwrap();
        for kind in [Kind::BFloat16, Kind::Half] {
            let x = xs.to_kind(kind);
            let y = q.forward(&x.reshape([2, 2, 128]));
            assert_eq!(y.kind(), kind);
            assert_eq!(y.size(), [2, 2, 32]);
            // accumulation is f32; only the final result is rounded to the input's dtype
            let want = q.forward(&x.to_kind(Kind::Float)).to_kind(kind);
            assert!(y.reshape([4, 32]).equal(&want), "{} {kind:?}", format.name());
        }
    }
}

#[test]
fn adapters_use_the_core_formats_bit_for_bit() {
    tch::manual_seed(1);
    let w = Tensor::randn([10, 70], CPU);
    let data: Vec<f32> = Vec::try_from(&w.reshape([-1])).unwrap();
    let level = KernelLevel::detect();
    for sym in [true, false] {
        let core8 = int8::quantize(&data, 10, 70, sym, level).unwrap();
        assert_eq!(torch::quantize_int8(&w, sym).unwrap(), core8);
        let layout = int4::Int4Layout::new(10, 70, 32).unwrap();
        let core4 = int4::quantize(&data, layout, sym, level).unwrap();
        assert_eq!(torch::quantize_int4(&w, 32, sym).unwrap(), core4);
        // strided and f64/f16 inputs are converted first; f64 -> f32 of f32 data is exact
        let wt = w.tr().contiguous().tr();
        assert!(!wt.is_contiguous());
        assert_eq!(torch::quantize_int8(&wt, sym).unwrap(), core8);
        assert_eq!(torch::quantize_int4(&w.to_kind(Kind::Double), 32, sym).unwrap(), core4);
        let deq = torch::dequantize_int4(&core4).unwrap();
        assert_eq!(Vec::<f32>::try_from(&deq.reshape([-1])).unwrap(), core4.dequantize());
    }
    let h = torch::quantize_half(&w, torch::HalfKind::BF16).unwrap();
    // torch's own bf16 rounding is round-to-nearest-even too
    assert!(torch::dequantize_half(&h).unwrap().equal(&w.to_kind(Kind::BFloat16).to_kind(Kind::Float)));
    let h = torch::quantize_half(&w.to_kind(Kind::Half), torch::HalfKind::F16).unwrap();
    assert!(torch::dequantize_half(&h).unwrap().equal(&w.to_kind(Kind::Half).to_kind(Kind::Float)));
}

#[test]
fn storage_is_smaller() {
    let (_vs, lin) = layer(256, 64, 2);
    let f32_bytes = 4 * 256 * 64;
    let bytes = |f| QuantizedWeight::quantize(&lin.ws, f, true).unwrap().storage_bytes();
    assert_eq!(bytes(Format::F16), f32_bytes / 2);
    // int8: one byte a weight + f32 scale + i8 zero point per row
    assert_eq!(bytes(Format::Int8PerChannel), 256 * 64 + 5 * 64);
    // int4 g32: 16 bytes of nibbles + 4 + 1 per group of 32
    assert_eq!(bytes(Format::Int4Grouped { group: 32 }), 64 * 8 * 21);
    let q = QuantizedLinear::from_linear(&lin, Format::Int8PerChannel).unwrap();
    assert_eq!(q.storage_bytes(), 256 * 64 + 5 * 64 + 4 * 64);
    let dbg = format!("{q:?}");
    assert!(dbg.contains("int8") && dbg.contains("in_features: 256"), "{dbg}");
}

#[test]
fn cuda_tensors_are_refused() {
    if !tch::Cuda::is_available() {
        eprintln!("skipping cuda_tensors_are_refused: no CUDA device");
        return;
    }
    let w = Tensor::randn([8, 32], (Kind::Float, Device::Cuda(0)));
    let e = torch::quantize_int8(&w, true).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains("move the tensor to CPU"), "{e}");
    let q = QuantizedLinear::from_tensors(&w.to_device(Device::Cpu), None, Format::Int8PerChannel).unwrap();
    let e = q.try_forward(&Tensor::randn([2, 32], (Kind::Float, Device::Cuda(0)))).unwrap_err();
    assert!(e.to_string().contains("move the tensor to CPU"), "{e}");
}

#[test]
fn bad_weights_are_errors() {
    let w = Tensor::randn([4, 32], CPU);
    for bad in [Tensor::randn([32], CPU), Tensor::randn([2, 4, 32], CPU), Tensor::from(1.0f32)] {
        let e = torch::quantize_int8(&bad, true).unwrap_err();
        assert!(matches!(e, Error::Shape(ref s) if s.contains("2-D")), "{e}");
        assert!(matches!(QuantizedLinear::from_tensors(&bad, None, Format::F16), Err(Error::Shape(_))));
    }
    let e = torch::quantize_int4(&w.to_kind(Kind::Int), 32, false).unwrap_err();
    assert!(matches!(e, Error::Unsupported(ref s) if s.contains("Int")), "{e}");
    assert!(matches!(torch::quantize_int4(&w, 48, false), Err(Error::InvalidArgument(_))));
    assert!(matches!(QuantizedLinear::from_tensors(&w, None, Format::F32), Err(Error::Unsupported(_))));
    let bias = Tensor::zeros([5], CPU);
    assert!(matches!(QuantizedLinear::from_tensors(&w, Some(&bias), Format::F16), Err(Error::Shape(_))));
    let e = QuantizedLinear::from_tensors(&(&w * 1e5), None, Format::F16).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(ref s) if s.contains("overflows f16")), "{e}");
}

#[test]
fn non_finite_weights_are_reported_with_their_position() {
    for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let w = Tensor::randn([4, 64], CPU);
        let _ = w.get(2).get(37).fill_(value as f64);
        let formats = [Format::Int8PerChannel, Format::Int4Grouped { group: 32 }, Format::F16, Format::BF16];
        for format in formats {
            for w in [w.shallow_clone(), w.to_kind(Kind::BFloat16)] {
                match QuantizedLinear::from_tensors(&w, None, format) {
                    Err(Error::NonFinite { row: 2, col: 37, value: v }) => {
                        assert!(v.is_nan() == value.is_nan() && (v.is_nan() || v == value))
                    }
                    other => panic!("{} {value}: expected NonFinite at (2, 37), got {other:?}", format.name()),
                }
            }
        }
    }
    let mut bias = vec![0f32; 4];
    bias[1] = f32::NAN;
    let w = Tensor::randn([4, 64], CPU);
    let e = QuantizedLinear::from_tensors(&w, Some(&Tensor::from_slice(&bias)), Format::Int8PerChannel);
    assert!(matches!(e, Err(Error::NonFinite { col: 1, .. })), "{e:?}");
}

#[test]
fn bad_inputs_are_errors() {
    let (_vs, lin) = layer(64, 8, 4);
    let q = QuantizedLinear::from_linear(&lin, Format::Int8PerChannel).unwrap();
    let e = q.try_forward(&Tensor::randn([3, 65], CPU)).unwrap_err();
    assert!(matches!(e, Error::Shape(ref s) if s.contains("in_features = 64")), "{e}");
    assert!(matches!(q.try_forward(&Tensor::from(1.0f32)), Err(Error::Shape(_))));
    let e = q.try_forward(&Tensor::randn([3, 64], (Kind::Double, Device::Cpu))).unwrap_err();
    assert!(matches!(e, Error::Unsupported(ref s) if s.contains("Double")), "{e}");
    assert!(matches!(q.try_forward(&Tensor::ones([3, 64], (Kind::Int64, Device::Cpu))), Err(Error::Unsupported(_))));
}

#[test]
#[should_panic(expected = "last dimension must be in_features = 64")]
fn forward_panics_with_the_error_message() {
    let (_vs, lin) = layer(64, 8, 4);
    let q = QuantizedLinear::from_linear(&lin, Format::Int4Grouped { group: 64 }).unwrap();
    let _ = q.forward(&Tensor::randn([2, 32], CPU));
}

#[test]
fn works_as_a_boxed_module_in_a_sequential() {
    let (_vs, a) = layer(32, 64, 8);
    let (_vs2, b) = layer(64, 16, 9);
    let xs = Tensor::randn([5, 32], CPU);
    let reference = tch::no_grad(|| b.forward(&a.forward(&xs).relu()));
    let qa = QuantizedLinear::from_linear(&a, Format::Int8PerChannel).unwrap();
    let qb = QuantizedLinear::from_linear(&b, Format::Int8PerChannel).unwrap();
    let seq = nn::seq().add(qa).add_fn(|x| x.relu()).add(qb);
    let y = seq.forward(&xs);
    assert_eq!(y.size(), [5, 16]);
    assert!(max(&(&y - &reference).abs()) < 0.05 * max(&reference.abs()));
}
