"""Quantization configuration: what format, which layers, how to handle awkward shapes."""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from .. import _native
from ..errors import ConfigError

#: INT4 group sizes the native format supports.
INT4_GROUP_SIZES = (32, 64, 128, 256)
MODES = ("weight_only", "dynamic", "static")
ON_INDIVISIBLE = ("error", "skip", "pad")
KERNELS = ("auto", "scalar", "avx2", "avx512", "avx_vnni", "avx512_vnni")

#: Activation-range observers of mode="static" (see diffulex_edge.calib).
OBSERVERS = ("minmax", "percentile", "mse")

#: The packed formats of the native registry (``formats/registry.rs``), in its order: a dict per
#: format with ``name``, ``block_size``, ``takes_importance`` and ``ggml_type``. Every one of
#: them is a :class:`QuantizationDtype` member, a scheme name and a layer format.
PACKED_FORMATS: Dict[str, Dict[str, Any]] = {f["name"]: f for f in _native.packed_formats()}


class _Dtype(str, enum.Enum):
    """Methods of :class:`QuantizationDtype` (whose members are built from the native registry)."""

    @property
    def bits(self) -> float:
        """Bits per weight: 16 / 8 / 4 for the float and integer formats (value bits), and for
        packed formats the storage bits of a 4096-wide row, scales included (4.5 for q4_K)."""
        nominal = {"fp16": 16, "bf16": 16, "int8": 8, "int4": 4}
        if self.value in nominal:
            return nominal[self.value]
        return _native.packed_row_bytes(self.value, 4096) * 8 / 4096

    @property
    def is_float(self) -> bool:
        return self.value in ("fp16", "bf16")

    @property
    def is_packed(self) -> bool:
        """Whether the weight is stored as one packed byte row per output (a registry format)."""
        return self.value in PACKED_FORMATS

    @property
    def takes_importance(self) -> bool:
        """Whether an importance matrix (imatrix) steers this format's scale search."""
        return self.value == "int4" or bool(self.is_packed and PACKED_FORMATS[self.value]["takes_importance"])

    @property
    def block_size(self) -> int:
        """Weights per block (a row length must be a multiple of it): the registry's for packed
        formats, 1 for the others (int4's group size is a config field)."""
        return int(PACKED_FORMATS[self.value]["block_size"]) if self.is_packed else 1

    @classmethod
    def parse(cls, value: Union["QuantizationDtype", str]) -> "QuantizationDtype":
        """Accept a member, its value in any case (``"Q4_K"``, ``"nf4"``) or a common alias
        ("float16", "half", "bfloat16", "qint8")."""
        if isinstance(value, cls):
            return value
        key = str(value).strip()
        if key.lower().startswith("quantizationdtype."):
            key = key.split(".", 1)[1]
        key = _DTYPE_ALIASES.get(key.lower(), key).lower()
        for member in cls:
            if member.value.lower() == key:
                return member
        raise ConfigError(f"unknown dtype {value!r}; supported: {', '.join(d.value for d in cls)}")

    def __str__(self) -> str:
        return self.value


#: What the error of an imatrix given for a format that does not use one suggests.
_IMATRIX_FORMATS = "an imatrix steers int4 and " + ", ".join(
    n for n, f in PACKED_FORMATS.items() if f["takes_importance"])

_DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "f16": "fp16", "bfloat16": "bf16", "qint8": "int8", "i8": "int8",
                  "8": "int8", "qint4": "int4", "i4": "int4", "4": "int4"}

#: Storage format of quantized weights: ``FP16``, ``BF16``, ``INT8`` (per channel), ``INT4``
#: (grouped) and every packed format of the native registry (``Q8_0``, ``Q4_K``, ``IQ4_XS``,
#: ``TQ2_0``, ...: a member's value is its canonical spelling, e.g. ``"q4_K"``).
QuantizationDtype = _Dtype(  # type: ignore[call-overload]
    "QuantizationDtype",
    [("FP16", "fp16"), ("BF16", "bf16"), ("INT8", "int8"), ("INT4", "int4")]
    + [(name.upper(), name) for name in PACKED_FORMATS],
    module=__name__,
    qualname="QuantizationDtype",
)

#: Scheme names (:meth:`QuantizationConfig.from_scheme`); ``fp32`` is the unquantized reference,
#: which only comparisons use.
_SCHEME_RE = re.compile(r"^(fp32|fp16|bf16|int8|w8a8(?:-(dynamic|static))?|int4-g(\d+))(-(sym|asym))?$")
SCHEME_HELP = ("fp16, bf16, int8, w8a8-dynamic, w8a8-static or int4-g32/64/128/256 (optionally with -sym or -asym), "
               "or a packed format: " + ", ".join(PACKED_FORMATS))


