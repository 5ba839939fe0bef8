"""webapp/hotpaths.py does exactly what the generic paths do: each case runs the generic path (open_smid +
record_view, or open_smid + unsubscribe "one_click") and the fast path from the same Redis snapshot, and
compares the raised error, the result and every key afterwards (event ids, times and hashes normalized)."""
import gc
import re
import sys

import pytest
import redis
from jinja2.runtime import Context as RenderContext
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from conftest import email_resource, form_token, normalized, redis_state, restore, snapshot
from conftest import same_state as state
from webapp import direct, hotpaths, keys, scripts, unsubscribe
from webapp.errors import ServiceError
from webapp.subscriptions import Status, decode_record, encode_record
from webapp.tokens import read_smid

EVIDENCE = {"ip": "203.0.113.7", "user_agent": "GoogleOneClick/1.0"}


@pytest.fixture(autouse=True)
def close_app_clients(app):
    """Close the app's Redis clients after each test (the app fixture leaves them to the garbage collector,
    whose ResourceWarning then lands in whichever test happens to collect them)."""
    yield
    if app.extensions.get("redis"):
        app.extensions["redis"].close()
    if app.extensions.get("timer_queue"):
        app.extensions["timer_queue"].connection.close()


def outcome(fn):
    try:
        return ("ok", normalized(fn()))
    except ServiceError as exc:
        return (type(exc).__name__, exc.message)


def same_as_generic(r, generic, fast):
    snap = snapshot(r)
    expected = outcome(generic), state(r)
    restore(r, snap)
    got = outcome(fast), state(r)
    assert got == expected
    return got[0]


def link(api, mode="instant", category="news", profile="p-42", email="ann@example.com"):
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": mode}))
    body = {"db_id": 1, "profile_id": profile, "resource_id": res["id"], "channel": "email", "email": email}
    api.ok("subscriptions/set", **body)
    if category:
        body["category"] = category
    return res, api.ok("messages/links", **body)["smid"], body


def altered(token):
    """The token with its MAC's last two characters changed (to "AA", or "BB" where they were "AA")."""
    return token[:-2] + ("BB" if token.endswith("AA") else "AA")


def one_click_both(app, r, token):
    ring = app.extensions["signing_keys"]

    def generic():
        ctx = unsubscribe.open_smid(r, ring, token)
        return unsubscribe.unsubscribe(r, ctx, unsubscribe.resolve_scope(ctx), "one_click", EVIDENCE)

    return same_as_generic(r, generic, lambda: hotpaths.one_click(r, ring, token, EVIDENCE))


def page_both(app, r, token, method="GET"):
    ring = app.extensions["signing_keys"]

    def generic():
        read_smid(ring, token)  # a forged link: nothing read, nothing counted
        try:
            ctx = unsubscribe.open_smid(r, ring, token)
        finally:
            unsubscribe.record_view(r, token, method)  # counted also when the subscription is gone
        return ctx.resource, ctx.record, ctx.views, unsubscribe.read_pending(r, ctx)

    def fast():
        ctx = hotpaths.open_for_page(r, ring, token, method)
        return ctx.resource, ctx.record, ctx.views, unsubscribe.read_pending(r, ctx)

    return same_as_generic(r, generic, fast)


@pytest.mark.parametrize("category", ["news", None])
def test_one_click_first_and_replay(api, app, r, category):
    _res, token, _body = link(api, category=category)
    app.test_client().get("/unsubscribe/" + token)  # a page view the evidence reports
    assert one_click_both(app, r, token)[1]["changed"] is True
    hotpaths.one_click(r, app.extensions["signing_keys"], token, EVIDENCE)
    assert one_click_both(app, r, token)[1]["changed"] is False


def start_timer(app, token):
    client = app.test_client()
    html = client.get("/unsubscribe/" + token).get_data(as_text=True)
    csrf = form_token(html)
    assert client.post("/unsubscribe/" + token, data={"action": "start", "csrf_token": csrf}).status_code == 303


