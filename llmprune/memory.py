"""Peak memory of this process: resident set size and, on CUDA, device memory."""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import torch


def peak_rss_bytes() -> int:
    """The most resident memory this process has held so far (ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def available_bytes() -> int | None:
    """Memory the system can still give without swapping (Linux MemAvailable), if known."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def memory_report() -> dict[str, Any]:
    """Peak RSS, and peak allocated memory of every CUDA device this process used."""
    report: dict[str, Any] = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        report["peak_device_bytes"] = {f"cuda:{i}": torch.cuda.max_memory_allocated(i)
                                       for i in range(torch.cuda.device_count())}
    return report
