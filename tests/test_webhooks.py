"""Outgoing webhooks and the list-unsubscribe call URL, delivered to a real HTTP receiver."""
import hashlib
import hmac
import json

import pytest
import redis

from conftest import email_resource, redis_state, round_trips
from webapp import keys, webhooks

SECRET = "s3cret-webhook-key-123"


def change(api, resource, status="unsubscribed", profile_id="p-42"):
    ident = {"db_id": 1, "profile_id": profile_id, "resource_id": resource["id"], "channel": "email",
             "email": f"{profile_id}@example.com"}
    api.ok("subscriptions/set", **ident)
    api.ok("subscriptions/set", **ident, status=status)
    return ident


def test_delivery_is_signed_and_verifiable(api, r, resource, receiver):
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    change(api, resource)
    result = webhooks.deliver(r, webhooks.group_name(hook["id"]))
    assert result == {"sent": 2, "skipped": 0, "error": None}
    first, second = receiver.requests
    for req in receiver.requests:
        h = req["headers"]
        expected = "sha256=" + hmac.new(SECRET.encode(), f"{h['X-Webhook-Timestamp']}.".encode() + req["body"],
                                        hashlib.sha256).hexdigest()
        assert h["X-Webhook-Signature"] == expected
        assert h["X-Webhook-Id"] == json.loads(req["body"])["id"]
        assert h["Content-Type"] == "application/json"
    assert json.loads(second["body"])["after"]["status"] == "unsubscribed"     # in order
    assert json.loads(first["body"])["before"] is None
    listed = api.ok("webhooks/list")[0]
    assert listed["backlog"] == 0 and listed["last_error"] is None and listed["last_success_at"]
    assert SECRET not in json.dumps(listed)


def test_resource_filter(api, r, resource, receiver):
    other = api.ok("resources/add", **email_resource(name="Other"))
    hook = api.ok("webhooks/add", url=receiver.url, resource_id=other["id"], secret=SECRET)
    change(api, resource)
    change(api, other, profile_id="p-7")
    result = webhooks.deliver(r, webhooks.group_name(hook["id"]))
    assert result["sent"] == 2 and result["skipped"] == 2
    assert {b["resource_id"] for b in receiver.bodies()} == {other["id"]}


def test_a_webhook_added_after_events_counts_and_gets_the_new_ones(api, r, resource, receiver):
    change(api, resource, profile_id="p-1")                       # history the new webhook must not get
    change(api, resource, profile_id="p-2")
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    group = webhooks.group_name(hook["id"])
    assert webhooks.target_state(r, group)["backlog"] == 0 and webhooks.due_targets(r) == []
    change(api, resource, profile_id="p-3")
    assert webhooks.target_state(r, group)["backlog"] == 2 and webhooks.due_targets(r) == [group]
    assert webhooks.deliver(r, group) == {"sent": 2, "skipped": 0, "error": None}
    assert {b["profile_id"] for b in receiver.bodies()} == {"p-3"}
    assert webhooks.target_state(r, group)["backlog"] == 0 and webhooks.due_targets(r) == []


def test_a_backlog_redis_cannot_count_is_counted(api, r, resource, receiver):
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    group = webhooks.group_name(hook["id"])
    change(api, resource)
    change(api, resource, profile_id="p-43")
    second = r.xrange(keys.events_timeline())[1][0]
    r.xdel(keys.events_timeline(), second)             # a deleted entry: XINFO GROUPS gives the lag as null
    assert r.xinfo_groups(keys.events_timeline())[0]["lag"] is None
    assert webhooks.target_state(r, group)["backlog"] == 3 and webhooks.due_targets(r) == [group]


def test_a_timer_event_reaches_a_webhook_for_its_resource(api, app, r, receiver):
    from test_delayed_support import delayed_contexts
    from webapp import unsubscribe
    (ctx,) = delayed_contexts(app, r, 1, timer_minutes=1)
    hook = api.ok("webhooks/add", url=receiver.url, resource_id=ctx.resource["id"], secret=SECRET)
    armed = unsubscribe.arm_timer(r, ctx, unsubscribe.resolve_scope(ctx), 0.01)
    assert unsubscribe.fire_timers(r, [ctx.key], now=armed["deadline"] + 1) == {ctx.key: "fired"}
    assert webhooks.deliver(r, webhooks.group_name(hook["id"])) == {"sent": 1, "skipped": 0, "error": None}
    assert [b["method"] for b in receiver.bodies()] == ["timer"]


