"""Unsubscribe flows: what a SMID may change, in which scope, and the delayed timer's state machine.

No Flask here: pages, one-click, the API's message_unsub, the SDK endpoint and the worker all call these.
Rules (contract §4):
- the scope is the categories asked for, else the message's category, else the whole subscription; a
  category unsubscribe that leaves no category subscribed unsubscribes the whole subscription;
- a person (pages, SDK) can always stop through a message's link what the message was sent for (its
  category, even a `required` one, as its RFC 8058 one-click does), and may choose other categories there,
  but not `required` ones (person_may_stop: the one rule); the sending platform's API may drop any;
- a blocked resource changes nothing (Blocked), and GET/HEAD callers never reach this module's writers;
- a soft-deleted subscription's links work as a live one's (the change lands on the stored record, which stays
  deleted); a deleted resource's links raise NoSuchResource;
- delayed mode keeps one pending record per subscription (keys.pending_unsubscribe) holding the deadline,
  scope and evidence, with deadlines on the Redis clock. The record is the truth: a cancel, and an unsubscribe
  that leaves the timer nothing to do (not one for another category), settle it under WATCH/MULTI, and a
  firer (sweeper or RQ tick) settles it with a Lua compare-and-set that writes only if the record, the
  subscription and the ledger are what it read; a Lua write breaks a concurrent WATCH, so whichever comes
  first wins and the other sees it is gone. Arming twice keeps the deadline.
"""
import itertools
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass, field

from . import events, keys, scripts
from .errors import Blocked, Conflict, InvalidInput, NoSuchResource, NoSuchSubscription, report_broken
from .resources import decode_shared, get_resources, readable
from .subscriptions import (Status, decode_record, drop_pending, encode_record, readable_record, state_of,
                            subscribed_cats, update_profile, with_state)
from .tokens import link_digest, read_smid
from .validation import now_iso

log = logging.getLogger(__name__)
UNDO_WINDOW_SECONDS = 600
VIEW_TTL_SECONDS = 600  # how long a SMID's page-view counts are kept
UNDOABLE_METHODS = ("page_instant", "page_confirm", "timer", "page_now", "sdk")
FINAL_STATUSES = (Status.COMPLAINED, Status.HARDBOUNCED, Status.INVALID)
STOPPABLE_STATUSES = (Status.SUBSCRIBED, Status.SUSPENDED, Status.UNCONFIRMED)  # messages come, or will again


@dataclass
class Context:
    token: str
    smid: object
    resource: dict
    record: dict
    views: dict = field(default_factory=dict)  # recent GET/HEAD counts of this SMID's page (scanner evidence)
    pending_fields: dict = None  # the pending timer's hash as read with the SMID, the page or the SDK's state
    now: float = None  # the Redis clock (epoch seconds) as read with them: deadlines are on it, not the host's

    @property
    def key(self):
        return self.smid.db_id, self.smid.profile_id, self.smid.hash_id

    @property
    def mode(self):
        return self.resource["unsubscribe"]["mode"]


def open_smid(r, ring, token, with_pending=False):
    """Verify the SMID and load its resource and subscription; with_pending: its pending timer too (what
    read_pending then returns), for a caller that acts on it. Raises BadToken, NoSuchResource (also for a
    deleted resource), NoSuchSubscription. A soft-deleted subscription opens (see context_from)."""
    smid = read_smid(ring, token)
    with r.pipeline(transaction=False) as pipe:  # one round trip for all the reads
        pipe.get(keys.resource(smid.resource_id))
        pipe.hget(keys.profile_subscriptions(smid.db_id, smid.profile_id), smid.hash_id)
        pipe.hgetall(keys.page_views(view_digest(token)))
        pipe.time()
        if with_pending:
            pipe.hgetall(keys.pending_unsubscribe(smid.db_id, smid.profile_id, smid.hash_id))
        resource_raw, raw, views, (seconds, micros), *pending = pipe.execute()
    ctx = context_from(token, smid, resource_raw, raw, views)
    ctx.pending_fields = pending[0] if pending else None
    ctx.now = seconds + micros / 1_000_000
    return ctx


