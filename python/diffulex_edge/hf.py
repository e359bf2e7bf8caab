"""Local Hugging Face model folders (config.json + safetensors + tokenizer): load a float or a
quantized model, save a quantized one next to its config and tokenizer. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional, Tuple

from torch import nn

from .errors import ConfigError, UnsupportedFormatError

QUANTIZED_WEIGHTS = "quantized.safetensors"
QUANTIZATION_INFO = "quantization.json"
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


def _require_dir(path: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face model folder")
    return path


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a test dependency
        raise UnsupportedFormatError("loading model folders needs `transformers`: pip install 'diffulex-edge[hf]'") from e
    return transformers


def is_quantized_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, QUANTIZED_WEIGHTS))


def load_tokenizer(path: str) -> Optional[Any]:
    """The folder's tokenizer (``tokenizers.Tokenizer`` from tokenizer.json, else a HF
    AutoTokenizer), or None if it has none."""
    tj = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tj):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(tj)
    try:
        return _transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None


def load_model(path: str, dtype: str = "float32") -> Tuple[nn.Module, Optional[Any]]:
    """(model in eval mode, tokenizer or None) from a float HF folder or one written by
    :func:`save_quantized_pretrained`. ``dtype``: float models' parameter dtype ("auto" keeps the
    checkpoint's, e.g. bf16, at half the memory of float32)."""
    path = _require_dir(path)
    tf = _transformers()
    if is_quantized_dir(path):
        from .quant.serialization import load_quantized

        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        skeleton = tf.AutoModelForCausalLM.from_config(config)
        model = load_quantized(os.path.join(path, QUANTIZED_WEIGHTS), skeleton)
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model.eval(), load_tokenizer(path)


def copy_model_files(source_dir: str, out_dir: str, *, overwrite: bool = True) -> None:
    """Copy the source folder's config, generation config and tokenizer files into `out_dir`
    (those it has; with ``overwrite=False`` files already in `out_dir` are kept)."""
    for name in _COPY:
        src, dst = os.path.join(source_dir, name), os.path.join(out_dir, name)
        if os.path.isfile(src) and (overwrite or not os.path.exists(dst)):
            shutil.copyfile(src, dst)


def save_quantized_pretrained(model: nn.Module, out_dir: str, source_dir: str, info: Optional[dict] = None) -> None:
    """Write `model`'s quantized weights plus the source folder's config and tokenizer files."""
    from .quant.serialization import save_quantized

    if os.path.abspath(out_dir) == os.path.abspath(source_dir):
        raise ConfigError("the output folder must differ from the model folder (the original would be overwritten)")
    os.makedirs(out_dir, exist_ok=True)
    copy_model_files(source_dir, out_dir)
    save_quantized(model, os.path.join(out_dir, QUANTIZED_WEIGHTS))
    if info is not None:
        with open(os.path.join(out_dir, QUANTIZATION_INFO), "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)
