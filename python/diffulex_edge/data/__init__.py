"""Real text that ships with the package, so examples, the CLI and the tests run anywhere.

The wheel carries the first articles of WikiText-2 (raw, tokenized text as released: `<unk>`,
`@-@` and spaced punctuation included) in two samples: ``wikitext2_test.txt`` (~220 KB, the first 9
articles of the test split) and ``wikitext2_valid.txt`` (~205 KB, the first 14 articles of the
validation split). Each is a byte-exact prefix of the split cut at an article boundary.

WikiText-2: Stephen Merity, Caiming Xiong, James Bradbury, Richard Socher, "Pointer Sentinel
Mixture Models" (2016), https://arxiv.org/abs/1609.07843. The text is from Wikipedia and is
distributed under the Creative Commons Attribution-ShareAlike license (CC BY-SA 3.0,
https://creativecommons.org/licenses/by-sa/3.0/); see LICENSE-wikitext2.txt beside these files.

For figures on the whole splits, point ``DIFFULEX_EDGE_WIKITEXT2`` at a folder holding the full
``test.txt`` / ``valid.txt`` (``wiki.test.raw`` / ``wiki.valid.raw`` are accepted too): then
:func:`wikitext2` returns those files instead of the samples.
"""

from __future__ import annotations

import os
from typing import Optional, Union

from ..errors import ConfigError

_HERE = os.path.dirname(os.path.abspath(__file__))
SPLITS = ("test", "valid")
#: ``--text`` names the command line accepts for the bundled texts.
BUILTIN_TEXTS = {f"wikitext2-{s}": s for s in SPLITS}
ENV_VAR = "DIFFULEX_EDGE_WIKITEXT2"


def _full_split(split: str) -> Optional[str]:
    root = os.environ.get(ENV_VAR)
    if not root:
        return None
    for name in (f"{split}.txt", f"wiki.{split}.raw"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise ConfigError(f"{ENV_VAR}={root!r} holds no {split}.txt or wiki.{split}.raw; unset it to use the bundled sample")


def wikitext2(split: str = "test", *, sample: bool = False) -> str:
    """Path of a WikiText-2 text: the full split if ``DIFFULEX_EDGE_WIKITEXT2`` names a folder
    holding it (and ``sample`` is False), else the sample bundled with the package."""
    if split not in SPLITS:
        raise ConfigError(f"unknown WikiText-2 split {split!r}; choose one of {', '.join(SPLITS)}")
    full = None if sample else _full_split(split)
    return full or os.path.join(_HERE, f"wikitext2_{split}.txt")


#: Suffixes that make a one-line string a file name rather than a text.
_TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md", ".tokens", ".json", ".jsonl", ".csv", ".tsv")


def read_text(data: Union[str, "os.PathLike[str]"]) -> str:
    """A text given as itself or as a file path (UTF-8).

    A path-like, or a one-line string naming an existing file, is read. A one-line string that
    looks like a file name (a text suffix such as ``.txt``, or a path separator and no spaces)
    but names no file raises ``FileNotFoundError`` instead of being used as a few words of text.
    Anything else (any string with a newline) is the text itself.
    """
    if isinstance(data, os.PathLike):
        path = os.fspath(data)
    else:
        path = str(data)
        if "\n" in path or len(path) >= 4096:
            return path
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    if isinstance(data, os.PathLike) or path.lower().endswith(_TEXT_SUFFIXES) or (
        os.sep in path and not any(c.isspace() for c in path)
    ):
        raise FileNotFoundError(
            f"text file {path!r} not found; pass an existing file, or the text itself (a string with a newline "
            f"is always text); a bundled sample is diffulex_edge.data.wikitext2('test')"
        )
    return path


def resolve_text(arg: str) -> str:
    """A ``--text`` argument: a built-in name (``wikitext2-test``, ``wikitext2-valid``) or a path."""
    return wikitext2(BUILTIN_TEXTS[arg]) if arg in BUILTIN_TEXTS else arg


__all__ = ["BUILTIN_TEXTS", "ENV_VAR", "SPLITS", "read_text", "resolve_text", "wikitext2"]
