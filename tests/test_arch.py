"""diffulex_edge.arch: the one place calibration and export learn a model's architecture and
llama.cpp tensor names."""

from types import SimpleNamespace

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from diffulex_edge.arch import Arch, detect, gguf_tensor_name


def test_detect_by_class_and_by_config():
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    assert detect(LlamaForCausalLM(cfg)) == Arch("LlamaForCausalLM", "llama", True)
    wrapped = nn.Module()  # a wrapper class whose config names a supported architecture
    wrapped.config = SimpleNamespace(architectures=["Qwen2ForCausalLM"])
    assert detect(wrapped) == Arch("Qwen2ForCausalLM", "qwen2", False)
    assert detect(nn.Linear(2, 2)) is None
    other = nn.Module()
    other.config = SimpleNamespace(architectures=["GPT2LMHeadModel"])
    assert detect(other) is None
    assert detect(None) is None


def test_tensor_names():
    assert gguf_tensor_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert gguf_tensor_name("model.layers.0.mlp.down_proj.bias") == "blk.0.ffn_down.bias"
    assert gguf_tensor_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    assert gguf_tensor_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
