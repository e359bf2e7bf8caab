//! Run-time SIMD dispatch shared by the formats (quantizers) and the kernels (matmuls): the
//! instruction-set levels, their detection and the `dispatch!` macro. The bottom layer: it
//! depends on nothing else in the crate but the error type.
//!
//! Hot loops are written once as `#[inline(always)]` generic code and instantiated per
//! instruction-set level with `#[target_feature]` wrappers; the level is chosen at run time
//! (`KernelLevel::resolve`), can be forced with
//! `DIFFULEX_KERNEL=scalar|avx2|avx_vnni|avx512|avx512_vnni` or per call,
//! and the choice is logged. The `Scalar` level is the portable baseline that every SIMD level is
//! tested against.

use crate::error::{Error, Result};

/// Instruction-set levels, ordered from the most portable to the widest.
///
/// The VNNI levels only change the integer (W8A8) kernels: `AvxVnni` runs the AVX2 float kernels
/// plus VEX `vpdpbusd`, `Avx512Vnni` the AVX-512 float kernels plus EVEX `vpdpbusd`. The order is
/// not an inclusion chain (a CPU may have AVX-512 without AVX-VNNI), so `available` checks each
/// level's own features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelLevel {
    Scalar,
    Avx2,
    AvxVnni,
    Avx512,
    Avx512Vnni,
}

impl KernelLevel {
    pub const NAMES: [&'static str; 6] = ["auto", "scalar", "avx2", "avx512", "avx_vnni", "avx512_vnni"];
    const ALL: [KernelLevel; 5] =
        [KernelLevel::Scalar, KernelLevel::Avx2, KernelLevel::AvxVnni, KernelLevel::Avx512, KernelLevel::Avx512Vnni];

    pub fn name(self) -> &'static str {
        match self {
            KernelLevel::Scalar => "scalar",
            KernelLevel::Avx2 => "avx2",
            KernelLevel::AvxVnni => "avx_vnni",
            KernelLevel::Avx512 => "avx512",
            KernelLevel::Avx512Vnni => "avx512_vnni",
        }
    }

    /// Whether this CPU can run `self`.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            match self {
                KernelLevel::Scalar => true,
                KernelLevel::Avx2 => avx2,
                KernelLevel::AvxVnni => avx2 && is_x86_feature_detected!("avxvnni"),
                KernelLevel::Avx512 => avx512,
                KernelLevel::Avx512Vnni => avx512 && is_x86_feature_detected!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == KernelLevel::Scalar
        }
    }

    /// The widest level this CPU supports.
    pub fn detect() -> KernelLevel {
        Self::ALL.into_iter().rev().find(|l| l.supported()).unwrap_or(KernelLevel::Scalar)
    }

    /// Every level this CPU can run, narrowest first (what tests iterate over).
    pub fn available() -> Vec<KernelLevel> {
        Self::ALL.into_iter().filter(|l| l.supported()).collect()
    }

    /// Whether the AVX-512 float kernels apply (`Avx512` and `Avx512Vnni`).
    pub fn has_avx512(self) -> bool {
        matches!(self, KernelLevel::Avx512 | KernelLevel::Avx512Vnni)
    }

    /// Whether the AVX2 float kernels apply (`Avx2` and `AvxVnni`).
    pub fn has_avx2_only(self) -> bool {
        matches!(self, KernelLevel::Avx2 | KernelLevel::AvxVnni)
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
            "avx_vnni" | "avxvnni" => KernelLevel::AvxVnni,
            "avx512" => KernelLevel::Avx512,
            "avx512_vnni" | "avx512vnni" => KernelLevel::Avx512Vnni,
            other => {
                return Err(Error::Unsupported(format!(
                    "unknown kernel {other:?}; choose one of {}",
                    Self::NAMES.join(", ")
                )))
            }
        };
        if !level.supported() {
            return Err(Error::Unsupported(format!(
                "kernel {:?} is not supported by this CPU (available: {}); use kernel=\"auto\"",
                level.name(),
                Self::available().iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
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
            $crate::simd::KernelLevel::Avx512 | $crate::simd::KernelLevel::Avx512Vnni => unsafe { avx512($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            $crate::simd::KernelLevel::Avx2 | $crate::simd::KernelLevel::AvxVnni => unsafe { avx2($($arg),*) },
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
        // every level has a kernel= spelling, and an unsupported level is an error, not a fallback
        for l in KernelLevel::ALL {
            assert!(KernelLevel::NAMES.contains(&l.name()));
            assert_eq!(KernelLevel::resolve(l.name()).is_ok(), l.supported(), "{l:?}");
        }
        assert_eq!(KernelLevel::available()[0], KernelLevel::Scalar);
    }
}
