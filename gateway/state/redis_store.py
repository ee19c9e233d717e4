"""StateStore on Redis: several gateways (and launchers on several hosts) share one view of the fleet.

Layout (all keys under a prefix, default "corral:"):
  backend:<id>          JSON BackendRecord, with a TTL when the writer gave one (launchers heartbeat)
  backends              set of backend ids (members whose record expired are pruned on read)
  gpus:<host>           JSON list of GPU dicts, with a TTL likewise
  gpu_hosts             set of hosts
  inflight:<owner>      hash "<backend>\\x1f<model>" -> count, one hash per gateway process
  inflight_owners       set of owners
  slots:<backend>\x1f<model>  sorted set of slot reservations (token -> expiry in ms, Redis time)

In-flight counters are kept per gateway process and summed on read, so a gateway that dies without
decrementing does not inflate the count forever: its hash carries a TTL that the live process keeps
refreshing, and expires with it. Increments and decrements are single Redis commands (HINCRBY, or a
Lua script that also stops at zero), so they are atomic per (backend, model).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis

from gateway.record import BackendRecord
from gateway.state.health import reraise_if_cancelled
from launcher.facts.gpuinfo import PublishedGpu

log = logging.getLogger(__name__)

_SEP = "\x1f"

# Decrement a hash field without going below zero; remove it at zero so reads stay small.
_DECR_SCRIPT = """
local v = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if v <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return v
"""

# Drop an owner whose counters are gone, unless they came back since they were read: checked and
# removed in one step, so an increment racing with the read is never hidden from the fleet.
_FORGET_OWNER_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.call('SREM', KEYS[2], ARGV[1])
end
return 0
"""


