"""resources/add, update, get, list, delete, fields_get: the contract's shape and every validation rule."""
import copy
import json

import pytest

from conftest import email_resource, redis_state
from webapp import keys, resources


def test_add_and_get_round_trip(api):
    created = api.ok("resources/add", **email_resource())
    got = api.ok("resources/get", id=created["id"])
    for key in ("id", "name", "channels", "dbs_ids", "url", "trk_domain", "rtoken", "sdk_script_url"):
        assert key in got
    assert got["channels"] == ["email", "sms"]
    assert got["unsubscribe"]["mode"] == "delayed" and got["unsubscribe"]["timer_minutes"] == 10
    assert got["categories"][1] == {"title": "Receipts", "api_name": "receipts", "in_manager": True,
                                    "required": True}
    assert got["sdk_script_url"].startswith("https://unsub.example/ak_list_unsubscribe.js?id=")


def _with(path, value):
    body = email_resource()
    target = body
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target[part]
    last = parts[-1]
    if value is DELETE:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return body


DELETE = object()

BAD_RESOURCES = [
    ("name", DELETE, "name is required"),
    ("name", "  ", "name must not be empty"),
    ("name", 5, "name must be a string"),
    ("name", "del\x7fx", "name contains control characters"),     # DEL would go into List-ID as obs-qtext
    ("name", "next\x85line", "name contains control characters"),  # a C1 control (NEL)
    ("url", "ftp://x.example", "url must be an absolute"),
    ("url", "javascript:alert(1)", "url must be an absolute"),
    ("urls", ["https://ok.example", "nope"], "urls[1]"),
    ("dbs_ids", [0], "dbs_ids must be at least 1"),
    ("trk_domain", "not a domain", "trk_domain"),
    ("increase_priority", "yes", "increase_priority must be true or false"),
    ("channels", [], "at least one channel"),
    ("channels", ["email", "sms", "push", "telegram_bot", "whatsapp", "viber", "notify", "max_bot", "x"],
     "at most 8 channels"),
    ("channels", ["email", "email"], "twice"),
    ("channels", ["Email!"], "not a channel name"),
    ("categories", [{"title": "A", "api_name": "1bad"}], "api_name must match"),
    ("categories", [{"title": "A", "api_name": "a"}, {"title": "B", "api_name": "a"}], "used twice"),
    ("categories", [{"title": "A", "api_name": "a", "colour": "red"}], "colour is not a known field"),
    ("channel_settings.email.from_email", "not-an-email", "from_email is not a valid email"),
    ("channel_settings.email.list_id", "<weekly.shop.example>", "RFC 2919"),
    ("channel_settings.email.list_id", "weekly.other.example", "sender's domain"),
    ("channel_settings.email.list_id", "a" * 250 + ".shop.example", "255 octets"),
    ("channel_settings.email.list_id", "shop.example", "sender's domain"),
    ("channel_settings.email.fields", [{"title": "X", "api_name": "x", "type": "date"}], "type must be one of"),
    ("channel_settings.email.fields", [{"title": "X", "api_name": "_x", "type": "int"}], "api_name must match"),
    ("channel_settings.email.fields", [{"title": "X", "api_name": "x", "type": "int", "default": "7"}],
     "default must be an integer"),
    ("channel_settings.email.fields", [{"title": "X", "api_name": "x", "type": "bool", "default": 1}],
     "default must be true or false"),
    ("channel_settings.push", {"fields": []}, "not one of the resource's channels"),
    ("channel_settings.sms.unknown", "x", "unknown is not a known field"),
    ("unsubscribe.mode", "sometimes", "mode must be one of"),
    ("channel_settings.email.fields", [{"title": "X", "api_name": "x\n", "type": "int"}], "api_name must match"),
    ("channel_settings.email.list_id", "weekly.shop.example\n", "list_id"),
    ("unsubscribe.timer_minutes", 31, "at most 30"),
    ("unsubscribe.timer_minutes", -1, "at least 1"),
    ("unsubscribe.timer_minutes", 0, "at least 1"),           # not taken as "unset" (the default, 10)
    ("unsubscribe.timer_minutes", False, "must be an integer"),
    ("unsubscribe.page_url", "https://shop.example/u?id={profile_id}", "placeholders"),
    ("unsubscribe.page_url", "not a url", "absolute"),
    ("unsubscribe.list_unsubscribe.enabled", "no", "enabled must be true or false"),
    ("unsubscribe.list_unsubscribe.called_url", "mailto:x@y.z", "absolute"),
    ("default_locale", "de", "default_locale must be one of"),
    ("surprise", 1, "surprise is not a known field"),
    # A value of another JSON type is refused, not taken for "none" because it is falsy.
    ("description", {}, "description must be a string"),
    ("description", 0, "description must be a string"),
    ("url", 0, "url must be an absolute"),
    ("url", False, "url must be an absolute"),
    ("url", [], "url must be an absolute"),
    ("trk_domain", [], "trk_domain must be a domain name"),
    ("trk_domain", 0, "trk_domain must be a domain name"),
    ("channel_settings.email", 0, "channel_settings.email must be an object"),
    ("channel_settings.email", [], "channel_settings.email must be an object"),
    ("channel_settings.sms", False, "channel_settings.sms must be an object"),
]


