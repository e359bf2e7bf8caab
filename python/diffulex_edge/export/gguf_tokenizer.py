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


def tokenizer_metadata(tok, vocab_size: int) -> List[Tuple[str, Any, Any]]:
    vocab = tok.get_vocab()
    n = max(vocab_size, max(vocab.values(), default=-1) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = NORMAL
    special = set(getattr(tok, "all_special_ids", []) or [])
    added = getattr(tok, "added_tokens_decoder", {}) or {}
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
    if backend is not None:
        model = json.loads(backend.to_str())["model"]
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
                    ("tokenizer.ggml.pre", "default", ValueType.STRING),
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
    add_bos = getattr(tok, "add_bos_token", None)
    if isinstance(add_bos, bool):
        out.append(("tokenizer.ggml.add_bos_token", add_bos, ValueType.BOOL))
    tmpl = getattr(tok, "chat_template", None)
    if isinstance(tmpl, str):
        out.append(("tokenizer.chat_template", tmpl, ValueType.STRING))
    return out
