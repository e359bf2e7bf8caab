//! CPU kernels and their run-time SIMD dispatch.
//!
//! Hot loops are written once as `#[inline(always)]` generic code and instantiated per
//! instruction-set level with `#[target_feature]` wrappers; the level is chosen at run time
//! (`KernelLevel::resolve`), can be forced with `DIFFULEX_KERNEL=scalar|avx2|avx512` or per call,
//! and the choice is logged. The `Scalar` level is the portable baseline that every SIMD level is
//! tested against.

pub mod dot;
pub mod linear;
pub mod w8a8;

use crate::error::{Error, Result};

/// Instruction-set levels, ordered from the most portable to the widest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelLevel {
    Scalar,
    Avx2,
    Avx512,
}

impl KernelLevel {
    pub const NAMES: [&'static str; 4] = ["auto", "scalar", "avx2", "avx512"];

    pub fn name(self) -> &'static str {
        match self {
            KernelLevel::Scalar => "scalar",
            KernelLevel::Avx2 => "avx2",
            KernelLevel::Avx512 => "avx512",
        }
    }

    /// The widest level this CPU supports.
    pub fn detect() -> KernelLevel {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma")
            {
                return KernelLevel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return KernelLevel::Avx2;
            }
        }
        KernelLevel::Scalar
    }

    /// Every level this CPU can run, narrowest first (what tests iterate over).
    pub fn available() -> Vec<KernelLevel> {
        let best = Self::detect();
        [KernelLevel::Scalar, KernelLevel::Avx2, KernelLevel::Avx512]
            .into_iter()
            .filter(|l| *l <= best)
            .collect()
    }

    /// Turn a user request into a level: "auto" takes `DIFFULEX_KERNEL` if set, else the best
    /// level; naming a level this CPU lacks is an error rather than a silent fallback.
    pub fn resolve(requested: &str) -> Result<KernelLevel> {
        let req = requested.trim().to_ascii_lowercase();
        let req = if req == "auto" {
            match std::env::var("DIFFULEX_KERNEL") {
                Ok(v) if !v.trim().is_empty() => v.trim().to_ascii_lowercase(),
                _ => return Ok(Self::detect()),
            }
        } else {
            req
        };
        let level = match req.as_str() {
            "auto" => return Ok(Self::detect()),
            "scalar" => KernelLevel::Scalar,
            "avx2" => KernelLevel::Avx2,
            "avx512" => KernelLevel::Avx512,
            other => {
                return Err(Error::Unsupported(format!(
                    "unknown kernel {other:?}; choose one of {}",
                    Self::NAMES.join(", ")
                )))
            }
        };
        if level > Self::detect() {
            return Err(Error::Unsupported(format!(
                "kernel {:?} is not supported by this CPU (best available: {:?}); use kernel=\"auto\"",
                level.name(),
                Self::detect().name()
            )));
        }
        Ok(level)
    }
}

/// Instantiate an `#[inline(always)]` body once per level and dispatch on a `KernelLevel`.
/// `$body` is an expression using the function arguments; it is compiled three times with
/// different target features so the compiler can vectorize it for each.
macro_rules! dispatch {
    ($level:expr, fn $name:ident($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block) => {{
        #[inline(always)]
        fn generic($($arg: $ty),*) -> $ret $body
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2($($arg: $ty),*) -> $ret { generic($($arg),*) }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        unsafe fn avx512($($arg: $ty),*) -> $ret { generic($($arg),*) }
        match $level {
            // SAFETY: a level above Scalar is only ever produced by `KernelLevel::resolve` /
            // `detect`, which check the CPU supports it.
            #[cfg(target_arch = "x86_64")]
            $crate::kernels::KernelLevel::Avx512 => unsafe { avx512($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            $crate::kernels::KernelLevel::Avx2 => unsafe { avx2($($arg),*) },
            _ => generic($($arg),*),
        }
    }};
}
pub(crate) use dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_names() {
        assert_eq!(KernelLevel::resolve("scalar").unwrap(), KernelLevel::Scalar);
        assert!(KernelLevel::resolve("neon-ultra").is_err());
        let best = KernelLevel::detect();
        assert!(KernelLevel::available().contains(&best));
        for l in KernelLevel::available() {
            assert_eq!(KernelLevel::resolve(l.name()).unwrap(), l);
        }
    }
}
