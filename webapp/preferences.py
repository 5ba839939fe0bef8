"""The subscription manager's rules: what a person may change about their own subscriptions.

- categories marked `in_manager` can be switched, except off: a `required` one that is on stays on (one that
  is off, stopped from its own message's link, can be switched back on), and nothing can be switched off on a
  blocked resource (category_locked);
- custom fields marked `in_manager` can be edited, typed and validated (all errors reported at once);
- unsubscribe, suspend for 14/30/60/90 days (status `suspended`, back to `subscribed` when it ends: the
  worker's sweeper reads keys.suspensions_due), resume;
- resubscribe from `unsubscribed` only with the manager token issued for that very subscription (proof of
  control of the address); `complained`, `hardbounced` and `invalid` are never resubscribed by the person;
- the last change stays undoable for UNDO_WINDOW_SECONDS (keys.manager_undo), unless something changed since,
  and only from the manager link that made it: one address's link must not bring back what another address's
  link stopped (only a subscription's own link may resubscribe it).
Every change goes through subscriptions.update_profile and is a ledger event with method `manager`.
"""
import json
import logging
import re
import time
from datetime import datetime, timezone

from redis.exceptions import ResponseError

from . import keys
from .errors import Blocked, Conflict, Forbidden, InvalidFields, InvalidInput, NoSuchSubscription, report_broken
from .resources import MAX_LINE_LENGTH, current_field_values, get_resources
from .subscriptions import DamagedRecord, Status, load_records, update_profile
from .validation import format_time, now_iso

log = logging.getLogger(__name__)

SUSPEND_DAYS = (14, 30, 60, 90)
UNDO_WINDOW_SECONDS = 600
NOT_RESUBSCRIBABLE = (Status.COMPLAINED, Status.HARDBOUNCED, Status.INVALID)


def overview(r, db_id, profile_id):
    """[(hash_id, record, resource)] of the profile's live subscriptions, by resource name and channel."""
    records = {h: rec for h, rec in load_records(r, db_id, profile_id).items() if not rec.get("is_delete")}
    resources = get_resources(r, [rec["resource_id"] for rec in records.values()])
    items = [(h, rec, resources[rec["resource_id"]]) for h, rec in records.items() if rec["resource_id"] in resources]
    return sorted(items, key=lambda x: (x[2]["name"].lower(), x[2]["id"], x[1]["channel"], x[1]["priority"]))


def parse_field(fdef, raw):
    """A form value (string, or None for an unchecked box) as the field's type. Raises ValueError(reason)."""
    ftype = fdef["type"]
    if ftype == "bool":
        return raw is not None
    raw = (raw or "").strip()
    if raw == "":
        if fdef["required"]:
            raise ValueError("required")
        return None
    if ftype == "int":
        # ASCII digits ("²".isdigit()), and the API's range: a 64-bit signed integer.
        if not re.fullmatch("-?[0-9]{1,19}", raw) or not -2 ** 63 <= int(raw) < 2 ** 63:
            raise ValueError("int")
        return int(raw)
    if ftype == "float":
        # A number as people write it, with a point or a (Russian) decimal comma, and an exponent: not all that
        # Python's float() takes ("1_000", digits of other scripts such as "١٢", "nan", "inf").
        if not _FLOAT.fullmatch(raw):
            raise ValueError("float")
        if _GROUPED.fullmatch(raw):  # "1,000": a thousand to one reader, one to another; neither is guessed
            raise ValueError("float_grouped")
        value = float(raw.replace(",", "."))
        if value in (float("inf"), float("-inf")):  # "1e999"
            raise ValueError("float")
        return value
    if len(raw) > MAX_LINE_LENGTH:
        raise ValueError("long")
    return raw.translate(_CONTROL_CHARACTERS)  # invisible, and refused by the API's checks of the same fields


_FLOAT = re.compile(r"[-+]?([0-9]+([.,][0-9]*)?|[.,][0-9]+)([eE][-+]?[0-9]+)?")
# A comma after one to three digits (not a lone 0) and before exactly three: a thousands separator as English
# writes it, or a decimal comma as Russian does.
_GROUPED = re.compile(r"[-+]?[1-9][0-9]{0,2},[0-9]{3}")
# What a person's line of text keeps out: control characters (invisible; the API refuses C0 ones) and line
# breaks, as a browser's text input strips them from what is typed or pasted. Only a hand-made POST sends them,
# and a "line" a sender puts into a mail header or a one-line template must not break it (Bcc: injection).
_CONTROL_CHARACTERS = dict.fromkeys([*range(32), *range(0x7f, 0xa0), 0x2028, 0x2029])
_CONTROL_CHARACTERS[ord("\t")] = " "  # a tab is blank space on a line


def category_locked(cat, blocked, on):
    """Whether the person cannot switch the category's box (the page shows it disabled): one that is on and
    required, or on in a blocked resource. Such a box only keeps mail from being switched off; one that is off
    (stopped from its own message's link, or made required after the person stopped it) can be switched on."""
    return on and (cat["required"] or blocked)


