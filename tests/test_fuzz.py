"""Generated requests over the API (schemathesis, from the OpenAPI document), the pages and the SDK
endpoint (hypothesis): never a 5xx, and never a state change without a valid token.

FUZZ_EXAMPLES sets the examples per generated test (CI default below; the README shows the full run)."""
import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import API_TOKEN, email_resource, form_token
from webapp import keys

pytestmark = pytest.mark.fuzz
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
FULL_RUN_EXAMPLES = 200  # the README's documented full run: it must make at least FULL_RUN_MINIMUM requests
FULL_RUN_MINIMUM = 10_000
GENERATED = {"requests": 0}  # the total, which conftest's run summary prints
PER_TEST = Counter()  # requests sent by each generated test function
PER_ENDPOINT = Counter()  # (test, API path) -> requests
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))


def sent(test, n=1, path=None):
    """Count n requests a generated test really sent (called after the request, never before)."""
    PER_TEST[test] += n
    GENERATED["requests"] += n
    if path is not None:
        PER_ENDPOINT[test, path] += n


# Keys a request without a valid token may legitimately write, left out of the comparison: the page-view counters
# (keys.page_views, us:views:<digest>: GET/HEAD of a page counts its views as scanner evidence, with a 10-minute
# TTL refreshed on each view) and Flask-Limiter's counters (keys.rate_limits, us:ratelimit:...: every SDK POST
# counts against the limits, token or not, and their windows expire). Neither is subscription state.
TELEMETRY_PREFIXES = (keys.page_views(""), keys.rate_limits() + ":")
READERS = {"string": lambda p, k: p.get(k), "hash": lambda p, k: p.hgetall(k),
           "list": lambda p, k: p.lrange(k, 0, -1), "set": lambda p, k: p.smembers(k),
           "zset": lambda p, k: p.zrange(k, 0, -1, withscores=True), "stream": lambda p, k: p.xrange(k)}


def strict_state(r):
    """Every key but telemetry: type, content, when it expires and, for a stream, its consumer groups (a
    webhook's read position). The expiry is PEXPIRETIME, an absolute time (-1: none), so a TTL set, dropped or
    refreshed is a change as much as a written value. RQ's keys hold pickled jobs, compared by their DUMP."""
    names = sorted(k for k in r.scan_iter(count=1000) if not k.startswith(TELEMETRY_PREFIXES))
    with r.pipeline(transaction=False) as pipe:
        for key in names:
            pipe.type(key)
            pipe.pexpiretime(key)
        meta = pipe.execute()
    kinds, expiries = meta[0::2], meta[1::2]
    with r.pipeline(transaction=False) as pipe:
        for key, kind in zip(names, kinds):
            if key.startswith("rq:"):
                pipe.dump(key)
            else:
                READERS.get(kind, lambda p, k: p.type(k))(pipe, key)
        contents = pipe.execute()
        for key, kind in zip(names, kinds):
            if kind == "stream":
                pipe.xinfo_groups(key)
        groups = iter(pipe.execute())
    return {key: (kind, content, expiry, next(groups) if kind == "stream" else None)
            for key, kind, content, expiry in zip(names, kinds, contents, expiries)}


def page_post(client, path, **form):
    """Post a page's own form (with the CSRF token of the page as served) and return the response."""
    token = form_token(client.get(path).get_data(as_text=True))
    return client.post(path, data={"csrf_token": token, **form})


@pytest.fixture
def seeded(app, api, client, r):
    """A resource with a subscription in every mode, one valid link per mode, and something for every
    fuzzed cancel/undo/resume/delivery to change if it got through: a pending delayed timer (with its RQ tick),
    a subscription unsubscribed through its page a moment ago (undoable there), a subscription paused in the
    manager (its manager undo record with it), and a webhook (its consumer group on the timeline)."""
    app.config["TIME_UNIT_SECONDS"] = 60  # a real-length timer: pending throughout the test, whatever its length
    links = {}
    for mode in ("instant", "confirm", "blocked", "delayed"):
        res = api.ok("resources/add", **email_resource(name=mode, unsubscribe={"mode": mode},
                                                      urls=["http://127.0.0.1:9999"]))
        ident = {"db_id": 1, "profile_id": f"p-{mode}", "resource_id": res["id"], "channel": "email",
                 "email": f"{mode}@example.com"}
        sub = api.ok("subscriptions/set", **ident)
        links[mode] = (res, api.ok("messages/links", **ident), dict(sub, ident=ident))
    page = {mode: links[mode][1]["unsubscribe_url"].removeprefix("https://unsub.example") for mode in links}
    assert page_post(client, page["delayed"], action="start").status_code == 303
    assert page_post(client, page["confirm"], action="unsubscribe", scope="categories",
                     categories="news").status_code == 303
    manager = links["instant"][1]["manage_url"].removeprefix("https://unsub.example")
    assert page_post(client, manager, action="suspend", hash_id=links["instant"][2]["hash_id"],
                     days="14").status_code == 303
    api.ok("webhooks/add", url="http://127.0.0.1:9/hook", secret="fuzz-webhook-secret-0123")
    state = strict_state(r)
    pending = [k for k in state if ":pending:" in k and k != keys.pending_due()]
    assert len(pending) == 1 and state[pending[0]][2] == -1           # armed: kept until it fires or is cancelled
    assert state[keys.manager_undo(1, "p-instant")][2] > 0                        # manager undo, with its expiry
    assert api.ok("subscriptions/get", **links["instant"][2]["ident"])["status"] == "suspended"
    assert r.zcard(keys.suspensions_due()) == 1 and r.zcard(keys.pending_due()) == 1
    assert 'value="undo"' in app.test_client().get(page["confirm"]).get_data(as_text=True)  # undoable on its page
    assert state[keys.events_timeline()][3] and state[keys.webhooks()][1]           # webhook and its group
    assert any(k.startswith("rq:job:") for k in state)                            # the timer's scheduled tick
    return {mode: (res, link) for mode, (res, link, _sub) in links.items()}


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
        sent("api_with_token", path=path)
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
        before = strict_state(r)
        response = case.call()
        sent("api_without_token", path=path)
        assert response.status_code in (400, 401), (case.path, response.status_code)
        assert strict_state(r) == before
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
    before = strict_state(r)
    from urllib.parse import quote
    resp = client.open(f"/{kind}/{quote(token, safe='')}", method=method, data=form,
                       query_string={"lang": query})
    sent("pages_invalid_tokens")
    assert resp.status_code < 500
    assert resp.status_code != 200 or method != "POST"
    assert strict_state(r) == before


