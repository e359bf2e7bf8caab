import json

import numpy as np
import pytest

from diffulex_edge import cli


def test_gguf_command(hf_model_dir, tmp_path, capsys):
    from gguf import GGUFReader

    from diffulex_edge.gguf import GGUFFile

    out = tmp_path / "m.gguf"
    rep = tmp_path / "r.json"
    assert cli.main(["gguf", str(hf_model_dir), "-o", str(out), "--quant", "q8_0", "--override", r"ffn_down=F16",
                     "--report", str(rep)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "bits/weight" in printed
    f = GGUFFile.read(out)
    assert f.metadata["general.name"] == hf_model_dir.name
    assert f.tensors["blk.0.ffn_down.weight"].ggml_type == "F16"
    assert f.tensors["blk.0.ffn_up.weight"].ggml_type == "Q8_0"
    assert len(f.metadata["tokenizer.ggml.tokens"]) == f.metadata["llama.vocab_size"]
    doc = json.loads(rep.read_text())
    assert {t["name"] for t in doc["tensors"]} == set(f.tensors) and doc["quant"] == "Q8_0"
    r = GGUFReader(str(out))  # gguf-py reads it too
    assert len(r.tensors) == len(f.tensors)
    # --rtn gives gguf-py's bytes for Q8_0
    assert cli.main(["gguf", str(hf_model_dir), "-o", str(out), "--quant", "Q8_0", "--rtn"]) == 0
    from gguf import quants as gq
    from safetensors.numpy import load_file

    w = load_file(str(hf_model_dir / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"].astype(np.float32)
    ref = gq.quantize(w, gq.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(np.asarray(GGUFFile.read(out).tensor_bytes("blk.1.ffn_up.weight")), ref.reshape(-1))


@pytest.mark.parametrize("args,msg", [
    (["--override", "attn_v"], "REGEX=TYPE"),
    (["--quant", "Q4_K_Z"], "Q4_K_Z"),
    (["--imatrix", "nope.gguf"], "imatrix file not found"),
])
def test_gguf_command_errors(hf_model_dir, tmp_path, capsys, args, msg):
    out = tmp_path / "m.gguf"
    assert cli.main(["gguf", str(hf_model_dir), "-o", str(out), *args]) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_gguf_command_refuses_a_quantized_folder(hf_model_dir, tmp_path, capsys):
    q = tmp_path / "q"
    assert cli.main(["quantize", str(hf_model_dir), "--dtype", "int8", "-o", str(q)]) == 0
    assert cli.main(["gguf", str(q), "-o", str(tmp_path / "m.gguf")]) == 2
    assert "float model" in capsys.readouterr().err


def test_gguf_command_checks_arguments_before_loading(tmp_path, capsys):
    # a folder that is not a model at all: the bad --quant / --override is reported, not the folder
    d = tmp_path / "not-a-model"
    d.mkdir()
    assert cli.main(["gguf", str(d), "-o", str(tmp_path / "m.gguf"), "--quant", "Q4_K_Z"]) == 2
    assert "Q4_K_Z" in capsys.readouterr().err
    assert cli.main(["gguf", str(d), "-o", str(tmp_path / "m.gguf"), "--override", "attn=Q9"]) == 2
    assert "Q9" in capsys.readouterr().err


def test_checkpoint_export_writes_the_folder_tokenizer(hf_model_dir, tmp_path):
    """The out-of-core export (what `diffulex-quant gguf` runs on a safetensors folder) writes the
    same file as the in-memory export with the folder's tokenizer."""
    import hashlib

    import torch
    import transformers

    from diffulex_edge.export import export_gguf, export_gguf_checkpoint
    from diffulex_edge.gguf import GGUFFile

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf_model_dir)
    export_gguf(model, tmp_path / "a.gguf", "Q8_0", tokenizer=tok, name="n", show_progress=False)
    export_gguf_checkpoint(hf_model_dir, tmp_path / "b.gguf", "Q8_0", name="n", show_progress=False)
    digest = [hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in ("a.gguf", "b.gguf")]
    assert digest[0] == digest[1]
    assert "tokenizer.ggml.tokens" in GGUFFile.read(tmp_path / "b.gguf").metadata
