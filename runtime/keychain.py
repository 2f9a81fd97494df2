"""The ledger's own record of its keys: the genesis entry, key rotations and retirements.

A ledger has one root of trust. Its first entry (seq 0, kind "genesis") declares the root public
key and the settings verification depends on (the mode, chained checkpoints, the Merkle tree),
and is signed by that root key. A verifier pins the root (its public key file or its
fingerprint, the SHA-256 of the raw public key) and from there follows the chain:

- kind "key_rotation" introduces a new key (id, public key, validity window) and is signed by
  an active key, the outgoing one; the keys it lists in "retires" (normally the outgoing key)
  stop being active after it;
- kind "key_retirement" retires active keys; it is signed by an active key.

Only an active key whose window covers an entry's timestamp may sign it (or a checkpoint); a
signature by any other key fails at that index, even if the verifier was handed that key.

Control entries use the ordinary entry layout (so every store keeps them unchanged):
machine, instance, from_state, to_state and event_id are "", actor is "autonomic", `event`
holds the body as canonical JSON (RFC 8785; ASCII only), `payload_sha256` is the payload digest
of that body, and `key_id`/`signature` are always set, in either ledger mode.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .keys import ALGORITHM, Keyring, PublicKeyInfo, TrustedKey, key_id_for

__all__ = [
    "CONTROL_ACTOR",
    "CONTROL_KINDS",
    "GENESIS",
    "RETIREMENT",
    "ROTATION",
    "ChainError",
    "KeyChain",
    "RootOfTrust",
    "encode_body",
    "fingerprint",
    "genesis_body",
    "retirement_body",
    "rotation_body",
]

GENESIS, ROTATION, RETIREMENT = "genesis", "key_rotation", "key_retirement"
CONTROL_KINDS: frozenset[str] = frozenset((GENESIS, ROTATION, RETIREMENT))
CONTROL_ACTOR = "autonomic"
LEDGER_FORMAT = "autonomic-ledger"
LEDGER_VERSION = 2
CHECKPOINT_CHAINING = "chained-v2"
TREE = "rfc9162-sha256"
_MODES = ("sign-each", "checkpoint")

ChainProblem = Literal["genesis", "unknown_key", "key_window", "key_retired", "rotation"]


def fingerprint(public_key: bytes) -> str:
    """The full SHA-256 (hex) of a raw Ed25519 public key: what a verifier pins."""
    return hashlib.sha256(public_key).hexdigest()


def encode_body(body: dict[str, Any]) -> str:
    """Canonical JSON of a control body. Bodies hold ASCII strings, integers, null and lists
    only, for which sorted keys and compact separators are exactly RFC 8785."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _key_doc(info: PublicKeyInfo) -> dict[str, Any]:
    return info.to_json()


def genesis_body(mode: str, root: PublicKeyInfo) -> dict[str, Any]:
    return {
        "format": LEDGER_FORMAT,
        "version": LEDGER_VERSION,
        "mode": mode,
        "checkpoints": CHECKPOINT_CHAINING,
        "tree": TREE,
        "root_key": _key_doc(root),
    }


def rotation_body(new_key: PublicKeyInfo, retires: list[str]) -> dict[str, Any]:
    return {"new_key": _key_doc(new_key), "retires": sorted(retires)}


def retirement_body(retires: list[str]) -> dict[str, Any]:
    return {"retires": sorted(retires)}


class ChainError(Exception):
    """Why a control entry or a signature does not fit the chain (becomes a verify failure)."""

    def __init__(self, problem: ChainProblem, reason: str) -> None:
        super().__init__(reason)
        self.problem = problem
        self.reason = reason


def _parse_key(doc: object, what: str) -> PublicKeyInfo:
    if not isinstance(doc, dict) or set(doc) != {
        "key_id",
        "algorithm",
        "public_key",
        "valid_from_ms",
        "valid_until_ms",
    }:
        raise ChainError("rotation", f"{what} is not a public key document")
    if doc["algorithm"] != ALGORITHM:
        raise ChainError("rotation", f"{what} is not an {ALGORITHM} key")
    try:
        raw = bytes.fromhex(doc["public_key"]) if isinstance(doc["public_key"], str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32 or key_id_for(raw) != doc["key_id"]:
        raise ChainError("rotation", f"{what}: key id and public key do not match")
    window = (doc["valid_from_ms"], doc["valid_until_ms"])
    if any(value is not None and type(value) is not int for value in window):
        raise ChainError("rotation", f"{what}: the validity window must be integers or null")
    return PublicKeyInfo(doc["key_id"], raw, window[0], window[1])


def _parse_body(text: object) -> dict[str, Any]:
    if not isinstance(text, str):
        raise ChainError("rotation", "the control entry's body is not text")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):  # ValueError: not JSON, or an integer too long to read
        raise ChainError("rotation", "the control entry's body is not JSON") from None
    if not isinstance(body, dict) or encode_body(body) != text:
        raise ChainError("rotation", "the control entry's body is not canonical JSON")
    return body


def _retired_ids(body: dict[str, Any]) -> list[str]:
    retires = body.get("retires")
    if not isinstance(retires, list) or not all(isinstance(item, str) for item in retires):
        raise ChainError("rotation", "'retires' must be a list of key ids")
    return list(retires)


