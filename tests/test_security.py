"""Security properties across surfaces: CSRF on every form, no open redirect, headers, constant-time token
checks, tokens kept out of logs."""
import io
import logging
import re

import pytest
from itsdangerous import BadSignature

from conftest import API_TOKEN, back_link, email_resource, form_token, refuse_form
from webapp import tokens
from webapp.redact import redact

BASE = "https://unsub.example"


def fetch(client, method, path, **form):
    resp = client.open(path, method=method, data=form or None)
    page = (resp.status_code, resp.headers, resp.get_data(as_text=True))
    resp.close()
    return page


def make_link(api, mode, profile_id):
    res = api.ok("resources/add", **email_resource(name=f"{mode} {profile_id}", unsubscribe={"mode": mode}))
    ident = {"db_id": 1, "profile_id": profile_id, "resource_id": res["id"], "channel": "email",
             "email": f"{profile_id}@example.com"}
    sub = api.ok("subscriptions/set", **ident)
    links = api.ok("messages/links", **ident)
    return (links["unsubscribe_url"].removeprefix(BASE), links["manage_url"].removeprefix(BASE), sub["hash_id"])


def link_token(client, path):
    """The CSRF token the link's page serves (bound to the link: the same on every view of it)."""
    return form_token(client.get(path).get_data(as_text=True))


def submit(client, path, token, **form):
    """Post a form of the link's page with its CSRF token; return where the 303 leads."""
    resp = client.post(path, data={"csrf_token": token, **form})
    assert resp.status_code == 303, (path, form, resp.status_code)
    return resp.headers["Location"]


@pytest.fixture
def page_states(api, client, pages):
    """Every page a person can be shown, in every state, each as (status, headers, html) fetched just after the
    state was made through the pages' own forms: first views (conftest's pages), "You are unsubscribed" with its
    Undo form (after an unsubscribe on the page itself, instant and confirm), the page after an undo, a delayed
    page with its timer pending (Cancel / Unsubscribe now) and after a cancel, a paused subscription's page, the
    manager after an action (its undo notice form) and with an unsubscribed subscription (Subscribe again), a
    choice to make again (400 with its form), a CSRF failure (400) on both kinds of link, 404s, and a 409."""
    out = {name: fetch(client, "GET", path) for name, path in pages.items()}

    page, manage, _hash = make_link(api, "instant", "p-instant-done")
    token = link_token(client, page)
    out["unsubscribed-instant"] = fetch(client, "GET", submit(client, page, token, action="unsubscribe"))
    out["manage-unsubscribed"] = fetch(client, "GET", manage)
    out["undone-instant"] = fetch(client, "GET", submit(client, page, token, action="undo"))

    page, _manage, _hash = make_link(api, "confirm", "p-confirm-done")
    token = link_token(client, page)
    out["choice-error-400"] = fetch(client, "POST", page, action="unsubscribe", scope="categories",
                                    csrf_token=token)
    out["unsubscribed-confirm"] = fetch(client, "GET", submit(client, page, token, action="unsubscribe",
                                                              scope="categories", categories="news"))

    page, _manage, _hash = make_link(api, "delayed", "p-delayed-pending")
    token = link_token(client, page)
    out["delayed-pending"] = fetch(client, "GET", submit(client, page, token, action="start"))
    out["delayed-cancelled"] = fetch(client, "GET", submit(client, page, token, action="cancel"))

    page, manage, hash_id = make_link(api, "confirm", "p-paused")
    out["manage-after-action"] = fetch(client, "GET", submit(client, manage, link_token(client, manage),
                                                             action="suspend", hash_id=hash_id, days="14"))
    out["paused-unsubscribe-page"] = fetch(client, "GET", page)
    out["nothing-to-undo-409"] = fetch(client, "POST", page, action="undo",       # never unsubscribed here
                                       csrf_token=link_token(client, page))
    out["csrf-failure-400"] = fetch(client, "POST", page, action="unsubscribe", csrf_token="t1.forged")
    out["csrf-failure-manager-400"] = fetch(client, "POST", manage, action="resume", hash_id=hash_id)
    out["not-found-404"] = fetch(client, "GET", "/unsubscribe/" + "A" * 60)
    return out


