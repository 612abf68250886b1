"""What policyd builds from the Config: the store and the checkers the pipeline calls.

Run in the process that uses them (after any fork): connections and threads do not survive
a fork.
"""

from __future__ import annotations

import logging

from policyd.mailbox_probe import MailboxProber
from postwarden.config import Config
from postwarden.daemon.startup import StartupError
from postwarden.dns.resolver import make_resolver
from postwarden.policy.dnsbl import DnsblChecker
from postwarden.policy.greylisting import LargeSenders, LargeSendersError, load_large_senders
from postwarden.policy.live_lists import LiveLists
from postwarden.policy.spf_check import SpfChecker
from postwarden.store.base import Store, StoreError

log = logging.getLogger("postwarden.policyd")


def open_store_for(cfg: Config) -> Store:
    """The store, opened in the process that uses it (after any fork)."""
    from postwarden.store import open_store
    from postwarden.store.sqlite import SqliteStore

    try:
        store = open_store(cfg.store.url, timeout=cfg.store.timeout)
    except (StoreError, ValueError) as exc:
        raise StartupError(str(exc)) from None
    if isinstance(store, SqliteStore):
        # Greylist writes batched every few ms: an autocommit per request cost more CPU
        # than the rest of the request, and workers queued on the file's write lock.
        store.enable_write_behind()
    return store


Checkers = tuple[DnsblChecker | None, SpfChecker | None, LargeSenders]


def build_checkers(cfg: Config) -> Checkers:
    """The DNSBL and SPF checkers and the large-senders list the config asks for."""
    dnsbl_checker: DnsblChecker | None = None
    spf_checker: SpfChecker | None = None
    if cfg.dnsbl.enabled:
        dnsbl_checker = DnsblChecker(cfg.dnsbl, make_resolver(cfg.dns))
    if cfg.spf.enabled:
        # The receiver= of Received-SPF names this host, as RFC 7208 section 9.1 suggests.
        spf_checker = SpfChecker(cfg.spf, cfg.dns, receiver=cfg.mail.hostname)
    try:
        large = load_large_senders(cfg.greylisting.large_senders_file)
    except LargeSendersError as exc:
        if spf_checker is not None:
            spf_checker.close()
        raise StartupError(f"greylisting.large_senders_file: {exc}") from None
    return dnsbl_checker, spf_checker, large


async def load_live_lists(store: Store) -> LiveLists:
    """The permitted/forbidden lists as the store has them now (empty if it is unreachable:
    the refresher fills them once it answers)."""
    lists = LiveLists()
    try:
        await lists.reload(store)
    except (StoreError, TimeoutError, OSError) as exc:
        log.warning("lists: store unreachable at start, starting with empty lists: %s", exc)
    return lists


def mailbox_prober_for(cfg: Config) -> MailboxProber | None:
    """The LMTP prober of the `mailboxes` map, when `policyd.mailbox_lmtp` is set.

    One per worker (its own pooled LMTP connections), made after the fork.
    """
    if cfg.policyd.mailbox_lmtp is None:
        return None
    return MailboxProber(cfg.policyd.mailbox_lmtp)
