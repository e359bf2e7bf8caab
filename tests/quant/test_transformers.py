"""End to end on a tiny randomly initialised transformers Llama (nothing is downloaded).

Logit error bound. Write each quantized weight as W + dW with ||dW||_F <= e ||W||_F, where e is the
largest per-layer relative weight error the quantizer measured (``result.max_weight_rel_error``;
its size is set by the format: <= 2^-11 for fp16, ~step/sqrt(12) of the range for int8/int4, and the
format tests bound it element-wise). To first order a perturbed Linear changes its output by
dW x, of relative size ~e for inputs that are not aligned with dW. On the way to the logits a
token passes through ``S = 1 + 4 * num_layers`` Linear stages in sequence (per layer: q/k/v -> o and
gate/up -> down, feeding the residual stream; then lm_head). Independent per-stage errors add in
quadrature, and RMSNorm/SiLU/softmax change their size by at most a small factor (we allow 2), so

    ||logits_q - logits|| / ||logits|| <= 2 * sqrt(S) * e.

The bound is checked for every format, and the measured errors are printed (run ``pytest -s``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from diffulex_edge.quant import (  # noqa: E402
    BF16Quantizer,
    FP16Quantizer,
    INT4Quantizer,
    INT8Quantizer,
    QuantizedLinear,
    dequantize_model,
    get_quantization_info,
    load_quantized,
    quantize_model_ptq,
    save_quantized,
)

NUM_LAYERS = 2
STAGES = 1 + 4 * NUM_LAYERS
EPS32 = float(torch.finfo(torch.float32).eps)


def llama_config(**kw) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **kw,
    )


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 24), generator=g)


@pytest.fixture(scope="module")
def fp32_logits(llama, tokens):
    with torch.no_grad():
        return llama(tokens).logits


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = {
    "FP16": (FP16Quantizer, {}),
    "BF16": (BF16Quantizer, {}),
    "INT8": (INT8Quantizer, {}),
    "INT8-asym": (INT8Quantizer, {"symmetric": False}),
    "INT8-w8a8-dynamic": (INT8Quantizer, {"mode": "dynamic"}),
    "INT4-g32": (INT4Quantizer, {"group_size": 32}),
    "INT4-g64": (INT4Quantizer, {"group_size": 64}),
    "INT4-g64-sym": (INT4Quantizer, {"group_size": 64, "symmetric": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_close_to_fp32(llama, tokens, fp32_logits, case):
    quantizer, cfg = CASES[case]
    res = quantizer().quantize(llama, cfg)
    linears = [n for n, m in llama.named_modules() if isinstance(m, nn.Linear)]
    assert res.num_quantized_layers == len(linears) == 7 * NUM_LAYERS + 1
    assert not res.skipped
    with torch.no_grad():
        logits = res.model(tokens).logits
    assert bool(torch.isfinite(logits).all())
    err = rel(logits, fp32_logits)
    e = res.max_weight_rel_error
    if cfg.get("mode") == "dynamic":
        # activations are rounded too, with a step of absmax/127 per token: same order as the weights
        e = e + 1 / (127 * math.sqrt(3))
    bound = 2 * math.sqrt(STAGES) * e
    print(
        f"\n[tiny Llama] {case:<18} logits rel. error {err:.3e}  (max weight rel. error {res.max_weight_rel_error:.3e}, "
        f"bound {bound:.3e}; size {res.original_size_bytes} -> {res.quantized_size_bytes} B, "
        f"{res.memory_reduction_pct:.1f}% less)"
    )
    assert err <= bound
    # the greedy next token mostly survives; chance agreement would be 1/256 (random logits are
    # nearly tied, so a few flips are expected even for fine formats)
    agree = (logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean().item()
    assert agree >= 0.5


def test_error_grows_as_the_format_narrows(llama, tokens, fp32_logits):
    errs = {}
    for name in ("FP16", "INT8", "INT4-g64"):
        quantizer, cfg = CASES[name]
        with torch.no_grad():
            errs[name] = rel(quantizer().quantize(llama, cfg).model(tokens).logits, fp32_logits)
    assert errs["FP16"] < errs["INT8"] < errs["INT4-g64"]


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_generate_greedy(llama, tokens, bits):
    q = quantize_model_ptq(llama, bits, "weight_only", group_size=32)
    prompt = tokens[:1, :6]
    with torch.no_grad():
        out = q.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (1, 11) and torch.equal(out[:, :6], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < 256
    # greedy decoding is deterministic
    with torch.no_grad():
        again = q.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(out, again)


def test_tied_lm_head_is_skipped_with_a_reason(tokens):
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    res = INT8Quantizer().quantize(model)
    assert type(res.model.lm_head) is nn.Linear
    assert "tied to model.embed_tokens.weight" in res.skipped["lm_head"]
    assert res.num_quantized_layers == 7 * NUM_LAYERS
    assert res.model.lm_head.weight is res.model.model.embed_tokens.weight
    with torch.no_grad():
        ref_logits = model(tokens).logits
        logits = res.model(tokens).logits
    assert rel(logits, ref_logits) <= 2 * math.sqrt(STAGES) * res.max_weight_rel_error
    # the size counts the shared matrix once
    assert res.original_size_bytes == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_dequantize_model_equivalence(llama, tokens, bits):
    q = quantize_model_ptq(llama, bits, "weight_only", group_size=64)
    with torch.no_grad():
        logits_native = q(tokens).logits
    # the torch path of the quantized model: same math in torch ops (taken when autograd is on)
    with torch.enable_grad():
        emb = q.model.embed_tokens(tokens).detach().requires_grad_(True)
        logits_torch = q(inputs_embeds=emb).logits.detach()
    deq = dequantize_model(q)
    assert not any(isinstance(m, QuantizedLinear) for m in deq.modules())
    lin = [m for m in deq.modules() if isinstance(m, nn.Linear)]
    assert len(lin) == 7 * NUM_LAYERS + 1 and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in lin)
    assert get_quantization_info(deq)["quantized"] is False
    with torch.no_grad():
        logits_deq = deq(tokens).logits
    # identical weights, float32 everywhere: only summation order differs
    assert rel(logits_deq, logits_torch) <= 1e3 * EPS32
    assert rel(logits_deq, logits_native) <= 1e3 * EPS32
    # in place
    assert dequantize_model(q, inplace=True) is q
    assert not any(isinstance(m, QuantizedLinear) for m in q.modules())


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_save_load_llama(tmp_path, llama, tokens, ext):
    q = quantize_model_ptq(llama, 4, "weight_only", group_size=32)
    save_quantized(q, tmp_path / f"llama{ext}")
    torch.manual_seed(123)
    skeleton = LlamaForCausalLM(llama_config()).eval()
    loaded = load_quantized(tmp_path / f"llama{ext}", skeleton)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, q(tokens).logits)
    info = get_quantization_info(loaded)
    assert info["bits"] == 4 and info["num_quantized_layers"] == 7 * NUM_LAYERS + 1