# state -> the POST forms it must show, each as the actions of its buttons (a form counts for the first entry
# whose actions it has). Each must carry the link's CSRF token, and no state may have fewer forms than listed.
EXPECTED_FORMS = {
    "unsubscribe-instant": [{"unsubscribe"}], "unsubscribe-confirm": [{"unsubscribe"}],
    "unsubscribe-delayed": [{"start", "now"}], "unsubscribe-blocked": [],
    "manage": [{"save"}, {"suspend", "unsubscribe"}] * 3 + [{"save"}],      # 4 resources; blocked: save only
    "bad-link": [], "bad-manager": [],
    "unsubscribed-instant": [{"undo"}], "unsubscribed-confirm": [{"undo"}],
    "manage-unsubscribed": [{"save"}, {"resubscribe"}],
    "undone-instant": [{"unsubscribe"}], "nothing-to-undo-409": [], "choice-error-400": [{"unsubscribe"}],
    "delayed-pending": [{"cancel", "now"}], "delayed-cancelled": [{"start", "now"}],
    "manage-after-action": [{"undo"}, {"save"}, {"resume", "unsubscribe"}],
    "paused-unsubscribe-page": [{"unsubscribe"}],
    "csrf-failure-400": [], "csrf-failure-manager-400": [], "not-found-404": [],
}
EXPECTED_STATUS = {"bad-link": 404, "bad-manager": 404, "not-found-404": 404, "nothing-to-undo-409": 409,
                   "choice-error-400": 400, "csrf-failure-400": 400, "csrf-failure-manager-400": 400}


def test_every_post_form_carries_a_csrf_token(app, page_states):
    ring = app.extensions["signing_keys"]
    assert set(page_states) == set(EXPECTED_FORMS)                               # every state was made and checked
    total = 0
    for name, (status, _headers, html) in page_states.items():
        assert status == EXPECTED_STATUS.get(name, 200), (name, status)
        forms = re.findall(r"<form[^>]*method=\"post\".*?</form>", html, re.S)
        assert len(re.findall(r"<form\b", html)) == len(forms), name              # no form that is not a POST
        wanted = list(EXPECTED_FORMS[name])
        for form in forms:
            csrf = re.search(r'<input type="hidden" name="csrf_token" value="([^"]+)">', form)
            link = re.search(r'action="/(?:unsubscribe|manage)/([A-Za-z0-9_-]+)/?(?:\?lang=[a-z]+)?"', form)
            assert csrf and link, (name, form)
            assert tokens.form_token_matches(ring, link.group(1), csrf.group(1)), (name, form)  # this link's token
            actions = set(re.findall(r'name="action" value="([a-z]+)"', form))
            match = next((w for w in wanted if w <= actions), None)
            if match is not None:
                wanted.remove(match)
        assert not wanted, (name, "missing forms", wanted)
        assert len(forms) >= len(EXPECTED_FORMS[name]), name
        total += len(forms)
    assert total >= sum(len(forms) for forms in EXPECTED_FORMS.values()), total


def test_security_headers_on_every_page(client, page_states):
    resp = client.get("/static/pages.css")
    resp.close()
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert set(page_states) == set(EXPECTED_FORMS)
    for name, (_status, headers, html) in page_states.items():
        assert headers["X-Content-Type-Options"] == "nosniff", name
        for header in ("X-Content-Type-Options", "Content-Security-Policy", "Referrer-Policy", "X-Frame-Options"):
            assert len(headers.getlist(header)) == 1, (name, header)
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp, name
        assert headers["Referrer-Policy"] == "no-referrer", name
        assert "<main" in html, name                                                   # a rendered page
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), name       # no inline script
        assert not re.search(r"\son[a-z]+=", html), name                           # no inline handlers


