import os

import numpy as np

from diffulex_edge import cli
from diffulex_edge.calib import ImportanceMatrix
from diffulex_edge.hf import load_model


def test_imatrix_command_and_quantize_with_it(hf_model_dir, tmp_path, wikitext_sample, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(wikitext_sample[:8000])
    out = tmp_path / "im.dat"
    assert cli.main(["imatrix", str(hf_model_dir), "--text", str(text), "-o", str(out), "--samples", "128", "--seq-len", "8"]) == 0
    assert "wrote" in capsys.readouterr().out
    model, _ = load_model(hf_model_dir)
    im = ImportanceMatrix.load(out, model)
    assert "model.layers.0.mlp.down_proj" in im and np.all(im["model.layers.0.mlp.down_proj"] >= 0)
    q = tmp_path / "q"
    assert cli.main(["quantize", str(hf_model_dir), "--dtype", "int4", "--group-size", "32", "--imatrix", str(out),
                     "-o", str(q)]) == 0
    assert os.path.isdir(q)
    assert cli.main(["quantize", str(hf_model_dir), "--dtype", "int4", "--imatrix", str(tmp_path / "nope.gguf"), "-o", str(q)]) == 2
    assert "imatrix file not found" in capsys.readouterr().err
    assert cli.main(["imatrix", str(hf_model_dir), "--text", str(tmp_path / "nope.txt"), "-o", str(out)]) == 2


def test_imatrix_command_offloaded_equals_in_memory(hf_model_dir, tmp_path, wikitext_sample):
    text = tmp_path / "calib.txt"
    text.write_text(wikitext_sample[:8000])
    args = ["--text", str(text), "--samples", "128", "--seq-len", "8", "--batch-size", "16"]
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert cli.main(["imatrix", str(hf_model_dir), "-o", str(a), "--checkpoint-dir", str(tmp_path / "ca"), *args]) == 0
    assert cli.main(["imatrix", str(hf_model_dir), "-o", str(b), "--offload", *args]) == 0
    assert os.path.isdir(str(b) + ".ckpt")  # the block-by-block checkpoint, resumable
    model, _ = load_model(hf_model_dir)
    ia, ib = ImportanceMatrix.load(a, model), ImportanceMatrix.load(b, model)
    assert set(ia) == set(ib)
    for n in ia:
        np.testing.assert_array_equal(ia[n], ib[n], err_msg=n)
