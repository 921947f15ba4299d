"""Run several calibration batches through one decoder layer in lockstep.

True-sequential pruning wants each linear pruned from *all* calibration inputs, and then used,
pruned, by every batch. With one big batch that is a single forward pass, but big batches are
slow on a CPU (their activations fall out of cache). Lockstep gets both: each batch's forward
runs in its own thread, but only one thread computes at a time (they share one lock, released
only while waiting), and a thread that reaches a linear waits there until every batch has
reached it (or finished). The last one to arrive calls ``on_ready`` with the inputs of all
batches (which prunes the linear), then everyone goes on. This is sequential execution
interleaved at linear boundaries, not parallelism: results equal one big batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from llmprune.capture import LayerCall


class _Aborted(Exception):
    """Another batch failed; this one stops too."""


class Lockstep:
    def __init__(self, linears: dict[str, nn.Module], count: int,
                 on_ready: Callable[[str, list[torch.Tensor]], None]) -> None:
        self.linears, self.count, self.on_ready = linears, count, on_ready
        self.cond = threading.Condition()
        self.inputs: dict[str, dict[int, torch.Tensor]] = {}
        self.ready: set[str] = set()
        self.finished: set[int] = set()
        self.error: BaseException | None = None
        self.local = threading.local()

    def _complete(self, name: str) -> bool:
        arrived = self.inputs.get(name, {})
        return len(arrived) + len(self.finished - set(arrived)) >= self.count

    def _release(self, name: str) -> None:
        """Called with the lock held once every batch has arrived at ``name`` or finished."""
        arrived = self.inputs.pop(name, {})
        self.on_ready(name, [arrived[i] for i in sorted(arrived)])
        self.ready.add(name)
        self.cond.notify_all()

    def hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name in self.ready:
                return
            self.inputs.setdefault(name, {})[self.local.index] = args[0]
            if self._complete(name):
                self._release(name)
            while name not in self.ready and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise _Aborted

        return pre_hook

    def run(self, layer: nn.Module, hidden: Sequence[torch.Tensor], calls: Sequence[LayerCall],
            device: torch.device) -> list[torch.Tensor]:
        outputs: list[torch.Tensor | None] = [None] * len(hidden)
        grad_enabled = torch.is_grad_enabled()

        def work(index: int) -> None:
            self.local.index = index
            with self.cond, torch.set_grad_enabled(grad_enabled):
                try:
                    out = calls[index].run(layer, hidden[index].to(device), device)
                    outputs[index] = out.to("cpu")
                except _Aborted:
                    pass
                except BaseException as exc:  # surfaced in the calling thread below
                    self.error = self.error or exc
                finally:
                    self.finished.add(index)
                    try:
                        for name in list(self.inputs):  # a finished batch no longer blocks anyone
                            if self.error is None and self._complete(name):
                                self._release(name)
                    except BaseException as exc:
                        self.error = self.error or exc
                    self.cond.notify_all()

        handles = [lin.register_forward_pre_hook(self.hook(n)) for n, lin in self.linears.items()]
        try:
            threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(hidden))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            for handle in handles:
                handle.remove()
        if self.error is not None:
            raise self.error
        return [out for out in outputs if out is not None]
