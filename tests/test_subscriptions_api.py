"""subscriptions/set, get, list, delete, undelete, suspend_all, unsuspend_all and their validation."""
import hashlib
import json

import pytest

from conftest import email_resource, redis_state
from webapp import keys
from webapp.tokens import read_smid


def sub(resource, **kw):
    body = {"db_id": 1, "profile_id": "p-42", "resource_id": resource["id"], "channel": "email",
            "email": "ann@example.com"}
    body.update(kw)
    return body


def test_set_and_get_extended_form(api, resource):
    created = api.ok("subscriptions/set", **sub(resource, date="2025-07-23T11:27:05.487Z", ip="192.0.2.1"))
    got = api.ok("subscriptions/get", **sub(resource))
    assert got == created
    assert got["email_data"] == {"email": "ann@example.com", "domain": "example.com",
                                 "md5": hashlib.md5(b"ann@example.com").hexdigest()}
    assert got["status"] == "subscribed" and got["is_delete"] is False
    assert got["reg_info"]["date"] == "2025-07-23T11:27:05.487Z"
    assert len(got["hash_id"]) == 8 and got["cats"] == ["news", "receipts"]
    assert got["custom_fields"] == {"plan": "free"}          # the field's default


@pytest.mark.parametrize("value,word", [("unsubscribed", "unsubscribed"), (2, "complained"), ("3", "hardbounced"),
                                        ("UNCONFIRMED", "unconfirmed"), (5, "suspended"), ("invalid", "invalid"),
                                        (0, "subscribed")])
def test_status_word_or_number(api, resource, value, word):
    assert api.ok("subscriptions/set", **sub(resource, status=value))["status"] == word


def test_every_channel_address(api):
    res = api.ok("resources/add", **email_resource(
        channels=["email", "sms", "push", "telegram_bot", "whatsapp", "viber", "notify", "max_bot"],
        channel_settings={"email": {"from_email": "a@shop.example"}}))
    base = {"db_id": 1, "profile_id": "p1", "resource_id": res["id"]}
    cases = [
        ({"channel": "sms", "phone": "+79000000000"}, "phone_data"),
        ({"channel": "push", "provider": "android-firebase", "subscription_id": "a81c264a938b475"}, "provider"),
        ({"channel": "telegram_bot", "cc_data": {"id": 12345}}, "cc_data"),
        ({"channel": "whatsapp", "cc_data": {"phone": "+79000000000"}}, "cc_data"),
        ({"channel": "viber", "cc_data": {"phone": "+79000000001"}}, "cc_data"),
        ({"channel": "notify", "cc_data": {"phone": "+79000000002"}}, "cc_data"),
        ({"channel": "max_bot", "cc_data": {"id": "777"}}, "cc_data"),
    ]
    for body, key in cases:
        got = api.ok("subscriptions/set", **base, **body)
        assert key in got
        if body["channel"] in ("sms", "whatsapp", "viber"):  # the seed: phone_data for SMS/Viber/WhatsApp
            assert got["phone_data"] == {"phone": body.get("phone") or body["cc_data"]["phone"]}
    assert len(api.ok("subscriptions/list", db_id=1, profile_id="p1")) == len(cases)


