"""/unsubscribe/<smid>: GET/HEAD never change anything, RFC 8058 one-click, page actions, redirects, errors."""
import json
import re
import time

import pytest

from conftest import (DAMAGED_ENTRIES, back_link, chained_past, damage_newest_entry, email_resource, form_token,
                      redis_state, refuse_form, restore, same_state, snapshot)
from webapp import events
from webapp.tokens import read_smid

SCANNER_AGENTS = [
    None,
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.4266; Pro)",
    "Barracuda Sentinel (EE)",
    "Mozilla/5.0 (compatible; Proofpoint URL Defense)",
    "Mimecast-URL-Protect/1.0",
    "Googlebot/2.1 (+http://www.google.com/bot.html)",
    "curl/8.5.0",
]
MODES = ["instant", "confirm", "blocked", "delayed"]


def make_link(api, mode="confirm", category="news", email="ann@example.com", **resource_kw):
    unsub = {"mode": mode, **resource_kw.pop("unsubscribe", {})}
    res = api.ok("resources/add", **email_resource(unsubscribe=unsub, **resource_kw))
    api.ok("subscriptions/set", db_id=1, profile_id="p-42", resource_id=res["id"], channel="email", email=email)
    body = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email", "email": email}
    if category:
        body["category"] = category
    links = api.ok("messages/links", **body)
    return res, links["unsubscribe_url"].removeprefix("https://unsub.example"), body


def get_sub(api, body):
    return api.ok("subscriptions/get", **{k: v for k, v in body.items() if k != "category"})


@pytest.mark.parametrize("mode", MODES)
def test_head_and_get_never_change_anything(api, client, r, mode):
    _res, path, _body = make_link(api, mode)
    before = redis_state(r)
    for agent in SCANNER_AGENTS:
        headers = {"User-Agent": agent} if agent else {}
        for method in (client.get, client.head):
            for url in (path, path + "/", path + "?lang=ru", path + "?action=unsubscribe"):
                resp = method(url, headers=headers)
                assert resp.status_code == 200, (url, resp.status_code)
    assert redis_state(r) == before


def test_page_states_what_stops_and_continues(api, client):
    _res, path, _body = make_link(api, "confirm")
    html = client.get(path).get_data(as_text=True)
    assert 'value="news" checked' in html                 # the message's category preselected
    assert "Receipts" in html and "required" in html       # required category shown as continuing
    assert 'name="categories" value="receipts"' not in html
    assert "Nothing changes until you confirm" in html


ONE_CLICK_BODIES = [
    ("urlencoded", {"data": "List-Unsubscribe=One-Click", "content_type": "application/x-www-form-urlencoded"}),
    ("multipart", {"data": {"List-Unsubscribe": "One-Click"}, "content_type": "multipart/form-data"}),
    ("empty", {"data": b"", "content_type": "application/x-www-form-urlencoded"}),
    ("no content type", {"data": b""}),
    ("odd", {"data": "List-Unsubscribe=Yes-Please", "content_type": "application/x-www-form-urlencoded"}),
]


@pytest.mark.parametrize("name,kwargs", ONE_CLICK_BODIES, ids=[n for n, _ in ONE_CLICK_BODIES])
@pytest.mark.parametrize("mode", ["instant", "confirm", "delayed"])
def test_one_click_unsubscribes_without_cookies_or_redirect(api, app, r, mode, name, kwargs):
    _res, path, body = make_link(api, mode, category=None)
    fresh = app.test_client(use_cookies=False)
    for attempt in range(2):  # the replay is idempotent
        resp = fresh.post(path, **kwargs)
        assert resp.status_code == 200 and "Location" not in resp.headers
        assert len(resp.data) < 64
    assert get_sub(api, body)["status"] == "unsubscribed"
    history, _ = events.list_events(r, 1, "p-42")
    changes = [e["method"] for e in history if e["before"]]    # leave out the subscription's creation
    assert changes == ["one_click"]                              # the replay recorded nothing new


def ledger_after_damage(r, damaged):
    """The profile's ledger, whose entry 0 was damaged: [that entry as stored, the events after it]."""
    first, *rest = r.lrange("us:{1:p-42}:events", 0, -1)
    return [first, *map(events.decode_event, rest)]


@pytest.mark.parametrize("damaged", DAMAGED_ENTRIES)
@pytest.mark.parametrize("name,kwargs", ONE_CLICK_BODIES[:2], ids=[n for n, _ in ONE_CLICK_BODIES[:2]])
def test_one_click_after_a_damaged_newest_ledger_entry_unsubscribes(api, app, r, name, kwargs, damaged):
    """RFC 8058: the unsubscribe is honoured whatever the ledger holds; its event is chained past the damaged
    entry (answered in front of Flask, urlencoded, and by Flask, multipart), and the replay changes nothing."""
    _res, path, body = make_link(api, "confirm", category=None)
    damage_newest_entry(r, "p-42", damaged)                   # the subscription's creation (seq 1)
    fresh = app.test_client(use_cookies=False)
    for _attempt in range(2):
        assert fresh.post(path, **kwargs).status_code == 200
    assert get_sub(api, body)["status"] == "unsubscribed"
    stored, event = ledger_after_damage(r, damaged)
    assert stored == damaged and event["method"] == "one_click"
    assert (event["seq"], event["prev_hash"]) == (2, chained_past(damaged))
    assert api.ok("events/verify", db_id=1, profile_id="p-42")["first_bad"]["seq"] == 1


def unsubscribe_and_undo_on_the_page(api, client, path, body):
    """An instant page's Unsubscribe, the page after it offering Undo, and the Undo; returns the form token."""
    token = form_token(client.get(path).get_data(as_text=True))
    assert client.post(path, data={"action": "unsubscribe", "csrf_token": token}).status_code == 303
    assert get_sub(api, body)["status"] == "unsubscribed"
    html = client.get(path + "?done=unsubscribed").get_data(as_text=True)
    assert "You are unsubscribed" in html and 'value="undo"' in html
    assert client.post(path, data={"action": "undo", "csrf_token": token}).status_code == 303
    assert get_sub(api, body)["status"] == "subscribed"
    return token


@pytest.mark.parametrize("damaged", DAMAGED_ENTRIES)
def test_page_actions_after_a_damaged_newest_ledger_entry_work_and_undo(api, client, r, damaged):
    """The page's unsubscribe, the page after it (which offers Undo by reading the ledger back) and the Undo."""
    _res, path, body = make_link(api, "instant", category=None)
    damage_newest_entry(r, "p-42", damaged)
    unsubscribe_and_undo_on_the_page(api, client, path, body)
    stored, unsub, undo = ledger_after_damage(r, damaged)
    assert [e["method"] for e in (unsub, undo)] == ["page_instant", "page_undo"]
    assert (unsub["seq"], unsub["prev_hash"]) == (2, chained_past(damaged))
    assert (undo["seq"], undo["prev_hash"]) == (3, unsub["hash"])


@pytest.mark.parametrize("altered_id", [5, None, "not-a-time", ""])
def test_a_page_whose_last_event_has_an_altered_id_shows_without_undo_not_a_500(api, client, r, altered_id):
    """The page after an unsubscribe offers Undo by the time in its event's id; an id altered in storage (not
    text, not digits) is an event that cannot be undone, not a 500 (events/verify names the entry)."""
    _res, path, body = make_link(api, "instant", category=None)
    token = form_token(client.get(path).get_data(as_text=True))
    assert client.post(path, data={"action": "unsubscribe", "csrf_token": token}).status_code == 303
    key = "us:{1:p-42}:events"
    r.lset(key, -1, json.dumps({**json.loads(r.lindex(key, -1)), "i": altered_id}))
    resp = client.get(path + "?done=unsubscribed")
    assert resp.status_code == 200 and 'value="undo"' not in resp.get_data(as_text=True)
    assert client.post(path, data={"action": "undo", "csrf_token": token}).status_code in (303, 409)
    assert get_sub(api, body)["status"] == "unsubscribed"


def test_one_click_with_trailing_slash_is_not_redirected(api, app):
    _res, path, body = make_link(api, "confirm", category=None)
    resp = app.test_client().post(path + "/", data="List-Unsubscribe=One-Click",
                                  content_type="application/x-www-form-urlencoded")
    assert resp.status_code == 200 and "Location" not in resp.headers
    assert get_sub(api, body)["status"] == "unsubscribed"


def test_one_click_category_scoped(api, client):
    _res, path, body = make_link(api, "confirm", category="news")
    assert client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    sub = get_sub(api, body)
    assert sub["status"] == "subscribed" and sub["cats"] == ["receipts"]


