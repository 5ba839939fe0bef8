"""The two requests every sent message can cause at volume, in the fewest Redis round trips and commands.

Profiling both under gunicorn showed their time going mostly to Redis round trips (each one a socket write, a
wake-up of redis-server and a blocking read) and, on this kind of VM, to every command and script Redis runs
cold per request (a cold EVALSHA of six reads ~29 us of Redis CPU, each plain command a few us). So these do
the same reads and writes as the generic code paths in fewer calls, on direct.py's transport:

- the unsubscribe page GET/HEAD (`open_for_page`): open_smid's three reads, the pending timer, the Redis clock
  (a countdown is of the clock the deadline is on) and record_view's count as seven plain commands in one
  pipeline, where they took two round trips;
- the RFC 8058 one-click POST (`one_click`): open_smid's reads plus what the unsubscribe needs as five plain
  reads in one pipeline, then one compare-and-set Lua call (APPLY) that writes the new record and its
  chained ledger event; the generic open_smid + unsubscribe took six round trips (three reads, WATCH,
  HGETALL, HGET of the pending timer's scope, LINDEX, MULTI/EXEC). A replay (nothing left to stop, no
  pending timer it settles) writes nothing and needs the reads only.

Results, errors, records and ledger events are exactly those of the generic paths: the decisions are made by
the same functions (unsubscribe.context_from, resolve_scope, unsubscribed_record, events.new_event, ...) on
the same data; only the transport differs. The one-click's reads are not one snapshot (open_smid's pipeline
is not either); APPLY writes only if the record, the last ledger entry and the pending timer's scope are
still what was read, else the generic WATCH/MULTI path (unsubscribe.unsubscribe) runs instead on fresh data.
"""
import json
import time

from . import direct, events, keys, scripts, unsubscribe
from .subscriptions import decode_for_change, encode_changed, encode_record, state_of
from .tokens import read_smid
from .validation import now_iso

ONE_CLICK = "one_click"

# Compare-and-set of one unsubscribe: the writes of ProfileChange.flush (record, profile set, ledger event,
# timeline entry) and of dropping a pending timer (only one that firing would leave nothing to do:
# unsubscribe.timer_settled, decided in Python), applied only if nothing the reads saw has changed.
# KEYS[1]: keys.profile_subscriptions; KEYS[2]: keys.profile_events; KEYS[3]: keys.pending_unsubscribe;
#   KEYS[4]: keys.pending_due(); KEYS[5]: keys.db_profiles; KEYS[6]: keys.events_timeline().
# ARGV[1]: hash_id; ARGV[2]: the subscription JSON as read; ARGV[3]: the last ledger entry as read ("" for
#   none: the ledger only grows, so an unchanged last entry means no event came since); ARGV[4]: the pending
#   timer's scope as read ("" for no timer); ARGV[5]: the new subscription JSON ("" = unchanged); ARGV[6]: the
#   ledger event JSON ("" = none); ARGV[7]: its timeline ref "db|pid|seq"; ARGV[8]: resource id; ARGV[9]:
#   method; ARGV[10]: the timer's member of KEYS[4]; ARGV[11]: profile id; ARGV[12]: 1 to drop the pending
#   timer, else 0.
# Returns 1 when applied, 0 (having written nothing) when the record, the ledger or the timer changed; an
# error, having written nothing, when a key it would write holds the wrong type (a write failing halfway would
# leave a change without its event).
APPLY = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if (redis.call('LINDEX', KEYS[2], -1) or '') ~= ARGV[3] then return 0 end
if (redis.call('HGET', KEYS[3], 'scope') or '') ~= ARGV[4] then return 0 end
local writes = {[4] = ARGV[12] == '1' and 'zset', [5] = ARGV[5] ~= '' and 'set', [6] = ARGV[6] ~= '' and 'stream'}
for i, kind in pairs(writes) do
  local found = kind and redis.call('TYPE', KEYS[i])['ok']
  if found and found ~= kind and found ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. found .. ', nothing written')
  end
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
  redis.call('SADD', KEYS[5], ARGV[11])
end
if ARGV[6] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[6])
  redis.call('XADD', KEYS[6], '*', 'ref', ARGV[7], 'rid', ARGV[8], 'method', ARGV[9])