@pytest.mark.parametrize("date", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_date_outside_the_years_a_time_holds_is_refused(api, r, resource, date):
    before = redis_state(r)
    assert "outside the years" in api.fail("subscriptions/set", 400, **sub(resource), date=date)
    assert redis_state(r) == before


def test_a_required_field_added_later_takes_its_default_on_existing_subscriptions(api, resource):
    api.ok("subscriptions/set", **sub(resource))
    fields = resource["channel_settings"]["email"]["fields"] + [
        {"title": "Tier", "api_name": "tier", "type": "int", "required": True, "default": 1}]
    api.ok("resources/update", id=resource["id"], channel_settings={"email": {"fields": fields}})
    got = api.ok("subscriptions/set", **sub(resource), status="complained")   # the sender can still record it
    assert got["status"] == "complained" and got["custom_fields"]["tier"] == 1


def test_a_required_field_added_later_without_a_default_holds_only_new_subscriptions_and_what_is_given(api, r,
                                                                                                     resource):
    """A bounce or a complaint must be recordable on a subscription made before the field was required."""
    api.ok("subscriptions/set", **sub(resource))
    fields = resource["channel_settings"]["email"]["fields"] + [
        {"title": "Age", "api_name": "age", "type": "int", "required": True},
        {"title": "Nick", "api_name": "nick", "type": "line", "required": True}]
    api.ok("resources/update", id=resource["id"], channel_settings={"email": {"fields": fields}})
    assert api.ok("subscriptions/set", **sub(resource), status="complained")["status"] == "complained"
    assert api.ok("subscriptions/set", **sub(resource), priority=3)["priority"] == 3
    assert api.ok("subscriptions/set", **sub(resource), custom_fields={"age": 40})["custom_fields"]["age"] == 40
    before = redis_state(r)
    for given, name in [({"age": None}, "age"), ({"nick": ""}, "nick"), ({"nick": "  "}, "nick")]:
        assert f"custom_fields.{name} is required" in api.fail("subscriptions/set", 400, **sub(resource),
                                                               custom_fields=given)
    # A new subscription must have every required field.
    assert "custom_fields.nick is required" in api.fail("subscriptions/set", 400, **sub(
        resource, email="new@example.com", custom_fields={"age": 1}))
    assert "custom_fields.age is required" in api.fail("subscriptions/set", 400, **sub(
        resource, email="new@example.com", custom_fields={"nick": "x"}))
    assert redis_state(r) == before
    made = api.ok("subscriptions/set", **sub(resource, email="new@example.com", custom_fields={"age": 1, "nick": "x"}))
    assert made["custom_fields"] == {"plan": "free", "age": 1, "nick": "x"}


def push_resource(api, **settings):
    """A resource with a push channel (and email, whose settings the seed's example does not need)."""
    return api.ok("resources/add", **email_resource(
        channels=["email", "push"], channel_settings={"email": {"from_email": "a@shop.example"},
                                                      "push": settings}))


def test_the_seeds_push_example_sets_the_standard_push_fields(api):
    """subscription-object.txt's push subscription: custom_fields holds "standard and additional" fields."""
    res = push_resource(api, fields=[{"title": "Field 1", "api_name": "custom_field_1", "type": "line"}])
    seed = {"db_id": 1, "profile_id": "p1", "resource_id": res["id"], "channel": "push",
            "subscription_id": "a81c264a938b475", "provider": "android-firebase",
            "custom_fields": {"_browser_name": "Firefox", "_device_type": "web", "custom_field_1": "test value"},
            "cats": ["news", "receipts"]}
    created = api.ok("subscriptions/set", **seed)
    assert created["custom_fields"] == seed["custom_fields"]
    ident = {k: seed[k] for k in ("db_id", "profile_id", "resource_id", "channel", "subscription_id", "provider")}
    assert api.ok("subscriptions/get", **ident)["custom_fields"] == seed["custom_fields"]
    edited = api.ok("subscriptions/set", **ident, custom_fields={"_device_type": None}, status="complained")
    assert edited["custom_fields"] == {"_browser_name": "Firefox", "_device_type": None,
                                       "custom_field_1": "test value"}
    assert "_browser_name must be a string" in api.fail("subscriptions/set", 400, **ident,
                                                        custom_fields={"_browser_name": 5})
    listed = api.ok("resources/fields_get", id=res["id"], channel="push")
    for name in ("_browser_name", "_device_type"):
        assert {"category": "system", "name": name, "required": False, "type": "line"}.items() <= next(
            f for f in listed if f["name"] == name).items()
    # Standard fields are the push channel's: email has none.
    assert "_browser_name is not a field of the email channel" in api.fail(
        "subscriptions/set", 400, **sub(res, custom_fields={"_browser_name": "Firefox"}))


def test_a_push_provider_must_be_one_the_resource_lists(api, r):
    res = push_resource(api, providers=["android-firebase", "Firefox"])
    ident = {"db_id": 1, "profile_id": "p1", "resource_id": res["id"], "channel": "push", "subscription_id": "a81c"}
    before = redis_state(r)
    error = api.fail("subscriptions/set", 400, **ident, provider="ios-apns")
    assert error == "provider 'ios-apns' is not one of the push providers of resource 1: android-firebase, Firefox"
    assert redis_state(r) == before
    assert api.ok("subscriptions/set", **ident, provider="Firefox")["provider"] == "Firefox"
    # As dbs_ids: a subscription made before its provider left the list can still have a bounce recorded.
    api.ok("resources/update", id=res["id"], channel_settings={"push": {"providers": ["android-firebase"]}})
    assert api.ok("subscriptions/set", **ident, provider="Firefox", status="hardbounced")["status"] == "hardbounced"
    assert "not one of the push providers" in api.fail("subscriptions/set", 400, **ident, provider="Firefox",
                                                       status="subscribed")
    # No list: any provider.
    unlisted = push_resource(api)
    assert api.ok("subscriptions/set", **{**ident, "resource_id": unlisted["id"]}, provider="ios-apns")


def test_an_opt_out_of_a_deleted_category_outlives_a_rewrite_of_the_categories(api, resource):
    """Two people who opted out of `news` get the same categories when the sender deletes and re-creates it,
    whatever was done to their subscriptions meanwhile."""
    for email in ("a@example.com", "b@example.com"):
        api.ok("subscriptions/set", **sub(resource, email=email, cats=["receipts"]))
    categories = resource["categories"]
    api.ok("resources/update", id=resource["id"], delete_categories=["news"])
    assert api.ok("subscriptions/set", **sub(resource, email="b@example.com", cats=["receipts"]))["cats"] == [
        "receipts"]
    api.ok("resources/update", id=resource["id"], categories=categories)
    assert [api.ok("subscriptions/get", **sub(resource, email=email))["cats"]
            for email in ("a@example.com", "b@example.com")] == [["receipts"], ["receipts"]]


def test_a_state_set_back_keeps_the_opt_outs_of_deleted_categories_it_does_not_name():
    """with_state (an Undo, a revert) rewrites the categories as subscriptions/set does."""
    from webapp.subscriptions import with_state
    resource = {"categories": [{"api_name": "receipts"}, {"api_name": "promo"}]}
    record = {"status": 1, "uncats": ["news", "promo", "old"]}   # news and old: deleted since
    kept = with_state(resource, record, {"status": "subscribed", "cats": ["receipts", "old"]})
    assert sorted(kept["uncats"]) == ["news", "promo"]          # `old` was on in that state


BAD_SUBSCRIPTIONS = [
    ({"email": "not-an-email"}, "email is not a valid email address"),
    ({"email": "a@b"}, "email is not a valid email address"),
    ({"email": "a..b@example.com"}, "email is not a valid email address"),
    ({"email": "x" * 65 + "@example.com"}, "email is not a valid email address"),
    ({"email": None}, "email is required"),
    ({"channel": "sms", "phone": "89000000000", "email": None}, "E.164"),
    ({"channel": "sms", "phone": "+7 900 000", "email": None}, "E.164"),
    ({"channel": "push"}, "not a channel of resource"),
    ({"status": "gone"}, "status must be one of"),
    ({"status": 7}, "status must be one of"),
    ({"status": True}, "status must be one of"),
    ({"priority": -1}, "priority must be at least 0"),
    ({"priority": "high"}, "priority must be an integer"),
    ({"cats": ["sports"]}, "not a category"),
    ({"cats": "news"}, "cats must be a list"),
    ({"custom_fields": {"nope": 1}}, "not a field"),
    ({"custom_fields": {"plan": 5}}, "plan must be a string"),
    ({"date": "yesterday"}, "RFC 3339"),
    ({"ip": "300.1.1.1"}, "not an IP address"),
    ({"url": "javascript:alert(1)"}, "absolute"),
    ({"db_id": 2}, "may not subscribe"),
    ({"db_id": 0}, "db_id must be at least 1"),
    ({"profile_id": "has space"}, "profile_id must be"),
    ({"profile_id": "p" * 41}, "profile_id must be"),
    ({"profile_id": "p-42\n"}, "profile_id must be"),          # a regex `$` also matches before a final newline
    ({"email": "ann@example.com\n"}, "email is not a valid email address"),
    ({"channel": "sms", "phone": "+79001234567\n", "email": None}, "E.164"),
    ({"cats": ["news\n"]}, "not a category"),
    ({"resource_id": "abc"}, "resource_id must be an integer"),
    ({"extra": 1}, "extra is not a known field"),
    ({"cats": ["news", ["receipts"]]}, "not a category"),            # not a name at all (was a 500)
    # A value of another JSON type is refused, not read as an address or taken for "none" because it is falsy.
    ({"ip": True}, "ip is not an IP address"),                        # was stored as 0.0.0.1
    ({"ip": 3232235777}, "ip is not an IP address"),                  # was stored as 192.168.1.1
    ({"ip": 0}, "ip is not an IP address"),
    ({"ip": []}, "ip is not an IP address"),
    ({"date": 0}, "date must be an RFC 3339 date-time"),
    ({"date": False}, "date must be an RFC 3339 date-time"),
    ({"date": {}}, "date must be an RFC 3339 date-time"),
    ({"url": 0}, "url must be an absolute"),
    ({"url": []}, "url must be an absolute"),
    ({"url": {}}, "url must be an absolute"),
]


@pytest.mark.parametrize("change,message", BAD_SUBSCRIPTIONS, ids=[m for _, m in BAD_SUBSCRIPTIONS])
def test_set_rejects_bad_input_and_writes_nothing(api, r, resource, change, message):
    api.ok("subscriptions/set", **sub(resource))
    before = redis_state(r)
    body = {k: v for k, v in {**sub(resource), **change}.items() if v is not None}
    assert message in api.fail("subscriptions/set", 400, **body)
    assert redis_state(r) == before


def test_empty_registration_fields_mean_none(api, resource):
    """date, ip and url given as null or "" are not given (README): the registration takes its defaults."""
    got = api.ok("subscriptions/set", **sub(resource, date="", ip="", url=""))
    assert (got["reg_info"]["ip"], got["reg_info"]["url"]) == (None, None) and got["reg_info"]["date"]
    again = api.ok("subscriptions/set", **sub(resource, email="bob@example.com", date=None, ip=None, url=None))
    assert (again["reg_info"]["ip"], again["reg_info"]["url"]) == (None, None)


@pytest.mark.parametrize("path", ["subscriptions/list", "subscriptions/suspend_all", "subscriptions/unsuspend_all"])
@pytest.mark.parametrize("channel", [5, ["email"], {"email": 1}, True])
def test_a_channel_that_is_not_a_string_is_refused(api, r, resource, path, channel):
    api.ok("subscriptions/set", **sub(resource))
    before = redis_state(r)
    assert "channel must be a string" in api.fail(path, 400, db_id=1, profile_id="p-42", channel=channel)
    assert redis_state(r) == before


def test_unknown_resource_is_404_and_writes_nothing(api, r, resource):
    before = redis_state(r)
    api.fail("subscriptions/set", 404, **sub(resource, resource_id=999))
    api.fail("subscriptions/get", 404, **sub(resource, email="nobody@example.com"))
    assert redis_state(r) == before


def test_custom_field_types_and_required(api, r):
    fields = [{"title": "Age", "api_name": "age", "type": "int", "required": True},
              {"title": "Score", "api_name": "score", "type": "float"},
              {"title": "VIP", "api_name": "vip", "type": "bool", "default": False}]
    res = api.ok("resources/add", **email_resource(channel_settings={"email": {
        "from_email": "a@shop.example", "fields": fields}}))
    before = redis_state(r)
    assert "age is required" in api.fail("subscriptions/set", 400, **sub(res))
    assert "age must be an integer" in api.fail("subscriptions/set", 400, **sub(res, custom_fields={"age": 1.5}))
    assert "score must be a number" in api.fail("subscriptions/set", 400,
                                                **sub(res, custom_fields={"age": 3, "score": "x"}))
    assert "vip must be true or false" in api.fail("subscriptions/set", 400,
                                                   **sub(res, custom_fields={"age": 3, "vip": "yes"}))
    assert redis_state(r) == before
    ok = api.ok("subscriptions/set", **sub(res, custom_fields={"age": 30, "score": 4.5}))
    assert ok["custom_fields"] == {"age": 30, "score": 4.5, "vip": False}


def test_increase_priority_moves_new_subscription_first(api, resource):
    first = api.ok("subscriptions/set", **sub(resource, email="one@example.com"))
    second = api.ok("subscriptions/set", **sub(resource, email="two@example.com"))
    listed = {s["email"]: s["priority"] for s in api.ok("subscriptions/list", db_id=1, profile_id="p-42")}
    assert first["priority"] == 0 and second["priority"] == 0
    assert listed == {"one@example.com": 1, "two@example.com": 0}


def test_explicit_priority_leaves_others_unchanged(api, resource):
    api.ok("subscriptions/set", **sub(resource, email="one@example.com"))
    third = api.ok("subscriptions/set", **sub(resource, email="three@example.com", priority=5))
    listed = {s["email"]: s["priority"] for s in api.ok("subscriptions/list", db_id=1, profile_id="p-42")}
    assert third["priority"] == 5 and listed == {"one@example.com": 0, "three@example.com": 5}


def test_without_increase_priority_new_subscription_goes_last(api):
    res = api.ok("resources/add", **email_resource(increase_priority=False))
    api.ok("subscriptions/set", **sub(res, email="one@example.com"))
    api.ok("subscriptions/set", **sub(res, email="two@example.com"))
    listed = {s["email"]: s["priority"] for s in api.ok("subscriptions/list", db_id=1, profile_id="p-42")}
    assert listed == {"one@example.com": 0, "two@example.com": 1}


def test_editing_keeps_priority_and_registration(api, resource):
    created = api.ok("subscriptions/set", **sub(resource))
    api.ok("subscriptions/set", **sub(resource, email="other@example.com"))
    edited = api.ok("subscriptions/set", **sub(resource, cats=["receipts"]))
    assert edited["priority"] == 1 and edited["reg_info"] == created["reg_info"]
    assert edited["cats"] == ["receipts"]


def test_a_float_too_large_for_a_double_is_refused(api, r):
    fields = [{"title": "Score", "api_name": "score", "type": "float"}]
    res = api.ok("resources/add", **email_resource(channel_settings={"email": {
        "from_email": "a@shop.example", "fields": fields}}))
    before = redis_state(r)
    huge = 10 ** 400  # JSON's number 1e400 written out in digits: Python reads it as an int
    assert "score must be a finite number" in api.fail("subscriptions/set", 400, **sub(res, custom_fields={"score": huge}))
    assert "must be a finite number" in api.fail("resources/add", 400, **email_resource(channel_settings={"email": {
        "from_email": "a@shop.example", "fields": [{**fields[0], "default": -huge}]}}))
    assert redis_state(r) == before
    assert api.ok("subscriptions/set", **sub(res, custom_fields={"score": 10 ** 300}))["custom_fields"] == {
        "score": 1e300}


def test_a_chat_id_is_one_identity_however_it_is_spelled(api):
    res = api.ok("resources/add", **email_resource(channels=["telegram_bot"], channel_settings={}))
    base = {"db_id": 1, "profile_id": "p1", "resource_id": res["id"], "channel": "telegram_bot"}
    first = api.ok("subscriptions/set", **base, cc_data={"id": "007"}, status="unsubscribed")
    for spelling in ("7", 7, "0007"):   # the person's opt-out holds: no second subscription of the same chat
        again = api.ok("subscriptions/get", **base, cc_data={"id": spelling})
        assert (again["hash_id"], again["status"]) == (first["hash_id"], "unsubscribed")
    assert api.ok("subscriptions/set", **base, cc_data={"id": "-0"})["hash_id"] == \
        api.ok("subscriptions/get", **base, cc_data={"id": 0})["hash_id"]
    assert len(api.ok("subscriptions/list", db_id=1, profile_id="p1")) == 2


def test_a_chat_stored_under_another_spelling_before_is_still_found_by_it(api, r):
    """Before chat ids were made canonical, "007" was hashed as written: that subscription (and its opt-out)
    is still what "007" names, for get, set and links; no second subscription of the chat is made."""
    from webapp import keys
    from webapp.subscriptions import make_hash_id
    res = api.ok("resources/add", **email_resource(channels=["telegram_bot"], channel_settings={}))
    base = {"db_id": 1, "profile_id": "p1", "resource_id": res["id"], "channel": "telegram_bot"}
    made = api.ok("subscriptions/set", **base, cc_data={"id": "7"}, status="unsubscribed")
    subs_key, legacy = keys.profile_subscriptions(1, "p1"), make_hash_id(res["id"], "telegram_bot", "007")
    r.hset(subs_key, legacy, r.hget(subs_key, made["hash_id"]))         # as the code before stored it
    r.hdel(subs_key, made["hash_id"])
    for spelling in ("007", "7", 7):                                    # however the sender writes it now
        assert api.ok("subscriptions/get", **base, cc_data={"id": spelling})["hash_id"] == legacy
        again = api.ok("subscriptions/set", **base, cc_data={"id": spelling}, priority=3)
        assert (again["hash_id"], again["status"]) == (legacy, "unsubscribed")
        assert api.ok("messages/links", **base, cc_data={"id": spelling})["smid"]
    assert [s["hash_id"] for s in api.ok("subscriptions/list", db_id=1, profile_id="p1")] == [legacy]


def test_a_chat_costs_no_more_redis_round_trips_than_an_email(api, r, monkeypatch):
    """Finding a chat stored under an older spelling of its id rides on the reads subscriptions/get and set
    make anyway: a telegram_bot or max_bot chat, found by its id's canonical spelling or by an older one, takes
    as many round trips to Redis as an email (counted on the real client's connections, as sent)."""
    import re

    from redis.connection import AbstractConnection

    from webapp import keys
    from webapp.subscriptions import make_hash_id
    res = api.ok("resources/add", **email_resource(channels=["email", "telegram_bot", "max_bot"],
                                                   channel_settings={"email": {"from_email": "a@shop.example"}}))
    base = {"db_id": 1, "profile_id": "p1", "resource_id": res["id"]}
    addresses = {"email": {"channel": "email", "email": "ann@example.com"},
                 "telegram_bot": {"channel": "telegram_bot", "cc_data": {"id": "7"}},
                 "max_bot": {"channel": "max_bot", "cc_data": {"id": 8}},
                 "older spelling": {"channel": "telegram_bot", "cc_data": {"id": "9"}}}
    sent = []  # the command names of each send: one send, one round trip (a pipeline or MULTI/EXEC is one)
    real_send = AbstractConnection.send_packed_command

    def counted_send(self, command, check_health=True):
        packed = b"".join(command) if isinstance(command, (list, tuple)) else command
        sent.append(" ".join(name.decode().upper() for name in re.findall(rb"\*\d+\r\n\$\d+\r\n([A-Za-z_]+)\r\n",
                                                                       packed)))
        return real_send(self, command, check_health)

    def round_trips(path, **body):
        sent.clear()
        data = api.ok(path, **base, **body)
        return data, list(sent)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted_send)
    warm = {**base, "profile_id": "p0", "channel": "telegram_bot", "cc_data": {"id": "1"}}
    api.ok("subscriptions/set", **warm)   # the connection opened, a script Redis had not cached loaded
    api.ok("subscriptions/get", **warm)
    new, update, get = {}, {}, {}
    for name, address in addresses.items():
        made, new[name] = round_trips("subscriptions/set", **address, status="unsubscribed")
        if name == "older spelling":   # as the code stored it before chat ids were made canonical: "009"
            subs_key, legacy = keys.profile_subscriptions(1, "p1"), make_hash_id(res["id"], "telegram_bot", "009")
            r.hset(subs_key, legacy, r.hget(subs_key, made["hash_id"]))
            r.hdel(subs_key, made["hash_id"])
        again, update[name] = round_trips("subscriptions/set", **address, priority=3)
        got, get[name] = round_trips("subscriptions/get", **address)
        assert got["hash_id"] == again["hash_id"] and got["status"] == again["status"] == "unsubscribed"
        if name == "older spelling":
            assert got["hash_id"] == legacy
    for trips in (get, update, new):   # (a new chat's set named "older spelling" is a new one's too)
        assert {name: len(sends) for name, sends in trips.items()} == dict.fromkeys(trips, len(trips["email"])), \
            trips


