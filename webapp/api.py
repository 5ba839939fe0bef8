"""Blueprint /api/v1.1: the sending-platform API in Altcraft's style.

Every endpoint is a POST of a JSON object, authenticated by the API token (JSON field `token` or
`Authorization: Bearer`), answered with the envelope {"error": 0, "error_text": ..., "data": ...}. Errors keep
the envelope with a non-zero `error` and a 4xx status. Views parse, call core, wrap: nothing else.
"""
import base64
import functools

import json
from datetime import datetime, timedelta, timezone

from flask import Blueprint, Response, current_app, jsonify, request

from . import events, keys, resources, scanner, subscriptions, unsubscribe, webhooks
from .errors import Forbidden, InvalidInput, NotAuthorized, ServiceError
from .headers import message_links
from .openapi import build_spec
from .scripts import subscriptions_exist
from .store import ensure_housekeeping, get_redis
from .tokens import same_secret
from .validation import (as_api_name, as_int, as_list, as_object, as_profile_id, as_text, json_object,
                         no_unknown_keys)

bp = Blueprint("api", __name__, url_prefix="/api/v1.1")
OK_TEXT = "Successful operation"
BULK_MAX = 1000


def envelope(data=None, status=200, error=0, error_text=OK_TEXT, **top_level):
    body = {"error": error, "error_text": error_text, "data": data, **top_level}
    return jsonify(body), status


def error_envelope(exc):
    body, status = envelope(None, exc.status, exc.code, exc.message)
    # RFC 9110 §15.5.2: a 401 names the scheme that would authenticate (the JSON field token works as well).
    return body, status, {"WWW-Authenticate": "Bearer"} if isinstance(exc, NotAuthorized) else {}


class Reply:
    """A result with extra top-level envelope members (Altcraft puts counts beside `data`)."""

    def __init__(self, data=None, **top_level):
        self.data, self.top_level = data, top_level


def _request_json():
    # The body is JSON whatever the Content-Type says (curl -d sends a form's), so it is read raw.
    return json_object(request.get_data(cache=True))