def test_retries_after_500s_with_backoff(api, r, resource, receiver):
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    group = webhooks.group_name(hook["id"])
    change(api, resource)
    receiver.behaviours = [500, 503]
    assert webhooks.deliver(r, group, now=1000.0)["error"] == "HTTP 500"
    state = webhooks.target_state(r, group)
    assert state["backlog"] == 2 and state["failures"] == 1 and state["next_attempt_at"] == 1001.0
    assert webhooks.due_targets(r, now=1000.5) == [] and webhooks.due_targets(r, now=1001.0) == [group]
    assert webhooks.deliver(r, group, now=1001.0)["error"] == "HTTP 503"
    assert webhooks.target_state(r, group)["next_attempt_at"] == 1003.0        # doubled
    listed = api.ok("webhooks/list")[0]
    assert listed["last_error"] == "HTTP 503" and listed["backlog"] == 2
    assert listed["next_attempt_at"] == "1970-01-01T00:16:43.000Z"           # RFC 3339, as every API time
    assert webhooks.deliver(r, group)["sent"] == 2
    ids = [req["headers"]["X-Webhook-Id"] for req in receiver.requests]
    assert ids[0] == ids[1] == ids[2] and ids[3] != ids[0]                    # same event retried, then next
    assert webhooks.target_state(r, group)["backlog"] == 0


def test_a_delivery_stops_at_its_budget_and_the_next_one_goes_on_in_order(api, r, resource, receiver):
    """A delivery job's budget (events, seconds) leaves the rest, unfailed, to the target's next job."""
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    group = webhooks.group_name(hook["id"])
    for i in range(3):
        change(api, resource, profile_id=f"p-{i}")                              # 6 events
    assert webhooks.deliver(r, group, max_events=4) == {"sent": 4, "skipped": 0, "error": None}
    state = webhooks.target_state(r, group)
    assert state["backlog"] == 2 and state["failures"] == 0 and state["next_attempt_at"] is None
    assert webhooks.due_targets(r) == [group]                                    # due now, no backoff
    receiver.behaviours = [("sleep", 0.4, 200)] * 2
    assert webhooks.deliver(r, group, max_seconds=0.3)["sent"] == 1             # no new POST after 0.3 s
    assert webhooks.deliver(r, group, max_events=4)["sent"] == 1
    ids = [json.loads(req["body"])["id"] for req in receiver.requests]
    timeline = [e for p in ("p-0", "p-1", "p-2") for e in api.ok("events/list", db_id=1, profile_id=p)[::-1]]
    assert ids == [e["id"] for e in timeline]                                    # each once, in order


def test_timeouts_count_as_failures(api, r, resource, receiver):
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    change(api, resource)
    receiver.behaviours = [("sleep", 1.5, 200)]
    result = webhooks.deliver(r, webhooks.group_name(hook["id"]), timeout=0.5)
    assert result["error"] and "timed out" in result["error"].lower()
    assert webhooks.deliver(r, webhooks.group_name(hook["id"]), timeout=2)["sent"] == 2


def test_the_timeout_bounds_the_whole_post_not_each_read(api, r, resource, receiver):
    """A target that trickles its answer (a header line every 0.25 s, for 6 s) is cut off at the timeout:
    it holds neither the worker nor, past the timeout, the target's delivery lock."""
    import time
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    change(api, resource)
    receiver.behaviours = [("trickle", 6, 200)]
    started = time.monotonic()
    result = webhooks.deliver(r, webhooks.group_name(hook["id"]), timeout=1.0, now=1000.0)
    assert time.monotonic() - started < 2, result
    assert result["sent"] == 0 and result["error"] == "TimeoutError: timed out (no complete answer within 1 s)"
    assert webhooks.deliver(r, webhooks.group_name(hook["id"]), timeout=1.0)["sent"] == 2   # retried