def test_a_phone_channels_stray_chat_id_names_nobody_else(api):
    """On whatsapp the phone is the identity: an `id` sent along in cc_data must not reach the subscription
    of another chat or phone."""
    res = api.ok("resources/add", **email_resource(channels=["telegram_bot", "whatsapp"], channel_settings={}))
    base = {"db_id": 1, "profile_id": "p1", "resource_id": res["id"]}
    x = api.ok("subscriptions/set", **base, channel="whatsapp", cc_data={"phone": "+15550001111"},
               status="unsubscribed")
    y = api.ok("subscriptions/set", **base, channel="whatsapp", cc_data={"phone": "+15550002222", "id": "+15550001111"})
    assert y["hash_id"] != x["hash_id"] and y["status"] == "subscribed"
    assert api.ok("subscriptions/get", **base, channel="whatsapp", cc_data={"phone": "+15550001111"})["status"] == \
        "unsubscribed"


def test_values_of_a_deleted_field_are_not_kept_as_the_new_fields(api, r):
    """A field deleted, then added again with another type, does not take the old values of the old type."""
    fields = [{"title": "Plan", "api_name": "plan", "type": "int"}]
    res = api.ok("resources/add", **email_resource(channel_settings={"email": {
        "from_email": "a@shop.example", "fields": fields}}))
    api.ok("subscriptions/set", **sub(res, custom_fields={"plan": 42}))
    api.ok("resources/update", id=res["id"], channel_settings={"email": {"fields": [], "delete_fields": ["plan"]}})
    assert api.ok("subscriptions/get", **sub(res))["custom_fields"] == {}
    api.ok("resources/update", id=res["id"], channel_settings={"email": {"fields": [{**fields[0], "type": "bool"}]}})
    assert api.ok("subscriptions/get", **sub(res))["custom_fields"] == {}
    assert api.ok("subscriptions/set", **sub(res, status="unsubscribed"))["custom_fields"] == {}
    assert api.ok("subscriptions/set", **sub(res, custom_fields={"plan": True}))["custom_fields"] == {"plan": True}


