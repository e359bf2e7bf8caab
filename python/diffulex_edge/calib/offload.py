"""Models larger than memory for block-by-block calibration: the decoder blocks stay on the
``meta`` device (names and shapes only) and each is loaded from the checkpoint folder just before
the block-sequential pass (:mod:`.sequential`) runs it, and dropped right after. Everything
outside the blocks (embeddings, final norm, LM head, rotary tables) is loaded once. Peak memory is
those parts, one block and the calibration activations, whatever the number of blocks.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

ATTR = "_diffulex_offload"


class OffloadedBlocks:
    """Loads block `i`'s weights from a checkpoint folder into the model and drops them again."""

    def __init__(self, checkpoint, blocks_name: str, blocks: nn.ModuleList, dtype: torch.dtype):
        self.checkpoint = checkpoint
        self.blocks_name = blocks_name
        self.blocks = blocks
        self.dtype = dtype

    def _prefix(self, i: int) -> str:
        return f"{self.blocks_name}.{i}." if self.blocks_name else f"{i}."

    def load(self, i: int) -> None:
        block = self.blocks[i]
        if not any(p.is_meta for p in block.parameters()):
            return
        block.to_empty(device="cpu")
        _fill(block, self.checkpoint, self._prefix(i), self.dtype)
        log.debug("offload: loaded block %d", i)

    def release(self, i: int) -> None:
        self.blocks[i].to("meta")


def _fill(module: nn.Module, checkpoint, prefix: str, dtype: torch.dtype) -> None:
    """Copy every persistent tensor of `module` (named `prefix` + key in the checkpoint) from the
    checkpoint; a non-persistent buffer cannot be restored from a checkpoint and is refused."""
    persistent = set(module.state_dict().keys())
    with torch.no_grad():
        for key, t in module.state_dict(keep_vars=True).items():
            ref = checkpoint.get(prefix + key)
            if ref is None:
                raise ConfigError(f"{checkpoint.path}: no tensor {prefix + key!r} for the model's config", layer=prefix + key)
            if tuple(ref.shape) != tuple(t.shape):
                raise ConfigError(f"{checkpoint.path}: {prefix + key} is {list(ref.shape)}, the config makes it "
                                  f"{list(t.shape)}", layer=prefix + key)
            t.copy_(ref.load_torch().to(dtype if t.is_floating_point() else t.dtype))
    for name, b in module.named_buffers():
        if name not in persistent and b.is_meta:
            raise ConfigError(f"{prefix}{name} is a computed buffer that a checkpoint does not hold; this architecture "
                              "cannot run with offloaded blocks", layer=prefix + name)


def load_offloaded(model_dir: str, dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, Optional[object]]:
    """(model, tokenizer) of a Hugging Face folder with only the parts outside the decoder blocks
    in memory. Use it with :func:`~diffulex_edge.calib.compute_imatrix` and a ``checkpoint_dir``
    (the block-by-block pass loads each block when it runs it)."""
    from ..export.checkpoint import Checkpoint
    from ..export.stream import load_folder_tokenizer
    from .sequential import find_blocks

    ckpt = Checkpoint(os.fspath(model_dir))
    model = ckpt.skeleton()
    found = find_blocks(model)
    if found is None:
        raise ConfigError(f"{model_dir}: the model has no decoder blocks (a ModuleList of layers) to offload")
    blocks_name, blocks = found
    prefix = f"{blocks_name}."
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    # the modules outside the blocks: their own tensors from the checkpoint
    for name, module in list(model.named_modules()):
        if name == blocks_name or name.startswith(prefix) or name == "":
            continue
        own: Dict[str, torch.Tensor] = dict(module.named_parameters(recurse=False))
        own.update(dict(module.named_buffers(recurse=False)))
        if not own or not any(t.is_meta for t in own.values()):
            continue
        if tied and name == "lm_head":
            continue  # tied to the embedding, filled below
        persistent = set(module.state_dict().keys()) & set(own)
        computed = sorted(set(own) - persistent)
        if computed:  # e.g. rotary inverse frequencies: rebuilt from the config on the CPU
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            try:
                fresh = type(module)(config=model.config)
            except TypeError as e:
                raise ConfigError(f"{name} ({type(module).__name__}) has computed buffers {computed} and cannot be "
                                  "rebuilt from the config; this architecture cannot run offloaded") from e
            setattr(parent, child, fresh)
            module = fresh
            if not persistent:
                continue
        module.to_empty(device="cpu", recurse=False)
        for key in persistent:
            t = dict(module.named_parameters(recurse=False), **dict(module.named_buffers(recurse=False)))[key]
            ref = ckpt.get(f"{name}.{key}")
            if ref is None:
                raise ConfigError(f"{model_dir}: the checkpoint has no tensor {name}.{key!r}", layer=f"{name}.{key}")
            with torch.no_grad():
                t.copy_(ref.load_torch().to(dtype))
    if tied:
        model.tie_weights()
    setattr(model, ATTR, OffloadedBlocks(ckpt, blocks_name, blocks, dtype))
    model.eval()
    return model, load_folder_tokenizer(ckpt.path)


def offload_of(model: nn.Module) -> Optional[OffloadedBlocks]:
    return getattr(model, ATTR, None)


__all__ = ["OffloadedBlocks", "load_offloaded", "offload_of"]
