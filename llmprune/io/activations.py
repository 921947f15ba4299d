"""Calibration activations kept in a file, one batch at a time.

Between decoder layers the calibration activations (nsamples × seqlen × hidden) are the only
thing besides one layer that must be kept; for large calibration sets they outgrow memory. A
:class:`BatchFile` stores them as raw bytes and reads one batch back per request (plain reads,
not a memory map: mapped pages would count as resident until the kernel reclaims them). The
file's SHA-256 and shapes are what the resume journal records.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from llmprune.errors import LlmpruneError
from llmprune.io.loading import DTYPES


class BatchFile(Sequence[torch.Tensor]):
    """A list of tensors (one per calibration batch) in one file: ``append`` while writing,
    ``close`` once, then index to read. Same-order writes give byte-identical files."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.shapes: list[tuple[int, ...]] = []
        self.offsets: list[int] = []
        self.dtype: torch.dtype | None = None
        self.sha256 = ""
        self._hash = hashlib.sha256()
        self._file: Any = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._size = 0

    def append(self, tensor: torch.Tensor) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.path} is closed for writing")
        if self.dtype is None:
            self.dtype = tensor.dtype
        elif tensor.dtype != self.dtype:
            raise ValueError(f"batch dtype {tensor.dtype} differs from {self.dtype}")
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.shapes.append(tuple(tensor.shape))
        self.offsets.append(self._size)
        self._size += len(data)

    def clear(self) -> None:
        """Forget what was written so far and start again (only while writing)."""
        if self._file is None:
            raise RuntimeError(f"{self.path} is closed for writing")
        self._file.seek(0)
        self._file.truncate()
        self.shapes, self.offsets, self._size, self._hash = [], [], 0, hashlib.sha256()

    def close(self) -> BatchFile:
        """Finish writing: flushed to disk, ready to read."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self.sha256 = self._hash.hexdigest()
        return self

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]  # no slices
        if self._file is not None:
            raise RuntimeError(f"{self.path} is still being written")
        assert self.dtype is not None
        if index < 0:
            index += len(self)
        shape = self.shapes[index]
        count = int(torch.Size(shape).numel()) * torch.empty((), dtype=self.dtype).element_size()
        with open(self.path, "rb") as file:
            file.seek(self.offsets[index])
            data = bytearray(file.read(count))
        if len(data) != count:
            raise LlmpruneError(f"activation file {self.path} is truncated")
        return torch.frombuffer(data, dtype=torch.uint8).view(self.dtype).reshape(shape)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def describe(self) -> dict[str, Any]:
        """What a journal needs to find and check this file again."""
        return {"file": self.path.name, "sha256": self.sha256, "shapes": [list(s) for s in self.shapes],
                "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def reopen(cls, folder: Path, described: dict[str, Any]) -> BatchFile:
        """A finished file described by :meth:`describe`; its size and hash must match."""
        path = folder / described["file"]
        if not path.is_file():
            raise LlmpruneError(f"activation file {path} named by the journal is missing")
        digest = file_sha256(path)
        if digest != described["sha256"]:
            raise LlmpruneError(f"activation file {path} does not match the journal (truncated or corrupt)")
        self = cls.__new__(cls)
        self.path, self._file, self._hash = path, None, hashlib.sha256()
        self.dtype = DTYPES[described["dtype"]]
        self.shapes = [tuple(s) for s in described["shapes"]]
        item = torch.empty((), dtype=self.dtype).element_size()
        self.offsets, self._size = [], 0
        for shape in self.shapes:
            self.offsets.append(self._size)
            self._size += int(torch.Size(shape).numel()) * item
        self.sha256 = digest
        return self


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()
