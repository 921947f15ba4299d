"""Read a safetensors checkpoint tensor by tensor, and write one shard at a time.

Streaming pruning never holds a whole model: each decoder layer's tensors are read from the
shards that hold them (found through ``model.safetensors.index.json``) just before the layer is
processed, and written to an output shard of their own right after.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmprune.errors import LlmpruneError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """Which file of a safetensors checkpoint folder holds each tensor."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        check_safetensors(self.folder)
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise LlmpruneError(f"{index} is not a safetensors index ({exc})") from None
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / SINGLE).is_file():
            with safe_open(self.folder / SINGLE, framework="pt") as handle:
                self.files = {name: self.folder / SINGLE for name in handle.keys()}  # noqa: SIM118
        else:
            raise LlmpruneError(f"{self.folder} holds no safetensors weights ({SINGLE} or {INDEX}); "
                                "streaming needs them")
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise LlmpruneError(f"checkpoint shard {missing[0]} named by {INDEX} is missing")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the files' headers (no data read)."""
        by_file: dict[Path, list[str]] = {}
        for name, path in self.files.items():
            by_file.setdefault(path, []).append(name)
        shapes: dict[str, tuple[int, ...]] = {}
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as handle:
                for name in names:
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        return shapes

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, on the CPU, each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise LlmpruneError(f"tensor {name} is not in the checkpoint at {self.folder}")
            by_file.setdefault(self.files[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for path, wanted in by_file.items():
            with safe_open(path, framework="pt", device="cpu") as handle:
                for name in wanted:
                    tensors[name] = handle.get_tensor(name)
        return tensors


def check_safetensors(folder: Path) -> None:
    """Open the header of every ``.safetensors`` file in ``folder``: a truncated or foreign file
    fails here, naming itself, before any work (the header records every tensor's extent)."""
    from safetensors import SafetensorError

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise LlmpruneError(f"{path} is not a whole safetensors file ({exc}); the checkpoint is damaged") from None


def shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one shard atomically (a ``.partial`` file renamed once flushed to disk)."""
    target = folder / name
    partial = folder / f"{name}.partial"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(partial),
              metadata={"format": "pt"})
    with open(partial, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, target)
    return target


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The index stock ``from_pretrained`` reads to find each tensor's shard."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
