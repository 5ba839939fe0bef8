"""The AkUnsub SDK's endpoint and script (contract §5), through the Flask test client against a real Redis.

Refusals are proved to change nothing by comparing redis_state before and after. The rate limiter's own counters
are Redis keys too (under keys.rate_limits(), "us:ratelimit:"): `store_state` leaves them out, since counting a
refused request is the point of a limiter and is not a change of any subscription."""
import base64
import json
import os
import signal
import time
from contextlib import contextmanager

import pytest
import redis

from conftest import (API_TOKEN, SIGNING_KEYS, ApiActions, close_clients, email_resource, read_key, redis_state,
                      round_trips, start_redis_server)
from webapp import events, keys
from webapp.delayed import sweep_once
from webapp.ratelimits import limiter_storage_uri
from webapp.sdk import origin_of, parse_script_id

ORIGIN = "https://shop.example"
CATEGORIES = [{"title": "News", "api_name": "news", "required": False},
              {"title": "Promotions", "api_name": "promo", "required": False},
              {"title": "Receipts", "api_name": "receipts", "required": True}]


def store_state(r):
    prefix = keys.rate_limits() + ":"
    return {k: v for k, v in redis_state(r).items() if not k.startswith(prefix)}


def make(api, mode="instant", profile_id="p-42", category=None, **resource):
    """A resource in `mode`, a subscription to it and the SMID of one message: (resource, ident, smid)."""
    body = email_resource(url="https://shop.example/unsubscribe", urls=["https://promo.example:8443/"],
                          categories=CATEGORIES, unsubscribe={"mode": mode, "timer_minutes": 30,
                                                              "blocked_text": "Service messages cannot be stopped"})
    body.update(resource)
    res = api.ok("resources/add", **body)
    ident = {"db_id": 1, "profile_id": profile_id, "resource_id": res["id"], "channel": "email",
             "email": f"{profile_id}@example.com"}
    api.ok("subscriptions/set", **ident)
    links = api.ok("messages/links", **ident, **({"category": category} if category else {}))
    return res, ident, links["smid"]


def call(client, rid, origin=ORIGIN, **body):
    headers = {"Origin": origin} if origin else {}
    return client.post(f"/sdk/v1/{rid}/unsubscribe", json=body, headers=headers)


def sub(api, ident):
    got = api.ok("subscriptions/get", **ident)
    return got["status"], got["cats"]


def last_event(r, ident):
    return events.decode_event(r.lindex(keys.profile_events(ident["db_id"], ident["profile_id"]), -1))


# -- changes ------------------------------------------------------------------------------------------

def test_confirm_unsubscribes_the_chosen_categories_with_evidence(client, api, r):
    res, ident, smid = make(api, "confirm")
    resp = client.post(f"/sdk/v1/{res['id']}/unsubscribe", json={"smid": smid, "action": "confirm",
                                                                   "categories": ["promo"], "rtoken": res["rtoken"]},
                       headers={"Origin": ORIGIN, "User-Agent": "sdk-test/1", "Accept-Language": "ru"})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["result"] == "unsubscribed" and body["status"] == "subscribed"
    assert body["cats"] == ["news", "receipts"]
    assert {c["api_name"]: c["subscribed"] for c in body["categories"]} == {"news": True, "promo": False,
                                                                             "receipts": True}
    assert sub(api, ident) == ("subscribed", ["news", "receipts"])
    event = last_event(r, ident)
    assert event["method"] == "sdk" and event["smid"] == smid
    assert event["evidence"]["ip"] == "127.0.0.1" and event["evidence"]["user_agent"] == "sdk-test/1"
    assert event["evidence"]["locale"] == "ru"
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN and "Origin" in resp.headers["Vary"]


def test_confirm_without_categories_stops_the_message_scope(client, api):
    res, ident, smid = make(api, "confirm", category="news")
    assert call(client, res["id"], smid=smid, action="confirm").get_json()["cats"] == ["promo", "receipts"]
    res, ident, smid = make(api, "confirm", profile_id="p-43")
    assert call(client, res["id"], smid=smid, action="confirm").get_json()["status"] == "unsubscribed"
    assert sub(api, ident)[0] == "unsubscribed"


def test_a_required_category_stops_only_from_its_own_messages_link(client, api, r):
    """What a message was sent for can always be stopped from its link, required or not (as its one-click and
    the hosted page do); `required` keeps a person from choosing other required categories."""
    res, ident, smid = make(api, "confirm", category="receipts")
    resp = call(client, res["id"], smid=smid, action="confirm", categories=["receipts"])
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["cats"] == ["news", "promo"] and sub(api, ident) == ("subscribed", ["news", "promo"])
    event = last_event(r, ident)
    assert event["method"] == "sdk" and event["after"]["cats"] == ["news", "promo"]
    # The state says what a person may choose from this link (what a page of one's own offers).
    state = call(client, res["id"], smid=smid, action="state").get_json()
    assert state["message_category"] == "receipts"
    assert {c["api_name"]: c["choosable"] for c in state["categories"]} == {"news": True, "promo": True,
                                                                             "receipts": True}
    # From a news message's link, receipts cannot be chosen: 400, nothing changes.
    res, ident, smid = make(api, "confirm", profile_id="p-43", category="news")
    state = call(client, res["id"], smid=smid, action="state").get_json()
    assert {c["api_name"]: c["choosable"] for c in state["categories"]} == {"news": True, "promo": True,
                                                                             "receipts": False}
    before = store_state(r)
    for categories in (["receipts"], ["news", "receipts"]):
        resp = call(client, res["id"], smid=smid, action="confirm", categories=categories)
        assert resp.status_code == 400 and "'receipts' is required" in resp.get_json()["error_text"]
    assert store_state(r) == before