def test_a_2xx_whose_body_comes_after_the_timeout_is_a_delivery(api, r, resource, receiver):
    """The status and headers came in time: the target took the event, however slowly its body follows (a
    timeout here would send the event again)."""
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    change(api, resource)
    receiver.behaviours = [("slow_body", 1.5, 200), ("slow_body", 1.5, 200)]
    result = webhooks.deliver(r, webhooks.group_name(hook["id"]), timeout=0.5)
    assert result["sent"] == 2 and result["error"] is None, result
    assert len(receiver.requests) == 2


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_a_failure_not_a_delivery(api, r, resource, receiver, status):
    """Following it would send a GET without the event (or the event elsewhere) and drop it as delivered."""
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    group = webhooks.group_name(hook["id"])
    change(api, resource)
    receiver.behaviours = [("redirect", status, receiver.url.replace("/hook", "/landed"))]
    assert webhooks.deliver(r, group, now=1000.0)["error"] == f"HTTP {status}"
    assert [req["path"] for req in receiver.requests] == ["/hook"]              # nothing followed it
    assert webhooks.target_state(r, group)["backlog"] == 2
    assert webhooks.deliver(r, group, now=2000.0)["sent"] == 2                 # retried, then delivered


def test_a_stored_url_urllib_cannot_send_is_a_failure_not_a_crash(api, r, resource):
    """A webhook stored before its URL's port was checked: each try is an error with backoff."""
    hook = api.ok("webhooks/add", url="http://127.0.0.1:9/hook", secret=SECRET)
    stored = json.loads(r.hget(keys.webhooks(), hook["id"]))
    r.hset(keys.webhooks(), hook["id"], json.dumps({**stored, "url": "http://127.0.0.1:abc/hook"}))
    change(api, resource)
    result = webhooks.deliver(r, webhooks.group_name(hook["id"]), now=1000.0, timeout=1)
    assert result["sent"] == 0 and "InvalidURL" in result["error"]
    assert webhooks.target_state(r, webhooks.group_name(hook["id"]))["next_attempt_at"] == 1001.0


def test_a_url_with_other_letters_is_stored_and_sent_as_its_ascii_uri(api, r, resource, receiver):
    """As a browser sends it: non-ASCII in path and query percent-encoded as UTF-8, the host IDNA-encoded."""
    hook = api.ok("webhooks/add", url=receiver.url + "/caf\u00e9?k=\u00fc", secret=SECRET)
    assert hook["url"] == receiver.url + "/caf%C3%A9?k=%C3%BC"
    other = api.ok("webhooks/add", url="https://fa\u00df.example:8443/\u043e", secret=SECRET)
    assert other["url"] == "https://xn--fa-hia.example:8443/%D0%BE"
    change(api, resource)
    assert webhooks.deliver(r, webhooks.group_name(hook["id"])) == {"sent": 2, "skipped": 0, "error": None}
    assert [req["path"] for req in receiver.requests] == ["/hook/caf%C3%A9?k=%C3%BC"] * 2
    res = api.ok("resources/add", **email_resource(unsubscribe={
        "mode": "confirm", "list_unsubscribe": {"enabled": True, "called_url": receiver.url + "/\u00e9"}}))
    assert res["unsubscribe"]["list_unsubscribe"]["called_url"] == receiver.url + "/%C3%A9"


def test_a_stored_url_with_other_letters_fails_with_a_readable_error(api, r, resource, receiver):
    """A webhook stored before as_url encoded it: each try fails with backoff, and the error says why."""
    hook = api.ok("webhooks/add", url="http://127.0.0.1:9/hook", secret=SECRET)
    stored = json.loads(r.hget(keys.webhooks(), hook["id"]))
    r.hset(keys.webhooks(), hook["id"], json.dumps({**stored, "url": receiver.url + "/caf\u00e9"}))
    change(api, resource)
    result = webhooks.deliver(r, webhooks.group_name(hook["id"]), now=1000.0, timeout=1)
    assert result["error"] == ("InvalidURL: the URL has characters that are not ASCII: add the target again to "
                               "have it encoded")


def test_unreachable_target(api, r, resource):
    hook = api.ok("webhooks/add", url="http://127.0.0.1:9/hook", secret=SECRET)
    change(api, resource)
    result = webhooks.deliver(r, webhooks.group_name(hook["id"]), timeout=1)
    assert result["error"] and result["sent"] == 0


