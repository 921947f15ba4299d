"""Which device processes each decoder layer, from an accelerate device map.

``--device-map auto`` (or a max-memory spec such as ``0=20GiB,1=20GiB,cpu=64GiB``) asks
accelerate's ``infer_auto_device_map`` to place the model's modules, decoder layers kept whole;
each decoder layer is then processed on the device it was given. Layers placed on ``cpu`` or
``disk`` are processed on the CPU (a streaming run keeps them on disk anyway).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from llmprune.errors import LlmpruneError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*$", re.IGNORECASE)


def parse_max_memory(spec: str) -> dict[int | str, str]:
    """``"0=20GiB,cpu=64GiB"`` → ``{0: "20GiB", "cpu": "64GiB"}`` (accelerate's max_memory)."""
    memory: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, size = part.partition("=")
        if not sep or not _SIZE.match(size):
            raise LlmpruneError(f"device map entry {part!r} is not DEVICE=SIZE (e.g. 0=20GiB, cpu=64GiB)")
        key = key.strip().removeprefix("cuda:")
        memory[int(key) if key.isdigit() else key] = size.strip()
    if not memory:
        raise LlmpruneError(f"empty device map {spec!r}")
    return memory


def _as_device(value: Any) -> torch.device:
    if isinstance(value, int):
        return torch.device("cuda", value)
    if value in ("cpu", "disk"):
        return torch.device("cpu")
    return torch.device(value)


def layer_devices(model: nn.Module, layers_path: str, count: int, spec: str) -> list[torch.device]:
    """One device per decoder layer, as accelerate places them under ``spec``."""
    from accelerate import infer_auto_device_map

    max_memory = None if spec == "auto" else parse_max_memory(spec)
    layers = model.get_submodule(layers_path)
    no_split = sorted({type(block).__name__ for block in layers.children()})
    try:
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    except (ValueError, KeyError) as exc:
        raise LlmpruneError(f"device map {spec!r}: {exc}") from None
    devices = []
    for index in range(count):
        name = f"{layers_path}.{index}"
        owner = max((key for key in device_map if key == "" or name == key or name.startswith(key + ".")),
                    key=len, default=None)
        if owner is None:
            raise LlmpruneError(f"device map {spec!r} does not place decoder layer {name}")
        devices.append(_as_device(device_map[owner]))
    for device in devices:
        if device.type == "cuda" and (not torch.cuda.is_available() or device.index >= torch.cuda.device_count()):
            raise LlmpruneError(f"device map {spec!r} names {device}, which does not exist here")
    return devices
