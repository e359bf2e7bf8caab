//! Replays the committed GGUF fuzz seeds and crash regressions (fuzz/seeds/gguf_reader,
//! fuzz/regressions/gguf_reader) through the reader the way the cargo-fuzz target does, so a
//! reader change that reintroduces a fuzz finding fails plain `cargo test`.

use std::fs;
use std::path::Path;

use diffulex_edge::formats::ggml::any as ggml_any;
use diffulex_edge::formats::ggml::block::GgmlType;
use diffulex_edge::gguf::reader::{read_bytes, tensor_data};

fn files(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut out: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

/// Parse and touch every tensor; Ok(tensor count) or the reader's error text.
fn replay(data: &[u8]) -> Result<usize, String> {
    let h = read_bytes(data).map_err(|e| e.to_string())?;
    for t in &h.tensors {
        let b = tensor_data(&h, t, data).map_err(|e| e.to_string())?;
        assert_eq!(b.len() as u64, t.nbytes);
        if let Some(ty) = GgmlType::from_id(t.ggml_type) {
            let n: u64 = t.dims.iter().product();
            let _ = ggml_any::dequantize_ref(ty, b, n as usize);
        }
    }
    Ok(h.tensors.len())
}

#[test]
fn seed_corpus_parses() {
    let seeds = files("fuzz/seeds/gguf_reader");
    assert!(seeds.len() >= 5, "seed corpus missing: run python3 fuzz/make_gguf_seeds.py");
    for (name, data) in &seeds {
        replay(data).unwrap_or_else(|e| panic!("seed {name} no longer parses: {e}"));
    }
}

#[test]
fn regressions_are_typed_errors() {
    // each file once crashed or was mis-accepted; now each must give a Corrupt error, no panic
    for (name, data) in files("fuzz/regressions/gguf_reader") {
        let r = std::panic::catch_unwind(|| replay(&data));
        match r {
            Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("regression {name} parsed ({n} tensors); expected a Corrupt error"),
            Err(_) => panic!("regression {name} panicked"),
        }
    }
}
