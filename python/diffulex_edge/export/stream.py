"""GGUF export of checkpoints larger than memory, resumable, on one machine or a Ray cluster.

:func:`export_gguf_checkpoint` reads a Hugging Face folder (sharded safetensors) one tensor at a
time: the model is built on the ``meta`` device (names, shapes, config; no weights), planned as
:func:`~.gguf_export.plan_gguf` plans an in-memory model, and each tensor is memory-mapped,
converted to float32, encoded and written at its final offset by a
:class:`~diffulex_edge.gguf.resumable.ResumableGGUFWriter`. Peak memory is about the largest
tensor in float32 plus its encoding, whatever the model's size, and the file's bytes are those
:func:`~.gguf_export.export_gguf` writes for the same model loaded in memory.

With ``executor="ray"`` the tensors are Ray tasks (each reads its tensor from the checkpoint by
path, so every node must see the folder at the same path) and the driver is the one writer: it
keeps a bounded window of tasks in flight and writes their results in order, so the output is
byte-identical to the single-process run. A task whose worker dies is retried by Ray
(``max_retries``), as is one that fails with an ``OSError``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from .._progress import byte_progress
from ..errors import ConfigError, QuantizationError, UnsupportedFormatError
from ..gguf.file import GGUFWriter, _gguf_dims, _type_id
from ..gguf.resumable import ResumableGGUFWriter
from .checkpoint import Checkpoint, TensorRef
from .gguf_export import (
    ExportPlan,
    ExportReport,
    PlannedTensor,
    TensorReport,
    _float_data,
    _plan_state,
    check_plan,
    encode_tensor,
)
from .gguf_mixes import Overrides

log = logging.getLogger(__name__)

#: Test hook: ``<dir>:<gguf tensor name>`` makes the first Ray task that encodes that tensor kill
#: its worker process (leaving a marker in <dir>), to exercise Ray's retry of a lost task.
FAULT_ONCE_ENV = "DIFFULEX_EDGE_FAULT_ONCE"


def _checkpoint_state(ckpt: Checkpoint, model) -> Dict[str, Any]:
    """The model's state-dict names in its order (the order an in-memory export writes), each
    mapped to the checkpoint tensor that holds it; shapes checked against the config's."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state: Dict[str, Any] = {}
    from ..arch import gguf_tensor_name

    for key, t in model.state_dict().items():
        ref = ckpt.get(key)
        if ref is None:
            if key == "lm_head.weight" and tied:
                continue  # tied to the embedding: llama.cpp reads token_embd
            if gguf_tensor_name(key) is None:
                continue  # a buffer llama.cpp does not use
            raise ConfigError(f"{ckpt.path}: the checkpoint has no tensor {key!r}, which the model's config requires",
                              layer=key)
        if tuple(ref.shape) != tuple(t.shape):
            raise ConfigError(f"{ckpt.path}: tensor {key!r} is {list(ref.shape)} in {os.path.basename(ref.file)}, "
                              f"the config makes it {list(t.shape)}", layer=key)
        state[key] = ref
    extra = sorted(set(ckpt) - set(model.state_dict()))
    if extra:
        log.info("%s: %d checkpoint tensors are not parameters of the model and are not exported (e.g. %s)",
                 ckpt.path, len(extra), extra[0])
    return state


def plan_gguf_checkpoint(model_dir: Union[str, os.PathLike], quant: str = "Q4_K_M", *,
                         imatrix: Union[None, str, os.PathLike, Mapping[str, np.ndarray]] = None,
                         tokenizer: Any = "auto", overrides: Overrides = None, name: Optional[str] = None,
                         profile=None) -> ExportPlan:
    """:func:`~.gguf_export.plan_gguf` for a checkpoint folder, reading only its config and
    safetensors headers. tokenizer: "auto" (the folder's own, if it has one), None, or a tokenizer."""
    ckpt = Checkpoint(os.fspath(model_dir))
    model = ckpt.skeleton()
    if tokenizer == "auto":
        tokenizer = load_folder_tokenizer(ckpt.path)
    state = _checkpoint_state(ckpt, model)
    return _plan_state(model, state, quant, imatrix=imatrix, tokenizer=tokenizer, overrides=overrides, name=name,
                       profile=profile)