def test_a_field_added_again_with_its_type_shows_the_values_still_stored(api, client):
    """README, API notes (what a deleted custom field leaves): its values are hidden at once, and dropped from a
    record by the next subscriptions/set of it; a record not so edited meanwhile (a one-click rewrites the
    record as it is) still holds its value, which the field added again with the same type shows."""
    fields = [{"title": "Plan", "api_name": "plan", "type": "line"}]
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "instant"}, channel_settings={"email": {
        "from_email": "a@shop.example", "fields": fields}}))
    for pid in ("p-1", "p-2", "p-3"):
        api.ok("subscriptions/set", **sub(res, profile_id=pid, custom_fields={"plan": "gold"}))
    link = api.ok("messages/links", **sub(res, profile_id="p-3"))["unsubscribe_url"]
    api.ok("resources/update", id=res["id"], channel_settings={"email": {"fields": [], "delete_fields": ["plan"]}})
    assert api.ok("subscriptions/get", **sub(res, profile_id="p-1"))["custom_fields"] == {}
    api.ok("subscriptions/set", **sub(res, profile_id="p-2", status="suspended"))
    assert client.post(link.removeprefix("https://unsub.example"), data="List-Unsubscribe=One-Click",
                       content_type="application/x-www-form-urlencoded").status_code == 200
    api.ok("resources/update", id=res["id"], channel_settings={"email": {"fields": fields}})
    shown = {pid: api.ok("subscriptions/get", **sub(res, profile_id=pid))["custom_fields"] for pid in ("p-1", "p-2", "p-3")}
    assert shown == {"p-1": {"plan": "gold"}, "p-2": {}, "p-3": {"plan": "gold"}}


