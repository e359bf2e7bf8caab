import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from diffulex_edge.calib import CalibrationDataset
from diffulex_edge.data import wikitext2
from diffulex_edge.errors import ConfigError
from diffulex_edge.quant.calib_data import as_calibration, run_batch

# the in-tree package, as the test process imports it (for a child interpreter)
PKG = os.path.dirname(os.path.dirname(os.path.abspath(__import__("diffulex_edge").__file__)))


def test_text_with_tokenizer_gives_consecutive_windows(tokenizer):
    path = wikitext2("valid", sample=True)
    ds = CalibrationDataset(path, tokenizer, n_samples=128, seq_len=32, batch_size=4, show_progress=False)
    assert ds.n_samples == 128 and len(ds) == 32
    batches = list(ds)
    assert all(b.shape == (4, 32) and b.dtype == torch.long for b in batches)
    stream = torch.cat([b.reshape(-1) for b in batches])
    with open(path, encoding="utf-8") as fh:
        head = fh.read(20000)
    want = tokenizer.encode(head).ids[:64]
    # the first window is the start of the tokenized file
    assert stream[:32].tolist() == want[:32]
    # a list of texts and a path-like behave the same
    from pathlib import Path

    ds2 = CalibrationDataset([Path(path)], tokenizer, n_samples=128, seq_len=32, batch_size=4, show_progress=False)
    assert torch.equal(torch.cat(list(ds2)), torch.cat(batches))


def test_sample_count_is_validated():
    ids = torch.arange(10_000) % 50
    for bad in (64, 2000, True, 12.5):
        with pytest.raises(ConfigError, match="n_samples"):
            CalibrationDataset(ids, n_samples=bad)
    with pytest.raises(ConfigError, match="seq_len"):
        CalibrationDataset(ids, n_samples=None, seq_len=0)
    with pytest.warns(UserWarning, match="fewer than n_samples=128"):
        ds = CalibrationDataset(ids, n_samples=128, seq_len=100)
    assert ds.n_samples == 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CalibrationDataset(ids, n_samples=None, seq_len=100).n_samples == 100


def test_token_tensors_dataloaders_and_errors():
    rows = torch.randint(0, 50, (300, 8))
    ds = CalibrationDataset(rows, n_samples=256, batch_size=100)
    assert ds.n_samples == 256 and [b.shape[0] for b in ds] == [100, 100, 56]
    loader = DataLoader(TensorDataset(rows), batch_size=64)
    ds2 = CalibrationDataset(loader, n_samples=128)
    assert ds2.n_samples == 128 and len(ds2) == 2  # whole batches, stops once enough samples
    dicts = [{"input_ids": rows[:4]}, {"input_ids": rows[4:8]}]
    assert CalibrationDataset(dicts, n_samples=None).n_samples == 8
    with pytest.raises(ConfigError, match="tokenizer"):
        CalibrationDataset("some text", n_samples=None)
    with pytest.raises(ConfigError, match="integer ids"):
        CalibrationDataset(torch.randn(4, 8), n_samples=None)
    with pytest.raises(ConfigError, match="fewer than one window"):
        CalibrationDataset(torch.arange(5), n_samples=None, seq_len=8)
    with pytest.raises(ConfigError, match="shape"):
        CalibrationDataset(torch.zeros(2, 2, 2, dtype=torch.long), n_samples=None)
    with pytest.raises(ConfigError, match="empty"):
        CalibrationDataset([], n_samples=None)
    with pytest.raises(ConfigError, match="text, a token tensor"):
        CalibrationDataset(42, n_samples=None)
    with pytest.raises(ConfigError, match="required"):
        as_calibration(None)


def test_callable_tokenizer_and_progress(capsys):
    ds = CalibrationDataset("a b c d e f g h", lambda t: [ord(c) for c in t], n_samples=None, seq_len=4,
                            show_progress=True)
    assert ds.n_samples == 3 and ds[0].tolist() == [[97, 32, 98, 32]]
    assert len(list(ds.progress("x"))) == 3
    assert "CalibrationDataset(n_samples=3" in repr(ds)
    with pytest.raises(ConfigError, match="encode"):
        CalibrationDataset("abc", tokenizer=3, n_samples=None)


def test_run_batch_forms():
    seen = []

    class M(torch.nn.Module):
        def forward(self, a, b=None):
            seen.append((a, b))
            return a

    m = M()
    run_batch(m, torch.ones(1))
    run_batch(m, (torch.ones(1), 2))
    run_batch(m, {"a": 1, "b": 3})
    assert [s[1] for s in seen] == [None, 2, 3]


def test_quant_never_imports_calib():
    """quant is the lower layer: it owns the data a quantizer consumes (calibration datasets,
    activation statistics, ImportanceMatrix) and calib re-exports them; quantizing with static
    activation scales and an imatrix loads nothing from calib."""
    code = (
        "import sys, torch\n"
        "from diffulex_edge.quant import ImportanceMatrix, QuantizationConfig, quantize_\n"
        "m = torch.nn.Sequential(torch.nn.Linear(32, 8))\n"
        "quantize_(m, QuantizationConfig(dtype='int8', mode='static'), calibration_data=[torch.randn(2, 32)])\n"
        "quantize_(torch.nn.Sequential(torch.nn.Linear(32, 8)), 'q4_0', imatrix={'0': torch.ones(32).numpy()})\n"
        "bad = [k for k in sys.modules if k.startswith('diffulex_edge.calib')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": PKG})
    import diffulex_edge.calib as calib
    import diffulex_edge.quant as quant

    for name in ("CalibrationDataset", "ImportanceMatrix"):
        assert getattr(quant, name) is getattr(calib, name)


def test_missing_text_file_is_an_error_not_a_text(tokenizer, tmp_path):
    # a fresh clone once fed "…/valid.txt" (absent) to the tokenizer as 30 tokens of text
    for missing in (str(tmp_path / "valid.txt"), "data/valid.txt", tmp_path / "none"):
        with pytest.raises(FileNotFoundError, match="not found"):
            CalibrationDataset(missing, tokenizer, n_samples=None, seq_len=4)
    # texts without a newline are still texts
    ds = CalibrationDataset("the cat sat on the mat and the dog sat on the log", tokenizer, n_samples=None, seq_len=4)
    assert ds.n_samples >= 2


def test_bundled_wikitext_samples_are_prefixes_of_the_splits(monkeypatch, tmp_path):
    for split in ("test", "valid"):
        with open(wikitext2(split, sample=True), encoding="utf-8") as fh:
            text = fh.read()
        assert len(text) > 150_000 and text.startswith(" \n = ")
        full = tmp_path / f"{split}.txt"
        full.write_text(text + " = Next article = \n", encoding="utf-8")
    monkeypatch.setenv("DIFFULEX_EDGE_WIKITEXT2", str(tmp_path))
    assert wikitext2("test") == str(tmp_path / "test.txt")
    assert wikitext2("test", sample=True) != str(tmp_path / "test.txt")
    monkeypatch.setenv("DIFFULEX_EDGE_WIKITEXT2", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="DIFFULEX_EDGE_WIKITEXT2"):
        wikitext2("valid")
    with pytest.raises(ConfigError, match="split"):
        wikitext2("train", sample=True)
