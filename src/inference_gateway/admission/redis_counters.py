"""The counters of every gateway, in Redis: one atomic script to admit, one to settle.

Each script gets all the counters of one request (they share the organization's hash tag, so
they live on one Redis node) and uses Redis's own clock, so that gateways whose clocks differ
still count the same 60 seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NamedTuple

import redis.asyncio as redis
from redis.asyncio.connection import parse_url
from redis.commands.core import AsyncScript

from inference_gateway.admission.checks import Check
from inference_gateway.admission.resp import Orphan, Resp

CODE = {"window": "w", "concurrent": "c", "quota": "q"}
KEEP_QUOTA_MS = 2 * 86_400_000  # a period's counter outlives it, for the reconciler

# A window is one hash: what was admitted in each second (a field per second, named by its
# number since the epoch), their sum ("t"), and the oldest and newest seconds held ("o", "n").
# A second counts while any part of it is within the window, so a request leaves it between 60
# and 61 seconds after its admission, and no span of 60 seconds ever admits more than the limit.
# What a request costs Redis does not grow with the rate: a few hash fields, not an entry each,
# read in one call and written in one. Each redis.call is a few microseconds, so the scripts
# make as few as they can: a window's expiry is renewed once a second, a quota's once a
# period, and the places of gateways that died (past their time-out) are not counted but only
# removed when they could refuse someone.
# Each check's arguments come in one string ("w <limit> <cost> <floor> <span> <want> <held>
# <name> ..."), and the answer is one string of numbers: one argument to encode, one value to
# parse.
# A gateway process may ask for spare room beyond the request (<want>; see ``leases``): it is
# given only out of the room beyond half the limit, divided by ARGV[5] (twice the number of
# processes), so that no process holds room that others need. Spare room is counted like a
# request's, in the same second; a window notes the last second it gave any ('l'), so that a
# refusal in that second can say the room may come back when the second ends. A process's spare
# places at once are members named <name>#0, <name>#1, ...: <held> of them are held already.
_ADMIT = """
local PER_CALL = 2000
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local ticket, keep, second = ARGV[2], tonumber(ARGV[3]), math.floor(now / 1000)
local div = tonumber(ARGV[5] or '0')
local spec = {}
for word in string.gmatch(ARGV[4], '%S+') do spec[#spec + 1] = tonumber(word) or word end
local n = #spec / 8
local function window(h, first)
  local held = redis.call('HMGET', h, 't', 'o', 'n', second)
  local total, newest = tonumber(held[1] or '0'), tonumber(held[3] or '-1')
  if total > 0 and newest >= first then
    local oldest, at, here = tonumber(held[2]), second, tonumber(held[4] or '0')
    if newest > second then  -- Redis's clock went back (a failover): count in the newest
      at, here = newest, tonumber(redis.call('HGET', h, newest) or '0')
    end
    if oldest < first then
      for s = oldest, first - 1 do
        local v = redis.call('HGET', h, s)
        if v then
          total = total - tonumber(v)
          redis.call('HDEL', h, s)
        end
      end
      oldest = first
      while oldest < newest and redis.call('HEXISTS', h, oldest) == 0 do oldest = oldest + 1 end
      if total <= 0 then
        redis.call('DEL', h)
        return 0, second, -1, 0, second
      end
      redis.call('HSET', h, 't', total, 'o', oldest)  -- kept, should a later check refuse
    end
    return total, oldest, newest, here, at
  end
  if held[1] then redis.call('DEL', h) end  -- all it held has left, or was given back
  return 0, second, -1, 0, second
end
local state, taken, spares = {}, {}, {}
local out = {1, -1, now, 0}
for i = 0, n - 1 do
  local kind, limit, cost, floor, span, want = unpack(spec, i * 8 + 1, i * 8 + 6)
  local key = KEYS[i + 1]
  local used, reset
  local clock_back = false
  if kind == 'w' then
    local total, oldest, newest, here, at = window(key, math.floor((now - span) / 1000))
    if total + floor > limit then
      local seconds = {}
      for s = oldest, at do seconds[#seconds + 1] = s end
      local need, freed, free_at = total + floor - limit, 0, now + span
      if #seconds > 0 then
        for j, c in ipairs(redis.call('HMGET', key, unpack(seconds))) do
          freed = freed + tonumber(c or '0')
          if freed >= need then
            free_at = (seconds[j] + 1) * 1000 + span
            break
          end
        end
      end
      if tonumber(redis.call('HGET', key, 'l') or '-1') >= second then
        free_at = math.min(free_at, (second + 1) * 1000 + 100)  -- spare room comes back
      end
      return table.concat({0, i, math.max(free_at - now, 1), total}, ' ')
    end
    state[i] = {total, oldest, newest, here, at}
    clock_back = at ~= second
    used, reset = total, (oldest + 1) * 1000 + span - now
  elseif kind == 'c' then
    used = redis.call('ZCOUNT', key, '(' .. now, '+inf')
    if used + 1 > limit then
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      return table.concat({0, i, 1000, used}, ' ')
    end
    cost, reset = 1, 0
  else
    local held = redis.call('GET', key)
    used = tonumber(held or '0')
    if used + floor > limit then return table.concat({0, i, span, used}, ' ') end
    state[i] = held
    reset = span
  end
  taken[i] = math.min(cost, limit - used)
  local spare = 0
  if want > 0 and div > 0 and not clock_back then
    spare = math.max(0, math.min(want, math.floor((limit - used - taken[i] - limit / 2) / div)))
  end
  spares[i] = spare
  out[#out + 1] = used + taken[i]
  out[#out + 1] = reset
  out[#out + 1] = taken[i]
  out[#out + 1] = spare
end
for i = 0, n - 1 do
  local kind, span, held, name = spec[i * 8 + 1], spec[i * 8 + 5], spec[i * 8 + 7], spec[i * 8 + 8]
  local key, take, spare = KEYS[i + 1], taken[i], spares[i]
  if kind == 'w' then
    local total, oldest, newest, here, at = unpack(state[i])
    local added = take + spare
    if spare > 0 then
      redis.call('HSET', key, at, here + added, 't', total + added, 'o', oldest, 'n', at, 'l', at)
    else
      redis.call('HSET', key, at, here + added, 't', total + added, 'o', oldest, 'n', at)
    end
    if newest < at then redis.call('PEXPIRE', key, span + 2000) end
  elseif kind == 'c' then
    if spare > 0 then  -- the process's places, all of them with a new time-out
      local places = {}
      for j = 0, held + spare do
        places[#places + 1] = now + span
        places[#places + 1] = name .. '#' .. j
        if #places == PER_CALL or j == held + spare then  -- unpack takes 8000 at most
          redis.call('ZADD', key, unpack(places))
          places = {}
        end
      end
    else
      redis.call('ZADD', key, now + span, ticket)
    end
    redis.call('PEXPIRE', key, span + 60000)
  else
    redis.call('INCRBY', key, take + spare)
    if not state[i] then redis.call('PEXPIRE', key, span + keep) end
  end
end
return table.concat(out, ' ')
"""

# A window's reservation is corrected in the second it was made in (ARGV[2]), if that second
# still counts.
_SETTLE = """
local ticket, at = ARGV[1], tonumber(ARGV[2])
local spec = {}
for word in string.gmatch(ARGV[3], '%S+') do spec[#spec + 1] = tonumber(word) or word end
for i = 0, #spec / 3 - 1 do
  local kind, reserved, actual = unpack(spec, i * 3 + 1, i * 3 + 3)
  local key = KEYS[i + 1]
  if kind == 'w' then
    if actual ~= reserved then
      local held = redis.call('HMGET', key, math.floor(at / 1000), 't')
      if held[1] then
        local change = math.max(actual - reserved, -tonumber(held[1]))
        redis.call('HSET', key, math.floor(at / 1000), tonumber(held[1]) + change,
          't', tonumber(held[2]) + change)
      end
    end
  elseif kind == 'c' then
    redis.call('ZREM', key, ticket)
  elseif actual ~= reserved and redis.call('EXISTS', key) == 1 then
    redis.call('INCRBY', key, actual - reserved)
  end
end
return 1
"""

# Room a process held and did not use, given back: a window's in the second it was counted in
# ("w <second> <change>"), a quota's ("q 0 <change>"), places ("c <name> <from> <to>": the
# members <name>#from ... <name>#(to - 1)).
_GIVE = """
local PER_CALL = 2000
local spec = {}
for word in string.gmatch(ARGV[1], '%S+') do spec[#spec + 1] = tonumber(word) or word end
for i = 0, #spec / 4 - 1 do
  local kind, a, b, c = unpack(spec, i * 4 + 1, i * 4 + 4)
  local key = KEYS[i + 1]
  if kind == 'w' then
    local held = redis.call('HMGET', key, a, 't')
    if held[1] then
      local change = math.max(b, -tonumber(held[1]))
      redis.call('HSET', key, a, tonumber(held[1]) + change, 't', tonumber(held[2]) + change)
    end
  elseif kind == 'q' then
    if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, b) end
  else
    local names = {}
    for j = b, c - 1 do
      names[#names + 1] = a .. '#' .. j
      if #names == PER_CALL or j == c - 1 then  -- unpack takes 8000 at most
        redis.call('ZREM', key, unpack(names))
        names = {}
      end
    end
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


class Decision(NamedTuple):
    admitted: bool
    failing: int  # the index of the check that refused; -1 when admitted
    retry_ms: int  # when the refusing check could admit the request
    used: list[int]  # per check, what is used with this request counted
    resets_ms: list[int]  # per check, when it has room again (windows) or the period ends
    taken: list[int]  # per check, what this request reserved
    at_ms: int = 0  # when it was admitted (Redis's clock): its windows' second
    spare: list[int] | None = None  # per check, the room given beyond the request (leases)


def _decision(answer: bytes | str) -> Decision:
    out = [int(v) for v in answer.split()]
    if not out[0]:
        return Decision(False, out[1], out[2], [out[3]], [], [])
    return Decision(True, -1, 0, out[4::4], out[5::4], out[6::4], out[2], out[7::4])


class Want(NamedTuple):
    """Spare room a process asks for with an admission (see ``leases``)."""

    room: int  # beyond the request, at most
    held: int = 0  # places: how many the process holds already, named <name>#0 ...
    name: str = "-"


def _settle_args(checks: list[Check], ticket: str, at_ms: int, taken: list[int],
                 actual: list[int]) -> tuple[list[str], list[str | int]]:
    spec = " ".join(f"{CODE[check.kind]} {reserved} {spent}"
                    for check, reserved, spent in zip(checks, taken, actual, strict=True))
    return [check.key for check in checks], [ticket, at_ms, spec]


class RedisCounters:
    def __init__(self, url: str, timeout: float) -> None:
        self.timeout = timeout
        self.client = redis.Redis.from_url(url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout,
                                           health_check_interval=0)
        self._admit = self.client.register_script(_ADMIT)
        self._settle = self.client.register_script(_SETTLE)
        self._give = self.client.register_script(_GIVE)
        self._at_least = self.client.register_script(_AT_LEAST)
        # The request path's two scripts go over a lean connection of their own (see ``resp``)
        # where it can be had: TCP, no TLS. Everything else uses redis-py.
        where = parse_url(url)
        self._lean = None if "connection_class" in where else Resp(
            where.get("host", "localhost"), where.get("port", 6379), where.get("db", 0),
            where.get("username"), where.get("password"), timeout)

    async def _run(self, script: AsyncScript, keys: list[str], args: list[str | int],
                   orphan: Orphan | None = None) -> Any:
        if self._lean is None:
            return await script(keys=keys, args=args)
        source = script.script
        assert isinstance(source, (bytes, str))  # what register_script was given
        return await self._lean.script(script.sha, source, keys, args, orphan)

    async def admit(self, checks: list[Check], ticket: str, now_ms: int = 0,
                    orphan: Callable[[Decision], None] | None = None,
                    wants: list[Want] | None = None, share: int = 0) -> Decision:
        """Admit a request, or not. ``orphan``: should the caller be cancelled after the
        script was sent, its decision goes there (on the lean connection), so that what it
        reserved can be given back exactly. ``wants``: spare room asked for per check, given
        out of ample room divided by ``share``."""
        nothing = Want(0)
        spec = " ".join(f"{CODE[c.kind]} {c.limit} {c.cost} {c.floor} {c.span_ms} {w.room} "
                        f"{w.held} {w.name}"
                        for c, w in zip(checks, wants or [nothing] * len(checks), strict=True))
        answer = await self._run(
            self._admit, [check.key for check in checks],
            [now_ms, ticket, KEEP_QUOTA_MS, spec, share],
            None if orphan is None else lambda late: orphan(_decision(late)))
        return _decision(answer)

    def send_give(self, keys: list[str], spec: str) -> asyncio.Future[Any] | None:
        """Unused room given back, written now (see ``_GIVE``); None when no lean connection
        is open, and ``give`` must be awaited instead."""
        if self._lean is None:
            return None
        return self._lean.send("EVALSHA", self._give.sha, len(keys), *keys, spec)

    async def give(self, keys: list[str], spec: str) -> None:
        await self._run(self._give, keys, [spec])

    async def settle(self, checks: list[Check], ticket: str, at_ms: int, taken: list[int],
                     actual: list[int]) -> None:
        """Replace what ``ticket`` reserved at ``at_ms`` with what it used (``at_ms`` 0: its
        second is not known, and its windows are left as they are)."""
        keys, args = _settle_args(checks, ticket, at_ms, taken, actual)
        await self._run(self._settle, keys, args)

    def send_settle(self, checks: list[Check], ticket: str, at_ms: int, taken: list[int],
                    actual: list[int]) -> asyncio.Future[Any] | None:
        """The settlement written to Redis now, its answer to come; None when it cannot be
        written at once (no lean connection open), and ``settle`` must be awaited instead."""
        if self._lean is None:
            return None
        keys, args = _settle_args(checks, ticket, at_ms, taken, actual)
        return self._lean.send("EVALSHA", self._settle.sha, len(keys), *keys, *args)

    async def raise_to(self, key: str, value: int, keep_ms: int) -> int:
        """A quota counter brought up to what Postgres knows was used (never down)."""
        return int(await self._at_least(keys=[key], args=[value, keep_ms]))

    async def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
        await self.client.aclose()