def test_call_url_after_one_click(api, client, r, receiver):
    res = api.ok("resources/add", **email_resource(unsubscribe={
        "mode": "confirm", "list_unsubscribe": {"enabled": True, "called_url": receiver.url}}))
    ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email",
             "email": "ann@example.com"}
    api.ok("subscriptions/set", **ident)
    links = api.ok("messages/links", **ident)
    path = links["unsubscribe_url"].removeprefix("https://unsub.example")
    assert client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 200   # replay: no 2nd call
    assert webhooks.deliver(r, webhooks.call_url_group(res["id"])) == {"sent": 1, "skipped": 1, "error": None}
    (call,) = receiver.bodies()
    assert call["smid"] == links["smid"] and call["result"] == "unsubscribed" and call["profile_id"] == "p-42"
    sig = receiver.requests[0]["headers"]["X-Webhook-Signature"]
    ts = receiver.requests[0]["headers"]["X-Webhook-Timestamp"]
    assert sig == "sha256=" + hmac.new(res["rtoken"].encode(), f"{ts}.".encode() + receiver.requests[0]["body"],
                                       hashlib.sha256).hexdigest()


@pytest.mark.parametrize("body,message", [
    ({"url": "ftp://x"}, "absolute"), ({"url": "https://x.example", "secret": "short"}, "16"),
    ({"url": "http://127.0.0.1:abc/x"}, "absolute"), ({"url": "https://x.example:65536/"}, "absolute"),
    ({"url": "https://x.example/a\x00b"}, "control characters"),
    ({"url": "https://x.example", "resource_id": 999}, "does not exist"), ({}, "absolute"),
])
def test_add_validation_writes_nothing(api, r, body, message):
    before = redis_state(r)
    status = 404 if "resource_id" in body else 400
    assert message in api.fail("webhooks/add", status, **body)
    assert redis_state(r) == before


def test_a_delivery_after_delete_leaves_nothing_behind(api, r, resource, receiver):
    """A delivery job queued before webhooks/delete runs after it: it sends nothing and re-creates no group."""
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    change(api, resource)
    api.ok("webhooks/delete", id=hook["id"])
    assert webhooks.deliver(r, webhooks.group_name(hook["id"])) == {"sent": 0, "skipped": 0, "error": None}
    assert r.xinfo_groups(keys.events_timeline()) == [] and receiver.requests == []


# Where webhooks/delete lands in a delivery: right after the named call (owner, name) returns what `lands_after`
# accepts. Each is a step after which the old delivery wrote for the deleted webhook.
DELETE_MOMENTS = {
    "after the existence check": (redis.Redis, "hexists", lambda args, result: args[1] == keys.webhooks()),
    "during a failed POST": (webhooks, "post_json", lambda args, result: True),
    "during a delivered POST": (webhooks, "post_json", lambda args, result: True),
    "after the last read": (redis.Redis, "xreadgroup", lambda args, result: not result),
}


@pytest.mark.parametrize("moment", DELETE_MOMENTS)
def test_a_webhook_deleted_during_its_delivery_leaves_nothing_behind(api, r, resource, receiver, monkeypatch,
                                                                       moment):
    """webhooks/delete may land at any moment of a delivery job: the job then re-creates no consumer group and
    writes no delivery state for the webhook that is gone (nothing would ever remove them)."""
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    group = webhooks.group_name(hook["id"])
    change(api, resource)                                                        # 2 events
    receiver.behaviours = [500] if moment == "during a failed POST" else []
    owner, name, lands_after = DELETE_MOMENTS[moment]
    real, deleted = getattr(owner, name), []

    def then_delete(*args, **kwargs):
        result = real(*args, **kwargs)
        if not deleted and lands_after(args, result):
            deleted.append(hook["id"])                       # first: the delete itself checks existence again
            api.ok("webhooks/delete", id=hook["id"])
        return result

    monkeypatch.setattr(owner, name, then_delete)
    webhooks.deliver(r, group)
    assert deleted
    assert r.xinfo_groups(keys.events_timeline()) == [] and not r.exists(keys.delivery_state(group))
    posts = {"after the existence check": 0, "after the last read": 2}.get(moment, 1)  # none after the delete
    assert len(receiver.requests) == posts


def test_delete(api, r, receiver):
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    api.ok("webhooks/delete", id=hook["id"])
    assert api.ok("webhooks/list") == []
    api.fail("webhooks/delete", 404, id=hook["id"])


