"""messages/links and links_bulk: URLs, List-* headers per RFC 8058/2369/2919, and zero Redis writes."""
import email
import email.policy
from email.header import decode_header, make_header

import pytest

from conftest import API_TOKEN, SIGNING_KEYS, ApiActions, close_clients, email_resource, redis_state
from webapp import create_app
from webapp.headers import list_id_phrase
from webapp.tokens import read_smid

# Commands run inside Lua scripts are counted under their own names, so a script that wrote would show here.
WRITE_COMMANDS = {"set", "hset", "hsetnx", "hmset", "incr", "incrby", "del", "unlink", "expire", "expireat",
                  "pexpire", "lpush", "rpush", "lset", "sadd", "srem", "zadd", "zrem", "xadd", "setex",
                  "getset", "append", "hincrby", "hdel", "rename", "flushall", "flushdb",
                  "exec", "multi"}


def msg(resource, **kw):
    body = {"resource_id": resource["id"], "db_id": 1, "profile_id": "p-42", "channel": "email",
            "email": "ann@example.com", "category": "news"}
    body.update(kw)
    return body


def test_links_shape_and_headers(api, app, resource, subscription):
    data = api.ok("messages/links", **msg(resource))
    assert data["unsubscribe_url"] == f"https://unsub.example/unsubscribe/{data['smid']}"
    assert data["manage_url"].startswith("https://unsub.example/manage/")
    assert data["headers"] == {
        "List-Unsubscribe": f"<{data['unsubscribe_url']}>",        # one https URL, nothing else
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "List-ID": "Weekly news <weekly.shop.example>",
    }
    smid = read_smid(app.extensions["signing_keys"], data["smid"])
    assert (smid.resource_id, smid.profile_id, smid.hash_id, smid.category) == \
        (resource["id"], "p-42", subscription["hash_id"], "news")
    assert len(data["smid"]) <= 160


@pytest.mark.parametrize("base,one_click", [("http://unsub.example", False), ("http://127.0.0.1:8000", True)])
def test_one_click_is_offered_only_on_https_links(api, app, resource, subscription, base, one_click):
    """RFC 8058 §3.1: List-Unsubscribe-Post goes with an https URI only (a local development address aside)."""
    app.config["PUBLIC_BASE_URL"] = base
    headers = api.ok("messages/links", **msg(resource))["headers"]
    assert headers["List-Unsubscribe"].startswith(f"<{base}/unsubscribe/")
    assert ("List-Unsubscribe-Post" in headers) == one_click


@pytest.mark.parametrize("base,ascii_base", [
    ("https://\u043e\u0442\u043f\u0438\u0441\u043a\u0430.\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444",
     "https://xn--80apgofne.xn--e1afmkfd.xn--p1ai"),
    ("https://unsub.example/\u043e\u0442\u043f\u0438\u0441\u043a\u0430/",
     "https://unsub.example/%D0%BE%D1%82%D0%BF%D0%B8%D1%81%D0%BA%D0%B0")])
def test_a_base_url_with_other_letters_is_issued_as_its_ascii_uri(app, redis_url, resource, subscription, base,
                                                                 ascii_base):
    """List-Unsubscribe holds URIs (RFC 2369) and a header field is US-ASCII (RFC 5322): PUBLIC_BASE_URL is
    IDNA- and percent-encoded at start, as a browser sends it, and its links still open their pages."""
    other = create_app({"TESTING": True, "REDIS_URL": redis_url, "API_TOKEN": API_TOKEN, "SIGNING_KEYS": SIGNING_KEYS,
                        "VAR_DIR": app.config["VAR_DIR"], "PUBLIC_BASE_URL": base})
    try:
        data = ApiActions(other.test_client()).ok("messages/links", **msg(resource))
        assert data["unsubscribe_url"] == f"{ascii_base}/unsubscribe/{data['smid']}"
        assert data["manage_url"].startswith(f"{ascii_base}/manage/")
        assert data["headers"]["List-Unsubscribe"] == f"<{data['unsubscribe_url']}>"
        assert all(value.isascii() for value in data["headers"].values())
        # Served at the base's path, as a proxy mounts it: the link's rest is the route.
        page = other.test_client().get(data["unsubscribe_url"].removeprefix(ascii_base), base_url=ascii_base)
        assert page.status_code == 200 and f"{ascii_base}/manage/" in page.get_data(as_text=True)
    finally:
        close_clients(other)


@pytest.mark.parametrize("unsubscribe", [{"mode": "blocked"}, {"list_unsubscribe": {"enabled": False}}])
def test_no_unsubscribe_headers_when_blocked_or_disabled(api, unsubscribe):
    res = api.ok("resources/add", **email_resource(unsubscribe=unsubscribe))
    api.ok("subscriptions/set", db_id=1, profile_id="p-42", resource_id=res["id"], channel="email",
           email="ann@example.com")
    headers = api.ok("messages/links", **msg(res))["headers"]
    assert headers == {"List-ID": "Weekly news <weekly.shop.example>"}


