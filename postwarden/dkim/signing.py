"""DKIM signing: dkimpy's canonicalisation, header selection and folding; OpenSSL's RSA/Ed25519.

dkimpy's `DKIM.sign` parses the PEM into a dict and signs with pure-Python RSA (~13 ms a
signature); it has no hook for another signer, because the RSA call is a module global in
`gen_header`. So `sign` below is `DKIM.sign` + `DKIM.gen_header` restated with dkimpy's own
building blocks (`CanonicalizationPolicy`, `hash_headers`, `fold`, `RE_BTAG`), with only the
private-key operation done by `cryptography`. The output is byte-identical to dkimpy's for
the same inputs (tests/unit/dkim/test_signing.py proves it), and the body is canonicalised
and hashed once for both signatures of a dual (RSA + Ed25519) signing.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import getaddresses

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim import canonicalization
from dkim.canonicalization import CanonicalizationPolicy

from postwarden.dkim.keys import SigningKey

# RFC 6376 5.4.1's list plus the list headers; signed when present, in message order.
SIGNED_HEADERS: frozenset[bytes] = frozenset(
    {
        b"from",
        b"sender",
        b"reply-to",
        b"subject",
        b"date",
        b"message-id",
        b"to",
        b"cc",
        b"mime-version",
        b"content-type",
        b"content-transfer-encoding",
        b"content-id",
        b"content-description",
        b"resent-date",
        b"resent-from",
        b"resent-sender",
        b"resent-to",
        b"resent-cc",
        b"resent-message-id",
        b"in-reply-to",
        b"references",
        b"list-id",
        b"list-help",
        b"list-unsubscribe",
        b"list-unsubscribe-post",
        b"list-subscribe",
        b"list-post",
        b"list-owner",
        b"list-archive",
    }
)
# Signed once more than present (OpenDKIM's OversignHeaders), so a replay that adds one of
# these (a second Subject, a To, a MIME-Version turning the body into something else) breaks
# the signature. Absent ones are oversigned too: h= lists them once, which signs "none".
OVERSIGNED: tuple[bytes, ...] = (
    b"from",
    b"reply-to",
    b"subject",
    b"date",
    b"to",
    b"cc",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
)
# Postfix's smtp_line_length_limit and lmtp_line_length_limit (998, RFC 5322 2.1.1): its
# SMTP/LMTP client breaks a longer header or body line with CRLF SPACE after each 998 octets.
LINE_LIMIT = 998
_LONG_LINE = re.compile(rb"\n[^\n]{%d}" % (LINE_LIMIT + 1))
HEADER_NAME = b"DKIM-Signature"
_CANON = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")

# A header as dkimpy holds it: [name, value] where value keeps its leading space and CRLF.
Header = Sequence[bytes]


class SigningError(Exception):
    """The message cannot be signed (no usable From, unparsable header section)."""


@dataclass(frozen=True)
class Signature:
    """One DKIM-Signature field ready to add: name and value (value folded with CRLF)."""

    domain: str
    selector: str
    algorithm: str
    value: bytes  # starts after "DKIM-Signature:", no trailing CRLF

    @property
    def field(self) -> bytes:
        """The whole header line as dkimpy returns it."""
        return HEADER_NAME + b":" + self.value + b"\r\n"


def parse_message(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """Headers and body exactly as dkimpy splits them; raises SigningError."""
    try:
        headers, body = dkim.rfc822_parse(message)
    except dkim.MessageFormatError as exc:
        raise SigningError(f"malformed header section: {exc}") from None
    return headers, body


def sign_headers_for(headers: Sequence[Header]) -> tuple[bytes, ...]:
    """Which header names `h=` lists: the present signable ones, then each OVERSIGNED once."""
    present = [bytes(name).lower() for name, _ in headers if bytes(name).lower() in SIGNED_HEADERS]
    return (*present, *OVERSIGNED)


def break_long_lines(body: bytes, limit: int = LINE_LIMIT) -> bytes | None:
    """The body as Postfix's SMTP/LMTP client sends it, or None when no line is too long.

    Postfix (smtp_proto.c, smtp_text_out) writes the first `limit` octets of a longer line,
    then CRLF, SPACE and up to `limit - 1` more octets, and so on. Lines are what the milter
    gets: CRLF-terminated (a bare CR is data and counts). The scan for a long line is one
    regex pass (~1 ms per MB); the split only runs when there is one.
    """
    first = body.find(b"\n")
    first_len = len(body) if first < 0 else first  # includes a CR before the LF
    if first_len <= limit and _LONG_LINE.search(body) is None:
        return None
    lines = body.split(b"\r\n")
    if max(map(len, lines)) <= limit:
        return None  # a line of exactly `limit` octets plus its CR
    step = limit - 1
    return b"\r\n".join(
        b"\r\n ".join([line[:limit]] + [line[i : i + step] for i in range(limit, len(line), step)])
        if len(line) > limit
        else line
        for line in lines
    )


def fold_header(name: bytes, value: bytes, limit: int = LINE_LIMIT) -> bytes | None:
    """The value (as the milter API holds it: folds as LF) refolded so that no line of
    `name: value` exceeds `limit` octets; None when none does.

    A long line is folded before its last space or tab that keeps it within the limit (the
    relaxed canonical form is unchanged); a line with no such blank is cut at the limit as
    Postfix would, with a SPACE starting the next line, though never inside a UTF-8 sequence.
    """
    prefix = len(name) + 2  # Postfix writes a changed header as "Name: value"
    lines = value.replace(b"\r\n", b"\n").split(b"\n")
    if all(len(line) + (prefix if i == 0 else 0) <= limit for i, line in enumerate(lines)):
        return None
    out: list[bytes] = []
    for i, line in enumerate(lines):
        offset = prefix if i == 0 else 0
        while len(line) + offset > limit:
            room = max(limit - offset, 1)  # a name longer than the limit: cut anyway
            # A blank at position p > 0 starts the next line; the first line keeps some text.
            cut = max(line.rfind(b" ", 1, room + 1), line.rfind(b"\t", 1, room + 1))
            if cut <= 0 or not line[:cut].strip():
                cut = room
                while cut > 1 and 0x80 <= line[cut] < 0xC0:
                    cut -= 1  # not inside a UTF-8 sequence
                out.append(line[:cut])
                line = b" " + line[cut:]
            else:
                out.append(line[:cut])
                line = line[cut:]
            offset = 0
        out.append(line)
    return b"\n".join(out)


def from_address(headers: Sequence[Header]) -> str | None:
    """The single From address; None when absent, ambiguous or unparsable."""
    values = [bytes(v) for name, v in headers if bytes(name).lower() == b"from"]
    if len(values) != 1:
        return None
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    addresses = [addr for _, addr in getaddresses([text]) if addr]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0].strip()


def from_domain(headers: Sequence[Header]) -> str | None:
    """The domain of the single From address; None when absent, ambiguous or unparsable."""
    address = from_address(headers)
    if address is None:
        return None
    domain = address.rsplit("@", 1)[1].strip().rstrip(".").lower()
    return domain or None


def keys_for_domain(
    domain: str, keys: Mapping[str, Sequence[SigningKey]], *, subdomains: bool
) -> tuple[str, Sequence[SigningKey]] | None:
    """The signing domain (d=) and keys for a From domain, or None to leave it unsigned."""
    for candidate in signing_candidates(domain, subdomains=subdomains):
        if candidate in keys:
            return candidate, keys[candidate]
    return None


def signing_candidates(domain: str, *, subdomains: bool) -> list[str]:
    """Domains whose key may sign for `domain`, most specific first (never a bare TLD)."""
    if not subdomains:
        return [domain]
    labels = domain.split(".")
    return [domain] + [".".join(labels[i:]) for i in range(1, len(labels) - 1)]


def canonical_body(body: bytes) -> bytes:
    """dkimpy's relaxed body canonicalisation, skipping the regex passes that change nothing.

    dkimpy runs two regex substitutions over the whole body; on ordinary text the one that
    compresses whitespace rewrites every single space (~2 ms for 12 KB, more than the RSA
    signature). Each pass is an identity exactly when its pattern cannot match: trailing
    whitespace needs " CRLF" or "TAB CRLF", compressing needs a TAB or two spaces in a row.
    So each pass is dkimpy's own function, run only when it can change something.
    """
    if b" \r\n" in body or b"\t\r\n" in body:
        body = canonicalization.strip_trailing_whitespace(body)
    if b"\t" in body or b"  " in body:
        body = canonicalization.compress_whitespace(body)
    return canonicalization.correct_empty_body(canonicalization.strip_trailing_lines(body))  # type: ignore[no-any-return]


def _private_sign(key: SigningKey, digest: bytes) -> bytes:
    private = key.private_key
    if isinstance(private, rsa.RSAPrivateKey):
        return private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    # RFC 8463: Ed25519 signs the SHA-256 of the header hash input, as dkimpy does.
    return private.sign(digest)


def sign(
    headers: Sequence[Header],
    body: bytes,
    keys: Sequence[SigningKey],
    *,
    include_headers: Sequence[bytes] | None = None,
    timestamp: int | None = None,
) -> list[Signature]:
    """One relaxed/relaxed signature per key, no `l=`, in the order of `keys`."""
    include = tuple(
        x.lower()
        for x in (sign_headers_for(headers) if include_headers is None else include_headers)
    )
    if b"from" not in include or not any(bytes(n).lower() == b"from" for n, _ in headers):
        raise SigningError("the message has no From header; DKIM must sign From")
    body_hash = base64.b64encode(hashlib.sha256(canonical_body(body)).digest())
    canonical_headers = _CANON.canonicalize_headers(headers)
    now = str(int(time.time()) if timestamp is None else timestamp).encode("ascii")
    signatures = []
    for key in keys:
        domain = key.domain.encode("ascii")
        fields: list[tuple[bytes, bytes]] = [
            (b"v", b"1"),
            (b"a", key.algorithm.encode("ascii")),
            (b"c", _CANON.to_c_value()),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", key.selector.encode("ascii")),
            (b"t", now),
            (b"h", b" : ".join(include)),
            (b"bh", body_hash),
            # dkimpy forces b= onto its own line so adding the signature keeps the folding.
            (b"b", b"0" * 60),
        ]
        signatures.append(_sign_one(key, fields, include, canonical_headers))
    return signatures


def _sign_one(
    key: SigningKey,
    fields: list[tuple[bytes, bytes]],
    include: tuple[bytes, ...],
    canonical_headers: Sequence[Header],
) -> Signature:
    # From here on this is dkimpy's DomainSigner.gen_header, line for line.
    value = b"; ".join(b"=".join(x) for x in fields)
    value = dkim.fold(value, namelen=len(HEADER_NAME), linesep=b"\r\n")
    value = dkim.RE_BTAG.sub(b"\\1", value)
    hasher = hashlib.sha256()
    dkim.hash_headers(hasher, _CANON, canonical_headers, include, (HEADER_NAME, b" " + value), {})
    fields[-1] = (b"b", base64.b64encode(_private_sign(key, hasher.digest())))
    value = b"; ".join(b"=".join(x) for x in fields) + b"\r\n"
    value = dkim.fold(value, namelen=len(HEADER_NAME), linesep=b"\r\n")
    return Signature(key.domain, key.selector, key.algorithm, b" " + value[: -len(b"\r\n")])
