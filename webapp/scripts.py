"""Lua scripts for multi-key steps done in one round trip. Each lists its KEYS and ARGV."""
import functools
import hashlib

from redis.exceptions import NoScriptError

# KEYS[i]: a profile's subscriptions hash; ARGV[i]: a hash_id. Returns a string of "1"/"0", one per pair.
# One EVAL instead of a pipeline of N HEXISTS: packing and parsing 1000 replies cost more than the lookups.
SUBSCRIPTIONS_EXIST = """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HEXISTS', KEYS[i], ARGV[i]) == 1 and '1' or '0'
end
return table.concat(out)
"""


def subscriptions_exist(r, pairs):
    """[(subs_key, hash_id)] -> [bool]; read-only."""
    if not pairs:
        return []
    flags = r.eval_ro(SUBSCRIPTIONS_EXIST, len(pairs), *[k for k, _ in pairs], *[h for _, h in pairs])
    return [c == "1" for c in flags]


@functools.cache
def _sha(script):
    return hashlib.sha1(script.encode()).hexdigest()


def _run(r, script, keys, args, read_only=False):
    """EVALSHA `script` (EVAL when the server does not have it cached, e.g. after a restart)."""
    try:
        if read_only:
            return r.evalsha_ro(_sha(script), len(keys), *keys, *args)
        return r.evalsha(_sha(script), len(keys), *keys, *args)
    except NoScriptError:
        if read_only:
            return r.eval_ro(script, len(keys), *keys, *args)
        return r.eval(script, len(keys), *keys, *args)


# -- delayed unsubscribe timers (webapp/unsubscribe.py, "delayed mode") ------------------------------------
# One clock decides when a timer is due: the Redis server's (TIME), also used by arm_timer for the deadline,
# so clock skew between web and worker hosts can neither fire a timer early nor let a cancel sent before the
# deadline lose.

# KEYS[1]: keys.pending_due(). ARGV[1]: "now" in epoch seconds, or "" for the server clock; ARGV[2]: seconds
# to subtract from now (grace); ARGV[3]: limit. Returns the members ("db_id|profile_id|hash_id") due by then,
# oldest deadline first. Read-only.
DUE_TIMERS = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
now = now - tonumber(ARGV[2])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now), 'LIMIT', 0, tonumber(ARGV[3]))
"""

# Compare-and-settle a batch of timers: the Lua equivalent of fire_timer's WATCH/MULTI, for many timers in one
# round trip. The caller read each timer's state (pending record, subscription JSON, ledger length) and built
# the new subscription JSON and ledger event in Python (events are SHA-256 chained there); for each timer this
# script applies them only if nothing it read has changed and the deadline has passed.
# KEYS[1]: keys.pending_due(); KEYS[2]: keys.events_timeline(); then 4 per timer: keys.pending_unsubscribe,
#   keys.profile_subscriptions, keys.profile_events, keys.db_profiles.
# ARGV[1]: "now" in epoch seconds, or "" for the server clock; then 10 per timer: due member, hash_id,
#   deadline and armed_at as read ("" when the record was missing), subscription JSON as read ("" = none),
#   ledger length as read, new subscription JSON ("" = unchanged), event JSON ("" = none), timeline ref,
#   profile_id.
# Returns one code per timer: "fired" (settled: pending record and due entry deleted, subscription and event
# written), "gone" (no pending record: cancelled or settled already; its due entry is removed), "early" (not
# due yet), "changed" (something changed since it was read: read again and retry).
FIRE_TIMERS = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local due, timeline = KEYS[1], KEYS[2]
local out = {}
for i = 0, (#KEYS - 2) / 4 - 1 do
  local pending, subs, events, profiles = KEYS[3 + 4 * i], KEYS[4 + 4 * i], KEYS[5 + 4 * i], KEYS[6 + 4 * i]
  local a = 2 + 10 * i
  local member, hash_id = ARGV[a], ARGV[a + 1]
  local p = redis.call('HMGET', pending, 'deadline', 'armed_at')
  local code
  if not p[1] then
    redis.call('ZREM', due, member)
    code = 'gone'
  elseif p[1] ~= ARGV[a + 2] or p[2] ~= ARGV[a + 3] then
    code = 'changed'
  elseif tonumber(p[1]) > now then
    code = 'early'
  else
    local current = redis.call('HGET', subs, hash_id) or ''
    if current ~= ARGV[a + 4] or redis.call('LLEN', events) ~= tonumber(ARGV[a + 5]) then
      code = 'changed'
    else
      redis.call('DEL', pending)
      redis.call('ZREM', due, member)
      if ARGV[a + 6] ~= '' then
        redis.call('HSET', subs, hash_id, ARGV[a + 6])
        redis.call('SADD', profiles, ARGV[a + 9])
      end
      if ARGV[a + 7] ~= '' then
        redis.call('RPUSH', events, ARGV[a + 7])
        redis.call('XADD', timeline, '*', 'ref', ARGV[a + 8])
      end
      code = 'fired'
    end
  end
  out[i + 1] = code
end
return out
"""


def due_timer_members(r, due_key, now=None, grace=0.0, limit=1000):
    """Members of the due index whose deadline is at most now - grace (server clock when now is None)."""
    return _run(r, DUE_TIMERS, [due_key], ["" if now is None else repr(float(now)), repr(float(grace)), int(limit)],
                read_only=True)


def fire_timers(r, due_key, timeline_key, items, now=None):
    """Run FIRE_TIMERS; `items` is [(4 keys, 10 args)] per timer as documented there. Returns the codes."""
    if not items:
        return []
    keys = [due_key, timeline_key]
    args = ["" if now is None else repr(float(now))]
    for item_keys, item_args in items:
        keys.extend(item_keys)
        args.extend(item_args)
    return _run(r, FIRE_TIMERS, keys, args)


# KEYS[1]: a lock key whose holder refreshes it to a known TTL. ARGV[1]: milliseconds. Deletes the lock when its
# remaining time is below ARGV[1], i.e. its holder has not refreshed it for a while; returns 1 if deleted.
RELEASE_STALE_LOCK = """
local left = redis.call('PTTL', KEYS[1])
if left >= 0 and left < tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


def release_stale_lock(r, key, below_ms):
    return _run(r, RELEASE_STALE_LOCK, [key], [int(below_ms)]) == 1