def test_one_click_settles_a_pending_timer(api, app, r):
    _res, token, _body = link(api, mode="delayed")
    start_timer(app, token)
    assert r.zcard("us:pending:due") == 1
    assert one_click_both(app, r, token)[1]["changed"] is True
    assert r.zcard("us:pending:due") == 0
    # When the subscription is not subscribed any more, only the timer goes.
    _res, token, body = link(api, mode="delayed", profile="p-43")
    start_timer(app, token)
    r.hset(keys.profile_subscriptions(1, "p-43"), mapping={   # as stored by a writer that leaves timers alone
        h: encode_record({**decode_record(v), "status": int(Status.UNSUBSCRIBED)})
        for h, v in r.hgetall(keys.profile_subscriptions(1, "p-43")).items()})
    assert r.zcard("us:pending:due") == 1
    assert one_click_both(app, r, token)[1]["changed"] is False
    assert r.zcard("us:pending:due") == 0


def test_one_click_of_another_scope_leaves_the_pending_timer_waiting(api, app, r):
    """A timer started from the News message (or from a message for the whole subscription) still has work to
    do after a one-click that stops another category: it stays pending, on both paths alike."""
    for profile, timer_category in (("p-42", "news"), ("p-43", None)):
        _res, timer_token, body = link(api, mode="delayed", category=timer_category, profile=profile)
        start_timer(app, timer_token)
        receipts = api.ok("messages/links", **{**body, "category": "receipts"})["smid"]
        assert one_click_both(app, r, receipts)[1]["changed"] is True
        assert r.hget(keys.pending_unsubscribe(1, profile, read_smid(app.extensions["signing_keys"],
                                                                      timer_token).hash_id), "scope")
    assert r.zcard("us:pending:due") == 2


def test_one_click_refuses_to_apply_after_the_pending_timer_changed(api, app, r, monkeypatch):
    """APPLY's compare-and-set on the pending timer's scope: the News timer read (which the News one-click
    settles) is replaced by one for the whole subscription before APPLY, so APPLY writes nothing and the
    generic path leaves the new timer waiting."""
    _res, news, body = link(api, mode="delayed", category="news")
    start_timer(app, news)
    ring = app.extensions["signing_keys"]
    whole = unsubscribe.open_smid(r, ring, api.ok("messages/links", **{**body, "category": None})["smid"])

    def replace_timer():
        assert unsubscribe.cancel_timer(r, whole) == "cancelled"
        unsubscribe.arm_timer(r, whole, unsubscribe.resolve_scope(whole), 60)

    applied = another_writer_between_reads_and_apply(monkeypatch, replace_timer)
    assert hotpaths.one_click(r, ring, news, EVIDENCE)["changed"] is True
    assert applied == [0]
    assert unsubscribe.read_pending(r, whole)["scope"] == {"cats": None}


def test_one_click_errors(api, app, r):
    _res, blocked, _body = link(api, mode="blocked")
    assert one_click_both(app, r, blocked)[0] == "Blocked"
    _res, token, _body = link(api, profile="p-43")
    assert one_click_both(app, r, altered(token))[0] == "BadToken"
    res, token, _body = link(api, profile="p-44")
    api.ok("resources/delete", id=res["id"])
    assert one_click_both(app, r, token)[0] == "NoSuchResource"


def test_one_click_on_a_soft_deleted_subscription_applies_as_the_generic_path(api, app, r):
    """A deleted subscription's links keep working (the record is still stored): the fast path unsubscribes
    it exactly as the generic one does, and a replay changes nothing."""
    _res, token, body = link(api, category=None)
    api.ok("subscriptions/delete", **body)
    assert one_click_both(app, r, token) == ("ok", {"changed": True, "state": {"status": "unsubscribed",
                                                                                "cats": ["news", "receipts"]}})
    assert one_click_both(app, r, token)[1]["changed"] is False  # the replay


