"""Perplexity over a held-out text, and agreement with a reference model (KL divergence, top-1).

Windows of `seq_len` tokens advance by `stride`; each window scores only the tokens not scored by
an earlier window (the first window scores all but its first token), so every token after the
first is predicted exactly once, with up to `seq_len - stride` tokens of extra context.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data import read_text
from ..errors import ConfigError, UnsupportedFormatError

TextOrTokens = Union[str, os.PathLike, torch.Tensor, Sequence[int]]


def tokenize(text_or_tokens: TextOrTokens, tokenizer: Any = None) -> torch.Tensor:
    """A 1-D LongTensor of token ids from token ids, a text, or a path to a text file.

    `tokenizer` may be a ``tokenizers.Tokenizer`` or a Hugging Face tokenizer (anything with
    ``encode``); texts need one.
    """
    if isinstance(text_or_tokens, torch.Tensor):
        ids = text_or_tokens.reshape(-1).to(torch.long)
    elif isinstance(text_or_tokens, (str, os.PathLike)):
        text = read_text(text_or_tokens)
        if tokenizer is None:
            raise ConfigError("a text needs a tokenizer: pass tokenizer=... (a tokenizers.Tokenizer or a HF tokenizer)")
        enc = tokenizer.encode(text)
        ids = torch.tensor(getattr(enc, "ids", enc), dtype=torch.long)
    else:
        ids = torch.tensor(list(text_or_tokens), dtype=torch.long)
    if ids.numel() < 2:
        raise ConfigError(f"need at least 2 tokens to measure perplexity, got {ids.numel()}")
    return ids


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Run a causal LM on ``[batch, seq]`` ids; accepts models returning a tensor or an object
    with ``.logits`` (Hugging Face)."""
    out = model(ids)
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise UnsupportedFormatError(
            f"expected the model to return logits [batch, seq, vocab], got {type(out).__name__}"
            + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else "")
        )
    return out


def windows(n_tokens: int, seq_len: int, stride: int) -> List[Tuple[int, int, int]]:
    """(start, end, first scored position within the window) for each window."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    out = []
    scored_until = 1  # token 0 is never predicted
    start = 0
    while scored_until < n_tokens:
        end = min(start + seq_len, n_tokens)
        out.append((start, end, scored_until - start))
        scored_until = end
        if end == n_tokens:
            break
        # the next window ends `stride` tokens later (seq_len - 1 when stride == seq_len, since one
        # token of context is needed to predict the first new token)
        start = end + stride - seq_len if stride < seq_len else end - 1
    return out


@dataclass
class PerplexityResult:
    """Perplexity and, when a reference model was given, agreement with it."""

    perplexity: float
    mean_nll: float
    n_tokens: int
    n_windows: int
    seq_len: int
    stride: int
    kl_divergence: Optional[float] = None
    """Mean KL(P_reference || P_model) per token, in nats."""
    top1_agreement: Optional[float] = None
    """Share of scored tokens whose argmax prediction matches the reference's."""
    reference_perplexity: Optional[float] = None

    def __repr__(self) -> str:
        s = f"PerplexityResult(ppl={self.perplexity:.4f} over {self.n_tokens} tokens, seq_len={self.seq_len}, stride={self.stride}"
        if self.kl_divergence is not None:
            s += (f"; vs reference (ppl {self.reference_perplexity:.4f}): KL={self.kl_divergence:.3e} nats/token, "
                  f"top-1 agreement={100 * self.top1_agreement:.2f}%")
        return s + ")"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def perplexity(
    model: nn.Module,
    text_or_tokens: TextOrTokens,
    tokenizer: Any = None,
    *,
    seq_len: int = 256,
    stride: Optional[int] = None,
    max_tokens: Optional[int] = None,
    reference_model: Optional[nn.Module] = None,
    show_progress: Optional[bool] = None,
) -> PerplexityResult:
    """exp(mean negative log-likelihood) of the text under `model`, in windows of `seq_len`.

    With `reference_model` (e.g. the FP32 original), also the mean KL divergence from the
    reference's next-token distribution and the top-1 agreement, as llama.cpp's perplexity tool
    reports them.
    """
    ids = tokenize(text_or_tokens, tokenizer)
    if max_tokens is not None:
        ids = ids[: int(max_tokens)]
    stride = seq_len if stride is None else int(stride)
    wins = windows(ids.numel(), int(seq_len), stride)
    nll = 0.0
    ref_nll = 0.0
    kl = 0.0
    agree = 0
    count = 0
    items = wins
    if show_progress is not False and len(wins) > 1:
        from tqdm.auto import tqdm

        items = tqdm(wins, desc="perplexity", unit="window", leave=False, disable=None if show_progress is None else False)
    models = [model] + ([reference_model] if reference_model is not None else [])
    training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.inference_mode():
            for start, end, first in items:
                chunk = ids[start:end].unsqueeze(0)
                targets = chunk[0, first:]
                logp = F.log_softmax(logits_of(model, chunk)[0, first - 1 : -1].float(), dim=-1)
                nll -= float(logp.gather(1, targets[:, None]).sum(dtype=torch.float64))
                count += targets.numel()
                if reference_model is not None:
                    ref = F.log_softmax(logits_of(reference_model, chunk)[0, first - 1 : -1].float(), dim=-1)
                    ref_nll -= float(ref.gather(1, targets[:, None]).sum(dtype=torch.float64))
                    kl += float((ref.exp() * (ref - logp)).sum(dtype=torch.float64))
                    agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    finally:
        for m, t in zip(models, training):
            m.train(t)
    mean = nll / count
    result = PerplexityResult(math.exp(mean), mean, count, len(wins), int(seq_len), stride)
    if reference_model is not None:
        result.kl_divergence = kl / count
        result.top1_agreement = agree / count
        result.reference_perplexity = math.exp(ref_nll / count)
    return result


