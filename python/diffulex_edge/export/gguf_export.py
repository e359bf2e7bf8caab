"""Export Hugging Face Llama-family causal LMs (Llama, Mistral, Qwen2) to a GGUF file llama.cpp loads.

Tensor names and metadata follow llama.cpp's conventions (gguf-py's `MODEL_TENSORS` / `Keys`, read
for reference): `token_embd`, `blk.N.attn_q` ... `output`, `general.architecture`, `<arch>.*`
hyper-parameters. For the `llama` architecture the Q and K projections are permuted the way
llama.cpp's `convert_hf_to_gguf.py` does (HF stores rotary halves split; GGUF interleaves them).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from .._progress import progress
from ..arch import ARCHITECTURES, detect, gguf_tensor_name
from ..errors import ConfigError, QuantizationError, ShapeError, UnsupportedFormatError
from ..gguf.file import GGUFWriter, ValueType
from ..gguf.quants import GGML_TYPES, quantize, type_info
from ..quant._ops import check_finite
from .gguf_mixes import MIXES, NEEDS_IMATRIX_IN_LLAMA_CPP, MixContext, Overrides, choose_type, compile_overrides

log = logging.getLogger(__name__)

def permute_qk(w: np.ndarray, n_head: int, n_head_kv: Optional[int] = None) -> np.ndarray:
    """HF rotary layout (halves) -> GGUF (interleaved pairs), as convert_hf_to_gguf's `permute`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int, n_head_kv: Optional[int] = None) -> np.ndarray:
    """Inverse of `permute_qk`: GGUF (interleaved pairs) -> HF rotary layout (halves)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def load_gguf_weights(model, path: Union[str, os.PathLike]):
    """Overwrite the weights of a HF model (of the architecture and shapes `path` was exported from)
    with the GGUF file's tensors, dequantized to float32 — what llama.cpp computes with, so a
    PyTorch evaluation of the result measures the file's quantization error. Returns `model`."""
    from ..gguf import GGUFFile

    found = detect(model)
    if found is None:
        raise UnsupportedFormatError(f"load_gguf_weights supports {', '.join(ARCHITECTURES)}; got {type(model).__name__}")
    arch, permute = found.gguf, found.permute_qk
    f = GGUFFile.read(path)
    if f.metadata.get("general.architecture") != arch:
        raise ConfigError(f"{os.fspath(path)} holds a {f.metadata.get('general.architecture')!r} model, not {arch!r}")
    cfg = model.config
    n_head = cfg.num_attention_heads
    n_kv = _config_value(cfg, "num_key_value_heads", default=n_head)
    state = model.state_dict()
    with torch.no_grad():
        for hf_name, t in state.items():
            g = gguf_tensor_name(hf_name)
            if g == "output.weight" and g not in f.tensors:
                g = "token_embd.weight"  # tied embeddings
            if g is None:
                continue
            if g not in f.tensors:
                raise ConfigError(f"{os.fspath(path)} has no tensor {g!r} (for {hf_name})")
            a = f.tensor(g)
            if a.size != t.numel():
                raise ConfigError(f"{g}: {a.shape} in the file, {tuple(t.shape)} in the model")
            a = a.reshape(tuple(t.shape))
            if permute and g.endswith("attn_q.weight"):
                a = unpermute_qk(a, n_head, n_head)
            elif permute and g.endswith("attn_k.weight"):
                a = unpermute_qk(a, n_head, n_kv)
            t.copy_(torch.from_numpy(np.ascontiguousarray(a)).to(t.dtype))
    return model


@dataclass
class TensorReport:
    name: str
    shape: Tuple[int, ...]
    ggml_type: str
    nbytes: int
    reason: str

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8.0 / max(1, int(np.prod(self.shape)))


@dataclass
class ExportReport:
    path: str
    quant: str
    tensors: List[TensorReport] = field(default_factory=list)
    #: out-of-core exports (export_gguf_checkpoint): wall time of the encoding, bytes of the
    #: checkpoint's tensors, and tensors found already written by an interrupted run
    seconds: Optional[float] = None
    input_bytes: Optional[int] = None
    resumed_tensors: int = 0

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """Over every tensor in the file (what llama.cpp prints as BPW)."""
        return self.nbytes * 8.0 / max(1, self.n_params)

    def type_counts(self) -> Dict[str, int]:
        return _type_counts(self.tensors)

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.quant}, {len(self.tensors)} tensors, {self.n_params:,} weights, "
                 f"{self.nbytes:,} bytes, {self.bits_per_weight:.3f} bits/weight"]
        w = max((len(t.name) for t in self.tensors), default=10)
        for t in self.tensors:
            lines.append(f"  {t.name:<{w}}  {str(list(t.shape)):<14} {t.ggml_type:<7} {t.bits_per_weight:6.3f} bpw  {t.reason}")
        return "\n".join(lines)


