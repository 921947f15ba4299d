"""The resume journal of a streaming run, kept in the output's temporary folder.

After each decoder layer is pruned its shard is written and flushed, the activations feeding the
next layer are written and flushed, and only then is the layer appended to ``journal.json``
(itself replaced atomically). Whatever kills the run, the journal names only complete files, and
every file's SHA-256 is checked again before a resumed run trusts it: a corrupt or truncated
journal or shard stops the run with an error, it is never silently reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmprune.errors import LlmpruneError
from llmprune.io.activations import file_sha256
from llmprune.io.export import JOURNAL_FOLDER

FOLDER = JOURNAL_FOLDER
FILE = "journal.json"
VERSION = 2  # 2: each layer records its weight matrices' zeros


class Journal:
    def __init__(self, staging: Path, fingerprint: dict[str, Any], data: dict[str, Any] | None = None) -> None:
        self.staging = staging
        self.folder = staging / FOLDER
        self.data = data or {"version": VERSION, "fingerprint": fingerprint, "rest": None, "layers": []}

    @classmethod
    def start(cls, staging: Path, fingerprint: dict[str, Any]) -> Journal:
        journal = cls(staging, fingerprint)
        journal.folder.mkdir(parents=True, exist_ok=True)
        journal._save()
        return journal

    @classmethod
    def load(cls, staging: Path, fingerprint: dict[str, Any]) -> Journal:
        """The journal of an interrupted run, every file it names checked against its hash."""
        path = staging / FOLDER / FILE
        fix = f"remove {staging} (or pass --overwrite without --resume) to start again"
        try:
            data = json.loads(path.read_text())
            layers, version, stored = data["layers"], data["version"], data["fingerprint"]
        except FileNotFoundError:
            raise LlmpruneError(f"{staging} has no resume journal ({path} is missing); {fix}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise LlmpruneError(f"resume journal {path} is corrupt ({exc}); {fix}") from None
        if version != VERSION:
            raise LlmpruneError(f"resume journal {path} has version {version}, expected {VERSION}; {fix}")
        changed = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        if changed:
            raise LlmpruneError(f"cannot resume: the interrupted run in {staging} differs in {', '.join(changed)}; "
                                f"rerun with the same settings, or {fix}")
        journal = cls(staging, fingerprint, data)
        for entry in [data["rest"], *layers] if data["rest"] else layers:
            shard = staging / entry["shard"]
            if not shard.is_file() or file_sha256(shard) != entry["sha256"]:
                raise LlmpruneError(f"shard {shard} does not match the resume journal (truncated or corrupt); {fix}")
        return journal

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self.data["layers"])

    @property
    def rest(self) -> dict[str, Any] | None:
        return self.data["rest"]

    def record_rest(self, entry: dict[str, Any]) -> None:
        self.data["rest"] = entry
        self._save()

    def record_layer(self, entry: dict[str, Any]) -> None:
        expected = len(self.data["layers"])
        if entry["index"] != expected:
            raise RuntimeError(f"journal expects layer {expected}, got {entry['index']}")
        self.data["layers"].append(entry)
        self._save()

    def _save(self) -> None:
        path = self.folder / FILE
        partial = self.folder / f"{FILE}.partial"
        with open(partial, "w") as handle:
            handle.write(json.dumps(self.data, indent=1) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
