"""`postwarden check backend` against loopback stub backends (tests/fixtures/tls_backend_stubs.py).

Real sockets and real TLS (trustme certificates); the CLI runs as the operator runs it, in
a subprocess. Each test asserts the verdict a user reads and the exit code.
"""

from __future__ import annotations

import datetime as dt
import json
import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from postwarden.appliance.backend_check import Verdict
from tests.fixtures.mail_system import free_ports
from tests.fixtures.policyd_daemon import POSTWARDEN
from tests.fixtures.tls_backend_stubs import Stub, StubTls, start_stub, unanswered_port

NAME = "backend.example.test"
HELO = "gw.example.test"
PROTOCOLS = ("smtp", "imap", "pop3")
# What a client sends that carries or starts a login, in any of the three protocols.
LOGIN_WORDS = (b"AUTH", b"LOGIN", b"USER", b"PASS", b"APOP")


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: Path
    right: trustme.LeafCert  # from the CA, for NAME
    wrong_name: trustme.LeafCert  # from the CA, for another host
    other_ca: trustme.LeafCert  # for NAME, from a CA the gateway does not trust
    expired: trustme.LeafCert  # from the CA, for NAME, expired yesterday
    ip: trustme.LeafCert  # from the CA, for 127.0.0.1 (an IP SAN) only


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("gwcheck-ca") / "backend-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    now = dt.datetime.now(dt.UTC)
    return Certs(
        ca=ca,
        ca_file=ca_file,
        right=ca.issue_cert(NAME),
        wrong_name=ca.issue_cert("other.example.test"),
        other_ca=trustme.CA().issue_cert(NAME),
        expired=ca.issue_cert(
            NAME, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        ),
        ip=ca.issue_cert("127.0.0.1"),
    )


def write_config(
    path: Path,
    services: dict[str, tuple[int, str]],
    *,
    ca: Path | None,
    certificate_name: str | None = NAME,
    extra: str = "",
) -> Path:
    """A postwarden.toml with [gateway] on and the given services: {name: (port, security)}."""
    gateway = [
        "[mail]",
        f'hostname = "{HELO}"',
        "",
        "[gateway]",
        "enabled = true",
        f'domains = ["{NAME}"]',
    ]
    if ca is not None:
        gateway.append(f'ca = "{ca}"')
    if certificate_name is not None:
        gateway.append(f'certificate_name = "{certificate_name}"')
    gateway.append(extra)
    for name, (port, security) in services.items():
        gateway += ["", f"[gateway.{name}]", 'host = "127.0.0.1"', f"port = {port}"]
        gateway.append(f'security = "{security}"')
    path.write_text("\n".join(gateway) + "\n", encoding="utf-8")
    return path


