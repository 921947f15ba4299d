"""Write a pruned checkpoint that stock transformers loads, atomically and safely.

The folder is assembled under a hidden temporary name beside ``out`` and renamed into place only
when complete, so an interrupted run never leaves a folder that looks like a finished checkpoint.
No ``sparsity_config`` goes into config.json (vLLM refuses checkpoints that carry one); what was
done is recorded in ``llmprune.json`` and the model card instead.

What ``--overwrite`` may replace is decided here, once, for every kind of run: only a folder that
llmprune itself wrote (its ``llmprune.json`` lists every file in it) or an empty one, never the
working folder or a folder above it, never a folder that holds the model or texts of the run.
While a run writes ``out`` it holds an exclusive OS lock (``flock``) on ``.NAME.lock`` beside it,
so a second run on the same output is refused at once instead of mixing files with the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from llmprune.errors import LlmpruneError

RECORD = "llmprune.json"
CARD = "README.md"
JOURNAL_FOLDER = ".llmprune-journal"  # the resume journal of an unfinished streaming run
# The exact names older llmprune versions wrote, before outputs listed their files in
# llmprune.json: an older output holding nothing else is still recognised as one.
_OLD_OUTPUT_FILES = {RECORD, CARD, "config.json", "generation_config.json", "model.safetensors",
                     "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
                     "merges.txt", "added_tokens.json"}
_OLD_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def current_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` can only set it, and a set
    and reset would race with other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with tempfile.TemporaryDirectory() as tmp:  # elsewhere: ask the file system
        probe = Path(tmp) / "probe"
        probe.mkdir(mode=0o777)
        return 0o777 & ~probe.stat().st_mode


def file_mode() -> int:
    """The mode a new file gets under the umask."""
    return 0o666 & ~current_umask()


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _output_files(record_path: Path) -> set[str] | None:
    """The file names an llmprune output's record lists (None: not an llmprune record)."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or "llmprune_version" not in record:
        return None
    files = record.get("files")
    return {str(f) for f in files} if isinstance(files, list) else set()


def check_replaceable(path: Path) -> None:
    """Refuse to replace ``path`` unless it is empty or an llmprune output holding nothing but the
    files its record lists."""
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    listed = _output_files(path / RECORD)
    if listed is None:
        raise LlmpruneError(f"--overwrite replaces only a folder llmprune wrote, and {path} is not an llmprune "
                            f"output (no {RECORD}); remove it yourself or choose another --out")
    if not listed:  # written before records listed their files
        other = [n for n in entries if (path / n).is_dir() or not (n in _OLD_OUTPUT_FILES or _OLD_SHARD.fullmatch(n))]
    else:
        other = [n for n in entries if n not in listed | {RECORD} or (path / n).is_dir()]
    if other:
        raise LlmpruneError(f"--overwrite would delete {path / other[0]}, which llmprune did not write "
                            f"({len(other)} such entr{'y' if len(other) == 1 else 'ies'}); move it away first")


