"""Quantization-aware training and fine-tuning of quantized models."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from diffulex_edge.errors import ConfigError
from diffulex_edge.qat import (
    LoRAQuantizedLinear,
    QATLinear,
    ScaleTunedLinear,
    Trainer,
    TrainingConfig,
    add_lora,
    compare_qat_ptq,
    fake_quantize_weight,
    merge_lora,
    prepare_qat,
    qat_layers,
    set_qat_enabled,
    train_scales,
)
from diffulex_edge.quant import QuantizationConfig, QuantizedLinear, quantize_
from diffulex_edge.testing import tiny_transformer

SCHEMES = ["int8", "int4-g32", "w8a8-dynamic", "q4_0", "q4_K", "nf4", "ternary", "tq2_0", "iq2_xxs"]


def model_256(seed=0):
    return tiny_transformer(seed=seed, vocab_size=64, dim=256, layers=1, heads=4)


def data(n=4000, vocab=64, seed=0):
    """A learnable token stream: a noisy repeating pattern."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) % 17
    noise = torch.randint(0, vocab, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.85
    return torch.where(keep, base, noise)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fake_quant_is_the_ptq_quantizer_with_a_straight_through_gradient(scheme):
    cfg = QuantizationConfig.from_scheme(scheme)
    lin = nn.Linear(256, 8)
    w = lin.weight.detach().clone().requires_grad_(True)
    wq = fake_quantize_weight(w, cfg)
    q = QuantizedLinear.from_linear(lin, cfg.dtype, group_size=cfg.group_size, symmetric=cfg.resolved_symmetric,
                                    act_mode=cfg.mode)
    assert torch.equal(wq.detach(), q.dequantize_weight())
    g = torch.randn_like(w)
    (wq * g).sum().backward()
    assert torch.equal(w.grad, g)  # straight through


@pytest.mark.parametrize("scheme", ["int4-g32", "q4_K", "ternary", "w8a8-dynamic"])
def test_convert_gives_the_bytes_of_ptq_on_the_trained_weights(scheme):
    m = model_256()
    prepare_qat(m, scheme)
    assert len(qat_layers(m)) == 7 + 1  # 7 per block + lm_head
    t = Trainer(m, TrainingConfig(quantization_mode="qat", quantization_scheme=scheme, max_steps=3, batch_size=2,
                                  seq_len=16, learning_rate=1e-3), data(), show_progress=False)
    t.fit()
    trained = copy.deepcopy(m)
    from diffulex_edge.qat import unwrap_qat

    unwrap_qat(trained)
    ptq = quantize_(trained, scheme, show_progress=False).model
    res = t.convert()
    assert res.num_quantized_layers == 8 and not qat_layers(m)
    for (n, a), (_, b) in zip(m.state_dict().items(), ptq.state_dict().items()):
        assert torch.equal(a, b), n
    # the QAT forward computed exactly what the converted model computes
    ids = data()[:32].reshape(2, 16)
    qat_again = copy.deepcopy(trained)
    prepare_qat(qat_again, scheme)
    with torch.no_grad():
        torch.testing.assert_close(qat_again.eval()(ids), m(ids), rtol=1e-4, atol=1e-4)


def test_qat_lowers_the_quantized_loss_more_than_ptq():
    """A few dozen QAT steps on a learnable stream beat PTQ of the same float model."""
    torch.manual_seed(0)
    m = model_256(seed=3)
    ids = data(6000)
    cfg = TrainingConfig(max_steps=60, batch_size=8, seq_len=32, learning_rate=3e-3)
    Trainer(m, cfg, ids, show_progress=False).fit()  # pretrain in float
    ev = ids[-2000:]
    ptq = copy.deepcopy(m)
    quantize_(ptq, "ternary", show_progress=False)
    qat = copy.deepcopy(m)
    t = Trainer(qat, TrainingConfig(quantization_mode="qat", quantization_scheme="ternary", max_steps=40, batch_size=8,
                                    seq_len=32, learning_rate=1e-3), ids[:-2000], eval_data=ev, show_progress=False)
    t.fit()
    t.convert()
    loss = lambda model: Trainer(model, cfg, None, eval_data=ev, show_progress=False).evaluate()["loss"]  # noqa: E731
    assert loss(qat) < loss(ptq)


def test_resume_reproduces_the_loss_curve_exactly(tmp_path):
    cfg = TrainingConfig(quantization_mode="qat", quantization_scheme="int4-g32", max_steps=8, batch_size=2, seq_len=16,
                         learning_rate=1e-3, warmup_steps=3, gradual_quantization_steps=4, quantization_noise=0.5,
                         distillation_weight=0.5)
    full = Trainer(model_256(), cfg, data(), show_progress=False)
    full.fit()
    a = Trainer(model_256(), cfg, data(), show_progress=False)
    a.fit(5)
    a.save_checkpoint(tmp_path / "t.pt")
    b = Trainer(model_256(), cfg, data(), show_progress=False)
    assert b.resume(tmp_path / "t.pt") == 5
    b.fit()
    assert [h["loss"] for h in b.history] == [h["loss"] for h in full.history]
    other = Trainer(model_256(), TrainingConfig(**{**cfg.to_dict(), "learning_rate": 5e-3}), data(), show_progress=False)
    with pytest.raises(ConfigError, match="learning_rate"):
        other.resume(tmp_path / "t.pt")


def test_gradual_quantization_and_noise():
    m = model_256()
    prepare_qat(m, "int4-g32", noise=0.25)
    assert set_qat_enabled(m, 0.5) == 4
    assert [q.enabled for q in qat_layers(m)] == [True] * 4 + [False] * 4
    q = qat_layers(m)[0]
    x = torch.randn(3, 256)
    q.train()
    torch.manual_seed(0)
    y = q(x)
    full = nn.functional.linear(x, q.quantized_weight(), q.bias)
    flt = nn.functional.linear(x, q.weight, q.bias)
    same_q = torch.isclose(y, full, atol=1e-5).all(0)
    same_f = torch.isclose(y, flt, atol=1e-5).all(0)
    assert bool((same_q | same_f).all()) and 0 < int(same_q.sum()) < 256  # some rows quantized, the rest float
    q.eval()
    assert torch.allclose(q(x), full)
    with pytest.raises(ConfigError, match="noise"):
        QATLinear(nn.Linear(32, 4), QuantizationConfig.from_scheme("int8"), noise=0)
    with pytest.raises(ConfigError, match="static"):
        prepare_qat(model_256(), "w8a8-static")


def test_finetuning_a_quantized_model_with_lora_keeps_it_quantized(tmp_path):
    torch.manual_seed(0)
    ids = data(6000)
    m = model_256(seed=1)
    cfg = TrainingConfig(quantization_mode="ptq", quantization_scheme="q4_0", enable_quantized_finetuning=True,
                         finetune_method="lora", lora_rank=4, max_steps=30, batch_size=8, seq_len=32, learning_rate=3e-3)
    t = Trainer(m, cfg, ids[:-2000], eval_data=ids[-2000:], show_progress=False)
    loras = [x for x in m.modules() if isinstance(x, LoRAQuantizedLinear)]
    assert len(loras) == 8 and all(not p.requires_grad for n, p in m.named_parameters() if "lora_" not in n)
    before = t.evaluate()["loss"]
    t.fit()
    after = t.evaluate()["loss"]
    assert after < before
    t.convert()  # adapters merged and re-quantized
    assert not any(isinstance(x, LoRAQuantizedLinear) for x in m.modules())
    qs = [x for x in m.modules() if isinstance(x, QuantizedLinear)]
    assert len(qs) == 8 and all(str(q.qdtype) == "q4_0" for q in qs)
    merged = Trainer(m, cfg.__class__(max_steps=1, batch_size=8, seq_len=32), None, eval_data=ids[-2000:],
                     show_progress=False).evaluate()["loss"]
    assert merged < before  # what the adapters learned survives the re-quantization
    from diffulex_edge.quant import load_quantized, save_quantized

    save_quantized(m, tmp_path / "m.safetensors")
    back = load_quantized(tmp_path / "m.safetensors", model_256(seed=1))
    with torch.no_grad():
        assert torch.equal(back(ids[:32].reshape(2, 16)), m(ids[:32].reshape(2, 16)))


def test_lora_starts_at_the_quantized_model_and_merges_exactly_when_zero():
    m = model_256()
    quantize_(m, "int8", show_progress=False)
    ids = data()[:32].reshape(2, 16)
    with torch.no_grad():
        want = m(ids)
    add_lora(m, rank=2)
    with torch.no_grad():
        assert torch.equal(m(ids), want)  # B = 0
    assert merge_lora(m) == 8
    with torch.no_grad():
        assert torch.equal(m(ids), want)
    with pytest.raises(ConfigError, match="quantize the model first"):
        add_lora(model_256())


def test_trainable_scales_update_the_quantized_layers():
    torch.manual_seed(0)
    ids = data(6000)
    m = model_256(seed=2)
    cfg = TrainingConfig(quantization_mode="ptq", quantization_bits=4, group_size=32, enable_quantized_finetuning=True,
                         finetune_method="scales", max_steps=25, batch_size=8, seq_len=32, learning_rate=1e-3)
    t = Trainer(m, cfg, ids[:-2000], eval_data=ids[-2000:], show_progress=False)
    tuned = [x for x in m.modules() if isinstance(x, ScaleTunedLinear)]
    codes = [x.base.qweight.clone() for x in tuned]
    scales = [x.base.scales.clone() for x in tuned]
    before = t.evaluate()["loss"]
    t.fit()
    assert t.evaluate()["loss"] < before
    size = sum(b.numel() * b.element_size() for b in m.buffers())
    t.convert()
    qs = [x for x in m.modules() if isinstance(x, QuantizedLinear)]
    assert [torch.equal(q.qweight, c) for q, c in zip(qs, codes)] == [True] * len(qs)  # codes unchanged
    assert any(not torch.equal(q.scales, s) for q, s in zip(qs, scales))  # scales trained
    assert sum(b.numel() * b.element_size() for b in m.buffers()) == size  # still the quantized size
    with pytest.raises(ConfigError, match="int8/int4"):
        train_scales(quantize_(model_256(), "q4_0", show_progress=False).model)


def test_training_config_defaults_yaml_and_checks(tmp_path):
    c = TrainingConfig()
    assert c.quantization_mode is None and not c.quantization_enabled and not c.enable_quantized_finetuning
    p = tmp_path / "t.yaml"
    p.write_text("training:\n  quantization_mode: qat\n  quantization_bits: 4\n  max_steps: 7\n")
    c = TrainingConfig.from_yaml(p)
    assert (c.quantization_mode, c.quantization_bits, c.max_steps, c.batch_size) == ("qat", 4, 7, 8)
    assert c.quantization_config().dtype.value == "int4" and c.quantization_config().group_size == 128
    assert TrainingConfig(quantization_mode="ptq", quantization_type="static").quantization_config().mode == "static"
    for bad, match in [({"quantization_mode": "int8"}, "quantization_mode"), ({"quantization_bits": 3}, "bits"),
                       ({"quantization_type": "weird"}, "quantization_type"),
                       ({"enable_quantized_finetuning": True}, "ptq"), ({"nope": 1}, "unknown")]:
        with pytest.raises(ConfigError, match=match):
            TrainingConfig.from_dict(bad)


def test_plain_training_and_hf_models():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg)
    ids = data(3000)
    t = Trainer(m, TrainingConfig(quantization_mode="qat", quantization_scheme="int8", max_steps=15, batch_size=4,
                                  seq_len=32, learning_rate=3e-3), ids, eval_data=ids[-500:], show_progress=False)
    first = t.training_step()
    t.fit()
    assert t.history[-1]["loss"] < first
    res = t.convert()
    assert res.num_quantized_layers == 8  # 7 per block + the untied lm_head