def _type_counts(tensors) -> Dict[str, int]:
    return dict(Counter(t.ggml_type for t in tensors))


def _config_value(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _hparams(model, arch: str) -> List[Tuple[str, Any, ValueType]]:
    cfg = model.config
    n_head = cfg.num_attention_heads
    n_kv = _config_value(cfg, "num_key_value_heads", default=n_head)
    head_dim = _config_value(cfg, "head_dim", default=cfg.hidden_size // n_head)
    u32, f32 = ValueType.UINT32, ValueType.FLOAT32
    rope_theta = _config_value(cfg, "rope_theta", default=None)
    if rope_theta is None:
        rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    kv = [
        (f"{arch}.context_length", int(_config_value(cfg, "max_position_embeddings", default=2048)), u32),
        (f"{arch}.embedding_length", int(cfg.hidden_size), u32),
        (f"{arch}.block_count", int(cfg.num_hidden_layers), u32),
        (f"{arch}.feed_forward_length", int(cfg.intermediate_size), u32),
        (f"{arch}.attention.head_count", int(n_head), u32),
        (f"{arch}.attention.head_count_kv", int(n_kv), u32),
        (f"{arch}.rope.freq_base", float(rope_theta), f32),
        (f"{arch}.attention.layer_norm_rms_epsilon", float(_config_value(cfg, "rms_norm_eps", default=1e-5)), f32),
        (f"{arch}.rope.dimension_count", int(head_dim), u32),
        (f"{arch}.vocab_size", int(cfg.vocab_size), u32),
    ]
    if head_dim * n_head != cfg.hidden_size:
        kv += [(f"{arch}.attention.key_length", int(head_dim), u32), (f"{arch}.attention.value_length", int(head_dim), u32)]
    kv += _rope_scaling_metadata(cfg, arch)
    return kv


def _rope_parameters(cfg) -> Dict[str, Any]:
    """The rope scaling dict of a HF config: `rope_parameters` (transformers >= 5, which also holds
    `rope_theta`) or `rope_scaling` (older releases); `{}` when neither is set."""
    for attr in ("rope_parameters", "rope_scaling"):
        v = getattr(cfg, attr, None)
        if isinstance(v, Mapping) and v:
            return dict(v)
    return {}


def _rope_type(params: Mapping[str, Any]) -> Optional[str]:
    t = params.get("rope_type", params.get("type"))
    return None if t in (None, "default") else str(t)


def _rope_scaling_metadata(cfg, arch: str) -> List[Tuple[str, Any, ValueType]]:
    """GGUF keys for the model's RoPE scaling (as llama.cpp's converter writes them).

    linear -> `rope.scaling.type/factor`; yarn -> type, factor and original context length (with
    the default YaRN parameters only, see below); llama3 -> no keys (its per-dimension factors travel as the
    `rope_freqs.weight` tensor, see `_rope_freq_factors`). Anything else raises."""
    p = _rope_parameters(cfg)
    rtype = _rope_type(p)
    f32, s = ValueType.FLOAT32, ValueType.STRING
    if rtype is None or rtype == "llama3":
        if rtype == "llama3":
            _llama3_params(p)  # validated here so a bad config fails before anything is written
        return []
    factor = p.get("factor")
    if factor is None or float(factor) <= 0:
        raise ConfigError(f"rope scaling {rtype!r} needs a positive 'factor' in the model config; got {factor!r}")
    if rtype == "linear":
        return [(f"{arch}.rope.scaling.type", "linear", s), (f"{arch}.rope.scaling.factor", float(factor), f32)]
    if rtype == "yarn":
        # llama.cpp (checked against ggml 0.25.3) reads type, factor and original context length
        # for these architectures and computes YaRN with beta_fast 32, beta_slow 1 and the paper's
        # attention factor 0.1 ln(factor) + 1 — the Hugging Face defaults. Configs that change
        # those would load and run with different numbers, so they are refused.
        default_attn = 0.1 * float(np.log(float(factor))) + 1.0 if float(factor) > 1 else 1.0
        custom = {k: p[k] for k, d in (("beta_fast", 32.0), ("beta_slow", 1.0), ("attention_factor", default_attn))
                  if p.get(k) is not None and abs(float(p[k]) - d) > 1e-6 * max(1.0, abs(d))}
        if p.get("mscale") or p.get("mscale_all_dim") or p.get("truncate", True) is False:
            custom.update({k: p[k] for k in ("mscale", "mscale_all_dim", "truncate") if k in p})
        if custom:
            raise UnsupportedFormatError(
                f"yarn rope scaling with non-default {custom} is not exported: llama.cpp's llama/qwen2 models "
                "compute YaRN with beta_fast=32, beta_slow=1 and attention factor 0.1*ln(factor)+1")
        orig = p.get("original_max_position_embeddings") or _config_value(cfg, "max_position_embeddings")
        return [(f"{arch}.rope.scaling.type", "yarn", s), (f"{arch}.rope.scaling.factor", float(factor), f32),
                (f"{arch}.rope.scaling.original_context_length", int(orig), ValueType.UINT32)]
    raise UnsupportedFormatError(
        f"rope scaling {rtype!r} cannot be exported to GGUF (llama.cpp supports linear, yarn and llama3); "
        "remove it from the config if the model was not trained with it")


def _llama3_params(p: Mapping[str, Any]) -> Tuple[float, float, float, float]:
    try:
        vals = (float(p["factor"]), float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0)),
                float(p.get("original_max_position_embeddings", 8192)))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"llama3 rope scaling needs numeric factor / low_freq_factor / high_freq_factor / "
                          f"original_max_position_embeddings: {e}") from None
    factor, low, high, orig = vals
    if factor <= 0 or low <= 0 or high <= low or orig <= 0:
        raise ConfigError(f"llama3 rope scaling parameters out of range: factor={factor}, low_freq_factor={low}, "
                          f"high_freq_factor={high} (must exceed low), original_max_position_embeddings={orig}")
    return vals


