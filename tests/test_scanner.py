"""A scanner-like burst is flagged from its evidence, and the revert API restores exactly those changes."""
import json
import time

import pytest

from conftest import API_TOKEN, email_resource, form_token, redis_state
from webapp import events


def subscribe(api, res, profile_id, email, sent_at=None):
    ident = {"db_id": 1, "profile_id": profile_id, "resource_id": res["id"], "channel": "email", "email": email}
    api.ok("subscriptions/set", **ident)
    links = api.ok("messages/links", **ident, **({"sent_at": sent_at} if sent_at else {}))
    return ident, links["unsubscribe_url"].removeprefix("https://unsub.example")


def test_scanner_burst_is_flagged_and_reverted_exactly(api, app, r):
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "confirm"}, categories=[]))
    scanned, genuine = [], []
    # A scanner: right after the send, HEAD then GET twice, then its JavaScript submits the form.
    for i in range(6):
        ident, path = subscribe(api, res, f"corp{i}", f"user{i}@corp.example")
        bot = app.test_client()
        bot.head(path, headers={"User-Agent": "Mozilla/5.0"})
        bot.get(path)
        html = bot.get(path).get_data(as_text=True)
        assert bot.post(path, data={"action": "unsubscribe", "csrf_token": form_token(html)}).status_code == 303
        scanned.append(ident)
    # People: an hour after the send, one look at the page, one click.
    for i in range(3):
        ident, path = subscribe(api, res, f"person{i}", f"person{i}@home{i}.example", sent_at=int(time.time()) - 3600)
        person = app.test_client()
        html = person.get(path).get_data(as_text=True)
        person.post(path, data={"action": "unsubscribe", "csrf_token": form_token(html)})
        genuine.append(ident)
    # A mailbox provider's one-click right after the send is never flagged.
    ident, path = subscribe(api, res, "oneclick", "oc@corp.example")
    app.test_client().post(path, data={"List-Unsubscribe": "One-Click"})

    resp = api.call("events/flagged", **{"from": 0}, domain_burst=5).get_json()
    flagged = resp["data"]
    assert resp["total_count"] == 6
    assert sorted(f["event"]["profile_id"] for f in flagged) == [f"corp{i}" for i in range(6)]
    assert all({"fast", "head_request", "get_burst", "domain_burst"} <= set(f["flags"]) for f in flagged)
    assert not any("headless" in f["flags"] for f in flagged)

    result = api.ok("events/revert_flagged", **{"from": 0}, domain_burst=5)
    assert len(result["reverted"]) == 6 and result["skipped"] == []
    for ident in scanned:
        assert api.ok("subscriptions/get", **ident)["status"] == "subscribed"
    for ident in genuine:
        assert api.ok("subscriptions/get", **ident)["status"] == "unsubscribed"
    assert api.ok("subscriptions/get", **ident)["status"] == "unsubscribed"            # the one-click
    methods = [e["method"] for e in api.ok("events/list", db_id=1, profile_id="corp0")]
    assert methods == ["revert", "page_confirm", "api"]

    # Reverting again changes nothing: the revert events are not reviewed, the reverted ones are skipped.
    before = redis_state(r)
    again = api.ok("events/revert_flagged", **{"from": 0}, domain_burst=5)
    assert again["reverted"] == [] and {s["reason"] for s in again["skipped"]} == {"changed since"}
    assert redis_state(r) == before


def test_a_headless_browsers_change_is_flagged(api, app, r):
    """An hour after the send, one look and one click, but by a browser that says it is headless."""
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "confirm"}, categories=[]))
    ident, path = subscribe(api, res, "p1", "ann@corp.example", sent_at=int(time.time()) - 3600)
    bot = app.test_client()
    agent = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) HeadlessChrome/156.0.0.0 Safari/537.36"}
    html = bot.get(path, headers=agent).get_data(as_text=True)
    bot.post(path, data={"action": "unsubscribe", "csrf_token": form_token(html)}, headers=agent)
    flagged = api.ok("events/flagged", **{"from": 0})
    assert [f["flags"] for f in flagged] == [["headless"]]


def scanner_unsubscribes(api, app):
    """A subscription a scanner stops through its confirm page (HEAD, GET, the form): a flagged change."""
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "confirm"}, categories=[]))
    ident, path = subscribe(api, res, "p1", "a@corp.example")
    bot = app.test_client()
    bot.head(path)
    html = bot.get(path).get_data(as_text=True)
    assert bot.post(path, data={"action": "unsubscribe", "csrf_token": form_token(html)}).status_code == 303
    return ident


