"""Gateway mode end to end: postwarden in front of a real backend, logins passed through.

The gateway is the private Postfix + Dovecot of `mail_system_factory`, rendered from a config
with `[gateway]` pointing at a backend on 127.0.0.2 (tests/fixtures/backend_servers.py: its
own Postfix + Dovecot, its own users with hashed passwords, its own CA and certificate for
backend.test), with milterd signing for the backend's domain (key on the loopback NSD) and,
for the inbound path, policyd greylisting. Clients talk only to the gateway (127.0.0.1);
what the tests read is what the backend stored, or what a recording fake backend received.

Contract: docs/gateway-mode.md. Each security mode (enforced STARTTLS, TLS, none) is one
parametrisation of the `gateway` fixture; the fail-closed tests point an enforced-STARTTLS
gateway at a backend without STARTTLS, at one whose certificate names evil.test, and at a
recorder, and check that no credential and no message reached it.
"""

from __future__ import annotations

import imaplib
import poplib
import shutil
import smtplib
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from postwarden.dkim.keys import SigningKey, generate_key, quoted_txt, txt_record, write_key
from tests.fixtures.backend_servers import (
    BACKEND_DOMAIN,
    Backend,
    BackendFactory,
    Recorder,
    backend_factory,
)
from tests.fixtures.dns_server import DnsServer
from tests.fixtures.gateway import dkim_results, raw_bytes, signed_remote_message
from tests.fixtures.mail_system import HOST, MailSystem, MailSystemFactory, SmtpResult
from tests.fixtures.milterd_daemon import MilterdHandle, start_milterd
from tests.fixtures.policyd_daemon import PolicydHandle, start_policyd

pytestmark = pytest.mark.e2e

ALICE, BOB = f"alice@{BACKEND_DOMAIN}", f"bob@{BACKEND_DOMAIN}"
UNKNOWN = f"nobody@{BACKEND_DOMAIN}"
MAIL = {"hostname": "mx.example.test", "main_domain": "example.test"}
SENDER_ZONE = "gwsender.test"  # a remote domain whose mail arrives DKIM-signed
GREYLIST_DELAY = 2.0
# What a client sees when the backend cannot be reached safely (docs/gateway-mode.md,
# "Fail closed"): Dovecot's proxy answers "Account is temporarily unavailable."
TEMPORARY = "temporarily unavailable"
# Every wrong SMTP password is logged by Dovecot's passdb imap as an internal failure
# (research §1.5): `auth: Error: imapc(host:port): Authentication failed: ...`.
IMAPC_AUTH_FAILED = r"imapc\([^)]*\): Authentication failed"
# The fail-closed paths log why at Error level on the gateway (imapc's STARTTLS or
# certificate refusal, the login proxy's): the point of those tests.
FAIL_CLOSED_LOGS = (
    r"imapc\(",
    r"STARTTLS|[Ss]tarttls",
    r"[Cc]ertificate|SSL|TLS",
)
CREDENTIAL_VERBS = (b"LOGIN", b"AUTHENTICATE", b"AUTH ", b"USER ", b"PASS ")


def _signing_key(dns_server: DnsServer, directory: Path) -> tuple[dict[str, Any], SigningKey]:
    """milterd's [dkim] for the backend's domain (selector gw, on NSD) and a remote sender's."""
    ours, theirs = generate_key("rsa-sha256"), generate_key("rsa-sha256")
    write_key(ours, directory / "corp.key")
    dns_server.set_zone(BACKEND_DOMAIN, [f"gw._domainkey TXT ( {quoted_txt(txt_record(ours))} )"])
    dns_server.set_zone(SENDER_ZONE, [f"rs._domainkey TXT ( {quoted_txt(txt_record(theirs))} )"])
    dkim = {"keys": [{"domain": BACKEND_DOMAIN, "selector": "gw", "key": directory / "corp.key"}]}
    return dkim, SigningKey(SENDER_ZONE, "rs", "rsa-sha256", directory / "unused", theirs)


