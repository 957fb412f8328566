"""The clocks proxyd reads, injected so tests fake time (and only time)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Clocks:
    monotonic: Callable[[], float]
    wall: Callable[[], float]