def test_a_link_outlives_its_deleted_category_and_then_stands_for_the_whole_subscription(api, client):
    res, path, body = make_link(api, "confirm", category="news")
    api.ok("resources/update", id=res["id"], delete_categories=["news"])
    html = client.get(path).get_data(as_text=True)
    assert "You are unsubscribed" not in html                                         # nothing has stopped yet
    assert client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert get_sub(api, body)["status"] == "unsubscribed"                            # it stopped the mail
    ident = {k: v for k, v in body.items() if k not in ("category", "email", "resource_id", "channel")}
    assert api.ok("events/list", **ident)[0]["after"]["status"] == "unsubscribed"


@pytest.mark.parametrize("status", ["suspended", "unconfirmed"])
def test_one_click_stops_a_paused_or_unconfirmed_subscription_for_good(api, client, r, status):
    """Its messages would come again (the pause ends, or it is confirmed): 'Unsubscribed.' must mean it."""
    from webapp import preferences
    _res, path, body = make_link(api, "confirm", category=None)
    ident = {k: v for k, v in body.items() if k != "category"}
    if status == "suspended":
        preferences.suspend(r, 1, "p-42", get_sub(api, body)["hash_id"], 14, 0.01)   # 14 "days" = 0.14 s
    else:
        api.ok("subscriptions/set", **ident, status=status)
    assert 'value="unsubscribe"' in client.get(path).get_data(as_text=True)          # the page offers it too
    assert client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    sub = get_sub(api, body)
    assert sub["status"] == "unsubscribed" and "suspended_until" not in sub
    assert events.list_events(r, 1, "p-42")[0][0]["method"] == "one_click"
    time.sleep(0.2)
    assert preferences.resume_due_suspensions(r) == 0 and get_sub(api, body)["status"] == "unsubscribed"


def test_undo_of_an_unsubscribe_from_a_senders_suspension_brings_the_suspension_back(api, client, r):
    """A suspension the sender set (no end) stays until the sender lifts it: the person's Undo of their
    unsubscribe must not turn it into 'subscribed' and send what the sender held back."""
    from webapp import preferences
    _res, path, body = make_link(api, "instant", category=None)
    ident = {k: v for k, v in body.items() if k != "category"}
    api.ok("subscriptions/set", **ident, status="suspended")
    token = form_token(client.get(path).get_data(as_text=True))
    assert client.post(path, data={"action": "unsubscribe", "csrf_token": token}).status_code == 303
    assert get_sub(api, body)["status"] == "unsubscribed"
    assert client.post(path, data={"action": "undo", "csrf_token": token}).status_code == 303
    sub = get_sub(api, body)
    assert sub["status"] == "suspended" and "suspended_until" not in sub
    assert preferences.resume_due_suspensions(r) == 0 and get_sub(api, body)["status"] == "suspended"


@pytest.mark.parametrize("pause_ends_first", [False, True])
def test_undo_of_a_paused_subscriptions_unsubscribe_brings_the_pause_back_never_one_without_end(
        api, client, r, pause_ends_first):
    from webapp import preferences
    _res, path, body = make_link(api, "instant", category=None)
    preferences.suspend(r, 1, "p-42", get_sub(api, body)["hash_id"], 14, 0.02)   # 14 "days" = 0.28 s
    token = form_token(client.get(path).get_data(as_text=True))
    assert client.post(path, data={"action": "unsubscribe", "csrf_token": token}).status_code == 303
    assert get_sub(api, body)["status"] == "unsubscribed"
    if pause_ends_first:
        time.sleep(0.35)
        preferences.resume_due_suspensions(r)
    assert client.post(path, data={"action": "undo", "csrf_token": token}).status_code == 303
    assert get_sub(api, body)["status"] == ("subscribed" if pause_ends_first else "suspended")
    time.sleep(0.35)
    preferences.resume_due_suspensions(r)
    assert get_sub(api, body)["status"] == "subscribed"                 # the pause ended, as it would have


def test_a_pause_brought_back_by_undo_is_indexed_even_where_the_sweeper_dropped_its_entry(api, client, r):
    """The sweeper drops a pause's entry from the due index when it finds the record no longer paused (it was
    unsubscribed meanwhile). An Undo that read the record before and writes after that brings back a pause with
    no entry: one that never ends. Every save of a paused record writes its entry with it."""
    from webapp import keys, preferences
    _res, path, body = make_link(api, "instant", category=None)
    hash_id = get_sub(api, body)["hash_id"]
    member = keys.suspension_member(1, "p-42", hash_id)
    preferences.suspend(r, 1, "p-42", hash_id, 14, 0.02)                          # 14 "days" = 0.28 s
    end = r.zscore(keys.suspensions_due(), member)
    token = form_token(client.get(path).get_data(as_text=True))
    assert client.post(path, data={"action": "unsubscribe", "csrf_token": token}).status_code == 303
    r.zrem(keys.suspensions_due(), member)                                  # the sweeper came by
    assert client.post(path, data={"action": "undo", "csrf_token": token}).status_code == 303
    assert get_sub(api, body)["status"] == "suspended"
    assert r.zscore(keys.suspensions_due(), member) == end
    time.sleep(max(0.0, end - time.time()) + 0.05)
    assert preferences.resume_due_suspensions(r) == 1 and get_sub(api, body)["status"] == "subscribed"


def test_one_click_blocked_is_403_and_changes_nothing(api, client, r):
    _res, path, body = make_link(api, "blocked")
    before = redis_state(r)
    resp = client.post(path, data={"List-Unsubscribe": "One-Click"})
    assert resp.status_code == 403 and "Location" not in resp.headers
    assert redis_state(r) == before


def test_one_click_records_evidence(api, client, r):
    _res, path, _body = make_link(api, "instant", category=None)
    client.post(path, data={"List-Unsubscribe": "One-Click"}, headers={"User-Agent": "GoogleOneClick/1.0"},
                environ_base={"REMOTE_ADDR": "203.0.113.7"})
    event = events.list_events(r, 1, "p-42")[0][0]
    assert event["method"] == "one_click" and event["smid"] == path.rsplit("/", 1)[1]
    assert event["evidence"]["ip"] == "203.0.113.7" and event["evidence"]["user_agent"] == "GoogleOneClick/1.0"
    assert 0 <= event["evidence"]["seconds_since_send"] < 60
    assert event["before"] == {"status": "subscribed", "cats": ["news", "receipts"]}
    assert event["after"]["status"] == "unsubscribed"


URLENCODED = {"data": "List-Unsubscribe=One-Click", "content_type": "application/x-www-form-urlencoded"}
# (name, mode, message category, appended to the path, request, answered by front.py without Flask)
FRONT_CASES = [
    ("instant", "instant", None, "", URLENCODED, True),
    ("confirm, category", "confirm", "news", "", URLENCODED, True),
    ("delayed, trailing slash", "delayed", None, "/", URLENCODED, True),
    ("'>' after the link, as in <URL>", "instant", None, ">", URLENCODED, True),
    ("full stop and bracket after the link", "confirm", "news", ").", URLENCODED, True),
    ("index.html after the link", "instant", None, "/index.html", URLENCODED, True),
    ("forged SMID with '>' after it", "instant", None, "A>", URLENCODED, False),
    ("junk after the trailing slash", "instant", None, "/>", URLENCODED, False),
    ("charset parameter", "instant", None, "",
     {"data": "List-Unsubscribe=One-Click", "content_type": "application/x-www-form-urlencoded; charset=utf-8"}, True),
    ("blocked", "blocked", None, "", URLENCODED, False),
    ("forged SMID", "instant", None, "A", URLENCODED, False),
    ("multipart", "instant", None, "",
     {"data": {"List-Unsubscribe": "One-Click"}, "content_type": "multipart/form-data"}, False),
    ("page form without CSRF", "confirm", None, "",
     {"data": "action=unsubscribe&scope=all", "content_type": "application/x-www-form-urlencoded"}, False),
    ("percent-encoded action", "confirm", None, "",
     {"data": "act%69on=unsubscribe", "content_type": "application/x-www-form-urlencoded"}, False),
    ("long body", "instant", None, "",
     {"data": "List-Unsubscribe=One-Click&pad=" + "x" * 300, "content_type": "application/x-www-form-urlencoded"},
     False),
]


@pytest.mark.parametrize("name,mode,category,suffix,kwargs,in_front", FRONT_CASES, ids=[c[0] for c in FRONT_CASES])
def test_one_click_front_answers_exactly_as_flask(api, app, r, name, mode, category, suffix, kwargs, in_front):
    """front.py: from the same Redis state, a POST (then its replay) through the front and straight
    to Flask give the same status, headers and body and leave the same keys; the front answers the plain
    urlencoded success itself and leaves everything else to Flask."""
    from werkzeug.test import Client
    _res, path, _body = make_link(api, mode, category=category)
    front = app.extensions["front"]
    flask_calls = []
    flask_wsgi = front.flask_wsgi

    def counting(environ, start_response):
        flask_calls.append(environ["PATH_INFO"])
        return flask_wsgi(environ, start_response)

    def run(wsgi):
        answers = []
        for _attempt in range(2):
            resp = Client(wsgi).post(path + suffix, environ_base={"REMOTE_ADDR": "203.0.113.7"},
                                     headers={"User-Agent": "GoogleOneClick/1.0"}, **kwargs)
            answers.append((resp.status, list(resp.headers), resp.get_data()))
        return answers, same_state(r)

    snap = snapshot(r)
    front.flask_wsgi = counting
    try:
        through_front = run(front)
    finally:
        front.flask_wsgi = flask_wsgi
    restore(r, snap)
    straight_to_flask = run(flask_wsgi)
    assert through_front == straight_to_flask
    assert flask_calls == ([] if in_front else [path + suffix] * 2)
    if in_front:
        assert [status for status, _headers, _body in through_front[0]] == ["200 OK", "200 OK"]


