"""Lua scripts for multi-key steps done in one round trip. Each lists its KEYS and ARGV."""
import functools
import hashlib
import json

from redis.exceptions import ConnectionError, NoScriptError

from . import direct

# KEYS[i]: a profile's subscriptions hash. ARGV: for each key in turn, the hash_id and the address's identity (as
# subscriptions.read_address gives it) of the subscription meant; before the first, and wherever the resource or the
# channel is not the previous one's, "" (never a hash_id) and then the resource id and the channel of those that follow
# (a bulk call is mostly one run). Returns a string of "1"/"0", one per key: "1" when the record is there, is that
# subscription (two addresses of a profile can share a hash_id: its resource, channel and address must be the ones
# given) and is not deleted (`is_delete`, stored as "x" in the compact form), since a deleted subscription is sent no
# new messages (the links already sent keep working). One EVAL instead of a pipeline of N reads: packing and parsing
# 1000 replies cost more than the lookups. No string is built per record: an email's or a phone's address, a plain
# string in the compact form, is compared as it is, and another address's identity is read from its fields (a chat id,
# which cjson reads as a double, compared as a number). Globals are read once, into locals: the lookups saved pay for
# the checks, and on 1000 links the script costs about 5 % more than the existence check alone did, for the identities
# passed.
SUBSCRIPTIONS_EXIST = """
local call, decode, pcall, type, keys, argv = redis.call, cjson.decode, pcall, type, KEYS, ARGV
local function str(v) return type(v) == 'string' and v or nil end
local function identity(a)
  if type(a) ~= 'table' then return nil end
  if str(a.email) then return a.email end
  if str(a.phone) then return a.phone end
  if str(a.provider) and str(a.subscription_id) then return a.provider .. '\\0' .. a.subscription_id end
  local cc = a.cc_data
  if type(cc) ~= 'table' then return nil end
  if str(cc.phone) then return cc.phone end
  if type(cc.id) == 'number' then return cc.id end
end
local out, j, rid, channel = {}, 1, nil, nil
for i = 1, #keys do
  if argv[j] == '' then
    rid, channel, j = tonumber(argv[j + 1]), argv[j + 2], j + 3
  end
  local id = argv[j + 1]
  local ok, record = pcall(decode, call('HGET', keys[i], argv[j]) or 'null')
  j = j + 2
  local found = ok and type(record) == 'table' and not (record.x or record.is_delete)
  if found then
    local address = record.a or record.address
    found = (record.r or record.resource_id) == rid and (record.c or record.channel) == channel
    if found and address ~= id then
      local stored = identity(address)
      found = stored == id or (type(stored) == 'number' and stored == tonumber(id))
    end
  end
  out[i] = found and '1' or '0'
end
return table.concat(out)
"""


def subscriptions_exist(r, items):
    """[(subs_key, hash_id, resource_id, channel, identity)] -> [bool]; read-only."""
    if not items:
        return []
    args, last_rid, last_channel = [], None, None
    for _key, hash_id, rid, channel, identity in items:
        if rid != last_rid or channel != last_channel:
            args += ("", rid, channel)
            last_rid, last_channel = rid, channel
        args += (hash_id, identity)
    flags = r.eval_ro(SUBSCRIPTIONS_EXIST, len(items), *[key for key, *_ in items], *args)
    return [c == "1" for c in flags]


# KEYS[1]: a profile's subscriptions hash; ARGV[1]: the hash_id of a chat's subscription under its chat id's
# canonical spelling. Returns {ARGV[1], its stored record} when it is there, else the whole hash as HGETALL
# does: a chat stored under an older spelling of its id (hashed as written then) is found among them by its
# stored chat id (subscriptions.stored_hash_id). One round trip where an HEXISTS and then an HGET (or an
# HGETALL) took two.
SUBSCRIPTION_OR_ALL = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw then
  return {ARGV[1], raw}
