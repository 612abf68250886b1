"""Redis store: one shared state for a fleet of MX hosts (plain, Sentinel or Cluster).

Keys (prefix `pw:`):
- `pw:{lists}:permitted` / `pw:{lists}:forbidden`: hashes entry -> comment;
  `pw:{lists}:seq`: the newest change seq; `pw:{lists}:log`: a stream whose entry
  ids are `<seq>-0`, trimmed to the newest `change_log_limit` changes. The `{lists}`
  hash tag keeps them in one Cluster slot, so one Lua script changes them atomically.
  A batch is uploaded to a private `pw:{lists}:staging:<random>` list first (JSON
  chunks, with a TTL), then merged by one script: a failure half-way leaves nothing.
- `pw:aliases`: hash address -> JSON list of targets.
- `pw:gl:{<client network>}:t:<triplet>` and `pw:gl:{<client network>}:n`: greylist
  hashes with a TTL. The network is the hash tag, so a triplet and its network share a
  slot and one script reads (or writes) both in one round trip, also on a Cluster.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from postwarden.policy.records import (
    ClientNetworkRecord,
    ListChange,
    ListEntry,
    ListName,
    TripletRecord,
)
from postwarden.store.base import Store, StoreError
from postwarden.syntax.endpoints import EndpointError, parse_port, split_host_port

DEFAULT_CHANGE_LOG_LIMIT = 100_000
PREFIX = "pw:"
_LIST_NAMES = frozenset(name.value for name in ListName)
_UPLOAD_CHUNK = 10_000  # entries per RPUSH / per removal script
_STAGING_TTL = 3600  # an upload that died half-way cleans itself up
_SCAN_BATCH = 1000
_LOG_PAGE = 10_000
BULK_TIMEOUT = 120.0  # seconds a list-changing script may keep Redis busy (1M entries: ~5 s)

# The newest seq: the counter, or the log's last id if the counter was lost, so XADD
# never meets an id lower than the last (a Lua error half-way would leave half a batch).
_CURRENT_SEQ = """
local function current_seq(seq_key, log_key)
  local seq = tonumber(redis.call('GET', seq_key) or '0')
  local last = redis.call('XREVRANGE', log_key, '+', '-', 'COUNT', 1)
  if last[1] then
    local s = tonumber(string.match(last[1][1], '^(%d+)'))
    if s > seq then seq = s end
  end
  return seq
end
"""

# KEYS: permitted, forbidden, seq, log, staging   ARGV: change_log_limit, batch size
# A batch larger than the change log would write log entries only to trim them: the
# first pass counts the candidates, so only the newest `limit` changes are logged, and
# everything older (now behind a gap) is trimmed with MINID. Readers then reload.
_MERGE_STAGED = (
    _CURRENT_SEQ
    + """
local limit = tonumber(ARGV[1])
local chunks = redis.call('LLEN', KEYS[5])
local function key_of(name)
  if name == 'permitted' then return KEYS[1] end
  return KEYS[2]
end
local candidates = 0
local chunks_to_count = chunks
if tonumber(ARGV[2]) <= limit then chunks_to_count = 0 end
for c = 0, chunks_to_count - 1 do
  local chunk = cjson.decode(redis.call('LINDEX', KEYS[5], c))
  for j = 1, #chunk, 3 do
    if redis.call('HEXISTS', key_of(chunk[j]), chunk[j + 1]) == 0 then
      candidates = candidates + 1
    end
  end
end
local unlogged = math.max(0, candidates - limit)
local seq = current_seq(KEYS[3], KEYS[4])
local added = 0
for c = 0, chunks - 1 do
  local chunk = cjson.decode(redis.call('LINDEX', KEYS[5], c))
  for j = 1, #chunk, 3 do
    local name, entry, comment = chunk[j], chunk[j + 1], chunk[j + 2]
    if redis.call('HSET', key_of(name), entry, comment) == 1 then
      seq = seq + 1
      added = added + 1
      if added > unlogged then
        redis.call('XADD', KEYS[4], string.format('%d-0', seq),
                   'op', 'add', 'list', name, 'entry', entry, 'comment', comment)
      end
    end
  end
