use super::reader::read_bytes;
use super::writer::{write_bytes, TensorData};
use super::*;
use proptest::prelude::*;

fn sample_metadata() -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("u8".into(), Value::U8(7)),
        ("i8".into(), Value::I8(-7)),
        ("u16".into(), Value::U16(65535)),
        ("i16".into(), Value::I16(-300)),
        ("u32".into(), Value::U32(4_000_000_000)),
        ("i32".into(), Value::I32(-5)),
        ("f32".into(), Value::F32(1.5e-5)),
        ("bool".into(), Value::Bool(true)),
        ("u64".into(), Value::U64(u64::MAX)),
        ("i64".into(), Value::I64(i64::MIN)),
        ("f64".into(), Value::F64(std::f64::consts::PI)),
        (
            "tokens".into(),
            Value::Array(ValueType::String, vec![Value::String("<s>".into()), Value::String("héllo".into())]),
        ),
        (
            "nested".into(),
            Value::Array(ValueType::Array, vec![Value::Array(ValueType::I32, vec![Value::I32(1), Value::I32(2)])]),
        ),
        ("empty".into(), Value::Array(ValueType::F32, vec![])),
    ]
}

fn sample_file() -> Vec<u8> {
    let a: Vec<u8> = (0..34u8).collect(); // one Q8_0 block
    let b: Vec<u8> = (0..16u8).collect(); // [2, 2] f32
    let tensors = vec![
        TensorData { name: "blk.0.attn_q.weight".into(), dims: vec![32, 1], ggml_type: 8, data: &a },
        TensorData { name: "norm".into(), dims: vec![2, 2], ggml_type: 0, data: &b },
    ];
    write_bytes(&sample_metadata(), &tensors).unwrap()
}

#[test]
fn round_trip_every_value_type() {
    let bytes = sample_file();
    let h = read_bytes(&bytes).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.metadata, sample_metadata());
    assert_eq!(h.tensors.len(), 2);
    assert_eq!(h.data_offset % 32, 0);
    let t = &h.tensors[1];
    assert_eq!((t.offset, t.nbytes), (64, 16));
    let start = (h.data_offset + t.offset) as usize;
    assert_eq!(&bytes[start..start + 16], &(0..16u8).collect::<Vec<_>>()[..]);
    assert_eq!(bytes.len() as u64 % 32, 0);
}

#[test]
fn custom_alignment() {
    let mut md = sample_metadata();
    md.push((ALIGNMENT_KEY.into(), Value::U32(64)));
    let d = [0u8; 4];
    let bytes = write_bytes(&md, &[TensorData { name: "x".into(), dims: vec![1], ggml_type: 0, data: &d }]).unwrap();
    let h = read_bytes(&bytes).unwrap();
    assert_eq!(h.alignment, 64);
    assert_eq!(h.data_offset % 64, 0);
    md.pop();
    md.push((ALIGNMENT_KEY.into(), Value::U32(48)));
    assert!(write_bytes(&md, &[]).is_err());
}

#[test]
fn writer_rejects_inconsistent_input() {
    let d = [0u8; 5];
    let md = sample_metadata();
    assert!(matches!(
        write_bytes(&md, &[TensorData { name: "x".into(), dims: vec![1], ggml_type: 0, data: &d }]),
        Err(Error::Shape(_))
    ));
    let bad = vec![("a".into(), Value::Array(ValueType::U8, vec![Value::I8(1)]))];
    assert!(write_bytes(&bad, &[]).is_err());
    let dup = vec![("a".into(), Value::U8(1)), ("a".into(), Value::U8(2))];
    assert!(write_bytes(&dup, &[]).is_err());
}

