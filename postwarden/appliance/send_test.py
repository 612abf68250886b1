"""The seed's "send test email": one message through the local Postfix or a configured relay."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from postwarden.config.mail import RelayServer


class SendTestError(Exception):
    """The server did not accept the message; the text is its reply (or why no reply came)."""


def build_message(sender: str, recipient: str, subject: str, *, hostname: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=hostname)
    message.set_content(
        "This is a test message sent by `postwarden send-test`.\n"
        "If you can read it, mail from this gateway reaches you.\n"
    )
    return message


def _reply(code: int, text: bytes | str) -> str:
    body = text.decode(errors="replace") if isinstance(text, bytes) else text
    return f"{code} {' '.join(body.split())}"


def _send(client: smtplib.SMTP, message: EmailMessage) -> None:
    try:
        refused = client.send_message(message)
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        raise SendTestError(_reply(code, text)) from None
    except smtplib.SMTPSenderRefused as exc:
        raise SendTestError(_reply(exc.smtp_code, exc.smtp_error)) from None
    except smtplib.SMTPDataError as exc:
        raise SendTestError(_reply(exc.smtp_code, exc.smtp_error)) from None
    if refused:
        code, text = next(iter(refused.values()))
        raise SendTestError(_reply(code, text))


def send_local(message: EmailMessage, host: str, port: int, timeout: float, *, helo: str) -> str:
    """Submit to the local Postfix (a trusted network: signed and sent on like users' mail)."""
    try:
        with smtplib.SMTP(host, port, timeout=timeout, local_hostname=helo) as client:
            client.ehlo()
            _send(client, message)
    except SendTestError:
        raise
    except smtplib.SMTPResponseException as exc:
        raise SendTestError(_reply(exc.smtp_code, exc.smtp_error)) from None
    except (OSError, smtplib.SMTPException) as exc:
        raise SendTestError(f"{host}:{port}: {exc}") from None
    return f"{host}:{port}"


def _tls_context(relay: RelayServer, ca: Path | None) -> ssl.SSLContext:
    """TLS as the relay's Postfix transport does it (see `tls_level_with_ca`).

    "verify" (mandatory TLS and mail.tls.ca set): the chain must lead to that CA, and that CA
    alone (Postfix does not add the system's CAs), and the certificate must name the relay's
    host. Any other level encrypts without checking the certificate, as Postfix does, so a
    test passes or fails exactly where real mail would."""
    if ca is not None and relay.tls_level_with_ca(ca) == "verify":
        return ssl.create_default_context(cafile=str(ca))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def send_via_relay(
    message: EmailMessage, relay: RelayServer, ca: Path | None, timeout: float, *, helo: str
) -> str:
    """Send straight to an outbound relay as Postfix would: HELO name, protocol, TLS, login."""
    target = f"{relay.name} ({relay.host}:{relay.effective_port})"
    try:
        context = _tls_context(relay, ca)
        client: smtplib.SMTP
        if relay.protocol == "smtps":
            client = smtplib.SMTP_SSL(
                relay.host,
                relay.effective_port,
                timeout=timeout,
                context=context,
                local_hostname=helo,
            )
        else:
            client = smtplib.SMTP(
                relay.host, relay.effective_port, timeout=timeout, local_hostname=helo
            )
        with client:
            client.ehlo()
            if relay.protocol == "smtp" and relay.starttls != "disabled":
                if client.has_extn("starttls"):
                    client.starttls(context=context)
                    client.ehlo()
                elif relay.starttls == "required":
                    raise SendTestError(f"{target} does not offer STARTTLS (starttls = required)")
            if relay.username is not None and relay.password_file is not None:
                password = relay.password_file.read_text(encoding="utf-8").splitlines()[0]
                client.login(relay.username, password)
            _send(client, message)
    except SendTestError:
        raise
    except smtplib.SMTPResponseException as exc:
        raise SendTestError(f"{target}: {_reply(exc.smtp_code, exc.smtp_error)}") from None
    except (OSError, IndexError, ssl.SSLError, smtplib.SMTPException) as exc:
        raise SendTestError(f"{target}: {exc}") from None
    return target
