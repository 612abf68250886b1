"""TLS suites, AUTH, logging and process users of the real private Postfix + Dovecot.

No unauthenticated (aNULL) or static-RSA (kRSA) suites where TLS is mandatory (587, 465)
nor on Dovecot's 993/995; AUTH only on the submission ports and rate-limited per client;
port 25 logs as Postfix's own `postfix/smtpd`; Dovecot's LMTP delivers as the mail user.
"""

from __future__ import annotations

import pwd
import smtplib
import subprocess
from pathlib import Path

import pytest
import trustme

from tests.fixtures.mail_system import HOST, MailSystem, MailSystemFactory

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"
# Where TLS is mandatory, and how openssl s_client reaches each of them.
MANDATORY_TLS = {
    "submission_port": ["-starttls", "smtp"],
    "smtps_port": [],
    "imaps_port": [],
    "pop3s_port": [],
}


def _rsa_certificate(tmp_path: Path) -> dict[str, str]:
    """mail.tls naming an RSA certificate: static-RSA key exchange needs an RSA key, so
    with the fixture's default (ECDSA) certificate kRSA could never be negotiated anyway."""
    issued = trustme.CA(key_type=trustme.KeyType.RSA).issue_cert(
        "mx.example.test", HOST, key_type=trustme.KeyType.RSA
    )
    cert, key = tmp_path / "rsa.crt", tmp_path / "rsa.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return {"cert": str(cert), "key": str(key)}


def _negotiated(mail: MailSystem, port_key: str, ciphers: str) -> str:
    """The TLS 1.2 suite a client offering only `ciphers` gets ("" when the handshake fails)."""
    done = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"{HOST}:{mail.ports[port_key]}",
            *MANDATORY_TLS[port_key],
            "-tls1_2",
            # Security level 0: the client must really offer what the server is to refuse.
            "-cipher",
            f"{ciphers}:@SECLEVEL=0",
        ],
        input=b"",
        capture_output=True,
        check=False,
        timeout=20,
    )
    for line in done.stdout.decode(errors="replace").splitlines():
        if "Cipher is" in line:
            suite = line.rsplit("Cipher is", 1)[1].strip()
            return "" if suite == "(NONE)" else suite
    return ""


def test_no_anonymous_or_static_rsa_suites_where_tls_is_mandatory(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    mail = mail_system_factory({"mail": {"tls": _rsa_certificate(tmp_path)}})
    for port_key in MANDATORY_TLS:
        # The probe itself works: a forward-secret RSA suite is negotiated.
        assert _negotiated(mail, port_key, "ECDHE+aRSA").startswith("ECDHE-RSA-"), port_key
        assert _negotiated(mail, port_key, "aNULL") == "", port_key
        assert _negotiated(mail, port_key, "kRSA") == "", port_key


def test_auth_is_offered_only_on_the_submission_ports(
    mail_system_factory: MailSystemFactory,
) -> None:
    mail = mail_system_factory()
    with smtplib.SMTP(HOST, mail.ports["smtp_port"], timeout=10) as client:
        client.ehlo("client.test")
        client.starttls(context=mail.client_tls_context())
        client.ehlo("client.test")
        assert not client.has_extn("auth"), client.esmtp_features
        code, text = client.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQ=")
        assert code == 503, text
    for port_key in ("submission_port", "smtps_port"):
        sent = mail.smtp_send(
            ALICE,
            "bob@example.test",
            port_key=port_key,
            starttls=port_key == "submission_port",
            login=(ALICE, ALICE_PW),
        )
        assert sent.accepted, (port_key, sent)


def _login_from(mail: MailSystem, source: str) -> int:
    """One session from `source` logging in on 587; the AUTH reply code."""
    with smtplib.SMTP(
        HOST, mail.ports["submission_port"], timeout=10, source_address=(source, 0)
    ) as client:
        client.ehlo("client.test")
        client.starttls(context=mail.client_tls_context())
        client.ehlo("client.test")
        try:
            return client.login(ALICE, ALICE_PW)[0]
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code


def test_auth_attempts_per_client_are_rate_limited(mail_system_factory: MailSystemFactory) -> None:
    # Trusted networks are exempt (as from every anvil limit), so the client is 127.0.0.2
    # with only 127.0.0.1 trusted.
    mail = mail_system_factory(
        {"mail": {"auth_rate_limit": 2}, "network": {"trusted": ["127.0.0.1/32"]}}
    )
    assert [_login_from(mail, "127.0.0.2") for _ in range(3)] == [235, 235, 450]
    mail.wait_for_log("AUTH command rate limit exceeded: 3 from unknown[127.0.0.2]")
    # Another client is not affected.
    assert _login_from(mail, "127.0.0.3") == 235


def test_port_25_logs_as_postfix_smtpd_and_submission_as_itself(
    mail_system_factory: MailSystemFactory,
) -> None:
    mail = mail_system_factory()
    assert mail.smtp_send("a@remote.test", ALICE, client_ip="198.51.100.40").accepted
    assert mail.smtp_send(
        ALICE,
        "bob@example.test",
        port_key="submission_port",
        starttls=True,
        login=(ALICE, ALICE_PW),
    ).accepted
    log = mail.wait_for_log(" postfix/submission/smtpd[")
    # What stock fail2ban filters and log tools match: postfix/smtpd[pid].
    assert " postfix/smtpd[" in log and "client=mail.remote.test[198.51.100.40]" in log, log
    assert "postfix/smtpd/smtpd" not in log, log
    assert " postfix/submission/smtpd[" in log, log


def _children(master_pid: int, name: str) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            comm = fields[0].split("(", 1)[1]
            ppid = int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == master_pid and comm == name:
            found.append(int(stat.parent.name))
    return found


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("Uid:"))
    return int(line.split()[1])


def test_dovecot_lmtp_delivers_as_the_mail_user_not_root(
    mail_system_factory: MailSystemFactory,
) -> None:
    mail = mail_system_factory()
    assert mail.smtp_send("a@remote.test", ALICE, subject="as vmail", client_ip="198.51.100.41")
    (message,) = mail.wait_for_delivery(ALICE, ALICE_PW)
    assert message["Subject"] == "as vmail"
    # The lmtp process that just delivered stays a while (Dovecot's idle_kill).
    master = int((mail.layout.dovecot_base_dir / "master.pid").read_text().split()[0])
    lmtp = _children(master, "lmtp")
    assert lmtp, "no lmtp process under this Dovecot"
    mail_uid = pwd.getpwnam(mail.layout.mail_user).pw_uid
    assert {_uid(pid) for pid in lmtp} == {mail_uid}
    # And what it wrote belongs to the mail user.
    new = list((mail.layout.mail_root / "example.test" / "alice" / "Maildir" / "new").iterdir())
    assert new and all(path.stat().st_uid == mail_uid for path in new)