def check_output(out: str | os.PathLike[str], overwrite: bool, protect: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Fail early (before any work) if ``out`` cannot be written or may not be replaced.

    ``protect``: paths the run reads (the model's folder, text files), which ``out`` may neither
    be nor contain."""
    path = Path(out).expanduser().resolve()
    if _is_within(Path.cwd().resolve(), path):
        raise LlmpruneError(f"--out {path} is the working folder or holds it; choose a new folder")
    for item in protect:
        source = Path(item).expanduser().resolve()
        if _is_within(source, path):
            raise LlmpruneError(f"--out {path} would replace {source}, which this run reads; choose another --out")
    if path.exists() and not path.is_dir():
        raise LlmpruneError(f"output path {path} exists and is not a folder")
    if path.exists() and not overwrite:
        raise LlmpruneError(f"output folder {path} already exists; choose another --out or pass --overwrite")
    if path.exists():
        check_replaceable(path)
    probe_folder(path.parent)
    return path


def probe_folder(folder: Path) -> None:
    """Fail unless ``folder`` can be created (or written, if it exists): a probe in its nearest
    existing ancestor, removed at once, so a refused run leaves no folder behind."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a folder", str(existing))
        with tempfile.TemporaryDirectory(dir=existing, prefix=".llmprune-probe-"):
            pass
    except OSError as exc:
        raise LlmpruneError(f"cannot write to {folder}: {exc.strerror or exc}") from None


def check_json_path(path: str | os.PathLike[str]) -> Path:
    """Fail early if a ``--json`` record cannot be written to ``path``."""
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        raise LlmpruneError(f"--json {target} is a folder; give a file name")
    probe_folder(target.parent)
    if target.exists() and not os.access(target, os.W_OK):
        raise LlmpruneError(f"--json {target} is not writable")
    return target


class OutputLock:
    """An exclusive lock on an output folder, held while a run writes it: ``flock`` on the file
    ``.NAME.lock`` beside it (the kernel drops it when the process dies, however it dies)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.parent / f".{out.name}.lock"
        self.fd: int | None = None

    def acquire(self) -> OutputLock:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            return self._acquire()
        except OSError as exc:
            raise LlmpruneError(f"cannot lock {self.path}: {exc.strerror or exc}") from None

    def _acquire(self) -> OutputLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise LlmpruneError(f"{self.out} is being written by another llmprune run (pid {owner}); "
                                    "wait for it to finish or choose another --out") from None
            # Its previous holder may have removed the file between our open and our lock: then
            # the lock is on a name nobody else can find, so start again on the current file.
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: nobody can take a stale file
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def make_staging(out: Path, suffix: str | None = None) -> Path:
    """A hidden temporary folder beside ``out``, with the mode a new folder gets under the umask
    (``mkdtemp`` makes it private; a checkpoint is not). ``suffix``: a fixed name
    (``.NAME.SUFFIX``) instead of a unique one."""
    if suffix is None:
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    else:
        staging = out.parent / f".{out.name}.{suffix}"
        staging.mkdir(parents=True)
    staging.chmod(0o777 & ~current_umask())
    return staging


def match_umask(folder: Path) -> None:
    """Give every file in ``folder`` the mode the umask gives new files (some writers make them
    private)."""
    mode = file_mode()
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)


def publish_folder(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``staging`` to ``out``; an existing ``out`` (which
    :func:`check_output` allowed) is swapped out first and removed only once the new one is in
    place, so a failure leaves the old folder where it was."""
    old: Path | None = None
    if out.exists():
        if not overwrite:
            raise LlmpruneError(f"output folder {out} already exists; choose another --out or pass --overwrite")
        check_replaceable(out)
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    with signals_held():  # the two renames happen together, or neither does
        if old is not None:
            os.replace(out, old)
        try:
            os.replace(staging, out)
        except BaseException:
            if old is not None and not out.exists():
                os.replace(old, out)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (main thread, POSIX) for a few system calls that must not be
    split; a signal that came meanwhile is delivered right after."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def publish(out: Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Call ``write(staging)`` on a hidden temporary folder beside ``out``, then rename it to
    ``out``; on any error (Ctrl-C and SIGTERM included) the temporary folder is removed and
    ``out`` is untouched."""
    out = check_output(out, overwrite)
    with signals_held():  # made and owned by the try below, with nothing in between
        staging = make_staging(out)
    try:
        write(staging)
        publish_folder(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def write_metadata(folder: Path, record: dict[str, Any], card: str | Callable[[dict[str, Any]], str]) -> None:
    """Finish a checkpoint folder whose weights, config and tokenizer are written: drop any
    ``sparsity_config`` from config.json, set ``record["checkpoint_bytes"]`` and
    ``record["files"]``, then write the record and the card (a callable is given the record)."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("sparsity_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    record["checkpoint_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    record["files"] = sorted({*(p.name for p in folder.iterdir()), RECORD, CARD})
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    (folder / CARD).write_text(card(record) if callable(card) else card)
    match_umask(folder)


def save_checkpoint(model: Any, tokenizer: Any, out: Path, record: dict[str, Any],
                    card: str | Callable[[dict[str, Any]], str],
                    overwrite: bool = False, max_shard_size: str = "5GB") -> Path:
    """safetensors (sharded above ``max_shard_size``) + config + tokenizer + record + card.
    ``record["checkpoint_bytes"]`` and ``record["files"]`` are set before the record is
    written; a callable ``card`` is given the record after that."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_metadata(folder, record, card)

    return publish(out, overwrite, write)


def read_analysis(path: str | os.PathLike[str], kind: str) -> tuple[Path, Any]:
    """(the path, the parsed JSON) of an analysis file (``kind``: sensitivity, saliency), or a
    one-line error naming the file and the command that writes it."""
    where = Path(path).expanduser()
    try:
        return where, json.loads(where.read_text())
    except OSError as exc:
        raise LlmpruneError(f"cannot read {where}: {exc.strerror or exc}") from None
    except ValueError:
        raise LlmpruneError(f"{where} is not JSON; give the {kind}.json of `llmprune analyze {kind}`") from None


def write_json(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Write a JSON file atomically."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LlmpruneError(f"cannot write {target}: {exc.strerror or exc}") from None