def another_writer_between_reads_and_apply(monkeypatch, write):
    """Run `write()` right after one_click's reads; returns the list APPLY's answers are appended to."""
    read, run, applied = hotpaths._read_for_one_click, scripts.run_direct, []

    def read_then_write(*args, **kw):
        reply = read(*args, **kw)
        write()
        return reply

    def counting_run(r_, script, keys, args):
        result = run(r_, script, keys, args)
        if script is hotpaths.APPLY:
            applied.append(result)
        return result

    monkeypatch.setattr(hotpaths, "_read_for_one_click", read_then_write)
    monkeypatch.setattr(scripts, "run_direct", counting_run)
    return applied


@pytest.mark.parametrize("key", [keys.db_profiles(1), keys.events_timeline()])
def test_one_click_writes_nothing_when_a_key_it_would_write_holds_the_wrong_type(api, app, r, key):
    """A write failing halfway would store the unsubscribe without its ledger event (or its event without its
    timeline entry, which no webhook would ever see); then the provider's retry answers 200 with nothing to do."""
    _res, token, _body = link(api, category=None)
    r.delete(key)
    r.set(key, "oops")
    before = redis_state(r)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE .* nothing written"):
        hotpaths.one_click(r, app.extensions["signing_keys"], token, EVIDENCE)
    assert redis_state(r) == before


def test_one_click_falls_back_when_something_changed_after_reading(api, app, r, monkeypatch):
    _res, token, body = link(api, category="news")
    applied = another_writer_between_reads_and_apply(monkeypatch, lambda: api.ok(
        "subscriptions/set", **{k: v for k, v in body.items() if k != "category"}, cats=["receipts"]))
    result = hotpaths.one_click(r, app.extensions["signing_keys"], token, EVIDENCE)
    assert applied == [0]  # the compare-and-set refused, so the generic path did the work
    # The generic path saw the other writer's change: "news" was already stopped by it, so nothing changed.
    assert result == {"changed": False, "state": {"status": "subscribed", "cats": ["receipts"]}}


@pytest.mark.parametrize("name", ["unsubscribe-confirm", "unsubscribe-instant", "unsubscribe-delayed", "manage"])
def test_a_page_view_leaves_no_reference_cycle_holding_its_request_or_render_context(app, pages, name):
    """Reference counting frees a page's request and render context as soon as the response is sent. The
    templates' macros (the forms' hidden fields, the manager's status labels) once tied the render context into
    a cycle that held the request, the view and the resource until the garbage collector ran: for the
    unsubscribe page a collection every ~14 views, about 30 us per view on average and a longer pause in the
    slowest ones."""
    def view():
        environ = EnvironBuilder(path=pages[name], headers={"Accept-Language": "ru"}).get_environ()
        status = []
        reply = app.wsgi_app(environ, lambda s, h, exc_info=None: status.append(s))
        try:
            return status[0], b"".join(reply)
        finally:
            getattr(reply, "close", lambda: None)()

    view()  # templates compiled, connections open
    # No kind of page kept: the next view is Flask's, rendered (front.py would fill a kept kind in).
    app.extensions.pop("page_kinds", None)
    app.extensions.pop("page_kinds_by_inputs", None)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the next collection finds unreachable stays in gc.garbage
    try:
        status, body = view()
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (Request, RenderContext))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert status.startswith("200") and b'name="csrf_token"' in body
    assert left == []


def test_smids_of_one_resource_share_its_decoding_until_the_resource_changes(api, app, r):
    res, token, _ = link(api, mode="confirm")
    body = {"db_id": 1, "profile_id": "p-43", "resource_id": res["id"], "channel": "email", "email": "bo@example.com"}
    api.ok("subscriptions/set", **body)
    other = api.ok("messages/links", **body)["smid"]
    ring = app.extensions["signing_keys"]
    first = hotpaths.open_for_page(r, ring, token, "GET").resource
    assert hotpaths.open_for_page(r, ring, other, "GET").resource is first
    api.ok("resources/update", id=res["id"], name="Renamed news")
    renamed = hotpaths.open_for_page(r, ring, token, "GET").resource
    assert renamed is not first and renamed["name"] == "Renamed news"
    assert hotpaths.one_click(r, ring, other, EVIDENCE)["changed"]
    with app.test_client() as client:
        assert "Renamed news" in client.get(f"/unsubscribe/{token}").get_data(as_text=True)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_page_open_counts_views_as_record_view(api, app, r, method):
    res, token, body = link(api, mode="confirm")
    page_both(app, r, token, method)
    hotpaths.open_for_page(r, app.extensions["signing_keys"], token, method)
    assert page_both(app, r, token, method)[1][2] == {method: 2}
    api.ok("subscriptions/delete", **{k: v for k, v in body.items() if k != "category"})
    assert page_both(app, r, token, method)[0] == "ok"  # a deleted subscription's page still opens
    api.ok("resources/delete", id=res["id"])
    assert page_both(app, r, token, method)[0] == "NoSuchResource"
    assert r.hgetall(keys.page_views(unsubscribe.view_digest(token))) == {method: "5"}  # counted all the same
    assert page_both(app, r, altered(token), method)[0] == "BadToken"


