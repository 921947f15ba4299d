"""What every command line of llmprune shares: help formatting, the execution options, progress
bars, logging and thread setup, the --json record."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from llmprune.errors import LlmpruneError
from llmprune.progress import Event

# torch's thread count before a command's --threads changed it (process-wide), to restore.
THREADS_BEFORE: list[int] = []


class Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def exec_args(o: Any) -> None:
    o.add_argument("--device", default=None,
                   help="where each layer is processed: auto (CUDA if present), cpu, cuda:1 (default: auto)")
    o.add_argument("--dtype", default=None,
                   help="auto (keep the checkpoint's), float32, bfloat16, float16 (default: auto)")
    o.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default, or 0: torch's choice)")
    o.add_argument("--json", default=None, help="also write the results record to this file")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


class Bars:
    """One tqdm bar per stage, counting the stage's own unit (layers, windows, batches)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict[str, Any] = {}

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(event.stage)
        if bar is None:
            bar = self.bars[event.stage] = tqdm(total=event.total, desc=event.stage, unit=event.unit.rstrip("s"),
                                                file=sys.stderr, leave=True)
        bar.update(event.done - bar.n)
        if event.done >= event.total:
            bar.close()


def setup(args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads < 0:
        raise LlmpruneError(f"--threads must be >= 0 (0: torch's choice), got {args.threads}")
    if getattr(args, "json", None):
        from llmprune.io.export import check_json_path

        check_json_path(args.json)  # before the work, not after it
    # llmprune's own messages only (transformers' loggers reach the root logger where CI is
    # set), to the stderr of this call (a fresh handler each time: in-process calls too)
    logger = logging.getLogger("llmprune")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("llmprune: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.threads:
        import torch

        THREADS_BEFORE.append(torch.get_num_threads())  # main() puts it back when the command ends
        torch.set_num_threads(args.threads)


def write_result(args: argparse.Namespace, record: dict[str, Any]) -> None:
    if args.json:
        from llmprune.io.export import write_json

        write_json(args.json, record)