def test_null_on_resources_update_clears_an_optional_text(api):
    """README, API notes: on resources/update, null given for one of a resource's optional texts clears it; one
    left out is kept."""
    res = api.ok("resources/add", **email_resource(description="Our weekly letter", unsubscribe={
        "mode": "confirm", "page_url": "https://shop.example/u?s={send_message_id}", "blocked_text": "No",
        "list_unsubscribe": {"enabled": True, "called_url": "https://shop.example/called"}}))
    kept = api.ok("resources/update", id=res["id"], name="Renamed")
    assert kept["description"] == "Our weekly letter" and kept["channel_settings"]["email"]["from_name"] == "Shop"
    cleared = api.ok("resources/update", id=res["id"], description=None, url=None, trk_domain=None,
                     channel_settings={"email": {"from_name": None}},
                     unsubscribe={"page_url": None, "blocked_text": None, "list_unsubscribe": {"called_url": None}})
    assert (cleared["description"], cleared["url"], cleared["trk_domain"]) == ("", None, None)
    assert cleared["channel_settings"]["email"]["from_name"] == ""
    assert cleared["unsubscribe"]["page_url"] is None and cleared["unsubscribe"]["blocked_text"] is None
    assert cleared["unsubscribe"]["list_unsubscribe"]["called_url"] is None


def test_a_value_stored_under_older_rules_of_content_is_kept(api, r, resource):
    """Only a value's type decides whether it still belongs to its field; a rule of content added since (a
    character refused now) does not make a stored value vanish on the next unrelated change."""
    from webapp import keys
    from webapp.subscriptions import decode_record, encode_record
    made = api.ok("subscriptions/set", **sub(resource, custom_fields={"plan": "gold"}))
    subs_key = keys.profile_subscriptions(1, "p-42")
    record = decode_record(r.hget(subs_key, made["hash_id"]))
    r.hset(subs_key, made["hash_id"], encode_record({**record, "custom_fields": {"plan": "O\x01Brien"}}))
    assert api.ok("subscriptions/set", **sub(resource, status="suspended"))["custom_fields"] == {"plan": "O\x01Brien"}


def test_a_deleted_resources_subscriptions_are_out_of_service(api, r, resource):
    from webapp import events
    api.ok("subscriptions/set", **sub(resource))
    api.ok("subscriptions/set", **sub(resource, profile_id="p-43", status="suspended"))
    other = api.ok("resources/add", **email_resource(name="Other"))
    api.ok("subscriptions/set", **sub(other))
    api.ok("resources/delete", id=resource["id"])
    assert [s["resource_id"] for s in api.ok("subscriptions/list", db_id=1, profile_id="p-42")] == [other["id"]]
    before = redis_state(r)
    assert api.call("subscriptions/unsuspend_all", db_id=1).get_json()["updated"] == 0
    assert redis_state(r) == before                                 # no change, no event with "cats": []
    assert api.call("subscriptions/suspend_all", db_id=1).get_json()["updated"] == 1   # the other resource's
    assert [e["method"] for e in events.list_events(r, 1, "p-42")[0]] == ["api", "api", "api"]


def test_delete_and_undelete(api, r, resource, subscription):
    assert api.ok("subscriptions/delete", **sub(resource))["is_delete"] is True
    assert api.ok("subscriptions/get", **sub(resource))["is_delete"] is True
    assert api.ok("subscriptions/undelete", **sub(resource))["is_delete"] is False
    before = redis_state(r)
    api.fail("subscriptions/delete", 404, **sub(resource, email="nobody@example.com"))
    assert redis_state(r) == before


def test_suspend_all_and_unsuspend_all(api, r, resource):
    for pid in ("a", "b", "c"):
        api.ok("subscriptions/set", **sub(resource, profile_id=pid))
    api.ok("subscriptions/set", **sub(resource, profile_id="c", status="unsubscribed"))
    resp = api.call("subscriptions/suspend_all", db_id=1).get_json()
    assert resp["error"] == 0 and resp["updated"] == 2
    assert api.ok("subscriptions/get", **sub(resource, profile_id="a"))["status"] == "suspended"
    assert api.ok("subscriptions/get", **sub(resource, profile_id="c"))["status"] == "unsubscribed"
    resp = api.call("subscriptions/unsuspend_all", db_id=1, profile_id="a").get_json()
    assert resp["updated"] == 1
    assert api.ok("subscriptions/get", **sub(resource, profile_id="b"))["status"] == "suspended"
    before = redis_state(r)
    api.fail("subscriptions/suspend_all", 404, db_id=1, resource_id=999)
    api.fail("subscriptions/suspend_all", 400, db_id="x")
    assert redis_state(r) == before


def test_status_changes_are_recorded_as_chained_events(api, r, resource, subscription):
    from webapp import events
    api.ok("subscriptions/set", **sub(resource, status="unsubscribed"))
    api.ok("subscriptions/set", **sub(resource, custom_fields={"plan": "pro"}))   # no status change: no event
    history, _ = events.list_events(r, 1, "p-42")
    assert [e["method"] for e in history] == ["api", "api"]
    assert history[0]["before"]["status"] == "subscribed" and history[0]["after"]["status"] == "unsubscribed"
    assert history[0]["prev_hash"] == history[1]["hash"]
    assert events.verify_chain(r, 1, "p-42") is None


BAD_ADDRESSES = [
    ({"channel": "telegram_bot", "cc_data": {"id": "abc"}}, "numeric chat id"),
    ({"channel": "telegram_bot", "cc_data": {}}, "cc_data.id is required"),
    ({"channel": "telegram_bot", "cc_data": "12345"}, "cc_data must be an object"),
    ({"channel": "whatsapp", "cc_data": {"phone": "79000000000"}}, "E.164"),
    ({"channel": "viber", "cc_data": {"id": 5}}, "cc_data.phone is required"),
    ({"channel": "notify", "cc_data": {"phone": "+0123"}}, "E.164"),
    ({"channel": "push", "provider": "android-firebase"}, "subscription_id is required"),
    ({"channel": "push", "subscription_id": "abc"}, "provider is required"),
    ({"channel": "push", "provider": "", "subscription_id": "abc"}, "provider must not be empty"),
    ({"channel": "max_bot", "cc_data": {"id": "not-a-number"}}, "numeric chat id"),
]


