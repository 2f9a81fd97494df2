"""Ed25519 keys for the audit ledger: generation, loading, a keyring with validity windows.

A key directory written by `generate_keypair` holds one key pair:

    <key_id>.private.pem   PKCS8, mode 0600 from creation on
    <key_id>.public.json   key_id, algorithm, public_key (hex), valid_from_ms, valid_until_ms
    <key_id>.public.pem    SubjectPublicKeyInfo, for tools that want PEM

    trusted-root.json      (after a rotation) the ledger's root key: {"fingerprint": SHA-256
                           of its raw public key, "key_id"}; a runtime signing with this
                           folder's key pins it (`load_trusted_root`); without it, the folder's
                           own key is the root

The key id is the first 16 hex digits of SHA-256 over the raw 32-byte public key, so it is
recomputed (never trusted) whenever a key is loaded. Rotation: a new key pair in a new directory
with a later `valid_from_ms`; `retire_key` closes the old key's window at the same instant, and a
`Keyring` holding both public keys verifies entries signed by either within its window.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import KeyExistsError, KeyFileError, KeyPermissionError, KeyWindowError

__all__ = [
    "ALGORITHM",
    "KeyInfo",
    "Keyring",
    "PublicKeyInfo",
    "Signer",
    "generate_keypair",
    "key_id_for",
    "load_public_keys",
    "load_signer",
    "load_trusted_root",
    "now_ms",
    "retire_key",
    "write_keypair",
    "write_trusted_root",
]

ALGORITHM = "ed25519"
PRIVATE_SUFFIX = ".private.pem"
PUBLIC_JSON_SUFFIX = ".public.json"
PUBLIC_PEM_SUFFIX = ".public.pem"
TRUSTED_ROOT_FILE = "trusted-root.json"
# Larger than any file a key could legitimately be; stops a wrong path from being read whole.
MAX_KEY_FILE_BYTES = 64 * 1024


def now_ms() -> int:
    """Wall-clock UTC time in milliseconds."""
    return time.time_ns() // 1_000_000


def key_id_for(raw_public_key: bytes) -> str:
    """The key id: first 16 hex digits of SHA-256 over the raw 32-byte public key."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _window_text(valid_from_ms: int | None, valid_until_ms: int | None) -> str:
    lo = "-inf" if valid_from_ms is None else str(valid_from_ms)
    hi = "+inf" if valid_until_ms is None else str(valid_until_ms)
    return f"[{lo}, {hi})"


