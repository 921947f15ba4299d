"""A safetensors checkpoint read and written under one model's own tensor names.

transformers 5 holds a mixture-of-experts layer's experts fused (one ``experts.gate_up_proj`` of
shape (E, 2I, H)), but reads and writes checkpoints in their original layout, one matrix per
expert under the family's names (Mixtral's ``block_sparse_moe.experts.3.w1.weight``), converting
while it loads and saves. A streaming run reads and writes one decoder layer at a time, so it
converts one layer's tensors at a time with transformers' own conversion list for the model:
every family transformers converts is read as stock ``from_pretrained`` reads it and written as
``save_pretrained`` writes it.

The conversions are first run on meta tensors (shapes and dtypes from the files' headers, no
data), which gives every model tensor the checkpoint provides and its shape before any work.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from llmprune.errors import LlmpruneError
from llmprune.io.shards import DTYPES, Checkpoint, locate


class ModelCheckpoint:
    """``checkpoint``'s tensors under ``model``'s names: which stored tensors make each one."""

    def __init__(self, model: Any, checkpoint: Checkpoint) -> None:  # a transformers PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.model, self.checkpoint, self.folder = model, checkpoint, checkpoint.folder
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._by_pattern = {p: c for c in converters for p in c.source_patterns}
        own = set(model.state_dict())
        # The first model name each group of stored tensors converts to -> [(stored name, pattern)].
        self.groups: dict[str, list[tuple[str, str | None]]] = {}
        for stored in sorted(checkpoint.files, key=dot_natural_key):  # experts stacked in index order
            target, pattern = rename_source_key(stored, renamings, converters)
            if target not in own and stored in own:  # as transformers does: a rename that misses is none
                target, pattern = stored, None
            self.groups.setdefault(target, []).append((stored, pattern))
        headers = locate(checkpoint, checkpoint.files)
        blanks = {name: torch.empty(found.shape, dtype=DTYPES[found.dtype], device="meta")
                  for name, found in headers.items()}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._group_of: dict[str, str] = {}
        for key, members in self.groups.items():
            for name, tensor in self._convert(key, members, blanks).items():
                self.shapes[name] = tuple(tensor.shape)
                self._group_of[name] = key

    def _convert(self, key: str, members: list[tuple[str, str | None]],
                 tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        patterns = [pattern for _, pattern in members]
        if None in patterns:
            if len(members) > 1:  # two stored tensors renamed onto one model tensor
                raise LlmpruneError(f"the checkpoint at {self.folder} holds both {members[0][0]} and "
                                    f"{members[1][0]} for {key}; the checkpoint is damaged")
            return {key: tensors[members[0][0]]}
        converter = copy.deepcopy(self._by_pattern[str(patterns[0])])
        for stored, pattern in members:
            # A tensor where loading passes a Future: what saving passes, and accepted alike.
            converter.add_tensor(key, stored, str(pattern), tensors[stored])  # type: ignore[arg-type]
        try:
            made = converter.convert(key, model=self.model, config=getattr(self.model, "config", None))
        except Exception as exc:  # transformers' conversion ops raise what they raise
            raise LlmpruneError(f"the tensors of {key} in {self.folder} do not convert to this model's layout "
                                f"({type(exc).__name__}: {exc}); the checkpoint is damaged or made for another "
                                "model class") from None
        return {name: value[0] if isinstance(value, list) else value for name, value in made.items()}

    @property
    def names(self) -> set[str]:
        """Every model tensor name the checkpoint provides."""
        return set(self.shapes)

    def plain(self, name: str) -> bool:
        """Whether ``name`` is stored as it is, under its own name (its bytes can be copied)."""
        return self.groups.get(name) == [(name, None)]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named model tensors, on the CPU: their stored tensors read (each file opened once)
        and converted."""
        unknown = [n for n in names if n not in self._group_of]
        if unknown:
            raise LlmpruneError(f"tensor {unknown[0]} is not in the checkpoint at {self.folder}")
        wanted = set(names)
        made: dict[str, torch.Tensor] = {}
        for key in sorted({self._group_of[n] for n in names}):  # one group's stored tensors at a time
            raw = self.checkpoint.read([stored for stored, _ in self.groups[key]])
            made.update((n, t) for n, t in self._convert(key, self.groups[key], raw).items() if n in wanted)
            del raw
        return {name: made[name] for name in names}


def stored_layout(model: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (model names) as ``save_pretrained`` stores them: transformers' conversions
    reverted (fused experts split back into one matrix per expert, family names restored)."""
    from transformers.core_model_loading import revert_weight_conversion

    result: dict[str, Any] = revert_weight_conversion(model, tensors)
    return {name: value.contiguous() for name, value in result.items()}
