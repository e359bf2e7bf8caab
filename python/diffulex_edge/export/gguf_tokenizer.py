"""Tokenizer metadata (`tokenizer.ggml.*`) for GGUF export from a Hugging Face tokenizer.

Keys and token-type codes as llama.cpp reads them (gguf-py `Keys.Tokenizer`, `TokenType`):
byte-level BPE -> `gpt2` with merges; BPE with byte fallback (Llama/Mistral tokenizer.json) or a
SentencePiece model -> `llama` with scores and byte tokens.
"""

from __future__ import annotations

import json
import re
from typing import Any, List, Tuple

from ..errors import UnsupportedFormatError
from ..gguf.file import ValueType

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

# Pre-tokenizer split regexes of HF tokenizers and the `tokenizer.ggml.pre` name under which
# llama.cpp (src/llama-vocab.cpp, `llama_vocab::impl::load`) applies the same split. With a name
# llama.cpp does not know, or "default", it splits with other regexes and tokenizes differently.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _flatten(pre) -> List[dict]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for q in pre.get("pretokenizers", []) for p in _flatten(q)]
    return [pre]


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """The `tokenizer.ggml.pre` value for a byte-level BPE `tokenizer.json`.

    * a lone `ByteLevel` with its built-in regex (GPT-2's) -> "gpt-2" (llama.cpp's
      `LLAMA_VOCAB_PRE_TYPE_GPT2` splits with exactly that regex);
    * `Split` with the Llama-3 / Qwen2 regex followed by a regex-free `ByteLevel` -> "llama-bpe" /
      "qwen2".
    Anything else raises: llama.cpp would silently tokenize differently from the HF tokenizer.
    """
    parts = _flatten(tokenizer_json.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"]:
        bl = parts[0]
        if bl.get("add_prefix_space", False):
            raise UnsupportedFormatError("ByteLevel pre-tokenizer with add_prefix_space=True has no llama.cpp equivalent")
        if bl.get("use_regex", True):
            return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = parts[0].get("pattern", {})
        rx = pattern.get("Regex", pattern.get("String"))
        if rx in _SPLIT_PRE:
            return _SPLIT_PRE[rx]
    raise UnsupportedFormatError(
        f"pre-tokenizer {json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]} has no known llama.cpp counterpart "
        "(supported: ByteLevel with the GPT-2 regex, Llama-3 and Qwen2 Split regexes)")


def _adds_special(tok) -> Tuple[Any, Any]:
    """(adds BOS, adds EOS) when the tokenizer encodes with special tokens, found by encoding a
    probe text; (None, None) when it cannot be found out."""
    try:
        ids = list(tok("a b")["input_ids"])
    except Exception:  # noqa: BLE001 - any tokenizer failure means "unknown"
        return None, None
    bos, eos = getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)
    return (bos is not None and bool(ids) and ids[0] == bos), (eos is not None and bool(ids) and ids[-1] == eos)


def tokenizer_metadata(tok, vocab_size: int) -> List[Tuple[str, Any, Any]]:
    vocab = tok.get_vocab()
    n = max(vocab_size, max(vocab.values(), default=-1) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = NORMAL
    special = set(getattr(tok, "all_special_ids", []) or [])
    added = getattr(tok, "added_tokens_decoder", None)
    if added is None and hasattr(tok, "get_added_tokens_decoder"):  # a bare `tokenizers.Tokenizer`
        added = tok.get_added_tokens_decoder()
    added = added or {}
    for i, at in added.items():
        if i < n:
            types[i] = CONTROL if (getattr(at, "special", False) or i in special) else USER_DEFINED
    for i in special:
        if i < n:
            types[i] = CONTROL
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and unk < n:
        types[unk] = UNKNOWN

    out: List[Tuple[str, Any, Any]] = []
    arr = ValueType.ARRAY
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None and hasattr(tok, "to_str") and hasattr(tok, "get_vocab"):
        backend = tok  # a bare `tokenizers.Tokenizer` (tokenizer.json without transformers' wrapper)
    if backend is not None:
        tj = json.loads(backend.to_str())
        model = tj["model"]
        if model.get("type") != "BPE":
            raise UnsupportedFormatError(f"tokenizer model {model.get('type')!r} is not supported for GGUF export (BPE only)")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        if model.get("byte_fallback"):
            for i, t in enumerate(tokens):
                if _BYTE_TOKEN.match(t):
                    types[i] = BYTE
            out += [("tokenizer.ggml.model", "llama", ValueType.STRING),
                    ("tokenizer.ggml.scores", [-float(i) for i in range(n)], (arr, ValueType.FLOAT32))]
        else:
            out += [("tokenizer.ggml.model", "gpt2", ValueType.STRING),
                    ("tokenizer.ggml.pre", bpe_pre_tokenizer(tj), ValueType.STRING),
                    ("tokenizer.ggml.merges", merges, (arr, ValueType.STRING))]
    elif getattr(tok, "sp_model", None) is not None:
        sp = tok.sp_model
        scores = [0.0] * n
        for i in range(min(n, sp.get_piece_size())):
            scores[i] = float(sp.get_score(i))
            if sp.is_unknown(i):
                types[i] = UNKNOWN
            elif sp.is_control(i):
                types[i] = CONTROL
            elif sp.is_byte(i):
                types[i] = BYTE
        out += [("tokenizer.ggml.model", "llama", ValueType.STRING),
                ("tokenizer.ggml.scores", scores, (arr, ValueType.FLOAT32))]
    else:
        raise UnsupportedFormatError(f"cannot read the vocabulary model of {type(tok).__name__}")
    out += [("tokenizer.ggml.tokens", tokens, (arr, ValueType.STRING)),
            ("tokenizer.ggml.token_type", types, (arr, ValueType.INT32))]
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        v = getattr(tok, attr, None)
        if v is not None:
            out.append((f"tokenizer.ggml.{key}_token_id", int(v), ValueType.UINT32))
    # llama.cpp's defaults for these differ per vocabulary type, so always state what the HF
    # tokenizer does (llama-perplexity and llama-cli prepend BOS only when add_bos_token is true)
    add_bos, add_eos = _adds_special(tok)
    if add_bos is None:
        add_bos = getattr(tok, "add_bos_token", None)
    if isinstance(add_bos, bool):
        out.append(("tokenizer.ggml.add_bos_token", add_bos, ValueType.BOOL))
    if isinstance(add_eos, bool):
        out.append(("tokenizer.ggml.add_eos_token", add_eos, ValueType.BOOL))
    tmpl = getattr(tok, "chat_template", None)
    if isinstance(tmpl, str):
        out.append(("tokenizer.chat_template", tmpl, ValueType.STRING))
    return out