def test_direct_calls_survive_a_script_flush_and_a_dropped_connection(api, app, r, redis_url):
    """scripts.run_direct: EVAL when Redis lost its script cache (a restart), and the full client's retry when
    the pooled connection was closed under it."""
    from webapp import store
    _res, token, _body = link(api, category=None)
    ring, client = app.extensions["signing_keys"], store.connect(redis_url)
    try:
        assert hotpaths.open_for_page(client, ring, token, "GET").views == {}
        r.script_flush()
        assert hotpaths.open_for_page(client, ring, token, "GET").views == {"GET": 1}
        assert r.client_kill_filter(_type="normal", skipme=True) >= 1
        assert hotpaths.one_click(client, ring, token, EVIDENCE)["changed"] is True
        r.script_flush()
        assert r.client_kill_filter(_type="normal", skipme=True) >= 1
        assert hotpaths.one_click(client, ring, token, EVIDENCE)["changed"] is False
    finally:
        client.close()


def test_direct_call_raises_an_error_reply_without_running_the_script_again(r):
    """A script that wrote and then failed must not run twice (Lua does not roll back its writes)."""
    import redis
    script = "redis.call('INCR', KEYS[1]) return redis.error_reply('boom')"
    for expected in ("1", "2"):  # the first call finds the script uncached (NOSCRIPT, then EVAL)
        with pytest.raises(redis.ResponseError, match="boom"):
            scripts.run_direct(r, script, ["t:count"], [])
        assert r.get("t:count") == expected


def test_direct_calls_reuse_an_idle_connection_and_never_share_a_busy_one(r):
    """Calls one after another reuse one connection (no checkout per call); a call made while another is in
    flight (here a thread blocked in BLPOP) gets a connection of its own and its own replies; afterwards both
    connections are idle and reused. A forked child makes its own connection and leaves the parent's intact
    (gunicorn forks its workers)."""
    import os
    import threading
    script = "return redis.call('INCR', KEYS[1])"
    idle = direct.idle_connections(r.connection_pool)
    while idle:  # start from none (earlier tests' calls on this client left theirs)
        idle.pop().reset()
    assert scripts.run_direct(r, script, ["t:n"], []) == 1
    mine = idle[-1]
    assert scripts.run_direct(r, script, ["t:n"], []) == 2 and idle == [mine]
    blocked = []
    waiter = threading.Thread(target=lambda: blocked.append(direct.pipeline(r, [("BLPOP", "t:list", 5)])))
    waiter.start()
    for _ in range(500):  # until the waiter's BLPOP is in Redis (it has taken the idle connection)
        if r.info("clients")["blocked_clients"]:
            break
        threading.Event().wait(0.01)
    assert idle == []
    assert direct.pipeline(r, [("GET", "t:n"), ("RPUSH", "t:list", "x")]) == ["2", 1]
    waiter.join()
    assert blocked == [[["t:list", "x"]]]
    assert len(idle) == 2 and mine in idle
    pid = os.fork()
    if pid == 0:  # the child: a connection of its own that works
        ok = scripts.run_direct(r, script, ["t:n"], []) == 3 and mine not in idle and len(idle) == 1
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert scripts.run_direct(r, script, ["t:n"], []) == 4 and len(idle) == 2 and mine in idle