def test_confirm_needs_the_click_and_csrf(api, client, r):
    _res, path, body = make_link(api, "confirm")
    html = client.get(path).get_data(as_text=True)
    before = redis_state(r)
    resp = client.post(path, data={"action": "unsubscribe", "categories": ["news"]})   # no CSRF token
    assert resp.status_code == 400 and redis_state(r) == before
    resp = client.post(path, data={"action": "unsubscribe", "categories": ["news"], "scope": "categories",
                                   "csrf_token": form_token(html)})
    assert resp.status_code == 303
    sub = get_sub(api, body)
    assert sub["status"] == "subscribed" and sub["cats"] == ["receipts"]
    event = events.list_events(r, 1, "p-42")[0][0]
    assert event["method"] == "page_confirm"


def test_page_sets_no_cookie_and_its_forms_work_without_one(api, app, r):
    """The form token is bound to the link, not a session: a browser that blocks cookies can still confirm."""
    _res, path, body = make_link(api, "confirm")
    no_cookies = app.test_client(use_cookies=False)
    resp = no_cookies.get(path)
    assert "Set-Cookie" not in resp.headers
    token = form_token(resp.get_data(as_text=True))
    resp = no_cookies.post(path, data={"action": "unsubscribe", "scope": "categories", "categories": ["news"],
                                       "csrf_token": token})
    assert resp.status_code == 303 and "Set-Cookie" not in resp.headers
    assert get_sub(api, body)["cats"] == ["receipts"]


def test_page_form_token_is_this_links_and_comes_from_this_site(api, client, r):
    _res, path, _body = make_link(api, "instant", category=None)
    _res2, other_path, _body2 = make_link(api, "instant", category=None, email="bob@example.com")
    token = form_token(client.get(path).get_data(as_text=True))
    other_token = form_token(client.get(other_path).get_data(as_text=True))
    assert token != other_token
    before = redis_state(r)
    refused = [({"csrf_token": other_token}, {}),                           # another link's token
               ({"csrf_token": token + "x"}, {}), ({"csrf_token": "t9." + token.split(".")[1]}, {}),
               ({"csrf_token": token}, {"Origin": "https://evil.example"}),
               ({"csrf_token": token}, {"Sec-Fetch-Site": "cross-site"}),
               ({"csrf_token": token}, {"Sec-Fetch-Site": "same-site", "Origin": "https://unsub.example"})]
    for form, headers in refused:
        resp = client.post(path, data={"action": "unsubscribe", **form}, headers=headers)
        assert resp.status_code == 400, (form, headers)
    assert redis_state(r) == before
    # What browsers send from the page itself: Origin "null" (its Referrer-Policy is no-referrer) or its own.
    for headers in ({"Origin": "null", "Sec-Fetch-Site": "same-origin"}, {"Origin": "https://unsub.example"},
                    {"Origin": "http://localhost"}):
        resp = client.post(path, data={"action": "unsubscribe", "csrf_token": token}, headers=headers)
        assert resp.status_code == 303, headers


def test_confirm_refuses_required_category_and_empty_choice(api, client, r):
    _res, path, _body = make_link(api, "confirm")
    token = form_token(client.get(path).get_data(as_text=True))
    before = redis_state(r)
    resp = client.post(path, data={"action": "unsubscribe", "categories": ["receipts"], "csrf_token": token})
    assert resp.status_code == 400 and "This page is out of date" in resp.get_data(as_text=True)  # never offered
    resp = client.post(path, data={"action": "unsubscribe", "scope": "categories", "csrf_token": token})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 400 and "Choose at least one kind of message" in html
    assert not re.search(r'value="news"[^>]*checked', html)       # shown as the person left it: nothing chosen
    assert redis_state(r) == before


def test_confirm_page_of_a_required_categorys_message_offers_to_stop_it(api, client, r):
    """A message sent for a required category can stop it from its link, as its one-click does: the page offers
    it, ticked, and does not list it as continuing; the other categories stay as they are."""
    _res, path, body = make_link(api, "confirm", category="receipts")
    html = client.get(path).get_data(as_text=True)
    assert re.search(r'value="receipts"[^>]*checked', html) and not re.search(r'value="news"[^>]*checked', html)
    assert "because they are required" not in html
    resp = client.post(path, data={"action": "unsubscribe", "scope": "categories", "categories": ["receipts"],
                                   "csrf_token": form_token(html)})
    assert resp.status_code == 303
    got = get_sub(api, body)
    assert got["status"] == "subscribed" and got["cats"] == ["news"]
    assert events.list_events(r, 1, "p-42")[0][0]["method"] == "page_confirm"


def test_a_page_the_sender_changed_meanwhile_says_so_in_its_language(api, client, r):
    res, path, _body = make_link(api, "confirm")
    token = form_token(client.get(path + "?lang=ru").get_data(as_text=True))
    api.ok("resources/update", id=res["id"], delete_categories=["news"], categories=[
        c for c in email_resource()["categories"] if c["api_name"] != "news"])
    before = redis_state(r)
    resp = client.post(path, data={"csrf_token": token, "lang": "ru", "action": "unsubscribe", "scope": "categories",
                                   "categories": "news"})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 400 and 'lang="ru"' in html and "Эта страница устарела" in html
    assert "category" not in html                                   # not the core's English message
    assert redis_state(r) == before
    api.ok("resources/update", id=res["id"], unsubscribe={"mode": "delayed"})   # this page has no timer form
    before = redis_state(r)
    resp = client.post(path, data={"csrf_token": token, "lang": "ru", "action": "unsubscribe"})
    assert resp.status_code == 400 and "Эта страница устарела" in resp.get_data(as_text=True)
    assert redis_state(r) == before


def test_instant_unsubscribe_and_undo(api, client, r):
    _res, path, body = make_link(api, "instant", category=None)
    token = unsubscribe_and_undo_on_the_page(api, client, path, body)
    assert [e["method"] for e in events.list_events(r, 1, "p-42")[0]] == ["page_undo", "page_instant", "api"]
    again = client.post(path, data={"action": "undo", "csrf_token": token})    # a second click: the same answer
    assert again.status_code == 303 and again.headers["Location"].endswith("done=undone")
    assert [e["method"] for e in events.list_events(r, 1, "p-42")[0]] == ["page_undo", "page_instant", "api"]
    api.ok("subscriptions/set", **{k: v for k, v in body.items() if k != "category"}, status="unsubscribed")
    assert client.post(path, data={"action": "undo", "csrf_token": token}).status_code == 409  # another change


def test_a_notice_is_shown_only_while_the_state_agrees(api, client, r):
    """?done= can be typed or come back from history: its notice must not say what did not happen."""
    for mode in ("confirm", "instant", "delayed"):
        _res, path, body = make_link(api, mode)
        for done in ("unsubscribed", "undone", "cancelled", "started"):
            html = client.get(f"{path}?done={done}").get_data(as_text=True)
            assert ('role="status"' in html) == (done in ("undone", "cancelled")), (mode, done)
            assert "Saved." not in html and "data-auto-submit" not in html   # and it still does not act again
        api.ok("subscriptions/set", **{k: v for k, v in body.items() if k != "category"}, status="unsubscribed")
        html = client.get(f"{path}?done=undone").get_data(as_text=True)
        assert "Welcome back" not in html and "You are unsubscribed" in html
        assert 'value="undo"' not in html            # not this link's unsubscribe: nothing it could undo


def test_undo_is_offered_only_for_the_links_own_recent_unsubscribe(api, client, r):
    _res, path, body = make_link(api, "confirm")
    token = form_token(client.get(path).get_data(as_text=True))
    client.post(path, data={"action": "unsubscribe", "csrf_token": token, "categories": ["news"]})
    assert 'value="undo"' in client.get(path + "?done=unsubscribed").get_data(as_text=True)
    _res, blocked_path, blocked = make_link(api, "blocked", email="bob@example.com")
    api.ok("subscriptions/set", **{k: v for k, v in blocked.items() if k != "category"}, cats=["receipts"])
    html = client.get(blocked_path).get_data(as_text=True)
    assert "You are unsubscribed" in html and 'value="undo"' not in html  # the API's change: no dead Undo


