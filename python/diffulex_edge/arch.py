"""The model architectures diffulex-edge maps to llama.cpp's conventions, in one place for every
user: calibration (the tensor names imatrix files use) and export (GGUF names, architecture
metadata, the Q/K permutation).

Tensor names follow llama.cpp's gguf-py (`MODEL_TENSORS` / `TENSOR_NAMES`, read for reference):
``token_embd``, ``blk.N.attn_q`` ... ``output``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

#: HF architecture class -> (GGUF architecture, permute Q/K the way convert_hf_to_gguf.py does)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}

_LAYER_MAP = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


class Arch(NamedTuple):
    """What a supported model is: its HF class name, GGUF architecture, and whether Q/K are permuted."""

    hf: str
    gguf: str
    permute_qk: bool


def detect(model) -> Optional[Arch]:
    """The supported architecture of a Hugging Face model (by its class, else by
    ``config.architectures``), or None for any other module (or a model without a ``config``)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    cls = type(model).__name__
    candidates = [cls] + list(getattr(cfg, "architectures", None) or [])
    hf = next((a for a in candidates if a in ARCHITECTURES), None)
    return None if hf is None else Arch(hf, *ARCHITECTURES[hf])


def gguf_tensor_name(hf_name: str) -> Optional[str]:
    """HF parameter name -> llama.cpp tensor name (None for buffers llama.cpp does not use)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers":
        module, kind = ".".join(parts[3:-1]), parts[-1]
        if module in _LAYER_MAP and kind in ("weight", "bias"):
            return f"blk.{int(parts[2])}.{_LAYER_MAP[module]}.{kind}"
    return None
