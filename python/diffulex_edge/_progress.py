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


class _NoBar:
    def update(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


def byte_progress(total: int, desc: str, show: Optional[bool]):
    """A tqdm bar counting bytes (rate in B/s and an ETA), or a stand-in with the same
    ``update``/``close`` when `show` is False."""
    if show is False:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=None if show is None else False, leave=False)
