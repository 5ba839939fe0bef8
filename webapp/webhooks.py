"""Outgoing webhooks and the list-unsubscribe "call URL": telling other systems about every change.

The global event timeline (keys.events_timeline, a stream written in the same MULTI as each change) is the
outbox. Every delivery target reads it through its own consumer group, so nothing is lost:
- `wh:<id>` for each webhook (events of its resource, or all), and `called_url:<rid>` for each resource's
  list-unsubscribe call URL (its one-clicks), so that a call URL that fails delays only itself. A target's
  group and delivery state live as long as the target: a webhook until webhooks/delete, a call URL until it is
  cleared or its resource deleted (sync_call_url_target; upgrade_shared_call_url_group turns the one group all
  call URLs shared in older versions into these);
- a delivery (an RQ job, `workers.jobs.deliver_target`) first re-sends what it read but never acknowledged
  (a worker killed mid-delivery leaves entries pending), then reads new entries; it POSTs them in order and
  XACKs each after a 2xx, with the entries it skipped before it in the same XACK (an entry's `rid` and `method`
  tell most of those without loading its event). The first failure stops the batch and sets the target's next
  attempt with exponential backoff; the dispatcher (workers/housekeeping.py) enqueues one job per target that
  has work (for a call URL or a webhook of one resource: an entry of its own, or many to skip) and whose
  backoff has passed. Delivery is at least once; receivers de-duplicate on X-Webhook-Id.
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
from .resources import decode_shared, get_resource, get_resources, readable
from .validation import as_int, as_object, as_text, as_url, ms_to_time, no_unknown_keys, now_iso

SHARED_CALL_URL_GROUP = "called_url"  # older versions' one group for every call URL: no target, upgraded away
BATCH = 100
BACKOFF_BASE = 1.0  # seconds before the first retry; doubled per failure
BACKOFF_MAX = 3600.0  # seconds, the longest wait between attempts
USER_AGENT = "unsubscribe-service-webhooks/1"
SECRET_MASK = "…"  # webhooks/list's `secret`: set, and not shown
DELIVERY_BUDGET_EVENTS = 100  # POSTs one delivery job makes before it leaves the rest to the target's next job
DELIVERY_BUDGET_SECONDS = 1.0  # no new POST after this long in one job (one POST may still take its timeout)
LAG_COUNT_CAP = 10000  # entries counted one by one when Redis cannot tell a group's lag
DISPATCH_LOOKAHEAD = BATCH  # unacknowledged entries the dispatcher looks through for one a target sends


def group_name(webhook_id):
    """A webhook's delivery target (consumer group)."""
    return f"wh:{webhook_id}"


def call_url_group(resource_id):
    """A resource's call-URL delivery target (consumer group): one per resource, with its own backoff."""
    return f"called_url:{resource_id}"


def _parse(group):
    """(kind, id) of a target's group name: ("wh", webhook id), ("called_url", resource id), else (None, None)."""
    kind, _, ident = group.partition(":")
    return (kind, ident) if kind in ("wh", "called_url") and ident else (None, None)


def _target_key(group):
    """The key that says whether the target exists: the webhooks hash, or the call URL's resource."""
    kind, ident = _parse(group)
    return keys.resource(ident) if kind == "called_url" else keys.webhooks()


def _call_url_wanted(resource_id):
    """The timeline fields of the entries a resource's call URL sends: its one-clicks."""
    return {"rid": str(resource_id), "method": "one_click"}


def _webhook_wanted(hook):
    """The timeline fields of the entries a webhook sends: its resource's, or None for every entry."""
    return {"rid": str(hook["resource_id"])} if hook.get("resource_id") is not None else None


def _wanted(r, group):
    """The timeline fields of the entries the target sends (see backlog), or None: every entry (also for a
    webhook gone, whose delivery then removes what is left of it)."""
    kind, ident = _parse(group)
    if kind == "called_url":
        return _call_url_wanted(ident)
    raw = r.hget(keys.webhooks(), ident)
    return _webhook_wanted(json.loads(raw)) if raw else None


def has_call_url(resource):
    """Whether the resource (a dict, or None for none) has a list-unsubscribe call URL."""
    return bool(resource and resource["unsubscribe"]["list_unsubscribe"].get("called_url"))


def _call_url(raw, resource_id):
    """The call URL of the resource stored as `raw` (JSON text), or None: it has none, or is gone."""
    resource = readable(raw, resource_id, decode_shared) if raw else None
    return resource["unsubscribe"]["list_unsubscribe"].get("called_url") if resource else None