end
if added > 0 then
  redis.call('SET', KEYS[3], string.format('%d', seq))
  if unlogged > 0 then
    redis.call('XTRIM', KEYS[4], 'MINID', string.format('%d-0', seq - added + unlogged + 1))
  end
  redis.call('XTRIM', KEYS[4], 'MAXLEN', limit)
end
redis.call('DEL', KEYS[5])
return added
"""
)

# KEYS: list hash, seq, log   ARGV: change_log_limit, list name, entries...
_REMOVE = (
    _CURRENT_SEQ
    + """
local seq = current_seq(KEYS[2], KEYS[3])
local removed = 0
for i = 3, #ARGV do
  local comment = redis.call('HGET', KEYS[1], ARGV[i])
  if comment then
    redis.call('HDEL', KEYS[1], ARGV[i])
    seq = seq + 1
    removed = removed + 1
    redis.call('XADD', KEYS[3], string.format('%d-0', seq),
               'op', 'remove', 'list', ARGV[2], 'entry', ARGV[i], 'comment', comment)
  end
end
if removed > 0 then
  redis.call('SET', KEYS[2], string.format('%d', seq))
  redis.call('XTRIM', KEYS[3], 'MAXLEN', ARGV[1])
end
return removed
"""
)

# KEYS: seq, log   -> {newest, oldest logged seq (0 = empty log)}
_LOG_BOUNDS = (
    _CURRENT_SEQ
    + """