def context_from(token, smid, resource_raw, raw, views, record=None):
    """open_smid's checks of what it read (None where a key or field is missing); returns the Context.
    Also used by hotpaths.py, which reads the same keys in one pipeline together with what its caller needs,
    and may pass the record it decoded itself from `raw` (subscriptions.decode_for_change)."""
    resource = None if resource_raw is None else readable(resource_raw, smid.resource_id, decode_shared)
    if resource is None:
        raise NoSuchResource(f"resource {smid.resource_id} does not exist")
    if record is None:
        record = readable_record(raw, f"subscription {smid.hash_id} of a link") if raw else None
    # A soft-deleted subscription (`is_delete`) is still stored and `undelete` brings it back, so its sent
    # links keep working: an opt-out made through one meanwhile must hold after the undelete.
    if record is None or record["resource_id"] != resource["id"]:
        raise NoSuchSubscription("this subscription no longer exists")
    return Context(token, smid, resource, record, {k: int(v) for k, v in views.items()})


def view_digest(token):
    """Page-view counters are keyed by a digest, so Redis keys never hold a whole SMID."""
    return link_digest(token)


def record_view(r, token, method):
    """Count a GET or HEAD of the SMID's page for a few minutes: scanners fetch, people click. This is
    telemetry, not subscription state; it never changes what the person receives. Every fetch of a validly
    signed link counts, also one whose subscription or resource is gone (hotpaths.open_for_page counts in the
    same round trip as its reads, before it knows)."""
    key = keys.page_views(view_digest(token))
    with r.pipeline(transaction=False) as pipe:
        pipe.hincrby(key, method, 1)
        pipe.expire(key, VIEW_TTL_SECONDS)
        pipe.execute()


def message_category(ctx):
    """The category the message was sent for, when the resource still has it. A link outlives a category the
    sender deletes; its message then stands for the whole subscription, so that its unsubscribe stops mail."""
    category = ctx.smid.category
    return category if category and any(c["api_name"] == category for c in ctx.resource["categories"]) else None


def person_may_stop(cat, own):
    """Whether a person (pages, SDK) may choose to stop the category `cat` through the link of a message sent
    for `own` (message_category: None for the whole subscription): one that is not `required`, and the one
    the message was sent for, required or not, since an opt-out from what was received must work (CAN-SPAM;
    the one-click mail providers show stops it too). `required` keeps people from choosing the others."""
    return not cat["required"] or cat["api_name"] == own


def resolve_scope(ctx, categories=None, by_person=True):
    """Return the scope {"cats": [...]} (categories) or {"cats": None} (whole subscription).

    Raises InvalidInput for an unknown category, or one a person asked for that person_may_stop refuses.
    """
    own = message_category(ctx)
    if categories is None:
        return {"cats": [own] if own else None}
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise InvalidInput("categories must be a list of category api names", field="categories")
    by_name = {c["api_name"]: c for c in ctx.resource["categories"]}
    for cat in categories:
        if cat not in by_name:
            raise InvalidInput(f"category {cat!r} is not a category of this resource", field="categories")
        if by_person and not person_may_stop(by_name[cat], own):
            raise InvalidInput(f"category {cat!r} is required: only a message sent for it can unsubscribe from it",
                               field="categories")
    if not categories:
        raise InvalidInput("choose at least one category", field="categories")
    return {"cats": list(dict.fromkeys(categories))}


def describe_scope(resource, scope):
    """What stops and what continues, as category titles (for the page's exact preview)."""
    cats = resource["categories"]
    if scope["cats"] is None:
        return {"whole": True, "stops": [c["title"] for c in cats], "continues": []}
    stops = [c["title"] for c in cats if c["api_name"] in scope["cats"]]
    continues = [c["title"] for c in cats if c["api_name"] not in scope["cats"]]
    return {"whole": not continues, "stops": stops, "continues": continues}


