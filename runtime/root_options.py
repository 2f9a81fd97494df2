"""The ledger root a command pins, `--public-key FILE` or `--root FINGERPRINT`: taken the
same way by `audit verify` and `worker` (a module of its own: the two command modules import
each other's parts otherwise)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import KeyFileError, RuntimeFailure, failure_diagnostic
from .keychain import RootOfTrust
from .keys import PublicKeyInfo, load_public_key
from .ledger import RootLike

__all__ = ["KEY_HINT", "load_root", "root_of"]

KEY_HINT = "pass the <key_id>.public.json (or .public.pem) written by `autonomic keygen`"
_EXIT_FAILED, _EXIT_USAGE = 1, 2


def load_root(path: str) -> PublicKeyInfo | tuple[str, RuntimeFailure]:
    """The pinned root key from a public key file, or the diagnostic's path and failure."""
    try:
        if Path(path).is_dir():
            raise KeyFileError(
                f"{path} is a directory",
                hint="pass the root key's <key_id>.public.json file",
            )
        return load_public_key(path)
    except RuntimeFailure as failure:
        return path, failure


def root_of(args: argparse.Namespace) -> RootLike | int:
    """The root of trust given as --public-key FILE or --root FINGERPRINT, or the exit status
    once the problem is told: a usage error (2, through `args.usage_error`) or the key file's
    diagnostic (1)."""
    if args.root is not None:
        try:
            return RootOfTrust.of(args.root)
        except ValueError as exc:
            args.usage_error(f"--root: {exc}")  # exits with status 2
            return _EXIT_USAGE
    loaded = load_root(args.public_key)
    if isinstance(loaded, tuple):
        path, failure = loaded
        sys.stderr.write(failure_diagnostic(path, failure, KEY_HINT) + "\n")
        return _EXIT_FAILED
    return loaded
