"""The consent ledger API: history, export as JSON lines, and verification that catches tampering."""
import json
import time

import pytest

from conftest import DAMAGED_ENTRIES, chained_past, damage_newest_entry, redis_state
from webapp import events
from webapp.resources import get_resource
from webapp.subscriptions import Status, update_profile
from webapp.validation import time_to_ms


def make_history(api, resource, profile_id="p-42", email="ann@example.com"):
    ident = {"db_id": 1, "profile_id": profile_id, "resource_id": resource["id"], "channel": "email",
             "email": email}
    api.ok("subscriptions/set", **ident)
    api.ok("subscriptions/set", **ident, cats=["receipts"])
    api.ok("subscriptions/set", **ident, status="unsubscribed")
    return ident


def test_list_newest_first_and_paged(api, resource):
    make_history(api, resource)
    resp = api.call("events/list", db_id=1, profile_id="p-42", limit=2).get_json()
    first = resp["data"]
    assert [e["seq"] for e in first] == [3, 2] and resp["next_from_id"] == 1
    assert first[0]["after"] == {"status": "unsubscribed", "cats": ["receipts"]}
    for key in ("id", "at", "db_id", "profile_id", "resource_id", "channel", "hash_id", "method", "before",
                "after", "smid", "evidence", "prev_hash", "hash"):
        assert key in first[0]
    rest = api.call("events/list", db_id=1, profile_id="p-42", from_id=1, limit=2).get_json()
    assert [e["seq"] for e in rest["data"]] == [1] and rest["next_from_id"] is None


def test_export_json_lines(api, client, resource):
    make_history(api, resource)
    make_history(api, resource, "p-43", "bob@example.com")
    resp = client.post("/api/v1.1/events/export", json={"token": "test-api-token", "from": 0})
    assert resp.status_code == 200 and resp.mimetype == "application/x-ndjson"
    lines = [json.loads(x) for x in resp.get_data(as_text=True).splitlines()]
    assert len(lines) == 6 and [e["at"] for e in lines] == sorted(e["at"] for e in lines)
    empty = client.post("/api/v1.1/events/export", json={"token": "test-api-token",
                                                         "from": "2000-01-01T00:00:00Z", "to": "2000-01-02T00:00:00Z"})
    assert empty.get_data(as_text=True) == ""
    # Times outside what a stream ID can hold are kept in range, not sent to Redis after the 200 went out.
    for far in ({"from": "0001-01-01T00:00:00+05:00"}, {"from": 0, "to": 10 ** 20}, {"to": "9999-12-31T23:59:59-14:00"}):
        wide = client.post("/api/v1.1/events/export", json={"token": "test-api-token", **far})
        assert wide.status_code == 200 and len(wide.get_data(as_text=True).splitlines()) == 6, far
        flagged = client.post("/api/v1.1/events/flagged", json={"token": "test-api-token", **far})
        assert flagged.status_code == 200, far
    bad = client.post("/api/v1.1/events/export", json={"token": "test-api-token", "from": "yesterday"})
    assert bad.status_code == 400 and bad.get_json()["error"] != 0
    assert client.post("/api/v1.1/events/export", json={"from": 0}).status_code == 401


def export(client, **body):
    resp = client.post("/api/v1.1/events/export", json={"token": "test-api-token", **body})
    assert resp.status_code == 200
    return [json.loads(x) for x in resp.get_data(as_text=True).splitlines()]


def test_export_range_follows_the_events_own_time(api, client, r, resource):
    """An event's `at` is taken before its MULTI/EXEC, its timeline entry's time at the commit: a range is the
    events' own time, also for one committed well after it was built, and paging in batches keeps them all."""
    hash_id = api.ok("subscriptions/get", **make_history(api, resource, "p-1", "one@example.com"))["hash_id"]
    stored = get_resource(r, resource["id"])

    def slow(pc):  # an app host that takes 80 ms between building the event and the EXEC
        pc.save(hash_id, dict(pc.records[hash_id], status=int(Status.SUBSCRIBED)), stored, method="api")
        time.sleep(0.08)

    update_profile(r, 1, "p-1", slow)
    make_history(api, resource, "p-2", "two@example.com")
    late = events.decode_event(r.lindex("us:{1:p-1}:events", -1))
    committed = int(r.xrange("us:events:timeline", "-", "+")[3][0].split("-")[0])
    at = time_to_ms(late["at"])
    assert committed - at >= 80
    assert [e["id"] for e in export(client, **{"from": late["at"], "to": late["at"]})] == [late["id"]]
    assert late["id"] not in [e["id"] for e in export(client, **{"from": at + 1, "to": committed})]
    everything = export(client)
    assert [e["seq"] for e in everything] == [1, 2, 3, 4, 1, 2, 3]
    assert list(events.export_events(r, 0, committed + 10 ** 6, batch=2)) == everything
    assert list(events.export_events(r, at, at + 1, batch=1)) == [late]


