"""DKIM keys: load the configured private keys, generate new ones, and render their DNS record.

Keys are PEM files as `opendkim-genkey` writes them (PKCS#1 `RSA PRIVATE KEY` or PKCS#8
`PRIVATE KEY`); Ed25519 keys are PKCS#8 PEM, or the bare base64 seed dkimpy's `dknewkey`
writes. Every failure to use a key is a `DkimKeyError` naming the file and why.

Key rotation: a new selector is added as a new `[[dkim.keys]]` entry *after* the old one;
for each domain and algorithm the LAST entry signs. The old entry may stay listed (so
`dkim dns`/`dkim check` still show it) until its DNS record is withdrawn.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postwarden.config.model import DkimKey

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

MIN_RSA_BITS = 1024  # RFC 8301: verifiers must refuse shorter keys
DEFAULT_RSA_BITS = 2048
MAX_TXT_STRING = 255  # RFC 1035: one character-string holds at most 255 bytes


class DkimKeyError(Exception):
    """A DKIM key file is missing, unreadable, malformed or of the wrong kind."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"DKIM key {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class SigningKey:
    """One loaded key: which domain and selector it signs for, and the private key."""

    domain: str  # lower case, no trailing dot
    selector: str
    algorithm: Algorithm
    path: Path
    private_key: PrivateKey

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def txt_record(self) -> str:
        return txt_record(self.private_key)


def normalise_domain(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def _algorithm_of(key: PrivateKey) -> Algorithm:
    return "rsa-sha256" if isinstance(key, rsa.RSAPrivateKey) else "ed25519-sha256"


def parse_private_key(data: bytes, path: Path | str) -> PrivateKey:
    """Parse PEM (PKCS#1 or PKCS#8) RSA/Ed25519, or a bare base64 Ed25519 seed."""
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except TypeError:
            raise DkimKeyError(
                path, "the key is encrypted; DKIM keys must not have a passphrase"
            ) from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise DkimKeyError(path, f"not a readable PEM private key ({exc})") from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < MIN_RSA_BITS:
                raise DkimKeyError(path, f"RSA key has {key.key_size} bits, at least 1024 needed")
            return key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key
        raise DkimKeyError(path, f"unsupported key type {type(key).__name__} (RSA or Ed25519)")
    try:
        seed = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) == 32:
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    raise DkimKeyError(path, "neither a PEM private key nor a base64 Ed25519 seed")


def load_key(entry: DkimKey) -> SigningKey:
    """Read and check one `[[dkim.keys]]` entry; raises DkimKeyError."""
    path = entry.key
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DkimKeyError(path, "file not found") from None
    except PermissionError:
        raise DkimKeyError(
            path, "permission denied (the service user must be able to read it)"
        ) from None
    except IsADirectoryError:
        raise DkimKeyError(path, "is a directory") from None
    except OSError as exc:
        raise DkimKeyError(path, f"cannot read ({exc.strerror})") from None
    key = parse_private_key(data, path)
    found = _algorithm_of(key)
    if found != entry.algorithm:
        raise DkimKeyError(path, f"holds an {found} key but the config says {entry.algorithm}")
    return SigningKey(normalise_domain(entry.domain), entry.selector, entry.algorithm, path, key)


def load_keys(entries: Iterable[DkimKey]) -> list[SigningKey]:
    """Load every configured key; the first bad one raises DkimKeyError."""
    return [load_key(entry) for entry in entries]


def signing_keys(keys: Sequence[SigningKey]) -> dict[str, list[SigningKey]]:
    """Per domain, the keys that sign: the last configured one of each algorithm (rotation)."""
    chosen: dict[tuple[str, Algorithm], SigningKey] = {}
    for key in keys:
        chosen[(key.domain, key.algorithm)] = key  # later entries replace earlier ones
    by_domain: dict[str, list[SigningKey]] = {}
    for (domain, _), key in chosen.items():
        by_domain.setdefault(domain, []).append(key)
    for domain_keys in by_domain.values():
        # RSA first: the signature every verifier understands sits nearest the top.
        domain_keys.sort(key=lambda k: k.algorithm != "rsa-sha256")
    return by_domain


def public_key_value(key: PrivateKey) -> str:
    """The `p=` value: DER SubjectPublicKeyInfo for RSA, the raw 32 bytes for Ed25519 (RFC 8463)."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode("ascii")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def txt_record(key: PrivateKey) -> str:
    """The TXT record value as one string: `v=DKIM1; k=rsa; p=...`."""
    kind = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"
    return f"v=DKIM1; k={kind}; p={public_key_value(key)}"


def split_txt(value: str, limit: int = MAX_TXT_STRING) -> list[str]:
    """Cut a TXT value into character-strings of at most `limit` bytes (ASCII only)."""
    data = value.encode("ascii")
    return [data[i : i + limit].decode("ascii") for i in range(0, len(data), limit)] or [""]


def quoted_txt(value: str) -> str:
    """The value as zone-file text: `"..." "..."`, each part at most 255 bytes."""
    return " ".join(f'"{part}"' for part in split_txt(value))


def parse_txt_record(value: str) -> dict[str, str]:
    """Tags of a DKIM key record (`v=DKIM1; k=rsa; p=...`), whitespace removed from values."""
    tags: dict[str, str] = {}
    for item in value.split(";"):
        name, sep, tag_value = item.partition("=")
        if sep:
            tags[name.strip()] = "".join(tag_value.split())
    return tags


def generate_key(algorithm: Algorithm = "rsa-sha256", bits: int = DEFAULT_RSA_BITS) -> PrivateKey:
    if algorithm == "rsa-sha256":
        if bits < MIN_RSA_BITS:
            raise ValueError(f"RSA keys need at least {MIN_RSA_BITS} bits")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return ed25519.Ed25519PrivateKey.generate()


def key_pem(key: PrivateKey) -> bytes:
    """PKCS#1 for RSA (what opendkim-genkey writes), PKCS#8 for Ed25519."""
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if isinstance(key, rsa.RSAPrivateKey)
        else serialization.PrivateFormat.PKCS8
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def write_key(key: PrivateKey, path: Path) -> None:
    """Write the key mode 0600, refusing to replace an existing file (it may be in use)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise DkimKeyError(path, "already exists; choose a new selector to rotate keys") from None
    except OSError as exc:
        raise DkimKeyError(path, f"cannot create ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as out:
        out.write(key_pem(key))
    os.chmod(path, 0o600)  # the umask may have narrowed it further; 0600 is the contract


def key_path(directory: Path, domain: str, selector: str) -> Path:
    return directory / f"{normalise_domain(domain)}.{selector}.key"