def run_check(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [POSTWARDEN, "--config", str(config), "check", "backend", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def check_json(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    done = run_check(config, "--json", *args)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stdout, f"exit {done.returncode}, no report: {done.stderr}"
    report: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, report


def check_for(report: dict[str, Any], protocol: str) -> dict[str, Any]:
    (check,) = [c for c in report["checks"] if c["check"] == protocol]
    return check  # type: ignore[no-any-return]


def stub_security(tls: StubTls) -> str:
    return {StubTls.IMPLICIT: "tls", StubTls.NONE: "none"}.get(tls, "starttls")


def stub_services(
    stack: ExitStack, protocol: str, stub: Stub, security: str, certs: Certs
) -> dict[str, tuple[int, str]]:
    """The [gateway] services for a stub; IMAP and POP3 get a verified SMTP beside them,
    since gateway mode requires [gateway.smtp]."""
    services = {protocol: (stub.port, security)}
    if protocol != "smtp":
        smtp = stack.enter_context(start_stub("smtp", StubTls.STARTTLS, certs.right))
        services = {"smtp": (smtp.port, "starttls"), **services}
    return services


@pytest.fixture
def one_stub(tmp_path: Path, certs: Certs) -> Iterator[Any]:
    """`one_stub(protocol, tls, cert, **config)` -> (stub, config path); stopped at the end."""
    with ExitStack() as stack:

        def start(
            protocol: str, tls: StubTls, cert: trustme.LeafCert | None, **config: Any
        ) -> tuple[Stub, Path]:
            stub = stack.enter_context(start_stub(protocol, tls, cert))
            security = config.pop("security", stub_security(tls))
            services = stub_services(stack, protocol, stub, security, certs)
            path = write_config(tmp_path / f"gwcheck-{protocol}.toml", services, **config)
            return stub, path

        yield start


# --- the good cases ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_starttls_backend_with_the_right_certificate_is_verified(
    protocol: str, certs: Certs, one_stub: Any
) -> None:
    stub, config = one_stub(protocol, StubTls.STARTTLS, certs.right, ca=certs.ca_file)
    code, report = check_json(config)
    check = check_for(report, protocol)
    assert (code, check["verdict"], check["passed"]) == (0, "verified", True), check
    assert check["found"] == f"chain verified to gateway.ca, certificate names {NAME}"
    assert check["starttls_offered"] is True
    assert check["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert check["certificate"]["names"] == [NAME]
    assert report["passed"] is True
    # The whole conversation: capabilities, STARTTLS, capabilities over TLS, goodbye.
    assert [line.split()[-1 if protocol == "imap" else 0] for line in stub.received] == {
        "smtp": ["EHLO", "STARTTLS", "EHLO", "QUIT"],
        "imap": ["CAPABILITY", "STARTTLS", "CAPABILITY", "LOGOUT"],
        "pop3": ["CAPA", "STLS", "CAPA", "QUIT"],
    }[protocol]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_implicit_tls_backend_is_verified_without_starttls(
    protocol: str, certs: Certs, one_stub: Any
) -> None:
    stub, config = one_stub(protocol, StubTls.IMPLICIT, certs.right, ca=certs.ca_file)
    code, report = check_json(config)
    check = check_for(report, protocol)
    assert (code, check["verdict"]) == (0, "verified"), check
    assert check["security"] == "tls"
    assert check["starttls_offered"] is None
    assert not any("STARTTLS" in line or "STLS" in line for line in stub.received)


def test_text_report_names_each_service_with_its_verdict(certs: Certs, tmp_path: Path) -> None:
    with ExitStack() as stack:
        smtp = stack.enter_context(start_stub("smtp", StubTls.STARTTLS, certs.right))
        imap = stack.enter_context(start_stub("imap", StubTls.IMPLICIT, certs.wrong_name))
        pop3 = stack.enter_context(start_stub("pop3", StubTls.REFUSED, certs.right))
        services = {
            "smtp": (smtp.port, "starttls"),
            "imap": (imap.port, "tls"),
            "pop3": (pop3.port, "starttls"),
        }
        done = run_check(write_config(tmp_path / "gwcheck.toml", services, ca=certs.ca_file))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"Backend services (gateway.ca {certs.ca_file})"
    assert any(
        line.startswith(f"  [pass] smtp 127.0.0.1:{smtp.port} (starttls)  chain verified")
        for line in lines
    ), done.stdout
    assert (
        f"  [FAIL] imap 127.0.0.1:{imap.port} (tls)  "
        f"certificate names other.example.test, not {NAME}" in lines
    ), done.stdout
    assert (
        f"  [FAIL] pop3 127.0.0.1:{pop3.port} (starttls)  STLS refused: -ERR TLS not available"
        in lines
    ), done.stdout
    assert lines[-1] == "3 service(s): 1 verified, 0 unencrypted, 2 failed"
    assert "Traceback" not in done.stderr


# --- STARTTLS missing or refused -----------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_backend_that_does_not_advertise_starttls_fails_and_is_never_asked(
    protocol: str, certs: Certs, one_stub: Any
) -> None:
    stub, config = one_stub(protocol, StubTls.NOT_OFFERED, certs.right, ca=certs.ca_file)
    code, report = check_json(config)
    check = check_for(report, protocol)
    assert (code, check["verdict"], check["starttls_offered"]) == (
        1,
        "starttls_not_offered",
        False,
    )
    word = "STLS" if protocol == "pop3" else "STARTTLS"
    assert check["found"].startswith(f"{word} not offered"), check["found"]
    assert check["tls"] is None and check["certificate"] is None
    assert not any(word in line.upper() for line in stub.received), stub.received


@pytest.mark.parametrize(
    ("protocol", "refusal"),
    [
        ("smtp", "454 4.7.0 TLS not available"),
        ("imap", "c2 NO [UNAVAILABLE] TLS not available"),
        ("pop3", "-ERR TLS not available"),
    ],
)
def test_backend_that_refuses_starttls_fails_with_its_answer(
    protocol: str, refusal: str, certs: Certs, one_stub: Any
) -> None:
    _, config = one_stub(protocol, StubTls.REFUSED, certs.right, ca=certs.ca_file)
    code, report = check_json(config)
    check = check_for(report, protocol)
    assert (code, check["verdict"]) == (1, "starttls_refused")
    assert check["found"].endswith(f"refused: {refusal}"), check["found"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_backend_that_sends_plaintext_after_accepting_starttls_is_refused(
    protocol: str, certs: Certs, one_stub: Any
) -> None:
    _, config = one_stub(protocol, StubTls.INJECTING, certs.right, ca=certs.ca_file)
    code, report = check_json(config)
    check = check_for(report, protocol)
    assert (code, check["verdict"]) == (1, "protocol_error")
    assert "sent more after accepting" in check["found"], check["found"]
    assert check["tls"] is None


# --- certificates ---------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [StubTls.STARTTLS, StubTls.IMPLICIT])
def test_certificate_for_another_name_is_refused_naming_both(
    tls: StubTls, certs: Certs, one_stub: Any
) -> None:
    _, config = one_stub("smtp", tls, certs.wrong_name, ca=certs.ca_file)
    code, report = check_json(config)
    check = check_for(report, "smtp")
    assert (code, check["verdict"]) == (1, "wrong_name")
    assert check["found"] == f"certificate names other.example.test, not {NAME}"
    assert check["certificate"]["names"] == ["other.example.test"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_certificate_from_another_ca_does_not_chain(
    protocol: str, certs: Certs, one_stub: Any
) -> None:
    _, config = one_stub(protocol, StubTls.STARTTLS, certs.other_ca, ca=certs.ca_file)
    code, report = check_json(config)
    check = check_for(report, protocol)
    assert (code, check["verdict"]) == (1, "untrusted")
    assert check["found"].startswith("certificate does not chain to gateway.ca"), check["found"]
    # The certificate shown is the one the backend presented: issued by the other CA.
    trusted = x509.load_pem_x509_certificate(certs.ca.cert_pem.bytes()).subject
    assert check["certificate"]["issuer"] != trusted.rfc4514_string()
    assert check["certificate"]["names"] == [NAME]


def test_expired_certificate_is_refused_with_its_date(certs: Certs, one_stub: Any) -> None:
    _, config = one_stub("imap", StubTls.IMPLICIT, certs.expired, ca=certs.ca_file)
    code, report = check_json(config)
    check = check_for(report, "imap")
    assert (code, check["verdict"]) == (1, "expired")
    not_after = dt.datetime.fromisoformat(check["certificate"]["not_after"])
    assert not_after < dt.datetime.now(dt.UTC)
    assert check["found"] == f"certificate expired {not_after:%Y-%m-%d %H:%M} UTC"


def test_ip_host_without_certificate_name_matches_the_ip_san(certs: Certs, one_stub: Any) -> None:
    _, config = one_stub(
        "smtp", StubTls.STARTTLS, certs.ip, ca=certs.ca_file, certificate_name=None
    )
    code, report = check_json(config)
    check = check_for(report, "smtp")
    assert (code, check["verdict"], check["expected_name"]) == (0, "verified", "127.0.0.1")
    assert check["certificate"]["names"] == ["127.0.0.1"]


def test_ip_host_without_certificate_name_refuses_a_dns_only_certificate(
    certs: Certs, one_stub: Any
) -> None:
    _, config = one_stub(
        "smtp", StubTls.STARTTLS, certs.right, ca=certs.ca_file, certificate_name=None
    )
    code, report = check_json(config)
    check = check_for(report, "smtp")
    assert (code, check["verdict"]) == (1, "wrong_name")
    assert check["found"] == f"certificate names {NAME}, not 127.0.0.1"


def test_client_certificate_is_presented_to_the_backend_smtp(certs: Certs, tmp_path: Path) -> None:
    client = certs.ca.issue_cert(HELO)
    cert_file, key_file = tmp_path / "gw-cert.pem", tmp_path / "gw-key.pem"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    with start_stub("smtp", StubTls.STARTTLS, certs.right, client_ca=certs.ca) as stub:
        services = {"smtp": (stub.port, "starttls")}
        without = write_config(tmp_path / "gwcheck-plain.toml", services, ca=certs.ca_file)
        with_cert = write_config(
            tmp_path / "gwcheck-ccert.toml",
            services,
            ca=certs.ca_file,
            extra=f'client_cert = "{cert_file}"\nclient_key = "{key_file}"',
        )
        code_without, report_without = check_json(without)
        code_with, report_with = check_json(with_cert)
    # The backend insists on a certificate: without one, TLS fails; with it, all verifies.
    refused = check_for(report_without, "smtp")
    assert (code_without, refused["verdict"]) == (1, "tls_failed"), refused
    # TLS 1.3 (both ends here): the backend refuses after the handshake, at the next EHLO.
    assert refused["found"] == (
        "the backend ended the TLS session at the answer to EHLO over TLS: "
        "TLSV13_ALERT_CERTIFICATE_REQUIRED "
        "(it wants a client certificate: gateway.client_cert, SMTP only)"
    )
    check = check_for(report_with, "smtp")
    assert (code_with, check["verdict"], check["client_certificate"]) == (0, "verified", True)


# --- unencrypted, unreachable, silent -------------------------------------------------------


def test_unencrypted_backend_passes_with_a_warning(one_stub: Any) -> None:
    stub, config = one_stub("smtp", StubTls.NONE, None, ca=None)
    done = run_check(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"  [warn] smtp 127.0.0.1:{stub.port} (none)  reachable, unencrypted (tests only)" in (
        done.stdout.splitlines()
    ), done.stdout
    assert "warning: smtp: unencrypted (tests only)" in done.stderr
    code, report = check_json(config)
    check = check_for(report, "smtp")
    assert (code, check["verdict"], check["passed"]) == (0, "unencrypted", True)
    assert check["warning"].startswith("unencrypted (tests only)")


def test_unencrypted_backend_that_offers_starttls_says_so(certs: Certs, one_stub: Any) -> None:
    _, config = one_stub("imap", StubTls.STARTTLS, certs.right, ca=certs.ca_file, security="none")
    code, report = check_json(config)
    check = check_for(report, "imap")
    assert (code, check["verdict"], check["starttls_offered"]) == (0, "unencrypted", True)
    assert 'security = "starttls" would use it' in check["found"]


def test_closed_port_is_unreachable_connection_refused(certs: Certs, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    config = write_config(tmp_path / "gwcheck.toml", {"smtp": (port, "starttls")}, ca=certs.ca_file)
    code, report = check_json(config)
    check = check_for(report, "smtp")
    assert (code, check["verdict"]) == (1, "unreachable")
    assert check["found"] == "unreachable: connection refused"
    assert check["greeting"] is None


def test_port_that_never_answers_the_connect_is_unreachable_timed_out(
    certs: Certs, tmp_path: Path
) -> None:
    with unanswered_port() as port:
        services = {"smtp": (port, "starttls")}
        config = write_config(tmp_path / "gwcheck.toml", services, ca=certs.ca_file)
        code, report = check_json(config, "--timeout", "1")
    check = check_for(report, "smtp")
    assert (code, check["verdict"]) == (1, "unreachable")
    assert check["found"] == "unreachable: connection timed out after 1 s"


def test_backend_that_never_greets_is_reported_not_waited_for(certs: Certs, tmp_path: Path) -> None:
    with ExitStack() as stack:
        stub = stack.enter_context(start_stub("imap", StubTls.STARTTLS, certs.right, greet=False))
        services = stub_services(stack, "imap", stub, "starttls", certs)
        config = write_config(tmp_path / "gwcheck.toml", services, ca=certs.ca_file)
        code, report = check_json(config, "--timeout", "1")
    check = check_for(report, "imap")
    assert (code, check["verdict"]) == (1, "no_answer")
    assert check["found"] == "no greeting within 1 s"


# --- no login, ever --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_login_command_reaches_the_backend_in_any_outcome(
    protocol: str, certs: Certs, tmp_path: Path
) -> None:
    cases = [
        (StubTls.STARTTLS, certs.right, Verdict.VERIFIED),
        (StubTls.STARTTLS, certs.wrong_name, Verdict.WRONG_NAME),
        (StubTls.STARTTLS, certs.other_ca, Verdict.UNTRUSTED),
        (StubTls.NOT_OFFERED, certs.right, Verdict.STARTTLS_NOT_OFFERED),
        (StubTls.REFUSED, certs.right, Verdict.STARTTLS_REFUSED),
        (StubTls.IMPLICIT, certs.right, Verdict.VERIFIED),
        (StubTls.NONE, None, Verdict.UNENCRYPTED),
    ]
    for tls, cert, verdict in cases:
        with ExitStack() as stack:
            stub = stack.enter_context(start_stub(protocol, tls, cert))
            services = stub_services(stack, protocol, stub, stub_security(tls), certs)
            config = write_config(tmp_path / "gwcheck.toml", services, ca=certs.ca_file)
            _, report = check_json(config)
        assert check_for(report, protocol)["verdict"] == verdict, (tls, report)
        assert stub.connections >= 1
        sent = stub.received_bytes().upper()
        assert not [word for word in LOGIN_WORDS if word in sent], (tls, stub.received)


def test_login_words_would_be_seen_in_what_the_stub_records(certs: Certs) -> None:
    # Guards the guard above: a client that logs in shows up in `received`.
    with start_stub("smtp", StubTls.STARTTLS, certs.ip) as stub:
        context = ssl.create_default_context(cafile=str(certs.ca_file))
        with smtplib.SMTP("127.0.0.1", stub.port, timeout=10) as client:
            client.ehlo(HELO)
            client.starttls(context=context)
            client.ehlo(HELO)
            with pytest.raises(smtplib.SMTPException):
                client.login("alice", "alice-secret")
    assert b"AUTH" in stub.received_bytes().upper()


# --- the command cannot run: exit 2 -----------------------------------------------------------


def test_gateway_mode_off_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "gwcheck.toml"
    config.write_text("[gateway]\nenabled = false\n", encoding="utf-8")
    done = run_check(config)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "check backend: gateway mode is off ([gateway] enabled = false): no backend to check"
    )


def test_unreadable_ca_exits_2_naming_the_file(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    missing = tmp_path / "no-such-ca.pem"
    config = write_config(tmp_path / "gwcheck.toml", {"smtp": (port, "starttls")}, ca=missing)
    done = run_check(config)
    assert done.returncode == 2
    assert done.stderr.startswith(f"check backend: gateway.ca = {missing}: not a readable PEM")
    assert "Traceback" not in done.stderr