def _parse_preferences(resource, record, cats_on, field_values, shown_categories=None, shown_fields=None):
    """Return (uncats, custom_fields) from the form; raises InvalidFields with every bad field.

    `shown_categories` and `shown_fields` name what the form showed (None: everything the manager shows now).
    Only those change: a category or field the sender added, or put in the manager, after the page was opened
    is not in the form, and its missing box or input is no choice of the person's (an unchecked box sends
    nothing), so it must not switch the category off or clear the field."""
    shown = {c["api_name"]: c for c in resource["categories"] if c["in_manager"]}
    cats_on = set(cats_on)
    unknown = cats_on - set(shown)
    if unknown:
        raise InvalidInput(f"category {sorted(unknown)[0]!r} cannot be changed here", field="categories")
    if shown_categories is not None:
        shown = {name: cat for name, cat in shown.items() if name in set(shown_categories)}
    uncats = set(record.get("uncats", []))
    blocked = resource["unsubscribe"]["mode"] == "blocked"
    for name, cat in shown.items():
        # A locked box is disabled, so a browser never sends it: it stays on.
        if category_locked(cat, blocked, name not in uncats):
            continue
        if name in cats_on:
            uncats.discard(name)
        else:
            uncats.add(name)
    values, errors = current_field_values(resource, record["channel"], record.get("custom_fields", {})), {}
    for fdef in resource["channel_settings"].get(record["channel"], {}).get("fields", []):
        if not fdef["in_manager"] or (shown_fields is not None and fdef["api_name"] not in shown_fields):
            continue
        try:
            value = parse_field(fdef, field_values.get(fdef["api_name"]))
        except ValueError as exc:
            errors[fdef["api_name"]] = str(exc)
            continue
        if value is None:
            values.pop(fdef["api_name"], None)  # an emptied input clears the field
        else:
            values[fdef["api_name"]] = value
    if errors:
        raise InvalidFields(errors)
    order = [c["api_name"] for c in resource["categories"]]
    return sorted(uncats, key=lambda c: order.index(c) if c in order else len(order)), values


def _change(r, db_id, profile_id, hash_id, edit, evidence, link, watch=()):
    """Apply edit(record, resource, pc) -> new record to one subscription as a manager change, keep the
    undo record (with the link that acted: `link`, see undo_link) and the suspension index in step (a pause is
    indexed by pc.save, one that ended is dropped here), all in one MULTI/EXEC."""
    undo_key = keys.manager_undo(db_id, profile_id)
    member = keys.suspension_member(db_id, profile_id, hash_id)

    def change(pc):
        record = pc.records.get(hash_id)
        if record is None or record.get("is_delete"):
            raise NoSuchSubscription("no such subscription")
        resource = get_resources(r, [record["resource_id"]]).get(record["resource_id"])
        if resource is None:
            raise NoSuchSubscription("no such subscription")
        new = edit(dict(record), resource, pc)
        if new == record:
            return record, resource
        new["updated_at"] = now_iso()
        pc.save(hash_id, new, resource, method="manager", evidence=evidence)
        paused = new["status"] == Status.SUSPENDED and new.get("suspended_until")

        def write(pipe):
            if not paused:
                pipe.zrem(keys.suspensions_due(), member)
            if not getattr(edit, "is_undo", False):
                pipe.hset(undo_key, mapping={"hash_id": hash_id, "record": json.dumps(record),
                                             "after": new["updated_at"], "link": undo_link(link)})
                pipe.expire(undo_key, UNDO_WINDOW_SECONDS)
            else:
                pipe.delete(undo_key)
        pc.also(write)
        return new, resource

    return update_profile(r, db_id, profile_id, change, watch=(undo_key,) + tuple(watch))[0]


def undo_link(link):
    """How the undo record names the manager link that acted: the subscription the link was sent for (the
    token's hash_id), "" for a link issued for the whole profile."""
    return link or ""


def _epoch(iso):
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def save_preferences(r, db_id, profile_id, hash_id, cats_on, field_values, evidence=None, link=None,
                     shown_categories=None, shown_fields=None):
    """Categories switched on (the rest of the categories the form showed off) and field values from the form
    (see _parse_preferences)."""
    def edit(record, resource, _pc):
        record["uncats"], record["custom_fields"] = _parse_preferences(resource, record, cats_on, field_values,
                                                                       shown_categories, shown_fields)
        return record
    return _change(r, db_id, profile_id, hash_id, edit, evidence, link)


def unsubscribe_all(r, db_id, profile_id, hash_id, evidence=None, link=None):
    def edit(record, resource, _pc):
        if resource["unsubscribe"]["mode"] == "blocked":
            raise Blocked("these messages cannot be switched off")
        if record["status"] in (Status.SUBSCRIBED, Status.SUSPENDED, Status.UNCONFIRMED):
            record["status"] = int(Status.UNSUBSCRIBED)
            record.pop("suspended_until", None)
        return record
    return _change(r, db_id, profile_id, hash_id, edit, evidence, link)


