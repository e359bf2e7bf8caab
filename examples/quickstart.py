"""Quickstart: quantize a model, inspect the result, save it, load it back, undo it.

Runs on CPU in a few seconds:  python examples/quickstart.py
"""

import os
import tempfile

import torch

from diffulex_edge.quant import (
    INT4Quantizer,
    QuantizationConfig,
    dequantize_model,
    get_quantization_info,
    load_quantized,
    quantize_model_ptq,
    save_quantized,
)
from diffulex_edge.testing import tiny_transformer

# 1. A model. Any torch.nn.Module with nn.Linear layers works; Hugging Face models too (below).
model = tiny_transformer(seed=0)
tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    reference = model(tokens)

# 2. A config, here from YAML (missing keys take defaults). Keep the LM head in full precision.
config = QuantizationConfig.from_yaml(
    """
dtype: int4
group_size: 64
exclude_layers: [lm_head]
"""
)
result = INT4Quantizer().quantize(model, config)
print(result)  # readable summary; in a notebook the result renders as an HTML table

with torch.inference_mode():
    out = result.model(tokens)
print(f"logits relative error vs FP32: {float((out - reference).norm() / reference.norm()):.3e}")

# 3. Save and load: the file stores the packed weights and the per-layer formats.
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "model-int4.safetensors")
    save_quantized(result.model, path)
    print(f"saved {os.path.getsize(path) / 2**20:.2f} MiB to {os.path.basename(path)}")
    restored = load_quantized(path, tiny_transformer(seed=123))  # any skeleton of the same architecture
    with torch.inference_mode():
        assert torch.equal(restored(tokens), out), "a loaded model computes exactly what was saved"

# 4. One-call post-training quantization: INT8 weights + static INT8 activations from calibration data.
calibration = [torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(8)]
w8a8 = quantize_model_ptq(model, quantization_bits=8, quantization_type="static", calibration_data=calibration)
info = get_quantization_info(w8a8)
print(f"PTQ: {info['num_quantized_layers']} layers at {info['bits']} bits ({info['mode']}), "
      f"{info['compression_ratio']:.2f}x smaller than FP32")

# 5. Back to plain float nn.Linear layers (e.g. to hand the model to a tool that knows no quantization).
plain = dequantize_model(w8a8)
assert not get_quantization_info(plain)["quantized"]

# 6. Hugging Face transformers models work the same way (built from a config; nothing downloaded).
try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    print("transformers not installed; skipping the Hugging Face part")
else:
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )).eval()
    q = INT4Quantizer().quantize(llama, QuantizationConfig(group_size=32))
    print(q.summary(max_layers=3))
    prompt = torch.tensor([[1, 17, 42, 99]])
    generated = q.model.generate(prompt, max_new_tokens=8, do_sample=False)
    print("generated token ids:", generated[0].tolist())