@pytest.mark.parametrize("body,message", BAD_ADDRESSES, ids=[m for _, m in BAD_ADDRESSES])
def test_channel_addresses_are_validated(api, r, body, message):
    res = api.ok("resources/add", **email_resource(
        channels=["email", "sms", "push", "telegram_bot", "whatsapp", "viber", "notify", "max_bot"],
        channel_settings={"email": {"from_email": "a@shop.example"}}))
    before = redis_state(r)
    assert message in api.fail("subscriptions/set", 400, db_id=1, profile_id="p1", resource_id=res["id"], **body)
    assert redis_state(r) == before


# The stored record format (subscriptions.encode_record / decode_record).

def _stored(r, resource, profile_id="p-42", email="ann@example.com"):
    from webapp import keys
    from webapp.subscriptions import make_hash_id
    return r.hget(keys.profile_subscriptions(1, profile_id), make_hash_id(resource["id"], "email", email))


def test_records_are_stored_compactly(api, r, resource):
    created = api.ok("subscriptions/set", **sub(resource, date="2025-07-23T11:27:05.487Z"))
    raw = _stored(r, resource)
    # One-letter names, the address as a plain string, times as epoch ms, defaults (status 0, priority 0,
    # no opted-out categories, not deleted, no ip/url, source "api") left out.
    assert raw.startswith('{"r":%d,"c":"email","a":"ann@example.com",' % resource["id"]), raw
    assert '"d":1753270025487' in raw and "reg_info" not in raw and '"s"' not in raw and '"x"' not in raw
    assert len(raw) <= 110, raw
    assert api.ok("subscriptions/get", **sub(resource)) == created


def test_records_stored_in_the_long_form_still_read(api, r, resource):
    """A record written before the compact form (the code's own dict as plain JSON) reads the same."""
    import json
    from webapp.subscriptions import decode_record
    created = api.ok("subscriptions/set", **sub(resource, status="unsubscribed", cats=["receipts"]))
    key_raw = _stored(r, resource)
    from webapp import keys
    r.hset(keys.profile_subscriptions(1, "p-42"), created["hash_id"], json.dumps(decode_record(key_raw)))
    assert '"resource_id"' in _stored(r, resource)
    assert api.ok("subscriptions/get", **sub(resource)) == created


def _records():
    from hypothesis import strategies as st
    from webapp.validation import format_time
    from datetime import datetime, timezone
    times = st.one_of(
        st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)).map(
            lambda d: format_time(d.replace(tzinfo=timezone.utc))),
        st.text(max_size=30), st.none())
    text = st.text(max_size=20)
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40), text)
    address = st.one_of(st.builds(lambda e: {"email": e}, text), st.builds(lambda p: {"phone": p}, text),
                        st.dictionaries(st.sampled_from(["provider", "subscription_id", "cc_data", "email"]), scalar,
                                        max_size=3))
    reg_info = st.one_of(st.fixed_dictionaries({"date": times, "ip": st.one_of(st.none(), text),
                                                "url": st.one_of(st.none(), text),
                                                "source": st.sampled_from(["api", "import", ""])}),
                         st.dictionaries(text, scalar, max_size=3))
    return st.fixed_dictionaries(
        {"resource_id": st.integers(1, 2 ** 31), "channel": st.sampled_from(["email", "sms", "push", "viber", "x"]),
         "address": address},
        optional={"status": st.one_of(st.integers(0, 6), st.booleans()), "priority": st.integers(0, 2 ** 31),
                  "uncats": st.lists(text, max_size=3), "custom_fields": st.dictionaries(text, scalar, max_size=3),
                  "reg_info": reg_info, "is_delete": st.one_of(st.booleans(), st.integers(0, 1)),
                  "updated_at": times, "suspended_until": times, "locale": st.sampled_from(["en", "ru", "de"]),
                  "extra_member": scalar})


def test_every_record_survives_the_stored_form():
    """decode_record(encode_record(rec)) == rec, value types included, for any record (hypothesis)."""
    import json
    from hypothesis import given, settings
    from webapp.subscriptions import _DEFAULTS, decode_record, encode_record

    @settings(max_examples=400, deadline=None)
    @given(_records())
    def check(record):
        # A record always carries the defaulted members (set_subscription writes them all).
        full = {**{k: (v if not isinstance(v, (list, dict)) else type(v)()) for k, v in _DEFAULTS.items()}, **record}
        back = decode_record(encode_record(full))
        assert json.dumps(back, sort_keys=True) == json.dumps(full, sort_keys=True)
        assert {k: type(v) for k, v in back.items()} == {k: type(v) for k, v in full.items()}
    check()


