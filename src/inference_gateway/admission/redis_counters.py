"""The counters of every gateway, in Redis: one atomic script to admit, one to settle.

Each script gets all the counters of one request (they share the organization's hash tag, so
they live on one Redis node) and uses Redis's own clock, so that gateways whose clocks differ
still count the same 60 seconds.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.asyncio.connection import parse_url
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from inference_gateway.admission.checks import Check
from inference_gateway.admission.resp import Resp

KEYS_OF = {"window": 3, "concurrent": 1, "quota": 1}
CODE = {"window": "w", "concurrent": "c", "quota": "q"}
KEEP_QUOTA_MS = 2 * 86_400_000  # a period's counter outlives it, for the reconciler

# A window's requests are kept in a sorted set (by admission time) and their costs in a hash,
# with their sum beside them; what is older than the window is dropped before each check.
_ADMIT = """
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local ticket, keep = ARGV[2], tonumber(ARGV[3])
local n = (#ARGV - 3) / 5
local function forget(z, h, t, before)
  local total = tonumber(redis.call('GET', t) or '0')
  while true do
    local old = redis.call('ZRANGEBYSCORE', z, '-inf', before, 'LIMIT', 0, 500)
    if #old == 0 then break end
    local costs = redis.call('HMGET', h, unpack(old))
    for _, c in ipairs(costs) do total = total - tonumber(c or '0') end
    redis.call('HDEL', h, unpack(old))
    redis.call('ZREM', z, unpack(old))
  end
  if total < 0 then total = 0 end
  redis.call('SET', t, total)
  return total
end
local used, resets, taken, k = {}, {}, {}, 1
for i = 0, n - 1 do
  local at = 4 + i * 5
  local kind, limit = ARGV[at], tonumber(ARGV[at + 1])
  local cost, floor, span = tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  if kind == 'w' then
    local z, h, t = KEYS[k], KEYS[k + 1], KEYS[k + 2]
    k = k + 3
    local total = forget(z, h, t, now - span)
    if total + floor > limit then
      local need, freed, free_at = total + floor - limit, 0, now + span
      local entries = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
      for j = 1, #entries, 2 do
        freed = freed + tonumber(redis.call('HGET', h, entries[j]) or '0')
        if freed >= need then
          free_at = tonumber(entries[j + 1]) + span
          break
        end
      end
      return {0, i, free_at - now, total}
    end
    local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
    taken[i] = math.min(cost, limit - total)
    used[i] = total
    resets[i] = span
    if #first > 0 then resets[i] = tonumber(first[2]) + span - now end
  elseif kind == 'c' then
    local z = KEYS[k]
    k = k + 1
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
    local count = redis.call('ZCARD', z)
    if count + 1 > limit then return {0, i, 1000, count} end
    taken[i] = 1
    used[i] = count
    resets[i] = 0
  else
    local q = KEYS[k]
    k = k + 1
    local total = tonumber(redis.call('GET', q) or '0')
    if total + floor > limit then return {0, i, span, total} end
    taken[i] = math.min(cost, limit - total)
    used[i] = total
    resets[i] = span
  end
end
local out, k2 = {1, -1, 0, 0}, 1
for i = 0, n - 1 do
  local kind, span = ARGV[4 + i * 5], tonumber(ARGV[8 + i * 5])
  local take = taken[i]
  if kind == 'w' then
    local z, h, t = KEYS[k2], KEYS[k2 + 1], KEYS[k2 + 2]
    k2 = k2 + 3
    redis.call('ZADD', z, now, ticket)
    redis.call('HSET', h, ticket, take)
    redis.call('INCRBY', t, take)
    for _, key in ipairs({z, h, t}) do redis.call('PEXPIRE', key, span + 60000) end
  elseif kind == 'c' then
    local z = KEYS[k2]
    k2 = k2 + 1
    redis.call('ZADD', z, now + span, ticket)
    redis.call('PEXPIRE', z, span + 60000)
  else
    local q = KEYS[k2]
    k2 = k2 + 1
    redis.call('INCRBY', q, take)
    redis.call('PEXPIRE', q, span + keep)
  end
  table.insert(out, used[i] + take)
  table.insert(out, resets[i])
  table.insert(out, take)
end
return out
"""

_SETTLE = """
local ticket = ARGV[1]
local n = (#ARGV - 1) / 3
local k = 1
for i = 0, n - 1 do
  local kind = ARGV[2 + i * 3]
  local reserved, actual = tonumber(ARGV[3 + i * 3]), tonumber(ARGV[4 + i * 3])
  if kind == 'w' then
    local h, t = KEYS[k + 1], KEYS[k + 2]
    k = k + 3
    local old = redis.call('HGET', h, ticket)
    if old and tonumber(old) ~= actual then
      redis.call('HSET', h, ticket, actual)
      redis.call('INCRBY', t, actual - tonumber(old))
    end
  elseif kind == 'c' then
    redis.call('ZREM', KEYS[k], ticket)
    k = k + 1
  else
    if actual ~= reserved and redis.call('EXISTS', KEYS[k]) == 1 then
      redis.call('INCRBY', KEYS[k], actual - reserved)
    end
    k = k + 1
  end
end
return 1
"""

_AT_LEAST = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return tonumber(ARGV[1])
end
return current
"""


@dataclass(frozen=True, slots=True)
class Decision:
    admitted: bool
    failing: int  # the index of the check that refused; -1 when admitted
    retry_ms: int  # when the refusing check could admit the request
    used: list[int]  # per check, what is used with this request counted
    resets_ms: list[int]  # per check, when it has room again (windows) or the period ends
    taken: list[int]  # per check, what this request reserved


def _settle_args(checks: list[Check], ticket: str, taken: list[int],
                 actual: list[int]) -> tuple[list[str], list[str | int]]:
    keys = [key for check in checks for key in _keys(check)]
    args: list[str | int] = [ticket]
    for check, reserved, spent in zip(checks, taken, actual, strict=True):
        args += [CODE[check.kind], reserved, spent]
    return keys, args


def _keys(check: Check) -> list[str]:
    if check.kind == "window":
        return [check.key + ":z", check.key + ":h", check.key + ":t"]
    return [check.key]


class RedisCounters:
    def __init__(self, url: str, timeout: float) -> None:
        self.timeout = timeout
        self.client = redis.Redis.from_url(url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout,
                                           health_check_interval=0)
        self._admit = self.client.register_script(_ADMIT)
        self._settle = self.client.register_script(_SETTLE)
        self._at_least = self.client.register_script(_AT_LEAST)
        # The request path's two scripts go over a lean connection of their own (see ``resp``)
        # where it can be had: TCP, no TLS. Everything else uses redis-py.
        where = parse_url(url)
        self._lean = None if "connection_class" in where else Resp(
            where.get("host", "localhost"), where.get("port", 6379), where.get("db", 0),
            where.get("username"), where.get("password"), timeout)

    async def _run(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> Any:
        if self._lean is None:
            return await script(keys=keys, args=args)
        source = script.script
        assert isinstance(source, (bytes, str))  # what register_script was given
        return await self._lean.script(script.sha, source, keys, args)

    async def admit(self, checks: list[Check], ticket: str, now_ms: int = 0) -> Decision:
        keys = [key for check in checks for key in _keys(check)]
        args: list[str | int] = [now_ms, ticket, KEEP_QUOTA_MS]
        for check in checks:
            args += [CODE[check.kind], check.limit, check.cost, check.floor, check.span_ms]
        out = [int(v) for v in await self._run(self._admit, keys, args)]
        if not out[0]:
            return Decision(False, out[1], out[2], [out[3]], [], [])
        return Decision(True, -1, 0, out[4::3], out[5::3], out[6::3])

    async def settle(self, checks: list[Check], ticket: str, taken: list[int],
                     actual: list[int]) -> None:
        keys, args = _settle_args(checks, ticket, taken, actual)
        await self._run(self._settle, keys, args)

    def send_settle(self, checks: list[Check], ticket: str, taken: list[int],
                    actual: list[int]) -> asyncio.Future[Any] | None:
        """The settlement written to Redis now, its answer to come; None when it cannot be
        written at once (no lean connection open), and ``settle`` must be awaited instead."""
        if self._lean is None:
            return None
        keys, args = _settle_args(checks, ticket, taken, actual)
        return self._lean.send("EVALSHA", self._settle.sha, len(keys), *keys, *args)

    async def settled(self, sent: asyncio.Future[Any], checks: list[Check], ticket: str,
                      taken: list[int], actual: list[int]) -> None:
        """Wait for what ``send_settle`` wrote; a Redis that lost the script gets it again."""
        try:
            async with asyncio.timeout(self.timeout):
                await sent
        except NoScriptError:
            await self.settle(checks, ticket, taken, actual)

    async def raise_to(self, key: str, value: int, keep_ms: int) -> int:
        """A quota counter brought up to what Postgres knows was used (never down)."""
        return int(await self._at_least(keys=[key], args=[value, keep_ms]))

    async def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
        await self.client.aclose()