def unsubscribed_record(resource, record, scope):
    """The record after applying `scope`; unchanged when there is nothing left to stop. A paused (suspended)
    or unconfirmed subscription is stopped too: its messages would come again, when the pause ends or once
    confirmed."""
    new = dict(record)
    if record["status"] not in STOPPABLE_STATUSES:
        return new
    if scope["cats"] is not None:
        new["uncats"] = sorted(set(record.get("uncats", [])) | set(scope["cats"]))
        if subscribed_cats(resource, new):
            return new
    new["status"] = int(Status.UNSUBSCRIBED)  # a pause's end is kept: an undo within it brings the pause back
    return new


def _check_not_blocked(ctx):
    if ctx.mode == "blocked":
        raise Blocked(ctx.resource["unsubscribe"].get("blocked_text") or "this subscription cannot be cancelled here")


def _evidence(ctx, evidence):
    """The ledger's evidence: time since send, the page's recent GET/HEAD counts and the recipient's mail
    domain (the signals the scanner review in scanner.py looks at), plus what the caller saw."""
    email = ctx.record["address"].get("email")
    return {"seconds_since_send": max(0, int(time.time()) - ctx.smid.sent_at),
            "page_views": dict(ctx.views), "recipient_domain": email.rpartition("@")[2] if email else None,
            **(evidence or {})}


def unsubscribe(r, ctx, scope, method, evidence=None, allow_blocked=False):
    """Apply an unsubscribe now (idempotent). Settles a pending timer of the subscription too, when firing it
    would change nothing any more (timer_settled): a timer for another category, or for the whole subscription
    when this stops only some categories, keeps waiting for its deadline.

    Returns {"changed": bool, "state": {...}}. Raises Blocked for a blocked resource.
    """
    if not allow_blocked:
        _check_not_blocked(ctx)
    db_id, profile_id, hash_id = ctx.key
    pending_key = keys.pending_unsubscribe(db_id, profile_id, hash_id)

    def change(pc):
        record = pc.records.get(hash_id)
        if record is None:
            raise NoSuchSubscription("this subscription no longer exists")
        new = unsubscribed_record(ctx.resource, record, scope)
        changed = new != record
        if changed:
            new["updated_at"] = now_iso()
            pc.save(hash_id, new, ctx.resource, method=method, smid=ctx.token, evidence=_evidence(ctx, evidence))
        pending_scope = pc.pipe.hget(pending_key, "scope")
        pc.timer_checked.add(hash_id)  # read here already: flush need not read it again
        if pending_scope is not None and timer_settled(ctx.resource, new, pending_scope):
            pc.also(lambda pipe: drop_pending(pipe, db_id, profile_id, hash_id))
        return {"changed": changed, "state": state_of(ctx.resource, new)}

    return update_profile(r, db_id, profile_id, change, watch=(pending_key,))[0]


def undo(r, ctx, evidence=None):
    """Restore the state before this SMID's last unsubscribe, within UNDO_WINDOW_SECONDS.

    Raises Conflict when there is nothing to undo (too late, another change came after, final status).
    """
    db_id, profile_id, hash_id = ctx.key

    def change(pc):
        record = pc.records.get(hash_id)
        last = _own_recent_change(pc.pipe, ctx)
        if last is not None and last["method"] == "page_undo":  # undone already (a second click): the same answer
            return {"changed": False, "state": state_of(ctx.resource, record)}
        if last is None or last["method"] not in UNDOABLE_METHODS:
            raise Conflict("there is no recent unsubscribe to undo")
        if Status(record["status"]) in FINAL_STATUSES:
            raise Conflict("this subscription cannot be restored")
        restored = with_state(ctx.resource, record, last["before"])
        pc.save(hash_id, restored, ctx.resource, method="page_undo", smid=ctx.token,
                evidence=_evidence(ctx, evidence))
        return {"changed": True, "state": state_of(ctx.resource, restored)}

    return update_profile(r, db_id, profile_id, change)[0]


def can_undo(r, ctx):
    """Whether `undo` would restore something now (the page offers its Undo only then)."""
    last = _own_recent_change(r, ctx)
    return (last is not None and last["method"] in UNDOABLE_METHODS
            and Status(ctx.record["status"]) not in FINAL_STATUSES)


