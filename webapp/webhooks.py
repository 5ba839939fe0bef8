"""Outgoing webhooks and the list-unsubscribe "call URL": telling other systems about every change.

The global event timeline (keys.events_timeline, a stream written in the same MULTI as each change) is the
outbox. Every delivery target reads it through its own consumer group, so nothing is lost:
- `wh:<id>` for each webhook (events of its resource, or all), and `called_url` for the one-click call;
- a delivery (an RQ job, `workers.jobs.deliver_target`) first re-sends what it read but never acknowledged
  (a worker killed mid-delivery leaves entries pending), then reads new entries; it POSTs them in order and
  XACKs each after a 2xx. The first failure stops the batch and sets the target's next attempt with
  exponential backoff; the dispatcher (workers/housekeeping.py) enqueues one job per target that has work and
  whose backoff has passed. Delivery is at least once; receivers de-duplicate on X-Webhook-Id.
- targets take turns: a job sends at most DELIVERY_BUDGET_EVENTS events or starts no new POST after
  DELIVERY_BUDGET_SECONDS, then puts the target's next job at the back of the queue, behind the other targets'
  jobs, so one slow (or busy) target cannot hold the shared queue.
Signature: X-Webhook-Signature: sha256=<hex HMAC-SHA256 of "<X-Webhook-Timestamp>.<body>" with the secret>.
"""
import hashlib
import hmac
import http.client
import json
import secrets
import socket
import threading
import time
import urllib.parse

from redis.exceptions import ResponseError

from . import keys
from .errors import InvalidInput, NotFound
from .events import load_refs
from .resources import get_resource, get_resources
from .validation import as_int, as_object, as_text, as_url, ms_to_time, no_unknown_keys, now_iso

CALLED_URL = "called_url"
BATCH = 100
BACKOFF_BASE = 1.0  # seconds before the first retry; doubled per failure
BACKOFF_MAX = 3600.0  # seconds, the longest wait between attempts
USER_AGENT = "unsubscribe-service-webhooks/1"
DELIVERY_BUDGET_EVENTS = 100  # POSTs one delivery job makes before it leaves the rest to the target's next job
DELIVERY_BUDGET_SECONDS = 1.0  # no new POST after this long in one job (one POST may still take its timeout)
LAG_COUNT_CAP = 10000  # entries counted one by one when Redis cannot tell a group's lag


def group_name(webhook_id):
    return f"wh:{webhook_id}"


def _while_target_exists(r, group, write, read=lambda pipe: None, watch=()):
    """Apply write(pipe, read(pipe)) in one MULTI/EXEC if the target still exists; return whether it does.

    A webhook's group and delivery state are written only this way once it is stored: its existence is
    checked under WATCH, so a webhooks/delete landing at any moment of a delivery cannot be followed by a
    write that brings back what the delete removed (nothing would remove it again). `read` runs under the
    same WATCH; `watch` names the keys it reads. The call-URL target is never deleted."""
    webhook_id = None if group == CALLED_URL else group.split(":", 1)[1]

    def attempt(pipe):
        if webhook_id is not None and not pipe.hexists(keys.webhooks(), webhook_id):
            return False
        seen = read(pipe)
        pipe.multi()
        write(pipe, seen)
        return True

    return r.transaction(attempt, keys.webhooks(), *watch, value_from_callable=True)


def _timeline_end(r):
    """(last entry id, entries added) of the timeline, from one XINFO STREAM: where a new group starts."""
    try:
        info = r.xinfo_stream(keys.events_timeline())
        return info["last-generated-id"], info["entries-added"]
    except ResponseError:  # no stream yet
        return "0-0", 0


def _stage_group(pipe, group, end):
    pipe.xgroup_create(keys.events_timeline(), group, id=end[0], mkstream=True, entries_read=end[1])


def ensure_group(r, group):
    """Create the target's consumer group on the timeline, seeing events from now on, unless it exists; return
    False, creating nothing, when the target is a webhook that no longer exists (see _while_target_exists).

    The group starts at the stream's last entry and is told how many entries that is (ENTRIESREAD): without
    it Redis cannot count the group's lag once new entries come (XINFO GROUPS says null), and a target whose
    backlog reads 0 is never dispatched. One XINFO STREAM gives both, consistently; an entry added before the
    group exists comes after that last entry, so the group delivers it and counts it in its lag."""
    end = _timeline_end(r)
    try:
        return _while_target_exists(r, group, lambda pipe, _: _stage_group(pipe, group, end))
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return True


