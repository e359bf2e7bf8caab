"""`CalibrationDataset`: the model inputs calibration runs over, from text (with the user's
tokenizer), token tensors or any DataLoader/iterable of batches."""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from ..data import read_text
from ..errors import ConfigError

#: Default number of calibration sequences and the accepted range (llama.cpp's imatrix and most
#: PTQ papers use a few hundred sequences; fewer gives noisy statistics, more rarely helps).
DEFAULT_SAMPLES = 512
MIN_SAMPLES, MAX_SAMPLES = 128, 1024

TextLike = Union[str, os.PathLike, Sequence[str]]


def _encode(tokenizer: Any, text: str) -> List[int]:
    if hasattr(tokenizer, "encode"):
        try:
            enc = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:  # tokenizers.Tokenizer.encode has no such keyword
            enc = tokenizer.encode(text)
    elif callable(tokenizer):
        enc = tokenizer(text)
    else:
        raise ConfigError(f"tokenizer must have .encode(text) or be callable, got {type(tokenizer).__name__}")
    enc = getattr(enc, "ids", enc)
    if isinstance(enc, dict) or hasattr(enc, "keys"):
        enc = enc["input_ids"]
    return list(enc)


def _rows_of(batch: Any) -> int:
    """Sequences in one batch: the leading dimension of its first tensor (1 for a 1-D one)."""
    t = batch
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        t = batch["input_ids"] if "input_ids" in batch else next(iter(batch.values()))
    elif isinstance(batch, (tuple, list)):
        t = batch[0]
    if isinstance(t, torch.Tensor):
        return int(t.shape[0]) if t.dim() > 1 else 1
    return 1