@dataclass
class Gateway:
    """A running gateway (Postfix + Dovecot + milterd, maybe policyd) and its backend."""

    mail: MailSystem
    backend: Backend | Recorder
    security: str
    milterd: MilterdHandle
    nameserver: str
    remote_key: SigningKey
    policyd: PolicydHandle | None = None

    def diagnostics(self) -> str:
        backend = self.backend.logs() if isinstance(self.backend, Backend) else ""
        return f"{self.mail.logs()}\n{backend}"

    def dkim_results(self, raw: bytes) -> list[str]:
        return dkim_results(raw, self.nameserver)

    @property
    def real_backend(self) -> Backend:
        assert isinstance(self.backend, Backend)
        return self.backend


@dataclass
class GatewayRig:
    """Starts gateways in front of backends; `stop()` ends every daemon it started."""

    mail_system_factory: MailSystemFactory
    backends: BackendFactory
    dns_server: DnsServer
    directory: Path
    dkim: dict[str, Any]
    remote_key: SigningKey
    _daemons: list[MilterdHandle | PolicydHandle] = field(default_factory=list)
    _systems: list[MailSystem] = field(default_factory=list)

    def start(
        self,
        backend: Backend | Recorder,
        gateway_table: dict[str, Any],
        *,
        security: str = "starttls",
        greylisting: bool = False,
    ) -> Gateway:
        n = len(self._systems)
        dns = {"nameservers": [self.dns_server.nameserver], "timeout": 2.0}
        config: dict[str, dict[str, Any]] = {"mail": MAIL, "gateway": gateway_table}
        milterd = start_milterd(
            self.directory / f"m{n}",
            {
                "milterd": {"socket_mode": "0660", "socket_group": "postfix"},
                "dkim": self.dkim,
                "dns": dns,
                **config,
            },
        )
        self._daemons.append(milterd)
        (self.directory / f"m{n}").chmod(0o755)
        policyd = None
        if greylisting:
            policyd = start_policyd(
                self.directory / f"p{n}",
                {
                    "policyd": {"socket_mode": "0660", "socket_group": "postfix"},
                    "greylisting": {
                        "enabled": True,
                        "delay": GREYLIST_DELAY,
                        "auto_whitelist_after": 0,
                    },
                    "dns": dns,
                    **config,
                },
                tcp=False,
            )
            self._daemons.append(policyd)
            (self.directory / f"p{n}").chmod(0o755)
        mail = self.mail_system_factory(
            config,
            milterd_socket=str(milterd.socket_path),
            policyd_socket=str(policyd.socket_path) if policyd and policyd.socket_path else None,
        )
        self._systems.append(mail)
        return Gateway(
            mail, backend, security, milterd, self.dns_server.nameserver, self.remote_key, policyd
        )

    def stop(self) -> None:
        # Postfix first: its smtpd holds keep-alive connections that policyd would drain.
        for system in self._systems:
            system.stop()
        for daemon in self._daemons:
            daemon.stop()


@pytest.fixture
def rig(mail_system_factory: MailSystemFactory, dns_server: DnsServer) -> Iterator[GatewayRig]:
    # World-traversable: Postfix's smtpd runs as `postfix` and must reach the daemons' sockets.
    directory = Path(tempfile.mkdtemp(prefix="pw-gwe2e-"))
    directory.chmod(0o755)
    dkim, remote_key = _signing_key(dns_server, directory)
    with backend_factory() as backends:
        rig = GatewayRig(mail_system_factory, backends, dns_server, directory, dkim, remote_key)
        try:
            yield rig
        finally:
            rig.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["starttls", "tls", "none"])
