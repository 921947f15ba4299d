"""Read a safetensors checkpoint tensor by tensor, and write one shard at a time.

Streaming pruning never holds a whole model: each decoder layer's tensors are read from the
shards that hold them (found through ``model.safetensors.index.json``) just before the layer is
processed, and written to an output shard of their own right after.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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


# safetensors' dtype names, in the order of its enum: a file lists its tensors by dtype, the
# later (wider) ones first, then by name, and so must a file written without the library.
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
          "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
          "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
          "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
ORDER = list(DTYPES)
COPY_CHUNK = 1 << 24  # bytes read and written at a time


@dataclass
class Stored:
    """A tensor's bytes inside a safetensors file: where they are and what they hold."""

    path: Path
    dtype: str
    shape: list[int]
    start: int  # absolute offsets in the file
    end: int


def read_header(path: Path) -> dict[str, Stored]:
    """Where each tensor of a safetensors file lies (the header only; no data read)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {name: Stored(path, entry["dtype"], entry["shape"], 8 + length + entry["data_offsets"][0],
                         8 + length + entry["data_offsets"][1])
            for name, entry in header.items() if name != "__metadata__"}


def locate(source: Checkpoint, names: Iterable[str]) -> dict[str, Stored]:
    headers: dict[Path, dict[str, Stored]] = {}
    found = {}
    for name in names:
        path = source.files[name]
        if path not in headers:
            headers[path] = read_header(path)
        found[name] = headers[path][name]
    return found


def copy_shard(folder: Path, name: str, parts: dict[str, Stored | torch.Tensor],
               check: Callable[[str, torch.Tensor], None] | None = None) -> Path:
    """Write one shard atomically, as :func:`write_shard` would, from tensors in memory and from
    byte ranges of other safetensors files copied through the page cache, never mapped: the
    embeddings and head of a large model, copied unchanged, then never count in this process's
    resident memory. ``check`` is given each copied tensor's name and every chunk of it."""
    def describe(part: Stored | torch.Tensor) -> tuple[str, list[int], int]:
        if isinstance(part, Stored):
            return part.dtype, part.shape, part.end - part.start
        return NAMES[part.dtype], list(part.shape), part.numel() * part.element_size()

    described = {key: describe(part) for key, part in parts.items()}
    order = sorted(parts, key=lambda key: (-ORDER.index(described[key][0]), key))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in order:
        dtype, shape, size = described[key]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    target, partial = folder / name, folder / f"{name}.partial"
    with open(partial, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for key in order:
            part = parts[key]
            if isinstance(part, torch.Tensor):
                out.write(part.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
                continue
            with open(part.path, "rb") as handle:
                handle.seek(part.start)
                left = part.end - part.start
                while left:
                    block = handle.read(min(COPY_CHUNK, left))
                    if not block:
                        raise LlmpruneError(f"{part.path} ends inside tensor {key}; the checkpoint is damaged")
                    if check is not None:
                        check(key, torch.frombuffer(bytearray(block), dtype=DTYPES[part.dtype]))
                    out.write(block)
                    left -= len(block)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, target)
    return target


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The index stock ``from_pretrained`` reads to find each tensor's shard."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
