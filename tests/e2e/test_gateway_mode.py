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

Every test ends with a credential scan (tests/fixtures/credential_scan.py), after its
daemons stopped and before their directories are removed: the gateway's and the backends'
configs, queues, logs, mail stores and Dovecot runtime directories, milterd's and policyd's
directories, the recorder's captures, new files in the core dump locations and in Dovecot's
state_dir, and journald's export when journald runs. None may hold any password the test
used, in any form `credential_forms` lists; `test_the_credential_scan_finds_a_password_dovecot_logs`
is the positive control (Dovecot told to log passwords: the scan must find one).
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import re
import shutil
import smtplib
import socket
import subprocess
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
from tests.fixtures.credential_scan import Finding, ScanReport, scan, secrets_for
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
# Every password a test types besides the backends' own (those come from Backend.users);
# the helpers below also record whatever they are given, so a new literal is scanned too.
WRONG_PASSWORD = "not-alices-password"
UNKNOWN_PASSWORD = "whatever-password"
CANARY_PASSWORD = "recorder-canary-pw"
BEFORE_TLS_PASSWORD = "sent-before-starttls"
TYPED_PASSWORDS = (WRONG_PASSWORD, UNKNOWN_PASSWORD, CANARY_PASSWORD, BEFORE_TLS_PASSWORD)
# Where a core dump of the run could land besides the daemons' working directories (which
# are in the scanned roots: Postfix's queue, Dovecot's base_dir and mail homes), and
# Dovecot's default state_dir (its `instances` list is rewritten by every start).
CORE_DIRS = (Path("/var/lib/systemd/coredump"), Path("/var/crash"))
DOVECOT_STATE_DIR = Path("/var/lib/dovecot")
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
# The backend's passwd-file holds its users' SHA512-CRYPT hashes by design (salted: no form
# the scan knows could match). It is excluded from the scan by path and checked for that.
BACKEND_USERS_LINE = re.compile(r"^[^:\s]+:\{SHA512-CRYPT\}\$6\$[^:\s]+::::::$")


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
    # The rig's record of passwords typed at this gateway (scanned for at teardown).
    typed: set[str] = field(default_factory=set)

    def type_password(self, password: str) -> str:
        self.typed.add(password)
        return password

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
    started_at: float = field(default_factory=time.time)
    passwords: set[str] = field(default_factory=lambda: set(TYPED_PASSWORDS))
    # The positive control's file, where findings are expected (and required) at teardown.
    allow_leaks_in: Path | None = None
    _daemons: list[MilterdHandle | PolicydHandle] = field(default_factory=list)
    _systems: list[MailSystem] = field(default_factory=list)
    _backends: list[Backend] = field(default_factory=list)
    _recorders: list[Recorder] = field(default_factory=list)

    def backend(self, **options: Any) -> Backend:
        """A running backend (BackendFactory.start), scanned with the rig."""
        backend = self.backends.start(**options)
        self._backends.append(backend)
        return backend

    def recorder(self, **options: Any) -> Recorder:
        """A recording fake backend (BackendFactory.recorder), scanned with the rig."""
        recorder = self.backends.recorder(**options)
        self._recorders.append(recorder)
        return recorder

    def start(
        self,
        backend: Backend | Recorder,
        gateway_table: dict[str, Any],
        *,
        security: str = "starttls",
        greylisting: bool = False,
        dovecot_settings: str | None = None,
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
            dovecot_settings=dovecot_settings,
        )
        self._systems.append(mail)
        return Gateway(
            mail,
            backend,
            security,
            milterd,
            self.dns_server.nameserver,
            self.remote_key,
            policyd,
            typed=self.passwords,
        )

    def stop(self) -> None:
        """Stop every daemon (idempotent): the gateways, milterd/policyd, the backends."""
        # Postfix first: its smtpd holds keep-alive connections that policyd would drain.
        for system in self._systems:
            system.stop()
        for daemon in self._daemons:
            daemon.stop()
        for backend in self._backends:
            backend.stop()
        for recorder in self._recorders:
            recorder.stop()

    # --- the credential scan ------------------------------------------------------------------
    def scan(self) -> tuple[ScanReport, list[str]]:
        """Scan everything this run wrote for every password it used (daemons stopped first).

        Returns the report and notes on what could not be scanned here (and why)."""
        notes: list[str] = []
        users = {ALICE, BOB, UNKNOWN}
        passwords = set(self.passwords)
        for backend in self._backends:
            users |= set(backend.users)
            passwords |= set(backend.users.values())
        roots = [self.directory]
        roots += [system.root for system in self._systems]
        roots += [backend.root for backend in self._backends]
        roots += [recorder.root for recorder in self._recorders]
        new_system_files, core_findings = self._system_files_changed(notes)
        report = scan(
            [*roots, *new_system_files],
            secrets_for(users, passwords),
            exclude=[backend.root / "users" for backend in self._backends],
            extra=self._journal_export(notes),
        )
        report.findings += core_findings
        for backend in self._backends:
            report.findings += _backend_users_file_findings(backend.root / "users")
        return report, notes

    def _system_files_changed(self, notes: list[str]) -> tuple[list[Path], list[Finding]]:
        """Files outside the roots this run may have written: new core dumps (each one a
        finding: a dump of a mail daemon holds its memory) and Dovecot's state_dir."""
        files: list[Path] = []
        findings: list[Finding] = []
        pattern = _read_text(Path("/proc/sys/kernel/core_pattern")).strip()
        core_dirs = list(CORE_DIRS)
        if pattern.startswith("/"):
            core_dirs.append(Path(pattern).parent)
        notes.append(
            f"core_pattern {pattern!r}; core dump locations {[str(d) for d in core_dirs]}"
            " and the roots (a relative pattern dumps in the daemon's working directory)"
        )
        places = [(d, True) for d in core_dirs] + [(DOVECOT_STATE_DIR, False)]
        for directory, is_core_dir in places:
            if not directory.is_dir():
                notes.append(f"{directory}: absent")
                continue
            for path in sorted(directory.rglob("*")):
                if path.is_symlink() or not path.is_file():
                    continue
                if path.stat().st_mtime >= self.started_at - 1:
                    files.append(path)
                    if is_core_dir:
                        findings.append(Finding(str(path), "core dump", detail="new in this run"))
        return files, findings

    def _journal_export(self, notes: list[str]) -> dict[str, bytes]:
        """journald's export of this run's time, when journald runs (else a note: not faked)."""
        if not JOURNAL_SOCKET.exists() or shutil.which("journalctl") is None:
            notes.append(f"journald not running ({JOURNAL_SOCKET} absent): no journal to scan")
            return {}
        since = f"@{int(self.started_at) - 1}"
        done = subprocess.run(
            ["journalctl", "-o", "export", "--no-pager", "--since", since],
            capture_output=True,
            check=False,
            timeout=120,
        )
        if done.returncode != 0:
            pytest.fail(f"journalctl -o export failed: {done.stderr!r}")
        notes.append(f"journald export since {since}: {len(done.stdout)} bytes scanned")
        return {f"journalctl -o export --since {since}": done.stdout}

    def must_have_scanned(self) -> list[Path]:
        """Files every scan must have read: each daemon's log (an empty scan proves nothing)."""
        logs = []
        for system in self._systems:
            logs += [system.layout.maillog_file, system.layout.dovecot_log_file]
        for backend in self._backends:
            logs += [backend.root / "log" / "postfix.log", backend.root / "log" / "dovecot.log"]
        return [p for p in logs if p is not None]


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _backend_users_file_findings(users_file: Path) -> list[Finding]:
    """The excluded passwd-file holds only SHA512-CRYPT hashes (anything else is a finding)."""
    lines = _read_text(users_file).splitlines()
    bad = [n for n, line in enumerate(lines, 1) if not BACKEND_USERS_LINE.match(line)]
    if lines and not bad:
        return []
    return [Finding(str(users_file), "not only SHA512-CRYPT hashes", detail=f"lines {bad}")]


