"""Ed25519 key files: generation (0600, no overwrite), loading, keyrings and validity windows."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from autonomic.runtime.errors import (
    KeyExistsError,
    KeyFileError,
    KeyPermissionError,
    KeyWindowError,
)
from autonomic.runtime.keys import (
    Keyring,
    PublicKeyInfo,
    Signer,
    generate_keypair,
    key_id_for,
    load_public_key,
    load_public_keys,
    load_signer,
    retire_key,
    write_keypair,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

T0 = 1_700_000_000_000


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keygen_writes_three_files_with_a_derived_key_id(tmp_path: Path) -> None:
    info = generate_keypair(tmp_path / "keys", valid_from_ms=T0)
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == sorted(
        [
            f"{info.key_id}.private.pem",
            f"{info.key_id}.public.json",
            f"{info.key_id}.public.pem",
        ]
    )
    assert info.key_id == hashlib.sha256(info.public_key).hexdigest()[:16]
    doc = json.loads(info.public_json_path.read_text())
    assert doc == {
        "key_id": info.key_id,
        "algorithm": "ed25519",
        "public_key": info.public_key.hex(),
        "valid_from_ms": T0,
        "valid_until_ms": None,
    }
    private = serialization.load_pem_private_key(info.private_path.read_bytes(), None)
    assert isinstance(private, Ed25519PrivateKey)
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert raw == info.public_key
    assert load_public_key(info.public_pem_path).public_key == info.public_key


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_private_key_is_created_0600_without_a_later_chmod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the key must be created with its final mode, not chmod-ed")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(os, "fchmod", refuse)
    previous = os.umask(umask)
    try:
        info = generate_keypair(tmp_path / "k")
    finally:
        os.umask(previous)
    assert _mode(info.private_path) == 0o600
    assert _mode(info.public_json_path) & 0o077 == 0o044 & ~umask


def test_keygen_refuses_a_directory_that_already_holds_a_key(tmp_path: Path) -> None:
    first = generate_keypair(tmp_path, valid_from_ms=T0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(KeyExistsError) as caught:
        generate_keypair(tmp_path, valid_from_ms=T0)
    assert first.private_path.name in caught.value.message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_write_keypair_never_replaces_an_existing_file(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    planted = tmp_path / f"{key_id_for(raw)}.public.json"
    planted.write_text("planted")
    with pytest.raises(KeyExistsError):
        write_keypair(tmp_path, key, valid_from_ms=T0)
    assert planted.read_text() == "planted"
    # The private key written before the clash is removed again: no half-written key pair.
    assert not list(tmp_path.glob("*.private.pem"))


def test_write_keypair_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious")
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / f"{key_id_for(raw)}.public.pem").symlink_to(target)
    with pytest.raises(KeyExistsError):
        write_keypair(folder, key, valid_from_ms=T0)
    assert target.read_text() == "precious"


def test_keygen_into_a_file_path_fails_cleanly(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(KeyFileError):
        generate_keypair(file)


def test_load_signer_from_file_or_directory_signs_verifiably(tmp_path: Path) -> None:
    info = generate_keypair(tmp_path, valid_from_ms=T0)
    for source in (info.private_path, tmp_path):
        signer = load_signer(source)
        assert signer.key_id == info.key_id
        assert (signer.valid_from_ms, signer.valid_until_ms) == (T0, None)
        keyring = Keyring.from_files([info.public_json_path])
        trusted = keyring.get(info.key_id)
        assert trusted is not None
        assert trusted.verify(signer.sign(b"message"), b"message")
        assert not trusted.verify(signer.sign(b"message"), b"messagE")


def test_signer_gives_the_bytes_of_the_cryptography_key_it_holds() -> None:
    # Signer.sign runs libsodium; Ed25519 is deterministic, so the signatures must be the ones
    # the held key gives (what verifiers and stored ledgers expect), for any message.
    key = Ed25519PrivateKey.generate()
    signer = Signer.from_private_key(key)
    for message in (b"", b"m", bytes(range(256)) * 5):
        assert signer.sign(message) == key.sign(message)


def test_load_signer_refuses_a_key_readable_by_others(tmp_path: Path) -> None:
    info = generate_keypair(tmp_path)
    info.private_path.chmod(0o640)
    with pytest.raises(KeyPermissionError) as caught:
        load_signer(info.private_path)
    assert caught.value.hint == f"chmod 600 {info.private_path}"


def test_load_signer_rejects_wrong_files(tmp_path: Path) -> None:
    info = generate_keypair(tmp_path / "a")
    generate_keypair(tmp_path / "b")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    two = tmp_path / "two"
    two.mkdir()
    for path in (tmp_path / "a", tmp_path / "b"):
        for file in path.glob("*.private.pem"):
            (two / file.name).write_bytes(file.read_bytes())
            (two / file.name).chmod(0o600)
    for wrong in (info.public_json_path, garbage, tmp_path / "missing.pem", two, tmp_path):
        with pytest.raises(KeyFileError):
            load_signer(wrong)


def test_load_signer_checks_the_sibling_public_json(tmp_path: Path) -> None:
    info = generate_keypair(tmp_path / "a", valid_from_ms=T0)
    other = generate_keypair(tmp_path / "b", valid_from_ms=T0)
    # A public.json named after this key but holding another key's material is refused.
    info.public_json_path.write_bytes(other.public_json_path.read_bytes())
    with pytest.raises(KeyFileError):
        load_signer(info.private_path)


def test_public_key_loading_rejects_private_keys_and_tampered_json(tmp_path: Path) -> None:
    info = generate_keypair(tmp_path, valid_from_ms=T0)
    with pytest.raises(KeyFileError) as caught:
        load_public_key(info.private_path)
    assert "private key" in caught.value.message
    doc = json.loads(info.public_json_path.read_text())
    cases: list[tuple[dict[str, object], type[Exception]]] = [
        ({**doc, "key_id": "0" * 16}, KeyFileError),
        ({**doc, "public_key": doc["public_key"][:-2]}, KeyFileError),
        ({**doc, "public_key": "zz" * 32}, KeyFileError),
        ({**doc, "algorithm": "rsa"}, KeyFileError),
        ({**doc, "valid_from_ms": "soon"}, KeyFileError),
        ({**doc, "valid_from_ms": True}, KeyFileError),
        ({**doc, "valid_until_ms": T0}, KeyWindowError),
    ]
    for number, (bad, error) in enumerate(cases):
        path = tmp_path / f"bad{number}.public.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(error):
            load_public_key(path)
    for content in (b"", b"\xff\xfe", b"[1, 2]", b"not a key"):
        path = tmp_path / "junk.pem"
        path.write_bytes(content)
        with pytest.raises(KeyFileError):
            load_public_key(path)
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path)


def test_load_public_keys_reads_a_key_directory(tmp_path: Path) -> None:
    info = generate_keypair(tmp_path / "k", valid_from_ms=T0)
    (keys,) = load_public_keys([tmp_path / "k"])
    assert keys.key_id == info.key_id
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyFileError):
        load_public_keys([tmp_path / "empty"])


def test_keyring_windows_are_half_open() -> None:
    signer = Signer.from_private_key(
        Ed25519PrivateKey.generate(), valid_from_ms=T0, valid_until_ms=T0 + 10
    )
    info = signer.public_info()
    assert [info.covers(t) for t in (T0 - 1, T0, T0 + 9, T0 + 10)] == [False, True, True, False]
    signer.require_window(T0 + 9)
    for outside in (T0 - 1, T0 + 10):
        with pytest.raises(KeyWindowError):
            signer.require_window(outside)


def test_keyring_merges_pem_and_json_copies_and_refuses_conflicting_windows(
    tmp_path: Path,
) -> None:
    info = generate_keypair(tmp_path, valid_from_ms=T0)
    keyring = Keyring.from_files([info.public_pem_path, info.public_json_path])
    trusted = keyring.get(info.key_id)
    assert trusted is not None and trusted.info.valid_from_ms == T0
    keyring = Keyring.from_files([info.public_json_path, info.public_pem_path])
    trusted = keyring.get(info.key_id)
    assert trusted is not None and trusted.info.valid_from_ms == T0
    assert len(keyring) == 1
    conflicting = PublicKeyInfo(info.key_id, info.public_key, T0 + 1, None)
    with pytest.raises(KeyWindowError):
        keyring.add(conflicting)
    with pytest.raises(KeyFileError):
        keyring.add(PublicKeyInfo("0" * 16, info.public_key, None, None))


def test_retire_key_closes_the_window_and_never_widens_it(tmp_path: Path) -> None:
    info = generate_keypair(tmp_path, valid_from_ms=T0)
    retired = retire_key(info.public_json_path, T0 + 100)
    assert (retired.valid_from_ms, retired.valid_until_ms) == (T0, T0 + 100)
    assert load_public_key(info.public_json_path).valid_until_ms == T0 + 100
    assert retire_key(info.public_json_path, T0 + 500).valid_until_ms == T0 + 100
    with pytest.raises(KeyWindowError):
        retire_key(info.public_json_path, T0)
    assert not list(tmp_path.glob(".*.tmp"))