def test_gevent_workers_open_a_redis_connection_per_call_in_flight_not_per_request(r, redis_url):
    """Under gunicorn's gevent workers each request runs in a greenlet of its own, which threading.local
    follows: a connection per thread would be a new Redis connection for every page view and one-click. The
    idle list keeps them to the calls in flight at once (8 clients here), and every answer is right."""
    from concurrent.futures import ThreadPoolExecutor
    from test_faults import Gunicorn, make_links, status_of
    server = Gunicorn(redis_url, workers=1, worker_class="gevent")
    try:
        links = make_links(server, 20)
        before = r.info("stats")["total_connections_received"]
        with ThreadPoolExecutor(8) as pool:
            pages = list(pool.map(lambda path: server.get(path), links * 5))
            clicks = list(pool.map(lambda path: server.post(path, "List-Unsubscribe=One-Click",
                                                            "application/x-www-form-urlencoded"), links * 5))
        opened = r.info("stats")["total_connections_received"] - before
    finally:
        server.stop()
    assert pages == [200] * 100 and clicks == [200] * 100
    assert [status_of(r, i) for i in range(20)] == [1] * 20
    assert opened <= 2 * 8, f"{opened} Redis connections for 200 requests"


@pytest.mark.parametrize("protocol", [2, 3])
def test_one_click_reads_the_same_over_either_protocol(api, app, r, redis_url, protocol):
    """The one-click's plain pipelined reads (direct.pipeline) answer HGETALL as a map on a RESP3
    connection (redis-py's default) and as a flat list on RESP2; both give the generic path's result."""
    import redis
    _res, token, _body = link(api, category="news")
    app.test_client().get("/unsubscribe/" + token)
    app.test_client().head("/unsubscribe/" + token)
    client = redis.Redis.from_url(redis_url, decode_responses=True, protocol=protocol)
    try:
        assert one_click_both(app, client, token)[1]["changed"] is True
    finally:
        client.close()


def test_direct_reads_raise_error_replies_and_keep_their_connection(r):
    """An error reply (a key of another type) is raised as redis-py's ResponseError after every reply has been
    read, so the next call on the same connection gets its own replies."""
    import redis
    r.set("t:string", "x")
    r.hset("t:hash", "f", "v")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        direct.pipeline(r, [("GET", "t:string"), ("HGET", "t:string", "f"), ("GET", "t:string")])
    idle = direct.idle_connections(r.connection_pool)
    held = idle[-1].conn
    assert direct.pipeline(r, [("HGET", "t:hash", "f"), ("GET", "t:none")]) == ["v", None]
    assert idle[-1].conn is held and held._sock is not None


def test_direct_reads_reconnect_once_after_a_dropped_connection(r, redis_url):
    import redis
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        r.set("t:k", "1")
        assert direct.pipeline(client, [("GET", "t:k")]) == ["1"]
        assert r.client_kill_filter(_type="normal", skipme=True) >= 1
        assert direct.pipeline(client, [("GET", "t:k")]) == ["1"]
    finally:
        client.close()


def test_one_click_refuses_to_apply_after_another_ledger_entry(api, app, r, monkeypatch):
    """APPLY's compare-and-set on the ledger: another subscription of the same profile changed between the
    reads and APPLY (its record untouched by us, but the profile's chain grew), so APPLY writes nothing and
    the generic path chains the event after the newcomer; the chain verifies."""
    _res, token, _body = link(api, category="news")
    _res2, _token2, other = link(api, category=None, email="ann@work.example")
    applied = another_writer_between_reads_and_apply(
        monkeypatch, lambda: api.ok("subscriptions/set", **other, status="unsubscribed"))
    assert hotpaths.one_click(r, app.extensions["signing_keys"], token, EVIDENCE)["changed"] is True
    assert applied == [0]
    history = api.ok("events/list", db_id=1, profile_id="p-42")
    assert [e["method"] for e in history][:2] == ["one_click", "api"]
    assert api.ok("events/verify", db_id=1, profile_id="p-42")["ok"] is True