# Reserve one slot of a copy: drop expired reservations, then add one if fewer than the limit are
# held. One script, so two gateways can never both take the last slot. Expiry uses Redis' own clock.
_RESERVE_SCRIPT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# Push the expiry of reservations this gateway still holds (its requests are still running).
_REFRESH_SCRIPT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now_ms + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return #KEYS
"""


class RedisStore:
    """StateStore over Redis. `owner_ttl_s` bounds how long a dead gateway's in-flight counts linger."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "corral:", owner_ttl_s: float = 30.0) -> None:
        self._redis = client
        self._prefix = prefix
        self._owner = uuid.uuid4().hex
        self._owner_ttl_ms = max(int(owner_ttl_s * 1000), 1000)
        self._refresher: asyncio.Task[None] | None = None
        self._decr = self._redis.register_script(_DECR_SCRIPT)
        self._forget_owner = self._redis.register_script(_FORGET_OWNER_SCRIPT)
        self._reserve = self._redis.register_script(_RESERVE_SCRIPT)
        self._refresh_slots = self._redis.register_script(_REFRESH_SCRIPT)
        self._held_slots: dict[str, str] = {}  # token -> its sorted set's key
        # Releases Redis has not confirmed (token -> key). A lost ZREM would leave the slot taken,
        # for every gateway, until the reservation's TTL: with one slot per copy, a whole fleet
        # that looks busy. After a Redis restart every pooled connection fails its next command
        # once, so this is routine, not rare. Retried before the next reservation and each refresh,
        # until the reservation would have expired anyway (so an outage cannot grow this without end).
        self._owed_releases: dict[str, tuple[str, float]] = {}  # token -> (key, monotonic deadline)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "corral:", owner_ttl_s: float = 30.0) -> RedisStore:
        return cls(aioredis.from_url(url, decode_responses=True), prefix=prefix, owner_ttl_s=owner_ttl_s)

    def _k(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    @property
    def _inflight_key(self) -> str:
        return self._k("inflight", self._owner)

    async def generation(self) -> str:
        """The Redis server's run_id: a new one after every restart (which, without persistence,
        came back empty)."""
        info = await self._redis.info("server")
        return str(info.get("run_id", ""))

    async def ping(self) -> None:
        """Raise when Redis cannot be reached (for a clear error at start)."""
        await self._redis.ping()

    # Records -----------------------------------------------------------------------------------

    async def put_backend(self, record: BackendRecord, ttl_s: float | None = None) -> None:
        px = None if ttl_s is None else max(int(ttl_s * 1000), 1)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._k("backend", record.id), json.dumps(record.to_json()), px=px)
            pipe.sadd(self._k("backends"), record.id)
            await pipe.execute()

    async def remove_backend(self, backend_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._k("backend", backend_id))
            pipe.srem(self._k("backends"), backend_id)
            await pipe.execute()

    async def list_backends(self) -> list[BackendRecord]:
        ids = sorted(str(i) for i in await self._redis.smembers(self._k("backends")))
        if not ids:
            return []
        values = await self._redis.mget([self._k("backend", i) for i in ids])
        records, expired = [], []
        for backend_id, raw in zip(ids, values, strict=True):
            if raw is None:
                expired.append(backend_id)
                continue
            try:
                records.append(BackendRecord.from_json(json.loads(raw)))
            except (ValueError, KeyError, TypeError) as e:
                # One record this version cannot read (a newer launcher's state, a stray write)
                # must not hide every other backend from the gateway.
                log.warning("<%s> unreadable backend record skipped: %s", backend_id, e)
        if expired:
            await self._redis.srem(self._k("backends"), *expired)
        return records

    async def put_gpus(self, host: str, gpus: Sequence[PublishedGpu], ttl_s: float | None = None) -> None:
        px = None if ttl_s is None else max(int(ttl_s * 1000), 1)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._k("gpus", host), json.dumps([g.to_json() for g in gpus]), px=px)
            pipe.sadd(self._k("gpu_hosts"), host)
            await pipe.execute()

    async def list_gpus(self) -> dict[str, list[PublishedGpu]]:
        hosts = sorted(str(h) for h in await self._redis.smembers(self._k("gpu_hosts")))
        if not hosts:
            return {}
        values = await self._redis.mget([self._k("gpus", h) for h in hosts])
        result: dict[str, list[PublishedGpu]] = {}
        expired = []
        for host, raw in zip(hosts, values, strict=True):
            if raw is None:
                expired.append(host)
            else:
                try:
                    rows = json.loads(raw)
                    result[host] = [PublishedGpu.from_json(row, f"{host}.gpus[{i}]") for i, row in enumerate(rows)]
                except (ValueError, TypeError) as e:  # one host's unreadable inventory hides no other
                    log.warning("<%s> unreadable GPU inventory skipped: %s", host, e)
        if expired:
            await self._redis.srem(self._k("gpu_hosts"), *expired)
        return result

    # In-flight counters --------------------------------------------------------------------------

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        """Keep this gateway's counters alive while it runs, including during long idle streams."""
        interval_s = self._owner_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval_s)
            with contextlib.suppress(aioredis.RedisError, OSError):  # still owed: the next round
                await self._settle_releases()
            try:
                await self._redis.pexpire(self._inflight_key, self._owner_ttl_ms)
                if self._held_slots:
                    held = list(self._held_slots.items())
                    await self._refresh_slots(
                        keys=[key for _, key in held], args=[self._owner_ttl_ms, *(token for token, _ in held)]
                    )
            except (aioredis.RedisError, OSError):
                pass  # the next round tries again; a dead gateway's counts expire with their TTL
            reraise_if_cancelled()  # redis-py may swallow a cancellation; close() waits for this loop

    async def incr_in_flight(self, backend_id: str, model: str) -> int:
        self._ensure_refresher()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(self._inflight_key, f"{backend_id}{_SEP}{model}", 1)
            pipe.pexpire(self._inflight_key, self._owner_ttl_ms)
            pipe.sadd(self._k("inflight_owners"), self._owner)
            mine, _, _ = await pipe.execute()
        return int(mine)

    async def decr_in_flight(self, backend_id: str, model: str) -> int:
        value = await self._decr(keys=[self._inflight_key], args=[f"{backend_id}{_SEP}{model}", self._owner_ttl_ms])
        return int(value)

    async def put_own_in_flight(self, counts: Mapping[str, Mapping[str, int]]) -> None:
        """This gateway's hash, replaced in one transaction (an increment or decrement sent meanwhile
        applies after it)."""
        fields = {f"{b}{_SEP}{m}": n for b, per_model in counts.items() for m, n in per_model.items() if n > 0}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._inflight_key)
            if fields:
                pipe.hset(self._inflight_key, mapping=fields)  # type: ignore[arg-type]
                pipe.pexpire(self._inflight_key, self._owner_ttl_ms)
                pipe.sadd(self._k("inflight_owners"), self._owner)
            await pipe.execute()

    async def in_flight(self) -> dict[str, dict[str, int]]:
        """Sum of every live gateway's counters, per backend and model."""
        owners = sorted(str(o) for o in await self._redis.smembers(self._k("inflight_owners")))
        if not owners:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.hgetall(self._k("inflight", owner))
                pipe.exists(self._k("inflight", owner))
            replies = await pipe.execute()
        totals: dict[str, dict[str, int]] = {}
        gone = []
        for owner, fields, exists in zip(owners, replies[0::2], replies[1::2], strict=True):
            if not exists:
                gone.append(owner)
                continue
            for key, count in fields.items():
                backend_id, _, model = key.partition(_SEP)
                if int(count) > 0:
                    per_model = totals.setdefault(backend_id, {})
                    per_model[model] = per_model.get(model, 0) + int(count)
        for owner in gone:
            await self._forget_owner(keys=[self._k("inflight", owner), self._k("inflight_owners")], args=[owner])
        return totals

    # Slot reservations --------------------------------------------------------------------------------

    def _slots_key(self, backend_id: str, model: str) -> str:
        return self._k("slots", f"{backend_id}{_SEP}{model}")

    async def reserve_slot(self, backend_id: str, model: str, slots: int) -> str | None:
        """One script call: a reservation that expires `owner_ttl_s` after this gateway stops
        refreshing it (the same refresher keeps the in-flight counters alive)."""
        self._ensure_refresher()
        await self._settle_releases()  # a slot whose release was lost is free again first
        key = self._slots_key(backend_id, model)
        token = f"{self._owner}:{uuid.uuid4().hex[:12]}"
        try:
            taken = await self._reserve(keys=[key], args=[slots, self._owner_ttl_ms, token])
        except BaseException:
            # The script may have run with its reply lost: nobody would release or refresh the
            # reservation, so it is owed a release like any other (ZREM of a token never added is
            # a no-op).
            self._owe_release(token, key)
            raise
        if not int(taken):
            return None
        self._held_slots[token] = key
        return token

    async def release_slot(self, backend_id: str, model: str, token: str) -> None:
        key = self._held_slots.pop(token, None) or self._slots_key(backend_id, model)
        self._owe_release(token, key)
        await self._settle_releases()

    def _owe_release(self, token: str, key: str) -> None:
        self._owed_releases[token] = (key, time.monotonic() + self._owner_ttl_ms / 1000)

    async def _settle_releases(self) -> None:
        """Remove every reservation whose release is owed; those not confirmed stay owed."""
        now = time.monotonic()
        for token, (_, deadline) in list(self._owed_releases.items()):
            if deadline < now:  # expired in Redis by now
                del self._owed_releases[token]
        if not self._owed_releases:
            return
        owed = list(self._owed_releases.items())
        async with self._redis.pipeline(transaction=False) as pipe:
            for token, (key, _) in owed:
                pipe.zrem(key, token)
            await pipe.execute()
        for token, _ in owed:
            self._owed_releases.pop(token, None)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        # Whatever this process counted or reserved is finished or abandoned with it.
        with contextlib.suppress(aioredis.RedisError, OSError):
            for token, key in self._held_slots.items():
                self._owe_release(token, key)
            self._held_slots.clear()
            await self._settle_releases()
            await self._redis.delete(self._inflight_key)
            await self._redis.srem(self._k("inflight_owners"), self._owner)
        await self._redis.aclose()