def _target_exists(client, group):
    """Whether the group's target exists: a stored webhook, or a resource with a call URL."""
    kind, ident = _parse(group)
    if kind == "wh":
        return bool(client.hexists(keys.webhooks(), ident))
    return kind == "called_url" and _call_url(client.get(keys.resource(ident)), ident) is not None


def _while_target_exists(r, group, write, read=lambda pipe: None, watch=()):
    """Apply write(pipe, read(pipe)) in one MULTI/EXEC if the target still exists; return whether it does.

    A target's group and delivery state are written only this way (and removed only by _remove_target_if_gone):
    its existence is checked under WATCH of the key that says it exists, so a webhooks/delete, a call URL
    cleared or its resource deleted, landing at any moment of a delivery, cannot be followed by a write that
    brings back what the removal removed (nothing would remove it again). `read` runs under the same WATCH;
    `watch` names the keys it reads."""
    def attempt(pipe):
        if not _target_exists(pipe, group):
            return False
        seen = read(pipe)
        pipe.multi()
        write(pipe, seen)
        return True

    return r.transaction(attempt, _target_key(group), *watch, value_from_callable=True)


def _remove_target_if_gone(r, group):
    """Remove the consumer group and delivery state of a target that no longer exists, in one MULTI/EXEC under
    WATCH of the key that says it exists: a target that comes back meanwhile (a call URL set again, whose group
    is then created) keeps them. Returns whether it removed them."""
    def attempt(pipe):
        if _target_exists(pipe, group):
            return False
        has_group = _group_info(pipe, group) is not None  # (XGROUP DESTROY fails on a timeline never created)
        pipe.multi()
        if has_group:
            pipe.xgroup_destroy(keys.events_timeline(), group)
        pipe.delete(keys.delivery_state(group))
        return True

    return r.transaction(attempt, _target_key(group), value_from_callable=True)


def _groups(r):
    """XINFO GROUPS of the timeline: every consumer group on it ([] before the timeline exists)."""
    try:
        return r.xinfo_groups(keys.events_timeline())
    except ResponseError:
        return []


def _group_info(r, group):
    return next((g for g in _groups(r) if g["name"] == group), None)


def _resume_after(r, info):
    """The id after which the entries the group `info` describes has not acknowledged begin: just before its
    oldest pending entry, else its last delivered one. Deliveries acknowledge in order, so every entry after it
    is still to be gone through."""
    if not info.get("pending"):
        return info["last-delivered-id"]
    ms, seq = (int(part) for part in r.xpending(keys.events_timeline(), info["name"])["min"].split("-"))
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2 ** 64 - 1}"


def _timeline_end(r):
    """(last entry id, entries added) of the timeline, from one XINFO STREAM: where a new group starts."""
    try:
        info = r.xinfo_stream(keys.events_timeline())
        return info["last-generated-id"], info["entries-added"]
    except ResponseError:  # no stream yet
        return "0-0", 0


def _group_start(r, group):
    """(id, entries read or None) where a new target's group starts: the timeline's end; for a call URL's, while
    the shared group of an older version is still there, where that group stood (its calls not made yet are
    this target's too: see upgrade_shared_call_url_group). There the entries read are not told: Redis counts
    the lag again once the group has read to the timeline's end, and backlog() counts it one by one until then."""
    shared = _group_info(r, SHARED_CALL_URL_GROUP) if _parse(group)[0] == "called_url" else None
    return (_resume_after(r, shared), None) if shared is not None else _timeline_end(r)


def _stage_group(pipe, group, start):
    pipe.xgroup_create(keys.events_timeline(), group, id=start[0], mkstream=True, entries_read=start[1])


def ensure_group(r, group):
    """Create the target's consumer group on the timeline, seeing events from now on, unless it exists; return
    False, creating nothing, when the target does not exist (any more; see _while_target_exists).

    The group starts at the stream's last entry and is told how many entries that is (ENTRIESREAD): without
    it Redis cannot count the group's lag once new entries come (XINFO GROUPS says null), and a target whose
    backlog reads 0 is never dispatched. One XINFO STREAM gives both, consistently; an entry added before the
    group exists comes after that last entry, so the group delivers it and counts it in its lag. (A call URL's
    group starts elsewhere while an older version's shared group is left: see _group_start.)"""
    start = _group_start(r, group)
    try:
        return _while_target_exists(r, group, lambda pipe, _: _stage_group(pipe, group, start))
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
    """Every webhook with its delivery state: last error, last success, backlog (undelivered events). The secret
    is masked whole (webhooks/add returned it): even its first characters would give part of it away."""
    out = []
    for raw in r.hvals(keys.webhooks()):
        hook = json.loads(raw)
        state = shown_state(r, group_name(hook["id"]), _webhook_wanted(hook))
        out.append({**{k: v for k, v in hook.items() if k != "secret"}, "secret": SECRET_MASK, **state})
    return sorted(out, key=lambda h: h["id"])