def _judge_scan(rig: GatewayRig, report: ScanReport, notes: list[str]) -> None:
    """Fail the test on any finding (the positive control's own file aside, which must have
    some) and on a scan that missed a daemon's log."""
    print(f"credential scan: {len(report.scanned)} files and sources read", *notes, sep="\n  ")
    findings = report.findings
    problems: list[str] = []
    if rig.allow_leaks_in is not None:
        expected = [f for f in findings if f.source == str(rig.allow_leaks_in)]
        findings = [f for f in findings if f not in expected]
        print("  found, as the positive control must:", *expected, sep="\n    ")
        if not expected:
            problems.append(f"the positive control found nothing in {rig.allow_leaks_in}")
    unscanned = [str(p) for p in rig.must_have_scanned() if str(p) not in report.scanned]
    problems += [f"not scanned: {p}" for p in unscanned]
    problems += [str(f) for f in findings]
    if problems:
        pytest.fail("credential scan:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def rig(mail_system_factory: MailSystemFactory, dns_server: DnsServer) -> Iterator[GatewayRig]:
    # World-traversable: Postfix's smtpd runs as `postfix` and must reach the daemons' sockets.
    directory = Path(tempfile.mkdtemp(prefix="pw-gwe2e-"))
    directory.chmod(0o755)
    try:
        dkim, remote_key = _signing_key(dns_server, directory)
        with backend_factory() as backends:
            rig = GatewayRig(mail_system_factory, backends, dns_server, directory, dkim, remote_key)
            try:
                yield rig
            finally:
                # After the daemons stopped (nothing more is written), before anything is
                # removed (the backends at this block's end, the gateways after this fixture).
                rig.stop()
                report, notes = rig.scan()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    _judge_scan(rig, report, notes)


@pytest.fixture(params=["starttls", "tls", "none"])
def gateway(request: pytest.FixtureRequest, rig: GatewayRig) -> Gateway:
    """A gateway in each security mode, with greylisting, in front of a matching backend:
    enforced STARTTLS and TLS reach the backend with TLS, "none" the one without TLS."""
    security: str = request.param
    backend = rig.backend(starttls=security != "none")
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
            conn.login(user, gateway.type_password(password))
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
            conn.pass_(gateway.type_password(password))
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
            client.login(user, gateway.type_password(password))
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
    wrong = _imap_login_error(gateway, port_key, ALICE, WRONG_PASSWORD)
    unknown = _imap_login_error(gateway, port_key, UNKNOWN, UNKNOWN_PASSWORD)
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
    wrong = _pop3_login_error(gateway, port_key, ALICE, WRONG_PASSWORD)
    unknown = _pop3_login_error(gateway, port_key, UNKNOWN, UNKNOWN_PASSWORD)
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
    wrong = _smtp_auth_reply(gateway, port_key, ALICE, WRONG_PASSWORD)
    unknown = _smtp_auth_reply(gateway, port_key, UNKNOWN, UNKNOWN_PASSWORD)
    assert wrong[0] == 535, (wrong, gateway.diagnostics())
    assert wrong == unknown
    right = _smtp_auth_reply(gateway, port_key, ALICE, gateway.real_backend.users[ALICE])
    assert right[0] == 235, (right, gateway.diagnostics())


def test_smtp_auth_before_starttls_is_refused(gateway: Gateway) -> None:
    with smtplib.SMTP(HOST, gateway.mail.ports["submission_port"], timeout=30) as client:
        client.ehlo("client.test")
        assert not client.has_extn("auth"), client.esmtp_features
        early = base64.b64encode(f"\0{ALICE}\0{BEFORE_TLS_PASSWORD}".encode()).decode()
        code, _ = client.docmd("AUTH", f"PLAIN {early}")
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
    recorder = rig.recorder(refuse_starttls=refuse_starttls)
    # A CA to name (the config needs one with TLS); the recorder never gets that far.
    ca_file = rig.directory / "recorder-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    gateway = rig.start(recorder, recorder.gateway_config(ca_file))
    password = CANARY_PASSWORD
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
@pytest.mark.parametrize("unsafe", ["names-another-host", "chains-to-another-ca"])
def test_a_backend_whose_certificate_does_not_verify_gets_nothing(
    rig: GatewayRig, unsafe: str
) -> None:
    if unsafe == "names-another-host":
        evil = rig.backend(cert_names=("evil.test",))
        table = evil.gateway_config("starttls")
    else:  # the right names, from a CA that is not gateway.ca
        evil = rig.backend()
        other_ca = rig.directory / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other_ca))
        table = evil.gateway_config("starttls", ca=str(other_ca))
    gateway = rig.start(evil, table)
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
    backend = rig.backend()
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


