"""`postwarden explain`: what policyd would answer for one recipient, and why, writing nothing."""

from __future__ import annotations

import json
import time

import click

from cli.context import EXIT_USAGE, CliContext, pass_cli
from policyd.policy_codec import encode_verdict
from postwarden.policy.explanation import explanation_json, explanation_lines
from postwarden.policy.live_lists import LiveLists
from postwarden.policy.pipeline import Explanation, Pipeline
from postwarden.policy.request import PolicyRequest
from postwarden.store.base import Store
from postwarden.syntax.networks import NetworkSyntaxError, parse_ip_address


@click.command("explain")
@click.option("--client", "client_address", required=True, help="The client's IP address.")
@click.option("--client-name", default="unknown", show_default=True, help="Its verified name.")
@click.option("--helo", default="", help="The name it gave in HELO/EHLO.")
@click.option("--from", "sender", required=True, help='MAIL FROM ("" for the null sender).')
@click.option("--to", "recipient", required=True, help="RCPT TO.")
@click.option("--sasl", "sasl_username", default="", help="The login, for a logged-in client.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_cli
def explain(
    cli_ctx: CliContext,
    client_address: str,
    client_name: str,
    helo: str,
    sender: str,
    recipient: str,
    sasl_username: str,
    as_json: bool,
) -> None:
    """Run the whole filtering order for one RCPT as policyd would, and print each step.

    Lists, DNSBL, SPF and the greylist records are read exactly as for a real request
    (the same config, store and DNS); no greylist record is written, so asking changes
    nothing of what policyd answers next.
    """
    try:
        address = str(parse_ip_address(client_address))
    except NetworkSyntaxError:
        click.echo(f"error: --client {client_address!r} is not an IP address", err=True)
        raise SystemExit(EXIT_USAGE) from None
    cfg = cli_ctx.config()
    request = PolicyRequest(
        {
            "request": "smtpd_access_policy",
            "protocol_state": "RCPT",
            "protocol_name": "ESMTP",
            "client_address": address,
            "client_name": client_name,
            "reverse_client_name": client_name,
            "helo_name": helo,
            "sender": sender,
            "recipient": recipient,
            "sasl_username": sasl_username,
            "instance": "postwarden-explain",
        }
    )

    async def run(store: Store) -> Explanation:
        # Imported here: only this command pays for the DNS and SPF machinery.
        from policyd.wiring import build_checkers
        from postwarden.daemon.startup import StartupError

        lists = LiveLists()
        await lists.reload(store)  # a store failure ends the command (exit 1, why)
        try:
            dnsbl_checker, spf_checker, large = build_checkers(cfg)
        except StartupError as exc:
            click.echo(f"error: {exc}", err=True)
            raise SystemExit(EXIT_USAGE) from None
        try:
            pipeline = Pipeline(cfg, store, lists, dnsbl_checker, spf_checker, large)
            return await pipeline.explain(request)
        finally:
            if spf_checker is not None:
                spf_checker.close()

    explanation = cli_ctx.with_store(run)
    reply = encode_verdict(explanation.decision.verdict).decode().strip()
    if as_json:
        click.echo(json.dumps(explanation_json(explanation, reply), indent=2))
        return
    for line in explanation_lines(explanation, time.time(), reply):
        click.echo(line)


COMMANDS: list[click.Command] = [explain]
