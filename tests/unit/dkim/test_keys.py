"""DKIM keys: loading every format opendkim-genkey/openssl write, typed errors, DNS record text."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postwarden.config.model import DkimKey
from postwarden.dkim.keys import (
    DkimKeyError,
    SigningKey,
    generate_key,
    key_path,
    load_key,
    parse_txt_record,
    public_key_value,
    quoted_txt,
    signing_keys,
    split_txt,
    txt_record,
    write_key,
)


def _entry(path: Path, algorithm: str = "rsa-sha256", domain: str = "Example.COM.") -> DkimKey:
    return DkimKey(domain=domain, selector="s1", algorithm=algorithm, key=path)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    key = generate_key("rsa-sha256")
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def test_generated_rsa_key_is_2048_bits_written_0600_and_loads_back(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    path = key_path(tmp_path / "dkim", "Example.com", "s1")
    write_key(rsa_key, path)
    assert path.name == "example.com.s1.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")  # PKCS#1, as opendkim
    loaded = load_key(_entry(path))
    assert loaded.domain == "example.com"
    assert isinstance(loaded.private_key, rsa.RSAPrivateKey)
    assert loaded.private_key.key_size == 2048
    assert loaded.txt_record() == txt_record(rsa_key)
    assert loaded.record_name == "s1._domainkey.example.com"


def test_write_key_refuses_to_replace_a_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "k.key"
    write_key(rsa_key, path)
    with pytest.raises(DkimKeyError, match="already exists"):
        write_key(generate_key("ed25519-sha256"), path)


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8]
)
def test_rsa_pkcs1_and_pkcs8_both_load(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, fmt: serialization.PrivateFormat
) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(
        rsa_key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    )
    loaded = load_key(_entry(path))
    assert public_key_value(loaded.private_key) == public_key_value(rsa_key)


def test_ed25519_pem_and_bare_seed_load(tmp_path: Path) -> None:
    key = generate_key("ed25519-sha256")
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    pem = tmp_path / "e.pem"
    write_key(key, pem)
    seed = tmp_path / "e.seed"  # what dkimpy's dknewkey writes
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    seed.write_bytes(base64.b64encode(raw) + b"\n")
    for path in (pem, seed):
        loaded = load_key(_entry(path, "ed25519-sha256"))
        assert public_key_value(loaded.private_key) == public_key_value(key)
    record = parse_txt_record(txt_record(key))
    assert record["k"] == "ed25519"
    assert len(base64.b64decode(record["p"])) == 32  # RFC 8463: the raw public key


def test_rsa_record_is_the_der_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    record = txt_record(rsa_key)
    assert record.startswith("v=DKIM1; k=rsa; p=")
    der = base64.b64decode(parse_txt_record(record)["p"])
    public = serialization.load_der_public_key(der)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.public_numbers() == rsa_key.public_key().public_numbers()


@pytest.mark.parametrize(
    ("content", "algorithm", "reason"),
    [
        (None, "rsa-sha256", "file not found"),
        (b"hello world", "rsa-sha256", "neither a PEM private key nor a base64 Ed25519 seed"),
        (
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "rsa-sha256",
            "not a readable PEM",
        ),
        ("ed25519", "rsa-sha256", "holds an ed25519-sha256 key but the config says rsa-sha256"),
        ("encrypted", "rsa-sha256", "encrypted"),
    ],
)
def test_bad_keys_raise_a_typed_error_naming_file_and_reason(
    tmp_path: Path, content: bytes | str | None, algorithm: str, reason: str
) -> None:
    path = tmp_path / "bad.key"
    if content == "ed25519":
        write_key(generate_key("ed25519-sha256"), path)
    elif content == "encrypted":
        key = generate_key("rsa-sha256", 1024)
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(DkimKeyError) as info:
        load_key(_entry(path, algorithm))
    assert str(path) in str(info.value)
    assert reason in str(info.value)


def test_a_directory_is_not_a_key(tmp_path: Path) -> None:
    with pytest.raises(DkimKeyError, match="is a directory"):
        load_key(_entry(tmp_path))


@pytest.mark.parametrize("bits", [1024, 2048, 4096])
def test_txt_split_into_strings_of_at_most_255_bytes(bits: int) -> None:
    value = txt_record(generate_key("rsa-sha256", bits))
    parts = split_txt(value)
    assert all(len(p.encode()) <= 255 for p in parts)
    assert "".join(parts) == value
    assert len(parts) == -(-len(value) // 255)
    quoted = quoted_txt(value)
    assert quoted == " ".join(f'"{p}"' for p in parts)
    if bits >= 2048:
        assert '" "' in quoted  # the seed's quote-space-quote between strings


def test_rotation_last_key_of_each_algorithm_signs(tmp_path: Path) -> None:
    old, new, ed = (
        generate_key("rsa-sha256", 1024),
        generate_key("rsa-sha256", 1024),
        generate_key("ed25519-sha256"),
    )
    keys = [
        SigningKey("example.com", "2024", "rsa-sha256", tmp_path / "a", old),
        SigningKey("example.com", "ed1", "ed25519-sha256", tmp_path / "b", ed),
        SigningKey("example.com", "2025", "rsa-sha256", tmp_path / "c", new),
        SigningKey("other.test", "s1", "rsa-sha256", tmp_path / "d", old),
    ]
    chosen = signing_keys(keys)
    assert [(k.selector, k.algorithm) for k in chosen["example.com"]] == [
        ("2025", "rsa-sha256"),
        ("ed1", "ed25519-sha256"),
    ]
    assert [k.selector for k in chosen["other.test"]] == ["s1"]