def suspend(r, db_id, profile_id, hash_id, days, day_seconds, evidence=None, link=None):
    """Suspend a subscribed subscription for 14, 30, 60 or 90 days."""
    if days not in SUSPEND_DAYS:
        raise InvalidInput(f"suspend for one of {', '.join(map(str, SUSPEND_DAYS))} days", field="days")

    def edit(record, resource, _pc):
        if resource["unsubscribe"]["mode"] == "blocked":
            raise Blocked("these messages cannot be switched off")
        if record["status"] != Status.SUBSCRIBED:
            raise Conflict("only an active subscription can be paused")
        record["status"] = int(Status.SUSPENDED)
        record["suspended_until"] = format_time(datetime.fromtimestamp(time.time() + days * day_seconds,
                                                                       tz=timezone.utc))
        return record
    return _change(r, db_id, profile_id, hash_id, edit, evidence, link)


def resume(r, db_id, profile_id, hash_id, evidence=None, link=None):
    def edit(record, _resource, _pc):
        if record["status"] != Status.SUSPENDED:
            raise Conflict("this subscription is not paused")
        record["status"] = int(Status.SUBSCRIBED)
        record.pop("suspended_until", None)
        return record
    return _change(r, db_id, profile_id, hash_id, edit, evidence, link)


def resubscribe(r, db_id, profile_id, hash_id, token_hash_id, evidence=None):
    """Back to subscribed from unsubscribed, only with the manager link of this very subscription."""
    def edit(record, _resource, _pc):
        status = Status(record["status"])
        if status in NOT_RESUBSCRIBABLE:
            raise Forbidden("this address cannot be subscribed again from here")
        if status == Status.SUBSCRIBED:
            return record
        if status != Status.UNSUBSCRIBED:
            raise Conflict("this subscription cannot be changed now")
        if token_hash_id != hash_id:
            raise Forbidden("to subscribe this address again, open the link in a message sent to it")
        record["status"] = int(Status.SUBSCRIBED)
        return record
    return _change(r, db_id, profile_id, hash_id, edit, evidence, token_hash_id)


def undo_available(r, db_id, profile_id, link):
    """The hash_id whose last manager change `link` (see undo_link) can still undo, or None."""
    hash_id, saved_link = r.hmget(keys.manager_undo(db_id, profile_id), ["hash_id", "link"])
    return hash_id if saved_link == undo_link(link) else None


def undo(r, db_id, profile_id, link, evidence=None):
    """Restore the subscription the last manager change touched, if `link` made that change (see undo_link)
    and nothing changed it since."""
    saved = r.hgetall(keys.manager_undo(db_id, profile_id))
    if not saved or saved.get("link") != undo_link(link):
        raise Conflict("there is no recent change of this link to undo")
    hash_id = saved["hash_id"]

    def edit(record, _resource, pc):
        current = pc.pipe.hgetall(keys.manager_undo(db_id, profile_id))
        if current != saved or record.get("updated_at") != saved["after"]:
            raise Conflict("the subscription changed since; there is nothing to undo")
        return json.loads(saved["record"])
    edit.is_undo = True
    return _change(r, db_id, profile_id, hash_id, edit, evidence, link)


def resume_due_suspensions(r, now=None, limit=1000):
    """Return suspended subscriptions whose time is up to `subscribed` (method suspend_expiry); the worker's
    sweeper calls this. Idempotent: a member whose record is no longer due is just dropped from the index."""
    now = time.time() if now is None else now
    resumed = 0
    for member in r.zrangebyscore(keys.suspensions_due(), "-inf", now, start=0, num=limit):
        try:
            resumed += _resume_if_due(r, member, now)
        except (ValueError, KeyError, TypeError, ResponseError) as exc:  # its data, not Redis: the others go on
            report_broken(log, member, "suspension %s cannot be resumed, its data is broken (%s: %s); it stays due",
                          member, type(exc).__name__, exc)
    return resumed


def _resume_if_due(r, member, now):
    db_id, profile_id, hash_id = member.split("|")
    db_id = int(db_id)

    def change(pc):
        if hash_id in pc.unreadable:
            raise DamagedRecord(f"subscription {hash_id}'s record is not readable")  # it stays due
        record = pc.records.get(hash_id)
        if record is None or record["status"] != Status.SUSPENDED or not record.get("suspended_until"):
            pc.also(lambda pipe: pipe.zrem(keys.suspensions_due(), member))  # no pause left to end
            return 0
        end = _epoch(record["suspended_until"])
        if end > now:
            # Paused again since the member was read (a resume, then a new pause, which moved its score on): the
            # entry stays, at the new end (written again, so that a score that is somehow behind the record's
            # end cannot bring it back every pass); removing it would leave that pause without an end.
            pc.also(lambda pipe: pipe.zadd(keys.suspensions_due(), {member: end}))
            return 0
        pc.also(lambda pipe: pipe.zrem(keys.suspensions_due(), member))
        resource = get_resources(r, [record["resource_id"]]).get(record["resource_id"])
        if resource is None:  # deleted: its subscriptions are out of service, and stay as they were
            return 0
        new = dict(record, status=int(Status.SUBSCRIBED), updated_at=now_iso())
        new.pop("suspended_until")
        pc.save(hash_id, new, resource, method="suspend_expiry")
        return 1
    return update_profile(r, db_id, profile_id, change)[0]