def test_the_backlog_of_a_webhook_for_one_resource_counts_only_that_resources_events(api, r, resource):
    other = api.ok("resources/add", **email_resource(name="Other"))
    api.ok("webhooks/add", url="http://127.0.0.1:9/hook", resource_id=other["id"], secret=SECRET)
    api.ok("webhooks/add", url="http://127.0.0.1:9/all", secret=SECRET)
    change(api, resource)                                 # events of a resource the first webhook does not follow
    before = {h["url"]: h["backlog"] for h in api.ok("webhooks/list")}
    assert before["http://127.0.0.1:9/hook"] == 0 and before["http://127.0.0.1:9/all"] > 0
    change(api, other)                                    # and of the one it follows
    after = {h["url"]: h["backlog"] for h in api.ok("webhooks/list")}
    assert after["http://127.0.0.1:9/hook"] == after["http://127.0.0.1:9/all"] - before["http://127.0.0.1:9/all"] > 0


def call_url_resource(api, called_url, name="Weekly news"):
    return api.ok("resources/add", **email_resource(name=name, unsubscribe={
        "mode": "confirm", "list_unsubscribe": {"enabled": True, "called_url": called_url}}))


def one_click(api, client, res, profile_id="p-42"):
    ident = {"db_id": 1, "profile_id": profile_id, "resource_id": res["id"], "channel": "email",
             "email": f"{profile_id}@example.com"}
    api.ok("subscriptions/set", **ident)
    links = api.ok("messages/links", **ident)
    assert client.post(links["unsubscribe_url"].removeprefix("https://unsub.example"),
                       data={"List-Unsubscribe": "One-Click"}).status_code == 200
    return links["smid"]


def delivery_leftovers(r):
    """Consumer groups on the timeline and delivery-state keys: what a removed target must not leave."""
    groups = [g["name"] for g in r.xinfo_groups(keys.events_timeline())] if r.exists(keys.events_timeline()) else []
    return groups + sorted(r.scan_iter(keys.delivery_state("*")))


def test_resources_get_shows_no_call_url_delivery_without_a_call_url(api, resource):
    assert api.ok("resources/get", id=resource["id"])["called_url_delivery"] is None


@pytest.mark.parametrize("removal", ["call URL cleared", "resource deleted"])
def test_a_removed_call_url_leaves_no_group_or_delivery_state(api, client, r, receiver, removal):
    """A call URL's target (its consumer group, its delivery state) lives as long as the call URL: added with it
    by resources/add or update, removed when it is cleared or its resource deleted."""
    res = api.ok("resources/add", **email_resource())
    assert delivery_leftovers(r) == []
    api.ok("resources/update", id=res["id"], unsubscribe={"list_unsubscribe": {"called_url": receiver.url}})
    (group,) = delivery_leftovers(r)
    assert group == f"called_url:{res['id']}"
    one_click(api, client, res)
    receiver.behaviours = [500]
    assert webhooks.deliver(r, group)["error"] == "HTTP 500"
    assert delivery_leftovers(r) == [group, keys.delivery_state(group)]
    if removal == "call URL cleared":
        api.ok("resources/update", id=res["id"], unsubscribe={"list_unsubscribe": {"called_url": None}})
    else:
        api.ok("resources/delete", id=res["id"])
    assert delivery_leftovers(r) == []
    assert webhooks.due_targets(r) == []


# Where the call URL's removal lands in its delivery (see DELETE_MOMENTS).
CALL_URL_REMOVAL_MOMENTS = {k: v for k, v in DELETE_MOMENTS.items() if k != "after the existence check"}