def _own_recent_change(r, ctx):
    """The subscription's last ledger event if this SMID made it within UNDO_WINDOW_SECONDS, else None."""
    db_id, profile_id, hash_id = ctx.key
    recent = map(events.read_chained_event, r.lrange(keys.profile_events(db_id, profile_id), -50, -1))
    mine = [e for e in recent if e is not None and e.get("hash_id") == hash_id]  # damaged entries passed over
    if not mine or mine[-1]["smid"] != ctx.token:
        return None
    made_ms = events.id_ms(mine[-1])
    return mine[-1] if made_ms is not None and made_ms / 1000 >= time.time() - UNDO_WINDOW_SECONDS else None


# -- delayed mode -------------------------------------------------------------------------------------
#
# The pending record (keys.pending_unsubscribe) is the truth, indexed by deadline in keys.pending_due. Every
# step that settles it is atomic against the others:
# - cancel_timer deletes it in a WATCH/MULTI transaction that also watches the record; so does an unsubscribe
#   ("now", one-click, the API, the SDK) that leaves firing it nothing to do (timer_settled), while one that
#   leaves it something to stop (another category; some categories of a whole-subscription timer) leaves it
#   waiting for its deadline;
# - fire_timers (the workers' sweepers, the RQ tick job and fire_timer) read a batch of timers in one Lua call
#   (scripts.CLAIM_TIMERS, which also leases due ones to the caller for FIRE_LEASE seconds so that concurrent
#   firers do not all do the same work), build each new subscription and chained ledger event in Python, and
#   apply them with one Lua call (scripts.FIRE_TIMERS) that writes a timer's changes only if its record,
#   subscription and ledger are still what was read and its deadline has passed, and that settles it without
#   a change if its resource is blocked then (a block made after the read still wins).
# A cancel that committed first leaves nothing to fire; a cancel that comes after the fire finds no record and
# answers "unsubscribed". Duplicate or late runs find nothing and change nothing.
# Deadlines come from the Redis server clock (TIME), and the Lua script decides "due" by the same clock.

MAX_TIMER_SECONDS = 30 * 60  # Altcraft's longest timer: no resource or setting arms one for longer
FIRE_BATCH = 500  # timers settled per Lua call
FIRE_ATTEMPTS = 5  # reads-and-applies of a timer whose state changed under us, before leaving it to the next sweep
# Seconds other firers leave a claimed timer alone. Should its claimer die between claiming and settling, the
# timer waits this long; a sweeper claims a timer within SWEEP_INTERVAL (0.1 s) of its deadline and the next
# sweep after the lease fires it, so it still fires within the contract's 2 s (about 1.2 s late). A live firer
# settles a batch in well under this; one slower than it only lets another firer do the same work, and
# FIRE_TIMERS's compare-and-set lets one of them write.
FIRE_LEASE = 1.0
# Seconds a timer whose data cannot be read waits before it is tried again: left at its deadline, it would come
# first in every sweep, and a batch of them would hold up every other timer.
BROKEN_RETRY_SECONDS = 60


def _parse_member(member):
    db_id, profile_id, hash_id = member.split("|")
    return int(db_id), profile_id, hash_id


def server_time(client):
    seconds, micros = client.time()
    return seconds + micros / 1_000_000


def read_pending(r, ctx):
    """The pending timer of this subscription as {"deadline", "scope", "smid", "armed_at", "evidence"}, or None;
    as read together with the page or the SMID when it was (every page shows a pending timer, in any mode). Its
    scope is what it stops if it fires now (timer_scope: a category the sender deleted meanwhile stands for the
    whole)."""
    raw = ctx.pending_fields if ctx.pending_fields is not None else r.hgetall(keys.pending_unsubscribe(*ctx.key))
    pending = _decode_pending(raw)
    if pending:
        pending["scope"] = timer_scope(ctx.resource, pending["scope"])
    return pending