local newest = current_seq(KEYS[1], KEYS[2])
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local oldest = 0
if first[1] then oldest = tonumber(string.match(first[1][1], '^(%d+)')) end
return {newest, oldest}
"""
)

# KEYS: triplet, network
_GREYLIST_LOOKUP = """
return {redis.call('HMGET', KEYS[1], 'f', 'l', 'p'), redis.call('HMGET', KEYS[2], 'p', 'l')}
"""

# KEYS: triplet, network   ARGV: ttl_ms, has_triplet, f, l, p, has_network, p, l
_GREYLIST_UPDATE = """
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'f', ARGV[3], 'l', ARGV[4], 'p', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[2], 'p', ARGV[7], 'l', ARGV[8])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return 0
"""

RedisClient = redis.asyncio.Redis | RedisCluster


class _Errors:
    """Turn every redis/socket failure into StoreError (one line for the log, no traceback)."""

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, RedisError | RedisClusterException | OSError):
            # redis-py appends the whole client repr to some messages (Sentinel's "No
            # master found ... : <redis.asyncio.client.Redis(...)>"): keep the log line short.
            detail = (str(exc) or type(exc).__name__).split(" : <", 1)[0][:300]
            raise StoreError(f"redis store {self._what}: {detail}") from exc


class RedisStore(Store):
    """The Store contract on Redis; greylist lookups and updates are one round trip each."""

    def __init__(
        self,
        client: RedisClient,
        *,
        description: str = "redis",
        change_log_limit: int = DEFAULT_CHANGE_LOG_LIMIT,
        prefix: str = PREFIX,
        on_close: Sequence[Callable[[], Awaitable[None]]] = (),
        bulk_client: RedisClient | None = None,
    ) -> None:
        """Wrap clients made with decode_responses=True (see open_redis_store).

        `bulk_client` (same server, longer timeout) runs the list-changing scripts.
        """
        if change_log_limit < 1:
            raise ValueError("change_log_limit must be at least 1")
        self._client = client
        self._errors = _Errors(description)
        self._change_log_limit = change_log_limit
        self._on_close = list(on_close)
        self._prefix = prefix
        lists = f"{prefix}{{lists}}:"
        self._list_keys = {
            ListName.PERMITTED.value: lists + "permitted",
            ListName.FORBIDDEN.value: lists + "forbidden",
        }
        self._seq_key = lists + "seq"
        self._log_key = lists + "log"
        self._staging_prefix = lists + "staging:"
        self._aliases_key = prefix + "aliases"
        self._greylist_prefix = prefix + "gl:{"
        # Merging a million entries keeps Redis busy for seconds: longer than the
        # per-request timeout, hence a second client (connecting only when used).
        bulk = client if bulk_client is None else bulk_client
        self._bulk_client = bulk_client
        self._merge = bulk.register_script(_MERGE_STAGED)
        self._remove = bulk.register_script(_REMOVE)
        self._log_bounds = client.register_script(_LOG_BOUNDS)
        self._lookup = client.register_script(_GREYLIST_LOOKUP)
        self._update = client.register_script(_GREYLIST_UPDATE)

    # --- permitted / forbidden lists -------------------------------------------------
    async def add_list_entries(self, entries: Sequence[ListEntry]) -> int:
        # All-or-nothing without blocking Redis while we upload: the batch goes to a
        # private staging list first, then one script merges it and logs the changes.
        staging = self._staging_prefix + secrets.token_hex(8)
        with self._errors:
            try:
                uploaded = 0
                chunk: list[str] = []
                for e in entries:
                    chunk += (_checked_list_name(e.list_name), e.entry, e.comment)
                    if len(chunk) >= 3 * _UPLOAD_CHUNK:
                        uploaded += await self._upload(staging, chunk, first=uploaded == 0)
                        chunk = []
                if chunk:
                    uploaded += await self._upload(staging, chunk, first=uploaded == 0)
                if not uploaded:
                    return 0
                keys = [*self._list_keys.values(), self._seq_key, self._log_key, staging]
                args = [self._change_log_limit, uploaded]
                return int(await self._merge(keys=keys, args=args))
            except Exception:
                await self._discard(staging)
                raise

    async def _upload(self, staging: str, chunk: list[str], *, first: bool) -> int:
        # One JSON string per chunk (decoded by the script's cjson): packing a million
        # separate arguments costs redis-py far more than json.dumps does.
        await _awaited(self._client.rpush(staging, json.dumps(chunk)))
        if first:
            await _awaited(self._client.expire(staging, _STAGING_TTL))
        return len(chunk) // 3

    async def _discard(self, staging: str) -> None:
        # It expires on its own; the original error is the one to report.
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await _awaited(self._client.delete(staging))

    async def remove_list_entries(self, list_name: ListName, entries: Sequence[str]) -> int:
        name = _checked_list_name(list_name)
        keys = [self._list_keys[name], self._seq_key, self._log_key]
        removed = 0
        with self._errors:
            for start in range(0, len(entries), _UPLOAD_CHUNK):
                args: list[str | int] = [self._change_log_limit, name]
                args += entries[start : start + _UPLOAD_CHUNK]
                removed += int(await self._remove(keys=keys, args=args))
        return removed

    async def list_entries(self, list_name: ListName | None = None) -> list[ListEntry]:
        names = sorted(_LIST_NAMES) if list_name is None else [_checked_list_name(list_name)]
        result: list[ListEntry] = []
        with self._errors:
            for name in names:
                # HSCAN, not HGETALL: a million-entry list must not stall Redis for others.
                # HSCAN may return a field twice (during a rehash): the dict dedupes.
                found = {
                    entry: comment async for entry, comment in self._hscan(self._list_keys[name])
                }
                list_enum = ListName(name)
                result += [ListEntry(list_enum, entry, found[entry]) for entry in sorted(found)]
        return result

    async def _hscan(self, key: str) -> AsyncIterator[tuple[str, str]]:
        cursor = 0
        for _ in range(1_000_000_000):  # bounded; each round returns a cursor towards 0
            cursor, page = await _awaited(self._client.hscan(key, cursor, count=10_000))
            for field, value in page.items():
                yield str(field), str(value)
            if cursor == 0:
                return

    async def list_changes_since(self, seq: int) -> tuple[int, list[ListChange]] | None:
        with self._errors:
            newest, oldest = await self._log_bounds(keys=[self._seq_key, self._log_key])
            newest, oldest = int(newest), int(oldest)
            if seq == newest:
                return newest, []
            if seq > newest or oldest == 0 or oldest > seq + 1:
                return None
            # Pages, so no single reply is large enough to hit the timeout. A writer
            # may trim the log meanwhile: a page that does not start where the last
            # ended means changes were lost, and the caller reloads.
            changes: list[ListChange] = []
            while seq < newest:
                page = await _awaited(
                    self._client.xrange(
                        self._log_key, f"{seq + 1}-0", f"{newest}-0", count=_LOG_PAGE
                    )
                )
                if not page:
                    return None
                for entry_id, values in page:
                    change_seq = int(entry_id.split("-", 1)[0])
                    if change_seq != seq + 1:
                        return None
                    entry = ListEntry(ListName(values["list"]), values["entry"], values["comment"])
                    changes.append(ListChange(change_seq, _op(values["op"]), entry))
                    seq = change_seq
        return newest, changes

    async def lists_version(self) -> int:
        with self._errors:
            value = await _awaited(self._client.get(self._seq_key))
        return int(value or 0)

    # --- forwarding aliases ----------------------------------------------------------
    async def set_alias(self, address: str, targets: Sequence[str]) -> None:
        with self._errors:
            await _awaited(self._client.hset(self._aliases_key, address, json.dumps(list(targets))))

    async def remove_alias(self, address: str) -> bool:
        with self._errors:
            return bool(await _awaited(self._client.hdel(self._aliases_key, address)))

    async def get_alias(self, address: str) -> list[str] | None:
        with self._errors:
            raw = await _awaited(self._client.hget(self._aliases_key, address))
        return None if raw is None else _targets(raw)

    async def list_aliases(self) -> dict[str, list[str]]:
        with self._errors:
            rows = await _awaited(self._client.hgetall(self._aliases_key))
        return {address: _targets(rows[address]) for address in sorted(rows)}

    # --- greylisting -----------------------------------------------------------------
    def _greylist_keys(self, triplet: str, client_network: str) -> list[str]:
        base = self._greylist_prefix + client_network + "}:"
        return [base + "t:" + triplet, base + "n"]

    async def greylist_lookup(
        self, triplet: str, client_network: str
    ) -> tuple[TripletRecord | None, ClientNetworkRecord | None]:
        with self._errors:
            t, n = await self._lookup(keys=self._greylist_keys(triplet, client_network))
        return _triplet_record(t), _network_record(n)

    async def greylist_update(
        self,
        triplet: str,
        record: TripletRecord | None,
        client_network: str,
        network_record: ClientNetworkRecord | None,
        ttl: float,
    ) -> None:
        if record is None and network_record is None:
            return
        args: list[str | int] = [max(1, round(ttl * 1000))]
        if record is None:
            args += ("0", "", "", "")
        else:
            args += ("1", repr(record.first_seen), repr(record.last_seen), record.passes)
        if network_record is None:
            args += ("0", "", "")
        else:
            args += ("1", network_record.passes, repr(network_record.last_seen))
        with self._errors:
            await self._update(keys=self._greylist_keys(triplet, client_network), args=args)

    async def _greylist_scan(self, kind: Literal["t", "n"]) -> AsyncIterator[list[str]]:
        """Batches of greylist keys of one kind (triplets or networks), across all nodes."""
        pattern = _glob_escape(self._greylist_prefix) + ("*}:t:*" if kind == "t" else "*}:n")
        batch: list[str] = []
        async for key in self._client.scan_iter(match=pattern, count=_SCAN_BATCH):
            # The glob is a coarse filter; a triplet may itself end in "}:n".
            if (self._split_greylist_key(str(key))[1] is not None) != (kind == "t"):
                continue
            batch.append(str(key))
            if len(batch) >= _SCAN_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def _split_greylist_key(self, key: str) -> tuple[str, str | None]:
        """(client network, triplet or None for a network record)."""
        body = key[len(self._greylist_prefix) :]
        network, sep, triplet = body.partition("}:t:")
        if sep:
            return network, triplet
        return body.removesuffix("}:n"), None

    async def _hmget_many(self, keys: list[str], fields: tuple[str, ...]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, list(fields))
        return list(await pipe.execute())

    async def greylist_triplets(self, limit: int = 1000) -> list[tuple[str, TripletRecord]]:
        newest: list[tuple[float, str, TripletRecord]] = []
        with self._errors:
            async for keys in self._greylist_scan("t"):
                for key, values in zip(
                    keys, await self._hmget_many(keys, ("f", "l", "p")), strict=True
                ):
                    record = _triplet_record(values)
                    if record is not None:
                        triplet = self._split_greylist_key(key)[1] or ""
                        newest.append((record.last_seen, triplet, record))
                # Keep memory bounded by `limit`, not by the number of triplets.
                newest = heapq.nsmallest(limit, newest, key=_newest_first)
        return [(triplet, record) for _, triplet, record in newest]

    async def greylist_client_networks(
        self, limit: int = 1000
    ) -> list[tuple[str, ClientNetworkRecord]]:
        newest: list[tuple[float, str, ClientNetworkRecord]] = []
        with self._errors:
            async for keys in self._greylist_scan("n"):
                for key, values in zip(keys, await self._hmget_many(keys, ("p", "l")), strict=True):
                    record = _network_record(values)
                    if record is not None:
                        network = self._split_greylist_key(key)[0]
                        newest.append((record.last_seen, network, record))
                newest = heapq.nsmallest(limit, newest, key=_newest_first)
        return [(network, record) for _, network, record in newest]

    async def _delete_keys(self, keys: list[str]) -> int:
        if not keys:
            return 0
        # One DEL per key: on a Cluster the keys live in different slots.
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)
        return sum(int(n) for n in await pipe.execute())

    async def greylist_delete(self, triplet_prefix: str = "") -> int:
        deleted = 0
        with self._errors:
            async for keys in self._greylist_scan("t"):
                doomed = [
                    key
                    for key in keys
                    if (self._split_greylist_key(key)[1] or "").startswith(triplet_prefix)
                ]
                deleted += await self._delete_keys(doomed)
        return deleted

    async def greylist_purge_expired(self, now: float, expiry: float) -> int:
        cutoff = now - expiry
        deleted = 0
        with self._errors:
            kinds: tuple[Literal["t", "n"], ...] = ("t", "n")
            for kind in kinds:
                async for keys in self._greylist_scan(kind):
                    last_seen = await self._hmget_many(keys, ("l",))
                    doomed = [
                        key
                        for key, (last,) in zip(keys, last_seen, strict=True)
                        if last is not None and float(last) < cutoff
                    ]
                    deleted += await self._delete_keys(doomed)
        return deleted

    # --- lifecycle -------------------------------------------------------------------
    async def close(self) -> None:
        with self._errors:
            await self._client.aclose()
            if self._bulk_client is not None:
                await self._bulk_client.aclose()
            for close in self._on_close:
                await close()


def _newest_first(item: tuple[float, str, Any]) -> tuple[float, str]:
    """Sort key: last_seen descending, then name ascending (as the SQLite store orders)."""
    return -item[0], item[1]


async def _awaited(value: Awaitable[Any] | Any) -> Any:
    """redis-py types commands as `Awaitable[T] | T` (sync and async share stubs)."""
    return await value


def _checked_list_name(name: str) -> str:
    if name not in _LIST_NAMES:
        raise ValueError(f"unknown list {name!r}; allowed: {', '.join(sorted(_LIST_NAMES))}")
    return str(name)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _op(op: str) -> Literal["add", "remove"]:
    if op == "add":
        return "add"
    if op == "remove":
        return "remove"
    raise StoreError(f"redis store: corrupt change log (op {op!r})")


def _targets(raw: str) -> list[str]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise StoreError(f"redis store: corrupt alias targets {raw!r}") from exc
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise StoreError(f"redis store: corrupt alias targets {raw!r}")
    return value


def _triplet_record(values: list[str | None]) -> TripletRecord | None:
    first, last, passes = values
    if first is None or last is None or passes is None:
        return None
    return TripletRecord(float(first), float(last), int(passes))


def _network_record(values: list[str | None]) -> ClientNetworkRecord | None:
    passes, last = values
    if passes is None or last is None:
        return None
    return ClientNetworkRecord(int(passes), float(last))


# --- opening from a URL ---------------------------------------------------------------
def open_redis_store(
    url: str, *, timeout: float = 1.0, change_log_limit: int = DEFAULT_CHANGE_LOG_LIMIT
) -> RedisStore:
    """A RedisStore for a redis://, rediss://, redis+sentinel:// or redis+cluster:// URL.

    Nothing connects yet (the first command does), so a bad URL is the only error here.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    description = f"{scheme}://{_hosts(parts.netloc)}{parts.path}"
    bulk_timeout = max(timeout, BULK_TIMEOUT)

    def options(read_timeout: float) -> dict[str, Any]:
        return {
            "socket_timeout": read_timeout,
            "socket_connect_timeout": timeout,
            "decode_responses": True,
            # One retry on a broken connection (a restarted server, a stale pooled
            # socket); none on a timeout, which would double the caller's wait.
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        }

    if scheme in ("redis", "rediss"):
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise ValueError(
                f"store url {_redacted(url)!r}: the path must be a database number,"
                f" as in {scheme}://HOST:PORT/0"
            )
        try:
            parts.port  # noqa: B018 -- urlsplit checks the port only when asked
            client = redis.asyncio.Redis.from_url(url, **options(timeout))
            bulk = redis.asyncio.Redis.from_url(url, **options(bulk_timeout))
        except ValueError as exc:
            raise ValueError(f"store url {_redacted(url)!r}: {exc}") from exc
        return RedisStore(
            client, description=description, change_log_limit=change_log_limit, bulk_client=bulk
        )
    username, password = _credentials(parts.netloc)
    if scheme == "redis+sentinel":
        segments = [s for s in parts.path.split("/") if s]
        if not 1 <= len(segments) <= 2 or (len(segments) == 2 and not segments[1].isdigit()):
            raise ValueError(
                f"store url {_redacted(url)!r}: expected redis+sentinel://H1:P1,H2:P2/MASTER/DB"
            )
        master = unquote(segments[0])
        db = int(segments[1]) if len(segments) == 2 else 0
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            _host_ports(_hosts(parts.netloc), url),
            # No retries with backoff when asking Sentinels (redis-py's default waits
            # seconds): an unreachable store must fail within the timeout.
            sentinel_kwargs={
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                "retry": Retry(NoBackoff(), 0),
            },
        )
        client, bulk = (
            sentinel.master_for(
                master, db=db, username=username, password=password, **options(read_timeout)
            )
            for read_timeout in (timeout, bulk_timeout)
        )
        return RedisStore(
            client,
            description=description,
            change_log_limit=change_log_limit,
            bulk_client=bulk,
            on_close=[s.aclose for s in sentinel.sentinels],
        )
    if scheme == "redis+cluster":
        if parts.path not in ("", "/"):
            raise ValueError(
                f"store url {_redacted(url)!r}: a cluster has no database number;"
                " expected redis+cluster://HOST:PORT[,HOST:PORT]"
            )
        nodes = _host_ports(_hosts(parts.netloc), url)
        cluster, bulk_cluster = (
            RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in nodes],
                username=username,
                password=password,
                **options(read_timeout),
            )
            for read_timeout in (timeout, bulk_timeout)
        )
        return RedisStore(
            cluster,
            description=description,
            change_log_limit=change_log_limit,
            bulk_client=bulk_cluster,
        )
    raise ValueError(f"store url {_redacted(url)!r}: not a redis URL")


def _hosts(netloc: str) -> str:
    return netloc.rpartition("@")[2]


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    userinfo, at, _ = netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _host_ports(hosts: str, url: str) -> list[tuple[str, int]]:
    """Parse `h1:p1,h2:p2` (IPv6 in brackets); the port is required."""
    result = []
    for item in hosts.split(","):
        try:
            host, port_text = split_host_port(item.strip())
            port = parse_port(port_text)
        except EndpointError:
            raise ValueError(
                f"store url {_redacted(url)!r}: {item!r} is not HOST:PORT (port 1-65535)"
            ) from None
        result.append((host, port))
    return result


def _redacted(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hosts}").geturl()