@pytest.mark.parametrize("removal", ["call URL cleared", "resource deleted"])
@pytest.mark.parametrize("moment", CALL_URL_REMOVAL_MOMENTS)
def test_a_call_url_removed_during_its_delivery_leaves_nothing_behind(api, client, r, receiver, monkeypatch,
                                                                     moment, removal):
    """As for a webhook deleted during its delivery: the job brings back no group or delivery state."""
    res = call_url_resource(api, receiver.url)
    (group,) = delivery_leftovers(r)
    one_click(api, client, res, "p-1")
    one_click(api, client, res, "p-2")                                           # 2 calls
    receiver.behaviours = [500] if moment == "during a failed POST" else []
    owner, name, lands_after = CALL_URL_REMOVAL_MOMENTS[moment]
    real, removed = getattr(owner, name), []

    def then_remove(*args, **kwargs):
        result = real(*args, **kwargs)
        if not removed and lands_after(args, result):
            removed.append(removal)                          # first: the removal reads the timeline too
            if removal == "resource deleted":
                api.ok("resources/delete", id=res["id"])
            else:
                api.ok("resources/update", id=res["id"], unsubscribe={"list_unsubscribe": {"called_url": None}})
        return result

    monkeypatch.setattr(owner, name, then_remove)
    webhooks.deliver(r, group)
    assert removed
    assert delivery_leftovers(r) == []
    assert len(receiver.requests) == (2 if moment == "after the last read" else 1)   # none after the removal


def test_each_call_url_is_its_own_target(api, client, r, receiver):
    """A failing call URL backs off alone: the other resource's call is due and delivered."""
    down, up = call_url_resource(api, "http://127.0.0.1:9/down", "A"), call_url_resource(api, receiver.url, "B")
    group_a, group_b = f"called_url:{down['id']}", f"called_url:{up['id']}"
    assert delivery_leftovers(r) == [group_a, group_b]
    one_click(api, client, down, "a-1")
    smid = one_click(api, client, up, "b-1")
    assert sorted(webhooks.due_targets(r, now=1000.0)) == sorted([group_a, group_b])
    assert webhooks.deliver(r, group_a, now=1000.0, timeout=1)["error"].startswith("ConnectionRefusedError")
    assert webhooks.due_targets(r, now=1000.5) == [group_b]                      # A backs off, B does not
    assert webhooks.deliver(r, group_b) == {"sent": 1, "skipped": 3, "error": None}   # the others' events skipped
    assert [b["smid"] for b in receiver.bodies()] == [smid]
    assert webhooks.due_targets(r, now=1000.5) == []
    assert api.ok("resources/get", id=down["id"])["called_url_delivery"]["backlog"] == 1   # its one call
    assert api.ok("resources/get", id=up["id"])["called_url_delivery"]["backlog"] == 0


def count_delivery_costs(monkeypatch):
    """XACK calls and events loaded from their ledgers for delivery, counted as they go."""
    counts = {"XACK calls": 0, "events loaded": 0}
    real_xack, real_load_refs = redis.Redis.xack, webhooks.load_refs

    def xack(self, *args):
        counts["XACK calls"] += 1
        return real_xack(self, *args)

    def load_refs(r_, refs):
        counts["events loaded"] += len(refs)
        return real_load_refs(r_, refs)

    monkeypatch.setattr(redis.Redis, "xack", xack)
    monkeypatch.setattr(webhooks, "load_refs", load_refs)
    return counts


@pytest.mark.parametrize("target", ["call URL", "webhook of one resource"])
def test_a_target_of_one_resource_goes_through_other_resources_events_unloaded(api, client, r, resource, receiver,
                                                                             monkeypatch, target):
    """A call URL, or a webhook of one resource, reads every resource's timeline entries. Those of the others say
    so by their rid: they do not make it due, its delivery loads none of their events and acknowledges them in
    one XACK (or in the XACK of the next event it sends); DISPATCH_LOOKAHEAD of them do make it due, so its
    delivery goes past them and its own events further on are seen."""
    monkeypatch.setattr(webhooks, "DISPATCH_LOOKAHEAD", 6)
    if target == "call URL":
        own = call_url_resource(api, receiver.url, "Own")
        group, make_own_events = webhooks.call_url_group(own["id"]), lambda pid: one_click(api, client, own, pid)
    else:
        own = api.ok("resources/add", **email_resource(name="Own"))
        hook = api.ok("webhooks/add", url=receiver.url, resource_id=own["id"], secret=SECRET)
        group, make_own_events = webhooks.group_name(hook["id"]), lambda pid: change(api, own, profile_id=pid)
    change(api, resource, profile_id="p-1")
    change(api, resource, profile_id="p-2")                                      # 4 entries of another resource
    assert webhooks.due_targets(r) == [] and not webhooks.needs_delivery(r, group)
    counts = count_delivery_costs(monkeypatch)
    assert webhooks.deliver(r, group) == {"sent": 0, "skipped": 4, "error": None}
    assert counts == {"XACK calls": 1, "events loaded": 0}
    make_own_events("own-1")                                                     # 2 entries, 1 or 2 sent
    counts.update(dict.fromkeys(counts, 0))
    assert webhooks.due_targets(r) == [group]
    sent = 1 if target == "call URL" else 2
    assert webhooks.deliver(r, group) == {"sent": sent, "skipped": 2 - sent, "error": None}
    assert counts == {"XACK calls": sent, "events loaded": sent}  # a call URL's other entry: not a one-click
    for n in range(3):
        change(api, resource, profile_id=f"p-{n + 3}")                           # 6 entries of another resource
    make_own_events("own-2")
    assert webhooks.due_targets(r) == [group]                                    # its own beyond the 6 looked at
    assert webhooks.deliver(r, group)["sent"] == sent
    assert webhooks.backlog(r, group) == 0 and webhooks.due_targets(r) == []


