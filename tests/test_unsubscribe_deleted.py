"""A message's link keeps working after the sender soft-deletes its subscription (`subscriptions/delete`).

The record stays stored, and `undelete` brings it back: an opt-out sent through the link meanwhile (CAN-SPAM
wants them honoured for 30 days after sending, Gmail wants the link to keep working) must be applied to it and
still hold after the undelete. A deleted *resource* takes its subscriptions out of service: their links 404."""
import time

import pytest

from conftest import form_token, redis_state
from test_pages import get_sub, make_link
from test_sdk import call, make
from webapp import events, keys
from webapp.delayed import sweep_once


def without_category(body):
    return {k: v for k, v in body.items() if k != "category"}


def undeleted(api, body):
    """The subscription as `subscriptions/get` shows it after an `undelete`: (status, cats)."""
    api.ok("subscriptions/undelete", **without_category(body))
    got = get_sub(api, body)
    return got["status"], got["cats"]


# A whole-subscription unsubscribe keeps the categories the person had; the status stops them all.
STOPPED = ("unsubscribed", ["news", "receipts"])


def last_change(r, profile_id="p-42"):
    return events.list_events(r, 1, profile_id)[0][0]


ONE_CLICK_BODIES = [("urlencoded", {"data": "List-Unsubscribe=One-Click",      # answered in front of Flask
                                    "content_type": "application/x-www-form-urlencoded"}),
                    ("multipart", {"data": {"List-Unsubscribe": "One-Click"}})]  # answered by Flask


@pytest.mark.parametrize("name,kwargs", ONE_CLICK_BODIES, ids=[n for n, _ in ONE_CLICK_BODIES])
def test_one_click_on_a_deleted_subscription_is_kept_after_undelete(api, app, r, name, kwargs):
    _res, path, body = make_link(api, "confirm", category=None)
    api.ok("subscriptions/delete", **without_category(body))
    timeline = r.xlen(keys.events_timeline())
    fresh = app.test_client(use_cookies=False)
    for _attempt in range(2):  # idempotent on replay, as for a live subscription
        resp = fresh.post(path, **kwargs)
        assert resp.status_code == 200 and resp.get_data(as_text=True) == "Unsubscribed.\n"
    stored = get_sub(api, body)
    assert stored["is_delete"] is True and stored["status"] == "unsubscribed"  # still deleted, and stopped
    event = last_change(r)
    assert event["method"] == "one_click" and event["after"]["status"] == "unsubscribed"
    assert r.xlen(keys.events_timeline()) == timeline + 1  # one event for webhooks and the called_url
    assert undeleted(api, body) == STOPPED


def test_one_click_of_a_category_link_on_a_deleted_subscription_stops_that_category(api, client, r):
    _res, path, body = make_link(api, "confirm", category="news")
    api.ok("subscriptions/delete", **without_category(body))
    assert client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert undeleted(api, body) == ("subscribed", ["receipts"])


def test_page_of_a_deleted_subscription_is_the_normal_page_and_its_confirm_is_kept_after_undelete(api, client, r):
    _res, path, body = make_link(api, "confirm", category="news")
    api.ok("subscriptions/delete", **without_category(body))
    before = redis_state(r)
    resp = client.get(path)
    assert resp.status_code == 200 and redis_state(r) == before  # GET still changes nothing
    html = resp.get_data(as_text=True)
    assert 'value="news" checked' in html and "Nothing changes until you confirm" in html
    resp = client.post(path, data={"action": "unsubscribe", "scope": "categories", "categories": ["news"],
                                   "csrf_token": form_token(html)})
    assert resp.status_code == 303 and resp.headers["Location"].endswith("done=unsubscribed")
    assert last_change(r)["method"] == "page_confirm"
    assert undeleted(api, body) == ("subscribed", ["receipts"])


def test_instant_page_of_a_deleted_subscription_unsubscribes_and_its_undo_leaves_it_deleted(api, client, r):
    _res, path, body = make_link(api, "instant", category=None)
    api.ok("subscriptions/delete", **without_category(body))
    token = form_token(client.get(path).get_data(as_text=True))
    assert client.post(path, data={"action": "unsubscribe", "csrf_token": token}).status_code == 303
    assert last_change(r)["method"] == "page_instant" and get_sub(api, body)["status"] == "unsubscribed"
    assert client.post(path, data={"action": "undo", "csrf_token": token}).status_code == 303
    stored = get_sub(api, body)
    assert stored["status"] == "subscribed" and stored["is_delete"] is True  # undone, still deleted
    assert client.post(path, data={"action": "unsubscribe", "csrf_token": token}).status_code == 303
    assert undeleted(api, body) == STOPPED


def test_delayed_timer_on_a_deleted_subscription_stops_it_at_its_deadline(api, client, r):
    _res, path, body = make_link(api, "delayed", category=None)
    api.ok("subscriptions/delete", **without_category(body))
    token = form_token(client.get(path).get_data(as_text=True))
    assert client.post(path, data={"action": "start", "csrf_token": token}).status_code == 303
    assert 'role="timer"' in client.get(path).get_data(as_text=True)
    assert get_sub(api, body)["status"] == "subscribed"                   # nothing before the deadline
    assert sweep_once(r, now=time.time() + 3600) == 1
    assert last_change(r)["method"] == "timer"
    assert undeleted(api, body) == STOPPED


def test_sdk_confirm_on_a_deleted_subscription_is_kept_after_undelete(client, api, r):
    res, ident, smid = make(api, "confirm")
    api.ok("subscriptions/delete", **ident)
    resp = call(client, res["id"], smid=smid, action="confirm")
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["result"] == "unsubscribed" and resp.get_json()["status"] == "unsubscribed"
    assert last_change(r)["method"] == "sdk"
    assert undeleted(api, ident) == ("unsubscribed", ["news", "promo", "receipts"])


def test_message_unsub_on_a_deleted_subscription_is_kept_after_undelete(api, r):
    res, path, body = make_link(api, "confirm", category="news")
    api.ok("subscriptions/delete", **without_category(body))
    api.ok("profiles/message_unsub", smid=path.rsplit("/", 1)[1], rtoken=res["rtoken"])
    assert last_change(r)["method"] == "api"
    assert undeleted(api, body) == STOPPED


def test_links_of_a_deleted_resource_still_answer_404_and_change_nothing(api, client, r):
    res, path, body = make_link(api, "confirm", category=None)
    sdk_res, _ident, smid = make(api, "confirm", profile_id="p-43")
    token = form_token(client.get(path).get_data(as_text=True))
    api.ok("subscriptions/delete", **without_category(body))  # deleted as well: the resource's deletion decides
    api.ok("resources/delete", id=res["id"])
    api.ok("resources/delete", id=sdk_res["id"])
    before = redis_state(r)
    assert client.get(path).status_code == 404
    assert client.post(path, data="List-Unsubscribe=One-Click",
                       content_type="application/x-www-form-urlencoded").status_code == 404
    assert client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 404
    assert client.post(path, data={"action": "unsubscribe", "csrf_token": token}).status_code == 404
    assert call(client, sdk_res["id"], smid=smid, action="confirm").status_code == 404
    api.fail("profiles/message_unsub", 404, smid=path.rsplit("/", 1)[1], rtoken=res["rtoken"])
    assert redis_state(r) == before

