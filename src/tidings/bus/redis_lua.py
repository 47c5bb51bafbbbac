"""The Redis side of the Redis bus (bus/redis.py): its keys, channels and scripts.

Under ``<prefix>:<db>:`` (pub/sub channels are server-wide: the db number in the prefix
keeps clusters that share a Redis apart) Redis holds
- ``nodes``: ZSET node id -> heartbeat expiry (ms, Redis' clock). A node is alive while
  its score is >= now; one that left cleanly has a negative score (-the time it left)
  for LEFT_KEPT_MS, so the others can tell a leave from a death;
- ``u:<uid>``: SET of the nodes where the user has sessions. A route counts only while
  its node is alive: a dead node's routes vanish when its heartbeat expires, and
  keeping routes alive costs no per-user refresh;
- ``nu:<node>``: SET of the users routed to the node (registering again after an
  outage; the survivors' clean-up of a dead node);
- ``rl:<key>:<window>``: rate-limit counters.
Channels: ``n:<node>`` (events for users there), ``all`` (group entries and resync
hints: every node), ``r:<room>`` (a live room's posts: the nodes watching it).

Each operation on this state is one script, so it is atomic and one command in a
pipeline. Every script reads Redis' own clock (TIME), so node clocks need not agree.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

Command = tuple[str | bytes | int, ...]
LEFT_KEPT_MS = 60_000  # how long a clean leave stays visible to the others

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function alive(nodes, n)
  local s = redis.call('ZSCORE', nodes, n)
  return s and tonumber(s) >= now
end
local function any_alive(nodes, key, except)
  for _, n in ipairs(redis.call('SMEMBERS', key)) do
    if n ~= except and alive(nodes, n) then return true end
  end
  return false
end
"""
# KEYS: nodes; ARGV: self, ttl ms -> {now, previous expiry or '', [node, score, ...]}
BEAT = (
    _NOW
    + """
local prev = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1],
  '(' .. string.format('%.0f', -(now - tonumber(ARGV[3]))), '(0')
return {now, prev or '', redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}
"""
)
# KEYS: u:<uid>, nodes, nu:<self>; ARGV: self, uid -> 1 if first in the cluster
ONLINE = (
    _NOW
    + """
local first = not any_alive(KEYS[2], KEYS[1], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 and first then return 1 end
return 0
"""
)
# KEYS: u:<uid>, nodes, nu:<self>; ARGV: self, uid -> 1 if it was the last live route
OFFLINE = (
    _NOW
    + """
redis.call('SREM', KEYS[3], ARGV[2])
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if any_alive(KEYS[2], KEYS[1], nil) then return 0 end
return 1
"""
)
# KEYS: nodes, u:<uid>...; ARGV: self, node channel prefix, payload -> nodes reached
ROUTE = (
    _NOW
    + """
local seen = {[ARGV[1]] = true}
local sent = 0
for i = 2, #KEYS do
  for _, n in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    if not seen[n] then
      seen[n] = true
      if alive(KEYS[1], n) then
        redis.call('PUBLISH', ARGV[2] .. n, ARGV[3])
        sent = sent + 1
      end
    end
  end
end
return sent
"""
)
# KEYS: nodes, u:<uid>... -> 1/0 per user
QUERY = (
    _NOW
    + """
local out = {}
for i = 2, #KEYS do
  out[i - 1] = any_alive(KEYS[1], KEYS[i], nil) and 1 or 0
end
return out
"""
)
# KEYS: rl:<key>:<window>; ARGV: expiry ms -> the count
INCR = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""
# KEYS: nodes, nu:<dead>; ARGV: dead, user key prefix, batch
#   -> {0: it is alive | 1: more to do | 2: done, users now offline...}
GC = (
    _NOW
    + """
if alive(KEYS[1], ARGV[1]) then return {0} end
local out = {1}
for _, uid in ipairs(redis.call('SPOP', KEYS[2], tonumber(ARGV[3]))) do
  local key = ARGV[2] .. uid
  redis.call('SREM', key, ARGV[1])
  if not any_alive(KEYS[1], key, nil) then table.insert(out, uid) end
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if s and tonumber(s) >= 0 then redis.call('ZREM', KEYS[1], ARGV[1]) end
  out[1] = 2
end
return out
"""
)
# KEYS: nodes, nu:<self>; ARGV: self, user key prefix -> 1
LEAVE = (
    _NOW
    + """
for _, uid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  redis.call('SREM', ARGV[2] .. uid, ARGV[1])
end
redis.call('DEL', KEYS[2])
redis.call('ZADD', KEYS[1], -now, ARGV[1])
return 1
"""
)
SCRIPTS = {"beat": BEAT, "online": ONLINE, "offline": OFFLINE, "route": ROUTE,
           "query": QUERY, "incr": INCR, "gc": GC, "leave": LEAVE}  # fmt: skip


class Scripts:
    """One node's keys and channels, and the scripts as loaded in the current Redis;
    ``route``, ``register``, ``query`` and ``count`` make one command each (for the
    publisher to pack and send in a batch)."""

    def __init__(self, prefix: str, node_id: str) -> None:
        self.node_id = node_id
        self.prefix = prefix
        self.nodes = prefix + "nodes"
        self.user = prefix + "u:"
        self.mine = prefix + "nu:" + node_id
        self.node_channel = prefix + "n:"
        self.all_channel = prefix + "all"
        self.room_channel = prefix + "r:"
        self._shas: dict[str, str] = {}

    async def load(self, client: aioredis.Redis) -> None:
        for name, body in SCRIPTS.items():
            self._shas[name] = await client.script_load(body)

    async def run(self, client: aioredis.Redis, name: str, keys: list[str], *argv: Any) -> Any:
        sha = self._shas[name]
        return await client.evalsha(sha, len(keys), *keys, *argv)  # type: ignore[misc]

    def route(self, users: tuple[str, ...], payload: bytes) -> Command:
        keys = [self.user + u for u in users]
        sha = self._shas["route"]
        return (
            "EVALSHA",
            sha,
            len(keys) + 1,
            self.nodes,
            *keys,
            self.node_id,
            self.node_channel,
            payload,
        )

    def register(self, uid: str, online: bool) -> Command:
        sha = self._shas["online" if online else "offline"]
        return ("EVALSHA", sha, 3, self.user + uid, self.nodes, self.mine, self.node_id, uid)

    def query(self, users: tuple[str, ...]) -> Command:
        keys = [self.user + u for u in users]
        return ("EVALSHA", self._shas["query"], len(keys) + 1, self.nodes, *keys)

    def count(self, key: str, window: int, window_ms: int) -> Command:
        sha = self._shas["incr"]
        return ("EVALSHA", sha, 1, f"{self.prefix}rl:{key}:{window}", 2 * window_ms)

    async def leave(self, client: aioredis.Redis) -> None:
        await self.run(client, "leave", [self.nodes, self.mine], self.node_id, self.user)