def test_direct_calls_skip_push_messages(r, redis_url):
    """A RESP3 push (here a client-tracking invalidation, as a server's maintenance notice would be) arriving
    on the held connection is not taken for the reply of the next command."""
    import redis
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        r.set("t:tracked", "1")
        assert direct.call(client, direct.pack("CLIENT", "TRACKING", "ON"), 1) == ["OK"]
        assert direct.pipeline(client, [("GET", "t:tracked")]) == ["1"]   # now tracked for this connection
        r.set("t:tracked", "2")                                          # the server pushes an invalidation
        r.set("t:other", "x")
        assert direct.pipeline(client, [("GET", "t:other"), ("GET", "t:tracked")]) == ["x", "2"]
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["confirm", "delayed"])
def test_a_page_get_is_one_round_trip_also_with_a_pending_timer(api, app, r, monkeypatch, mode):
    """Every page shows a pending timer (it outlives a switch of mode), read in the page's one pipeline: a GET
    of a confirm page, and of a delayed page with its timer running, is one round trip to Redis."""
    _res, token, _body = link(api, mode=mode)
    if mode == "delayed":
        start_timer(app, token)
    app.test_client().get("/unsubscribe/" + token)  # connects (HELLO, CLIENT SETINFO) before the count
    round_trips = []
    real_call = direct.call
    monkeypatch.setattr(direct, "call", lambda *a, **k: round_trips.append("direct") or real_call(*a, **k))
    real_send = redis.connection.AbstractConnection.send_packed_command
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command",
                        lambda self, *a, **k: round_trips.append("redis-py") or real_send(self, *a, **k))
    html = app.test_client().get("/unsubscribe/" + token).get_data(as_text=True)
    assert round_trips == ["direct"]
    assert ('role="timer"' in html) is (mode == "delayed")
    # The timer read with the page is the one stored: the same as a read of its own.
    ctx = hotpaths.open_for_page(r, app.extensions["signing_keys"], token, "GET")
    assert unsubscribe.read_pending(r, ctx) == unsubscribe.read_pending(r, unsubscribe.open_smid(
        r, app.extensions["signing_keys"], token))



class CountingPattern:
    """A compiled pattern that counts its calls (re.Pattern's methods cannot be patched)."""

    def __init__(self, pattern, calls):
        self.pattern, self.calls = pattern, calls

    def __getattr__(self, name):
        method = getattr(self.pattern, name)
        if not callable(method):
            return method
        return lambda *a, **k: self.calls.append(self.pattern.pattern) or method(*a, **k)


def test_the_one_click_front_takes_its_path_and_token_with_one_regex_call(api, app, r, monkeypatch):
    """The front answers every provider's one-click POST, a link with ">" after it too: its path is matched and
    its token taken in one regex call before the unsubscribe runs (a second on every one-click, token_in_link's,
    is one the front need not make)."""
    _res, token, body = link(api, category=None)
    calls = []
    for name, module in list(sys.modules.items()):
        if name == "webapp" or name.startswith("webapp."):
            for attr, value in list(vars(module).items()):
                if isinstance(value, re.Pattern):
                    monkeypatch.setattr(module, attr, CountingPattern(value, calls))
    front, one_click = app.extensions["front"], hotpaths.one_click
    monkeypatch.setattr(front, "flask_wsgi", lambda environ, start_response: pytest.fail("not answered in front"))
    monkeypatch.setattr(hotpaths, "one_click", lambda *a, **k: calls.append("one_click") or one_click(*a, **k))
    resp = app.test_client().post(f"/unsubscribe/{token}%3E", data="List-Unsubscribe=One-Click",
                                  content_type="application/x-www-form-urlencoded")
    assert resp.status_code == 200
    assert decode_record(r.hget(keys.profile_subscriptions(1, "p-42"),
                                read_smid(app.extensions["signing_keys"], token).hash_id))["status"] == \
        Status.UNSUBSCRIBED
    assert len(calls[:calls.index("one_click")]) == 1, calls