def load_folder_tokenizer(path: str):
    """transformers' AutoTokenizer of a folder (it knows BOS/EOS handling), else its bare
    tokenizer.json, else None."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, ImportError):
        from ..hf import load_tokenizer

        return load_tokenizer(path)


def _encode_one(p: PlannedTensor, src: Any, permute: bool, heads: Tuple[int, int], mode: str,
                rope_factors: Optional[np.ndarray]) -> np.ndarray:
    """The GGUF bytes of planned tensor `p` read from `src` (a checkpoint TensorRef)."""
    a = rope_factors if p.hf_name is None else _float_data(src, p.gguf_name, permute, *heads)
    q = encode_tensor(a, p, mode)
    del a  # the source's memory map goes with it
    return q


def _encode_task(p, src, permute, heads, mode, rope_factors):
    """Ray task body: as `_encode_one`, with the fault-injection test hook."""
    spec = os.environ.get(FAULT_ONCE_ENV)
    if spec:
        folder, _, target = spec.partition(":")
        marker = os.path.join(folder, f"{target}.crashed")
        if target == p.gguf_name and not os.path.exists(marker):
            with open(marker, "w"):
                pass
            os._exit(1)  # the worker process dies mid-task, as on a lost node
    return _encode_one(p, src, permute, heads, mode, rope_factors)


def write_gguf_resumable(plan: ExportPlan, path: Union[str, os.PathLike], *, mode: str = "search",
                         resume: bool = True, executor: str = "local", ray_address: Optional[str] = None,
                         max_in_flight: Optional[int] = None, max_retries: int = 3,
                         show_progress: Optional[bool] = None) -> ExportReport:
    """Write `plan` (whose tensors are checkpoint references) to `path` resumably; see
    :func:`export_gguf_checkpoint`."""
    if executor not in ("local", "ray"):
        raise ConfigError(f"executor must be 'local' or 'ray', got {executor!r}")
    check_plan(plan, "write_gguf_resumable")
    for p in plan.tensors:
        src = plan._state.get(p.hf_name) if p.hf_name is not None else None
        if p.hf_name is not None and not isinstance(src, TensorRef):
            raise ConfigError(f"write_gguf_resumable writes plans of checkpoint folders (plan_gguf_checkpoint); "
                              f"{p.hf_name} is a {type(src).__name__}: use write_gguf for models in memory")
    path = os.fspath(path)
    w = GGUFWriter()
    for k, v, t in plan.metadata:
        w.add(k, v, t)
    specs = [(p.gguf_name, _gguf_dims(p.shape), _type_id(p.ggml_type)) for p in plan.tensors]
    writer = ResumableGGUFWriter(path, w._native_metadata(), specs, resume=resume)
    in_bytes = [plan._state[p.hf_name].nbytes if p.hf_name is not None else 0 for p in plan.tensors]
    report = ExportReport(path, plan.quant)
    bar = byte_progress(sum(in_bytes), f"GGUF {plan.quant}", show_progress)
    bar.update(sum(n for i, n in enumerate(in_bytes) if i in writer.done))
    t0, done_before = time.perf_counter(), len(writer.done)
    n_in = sum(n for i, n in enumerate(in_bytes) if i not in writer.done)
    args = (plan._permute, plan._heads, mode, plan._rope_factors)
    try:
        todo = [i for i in range(len(plan.tensors)) if i not in writer.done]
        results = (_ray_results(plan, todo, args, ray_address, max_in_flight, max_retries) if executor == "ray"
                   else ((i, _encode_one(plan.tensors[i], plan._state.get(plan.tensors[i].hf_name), *args)) for i in todo))
        for i, q in results:
            writer.write(i, q)
            p = plan.tensors[i]
            log.debug("export_gguf_checkpoint: %s %s %s %s", p.gguf_name, list(p.shape), p.ggml_type, p.reason)
            bar.update(in_bytes[i])
        writer.finish()
    except QuantizationError:
        writer.discard()  # bad data: a rerun would fail the same way
        raise
    except BaseException:
        writer.close()
        log.warning("export interrupted: %d of %d tensors are in %s; rerun the same export to resume",
                    len(writer.done), len(plan.tensors), writer.partial)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    report.tensors = [TensorReport(p.gguf_name, p.shape, p.ggml_type, p.nbytes, p.reason) for p in plan.tensors]
    report.seconds = seconds
    report.input_bytes = sum(in_bytes)
    report.resumed_tensors = done_before
    log.info("export_gguf_checkpoint: %s, %.2f GB of input encoded in %.1f s (%.2f GB/s)%s", path, n_in / 1e9, seconds,
             n_in / 1e9 / max(seconds, 1e-9), f", resumed after {done_before} tensors" if done_before else "")
    return report


def _ray_results(plan: ExportPlan, todo, args, address, max_in_flight, max_retries):
    """(index, bytes) of every tensor in `todo`, in order, encoded by Ray tasks; at most
    `max_in_flight` tasks (default: twice the cluster's CPUs) are submitted ahead of the writer."""
    try:
        import ray
    except ImportError as e:
        raise UnsupportedFormatError("executor='ray' needs Ray: pip install 'diffulex-edge[ray]'") from e
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    pending: deque = deque()
    try:
        task = ray.remote(_encode_task).options(max_retries=max_retries, retry_exceptions=[OSError], num_cpus=1)
        window = max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        it = iter(todo)
        for i in it:
            p = plan.tensors[i]
            pending.append((i, task.remote(p, plan._state.get(p.hf_name), *args)))
            if len(pending) >= window:
                break
        while pending:
            i, ref = pending.popleft()
            try:
                q = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the task's own exception, re-raised as itself
                cause = e.as_instanceof_cause()
                raise cause from None
            nxt = next(it, None)
            if nxt is not None:
                p = plan.tensors[nxt]
                pending.append((nxt, task.remote(p, plan._state.get(p.hf_name), *args)))
            yield i, q
    finally:
        for _, ref in pending:  # stopped early (an error, an interrupt): drop the work still queued
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def export_gguf_checkpoint(model_dir: Union[str, os.PathLike], path: Union[str, os.PathLike], quant: str = "Q4_K_M", *,
                           imatrix: Union[None, str, os.PathLike, Mapping[str, np.ndarray]] = None,
                           tokenizer: Any = "auto", overrides: Overrides = None, name: Optional[str] = None,
                           profile=None, mode: str = "search", resume: bool = True, executor: str = "local",
                           ray_address: Optional[str] = None, max_in_flight: Optional[int] = None,
                           max_retries: int = 3, show_progress: Optional[bool] = None) -> ExportReport:
    """Export a Hugging Face checkpoint folder (Llama / Mistral / Qwen2, safetensors, sharded or
    not) to GGUF without loading the model: one tensor in memory at a time.

    Arguments as :func:`~.gguf_export.export_gguf`, plus:

    - resume: an interrupted run leaves ``<path>.partial`` and its journal ``<path>.partial.json``;
      the same export rerun continues after the last tensor written (the result is the same file
      an uninterrupted run gives). False starts over.
    - executor: "local" (this process; the encoders use every core) or "ray" (one task per tensor
      on the Ray cluster at `ray_address`, or the one already initialised, or a new local one);
      the output is byte-identical either way. max_in_flight: tasks submitted ahead of the writer
      (memory: each holds one tensor); max_retries: Ray's retries of a lost or failed task.

    Returns the per-tensor report, with ``seconds``, ``input_bytes`` and ``resumed_tensors``.
    """
    plan = plan_gguf_checkpoint(model_dir, quant, imatrix=imatrix, tokenizer=tokenizer, overrides=overrides, name=name,
                                profile=profile)
    return write_gguf_resumable(plan, path, mode=mode, resume=resume, executor=executor, ray_address=ray_address,
                                max_in_flight=max_in_flight, max_retries=max_retries, show_progress=show_progress)


__all__ = ["FAULT_ONCE_ENV", "export_gguf_checkpoint", "load_folder_tokenizer", "plan_gguf_checkpoint",
           "write_gguf_resumable"]