@dataclass(frozen=True, slots=True)
class PublicKeyInfo:
    """A public key the verifier trusts, valid for timestamps in [valid_from_ms, valid_until_ms)."""

    key_id: str
    public_key: bytes
    valid_from_ms: int | None
    valid_until_ms: int | None

    def covers(self, ts_ms: int) -> bool:
        if self.valid_from_ms is not None and ts_ms < self.valid_from_ms:
            return False
        return self.valid_until_ms is None or ts_ms < self.valid_until_ms

    def window_text(self) -> str:
        return _window_text(self.valid_from_ms, self.valid_until_ms)

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "algorithm": ALGORITHM,
            "public_key": self.public_key.hex(),
            "valid_from_ms": self.valid_from_ms,
            "valid_until_ms": self.valid_until_ms,
        }


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key pair written to disk by `generate_keypair`."""

    key_id: str
    public_key: bytes
    valid_from_ms: int
    valid_until_ms: int | None
    private_path: Path
    public_json_path: Path
    public_pem_path: Path


def _sodium_signer(private_key: Ed25519PrivateKey) -> Callable[[bytes], bytes]:
    """`private_key.sign`, computed by libsodium from the same 32-byte seed."""
    try:
        from nacl.bindings import crypto_sign_seed_keypair
        from nacl.exceptions import RuntimeError as SodiumError

        sodium = importlib.import_module("nacl._sodium")
        ffi, crypto_sign = sodium.ffi, sodium.lib.crypto_sign
    except (ImportError, AttributeError):
        # No PyNaCl (an environment installed before it became a dependency), or one whose
        # private module is not the one called here.
        return private_key.sign
    seed = private_key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    secret = crypto_sign_seed_keypair(seed)[1]
    # libsodium's crypto_sign as nacl.bindings.crypto_sign calls it, less what its wrapper
    # adds around the call that we do not use (the signed length, the message copied out
    # after the signature): 6 thousand instructions of the 250 a signature takes.
    new, buffer, no_length = ffi.new, ffi.buffer, ffi.NULL
    signed_type = ffi.typeof("unsigned char[]")

    def sign(message: bytes) -> bytes:
        size = len(message)
        signed = new(signed_type, size + 64)  # the signature, then the message
        if crypto_sign(signed, no_length, message, size, secret) != 0:
            raise SodiumError("Unexpected library error")
        return bytes(buffer(signed, 64))

    return sign


@dataclass(frozen=True, slots=True)
class Signer:
    """A private key with its id; the window (when known) stops signing outside it."""

    key_id: str
    private_key: Ed25519PrivateKey
    valid_from_ms: int | None = None
    valid_until_ms: int | None = None
    # Signs with libsodium: Ed25519 signatures are deterministic (RFC 8032), so the bytes are
    # those `private_key.sign` gives, in 19 us rather than 32 here, and without the GIL (cffi
    # releases it), so other threads run while a commit signs.
    sign: Callable[[bytes], bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sign", _sodium_signer(self.private_key))

    @classmethod
    def from_private_key(
        cls,
        private_key: Ed25519PrivateKey,
        *,
        valid_from_ms: int | None = None,
        valid_until_ms: int | None = None,
    ) -> Signer:
        key_id = key_id_for(_raw_public(private_key.public_key()))
        return cls(key_id, private_key, valid_from_ms, valid_until_ms)

    def covers(self, ts_ms: int) -> bool:
        if self.valid_from_ms is not None and ts_ms < self.valid_from_ms:
            return False
        return self.valid_until_ms is None or ts_ms < self.valid_until_ms

    def require_window(self, ts_ms: int) -> None:
        """Fail closed: an entry signed outside the window would never verify."""
        if not self.covers(ts_ms):
            raise KeyWindowError(
                f"key {self.key_id} is not valid at {ts_ms} ms "
                f"(window {_window_text(self.valid_from_ms, self.valid_until_ms)})",
                hint="generate a new key pair for this period (autonomic keygen DIR --valid-from)",
            )

    def public_info(self) -> PublicKeyInfo:
        raw = _raw_public(self.private_key.public_key())
        return PublicKeyInfo(self.key_id, raw, self.valid_from_ms, self.valid_until_ms)


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A keyring member: its public information and a ready verifier object."""

    info: PublicKeyInfo
    verifier: Ed25519PublicKey

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self.verifier.verify(signature, message)
        except InvalidSignature:
            return False
        return True


class Keyring:
    """The public keys a verifier trusts, by key id, each with its validity window."""

    def __init__(self, keys: Iterable[PublicKeyInfo] = ()) -> None:
        self._keys: dict[str, TrustedKey] = {}
        for info in keys:
            self.add(info)

    def add(self, info: PublicKeyInfo) -> None:
        if len(info.public_key) != 32 or key_id_for(info.public_key) != info.key_id:
            raise KeyFileError(f"key id {info.key_id!r} does not match its public key")
        known = self._keys.get(info.key_id)
        if known is not None and known.info != info:
            windowless = PublicKeyInfo(info.key_id, info.public_key, None, None)
            if info == windowless:
                return  # a PEM copy of a key already known with its window: keep the window
            if known.info != windowless:
                raise KeyWindowError(
                    f"key {info.key_id} is given twice with different validity windows "
                    f"{known.info.window_text()} and {info.window_text()}",
                    hint="pass each public key once",
                )
        verifier = Ed25519PublicKey.from_public_bytes(info.public_key)
        self._keys[info.key_id] = TrustedKey(info, verifier)

    def get(self, key_id: str) -> TrustedKey | None:
        return self._keys.get(key_id)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[PublicKeyInfo]:
        return (trusted.info for trusted in self._keys.values())

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike[str]]) -> Keyring:
        keyring = cls()
        for info in load_public_keys(paths):
            keyring.add(info)
        return keyring


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except IsADirectoryError:
        raise KeyFileError(f"{path} is a directory, not a key file") from None
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path} is too large to be a key file")
    return data


def _optional_ms(doc: dict[str, Any], name: str, path: Path) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise KeyFileError(f"{path}: {name} must be an integer (milliseconds) or null")
    return value


