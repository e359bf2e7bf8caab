//! Weight formats. Each module has a scalar `*_ref` reference that is obviously correct and a
//! fast path (rayon over rows, loops written for auto-vectorization) tested bit-exact against it.

pub mod bitnet;
pub mod ggml;
pub mod half_float;
pub mod int4;
pub mod int4_weighted;
pub mod int8;
pub mod nf4;
pub mod registry;
// AVX-512 row quantizers of the INT8 and INT4 formats, byte-exact with their `quantize_ref`
pub(crate) mod quantize_avx512;

use crate::error::{Error, Result};

/// The formats this build can store weights in, with their canonical (GGUF-style) spellings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    F32,
    F16,
    BF16,
    /// INT8, one scale (and optional zero point) per output channel (row).
    Int8PerChannel,
    /// INT4, one scale and zero point per `group` consecutive input columns; two nibbles a byte.
    Int4Grouped {
        group: usize,
    },
    /// A GGML block format (`q4_0`, `q4_K`, `tq2_0`, `iq4_xs`, ...; see `ggml::block::GgmlType`).
    Ggml(ggml::block::GgmlType),
    /// A packed layer format of [`registry::REGISTRY`] that is not a GGML type (`nf4`, `ternary`),
    /// by its registry name.
    Packed(&'static str),
}

/// Group sizes the INT4 format accepts.
pub const INT4_GROUP_SIZES: [usize; 4] = [32, 64, 128, 256];

impl Format {
    /// Every spelling `parse` accepts, for error messages.
    pub const NAMES: [&'static str; 8] =
        ["f32", "f16", "bf16", "int8", "int4_g32", "int4_g64", "int4_g128", "int4_g256"];

    pub fn name(&self) -> String {
        match self {
            Format::F32 => "f32".into(),
            Format::F16 => "f16".into(),
            Format::BF16 => "bf16".into(),
            Format::Int8PerChannel => "int8".into(),
            Format::Int4Grouped { group } => format!("int4_g{group}"),
            // ggml's spelling (`ggml_type_name`): lower case except the K of K-quants
            Format::Ggml(t) => t.name().to_ascii_lowercase().replace("_k", "_K"),
            Format::Packed(name) => (*name).into(),
        }
    }

    pub fn parse(name: &str) -> Result<Format> {
        let lower = name.trim().to_ascii_lowercase();
        let f = match lower.as_str() {
            "f32" | "fp32" | "float32" => Format::F32,
            "f16" | "fp16" | "float16" => Format::F16,
            "bf16" | "bfloat16" => Format::BF16,
            "int8" | "q8" => Format::Int8PerChannel,
            other => match other.strip_prefix("int4_g").and_then(|g| g.parse::<usize>().ok()) {
                Some(group) if INT4_GROUP_SIZES.contains(&group) => Format::Int4Grouped { group },
                _ => match ggml::block::GgmlType::parse(other) {
                    Ok(t) if t.block_size() > 1 => Format::Ggml(t),
                    _ => match registry::lookup(other) {
                        Ok(f) if f.ggml_type().is_none() => Format::Packed(f.name()),
                        _ => {
                            let packed: Vec<&str> = registry::REGISTRY.iter().map(|f| f.name()).collect();
                            return Err(Error::Unsupported(format!(
                                "unknown format {name:?}; supported: {}, {}",
                                Format::NAMES.join(", "),
                                packed.join(", ")
                            )));
                        }
                    },
                },
            },
        };
        Ok(f)
    }

    /// Storage bits per weight, including scales and zero points, for a `[rows, cols]` matrix.
    pub fn bits_per_weight(&self, rows: usize, cols: usize) -> f64 {
        let n = (rows * cols).max(1) as f64;
        let bytes = match self {
            Format::F32 => 4 * rows * cols,
            Format::F16 | Format::BF16 => 2 * rows * cols,
            // int8 values + f32 scale + i8 zero point per row
            Format::Int8PerChannel => rows * cols + 5 * rows,
            Format::Int4Grouped { group } => {
                let groups = cols.div_ceil(*group);
                rows * (cols.div_ceil(2) + groups * 5)
            }
            Format::Ggml(t) => rows * cols.div_ceil(t.block_size()) * t.type_size(),
            Format::Packed(name) => {
                let f = registry::lookup(name).expect("Format::Packed holds a registry name");
                rows * f.row_bytes_of(cols.next_multiple_of(f.block_size()))
            }
        };
        bytes as f64 * 8.0 / n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in Format::NAMES {
            assert_eq!(Format::parse(name).unwrap().name(), name);
        }
        assert!(matches!(Format::parse("int4_g48"), Err(Error::Unsupported(_))));
        let msg = Format::parse("q3").unwrap_err().to_string();
        assert!(msg.contains("int4_g128") && msg.contains("q4_K"), "{msg}");
        for t in ggml::block::GgmlType::ALL.iter().filter(|t| t.block_size() > 1) {
            let f = Format::Ggml(*t);
            assert_eq!(Format::parse(&f.name()).unwrap(), f);
            assert_eq!(f.bits_per_weight(2, t.block_size()), t.bits_per_weight());
        }
        assert_eq!(Format::parse("Q4_K").unwrap().name(), "q4_K");
        // every registry format has a Format: GGML types as Ggml, the others by name
        for f in registry::REGISTRY {
            assert_eq!(Format::parse(f.name()).unwrap().name(), f.name());
        }
        assert_eq!(Format::parse("NF4").unwrap(), Format::Packed("nf4"));
        assert_eq!(Format::parse("ternary").unwrap().bits_per_weight(2, 512), (512.0 / 4.0 + 4.0) * 8.0 / 512.0);
        assert_eq!(Format::parse("tq2_0").unwrap().bits_per_weight(1, 256), 66.0 * 8.0 / 256.0);
    }

    #[test]
    fn bits_per_weight_matches_layout() {
        assert_eq!(Format::F16.bits_per_weight(4, 8), 16.0);
        // 32 weights: 16 bytes of nibbles + 4 bytes scale + 1 byte zero point = 21 bytes
        assert_eq!(Format::Int4Grouped { group: 32 }.bits_per_weight(1, 32), 21.0 * 8.0 / 32.0);
    }
}