def test_no_list_id_header_without_a_list_id(api):
    """list_id is optional (the contract's resource does not require it): List-ID is issued only when it is set,
    as the README says; the unsubscribe headers are not held back for want of it."""
    res = api.ok("resources/add", **email_resource(channel_settings={"email": {"from_email": "news@shop.example"}}))
    assert res["channel_settings"]["email"]["list_id"] == ""
    api.ok("subscriptions/set", db_id=1, profile_id="p-42", resource_id=res["id"], channel="email",
           email="ann@example.com")
    assert set(api.ok("messages/links", **msg(res))["headers"]) == {"List-Unsubscribe", "List-Unsubscribe-Post"}


def test_sms_links_have_no_email_headers(api, resource):
    api.ok("subscriptions/set", db_id=1, profile_id="p-42", resource_id=resource["id"], channel="sms",
           phone="+79000000000")
    data = api.ok("messages/links", **msg(resource, channel="sms", phone="+79000000000", email=None))
    assert data["headers"] == {} and data["unsubscribe_url"]


@pytest.mark.parametrize("name,phrase", [
    ("Weekly news", "Weekly news"),
    ('News, "hot"', '"News, \\"hot\\""'),
    ("Новости", "=?utf-8?b?0J3QvtCy0L7RgdGC0Lg=?="),
])
def test_list_id_phrase(name, phrase):
    assert list_id_phrase(name) == phrase


@pytest.mark.parametrize("name", ["Новости магазина «Пример» для всех", "新" * 255, "Ж" + "x" * 200 + "ё"])
def test_a_long_non_ascii_name_is_several_encoded_words_of_at_most_75_characters(name):
    phrase = list_id_phrase(name)
    words = phrase.split(" ")
    assert len(words) > 1 and all(len(w) <= 75 and w.startswith("=?utf-8?b?") for w in words)
    assert str(make_header(decode_header(phrase))) == name                     # decoders join the words


@pytest.mark.parametrize("name", ["=?utf-8?q?Bank?=", "Offers from =?utf-8?q?Bank?= weekly",
                                  'Bank "=?utf-8?b?QmFuaw==?="', "\u0411\u0430\u043d\u043a =?koi8-r?q?x?="])
def test_a_name_that_looks_like_an_encoded_word_is_shown_as_written(api, name):
    """Mail clients decode "=?charset?q?...?=" in a phrase, Python's parser even inside quotes: such a name is
    itself encoded, so that the reader sees the resource's name, not what it spells."""
    res = api.ok("resources/add", **email_resource(name=name))
    ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email", "email": "a@example.com"}
    api.ok("subscriptions/set", **ident)
    header = api.ok("messages/links", **ident)["headers"]["List-ID"]
    parsed = email.message_from_string(f"List-ID: {header}\n\n", policy=email.policy.default)
    assert header.isascii() and str(parsed["List-ID"]) == f"{name} <weekly.shop.example>"


BAD_LINKS = [
    ({"category": "sports"}, 400, "not a category"),
    ({"category": "1x"}, 400, "category must match"),
    ({"channel": "push"}, 400, "not a channel"),
    ({"email": "nobody@example.com"}, 404, "no such subscription"),
    ({"email": "bad"}, 400, "not a valid email"),
    ({"resource_id": 999}, 404, "does not exist"),
    ({"profile_id": "p" * 41}, 400, "profile_id"),
    ({"sent_at": -5}, 400, "sent_at"),
]


@pytest.mark.parametrize("change,status,message", BAD_LINKS, ids=[m for *_, m in BAD_LINKS])
def test_links_validation(api, r, resource, subscription, change, status, message):
    before = redis_state(r)
    assert message in api.fail("messages/links", status, **msg(resource, **change))
    assert redis_state(r) == before


def test_no_links_for_a_deleted_subscription(api, client, resource, subscription):
    """A deleted subscription gets no new messages, so no new links; those already sent keep working
    (tests/test_unsubscribe_deleted.py)."""
    ident = {k: v for k, v in msg(resource).items() if k != "category"}
    api.ok("subscriptions/delete", **ident)
    # What to do about it: subscriptions/set keeps it deleted, undelete brings it back.
    assert api.fail("messages/links", 404, **msg(resource)) == (
        "the subscription is deleted (subscriptions/delete): subscriptions/undelete brings it back")
    assert api.fail("messages/links_bulk", 404, messages=[msg(resource, profile_id="p-9"), msg(resource)]) == (
        "messages[0]: no such subscription: add it with subscriptions/set")
    api.ok("subscriptions/set", db_id=1, profile_id="p-9", resource_id=resource["id"], channel="email",
           email="ann@example.com")
    assert api.fail("messages/links_bulk", 404, messages=[msg(resource, profile_id="p-9"), msg(resource)]) == (
        "messages[1]: the subscription is deleted (subscriptions/delete): subscriptions/undelete brings it back")
    api.ok("subscriptions/undelete", **ident)
    url = api.ok("messages/links", **msg(resource))["unsubscribe_url"]
    assert client.get(url.removeprefix("https://unsub.example")).status_code == 200