class CalibrationDataset:
    """Model inputs for calibration.

    Args:
        data: a text (``str``), a text file path, or a list of texts (then ``tokenizer`` is
            required; the token stream is cut into consecutive ``seq_len`` windows); a LongTensor of
            token ids (``[n, seq]`` rows are samples, a 1-D stream is cut into windows); or any
            iterable of model inputs such as a ``DataLoader`` (tensors, tuples or dicts, used as is).
        tokenizer: a ``tokenizers.Tokenizer``, a Hugging Face tokenizer, or a callable text -> ids.
        n_samples: how many sequences to use, 128..1024 (default 512). Data holding fewer is used
            whole, with a warning. ``None`` takes all of the data without the range check.
        seq_len: tokens per sequence for text and 1-D token streams (default 512).
        batch_size: sequences per forward pass for text and token tensors.
        show_progress: progress bar over samples (``None``: tqdm decides).

    Iterating yields model inputs; ``len()`` is the number of batches, :attr:`n_samples` the
    number of sequences.
    """

    def __init__(
        self,
        data: Any,
        tokenizer: Any = None,
        *,
        n_samples: Optional[int] = DEFAULT_SAMPLES,
        seq_len: int = 512,
        batch_size: int = 1,
        show_progress: Optional[bool] = None,
    ) -> None:
        if n_samples is not None and (
            isinstance(n_samples, bool) or not isinstance(n_samples, int) or not MIN_SAMPLES <= n_samples <= MAX_SAMPLES
        ):
            raise ConfigError(
                f"n_samples must be an int in {MIN_SAMPLES}..{MAX_SAMPLES} (or None for all of the data), got {n_samples!r}"
            )
        for key, v in (("seq_len", seq_len), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key} must be a positive int, got {v!r}")
        self.seq_len, self.batch_size, self.show_progress = seq_len, batch_size, show_progress
        limit = n_samples if n_samples is not None else None
        if isinstance(data, (str, os.PathLike)) or (
            isinstance(data, (list, tuple)) and data and all(isinstance(t, (str, os.PathLike)) for t in data)
        ):
            self._batches = self._from_text(data, tokenizer, limit)
        elif isinstance(data, torch.Tensor):
            self._batches = self._from_tokens(data, limit)
        elif isinstance(data, Iterable):
            self._batches = self._from_iterable(data, limit)
        else:
            raise ConfigError(
                f"calibration data must be text, a token tensor or an iterable of batches, got {type(data).__name__}"
            )
        self.n_samples = sum(_rows_of(b) for b in self._batches)
        if self.n_samples == 0:
            raise ConfigError("the calibration data is empty; pass at least one sample")
        if n_samples is not None and self.n_samples < n_samples:
            warnings.warn(
                f"the calibration data holds {self.n_samples} sample(s), fewer than n_samples={n_samples}; using all of it",
                stacklevel=2,
            )

    # -- sources -------------------------------------------------------------------------------
    def _from_text(self, data: TextLike, tokenizer: Any, limit: Optional[int]) -> List[Any]:
        if tokenizer is None:
            raise ConfigError("text calibration data needs a tokenizer: pass tokenizer=... (tokenizers or HF)")
        texts = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        need = None if limit is None else limit * self.seq_len
        ids: List[int] = []
        for t in texts:
            text = read_text(t)
            # tokenize paragraph by paragraph and stop once there are enough tokens
            start = 0
            while start < len(text) and (need is None or len(ids) < need):
                end = text.find("\n\n", start + 65536)
                end = len(text) if end < 0 else end
                ids.extend(_encode(tokenizer, text[start:end]))
                start = end
            if need is not None and len(ids) >= need:
                break
        return self._from_tokens(torch.tensor(ids, dtype=torch.long), limit)

    def _from_tokens(self, ids: torch.Tensor, limit: Optional[int]) -> List[Any]:
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ConfigError(f"token tensors must hold integer ids, got dtype {ids.dtype}")
        if ids.dim() == 1:
            n = ids.numel() // self.seq_len
            if n == 0:
                raise ConfigError(f"{ids.numel()} tokens are fewer than one window of seq_len={self.seq_len}")
            ids = ids[: n * self.seq_len].reshape(n, self.seq_len)
        elif ids.dim() != 2:
            raise ConfigError(f"token tensors must be [n_samples, seq] or 1-D, got shape {tuple(ids.shape)}")
        ids = ids[:limit].to(torch.long)
        return list(ids.split(self.batch_size))

    def _from_iterable(self, data: Iterable[Any], limit: Optional[int]) -> List[Any]:
        out: List[Any] = []
        seen = 0
        for b in data:
            if limit is not None and seen >= limit:
                break
            out.append(b)
            seen += _rows_of(b)
        return out

    # -- iteration -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._batches)

    def __getitem__(self, i: int) -> Any:
        return self._batches[i]

    def progress(self, desc: str = "calibrate") -> Iterator[Any]:
        """Iterate with a progress bar counting samples (not batches)."""
        if self.show_progress is False:
            yield from self._batches
            return
        from tqdm.auto import tqdm

        with tqdm(total=self.n_samples, desc=desc, unit="sample", disable=None if self.show_progress is None else False,
                  leave=False) as bar:
            for b in self._batches:
                yield b
                bar.update(_rows_of(b))

    def __repr__(self) -> str:
        return f"CalibrationDataset(n_samples={self.n_samples}, batches={len(self)})"


def as_calibration(data: Any, show_progress: Optional[bool] = None) -> CalibrationDataset:
    """A `CalibrationDataset` as is, or one wrapping an iterable of model inputs (all of it)."""
    if isinstance(data, CalibrationDataset):
        return data
    if data is None:
        raise ConfigError("calibration data is required: pass a CalibrationDataset or an iterable of model inputs")
    if isinstance(data, torch.Tensor):
        return CalibrationDataset(data, n_samples=None, seq_len=max(1, data.shape[-1]), show_progress=show_progress)
    return CalibrationDataset(data, n_samples=None, show_progress=show_progress)


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Feed one calibration item: a tensor is a positional input, a dict keyword inputs, a
    tuple/list positional inputs. Hugging Face models get ``use_cache=False`` (nothing to cache)."""
    kw = {}
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        kw["use_cache"] = False
    if isinstance(batch, dict) or (hasattr(batch, "keys") and not isinstance(batch, torch.Tensor)):
        return model(**{**kw, **dict(batch)})
    if isinstance(batch, (tuple, list)):
        return model(*batch, **kw)
    return model(batch, **kw)