def test_a_link_signed_with_a_key_still_verify_only_here_opens(api, app, client, r, redis_url):
    """A rolling key rotation: an instance that already signs with t2 issues a link; an instance that lists
    t2 as verify-only opens it (one that does not list it at all answers 404), and its own links stay t1."""
    from conftest import API_TOKEN, SIGNING_KEYS, ApiActions, close_clients
    from webapp import create_app
    common = {"TESTING": True, "REDIS_URL": redis_url, "API_TOKEN": API_TOKEN, "VAR_DIR": app.config["VAR_DIR"],
              "PUBLIC_BASE_URL": "https://unsub.example"}
    signing = create_app({**common, "SIGNING_KEYS": SIGNING_KEYS + ",t2:the-next-secret"})
    staged = create_app({**common, "SIGNING_KEYS": SIGNING_KEYS, "SIGNING_KEYS_VERIFY_ONLY": "t2:the-next-secret"})
    try:
        _res, _path, body = make_link(api, "confirm")
        new_link = ApiActions(signing.test_client()).ok("messages/links", **body)["unsubscribe_url"]
        path = new_link.removeprefix("https://unsub.example")
        assert client.get(path).status_code == 404                                 # t2 unknown here
        assert staged.test_client().get(path).status_code == 200
        own = ApiActions(staged.test_client()).ok("messages/links", **body)["smid"]
        assert read_smid(app.extensions["signing_keys"], own).profile_id == "p-42"   # still signed with t1
    finally:
        close_clients(signing)
        close_clients(staged)


def test_delayed_start_is_idempotent_and_cancel_works(app, api, client, r):
    res, path, body = make_link(api, "delayed")
    token = form_token(client.get(path).get_data(as_text=True))
    client.post(path, data={"action": "start", "csrf_token": token})
    html = client.get(path).get_data(as_text=True)
    first = re.search(r'data-deadline="([^"]+)"', html).group(1)
    # Just armed, the countdown shows the whole timer (10:00 for ten minutes), not a second less.
    full = round(res["unsubscribe"]["timer_minutes"] * app.config["TIME_UNIT_SECONDS"])
    assert f'data-seconds-left="{full}"' in html and f">{full // 60}:{full % 60:02d}</strong>" in html
    client.post(path, data={"action": "start", "csrf_token": token})
    html = client.get(path).get_data(as_text=True)
    assert re.search(r'data-deadline="([^"]+)"', html).group(1) == first      # same timer, not a new one
    assert 'role="timer"' in html and 'value="cancel"' in html and 'value="now"' in html
    assert client.post(path, data={"action": "cancel", "csrf_token": token}).status_code == 303
    assert "data-deadline" not in client.get(path + "?done=cancelled").get_data(as_text=True)
    assert get_sub(api, body)["status"] == "subscribed"


def test_a_cancel_after_the_deadline_says_the_time_ran_out_and_that_it_can_still_be_undone(api, client, r):
    from webapp.delayed import sweep_once
    _res, path, body = make_link(api, "delayed")
    token = form_token(client.get(path).get_data(as_text=True))
    client.post(path, data={"action": "start", "csrf_token": token})
    assert '<noscript><p class="muted">Reload this page' in client.get(path).get_data(as_text=True)
    assert sweep_once(r, now=time.time() + 3600) == 1                     # the timer fired
    resp = client.post(path, data={"action": "cancel", "csrf_token": token})
    assert resp.status_code == 303 and resp.headers["Location"].endswith("done=late")
    html = client.get(path + "?done=late").get_data(as_text=True)
    # Undo is offered, and works: not "too late" for that
    assert '<div class="notice info" role="status"><p>The time had run out, so you were unsubscribed. ' \
           'You can still undo it.</p></div>' in html and "You are unsubscribed" in html and 'value="undo"' in html
    assert "Too late" not in html
    assert get_sub(api, body)["cats"] == ["receipts"]
    client.post(path, data={"action": "undo", "csrf_token": token})
    assert get_sub(api, body)["cats"] == ["news", "receipts"]
    client.post(path, data={"action": "start", "csrf_token": token})
    sweep_once(r, now=time.time() + 3600)
    api.ok("subscriptions/set", **{k: v for k, v in body.items() if k != "category"}, status="unsubscribed")
    html = client.get(path + "?done=late").get_data(as_text=True)    # changed since: nothing here to undo
    assert 'value="undo"' not in html and "Too late to cancel: the time had already run out." in html


def test_an_instant_page_that_does_not_act_by_itself_says_so(api, client, r):
    _res, path, body = make_link(api, "instant")
    token = form_token(client.get(path).get_data(as_text=True))
    client.post(path, data={"action": "unsubscribe", "csrf_token": token})
    client.post(path, data={"action": "undo", "csrf_token": token})
    html = client.get(path + "?done=undone").get_data(as_text=True)
    assert "Welcome back" in html and "Nothing changes unless you press Unsubscribe." in html
    assert 'class="manual-only"' not in html.split("Nothing changes unless")[0][-40:]   # shown, not script-hidden


def test_delayed_unsubscribe_now(api, client, r):
    _res, path, body = make_link(api, "delayed", category=None)
    token = form_token(client.get(path).get_data(as_text=True))
    client.post(path, data={"action": "start", "csrf_token": token})
    client.post(path, data={"action": "now", "csrf_token": token})
    assert get_sub(api, body)["status"] == "unsubscribed"
    assert not r.keys("*pending*") or r.zcard("us:pending:due") == 0


THREE_CATEGORIES = [{"title": t, "api_name": t.lower(), "in_manager": True, "required": t == "Receipts"}
                    for t in ("News", "Promo", "Receipts")]


def listed(html, kind):
    """The titles in the page's first <ul class="stops"> or <ul class="continues">."""
    return re.findall(r"<li>([^<]*)</li>", html.split(f'<ul class="{kind}">', 1)[1].split("</ul>", 1)[0])


def test_another_categorys_page_shows_the_pending_timer_with_its_own_scope_and_joins_it(api, client, r):
    """One timer per subscription. The Promo message's page, opened while the News message's timer runs,
    shows that timer as it is (News stops); shown in a browser, it adds Promo to it, keeping the deadline."""
    _res, news_path, body = make_link(api, "delayed", categories=THREE_CATEGORIES)
    promo_path = api.ok("messages/links", **{**body, "category": "promo"})["unsubscribe_url"].removeprefix(
        "https://unsub.example")
    client.post(news_path, data={"action": "start", "csrf_token": form_token(client.get(news_path).text)})
    deadline = re.search(r'data-deadline="([^"]+)"', client.get(news_path).text).group(1)
    html = client.get(promo_path).text
    assert 'class="countdown"' in html and f'data-deadline="{deadline}"' in html
    assert listed(html, "stops") == ["News"] and listed(html, "continues") == ["Promo", "Receipts"]
    assert 'data-auto-submit="start"' in html and "Stop these too, when the time is up: Promo" in html
    resp = client.post(promo_path, data={"action": "start", "csrf_token": form_token(html)})
    assert resp.status_code == 303 and resp.headers["Location"].endswith("done=started")
    for path in (promo_path + "?done=started", news_path):
        html = client.get(path).text
        assert f'data-deadline="{deadline}"' in html and "data-auto-submit" not in html, path  # the same timer
        assert listed(html, "stops") == ["News", "Promo"] and listed(html, "continues") == ["Receipts"], path
    assert r.zcard("us:pending:due") == 1 and get_sub(api, body)["cats"] == ["news", "promo", "receipts"]
    resp = client.post(promo_path, data={"action": "now", "csrf_token": form_token(client.get(promo_path).text)})
    assert resp.status_code == 303                                             # what the page said would stop:
    assert get_sub(api, body)["cats"] == ["receipts"] and r.zcard("us:pending:due") == 0


@pytest.mark.parametrize("new_mode", ["instant", "confirm"])
def test_a_timer_started_before_a_switch_of_mode_is_still_shown_and_can_be_cancelled(api, client, r, new_mode):
    """The timer fires at its deadline whatever the mode is now, so the page goes on showing it, with its Cancel
    and Unsubscribe now; an instant page does not unsubscribe at once by itself meanwhile."""
    res, path, body = make_link(api, "delayed")
    token = form_token(client.get(path).text)
    client.post(path, data={"action": "start", "csrf_token": token})
    api.ok("resources/update", id=res["id"], unsubscribe={"mode": new_mode})
    html = client.get(path).text
    assert 'class="countdown"' in html and 'value="cancel"' in html and 'value="now"' in html
    assert "data-auto-submit" not in html and listed(html, "stops") == ["News"]
    resp = client.post(path, data={"action": "cancel", "csrf_token": token})
    assert resp.status_code == 303 and resp.headers["Location"].endswith("done=cancelled")
    html = client.get(path + "?done=cancelled").text
    assert "Cancelled. You stay subscribed" in html and 'class="countdown"' not in html   # the mode's own page
    assert r.zcard("us:pending:due") == 0 and get_sub(api, body)["status"] == "subscribed"