def now_scope(ctx, pending):
    """What a page's "Unsubscribe now" stops, and so what the page describes: the link's scope, or while a timer
    is pending the timer's (read_pending); outside delayed mode (a timer that outlived a switch of mode, which
    the page cannot join) the link's own scope as well."""
    if not pending:
        return resolve_scope(ctx)
    if ctx.mode == "delayed":
        return pending["scope"]
    return widened_scope(pending["scope"], resolve_scope(ctx))


def seconds_left(pending, now):
    """Whole seconds until a pending timer's deadline, rounded up: a 30-minute timer just armed shows 30:00.
    `now` is the Redis clock (Context.now, server_time), which set the deadline and fires the timer: the web
    host's own clock may be off from it by any amount, and the person would be shown the time left wrong."""
    return max(0, math.ceil(pending["deadline"] - now))


def _decode_pending(raw):
    if not raw:
        return None
    return {"deadline": float(raw["deadline"]), "scope": json.loads(raw["scope"]), "smid": raw["smid"],
            "armed_at": float(raw["armed_at"]), "evidence": json.loads(raw.get("evidence", "{}"))}


def pending_fields(ctx, scope, now, deadline, evidence=None):
    """The pending record's hash fields for a timer armed at `now` (epoch seconds) ending at `deadline`."""
    return {"deadline": repr(deadline), "armed_at": repr(now), "scope": json.dumps(scope),
            "smid": ctx.token, "evidence": json.dumps(_evidence(ctx, evidence))}


def queue_pending_writes(pipe, db_id, profile_id, hash_id, fields):
    """Add the writes that store a new pending record (and index it by deadline) to `pipe`."""
    pending_key = keys.pending_unsubscribe(db_id, profile_id, hash_id)
    deadline = float(fields["deadline"])
    pipe.hset(pending_key, mapping=fields)
    # No expiry: a record lives until a cancel or a firer settles it (deletes it), however late that is. One
    # that expired would drop the person's unsubscribe unasked when the workers, or the whole service, were
    # down for long past the deadline (Redis expires a key on load too), or when the Redis host's clock
    # stepped ahead.
    pipe.zadd(keys.pending_due(), {keys.pending_due_member(db_id, profile_id, hash_id): deadline})


def widened_scope(pending_scope, scope):
    """The scope of a pending timer once `scope` joins it: the union of their categories, or the whole
    subscription when either is whole."""
    if pending_scope["cats"] is None or scope["cats"] is None:
        return {"cats": None}
    return {"cats": list(dict.fromkeys([*pending_scope["cats"], *scope["cats"]]))}


def arm_timer(r, ctx, scope, unit_seconds, evidence=None, on_armed=None):
    """Start the delayed unsubscribe (idempotent: an existing timer keeps its deadline). One timer per
    subscription: a start with a scope the pending timer does not cover yet (another category's message)
    widens its scope to both (widened_scope), keeping the deadline the person was shown.

    Returns {"state": "pending", "deadline": epoch seconds} or {"state": "unsubscribed"} when there is nothing
    left to stop. `on_armed(db_id, profile_id, hash_id, deadline)` schedules the trigger for a new timer; if it
    fails the timer stays armed and the workers' sweepers fire it. The deadline is taken from the Redis clock.
    """
    _check_not_blocked(ctx)
    db_id, profile_id, hash_id = ctx.key
    pending_key = keys.pending_unsubscribe(db_id, profile_id, hash_id)
    seconds = min(ctx.resource["unsubscribe"]["timer_minutes"] * unit_seconds, MAX_TIMER_SECONDS)

    def change(pc):
        existing = _decode_pending(pc.pipe.hgetall(pending_key))
        if existing:
            wider = widened_scope(existing["scope"], scope)
            if wider != existing["scope"]:  # another message's link of the same subscription: it stops too
                now = server_time(pc.pipe)
                widened = dict(existing["evidence"], widened=[*existing["evidence"].get("widened", []),
                                                               {"smid": ctx.token, "scope": scope, "at": now,
                                                                **(evidence or {})}])
                # A new armed_at makes a firer that read the narrower scope find the record changed
                # (scripts.FIRE_TIMERS compares deadline and armed_at) and read it again.
                fields = {"scope": json.dumps(wider), "armed_at": repr(now), "evidence": json.dumps(widened)}
                pc.also(lambda pipe: pipe.hset(pending_key, mapping=fields))
            return {"state": "pending", "deadline": existing["deadline"], "new": False}
        record = pc.records[hash_id]
        if unsubscribed_record(ctx.resource, record, scope) == record:
            return {"state": "unsubscribed", "new": False}
        now = server_time(pc.pipe)
        fields = pending_fields(ctx, scope, now, now + seconds, evidence)
        pc.also(lambda pipe: queue_pending_writes(pipe, db_id, profile_id, hash_id, fields))
        return {"state": "pending", "deadline": float(fields["deadline"]), "new": True}

    result = update_profile(r, db_id, profile_id, change, watch=(pending_key,))[0]
    if result.pop("new") and on_armed:
        try:
            on_armed(db_id, profile_id, hash_id, result["deadline"])
        except Exception:  # noqa: BLE001 - the pending record is stored; every worker's sweeper fires it
            log.exception("could not schedule the timer trigger; the sweeper will fire it")
    return result


