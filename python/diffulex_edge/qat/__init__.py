"""Quantization-aware training and fine-tuning of quantized models.

>>> from diffulex_edge.qat import Trainer, TrainingConfig
>>> cfg = TrainingConfig(quantization_mode="qat", quantization_scheme="int4-g128", max_steps=200, learning_rate=1e-4)
>>> t = Trainer(model, cfg, train_data="train.txt", eval_data="valid.txt", tokenizer=tok)
>>> t.fit(); t.save_checkpoint("run/trainer.pt")   # Trainer(...).resume("run/trainer.pt") continues exactly
>>> result = t.convert()                           # the QuantizedLinear layers PTQ makes of the trained weights

Pieces: :func:`prepare_qat` / :func:`convert` (fake quantization with the PTQ quantizer of any
format, straight-through gradients), :func:`add_lora` / :func:`merge_lora` and
:func:`train_scales` / :func:`merge_scales` (fine-tuning that keeps the model quantized),
:func:`compare_qat_ptq` (how much of PTQ's perplexity gap QAT recovers).
"""

from .compare import QATComparison, compare_qat_ptq
from .fake_quant import QATLinear, fake_quantize_weight
from .finetune import LoRAQuantizedLinear, ScaleTunedLinear, add_lora, merge_lora, merge_scales, train_scales
from .peft_support import register_peft
from .prepare import convert, prepare_qat, qat_layers, set_qat_enabled, unwrap_qat
from .trainer import Trainer, TrainingConfig

__all__ = ["LoRAQuantizedLinear", "QATComparison", "QATLinear", "ScaleTunedLinear", "Trainer", "TrainingConfig",
           "add_lora", "compare_qat_ptq", "convert", "fake_quantize_weight", "merge_lora", "merge_scales",
           "prepare_qat", "qat_layers", "register_peft", "set_qat_enabled", "train_scales", "unwrap_qat"]