def test_a_later_change_by_the_person_wins(api, app, r):
    ident = scanner_unsubscribes(api, app)
    api.ok("subscriptions/set", **ident, status="complained")
    result = api.ok("events/revert_flagged", **{"from": 0})
    assert result["reverted"] == [] and result["skipped"][0]["reason"] == "changed since"
    assert api.ok("subscriptions/get", **ident)["status"] == "complained"
    assert "not a flagged change" in api.fail("events/revert_flagged", 400, ids=["nope"], **{"from": 0})
    for ids in ([{}], [["x"]], [1]):                     # not event ids: 400, not a 500 from set()
        assert "ids must be a list of event ids" in api.fail("events/revert_flagged", 400, ids=ids, **{"from": 0})


HEADLESS = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) HeadlessChrome/156.0.0.0 Safari/537.36",
            "Origin": "https://shop.example"}


def sdk_confirm(app, res, ident, category):
    """A headless browser runs the SDK on the client's page and confirms the message's category."""
    smid = app.test_client().post("/api/v1.1/messages/links", json={"token": API_TOKEN, **ident,
                                                                    "category": category}).get_json()["data"]["smid"]
    resp = app.test_client().post(f"/sdk/v1/{res['id']}/unsubscribe", json={"smid": smid, "action": "confirm"},
                                  headers=HEADLESS)
    assert resp.status_code == 200, resp.get_json()


def three_category_subscription(api, profile_id):
    cats = [{"title": name.title(), "api_name": name, "in_manager": True, "required": False}
            for name in ("news", "promo", "tips")]
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "confirm"}, categories=cats))
    ident = {"db_id": 1, "profile_id": profile_id, "resource_id": res["id"], "channel": "email",
             "email": f"{profile_id}@corp.example"}
    api.ok("subscriptions/set", **ident)
    return res, ident


def test_several_flagged_changes_of_one_subscription_are_reverted_in_one_call(api, app, r):
    res, ident = three_category_subscription(api, "p1")
    sdk_confirm(app, res, ident, "news")
    sdk_confirm(app, res, ident, "promo")
    assert api.ok("subscriptions/get", **ident)["cats"] == ["tips"]
    flagged_ids = [f["event"]["id"] for f in api.ok("events/flagged", **{"from": 0})]
    assert len(flagged_ids) == 2

    result = api.ok("events/revert_flagged", **{"from": 0})
    assert result == {"reverted": flagged_ids, "skipped": []}
    assert api.ok("subscriptions/get", **ident)["cats"] == ["news", "promo", "tips"]
    revert, *_ = api.ok("events/list", db_id=1, profile_id="p1")
    assert revert["method"] == "revert"                     # one write, one event: straight back to the start
    assert revert["before"]["cats"] == ["tips"] and revert["after"]["cats"] == ["news", "promo", "tips"]
    assert [e["id"] for e in revert["evidence"]["reverted_events"]] == flagged_ids
    assert api.ok("events/verify", db_id=1, profile_id="p1")["first_bad"] is None

    before = redis_state(r)
    again = api.ok("events/revert_flagged", **{"from": 0})
    assert again["reverted"] == [] and [s["reason"] for s in again["skipped"]] == ["changed since"] * 2
    assert redis_state(r) == before


def test_a_persons_change_between_flagged_ones_stops_the_run(api, app, r):
    res, ident = three_category_subscription(api, "p1")
    sdk_confirm(app, res, ident, "news")                     # flagged: [news, promo, tips] -> [promo, tips]
    api.ok("subscriptions/set", **ident, cats=["promo"])     # the person: [promo, tips] -> [promo]
    sdk_confirm(app, res, ident, "promo")                    # flagged: [promo] -> []
    older, newer = [f["event"]["id"] for f in api.ok("events/flagged", **{"from": 0})]

    # Only the older one asked for: the newer change, not reverted, counts as a change since.
    only_older = api.ok("events/revert_flagged", **{"from": 0}, ids=[older])
    assert only_older == {"reverted": [], "skipped": [{"id": older, "reason": "changed since"}]}
    result = api.ok("events/revert_flagged", **{"from": 0})
    assert result == {"reverted": [newer], "skipped": [{"id": older, "reason": "changed since"}]}
    assert api.ok("subscriptions/get", **ident)["cats"] == ["promo"]


