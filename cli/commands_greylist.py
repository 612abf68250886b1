"""`postwarden greylist`: inspect and edit greylisting state (triplets, client networks)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import click

from cli.context import EXIT_USAGE, CliContext, pass_cli
from postwarden.policy.greylisting import (
    InvalidClientAddress,
    client_network,
    normalise_sender,
    triplet_key,
)
from postwarden.policy.records import ClientNetworkRecord, TripletRecord
from postwarden.store.base import Store


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


@click.group("greylist")
def greylist_group() -> None:
    """Greylisting state: who waits, who passed, which networks are auto-whitelisted."""


@greylist_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@pass_cli
def show(cli_ctx: CliContext, as_json: bool, limit: int) -> None:
    """Show the newest triplets and client networks."""

    async def read(
        store: Store,
    ) -> tuple[list[tuple[str, TripletRecord]], list[tuple[str, ClientNetworkRecord]]]:
        return await store.greylist_triplets(limit), await store.greylist_client_networks(limit)

    triplets, networks = cli_ctx.with_store(read)
    if as_json:
        data = {
            "triplets": [
                {
                    "key": key,
                    "first_seen": rec.first_seen,
                    "last_seen": rec.last_seen,
                    "passes": rec.passes,
                }
                for key, rec in triplets
            ],
            "client_networks": [
                {"network": net, "passes": rec.passes, "last_seen": rec.last_seen}
                for net, rec in networks
            ],
        }
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"triplets ({len(triplets)}):")
    for key, rec in triplets:
        state = f"passed {rec.passes}x" if rec.passes else "waiting"
        click.echo(f"  {key}  first {_when(rec.first_seen)}  last {_when(rec.last_seen)}  {state}")
    click.echo(f"client networks ({len(networks)}):")
    for net, seen in networks:
        click.echo(f"  {net}  passes {seen.passes}  last {_when(seen.last_seen)}")


@greylist_group.command("purge")
@click.option("--all", "purge_all", is_flag=True, help="Forget every triplet.")
@click.option("--expired", is_flag=True, help="Forget records older than expiry (the default).")
@pass_cli
def purge(cli_ctx: CliContext, purge_all: bool, expired: bool) -> None:
    """Forget greylisting state: expired records, or all triplets."""
    if purge_all and expired:
        click.echo("error: use --all or --expired, not both", err=True)
        raise SystemExit(EXIT_USAGE)
    if purge_all:
        deleted = cli_ctx.with_store(lambda store: store.greylist_delete(""))
        click.echo(f"{deleted} triplets deleted")
        return
    expiry = cli_ctx.config().greylisting.expiry
    now = time.time()
    deleted = cli_ctx.with_store(lambda store: store.greylist_purge_expired(now, expiry))
    click.echo(f"{deleted} expired records deleted")


@greylist_group.command("pass")
@click.argument("client_ip")
@click.argument("sender")
@click.argument("recipient")
@pass_cli
def pass_(cli_ctx: CliContext, client_ip: str, sender: str, recipient: str) -> None:
    """Mark a triplet as passed: its next delivery is accepted at once.

    Use "" or "<>" as SENDER for the null sender (bounces).
    """
    cfg = cli_ctx.config().greylisting
    try:
        network = client_network(client_ip, cfg.ipv4_prefix, cfg.ipv6_prefix)
    except InvalidClientAddress as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    key = triplet_key(network, normalise_sender(sender), recipient.strip("<>"))
    now = time.time()

    async def mark(store: Store) -> None:
        record, _ = await store.greylist_lookup(key, network)
        first_seen = record.first_seen if record is not None else now
        passes = max(1, record.passes) if record is not None else 1
        await store.greylist_update(
            key, TripletRecord(first_seen, now, passes), network, None, cfg.expiry
        )

    cli_ctx.with_store(mark)
    click.echo(f"passed: {key}")


COMMANDS: list[click.Command] = [greylist_group]