def test_compare_qat_ptq_reports_the_gap():
    torch.manual_seed(0)
    m = model_256(seed=3)
    ids = data(5000)
    Trainer(m, TrainingConfig(max_steps=40, batch_size=8, seq_len=32, learning_rate=3e-3), ids, show_progress=False).fit()
    r = compare_qat_ptq(m, "ternary", ids[:-1500], ids[-1500:], steps=20,
                        config=TrainingConfig(batch_size=8, seq_len=32, learning_rate=1e-3), eval_seq_len=64)
    assert set(r.ppl) == {"fp32", "ptq", "qat", "finetuned_fp32", "finetuned_ptq"}
    assert r.ppl["ptq"] > r.ppl["fp32"] and np.isfinite(r.gap_recovered)
    assert "QAT recovers" in r.table() and "QATComparison(" in repr(r)


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int4-g64-sym"])
def test_learned_scales_start_at_ptq_train_and_are_stored(scheme):
    m = model_256()
    ref = copy.deepcopy(m)
    prepare_qat(m, scheme, learn_scales=True)
    cfg = QuantizationConfig.from_scheme(scheme)
    layer = qat_layers(m)[0]
    ptq = QuantizedLinear.from_linear(ref.layers[0].attn.q if hasattr(ref.layers[0], "attn") else
                                      next(x for x in ref.modules() if isinstance(x, nn.Linear)),
                                      cfg.dtype, group_size=cfg.group_size, symmetric=cfg.resolved_symmetric)
    start = layer.quantized_weight().detach()
    # it starts on PTQ's grid (PTQ's scales and zero points) with round-to-nearest codes ...
    w, mine = layer.weight.detach(), layer.scale.detach()
    # PTQ's scales, through exp(log s): a few float32 ulps (2^-23 relative each)
    torch.testing.assert_close(mine, ptq.scales, rtol=4 * 2**-23, atol=0)
    if cfg.dtype.value == "int8":
        s, z, lo, hi = mine[:, None], ptq.zero_points.float()[:, None], -128, 127
    else:
        s = mine.repeat_interleave(cfg.group_size, 1)
        z, lo, hi = ptq.zeros.float().repeat_interleave(cfg.group_size, 1), 0, 15
    assert torch.equal(start, (torch.clamp(torch.round(w / s) + z, lo, hi) - z) * s)
    # ... so it differs from PTQ's own weights by at most one step (PTQ may refit a scale after rounding)
    assert bool(((start - ptq.dequantize_weight()).abs() <= s * 1.0001).all())
    scales0 = [q.scale.detach().clone() for q in qat_layers(m)]
    t = Trainer(m, TrainingConfig(quantization_mode="qat", quantization_scheme=scheme, learn_scales=True, max_steps=5,
                                  batch_size=4, seq_len=16, learning_rate=1e-3), data(), show_progress=False)
    t.fit()
    assert any(not torch.equal(q.scale.detach(), s) for q, s in zip(qat_layers(m), scales0))  # the scales trained
    ids = data()[:32].reshape(2, 16)
    with torch.no_grad():
        want = m.eval()(ids)
    learned = [q.scale.detach().clone() for q in qat_layers(m)]
    res = t.convert()
    qs = [x for x in m.modules() if isinstance(x, QuantizedLinear)]
    assert res.num_quantized_layers == len(qs) == 8
    assert all(torch.equal(q.scales, s) for q, s in zip(qs, learned))  # the learned scales are what is stored
    with torch.no_grad():
        torch.testing.assert_close(m(ids), want, rtol=1e-4, atol=1e-4)  # the model computes what QAT trained
    with pytest.raises(ConfigError, match="int8 / int4"):
        prepare_qat(model_256(), "q4_0", learn_scales=True)


def test_compare_without_the_control():
    from diffulex_edge.qat import QATComparison

    r = QATComparison("int8", 3, {"fp32": 10.0, "ptq": 12.0, "qat": 11.0})
    assert r.gap_recovered == pytest.approx(0.5) and np.isnan(r.gap_recovered_vs_control)
    assert "50.0% of PTQ's gap" in r.table() and "control" not in r.table().split("\n")[-1]