def test_security_headers_keep_what_a_view_set(app):
    """The after-request hook adds the headers a view did not set, and leaves a view's own value alone."""
    @app.get("/test-own-frame-policy")
    def own_frame_policy():
        return "framed", {"X-Frame-Options": "SAMEORIGIN", "x-content-type-options": "nosniff"}

    resp = app.test_client().get("/test-own-frame-policy")
    assert resp.headers.getlist("X-Frame-Options") == ["SAMEORIGIN"]
    assert resp.headers.getlist("X-Content-Type-Options") == ["nosniff"]
    assert resp.headers["Referrer-Policy"] == "no-referrer"


SMID = "AQJ0MQEBawUTe31rGjgEcC00MgRuZXdzSrr1PokfUf84Ea8YYXY91w"
METHOD_NOT_ALLOWED = [  # (method, path, the methods its Allow names)
    ("GET", "/api/v1.1/resources/list", {"POST", "OPTIONS"}),
    ("GET", "/sdk/v1/1/unsubscribe", {"POST", "OPTIONS"}),
    ("PUT", f"/unsubscribe/{SMID}", {"GET", "HEAD", "POST", "OPTIONS"}),     # a link as sent: no slash
    ("PUT", f"/unsubscribe/{SMID}/", {"GET", "HEAD", "POST", "OPTIONS"}),
    ("DELETE", f"/manage/{SMID}", {"GET", "HEAD", "POST", "OPTIONS"}),
    ("POST", "/static/pages.css", {"GET", "HEAD", "OPTIONS"}),
]


@pytest.mark.parametrize("method,path,allowed", METHOD_NOT_ALLOWED, ids=[p for _, p, _ in METHOD_NOT_ALLOWED])
def test_a_405_says_which_methods_are_allowed(client, method, path, allowed):
    """RFC 9110 §15.5.6: a 405 MUST carry Allow, whichever surface renders it; the security headers stay."""
    resp = client.open(path, method=method)
    assert resp.status_code == 405
    assert {m.strip() for m in resp.headers.get("Allow", "").split(",")} == allowed
    page_headers = ("Content-Security-Policy", "Referrer-Policy", "X-Frame-Options")
    for header in ("X-Content-Type-Options", "Content-Type") + (page_headers if "/api/" not in path else ()):
        assert len(resp.headers.getlist(header)) == 1, header
    assert resp.headers["Content-Type"] != "text/html; charset=utf-8" or "<main" in resp.get_data(as_text=True)


@pytest.mark.parametrize("path,body,headers", [
    ("resources/list", {}, {}), ("resources/list", {"token": "wrong"}, {}),
    ("resources/list", {}, {"Authorization": "Bearer wrong"}), ("events/export", {}, {})])
def test_an_api_401_names_its_authentication_scheme(client, path, body, headers):
    """RFC 9110 §15.5.2: a 401 MUST carry WWW-Authenticate; the token also works as a JSON field."""
    resp = client.post(f"/api/v1.1/{path}", json=body, headers=headers)
    assert resp.status_code == 401 and resp.headers.getlist("WWW-Authenticate") == ["Bearer"]
    assert resp.get_json()["error"] == 401 and resp.headers["X-Content-Type-Options"] == "nosniff"
    refused = client.post("/api/v1.1/resources/list", json={"token": API_TOKEN, "limit": 0})
    assert refused.status_code == 400 and "WWW-Authenticate" not in refused.headers    # only a 401 has it


def test_no_open_redirect(client, pages):
    path = pages["unsubscribe-instant"]
    html = client.get(path).get_data(as_text=True)
    token = form_token(html)
    for lang in ("https://evil.example", "//evil.example", "ru"):
        resp = client.post(path + "?next=https://evil.example", data={"action": "unsubscribe", "csrf_token": token,
                                                                      "lang": lang})
        location = resp.headers.get("Location", "")
        assert resp.status_code == 303 and location.startswith("/unsubscribe/"), location
        assert "evil" not in location
    for name, page in pages.items():
        resp = client.get(page + "?next=https://evil.example&url=//evil.example")
        assert "evil" not in resp.headers.get("Location", ""), name


