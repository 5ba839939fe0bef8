"""Unsubscribe flows: what a SMID may change, in which scope, and the delayed timer's state machine.

No Flask here: pages, one-click, the API's message_unsub, the SDK endpoint and the worker all call these.
Rules (contract §4):
- the scope is the categories asked for, else the message's category, else the whole subscription; a
  category unsubscribe that leaves no category subscribed unsubscribes the whole subscription;
- people (pages, SDK) cannot drop `required` categories; the sending platform's API and RFC 8058 can;
- a blocked resource changes nothing (Blocked), and GET/HEAD callers never reach this module's writers;
- delayed mode keeps one pending record per subscription (keys.pending_unsubscribe) holding the deadline,
  scope and evidence. The record is the truth: the timer job, "unsubscribe now" and a cancel each settle it
  under WATCH, so whichever comes first wins and the other sees it is gone. Arming twice keeps the deadline.
"""
import json
import logging
import time
from dataclasses import dataclass

from . import keys
from .errors import Blocked, Conflict, InvalidInput, NoSuchSubscription
from .resources import get_resource
from .subscriptions import Status, state_of, subscribed_cats, update_profile
from .tokens import read_smid
from .validation import now_iso

log = logging.getLogger(__name__)
UNDO_WINDOW_SECONDS = 600
UNDOABLE_METHODS = ("page_instant", "page_confirm", "timer", "page_now", "sdk")
FINAL_STATUSES = (Status.COMPLAINED, Status.HARDBOUNCED, Status.INVALID)


@dataclass
class Context:
    token: str
    smid: object
    resource: dict
    record: dict

    @property
    def key(self):
        return self.smid.db_id, self.smid.profile_id, self.smid.hash_id

    @property
    def mode(self):
        return self.resource["unsubscribe"]["mode"]


def open_smid(r, ring, token):
    """Verify the SMID and load its resource and subscription. Raises BadToken, NoSuchResource,
    NoSuchSubscription (also for a soft-deleted subscription)."""
    smid = read_smid(ring, token)
    resource = get_resource(r, smid.resource_id)
    raw = r.hget(keys.profile_subscriptions(smid.db_id, smid.profile_id), smid.hash_id)
    record = json.loads(raw) if raw else None
    if record is None or record.get("is_delete") or record["resource_id"] != resource["id"]:
        raise NoSuchSubscription("this subscription no longer exists")
    return Context(token, smid, resource, record)


def resolve_scope(ctx, categories=None, by_person=True):
    """Return the scope {"cats": [...]} (categories) or {"cats": None} (whole subscription).

    Raises InvalidInput for an unknown category, or a required one asked for by a person.
    """
    if categories is None:
        return {"cats": [ctx.smid.category] if ctx.smid.category else None}
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise InvalidInput("categories must be a list of category api names", field="categories")
    by_name = {c["api_name"]: c for c in ctx.resource["categories"]}
    for cat in categories:
        if cat not in by_name:
            raise InvalidInput(f"category {cat!r} is not a category of this resource", field="categories")
        if by_person and by_name[cat]["required"]:
            raise InvalidInput(f"category {cat!r} is required and cannot be unsubscribed", field="categories")
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
    """The record after applying `scope`; unchanged when there is nothing left to stop."""
    new = dict(record)
    if record["status"] != Status.SUBSCRIBED:
        return new
    if scope["cats"] is not None:
        new["uncats"] = sorted(set(record.get("uncats", [])) | set(scope["cats"]))
        if subscribed_cats(resource, new):
            return new
    new["status"] = int(Status.UNSUBSCRIBED)
    return new


def _check_not_blocked(ctx):
    if ctx.mode == "blocked":
        raise Blocked(ctx.resource["unsubscribe"].get("blocked_text") or "this subscription cannot be cancelled here")


def _evidence(ctx, evidence):
    return {"seconds_since_send": max(0, int(time.time()) - ctx.smid.sent_at), **(evidence or {})}


