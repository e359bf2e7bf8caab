"""peft's LoRA on QuantizedLinear layers through register_peft."""

import pytest
import torch

from diffulex_edge.errors import ConfigError
from diffulex_edge.quant import QuantizationConfig, QuantizedLinear, quantize_

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def quantized_llama(scheme="q4_0"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    m = transformers.LlamaForCausalLM(cfg)
    quantize_(m, scheme, show_progress=False)
    return m


@pytest.mark.parametrize("scheme", ["q4_0", "int4-g32", "int8"])
def test_get_peft_model_trains_adapters_and_merges_into_quantized_layers(scheme):
    import warnings

    from diffulex_edge.qat import register_peft

    m = quantized_llama(scheme)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unsupported layer type" warning from peft
        pm = peft.get_peft_model(m, register_peft(peft.LoraConfig(r=4, lora_alpha=8,
                                                                   target_modules=["q_proj", "v_proj", "down_proj"])))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(pm(ids).logits, ref)  # LoRA B starts at zero
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        out = pm(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]
    size = sum(b.numel() * b.element_size() for b in m.buffers())
    merged = pm.merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLinear) and layer.qdtype == QuantizationConfig.from_scheme(scheme).dtype
    assert sum(b.numel() * b.element_size() for b in merged.buffers()) == size  # still the quantized size
    with torch.no_grad():
        trained_loss = float(merged(ids, labels=ids).loss)
    assert trained_loss < losses[0]  # what the adapters learned survives the re-quantization


def test_variants_and_unmerge_are_refused():
    from diffulex_edge.qat import register_peft

    m = quantized_llama()
    with pytest.raises(ConfigError, match="vanilla LoRA"):
        peft.get_peft_model(m, register_peft(peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)))
    pm = peft.get_peft_model(quantized_llama(), register_peft(peft.LoraConfig(r=4, target_modules=["q_proj"])))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    layer.merge()
    with pytest.raises(ConfigError, match="unmerged"):
        layer.unmerge()
