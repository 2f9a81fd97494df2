"""Witnesses: copies of signed checkpoints kept outside the database, so truncation shows.

A ledger can only prove what it still holds: cut entries off the end together with their
checkpoints and what remains verifies. A witness keeps each published checkpoint somewhere
the database's owner cannot quietly rewrite (RFC 9162's signed tree heads play this role):

- `FileWitness(path)`: an append-only JSON Lines file, ideally in another directory or on
  another machine's mount. Before it appends, it checks that the new checkpoint extends the
  last one it holds (the Merkle consistency proof), so it never accepts a rewritten history.
- `CommandWitness(argv)`: runs a command with the publication on standard input (for example
  one that commits it to a git repository or posts it to a service); exit 0 means accepted.

A publication is one JSON line: {"checkpoint": {...}, "consistency": {"from_size",
"from_root", "proof"}}, where the proof (RFC 9162 2.1.4) shows that the tree of `size` entries
extends the tree of `from_size` entries the same witness received before. `audit verify
--witness FILE` checks a ledger against the newest checkpoint in a witness file.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import CheckpointFileError, WitnessError
from .ledger import Checkpoint
from .merkle import EMPTY_ROOT, verify_consistency

__all__ = [
    "CommandWitness",
    "FileWitness",
    "Publication",
    "Witness",
    "read_witness_file",
]

_TAIL_BYTES = 1 << 16


@dataclass(frozen=True, slots=True)
class Publication:
    """A signed checkpoint and the proof that it extends the witness's previous one."""

    checkpoint: Checkpoint
    from_size: int
    from_root: bytes
    proof: tuple[bytes, ...]

    def to_line(self) -> str:
        doc = {
            "checkpoint": self.checkpoint.to_dict(),
            "consistency": {
                "from_size": self.from_size,
                "from_root": self.from_root.hex(),
                "proof": [node.hex() for node in self.proof],
            },
        }
        return json.dumps(doc, separators=(",", ":")) + "\n"

    @classmethod
    def from_line(cls, text: str | bytes) -> Publication:
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            raise CheckpointFileError("a witness line is not JSON") from None
        if not isinstance(doc, dict) or set(doc) != {"checkpoint", "consistency"}:
            raise CheckpointFileError("a witness line holds 'checkpoint' and 'consistency'")
        checkpoint = Checkpoint.from_dict(doc["checkpoint"])
        consistency: Any = doc["consistency"]
        if not isinstance(consistency, dict) or set(consistency) != {
            "from_size",
            "from_root",
            "proof",
        }:
            raise CheckpointFileError(
                "a witness line's consistency holds from_size, from_root, proof"
            )
        from_size, proof = consistency["from_size"], consistency["proof"]
        try:
            from_root = bytes.fromhex(consistency["from_root"])
            nodes = tuple(bytes.fromhex(node) for node in proof)
        except (TypeError, ValueError):
            raise CheckpointFileError("a witness line's hashes must be hex") from None
        if type(from_size) is not int or not 0 <= from_size <= checkpoint.size:
            raise CheckpointFileError("from_size must be an integer no larger than the size")
        if len(from_root) != 32 or any(len(node) != 32 for node in nodes):
            raise CheckpointFileError("a witness line's hashes must be 32 bytes each")
        return cls(checkpoint, from_size, from_root, nodes)

    def extends(self, size: int, root: bytes) -> bool:
        """Does this publication's proof connect it to a checkpoint of `size` and `root`?"""
        return (
            self.from_size == size
            and self.from_root == root
            and verify_consistency(
                size, root, self.checkpoint.size, self.checkpoint.tree_root, self.proof
            )
        )


class Witness(Protocol):
    """Somewhere outside the database that keeps published checkpoints."""

    @property
    def name(self) -> str: ...

    def publish(self, publication: Publication) -> None:
        """Keep the publication, or raise WitnessError."""


