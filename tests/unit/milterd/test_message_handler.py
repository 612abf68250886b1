"""milterd's decisions without the milter protocol: sign or verify, and what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from milterd.listener_processes import socket_spec
from milterd.message_handler import Envelope, MessageFault, MessageHandler
from milterd.milter import ACCEPT, TEMPFAIL, DkimMilter
from postwarden.config.model import Config
from postwarden.config.types import parse_listen_address
from postwarden.dkim.keys import SigningKey, generate_key, write_key
from postwarden.dkim.verification import DnsTemporaryError, KeyNotFoundError

HEADERS = [
    (b"From", b"Alice <alice@example.com>"),
    (b"To", b"bob@example.net"),
    (b"Subject", b"folded\n\tsubject"),  # the MTA hands folds over as LF
]
BODY = b"hello\r\n"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey("example.com", "s1", "rsa-sha256", Path("/k"), generate_key("rsa-sha256"))


def _engine(key: SigningKey, **sections: dict[str, object]) -> MessageHandler:
    config = Config.model_validate({"mail": {"hostname": "mx.example.org"}, **sections})
    zone = {f"{key.record_name}.".encode(): key.txt_record().encode()}

    def dnsfunc(name: bytes, timeout: float = 5.0) -> bytes:
        if name not in zone:
            raise KeyNotFoundError(name.decode())
        return zone[name]

    return MessageHandler(config, dnsfunc=dnsfunc, keys=[key])


@pytest.mark.parametrize(
    ("envelope", "outgoing"),
    [
        (Envelope("203.0.113.9", "alice"), True),  # SASL-authenticated from anywhere
        (Envelope("127.0.0.1"), True),
        (Envelope("::1"), True),
        (Envelope("::ffff:127.0.0.5"), True),  # IPv4-mapped is matched as IPv4
        (Envelope(None), True),  # local injection (sendmail/pickup) carries no client IP
        (Envelope("203.0.113.9"), False),
        (Envelope("10.1.2.3"), False),
        (Envelope("not-an-ip"), False),
    ],
)
def test_outgoing_means_authenticated_or_trusted(
    key: SigningKey, envelope: Envelope, outgoing: bool
) -> None:
    assert _engine(key).is_outgoing(envelope) is outgoing


def test_trusted_networks_come_from_the_config(key: SigningKey) -> None:
    engine = _engine(key, network={"trusted": ["10.0.0.0/8"]})
    assert engine.is_outgoing(Envelope("10.1.2.3"))
    assert not engine.is_outgoing(Envelope("127.0.0.1"))


def test_signing_then_verifying_round_trip(key: SigningKey) -> None:
    engine = _engine(key)
    signed = engine.process(Envelope("127.0.0.1"), HEADERS, BODY)
    ((name, value),) = signed.add
    assert name == "DKIM-Signature" and not value.startswith(" ") and "\r" not in value
    inbound = engine.process(
        Envelope("203.0.113.9"), [(b"DKIM-Signature", value.encode()), *HEADERS], BODY
    )
    assert inbound.add == [
        (
            "Authentication-Results",
            "mx.example.org; dkim=pass header.d=example.com header.i=@example.com "
            "header.a=rsa-sha256 header.s=s1",
        )
    ]


def test_sign_and_verify_switches(key: SigningKey) -> None:
    engine = _engine(key, dkim={"sign": False, "verify": False})
    assert engine.process(Envelope("127.0.0.1"), HEADERS, BODY).add == []
    assert engine.process(Envelope("203.0.113.9"), HEADERS, BODY).add == []


def test_forged_results_are_removed_by_index(key: SigningKey) -> None:
    engine = _engine(key, milterd={"authserv_id": "Gate.Example.Org"})
    headers = [
        (b"Authentication-Results", b"other.example; dkim=pass"),
        (b"Authentication-Results", b"gate.example.org; dkim=pass header.d=bank.test"),
        *HEADERS,
    ]
    changes = engine.process(Envelope("203.0.113.9"), headers, BODY)
    assert changes.remove_results == [2]
    assert changes.add[0][1].startswith("gate.example.org; dkim=none")


def test_dns_temperror_follows_on_error(key: SigningKey) -> None:
    signed = _engine(key).process(Envelope("127.0.0.1"), HEADERS, BODY).add[0][1]
    headers = [(b"DKIM-Signature", signed.encode()), *HEADERS]

    def timeout(name: bytes, timeout: float = 5.0) -> bytes:
        raise DnsTemporaryError("DNS timeout looking up s1._domainkey.example.com")

    accept = _engine(key)
    accept.dnsfunc = timeout
    assert "dkim=temperror" in accept.process(Envelope("203.0.113.9"), headers, BODY).add[0][1]
    tempfail = _engine(key, milterd={"on_error": "tempfail"})
    tempfail.dnsfunc = timeout
    with pytest.raises(MessageFault, match="DNS timeout"):
        tempfail.process(Envelope("203.0.113.9"), headers, BODY)


def test_unsigned_domains_and_missing_from(key: SigningKey) -> None:
    engine = _engine(key)
    other = [(b"From", b"x@example.net"), *HEADERS[1:]]
    assert engine.process(Envelope("127.0.0.1"), other, BODY).add == []
    with pytest.raises(MessageFault, match="From"):
        engine.process(Envelope("127.0.0.1"), HEADERS[1:], BODY)


def test_a_broken_key_faults_only_its_domain(tmp_path: Path, key: SigningKey) -> None:
    config = Config.model_validate(
        {
            "dkim": {
                "keys": [{"domain": "broken.test", "selector": "s1", "key": str(tmp_path / "no")}]
            }
        }
    )
    engine = MessageHandler(config, dnsfunc=lambda name, timeout=5.0: None)
    assert "broken.test" in engine.broken
    with pytest.raises(MessageFault, match="file not found"):
        engine.process(Envelope("127.0.0.1"), [(b"From", b"a@broken.test")], BODY)
    assert engine.process(Envelope("127.0.0.1"), [(b"From", b"a@fine.test")], BODY).add == []


def test_a_missing_old_selector_does_not_stop_the_new_one(tmp_path: Path) -> None:
    """Rotation: the old entry stays listed after its file is removed; the new key signs."""
    ed = "ed25519-sha256"
    for name in ("new", "sub"):
        write_key(generate_key("ed25519-sha256"), tmp_path / f"{name}.key")

    def engine(old_algorithm: str) -> MessageHandler:
        entries = [
            ("r.test", "old", "gone", old_algorithm),
            ("r.test", "new", "new.key", ed),
            ("p.test", "s1", "gone", ed),
            ("sub.p.test", "s1", "sub.key", ed),
        ]
        keys = [
            {"domain": d, "selector": s, "key": str(tmp_path / f), "algorithm": a}
            for d, s, f, a in entries
        ]
        config = Config.model_validate({"dkim": {"sign_subdomains": True, "keys": keys}})
        return MessageHandler(config, dnsfunc=lambda name, timeout=5.0: None)

    # The old RSA key is still the last RSA entry: r.test would lose its RSA signature.
    assert engine("rsa-sha256").broken.keys() == {"r.test", "p.test"}
    rotated = engine(ed)
    assert rotated.broken.keys() == {"p.test"}
    signed = rotated.process(Envelope("127.0.0.1"), [(b"From", b"a@r.test")], BODY)
    assert len(signed.add) == 1 and "s=new" in signed.add[0][1]
    # A subdomain with its own good key signs although its parent's key is broken.
    sub = rotated.process(Envelope("127.0.0.1"), [(b"From", b"a@sub.p.test")], BODY)
    assert len(sub.add) == 1 and "d=sub.p.test" in sub.add[0][1]
    with pytest.raises(MessageFault, match="file not found"):
        rotated.process(Envelope("127.0.0.1"), [(b"From", b"a@x.p.test")], BODY)


def test_main_and_additional_domains_each_signed_with_their_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for domain in ("main.test", "extra.test"):
        write_key(generate_key("rsa-sha256"), tmp_path / f"{domain}.key")
    keys = [
        {"domain": d, "selector": "s1", "key": str(tmp_path / f"{d}.key")}
        for d in ("main.test", "extra.test")
    ]
    mail = {
        "hostname": "mx.main.test",
        "main_domain": "main.test",
        "additional_domains": ["extra.test", "nokey.test"],
    }
    config = Config.model_validate({"mail": mail, "dkim": {"keys": keys}})
    engine = MessageHandler(config, dnsfunc=lambda name, timeout=5.0: None)
    for domain in ("main.test", "extra.test"):
        login = Envelope(None, f"a@{domain}")
        changes = engine.process(login, [(b"From", f"a@{domain}".encode())], BODY)
        assert len(changes.add) == 1 and f"d={domain};" in changes.add[0][1]
    unsigned = engine.process(Envelope(None, "a@nokey.test"), [(b"From", b"a@nokey.test")], BODY)
    assert unsigned.add == []
    assert "mail domain nokey.test has no DKIM key" in caplog.text
    assert "main.test has no" not in caplog.text and "extra.test has no" not in caplog.text


@pytest.mark.parametrize(
    ("listen", "spec"),
    [
        ("unix:/run/postwarden/milterd.sock", "unix:/run/postwarden/milterd.sock"),
        ("inet:127.0.0.1:8891", "inet:8891@127.0.0.1"),
        ("inet:[::1]:8891", "inet6:8891@::1"),
    ],
)
def test_libmilter_socket_specs(listen: str, spec: str) -> None:
    assert socket_spec(parse_listen_address(listen)) == spec


def test_forged_results_are_removed_on_the_signing_path_too(key: SigningKey) -> None:
    """Authenticated mail to a local mailbox is signed, not verified: a forged A-R carrying
    our authserv-id must not reach the mailbox that way either."""
    headers = [
        (b"Authentication-Results", b"mx.example.org; dkim=pass header.d=bank.test"),
        (b"Authentication-Results", b"other.example; dkim=pass"),
        *HEADERS,
    ]
    signed = _engine(key).process(Envelope("127.0.0.1", "alice@example.com"), headers, BODY)
    assert signed.remove_results == [1]
    assert [name for name, _ in signed.add] == ["DKIM-Signature"]
    for sections in ({"dkim": {"sign": False}}, {"dkim": {"verify": False}}):
        engine = _engine(key, **sections)
        assert engine.process(Envelope("127.0.0.1"), headers, BODY).remove_results == [1]
        assert engine.process(Envelope("203.0.113.9"), headers, BODY).remove_results == [1]
    unsigned = [(b"From", b"x@example.net"), *headers[:2], *HEADERS[1:]]
    assert _engine(key).process(Envelope("127.0.0.1"), unsigned, BODY).remove_results == [1]


MISMATCH = [(b"From", b"CEO <ceo@bigbank.example>"), *HEADERS[1:]]


def test_a_login_gets_no_signature_for_a_from_domain_it_may_not_use(key: SigningKey) -> None:
    engine = _engine(key)  # from_mismatch = "reject" by default
    rejected = engine.process(Envelope("203.0.113.9", "alice@example.com"), MISMATCH, BODY)
    assert rejected.reject == (
        "From: address in domain bigbank.example is not one this login may use"
    )
    assert rejected.add == [] and rejected.body is None
    # Even a domain we hold a key for: mallory may not sign as example.com.
    other = engine.process(Envelope("203.0.113.9", "mallory@example.net"), HEADERS, BODY)
    assert other.reject is not None and other.add == []
    assert other.summary == "domain=example.com, selector=-, dkim=rejected, rule=from_mismatch"
    # A From that names no single address cannot be bound to the login either.
    two = [(b"From", b"alice@example.com, ceo@bigbank.example"), *HEADERS[1:]]
    assert engine.process(Envelope(None, "alice@example.com"), two, BODY).reject == (
        "From: must hold exactly one address"
    )
    # The rule holds with signing off: it is about the sender, not the key.
    off = _engine(key, dkim={"sign": False})
    assert off.process(Envelope(None, "alice@example.com"), MISMATCH, BODY).reject is not None


def test_from_mismatch_unsigned_passes_it_on_without_a_signature(key: SigningKey) -> None:
    engine = _engine(key, milterd={"from_mismatch": "unsigned"})
    changes = engine.process(Envelope("203.0.113.9", "mallory@example.net"), HEADERS, BODY)
    assert changes.reject is None and changes.add == []
    assert changes.summary == "domain=example.com, selector=-, dkim=unsigned, rule=from_mismatch"


def test_a_login_gets_no_signature_for_a_neighbours_address(key: SigningKey) -> None:
    # Same domain is not enough: alice may not sign mail From: bob.
    bob = [(b"From", b"Bob <bob@example.com>"), *HEADERS[1:]]
    engine = _engine(key)
    as_bob = engine.process(Envelope("203.0.113.9", "alice@example.com"), bob, BODY)
    assert as_bob.reject is not None and as_bob.add == []
    # Unless Postfix bound that envelope sender to her (an alias delivering to alice).
    alias = Envelope("203.0.113.9", "alice@example.com", mail_from="Bob@example.com")
    assert len(engine.process(alias, bob, BODY).add) == 1


def test_grants_and_trusted_networks_still_sign(key: SigningKey) -> None:
    grants = {"sender_grants": {"boss@example.net": ["@example.com"]}}
    engine = _engine(key, mail={"hostname": "mx.example.org", **grants})
    granted = engine.process(Envelope("203.0.113.9", "Boss@Example.NET"), HEADERS, BODY)
    assert granted.reject is None and len(granted.add) == 1
    own = engine.process(Envelope("203.0.113.9", "alice@example.com"), HEADERS, BODY)
    assert len(own.add) == 1
    # No login (trusted network or local submission): signed for any From we hold a key for.
    assert len(engine.process(Envelope("127.0.0.1"), HEADERS, BODY).add) == 1
    assert len(engine.process(Envelope(None), HEADERS, BODY).add) == 1


def test_each_outcome_names_the_from_domain_and_what_was_done(key: SigningKey) -> None:
    engine = _engine(key)
    signed = engine.process(Envelope("127.0.0.1"), HEADERS, BODY).summary
    assert signed == "domain=example.com, selector=s1, dkim=signed, rule=sign"
    other = [(b"From", b"x@example.net"), *HEADERS[1:]]
    unsigned = engine.process(Envelope("127.0.0.1"), other, BODY).summary
    assert unsigned == "domain=example.net, selector=-, dkim=unsigned, rule=no_key"
    off = _engine(key, dkim={"sign": False}).process(Envelope("127.0.0.1"), HEADERS, BODY)
    assert off.summary == "domain=example.com, selector=-, dkim=unsigned, rule=sign_off"
    inbound = engine.process(Envelope("203.0.113.9"), HEADERS, BODY).summary
    assert inbound == "domain=example.com, selector=-, dkim=none, rule=verify"
    no_from = [h for h in HEADERS if h[0] != b"From"]
    verify_off = _engine(key, dkim={"verify": False})
    assert verify_off.process(Envelope("203.0.113.9"), no_from, BODY).summary == (
        "domain=-, selector=-, dkim=unverified, rule=verify_off"
    )


# Found by fuzzing (tests/unit/milterd/test_message_handler_fuzz.py): a first field name
# starting with a blank made dkimpy's parser raise IndexError, which escaped process().
LEADING_BLANK = [(b" X-First", b"v"), (b"From", b"alice@example.com")]


@pytest.mark.parametrize(
    "name", [b" X-First", b"\tX-First", b"", b"X First", b"X\rFirst", b"X:First", b"\xc3\xa9"]
)
@pytest.mark.parametrize("envelope", [Envelope("203.0.113.9"), Envelope("127.0.0.1")])
def test_a_malformed_field_name_is_a_fault_on_every_path(
    key: SigningKey, name: bytes, envelope: Envelope
) -> None:
    """Postfix never hands over such a name (it would not be a header line): on_error."""
    headers = [(name, b"v"), (b"From", b"alice@example.com")]
    with pytest.raises(MessageFault, match="malformed header field name") as fault:
        _engine(key).process(envelope, headers, BODY)
    assert "\n" not in str(fault.value) and "\r" not in str(fault.value)


class _Adapter(DkimMilter):
    """The pymilter adapter without libmilter: what it replies and changes, recorded."""

    def __init__(self) -> None:
        super().__init__()
        self._protocol = 0  # nothing negotiated: every callback answers
        self.replies: list[tuple[str, str, str]] = []
        self.header_changes: list[tuple[str, int, str]] = []

    def getsymval(self, name: str) -> str | None:
        return {"i": "4QID"}.get(name)

    def setreply(self, code: str, xcode: str, text: str) -> None:
        self.replies.append((code, xcode, text))

    def chgheader(self, name: str, index: int, value: str) -> None:
        self.header_changes.append((name, index, value))

    def addheader(self, name: str, value: str, index: int = -1) -> None:
        self.header_changes.append((name, index, value))


@pytest.mark.parametrize(("on_error", "reply"), [("accept", ACCEPT), ("tempfail", TEMPFAIL)])
def test_a_leading_blank_field_name_gets_on_error_and_one_log_line(
    key: SigningKey, caplog: pytest.LogCaptureFixture, on_error: str, reply: int
) -> None:
    _Adapter.handler = _engine(key, milterd={"on_error": on_error})
    milter = _Adapter()
    milter.client_ip = "203.0.113.9"
    for name, value in [*LEADING_BLANK, (b"Authentication-Results", b"mx.example.org; dkim=pass")]:
        milter.header(name, value)
    caplog.clear()
    assert milter.eom() == reply
    (line,) = [r for r in caplog.records if r.name == "postwarden.milterd"]
    assert line.levelname == "WARNING"
    assert line.getMessage() == (
        "4QID: malformed header field name ' X-First' (field 1); on_error=" + on_error
    )
    if on_error == "accept":  # passed on, but never with an A-R claiming to be ours
        assert milter.header_changes == [("Authentication-Results", 1, "")]
    else:
        assert milter.replies == [
            ("451", "4.7.1", "Message cannot be processed now, try again later")
        ]