@dataclass
class QuantizationConfig:
    """How to quantize a model.

    Args:
        dtype: storage format (``QuantizationDtype`` or its name). ``None`` means "not chosen":
            a quantizer fills in its own format; a config loaded from YAML without a dtype is off.
        mode: ``"weight_only"`` (default; activations stay float), ``"dynamic"`` (INT8 only:
            activations quantized per token at run time, int8 x int8 kernel) or ``"static"``
            (INT8 only: one activation scale per layer fixed from calibration data).
        group_size: INT4 group length along the input dimension: 32, 64, 128 or 256 (packed
            formats have a fixed block size, ``dtype.block_size``; this field does not apply).
        symmetric: ``None`` picks the format's default: symmetric for INT8, asymmetric (with
            zero points) for INT4.
        exclude_layers: names to keep in full precision. An entry matches a module name exactly,
            as a prefix ending at a dot (``"model.layers.0"``), as a glob (``"*.lm_head"``) or as a
            regular expression with the prefix ``"re:"``.
        on_indivisible: INT4 layers whose in_features is not a multiple of group_size: ``"error"``
            (default, names the layer), ``"skip"`` (keep it in full precision, with a warning) or
            ``"pad"`` (the last group of each row is shorter; exact, slightly larger).
        skip_tied: keep Linear layers whose weight is shared with another module (e.g. a
            ``lm_head`` tied to the embeddings) in full precision, since quantizing them would
            add a copy instead of saving memory.
        kernel: CPU kernel level, ``"auto"`` or one of ``"scalar"``, ``"avx2"``, ``"avx512"``, ``"avx_vnni"``
            (AVX2 + VEX VNNI for W8A8), ``"avx512_vnni"`` (AVX-512 + VNNI for W8A8).
        enabled: ``False`` switches quantization off while keeping the settings. Defaults to on
            when a dtype is given.
        observer: how ``mode="static"`` turns calibration activations into the fixed activation
            scale: ``"minmax"`` (largest |x|), ``"percentile"`` (the ``percentile``-th percentile
            of |x|) or ``"mse"`` (the clip minimising the squared quantization error over the
            |x| histogram).
        percentile: for ``observer="percentile"``, in (0, 100]; default 99.99.
        imatrix: path of an importance-matrix file (llama.cpp GGUF or legacy .dat) for INT4 and
            the packed formats with ``dtype.takes_importance``: each group's (block's) scales
            minimise the importance-weighted error. Quantizers also
            take ``imatrix=`` (an :class:`~diffulex_edge.calib.ImportanceMatrix`) directly.
        check_coherence: run the quantized model and the original on a few inputs (the
            calibration data, else random token ids for a model with ``config.vocab_size``) and
            warn, with the measured KL divergence and top-1 agreement, when the output has
            collapsed (``result.coherence``). ``None`` (default): only for formats below 3 bits
            per weight (q2_K, tq2_0, tq1_0). See :mod:`diffulex_edge.quant.coherence`.
    """

    dtype: Optional[Union[QuantizationDtype, str]] = None
    mode: str = "weight_only"
    group_size: int = 128
    symmetric: Optional[bool] = None
    exclude_layers: List[str] = field(default_factory=list)
    on_indivisible: str = "error"
    skip_tied: bool = True
    kernel: str = "auto"
    enabled: Optional[bool] = None
    observer: str = "minmax"
    percentile: float = 99.99
    imatrix: Optional[str] = None
    check_coherence: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.dtype is not None:
            self.dtype = QuantizationDtype.parse(self.dtype)
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; supported: {', '.join(MODES)}")
        # fields are checked for the format they apply to: group_size only constrains INT4 (a config
        # without a dtype is checked again when a quantizer gives it one, see with_dtype)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"group_size must be a positive int, got {self.group_size!r}")
        if self.dtype == QuantizationDtype.INT4 and self.group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"group_size must be one of {INT4_GROUP_SIZES} for int4, got {self.group_size!r}")
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be True, False or None, got {self.symmetric!r}")
        if isinstance(self.exclude_layers, str):
            self.exclude_layers = [self.exclude_layers]
        if self.exclude_layers is not None and not isinstance(self.exclude_layers, (list, tuple, set, frozenset)):
            raise ConfigError(f"exclude_layers must be a list of strings, got {self.exclude_layers!r}")
        self.exclude_layers = list(self.exclude_layers or [])
        if not all(isinstance(x, str) for x in self.exclude_layers):
            raise ConfigError(f"exclude_layers must be a list of strings, got {self.exclude_layers!r}")
        if not isinstance(self.skip_tied, bool):
            raise ConfigError(f"skip_tied must be true or false, got {self.skip_tied!r}")
        if self.on_indivisible not in ON_INDIVISIBLE:
            raise ConfigError(
                f"unknown on_indivisible {self.on_indivisible!r}; supported: {', '.join(ON_INDIVISIBLE)}"
            )
        if self.kernel not in KERNELS:
            raise ConfigError(f"unknown kernel {self.kernel!r}; supported: {', '.join(KERNELS)}")
        if self.check_coherence is not None and not isinstance(self.check_coherence, bool):
            raise ConfigError(f"check_coherence must be true, false or null, got {self.check_coherence!r}")
        if self.enabled is not None and not isinstance(self.enabled, bool):
            raise ConfigError(f"enabled must be true or false, got {self.enabled!r}")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer {self.observer!r}; supported: {', '.join(OBSERVERS)}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) or not 0 < self.percentile <= 100:
            raise ConfigError(f"percentile must be a number in (0, 100], got {self.percentile!r}")
        self.percentile = float(self.percentile)
        if self.imatrix is not None:
            if not isinstance(self.imatrix, (str, os.PathLike)):
                raise ConfigError(
                    f"imatrix in a config must be a file path, got {type(self.imatrix).__name__}; "
                    "pass an ImportanceMatrix object as quantize(..., imatrix=...) instead"
                )
            self.imatrix = os.fspath(self.imatrix)
            if self.dtype is not None and not self.dtype.takes_importance:
                raise ConfigError(f"dtype {self.dtype} does not use an imatrix; {_IMATRIX_FORMATS}")
        if self.mode != "weight_only" and self.dtype is not None and self.dtype != QuantizationDtype.INT8:
            raise ConfigError(
                f"mode={self.mode!r} quantizes activations to int8 and needs dtype int8, got {self.dtype}; "
                "use mode='weight_only' for other formats"
            )

    # -- derived -------------------------------------------------------------------------
    @property
    def is_enabled(self) -> bool:
        """Whether this config asks for quantization at all."""
        if self.enabled is not None:
            return self.enabled and self.dtype is not None
        return self.dtype is not None

    @property
    def resolved_symmetric(self) -> bool:
        if self.symmetric is not None:
            return self.symmetric
        return self.dtype != QuantizationDtype.INT4

    def with_dtype(self, dtype: Union[QuantizationDtype, str]) -> "QuantizationConfig":
        return dataclasses.replace(self, dtype=QuantizationDtype.parse(dtype))

    # -- scheme names ----------------------------------------------------------------------
    @classmethod
    def from_scheme(cls, scheme: str, **fields: Any) -> "QuantizationConfig":
        """The config a scheme name stands for: ``fp16``, ``bf16``, ``int8`` (weight-only),
        ``w8a8-dynamic`` / ``w8a8-static`` (``w8a8`` is dynamic), ``int4-g32`` ... ``int4-g256``,
        each optionally suffixed ``-sym`` / ``-asym``, or a packed format's name (``q4_K``,
        ``iq4_xs``, ``nf4``, any case). The one grammar of the CLI (``quantize
        --scheme``, ``compare --schemes``) and :func:`~diffulex_edge.eval.compare_schemes`.
        `fields` set the other config keys (``exclude_layers=...``)."""
        if isinstance(scheme, str) and scheme.strip().lower() in {n.lower() for n in PACKED_FORMATS}:
            return cls(dtype=scheme.strip(), **fields)
        m = _SCHEME_RE.match(str(scheme).strip().lower()) if isinstance(scheme, str) else None
        if not m or m.group(1) == "fp32":
            raise ConfigError(f"unknown scheme {scheme!r}; use {SCHEME_HELP}")
        name, w8mode, group, _, sym = m.groups()
        kw: Dict[str, Any] = dict(fields)
        if sym is not None:
            kw["symmetric"] = sym == "sym"
        if name in ("fp16", "bf16", "int8"):
            return cls(dtype=name, **kw)
        if name.startswith("w8a8"):
            return cls(dtype="int8", mode=w8mode or "dynamic", **kw)
        return cls(dtype="int4", group_size=int(group), **kw)

    # -- (de)serialization ---------------------------------------------------------------
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "QuantizationConfig":
        """Build from a mapping; missing keys take their defaults, unknown keys are an error.

        A mapping with a single ``quantization`` key (a section of a larger config) is unwrapped.
        """
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"a quantization config must be a mapping, got {type(data).__name__}")
        if set(data) == {"quantization"}:
            return cls.from_dict(data["quantization"])
        known = set(cls.field_names())
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, source: Union[str, os.PathLike]) -> "QuantizationConfig":
        """Load from a YAML file path or a YAML string. Quantization is off unless it sets a dtype."""
        import yaml

        text = None
        if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source and os.path.exists(source)):
            with open(source, "r", encoding="utf-8") as fh:
                text = fh.read()
        elif isinstance(source, str) and (source.endswith((".yaml", ".yml")) and "\n" not in source):
            raise ConfigError(f"config file {source!r} does not exist")
        else:
            text = source
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML in quantization config: {e}") from e
        cfg = cls.from_dict(data if data is not None else {})
        inner = data
        while isinstance(inner, Mapping) and set(inner) == {"quantization"}:
            inner = inner["quantization"]
        if cfg.dtype is None and cfg.enabled is None and not (isinstance(inner, Mapping) and "dtype" in inner):
            # a file that names no dtype means "off"; without this a quantizer would fill in its own format
            cfg = dataclasses.replace(cfg, enabled=False)
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dtype"] = None if self.dtype is None else str(self.dtype)
        return d

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)
