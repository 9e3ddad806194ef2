"""Progress bars on long work: live on a terminal, a line every few seconds in logs."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    """Wrap an iterable in a progress bar on stderr; pass enabled=False on non-zero ranks."""
    interactive = sys.stderr.isatty()
    return iter(
        tqdm(
            items,
            total=total,
            desc=desc,
            disable=not enabled,
            mininterval=0.5 if interactive else 10.0,
            dynamic_ncols=interactive,
            file=sys.stderr,
        )
    )