def _authorized_json():
    """The request's JSON object once its API token is found right: a token in `Authorization: Bearer` is
    checked before the body is read (a wrong one costs no parsing), else the body's `token` field."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        _check_token(auth[7:].strip())
        return _request_json()
    data = _request_json()
    _check_token(data.get("token"))
    return data


def _check_token(given):
    if given is None:
        raise NotAuthorized("API token is missing: send it as JSON field token or Authorization: Bearer")
    if not same_secret(given, current_app.config["API_TOKEN"]):
        raise NotAuthorized("API token is wrong")


def endpoint(path):
    """Register fn(data) as POST /api/v1.1/<path> with token check and envelope."""
    def register(fn):
        @functools.wraps(fn)
        def view():
            try:
                data = _authorized_json()
                result = fn(data)
            except ServiceError as exc:
                return error_envelope(exc)
            if isinstance(result, Reply):
                return envelope(result.data, **result.top_level)
            return envelope(result)
        bp.add_url_rule(f"/{path}", endpoint=path.replace("/", "_"), view_func=view, methods=["POST"])
        return fn
    return register


def public_resource(res):
    """A resource as resources/get shows it (with the SDK script URL)."""
    base = current_app.config["PUBLIC_BASE_URL"]
    sdk_id = base64.b64encode(f"1|{res['id']}".encode()).decode()
    return {**res, "sdk_script_url": f"{base}/ak_list_unsubscribe.js?id={sdk_id}"}


def optional(data, key, check, *args):
    """data[key] checked by check(value, key, *args), or None when absent or null."""
    return check(data[key], key, *args) if data.get(key) is not None else None


RESOURCE_ID_FIELDS = ("token", "id", "resource_id")


def _resource_id(data, fields):
    """The resource a request names by `id` (Altcraft's) or `resource_id` (both when they agree), once the
    request is found to hold no field but those and `fields`."""
    no_unknown_keys(data, RESOURCE_ID_FIELDS + fields)
    rid = optional(data, "id", as_int, 1)
    alias = optional(data, "resource_id", as_int, 1)
    if rid is not None and alias is not None and rid != alias:
        raise InvalidInput("id and resource_id name different resources: give one of them", field="resource_id")
    return as_int(alias if rid is None else rid, "id", 1)


# -- resources ----------------------------------------------------------------------------------------

def _with_call_url_target(before, res):
    """The resource's call URL has its own delivery target while it is set: created with it, removed with it."""
    if webhooks.sync_call_url_target(get_redis(), res["id"], before, res):
        ensure_housekeeping()
    return public_resource(res)


@endpoint("resources/add")
def resources_add(data):
    res = resources.add_resource(get_redis(), {k: v for k, v in data.items() if k != "token"})
    return _with_call_url_target(None, res)


@endpoint("resources/update")
def resources_update(data):
    rid = _resource_id(data, resources.TOP_LEVEL_FIELDS + resources.UPDATE_ONLY_FIELDS)
    changes = {k: v for k, v in data.items() if k not in RESOURCE_ID_FIELDS}  # as resources/get
    return _with_call_url_target(*resources.update_resource(get_redis(), rid, changes))


@endpoint("resources/get")
def resources_get(data):
    r = get_redis()
    res = resources.get_resource(r, _resource_id(data, ()))
    return {**public_resource(res), "called_url_delivery": webhooks.call_url_delivery(r, res)}


@endpoint("resources/list")
def resources_list(data):
    no_unknown_keys(data, ("token", "from_id", "limit"))
    from_id = as_int(data.get("from_id", 0), "from_id", 0)
    limit = as_int(data.get("limit", 20), "limit", 1, 100)
    items, next_from_id, total = resources.list_resources(get_redis(), from_id, limit)
    return Reply([public_resource(x) for x in items], next_from_id=next_from_id, total_count=total)


@endpoint("resources/delete")
def resources_delete(data):
    rid = _resource_id(data, ())
    deleted = resources.delete_resource(get_redis(), rid)
    webhooks.sync_call_url_target(get_redis(), rid, deleted, None)  # the call URL's target goes with the resource
    return {"id": rid}


@endpoint("resources/fields_get")
def resources_fields_get(data):
    res = resources.get_resource(get_redis(), _resource_id(data, ("channel",)))
    return resources.field_descriptors(res, data.get("channel"))


# -- subscriptions ------------------------------------------------------------------------------------

@endpoint("subscriptions/set")
def subscriptions_set(data):
    sub, created = subscriptions.set_subscription(get_redis(), data)
    return Reply(sub, created=created)


@endpoint("subscriptions/get")
def subscriptions_get(data):
    return subscriptions.get_subscription(get_redis(), data)


@endpoint("subscriptions/list")
def subscriptions_list(data):
    no_unknown_keys(data, ("token", "db_id", "profile_id", "resource_id", "channel"))
    db_id = as_int(data.get("db_id"), "db_id", 1)
    profile_id = as_profile_id(data.get("profile_id"))
    rid = optional(data, "resource_id", as_int, 1)
    channel = optional(data, "channel", as_text)
    items = subscriptions.list_subscriptions(get_redis(), db_id, profile_id, rid, channel)
    return Reply(items, total_count=len(items))


@endpoint("subscriptions/delete")
def subscriptions_delete(data):
    return subscriptions.set_deleted(get_redis(), data, True)


@endpoint("subscriptions/undelete")
def subscriptions_undelete(data):
    return subscriptions.set_deleted(get_redis(), data, False)


def _bulk_status(data, from_status, to_status):
    no_unknown_keys(data, ("token", "db_id", "profile_id", "resource_id", "channel"))
    r = get_redis()
    db_id = as_int(data.get("db_id"), "db_id", 1)
    rid = optional(data, "resource_id", as_int, 1)
    if rid is not None:
        resources.get_resource(r, rid)
    channel = optional(data, "channel", as_text)
    profiles = ([as_profile_id(data["profile_id"])] if data.get("profile_id") is not None
                else subscriptions.profiles_of_db(r, db_id))
    updated = subscriptions.set_status_where(r, db_id, profiles, from_status, to_status, "api", rid, channel)
    return Reply(None, updated=updated)


@endpoint("subscriptions/suspend_all")
def subscriptions_suspend_all(data):
    return _bulk_status(data, subscriptions.Status.SUBSCRIBED, subscriptions.Status.SUSPENDED)


@endpoint("subscriptions/unsuspend_all")
def subscriptions_unsuspend_all(data):
    return _bulk_status(data, subscriptions.Status.SUSPENDED, subscriptions.Status.SUBSCRIBED)


# -- message links ------------------------------------------------------------------------------------

LINK_FIELDS = subscriptions.IDENTITY_FIELDS + ("category", "sent_at", "token")


def _links_for(messages):
    """Validate every message first (all or nothing), then sign; reads only, writes nothing."""
    r = get_redis()
    prepared = []
    res_by_id = resources.get_resources(
        r, [m.get("resource_id") for m in messages if isinstance(m, dict) and isinstance(m.get("resource_id"), int)])
    for i, msg in enumerate(messages):
        where = f"messages[{i}]." if len(messages) > 1 or request.path.endswith("_bulk") else ""
        try:
            msg = as_object(msg, "message")
            no_unknown_keys(msg, LINK_FIELDS)
            rid = as_int(msg.get("resource_id"), "resource_id", 1)
            res = res_by_id.get(rid) or resources.get_resource(r, rid)
            db_id = as_int(msg.get("db_id"), "db_id", 1, 2 ** 31)
            profile_id = as_profile_id(msg.get("profile_id"))
            channel = msg.get("channel")
            if channel not in res["channels"]:
                raise InvalidInput(f"channel {channel!r} is not a channel of resource {rid}", field="channel")
            _address, identity = subscriptions.read_address(channel, msg)
            category = msg.get("category")
            if category is not None:
                as_api_name(category, "category")
                if category not in {c["api_name"] for c in res["categories"]}:
                    raise InvalidInput(f"category {category!r} is not a category of resource {rid}",
                                       field="category")
            sent_at = as_int(msg["sent_at"], "sent_at", 0, 2 ** 32 - 1) if msg.get("sent_at") is not None else None
        except ServiceError as exc:
            exc.message = where + exc.message
            raise
        prepared.append((res, db_id, profile_id, subscriptions.make_hash_id(rid, channel, identity), channel,
                         category, sent_at, identity))
    exists = subscriptions_exist(r, [(keys.profile_subscriptions(db_id, pid), h, res["id"], ch, identity)
                                     for res, db_id, pid, h, ch, _cat, _at, identity in prepared])
    for i, found in enumerate(exists):
        if found:
            continue
        # Rarely asked: a chat stored under an older spelling of its id (found by its stored id), a deleted
        # subscription, or none. The record says which, and so what to do about it.
        res, db_id, pid, _computed, ch, cat, at, identity = prepared[i]
        stored, record = subscriptions.read_subscription(r, db_id, pid, res["id"], ch, identity)
        if record is None or record.get("is_delete"):
            prefix = f"messages[{i}]: " if request.path.endswith("_bulk") else ""
            raise subscriptions.NoSuchSubscription(prefix + (
                "the subscription is deleted (subscriptions/delete): subscriptions/undelete brings it back"
                if record else "no such subscription: add it with subscriptions/set"))
        prepared[i] = (res, db_id, pid, stored, ch, cat, at, identity)
    ring, base = current_app.extensions["signing_keys"], current_app.config["PUBLIC_BASE_URL"]
    return [message_links(ring, base, res, db_id, pid, h, ch, cat, at)
            for res, db_id, pid, h, ch, cat, at, _identity in prepared]


@endpoint("messages/links")
def messages_links(data):
    return _links_for([data])[0]


@endpoint("messages/links_bulk")
def messages_links_bulk(data):
    no_unknown_keys(data, ("token", "messages"))
    messages = as_list(data.get("messages"), "messages", max_items=BULK_MAX)
    if not messages:
        raise InvalidInput("messages must not be empty", field="messages")
    return _links_for(messages)


@bp.get("/openapi.json")
def openapi():
    return jsonify(build_spec(current_app.config["PUBLIC_BASE_URL"]))


# -- unsubscribe by the customer's own server -----------------------------------------------------------

@endpoint("profiles/message_unsub")
def profiles_message_unsub(data):
    """The customer's page confirmed an unsubscribe: apply it now (those categories when given)."""
    no_unknown_keys(data, ("token", "smid", "rtoken", "categories"))
    r = get_redis()
    smid = data.get("smid")
    if not isinstance(smid, str):
        raise InvalidInput("smid is required", field="smid")
    ctx = unsubscribe.open_smid(r, current_app.extensions["signing_keys"], smid)
    if not same_secret(data.get("rtoken"), ctx.resource["rtoken"]):
        raise Forbidden("rtoken does not match the SMID's resource")
    # Without categories, the whole subscription (contract §3): not the message's category, which is what a
    # one-click of that message stops.
    categories = data.get("categories")
    scope = {"cats": None} if categories is None else unsubscribe.resolve_scope(ctx, categories, by_person=False)
    result = unsubscribe.unsubscribe(r, ctx, scope, "api", {"ip": request.remote_addr,
                                                            "user_agent": request.user_agent.string[:512]})
    return Reply(result["state"], profile_id=ctx.smid.profile_id)


# -- the consent ledger ---------------------------------------------------------------------------------

@endpoint("events/list")
def events_list(data):
    """One profile's history, newest first; page with from_id (an event `seq`) and limit."""
    no_unknown_keys(data, ("token", "db_id", "profile_id", "from_id", "limit"))
    db_id = as_int(data.get("db_id"), "db_id", 1)
    profile_id = as_profile_id(data.get("profile_id"))
    from_id = optional(data, "from_id", as_int, 1)
    limit = as_int(data.get("limit", 50), "limit", 1, 500)
    items, next_from = events.list_events(get_redis(), db_id, profile_id, from_id, limit)
    return Reply(items, next_from_id=next_from)


LAST_MS = 253402300799999  # 9999-12-31T23:59:59.999Z: the last time RFC 3339 can spell


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _time_ms(value, field, up=False):
    """RFC 3339 or milliseconds since the epoch, kept between the epoch and year 9999 (a stream ID's time
    cannot be negative, and Redis refuses one past 2**64 - 1 after the answer's status has gone out). Events'
    times are whole milliseconds: a time between two is rounded down, or up with `up` (a range's start), so
    that a range includes exactly the events within it."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(value, LAST_MS)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if moment.tzinfo is not None:
                micros = (moment - EPOCH) // timedelta(microseconds=1)  # exact: no float
                return min(max(0, -(-micros // 1000) if up else micros // 1000), LAST_MS)
        except (ValueError, OverflowError):
            pass
    raise InvalidInput(f"{field} must be an RFC 3339 time with a zone, or milliseconds since the epoch",
                       field=field)


@bp.post("/events/export")
def events_export():
    """A time range of events as JSON lines (application/x-ndjson); errors keep the JSON envelope."""
    try:
        data = _authorized_json()
        no_unknown_keys(data, ("token", "from", "to"))
        start = _time_ms(data.get("from", 0), "from", up=True)
        end = _time_ms(data["to"], "to") if data.get("to") is not None else int(datetime.now().timestamp() * 1000)
        if end < start:
            raise InvalidInput("to must not be before from", field="to")
    except ServiceError as exc:
        return error_envelope(exc)
    lines = (json.dumps(e, ensure_ascii=False, separators=(",", ":")) + "\n"
             for e in events.export_events(get_redis(), start, end))
    return Response(lines, mimetype="application/x-ndjson")


def _review_range(data, extra=()):
    no_unknown_keys(data, ("token", "from", "to", "domain_burst", "domain_window") + extra)
    start = _time_ms(data.get("from", 0), "from", up=True)
    end = _time_ms(data["to"], "to") if data.get("to") is not None else int(datetime.now().timestamp() * 1000)
    thresholds = {}
    if data.get("domain_burst") is not None:
        thresholds["DOMAIN_BURST"] = as_int(data["domain_burst"], "domain_burst", 2, 100000)
    if data.get("domain_window") is not None:
        thresholds["DOMAIN_WINDOW"] = as_int(data["domain_window"], "domain_window", 1, 86400)
    return scanner.flagged_changes(get_redis(), start, end, thresholds)


@endpoint("events/flagged")
def events_flagged(data):
    """Changes in a time range whose evidence looks like a link scanner, with the reasons."""
    flagged = _review_range(data)
    return Reply(scanner.to_json(flagged), total_count=len(flagged))


@endpoint("events/revert_flagged")
def events_revert_flagged(data):
    """Revert the flagged changes of a range (or only `ids` among them) to their before-state."""
    flagged = _review_range(data, ("ids",))
    ids = optional(data, "ids", as_list, 10000)
    if ids is not None and not all(isinstance(i, str) for i in ids):
        raise InvalidInput("ids must be a list of event ids (strings)", field="ids")
    reverted, skipped = scanner.revert(get_redis(), flagged, ids)
    return {"reverted": reverted, "skipped": skipped}


@endpoint("events/verify")
def events_verify(data):
    """Walk the hash chains (one profile, one database or all) and name the first entry that does not match."""
    no_unknown_keys(data, ("token", "db_id", "profile_id"))
    db_id = optional(data, "db_id", as_int, 1)
    profile_id = optional(data, "profile_id", as_profile_id)
    if profile_id is not None and db_id is None:
        raise InvalidInput("db_id is required with profile_id", field="db_id")
    problem = events.verify_all(get_redis(), db_id, profile_id)
    return Reply({"ok": problem is None, "first_bad": problem})


# -- outgoing webhooks ----------------------------------------------------------------------------------

@endpoint("webhooks/add")
def webhooks_add(data):
    """A target URL for every event (of one resource when resource_id is given), signed with `secret`."""
    webhook = webhooks.add_webhook(get_redis(), data)
    ensure_housekeeping()
    return webhook


@endpoint("webhooks/list")
def webhooks_list(data):
    no_unknown_keys(data, ("token",))
    return webhooks.list_webhooks(get_redis())


@endpoint("webhooks/delete")
def webhooks_delete(data):
    no_unknown_keys(data, ("token", "id"))
    webhook_id = as_int(data.get("id"), "id", 1)
    webhooks.delete_webhook(get_redis(), webhook_id)
    return {"id": webhook_id}