def cancel_timer(r, ctx, evidence=None):
    """Cancel a pending timer. Returns "cancelled"; or "unsubscribed" when the timer already fired (also when
    it stopped only some categories) or the subscription is not subscribed any more; or "none" when there was
    no timer. "cancelled" is final: a timer whose cancel was answered so never fires."""
    db_id, profile_id, hash_id = ctx.key
    pending_key = keys.pending_unsubscribe(db_id, profile_id, hash_id)

    def change(pc):
        if pc.pipe.exists(pending_key):
            pc.also(lambda pipe: drop_pending(pipe, db_id, profile_id, hash_id))
            return "cancelled"
        record = pc.records.get(hash_id)
        if record and record["status"] not in STOPPABLE_STATUSES:
            return "unsubscribed"
        # A timer that stopped only some categories leaves the subscription subscribed: its ledger says it fired.
        if record and _stopped_by_timer(pc.pipe, ctx, record):
            return "unsubscribed"
        return "none"

    return update_profile(r, db_id, profile_id, change, watch=(pending_key,))[0]


CANCEL_LOOK_BACK_EVENTS = 1000  # a profile's ledger entries a late cancel looks through for the timer's event
CANCEL_LOOK_BACK_PAGE = 50
CANCEL_CLOCK_SLACK = 3600  # seconds: a SMID's send time is the issuing host's clock, the events' the writers'


def _stopped_by_timer(client, ctx, record):
    """Whether the link's scope (its category; the whole subscription when it has none) is stopped in `record`
    and the last change that stopped it was a timer: a Cancel that finds no timer then came too late, however
    many changes (of the subscription's other categories, or of the profile's other subscriptions) followed
    the timer's event in the profile's ledger. Reads the ledger from its end, a page at a time, only back to
    the event that stopped the scope (on the first page as a rule), no further than the message's send time
    (the timer of its link cannot be older), and CANCEL_LOOK_BACK_EVENTS at most."""
    scope = resolve_scope(ctx)
    if unsubscribed_record(ctx.resource, record, scope) != record:
        return False  # the link's scope is subscribed (again): nothing was stopped that a cancel could undo
    cats = scope["cats"] or ()  # (a whole-subscription scope stopped means a status that cancel_timer answers)
    stoppable = {Status(s).word for s in STOPPABLE_STATUSES}

    def stops(event):  # whether the event stopped one of the link's categories, alone or with the whole
        before, after = event.get("before"), event.get("after") or {}
        if not before or before.get("status") not in stoppable:
            return False
        return after.get("status") not in stoppable or any(
            c in before.get("cats", ()) and c not in after.get("cats", ()) for c in cats)

    key = keys.profile_events(*ctx.key[:2])
    oldest_ms = (ctx.smid.sent_at - CANCEL_CLOCK_SLACK) * 1000
    for raw in itertools.islice(events.newest_first(client, key, CANCEL_LOOK_BACK_PAGE), CANCEL_LOOK_BACK_EVENTS):
        event = events.read_chained_event(raw)
        if event is None:
            continue  # a damaged entry: events/verify names it
        if event.get("hash_id") == ctx.key[2] and stops(event):
            return event["method"] == "timer"
        made_ms = events.id_ms(event)
        if made_ms is not None and made_ms < oldest_ms:
            return False
    return False


