"""LoRA from `peft` on diffulex-edge quantized layers.

peft's LoRA wraps the layer types it knows (nn.Linear, bitsandbytes, GPTQ, ...); for others it
takes a custom LoRA layer class through ``LoraConfig._register_custom_module`` (peft's "custom
models" API). :func:`register_peft` registers :class:`PeftLoraQuantizedLinear` for
:class:`~diffulex_edge.quant.QuantizedLinear`, so the usual peft workflow runs on a quantized model::

    from peft import LoraConfig, get_peft_model
    cfg = register_peft(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(quantized_model, cfg)       # only the adapters train
    ...
    model = model.merge_and_unload()                   # adapters folded in, layers re-quantized

Vanilla LoRA only (no DoRA / aLoRA / other variants: refused with a clear error). Merging
re-quantizes the layer in its own format, which rounds: it cannot be undone exactly, so
``unmerge`` raises.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedFormatError
from ..quant.nn import QuantizedLinear
from .finetune import requantized_with


def _peft():
    try:
        from peft.tuners.lora.layer import LoraLayer
        from peft.tuners.tuners_utils import check_adapters_to_merge
    except ImportError as e:
        raise UnsupportedFormatError("peft support needs peft: pip install peft") from e
    return LoraLayer, check_adapters_to_merge


def _layer_class():
    LoraLayer, check_adapters_to_merge = _peft()

    class PeftLoraQuantizedLinear(nn.Module, LoraLayer):
        """peft LoRA layer on a frozen :class:`QuantizedLinear` (vanilla LoRA)."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1,
                     **kwargs) -> None:
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module: nn.Module):
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            return base.in_features, base.out_features

        def resolve_lora_variant(self, *, config: Any, **kwargs):
            variants = [n for n in ("use_dora", "velora_config", "arrow_config", "alora_invocation_tokens")
                        if getattr(config, n, None)]
            if variants:
                raise ConfigError(f"LoRA on QuantizedLinear supports vanilla LoRA only; the config asks for {variants}")
            return None

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            return (b @ a) * self.scaling[adapter]

        def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
            adapter_names = check_adapters_to_merge(self, adapter_names)
            base = self.get_base_layer()
            for name in adapter_names:
                if name not in self.lora_A.keys():
                    continue
                if self.lora_bias.get(name):
                    raise ConfigError("lora_bias=True cannot be merged into a QuantizedLinear")
                try:
                    q = requantized_with(base, self.get_delta_weight(name))
                except ConfigError as e:
                    raise ConfigError(f"adapter {name}: {e}") from None
                with torch.no_grad():  # in place: the same buffers, new values (shapes are the format's)
                    for key, buf in q.named_buffers():
                        getattr(base, key).copy_(buf)
                self.merged_adapters.append(name)

        def unmerge(self) -> None:
            raise ConfigError("a LoRA merged into a QuantizedLinear was re-quantized and cannot be unmerged exactly; "
                              "keep the adapters unmerged (or reload the model) to change them")

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            base = self.get_base_layer()
            with torch.no_grad():  # the base is frozen: its (native) matmul needs no graph
                result = base(x.detach())
            if self.disable_adapters or self.merged:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A.keys():
                    continue
                lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                xa = self._cast_input_dtype(x, lora_a.weight.dtype)
                result = result + lora_b(lora_a(self.lora_dropout[name](xa))).to(result.dtype) * self.scaling[name]
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return PeftLoraQuantizedLinear


_CLASS = None


def peft_layer_class():
    """The peft LoRA layer class for QuantizedLinear (built on first use: peft is optional)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _layer_class()
    return _CLASS


def register_peft(lora_config):
    """Register the QuantizedLinear LoRA layer on a ``peft.LoraConfig``; returns the config."""
    if not hasattr(lora_config, "_register_custom_module"):
        raise UnsupportedFormatError(f"expected a peft LoraConfig (with _register_custom_module), got "
                                     f"{type(lora_config).__name__}; peft >= 0.14 has it")
    lora_config._register_custom_module({QuantizedLinear: peft_layer_class()})
    return lora_config


__all__ = ["peft_layer_class", "register_peft"]