def commands(sends):
    """The command each round trip began with (MULTI for a transaction's pipeline)."""
    return [send.split(b"\r\n")[2].decode() for send in sends]


def test_a_change_of_a_resource_without_a_call_url_looks_at_no_delivery_target(api, r, monkeypatch):
    """resources/add, update and delete of a resource with no call URL, before or after, have no call URL target
    to create or remove: they send nothing about the timeline's groups, only the change."""
    def add_update_delete():
        res = api.ok("resources/add", **email_resource())
        api.ok("resources/update", id=res["id"], name="Monthly news")
        api.ok("resources/delete", id=res["id"])

    add_update_delete()                                 # the app's start and its connections, before the count
    sends = round_trips(monkeypatch)
    add_update_delete()
    assert not any(keys.events_timeline().encode() in send for send in sends)
    assert commands(sends) == ["INCRBY", "MULTI", "WATCH", "GET", "MULTI", "WATCH", "GET", "MULTI"]


@pytest.mark.parametrize("target", ["webhook", "call URL"])
def test_a_delivery_checks_that_its_target_exists_and_makes_no_group(api, r, receiver, monkeypatch, target):
    """A delivery job reads its target's existence in one command (a webhook's filter in one more), not by
    trying to create its group (made with the target): with nothing to send it costs two reads of the timeline
    and the write of its delivery state."""
    if target == "webhook":
        group, exists = webhooks.group_name(api.ok("webhooks/add", url=receiver.url)["id"]), ["HEXISTS", "HGET"]
    else:
        group, exists = webhooks.call_url_group(call_url_resource(api, receiver.url)["id"]), ["GET"]
    sends = round_trips(monkeypatch)
    assert webhooks.deliver(r, group) == {"sent": 0, "skipped": 0, "error": None}
    assert commands(sends) == exists + ["XREADGROUP", "XREADGROUP", "WATCH", exists[0], "MULTI"]


def test_the_backoff_stays_at_an_hour_however_long_a_target_is_down(api, r, resource, receiver):
    """After 1024 failures in a row (about 43 days down at one attempt an hour) 2 ** failures no longer fits in a
    float: the failure must still be recorded with an hour's wait, not raise and leave the target due at once
    (a POST every housekeeping tick, and a failed job each time)."""
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    group = webhooks.group_name(hook["id"])
    change(api, resource)
    r.hset(keys.delivery_state(group), mapping={"failures": 1100, "next_attempt_at": "999.0"})
    receiver.behaviours = [500]
    assert webhooks.deliver(r, group, now=1000.0)["error"] == "HTTP 500"
    state = webhooks.target_state(r, group)
    assert state["failures"] == 1101 and state["next_attempt_at"] == 1000.0 + webhooks.BACKOFF_MAX
    assert webhooks.due_targets(r, now=1001.0) == []


def test_webhooks_list_shows_no_part_of_the_secret(api, receiver):
    """The secret signs every delivery: webhooks/add returns it once; webhooks/list shows none of it, not even its
    first characters (a quarter of a 16-character secret)."""
    secret = "Qz7pXw-webhook-key-abc"
    hook = api.ok("webhooks/add", url=receiver.url, secret=secret)
    assert hook["secret"] == secret
    listed = api.ok("webhooks/list")[0]
    assert "secret" in listed and "Qz7p" not in json.dumps(listed), listed
