//! W8A8: int8 activations (one symmetric scale per row/token, computed at run time or fixed from
//! calibration) times int8 per-channel weights, accumulated in int32.
//!
//! `y[m, n] = sx[m] * sw[n] * (sum_k xq[m, k] * wq[n, k] - zw[n] * sum_k xq[m, k]) + b[n]`
//! which equals `x_deq @ W_deq^T + b` exactly up to the final float products (int32 sums are exact
//! for k < 2^17 with |xq|, |wq - zw| <= 255).

use rayon::prelude::*;

use super::act::Act;
use super::linear::{for_each_row_block, OutPtr, SERIAL_WORK};
use super::vnni::dot_block;
use crate::error::{check_len, Error, Result};
use crate::formats::int8::round_even_small;
use crate::simd::{dispatch, KernelLevel};

/// Largest `k` the int32 accumulation supports: the true sum `sum xq * (wq - zw)` is bounded by
/// `128 * 255 * k`, which fits in i32 for k <= 65536 (the SIMD partial sums may wrap; the final
/// wrapping result is still exact).
pub const MAX_K: usize = 65536;

/// Largest activation code: symmetric [-127, 127] (as LLM.int8() and SmoothQuant use).
pub const ACT_QMAX: f32 = 127.0;

/// Quantize activations row by row. With `static_scale` every row uses it (values beyond the
/// calibrated range clamp); without, each row gets `absmax / 127` (a zero row gets 1).
pub fn quantize_activations(
    x: &[f32],
    m: usize,
    k: usize,
    static_scale: Option<f32>,
    q: &mut [i8],
    scales: &mut [f32],
    level: KernelLevel,
) -> Result<()> {
    quantize_activations_act(Act::F32(x), m, k, static_scale, q, scales, level)
}

/// `quantize_activations` for f32 or bf16 input (bf16 rows are widened exactly first).
pub fn quantize_activations_act(
    x: Act<'_>,
    m: usize,
    k: usize,
    static_scale: Option<f32>,
    q: &mut [i8],
    scales: &mut [f32],
    level: KernelLevel,
) -> Result<()> {
    x.check(m, k)?;
    check_len("q", q.len(), m * k)?;
    check_len("scales", scales.len(), m)?;
    if let Some(s) = static_scale {
        if !(s.is_finite() && s > 0.0) {
            return Err(Error::InvalidArgument(format!("static activation scale must be finite and > 0, got {s}")));
        }
    }
    if k == 0 {
        scales.iter_mut().for_each(|s| *s = static_scale.unwrap_or(1.0));
        return Ok(());
    }
    let row = |(mi, (qr, s)): (usize, (&mut [i8], &mut f32))| {
        let mut buf = Vec::new();
        let xr: &[f32] = match x {
            Act::F32(x) => &x[mi * k..(mi + 1) * k],
            Act::Bf16(_) => {
                buf.resize(k, 0f32);
                x.row_into(mi, k, &mut buf);
                &buf
            }
        };
        let sc = static_scale.unwrap_or_else(|| {
            let a = absmax(level, xr) / ACT_QMAX;
            if a > 0.0 && a.is_finite() {
                a
            } else {
                1.0
            }
        });
        *s = sc;
        quantize_row(level, xr, qr, sc);
    };
    // a decode step (one row) is microseconds of work: not worth a trip through the thread pool
    if m * k < SERIAL_WORK {
        q.chunks_mut(k).zip(scales.iter_mut()).enumerate().for_each(row);
    } else {
        q.par_chunks_mut(k).zip(scales.par_iter_mut()).enumerate().for_each(row);
    }
    Ok(())
}

fn absmax(level: KernelLevel, x: &[f32]) -> f32 {
    dispatch!(
        level,
        fn am(x: &[f32]) -> f32 {
            let mut acc = [0f32; 16];
            let chunks = x.chunks_exact(16);
            let tail = chunks.remainder();
            for c in chunks {
                for i in 0..16 {
                    let a = c[i].abs();
                    acc[i] = if a > acc[i] { a } else { acc[i] };
                }
            }
            tail.iter().chain(acc.iter()).fold(0f32, |m, v| m.max(v.abs()))
        }
    )
}

fn quantize_row(level: KernelLevel, x: &[f32], q: &mut [i8], scale: f32) {
    dispatch!(
        level,
        fn qr(x: &[f32], q: &mut [i8], scale: f32) -> () {
            for (d, v) in q.iter_mut().zip(x) {
                *d = round_even_small((v / scale).clamp(-ACT_QMAX, ACT_QMAX)) as i8;
            }
        }
    )
}

/// Scalar reference: `y = x_deq @ W_deq^T + b` with exact integer sums.
#[allow(clippy::too_many_arguments)]
pub fn linear_w8a8_ref(
    xq: &[i8],
    x_scales: &[f32],
    wq: &[i8],
    w_scales: &[f32],
    w_zero: &[i8],
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (m, n) = (x_scales.len(), w_scales.len());
    for mi in 0..m {
        for ni in 0..n {
            let mut acc: i64 = 0;
            for kk in 0..k {
                acc += xq[mi * k + kk] as i64 * (wq[ni * k + kk] as i64 - w_zero[ni] as i64);
            }
            out[mi * n + ni] = x_scales[mi] * w_scales[ni] * acc as f32 + bias.map_or(0.0, |b| b[ni]);
        }
    }
}