end
if ARGV[12] == '1' then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[10])
end
return 1
"""


def _read_for_page(r, smid, token, method):
    """[resource JSON, subscription JSON, view counts as read before this view, pending timer's hash, TIME], with
    record_view's count pipelined after the reads: plain commands (a Lua call that decided whether to count
    cost Redis about five times as much CPU as these seven commands)."""
    views = keys.page_views(unsubscribe.view_digest(token))
    reply = direct.pipeline(r, (("GET", keys.resource(smid.resource_id)),
                                ("HGET", keys.profile_subscriptions(smid.db_id, smid.profile_id), smid.hash_id),
                                ("HGETALL", views),
                                ("HGETALL", keys.pending_unsubscribe(smid.db_id, smid.profile_id, smid.hash_id)),
                                ("TIME",),
                                ("HINCRBY", views, method, 1),
                                ("EXPIRE", views, unsubscribe.VIEW_TTL_SECONDS)), raise_errors=False)
    # The count is telemetry: a Redis refusing writes (out of memory, a failed snapshot) still shows the page.
    for value in reply[:5]:
        direct.raise_error(value)
    return reply[:5]


def _one_click_keys(smid):
    """The keys of the subscription a one-click reads and writes: its profile's records, its ledger, its
    pending timer."""
    db_id, profile_id, hash_id = smid.db_id, smid.profile_id, smid.hash_id
    return (keys.profile_subscriptions(db_id, profile_id), keys.profile_events(db_id, profile_id),
            keys.pending_unsubscribe(db_id, profile_id, hash_id))


def _read_for_one_click(r, smid, token, subscription_keys):
    """[resource JSON, subscription JSON, view counts, pending timer's scope JSON, last ledger entry], ""
    where a key or field is missing, but None for an empty ledger: a newest entry "" is a damaged one, chained
    past (events.chain_tip). Plain reads, nothing to decide inside Redis."""
    subs_key, events_key, pending_key = subscription_keys
    reply = direct.pipeline(r, (("GET", keys.resource(smid.resource_id)),
                                ("HGET", subs_key, smid.hash_id),
                                ("HGETALL", keys.page_views(unsubscribe.view_digest(token))),
                                ("HGET", pending_key, "scope"),
                                ("LINDEX", events_key, -1)))
    return ["" if value is None else value for value in reply[:4]] + [reply[4]]


def _as_dict(reply):
    """An HGETALL reply: a flat list on a RESP2 connection, a map on RESP3."""
    return reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2]))


def _context(token, smid, reply):
    return unsubscribe.context_from(token, smid, reply[0] or None, reply[1] or None, _as_dict(reply[2]))


def open_for_page(r, ring, token, method):
    """unsubscribe.open_smid and unsubscribe.record_view(r, token, method) in one round trip: the view is
    counted for any validly signed link, also when open_smid then raises. Returns the Context (its view counts
    as read before this view); raises what open_smid raises."""
    smid = read_smid(ring, token)
    reply = _read_for_page(r, smid, token, method)
    ctx = _context(token, smid, reply)
    ctx.pending_fields = _as_dict(reply[3])
    ctx.now = int(reply[4][0]) + int(reply[4][1]) / 1_000_000
    return ctx


def _context_for_change(token, smid, reply):
    """(Context, stored members) for one_click: the Context of _context, its record only what an unsubscribe
    reads of it (subscriptions.decode_for_change), and the stored members encode_changed writes the change
    into; the full _context, and no stored members, for a record that is missing, in the long form or not
    readable (subscriptions.readable_record: no record)."""
    try:
        stored = json.loads(reply[1]) if reply[0] and reply[1] else None
    except ValueError:
        stored = None
    record = decode_for_change(stored) if type(stored) is dict else None
    if record is None:
        return _context(token, smid, reply), None
    return unsubscribe.context_from(token, smid, reply[0], reply[1], _as_dict(reply[2]), record=record), stored


def one_click(r, ring, token, evidence):
    """open_smid, then unsubscribe(r, ctx, resolve_scope(ctx), "one_click", evidence), in two round trips
    (one for a replay). Returns {"changed": bool, "state": {...}}; raises what those raise."""
    smid = read_smid(ring, token)
    subscription_keys = _one_click_keys(smid)
    reply = _read_for_one_click(r, smid, token, subscription_keys)
    ctx, stored = _context_for_change(token, smid, reply)
    pending_scope, last_raw = reply[3], reply[4]
    scope = unsubscribe.resolve_scope(ctx)
    # What unsubscribe and its change function do, with ProfileChange.save and flush:
    unsubscribe._check_not_blocked(ctx)
    db_id, profile_id, hash_id = ctx.key
    record = ctx.record
    new = unsubscribe.unsubscribed_record(ctx.resource, record, scope)
    changed = new != record
    drop = bool(pending_scope) and unsubscribe.timer_settled(ctx.resource, new, pending_scope)
    if not changed and not drop:
        return {"changed": False, "state": state_of(ctx.resource, new)}
    new_raw = event_raw = ref = ""
    after = None
    if changed:
        if stored is None:
            new["updated_at"] = now_iso()
            new_raw = encode_record(new)
        else:
            new_raw = encode_changed(stored, new["status"], new["uncats"], time.time_ns() // 1_000_000)
        before, after = state_of(ctx.resource, record), state_of(ctx.resource, new)
        if before != after:
            last = events.chain_tip(r, db_id, profile_id, last_raw)  # APPLY checks last_raw is still the newest
            event = events.new_event(last, db_id=db_id, profile_id=profile_id,
                                     resource_id=new["resource_id"], channel=new["channel"], hash_id=hash_id,
                                     method=ONE_CLICK, before=before, after=after, smid=token,
                                     evidence=unsubscribe._evidence(ctx, evidence))
            event_raw = events.encode_event(event)
            ref = f"{db_id}|{profile_id}|{event['seq']}"
    applied = scripts.run_direct(
        r, APPLY, (*subscription_keys, keys.pending_due(), keys.db_profiles(db_id), keys.events_timeline()),
        (hash_id, reply[1], last_raw or "", pending_scope, new_raw, event_raw, ref, new["resource_id"], ONE_CLICK,
         keys.pending_due_member(db_id, profile_id, hash_id), profile_id, "1" if drop else "0"))
    if not applied:
        return unsubscribe.unsubscribe(r, ctx, scope, ONE_CLICK, evidence)
    return {"changed": changed, "state": after or state_of(ctx.resource, new)}
