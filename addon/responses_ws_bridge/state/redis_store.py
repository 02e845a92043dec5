"""The shared `StateStore` on Redis or Valkey, with `redis.asyncio` (one pool per process).

Keys, all under the namespace `ns`:
- `ns:salt`: the namespace's HMAC salt, created once by whichever instance comes first;
  it is also the store's epoch: a salt other than the one an instance knew means the
  store lost its data (restarted empty);
- `ns:recovering`: set for a grace period when an instance finds the store has lost its
  data; meanwhile no new hard key is bound and no refresh lock is granted, so that the
  instances that knew owners and token chains re-offer them first;
- `ns:bind:<fp>`: an affinity binding, `["hard"|"soft", account]`, idle TTL by kind;
- `ns:sessions:<account>`: sorted set of the `<fp>` of the account's `counted`
  bindings, scored by when each would expire (server time, ms; +inf without a TTL),
  so `bound_sessions` is a ZCARD per account. The bind, rebind and forget scripts
  keep it in step; a read (`_LOOKUP`) restarts a binding's TTL without touching the
  set, so an entry whose score has passed is checked against its binding when
  counted: still bound to the account (kept alive by use), it is scored again by its
  TTL, else removed. Being counted lives here only, not in the binding's value,
  whose format instances of an older version still read;
- `ns:resp:<fp>`: the account that produced a response;
- `ns:health:<account>`: hash of `disabled`, `cooldown_until`, `cooldown_reason`,
  `rate_limits` (JSON);
- `ns:leases:<account>`: sorted set of lease ids scored by expiry; expired ones are
  pruned whenever the set is read or written, so a dead instance's requests stop
  counting when their leases run out;
- `ns:tokens:<account>`: hash of an account's token chain: `gen`, `fence`, `sealed`
  (the tokens, AES-GCM under `bridge_state_secret`: never in clear), `retry_at`,
  `failures`, `last_failure`;
- `ns:refresh-lock:<account>`: the refresh lock, the holder's fencing number, with
  a lease (PX); `ns:refresh-fence:<account>`: the counter fencing numbers come from.

`<fp>` is `fingerprint(salt, key)`: no session id, turn state or response id is
ever stored. Every read-modify-write is one Lua script, so two instances racing
to bind a new key end with one owner. Lease times come from the
injected clock (wall clock: instances must agree on the time to within a
fraction of a lease TTL); binding TTLs, and so the session sets' scores, are
the server's (`TIME` inside the scripts, which needs Redis >= 5 or Valkey).
The scripts that move a binding's session entry name the old account's set
from the binding's value: fine on one server, not on a cluster (where the
multi-key lookup already could not run).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.bindings import Binding
from responses_ws_bridge.state.fingerprint import fingerprint, new_salt
from responses_ws_bridge.state.store import (
    AccountHealthRecord,
    BindingLimits,
    Lease,
    Lookup,
    RefreshLock,
    TokenRecord,
    TokenView,
    ttl_ms,
)

# What GuardedStore treats as the store failing.
CLIENT_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)

# KEYS[1]; ARGV[2]: ttl ms (0: none). A value in force is returned, its TTL refreshed.
_KEEP_PRESENT = """
local v = redis.call('GET', KEYS[1])
local ttl = tonumber(ARGV[2])
if v then
  if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
  return v
end
"""

# KEYS[1]; ARGV: value, ttl ms (0: none). Returns the value in force; refreshes its TTL.
_SET_IF_ABSENT = (
    _KEEP_PRESENT
    + """
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return ARGV[1]
"""
)

# The server's time plus a TTL in ms, a session set's score; no TTL (0): never expires.
_EXPIRES_AT = """
local function expires_at(ttl)
  if ttl <= 0 then return '+inf' end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
end
"""


# KEYS: the binding, its account's session set; ARGV: value, ttl ms (0: none), fingerprint,
# '1' when counted. Returns the binding in force (first writer wins); refreshes its TTL.
def _bind_script(*, first: str = "", before_new: str = "") -> str:
    """The bind script; `first` runs before anything, `before_new` before a new binding."""
    return (
        _EXPIRES_AT
        + first
        + _KEEP_PRESENT
        + before_new
        + """
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
if ARGV[4] == '1' then redis.call('ZADD', KEYS[2], expires_at(ttl), ARGV[3]) end
return ARGV[1]
"""
    )


_BIND = _bind_script()

# Same KEYS and ARGV, and ARGV[5]: the session-set prefix. Binds whatever was bound,
# taking the key's session entry from its old account's set.
_REBIND = (
    _EXPIRES_AT
    + """