@pytest.mark.parametrize("path,value,message", BAD_RESOURCES, ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD_RESOURCES])
def test_add_rejects_bad_input_and_writes_nothing(api, r, path, value, message):
    api.ok("resources/add", **email_resource())
    before = redis_state(r)
    error = api.fail("resources/add", 400, **_with(path, value))
    assert message in error
    assert redis_state(r) == before


def test_non_ascii_domains_are_kept_as_browsers_and_mail_systems_spell_them(api):
    created = api.ok("resources/add", **email_resource(trk_domain="Faß.Example"))
    assert created["trk_domain"] == "xn--fa-hia.example"             # IDNA 2008: not fass.example
    ident = {"db_id": 1, "profile_id": "p-1", "resource_id": created["id"], "channel": "email"}
    stored = api.ok("subscriptions/set", **ident, email="Ann@Straße.example")
    assert stored["email"] == "ann@xn--strae-oqa.example"


def test_null_or_empty_text_still_means_none(api):
    """null (and "" for url and trk_domain) is "none", as the README says: only other JSON types are refused."""
    created = api.ok("resources/add", **email_resource(description=None, url="", trk_domain="",
                                                       channel_settings={"email": None}))
    assert (created["description"], created["url"], created["trk_domain"]) == ("", None, None)
    assert created["channel_settings"]["email"]["from_email"] == ""
    updated = api.ok("resources/update", id=created["id"], url="https://shop.example", trk_domain="t.shop.example")
    cleared = api.ok("resources/update", id=created["id"], url=None, trk_domain=None, description=None)
    assert (updated["url"], cleared["url"], cleared["trk_domain"], cleared["description"]) == (
        "https://shop.example", None, None, "")


def test_page_url_placeholders_are_accepted(api):
    body = _with("unsubscribe.page_url", "https://shop.example/u?smid={send_message_id}&rt={resource_token}")
    assert api.ok("resources/add", **body)["unsubscribe"]["page_url"].endswith("{resource_token}")


@pytest.mark.parametrize("page_url", ["https://shop.example/bye", "https://shop.example/bye?rt={resource_token}"])
def test_a_page_url_without_the_smid_is_refused(api, r, resource, page_url):
    """The seed: {send_message_id} is a required parameter of the page's URL; without it an instant-mode link
    sent people to a page that could not tell which subscription to stop."""
    before = redis_state(r)
    for path, body in [("resources/add", _with("unsubscribe.page_url", page_url)),
                       ("resources/update", {"id": resource["id"], "unsubscribe": {"page_url": page_url}})]:
        error = api.fail(path, 400, **body)
        assert "unsubscribe.page_url must contain {send_message_id}" in error, path
    assert redis_state(r) == before
    with_smid = "https://shop.example/bye/{send_message_id}"
    assert api.ok("resources/update", id=resource["id"], unsubscribe={"page_url": with_smid})[
        "unsubscribe"]["page_url"] == with_smid
    assert api.ok("resources/update", id=resource["id"], unsubscribe={"page_url": None})[
        "unsubscribe"]["page_url"] is None


