"""Progress events and cancellation, shared by every long-running part of llmprune.

A long stage reports ``Event(stage, done, total, unit)``: "prune" 3 of 30 "layers", "eval dense"
12 of 40 "windows", "gradients" 2 of 8 "sequences". A caller passes one ``Progress`` callable and a
``Cancel`` predicate; the stage polls the predicate at each step and stops with
:class:`~llmprune.errors.Cancelled` when it returns True.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from llmprune.errors import Cancelled


class Event(NamedTuple):
    stage: str  # "load", "calibrate", "eval dense", "prune", "allocate", "gradients", "save", ...
    done: int
    total: int
    unit: str  # what is counted: "layers", "windows", "batches", "files", "steps"


Progress = Callable[[Event], None]
Cancel = Callable[[], bool]


def check_cancel(cancel: Cancel | None, where: str) -> None:
    """Stop with :class:`Cancelled` ("cancelled <where>") when ``cancel`` says so."""
    if cancel is not None and cancel():
        raise Cancelled(f"cancelled {where}")


class Steps:
    """One stage's counter: ``steps(done)`` polls ``cancel`` and reports the event."""

    def __init__(self, progress: Progress | None, cancel: Cancel | None, stage: str, total: int, unit: str) -> None:
        self.progress, self.cancel, self.stage, self.total, self.unit = progress, cancel, stage, total, unit

    def __call__(self, done: int) -> None:
        if self.progress is not None:
            self.progress(Event(self.stage, done, self.total, self.unit))
        if done < self.total:
            check_cancel(self.cancel, f"during {self.stage}, after {done} of {self.total} {self.unit}")