def test_stored_times_read_back_as_datetime_formats_them():
    """validation.ms_to_time (time.gmtime, for speed) gives the text datetime gives of the same instant (as
    format_time, with the year in four digits) for every millisecond a datetime can hold, and anything outside
    that range back as it is (a damaged entry)."""
    from datetime import datetime, timedelta, timezone
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from webapp.validation import ms_to_time

    def by_datetime(ms):
        t = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=ms)
        return f"{t.year:04d}-" + t.strftime("%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"

    first, last = -62135596800000, 253402300799999  # 0001-01-01T00:00:00.000Z, 9999-12-31T23:59:59.999Z
    for ms in (first, last, -1, 0, 1, 999, 1000, 951782400000):  # 951782400000: 2000-02-29
        assert ms_to_time(ms) == by_datetime(ms)
    for ms in (first - 1, last + 1, 10 ** 20, -10 ** 20):
        assert ms_to_time(ms) == ms

    @settings(max_examples=2000, deadline=None)
    @given(st.integers(first, last))
    def check(ms):
        assert ms_to_time(ms) == by_datetime(ms)
    check()


def test_times_are_stored_as_numbers_exactly_when_strptime_would():
    """validation.time_to_ms (a pattern and a cached day count, for speed) turns a text into milliseconds exactly
    when the strptime definition does, and into the same number: format_time's texts, any datetime's, odd
    ones (2026-02-30, second 60, six-digit fractions, other digits) and any text at all stay as they are."""
    from datetime import datetime, timedelta, timezone
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from webapp.validation import format_time, ms_to_time, time_to_ms

    def by_strptime(text):
        try:
            moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        except (TypeError, ValueError):
            return text
        ms = (moment - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(milliseconds=1)
        return ms if ms_to_time(ms) == text else text

    def same(text):
        got, expected = time_to_ms(text), by_strptime(text)
        assert (got, type(got)) == (expected, type(expected)), text

    for text in ("2026-02-30T00:00:00.000Z", "0000-01-01T00:00:00.000Z", "2026-13-01T00:00:00.000Z",
                 "2026-11-29T23:59:60.000Z", "2026-11-29T18:12:37.607000Z", "2026-11-29T18:12:37.6Z",
                 "\uff12\uff10\uff12\uff16-11-29T18:12:37.607Z", "0001-01-01T00:00:00.000Z", None, 5, ""):
        same(text)

    @settings(max_examples=1500, deadline=None)
    @given(st.one_of(st.datetimes().map(lambda d: format_time(d.replace(tzinfo=timezone.utc))),
                     st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z", fullmatch=True),
                     st.text(max_size=30)))
    def check(text):
        same(text)
    check()


def test_now_iso_is_format_time_of_now():
    from datetime import datetime, timezone
    from webapp.validation import format_time, now_iso
    for _ in range(1000):
        before = format_time(datetime.now(timezone.utc))
        now = now_iso()
        assert before <= now <= format_time(datetime.now(timezone.utc)) and len(now) == len(before)


# Two addresses of one profile whose 8-hex hash_id is the same (make_hash_id) are two subscriptions, never one.
COLLIDING_EMAILS = ("user6340@example.com", "user46395@example.com")   # both 8bca7962 on resource 1, email
COLLIDING_CHATS = (72662, 93196)                                         # both 4c68d980 on resource 1, telegram_bot


def test_an_address_whose_hash_id_another_holds_is_refused_not_merged(api, r, resource):
    from webapp.subscriptions import make_hash_id
    first, second = COLLIDING_EMAILS
    assert resource["id"] == 1 and make_hash_id(1, "email", first) == make_hash_id(1, "email", second)
    made = api.ok("subscriptions/set", **sub(resource, email=first))
    before = redis_state(r)
    error = api.fail("subscriptions/set", 409, **sub(resource, email=second, status="unsubscribed"))
    assert "another address" in error and first not in error      # says why, without naming the other person
    assert redis_state(r) == before                                # the first one's record is untouched
    for path in ("subscriptions/get", "subscriptions/delete", "subscriptions/undelete"):
        assert "no such subscription" in api.fail(path, 404, **sub(resource, email=second))
    assert redis_state(r) == before
    assert api.ok("subscriptions/get", **sub(resource, email=first)) == made
    assert [s["email"] for s in api.ok("subscriptions/list", db_id=1, profile_id="p-42")] == [first]
    # In another profile the second address is a subscription of its own.
    assert api.ok("subscriptions/set", **sub(resource, email=second, profile_id="p-43"))["email"] == second


def test_a_chat_whose_hash_id_another_chat_holds_is_refused_and_still_found_by_an_older_spelling(api, r):
    from webapp import keys
    from webapp.subscriptions import make_hash_id
    res = api.ok("resources/add", **email_resource(channels=["telegram_bot"], channel_settings={}))
    first, second = COLLIDING_CHATS
    assert make_hash_id(res["id"], "telegram_bot", str(first)) == make_hash_id(res["id"], "telegram_bot", str(second))
    base = {"db_id": 1, "profile_id": "p1", "resource_id": res["id"], "channel": "telegram_bot"}
    made = api.ok("subscriptions/set", **base, cc_data={"id": first})
    before = redis_state(r)
    assert "another address" in api.fail("subscriptions/set", 409, **base, cc_data={"id": second})
    assert "no such subscription" in api.fail("subscriptions/get", 404, **base, cc_data={"id": str(second)})
    assert "no such subscription" in api.fail("messages/links", 404, **base, cc_data={"id": second})
    assert redis_state(r) == before
    # The second chat stored under an older spelling of its id (as the code did before chat ids were made
    # canonical) is found by it, past the first chat that holds its canonical hash_id.
    other = api.ok("subscriptions/set", **{**base, "profile_id": "p2"}, cc_data={"id": second}, status="unsubscribed")
    legacy = make_hash_id(res["id"], "telegram_bot", f"0{second}")
    r.hset(keys.profile_subscriptions(1, "p1"), legacy,
           r.hget(keys.profile_subscriptions(1, "p2"), other["hash_id"]))
    got = api.ok("subscriptions/get", **base, cc_data={"id": second})
    assert (got["hash_id"], got["status"], got["cc_data"]) == (legacy, "unsubscribed", {"id": second})
    assert api.ok("subscriptions/set", **base, cc_data={"id": second}, priority=4)["hash_id"] == legacy
    assert api.ok("messages/links", **base, cc_data={"id": second})["smid"]
    assert api.ok("subscriptions/get", **base, cc_data={"id": first}) == made


@pytest.mark.parametrize("status", ["hardbounced", "complained", "unsubscribed", "invalid", "suspended"])
def test_a_database_the_resource_no_longer_lists_still_records_what_stops_messages(api, r, resource, status):
    """dbs_ids decides who may subscribe: a subscription made before its database left the list can still be
    bounced, complained about, unsubscribed, marked invalid or paused, and edited, but not subscribed again."""
    api.ok("subscriptions/set", **sub(resource))
    api.ok("resources/update", id=resource["id"], dbs_ids=[2])
    got = api.ok("subscriptions/set", **sub(resource, status=status))
    assert got["status"] == status
    assert api.ok("subscriptions/set", **sub(resource, priority=3, cats=["receipts"]))["status"] == status
    before = redis_state(r)
    if status != "suspended":   # a pause that ends is no new subscription; out of a stopped status is one
        for again in ("subscribed", "unconfirmed", "suspended"):
            assert "may not subscribe" in api.fail("subscriptions/set", 400, **sub(resource, status=again))
    assert "may not subscribe" in api.fail("subscriptions/set", 400, **sub(resource, email="new@example.com",
                                                                              status=status))
    assert redis_state(r) == before
    if status == "suspended":
        assert api.ok("subscriptions/set", **sub(resource, status="subscribed"))["status"] == "subscribed"


def test_time_to_ms_of_a_text_ms_to_time_wrote_is_its_ms():
    """time_to_ms finds the texts ms_to_time wrote lately without parsing them (validation._MS_OF_TEXT): the
    number it gives is the one parsing gives, the ms the text was written from, for any ms a datetime holds."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from webapp import validation

    @settings(max_examples=2000, deadline=None)
    @given(st.integers(-62135596800000, 253402300799999))
    def check(ms):
        text = validation.ms_to_time(ms)
        remembered = validation.time_to_ms(text)
        validation._MS_OF_TEXT.clear()
        parsed = validation.time_to_ms(text)
        assert (remembered, type(remembered)) == (parsed, type(parsed)) == (ms, int), text
    check()
    validation._MS_OF_TEXT.clear()
    got = validation.time_to_ms(validation.ms_to_time(True))  # a bool is not remembered as its text's ms
    assert (got, type(got)) == (1, int)


def test_a_change_written_into_the_stored_members_is_the_text_encode_record_writes():
    """hotpaths.one_click changes a record without decoding it (subscriptions.decode_for_change, encode_changed):
    what it reads is decode_record's, and what it writes is encode_record's text of the decoded record so
    changed, byte for byte, for any record in the stored form (hypothesis)."""
    import json
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from webapp.subscriptions import _DEFAULTS, decode_for_change, decode_record, encode_changed, encode_record
    from webapp.validation import ms_to_time

    @settings(max_examples=400, deadline=None)
    @given(_records(), st.sampled_from([0, 1, 4, 5]), st.lists(st.text(max_size=8), max_size=3),
           st.integers(0, 253402300799999))
    def check(record, status, uncats, updated_ms):
        full = {**{k: (v if not isinstance(v, (list, dict)) else type(v)()) for k, v in _DEFAULTS.items()}, **record}
        try:
            raw = encode_record(full)
            decoded = decode_record(raw)
        except KeyError:  # a string address on a channel with no one-member address: not a record one writes
            return
        stored = json.loads(raw)
        read = decode_for_change(stored)
        assert read == {name: decoded.get(name) for name in read}
        changed = dict(decoded, status=status, uncats=uncats, updated_at=ms_to_time(updated_ms))
        assert encode_changed(stored, status, uncats, updated_ms) == encode_record(changed)
    check()


def test_stored_text_is_the_json_modules_and_event_hashes_are_of_its_canonical_text():
    """validation.compact_json and canonical_json_bytes, written by orjson where it writes the same text: for
    any JSON value, the text json.dumps writes (compact_json: read back the same where a float is spelt
    otherwise), and the canonical bytes exactly (hypothesis: text of any code point, lone surrogates and DEL
    among them, integers past 64 bits, floats, keys that are not text)."""
    import json
    import math
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from webapp.validation import canonical_json_bytes, compact_json

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                        st.sampled_from(["\x7f", "\ud800", "é", "\x1f\n\"\\", "\u2028"]))
    values = st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4),
        st.dictionaries(st.integers(0, 9), inner, max_size=2)), max_leaves=12)

    def has_float(value):
        if isinstance(value, dict):
            return any(map(has_float, value.values()))
        if isinstance(value, list):
            return any(map(has_float, value))
        return isinstance(value, float) and not math.isnan(value)

    @settings(max_examples=600, deadline=None)
    @given(values)
    def check(value):
        assert canonical_json_bytes(value) == json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        if has_float(value):
            assert json.loads(compact_json(value)) == json.loads(expected)
        else:
            assert compact_json(value) == expected
    check()


# Stored texts under a subscription's hash_id that are not a record the service writes (altered in Redis by
# hand, or damaged): not JSON, not an object, a member missing, a member of the wrong type (short names).
DAMAGED_RECORDS = [
    b"not json", b"", b"[1, 2]", b'"text"', b"null", b"{", b'{"c": "email", "a": "ann@example.com"}',
    *[json.dumps({"r": 1, "c": "email", "a": "ann@example.com", **member}).encode() for member in (
        {"r": "1"}, {"r": True}, {"r": None}, {"c": 5}, {"c": None}, {"a": 5}, {"a": None}, {"a": ["x"]},
        {"s": "x"}, {"s": 9}, {"s": -1}, {"s": None}, {"s": 0.0}, {"p": "1"}, {"p": None}, {"u": "news"},
        {"u": [1]}, {"u": None}, {"f": []}, {"f": "x"}, {"x": "yes"}, {"x": None}, {"t": [1]}, {"t": {}},
        {"z": 5.5}, {"g": 5}, {"g": ["ru"]})],
]


@pytest.mark.parametrize("damaged", DAMAGED_RECORDS, ids=range(len(DAMAGED_RECORDS)))
def test_a_damaged_record_is_taken_as_none_and_set_writes_it_anew(api, app, client, r, damaged, caplog):
    """Never a 500: a person's link reads as one whose subscription is gone (404), the API as no subscription,
    the profile's other subscriptions are unaffected, verify names it, and subscriptions/set writes it anew."""
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "confirm"}))
    ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email"}
    api.ok("subscriptions/set", **ident, email="ann@example.com")
    api.ok("subscriptions/set", **ident, email="bob@example.com")
    links = api.ok("messages/links", **ident, email="ann@example.com")
    path = links["unsubscribe_url"].removeprefix("https://unsub.example")
    manage = links["manage_url"].removeprefix("https://unsub.example")
    hash_id = read_smid(app.extensions["signing_keys"], path.rsplit("/", 1)[1]).hash_id
    r.hset(keys.profile_subscriptions(1, "p-42"), hash_id, damaged)
    before = redis_state(r)

    page = client.get(path)
    assert page.status_code == 404 and "<html" in page.get_data(as_text=True)
    one_click = client.post(path, data="List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
    assert one_click.status_code == 404 and one_click.get_data(as_text=True) == "Unknown unsubscribe link.\n"
    sdk = client.post(f"/sdk/v1/{res['id']}/unsubscribe", json={"smid": path.rsplit("/", 1)[1], "action": "show"},
                      headers={"Origin": "https://shop.example"})
    assert sdk.status_code == 404, sdk.get_json()
    manager = client.get(manage)
    assert manager.status_code == 200 and "b•" in manager.get_data(as_text=True)
    assert api.fail("subscriptions/get", expect=404, **ident, email="ann@example.com")
    listed = api.ok("subscriptions/list", db_id=1, profile_id="p-42")
    assert [s["email"] for s in listed] == ["bob@example.com"]
    assert redis_state(r) == before  # nothing above wrote (but telemetry)
    assert api.ok("events/verify", db_id=1, profile_id="p-42")["ok"] is False
    assert f"subscription {hash_id}): taken as missing" in caplog.text

    api.ok("subscriptions/set", **ident, email="ann@example.com")
    assert api.ok("subscriptions/get", **ident, email="ann@example.com")["status"] == "subscribed"
    assert client.get(path).status_code == 200


def test_the_one_click_and_every_other_reader_agree_on_which_records_are_damaged():
    """subscriptions.decode_for_change (the one-click's partial decode) refuses a stored record exactly when
    decode_record does, for stored members of any type: a link never unsubscribes a record its page calls gone."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from webapp.subscriptions import DamagedRecord, decode_for_change, decode_record
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.integers(), st.floats(allow_nan=False),
                     st.sampled_from(["email", "sms", "push", "ann@example.com", "news", "2026-01-01T00:00:00Z"]),
                     st.text(max_size=5))
    value = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(["email", "phone", "x"]),
                                                                       inner, max_size=2)), max_leaves=5)
    stored = st.dictionaries(st.sampled_from(["r", "c", "a", "s", "p", "u", "f", "x", "t", "z", "g", "d", "i"]),
                             value, max_size=8)

    @settings(max_examples=3000, deadline=None)
    @given(stored)
    def check(members):
        raw = json.dumps(members)
        try:
            decode_record(raw)
            damaged = False
        except DamagedRecord:
            damaged = True
        assert (decode_for_change(json.loads(raw)) is None) == damaged, raw
    check()