def test_a_resource_stored_with_a_page_url_without_the_smid_can_still_be_updated(api, r, resource):
    """Stored before the rule: its other parts can be changed; a page_url given anew must follow the rule."""
    from webapp import keys
    stored = json.loads(r.get(keys.resource(resource["id"])))
    stored["unsubscribe"]["page_url"] = "https://shop.example/bye"
    r.set(keys.resource(resource["id"]), json.dumps(stored))
    assert api.ok("resources/update", id=resource["id"], name="Renamed")["name"] == "Renamed"
    assert "must contain {send_message_id}" in api.fail("resources/update", 400, id=resource["id"],
                                                         unsubscribe={"page_url": "https://shop.example/bye2"})


def test_update_keeps_api_names_fixed(api, r, resource):
    rid = resource["id"]
    renamed = copy.deepcopy(email_resource()["categories"])
    renamed[0]["api_name"] = "newsletter"
    before = redis_state(r)
    assert "must keep api_name 'news'" in api.fail("resources/update", 400, id=rid, categories=renamed)
    fields = [{"title": "Plan", "api_name": "tier", "type": "line"}]
    assert "must keep api_name 'plan'" in api.fail(
        "resources/update", 400, id=rid, channel_settings={"email": {"fields": fields}})
    retyped = [{"title": "Plan", "api_name": "plan", "type": "int"}]
    assert "cannot change" in api.fail("resources/update", 400, id=rid,
                                       channel_settings={"email": {"fields": retyped}})
    assert redis_state(r) == before


def test_update_changes_titles_and_can_delete_explicitly(api, resource):
    rid = resource["id"]
    cats = copy.deepcopy(resource["categories"])
    cats[0]["title"] = "Weekly news"
    updated = api.ok("resources/update", id=rid, categories=cats, unsubscribe={"mode": "confirm"})
    assert updated["categories"][0]["title"] == "Weekly news"
    assert updated["unsubscribe"]["mode"] == "confirm" and updated["unsubscribe"]["timer_minutes"] == 10
    assert updated["rtoken"] == resource["rtoken"]
    trimmed = api.ok("resources/update", id=rid, delete_categories=["news"])
    assert [c["api_name"] for c in trimmed["categories"]] == ["receipts"]
    regenerated = api.ok("resources/update", id=rid, regenerate_rtoken=True)
    assert regenerated["rtoken"] != resource["rtoken"]
    renamed = api.ok("resources/update", resource_id=rid, name="Weekly")   # named as resources/get takes it
    assert renamed["id"] == rid and renamed["name"] == "Weekly"


@pytest.mark.parametrize("body", [{"delete_categories": [{}]}, {"delete_categories": [["news"]]},
                                  {"channel_settings": {"email": {"delete_fields": [{}]}}}])
def test_update_refuses_deletions_that_are_not_names(api, r, resource, body):
    before = redis_state(r)
    assert "must match" in api.fail("resources/update", 400, id=resource["id"], **body)
    assert redis_state(r) == before