def test_export_names_a_removed_entry_missing_and_not_the_next_one(api, client, r, resource):
    """After an entry was removed from the middle of a ledger, the entry at its place in the list is the next
    event: export says the removed one is missing and still exports the next one as itself."""
    make_history(api, resource)
    key = "us:{1:p-42}:events"
    r.lrem(key, 1, r.lindex(key, 1))                 # seq 2 removed: the list is now [seq 1, seq 3]
    lines = export(client)
    assert [(x["seq"], x.get("missing", False)) for x in lines] == [(1, False), (2, True), (3, False)], lines
    assert lines[1] == {"db_id": 1, "profile_id": "p-42", "seq": 2, "missing": True}


def test_verify_names_an_edited_entry(api, r, resource):
    make_history(api, resource)
    make_history(api, resource, "p-43", "bob@example.com")
    assert api.ok("events/verify") == {"ok": True, "first_bad": None}
    key = "us:{1:p-43}:events"
    entry = events.decode_event(r.lindex(key, 1))
    entry["after"]["cats"] = ["news", "receipts"]       # someone rewrites history
    r.lset(key, 1, events.encode_event(entry))
    result = api.ok("events/verify")
    assert result["ok"] is False
    assert result["first_bad"] == {"db_id": 1, "profile_id": "p-43", "seq": 2, "id": entry["id"],
                                   "problem": "entry was altered"}
    assert api.ok("events/verify", db_id=1, profile_id="p-42")["ok"] is True


def test_verify_names_a_removed_entry(api, r, resource):
    make_history(api, resource)
    removed = events.decode_event(r.lindex("us:{1:p-42}:events", 1))
    r.lrem("us:{1:p-42}:events", 1, r.lindex("us:{1:p-42}:events", 1))
    result = api.ok("events/verify", db_id=1, profile_id="p-42")
    assert result["first_bad"]["seq"] == 2 and result["first_bad"]["problem"] == "entry missing or out of order"
    assert result["first_bad"]["id"] != removed["id"]


def test_verify_names_entries_cut_from_the_ledgers_end(api, r, resource):
    """A chain whose newest entries were removed is still a valid chain: verify checks it against the records,
    every subscription's last event must say the status its record holds, and a profile's whole ledger deleted
    is found from its subscriptions."""
    hash_id = api.ok("subscriptions/get", **make_history(api, resource))["hash_id"]
    make_history(api, resource, "p-43", "bob@example.com")
    key = "us:{1:p-42}:events"
    r.rpop(key)                                       # the unsubscribe (seq 3) is erased
    result = api.ok("events/verify", db_id=1, profile_id="p-42")
    assert result["ok"] is False
    assert result["first_bad"] == {
        "db_id": 1, "profile_id": "p-42", "seq": 3, "id": None, "hash_id": hash_id,
        "problem": f"subscription {hash_id} is unsubscribed but its last event (seq 2) says subscribed: "
                   "entries missing from the ledger's end, or that event altered"}
    assert api.ok("events/verify")["first_bad"]["profile_id"] == "p-42"
    r.delete(key)                                     # a subscription that still exists, with no history at all
    for body in ({"db_id": 1, "profile_id": "p-42"}, {"db_id": 1}, {}):
        result = api.ok("events/verify", **body)
        assert result["ok"] is False and result["first_bad"]["seq"] == 1, (body, result)
        assert result["first_bad"]["problem"] == f"subscription {hash_id} has no event: entries missing from " \
                                                  "the ledger's end", (body, result)
    assert api.ok("events/verify", db_id=1, profile_id="p-43")["ok"] is True


