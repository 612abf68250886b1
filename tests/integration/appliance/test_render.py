"""The rendered files are accepted by the real `postfix check`, `postconf` and `doveconf -n`,
and `postwarden config apply` only replaces live files that passed those checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli.commands_config import ApplyError, check_rendered
from postwarden.appliance.render import Layout, render_all, write_rendered
from postwarden.config.loading import parse_config
from postwarden.config.model import Config

POSTWARDEN = str(Path(sys.executable).with_name("postwarden"))

RICH_TOML = """
[network]
trusted = ["127.0.0.0/8", "::1/128", "192.168.10.0/24"]

[policyd]
aliases_listen = "unix:/var/spool/postfix/postwarden/aliases.sock"
mailbox_lmtp = "unix:/run/dovecot/postwarden-lmtp"

[mail]
hostname = "mx.example.com"
helo_name = "out.example.com"
main_domain = "example.com"
additional_domains = ["example.org"]
relay_domains = ["inside.example.com|10.20.30.40", "lan.example.com|mx.lan:2525"]
listen = "all"
ipv6 = true
pop3 = true
pop3s = true
max_connections = 50
max_connections_per_client = 5
idle_timeout = 120
message_size_limit = 10485760
mailbox_quota_mb = 1024
trash_retention_days = 7
copy_incoming_to = "archive@example.com"
copy_outgoing_to = "archive@example.com"
postmaster_address = "ops@example.com"
auth_rate_limit = 5

[mail.sender_grants]
"alice@example.com" = ["sales@example.com", "@example.org"]
"bob@example.com" = ["sales@example.com"]

[mail.tls]
ca = "/etc/ssl/certs/ca-certificates.crt"

[[mail.relays]]
name = "isp"
host = "smtp.isp.example"
port = 587
username = "me"
password_file = "@PASSWORD_FILE@"
starttls = "required"

[[mail.relays]]
name = "secure"
protocol = "smtps"
host = "192.0.2.10"
sender_domains = ["example.org"]

[mail.connection_control]
mode = "accept-all-except"
addresses = ["192.0.2.7", "198.51.100.0:255.255.255.0", "10.1.*", "2001:db8::/32"]
addresses_file = "@IP_LIST@"
"""


def rich_config(tmp_path: Path) -> Path:
    secret = tmp_path / "relay.pw"
    secret.write_text("s3cret\n")
    # The seed's IP list import format.
    ip_list = tmp_path / "ips.txt"
    ip_list.write_text("192.168.2.0:255.255.255.0\n2001:db8:10ff::ae:44f2\n172.16.*\n")
    path = tmp_path / "postwarden.toml"
    text = RICH_TOML.replace("@PASSWORD_FILE@", str(secret)).replace("@IP_LIST@", str(ip_list))
    path.write_text(text)
    return path


def load(path: Path) -> Config:
    import tomllib

    return parse_config(tomllib.loads(path.read_text()), path)


def staged(tmp_path: Path, config: Config) -> Path:
    staging = tmp_path / "staging"
    write_rendered(render_all(config, Layout.debian()), staging)
    tmp_path.chmod(0o755)  # postfix check's helpers drop privileges
    return staging


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


@pytest.mark.parametrize("rich", [False, True], ids=["empty-config", "every-setting"])
def test_rendered_postfix_passes_postfix_check_without_warnings(tmp_path: Path, rich: bool) -> None:
    config = load(rich_config(tmp_path)) if rich else Config()
    staging = staged(tmp_path, config)
    done = run(["postfix", "-c", str(staging / "postfix"), "check"])
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr
    # postconf names every unknown (misspelt) parameter as "unused parameter".
    shown = run(["postconf", "-c", str(staging / "postfix"), "-n"])
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr == "", shown.stderr
    # And the master.cf services parse.
    services = run(["postconf", "-c", str(staging / "postfix"), "-M"])
    assert services.returncode == 0 and services.stderr == "", services.stderr
    if rich:
        assert "relay_isp" in services.stdout and "relay_secure" in services.stdout
        assert "message_size_limit = 10485760" in shown.stdout
        # Host-named next hops (lan.example.com|mx.lan) may come from /etc/hosts too.
        assert "smtp_host_lookup = dns, native" in shown.stdout
        # With mail.tls.ca, the mandatory-TLS relays (STARTTLS required, smtps) verify.
        per_service = run(["postconf", "-c", str(staging / "postfix"), "-P"])
        assert per_service.returncode == 0 and per_service.stderr == "", per_service.stderr
        for relay in ("relay_isp", "relay_secure"):
            assert f"{relay}/unix/smtp_tls_security_level = verify" in per_service.stdout
        # Postfix's own cidr lookup finds a client listed only in the imported file.
        table = f"cidr:{staging / 'postfix' / 'client_access'}"
        found = run(["postmap", "-q", "172.16.9.9", table])
        assert found.stdout.startswith("REJECT 5.7.1"), (found.stdout, found.stderr)
        # The live maps are named as chrooted Postfix daemons reach them.
        assert (
            "virtual_mailbox_maps = socketmap:unix:postwarden/aliases.sock:mailboxes"
            in shown.stdout
        )
        _check_hardening_tables(staging / "postfix")


def _lookup(key: str, table: str) -> str:
    found = run(["postmap", "-q", key, table])
    assert found.stderr == "", found.stderr
    return found.stdout.strip()


def _check_hardening_tables(postfix: Path) -> None:
    """Postfix's own lookups answer the rendered hardening tables as main.cf expects."""
    literals = f"regexp:{postfix / 'address_literals'}"
    assert _lookup("anything@[10.0.0.1]", literals).startswith("550 5.1.2 Address literals")
    assert _lookup("x@[IPv6:2001:db8::1]", literals).startswith("550 5.1.2")
    assert _lookup("anything@example.com", literals) == ""
    forged = f"regexp:{postfix / 'local_sender_domains'}"
    assert _lookup("Bob@Example.COM", forged).startswith("550 5.7.1 Sender address in our own")
    assert _lookup("bob@example.org", forged).startswith("550 5.7.1")
    assert _lookup("bob@sub.example.com", forged) == ""
    assert _lookup("bob@example.com.evil.test", forged) == ""
    # Who owns a sender: itself, the grants (by address and by whole domain), as one union.
    owners = (
        f"unionmap:{{regexp:{postfix / 'sender_identity'}, "
        f"texthash:{postfix / 'sender_grants'}, regexp:{postfix / 'sender_domain_grants'}}}"
    )
    assert _lookup("sales@example.com", owners) == (
        "sales@example.com,alice@example.com,bob@example.com"
    )
    assert _lookup("anyone@example.org", owners) == "anyone@example.org,alice@example.com"
    assert _lookup("anyone@sub.example.org", owners) == "anyone@sub.example.org"
    # Postfix splits owners at blanks and commas: a quoted local part holding a login names
    # nobody (else alice could send as "x alice@example.com y"@bigbank.example).
    assert _lookup('"x alice@example.com y"@bigbank.example', owners) == ""
    assert _lookup('"x,alice@example.com"@bigbank.example', owners) == ""
    aliases = f"texthash:{postfix / 'postmaster_aliases'}"
    assert _lookup("abuse@example.org", aliases) == "ops@example.com"


