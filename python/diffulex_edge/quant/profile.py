"""Mixed precision: per-layer formats as a plan (``DynamicQuantizationProfile``), loadable from
YAML/JSON, applied by :func:`apply_profile` (PyTorch layers) and by ``export_gguf(...,
profile=...)`` (per-tensor GGUF types), plus named presets.

A profile is an ordered list of rules, ``LayerQuantizationConfig(pattern, format)``: a layer takes
the format of the first rule whose pattern matches its module name (exact name, a prefix ending at
a dot, a glob such as ``"*.mlp.down_proj"``, or ``"re:<regex>"``), else the profile's ``default``.
A format is any scheme name (``q4_K``, ``iq2_xxs``, ``int4-g64``, ``int8``, ``fp16``, ...) or
``"float"`` to keep the layer as it is; ``protected: true`` also keeps it.

    # plan.yaml
    name: attention-high-precision
    default: q4_K
    layers:
      - {pattern: "*.self_attn.*", format: q6_K}
      - {pattern: "lm_head", format: float}
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from ..errors import ConfigError
from .config import PACKED_FORMATS, QuantizationConfig, QuantizationDtype
from .result import LayerRecord, QuantizationResult
from .walk import _match, model_size_bytes

KEEP = ("float", "none", "fp32", "f32")


#: GGUF block type -> format name (the packed GGML formats), and format name -> GGUF type (those,
#: fp16 and bf16)
FORMAT_OF_GGML: Dict[str, str] = {v["ggml_type"]: k for k, v in PACKED_FORMATS.items() if v["ggml_type"]}
GGML_OF_FORMAT: Dict[str, str] = {**{k: g for g, k in FORMAT_OF_GGML.items()}, "fp16": "F16", "f16": "F16",
                                  "bf16": "BF16"}


@dataclass
class LayerQuantizationConfig:
    """One rule of a profile: the layers `pattern` matches get `format` (a scheme name or
    ``"float"``); `group_size` sets INT4's group length; `protected` keeps the layers in float."""

    pattern: str
    format: Optional[str] = None
    group_size: Optional[int] = None
    protected: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(f"a layer rule needs a non-empty pattern string, got {self.pattern!r}")
        if self.format is None and not self.protected:
            raise ConfigError(f"layer rule {self.pattern!r}: give a format (a scheme name or 'float') or protected: true")
        if self.format is not None:
            self.format = str(self.format)
            if self.format.lower() not in KEEP:
                self.scheme()  # validate early, naming the rule

    @property
    def keeps_float(self) -> bool:
        return self.protected or self.format is None or self.format.lower() in KEEP

    def scheme(self) -> QuantizationConfig:
        fields: Dict[str, Any] = {} if self.group_size is None else {"group_size": self.group_size}
        try:
            return QuantizationConfig.from_scheme(self.format, **fields)
        except ConfigError as e:
            raise ConfigError(f"layer rule {self.pattern!r}: {e}") from None

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"pattern": self.pattern, "format": self.format}
        if self.group_size is not None:
            d["group_size"] = self.group_size
        if self.protected:
            d["protected"] = True
        return d


