"""The socketmap tables policyd serves Postfix: `aliases` (forwarding) and `mailboxes`.

Postfix asks `virtual_alias_maps = socketmap:unix:/path:aliases` at delivery time, so an
alias changed in the store applies to the next message without a reload. It asks
`virtual_mailbox_maps = socketmap:unix:/path:mailboxes` at RCPT: each lookup asks Dovecot
over LMTP (policyd/mailbox_probe.py), so an unknown or deleted mailbox is refused at once
and nothing is accepted that would bounce later.

The netstring framing is socketmap_codec.py; this module answers the requests:
`answer()` is the pure-ish lookup, `handle_socketmap_connection()` the asyncio adapter that
the policy server starts as an extra listener. Besides the codec's own refusals:

| input                                   | what happens                                   |
| --------------------------------------- | ---------------------------------------------- |
| unknown map name                        | `PERM` reply                                   |
| aliases: store unreachable / slow, key  | the last answer the store gave for that key    |
|   answered before (LastKnownAliases)    |   (`OK <targets>` or `NOTFOUND`)               |
| aliases: store unreachable / slow, key  | `TEMP` / `TIMEOUT`: Postfix defers, never      |
|   never answered before                 |   bounces                                      |
| mailboxes: address Dovecot knows        | `OK <address>`                                 |
| mailboxes: address Dovecot does not know | `NOTFOUND` (Postfix: 550 5.1.1 User unknown)  |
| mailboxes: `@domain`, bare local part   | `NOTFOUND`, Dovecot is not asked               |
| mailboxes: not a plain address (CR, LF, | `NOTFOUND`, Dovecot is not asked (nothing      |
|   space, NUL, quotes, over 320 bytes)   |   untrusted reaches the LMTP stream)           |
| mailboxes: Dovecot down, slow, 4xx      | `TEMP <reason>` (Postfix: 451 4.3.0), one log  |
|   or garbage                            |   line per kind of failure                     |
| mailboxes without policyd.mailbox_lmtp  | `PERM` (not served), logged once               |

A closed connection makes Postfix log a lookup error and defer the message, so a broken
client never loses mail.

Contract: docs/ARCHITECTURE.md, "What each daemon owns".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol, TypeVar

from policyd.mailbox_probe import MailboxStatus, ProbeResult, probe_address
from policyd.socketmap_codec import (
    MAX_REASON,
    MAX_REPLY_LENGTH,
    NOT_FOUND,
    DecodeResult,
    MalformedRequest,
    NetstringDecoder,
    SocketmapReply,
    SocketmapViolation,
)
from postwarden.store.base import StoreError
from postwarden.syntax.untrusted_text import sanitise

log = logging.getLogger("postwarden.socketmap")
_V = TypeVar("_V")

# The map name Postfix is configured with: socketmap:unix:/path:aliases.
ALIASES_MAP = "aliases"
# The map for virtual_mailbox_maps = socketmap:unix:/path:mailboxes.
MAILBOXES_MAP = "mailboxes"
# A failure that goes on is logged again at most this often (with the count in between).
REPEAT_LOG_INTERVAL = 300.0
# A lookup that takes longer is answered TIMEOUT (Postfix defers the message and retries).
LOOKUP_TIMEOUT = 5.0
# Postfix closes idle socketmap connections itself; this only reaps clients that vanished.
IDLE_TIMEOUT = 300.0
READ_SIZE = 4096
# The aliases map keeps the last answer for at most this many keys that are aliases, and as
# many again that are not (LastKnownAliases); the key answered least recently goes first.
LAST_KNOWN_KEYS = 100_000
# Longer keys are not remembered: no address is longer (RFC 5321: 64 + "@" + 255), and it
# bounds what the not-found half holds (Postfix asks it for any recipient a client names).
LAST_KNOWN_KEY_LENGTH = 320


class AliasSource(Protocol):
    """What the socketmap needs from the store (postwarden.store.base.Store has it)."""

    async def get_alias(self, address: str) -> list[str] | None: ...


def alias_reply(targets: list[str] | None) -> SocketmapReply:
    """The reply for one alias lookup result."""
    if not targets:
        return NOT_FOUND
    data = ",".join(targets)
    if len(data) + len("OK ") > MAX_REPLY_LENGTH:
        return SocketmapReply("PERM", f"alias has too many targets ({len(targets)})")
    return SocketmapReply("OK", data)


class MailboxProbe(Protocol):
    """What the mailboxes map needs (policyd.mailbox_probe.MailboxProber has it)."""

    async def probe(self, address: str) -> ProbeResult: ...


class FailureLog:
    """One WARNING when a kind of failure starts and one INFO when lookups work again;
    repeats in between are counted and logged again at most every REPEAT_LOG_INTERVAL.

    `fallback` (the aliases map) says what lookups are answered with meanwhile instead of
    TEMP; `failed(..., served=True)` counts a lookup it answered.
    """

    def __init__(
        self,
        what: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        fallback: Callable[[], str] | None = None,
    ) -> None:
        self.what = what
        self._clock = clock
        self._fallback = fallback
        self._active: dict[str, list[float]] = {}  # kind -> [count, last logged]
        self._served = 0  # lookups answered by the fallback during this failure

    def failed(self, kind: str, detail: str, *, served: bool = False) -> None:
        now = self._clock()
        self._served += served
        entry = self._active.get(kind)
        if entry is None:
            self._active[kind] = [1, now]
            log.warning(
                "socketmap: %s: %s: %s; %s until it works again",
                self.what,
                kind,
                sanitise(detail, MAX_REASON),
                "answering TEMP (Postfix defers)" if self._fallback is None else self._fallback(),
            )
            return
        entry[0] += 1
        if now - entry[1] >= REPEAT_LOG_INTERVAL:
            entry[1] = now
            if self._fallback is None:
                so_far = f"{int(entry[0])} lookups answered TEMP so far"
            else:
                so_far = (
                    f"{int(entry[0])} lookups failed so far, {self._served} lookups answered "
                    "from the last known answers"
                )
            log.warning(
                "socketmap: %s: still %s: %s: %s",
                self.what,
                kind,
                so_far,
                sanitise(detail, MAX_REASON),
            )

    def succeeded(self) -> None:
        if self._active:
            counts = ", ".join(f"{kind}: {int(e[0])}" for kind, e in self._active.items())
            if self._fallback is None:
                log.info(
                    "socketmap: %s: works again (lookups answered TEMP: %s)", self.what, counts
                )
            else:
                log.info(
                    "socketmap: %s: works again (lookups failed: %s; answered from the last "
                    "known answers: %d)",
                    self.what,
                    counts,
                    self._served,
                )
            self._active.clear()
            self._served = 0


class LastKnownAliases:
    """The last answer the store gave for each alias key, for when it cannot be asked.

    Postfix resolves every address through the aliases map, so a store outage would defer
    all mail (451 4.3.0 at RCPT, cleanup deferring), and worse: verify(8) posts one probe
    per address per PROBE_TTL (1000 s, postfix/src/verify/verify.c); a probe that cleanup
    refused leaves the address "probe in progress", so RCPT gets 450 4.1.1 unverified
    address for ~17 minutes after the store is back. With this, an address answered before
    the outage resolves as it did; only a key never answered gets TEMP/TIMEOUT.

    What it trades: an alias changed in the store just before the outage is served as it
    was until the store answers again, and never longer: every answer the store gives
    replaces the remembered one, and nothing here is served while the store answers.
    Aliases (OK) and keys that are not aliases (NOTFOUND: every plain mailbox address, the
    "@domain" and local-part variants Postfix also asks) are kept apart, each bounded to
    `limit` keys, least recently answered evicted first, so a client naming many unknown
    recipients can push out only other NOTFOUND answers, never an alias. At the default
    of 100,000 keys of at most 320 bytes that is some tens of MB per process at worst.
    """

    def __init__(self, limit: int = LAST_KNOWN_KEYS) -> None:
        self.limit = limit
        self._found: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._not_found: OrderedDict[str, None] = OrderedDict()
        self.served = 0  # answers given from here since the start

    def __len__(self) -> int:
        return len(self._found) + len(self._not_found)

    def remember(self, key: str, targets: list[str] | None) -> None:
        """Keep the store's answer for `key` (no targets: not an alias)."""
        if len(key) > LAST_KNOWN_KEY_LENGTH:
            return
        if targets:
            self._not_found.pop(key, None)
            _keep(self._found, key, tuple(targets), self.limit)
        else:
            self._found.pop(key, None)
            _keep(self._not_found, key, None, self.limit)

    def recall(self, key: str) -> SocketmapReply | None:
        """The reply the last answer for `key` gave, or None if it was never answered."""
        if key in self._found:
            reply = alias_reply(list(self._found[key]))
        elif key in self._not_found:
            reply = NOT_FOUND
        else:
            return None
        self.served += 1
        return reply