def test_bulk_in_order_and_limits(api, resource, subscription):
    api.ok("subscriptions/set", db_id=1, profile_id="p-43", resource_id=resource["id"], channel="email",
           email="bob@example.com")
    data = api.ok("messages/links_bulk", messages=[msg(resource), msg(resource, profile_id="p-43",
                                                                    email="bob@example.com", category=None)])
    assert len(data) == 2 and data[0]["smid"] != data[1]["smid"]
    assert "more than 1000" in api.fail("messages/links_bulk", 400, messages=[msg(resource)] * 1001)
    assert "must not be empty" in api.fail("messages/links_bulk", 400, messages=[])
    error = api.fail("messages/links_bulk", 400, messages=[msg(resource), msg(resource, category="zzz")])
    assert error.startswith("messages[1].")


def _write_calls(r):
    stats = r.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k.split("|")[0].removeprefix("cmdstat_") in WRITE_COMMANDS)


def test_ten_thousand_links_perform_zero_redis_writes(api, r, resource):
    profiles = [f"p{i}" for i in range(100)]
    for pid in profiles:
        api.ok("subscriptions/set", db_id=1, profile_id=pid, resource_id=resource["id"], channel="email",
               email=f"{pid}@example.com")
    before_state = redis_state(r)
    r.config_resetstat()
    issued = 0
    for batch in range(10):
        messages = [msg(resource, profile_id=profiles[i % 100], email=f"{profiles[i % 100]}@example.com")
                    for i in range(1000)]
        issued += len(api.ok("messages/links_bulk", messages=messages))
    assert issued == 10_000
    stats = r.info("commandstats")
    assert stats.get("cmdstat_hget", {}).get("calls") == 10_000   # the reads did happen
    assert _write_calls(r) == 0
    assert redis_state(r) == before_state


def test_no_links_for_an_address_whose_hash_id_another_address_holds(api, r, app, resource):
    """user6340@ and user46395@example.com share hash_id 8bca7962 on resource 1: links for the second, which
    has no subscription, must not be links that unsubscribe the first."""
    first, second = "user6340@example.com", "user46395@example.com"
    made = api.ok("subscriptions/set", db_id=1, profile_id="p-42", resource_id=resource["id"], channel="email",
                  email=first)
    assert "no such subscription" in api.fail("messages/links", 404, **msg(resource, email=second))
    error = api.fail("messages/links_bulk", 404, messages=[msg(resource, email=first), msg(resource, email=second)])
    assert error.startswith("messages[1]: no such subscription")
    data = api.ok("messages/links_bulk", messages=[msg(resource, email=first)] * 2)
    assert read_smid(app.extensions["signing_keys"], data[1]["smid"]).hash_id == made["hash_id"]


def test_links_find_every_channels_address_in_either_stored_form(api, r):
    """The existence check builds each stored record's identity in Lua (scripts.SUBSCRIPTIONS_EXIST): every
    channel's address, a record in the long form, and a chat id past 2**53 (which Lua reads as a double)."""
    import json

    from webapp import keys
    from webapp.subscriptions import decode_record
    res = api.ok("resources/add", **email_resource(
        channels=["email", "sms", "push", "telegram_bot", "whatsapp", "max_bot"],
        channel_settings={"email": {"from_email": "a@shop.example"}}))
    base = {"db_id": 1, "profile_id": "p1", "resource_id": res["id"]}
    addresses = [{"channel": "email", "email": "ann@example.com"}, {"channel": "sms", "phone": "+79000000000"},
                 {"channel": "push", "provider": "android-firebase", "subscription_id": "a81c264a938b475"},
                 {"channel": "telegram_bot", "cc_data": {"id": -1001234567890}},
                 {"channel": "whatsapp", "cc_data": {"phone": "+79000000001"}},
                 {"channel": "max_bot", "cc_data": {"id": "12345678901234567891"}}]
    made = [api.ok("subscriptions/set", **base, **address)["hash_id"] for address in addresses]
    messages = [{**base, **address} for address in addresses]
    smids = [link["smid"] for link in api.ok("messages/links_bulk", messages=messages)]
    subs_key = keys.profile_subscriptions(1, "p1")
    for hash_id, raw in r.hgetall(subs_key).items():                   # as the code before stored records
        r.hset(subs_key, hash_id, json.dumps(decode_record(raw)))
    assert len(api.ok("messages/links_bulk", messages=messages)) == len(smids) == len(set(made))
    near = {**messages[-1], "cc_data": {"id": "12345678901234567892"}}  # the same double, another chat
    assert "no such subscription" in api.fail("messages/links", 404, **near)