@pytest.mark.parametrize("new_mode", ["instant", "confirm"])
def test_unsubscribe_now_on_a_timer_shown_after_a_switch_of_mode(api, client, r, new_mode):
    res, path, body = make_link(api, "delayed")
    token = form_token(client.get(path).text)
    client.post(path, data={"action": "start", "csrf_token": token})
    api.ok("resources/update", id=res["id"], unsubscribe={"mode": new_mode})
    resp = client.post(path, data={"action": "now", "csrf_token": token})
    assert resp.status_code == 303 and resp.headers["Location"].endswith("done=unsubscribed")
    assert get_sub(api, body)["cats"] == ["receipts"] and r.zcard("us:pending:due") == 0
    assert [e["method"] for e in events.list_events(r, 1, "p-42")[0]][0] == "page_now"


@pytest.mark.parametrize("new_mode", ["instant", "confirm"])
def test_unsubscribe_now_after_that_timer_fired_says_unsubscribed(api, client, r, new_mode):
    """The page showed the timer, which then fired: its "Unsubscribe now" finds the work done, as on a delayed
    page, not a "page out of date" error."""
    from webapp.delayed import sweep_once
    res, path, body = make_link(api, "delayed")
    token = form_token(client.get(path).text)
    client.post(path, data={"action": "start", "csrf_token": token})
    api.ok("resources/update", id=res["id"], unsubscribe={"mode": new_mode})
    sweep_once(r, now=time.time() + 3600)                                  # it fires
    resp = client.post(path, data={"action": "now", "csrf_token": token})
    assert resp.status_code == 303 and resp.headers["Location"].endswith("done=unsubscribed")
    assert get_sub(api, body)["cats"] == ["receipts"]
    assert [e["method"] for e in events.list_events(r, 1, "p-42")[0]] == ["timer", "api"]


def test_a_timer_started_before_the_resource_was_blocked_shows_the_blocked_text_and_never_fires(api, client, r):
    from webapp.delayed import sweep_once
    res, path, body = make_link(api, "delayed")
    client.post(path, data={"action": "start", "csrf_token": form_token(client.get(path).text)})
    api.ok("resources/update", id=res["id"], unsubscribe={"mode": "blocked", "blocked_text": "Contact support."})
    html = client.get(path).text
    assert "Contact support." in html and "<button" not in html and 'class="countdown"' not in html
    assert client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 403
    sweep_once(r, now=time.time() + 3600)                                  # its deadline passes
    assert get_sub(api, body)["status"] == "subscribed" and get_sub(api, body)["cats"] == ["news", "receipts"]
    assert r.zcard("us:pending:due") == 0 and not r.keys("*pending*")


def test_blocked_page_offers_nothing(api, client, r):
    _res, path, _body = make_link(api, "blocked", unsubscribe={"blocked_text": "Account notices are mandatory."})
    html = client.get(path).get_data(as_text=True)
    assert "Account notices are mandatory." in html and "<button" not in html
    token = re.search(r'name="csrf_token"', html)
    assert token is None


@pytest.mark.parametrize("mode", ["instant", "confirm", "delayed"])
def test_page_url_redirect_fills_placeholders(api, client, mode):
    res, path, _body = make_link(api, mode, unsubscribe={
        "page_url": "https://shop.example/bye?smid={send_message_id}&rt={resource_token}"})
    resp = client.get(path)
    smid = path.rsplit("/", 1)[1]
    assert resp.status_code == 302
    assert resp.headers["Location"] == f"https://shop.example/bye?smid={smid}&rt={res['rtoken']}"
    # A crafted URL cannot choose the target: the query string is ignored.
    assert client.get(path + "?next=https://evil.example").headers["Location"].startswith("https://shop.example/")
    # One-click still answers 200 on the same URL, never a redirect.
    assert client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 200


def test_blocked_ignores_page_url(api, client):
    _res, path, _body = make_link(api, "blocked", unsubscribe={"page_url": "https://shop.example/x?smid={send_message_id}"})
    assert client.get(path).status_code == 200


@pytest.mark.parametrize("lang,text", [("en", "This link is not valid"), ("ru", "Ссылка недействительна")])
@pytest.mark.parametrize("bad", ["garbage", "A" * 30, "A" * 500])
def test_bad_smid_gets_a_friendly_page(api, client, lang, text, bad):
    resp = client.get(f"/unsubscribe/{bad}", headers={"Accept-Language": lang})
    assert resp.status_code == 404 and text in resp.get_data(as_text=True)
    assert "Traceback" not in resp.get_data(as_text=True)


def test_forged_and_truncated_smids(api, client, r):
    _res, path, _body = make_link(api, "instant")
    before = redis_state(r)
    for bad in (path[:-1], path[:-10], path[:-1] + ("A" if path[-1] != "A" else "B")):
        assert client.get(bad).status_code == 404
        assert client.post(bad, data={"List-Unsubscribe": "One-Click"}).status_code == 404
    assert redis_state(r) == before


# What mail clients, linkifiers and people add after a link (RFC 3986 App. C's "<URL>", a sentence's full
# stop, a bracket or quote around it, a space), also percent-encoded: none of it is base64url, so the SMID is
# the text before it, and the link opens as sent. Nothing of base64url's own alphabet is ever taken off.
ADDED_AFTER = [">", ".", ")", ",", '"', "'", "]", ";", " ", "%20", "%3E", "%3e", ">.", ").", "%22", "%29"]


@pytest.mark.parametrize("added", ADDED_AFTER)
def test_a_link_with_characters_added_after_it_opens_the_page_and_changes_nothing(api, client, r, added):
    _res, path, _body = make_link(api, "confirm")
    before = redis_state(r)
    page = client.get(path + added)
    assert page.status_code == 200 and "Unsubscribe from Weekly news?" in page.get_data(as_text=True)
    # the forms post to the link as sent, so the page works as the clean link's does
    assert f'action="{path}/?lang=en"' in page.get_data(as_text=True)
    assert client.head(path + added).status_code == 200
    assert redis_state(r) == before


@pytest.mark.parametrize("added", ADDED_AFTER)
@pytest.mark.parametrize("name,kwargs", ONE_CLICK_BODIES[:2], ids=[n for n, _ in ONE_CLICK_BODIES[:2]])
def test_one_click_to_a_link_with_characters_added_after_it_unsubscribes_as_without(api, app, added, name, kwargs):
    _res, path, body = make_link(api, "confirm", category=None)
    fresh = app.test_client(use_cookies=False)
    for _attempt in range(2):
        resp = fresh.post(path + added, **kwargs)
        assert resp.status_code == 200 and "Location" not in resp.headers
        assert resp.get_data(as_text=True) == "Unsubscribed.\n"
    assert get_sub(api, body)["status"] == "unsubscribed"


def test_a_smid_changed_in_its_own_alphabet_is_refused_readably_and_changes_nothing(api, client, r):
    """base64url is case-sensitive: a SMID in another letter case, or with a base64url character added, is
    another token; it is never repaired into the one sent, and its page is the readable 404."""
    _res, path, _body = make_link(api, "instant")
    smid = path.rsplit("/", 1)[1]
    before = redis_state(r)
    for bad in (smid.swapcase(), smid.upper(), smid.lower(), smid + "A", smid + "-"):
        for method in (client.get, client.post):
            resp = method(f"/unsubscribe/{bad}", headers={"Accept-Language": "en"})
            assert resp.status_code == 404, (bad, resp.status_code)
        assert "This link is not valid" in client.get(f"/unsubscribe/{bad}").get_data(as_text=True)
    assert redis_state(r) == before


@pytest.mark.parametrize("tail", ["/index.html", "/index.htm"])
def test_a_link_with_index_html_after_it_is_the_link(api, app, r, tail):
    """A link someone completed as a static page's ("/index.html"): the page, its one-click (200, no redirect),
    and nothing changed by the GET."""
    _res, path, body = make_link(api, "confirm", category=None)
    fresh = app.test_client(use_cookies=False)
    before = redis_state(r)
    page = fresh.get(path + tail)
    assert page.status_code == 200 and "Unsubscribe from Weekly news?" in page.get_data(as_text=True)
    assert redis_state(r) == before
    for name, kwargs in ONE_CLICK_BODIES[:2]:
        resp = fresh.post(path + tail, **kwargs)
        assert resp.status_code == 200 and "Location" not in resp.headers, name
    assert get_sub(api, body)["status"] == "unsubscribed"