def delete_webhook(r, webhook_id):
    # The webhook goes first: a delivery running meanwhile writes its group and state only while it exists
    # (_while_target_exists), so after this HDEL none comes back behind the removal.
    if not r.hdel(keys.webhooks(), webhook_id):
        raise NotFound(f"webhook {webhook_id} does not exist")
    _remove_target_if_gone(r, group_name(webhook_id))


def sync_call_url_target(r, resource_id, before, after):
    """After a resource is added, updated or deleted (`before` and `after`: the resource the change found and
    left, None for none): give its call URL a delivery target, or remove the target of a call URL cleared or a
    resource gone. It reads the resource as it is now (under WATCH), so changes made at the same time end with
    the target the last of them asks for. A change with a call URL on neither side has no target to change and
    costs nothing (the change that last set or cleared the call URL syncs it). Returns whether the resource
    has a target."""
    if not (has_call_url(before) or has_call_url(after)):
        return False
    group = call_url_group(resource_id)
    if ensure_group(r, group):
        return True
    _remove_target_if_gone(r, group)
    return False


def call_url_delivery(r, resource):
    """The delivery state of the resource's call URL, as webhooks/list shows a webhook's; None without one.
    Its backlog is the resource's one-clicks not called yet."""
    if not has_call_url(resource):
        return None
    return shown_state(r, call_url_group(resource["id"]), _call_url_wanted(resource["id"]))


def upgrade_shared_call_url_group(r):
    """Older versions delivered every resource's call URL through one consumer group, `called_url`, where one
    failing URL held up all the others. Give each resource with a call URL its own target, whose group starts
    where the shared one stood (_group_start), so the calls it had not made are made, each by its resource's
    target (at least once: a call it made but had not acknowledged is made again); then remove the shared group
    and its delivery state (its backoff is not carried over). The dispatcher runs it whenever it finds the
    shared group (an older process still running may create it again: it is upgraded again, and the targets
    that exist by then keep their place)."""
    ids = r.zrange(keys.resource_index(), 0, -1)
    for resource in get_resources(r, ids).values():
        if has_call_url(resource):
            ensure_group(r, call_url_group(resource["id"]))
    with r.pipeline() as pipe:
        pipe.xgroup_destroy(keys.events_timeline(), SHARED_CALL_URL_GROUP)
        pipe.delete(keys.delivery_state(SHARED_CALL_URL_GROUP))
        pipe.execute()


def _matches(fields, wanted):
    return wanted is None or all(fields.get(name) == value for name, value in wanted.items())


def _may_match(fields, wanted):
    """Whether the entry may be one the target sends, as far as its own fields tell: an older entry without
    `rid` and `method` may (its event decides)."""
    return wanted is None or all(fields.get(name, value) == value for name, value in wanted.items())


def _backlog_of(r, info, wanted=None):
    lag = info.get("lag")
    if wanted is None and lag is not None:
        return int(info.get("pending") or 0) + int(lag)
    # Redis cannot count the lag when an entry was deleted from the stream, nor of some entries only: count.
    if wanted is None:  # the pending entries, and what follows the last one read
        counted, start = int(info.get("pending") or 0), info["last-delivered-id"]
    else:  # what matches, from the first entry not acknowledged (pending ones included)
        counted, start = 0, _resume_after(r, info)
    entries = r.xrange(keys.events_timeline(), "(" + start, "+", count=LAG_COUNT_CAP)
    return counted + sum(1 for _id, fields in entries if _matches(fields, wanted))


def backlog(r, group, wanted=None):
    """Events the target has not acknowledged yet (read but unacknowledged, plus not yet read). With `wanted`,
    the timeline fields of the entries the target sends ({"rid": ...} for a webhook of one resource, and
    {"method": "one_click"} too for a call URL; its deliveries acknowledge the others unsent), only those count,
    one by one up to LAG_COUNT_CAP entries; without it, every entry a delivery job still has to go through."""
    info = _group_info(r, group)
    return 0 if info is None else _backlog_of(r, info, wanted)


def _worth_a_job(r, info):
    """Whether the target the group `info` describes needs a delivery job: an entry it has not acknowledged that
    it may send (see _may_match) among the first DISPATCH_LOOKAHEAD, or that many entries (its job goes through
    them, unloaded, and the next look starts after them). So another resource's events do not make a call URL,
    or a webhook of one resource, due, and looking costs one XRANGE, no work per event where events are made."""
    if _backlog_of(r, info) == 0:
        return False
    wanted = _wanted(r, info["name"])
    if wanted is None:
        return True
    entries = r.xrange(keys.events_timeline(), "(" + _resume_after(r, info), "+", count=DISPATCH_LOOKAHEAD)
    return len(entries) == DISPATCH_LOOKAHEAD or any(_may_match(fields, wanted) for _id, fields in entries)