#[test]
fn stream_writer_equals_one_shot_writer_and_cleans_up() {
    use super::writer::{write_file, StreamWriter, TensorSpec};
    let dir = std::env::temp_dir().join(format!("diffulex-gguf-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("m.gguf");
    let a: Vec<u8> = (0..34u8).collect();
    let b: Vec<u8> = (0..16u8).collect();
    let specs = vec![
        TensorSpec { name: "blk.0.attn_q.weight".into(), dims: vec![32, 1], ggml_type: 8 },
        TensorSpec { name: "norm".into(), dims: vec![2, 2], ggml_type: 0 },
    ];
    let leftovers = || std::fs::read_dir(&dir).unwrap().filter(|e| e.as_ref().unwrap().file_name() != "m.gguf").count();
    // streamed == one shot, byte for byte
    let mut w = StreamWriter::create(&target, &sample_metadata(), &specs).unwrap();
    assert_eq!(w.next_tensor(), Some("blk.0.attn_q.weight"));
    w.write_tensor("blk.0.attn_q.weight", &a).unwrap();
    w.write_tensor("norm", &b).unwrap();
    w.finish().unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), sample_file());
    assert_eq!(leftovers(), 0);
    // out of order, wrong size, too many, unfinished: errors; the old file survives, no temp file stays
    let mut w = StreamWriter::create(&target, &sample_metadata(), &specs).unwrap();
    assert!(w.write_tensor("norm", &b).unwrap_err().to_string().contains("out of order"));
    assert!(matches!(w.write_tensor("blk.0.attn_q.weight", &a[..33]), Err(Error::Shape(_))));
    w.write_tensor("blk.0.attn_q.weight", &a).unwrap();
    assert!(w.finish().unwrap_err().to_string().contains("\"norm\""));
    assert_eq!(leftovers(), 0);
    let mut w = StreamWriter::create(&target, &sample_metadata(), &specs).unwrap();
    w.write_tensor("blk.0.attn_q.weight", &a).unwrap();
    w.write_tensor("norm", &b).unwrap();
    assert!(w.write_tensor("norm", &b).is_err());
    drop(w); // dropped without finish: an interrupted export
    assert_eq!(std::fs::read(&target).unwrap(), sample_file());
    assert_eq!(leftovers(), 0);
    // a one-shot write with a bad length fails before creating anything
    let bad = [TensorData { name: "x".into(), dims: vec![4], ggml_type: 0, data: &b[..8] }];
    assert!(matches!(write_file(&dir.join("n.gguf"), &sample_metadata(), &bad), Err(Error::Shape(_))));
    assert!(!dir.join("n.gguf").exists());
    assert_eq!(leftovers(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn layout_places_tensors_where_the_stream_writer_does() {
    use super::writer::{layout, StreamWriter, TensorSpec};
    let a: Vec<u8> = (0..34u8).collect();
    let b: Vec<u8> = (0..16u8).collect();
    let specs = vec![
        TensorSpec { name: "blk.0.attn_q.weight".into(), dims: vec![32, 1], ggml_type: 8 },
        TensorSpec { name: "norm".into(), dims: vec![2, 2], ggml_type: 0 },
    ];
    let l = layout(&sample_metadata(), &specs).unwrap();
    let mut w = StreamWriter::in_memory(&sample_metadata(), &specs).unwrap();
    w.write_tensor("blk.0.attn_q.weight", &a).unwrap();
    w.write_tensor("norm", &b).unwrap();
    let want = w.into_bytes().unwrap();
    // header, then each tensor at its offset, zeros elsewhere: the same bytes
    let mut got = vec![0u8; l.file_len as usize];
    got[..l.header.len()].copy_from_slice(&l.header);
    for (data, off) in [(&a, l.data_offsets[0]), (&b, l.data_offsets[1])] {
        let at = l.header.len() + off as usize;
        got[at..at + data.len()].copy_from_slice(data);
    }
    assert_eq!(l.sizes, vec![34, 16]);
    assert_eq!(got, want);
    assert_eq!(got, sample_file());
    // invalid specs are refused as by the writer
    let dup = vec![specs[1].clone(), specs[1].clone()];
    assert!(layout(&sample_metadata(), &dup).is_err());
}

#[test]
fn every_truncation_is_a_corrupt_error() {
    let bytes = sample_file();
    let h = read_bytes(&bytes).unwrap();
    // only the padding after the last tensor may be cut without losing data
    let end = h.tensors.iter().map(|t| h.data_offset + t.offset + t.nbytes).max().unwrap() as usize;
    for n in 0..bytes.len() {
        match read_bytes(&bytes[..n]) {
            Err(Error::Corrupt(_)) if n < end => {}
            Ok(_) if n >= end => {}
            other => panic!("truncated to {n} (data ends at {end}): {other:?}"),
        }
    }
}

#[test]
fn huge_counts_do_not_allocate() {
    let mut bytes = sample_file();
    // tensor count, kv count, first key length
    for off in [8usize, 16, 24] {
        let mut b = bytes.clone();
        b[off..off + 8].copy_from_slice(&(u64::MAX / 3).to_le_bytes());
        assert!(matches!(read_bytes(&b), Err(Error::Corrupt(_))), "offset {off}");
    }
    bytes[0] = b'X';
    assert!(read_bytes(&bytes).unwrap_err().to_string().contains("magic"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn random_corruption_never_panics(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let mut b = sample_file();
        let n = b.len();
        for (i, v) in flips {
            b[i % n] ^= v | 1;
        }
        match read_bytes(&b) {
            Ok(h) => {
                for t in &h.tensors {
                    prop_assert!(h.data_offset + t.offset + t.nbytes <= n as u64);
                }
            }
            Err(Error::Corrupt(_)) => {}
            Err(e) => prop_assert!(false, "unexpected error kind {:?}", e),
        }
    }
}