def llama_cpp_perplexity(
    model: nn.Module,
    text_or_tokens: TextOrTokens,
    tokenizer: Any = None,
    *,
    n_ctx: int = 512,
    bos_id: Optional[int] = None,
    max_chunks: Optional[int] = None,
    batch: int = 16,
) -> PerplexityResult:
    """Perplexity with llama.cpp's `llama-perplexity` protocol, for comparing with its figures.

    The token stream is cut into ``len // n_ctx`` disjoint chunks of ``n_ctx`` tokens (the rest is
    dropped); with ``bos_id`` (a model whose GGUF has ``add_bos_token``) each chunk's first token is
    replaced by BOS; in each chunk only the second half is scored: the logits at positions
    ``n_ctx // 2 .. n_ctx - 2`` predict tokens ``n_ctx // 2 + 1 .. n_ctx - 1`` (tools/perplexity/
    perplexity.cpp, `perplexity()`: ``first = n_ctx/2``, ``n_ctx - 1 - first`` tokens per chunk).
    """
    ids = tokenize(text_or_tokens, tokenizer)
    n_ctx = int(n_ctx)
    if n_ctx < 4:
        raise ConfigError(f"n_ctx must be >= 4, got {n_ctx}")
    n_chunk = ids.numel() // n_ctx
    if max_chunks is not None:
        n_chunk = min(n_chunk, int(max_chunks))
    if n_chunk < 1:
        raise ConfigError(f"need at least n_ctx={n_ctx} tokens, got {ids.numel()}")
    chunks = ids[: n_chunk * n_ctx].reshape(n_chunk, n_ctx).clone()
    if bos_id is not None:
        chunks[:, 0] = int(bos_id)
    first = n_ctx // 2
    nll = 0.0
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, n_chunk, max(1, int(batch))):
                x = chunks[b : b + batch]
                logp = F.log_softmax(logits_of(model, x)[:, first : n_ctx - 1].float(), dim=-1)
                targets = x[:, first + 1 :]
                nll -= float(logp.gather(2, targets[..., None]).sum(dtype=torch.float64))
    finally:
        model.train(training)
    count = n_chunk * (n_ctx - 1 - first)
    mean = nll / count
    return PerplexityResult(math.exp(mean), mean, count, n_chunk, n_ctx, n_ctx)
