import json

import pytest
import torch

from diffulex_edge.errors import ConfigError
from diffulex_edge.eval import (
    BenchmarkReport,
    SchemeResult,
    compare_schemes,
    disk_size_bytes,
    measure_latency,
    measure_speedup,
    parse_scheme,
)
from diffulex_edge.quant import INT8Quantizer, QuantizationConfig


def test_measure_latency_counts_and_statistics(bigram):
    calls = []
    bigram.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.zeros(2, 8, dtype=torch.long)
    r = measure_latency(bigram, ids, warmup=2, repetitions=5)
    assert len(calls) == 7 and r.repetitions == 5 and len(r.times_ms) == 5
    assert r.tokens_per_call == 16
    assert r.min_ms <= r.median_ms <= r.p90_ms <= max(r.times_ms)
    assert r.tokens_per_s == pytest.approx(1000 * 16 / r.median_ms)
    assert r.ms_per_token == pytest.approx(r.median_ms / 16)
    assert "tokens/s" in repr(r)
    assert measure_latency(bigram, (ids,), repetitions=1).tokens_per_call == 1
    with pytest.raises(ValueError):
        measure_latency(bigram, ids, repetitions=0)


def test_disk_size_tracks_quantization(bigram):
    fp32 = disk_size_bytes(bigram)
    q = INT8Quantizer().quantize(bigram).model
    assert disk_size_bytes(q) < fp32
    assert fp32 >= sum(p.numel() * 4 for p in bigram.parameters())


def test_parse_scheme():
    assert parse_scheme("fp32") == ("fp32", None)
    label, cfg = parse_scheme("int4-g64-sym", ["lm_head"])
    assert label == "int4-g64-sym" and cfg.group_size == 64 and cfg.symmetric is True and cfg.exclude_layers == ["lm_head"]
    assert parse_scheme("w8a8")[1].mode == "dynamic"
    assert parse_scheme("w8a8-static")[1].mode == "static"
    assert parse_scheme(QuantizationConfig(dtype="int4", group_size=32))[0] == "int4-g32"
    assert parse_scheme(("mine", None)) == ("mine", None)
    with pytest.raises(ConfigError, match="unknown scheme"):
        parse_scheme("int3")


def test_compare_schemes_report(bigram, tmp_path):
    ids = torch.randint(0, 64, (600,), generator=torch.Generator().manual_seed(0))
    report = compare_schemes(
        bigram, ["fp32", "fp16", "int8", "w8a8-static", "int4-g32"], ids, calibration=ids[:300], seq_len=64,
        latency_repetitions=2, show_progress=False,
    )
    assert [r.label for r in report.rows] == ["fp32", "fp16", "int8", "w8a8-static", "int4-g32"]
    ref = report.row("fp32")
    assert ref.ppl_delta == 0 and ref.compression == 1 and ref.speedup == 1
    for r in report.rows[1:]:
        assert r.size_bytes < ref.size_bytes and r.num_quantized_layers == 1
        assert r.kl_divergence >= -1e-9 and 0 <= r.top1_agreement <= 1
    # more bits, closer to the reference
    assert report.row("fp16").kl_divergence < report.row("int8").kl_divergence < report.row("int4-g32").kl_divergence
    front = report.pareto_frontier()
    assert front and all(r in report.rows for r in front)
    assert report.recommend(max_ppl_increase_pct=1e9).label == min(front, key=lambda r: r.size_bytes).label
    assert report.recommend(max_size_bytes=1) is None
    assert report.recommend().perplexity == min(r.perplexity for r in front)

    md = report.to_markdown(str(tmp_path / "r.md"))
    assert "| int4-g32 |" in md or "| **int4-g32** |" in md
    data = json.loads(report.to_json(str(tmp_path / "r.json")))
    assert len(data["rows"]) == 5 and data["meta"]["eval_tokens"] == 599
    page = report.to_html(str(tmp_path / "r.html"))
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page
    assert (tmp_path / "r.html").read_text() == page
    assert "BenchmarkReport(5 schemes)" in repr(report) and "<table>" in report._repr_html_()
    with pytest.raises(KeyError):
        report.row("nope")


def test_compare_schemes_errors(bigram):
    with pytest.raises(ConfigError, match="eval_text"):
        compare_schemes(bigram, ["fp32"])
    with pytest.raises(ConfigError, match="unique"):
        compare_schemes(bigram, ["int8", "int8"], torch.arange(100) % 64, latency_repetitions=0)


def test_pareto_and_recommend_on_handmade_rows():
    def row(label, size, ppl):
        return SchemeResult(label, None, size, 8.0, 1.0, ppl, ppl - 10.0, 0.0, 1.0, None, None, 0, 0.0)

    rep = BenchmarkReport([row("a", 100, 10.0), row("b", 50, 10.5), row("c", 60, 11.0), row("d", 25, 13.0)])
    assert [r.label for r in rep.pareto_frontier()] == ["d", "b", "a"]  # c is dominated by b
    assert rep.recommend(max_size_bytes=55).label == "b"
    assert rep.recommend(max_ppl_increase_pct=10).label == "b"  # +5% fits, d's +30% does not
    assert rep.recommend(max_size_bytes=30, max_ppl_increase_pct=10) is None
    assert "speed" not in rep.plots()


def test_measure_speedup_pairs_rounds_on_a_fake_clock(monkeypatch):
    import diffulex_edge.eval.latency as lat

    clock = {"t": 0.0}
    order = []

    class Costs(torch.nn.Module):
        def __init__(self, name, cost_s):
            super().__init__()
            self.name, self.cost = name, cost_s

        def forward(self, x):
            order.append(self.name)
            clock["t"] += self.cost
            return x

    monkeypatch.setattr(lat.time, "perf_counter", lambda: clock["t"])
    ref, fast = Costs("ref", 0.004), Costs("q", 0.001)
    ref.train()
    fast.eval()
    speedup, ms_ref, ms_q = measure_speedup(ref, fast, torch.zeros(1), warmup=1, rounds=4)
    assert speedup == pytest.approx(4.0) and ms_ref == pytest.approx(4.0) and ms_q == pytest.approx(1.0)
    # warm-up, then rounds alternating which model goes first
    assert order == ["ref", "q", "ref", "q", "q", "ref", "ref", "q", "q", "ref"]
    assert ref.training and not fast.training  # training flags restored
    with pytest.raises(ValueError, match="rounds"):
        measure_speedup(ref, fast, torch.zeros(1), rounds=0)
