"""The precision of the calibration passes through each decoder layer (``pass_dtype``).

Pruning reads each layer's inputs on every calibration token, so the forward passes through the
layers are a large share of its time (on SmolLM2 at 50% on 2 CPU threads about a third). Run in
bfloat16 they take a third of that where the device multiplies bfloat16 natively. The passes then
run under autocast: the layer's matrix products in bfloat16, its norms, residual stream and
outputs in float32; the statistics they feed multiply each batch in bfloat16 (the Hessian and
the cross statistic; input norms stay float32) and sum in float32, and every solve runs in
float32: the activations and each batch's products are rounded, nothing else. A layer already in
a 16-bit dtype is left as it is: no autocast, float32 statistics, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from llmprune.errors import LlmpruneError

PASS_DTYPES = ("auto", "float32", "bfloat16")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively, so faster than float32 (without
    AMX or AVX512-BF16 a CPU emulates them, several times slower)."""
    if device.type == "cuda":
        # Ampere and later multiply bfloat16 in hardware; earlier GPUs emulate it (which
        # torch.cuda.is_bf16_supported() counts by default).
        return bool(torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8)
    if device.type == "cpu":
        # Private but stable probes (torch 2.x); a build without them counts as no support.
        probes = (getattr(torch.cpu, "_is_amx_tile_supported", None),
                  getattr(torch.cpu, "_is_avx512_bf16_supported", None))
        return any(probe is not None and bool(probe()) for probe in probes)
    return False


def pass_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The precision of the calibration passes on ``device`` for ``choice`` (:data:`PASS_DTYPES`):
    "auto" is bfloat16 where :func:`native_bfloat16`, else float32."""
    if choice == "bfloat16" or (choice == "auto" and native_bfloat16(device)):
        if not torch.amp.is_autocast_available(device.type):
            raise LlmpruneError(f"pass_dtype bfloat16 needs autocast, which {device.type} lacks; "
                                "use pass_dtype=float32")
        return torch.bfloat16
    return torch.float32


def layer_pass_dtype(choice: str, device: torch.device, layer: torch.nn.Module) -> torch.dtype:
    """:func:`pass_dtype` for a float32 layer; float32 for a 16-bit one (it passes in its own
    dtype, no autocast, and its statistics stay exact float32 products)."""
    wide = next(layer.parameters(), torch.empty(0)).dtype == torch.float32
    return pass_dtype(choice, device) if wide else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def calibration_pass(layer: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Run what is inside as a calibration pass of ``layer`` in ``dtype``: under bfloat16
    autocast when asked and the layer computes in float32. No cast cache: the layer's weights
    change inside a pass (a linear is pruned before the batches go on through it)."""
    wide = next(layer.parameters(), torch.empty(0)).dtype == torch.float32
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16 and wide,
                        cache_enabled=False):
        yield


def full_precision(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Inside a calibration pass, what must not be autocast: statistics and solves."""
    return torch.autocast(device.type, enabled=False)
