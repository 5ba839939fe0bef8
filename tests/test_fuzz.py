"""Generated requests over the API (schemathesis, from the OpenAPI document), the pages and the SDK
endpoint (hypothesis): never a 5xx, and never a state change without a valid token.

FUZZ_EXAMPLES sets the examples per generated test (CI default below; the README shows the full run)."""
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import API_TOKEN, email_resource, redis_state

pytestmark = pytest.mark.fuzz
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
GENERATED = {"requests": 0}
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))


@pytest.fixture
def seeded(api, client):
    """A resource with a subscription in every mode, and one valid link per mode."""
    links = {}
    for mode in ("instant", "confirm", "blocked", "delayed"):
        res = api.ok("resources/add", **email_resource(name=mode, unsubscribe={"mode": mode},
                                                      urls=["http://127.0.0.1:9999"]))
        ident = {"db_id": 1, "profile_id": f"p-{mode}", "resource_id": res["id"], "channel": "email",
                 "email": f"{mode}@example.com"}
        api.ok("subscriptions/set", **ident)
        links[mode] = (res, api.ok("messages/links", **ident))
    return links


from webapp.openapi import ENDPOINTS  # noqa: E402


def operation_cases(app, path):
    """The hypothesis strategy schemathesis builds for one documented operation."""
    schema = schemathesis.openapi.from_wsgi("/api/v1.1/openapi.json", app)
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path == f"/api/v1.1/{path}":
            return op.as_strategy()
    raise AssertionError(f"{path} is not in the OpenAPI document")


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
def test_api_never_answers_5xx(app, seeded, path):
    @FUZZ_SETTINGS
    @given(case=operation_cases(app, path))
    def run(case):
        response = case.call(headers={"Authorization": f"Bearer {API_TOKEN}"})
        GENERATED["requests"] += 1
        assert response.status_code < 500, (case.path, case.body, response.text[:300])
        if response.headers.get("Content-Type", "").startswith("application/json"):
            payload = response.json()
            assert set(payload) >= {"error", "error_text"}
            assert (payload["error"] == 0) == (response.status_code == 200)
    run()


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
def test_api_changes_nothing_without_the_token(app, r, seeded, path):
    @FUZZ_SETTINGS
    @given(case=operation_cases(app, path))
    def run(case):
        if isinstance(case.body, dict) and case.body.get("token") == API_TOKEN:
            case.body["token"] = "not-the-token"
        before = redis_state(r)
        response = case.call()
        GENERATED["requests"] += 1
        assert response.status_code in (400, 401), (case.path, response.status_code)
        assert redis_state(r) == before
    run()


URL_CHARS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=200)
TOKENISH = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=0,
                   max_size=170)
FORM = st.dictionaries(st.sampled_from(["action", "categories", "csrf_token", "List-Unsubscribe", "lang", "scope",
                                        "hash_id", "days", "field.age", "x"]),
                       st.one_of(st.text(max_size=40), st.sampled_from(["unsubscribe", "undo", "start", "cancel",
                                                                        "now", "One-Click", "save", "suspend"])),
                       max_size=5)


def mutate(token, position, char):
    position %= len(token)
    return token[:position] + char + token[position + 1:]


@FUZZ_SETTINGS
@given(kind=st.sampled_from(["unsubscribe", "manage"]), token=st.one_of(TOKENISH, URL_CHARS),
       method=st.sampled_from(["GET", "HEAD", "POST"]), form=FORM, query=URL_CHARS)
def test_pages_with_invalid_tokens_never_5xx_never_change(app, r, seeded, kind, token, method, form, query):
    client = app.test_client()
    before = redis_state(r)
    from urllib.parse import quote
    resp = client.open(f"/{kind}/{quote(token, safe='')}", method=method, data=form,
                       query_string={"lang": query})
    GENERATED["requests"] += 1
    assert resp.status_code < 500
    assert resp.status_code != 200 or method != "POST"
    assert redis_state(r) == before


@FUZZ_SETTINGS
@given(mode=st.sampled_from(["instant", "confirm", "blocked", "delayed"]), position=st.integers(0, 200),
       char=st.sampled_from("AQgw-_9z"), method=st.sampled_from(["GET", "HEAD", "POST"]), form=FORM)
def test_altered_links_change_nothing(app, r, seeded, mode, position, char, method, form):
    _res, links = seeded[mode]
    token = links["smid"]
    altered = mutate(token, position, char)
    if altered == token:
        return
    before = redis_state(r)
    resp = app.test_client().open(f"/unsubscribe/{altered}", method=method, data=form)
    GENERATED["requests"] += 2
    assert resp.status_code in (400, 404)
    manager = mutate(links["manage_url"].rsplit("/", 1)[1], position, char)
    resp = app.test_client().open(f"/manage/{manager}", method=method, data=form)
    assert resp.status_code < 500
    assert redis_state(r) == before


@FUZZ_SETTINGS
@given(body=st.one_of(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=30),
                                   lambda inner: st.lists(inner, max_size=4)
                                   | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12),
                      st.fixed_dictionaries({"smid": TOKENISH, "action": st.sampled_from(["confirm", "cancel", "show",
                                                                                          "x"]),
                                             "categories": st.lists(st.text(max_size=8), max_size=3)})),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]),
       origin=st.sampled_from([None, "http://127.0.0.1:9999", "https://evil.example", "null"]),
       resource_index=st.sampled_from(["instant", "confirm", "delayed", "blocked"]))
def test_sdk_endpoint_with_generated_bodies(app, r, seeded, body, content_type, origin, resource_index):
    import json as _json
    res, _links = seeded[resource_index]
    before = redis_state(r)
    headers = {"Origin": origin} if origin else {}
    resp = app.test_client().post(f"/sdk/v1/{res['id']}/unsubscribe", data=_json.dumps(body),
                                  content_type=content_type, headers=headers)
    GENERATED["requests"] += 1
    assert 400 <= resp.status_code < 500
    assert redis_state(r) == before


def test_zz_enough_requests_were_generated():
    """The count is printed in the run's summary (conftest); FUZZ_EXAMPLES=200 makes over 10,000."""
    assert GENERATED["requests"] >= EXAMPLES * len(ENDPOINTS)
