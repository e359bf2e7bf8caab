import numpy as np
import pytest
import torch
from calib_models import tiny_hf_llama
from torch import nn

from diffulex_edge.calib import SmoothQuantConfig, smooth_model, smoothquant_w8a8
from diffulex_edge.errors import ConfigError, UnsupportedFormatError
from diffulex_edge.quant import INT8Quantizer, QuantizationConfig, QuantizedLinear
from diffulex_edge.testing import tiny_transformer

EPS32 = float(np.finfo(np.float32).eps)
# Smoothing rescales each smoothed weight and norm entry once (one float32 rounding each); the
# rounding errors pass through two blocks, attention and the head, so the output moves by a small
# multiple of eps. 64 eps covers that with margin; a wrong fold would be off by O(1).
EQUIV_RTOL = 64 * EPS32


def rel(a, b):
    return float((a - b).norm() / b.norm())


def logits(model, x):
    out = model(x)
    return getattr(out, "logits", out)


def plant_outliers(model, norms, n=4, factor=40.0, seed=0):
    """Scale a few channels of each norm: those activation channels become outliers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in norms:
            idx = torch.randperm(norm.weight.numel(), generator=g)[:n]
            norm.weight[idx] *= factor


def calib_ids(vocab, n=8, t=32, seed=0):
    ids = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
    return [ids[i:i + 2] for i in range(0, n, 2)]


def llama_with_outliers():
    m = tiny_hf_llama(hidden=128, inter=256, layers=2)
    plant_outliers(m, [n for layer in m.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)])
    return m


def test_smoothing_alone_is_equivalent_and_leaves_the_input_alone():
    m = llama_with_outliers()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    calib = calib_ids(96)
    rep = smooth_model(m, calib, SmoothQuantConfig(alpha=0.5))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # a copy was smoothed
    assert [g.norm for g in rep.groups] == [
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
    ]
    assert rep.groups[0].layers == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                    "model.layers.0.self_attn.v_proj"]
    x = torch.randint(0, 96, (3, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert rel(logits(rep.model, x), logits(m, x)) <= EQUIV_RTOL
    g = rep.groups[0]
    assert g.outlier_ratio_after < g.outlier_ratio_before / 4 and not g.flagged
    assert g.scales.shape == (128,) and g.scale_range[0] > 0
    assert "scales" in str(rep) and "4 norm(s) smoothed" in str(rep)


def test_smoothquant_w8a8_beats_plain_w8a8_on_planted_outliers():
    m = llama_with_outliers()
    calib = calib_ids(96)
    x = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(7))
    plain = INT8Quantizer().quantize(m, QuantizationConfig(dtype="int8", mode="dynamic")).model
    res, rep = smoothquant_w8a8(m, calib)
    assert all(q.act_mode == "dynamic" for q in res.model.modules() if isinstance(q, QuantizedLinear))
    with torch.no_grad():
        y = logits(m, x)
        e_plain, e_sq = rel(logits(plain, x), y), rel(logits(res.model, x), y)
    print(f"W8A8 dynamic logits rel. error: plain {e_plain:.4f}, SmoothQuant {e_sq:.4f}")
    assert e_sq < 0.7 * e_plain
    # static activation scales, calibrated after smoothing
    res_s, _ = smoothquant_w8a8(m, calib, quant_config={"dtype": "int8", "mode": "static", "observer": "percentile"})
    plain_s = INT8Quantizer().quantize(m, QuantizationConfig(dtype="int8", mode="static", observer="percentile"),
                                       calibration_data=calib).model
    with torch.no_grad():
        e_plain_s, e_sq_s = rel(logits(plain_s, x), y), rel(logits(res_s.model, x), y)
    print(f"W8A8 static (percentile) logits rel. error: plain {e_plain_s:.4f}, SmoothQuant {e_sq_s:.4f}")
    assert e_sq_s < e_plain_s
    with pytest.raises(ConfigError, match="W8A8"):
        smoothquant_w8a8(m, calib, quant_config={"dtype": "int8"})


def test_opt_and_gpt2_layouts_are_equivalent_after_smoothing():
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                   max_position_embeddings=64, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                      eos_token_id=2)).eval()
    plant_outliers(opt, [layer.self_attn_layer_norm for layer in opt.model.decoder.layers])
    plant_outliers(gpt2, [b.ln_1 for b in gpt2.transformer.h])
    x = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    for model, want in ((opt, ["self_attn_layer_norm", "final_layer_norm"]), (gpt2, ["ln_1", "ln_2"])):
        rep = smooth_model(model, calib_ids(64, t=16))
        assert [g.norm.rsplit(".", 1)[-1] for g in rep.groups] == want * 2
        with torch.no_grad():
            assert rel(logits(rep.model, x), logits(model, x)) <= EQUIV_RTOL
    # GPT-2's Conv1D layers became nn.Linear, so W8A8 covers them
    res, _ = smoothquant_w8a8(gpt2, calib_ids(64, t=16))
    assert isinstance(res.model.transformer.h[0].attn.c_attn, QuantizedLinear)
    post = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                                    max_position_embeddings=32, word_embed_proj_dim=32, do_layer_norm_before=False,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    with pytest.raises(UnsupportedFormatError, match="do_layer_norm_before"):
        smooth_model(post, calib_ids(64, t=8))


def test_report_flags_remaining_outliers_and_config_validation():
    m = tiny_transformer(vocab_size=64, dim=64, layers=1, heads=4)
    rep = smooth_model(m, calib_ids(64, t=16), SmoothQuantConfig(alpha=0.0, outlier_ratio=1.01))
    assert rep.flagged and any("larger alpha" in w for w in rep.warnings)
    assert "outliers remain" in str(rep)
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ConfigError, match="alpha"):
            SmoothQuantConfig(alpha=bad)
    with pytest.raises(ConfigError, match="outlier_ratio"):
        SmoothQuantConfig(outlier_ratio=1)
    with pytest.raises(ConfigError, match="mappings"):
        SmoothQuantConfig(mappings=[("norm", "fc")])
    with pytest.raises(ConfigError, match="SmoothQuantConfig"):
        smooth_model(m, calib_ids(64), {"alpha": 0.5})


class NoAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8, elementwise_affine=False)
        self.fc = nn.Linear(8, 8)
        self.wide = nn.Linear(4, 8)

    def forward(self, x):
        return self.fc(self.norm(x))


def test_explicit_mappings_and_their_errors():
    m = NoAffine()
    data = [torch.randn(4, 8)]
    with pytest.raises(UnsupportedFormatError, match="no norm"):
        smooth_model(m, data)
    with pytest.raises(UnsupportedFormatError, match="per-channel weight"):
        smooth_model(m, data, SmoothQuantConfig(mappings=[("norm", ["fc"])]))
    with pytest.raises(ConfigError, match="does not have"):
        smooth_model(m, data, SmoothQuantConfig(mappings=[("norm", ["nope"])]))
    with pytest.raises(UnsupportedFormatError, match="nn.Linear"):
        smooth_model(m, data, SmoothQuantConfig(mappings=[("norm", ["norm"])]))
    with pytest.raises(ConfigError, match="different widths"):
        smooth_model(m, data, SmoothQuantConfig(mappings=[("norm", ["fc", "wide"])]))
    unused = nn.ModuleDict({"norm": nn.LayerNorm(8), "fc": nn.Linear(8, 8)})
    unused.forward = lambda x: x * 2  # never reaches fc
    with pytest.warns(UserWarning, match="saw no input"):
        rep = smooth_model(unused, [torch.randn(2, 8)], SmoothQuantConfig(mappings=[("norm", ["fc"])]))
    assert rep.groups == [] and "left unsmoothed" in rep.warnings[0]
