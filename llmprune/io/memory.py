"""Peak memory of this process: resident set size and, on CUDA, device memory."""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import torch


def peak_rss_bytes() -> int:
    """The most resident memory this process has held since :func:`reset_peaks` (Linux VmHWM),
    or since it started (ru_maxrss, elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def reset_peaks() -> bool:
    """Start the peak counters again (at a job's start): the RSS high-water mark (Linux ≥ 4.0,
    ``/proc/self/clear_refs``) and every CUDA device's peak allocation. The counters are the
    process's: jobs that share a process share them. Returns whether the RSS peak was reset."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def available_bytes() -> int | None:
    """Memory the system can still give without swapping (Linux MemAvailable), if known."""
    import psutil

    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError):
        return None


def memory_report() -> dict[str, Any]:
    """Peak RSS, and peak allocated memory of every CUDA device this process used."""
    report: dict[str, Any] = {"peak_rss_bytes": peak_rss_bytes(),
                              "since": "job start" if os.path.exists("/proc/self/clear_refs") else "process start"}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        report["peak_device_bytes"] = {f"cuda:{i}": torch.cuda.max_memory_allocated(i)
                                       for i in range(torch.cuda.device_count())}
    return report


def return_freed_memory() -> bool:
    """Ask glibc to serve every allocation above 128 KiB with its own mapping, returned to the
    system when freed. By default the threshold rises to the largest block freed so far, after
    which activation-sized tensors come from the heap and the freed space stays resident: RSS
    then creeps up layer after layer (measured: +0.3 GB over SmolLM2's 30 layers). It costs
    speed (every large tensor is a fresh, zero-filled mapping: SmolLM2 Wanda 32 -> 44 s), so the
    CLI calls it only for streaming runs; a library has no business changing the allocator of its
    host process."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, 128 * 1024))
    except (OSError, AttributeError):
        return False