def _keep(table: OrderedDict[str, _V], key: str, value: _V, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


class AliasMap:
    """The `aliases` map's state across lookups: the last known answers, the failure log."""

    def __init__(
        self, *, limit: int = LAST_KNOWN_KEYS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.known = LastKnownAliases(limit)
        self.failures = FailureLog("aliases", clock, fallback=self._fallback)

    def _fallback(self) -> str:
        return (
            f"answering from the last known answers ({len(self.known)} keys; TEMP for a key "
            "never answered)"
        )


class MailboxMap:
    """The `mailboxes` map: does this address have a mailbox? Asked of Dovecot each time.

    No cache here: a deleted user is NOTFOUND, and a new one OK, as soon as Dovecot sees
    the users file change (it re-checks the file at most once a second).
    """

    def __init__(
        self,
        prober: MailboxProbe | None,
        *,
        local_domains: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prober = prober
        # Our mailbox domains (mail.local_domains): alias targets there must exist.
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.failures = FailureLog("mailboxes", clock)
        self._clock = clock
        self._unserved_logged = False
        self._refused = 0
        self._refused_logged = -REPEAT_LOG_INTERVAL

    async def lookup(self, key: str) -> SocketmapReply:
        if self.prober is None:
            if not self._unserved_logged:
                self._unserved_logged = True
                log.warning(
                    "socketmap: map %r asked for but policyd.mailbox_lmtp is not set: "
                    "answering PERM (set it, or remove the map from virtual_mailbox_maps)",
                    MAILBOXES_MAP,
                )
            return SocketmapReply("PERM", "mailboxes map not served: policyd.mailbox_lmtp unset")
        # Postfix also asks "@domain" (catch-all) and, for some domains, the bare local
        # part: neither is a mailbox. Anything else not plain is never written to Dovecot.
        if key.startswith("@") or "@" not in key:
            return NOT_FOUND
        address = probe_address(key)
        if address is None:
            self._log_refused(key)
            return NOT_FOUND
        result = await self.prober.probe(address)
        if result.status is MailboxStatus.TEMPORARY:
            self.failures.failed(result.kind, result.detail)
            return SocketmapReply("TEMP", f"mailbox lookup in Dovecot failed: {result.kind}")
        self.failures.succeeded()
        if result.status is MailboxStatus.EXISTS:
            return SocketmapReply("OK", address)
        return NOT_FOUND

    def _log_refused(self, key: str) -> None:
        self._refused += 1
        now = self._clock()
        if now - self._refused_logged >= REPEAT_LOG_INTERVAL:
            self._refused_logged = now
            log.info(
                "socketmap: mailboxes: %d keys that are not plain addresses answered NOTFOUND "
                "without asking Dovecot (latest %r)",
                self._refused,
                sanitise(key, MAX_REASON),
            )
            self._refused = 0


async def answer(
    request: DecodeResult,
    store: AliasSource,
    timeout: float = LOOKUP_TIMEOUT,
    mailboxes: MailboxMap | None = None,
    aliases: AliasMap | None = None,
) -> SocketmapReply:
    """The reply to one request. A store failure is answered from `aliases`' last known
    answers, else TEMP/TIMEOUT so Postfix retries (without `aliases`: a map of its own that
    remembers nothing)."""
    if isinstance(request, MalformedRequest):
        return SocketmapReply("PERM", "request is not '<map name> <key>'")
    if request.name == MAILBOXES_MAP:
        if mailboxes is None:
            return SocketmapReply("PERM", "mailboxes map not served")
        try:
            return await asyncio.wait_for(mailboxes.lookup(request.key), timeout)
        except TimeoutError:
            mailboxes.failures.failed("timeout", f"lookup took over {timeout:.1f}s")
            return SocketmapReply("TIMEOUT", "Dovecot did not answer in time")
    if request.name != ALIASES_MAP:
        return SocketmapReply("PERM", f"unknown map {request.name!r}")
    if aliases is None:
        aliases = AliasMap(limit=0)
    # Postfix folds the case of lookup keys; aliases are stored lower-cased.
    key = request.key.strip().lower()
    try:
        targets = await asyncio.wait_for(store.get_alias(key), timeout)
        if targets and mailboxes is not None and mailboxes.prober is not None:
            targets = await asyncio.wait_for(
                _delivering_targets(targets, store, mailboxes), timeout
            )
    except TimeoutError:
        failure = ("timeout", f"lookup took over {timeout:.1f}s")
        fallback = SocketmapReply("TIMEOUT", "store did not answer in time")
    except StoreError as exc:
        failure = ("store unavailable", str(exc))
        fallback = SocketmapReply("TEMP", "store unavailable")
    except _TargetUnknown as exc:
        return exc.reply
    else:
        aliases.failures.succeeded()
        aliases.known.remember(key, targets)
        return alias_reply(targets)
    known = aliases.known.recall(key)
    aliases.failures.failed(*failure, served=known is not None)
    return fallback if known is None else known


class _TargetUnknown(Exception):
    """Whether an alias target exists could not be told (Dovecot did not answer)."""

    def __init__(self, reply: SocketmapReply) -> None:
        self.reply = reply


async def _delivering_targets(
    targets: list[str], store: AliasSource, mailboxes: MailboxMap
) -> list[str]:
    """The targets mail can be delivered to: a target in our mailbox domains stays only
    while it is a mailbox or another alias, so an alias whose mailbox was deleted expands to
    nothing and Postfix refuses it at RCPT instead of accepting mail it would bounce."""
    kept = []
    for target in targets:
        if target.rpartition("@")[2].lower() not in mailboxes.local_domains:
            kept.append(target)  # outside: delivered (or bounced) by its own server
            continue
        reply = await mailboxes.lookup(target)
        if reply.status == "OK" or await store.get_alias(target.lower()):
            kept.append(target)
        elif reply.status != "NOTFOUND":
            raise _TargetUnknown(reply)
    return kept


async def handle_socketmap_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    store: AliasSource,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    lookup_timeout: float = LOOKUP_TIMEOUT,
    mailboxes: MailboxMap | None = None,
    aliases: AliasMap | None = None,
) -> None:
    """Serve socketmap requests on one connection until the client closes it."""
    decoder = NetstringDecoder()
    try:
        while True:
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE), idle_timeout)
            except TimeoutError:
                return
            if not data:
                return
            try:
                requests = decoder.feed(data)
            except SocketmapViolation as exc:
                log.warning("socketmap: closing connection: %s", exc)
                return
            for request in requests:
                reply = await answer(request, store, lookup_timeout, mailboxes, aliases)
                writer.write(reply.encode())
            if requests:
                await writer.drain()
    except (ConnectionError, OSError) as exc:
        log.info("socketmap: connection lost: %s", exc)
    except Exception:
        # The daemon never dies of a request: log once with the traceback, drop the client.
        log.exception("socketmap: unexpected error; connection closed")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def socketmap_handler(
    store: AliasSource,
    mailboxes: MailboxProbe | None = None,
    local_domains: Iterable[str] = (),
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A client_connected_cb for asyncio.start_unix_server / start_server; `mailboxes`
    (a MailboxProber, or None when policyd.mailbox_lmtp is unset) serves that map and
    checks alias targets in `local_domains`. The aliases' last known answers are shared by
    every connection of this process."""
    mailbox_map = MailboxMap(mailboxes, local_domains=local_domains)
    alias_map = AliasMap()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle_socketmap_connection(
            reader, writer, store, mailboxes=mailbox_map, aliases=alias_map
        )

    return serve