def test_a_person_who_changed_back_to_the_flagged_state_keeps_it(api, app, client, r):
    """A scanner unsubscribes; the person subscribes again in the manager, then unsubscribes there for good.
    The state is the flagged change's `after` again, but it is the person's: the revert leaves it."""
    ident = scanner_unsubscribes(api, app)
    [flagged] = api.ok("events/flagged", **{"from": 0})
    manage = api.ok("messages/links", **ident)["manage_url"].removeprefix("https://unsub.example")
    hash_id = flagged["event"]["hash_id"]
    for action in ("resubscribe", "unsubscribe"):
        html = client.get(manage).get_data(as_text=True)
        assert client.post(manage, data={"csrf_token": form_token(html), "action": action,
                                         "hash_id": hash_id}).status_code == 303
    assert [e["method"] for e in api.ok("events/list", db_id=1, profile_id="p1")] == [
        "manager", "manager", "page_confirm", "api"]
    before = redis_state(r)
    result = api.ok("events/revert_flagged", **{"from": 0})
    assert result == {"reverted": [], "skipped": [{"id": flagged["event"]["id"], "reason": "changed since"}]}
    assert api.ok("subscriptions/get", **ident)["status"] == "unsubscribed"
    assert redis_state(r) == before


def test_a_persons_undo_and_second_confirm_are_not_a_burst_of_fetches(api, app, r):
    """The pages the person's own clicks lead to (`?done=`) are no fetches of the link: one look at the page,
    confirm, Undo, confirm again, an hour after the send, is a person's, and not flagged."""
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "confirm"}, categories=[]))
    ident, path = subscribe(api, res, "p1", "a@home.example", sent_at=int(time.time()) - 3600)
    person = app.test_client()
    html = person.get(path).get_data(as_text=True)
    for action in ("unsubscribe", "undo", "unsubscribe"):
        resp = person.post(path, data={"action": action, "csrf_token": form_token(html)})
        assert resp.status_code == 303 and "done=" in resp.headers["Location"]
        html = person.get(resp.headers["Location"]).get_data(as_text=True)
    assert api.ok("subscriptions/get", **ident)["status"] == "unsubscribed"
    assert api.ok("events/flagged", **{"from": 0}) == []
    assert api.ok("events/list", db_id=1, profile_id="p1")[0]["evidence"]["page_views"] == {"GET": 1}
    # Fetches of the link itself still count.
    person.get(path), person.head(path)
    html = person.get(path + "?done=back").get_data(as_text=True)
    person.post(path, data={"action": "undo", "csrf_token": form_token(html)})
    person.post(path, data={"action": "unsubscribe", "csrf_token": form_token(html)})
    [flagged] = api.ok("events/flagged", **{"from": 0})
    assert set(flagged["flags"]) == {"head_request", "get_burst"}


def test_the_revert_finds_the_persons_changes_in_a_ledger_with_entries_removed_or_damaged(api, app, r):
    """The ledger is read by its events' own seq, not by their places in the list: after entries were removed
    from its start the later ones have moved up (events/export still finds them), and the person's changes back
    to the flagged state must still be seen. An unreadable entry is passed over, not a 500."""
    res, ident = three_category_subscription(api, "p1")
    for i in range(3):                                       # three more entries before the flagged change
        api.ok("subscriptions/set", **{**ident, "email": f"other{i}@corp.example"})
    sdk_confirm(app, res, ident, "news")                     # flagged: [news, promo, tips] -> [promo, tips]
    api.ok("subscriptions/set", **ident, cats=["news", "promo", "tips"])   # the person, and back again
    api.ok("subscriptions/set", **ident, cats=["promo", "tips"])
    sdk_confirm(app, res, ident, "promo")                    # flagged: [promo, tips] -> [tips]
    for status in ("unsubscribed", "subscribed"):            # another subscription's changes
        api.ok("subscriptions/set", **{**ident, "email": "other0@corp.example"}, status=status)
    older, newer = [f["event"]["id"] for f in api.ok("events/flagged", **{"from": 0})]
    key = "us:{1:p1}:events"
    r.lset(key, -2, "{not json")                             # another subscription's entry damaged
    for _ in range(3):                                       # the three entries before the flagged change gone
        r.lpop(key)
    result = api.ok("events/revert_flagged", **{"from": 0})
    assert result == {"reverted": [newer], "skipped": [{"id": older, "reason": "changed since"}]}
    assert api.ok("subscriptions/get", **ident)["cats"] == ["promo", "tips"]


