//! Arbitrary bytes through the GGUF reader, then every metadata value and tensor touched the way
//! a user of the header would: the metadata looked up by key, each tensor's bytes sliced out of
//! the image and decoded when its ggml type is one this build implements. Any panic, hang or
//! allocation out of proportion to the input is a bug in the reader.
#![no_main]

use diffulex_edge::formats::ggml::any as ggml_any;
use diffulex_edge::formats::ggml::block::GgmlType;
use diffulex_edge::gguf::reader::{read_bytes, tensor_data};
use diffulex_edge::gguf::Value;
use libfuzzer_sys::fuzz_target;

fn walk(v: &Value) -> usize {
    match v {
        Value::Array(t, items) => {
            items
                .iter()
                .map(|i| {
                    assert_eq!(i.value_type(), *t, "array element of the wrong type");
                    walk(i)
                })
                .sum::<usize>()
                + 1
        }
        Value::String(s) => s.len(),
        other => other.as_u64().map_or(1, |_| 2),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(h) = read_bytes(data) else { return };
    assert!(h.data_offset % h.alignment == 0);
    let mut touched = 0usize;
    for (k, v) in &h.metadata {
        assert!(h.get(k).is_some());
        touched += walk(v);
    }
    for t in &h.tensors {
        let bytes = tensor_data(&h, t, data).expect("a tensor the reader accepted must lie inside the file");
        assert_eq!(bytes.len() as u64, t.nbytes);
        let Some(ty) = GgmlType::from_id(t.ggml_type) else { continue };
        let n = t.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(usize::try_from(d).ok()?));
        let n = n.expect("the reader bounds the element count");
        if let Ok(w) = ggml_any::dequantize_ref(ty, bytes, n) {
            touched += w.len();
        }
    }
    std::hint::black_box(touched);
});