@pytest.mark.parametrize("raw,message", [
    (json.dumps({"token": "test-api-token", **email_resource()})[:-1] + ', "name": "News \\ud83d"}',
     "not valid Unicode"),   # a lone surrogate: stored, it made every page and link of the resource a 500
    ("[" * 100000 + "]" * 100000, "must be a JSON object"),   # nested past Python's recursion limit
])
def test_bodies_python_cannot_keep_are_refused(client, r, raw, message):
    resp = client.post("/api/v1.1/resources/add", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and message in resp.get_json()["error_text"]
    assert redis_state(r) == {}


def test_the_body_is_read_as_json_whatever_its_content_type(client):
    raw = json.dumps({"token": "test-api-token", **email_resource()})
    resp = client.post("/api/v1.1/resources/add", data=raw,      # what curl -d sends
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200 and resp.get_json()["data"]["name"] == email_resource()["name"]


def test_list_pages_with_from_id(api):
    ids = [api.ok("resources/add", **email_resource(name=f"R{i}"))["id"] for i in range(5)]
    resp = api.call("resources/list", from_id=0, limit=2).get_json()
    assert [x["id"] for x in resp["data"]] == ids[:2]
    assert resp["next_from_id"] == ids[2] and resp["total_count"] == 5
    resp = api.call("resources/list", from_id=ids[4], limit=2).get_json()
    assert [x["id"] for x in resp["data"]] == ids[4:] and resp["next_from_id"] is None
    assert "limit must be at most 100" in api.fail("resources/list", 400, limit=1000)


def test_fields_get(api, resource):
    fields = api.ok("resources/fields_get", id=resource["id"], channel="email")
    assert {"category": "system", "title": "Email", "name": "email", "required": True, "type": "line"} in fields
    assert {"category": "custom", "title": "Plan", "name": "plan", "required": False, "type": "line"} in fields
    assert "not a channel" in api.fail("resources/fields_get", 400, id=resource["id"], channel="push")


@pytest.mark.parametrize("channel,name", [("email", "email"), ("email", "status"), ("sms", "phone"),
                                          ("sms", "priority"), ("push", "provider"), ("push", "subscription_id")])
def test_a_custom_field_may_not_take_a_system_fields_name(api, r, channel, name):
    """fields_get listed two `email` fields, and custom_fields.email could not be told from the address."""
    before = redis_state(r)
    body = email_resource(channels=["email", "sms", "push"],
                          channel_settings={channel: {"fields": [{"api_name": name, "type": "line"}]}})
    error = api.fail("resources/add", 400, **body)
    assert f"fields[0].api_name {name!r} is the name of a system field of the {channel} channel" in error
    assert redis_state(r) == before
    # Another channel's system field name is free (a sms field may be called email).
    other = "sms" if channel != "sms" else "email"
    body["channel_settings"] = {other: {"fields": [{"api_name": name, "type": "line"}]}}
    if name not in ("status", "priority"):
        assert [f["name"] for f in api.ok("resources/fields_get", id=api.ok("resources/add", **body)["id"],
                                          channel=other)].count(name) == 1


def test_a_field_stored_under_a_system_name_before_the_rule_does_not_block_updates(api, r, resource):
    from webapp import keys
    stored = json.loads(r.get(keys.resource(resource["id"])))
    stored["channel_settings"]["email"]["fields"].append(
        {"title": "Status", "api_name": "status", "type": "line", "default": None, "required": False,
         "in_manager": False})
    r.set(keys.resource(resource["id"]), json.dumps(stored))
    assert api.ok("resources/update", id=resource["id"], name="Renamed")["name"] == "Renamed"
    assert "status" not in [f["api_name"] for f in api.ok("resources/update", id=resource["id"], channel_settings={
        "email": {"delete_fields": ["status"]}})["channel_settings"]["email"]["fields"]]


def test_delete(api, r, resource):
    api.ok("resources/delete", id=resource["id"])
    assert api.fail("resources/get", 404, id=resource["id"])
    before = redis_state(r)
    api.fail("resources/delete", 404, id=resource["id"])
    assert redis_state(r) == before


@pytest.mark.parametrize("path,body", [
    ("resources/get", {"force_id_typo": True}), ("resources/delete", {"force_id_typo": True}),
    ("resources/fields_get", {"channel": "email", "chanel": "sms"}), ("resources/list", {"from": 1}),
    ("resources/get", {"id": 3}), ("resources/delete", {"id": 3}), ("resources/fields_get", {"id": 3, "channel": "sms"}),
    ("resources/update", {"id": 3, "name": "Renamed"})])
def test_a_request_naming_two_resources_or_an_unknown_field_is_refused(api, r, path, body):
    """resources/delete {"resource_id": 1, "id": 3, "force_id_typo": true} deleted resource 3: as every other
    endpoint, these refuse a field they do not know, and `id` and `resource_id` that name different resources."""
    for _ in range(3):
        api.ok("resources/add", **email_resource())
    before = redis_state(r)
    ids = {} if path == "resources/list" else {"resource_id": 1}
    error = api.fail(path, 400, **ids, **body)
    unknown = next((k for k in body if k not in ("id", "name", "channel")), None)
    assert (f"{unknown} is not a known field" if unknown else "id and resource_id name different resources") in error
    assert redis_state(r) == before
    assert api.ok("resources/get", resource_id=3, id="3")["id"] == 3    # the same resource, however written


@pytest.mark.parametrize("kwargs,status", [
    ({"token": None}, 401), ({"token": "wrong"}, 401), ({"token": ""}, 401),
])
def test_token_is_required(api, r, kwargs, status):
    before = redis_state(r)
    api.fail("resources/add", status, **kwargs, **email_resource())
    assert redis_state(r) == before


def test_bearer_token_and_bad_bodies(client, r):
    body = email_resource()
    resp = client.post("/api/v1.1/resources/add", json=body, headers={"Authorization": "Bearer test-api-token"})
    assert resp.status_code == 200 and resp.get_json()["error"] == 0
    before = redis_state(r)
    for data, ctype in [("not json", "application/json"), ("[1,2]", "application/json"), ("", "text/plain")]:
        resp = client.post("/api/v1.1/resources/add", data=data, content_type=ctype)
        assert resp.status_code == 400 and resp.get_json()["error_text"]
    resp = client.get("/api/v1.1/resources/add")
    assert resp.status_code == 405 and resp.get_json()["error"] == 405
    assert client.post("/api/v1.1/nope", json={}).get_json()["error"] == 404
    assert redis_state(r) == before


def test_openapi_lists_every_endpoint(client, app):
    spec = client.get("/api/v1.1/openapi.json").get_json()
    api_rules = {rule.rule for rule in app.url_map.iter_rules()
                 if rule.rule.startswith("/api/v1.1/") and "POST" in rule.methods}
    assert api_rules and api_rules <= set(spec["paths"])
    export = client.post("/api/v1.1/events/export", json={"token": "test-api-token"})
    documented = spec["paths"]["/api/v1.1/events/export"]["post"]["responses"]["200"]["content"]
    assert export.mimetype in documented                                # JSON lines, as the server answers


def test_every_documented_endpoint_refuses_a_field_it_does_not_know(api, r):
    """The OpenAPI document says so (additionalProperties: false), and each endpoint does, before anything else."""
    from webapp.openapi import ENDPOINTS
    spec = api.client.get("/api/v1.1/openapi.json").get_json()
    before = redis_state(r)
    for path in ENDPOINTS:
        assert spec["paths"][f"/api/v1.1/{path}"]["post"]["requestBody"]["content"]["application/json"]["schema"][
            "additionalProperties"] is False
        assert "zz_typo is not a known field" in api.fail(path, 400, zz_typo=True), path
    assert redis_state(r) == before


def test_the_documented_limits_are_the_ones_the_server_keeps(api, r):
    """200 categories, 100 fields per channel, 32-character api names, 1024-character line values: the OpenAPI
    document gives each, and the server takes exactly that much and refuses one more."""
    spec = api.client.get("/api/v1.1/openapi.json").get_json()["paths"]
    body = spec["/api/v1.1/resources/add"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]
    max_categories = body["categories"]["maxItems"]
    max_name = body["categories"]["items"]["properties"]["api_name"]["maxLength"]
    field_schema = body["channel_settings"]["additionalProperties"]["properties"]["fields"]
    max_fields = field_schema["maxItems"]
    assert field_schema["items"]["properties"]["api_name"]["maxLength"] == max_name
    subscription = spec["/api/v1.1/subscriptions/set"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]
    max_line = subscription["custom_fields"]["additionalProperties"]["maxLength"]
    assert subscription["cats"]["maxItems"] == max_categories
    assert (max_categories, max_fields, max_name, max_line) == (200, 100, 32, 1024)    # as the README says

    def cats(n, prefix="c"):
        return [{"api_name": f"{prefix}{i}"} for i in range(n)]

    def fields(n):
        return {"email": {"fields": [{"api_name": f"f{i}", "type": "line"} for i in range(n)]}}

    res = api.ok("resources/add", **email_resource(categories=cats(max_categories), channel_settings=fields(
        max_fields)))
    assert "categories has more than" in api.fail("resources/add", 400, **email_resource(
        categories=cats(max_categories + 1)))
    assert "fields has more than" in api.fail("resources/add", 400, **email_resource(
        channel_settings=fields(max_fields + 1)))
    long_name = "n" * max_name
    named = api.ok("resources/add", **email_resource(categories=[{"api_name": long_name}], channel_settings={
        "email": {"fields": [{"api_name": long_name, "type": "line"}]}}))
    for where in ("categories", "channel_settings"):
        too_long = email_resource(categories=[{"api_name": long_name + "n"}]) if where == "categories" else \
            email_resource(channel_settings={"email": {"fields": [{"api_name": long_name + "n", "type": "line"}]}})
        assert f"at most {max_name} characters" in api.fail("resources/add", 400, **too_long)
    ident = {"db_id": 1, "profile_id": "p1", "resource_id": named["id"], "channel": "email", "email": "a@b.example"}
    assert api.ok("subscriptions/set", **ident, custom_fields={long_name: "x" * max_line})
    assert f"longer than {max_line} characters" in api.fail("subscriptions/set", 400, **ident,
                                                            custom_fields={long_name: "x" * (max_line + 1)})
    assert api.ok("subscriptions/set", **{**ident, "resource_id": res["id"]}, cats=[f"c{i}" for i in range(200)])


@pytest.mark.parametrize("value", ["p-42", "a@b.c:1_2", "a b", "p" * 40, "p" * 41, "x\n", "", "п"])
def test_the_documented_profile_id_is_the_one_the_server_takes(value):
    import re
    from webapp.errors import InvalidInput
    from webapp.openapi import PROFILE_ID
    from webapp.validation import as_profile_id
    documented = (PROFILE_ID["minLength"] <= len(value) <= PROFILE_ID["maxLength"]
                  and re.search(PROFILE_ID["pattern"].replace("$", r"\Z"), value) is not None)
    try:
        taken = as_profile_id(value) == value
    except InvalidInput:
        taken = False
    assert documented == taken


def stored_resource(resource_id=1):
    """A resource as resources/add stores it (with its id and rtoken)."""
    return {**email_resource(), "id": resource_id, "rtoken": "r" * 24}


def test_decode_shared_decodes_a_stored_text_once_read_only_and_copies_are_plain():
    raw = json.dumps(stored_resource(), separators=(",", ":"))
    resource = resources.decode_shared(raw)
    assert resource == json.loads(raw)
    assert resources.decode_shared(raw.encode().decode()) is resource  # another str of the same text
    changed = raw.replace('"delayed"', '"instant"')
    assert resources.decode_shared(changed) is not resource  # a new text, as after an update: decoded afresh
    assert resources.decode_shared(changed)["unsubscribe"]["mode"] == "instant"
    for attempt in (lambda: resource.__setitem__("name", "x"), lambda: resource.update(name="x"),
                    lambda: resource.pop("name"), lambda: resource.setdefault("new", 1),
                    lambda: resource["categories"].append({}), lambda: resource["categories"][0].update(title="x"),
                    lambda: resource["categories"].sort(), lambda: resource["unsubscribe"].__delitem__("mode")):
        with pytest.raises(TypeError):
            attempt()
    assert resource == json.loads(raw)  # nothing changed
    for plain in (copy.copy(resource), copy.deepcopy(resource), dict(resource)):
        assert plain == resource
        plain["name"] = "changed"  # a copy is writable
    deep = copy.deepcopy(resource)
    deep["categories"][0]["title"] = "changed"
    deep["categories"].append({})
    assert type(deep["categories"]) is list and resource["categories"][0]["title"] != "changed"
    assert json.loads(json.dumps(resource)) == json.loads(raw)


def test_decode_shared_stays_bounded():
    for i in range(resources.SHARED_MAX + 10):
        resources.decode_shared(json.dumps(stored_resource(i)))
    assert resources.decode_shared.cache_info().currsize == resources.SHARED_MAX


def test_a_title_given_as_null_is_not_given(api):
    """README, API notes: "An optional text given as null means not given". A category's or custom field's
    title is optional (it defaults to the api_name): null takes that default, as leaving it out does."""
    created = api.ok("resources/add", **email_resource(
        categories=[{"title": None, "api_name": "news"}],
        channel_settings={"email": {"fields": [{"title": None, "api_name": "plan", "type": "line"}]}}))
    assert created["categories"][0]["title"] == "news"
    assert created["channel_settings"]["email"]["fields"][0]["title"] == "plan"
    updated = api.ok("resources/update", id=created["id"], categories=[{"title": None, "api_name": "news"}],
                     channel_settings={"email": {"fields": [{"title": None, "api_name": "plan", "type": "line"}]}})
    assert updated["categories"][0]["title"] == "news"
    assert updated["channel_settings"]["email"]["fields"][0]["title"] == "plan"
    api.fail("resources/add", **email_resource(categories=[{"title": "", "api_name": "news"}]))  # "" is no title


def _damaged_resources():
    whole = email_resource()
    stored = stored_resource()
    variants = [{"categories": "x"}, {"categories": [{"title": "News"}]}, {"categories": [{"api_name": 5,
                "title": "x", "required": False}]}, {"unsubscribe": None}, {"unsubscribe": {**whole["unsubscribe"],
                "mode": "later"}}, {"unsubscribe": {**whole["unsubscribe"], "timer_minutes": "10"}},
                {"unsubscribe": {**whole["unsubscribe"], "list_unsubscribe": True}},
                {"channel_settings": {"email": whole["channel_settings"]["email"]}},
                {"channel_settings": {**whole["channel_settings"], "email": {"fields": {}}}},
                {"channels": "email"}, {"name": 5}, {"id": "1"}, {"default_locale": "de"}]
    texts = [b"not json", b"", b"[]", b'{"id": 1}', b'"resource"']
    return texts + [json.dumps({**stored, **variant}).encode() for variant in variants]


@pytest.mark.parametrize("damaged", _damaged_resources())
def test_a_damaged_resource_is_taken_as_none_and_can_be_deleted(api, app, client, r, damaged, caplog):
    """Never a 500: its links answer as those of a deleted resource, the API says there is no such resource,
    the manager leaves its subscription out, and resources/delete removes it."""
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "confirm"}))
    other = api.ok("resources/add", **email_resource(name="Other"))
    ident = {"db_id": 1, "profile_id": "p-42", "channel": "email", "email": "ann@example.com"}
    for resource in (res, other):
        api.ok("subscriptions/set", **ident, resource_id=resource["id"])
    links = api.ok("messages/links", **ident, resource_id=res["id"])
    path = links["unsubscribe_url"].removeprefix("https://unsub.example")
    r.set(keys.resource(res["id"]), damaged)
    before = redis_state(r)

    assert client.get(path).status_code == 404
    one_click = client.post(path, data="List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
    assert one_click.status_code == 404 and one_click.get_data(as_text=True) == "Unknown unsubscribe link.\n"
    sdk = client.post(f"/sdk/v1/{res['id']}/unsubscribe", json={"smid": path.rsplit("/", 1)[1], "action": "show"},
                      headers={"Origin": "https://shop.example"})
    assert sdk.status_code == 404, sdk.get_json()
    manager = client.get(links["manage_url"].removeprefix("https://unsub.example"))
    assert manager.status_code == 200 and "Other" in manager.get_data(as_text=True)
    assert api.fail("resources/get", expect=404, id=res["id"])
    assert api.fail("resources/update", expect=404, id=res["id"], name="New name")
    assert [x["id"] for x in api.ok("resources/list")] == [other["id"]]
    assert api.fail("subscriptions/get", expect=404, **ident, resource_id=res["id"])
    assert api.fail("messages/links", expect=404, **ident, resource_id=res["id"])
    assert redis_state(r) == before  # nothing above wrote (but telemetry)
    assert f"a stored resource is not one the service writes (resource {res['id']}): taken as missing" in caplog.text

    assert api.ok("resources/delete", id=res["id"]) == {"id": res["id"]}
    assert r.get(keys.resource(res["id"])) is None
    assert api.ok("subscriptions/get", **ident, resource_id=other["id"])["status"] == "subscribed"