def gateway(request: pytest.FixtureRequest, rig: GatewayRig) -> Gateway:
    """A gateway in each security mode, with greylisting, in front of a matching backend:
    enforced STARTTLS and TLS reach the backend with TLS, "none" the one without TLS."""
    security: str = request.param
    backend = rig.backends.start(starttls=security != "none")
    return rig.start(backend, backend.gateway_config(security), security=security, greylisting=True)


# --- helpers ------------------------------------------------------------------------------------
def _imap(gateway: Gateway, port_key: str) -> imaplib.IMAP4:
    ctx = gateway.mail.client_tls_context()
    if port_key == "imaps_port":
        return imaplib.IMAP4_SSL(HOST, gateway.mail.ports[port_key], ssl_context=ctx, timeout=30)
    conn = imaplib.IMAP4(HOST, gateway.mail.ports[port_key], timeout=30)
    conn.starttls(ssl_context=ctx)
    return conn


def _imap_login_error(gateway: Gateway, port_key: str, user: str, password: str) -> str:
    """The gateway's NO to a LOGIN (fails the test if the login succeeds)."""
    conn = _imap(gateway, port_key)
    try:
        with pytest.raises(imaplib.IMAP4.error) as refused:
            conn.login(user, password)
        return str(refused.value)
    finally:
        conn.shutdown()


def _pop3(gateway: Gateway, port_key: str) -> poplib.POP3:
    ctx = gateway.mail.client_tls_context()
    if port_key == "pop3s_port":
        return poplib.POP3_SSL(HOST, gateway.mail.ports[port_key], context=ctx, timeout=30)
    conn = poplib.POP3(HOST, gateway.mail.ports[port_key], timeout=30)
    conn.stls(context=ctx)
    return conn


def _pop3_login_error(gateway: Gateway, port_key: str, user: str, password: str) -> str:
    conn = _pop3(gateway, port_key)
    try:
        conn.user(user)
        with pytest.raises(poplib.error_proto) as refused:
            conn.pass_(password)
        return str(refused.value)
    finally:
        conn.close()


def _smtp(gateway: Gateway, port_key: str) -> smtplib.SMTP:
    ctx = gateway.mail.client_tls_context()
    port = gateway.mail.ports[port_key]
    if port_key == "smtps_port":
        client: smtplib.SMTP = smtplib.SMTP_SSL(HOST, port, timeout=30, context=ctx)
        client.ehlo("client.test")
        return client
    client = smtplib.SMTP(HOST, port, timeout=30)
    client.ehlo("client.test")
    client.starttls(context=ctx)
    client.ehlo("client.test")
    return client


def _smtp_auth_reply(gateway: Gateway, port_key: str, user: str, password: str) -> tuple[int, str]:
    """The gateway's answer to AUTH PLAIN with these credentials."""
    with _smtp(gateway, port_key) as client:
        try:
            client.login(user, password)
        except smtplib.SMTPResponseException as exc:
            error = exc.smtp_error
            return exc.smtp_code, error.decode(errors="replace") if isinstance(
                error, bytes
            ) else error
        return 235, "accepted"


def _through_greylisting(send: Callable[[], SmtpResult], timeout: float = 30.0) -> SmtpResult:
    """Send, and resend as a real server would until the greylisting delay has passed."""
    first = send()
    assert first.stage == "rcpt" and 400 <= first.code < 500, first  # greylisted first
    deadline = time.monotonic() + GREYLIST_DELAY + timeout
    result = first
    while not result.accepted and time.monotonic() < deadline:
        time.sleep(0.5)
        result = send()
    return result


