"""The two requests every sent message can cause at volume, in the fewest Redis round trips.

Profiling both under gunicorn showed their time going mostly to Redis round trips (each one a socket write, a
wake-up of redis-server and a blocking read, plus redis-py's packing and parsing per command), so these do
the same reads and writes as the generic code paths in fewer calls:

- the unsubscribe page GET/HEAD (`open_for_page`): open_smid's three reads and record_view's count in one
  Lua call (READ), where they took two round trips;
- the RFC 8058 one-click POST (`one_click`): open_smid's reads plus what the unsubscribe needs (READ), then
  one compare-and-set Lua call (APPLY) that writes the new record and its chained ledger event; the generic
  open_smid + unsubscribe took six round trips (three reads, WATCH, HGETALL, EXISTS, LINDEX, MULTI/EXEC).
  A replay (nothing left to stop, no pending timer) writes nothing and needs READ only.

Results, errors, records and ledger events are exactly those of the generic paths: the decisions are made by
the same functions (unsubscribe.context_from, resolve_scope, unsubscribed_record, events.new_event, ...) on
the same data; only the transport differs. If APPLY finds that the record, the ledger or the pending timer
changed since READ, the generic WATCH/MULTI path (unsubscribe.unsubscribe) runs instead on fresh data.
"""
from . import direct, events, keys, scripts, unsubscribe
from .subscriptions import encode_record, state_of
from .tokens import read_smid
from .validation import now_iso

ONE_CLICK = "one_click"

# What open_smid reads, optionally counting a page view and reading what the one-click needs, in one call.
# KEYS[1]: keys.resource; KEYS[2]: keys.profile_subscriptions; KEYS[3]: keys.page_views; KEYS[4]:
#   keys.pending_unsubscribe; KEYS[5]: keys.profile_events.
# ARGV[1]: hash_id; ARGV[2]: the SMID's resource id; ARGV[3]: "GET"/"HEAD" to count a page view, else "";
#   ARGV[4]: the view counts' TTL (seconds); ARGV[5]: "1" to read the pending timer and the ledger.
# Returns {resource JSON, subscription JSON ("" when missing), [view counts as read, field, value, ...]} and,
# with ARGV[5], {pending timer exists (0/1), ledger length, last ledger event JSON ("" when empty)}.
# The view is counted only when open_smid would succeed (record_view runs only then): the resource and the
# subscription exist, the subscription is not deleted and belongs to the resource (resources are stored
# under their own id, so the SMID's resource id is the resource's "id").
READ = """
local res = redis.call('GET', KEYS[1])
local sub = redis.call('HGET', KEYS[2], ARGV[1])
local out = {res or '', sub or '', redis.call('HGETALL', KEYS[3])}
if ARGV[3] ~= '' and res and sub then
  local ok, rec = pcall(cjson.decode, sub)
  if ok and type(rec) == 'table' then
    -- subscriptions.encode_record's short names ("x" is_delete, "r" resource_id), or the old long form's
    local deleted = rec['x'] or rec['is_delete']
    if deleted == cjson.null or deleted == 0 or deleted == '' then deleted = false end
    if not deleted and (rec['r'] or rec['resource_id']) == tonumber(ARGV[2]) then
      redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
      redis.call('EXPIRE', KEYS[3], ARGV[4])
    end
  end
end
if ARGV[5] == '1' then
  local n = redis.call('LLEN', KEYS[5])
  out[4] = redis.call('EXISTS', KEYS[4])
  out[5] = n
  out[6] = n > 0 and redis.call('LINDEX', KEYS[5], -1) or ''
end
return out
"""

# Compare-and-set of one unsubscribe: the writes of ProfileChange.flush (record, profile set, ledger event,
# timeline entry) and of dropping a pending timer, applied only if nothing READ saw has changed.
# KEYS[1]: keys.profile_subscriptions; KEYS[2]: keys.profile_events; KEYS[3]: keys.pending_unsubscribe;
#   KEYS[4]: keys.pending_due(); KEYS[5]: keys.db_profiles; KEYS[6]: keys.events_timeline().
# ARGV[1]: hash_id; ARGV[2]: the subscription JSON as read; ARGV[3]: the ledger length as read; ARGV[4]: 1 if
#   a pending timer was read, else 0; ARGV[5]: the new subscription JSON ("" = unchanged); ARGV[6]: the
#   ledger event JSON ("" = none); ARGV[7]: its timeline ref "db|pid|seq"; ARGV[8]: resource id; ARGV[9]:
#   method; ARGV[10]: the timer's member of KEYS[4]; ARGV[11]: profile id.
# Returns 1 when applied, 0 (having written nothing) when the record, the ledger length or the timer changed.
APPLY = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[3]) then return 0 end
if redis.call('EXISTS', KEYS[3]) ~= tonumber(ARGV[4]) then return 0 end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
  redis.call('SADD', KEYS[5], ARGV[11])
