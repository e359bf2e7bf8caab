import json

import pytest

from diffulex_edge import cli


@pytest.fixture
def text_file(tmp_path, wikitext_sample):
    p = tmp_path / "eval.txt"
    p.write_text(wikitext_sample[:6000])
    return str(p)


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("quantize", "eval", "compare", "info", "examples:"):
        assert cmd in out
    for sub in ("quantize", "eval", "compare", "info", "imatrix"):
        with pytest.raises(SystemExit):
            cli.main([sub, "--help"])
        assert "example" in capsys.readouterr().out


def test_unknown_option_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "x", "-o", "y", "--bits", "3"])
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_missing_files_are_clear_errors(capsys, tmp_path, text_file):
    assert cli.main(["quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path), "--text", text_file]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path / "nothing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def test_quantize_info_eval_compare(hf_model_dir, tmp_path, text_file, capsys):
    out = tmp_path / "q4"
    assert cli.main(["quantize", str(hf_model_dir), "--dtype", "int4", "--group-size", "32", "-o", str(out)]) == 0
    assert (out / "quantized.safetensors").exists() and (out / "tokenizer.json").exists()
    info = json.loads((out / "quantization.json").read_text())
    assert info["num_quantized_layers"] == 15 and info["config"]["group_size"] == 32
    capsys.readouterr()

    assert cli.main(["info", str(out)]) == 0
    assert "15 quantized layer(s): 15 x int4 g32" in capsys.readouterr().out
    assert cli.main(["info", str(hf_model_dir)]) == 0
    assert "not quantized" in capsys.readouterr().out

    js = tmp_path / "ppl.json"
    assert cli.main(["eval", str(out), "--text", text_file, "--seq-len", "64", "--max-tokens", "400",
                     "--reference", str(hf_model_dir), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["n_tokens"] == 399 and res["kl_divergence"] > 0 and 0 < res["top1_agreement"] <= 1

    html = tmp_path / "report.html"
    assert cli.main(["compare", str(hf_model_dir), "--text", text_file, "--schemes", "fp32,int8,int4-g32",
                     "--seq-len", "64", "--max-tokens", "300", "--html", str(html), "--json", str(tmp_path / "r.json"),
                     "--markdown", str(tmp_path / "r.md")]) == 0
    page = html.read_text()
    assert "data:image/png;base64," in page and "int4-g32" in page
    assert (tmp_path / "r.md").read_text().startswith("| scheme |")


def test_quantize_static_and_yaml(hf_model_dir, tmp_path, text_file, capsys):
    assert cli.main(["quantize", str(hf_model_dir), "--mode", "static", "-o", str(tmp_path / "s")]) == 2
    assert "--calibration" in capsys.readouterr().err
    assert cli.main(["quantize", str(hf_model_dir), "--mode", "static", "--calibration", text_file,
                     "-o", str(tmp_path / "s")]) == 0
    cfg = tmp_path / "q.yaml"
    cfg.write_text("dtype: int4\ngroup_size: 64\nexclude_layers: [lm_head]\n")
    assert cli.main(["quantize", str(hf_model_dir), "--config", str(cfg), "--exclude", "model.layers.0", "-o",
                     str(tmp_path / "y")]) == 0
    info = json.loads((tmp_path / "y" / "quantization.json").read_text())
    assert info["config"]["dtype"] == "int4" and info["config"]["group_size"] == 64
    assert info["num_quantized_layers"] == 7  # layer 1 only; lm_head and layer 0 excluded
    # a flag given explicitly wins over the file even when it names the CLI's default value
    assert cli.main(["quantize", str(hf_model_dir), "--config", str(cfg), "--dtype", "int8", "-o",
                     str(tmp_path / "z")]) == 0
    info = json.loads((tmp_path / "z" / "quantization.json").read_text())
    assert info["config"]["dtype"] == "int8"
    # --scheme: the grammar of compare --schemes; it too overrides the file
    assert cli.main(["quantize", str(hf_model_dir), "--config", str(cfg), "--scheme", "int4-g32-sym", "-o",
                     str(tmp_path / "w")]) == 0
    info = json.loads((tmp_path / "w" / "quantization.json").read_text())
    assert (info["config"]["dtype"], info["config"]["group_size"], info["config"]["symmetric"]) == ("int4", 32, True)
    assert cli.main(["quantize", str(hf_model_dir), "--scheme", "int4-g32", "--dtype", "int8", "-o",
                     str(tmp_path / "v")]) == 2
    assert "leave out --dtype" in capsys.readouterr().err
    assert cli.main(["quantize", str(hf_model_dir), "--scheme", "nf5", "-o", str(tmp_path / "v")]) == 2
    assert "unknown scheme 'nf5'" in capsys.readouterr().err
    assert cli.main(["quantize", str(hf_model_dir), "-o", str(hf_model_dir)]) == 2
    assert "must differ" in capsys.readouterr().err


def test_bundled_texts_by_name(hf_model_dir, tmp_path, capsys):
    """--text / --calibration take wikitext2-test / wikitext2-valid: the samples in the package."""
    js = tmp_path / "ppl.json"
    assert cli.main(["eval", str(hf_model_dir), "--text", "wikitext2-test", "--seq-len", "64", "--max-tokens", "200",
                     "--json", str(js)]) == 0
    assert json.loads(js.read_text())["n_tokens"] == 199
    assert cli.main(["quantize", str(hf_model_dir), "--mode", "static", "--calibration", "wikitext2-valid",
                     "-o", str(tmp_path / "s")]) == 0
    assert cli.main(["eval", str(hf_model_dir), "--text", "wikitext2-nope"]) == 2
    assert "not found" in capsys.readouterr().err


def test_train_command_qat_and_resume(hf_model_dir, tmp_path, wikitext_sample, capsys):
    from diffulex_edge.hf import load_model
    from diffulex_edge.quant.nn import QuantizedLinear

    text = tmp_path / "t.txt"
    text.write_text(wikitext_sample[:6000])
    out, ck = tmp_path / "o", tmp_path / "ck"
    args = ["train", str(hf_model_dir), "--text", str(text), "--eval-text", str(text), "--scheme", "int4-g32",
            "--lr", "1e-3", "--checkpoint-dir", str(ck), "-o", str(out)]
    assert cli.main(args + ["--steps", "3"]) == 0
    o = capsys.readouterr().out
    assert "before: eval perplexity" in o and "after (qat)" in o and "trained 3 steps" in o
    model, _ = load_model(str(out))
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 2 * 7 + 1
    assert cli.main(args + ["--steps", "5"]) == 0  # continues the saved run
    assert "resuming from" in capsys.readouterr().out
    cfg = tmp_path / "t.yaml"
    cfg.write_text("quantization_mode: null\nmax_steps: 2\nbatch_size: 2\nseq_len: 16\n")
    assert cli.main(["train", str(hf_model_dir), "--text", str(text), "--config", str(cfg), "-o", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "config.json").exists() and (tmp_path / "f" / "tokenizer.json").exists()
    assert cli.main(["train", str(hf_model_dir), "--text", str(text), "--config", str(tmp_path / "no.yaml"),
                     "-o", str(out)]) == 2
