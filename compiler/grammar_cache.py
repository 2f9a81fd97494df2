"""The reference parser, built once per grammar, lark and Python version and kept on disk.

lark's LALR analysis of the grammar costs a quarter of a second, which every `autonomic`
command would pay again; loading the analysed parser that `Lark.save` wrote costs about 15 ms.
This is lark's own `cache=` made safe:

- a file is used only if its key (the grammar text, the lark options, the lark and Python
  versions and this file's format) is the one expected and the sha256 of its body matches, so
  a stale, truncated or bit-flipped file is never trusted, it is built again and replaced;
- its body is unpickled with no globals allowed: a planted file can at worst fail to load,
  never run code;
- it is written to a temporary file in the same folder and renamed over the old one, so a
  reader sees a whole file or none;
- it lives beside the grammar (in `__pycache__`, as Python keeps bytecode), else in the
  user's cache folder, else nowhere: a read-only install builds the parser in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lark
from lark import Lark

FORMAT = b"autonomic-lark-cache 1"
CACHE_FOLDER = "autonomic"
MAX_CACHE_BYTES = 16 << 20


def cache_key(grammar: str, options: Mapping[str, Any]) -> str:
    """What the analysed parser depends on: another grammar, lark or Python gives another key."""
    parts = [
        FORMAT.decode(),
        lark.__version__,
        "{}.{}".format(*sys.version_info[:2]),
        repr(sorted(options.items())),
        grammar,
    ]
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def default_folders(grammar_folder: Path) -> list[Path]:
    """Where the cache is looked for and written, in order: beside the grammar, then the
    user's cache folder ($XDG_CACHE_HOME, else ~/.cache)."""
    folders = [grammar_folder / "__pycache__"]
    base = os.environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(base):  # the XDG spec: a relative value is ignored
        home = os.path.expanduser("~")
        base = os.path.join(home, ".cache") if os.path.isabs(home) else ""
    if base:
        folders.append(Path(base, CACHE_FOLDER))
    return folders


def load_parser(grammar: str, options: Mapping[str, Any], folders: Iterable[Path]) -> Lark:
    """The parser of `grammar` with `options`: read from the first folder that holds a sound
    cache of it, else built and written to the first folder that takes it."""
    key = cache_key(grammar, options)
    name = f"machine-lark-{key[:24]}.cache"
    folders = list(folders)
    for folder in folders:
        cached = _read(folder / name, key)
        if cached is not None:
            return cached
    parser = Lark(grammar, **options)
    body = io.BytesIO()
    parser.save(body)
    for folder in folders:
        if _write(folder, name, key, body.getvalue()):
            break
    return parser


class _NoGlobals(pickle.Unpickler):
    """Loads plain data only: `Lark.save` writes dicts, lists, tuples, strings and numbers."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"the parser cache may not name {module}.{name}")


def _header(key: str, body: bytes) -> bytes:
    return b"%s %s %s\n" % (FORMAT, key.encode(), hashlib.sha256(body).hexdigest().encode())


def _read(path: Path, key: str) -> Lark | None:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CACHE_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_CACHE_BYTES:
        return None  # not one this module wrote (about 180 KB): not read into memory whole
    header, newline, body = data.partition(b"\n")
    if not newline or header + newline != _header(key, body):
        return None
    try:
        saved = _NoGlobals(io.BytesIO(body)).load()
        parser = Lark.load(saved)  # lark's loader takes the unpickled dict as well as a file
    except Exception:
        # The checksum matched, so the file is as written; a lark that cannot read it back
        # is treated as a miss like any other.
        return None
    return parser if isinstance(parser, Lark) else None


def _write(folder: Path, name: str, key: str, body: bytes) -> bool:
    """Writes the cache atomically; False if the folder cannot take it (read-only, full)."""
    temporary = None
    try:
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            out.write(_header(key, body))
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)  # not secret; other users of a shared install may read it
        os.replace(temporary, folder / name)
        return True
    except OSError:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        return False