def test_the_revert_reads_the_ledger_back_a_page_at_a_time_and_only_as_far_as_needed(api, app, r, monkeypatch):
    """The person's change may be pages back from the ledger's end, behind other subscriptions' changes; and a
    change since stops the reading there, not at the flagged change (whose ledger may be long after it)."""
    from webapp import events, scanner
    monkeypatch.setattr(events, "LEDGER_PAGE", 2)
    res, ident = three_category_subscription(api, "p1")
    sdk_confirm(app, res, ident, "news")
    api.ok("subscriptions/set", **ident, cats=["news", "promo", "tips"])
    api.ok("subscriptions/set", **ident, cats=["promo", "tips"])
    other = {**ident, "email": "other@corp.example"}
    for status in ("subscribed", "unsubscribed") * 3:
        api.ok("subscriptions/set", **other, status=status)
    [flagged] = api.ok("events/flagged", **{"from": 0})
    assert api.ok("events/revert_flagged", **{"from": 0}) == {
        "reverted": [], "skipped": [{"id": flagged["event"]["id"], "reason": "changed since"}]}
    key = "us:{1:p1}:events"
    assert scanner.later_change(r, 1, "p1", ident_hash(api, ident), {flagged["event"]["id"]}, 2) == 4
    r.lset(key, 3, "{not json")              # the person's newest change no longer readable: the one before it is
    assert scanner.later_change(r, 1, "p1", ident_hash(api, ident), {flagged["event"]["id"]}, 2) == 3


def ident_hash(api, ident):
    return api.ok("subscriptions/get", **ident)["hash_id"]


def _altered(event, path, value):
    """The event with the member at `path` (names, outermost first) set to `value`."""
    event = json.loads(json.dumps(event))
    *outer, last = path
    holder = event
    for name in outer:
        holder = holder[name]
    holder[last] = value
    return event


# Members of a flagged change, each given a type new_event never writes: what someone editing Redis by hand, or
# damaged storage, could leave in an entry that still reads as JSON (events/verify names such an entry).
ALTERED_MEMBERS = [
    (("evidence",), "fast"), (("evidence",), ["fast"]), (("evidence", "seconds_since_send"), "5"),
    (("evidence", "seconds_since_send"), [5]), (("evidence", "page_views"), ["GET"]),
    (("evidence", "page_views"), {"GET": "3"}), (("evidence", "page_views"), {"GET": None, "HEAD": [1]}),
    (("evidence", "user_agent"), 7), (("evidence", "recipient_domain"), ["corp.example"]),
    (("evidence", "recipient_domain"), {"corp": 1}), (("id",), 1234567890123), (("id",), "not-a-time"),
    (("id",), None), (("method",), ["sdk"]), (("method",), {"sdk": 1}), (("resource_id",), {"id": 1}),
    (("resource_id",), [1]), (("before",), "subscribed"), (("before",), ["news"]),
    (("before", "status"), "bogus"), (("before", "status"), 0),
    (("before", "status"), ["subscribed"]), (("before", "cats"), "news"),
    (("before", "cats"), [1]), (("after",), {"cats": []}), (("after", "cats"), None), (("seq",), "2"),
    (("seq",), None), (("db_id",), "1"), (("db_id",), [1]), (("profile_id",), ["p1"]), (("hash_id",), {"h": 1}),
]


@pytest.mark.parametrize("path, value", ALTERED_MEMBERS, ids=lambda x: repr(x)[:40])
def test_a_flagged_change_altered_to_wrong_types_is_passed_over_not_a_500(api, app, r, path, value):
    """A readable entry whose members have types new_event never writes is passed over by the review and the
    revert, as unreadable entries are (events/verify names it): the other flagged changes are still listed and
    reverted, and no call answers 500."""
    res, ident = three_category_subscription(api, "p1")
    _, other = three_category_subscription(api, "p2")
    other["resource_id"] = res["id"]
    api.ok("subscriptions/set", **other)
    sdk_confirm(app, res, ident, "news")
    sdk_confirm(app, res, other, "news")
    flagged = api.ok("events/flagged", **{"from": 0})
    assert [f["event"]["profile_id"] for f in flagged] == ["p1", "p2"]
    key = "us:{1:p1}:events"
    # Written in the long form (as older entries are), which reads back member for member.
    r.lset(key, -1, json.dumps(_altered(events.decode_event(r.lindex(key, -1)), path, value)))
    left = api.call("events/flagged", **{"from": 0})
    assert left.status_code == 200, left.get_json()
    assert [f["event"]["id"] for f in left.get_json()["data"]] == [flagged[1]["event"]["id"]]
    reverted = api.call("events/revert_flagged", **{"from": 0})
    assert reverted.status_code == 200, reverted.get_json()
    assert reverted.get_json()["data"] == {"reverted": [flagged[1]["event"]["id"]], "skipped": []}
    assert api.ok("subscriptions/get", **other)["cats"] == ["news", "promo", "tips"]
    assert api.ok("subscriptions/get", **ident)["cats"] == ["promo", "tips"]
    assert api.ok("events/verify", db_id=1, profile_id="p1")["first_bad"] is not None
