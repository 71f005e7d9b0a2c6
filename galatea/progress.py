"""Progress bars. Library code never draws one itself: long operations take a
`factory(label, total)` (anything whose result has `update(n)` and `close()`), and the commands
pass tqdm's, or None for none."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

Progress = Callable[[int], None]  # advance by n (bytes, steps)
Factory = Callable[[str, int], Any]


def byte_bars(quiet: bool) -> Factory | None:
    """tqdm bars counting bytes on stderr, or None with --quiet."""
    if quiet:
        return None
    from tqdm import tqdm

    def factory(label: str, total: int) -> Any:
        return tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                    dynamic_ncols=True, leave=True)
    return factory


def step_bar(enabled: bool, total: int, start: int) -> Any:
    """A training run's bar (steps; resumed runs start part way)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", disable=not enabled, dynamic_ncols=True, desc="train")


class bar:
    """A bar from `factory`, or none: yields its `update`, or None."""

    def __init__(self, factory: Factory | None, label: str, total: int) -> None:
        self.bar = factory(label, total) if factory else None

    def __enter__(self) -> Progress | None:
        return self.bar.update if self.bar else None

    def __exit__(self, *exc: Any) -> None:
        if self.bar:
            self.bar.close()