end
if ARGV[6] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[6])
  redis.call('XADD', KEYS[6], '*', 'ref', ARGV[7], 'rid', ARGV[8], 'method', ARGV[9])
end
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[10])
end
return 1
"""


def _read(r, smid, token, count_view="", for_unsubscribe=False):
    """READ's reply. Without a view to count there is nothing to decide inside Redis, so the reads go as plain
    commands in one MULTI/EXEC: the same snapshot and the same reply, at a fraction of a script's cost to
    Redis (a cold EVALSHA took ~29 us of Redis CPU under load, its six reads ~6 us)."""
    db_id, profile_id, hash_id = smid.db_id, smid.profile_id, smid.hash_id
    subs, views = keys.profile_subscriptions(db_id, profile_id), keys.page_views(unsubscribe.view_digest(token))
    events_key = keys.profile_events(db_id, profile_id)
    if count_view:
        return scripts.run_direct(r, READ, (keys.resource(smid.resource_id), subs, views,
                                            keys.pending_unsubscribe(db_id, profile_id, hash_id), events_key),
                                  (hash_id, smid.resource_id, count_view, unsubscribe.VIEW_TTL_SECONDS,
                                   "1" if for_unsubscribe else ""))
    reads = [("GET", keys.resource(smid.resource_id)), ("HGET", subs, hash_id), ("HGETALL", views)]
    if for_unsubscribe:
        reads += [("EXISTS", keys.pending_unsubscribe(db_id, profile_id, hash_id)), ("LLEN", events_key),
                  ("LINDEX", events_key, -1)]
    reply = direct.read_transaction(r, reads)
    return ["" if value is None else value for value in reply]  # as READ answers a missing key


def _context(token, smid, reply):
    views = reply[2]  # HGETALL: a flat list from Lua, a map from a RESP3 connection's MULTI/EXEC
    return unsubscribe.context_from(token, smid, reply[0] or None, reply[1] or None,
                                    views if isinstance(views, dict) else dict(zip(views[::2], views[1::2])))


def open_for_page(r, ring, token, method):
    """unsubscribe.open_smid, then unsubscribe.record_view(r, ctx, method) if it succeeded, in one round trip.
    Returns the Context (its view counts as read before this view); raises what open_smid raises."""
    smid = read_smid(ring, token)
    return _context(token, smid, _read(r, smid, token, count_view=method))


def one_click(r, ring, token, evidence):
    """open_smid, then unsubscribe(r, ctx, resolve_scope(ctx), "one_click", evidence), in two round trips
    (one for a replay). Returns {"changed": bool, "state": {...}}; raises what those raise."""
    smid = read_smid(ring, token)
    reply = _read(r, smid, token, for_unsubscribe=True)
    ctx = _context(token, smid, reply)
    pending, ledger_len, last_raw = reply[3], reply[4], reply[5]
    scope = unsubscribe.resolve_scope(ctx)
    # What unsubscribe and its change function do, with ProfileChange.save and flush:
    unsubscribe._check_not_blocked(ctx)
    db_id, profile_id, hash_id = ctx.key
    record = ctx.record
    new = unsubscribe.unsubscribed_record(ctx.resource, record, scope)
    changed = new != record
    if not changed and not pending:
        return {"changed": False, "state": state_of(ctx.resource, new)}
    new_raw = event_raw = ref = ""
    if changed:
        new["updated_at"] = now_iso()
        new_raw = encode_record(new)
        before, after = state_of(ctx.resource, record), state_of(ctx.resource, new)
        if before != after:
            last = events.decode_event(last_raw) if last_raw else None
            event = events.new_event(last, db_id=db_id, profile_id=profile_id,
                                     resource_id=new["resource_id"], channel=new["channel"], hash_id=hash_id,
                                     method=ONE_CLICK, before=before, after=after, smid=token,
                                     evidence=unsubscribe._evidence(ctx, evidence))
            event_raw = events.encode_event(event)
            ref = f"{db_id}|{profile_id}|{event['seq']}"
    applied = scripts.run_direct(
        r, APPLY, (keys.profile_subscriptions(db_id, profile_id), keys.profile_events(db_id, profile_id),
                   keys.pending_unsubscribe(db_id, profile_id, hash_id), keys.pending_due(),
                   keys.db_profiles(db_id), keys.events_timeline()),
        (hash_id, reply[1], ledger_len, pending, new_raw, event_raw, ref, new["resource_id"], ONE_CLICK,
         unsubscribe._due_member(db_id, profile_id, hash_id), profile_id))
    if not applied:
        return unsubscribe.unsubscribe(r, ctx, scope, ONE_CLICK, evidence)
    return {"changed": changed, "state": state_of(ctx.resource, new)}