def timer_scope(resource, scope):
    """The scope a pending timer stored as `scope` stops now: its categories the resource still has. When the
    sender has deleted them all (or the resource itself), the whole subscription, as a link for a deleted
    category stands for the whole subscription (message_category): the person asked to stop that mail."""
    if scope["cats"] is None:
        return scope
    names = {c["api_name"] for c in resource["categories"]}
    return {"cats": [c for c in scope["cats"] if c in names] or None}


def timer_result(resource, record, scope):
    """The record after a pending timer of `scope` (as stored in its record) fires; what _settlement writes."""
    return unsubscribed_record(resource, record, timer_scope(resource, scope))


def timer_settled(resource, record, scope_json):
    """Whether a pending timer whose stored scope is `scope_json` would change nothing on `record` any more, so
    that a change leaving `record` settles it (drops the timer). A timer for another category, or for the whole
    subscription while only some categories stopped, still has work to do at its deadline. A scope that cannot
    be read (a broken record no firer can settle) counts as settled."""
    try:
        scope = json.loads(scope_json)
        return timer_result(resource, record, scope) == record
    except (ValueError, TypeError, KeyError):
        return True


def _settlement(r, db_id, profile_id, hash_id, row, resources, now_text):
    """(keys, values, subscription exists) for scripts.FIRE_TIMERS, from the timer's scripts.CLAIM_TIMERS row."""
    deadline, armed_at, scope, smid, evidence, sub_raw, ledger_len, last_seq, last_hash = row
    new_sub = event_raw = ref = ""
    record = decode_record(sub_raw) if sub_raw else None  # DamagedRecord: the timer is reported broken
    if deadline and record is not None:
        # A resource deleted since the timer started: no category is left, so the whole subscription stops.
        resource = resources.get(record["resource_id"]) or {"categories": []}
        new = timer_result(resource, record, json.loads(scope))
        if new != record:
            new["updated_at"] = now_text
            # Encoded exactly as subscriptions.ProfileChange.flush and events.queue_append do.
            new_sub = encode_record(new)
            before, after = state_of(resource, record), state_of(resource, new)
            if before != after:  # as ProfileChange.save: an event for every change of status or categories
                last = {"seq": last_seq, "hash": last_hash} if ledger_len else None
                if last is not None and not events.is_link(last):  # a damaged newest entry: chained past it
                    last = events.last_event(r, db_id, profile_id)  # (FIRE_TIMERS checks the ledger's length)
                event = events.new_event(last, db_id=db_id, profile_id=profile_id,
                                         resource_id=record["resource_id"], channel=record["channel"],
                                         hash_id=hash_id, method="timer", before=before, after=after, smid=smid,
                                         evidence=json.loads(evidence or "{}"))
                event_raw = events.encode_event(event)
                ref = f"{db_id}|{profile_id}|{event['seq']}"
    resource_id = str(record["resource_id"]) if record else ""
    item_keys = (keys.pending_unsubscribe(db_id, profile_id, hash_id), keys.profile_subscriptions(db_id, profile_id),
                 keys.profile_events(db_id, profile_id), keys.db_profiles(db_id), keys.resource(resource_id))
    values = (keys.pending_due_member(db_id, profile_id, hash_id), hash_id, deadline, armed_at, sub_raw, ledger_len,
              new_sub, event_raw, ref, profile_id, resource_id)
    return item_keys, values, record is not None


