import torch

from diffulex_edge import demo
from diffulex_edge.testing import TinyTransformerLM, tiny_transformer


def test_tiny_transformer_is_deterministic_and_mostly_linear():
    a, b = tiny_transformer(seed=3, dim=64, layers=2, vocab_size=100), tiny_transformer(seed=3, dim=64, layers=2, vocab_size=100)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    state = torch.random.get_rng_state()
    tiny_transformer(seed=4)
    assert torch.equal(state, torch.random.get_rng_state()), "building a model must not disturb the global RNG"
    linear = sum(m.weight.numel() for m in a.modules() if isinstance(m, torch.nn.Linear))
    assert linear / sum(p.numel() for p in a.parameters()) > 0.7
    assert isinstance(a, TinyTransformerLM) and not a.training
    assert a(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 100)
    assert a.layers[0].mlp.gate_proj.out_features % 256 == 0


def test_demo_runs_and_orders_errors(capsys):
    assert demo.main(["--dim", "64", "--layers", "2", "--vocab", "128", "--seq", "16", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    for label, _ in demo.SCHEMES:
        assert label in out
    rows = {r["scheme"]: r for r in demo.run(dim=64, layers=2, vocab=128, seq=16, reps=1)}
    assert rows["FP32 (reference)"]["rel_error"] == 0
    assert rows["FP16"]["rel_error"] < rows["INT8 (weight-only)"]["rel_error"] < rows["INT4 g128"]["rel_error"]
    assert rows["INT4 g32"]["compression"] > rows["INT8 (weight-only)"]["compression"] > rows["FP16"]["compression"] > 1


def test_demo_latencies_are_positive_and_speedup_is_relative_to_fp32():
    rows = demo.run(dim=64, layers=1, vocab=64, seq=8, reps=2)
    assert rows[0]["speedup"] == 1.0
    for r in rows:
        assert r["latency_ms"] > 0
        assert abs(r["speedup"] - rows[0]["latency_ms"] / r["latency_ms"]) < 1e-12
