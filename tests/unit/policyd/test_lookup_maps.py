"""The socketmap lookup answers (aliases, mailboxes), without sockets."""

from __future__ import annotations

import asyncio
import logging

import pytest

from policyd.lookup_maps import (
    ALIASES_MAP,
    MAILBOXES_MAP,
    REPEAT_LOG_INTERVAL,
    MailboxMap,
    alias_reply,
    answer,
)
from policyd.mailbox_probe import MailboxStatus, ProbeResult
from policyd.socketmap_codec import (
    MAX_REPLY_LENGTH,
    NOT_FOUND,
    MalformedRequest,
    NetstringDecoder,
    SocketmapReply,
    SocketmapRequest,
    encode_netstring,
)
from postwarden.store.base import StoreError


def test_alias_reply_joins_targets_with_commas() -> None:
    assert alias_reply(["j.smith@example.test", "r.johnson@example.test"]) == SocketmapReply(
        "OK", "j.smith@example.test,r.johnson@example.test"
    )
    assert alias_reply(None).status == "NOTFOUND"
    assert alias_reply([]).status == "NOTFOUND"


def test_alias_reply_over_postfix_limit_is_perm() -> None:
    targets = [f"user{i}@example.test" for i in range(MAX_REPLY_LENGTH // 10)]
    assert alias_reply(targets).status == "PERM"


class FakeAliases:
    def __init__(self, aliases: dict[str, list[str]], fail: Exception | None = None) -> None:
        self.aliases = aliases
        self.fail = fail
        self.asked: list[str] = []

    async def get_alias(self, address: str) -> list[str] | None:
        self.asked.append(address)
        if self.fail is not None:
            raise self.fail
        return self.aliases.get(address)


async def test_answer_looks_up_lower_cased_address() -> None:
    store = FakeAliases({"sales@example.test": ["j.smith@example.test"]})
    reply = await answer(SocketmapRequest("aliases", "Sales@Example.TEST"), store)
    assert reply == SocketmapReply("OK", "j.smith@example.test")
    assert store.asked == ["sales@example.test"]


async def test_unknown_address_is_notfound() -> None:
    reply = await answer(SocketmapRequest("aliases", "nobody@example.test"), FakeAliases({}))
    assert reply.encode() == b"9:NOTFOUND ,"


async def test_unknown_map_and_malformed_request_are_perm() -> None:
    assert (await answer(SocketmapRequest("other", "k"), FakeAliases({}))).status == "PERM"
    assert (await answer(MalformedRequest("x"), FakeAliases({}))).status == "PERM"


async def test_store_failure_is_temp_so_postfix_defers() -> None:
    store = FakeAliases({}, fail=StoreError("connection refused"))
    reply = await answer(SocketmapRequest("aliases", "a@example.test"), store)
    assert reply.status == "TEMP"


async def test_slow_store_is_timeout() -> None:
    class Slow:
        async def get_alias(self, address: str) -> list[str] | None:
            await asyncio.get_running_loop().create_future()  # never answers
            return None

    # A timeout of 0 expires at the next loop turn: the test never waits in real time.
    reply = await answer(SocketmapRequest("aliases", "a@example.test"), Slow(), timeout=0)
    assert reply.status == "TIMEOUT"


# --- the mailboxes map (virtual_mailbox_maps), with a fake Dovecot prober ---------------


class FakeProber:
    """Answers like MailboxProber from a set of mailboxes; records what it was asked."""

    def __init__(self, mailboxes: set[str], fail: ProbeResult | None = None) -> None:
        self.mailboxes = mailboxes
        self.fail = fail
        self.asked: list[str] = []

    async def probe(self, address: str) -> ProbeResult:
        self.asked.append(address)
        if self.fail is not None:
            return self.fail
        if address in self.mailboxes:
            return ProbeResult(MailboxStatus.EXISTS)
        return ProbeResult(MailboxStatus.NO_SUCH_USER)


REFUSED = ProbeResult.temporary("cannot connect", "Dovecot LMTP at unix:/x: Connection refused")


async def _mailbox(key: str, prober: FakeProber | None) -> SocketmapReply:
    return await answer(
        SocketmapRequest(MAILBOXES_MAP, key), FakeAliases({}), 1.0, MailboxMap(prober)
    )


async def test_existing_mailbox_is_ok_with_the_address() -> None:
    prober = FakeProber({"alice@example.test"})
    reply = await _mailbox("alice@example.test", prober)
    assert reply.encode() == b"21:OK alice@example.test,"
    assert prober.asked == ["alice@example.test"]


async def test_unknown_mailbox_is_notfound() -> None:
    reply = await _mailbox("nobody@example.test", FakeProber({"alice@example.test"}))
    assert reply.encode() == b"9:NOTFOUND ,"


async def test_dovecot_unreachable_is_temp_with_the_kind_of_failure() -> None:
    reply = await _mailbox("alice@example.test", FakeProber(set(), fail=REFUSED))
    assert reply == SocketmapReply("TEMP", "mailbox lookup in Dovecot failed: cannot connect")


@pytest.mark.parametrize("key", ["@example.test", "alice", "postmaster"])
async def test_catch_all_and_bare_local_part_are_notfound_without_asking(
    key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "postwarden.socketmap")
    prober = FakeProber({"alice@example.test"})
    assert (await _mailbox(key, prober)).status == "NOTFOUND"
    assert prober.asked == []
    # Postfix asks these for every recipient: ordinary lookups, not worth a log line.
    assert caplog.records == []


INJECTION_KEYS = [
    "alice@example.test\r\nRSET",
    "x@example.test>\r\nRSET\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test",
    "alice@example.test\n",
    "alice@example.test\r",
    "a b@example.test",
    "alice@example.test> NOTIFY=NEVER",
    "<alice@example.test>",
    '"alice"@example.test',
    "alice@\u00e9xample.test",
    "a" * 300 + "@example.test",
    "alice@example.test" + "x" * 320,
]


@pytest.mark.parametrize("key", INJECTION_KEYS)
async def test_hostile_keys_are_notfound_and_never_reach_dovecot(key: str) -> None:
    prober = FakeProber({"alice@example.test"})
    assert (await _mailbox(key, prober)).status == "NOTFOUND"
    assert prober.asked == []


async def test_hostile_keys_off_the_wire_are_never_probed() -> None:
    prober = FakeProber({"alice@example.test"})
    mailboxes = MailboxMap(prober)
    wire = b"".join(encode_netstring(f"mailboxes {k}".encode()) for k in INJECTION_KEYS)
    wire += encode_netstring(b"mailboxes al\x00ice@example.test")
    requests = NetstringDecoder().feed(wire)
    replies = [await answer(r, FakeAliases({}), 1.0, mailboxes) for r in requests]
    assert {r.status for r in replies} <= {"NOTFOUND", "PERM"}
    assert prober.asked == []


async def test_unset_mailbox_lmtp_is_perm_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    mailboxes = MailboxMap(None)
    replies = [
        await answer(
            SocketmapRequest(MAILBOXES_MAP, "alice@example.test"), FakeAliases({}), 1.0, mailboxes
        )
        for _ in range(3)
    ]
    assert {r.status for r in replies} == {"PERM"}
    assert [r.getMessage() for r in caplog.records if "mailbox_lmtp" in r.getMessage()] == [
        "socketmap: map 'mailboxes' asked for but policyd.mailbox_lmtp is not set: "
        "answering PERM (set it, or remove the map from virtual_mailbox_maps)"
    ]


async def test_handler_without_a_prober_does_not_serve_mailboxes() -> None:
    reply = await answer(SocketmapRequest(MAILBOXES_MAP, "alice@example.test"), FakeAliases({}))
    assert reply.status == "PERM"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_outage_is_one_warning_and_one_recovery_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "postwarden.socketmap")
    clock = FakeClock()
    prober = FakeProber({"alice@example.test"}, fail=REFUSED)
    mailboxes = MailboxMap(prober, clock=clock)
    for _ in range(50):
        assert (await mailboxes.lookup("alice@example.test")).status == "TEMP"
        clock.now += 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot connect" in warnings[0].getMessage()
    # Still failing after REPEAT_LOG_INTERVAL: one more line, with the count.
    clock.now += REPEAT_LOG_INTERVAL
    await mailboxes.lookup("alice@example.test")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "51 lookups answered TEMP" in warnings[1].getMessage()
    prober.fail = None
    assert (await mailboxes.lookup("alice@example.test")).status == "OK"
    assert (await mailboxes.lookup("alice@example.test")).status == "OK"
    recovered = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert recovered == [
        "socketmap: mailboxes: works again (lookups answered TEMP: cannot connect: 51)"
    ]


async def test_untrusted_text_in_failure_logs_is_sanitised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    forged = ProbeResult.temporary("4xx to RCPT", "Dovecot answered 451 x\nFAKE LOG LINE")
    await MailboxMap(FakeProber(set(), fail=forged)).lookup("alice@example.test")
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "\n" not in record.getMessage()
    assert "451 x?FAKE LOG LINE" in record.getMessage()


async def test_slow_mailbox_lookup_is_timeout() -> None:
    class Slow:
        async def probe(self, address: str) -> ProbeResult:
            await asyncio.get_running_loop().create_future()  # never answers
            return ProbeResult(MailboxStatus.EXISTS)

    reply = await answer(
        SocketmapRequest(MAILBOXES_MAP, "a@example.test"), FakeAliases({}), 0, MailboxMap(Slow())
    )
    assert reply.status == "TIMEOUT"


# --- alias targets in our own domains must exist (no accept-then-bounce) -----------------


async def _alias(
    key: str, aliases: dict[str, list[str]], prober: FakeProber | None
) -> SocketmapReply:
    mailboxes = MailboxMap(prober, local_domains=["example.test"])
    return await answer(SocketmapRequest(ALIASES_MAP, key), FakeAliases(aliases), 1.0, mailboxes)


async def test_an_alias_whose_mailbox_was_deleted_is_not_found() -> None:
    # sales -> bob, bob deleted: Postfix then finds no alias and no mailbox, and says 550.
    reply = await _alias(
        "sales@example.test",
        {"sales@example.test": ["bob@example.test"]},
        FakeProber({"alice@example.test"}),
    )
    assert reply == NOT_FOUND


async def test_an_alias_keeps_existing_mailboxes_other_aliases_and_outside_targets() -> None:
    aliases = {
        "team@example.test": [
            "bob@example.test",
            "alice@example.test",
            "ops@example.test",
            "x@outside.example",
        ],
        "ops@example.test": ["alice@example.test"],
    }
    prober = FakeProber({"alice@example.test"})
    reply = await _alias("team@example.test", aliases, prober)
    assert reply == SocketmapReply("OK", "alice@example.test,ops@example.test,x@outside.example")
    assert "x@outside.example" not in prober.asked  # outside targets are never probed


async def test_an_alias_target_dovecot_cannot_answer_for_defers() -> None:
    reply = await _alias(
        "sales@example.test",
        {"sales@example.test": ["bob@example.test"]},
        FakeProber(set(), fail=REFUSED),
    )
    assert reply.status == "TEMP"


async def test_without_the_mailbox_map_alias_targets_are_not_checked() -> None:
    reply = await _alias("sales@example.test", {"sales@example.test": ["bob@example.test"]}, None)
    assert reply == SocketmapReply("OK", "bob@example.test")
