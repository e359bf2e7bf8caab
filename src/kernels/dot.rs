//! Dot products written for auto-vectorization: fixed-width lane accumulators, so the compiler
//! emits packed multiply-adds under each `#[target_feature]` instantiation. With `FMA = true` the
//! lanes use fused multiply-add (only inside AVX2/AVX-512 instantiations, where it is one
//! instruction; on the baseline it would be a libm call).

const LANES: usize = 8;

/// `sum_i a[i] * b[i]` over equal-length slices.
#[inline(always)]
pub fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc0 = [0f32; LANES];
    let mut acc1 = [0f32; LANES];
    let mut ca = a.chunks_exact(2 * LANES);
    let mut cb = b.chunks_exact(2 * LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc0[i] = madd::<FMA>(x[i], y[i], acc0[i]);
            acc1[i] = madd::<FMA>(x[LANES + i], y[LANES + i], acc1[i]);
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = madd::<FMA>(*x, *y, tail);
    }
    let mut s = 0f32;
    for i in 0..LANES {
        s += acc0[i] + acc1[i];
    }
    s + tail
}

/// Four dot products of one `x` against four rows: `x` is loaded once for all four.
#[inline(always)]
pub fn dot4<const FMA: bool>(x: &[f32], w0: &[f32], w1: &[f32], w2: &[f32], w3: &[f32]) -> [f32; 4] {
    let n = x.len();
    let (w0, w1, w2, w3) = (&w0[..n], &w1[..n], &w2[..n], &w3[..n]);
    let mut a0 = [0f32; LANES];
    let mut a1 = [0f32; LANES];
    let mut a2 = [0f32; LANES];
    let mut a3 = [0f32; LANES];
    let full = n / LANES * LANES;
    let mut k = 0;
    while k < full {
        let xs = &x[k..k + LANES];
        let (r0, r1, r2, r3) = (&w0[k..k + LANES], &w1[k..k + LANES], &w2[k..k + LANES], &w3[k..k + LANES]);
        for i in 0..LANES {
            a0[i] = madd::<FMA>(xs[i], r0[i], a0[i]);
            a1[i] = madd::<FMA>(xs[i], r1[i], a1[i]);
            a2[i] = madd::<FMA>(xs[i], r2[i], a2[i]);
            a3[i] = madd::<FMA>(xs[i], r3[i], a3[i]);
        }
        k += LANES;
    }
    let mut out = [a0.iter().sum::<f32>(), a1.iter().sum(), a2.iter().sum(), a3.iter().sum()];
    for k in full..n {
        out[0] = madd::<FMA>(x[k], w0[k], out[0]);
        out[1] = madd::<FMA>(x[k], w1[k], out[1]);
        out[2] = madd::<FMA>(x[k], w2[k], out[2]);
        out[3] = madd::<FMA>(x[k], w3[k], out[3]);
    }
    out
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_f64() {
        for n in [0usize, 1, 7, 15, 16, 17, 33, 100, 4095] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 7.0).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let bound: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 * *y as f64).abs()).sum::<f64>()
                * n as f64
                * f32::EPSILON as f64;
            assert!((dot::<false>(&a, &b) as f64 - exact).abs() <= bound + 1e-30, "n={n}");
            assert!((dot::<true>(&a, &b) as f64 - exact).abs() <= bound + 1e-30, "n={n}");
            let d4 = dot4::<false>(&a, &b, &a, &b, &a);
            assert_eq!(d4[0], d4[2]);
            assert!((d4[0] as f64 - exact).abs() <= bound + 1e-30);
        }
    }
}