def _parse_public_json(path: Path, data: bytes) -> PublicKeyInfo:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise KeyFileError(
            f"{path} is not a public key JSON file",
            hint="pass the <key_id>.public.json or <key_id>.public.pem written by keygen",
        ) from None
    if not isinstance(doc, dict):
        raise KeyFileError(f"{path} is not a public key JSON object")
    if doc.get("algorithm") != ALGORITHM:
        raise KeyFileError(f"{path}: algorithm must be {ALGORITHM!r}")
    key_hex = doc.get("public_key")
    try:
        raw = bytes.fromhex(key_hex) if isinstance(key_hex, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise KeyFileError(f"{path}: public_key must be 64 hex digits (raw Ed25519 key)")
    key_id = key_id_for(raw)
    if doc.get("key_id") != key_id:
        raise KeyFileError(
            f"{path}: key_id {doc.get('key_id')!r} does not match the public key ({key_id})"
        )
    valid_from = _optional_ms(doc, "valid_from_ms", path)
    valid_until = _optional_ms(doc, "valid_until_ms", path)
    if valid_from is not None and valid_until is not None and valid_until <= valid_from:
        raise KeyWindowError(f"{path}: valid_until_ms must be later than valid_from_ms")
    return PublicKeyInfo(key_id, raw, valid_from, valid_until)


def _parse_public_pem(path: Path, data: bytes) -> PublicKeyInfo:
    if b"PRIVATE KEY" in data:
        raise KeyFileError(
            f"{path} holds a private key",
            hint="verification needs only the public key: pass <key_id>.public.json",
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"{path} is not a public key file",
            hint="pass the <key_id>.public.json or <key_id>.public.pem written by keygen",
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a public key that is not Ed25519")
    raw = _raw_public(key)
    return PublicKeyInfo(key_id_for(raw), raw, None, None)


def load_public_key(path: str | os.PathLike[str]) -> PublicKeyInfo:
    """One public key from a .public.json (with its window) or a PEM file (no window)."""
    file = Path(path)
    data = _read_key_file(file)
    if file.suffix == ".json" or data.lstrip()[:1] == b"{":
        return _parse_public_json(file, data)
    return _parse_public_pem(file, data)


def load_public_keys(paths: Iterable[str | os.PathLike[str]]) -> list[PublicKeyInfo]:
    """Public keys from files, or from key directories (every *.public.json in them)."""
    found: list[PublicKeyInfo] = []
    for path in paths:
        file = Path(path)
        if file.is_dir():
            listed = sorted(file.glob("*" + PUBLIC_JSON_SUFFIX))
            if not listed:
                raise KeyFileError(f"{file} holds no *{PUBLIC_JSON_SUFFIX} public key file")
            found.extend(load_public_key(item) for item in listed)
        else:
            found.append(load_public_key(file))
    return found


def _private_key_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    candidates = sorted(path.glob("*" + PRIVATE_SUFFIX))
    if len(candidates) != 1:
        raise KeyFileError(
            f"{path} holds {len(candidates)} private key files; expected exactly one",
            hint="pass the <key_id>.private.pem file itself",
        )
    return candidates[0]


def load_signer(path: str | os.PathLike[str]) -> Signer:
    """The signer of a private key file, or of the one key in a key directory.

    The window comes from the sibling `<key_id>.public.json` when there is one, so a runtime
    refuses to sign outside it.
    """
    file = _private_key_file(Path(path))
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"private key file {file} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"private key file {file} cannot be read: {exc.strerror}") from None
    data = _read_key_file(file)
    if b"PRIVATE KEY" not in data:
        raise KeyFileError(
            f"{file} is not a private key file",
            hint="pass the <key_id>.private.pem written by keygen",
        )
    if stat.S_ISREG(mode) and mode & 0o077:
        raise KeyPermissionError(
            f"private key file {file} is accessible by other users (mode {mode & 0o777:04o})",
            hint=f"chmod 600 {file}",
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"{file} cannot be loaded as an unencrypted PKCS8 private key",
            hint="pass the <key_id>.private.pem written by keygen",
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{file} holds a private key that is not Ed25519")
    signer = Signer.from_private_key(key)
    public_json = file.with_name(signer.key_id + PUBLIC_JSON_SUFFIX)
    if not public_json.exists():
        return signer
    info = _parse_public_json(public_json, _read_key_file(public_json))
    if info.key_id != signer.key_id:
        raise KeyFileError(f"{public_json} does not belong to {file}")
    return Signer(signer.key_id, key, info.valid_from_ms, info.valid_until_ms)


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never replace an existing file, never follow a planted symlink; the mode is set at
    # creation, so a private key is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_keypair(
    directory: str | os.PathLike[str],
    private_key: Ed25519PrivateKey,
    *,
    valid_from_ms: int,
) -> KeyInfo:
    """Write a key pair into `directory`, which must not already hold a private key."""
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise KeyFileError(f"{folder} exists and is not a directory")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create key directory {folder}: {exc.strerror}") from None
    existing = sorted(folder.glob("*" + PRIVATE_SUFFIX))
    if existing:
        raise KeyExistsError(
            f"{folder} already holds a private key ({existing[0].name}); refusing to overwrite",
            hint="write each key pair (for example a rotated key) into a new directory",
        )
    raw = _raw_public(private_key.public_key())
    key_id = key_id_for(raw)
    info = KeyInfo(
        key_id=key_id,
        public_key=raw,
        valid_from_ms=valid_from_ms,
        valid_until_ms=None,
        private_path=folder / (key_id + PRIVATE_SUFFIX),
        public_json_path=folder / (key_id + PUBLIC_JSON_SUFFIX),
        public_pem_path=folder / (key_id + PUBLIC_PEM_SUFFIX),
    )
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_doc = PublicKeyInfo(key_id, raw, valid_from_ms, None).to_json()
    public_json = (json.dumps(public_doc, indent=2) + "\n").encode()
    plan = (
        (info.private_path, private_pem, 0o600),
        (info.public_json_path, public_json, 0o644),
        (info.public_pem_path, public_pem, 0o644),
    )
    written: list[Path] = []
    try:
        for path, data, mode in plan:
            _write_new_file(path, data, mode)
            written.append(path)
    except FileExistsError as exc:
        _remove_all(written)
        raise KeyExistsError(
            f"{exc.filename} already exists; refusing to overwrite",
            hint="write each key pair into a new directory",
        ) from None
    except OSError as exc:
        _remove_all(written)
        raise KeyFileError(f"cannot write key files in {folder}: {exc.strerror}") from None
    _fsync_directory(folder)
    return info


def _remove_all(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def generate_keypair(
    directory: str | os.PathLike[str], *, valid_from_ms: int | None = None
) -> KeyInfo:
    """Generate an Ed25519 key pair and write it into `directory` (see the module docstring)."""
    start = now_ms() if valid_from_ms is None else valid_from_ms
    return write_keypair(directory, Ed25519PrivateKey.generate(), valid_from_ms=start)


def retire_key(public_json: str | os.PathLike[str], valid_until_ms: int) -> PublicKeyInfo:
    """Close a key's validity window at `valid_until_ms` (rotation), rewriting its JSON file."""
    path = Path(public_json)
    info = _parse_public_json(path, _read_key_file(path))
    if info.valid_from_ms is not None and valid_until_ms <= info.valid_from_ms:
        raise KeyWindowError(
            f"cannot retire key {info.key_id} at {valid_until_ms} ms: "
            f"it only becomes valid at {info.valid_from_ms} ms",
            hint="the new key's --valid-from must be later than the old key's",
        )
    if info.valid_until_ms is not None and info.valid_until_ms <= valid_until_ms:
        return info  # already retired at or before that instant; never widen a window
    retired = PublicKeyInfo(info.key_id, info.public_key, info.valid_from_ms, valid_until_ms)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write_new_file(temporary, (json.dumps(retired.to_json(), indent=2) + "\n").encode(), 0o644)
        os.replace(temporary, path)
    except OSError as exc:
        _remove_all([temporary])
        raise KeyFileError(f"cannot rewrite {path}: {exc.strerror}") from None
    _fsync_directory(path.parent)
    return retired


def _key_folder(path: str | os.PathLike[str]) -> Path:
    folder = Path(path)
    return folder if folder.is_dir() else folder.parent


def load_trusted_root(keys: str | os.PathLike[str]) -> str:
    """The fingerprint of the ledger root a runtime signing with the key in `keys` (its folder
    or its private key file) pins: the one `trusted-root.json` records there (written by
    `autonomic keygen --retire`), else that key's own (a key that never rotated is its
    ledgers' root)."""
    folder = _key_folder(keys)
    recorded = folder / TRUSTED_ROOT_FILE
    if not recorded.exists():
        return hashlib.sha256(load_signer(keys).public_info().public_key).hexdigest()
    try:
        doc = json.loads(_read_key_file(recorded))
    except (ValueError, RecursionError):
        doc = None
    value = doc.get("fingerprint") if isinstance(doc, dict) else None
    if (
        not isinstance(value, str)
        or len(value) != 64
        or any(c not in "0123456789abcdef" for c in value)
    ):
        raise KeyFileError(
            f"{recorded} does not hold a root fingerprint (64 lowercase hex digits)",
            hint="it is written by `autonomic keygen --retire`; restore it from the outgoing "
            "key's folder or the root key's `keygen` output",
        )
    return value


def write_trusted_root(directory: str | os.PathLike[str], fingerprint: str) -> Path:
    """Record the ledger's root in a key folder (a new key introduced by a rotation)."""
    path = Path(directory) / TRUSTED_ROOT_FILE
    doc = {"fingerprint": fingerprint, "key_id": fingerprint[:16]}
    try:
        _write_new_file(path, (json.dumps(doc, indent=2) + "\n").encode(), 0o644)
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from None
    _fsync_directory(path.parent)
    return path