@pytest.mark.parametrize("status", [413, 429])
def test_the_way_back_from_a_refused_form_is_made_from_the_links_own_path_alone(app, client, api, r, status):
    """The way back on a page's or the manager's 413 and 429 is the link's own page, whatever the request says
    besides its path's token: not its Referer, its query (`next`, a `lang` that is no language) or what a mail
    client added after the link. A path whose token is not one the service issued, even of base64url, gets no
    link at all (only a 413 reaches it: a 429 needs the link's form token)."""
    from conftest import redis_state
    page, manage, hash_id = make_link(api, "instant", "p-back")
    evil = {"headers": {"Referer": "https://evil.example/", "Accept-Language": "en"}}
    query = "?next=https://evil.example&lang=//evil.example"
    before = redis_state(r)
    for link, back, form in ((page, f"{page}/?done=back&lang=en", {"action": "unsubscribe"}),
                             (manage, f"{manage}/?lang=en", {"action": "unsubscribe", "hash_id": hash_id})):
        token = link_token(client, link)
        resp = refuse_form(app, client, link + "%3E" + query, {"csrf_token": token, **form}, status, **evil)
        assert back_link(resp.get_data(as_text=True)) == (back, {page: "Back to the unsubscribe page",
                                                                 manage: "Back to my subscriptions"}[link]), link
    if status == 413:
        forged = page[:-1] + ("A" if page[-1] != "A" else "B")
        for junk in ("/unsubscribe/%3Cscript%3E/", "/unsubscribe/%5C%5Cevil.example", "/unsubscribe/" + "A" * 60,
                     forged, page[:-3], "/manage/%3Cscript%3E", "/manage/" + "A" * 60, manage[:-3]):
            resp = refuse_form(app, client, junk + query, {"action": "unsubscribe"}, 413, **evil)
            html = resp.get_data(as_text=True)
            assert back_link(html) is None, junk
            assert not [href for href in re.findall(r'href="([^"]+)"', html) if href.startswith(("//", "http"))]
    assert redis_state(r) == before


def test_api_token_is_compared_in_constant_time(api, monkeypatch):
    """The API token check is hmac.compare_digest's answer, and only that: a spy that answers the opposite of the
    real comparison for the API token lets the wrong token in and keeps the right one out. A check that called
    compare_digest and then compared with == (or ignored its result) would not follow the spy."""
    calls = []
    real = tokens.hmac.compare_digest
    expected = API_TOKEN.encode()

    def spy(a, b):
        calls.append((a, b))
        answer = real(a, b)
        return (not answer) if expected in (a, b) else answer   # other secrets (signatures) are left alone

    monkeypatch.setattr(tokens.hmac, "compare_digest", spy)
    api.ok("resources/list", token="wrong-token")                                  # the spy said "equal"
    assert (b"wrong-token", expected) in calls
    calls.clear()
    api.fail("resources/list", 401, token=API_TOKEN)                               # the spy said "different"
    assert (expected, expected) in calls
    calls.clear()
    bearer = api.client.post("/api/v1.1/resources/list", json={}, headers={"Authorization": "Bearer wrong-token"})
    assert bearer.status_code == 200 and (b"wrong-token", expected) in calls        # the header's way too
    monkeypatch.undo()
    api.fail("resources/list", 401, token="wrong-token")                           # and without the spy, as usual
    api.ok("resources/list")


def test_redact_keeps_only_a_prefix():
    smid = "AQJ0MQEBawUTe31rGjgEcC00MgRuZXdzSrr1PokfUf84Ea8YYXY91w"
    line = f'127.0.0.1 "POST /unsubscribe/{smid} HTTP/1.1" 200 and /manage/{smid}/?lang=ru'
    out = redact(line)
    assert smid not in out and f"/unsubscribe/{smid[:8]}…" in out and f"/manage/{smid[:8]}…/?lang=ru" in out