@pytest.mark.parametrize("lang,heading", [("en", "This link is incomplete"), ("ru", "Ссылка неполная")])
def test_a_link_cut_short_by_line_wrapping_says_it_is_incomplete_and_changes_nothing(api, client, r, lang, heading):
    """A SMID cut where a mail client wrapped the line: its record, read as far as it goes, needs more than the
    link has. The page says so (not that the link is forged), and neither its GET nor a one-click changes
    anything."""
    _res, path, _body = make_link(api, "instant")
    smid = path.rsplit("/", 1)[1]
    before = redis_state(r)
    for cut in (2, 3, 5, 10, 22, len(smid) - 20, len(smid) - 8):
        resp = client.get(f"/unsubscribe/{smid[:cut]}", headers={"Accept-Language": lang})
        assert resp.status_code == 404 and heading in resp.get_data(as_text=True), cut
        assert client.post(f"/unsubscribe/{smid[:cut]}", data={"List-Unsubscribe": "One-Click"}).status_code == 404
    # an altered link of full length is not called incomplete
    altered = smid[:-1] + ("A" if smid[-1] != "A" else "B")
    html = client.get(f"/unsubscribe/{altered}", headers={"Accept-Language": lang}).get_data(as_text=True)
    assert heading not in html
    assert redis_state(r) == before


def test_language_chain(api, client):
    _res, path, _body = make_link(api, "confirm")
    assert "Отписаться" in client.get(path, headers={"Accept-Language": "ru,en;q=0.5"}).get_data(as_text=True)
    assert "Unsubscribe from" in client.get(path + "?lang=en",
                                            headers={"Accept-Language": "ru"}).get_data(as_text=True)
    res, path2, _ = make_link(api, "confirm", email="bob@example.com", default_locale="ru")
    html = client.get(path2, headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert 'lang="ru"' in html and "Подтвердить отписку" in html        # resource default beats the browser
    assert 'href="?lang=en"' in html                                      # visible switcher


def test_the_profiles_language_comes_after_an_explicit_choice_and_before_the_rest(api, client):
    res, path, body = make_link(api, "confirm", default_locale="en")
    ident = {k: v for k, v in body.items() if k != "category"}
    assert api.ok("subscriptions/set", **ident, locale="ru-RU")["locale"] == "ru"     # kept as its language
    html = client.get(path, headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert 'lang="ru"' in html                        # the profile beats the resource default and the browser
    manage = re.search(r'href="([^"]*/manage/[^"]*)"', html).group(1)
    assert 'lang="ru"' in client.get(manage.removeprefix("https://unsub.example")).get_data(as_text=True)
    html = client.get(path + "?lang=en").get_data(as_text=True)
    assert 'lang="en"' in html                        # an explicit choice beats the profile...
    manage = re.search(r'href="([^"]*/manage/[^"]*)"', html).group(1)
    assert manage.endswith("?lang=en")                # ...and goes on to the manager
    assert 'lang="en"' in client.get(manage.removeprefix("https://unsub.example")).get_data(as_text=True)
    api.ok("subscriptions/set", **ident, locale="")                                   # cleared
    assert "locale" not in api.ok("subscriptions/get", **ident)
    assert 'lang="en"' in client.get(path, headers={"Accept-Language": "ru"}).get_data(as_text=True)
    assert "language tag" in api.fail("subscriptions/set", 400, **ident, locale="русский")


def test_security_headers(api, client):
    _res, path, _body = make_link(api, "confirm")
    resp = client.get(path)
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in resp.headers["Content-Security-Policy"]
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "<script>" not in resp.get_data(as_text=True)


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/unsubscribe/nope", 404), ("GET", "/no-such-page", 404), ("GET", "/unsubscribe/a/b", 404),
    ("PUT", "/unsubscribe/nope", 405), ("DELETE", "/manage/nope/", 405), ("POST", "/static/pages.css", 405)])
def test_every_error_page_is_no_store(client, method, path, status):
    """Caches may keep a 404 or 405 without being told (RFC 9110 §15.1): a routing error's page is no-store like
    the page's own errors, so that a link that opens later, or a changed route, is not answered from a cache."""
    resp = client.open(path, method=method)
    assert resp.status_code == status and "<main" in resp.get_data(as_text=True)
    assert resp.headers.getlist("Cache-Control") == ["no-store"]


# -- /api/v1.1/profiles/message_unsub ---------------------------------------------------------------------

def test_message_unsub(api, r):
    res, path, body = make_link(api, "confirm", category=None)
    smid = path.rsplit("/", 1)[1]
    resp = api.call("profiles/message_unsub", smid=smid, rtoken=res["rtoken"], categories=["news"]).get_json()
    assert resp["error"] == 0 and resp["error_text"] == "Successful operation" and resp["profile_id"] == "p-42"
    assert get_sub(api, body)["cats"] == ["receipts"]
    api.ok("profiles/message_unsub", smid=smid, rtoken=res["rtoken"])
    assert get_sub(api, body)["status"] == "unsubscribed"
    assert events.list_events(r, 1, "p-42")[0][0]["method"] == "api"


def test_message_unsub_without_categories_stops_the_whole_subscription_even_from_a_category_link(api, r):
    res, path, body = make_link(api, "confirm", category="news")
    api.ok("profiles/message_unsub", smid=path.rsplit("/", 1)[1], rtoken=res["rtoken"])
    assert get_sub(api, body)["status"] == "unsubscribed"


def test_message_unsub_rejections_change_nothing(api, r):
    res, path, _body = make_link(api, "confirm", category=None)
    smid = path.rsplit("/", 1)[1]
    other = api.ok("resources/add", **email_resource(name="Other"))
    before = redis_state(r)
    api.fail("profiles/message_unsub", 401, token="wrong", smid=smid, rtoken=res["rtoken"])
    api.fail("profiles/message_unsub", 401, token=None, smid=smid, rtoken=res["rtoken"])
    api.fail("profiles/message_unsub", 403, smid=smid, rtoken="not-the-rtoken")
    api.fail("profiles/message_unsub", 403, smid=smid)
    assert "not a category" in api.fail("profiles/message_unsub", 400, smid=smid, rtoken=res["rtoken"],
                                        categories=["sports"])
    api.fail("profiles/message_unsub", 404, smid=smid[:-2], rtoken=res["rtoken"])
    api.fail("profiles/message_unsub", 403, smid=smid, rtoken=other["rtoken"])
    assert redis_state(r) == before


@pytest.mark.parametrize("root", ["", "/unsub"])
def test_pages_link_their_form_and_assets_under_the_app_root_as_url_for_would(app, client, pages, root):
    """page_path and static_url stand in for url_for on every page view; under a SCRIPT_NAME (the app mounted
    at a prefix) they must give what url_for gives."""
    from flask import url_for
    from webapp.pages import page_path, static_url
    for name, path in pages.items():
        if name.startswith("bad-"):
            continue
        html = client.get(path, base_url="http://localhost" + root).get_data(as_text=True)
        with app.test_request_context(path, base_url="http://localhost" + root):
            css, js = url_for("static", filename="pages.css"), url_for("static", filename="pages.js")
            assert (static_url("pages.css"), static_url("pages.js")) == (css, js)
            assert css.startswith(root + "/static/")
            assert f'href="{css}"' in html
            if name.startswith("unsubscribe-") and "blocked" not in name:
                smid = path.rstrip("/").rsplit("/", 1)[1]
                action = url_for("pages.unsubscribe_page", smid=smid)
                assert page_path(smid) == action and f'action="{action}?lang=en"' in html  # + the page's language
                assert f'src="{js}"' in html


def title_of(resp):
    return re.search(r"<title>(.*?)</title>", resp.get_data(as_text=True), re.S).group(1)


def test_the_window_title_says_what_the_page_says(api, client, r):
    """WCAG 2.4.2: the title names the page's state, as its heading does, and an error says so first."""
    from webapp.delayed import sweep_once
    _res, path, body = make_link(api, "confirm")
    assert title_of(client.get(path)) == "Unsubscribe from Weekly news"
    token = form_token(client.get(path).get_data(as_text=True))
    resp = client.post(path, data={"action": "unsubscribe", "scope": "categories", "csrf_token": token})
    assert title_of(resp) == "Error: Unsubscribe from Weekly news"               # a choice to make again
    client.post(path, data={"action": "unsubscribe", "categories": "news", "csrf_token": token})
    assert title_of(client.get(path + "?done=unsubscribed")) == "You are unsubscribed – Weekly news"
    client.post(path, data={"action": "undo", "csrf_token": token})
    assert title_of(client.get(path + "?done=undone")) == "Your subscription is restored – Weekly news"
    resp = client.post(path, data={"action": "undo", "csrf_token": token, "lang": "ru"})
    assert title_of(client.get(resp.headers["Location"])) == "Подписка восстановлена – Weekly news"
    api.ok("subscriptions/set", **{k: v for k, v in body.items() if k != "category"}, status="complained")
    assert title_of(client.get(path)) == "This address no longer receives these messages – Weekly news"

    _res, path, _body = make_link(api, "blocked", email="bob@example.com")
    assert title_of(client.get(path)) == "These messages cannot be switched off here – Weekly news"
    _res, path, _body = make_link(api, "delayed", email="cat@example.com")
    token = form_token(client.get(path).get_data(as_text=True))
    client.post(path, data={"action": "start", "csrf_token": token})
    assert title_of(client.get(path + "?done=started")) == "You will be unsubscribed from Weekly news"
    client.post(path, data={"action": "cancel", "csrf_token": token})
    assert title_of(client.get(path + "?done=cancelled")) == "Cancelled: you stay subscribed – Weekly news"
    client.post(path, data={"action": "start", "csrf_token": token})
    sweep_once(r, now=time.time() + 3600)
    client.post(path, data={"action": "cancel", "csrf_token": token})
    assert title_of(client.get(path + "?done=late")) == "You are unsubscribed – Weekly news"

    for url, method, title in (("/unsubscribe/garbage", client.get, "Error: This link is not valid"),
                               ("/unsubscribe/garbage?lang=ru", client.get, "Ошибка: Ссылка недействительна"),
                               (path + "/", client.put, "Error: This page cannot be used this way"),
                               (path, client.post, "Error: This request could not be understood")):
        resp = method(url, data={"action": "undo"})
        h1 = re.search(r"<h1>(.*?)</h1>", resp.get_data(as_text=True)).group(1)
        assert title_of(resp) in (f"Error: {h1}", f"Ошибка: {h1}") and title_of(resp) == title, url