def test_show_in_each_mode(client, api, r):
    res, ident, smid = make(api, "instant")
    body = call(client, res["id"], smid=smid, action="show").get_json()
    assert (body["mode"], body["result"], body["status"]) == ("instant", "unsubscribed", "unsubscribed")
    assert last_event(r, ident)["method"] == "sdk"

    res, ident, smid = make(api, "confirm", profile_id="p-43")
    before = store_state(r)
    body = call(client, res["id"], smid=smid, action="show").get_json()
    assert (body["mode"], body["result"], body["status"]) == ("confirm", "waiting", "subscribed")
    assert store_state(r) == before                                    # confirm: showing changes nothing

    res, ident, smid = make(api, "delayed", profile_id="p-44")
    body = call(client, res["id"], smid=smid, action="show").get_json()
    assert (body["mode"], body["result"], body["status"]) == ("delayed", "pending", "subscribed")
    assert 25 <= body["pending"]["seconds_left"] <= 30                  # 30 "minutes" of 1 s in tests
    again = call(client, res["id"], smid=smid, action="show").get_json()
    assert again["pending"]["deadline"] == body["pending"]["deadline"]  # the same timer, not a new one
    assert r.zcard(keys.pending_due()) == 1


def test_delayed_confirm_settles_now_and_cancel_stops_the_timer(client, api, r):
    res, ident, smid = make(api, "delayed")
    call(client, res["id"], smid=smid, action="show")
    body = call(client, res["id"], smid=smid, action="confirm").get_json()
    assert body["status"] == "unsubscribed" and body["pending"] is None
    assert r.zcard(keys.pending_due()) == 0

    res, ident, smid = make(api, "delayed", profile_id="p-43")
    call(client, res["id"], smid=smid, action="show")
    assert r.exists(keys.pending_unsubscribe(1, "p-43", ident_hash(api, ident)))
    body = call(client, res["id"], smid=smid, action="cancel", categories=["news"]).get_json()
    assert (body["result"], body["status"], body["pending"]) == ("cancelled", "subscribed", None)
    assert not r.exists(keys.pending_unsubscribe(1, "p-43", ident_hash(api, ident)))
    assert r.zcard(keys.pending_due()) == 0
    assert sweep_once(r, now=time.time() + 3600) == 0                  # nothing left to fire, even later
    assert sub(api, ident)[0] == "subscribed"
    assert call(client, res["id"], smid=smid, action="cancel").get_json()["result"] == "none"


def test_state_describes_the_pending_timers_own_scope_and_show_from_another_category_joins_it(client, api, r):
    """One timer per subscription: another message's link reports that timer with its scope (what stops, what
    continues), not the link's; its show adds the link's category to the timer, keeping the deadline."""
    res, ident, news = make(api, "delayed", category="news")
    promo = api.ok("messages/links", **ident, category="promo")["smid"]
    started = call(client, res["id"], smid=news, action="show").get_json()["pending"]
    assert (started["cats"], started["stops"], started["continues"]) == (["news"], ["News"],
                                                                         ["Promotions", "Receipts"])
    state = call(client, res["id"], smid=promo, action="state").get_json()["pending"]
    assert state["deadline"] == started["deadline"] and state["stops"] == ["News"] and not state["whole"]
    body = call(client, res["id"], smid=promo, action="show").get_json()
    assert body["result"] == "pending" and body["pending"]["deadline"] == started["deadline"]
    assert (body["pending"]["cats"], body["pending"]["stops"], body["pending"]["continues"]) == (
        ["news", "promo"], ["News", "Promotions"], ["Receipts"])
    assert call(client, res["id"], smid=news, action="state").get_json()["pending"] == body["pending"]
    sweep_once(r, now=started["deadline"] + 0.01)
    assert sub(api, ident) == ("subscribed", ["receipts"])                 # what the state said would stop


@pytest.mark.parametrize("new_mode", ["instant", "confirm"])
def test_a_timer_started_before_a_switch_of_mode_is_still_reported_and_can_be_cancelled(client, api, r, new_mode):
    res, ident, smid = make(api, "delayed")
    started = call(client, res["id"], smid=smid, action="show").get_json()["pending"]
    api.ok("resources/update", id=res["id"], unsubscribe={"mode": new_mode})
    for action in ("state", "show"):                 # an instant show does not unsubscribe past the timer
        body = call(client, res["id"], smid=smid, action=action).get_json()
        assert body["mode"] == new_mode and body["status"] == "subscribed", action
        assert body["pending"]["deadline"] == started["deadline"] and body["pending"]["whole"], action
    assert body["result"] == ("pending" if new_mode == "instant" else "waiting")
    body = call(client, res["id"], smid=smid, action="cancel").get_json()
    assert (body["result"], body["status"], body["pending"]) == ("cancelled", "subscribed", None)
    assert sweep_once(r, now=time.time() + 3600) == 0 and sub(api, ident)[0] == "subscribed"


