"""The tqdm bar that the per-layer / per-tensor loops share."""

from __future__ import annotations

from typing import List, Optional


def progress(items: List, desc: str, show: Optional[bool], unit: str):
    """`items`, wrapped in a tqdm bar unless `show` is False (or None with fewer than 2 items)."""
    if show is False or (show is None and len(items) < 2):
        return items
    from tqdm.auto import tqdm

    # show=None: tqdm decides (disabled when output is not a terminal or notebook)
    return tqdm(items, desc=desc, unit=unit, disable=None if show is None else False, leave=False)