local old = redis.call('GET', KEYS[1])
if old then redis.call('ZREM', ARGV[5] .. cjson.decode(old)[2], ARGV[3]) end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
if ARGV[4] == '1' then redis.call('ZADD', KEYS[2], expires_at(ttl), ARGV[3]) end
return 1
"""
)

# KEYS[1]: binding; ARGV: fingerprint, session-set prefix. 1 when it was bound.
_FORGET = """
local old = redis.call('GET', KEYS[1])
if not old then return 0 end
redis.call('ZREM', ARGV[2] .. cjson.decode(old)[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: session sets; ARGV[1]: binding-key prefix, ARGV[2]: most checks per set,
# ARGV[i + 2]: the account of KEYS[i]. Entries due (scored at or before now) are
# checked against their binding, a bounded number per call so that one call stays
# short (the rest count until a later call checks them). Returns the count per set.
_BOUND_SESSIONS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, set in ipairs(KEYS) do
  local due = redis.call('ZRANGEBYSCORE', set, '-inf', now, 'LIMIT', 0, ARGV[2])
  for _, fp in ipairs(due) do
    local key = ARGV[1] .. fp
    local v = redis.call('GET', key)
    local ttl = redis.call('PTTL', key)
    local b = v and cjson.decode(v)
    if b and b[2] == ARGV[i + 2] and ttl ~= -2 then
      redis.call('ZADD', set, ttl == -1 and '+inf' or now + ttl, fp)
    else
      redis.call('ZREM', set, fp)
    end
  end
  out[i] = redis.call('ZCARD', set)
end
return out
"""
_DUE_CHECKS = 200

# KEYS: salt, recovering; ARGV: a new salt, the salt this instance knew ('' none), grace ms.
# Returns the salt in force. A salt created, or found, other than the known one marks the
# store as recovering (an instance that never knew one starts a fresh store: no grace);
# each instance that notices restarts the grace, so the last to notice has all of it to
# re-offer what it knows.
_SALT = """
local v = redis.call('GET', KEYS[1])
if v then
  if ARGV[2] ~= '' and v ~= ARGV[2] then
    redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  end
  return v
end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], '1', 'PX', ARGV[3]) end
return ARGV[1]
"""

# KEYS: as `_BIND`, then recovering, salt; ARGV: as `_BIND`, then the salt the key's
# fingerprint was made with. `_BIND` for a key nobody has offered an owner for: '' (refused)
# while the store recovers, or when its salt is not the one this instance knew (it lost its
# data and nobody noticed yet).
_BIND_NEW = _bind_script(
    first="\nif redis.call('GET', KEYS[4]) ~= ARGV[5] then return '' end",
    before_new="if redis.call('EXISTS', KEYS[3]) == 1 then return '' end",
)


# KEYS: bindings (and, when ARGV[4] == '1', the response key first);
# ARGV: hard ttl, soft ttl, owner ttl (ms, 0: none), has response.
# Returns one value per key, '' when absent; each read restarts the key's idle TTL.
_LOOKUP = """
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v then
    local ttl
    if i == 1 and ARGV[4] == '1' then
      ttl = tonumber(ARGV[3])
    elseif cjson.decode(v)[1] == 'soft' then
      ttl = tonumber(ARGV[2])
    else
      ttl = tonumber(ARGV[1])
    end
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
    out[i] = v
  else
    out[i] = ''
  end
end
return out
"""

# KEYS: bindings or response keys; ARGV[1]: account; ARGV[2] == '1' for bindings.
_FORGET_ACCOUNT = """
local n = 0
for _, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v then
    local account = v
    if ARGV[2] == '1' then account = cjson.decode(v)[2] end
    if account == ARGV[1] then
      redis.call('DEL', key)
      n = n + 1
    end
  end