# --- the positive control of the credential scan --------------------------------------------
# What an operator turning on Dovecot's password logging would write (all off in the render).
GATEWAY_LOCAL_USER = "alice@example.test"  # in the gateway's own users file (mail_system.py)
LOCAL_WRONG_PASSWORD = "not-the-local-password"
LEAKY_DOVECOT_SETTINGS = """\
auth_verbose = yes
auth_verbose_passwords = plain
auth_debug = yes
auth_debug_passwords = yes
"""


@pytest.mark.expect_log(IMAPC_AUTH_FAILED)
def test_the_credential_scan_finds_a_password_dovecot_logs(rig: GatewayRig) -> None:
    """The scan every test ends with is not blind: with Dovecot told to log passwords, one
    wrong SMTP login leaves the password in the gateway's Dovecot log, and the scan finds it."""
    backend = rig.backend()
    gateway = rig.start(
        backend, backend.gateway_config("starttls"), dovecot_settings=LEAKY_DOVECOT_SETTINGS
    )
    code, text = _smtp_auth_reply(gateway, "submission_port", ALICE, WRONG_PASSWORD)
    assert code == 535, (code, text, gateway.diagnostics())
    # A local user's wrong password: the gateway's own passwd-file logs the mismatch.
    local = _imap_login_error(gateway, "imap_port", GATEWAY_LOCAL_USER, LOCAL_WRONG_PASSWORD)
    assert "AUTHENTICATIONFAILED" in local, local
    rig.stop()
    report, _ = rig.scan()
    log = str(gateway.mail.layout.dovecot_log_file)
    found = {f.form for f in report.findings if f.source == log}
    assert f"AUTH PLAIN base64 of {WRONG_PASSWORD!r} as {ALICE}" in found, (report, log)
    assert f"plain of {LOCAL_WRONG_PASSWORD!r}" in found, (report, log)
    # Only the switched-on log leaked: the same login leaves nothing elsewhere.
    assert [f for f in report.findings if f.source != log] == [], report.findings
    rig.allow_leaks_in = gateway.mail.layout.dovecot_log_file
