"""`TrainingConfig` and a small causal-LM `Trainer`: plain training, quantization-aware training
(``quantization_mode="qat"``) and fine-tuning of a quantized model
(``quantization_mode="ptq"`` with ``enable_quantized_finetuning``), with checkpoints that resume
exactly (the same batches, optimizer state and random state: the same loss sequence).

Batches are windows of the training token ids drawn by a generator seeded with (seed, step), so
step k sees the same batch whether or not the run was interrupted before it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write
from ..errors import ConfigError
from ..quant.config import QuantizationConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "diffulex-edge/trainer-checkpoint/1"
MODES = (None, "ptq", "qat")
FINETUNE_METHODS = ("lora", "scales")


@dataclass
class TrainingConfig:
    """What to train and how. Defaults train in float with no quantization.

    quantization_mode: None (float), "qat" (fake-quantized forward, float gradients; `Trainer.convert`
        stores the result) or "ptq" (the model is quantized first; with enable_quantized_finetuning
        it is then fine-tuned while it stays quantized).
    quantization_bits / quantization_type: 8 + "dynamic" = W8A8 with per-token activations, 8 +
        "static" = W8A8 static (PTQ only: QAT trains dynamic), 4 = INT4 groups of `group_size`
        (weights only). quantization_scheme: any scheme or format name instead (e.g. "int4-g32",
        "ternary", "q4_K", "nf4"); it wins over bits/type.
    finetune_method: "lora" (adapters on the frozen quantized layers, merged at the end) or
        "scales" (the int8/int4 scales train, the codes stay).
    gradual_quantization_steps: QAT switches layers to fake quantization one by one over this many
        steps (0: all from the start). quantization_noise: fraction of each weight's rows quantized per
        step (Quant-Noise; 1 or 0 = all rows). distillation_weight: weight of the KL divergence to the
        float model's next-token distribution (a QAT loss; 0 = plain cross-entropy). learn_scales:
        QAT of INT8/INT4 also learns the scales (LSQ), which `convert` stores.
    """

    quantization_mode: Optional[str] = None
    quantization_bits: int = 8
    quantization_type: str = "dynamic"
    quantization_scheme: Optional[str] = None
    group_size: int = 128
    enable_quantized_finetuning: bool = False
    finetune_method: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    gradual_quantization_steps: int = 0
    quantization_noise: float = 0.0
    distillation_weight: float = 0.0
    learn_scales: bool = False
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0
    eval_batches: int = 16
    checkpoint_every: int = 0
    checkpoint_dir: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.quantization_mode not in MODES:
            raise ConfigError(f"quantization_mode must be one of None, 'ptq', 'qat'; got {self.quantization_mode!r}")
        if self.quantization_scheme is None and self.quantization_bits not in (4, 8):
            raise ConfigError(f"quantization_bits must be 8 or 4 (or give quantization_scheme); got {self.quantization_bits}")
        if self.quantization_type not in ("static", "dynamic"):
            raise ConfigError(f"quantization_type must be 'static' or 'dynamic'; got {self.quantization_type!r}")
        if self.finetune_method not in FINETUNE_METHODS:
            raise ConfigError(f"finetune_method must be one of {FINETUNE_METHODS}; got {self.finetune_method!r}")
        if self.enable_quantized_finetuning and self.quantization_mode != "ptq":
            raise ConfigError("enable_quantized_finetuning fine-tunes a quantized model: set quantization_mode='ptq'")
        if not 0.0 <= self.quantization_noise <= 1.0:
            raise ConfigError(f"quantization_noise must be in [0, 1]; got {self.quantization_noise}")
        for k in ("max_steps", "batch_size", "seq_len"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"{k} must be >= 1; got {getattr(self, k)}")

    @property
    def quantization_enabled(self) -> bool:
        return self.quantization_mode is not None

    def quantization_config(self) -> QuantizationConfig:
        """The QuantizationConfig the mode applies."""
        if self.quantization_scheme is not None:
            return QuantizationConfig.from_scheme(self.quantization_scheme)
        if self.quantization_bits == 4:
            return QuantizationConfig(dtype="int4", group_size=self.group_size)
        return QuantizationConfig(dtype="int8", mode=self.quantization_type)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainingConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown TrainingConfig field(s) {unknown}; known: {', '.join(sorted(names))}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike]) -> "TrainingConfig":
        """A YAML file of fields (missing fields take their defaults); a ``training:`` top-level
        key is also accepted."""
        import yaml

        with open(path, encoding="utf-8") as fh:
            d = yaml.safe_load(fh) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{os.fspath(path)}: expected a mapping of TrainingConfig fields")
        if set(d) == {"training"}:
            d = d["training"] or {}
        return cls.from_dict(d)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _tokens(data: Any, tokenizer: Any) -> torch.Tensor:
    from ..eval.perplexity import tokenize

    return tokenize(data, tokenizer)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, (tuple, list)) else out


class Trainer:
    """Train a causal LM (a HF model or any module mapping ``[batch, seq]`` ids to logits) on
    token windows of `train_data` (token ids, a text or a text file with `tokenizer`)."""

    def __init__(self, model: nn.Module, config: Optional[TrainingConfig] = None, train_data: Any = None,
                 eval_data: Any = None, tokenizer: Any = None, *, imatrix: Any = None,
                 show_progress: Optional[bool] = None) -> None:
        self.config = config or TrainingConfig()
        self.model = model
        self.show_progress = show_progress
        self.train_ids = None if train_data is None else _tokens(train_data, tokenizer)
        self.eval_ids = None if eval_data is None else _tokens(eval_data, tokenizer)
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self.teacher: Optional[nn.Module] = None
        c = self.config
        if c.distillation_weight > 0:
            self.teacher = copy.deepcopy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self._setup_quantization(imatrix)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # a model with nothing to train can still be evaluated; training it raises
        self.optimizer = torch.optim.AdamW(params or [torch.zeros(0, requires_grad=True)], lr=c.learning_rate,
                                           weight_decay=c.weight_decay)
        self._trainable = bool(params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        log.info("Trainer: %d trainable tensors (%d values), mode=%s", len(params), sum(p.numel() for p in params),
                 c.quantization_mode)

    # ---- quantization set-up ----------------------------------------------------------------
    def _setup_quantization(self, imatrix: Any) -> None:
        from ..quant.api import quantize_
        from ..quant.nn import QuantizedLinear
        from .finetune import add_lora, train_scales
        from .prepare import prepare_qat, qat_layers, set_qat_enabled

        c = self.config
        if c.quantization_mode == "qat":
            if not qat_layers(self.model):
                noise = c.quantization_noise if c.quantization_noise > 0 else 1.0
                prepare_qat(self.model, c.quantization_config(), imatrix=imatrix, noise=noise,
                            learn_scales=c.learn_scales)
            if c.gradual_quantization_steps > 0:
                set_qat_enabled(self.model, 0.0)
        elif c.quantization_mode == "ptq":
            if not any(isinstance(m, QuantizedLinear) for m in self.model.modules()):
                quantize_(self.model, c.quantization_config(), imatrix=imatrix, show_progress=False)
            if c.enable_quantized_finetuning:
                torch.manual_seed(c.seed)  # the adapters' initialisation is part of the run
                if c.finetune_method == "lora":
                    add_lora(self.model, c.lora_rank, c.lora_alpha)
                else:
                    train_scales(self.model)

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        return 1.0

    def _update_schedule(self) -> None:
        c = self.config
        if c.quantization_mode == "qat" and c.gradual_quantization_steps > 0:
            from .prepare import set_qat_enabled

            set_qat_enabled(self.model, min(1.0, (self.step + 1) / c.gradual_quantization_steps))

    # ---- data ---------------------------------------------------------------------------------
    def batch(self, step: Optional[int] = None) -> torch.Tensor:
        """The ``[batch_size, seq_len + 1]`` ids of training step `step` (default: the next one)."""
        if self.train_ids is None:
            raise ConfigError("the Trainer has no train_data")
        c = self.config
        n = self.train_ids.numel() - (c.seq_len + 1)
        if n < 1:
            raise ConfigError(f"train_data has {self.train_ids.numel()} tokens; seq_len {c.seq_len} needs more")
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + (self.step if step is None else step))
        starts = torch.randint(0, n + 1, (c.batch_size,), generator=g)
        return torch.stack([self.train_ids[s:s + c.seq_len + 1] for s in starts.tolist()])

    # ---- training -----------------------------------------------------------------------------
    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        x, y = ids[:, :-1], ids[:, 1:]
        logits = _logits(self.model, x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        if self.teacher is not None:
            with torch.no_grad():
                t = _logits(self.teacher, x).float()
            kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
            loss = loss + self.config.distillation_weight * kl / x.shape[1]
        return loss

    def training_step(self, batch: Optional[torch.Tensor] = None) -> float:
        """One optimizer step on `batch` (default: this step's batch); returns the loss."""
        if not self._trainable:
            raise ConfigError("nothing to train: every parameter of the model is frozen")
        self._update_schedule()
        self.model.train()
        ids = self.batch() if batch is None else batch
        # the step's random state (dropout, Quant-Noise) depends only on (seed, step)
        torch.manual_seed(self.config.seed * 7_919 + self.step)
        loss = self.loss(ids)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip and self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        value = float(loss.detach())
        self.history.append({"step": self.step, "loss": value})
        return value

    @torch.no_grad()
    def evaluate(self, data: Any = None, tokenizer: Any = None, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Mean next-token loss and perplexity on non-overlapping `seq_len` windows of the eval
        data (or `data`)."""
        ids = self.eval_ids if data is None else _tokens(data, tokenizer)
        if ids is None:
            raise ConfigError("no eval data: pass eval_data to the Trainer or data= here")
        c = self.config
        L = c.seq_len + 1
        n_win = ids.numel() // L
        if n_win < 1:
            raise ConfigError(f"eval data has {ids.numel()} tokens, fewer than one window of {L}")
        limit = max_batches if max_batches is not None else c.eval_batches
        wins = ids[: n_win * L].reshape(n_win, L)[: limit * c.batch_size if limit else None]
        was = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, wins.shape[0], c.batch_size):
            b = wins[i:i + c.batch_size]
            logits = _logits(self.model, b[:, :-1])
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += b[:, 1:].numel()
        self.model.train(was)
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}

    def fit(self, steps: Optional[int] = None) -> List[Dict[str, float]]:
        """Train up to `steps` (default ``max_steps``) total steps, evaluating and checkpointing as
        configured; returns the history."""
        c = self.config
        end = c.max_steps if steps is None else int(steps)
        rng = range(self.step, end)
        if self.show_progress is not False and len(rng) > 1:
            from tqdm.auto import tqdm

            rng = tqdm(rng, desc=f"train ({c.quantization_mode or 'float'})", unit="step",
                       disable=None if self.show_progress is None else False, leave=False)
        for _ in rng:
            loss = self.training_step()
            if hasattr(rng, "set_postfix"):
                rng.set_postfix(loss=f"{loss:.4f}")
            if c.eval_every and self.step % c.eval_every == 0 and self.eval_ids is not None:
                ev = self.evaluate()
                self.history[-1].update({"eval_loss": ev["loss"], "eval_perplexity": ev["perplexity"]})
                log.info("step %d: loss %.4f, eval ppl %.3f", self.step, loss, ev["perplexity"])
            if c.checkpoint_every and c.checkpoint_dir and self.step % c.checkpoint_every == 0:
                self.save_checkpoint(os.path.join(c.checkpoint_dir, "trainer.pt"))
        return self.history

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, path: Union[str, os.PathLike]) -> str:
        """Model state, optimizer, scheduler, step, history and RNG state, written atomically."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        state = {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "step": self.step,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "history": self.history,
                 "rng": torch.random.get_rng_state()}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    def resume(self, path: Union[str, os.PathLike]) -> int:
        """Continue from a checkpoint of the same set-up; returns the step it resumes at."""
        path = os.fspath(path)
        try:
            st = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ConfigError(f"{path}: not a readable trainer checkpoint ({e})") from e
        if not isinstance(st, dict) or st.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{path}: not a diffulex-edge trainer checkpoint")
        mine = self.config.to_dict()
        differ = sorted(k for k in mine if k not in ("max_steps", "eval_every", "checkpoint_every", "checkpoint_dir")
                        and st["config"].get(k) != mine[k])
        if differ:
            raise ConfigError(f"{path} was saved with another TrainingConfig ({', '.join(differ)} differ)")
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.step, self.history = int(st["step"]), list(st["history"])
        torch.random.set_rng_state(st["rng"])
        return self.step

    # ---- results --------------------------------------------------------------------------------
    def convert(self, show_progress: Optional[bool] = False):
        """The trained model in its deployable form, in place: QAT layers quantized (the PTQ
        result of the trained weights, returned), adapters merged / scales written back into the
        quantized layers (returns None). A float run returns None."""
        from .finetune import merge_lora, merge_scales
        from .prepare import convert, qat_layers

        if qat_layers(self.model):
            return convert(self.model, show_progress=show_progress)
        merge_lora(self.model)
        merge_scales(self.model)
        self.model.eval()
        return None


__all__ = ["TrainingConfig", "Trainer"]