def test_a_timer_started_before_the_resource_was_blocked_is_reported_blocked_and_never_fires(client, api, r):
    res, ident, smid = make(api, "delayed")
    call(client, res["id"], smid=smid, action="show")
    api.ok("resources/update", id=res["id"], unsubscribe={"mode": "blocked"})
    resp = call(client, res["id"], smid=smid, action="state")
    assert resp.status_code == 403 and resp.get_json()["reason"] == "blocked"
    assert resp.get_json()["error_text"] == "Service messages cannot be stopped"
    sweep_once(r, now=time.time() + 3600)
    assert sub(api, ident) == ("subscribed", ["news", "promo", "receipts"]) and r.zcard(keys.pending_due()) == 0


def ident_hash(api, ident):
    return api.ok("subscriptions/get", **ident)["hash_id"]


# -- refusals: 4xx and no change ----------------------------------------------------------------------

def forged(smid):
    return smid[:-3] + ("AAA" if smid[-3:] != "AAA" else "BBB")


REFUSALS = {
    # name: (how to send, expected status, words in the error)
    "forged smid": (lambda c, res, other, smid: call(c, res["id"], smid=forged(smid), action="confirm"),
                    404, "Unknown or invalid SMID"),
    "not a smid": (lambda c, res, other, smid: call(c, res["id"], smid="hello", action="confirm"),
                   404, "Unknown or invalid SMID"),
    "smid of another resource": (lambda c, res, other, smid: call(c, other["id"], smid=smid, action="confirm"),
                                 403, "not sent for this resource"),
    "wrong rtoken": (lambda c, res, other, smid: call(c, res["id"], smid=smid, action="confirm",
                                                      rtoken=other["rtoken"]), 403, "rtoken"),
    "required category": (lambda c, res, other, smid: call(c, res["id"], smid=smid, action="confirm",
                                                           categories=["receipts"]), 400, "required"),
    "unknown action": (lambda c, res, other, smid: call(c, res["id"], smid=smid, action="drop"), 400, "action"),
    "json as text/plain": (lambda c, res, other, smid: c.post(
        f"/sdk/v1/{res['id']}/unsubscribe", data=json.dumps({"smid": smid, "action": "confirm"}),
        content_type="text/plain", headers={"Origin": ORIGIN}), 415, "application/json"),
    "simple form post": (lambda c, res, other, smid: c.post(
        f"/sdk/v1/{res['id']}/unsubscribe", data={"smid": smid, "action": "confirm"},
        headers={"Origin": ORIGIN}), 415, "application/json"),
    "json nested past the recursion limit": (lambda c, res, other, smid: c.post(
        f"/sdk/v1/{res['id']}/unsubscribe", data="[" * 30000 + "]" * 30000, content_type="application/json",
        headers={"Origin": ORIGIN}), 400, "must be a JSON object"),
    "lone surrogate in the smid": (lambda c, res, other, smid: c.post(
        f"/sdk/v1/{res['id']}/unsubscribe", data='{"action": "confirm", "smid": "%s\\ud800"}' % smid,
        content_type="application/json", headers={"Origin": ORIGIN}), 400, "not valid Unicode"),
    "lone surrogate in the rtoken": (lambda c, res, other, smid: c.post(
        f"/sdk/v1/{res['id']}/unsubscribe", data='{"action": "confirm", "smid": "%s", "rtoken": "\\udc00"}' % smid,
        content_type="application/json", headers={"Origin": ORIGIN}), 400, "not valid Unicode"),
    "unlisted origin": (lambda c, res, other, smid: call(c, res["id"], origin="https://evil.example", smid=smid,
                                                         action="confirm"), 403, "https://evil.example"),
    "other port": (lambda c, res, other, smid: call(c, res["id"], origin="https://shop.example:8443", smid=smid,
                                                    action="confirm"), 403, "not allowed"),
    "http instead of https": (lambda c, res, other, smid: call(c, res["id"], origin="http://shop.example",
                                                               smid=smid, action="confirm"), 403, "not allowed"),
    "lookalike host": (lambda c, res, other, smid: call(c, res["id"], origin="https://shop.example.evil.example",
                                                        smid=smid, action="confirm"), 403, "not allowed"),
    "no origin": (lambda c, res, other, smid: call(c, res["id"], origin=None, smid=smid, action="confirm"),
                  403, "origin"),
    "opaque origin": (lambda c, res, other, smid: call(c, res["id"], origin="null", smid=smid, action="confirm"),
                      403, "origin"),
    "unknown resource": (lambda c, res, other, smid: call(c, 999, smid=smid, action="confirm"), 404,
                         "Unknown resource"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_change_nothing(client, api, r, name):
    send, status, words = REFUSALS[name]
    res, ident, smid = make(api, "instant")
    other = api.ok("resources/add", **email_resource(name="Other", url=ORIGIN, urls=[]))
    before = store_state(r)
    resp = send(client, res, other, smid)
    assert resp.status_code == status, resp.get_json()
    assert words in resp.get_json()["error_text"]
    assert "Origin" in resp.headers["Vary"]
    assert store_state(r) == before
    if "origin" in name or name in ("other port", "http instead of https", "lookalike host"):
        assert "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize("action", ["show", "confirm"])
def test_blocked_resource_refuses_with_its_text(client, api, r, action):
    res, ident, smid = make(api, "blocked")
    before = store_state(r)
    resp = call(client, res["id"], smid=smid, action=action)
    assert resp.status_code == 403
    assert resp.get_json()["error_text"] == "Service messages cannot be stopped"
    assert resp.get_json()["reason"] == "blocked"
    assert store_state(r) == before


def test_rate_limit_per_smid(app, client, api, r):
    app.config["SDK_RATE_LIMIT_PER_SMID"] = "3 per minute"
    res, ident, smid = make(api, "instant")
    other_res, other_ident, other_smid = make(api, "confirm", profile_id="p-43")
    for _ in range(3):
        assert call(client, res["id"], smid=forged(smid), action="confirm").status_code == 404
    before = store_state(r)
    # the forged value counts for itself only: the real SMID has its own budget ...
    for _ in range(3):
        assert call(client, other_res["id"], smid=other_smid, action="show").status_code == 200
    # ... and once it is spent, even a valid request is refused before any change
    resp = call(client, other_res["id"], smid=other_smid, action="confirm")
    assert resp.status_code == 429
    assert resp.get_json() == {"error": 429, "error_text": "Too many requests for this message"}
    assert 1 <= int(resp.headers["Retry-After"]) <= 61
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN and "Origin" in resp.headers["Vary"]
    assert store_state(r) == before
    assert any(k.startswith("us:ratelimit:") for k in r.keys("*"))  # the counters the comparison leaves out
    assert call(client, res["id"], smid=smid, action="confirm").status_code == 200


def test_rate_limit_per_ip(app, client, api, r):
    app.config["SDK_RATE_LIMIT_PER_IP"] = "4 per minute"
    made = [make(api, "instant", profile_id=f"p-{i}") for i in range(5)]
    for res, ident, smid in made[:4]:
        assert call(client, res["id"], smid=smid, action="confirm").status_code == 200
    before = store_state(r)
    res, ident, smid = made[4]
    resp = call(client, res["id"], smid=smid, action="confirm")
    assert resp.status_code == 429 and resp.get_json()["error_text"] == "Too many requests from this address"
    assert int(resp.headers["Retry-After"]) >= 1
    assert store_state(r) == before and sub(api, ident)[0] == "subscribed"
    # another address is not limited
    other = client.post(f"/sdk/v1/{res['id']}/unsubscribe", json={"smid": smid, "action": "confirm"},
                        headers={"Origin": ORIGIN}, environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert other.status_code == 200 and sub(api, ident)[0] == "unsubscribed"


def test_rate_limits_are_set_through_the_environment(api, r, redis_url, tmp_path, monkeypatch):
    """An operator sets the limits where every other setting goes, in the environment or .env."""
    from webapp import create_app
    monkeypatch.setenv("SDK_RATE_LIMIT_PER_SMID", "2 per minute")
    limited = create_app({"TESTING": True, "REDIS_URL": redis_url, "API_TOKEN": API_TOKEN,
                          "SIGNING_KEYS": SIGNING_KEYS, "VAR_DIR": str(tmp_path)})
    try:
        res, ident, smid = make(api, "confirm")
        client = limited.test_client()
        assert [call(client, res["id"], smid=smid, action="show").status_code for _ in range(3)] == [200, 200, 429]
    finally:
        close_clients(limited)


@pytest.mark.parametrize("value", ["lots", "10 per fortnight", ""])
def test_a_rate_limit_that_cannot_be_read_stops_the_start(value):
    from webapp.config import ConfigError, load_settings
    settings = {"API_TOKEN": API_TOKEN, "SIGNING_KEYS": SIGNING_KEYS}
    if value:
        with pytest.raises(ConfigError, match="SDK_RATE_LIMIT_PER_IP"):
            load_settings({**settings, "SDK_RATE_LIMIT_PER_IP": value}, dotenv_path="/nonexistent")
    else:  # empty: the default
        assert load_settings({**settings, "SDK_RATE_LIMIT_PER_IP": value},
                             dotenv_path="/nonexistent")["SDK_RATE_LIMIT_PER_IP"] == "120 per minute"


def test_a_redis_outage_answers_503_not_500(api, redis_url, tmp_path):
    """With Redis down the rate limiter fails first; the answer is 503, and the CORS hook does not ask Redis
    again (that failed too, and turned the 503 into a 500)."""
    from webapp import create_app
    res, ident, smid = make(api, "confirm")
    down = create_app({"TESTING": True, "REDIS_URL": f"unix://{tmp_path}/no-redis.sock", "API_TOKEN": API_TOKEN,
                       "SIGNING_KEYS": SIGNING_KEYS, "VAR_DIR": str(tmp_path)})
    try:
        resp = call(down.test_client(), res["id"], smid=smid, action="confirm")
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
        assert resp.get_json() == {"error": 503, "reason": "unavailable", "error_text":
                                   "The unsubscribe service is unavailable; please try again shortly"}
        assert "Origin" in resp.headers["Vary"] and "Access-Control-Allow-Origin" not in resp.headers
        # The SDK then asks /origin, which any page may read, errors too: that is how the page learns why.
        probe = down.test_client().get(f"/sdk/v1/{res['id']}/origin", headers={"Origin": ORIGIN})
        assert probe.status_code == 503 and probe.get_json()["reason"] == "unavailable"
        assert probe.headers["Access-Control-Allow-Origin"] == "*"
    finally:
        close_clients(down)


def _bgsave_children(r):
    """The pids of redis-server's snapshot children (Linux /proc)."""
    server = str(r.info("server")["process_id"])
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(") ", 1)[1].split()[1] == server:
                    found.append(int(pid))
        except (OSError, IndexError):
            continue
    return found


def _end_bgsave(r, kill=True):
    """Wait for a snapshot in progress to end, killing it first (a failed snapshot) unless kill=False."""
    for pid in _bgsave_children(r) if kill else ():
        os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while r.info("persistence")["rdb_bgsave_in_progress"] and time.time() < deadline:
        time.sleep(0.02)


@contextmanager
def redis_refusing_writes(r, how):
    """The test Redis refusing every write while it serves reads, as `how` makes it; undone on the way out,
    whatever happened inside."""
    saved = {name: value for pattern in ("maxmemory*", "save", "rdb-key-save-delay")
             for name, value in r.config_get(pattern).items()}
    try:
        if how == "out of memory":
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", "1")  # far below what is stored: every write is refused with OOM
        elif how == "replica":
            r.execute_command("REPLICAOF", "127.0.0.1", "1")  # of a primary that is not there: READONLY
        else:  # a failed snapshot with stop-writes-on-bgsave-error (which needs a save point): MISCONF
            r.config_set("save", "3600 1")
            r.config_set("rdb-key-save-delay", "10000000")  # the snapshot waits, to be killed: a failed one
            r.bgsave()  # answered once the snapshot's process is forked
            _end_bgsave(r)
            assert r.info("persistence")["rdb_last_bgsave_status"] == "err"
        with pytest.raises(redis.ResponseError):
            r.set("probe", "1")
        yield
    finally:
        r.config_set("maxmemory", saved["maxmemory"])
        r.config_set("maxmemory-policy", saved["maxmemory-policy"])
        r.execute_command("REPLICAOF", "NO", "ONE")
        if how == "failed snapshot":
            _end_bgsave(r)
            r.config_set("rdb-key-save-delay", saved["rdb-key-save-delay"])
            r.bgsave()  # a snapshot that works lifts MISCONF
            _end_bgsave(r, kill=False)
            r.config_set("save", saved["save"])


@pytest.mark.parametrize("how", ["out of memory", "failed snapshot", "replica"])
def test_show_and_state_answer_while_redis_refuses_writes(client, api, r, how):
    """While Redis refuses writes (it still serves reads) the rate limiter cannot count: show and state go
    through uncounted and answer as usual, the page GET keeping its view count the same way; a change answers a
    503 the page can read (CORS headers too), having written nothing. Once Redis takes writes, all is counted."""
    res, ident, smid = make(api, "confirm")
    instant, instant_ident, instant_smid = make(api, "instant", profile_id="p-43")
    everything = lambda: {key: read_key(r, key) for key in r.scan_iter(count=1000)}  # noqa: E731
    before = everything()
    with redis_refusing_writes(r, how):
        for rid, key, action, mode in ((res["id"], smid, "show", "confirm"), (res["id"], smid, "state", "confirm"),
                                       (instant["id"], instant_smid, "state", "instant")):
            resp = call(client, rid, smid=key, action=action)
            assert resp.status_code == 200, (action, resp.get_json())
            body = resp.get_json()
            assert (body["mode"], body["result"], body["status"], body["cats"]) == (
                mode, "waiting", "subscribed", ["news", "promo", "receipts"]), action
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN and "Origin" in resp.headers["Vary"]
        assert preflight(client, res["id"], ORIGIN).headers["Access-Control-Allow-Origin"] == ORIGIN
        changes = {"confirm": call(client, res["id"], smid=smid, action="confirm", categories=["promo"]),
                   "cancel": call(client, res["id"], smid=smid, action="cancel"),
                   "show that acts": call(client, instant["id"], smid=instant_smid, action="show")}
        for name, resp in changes.items():
            assert resp.status_code == 503, (name, resp.get_json())
            assert resp.get_json() == {"error": 503, "reason": "unavailable", "error_text":
                                       "The unsubscribe service is unavailable; please try again shortly"}, name
            assert resp.headers["Retry-After"] == "5"
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN and "Origin" in resp.headers["Vary"]
        assert everything() == before                       # nothing written, not even a rate-limit counter
    assert sub(api, ident) == ("subscribed", ["news", "promo", "receipts"])
    assert sub(api, instant_ident)[0] == "subscribed"
    assert call(client, res["id"], smid=smid, action="show").status_code == 200
    assert any(k.startswith(keys.rate_limits() + ":") for k in r.scan_iter())  # counted again
    assert call(client, res["id"], smid=smid, action="confirm").get_json()["status"] == "unsubscribed"


def test_a_stalled_redis_is_waited_for_once_also_by_show(api, tmp_path):
    """A Redis that stops answering fails the rate limiter's count with a timeout, not a refusal: show
    answers 503 after one REDIS_TIMEOUT_SECONDS, without asking Redis again (not even for CORS headers)."""
    from webapp import create_app
    proc, url = start_redis_server(str(tmp_path))
    app = create_app({"TESTING": True, "REDIS_URL": url, "API_TOKEN": API_TOKEN, "SIGNING_KEYS": SIGNING_KEYS,
                      "VAR_DIR": str(tmp_path), "REDIS_TIMEOUT_SECONDS": 0.5})
    try:
        client = app.test_client()
        res, ident, smid = make(ApiActions(client), "confirm")
        assert call(client, res["id"], smid=smid, action="show").status_code == 200
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            resp = call(client, res["id"], smid=smid, action="show")
            waited = time.monotonic() - started
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert resp.status_code == 503 and resp.get_json()["reason"] == "unavailable"
        assert "Access-Control-Allow-Origin" not in resp.headers
        assert waited < 0.95, waited
    finally:
        close_clients(app)
        proc.kill()
        proc.wait()


# -- CORS ---------------------------------------------------------------------------------------------

def preflight(client, rid, origin):
    return client.options(f"/sdk/v1/{rid}/unsubscribe", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})


@pytest.mark.parametrize("origin", [ORIGIN, "https://promo.example:8443"])
def test_preflight_allows_the_resource_origins(client, api, r, origin):
    res, ident, smid = make(api, "instant")
    before = store_state(r)
    resp = preflight(client, res["id"], origin)
    assert resp.status_code == 204
    assert resp.headers["Access-Control-Allow-Origin"] == origin
    assert resp.headers["Access-Control-Allow-Methods"] == "POST"
    assert resp.headers["Access-Control-Allow-Headers"] == "Content-Type"
    assert resp.headers["Access-Control-Max-Age"] == "7200"
    assert "Origin" in resp.headers["Vary"]
    assert "Access-Control-Allow-Credentials" not in resp.headers
    assert store_state(r) == before


@pytest.mark.parametrize("origin", ["https://evil.example", "https://promo.example", "http://shop.example", "null"])
def test_preflight_refuses_other_origins(client, api, origin):
    res, ident, smid = make(api, "instant")
    resp = preflight(client, res["id"], origin)
    assert resp.status_code == 403
    assert "Access-Control-Allow-Origin" not in resp.headers and "Origin" in resp.headers["Vary"]
    assert preflight(client, 999, ORIGIN).status_code == 404


def test_vary_origin_on_every_sdk_answer(client, api):
    res, ident, smid = make(api, "instant")
    answers = [client.get(f"/sdk/v1/{res['id']}/unsubscribe", headers={"Origin": ORIGIN}),  # 405
               client.post("/sdk/v1/nope", headers={"Origin": ORIGIN}),                       # 404
               call(client, res["id"], smid=smid, action="show"),
               client.get(f"/sdk/v1/{res['id']}/origin", headers={"Origin": ORIGIN})]
    assert [a.status_code for a in answers] == [405, 404, 200, 200]
    for answer in answers:
        assert "Origin" in answer.headers["Vary"] and answer.is_json


def test_origin_probe_tells_the_page_why(client, api):
    res, ident, smid = make(api, "instant")
    ok = client.get(f"/sdk/v1/{res['id']}/origin", headers={"Origin": ORIGIN})
    assert ok.get_json() == {"origin": ORIGIN, "allowed": True}
    no = client.get(f"/sdk/v1/{res['id']}/origin", headers={"Origin": "https://evil.example"})
    assert no.get_json() == {"origin": "https://evil.example", "allowed": False}
    assert no.headers["Access-Control-Allow-Origin"] == "*"
    unknown = client.get("/sdk/v1/999/origin", headers={"Origin": ORIGIN})
    assert unknown.status_code == 404 and unknown.get_json()["reason"] == "unknown_resource"
    assert unknown.headers["Access-Control-Allow-Origin"] == "*"   # the page can read why, as for any answer


def test_origin_of():
    assert origin_of("https://Shop.Example:443/a?b#c") == "https://shop.example"
    assert origin_of("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080"
    assert origin_of("http://[::1]:80/") == "http://[::1]"
    assert origin_of("https://пример.рф/") == "https://xn--e1afmkfd.xn--p1ai"
    assert origin_of("https://Faß.de/") == "https://xn--fa-hia.de"     # as browsers spell it; not fass.de
    assert origin_of("https://faß..de/") is None
    assert origin_of("https://☃.net/") == "https://xn--n3h.net"          # a symbol IDNA 2008 refuses, browsers not
    assert origin_of("https://shop.example/path", strict=True) is None
    assert origin_of("ftp://shop.example") is None and origin_of("null", strict=True) is None


# -- the script ---------------------------------------------------------------------------------------

def test_script_is_served_with_the_resource_defaults(client, api):
    res, ident, smid = make(api, "instant")
    url = api.ok("resources/get", id=res["id"])["sdk_script_url"]
    assert url == "https://unsub.example/ak_list_unsubscribe.js?id=" + base64.b64encode(
        f"1|{res['id']}".encode()).decode()
    resp = client.get(url.removeprefix("https://unsub.example"))
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert resp.headers["Cache-Control"] == "public, max-age=300"
    assert resp.headers["ETag"]
    text = resp.get_data(as_text=True)
    assert "class AkUnsub" in text and "@ak-defaults" not in text
    assert f'{{"pxl_domain":"https://unsub.example","resource_id":{res["id"]}}}' in text
    assert res["rtoken"] not in text                                    # the rtoken is a server-side secret
    again = client.get(url.removeprefix("https://unsub.example"), headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status_code == 304
    unpadded = base64.urlsafe_b64encode(f"1|{res['id']}".encode()).decode().rstrip("=")
    assert client.get(f"/ak_list_unsubscribe.js?id={unpadded}").status_code == 200
    assert client.head(url.removeprefix("https://unsub.example")).status_code == 200


@pytest.mark.parametrize("sid", ["", "!!!", base64.b64encode(b"1|999").decode(), base64.b64encode(b"2|1").decode(),
                                 base64.b64encode(b"1|abc").decode(), base64.b64encode(b"1|").decode(),
                                 base64.b64encode(b"1|01").decode(), base64.b64encode(b"\xff\xfe").decode(),
                                 "A" * 100, None])
def test_script_404_for_unknown_or_malformed_ids(client, api, sid):
    make(api, "instant")
    resp = client.get("/ak_list_unsubscribe.js" + (f"?id={sid}" if sid is not None else ""))
    assert resp.status_code == 404
    assert resp.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert resp.get_data(as_text=True).startswith("/*") and resp.headers["Cache-Control"] == "no-store"


def test_parse_script_id_and_storage_uri():
    assert parse_script_id("MXw3Mw==") == 73 and parse_script_id("MXw3Mw") == 73
    assert parse_script_id("MXw3Mw=") == 73 and parse_script_id(None) is None
    assert limiter_storage_uri("unix:///tmp/r.sock") == "redis+unix:///tmp/r.sock"
    assert limiter_storage_uri("redis://h:6379/0") == "redis://h:6379/0"


def test_pending_of_a_timer_whose_category_was_deleted_says_it_stops_everything(api, client, r):
    """The SDK's `pending` describes the timer's scope: it should say what firing will stop (everything)."""
    res, ident, smid = make(api, "delayed", category="news")
    assert call(client, res["id"], smid=smid, action="show").get_json()["result"] == "pending"
    api.ok("resources/update", id=res["id"], delete_categories=["news"])
    pending = call(client, res["id"], smid=smid, action="state").get_json()["pending"]
    assert pending["whole"] is True and pending["stops"], pending


def test_state_reads_the_record_and_the_pending_timer_in_one_round_trip(client, api, r, monkeypatch):
    """The answer's state (the record, and the pending timer every mode shows) is one round trip, not two."""
    res, ident, smid = make(api, "delayed", category="news")
    assert call(client, res["id"], smid=smid, action="show").get_json()["result"] == "pending"
    sends = round_trips(monkeypatch)
    answer = call(client, res["id"], smid=smid, action="state").get_json()
    assert answer["pending"] and answer["status"] == "subscribed"
    (with_timer,) = [sent for sent in sends if b":pending:" in sent]
    assert b"HGETALL" in with_timer and b":subs\r\n" in with_timer       # read together with the record


def test_an_instant_show_reads_the_pending_timer_with_the_record_in_one_round_trip(client, api, r, monkeypatch):
    """An instant show must see a pending timer (one that outlived a switch of mode is shown, not skipped); it is
    read with the resource and the record, so the show costs the round trips of a confirm, not one more."""
    shown_res, _ident, shown = make(api, "instant")
    confirmed_res, _ident, confirmed = make(api, "instant", profile_id="p-43")
    timed_res, _ident, timed = make(api, "delayed", profile_id="p-44")
    started = call(client, timed_res["id"], smid=timed, action="show").get_json()["pending"]
    api.ok("resources/update", id=timed_res["id"], unsubscribe={"mode": "instant"})
    sends = round_trips(monkeypatch)
    assert call(client, confirmed_res["id"], smid=confirmed, action="confirm").get_json()["status"] == "unsubscribed"
    confirm_round_trips = len(sends)
    sends.clear()
    assert call(client, shown_res["id"], smid=shown, action="show").get_json()["result"] == "unsubscribed"
    assert len(sends) == confirm_round_trips
    sends.clear()
    body = call(client, timed_res["id"], smid=timed, action="show").get_json()
    assert (body["result"], body["status"], body["pending"]["deadline"]) == ("pending", "subscribed",
                                                                             started["deadline"])
    first_read = [sent for sent in sends if b":pending:" in sent][0]
    assert b"HGETALL" in first_read and b"us:resource:" in first_read and b":subs\r\n" in first_read


def test_the_per_smid_counter_is_keyed_by_a_digest_of_the_smid(client, api, r):
    """No Redis key holds a whole SMID (keys.py): the per-SMID counter is keyed by its digest, as the page and
    manager forms' per-link counters are."""
    from webapp.tokens import link_digest
    res, ident, smid = make(api, "confirm")
    assert call(client, res["id"], smid=smid, action="state").status_code == 200
    counters = list(r.scan_iter(keys.rate_limits() + ":*"))
    assert any(link_digest(smid) in key for key in counters), counters
    assert not [key for key in r.scan_iter() if smid in key]


def _call_arguments(source, name):
    """The argument text of every call `name(...)` in `source` (parentheses balanced, string literals skipped)."""
    found = []
    for start in [i + len(name) + 1 for i in range(len(source)) if source.startswith(name + "(", i)
                  and not source[i - 1].isalnum() and source[i - 1] not in "_."]:
        depth, i, quote = 1, start, None
        while depth:
            ch = source[i]
            if quote:
                if ch == "\\":
                    i += 1
                elif ch == quote:
                    quote = None
            elif ch in "\"'":
                quote = ch
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            i += 1
        found.append(source[start:i - 1])
    return found


def _last_argument(arguments):
    depth, cut, quote = 0, 0, None
    for i, ch in enumerate(arguments):
        if quote:
            quote = None if ch == quote and arguments[i - 1] != "\\" else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            cut = i + 1
    return arguments[cut:]


def test_the_readme_lists_exactly_the_reasons_the_script_and_the_endpoint_give():
    """AkUnsubError.reason is the script's own word (the last argument of each sdkError call) or the one the
    endpoint answered with (SdkError's, error_response's, the 503 and 500 handlers'): the README's table of
    reasons lists exactly those."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    read = lambda *path: root.joinpath(*path).read_text(encoding="utf-8")  # noqa: E731
    word = re.compile(r'"([a-z]+(?:_[a-z]+)*)"')
    script = read("static", "ak_list_unsubscribe.js")
    calls = _call_arguments(script, "sdkError")
    assert len(calls) >= 10 and len(re.findall(r"\.reason\s*=(?!=)", script)) == 1  # only sdkError sets it
    from_script = {w for args in calls[1:] for w in word.findall(_last_argument(args))}  # [0]: its definition
    sdk, app = read("webapp", "sdk.py"), read("webapp", "__init__.py")
    assert len(re.findall(r"\bSdkError\(\d", sdk)) == len(re.findall(r'\bSdkError\(\d+, "[a-z_]+"', sdk))
    from_endpoint = (set(re.findall(r'\bSdkError\(\d+, "([a-z_]+)"', sdk)) |
                     set(re.findall(r'reason = "([a-z_]+)"', sdk)) | set(re.findall(r'"reason": "([a-z_]+)"', app)))
    assert {"not_initialised", "timeout", "rate_limited"} <= from_script
    assert {"unknown_smid", "unsupported_media_type", "unavailable"} <= from_endpoint
    section = read("README.md").split("## Embedding the SDK", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
    assert len(listed) == len(set(listed))
    assert set(listed) == from_script | from_endpoint


def test_a_refused_origin_is_answered_before_the_rate_limits_count(app, client, api, r):
    """The origin check comes before the rate limiter: a POST from an origin the resource does not list (or
    from no page, or for no resource) is refused without touching anything, not even a counter, so pages on
    other sites cannot use up a person's (or an address's) allowance. Even while Redis refuses writes, which
    the limiter's count would meet first, such a POST gets its 403."""
    app.config["SDK_RATE_LIMIT_PER_SMID"] = "2 per minute"
    app.config["SDK_RATE_LIMIT_PER_IP"] = "3 per minute"
    res, ident, smid = make(api, "confirm")
    everything = lambda: {key: read_key(r, key) for key in r.scan_iter(count=1000)}  # noqa: E731
    before = everything()
    evil = "https://evil.example"
    for _ in range(4):
        assert call(client, res["id"], origin=evil, smid=smid, action="confirm").status_code == 403
        assert client.post(f"/sdk/v1/{res['id']}/unsubscribe", data=json.dumps({"smid": smid, "action": "show"}),
                           content_type="text/plain", headers={"Origin": evil}).status_code == 403
        assert call(client, res["id"], origin=None, smid=smid, action="confirm").status_code == 403
        assert call(client, 999, smid=smid, action="confirm").status_code == 404
    assert everything() == before                               # not even a rate-limit counter
    with redis_refusing_writes(r, "out of memory"):
        resp = call(client, res["id"], origin=evil, smid=smid, action="confirm")
        assert resp.status_code == 403 and resp.get_json()["reason"] == "forbidden_origin"
    # The person's own page has its whole allowance.
    assert [call(client, res["id"], smid=smid, action="state").status_code for _ in range(3)] == [200, 200, 429]
    assert sub(api, ident)[0] == "subscribed"