end
return n
"""

# KEYS[1]: health hash; ARGV: until, reason. Never shortens a running cooldown.
_COOL_DOWN = """
local current = redis.call('HGET', KEYS[1], 'cooldown_until')
if current and tonumber(current) >= tonumber(ARGV[1]) then return current end
redis.call('HSET', KEYS[1], 'cooldown_until', ARGV[1], 'cooldown_reason', ARGV[2])
return ARGV[1]
"""

# KEYS[1]: leases set; ARGV: now, expires at, lease id, ttl ms.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return 1
"""

# Same arguments; 0 when the lease had expired or was released.
_RENEW = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[3])
if (not score) or tonumber(score) <= tonumber(ARGV[1]) then
  redis.call('ZREM', KEYS[1], ARGV[3])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return 1
"""


# KEYS: lock, fence counter, tokens hash, recovering, salt; ARGV: lease ms, the salt this
# instance knows. Returns {fence, 0} when taken, {0, remaining ms} when held (or while the
# store recovers), {0, -1} when the salt is not the known one (the store lost its data). A
# fence is above the counter and above the record's writer, so a counter lost with the
# store never hands out a number a record has already seen.
_TAKE_LOCK = """
if redis.call('GET', KEYS[5]) ~= ARGV[2] then return {0, -1} end
local ttl = redis.call('PTTL', KEYS[1])
if ttl ~= -2 then return {0, ttl} end
ttl = redis.call('PTTL', KEYS[4])
if ttl ~= -2 then return {0, ttl} end
local fence = redis.call('INCR', KEYS[2])
local last = tonumber(redis.call('HGET', KEYS[3], 'fence') or '0')
if fence <= last then
  fence = last + 1
  redis.call('SET', KEYS[2], fence)
end
redis.call('SET', KEYS[1], fence, 'PX', ARGV[1])
return {fence, 0}
"""

# KEYS[1]: lock; ARGV[1]: fence. Deletes the lock only if it is still that holder's.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS[1]: tokens hash; ARGV: base generation ('' for none), fence ('' for a publish),
# then the record: gen, fence, sealed, retry_at, failures, last_failure.
# `token_chain.may_write`, atomically.
_WRITE_TOKENS = """
local gen = redis.call('HGET', KEYS[1], 'gen')
if gen then
  if ARGV[1] ~= gen then return 0 end
  local last = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
  if ARGV[2] ~= '' and tonumber(ARGV[2]) < last then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'gen', ARGV[3], 'fence', ARGV[4], 'sealed', ARGV[5],
  'retry_at', ARGV[6], 'failures', ARGV[7], 'last_failure', ARGV[8])