def test_unsubscribe_now_on_a_timer_whose_category_the_sender_deleted_stops_what_the_timer_would(api, client, r):
    """A timer whose category was deleted stops the whole subscription at its deadline; the page's "Unsubscribe
    now" settles it now, the same way (not an answer "unsubscribed" that changed nothing and left it running)."""
    res, news_path, body = make_link(api, "delayed", categories=THREE_CATEGORIES)
    token = form_token(client.get(news_path).text)
    client.post(news_path, data={"action": "start", "csrf_token": token})
    api.ok("resources/update", id=res["id"], delete_categories=["news"])
    resp = client.post(news_path, data={"action": "now", "csrf_token": token})
    assert resp.status_code == 303 and resp.headers["Location"].endswith("done=unsubscribed")
    assert (get_sub(api, body)["status"], r.zcard("us:pending:due")) == ("unsubscribed", 0), (
        get_sub(api, body)["status"], get_sub(api, body)["cats"], r.zcard("us:pending:due"))


def test_page_of_a_timer_whose_category_was_deleted_describes_what_it_will_stop(api, client, r):
    res, news_path, body = make_link(api, "delayed", categories=THREE_CATEGORIES)
    client.post(news_path, data={"action": "start", "csrf_token": form_token(client.get(news_path).text)})
    api.ok("resources/update", id=res["id"], delete_categories=["news"])
    html = client.get(news_path).text
    assert 'class="countdown"' in html and "All messages from" in html
    assert '<ul class="continues">' not in html, listed(html, "continues")


def test_instant_page_of_another_category_with_a_pending_timer_can_stop_its_own_category(api, client, r):
    """After a switch to instant mode, the Promo message's page (a timer for News pending) shows the timer, and
    its "Unsubscribe now" stops what the page shows: the timer's News and the link's own Promo."""
    res, news_path, body = make_link(api, "delayed", categories=THREE_CATEGORIES)
    promo_path = api.ok("messages/links", **{**body, "category": "promo"})["unsubscribe_url"].removeprefix(
        "https://unsub.example")
    client.post(news_path, data={"action": "start", "csrf_token": form_token(client.get(news_path).text)})
    api.ok("resources/update", id=res["id"], unsubscribe={"mode": "instant"})
    html = client.get(promo_path).text
    assert 'class="countdown"' in html and listed(html, "stops") == ["News", "Promo"], listed(html, "stops")
    token = form_token(html)
    resp = client.post(promo_path, data={"action": "now", "csrf_token": token})
    assert resp.status_code == 303
    assert get_sub(api, body)["cats"] == ["receipts"] and r.zcard("us:pending:due") == 0, get_sub(api, body)