@dataclass(frozen=True, slots=True)
class RootOfTrust:
    """The pinned root: the fingerprint the genesis entry's key must have, and the window the
    verifier's copy of the key gives it (narrowing the window the genesis entry declares)."""

    fingerprint: str
    valid_from_ms: int | None = None
    valid_until_ms: int | None = None

    @classmethod
    def of(cls, root: RootOfTrust | PublicKeyInfo | Keyring | str) -> RootOfTrust:
        """From a pinned key, a fingerprint (64 hex digits), or a keyring of exactly one key."""
        if isinstance(root, RootOfTrust):
            return root
        if isinstance(root, PublicKeyInfo):
            return cls(fingerprint(root.public_key), root.valid_from_ms, root.valid_until_ms)
        if isinstance(root, Keyring):
            keys = list(root)
            if len(keys) != 1:
                raise ValueError(
                    f"a ledger is verified from one pinned root key, not {len(keys)}: rotated "
                    "keys are introduced by the ledger's own rotation entries"
                )
            return cls.of(keys[0])
        text = root.strip().lower()
        if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
            raise ValueError("a root fingerprint is 64 hex digits (SHA-256 of the public key)")
        return cls(text)


@dataclass(slots=True)
class KeyChain:
    """The key state replayed from a ledger's control entries, from its pinned root on."""

    root: RootOfTrust
    mode: str | None = None
    active: dict[str, TrustedKey] = field(default_factory=dict)
    introduced: dict[str, TrustedKey] = field(default_factory=dict)
    retired_at: dict[str, int] = field(default_factory=dict)

    def genesis(self, seq: int, body_text: object, key_id: str) -> TrustedKey:
        """Apply the genesis entry; returns the root key that must have signed it."""
        if seq != 0:
            raise ChainError("genesis", "a genesis entry may only be the ledger's first entry")
        body = _parse_body(body_text)
        expected = {"format", "version", "mode", "checkpoints", "tree", "root_key"}
        if set(body) != expected:
            raise ChainError("genesis", "the genesis entry does not hold the expected fields")
        if (body["format"], body["version"]) != (LEDGER_FORMAT, LEDGER_VERSION):
            raise ChainError(
                "genesis", f"unsupported ledger format {body['format']!r} {body['version']!r}"
            )
        if body["mode"] not in _MODES:
            raise ChainError("genesis", f"the genesis entry declares unknown mode {body['mode']!r}")
        if (body["checkpoints"], body["tree"]) != (CHECKPOINT_CHAINING, TREE):
            raise ChainError("genesis", "the genesis entry declares unknown checkpoint settings")
        root = _parse_key(body["root_key"], "the genesis root key")
        if fingerprint(root.public_key) != self.root.fingerprint:
            raise ChainError(
                "genesis",
                f"the genesis entry's root key {root.key_id} (fingerprint "
                f"{fingerprint(root.public_key)}) is not the pinned root (fingerprint "
                f"{self.root.fingerprint})",
            )
        if key_id != root.key_id:
            raise ChainError(
                "unknown_key",
                f"the genesis entry is signed by key {key_id!r}, not by its own root key",
            )
        self.mode = body["mode"]
        starts = [t for t in (root.valid_from_ms, self.root.valid_from_ms) if t is not None]
        ends = [t for t in (root.valid_until_ms, self.root.valid_until_ms) if t is not None]
        root = PublicKeyInfo(
            root.key_id,
            root.public_key,
            max(starts) if starts else None,
            min(ends) if ends else None,
        )
        trusted = _trusted(root)
        self.active[root.key_id] = self.introduced[root.key_id] = trusted
        return trusted

    def signer(self, seq: int, key_id: str, ts_ms: int, what: str = "entry") -> TrustedKey:
        """The active key that may sign at `seq` and `ts_ms`, or ChainError naming why not."""
        trusted = self.active.get(key_id)
        if trusted is None:
            if key_id in self.retired_at:
                raise ChainError(
                    "key_retired",
                    f"{what} signed by key {key_id}, which the ledger retired at seq "
                    f"{self.retired_at[key_id]}",
                )
            raise ChainError(
                "unknown_key",
                f"{what} signed by key {key_id!r}, which the ledger's chain of keys never "
                "introduced (a key outside the chain is not trusted, even if it is given)",
            )
        if not trusted.info.covers(ts_ms):
            raise ChainError(
                "key_window",
                f"key {key_id} is not valid at {ts_ms} ms (window {trusted.info.window_text()})",
            )
        return trusted

    def apply(self, seq: int, kind: str, body_text: object) -> None:
        """Apply a rotation or retirement whose signature was already checked."""
        body = _parse_body(body_text)
        retires = _retired_ids(body)
        if kind == ROTATION:
            if set(body) != {"new_key", "retires"}:
                raise ChainError("rotation", "a rotation holds 'new_key' and 'retires' only")
            new = _parse_key(body["new_key"], "the rotation's new key")
            if new.key_id in self.introduced:
                raise ChainError("rotation", f"key {new.key_id} was already introduced")
        elif set(body) != {"retires"} or not retires:
            raise ChainError("rotation", "a retirement lists the key ids it retires")
        for key_id in retires:
            if key_id not in self.active:
                raise ChainError("rotation", f"key {key_id} is not active and cannot be retired")
        for key_id in retires:
            del self.active[key_id]
            self.retired_at[key_id] = seq
        if kind == ROTATION:
            trusted = _trusted(new)
            self.active[new.key_id] = self.introduced[new.key_id] = trusted

    def any_introduced(self, key_id: str) -> TrustedKey | None:
        return self.introduced.get(key_id)


def _trusted(info: PublicKeyInfo) -> TrustedKey:
    return TrustedKey(info, Ed25519PublicKey.from_public_bytes(info.public_key))