return 1
"""


DEFAULT_RECOVERY_GRACE_S = 5.0


def connect(url: str, *, timeout_s: float = 0.5) -> Redis:
    """One client (one connection pool) for the process.

    No retries inside the client: `GuardedStore` owns timeouts and backoff, so
    a dead store costs a request one short timeout, not several.
    """
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


def _number(value: float) -> str:
    return repr(float(value))


class RedisStateStore:
    def __init__(
        self,
        client: Redis,
        namespace: str,
        limits: BindingLimits | None = None,
        *,
        clock: Callable[[], float] = time.time,
        recovery_grace_s: float = DEFAULT_RECOVERY_GRACE_S,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.limits = limits or BindingLimits()
        self._clock = clock
        self.recovery_grace_s = recovery_grace_s
        self._salt: str | None = None
        # The salt this instance last saw, kept when `_salt` is forgotten: the epoch it knew.
        self._known_salt: str | None = None
        self._salt_script = client.register_script(_SALT)
        self._bind_new = client.register_script(_BIND_NEW)
        self._set_if_absent = client.register_script(_SET_IF_ABSENT)
        self._bind = client.register_script(_BIND)
        self._rebind = client.register_script(_REBIND)
        self._forget = client.register_script(_FORGET)
        self._bound_sessions = client.register_script(_BOUND_SESSIONS)
        self._lookup_script = client.register_script(_LOOKUP)
        self._forget_account = client.register_script(_FORGET_ACCOUNT)
        self._cool_down = client.register_script(_COOL_DOWN)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._take_lock = client.register_script(_TAKE_LOCK)
        self._release_lock = client.register_script(_RELEASE_LOCK)
        self._write_tokens = client.register_script(_WRITE_TOKENS)

    # keys

    async def salt(self) -> str:
        if self._salt is None:
            keys = [self._salt_key, self._recovering_key]
            args: list[str | int] = [
                new_salt(),
                self._known_salt or "",
                ttl_ms(self.recovery_grace_s),
            ]
            salt = str(await self._salt_script(keys=keys, args=args))
            self._salt = self._known_salt = salt
        return self._salt

    @property
    def _recovering_key(self) -> str:
        return f"{self.namespace}:recovering"

    @property
    def _salt_key(self) -> str:
        return f"{self.namespace}:salt"

    async def check_epoch(self) -> bool:
        known = self._known_salt
        if known is None:
            # Learn the epoch at once: an instance that never read it could not tell a store
            # that lost its data from a fresh one.
            await self._call(self.salt())
            return False
        current = await self._call(self.client.get(self._salt_key))
        if current == known:
            return False
        self._salt = None
        salt: str = await self._call(self.salt())
        return salt != known

    def forget_salt(self) -> None:
        """Read the salt again on next use: a store that lost its data has a new one."""
        self._salt = None

    async def _binding_key(self, key: str) -> str:
        return f"{self.namespace}:bind:{await self._fingerprint(key)}"

    async def _fingerprint(self, key: str) -> str:
        return fingerprint(await self.salt(), key)

    async def _response_key(self, response_id: str) -> str:
        return f"{self.namespace}:resp:{fingerprint(await self.salt(), response_id)}"

    def _account_key(self, what: str, account_id: str) -> str:
        return f"{self.namespace}:{what}:{account_id}"

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except CLIENT_ERRORS as exc:
            self.forget_salt()
            if isinstance(exc, RedisConnectionError | OSError):
                # The server went away: every idle connection to it is dead too. Dropped
                # at once, the next call reconnects instead of meeting them one by one.
                with contextlib.suppress(*CLIENT_ERRORS):
                    await self.client.connection_pool.disconnect(inuse_connections=False)
            raise

    # affinity bindings

    def _encode(self, binding: Binding) -> str:
        return json.dumps([binding.kind.value, binding.account_id])

    @staticmethod
    def _decode(raw: str) -> Binding:
        """The binding (`counted` is not read back: it lives in the session sets)."""
        kind, account_id = json.loads(raw)
        return Binding(str(account_id), AffinityKind(kind))

    def _ttl(self, kind: AffinityKind) -> int:
        return ttl_ms(self.limits.ttl_for(kind))

    async def bind(self, key: str, binding: Binding) -> Binding:
        keys, args = await self._binding_call(key, binding)
        raw = await self._call(self._bind(keys=keys, args=args))
        return self._decode(str(raw))

    async def bind_new(self, key: str, binding: Binding) -> Binding | None:
        keys, args = await self._binding_call(key, binding)
        salt = await self._call(self.salt())
        raw = await self._call(
            self._bind_new(keys=[*keys, self._recovering_key, self._salt_key], args=[*args, salt])
        )
        if raw:
            return self._decode(str(raw))
        await self._call(self.check_epoch())  # refused: if the salt changed, say so to all
        return None

    async def binding(self, key: str) -> Binding | None:
        return (await self.lookup(None, [key])).bindings.get(key)

    async def rebind(self, key: str, binding: Binding) -> None:
        keys, args = await self._binding_call(key, binding)
        await self._call(self._rebind(keys=keys, args=[*args, self._sessions_prefix]))

    async def _binding_call(self, key: str, binding: Binding) -> tuple[list[str], list[str | int]]:
        """KEYS and ARGV of `_BIND` and `_REBIND`."""
        fp = await self._call(self._fingerprint(key))
        keys = [
            f"{self.namespace}:bind:{fp}",
            self._account_key("sessions", binding.account_id),
        ]
        counted = "1" if binding.counted else "0"
        return keys, [self._encode(binding), self._ttl(binding.kind), fp, counted]

    @property
    def _sessions_prefix(self) -> str:
        return self._account_key("sessions", "")

    async def forget(self, key: str) -> bool:
        fp = await self._call(self._fingerprint(key))
        keys = [f"{self.namespace}:bind:{fp}"]
        return bool(await self._call(self._forget(keys=keys, args=[fp, self._sessions_prefix])))

    async def bound_sessions(self, account_ids: Sequence[str]) -> dict[str, int]:
        if not account_ids:
            return {}
        keys = [self._account_key("sessions", a) for a in account_ids]
        args: list[str | int] = [f"{self.namespace}:bind:", _DUE_CHECKS, *account_ids]
        counts = await self._call(self._bound_sessions(keys=keys, args=args))
        return {a: int(n) for a, n in zip(account_ids, counts, strict=True)}

    async def forget_account(self, account_id: str) -> int:
        removed = 0
        for what, is_binding in (("bind", "1"), ("resp", "0")):
            batch: list[str] = []
            pattern = f"{self.namespace}:{what}:*"
            async for key in self.client.scan_iter(match=pattern, count=500):
                batch.append(str(key))
                if len(batch) >= 500:
                    removed += int(
                        await self._call(
                            self._forget_account(keys=batch, args=[account_id, is_binding])
                        )
                    )
                    batch = []
            if batch:
                removed += int(
                    await self._call(
                        self._forget_account(keys=batch, args=[account_id, is_binding])
                    )
                )
        await self._call(self.client.delete(self._account_key("sessions", account_id)))
        return removed

    # response ownership

    async def set_response_owner(self, response_id: str, account_id: str) -> None:
        redis_key = await self._call(self._response_key(response_id))
        ttl = ttl_ms(self.limits.owner_ttl_s)
        await self._call(self.client.set(redis_key, account_id, px=ttl or None))

    async def response_owner(self, response_id: str) -> str | None:
        return (await self.lookup(response_id, [])).response_owner

    async def lookup(self, response_id: str | None, keys: Sequence[str]) -> Lookup:
        redis_keys = [await self._call(self._binding_key(k)) for k in keys]
        if response_id is not None:
            redis_keys.insert(0, await self._call(self._response_key(response_id)))
        if not redis_keys:
            return Lookup(None, {})
        args: list[str | int] = [
            ttl_ms(self.limits.hard_ttl_s),
            ttl_ms(self.limits.soft_ttl_s),
            ttl_ms(self.limits.owner_ttl_s),
            "1" if response_id is not None else "0",
        ]
        values = [str(v) for v in await self._call(self._lookup_script(keys=redis_keys, args=args))]
        owner: str | None = None
        if response_id is not None:
            owner = values.pop(0) or None
        found = {k: self._decode(v) for k, v in zip(keys, values, strict=True) if v}
        return Lookup(owner, found)

    # account health

    async def health(self, account_ids: Sequence[str]) -> dict[str, AccountHealthRecord]:
        pipe = self.client.pipeline(transaction=False)
        for account_id in account_ids:
            pipe.hgetall(self._account_key("health", account_id))
        replies = await self._call(pipe.execute())
        out: dict[str, AccountHealthRecord] = {}
        for account_id, reply in zip(account_ids, replies, strict=True):
            fields = cast(dict[str, str], reply)
            until = fields.get("cooldown_until")
            out[account_id] = AccountHealthRecord(
                disabled=fields.get("disabled"),
                cooldown_until=float(until) if until is not None else None,
                cooldown_reason=fields.get("cooldown_reason", ""),
                rate_limits={
                    str(k): float(v) for k, v in json.loads(fields.get("rate_limits", "{}")).items()
                },
            )
        return out

    async def disable(self, account_id: str, reason: str) -> None:
        await self._call(
            self.client.hset(self._account_key("health", account_id), "disabled", reason)
        )

    async def enable(self, account_id: str) -> None:
        await self._call(self.client.hdel(self._account_key("health", account_id), "disabled"))

    async def cool_down(self, account_id: str, until: float, reason: str) -> float:
        raw = await self._call(
            self._cool_down(
                keys=[self._account_key("health", account_id)], args=[_number(until), reason]
            )
        )
        return float(raw)

    async def clear_failures(self, account_id: str) -> None:
        await self._call(
            self.client.hdel(
                self._account_key("health", account_id), "cooldown_until", "cooldown_reason"
            )
        )

    async def set_rate_limits(self, account_id: str, figures: Mapping[str, float]) -> None:
        encoded = json.dumps({k: float(v) for k, v in figures.items()}, sort_keys=True)
        await self._call(
            self.client.hset(self._account_key("health", account_id), "rate_limits", encoded)
        )

    # in-flight leases

    async def acquire_lease(self, account_id: str, ttl_s: float) -> Lease:
        now = self._clock()
        lease = Lease(uuid.uuid4().hex, account_id, now + ttl_s)
        await self._call(
            self._acquire(keys=[self._lease_key(lease)], args=self._lease_args(lease, now, ttl_s))
        )
        return lease

    async def renew_lease(self, lease: Lease, ttl_s: float) -> Lease | None:
        now = self._clock()
        renewed = Lease(lease.id, lease.account_id, now + ttl_s)
        ok = await self._call(
            self._renew(keys=[self._lease_key(lease)], args=self._lease_args(renewed, now, ttl_s))
        )
        return renewed if int(ok) else None

    async def release_lease(self, lease: Lease) -> None:
        await self._call(self.client.zrem(self._lease_key(lease), lease.id))

    async def in_flight(self, account_ids: Sequence[str]) -> dict[str, int]:
        now = _number(self._clock())
        pipe = self.client.pipeline(transaction=False)
        for account_id in account_ids:
            key = self._account_key("leases", account_id)
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zcard(key)
        replies = await self._call(pipe.execute())
        return {a: int(replies[2 * i + 1]) for i, a in enumerate(account_ids)}

    def _lease_key(self, lease: Lease) -> str:
        return self._account_key("leases", lease.account_id)

    @staticmethod
    def _lease_args(lease: Lease, now: float, ttl_s: float) -> list[str | int]:
        return [_number(now), _number(lease.expires_at), lease.id, ttl_ms(ttl_s)]

    # token chains

    async def token_view(self, account_id: str) -> TokenView:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self._account_key("tokens", account_id))
        pipe.exists(self._account_key("refresh-lock", account_id), self._recovering_key)
        fields, locked = await self._call(pipe.execute())
        # While the store recovers, the lock counts as held: waiters wait for re-offers.
        return TokenView(_token_record(cast(dict[str, str], fields)), bool(locked))

    async def write_tokens(
        self,
        account_id: str,
        record: TokenRecord,
        *,
        base_generation: int | None,
        fence: int | None,
    ) -> bool:
        args: list[str | int] = [
            "" if base_generation is None else str(base_generation),
            "" if fence is None else str(fence),
            str(record.generation),
            str(record.fence),
            record.sealed,
            "" if record.retry_at is None else _number(record.retry_at),
            str(record.failures),
            record.last_failure or "",
        ]
        keys = [self._account_key("tokens", account_id)]
        return bool(await self._call(self._write_tokens(keys=keys, args=args)))

    async def take_refresh_lock(self, account_id: str, lease_s: float) -> RefreshLock:
        salt = await self._call(self.salt())
        keys = [
            self._account_key("refresh-lock", account_id),
            self._account_key("refresh-fence", account_id),
            self._account_key("tokens", account_id),
            self._recovering_key,
            self._salt_key,
        ]
        args: list[str | int] = [ttl_ms(lease_s), salt]
        fence, ttl = await self._call(self._take_lock(keys=keys, args=args))
        if int(fence):
            return RefreshLock(int(fence))
        if int(ttl) == -1:
            await self._call(self.check_epoch())  # the store lost its data: recovering now
            return RefreshLock(None, self.recovery_grace_s)
        return RefreshLock(None, max(0.0, int(ttl) / 1000))

    async def release_refresh_lock(self, account_id: str, fence: int) -> None:
        keys = [self._account_key("refresh-lock", account_id)]
        await self._call(self._release_lock(keys=keys, args=[str(fence)]))

    async def close(self) -> None:
        await self.client.aclose()


def _token_record(fields: Mapping[str, str]) -> TokenRecord | None:
    if "gen" not in fields:
        return None
    retry_at = fields.get("retry_at") or None
    return TokenRecord(
        generation=int(fields["gen"]),
        fence=int(fields.get("fence") or 0),
        sealed=fields.get("sealed", ""),
        retry_at=float(retry_at) if retry_at is not None else None,
        failures=int(fields.get("failures") or 0),
        last_failure=fields.get("last_failure") or None,
    )