def add_webhook(r, data):
    data = as_object(data, "request")
    no_unknown_keys(data, ("token", "url", "resource_id", "secret"))
    url = as_url(data.get("url"), "url", sendable=True)  # stored as the ASCII URI it is sent to
    rid = data.get("resource_id")
    if rid is not None:
        rid = as_int(rid, "resource_id", 1)
        get_resource(r, rid)
    secret = data.get("secret")
    secret = as_text(secret, "secret", 256, allow_empty=False) if secret is not None else secrets.token_urlsafe(24)
    if len(secret) < 16:
        raise InvalidInput("secret must be at least 16 characters", field="secret")
    webhook = {"id": r.incr(keys.webhook_next_id()), "url": url, "resource_id": rid, "secret": secret,
               "created_at": now_iso()}
    pipe = r.pipeline()  # the webhook and its group appear together (MULTI/EXEC)
    _stage_group(pipe, group_name(webhook["id"]), _timeline_end(r))
    pipe.hset(keys.webhooks(), webhook["id"], json.dumps(webhook))
    pipe.execute()
    return webhook


def list_webhooks(r):
    """Every webhook with its delivery state: last error, last success, backlog (undelivered events)."""
    out = []
    for raw in r.hvals(keys.webhooks()):
        hook = json.loads(raw)
        state = target_state(r, group_name(hook["id"]), hook.get("resource_id"))
        if state["next_attempt_at"] is not None:  # a time, written as every time the API answers
            state["next_attempt_at"] = ms_to_time(round(state["next_attempt_at"] * 1000))
        out.append({**{k: v for k, v in hook.items() if k != "secret"}, "secret": hook["secret"][:4] + "…", **state})
    return sorted(out, key=lambda h: h["id"])


def delete_webhook(r, webhook_id):
    # The webhook goes first: a delivery running meanwhile writes its group and state only while it exists
    # (_while_target_exists), so after this HDEL none comes back behind the removals below.
    if not r.hdel(keys.webhooks(), webhook_id):
        raise NotFound(f"webhook {webhook_id} does not exist")
    try:
        r.xgroup_destroy(keys.events_timeline(), group_name(webhook_id))
    except ResponseError:
        pass
    r.delete(keys.delivery_state(group_name(webhook_id)))


def backlog(r, group, resource_id=None):
    """Events the target has not acknowledged yet (read but unacknowledged, plus not yet read). With the
    `resource_id` a webhook follows, only that resource's unread events count (its deliveries acknowledge the
    others unsent), counted one by one up to LAG_COUNT_CAP unread entries; without it, every entry a delivery
    job still has to go through."""
    try:
        groups = r.xinfo_groups(keys.events_timeline())
    except ResponseError:
        return 0
    for g in groups:
        if g["name"] == group:
            lag = g.get("lag")
            # Redis cannot count the lag when an entry was deleted from the stream, nor by resource: count.
            if lag is None or resource_id is not None:
                unread = r.xrange(keys.events_timeline(), "(" + g["last-delivered-id"], "+", count=LAG_COUNT_CAP)
                lag = sum(1 for _id, fields in unread if resource_id is None or fields.get("rid") == str(resource_id))
            return int(g.get("pending") or 0) + int(lag)
    return 0


def target_state(r, group, resource_id=None):
    state = r.hgetall(keys.delivery_state(group))
    return {"backlog": backlog(r, group, resource_id), "last_error": state.get("last_error"),
            "last_error_at": state.get("last_error_at"), "last_success_at": state.get("last_success_at"),
            "failures": int(state.get("failures", 0)),
            "next_attempt_at": float(state["next_attempt_at"]) if state.get("next_attempt_at") else None}


def targets(r):
    """Every delivery target's consumer group name."""
    return [group_name(json.loads(raw)["id"]) for raw in r.hvals(keys.webhooks())] + [CALLED_URL]


def sign(secret, timestamp, body):
    return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def _abort(conn, fired):
    """The POST's deadline passed: shut its socket, which ends a read blocked in another thread at once."""
    fired.set()
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def post_json(url, payload, event_id, secret, timeout):
    """POST one event; return None on 2xx, else a short error text (never raises for HTTP problems).

    `timeout` bounds the whole POST (connecting, sending, the answer's status and headers; a body cut off after
    them does not undo a 2xx), not each socket read: a target that trickles its answer is cut off when its time
    is up, so a delivery job and its target lock (which lasts timeout + 5 s) are never outlived by one POST.
    A 3xx is the target's answer, not a delivery, and is not followed (that would send a GET without the event,
    or the event elsewhere)."""
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    ts = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "X-Webhook-Id": event_id,
               "X-Webhook-Timestamp": ts}
    if secret:
        headers["X-Webhook-Signature"] = sign(secret, ts, body)
    fired = threading.Event()
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url[:100]}")
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.netloc.rpartition("@")[2], timeout=timeout)  # raises InvalidURL for a bad port
        watchdog = threading.Timer(timeout, _abort, (conn, fired))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            if fired.is_set():  # the connect took all the time
                raise TimeoutError("timed out")
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("POST", target, body=body, headers=headers)
            resp = conn.getresponse()
            if fired.is_set():  # a shut socket ends the headers early: they did not all come in time
                raise TimeoutError("timed out")
            try:
                resp.read(1024)
            except (OSError, http.client.HTTPException):
                pass  # the status and headers came in time: that is the answer, whatever its body does after
        finally:
            watchdog.cancel()
            conn.close()
        return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, timed out, a bad answer, a URL
        # that cannot be sent (stored before as_url checked its port, or made it ASCII)
        if fired.is_set():
            return f"TimeoutError: timed out (no complete answer within {timeout:g} s)"
        if isinstance(exc, UnicodeError):
            return "InvalidURL: the URL has characters that are not ASCII: add the target again to have it encoded"
        return f"{type(exc).__name__}: {exc}"[:200]