def unsubscribe(r, ctx, scope, method, evidence=None, allow_blocked=False):
    """Apply an unsubscribe now (idempotent). Settles a pending timer of the subscription too.

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
        if pc.pipe.exists(pending_key):
            pc.also(lambda pipe: _drop_pending(pipe, db_id, profile_id, hash_id))
        return {"changed": changed, "state": state_of(ctx.resource, new)}

    return update_profile(r, db_id, profile_id, change, watch=(pending_key,))[0]


def undo(r, ctx, evidence=None):
    """Restore the state before this SMID's last unsubscribe, within UNDO_WINDOW_SECONDS.

    Raises Conflict when there is nothing to undo (too late, another change came after, final status).
    """
    db_id, profile_id, hash_id = ctx.key

    def change(pc):
        record = pc.records.get(hash_id)
        recent = [json.loads(x) for x in pc.pipe.lrange(keys.profile_events(db_id, profile_id), -50, -1)]
        mine = [e for e in recent if e["hash_id"] == hash_id]
        last = mine[-1] if mine else None
        if (last is None or last["smid"] != ctx.token or last["method"] not in UNDOABLE_METHODS
                or int(last["id"][:13]) / 1000 < time.time() - UNDO_WINDOW_SECONDS):
            raise Conflict("there is no recent unsubscribe to undo")
        if Status(record["status"]) in FINAL_STATUSES:
            raise Conflict("this subscription cannot be restored")
        before = last["before"]
        restored = dict(record, status=int(Status[before["status"].upper()]), updated_at=now_iso())
        kept = set(before["cats"])
        restored["uncats"] = [c["api_name"] for c in ctx.resource["categories"] if c["api_name"] not in kept]
        pc.save(hash_id, restored, ctx.resource, method="page_undo", smid=ctx.token,
                evidence=_evidence(ctx, evidence))
        return {"changed": True, "state": state_of(ctx.resource, restored)}

    return update_profile(r, db_id, profile_id, change)[0]


# -- delayed mode -------------------------------------------------------------------------------------

def _due_member(db_id, profile_id, hash_id):
    return f"{db_id}|{profile_id}|{hash_id}"


def _drop_pending(pipe, db_id, profile_id, hash_id):
    pipe.delete(keys.pending_unsubscribe(db_id, profile_id, hash_id))
    pipe.zrem(keys.pending_due(), _due_member(db_id, profile_id, hash_id))


def read_pending(r, ctx):
    """The pending timer of this subscription as {"deadline", "scope", "smid"}, or None."""
    raw = r.hgetall(keys.pending_unsubscribe(*ctx.key))
    return _decode_pending(raw)


def _decode_pending(raw):
    if not raw:
        return None
    return {"deadline": float(raw["deadline"]), "scope": json.loads(raw["scope"]), "smid": raw["smid"],
            "armed_at": float(raw["armed_at"]), "evidence": json.loads(raw.get("evidence", "{}"))}


def arm_timer(r, ctx, scope, unit_seconds, evidence=None, on_armed=None):
    """Start the delayed unsubscribe (idempotent: an existing timer keeps its deadline).

    Returns {"state": "pending", "deadline": epoch seconds} or {"state": "unsubscribed"} when there is nothing
    left to stop. `on_armed(db_id, profile_id, hash_id, deadline)` schedules the trigger for a new timer.
    """
    _check_not_blocked(ctx)
    db_id, profile_id, hash_id = ctx.key
    pending_key = keys.pending_unsubscribe(db_id, profile_id, hash_id)
    seconds = ctx.resource["unsubscribe"]["timer_minutes"] * unit_seconds

    def change(pc):
        existing = _decode_pending(pc.pipe.hgetall(pending_key))
        if existing:
            return {"state": "pending", "deadline": existing["deadline"], "new": False}
        record = pc.records[hash_id]
        if unsubscribed_record(ctx.resource, record, scope) == record:
            return {"state": "unsubscribed", "new": False}
        now = time.time()
        deadline = now + seconds
        fields = {"deadline": repr(deadline), "armed_at": repr(now), "scope": json.dumps(scope),
                  "smid": ctx.token, "evidence": json.dumps(_evidence(ctx, evidence))}

        def write(pipe):
            pipe.hset(pending_key, mapping=fields)
            # Kept a day past the deadline so a late sweeper still finds it; settled records are deleted.
            pipe.expireat(pending_key, int(deadline) + 86400)
            pipe.zadd(keys.pending_due(), {_due_member(db_id, profile_id, hash_id): deadline})
        pc.also(write)
        return {"state": "pending", "deadline": deadline, "new": True}

    result = update_profile(r, db_id, profile_id, change, watch=(pending_key,))[0]
    if result.pop("new") and on_armed:
        try:
            on_armed(db_id, profile_id, hash_id, result["deadline"])
        except Exception:  # noqa: BLE001 - the pending record is stored; every worker's sweeper fires it
            log.exception("could not schedule the timer trigger; the sweeper will fire it")
    return result


def cancel_timer(r, ctx, evidence=None):
    """Cancel a pending timer. Returns "cancelled", or "unsubscribed" when the timer already fired (or the
    subscription is not subscribed any more), or "none" when there was no timer."""
    db_id, profile_id, hash_id = ctx.key
    pending_key = keys.pending_unsubscribe(db_id, profile_id, hash_id)

    def change(pc):
        if pc.pipe.exists(pending_key):
            pc.also(lambda pipe: _drop_pending(pipe, db_id, profile_id, hash_id))
            return "cancelled"
        record = pc.records.get(hash_id)
        if record and record["status"] != Status.SUBSCRIBED:
            return "unsubscribed"
        return "none"

    return update_profile(r, db_id, profile_id, change, watch=(pending_key,))[0]


def fire_timer(r, db_id, profile_id, hash_id, now=None):
    """Settle one due timer (the worker's job and the sweeper call this). A no-op unless the pending record
    still exists and is due, so duplicate, late or cancelled runs change nothing. Returns True if it fired."""
    pending_key = keys.pending_unsubscribe(db_id, profile_id, hash_id)

    def change(pc):
        pending = _decode_pending(pc.pipe.hgetall(pending_key))
        if pending is None:
            pc.also(lambda pipe: pipe.zrem(keys.pending_due(), _due_member(db_id, profile_id, hash_id)))
            return False
        if pending["deadline"] > (time.time() if now is None else now):
            return False
        pc.also(lambda pipe: _drop_pending(pipe, db_id, profile_id, hash_id))
        record = pc.records.get(hash_id)
        if record is None:
            return False
        resource = get_resource(r, record["resource_id"])
        new = unsubscribed_record(resource, record, pending["scope"])
        if new != record:
            new["updated_at"] = now_iso()
            pc.save(hash_id, new, resource, method="timer", smid=pending["smid"], evidence=pending["evidence"])
        return True

    return update_profile(r, db_id, profile_id, change, watch=(pending_key,))[0]


def due_timers(r, now=None, limit=1000):
    """(db_id, profile_id, hash_id) of timers whose deadline has passed, oldest first."""
    members = r.zrangebyscore(keys.pending_due(), "-inf", time.time() if now is None else now, start=0, num=limit)
    out = []
    for m in members:
        db_id, profile_id, hash_id = m.split("|")
        out.append((int(db_id), profile_id, hash_id))
    return out