@FUZZ_SETTINGS
@given(mode=st.sampled_from(["instant", "confirm", "blocked", "delayed"]), position=st.integers(0, 200),
       char=st.sampled_from("AQgw-_9z"), method=st.sampled_from(["GET", "HEAD", "POST"]), form=FORM)
def test_altered_links_change_nothing(app, r, seeded, mode, position, char, method, form):
    _res, links = seeded[mode]
    token, manager_token = links["smid"], links["manage_url"].rsplit("/", 1)[1]
    altered, manager = mutate(token, position, char), mutate(manager_token, position, char)
    assume(altered != token and manager != manager_token)  # both really altered (else: another example)
    before = strict_state(r)
    resp = app.test_client().open(f"/unsubscribe/{altered}", method=method, data=form)
    sent("pages_altered_links")
    assert resp.status_code in (400, 404), (altered, method, resp.status_code)
    resp = app.test_client().open(f"/manage/{manager}", method=method, data=form)
    sent("pages_altered_links")
    assert resp.status_code in (400, 404), (manager, method, resp.status_code)   # refused, as the SMID's is
    assert strict_state(r) == before


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
    before = strict_state(r)
    headers = {"Origin": origin} if origin else {}
    resp = app.test_client().post(f"/sdk/v1/{res['id']}/unsubscribe", data=_json.dumps(body),
                                  content_type=content_type, headers=headers)
    sent("sdk_bodies")
    assert 400 <= resp.status_code < 500
    assert strict_state(r) == before


# area -> {generated test: the fewest requests it sends per example}; every example sends exactly this many.
AREAS = {"pages": {"pages_invalid_tokens": 1, "pages_altered_links": 2},
         "sdk": {"sdk_bodies": 1},
         "api": {"api_with_token": len(ENDPOINTS), "api_without_token": len(ENDPOINTS)}}  # per path, EXAMPLES each


def count_report():
    areas = {area: sum(PER_TEST[t] for t in tests) for area, tests in AREAS.items()}
    parts = [f"{area} {areas[area]:,} (" + ", ".join(f"{t} {PER_TEST[t]:,}" for t in tests) + ")"
             for area, tests in AREAS.items()]
    return (f"fuzz requests, FUZZ_EXAMPLES={EXAMPLES}: " + "; ".join(parts)
            + f"; total {GENERATED['requests']:,}")


class CountSummary:
    """Prints count_report() at the end of the run's summary (a plugin registered by the test below)."""

    def __init__(self, line):
        self.line = line

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line(self.line)


def test_zz_enough_requests_were_generated(request):
    """Every generated test sent its share (EXAMPLES examples each, per API path for the API), and the
    documented full run (FUZZ_EXAMPLES=200) sends at least 10,000 requests. Runs after the others (file order)."""
    line = count_report()
    print(line)
    if not request.config.pluginmanager.has_plugin("fuzz-request-counts"):
        request.config.pluginmanager.register(CountSummary(line), "fuzz-request-counts")
    for area, tests in AREAS.items():
        for test, per_example in tests.items():
            assert PER_TEST[test] >= EXAMPLES * per_example, (area, test, PER_TEST[test], line)
    for test in AREAS["api"]:
        short = {path: PER_ENDPOINT[test, path] for path in ENDPOINTS if PER_ENDPOINT[test, path] < EXAMPLES}
        assert not short, (test, short)  # every documented operation got its EXAMPLES requests
    assert GENERATED["requests"] == sum(PER_TEST.values())
    if EXAMPLES >= FULL_RUN_EXAMPLES:
        assert GENERATED["requests"] >= FULL_RUN_MINIMUM, line