def _plan(r, group, event):
    """(url, payload, secret) to send for this event, or None when the target does not want it. Decided on the
    event itself, which every timeline entry leads to (older timer entries carry no `rid` or `method`)."""
    if group == CALLED_URL:
        if event["method"] != "one_click":
            return None
        resource = get_resources(r, [event["resource_id"]]).get(event["resource_id"])
        url = resource and resource["unsubscribe"]["list_unsubscribe"].get("called_url")
        if not url:
            return None
        payload = {"smid": event["smid"], "result": event["after"]["status"], "cats": event["after"]["cats"],
                   "resource_id": event["resource_id"], "profile_id": event["profile_id"], "event_id": event["id"],
                   "at": event["at"]}
        return url, payload, resource["rtoken"]
    hook_raw = r.hget(keys.webhooks(), group.split(":", 1)[1])
    if hook_raw is None:
        return None
    hook = json.loads(hook_raw)
    if hook["resource_id"] is not None and str(hook["resource_id"]) != str(event["resource_id"]):
        return None
    return hook["url"], event, hook["secret"]


def deliver(r, group, timeout=5.0, consumer="deliverer", now=None, heartbeat=None, max_events=None,
            max_seconds=None):
    """Send the target's pending, then new, timeline entries in order; stop at the first failure.

    With `max_events` / `max_seconds` (a delivery job's budget) it also stops, with no error, once that many
    events were POSTed or that many seconds have passed since it started (checked before each POST), leaving
    the rest for the next call. Returns {"sent": n, "skipped": n, "error": text or None}. Safe to run again at
    any time: only acknowledged entries are never sent again.
    """
    if not ensure_group(r, group):
        return {"sent": 0, "skipped": 0, "error": None}  # deleted after its job was queued: re-create nothing
    sent = skipped = 0
    started = time.monotonic()

    def budget_spent():
        return ((max_events is not None and sent >= max_events)
                or (max_seconds is not None and time.monotonic() - started >= max_seconds))

    for start in ("0", ">"):
        while True:
            # Read no more than the budget may send: what is read but not acknowledged is re-sent first next
            # time, in order, either way; reading less keeps the pending list short.
            count = BATCH if max_events is None else max(1, min(BATCH, max_events - sent))
            try:
                reply = r.xreadgroup(group, consumer, {keys.events_timeline(): start}, count=count)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                return {"sent": sent, "skipped": skipped, "error": None}  # the webhook was deleted meanwhile
            entries = reply[0][1] if reply else []
            entries = [(eid, f) for eid, f in entries if f]  # a trimmed entry comes back without fields
            if not entries:
                break
            refs = [f["ref"].split("|") for _eid, f in entries]
            for (entry_id, fields), event in zip(entries, load_refs(r, refs)):
                plan = _plan(r, group, event) if event else None
                if plan:
                    if budget_spent():
                        return _finish(r, group, sent, skipped)
                    if heartbeat:
                        heartbeat()
                    error = post_json(plan[0], plan[1], event["id"], plan[2], timeout)
                    if error:
                        _record_failure(r, group, error, now)
                        return {"sent": sent, "skipped": skipped, "error": error}
                    sent += 1
                else:
                    skipped += 1
                r.xack(keys.events_timeline(), group, entry_id)
            if start == "0" and len(entries) < count:
                break
    return _finish(r, group, sent, skipped)


def _finish(r, group, sent, skipped):
    """A delivery that ended without a failure (all sent, or its budget spent): the target is not backing off."""
    state = keys.delivery_state(group)

    def write(pipe, _):
        if sent:
            pipe.hset(state, mapping={"last_success_at": now_iso(), "failures": 0})
        pipe.hdel(state, "next_attempt_at")

    _while_target_exists(r, group, write)
    return {"sent": sent, "skipped": skipped, "error": None}


def _record_failure(r, group, error, now=None):
    now = time.time() if now is None else now
    state = keys.delivery_state(group)

    def write(pipe, failures):
        failures += 1
        wait = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (failures - 1))
        pipe.hset(state, mapping={"failures": failures, "last_error": error, "last_error_at": now_iso(),
                                  "next_attempt_at": repr(now + wait)})

    _while_target_exists(r, group, write, read=lambda pipe: int(pipe.hget(state, "failures") or 0), watch=(state,))


def due_targets(r, now=None):
    """Targets with undelivered events whose backoff has passed (the dispatcher enqueues these)."""
    now = time.time() if now is None else now
    due = []
    for group in targets(r):
        if backlog(r, group) == 0:
            continue
        nxt = r.hget(keys.delivery_state(group), "next_attempt_at")
        if nxt is None or float(nxt) <= now:
            due.append(group)
    return due