class FileWitness:
    """An append-only JSON Lines file of publications (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def name(self) -> str:
        return str(self.path)

    def last(self) -> Publication | None:
        """The last publication in the file (read from its tail only), or None."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                length = handle.tell()
                handle.seek(max(length - _TAIL_BYTES, 0))
                tail = handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise WitnessError(f"witness file {self.path}: {exc.strerror}") from None
        lines = [line for line in tail.split(b"\n") if line.strip()]
        if not lines:
            return None
        try:
            return Publication.from_line(lines[-1])
        except CheckpointFileError as exc:
            raise WitnessError(f"witness file {self.path}: last line: {exc.message}") from None

    def publish(self, publication: Publication) -> None:
        last = self.last()
        size, root = (
            (0, EMPTY_ROOT)
            if last is None
            else (
                last.checkpoint.size,
                last.checkpoint.tree_root,
            )
        )
        if publication.checkpoint.size == size and last is not None:
            if publication.checkpoint.tree_root != root:
                raise WitnessError(
                    f"witness {self.path} holds a different tree at size {size}: "
                    "the ledger was rewritten"
                )
            return
        if not publication.extends(size, root):
            raise WitnessError(
                f"witness {self.path} refuses the checkpoint at size "
                f"{publication.checkpoint.size}: it does not extend the checkpoint at size "
                f"{size} the witness holds (consistency proof from size "
                f"{publication.from_size} fails)",
                hint="the ledger was rewritten or truncated; verify it with `autonomic audit "
                "verify --witness`",
            )
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            with os.fdopen(fd, "a", encoding="utf-8") as handle:
                handle.write(publication.to_line())
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise WitnessError(
                f"cannot append to witness file {self.path}: {exc.strerror}"
            ) from None


class CommandWitness:
    """Runs `argv` with the publication (one JSON line) on standard input."""

    def __init__(self, argv: Sequence[str], *, timeout_s: float = 30.0) -> None:
        if not argv:
            raise ValueError("a command witness needs a command")
        self.argv = list(argv)
        self.timeout_s = timeout_s

    @property
    def name(self) -> str:
        return " ".join(self.argv)

    def publish(self, publication: Publication) -> None:
        try:
            done = subprocess.run(
                self.argv,
                input=publication.to_line(),
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise WitnessError(f"witness command {self.name!r} cannot run: {exc}") from None
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            raise WitnessError(
                f"witness command {self.name!r} exited with {done.returncode}: {detail[0]}"
            )


def read_witness_file(path: str | os.PathLike[str]) -> tuple[Checkpoint, int]:
    """The newest checkpoint in a witness file and how many it holds, after checking that each
    publication extends the one before it (so the file itself was only ever appended to).

    A single checkpoint document (`audit checkpoint --out`) is accepted as a one-entry witness.
    """
    file = Path(path)
    try:
        data = file.read_bytes()
    except IsADirectoryError:
        raise CheckpointFileError(f"{file} is a directory, not a witness file") from None
    except OSError as exc:
        raise CheckpointFileError(f"witness file {file}: {exc.strerror}") from None
    stripped = data.lstrip()
    if stripped.startswith(b"{") and b'"consistency"' not in stripped[:_TAIL_BYTES]:
        return Checkpoint.from_json(data), 1
    size, root = 0, EMPTY_ROOT
    newest: Checkpoint | None = None
    count = 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            publication = Publication.from_line(line)
        except CheckpointFileError as exc:
            raise CheckpointFileError(f"{file}:{number}: {exc.message}") from None
        checkpoint = publication.checkpoint
        if newest is not None and checkpoint.size == size and checkpoint.tree_root == root:
            continue
        if not publication.extends(size, root):
            raise CheckpointFileError(
                f"{file}:{number}: the checkpoint at size {checkpoint.size} does not extend "
                f"the one at size {size} before it: the witness file was altered"
            )
        size, root, newest = checkpoint.size, checkpoint.tree_root, checkpoint
        count += 1
    if newest is None:
        raise CheckpointFileError(f"{file} holds no published checkpoint")
    return newest, count
