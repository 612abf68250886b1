"""`postwarden dkim keygen|dns|check`: make keys, print their DNS records, check DNS has them.

Key rotation: `dkim keygen DOMAIN --selector NEW`, publish the printed record, add the new
`[[dkim.keys]]` entry AFTER the old one (the last entry per domain and algorithm signs),
restart milterd; once mail signed with the old selector has been delivered, remove the old
entry and its DNS record. `dkim dns`/`dkim check` cover every configured selector.
"""

from __future__ import annotations

import json
from typing import Any

import click
import dns.exception
import dns.resolver
from pydantic import ValidationError

from cli.context import EXIT_FAILURE, EXIT_USAGE, CliContext, pass_cli
from postwarden.config.model import DkimKey
from postwarden.dkim.keys import (
    DEFAULT_RSA_BITS,
    Algorithm,
    DkimKeyError,
    SigningKey,
    generate_key,
    key_path,
    load_key,
    normalise_domain,
    parse_txt_record,
    quoted_txt,
    split_txt,
    txt_record,
    write_key,
)
from postwarden.dns.resolver import make_sync_resolver
from postwarden.syntax.untrusted_text import sanitise


@click.group("dkim")
def dkim_group() -> None:
    """DKIM keys: generate, print the DNS record, check that DNS publishes it."""


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


@dkim_group.command("keygen")
@click.argument("domain")
@click.option("--selector", default="s1", show_default=True, help="DKIM selector (s=).")
@click.option(
    "--algorithm",
    type=click.Choice(["rsa", "ed25519"]),
    default="rsa",
    show_default=True,
    help="rsa (rsa-sha256) or ed25519 (ed25519-sha256).",
)
@click.option(
    "--bits",
    type=click.IntRange(1024, 8192),
    default=DEFAULT_RSA_BITS,
    show_default=True,
    help="RSA key size.",
)
@click.option(
    "--directory",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to write the key (default dkim.key_directory).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_cli
def keygen(
    cli_ctx: CliContext,
    domain: str,
    selector: str,
    algorithm: str,
    bits: int,
    directory: str | None,
    as_json: bool,
) -> None:
    """Write a new private key (mode 0600) and print its DNS record and config entry."""
    from pathlib import Path

    try:  # the config's own rules: the key file name and the DNS name are built from these
        entry = DkimKey(domain=domain, selector=selector, key=Path("unused"))
    except ValidationError as exc:
        click.echo(f"dkim keygen: {exc.errors()[0]['msg']}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    domain = entry.domain
    target_dir = Path(directory) if directory else cli_ctx.config().dkim.key_directory
    full_algorithm: Algorithm = "rsa-sha256" if algorithm == "rsa" else "ed25519-sha256"
    key = generate_key(full_algorithm, bits)
    path = key_path(target_dir, domain, selector)
    try:
        write_key(key, path)
    except DkimKeyError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(EXIT_FAILURE) from None
    value = txt_record(key)
    name = f"{selector}._domainkey.{domain}"
    snippet = "\n".join(
        [
            "[[dkim.keys]]",
            f"domain = {_toml_string(domain)}",
            f"selector = {_toml_string(selector)}",
            f"algorithm = {_toml_string(full_algorithm)}",
            f"key = {_toml_string(str(path.resolve()))}",
        ]
    )
    if as_json:
        out = {"key": str(path), "name": name, "value": value, "strings": split_txt(value)}
        click.echo(json.dumps({**out, "config": snippet}, indent=2))
        return
    click.echo(f"Wrote {path} (mode 0600).")
    click.echo("\nPublish this TXT record:")
    click.echo(f"{name}. IN TXT ( {quoted_txt(value)} )")
    click.echo("\nAdd to postwarden.toml (after any older key of this domain: the last one signs):")
    click.echo(snippet)


def _configured(cli_ctx: CliContext, domain: str, selector: str | None) -> list[DkimKey]:
    entries = [
        k
        for k in cli_ctx.config().dkim.keys
        if normalise_domain(k.domain) == domain and (selector is None or k.selector == selector)
    ]
    if not entries:
        which = f" with selector {selector}" if selector else ""
        click.echo(f"no [[dkim.keys]] entry for {domain}{which} in the config", err=True)
        raise SystemExit(EXIT_FAILURE)
    return entries


def _load(entry: DkimKey) -> SigningKey:
    try:
        return load_key(entry)
    except DkimKeyError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(EXIT_FAILURE) from None


@dkim_group.command("dns")
@click.argument("domain")
@click.option("--selector", default=None, help="Only this selector (default: every one).")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@pass_cli
def dns_record(cli_ctx: CliContext, domain: str, selector: str | None, as_json: bool) -> None:
    """Print the TXT record of each configured key: one value, and <=255-byte strings."""
    domain = normalise_domain(domain)
    records: list[dict[str, Any]] = []
    for entry in _configured(cli_ctx, domain, selector):
        key = _load(entry)
        value = key.txt_record()
        records.append(
            {
                "name": key.record_name,
                "selector": key.selector,
                "algorithm": key.algorithm,
                "value": value,
                "strings": split_txt(value),
                "quoted": quoted_txt(value),
            }
        )
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    for record in records:
        click.echo(f"{record['name']} ({record['algorithm']})")
        click.echo(f"  as one value:\n    {record['value']}")
        click.echo(f"  as strings of at most 255 bytes:\n    {record['quoted']}")


def _published(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    answer = resolver.resolve(name + ".", "TXT", search=False)
    return [b"".join(r.strings).decode("ascii", "replace") for r in answer]


@dkim_group.command("check")
@click.argument("domain")
@click.option("--selector", default=None, help="Only this selector (default: every one).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@pass_cli
def check(cli_ctx: CliContext, domain: str, selector: str | None, as_json: bool) -> None:
    """Look up selector._domainkey.DOMAIN and say whether it publishes the key on disk."""
    domain = normalise_domain(domain)
    entries = _configured(cli_ctx, domain, selector)
    resolver = make_sync_resolver(cli_ctx.config().dns)
    results: list[dict[str, str]] = []
    for entry in entries:
        key = _load(entry)
        expected = parse_txt_record(key.txt_record())
        try:
            published = _published(resolver, key.record_name)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            status, detail = "missing", "no TXT record"
        except dns.exception.DNSException as exc:
            status, detail = "error", f"lookup failed: {exc}"
        else:
            tags = [parse_txt_record(v) for v in published]
            if any(
                t.get("p") == expected["p"] and t.get("k", "rsa") == expected["k"] for t in tags
            ):
                status, detail = "ok", "DNS publishes the key on disk"
            else:
                status, detail = (
                    "mismatch",
                    # Text from DNS: no control characters reach the terminal.
                    "DNS publishes a different key: " + sanitise("; ".join(published), 2000),
                )
        results.append({"name": key.record_name, "status": status, "detail": detail})
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for item in results:
            click.echo(f"{item['status'].upper():8} {item['name']}: {item['detail']}")
    if any(item["status"] != "ok" for item in results):
        raise SystemExit(EXIT_FAILURE)


COMMANDS: list[click.Command] = [dkim_group]