@pytest.mark.parametrize("rich", [False, True], ids=["empty-config", "every-setting"])
def test_rendered_dovecot_passes_doveconf(tmp_path: Path, rich: bool) -> None:
    config = load(rich_config(tmp_path)) if rich else Config()
    staging = staged(tmp_path, config)
    done = run(["doveconf", "-n", "-c", str(staging / "dovecot" / "dovecot.conf")])
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "Fatal" not in done.stderr, done.stderr
    if rich:
        assert "quota_rule = *:storage=1024M" in done.stdout
        # doveconf normalises the unit (7d may come back as "1 weeks").
        assert re.search(r"autoexpunge = (7 days|1 weeks)", done.stdout), done.stdout


def test_real_postfix_check_refusal_becomes_apply_error(tmp_path: Path) -> None:
    staging = staged(tmp_path, Config())
    main_cf = staging / "postfix" / "main.cf"
    main_cf.write_text(main_cf.read_text() + "\nqueue_directory = /nonexistent/queue\n")
    with pytest.raises(ApplyError, match=r"postfix .* refused"):
        check_rendered(staging)


def test_real_doveconf_refusal_becomes_apply_error(tmp_path: Path) -> None:
    staging = staged(tmp_path, Config())
    conf = staging / "dovecot" / "dovecot.conf"
    conf.write_text(conf.read_text() + "\nno_such_setting = 1\n")
    with pytest.raises(ApplyError, match=r"doveconf .* refused"):
        check_rendered(staging)


def apply(
    tmp_path: Path, config: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            POSTWARDEN,
            "--config",
            str(config),
            "config",
            "apply",
            "--postfix-dir",
            str(tmp_path / "live" / "postfix"),
            "--dovecot-dir",
            str(tmp_path / "live" / "dovecot"),
            "--no-reload",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )


def test_apply_installs_checked_files(tmp_path: Path) -> None:
    config = rich_config(tmp_path)
    live = tmp_path / "live" / "postfix"
    live.mkdir(parents=True)
    (live / "main.cf").write_text("# the old configuration\n")
    done = apply(tmp_path, config)
    assert done.returncode == 0, done.stderr
    expected = render_all(load(config), Layout.debian())
    assert (live / "main.cf").read_text() == expected["postfix/main.cf"]
    assert (tmp_path / "live" / "dovecot" / "dovecot.conf").read_text() == (
        expected["dovecot/dovecot.conf"]
    )
    assert (live / "relay_passwords").stat().st_mode & 0o777 == 0o600


def test_failed_check_leaves_live_configuration_untouched(tmp_path: Path) -> None:
    config = rich_config(tmp_path)
    live = tmp_path / "live" / "postfix"
    live.mkdir(parents=True)
    (live / "main.cf").write_text("# the old configuration\n")
    # A doveconf that refuses everything stands in for a Dovecot that rejects the new file.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "doveconf"
    fake.write_text("#!/bin/sh\necho 'doveconf: Fatal: Error in configuration file' >&2\nexit 89\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    done = apply(tmp_path, config, env)
    assert done.returncode == 1
    assert "not applied" in done.stderr and "Error in configuration file" in done.stderr
    assert (live / "main.cf").read_text() == "# the old configuration\n"
    assert not (tmp_path / "live" / "dovecot").exists()


def test_config_check_names_file_key_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[mail]\nrelay_domains = ["inside.example.com"]\n')
    done = run([POSTWARDEN, "--config", str(bad), "config", "check"])
    assert done.returncode == 2
    assert f"{bad}: mail.relay_domains[0]" in done.stderr
    assert "must look like" in done.stderr
    good = run([POSTWARDEN, "--config", str(rich_config(tmp_path)), "config", "check"])
    assert good.returncode == 0 and good.stdout.startswith("OK"), good.stderr
