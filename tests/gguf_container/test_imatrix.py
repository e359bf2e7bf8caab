import struct

import numpy as np
import pytest

from diffulex_edge.errors import CorruptFileError
from diffulex_edge.gguf import GGUFWriter, load_imatrix


def test_gguf_imatrix(tmp_path):
    p = tmp_path / "imatrix.gguf"
    w = GGUFWriter(p)
    w.add("general.type", "imatrix")
    s2 = np.arange(1, 9, dtype=np.float32).reshape(1, 8)
    w.add_tensor("blk.0.ffn_down.weight.in_sum2", s2, "F32")
    w.add_tensor("blk.0.ffn_down.weight.counts", np.array([4.0], np.float32), "F32")
    w.write()
    m = load_imatrix(p)
    np.testing.assert_allclose(m["blk.0.ffn_down.weight"], s2[0] / 4)


def test_legacy_dat(tmp_path):
    p = tmp_path / "imatrix.dat"
    name = b"blk.0.attn_q.weight"
    vals = np.array([2.0, 4.0, 6.0], np.float32)
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 2, 3) + vals.tobytes()
    blob += struct.pack("<i", 10) + struct.pack("<i", 4) + b"data"  # trailer
    p.write_bytes(blob)
    m = load_imatrix(p)
    np.testing.assert_allclose(m["blk.0.attn_q.weight"], vals / 2)
    p.write_bytes(blob[:20])
    with pytest.raises(CorruptFileError):
        load_imatrix(p)


def test_export_accepts_imatrix_path(tmp_path):
    from test_export import tiny_llama

    from diffulex_edge.export import export_gguf
    from diffulex_edge.gguf import GGUFFile

    name = b"blk.0.ffn_gate.weight"
    imp = np.exp(np.random.default_rng(0).standard_normal(256) * 2).astype(np.float32)
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 1, 256) + imp.tobytes()
    dat = tmp_path / "imatrix.dat"
    dat.write_bytes(blob)
    model = tiny_llama()
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export_gguf(model, a, quant="Q4_K_M")
    export_gguf(model, b, quant="Q4_K_M", imatrix=dat)
    w = model.model.layers[0].mlp.gate_proj.weight.detach().numpy()
    err = lambda p: float((((GGUFFile.read(p).tensor("blk.0.ffn_gate.weight") - w) ** 2) * imp).sum())
    assert err(b) < err(a)