def _rope_freq_factors(cfg) -> Optional[np.ndarray]:
    """Llama 3.1-style RoPE scaling as the per-frequency divisors llama.cpp reads from `rope_freqs`
    (one per rotary pair). Formula of Meta's Llama 3.1 reference code (`apply_scaling`): with
    wavelength `2*pi/f` of each base frequency `f = theta^(-2i/d)`, wavelengths shorter than
    `orig/high_freq_factor` keep their frequency (1), longer than `orig/low_freq_factor` are divided
    by `factor`, and in between blend smoothly: `1 / ((1 - s)/factor + s)`,
    `s = (orig/wavelen - low) / (high - low)`. None for models without llama3 scaling."""
    p = _rope_parameters(cfg)
    if _rope_type(p) != "llama3":
        return None
    factor, low, high, orig = _llama3_params(p)
    n_head = cfg.num_attention_heads
    dim = int(_config_value(cfg, "head_dim", default=cfg.hidden_size // n_head))
    theta = _config_value(cfg, "rope_theta", default=None) or p.get("rope_theta", 10000.0)
    # the base frequencies in float32, as the model computes them
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    wavelen = 2.0 * np.pi / freqs.astype(np.float64)
    smooth = (orig / wavelen - low) / (high - low)
    out = np.where(wavelen < orig / high, 1.0,
                   np.where(wavelen > orig / low, factor, 1.0 / ((1.0 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def _imatrix_for(imatrix, gguf_name: str, hf_name: str, cols: int) -> Optional[np.ndarray]:
    if imatrix is None:
        return None
    for key in (gguf_name, hf_name, hf_name.rsplit(".", 1)[0]):
        if key in imatrix:
            v = np.asarray(imatrix[key], dtype=np.float32).reshape(-1)
            if v.size != cols:
                raise ConfigError(f"imatrix entry {key!r} has {v.size} values, tensor has {cols} columns")
            return v
    return None


def export_gguf(model, path: Union[str, os.PathLike], quant: str = "Q4_K_M",
                imatrix: Union[None, str, os.PathLike, Mapping[str, np.ndarray]] = None, tokenizer=None, overrides: Overrides = None,
                name: Optional[str] = None, mode: str = "search", show_progress: Optional[bool] = None,
                profile=None) -> ExportReport:
    """Write `model` (a HF LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM) as GGUF:
    ``write_gguf(plan_gguf(model, ...), path, ...)``.

    quant: a llama.cpp mix (`Q4_K_M`, `Q4_K_S`, `Q5_K_M`, `Q6_K`, `Q8_0`, `Q2_K`, `Q3_K_M`, `IQ4_XS`,
    `TQ1_0`, `TQ2_0`, ... see `MIXES`). imatrix: per-column importances keyed by GGUF or HF tensor
    name, or the path of a llama.cpp imatrix file (GGUF or legacy .dat). overrides: `{regex: type}` applied to GGUF tensor names before the mix. Returns the
    per-tensor report (type, bits per weight, why). profile: a mixed-precision plan
    (:class:`~diffulex_edge.quant.DynamicQuantizationProfile`, a preset name or a .yaml/.json path;
    e.g. ``solve(...).to_profile()``) whose GGML formats become exact per-tensor overrides, after
    `overrides` and before the mix. mode: "search" (weighted least-squares scales)
    or "rtn" (gguf-py's round-to-nearest bytes where the type has it). show_progress: tqdm bar over
    tensors (None: when attached to a terminal or notebook).

    The file is written tensor by tensor into a temporary file that is renamed into place at the
    end; on any error (or Ctrl-C) the temporary file is deleted and an existing file at `path` is
    left as it was.
    """
    return write_gguf(plan_gguf(model, quant, imatrix=imatrix, tokenizer=tokenizer, overrides=overrides, name=name,
                                profile=profile), path, mode=mode, show_progress=show_progress)


class PlannedTensor(NamedTuple):
    """One tensor of an export: its source (None: computed, e.g. rope factors), GGUF name and
    shape, the chosen type and why, and its importance vector if an imatrix covers it."""

    hf_name: Optional[str]
    gguf_name: str
    shape: Tuple[int, ...]
    ggml_type: str
    reason: str
    imatrix: Optional[np.ndarray]

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded tensor in the file."""
        info = type_info(self.ggml_type)
        n = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        return n // info.block_size * info.type_size


@dataclass
class ExportPlan:
    """Everything :func:`write_gguf` will write, decided before any tensor is encoded: the
    metadata and, per tensor, its GGUF name, shape, type and the reason for that type (from
    :func:`plan_gguf`). Inspect it (``tensors``, ``nbytes``, ``type_counts()``) or change a
    tensor's type (``plan.tensors[i] = plan.tensors[i]._replace(ggml_type="Q8_0", reason="mine")``)
    before writing."""

    quant: str
    arch: str
    metadata: List[Tuple[str, Any, Any]]
    tensors: List[PlannedTensor]
    # how to produce each tensor's float data: the model's state dict, Q/K permutation, rope factors
    _state: Mapping[str, Any] = field(repr=False, default_factory=dict)
    _heads: Tuple[int, int] = field(repr=False, default=(1, 1))
    _permute: bool = field(repr=False, default=False)
    _rope_factors: Optional[np.ndarray] = field(repr=False, default=None)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the file will hold (without the header and alignment padding)."""
        return sum(t.nbytes for t in self.tensors)

    def type_counts(self) -> Dict[str, int]:
        """{GGML type: number of tensors}, in the order types first appear."""
        return _type_counts(self.tensors)

    def __repr__(self) -> str:
        types = ", ".join(f"{k} x{v}" for k, v in sorted(self.type_counts().items()))
        return (f"ExportPlan({self.arch} {self.quant}: {len(self.tensors)} tensors, "
                f"{self.nbytes / 2**20:.2f} MiB of data; {types})")


def plan_gguf(model, quant: str = "Q4_K_M", *, imatrix: Union[None, str, os.PathLike, Mapping[str, np.ndarray]] = None,
              tokenizer=None, overrides: Overrides = None, name: Optional[str] = None, profile=None) -> ExportPlan:
    """Decide what :func:`export_gguf` would write for `model`, without encoding anything: the
    metadata and each tensor's GGUF name, shape and type (with the rule that chose it). Checks
    everything that can be checked before the work starts (architecture, mix, imatrix shapes,
    tensors llama.cpp requires). Arguments as :func:`export_gguf`."""
    cls = type(model).__name__
    if getattr(model, "config", None) is None:
        raise UnsupportedFormatError(f"export_gguf needs a Hugging Face model with a .config; got {cls}")
    return _plan_state(model, _export_state(model, _stored_layers(model)), quant, imatrix=imatrix, tokenizer=tokenizer,
                       overrides=overrides, name=name, profile=profile)


def _plan_state(model, state: Mapping[str, Any], quant: str, *, imatrix, tokenizer, overrides, name,
                profile) -> ExportPlan:
    """`plan_gguf` for `model`'s config and module names with the tensors of `state` (the model's
    own, or references into a checkpoint on disk: anything :func:`_float_data` reads)."""
    cls = type(model).__name__
    found = detect(model)
    if found is None:
        raise UnsupportedFormatError(f"export_gguf supports {', '.join(ARCHITECTURES)}; got {cls}")
    if isinstance(imatrix, (str, os.PathLike)):
        from ..gguf.imatrix import load_imatrix

        imatrix = load_imatrix(imatrix)
    quant = quant.upper()
    if quant not in MIXES:
        raise ConfigError(f"unknown quantization {quant!r}; supported: {', '.join(MIXES)}")
    arch = found.gguf
    cfg = model.config
    n_head = cfg.num_attention_heads
    n_kv = _config_value(cfg, "num_key_value_heads", default=n_head)

    tied = "lm_head.weight" not in state or bool(getattr(cfg, "tie_word_embeddings", False)) or (
        "lm_head.weight" in state and "model.embed_tokens.weight" in state
        and isinstance(state["lm_head.weight"], torch.Tensor)
        and state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr())
    ctx = MixContext(quant, int(cfg.num_hidden_layers), max(1, n_head // n_kv), has_output=not tied,
                     has_imatrix=imatrix is not None)
    if imatrix is None and quant in NEEDS_IMATRIX_IN_LLAMA_CPP:
        log.warning("%s without an importance matrix: llama.cpp refuses this mix without one; diffulex-edge "
                    "quantizes it with magnitude weights (sqrt(sigma^2 + w^2)) instead. An imatrix from calibration "
                    "text (`diffulex-quant imatrix`, or llama-imatrix) lowers the error further.", quant)
    rules = compile_overrides(overrides)
    if profile is not None:
        from ..quant.profile import gguf_overrides

        rules += compile_overrides(gguf_overrides(profile, model))

    metadata: List[Tuple[str, Any, Any]] = [("general.architecture", arch, None),
                                            ("general.name", name or getattr(cfg, "_name_or_path", "") or arch, None)]
    metadata += list(_hparams(model, arch))
    metadata += [("general.file_type", MIXES[quant][1], ValueType.UINT32),
                 ("general.quantization_version", 2, ValueType.UINT32)]
    if tokenizer is not None:
        from .gguf_tokenizer import tokenizer_metadata

        metadata += list(tokenizer_metadata(tokenizer, int(cfg.vocab_size)))

    # Every tensor (name, shape, type) is planned first: the header announces them all, bad imatrix
    # entries fail before any work, and the data is then streamed one tensor at a time, so peak
    # memory is the model plus one float32 copy and one encoded tensor.
    tensors: List[PlannedTensor] = []
    unmapped = []
    for hf_name, tensor in state.items():
        gname = gguf_tensor_name(hf_name)
        if gname is None:
            unmapped.append(hf_name)
            continue
        if tied and gname == "output.weight":
            continue
        if isinstance(tensor, _Stored):
            shape = (tensor.layer.out_features, tensor.layer.in_features)
            tensors.append(PlannedTensor(hf_name, gname, shape, tensor.ggml_type,
                                         f"quantized in PyTorch as {tensor.layer.qdtype}: its bytes as stored", None))
            continue
        shape = tuple(int(d) for d in tensor.shape)
        t, why = choose_type(gname, shape, ctx, rules)
        imp = _imatrix_for(imatrix, gname, hf_name, shape[-1]) if len(shape) >= 2 else None
        tensors.append(PlannedTensor(hf_name, gname, shape, t, why, imp))
    _check_complete({p.gguf_name for p in tensors}, int(cfg.num_hidden_layers), unmapped)
    rope_factors = _rope_freq_factors(cfg)
    if rope_factors is not None:
        # llama.cpp divides each rotary frequency by these (F32, as its converter writes them)
        tensors.append(PlannedTensor(None, "rope_freqs.weight", rope_factors.shape, "F32", "llama3 rope scaling factors",
                                     None))
    return ExportPlan(quant, arch, metadata, tensors, state, (n_head, n_kv), found.permute_qk, rope_factors)


def write_gguf(plan: ExportPlan, path: Union[str, os.PathLike], *, mode: str = "search",
               show_progress: Optional[bool] = None) -> ExportReport:
    """Encode and write the tensors of `plan` (from :func:`plan_gguf`) to `path`, one at a time,
    into a temporary file renamed into place at the end. `mode` and `show_progress` as in
    :func:`export_gguf`."""
    check_plan(plan, "write_gguf")
    w = GGUFWriter(path)
    for k, v, t in plan.metadata:
        w.add(k, v, t)
    n_head, n_kv = plan._heads
    report = ExportReport(os.fspath(path), plan.quant)
    log.info("export_gguf: %d tensors as %s -> %s", len(plan.tensors), plan.quant, report.path)
    with w.stream([(p.gguf_name, p.shape, p.ggml_type) for p in plan.tensors]) as out:
        for p in progress(plan.tensors, f"GGUF {plan.quant}", show_progress, unit="tensor"):
            hf_name, gname, shape, t, why = p.hf_name, p.gguf_name, p.shape, p.ggml_type, p.reason
            src = None if hf_name is None else plan._state[hf_name]
            if isinstance(src, _Stored) and src.ggml_type == t:
                q = src.raw()  # the layer's bytes: what was measured in PyTorch is what llama.cpp runs
                if plan._permute and gname.endswith(("attn_q.weight", "attn_k.weight")):
                    q = permute_qk(q, n_head, n_head if gname.endswith("attn_q.weight") else n_kv)
                out.write_tensor(gname, np.ascontiguousarray(q))
                report.tensors.append(TensorReport(gname, shape, t, int(q.nbytes), why))
                continue
            a = plan._rope_factors if hf_name is None else _float_data(src, gname, plan._permute, n_head, n_kv)
            q = encode_tensor(a, p, mode)
            out.write_tensor(gname, q)
            log.debug("export_gguf: %s %s %s %s", gname, list(shape), t, why)
            report.tensors.append(TensorReport(gname, shape, t, int(q.nbytes), why))
    return report


def check_plan(plan: ExportPlan, who: str) -> None:
    """A plan (possibly edited by hand) that can be written: every type exists and fits its shape."""
    if not isinstance(plan, ExportPlan):
        raise ConfigError(f"{who} takes the ExportPlan of plan_gguf, got {type(plan).__name__}")
    for p in plan.tensors:
        try:
            block = type_info(p.ggml_type).block_size
        except UnsupportedFormatError as e:
            raise UnsupportedFormatError(f"{p.gguf_name}: {e}", layer=p.gguf_name) from None
        if p.shape and p.shape[-1] % block:
            raise ShapeError(f"{p.ggml_type} needs rows that are a multiple of {block}; "
                             f"{p.gguf_name} has {p.shape[-1]}", layer=p.gguf_name)


def _float_data(src, gname: str, permute: bool, n_head: int, n_kv: int) -> np.ndarray:
    """The float32 weights of one planned tensor from its source (a torch tensor, a stored layer
    re-encoded to another type, or a checkpoint :class:`~.checkpoint.TensorRef`), Q/K permuted
    for llama.cpp where the architecture needs it."""
    if isinstance(src, _Stored):  # a plan edited to another type: re-encode the layer's weight
        return src.layer.dequantize_weight().detach().to("cpu").numpy()
    a = src.load() if hasattr(src, "load") else src.detach().to("cpu").float().numpy()
    if permute and gname.endswith("attn_q.weight"):
        a = permute_qk(a, n_head, n_head)
    elif permute and gname.endswith("attn_k.weight"):
        a = permute_qk(a, n_head, n_kv)
    return a


def encode_tensor(a: np.ndarray, p: PlannedTensor, mode: str = "search") -> np.ndarray:
    """The GGUF bytes of the float weights `a` of planned tensor `p` (its type and importances);
    errors name the tensor."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    t = p.ggml_type
    qmode = mode if (mode != "rtn" or GGML_TYPES[t].has_rtn) else "search"
    try:
        # the block types refuse NaN/Inf themselves; F32/F16/BF16 store what they are given,
        # so a non-finite weight is checked here: the same error whatever type the mix chose
        if GGML_TYPES[t].block_size == 1 and not np.isfinite(a).all():  # (a copy: `a` may be a read-only map)
            check_finite(torch.from_numpy(np.array(a)), p.gguf_name, fix="replace NaN/Inf weights before exporting")
        return quantize(a, t, imatrix=p.imatrix, mode=qmode)
    except QuantizationError as e:
        raise type(e)(f"{p.hf_name or 'computed'} as {t}: {e}", layer=p.gguf_name) from e


class _Stored(NamedTuple):
    """A quantized layer whose stored bytes are a GGUF tensor of `ggml_type` (row by row)."""

    layer: Any
    ggml_type: str

    def raw(self) -> np.ndarray:
        """The stored bytes as uint8 ``[out, row_bytes]``."""
        b = self.layer._storage().detach().to("cpu").contiguous()
        return b.numpy() if b.dtype == torch.uint8 else b.view(torch.uint8).numpy()


def _stored_layers(model) -> Dict[str, "_Stored"]:
    """{module name: _Stored} for every QuantizedLinear of `model`; a layer whose storage has no
    GGUF type (int8 / int4 / nf4, or with a protect table) is refused, naming the formats that
    export as they are."""
    from ..quant.config import PACKED_FORMATS
    from ..quant.nn import QuantizedLinear

    out: Dict[str, _Stored] = {}
    for n, m in model.named_modules():
        if not isinstance(m, QuantizedLinear):
            continue
        d = m.qdtype
        t = {"fp16": "F16", "bf16": "BF16"}.get(d.value) or (PACKED_FORMATS[d.value]["ggml_type"] if d.is_packed else None)
        if t is None or m.n_protect:
            why = "its protected weights have no GGUF form" if t is not None else f"{d} has no GGUF tensor type"
            gguf_ready = ", ".join(k for k, f in PACKED_FORMATS.items() if f["ggml_type"])
            raise UnsupportedFormatError(
                f"this layer is diffulex-edge quantized and {why}; quantize with a GGUF format ({gguf_ready}, fp16, "
                "bf16) to export its bytes as they are, or export the float model (diffulex_edge.quant.dequantize_model "
                "gives it back; export_gguf then encodes every weight itself)", layer=n)
        out[n] = _Stored(m, t)
    return out


def _export_state(model, stored: Mapping[str, "_Stored"]) -> Dict[str, Any]:
    """The model's state dict in order, with each stored layer's buffers replaced by one
    ``<layer>.weight`` entry (its _Stored) at the place of its weight buffer, bias kept."""
    state: Dict[str, Any] = {}
    for key, value in model.state_dict().items():
        owner, _, buf = key.rpartition(".")
        if owner in stored:
            if buf == stored[owner].layer.format.storage_buffer():
                state[f"{owner}.weight"] = stored[owner]
            elif buf == "bias":
                state[key] = value
            continue
        state[key] = value
    return state


_BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def _check_complete(names, n_layers: int, unmapped: List[str]) -> None:
    """Every weight llama.cpp requires of a llama/qwen2 model must be in the plan; a model whose
    parameters are named differently (wrappers such as LoRA's `base_layer`) is refused instead of
    written as a file llama.cpp cannot load."""
    need = ["token_embd.weight", "output_norm.weight"] + [f"blk.{i}.{k}.weight" for i in range(n_layers) for k in _BLOCK_TENSORS]
    missing = [n for n in need if n not in names]
    if missing:
        more = f" (and {len(missing) - 4} more)" if len(missing) > 4 else ""
        raise ConfigError(
            f"the model has no weights for {', '.join(missing[:4])}{more}, which llama.cpp requires; parameters with "
            f"no llama.cpp name: {', '.join(unmapped[:4]) or 'none'}{' ...' if len(unmapped) > 4 else ''}. "
            "Merge adapters / unwrap modules so the parameters have their Hugging Face names")


__all__ = ["ARCHITECTURES", "ExportPlan", "ExportReport", "PlannedTensor", "TensorReport", "export_gguf",
           "gguf_tensor_name", "load_gguf_weights", "permute_qk", "plan_gguf", "unpermute_qk", "write_gguf"]