def test_widened_timer_one_click_of_one_category_keeps_it_for_the_other(api, client, r):
    """A timer for News widened by Promo: News's one-click leaves it waiting, and at its deadline it stops Promo."""
    from webapp.delayed import sweep_once
    _res, news_path, body = make_link(api, "delayed", categories=THREE_CATEGORIES)
    promo_path = api.ok("messages/links", **{**body, "category": "promo"})["unsubscribe_url"].removeprefix(
        "https://unsub.example")
    client.post(news_path, data={"action": "start", "csrf_token": form_token(client.get(news_path).text)})
    client.post(promo_path, data={"action": "start", "csrf_token": form_token(client.get(promo_path).text)})
    assert client.post(news_path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert get_sub(api, body)["cats"] == ["promo", "receipts"] and r.zcard("us:pending:due") == 1
    sweep_once(r, now=time.time() + 3600)
    assert get_sub(api, body)["cats"] == ["receipts"] and r.zcard("us:pending:due") == 0
    assert api.ok("events/verify", db_id=1, profile_id="p-42")["ok"] is True


@pytest.mark.parametrize("lang, heading", [("en", "Nothing to undo"), ("ru", "Отменять нечего")])
def test_an_undo_with_nothing_to_undo_is_titled_so(api, client, r, lang, heading):
    """WCAG 2.4.2 and 2.4.6: the heading and the window title of the page an Undo too late gets say what
    happened, not "Something went wrong"."""
    _res, path, _body = make_link(api, "instant", category=None)
    token = form_token(client.get(path).get_data(as_text=True))
    resp = client.post(path, data={"action": "undo", "csrf_token": token, "lang": lang})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 409 and f'<html lang="{lang}">' in html
    assert re.search(r"<h1>(.*?)</h1>", html).group(1) == heading
    assert title_of(resp) == {"en": "Error: ", "ru": "Ошибка: "}[lang] + heading
    assert html.count(heading) == 2                                             # the text does not say it again


@pytest.mark.parametrize("lang, heading, advice", [
    ("en", "This subscription no longer exists", "link is incomplete"),
    ("ru", "Этой подписки больше нет", "ссылка неполная")])
def test_a_valid_link_whose_subscription_is_gone_does_not_say_the_link_is_broken(api, client, r, lang, heading,
                                                                                 advice):
    """A whole link whose resource the sender deleted is still a 404, but its page does not tell the person the
    link is invalid and to copy it again (it is whole): it says the subscription is gone. The manager link too."""
    res, path, body = make_link(api, "confirm", category=None)
    manage = api.ok("messages/links", **body)["manage_url"].removeprefix("https://unsub.example")
    api.ok("resources/delete", id=res["id"])
    for url in (path, manage):
        resp = client.get(f"{url}?lang={lang}")
        html = resp.get_data(as_text=True)
        assert resp.status_code == 404 and re.search(r"<h1>(.*?)</h1>", html).group(1) == heading, url
        assert title_of(resp) == {"en": "Error: ", "ru": "Ошибка: "}[lang] + heading
        assert advice not in html.lower()
    broken = client.get(f"{path[:-5]}?lang={lang}").get_data(as_text=True)       # a cut link: as before
    assert advice in broken.lower() and heading not in broken


def test_a_category_link_already_stopped_still_shows_the_pending_timer_that_will_stop_the_rest(api, client, r):
    """The News message was one-clicked already; then a whole-subscription timer was started from another
    message's link. News's page must not say "You are unsubscribed, these continue: Promotions" with no way to
    cancel: Promotions stops too at the deadline. It shows that timer, its countdown and Cancel, as every page
    shows a pending timer."""
    res, news_path, body = make_link(api, "delayed", categories=[
        {"title": "News", "api_name": "news"}, {"title": "Promotions", "api_name": "promo"}])
    whole_path = api.ok("messages/links", **{k: v for k, v in body.items() if k != "category"})[
        "unsubscribe_url"].removeprefix("https://unsub.example")
    assert client.post(news_path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    token = form_token(client.get(whole_path).get_data(as_text=True))
    assert client.post(whole_path, data={"action": "start", "csrf_token": token}).status_code == 303
    html = client.get(news_path).get_data(as_text=True)
    assert "data-deadline" in html and 'value="cancel"' in html and 'value="now"' in html
    assert "These continue" not in html and "You are unsubscribed" not in html
    assert 'data-auto-submit="start"' not in html        # nothing of this link's is left to add to the timer
    token = form_token(html)
    assert client.post(news_path, data={"action": "cancel", "csrf_token": token}).status_code == 303
    assert get_sub(api, body)["cats"] == ["promo"] and get_sub(api, body)["status"] == "subscribed"


@pytest.mark.parametrize("source", ["profile", "resource"])
def test_a_form_too_large_to_read_is_answered_in_the_language_the_form_was_shown_in(app, api, client, r, source):
    """A form POST over PAGE_BODY_LIMIT_BYTES is refused (413) before its body, and so its `lang` field, is read:
    the language the page was shown in, from the profile or the resource rather than `?lang=`, comes with the
    forms' URL, not from the browser's Accept-Language. The page's own URL stays as the message sent it."""
    res, path, body = make_link(api, "confirm", **({"default_locale": "ru"} if source == "resource" else {}))
    ident = {k: v for k, v in body.items() if k != "category"}
    if source == "profile":
        api.ok("subscriptions/set", **ident, locale="ru")
    manage = api.ok("messages/links", **body)["manage_url"].removeprefix("https://unsub.example")
    pad = "a" * app.config["PAGE_BODY_LIMIT_BYTES"]
    before = redis_state(r)
    for url in (path, manage):
        html = client.get(url, headers={"Accept-Language": "en"}).get_data(as_text=True)
        assert '<html lang="ru">' in html, url
        actions = set(re.findall(r'<form method="post" action="([^"]+)"', html))
        assert actions, url
        for action in actions:
            form = {"csrf_token": form_token(html), "action": "unsubscribe", "lang": "ru", "pad": pad}
            resp = client.post(action, data=form, headers={"Accept-Language": "en"})
            page = resp.get_data(as_text=True)
            assert resp.status_code == 413 and '<html lang="ru">' in page, (action, resp.status_code)
            assert "<h1>Слишком большой запрос</h1>" in page and "Ничего не изменено" in page
    assert redis_state(r) == before


def assert_the_page_waits_for_a_click(api, client, r, href, lang, body, before):
    """GET `href` (a way back to an instant page): the page in `lang` that waits for a click and says nothing,
    and Redis as it was `before` (the subscription still subscribed)."""
    back = client.get(href)
    page = back.get_data(as_text=True)
    assert back.status_code == 200 and f'<html lang="{lang}">' in page
    assert "data-auto-submit" not in page and 'role="status"' not in page       # waits for a click, says nothing
    assert 'value="unsubscribe"' in page
    assert redis_state(r) == before and get_sub(api, body)["status"] == "subscribed"


@pytest.mark.parametrize("lang", ["en", "ru"])
@pytest.mark.parametrize("status", [413, 429])
def test_a_form_refused_unread_or_over_the_limit_links_back_to_the_page_without_making_it_act(app, api, client, r,
                                                                                              status, lang):
    """A page's form refused before anything was read or changed, its body too large (413) or over the forms'
    limit (429), links back to the page it came from (not only the browser's Back button): the same page, in
    the language its forms carry, with `done=back`, so that the instant page, opened by it, does not
    unsubscribe by itself."""
    _res, path, body = make_link(api, "instant", category=None)
    html = client.get(f"{path}?lang={lang}").get_data(as_text=True)
    action = re.search(r'<form method="post" action="([^"]+)"', html).group(1).replace("&amp;", "&")
    before = redis_state(r)
    resp = refuse_form(app, client, action, {"csrf_token": form_token(html), "action": "unsubscribe"}, status)
    assert f'<html lang="{lang}">' in resp.get_data(as_text=True)
    href, words = back_link(resp.get_data(as_text=True)) or (None, None)
    assert words == {"en": "Back to the unsubscribe page", "ru": "Вернуться на страницу отписки"}[lang]
    assert href == f"{path}/?done=back&lang={lang}"
    assert_the_page_waits_for_a_click(api, client, r, href, lang, body, before)


@pytest.mark.parametrize("lang", ["en", "ru"])
def test_nothing_to_undo_links_back_to_the_page_without_making_it_act(api, client, r, lang):
    """The 409 "Nothing to undo" page links back to the unsubscribe page (not only the browser's Back button),
    in the page's language, with a `done` that keeps an instant page from unsubscribing again by itself: here
    the Undo came after another change (the person subscribed again elsewhere), so the page, opened plainly,
    would unsubscribe them again."""
    _res, path, body = make_link(api, "instant", category=None)
    token = form_token(client.get(path).get_data(as_text=True))
    assert client.post(path, data={"action": "unsubscribe", "csrf_token": token}).status_code == 303
    api.ok("subscriptions/set", **{k: v for k, v in body.items() if k != "category"}, status="subscribed")
    resp = client.post(path + f"?lang={lang}", data={"action": "undo", "csrf_token": token, "lang": lang})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 409
    link = re.search(r'<a href="([^"]+)">([^<]+)</a>', html.split("<main")[1])
    assert link and link.group(2) == {"en": "Back to the unsubscribe page", "ru": "Вернуться на страницу отписки"}[lang]
    href = link.group(1).replace("&amp;", "&")
    assert href.startswith(path) and "done=" in href and f"lang={lang}" in href
    before = redis_state(r)
    assert_the_page_waits_for_a_click(api, client, r, href, lang, body, before)


def language_links(html):
    """The language switcher's links: {language: href}."""
    return {code: href.replace("&amp;", "&")
            for href, code in re.findall(r'<a href="([^"]*)" lang="[a-z]+" hreflang="([a-z]+)">', html)}


def answer_to_a_form(app, api, client, status, path, body, lang):
    """An answer at an instant page's path to something other than a view of it, the person subscribed again
    since the page unsubscribed them (so that the page, opened fresh, would act): an Undo too late (409), a form
    refused unread or over the limit (413, 429), a form with a wrong token (400), a method no page takes (405)."""
    html = client.get(f"{path}?lang={lang}").get_data(as_text=True)
    action = re.search(r'<form method="post" action="([^"]+)"', html).group(1).replace("&amp;", "&")
    form = {"csrf_token": form_token(html), "lang": lang}
    assert client.post(action, data={**form, "action": "unsubscribe"}).status_code == 303
    api.ok("subscriptions/set", **{k: v for k, v in body.items() if k != "category"}, status="subscribed")
    if status == 409:
        resp = client.post(action, data={**form, "action": "undo"})
    elif status == 400:
        resp = client.post(action, data={**form, "action": "undo", "csrf_token": "not-this-pages-token"})
    elif status == 405:
        resp = client.put(action, data={**form, "action": "undo"})
    else:
        resp = refuse_form(app, client, action, {**form, "action": "undo"}, status)
    assert resp.status_code == status and f'<html lang="{lang}">' in resp.get_data(as_text=True)
    return resp


@pytest.mark.parametrize("lang", ["en", "ru"])
@pytest.mark.parametrize("status", [409, 413, 429, 400, 405])
def test_the_language_links_of_an_answer_to_a_form_lead_back_without_making_the_page_act(app, api, client, r,
                                                                                         status, lang):
    """"Nothing to undo", a refused form's page and any error page at the page's URL show the language switcher.
    Its link used to be `?lang=` on the form's URL, which a browser GETs: the instant page opened fresh, and in a
    real browser it unsubscribes by itself, though the person asked only for another language. It is the way
    back, `done=back`, in the chosen language, as the page's own "Back" link is but for the language."""
    _res, path, body = make_link(api, "instant", category=None)
    other = {"en": "ru", "ru": "en"}[lang]
    resp = answer_to_a_form(app, api, client, status, path, body, lang)
    href = language_links(resp.get_data(as_text=True))[other]
    assert href == f"{path}/?done=back&lang={other}"
    if status in (409, 413, 429):
        assert back_link(resp.get_data(as_text=True))[0] == f"{path}/?done=back&lang={lang}"  # the same, but for lang
    before = redis_state(r)
    assert_the_page_waits_for_a_click(api, client, r, href, other, body, before)


@pytest.mark.parametrize("lang", ["en", "ru"])
@pytest.mark.parametrize("mode, action, done", [("instant", "unsubscribe", "unsubscribed"),
                                                ("delayed", "start", "started")])
def test_the_language_links_of_a_page_after_an_action_keep_its_done_and_nothing_else(api, client, r, mode, action,
                                                                                     done, lang):
    """The page the redirect after an action shows (`?done=`) keeps its `done` across a switch of language, so
    the page in the other language does not act again by itself; nothing else of its query goes into the link
    (what a tracker or a person added: only the route's own words), and a `done` that is no word of the page's
    is not carried either."""
    _res, path, _body = make_link(api, mode, category=None)
    token = form_token(client.get(f"{path}?lang={lang}").get_data(as_text=True))
    resp = client.post(f"{path}/?lang={lang}", data={"action": action, "csrf_token": token, "lang": lang})
    assert resp.status_code == 303 and f"done={done}" in resp.location
    other = {"en": "ru", "ru": "en"}[lang]
    for added in ("", "&utm_source=mail&next=https://evil.example/"):
        html = client.get(resp.location + added).get_data(as_text=True)
        assert language_links(html) == {other: f"?done={done}&lang={other}"}, added
        assert "data-auto-submit" not in client.get(f"{path}/?done={done}&lang={other}").get_data(as_text=True)
    html = client.get(f"{path}/?done=nonsense&lang={lang}&x=1").get_data(as_text=True)
    assert language_links(html) == {other: f"?lang={other}"}