def test_app_log_on_a_storage_outage_redacts_the_token(app, pages, caplog):
    path = pages["unsubscribe-confirm"]
    app.config["REDIS_URL"] = "unix:///nonexistent/redis.sock"
    app.extensions.pop("redis", None)
    with caplog.at_level(logging.ERROR, logger="webapp"):
        resp = app.test_client().post(path, data={"List-Unsubscribe": "One-Click"})
    assert resp.status_code == 503
    smid = path.rsplit("/", 1)[1]
    assert caplog.records and all(smid not in rec.getMessage() for rec in caplog.records)
    assert any(smid[:8] in rec.getMessage() for rec in caplog.records)


def test_session_signing_serializer_is_built_once_per_key(app):
    sessions = app.session_interface
    first = sessions.get_signing_serializer(app)
    assert sessions.get_signing_serializer(app) is first
    cookie = first.dumps({"csrf_token": "x"})
    app.config["SECRET_KEY_FALLBACKS"] = [app.secret_key]
    app.secret_key = "rotated"
    rotated = sessions.get_signing_serializer(app)
    assert rotated is not first and rotated.loads(cookie) == {"csrf_token": "x"}  # old cookies still open
    with pytest.raises(BadSignature):
        first.loads(rotated.dumps({"a": 1}))                                         # new ones use the new key


# -- rate limits of the page and manager forms ---------------------------------------------------------------

def assert_readable_429(resp, text):
    """A 429 a person can read, with when to come back, and every header a page has."""
    html = resp.get_data(as_text=True)
    assert resp.status_code == 429 and text in html and "<main" in html, (resp.status_code, html[:300])
    assert 1 <= int(resp.headers["Retry-After"]) <= 61
    assert resp.headers["Cache-Control"] == "no-store" and resp.headers["Referrer-Policy"] == "no-referrer"
    for header in ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options"):
        assert len(resp.headers.getlist(header)) == 1, header


def test_page_and_manager_forms_are_limited_per_link(app, client, api, r):
    """A link's forms (any action) are counted per link: over the limit a readable 429 in the page's language
    changes nothing, while the link's one-click, its GET and other links go on; no Redis key holds a token."""
    from conftest import redis_state
    from webapp import events
    from webapp.tokens import link_digest
    app.config["PAGE_RATE_LIMIT_PER_LINK"] = "3 per minute"
    page, manage, hash_id = make_link(api, "instant", "p-limited")
    other_page, _other_manage, _ = make_link(api, "confirm", "p-other")
    token = link_token(client, page)
    for action in ("unsubscribe", "undo", "unsubscribe"):
        submit(client, page, token, action=action)
    before, ledger = redis_state(r), len(events.list_events(r, 1, "p-limited")[0])
    resp = client.post(page, data={"csrf_token": token, "action": "undo", "lang": "ru"})
    assert_readable_429(resp, "Слишком много запросов")
    assert "Попробуйте ещё раз через 1 минуту." in resp.get_data(as_text=True)
    resp = client.post(page, data={"csrf_token": token, "action": "undo"}, headers={"Accept-Language": "en"})
    assert_readable_429(resp, "Please try again in 1 minute.")
    assert redis_state(r) == before and len(events.list_events(r, 1, "p-limited")[0]) == ledger
    assert client.get(page).status_code == 200                                     # GET is not limited
    manager_token = link_token(client, manage)                                      # the manager link: its own count
    for _ in range(3):
        submit(client, manage, manager_token, action="save", hash_id=hash_id, categories="news")
    assert_readable_429(client.post(manage, data={"csrf_token": manager_token, "action": "save", "hash_id": hash_id}),
                        "Too many requests")
    submit(client, other_page, link_token(client, other_page), action="unsubscribe")   # another link goes on
    for _ in range(5):                       # the one-click is never limited: in front of Flask, and through it
        assert client.post(page, data="List-Unsubscribe=One-Click",
                           content_type="application/x-www-form-urlencoded").status_code == 200
        assert client.post(page, data={"List-Unsubscribe": "One-Click"},
                           content_type="multipart/form-data").status_code == 200
    counters = [key for key in r.scan_iter("us:ratelimit:*")]
    assert any(link_digest(page.rsplit("/", 1)[1]) in key for key in counters)
    assert any(link_digest(manage.rsplit("/", 1)[1]) in key for key in counters)
    assert not [key for key in r.scan_iter() if page.rsplit("/", 1)[1] in key or manage.rsplit("/", 1)[1] in key]