@dataclass
class DynamicQuantizationProfile:
    """A per-layer plan: `layers` (first match wins), the `default` format of every other Linear
    layer (``None``/``"float"``: keep it), and what it was made for (`target`, e.g.
    ``{"bits_per_weight": 3.0}``, and `notes`), kept for reports."""

    name: str
    layers: List[LayerQuantizationConfig] = field(default_factory=list)
    default: Optional[str] = None
    target: Dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        self.layers = [r if isinstance(r, LayerQuantizationConfig) else _rule(r) for r in (self.layers or [])]
        if self.default is not None and str(self.default).lower() not in KEEP:
            LayerQuantizationConfig("*", self.default)  # validates the name
        if not isinstance(self.target, Mapping):
            raise ConfigError(f"target must be a mapping (e.g. {{bits_per_weight: 3.0}}), got {self.target!r}")
        self.target = dict(self.target)

    # -- resolution -------------------------------------------------------------------------
    def format_for(self, name: str) -> Optional[str]:
        """The format of module `name` (``None``: kept in float)."""
        for r in self.layers:
            if _match(name, r.pattern):
                return None if r.keeps_float else _canonical(r)
        if self.default is None or str(self.default).lower() in KEEP:
            return None
        return _canonical(LayerQuantizationConfig("*", self.default))

    def assign(self, model: nn.Module) -> Dict[str, Optional[str]]:
        """Every Linear layer of `model` -> its format (``None``: kept in float)."""
        return {n: self.format_for(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    @classmethod
    def from_llama_mix(cls, model: nn.Module, mix: str = "Q4_K_M", *, imatrix: Any = None) -> "DynamicQuantizationProfile":
        """llama.cpp's mix `mix` (``Q4_K_M``, ``IQ2_XS``, ... the types llama-quantize would give
        each tensor of this model, fallbacks included; see ``export.gguf_mixes``) as a profile
        of exact module names, so ``quantize_`` applies it to PyTorch layers. F32/F16 tensors
        (norms; F16 fallbacks) stay float; embeddings get their rule too (used by GGUF exports)."""
        from ..export.gguf_export import plan_gguf

        rules = []
        for t in plan_gguf(model, mix, imatrix=imatrix).tensors:
            if t.hf_name is None or not t.hf_name.endswith(".weight") or len(t.shape) < 2:
                continue
            module = t.hf_name[: -len(".weight")]
            rules.append(LayerQuantizationConfig(module, FORMAT_OF_GGML.get(t.ggml_type, "float")))
        return cls(f"llama.cpp {mix.upper()}", rules, None, notes=f"llama.cpp's {mix.upper()} mix for this model")

    # -- files ------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "default": self.default, "target": dict(self.target), "notes": self.notes,
                "layers": [r.to_dict() for r in self.layers]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DynamicQuantizationProfile":
        if not isinstance(d, Mapping):
            raise ConfigError(f"a profile is a mapping with name/default/layers, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown profile key(s) {sorted(unknown)}; known: name, default, layers, target, notes")
        return cls(name=str(d.get("name", "profile")), layers=list(d.get("layers") or []), default=d.get("default"),
                   target=d.get("target") or {}, notes=str(d.get("notes") or ""))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "DynamicQuantizationProfile":
        """Read a profile from ``.yaml``/``.yml`` or ``.json``."""
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"profile file {p} does not exist")
        text = p.read_text(encoding="utf-8")
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - a parse error of either library
            raise ConfigError(f"cannot parse profile {p}: {e}") from None
        return cls.from_dict(data)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write as YAML (``.yaml``/``.yml``) or JSON, atomically."""
        from .._io import atomic_write

        p = Path(path)
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(p, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def __repr__(self) -> str:
        rules = ", ".join(f"{r.pattern}={'float' if r.keeps_float else r.format}" for r in self.layers[:6])
        more = f", ... ({len(self.layers)} rules)" if len(self.layers) > 6 else ""
        return f"DynamicQuantizationProfile({self.name!r}: default={self.default}, {rules}{more})"


def _rule(r: Any) -> LayerQuantizationConfig:
    if isinstance(r, Mapping):
        unknown = set(r) - {"pattern", "format", "group_size", "protected"}
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)} in layer rule {dict(r)}; known: pattern, format, "
                              "group_size, protected")
        return LayerQuantizationConfig(**r)
    if isinstance(r, (tuple, list)) and len(r) == 2:
        return LayerQuantizationConfig(str(r[0]), str(r[1]))
    raise ConfigError(f"a layer rule is {{pattern: ..., format: ...}} or (pattern, format), got {r!r}")


def _canonical(r: LayerQuantizationConfig) -> str:
    cfg = r.scheme()
    if cfg.dtype is not None and cfg.dtype.is_packed:
        return cfg.dtype.value
    if cfg.dtype == QuantizationDtype.INT4:
        return f"int4-g{cfg.group_size}-{'sym' if cfg.resolved_symmetric else 'asym'}"
    if cfg.dtype == QuantizationDtype.INT8 and cfg.mode != "weight_only":
        return f"w8a8-{cfg.mode}"
    return str(r.format).lower()


ProfileLike = Union[DynamicQuantizationProfile, Mapping[str, Any], str, os.PathLike]


def as_profile(p: ProfileLike) -> DynamicQuantizationProfile:
    """A profile object from a profile, a mapping, a preset name or a YAML/JSON path."""
    if isinstance(p, DynamicQuantizationProfile):
        return p
    if isinstance(p, Mapping):
        return DynamicQuantizationProfile.from_dict(p)
    if isinstance(p, str) and p in PRESETS:
        return PRESETS[p]
    if isinstance(p, (str, os.PathLike)) and Path(p).suffix.lower() in (".yaml", ".yml", ".json"):
        return DynamicQuantizationProfile.load(p)
    raise ConfigError(f"not a profile: {p!r}; pass a DynamicQuantizationProfile, a mapping, a .yaml/.json path or "
                      f"a preset ({', '.join(PRESETS)})")


def apply_profile(model: nn.Module, profile: ProfileLike, *, imatrix: Any = None, calibration_data: Optional[Iterable[Any]] = None,
                  protect: Any = None, show_progress: Optional[bool] = None,
                  check_coherence: Optional[bool] = None) -> QuantizationResult:
    """Quantize `model` in place, each Linear layer to its profile format (one quantizer call per
    format, the others excluded). Every layer is checked before any is changed: a format that
    does not fit a layer's width raises naming both. One coherence check covers the whole plan
    (by default when its lowest format is below 3 bits per weight; ``result.coherence``).
    Returns one result for the whole model."""
    import time

    from .quantizers import QUANTIZERS
    from .walk import plan_layers

    prof = as_profile(profile)
    t0 = time.perf_counter()
    assignment = prof.assign(model)
    groups: Dict[str, List[str]] = {}
    for name, fmt in assignment.items():
        if fmt is not None:
            groups.setdefault(fmt, []).append(name)
    linear = list(assignment)
    configs: List[Tuple[str, QuantizationConfig]] = []
    for fmt, names in groups.items():
        cfg = QuantizationConfig.from_scheme(fmt, exclude_layers=[n for n in linear if n not in set(names)],
                                             check_coherence=False)
        plan_layers(model, cfg)  # validates every layer of this format before any change
        configs.append((fmt, cfg))
    original = model_size_bytes(model)
    # one coherence check for the whole plan (per-format calls have it off): on when its
    # lowest-bit format is below 3 bits per weight, as for a single format
    from .walk import _Coherence

    low = min((c for _, c in configs), key=lambda c: float(c.dtype.bits), default=None)
    coherence = None
    if low is not None:
        coherence = _Coherence(dataclasses.replace(low, check_coherence=check_coherence), model, calibration_data, True)
    layers: List[LayerRecord] = []
    warnings: List[str] = []
    skipped: Dict[str, str] = {n: "kept in float by the profile" for n, f in assignment.items() if f is None}
    for fmt, cfg in configs:
        members = set(groups[fmt])
        # exclude the other formats' layers that are still Linear (quantized ones skip themselves)
        cfg.exclude_layers = [n for n in linear if n not in members and isinstance(model.get_submodule(n), nn.Linear)]
        q = QUANTIZERS[cfg.dtype](show_progress=show_progress)
        use_imatrix = imatrix if cfg.dtype.takes_importance else None
        res = q.quantize(model, cfg, inplace=True, calibration_data=calibration_data, imatrix=use_imatrix, protect=protect)
        layers += res.layers
        skipped.update({k: v for k, v in res.skipped.items() if k in members})
        warnings += [w for w in res.warnings if w not in warnings]
    report = coherence.finish(model, f"the plan {prof.name!r}", warnings) if coherence is not None else None
    main_fmt = max(groups, key=lambda f: len(groups[f])) if groups else None
    cfg = QuantizationConfig.from_scheme(main_fmt) if main_fmt else QuantizationConfig()
    return QuantizationResult(model, cfg, original, model_size_bytes(model), time.perf_counter() - t0, layers, skipped,
                              warnings, report, profile=prof)


def gguf_overrides(profile: ProfileLike, model: nn.Module) -> List[Tuple[str, str]]:
    """`export_gguf` overrides (anchored GGUF tensor names -> GGML type) for every 2-D weight the
    profile gives a GGML format (Linear layers and, by their module names, embeddings)."""
    import re

    from ..arch import gguf_tensor_name

    prof = as_profile(profile)
    out: List[Tuple[str, str]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        fmt = prof.format_for(name)
        if fmt is None:
            continue
        g = gguf_tensor_name(f"{name}.weight")
        if g is None:
            continue
        ggml = GGML_OF_FORMAT.get(fmt)
        if ggml is None:
            raise ConfigError(f"profile {prof.name!r} gives {name} the format {fmt!r}, which has no GGUF type; "
                              "use a GGML type (q4_K, iq2_xxs, q8_0, ...), fp16 or bf16 for a GGUF export")
        out.append((f"^{re.escape(g)}$", ggml))
    return out


def _preset(name: str, default: str, rules: Sequence[Tuple[str, str]], notes: str) -> DynamicQuantizationProfile:
    return DynamicQuantizationProfile(name, [LayerQuantizationConfig(p, f) for p, f in rules], default, notes=notes)


#: Named profiles. Patterns use HF Llama-family module names (``model.layers.N.self_attn.q_proj``,
#: ``...mlp.down_proj``, ``lm_head``).
PRESETS: Dict[str, DynamicQuantizationProfile] = {
    p.name: p for p in [
        _preset("attention-high-precision", "q4_K", [("*.self_attn.*", "q6_K")],
                "attention projections at 6.6 bits, everything else at 4.5"),
        _preset("mlp-low-precision", "q4_K", [("*.mlp.down_proj", "q3_K"), ("*.mlp.*", "q2_K")],
                "MLP at 2.6-3.4 bits (down_proj a step higher), attention at 4.5"),
        _preset("dynamic-2bit", "iq2_xxs",
                [("re:^model\\.layers\\.0\\.", "q4_K"), ("*.self_attn.v_proj", "q4_K"), ("*.self_attn.o_proj", "iq3_xxs"),
                 ("*.mlp.down_proj", "iq2_s"), ("lm_head", "q6_K")],
                "Unsloth-style dynamic low-bit: most weights at 2.06 bits, the first block, attn_v and the "
                "output at 4.5-6.6 bits, attn_output and ffn_down a step higher (needs 256-multiple widths)"),
        _preset("dynamic-1bit", "iq1_m",
                [("re:^model\\.layers\\.0\\.", "q4_K"), ("*.self_attn.v_proj", "q4_K"), ("*.self_attn.o_proj", "iq2_xxs"),
                 ("*.mlp.down_proj", "iq2_xxs"), ("lm_head", "q6_K")],
                "Unsloth-style 1.58-bit: gate/up/q/k at 1.75 bits, the rest at 2-6.6 bits"),
        _preset("int8-with-fp16-edges", "int8", [("re:^model\\.layers\\.0\\.", "fp16"), ("lm_head", "fp16")],
                "a 16/8-bit mix: INT8 everywhere except the first block and the output (FP16)"),
    ]
}