def test_verify_compares_only_the_status_with_the_records(api, r, resource):
    """A category the sender deletes changes every subscriber's cats without an event (README, API notes): the
    ledger still verifies; so does a change that writes no event (priority, is_delete)."""
    make_history(api, resource)
    ident = make_history(api, resource, "p-42", "bob@example.com")
    api.ok("subscriptions/set", **ident, cats=["news", "receipts"], status="subscribed")
    api.ok("resources/update", id=resource["id"], delete_categories=["news"])
    api.ok("subscriptions/delete", **ident)
    assert api.ok("events/verify") == {"ok": True, "first_bad": None}


def test_ledger_api_validation_writes_nothing(api, r, resource):
    make_history(api, resource)
    before = redis_state(r)
    api.fail("events/list", 400, db_id=1)
    api.fail("events/list", 400, db_id=1, profile_id="p-42", limit=0)
    api.fail("events/verify", 400, profile_id="p-42")
    api.fail("events/list", 401, token="nope", db_id=1, profile_id="p-42")
    assert redis_state(r) == before


# The stored event format (events.encode_event / decode_event).

def test_events_are_stored_compactly_and_verify(api, r, resource):
    make_history(api, resource)
    raws = r.lrange("us:{1:p-42}:events", 0, -1)
    first = raws[0]
    assert first.startswith('{"i":"') and '"seq"' not in first and '"evidence"' not in first, first
    assert '"b"' not in first and '"p"' not in first and '"s"' not in first  # no before, prev_hash, smid
    assert len(first) <= 240, first
    assert all(events.decode_event(raw)["hash"] == events.event_hash(events.decode_event(raw)) for raw in raws)
    assert api.ok("events/verify", db_id=1, profile_id="p-42") == {"ok": True, "first_bad": None}


def test_events_stored_in_the_long_form_still_read_and_verify(api, r, resource):
    make_history(api, resource)
    key = "us:{1:p-42}:events"
    history = api.ok("events/list", db_id=1, profile_id="p-42")
    for i, raw in enumerate(r.lrange(key, 0, -1)):
        r.lset(key, i, json.dumps(events.decode_event(raw)))
    assert '"seq"' in r.lindex(key, 0)
    assert api.ok("events/list", db_id=1, profile_id="p-42") == history
    assert api.ok("events/verify", db_id=1, profile_id="p-42") == {"ok": True, "first_bad": None}