def _deferred_for(mail: MailSystem, recipient: str, timeout: float = 30.0) -> str:
    """The delay reason of the queued message to `recipient`, once a delivery was tried."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in mail.queue():
            for rcpt in entry.get("recipients", []):
                if rcpt.get("address") == recipient and rcpt.get("delay_reason"):
                    assert entry.get("queue_name") in ("deferred", "active"), entry
                    return str(rcpt["delay_reason"])
        time.sleep(0.3)
    pytest.fail(f"no deferred message to {recipient} in {timeout}s: {mail.queue()}\n{mail.logs()}")


def _outside_message(gateway: Gateway, subject: str) -> bytes:
    return signed_remote_message(gateway.remote_key, BOB, subject, "Hello Bob, from outside.")


# --- IMAP and POP3: logins passed through -------------------------------------------------------
@pytest.mark.parametrize("port_key", ["imap_port", "imaps_port"])
def test_imap_login_reads_the_backend_mailbox(gateway: Gateway, port_key: str) -> None:
    backend = gateway.real_backend
    backend.smtp_send(BOB, ALICE, subject="kept on the backend")
    backend.wait_for_delivery(ALICE)
    conn = _imap(gateway, port_key)
    try:
        conn.login(ALICE, backend.users[ALICE])
        conn.select("INBOX", readonly=True)
        _, data = conn.search(None, "ALL")
        (num,) = data[0].split()
        _, parts = conn.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        header = next(p[1] for p in parts if isinstance(p, tuple))
        assert b"kept on the backend" in header, (header, gateway.diagnostics())
    finally:
        conn.logout()
    # The backend's Dovecot saw the login: the gateway passed it through, it did not decide.
    assert f"Login: user=<{ALICE}>" in backend.dovecot_log


@pytest.mark.parametrize("port_key", ["imap_port", "imaps_port"])
def test_imap_wrong_password_and_unknown_user_are_refused_alike(
    gateway: Gateway, port_key: str
) -> None:
    wrong = _imap_login_error(gateway, port_key, ALICE, "not-alices-password")
    unknown = _imap_login_error(gateway, port_key, UNKNOWN, "whatever-password")
    assert "AUTHENTICATIONFAILED" in wrong, wrong
    assert wrong == unknown
    # The same port lets the right password in: the refusals were the backend's verdicts.
    conn = _imap(gateway, port_key)
    try:
        assert conn.login(ALICE, gateway.real_backend.users[ALICE])[0] == "OK"
    finally:
        conn.logout()


@pytest.mark.parametrize("port_key", ["pop3_port", "pop3s_port"])
def test_pop3_login_reads_the_backend_mailbox(gateway: Gateway, port_key: str) -> None:
    backend = gateway.real_backend
    backend.smtp_send(BOB, ALICE, subject="fetched over pop3")
    backend.wait_for_delivery(ALICE)
    conn = _pop3(gateway, port_key)
    try:
        conn.user(ALICE)
        conn.pass_(backend.users[ALICE])
        count, _ = conn.stat()
        assert count == 1
        lines = conn.retr(1)[1]
        assert b"Subject: fetched over pop3" in lines, lines
    finally:
        conn.quit()


@pytest.mark.parametrize("port_key", ["pop3_port", "pop3s_port"])
def test_pop3_wrong_password_and_unknown_user_are_refused_alike(
    gateway: Gateway, port_key: str
) -> None:
    wrong = _pop3_login_error(gateway, port_key, ALICE, "not-alices-password")
    unknown = _pop3_login_error(gateway, port_key, UNKNOWN, "whatever-password")
    assert wrong.startswith("b'-ERR"), wrong
    assert wrong == unknown
    conn = _pop3(gateway, port_key)
    try:
        conn.user(ALICE)
        assert conn.pass_(gateway.real_backend.users[ALICE]).startswith(b"+OK")
    finally:
        conn.quit()


# Dovecot counts a connection from its own address (127.0.0.1 to 127.0.0.1) as secured and
# allows a plaintext login on it; a client elsewhere on loopback is an ordinary client.
CLIENT_SOURCE = "127.0.0.50"


class _ImapFromElsewhere(imaplib.IMAP4):
    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(CLIENT_SOURCE, 0)
        )


class _Pop3FromElsewhere(poplib.POP3):
    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(CLIENT_SOURCE, 0)
        )


def test_imap_and_pop3_logins_before_tls_are_refused(gateway: Gateway) -> None:
    backend = gateway.real_backend
    password = backend.users[ALICE]
    conn = _ImapFromElsewhere(HOST, gateway.mail.ports["imap_port"], timeout=30)
    try:
        assert "LOGINDISABLED" in conn.capabilities, conn.capabilities
        with pytest.raises(imaplib.IMAP4.error, match=r"PRIVACYREQUIRED|[Pp]laintext"):
            conn.login(ALICE, password)
        # Nothing was passed on: the backend saw no login at all.
        assert "Login: user=" not in backend.dovecot_log
        assert "auth failed" not in backend.dovecot_log
        # The same session after STARTTLS: the same password logs in, passed through.
        conn.starttls(ssl_context=gateway.mail.client_tls_context())
        assert conn.login(ALICE, password)[0] == "OK"
    finally:
        conn.logout()
    pop = _Pop3FromElsewhere(HOST, gateway.mail.ports["pop3_port"], timeout=30)
    try:
        with pytest.raises(poplib.error_proto, match=r"[Pp]laintext|AUTH"):
            pop.user(ALICE)
            pop.pass_(password)
        pop.stls(context=gateway.mail.client_tls_context())
        pop.user(ALICE)
        assert pop.pass_(password).startswith(b"+OK")
    finally:
        pop.quit()


# --- SMTP submission: login checked against the backend, mail signed and relayed ---------------
@pytest.mark.parametrize("port_key", ["submission_port", "smtps_port"])
def test_submitted_mail_arrives_in_the_backend_mailbox_signed(
    gateway: Gateway, port_key: str
) -> None:
    backend = gateway.real_backend
    sent = gateway.mail.smtp_send(
        ALICE,
        BOB,
        subject=f"submitted on {port_key}",
        port_key=port_key,
        starttls=port_key == "submission_port",
        login=(ALICE, backend.users[ALICE]),
    )
    assert sent.accepted, (sent, gateway.diagnostics())
    (message,) = backend.wait_for_delivery(BOB, timeout=30)
    assert message["Subject"] == f"submitted on {port_key}"
    signature = str(message["DKIM-Signature"])
    assert f"d={BACKEND_DOMAIN}" in signature and "s=gw" in signature, message.as_string()
    # milterd's signature survives the hop to the backend and verifies against NSD's key.
    assert gateway.dkim_results(raw_bytes(message)) == ["pass"]
    # The relay hop to the backend used the configured security.
    log = gateway.mail.postfix_log
    if gateway.security == "none":
        assert "TLS connection established to" not in log
    else:
        assert f"Verified TLS connection established to {backend.host}" in log, log


@pytest.mark.expect_log(IMAPC_AUTH_FAILED)
@pytest.mark.parametrize("port_key", ["submission_port", "smtps_port"])
def test_smtp_wrong_password_and_unknown_user_are_refused_alike(
    gateway: Gateway, port_key: str
) -> None:
    wrong = _smtp_auth_reply(gateway, port_key, ALICE, "not-alices-password")
    unknown = _smtp_auth_reply(gateway, port_key, UNKNOWN, "whatever-password")
    assert wrong[0] == 535, (wrong, gateway.diagnostics())
    assert wrong == unknown
    right = _smtp_auth_reply(gateway, port_key, ALICE, gateway.real_backend.users[ALICE])
    assert right[0] == 235, (right, gateway.diagnostics())


def test_smtp_auth_before_starttls_is_refused(gateway: Gateway) -> None:
    with smtplib.SMTP(HOST, gateway.mail.ports["submission_port"], timeout=30) as client:
        client.ehlo("client.test")
        assert not client.has_extn("auth"), client.esmtp_features
        code, _ = client.docmd("AUTH", "PLAIN AGFsaWNlQGNvcnAudGVzdABndWVzcw==")
        assert code == 530  # 5.7.0 Must issue a STARTTLS command first
        code, _ = client.mail(ALICE)
        assert code == 530  # 5.7.0 Must issue a STARTTLS command first
        client.rset()
        # After STARTTLS on the same session, AUTH is offered and the backend's password works.
        client.starttls(context=gateway.mail.client_tls_context())
        client.ehlo("client.test")
        code, _ = client.login(ALICE, gateway.real_backend.users[ALICE])
        assert code == 235


def test_sending_as_another_users_address_is_refused(gateway: Gateway) -> None:
    backend = gateway.real_backend
    sent = gateway.mail.smtp_send(
        BOB,
        ALICE,
        subject="pretending to be bob",
        port_key="submission_port",
        starttls=True,
        login=(ALICE, backend.users[ALICE]),
    )
    assert not sent.accepted and sent.stage in ("mail", "rcpt"), sent
    assert sent.code == 553, sent
    assert "not owned by user" in sent.text, sent


# --- inbound: filtered, greylisted, relayed to the backend --------------------------------------
def test_outside_mail_to_a_backend_domain_is_greylisted_then_delivered_with_results(
    gateway: Gateway,
) -> None:
    message = _outside_message(gateway, "from outside")
    started = time.monotonic()
    result = _through_greylisting(
        lambda: gateway.mail.smtp_send(
            f"carol@{SENDER_ZONE}", BOB, message=message, client_ip="198.51.100.25"
        )
    )
    assert result.accepted, (result, gateway.diagnostics())
    assert time.monotonic() - started >= GREYLIST_DELAY - 0.5  # not let through early
    (delivered,) = gateway.real_backend.wait_for_delivery(BOB, timeout=30)
    (results,) = delivered.get_all("Authentication-Results", [])
    assert str(results).startswith("mx.example.test; dkim=pass"), results
    assert f"header.d={SENDER_ZONE}" in str(results)
    assert "delayed" in str(delivered["X-Greylist"]), delivered.as_string()


def test_outside_mail_to_another_domain_is_refused(gateway: Gateway) -> None:
    refused = gateway.mail.smtp_send(
        f"carol@{SENDER_ZONE}", "victim@elsewhere.test", client_ip="198.51.100.40"
    )
    assert refused.stage == "rcpt" and refused.code == 554, refused
    # The backend's domain, from the same client, is not a relay refusal (only greylisted).
    backend_domain = gateway.mail.smtp_send(f"carol@{SENDER_ZONE}", BOB, client_ip="198.51.100.40")
    assert backend_domain.stage == "rcpt" and 400 <= backend_domain.code < 500, backend_domain


# --- fail closed: nothing reaches a backend that cannot be reached safely -----------------------
def _assert_nothing_sent(recorder: Recorder, secrets: list[str]) -> None:
    for service in ("smtp", "imap", "pop3"):
        received = recorder.received(service)
        for verb in CREDENTIAL_VERBS:
            lines = [line for line in received.split(b"\n") if verb in line.upper()]
            # "AUTH" appears in no EHLO/CAPABILITY command the gateway may send.
            assert not lines, (service, lines)
        for secret in secrets:
            assert secret.encode() not in received, (service, received)
    smtp = recorder.received("smtp").upper()
    assert b"MAIL FROM" not in smtp and b"RCPT TO" not in smtp and b"DATA" not in smtp, smtp


@pytest.mark.expect_log(*FAIL_CLOSED_LOGS)
@pytest.mark.parametrize("refuse_starttls", [False, True], ids=["no-starttls", "starttls-refused"])
def test_a_backend_without_starttls_gets_no_credential_and_no_mail(
    rig: GatewayRig, refuse_starttls: bool
) -> None:
    recorder = rig.backends.recorder(refuse_starttls=refuse_starttls)
    # A CA to name (the config needs one with TLS); the recorder never gets that far.
    ca_file = rig.directory / "recorder-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    gateway = rig.start(recorder, recorder.gateway_config(ca_file))
    password = "recorder-canary-pw"
    # IMAP and POP3: a temporary failure, the login never forwarded.
    imap = _imap_login_error(gateway, "imap_port", ALICE, password)
    assert TEMPORARY in imap, imap
    pop3 = _pop3_login_error(gateway, "pop3_port", ALICE, password)
    assert TEMPORARY in pop3, pop3
    # SMTP AUTH is checked against the backend's IMAP: it cannot be, so it is not accepted.
    code, text = _smtp_auth_reply(gateway, "submission_port", ALICE, password)
    assert code != 235 and code >= 400, (code, text)
    # Inbound mail for the backend's domain is accepted and stays deferred.
    sent = gateway.mail.smtp_send(f"carol@{SENDER_ZONE}", BOB, client_ip="198.51.100.25")
    assert sent.accepted, (sent, gateway.diagnostics())
    reason = _deferred_for(gateway.mail, BOB)
    assert "TLS" in reason, reason
    _assert_nothing_sent(recorder, [password])


@pytest.mark.expect_log(*FAIL_CLOSED_LOGS)
def test_a_backend_whose_certificate_names_another_host_gets_nothing(rig: GatewayRig) -> None:
    evil = rig.backends.start(cert_names=("evil.test",))
    gateway = rig.start(evil, evil.gateway_config("starttls"))
    password = evil.users[ALICE]  # the right password: it must still not be sent
    imap = _imap_login_error(gateway, "imap_port", ALICE, password)
    assert TEMPORARY in imap, imap
    pop3 = _pop3_login_error(gateway, "pop3_port", ALICE, password)
    assert TEMPORARY in pop3, pop3
    code, text = _smtp_auth_reply(gateway, "submission_port", ALICE, password)
    assert code != 235 and code >= 400, (code, text)
    sent = gateway.mail.smtp_send(f"carol@{SENDER_ZONE}", BOB, client_ip="198.51.100.26")
    assert sent.accepted, (sent, gateway.diagnostics())
    reason = _deferred_for(gateway.mail, BOB)
    assert "certificate" in reason.lower() or "TLS" in reason, reason
    # The backend saw TLS handshakes fail, never a login or a message.
    assert "Login: user=" not in evil.dovecot_log and "auth failed" not in evil.dovecot_log
    assert "from=<" not in evil.postfix_log, evil.postfix_log
    assert evil.imap_fetch(BOB, evil.users[BOB]) == []


# --- inbound only: without [gateway.imap] no login of the backend's users is accepted ----------
@pytest.mark.expect_log(r"User found from deny passdb|denied")
def test_without_the_backends_imap_no_login_is_accepted_and_inbound_mail_still_flows(
    rig: GatewayRig,
) -> None:
    backend = rig.backends.start()
    table = backend.gateway_config("starttls")
    del table["imap"], table["pop3"]
    gateway = rig.start(backend, table)
    password = backend.users[ALICE]  # the right password: no backend may be asked with it
    assert "AUTHENTICATIONFAILED" in _imap_login_error(gateway, "imap_port", ALICE, password)
    assert _pop3_login_error(gateway, "pop3_port", ALICE, password).startswith("b'-ERR")
    assert _smtp_auth_reply(gateway, "submission_port", ALICE, password)[0] == 535
    assert "Login: user=" not in backend.dovecot_log and "auth failed" not in backend.dovecot_log
    # Inbound mail to the backend's domain is filtered and relayed as before.
    sent = gateway.mail.smtp_send(
        f"carol@{SENDER_ZONE}", BOB, message=_outside_message(gateway, "inbound only")
    )
    assert sent.accepted, (sent, gateway.diagnostics())
    (delivered,) = backend.wait_for_delivery(BOB, timeout=30)
    assert delivered["Subject"] == "inbound only"