/// Fast path: rows of `W` in parallel blocks, register-tiled integer dot products
/// (`vnni::dot_block`: VNNI `vpdpbusd` where the level has it, `vpmaddwd` otherwise).
#[allow(clippy::too_many_arguments)]
pub fn linear_w8a8(
    xq: &[i8],
    x_scales: &[f32],
    wq: &[i8],
    w_scales: &[f32],
    w_zero: &[i8],
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    level: KernelLevel,
) -> Result<()> {
    let (m, n) = (x_scales.len(), w_scales.len());
    check_len("activations", xq.len(), m * k)?;
    check_len("weight", wq.len(), n * k)?;
    check_len("zero_points", w_zero.len(), n)?;
    check_len("output", out.len(), m * n)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), n)?;
    }
    if k > MAX_K {
        return Err(Error::Shape(format!("in_features {k} is too large for int32 accumulation (max {MAX_K})")));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let xsum: Vec<i32> = (0..m).map(|mi| xq[mi * k..(mi + 1) * k].iter().map(|v| *v as i32).sum()).collect();
    for_each_row_block(n, out, m * n * k, |n0, n1, ptr: OutPtr| {
        dot_block(level, xq, &xsum, m, k, wq, n0, n1, |mi, ni, dot| {
            let acc = dot.wrapping_sub((w_zero[ni] as i32).wrapping_mul(xsum[mi]));
            let b = bias.map_or(0.0, |b| b[ni]);
            // SAFETY: column ni belongs to this block alone.
            unsafe { *ptr.0.add(mi * n + ni) = x_scales[mi] * w_scales[ni] * acc as f32 + b };
        });
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::int8;

    #[test]
    fn matches_reference_on_odd_shapes() {
        for &(m, n, k) in &[(1, 1, 1), (1, 7, 33), (5, 9, 100), (3, 17, 4095)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 31.0).collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
            for sym in [true, false] {
                let qw = int8::quantize(&w, n, k, sym, KernelLevel::Scalar).unwrap();
                for st in [None, Some(0.05f32)] {
                    let mut xq = vec![0i8; m * k];
                    let mut xs = vec![0f32; m];
                    quantize_activations(&x, m, k, st, &mut xq, &mut xs, KernelLevel::Scalar).unwrap();
                    let mut want = vec![0f32; m * n];
                    linear_w8a8_ref(&xq, &xs, &qw.q, &qw.scales, &qw.zero_points, k, Some(&bias), &mut want);
                    for level in KernelLevel::available() {
                        let mut xq2 = vec![0i8; m * k];
                        let mut xs2 = vec![0f32; m];
                        quantize_activations(&x, m, k, st, &mut xq2, &mut xs2, level).unwrap();
                        assert_eq!((&xq2, &xs2), (&xq, &xs), "{level:?}");
                        let mut got = vec![0f32; m * n];
                        linear_w8a8(&xq, &xs, &qw.q, &qw.scales, &qw.zero_points, k, Some(&bias), &mut got, level)
                            .unwrap();
                        // integer sums are exact: results agree bit for bit
                        assert_eq!(got, want, "{level:?} m={m} n={n} k={k}");
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_activations_match_their_f32_values() {
        let bits: Vec<u16> =
            (0..3 * 70).map(|i| (0x3c00 + (i * 97) % 0x0800) as u16 ^ if i % 3 == 0 { 0x8000 } else { 0 }).collect();
        let wide: Vec<f32> = bits.iter().map(|b| f32::from_bits((*b as u32) << 16)).collect();
        for level in KernelLevel::available() {
            let (mut q1, mut s1, mut q2, mut s2) = (vec![0i8; 210], vec![0f32; 3], vec![0i8; 210], vec![0f32; 3]);
            quantize_activations(&wide, 3, 70, None, &mut q1, &mut s1, level).unwrap();
            quantize_activations_act(Act::Bf16(&bits), 3, 70, None, &mut q2, &mut s2, level).unwrap();
            assert_eq!((q1, s1), (q2, s2), "{level:?}");
        }
    }

    #[test]
    fn too_long_rows_are_a_shape_error() {
        let k = MAX_K + 1;
        let (xq, wq) = (vec![0i8; k], vec![0i8; k]);
        let mut out = [0f32];
        let e = linear_w8a8(&xq, &[1.0], &wq, &[1.0], &[0], k, None, &mut out, KernelLevel::Scalar).unwrap_err();
        assert!(matches!(e, Error::Shape(_)));
    }

    #[test]
    fn activation_error_is_half_a_step() {
        let x: Vec<f32> = (0..300).map(|i| (i as f32 * 0.77).sin() * 3.0).collect();
        let mut q = vec![0i8; 300];
        let mut s = vec![0f32; 3];
        quantize_activations(&x, 3, 100, None, &mut q, &mut s, KernelLevel::detect()).unwrap();
        for (i, v) in x.iter().enumerate() {
            let sc = s[i / 100];
            assert!((v - q[i] as f32 * sc).abs() <= 0.5 * sc * (1.0 + 1e-5));
        }
        assert!(quantize_activations(&x, 3, 100, Some(-1.0), &mut q, &mut s, KernelLevel::Scalar).is_err());
    }
}
