"""Which device processes each decoder layer, from an accelerate device map.

``--device-map auto`` (or a max-memory spec such as ``0=20GiB,1=20GiB,cpu=64GiB``) asks
accelerate's ``infer_auto_device_map`` to place the model's modules, decoder layers kept whole;
each decoder layer is then processed on the device it was given. Layers placed on ``cpu`` or
``disk`` are processed on the CPU (a streaming run keeps them on disk anyway).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from llmprune.engine.model import find_decoder_layers
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


def move_front(model: nn.Module, layers_path: str, device: torch.device) -> None:
    """Move every present tensor outside the decoder layers (embeddings, norm, lm_head, rotary
    buffers) to ``device``; the layers' meta parameters stay where they are."""
    from accelerate.utils import set_module_tensor_to_device

    named = [*model.named_parameters(), *model.named_buffers()]
    moved = False
    for name, tensor in named:
        if not name.startswith(layers_path + ".") and tensor.device.type != "meta" and tensor.device != device:
            set_module_tensor_to_device(model, name, device)
            moved = True
    # A tied head is listed once (as the embeddings) and the move gave the embeddings a new
    # Parameter: tie the head to it again, or it stays behind (and untied) on the old device.
    if moved and callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # type: ignore[operator]


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value  # caches move themselves: each layer's keys and values are made on its device


@contextmanager
def spread(model: nn.Module, layers_path: str, devices: list[torch.device], front: torch.device) -> Iterator[None]:
    """For the block, each decoder layer on its device from the map and everything else
    (embeddings, norm, head) on ``front``; hooks carry the hidden states from layer to layer.
    Work driven by another library (lm-eval) then runs the model as the map places it instead of
    moving it whole to one device. Afterwards every tensor is back where it was and no hook left."""
    layers = list(model.get_submodule(layers_path).children())
    home = next(model.parameters()).device
    handles = []

    def enter(device: torch.device) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
            return _to(args, device), _to(kwargs, device)
        return hook

    def leave(device: torch.device) -> Any:
        def hook(_: nn.Module, __: Any, output: Any) -> Any:
            return _to(output, device)
        return hook

    try:
        move_front(model, layers_path, front)
        for index, (layer, device) in enumerate(zip(layers, devices, strict=True)):
            layer.to(device)
            after = devices[index + 1] if index + 1 < len(devices) else front
            handles.append(layer.register_forward_pre_hook(enter(device), with_kwargs=True))
            handles.append(layer.register_forward_hook(leave(after)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            layer.to(home)
        move_front(model, layers_path, home)


@contextmanager
def placed(model: nn.Module, front: torch.device, layer_devices: list[torch.device] | None) -> Iterator[None]:
    """The model on ``front`` for the block, or spread as the device map places its layers."""
    if layer_devices is not None:
        layers_path, _ = find_decoder_layers(model)
        with spread(model, layers_path, layer_devices, front):
            yield
        return
    home = next(model.parameters()).device
    model.to(front)
    try:
        yield
    finally:
        model.to(home)