def needs_delivery(r, group):
    """Whether the target needs a delivery job (see _worth_a_job)."""
    info = _group_info(r, group)
    return info is not None and _worth_a_job(r, info)


def target_state(r, group, wanted=None):
    state = r.hgetall(keys.delivery_state(group))
    return {"backlog": backlog(r, group, wanted), "last_error": state.get("last_error"),
            "last_error_at": state.get("last_error_at"), "last_success_at": state.get("last_success_at"),
            "failures": int(state.get("failures", 0)),
            "next_attempt_at": float(state["next_attempt_at"]) if state.get("next_attempt_at") else None}


def shown_state(r, group, wanted=None):
    """target_state as the API shows it: next_attempt_at is a time, written as every time the API answers."""
    state = target_state(r, group, wanted)
    if state["next_attempt_at"] is not None:
        state["next_attempt_at"] = ms_to_time(round(state["next_attempt_at"] * 1000))
    return state


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


class _OutOfTime(TimeoutError):
    """The POST's time ran out before it had a socket (looking the name up, or connecting)."""


def _lookup(host, port, seconds):
    """getaddrinfo(host, port) for a TCP connection, given at most `seconds`: the system's lookup cannot be
    interrupted (a name server that does not answer holds it for its own timeouts and retries, 10 s by
    default), so it runs in a daemon thread that is left to finish on its own when the time is up."""
    found = {}

    def look():
        try:
            found["infos"] = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            found["error"] = exc

    if seconds <= 0:
        raise _OutOfTime("timed out")
    thread = threading.Thread(target=look, name="webhook-lookup", daemon=True)
    thread.start()
    thread.join(seconds)
    if "error" in found:
        raise found["error"]
    if "infos" not in found:
        raise _OutOfTime("timed out")
    return found["infos"]


def _connect_by(deadline, per_read):
    """A replacement for socket.create_connection (http.client's `_create_connection`) that ends by `deadline`
    (time.monotonic()): a bounded lookup, then each of the name's addresses in turn with only the time left
    (create_connection gives every address the whole timeout: n addresses that do not answer take n times
    it). The connected socket reads with `per_read`; the POST's watchdog bounds the rest."""
    def create_connection(address, _timeout=None, source_address=None):
        host, port = address
        error = None
        for family, kind, proto, _name, sockaddr in _lookup(host, port, deadline - time.monotonic()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(left)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                sock.settimeout(per_read)
                return sock
            except TimeoutError:  # it had all the time left
                sock.close()
                break
            except OSError as exc:
                sock.close()
                error = exc
        if error is not None and deadline > time.monotonic():
            raise error  # every address refused (or failed) in time: say how
        raise _OutOfTime("timed out")
    return create_connection


def post_json(url, payload, event_id, secret, timeout):
    """POST one event; return None on 2xx, else a short error text (never raises for HTTP problems).

    `timeout` bounds the whole POST (the name's lookup, every connect attempt, sending, the answer's status and
    headers; a body cut off after them does not undo a 2xx), not each socket read: a target that trickles its
    answer is cut off when its time is up, so a delivery job and its target lock (which lasts timeout + 5 s)
    are never outlived by one POST.
    A 3xx is the target's answer, not a delivery, and is not followed (that would send a GET without the event,
    or the event elsewhere)."""
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    ts = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "X-Webhook-Id": event_id,
               "X-Webhook-Timestamp": ts}
    if secret:
        headers["X-Webhook-Signature"] = sign(secret, ts, body)
    fired = threading.Event()
    deadline = time.monotonic() + timeout
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url[:100]}")
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.netloc.rpartition("@")[2], timeout=timeout)  # raises InvalidURL for a bad port
        # The watchdog can only shut a socket that exists: the lookup and the connect attempts before it have
        # their own bound. (HTTPSConnection.connect calls it too, then does the TLS handshake on its socket.)
        conn._create_connection = _connect_by(deadline, timeout)
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _abort, (conn, fired))
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
        if fired.is_set() or isinstance(exc, _OutOfTime):
            return f"TimeoutError: timed out (no complete answer within {timeout:g} s)"
        if isinstance(exc, UnicodeError):
            return "InvalidURL: the URL has characters that are not ASCII: add the target again to have it encoded"
        return f"{type(exc).__name__}: {exc}"[:200]