end
return redis.call('HGETALL', KEYS[1])
"""


def subscription_or_all(r, subs_key, hash_id):
    """{hash_id: stored record} when the hash has hash_id, else all of it (see SUBSCRIPTION_OR_ALL); read-only."""
    flat = _run(r, SUBSCRIPTION_OR_ALL, [subs_key], [hash_id], read_only=True)
    return dict(zip(flat[::2], flat[1::2]))


@functools.cache
def _sha(script):
    return hashlib.sha1(script.encode()).hexdigest()


def run_direct(r, script, keys, args):
    """_run for the hot paths' one call per request (hotpaths.py): EVALSHA through direct.call, on this
    thread's own connection without redis-py's per-command layers, which cost about as much as the round trip
    itself. EVAL when Redis does not have the script (a restart); on a connection error the call is made again
    through _run, with redis-py's retries. A timeout (Redis stalled: waiting again would double the wait) and
    an error reply (a failed Lua script's writes stay, so it must not run twice) are raised as they are."""
    try:
        return direct.call(r, direct.pack("EVALSHA", _sha(script), len(keys), *keys, *args), 1)[0]
    except (NoScriptError, ConnectionError):
        pass  # not cached (a restart, SCRIPT FLUSH), or no connection (direct.call closed it): redis-py's way
    return _run(r, script, keys, args)


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

# The opening of the timer scripts: `now` is ARGV[1] (epoch seconds) when given, else the Redis server's clock.
NOW_FROM_ARGV1 = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end"""

# KEYS[1]: keys.pending_due(). ARGV[1]: "now" in epoch seconds, or "" for the server clock; ARGV[2]: seconds
# to subtract from now (grace); ARGV[3]: limit. Returns the members ("db_id|profile_id|hash_id") due by then,
# oldest deadline first. Read-only.
DUE_TIMERS = NOW_FROM_ARGV1 + """
now = now - tonumber(ARGV[2])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now), 'LIMIT', 0, tonumber(ARGV[3]))
"""

# Claim a batch of timers for settling and read what fire_timers needs to know of them, answered as one JSON
# document (one reply to parse instead of several per timer). A due timer is leased to the caller for a second
# (unsubscribe.FIRE_LEASE; field "lease" of its pending record: "<until>|<owner>"), so that concurrent sweepers
# and ticks do not all compute the same settlements; a lease only saves work, FIRE_TIMERS alone decides what
# fires.
# KEYS: 3 per timer: keys.pending_unsubscribe, keys.profile_subscriptions, keys.profile_events.
# ARGV[1]: "now" in epoch seconds, or "" for the server clock; ARGV[2]: lease seconds; ARGV[3]: the caller's
# owner token; then the timers' hash_ids.
# Returns a JSON array with, per timer: [deadline, armed_at, scope, smid, evidence (the pending record's
# fields), subscription JSON, ledger length, last event's seq, last event's hash], "" (or 0) for what does not
# exist, the seq and hash null for a newest ledger entry that is not an event (damaged: the caller chains past it,
# events.chain_tip); or ["leased"] when another caller holds an unexpired lease on it; or [error text] when its
# data cannot be read (a key of the wrong type), so one broken record holds up no other.
CLAIM_TIMERS = NOW_FROM_ARGV1 + """
local lease = string.format('%.6f', now + tonumber(ARGV[2])) .. '|' .. ARGV[3]

local function claim(i)
  local pending = KEYS[3 * i - 2]
  local p = redis.call('HMGET', pending, 'deadline', 'armed_at', 'scope', 'smid', 'evidence', 'lease')
  if p[1] and p[6] then
    local bar = string.find(p[6], '|', 1, true)
    if string.sub(p[6], bar + 1) ~= ARGV[3] and tonumber(string.sub(p[6], 1, bar - 1)) > now then
      return {'leased'}
    end
  end
  if p[1] and tonumber(p[1]) <= now then
    redis.call('HSET', pending, 'lease', lease)
  end
  local sub = redis.call('HGET', KEYS[3 * i - 1], ARGV[i + 3])
  local n = redis.call('LLEN', KEYS[3 * i])
  local seq, hash = 0, ''
  if n > 0 then
    local ok, last = pcall(cjson.decode, redis.call('LINDEX', KEYS[3 * i], -1))
    seq, hash = cjson.null, cjson.null
    if ok and type(last) == 'table' then  -- events.encode_event's names, or the long form
      seq, hash = last['q'] or last['seq'] or cjson.null, last['x'] or last['hash'] or cjson.null
    end
  end
  return {p[1] or '', p[2] or '', p[3] or '', p[4] or '', p[5] or '', sub or '', n, seq, hash}
end

local out = {}
for i = 1, #ARGV - 3 do
  local ok, row = pcall(claim, i)
  if ok then
    out[i] = row
  else
    out[i] = {type(row) == 'table' and row['err'] or tostring(row)}
  end