def _fire_round(r, timers, now, owner):
    rows = scripts.claim_timers(r, [(keys.pending_unsubscribe(d, p, h), keys.profile_subscriptions(d, p),
                                     keys.profile_events(d, p), h) for d, p, h in timers], owner, FIRE_LEASE, now)
    resources = get_resources(r, [rid for rid in map(_resource_id, rows) if rid is not None])
    now_text = now_iso()
    results, todo, settlements = {}, [], []
    for timer, row in zip(timers, rows):
        if row == ["leased"]:
            results[timer] = "leased"
            continue
        try:
            if len(row) != 9:
                raise ValueError(row[0])
            settlements.append(_settlement(r, *timer, row, resources, now_text))
            todo.append(timer)
        except Exception as exc:  # noqa: BLE001 - one unreadable record must not hold up the other timers
            results[timer] = _broken(timer, exc)
    codes = scripts.fire_timers(r, keys.pending_due(), keys.events_timeline(),
                                [(k, v) for k, v, _has in settlements], now)
    for timer, code, (_k, _v, has_sub) in zip(todo, codes, settlements):
        # A timer whose subscription no longer exists is settled without a change: report it as "dropped", as
        # FIRE_TIMERS reports one of a blocked resource (decided there, by the resource as it is when it writes).
        results[timer] = "dropped" if code == "fired" and not has_sub else code
        if code == "broken":
            _broken(timer, "a key has the wrong type")
    return results


def _resource_id(row):
    try:
        return decode_record(row[5])["resource_id"] if len(row) == 9 and row[0] and row[5] else None
    except (ValueError, KeyError, TypeError):
        return None  # _settlement reports it


def _broken(timer, reason):
    member = keys.pending_due_member(*timer)
    report_broken(log, member, "delayed unsubscribe %s cannot be fired, its data is broken (%s); it stays pending",
                  member, reason)
    return "broken"


def fire_timers(r, timers, now=None):
    """Settle the given timers [(db_id, profile_id, hash_id)] that are due (by the Redis clock, or `now`).

    Returns {timer: code}: "fired" (unsubscribed as the record said), "dropped" (settled without a change: the
    subscription no longer exists, or its resource is blocked when it settles: nobody can unsubscribe from a
    blocked resource, one-click answers 403), "gone" (nothing pending: cancelled or settled
    before), "early" (not due yet), "leased" (another firer is settling it right now; should it die, the lease
    runs out after FIRE_LEASE seconds),
    "changed" (kept changing under us FIRE_ATTEMPTS times; the next sweep retries it) or "broken" (its data
    cannot be read or has the wrong type: logged once, left pending and tried again BROKEN_RETRY_SECONDS later,
    behind the other due timers).
    """
    todo = list(dict.fromkeys((int(d), p, h) for d, p, h in timers))
    results, owner = {}, secrets.token_hex(8)
    for _attempt in range(FIRE_ATTEMPTS):
        if not todo:
            break
        for start in range(0, len(todo), FIRE_BATCH):
            results.update(_fire_round(r, todo[start:start + FIRE_BATCH], now, owner))
        todo = [t for t in todo if results[t] == "changed"]
    broken = {keys.pending_due_member(*t): None for t, code in results.items() if code == "broken"}
    if broken:
        retry_at = (server_time(r) if now is None else now) + BROKEN_RETRY_SECONDS
        r.zadd(keys.pending_due(), dict.fromkeys(broken, retry_at), xx=True)  # its pending record is kept
    return results


def fire_timer(r, db_id, profile_id, hash_id, now=None):
    """Settle one due timer. A no-op unless the pending record still exists and is due, so duplicate, late or
    cancelled runs change nothing. Returns True if it fired (the record was settled by the timer)."""
    return fire_timers(r, [(db_id, profile_id, hash_id)], now)[(int(db_id), profile_id, hash_id)] in ("fired",
                                                                                                     "dropped")


def due_timers(r, now=None, limit=1000, grace=0.0):
    """(db_id, profile_id, hash_id) of timers whose deadline is at most `now` - `grace` (now: the Redis clock),
    oldest first."""
    timers = []
    for member in scripts.due_timer_members(r, keys.pending_due(), now, grace, limit):
        try:
            timers.append(_parse_member(member))
        except ValueError:  # names no timer, so nothing can settle it: it would come first in every sweep
            report_broken(log, member, "pending_due member %r names no timer; removed", member)
            r.zrem(keys.pending_due(), member)
    return timers