def _plan(r, group, event):
    """(url, payload, secret) to send for this event, or None when the target does not want it. Decided on the
    event itself, which every timeline entry leads to (deliver loads only those whose entry's fields may match:
    older entries carry no `rid` or `method`)."""
    kind, ident = _parse(group)
    if kind == "called_url":
        if event["method"] != "one_click" or str(event["resource_id"]) != ident:
            return None  # another resource's event, or no one-click: acknowledged unsent
        resource = get_resources(r, [event["resource_id"]]).get(event["resource_id"])
        url = resource and resource["unsubscribe"]["list_unsubscribe"].get("called_url")
        if not url:
            return None
        payload = {"smid": event["smid"], "result": event["after"]["status"], "cats": event["after"]["cats"],
                   "resource_id": event["resource_id"], "profile_id": event["profile_id"], "event_id": event["id"],
                   "at": event["at"]}
        return url, payload, resource["rtoken"]
    hook_raw = r.hget(keys.webhooks(), ident)
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
    if _parse(group)[0] is None:
        return {"sent": 0, "skipped": 0, "error": None}  # the shared call-URL group's job: the dispatcher upgrades it
    if not _target_exists(r, group):
        # Removed after its job was queued: re-create nothing, and remove what a removal cut short left behind.
        _remove_target_if_gone(r, group)
        return {"sent": 0, "skipped": 0, "error": None}
    # The target's group was made with it (a webhook's in the same MULTI, a call URL's by sync_call_url_target),
    # so it is not made here: a removal from now on makes the reads below answer NOGROUP, and the writes
    # (_while_target_exists) write nothing.
    wanted = _wanted(r, group)
    sent = skipped = 0
    started = time.monotonic()
    gone_through = []  # ids skipped since the last XACK: acknowledged with the next one sent, in one call

    def acknowledge(*ids):
        ids = gone_through + list(ids)
        gone_through.clear()
        if ids:
            r.xack(keys.events_timeline(), group, *ids)

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
                return {"sent": sent, "skipped": skipped, "error": None}  # the target was removed meanwhile
            entries = reply[0][1] if reply else []
            entries = [(eid, f) for eid, f in entries if f]  # a trimmed entry comes back without fields
            if not entries:
                break
            # An entry's own rid and method tell most of those the target does not send: their events are not
            # loaded (a call URL goes through every resource's events).
            loading = [_may_match(fields, wanted) for _eid, fields in entries]
            events = iter(load_refs(r, [f["ref"].split("|") for (_eid, f), load in zip(entries, loading) if load]))
            for (entry_id, fields), load in zip(entries, loading):
                event = next(events) if load else None
                plan = _plan(r, group, event) if event else None
                if not plan:
                    skipped += 1
                    gone_through.append(entry_id)
                    continue
                if budget_spent():
                    acknowledge()
                    return _finish(r, group, sent, skipped)
                if heartbeat:
                    heartbeat()
                error = post_json(plan[0], plan[1], event["id"], plan[2], timeout)
                if error:
                    acknowledge()
                    _record_failure(r, group, error, now)
                    return {"sent": sent, "skipped": skipped, "error": error}
                sent += 1
                acknowledge(entry_id)
            acknowledge()
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
        # The exponent stops growing once the wait is at its longest: 2 ** 1024 would not fit in a float.
        wait = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(failures - 1, 64))
        pipe.hset(state, mapping={"failures": failures, "last_error": error, "last_error_at": now_iso(),
                                  "next_attempt_at": repr(now + wait)})

    _while_target_exists(r, group, write, read=lambda pipe: int(pipe.hget(state, "failures") or 0), watch=(state,))


def due_targets(r, now=None):
    """Targets with events to send (see _worth_a_job) whose backoff has passed (the dispatcher enqueues these).
    Every target has its consumer group on the timeline, so one XINFO GROUPS lists them with their backlogs; a
    group left by a removal cut short is listed too (a call URL's once DISPATCH_LOOKAHEAD entries came after
    it), and its delivery removes it. The shared call-URL group of an older version is upgraded first."""
    now = time.time() if now is None else now
    groups = _groups(r)
    if any(g["name"] == SHARED_CALL_URL_GROUP for g in groups):
        upgrade_shared_call_url_group(r)
        groups = _groups(r)
    due = []
    for info in groups:
        if _parse(info["name"])[0] is None or not _worth_a_job(r, info):
            continue
        nxt = r.hget(keys.delivery_state(info["name"]), "next_attempt_at")
        if nxt is None or float(nxt) <= now:
            due.append(info["name"])
    return due
