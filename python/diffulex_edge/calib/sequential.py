"""Layer-by-layer calibration with checkpoints.

The model's decoder blocks (the longest ``nn.ModuleList`` whose members hold Linear layers) are
run one at a time over all calibration batches: the inputs of block 0 are captured once, then
block i turns every batch's hidden state into block i+1's input while hooks on its Linear layers
feed the statistics. After each block the statistics and the hidden states are written to
``checkpoint_dir`` (temporary file + rename), so an interrupted run resumes after the last
completed block. Linear layers outside the blocks (e.g. ``lm_head``) are measured by one last
pass in which every block replays the stored output of the final block.

Statistics are accumulated batch by batch in the same order as a plain forward pass, so a resumed
run gives bit-identical results.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._io import atomic_write
from ..errors import ConfigError
from ..quant.act_stats import ActivationStats, CollectedStats, StatsHooks
from ..quant.calib_data import CalibrationDataset, run_batch

STATE = "state.pt"
INPUTS = "inputs.pt"
FORMAT = "diffulex-edge/calibration-checkpoint/1"


class _Stop(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


def find_blocks(model: nn.Module) -> Optional[Tuple[str, nn.ModuleList]]:
    """The longest ModuleList whose every member contains an nn.Linear (the decoder blocks)."""
    best: Optional[Tuple[str, nn.ModuleList]] = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and all(
            any(isinstance(c, nn.Linear) for c in b.modules()) for b in m
        ):
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    return best


def _hidden(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> Tuple[tuple, dict]:
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


class _Replay(nn.Module):
    """Stands in for a block in the final pass: returns the stored output of the last block for
    the current batch, and forwards attribute reads (e.g. ``attention_type``) to the block."""

    def __init__(self, block: nn.Module, outputs: List[Any], cursor: List[int]) -> None:
        super().__init__()
        self.__dict__["_block"] = block
        self.__dict__["_outputs"] = outputs
        self.__dict__["_cursor"] = cursor

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._outputs[self._cursor[0]]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


def fingerprint(model: nn.Module, calib: CalibrationDataset, names: Sequence[str], extra: str = "") -> str:
    """Identifies a run: layer names and shapes, and the bytes of every calibration input."""
    h = hashlib.sha256(extra.encode())
    for n in names:
        m = model.get_submodule(n)
        h.update(f"{n}:{getattr(m, 'in_features', '')}x{getattr(m, 'out_features', '')};".encode())

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(str((tuple(x.shape), x.dtype)).encode())
            h.update(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict) or hasattr(x, "keys"):
            for k in sorted(x.keys()):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())

    for b in calib:
        feed(b)
    return h.hexdigest()


def _save(path: str, obj: Any) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"{path}: unreadable calibration checkpoint ({e}); delete the directory to start over") from e


def _capture_inputs(model: nn.Module, blocks: nn.ModuleList, calib: CalibrationDataset) -> Tuple[List[Tuple[tuple, dict]], Optional[torch.Tensor]]:
    """Block 0's (args, kwargs) for every batch, and block 1's input hidden state for the first
    batch (to check that the model feeds each block's output straight to the next one)."""
    captured: List[Tuple[tuple, dict]] = []
    second: List[torch.Tensor] = []

    def first_hook(_m, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        if len(blocks) == 1 or second:
            raise _Stop

    def second_hook(_m, args, kwargs):
        second.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        raise _Stop

    handles = [blocks[0].register_forward_pre_hook(first_hook, with_kwargs=True)]
    if len(blocks) > 1:
        handles.append(blocks[1].register_forward_pre_hook(second_hook, with_kwargs=True))
    try:
        for batch in calib.progress("calibrate: block inputs"):
            try:
                run_batch(model, batch)
            except _Stop:
                continue
    finally:
        for h in handles:
            h.remove()
    if len(captured) != len(calib):
        raise ConfigError(f"the decoder blocks ran on {len(captured)} of {len(calib)} batches; cannot calibrate layer by layer")
    return captured, (second[0] if second else None)


def run_sequential(
    model: nn.Module, calib: CalibrationDataset, names: Sequence[str], checkpoint_dir: str, *, extra: str = "",
    show_progress: Optional[bool] = None,
) -> CollectedStats:
    """Collect input statistics of `names` block by block, checkpointing after each block."""
    found = find_blocks(model)
    if found is None:
        raise ConfigError("no decoder blocks (an nn.ModuleList of layers holding Linear modules) to checkpoint between; "
                          "pass checkpoint_dir=None")
    blocks_name, blocks = found
    prefix = f"{blocks_name}." if blocks_name else ""
    per_block: List[List[str]] = [[] for _ in blocks]
    others: List[str] = []
    for n in names:
        rest = n[len(prefix):] if n.startswith(prefix) else None
        idx = rest.split(".", 1)[0] if rest else None
        if idx is not None and idx.isdigit() and int(idx) < len(blocks):
            per_block[int(idx)].append(n)
        else:
            others.append(n)
    os.makedirs(checkpoint_dir, exist_ok=True)
    state_path, inputs_path = os.path.join(checkpoint_dir, STATE), os.path.join(checkpoint_dir, INPUTS)
    fp = fingerprint(model, calib, names, extra)
    stats = CollectedStats()
    next_block, outputs, inputs = 0, None, None
    if os.path.exists(state_path):
        st = _load(state_path)
        if st.get("format") != FORMAT or st.get("fingerprint") != fp:
            raise ConfigError(f"{checkpoint_dir} holds a checkpoint of a different model, layer set or calibration data; "
                              "delete it or choose another checkpoint_dir")
        next_block, outputs = st["next_block"], st["outputs"]
        stats.inputs = {n: ActivationStats.from_state(s) for n, s in st["stats"].items()}
        if st.get("done"):
            return stats
    from .offload import offload_of

    offload = offload_of(model)  # blocks loaded from a checkpoint folder one at a time (load_offloaded)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if next_block < len(blocks):
                if offload is not None and next_block == 0:
                    offload.load(0)
                if os.path.exists(inputs_path):
                    saved = _load(inputs_path)
                    if saved.get("fingerprint") != fp:
                        raise ConfigError(f"{inputs_path} belongs to another run; delete {checkpoint_dir}")
                    inputs = saved["inputs"]
                else:
                    inputs, check = _capture_inputs(model, blocks, calib)
                    if check is not None:
                        args, kwargs = inputs[0]
                        if not torch.equal(_hidden(blocks[0](*args, **kwargs)), check):
                            raise ConfigError(
                                f"{blocks_name or 'the model'} changes the hidden state between its blocks, so blocks "
                                "cannot be replayed one at a time; pass checkpoint_dir=None"
                            )
                    _save(inputs_path, {"format": FORMAT, "fingerprint": fp, "inputs": inputs})
            it = range(next_block, len(blocks))
            if show_progress is not False and len(it) > 1:
                from tqdm.auto import tqdm

                it = tqdm(it, desc="calibrate: layers", unit="layer", disable=None if show_progress is None else False, leave=False)
            for i in it:
                new_outputs = []
                if offload is not None:
                    offload.load(i)
                with StatsHooks(model, per_block[i], stats):
                    for b, (args, kwargs) in enumerate(inputs):
                        if i > 0:
                            args, kwargs = _with_hidden(args, kwargs, _hidden(outputs[b]))
                        new_outputs.append(blocks[i](*args, **kwargs))
                if offload is not None:
                    offload.release(i)
                outputs = new_outputs
                _save(state_path, {"format": FORMAT, "fingerprint": fp, "next_block": i + 1, "outputs": outputs,
                                   "stats": {n: s.state() for n, s in stats.inputs.items()}})
            if others:
                cursor = [0]
                originals = list(blocks)
                try:
                    for j, blk in enumerate(originals):
                        blocks[j] = _Replay(blk, outputs, cursor)
                    with StatsHooks(model, others, stats):
                        for b, batch in enumerate(calib.progress("calibrate: remaining layers")):
                            cursor[0] = b
                            run_batch(model, batch)
                finally:
                    for j, blk in enumerate(originals):
                        blocks[j] = blk
            _save(state_path, {"format": FORMAT, "fingerprint": fp, "next_block": len(blocks), "outputs": None,
                               "done": True, "stats": {n: s.state() for n, s in stats.inputs.items()}})
    finally:
        model.train(was_training)
    return stats