def test_page_and_manager_forms_are_limited_per_address(app, client, api, r):
    """One budget per client address for the forms of every link, unsubscribe pages and managers alike."""
    from conftest import redis_state
    app.config["PAGE_RATE_LIMIT_PER_IP"] = "4 per minute"
    links = [make_link(api, "confirm", f"p-{i}") for i in range(3)]
    for page, manage, hash_id in links[:2]:
        submit(client, manage, link_token(client, manage), action="save", hash_id=hash_id, categories="news")
        submit(client, page, link_token(client, page), action="unsubscribe")
    page, manage, hash_id = links[2]
    before = redis_state(r)
    assert_readable_429(client.post(page, data={"csrf_token": link_token(client, page), "action": "unsubscribe"}),
                        "Too many requests")
    assert_readable_429(client.post(manage, data={"csrf_token": link_token(client, manage), "action": "save",
                                                  "hash_id": hash_id}), "Too many requests")
    assert redis_state(r) == before
    elsewhere = client.post(page, data={"csrf_token": link_token(client, page), "action": "unsubscribe"},
                            environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert elsewhere.status_code == 303                                           # another address goes on


@pytest.mark.parametrize("how", ["out of memory", "replica"])
def test_a_form_limit_that_cannot_count_is_no_error_of_its_own(app, client, api, r, how):
    """While Redis refuses writes the limiter cannot count: a form goes on uncounted, as the SDK's read-only
    actions do. One with nothing to write (an unsubscribe made already) answers as usual; a change meets the
    same refusal in the view (503: not saved, nothing written), never a 429 or a 500."""
    from test_sdk import redis_refusing_writes
    page, manage, hash_id = make_link(api, "instant", "p-refused")
    token, manager_token = link_token(client, page), link_token(client, manage)
    submit(client, page, token, action="unsubscribe")
    with redis_refusing_writes(r, how):
        assert client.post(page, data={"csrf_token": token, "action": "unsubscribe"}).status_code == 303
        refused = client.post(page, data={"csrf_token": token, "action": "undo"})
        assert refused.status_code == 503 and "We could not confirm" in refused.get_data(as_text=True)
        refused = client.post(manage, data={"csrf_token": manager_token, "action": "resubscribe", "hash_id": hash_id})
        assert refused.status_code == 503
    assert client.post(page, data={"csrf_token": token, "action": "undo"}).status_code == 303


# -- request bodies -------------------------------------------------------------------------------------------

class CountedBody(io.BytesIO):
    """A request body that counts the bytes the request's handling reads of it."""

    def __init__(self, data):
        super().__init__(data)
        self.read_bytes = 0

    def read(self, size=-1):
        data = super().read(size)
        self.read_bytes += len(data)
        return data

    def readinto(self, buffer):
        n = super().readinto(buffer)
        self.read_bytes += n
        return n

    def readline(self, size=-1):
        data = super().readline(size)
        self.read_bytes += len(data)
        return data


BIG = 4 * 1024 * 1024 - 1024  # within the app-wide MAX_CONTENT_LENGTH (the API's)


def post_body(client, path, start, content_type, size=BIG, chunked=False, headers=None):
    """POST `start` padded with "a"s to `size` bytes, with its Content-Length (or none, as a chunked body that
    the server ends: gunicorn's wsgi.input_terminated); (response, bytes the handling read)."""
    body = CountedBody(start + b"a" * (size - len(start)))
    chunks = {"Transfer-Encoding": "chunked"} if chunked else {}                  # then no length counts
    resp = client.post(path, input_stream=body, content_type=content_type, headers={**(headers or {}), **chunks},
                       environ_overrides={"wsgi.input_terminated": True})
    resp.get_data()
    return resp, body.read_bytes


@pytest.mark.parametrize("chunked", [False, True], ids=["with its length", "chunked"])
def test_a_large_body_is_refused_before_it_is_read(app, client, api, r, chunked):
    """A large body to a page, a one-click (in front of Flask or through it), the manager or the SDK endpoint is
    answered 413 before it is read (one without a length is read up to the limit), with a readable page (or the
    SDK's JSON), and changes nothing. It was parsed first: a 4 MB form cost 2 s before its 404."""
    from conftest import redis_state
    page, manage, hash_id = make_link(api, "instant", "p-big")
    sdk_resource = api.ok("resources/add", **email_resource(name="sdk", unsubscribe={"mode": "instant"}))
    token, limit = link_token(client, page), app.config["PAGE_BODY_LIMIT_BYTES"]
    form = "application/x-www-form-urlencoded"
    posts = {
        "one-click": (page, b"List-Unsubscribe=One-Click&pad=", form),
        "one-click, multipart": (page, b"--x\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\n"
                                       b"One-Click\r\n--x\r\nContent-Disposition: form-data; name=\"pad\"\r\n\r\n",
                                 "multipart/form-data; boundary=x"),
        "page form": (page, f"csrf_token={token}&action=unsubscribe&pad=".encode(), form),
        "manager form": (manage, f"csrf_token={link_token(client, manage)}&action=unsubscribe&hash_id={hash_id}"
                                 "&pad=".encode(), form),
        "unknown link": ("/unsubscribe/" + "A" * 60 + "/", b"action=unsubscribe&pad=", form),
        "unknown manager link": ("/manage/" + "A" * 60, b"action=unsubscribe&pad=", form),
        "sdk": (f"/sdk/v1/{sdk_resource['id']}/unsubscribe", b'{"action": "confirm", "pad": "', "application/json"),
    }
    before = redis_state(r)
    for name, (path, start, content_type) in posts.items():
        resp, read = post_body(client, path, start, content_type, chunked=chunked,
                               headers={"Origin": "https://shop.example", "Accept-Language": "ru"})
        assert resp.status_code == 413, (name, resp.status_code)
        assert read == (limit + 1 if chunked else 0), (name, read)      # without a length: one byte past the limit
        if name == "sdk":
            assert resp.get_json()["error"] == 413 and resp.headers["Access-Control-Allow-Origin"]
        else:
            html = resp.get_data(as_text=True)
            assert "<h1>Слишком большой запрос</h1>" in html and "Ничего не изменено" in html, name
            assert resp.headers["Cache-Control"] == "no-store" and resp.headers["X-Frame-Options"] == "DENY"
    assert redis_state(r) == before
    resp, _read = post_body(client, page, f"csrf_token={token}&action=unsubscribe&pad=".encode(), form,
                            size=limit, chunked=chunked)                        # up to the limit: taken
    assert resp.status_code == 303 and api.ok("subscriptions/get", db_id=1, profile_id="p-big", resource_id=1,
                                              channel="email", email="p-big@example.com")["status"] == "unsubscribed"


def test_the_api_checks_a_bearer_token_before_it_reads_the_body(client):
    """A wrong token in the Authorization header is refused before the body is read; the API's own limit (a
    bulk call is large) and a token in the JSON body (Altcraft's way) stay as they were."""
    body = b'{"pad": "'
    resp, read = post_body(client, "/api/v1.1/resources/list", body, "application/json",
                           headers={"Authorization": "Bearer wrong"})
    assert resp.status_code == 401 and read == 0
    resp, read = post_body(client, "/api/v1.1/resources/list", body, "application/json",
                           headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert resp.status_code == 400 and read == BIG                                # read, and refused as JSON
    resp, read = post_body(client, "/api/v1.1/resources/list", b'{"token": "wrong", "pad": "', "application/json")
    assert resp.status_code == 400 and read == BIG                                # the token is in the body
    assert client.post("/api/v1.1/resources/list", json={"token": API_TOKEN}).status_code == 200
    assert client.post("/api/v1.1/resources/list", json={"token": "wrong"}).status_code == 401