def test_every_event_survives_the_stored_form():
    """decode_event(encode_event(e)) is e, member order and value types included, for any event new_event
    builds (hypothesis); its hash still verifies, and the chain's next link is read from its end."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    text = st.text(max_size=20)
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40), text)
    state = st.one_of(st.none(), st.fixed_dictionaries({"status": st.sampled_from(["subscribed", "unsubscribed"]),
                                                        "cats": st.lists(text, max_size=3)}))
    last = st.one_of(st.none(), st.builds(lambda seq, h: {"seq": seq, "hash": h}, st.integers(1, 10 ** 6),
                                          st.text("0123456789abcdef", min_size=64, max_size=64)))
    evidence = st.one_of(st.none(), st.dictionaries(
        st.one_of(st.sampled_from(["ip", "user_agent", "seconds_since_send", "locale"]), text), scalar, max_size=5))

    @settings(max_examples=300, deadline=None)
    @given(last, st.integers(1, 2 ** 31), text, st.integers(1, 2 ** 31), st.sampled_from(["email", "sms"]),
           st.text("0123456789abcdef", min_size=8, max_size=8), st.sampled_from(["api", "one_click", "timer"]),
           state, state, st.one_of(st.none(), text), evidence)
    def check(last, db_id, profile_id, resource_id, channel, hash_id, method, before, after, smid, evidence):
        event = events.new_event(last, db_id=db_id, profile_id=profile_id, resource_id=resource_id,
                                 channel=channel, hash_id=hash_id, method=method, before=before, after=after,
                                 smid=smid, evidence=evidence)
        stored = events.encode_event(event)
        back = events.decode_event(stored)
        assert json.dumps(back) == json.dumps(event)  # same members, order and values
        assert events.event_hash(back) == event["hash"]
        # The next event's link is read from the entry's end (events._ENTRY_END, in its last characters), as
        # decoding it gives it.
        assert events._ENTRY_END.search(stored, len(stored) - events._ENTRY_END_CHARS)
        assert events.chain_tip(None, db_id, profile_id, stored) == {"seq": event["seq"], "hash": event["hash"]}
    check()


def test_verify_names_damaged_compact_entries(api, r, resource):
    """Entries edited in their stored form (a member of the wrong type, a time out of range) are reported,
    and listing them still works."""
    for i, damage in enumerate(({"e": [1]}, {"e": "x"}, {"a": 10 ** 20}, {"a": -(10 ** 20)}, {"f": None})):
        profile_id = f"p-d{i}"
        key = f"us:{{1:{profile_id}}}:events"
        make_history(api, resource, profile_id, f"d{i}@example.com")
        entry = json.loads(r.lindex(key, 1))
        r.lset(key, 1, json.dumps({**entry, **damage}))
        result = api.ok("events/verify", db_id=1, profile_id=profile_id)
        assert result["first_bad"]["seq"] == 2 and result["first_bad"]["problem"] == "entry was altered", damage
        assert [e["seq"] for e in api.ok("events/list", db_id=1, profile_id=profile_id)] == [3, 2, 1]


@pytest.mark.parametrize("damaged", DAMAGED_ENTRIES)
def test_a_damaged_entry_is_listed_in_its_place_not_a_500(api, r, resource, damaged):
    """events/list over a range holding an entry that is not an event (damaged storage) lists the readable
    events around it and names the damaged one by its place, as export names a missing one."""
    make_history(api, resource)
    key = "us:{1:p-42}:events"
    intact = [events.decode_event(raw) for raw in r.lrange(key, 0, -1)]
    r.lset(key, 1, damaged)
    listed = api.ok("events/list", db_id=1, profile_id="p-42")
    assert listed == [intact[2], {"db_id": 1, "profile_id": "p-42", "seq": 2, "damaged": True}, intact[0]]
    assert api.ok("events/list", db_id=1, profile_id="p-42", from_id=2, limit=1) == [listed[1]]
    assert api.ok("events/verify", db_id=1, profile_id="p-42")["first_bad"]["seq"] == 2


def test_verify_names_an_entry_rewritten_with_its_hash_recomputed_not_the_next_one(api, r, resource):
    """The chain is not keyed, so whoever edits an entry can recompute its hash: the entry after it then no
    longer links to it. That next entry is intact (its own hash covers the prev_hash it was written with, and
    the one after it links to it): verify names the rewritten entry, not its successor."""
    make_history(api, resource)
    key = "us:{1:p-42}:events"
    entry = events.decode_event(r.lindex(key, 1))
    entry["after"]["cats"] = ["news"]
    entry["hash"] = events.event_hash(entry)
    r.lset(key, 1, events.encode_event(entry))
    bad = api.ok("events/verify", db_id=1, profile_id="p-42")["first_bad"]
    assert (bad["seq"], bad["id"]) == (2, entry["id"]) and "altered" in bad["problem"], bad
    # An entry whose own prev_hash was edited (its hash recomputed or not) is the one named.
    for profile_id, rehash in (("p-43", False), ("p-44", True)):
        make_history(api, resource, profile_id, f"{profile_id}@example.com")
        key = f"us:{{1:{profile_id}}}:events"
        second = dict(events.decode_event(r.lindex(key, 1)), prev_hash="f" * 64)
        if rehash:
            second["hash"] = events.event_hash(second)
        r.lset(key, 1, events.encode_event(second))
        bad = api.ok("events/verify", db_id=1, profile_id=profile_id)["first_bad"]
        assert (bad["seq"], bad["id"], bad["problem"]) == (2, second["id"], "prev_hash does not match"), bad


def test_export_range_with_finer_than_millisecond_ends_is_exact(api, client, r, resource):
    """RFC 3339 times may carry microseconds; events' times are whole milliseconds. An event at 12:00:00.123 is
    before a `from` of 12:00:00.1235 (not in the range) and before a `to` of 12:00:00.1235 (in it)."""
    from webapp.validation import ms_to_time
    make_history(api, resource)
    first = api.ok("events/list", db_id=1, profile_id="p-42")[-1]
    at = time_to_ms(first["at"])
    after, before = ms_to_time(at)[:-1] + "500Z", ms_to_time(at - 1)[:-1] + "500Z"   # half a ms on either side
    assert first["id"] not in [e["id"] for e in export(client, **{"from": after})]
    assert first["id"] in [e["id"] for e in export(client, **{"from": 0, "to": after})]
    assert first["id"] in [e["id"] for e in export(client, **{"from": before})]
    assert first["id"] not in [e["id"] for e in export(client, **{"from": 0, "to": before})]


@pytest.mark.parametrize("damaged", DAMAGED_ENTRIES)
def test_a_change_after_a_damaged_newest_entry_is_applied_and_chained_past_it(api, r, resource, caplog, damaged):
    """Bad data must not stop a change (an unsubscribe must be honoured): the new event links to the SHA-256 of
    the damaged entry's stored text and takes the seq after its place, the next one follows it as usual, and
    verify still names the damaged entry, not the events after it."""
    ident = make_history(api, resource)                      # seq 1, 2, 3 (unsubscribed)
    key = damage_newest_entry(r, "p-42", damaged)
    api.ok("subscriptions/set", **ident, status="subscribed")
    api.ok("subscriptions/set", **ident, status="unsubscribed")
    assert api.ok("subscriptions/get", **ident)["status"] == "unsubscribed"
    entries = r.lrange(key, 0, -1)
    assert len(entries) == 5 and entries[2] == damaged
    new, after = events.decode_event(entries[3]), events.decode_event(entries[4])
    assert (new["seq"], new["prev_hash"]) == (4, chained_past(damaged))
    assert new["hash"] == events.event_hash(new) and new["after"]["status"] == "subscribed"
    assert (after["seq"], after["prev_hash"]) == (5, new["hash"])
    assert "newest ledger entry of profile 1|p-42 is not an event" in caplog.text
    bad = api.ok("events/verify", db_id=1, profile_id="p-42")["first_bad"]
    assert (bad["db_id"], bad["profile_id"], bad["seq"], bad["id"]) == (1, "p-42", 3, None), bad
    refs = [f["ref"] for _id, f in r.xrange("us:events:timeline")]
    assert refs[-2:] == ["1|p-42|4", "1|p-42|5"]


def test_after_damaged_entries_the_seq_continues_from_the_newest_readable_event(api, r, resource):
    """The new event's seq is the newest readable event's + the damaged entries after it + 1, not the list's
    length + 1: after an entry was removed from the middle, that would repeat a seq the timeline already names."""
    ident = make_history(api, resource)
    api.ok("subscriptions/set", **ident, status="subscribed")            # seq 4
    api.ok("subscriptions/set", **ident, status="unsubscribed")          # seq 5
    key = "us:{1:p-42}:events"
    r.lrem(key, 1, r.lindex(key, 1))                                     # seq 2 removed: [1, 3, 4, 5]
    r.lset(key, -1, "{not json")
    r.lset(key, -2, "[]")                                                # [1, 3, damaged, damaged]
    assert events.last_event(r, 1, "p-42") == {"seq": 5, "hash": chained_past("{not json")}
    api.ok("subscriptions/set", **ident, status="subscribed")
    new = events.decode_event(r.lindex(key, -1))
    assert (new["seq"], new["prev_hash"]) == (6, chained_past("{not json"))
    r.delete(key)
    r.rpush(key, "{}", "{}")                                             # nothing readable at all
    assert events.last_event(r, 1, "p-42") == {"seq": 2, "hash": chained_past("{}")}


def test_chain_tip_reads_seq_and_hash_as_decode_event_does():
    """chain_tip reads only an entry's seq and hash (events._link_of): for every kind of entry, good or damaged,
    they are those of read_event's full decoding, and an entry is chained after exactly when is_link says so."""
    entries = ['{"i":"1-a","a":1796066052351,"q":3,"p":"' + "a" * 64 + '","x":"' + "b" * 64 + '"}',
               '{"q":1,"x":"h"}', '{"q":1,"x":"h","hash":"long"}', '{"q":1,"hash":"long"}', '{"q":1,"x":"h","hash":5}',
               '{"q":true,"x":"h"}', '{"q":1.0,"x":"h"}', '{"q":"1","x":"h"}', '{"q":1}', '{"x":"h"}', '{"q":1,"x":null}',
               '{"seq":4,"hash":"h","id":"x"}', '{"seq":4,"x":"h"}', '{"seq":"4","hash":"h"}', '{"seq":4,"q":5,"hash":"h"}',
               '{"q":2,"seq":null,"x":"h"}', "{}", "[]", "null", "7", '"text"', "{not json", "", '{"q":1,"x":"h"} junk']
    for raw in entries:
        event = events.read_event(raw)
        expected = {"seq": event["seq"], "hash": event["hash"]} if events.is_link(event) else None
        assert events._link_of(raw) == expected, raw
        if expected is not None:  # read straight from the entry, no read of the ledger (client None)
            assert events.chain_tip(None, 1, "p", raw) == expected, raw