end
return cjson.encode(out)
"""

# Compare-and-settle a batch of timers: the Lua equivalent of a WATCH/MULTI per timer, for many timers in one
# call. The caller read each timer's state (CLAIM_TIMERS) and built the new subscription JSON and the chained
# ledger event in Python (events are SHA-256 chained there); for each timer this script applies them only if
# nothing it read has changed and the deadline has passed. Whether the resource is blocked is decided here, by
# its mode as it is when the timer settles: a block that came after the caller read the resource still wins.
# KEYS[1]: keys.pending_due(); KEYS[2]: keys.events_timeline(); then 5 per timer: keys.pending_unsubscribe,
#   keys.profile_subscriptions, keys.profile_events, keys.db_profiles, keys.resource of the subscription's
#   resource (keys.resource("") when there is no subscription: a key that never exists).
# ARGV[1]: "now" in epoch seconds, or "" for the server clock; ARGV[2]: a JSON array with, per timer: [due
#   member, hash_id, deadline and armed_at as read ("" when there was no pending record), subscription JSON as
#   read ("" = none), ledger length as read, new subscription JSON ("" = unchanged), event JSON ("" = none),
#   timeline ref, profile_id, resource_id].
# Returns one code per timer: "fired" (settled: pending record and due entry deleted, subscription and event
# written), "dropped" (its resource is blocked: nobody may unsubscribe from it, so the pending record and due
# entry are deleted and nothing else is written, and unblocking the resource later does not bring the timer
# back), "gone" (no pending record: cancelled or settled already; its due entry is removed), "early" (not
# due yet), "changed" (something changed since it was read: read again and retry), "broken" (one of its keys,
# or the timeline, holds the wrong type; checked before any write, so nothing is written).
FIRE_TIMERS = NOW_FROM_ARGV1 + """
local due, timeline = KEYS[1], KEYS[2]
local modes = {}  -- resource key -> its unsubscribe mode, decoded once per call (a batch shares few resources)

local function writable(key, kind)
  local found = redis.call('TYPE', key)['ok']
  if found ~= kind and found ~= 'none' then error(key .. ' holds a ' .. found) end
end

local function blocked(resource)
  if modes[resource] == nil then
    local ok, decoded = pcall(cjson.decode, redis.call('GET', resource) or 'null')
    local unsub = ok and type(decoded) == 'table' and decoded['unsubscribe']
    modes[resource] = type(unsub) == 'table' and unsub['mode'] or ''
  end
  return modes[resource] == 'blocked'
end

local function check(pending, subs, events, profiles, resource, member, hash_id, deadline, armed_at, expected,
                     length)
  writable(profiles, 'set')  -- the writes below must not fail halfway: a change without its event
  writable(timeline, 'stream')
  local p = redis.call('HMGET', pending, 'deadline', 'armed_at')
  if not p[1] then
    redis.call('ZREM', due, member)
    return 'gone'
  elseif p[1] ~= deadline or p[2] ~= armed_at then
    return 'changed'
  elseif tonumber(p[1]) > now then
    return 'early'
  elseif (redis.call('HGET', subs, hash_id) or '') ~= expected or redis.call('LLEN', events) ~= length then
    return 'changed'
  elseif blocked(resource) then
    return 'dropped'
  end
  return nil
end

local out = {}
for i, item in ipairs(cjson.decode(ARGV[2])) do
  local pending, subs, events, profiles, resource = unpack(KEYS, 5 * i - 2, 5 * i + 2)
  local member, hash_id, deadline, armed_at, expected, length, new_sub, event, ref, profile_id, rid = unpack(item)
  local ok, code = pcall(check, pending, subs, events, profiles, resource, member, hash_id, deadline, armed_at,
                         expected, length)
  if not ok then
    code = 'broken'
  elseif code == nil or code == 'dropped' then
    redis.call('DEL', pending)
    redis.call('ZREM', due, member)
    if code == nil then
      if new_sub ~= '' then
        redis.call('HSET', subs, hash_id, new_sub)
        redis.call('SADD', profiles, profile_id)
      end
      if event ~= '' then
        redis.call('RPUSH', events, event)
        redis.call('XADD', timeline, '*', 'ref', ref, 'rid', rid, 'method', 'timer')
      end
      code = 'fired'
    end
  end
  out[i] = code
end
return out
"""


def due_timer_members(r, due_key, now=None, grace=0.0, limit=1000):
    """Members of the due index whose deadline is at most now - grace (server clock when now is None)."""
    return _run(r, DUE_TIMERS, [due_key], ["" if now is None else repr(float(now)), repr(float(grace)), int(limit)],
                read_only=True)


def claim_timers(r, timers, owner, lease, now=None):
    """Run CLAIM_TIMERS; `timers` is [(pending key, subscriptions key, events key, hash_id)]. Returns its rows."""
    if not timers:
        return []
    args = ["" if now is None else repr(float(now)), repr(float(lease)), owner, *(t[3] for t in timers)]
    return json.loads(_run(r, CLAIM_TIMERS, [k for t in timers for k in t[:3]], args))


def fire_timers(r, due_key, timeline_key, items, now=None):
    """Run FIRE_TIMERS; `items` is [(5 keys, 11 values)] per timer as documented there. Returns the codes."""
    if not items:
        return []
    keys = [due_key, timeline_key, *(k for item_keys, _values in items for k in item_keys)]
    values = json.dumps([list(v) for _keys, v in items], ensure_ascii=False, separators=(",", ":"))
    return _run(r, FIRE_TIMERS, keys, ["" if now is None else repr(float(now)), values])


# KEYS[1]: a lock key; ARGV[1]: the owner it must still have. Deletes it only then; returns 1 if deleted.
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def release_lock(r, key, owner):
    return _run(r, RELEASE_LOCK, [key], [owner]) == 1
